//! Which number each Telnyx call leg is for, learned from the leg's first event. A call's first
//! event (`call.initiated`) says its direction, so its number is known for certain; the events
//! after it (`call.answered`, `call.hangup`) say none, and between two numbers here that no
//! known application tells apart, either could be the leg's. Two tenants on one Telnyx account
//! share its key, so the signature cannot tell them apart either: without this, one tenant's
//! hang-up could be recorded as the other's.
//!
//! Only events verified with the number's key are learned from, and a number found here must
//! still verify the event with its own key, so nothing posted can route an event to a number
//! whose key did not sign it. What is here is lost on restart; events then fall back to the
//! parties and the application. Bounded: a leg is forgotten at its hang-up or after
//! [`KEEP_SECS`], and past [`MOST`] legs nothing more is learned until some are.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::domain::PhoneId;

/// Longer than almost any call; a longer one's later events fall back to the parties.
const KEEP_SECS: i64 = 4 * 3600;

/// Legs kept at most (about 170 bytes each).
const MOST: usize = 32_768;

/// Legs learned between two sweeps of those past [`KEEP_SECS`].
const SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
pub struct Legs {
    legs: DashMap<Box<str>, (PhoneId, i64)>,
    learned: AtomicU64,
}

impl Legs {
    /// The number the leg's first event was for, if it is known.
    pub fn get(&self, call_control_id: &str) -> Option<PhoneId> {
        self.with(call_control_id, PhoneId::clone)
    }

    /// `f` of the number the leg's first event was for, if it is known, without a copy of it.
    pub fn with<T>(&self, call_control_id: &str, f: impl FnOnce(&PhoneId) -> T) -> Option<T> {
        self.legs.get(call_control_id).map(|leg| f(&leg.0))
    }

    pub fn learn(&self, call_control_id: &str, phone: &PhoneId, now_secs: i64) {
        if self.learned.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.legs.retain(|_, (_, at)| now_secs - *at < KEEP_SECS);
        }
        if self.legs.len() >= MOST {
            return;
        }
        self.legs.insert(call_control_id.into(), (phone.clone(), now_secs));
    }

    pub fn forget(&self, call_control_id: &str) {
        self.legs.remove(call_control_id);
    }

    pub fn len(&self) -> usize {
        self.legs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.legs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legs_are_forgotten_at_hang_up_or_when_old_and_kept_bounded() {
        let legs = Legs::default();
        let (a, b) = (PhoneId::generate(), PhoneId::generate());
        legs.learn("v3:a", &a, 1_000);
        legs.learn("v3:b", &b, 1_000);
        assert_eq!((legs.get("v3:a"), legs.get("v3:b"), legs.get("v3:c")), (Some(a.clone()), Some(b), None));
        legs.forget("v3:b");
        assert_eq!((legs.get("v3:b"), legs.len()), (None, 1));
        // A sweep, once enough legs were learned, drops those older than a call lasts.
        let later = 1_000 + KEEP_SECS;
        for i in 0..SWEEP_EVERY {
            legs.learn(&format!("v3:n{i}"), &a, later);
        }
        assert_eq!(legs.get("v3:a"), None);
        assert_eq!(legs.len(), SWEEP_EVERY as usize, "the new legs, and none older");
        // Full, it learns nothing more.
        for i in 0..MOST {
            legs.learn(&format!("v3:m{i}"), &a, later);
        }
        assert_eq!(legs.len(), MOST);
        legs.learn("v3:late", &a, later);
        assert_eq!(legs.get("v3:late"), None);
    }
}
