//! `net::form`: the decoder every carrier's signature check hashes through.
//!
//! Input: arbitrary bytes, used whole as a form body / query string, and (when UTF-8) as a URL.
//! Oracles: `parse` agrees with the lazy `pairs`, with the `form_urlencoded` crate (the WHATWG
//! decoder) whenever it succeeds, and with itself after re-encoding; `split_url`'s pieces
//! reassemble into a prefix of the URL.
#![no_main]

use std::borrow::Cow;

use callgate::net::form::{self, FormError, MAX_PAIRS};
use libfuzzer_sys::fuzz_target;

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let parsed = form::parse(data);
    let lazy: Vec<_> = form::pairs(data).collect();

    match &parsed {
        Ok(pairs) => {
            assert!(pairs.len() <= MAX_PAIRS);
            assert_eq!(pairs.len(), lazy.len());
            for (p, l) in pairs.iter().zip(&lazy) {
                assert_eq!(Some(p), l.as_ref().ok());
            }
            // Differential: the WHATWG decoder yields the same pairs when ours succeeds
            // (it only differs by replacing invalid UTF-8, which we reject instead).
            let whatwg: Vec<(Cow<'_, str>, Cow<'_, str>)> = form_urlencoded::parse(data).collect();
            assert_eq!(pairs.len(), whatwg.len(), "pair count differs from form_urlencoded");
            for ((k, v), (wk, wv)) in pairs.iter().zip(&whatwg) {
                assert_eq!(k, wk);
                assert_eq!(v, wv);
            }
            // Re-encoding every byte and parsing again gives the same pairs; a pair whose key
            // and value are both empty encodes to `=`, still one pair.
            let body = pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
            let again = form::parse(body.as_bytes()).expect("re-encoded pairs decode");
            assert_eq!(&again, pairs);
        }
        Err(FormError::TooManyPairs { limit }) => {
            assert_eq!(*limit, MAX_PAIRS);
            assert!(lazy.len() > MAX_PAIRS);
            assert!(lazy[..MAX_PAIRS].iter().all(Result::is_ok));
        }
        Err(FormError::InvalidUtf8) => {
            let first_err = lazy.iter().position(Result::is_err).expect("some pair failed");
            assert!(first_err < MAX_PAIRS);
            assert_eq!(lazy[first_err], Err(FormError::InvalidUtf8));
        }
    }

    // A small cap, chosen by the input.
    let limit = data.first().map_or(0, |b| usize::from(b % 8));
    if let Ok(p) = form::parse_with_limit(data, limit) {
        assert!(p.len() <= limit);
    }

    // One key or value on its own: borrowed exactly when there is nothing to decode.
    if let Ok(d) = form::decode(data) {
        let plain = !data.iter().any(|&b| b == b'+' || b == b'%');
        assert_eq!(matches!(d, Cow::Borrowed(_)), plain);
        if plain {
            assert_eq!(d.as_bytes(), data);
        }
        assert!(d.len() <= data.len());
    }

    if let Ok(url) = std::str::from_utf8(data) {
        let (base, query) = form::split_url(url);
        assert!(!base.contains('#') && !base.contains('?'));
        assert!(url.starts_with(base));
        match query {
            Some(q) => {
                assert!(!q.contains('#'));
                assert_eq!(url.as_bytes()[base.len()], b'?');
                assert!(url[base.len() + 1..].starts_with(q));
                let _ = form::parse(q.as_bytes());
            }
            None => assert!(url.len() == base.len() || url.as_bytes()[base.len()] == b'#'),
        }
    }
});
