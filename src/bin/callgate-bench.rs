//! callgate-bench: load generator for callgate's webhook path.
//!
//! `provision` fills a stopped server's data dir with an organization, one sealed credential
//! per carrier and N numbers per carrier; `run` fires pre-signed, unique carrier callbacks at a
//! running server over keep-alive HTTP/1.1 connections (closed loop) and prints one JSON line;
//! `baseline` is a bare actix-web server that reads the body and answers 200, the reference
//! point the gateway's figures are compared with. `bench/run.sh` drives all three.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use callgate::carriers::plivo::signature::{self as plivo, Method, PlivoKey};
use callgate::carriers::telnyx::signature as telnyx;
use callgate::carriers::twilio::signature::{self as twilio, TwilioKey};
use callgate::carriers::vobiz::signature::{self as vobiz, VobizKey};
use callgate::clock::{rfc3339, Clock};
use callgate::domain::{Carrier, PhoneId, E164};
use callgate::settings::Settings;
use callgate::store::{AuditRecord, Conflict, PhoneConfig, PhoneRecord};
use callgate::vault::Vault;

const PROVISION_FILE: &str = "bench-provision.json";
const MAX_NUMBERS: usize = 10_000;
const MAX_CONNECTIONS: usize = 1024;
const MAX_POOL: usize = 2_000_000;
const MAX_SECONDS: u64 = 3600;
/// Telnyx timestamps are signed before the clock starts and must stay inside the ±300 s window.
const TELNYX_MAX_SECONDS: u64 = 280;

const ABOUT: &str = "Load generator for callgate's carrier webhook path";
const LONG_ABOUT: &str = "\
Load generator for callgate's carrier webhook path.

  provision  With the server stopped, opens its data dir the way the server does, creates an
             organization, seals one credential per carrier (Plivo, Vobiz, Twilio, Exotel,
             Telnyx; the Telnyx Ed25519 key pair is generated here) and imports N numbers per
             carrier (billing \"byok\"; Plivo/Vobiz/Twilio/Exotel numbers get a stream_url so
             incoming calls are answered with a stream; Exotel numbers get no token). Writes
             DIR/bench-provision.json (mode 0600: it holds the credentials).

  run        Pre-generates unique, correctly signed requests for a scenario (unique Plivo/Vobiz
             nonces, Twilio idempotency tokens and CallSids, Telnyx event ids with a fresh
             telnyx-timestamp, Telnyx events in legs of call.initiated, call.answered and
             call.hangup, Exotel CallSids; 500-800-byte bodies shaped like the carriers'
             callbacks), opens C keep-alive HTTP/1.1 connections, then fires closed loop for
             WARMUP + DURATION seconds and prints one JSON line: scenario, connections,
             duration, requests, requests_per_sec, latency_ms {p50,p90,p99,max} (responses
             completed inside the measured window), status counts, errors, and the generator's
             own CPU time over the measured window, client_cpu_ms and client_cpu_share (of the
             window's wall time; left out where /proc cannot tell). The requests are signed for
             the provision file's public URL, so the server must run with CALLGATE_PUBLIC_URL
             set to it (and EXOTEL_ALLOWED_IPS=127.0.0.1 for Exotel).
             Only loopback targets are accepted. A run ends early, with \"exhausted\": true,
             if the pool of unique requests (--requests) runs out. An answer-URL request
             answered 200 without call instructions counts as an error (no_answer). A Telnyx
             run must end within 280 s of its signing, counting the time the pool takes.

  baseline   A bare actix-web 4 server that reads the body and answers 200: the reference
             point (use `run --scenario bare` against it).

Scenarios: plivo-status, plivo-incoming, vobiz-status, twilio-status, telnyx-event,
exotel-status, mix (all of the above in turn), bare (plain POST with a body, any server).

Example:
  callgate-bench provision --data-dir /tmp/cg --public-url https://gw.bench.example --numbers 50
  CALLGATE_DATA_DIR=/tmp/cg CALLGATE_PUBLIC_URL=https://gw.bench.example \\
    CALLGATE_LISTEN=127.0.0.1:18080 EXOTEL_ALLOWED_IPS=127.0.0.1 callgate serve &
  callgate-bench run --target http://127.0.0.1:18080 --provision /tmp/cg/bench-provision.json \\
    --scenario plivo-status --connections 64 --duration 10 --warmup 2
";

#[derive(Parser, Debug)]
#[command(name = "callgate-bench", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fill a stopped server's data dir with an org, credentials and numbers.
    Provision {
        /// The server's data dir (CALLGATE_DATA_DIR); the server must be stopped.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The public URL the server will run with (CALLGATE_PUBLIC_URL); requests are signed for it.
        #[arg(long, value_name = "URL")]
        public_url: String,
        /// Phone numbers per carrier.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=MAX_NUMBERS as u64))]
        numbers: u64,
    },
    /// Fire signed webhooks at a running server and print one JSON line of results.
    Run(RunArgs),
    /// Serve a bare actix-web app that reads the body and answers 200.
    Baseline {
        /// Loopback address to listen on.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Base URL of the server: http://127.0.0.1:PORT (loopback only).
    #[arg(long, value_name = "URL")]
    target: String,
    /// The file `provision` wrote (not needed for `bare`).
    #[arg(long, value_name = "FILE")]
    provision: Option<PathBuf>,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS as u64))]
    connections: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    duration: u64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    warmup: u64,
    /// Unique requests generated before the clock starts (the run's request cap).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=MAX_POOL as u64))]
    requests: u64,
    /// Per-request timeout, milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
    /// Runtime threads for the client (1 fits a generator pinned to one core).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    PlivoStatus,
    PlivoIncoming,
    VobizStatus,
    TwilioStatus,
    TelnyxEvent,
    ExotelStatus,
    Mix,
    Bare,
}

