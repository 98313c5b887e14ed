//! Starts the real server on 127.0.0.1:0 with a temporary data dir, the way the binary does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use callgate::clock::Clock;
use callgate::settings::Settings;
use callgate::startup::Application;
use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The server closes a keep-alive connection after 5 s idle. A pooled connection reused at
/// that instant fails with `IncompleteMessage`, so test clients let go of idle connections
/// well before.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(2))
}

static TRACING: Once = Once::new();

/// Logs only with TEST_LOG set, so a failing test can be re-run with them.
fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            callgate::telemetry::init("debug");
        }
    });
}

pub struct TestApp {
    pub base: String,
    pub port: u16,
    pub client: reqwest::Client,
    pub clock: Clock,
    pub data_dir: PathBuf,
    pub env: HashMap<String, String>,
    pub state: actix_web::web::Data<callgate::state::AppState>,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

pub struct Options {
    pub env: Vec<(String, String)>,
    pub clock: Clock,
}

impl Default for Options {
    fn default() -> Self {
        Options { env: Vec::new(), clock: Clock::system() }
    }
}

impl Options {
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_owned(), v.into()));
        self
    }

    pub fn clock(mut self, c: Clock) -> Self {
        self.clock = c;
        self
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Options::default()).await
}

pub async fn spawn_with(opts: Options) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    let mut app = start(&path, opts.env, opts.clock).await;
    app._dir = Some(dir);
    app
}

/// A server on an existing data dir (kept by the caller).
pub async fn spawn_on(data_dir: &Path) -> TestApp {
    start(data_dir, Vec::new(), Clock::system()).await
}

/// As `spawn_on`, with the settings another TestApp ran with.
pub async fn spawn_on_with(data_dir: &Path, env: HashMap<String, String>) -> TestApp {
    let env = env.into_iter().filter(|(k, _)| k != "CALLGATE_DATA_DIR").collect();
    start(data_dir, env, Clock::system()).await
}

async fn start(data_dir: &Path, extra: Vec<(String, String)>, clock: Clock) -> TestApp {
    init_tracing();
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("CALLGATE_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("CALLGATE_DATA_DIR".into(), data_dir.display().to_string());
    env.insert("CALLGATE_ADMIN_TOKEN".into(), ADMIN_TOKEN.into());
    env.insert("CALLGATE_PUBLIC_URL".into(), "https://gw.example.com".into());
    // Small prepared segments: a hundred test servers need not zero-fill 64 MiB each. The
    // binary-server tests (crash, CLI) keep the default.
    env.insert("CALLGATE_JOURNAL_PREALLOCATE_MB".into(), "1".into());
    // Nothing in a test may reach a real carrier.
    for k in ["PLIVO", "VOBIZ", "TWILIO", "TELNYX", "EXOTEL"] {
        env.insert(format!("CALLGATE_{k}_API_URL"), "http://127.0.0.1:9".into());
    }
    for (k, v) in extra {
        env.insert(k, v);
    }
    let settings = Settings::load(None, &env).expect("test settings");
    // A stopped server releases its database lock asynchronously; retry briefly.
    let mut last_err = None;
    for _ in 0..100 {
        match Application::build_with_clock(settings.clone(), clock.clone()).await {
            Ok(app) => {
                let port = app.port();
                let state = app.state();
                let handle = app.handle();
                let task = tokio::spawn(app.run_until_stopped());
                return TestApp {
                    base: format!("http://127.0.0.1:{port}"),
                    port,
                    client: client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
                    clock,
                    data_dir: data_dir.to_owned(),
                    env,
                    state,
                    handle,
                    task,
                    _dir: None,
                };
            }
            Err(e) => {
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("server did not start: {:?}", last_err);
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops the server gracefully and starts a new one on the same data dir and settings.
    pub async fn restart(mut self) -> TestApp {
        let dir = self._dir.take();
        let env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| k.as_str() != "CALLGATE_DATA_DIR")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let data_dir = self.data_dir.clone();
        let clock = self.clock.clone();
        self.stop().await;
        let mut app = start(&data_dir, env, clock).await;
        app._dir = dir;
        app
    }

    /// Stops the server; the temporary data dir (if this app owns one) is handed back so the
    /// caller decides when it goes.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        self.handle.stop(true).await;
        drop(self.state);
        let _ = self.task.await;
        // Tasks that outlive the server (a delivery, an answer) hold the store until they end:
        // until then the database is still locked, and a command run on it now would be told
        // a server is running.
        let db = self.data_dir.join("db").join("db");
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while let Ok(f) = std::fs::File::open(&db) {
            if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok()
                || std::time::Instant::now() > until
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self._dir.take()
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client.post(self.url(path)).bearer_auth(ADMIN_TOKEN).json(&body).send().await.unwrap()
    }

    /// A new organization and its API key.
    pub async fn create_org(&self, name: &str) -> Org {
        let res = self.admin_post("/admin/orgs", json!({"name": name})).await;
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        Org { id: v["org_id"].as_str().unwrap().to_owned(), key: v["api_key"].as_str().unwrap().to_owned() }
    }

    pub fn get(&self, org: &Org, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(&org.key)
    }

    pub fn post(&self, org: &Org, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&org.key)
    }

    pub fn patch(&self, org: &Org, path: &str) -> reqwest::RequestBuilder {
        self.client.patch(self.url(path)).bearer_auth(&org.key)
    }

    pub fn delete(&self, org: &Org, path: &str) -> reqwest::RequestBuilder {
        self.client.delete(self.url(path)).bearer_auth(&org.key)
    }

    /// Every file under the data dir, for scanning for plaintext secrets.
    pub fn data_files(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(p).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out)
                } else {
                    out.push(p)
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data_dir, &mut out);
        out
    }

    /// Asserts that no file under the data dir holds `needle`.
    pub fn assert_not_in_data_dir(&self, needle: &str) {
        let files = self.data_files();
        assert!(!files.is_empty());
        for f in files {
            // The journal's spare segment is renamed into place while the server runs.
            let bytes = match std::fs::read(&f) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", f.display()),
            };
            assert!(
                memchr::memmem::find(&bytes, needle.as_bytes()).is_none(),
                "{} holds a secret in plaintext",
                f.display()
            );
        }
    }
}

