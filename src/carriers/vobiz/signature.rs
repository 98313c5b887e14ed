//! Vobiz webhook signatures (`X-Vobiz-Signature-V3` / `-MA-V3`, `-V2` / `-MA-V2`).
//!
//! Vobiz's docs and its SDKs disagree on V3 (protocols.md §2.4): the docs sign only the
//! query-less URL and the nonce, the SDKs ship Plivo's V3 rule unchanged. Until a live
//! request settles it, V3 accepts either form under the same token. The Plivo form is
//! delegated to the Plivo module so the two carriers cannot drift apart.

use std::fmt;

use hmac::Mac;

use crate::carriers::plivo::signature::{self as plivo, Method, PlivoKey};
use crate::net::form;

/// HMAC-SHA256 state keyed with one Vobiz auth token (same construction as Plivo's).
#[derive(Clone)]
pub struct VobizKey(PlivoKey);

impl VobizKey {
    pub fn new(auth_token: &[u8]) -> Self {
        Self(PlivoKey::new(auth_token))
    }
}

impl fmt::Debug for VobizKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VobizKey([redacted])")
    }
}

/// V3 as documented by Vobiz: `scheme://host[:port]/path` + `.` + nonce.
pub fn v3_docs_signed_string(url: &str, nonce: &str) -> String {
    let (base, _) = form::split_url(url);
    let mut out = String::with_capacity(base.len() + 1 + nonce.len());
    out.push_str(base);
    out.push('.');
    out.push_str(nonce);
    out
}

/// V3 as implemented by the Vobiz SDKs: exactly Plivo's V3 string.
pub fn v3_sdk_signed_string<K: AsRef<str>, V: AsRef<str>>(
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
) -> Result<String, form::FormError> {
    plivo::v3_signed_string(method, url, params, nonce)
}

/// Base64 signature of the docs form.
pub fn sign_v3_docs(key: &VobizKey, url: &str, nonce: &str) -> String {
    plivo::encoded_to_string(&docs_tag(key, url, nonce))
}

/// Base64 signature of the SDK (Plivo) form.
pub fn sign_v3_sdk<K: AsRef<str>, V: AsRef<str>>(
    key: &VobizKey,
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
) -> Result<String, form::FormError> {
    plivo::sign_v3(&key.0, method, url, params, nonce)
}

fn docs_tag(key: &VobizKey, url: &str, nonce: &str) -> plivo::EncodedTag {
    let (base, _) = form::split_url(url);
    let mut mac = key.0.mac();
    mac.update(base.as_bytes());
    mac.update(b".");
    mac.update(nonce.as_bytes());
    plivo::encode_tag(mac)
}

/// Checks an `X-Vobiz-Signature-V3` (or `-MA-V3`, with the parent account's key) header.
/// Accepts a match against either the docs form or the SDK form; the header may list
/// several comma-separated signatures.
pub fn verify_v3<K: AsRef<str>, V: AsRef<str>>(
    key: &VobizKey,
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
    header: &str,
) -> bool {
    v3_form(key, method, url, params, nonce, header).is_some()
}

/// Which of the two canonical strings a V3 signature was made over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V3Form {
    /// The SDKs' (Plivo's): URL, query and parameters.
    Sdk,
    /// The docs': the URL without its query, and the nonce; the fields are not covered.
    Docs,
}

/// As [`verify_v3`], saying which form matched: the SDK form first, as it covers the most.
pub fn v3_form<K: AsRef<str>, V: AsRef<str>>(
    key: &VobizKey,
    method: Method,
    url: &str,
    params: &[(K, V)],
    nonce: &str,
    header: &str,
) -> Option<V3Form> {
    // The docs form never looks at the query, so it stays checkable when the SDK form is not.
    if plivo::v3_tag(&key.0, method, url, params, nonce).is_ok_and(|sdk| plivo::header_matches_any(header, &[&sdk])) {
        return Some(V3Form::Sdk);
    }
    plivo::header_matches_any(header, &[&docs_tag(key, url, nonce)]).then_some(V3Form::Docs)
}

/// V2 (docs): base URL immediately followed by the nonce; identical to Plivo V2.
pub fn v2_signed_string(url: &str, nonce: &str) -> String {
    plivo::v2_signed_string(url, nonce)
}

/// Base64 V2 signature.
pub fn sign_v2(key: &VobizKey, url: &str, nonce: &str) -> String {
    plivo::sign_v2(&key.0, url, nonce)
}

