//! Fixed-window limits per organization for operations that are costly or sensitive.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::domain::OrgId;

pub struct RateLimiter {
    per_window: u32,
    window_ms: i64,
    windows: Mutex<HashMap<OrgId, (i64, u32)>>,
}

impl RateLimiter {
    pub fn per_minute(n: u32) -> Self {
        Self { per_window: n, window_ms: 60_000, windows: Mutex::new(HashMap::new()) }
    }

    /// Ok, or the seconds until the window reopens.
    pub fn check(&self, org: &OrgId, now_ms: i64) -> Result<(), u64> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() > 100_000 {
            w.retain(|_, (start, _)| now_ms - *start < self.window_ms);
        }
        let entry = w.entry(org.clone()).or_insert((now_ms, 0));
        if now_ms - entry.0 >= self.window_ms {
            *entry = (now_ms, 0);
        }
        if entry.1 >= self.per_window {
            let left_ms = self.window_ms - (now_ms - entry.0);
            return Err(((left_ms + 999) / 1000) as u64);
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_then_reopens() {
        let r = RateLimiter::per_minute(2);
        let org = OrgId::generate();
        assert!(r.check(&org, 0).is_ok());
        assert!(r.check(&org, 10).is_ok());
        assert_eq!(r.check(&org, 30_000), Err(30));
        assert!(r.check(&OrgId::generate(), 30_000).is_ok());
        assert!(r.check(&org, 60_000).is_ok());
    }
}
