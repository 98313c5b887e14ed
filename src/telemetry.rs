//! Logging. Filters come from `CALLGATE_LOG`; log lines never carry bodies, secrets or signatures.

use tracing_subscriber::filter::ParseError;
use tracing_subscriber::EnvFilter;

/// Parses a `CALLGATE_LOG` filter (EnvFilter syntax). Span field values are matched as literal
/// text, never compiled as regular expressions: the DFA for a value such as `<*.................`
/// takes exponential time and memory to build, so one line of configuration could hang start-up
/// (found by the `settings` fuzz target; tracing-subscriber advises the same for filters that
/// come from outside the program).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, ParseError> {
    EnvFilter::builder().with_regex(false).parse(filter)
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

    #[test]
    fn plain_filters_still_parse_and_bad_ones_fail() {
        assert!(parse_filter("info,callgate=debug,actix_web[request{method=POST}]=trace").is_ok());
        assert!(parse_filter("callgate=loud").is_err());
    }
}
