//! The single durable writer. Requests that need their write on disk queue it here; one thread
//! takes everything queued, writes all of it with one durable append (one `fdatasync`), and
//! answers every waiter. Durability costs one write and one sync per batch, not per request,
//! and neither ever runs on an async worker.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as task_mpsc, oneshot};

use super::{DeliveryRecord, PreparedEvent, Recorded, Store, StoreError};
use crate::domain::EventId;

/// Where the writer answers one job: the job's own channel, through the inbox of the thread
/// that queued it when that thread has one (see [`serve_replies_here`]).
struct Reply<T> {
    tx: oneshot::Sender<Result<T, Failure>>,
    home: Option<Home>,
}

/// A writer's answer, ready to hand to whoever waits for it.
enum Completion {
    Recorded(oneshot::Sender<Result<Recorded, Failure>>, Result<Recorded, Failure>),
    Done(oneshot::Sender<Result<(), Failure>>, Result<(), Failure>),
}

impl Completion {
    fn complete(self) {
        // A waiter that went away (its client hung up) has no one to tell.
        match self {
            Completion::Recorded(tx, v) => drop(tx.send(v)),
            Completion::Done(tx, v) => drop(tx.send(v)),
        }
    }
}

/// The answers one async worker thread waits for, handed over to a task of its own.
type Home = task_mpsc::UnboundedSender<Completion>;

thread_local! {
    static HOME: RefCell<Option<Home>> = const { RefCell::new(None) };
}

/// Has the writer's answers to jobs queued on this thread come back through one task of the
/// thread's own. Each answer sent straight to its waiter is a wake from another thread, and
/// the worker's runtime wakes its thread with an `eventfd` write for every one of those: one
/// system call per callback, about 50 per batch. Through the inbox it is one per batch, and
/// the task wakes each waiter on its own thread, for the cost of a queue push.
///
/// Called on each of the server's workers as it starts, inside its runtime: the task is
/// spawned local to the thread. Elsewhere answers go straight to their waiters.
pub fn serve_replies_here() {
    let (tx, mut rx) = task_mpsc::unbounded_channel::<Completion>();
    tokio::task::spawn_local(async move {
        while let Some(c) = rx.recv().await {
            c.complete();
        }
    });
    HOME.with(|h| *h.borrow_mut() = Some(tx));
}

/// How a kind of answer travels through an inbox.
trait Answer: Sized {
    fn completion(tx: oneshot::Sender<Result<Self, Failure>>, v: Result<Self, Failure>) -> Completion;
}

impl Answer for Recorded {
    fn completion(tx: oneshot::Sender<Result<Self, Failure>>, v: Result<Self, Failure>) -> Completion {
        Completion::Recorded(tx, v)
    }
}

impl Answer for () {
    fn completion(tx: oneshot::Sender<Result<Self, Failure>>, v: Result<Self, Failure>) -> Completion {
        Completion::Done(tx, v)
    }
}

impl<T: Answer> Reply<T> {
    fn new(tx: oneshot::Sender<Result<T, Failure>>) -> Self {
        Reply { tx, home: HOME.with(|h| h.borrow().clone()) }
    }

    fn answer(self, v: Result<T, Failure>) {
        match self.home {
            // An inbox whose task is gone (its runtime stopped) gives the answer back.
            Some(home) => {
                if let Err(task_mpsc::error::SendError(c)) = home.send(T::completion(self.tx, v)) {
                    c.complete();
                }
            }
            None => drop(self.tx.send(v)),
        }
    }
}

enum Job {
    /// Everything written to sled before this is to be on disk.
    Flush(Reply<()>),
    /// Write this event (unless its replay key was seen), then make it durable.
    Record(Box<PreparedEvent>, Reply<Recorded>),
    /// Write these delivery states, then make them durable.
    Deliveries(Vec<DeliveryRecord>, Reply<()>),
    /// Note how an incoming call was answered.
    Answer(EventId, serde_json::Value, Reply<()>),
}

pub struct GroupCommit {
    tx: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
    stats: Arc<WriterStats>,
}

/// Upper bounds (µs) of the durable-write latency histogram: a slow disk shows here first.
pub const WRITE_BUCKETS_US: [u64; 10] = [250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// What the writer has done, for `/metrics`: how many batches, how full, how long each took
/// from first byte encoded to `fdatasync` returning.
#[derive(Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    /// Events in the batches that reached the disk.
    pub events: AtomicU64,
    /// Batches the disk refused (or the store found damage in); their events were not recorded.
    pub failed: AtomicU64,
    /// Whether the latest batch failed: the gateway is not ready while writes fail.
    pub failing: std::sync::atomic::AtomicBool,
    pub write_us_sum: AtomicU64,
    /// Counts per bucket of `WRITE_BUCKETS_US`, the last one for anything slower.
    pub write_us_buckets: [AtomicU64; WRITE_BUCKETS_US.len() + 1],
}

