//! Events, their deliveries and their replay markers: one journal record per new event or new
//! version, written by the single durable writer; the in-memory index points into it.
//!
//! A record is a fixed binary part (everything the index needs: sequence number, id, replay
//! fingerprint, delivery state and due time, call, org, phone), then the event's JSON (absent
//! when unchanged from an earlier version, which the record then points to), then the delivery
//! record's JSON. Ids are given out here, in recording order, so they ascend with the sequence
//! numbers and an id is found by binary search.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use super::event_index::{state_code, state_from, Entry, Index};
use super::journal::{frame, Access, Journal, JournalOptions, Loc, Segments, TornTail, FRAME_MAX};
use super::{
    decode_event, encode, encode_event, DeliveryRecord, DeliveryState, EventFilter, EventRecord, PreparedEvent,
    Recorded, StoreError, SCHEMA,
};
use crate::domain::{EventId, OrgId};

pub(super) const VERSION: u8 = 1;
/// `event_loc` of a record that carries its own event JSON.
pub(super) const HERE: Loc = u64::MAX;
/// A journal tail longer than this at start-up is worth a fresh snapshot straight away.
const SNAPSHOT_AFTER: usize = if cfg!(test) { 100 } else { 50_000 };

fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { tree: "events", detail: detail.into() }
}

fn hash64(bytes: &[u8]) -> u64 {
    let h = Sha256::digest(bytes);
    u64::from_le_bytes(h[..8].try_into().unwrap_or_default())
}

/// The fingerprint the index keeps of a replay key (never 0, which means "none").
pub fn fingerprint(key: &[u8]) -> u64 {
    hash64(key).max(1)
}

/// The 64-bit hash that groups a call's deliveries.
fn call_hash(call_key: &str) -> u64 {
    hash64(call_key.as_bytes())
}

/// The call of event `id` recorded with `call_key`: an empty key (an event of no call, whose id
/// was not known when it was prepared) is the event's own call, keyed by its id as its delivery
/// record shows once read (`DeliveryRecord::first`).
fn call_of(call_key: &str, id: u128) -> u64 {
    if call_key.is_empty() {
        call_hash(EventId::from_value(id).as_str())
    } else {
        call_hash(call_key)
    }
}

/// The sequence number an id points at (by its high half) and the id's full value.
fn seq_of(ix: &Index, id: &EventId) -> Option<(u32, u128)> {
    let v = id.value()?;
    Some((ix.seq_of((v >> 64) as u64)?, v))
}

/// A decoded record, borrowing from its bytes.
pub(super) struct Record<'a> {
    pub entry: Entry<'a>,
    pub event_loc: Loc,
    pub replay_key: &'a [u8],
    pub event: &'a [u8],
    pub delivery: &'a [u8],
}

/// The largest event a record takes: half a frame, so that its later versions (with an answer
/// beside it) fit as well.
pub(super) const EVENT_MAX: usize = FRAME_MAX as usize / 2;

/// Whether a new event's record can be written so that it reads back: its replay key within
/// the length its two bytes of length can say, the event within [`EVENT_MAX`]. Anything longer
/// would be written durably and then never read again, stopping every later start.
fn fits(replay_key: &[u8], event: &[u8]) -> bool {
    replay_key.len() <= usize::from(u16::MAX) && event.len() <= EVENT_MAX
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    debug_assert!(s.len() <= usize::from(u16::MAX), "a string the writer did not check");
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s);
}

pub(super) fn encode_record(buf: &mut Vec<u8>, r: &Record<'_>) {
    let e = &r.entry;
    buf.push(VERSION);
    buf.extend_from_slice(&e.seq.to_le_bytes());
    buf.extend_from_slice(&e.id.to_le_bytes());
    buf.extend_from_slice(&e.fp.to_le_bytes());
    buf.extend_from_slice(&e.expiry_secs.to_le_bytes());
    buf.push(state_code(e.state));
    buf.push(u8::from(e.parked));
    buf.extend_from_slice(&e.due_ms.to_le_bytes());
    buf.extend_from_slice(&e.call.to_le_bytes());
    buf.extend_from_slice(&r.event_loc.to_le_bytes());
    put_str(buf, e.org.as_bytes());
    put_str(buf, e.phone.as_bytes());
    put_str(buf, r.replay_key);
    buf.extend_from_slice(&(r.event.len() as u32).to_le_bytes());
    buf.extend_from_slice(r.event);
    buf.extend_from_slice(r.delivery);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt("record cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        self.take(N)?.try_into().map_err(|_| corrupt("record cut short"))
    }

    fn str16(&mut self) -> Result<&'a [u8], StoreError> {
        let n = u16::from_le_bytes(self.array()?) as usize;
        self.take(n)
    }
}

fn utf8(b: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(b).map_err(|_| corrupt("record holds a non-UTF-8 id"))
}

pub(super) fn decode_record(bytes: &[u8]) -> Result<Record<'_>, StoreError> {
    let mut c = Cursor(bytes);
    let [version] = c.array()?;
    if version != VERSION {
        return Err(corrupt(format!("unknown record version {version}")));
    }
    let seq = u32::from_le_bytes(c.array()?);
    let id = u128::from_le_bytes(c.array()?);
    let fp = u64::from_le_bytes(c.array()?);
    let expiry_secs = u32::from_le_bytes(c.array()?);
    let [state] = c.array()?;
    let state = state_from(state).ok_or_else(|| corrupt(format!("unknown delivery state {state}")))?;
    let [parked] = c.array()?;
    let due_ms = i64::from_le_bytes(c.array()?);
    let call = u64::from_le_bytes(c.array()?);
    let event_loc = u64::from_le_bytes(c.array()?);
    let org = utf8(c.str16()?)?;
    let phone = utf8(c.str16()?)?;
    let replay_key = c.str16()?;
    let event_len = u32::from_le_bytes(c.array()?) as usize;
    let event = c.take(event_len)?;
    let delivery = c.0;
    Ok(Record {
        entry: Entry { seq, id, fp, expiry_secs, state, parked: parked != 0, due_ms, call, org, phone },
        event_loc,
        replay_key,
        event,
        delivery,
    })
}

fn dec_event(bytes: &[u8]) -> Result<EventRecord, StoreError> {
    decode_event(bytes).map_err(corrupt)
}

/// Whether a record's delivery part reads back (empty: made from the event when read).
pub(super) fn delivery_readable(bytes: &[u8]) -> bool {
    bytes.is_empty() || dec::<DeliveryRecord>(bytes).is_ok()
}

fn dec<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&SCHEMA, rest)) => serde_json::from_slice(rest).map_err(|e| corrupt(e.to_string())),
        _ => Err(corrupt("unknown schema version")),
    }
}

/// Hands out ids that ascend in recording order: UUIDv7 with the millisecond, a 12-bit counter
/// for events in the same millisecond, and 62 random bits.
#[derive(Default)]
struct IdGen {
    last_ms: u64,
    counter: u16,
}

impl IdGen {
    fn resume(last_high: Option<u64>) -> Self {
        match last_high {
            Some(h) => IdGen { last_ms: h >> 16, counter: (h & 0x0fff) as u16 },
            None => IdGen::default(),
        }
    }

    fn next(&mut self, now_ms: i64) -> u128 {
        let ms = (now_ms.max(0) as u64) & 0xffff_ffff_ffff;
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = 0;
        } else if self.counter >= 0x0fff {
            self.last_ms += 1;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
        let high = (self.last_ms << 16) | 0x7000 | u64::from(self.counter);
        let low = (rand::random::<u64>() >> 2) | (0b10 << 62);
        (u128::from(high) << 64) | u128::from(low)
    }
}

/// What one batch asks of the journal.
pub struct Batch<'a> {
    pub events: &'a [PreparedEvent],
    pub deliveries: &'a [DeliveryRecord],
    pub answers: &'a [(EventId, serde_json::Value)],
}

pub struct EventLog {
    journal: Mutex<Journal>,
    segments: Arc<Segments>,
    /// Readers clone what they need and let go; only the writer takes it for writing, once per
    /// batch.
    index: RwLock<Index>,
    ids: Mutex<IdGen>,
    snapshot: PathBuf,
    /// The batch buffer, kept between batches: allocating and freeing it each time made the
    /// allocator consolidate its heap on the hot path.
    scratch: Mutex<Vec<u8>>,
    /// Frames written since the index was last saved.
    unsaved: std::sync::atomic::AtomicUsize,
    /// Taken by a snapshot from start to end, so two never share the temporary file.
    saving: Mutex<()>,
    /// Versions found unreadable since start (a damaged disk or a file edited by hand): each
    /// is logged once, then passed over by the readers that walk many events.
    damaged: Mutex<std::collections::HashSet<Loc>>,
}

