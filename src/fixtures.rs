//! Signed webhook fixtures as data (`fixtures/<carrier>/<case>.json`): the fixture type, a
//! signer that builds one from a credential and a request with the carriers' own `sign_*`
//! functions, and a replayer that sends fixtures to a running callgate and compares what it
//! answers with what the fixture expects.
//!
//! A fixture pins everything its verdict depends on: the exact request bytes, the public URL
//! the server reconstructs the signed URL from, the credential (and, for Telnyx, the Ed25519
//! seed that signed it), the phone it is for, extra settings, and the clock.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::carriers::plivo::signature::{self as plivo, Method, PlivoKey};
use crate::carriers::telnyx::signature as telnyx;
use crate::carriers::twilio::signature::{self as twilio, TwilioKey};
use crate::carriers::vobiz::signature::{self as vobiz, VobizKey};
use crate::domain::{Carrier, PhoneCredential, PhoneId, E164};
use crate::net::form;
use crate::store::PhoneConfig;

pub const FORM: &str = "application/x-www-form-urlencoded";
pub const JSON: &str = "application/json";

/// The directory of official vectors, which are not replayable requests.
pub const VECTORS_DIR: &str = "vectors";

/// One recorded webhook request and what callgate must answer to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The carrier whose route the request goes to.
    pub carrier: Carrier,
    pub hook: FixtureHook,
    pub method: String,
    /// Path and query exactly as sent (the phone's id is in the path, except for Telnyx).
    pub path: String,
    pub headers: BTreeMap<String, String>,
    /// The raw body, byte for byte.
    pub body: String,
    /// The origin the carrier called (`CALLGATE_PUBLIC_URL` of the server under test).
    pub public_url: String,
    /// The phone's credential, in the shape `POST /byok` takes.
    pub credential: Value,
    /// Telnyx: hex of the Ed25519 seed that produced the signature, to re-sign it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_seed: Option<String>,
    pub phone: FixturePhone,
    /// Extra settings of the server under test (`EXOTEL_ALLOWED_IPS`, `CALLGATE_TRUSTED_PROXIES`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The server's clock, Unix seconds.
    pub now: i64,
    /// How many times the request is sent (replay cases send it twice).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub repeat: u32,
    pub expect: Expect,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FixtureHook {
    Incoming,
    Status,
    Events,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixturePhone {
    pub id: PhoneId,
    pub number: E164,
    /// Set when the phone belongs to another carrier than the route (a 404 case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<Carrier>,
    #[serde(default, skip_serializing_if = "FixturePhoneConfig::is_empty")]
    pub config: FixturePhoneConfig,
    /// A replaced credential that still verifies until `previous_valid_until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_credential: Option<Value>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<i64>,
}

impl FixturePhone {
    /// The phone's own carrier.
    pub fn carrier_or(&self, route: Carrier) -> Carrier {
        self.carrier.unwrap_or(route)
    }
}

/// The phone settings a fixture may need, in the API's `config` terms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixturePhoneConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exotel_webhook_token: Option<String>,
}

impl FixturePhoneConfig {
    pub fn is_empty(&self) -> bool {
        self == &FixturePhoneConfig::default()
    }

