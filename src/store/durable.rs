//! Group commit: requests that need their write on disk queue a waiter; one thread flushes
//! once for every waiter queued before the flush started. Durability costs one fsync per batch,
//! not per request, and no flush ever runs on an async worker.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{Store, StoreError};

type Waiter = oneshot::Sender<Result<(), String>>;

pub struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
    thread: JoinHandle<()>,
}

impl GroupCommit {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("callgate-flusher".into())
            .spawn(move || {
                // Ends when the GroupCommit is dropped or shut down.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let result = store.flush().map_err(|e| e.to_string());
                    for w in batch {
                        let _ = w.send(result.clone());
                    }
                }
            })
            .expect("spawn the flusher thread");
        Self { tx, thread }
    }

    /// Stops the flusher after its last batch; its hold on the store ends with it.
    pub fn shutdown(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }

    /// Resolves once everything written before this call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| StoreError::Corrupt { tree: "-", detail: "flusher stopped".into() })?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Corrupt { tree: "-", detail: format!("flush failed: {e}") }),
            Err(_) => Err(StoreError::Corrupt { tree: "-", detail: "flusher stopped".into() }),
        }
    }
}