impl WriterStats {
    fn observe(&self, events: usize, took_us: u64, written: bool) {
        self.failing.store(!written, Ordering::Relaxed);
        if !written {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events as u64, Ordering::Relaxed);
        self.write_us_sum.fetch_add(took_us, Ordering::Relaxed);
        let b = WRITE_BUCKETS_US.iter().position(|le| took_us <= *le).unwrap_or(WRITE_BUCKETS_US.len());
        self.write_us_buckets[b].fetch_add(1, Ordering::Relaxed);
    }
}

fn stopped() -> StoreError {
    StoreError::Corrupt { tree: "-", detail: "the durable writer stopped".into() }
}

#[derive(Default)]
struct Round {
    flushes: Vec<Reply<()>>,
    events: Vec<PreparedEvent>,
    event_replies: Vec<Reply<Recorded>>,
    deliveries: Vec<DeliveryRecord>,
    answers: Vec<(EventId, serde_json::Value)>,
    done_replies: Vec<Reply<()>>,
}

impl Round {
    fn jobs(&self) -> usize {
        self.flushes.len() + self.event_replies.len() + self.done_replies.len()
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Flush(w) => self.flushes.push(w),
            Job::Record(p, w) => {
                self.events.push(*p);
                self.event_replies.push(w);
            }
            Job::Deliveries(d, w) => {
                self.deliveries.extend(d);
                self.done_replies.push(w);
            }
            Job::Answer(id, a, w) => {
                self.answers.push((id, a));
                self.done_replies.push(w);
            }
        }
    }

    fn run(self, store: &dyn Store, stats: &WriterStats) {
        let written = if self.events.is_empty() && self.deliveries.is_empty() {
            Ok(Vec::new())
        } else {
            let started = Instant::now();
            let r = store.write_batch(&self.events, &self.deliveries, &[]).map_err(Failure::from);
            stats.observe(self.events.len(), started.elapsed().as_micros() as u64, r.is_ok());
            r
        };
        // Answers go in a write of their own: a delivery state written in this batch must be
        // the base the answer's version builds on.
        let answered = if self.answers.is_empty() || written.is_err() {
            Ok(Vec::new())
        } else {
            store.write_batch(&[], &[], &self.answers).map_err(Failure::from)
        };
        match written {
            Ok(verdicts) => {
                for (w, v) in self.event_replies.into_iter().zip(verdicts) {
                    w.answer(Ok(v));
                }
                let done = answered.map(|_| ());
                for w in self.done_replies {
                    w.answer(done.clone());
                }
            }
            Err(e) => {
                for w in self.event_replies {
                    w.answer(Err(e.clone()));
                }
                for w in self.done_replies {
                    w.answer(Err(e.clone()));
                }
            }
        }
        if !self.flushes.is_empty() {
            let flushed = store.flush().map_err(Failure::from);
            for w in self.flushes {
                w.answer(flushed.clone());
            }
        }
    }
}

/// A failed write as each of its waiters gets it (a batch's waiters share one).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The disk refused it ([`StoreError::Io`]), rather than the store finding damage.
    io: bool,
    detail: String,
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure { io: matches!(e, StoreError::Io { .. }), detail: e.to_string() }
    }
}

async fn wait<T>(rx: oneshot::Receiver<Result<T, Failure>>, what: &str) -> Result<T, StoreError> {
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(f)) if f.io => Err(StoreError::Io { detail: format!("{what} failed: {}", f.detail) }),
        Ok(Err(f)) => Err(StoreError::Corrupt { tree: "-", detail: format!("{what} failed: {}", f.detail) }),
        Err(_) => Err(stopped()),
    }
}

impl GroupCommit {
    pub fn start(store: Arc<dyn Store>, linger: Option<Duration>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(WriterStats::default());
        let shared = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("callgate-writer".into())
            .spawn(move || {
                // Ends when the GroupCommit is dropped or shut down.
                let mut last_round = 0;
                while let Ok(first) = rx.recv() {
                    // Under concurrent load, linger a moment so the batch fills: each round
                    // costs an fdatasync and two thread switches whatever its size. A lone
                    // request (the last round held one job) is written at once.
                    if last_round > 1 {
                        if let Some(d) = linger {
                            std::thread::sleep(d);
                        }
                    }
                    let mut round = Round::default();
                    for job in std::iter::once(first).chain(rx.try_iter()) {
                        round.take(job);
                    }
                    last_round = round.jobs();
                    round.run(store.as_ref(), &shared);
                }
            })
            .expect("spawn the durable writer thread");
        Self { tx, thread, stats }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    fn send<T: Answer>(
        &self,
        job: impl FnOnce(Reply<T>) -> Job,
    ) -> Result<oneshot::Receiver<Result<T, Failure>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(job(Reply::new(tx))).map_err(|_| stopped())?;
        Ok(rx)
    }

