//! What is kept in memory about the journal's events: a few dense arrays indexed by the event's
//! sequence number (the order the writer recorded them in), the live replay markers, and the
//! outbox queue. Everything else about an event stays on disk and is read when asked for.
//!
//! Per event this is 29 bytes in the columns and 5 to 10 in the marker table, plus 4 while it
//! is parked (1,000,000 events: ~40 MB), so it is sized for the ids and offsets, not the
//! events. Queued deliveries cost more (ordered sets, about 100 bytes at most) but are few: the
//! outbox releases parked events a bounded number at a time, and parks those whose upstream
//! is held, so a long outage costs 4 bytes an event. It is rebuilt from the journal, or loaded
//! from the snapshot written at shutdown and brought up to date from the journal's tail.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::RwLockReadGuard;

use hashbrown::HashTable;

use super::column::Column;
use super::journal::Loc;
use super::{DeliveryState, StoreError};
use crate::domain::OrgId;

/// The fixed part of a journal record: all the index needs, without parsing the JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<'a> {
    pub seq: u32,
    pub id: u128,
    /// Fingerprint of the replay key (0: none).
    pub fp: u64,
    /// When the replay marker expires, in whole seconds (rounded up).
    pub expiry_secs: u32,
    pub state: DeliveryState,
    /// No upstream could take this event when it was recorded: it waits off the queue.
    pub parked: bool,
    pub due_ms: i64,
    pub call: u64,
    pub org: &'a str,
    pub phone: &'a str,
}

pub fn state_code(s: DeliveryState) -> u8 {
    match s {
        DeliveryState::Pending => 0,
        DeliveryState::Delivered => 1,
        DeliveryState::Failed => 2,
        DeliveryState::Dead => 3,
    }
}

pub fn state_from(code: u8) -> Option<DeliveryState> {
    Some(match code {
        0 => DeliveryState::Pending,
        1 => DeliveryState::Delivered,
        2 => DeliveryState::Failed,
        3 => DeliveryState::Dead,
        _ => return None,
    })
}

fn undelivered(s: u8) -> bool {
    matches!(state_from(s), Some(DeliveryState::Pending | DeliveryState::Failed))
}

/// A queued event: when it is due, its call, and its number (its key in `Index::phones`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Queued {
    due: i64,
    call: u64,
    phone: u32,
    /// Queued after a failed attempt, for a retry at `due` (not one released from parking,
    /// which is due at once).
    retry: bool,
}

/// What a group of queued call heads must tell the group it is in.
trait Earliest {
    fn earliest(&self) -> Option<i64>;
    fn is_empty(&self) -> bool;
}

impl Earliest for BTreeSet<(i64, u32)> {
    fn earliest(&self) -> Option<i64> {
        self.first().map(|(due, _)| *due)
    }

    fn is_empty(&self) -> bool {
        BTreeSet::is_empty(self)
    }
}

/// Groups of call heads by a key (an organization, a number), with each group's earliest due
/// kept in order, so that a pass can offer the groups in turn, the earliest first.
#[derive(Default)]
struct Turns<G> {
    groups: HashMap<u32, G>,
    /// (the group's earliest due, its key).
    firsts: BTreeSet<(i64, u32)>,
}

impl<G> Earliest for Turns<G> {
    fn earliest(&self) -> Option<i64> {
        self.firsts.first().map(|(due, _)| *due)
    }

    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

impl<G: Earliest + Default> Turns<G> {
    /// Changes the group `key`, keeping its place among the firsts.
    fn change(&mut self, key: u32, f: impl FnOnce(&mut G)) {
        let group = self.groups.entry(key).or_default();
        let before = group.earliest();
        f(group);
        let after = group.earliest();
        if group.is_empty() {
            self.groups.remove(&key);
        }
        if before != after {
            if let Some(due) = before {
                self.firsts.remove(&(due, key));
            }
            if let Some(due) = after {
                self.firsts.insert((due, key));
            }
        }
    }

    /// Up to `limit` groups with something due by `by`, the earliest first.
    fn due(&self, by: (i64, u32), limit: usize) -> impl Iterator<Item = &G> {
        self.firsts.range(..=by).take(limit).filter_map(|(_, key)| self.groups.get(key))
    }
}

/// Takes one item of each iterator in turn, dropping those that run out.
struct InTurn<I>(VecDeque<I>);

impl<I: Iterator> Iterator for InTurn<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        loop {
            let mut it = self.0.pop_front()?;
            if let Some(item) = it.next() {
                self.0.push_back(it);
                return Some(item);
            }
        }
    }
}

fn in_turn<I: Iterator>(its: impl Iterator<Item = I>) -> InTurn<I> {
    InTurn(its.collect())
}

#[derive(Default)]
pub struct Index {
    /// High 64 bits of each event id (time, then a counter): unique and ascending.
    pub ids: Column<u64>,
    /// The latest version of each event.
    pub locs: Column<Loc>,
    pub orgs: Column<u32>,
    pub states: Column<u8>,
    /// The low half of each replay-key fingerprint (0: none). Half the bytes of the whole one;
    /// the rare events that share one are told apart by their stored key.
    fps: Column<u32>,
    expiry: Column<u32>,
    org_table: Vec<OrgId>,
    org_lookup: HashMap<String, u32>,
    /// Sequence numbers of live markers, hashed by their fingerprint.
    markers: HashTable<u32>,
    /// Markers below this sequence number have been swept.
    marker_floor: u32,
    /// Every queued event.
    queued: HashMap<u32, Queued>,
    /// How many of them wait for a retry, by number (by `Queued::phone`).
    retrying_by: HashMap<u32, usize>,
    calls: BTreeSet<(u64, u32)>,
    /// The queued events that head their calls (the only ones an attempt can be made of), by
    /// organization, then by number, in due order. Kept apart so that a pass takes the
    /// organizations in turn, and each organization's numbers in turn: one number's backlog,
    /// however deep, cannot fill every pass's read of the queue while another's events (of its
    /// tenant or another) wait behind it, and a call's later events never take a head's place.
    heads: Turns<Turns<BTreeSet<(i64, u32)>>>,
    /// Every number an event was ever queued under, with the key `Queued::phone` holds for it
    /// (kept while none is queued: there are as many as numbers, not events).
    phones: HashMap<String, u32>,
    /// Events waiting off the queue, by phone, in ascending order: their number has no
    /// upstream, or its upstream is held by its breaker. Sequence numbers only (the call is
    /// read back from the journal when they are released): there can be millions.
    parked: HashMap<String, VecDeque<u32>>,
    /// The journal position everything above reflects.
    pub covered: Loc,
}

impl Index {
    pub fn len(&self) -> u32 {
        self.ids.len() as u32
    }

    pub fn org_index(&self, org: &OrgId) -> Option<u32> {
        self.org_lookup.get(org.as_str()).copied()
    }

    pub fn org(&self, seq: u32) -> &OrgId {
        &self.org_table[self.orgs[seq as usize] as usize]
    }

    /// The sequence number of the event whose id starts with `high`.
    pub fn seq_of(&self, high: u64) -> Option<u32> {
        self.ids.binary_search(&high).ok().map(|i| i as u32)
    }

