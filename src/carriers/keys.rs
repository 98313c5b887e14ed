//! Credentials prepared for verification (HMAC states keyed once, Ed25519 keys decoded once,
//! Telnyx's API key for answering calls), cached per secret id so the hot path neither decrypts
//! nor re-keys. Secret ids are never reused, so an entry cannot go stale; clearing exists to
//! drop key material promptly (secrets zeroize on drop).

use std::sync::Arc;

use dashmap::DashMap;

use super::plivo::signature::PlivoKey;
use super::telnyx::signature::TelnyxKey;
use super::twilio::signature::TwilioKey;
use super::vobiz::signature::VobizKey;
use crate::domain::{PhoneCredential, Secret, SecretId};

pub enum Prepared {
    Plivo(PlivoKey),
    Vobiz(VobizKey),
    Twilio(TwilioKey),
    /// The webhook key, and the API key that answers the account's calls (Call Control).
    Telnyx {
        key: TelnyxKey,
        api_key: Secret,
    },
    Exotel,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared([redacted])")
    }
}

impl Prepared {
    pub fn from_credential(cred: &PhoneCredential) -> Option<Prepared> {
        Some(match cred {
            PhoneCredential::Plivo(p) => Prepared::Plivo(PlivoKey::new(p.auth_token.expose().as_bytes())),
            PhoneCredential::Vobiz(p) => Prepared::Vobiz(VobizKey::new(p.auth_token.expose().as_bytes())),
            PhoneCredential::Twilio(t) => Prepared::Twilio(TwilioKey::new(t.auth_token.expose().as_bytes())),
            PhoneCredential::Telnyx(t) => Prepared::Telnyx {
                key: TelnyxKey::from_bytes(t.public_key.as_bytes()).ok()?,
                api_key: t.api_key.clone(),
            },
            PhoneCredential::Exotel(_) => Prepared::Exotel,
        })
    }
}

#[derive(Default)]
pub struct KeyCache {
    map: DashMap<SecretId, Arc<Prepared>>,
}

impl KeyCache {
    pub fn get(&self, id: &SecretId) -> Option<Arc<Prepared>> {
        self.map.get(id).map(|e| Arc::clone(e.value()))
    }

    pub fn insert(&self, id: SecretId, p: Prepared) -> Arc<Prepared> {
        let p = Arc::new(p);
        if self.map.len() < 100_000 {
            self.map.insert(id, Arc::clone(&p));
        }
        p
    }

    pub fn invalidate_all(&self) {
        self.map.clear();
    }
}
