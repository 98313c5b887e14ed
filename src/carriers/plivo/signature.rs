//! Plivo webhook signatures: V3 (`X-Plivo-Signature-V3` / `-Ma-V3`) and the legacy V2.
//!
//! Canonical strings follow protocols.md §1.2/§1.3 (plivo-python `signature_v3.py`,
//! plivo-go, plivo-node). Verification streams the canonical string into the MAC instead
//! of building it, and the string builders share that code path so the tests that pin the
//! signed strings also pin what the verifier hashes.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

use crate::net::form::{self, FormError};

/// Length of a base64-encoded HMAC-SHA256 tag with padding.
pub(crate) const ENCODED_TAG_LEN: usize = 44;

/// A base64-encoded tag, kept on the stack so comparisons need no allocation.
pub(crate) type EncodedTag = [u8; ENCODED_TAG_LEN];

/// HTTP method of the callback; it selects how the canonical string is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    /// Maps an HTTP method name; anything but GET/POST is not a Plivo callback.
    pub fn from_http(method: &str) -> Option<Self> {
        match method {
            "GET" => Some(Self::Get),
            "POST" => Some(Self::Post),
            _ => None,
        }
    }
}

/// HMAC-SHA256 state keyed with one auth token. Build once per token and reuse: keying
/// hashes the token, so cloning the prepared state saves that work on every request.
#[derive(Clone)]
pub struct PlivoKey(Hmac<Sha256>);

impl PlivoKey {
    pub fn new(auth_token: &[u8]) -> Self {
        Self(Hmac::new_from_slice(auth_token).expect("HMAC accepts keys of any length"))
    }

    pub(crate) fn mac(&self) -> Hmac<Sha256> {
        self.0.clone()
    }
}

impl fmt::Debug for PlivoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlivoKey([redacted])")
    }
}

/// Destination for canonical-string pieces: a `String` for the builders, the MAC for the
/// verifiers.
trait Sink {
    fn put(&mut self, piece: &str);
}

impl Sink for String {
    fn put(&mut self, piece: &str) {
        self.push_str(piece);
    }
}

impl Sink for Hmac<Sha256> {
    fn put(&mut self, piece: &str) {
        self.update(piece.as_bytes());
    }
}

/// Byte-order sort of borrowed pairs. Sorting whole (key, value) tuples gives exactly the
/// SDKs' "keys in order, values of a repeated key in order" without grouping first.
fn sorted<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<(&str, &str)> = pairs.collect();
    out.sort_unstable();
    out
}

fn as_strs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> impl Iterator<Item = (&str, &str)> + '_ {
    pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
}

/// `k=v&k=v`, raw decoded text: Plivo escapes nothing.
fn put_query<S: Sink>(sink: &mut S, pairs: &[(&str, &str)]) {
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            sink.put("&");
        }
        sink.put(k);
        sink.put("=");
        sink.put(v);
    }
}

fn feed_v3<S, K, V>(sink: &mut S, method: Method, url: &str, params: &[(K, V)], nonce: &str) -> Result<(), FormError>
where
    S: Sink,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let (base, query) = form::split_url(url);
    let query_pairs = match query {
        Some(q) => form::parse(q.as_bytes())?,
        None => Vec::new(),
    };
    sink.put(base);
    match method {
        Method::Get => {
            // A real Plivo GET has everything in the URL and `params` empty; merging keeps
            // the rule total for callers that pass both.
            let all = sorted(as_strs(&query_pairs).chain(as_strs(params)));
            if !all.is_empty() {
                sink.put("?");
                put_query(sink, &all);
            }
        }
        Method::Post => {
            let query_sorted = sorted(as_strs(&query_pairs));
            let params_sorted = sorted(as_strs(params));
            if !params_sorted.is_empty() {
                // The `?` is emitted even without a query string: plivo-python appends it
                // whenever there are form params.
                sink.put("?");
                put_query(sink, &query_sorted);
                if !query_sorted.is_empty() {
                    sink.put(".");
                }
                for (k, v) in &params_sorted {
                    sink.put(k);
                    sink.put(v);
                }
            } else if !query_sorted.is_empty() {
                sink.put("?");
                put_query(sink, &query_sorted);
            }
        }
    }
    sink.put(".");
    sink.put(nonce);
    Ok(())
}