    /// Resolves once everything written before this call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        wait(self.send(Job::Flush)?, "flush").await
    }

    /// Records the event and its delivery with the next batch; resolves once it is on disk
    /// (with the id it was given, or with the verdict that it is a replay).
    pub async fn record(&self, event: PreparedEvent) -> Result<Recorded, StoreError> {
        wait(self.send(|w| Job::Record(Box::new(event), w))?, "recording").await
    }

    /// Writes a delivery's new state with the next batch; resolves once it is on disk.
    pub async fn put_delivery(&self, d: DeliveryRecord) -> Result<(), StoreError> {
        self.put_deliveries(vec![d]).await
    }

    /// Writes many delivery states in the same batch.
    pub async fn put_deliveries(&self, d: Vec<DeliveryRecord>) -> Result<(), StoreError> {
        wait(self.send(|w| Job::Deliveries(d, w))?, "recording").await
    }

    /// Notes on the event how its call was answered; resolves once it is on disk.
    pub async fn set_answer(&self, id: EventId, answer: serde_json::Value) -> Result<(), StoreError> {
        wait(self.send(|w| Job::Answer(id, answer, w))?, "recording").await
    }

    /// Stops the writer after its last batch; its hold on the store ends with it.
    pub fn shutdown(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{JournalOptions, SledStore};
    use super::*;

    fn writer() -> (tempfile::TempDir, GroupCommit) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), JournalOptions { preallocate_bytes: 0 }).unwrap();
        (dir, GroupCommit::start(Arc::new(store), Some(Duration::from_millis(1))))
    }

    #[test]
    fn a_write_the_disk_refused_reaches_its_waiter_as_such_and_damage_as_damage() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let through = |e: StoreError| {
            let (tx, rx) = oneshot::channel::<Result<(), Failure>>();
            tx.send(Err(Failure::from(e))).unwrap();
            rt.block_on(wait(rx, "recording")).unwrap_err()
        };
        let full = std::io::Error::from_raw_os_error(28);
        match through(StoreError::Io { detail: full.to_string() }) {
            StoreError::Io { detail } => {
                assert!(detail.starts_with("recording failed: storage i/o failed: No space"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(through(StoreError::Corrupt { tree: "t", detail: "x".into() }), StoreError::Corrupt { .. }));
        let api = crate::error::ApiError::from(StoreError::Io { detail: "No space left on device".into() });
        assert_eq!((api.status.as_u16(), api.code, api.retry_after), (503, "storage_unavailable", Some(5)));
        assert!(!api.message.contains("No space"), "the client hears no detail of the disk");
    }

    #[test]
    fn a_failed_batch_counts_as_failed_not_written_and_holds_readiness_until_one_succeeds() {
        let stats = WriterStats::default();
        stats.observe(30, 300, true);
        stats.observe(40, 900, false);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!((load(&stats.batches), load(&stats.events), load(&stats.failed)), (1, 30, 1));
        assert_eq!(load(&stats.write_us_sum), 300, "the histogram holds written batches only");
        assert!(stats.failing.load(Ordering::Relaxed));
        stats.observe(5, 100, true);
        assert!(!stats.failing.load(Ordering::Relaxed));
        assert_eq!(load(&stats.events), 35);
    }

    fn home_closed() -> Option<bool> {
        HOME.with(|h| h.borrow().as_ref().map(Home::is_closed))
    }

    #[test]
    fn answers_reach_their_waiters_through_the_inbox_straight_without_one_and_after_it_closed() {
        let (_dir, commit) = writer();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let within = |f| rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), f).await.unwrap() });

        assert_eq!(home_closed(), None);
        within(commit.commit()).unwrap();

        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            serve_replies_here();
            let all = tokio::time::timeout(
                Duration::from_secs(10),
                futures_util::future::join_all((0..20).map(|_| commit.commit())),
            )
            .await
            .unwrap();
            assert!(all.iter().all(Result::is_ok));
        });
        assert_eq!(home_closed(), Some(false));

        // The inbox's task went with its LocalSet: answers sent there come back and go straight.
        drop(local);
        assert_eq!(home_closed(), Some(true));
        within(commit.commit()).unwrap();

        HOME.with(|h| h.borrow_mut().take());
        commit.shutdown();
    }
}
