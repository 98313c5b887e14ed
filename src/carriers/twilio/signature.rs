//! Twilio `X-Twilio-Signature` (protocols.md §3.1–3.3, twilio-python `request_validator.py`).
//!
//! The message is the full URL as Twilio requested it, then for form POSTs the sorted
//! `key + value` pairs. Twilio is inconsistent about ports, so like the SDK we accept the
//! URL with its port removed or with the scheme's default port added. Both variants are
//! streamed into the MAC from slices of the original URL, so no URL is re-allocated.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::net::form;

/// Length of a base64-encoded HMAC-SHA1 tag with padding.
const ENCODED_TAG_LEN: usize = 28;

/// Query parameter Twilio adds when the body is not form-encoded.
pub const BODY_HASH_PARAM: &str = "bodySHA256";

/// HMAC-SHA1 state keyed with one auth token; build once per token, cloned per request.
#[derive(Clone)]
pub struct TwilioKey(Hmac<Sha1>);

impl TwilioKey {
    pub fn new(auth_token: &[u8]) -> Self {
        Self(Hmac::new_from_slice(auth_token).expect("HMAC accepts keys of any length"))
    }
}

impl fmt::Debug for TwilioKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TwilioKey([redacted])")
    }
}

trait Sink {
    fn put(&mut self, piece: &str);
}

impl Sink for String {
    fn put(&mut self, piece: &str) {
        self.push_str(piece);
    }
}

impl Sink for Hmac<Sha1> {
    fn put(&mut self, piece: &str) {
        self.update(piece.as_bytes());
    }
}

/// Sorted by key then value, exact duplicates dropped: twilio-python iterates
/// `sorted(set(values))` per key, so a repeated identical pair is signed once.
fn canonical_params<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn feed<S: Sink>(sink: &mut S, url_parts: &[&str; 3], params: &[(&str, &str)]) {
    for part in url_parts {
        sink.put(part);
    }
    for (k, v) in params {
        sink.put(k);
        sink.put(v);
    }
}

/// The two URLs twilio-python tries, as pieces to concatenate: (without port, with port).
/// One of them is always the URL as given.
fn port_variants(url: &str) -> [[&str; 3]; 2] {
    let unchanged = [url, "", ""];
    let Some(scheme_end) = url.find("://") else {
        return [unchanged, unchanged];
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    // IPv6 literals contain colons, so only a colon after the closing bracket is a port.
    let search_from = host_port.rfind(']').unwrap_or(0);
    match host_port[search_from..].rfind(':') {
        Some(i) => {
            let colon = authority_start + host_start + search_from + i;
            [[&url[..colon], &url[authority_end..], ""], unchanged]
        }
        None => {
            let default_port = if url[..scheme_end].eq_ignore_ascii_case("https") { ":443" } else { ":80" };
            [unchanged, [&url[..authority_end], default_port, &url[authority_end..]]]
        }
    }
}

fn encode_tag(mac: Hmac<Sha1>) -> [u8; ENCODED_TAG_LEN] {
    let mut out = [0u8; ENCODED_TAG_LEN];
    let written = STANDARD
        .encode_slice(mac.finalize().into_bytes(), &mut out)
        .expect("a 20-byte tag encodes to exactly 28 base64 bytes");
    debug_assert_eq!(written, ENCODED_TAG_LEN);
    out
}

fn signature_matches(key: &TwilioKey, url: &str, params: &[(&str, &str)], header: &str) -> Choice {
    let mut matched = Choice::from(0);
    for variant in port_variants(url) {
        let mut mac = key.0.clone();
        feed(&mut mac, &variant, params);
        matched |= header.as_bytes().ct_eq(&encode_tag(mac));
    }
    matched
}

/// The exact message for `url` as given (no port variants). For tests and fixture tools.
pub fn signed_string<K: AsRef<str>, V: AsRef<str>>(url: &str, params: &[(K, V)]) -> String {
    let mut out = String::with_capacity(url.len() + 512);
    feed(&mut out, &[url, "", ""], &canonical_params(params));
    out
}

/// Base64 signature over [`signed_string`]; what Twilio would send for `url`.
pub fn sign<K: AsRef<str>, V: AsRef<str>>(key: &TwilioKey, url: &str, params: &[(K, V)]) -> String {
    let mut mac = key.0.clone();
    feed(&mut mac, &[url, "", ""], &canonical_params(params));
    encode_tag(mac).iter().map(|&b| char::from(b)).collect()
}

/// Base64 signature of a GET or a raw-body request (URL only, nothing appended).
pub fn sign_url(key: &TwilioKey, url: &str) -> String {
    sign::<&str, &str>(key, url, &[])
}

/// Checks a form-encoded POST: `params` are the decoded body fields.
pub fn verify_form<K: AsRef<str>, V: AsRef<str>>(key: &TwilioKey, url: &str, params: &[(K, V)], header: &str) -> bool {
    bool::from(signature_matches(key, url, &canonical_params(params), header))
}

/// Checks a GET (parameters are already part of the signed URL).
pub fn verify_get(key: &TwilioKey, url: &str, header: &str) -> bool {
    bool::from(signature_matches(key, url, &[], header))
}

/// Checks a request whose body is not form-encoded (JSON). The URL must carry
/// `bodySHA256=<hex sha256 of body>` and both that hash and the URL signature must match;
/// a URL without the parameter is rejected, since the body would otherwise be unsigned.
pub fn verify_raw_body(key: &TwilioKey, url: &str, body: &[u8], header: &str) -> bool {
    let Some(claimed) = claimed_body_hash(url) else {
        return false;
    };
    let body_ok = claimed.as_bytes().ct_eq(&body_sha256_hex_bytes(body));
    let sig_ok = signature_matches(key, url, &[], header);
    bool::from(body_ok & sig_ok)
}

/// First `bodySHA256` value of the URL's query, as twilio-python's `parse_qs(...)[0]`. An
/// undecodable pair before it fails closed rather than being skipped.
fn claimed_body_hash(url: &str) -> Option<std::borrow::Cow<'_, str>> {
    let (_, query) = form::split_url(url);
    for pair in form::pairs(query?.as_bytes()) {
        let (k, v) = pair.ok()?;
        if k == BODY_HASH_PARAM {
            return Some(v);
        }
    }
    None
}

