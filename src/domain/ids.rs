//! Prefixed, time-sortable identifiers (`org_…`, `ph_…`): the prefix makes a pasted id
//! self-describing, and UUIDv7 makes store keys sort by creation time.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("malformed {kind} id")]
pub struct IdError {
    pub kind: &'static str,
}

macro_rules! prefixed_id {
    ($name:ident, $prefix:literal, $kind:literal) => {
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            pub fn parse(s: &str) -> Result<Self, IdError> {
                let rest = s.strip_prefix($prefix).ok_or(IdError { kind: $kind })?;
                if rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(IdError { kind: $kind })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                self.0.as_bytes()
            }
        }
    };
}

prefixed_id!(OrgId, "org_", "organization");
prefixed_id!(ApiKeyId, "key_", "api key");
prefixed_id!(SecretId, "sec_", "secret");
prefixed_id!(PhoneId, "ph_", "phone number");
prefixed_id!(EventId, "evt_", "event");
prefixed_id!(AuditId, "aud_", "audit entry");

impl AuditId {
    /// The entry's UUIDv7, which its store key ends with.
    pub fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::try_parse(&self.0[Self::PREFIX.len()..]).expect("parsed as 32 hex digits")
    }

    pub fn of(uuid: uuid::Uuid) -> Self {
        Self(format!("{}{}", Self::PREFIX, uuid.simple()))
    }
}

impl EventId {
    /// The id of an event not yet recorded: the store gives out the real one.
    pub fn unassigned() -> Self {
        Self::from_value(0)
    }

    /// The id the store gives the event numbered `v`. The writer makes one per event: digits
    /// written straight into an exact-size string, where `format!` and a parse cost a grown
    /// buffer and a second pass.
    pub fn from_value(v: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(Self::PREFIX.len() + 32);
        s.push_str(Self::PREFIX);
        for shift in (0..32).rev() {
            s.push(char::from(DIGITS[((v >> (shift * 4)) & 0xf) as usize]));
        }
        Self(s)
    }

    /// The number [`EventId::from_value`] made this id from.
    pub fn value(&self) -> Option<u128> {
        u128::from_str_radix(self.0.strip_prefix(Self::PREFIX)?, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back_and_sort_by_time() {
        let a = PhoneId::generate();
        let b = PhoneId::generate();
        assert_eq!(PhoneId::parse(a.as_str()).unwrap(), a);
        assert!(a < b);
    }

    #[test]
    fn an_event_id_from_its_value_is_the_formatted_value_and_parses_back() {
        for v in [0u128, 1, 0xabc, u128::MAX, 0x0193_5f2e_8c41_7d00_0000_0000_0000_002a] {
            let id = EventId::from_value(v);
            assert_eq!(id.as_str(), format!("evt_{v:032x}"));
            assert_eq!(EventId::parse(id.as_str()).unwrap(), id);
            assert_eq!(id.value(), Some(v));
        }
        assert_eq!(EventId::unassigned(), EventId::from_value(0));
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in ["", "ph_", "org_0123", "ph_../../etc/passwd", "ph_0123456789ABCDEF0123456789abcdef"] {
            assert!(PhoneId::parse(bad).is_err(), "{bad}");
        }
        assert!(PhoneId::parse(OrgId::generate().as_str()).is_err());
    }
}
