//! Counters kept in memory and exposed at `GET /metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::domain::Carrier;
use crate::store::{OutboxDepth, WriterStats, WRITE_BUCKETS_US};

pub const REJECT_REASONS: [&str; 8] = [
    "malformed_body",
    "invalid_signature",
    "missing_signature",
    "stale_timestamp",
    "ip_not_allowed",
    "invalid_token",
    "credential_unavailable",
    "unknown_phone",
];

#[derive(Default)]
pub struct Metrics {
    rejected: [[AtomicU64; REJECT_REASONS.len()]; 5],
    accepted: [AtomicU64; 5],
    replayed: [AtomicU64; 5],
    signature_batches: AtomicU64,
    signatures_batched: AtomicU64,
}

fn idx(c: Carrier) -> usize {
    match c {
        Carrier::Plivo => 0,
        Carrier::Vobiz => 1,
        Carrier::Twilio => 2,
        Carrier::Exotel => 3,
        Carrier::Telnyx => 4,
    }
}

const ORDER: [Carrier; 5] = [Carrier::Plivo, Carrier::Vobiz, Carrier::Twilio, Carrier::Exotel, Carrier::Telnyx];

impl Metrics {
    pub fn rejected(&self, c: Carrier, reason: &str) {
        if let Some(r) = REJECT_REASONS.iter().position(|x| *x == reason) {
            self.rejected[idx(c)][r].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn accepted(&self, c: Carrier) {
        self.accepted[idx(c)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn replayed(&self, c: Carrier) {
        self.replayed[idx(c)].fetch_add(1, Ordering::Relaxed);
    }

    /// One round of Ed25519 checks (see `carriers::telnyx::batch`) of `n` signatures.
    pub fn signature_batch(&self, n: usize) {
        self.signature_batches.fetch_add(1, Ordering::Relaxed);
        self.signatures_batched.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn rejected_count(&self, c: Carrier, reason: &str) -> u64 {
        REJECT_REASONS
            .iter()
            .position(|x| *x == reason)
            .map(|r| self.rejected[idx(c)][r].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn render(&self, writer: &WriterStats, outbox: &OutboxDepth, damaged_events: usize) -> String {
        let mut out = String::new();
        out.push_str("# TYPE callgate_webhooks_rejected_total counter\n");
        for c in ORDER {
            for (r, reason) in REJECT_REASONS.iter().enumerate() {
                let n = self.rejected[idx(c)][r].load(Ordering::Relaxed);
                let _ = writeln!(out, "callgate_webhooks_rejected_total{{carrier=\"{c}\",reason=\"{reason}\"}} {n}");
            }
        }
        out.push_str("# TYPE callgate_webhooks_accepted_total counter\n");
        for c in ORDER {
            let _ = writeln!(
                out,
                "callgate_webhooks_accepted_total{{carrier=\"{c}\"}} {}",
                self.accepted[idx(c)].load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE callgate_webhooks_replayed_total counter\n");
        for c in ORDER {
            let _ = writeln!(
                out,
                "callgate_webhooks_replayed_total{{carrier=\"{c}\"}} {}",
                self.replayed[idx(c)].load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE callgate_telnyx_signature_batches_total counter\n");
        let _ =
            writeln!(out, "callgate_telnyx_signature_batches_total {}", self.signature_batches.load(Ordering::Relaxed));
        out.push_str("# TYPE callgate_telnyx_signatures_batched_total counter\n");
        let _ = writeln!(
            out,
            "callgate_telnyx_signatures_batched_total {}",
            self.signatures_batched.load(Ordering::Relaxed)
        );
        render_writer(&mut out, writer);
        out.push_str("# TYPE callgate_outbox_queued gauge\n");
        let _ = writeln!(out, "callgate_outbox_queued {}", outbox.queued);
        out.push_str("# TYPE callgate_outbox_retrying gauge\n");
        let _ = writeln!(out, "callgate_outbox_retrying {}", outbox.retrying);
        out.push_str("# TYPE callgate_outbox_parked gauge\n");
        let _ = writeln!(out, "callgate_outbox_parked {}", outbox.parked);
        out.push_str("# TYPE callgate_journal_damaged_events gauge\n");
        let _ = writeln!(out, "callgate_journal_damaged_events {damaged_events}");
        out
    }
}

fn render_writer(out: &mut String, w: &WriterStats) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    out.push_str("# TYPE callgate_journal_batch_events_total counter\n");
    let _ = writeln!(out, "callgate_journal_batch_events_total {}", load(&w.events));
    out.push_str("# TYPE callgate_journal_batch_failures_total counter\n");
    let _ = writeln!(out, "callgate_journal_batch_failures_total {}", load(&w.failed));
    out.push_str("# TYPE callgate_journal_batch_seconds histogram\n");
    let mut cumulative = 0;
    for (i, le) in WRITE_BUCKETS_US.iter().enumerate() {
        cumulative += load(&w.write_us_buckets[i]);
        let _ = writeln!(out, "callgate_journal_batch_seconds_bucket{{le=\"{}\"}} {cumulative}", *le as f64 / 1e6);
    }
    cumulative += load(&w.write_us_buckets[WRITE_BUCKETS_US.len()]);
    let _ = writeln!(out, "callgate_journal_batch_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "callgate_journal_batch_seconds_sum {}", load(&w.write_us_sum) as f64 / 1e6);
    let _ = writeln!(out, "callgate_journal_batch_seconds_count {}", load(&w.batches));
}