/// The exact message Plivo V3 signs (`S + "." + nonce`, §1.2). For tests and fixture tools.
pub fn v3_signed_string<K: AsRef<str>, V: AsRef<str>>(
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
) -> Result<String, FormError> {
    let mut out = String::with_capacity(url.len() + nonce.len() + 256);
    feed_v3(&mut out, method, url, params, nonce)?;
    Ok(out)
}

/// Base64 V3 signature over [`v3_signed_string`]; what Plivo would put in the header.
pub fn sign_v3<K: AsRef<str>, V: AsRef<str>>(
    key: &PlivoKey,
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
) -> Result<String, FormError> {
    let tag = v3_tag(key, method, url, params, nonce)?;
    Ok(encoded_to_string(&tag))
}

pub(crate) fn v3_tag<K: AsRef<str>, V: AsRef<str>>(
    key: &PlivoKey,
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
) -> Result<EncodedTag, FormError> {
    let mut mac = key.mac();
    feed_v3(&mut mac, method, url, params, nonce)?;
    Ok(encode_tag(mac))
}

/// Checks an `X-Plivo-Signature-V3` (or `-Ma-V3`, with the main account's key) header.
/// `url` is the public URL Plivo called, query included; `params` the decoded form body
/// (empty for GET). The header may list several comma-separated signatures.
pub fn verify_v3<K: AsRef<str>, V: AsRef<str>>(
    key: &PlivoKey,
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
    header: &str,
) -> bool {
    match v3_tag(key, method, url, params, nonce) {
        Ok(tag) => header_matches_any(header, &[&tag]),
        // A query we cannot decode cannot have been signed by a conforming sender.
        Err(_) => false,
    }
}

/// The V2 message: base URL (query and fragment dropped) immediately followed by the nonce.
pub fn v2_signed_string(url: &str, nonce: &str) -> String {
    let (base, _) = form::split_url(url);
    let mut out = String::with_capacity(base.len() + nonce.len());
    out.push_str(base);
    out.push_str(nonce);
    out
}

/// Base64 V2 signature over [`v2_signed_string`].
pub fn sign_v2(key: &PlivoKey, url: &str, nonce: &str) -> String {
    encoded_to_string(&v2_tag(key, url, nonce))
}

pub(crate) fn v2_tag(key: &PlivoKey, url: &str, nonce: &str) -> EncodedTag {
    let (base, _) = form::split_url(url);
    let mut mac = key.mac();
    mac.update(base.as_bytes());
    mac.update(nonce.as_bytes());
    encode_tag(mac)
}

/// Checks an `X-Plivo-Signature-V2` header, a single value per plivo-python.
pub fn verify_v2(key: &PlivoKey, url: &str, nonce: &str, header: &str) -> bool {
    let tag = v2_tag(key, url, nonce);
    bool::from(header.as_bytes().ct_eq(&tag))
}

pub(crate) fn encode_tag(mac: Hmac<Sha256>) -> EncodedTag {
    let mut out = [0u8; ENCODED_TAG_LEN];
    let written = STANDARD
        .encode_slice(mac.finalize().into_bytes(), &mut out)
        .expect("a 32-byte tag encodes to exactly 44 base64 bytes");
    debug_assert_eq!(written, ENCODED_TAG_LEN);
    out
}

pub(crate) fn encoded_to_string(tag: &EncodedTag) -> String {
    // Base64 output is ASCII.
    tag.iter().map(|&b| char::from(b)).collect()
}

