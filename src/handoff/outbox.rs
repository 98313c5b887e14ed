//! The delivery path: every recorded event is POSTed upstream at least once. The outbox lives
//! in the store (written with the event), so a crash loses nothing: on restart every event not
//! yet delivered is simply due. Events of one call go in order, one at a time; different calls
//! go in parallel, up to `delivery_workers`. An upstream that keeps failing is held behind its
//! circuit breaker (see `breaker`) and probed, instead of being tried with every event. One
//! that is slow but answers gets at most half the workers, those known slow at most half
//! between them (else two of them could take every worker), and each pass reads the due calls
//! of every organization in turn, and of each organization's numbers in turn (see
//! `event_index::Index::due`), so a number's backlog, however deep, holds back no other
//! number's deliveries, of its tenant or another.
//!
//! What is queued is bounded: events whose upstream is held are parked off the queue with their
//! number (4 bytes each in memory, against about 100 queued), and parked events are released a
//! bounded number at a time as their upstream takes them. So an outage of any length neither
//! grows the memory by the queue's cost nor hides another upstream's deliveries behind a
//! backlog that cannot go.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{Notify, Semaphore};

use super::breaker::{Admitted, Breakers, Flow};
use crate::domain::{EventId, OrgId, PhoneId};
use crate::events::event_json;
use crate::state::AppState;
use crate::store::{DeliveryAttempt, DeliveryRecord, DeliveryState, StoreError};

/// Parked events are released until this many are queued.
const QUEUE_ROOM: usize = 4096;

/// How often the parked numbers are looked at, unless something asks sooner.
const RELEASE_EVERY: Duration = Duration::from_millis(250);

/// Deliveries read from the queue per pass.
const SCAN: usize = 512;

/// An attempt that took this long or longer makes its upstream known slow, until one takes
/// less. A webhook receiver answers in well under a second (taking the event, not acting on it).
const SLOW: Duration = Duration::from_secs(1);

/// How long a pass waits for an upstream that has its share of the workers out to free one.
/// One that answers within it (any healthy upstream) is fed from the pass's read of the queue
/// at its share's full pace; one that does not is passed over for the rest of the pass.
const SHARE_WAIT: Duration = Duration::from_millis(50);

/// Delays after the 1st, 2nd, … failure; hourly after the last, until the horizon.
const BACKOFF_SECS: [i64; 5] = [5, 30, 120, 600, 3600];

/// The longest pause an upstream's `Retry-After` gets: the longest backoff step.
const MAX_ASKED_PAUSE_SECS: u64 = 3600;

/// The delay before the next attempt after `failures` failures, with ±10 % jitter so a
/// recovering upstream is not hit by every retry at once.
pub fn backoff_ms(failures: usize) -> i64 {
    let base = BACKOFF_SECS.get(failures.saturating_sub(1)).copied().unwrap_or(3600) * 1000;
    let jitter = rand::thread_rng().gen_range(-(base / 10)..=(base / 10));
    base + jitter
}

pub struct Outbox {
    wake: Arc<Notify>,
    /// An upstream's attempt ended, so it may take another.
    freed: Notify,
    in_flight: Mutex<Slots>,
    breakers: Breakers,
    /// When parked events were last looked at; `None`: look on the next pass.
    released: Mutex<Option<Instant>>,
    /// Look at the parked events on the next pass, not at the next interval.
    release_asked: AtomicBool,
    /// Releases so far: where the next one starts among the numbers.
    releases: AtomicUsize,
}

/// The calls with an attempt out, one at a time each, and what was asked of them meanwhile.
#[derive(Default)]
struct Slots {
    calls: HashSet<String>,
    /// Attempts out, by upstream URL. An upstream gets at most half the workers, and those
    /// known slow (`SLOW`) at most half between them: one that is slow, but answers, trips no
    /// breaker, and with every worker waiting on slow ones the events of every other upstream
    /// would wait behind their backlogs.
    upstreams: HashMap<String, Upstream>,
    /// Attempts out to upstreams known slow. Counted as they change rather than summed at each
    /// claim: an upstream known slow stays in `upstreams` while it has nothing out.
    slow_out: usize,
    /// Events asked to be delivered again while their call's attempt was out, by call: the
    /// attempt's outcome would overwrite the request, so they are requeued once it is written.
    again: HashMap<String, Vec<(OrgId, EventId)>>,
}

/// An upstream's attempts out, and whether its last one was slow.
#[derive(Default)]
struct Upstream {
    out: usize,
    slow: bool,
}

/// Why an upstream could not take another worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Full {
    /// It has its own share out.
    Own,
    /// It is known slow, and the slow ones have their share out between them.
    Slow,
}

/// What one pass over the due deliveries did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub started: usize,
    /// Due, but with no upstream or a held one: parked.
    pub held: usize,
}

impl Outbox {
    /// `breaker_after`: consecutive failures that hold an upstream; 0: never held.
    pub fn new(breaker_after: u32) -> Self {
        Outbox {
            wake: Arc::default(),
            freed: Notify::new(),
            in_flight: Mutex::default(),
            breakers: Breakers::new(breaker_after),
            released: Mutex::default(),
            release_asked: AtomicBool::new(false),
            releases: AtomicUsize::new(0),
        }
    }

