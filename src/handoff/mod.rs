//! Hand-off to the voice platform: the assistant decides how an incoming call is answered
//! (within a deadline), and every recorded event is delivered upstream at least once, signed.

pub mod assistant;
pub mod breaker;
pub mod outbox;
pub mod routes;
pub mod signing;

use anyhow::Context;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;

use crate::domain::Secret;
use crate::settings::{check_whsec, Settings};

pub const SECRET_FILE: &str = "upstream.secret";

/// The upstream signing secret: the configured one, else the one in the data dir, generated
/// (mode 0600) on first start. Whoever generates it first (the gateway starting, `callgate
/// upstream secret` beside it) makes the file; everyone else reads that one, so a secret shown
/// is always the one deliveries are signed with.
pub fn load_or_create_secret(settings: &Settings) -> anyhow::Result<(Secret, bool)> {
    if let Some(s) = &settings.handoff.upstream_secret {
        return Ok((s.clone(), false));
    }
    let path = settings.data_dir.join(SECRET_FILE);
    if !path.exists() {
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(raw.as_mut_slice());
        let secret = Secret::new(format!("whsec_{}", B64.encode(raw.as_slice())));
        if crate::private_file::create(&path, secret.expose()).with_context(|| format!("writing {}", path.display()))? {
            return Ok((secret, true));
        }
    }
    let text = crate::private_file::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((check_whsec(&path.display().to_string(), &text).map_err(|e| anyhow::anyhow!("{e}"))?, false))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The gateway and `callgate upstream secret` starting together on a fresh data dir each
    /// generated a secret, and the one shown by the first could be overwritten by the other's.
    #[test]
    fn a_secret_generated_by_several_at_once_is_the_same_for_all() {
        let dir = tempfile::tempdir().unwrap();
        let env: HashMap<String, String> =
            [("CALLGATE_DATA_DIR".to_owned(), dir.path().display().to_string())].into_iter().collect();
        let settings = Settings::load(None, &env).unwrap();
        let got: Vec<(String, bool)> = std::thread::scope(|s| {
            let tries: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let (secret, generated) = load_or_create_secret(&settings).unwrap();
                        (secret.expose().to_owned(), generated)
                    })
                })
                .collect();
            tries.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let on_disk = std::fs::read_to_string(dir.path().join(SECRET_FILE)).unwrap();
        assert!(got.iter().all(|(secret, _)| format!("{secret}\n") == on_disk), "{}", got.len());
        assert_eq!(got.iter().filter(|(_, generated)| *generated).count(), 1);
    }
}
