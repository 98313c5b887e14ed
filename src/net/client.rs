//! The client address and the public URL of a request. Forwarded headers are believed only
//! from a peer inside `CALLGATE_TRUSTED_PROXIES`; from anyone else they change nothing.

use std::net::IpAddr;

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    let ip = canonical(ip);
    proxies.iter().any(|n| n.contains(&ip))
}

/// `::ffff:1.2.3.4` is 1.2.3.4: a v4 allowlist must match a v4 peer seen on a v6 socket.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The socket peer, unless it is a trusted proxy: then the right-most X-Forwarded-For hop
/// that is not itself a trusted proxy. Hops are read right to left because each proxy
/// appends, so only the right end of the list is vouched for.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted(peer, proxies) {
        return peer;
    }
    let mut last = peer;
    // Several X-Forwarded-For headers are one list, in order.
    let values: Vec<&str> = headers.get_all("x-forwarded-for").filter_map(|v| v.to_str().ok()).collect();
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let hop = hop.trim();
        let Ok(ip) = hop.parse::<IpAddr>().or_else(|_| hop.parse::<std::net::SocketAddr>().map(|s| s.ip())) else {
            // An unparsable hop ends what can be trusted; the last good hop is the client.
            return last;
        };
        let ip = canonical(ip);
        if !trusted(ip, proxies) {
            return ip;
        }
        last = ip;
    }
    last
}

/// The URL the carrier called: the configured public origin, or, from a trusted proxy, its
/// X-Forwarded-Proto/Host; then the request's path and query exactly as received.
pub fn signed_url(
    public_url: &str,
    peer: IpAddr,
    headers: &HeaderMap,
    proxies: &[IpNet],
    path_and_query: &str,
) -> String {
    let mut out = String::with_capacity(public_url.len() + path_and_query.len());
    let forwarded_host = trusted(peer, proxies)
        .then(|| headers.get("x-forwarded-host").and_then(|v| v.to_str().ok()))
        .flatten()
        .map(|h| h.split(',').next().unwrap_or("").trim())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)));
    match forwarded_host {
        Some(host) => {
            let proto = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .map(|p| p.split(',').next().unwrap_or("").trim())
                .filter(|p| *p == "http" || *p == "https")
                .unwrap_or_else(|| public_url.split("://").next().unwrap_or("https"));
            out.push_str(proto);
            out.push_str("://");
            out.push_str(host);
        }
        None => out.push_str(public_url),
    }
    out.push_str(path_and_query);
    out
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn spoofed_forwarded_for_from_untrusted_peer_is_ignored() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(client_ip(peer, &h, &[]), peer);
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(client_ip(peer, &h, &proxies), peer);
    }

    #[test]
    fn rightmost_untrusted_hop_behind_trusted_proxies() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.0.0.5")]);
        assert_eq!(client_ip(peer, &h, &proxies), "198.51.100.7".parse::<IpAddr>().unwrap());
        let two = headers(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "198.51.100.8")]);
        assert_eq!(client_ip(peer, &two, &proxies), "198.51.100.8".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(client_ip(mapped, &h, &proxies), "198.51.100.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn url_from_public_origin_or_trusted_forwarded_host() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "http")]);
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            signed_url("https://gw.example.com", outsider, &h, &proxies, "/p?a=1"),
            "https://gw.example.com/p?a=1"
        );
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        assert_eq!(signed_url("https://gw.example.com", proxy, &h, &proxies, "/p"), "http://evil.example/p");
    }
}