/// Checks an `X-Vobiz-Signature-V2` (or `-MA-V2`) header; comma-separated like V3.
pub fn verify_v2(key: &VobizKey, url: &str, nonce: &str, header: &str) -> bool {
    let tag = plivo::v2_tag(&key.0, url, nonce);
    plivo::header_matches_any(header, &[&tag])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "vobizTestAuthToken0123456789abcd";
    const NONCE: &str = "12345678901234567890";
    const URL: &str = "https://gw.example.com/vobiz/answer?tenant=acme";
    const PARAMS: &[(&str, &str)] = &[
        ("CallUUID", "b1c2d3e4-0000-4000-8000-000000000001"),
        ("From", "919800000001"),
        ("To", "918065550001"),
        ("Direction", "inbound"),
        ("Event", "StartApp"),
        ("CallStatus", "in-progress"),
    ];
    const VB1: &str = "2gdn6T+GvylU0HfG0QkpaM52QEAbTAv00MZCycvVwOQ=";
    const VB2: &str = "f1pufFKxAU37RKQUvsaNO2i8T9Yfp+BfiAsvzKx8kjM=";
    const VB3: &str = "34Tz7zteD819+42m+XFXUbZl9Jk2TqGcWA7+rmD6+W0=";

    fn key() -> VobizKey {
        VobizKey::new(TOKEN.as_bytes())
    }

    #[test]
    fn vb1_docs_v3() {
        assert_eq!(v3_docs_signed_string(URL, NONCE), "https://gw.example.com/vobiz/answer.12345678901234567890");
        assert_eq!(sign_v3_docs(&key(), URL, NONCE), VB1);
        assert!(verify_v3(&key(), Method::Post, URL, PARAMS, NONCE, VB1));
        assert!(verify_v3(&key(), Method::Post, URL, PARAMS, NONCE, &format!("x, {VB1}")));
    }

    #[test]
    fn vb2_v2() {
        assert_eq!(v2_signed_string(URL, NONCE), "https://gw.example.com/vobiz/answer12345678901234567890");
        assert_eq!(sign_v2(&key(), URL, NONCE), VB2);
        assert!(verify_v2(&key(), URL, NONCE, VB2));
        assert!(verify_v2(&key(), URL, NONCE, &format!("{VB1},{VB2}")));
        assert!(!verify_v2(&key(), URL, NONCE, VB1));
        assert!(!verify_v2(&key(), URL, "12345678901234567891", VB2));
        // The schemes are distinct: a V2 signature is not a V3 one.
        assert!(!verify_v3(&key(), Method::Post, URL, PARAMS, NONCE, VB2));
    }

    #[test]
    fn vb3_sdk_v3() {
        assert_eq!(
            v3_sdk_signed_string(Method::Post, URL, PARAMS, NONCE).unwrap(),
            "https://gw.example.com/vobiz/answer?tenant=acme.CallStatusin-progressCallUUIDb1c2d3e4-0000-4000-8000-000000000001DirectioninboundEventStartAppFrom919800000001To918065550001.12345678901234567890"
        );
        assert_eq!(sign_v3_sdk(&key(), Method::Post, URL, PARAMS, NONCE).unwrap(), VB3);
        assert!(verify_v3(&key(), Method::Post, URL, PARAMS, NONCE, VB3));
        assert!(verify_v3(&key(), Method::Post, URL, PARAMS, NONCE, &format!("AAAA,{VB3}")));
    }

    #[test]
    fn tampering_fails() {
        let k = key();
        assert!(!verify_v3(&VobizKey::new(b"other"), Method::Post, URL, PARAMS, NONCE, VB1));
        assert!(!verify_v3(&VobizKey::new(b"other"), Method::Post, URL, PARAMS, NONCE, VB3));
        assert!(!verify_v3(&k, Method::Post, URL, PARAMS, "12345678901234567891", VB1));
        assert!(!verify_v3(&k, Method::Post, URL, PARAMS, "12345678901234567891", VB3));
        let other_path = "https://gw.example.com/vobiz/answeR?tenant=acme";
        assert!(!verify_v3(&k, Method::Post, other_path, PARAMS, NONCE, VB1));
        assert!(!verify_v3(&k, Method::Post, other_path, PARAMS, NONCE, VB3));
        // The SDK form covers the query and the params, the docs form does not.
        let other_query = "https://gw.example.com/vobiz/answer?tenant=acmE";
        assert!(!verify_v3(&k, Method::Post, other_query, PARAMS, NONCE, VB3));
        assert!(verify_v3(&k, Method::Post, other_query, PARAMS, NONCE, VB1));
        let mut params = PARAMS.to_vec();
        params[1].1 = "919800000002";
        assert!(!verify_v3(&k, Method::Post, URL, &params, NONCE, VB3));
        assert!(verify_v3(&k, Method::Post, URL, &params, NONCE, VB1));
        for sig in [VB1, VB3] {
            for i in 0..sig.len() {
                let mut bad = sig.as_bytes().to_vec();
                bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
                let bad = String::from_utf8(bad).unwrap();
                assert!(!verify_v3(&k, Method::Post, URL, PARAMS, NONCE, &bad));
            }
        }
        assert!(!verify_v3(&k, Method::Post, URL, PARAMS, NONCE, ""));
    }

    #[test]
    fn undecodable_query_still_checks_docs_form() {
        let url = "https://gw.example.com/vobiz/answer?x=%ff";
        let sig = sign_v3_docs(&key(), url, NONCE);
        assert!(verify_v3(&key(), Method::Post, url, PARAMS, NONCE, &sig));
        assert!(!verify_v3(&key(), Method::Post, url, PARAMS, NONCE, VB3));
    }

    #[test]
    fn debug_redacts_key() {
        assert_eq!(format!("{:?}", key()), "VobizKey([redacted])");
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
        fn sign_then_verify_both_forms(
            token in proptest::collection::vec(any::<u8>(), 0..48),
            post in any::<bool>(),
            url in "https://[a-z0-9.]{1,16}(:[0-9]{1,5})?(/[A-Za-z0-9._-]{0,8}){0,3}(\\?[a-z0-9=&]{0,16})?",
            params in proptest::collection::vec((".{0,8}", ".{0,12}"), 0..8),
            nonce in "[0-9]{0,24}",
        ) {
            let key = VobizKey::new(&token);
            let method = if post { Method::Post } else { Method::Get };
            let docs = sign_v3_docs(&key, &url, &nonce);
            let sdk = sign_v3_sdk(&key, method, &url, &params, &nonce).unwrap();
            prop_assert!(verify_v3(&key, method, &url, &params, &nonce, &docs));
            prop_assert!(verify_v3(&key, method, &url, &params, &nonce, &sdk));
            let v2 = sign_v2(&key, &url, &nonce);
            prop_assert!(verify_v2(&key, &url, &nonce, &v2));
        }

        #[test]
        fn flips_fail(
            path in "(/[A-Za-z0-9]{1,8}){1,3}",
            params in proptest::collection::btree_map("[A-Za-z]{1,8}", "[A-Za-z0-9]{1,12}", 1..8),
            nonce in "[0-9]{1,24}",
            which in 0usize..4,
            index in any::<usize>(),
        ) {
            let key = VobizKey::new(b"token");
            let url = format!("https://gw.example.com{path}");
            let params: Vec<(String, String)> = params.into_iter().collect();
            let docs = sign_v3_docs(&key, &url, &nonce);
            let sdk = sign_v3_sdk(&key, Method::Post, &url, &params, &nonce).unwrap();
            let ok = |u: &str, p: &[(String, String)], n: &str, s: &str| {
                verify_v3(&key, Method::Post, u, p, n, s)
            };
            match which {
                0 => {
                    let u = flip(&url, index);
                    prop_assert!(!ok(&u, &params, &nonce, &docs));
                    prop_assert!(!ok(&u, &params, &nonce, &sdk));
                }
                1 => {
                    let n = flip(&nonce, index);
                    prop_assert!(!ok(&url, &params, &n, &docs));
                    prop_assert!(!ok(&url, &params, &n, &sdk));
                }
                2 => {
                    prop_assert!(!ok(&url, &params, &nonce, &flip(&docs, index)));
                    prop_assert!(!ok(&url, &params, &nonce, &flip(&sdk, index)));
                }
                _ => {
                    // Only the SDK form covers params.
                    let mut p = params.clone();
                    let i = index % p.len();
                    p[i].1 = flip(&p[i].1, index / p.len());
                    prop_assert!(!ok(&url, &p, &nonce, &sdk));
                }
            }
        }
    }
}
