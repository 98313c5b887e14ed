//! What the store keeps. These are storage shapes, separate from the API's request and
//! response types, so either can change without the other.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{ApiKeyId, Carrier, EventId, OrgId, PhoneId, SecretId, E164};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrgRecord {
    pub id: OrgId,
    pub name: String,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub org_id: OrgId,
    /// SHA-256 of the key; the key itself is shown once and never stored.
    #[serde(with = "hex_bytes")]
    pub hash: [u8; 32],
    pub created_at_ms: i64,
}

/// A secret sealed by the vault: the store sees only ciphertext.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretRecord {
    pub id: SecretId,
    pub org_id: OrgId,
    pub provider: String,
    pub label: Option<String>,
    pub hint: Option<String>,
    /// Non-secret account identifier of phone credentials (account_sid, auth_id).
    pub identifier: Option<String>,
    pub sealed: Sealed,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Set once the secret has been replaced but still verifies webhooks until then.
    pub retired_until_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sealed {
    pub master_key_id: String,
    #[serde(with = "hex_bytes_vec")]
    pub wrapped_dek: Vec<u8>,
    #[serde(with = "hex_bytes_vec")]
    pub dek_nonce: Vec<u8>,
    #[serde(with = "hex_bytes_vec")]
    pub nonce: Vec<u8>,
    #[serde(with = "hex_bytes_vec")]
    pub ciphertext: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditRecord {
    pub org_id: OrgId,
    pub key_id: Option<ApiKeyId>,
    pub action: String,
    pub provider: String,
    pub at_ms: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhoneConfig {
    /// SHA-256 of the token: enough to compare, useless to a reader of the data dir.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex32")]
    pub exotel_webhook_token_sha256: Option<[u8; 32]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assistant_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_url: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PreviousCredential {
    pub secret_id: SecretId,
    pub valid_until_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhoneRecord {
    pub id: PhoneId,
    pub org_id: OrgId,
    pub provider: Carrier,
    pub number: E164,
    pub provider_number_id: String,
    pub friendly_name: Option<String>,
    pub label: Option<String>,
    pub config: PhoneConfig,
    pub credential: SecretId,
    pub previous_credential: Option<PreviousCredential>,
    pub billing_status: String,
    pub monthly_cost_cents: i64,
    pub provider_configuration: Option<Value>,
    /// The carrier-side application the number is attached to (Telnyx connection_id).
    #[serde(default)]
    pub connection_id: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifiedBy {
    pub scheme: String,
    /// "current" or "previous" (inside the rotation grace).
    pub credential: String,
    pub secret_id: Option<SecretId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: EventId,
    pub org_id: OrgId,
    pub phone_id: PhoneId,
    pub provider: Carrier,
    pub kind: String,
    pub call_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub direction: Option<String>,
    pub status: Option<String>,
    pub received_at: String,
    pub received_at_ms: i64,
    pub verified_by: VerifiedBy,
    /// The carrier's fields (or Telnyx's body) as JSON text, embedded as is when the event is
    /// encoded; `null` while `form` holds them.
    pub params: Box<serde_json::value::RawValue>,
    /// A form carrier's fields as they arrived (`carriers::params::as_received`), kept instead
    /// of their JSON, which is made when the event is read out. Stored after the event's JSON,
    /// not in it (`store::encode_event`).
    #[serde(skip)]
    pub form: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Value>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
    Dead,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    pub at_ms: i64,
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub event_id: EventId,
    pub org_id: OrgId,
    /// The call whose events are handed on in order, `carrier:call id`; an event of no call is
    /// its own call, and its key is its id.
    pub call_key: String,
    pub state: DeliveryState,
    pub attempts: Vec<DeliveryAttempt>,
    pub next_attempt_ms: i64,
    /// When the event was recorded, or last queued again by an operator.
    pub created_at_ms: i64,
    /// When the first attempt since `created_at_ms` was made: the horizon counts from it, so
    /// an event that waited untried (behind its call's earlier events, parked, held by the
    /// breaker) still gets every retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_tried_ms: Option<i64>,
}

impl DeliveryRecord {
    /// The call `ev` belongs to, `org:carrier:call id`; empty for an event of no call, which
    /// the store makes a call of its own, keyed by its id once it has one. The organization is
    /// part of it: a call's events wait for each other's delivery, and an organization that
    /// sent an event with another's call id would otherwise hold up that one's deliveries.
    pub fn call_key_of(ev: &EventRecord) -> String {
        // Joined rather than `format!`ted: this runs for every event, and the formatting
        // machinery cost ten times the copy.
        ev.call_id
            .as_deref()
            .map_or_else(String::new, |call| [ev.org_id.as_str(), ev.provider.as_str(), call].join(":"))
    }

    /// The record every event's hand-off starts from: pending, due when the event arrived. The
    /// store keeps it with the event by making it from the event when read, not as bytes, so
    /// `ev` holds its assigned id, which is the call key of an event of no call.
    pub fn first(ev: &EventRecord) -> Self {
        DeliveryRecord {
            event_id: ev.id.clone(),
            org_id: ev.org_id.clone(),
            call_key: if ev.call_id.is_some() { Self::call_key_of(ev) } else { ev.id.as_str().to_owned() },
            state: DeliveryState::Pending,
            attempts: Vec::new(),
            next_attempt_ms: ev.received_at_ms,
            created_at_ms: ev.received_at_ms,
            first_tried_ms: None,
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

mod opt_hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else { return Ok(None) };
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into().map(Some).map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

mod hex_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
