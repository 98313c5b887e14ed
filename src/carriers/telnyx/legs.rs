//! Which number each Telnyx call leg is for, learned from the leg's first event. A call's first
//! event (`call.initiated`) says its direction, so its number is known for certain; the events
//! after it (`call.answered`, `call.hangup`) say none, and between two numbers here that no
//! known application tells apart, either could be the leg's. Two tenants on one Telnyx account
//! share its key, so the signature cannot tell them apart either: without this, one tenant's
//! hang-up could be recorded as the other's.
//!
//! Only recorded events, verified with the number's key, are learned from, and a number found
//! here must still verify the event with its own key, so nothing posted can route an event to a
//! number whose key did not sign it. A leg claimed by two numbers is forgotten (its events fall
//! back to the parties and the application), not taken by the later claim; a hang-up ends only
//! its own number's leg. What is here is lost on restart.
//!
//! Bounded, so that no tenant can grow it or crowd out another's legs: ids longer than any
//! Telnyx makes are not learned, each organization holds at most [`MOST_PER_ORG`] legs and all
//! of them [`MOST`], and a leg is kept [`KEEP_SECS`] at most, [`AFTER_HANGUP_SECS`] after its
//! hang-up (events such as a recording's can follow it).

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::domain::{OrgId, PhoneId};

/// Longer than almost any call; a longer one's later events fall back to the parties.
const KEEP_SECS: i64 = 4 * 3600;

/// How long a leg is kept after its hang-up.
const AFTER_HANGUP_SECS: i64 = 600;

/// Legs kept at most (about 250 bytes each), and per organization.
const MOST: usize = 32_768;
const MOST_PER_ORG: usize = 4_096;

/// Longest call id learned: Telnyx's are `v3:` and a token of about 80 characters.
const LONGEST_ID: usize = 160;

/// Legs learned between two sweeps of those past their time.
const SWEEP_EVERY: u64 = 1024;

struct Leg {
    phone: PhoneId,
    org: OrgId,
    /// When it is forgotten, in Unix seconds.
    until: i64,
}

#[derive(Default)]
pub struct Legs {
    legs: DashMap<Box<str>, Leg>,
    per_org: DashMap<OrgId, usize>,
    learned: AtomicU64,
}

impl Legs {
    /// The number the leg's first event was for, if it is known and its time has not passed.
    pub fn get(&self, call_control_id: &str, now_secs: i64) -> Option<PhoneId> {
        self.legs.get(call_control_id).filter(|leg| now_secs < leg.until).map(|leg| leg.phone.clone())
    }

