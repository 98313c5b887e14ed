//! The carrier's parameters as an event shows them: a JSON object of the query's and the
//! form's fields, keys in order, a repeated key as an array of its values in arrival order.
//!
//! A form carrier's event stores the form text as it arrived and this JSON is made when the
//! event is read out; other events store the JSON itself. It is written straight from the
//! decoded pairs to JSON text: no map of owned strings is built only to be encoded and dropped.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use super::Inbound;

/// The fields of `req` (query first, then form), without the keys in `skip`.
pub fn form_params(req: &Inbound<'_>, skip: &[&str]) -> Box<RawValue> {
    let query: Vec<_> = crate::net::form::pairs(req.query.as_bytes()).filter_map(Result::ok).collect();
    let fields = query.iter().chain(req.form.iter()).filter(|(k, _)| !skip.contains(&k.as_ref()));
    to_raw(&Fields(&sorted(fields)))
}

/// The fields of `req` as they arrived: the query, then the form body, joined by `&`. Decoding
/// skips empty segments, so the text reads back as the two parts did one after the other.
///
/// A form carrier's event keeps this instead of [`form_params`]' JSON, which is made only when
/// the event is read out ([`received_json`]): on the webhook path, decoding, sorting and
/// escaping every field again cost more than the rest of recording the event. `None` when the
/// body is not UTF-8 text (it may still decode to UTF-8), which then goes the JSON way.
pub fn as_received(req: &Inbound<'_>) -> Option<String> {
    let body = if req.is_form { std::str::from_utf8(req.body).ok()? } else { "" };
    let mut text = String::with_capacity(req.query.len() + 1 + body.len());
    text.push_str(req.query);
    if !req.query.is_empty() && !body.is_empty() {
        text.push('&');
    }
    text.push_str(body);
    Some(text)
}

/// The JSON [`form_params`] gives (with nothing skipped) for fields kept by [`as_received`].
pub fn received_json(text: &str) -> Box<RawValue> {
    let fields: Vec<_> = crate::net::form::pairs(text.as_bytes()).filter_map(Result::ok).collect();
    to_raw(&Fields(&sorted(fields.iter())))
}

/// A form carrier's fields for its event: as received where they can be kept so, else as JSON
/// (`params`, `form`, as [`crate::store::EventRecord`] holds them).
pub fn form_fields(req: &Inbound<'_>) -> (Box<RawValue>, Option<String>) {
    match as_received(req) {
        Some(text) => (RawValue::NULL.to_owned(), Some(text)),
        None => (form_params(req, &[]), None),
    }
}

/// Pairs by key, the values of a repeated key in arrival order (the sort is stable).
fn sorted<'a>(pairs: impl Iterator<Item = &'a crate::net::form::Pair<'a>>) -> Vec<(&'a str, &'a str)> {
    let mut fields: Vec<(&str, &str)> = pairs.map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    fields
}

/// Any value as embedded JSON; a string when `bytes` are not JSON that can be read back as a
/// tree later (kept either way, never dropped).
pub fn json_or_text(bytes: &[u8]) -> Box<RawValue> {
    readable_json(bytes).unwrap_or_else(|| to_raw(&String::from_utf8_lossy(bytes)))
}

/// `bytes` as embedded JSON, if they can be read back as a tree later.
pub fn readable_json(bytes: &[u8]) -> Option<Box<RawValue>> {
    serde_json::from_slice::<Box<RawValue>>(bytes).ok().filter(|raw| readable(raw.get().as_bytes()))
}

/// Whether `json` parses as a `serde_json::Value` would, without building one. Skipping a value
/// (as a raw value or an ignored field is read) checks its syntax only: not the UTF-8 of its
/// strings, their escapes, the range of its numbers or its depth, all of which would make the
/// events API fail to read a stored event back.
pub fn readable(json: &[u8]) -> bool {
    !nests_too_deep(json) && serde_json::from_slice::<Readable>(json).is_ok()
}

/// Visits every key and value as a tree parse does, keeping nothing.
pub(crate) struct Readable;

impl<'de> serde::Deserialize<'de> for Readable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Readable)
    }
}

