//! Decoding of `application/x-www-form-urlencoded` bodies and URL query strings.
//!
//! The carriers' signature schemes hash *decoded* parameters, so this parser has to agree
//! with the SDKs' decoders (Python `parse_qsl(keep_blank_values=True)`, Go `url.ParseQuery`):
//! split on `&` only, skip empty segments, `+` means space, malformed `%` escapes stay
//! literal. It deliberately differs in one way: bytes that do not decode to UTF-8 are an
//! error instead of being replaced with U+FFFD, because a lossy decode could make two
//! different requests hash the same.

use std::borrow::Cow;

/// Upper bound on the number of pairs [`parse`] accepts. Real carrier callbacks carry a few
/// dozen fields; the cap keeps a hostile body from making us build an unbounded vector.
pub const MAX_PAIRS: usize = 1_000;

/// One decoded `key=value` pair. Borrowed from the input whenever no decoding was needed.
pub type Pair<'a> = (Cow<'a, str>, Cow<'a, str>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("form data has more than {limit} fields")]
    TooManyPairs { limit: usize },
    #[error("form data is not valid UTF-8 after percent-decoding")]
    InvalidUtf8,
}

/// Decodes all pairs of `input`, failing beyond [`MAX_PAIRS`] pairs.
pub fn parse(input: &[u8]) -> Result<Vec<Pair<'_>>, FormError> {
    parse_with_limit(input, MAX_PAIRS)
}

/// Like [`parse`] with a caller-chosen cap on the number of pairs.
pub fn parse_with_limit(input: &[u8], limit: usize) -> Result<Vec<Pair<'_>>, FormError> {
    // Counting separators first lets us allocate once; the count is an upper bound because
    // empty segments are skipped, and the cap keeps a hostile body from inflating it.
    let segments = memchr::memchr_iter(b'&', input).count() + 1;
    let mut out = Vec::with_capacity(segments.min(limit));
    for pair in pairs(input) {
        if out.len() == limit {
            return Err(FormError::TooManyPairs { limit });
        }
        out.push(pair?);
    }
    Ok(out)
}

/// Lazily decodes the pairs of `input`. No cap: the caller decides what to keep, which is
/// what lets a single lookup (e.g. Twilio's `bodySHA256`) run without allocating.
pub fn pairs(input: &[u8]) -> Pairs<'_> {
    // Checking the whole input once lets every plain key and value be a slice of it with no
    // check of its own. Input that is not UTF-8 as a whole may still decode to it (a raw
    // lead byte completed by an escape), so each half is then checked as it is decoded.
    Pairs { rest: Some(input), text: std::str::from_utf8(input).ok() }
}

/// Iterator returned by [`pairs`].
#[derive(Debug, Clone)]
pub struct Pairs<'a> {
    rest: Option<&'a [u8]>,
    /// `rest` as text, when the whole input was UTF-8 (it is cut at ASCII bytes only).
    text: Option<&'a str>,
}

/// What ends a plain run inside a segment: its end, its first `=`, or an escape.
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'&' as usize] = true;
    t[b'=' as usize] = true;
    t[b'+' as usize] = true;
    t[b'%' as usize] = true;
    t
};

impl<'a> Iterator for Pairs<'a> {
    type Item = Result<Pair<'a>, FormError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rest = self.rest?;
            // One pass over the segment finds its end, where its key ends and whether either
            // half has anything to decode. Callback fields are short, so a byte loop beats
            // searching for each of those separately.
            let (mut end, mut eq) = (rest.len(), None);
            let (mut key_escaped, mut value_escaped) = (false, false);
            for (i, &b) in rest.iter().enumerate() {
                if !SPECIAL[b as usize] {
                    continue;
                }
                match (b, eq) {
                    (b'&', _) => {
                        end = i;
                        break;
                    }
                    (b'=', None) => eq = Some(i),
                    (b'=', Some(_)) => {}
                    (_, None) => key_escaped = true,
                    (_, Some(_)) => value_escaped = true,
                }
            }
            let text = self.text;
            self.rest = rest.get(end + 1..);
            self.text = text.and_then(|t| t.get(end + 1..));
            if end == 0 {
                // `a=1&&b=2` and a trailing `&` carry no pair for any of the SDK decoders.
                continue;
            }
            let (key, value) = match eq {
                Some(i) => ((0, i), (i + 1, end)),
                None => ((0, end), (end, end)),
            };
            let half = |(from, to): (usize, usize), escaped: bool| match (escaped, text.and_then(|t| t.get(from..to))) {
                (false, Some(plain)) => Ok(Cow::Borrowed(plain)),
                (false, None) => {
                    std::str::from_utf8(&rest[from..to]).map(Cow::Borrowed).map_err(|_| FormError::InvalidUtf8)
                }
                (true, _) => decode_escaped(&rest[from..to]),
            };
            return Some(half(key, key_escaped).and_then(|k| Ok((k, half(value, value_escaped)?))));
        }
    }
}

