//! Phone numbers as the webhook path reads them, decoded once: every callback resolves its
//! number, and a sled read plus a JSON decode per request was a tenth of the path's CPU.
//!
//! Numbers change only through the store's own write methods, which empty the cache before and
//! after their transaction. A reader that loaded a record while a write was under way keeps it
//! out of the cache (the generation moved), so once a write returns nothing stale is served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

use super::{PhoneRecord, StoreError};
use crate::domain::{Carrier, PhoneId};

/// Far above any real deployment's numbers; only a bound so a bug cannot grow it without end.
const MAX_ENTRIES: usize = 100_000;

/// Which number each carrier application (Telnyx `connection_id`) leads to: `None` where
/// several numbers share it, since then it names none of them.
pub type Connections = HashMap<(Carrier, String), Option<PhoneId>>;

#[derive(Default)]
pub struct PhoneCache {
    by_id: DashMap<String, Arc<PhoneRecord>>,
    by_number: DashMap<String, Arc<PhoneRecord>>,
    /// Built by one scan of the numbers when first asked for after a write. A lookup by
    /// application used to scan every number itself, and anyone may send an event naming an
    /// application of no number here.
    connections: RwLock<Option<Arc<Connections>>>,
    generation: AtomicU64,
}

/// Which key a lookup is by.
#[derive(Clone, Copy)]
pub enum By {
    Id,
    Number,
}

impl PhoneCache {
    fn map(&self, by: By) -> &DashMap<String, Arc<PhoneRecord>> {
        match by {
            By::Id => &self.by_id,
            By::Number => &self.by_number,
        }
    }

    /// The cached record, else what `load` reads (kept unless a write overlapped the read).
    /// Unknown numbers are not cached: they cost a read each, and a write could create them.
    pub fn get_or_load(
        &self,
        by: By,
        key: &str,
        load: impl FnOnce() -> Result<Option<PhoneRecord>, StoreError>,
    ) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
        let map = self.map(by);
        if let Some(hit) = map.get(key) {
            return Ok(Some(Arc::clone(hit.value())));
        }
        let seen = self.generation.load(Ordering::SeqCst);
        let Some(rec) = load()? else { return Ok(None) };
        let rec = Arc::new(rec);
        if map.len() < MAX_ENTRIES {
            map.insert(key.to_owned(), Arc::clone(&rec));
            // A write that committed after the load bumped the generation; its clearing may have
            // run before the insert above, so the insert is undone here.
            if self.generation.load(Ordering::SeqCst) != seen {
                map.remove(key);
            }
        }
        Ok(Some(rec))
    }

    /// The application index, else what `build` makes (kept unless a write overlapped it).
    pub fn connections(
        &self,
        build: impl FnOnce() -> Result<Connections, StoreError>,
    ) -> Result<Arc<Connections>, StoreError> {
        if let Some(index) = self.connections.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(Arc::clone(index));
        }
        let seen = self.generation.load(Ordering::SeqCst);
        let index = Arc::new(build()?);
        let mut slot = self.connections.write().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::SeqCst) == seen {
            *slot = Some(Arc::clone(&index));
        }
        Ok(index)
    }

    /// Runs a write of phone records with the cache emptied around it.
    pub fn around<T>(&self, write: impl FnOnce() -> T) -> T {
        self.invalidate();
        let out = write();
        self.invalidate();
        out
    }

    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.by_id.clear();
        self.by_number.clear();
        *self.connections.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn phone(number: &str) -> PhoneRecord {
        use crate::domain::{Carrier, OrgId, PhoneId, SecretId, E164};
        PhoneRecord {
            id: PhoneId::generate(),
            org_id: OrgId::generate(),
            provider: Carrier::Plivo,
            number: E164::parse(number).unwrap(),
            provider_number_id: number.into(),
            friendly_name: None,
            label: None,
            config: Default::default(),
            credential: SecretId::generate(),
            previous_credential: None,
            billing_status: "byok".into(),
            monthly_cost_cents: 0,
            provider_configuration: None,
            connection_id: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_hit_does_not_load_and_a_write_forces_a_fresh_load() {
        let cache = PhoneCache::default();
        let loads = Cell::new(0);
        let load = |n: &str| {
            loads.set(loads.get() + 1);
            Ok(Some(phone(n)))
        };
        let a = cache.get_or_load(By::Id, "p1", || load("+14155550100")).unwrap().unwrap();
        let b = cache.get_or_load(By::Id, "p1", || load("+14155550199")).unwrap().unwrap();
        assert_eq!((loads.get(), a.number.as_str(), b.number.as_str()), (1, "+14155550100", "+14155550100"));
        cache.around(|| ());
        let c = cache.get_or_load(By::Id, "p1", || load("+14155550199")).unwrap().unwrap();
        assert_eq!((loads.get(), c.number.as_str()), (2, "+14155550199"));
    }

    #[test]
    fn a_record_loaded_while_a_write_ran_is_not_kept() {
        let cache = PhoneCache::default();
        // The write commits (and clears) between the load's read and its insert.
        let got = cache
            .get_or_load(By::Number, "+14155550100", || {
                let old = phone("+14155550100");
                cache.around(|| ());
                Ok(Some(old))
            })
            .unwrap();
        assert!(got.is_some());
        assert!(cache.by_number.is_empty(), "a record read before a write must not be served after it");
    }

    #[test]
    fn unknown_numbers_and_errors_are_not_cached() {
        let cache = PhoneCache::default();
        assert!(cache.get_or_load(By::Id, "p9", || Ok(None)).unwrap().is_none());
        let err = cache.get_or_load(By::Id, "p9", || Err(StoreError::Locked));
        assert!(matches!(err, Err(StoreError::Locked)));
        assert!(cache.by_id.is_empty());
    }
}
