//! One circuit breaker per upstream URL. While an upstream keeps failing, the outbox stops
//! trying each queued event against it (every try cost a connection attempt and a journal
//! write, on the core that answers the carriers) and sends one probe at a time, at growing
//! intervals, until one gets through. Events wait in the outbox meanwhile; nothing is dropped.

use std::collections::HashMap;
use std::sync::Mutex;

/// The first pause after the breaker opens; doubled on every failed probe, up to `MAX_PAUSE_MS`.
const FIRST_PAUSE_MS: i64 = 1_000;
const MAX_PAUSE_MS: i64 = 30_000;

#[derive(Default)]
struct Upstream {
    failures: u32,
    /// Times the breaker opened since the upstream last answered.
    trips: u32,
    open_until_ms: i64,
    probing: bool,
}

/// How an attempt was let through, which decides what its outcome does to the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// While the breaker was closed. Its failure counts towards opening it; once it is open,
    /// the failure of an attempt that was already out neither reopens it nor lengthens the
    /// pause: only a failed probe does, else every attempt in flight when it opened would
    /// double the first pause.
    Closed,
    /// As the breaker's single probe.
    Probe,
}

/// How much an upstream may be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Its breaker is closed: everything.
    All,
    /// Its breaker is open and its probe is due: one event.
    Probe,
    /// Its breaker is open and pausing, or its probe is out: nothing.
    Held,
}

pub struct Breakers {
    /// Consecutive failures that open a breaker; 0: never.
    trip_after: u32,
    upstreams: Mutex<HashMap<String, Upstream>>,
}

fn pause_ms(trips: u32) -> i64 {
    FIRST_PAUSE_MS.saturating_mul(1 << trips.saturating_sub(1).min(5)).min(MAX_PAUSE_MS)
}