/// True if any comma-separated element of `header` (ASCII spaces trimmed) equals any of
/// `expected`. Every pair is compared, in constant time per pair, so timing reveals
/// neither which element matched nor how much of a forged one was right.
pub(crate) fn header_matches_any(header: &str, expected: &[&EncodedTag]) -> bool {
    let mut matched = Choice::from(0);
    for candidate in header.split(',') {
        let candidate = candidate.trim_matches(' ').as_bytes();
        for tag in expected {
            matched |= candidate.ct_eq(&tag[..]);
        }
    }
    bool::from(matched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OFFICIAL_TOKEN: &str = "Y2Q2ZDgxZmY5YWRiOTI5YmQ1Njg0MTAxZWIyOTc4";
    const OFFICIAL_NONCE: &str = "31627761595286130198";
    const URL_A: &str = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml/?a=b&c=d";
    const URL_B: &str = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml";

    const OFFICIAL_PARAMS: &[(&str, &str)] = &[
        ("Direction", "outbound"),
        ("From", "19792014278"),
        ("ALegUUID", "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36"),
        ("CallStatus", "in-progress"),
        ("BillRate", "0.002"),
        ("ParentAuthID", "MANWVLYTK4ZWU1YTY4QA"),
        ("To", "sip:PlivoSignature382029104058171078704104@phone-qa.voice.plivodev.com"),
        ("ALegRequestUUID", "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36"),
        ("CallUUID", "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36"),
        ("RequestUUID", "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36"),
        ("SIP-H-To", "<sip:PlivoSignature382029104058171078704104@52.9.11.55;transport=udp>;tag=1"),
        ("SessionStart", "2020-04-08 11:34:33.238707"),
        ("Event", "StartApp"),
    ];

    const PO1_SIGNED: &str = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml/?a=b&c=d.ALegRequestUUID3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36ALegUUID3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36BillRate0.002CallStatusin-progressCallUUID3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36DirectionoutboundEventStartAppFrom19792014278ParentAuthIDMANWVLYTK4ZWU1YTY4QARequestUUID3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36SIP-H-To<sip:PlivoSignature382029104058171078704104@52.9.11.55;transport=udp>;tag=1SessionStart2020-04-08 11:34:33.238707Tosip:PlivoSignature382029104058171078704104@phone-qa.voice.plivodev.com.31627761595286130198";
    const PO2_SIGNED: &str = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml/?ALegRequestUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&ALegUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&BillRate=0.002&CallStatus=in-progress&CallUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&Direction=outbound&Event=StartApp&From=19792014278&ParentAuthID=MANWVLYTK4ZWU1YTY4QA&RequestUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&SIP-H-To=<sip:PlivoSignature382029104058171078704104@52.9.11.55;transport=udp>;tag=1&SessionStart=2020-04-08 11:34:33.238707&To=sip:PlivoSignature382029104058171078704104@phone-qa.voice.plivodev.com&a=b&c=d.31627761595286130198";

    const GEN_TOKEN: &str = "MAtestAuthToken0123456789abcdefXYZ";
    const GEN_NONCE: &str = "05429567804466091622";

    const NO_PARAMS: &[(&str, &str)] = &[];

    fn official_key() -> PlivoKey {
        PlivoKey::new(OFFICIAL_TOKEN.as_bytes())
    }

    fn gen_key() -> PlivoKey {
        PlivoKey::new(GEN_TOKEN.as_bytes())
    }

    /// GET callbacks carry their parameters in the URL, as Plivo sends them.
    fn get_url(base_with_query: &str, params: &[(&str, &str)]) -> String {
        let mut url = base_with_query.to_owned();
        for (k, v) in params {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&encode(k));
            url.push('=');
            url.push_str(&encode(v));
        }
        url
    }

    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn check(
        key: &PlivoKey,
        method: Method,
        url: &str,
        params: &[(&str, &str)],
        nonce: &str,
        signed: Option<&str>,
        sig: &str,
    ) {
        if let Some(signed) = signed {
            assert_eq!(v3_signed_string(method, url, params, nonce).unwrap(), signed);
        }
        assert_eq!(sign_v3(key, method, url, params, nonce).unwrap(), sig);
        assert!(verify_v3(key, method, url, params, nonce, sig));
        assert!(verify_v3(key, method, url, params, nonce, &format!("AAAA,{sig}")));
        assert!(verify_v3(key, method, url, params, nonce, &format!("{sig} , xyz")));
        assert!(!verify_v3(&PlivoKey::new(b"wrong"), method, url, params, nonce, sig));
        let mut bad_nonce = nonce.to_owned();
        bad_nonce.push('0');
        assert!(!verify_v3(key, method, url, params, &bad_nonce, sig));
    }

    #[test]
    fn po1_post_with_query() {
        check(
            &official_key(),
            Method::Post,
            URL_A,
            OFFICIAL_PARAMS,
            OFFICIAL_NONCE,
            Some(PO1_SIGNED),
            "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c=",
        );
    }

    #[test]
    fn po2_get_with_query() {
        // plivo-go passes the params separately for GET; the merged string is the same as
        // when they arrive in the URL, which is how Plivo really sends them.
        check(
            &official_key(),
            Method::Get,
            URL_A,
            OFFICIAL_PARAMS,
            OFFICIAL_NONCE,
            Some(PO2_SIGNED),
            "UBq8jAtd32wR8EK9VgxbBn4n5rpI/l1H9iN4WfSEHFQ=",
        );
        let url = get_url(URL_A, OFFICIAL_PARAMS);
        check(
            &official_key(),
            Method::Get,
            &url,
            NO_PARAMS,
            OFFICIAL_NONCE,
            Some(PO2_SIGNED),
            "UBq8jAtd32wR8EK9VgxbBn4n5rpI/l1H9iN4WfSEHFQ=",
        );
    }

    #[test]
    fn po3_post_without_query() {
        let signed = PO1_SIGNED.replace("validate_signature03.xml/?a=b&c=d.", "validate_signature03.xml?");
        check(
            &official_key(),
            Method::Post,
            URL_B,
            OFFICIAL_PARAMS,
            OFFICIAL_NONCE,
            Some(&signed),
            "iAjE5QqI37mbkYe4w3jTMudqEzbDufdqi7sYwTu64e0=",
        );
    }

    #[test]
    fn po4_get_without_query() {
        check(
            &official_key(),
            Method::Get,
            URL_B,
            OFFICIAL_PARAMS,
            OFFICIAL_NONCE,
            None,
            "i/MQsaQSAd6fiKhOh2qeeeLHZ9faldADSb3/7+Akfbc=",
        );
        let url = get_url(URL_B, OFFICIAL_PARAMS);
        check(
            &official_key(),
            Method::Get,
            &url,
            NO_PARAMS,
            OFFICIAL_NONCE,
            None,
            "i/MQsaQSAd6fiKhOh2qeeeLHZ9faldADSb3/7+Akfbc=",
        );
    }

    #[test]
    fn pv3_1_post_no_query() {
        check(
            &gen_key(),
            Method::Post,
            "https://gw.example.com/plivo/answer",
            &[
                ("CallUUID", "2a4e6f3c-1111-4a2b-9c3d-0123456789ab"),
                ("From", "14155550100"),
                ("To", "918035551234"),
                ("Direction", "inbound"),
                ("CallStatus", "ringing"),
                ("Event", "StartApp"),
                ("CallerName", "+14155550100"),
                ("BillRate", "0.0085"),
            ],
            GEN_NONCE,
            Some("https://gw.example.com/plivo/answer?BillRate0.0085CallStatusringingCallUUID2a4e6f3c-1111-4a2b-9c3d-0123456789abCallerName+14155550100DirectioninboundEventStartAppFrom14155550100To918035551234.05429567804466091622"),
            "/v9/CRoH6i9dPpIvw/jjf9r2wD4W2JAmTQ6k7Jl1aQs=",
        );
    }

    #[test]
    fn pv3_2_post_with_query() {
        check(
            &gen_key(),
            Method::Post,
            "https://gw.example.com/plivo/answer?tenant=acme&Z=1",
            &[
                ("CallUUID", "2a4e6f3c-1111-4a2b-9c3d-0123456789ab"),
                ("From", "14155550100"),
                ("To", "918035551234"),
                ("Direction", "inbound"),
                ("CallStatus", "ringing"),
            ],
            GEN_NONCE,
            Some("https://gw.example.com/plivo/answer?Z=1&tenant=acme.CallStatusringingCallUUID2a4e6f3c-1111-4a2b-9c3d-0123456789abDirectioninboundFrom14155550100To918035551234.05429567804466091622"),
            "Y38v4Nmj3kDrTSliAeFU8Q3OEHAd7YZwrRjaDd+11oE=",
        );
    }

    #[test]
    fn pv3_3_get_port_and_escapes() {
        check(
            &gen_key(),
            Method::Get,
            "https://gw.example.com:8443/plivo/hangup?CallUUID=2a4e6f3c-1111-4a2b-9c3d-0123456789ab&From=%2B14155550100&To=918035551234&HangupCause=NORMAL_CLEARING&EndTime=2024-05-01+10%3A00%3A00&Duration=12&a=x",
            NO_PARAMS,
            GEN_NONCE,
            Some("https://gw.example.com:8443/plivo/hangup?CallUUID=2a4e6f3c-1111-4a2b-9c3d-0123456789ab&Duration=12&EndTime=2024-05-01 10:00:00&From=+14155550100&HangupCause=NORMAL_CLEARING&To=918035551234&a=x.05429567804466091622"),
            "584cB1616wVzoBog7kMm9i/aT740V1QXCQVIoPO16vU=",
        );
    }

    #[test]
    fn pv3_4_post_empty_body() {
        check(
            &gen_key(),
            Method::Post,
            "https://gw.example.com/plivo/status",
            NO_PARAMS,
            GEN_NONCE,
            Some("https://gw.example.com/plivo/status.05429567804466091622"),
            "P2qxR70vpGyMH5z1YGmFhuL6ork4PHFKfgnPY7H12Ds=",
        );
    }

    #[test]
    fn post_query_without_params_has_no_trailing_dot() {
        assert_eq!(
            v3_signed_string(Method::Post, "https://h/p?b=2&a=1", NO_PARAMS, "9").unwrap(),
            "https://h/p?a=1&b=2.9"
        );
    }

    #[test]
    fn repeated_keys_sort_values() {
        let params = [("k", "b"), ("K", "z"), ("k", "a"), ("k", "b")];
        assert_eq!(
            v3_signed_string(Method::Post, "https://h/p?q=2&q=1", &params, "n").unwrap(),
            "https://h/p?q=1&q=2.Kzkakbkb.n"
        );
    }

    #[test]
    fn pv2_vectors() {
        let key = gen_key();
        let url = "https://gw.example.com/plivo/answer?x=1";
        assert_eq!(v2_signed_string(url, GEN_NONCE), "https://gw.example.com/plivo/answer05429567804466091622");
        let sig = "NxJj2574vMif5l6Y+W0A8q+w0kdmHpiaRAz/jr3eWIw=";
        assert_eq!(sign_v2(&key, url, GEN_NONCE), sig);
        assert!(verify_v2(&key, url, GEN_NONCE, sig));
        assert!(!verify_v2(&key, url, "05429567804466091623", sig));
        assert!(!verify_v2(&official_key(), url, GEN_NONCE, sig));

        let official = PlivoKey::new(b"my_auth_token");
        let sig = "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc=";
        assert_eq!(sign_v2(&official, "https://answer.url", "12345"), sig);
        assert!(verify_v2(&official, "https://answer.url", "12345", sig));
    }

    #[test]
    fn tampering_fails() {
        let key = official_key();
        let sig = "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c=";
        assert!(verify_v3(&key, Method::Post, URL_A, OFFICIAL_PARAMS, OFFICIAL_NONCE, sig));
        // Method matters.
        assert!(!verify_v3(&key, Method::Get, URL_A, OFFICIAL_PARAMS, OFFICIAL_NONCE, sig));
        // Each single byte of the signature.
        for i in 0..sig.len() {
            let mut bad = sig.as_bytes().to_vec();
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            let bad = String::from_utf8(bad).unwrap();
            assert!(!verify_v3(&key, Method::Post, URL_A, OFFICIAL_PARAMS, OFFICIAL_NONCE, &bad));
        }
        // Each single byte of the URL.
        for i in 0..URL_A.len() {
            let mut bad = URL_A.as_bytes().to_vec();
            bad[i] = if bad[i] == b'x' { b'y' } else { b'x' };
            let bad = String::from_utf8(bad).unwrap();
            assert!(!verify_v3(&key, Method::Post, &bad, OFFICIAL_PARAMS, OFFICIAL_NONCE, sig));
        }
        // Each single byte of the nonce.
        for i in 0..OFFICIAL_NONCE.len() {
            let mut bad = OFFICIAL_NONCE.as_bytes().to_vec();
            bad[i] = if bad[i] == b'1' { b'2' } else { b'1' };
            let bad = String::from_utf8(bad).unwrap();
            assert!(!verify_v3(&key, Method::Post, URL_A, OFFICIAL_PARAMS, &bad, sig));
        }
        // One byte of one param value; a dropped param; an added param.
        let mut params = OFFICIAL_PARAMS.to_vec();
        params[0].1 = "outbounD";
        assert!(!verify_v3(&key, Method::Post, URL_A, &params, OFFICIAL_NONCE, sig));
        assert!(!verify_v3(&key, Method::Post, URL_A, &OFFICIAL_PARAMS[1..], OFFICIAL_NONCE, sig));
        let mut params = OFFICIAL_PARAMS.to_vec();
        params.push(("x", ""));
        assert!(!verify_v3(&key, Method::Post, URL_A, &params, OFFICIAL_NONCE, sig));
        // Empty and junk headers.
        for header in ["", ",", " ", "AAAA", "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c"] {
            assert!(!verify_v3(&key, Method::Post, URL_A, OFFICIAL_PARAMS, OFFICIAL_NONCE, header));
        }
    }

    #[test]
    fn undecodable_query_fails_closed() {
        let key = gen_key();
        assert!(v3_signed_string(Method::Get, "https://h/p?a=%ff", NO_PARAMS, "n").is_err());
        assert!(!verify_v3(&key, Method::Get, "https://h/p?a=%ff", NO_PARAMS, "n", "x"));
    }

    #[test]
    fn debug_redacts_key() {
        let shown = format!("{:?}", official_key());
        assert_eq!(shown, "PlivoKey([redacted])");
        assert!(!shown.contains(OFFICIAL_TOKEN));
    }

    #[test]
    fn method_from_http() {
        assert_eq!(Method::from_http("GET"), Some(Method::Get));
        assert_eq!(Method::from_http("POST"), Some(Method::Post));
        assert_eq!(Method::from_http("get"), None);
        assert_eq!(Method::from_http("PUT"), None);
    }

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![Just(Method::Get), Just(Method::Post)]
    }

    /// URLs over a safe alphabet: a flipped byte never turns into an equivalent encoding
    /// (`+` vs `%20`, `%41` vs `A`), so every flip must change the canonical string.
    fn url() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("https"), Just("http")],
            "[a-z0-9]{1,12}(\\.[a-z]{2,5}){0,2}",
            proptest::option::of(1u16..),
            "(/[A-Za-z0-9._-]{0,10}){0,3}",
            proptest::option::of(proptest::collection::vec(("[A-Za-z0-9]{1,6}", "[A-Za-z0-9]{0,6}"), 0..4)),
        )
            .prop_map(|(scheme, host, port, path, query)| {
                let mut url = format!("{scheme}://{host}");
                if let Some(port) = port {
                    url.push_str(&format!(":{port}"));
                }
                url.push_str(&path);
                if let Some(query) = query {
                    url.push('?');
                    let items: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    url.push_str(&items.join("&"));
                }
                url
            })
    }

    fn flip_alnum(s: &str, index: usize) -> String {
        let mut bytes = s.as_bytes().to_vec();
        let i = index % bytes.len();
        bytes[i] = if bytes[i] == b'Q' { b'R' } else { b'Q' };
        String::from_utf8(bytes).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sign_then_verify(
            token in proptest::collection::vec(any::<u8>(), 0..64),
            method in method(),
            url in url(),
            params in proptest::collection::vec((".{0,8}", ".{0,12}"), 0..10),
            nonce in "[0-9]{0,24}",
        ) {
            let key = PlivoKey::new(&token);
            let sig = sign_v3(&key, method, &url, &params, &nonce).unwrap();
            prop_assert_eq!(sig.len(), 44);
            prop_assert!(verify_v3(&key, method, &url, &params, &nonce, &sig));
            let listed = format!("bogus, {sig}");
            prop_assert!(verify_v3(&key, method, &url, &params, &nonce, &listed));
            // The streamed MAC and the built string agree.
            let signed = v3_signed_string(method, &url, &params, &nonce).unwrap();
            let mut mac = key.mac();
            mac.update(signed.as_bytes());
            prop_assert_eq!(encode_tag(mac), sig.as_bytes());
        }

        #[test]
        fn any_flip_fails(
            method in method(),
            url in url(),
            params in proptest::collection::btree_map("[A-Za-z0-9-]{1,8}", "[ -~]{1,12}", 1..8),
            nonce in "[0-9]{1,24}",
            which in 0usize..4,
            index in any::<usize>(),
        ) {
            let key = PlivoKey::new(b"token");
            // Params are only signed as given for POST; a GET carries them in the URL.
            let params: Vec<(String, String)> = params.into_iter().collect();
            let sig = sign_v3(&key, method, &url, &params, &nonce).unwrap();
            let (mut u, mut p, mut n, mut s) = (url.clone(), params.clone(), nonce.clone(), sig.clone());
            match which {
                0 => u = flip_alnum(&url, index),
                1 => n = flip_alnum(&nonce, index),
                2 => s = flip_alnum(&sig, index),
                _ => {
                    let i = index % p.len();
                    p[i].1 = flip_alnum(&p[i].1, index / p.len());
                }
            }
            prop_assert!(!verify_v3(&key, method, &u, &p, &n, &s));
        }
    }
}