/// Where the journal in `dir` holds less than the index snapshot says it did: a segment
/// missing, or cut back before the snapshot's end or before a record the snapshot points at
/// (deleted or truncated by hand, a disk that lost writes). Rebuilding the index from what is
/// left would go on without those events and overwrite the snapshot, the one record that they
/// were there. A pass over one number an event, about a millisecond at a million events.
pub(super) fn short_of(dir: &Path, index: &Index) -> Result<Option<String>, StoreError> {
    if index.covered == 0 {
        return Ok(None);
    }
    let numbers = super::journal::segment_numbers(dir)?;
    // The least length each segment must have: past the snapshot's end, and past the header
    // of every latest version the index holds.
    let mut needs: Vec<u64> = Vec::new();
    let mut need = |seg: u32, len: u64| {
        let seg = seg as usize;
        if needs.len() <= seg {
            needs.resize(seg + 1, 0);
        }
        needs[seg] = needs[seg].max(len);
    };
    let (seg, off) = super::journal::split(index.covered);
    need(seg, off);
    // And the last record the index holds in each: a segment is made at its full size, zeros
    // ahead of what is written, so a length alone does not show writes the disk lost.
    let mut last: Vec<Option<u64>> = Vec::new();
    for at in index.locs.iter() {
        let (seg, off) = super::journal::split(*at);
        need(seg, off + super::journal::FRAME_HEADER as u64);
        let seg = seg as usize;
        if last.len() <= seg {
            last.resize(seg + 1, None);
        }
        last[seg] = last[seg].max(Some(off));
    }
    for (seg, need) in needs.into_iter().enumerate().filter(|(_, n)| *n > 0) {
        let seg = seg as u32;
        if numbers.binary_search(&seg).is_err() {
            return Ok(Some(format!("journal segment {seg} is missing, and the index snapshot holds events in it")));
        }
        let path = dir.join(super::journal::segment_file(seg));
        let len = std::fs::metadata(&path).map_err(|e| StoreError::Io { detail: e.to_string() })?.len();
        if len < need {
            return Ok(Some(format!(
                "journal segment {seg} ends at byte {len}, and the index snapshot holds events up to byte {need}"
            )));
        }
        if let Some(off) = last.get(seg as usize).copied().flatten() {
            use std::os::unix::fs::FileExt;
            let mut frame_len = [0u8; 4];
            let file = std::fs::File::open(&path).map_err(|e| StoreError::Io { detail: e.to_string() })?;
            file.read_exact_at(&mut frame_len, off).map_err(|e| StoreError::Io { detail: e.to_string() })?;
            // A damaged record is passed over when read; zeros are a record never written.
            if frame_len == [0; 4] {
                return Ok(Some(format!(
                    "journal segment {seg} holds zeros at byte {off}, where the index snapshot has a record"
                )));
            }
        }
    }
    Ok(None)
}

impl EventLog {
    pub fn open(dir: &Path, options: JournalOptions, access: Access) -> Result<Self, StoreError> {
        if access == Access::Serve {
            std::fs::create_dir_all(dir).map_err(|e| corrupt(format!("cannot create {}: {e}", dir.display())))?;
        }
        let snapshot = dir.join("index.snapshot");
        let mut index = match Index::load(&snapshot) {
            Ok(Some(ix)) => ix,
            Ok(None) => Index::default(),
            Err(e) => {
                tracing::warn!(error = %e, "the event index snapshot is unreadable; rebuilding from the journal");
                Index::default()
            }
        };
        if let Some(problem) = short_of(dir, &index)? {
            return Err(corrupt(format!(
                "{problem}: events that were acknowledged are gone from the journal. Nothing was changed; \
                 restore db/events/ from a backup, or run `callgate salvage` to go on with what is left"
            )));
        }
        let mut replayed = 0usize;
        let journal = match Journal::open(dir, index.covered, options, access, |at, bytes| {
            replayed += 1;
            index.apply(at, &decode_record(bytes)?.entry)
        }) {
            Ok(j) => j,
            Err(e) if index.covered != 0 => {
                tracing::warn!(error = %e, "the event index snapshot does not match the journal; rebuilding");
                index = Index::default();
                replayed = 0;
                Journal::open(dir, 0, options, access, |at, bytes| {
                    replayed += 1;
                    index.apply(at, &decode_record(bytes)?.entry)
                })?
            }
            Err(e) => return Err(e),
        };
        index.covered = journal.end();
        let log = EventLog {
            ids: Mutex::new(IdGen::resume(index.ids.last().copied())),
            segments: journal.segments(),
            journal: Mutex::new(journal),
            index: RwLock::new(index),
            snapshot,
            scratch: Mutex::new(Vec::new()),
            unsaved: Default::default(),
            saving: Mutex::default(),
            damaged: Mutex::default(),
        };
        log.unsaved.store(replayed, std::sync::atomic::Ordering::Relaxed);
        if access == Access::Serve {
            log.snapshot_if_due()?;
        }
        Ok(log)
    }

