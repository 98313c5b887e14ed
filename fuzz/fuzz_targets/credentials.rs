//! Credential validation: `PhoneCredential::parse` for every carrier and `vault::validate` for
//! every catalog provider, on arbitrary JSON (what `POST /byok` and `POST /phones` accept).
//!
//! Input: the JSON document itself (parsed with `serde_json::from_slice`). The same bytes are
//! also tried as a JSON *string* value, the shape an API key (or a credential object
//! serialized into a string) arrives in.
//!
//! Oracles: a parsed credential is of the requested carrier, its sealed JSON parses back to
//! the same sealed JSON, and it always yields verification keys; `validate` agrees with
//! `PhoneCredential::parse` for carriers, and for API keys stores the trimmed key with a hint
//! that gives away at most its last four characters.
#![no_main]

use callgate::carriers::Prepared;
use callgate::domain::{Carrier, PhoneCredential, Secret};
use callgate::vault::{self, catalog};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn check_phone(carrier: Carrier, value: &Value) {
    let Ok(cred) = PhoneCredential::parse(carrier, value) else { return };
    assert_eq!(cred.carrier(), carrier);
    assert_eq!(cred.identifier().is_some(), carrier != Carrier::Telnyx);
    assert!(Prepared::from_credential(&cred).is_some(), "a valid credential must give verification keys");
    let sealed = cred.to_sealed_json();
    let as_value: Value = serde_json::from_str(sealed.expose()).expect("sealed JSON is JSON");
    for again in [as_value, Value::String(sealed.expose().to_owned())] {
        let back = PhoneCredential::parse(carrier, &again).expect("sealed JSON parses back");
        assert_eq!(back.to_sealed_json(), sealed, "sealed JSON is not a fixed point");
        assert_eq!(back.identifier(), cred.identifier());
    }
}

/// The last four characters of `s`.
fn last4(s: &str) -> &str {
    &s[s.char_indices().rev().nth(3).map_or(0, |(i, _)| i)..]
}

fn check_hint(s: &str) {
    let secret = Secret::new(s.to_owned());
    // Without a published prefix a hint shows the last four characters and nothing else.
    match secret.hint() {
        None => assert!(s.chars().count() < 12),
        Some(h) => assert_eq!(h, format!("...{}", last4(s))),
    }
}

fn check_validate(value: &Value) {
    for entry in catalog::all() {
        let result = vault::validate(&entry.provider, value);
        if let Ok(carrier) = entry.provider.parse::<Carrier>() {
            assert_eq!(result.is_ok(), PhoneCredential::parse(carrier, value).is_ok());
            if let Ok(new) = result {
                assert!(new.hint.is_none());
                let cred = PhoneCredential::parse(carrier, value).unwrap();
                assert_eq!(new.plaintext, cred.to_sealed_json());
                assert_eq!(new.identifier.as_deref(), cred.identifier());
            }
            continue;
        }
        match result {
            Ok(new) => {
                assert_eq!(new.provider.provider, entry.provider);
                let Value::String(raw) = value else { panic!("{} accepted a non-string key", entry.provider) };
                let key = new.plaintext.expose();
                assert_eq!(key, raw.trim());
                assert!(!key.is_empty() && key.len() <= 4096);
                assert!(!key.chars().any(char::is_control));
                if let Some(prefix) = &entry.key_prefix {
                    assert!(key.starts_with(prefix.as_str()));
                }
                // The published prefix (when the key has it) and the last four characters.
                let prefix = entry.key_prefix.as_deref().filter(|p| key.starts_with(p)).unwrap_or("");
                match &new.hint {
                    None => assert!(key[prefix.len()..].chars().count() < 12),
                    Some(h) => assert_eq!(*h, format!("{prefix}...{}", last4(key))),
                }
            }
            Err(e) => assert_eq!(e.status.as_u16(), 422),
        }
    }
    assert!(vault::validate("no-such-provider", value).is_err());
}

fuzz_target!(|data: &[u8]| {
    let as_string = Value::String(String::from_utf8_lossy(data).into_owned());
    check_hint(as_string.as_str().unwrap());
    for carrier in Carrier::ALL {
        check_phone(carrier, &as_string);
    }
    check_validate(&as_string);

    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    for carrier in Carrier::ALL {
        check_phone(carrier, &value);
    }
    check_validate(&value);
    // Every string inside the document, as an API key.
    if let Value::Object(obj) = &value {
        for v in obj.values().filter(|v| v.is_string()) {
            check_hint(v.as_str().unwrap());
            check_validate(v);
        }
    }
});
