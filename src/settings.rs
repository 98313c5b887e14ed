//! Typed settings: the compiled-in `config/default.toml`, then an optional file, then the
//! environment. Everything is validated here so the server never starts half-configured.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::IpNet;
use serde::Deserialize;

use crate::carriers::rest::CarrierUrls;
use crate::domain::Secret;
use crate::store::JournalOptions;

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const EXOTEL_ALLOWLIST: &str = include_str!("../config/exotel-allowlist");

/// Longest replay window, credential grace or delivery horizon accepted. Each is added to the
/// current time as `i64` milliseconds (replay markers, grace deadlines, the outbox's give-up
/// time); a century is beyond any real use and far from overflowing that sum.
const MAX_WINDOW_SECS: u64 = 100 * 365 * 24 * 3600;

/// One bad setting, named, so the start-up failure is a single clear line.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}{}: {problem}", file_key(name).map(|k| format!(" (`{k}` in a config file)")).unwrap_or_default())]
pub struct SettingsError {
    pub name: String,
    pub problem: String,
}

/// The config file's key for a setting's variable: a value may have come from either, and the
/// check that refuses it runs after they are layered.
fn file_key(var: &str) -> Option<String> {
    let key = var.strip_prefix("CALLGATE_")?.to_ascii_lowercase();
    let section = if key.ends_with("_api_url") {
        "carriers."
    } else if key.starts_with("delivery_")
        || key.starts_with("upstream_")
        || key.starts_with("assistant_")
        || key == "answer_deadline_ms"
    {
        "handoff."
    } else {
        ""
    };
    Some(format!("{section}{key}"))
}