    /// A number's upstream changed: its parked events may go now.
    pub fn release_soon(&self) {
        self.release_asked.store(true, Ordering::Relaxed);
        self.poke();
    }

    /// Whether this pass should look at the parked events; marks it done.
    fn release_due(&self) -> bool {
        let mut last = self.released.lock().unwrap_or_else(|e| e.into_inner());
        let asked = self.release_asked.swap(false, Ordering::Relaxed);
        if asked || last.is_none_or(|t| t.elapsed() >= RELEASE_EVERY) {
            *last = Some(Instant::now());
            return true;
        }
        false
    }

    /// A new event is waiting: deliver without waiting for the next tick.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the call's slot; false if an attempt of it is out.
    fn take(&self, call: &str) -> bool {
        self.slots().calls.insert(call.to_owned())
    }

    /// Takes the call's slot for a redelivery of the event; if it is held, the event is
    /// redelivered by whoever frees it (false).
    fn take_or_ask(&self, call: &str, org: &OrgId, id: &EventId) -> bool {
        let mut slots = self.slots();
        if slots.calls.insert(call.to_owned()) {
            return true;
        }
        slots.again.entry(call.to_owned()).or_default().push((org.clone(), id.clone()));
        false
    }

    /// Counts an attempt to `url` out, unless `most` are, or it is known slow and `most` are
    /// out to the slow ones. Counted by origin: URLs that differ only in path or query are one
    /// upstream's, or a tenant could give each number its own and take every worker.
    fn claim(&self, url: &str, most: usize) -> Result<(), Full> {
        let mut slots = self.slots();
        let Slots { upstreams, slow_out, .. } = &mut *slots;
        let up = upstreams.entry(origin(url).to_owned()).or_default();
        if up.out >= most {
            return Err(Full::Own);
        }
        if up.slow && *slow_out >= most {
            return Err(Full::Slow);
        }
        up.out += 1;
        *slow_out += usize::from(up.slow);
        Ok(())
    }

    /// Counts an attempt to `url` back in; `took`: how long it took, if it was made.
    fn unclaim(&self, url: &str, took: Option<Duration>) {
        let url = origin(url);
        let mut slots = self.slots();
        let Slots { upstreams, slow_out, .. } = &mut *slots;
        if let Some(up) = upstreams.get_mut(url) {
            // Its attempts out count among the slow ones' as long as it is known slow.
            *slow_out -= usize::from(up.slow) * up.out;
            up.out -= 1;
            if let Some(took) = took {
                up.slow = took >= SLOW;
            }
            *slow_out += usize::from(up.slow) * up.out;
            if up.out == 0 && !up.slow {
                upstreams.remove(url);
            }
        }
        drop(slots);
        self.freed.notify_waiters();
    }

    /// Frees the call's slot; the events asked again while it was held, whose redelivery is
    /// the caller's to make.
    #[must_use]
    fn release(&self, call: &str) -> Vec<(OrgId, EventId)> {
        let mut slots = self.slots();
        slots.calls.remove(call);
        slots.again.remove(call).unwrap_or_default()
    }
}

/// `scheme://authority` of a URL: the upstream its workers are counted by.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |at| at + 3);
    match url[start..].find(['/', '?', '#']) {
        Some(end) => &url[..start + end],
        None => url,
    }
}

/// How long after it arrived an incoming call's delivery may wait for its answer: the answer
/// deadline, and time to note the answer.
pub fn answer_hold(state: &AppState) -> i64 {
    (state.settings.handoff.answer_deadline + ANSWER_SLACK).as_millis() as i64
}

const ANSWER_SLACK: Duration = Duration::from_secs(2);

/// Frees the call's slot, and redelivers what was asked while it was held.
fn free(state: &Arc<AppState>, call: &str) {
    let again = state.outbox.release(call);
    if !again.is_empty() {
        let st = Arc::clone(state);
        tokio::spawn(async move {
            if let Err(e) = redeliver(&st, &again).await {
                tracing::error!(error = %e, "redelivering what was asked while a call was busy failed");
            }
        });
    }
}

