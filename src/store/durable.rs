//! The single durable writer. Requests that need their write on disk queue it here; one thread
//! takes everything queued, writes all recorded events in one transaction, flushes once, and
//! answers every waiter. Durability costs one transaction and one flush per batch, not per
//! request, and neither ever runs on an async worker.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{DeliveryRecord, PreparedEvent, Recorded, Store, StoreError};

enum Job {
    /// Everything written before this is to be on disk.
    Flush(oneshot::Sender<Result<(), String>>),
    /// Write this event (unless its replay key was seen), then make it durable.
    Record(PreparedEvent, oneshot::Sender<Result<Recorded, String>>),
    /// Write this delivery state, then make it durable.
    Delivery(DeliveryRecord, oneshot::Sender<Result<(), String>>),
}

pub struct GroupCommit {
    tx: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

fn stopped() -> StoreError {
    StoreError::Corrupt { tree: "-", detail: "the durable writer stopped".into() }
}

impl GroupCommit {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("callgate-writer".into())
            .spawn(move || {
                // Ends when the GroupCommit is dropped or shut down.
                while let Ok(first) = rx.recv() {
                    let mut flushes = Vec::new();
                    let mut events = Vec::new();
                    let mut replies = Vec::new();
                    let mut updates = Vec::new();
                    let mut update_replies = Vec::new();
                    for job in std::iter::once(first).chain(rx.try_iter()) {
                        match job {
                            Job::Flush(w) => flushes.push(w),
                            Job::Record(p, w) => {
                                events.push(p);
                                replies.push(w);
                            }
                            Job::Delivery(d, w) => {
                                updates.push(d);
                                update_replies.push(w);
                            }
                        }
                    }
                    let written = if events.is_empty() && updates.is_empty() {
                        Ok(Vec::new())
                    } else {
                        store.write_batch(&events, &updates).map_err(|e| e.to_string())
                    };
                    let flushed = store.flush().map_err(|e| e.to_string());
                    match written.and_then(|v| flushed.clone().map(|()| v)) {
                        Ok(verdicts) => {
                            for (w, v) in replies.into_iter().zip(verdicts) {
                                let _ = w.send(Ok(v));
                            }
                            for w in update_replies {
                                let _ = w.send(Ok(()));
                            }
                        }
                        Err(e) => {
                            for w in replies {
                                let _ = w.send(Err(e.clone()));
                            }
                            for w in update_replies {
                                let _ = w.send(Err(e.clone()));
                            }
                        }
                    }
                    for w in flushes {
                        let _ = w.send(flushed.clone());
                    }
                }
            })
            .expect("spawn the durable writer thread");
        Self { tx, thread }
    }

    /// Resolves once everything written before this call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Job::Flush(tx)).map_err(|_| stopped())?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Corrupt { tree: "-", detail: format!("flush failed: {e}") }),
            Err(_) => Err(stopped()),
        }
    }

    /// Records the event and its delivery with the next batch; resolves once it is on disk
    /// (or with the verdict that it is a replay).
    pub async fn record(&self, event: PreparedEvent) -> Result<Recorded, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Job::Record(event, tx)).map_err(|_| stopped())?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Corrupt { tree: "-", detail: format!("recording failed: {e}") }),
            Err(_) => Err(stopped()),
        }
    }

    /// Writes a delivery's new state with the next batch; resolves once it is on disk.
    pub async fn put_delivery(&self, d: DeliveryRecord) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Job::Delivery(d, tx)).map_err(|_| stopped())?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Corrupt { tree: "-", detail: format!("recording failed: {e}") }),
            Err(_) => Err(stopped()),
        }
    }

    /// Stops the writer after its last batch; its hold on the store ends with it.
    pub fn shutdown(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}
