//! Telnyx's Ed25519 checks, done for many requests at once. A batch check costs about half
//! as much per signature as one at a time (from eight signatures up), and under load many
//! requests reach their check in the same turn of the worker's loop.
//!
//! The first request to queue a check yields once, so that every other request the worker
//! can run reaches its own check, then checks the lot and hands each its answer. The queue is
//! the worker thread's own: no lock, and the future holding it cannot move to another thread.
//! If the first request is dropped while it waits (its client went away), its guard checks the
//! queue on the way out, so no request waits for an answer that never comes.

use std::cell::RefCell;
use std::rc::Rc;

use tokio::sync::oneshot;

use super::signature::{check_all, Pending};
use crate::metrics::Metrics;

type Queue = Rc<RefCell<Vec<(Pending, oneshot::Sender<bool>)>>>;

thread_local! {
    static QUEUE: Queue = Rc::default();
}

/// Whether the signature verifies; resolved with the other checks queued in this turn.
pub async fn verify(pending: Pending, metrics: &Metrics) -> bool {
    let queue = QUEUE.with(Rc::clone);
    let (tx, rx) = oneshot::channel();
    let first = {
        let mut q = queue.borrow_mut();
        q.push((pending, tx));
        q.len() == 1
    };
    if first {
        let flush = Flush(queue, metrics);
        tokio::task::yield_now().await;
        drop(flush);
    }
    // The sender is dropped unanswered only if checking panicked: refuse.
    rx.await.unwrap_or(false)
}

struct Flush<'a>(Queue, &'a Metrics);

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        let queued = std::mem::take(&mut *self.0.borrow_mut());
        self.1.signature_batch(queued.len());
        let (pending, answers): (Vec<Pending>, Vec<oneshot::Sender<bool>>) = queued.into_iter().unzip();
        for (answer, ok) in answers.into_iter().zip(check_all(&pending)) {
            // A request that went away has no one to tell.
            let _ = answer.send(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use ed25519_dalek::SigningKey;

    use super::super::signature::{prepare, sign, TelnyxKey};
    use super::*;

    fn pending(i: usize, good: bool) -> Pending {
        let sk = SigningKey::from_bytes(&[42; 32]);
        let key = TelnyxKey::from_bytes(sk.verifying_key().as_bytes()).unwrap();
        let signer = if good { sk } else { SigningKey::from_bytes(&[43; 32]) };
        let body = format!(r#"{{"data":{{"id":"{i}"}}}}"#);
        let sig = sign(&signer, "1714557600", body.as_bytes());
        prepare(&key, Some(&sig), Some("1714557600"), body.as_bytes(), 1_714_557_600).unwrap()
    }

    fn poll(f: &mut Pin<Box<impl Future<Output = bool>>>) -> Poll<bool> {
        f.as_mut().poll(&mut Context::from_waker(futures_util::task::noop_waker_ref()))
    }

    #[test]
    fn checks_queued_in_one_turn_get_each_their_own_answer() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let good = |i: usize| i % 4 != 1;
        let metrics = Metrics::default();
        let answers =
            rt.block_on(futures_util::future::join_all((0..20).map(|i| verify(pending(i, good(i)), &metrics))));
        assert_eq!(answers, (0..20).map(good).collect::<Vec<_>>());
        let shown = metrics.render(&Default::default(), &Default::default(), 0);
        assert!(shown.contains("callgate_telnyx_signature_batches_total 1\n"), "{shown}");
        assert!(shown.contains("callgate_telnyx_signatures_batched_total 20\n"), "{shown}");
        assert!(QUEUE.with(|q| q.borrow().is_empty()));
    }

    #[test]
    fn the_first_check_dropped_while_it_waits_still_answers_the_others() {
        let metrics = Metrics::default();
        let mut first = Box::pin(verify(pending(0, true), &metrics));
        assert_eq!(poll(&mut first), Poll::Pending, "the first yields before it checks");
        let mut second = Box::pin(verify(pending(1, true), &metrics));
        let mut third = Box::pin(verify(pending(2, false), &metrics));
        assert_eq!(poll(&mut second), Poll::Pending);
        assert_eq!(poll(&mut third), Poll::Pending);
        drop(first);
        assert_eq!(poll(&mut second), Poll::Ready(true));
        assert_eq!(poll(&mut third), Poll::Ready(false));
        assert!(QUEUE.with(|q| q.borrow().is_empty()));
    }
}