    /// The torn write an inspection found and left at the journal's end.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner()).torn_tail()
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the index so the next start need not read the whole journal.
    pub fn save_snapshot(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let first = self.read_index();
        // Read under the same hold as the journal position the snapshot covers: the writer
        // counts its frames and moves that position in one hold of the index.
        let frames = self.unsaved.load(std::sync::atomic::Ordering::Relaxed);
        let written = Index::write_snapshot(first, || self.read_index(), &self.snapshot)?;
        // The sync (most of the time at a million events) holds up no one: the snapshot says
        // how far it covers, and a start reads the journal from there.
        written.install()?;
        self.unsaved.fetch_sub(frames, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Saves the index once enough has been written since the last save, so a start after a
    /// crash reads at most about that many frames. True if it saved.
    pub fn snapshot_if_due(&self) -> Result<bool, StoreError> {
        if self.unsaved.load(std::sync::atomic::Ordering::Relaxed) < SNAPSHOT_AFTER {
            return Ok(false);
        }
        self.save_snapshot().map(|()| true)
    }

    fn read(&self, at: Loc) -> Result<Vec<u8>, StoreError> {
        self.segments.read(at)
    }

    /// The event a version holds, or the one its pointer leads to when it did not change it.
    fn event_of(&self, r: &Record<'_>) -> Result<EventRecord, StoreError> {
        let mut ev: EventRecord = if r.event_loc == HERE {
            dec_event(r.event)?
        } else {
            dec_event(decode_record(&self.read(r.event_loc)?)?.event)?
        };
        ev.id = EventId::from_value(r.entry.id);
        Ok(ev)
    }

    /// The event and delivery record of the version at `at`.
    fn load(&self, at: Loc) -> Result<(EventRecord, DeliveryRecord), StoreError> {
        let bytes = self.read(at)?;
        let r = decode_record(&bytes)?;
        let ev = self.event_of(&r)?;
        // A version that left the delivery as the event started it holds none.
        let mut delivery = if r.delivery.is_empty() { DeliveryRecord::first(&ev) } else { dec(r.delivery)? };
        delivery.event_id = EventId::from_value(r.entry.id);
        Ok((ev, delivery))
    }

    /// [`Self::load`] for the readers that walk many events: a version that cannot be read is
    /// reported once and passed over, so that one damaged frame neither hides every other
    /// event from a list nor stops the outbox for every number.
    fn load_or_pass(&self, at: Loc) -> Option<(EventRecord, DeliveryRecord)> {
        self.load(at).map_err(|e| self.pass_over(at, &e)).ok()
    }

    fn pass_over(&self, at: Loc, e: &StoreError) {
        if self.damaged.lock().unwrap_or_else(|e| e.into_inner()).insert(at) {
            tracing::error!(error = %e, at, "an event's record cannot be read and is passed over; `callgate check` reports the journal's damage");
        }
    }

    /// How many versions were found unreadable since start.
    pub fn damaged(&self) -> usize {
        self.damaged.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn find(&self, org: &OrgId, id: &EventId) -> Option<Loc> {
        let ix = self.read_index();
        let (seq, _) = seq_of(&ix, id)?;
        (ix.org(seq) == org).then(|| ix.locs[seq as usize])
    }

    fn get_both(&self, org: &OrgId, id: &EventId) -> Result<Option<(EventRecord, DeliveryRecord)>, StoreError> {
        let Some(at) = self.find(org, id) else { return Ok(None) };
        let (ev, d) = self.load(at)?;
        // The index matched the high half of the id; the low half is checked here.
        Ok((&ev.id == id).then_some((ev, d)))
    }

    pub fn event_get(&self, org: &OrgId, id: &EventId) -> Result<Option<EventRecord>, StoreError> {
        Ok(self.get_both(org, id)?.map(|(ev, _)| ev))
    }

    pub fn delivery_get(&self, org: &OrgId, id: &EventId) -> Result<Option<DeliveryRecord>, StoreError> {
        Ok(self.get_both(org, id)?.map(|(_, d)| d))
    }

    pub fn event_list(&self, org: &OrgId, f: &EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        let mut out = Vec::new();
        let mut seq = match &f.after {
            Some(after) => {
                let Some(v) = after.value() else { return Ok(out) };
                let ix = self.read_index();
                match ix.ids.binary_search(&((v >> 64) as u64)) {
                    Ok(i) => i + 1,
                    Err(i) => i,
                }
            }
            None => 0,
        };
        let wanted_state = f.delivery.map(state_code);
        while out.len() < f.limit {
            // A window of candidates at a time, so the index is not held during disk reads.
            let locs: Vec<Loc> = {
                let ix = self.read_index();
                let Some(o) = ix.org_index(org) else { return Ok(out) };
                if seq >= ix.ids.len() {
                    break;
                }
                let end = (seq + 4096).min(ix.ids.len());
                let found = (seq..end)
                    .filter(|&s| ix.orgs[s] == o && wanted_state.is_none_or(|w| ix.states[s] == w))
                    .map(|s| ix.locs[s])
                    .collect();
                seq = end;
                found
            };
            for at in locs {
                let Some((ev, _)) = self.load_or_pass(at) else { continue };
                if f.phone_id.as_ref().is_some_and(|p| p != &ev.phone_id)
                    || f.kind.as_ref().is_some_and(|k| k != &ev.kind)
                {
                    continue;
                }
                out.push(ev);
                if out.len() >= f.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    fn call_head(&self, call_key: &str) -> Result<Option<EventId>, StoreError> {
        let at = {
            let ix = self.read_index();
            let Some(seq) = ix.call_head(call_hash(call_key)) else { return Ok(None) };
            ix.locs[seq as usize]
        };
        let bytes = self.read(at)?;
        Ok(Some(EventId::from_value(decode_record(&bytes)?.entry.id)))
    }

    /// Whether the event is queued and first in line of its call.
    pub fn is_call_head(&self, id: &EventId) -> bool {
        let ix = self.read_index();
        seq_of(&ix, id).is_some_and(|(seq, _)| ix.is_call_head(seq))
    }

    pub fn deliveries_due(&self, now_ms: i64, limit: usize) -> Result<Vec<(EventRecord, DeliveryRecord)>, StoreError> {
        let due: Vec<(u32, Loc)> = {
            let ix = self.read_index();
            ix.due(now_ms, limit).into_iter().map(|s| (s, ix.locs[s as usize])).collect()
        };
        let mut out = Vec::with_capacity(due.len());
        let mut damaged = Vec::new();
        for (seq, at) in due {
            match self.load(at) {
                Ok(both) => out.push(both),
                Err(e) => {
                    self.pass_over(at, &e);
                    // Left at the head of its call, a damaged event would hold the call's later
                    // events for ever: it leaves the queue, and the snapshot with it (a start
                    // that rebuilds the index from the journal queues it again, and it is passed
                    // over again). The disk refusing a read leaves it for the next pass.
                    if matches!(e, StoreError::Corrupt { .. }) {
                        damaged.push((seq, at));
                    }
                }
            }
        }
        if !damaged.is_empty() {
            let mut ix = self.index.write().unwrap_or_else(|e| e.into_inner());
            for (seq, at) in damaged {
                ix.pass_over(seq, at);
            }
        }
        Ok(out)
    }

    /// Puts up to `limit` of a number's parked events on the queue, oldest first.
    pub fn release(&self, phone: &str, limit: usize) -> usize {
        // The calls are read before the index is locked for writing: the writer and every
        // webhook's replay check wait on that lock, and these are disk reads.
        let wanted: Vec<(u32, Loc)> = {
            let ix = self.read_index();
            ix.parked_head(phone, limit)
        };
        let call_at = |at: Loc| self.read(at).and_then(|b| decode_record(&b).map(|r| r.entry.call));
        let mut calls = HashMap::with_capacity(wanted.len());
        for (_, at) in wanted {
            match call_at(at) {
                Ok(call) => {
                    calls.insert(at, call);
                }
                // It stays parked.
                Err(e) => self.pass_over(at, &e),
            }
        }
        // A version written meanwhile moved the event: its new record is read under the lock.
        let call_of = |at: Loc| match calls.get(&at) {
            Some(call) => Some(*call),
            None => call_at(at).ok(),
        };
        self.index.write().unwrap_or_else(|e| e.into_inner()).release(phone, limit, call_of)
    }

    /// Parks queued events whose upstream is held; returns how many it took off the queue.
    pub fn hold<'a>(&self, events: impl IntoIterator<Item = (&'a EventId, &'a str)>) -> usize {
        let mut ix = self.index.write().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (id, phone) in events {
            if let Some((seq, _)) = seq_of(&ix, id) {
                n += ix.hold(seq, phone);
            }
        }
        n
    }

    /// When the earliest queued delivery is due.
    pub fn next_due(&self) -> Option<i64> {
        self.read_index().next_due()
    }

    /// How many events are queued, how many of those wait for a retry, and how many parked.
    pub fn outbox(&self) -> (usize, usize, usize) {
        let ix = self.read_index();
        (ix.queued(), ix.retrying(), ix.parked_len())
    }

    /// The numbers that have events parked, each with how many of its queued events wait for
    /// a retry.
    pub fn parked_phones(&self) -> Vec<(String, usize)> {
        let ix = self.read_index();
        ix.parked_phones()
            .into_iter()
            .map(|p| {
                let retrying = ix.retrying_of(&p);
                (p, retrying)
            })
            .collect()
    }

    pub fn sweep(&self, now_ms: i64) -> usize {
        self.index.write().unwrap_or_else(|e| e.into_inner()).sweep(now_ms)
    }

    /// The writer's batch: new events (each checked against the replay markers, including
    /// those of earlier events in the same batch), then new delivery states and answers, all
    /// in one durable write. Returns a verdict per event.
    pub fn write(&self, batch: Batch<'_>) -> Result<Vec<Recorded>, StoreError> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        // A journal that writes nothing until a restart fails every batch, one with nothing to
        // write too, so that readiness keeps saying so.
        journal.writable()?;
        let mut buf = std::mem::take(&mut *self.scratch.lock().unwrap_or_else(|e| e.into_inner()));
        buf.clear();
        // Where each frame starts in `buf`: the index takes them in once the write is durable.
        let mut frames: Vec<usize> = Vec::with_capacity(batch.events.len() + batch.deliveries.len());
        let mut verdicts = Vec::with_capacity(batch.events.len());
        let mut in_batch: Vec<(u64, &[u8], u128)> = Vec::new();
        {
            let ix = self.read_index();
            let mut next_seq = ix.len();
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            for p in batch.events {
                let (key, expires) = match &p.replay {
                    Some((k, e)) => (k.as_slice(), *e),
                    None => (&[][..], 0),
                };
                if !fits(key, &p.event) {
                    verdicts.push(Recorded::TooLarge);
                    continue;
                }
                let fp = if key.is_empty() { 0 } else { fingerprint(key) };
                if fp != 0 {
                    if let Some((_, _, first)) = in_batch.iter().find(|(f, k, _)| *f == fp && *k == key) {
                        verdicts.push(Recorded::Duplicate(Some(EventId::from_value(*first))));
                        continue;
                    }
                    if let Some(first) = self.first_with(&ix, fp, key, p.received_at_ms)? {
                        verdicts.push(Recorded::Duplicate(Some(first)));
                        continue;
                    }
                }
                let id = ids.next(p.received_at_ms);
                // Behind events of its number that wait parked, it waits too (the index would
                // park it anyway); saying so in the record keeps a restart's replay the same.
                let parked = p.parked || ix.has_parked(p.phone_id.as_str());
                frames.push(buf.len());
                frame(&mut buf, |b| {
                    encode_record(
                        b,
                        &Record {
                            entry: Entry {
                                seq: next_seq,
                                id,
                                fp,
                                expiry_secs: ((expires.max(0) + 999) / 1000).min(i64::from(u32::MAX)) as u32,
                                state: DeliveryState::Pending,
                                parked,
                                due_ms: p.due_ms,
                                call: call_of(&p.call_key, id),
                                org: p.org_id.as_str(),
                                phone: p.phone_id.as_str(),
                            },
                            event_loc: HERE,
                            replay_key: key,
                            event: &p.event,
                            // Made from the event when read (`DeliveryRecord::first`).
                            delivery: &[],
                        },
                    )
                });
                if fp != 0 {
                    in_batch.push((fp, key, id));
                }
                next_seq += 1;
                verdicts.push(Recorded::New { id: EventId::from_value(id), parked });
            }
            drop(ids);
            for d in batch.deliveries {
                let Some((seq, v)) = seq_of(&ix, &d.event_id).filter(|(seq, _)| ix.org(*seq) == &d.org_id) else {
                    continue;
                };
                if let Some((at, old)) = self.current(&ix, seq, v)? {
                    let r = decode_record(&old)?;
                    frames.push(buf.len());
                    let delivery = encode(d);
                    frame(&mut buf, |b| {
                        encode_record(
                            b,
                            &Record {
                                entry: Entry {
                                    state: d.state,
                                    parked: false,
                                    due_ms: d.next_attempt_ms,
                                    call: call_of(&d.call_key, r.entry.id),
                                    ..r.entry.clone()
                                },
                                event_loc: if r.event_loc == HERE { at } else { r.event_loc },
                                replay_key: r.replay_key,
                                event: &[],
                                delivery: &delivery,
                            },
                        )
                    });
                }
            }
            for (id, answer) in batch.answers {
                let Some((seq, v)) = seq_of(&ix, id) else { continue };
                if let Some((at, old)) = self.current(&ix, seq, v)? {
                    let r = decode_record(&old)?;
                    let mut ev = match self.event_of(&r) {
                        Ok(ev) => ev,
                        Err(e) => {
                            self.passed::<()>(if r.event_loc == HERE { at } else { r.event_loc }, e)?;
                            continue;
                        }
                    };
                    ev.answer = Some(answer.clone());
                    let event = encode_event(&ev);
                    // A delivery not yet tried, held for this answer, is due now: it starts again
                    // as every event's does (due on arrival), the hold it was given dropped.
                    let untried = r.delivery.is_empty()
                        || dec::<DeliveryRecord>(r.delivery)
                            .is_ok_and(|d| d.attempts.is_empty() && d.state == DeliveryState::Pending);
                    let (due_ms, delivery) = if untried {
                        (r.entry.due_ms.min(ev.received_at_ms), &[][..])
                    } else {
                        (r.entry.due_ms, r.delivery)
                    };
                    frames.push(buf.len());
                    frame(&mut buf, |b| {
                        encode_record(
                            b,
                            &Record {
                                entry: Entry { due_ms, ..r.entry.clone() },
                                event_loc: HERE,
                                replay_key: r.replay_key,
                                event: &event,
                                delivery,
                            },
                        )
                    });
                }
            }
        }
        let applied = self.append(&mut journal, &mut buf, &frames);
        // A buffer grown by an unusual batch is not kept.
        if buf.capacity() <= 1 << 20 {
            *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = buf;
        }
        applied.map(|()| verdicts)
    }

    fn append(&self, journal: &mut Journal, buf: &mut Vec<u8>, frames: &[usize]) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        // Every frame must read back before the batch goes to disk: one that did not would leave
        // the batch durable, the index half-applied, and every later start stopped at it.
        for off in frames {
            decode_record(&buf[off + 8..])?;
        }
        let base = journal.place(buf.len())?;
        journal.write_durably(buf)?;
        let mut ix = self.index.write().unwrap_or_else(|e| e.into_inner());
        for off in frames {
            let bytes = &buf[off + 8..];
            ix.apply(base + *off as u64, &decode_record(bytes)?.entry)?;
        }
        ix.covered = journal.end();
        self.unsaved.fetch_add(frames.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The latest version of event `seq`, if its full id is `v` (the index matched only the
    /// high half).
    /// A damaged one is passed over as if it were not there.
    fn current(&self, ix: &Index, seq: u32, v: u128) -> Result<Option<(Loc, Vec<u8>)>, StoreError> {
        let at = ix.locs[seq as usize];
        let read = self.read(at).and_then(|bytes| Ok((decode_record(&bytes)?.entry.id == v, bytes)));
        match read {
            Ok((same, bytes)) => Ok(same.then_some((at, bytes))),
            Err(e) => self.passed(at, e),
        }
    }

    /// What the writer makes of a record it cannot read: a damaged one is passed over (logged
    /// once, counted), so that the batch of everyone's webhooks it would have failed goes on;
    /// the disk refusing a read stops the batch, to be tried again.
    fn passed<T>(&self, at: Loc, e: StoreError) -> Result<Option<T>, StoreError> {
        match e {
            StoreError::Corrupt { .. } => {
                self.pass_over(at, &e);
                Ok(None)
            }
            e => Err(e),
        }
    }

    /// The first event recorded under this replay key, if its marker is live. Every version of
    /// an event keeps its key, so the latest one tells.
    fn first_with(&self, ix: &Index, fp: u64, key: &[u8], now_ms: i64) -> Result<Option<EventId>, StoreError> {
        for seq in ix.marked(fp, now_ms) {
            let at = ix.locs[seq as usize];
            let first = self.read(at).and_then(|bytes| {
                let r = decode_record(&bytes)?;
                Ok((r.replay_key == key).then(|| EventId::from_value(r.entry.id)))
            });
            match first {
                Ok(Some(id)) => return Ok(Some(id)),
                Ok(None) => {}
                Err(e) => {
                    self.passed::<()>(at, e)?;
                }
            }
        }
        Ok(None)
    }

    /// Reads the whole journal back and checks the index against it: every record decodes,
    /// every event's latest version is where the index says, and the event JSON of each is
    /// readable.
    pub fn verify(&self) -> Result<Vec<String>, StoreError> {
        let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let mut rebuilt = Index::default();
        let mut problems = Vec::new();
        journal.scan_all(|at, bytes| match decode_record(bytes) {
            Ok(r) => {
                if let Err(e) = rebuilt.apply(at, &r.entry) {
                    problems.push(format!("journal record at {at:#x}: {e}"));
                }
                Ok(())
            }
            Err(e) => {
                problems.push(format!("journal record at {at:#x}: {e}"));
                Ok(())
            }
        })?;
        drop(journal);
        let ix = self.read_index();
        if rebuilt.ids != ix.ids || rebuilt.locs != ix.locs || rebuilt.states != ix.states {
            problems.push(format!(
                "the event index ({} events) disagrees with the journal ({} events)",
                ix.ids.len(),
                rebuilt.ids.len()
            ));
        }
        let locs: Vec<Loc> = ix.locs.iter().copied().collect();
        drop(ix);
        for at in locs {
            if let Err(e) = self.load(at) {
                problems.push(format!("event at {at:#x} cannot be read: {e}"));
            }
        }
        Ok(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: JournalOptions = JournalOptions { preallocate_bytes: 4096 };
    use crate::domain::{Carrier, PhoneId};
    use crate::store::{DeliveryState, VerifiedBy};

    fn event(org: &OrgId, call: &str, at_ms: i64) -> EventRecord {
        EventRecord {
            id: EventId::unassigned(),
            org_id: org.clone(),
            phone_id: PhoneId::generate(),
            provider: Carrier::Plivo,
            kind: "call.status".into(),
            call_id: Some(call.into()),
            from: None,
            to: None,
            direction: None,
            status: None,
            received_at: "2024-05-01T10:00:00.000Z".into(),
            received_at_ms: at_ms,
            verified_by: VerifiedBy { scheme: "plivo-v3".into(), credential: "current".into(), secret_id: None },
            params: serde_json::value::to_raw_value(&serde_json::json!({"CallUUID": call})).unwrap(),
            form: None,
            answer: None,
        }
    }

    fn prepared(org: &OrgId, call: &str, key: &[u8], at_ms: i64, expires_ms: i64) -> PreparedEvent {
        PreparedEvent::new(&event(org, call, at_ms), Some((key, expires_ms)))
    }

    fn record(log: &EventLog, events: &[PreparedEvent]) -> Vec<Recorded> {
        log.write(Batch { events, deliveries: &[], answers: &[] }).unwrap()
    }

    fn new_id(r: &Recorded) -> EventId {
        match r {
            Recorded::New { id, .. } => id.clone(),
            other => panic!("expected a new event, got {other:?}"),
        }
    }

    fn all(log: &EventLog, org: &OrgId) -> Vec<EventId> {
        let f = EventFilter { limit: 1000, ..Default::default() };
        log.event_list(org, &f).unwrap().into_iter().map(|e| e.id).collect()
    }

    #[test]
    fn an_event_recorded_under_an_older_form_of_call_key_is_still_first_in_its_call() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        let org = OrgId::generate();
        // As a build before the organization joined the key recorded it.
        let mut old = prepared(&org, "c1", b"k1", 1_000, 90_000);
        old.call_key = "plivo:c1".into();
        let later = prepared(&org, "c1", b"k2", 2_000, 90_000);
        let out = log.write(Batch { events: &[old, later], deliveries: &[], answers: &[] }).unwrap();
        let (a, b) = (new_id(&out[0]), new_id(&out[1]));
        let due = log.deliveries_due(i64::MAX, 10).unwrap();
        // Read back, its delivery names the call in today's form, which the index never saw.
        assert_eq!(due[0].1.call_key, format!("{org}:plivo:c1"));
        assert!(log.is_call_head(&a), "stuck: no call of today's key holds it");
        assert!(log.is_call_head(&b), "a call of another key");
        // Delivered, it leaves its call.
        let mut d = due[0].1.clone();
        d.state = DeliveryState::Delivered;
        log.write(Batch { events: &[], deliveries: &[d], answers: &[] }).unwrap();
        assert!(!log.is_call_head(&a));
    }

    #[test]
    fn a_delivery_held_for_its_answer_is_due_once_the_answer_is_noted_unless_already_tried() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        let org = OrgId::generate();
        let due = |log: &EventLog, now: i64| -> Vec<EventId> {
            log.deliveries_due(now, 10).unwrap().into_iter().map(|(e, _)| e.id).collect()
        };
        let held = [
            prepared(&org, "c1", b"k1", 1_000, 90_000).due_at(6_000),
            prepared(&org, "c2", b"k2", 1_000, 90_000).due_at(6_000),
        ];
        let out = log.write(Batch { events: &held, deliveries: &[], answers: &[] }).unwrap();
        let (a, b) = (new_id(&out[0]), new_id(&out[1]));
        assert_eq!(due(&log, 5_999), Vec::<EventId>::new(), "held for the answer");
        // b was tried meanwhile (it went at its hold's end), and waits for its retry.
        let mut tried = log.delivery_get(&org, &b).unwrap().unwrap();
        tried.state = DeliveryState::Failed;
        tried.next_attempt_ms = 11_000;
        log.write(Batch { events: &[], deliveries: &[tried], answers: &[] }).unwrap();
        let answer = serde_json::json!({"source": "assistant"});
        let answers = [(a.clone(), answer.clone()), (b.clone(), answer)];
        log.write(Batch { events: &[], deliveries: &[], answers: &answers }).unwrap();
        assert_eq!(due(&log, 1_000), vec![a.clone()], "due at once");
        assert_eq!(due(&log, 11_000), vec![a, b], "the retry keeps its time");
    }

    #[test]
    fn a_batch_records_each_event_once_and_spots_replays_inside_it_and_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        let org = OrgId::generate();
        let out = record(
            &log,
            &[
                prepared(&org, "c1", b"k1", 5_000, 60_000),
                prepared(&org, "c1", b"k1", 5_000, 60_000),
                prepared(&org, "c2", b"k2", 5_000, 60_000),
            ],
        );
        let a = new_id(&out[0]);
        let c = new_id(&out[2]);
        assert_eq!(out[1], Recorded::Duplicate(Some(a.clone())));
        assert!(a < c, "ids ascend in recording order");
        assert_eq!(all(&log, &org), vec![a.clone(), c.clone()]);
        assert_eq!(log.event_get(&org, &a).unwrap().unwrap().params.get(), r#"{"CallUUID":"c1"}"#);
        // The delivery every event starts with is made from the event, not stored beside it.
        let d = log.delivery_get(&org, &c).unwrap().unwrap();
        assert_eq!(
            (d.event_id, &d.org_id, d.call_key.as_str(), d.state, d.attempts.len(), d.next_attempt_ms, d.created_at_ms),
            (c.clone(), &org, format!("{org}:plivo:c2").as_str(), DeliveryState::Pending, 0, 5_000, 5_000)
        );
        let bytes = log.read(log.find(&org, &c).unwrap()).unwrap();
        assert!(decode_record(&bytes).unwrap().delivery.is_empty());
        // Another org sees nothing; an id differing only in its random half is not found.
        let other = OrgId::generate();
        assert!(log.event_get(&other, &a).unwrap().is_none());
        let mut forged = a.as_str().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert!(log.event_get(&org, &EventId::parse(&forged).unwrap()).unwrap().is_none());
        assert_eq!(log.call_head(&format!("{org}:plivo:c1")).unwrap(), Some(a.clone()));

        // Seen in an earlier batch too, until the marker expires.
        let out = record(&log, &[prepared(&org, "c3", b"k2", 59_000, 120_000)]);
        assert_eq!(out, vec![Recorded::Duplicate(Some(c.clone()))]);
        assert!(log.verify().unwrap().is_empty());
        assert_eq!(log.sweep(61_000), 2);
        let out = record(&log, &[prepared(&org, "c3", b"k2", 61_000, 120_000)]);
        assert!(matches!(out[0], Recorded::New { parked: false, .. }));
    }

    #[test]
    fn an_event_a_record_cannot_hold_is_refused_alone_and_the_journal_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let (a, b) = {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            // Its length would not fit the record's two bytes for it.
            let long_key = vec![b'n'; usize::from(u16::MAX) + 1];
            let mut huge = prepared(&org, "c3", b"k3", 1_000, 90_000);
            huge.event = vec![b' '; EVENT_MAX + 1];
            let out = record(
                &log,
                &[
                    prepared(&org, "c1", b"k1", 1_000, 90_000),
                    prepared(&org, "c2", &long_key, 1_000, 90_000),
                    huge,
                    prepared(&org, "c4", b"k4", 1_000, 90_000),
                ],
            );
            assert_eq!((&out[1], &out[2]), (&Recorded::TooLarge, &Recorded::TooLarge));
            let at_the_limit = vec![b'n'; usize::from(u16::MAX)];
            let fits = record(&log, &[prepared(&org, "c5", &at_the_limit, 1_000, 90_000)]);
            assert!(matches!(fits[0], Recorded::New { .. }), "{fits:?}");
            assert_eq!(
                record(&log, &[prepared(&org, "c5", &at_the_limit, 1_000, 90_000)]),
                vec![Recorded::Duplicate(Some(new_id(&fits[0])))]
            );
            (new_id(&out[0]), new_id(&out[3]))
        };
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        assert!(log.verify().unwrap().is_empty());
        let kept = all(&log, &org);
        assert_eq!(kept.len(), 3);
        assert_eq!(&kept[..2], &[a, b]);
    }

    #[test]
    fn an_event_of_no_call_is_a_call_of_its_own_before_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (org, other) = (OrgId::generate(), OrgId::generate());
        let callless = |org: &OrgId, key: &[u8]| {
            let mut ev = event(org, "", 1_000);
            ev.call_id = None;
            PreparedEvent::new(&ev, Some((key, 90_000)))
        };
        let (a, b);
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            let out = record(&log, &[callless(&org, b"k1"), callless(&other, b"k2")]);
            (a, b) = (new_id(&out[0]), new_id(&out[1]));
            // A failed attempt of one puts it off; the other, of no call either, is not behind it.
            let mut d = log.delivery_get(&org, &a).unwrap().unwrap();
            d.state = DeliveryState::Failed;
            d.next_attempt_ms = 60_000;
            log.write(Batch { events: &[], deliveries: &[d], answers: &[] }).unwrap();
        }
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        for (org, id) in [(&org, &a), (&other, &b)] {
            let d = log.delivery_get(org, id).unwrap().unwrap();
            assert_eq!(d.call_key, id.as_str());
            assert_eq!(log.call_head(&d.call_key).unwrap().as_ref(), Some(id));
        }
        let due: Vec<_> = log.deliveries_due(1_000, 10).unwrap().into_iter().map(|(e, _)| e.id).collect();
        assert_eq!(due, vec![b.clone()]);
    }

    #[test]
    fn delivery_states_and_answers_are_new_versions_that_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let (a, b);
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            let out =
                record(&log, &[prepared(&org, "c1", b"k1", 1_000, 90_000), prepared(&org, "c1", b"k2", 1_000, 90_000)]);
            a = new_id(&out[0]);
            b = new_id(&out[1]);
            let due: Vec<EventId> = log.deliveries_due(1_000, 10).unwrap().into_iter().map(|(e, _)| e.id).collect();
            assert_eq!(due, std::slice::from_ref(&a), "b waits behind a, the first of its call");
            let mut d = log.delivery_get(&org, &a).unwrap().unwrap();
            d.state = DeliveryState::Delivered;
            log.write(Batch { events: &[], deliveries: &[d], answers: &[] }).unwrap();
            let answer = serde_json::json!({"source": "static"});
            log.write(Batch { events: &[], deliveries: &[], answers: &[(b.clone(), answer)] }).unwrap();
            assert_eq!(log.call_head(&format!("{org}:plivo:c1")).unwrap(), Some(b.clone()));
            // Closed without a snapshot: the next open reads the journal.
        }
        let check = |log: &EventLog| {
            assert_eq!(log.delivery_get(&org, &a).unwrap().unwrap().state, DeliveryState::Delivered);
            assert_eq!(log.event_get(&org, &a).unwrap().unwrap().params.get(), r#"{"CallUUID":"c1"}"#);
            let eb = log.event_get(&org, &b).unwrap().unwrap();
            assert_eq!(eb.answer, Some(serde_json::json!({"source": "static"})));
            assert_eq!(log.delivery_get(&org, &b).unwrap().unwrap().state, DeliveryState::Pending);
            let due: Vec<EventId> =
                log.deliveries_due(i64::MAX, 10).unwrap().into_iter().map(|(_, d)| d.event_id).collect();
            assert_eq!(due, vec![b.clone()]);
            let delivered = EventFilter { delivery: Some(DeliveryState::Delivered), limit: 10, ..Default::default() };
            assert_eq!(log.event_list(&org, &delivered).unwrap().len(), 1);
            let after_a = EventFilter { after: Some(a.clone()), limit: 10, ..Default::default() };
            assert_eq!(
                log.event_list(&org, &after_a).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>(),
                vec![b.clone()]
            );
            // The replay markers came back too.
            let out = record(log, &[prepared(&org, "c9", b"k2", 2_000, 90_000)]);
            assert_eq!(out, vec![Recorded::Duplicate(Some(b.clone()))]);
            assert!(log.verify().unwrap().is_empty());
        };
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            check(&log);
            log.save_snapshot().unwrap();
        }
        {
            // From the snapshot this time, plus one event after it.
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            check(&log);
            let out = record(&log, &[prepared(&org, "c5", b"k5", 3_000, 90_000)]);
            let c = new_id(&out[0]);
            assert!(b < c, "ids keep ascending after a restart");
        }
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        assert_eq!(all(&log, &org).len(), 3);
    }

    #[test]
    fn the_index_is_saved_once_enough_is_written_and_a_crash_replays_only_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let snapshot = dir.path().join("index.snapshot");
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            for i in 0..SNAPSHOT_AFTER - 1 {
                record(&log, &[prepared(&org, &format!("c{i}"), format!("k{i}").as_bytes(), 1_000, 90_000)]);
            }
            assert!(!log.snapshot_if_due().unwrap(), "not yet due");
            assert!(!snapshot.exists());
            record(&log, &[prepared(&org, "last", b"klast", 1_000, 90_000)]);
            assert!(log.snapshot_if_due().unwrap());
            assert!(snapshot.exists());
            assert!(!log.snapshot_if_due().unwrap(), "nothing new since");
            record(&log, &[prepared(&org, "after", b"kafter", 1_000, 90_000)]);
            // Dropped without close: a crash. The snapshot plus one frame make the index.
        }
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        assert_eq!(all(&log, &org).len(), SNAPSHOT_AFTER + 1);
        assert_eq!(
            log.unsaved.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "only the frame after the snapshot was read"
        );
        assert!(log.verify().unwrap().is_empty());
    }