fn body_sha256_hex_bytes(body: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(body), &mut out).expect("a 32-byte digest encodes to exactly 64 hex bytes");
    out
}

/// Lowercase hex SHA-256 of a raw body, the `bodySHA256` value.
pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// `url` with `bodySHA256=<hash>` appended to its query, as Twilio builds it.
pub fn url_with_body_hash(url: &str, body: &[u8]) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{BODY_HASH_PARAM}={}", body_sha256_hex(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OFFICIAL_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const OFFICIAL_PARAMS: &[(&str, &str)] = &[
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+14158675309"),
        ("Digits", "1234"),
        ("From", "+14158675309"),
        ("To", "+18005551212"),
    ];
    const GEN_TOKEN: &str = "twTestAuthToken0123456789abcdef0";
    const TW1_PARAMS: &[(&str, &str)] = &[
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("ApiVersion", "2010-04-01"),
        ("CallSid", "CA00000000000000000000000000000002"),
        ("CallStatus", "ringing"),
        ("Called", "+14155550199"),
        ("Caller", "+14155550100"),
        ("Direction", "inbound"),
        ("From", "+14155550100"),
        ("To", "+14155550199"),
    ];
    const TW2_BODY: &str = r#"{"CallSid":"CA00000000000000000000000000000002","StreamSid":"MZ00000000000000000000000000000003","Status":"stream-started"}"#;

    fn official_key() -> TwilioKey {
        TwilioKey::new(b"12345")
    }

    fn gen_key() -> TwilioKey {
        TwilioKey::new(GEN_TOKEN.as_bytes())
    }

    fn joined(parts: [&str; 3]) -> String {
        parts.concat()
    }

    #[test]
    fn official_form_vector() {
        let key = official_key();
        let sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert_eq!(sign(&key, OFFICIAL_URL, OFFICIAL_PARAMS), sig);
        assert!(verify_form(&key, OFFICIAL_URL, OFFICIAL_PARAMS, sig));
        // Param order on the wire does not matter.
        let mut shuffled = OFFICIAL_PARAMS.to_vec();
        shuffled.reverse();
        assert!(verify_form(&key, OFFICIAL_URL, &shuffled, sig));
        // Twilio signed with :443; the request URL has no port.
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        let sig443 = "kvajT1Ptam85bY51eRf/AJRuM3w=";
        assert_eq!(sign(&key, with_port, OFFICIAL_PARAMS), sig443);
        assert!(verify_form(&key, OFFICIAL_URL, OFFICIAL_PARAMS, sig443));
        // And the other way round: the URL has the port, Twilio signed without it.
        assert!(verify_form(&key, with_port, OFFICIAL_PARAMS, sig));
        assert!(verify_form(&key, with_port, OFFICIAL_PARAMS, sig443));
        assert!(!verify_form(&TwilioKey::new(b"12346"), OFFICIAL_URL, OFFICIAL_PARAMS, sig));
        assert!(!verify_form(&key, OFFICIAL_URL, &OFFICIAL_PARAMS[1..], sig));
        assert!(!verify_get(&key, OFFICIAL_URL, sig));
    }

    #[test]
    fn official_json_vector() {
        let key = official_key();
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(body_sha256_hex(body), hash);
        let url = url_with_body_hash(OFFICIAL_URL, body);
        assert_eq!(url, format!("{OFFICIAL_URL}&bodySHA256={hash}"));
        let sig = "a9nBmqA0ju/hNViExpshrM61xv4=";
        assert_eq!(sign_url(&key, &url), sig);
        assert!(verify_raw_body(&key, &url, body, sig));
        assert!(!verify_raw_body(&key, &url, br#"{"property": "value", "boolean": false}"#, sig));
        // Without the hash parameter there is nothing tying the body to the signature.
        let sig_no_hash = sign_url(&key, OFFICIAL_URL);
        assert!(!verify_raw_body(&key, OFFICIAL_URL, body, &sig_no_hash));
        // Uppercase hex is not what Twilio sends.
        let upper = format!("{OFFICIAL_URL}&bodySHA256={}", hash.to_uppercase());
        assert!(!verify_raw_body(&key, &upper, body, &sign_url(&key, &upper)));
    }

    #[test]
    fn official_multi_value_vector() {
        let key = official_key();
        let params =
            [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234"), ("Digits", "1234")];
        assert_eq!(
            signed_string(OFFICIAL_URL, &params),
            format!("{OFFICIAL_URL}Digits1234Digits5678SidCA123SidAccountAC123")
        );
        let sig = "IK+Dwps556ElfBT0I3Rgjkr1wJU=";
        assert_eq!(sign(&key, OFFICIAL_URL, &params), sig);
        assert!(verify_form(&key, OFFICIAL_URL, &params, sig));
        // Dropping one duplicate changes nothing; dropping the distinct value does.
        assert!(verify_form(&key, OFFICIAL_URL, &params[..4], sig));
        assert!(!verify_form(&key, OFFICIAL_URL, &params[..3], sig));
    }

    #[test]
    fn tw1_form() {
        let key = gen_key();
        let url = "https://gw.example.com/twilio/voice";
        assert_eq!(
            signed_string(url, TW1_PARAMS),
            "https://gw.example.com/twilio/voiceAccountSidAC00000000000000000000000000000001ApiVersion2010-04-01CallSidCA00000000000000000000000000000002CallStatusringingCalled+14155550199Caller+14155550100DirectioninboundFrom+14155550100To+14155550199"
        );
        let sig = "bZ/tWKNbnVEs0q2oV2IyrkKdEek=";
        assert_eq!(sign(&key, url, TW1_PARAMS), sig);
        assert!(verify_form(&key, url, TW1_PARAMS, sig));
        let sig443 = "Wz16xe3sZ9hIdU7CaZrIw/lhECE=";
        assert_eq!(sign(&key, "https://gw.example.com:443/twilio/voice", TW1_PARAMS), sig443);
        assert!(verify_form(&key, url, TW1_PARAMS, sig443));
        // Single-byte tampering of each param value.
        for i in 0..TW1_PARAMS.len() {
            let mut params = TW1_PARAMS.to_vec();
            let mut v = params[i].1.to_owned();
            v.push('0');
            params[i].1 = &v;
            assert!(!verify_form(&key, url, &params, sig));
        }
        for i in 0..sig.len() {
            let mut bad = sig.as_bytes().to_vec();
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            assert!(!verify_form(&key, url, TW1_PARAMS, std::str::from_utf8(&bad).unwrap()));
        }
        for i in 0..url.len() {
            let mut bad = url.as_bytes().to_vec();
            bad[i] = if bad[i] == b'x' { b'y' } else { b'x' };
            assert!(!verify_form(&key, std::str::from_utf8(&bad).unwrap(), TW1_PARAMS, sig));
        }
        // Twilio sends one signature; a list is not accepted.
        assert!(!verify_form(&key, url, TW1_PARAMS, &format!("AAAA,{sig}")));
        assert!(!verify_form(&key, url, TW1_PARAMS, &format!(" {sig}")));
    }

    #[test]
    fn tw2_json() {
        let key = gen_key();
        let hash = "083099e68fa3440e997efdf84cebc0bfd8e87601eeaa3a542cb86e4dcd3e268f";
        assert_eq!(body_sha256_hex(TW2_BODY.as_bytes()), hash);
        let url = format!("https://gw.example.com/twilio/events?bodySHA256={hash}");
        assert_eq!(url_with_body_hash("https://gw.example.com/twilio/events", TW2_BODY.as_bytes()), url);
        let sig = "+/fFWs8lK2m53cWAOAXwIKT4XS4=";
        assert_eq!(sign_url(&key, &url), sig);
        assert!(verify_raw_body(&key, &url, TW2_BODY.as_bytes(), sig));
        let stopped = TW2_BODY.replace("started", "stopped");
        assert!(!verify_raw_body(&key, &url, stopped.as_bytes(), sig));
        for i in 0..TW2_BODY.len() {
            let mut bad = TW2_BODY.as_bytes().to_vec();
            bad[i] ^= 1;
            assert!(!verify_raw_body(&key, &url, &bad, sig));
        }
        assert!(!verify_raw_body(&TwilioKey::new(b"x"), &url, TW2_BODY.as_bytes(), sig));
        let bad_url = url.replace("events", "eventz");
        assert!(!verify_raw_body(&key, &bad_url, TW2_BODY.as_bytes(), sig));
    }

    #[test]
    fn tw3_get() {
        let key = gen_key();
        let url =
            "https://gw.example.com/twilio/status?CallSid=CA00000000000000000000000000000002&CallStatus=completed";
        let sig = "njsv6zzgakgMeTwze3Nk9kemLng=";
        assert_eq!(signed_string::<&str, &str>(url, &[]), url);
        assert_eq!(sign_url(&key, url), sig);
        assert!(verify_get(&key, url, sig));
        assert!(!verify_get(&key, &url.replace("completed", "complete"), sig));
        // The query string is signed as sent, not re-sorted.
        let reordered =
            "https://gw.example.com/twilio/status?CallStatus=completed&CallSid=CA00000000000000000000000000000002";
        assert!(!verify_get(&key, reordered, sig));
    }

    #[test]
    fn port_variant_shapes() {
        let v = |url| port_variants(url).map(joined);
        assert_eq!(v("https://h/p?q=1"), ["https://h/p?q=1".to_owned(), "https://h:443/p?q=1".to_owned()]);
        assert_eq!(v("http://h/p"), ["http://h/p".to_owned(), "http://h:80/p".to_owned()]);
        assert_eq!(v("https://h:8443/p"), ["https://h/p".to_owned(), "https://h:8443/p".to_owned()]);
        assert_eq!(v("https://h"), ["https://h".to_owned(), "https://h:443".to_owned()]);
        assert_eq!(v("https://h?x=1"), ["https://h?x=1".to_owned(), "https://h:443?x=1".to_owned()]);
        assert_eq!(v("https://u:pw@h:1/p"), ["https://u:pw@h/p".to_owned(), "https://u:pw@h:1/p".to_owned()]);
        assert_eq!(v("https://u:pw@h/p"), ["https://u:pw@h/p".to_owned(), "https://u:pw@h:443/p".to_owned()]);
        assert_eq!(v("https://[::1]/p"), ["https://[::1]/p".to_owned(), "https://[::1]:443/p".to_owned()]);
        assert_eq!(v("https://[::1]:8080/p"), ["https://[::1]/p".to_owned(), "https://[::1]:8080/p".to_owned()]);
        assert_eq!(v("no-scheme"), ["no-scheme".to_owned(), "no-scheme".to_owned()]);
    }

    #[test]
    fn non_default_port_is_also_accepted_stripped() {
        // twilio-python strips any port, not just the default one.
        let key = gen_key();
        let sig = sign_url(&key, "https://gw.example.com/x");
        assert!(verify_get(&key, "https://gw.example.com:8443/x", &sig));
        assert!(!verify_get(&key, "https://gw.example.com:8443/x", &sign_url(&key, "https://gw.example.com:443/x")));
    }

    #[test]
    fn debug_redacts_key() {
        assert_eq!(format!("{:?}", official_key()), "TwilioKey([redacted])");
    }

    fn flip(s: &str, index: usize) -> String {
        let mut bytes = s.as_bytes().to_vec();
        let i = index % bytes.len();
        bytes[i] = if bytes[i] == b'Q' { b'R' } else { b'Q' };
        String::from_utf8(bytes).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sign_then_verify(
            token in proptest::collection::vec(any::<u8>(), 0..40),
            url in "https?://[a-z0-9.]{1,16}(:[0-9]{1,5})?(/[A-Za-z0-9._~%-]{0,8}){0,3}(\\?[A-Za-z0-9=&+]{0,20}(%2[0-9A-F])?)?",
            params in proptest::collection::vec((".{0,8}", ".{0,12}"), 0..10),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let key = TwilioKey::new(&token);
            let sig = sign(&key, &url, &params);
            prop_assert_eq!(sig.len(), ENCODED_TAG_LEN);
            prop_assert!(verify_form(&key, &url, &params, &sig));
            for variant in port_variants(&url) {
                let sig = sign(&key, &joined(variant), &params);
                prop_assert!(verify_form(&key, &url, &params, &sig));
            }
            let get_sig = sign_url(&key, &url);
            prop_assert!(verify_get(&key, &url, &get_sig));
            let body_url = url_with_body_hash(&url, &body);
            let body_sig = sign_url(&key, &body_url);
            prop_assert!(verify_raw_body(&key, &body_url, &body, &body_sig));
        }

        #[test]
        fn any_flip_fails(
            url in "https://[a-z0-9]{1,12}\\.example(/[A-Za-z0-9]{1,8}){0,3}(\\?[a-z]{1,4}=[A-Za-z0-9]{0,6}){0,1}",
            params in proptest::collection::btree_map("[A-Za-z]{1,8}", "[ -~]{1,12}", 1..8),
            body in proptest::collection::vec(any::<u8>(), 1..64),
            which in 0usize..5,
            index in any::<usize>(),
        ) {
            let key = TwilioKey::new(b"token");
            let params: Vec<(String, String)> = params.into_iter().collect();
            let sig = sign(&key, &url, &params);
            match which {
                0 => prop_assert!(!verify_form(&key, &flip(&url, index), &params, &sig)),
                1 => prop_assert!(!verify_form(&key, &url, &params, &flip(&sig, index))),
                2 => {
                    let mut p = params.clone();
                    let i = index % p.len();
                    p[i].1 = flip(&p[i].1, index / p.len());
                    prop_assert!(!verify_form(&key, &url, &p, &sig));
                }
                3 => {
                    let body_url = url_with_body_hash(&url, &body);
                    let body_sig = sign_url(&key, &body_url);
                    let mut bad = body.clone();
                    let i = index % bad.len();
                    bad[i] ^= 1 << (index % 8);
                    prop_assert!(!verify_raw_body(&key, &body_url, &bad, &body_sig));
                }
                _ => {
                    let body_url = url_with_body_hash(&url, &body);
                    let body_sig = sign_url(&key, &body_url);
                    prop_assert!(!verify_raw_body(&key, &flip(&body_url, index), &body, &body_sig));
                }
            }
        }
    }
}