    /// Notes that the leg is `phone`'s (of `org`), as an event that says its direction showed.
    /// Nothing is allocated unless the leg is new and there is room for it.
    pub fn learn(&self, call_control_id: &str, phone: &PhoneId, org: &OrgId, now_secs: i64) {
        if self.learned.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep(now_secs);
        }
        if call_control_id.len() > LONGEST_ID {
            return;
        }
        let until = now_secs + KEEP_SECS;
        if let Some(mut known) = self.legs.get_mut(call_control_id) {
            if known.phone == *phone {
                known.until = until;
                return;
            }
            drop(known);
            // Two numbers claim it: neither is believed.
            self.unsettle(call_control_id);
            return;
        }
        if self.legs.len() >= MOST {
            return;
        }
        match self.per_org.get_mut(org) {
            Some(held) if *held >= MOST_PER_ORG => return,
            Some(mut held) => *held += 1,
            None => {
                self.per_org.insert(org.clone(), 1);
            }
        }
        let leg = Leg { phone: phone.clone(), org: org.clone(), until };
        if let Some(before) = self.legs.insert(call_control_id.into(), leg) {
            // Another event of the leg was learned meanwhile.
            self.uncount(&before.org);
            if before.phone != *phone {
                self.unsettle(call_control_id);
            }
        }
    }

    fn unsettle(&self, call_control_id: &str) {
        if let Some((_, leg)) = self.legs.remove(call_control_id) {
            self.uncount(&leg.org);
        }
    }

    /// The leg hung up: kept a little longer, for the events that can follow, if it is `phone`'s.
    pub fn hung_up(&self, call_control_id: &str, phone: &PhoneId, now_secs: i64) {
        if let Some(mut leg) = self.legs.get_mut(call_control_id) {
            if leg.phone == *phone {
                leg.until = leg.until.min(now_secs + AFTER_HANGUP_SECS);
            }
        }
    }

    fn sweep(&self, now_secs: i64) {
        let mut gone = Vec::new();
        self.legs.retain(|_, leg| {
            let keep = now_secs < leg.until;
            if !keep {
                gone.push(leg.org.clone());
            }
            keep
        });
        for org in &gone {
            self.uncount(org);
        }
    }

    fn uncount(&self, org: &OrgId) {
        if let Some(mut held) = self.per_org.get_mut(org) {
            *held = held.saturating_sub(1);
        }
        self.per_org.remove_if(org, |_, held| *held == 0);
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
    fn a_leg_is_its_first_numbers_until_its_time_and_a_second_claim_unsettles_it() {
        let legs = Legs::default();
        let org = OrgId::generate();
        let (a, b) = (PhoneId::generate(), PhoneId::generate());
        legs.learn("v3:a", &a, &org, 1_000);
        legs.learn("v3:b", &b, &org, 1_000);
        assert_eq!((legs.get("v3:a", 1_000), legs.get("v3:b", 1_000)), (Some(a.clone()), Some(b.clone())));
        assert_eq!(legs.get("v3:c", 1_000), None);
        assert_eq!(legs.get("v3:a", 1_000 + KEEP_SECS), None, "past its time");
        // A hang-up of another number's leg changes nothing; its own number's keeps it a while.
        legs.hung_up("v3:a", &b, 1_000);
        assert_eq!(legs.get("v3:a", 1_000 + AFTER_HANGUP_SECS), Some(a.clone()));
        legs.hung_up("v3:a", &a, 1_000);
        assert_eq!(legs.get("v3:a", 1_000 + AFTER_HANGUP_SECS - 1), Some(a.clone()));
        assert_eq!(legs.get("v3:a", 1_000 + AFTER_HANGUP_SECS), None);
        // Claimed by another number, the leg is nobody's.
        legs.learn("v3:b", &a, &org, 1_001);
        assert_eq!((legs.get("v3:b", 1_001), legs.len()), (None, 1));
        assert!(legs.get(&"x".repeat(LONGEST_ID + 1), 1_001).is_none());
        legs.learn(&"x".repeat(LONGEST_ID + 1), &a, &org, 1_001);
        assert_eq!(legs.len(), 1, "an id longer than Telnyx makes is not learned");
    }

    #[test]
    fn no_organization_holds_more_than_its_share_and_old_legs_are_swept() {
        let legs = Legs::default();
        let (busy, other) = (OrgId::generate(), OrgId::generate());
        let phone = PhoneId::generate();
        for i in 0..MOST_PER_ORG + 10 {
            legs.learn(&format!("v3:busy{i}"), &phone, &busy, 1_000);
        }
        assert_eq!(legs.len(), MOST_PER_ORG);
        legs.learn("v3:other", &phone, &other, 1_000);
        assert!(legs.get("v3:other", 1_000).is_some(), "another organization still learns");
        // Once their time has passed, a sweep frees the busy organization's share.
        let later = 1_000 + KEEP_SECS;
        for i in 0..SWEEP_EVERY {
            legs.learn(&format!("v3:late{i}"), &phone, &busy, later);
        }
        assert_eq!(legs.get("v3:other", later), None);
        assert!(legs.get(&format!("v3:late{}", SWEEP_EVERY - 1), later).is_some());
        assert!(legs.len() <= MOST_PER_ORG + 1);
        assert_eq!(*legs.per_org.get(&busy).unwrap(), legs.len());
    }
}