    /// The events with a live marker whose fingerprint matches this one's low half.
    pub fn marked(&self, fp: u64, now_ms: i64) -> impl Iterator<Item = u32> + '_ {
        let f = short(fp);
        self.markers
            .iter_hash(spread(f))
            .copied()
            .filter(move |&s| self.fps[s as usize] == f && !expired(self.expiry[s as usize], now_ms))
    }

    /// Takes in one record (new event or new version), in journal order.
    pub fn apply(&mut self, at: Loc, e: &Entry<'_>) -> Result<(), StoreError> {
        let seq = e.seq as usize;
        let state = state_code(e.state);
        // A later version of a parked event leaves it where it is: parking is the index's own
        // business once an event is recorded (a record's flag says only how it started).
        let before = (seq < self.ids.len()).then(|| self.states[seq]);
        let was_parked = before.is_some_and(undelivered) && !self.queued.contains_key(&e.seq);
        let new = before.is_none();
        // A new event, or a finished one sent again (redelivery): either joins its call anew.
        let joins = before.is_none_or(|s| !undelivered(s));
        match seq.cmp(&self.ids.len()) {
            std::cmp::Ordering::Equal => {
                let high = (e.id >> 64) as u64;
                if self.ids.last().is_some_and(|last| *last >= high) {
                    return Err(corrupt(format!("event {seq} is out of order")));
                }
                let org = match self.org_lookup.get(e.org) {
                    Some(i) => *i,
                    None => {
                        let id = OrgId::parse(e.org).map_err(|_| corrupt(format!("event {seq} has a bad org id")))?;
                        let i = self.org_table.len() as u32;
                        self.org_lookup.insert(id.as_str().to_owned(), i);
                        self.org_table.push(id);
                        i
                    }
                };
                self.ids.push(high);
                self.locs.push(at);
                self.orgs.push(org);
                self.states.push(state);
                let f = short(e.fp);
                self.fps.push(f);
                self.expiry.push(e.expiry_secs);
                if f != 0 {
                    let fps = &self.fps;
                    self.markers.insert_unique(spread(f), e.seq, |s| spread(fps[*s as usize]));
                }
            }
            std::cmp::Ordering::Less => {
                self.locs[seq] = at;
                self.states[seq] = state;
            }
            std::cmp::Ordering::Greater => return Err(corrupt(format!("event {seq} follows a gap"))),
        }
        self.unqueue(e.seq);
        if was_parked && !undelivered(state) {
            // Finished while parked (its attempt was out when it was held, or a replay of what
            // happened after its release): the list keeps only events still waiting.
            self.unpark(e.phone, e.seq);
        }
        if undelivered(state) && !was_parked {
            // A number with events parked parks what joins its calls behind them too, so none
            // can overtake an earlier event of the same call that waits off the queue. An event
            // sent again takes its call's queued events with it: they may be later than it.
            if new && (e.parked || self.has_parked(e.phone)) {
                self.park(e.phone, e.seq);
            } else if joins && self.has_parked(e.phone) {
                self.park_call(e.phone, e.call);
                self.park(e.phone, e.seq);
            } else {
                let phone = self.phone_key(e.phone);
                self.enqueue(e.seq, e.due_ms, e.call, phone);
            }
        }
        Ok(())
    }

    fn park(&mut self, phone: &str, seq: u32) {
        if !self.parked.contains_key(phone) {
            self.parked.insert(phone.to_owned(), VecDeque::new());
        }
        let Some(list) = self.parked.get_mut(phone) else { return };
        match list.back() {
            Some(last) if *last >= seq => {
                if let Err(at) = list.binary_search(&seq) {
                    list.insert(at, seq);
                }
            }
            _ => list.push_back(seq),
        }
    }

    fn unpark(&mut self, phone: &str, seq: u32) {
        let Some(list) = self.parked.get_mut(phone) else { return };
        if let Ok(at) = list.binary_search(&seq) {
            list.remove(at);
        }
        if list.is_empty() {
            self.parked.remove(phone);
        }
    }

    /// Takes a queued event off the queue and parks it (its upstream is held), with the other
    /// queued events of its call: left queued, a later one could go before it once the
    /// upstream answers again. Returns how many it took off the queue.
    pub fn hold(&mut self, seq: u32, phone: &str) -> usize {
        let Some(q) = self.queued.get(&seq).copied() else { return 0 };
        self.park_call(phone, q.call)
    }

    /// Takes every queued event of a call off the queue and parks it with `phone`.
    fn park_call(&mut self, phone: &str, call: u64) -> usize {
        let seqs: Vec<u32> = self.calls.range((call, 0)..=(call, u32::MAX)).map(|(_, s)| *s).collect();
        for s in &seqs {
            self.unqueue(*s);
            self.park(phone, *s);
        }
        seqs.len()
    }

    /// When the earliest queued call head is due.
    pub fn next_due(&self) -> Option<i64> {
        self.heads.earliest()
    }

    /// How many events are on the queue (due or not).
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// How many of the queued events wait for a retry after a failed attempt.
    pub fn retrying(&self) -> usize {
        self.retrying_by.values().sum()
    }

    /// How many of a number's queued events wait for a retry.
    pub fn retrying_of(&self, phone: &str) -> usize {
        self.phones.get(phone).and_then(|k| self.retrying_by.get(k)).copied().unwrap_or(0)
    }

    fn retry_counted(&mut self, phone: u32, added: bool) {
        if added {
            *self.retrying_by.entry(phone).or_default() += 1;
        } else if let Some(n) = self.retrying_by.get_mut(&phone) {
            *n -= 1;
            if *n == 0 {
                self.retrying_by.remove(&phone);
            }
        }
    }

    /// The first `limit` parked events of a phone, with where their records are.
    pub fn parked_head(&self, phone: &str, limit: usize) -> Vec<(u32, Loc)> {
        let Some(list) = self.parked.get(phone) else { return Vec::new() };
        list.iter().take(limit).map(|s| (*s, self.locs[*s as usize])).collect()
    }

    /// Whether a phone has events parked.
    pub fn has_parked(&self, phone: &str) -> bool {
        self.parked.contains_key(phone)
    }

    /// How many events are parked.
    pub fn parked_len(&self) -> usize {
        self.parked.values().map(VecDeque::len).sum()
    }

    /// The numbers that have events parked.
    pub fn parked_phones(&self) -> Vec<String> {
        self.parked.keys().cloned().collect()
    }

    /// The key of a number's queued events, made the first time one is queued.
    fn phone_key(&mut self, phone: &str) -> u32 {
        if let Some(key) = self.phones.get(phone) {
            return *key;
        }
        let key = self.phones.len() as u32;
        self.phones.insert(phone.to_owned(), key);
        key
    }

    fn enqueue(&mut self, seq: u32, due: i64, call: u64, phone: u32) {
        let head = self.call_head(call);
        self.calls.insert((call, seq));
        // Released from parking, a failed event is due at once (0): it takes room like any other.
        let retry = due > 0 && seq < self.len() && state_from(self.states[seq as usize]) == Some(DeliveryState::Failed);
        if retry {
            self.retry_counted(phone, true);
        }
        if let Some(old) = self.queued.insert(seq, Queued { due, call, phone, retry }) {
            if old.retry {
                self.retry_counted(old.phone, false);
            }
        }
        match head {
            Some(h) if h < seq => {}
            _ => {
                // An older event of the call (one released from parking) takes the head's place.
                if let Some(h) = head {
                    self.set_head(h, false);
                }
                self.set_head(seq, true);
            }
        }
    }

    fn unqueue(&mut self, seq: u32) {
        let was_head = self.is_call_head(seq);
        if was_head {
            self.set_head(seq, false);
        }
        if let Some(Queued { call, retry, phone, .. }) = self.queued.remove(&seq) {
            if retry {
                self.retry_counted(phone, false);
            }
            self.calls.remove(&(call, seq));
            if let Some(next) = self.call_head(call).filter(|_| was_head) {
                self.set_head(next, true);
            }
        }
    }

    /// Puts a queued event among the heads (`head: true`) or takes it out.
    fn set_head(&mut self, seq: u32, head: bool) {
        let (Some(org), Some(q)) =
            ((seq < self.len()).then(|| self.orgs[seq as usize]), self.queued.get(&seq).copied())
        else {
            return;
        };
        self.heads.change(org, |numbers| {
            numbers.change(q.phone, |set| {
                if head {
                    set.insert((q.due, seq));
                } else {
                    set.remove(&(q.due, seq));
                }
            })
        });
    }

    /// Takes a queued event whose record at `at` cannot be read off the queue, unless a later
    /// version has been written since.
    pub fn pass_over(&mut self, seq: u32, at: Loc) {
        if seq < self.len() && self.locs[seq as usize] == at {
            self.unqueue(seq);
        }
    }

    /// Puts up to `limit` of a phone's parked events back on the queue, oldest first, due now.
    /// `call_of` reads an event's call from its record; one it cannot read stays parked.
    /// Returns how many went on the queue.
    pub fn release(&mut self, phone: &str, limit: usize, call_of: impl Fn(Loc) -> Option<u64>) -> usize {
        let Some(mut list) = self.parked.remove(phone) else { return 0 };
        let key = self.phone_key(phone);
        let mut unreadable = Vec::new();
        let mut n = 0;
        while n < limit {
            let Some(seq) = list.pop_front() else { break };
            // Delivered since (a redelivery, or a version replayed after it was parked).
            if !undelivered(self.states[seq as usize]) || self.queued.contains_key(&seq) {
                continue;
            }
            match call_of(self.locs[seq as usize]) {
                Some(call) => {
                    self.enqueue(seq, 0, call, key);
                    n += 1;
                }
                None => unreadable.push(seq),
            }
        }
        for seq in unreadable.into_iter().rev() {
            list.push_front(seq);
        }
        if !list.is_empty() {
            self.parked.insert(phone.to_owned(), list);
        }
        n
    }

    /// Up to `limit` call heads due by `now_ms`: a turn of each organization that has one, the
    /// organization with the earliest first, then another turn, and so on. An organization's
    /// turns go to its numbers the same way, and a number's to its heads in due order.
    pub fn due(&self, now_ms: i64, limit: usize) -> Vec<u32> {
        let by = (now_ms, u32::MAX);
        let orgs = self
            .heads
            .due(by, limit)
            .map(|numbers| in_turn(numbers.due(by, limit).map(|heads| heads.range(..=by).map(|(_, seq)| *seq))));
        in_turn(orgs).take(limit).collect()
    }

    /// The oldest queued event of a call.
    pub fn call_head(&self, call: u64) -> Option<u32> {
        self.calls.range((call, 0)..=(call, u32::MAX)).next().map(|(_, s)| *s)
    }

    /// Whether `seq` is queued and the oldest queued event of its call, by the call its own
    /// record names: a record made before a change of how call keys are formed still finds
    /// its call.
    pub fn is_call_head(&self, seq: u32) -> bool {
        self.queued.get(&seq).is_some_and(|q| self.call_head(q.call) == Some(seq))
    }

    /// Drops markers whose time is up, oldest first; returns how many.
    pub fn sweep(&mut self, now_ms: i64) -> usize {
        let mut n = 0;
        while (self.marker_floor as usize) < self.ids.len() {
            let s = self.marker_floor as usize;
            if !expired(self.expiry[s], now_ms) {
                break;
            }
            if self.fps[s] != 0 {
                let seq = s as u32;
                let f = self.fps[s];
                if let Ok(hit) = self.markers.find_entry(spread(f), |x| *x == seq) {
                    hit.remove();
                    n += 1;
                }
            }
            self.marker_floor += 1;
        }
        n
    }

    /// Writes the index to a temporary file beside `path`; `Written::install` makes it durable
    /// and puts it in place (so a crash before then leaves the old one).
    ///
    /// The lock is let go every `LOCKED_RECORDS` records (`again` takes it back), so the writer,
    /// which needs it for every batch, waits a moment rather than the whole copy (tens of
    /// milliseconds at a million events). The snapshot covers the journal up to where `first`
    /// saw it; what the writer applies meanwhile may show in the records copied later, and is
    /// read again from the journal at the next start. That is sound because a record only
    /// sets an event's location and state (or adds an event past those counted here), so
    /// replaying one over a copy that already shows it changes nothing.
    pub fn write_snapshot<'a>(
        first: RwLockReadGuard<'a, Index>,
        again: impl Fn() -> RwLockReadGuard<'a, Index>,
        path: &Path,
    ) -> Result<Written, StoreError> {
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = Crc { inner: BufWriter::with_capacity(1 << 17, file), crc: crc32fast::Hasher::new() };
        let mut ix = first;
        let n = ix.ids.len();
        w.put(MAGIC)?;
        w.put(&ix.covered.to_le_bytes())?;
        w.put(&ix.marker_floor.to_le_bytes())?;
        w.put(&(ix.org_table.len() as u32).to_le_bytes())?;
        for org in &ix.org_table {
            w.bytes(org.as_str().as_bytes())?;
        }
        w.put(&(n as u32).to_le_bytes())?;
        let mut block = Vec::with_capacity(RECORD * BLOCK_RECORDS);
        for s in 0..n {
            if s > 0 && s % LOCKED_RECORDS == 0 {
                drop(ix);
                ix = again();
            }
            block.extend_from_slice(&ix.ids[s].to_le_bytes());
            block.extend_from_slice(&ix.locs[s].to_le_bytes());
            block.extend_from_slice(&ix.orgs[s].to_le_bytes());
            block.push(ix.states[s]);
            block.extend_from_slice(&u64::from(ix.fps[s]).to_le_bytes());
            block.extend_from_slice(&ix.expiry[s].to_le_bytes());
            if block.len() == block.capacity() {
                w.put(&block)?;
                block.clear();
            }
        }
        w.put(&block)?;
        // Events added since the count above are not in this snapshot: their queue places
        // come back with them from the journal.
        w.put(&(ix.phones.len() as u32).to_le_bytes())?;
        for (phone, key) in &ix.phones {
            w.bytes(phone.as_bytes())?;
            w.put(&key.to_le_bytes())?;
        }
        let queued: Vec<_> = ix.queued.iter().filter(|(seq, _)| (**seq as usize) < n).collect();
        w.put(&(queued.len() as u32).to_le_bytes())?;
        for (seq, q) in queued {
            w.put(&seq.to_le_bytes())?;
            w.put(&q.due.to_le_bytes())?;
            w.put(&q.call.to_le_bytes())?;
            w.put(&q.phone.to_le_bytes())?;
        }
        w.put(&(ix.parked.len() as u32).to_le_bytes())?;
        for (phone, list) in &ix.parked {
            w.bytes(phone.as_bytes())?;
            // Ascending: the counted ones come first.
            let counted = list.partition_point(|seq| (*seq as usize) < n);
            w.put(&(counted as u32).to_le_bytes())?;
            for seq in list.range(..counted) {
                w.put(&seq.to_le_bytes())?;
            }
        }
        drop(ix);
        let crc = w.crc.clone().finalize();
        let mut file = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
        file.write_all(&crc.to_le_bytes()).map_err(io)?;
        Ok(Written { file, tmp, path: path.to_owned() })
    }

    /// The snapshot at `path`, if there is a sound one.
    pub fn load(path: &Path) -> Result<Option<Self>, StoreError> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut r = CrcRead { inner: BufReader::with_capacity(1 << 17, file), crc: crc32fast::Hasher::new() };
        let mut ix = Index::default();
        let mut magic = [0u8; 8];
        r.get(&mut magic)?;
        if &magic != MAGIC {
            return Ok(None);
        }
        ix.covered = r.u64()?;
        ix.marker_floor = r.u32()?;
        for i in 0..r.u32()? {
            let org = OrgId::parse(&r.string()?).map_err(|_| corrupt("bad org id in the snapshot"))?;
            ix.org_lookup.insert(org.as_str().to_owned(), i);
            ix.org_table.push(org);
        }
        let n = r.u32()? as usize;
        let org_count = ix.org_table.len();
        let sound = r.blocks::<RECORD>(n, |block| {
            let records = || block.chunks_exact(RECORD);
            let field = |rec: &[u8], at: usize| u64::from_le_bytes(rec[at..at + 8].try_into().unwrap_or_default());
            let half = |rec: &[u8], at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().unwrap_or_default());
            let mut last = ix.ids.last().copied();
            for rec in records() {
                let id = field(rec, 0);
                if last.is_some_and(|last| last >= id) || half(rec, 16) as usize >= org_count {
                    return false;
                }
                last = Some(id);
            }
            // Column by column: a tight copy each, where a push per field per record cost a
            // fifth of a start at a million events.
            ix.ids.extend(records().map(|rec| field(rec, 0)));
            ix.locs.extend(records().map(|rec| field(rec, 8)));
            ix.orgs.extend(records().map(|rec| half(rec, 16)));
            ix.states.extend(records().map(|rec| rec[20]));
            ix.fps.extend(records().map(|rec| short(field(rec, 21))));
            ix.expiry.extend(records().map(|rec| half(rec, 29)));
            true
        })?;
        if !sound {
            return Ok(None);
        }
        let phones = r.u32()?;
        for _ in 0..phones {
            let phone = r.string()?;
            ix.phones.insert(phone, r.u32()?);
        }
        // Keys are handed out by count: a table whose keys are not 0..len is not one we wrote.
        if ix.phones.len() != phones as usize || ix.phones.values().any(|k| *k >= phones) {
            return Ok(None);
        }
        let queued = r.u32()? as usize;
        let mut sound = true;
        r.items::<24>(queued, |q| {
            let seq = u32::from_le_bytes(q[..4].try_into().unwrap_or_default());
            let due = i64::from_le_bytes(q[4..12].try_into().unwrap_or_default());
            let call = u64::from_le_bytes(q[12..20].try_into().unwrap_or_default());
            let phone = u32::from_le_bytes(q[20..].try_into().unwrap_or_default());
            sound &= phone < phones;
            ix.enqueue(seq, due, call, phone);
        })?;
        if !sound {
            return Ok(None);
        }
        for _ in 0..r.u32()? {
            let phone = r.string()?;
            let len = r.u32()? as usize;
            // The length is not yet checked (the checksum comes last): a damaged one must not
            // reserve gigabytes, so the list grows as its entries actually arrive.
            let mut list = Vec::with_capacity(len.min(1 << 16));
            r.items::<4>(len, |seq| list.push(u32::from_le_bytes(*seq)))?;
            // Snapshots of earlier builds kept lists in arrival order, with repeats.
            list.sort_unstable();
            list.dedup();
            ix.parked.insert(phone, list.into());
        }
        let expected = r.crc.clone().finalize();
        let mut tail = [0u8; 4];
        r.inner.read_exact(&mut tail).map_err(io)?;
        if u32::from_le_bytes(tail) != expected {
            return Ok(None);
        }
        if ix.queued.keys().any(|s| *s as usize >= n) || ix.parked.values().flatten().any(|s| *s as usize >= n) {
            return Ok(None);
        }
        ix.mark_all(ix.marker_floor as usize..n);
        Ok(Some(ix))
    }
}

