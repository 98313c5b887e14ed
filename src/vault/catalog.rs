//! The providers an organization can keep keys for. The list itself is data
//! (`config/providers.json`); this module only reads it, once.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Model {
    pub id: String,
    pub name: String,
    pub default: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProviderEntry {
    pub provider: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub description: String,
    pub docs_url: String,
    pub key_prefix: Option<String>,
    pub models: Option<Vec<Model>>,
}

impl ProviderEntry {
    pub fn is_phone(&self) -> bool {
        self.kind == "phone"
    }
}

const CATALOG_JSON: &str = include_str!("../../config/providers.json");

pub fn all() -> &'static [ProviderEntry] {
    static CATALOG: OnceLock<Vec<ProviderEntry>> = OnceLock::new();
    CATALOG.get_or_init(|| serde_json::from_str(CATALOG_JSON).expect("config/providers.json is valid"))
}

pub fn find(provider: &str) -> Option<&'static ProviderEntry> {
    all().iter().find(|p| p.provider == provider)
}

pub fn accepted_list() -> String {
    all().iter().map(|p| p.provider.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_every_provider_once() {
        let names: Vec<_> = all().iter().map(|p| p.provider.as_str()).collect();
        assert_eq!(names.len(), 26);
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert_eq!(find("anthropic").unwrap().key_prefix.as_deref(), Some("sk-ant-"));
        for phone in ["vobiz", "twilio", "plivo", "exotel", "telnyx"] {
            assert!(find(phone).unwrap().is_phone());
        }
    }
}
