//! Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`), so
//! the platform can verify what callgate sends with any Standard Webhooks library.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::Secret;

#[derive(Clone)]
pub struct Signer {
    keys: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl Signer {
    /// The current secret first, then the one being rotated out, if any.
    pub fn new(current: &Secret, previous: Option<&Secret>) -> Option<Signer> {
        let keys = std::iter::once(current)
            .chain(previous)
            .map(|s| {
                let raw = B64.decode(s.expose().strip_prefix("whsec_")?).ok()?;
                Hmac::<Sha256>::new_from_slice(&raw).ok()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Signer { keys })
    }

    /// `v1,<sig>` per key, space-separated: a receiver accepts if any one verifies.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let ts = timestamp.to_string();
        let mut out = String::with_capacity(48 * self.keys.len());
        for (i, key) in self.keys.iter().enumerate() {
            let mut mac = key.clone();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(ts.as_bytes());
            mac.update(b".");
            mac.update(body);
            if i > 0 {
                out.push(' ');
            }
            out.push_str("v1,");
            out.push_str(&B64.encode(mac.finalize().into_bytes()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into());
        let signer = Signer::new(&secret, None).unwrap();
        assert_eq!(
            signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn rotation_signs_with_both() {
        let a = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into());
        let b = Secret::new(format!("whsec_{}", B64.encode([9u8; 32])));
        let sig = Signer::new(&b, Some(&a)).unwrap().sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        let parts: Vec<_> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(format!("{:?}", Signer::new(&a, None).unwrap()).contains("redacted"));
    }
}