impl Scenario {
    fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
    }

    /// The single-carrier scenarios `mix` cycles through.
    const MIXED: [Scenario; 6] = [
        Scenario::PlivoStatus,
        Scenario::TwilioStatus,
        Scenario::TelnyxEvent,
        Scenario::ExotelStatus,
        Scenario::PlivoIncoming,
        Scenario::VobizStatus,
    ];

    fn uses_telnyx(self) -> bool {
        matches!(self, Scenario::TelnyxEvent | Scenario::Mix)
    }
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Provision { data_dir, public_url, numbers } => provision(&data_dir, &public_url, numbers as usize),
        Command::Run(args) => run(args),
        Command::Baseline { listen } => baseline(listen),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("callgate-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// provision

/// What `provision` leaves for `run`: where to send, what to sign with, which numbers exist.
#[derive(Serialize, Deserialize)]
struct Provision {
    public_url: String,
    org_id: String,
    org_api_key: String,
    created_at: String,
    plivo: Account,
    vobiz: Account,
    twilio: Account,
    exotel: Account,
    telnyx: Account,
}

#[derive(Serialize, Deserialize)]
struct Account {
    secret_id: String,
    /// The credential exactly as sealed by the vault.
    credential: Value,
    /// Telnyx only: the Ed25519 seed whose public key is in `credential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signing_seed_hex: Option<String>,
    phones: Vec<BenchPhone>,
}

#[derive(Clone, Serialize, Deserialize)]
struct BenchPhone {
    id: String,
    number: String,
    /// Telnyx only: the application its events carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    connection_id: Option<String>,
}

impl Account {
    fn text(&self, field: &str) -> anyhow::Result<&str> {
        self.credential[field].as_str().with_context(|| format!("provision file: credential.{field} missing"))
    }
}

fn random_text(len: usize) -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::thread_rng().fill(raw.as_mut_slice());
    hex::encode(raw)
}

/// Per-carrier number plan: a prefix and how many digits follow it (room for MAX_NUMBERS).
fn number_for(carrier: Carrier, i: usize) -> anyhow::Result<E164> {
    let s = match carrier {
        Carrier::Plivo => format!("+1415201{i:04}"),
        Carrier::Vobiz => format!("+9180350{i:05}"),
        Carrier::Twilio => format!("+1628202{i:04}"),
        Carrier::Exotel => format!("+9180470{i:05}"),
        Carrier::Telnyx => format!("+1312203{i:04}"),
    };
    E164::parse(&s).with_context(|| format!("number plan produced {s}"))
}

fn credential_for(carrier: Carrier) -> (Value, Option<String>) {
    match carrier {
        Carrier::Plivo => {
            (json!({"auth_id": format!("MA{}", random_text(18).to_uppercase()), "auth_token": random_text(40)}), None)
        }
        Carrier::Vobiz => {
            (json!({"auth_id": format!("MA_{}", random_text(10).to_uppercase()), "auth_token": random_text(40)}), None)
        }
        Carrier::Twilio => {
            (json!({"account_sid": format!("AC{}", random_hex(16)), "auth_token": random_hex(16)}), None)
        }
        Carrier::Exotel => (
            json!({
                "api_key": random_text(32),
                "api_token": random_text(40),
                "account_sid": "benchacme1",
                "subdomain": "api.in.exotel.com",
            }),
            None,
        ),
        Carrier::Telnyx => {
            let seed: [u8; 32] = rand::thread_rng().gen();
            let public = SigningKey::from_bytes(&seed).verifying_key();
            (
                json!({"api_key": format!("KEY{}", random_text(40)), "public_key": B64.encode(public.as_bytes())}),
                Some(hex::encode(seed)),
            )
        }
    }
}

