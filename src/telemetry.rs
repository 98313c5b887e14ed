//! Logging. Filters come from `CALLGATE_LOG`; log lines never carry bodies, secrets or signatures.

use tracing_subscriber::filter::ParseError;
use tracing_subscriber::EnvFilter;

/// Parses a `CALLGATE_LOG` filter (EnvFilter syntax). Span field values are matched as literal
/// text, never compiled as regular expressions: the DFA for a value such as `<*.................`
/// takes exponential time and memory to build, so one line of configuration could hang start-up
/// (found by the `settings` fuzz target; tracing-subscriber advises the same for filters that
/// come from outside the program).
///
/// Each comma-separated directive is trimmed first: tracing-subscriber 0.3.23 walks a directive's
/// trimmed text but slices the untrimmed one with those indices, so `info, callgate=debug`
/// misparses and ` é=debug` panics on a char boundary (tokio-rs/tracing#3297; also found by the
/// `settings` fuzz target).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, ParseError> {
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    EnvFilter::builder().with_regex(false).parse(directives.join(","))
}

pub fn init(filter: &str) {
    let filter = parse_filter(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::settings::Settings;

    /// Regression (fuzz/artifacts/settings/timeout-b234afc7…, minimized): with regexes on, this
    /// filter took over a minute to validate, doubling with each extra `.`.
    #[test]
    fn field_value_is_not_compiled_as_a_regex() {
        let log = "warn,[span{user=<*................}]=debug";
        let started = Instant::now();
        assert!(parse_filter(log).is_ok());
        let env: HashMap<String, String> = [("CALLGATE_LOG".to_owned(), log.to_owned())].into();
        assert_eq!(Settings::load(None, &env).unwrap().log, log);
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
        assert!(parse_filter("info,callgate=debug,actix_web[request{method=POST}]=trace").is_ok());
        assert!(parse_filter("callgate=loud").is_err());
    }
}
