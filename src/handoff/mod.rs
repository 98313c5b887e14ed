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
/// (mode 0600) on first start.
pub fn load_or_create_secret(settings: &Settings) -> anyhow::Result<(Secret, bool)> {
    if let Some(s) = &settings.handoff.upstream_secret {
        return Ok((s.clone(), false));
    }
    let path = settings.data_dir.join(SECRET_FILE);
    if path.exists() {
        let text = crate::private_file::read(&path).with_context(|| format!("reading {}", path.display()))?;
        return Ok((check_whsec(&path.display().to_string(), &text).map_err(|e| anyhow::anyhow!("{e}"))?, false));
    }
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(raw.as_mut_slice());
    let secret = Secret::new(format!("whsec_{}", B64.encode(raw.as_slice())));
    crate::private_file::write(&path, secret.expose()).with_context(|| format!("writing {}", path.display()))?;
    Ok((secret, true))
}