fn provision(data_dir: &Path, public_url: &str, numbers: usize) -> anyhow::Result<()> {
    let mut env: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    env.insert("CALLGATE_DATA_DIR".into(), data_dir.display().to_string());
    env.insert("CALLGATE_PUBLIC_URL".into(), public_url.to_owned());
    // The server must open the secrets sealed here, so it gets the same master key source.
    if let Ok(k) = std::env::var("CALLGATE_MASTER_KEY") {
        env.insert("CALLGATE_MASTER_KEY".into(), k);
    }
    let settings = Settings::load(None, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (store, keyring) =
        callgate::startup::open_data(&settings).context("opening the data dir (is the server stopped?)")?;
    let vault = Vault::new(keyring);
    let now = Clock::system().now_ms();
    let org = callgate::orgs::create(store.as_ref(), "callgate-bench".into(), now)?;

    let mut accounts = BTreeMap::new();
    for carrier in [Carrier::Plivo, Carrier::Vobiz, Carrier::Twilio, Carrier::Exotel, Carrier::Telnyx] {
        let (credential, seed) = credential_for(carrier);
        let new = callgate::vault::validate(carrier.as_str(), &credential)
            .map_err(|e| anyhow::anyhow!("{carrier} credential refused: {}", e.message))?;
        let rec = vault.seal(&org.org.id, &new, Some("callgate-bench".into()), now);
        let audit = AuditRecord {
            org_id: org.org.id.clone(),
            key_id: None,
            action: "set".into(),
            provider: carrier.as_str().into(),
            at_ms: now,
        };
        if store.byok_put(&rec, &audit, now, &[])?.is_err() {
            bail!(
                "{} already has numbers on a saved {carrier} credential: provision a fresh data dir",
                data_dir.display()
            );
        }
        let mut phones = Vec::with_capacity(numbers);
        for i in 0..numbers {
            let phone = phone_record(&org.org.id, carrier, &rec.id, number_for(carrier, i)?, i, now);
            match store.phone_insert(&phone, None)? {
                Ok(()) => {}
                Err(Conflict::NumberTaken | Conflict::InUse(_)) => {
                    bail!("{} is already in {}: provision a fresh data dir", phone.number, data_dir.display())
                }
                Err(Conflict::CredentialChanged) => bail!("the credential just saved for {carrier} is gone"),
            }
            phones.push(BenchPhone {
                id: phone.id.to_string(),
                number: phone.number.to_string(),
                connection_id: phone.connection_id.clone(),
            });
        }
        accounts.insert(carrier, Account { secret_id: rec.id.to_string(), credential, signing_seed_hex: seed, phones });
    }
    store.flush()?;

    let mut take = |c: Carrier| accounts.remove(&c).expect("every carrier was provisioned");
    let out = Provision {
        public_url: settings.public_url.clone(),
        org_id: org.org.id.to_string(),
        org_api_key: org.api_key,
        created_at: rfc3339(now),
        plivo: take(Carrier::Plivo),
        vobiz: take(Carrier::Vobiz),
        twilio: take(Carrier::Twilio),
        exotel: take(Carrier::Exotel),
        telnyx: take(Carrier::Telnyx),
    };
    let path = data_dir.join(PROVISION_FILE);
    write_private(&path, &serde_json::to_vec_pretty(&out)?)?;
    eprintln!(
        "callgate-bench: provisioned org {} with {numbers} number(s) per carrier; wrote {}",
        out.org_id,
        path.display()
    );
    Ok(())
}

fn phone_record(
    org: &callgate::domain::OrgId,
    carrier: Carrier,
    credential: &callgate::domain::SecretId,
    number: E164,
    i: usize,
    now: i64,
) -> PhoneRecord {
    let id = PhoneId::generate();
    let stream_url = (carrier != Carrier::Telnyx).then(|| format!("wss://stream.bench.example/media?phone={id}"));
    PhoneRecord {
        provider_number_id: match carrier {
            Carrier::Twilio => format!("PN{}", random_hex(16)),
            _ => number.digits().to_owned(),
        },
        friendly_name: Some(format!("bench {carrier} {i}")),
        label: Some("callgate-bench".into()),
        config: PhoneConfig { stream_url, ..PhoneConfig::default() },
        credential: credential.clone(),
        previous_credential: None,
        billing_status: "byok".into(),
        monthly_cost_cents: 0,
        provider_configuration: None,
        connection_id: (carrier == Carrier::Telnyx).then(|| format!("{}", 1_494_404_757_140_276_705u64 + i as u64)),
        created_at_ms: now,
        updated_at_ms: now,
        id,
        org_id: org.clone(),
        provider: carrier,
        number,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// request generation

/// Everything needed to sign a callback, prepared once.
struct Signer<'a> {
    p: &'a Provision,
    host: String,
    plivo: PlivoKey,
    vobiz: VobizKey,
    twilio: TwilioKey,
    telnyx: SigningKey,
    /// Makes Plivo/Vobiz nonces of this run distinct from earlier runs on the same server.
    salt: u64,
    telnyx_ts: String,
}

impl<'a> Signer<'a> {
    fn new(p: &'a Provision, host: String) -> anyhow::Result<Self> {
        let seed = p.telnyx.signing_seed_hex.as_deref().context("provision file: telnyx.signing_seed_hex missing")?;
        let seed: [u8; 32] =
            hex::decode(seed)?.try_into().map_err(|_| anyhow::anyhow!("telnyx seed is not 32 bytes"))?;
        Ok(Self {
            host,
            plivo: PlivoKey::new(p.plivo.text("auth_token")?.as_bytes()),
            vobiz: VobizKey::new(p.vobiz.text("auth_token")?.as_bytes()),
            twilio: TwilioKey::new(p.twilio.text("auth_token")?.as_bytes()),
            telnyx: SigningKey::from_bytes(&seed),
            salt: rand::thread_rng().gen_range(0..100_000_000_000),
            telnyx_ts: Clock::system().now_secs().to_string(),
            p,
        })
    }

    fn request(&self, scenario: Scenario, i: usize) -> anyhow::Result<Vec<u8>> {
        match scenario {
            Scenario::PlivoStatus => self.plivo_family(Carrier::Plivo, false, i),
            Scenario::PlivoIncoming => self.plivo_family(Carrier::Plivo, true, i),
            Scenario::VobizStatus => self.plivo_family(Carrier::Vobiz, false, i),
            Scenario::TwilioStatus => self.twilio_status(i),
            Scenario::TelnyxEvent => self.telnyx_event(i),
            Scenario::ExotelStatus => self.exotel_status(i),
            Scenario::Mix => self.request(Scenario::MIXED[i % Scenario::MIXED.len()], i / Scenario::MIXED.len()),
            Scenario::Bare => Ok(bare_request(&self.host, i)),
        }
    }

    /// Unique within the run across scenarios too: `mix` gives the status and the incoming
    /// scenario the same index, and a nonce seen twice is a replay (answered, not recorded).
    fn nonce(&self, incoming: bool, i: usize) -> String {
        format!("{:010}{}{:09}", self.salt % 10_000_000_000, u8::from(incoming), i)
    }

    /// Plivo's hangup callback or answer-URL request (Vobiz sends the same fields).
    fn plivo_family(&self, carrier: Carrier, incoming: bool, i: usize) -> anyhow::Result<Vec<u8>> {
        let account = if carrier == Carrier::Vobiz { &self.p.vobiz } else { &self.p.plivo };
        let phone = pick(&account.phones, i)?;
        let hook = if incoming { "incoming" } else { "status" };
        let path = format!("/{carrier}/{hook}/{}", phone.id);
        let url = format!("{}{path}", self.p.public_url);
        let call = uuid4();
        let caller = caller_number(i);
        let to = phone.number.trim_start_matches('+');
        let parent = account.text("auth_id")?;
        let mut params: Vec<(&str, String)> = vec![
            ("ALegRequestUUID", call.clone()),
            ("ALegUUID", call.clone()),
            ("BillRate", "0.0085".into()),
            ("CallUUID", call.clone()),
            ("CallerName", format!("+{caller}")),
            ("Direction", "inbound".into()),
            ("From", caller.clone()),
            ("ParentAuthID", parent.into()),
            ("RequestUUID", call.clone()),
            ("STIRAttestation", "Not Applicable".into()),
            ("STIRVerification", "Not Applicable".into()),
            ("SessionStart", "2024-05-01 10:00:00.238707".into()),
            ("SIP-H-To", format!("<sip:{to}@52.9.11.55;transport=udp>;tag=1")),
            ("To", to.into()),
        ];
        if incoming {
            params.push(("CallStatus", "ringing".into()));
            params.push(("Event", "StartApp".into()));
            params.push(("SIP-H-X-Tenant", "acme-production-eu-west".into()));
            params.push(("SIP-H-X-Queue", "inbound support tier 1".into()));
        } else {
            params.extend([
                ("AnswerTime", "2024-05-01 10:00:02".to_owned()),
                ("BillDuration", "60".into()),
                ("CallStatus", "completed".into()),
                ("Duration", format!("{}", 30 + i % 600)),
                ("EndTime", "2024-05-01 10:00:39".into()),
                ("Event", "Hangup".into()),
                ("HangupCause", "NORMAL_CLEARING".into()),
                ("HangupCauseCode", "4000".into()),
                ("HangupCauseName", "Normal Hangup".into()),
                ("HangupSource", "Caller".into()),
                ("StartTime", "2024-05-01 10:00:00".into()),
                ("TotalCost", "0.00850".into()),
            ]);
        }
        let nonce = self.nonce(incoming, i);
        let (sig_header, ma_header, nonce_header, sig) = match carrier {
            Carrier::Vobiz => (
                "X-Vobiz-Signature-V3",
                "X-Vobiz-Signature-MA-V3",
                "X-Vobiz-Signature-V3-Nonce",
                vobiz::sign_v3_sdk(&self.vobiz, Method::Post, &url, &params, &nonce)?,
            ),
            _ => (
                "X-Plivo-Signature-V3",
                "X-Plivo-Signature-Ma-V3",
                "X-Plivo-Signature-V3-Nonce",
                plivo::sign_v3(&self.plivo, Method::Post, &url, &params, &nonce)?,
            ),
        };
        let body = form_body(&params);
        let headers = [
            ("User-Agent", "PlivoHTTP/1.0"),
            ("Content-Type", "application/x-www-form-urlencoded"),
            (sig_header, sig.as_str()),
            (ma_header, sig.as_str()),
            (nonce_header, nonce.as_str()),
        ];
        Ok(http_post(&self.host, &path, &headers, body.as_bytes()))
    }

    /// Twilio's status callback (completed call) with its idempotency token.
    fn twilio_status(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        let phone = pick(&self.p.twilio.phones, i)?;
        let path = format!("/twilio/status/{}", phone.id);
        let url = format!("{}{path}", self.p.public_url);
        let caller = format!("+{}", caller_number(i));
        let params: Vec<(&str, String)> = vec![
            ("AccountSid", self.p.twilio.text("account_sid")?.into()),
            ("ApiVersion", "2010-04-01".into()),
            ("CallDuration", format!("{}", 30 + i % 600)),
            ("CallSid", format!("CA{}", uuid4().replace('-', ""))),
            ("CallStatus", "completed".into()),
            ("CallbackSource", "call-progress-events".into()),
            ("Called", phone.number.clone()),
            ("CalledCity", "SAN FRANCISCO".into()),
            ("CalledCountry", "US".into()),
            ("CalledState", "CA".into()),
            ("CalledZip", "94105".into()),
            ("Caller", caller.clone()),
            ("CallerCity", "OAKLAND".into()),
            ("CallerCountry", "US".into()),
            ("CallerState", "CA".into()),
            ("CallerZip", "94612".into()),
            ("Direction", "inbound".into()),
            ("Duration", "1".into()),
            ("From", caller),
            ("FromCity", "OAKLAND".into()),
            ("FromCountry", "US".into()),
            ("FromState", "CA".into()),
            ("FromZip", "94612".into()),
            ("SequenceNumber", "0".into()),
            ("SipResponseCode", "200".into()),
            ("Timestamp", "Wed, 01 May 2024 10:00:39 +0000".into()),
            ("To", phone.number.clone()),
            ("ToCity", "SAN FRANCISCO".into()),
            ("ToCountry", "US".into()),
            ("ToState", "CA".into()),
            ("ToZip", "94105".into()),
        ];
        let sig = twilio::sign(&self.twilio, &url, &params);
        let token = uuid4();
        let body = form_body(&params);
        let headers = [
            ("User-Agent", "TwilioProxy/1.1"),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-Twilio-Signature", sig.as_str()),
            ("I-Twilio-Idempotency-Token", token.as_str()),
            ("X-Home-Region", "us1"),
        ];
        Ok(http_post(&self.host, &path, &headers, body.as_bytes()))
    }

    /// A Call Control event for one of the Telnyx numbers, as a call's leg sends them: every
    /// three make one incoming leg, `call.initiated` (which says its direction), then
    /// `call.answered` and `call.hangup` (which do not), with one `call_control_id`.
    fn telnyx_event(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        let leg = i / 3;
        let phone = pick(&self.p.telnyx.phones, leg)?;
        let event_type = ["call.initiated", "call.answered", "call.hangup"][i % 3];
        let mut payload = json!({
            "call_control_id": format!("v3:{:011}-{leg:010}-{}", self.salt, "x".repeat(30)),
            "call_leg_id": uuid4(),
            "call_session_id": uuid4(),
            "caller_id_name": "Jane Doe",
            "client_state": null,
            "connection_id": phone.connection_id.as_deref().unwrap_or("1494404757140276705"),
            "from": format!("+{}", caller_number(leg)),
            "to": phone.number,
            "start_time": "2024-05-01T10:00:00.000000Z",
            "state": if event_type == "call.hangup" { "hangup" } else { "parked" },
        });
        if event_type == "call.initiated" {
            payload["direction"] = json!("incoming");
        }
        if event_type == "call.hangup" {
            payload["hangup_cause"] = json!("normal_clearing");
            payload["hangup_source"] = json!("caller");
            payload["sip_hangup_cause"] = json!("200");
            payload["end_time"] = json!("2024-05-01T10:00:39.000000Z");
        }
        let body = serde_json::to_vec(&json!({
            "data": {
                "event_type": event_type,
                "id": uuid4(),
                "occurred_at": "2024-05-01T10:00:00.000000Z",
                "payload": payload,
                "record_type": "event",
            },
            "meta": {"attempt": 1, "delivered_to": format!("{}/webhooks/telnyx/voice", self.p.public_url)},
        }))?;
        let sig = telnyx::sign(&self.telnyx, &self.telnyx_ts, &body);
        let headers = [
            ("User-Agent", "telnyx-webhooks"),
            ("Content-Type", "application/json"),
            ("telnyx-signature-ed25519", sig.as_str()),
            ("telnyx-timestamp", self.telnyx_ts.as_str()),
        ];
        Ok(http_post(&self.host, "/webhooks/telnyx/voice", &headers, &body))
    }

    /// Exotel's StatusCallback (POST form) with the Passthru fields older accounts also send.
    fn exotel_status(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        let phone = pick(&self.p.exotel.phones, i)?;
        let path = format!("/exotel/status/{}", phone.id);
        let sid = uuid4().replace('-', "");
        let caller = format!("0{}", &caller_number(i)[2..]);
        let to = format!("0{}", &phone.number[3..]);
        let params: Vec<(&str, String)> = vec![
            ("CallSid", sid.clone()),
            ("CallFrom", caller.clone()),
            ("CallTo", to.clone()),
            ("CallStatus", "completed".into()),
            ("Status", "completed".into()),
            ("Direction", "incoming".into()),
            ("Created", "Wed, 01 May 2024 15:30:00".into()),
            ("DialCallDuration", format!("{}", 30 + i % 600)),
            ("ConversationDuration", format!("{}", 28 + i % 600)),
            ("StartTime", "2024-05-01 15:30:00".into()),
            ("EndTime", "2024-05-01 15:30:39".into()),
            ("CurrentTime", "2024-05-01 15:30:40".into()),
            ("CallType", "completed".into()),
            ("DialWhomNumber", "09876543210".into()),
            ("From", caller),
            ("To", to),
            ("DateUpdated", "2024-05-01 15:30:40".into()),
            ("RecordingUrl", format!("https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/benchacme1/{sid}.mp3")),
            ("CustomField", "tenant=acme;queue=support".into()),
        ];
        let body = form_body(&params);
        let headers = [("User-Agent", "Exotel/1.0"), ("Content-Type", "application/x-www-form-urlencoded")];
        Ok(http_post(&self.host, &path, &headers, body.as_bytes()))
    }
}

fn pick(phones: &[BenchPhone], i: usize) -> anyhow::Result<&BenchPhone> {
    if phones.is_empty() {
        bail!("provision file lists no phone numbers");
    }
    Ok(&phones[i % phones.len()])
}

/// A US caller, digits only (Plivo's form), varied per request.
fn caller_number(i: usize) -> String {
    format!("1415{:07}", 5_550_000 + i % 10_000)
}

fn uuid4() -> String {
    uuid::Builder::from_random_bytes(rand::thread_rng().gen()).into_uuid().to_string()
}

fn form_body(params: &[(&str, String)]) -> String {
    form_urlencoded::Serializer::new(String::with_capacity(1024)).extend_pairs(params).finish()
}

fn http_post(host: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// A plain form POST of about 650 bytes, for servers that check nothing.
fn bare_request(host: &str, i: usize) -> Vec<u8> {
    let mut body = format!("CallUUID={i:08}&From=14155550100&To=918035551234&Padding=");
    while body.len() < 650 {
        body.push_str("x%20");
    }
    http_post(host, "/bare", &[("Content-Type", "application/x-www-form-urlencoded")], body.as_bytes())
}

/// Generates `count` requests on every available core (the server is idle meanwhile).
fn generate(signer: &Signer<'_>, scenario: Scenario, count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(count);
    let per = count.div_ceil(threads);
    let chunks: Vec<anyhow::Result<Vec<Vec<u8>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let range = (t * per)..((t + 1) * per).min(count);
                    range.map(|i| signer.request(scenario, i)).collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("generator panicked")))).collect()
    });
    let mut pool = Vec::with_capacity(count);
    for c in chunks {
        pool.extend(c?);
    }
    Ok(pool)
}

