//! A string that must never reach a log line, an error message or a response.

use std::fmt;

use zeroize::Zeroizing;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `...AbCd`: enough for a person to tell two keys apart, too little to use. Short secrets
    /// get no hint at all, since four characters of eight is half the secret.
    pub fn hint(&self) -> Option<String> {
        self.hint_after(None)
    }

    /// [`Self::hint`] led by the provider's published key prefix (`sk-ant-...AbCd`) when the
    /// secret starts with it. Nothing else of the head is shown: where a key's first dash falls
    /// is no sign of where its public part ends, and six characters before it were most of a
    /// short key.
    pub fn hint_after(&self, public_prefix: Option<&str>) -> Option<String> {
        let s = self.expose();
        let prefix = public_prefix.filter(|p| s.starts_with(p)).unwrap_or("");
        let secret = &s[prefix.len()..];
        if secret.chars().count() < 12 {
            return None;
        }
        let tail_at = secret.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
        Some(format!("{prefix}...{}", &secret[tail_at..]))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// A JSON value that may hold secrets (a credential as sealed, or as a client sent it inside a
/// string): every string in it is zeroized when it is dropped, as `Secret`'s are, so that the
/// copies made while reading it do not outlive it in freed memory.
pub struct WipedJson(pub serde_json::Value);

impl Drop for WipedJson {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

fn wipe(v: &mut serde_json::Value) {
    use serde_json::Value;
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe),
        // Keys too: a secret pasted where a field's name goes is one.
        Value::Object(fields) => {
            for (mut name, mut value) in std::mem::take(fields) {
                name.zeroize();
                wipe(&mut value);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_string_of_a_wiped_value_is_zeroized() {
        let mut v = serde_json::json!({"auth_id": "MA1", "auth_token": "tok", "nested": [{"k": "v"}, 1, null]});
        wipe(&mut v);
        assert_eq!(v, serde_json::json!({}));
        let mut v = serde_json::json!(["tok", [{"k": "v"}, 1, null]]);
        wipe(&mut v);
        assert_eq!(v, serde_json::json!(["", [{}, 1, null]]));
    }

    #[test]
    fn debug_is_redacted_and_hints_are_short() {
        let s = Secret::new("sk-proj-abcdefghijklmnopAbCd".into());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(s.hint_after(Some("sk-")).as_deref(), Some("sk-...AbCd"));
        assert_eq!(s.hint().as_deref(), Some("...AbCd"));
        assert_eq!(s.hint_after(Some("sk-ant-")).as_deref(), Some("...AbCd"), "not its prefix");
        assert_eq!(Secret::new("short".into()).hint(), None);
        assert_eq!(Secret::new("abcdefghijklmnop".into()).hint().as_deref(), Some("...mnop"));
        // Only the published prefix leads: the head before a dash is the secret's own.
        assert_eq!(Secret::new("abcdefgh-ijklmn".into()).hint().as_deref(), Some("...klmn"));
        // Twelve characters beyond the prefix, or none shown.
        assert_eq!(Secret::new("sk-ant-abcdefghijk".into()).hint_after(Some("sk-ant-")), None);
        assert_eq!(
            Secret::new("sk-ant-ñbcdefghijkl".into()).hint_after(Some("sk-ant-")).as_deref(),
            Some("sk-ant-...ijkl")
        );
        assert_eq!(Secret::new("ééééééééééééé".into()).hint().as_deref(), Some("...éééé"));
    }
}
