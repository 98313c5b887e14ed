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

    /// `sk-...AbCd`: enough for a person to tell two keys apart, too little to use. Short
    /// secrets get no hint at all, since four characters of eight is half the secret.
    pub fn hint(&self) -> Option<String> {
        let s = self.expose();
        if s.chars().count() < 12 {
            return None;
        }
        let tail: String = s.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
        let head: String = s.chars().take_while(|c| *c != '-').take(6).collect();
        if s.contains('-') && head.len() < s.len() - 4 {
            Some(format!("{head}-...{tail}"))
        } else {
            Some(format!("...{tail}"))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_hints_are_short() {
        let s = Secret::new("sk-proj-abcdefghijklmnopAbCd".into());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(s.hint().as_deref(), Some("sk-...AbCd"));
        assert_eq!(Secret::new("short".into()).hint(), None);
        assert_eq!(Secret::new("abcdefghijklmnop".into()).hint().as_deref(), Some("...mnop"));
    }
}