/// Makes these events' deliveries due now, with a fresh horizon (an operator asked); how many
/// exist. One whose call has an attempt out is requeued once that attempt's outcome is
/// written, which would otherwise overwrite the request.
pub async fn redeliver(state: &AppState, events: &[(OrgId, EventId)]) -> Result<usize, StoreError> {
    let mut asked = events.to_vec();
    let mut found = None;
    let mut failed = None;
    // A round frees the slots it took, whatever failed in it (a slot kept would hold its call's
    // deliveries until a restart); what was asked of those calls meanwhile is the next round.
    while !asked.is_empty() {
        let now = state.clock.now_ms();
        let (mut n, mut updates, mut held) = (0, Vec::new(), Vec::new());
        let mut read = || -> Result<(), StoreError> {
            for (org, id) in &asked {
                let Some(d) = state.store.delivery_get(org, id)? else { continue };
                n += 1;
                if !held.contains(&d.call_key) {
                    if !state.outbox.take_or_ask(&d.call_key, org, id) {
                        continue;
                    }
                    held.push(d.call_key.clone());
                }
                // Read again with the slot held: an attempt that finished just before wrote its
                // outcome.
                if let Some(d) = state.store.delivery_get(org, id)? {
                    updates.push(requeued(d, now));
                }
            }
            Ok(())
        };
        let read = read();
        found.get_or_insert(n);
        // One durable write for what was read.
        let written = state.commit.put_deliveries(updates).await;
        asked = held.iter().flat_map(|call| state.outbox.release(call)).collect();
        state.outbox.poke();
        if let Err(e) = read.and(written) {
            failed.get_or_insert(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(found.unwrap_or(0)),
    }
}

fn requeued(mut d: DeliveryRecord, now_ms: i64) -> DeliveryRecord {
    d.state = DeliveryState::Pending;
    d.next_attempt_ms = now_ms;
    d.created_at_ms = now_ms;
    d.first_tried_ms = None;
    d
}

/// Runs until the server's state is dropped.
pub fn spawn(state: Weak<AppState>) {
    tokio::spawn(async move {
        let (workers, wake) = match state.upgrade() {
            Some(s) => (s.settings.handoff.delivery_workers, Arc::clone(&s.outbox.wake)),
            None => return,
        };
        let permits = Arc::new(Semaphore::new(workers));
        let tick = Duration::from_millis(250);
        loop {
            let pass = {
                let Some(s) = state.upgrade() else { return };
                run_once(&s, &permits).await
            };
            // Waiting holds no reference to the state, so a stopping server can close its store.
            // Held deliveries were just taken off the queue: what was behind them may be due.
            if pass.held > 0 {
                continue;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    });
}

/// Where a number's events go: its own upstream, else the gateway's. A deleted number's go
/// where they were going when it was deleted. While what the number says cannot be read,
/// nowhere yet: they wait, rather than go to the gateway's upstream, which may be another
/// party's than the number's own.
fn upstream_of(state: &AppState, phone: &PhoneId) -> Option<String> {
    let own = match state.store.phone_resolve(phone) {
        Ok(Some(p)) => Ok(p.config.upstream_url.clone()),
        Ok(None) => state.store.departed_upstream(phone),
        Err(e) => Err(e),
    };
    match own {
        Ok(own) => own.or_else(|| state.settings.handoff.upstream_url.clone()),
        Err(e) => {
            static UNREADABLE: crate::telemetry::OncePerSecond = crate::telemetry::OncePerSecond::new();
            if UNREADABLE.due() {
                tracing::error!(%phone, error = %e, "reading where a number's events go failed; they wait");
            }
            None
        }
    }
}

/// Puts parked events back on the queue while it has room: as many as an upstream whose
/// breaker is closed takes, one for an upstream whose probe is due. Events queued for a retry
/// take none of the room: an upstream that answers but refuses each event (400, 422) keeps its events
/// queued, retrying, for as long as the delivery horizon, and thousands of them would otherwise
/// keep every other upstream's parked events parked. A number with a queue's room of its own
/// events retrying gets none released meanwhile, so that such an upstream cannot draw a whole
/// parked backlog onto the queue a room at a time.
fn release_parked(state: &AppState, now: i64) {
    let depth = state.store.outbox();
    let room = QUEUE_ROOM.saturating_sub(depth.queued.saturating_sub(depth.retrying));
    let start = state.outbox.releases.fetch_add(1, Ordering::Relaxed);
    let more = release_into(
        state.store.parked_phones(),
        room,
        start,
        |phone| upstream_of(state, phone),
        |url| state.outbox.breakers.flow(url, now),
        |phone, want| state.store.release(phone, want),
    );
    if more {
        // More waits: look again on the next pass, as the queue drains.
        state.outbox.release_asked.store(true, Ordering::Relaxed);
    }
}

/// Hands each parked number's events to `release` as far as `room` and its upstream's flow
/// allow. An upstream whose probe is due gets one event in all, first, however many of its
/// numbers have events parked: one probe is all its breaker admits, so any more would be parked
/// again at once. The numbers whose upstream takes everything then get an even share of the
/// room each (one at least), starting from the `start`th, so that with more numbers than room
/// each has its turn over the releases; then what is left goes to those that filled their
/// share, in turn. Given all the room in the order the numbers came, one deep backlog filled
/// every release while another number's few events stayed parked. A number with a queue's room
/// of events (`phones`' count) waiting for their retries is passed over. Whether the queue ran
/// out of room with numbers still to look at.
fn release_into(
    phones: Vec<(PhoneId, usize)>,
    mut room: usize,
    start: usize,
    upstream_of: impl Fn(&PhoneId) -> Option<String>,
    flow: impl Fn(&str) -> Flow,
    mut release: impl FnMut(&PhoneId, usize) -> usize,
) -> bool {
    let mut numbers: Vec<(PhoneId, String, Flow)> = phones
        .into_iter()
        .filter_map(|(phone, retrying)| {
            let url = upstream_of(&phone)?;
            let f = flow(&url);
            (f == Flow::Probe || retrying < QUEUE_ROOM).then_some((phone, url, f))
        })
        .collect();
    if !numbers.is_empty() {
        let at = start % numbers.len();
        numbers.rotate_left(at);
    }
    // Stable: the rest keep their turns.
    numbers.sort_by_key(|(.., f)| *f != Flow::Probe);
    let open = numbers.iter().filter(|(.., f)| *f == Flow::All).count();
    let share = (room / open.max(1)).max(1);
    let mut probed: HashSet<&str> = HashSet::new();
    let mut filled = Vec::new();
    for (phone, url, f) in &numbers {
        if room == 0 {
            return true;
        }
        let (want, probe) = match f {
            Flow::All => (share.min(room), false),
            Flow::Probe if probed.contains(url.as_str()) => continue,
            Flow::Probe => (1, true),
            Flow::Held => continue,
        };
        let released = release(phone, want).min(room);
        if probe && released > 0 {
            probed.insert(url);
        }
        if !probe && released == want {
            filled.push(phone);
        }
        room -= released;
    }
    let topped_up = !filled.is_empty();
    for phone in filled {
        if room == 0 {
            return true;
        }
        room -= release(phone, room).min(room);
    }
    // The last to take the rest may have more.
    topped_up && room == 0
}

/// Releases parked events when due, then starts every delivery that is due, whose call has
/// nothing earlier outstanding, and whose upstream is not held by its breaker; those whose
/// upstream is held are parked.
pub async fn run_once(state: &Arc<AppState>, permits: &Arc<Semaphore>) -> Pass {
    let now = state.clock.now_ms();
    let mut pass = Pass::default();
    if state.outbox.release_due() {
        let st = Arc::clone(state);
        // Releasing reads each event's record for its call: disk reads, off the executor.
        let _ = tokio::task::spawn_blocking(move || release_parked(&st, now)).await;
    }
    // Every recorded event pokes the outbox, and most find nothing due (their number's events
    // are parked, or the queue is empty): that must not cost a trip to a blocking thread.
    if state.store.next_due_ms().is_none_or(|at| at > now) {
        return pass;
    }
    let store = Arc::clone(&state.store);
    let due = match tokio::task::spawn_blocking(move || store.deliveries_due(now, SCAN)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the outbox failed");
            return pass;
        }
        Err(_) => return pass,
    };
    let breakers = &state.outbox.breakers;
    let per_upstream = state.settings.handoff.delivery_workers.div_ceil(2).max(1);
    let mut held: Vec<(EventId, PhoneId)> = Vec::new();
    let mut passed_over = PassedOver::default();
    for (ev, d) in due {
        if !state.store.is_call_head(&d.event_id) {
            continue;
        }
        // The call's slot first: while its attempt is out, what it finds (backoff and all) is
        // for that attempt to record, so the call is neither tried nor held here.
        if !state.outbox.take(&d.call_key) {
            continue;
        }
        // The scan may be stale (passes do not wait for the attempts they start): an attempt of
        // this call that finished since then has already moved the record on (delivered, or
        // failed with its next attempt later). With the call's slot held, the record read now
        // is the one to act on.
        let d = match state.store.delivery_get(&d.org_id, &d.event_id) {
            Ok(Some(fresh))
                if matches!(fresh.state, DeliveryState::Pending | DeliveryState::Failed)
                    && fresh.next_attempt_ms <= now =>
            {
                fresh
            }
            _ => {
                free(state, &d.call_key);
                continue;
            }
        };
        // With nowhere to go (its number lost its upstream since it was recorded), or an
        // upstream that is held, it waits parked: untried, rewritten never, until that changes.
        // Only what is due now: one whose attempt just failed waits for its retry on the queue.
        let Some(url) = upstream_of(state, &ev.phone_id).filter(|u| !breakers.blocked(u, now)) else {
            free(state, &d.call_key);
            held.push((ev.id, ev.phone_id));
            continue;
        };
        // Its upstream has its share of the workers out: it waits a moment for one of them, and
        // else stays due, for a later pass. Skipped at once, a drain to a single upstream read
        // the whole queue window for each few attempts it could start.
        if !claim_within(state, &url, per_upstream, &mut passed_over).await {
            free(state, &d.call_key);
            continue;
        }
        let release = || {
            state.outbox.unclaim(&url, None);
            free(state, &d.call_key);
        };
        let Ok(permit) = Arc::clone(permits).acquire_owned().await else {
            release();
            break;
        };
        // Last, so that a probe taken here is always made (and reported).
        let Some(how) = breakers.admit(&url, now) else {
            release();
            held.push((ev.id, ev.phone_id));
            continue;
        };
        let st = Arc::clone(state);
        pass.started += 1;
        tokio::spawn(async move {
            let key = d.call_key.clone();
            let (took, unrecorded) = attempt(&st, d, url.clone(), how).await;
            st.outbox.unclaim(&url, took);
            drop(permit);
            if unrecorded {
                // Its record still says it is due: freed at once, the call would be tried on the
                // next pass, and the next, as fast as the upstream answers, for as long as the
                // disk refuses.
                tokio::time::sleep(UNRECORDED_PAUSE).await;
            }
            free(&st, &key);
            // The call's next event may be due now.
            st.outbox.poke();
        });
    }
    if !held.is_empty() {
        pass.held = state.store.hold(&held);
    }
    pass
}

/// What a pass no longer waits for: upstreams whose share stayed out for [`SHARE_WAIT`], and
/// the slow ones' share, once it did.
#[derive(Default)]
struct PassedOver {
    upstreams: HashSet<String>,
    slow_ones: bool,
}

impl PassedOver {
    fn contains(&self, url: &str, full: Full) -> bool {
        self.upstreams.contains(origin(url)) || (full == Full::Slow && self.slow_ones)
    }

    fn insert(&mut self, url: &str, full: Full) {
        match full {
            Full::Own => {
                self.upstreams.insert(origin(url).to_owned());
            }
            // Every slow upstream waits on the same share: one wait a pass is enough.
            Full::Slow => self.slow_ones = true,
        }
    }
}

/// Takes one of the upstream's share of the workers, waiting up to [`SHARE_WAIT`] for one to
/// free, unless what it waits for already failed to free one in time this pass.
async fn claim_within(state: &AppState, url: &str, most: usize, passed_over: &mut PassedOver) -> bool {
    let outbox = &state.outbox;
    let Err(mut full) = outbox.claim(url, most) else { return true };
    if passed_over.contains(url, full) {
        return false;
    }
    let until = tokio::time::Instant::now() + SHARE_WAIT;
    loop {
        // Listening before looking again, so that a slot freed in between is not missed.
        let freed = outbox.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        match outbox.claim(url, most) {
            Ok(()) => return true,
            Err(f) => full = f,
        }
        if tokio::time::timeout_at(until, freed).await.is_err() {
            passed_over.insert(url, full);
            return false;
        }
    }
}

/// How long a call whose delivery could not be read or recorded is left alone.
const UNRECORDED_PAUSE: Duration = Duration::from_secs(5);

/// One delivery attempt; its outcome tells the upstream's breaker, which admitted it. Returns
/// how long its request took, if one was made, and whether what came of it went unrecorded.
async fn attempt(state: &AppState, d: DeliveryRecord, url: String, how: Admitted) -> (Option<Duration>, bool) {
    let (tried, unrecorded) = deliver(state, d, &url).await;
    let breakers = &state.outbox.breakers;
    match &tried {
        Some(t) => breakers.report(&url, how, t.reached, state.clock.now_ms()),
        None => breakers.forgo(&url, how),
    }
    (tried.map(|t| t.took), unrecorded)
}

/// A request made to an upstream.
struct Tried {
    /// It answered, and takes events: other than 5xx, 429, or a refusal of every event alike.
    reached: bool,
    took: Duration,
}

/// The request made, if one was, and whether the delivery's record could not be read or
/// written (the disk refusing).
async fn deliver(state: &AppState, mut d: DeliveryRecord, url: &str) -> (Option<Tried>, bool) {
    let now = state.clock.now_ms();
    // Read again rather than taken from the scan: an incoming call's answer is noted on its
    // event after recording, and the copy the scan decoded may predate it.
    let ev = match state.store.event_get(&d.org_id, &d.event_id) {
        Ok(Some(ev)) => ev,
        // The disk refused the read: the event is there, and the next pass tries again.
        Err(StoreError::Io { detail }) => {
            static REFUSED: crate::telemetry::OncePerSecond = crate::telemetry::OncePerSecond::new();
            if REFUSED.due() {
                tracing::error!(event = %d.event_id, error = %detail, "reading an event to deliver failed; will retry");
            }
            return (None, true);
        }
        // Gone, or damaged past reading: there is nothing to send, now or later.
        found => {
            let why = match found {
                Err(e) => e.to_string(),
                _ => "the event is gone".to_owned(),
            };
            tracing::warn!(event = %d.event_id, reason = %why, "delivery given up (dead): the event cannot be read");
            d.state = DeliveryState::Dead;
            let unrecorded = state.commit.put_delivery(d).await.is_err();
            return (None, unrecorded);
        }
    };
    // An incoming call's event waits for its answer, noted on it once decided, up to its hold:
    // sent before, it would go without it, and a retry with it would carry another body under
    // the same id. Parked events released, and redeliveries, come here early too.
    let hold_until = ev.received_at_ms + answer_hold(state);
    if ev.kind == "call.incoming" && ev.answer.is_none() && now < hold_until {
        d.next_attempt_ms = hold_until;
        if let Err(e) = state.commit.put_delivery(d).await {
            tracing::error!(event = %ev.id, error = %e, "holding a delivery for its answer failed");
            return (None, true);
        }
        return (None, false);
    }
    let Ok(body) = serde_json::to_vec(&event_json(&ev, None)) else { return (None, false) };
    let ts = state.clock.now_secs();
    let started = Instant::now();
    // A URL stored before its address was refused is not called either.
    let (client, reach) = state.reach(url, state.settings.handoff.upstream_url.as_deref());
    let result = if reach.allows_url(url) {
        let req = client
            .post(url)
            .timeout(state.settings.handoff.delivery_timeout)
            .header("content-type", "application/json")
            .header("webhook-id", ev.id.as_str())
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", state.signer.sign(ev.id.as_str(), ts, &body))
            .body(body);
        Some(req.send().await)
    } else {
        None
    };
    let took = started.elapsed();
    let latency_ms = took.as_millis() as u64;
    // An upstream that asks for a pause (429 or 503 with `Retry-After` in seconds) gets it, up
    // to the longest backoff step: tried sooner, it would only refuse again.
    let asked_pause_ms = result
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .filter(|r| matches!(r.status().as_u16(), 429 | 503))
        .and_then(|r| r.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok())
        .map(|secs| secs.min(MAX_ASKED_PAUSE_SECS) as i64 * 1000);
    let (status_code, error) = match &result {
        None => (None, Some("address not allowed".to_owned())),
        Some(Ok(r)) => (Some(r.status().as_u16()), None),
        Some(Err(e)) if e.is_timeout() => (None, Some("timeout".to_owned())),
        Some(Err(e)) if e.is_connect() => (None, Some("connection failed".to_owned())),
        Some(Err(_)) => (None, Some("request failed".to_owned())),
    };
    d.attempts.push(DeliveryAttempt { at_ms: now, status_code, latency_ms, error });
    // Attempts are kept bounded; the first ones and the latest tell the story.
    if d.attempts.len() > 50 {
        d.attempts.remove(10);
    }
    match status_code {
        Some(200..=299) => d.state = DeliveryState::Delivered,
        Some(410) => d.state = DeliveryState::Dead,
        _ => {
            // Backoff and horizon run from this round's first attempt: an operator's redelivery
            // starts a round, and an event that waited untried starts its own when first tried.
            let created = d.created_at_ms;
            let round = d.attempts.iter().filter(|a| a.at_ms >= created).count();
            let since = *d
                .first_tried_ms
                .get_or_insert_with(|| d.attempts.iter().map(|a| a.at_ms).find(|at| *at >= created).unwrap_or(now));
            let next = now + backoff_ms(round).max(asked_pause_ms.unwrap_or(0));
            // The last attempt is at the horizon, not at the last step of the backoff before it
            // (which left the last 47 minutes of a day untried).
            let horizon_at = since + state.settings.handoff.delivery_horizon.as_millis() as i64;
            if now >= horizon_at {
                d.state = DeliveryState::Dead;
            } else {
                d.state = DeliveryState::Failed;
                d.next_attempt_ms = next.min(horizon_at);
            }
        }
    }
    match d.state {
        DeliveryState::Delivered => tracing::debug!(event = %d.event_id, "delivered upstream"),
        DeliveryState::Dead => {
            tracing::warn!(event = %d.event_id, attempts = d.attempts.len(), "delivery given up (dead)")
        }
        _ => {
            tracing::info!(event = %d.event_id, status = ?status_code, attempts = d.attempts.len(), "delivery failed; will retry")
        }
    }
    let event_id = d.event_id.clone();
    let recorded = state.commit.put_delivery(d).await;
    if let Err(e) = &recorded {
        tracing::error!(event = %event_id, error = %e, "recording a delivery attempt failed");
    }
    (
        Some(Tried { reached: status_code.is_some_and(|s| s < 500 && s != 429 && !refuses_every_event(s)), took }),
        recorded.is_err(),
    )
}

/// An answer that refuses every event alike, whatever it holds: the secret or the URL is wrong
/// (401, 403, 404, 405), or the URL has moved (a redirect, which deliveries do not follow: a
/// signed event is not re-sent to wherever a `Location` points). The upstream is held as a
/// down one is, so that its events wait parked at 4 bytes each instead of retrying on the
/// queue for as long as the delivery horizon. An answer about the event itself (400, 409, 413,
/// 422) is that event's alone.
fn refuses_every_event(status: u16) -> bool {
    matches!(status, 300..=399 | 401 | 403 | 404 | 405)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Releases against a fake store: `parked` events per number, upstream and flow per number
    /// as given. What each `release` call asked for and got, in order, and whether more waits.
    fn plan(
        numbers: &[(&str, Option<&str>, usize)],
        flows: &[(&str, Flow)],
        room: usize,
    ) -> (Vec<(String, usize, usize)>, bool) {
        plan_at(numbers, flows, room, 0, &[])
    }

    /// As `plan`, starting at the `start`th number, with numbers' events waiting for retries.
    fn plan_at(
        numbers: &[(&str, Option<&str>, usize)],
        flows: &[(&str, Flow)],
        room: usize,
        start: usize,
        retrying: &[(&str, usize)],
    ) -> (Vec<(String, usize, usize)>, bool) {
        let retrying: HashMap<&str, usize> = retrying.iter().copied().collect();
        let phones: Vec<(PhoneId, usize)> =
            numbers.iter().map(|(p, ..)| (PhoneId::parse(p).unwrap(), retrying.get(p).copied().unwrap_or(0))).collect();
        let upstreams: HashMap<&str, Option<&str>> = numbers.iter().map(|(p, u, _)| (*p, *u)).collect();
        let mut parked: HashMap<&str, usize> = numbers.iter().map(|(p, _, n)| (*p, *n)).collect();
        let flows: HashMap<&str, Flow> = flows.iter().copied().collect();
        let mut calls = Vec::new();
        let more = release_into(
            phones,
            room,
            start,
            |p| upstreams[p.as_str()].map(str::to_owned),
            |u| flows[u],
            |p, want| {
                let left = parked.get_mut(p.as_str()).unwrap();
                let got = want.min(*left);
                *left -= got;
                calls.push((p.as_str().to_owned(), want, got));
                got
            },
        );
        (calls, more)
    }

    const A: &str = "ph_00000000000000000000000000000001";
    const B: &str = "ph_00000000000000000000000000000002";
    const C: &str = "ph_00000000000000000000000000000003";
    const D: &str = "ph_00000000000000000000000000000004";

    #[test]
    fn a_redelivery_asked_of_a_busy_call_goes_to_whoever_frees_it_whatever_way() {
        let o = Outbox::new(5);
        let (org, a, b) = (OrgId::generate(), EventId::generate(), EventId::generate());
        assert!(o.take("c"), "a pass takes the call");
        assert!(!o.take_or_ask("c", &org, &a), "busy: asked of whoever frees it");
        assert!(!o.take_or_ask("c", &org, &b));
        assert!(o.take_or_ask("d", &org, &a), "another call is free");
        // Freed by a pass that gave up on the call (stale, held, no worker) as by an attempt.
        assert_eq!(o.release("c"), vec![(org.clone(), a.clone()), (org.clone(), b)]);
        assert_eq!(o.release("c"), Vec::new(), "each asked once");
        assert!(o.take_or_ask("c", &org, &a), "free again");
        assert_eq!(o.release("d"), Vec::new());
    }

    #[test]
    fn an_upstream_whose_probe_is_due_gets_one_event_whatever_its_numbers() {
        let numbers = [(A, Some("http://down/"), 7), (B, Some("http://down/"), 3), (C, Some("http://down/"), 2)];
        let (calls, more) = plan(&numbers, &[("http://down/", Flow::Probe)], 100);
        assert_eq!(calls, [(A.to_owned(), 1, 1)]);
        assert!(!more);
    }

    #[test]
    fn each_upstream_is_released_by_its_own_flow() {
        let numbers = [
            (A, Some("http://down/"), 5),
            (B, Some("http://up/"), 4),
            (C, Some("http://held/"), 9),
            (D, Some("http://down/"), 2),
        ];
        let flows = [("http://down/", Flow::Probe), ("http://up/", Flow::All), ("http://held/", Flow::Held)];
        let (calls, more) = plan(&numbers, &flows, 100);
        assert_eq!(calls, [(A.to_owned(), 1, 1), (B.to_owned(), 99, 4)]);
        assert!(!more);
    }

    #[test]
    fn a_number_with_nothing_to_release_leaves_the_probe_to_the_next() {
        let numbers = [(A, Some("http://down/"), 0), (B, Some("http://down/"), 3), (C, None, 4)];
        let (calls, _) = plan(&numbers, &[("http://down/", Flow::Probe)], 100);
        assert_eq!(calls, [(A.to_owned(), 1, 0), (B.to_owned(), 1, 1)]);
    }

    #[test]
    fn releasing_stops_when_the_queue_is_full_and_says_more_waits() {
        let numbers = [(A, Some("http://up/"), 5), (B, Some("http://up/"), 4), (C, Some("http://up/"), 1)];
        // Two each, then what is left to those that took all of theirs.
        let (calls, more) = plan(&numbers, &[("http://up/", Flow::All)], 6);
        assert_eq!(calls, [(A.to_owned(), 2, 2), (B.to_owned(), 2, 2), (C.to_owned(), 2, 1), (A.to_owned(), 1, 1)]);
        assert!(more, "B may have more");
        let (calls, more) = plan(&numbers[..2], &[("http://up/", Flow::All)], 10);
        assert_eq!(calls, [(A.to_owned(), 5, 5), (B.to_owned(), 5, 4), (A.to_owned(), 1, 0)]);
        assert!(!more);
    }

    #[test]
    fn probes_go_first_numbers_take_turns_and_one_with_a_rooms_worth_retrying_waits() {
        let up = [(A, Some("http://up/"), 10), (B, Some("http://up/"), 10), (C, Some("http://up/"), 10)];
        let all = [("http://up/", Flow::All)];
        // More numbers than room: each release starts one further on.
        let (calls, more) = plan_at(&up, &all, 2, 1, &[]);
        assert_eq!((calls, more), (vec![(B.to_owned(), 1, 1), (C.to_owned(), 1, 1)], true));
        let (calls, _) = plan_at(&up, &all, 2, 5, &[]);
        assert_eq!(calls, [(C.to_owned(), 1, 1), (A.to_owned(), 1, 1)]);
        // A probe is not left behind the others' share of the room.
        let mixed = [(A, Some("http://up/"), 10), (B, Some("http://up/"), 10), (D, Some("http://down/"), 3)];
        let (calls, _) = plan_at(&mixed, &[("http://up/", Flow::All), ("http://down/", Flow::Probe)], 2, 0, &[]);
        assert_eq!(calls, [(D.to_owned(), 1, 1), (A.to_owned(), 1, 1)]);
        // A number with a queue's room of events retrying gets nothing more meanwhile; a probe
        // still goes.
        let (calls, _) = plan_at(&up, &all, 100, 0, &[(A, QUEUE_ROOM), (B, QUEUE_ROOM - 1)]);
        assert_eq!(calls, [(B.to_owned(), 50, 10), (C.to_owned(), 50, 10)]);
        let probe = [(A, Some("http://down/"), 3)];
        let (calls, _) = plan_at(&probe, &[("http://down/", Flow::Probe)], 100, 0, &[(A, QUEUE_ROOM)]);
        assert_eq!(calls, [(A.to_owned(), 1, 1)]);
    }

    #[test]
    fn a_deep_backlog_takes_no_more_than_its_share_while_another_number_waits() {
        let numbers = [(A, Some("http://up/"), 1_000_000), (B, Some("http://up/"), 50), (C, Some("http://up/"), 3)];
        let (calls, more) = plan(&numbers, &[("http://up/", Flow::All)], 4_096);
        assert_eq!(
            calls,
            [
                (A.to_owned(), 1_365, 1_365),
                (B.to_owned(), 1_365, 50),
                (C.to_owned(), 1_365, 3),
                (A.to_owned(), 2_678, 2_678)
            ]
        );
        assert!(more, "A has more");
        // More numbers than room: one each, as far as it goes.
        let (calls, more) = plan(&numbers, &[("http://up/", Flow::All)], 2);
        assert_eq!(calls, [(A.to_owned(), 1, 1), (B.to_owned(), 1, 1)]);
        assert!(more);
    }

    #[test]
    fn upstreams_known_slow_share_half_the_workers_between_them() {
        let outbox = Outbox::new(0);
        let secs = |s: f64| Some(Duration::from_secs_f64(s));
        let slow_out = || outbox.slots().slow_out;
        // Not yet known slow: each takes its own share.
        assert_eq!(
            [outbox.claim("a", 2), outbox.claim("a", 2), outbox.claim("a", 2)],
            [Ok(()), Ok(()), Err(Full::Own)]
        );
        assert_eq!([outbox.claim("b", 2), outbox.claim("b", 2)], [Ok(()), Ok(())]);
        // An attempt of each took a second or more: the other, still out, counts as slow.
        outbox.unclaim("a", secs(1.5));
        outbox.unclaim("b", secs(1.0));
        assert_eq!(slow_out(), 2);
        assert_eq!((outbox.claim("a", 2), outbox.claim("c", 2)), (Err(Full::Slow), Ok(())));
        // An attempt not made leaves what is known of its upstream.
        outbox.unclaim("b", None);
        assert_eq!((slow_out(), outbox.claim("b", 2), slow_out()), (1, Ok(()), 2));
        // A quick one clears it, and its upstream has its own share again.
        outbox.unclaim("a", secs(0.2));
        assert_eq!(slow_out(), 1);
        assert_eq!(
            [outbox.claim("a", 2), outbox.claim("a", 2), outbox.claim("a", 2)],
            [Ok(()), Ok(()), Err(Full::Own)]
        );
        assert_eq!(slow_out(), 1);
        // What is neither out nor slow is forgotten.
        outbox.unclaim("c", secs(0.1));
        assert!(!outbox.slots().upstreams.contains_key("c"));
    }

    #[test]
    fn urls_of_one_origin_count_as_one_upstream() {
        assert_eq!(origin("https://h.example:8443/hook/a?n=1"), "https://h.example:8443");
        assert_eq!(origin("http://h?x"), "http://h");
        assert_eq!(origin("http://[::1]:9/"), "http://[::1]:9");
        let outbox = Outbox::new(0);
        assert_eq!(
            [outbox.claim("http://h/a?n=1", 2), outbox.claim("http://h/b", 2), outbox.claim("http://h/c#x", 2)],
            [Ok(()), Ok(()), Err(Full::Own)]
        );
        assert_eq!(outbox.claim("http://other/a", 2), Ok(()));
        // Known slow by one of its URLs, the origin is slow by every other.
        outbox.unclaim("http://h/a?n=1", Some(Duration::from_secs(2)));
        assert_eq!(outbox.slots().slow_out, 1);
        outbox.unclaim("http://h/b", None);
        assert_eq!(outbox.slots().slow_out, 0);
        assert!(outbox.slots().upstreams["http://h"].slow);
    }

    #[test]
    fn backoff_follows_the_schedule_with_bounded_jitter() {
        for (n, base) in [(1, 5_000), (2, 30_000), (3, 120_000), (4, 600_000), (5, 3_600_000), (9, 3_600_000)] {
            for _ in 0..50 {
                let d = backoff_ms(n);
                assert!(d >= base - base / 10 && d <= base + base / 10, "{n}: {d}");
            }
        }
    }
}
