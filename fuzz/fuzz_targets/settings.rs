//! `Settings::load`: the environment overrides (proxy and allow-list CIDRs, master key, URLs,
//! numbers, the log filter) and, optionally, a `--config` TOML file merged over the defaults.
//!
//! Input: lines of `NAME=value` before an optional NUL byte; after the NUL, TOML text. A line
//! whose NAME is not one of the variables below picks one by its first byte, so mutations of a
//! name still land on a variable. The TOML part is written to a per-process file in /dev/shm
//! (tmpfs: no disk I/O) and passed as the config file; with no NUL there is no config file.
//!
//! Oracles: no panic on any input, and a loaded `Settings` satisfies every rule `validate`
//! states (origins without path or trailing slash, bounds on numbers, parsed lists complete).
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use callgate::settings::Settings;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 26] = [
    "CALLGATE_LISTEN",
    "CALLGATE_DATA_DIR",
    "CALLGATE_PUBLIC_URL",
    "CALLGATE_MASTER_KEY",
    "CALLGATE_ADMIN_TOKEN",
    "CALLGATE_TRUSTED_PROXIES",
    "EXOTEL_ALLOWED_IPS",
    "CALLGATE_LOG",
    "CALLGATE_BODY_LIMIT_BYTES",
    "CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE",
    "CALLGATE_CREDENTIAL_GRACE_SECS",
    "CALLGATE_REPLAY_WINDOW_SECS",
    "CALLGATE_PROVIDER_TIMEOUT_MS",
    "CALLGATE_ASSISTANT_URL",
    "CALLGATE_UPSTREAM_URL",
    "CALLGATE_UPSTREAM_SECRET",
    "CALLGATE_UPSTREAM_PREVIOUS_SECRET",
    "CALLGATE_ANSWER_DEADLINE_MS",
    "CALLGATE_DELIVERY_WORKERS",
    "CALLGATE_DELIVERY_TIMEOUT_MS",
    "CALLGATE_DELIVERY_HORIZON_SECS",
    "CALLGATE_PLIVO_API_URL",
    "CALLGATE_VOBIZ_API_URL",
    "CALLGATE_TWILIO_API_URL",
    "CALLGATE_TELNYX_API_URL",
    "CALLGATE_EXOTEL_API_URL",
];

fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        dir.join(format!("callgate-fuzz-settings-{}.toml", std::process::id()))
    })
}

fn origin_ok(s: &str) -> bool {
    !s.ends_with('/') && url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fuzz_target!(|data: &[u8]| {
    let (env_part, toml_part) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let mut env: HashMap<String, String> = HashMap::new();
    for line in env_part.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = String::from_utf8_lossy(line);
        let (name, value) = line.split_once('=').unwrap_or(("", line.as_ref()));
        let name = match NAMES.iter().find(|n| **n == name) {
            Some(n) => n,
            None => NAMES[usize::from(line.as_bytes()[0]) % NAMES.len()],
        };
        env.insert(name.to_owned(), value.to_owned());
    }
    let path = toml_part.map(|t| {
        std::fs::write(config_path(), t).expect("write the config file to tmpfs");
        config_path().as_path()
    });

    let loaded = Settings::load(path, &env);
    if path.is_some() {
        let _ = std::fs::remove_file(config_path());
    }
    let Ok(s) = loaded else { return };

    assert!(origin_ok(&s.public_url), "public_url {:?}", s.public_url);
    assert_eq!(url::Url::parse(&s.public_url).unwrap().path(), "/");
    for u in [&s.carrier_urls.plivo, &s.carrier_urls.vobiz, &s.carrier_urls.twilio, &s.carrier_urls.telnyx] {
        assert!(origin_ok(u), "carrier url {u:?}");
    }
    if let Some(u) = &s.carrier_urls.exotel {
        assert!(origin_ok(u));
    }
    assert!(s.body_limit_bytes >= 1024);
    assert!(s.byok_rate_limit_per_minute >= 1);
    assert!(!s.provider_timeout.is_zero());
    assert!((100..=14_000).contains(&s.handoff.answer_deadline.as_millis()));
    assert!((1..=256).contains(&s.handoff.delivery_workers));
    assert!(!s.handoff.delivery_timeout.is_zero());
    if let Some(t) = &s.admin_token {
        assert!(t.expose().len() >= 16);
    }
    for secret in [&s.handoff.upstream_secret, &s.handoff.upstream_previous_secret].into_iter().flatten() {
        assert!(secret.expose().starts_with("whsec_"));
    }
    for u in [&s.handoff.assistant_url, &s.handoff.upstream_url].into_iter().flatten() {
        assert!(url::Url::parse(u).is_ok());
    }
    // Accepted windows are used as `now_ms + window.as_millis() as i64` (pipeline replay marker,
    // credential grace in vault/routes.rs and phones.rs, outbox delivery horizon): they must fit.
    const YEAR_2100_MS: i64 = 4_102_444_800_000;
    for (name, d) in [
        ("replay_window", s.replay_window),
        ("credential_grace", s.credential_grace),
        ("delivery_horizon", s.handoff.delivery_horizon),
    ] {
        let ms = i64::try_from(d.as_millis()).unwrap_or_else(|_| panic!("{name} {d:?} does not fit in i64 ms"));
        assert!(YEAR_2100_MS.checked_add(ms).is_some(), "{name} {d:?}: now + window overflows i64 ms");
    }
    // A list from the environment is taken whole: every non-empty item became a network.
    if toml_part.is_none() {
        for (name, list) in
            [("CALLGATE_TRUSTED_PROXIES", &s.trusted_proxies), ("EXOTEL_ALLOWED_IPS", &s.exotel_allowed_ips)]
        {
            if let Some(v) = env.get(name) {
                assert_eq!(list.len(), v.split(',').filter(|p| !p.trim().is_empty()).count(), "{name}");
            }
        }
        if let Some(v) = env.get("CALLGATE_LISTEN") {
            assert_eq!(s.listen, v.parse().unwrap());
        }
    }
});
