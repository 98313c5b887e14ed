//! The carrier's parameters as stored with the event: a JSON object of the query's and the
//! form's fields, keys in order, a repeated key as an array of its values in arrival order.
//!
//! Written straight from the decoded pairs to JSON text, which the event embeds as it is: no
//! map of owned strings is built on the webhook path only to be encoded and dropped.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use super::Inbound;

/// The fields of `req` (query first, then form), without the keys in `skip`.
pub fn form_params(req: &Inbound<'_>, skip: &[&str]) -> Box<RawValue> {
    let query: Vec<_> = crate::net::form::pairs(req.query.as_bytes()).filter_map(Result::ok).collect();
    let mut fields: Vec<(&str, &str)> = query
        .iter()
        .chain(req.form.iter())
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .filter(|(k, _)| !skip.contains(k))
        .collect();
    // Stable: the values of a repeated key keep their order.
    fields.sort_by(|a, b| a.0.cmp(b.0));
    to_raw(&Fields(&fields))
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