// ---------------------------------------------------------------------------------------------
// run

/// Resolves `--target` and refuses anything that is not this machine.
fn loopback_target(target: &str) -> anyhow::Result<(SocketAddr, String)> {
    let u = url::Url::parse(target).with_context(|| format!("--target {target:?} is not a URL"))?;
    if u.scheme() != "http" {
        bail!("--target must be http:// (the generator speaks plain HTTP/1.1)");
    }
    let ip: IpAddr = match u.host() {
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(url::Host::Ipv4(ip)) if ip.is_loopback() => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) if ip.is_loopback() => IpAddr::V6(ip),
        _ => bail!("--target must be a loopback address (127.0.0.0/8, ::1 or localhost)"),
    };
    let port = u.port_or_known_default().unwrap_or(80);
    let addr = SocketAddr::new(ip, port);
    Ok((addr, addr.to_string()))
}

#[derive(Default)]
struct Stats {
    /// Responses completed inside the measured window.
    requests: u64,
    /// Every response, warm-up included (what the server did while the scenario ran).
    completed: u64,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    hist: Option<Histogram<u64>>,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        Ok(Self { hist: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?), ..Self::default() })
    }

    fn merge(&mut self, other: Stats) -> anyhow::Result<()> {
        self.requests += other.requests;
        self.completed += other.completed;
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if let (Some(a), Some(b)) = (self.hist.as_mut(), other.hist.as_ref()) {
            a.add(b)?;
        }
        Ok(())
    }
}