    /// As stored: the Exotel token only as its SHA-256.
    pub fn to_stored(&self) -> PhoneConfig {
        PhoneConfig {
            exotel_webhook_token_sha256: self
                .exotel_webhook_token
                .as_ref()
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            stream_url: self.stream_url.clone(),
            ..PhoneConfig::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status: u16,
    /// `error.code` of the response body; null for a success.
    pub error_code: Option<String>,
    /// Events the phone's organization has after every send.
    pub recorded: usize,
    /// A substring of the answer document (incoming calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_contains: Option<String>,
    /// `verified_by.credential` of the recorded event: "current" or "previous".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_by: Option<String>,
}

impl Expect {
    pub fn accepted() -> Self {
        Expect { status: 200, error_code: None, recorded: 1, answer_contains: None, verified_by: None }
    }

    pub fn rejected(status: u16, code: &str) -> Self {
        Expect { status, error_code: Some(code.to_owned()), recorded: 0, answer_contains: None, verified_by: None }
    }
}

/// Which of Vobiz's two V3 canonical strings to sign (protocols.md §2.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VobizForm {
    /// Vobiz's docs: query-less URL + "." + nonce.
    Docs,
    /// Both Vobiz SDKs: Plivo's V3 rule, parameters included.
    #[default]
    Sdk,
}

/// What `sign` needs: a credential and the request as the carrier would send it.
#[derive(Clone, Debug, Default)]
pub struct SignRequest {
    pub carrier: Option<Carrier>,
    pub credential: Value,
    pub method: String,
    /// The full public URL the carrier calls, query included.
    pub url: String,
    pub body: String,
    /// Default: form for a POST with a body (JSON for Telnyx or a body starting with `{`).
    pub content_type: Option<String>,
    /// Plivo/Vobiz; random 20 digits when absent.
    pub nonce: Option<String>,
    /// Telnyx, Unix seconds; `now` when absent.
    pub timestamp: Option<i64>,
    /// Telnyx: hex of the 32-byte Ed25519 seed whose public key is the credential's.
    pub seed: Option<String>,
    pub vobiz_form: VobizForm,
    /// The fixture's clock; the Telnyx timestamp, else the system clock, when absent.
    pub now: Option<i64>,
    /// The phone's number; read from the request (`To`, Telnyx `to`/`from`) when absent.
    pub number: Option<String>,
    /// Telnyx only (the others carry it in the URL); generated when absent.
    pub phone_id: Option<PhoneId>,
}

/// `scheme://authority` and the path with its query, split without normalizing anything.
pub fn split_origin(url: &str) -> anyhow::Result<(String, String)> {
    let scheme_end = url.find("://").ok_or_else(|| anyhow!("{url:?} is not an absolute URL"))?;
    let start = scheme_end + 3;
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let origin = &url[..end];
    let rest = &url[end..];
    if rest.contains('#') {
        bail!("a webhook URL has no fragment");
    }
    let parsed = url::Url::parse(origin).map_err(|_| anyhow!("{origin:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() || !parsed.username().is_empty() {
        bail!("the URL must be http:// or https:// with a host and no credentials");
    }
    let path = match rest {
        "" => "/".to_owned(),
        r if r.starts_with('?') => format!("/{r}"),
        r => r.to_owned(),
    };
    Ok((origin.to_owned(), path))
}

/// The hook and phone id a callgate webhook path names.
fn route_of(carrier: Carrier, path: &str) -> anyhow::Result<(FixtureHook, Option<PhoneId>)> {
    let path = path.split('?').next().unwrap_or("");
    if carrier == Carrier::Telnyx {
        return match path {
            "/webhooks/telnyx/voice" => Ok((FixtureHook::Events, None)),
            _ => bail!("Telnyx webhooks go to /webhooks/telnyx/voice"),
        };
    }
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", c, hook, id] if *c == carrier.as_str() => {
            let hook = match *hook {
                "incoming" => FixtureHook::Incoming,
                "status" => FixtureHook::Status,
                _ => bail!("the path must be /{carrier}/incoming/<phone id> or /{carrier}/status/<phone id>"),
            };
            let id = PhoneId::parse(id).map_err(|_| anyhow!("{id:?} is not a phone id (ph_…)"))?;
            Ok((hook, Some(id)))
        }
        _ => bail!("the path must be /{carrier}/incoming/<phone id> or /{carrier}/status/<phone id>"),
    }
}

fn random_nonce() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    (0..20).map(|_| char::from(b'0' + rng.gen_range(0..10u8))).collect()
}

