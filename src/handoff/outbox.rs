//! The delivery path: every recorded event is POSTed upstream at least once. The outbox lives
//! in the store (written with the event), so a crash loses nothing: on restart every event not
//! yet delivered is simply due. Events of one call go in order, one at a time; different calls
//! go in parallel, up to `delivery_workers`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{Notify, Semaphore};

use crate::events::event_json;
use crate::state::AppState;
use crate::store::{DeliveryAttempt, DeliveryRecord, DeliveryState};

/// Delays after the 1st, 2nd, … failure; hourly after the last, until the horizon.
const BACKOFF_SECS: [i64; 5] = [5, 30, 120, 600, 3600];

/// The delay before the next attempt after `failures` failures, with ±10 % jitter so a
/// recovering upstream is not hit by every retry at once.
pub fn backoff_ms(failures: usize) -> i64 {
    let base = BACKOFF_SECS.get(failures.saturating_sub(1)).copied().unwrap_or(3600) * 1000;
    let jitter = rand::thread_rng().gen_range(-(base / 10)..=(base / 10));
    base + jitter
}

#[derive(Default)]
pub struct Outbox {
    wake: Arc<Notify>,
    in_flight: Mutex<HashSet<String>>,
}

impl Outbox {
    /// A new event is waiting: deliver without waiting for the next tick.
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

/// Runs until the server's state is dropped.
pub fn spawn(state: Weak<AppState>) {
    tokio::spawn(async move {
        let (workers, wake) = match state.upgrade() {
            Some(s) => (s.settings.handoff.delivery_workers, Arc::clone(&s.outbox.wake)),
            None => return,
        };
        let permits = Arc::new(Semaphore::new(workers));
        loop {
            {
                let Some(s) = state.upgrade() else { return };
                run_once(&s, &permits).await;
            }
            // Waiting holds no reference to the state, so a stopping server can close its store.
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    });
}

/// Starts every delivery that is due and whose call has nothing earlier outstanding.
pub async fn run_once(state: &Arc<AppState>, permits: &Arc<Semaphore>) -> usize {
    let now = state.clock.now_ms();
    let store = Arc::clone(&state.store);
    let due = match tokio::task::spawn_blocking(move || store.deliveries_due(now, 512)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the outbox failed");
            return 0;
        }
        Err(_) => return 0,
    };
    let mut started = 0;
    for d in due {
        if state.store.call_head(&d.call_key).ok().flatten().as_ref() != Some(&d.event_id) {
            continue;
        }
        {
            let mut busy = state.outbox.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if !busy.insert(d.call_key.clone()) {
                continue;
            }
        }
        // The scan may be stale: an attempt of this call that finished since then has already
        // moved the record on (delivered, or failed with its next attempt later). With the
        // call's slot held, the record read now is the one to act on.
        let d = match state.store.delivery_get(&d.org_id, &d.event_id) {
            Ok(Some(fresh))
                if matches!(fresh.state, DeliveryState::Pending | DeliveryState::Failed)
                    && fresh.next_attempt_ms <= now =>
            {
                fresh
            }
            _ => {
                state.outbox.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&d.call_key);
                continue;
            }
        };
        let Ok(permit) = Arc::clone(permits).acquire_owned().await else { break };
        let st = Arc::clone(state);
        started += 1;
        tokio::spawn(async move {
            let key = d.call_key.clone();
            attempt(&st, d).await;
            st.outbox.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            drop(permit);
            // The call's next event may be due now.
            st.outbox.poke();
        });
    }
    started
}

async fn attempt(state: &AppState, mut d: DeliveryRecord) {
    let now = state.clock.now_ms();
    let ev = match state.store.event_get(&d.org_id, &d.event_id) {
        Ok(Some(ev)) => ev,
        _ => {
            d.state = DeliveryState::Dead;
            let _ = state.commit.put_delivery(d).await;
            return;
        }
    };
    let phone_url = state.store.phone_resolve(&ev.phone_id).ok().flatten().and_then(|p| p.config.upstream_url.clone());
    let Some(url) = phone_url.or_else(|| state.settings.handoff.upstream_url.clone()) else {
        // Nowhere to deliver yet: keep it, look again later.
        d.next_attempt_ms = now + 60_000;
        let _ = state.commit.put_delivery(d).await;
        return;
    };
    let body = match serde_json::to_vec(&event_json(&ev, None)) {
        Ok(b) => b,
        Err(_) => return,
    };
    let ts = state.clock.now_secs();
    let started = Instant::now();
    let result = state
        .http
        .post(&url)
        .timeout(state.settings.handoff.delivery_timeout)
        .header("content-type", "application/json")
        .header("webhook-id", ev.id.as_str())
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", state.signer.sign(ev.id.as_str(), ts, &body))
        .body(body)
        .send()
        .await;
    let latency_ms = started.elapsed().as_millis() as u64;
    let (status_code, error) = match &result {
        Ok(r) => (Some(r.status().as_u16()), None),
        Err(e) if e.is_timeout() => (None, Some("timeout".to_owned())),
        Err(e) if e.is_connect() => (None, Some("connection failed".to_owned())),
        Err(_) => (None, Some("request failed".to_owned())),
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
            let next = now + backoff_ms(d.attempts.len());
            let horizon = state.settings.handoff.delivery_horizon.as_millis() as i64;
            if next - d.created_at_ms > horizon {
                d.state = DeliveryState::Dead;
            } else {
                d.state = DeliveryState::Failed;
                d.next_attempt_ms = next;
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
    if let Err(e) = state.commit.put_delivery(d).await {
        tracing::error!(event = %event_id, error = %e, "recording a delivery attempt failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
