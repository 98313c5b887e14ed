//! Logging. Filters come from `CALLGATE_LOG`; log lines never carry bodies, secrets or signatures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Parses a `CALLGATE_LOG` filter: EnvFilter directives such as
/// `info,callgate=debug,actix_web[request]=trace`. All three guards below work around
/// tracing-subscriber 0.3.23 and were found by the `settings` fuzz target.
///
/// Span field filters (`[span{field=value}]`) are refused. With regexes on, a field value is
/// compiled into a DFA that is exponential in the pattern (`<*.................` hung start-up);
/// with them off, two equal field filters (`[{a=x}],[{a=x}]`) trip a debug assertion, as
/// `ValueMatch::eq` has no arm for literal values. Regexes stay off as a second line of defence.
///
/// Each comma-separated directive is trimmed first: tracing-subscriber walks a directive's
/// trimmed text but slices the untrimmed one with those indices, so `info, callgate=debug` was
/// refused and ` é=debug` panicked on a char boundary (tokio-rs/tracing#3297).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    if filter.contains('{') {
        return Err("span field filters ({...}) are not supported".to_owned());
    }
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    // A word alone is a target to EnvFilter (`verbose` turns on a target of that name and
    // silences everything else, warnings included): only a level may stand alone here.
    // `target=` with no level is the same.
    if let Some(word) =
        directives.iter().find(|d| d.ends_with('=') || (!d.is_empty() && !d.contains(['=', '[']) && !is_level(d)))
    {
        return Err(format!("{word:?} is not a level (off, error, warn, info, debug, trace) nor target=level"));
    }
    EnvFilter::builder().with_regex(false).parse(directives.join(",")).map_err(|e| e.to_string())
}

fn is_level(word: &str) -> bool {
    ["off", "error", "warn", "info", "debug", "trace"].iter().any(|l| l.eq_ignore_ascii_case(word))
}

pub fn init(filter: &str) {
    let filter = parse_filter(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only where a terminal reads them, not in a file or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .finish()
        .with(ClientNoise::default())
        .try_init();
}

/// Lets one of a kind of log line through each second, for lines every request of a flood
/// would repeat.
#[derive(Default)]
pub struct OncePerSecond(AtomicU64);

impl OncePerSecond {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// True for the first call in each second of the clock.
    pub fn due(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.0.swap(now, Ordering::Relaxed) != now
    }
}

/// actix-http logs every malformed request it refuses (a head too large, a bad header) at ERROR,
/// one line a connection. They are the client's fault, and anyone can send them by the
/// thousand to bury the lines that matter: one a second gets through.
#[derive(Default)]
pub struct ClientNoise {
    lines: OncePerSecond,
}

impl<S: Subscriber> Layer<S> for ClientNoise {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        // actix-http logs through the `log` crate; its events carry their target in fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        // Only its ERROR lines are the flood; its debug and trace lines are asked for.
        if *meta.level() != tracing::Level::ERROR || !meta.target().starts_with("actix_http::h1") {
            return true;
        }
        self.lines.due()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::settings::Settings;

    /// Regressions (fuzz/artifacts/settings/timeout-b234afc7… and crash-bb04c48f…, minimized): with
    /// regexes on, the first took over a minute to validate (doubling with each extra `.`); with
    /// them off, the second panicked in a debug build.
    #[test]
    fn field_filters_are_refused_quickly() {
        let started = Instant::now();
        for log in ["warn,[span{user=<*................}]=debug", "[{a=x}],[{a=x}]", "[{a=x}]=info,[{a=x=1}]=debug"] {
            assert!(parse_filter(log).is_err(), "{log}");
            let env: HashMap<String, String> = [("CALLGATE_LOG".to_owned(), log.to_owned())].into();
            assert_eq!(Settings::load(None, &env).unwrap_err().name, "CALLGATE_LOG");
        }
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    /// Regression (fuzz/artifacts/settings/crash-56f034b4…, minimized): a panic inside
    /// tracing-subscriber's directive parser, i.e. at start-up.
    #[test]
    fn whitespace_around_directives_is_trimmed() {
        assert_eq!(parse_filter(" é=debug").unwrap().to_string(), "é=debug");
        let f = parse_filter("info, callgate=debug ,\twarp=warn").unwrap().to_string();
        for directive in ["info", "callgate=debug", "warp=warn"] {
            assert!(f.split(',').any(|d| d == directive), "{directive} missing from {f}");
        }
        let env: HashMap<String, String> = [("CALLGATE_LOG".to_owned(), " é=debug".to_owned())].into();
        assert!(Settings::load(None, &env).is_ok());
    }

    #[test]
    fn plain_filters_still_parse_and_bad_ones_fail() {
        assert!(parse_filter("info,callgate=debug,actix_web[request]=trace,x[s],x[s]=warn").is_ok());
        assert!(parse_filter("callgate=loud").is_err());
    }

    /// A writer that keeps what is logged, for the test below.
    #[derive(Clone, Default)]
    struct Kept(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn malformed_request_lines_from_actix_http_are_let_through_once_a_second() {
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .with(ClientNoise::default());
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..500 {
                tracing::error!(target: "actix_http::h1::dispatcher", "stream error: request parse error {i}");
                tracing::error!(target: "callgate::store", "a store error {i}");
                tracing::info!(target: "actix_http::h1::dispatcher", "asked-for detail {i}");
            }
        });
        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        let noise = text.lines().filter(|l| l.contains("stream error")).count();
        assert!((1..=2).contains(&noise), "{noise} lines of client noise");
        assert_eq!(text.lines().filter(|l| l.contains("a store error")).count(), 500);
        assert_eq!(text.lines().filter(|l| l.contains("asked-for detail")).count(), 500);
    }

    /// EnvFilter takes a lone word for a target, so a mistyped level turned every log line off.
    #[test]
    fn a_word_that_is_not_a_level_is_refused_not_taken_for_a_target() {
        for log in ["verbose", "garbage!!", "notalevel=", "info,verbose", "callgate="] {
            let err = parse_filter(log).unwrap_err();
            assert!(err.contains("is not a level"), "{log}: {err}");
            let env: HashMap<String, String> = [("CALLGATE_LOG".to_owned(), log.to_owned())].into();
            assert_eq!(Settings::load(None, &env).unwrap_err().name, "CALLGATE_LOG", "{log}");
        }
        for log in ["", "info", "WARN", "off", "warn,callgate=debug", "x[s]"] {
            assert!(parse_filter(log).is_ok(), "{log}");
        }
    }
}
