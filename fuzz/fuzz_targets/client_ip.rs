//! `net::client`: the client address behind trusted proxies (`X-Forwarded-For`) and the URL a
//! carrier signed (`X-Forwarded-Proto` / `X-Forwarded-Host`), plus the Exotel check that
//! relies on both (IP allow-list, then the `token` query parameter).
//!
//! Input (newline-separated; every line after the fourth is a header):
//!   peer_ip \n trusted_proxies (comma-separated) \n public_url \n path_and_query \n
//!   name: value \n name: value ...
//! An unparsable peer is 10.0.0.2; unparsable proxy entries are dropped.
//!
//! Oracles: an untrusted peer's headers change nothing; the client is the peer or one of the
//! forwarded hops, never an IPv4-mapped address; the signed URL ends with the path as received
//! and its origin is the configured one or a well-formed forwarded one; Exotel accepts exactly
//! the allow-listed clients that carry the right token.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use callgate::carriers::exotel::Exotel;
use callgate::carriers::{CarrierHooks, Hook, Inbound, Prepared, VerifyContext};
use callgate::domain::Carrier;
use callgate::net::client::{canonical, client_ip, signed_url};
use callgate::net::form;
use callgate_fuzz::{fields, header_map, phone, text};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn hop_ip(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 5);
    let peer: IpAddr = text(f[0]).trim().parse().unwrap_or(IpAddr::from([10, 0, 0, 2]));
    let proxies: Vec<IpNet> = text(f[1])
        .split(',')
        .map(str::trim)
        .filter_map(|s| s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from)))
        .collect();
    let public_url = text(f[2]);
    let path = text(f[3]);
    let header_lines: Vec<(String, &[u8])> = f[4]
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let i = line.iter().position(|&b| b == b':')?;
            let value = &line[i + 1..];
            let value = value.strip_prefix(b" ").unwrap_or(value);
            Some((String::from_utf8_lossy(&line[..i]).trim().to_ascii_lowercase(), value))
        })
        .collect();
    let headers = header_map(header_lines.iter().map(|(n, v)| (n.as_str(), *v)));

    let trusted = |ip: IpAddr| proxies.iter().any(|n| n.contains(&canonical(ip)));

    // ---- client_ip
    let ip = client_ip(peer, &headers, &proxies);
    assert!(!matches!(ip, IpAddr::V6(v) if v.to_ipv4_mapped().is_some()), "client ip {ip} not canonical");
    if !trusted(peer) {
        assert_eq!(ip, canonical(peer), "untrusted peer's X-Forwarded-For was believed");
    }
    if ip != canonical(peer) {
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(hop_ip)
            .map(canonical)
            .collect();
        assert!(hops.contains(&ip), "client ip {ip} is neither the peer nor a forwarded hop");
    }
    // An empty proxy list trusts nobody.
    assert_eq!(client_ip(peer, &headers, &[]), canonical(peer));

    // ---- signed_url
    let url = signed_url(&public_url, peer, &headers, &proxies, &path);
    assert!(url.ends_with(&*path));
    let origin = &url[..url.len() - path.len()];
    if !trusted(peer) {
        assert_eq!(origin, public_url, "untrusted peer's X-Forwarded-Host was used");
    } else if origin != public_url {
        let (proto, host) = origin.split_once("://").expect("forwarded origin is proto://host");
        let configured_proto = public_url.split("://").next().unwrap_or("https");
        assert!(proto == "http" || proto == "https" || proto == configured_proto, "proto {proto:?}");
        assert!(
            !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)),
            "host {host:?}"
        );
    }
    assert_eq!(signed_url(&public_url, peer, &headers, &[], &path), format!("{public_url}{path}"));

    // ---- Exotel: allow-list on the client ip, then the token from the query string.
    let (_, query) = form::split_url(&path);
    let query = query.unwrap_or("");
    let ctx = VerifyContext { exotel_allowed: &proxies };
    let mut record = phone(Carrier::Exotel, "+918047110000");
    let mut inbound = Inbound {
        method: "GET",
        headers: &headers,
        url: &url,
        query,
        body: b"",
        form: Vec::new(),
        is_form: false,
        envelope: None,
        client_ip: ip,
        now_secs: 1_714_557_600,
    };
    let allowed = proxies.iter().any(|n| n.contains(&canonical(ip)));
    assert_eq!(Exotel::verify(&inbound, &Prepared::Exotel, &record, &ctx).is_ok(), allowed);
    record.config.exotel_webhook_token_sha256 = Some(Sha256::digest(b"fuzz-token").into());
    let token_ok = form::pairs(query.as_bytes())
        .filter_map(Result::ok)
        .find(|(k, _)| k == "token")
        .is_some_and(|(_, v)| v == "fuzz-token");
    assert_eq!(Exotel::verify(&inbound, &Prepared::Exotel, &record, &ctx).is_ok(), allowed && token_ok);
    for hook in [Hook::Incoming, Hook::Status] {
        let parsed = Exotel::parse(&mut inbound, hook);
        let stored: serde_json::Value = serde_json::from_str(parsed.params.get()).expect("stored params are JSON");
        assert!(stored.get("token").is_none(), "the Exotel token was kept in the event");
    }
});
