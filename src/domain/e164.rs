//! Phone numbers in E.164 with a leading `+`, the one form stored and compared.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct E164(String);

#[derive(Debug, thiserror::Error)]
#[error("not an E.164 phone number (expected + followed by 8 to 15 digits)")]
pub struct E164Error;

impl E164 {
    /// Strict: `+` and 8–15 digits, first digit not 0.
    pub fn parse(s: &str) -> Result<Self, E164Error> {
        let digits = s.strip_prefix('+').ok_or(E164Error)?;
        Self::from_digits(digits)
    }

    /// Lenient, for what carriers send: Plivo omits the `+`, some add spaces or dashes.
    pub fn normalize(s: &str) -> Result<Self, E164Error> {
        let trimmed = s.trim();
        let body = trimmed.strip_prefix('+').unwrap_or(trimmed);
        // Built in place: every callback's From and To come through here.
        let mut n = String::with_capacity(body.len() + 1);
        n.push('+');
        n.extend(body.chars().filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.')));
        Self::checked(n)
    }

    fn from_digits(digits: &str) -> Result<Self, E164Error> {
        Self::checked(format!("+{digits}"))
    }

    /// `n` is `+` and digits: 8 to 15 of them, the first not 0.
    fn checked(n: String) -> Result<Self, E164Error> {
        let digits = &n[1..];
        let ok =
            (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
        if ok {
            Ok(Self(n))
        } else {
            Err(E164Error)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Without the `+`, as Plivo's REST paths want it.
    pub fn digits(&self) -> &str {
        &self.0[1..]
    }
}

impl TryFrom<String> for E164 {
    type Error = E164Error;
    fn try_from(s: String) -> Result<Self, E164Error> {
        Self::parse(&s)
    }
}

impl From<E164> for String {
    fn from(n: E164) -> String {
        n.0
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalizes() {
        assert_eq!(E164::parse("+14155550100").unwrap().as_str(), "+14155550100");
        assert_eq!(E164::normalize("18135401302").unwrap().as_str(), "+18135401302");
        assert_eq!(E164::normalize("+91 80-3555 1234").unwrap().as_str(), "+918035551234");
        for bad in ["14155550100", "+0123456789", "+1234", "+1415555010012345", "+1415a550100", ""] {
            assert!(E164::parse(bad).is_err(), "{bad}");
        }
    }
}