    #[test]
    fn snapshots_taken_at_once_leave_one_sound_file() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            for i in 0..10 {
                record(&log, &[prepared(&org, &format!("c{i}"), format!("k{i}").as_bytes(), 1_000, 90_000)]);
            }
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..10 {
                            log.save_snapshot().unwrap();
                        }
                    });
                }
            });
            assert_eq!(log.unsaved.load(std::sync::atomic::Ordering::Relaxed), 0);
        }
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        assert_eq!(
            log.unsaved.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "the snapshot was sound: nothing replayed"
        );
        assert_eq!(all(&log, &org).len(), 10);
        assert!(log.verify().unwrap().is_empty());
    }

    /// Two replay keys whose fingerprints share the low half the index keeps.
    fn keys_sharing_a_short_fingerprint() -> (Vec<u8>, Vec<u8>) {
        let mut seen = std::collections::HashMap::new();
        for i in 0u32.. {
            let key = format!("key-{i}").into_bytes();
            if let Some(other) = seen.insert(fingerprint(&key) as u32, key.clone()) {
                return (other, key);
            }
        }
        unreachable!()
    }

    #[test]
    fn keys_whose_kept_fingerprints_collide_are_told_apart_before_and_after_a_restart() {
        let (a_key, b_key) = keys_sharing_a_short_fingerprint();
        assert_ne!(fingerprint(&a_key), fingerprint(&b_key));
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let (a, b) = {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            let a = new_id(&record(&log, &[prepared(&org, "c1", &a_key, 1_000, 90_000)])[0]);
            let b = new_id(&record(&log, &[prepared(&org, "c2", &b_key, 1_000, 90_000)])[0]);
            for (key, first) in [(&a_key, &a), (&b_key, &b)] {
                let out = record(&log, &[prepared(&org, "c3", key, 2_000, 90_000)]);
                assert_eq!(out, vec![Recorded::Duplicate(Some(first.clone()))]);
            }
            log.save_snapshot().unwrap();
            (a, b)
        };
        // From the snapshot, then from the journal alone.
        for drop_snapshot in [false, true] {
            if drop_snapshot {
                std::fs::remove_file(dir.path().join("index.snapshot")).unwrap();
            }
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            for (key, first) in [(&b_key, &b), (&a_key, &a)] {
                let out = record(&log, &[prepared(&org, "c3", key, 3_000, 90_000)]);
                assert_eq!(out, vec![Recorded::Duplicate(Some(first.clone()))]);
            }
            assert_eq!(all(&log, &org), vec![a.clone(), b.clone()]);
            assert!(log.verify().unwrap().is_empty());
        }
    }

    #[test]
    fn parked_events_wait_off_the_queue_until_their_number_gets_an_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let ev = event(&org, "c1", 1_000);
        let phone = ev.phone_id.clone();
        let mut later = event(&org, "c1", 2_000);
        later.phone_id = phone.clone();
        let other = event(&org, "c2", 3_000);
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            let out = record(&log, &[PreparedEvent::new(&ev, Some((b"k1", 90_000))).parked(true)]);
            assert!(matches!(out[0], Recorded::New { parked: true, .. }));
            // Recorded as queued, it parks behind its number's parked event, and says so; another
            // number's event is queued.
            let out = record(
                &log,
                &[PreparedEvent::new(&later, Some((b"k2", 90_000))), PreparedEvent::new(&other, Some((b"k3", 90_000)))],
            );
            assert!(matches!(out[..], [Recorded::New { parked: true, .. }, Recorded::New { parked: false, .. }]));
            assert_eq!((log.outbox(), log.parked_phones()), ((1, 0, 2), vec![(phone.as_str().to_owned(), 0)]));
        }
        // The same after a restart that rebuilds the index from the journal alone.
        std::fs::remove_file(dir.path().join("index.snapshot")).ok();
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        assert_eq!((log.outbox(), log.parked_phones()), ((1, 0, 2), vec![(phone.as_str().to_owned(), 0)]));
        assert_eq!(log.deliveries_due(i64::MAX, 10).unwrap().len(), 1);
        assert_eq!(log.release("ph_other", usize::MAX), 0);
        assert_eq!(log.release(phone.as_str(), 1), 1);
        assert_eq!(log.release(phone.as_str(), usize::MAX), 1);
        assert_eq!((log.outbox(), log.parked_phones()), ((3, 0, 0), vec![]));
        let due: Vec<String> =
            log.deliveries_due(i64::MAX, 10).unwrap().into_iter().map(|(e, _)| e.id.to_string()).collect();
        // The heads of c1 and c2, in due order; c1's second event waits behind its first.
        let head = |call: &str| log.call_head(&format!("{org}:plivo:{call}")).unwrap().map(|id| id.to_string());
        assert_eq!(due.iter().map(|d| Some(d.clone())).collect::<Vec<_>>(), [head("c1"), head("c2")]);
    }

    #[test]
    fn a_damaged_snapshot_is_ignored_and_the_journal_rebuilds_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let a = {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            let a = new_id(&record(&log, &[prepared(&org, "c1", b"k1", 1_000, 90_000)])[0]);
            log.save_snapshot().unwrap();
            a
        };
        let snap = dir.path().join("index.snapshot");
        let mut bytes = std::fs::read(&snap).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        std::fs::write(&snap, bytes).unwrap();
        let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
        assert_eq!(all(&log, &org), vec![a]);
    }

    #[test]
    fn a_damaged_event_with_later_batches_after_it_stops_the_open_instead_of_losing_them() {
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        let opts = JournalOptions { preallocate_bytes: 0 };
        {
            let log = EventLog::open(dir.path(), opts, Access::Serve).unwrap();
            record(&log, &[prepared(&org, "c1", b"k1", 1_000, 90_000)]);
            log.save_snapshot().unwrap();
            for (call, key, at) in [("c2", b"k2", 2_000), ("c3", b"k3", 3_000), ("c4", b"k4", 4_000)] {
                record(&log, &[prepared(&org, call, key, at, 90_000)]);
            }
        }
        let path = dir.path().join(format!("{:08}.log", 0));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(4).position(|w| w == b"\"c2\"").expect("c2 is in the journal");
        bytes[at + 1] = b'x';
        std::fs::write(&path, &bytes).unwrap();
        // Cutting at c2 would have dropped c3 and c4, both acknowledged.
        let err = EventLog::open(dir.path(), opts, Access::Serve).err().expect("the damage is reported");
        let msg = err.to_string();
        assert!(msg.contains("not a torn write"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");

        // The README's way out, losing what follows the damage: cut the segment at the byte
        // named. The snapshot covers more than is left, so the index is rebuilt from the journal.
        let byte: u64 =
            msg.split("damaged at byte ").nth(1).and_then(|r| r.split(':').next()).unwrap().parse().unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(byte).unwrap();
        let log = EventLog::open(dir.path(), opts, Access::Serve).unwrap();
        assert_eq!(all(&log, &org).len(), 1, "c1 is kept, c2 to c4 are gone");
        record(&log, &[prepared(&org, "c5", b"k5", 5_000, 90_000)]);
        drop(log);
        let log = EventLog::open(dir.path(), opts, Access::Serve).unwrap();
        assert_eq!(all(&log, &org).len(), 2);
    }

    #[test]
    fn ids_ascend_even_when_the_clock_stands_still_or_steps_back() {
        let mut g = IdGen::default();
        let mut last = 0u128;
        for now in [5, 5, 5, 4, 6, 6, 0] {
            let id = g.next(now);
            assert!(id > last);
            assert_eq!((id >> 76) & 0xf, 7, "version 7");
            last = id;
        }
        let mut g = IdGen::default();
        let first = g.next(10);
        for _ in 0..5000 {
            g.next(10);
        }
        let later = g.next(10);
        assert!((later >> 80) > (first >> 80), "the counter spilled into the next millisecond");
        assert!(EventId::from_value(later).value() == Some(later));
    }

    /// Salvage across segments: a damaged frame in a sealed segment and a segment gone cost
    /// only their own events; the rest keep their ids and order, and the new journal takes
    /// new events after them.
    /// A journal holding less than its snapshot says (its last segment deleted, a sealed one
    /// cut back) is refused, by a start and by an inspection alike, instead of rebuilt without
    /// those events; salvage counts them from the snapshot, as the markers went with them.
    #[test]
    fn a_journal_short_of_its_snapshot_is_refused_and_salvage_counts_what_went() {
        use crate::store::salvage::salvage;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("events");
        let org = OrgId::generate();
        {
            let log = EventLog::open(&from, SMALL, Access::Serve).unwrap();
            for i in 0..40i64 {
                let batch: Vec<_> = (0..2).map(|j| prepared(&org, &format!("c{i}-{j}"), &[], 1_000 + i, 0)).collect();
                record(&log, &batch);
            }
            log.save_snapshot().unwrap();
        }
        let segment = |no: u32| from.join(super::super::journal::segment_file(no));
        let last = (0..).take_while(|no| segment(*no).exists()).last().unwrap();
        assert!(last >= 3, "the events span several segments");
        let saved = dir.path().join("saved");
        std::fs::create_dir(&saved).unwrap();
        for no in 0..=last {
            std::fs::copy(segment(no), saved.join(super::super::journal::segment_file(no))).unwrap();
        }

        std::fs::remove_file(segment(last)).unwrap();
        for access in [Access::Serve, Access::Inspect] {
            let msg = EventLog::open(&from, SMALL, access).err().expect("refused").to_string();
            assert!(msg.contains(&format!("journal segment {last} is missing")), "{msg}");
            assert!(msg.contains("callgate salvage"), "{msg}");
        }
        assert!(!segment(last).exists() && from.join("index.snapshot").exists(), "nothing was changed");
        let found = salvage(&from, None, SMALL).unwrap();
        assert!(found.needed(), "{found:?}");
        assert_eq!(found.events + found.lost, 80, "{found:?}");
        assert!(found.lost > 0, "{found:?}");

        std::fs::copy(saved.join(super::super::journal::segment_file(last)), segment(last)).unwrap();
        assert!(EventLog::open(&from, SMALL, Access::Inspect).is_ok(), "whole again");
        let len = std::fs::metadata(segment(1)).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(segment(1)).unwrap().set_len(len / 2).unwrap();
        let msg = EventLog::open(&from, SMALL, Access::Serve).err().expect("refused").to_string();
        assert!(msg.contains(&format!("journal segment 1 ends at byte {}", len / 2)), "{msg}");
        let found = salvage(&from, None, SMALL).unwrap();
        assert_eq!(found.events + found.lost, 80, "{found:?}");
    }

    /// A segment keeps its full size with zeros ahead of what is written: writes the disk lost
    /// (or a copy taken mid-write) leave its length whole, and only the records tell.
    #[test]
    fn a_journal_whose_last_records_are_zeros_is_refused_like_a_short_one() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("events");
        let org = OrgId::generate();
        let options = JournalOptions { preallocate_bytes: 1 << 20 };
        let last_at = {
            let log = EventLog::open(&from, options, Access::Serve).unwrap();
            let last = || {
                let ix = log.read_index();
                ix.locs[ix.len() as usize - 1]
            };
            // The first segment grows as written; the next, prepared meanwhile, is made whole.
            let mut i = 0i64;
            while i < 3 || super::super::journal::split(last()).0 == 0 {
                record(&log, &[prepared(&org, &format!("c{i}"), &[], 1_000 + i, 0)]);
                i += 1;
                assert!(i < 1_000, "no prepared segment");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            log.save_snapshot().unwrap();
            last()
        };
        let (seg, off) = super::super::journal::split(last_at);
        let path = from.join(super::super::journal::segment_file(seg));
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len >= 1 << 20, "made at its full size");
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[0; 256], off).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        for access in [Access::Serve, Access::Inspect] {
            let msg = EventLog::open(&from, options, access).err().expect("refused").to_string();
            assert!(msg.contains(&format!("journal segment {seg} holds zeros at byte {off}")), "{msg}");
        }
    }

    #[test]
    fn salvage_keeps_every_event_that_reads_back_across_segments() {
        use crate::store::salvage::{check, salvage};
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("events");
        let org = OrgId::generate();
        let mut ids = Vec::new();
        {
            let log = EventLog::open(&from, SMALL, Access::Serve).unwrap();
            for i in 0..40i64 {
                let batch: Vec<_> = (0..2).map(|j| prepared(&org, &format!("c{i}-{j}"), &[], 1_000 + i, 0)).collect();
                ids.extend(record(&log, &batch).iter().map(new_id));
            }
        }
        // Which events each segment holds, by their call ids.
        let segment = |no: u32| from.join(super::super::journal::segment_file(no));
        let holds = |no: u32, call: &str| {
            std::fs::read(segment(no)).unwrap().windows(call.len() + 2).any(|w| w == format!("\"{call}\"").as_bytes())
        };
        let in_seg = |call: &str| (0..).find(|no| segment(*no).exists() && holds(*no, call) || !segment(*no).exists());
        assert!(segment(3).exists(), "the events span several segments");
        // Damage in segment 1: one byte of the first event there.
        let first_in_1 = (0..80).find(|k| in_seg(&format!("c{}-{}", k / 2, k % 2)) == Some(1)).unwrap();
        let call = format!("c{}-{}", first_in_1 / 2, first_in_1 % 2);
        let mut bytes = std::fs::read(segment(1)).unwrap();
        let at = bytes.windows(call.len()).position(|w| w == call.as_bytes()).unwrap();
        bytes[at] ^= 1;
        std::fs::write(segment(1), &bytes).unwrap();
        // Segment 2 gone whole.
        let gone: Vec<usize> = (0..80).filter(|k| in_seg(&format!("c{}-{}", k / 2, k % 2)) == Some(2)).collect();
        assert!(!gone.is_empty());
        std::fs::remove_file(segment(2)).unwrap();
        // A stray copy under a name the journal does not give is no second segment 0.
        std::fs::copy(segment(0), from.join("0.log")).unwrap();
        assert!(EventLog::open(&from, SMALL, Access::Inspect).is_err(), "start-up refuses it");

        let found = salvage(&from, None, SMALL).unwrap();
        assert_eq!(found.missing_segments, [(2, 2)]);
        assert_eq!(found.damaged.iter().map(|d| d.segment).collect::<Vec<_>>(), [1]);
        assert_eq!((found.events, found.records, found.dropped), (79 - gone.len() as u64, 79 - gone.len() as u64, 0));
        assert!(found.lost >= 1 && found.lost_unknown, "{found:?}");

        let into = dir.path().join("salvaged");
        let kept = salvage(&from, Some(&into), SMALL).unwrap();
        assert_eq!(kept, found, "a dry run reports what the salvage does");
        check(&into).unwrap();
        let expected: Vec<EventId> = ids
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != first_in_1 && !gone.contains(k))
            .map(|(_, id)| id.clone())
            .collect();
        let log = EventLog::open(&into, SMALL, Access::Serve).unwrap();
        assert_eq!(all(&log, &org), expected);
        let later = new_id(&record(&log, &[prepared(&org, "after", &[], 5_000, 0)])[0]);
        assert_eq!(all(&log, &org).last(), Some(&later), "a new event follows the salvaged ones");
        assert!(!salvage(&into, None, SMALL).unwrap().needed());
    }

    /// The damaged journal of `dir`'s only segment, `at` a byte of the frame to spoil.
    fn spoil(dir: &Path, needle: &[u8]) {
        let path = dir.join(super::super::journal::segment_file(0));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
    }

    /// A version that held an event's JSON (an answer) lost, the delivery recorded after it
    /// still stands: it points at the event's earlier JSON, so the event is not delivered again.
    #[test]
    fn salvage_keeps_a_delivery_whose_own_json_was_lost_on_the_earlier_json() {
        use crate::store::salvage::salvage;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("events");
        let org = OrgId::generate();
        let (a, b);
        {
            let log = EventLog::open(&from, JournalOptions { preallocate_bytes: 0 }, Access::Serve).unwrap();
            let out = record(&log, &[prepared(&org, "c1", b"k1", 1_000, 90_000)]);
            a = new_id(&out[0]);
            let answer = serde_json::json!({"source": "spoiled-answer"});
            log.write(Batch { events: &[], deliveries: &[], answers: &[(a.clone(), answer)] }).unwrap();
            let mut d = log.delivery_get(&org, &a).unwrap().unwrap();
            d.state = DeliveryState::Delivered;
            log.write(Batch { events: &[], deliveries: &[d], answers: &[] }).unwrap();
            b = new_id(&record(&log, &[prepared(&org, "c2", b"k2", 2_000, 90_000)])[0]);
        }
        spoil(&from, b"spoiled-answer");
        let into = dir.path().join("salvaged");
        let found = salvage(&from, Some(&into), JournalOptions { preallocate_bytes: 0 }).unwrap();
        assert_eq!((found.records, found.events, found.older_json, found.dropped, found.lost), (3, 2, 1, 0, 1));
        let log = EventLog::open(&into, SMALL, Access::Serve).unwrap();
        assert_eq!(log.delivery_get(&org, &a).unwrap().unwrap().state, DeliveryState::Delivered);
        assert_eq!(log.event_get(&org, &a).unwrap().unwrap().answer, None, "the answer went with its version");
        let due: Vec<EventId> =
            log.deliveries_due(i64::MAX, 10).unwrap().into_iter().map(|(_, d)| d.event_id).collect();
        assert_eq!(due, vec![b.clone()], "only the event never delivered is due");
        assert!(log.verify().unwrap().is_empty());
    }

    /// A write torn in the last batch, whose own marker and last record reached the disk while
    /// a page before them did not, is what start-up cuts, not damage: nothing in it is kept.
    #[test]
    fn salvage_takes_a_torn_last_batch_for_a_torn_write() {
        use crate::store::salvage::salvage;
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        {
            let log = EventLog::open(dir.path(), JournalOptions { preallocate_bytes: 0 }, Access::Serve).unwrap();
            record(&log, &[prepared(&org, "kept", &[], 1_000, 0)]);
            record(&log, &[prepared(&org, "torn-1", &[], 2_000, 0), prepared(&org, "torn-2", &[], 2_000, 0)]);
        }
        spoil(dir.path(), b"torn-1");
        let found = salvage(dir.path(), None, SMALL).unwrap();
        assert!(!found.needed(), "{found:?}");
        assert!(found.damaged.is_empty() && found.torn.is_some_and(|t| t.segment == 0), "{found:?}");
        assert_eq!((found.records, found.events), (1, 1));
        assert!(EventLog::open(dir.path(), SMALL, Access::Inspect).is_ok(), "start-up cuts it too");
    }

    /// Zeros at the end of a sealed segment are not prepared space (a segment is cut to its
    /// last frame when sealed): whole batches went there, and start-up refuses it.
    #[test]
    fn salvage_takes_zeros_ending_a_sealed_segment_for_damage() {
        use crate::store::salvage::salvage;
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        {
            let log = EventLog::open(dir.path(), SMALL, Access::Serve).unwrap();
            for i in 0..30i64 {
                record(&log, &[prepared(&org, &format!("c{i}"), &[], 1_000 + i, 0)]);
            }
        }
        let sealed = dir.path().join(super::super::journal::segment_file(0));
        assert!(dir.path().join(super::super::journal::segment_file(1)).exists());
        let mut bytes = std::fs::read(&sealed).unwrap();
        let cut = bytes.len() / 2;
        bytes[cut..].fill(0);
        std::fs::write(&sealed, &bytes).unwrap();
        assert!(EventLog::open(dir.path(), SMALL, Access::Inspect).is_err(), "start-up refuses it");
        let found = salvage(dir.path(), None, SMALL).unwrap();
        assert!(found.needed(), "{found:?}");
        assert_eq!(found.damaged.iter().map(|d| d.segment).collect::<Vec<_>>(), [0], "{found:?}");
        // The batches went with their markers: how many records is not known.
        assert!(found.events < 30 && found.lost_unknown, "{found:?}");
    }

    /// Damage in the last batch that the index snapshot covers was acknowledged: it is damage,
    /// not a torn write, and the records after it in that batch are kept.
    #[test]
    fn salvage_takes_damage_the_snapshot_covers_for_damage() {
        use crate::store::salvage::salvage;
        let dir = tempfile::tempdir().unwrap();
        let org = OrgId::generate();
        {
            let log = EventLog::open(dir.path(), JournalOptions { preallocate_bytes: 0 }, Access::Serve).unwrap();
            record(&log, &[prepared(&org, "kept", &[], 1_000, 0)]);
            record(&log, &[prepared(&org, "spoiled", &[], 2_000, 0), prepared(&org, "after", &[], 2_000, 0)]);
            log.save_snapshot().unwrap();
        }
        spoil(dir.path(), b"spoiled");
        let found = salvage(dir.path(), None, SMALL).unwrap();
        assert!(found.needed() && found.torn.is_none() && found.damaged.len() == 1, "{found:?}");
        assert_eq!((found.records, found.events, found.lost), (2, 2, 1));
    }
}