/// How finely [`Index::mark_all`] orders its inserts: the table in 1,024 stretches.
const MARK_ORDER_BITS: u32 = 10;

/// How many events [`Index::mark_all`] orders at a time: its scratch is a quarter megabyte
/// whatever the index holds, and each chunk still sweeps the table once, front to back.
const MARK_CHUNK: usize = 1 << 16;

impl Index {
    /// Marks the events of `seqs` that carry a replay key, into an empty table.
    ///
    /// hashbrown puts an entry at or just after its hash's low bits. Inserted in sequence order,
    /// nearly every insert touches a cache line and a page the last one did not, and with a
    /// million live markers that was most of the start-up. Inserted stretch by stretch, each
    /// insert lands near the last.
    fn mark_all(&mut self, seqs: std::ops::Range<usize>) {
        let fps = &self.fps;
        let live = seqs.clone().filter(|&s| fps[s] != 0).count();
        self.markers.reserve(live, |_| 0);
        // Buckets from the capacity hashbrown gives them (7/8 of them); only speed hangs on it.
        let buckets = (self.markers.capacity() / 7 * 8).next_power_of_two();
        let shift = buckets.trailing_zeros().saturating_sub(MARK_ORDER_BITS);
        let stretch = |s: usize| (spread(fps[s]) as usize & (buckets - 1)) >> shift;
        let mut starts = vec![0usize; (1 << MARK_ORDER_BITS) + 1];
        let mut order = Vec::with_capacity(MARK_CHUNK.min(live));
        for from in seqs.clone().step_by(MARK_CHUNK) {
            let chunk = from..(from + MARK_CHUNK).min(seqs.end);
            let marked = || chunk.clone().filter(|&s| fps[s] != 0);
            starts.fill(0);
            for s in marked() {
                starts[stretch(s) + 1] += 1;
            }
            for i in 1..starts.len() {
                starts[i] += starts[i - 1];
            }
            order.clear();
            order.resize(starts[starts.len() - 1], 0u32);
            for s in marked() {
                let at = &mut starts[stretch(s)];
                order[*at] = s as u32;
                *at += 1;
            }
            for &s in &order {
                self.markers.insert_unique(spread(fps[s as usize]), s, |x| spread(fps[*x as usize]));
            }
        }
    }
}

