//! Wall-clock time that tests can pin, so signed fixtures with a fixed `now` replay exactly.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    pub fn system() -> Self {
        Self(None)
    }

    pub fn pinned(ms: i64) -> Self {
        Self(Some(Arc::new(AtomicI64::new(ms))))
    }

    /// Moves a pinned clock; a system clock ignores it.
    pub fn set_ms(&self, ms: i64) {
        if let Some(t) = &self.0 {
            t.store(ms, Ordering::Relaxed);
        }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Some(t) => t.load(Ordering::Relaxed),
            None => SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
        }
    }

    pub fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// RFC 3339 with milliseconds, UTC: the one timestamp format of the API.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_pins() {
        assert_eq!(rfc3339(1_714_557_600_123), "2024-05-01T10:00:00.123Z");
        let c = Clock::pinned(5_000);
        assert_eq!(c.now_secs(), 5);
        c.set_ms(9_999);
        assert_eq!(c.now_secs(), 9);
    }
}