impl Breakers {
    pub fn new(trip_after: u32) -> Self {
        Breakers { trip_after, upstreams: Mutex::default() }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Upstream>) -> T) -> T {
        f(&mut self.upstreams.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn open(&self, u: &Upstream) -> bool {
        self.trip_after > 0 && u.failures >= self.trip_after
    }

    /// Whether an attempt at `url` now would be turned away (no side effect).
    pub fn blocked(&self, url: &str, now_ms: i64) -> bool {
        self.flow(url, now_ms) == Flow::Held
    }

    /// What `url` may be sent now (no side effect: a probe is still taken with `admit`).
    pub fn flow(&self, url: &str, now_ms: i64) -> Flow {
        self.with(|m| match m.get(url) {
            Some(s) if self.open(s) && (s.probing || now_ms < s.open_until_ms) => Flow::Held,
            Some(s) if self.open(s) => Flow::Probe,
            _ => Flow::All,
        })
    }

    /// Takes the right to try `url` now: always while closed; once open, only as the single
    /// probe after the pause. Whoever is admitted must `report` the outcome, or `forgo` it.
    pub fn admit(&self, url: &str, now_ms: i64) -> Option<Admitted> {
        self.with(|m| match m.get_mut(url) {
            Some(s) if self.open(s) => {
                if s.probing || now_ms < s.open_until_ms {
                    return None;
                }
                s.probing = true;
                Some(Admitted::Probe)
            }
            _ => Some(Admitted::Closed),
        })
    }

    /// An admitted attempt that was not made after all: a probe is given back.
    pub fn forgo(&self, url: &str, how: Admitted) {
        if how == Admitted::Probe {
            self.with(|m| {
                if let Some(s) = m.get_mut(url) {
                    s.probing = false;
                }
            })
        }
    }

    /// The outcome of an admitted attempt. `reached`: the upstream answered with anything but
    /// a 5xx or 429, or an answer that refuses every event alike (a redirect, 401, 403, 404,
    /// 405), so it is up and takes events, whatever it thought of this one.
    pub fn report(&self, url: &str, how: Admitted, reached: bool, now_ms: i64) {
        self.with(|m| {
            if reached {
                if m.remove(url).is_some_and(|s| self.open(&s)) {
                    tracing::info!(upstream = %loggable(url), "upstream answers again; deliveries resume");
                }
                return;
            }
            let s = m.entry(url.to_owned()).or_default();
            let was_open = self.open(s);
            s.failures = s.failures.saturating_add(1);
            let trips = match how {
                Admitted::Probe => {
                    s.probing = false;
                    true
                }
                Admitted::Closed => !was_open && self.open(s),
            };
            if trips {
                s.trips = s.trips.saturating_add(1);
                s.open_until_ms = now_ms + pause_ms(s.trips);
                if s.trips == 1 {
                    tracing::warn!(upstream = %loggable(url), failures = s.failures, "upstream keeps failing; deliveries held, probing");
                }
            }
        })
    }
}

/// An upstream URL as a log line may show it: without the user and password a URL can carry,
/// and without its query, where platforms put tokens.
fn loggable(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let query = u.query().is_some();
            u.set_query(None);
            u.set_fragment(None);
            if query {
                format!("{u}?...")
            } else {
                u.to_string()
            }
        }
        Err(_) => "(an unreadable URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://upstream.test/events";
    const TRIP_AFTER: u32 = 5;

    use Admitted::{Closed, Probe};

    #[test]
    fn it_opens_after_consecutive_failures_only() {
        let b = Breakers::new(TRIP_AFTER);
        for _ in 0..TRIP_AFTER - 1 {
            assert_eq!(b.admit(URL, 0), Some(Closed));
            b.report(URL, Closed, false, 0);
        }
        b.report(URL, Closed, true, 0);
        for _ in 0..TRIP_AFTER - 1 {
            b.report(URL, Closed, false, 0);
        }
        assert!(!b.blocked(URL, 0), "a success in between resets the count");
        b.report(URL, Closed, false, 0);
        assert!(b.blocked(URL, 0));
        assert_eq!(b.admit(URL, 999), None);
        assert!(!b.blocked("http://other.test/", 0), "another upstream is not held");
    }

    #[test]
    fn one_probe_at_a_time_after_a_pause_that_grows_until_the_upstream_answers() {
        let b = Breakers::new(TRIP_AFTER);
        for _ in 0..TRIP_AFTER {
            b.report(URL, Closed, false, 0);
        }
        assert_eq!((b.flow(URL, 999), b.flow(URL, 1_000)), (Flow::Held, Flow::Probe));
        assert_eq!(b.admit(URL, 1_000), Some(Probe), "the probe after the first pause");
        assert_eq!(b.flow(URL, 1_000), Flow::Held, "the probe is out");
        assert_eq!(b.admit(URL, 1_000), None, "only one probe");
        assert!(b.blocked(URL, 1_000));
        b.forgo(URL, Closed);
        assert_eq!(b.admit(URL, 1_000), None, "giving back an ordinary attempt frees no probe");
        b.forgo(URL, Probe);
        assert_eq!(b.admit(URL, 1_000), Some(Probe), "a probe given back is taken again");
        b.report(URL, Probe, false, 1_000);
        assert_eq!(b.admit(URL, 2_999), None);
        assert_eq!(b.admit(URL, 3_000), Some(Probe), "the second pause is twice the first");
        b.report(URL, Probe, false, 3_000);
        assert_eq!(b.admit(URL, 6_999), None);
        assert_eq!(b.admit(URL, 7_000), Some(Probe));
        b.report(URL, Probe, true, 7_000);
        assert!(!b.blocked(URL, 7_000));
        assert_eq!(b.flow(URL, 7_000), Flow::All);
        assert_eq!((b.admit(URL, 7_000), b.admit(URL, 7_000)), (Some(Closed), Some(Closed)), "closed again");
    }

    #[test]
    fn attempts_already_out_when_it_opens_neither_lengthen_the_pause_nor_free_a_second_probe() {
        let b = Breakers::new(2);
        // Seven attempts go out while the breaker is closed; all of them fail.
        let out: Vec<_> = (0..7).map(|_| b.admit(URL, 0)).collect();
        assert!(out.iter().all(|a| *a == Some(Closed)));
        b.report(URL, Closed, false, 10);
        b.report(URL, Closed, false, 10);
        assert!(b.blocked(URL, 10), "open after two failures");
        for _ in 0..4 {
            b.report(URL, Closed, false, 20);
        }
        assert_eq!(b.admit(URL, 1_009), None);
        assert_eq!(b.admit(URL, 1_010), Some(Probe), "the first probe 1 s after it opened, not 30 s");
        // The last attempt from before it opened fails while the probe is out.
        b.report(URL, Closed, false, 1_020);
        assert_eq!(b.admit(URL, 1_020), None, "still only the one probe");
        b.report(URL, Probe, false, 1_100);
        assert_eq!(b.admit(URL, 3_099), None);
        assert_eq!(b.admit(URL, 3_100), Some(Probe), "a failed probe doubles the pause");
        // An attempt from before it opened that gets an answer closes it: the upstream is up.
        b.report(URL, Closed, true, 3_200);
        assert_eq!(b.flow(URL, 3_200), Flow::All);
    }

    #[test]
    fn with_no_threshold_it_never_opens() {
        let b = Breakers::new(0);
        for _ in 0..100 {
            b.report(URL, Closed, false, 0);
        }
        assert!(!b.blocked(URL, 0));
        assert_eq!(b.admit(URL, 0), Some(Closed));
        assert_eq!(b.flow(URL, 0), Flow::All);
    }

    #[test]
    fn the_pause_is_bounded() {
        assert_eq!(
            (pause_ms(1), pause_ms(2), pause_ms(5), pause_ms(6), pause_ms(40)),
            (1_000, 2_000, 16_000, 30_000, 30_000)
        );
    }

    #[test]
    fn logged_urls_carry_no_credentials_or_query() {
        assert_eq!(
            loggable("https://user:p4ss@agent.example.com:8443/hook?token=s3cret#x"),
            "https://agent.example.com:8443/hook?..."
        );
        assert_eq!(loggable("http://127.0.0.1:9/hook"), "http://127.0.0.1:9/hook");
        assert_eq!(loggable("not a url p4ss"), "(an unreadable URL)");
    }
}
