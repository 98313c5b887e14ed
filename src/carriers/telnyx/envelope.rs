//! The few fields of a Telnyx event the gateway reads, taken from the body in one pass without
//! building a tree of it. A field of another type than expected reads as absent, as it did when
//! the body was looked up as a `serde_json::Value`; the body itself is stored as received.
//!
//! The same pass decodes every other key and value as a tree parse would (see
//! `params::readable`), so a body it reads is one a stored event can be read back from: the
//! check and the read are one walk over the body, not two.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::carriers::params::{nests_too_deep, Key, Readable};

#[derive(Debug, Default)]
pub struct Envelope {
    pub data: Data,
    /// The body itself, checked and ready to be stored as the event's params.
    pub body: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Data {
    pub id: Option<String>,
    pub event_type: Option<String>,
    pub payload: Payload,
}

#[derive(Debug, Default, PartialEq)]
pub struct Payload {
    pub direction: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub connection_id: Option<String>,
    pub call_control_id: Option<String>,
    pub state: Option<String>,
    pub hangup_cause: Option<String>,
}

/// Reads an object key by key: `field` takes the value of a key it knows (and says so), every
/// other value is visited as [`Readable`]. A key seen twice is an error, as it is for a derived
/// read; the caller then reads the body as a tree, where the last one counts.
fn read_object<'de, A: MapAccess<'de>>(
    mut map: A,
    known: &[&str],
    mut field: impl FnMut(usize, &mut A) -> Result<(), A::Error>,
) -> Result<(), A::Error> {
    let mut seen = 0u32;
    while let Some(known_as) = map.next_key_seed(FieldOf(known))? {
        match known_as {
            Some(i) => {
                if seen & (1 << i) != 0 {
                    return Err(de::Error::custom("duplicate field"));
                }
                seen |= 1 << i;
                field(i, &mut map)?;
            }
            None => {
                map.next_value::<Readable>()?;
            }
        }
    }
    Ok(())
}

/// An object key, decoded (and so checked) like any string, and looked up in the known names
/// without being kept.
struct FieldOf<'a>(&'a [&'a str]);

impl<'de> de::DeserializeSeed<'de> for FieldOf<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldOf<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|k| *k == v))
    }
}

/// The visitor of an object type `T` read with [`read_object`].
struct ObjectOf<T>(std::marker::PhantomData<T>);

/// A type read from a JSON object by [`read_object`].
trait FromObject: Default {
    const FIELDS: &'static [&'static str];
    fn field<'de, A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error>;
}

impl<'de, T: FromObject> Visitor<'de> for ObjectOf<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let mut out = T::default();
        read_object(map, T::FIELDS, |i, map| out.field(i, map))?;
        Ok(out)
    }
}

fn object<'de, T: FromObject, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_map(ObjectOf(std::marker::PhantomData))
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object(d)
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object(d)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        object(d)
    }
}

/// A field's value as [`text`] reads it.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d).map(Text)
    }
}

impl FromObject for Envelope {
    const FIELDS: &'static [&'static str] = &["data"];

    fn field<'de, A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.data = map.next_value()?;
        Ok(())
    }
}

impl FromObject for Data {
    const FIELDS: &'static [&'static str] = &["id", "event_type", "payload"];

    fn field<'de, A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        match i {
            0 => self.id = map.next_value::<Text>()?.0,
            1 => self.event_type = map.next_value::<Text>()?.0,
            _ => self.payload = map.next_value()?,
        }
        Ok(())
    }
}

impl FromObject for Payload {
    const FIELDS: &'static [&'static str] =
        &["direction", "from", "to", "connection_id", "call_control_id", "state", "hangup_cause"];

    fn field<'de, A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        let v = map.next_value::<Text>()?.0;
        match i {
            0 => self.direction = v,
            1 => self.from = v,
            2 => self.to = v,
            3 => self.connection_id = v,
            4 => self.call_control_id = v,
            5 => self.state = v,
            _ => self.hangup_cause = v,
        }
        Ok(())
    }
}

impl Envelope {
    /// `None` when the body is not JSON a stored event could be read back from (see
    /// `params::readable`). A JSON body of another shape (say `data` a string) reads as an event with no fields.
    pub fn read(body: &[u8]) -> Option<Envelope> {
        let raw = serde_json::from_slice::<Box<serde_json::value::RawValue>>(body).ok()?;
        if nests_too_deep(raw.get().as_bytes()) {
            return None;
        }
        // The typed read decodes every key and value on its way, so a body it reads is
        // readable. What it refuses (a repeated key, `data` of another type, or a body that is
        // not readable) is read as a tree, as every body once was: that parse is the very
        // test of readability (the depth is checked above), so both ways agree on every input.
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
            while seq.next_element::<Readable>()?.is_some() {}
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<Key, Readable>()?.is_some() {}
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

    /// What every body once got: refused unless a tree parse reads it back, else its fields
    /// looked up in the tree.
    fn as_a_tree(body: &[u8]) -> Option<Data> {
        let raw = crate::carriers::params::readable_json(body)?;
        Some(Envelope::from_tree(&serde_json::from_str::<Value>(raw.get()).unwrap()).data)
    }

    #[test]
    fn the_one_pass_read_agrees_with_a_tree_on_every_odd_body() {
        let bodies: &[&[u8]] = &[
            br#"{"data":{"id":"a","event_type":"call.hangup","payload":{"to":"+1","from":"+2","x":[1,{"y":null}]}},"meta":{"attempt":1}}"#,
            br#"{"data":{"payload":{"t\u006f":"+1","st\u0061te":"parked"}}}"#,
            br#"{"data":{"id":"a","id":"b"}}"#,
            br#"{"data":1,"data":{"id":"x"}}"#,
            br#"{"meta":1,"meta":2,"data":{"payload":{"z":1,"z":2,"to":"+1"}}}"#,
            br#"{"data":null}"#,
            // A derived read took an array for a struct, field by field; a tree has no fields.
            br#"{"data":["a","call.hangup",{"to":"+1"}]}"#,
            br#"{"data":{"payload":"x"}}"#,
            br#"[{"data":{"id":"a"}}]"#,
            br#""text""#,
            br#"{"data":{"payload":{"to":1e400}}}"#,
            br#"{"data":{"payload":{"to":[1e400]}}}"#,
            br#"{"data":{"payload":{"from":{"k":"\ud800"}}}}"#,
            br#"{"data":{"payload":{"to":"\ud83d\ude00"}}}"#,
            br#"{"data":{"id":"\uZZZZ"}}"#,
            b"{\"data\":{\"payload\":{\"to\":\"+1\",\"\xff\":1}}}",
            b"{\"data\":{\"id\":\"\xc3\x28\"}}",
            b"{\"data\":{\"event_type\":[\"\xe2\x82\"]}}",
            br#"{"data":{"payload":{"to":"+1"}},"data2":18446744073709551616}"#,
            br#"{"data":{"payload":{"to":"+1","x":"\uZZZZ"}}}"#,
            b"{\"data\":{\"record_type\":\"\xc3\x28\"}}",
            br#"{"data":{"x":[1e400]}}"#,
            br#"{"data":{"payload":{"to":"+1"}}} "#,
            br#"{"data":{"payload":{"to":"+1"}}}x"#,
        ];
        for body in bodies {
            let read = Envelope::read(body).map(|e| e.data);
            assert_eq!(read, as_a_tree(body), "{}", String::from_utf8_lossy(body));
        }
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