/// A snapshot in its temporary file, not yet durable nor in place.
pub struct Written {
    file: std::fs::File,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl Written {
    pub fn install(self) -> Result<(), StoreError> {
        self.file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

/// 3: queued events name their number (a snapshot of 2 is not loaded: the journal is read).
const MAGIC: &[u8; 8] = b"CGINDEX3";
const RECORD: usize = 33;
const BLOCK_RECORDS: usize = 2048;
/// Records a snapshot copies per hold of the index lock (about 2 MB, a millisecond or two).
const LOCKED_RECORDS: usize = 16 * BLOCK_RECORDS;

/// The part of a fingerprint the index keeps; 0 stays "none" and nothing else becomes it.
fn short(fp: u64) -> u32 {
    if fp == 0 {
        0
    } else {
        (fp as u32).max(1)
    }
}

/// The table's hash of a kept fingerprint. The table takes its bucket from the low bits and a
/// tag from the top seven, so the 32 bits are spread over all 64.
fn spread(f: u32) -> u64 {
    u64::from(f).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn expired(expiry_secs: u32, now_ms: i64) -> bool {
    i64::from(expiry_secs) * 1000 < now_ms
}

fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { tree: "event index", detail: detail.into() }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io { detail: e.to_string() }
}

struct Crc<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.crc.update(b);
        self.inner.write_all(b).map_err(io)
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.put(&(b.len() as u32).to_le_bytes())?;
        self.put(b)
    }
}

struct CrcRead<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> CrcRead<R> {
    fn get(&mut self, b: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_exact(b).map_err(io)?;
        self.crc.update(b);
        Ok(())
    }

