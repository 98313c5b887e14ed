//! A JSON value whose objects, at any depth, name each key once. serde_json keeps the last of
//! a repeated key without a word, so `{"api_key": "a", "api_key": "b"}` would store "b" while
//! a proxy, a log or a reviewer that reads the first saw "a". Bodies an operator sends as free
//! JSON (a credential, a BYOK key) are read through this; typed bodies get the same from serde's
//! derive, which refuses a repeated field.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Strict(pub Value);

impl std::ops::Deref for Strict {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

/// For a field of a typed body: `#[serde(deserialize_with = "strict_json::option")]`.
pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Option::<Strict>::deserialize(d).map(|v| v.map(|s| s.0))
}

/// For an object field of a typed body: `#[serde(default, deserialize_with =
/// "strict_json::option_object")]`.
pub fn option_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    match Option::<Strict>::deserialize(d)? {
        None => Ok(None),
        Some(Strict(Value::Object(m))) => Ok(Some(m)),
        Some(Strict(other)) => Err(de::Error::custom(format_args!("invalid type: {}, expected a map", kind(&other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "sequence",
        Value::Object(_) => "map",
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_key_repeated_at_any_depth_is_refused_and_the_rest_reads_as_serde_json_does() {
        let text = r#"{"a": [1, -2, 3.5, true, null, "x", {"b": {}}], "c": {"d": "e"}}"#;
        let Strict(v) = serde_json::from_str(text).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(v, json!({"a": [1, -2, 3.5, true, null, "x", {"b": {}}], "c": {"d": "e"}}));
        for repeated in [r#"{"k": 1, "k": 2}"#, r#"{"c": {"d": "e", "d": "f"}}"#, r#"[{"x": 1, "y": 2, "x": 3}]"#] {
            let e = serde_json::from_str::<Strict>(repeated).unwrap_err();
            assert!(e.is_data() && e.to_string().starts_with("duplicate field"), "{repeated}: {e}");
        }
    }
}
