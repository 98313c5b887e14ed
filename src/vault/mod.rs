//! Organizations' provider credentials: validated on the way in, sealed at rest, never shown.

pub mod catalog;
pub mod crypto;
pub mod routes;

use serde_json::Value;

use crate::domain::{Carrier, OrgId, PhoneCredential, Secret, SecretId, WipedJson};
use crate::error::ApiError;
use crate::store::SecretRecord;
use catalog::ProviderEntry;
pub use crypto::{Keyring, Owner, VaultError};

/// A secret that passed validation and is ready to be sealed.
pub struct NewSecret {
    pub provider: &'static ProviderEntry,
    pub plaintext: Secret,
    pub hint: Option<String>,
    pub identifier: Option<String>,
    /// A phone carrier's credential as parsed, to use with the carrier before it is sealed.
    pub carrier: Option<PhoneCredential>,
}

/// Checks a credential for `provider`: a phone carrier's JSON shape, or an API key's prefix.
/// Errors name the field, never echo the value.
pub fn validate(provider: &str, value: &Value) -> Result<NewSecret, ApiError> {
    let entry = catalog::find(provider).ok_or_else(|| {
        ApiError::unprocessable("unknown_provider", format!("unknown provider; accepted: {}", catalog::accepted_list()))
    })?;
    if let Ok(carrier) = provider.parse::<Carrier>() {
        let cred = PhoneCredential::parse_given(carrier, value)
            .map_err(|e| ApiError::unprocessable("invalid_credentials", e.to_string()))?;
        return Ok(NewSecret {
            provider: entry,
            plaintext: cred.to_sealed_json(),
            hint: None,
            identifier: cred.identifier().map(str::to_owned),
            carrier: Some(cred),
        });
    }
    let key = match value {
        Value::String(s) if !s.trim().is_empty() => s.trim(),
        Value::String(_) | Value::Null => return Err(ApiError::unprocessable("invalid_field", "api_key: is required")),
        _ => return Err(ApiError::unprocessable("invalid_field", "api_key: must be a string")),
    };
    if key.len() > 4096 {
        return Err(ApiError::unprocessable("invalid_field", "api_key: is too long"));
    }
    // A key is sent in a header as given: a zero-width space pasted along with it would fail
    // at the provider, long after this answer, and show in no hint.
    if key.chars().any(|c| c.is_control() || crate::domain::text::invisible(c)) {
        return Err(ApiError::unprocessable(
            "invalid_field",
            "api_key: must not contain control or invisible formatting characters",
        ));
    }
    if let Some(prefix) = &entry.key_prefix {
        if !key.starts_with(prefix.as_str()) {
            return Err(ApiError::unprocessable(
                "invalid_key_prefix",
                format!("api_key: a {} key starts with {prefix:?}", entry.name),
            ));
        }
    }
    let plaintext = Secret::new(key.to_owned());
    Ok(NewSecret {
        provider: entry,
        hint: plaintext.hint_after(entry.key_prefix.as_deref()),
        plaintext,
        identifier: None,
        carrier: None,
    })
}

pub struct Vault {
    keyring: Keyring,
}

impl Vault {
    pub fn new(keyring: Keyring) -> Self {
        Self { keyring }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub fn seal(&self, org: &OrgId, new: &NewSecret, label: Option<String>, now_ms: i64) -> SecretRecord {
        let id = SecretId::generate();
        let sealed = self
            .keyring
            .seal(&Owner { org, provider: &new.provider.provider, secret: &id }, new.plaintext.expose().as_bytes());
        SecretRecord {
            id,
            org_id: org.clone(),
            provider: new.provider.provider.clone(),
            label,
            hint: new.hint.clone(),
            identifier: new.identifier.clone(),
            sealed,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            retired_until_ms: None,
        }
    }

    pub fn open(&self, rec: &SecretRecord) -> Result<Secret, VaultError> {
        let bytes =
            self.keyring.open(&Owner { org: &rec.org_id, provider: &rec.provider, secret: &rec.id }, &rec.sealed)?;
        String::from_utf8(bytes.to_vec()).map(Secret::new).map_err(|_| VaultError::Open)
    }

    pub fn open_phone(&self, rec: &SecretRecord) -> Result<PhoneCredential, VaultError> {
        let carrier: Carrier = rec.provider.parse().map_err(|_| VaultError::Open)?;
        let text = self.open(rec)?;
        let value = WipedJson(serde_json::from_str(text.expose()).map_err(|_| VaultError::Open)?);
        PhoneCredential::parse(carrier, &value.0).map_err(|_| VaultError::Open)
    }
}