/// The Ed25519 signing key of a hex seed.
pub fn signing_key(seed_hex: &str) -> anyhow::Result<SigningKey> {
    let seed: [u8; 32] = hex::decode(seed_hex.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("the seed must be hex of 32 bytes"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Base64 of the public key of a hex seed, as Telnyx shows it in Mission Control.
pub fn public_key_base64(seed_hex: &str) -> anyhow::Result<String> {
    Ok(B64.encode(signing_key(seed_hex)?.verifying_key().as_bytes()))
}

fn system_now() -> i64 {
    crate::clock::Clock::system().now_secs()
}

/// The number the request is for, read from where each carrier puts it.
fn number_in(carrier: Carrier, query: &str, params: &[(String, String)], body: &str) -> Option<String> {
    if carrier == Carrier::Telnyx {
        let v: Value = serde_json::from_str(body).ok()?;
        let p = &v["data"]["payload"];
        let field = if p["direction"].as_str() == Some("outgoing") { "from" } else { "to" };
        return p[field].as_str().map(str::to_owned);
    }
    let names: &[&str] = if carrier == Carrier::Exotel { &["CallTo", "To"] } else { &["To"] };
    let query_pairs: Vec<(String, String)> =
        form::pairs(query.as_bytes()).filter_map(Result::ok).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    names.iter().find_map(|name| {
        params
            .iter()
            .chain(&query_pairs)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| json[*name].as_str().map(str::to_owned))
    })
}

/// Builds a fixture whose signature headers are what the carrier would send for `req`.
/// Its expectation is an accepted, recorded webhook; edit it for other cases.
pub fn sign(req: &SignRequest) -> anyhow::Result<Fixture> {
    let carrier = req.carrier.ok_or_else(|| anyhow!("the carrier is required"))?;
    let cred = PhoneCredential::parse(carrier, &req.credential).map_err(|e| anyhow!("credential: {e}"))?;
    let method = req.method.to_ascii_uppercase();
    if method != "GET" && method != "POST" {
        bail!("carriers call webhooks with GET or POST");
    }
    if method == "GET" && !req.body.is_empty() {
        bail!("a GET carries its parameters in the URL, not in a body");
    }
    let content_type = match &req.content_type {
        Some(ct) => Some(ct.clone()),
        None if method == "GET" && carrier != Carrier::Telnyx => None,
        None if carrier == Carrier::Telnyx || req.body.trim_start().starts_with('{') => Some(JSON.to_owned()),
        None => Some(FORM.to_owned()),
    };
    let is_form = method == "POST"
        && content_type
            .as_deref()
            .is_some_and(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(FORM));
    let params: Vec<(String, String)> = if is_form {
        form::parse(req.body.as_bytes())
            .map_err(|e| anyhow!("body: {e}"))?
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    } else {
        Vec::new()
    };
    let mut url = req.url.clone();
    let mut headers = BTreeMap::new();
    if let Some(ct) = &content_type {
        headers.insert("Content-Type".to_owned(), ct.clone());
    }
    let mut env = BTreeMap::new();
    let mut config = FixturePhoneConfig::default();
    let mut signing_seed = None;
    let mut now = req.now;
    let http_method = if method == "GET" { Method::Get } else { Method::Post };
    match &cred {
        PhoneCredential::Plivo(pair) | PhoneCredential::Vobiz(pair) => {
            if method == "POST" && !is_form && !req.body.is_empty() {
                bail!("{carrier} signs form-encoded bodies only; a JSON body cannot be verified");
            }
            let nonce = req.nonce.clone().unwrap_or_else(random_nonce);
            let token = pair.auth_token.expose().as_bytes();
            let (sig_header, nonce_header, sig) = if carrier == Carrier::Plivo {
                let sig = plivo::sign_v3(&PlivoKey::new(token), http_method, &url, &params, &nonce)
                    .map_err(|e| anyhow!("URL query: {e}"))?;
                ("X-Plivo-Signature-V3", "X-Plivo-Signature-V3-Nonce", sig)
            } else {
                let key = VobizKey::new(token);
                let sig = match req.vobiz_form {
                    VobizForm::Docs => vobiz::sign_v3_docs(&key, &url, &nonce),
                    VobizForm::Sdk => vobiz::sign_v3_sdk(&key, http_method, &url, &params, &nonce)
                        .map_err(|e| anyhow!("URL query: {e}"))?,
                };
                ("X-Vobiz-Signature-V3", "X-Vobiz-Signature-V3-Nonce", sig)
            };
            headers.insert(sig_header.to_owned(), sig);
            headers.insert(nonce_header.to_owned(), nonce);
        }
        PhoneCredential::Twilio(t) => {
            let key = TwilioKey::new(t.auth_token.expose().as_bytes());
            let sig = if method == "POST" && !is_form && !req.body.is_empty() {
                // Twilio adds the body's hash to the URL and signs the URL alone.
                url = twilio::url_with_body_hash(&url, req.body.as_bytes());
                twilio::sign_url(&key, &url)
            } else if is_form {
                twilio::sign(&key, &url, &params)
            } else {
                twilio::sign_url(&key, &url)
            };
            headers.insert("X-Twilio-Signature".to_owned(), sig);
        }
        PhoneCredential::Telnyx(t) => {
            if method != "POST" {
                bail!("Telnyx webhooks are POSTs");
            }
            let seed = req.seed.as_deref().ok_or_else(|| anyhow!("Telnyx needs --seed (hex of the Ed25519 seed)"))?;
            let signer = signing_key(seed)?;
            if signer.verifying_key() != t.public_key {
                bail!("the seed's public key is not the credential's public_key");
            }
            let ts = req.timestamp.or(req.now).unwrap_or_else(system_now);
            now = now.or(Some(ts));
            let ts = ts.to_string();
            headers.insert("telnyx-signature-ed25519".to_owned(), telnyx::sign(&signer, &ts, req.body.as_bytes()));
            headers.insert("telnyx-timestamp".to_owned(), ts);
            signing_seed = Some(seed.trim().to_ascii_lowercase());
        }
        PhoneCredential::Exotel(_) => {
            // Exotel signs nothing: the fixture carries the number's URL token, if any, and
            // lets the test client's address through.
            let (_, query) = form::split_url(&url);
            config.exotel_webhook_token = form::pairs(query.unwrap_or("").as_bytes())
                .filter_map(Result::ok)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned());
            env.insert("EXOTEL_ALLOWED_IPS".to_owned(), "127.0.0.1".to_owned());
        }
    }
    let (public_url, path) = split_origin(&url)?;
    let (hook, path_phone) = route_of(carrier, &path)?;
    let phone_id = match (path_phone, &req.phone_id) {
        (Some(id), _) => id,
        (None, Some(id)) => id.clone(),
        (None, None) => PhoneId::generate(),
    };
    let (_, query) = form::split_url(&path);
    let number = match &req.number {
        Some(n) => n.clone(),
        None => number_in(carrier, query.unwrap_or(""), &params, &req.body)
            .ok_or_else(|| anyhow!("the request names no number; pass it with --number"))?,
    };
    let number = E164::normalize(&number).map_err(|e| anyhow!("number {number:?}: {e}; pass it with --number"))?;
    Ok(Fixture {
        description: None,
        carrier,
        hook,
        method,
        path,
        headers,
        body: req.body.clone(),
        public_url,
        credential: req.credential.clone(),
        signing_seed,
        phone: FixturePhone {
            id: phone_id,
            number,
            carrier: None,
            config,
            previous_credential: None,
            previous_valid_until: None,
        },
        env,
        now: now.unwrap_or_else(system_now),
        repeat: 1,
        expect: Expect::accepted(),
    })
}

fn header_key<'a>(f: &'a Fixture, name: &str) -> Option<&'a String> {
    f.headers.keys().find(|k| k.eq_ignore_ascii_case(name))
}