/// Percent-decodes one key or value with `+` → space.
pub fn decode(raw: &[u8]) -> Result<Cow<'_, str>, FormError> {
    if raw.iter().any(|&b| b == b'+' || b == b'%') {
        decode_escaped(raw)
    } else {
        std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|_| FormError::InvalidUtf8)
    }
}

/// [`decode`] of text known to hold a `+` or a `%`.
fn decode_escaped(raw: &[u8]) -> Result<Cow<'_, str>, FormError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        let (byte, used) = match b {
            b'+' => (b' ', 1),
            b'%' => match (raw.get(i + 1).copied().and_then(hex_value), raw.get(i + 2).copied().and_then(hex_value)) {
                (Some(hi), Some(lo)) => (hi << 4 | lo, 3),
                // Same as Python's `unquote` and WHATWG: a broken escape is literal text.
                _ => (b'%', 1),
            },
            b => (b, 1),
        };
        out.push(byte);
        i += used;
    }
    String::from_utf8(out).map(Cow::Owned).map_err(|_| FormError::InvalidUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits `url` into `scheme://netloc/path` and the raw query (without `?`), dropping any
/// fragment, like Python's `urlsplit`. Nothing is normalised because the carriers sign the
/// URL exactly as configured.
pub fn split_url(url: &str) -> (&str, Option<&str>) {
    let url = url.split_once('#').map_or(url, |(before, _)| before);
    match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owned(input: &[u8]) -> Vec<(String, String)> {
        parse(input).unwrap().into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn empty_input_has_no_pairs() {
        assert!(parse(b"").unwrap().is_empty());
        assert!(parse(b"&&&").unwrap().is_empty());
    }

    #[test]
    fn decodes_plus_and_percent() {
        assert_eq!(
            owned(b"EndTime=2024-05-01+10%3A00%3A00&From=%2B14155550100"),
            vec![p("EndTime", "2024-05-01 10:00:00"), p("From", "+14155550100")]
        );
        assert_eq!(owned(b"a%20b=c+d"), vec![p("a b", "c d")]);
        assert_eq!(owned(b"k=%e2%82%AC"), vec![p("k", "€")]);
    }

    #[test]
    fn keeps_blank_values_and_bare_keys() {
        assert_eq!(owned(b"k=&j&=v&x=1=2"), vec![p("k", ""), p("j", ""), p("", "v"), p("x", "1=2")]);
    }

    #[test]
    fn skips_empty_segments_only() {
        assert_eq!(owned(b"&a=1&&b=2&"), vec![p("a", "1"), p("b", "2")]);
        // `;` is not a separator (Python >= 3.10, Go, WHATWG).
        assert_eq!(owned(b"a=1;b=2"), vec![p("a", "1;b=2")]);
    }

    #[test]
    fn repeated_keys_keep_order() {
        assert_eq!(
            owned(b"Digits=5678&Digits=1234&Digits=1234"),
            vec![p("Digits", "5678"), p("Digits", "1234"), p("Digits", "1234")]
        );
    }

    #[test]
    fn malformed_escapes_are_literal() {
        assert_eq!(owned(b"a=%zz&b=%4&c=%&d=100%25"), vec![p("a", "%zz"), p("b", "%4"), p("c", "%"), p("d", "100%")]);
    }

    #[test]
    fn borrows_when_nothing_to_decode() {
        let pairs = parse(b"CallUUID=abc-123&To=918035551234&x=a+b").unwrap();
        assert!(matches!(pairs[0].0, Cow::Borrowed("CallUUID")));
        assert!(matches!(pairs[0].1, Cow::Borrowed("abc-123")));
        assert!(matches!(pairs[1].1, Cow::Borrowed(_)));
        assert!(matches!(pairs[2].1, Cow::Owned(_)));
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(parse(b"a=%ff"), Err(FormError::InvalidUtf8));
        assert_eq!(parse(b"%c3=1"), Err(FormError::InvalidUtf8));
        assert_eq!(parse(b"a=\xff"), Err(FormError::InvalidUtf8));
    }

    #[test]
    fn a_raw_byte_an_escape_completes_is_text() {
        // Not UTF-8 as received, UTF-8 once decoded: what Python's `parse_qsl` gives too.
        assert_eq!(owned(b"a=\xc3%a9&b=1"), vec![p("a", "\u{e9}"), p("b", "1")]);
        assert_eq!(parse(b"a=1&b=\xc3&c=%a9"), Err(FormError::InvalidUtf8));
        assert_eq!(parse(b"\xc3=1"), Err(FormError::InvalidUtf8));
    }

    #[test]
    fn caps_pair_count() {
        let at_limit = "a=1&".repeat(MAX_PAIRS);
        assert_eq!(parse(at_limit.as_bytes()).unwrap().len(), MAX_PAIRS);
        let over = format!("{at_limit}b=2");
        assert_eq!(parse(over.as_bytes()), Err(FormError::TooManyPairs { limit: MAX_PAIRS }));
        assert_eq!(parse_with_limit(b"a&b&c", 2), Err(FormError::TooManyPairs { limit: 2 }));
    }

    #[test]
    fn split_url_cases() {
        assert_eq!(
            split_url("https://h.example:8443/a/b.xml/?a=b&c=d"),
            ("https://h.example:8443/a/b.xml/", Some("a=b&c=d"))
        );
        assert_eq!(split_url("https://h/p"), ("https://h/p", None));
        assert_eq!(split_url("https://h/p?"), ("https://h/p", Some("")));
        assert_eq!(split_url("https://h/p?x=1#f?g"), ("https://h/p", Some("x=1")));
        assert_eq!(split_url("https://h/p#f?g"), ("https://h/p", None));
        assert_eq!(split_url("https://h/%2Fp?q"), ("https://h/%2Fp", Some("q")));
    }

    /// The decoder as the SDKs' `unquote_plus` reads it, one byte at a time: the model the
    /// run-copying [`decode`] must agree with.
    fn decode_bytewise(raw: &[u8]) -> Option<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(&b) = raw.get(i) {
            // `from_str_radix` alone would take `+1` as a number.
            let escaped = raw
                .get(i + 1..i + 3)
                .filter(|hex| b == b'%' && hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
            let (byte, used) = match (b, escaped) {
                (_, Some(v)) => (v, 3),
                (b'+', None) => (b' ', 1),
                (b, None) => (b, 1),
            };
            out.push(byte);
            i += used;
        }
        String::from_utf8(out).ok()
    }

    #[test]
    fn escapes_at_the_edges_decode_as_bytewise() {
        for raw in [&b"%41"[..], b"+", b"%", b"%4", b"a%", b"a%4", b"%41%42", b"++a++", b"%%41", b"%4%41", b"x%zzy+%2b"]
        {
            assert_eq!(
                decode(raw).ok().map(Cow::into_owned),
                decode_bytewise(raw),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decodes_as_the_bytewise_model(raw in proptest::collection::vec(
            prop_oneof![Just(b'+'), Just(b'%'), Just(b'4'), Just(b'1'), Just(b'c'), Just(b'3'), Just(b'F'), Just(b'z'), any::<u8>()],
            0..48,
        )) {
            prop_assert_eq!(decode(&raw).ok().map(Cow::into_owned), decode_bytewise(&raw));
        }

        #[test]
        fn parses_as_the_segment_model(raw in proptest::collection::vec(
            prop_oneof![Just(b'&'), Just(b'='), Just(b'+'), Just(b'%'), Just(b'4'), Just(b'c'), Just(b'3'), Just(b'a'), any::<u8>()],
            0..64,
        )) {
            // Split on `&`, skip empty segments, split each on its first `=`, decode both halves.
            let model: Option<Vec<(String, String)>> = raw
                .split(|&b| b == b'&')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let (k, v) = match s.iter().position(|&b| b == b'=') {
                        Some(i) => (&s[..i], &s[i + 1..]),
                        None => (s, &s[s.len()..]),
                    };
                    Some((decode_bytewise(k)?, decode_bytewise(v)?))
                })
                .collect();
            let parsed = parse(&raw).ok().map(|v| v.into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect());
            prop_assert_eq!(parsed, model);
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(pairs) = parse(&input) {
                prop_assert!(pairs.len() <= MAX_PAIRS);
            }
            let _ = pairs(&input).count();
        }

        #[test]
        fn round_trips_encoded_pairs(
            items in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..8)
        ) {
            let encode = |s: &str| -> String {
                s.bytes().map(|b| format!("%{b:02X}")).collect()
            };
            let body = items
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            let parsed = parse(body.as_bytes()).unwrap();
            // Pairs whose key and value are both empty encode to `=`, which is still a pair.
            prop_assert_eq!(parsed.len(), items.len());
            for ((k, v), (pk, pv)) in items.iter().zip(parsed.iter()) {
                prop_assert_eq!(k.as_str(), pk.as_ref());
                prop_assert_eq!(v.as_str(), pv.as_ref());
            }
        }
    }
}