#[derive(Clone, Debug)]
pub struct Org {
    pub id: String,
    pub key: String,
}

/// Reads a JSON error body and returns its code.
pub async fn error_code(res: reqwest::Response) -> String {
    let v: Value = res.json().await.expect("JSON error body");
    v["error"]["code"].as_str().expect("error.code").to_owned()
}

/// The value of one series in a `/metrics` text: its name, with its labels in braces if it has
/// any (`callgate_outbox_queued`, `callgate_webhooks_accepted_total{carrier="plivo"}`).
pub fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in metrics"))
        .parse()
        .unwrap()
}

/// The real binary, for tests that kill it or read its logs. Killed (SIGKILL) on drop.
pub struct BinaryServer {
    pub child: std::process::Child,
    pub base: String,
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BinaryServer {
    /// `callgate serve` on `data_dir` and a free port, stderr to `log` (or discarded); waits for
    /// `/ready`.
    pub async fn start(data_dir: &Path, env: &[(&str, String)], log: Option<&Path>) -> BinaryServer {
        Self::start_limited(data_dir, env, log, None).await
    }

    /// As `start`, after the shell's `ulimit` commands in `ulimits` (e.g. `ulimit -Sn 100`).
    /// The server keeps the shell's pid.
    pub async fn start_limited(
        data_dir: &Path,
        env: &[(&str, String)],
        log: Option<&Path>,
        ulimits: Option<&str>,
    ) -> BinaryServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = env!("CARGO_BIN_EXE_callgate");
        let mut cmd = match ulimits {
            None => std::process::Command::new(bin),
            Some(u) => {
                let mut sh = std::process::Command::new("sh");
                sh.arg("-c").arg(format!("{u} && exec \"$0\" \"$1\"")).arg(bin);
                sh
            }
        };
        cmd.arg("serve")
            .env("CALLGATE_DATA_DIR", data_dir)
            .env("CALLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("CALLGATE_PUBLIC_URL", "https://gw.example.com")
            .env("CALLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CALLGATE_LOG", "warn")
            .env_remove("CALLGATE_MASTER_KEY")
            .stdout(std::process::Stdio::null())
            .stderr(match log {
                Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
                None => std::process::Stdio::null(),
            });
        for (k, v) in env {
            cmd.env(k, v);
        }
        let server =
            BinaryServer { child: cmd.spawn().expect("spawn callgate"), base: format!("http://127.0.0.1:{port}") };
        for _ in 0..400 {
            if reqwest::get(server.url("/ready")).await.is_ok_and(|r| r.status() == 200) {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        drop(server);
        panic!("callgate did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGTERM: a graceful stop.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }
}

/// Puts a phone number straight into the store, its credential sealed as an import would seal
/// it: for tests that need a number without going through a fake carrier.
#[allow(clippy::too_many_arguments)]
pub fn insert_phone(
    store: &dyn callgate::store::Store,
    vault: &callgate::vault::Vault,
    org: &str,
    carrier: callgate::domain::Carrier,
    number: &str,
    credential: &Value,
    config: callgate::store::PhoneConfig,
    now: i64,
) -> callgate::store::PhoneRecord {
    let org_id = callgate::domain::OrgId::parse(org).unwrap();
    let new = callgate::vault::validate(carrier.as_str(), credential)
        .unwrap_or_else(|e| panic!("{carrier} credential: {}", e.message));
    let rec = vault.seal(&org_id, &new, None, now);
    let phone = callgate::store::PhoneRecord {
        id: callgate::domain::PhoneId::generate(),
        org_id,
        provider: carrier,
        number: callgate::domain::E164::parse(number).unwrap(),
        provider_number_id: number.trim_start_matches('+').to_owned(),
        friendly_name: None,
        label: None,
        config,
        credential: rec.id.clone(),
        previous_credential: None,
        billing_status: "byok".into(),
        monthly_cost_cents: 0,
        provider_configuration: None,
        connection_id: None,
        created_at_ms: now,
        updated_at_ms: now,
    };
    store.phone_insert(&phone, Some(&rec)).unwrap().unwrap();
    phone
}