struct Shared {
    pool: Vec<Vec<u8>>,
    /// `bare` reuses its few requests; the carrier scenarios never send one twice.
    cyclic: bool,
    next: AtomicUsize,
    addr: SocketAddr,
    timeout: Duration,
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let (addr, host) = loopback_target(&args.target)?;
    if args.scenario.uses_telnyx() && args.warmup + args.duration > TELNYX_MAX_SECONDS {
        bail!(
            "{}: warmup + duration must stay under {TELNYX_MAX_SECONDS} s (Telnyx timestamps are signed \
             before the run and expire after 300 s)",
            args.scenario.name()
        );
    }
    let gen_started = Instant::now();
    let (pool, cyclic) = if args.scenario == Scenario::Bare {
        ((0..256).map(|i| bare_request(&host, i)).collect(), true)
    } else {
        let path = args.provision.as_deref().context("--provision FILE is required for carrier scenarios")?;
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let p: Provision = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let signer = Signer::new(&p, host.clone())?;
        (generate(&signer, args.scenario, args.requests as usize)?, false)
    };
    let generated_in = gen_started.elapsed();
    // Telnyx timestamps were signed before the pool was made: the run must end inside their
    // window counting the time that took, or its last requests would be refused as stale.
    if args.scenario.uses_telnyx() && generated_in.as_secs() + args.warmup + args.duration > TELNYX_MAX_SECONDS {
        bail!(
            "{}: making the pool took {:.0} s, and with warmup + duration that passes {TELNYX_MAX_SECONDS} s \
             (Telnyx timestamps are signed before the pool is made and expire after 300 s): lower --requests \
             or --duration",
            args.scenario.name(),
            generated_in.as_secs_f64()
        );
    }
    let body_sizes = pool.iter().map(|r| body_len(r)).fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    let pool_len = pool.len();
    let shared = Arc::new(Shared {
        pool,
        cyclic,
        next: AtomicUsize::new(0),
        addr,
        timeout: Duration::from_millis(args.timeout_ms),
    });

    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads as usize).enable_all().build()?
    };
    let (stats, exhausted_at, cpu) =
        rt.block_on(fire(Arc::clone(&shared), args.connections as usize, args.warmup, args.duration))?;

    // A run that ran out of unique requests measured only until then.
    let measured = match exhausted_at {
        Some(t) => t.as_secs_f64().max(0.001),
        None => args.duration as f64,
    };
    let hist = stats.hist.as_ref().context("histogram")?;
    let ms = |v: u64| v as f64 / 1000.0;
    let q = |x: f64| ms(hist.value_at_quantile(x));
    let mut out = json!({
        "scenario": args.scenario.name(),
        "target": args.target,
        "connections": args.connections,
        "duration": args.duration,
        "warmup": args.warmup,
        "measured_secs": (measured * 1000.0).round() / 1000.0,
        "requests": stats.requests,
        "completed_total": stats.completed,
        "requests_per_sec": (stats.requests as f64 / measured * 10.0).round() / 10.0,
        "latency_ms": {
            "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": ms(hist.max()),
            "mean": hist.mean().round() / 1000.0,
        },
        "status": stats.status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "errors": stats.errors.values().sum::<u64>(),
        "error_kinds": stats.errors,
        "pool": pool_len,
        "exhausted": exhausted_at.is_some(),
        "body_bytes": {"min": body_sizes.0, "max": body_sizes.1},
        "generated_secs": (generated_in.as_secs_f64() * 100.0).round() / 100.0,
    });
    // Unknown is left out rather than reported as 0, which would read as an idle generator.
    if let Some(c) = cpu.filter(|c| !c.wall.is_zero()) {
        out["client_cpu_ms"] = json!((c.cpu.as_secs_f64() * 10_000.0).round() / 10.0);
        out["client_cpu_share"] = json!((c.cpu.as_secs_f64() / c.wall.as_secs_f64() * 1000.0).round() / 1000.0);
    }
    println!("{out}");
    if exhausted_at.is_some() {
        eprintln!("callgate-bench: the pool of {pool_len} unique requests ran out; raise --requests");
    }
    Ok(())
}