/// Moves a Telnyx fixture to the clock `now`, keeping its timestamp's distance from the
/// fixture's own clock (a stale case stays stale). A signature that was valid is made again
/// over the new timestamp with the fixture's seed; any other signature is kept, so a tampered
/// or wrongly keyed case stays invalid. Other carriers and fixtures without a seed come back
/// unchanged.
pub fn with_fresh_timestamp(f: &Fixture, now: i64) -> anyhow::Result<Fixture> {
    let mut out = f.clone();
    let Some(seed) = f.signing_seed.as_deref().filter(|_| f.carrier == Carrier::Telnyx) else { return Ok(out) };
    let Some(ts_key) = header_key(f, "telnyx-timestamp").cloned() else { return Ok(out) };
    let Ok(old_ts) = f.headers[&ts_key].parse::<i64>() else { return Ok(out) };
    let new_ts = (now + (old_ts - f.now)).to_string();
    out.now = now;
    out.headers.insert(ts_key, new_ts.clone());
    if let Some(sig_key) = header_key(f, "telnyx-signature-ed25519").cloned() {
        let signer = signing_key(seed)?;
        let key = telnyx::TelnyxKey::from_bytes(signer.verifying_key().as_bytes())
            .map_err(|_| anyhow!("the seed gives no valid public key"))?;
        // Checked at its own time, so only the signature decides.
        let was_valid =
            telnyx::verify(&key, Some(&f.headers[&sig_key]), Some(&old_ts.to_string()), f.body.as_bytes(), old_ts)
                .is_ok();
        if was_valid {
            out.headers.insert(sig_key, telnyx::sign(&signer, &new_ts, f.body.as_bytes()));
        }
    }
    Ok(out)
}

