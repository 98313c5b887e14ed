//! Each carrier's account credential, validated field by field when it enters the system.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Carrier, Secret, WipedJson};

#[derive(Clone, Debug)]
pub struct AuthPair {
    pub auth_id: String,
    pub auth_token: Secret,
}

#[derive(Clone, Debug)]
pub struct TwilioCredential {
    pub account_sid: String,
    pub auth_token: Secret,
}

#[derive(Clone, Debug)]
pub struct ExotelCredential {
    pub api_key: String,
    pub api_token: Secret,
    pub account_sid: String,
    pub subdomain: String,
}

#[derive(Clone, Debug)]
pub struct TelnyxCredential {
    pub api_key: Secret,
    pub public_key: ed25519_dalek::VerifyingKey,
}

#[derive(Clone, Debug)]
pub enum PhoneCredential {
    Plivo(AuthPair),
    Vobiz(AuthPair),
    Twilio(TwilioCredential),
    Exotel(ExotelCredential),
    Telnyx(TelnyxCredential),
}

/// A credential field that is missing or malformed; the message names the field, never its value.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct CredentialError {
    pub field: &'static str,
    pub problem: &'static str,
}

fn err(field: &'static str, problem: &'static str) -> CredentialError {
    CredentialError { field, problem }
}

fn text(obj: &Map<String, Value>, field: &'static str) -> Result<String, CredentialError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(err(field, "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(err(field, "must not be empty")),
        Some(Value::String(s)) if s.len() > 512 => Err(err(field, "is too long")),
        // Every field goes into a header or a URL of the carrier's API, where it cannot be
        // sent: refused here, not blamed on the carrier when it is first used.
        Some(Value::String(s)) if s.trim().chars().any(char::is_control) => {
            Err(err(field, "must not contain control characters"))
        }
        Some(Value::String(s)) => Ok(s.trim().to_owned()),
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub const EXOTEL_DEFAULT_SUBDOMAIN: &str = "api.exotel.com";

impl PhoneCredential {
    /// [`parse`](Self::parse) for a credential a client gives, which may hold only the
    /// carrier's fields: one misspelt (`authToken`) or meant for another carrier would be
    /// dropped without a word. What the vault opens is parsed as sealed.
    pub fn parse_given(carrier: Carrier, value: &Value) -> Result<Self, CredentialError> {
        let (known, only): (&[&str], &'static str) = match carrier {
            Carrier::Plivo | Carrier::Vobiz => (&["auth_id", "auth_token"], "takes only auth_id and auth_token"),
            Carrier::Twilio => (&["account_sid", "auth_token"], "takes only account_sid and auth_token"),
            Carrier::Exotel => (
                &["api_key", "api_token", "account_sid", "subdomain"],
                "takes only api_key, api_token, account_sid and subdomain",
            ),
            Carrier::Telnyx => (&["api_key", "public_key"], "takes only api_key and public_key"),
        };
        let owned;
        let obj = match value {
            Value::String(s) => {
                owned = serde_json::from_str::<Value>(s).ok().map(WipedJson);
                owned.as_ref().and_then(|o| o.0.as_object())
            }
            other => other.as_object(),
        };
        if obj.into_iter().flat_map(|o| o.keys()).any(|k| !known.contains(&k.as_str())) {
            // Not named: it is the client's text, and may be a secret pasted in the wrong place.
            return Err(err("credentials", only));
        }
        Self::parse(carrier, value)
    }

    /// Accepts the credential object, or the same object serialized in a JSON string (the
    /// shape `POST /byok {"api_key": "{...}"}` carries).
    pub fn parse(carrier: Carrier, value: &Value) -> Result<Self, CredentialError> {
        let owned;
        let obj = match value {
            Value::Object(o) => o,
            Value::String(s) => {
                owned = WipedJson(
                    serde_json::from_str::<Value>(s).map_err(|_| err("credentials", "must be a JSON object"))?,
                );
                owned.0.as_object().ok_or(err("credentials", "must be a JSON object"))?
            }
            _ => return Err(err("credentials", "must be a JSON object")),
        };
        Ok(match carrier {
            Carrier::Plivo | Carrier::Vobiz => {
                let pair =
                    AuthPair { auth_id: text(obj, "auth_id")?, auth_token: Secret::new(text(obj, "auth_token")?) };
                if !pair.auth_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                    return Err(err("auth_id", "must be letters, digits, '_' or '-'"));
                }
                if carrier == Carrier::Plivo {
                    PhoneCredential::Plivo(pair)
                } else {
                    PhoneCredential::Vobiz(pair)
                }
            }
            Carrier::Twilio => {
                let account_sid = text(obj, "account_sid")?;
                if !(account_sid.len() == 34 && account_sid.starts_with("AC") && is_hex(&account_sid[2..])) {
                    return Err(err("account_sid", "must be AC followed by 32 hex digits"));
                }
                PhoneCredential::Twilio(TwilioCredential {
                    account_sid,
                    auth_token: Secret::new(text(obj, "auth_token")?),
                })
            }
            Carrier::Exotel => {
                let subdomain = match obj.get("subdomain") {
                    None | Some(Value::Null) => EXOTEL_DEFAULT_SUBDOMAIN.to_owned(),
                    Some(_) => text(obj, "subdomain")?,
                };
                // The credential travels to this host: only Exotel's own, never an address a
                // tenant picks inside the gateway's network.
                let subdomain = subdomain.to_ascii_lowercase();
                let exotel = [".exotel.com", ".exotel.in"].iter().any(|d| subdomain.ends_with(d));
                if !subdomain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                    || !exotel
                    || subdomain.split('.').any(str::is_empty)
                {
                    return Err(err(
                        "subdomain",
                        "must be an Exotel API host such as api.exotel.com or api.in.exotel.com",
                    ));
                }
                let account_sid = text(obj, "account_sid")?;
                if !account_sid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                    return Err(err("account_sid", "must be letters, digits, '_' or '-'"));
                }
                PhoneCredential::Exotel(ExotelCredential {
                    api_key: text(obj, "api_key")?,
                    api_token: Secret::new(text(obj, "api_token")?),
                    account_sid,
                    subdomain,
                })
            }
            Carrier::Telnyx => {
                let api_key = Secret::new(text(obj, "api_key")?);
                let raw = B64
                    .decode(text(obj, "public_key")?)
                    .map_err(|_| err("public_key", "must be base64 of a 32-byte Ed25519 public key"))?;
                let bytes: [u8; 32] =
                    raw.try_into().map_err(|_| err("public_key", "must be base64 of a 32-byte Ed25519 public key"))?;
                let public_key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map_err(|_| err("public_key", "is not a valid Ed25519 public key"))?;
                // Anyone can sign for a key of small order; webhooks verify with `TelnyxKey`,
                // which refuses one too, so such a number could never be verified.
                if public_key.is_weak() {
                    return Err(err("public_key", "is a key of small order, which anyone can sign for"));
                }
                PhoneCredential::Telnyx(TelnyxCredential { api_key, public_key })
            }
        })
    }

    pub fn carrier(&self) -> Carrier {
        match self {
            PhoneCredential::Plivo(_) => Carrier::Plivo,
            PhoneCredential::Vobiz(_) => Carrier::Vobiz,
            PhoneCredential::Twilio(_) => Carrier::Twilio,
            PhoneCredential::Exotel(_) => Carrier::Exotel,
            PhoneCredential::Telnyx(_) => Carrier::Telnyx,
        }
    }

    /// The non-secret account identifier shown in listings instead of a hint.
    pub fn identifier(&self) -> Option<&str> {
        match self {
            PhoneCredential::Plivo(p) | PhoneCredential::Vobiz(p) => Some(&p.auth_id),
            PhoneCredential::Twilio(t) => Some(&t.account_sid),
            PhoneCredential::Exotel(e) => Some(&e.account_sid),
            PhoneCredential::Telnyx(_) => None,
        }
    }

    /// The plaintext that the vault seals: the canonical JSON of every field.
    pub fn to_sealed_json(&self) -> Secret {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Out<'a> {
            Pair { auth_id: &'a str, auth_token: &'a str },
            Twilio { account_sid: &'a str, auth_token: &'a str },
            Exotel { api_key: &'a str, api_token: &'a str, account_sid: &'a str, subdomain: &'a str },
            Telnyx { api_key: &'a str, public_key: String },
        }
        let out = match self {
            PhoneCredential::Plivo(p) | PhoneCredential::Vobiz(p) => {
                Out::Pair { auth_id: &p.auth_id, auth_token: p.auth_token.expose() }
            }
            PhoneCredential::Twilio(t) => {
                Out::Twilio { account_sid: &t.account_sid, auth_token: t.auth_token.expose() }
            }
            PhoneCredential::Exotel(e) => Out::Exotel {
                api_key: &e.api_key,
                api_token: e.api_token.expose(),
                account_sid: &e.account_sid,
                subdomain: &e.subdomain,
            },
            PhoneCredential::Telnyx(t) => {
                Out::Telnyx { api_key: t.api_key.expose(), public_key: B64.encode(t.public_key.as_bytes()) }
            }
        };
        Secret::new(serde_json::to_string(&out).expect("credential JSON always serializes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_given_credential_holds_only_its_carriers_fields() {
        let tw = json!({"account_sid": format!("AC{}", "0".repeat(32)), "auth_token": "t0ken-0123456789"});
        assert!(PhoneCredential::parse_given(Carrier::Twilio, &tw).is_ok());
        let mut extra = tw.clone();
        extra["authToken"] = json!("pasted-secret-here");
        let e = PhoneCredential::parse_given(Carrier::Twilio, &extra).unwrap_err();
        assert_eq!(e.to_string(), "credentials: takes only account_sid and auth_token");
        let as_text = json!(extra.to_string());
        assert!(PhoneCredential::parse_given(Carrier::Twilio, &as_text).is_err(), "the same, as a JSON string");
        // What the vault sealed before is opened as it is.
        assert!(PhoneCredential::parse(Carrier::Twilio, &extra).is_ok());
        let ex = json!({"api_key": "k", "api_token": "t", "account_sid": "acme", "subdomain": "api.in.exotel.com"});
        assert!(PhoneCredential::parse_given(Carrier::Exotel, &ex).is_ok());
        let plivo = json!({"auth_id": "MAXXXX", "auth_token": "t", "public_key": "x"});
        assert_eq!(
            PhoneCredential::parse_given(Carrier::Plivo, &plivo).unwrap_err().to_string(),
            "credentials: takes only auth_id and auth_token"
        );
    }

    #[test]
    fn each_shape_parses_and_names_the_bad_field() {
        let tw = json!({"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": "tok"});
        assert!(matches!(PhoneCredential::parse(Carrier::Twilio, &tw), Ok(PhoneCredential::Twilio(_))));
        let bad = json!({"account_sid": "AC12", "auth_token": "tok"});
        assert_eq!(PhoneCredential::parse(Carrier::Twilio, &bad).unwrap_err().field, "account_sid");
        let missing = json!({"auth_id": "MA123"});
        assert_eq!(PhoneCredential::parse(Carrier::Plivo, &missing).unwrap_err().field, "auth_token");
        let tx = json!({"api_key": "KEY", "public_key": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="});
        assert!(PhoneCredential::parse(Carrier::Telnyx, &tx).is_ok());
        let tx_bad = json!({"api_key": "KEY", "public_key": "AAAA"});
        assert_eq!(PhoneCredential::parse(Carrier::Telnyx, &tx_bad).unwrap_err().field, "public_key");
        // The identity point: a valid encoding, of order 1.
        let tx_weak = json!({"api_key": "KEY", "public_key": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="});
        let e = PhoneCredential::parse(Carrier::Telnyx, &tx_weak).unwrap_err();
        assert_eq!((e.field, e.problem), ("public_key", "is a key of small order, which anyone can sign for"));
        let ex = json!({"api_key": "k", "api_token": "t", "account_sid": "acme1"});
        match PhoneCredential::parse(Carrier::Exotel, &ex).unwrap() {
            PhoneCredential::Exotel(e) => assert_eq!(e.subdomain, "api.exotel.com"),
            _ => panic!("wrong carrier"),
        }
        let as_string = Value::String(tw.to_string());
        assert!(PhoneCredential::parse(Carrier::Twilio, &as_string).is_ok());
    }

    #[test]
    fn a_field_with_a_control_character_is_refused_when_set() {
        let vb = json!({"auth_id": "VB1", "auth_token": "AUDITTOKEN\u{1}ctl"});
        let e = PhoneCredential::parse(Carrier::Vobiz, &vb).unwrap_err();
        assert_eq!((e.field, e.problem), ("auth_token", "must not contain control characters"));
        let tx = json!({"api_key": "K\nEY", "public_key": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="});
        assert_eq!(PhoneCredential::parse(Carrier::Telnyx, &tx).unwrap_err().field, "api_key");
    }

    #[test]
    fn an_exotel_credential_names_only_an_exotel_host() {
        let with = |host: &str| json!({"api_key": "k", "api_token": "t", "account_sid": "acme1", "subdomain": host});
        for good in ["api.exotel.com", "api.in.exotel.com", "API.IN.EXOTEL.COM", "ccm-api.exotel.in"] {
            assert!(PhoneCredential::parse(Carrier::Exotel, &with(good)).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.2",
            "10.255.255.1",
            "169.254.169.254",
            "evil.example",
            "exotel.com.evil.example",
            "api..exotel.com",
            ".exotel.com",
        ] {
            assert_eq!(PhoneCredential::parse(Carrier::Exotel, &with(bad)).unwrap_err().field, "subdomain", "{bad}");
        }
    }

    #[test]
    fn sealed_json_round_trips() {
        let tw = json!({"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": "tok-value-xyz"});
        let c = PhoneCredential::parse(Carrier::Twilio, &tw).unwrap();
        let again: Value = serde_json::from_str(c.to_sealed_json().expose()).unwrap();
        assert!(PhoneCredential::parse(Carrier::Twilio, &again).is_ok());
        assert!(!format!("{c:?}").contains("tok-value-xyz"));
    }
}