fn body_len(req: &[u8]) -> usize {
    find(req, b"\r\n\r\n").map_or(0, |i| req.len() - i - 4)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Opens every connection, then drives them closed loop. Returns the merged stats, how far into
/// the measured window the pool ran out if it did, and the generator's own CPU time over that
/// window if it can be read.
async fn fire(
    shared: Arc<Shared>,
    connections: usize,
    warmup: u64,
    duration: u64,
) -> anyhow::Result<(Stats, Option<Duration>, Option<CpuUse>)> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect(shared.addr).await.with_context(|| format!("connecting to {}", shared.addr))?);
    }
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs(warmup);
    let end = measure_from + Duration::from_secs(duration);
    // Spawned before the connections' tasks, so that with no warm-up it reads as they start.
    let cpu_start = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        CpuReading::now()
    });
    let tasks: Vec<_> =
        streams.into_iter().map(|s| tokio::spawn(connection_loop(Arc::clone(&shared), s, measure_from, end))).collect();
    let mut stats = Stats::new()?;
    let mut exhausted: Option<Instant> = None;
    for t in tasks {
        let (s, ran_out) = t.await??;
        stats.merge(s)?;
        if let Some(at) = ran_out {
            // The window closes when the last connection has had its last answer.
            exhausted = Some(exhausted.map_or(at, |e| e.max(at)));
        }
    }
    let exhausted_at = exhausted.map(|at| at.saturating_duration_since(measure_from));
    // The window's CPU ends with the last connection's last answer: at the window's end, or where
    // the pool ran out. A pool that ran out in the warm-up left no window to read.
    let cpu = if Instant::now() >= measure_from {
        cpu_start.await?.and_then(CpuReading::since)
    } else {
        cpu_start.abort();
        None
    };
    Ok((stats, exhausted_at, cpu))
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One connection's closed loop: send, wait for the whole response, repeat until `end`.
async fn connection_loop(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<(Stats, Option<Instant>)> {
    let mut stats = Stats::new()?;
    let mut buf = Vec::with_capacity(8192);
    let mut broken = false;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok((stats, None));
        }
        if broken {
            match connect(shared.addr).await {
                // `broken` is set again by the exchange that follows.
                Ok(s) => stream = s,
                Err(_) => {
                    *stats.errors.entry("connect").or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let idx = shared.next.fetch_add(1, Ordering::Relaxed);
        let req = if shared.cyclic {
            &shared.pool[idx % shared.pool.len()]
        } else if let Some(r) = shared.pool.get(idx) {
            r
        } else {
            return Ok((stats, Some(now.max(measure_from))));
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(shared.timeout, exchange(&mut stream, req, &mut buf)).await;
        let done = Instant::now();
        // Errors are counted over the same window as answers.
        let counted = started >= measure_from && done <= end;
        match outcome {
            Ok(Ok((status, keep_alive))) => {
                stats.completed += 1;
                if counted {
                    stats.requests += 1;
                    *stats.status.entry(status).or_default() += 1;
                    if let Some(h) = stats.hist.as_mut() {
                        h.saturating_record(done.duration_since(started).as_micros().max(1) as u64);
                    }
                    // An answer-URL request is answered with call instructions: a 200 without
                    // them is no answer.
                    if status == 200 && asks_answer(req) && find(&buf, b"<Response>").is_none() {
                        *stats.errors.entry("no_answer").or_default() += 1;
                    }
                }
                broken = !keep_alive;
            }
            Ok(Err(e)) => {
                if counted {
                    *stats.errors.entry(e.kind()).or_default() += 1;
                }
                broken = true;
            }
            Err(_) => {
                if counted {
                    *stats.errors.entry("timeout").or_default() += 1;
                }
                broken = true;
            }
        }
    }
}

/// Whether the request is to an answer URL (its request line names `/incoming/`).
fn asks_answer(req: &[u8]) -> bool {
    let line = find(req, b"\r\n").map_or(req, |end| &req[..end]);
    find(line, b"/incoming/").is_some()
}

#[derive(Debug)]
enum ExchangeError {
    Io,
    Closed,
    Protocol,
}

impl ExchangeError {
    fn kind(&self) -> &'static str {
        match self {
            ExchangeError::Io => "io",
            ExchangeError::Closed => "closed",
            ExchangeError::Protocol => "protocol",
        }
    }
}

/// Writes one pre-serialized request and reads one response: headers up to CRLFCRLF, then
/// `Content-Length` bytes of body. Returns the status and whether the connection stays open.
async fn exchange(stream: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<(u16, bool), ExchangeError> {
    let mut written = 0;
    while written < req.len() {
        match stream.try_write(&req[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stream.writable().await.map_err(|_| ExchangeError::Io)?;
            }
            Err(_) => return Err(ExchangeError::Io),
        }
    }
    buf.clear();
    let mut chunk = [0u8; 8192];
    let mut head: Option<Head> = None;
    loop {
        if let Some(h) = &head {
            if buf.len() >= h.len + h.body {
                return if buf.len() == h.len + h.body {
                    Ok((h.status, h.keep_alive))
                } else {
                    Err(ExchangeError::Protocol)
                };
            }
        }
        stream.readable().await.map_err(|_| ExchangeError::Io)?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(ExchangeError::Closed),
            Ok(n) => {
                let from = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                if head.is_none() {
                    if let Some(i) = find(&buf[from..], b"\r\n\r\n") {
                        head = Some(parse_head(&buf[..from + i + 4])?);
                    } else if buf.len() > 64 * 1024 {
                        return Err(ExchangeError::Protocol);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ExchangeError::Io),
        }
    }
}

struct Head {
    status: u16,
    /// Header block length including the blank line.
    len: usize,
    body: usize,
    keep_alive: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, ExchangeError> {
    let text = std::str::from_utf8(head).map_err(|_| ExchangeError::Protocol)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or(ExchangeError::Protocol)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(ExchangeError::Protocol);
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or(ExchangeError::Protocol)?;
    let mut body = None;
    let mut keep_alive = version == "HTTP/1.1";
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            body = Some(v.parse::<usize>().map_err(|_| ExchangeError::Protocol)?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            // Never sent for callgate's sized bodies; not worth a chunk decoder here.
            return Err(ExchangeError::Protocol);
        } else if k.eq_ignore_ascii_case("connection") {
            keep_alive = !v.eq_ignore_ascii_case("close");
        }
    }
    let body = match (body, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Err(ExchangeError::Protocol),
    };
    Ok(Head { status, len: head.len(), body, keep_alive })
}

// ---------------------------------------------------------------------------------------------
// the generator's own CPU time
//
// The generator has a core of its own; if it is busy all the time on it, the rate a run reports
// is the generator's, not the server's. Read from /proc, as the crate makes no libc calls.

/// Where the CPU time was read from. Both ends of a window are read from the same one: they
/// count at different resolutions and from different sets of threads.
#[derive(Clone, Copy, Debug)]
enum CpuSource {
    /// `/proc/self/task/*/schedstat`: nanoseconds on a CPU, thread by thread.
    Schedstat,
    /// `/proc/self/stat`: user and system clock ticks of the whole process.
    Stat,
}

/// The CPU time the whole process, all threads, user and system, had used at one moment.
#[derive(Clone, Copy, Debug)]
struct CpuReading {
    source: CpuSource,
    cpu: Duration,
    at: Instant,
}

/// CPU time used over a window, and the window's wall time.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    cpu: Duration,
    wall: Duration,
}

impl CpuReading {
    /// Schedstat where the kernel keeps it (nanoseconds), else stat (10 ms ticks), else none.
    fn now() -> Option<Self> {
        [CpuSource::Schedstat, CpuSource::Stat].into_iter().find_map(Self::read)
    }

    fn read(source: CpuSource) -> Option<Self> {
        let cpu = match source {
            CpuSource::Schedstat => schedstat_cpu()?,
            CpuSource::Stat => stat_cpu()?,
        };
        Some(Self { source, cpu, at: Instant::now() })
    }

    /// The CPU used from this reading until now, read the same way.
    fn since(self) -> Option<CpuUse> {
        let end = Self::read(self.source)?;
        Some(CpuUse { cpu: end.cpu.saturating_sub(self.cpu), wall: end.at.saturating_duration_since(self.at) })
    }
}

/// The sum of every live thread's time on a CPU. A thread that ends takes its count with it, so
/// a window counts only the threads alive at its end; that loses nothing here, as the threads
/// that fire (the main thread with one runtime thread, the runtime's workers otherwise) start
/// before the window and outlive it, and firing starts no others (no blocking pool: no file or
/// DNS work).
fn schedstat_cpu() -> Option<Duration> {
    let mut total = 0u64;
    let mut read_any = false;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        // A thread that ended since the listing has no file left.
        let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else { continue };
        total += parse_schedstat(&text)?;
        read_any = true;
    }
    read_any.then(|| Duration::from_nanos(total))
}

/// The kernel reports stat's times in USER_HZ ticks, 100 a second on the architectures this
/// runs on; sysconf(_SC_CLK_TCK) would confirm it, but is a libc call.
const USER_HZ: u64 = 100;

/// The whole process's user and system time, ended threads included, to a tick.
fn stat_cpu() -> Option<Duration> {
    let ticks = parse_stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// The first field of a schedstat line: nanoseconds the thread has run on a CPU.
fn parse_schedstat(line: &str) -> Option<u64> {
    line.split_ascii_whitespace().next()?.parse().ok()
}

/// utime + stime, fields 14 and 15 of a `/proc/PID/stat` line. Field 2, the command name in
/// parentheses, may itself hold spaces and parentheses, so fields are counted from the last ')':
/// the first after it is field 3.
fn parse_stat_ticks(line: &str) -> Option<u64> {
    let mut fields = line[line.rfind(')')? + 1..].split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

// ---------------------------------------------------------------------------------------------
// baseline

fn baseline(listen: SocketAddr) -> anyhow::Result<()> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    if !listen.ip().is_loopback() {
        bail!("--listen must be a loopback address");
    }
    eprintln!("callgate-bench: baseline listening on {listen}");
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(|| {
            App::new().default_service(web::to(|body: web::Bytes| async move {
                std::hint::black_box(body.len());
                HttpResponse::Ok().finish()
            }))
        })
        .bind(listen)?
        .run()
        .await
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_the_time_on_cpu() {
        assert_eq!(parse_schedstat("558412671 757312 84\n"), Some(558_412_671));
        assert_eq!(parse_schedstat("0 0 1"), Some(0));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("n/a 0 1"), None);
    }

    #[test]
    fn stat_counts_fields_from_the_last_parenthesis() {
        // utime 53 and stime 2 are fields 14 and 15; the name's own ") S 1 2 3" must not shift them.
        let line = "1234 (my (weird) ) S 1 2 3 name) S 11204 11204 10594 0 -1 4194304 100 0 0 0 53 2 0 0 20 0 1 0 \
                    724978 3133440 405 18446744073709551615 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat_ticks(line), Some(55));
        assert_eq!(parse_stat_ticks("1234 (my (weird) name) S 1 1 1 0 -1 0 0 0 0 0 7 5"), Some(12));
        // Cut short before stime, or no name at all: unreadable, not zero.
        assert_eq!(parse_stat_ticks("1234 (cat) R 1 1 1 0 -1 0 0 0 0 0 7"), None);
        assert_eq!(parse_stat_ticks("1234 cat R 1 1 1 0 -1 0 0 0 0 0 7 5"), None);
    }

    #[test]
    fn the_process_cpu_time_can_be_read_and_grows() {
        let start = CpuReading::now().expect("/proc/self is readable on Linux");
        let mut x = 0u64;
        while start.at.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = start.since().expect("the same source reads again");
        assert!(used.cpu > Duration::ZERO, "{used:?}");
        assert!(used.wall >= Duration::from_millis(50), "{used:?}");
        // The fallback, for kernels without schedstat.
        assert!(CpuReading::read(CpuSource::Stat).is_some());
    }
}
