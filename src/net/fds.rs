//! File descriptors. Every connection, journal segment, store file and outbound request takes
//! one from the same per-process limit, so a flood of idle connections must not take the ones
//! the journal needs for its next segment, or a hand-off its next socket.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Where an unlimited hard limit is met, the soft one goes this high (Linux's default
/// `nr_open`): the soft limit may not be set to "unlimited" itself.
const UNLIMITED_AS: u64 = 1 << 20;

/// The soft limit on open files; `None` if unlimited.
pub fn limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does at start. The
/// soft limit (often 1,024) is a default for programs that never need many, and every
/// connection takes one. Returns the soft limit before and after.
pub fn raise_limit() -> (Option<u64>, Option<u64>) {
    let was = getrlimit(Resource::Nofile);
    let target = match (was.current, was.maximum) {
        (Some(soft), Some(hard)) if soft < hard => hard,
        (Some(soft), None) if soft < UNLIMITED_AS => UNLIMITED_AS,
        _ => return (was.current, was.current),
    };
    // Refused (a container that forbids it), the limit stays as it was: nothing depends on
    // the raise but how many connections are taken, and that follows the limit in force.
    let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: was.maximum });
    (was.current, limit())
}

/// The fewest open files callgate starts with: an idle server holds about 30 (the store, the
/// workers' own, the journal's active segment), the journal keeps up to 16 sealed segments
/// open as they are read, and connections take half.
pub const MIN_LIMIT: u64 = 128;

/// Refuses a limit too low to serve: below it, workers fail to start or accept nothing.
pub fn check_limit(limit: Option<u64>) -> Result<(), String> {
    match limit {
        Some(n) if n < MIN_LIMIT => Err(format!(
            "the open-file limit is {n}; callgate needs at least {MIN_LIMIT} (raise it with `ulimit -n` or systemd's LimitNOFILE=)"
        )),
        _ => Ok(()),
    }
}

/// The connections each of `workers` takes at most: half the open-file limit between them.
/// The other half stays for the journal's segments, the store and outbound requests. Beyond
/// the cap, new connections wait in the listen backlog until one closes (idle ones close
/// within 5 s), instead of taking the descriptors the store needs.
pub fn connection_cap(limit: Option<u64>, workers: usize) -> usize {
    let half = limit.unwrap_or(UNLIMITED_AS).min(UNLIMITED_AS) / 2;
    // actix-web's own default per worker is 25,000, above most limits.
    (half as usize / workers.max(1)).clamp(1, 25_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_limit_is_shared_among_the_workers() {
        assert_eq!(connection_cap(Some(1024), 2), 256);
        assert_eq!(connection_cap(Some(300), 2), 75);
        assert_eq!(connection_cap(Some(524_288), 4), 25_000);
        assert_eq!(connection_cap(None, 2), 25_000);
        assert_eq!(connection_cap(Some(128), 64), 1, "never more than the limit allows");
        assert!(check_limit(Some(127)).unwrap_err().contains("at least 128"));
        assert!(check_limit(Some(128)).is_ok() && check_limit(None).is_ok());
        assert_eq!(connection_cap(Some(1024), 0), 512);
    }
}