fn bad(name: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError { name: name.to_owned(), problem: problem.into() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    data_dir: PathBuf,
    public_url: String,
    master_key: Option<String>,
    admin_token: Option<String>,
    trusted_proxies: Vec<String>,
    exotel_allowed_ips: Option<Vec<String>>,
    org_url_deny: Vec<String>,
    /// Not a setting: the egress proxies' names, from the same environment reqwest reads.
    #[serde(skip)]
    proxies: Vec<String>,
    log: String,
    body_limit_bytes: usize,
    byok_rate_limit_per_minute: u32,
    carrier_rate_limit_per_minute: u32,
    credential_grace_secs: u64,
    replay_window_secs: u64,
    journal_preallocate_mb: u64,
    commit_linger_us: u64,
    provider_timeout_ms: u64,
    carriers: RawCarriers,
    handoff: RawHandoff,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandoff {
    assistant_url: Option<String>,
    answer_deadline_ms: u64,
    upstream_url: Option<String>,
    upstream_secret: Option<String>,
    upstream_previous_secret: Option<String>,
    delivery_workers: usize,
    delivery_timeout_ms: u64,
    delivery_horizon_secs: u64,
    delivery_breaker_after: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCarriers {
    plivo_api_url: String,
    vobiz_api_url: String,
    twilio_api_url: String,
    telnyx_api_url: String,
    exotel_api_url: Option<String>,
}

const BODY_LIMIT_MAX: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Scheme, host and optional port; never a trailing slash.
    pub public_url: String,
    pub master_key: Option<MasterKeyInput>,
    pub admin_token: Option<Secret>,
    pub trusted_proxies: Vec<IpNet>,
    pub exotel_allowed_ips: Vec<IpNet>,
    /// Where a number's own upstream and assistant URLs may not lead (`CALLGATE_ORG_URL_DENY`).
    pub org_reach: crate::net::outbound::Reach,
    pub log: String,
    pub body_limit_bytes: usize,
    pub byok_rate_limit_per_minute: u32,
    pub carrier_rate_limit_per_minute: u32,
    pub credential_grace: Duration,
    pub replay_window: Duration,
    pub journal: JournalOptions,
    /// See `commit_linger_us` in config/default.toml.
    pub commit_linger: Option<Duration>,
    pub provider_timeout: Duration,
    pub carrier_urls: CarrierUrls,
    pub handoff: Handoff,
}

/// Where verified events go: the assistant that decides how to answer a call, and the
/// upstream that receives every event.
#[derive(Clone, Debug)]
pub struct Handoff {
    pub assistant_url: Option<String>,
    pub answer_deadline: Duration,
    pub upstream_url: Option<String>,
    /// `whsec_…`; None: generated into the data dir on first start.
    pub upstream_secret: Option<Secret>,
    /// Also signed with while a secret rotation is under way.
    pub upstream_previous_secret: Option<Secret>,
    pub delivery_workers: usize,
    pub delivery_timeout: Duration,
    pub delivery_horizon: Duration,
    /// Consecutive failures that hold an upstream behind its breaker; 0: never held.
    pub delivery_breaker_after: u32,
}

/// A Standard Webhooks secret: `whsec_` + base64 of at least 24 random bytes.
pub fn check_whsec(name: &str, s: &str) -> Result<Secret, SettingsError> {
    let body = s.trim().strip_prefix("whsec_").ok_or_else(|| bad(name, "must start with whsec_"))?;
    let raw = B64.decode(body).map_err(|_| bad(name, "must be whsec_ followed by base64"))?;
    if raw.len() < 24 || raw.len() > 64 {
        return Err(bad(name, "must hold 24 to 64 bytes"));
    }
    Ok(Secret::new(s.trim().to_owned()))
}

/// The master key as given by the operator, already checked to be 32 bytes.
#[derive(Clone)]
pub struct MasterKeyInput(pub zeroize::Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKeyInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl MasterKeyInput {
    pub fn parse_base64(name: &str, text: &str) -> Result<Self, SettingsError> {
        let raw = zeroize::Zeroizing::new(
            B64.decode(text.trim()).map_err(|_| bad(name, "must be base64 of 32 random bytes"))?,
        );
        let bytes: [u8; 32] =
            raw.as_slice().try_into().map_err(|_| bad(name, format!("must decode to 32 bytes, got {}", raw.len())))?;
        Ok(Self(zeroize::Zeroizing::new(bytes)))
    }
}

/// The environment as a lookup, so tests can pass their own instead of the process's.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for std::collections::HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Where in the operator's file the value the settings refuse is, and why: the merged table
/// has lost the file's positions, so each of the file's values is tried alone over the
/// defaults until one fails, then its key is looked up in the file for its line.
fn config_problem(path: &Path, text: &str, defaults: &toml::Table, over: &toml::Table, merged: &str) -> String {
    let mut leaves = Vec::new();
    leaves_of(over, &mut Vec::new(), &mut leaves);
    for (keys, value) in leaves {
        let alone = keys.iter().rev().fold(value, |v, k| toml::Value::Table(toml::Table::from_iter([(k.clone(), v)])));
        let mut table = defaults.clone();
        if let toml::Value::Table(alone) = alone {
            merge(&mut table, alone);
        }
        if let Err(e) = toml::Value::Table(table).try_into::<Raw>() {
            let at = key_offset(text, &keys).map(|o| format!(", line {}", line_of(text, o))).unwrap_or_default();
            return format!("{}{at}: {}: {}", path.display(), keys.join("."), e.message());
        }
    }
    format!("{}: {merged}", path.display())
}

fn leaves_of(table: &toml::Table, keys: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    for (k, v) in table {
        keys.push(k.clone());
        match v {
            toml::Value::Table(t) if !t.is_empty() => leaves_of(t, keys, out),
            v => out.push((keys.clone(), v.clone())),
        }
        keys.pop();
    }
}

/// Where the last of `keys` is written in the file.
fn key_offset(text: &str, keys: &[String]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let (last, path) = keys.split_last()?;
    for k in path {
        table = table.get(k)?.as_table_like()?;
    }
    table.get_key_value(last)?.0.span().map(|s| s.start)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

fn cidr_list(name: &str, items: &[String]) -> Result<Vec<IpNet>, SettingsError> {
    items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).map(|s| parse_net(name, s)).collect()
}

fn parse_net(name: &str, s: &str) -> Result<IpNet, SettingsError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| bad(name, format!("{s:?} is not an IP address or CIDR")))
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect()
}

fn origin(name: &str, s: &str) -> Result<String, SettingsError> {
    let u = url::Url::parse(s).map_err(|_| bad(name, format!("{s:?} is not a URL")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(bad(name, "must be an http:// or https:// URL with a host"));
    }
    if u.query().is_some() || u.fragment().is_some() || u.username() != "" || u.password().is_some() {
        return Err(bad(name, "must not carry credentials, a query or a fragment"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

impl Settings {
    pub fn load(config_file: Option<&Path>, env: &dyn Env) -> Result<Settings, SettingsError> {
        let defaults: toml::Table = DEFAULT_TOML.parse().expect("the compiled-in default.toml parses");
        let mut raw: Raw = match config_file {
            None => toml::Value::Table(defaults).try_into().expect("the compiled-in default.toml sets every setting"),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad("--config", format!("cannot read {}: {e}", path.display())))?;
                let over: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                    let at = e.span().map(|s| format!(", line {}", line_of(&text, s.start))).unwrap_or_default();
                    bad("--config", format!("{}{at}: {}", path.display(), e.message()))
                })?;
                let mut table = defaults.clone();
                merge(&mut table, over.clone());
                toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                    bad("--config", config_problem(path, &text, &defaults, &over, e.message()))
                })?
            }
        };

        let num = |name: &str, v: Option<String>| -> Result<Option<u64>, SettingsError> {
            v.map(|s| s.trim().parse::<u64>().map_err(|_| bad(name, "must be a whole number"))).transpose()
        };
        if let Some(v) = env.var("CALLGATE_LISTEN") {
            raw.listen = v;
        }
        if let Some(v) = env.var("CALLGATE_DATA_DIR") {
            // Empty, it would be the working directory, wherever the command ran.
            if v.trim().is_empty() {
                return Err(bad("CALLGATE_DATA_DIR", "must not be empty"));
            }
            raw.data_dir = v.into();
        }
        if let Some(v) = env.var("CALLGATE_PUBLIC_URL") {
            raw.public_url = v;
        }
        if let Some(v) = env.var("CALLGATE_MASTER_KEY") {
            raw.master_key = Some(v);
        }
        if let Some(v) = env.var("CALLGATE_ADMIN_TOKEN") {
            raw.admin_token = Some(v);
        }
        if let Some(v) = env.var("CALLGATE_TRUSTED_PROXIES") {
            raw.trusted_proxies = split_list(&v);
        }
        if let Some(v) = env.var("EXOTEL_ALLOWED_IPS") {
            raw.exotel_allowed_ips = Some(split_list(&v));
        }
        if let Some(v) = env.var("CALLGATE_ORG_URL_DENY") {
            raw.org_url_deny = split_list(&v);
        }
        raw.proxies = crate::net::outbound::proxy_hosts(|name| env.var(name));
        if let Some(v) = env.var("CALLGATE_LOG") {
            raw.log = v;
        }
        if let Some(v) = num("CALLGATE_BODY_LIMIT_BYTES", env.var("CALLGATE_BODY_LIMIT_BYTES"))? {
            raw.body_limit_bytes = v as usize;
        }
        if let Some(v) = num("CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE", env.var("CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE"))? {
            raw.byok_rate_limit_per_minute = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) =
            num("CALLGATE_CARRIER_RATE_LIMIT_PER_MINUTE", env.var("CALLGATE_CARRIER_RATE_LIMIT_PER_MINUTE"))?
        {
            raw.carrier_rate_limit_per_minute = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) = num("CALLGATE_CREDENTIAL_GRACE_SECS", env.var("CALLGATE_CREDENTIAL_GRACE_SECS"))? {
            raw.credential_grace_secs = v;
        }
        if let Some(v) = num("CALLGATE_REPLAY_WINDOW_SECS", env.var("CALLGATE_REPLAY_WINDOW_SECS"))? {
            raw.replay_window_secs = v;
        }
        if let Some(v) = num("CALLGATE_JOURNAL_PREALLOCATE_MB", env.var("CALLGATE_JOURNAL_PREALLOCATE_MB"))? {
            raw.journal_preallocate_mb = v;
        }
        if let Some(v) = num("CALLGATE_COMMIT_LINGER_US", env.var("CALLGATE_COMMIT_LINGER_US"))? {
            raw.commit_linger_us = v;
        }
        if let Some(v) = num("CALLGATE_PROVIDER_TIMEOUT_MS", env.var("CALLGATE_PROVIDER_TIMEOUT_MS"))? {
            raw.provider_timeout_ms = v;
        }
        let h = &mut raw.handoff;
        for (name, slot) in [
            ("CALLGATE_ASSISTANT_URL", &mut h.assistant_url),
            ("CALLGATE_UPSTREAM_URL", &mut h.upstream_url),
            ("CALLGATE_UPSTREAM_SECRET", &mut h.upstream_secret),
            ("CALLGATE_UPSTREAM_PREVIOUS_SECRET", &mut h.upstream_previous_secret),
        ] {
            if let Some(v) = env.var(name) {
                *slot = Some(v);
            }
        }
        if let Some(v) = num("CALLGATE_ANSWER_DEADLINE_MS", env.var("CALLGATE_ANSWER_DEADLINE_MS"))? {
            h.answer_deadline_ms = v;
        }
        if let Some(v) = num("CALLGATE_DELIVERY_WORKERS", env.var("CALLGATE_DELIVERY_WORKERS"))? {
            h.delivery_workers = v as usize;
        }
        if let Some(v) = num("CALLGATE_DELIVERY_TIMEOUT_MS", env.var("CALLGATE_DELIVERY_TIMEOUT_MS"))? {
            h.delivery_timeout_ms = v;
        }
        if let Some(v) = num("CALLGATE_DELIVERY_HORIZON_SECS", env.var("CALLGATE_DELIVERY_HORIZON_SECS"))? {
            h.delivery_horizon_secs = v;
        }
        if let Some(v) = num("CALLGATE_DELIVERY_BREAKER_AFTER", env.var("CALLGATE_DELIVERY_BREAKER_AFTER"))? {
            h.delivery_breaker_after = v;
        }
        let c = &mut raw.carriers;
        for (name, slot) in [
            ("CALLGATE_PLIVO_API_URL", &mut c.plivo_api_url),
            ("CALLGATE_VOBIZ_API_URL", &mut c.vobiz_api_url),
            ("CALLGATE_TWILIO_API_URL", &mut c.twilio_api_url),
            ("CALLGATE_TELNYX_API_URL", &mut c.telnyx_api_url),
        ] {
            if let Some(v) = env.var(name) {
                *slot = v;
            }
        }
        if let Some(v) = env.var("CALLGATE_EXOTEL_API_URL") {
            c.exotel_api_url = Some(v);
        }
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Settings, SettingsError> {
        let listen = raw
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| bad("CALLGATE_LISTEN", format!("{:?} is not an address:port", raw.listen)))?;
        let public_url = match raw.public_url.trim() {
            // Carriers sign the URL they call: by default that is where the gateway listens, not
            // a fixed port that a different `CALLGATE_LISTEN` would leave behind.
            "" => format!("http://{listen}"),
            given => origin("CALLGATE_PUBLIC_URL", given)?,
        };
        if url::Url::parse(&public_url).map(|u| u.path() != "/").unwrap_or(true) {
            return Err(bad("CALLGATE_PUBLIC_URL", "must be scheme://host[:port] with no path"));
        }
        // Set but empty is a secret that did not arrive (an unfilled template, a missing
        // secret mount): taken for unset, it would have a new key made and used unnoticed.
        if raw.master_key.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(bad("CALLGATE_MASTER_KEY", "is set but empty (unset it to use the key file in the data dir)"));
        }
        let master_key = raw.master_key.map(|s| MasterKeyInput::parse_base64("CALLGATE_MASTER_KEY", &s)).transpose()?;
        // Presented tokens are trimmed, and a token read from a secrets file ends in a newline:
        // untrimmed here, it could never match.
        let admin_token = match raw.admin_token.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()) {
            Some(t) if t.len() < 16 => return Err(bad("CALLGATE_ADMIN_TOKEN", "must be at least 16 characters")),
            other => other.map(Secret::new),
        };
        let exotel_allowed_ips = match raw.exotel_allowed_ips {
            Some(list) => cidr_list("EXOTEL_ALLOWED_IPS", &list)?,
            None => EXOTEL_ALLOWLIST
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(|l| parse_net("config/exotel-allowlist", l))
                .collect::<Result<_, _>>()?,
        };
        crate::telemetry::parse_filter(&raw.log).map_err(|e| bad("CALLGATE_LOG", e.to_string()))?;
        // A webhook is a few kilobytes; the ceiling keeps every verified body, once encoded with
        // its event, inside what one journal record holds.
        if !(1024..=BODY_LIMIT_MAX).contains(&raw.body_limit_bytes) {
            return Err(bad("CALLGATE_BODY_LIMIT_BYTES", "must be from 1024 to 1048576"));
        }
        if raw.byok_rate_limit_per_minute == 0 {
            return Err(bad("CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE", "must be at least 1"));
        }
        if raw.carrier_rate_limit_per_minute == 0 {
            return Err(bad("CALLGATE_CARRIER_RATE_LIMIT_PER_MINUTE", "must be at least 1"));
        }
        if raw.provider_timeout_ms == 0 {
            return Err(bad("CALLGATE_PROVIDER_TIMEOUT_MS", "must be at least 1"));
        }
        for (name, secs) in [
            ("CALLGATE_CREDENTIAL_GRACE_SECS", raw.credential_grace_secs),
            ("CALLGATE_REPLAY_WINDOW_SECS", raw.replay_window_secs),
            ("CALLGATE_DELIVERY_HORIZON_SECS", raw.handoff.delivery_horizon_secs),
        ] {
            if secs > MAX_WINDOW_SECS {
                return Err(bad(name, format!("must be at most {MAX_WINDOW_SECS} (100 years)")));
            }
        }
        // Telnyx accepts a timestamp up to 300 s either side of now, so one signed request stays
        // fresh for 600 s: a shorter memory would take it for new again within its freshness.
        if raw.replay_window_secs < 2 * crate::carriers::telnyx::signature::TOLERANCE_SECS {
            return Err(bad(
                "CALLGATE_REPLAY_WINDOW_SECS",
                "must be at least 600 (a Telnyx signature is fresh for 600 s)",
            ));
        }
        if raw.commit_linger_us > 100_000 {
            return Err(bad("CALLGATE_COMMIT_LINGER_US", "must be at most 100000 (0.1 s)"));
        }
        if raw.journal_preallocate_mb > 1024 {
            return Err(bad("CALLGATE_JOURNAL_PREALLOCATE_MB", "must be at most 1024 (a segment's largest size)"));
        }
        let h = raw.handoff;
        let http_url = |name: &str, v: Option<String>| -> Result<Option<String>, SettingsError> {
            match v.filter(|s| !s.trim().is_empty()) {
                None => Ok(None),
                Some(s) => {
                    url::Url::parse(&s).map_err(|_| bad(name, "is not a URL"))?;
                    if !crate::net::outbound::well_formed(&s, &["http", "https"]) {
                        return Err(bad(name, "must be an http:// or https:// URL"));
                    }
                    // The hand-off would refuse to call it, each time; better said once, now.
                    if !crate::net::outbound::allowed_url(&s) {
                        return Err(bad(name, "must not be a link-local, unspecified, broadcast or metadata address"));
                    }
                    Ok(Some(s))
                }
            }
        };
        if !(100..=14_000).contains(&h.answer_deadline_ms) {
            return Err(bad("CALLGATE_ANSWER_DEADLINE_MS", "must be between 100 and 14000 (carriers wait about 15 s)"));
        }
        if !(1..=256).contains(&h.delivery_workers) {
            return Err(bad("CALLGATE_DELIVERY_WORKERS", "must be between 1 and 256"));
        }
        if h.delivery_timeout_ms == 0 {
            return Err(bad("CALLGATE_DELIVERY_TIMEOUT_MS", "must be at least 1"));
        }
        if h.delivery_horizon_secs == 0 {
            return Err(bad(
                "CALLGATE_DELIVERY_HORIZON_SECS",
                "must be at least 1 (the last try is this long after the first)",
            ));
        }
        if h.delivery_breaker_after > 1_000 {
            return Err(bad("CALLGATE_DELIVERY_BREAKER_AFTER", "must be between 0 (never) and 1000"));
        }
        let handoff = Handoff {
            assistant_url: http_url("CALLGATE_ASSISTANT_URL", h.assistant_url)?,
            answer_deadline: Duration::from_millis(h.answer_deadline_ms),
            upstream_url: http_url("CALLGATE_UPSTREAM_URL", h.upstream_url)?,
            upstream_secret: h
                .upstream_secret
                .filter(|s| !s.is_empty())
                .map(|s| check_whsec("CALLGATE_UPSTREAM_SECRET", &s))
                .transpose()?,
            upstream_previous_secret: h
                .upstream_previous_secret
                .filter(|s| !s.is_empty())
                .map(|s| check_whsec("CALLGATE_UPSTREAM_PREVIOUS_SECRET", &s))
                .transpose()?,
            delivery_workers: h.delivery_workers,
            delivery_timeout: Duration::from_millis(h.delivery_timeout_ms),
            delivery_horizon: Duration::from_secs(h.delivery_horizon_secs),
            delivery_breaker_after: h.delivery_breaker_after as u32,
        };
        let c = raw.carriers;
        let carrier_urls = CarrierUrls {
            plivo: origin("CALLGATE_PLIVO_API_URL", &c.plivo_api_url)?,
            vobiz: origin("CALLGATE_VOBIZ_API_URL", &c.vobiz_api_url)?,
            twilio: origin("CALLGATE_TWILIO_API_URL", &c.twilio_api_url)?,
            telnyx: origin("CALLGATE_TELNYX_API_URL", &c.telnyx_api_url)?,
            exotel: c
                .exotel_api_url
                .filter(|s| !s.is_empty())
                .map(|s| origin("CALLGATE_EXOTEL_API_URL", &s))
                .transpose()?,
        };
        Ok(Settings {
            listen,
            data_dir: raw.data_dir,
            public_url,
            master_key,
            admin_token,
            trusted_proxies: cidr_list("CALLGATE_TRUSTED_PROXIES", &raw.trusted_proxies)?,
            exotel_allowed_ips,
            org_reach: crate::net::outbound::Reach::denying(
                cidr_list("CALLGATE_ORG_URL_DENY", &raw.org_url_deny)?,
                raw.proxies,
            ),
            log: raw.log,
            body_limit_bytes: raw.body_limit_bytes,
            byok_rate_limit_per_minute: raw.byok_rate_limit_per_minute,
            carrier_rate_limit_per_minute: raw.carrier_rate_limit_per_minute,
            credential_grace: Duration::from_secs(raw.credential_grace_secs),
            replay_window: Duration::from_secs(raw.replay_window_secs),
            commit_linger: (raw.commit_linger_us > 0).then(|| Duration::from_micros(raw.commit_linger_us)),
            journal: JournalOptions { preallocate_bytes: raw.journal_preallocate_mb << 20 },
            provider_timeout: Duration::from_millis(raw.provider_timeout_ms),
            carrier_urls,
            handoff,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.public_url, "http://127.0.0.1:8080");
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert!(s.exotel_allowed_ips.is_empty());
        assert!(s.trusted_proxies.is_empty());
        assert_eq!(s.body_limit_bytes, 65536);
        assert_eq!(s.carrier_urls.plivo, "https://api.plivo.com");
    }

    #[test]
    fn the_public_url_follows_the_listen_address_unless_given() {
        let s = Settings::load(None, &env(&[("CALLGATE_LISTEN", "127.0.0.1:18080")])).unwrap();
        assert_eq!(s.public_url, "http://127.0.0.1:18080");
        let s = Settings::load(None, &env(&[("CALLGATE_LISTEN", "[::1]:9000")])).unwrap();
        assert_eq!(s.public_url, "http://[::1]:9000");
        let given = [("CALLGATE_LISTEN", "127.0.0.1:18080"), ("CALLGATE_PUBLIC_URL", "https://voice.example.com")];
        assert_eq!(Settings::load(None, &env(&given)).unwrap().public_url, "https://voice.example.com");
    }

    #[test]
    fn env_wins_and_lists_parse() {
        let s = Settings::load(
            None,
            &env(&[
                ("CALLGATE_TRUSTED_PROXIES", "10.0.0.0/8, 2001:db8::/32"),
                ("EXOTEL_ALLOWED_IPS", "203.0.113.7,198.51.100.0/24,::1"),
                ("CALLGATE_ORG_URL_DENY", "10.0.0.0/8, 127.0.0.1"),
                ("CALLGATE_PUBLIC_URL", "https://voice.example.com/"),
            ]),
        )
        .unwrap();
        assert_eq!(s.trusted_proxies.len(), 2);
        assert_eq!(s.exotel_allowed_ips.len(), 3);
        let nets = ["10.0.0.0/8", "127.0.0.1/32"].map(|n| n.parse().unwrap());
        assert_eq!(s.org_reach, crate::net::outbound::Reach::denying(nets.to_vec(), vec![]));
        assert!(Settings::load(None, &env(&[])).unwrap().org_reach.is_open());
        assert_eq!(s.public_url, "https://voice.example.com");
    }

    #[test]
    fn bad_settings_name_themselves() {
        let cases = [
            ("CALLGATE_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("EXOTEL_ALLOWED_IPS", "not-an-ip"),
            ("CALLGATE_ORG_URL_DENY", "10.0.0.0/8,intranet"),
            ("CALLGATE_MASTER_KEY", "AAAA"),
            ("CALLGATE_LISTEN", "nowhere"),
            ("CALLGATE_PUBLIC_URL", "ftp://x"),
            ("CALLGATE_PLIVO_API_URL", "nope"),
            ("CALLGATE_ADMIN_TOKEN", "short"),
            ("CALLGATE_ADMIN_TOKEN", "  0123456789abcde\n"),
            ("CALLGATE_REPLAY_WINDOW_SECS", "0"),
            ("CALLGATE_REPLAY_WINDOW_SECS", "599"),
            ("CALLGATE_UPSTREAM_URL", "http://169.254.169.254/latest"),
            ("CALLGATE_ASSISTANT_URL", "http://[64:ff9b::a9fe:a9fe]/"),
            ("CALLGATE_UPSTREAM_URL", "https:///hook"),
            ("CALLGATE_DELIVERY_TIMEOUT_MS", "0"),
            ("CALLGATE_DELIVERY_HORIZON_SECS", "0"),
            ("CALLGATE_MASTER_KEY", ""),
            ("CALLGATE_MASTER_KEY", "  "),
        ];
        for (name, value) in cases {
            let err = Settings::load(None, &env(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{value}");
            assert!(name != "CALLGATE_MASTER_KEY" || value.trim().is_empty() || !err.to_string().contains(value));
        }
    }

    /// Regression (the `settings` fuzz target's window oracle): these are added to "now" as i64
    /// milliseconds in the pipeline, vault, phones and outbox. u64::MAX seconds truncated to
    /// -1 s (replay markers expired before they were written); 9223372036854775 s overflowed the
    /// sum (a panic in debug builds, a negative deadline in release).
    #[test]
    fn write_path_settings_have_defaults_and_bounds() {
        let s = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(s.journal.preallocate_bytes, 64 << 20);
        assert_eq!(s.commit_linger, Some(Duration::from_micros(400)));
        assert_eq!(s.handoff.delivery_breaker_after, 5);
        let s = Settings::load(None, &env(&[("CALLGATE_DELIVERY_BREAKER_AFTER", "0")])).unwrap();
        assert_eq!(s.handoff.delivery_breaker_after, 0);
        let s =
            Settings::load(None, &env(&[("CALLGATE_JOURNAL_PREALLOCATE_MB", "0"), ("CALLGATE_COMMIT_LINGER_US", "0")]))
                .unwrap();
        assert_eq!(s.journal.preallocate_bytes, 0);
        assert_eq!(s.commit_linger, None);
        for (name, value) in [
            ("CALLGATE_JOURNAL_PREALLOCATE_MB", "1025"),
            ("CALLGATE_COMMIT_LINGER_US", "100001"),
            ("CALLGATE_DELIVERY_BREAKER_AFTER", "1001"),
        ] {
            assert_eq!(Settings::load(None, &env(&[(name, value)])).unwrap_err().name, name);
        }
    }

    #[test]
    fn an_admin_token_from_a_secrets_file_loses_its_newline() {
        let s = Settings::load(None, &env(&[("CALLGATE_ADMIN_TOKEN", " admin-token-0123456789\n")])).unwrap();
        assert_eq!(s.admin_token.unwrap().expose(), "admin-token-0123456789");
        let s = Settings::load(None, &env(&[("CALLGATE_REPLAY_WINDOW_SECS", "600")])).unwrap();
        assert_eq!(s.replay_window, Duration::from_secs(600));
    }

    #[test]
    fn a_body_limit_is_taken_from_1024_to_a_mebibyte() {
        for bad_value in ["1023", "1048577", "18446744073709551615"] {
            let e = Settings::load(None, &env(&[("CALLGATE_BODY_LIMIT_BYTES", bad_value)])).unwrap_err();
            assert_eq!(e.name, "CALLGATE_BODY_LIMIT_BYTES", "{bad_value}");
        }
        for good in [1024, 1 << 20] {
            let s = Settings::load(None, &env(&[("CALLGATE_BODY_LIMIT_BYTES", &good.to_string())])).unwrap();
            assert_eq!(s.body_limit_bytes, good);
        }
    }

    #[test]
    fn windows_beyond_a_century_are_refused() {
        for name in ["CALLGATE_CREDENTIAL_GRACE_SECS", "CALLGATE_REPLAY_WINDOW_SECS", "CALLGATE_DELIVERY_HORIZON_SECS"]
        {
            for bad_value in ["18446744073709551615", "9223372036854775", "3153600001"] {
                assert_eq!(Settings::load(None, &env(&[(name, bad_value)])).unwrap_err().name, name, "{bad_value}");
            }
            let s = Settings::load(None, &env(&[(name, "3153600000")])).unwrap();
            let longest = s.replay_window.max(s.credential_grace).max(s.handoff.delivery_horizon);
            assert_eq!(longest.as_secs(), MAX_WINDOW_SECS);
            assert!(4_102_444_800_000_i64.checked_add(longest.as_millis() as i64).is_some());
        }
    }

    #[test]
    fn a_config_files_error_names_its_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let problem = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let e = Settings::load(Some(&path), &env(&[])).unwrap_err();
            assert_eq!(e.name, "--config");
            e.problem.strip_prefix(&format!("{}, ", path.display())).unwrap_or(&e.problem).to_owned()
        };
        assert_eq!(
            problem("# settings\nlog = \"info\"\n[handoff]\n\ndelivery_workers = \"many\"\n"),
            "line 5: handoff.delivery_workers: invalid type: string \"many\", expected usize"
        );
        assert_eq!(
            problem("log = \"info\"\ncarriers = { twilio_api_url = 5 }\n"),
            "line 2: carriers.twilio_api_url: invalid type: integer `5`, expected a string"
        );
        assert!(problem("log = \"info\"\n\n[handoff]\nworkers = 1\n")
            .starts_with("line 4: handoff.workers: unknown field `workers`"));
        assert_eq!(problem("log = \"info\"\nlisten = \"x\n"), "line 2: invalid basic string");
        // A value checked after the file and the variables are layered names both.
        let e = bad("CALLGATE_DELIVERY_WORKERS", "must be at least 1").to_string();
        assert_eq!(e, "invalid setting CALLGATE_DELIVERY_WORKERS (`handoff.delivery_workers` in a config file): must be at least 1");
    }

    /// Every variable's check, failing on a value from the file, names the file's key too: it
    /// must be the key the file spells.
    #[test]
    fn each_variable_names_its_config_file_key() {
        let vars = [
            "ADMIN_TOKEN",
            "ANSWER_DEADLINE_MS",
            "ASSISTANT_URL",
            "BODY_LIMIT_BYTES",
            "BYOK_RATE_LIMIT_PER_MINUTE",
            "CARRIER_RATE_LIMIT_PER_MINUTE",
            "COMMIT_LINGER_US",
            "CREDENTIAL_GRACE_SECS",
            "DATA_DIR",
            "DELIVERY_BREAKER_AFTER",
            "DELIVERY_HORIZON_SECS",
            "DELIVERY_TIMEOUT_MS",
            "DELIVERY_WORKERS",
            "EXOTEL_API_URL",
            "JOURNAL_PREALLOCATE_MB",
            "LISTEN",
            "LOG",
            "MASTER_KEY",
            "PLIVO_API_URL",
            "PROVIDER_TIMEOUT_MS",
            "PUBLIC_URL",
            "REPLAY_WINDOW_SECS",
            "TELNYX_API_URL",
            "TRUSTED_PROXIES",
            "TWILIO_API_URL",
            "UPSTREAM_PREVIOUS_SECRET",
            "UPSTREAM_SECRET",
            "UPSTREAM_URL",
            "VOBIZ_API_URL",
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for var in vars {
            let key = file_key(&format!("CALLGATE_{var}")).unwrap();
            // A boolean, which no setting takes: a type error if the key is known, else unknown.
            let (section, name) = key.rsplit_once('.').map_or((None, key.as_str()), |(s, n)| (Some(s), n));
            let text = match section {
                Some(s) => format!("[{s}]\n{name} = true\n"),
                None => format!("{name} = true\n"),
            };
            std::fs::write(&path, text).unwrap();
            let e = Settings::load(Some(&path), &env(&[])).unwrap_err();
            assert!(e.problem.contains(&format!("{key}: invalid type")), "{var}: {}", e.problem);
        }
    }

    #[test]
    fn config_file_is_layered_between_default_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nlog = \"debug\"\n[carriers]\ntwilio_api_url = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), &env(&[("CALLGATE_LOG", "warn")])).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.log, "warn");
        assert_eq!(s.carrier_urls.twilio, "http://127.0.0.1:1");
        std::fs::write(&path, "nonsense_key = 1\n").unwrap();
        assert_eq!(Settings::load(Some(&path), &env(&[])).unwrap_err().name, "--config");
    }
}
