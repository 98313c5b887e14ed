//! The few fields of a Telnyx event the gateway reads, taken from the body in one pass without
//! building a tree of it. A field of another type than expected reads as absent, as it did when
//! the body was looked up as a `serde_json::Value`; the body itself is stored as received.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Envelope {
    pub data: Data,
    /// The body itself, checked and ready to be stored as the event's params.
    #[serde(skip)]
    pub body: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Data {
    #[serde(deserialize_with = "text")]
    pub id: Option<String>,
    #[serde(deserialize_with = "text")]
    pub event_type: Option<String>,
    pub payload: Payload,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Payload {
    #[serde(deserialize_with = "text")]
    pub direction: Option<String>,
    #[serde(deserialize_with = "text")]
    pub from: Option<String>,
    #[serde(deserialize_with = "text")]
    pub to: Option<String>,
    #[serde(deserialize_with = "text")]
    pub connection_id: Option<String>,
    #[serde(deserialize_with = "text")]
    pub call_control_id: Option<String>,
    #[serde(deserialize_with = "text")]
    pub state: Option<String>,
    #[serde(deserialize_with = "text")]
    pub hangup_cause: Option<String>,
}

impl Envelope {
    /// `None` when the body is not JSON a stored event could be read back from (see
    /// `params::readable`). A JSON body of another shape (say `data` a string) reads as an event with no fields.
    pub fn read(body: &[u8]) -> Option<Envelope> {
        let raw = crate::carriers::params::readable_json(body)?;
        // What the typed read refuses (a repeated key, `data` of another type) is read as a
        // tree, as every body once was, so both ways agree on every input.
        let mut e = match serde_json::from_str::<Envelope>(raw.get()) {
            Ok(e) => e,
            Err(_) => Envelope::from_tree(&serde_json::from_str::<Value>(raw.get()).ok()?),
        };
        e.body = Some(raw);
        Some(e)
    }

    fn from_tree(v: &Value) -> Envelope {
        let data = &v["data"];
        let p = &data["payload"];
        let s = |x: &Value| x.as_str().map(str::to_owned);
        Envelope {
            data: Data {
                id: s(&data["id"]),
                event_type: s(&data["event_type"]),
                payload: Payload {
                    direction: s(&p["direction"]),
                    from: s(&p["from"]),
                    to: s(&p["to"]),
                    connection_id: s(&p["connection_id"]),
                    call_control_id: s(&p["call_control_id"]),
                    state: s(&p["state"]),
                    hangup_cause: s(&p["hangup_cause"]),
                },
            },
            body: None,
        }
    }
}

/// A string, or nothing for any other JSON value.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;

    impl<'de> Visitor<'de> for Text {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }

    d.deserialize_any(Text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fields_are_read_and_everything_else_skipped() {
        let body = br#"{"data":{"record_type":"event","id":"ev-1","event_type":"call.initiated","payload":{
            "call_control_id":"v3:abc","connection_id":"1494","direction":"incoming","from":"+14155550100",
            "to":"+14152010000","state":"parked","client_state":null,"custom_headers":[{"name":"x","value":"y"}]}},
            "meta":{"attempt":1}}"#;
        let e = Envelope::read(body).unwrap();
        assert_eq!(e.data.id.as_deref(), Some("ev-1"));
        assert_eq!(e.data.event_type.as_deref(), Some("call.initiated"));
        let p = &e.data.payload;
        assert_eq!(
            (p.direction.as_deref(), p.from.as_deref(), p.to.as_deref()),
            (Some("incoming"), Some("+14155550100"), Some("+14152010000"))
        );
        assert_eq!((p.connection_id.as_deref(), p.call_control_id.as_deref()), (Some("1494"), Some("v3:abc")));
        assert_eq!((p.state.as_deref(), p.hangup_cause.as_deref()), (Some("parked"), None));
    }

    #[test]
    fn fields_of_another_type_read_as_absent() {
        let e = Envelope::read(
            br#"{"data":{"id":7,"payload":{"to":{"n":1},"from":[1,[2]],"state":true,"direction":null}}}"#,
        )
        .unwrap();
        let p = &e.data.payload;
        assert_eq!(
            (e.data.id, p.to.as_deref(), p.from.as_deref(), p.state.as_deref(), p.direction.as_deref()),
            (None, None, None, None, None)
        );
    }

    #[test]
    fn json_of_another_shape_has_no_fields_and_other_bytes_are_not_an_event() {
        assert!(Envelope::read(br#"{"data":"x"}"#).unwrap().data.payload.to.is_none());
        // A repeated key: the last one counts, as in a tree.
        let twice = br#"{"data":{"id":"a","id":"b","payload":{"to":"+1","to":"+2"}}}"#;
        let e = Envelope::read(twice).unwrap();
        assert_eq!((e.data.id.as_deref(), e.data.payload.to.as_deref()), (Some("b"), Some("+2")));
        assert!(Envelope::read(b"[1,2]").unwrap().data.event_type.is_none());
        assert!(Envelope::read(b"{\"data\":").is_none());
        assert!(Envelope::read(b"not json").is_none());
        let deep = format!(r#"{{"data":{{"payload":{{"to":"+1415","x":{}{}}}}}}}"#, "[".repeat(200), "]".repeat(200));
        assert!(Envelope::read(deep.as_bytes()).is_none());
        // Found by the fuzzer: an ignored field is only skipped by the typed read, so its bad
        // UTF-8 (or number, or escape) must still refuse the body, as a tree parse did.
        assert!(Envelope::read(b"{\"data\":{\"event_type\":\"call.hangup\"},\"meta\":{\"a\xf4t\":1}}").is_none());
        assert!(Envelope::read(br#"{"data":{"event_type":"call.hangup"},"meta":{"n":1e400}}"#).is_none());
    }
}