/// Every fixture under `dir` (recursively, sorted), named by its path without `.json`. The
/// `vectors/` directory holds official signature vectors, not requests, and is skipped.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<(String, Fixture)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Fixture)>) -> anyhow::Result<()> {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            if path.is_dir() {
                if e.file_name() != VECTORS_DIR {
                    walk(root, &path, out)?;
                }
            } else if path.extension().is_some_and(|x| x == "json") {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                let f: Fixture = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                let name = path.strip_prefix(root).unwrap_or(&path).with_extension("");
                out.push((name.to_string_lossy().replace('\\', "/"), f));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// What callgate answered to one send.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub status: u16,
    pub error_code: Option<String>,
    pub body: String,
}

/// Sends the fixture's request, byte for byte, to `target` (`http://host:port`).
pub async fn send(client: &reqwest::Client, target: &str, f: &Fixture) -> anyhow::Result<Outcome> {
    let method = reqwest::Method::from_bytes(f.method.as_bytes()).map_err(|_| anyhow!("bad method {:?}", f.method))?;
    let url = format!("{}{}", target.trim_end_matches('/'), f.path);
    let mut rb = client.request(method, url);
    for (k, v) in &f.headers {
        rb = rb.header(k.as_str(), v.as_str());
    }
    if !f.body.is_empty() || f.method != "GET" {
        rb = rb.body(f.body.clone());
    }
    let res = rb.send().await?;
    let status = res.status().as_u16();
    let body = res.text().await?;
    let error_code = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .filter(|_| status >= 400);
    Ok(Outcome { status, error_code, body })
}

fn describe(status: u16, code: Option<&str>) -> String {
    match code {
        Some(c) => format!("{status} {c}"),
        None => status.to_string(),
    }
}

/// Compares one answer with the fixture's expectation (status, error code, answer text).
pub fn check(expect: &Expect, got: &Outcome) -> Result<(), (String, String)> {
    let want = describe(expect.status, expect.error_code.as_deref());
    let have = describe(got.status, got.error_code.as_deref());
    if want != have {
        return Err((want, have));
    }
    if let Some(needle) = &expect.answer_contains {
        if !got.body.contains(needle.as_str()) {
            let shown: String = got.body.chars().take(200).collect();
            return Err((
                format!("{want} with an answer containing {needle:?}"),
                format!("{have} answering {shown:?}"),
            ));
        }
    }
    Ok(())
}

