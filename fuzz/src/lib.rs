//! Helpers shared by the fuzz targets: splitting one input into fields, building the
//! request pieces the carrier modules take, and independent reference implementations
//! (plain HMAC over the signed string) used as oracles.
//!
//! Input convention: most targets read their input as newline-separated fields, the last
//! field taking the rest of the input (so bodies may contain newlines). Seeds in
//! `corpus-seed/<target>/` are therefore readable text files.

use std::borrow::Cow;
use std::sync::OnceLock;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use callgate::domain::{Carrier, OrgId, PhoneId, SecretId, E164};
use callgate::store::{PhoneConfig, PhoneRecord, SledStore, Store};
use hmac::{Hmac, Mac};

/// Splits `data` into exactly `n` fields on `\n`; the last field is the rest of the input,
/// missing fields are empty.
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    for _ in 1..n {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => {
                out.push(rest);
                rest = &rest[rest.len()..];
            }
        }
    }
    out.push(rest);
    out
}

/// Bytes as text; invalid UTF-8 is replaced, since every API under test takes `&str`.
pub fn text(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// A header map from `(name, value)` pairs; pairs HTTP could not carry are skipped, exactly as
/// actix would never deliver them. Values keep arbitrary obs-text bytes (to_str() fails on them).
pub fn header_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) else {
            continue;
        };
        h.append(name, value);
    }
    h
}

/// Reference: base64(HMAC-SHA256(key, msg)), computed without callgate's streaming code.
pub fn hmac_sha256_b64(key: &[u8], msg: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(msg);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Reference: base64(HMAC-SHA1(key, msg)).
pub fn hmac_sha1_b64(key: &[u8], msg: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).unwrap();
    mac.update(msg);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether one of the comma-separated, space-trimmed entries of `header` is exactly `sig`.
pub fn header_lists(header: &str, sig: &str) -> bool {
    header.split(',').any(|c| c.trim_matches(' ') == sig)
}

/// A phone record for the carrier hooks' signatures (they do not read it, except Exotel's
/// token hash in `config`).
pub fn phone(carrier: Carrier, number: &str) -> PhoneRecord {
    PhoneRecord {
        id: PhoneId::parse("ph_0190c000000070008000000000000003").unwrap(),
        org_id: OrgId::parse("org_0190c000000070008000000000000001").unwrap(),
        provider: carrier,
        number: E164::parse(number).unwrap(),
        provider_number_id: "PN0001".to_owned(),
        friendly_name: None,
        label: None,
        config: PhoneConfig::default(),
        credential: SecretId::parse("sec_0190c000000070008000000000000002").unwrap(),
        previous_credential: None,
        billing_status: "active".to_owned(),
        monthly_cost_cents: 0,
        provider_configuration: None,
        connection_id: None,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

/// The real store, opened once per process in a fresh directory on tmpfs, holding one Telnyx
/// number attached to connection `1494404757140276705`: what `carriers::telnyx::locate` looks
/// numbers up in. (The real store rather than a stub: the `Store` trait is still growing.)
pub fn telnyx_store() -> &'static SledStore {
    static STORE: OnceLock<SledStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let dir = base.join(format!("callgate-fuzz-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SledStore::open(&dir, callgate::store::JournalOptions::default()).expect("open the fuzz store");
        let mut p = phone(Carrier::Telnyx, TELNYX_NUMBER);
        p.connection_id = Some(TELNYX_CONNECTION.to_owned());
        // The number's own credential goes in with it: the store refuses a number whose
        // credential is not there. Its ciphertext is never opened here.
        let secret = callgate::store::SecretRecord {
            id: p.credential.clone(),
            org_id: p.org_id.clone(),
            provider: "telnyx".to_owned(),
            label: None,
            hint: None,
            identifier: None,
            sealed: callgate::store::Sealed {
                master_key_id: "mk_fuzz".to_owned(),
                wrapped_dek: Vec::new(),
                dek_nonce: Vec::new(),
                nonce: Vec::new(),
                ciphertext: Vec::new(),
            },
            created_at_ms: 0,
            updated_at_ms: 0,
            retired_until_ms: None,
        };
        store.phone_insert(&p, Some(&secret)).expect("store").expect("no conflict");
        store
    })
}

pub const TELNYX_NUMBER: &str = "+13125550199";
pub const TELNYX_CONNECTION: &str = "1494404757140276705";