impl<'de> serde::de::Visitor<'de> for Readable {
    type Value = Readable;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Readable, E> {
        Ok(Readable)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Readable, A::Error> {
        while seq.next_element::<Readable>()?.is_some() {}
        Ok(Readable)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Readable, A::Error> {
        while map.next_entry::<Key, Readable>()?.is_some() {}
        Ok(Readable)
    }
}

/// A key, decoded (and so checked) like any string.
pub(crate) struct Key;

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Readable).map(|_| Key)
    }
}

/// Arrays and objects deeper than this are refused. Skipping a value (as a raw value or an
/// ignored field is read) has no depth limit, but parsing one into a tree, as the events API
/// does, stops at 128.
const MAX_DEPTH: usize = 100;

/// Whether JSON text nests arrays and objects deeper than [`MAX_DEPTH`].
pub fn nests_too_deep(json: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// JSON text of `v`. Only the serializer's own output goes in, so this cannot fail for the
/// types above; `null` is the answer that would keep the event if it somehow did.
fn to_raw<T: Serialize + ?Sized>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Sorted pairs, serialized as an object with arrays for repeated keys.
struct Fields<'a>(&'a [(&'a str, &'a str)]);

struct Values<'a>(&'a [(&'a str, &'a str)]);

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let mut rest = self.0;
        while let Some((key, value)) = rest.first() {
            let n = rest.iter().take_while(|(k, _)| k == key).count();
            if n == 1 {
                map.serialize_entry(key, value)?;
            } else {
                map.serialize_entry(key, &Values(&rest[..n]))?;
            }
            rest = &rest[n..];
        }
        map.end()
    }
}

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (_, v) in self.0 {
            seq.serialize_element(v)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderMap;

    fn params(query: &str, body: &str, skip: &[&str]) -> String {
        let headers = HeaderMap::new();
        let req = Inbound {
            method: "POST",
            headers: &headers,
            url: "https://gw.example/x",
            query,
            body: body.as_bytes(),
            form: crate::net::form::parse(body.as_bytes()).unwrap(),
            is_form: true,
            envelope: None,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            now_secs: 0,
        };
        form_params(&req, skip).get().to_owned()
    }

    #[test]
    fn keys_are_sorted_and_repeated_keys_become_arrays_in_arrival_order() {
        assert_eq!(
            params("b=q1&Z=q2", "b=f1&a=%22quoted%22+%26+spaced&b=f2&c=", &[]),
            r#"{"Z":"q2","a":"\"quoted\" & spaced","b":["q1","f1","f2"],"c":""}"#
        );
    }

    #[test]
    fn skipped_keys_are_left_out_and_nothing_is_an_empty_object() {
        assert_eq!(params("", "token=s3cret&CallSid=CA1&token=again", &["token"]), r#"{"CallSid":"CA1"}"#);
        assert_eq!(params("", "", &[]), "{}");
    }

    #[test]
    fn the_text_is_what_a_map_of_the_same_fields_encodes_to() {
        let body = "To=%2B14155550100&From=sip%3Aalice%40example.com&Event=Hangup&X-PH-u%C3%A9=%F0%9F%93%9E";
        let mut map = serde_json::Map::new();
        for (k, v) in crate::net::form::parse(body.as_bytes()).unwrap() {
            map.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
        }
        assert_eq!(params("", body, &[]), serde_json::Value::Object(map).to_string());
    }

    fn inbound<'a>(headers: &'a HeaderMap, query: &'a str, body: &'a [u8], is_form: bool) -> Inbound<'a> {
        Inbound {
            method: "POST",
            headers,
            url: "https://gw.example/x",
            query,
            body,
            form: if is_form { crate::net::form::parse(body).unwrap() } else { Vec::new() },
            is_form,
            envelope: None,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            now_secs: 0,
        }
    }

    #[test]
    fn fields_kept_as_received_read_back_as_the_json_made_at_once() {
        let headers = HeaderMap::new();
        for (query, body) in [
            ("", "b=f1&a=%22quoted%22+%26+spaced&b=f2&c="),
            ("b=q1&Z=q2", "b=f1&&a=1&"),
            ("b=q1&", ""),
            ("", ""),
            ("x=%ZZ&y=%C3%A9", "To=%2B14155550100&X-PH-u%C3%A9=%F0%9F%93%9E&k"),
        ] {
            let req = inbound(&headers, query, body.as_bytes(), true);
            let (params, form) = form_fields(&req);
            assert_eq!(params.get(), "null");
            let text = form.unwrap();
            assert_eq!(received_json(&text).get(), form_params(&req, &[]).get(), "{query:?} {body:?}");
        }
        // Query and body are told apart only by the `&` between them.
        assert_eq!(as_received(&inbound(&headers, "a=1", b"b=2", true)).unwrap(), "a=1&b=2");
        // A body that is not a form is not a field: only the query is kept.
        assert_eq!(as_received(&inbound(&headers, "a=1", b"{\"b\":2}", false)).unwrap(), "a=1");
    }

    #[test]
    fn a_form_body_that_is_not_utf8_text_is_kept_as_json() {
        let headers = HeaderMap::new();
        // A raw lead byte completed by an escape decodes to UTF-8 text, but is not text itself.
        let body = b"a=\xc3%A9";
        let req = inbound(&headers, "", body, true);
        assert_eq!(as_received(&req), None);
        let (params, form) = form_fields(&req);
        assert_eq!((params.get(), form), (r#"{"a":"é"}"#, None));
    }

    proptest::proptest! {
        #[test]
        fn any_form_kept_as_received_reads_back_as_its_json(
            query in "[a-cZ=&%+0-9]{0,24}",
            body in "[a-cZ=&%+0-9é]{0,48}",
        ) {
            let headers = HeaderMap::new();
            let Ok(form) = crate::net::form::parse(body.as_bytes()) else { return Ok(()) };
            let mut req = inbound(&headers, &query, body.as_bytes(), true);
            req.form = form;
            let text = as_received(&req).unwrap();
            let (kept, made) = (received_json(&text), form_params(&req, &[]));
            proptest::prop_assert_eq!(kept.get(), made.get());
        }
    }

    #[test]
    fn a_body_that_is_not_json_is_kept_as_a_string() {
        assert_eq!(json_or_text(br#" {"a": [1, 2]} "#).get(), r#"{"a": [1, 2]}"#);
        assert_eq!(json_or_text(b"not json \"here\"").get(), r#""not json \"here\"""#);
    }

    #[test]
    fn json_a_tree_parse_would_refuse_is_not_readable_and_is_kept_as_a_string() {
        for bad in [&b"{\"a\":1e400}"[..], b"{\"a\":\"\\ud800\"}", b"{\"a\xf4b\":1}", b"[\"\xff\"]", b"{\"a\":\"\\q\"}"]
        {
            assert!(serde_json::from_slice::<serde_json::Value>(bad).is_err(), "{bad:?}");
            assert!(!readable(bad), "{bad:?}");
            let kept = json_or_text(bad);
            assert!(serde_json::from_str::<serde_json::Value>(kept.get()).unwrap().is_string(), "{bad:?}");
        }
        for good in [&b"{\"a\":[1,-2,3.5e10,true,null,\"\\u00e9\\ud83d\\ude00\"],\"a\":{}}"[..], b"\"x\"", b"0"] {
            assert!(readable(good), "{good:?}");
            assert_eq!(json_or_text(good).get().as_bytes(), good);
        }
    }

    #[test]
    fn json_nested_deeper_than_a_tree_can_be_read_back_is_kept_as_a_string() {
        let nested = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n - 1), "]".repeat(n - 1));
        assert!(!nests_too_deep(nested(MAX_DEPTH).as_bytes()));
        assert!(nests_too_deep(nested(MAX_DEPTH + 1).as_bytes()));
        // Brackets inside strings, escaped quotes included, are text.
        let quoted = format!(r#"{{"a":"\"{}"}}"#, "[".repeat(500));
        assert!(!nests_too_deep(quoted.as_bytes()));
        assert_eq!(json_or_text(quoted.as_bytes()).get(), quoted);
        let deep = nested(MAX_DEPTH + 1);
        assert_eq!(serde_json::from_str::<String>(json_or_text(deep.as_bytes()).get()).unwrap(), deep);
        let fine = nested(MAX_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(json_or_text(fine.as_bytes()).get()).is_ok());
    }
}