/// One fixture's result.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub name: String,
    pub passed: bool,
    pub expected: String,
    pub got: String,
    /// Nothing answered at the target's address (the replay stops there).
    pub unreachable: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed {
            write!(f, "PASS {}", self.name)
        } else {
            write!(f, "FAIL {} expected {} got {}", self.name, self.expected, self.got)
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayOptions {
    /// Re-sign Telnyx fixtures that carry their seed with timestamps around `now`.
    pub fresh_timestamps: bool,
    /// Unix seconds; the system clock when absent.
    pub now: Option<i64>,
}

/// Sends every fixture (each `repeat` times) to `target` and checks each answer. Only what
/// the carrier sees is checked: the number of recorded events needs the organization's key.
pub async fn replay(fixtures: &[(String, Fixture)], target: &str, opts: ReplayOptions) -> Vec<Verdict> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("an HTTP client with rustls builds");
    let mut out = Vec::with_capacity(fixtures.len());
    for (name, f) in fixtures {
        let v = replay_one(&client, target, name, f, opts).await;
        // Nothing listens there: every other fixture would fail the same way.
        let unreachable = v.unreachable;
        out.push(v);
        if unreachable {
            break;
        }
    }
    out
}

async fn replay_one(client: &reqwest::Client, target: &str, name: &str, f: &Fixture, opts: ReplayOptions) -> Verdict {
    let expected = describe(f.expect.status, f.expect.error_code.as_deref());
    let verdict = |passed: bool, expected: String, got: String| Verdict {
        name: name.to_owned(),
        passed,
        expected,
        got,
        unreachable: false,
    };
    let f = if opts.fresh_timestamps {
        match with_fresh_timestamp(f, opts.now.unwrap_or_else(system_now)) {
            Ok(f) => f,
            Err(e) => return verdict(false, expected, format!("no request: {e}")),
        }
    } else {
        f.clone()
    };
    for i in 0..f.repeat.max(1) {
        let outcome = match send(client, target, &f).await {
            Ok(o) => o,
            Err(e) => {
                let unreachable = e.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect);
                return Verdict { unreachable, ..verdict(false, expected, format!("no answer: {e:#}")) };
            }
        };
        if let Err((want, have)) = check(&f.expect, &outcome) {
            let have = if f.repeat > 1 { format!("{have} (send {} of {})", i + 1, f.repeat) } else { have };
            return verdict(false, want, have);
        }
    }
    verdict(true, expected.clone(), expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PLIVO_PHONE: &str = "ph_0190a000000070008000000000000001";

    fn plivo_request() -> SignRequest {
        SignRequest {
            carrier: Some(Carrier::Plivo),
            credential: json!({"auth_id": "MAPLIVOFIXTURE000001", "auth_token": "MAtestAuthToken0123456789abcdefXYZ"}),
            method: "POST".into(),
            url: format!("https://gw.example.com/plivo/status/{PLIVO_PHONE}"),
            body: "CallUUID=x&From=14155550100&To=918035551234&CallStatus=completed".into(),
            nonce: Some("05429567804466091622".into()),
            now: Some(1_714_557_600),
            ..SignRequest::default()
        }
    }

    #[test]
    fn signs_plivo_with_the_carrier_function() {
        let f = sign(&plivo_request()).unwrap();
        assert_eq!(f.public_url, "https://gw.example.com");
        assert_eq!(f.path, format!("/plivo/status/{PLIVO_PHONE}"));
        assert_eq!(f.hook, FixtureHook::Status);
        assert_eq!(f.phone.number.as_str(), "+918035551234");
        assert_eq!(f.headers["Content-Type"], FORM);
        let params = [("CallUUID", "x"), ("From", "14155550100"), ("To", "918035551234"), ("CallStatus", "completed")];
        let key = PlivoKey::new(b"MAtestAuthToken0123456789abcdefXYZ");
        let url = format!("https://gw.example.com/plivo/status/{PLIVO_PHONE}");
        assert!(plivo::verify_v3(
            &key,
            Method::Post,
            &url,
            &params,
            "05429567804466091622",
            &f.headers["X-Plivo-Signature-V3"]
        ));
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<Fixture>(&text).unwrap(), f);
    }

    #[test]
    fn refuses_what_no_carrier_sends() {
        let mut r = plivo_request();
        r.body = "{\"a\":1}".into();
        assert!(sign(&r).is_err());
        let mut r = plivo_request();
        r.url = "https://gw.example.com/plivo/answer".into();
        assert!(sign(&r).is_err());
        let mut r = plivo_request();
        r.method = "PUT".into();
        assert!(sign(&r).is_err());
    }

    #[test]
    fn twilio_json_gets_the_body_hash_in_its_url() {
        let body = r#"{"CallSid":"CA1","To":"+14155550199"}"#;
        let f = sign(&SignRequest {
            carrier: Some(Carrier::Twilio),
            credential: json!({"account_sid": "AC00000000000000000000000000000001", "auth_token": "tok"}),
            method: "POST".into(),
            url: "https://gw.example.com/twilio/status/ph_0190c000000070008000000000000003".into(),
            body: body.into(),
            now: Some(1),
            ..SignRequest::default()
        })
        .unwrap();
        assert_eq!(f.headers["Content-Type"], JSON);
        assert!(f.path.ends_with(&format!("?bodySHA256={}", twilio::body_sha256_hex(body.as_bytes()))));
        let url = format!("{}{}", f.public_url, f.path);
        assert!(twilio::verify_raw_body(
            &TwilioKey::new(b"tok"),
            &url,
            body.as_bytes(),
            &f.headers["X-Twilio-Signature"]
        ));
    }

    #[test]
    fn fresh_timestamps_keep_staleness_and_invalidity() {
        let seed = "42".repeat(32);
        let body = r#"{"data":{"id":"e1","payload":{"to":"+13125550199"}}}"#;
        let req = SignRequest {
            carrier: Some(Carrier::Telnyx),
            credential: json!({"api_key": "KEY", "public_key": public_key_base64(&seed).unwrap()}),
            method: "POST".into(),
            url: "https://gw.example.com/webhooks/telnyx/voice".into(),
            body: body.into(),
            seed: Some(seed.clone()),
            timestamp: Some(1_000_301),
            now: Some(1_000_000),
            ..SignRequest::default()
        };
        let f = sign(&req).unwrap();
        let key = telnyx::TelnyxKey::from_base64(&public_key_base64(&seed).unwrap()).unwrap();
        let fresh = with_fresh_timestamp(&f, 2_000_000).unwrap();
        assert_eq!(fresh.now, 2_000_000);
        assert_eq!(fresh.headers["telnyx-timestamp"], "2000301");
        let sig = fresh.headers["telnyx-signature-ed25519"].as_str();
        assert!(telnyx::verify(&key, Some(sig), Some("2000301"), body.as_bytes(), 2_000_301).is_ok());
        // A tampered body keeps its now-invalid signature.
        let mut tampered = f.clone();
        tampered.body = body.replace("e1", "e2");
        let fresh = with_fresh_timestamp(&tampered, 2_000_000).unwrap();
        assert_eq!(fresh.headers["telnyx-signature-ed25519"], f.headers["telnyx-signature-ed25519"]);
    }

    #[test]
    fn splits_origins_without_normalizing() {
        assert_eq!(
            split_origin("https://gw.example.com:443/a/%2e?x=1+2").unwrap(),
            ("https://gw.example.com:443".to_owned(), "/a/%2e?x=1+2".to_owned())
        );
        assert!(split_origin("gw.example.com/a").is_err());
        assert!(split_origin("https://u:p@gw.example.com/a").is_err());
    }
}