    /// Reads `count` items of `N` bytes a block at a time (the checksum is cheap over a block
    /// and dear per item), handing each block (a whole number of items) to `take` until it
    /// says the snapshot is unsound. False if it did.
    fn blocks<const N: usize>(
        &mut self,
        count: usize,
        mut take: impl FnMut(&[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        let mut block = vec![0u8; N * count.min(BLOCK_RECORDS)];
        let mut left = count;
        while left > 0 {
            let n = left.min(BLOCK_RECORDS);
            let bytes = &mut block[..n * N];
            self.get(bytes)?;
            if !take(bytes) {
                return Ok(false);
            }
            left -= n;
        }
        Ok(true)
    }

    /// [`Self::blocks`], one item at a time, each taken as it comes.
    fn items<const N: usize>(&mut self, count: usize, mut take: impl FnMut(&[u8; N])) -> Result<(), StoreError> {
        self.blocks::<N>(count, |block| {
            block.chunks_exact(N).filter_map(|item| item.try_into().ok()).for_each(&mut take);
            true
        })
        .map(drop)
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.get(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        self.get(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let len = self.u32()? as usize;
        if len > 1024 {
            return Err(corrupt("a string in the snapshot is too long"));
        }
        let mut b = vec![0u8; len];
        self.get(&mut b)?;
        String::from_utf8(b).map_err(|_| corrupt("a string in the snapshot is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u32, org: &str) -> Entry<'_> {
        Entry {
            seq,
            id: u128::from(1_000 + seq) << 64 | u128::from(seq),
            fp: if seq.is_multiple_of(3) { 0 } else { u64::from(seq).wrapping_mul(0xA24B_AED4_963E_E407) | 1 },
            expiry_secs: 100 + seq,
            state: if seq.is_multiple_of(2) { DeliveryState::Delivered } else { DeliveryState::Pending },
            parked: seq % 4 == 1,
            due_ms: i64::from(seq),
            call: u64::from(seq % 7),
            org,
            phone: "ph_x",
        }
    }

    /// Writes `ix`'s snapshot to `path` as the store does (no writer going on meanwhile), and
    /// gives the index back.
    fn save(ix: Index, path: &Path) -> Index {
        let lock = std::sync::RwLock::new(ix);
        let read = || lock.read().unwrap();
        Index::write_snapshot(read(), read, path).unwrap().install().unwrap();
        lock.into_inner().unwrap()
    }

    #[test]
    fn a_snapshot_of_several_blocks_loads_back_the_same_index() {
        let orgs = [OrgId::generate(), OrgId::generate()];
        let mut ix = Index::default();
        let n = (BLOCK_RECORDS * 2 + 17) as u32;
        for seq in 0..n {
            ix.apply(seq as u64 * 64, &entry(seq, orgs[(seq % 2) as usize].as_str())).unwrap();
        }
        ix.apply(7, &Entry { state: DeliveryState::Dead, ..entry(5, orgs[1].as_str()) }).unwrap();
        ix.covered = n as u64 * 64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        let ix = save(ix, &path);
        let back = Index::load(&path).unwrap().expect("a sound snapshot");
        assert_eq!(back.len(), n);
        assert!(back.ids == ix.ids && back.locs == ix.locs && back.orgs == ix.orgs && back.states == ix.states);
        assert!(back.fps == ix.fps && back.expiry == ix.expiry);
        assert_eq!((back.covered, back.locs[5], back.states[5]), (ix.covered, 7, state_code(DeliveryState::Dead)));
        assert_eq!(back.org(n - 1), &orgs[((n - 1) % 2) as usize]);
        assert_eq!(back.due(i64::MAX, usize::MAX), ix.due(i64::MAX, usize::MAX));
        assert!(back.parked == ix.parked && ix.parked_len() > 0);
        for seq in [1, 2, BLOCK_RECORDS as u32, n - 1] {
            let fp = entry(seq, "").fp;
            assert_eq!(back.marked(fp, 0).collect::<Vec<_>>(), vec![seq], "seq {seq}");
        }
        assert_eq!(back.marked(entry(3, "").fp, 0).count(), 0, "no replay key, no marker");

        // A flipped byte anywhere in the records fails the checksum: the journal rebuilds.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Index::load(&path).unwrap().is_none());
    }

    #[test]
    fn markers_of_several_chunks_load_back_each_under_its_own_fingerprint() {
        let org = OrgId::generate();
        let mut ix = Index::default();
        let n = (MARK_CHUNK * 2 + 5) as u32;
        for seq in 0..n {
            ix.apply(seq as u64 * 64, &entry(seq, org.as_str())).unwrap();
        }
        // The oldest markers expire, so the loaded ones start past the first chunk's start.
        assert_eq!(ix.sweep(101 * 1000 + 1), 1);
        ix.covered = n as u64 * 64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        let ix = save(ix, &path);
        let back = Index::load(&path).unwrap().expect("a sound snapshot");
        assert_eq!(back.marker_floor, ix.marker_floor);
        assert_eq!(back.markers.len(), ix.markers.len());
        assert_eq!(contents(&back), contents(&ix));
        // Every third event has no replay key (`entry`); these are in the first, second and third chunk.
        for seq in [2, 4, MARK_CHUNK as u32 - 2, MARK_CHUNK as u32 + 1, n - 2] {
            assert_eq!(back.marked(entry(seq, "").fp, 0).collect::<Vec<_>>(), vec![seq], "seq {seq}");
        }
        assert_eq!(back.marked(entry(1, "").fp, 0).count(), 0, "swept before the snapshot");
    }

    /// A pending event of `phone` in call `call`, due at its sequence number, at `seq * 64`.
    fn pending<'a>(seq: u32, org: &'a str, phone: &'a str, call: u64) -> Entry<'a> {
        Entry {
            seq,
            id: u128::from(1_000 + seq) << 64,
            fp: 0,
            expiry_secs: 0,
            state: DeliveryState::Pending,
            parked: false,
            due_ms: i64::from(seq),
            call,
            org,
            phone,
        }
    }

    #[test]
    fn queued_events_waiting_for_a_retry_are_counted_apart_and_loaded_back_so() {
        let org = OrgId::generate();
        let org = org.as_str();
        let mut ix = Index::default();
        for seq in 0..4 {
            ix.apply(u64::from(seq) * 64, &pending(seq, org, "a", u64::from(seq))).unwrap();
        }
        let failed =
            |seq: u32| Entry { state: DeliveryState::Failed, due_ms: 60_000, ..pending(seq, org, "a", u64::from(seq)) };
        ix.apply(4 * 64, &failed(0)).unwrap();
        ix.apply(5 * 64, &failed(1)).unwrap();
        ix.apply(6 * 64, &failed(1)).unwrap();
        assert_eq!((ix.queued(), ix.retrying(), ix.retrying_of("a"), ix.retrying_of("b")), (4, 2, 2, 0));
        // Its retry delivers it; a redelivery queues another anew, as pending.
        ix.apply(7 * 64, &Entry { state: DeliveryState::Delivered, ..failed(0) }).unwrap();
        ix.apply(8 * 64, &pending(1, org, "a", 1)).unwrap();
        assert_eq!((ix.queued(), ix.retrying()), (3, 0));
        ix.apply(9 * 64, &failed(2)).unwrap();
        // Held while its upstream is down, it is parked; released, it is due at once.
        assert_eq!(ix.hold(2, "a"), 1);
        assert_eq!((ix.queued(), ix.retrying()), (2, 0));
        assert_eq!(ix.release("a", 10, |_| Some(2)), 1);
        assert_eq!((ix.queued(), ix.retrying()), (3, 0), "released, it is due at once");
        ix.apply(10 * 64, &failed(3)).unwrap();
        assert_eq!((ix.queued(), ix.retrying()), (3, 1));
        ix.covered = 11 * 64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        let ix = save(ix, &path);
        let back = Index::load(&path).unwrap().expect("a sound snapshot");
        assert_eq!((back.queued(), back.retrying(), back.retrying_of("a")), (3, 1, 1));
        assert_eq!(contents(&back), contents(&ix));
    }

    #[test]
    fn held_events_wait_parked_in_order_and_go_back_a_bounded_number_at_a_time() {
        let org = OrgId::generate();
        let org = org.as_str();
        // Calls 1 (events 0, 2, 4) and 2 (events 1, 3) of number a.
        let call = |seq: u32| u64::from(seq % 2 + 1);
        let call_at = |at: Loc| Some(call((at / 64) as u32));
        let mut ix = Index::default();
        for seq in 0..4 {
            ix.apply(u64::from(seq) * 64, &pending(seq, org, "ph_a", call(seq))).unwrap();
        }
        assert_eq!((ix.queued(), ix.call_head(1)), (4, Some(0)));

        // Holding an event parks its call's other queued events with it, in order; only what
        // was queued can be held.
        assert_eq!(ix.hold(2, "ph_a"), 2);
        assert_eq!((ix.hold(0, "ph_a"), ix.hold(99, "ph_a")), (0, 0));
        assert_eq!((ix.due(i64::MAX, 10), ix.queued()), (vec![1], 2), "3 waits behind 1, its call's first");
        assert_eq!(ix.call_head(1), None, "call 1 waits whole off the queue");
        // The number's next event parks behind them though its record says queued (else it
        // could overtake event 2 of its call); another number's event is queued.
        ix.apply(4 * 64, &pending(4, org, "ph_a", call(4))).unwrap();
        ix.apply(5 * 64, &pending(5, org, "ph_b", 9)).unwrap();
        assert_eq!((ix.due(i64::MAX, 10), ix.queued()), (vec![1, 5], 3));
        assert_eq!((ix.parked_len(), ix.parked_phones()), (3, vec!["ph_a".to_owned()]));
        // A later version of a parked event (an answer noted on it) leaves it parked, once.
        ix.apply(6 * 64, &Entry { parked: true, ..pending(2, org, "ph_a", call(2)) }).unwrap();
        assert_eq!((ix.parked_len(), ix.queued()), (3, 3));

        // Released oldest first, two at a time, due at once, each under its call again.
        assert_eq!(ix.release("ph_b", 5, call_at), 0);
        assert_eq!(ix.release("ph_a", 2, call_at), 2);
        // The numbers take turns: a's first, b's, then a's next.
        assert_eq!((ix.due(i64::MAX, 10), ix.queued()), (vec![0, 5, 1], 5));
        assert_eq!((ix.call_head(1), ix.parked_len()), (Some(0), 1));
        // Event 4 is delivered while parked (a redelivery's record): the release skips it, and
        // the number, with nothing left parked, queues its new events again.
        ix.apply(7 * 64, &Entry { state: DeliveryState::Delivered, ..pending(4, org, "ph_a", call(4)) }).unwrap();
        assert_eq!(ix.release("ph_a", 5, call_at), 0);
        assert!(ix.parked_phones().is_empty());
        ix.apply(8 * 64, &pending(6, org, "ph_a", call(6))).unwrap();
        assert_eq!((ix.due(i64::MAX, 10), ix.queued()), (vec![0, 5, 1], 6));

        // Events whose records cannot be read stay parked, in order.
        assert_eq!((ix.hold(6, "ph_a"), ix.hold(5, "ph_b")), (3, 1), "6 takes call 1's 0 and 2 with it");
        assert_eq!(ix.release("ph_a", 5, |_| None), 0);
        // Each with where its latest version is (event 2's answer was noted at 6 * 64).
        assert_eq!(ix.parked_head("ph_a", 5), [(0, 0), (2, 6 * 64), (6, 8 * 64)]);
        assert_eq!(ix.release("ph_a", 5, call_at), 3);
        assert_eq!((ix.due(i64::MAX, 10), ix.queued()), (vec![0, 1], 5));
        assert_eq!((ix.call_head(1), ix.call_head(2)), (Some(0), Some(1)));
    }

    #[test]
    fn a_pass_takes_the_organizations_due_heads_in_turn_however_deep_ones_backlog() {
        let (deep, other, third) = (OrgId::generate(), OrgId::generate(), OrgId::generate());
        let mut ix = Index::default();
        // One organization's 600 calls, due first (0..600), then two calls of another (600,
        // 601, due then) and a third organization's call with a second event behind its first.
        for seq in 0..600 {
            ix.apply(u64::from(seq) * 64, &pending(seq, deep.as_str(), "ph_a", u64::from(seq))).unwrap();
        }
        for (seq, org, call) in [(600, &other, 1_000), (601, &other, 1_001), (602, &third, 2_000), (603, &third, 2_000)]
        {
            ix.apply(u64::from(seq) * 64, &pending(seq, org.as_str(), "ph_b", call)).unwrap();
        }
        // Before, the first 512 of the queue were all the deep one's.
        assert_eq!(ix.due(i64::MAX, 5), [0, 600, 602, 1, 601]);
        let most = ix.due(i64::MAX, 512);
        assert_eq!(most.len(), 512);
        assert!([600, 601, 602].iter().all(|s| most.contains(s)) && !most.contains(&603));
        // Only what is due by then: the third organization's call is not yet.
        assert_eq!(ix.due(601, 10), [0, 600, 1, 601, 2, 3, 4, 5, 6, 7]);
        assert_eq!(ix.next_due(), Some(0));
        // The third's first delivered: its second event heads the call, due when it was.
        ix.apply(700 * 64, &Entry { state: DeliveryState::Delivered, ..pending(602, third.as_str(), "ph_b", 2_000) })
            .unwrap();
        assert_eq!(ix.due(i64::MAX, 4), [0, 600, 603, 1]);
        // The deep one's backlog delivered, the next due is another's.
        for seq in 0..600 {
            let done = Entry { state: DeliveryState::Delivered, ..pending(seq, deep.as_str(), "ph_a", u64::from(seq)) };
            ix.apply(u64::from(701 + seq) * 64, &done).unwrap();
        }
        assert_eq!((ix.next_due(), ix.due(i64::MAX, 10)), (Some(600), vec![600, 603, 601]));
    }

    #[test]
    fn an_organizations_numbers_share_its_turns_however_deep_ones_backlog() {
        let (org, other) = (OrgId::generate(), OrgId::generate());
        let mut ix = Index::default();
        // One number's 600 calls, due first; then two calls of a second number of the same
        // organization, one of a third, and another organization's one.
        for seq in 0..600 {
            ix.apply(u64::from(seq) * 64, &pending(seq, org.as_str(), "ph_a", u64::from(seq))).unwrap();
        }
        let rest = [(600, &org, "ph_b", 1_000), (601, &org, "ph_b", 1_001), (602, &org, "ph_c", 2_000)];
        for (seq, org, phone, call) in rest.into_iter().chain([(603, &other, "ph_d", 3_000)]) {
            ix.apply(u64::from(seq) * 64, &pending(seq, org.as_str(), phone, call)).unwrap();
        }
        // The organizations in turn, and within the first its numbers in turn, by their earliest.
        assert_eq!(ix.due(i64::MAX, 8), [0, 603, 600, 602, 1, 601, 2, 3]);
        // Before, the organization's share of a pass's read was all the first number's.
        let most = ix.due(i64::MAX, 512);
        assert_eq!(most.len(), 512);
        assert!([600, 601, 602, 603].iter().all(|s| most.contains(s)));
        // What is not due yet waits its time, whoever's turn it is.
        assert_eq!(ix.due(600, 5), [0, 600, 1, 2, 3]);
        // The second number's first delivered: its second call takes its turns.
        ix.apply(700 * 64, &Entry { state: DeliveryState::Delivered, ..pending(600, org.as_str(), "ph_b", 1_000) })
            .unwrap();
        assert_eq!(ix.due(i64::MAX, 6), [0, 603, 601, 602, 1, 2]);
        assert_eq!(ix.next_due(), Some(0));
    }

    /// What the index holds, column by column and in its queues, for comparing two.
    fn contents(ix: &Index) -> impl PartialEq + std::fmt::Debug {
        let all = |c: &Column<u64>| (0..c.len()).map(|s| c[s]).collect::<Vec<_>>();
        let markers: Vec<Vec<u32>> = (0..ix.ids.len())
            .map(|s| {
                let mut m: Vec<u32> = ix.markers.iter_hash(spread(ix.fps[s])).copied().collect();
                m.sort_unstable();
                m
            })
            .collect();
        let states: Vec<u8> = (0..ix.states.len()).map(|s| ix.states[s]).collect();
        let mut queued: Vec<_> = ix.queued.iter().map(|(s, v)| (*s, *v)).collect();
        queued.sort_unstable_by_key(|(s, _)| *s);
        (all(&ix.ids), all(&ix.locs), states, markers, queued, ix.due(i64::MAX, usize::MAX), ix.parked.clone())
    }

    #[test]
    fn a_snapshot_taken_while_the_writer_goes_on_replays_to_the_same_index() {
        let org = OrgId::generate();
        let org = org.as_str();
        let n = (LOCKED_RECORDS * 3 + 5) as u32;
        let mut ix = Index::default();
        for seq in 0..n {
            ix.apply(u64::from(seq) * 64, &entry(seq, org)).unwrap();
        }
        ix.covered = u64::from(n) * 64;
        let lock = std::sync::RwLock::new(ix);
        // Each time the snapshot takes the lock back, the writer has applied a batch first: a
        // new event, and new versions of an event already copied and of one not copied yet.
        let tail = std::sync::Mutex::new(Vec::new());
        let again = || {
            let mut ix = lock.write().unwrap();
            let at = ix.covered;
            let len = ix.len();
            let copied = (tail.lock().unwrap().len() as u32) * 7 + 1;
            let batch = [
                Entry { state: DeliveryState::Pending, parked: false, phone: "ph_y", ..entry(len, org) },
                Entry { state: DeliveryState::Delivered, ..entry(copied, org) },
                Entry { state: DeliveryState::Failed, due_ms: 99, ..entry(n - 2 - copied, org) },
            ];
            for (i, e) in batch.iter().enumerate() {
                ix.apply(at + i as u64 * 64, e).unwrap();
            }
            ix.covered = at + 3 * 64;
            tail.lock().unwrap().push((at, batch.map(|e| (e.seq, e.state, e.due_ms, e.parked, e.phone))));
            drop(ix);
            lock.read().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        Index::write_snapshot(lock.read().unwrap(), again, &path).unwrap().install().unwrap();
        let tail = tail.into_inner().unwrap();
        assert_eq!(tail.len(), 3, "the lock was let go between every part");

        // A start loads the snapshot and replays the journal from where it covers.
        let mut back = Index::load(&path).unwrap().expect("a sound snapshot");
        assert_eq!((back.len(), back.covered), (n, u64::from(n) * 64));
        for (at, batch) in &tail {
            for (i, (seq, state, due_ms, parked, phone)) in batch.iter().enumerate() {
                let e = Entry { state: *state, due_ms: *due_ms, parked: *parked, phone, ..entry(*seq, org) };
                back.apply(at + i as u64 * 64, &e).unwrap();
            }
        }
        let live = lock.into_inner().unwrap();
        assert_eq!(contents(&back), contents(&live));
    }

    #[test]
    fn a_snapshot_claiming_a_huge_parked_list_is_refused_without_reserving_for_it() {
        let org = OrgId::generate();
        let mut ix = Index::default();
        for seq in 0..64 {
            ix.apply(u64::from(seq) * 64, &entry(seq, org.as_str())).unwrap();
        }
        let parked = ix.parked_len();
        assert_eq!((parked, ix.parked_phones().len()), (32, 1), "every pending one, behind the first");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        save(ix, &path);
        // The last list's length sits before its entries and the checksum. A damaged one is
        // found out by the checksum, once the list is read: nothing may be set aside for it
        // before then (16 GiB here, which a small machine cannot give).
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 4 - 4 * parked - 4;
        assert_eq!(bytes[at..at + 4], (parked as u32).to_le_bytes());
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(!matches!(Index::load(&path), Ok(Some(_))));
    }

    /// The index as the writer and the outbox drive it, beside the truth about each event: its
    /// phone, its call and its state.
    struct Sim<'a> {
        ix: Index,
        /// The organization of each phone's events (by the phone's place in `PHONES`).
        orgs: [&'a str; 2],
        model: Vec<(usize, u64, DeliveryState)>,
        seq_at: HashMap<Loc, u32>,
        at: Loc,
    }

    const PHONES: [&str; 3] = ["ph_a", "ph_b", "ph_c"];

    impl Sim<'_> {
        /// Applies a version of event `seq` (a new one when `seq` is the next).
        fn put(&mut self, seq: u32, state: DeliveryState, parked: bool, due_ms: i64) {
            let (p, call, _) = self.model[seq as usize];
            self.at += 64;
            let e = Entry { state, parked, due_ms, ..pending(seq, self.orgs[p % 2], PHONES[p], call) };
            self.ix.apply(self.at, &e).unwrap();
            self.seq_at.insert(self.at, seq);
            self.model[seq as usize].2 = state;
        }

        /// The due events that head their calls: what the outbox would try.
        fn heads(&self) -> Vec<u32> {
            self.ix.due(i64::MAX, usize::MAX)
        }

        fn pending(&self) -> Vec<u32> {
            (0..self.model.len() as u32).filter(|s| undelivered(state_code(self.model[*s as usize].2))).collect()
        }
    }

    /// Every pending event is on the queue or parked, never both and never neither, and none
    /// is queued while an earlier pending event of its call is parked (it could go first):
    /// checked after every step of random sequences of what the writer and the outbox do, and
    /// across snapshots.
    #[test]
    fn no_pending_event_is_lost_or_overtaken_whatever_the_order_of_steps() {
        use rand::{Rng, SeedableRng};
        use std::collections::HashSet;
        let orgs = [OrgId::generate(), OrgId::generate()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        for seed in 0..24 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let orgs = [orgs[0].as_str(), orgs[1].as_str()];
            let mut sim = Sim { ix: Index::default(), orgs, model: Vec::new(), seq_at: HashMap::new(), at: 0 };
            for step in 0..400i64 {
                let pick = |rng: &mut rand::rngs::StdRng, from: Vec<u32>| {
                    from.get(rng.gen_range(0..from.len().max(1))).copied()
                };
                match rng.gen_range(0..12) {
                    // A new event; now and then recorded parked (no upstream).
                    0..=3 => {
                        let p = rng.gen_range(0..PHONES.len());
                        sim.model.push((p, p as u64 * 100 + rng.gen_range(0..5), DeliveryState::Pending));
                        let parked = rng.gen_bool(0.1);
                        sim.put(sim.model.len() as u32 - 1, DeliveryState::Pending, parked, step);
                    }
                    // An attempt's outcome: for a call's head as a rule; now and then for an
                    // event held while its attempt was out.
                    4..=5 => {
                        let from = if rng.gen_bool(0.9) { sim.heads() } else { sim.pending() };
                        if let Some(seq) = pick(&mut rng, from) {
                            let outcome = [DeliveryState::Delivered, DeliveryState::Failed, DeliveryState::Dead];
                            sim.put(seq, outcome[rng.gen_range(0..3)], false, step + 10);
                        }
                    }
                    // A redelivery of a finished event, or an answer noted on any (whose record
                    // keeps the flag the event was recorded with).
                    6 if !sim.model.is_empty() => {
                        let seq = rng.gen_range(0..sim.model.len() as u32);
                        let state = match sim.model[seq as usize].2 {
                            DeliveryState::Delivered | DeliveryState::Dead => DeliveryState::Pending,
                            same => same,
                        };
                        let parked = rng.gen_bool(0.5);
                        sim.put(seq, state, parked, step);
                    }
                    // A due call head whose upstream is held.
                    7..=8 => {
                        if let Some(seq) = pick(&mut rng, sim.heads()) {
                            assert!(sim.ix.hold(seq, PHONES[sim.model[seq as usize].0]) >= 1);
                        }
                    }
                    // The outbox releases a few of a number's parked events.
                    9..=10 => {
                        let phone = PHONES[rng.gen_range(0..PHONES.len())];
                        let (model, seq_at) = (&sim.model, &sim.seq_at);
                        let call_of = |loc: Loc| seq_at.get(&loc).map(|s| model[*s as usize].1);
                        sim.ix.release(phone, rng.gen_range(0..4), call_of);
                    }
                    // A snapshot, and a start from it.
                    _ => {
                        let live = save(std::mem::take(&mut sim.ix), &path);
                        let back = Index::load(&path).unwrap().expect("a sound snapshot");
                        assert_eq!(contents(&back), contents(&live), "seed {seed} step {step}");
                        sim.ix = back;
                    }
                }

                let ix = &sim.ix;
                let queued: HashSet<u32> = ix.queued.keys().copied().collect();
                for list in ix.parked.values() {
                    assert!(list.iter().zip(list.iter().skip(1)).all(|(a, b)| a < b), "seed {seed} step {step}");
                }
                let mut first_parked: HashMap<u64, u32> = HashMap::new();
                for (seq, (p, call, state)) in sim.model.iter().enumerate() {
                    let seq = seq as u32;
                    let q = queued.contains(&seq);
                    let k = ix.parked.get(PHONES[*p]).is_some_and(|l| l.binary_search(&seq).is_ok());
                    if undelivered(state_code(*state)) {
                        assert!(q != k, "seed {seed} step {step}: event {seq} queued {q}, parked {k}");
                        if k {
                            first_parked.entry(*call).or_insert(seq);
                        }
                    } else {
                        assert!(!q, "seed {seed} step {step}: finished event {seq} is queued");
                    }
                }
                let mut first_queued: HashMap<u64, u32> = HashMap::new();
                for seq in &queued {
                    let call = sim.model[*seq as usize].1;
                    assert!(
                        first_parked.get(&call).is_none_or(|first| seq < first),
                        "seed {seed} step {step}: event {seq} is queued behind a parked earlier one of call {call}"
                    );
                    let first = first_queued.entry(call).or_insert(*seq);
                    *first = (*first).min(*seq);
                }
                // What a pass is offered is each call's first queued event, and no other; the
                // earliest of those is when the next is due.
                let mut heads = sim.heads();
                heads.sort_unstable();
                let mut want: Vec<u32> = first_queued.into_values().collect();
                want.sort_unstable();
                assert_eq!(heads, want, "seed {seed} step {step}");
                let earliest = want.iter().map(|s| ix.queued[s].due).min();
                assert_eq!(ix.next_due(), earliest, "seed {seed} step {step}");
            }
        }
    }
}
