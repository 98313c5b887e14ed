//! The hand-off: the assistant decides how an incoming call is answered (within the deadline,
//! with a fallback otherwise), and every recorded event is delivered upstream, signed, in order
//! per call, retried with backoff until the horizon, and kept across a crash.
//!
//! The assistant and the upstream are fakes on 127.0.0.1:0 that record every request; the
//! numbers are written straight into the store with known credentials, and the webhooks are
//! signed the way each carrier signs them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::SigningKey;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use callgate::carriers::plivo::signature::{self as plivo_sig, Method, PlivoKey};
use callgate::carriers::telnyx::signature as telnyx_sig;
use callgate::carriers::twilio::signature::{self as twilio_sig, TwilioKey};
use callgate::carriers::vobiz::signature::{self as vobiz_sig, VobizKey};
use callgate::clock::{rfc3339, Clock};
use callgate::domain::{Carrier, Secret};
use callgate::handoff::signing::Signer;
use callgate::store::{PhoneConfig, Store};

use crate::fake_carrier::{FakeCarrier, Mode};
use crate::helpers::*;

/// 2024-05-01T10:00:00Z: the pinned clock of the delivery tests.
const T0: i64 = 1_714_557_600_000;
const DEADLINE_MS: u64 = 700;
/// What the answer may take beyond the deadline: recording (with its fsync) and rendering, on
/// a machine that may be busy compiling.
const MARGIN_MS: u64 = 900;
const APOLOGY: &str = "Sorry, we cannot take your call right now. Please try again later. Goodbye.";
const UPSTREAM_SECRET_RAW: [u8; 32] = [0x42; 32];
const PREVIOUS_SECRET_RAW: [u8; 32] = [0x17; 32];
const TELNYX_API_KEY: &str = "KEYtelnyxHANDOFF000555";

fn whsec(raw: &[u8]) -> String {
    format!("whsec_{}", B64.encode(raw))
}

// ---------------------------------------------------------------------------------------
// A recording HTTP server with a switchable behaviour: the assistant and the upstream.

#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_else(|| panic!("{} lacks {name}", self.path))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("{} has no JSON body", self.path))
    }

    fn webhook_id(&self) -> String {
        self.header("webhook-id").to_owned()
    }
}

#[derive(Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Before the status line.
    delay: Duration,
    /// Between the status line (with the first half of the body) and the rest of the body.
    body_delay: Duration,
    /// A `Retry-After` header, when set.
    retry_after: Option<&'static str>,
}

impl Reply {
    fn json(v: Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: v.to_string(),
            delay: Duration::ZERO,
            body_delay: Duration::ZERO,
            retry_after: None,
        }
    }

    fn status(status: u16) -> Reply {
        Reply { status, ..Reply::json(json!({"ok": status < 300})) }
    }

    fn delayed(self, delay: Duration) -> Reply {
        Reply { delay, ..self }
    }
}

type Behaviour = Arc<dyn Fn(&Hit) -> Reply + Send + Sync>;

struct Shared {
    hits: Mutex<Vec<Hit>>,
    behaviour: Mutex<Behaviour>,
}

struct FakeHttp {
    base: String,
    shared: web::Data<Shared>,
    handle: ServerHandle,
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

impl FakeHttp {
    async fn start(f: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> FakeHttp {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), f)
    }

    fn start_on(listener: TcpListener, f: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> FakeHttp {
        let shared = web::Data::new(Shared { hits: Mutex::new(Vec::new()), behaviour: Mutex::new(Arc::new(f)) });
        let data = shared.clone();
        let addr = listener.local_addr().unwrap();
        let server = HttpServer::new(move || App::new().app_data(data.clone()).default_service(web::to(serve)))
            .workers(1)
            .disable_signals()
            .shutdown_timeout(0)
            .listen(listener)
            .unwrap()
            .run();
        let handle = server.handle();
        tokio::spawn(server);
        FakeHttp { base: format!("http://{addr}"), shared, handle }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn set(&self, f: impl Fn(&Hit) -> Reply + Send + Sync + 'static) {
        *self.shared.behaviour.lock().unwrap() = Arc::new(f);
    }

    fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    fn hits_to(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }
}

async fn serve(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let hit = Hit {
        at: Instant::now(),
        path: req.uri().path().to_owned(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let behaviour = shared.behaviour.lock().unwrap().clone();
    let reply = behaviour(&hit);
    shared.hits.lock().unwrap().push(hit);
    tokio::time::sleep(reply.delay).await;
    let mut res = HttpResponse::build(StatusCode::from_u16(reply.status).unwrap());
    res.content_type(reply.content_type);
    if let Some(after) = reply.retry_after {
        res.insert_header(("retry-after", after));
    }
    if reply.body_delay.is_zero() {
        return res.body(reply.body);
    }
    use futures_util::StreamExt;
    let (head, tail) = reply.body.split_at(reply.body.len() / 2);
    let (head, tail, wait) = (web::Bytes::from(head.to_owned()), web::Bytes::from(tail.to_owned()), reply.body_delay);
    let first = futures_util::stream::iter([Ok::<_, std::io::Error>(head)]);
    let rest = futures_util::stream::once(async move {
        tokio::time::sleep(wait).await;
        Ok::<_, std::io::Error>(tail)
    });
    res.streaming(first.chain(rest))
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// Standard Webhooks verification, written here from the spec rather than with callgate's signer.

/// Checks that `v1,<sig>` is HMAC-SHA256 of `id.timestamp.body` under the raw secret.
fn verifies(raw_secret: &[u8], id: &str, ts: &str, body: &[u8], sig: &str) -> bool {
    let Some(b64) = sig.strip_prefix("v1,") else { return false };
    let Ok(tag) = B64.decode(b64) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(raw_secret).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// What a Standard Webhooks receiver does: any one of the space-separated signatures.
fn standard_webhooks_accepts(raw_secret: &[u8], hit: &Hit) -> bool {
    let (id, ts) = (hit.header("webhook-id"), hit.header("webhook-timestamp"));
    hit.header("webhook-signature").split(' ').any(|s| verifies(raw_secret, id, ts, hit.body.as_bytes(), s))
}

#[test]
fn the_signer_reproduces_the_standard_webhooks_test_vector() {
    let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into());
    let sig = Signer::new(&secret, None).unwrap().sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        br#"{"test": 2432232314}"#,
    );
    assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    // The verifier the other tests rely on agrees with the spec's vector, and with nothing else.
    let raw = B64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    assert!(verifies(&raw, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", br#"{"test": 2432232314}"#, &sig));
    assert!(!verifies(&raw, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265331", br#"{"test": 2432232314}"#, &sig));
    assert!(!verifies(&raw, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", br#"{"test":2432232314}"#, &sig));
}

// ---------------------------------------------------------------------------------------
// Numbers and signed webhooks.

/// A number in the store with a credential the test knows.
struct Line {
    carrier: Carrier,
    phone_id: String,
    number: String,
    token: String,
}

fn credential(carrier: Carrier, token: &str) -> Value {
    match carrier {
        Carrier::Plivo => json!({"auth_id": "MAPLIVO0000000000001", "auth_token": token}),
        Carrier::Vobiz => json!({"auth_id": "MA_VOBIZ001", "auth_token": token}),
        Carrier::Twilio => json!({"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": token}),
        Carrier::Exotel => {
            json!({"api_key": "exokey", "api_token": token, "account_sid": "acme1", "subdomain": "api.in.exotel.com"})
        }
        Carrier::Telnyx => {
            json!({"api_key": token, "public_key": B64.encode(telnyx_signing_key().verifying_key().as_bytes())})
        }
    }
}

fn telnyx_signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn config(stream_url: Option<&str>, assistant_url: Option<&str>) -> PhoneConfig {
    PhoneConfig {
        stream_url: stream_url.map(str::to_owned),
        assistant_url: assistant_url.map(str::to_owned),
        ..PhoneConfig::default()
    }
}

/// Seals the credential and inserts the number, as an import would, without a carrier.
fn provision_line(
    store: &dyn Store,
    vault: &callgate::vault::Vault,
    org: &str,
    carrier: Carrier,
    number: &str,
    config: PhoneConfig,
    now: i64,
) -> Line {
    let token = match carrier {
        Carrier::Telnyx => TELNYX_API_KEY.to_owned(),
        _ => format!("{carrier}SECRETtoken{}", &number[number.len() - 4..]),
    };
    let phone = insert_phone(store, vault, org, carrier, number, &credential(carrier, &token), config, now);
    Line { carrier, phone_id: phone.id.to_string(), number: number.to_owned(), token }
}

fn add_line(app: &TestApp, org: &Org, carrier: Carrier, number: &str, config: PhoneConfig) -> Line {
    provision_line(app.state.store.as_ref(), &app.state.vault, &org.id, carrier, number, config, app.clock.now_ms())
}

fn form_body(params: &[(&str, String)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

fn nonce() -> String {
    format!("{:020}", rand::random::<u64>())
}

const PUBLIC_URL: &str = "https://gw.example.com";

/// The carrier's answer-URL request for a new inbound call, signed as the carrier signs it.
fn incoming_request(client: &reqwest::Client, base: &str, line: &Line, call_id: &str) -> reqwest::RequestBuilder {
    request_to(client, base, line, call_id, "incoming")
}

/// The same fields sent to the number's `hook` (`incoming` or `status`), signed for it.
fn request_to(client: &reqwest::Client, base: &str, line: &Line, call_id: &str, hook: &str) -> reqwest::RequestBuilder {
    let hook = format!("/{}/{hook}/{}", line.carrier, line.phone_id);
    let signed_url = format!("{PUBLIC_URL}{hook}");
    let caller = "+14155550111".to_owned();
    match line.carrier {
        Carrier::Plivo | Carrier::Vobiz => {
            let params: Vec<(&str, String)> = vec![
                ("CallUUID", call_id.to_owned()),
                ("CallStatus", "ringing".into()),
                ("Direction", "inbound".into()),
                ("Event", "StartApp".into()),
                ("From", caller.trim_start_matches('+').to_owned()),
                ("To", line.number.trim_start_matches('+').to_owned()),
            ];
            let n = nonce();
            let (sig_header, nonce_header, sig) = if line.carrier == Carrier::Plivo {
                let key = PlivoKey::new(line.token.as_bytes());
                let sig = plivo_sig::sign_v3(&key, Method::Post, &signed_url, &params, &n).unwrap();
                ("X-Plivo-Signature-V3", "X-Plivo-Signature-V3-Nonce", sig)
            } else {
                let key = VobizKey::new(line.token.as_bytes());
                let sig = vobiz_sig::sign_v3_sdk(&key, Method::Post, &signed_url, &params, &n).unwrap();
                ("X-Vobiz-Signature-V3", "X-Vobiz-Signature-V3-Nonce", sig)
            };
            client
                .post(format!("{base}{hook}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header(sig_header, sig)
                .header(nonce_header, n)
                .body(form_body(&params))
        }
        Carrier::Twilio => {
            let params: Vec<(&str, String)> = vec![
                ("AccountSid", "AC0123456789abcdef0123456789abcdef".into()),
                ("CallSid", call_id.to_owned()),
                ("CallStatus", "ringing".into()),
                ("Direction", "inbound".into()),
                ("From", caller),
                ("To", line.number.clone()),
            ];
            let sig = twilio_sig::sign(&TwilioKey::new(line.token.as_bytes()), &signed_url, &params);
            client
                .post(format!("{base}{hook}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("X-Twilio-Signature", sig)
                .body(form_body(&params))
        }
        Carrier::Exotel => {
            let query = form_body(&[
                ("CallSid", call_id.to_owned()),
                ("CallFrom", "04155550111".into()),
                ("CallTo", line.number.clone()),
                ("Direction", "incoming".into()),
            ]);
            client.get(format!("{base}{hook}?{query}"))
        }
        Carrier::Telnyx => unreachable!("Telnyx has no answer URL"),
    }
}

/// Twilio's status callback for `call`, with a distinct status per event.
async fn twilio_status(client: &reqwest::Client, base: &str, line: &Line, call: &str, status: &str, seq: u32) -> u16 {
    let params: Vec<(&str, String)> = vec![
        ("AccountSid", "AC0123456789abcdef0123456789abcdef".into()),
        ("CallSid", call.to_owned()),
        ("CallStatus", status.to_owned()),
        ("Direction", "inbound".into()),
        ("From", "+14155550111".into()),
        ("SequenceNumber", seq.to_string()),
        ("To", line.number.clone()),
    ];
    twilio_callback(client, base, line, &params).await
}

/// A signed Twilio status callback of `params` to `line`.
async fn twilio_callback(client: &reqwest::Client, base: &str, line: &Line, params: &[(&str, String)]) -> u16 {
    let hook = format!("/twilio/status/{}", line.phone_id);
    let sig = twilio_sig::sign(&TwilioKey::new(line.token.as_bytes()), &format!("{PUBLIC_URL}{hook}"), params);
    let res = client
        .post(format!("{base}{hook}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", sig)
        .body(form_body(params))
        .send()
        .await;
    res.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// The org's events of one phone, oldest first.
async fn events_of(app: &TestApp, org: &Org, line: &Line) -> Vec<Value> {
    let v: Value =
        app.get(org, &format!("/events?phone_id={}", line.phone_id)).send().await.unwrap().json().await.unwrap();
    v["events"].as_array().unwrap().clone()
}

async fn event(app: &TestApp, org: &Org, id: &str) -> Value {
    let res = app.get(org, &format!("/events/{id}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// The `SequenceNumber` a test callback carried.
fn seq_of(ev: &Value) -> Option<u32> {
    ev["params"]["SequenceNumber"].as_str().and_then(|s| s.parse().ok())
}

/// Records a status callback and returns the new event's id.
async fn record_status(app: &TestApp, org: &Org, line: &Line, call: &str, status: &str, seq: u32) -> String {
    assert_eq!(twilio_status(&app.client, &app.base, line, call, status, seq).await, 200);
    let evs = events_of(app, org, line).await;
    let ev =
        evs.iter().rev().find(|e| e["call_id"] == call && seq_of(e) == Some(seq)).expect("the callback was recorded");
    ev["id"].as_str().unwrap().to_owned()
}

/// Polls the event until `done` holds (the outbox ticks every 250 ms).
async fn wait_event(app: &TestApp, org: &Org, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(8);
    loop {
        let ev = event(app, org, id).await;
        if done(&ev) {
            return ev;
        }
        assert!(Instant::now() < until, "{id}: still not {what}: {:#}", ev["delivery"]);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn wait_attempts(app: &TestApp, org: &Org, id: &str, n: usize) -> Value {
    let ev = wait_event(app, org, id, &format!("attempted {n} times"), |e| {
        e["delivery"]["attempts"].as_array().is_some_and(|a| a.len() >= n)
    })
    .await;
    assert_eq!(ev["delivery"]["attempts"].as_array().unwrap().len(), n, "{id}: more attempts than expected");
    ev["delivery"].clone()
}

async fn wait_state(app: &TestApp, org: &Org, id: &str, state: &str) -> Value {
    wait_event(app, org, id, state, |e| e["delivery"]["state"] == state).await["delivery"].clone()
}

async fn wait_hits(fake: &FakeHttp, what: &str, done: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
    wait_hits_within(fake, what, Duration::from_secs(8), done).await
}

/// As `wait_hits`, for a backlog delivered one at a time: each delivery's outcome is made
/// durable before the next starts, and on a loaded machine hundreds take longer than 8 s.
async fn wait_hits_within(fake: &FakeHttp, what: &str, within: Duration, done: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
    let until = Instant::now() + within;
    loop {
        let hits = fake.hits();
        if done(&hits) {
            return hits;
        }
        assert!(Instant::now() < until, "still no {what}; got {} requests", hits.len());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn ms(rfc: &str) -> i64 {
    let t = time::OffsetDateTime::parse(rfc, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| panic!("{rfc} is not RFC 3339"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Polls until exactly `n` events show `delivered` (never more).
async fn wait_delivered(app: &TestApp, org: &Org, n: usize) {
    let until = Instant::now() + Duration::from_secs(8);
    loop {
        let got = ids_with_delivery(app, org, "delivered").await.len();
        assert!(got <= n, "{got} delivered, more than {n}");
        if got == n {
            return;
        }
        assert!(Instant::now() < until, "only {got} of {n} delivered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn ids_with_delivery(app: &TestApp, org: &Org, state: &str) -> Vec<String> {
    let res = app.get(org, &format!("/events?delivery={state}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

// ---------------------------------------------------------------------------------------
// The answer path.

const AI_STREAM: &str = "wss://ai.example.com/live/abc?tenant=acme&lang=en";
const STATIC_STREAM: &str = "wss://static.example.com/media?line=7&x=y";
const MESSAGE: &str = "We are closed <today> & tomorrow.";
const TRANSFER_TO: &str = "+14155550123";

/// The assistant: what it answers depends on the path it is called on.
async fn fake_assistant() -> FakeHttp {
    FakeHttp::start(|hit| {
        let stream = Reply::json(json!({"action": "stream", "stream_url": AI_STREAM}));
        match hit.path.as_str() {
            "/stream" => stream,
            "/hangup" => Reply::json(json!({"action": "hangup", "message": MESSAGE})),
            "/hangup-bare" => Reply::json(json!({"action": "hangup"})),
            "/transfer" => Reply::json(json!({"action": "transfer", "to": TRANSFER_TO})),
            "/slow" => stream.delayed(Duration::from_secs(5)),
            "/slow-body" => Reply { body_delay: Duration::from_secs(5), ..stream },
            "/garbage" => {
                Reply { content_type: "text/html", ..Reply::json(json!(null)) }.with_body("<html>Bad Gateway</html>")
            }
            "/not-a-stream" => Reply::json(json!({"action": "stream", "stream_url": "https://ai.example.com/not-ws"})),
            "/bad-transfer" => Reply::json(json!({"action": "transfer", "to": "reception"})),
            "/error" => Reply::status(500),
            _ => Reply::status(404),
        }
    })
    .await
}

impl Reply {
    fn with_body(self, body: &str) -> Reply {
        Reply { body: body.to_owned(), ..self }
    }
}

#[derive(Clone, Debug)]
enum Expect {
    Stream(&'static str),
    Hangup(&'static str),
    /// `{"action": "hangup"}`: the carrier hears the apology.
    HangupWithoutMessage,
    Transfer(&'static str),
}

impl Expect {
    fn decision(&self) -> Value {
        match self {
            Expect::Stream(u) => json!({"action": "stream", "stream_url": u}),
            Expect::Hangup(m) => json!({"action": "hangup", "message": m}),
            Expect::HangupWithoutMessage => json!({"action": "hangup", "message": null}),
            Expect::Transfer(t) => json!({"action": "transfer", "to": t}),
        }
    }
}

/// The answer document each carrier must get, written out by hand from the carriers' docs.
fn expected_document(carrier: Carrier, expect: &Expect, phone_id: &str, event_id: &str) -> (&'static str, String) {
    if let Expect::HangupWithoutMessage = expect {
        return expected_document(carrier, &Expect::Hangup(APOLOGY), phone_id, event_id);
    }
    const XML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    match carrier {
        Carrier::Plivo | Carrier::Vobiz => {
            let inner = match expect {
                Expect::Stream(u) => format!(
                    "<Stream bidirectional=\"true\" keepCallAlive=\"true\" contentType=\"audio/x-mulaw;rate=8000\">{}</Stream>",
                    esc(u)
                ),
                Expect::Hangup(m) => format!("<Speak>{}</Speak><Hangup/>", esc(m)),
                Expect::Transfer(t) => format!("<Dial><Number>{t}</Number></Dial>"),
                Expect::HangupWithoutMessage => unreachable!("rendered as the apology"),
            };
            ("application/xml", format!("{XML}<Response>{inner}</Response>"))
        }
        Carrier::Twilio => {
            let inner = match expect {
                Expect::Stream(u) => {
                    let (base, query) = u.split_once('?').unwrap();
                    let mut params = format!(
                        "<Parameter name=\"phone_id\" value=\"{phone_id}\"/><Parameter name=\"event_id\" value=\"{event_id}\"/>"
                    );
                    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
                        params.push_str(&format!("<Parameter name=\"{k}\" value=\"{v}\"/>"));
                    }
                    format!("<Connect><Stream url=\"{base}\">{params}</Stream></Connect>")
                }
                Expect::Hangup(m) => format!("<Say>{}</Say><Hangup/>", esc(m)),
                Expect::Transfer(t) => format!("<Dial>{t}</Dial>"),
                Expect::HangupWithoutMessage => unreachable!("rendered as the apology"),
            };
            ("text/xml", format!("{XML}<Response>{inner}</Response>"))
        }
        Carrier::Exotel => {
            let v = match expect {
                Expect::Stream(u) => json!({"url": u}),
                Expect::Hangup(m) => json!({"action": "hangup", "message": m}),
                Expect::Transfer(t) => json!({"action": "transfer", "to": t}),
                Expect::HangupWithoutMessage => unreachable!("rendered as the apology"),
            };
            ("application/json", v.to_string())
        }
        Carrier::Telnyx => unreachable!(),
    }
}

struct Case {
    /// The number's own assistant URL (path on the fake, or "down"); None: the global one.
    assistant: Option<&'static str>,
    stream_url: Option<&'static str>,
    expect: Expect,
    source: &'static str,
    reason: Option<&'static str>,
    /// Whether the answer had to wait for the deadline.
    waits: bool,
}

fn cases() -> Vec<Case> {
    let case = |assistant, stream_url, expect, source, reason, waits| Case {
        assistant,
        stream_url,
        expect,
        source,
        reason,
        waits,
    };
    vec![
        // The global assistant, even though the number has its own stream.
        case(None, Some(STATIC_STREAM), Expect::Stream(AI_STREAM), "assistant", None, false),
        // The number's own assistant wins over the global one.
        case(Some("/hangup"), Some(STATIC_STREAM), Expect::Hangup(MESSAGE), "assistant", None, false),
        case(Some("/transfer"), None, Expect::Transfer(TRANSFER_TO), "assistant", None, false),
        case(Some("/hangup-bare"), Some(STATIC_STREAM), Expect::HangupWithoutMessage, "assistant", None, false),
        case(Some("/slow"), Some(STATIC_STREAM), Expect::Stream(STATIC_STREAM), "fallback", Some("timeout"), true),
        case(Some("/slow"), None, Expect::Hangup(APOLOGY), "fallback", Some("timeout"), true),
        case(Some("/slow-body"), Some(STATIC_STREAM), Expect::Stream(STATIC_STREAM), "fallback", Some("timeout"), true),
        case(
            Some("/garbage"),
            Some(STATIC_STREAM),
            Expect::Stream(STATIC_STREAM),
            "fallback",
            Some("malformed_reply"),
            false,
        ),
        case(Some("/garbage"), None, Expect::Hangup(APOLOGY), "fallback", Some("malformed_reply"), false),
        case(Some("/not-a-stream"), None, Expect::Hangup(APOLOGY), "fallback", Some("malformed_reply"), false),
        case(
            Some("/bad-transfer"),
            Some(STATIC_STREAM),
            Expect::Stream(STATIC_STREAM),
            "fallback",
            Some("malformed_reply"),
            false,
        ),
        case(Some("/error"), Some(STATIC_STREAM), Expect::Stream(STATIC_STREAM), "fallback", Some("status 500"), false),
        case(Some("down"), Some(STATIC_STREAM), Expect::Stream(STATIC_STREAM), "fallback", Some("unreachable"), false),
        case(Some("down"), None, Expect::Hangup(APOLOGY), "fallback", Some("unreachable"), false),
    ]
}

fn number_for(carrier: Carrier, i: usize) -> String {
    match carrier {
        Carrier::Plivo => format!("+1415201{i:04}"),
        Carrier::Vobiz => format!("+9180350{i:05}"),
        Carrier::Twilio => format!("+1628202{i:04}"),
        Carrier::Exotel => format!("+9180470{i:05}"),
        Carrier::Telnyx => format!("+1312203{i:04}"),
    }
}

async fn answer_env(assistant: &FakeHttp) -> Options {
    Options::default()
        .env("CALLGATE_ASSISTANT_URL", assistant.url("/stream"))
        .env("CALLGATE_ANSWER_DEADLINE_MS", DEADLINE_MS.to_string())
        .env("CALLGATE_UPSTREAM_SECRET", whsec(&UPSTREAM_SECRET_RAW))
        .env("EXOTEL_ALLOWED_IPS", "127.0.0.1")
}

async fn answers_every_case(carrier: Carrier) {
    let assistant = fake_assistant().await;
    let app = spawn_with(answer_env(&assistant).await).await;
    let org = app.create_org("Acme").await;
    let down = format!("http://127.0.0.1:{}/answer", closed_port());
    let deadline = Duration::from_millis(DEADLINE_MS);
    let margin = Duration::from_millis(MARGIN_MS);

    for (i, case) in cases().into_iter().enumerate() {
        let url = case.assistant.map(|a| if a == "down" { down.clone() } else { assistant.url(a) });
        let line = add_line(&app, &org, carrier, &number_for(carrier, i), config(case.stream_url, url.as_deref()));
        let what = format!("{carrier} case {i} ({:?}, stream_url {:?})", case.assistant, case.stream_url);
        let call_id = format!("call-{carrier}-{i}");
        let asked_before = assistant.hits().len();

        let started = Instant::now();
        let res = incoming_request(&app.client, &app.base, &line, &call_id).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(res.status(), 200, "{what}");
        let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
        let body = res.text().await.unwrap();

        assert!(took < deadline + margin, "{what}: answered after {took:?}");
        if case.waits {
            assert!(took >= deadline, "{what}: answered after {took:?}, before the deadline");
        }

        let evs = events_of(&app, &org, &line).await;
        assert_eq!(evs.len(), 1, "{what}");
        let ev = &evs[0];
        let event_id = ev["id"].as_str().unwrap();
        assert_eq!(ev["kind"], "call.incoming", "{what}");
        assert_eq!(ev["call_id"], call_id.as_str(), "{what}");

        let (want_type, want_body) = expected_document(carrier, &case.expect, &line.phone_id, event_id);
        assert!(content_type.starts_with(want_type), "{what}: content-type {content_type}");
        if carrier == Carrier::Exotel {
            let got: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(got, serde_json::from_str::<Value>(&want_body).unwrap(), "{what}");
        } else {
            assert_eq!(body, want_body, "{what}");
        }

        // The event says how the call was answered, and why.
        let answer = &event(&app, &org, event_id).await["answer"];
        assert_eq!(answer["source"], case.source, "{what}: {answer}");
        assert_eq!(answer["reason"], case.reason.map_or(Value::Null, Value::from), "{what}: {answer}");
        assert_eq!(answer["decision"], case.expect.decision(), "{what}: {answer}");

        // The assistant (when reachable) was asked exactly once, at the number's URL.
        let asked: Vec<Hit> = assistant.hits().split_off(asked_before);
        match case.assistant {
            Some("down") => assert!(asked.is_empty(), "{what}"),
            Some(path) => assert_eq!(asked.iter().map(|h| h.path.as_str()).collect::<Vec<_>>(), [path], "{what}"),
            None => assert_eq!(asked.iter().map(|h| h.path.as_str()).collect::<Vec<_>>(), ["/stream"], "{what}"),
        }
        for hit in &asked {
            assert_eq!(hit.webhook_id(), event_id, "{what}");
        }
    }
}

#[tokio::test]
async fn plivo_answers_follow_the_assistant_or_fall_back_in_time() {
    answers_every_case(Carrier::Plivo).await;
}

#[tokio::test]
async fn vobiz_answers_follow_the_assistant_or_fall_back_in_time() {
    answers_every_case(Carrier::Vobiz).await;
}

#[tokio::test]
async fn twilio_answers_follow_the_assistant_or_fall_back_in_time() {
    answers_every_case(Carrier::Twilio).await;
}

#[tokio::test]
async fn exotel_answers_follow_the_assistant_or_fall_back_in_time() {
    answers_every_case(Carrier::Exotel).await;
}

#[tokio::test]
async fn without_an_assistant_the_static_stream_or_the_apology_answers() {
    let app = spawn_with(Options::default().env("EXOTEL_ALLOWED_IPS", "127.0.0.1")).await;
    let org = app.create_org("Acme").await;
    for (i, (stream_url, expect)) in
        [(Some(STATIC_STREAM), Expect::Stream(STATIC_STREAM)), (None, Expect::Hangup(APOLOGY))].into_iter().enumerate()
    {
        let line = add_line(&app, &org, Carrier::Plivo, &number_for(Carrier::Plivo, i), config(stream_url, None));
        let res = incoming_request(&app.client, &app.base, &line, &format!("call-{i}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.text().await.unwrap();
        let ev = &events_of(&app, &org, &line).await[0];
        assert_eq!(body, expected_document(Carrier::Plivo, &expect, &line.phone_id, ev["id"].as_str().unwrap()).1);
        let answer = &event(&app, &org, ev["id"].as_str().unwrap()).await["answer"];
        assert_eq!(answer["source"], "static");
        assert_eq!(answer["reason"], Value::Null);
        assert_eq!(answer["decision"], expect.decision());
    }
}

#[tokio::test]
async fn the_assistant_request_is_a_standard_webhook() {
    let assistant = fake_assistant().await;
    let app = spawn_with(answer_env(&assistant).await).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let res = incoming_request(&app.client, &app.base, &line, "CA0001").send().await.unwrap();
    assert_eq!(res.status(), 200);

    let hits = assistant.hits_to("/stream");
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    assert!(hit.header("content-type").starts_with("application/json"));
    let ts: i64 = hit.header("webhook-timestamp").parse().unwrap();
    assert!((ts - Clock::system().now_secs()).abs() <= 5, "timestamp {ts} is not now");
    // One secret: one signature, and a Standard Webhooks verifier accepts it.
    let sig = hit.header("webhook-signature");
    assert_eq!(sig.split(' ').count(), 1, "{sig}");
    assert!(standard_webhooks_accepts(&UPSTREAM_SECRET_RAW, hit), "{sig}");
    assert!(!standard_webhooks_accepts(&PREVIOUS_SECRET_RAW, hit));
    let mut tampered = hit.clone();
    tampered.body = tampered.body.replacen("CA0001", "CA0002", 1);
    assert!(!standard_webhooks_accepts(&UPSTREAM_SECRET_RAW, &tampered));

    // The body is the normalized event, as the API shows it.
    let body = hit.json();
    assert_eq!(body["id"], hit.webhook_id());
    let mut shown = event(&app, &org, &hit.webhook_id()).await;
    let shown = shown.as_object_mut().unwrap();
    shown.remove("delivery");
    shown.remove("answer");
    assert_eq!(&body, &Value::Object(shown.clone()));
    assert_eq!(body["kind"], "call.incoming");
    assert_eq!(body["provider"], "twilio");
    assert_eq!(body["phone_id"], line.phone_id.as_str());
    assert_eq!(body["verified_by"]["scheme"], "twilio-hmac-sha1");
    assert!(body.get("received_at_ms").is_none());
}

// ---------------------------------------------------------------------------------------
// Telnyx: acknowledged at once, answered by a Call Control command.

fn telnyx_call_initiated(line: &Line, ccid: &str, event_id: &str) -> String {
    json!({
        "data": {
            "event_type": "call.initiated",
            "id": event_id,
            "occurred_at": "2024-05-01T10:00:00.000000Z",
            "payload": {
                "call_control_id": ccid,
                "call_leg_id": "428c31b6-7af4-4bcb-b7f5-5013ef9657c1",
                "call_session_id": "428c31b6-abf3-3bc1-b7f4-5013ef9657c1",
                "client_state": null,
                "connection_id": "1494404757140276705",
                "direction": "incoming",
                "from": "+13125550100",
                "to": line.number,
                "start_time": "2024-05-01T10:00:00.000000Z",
                "state": "parked",
            },
            "record_type": "event",
        },
        "meta": {"attempt": 1, "delivered_to": "https://gw.example.com/webhooks/telnyx/voice"},
    })
    .to_string()
}

async fn send_telnyx(app: &TestApp, body: String) -> (u16, Duration) {
    let started = Instant::now();
    let res = send_telnyx_signed(app, body, telnyx_signing_key()).await;
    (res.status().as_u16(), started.elapsed())
}

/// A Telnyx event signed now with `key`.
async fn send_telnyx_signed(app: &TestApp, body: String, key: SigningKey) -> reqwest::Response {
    let ts = Clock::system().now_secs().to_string();
    let sig = telnyx_sig::sign(&key, &ts, body.as_bytes());
    app.client
        .post(app.url("/webhooks/telnyx/voice"))
        .header("content-type", "application/json")
        .header("telnyx-signature-ed25519", sig)
        .header("telnyx-timestamp", ts)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn wait_commands(fake: &FakeCarrier, n: usize) -> Vec<crate::fake_carrier::Recorded> {
    let until = Instant::now() + Duration::from_secs(8);
    loop {
        let calls: Vec<_> = fake.requests().into_iter().filter(|r| r.path.starts_with("/v2/calls/")).collect();
        if calls.len() >= n {
            return calls;
        }
        assert!(Instant::now() < until, "only {} Call Control commands", calls.len());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn telnyx_is_acknowledged_at_once_and_answered_by_call_control() {
    let assistant = fake_assistant().await;
    let fake = FakeCarrier::start().await;
    fake.add_account(Carrier::Telnyx, credential(Carrier::Telnyx, TELNYX_API_KEY), ["+13122030001"]);
    let app = spawn_with(answer_env(&assistant).await.env("CALLGATE_TELNYX_API_URL", fake.base_url())).await;
    let org = app.create_org("Acme").await;
    let slow = assistant.url("/slow");
    let streamed = add_line(&app, &org, Carrier::Telnyx, "+13122030001", config(None, None));
    let fallback = add_line(&app, &org, Carrier::Telnyx, "+13122030002", config(Some(STATIC_STREAM), Some(&slow)));
    let hangup = add_line(&app, &org, Carrier::Telnyx, "+13122030003", config(None, Some(&slow)));
    let transfer =
        add_line(&app, &org, Carrier::Telnyx, "+13122030004", config(None, Some(&assistant.url("/transfer"))));

    // The assistant streams; the first command meets a 5xx and is retried with the same body.
    fake.set_mode(Mode::ServerError);
    fake.set_mode_after(1, Mode::Ok);
    let ccid = "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg";
    let (status, took) = send_telnyx(&app, telnyx_call_initiated(&streamed, ccid, "0ccc7b54-0001")).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(MARGIN_MS), "acknowledged after {took:?}");
    let calls = wait_commands(&fake, 2).await;
    let ev = &events_of(&app, &org, &streamed).await[0];
    let event_id = ev["id"].as_str().unwrap();
    assert_eq!(ev["kind"], "call.incoming");
    for cmd in &calls {
        assert_eq!(cmd.method, "POST");
        assert_eq!(cmd.path, format!("/v2/calls/{ccid}/actions/answer"));
        assert_eq!(cmd.header("authorization"), Some(format!("Bearer {TELNYX_API_KEY}").as_str()));
        assert_eq!(
            cmd.json(),
            json!({
                "stream_url": AI_STREAM,
                "stream_track": "inbound_track",
                "stream_bidirectional_mode": "rtp",
                "stream_bidirectional_codec": "PCMU",
                "command_id": event_id,
            })
        );
    }
    let answer = &event(&app, &org, event_id).await["answer"];
    assert_eq!(answer["source"], "assistant");
    // Answered once the retry succeeded: nothing more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(wait_commands(&fake, 2).await.len(), 2);

    // A slow assistant does not hold the webhook; the number's stream answers after the deadline.
    fake.clear_requests();
    let ccid = "v3:fallback-call-0002";
    let (status, took) = send_telnyx(&app, telnyx_call_initiated(&fallback, ccid, "0ccc7b54-0002")).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(DEADLINE_MS), "acknowledged after {took:?}: it waited for the assistant");
    let cmd = wait_commands(&fake, 1).await.remove(0);
    let event_id = events_of(&app, &org, &fallback).await[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(cmd.path, format!("/v2/calls/{ccid}/actions/answer"));
    assert_eq!(cmd.json()["stream_url"], STATIC_STREAM);
    assert_eq!(cmd.json()["command_id"], event_id.as_str());
    let answer = &event(&app, &org, &event_id).await["answer"];
    assert_eq!((answer["source"].as_str(), answer["reason"].as_str()), (Some("fallback"), Some("timeout")));

    // No stream at all: the call is rejected rather than left ringing.
    fake.clear_requests();
    let ccid = "v3:hangup-call-0003";
    assert_eq!(send_telnyx(&app, telnyx_call_initiated(&hangup, ccid, "0ccc7b54-0003")).await.0, 200);
    let cmd = wait_commands(&fake, 1).await.remove(0);
    let event_id = events_of(&app, &org, &hangup).await[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(cmd.path, format!("/v2/calls/{ccid}/actions/reject"));
    assert_eq!(cmd.json(), json!({"cause": "CALL_REJECTED", "command_id": event_id}));

    // A transfer.
    fake.clear_requests();
    let ccid = "v3:transfer-call-0004";
    assert_eq!(send_telnyx(&app, telnyx_call_initiated(&transfer, ccid, "0ccc7b54-0004")).await.0, 200);
    let cmd = wait_commands(&fake, 1).await.remove(0);
    let event_id = events_of(&app, &org, &transfer).await[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(cmd.path, format!("/v2/calls/{ccid}/actions/transfer"));
    assert_eq!(cmd.json(), json!({"to": TRANSFER_TO, "command_id": event_id}));
}

// ---------------------------------------------------------------------------------------
// The delivery path.

async fn upstream_app(upstream: &FakeHttp, extra: &[(&str, &str)]) -> TestApp {
    spawn_with(pinned(extra).env("CALLGATE_UPSTREAM_URL", upstream.url("/hook"))).await
}

/// An upstream that answers 503 until the flag is set, then `status`.
async fn down_until_up(status: u16) -> (FakeHttp, Arc<std::sync::atomic::AtomicBool>) {
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::clone(&up);
    let fake = FakeHttp::start(move |_| {
        Reply::status(if seen.load(std::sync::atomic::Ordering::SeqCst) { status } else { 503 })
    })
    .await;
    (fake, up)
}

/// Sets the number's own upstream (`None`: takes it away) through the API.
async fn set_upstream(app: &TestApp, org: &Org, line: &Line, url: Option<&str>) -> reqwest::Response {
    let body = json!({"config": {"upstream_url": url}});
    app.patch(org, &format!("/phone-numbers/{}", line.phone_id)).json(&body).send().await.unwrap()
}

/// The clock pinned at `T0`, deliveries signed with `UPSTREAM_SECRET_RAW`, no upstream of the
/// gateway's own, and `extra`.
fn pinned(extra: &[(&str, &str)]) -> Options {
    let mut opts =
        Options::default().clock(Clock::pinned(T0)).env("CALLGATE_UPSTREAM_SECRET", whsec(&UPSTREAM_SECRET_RAW));
    for (k, v) in extra {
        opts = opts.env(k, *v);
    }
    opts
}

/// An upstream that is slow, but answers (so no breaker holds it), gets at most half the
/// delivery workers: another organization's events, recorded behind its backlog, go at once
/// instead of waiting for it to drain.
#[tokio::test]
async fn a_slow_upstream_takes_half_the_workers_and_others_go_meanwhile() {
    // Before, all 4 workers waited on the slow upstream, 1.5 s at a time, 12 events deep.
    others_go_at_once_behind_a_slow_upstreams_backlog(12, Tenant::Other).await;
}

/// A backlog deeper than what a pass reads of the queue (512) once filled every pass, and
/// other tenants' events, due after it, waited for it to drain.
#[tokio::test]
async fn a_slow_upstreams_backlog_deeper_than_a_pass_holds_back_no_other_tenant() {
    others_go_at_once_behind_a_slow_upstreams_backlog(600, Tenant::Other).await;
}

/// The same within a tenant: its number whose upstream is slow once took every place the
/// tenant had in a pass's read, and its other numbers' events waited for that backlog to drain.
#[tokio::test]
async fn a_slow_numbers_backlog_holds_back_none_of_its_tenants_other_numbers() {
    others_go_at_once_behind_a_slow_upstreams_backlog(600, Tenant::Same).await;
}

/// Whose event is recorded behind the slow upstream's backlog.
enum Tenant {
    Same,
    Other,
}

async fn others_go_at_once_behind_a_slow_upstreams_backlog(backlog: usize, whose: Tenant) {
    let slow = FakeHttp::start(|_| Reply::status(200).delayed(Duration::from_millis(1_500))).await;
    let fast = FakeHttp::start(|_| Reply::status(200)).await;
    let app = upstream_app(&fast, &[("CALLGATE_DELIVERY_WORKERS", "4")]).await;
    let tenant = app.create_org("Slow").await;
    let other = match whose {
        Tenant::Same => tenant.clone(),
        Tenant::Other => app.create_org("Other").await,
    };
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(slow.url("/slow"));
    let slow_line = add_line(&app, &tenant, Carrier::Twilio, "+16282020041", cfg);
    let line = add_line(&app, &other, Carrier::Twilio, "+16282020042", config(None, None));
    // Each its own call, so each heads one.
    for i in 0..backlog {
        assert_eq!(twilio_status(&app.client, &app.base, &slow_line, &format!("CASLOW{i}"), "completed", 1).await, 200);
    }
    wait_hits(&slow, "the slow upstream busy", |h| h.len() >= 2).await;
    goes_at_once_beside_two_slow_attempts(&app, &[&slow], &fast, &other, &line).await;
}

/// An event of `line` is delivered to `fast` within a second, while at most 2 of the 4 workers
/// are at the `slow` upstreams (attempts that take 1.5 s each): in that second, each frees at
/// most once.
async fn goes_at_once_beside_two_slow_attempts(
    app: &TestApp,
    slow: &[&FakeHttp],
    fast: &FakeHttp,
    org: &Org,
    line: &Line,
) {
    let hits = || slow.iter().map(|s| s.hits().len()).sum::<usize>();
    let (started, begun) = (Instant::now(), hits());
    let id = record_status(app, org, line, "CAOTHER", "completed", 1).await;
    wait_state(app, org, &id, "delivered").await;
    assert!(started.elapsed() < Duration::from_millis(1_000), "took {:?}", started.elapsed());
    let more = hits() - begun;
    assert!(more <= 2, "{more} attempts began at the slow upstreams within a second: more than 2 at once");
    assert_eq!(fast.hits_to("/hook").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [id]);
}

/// Upstreams known to be slow take at most half the workers between them, however many there
/// are: each at its own share, two of them once took every worker, and every other upstream's
/// events waited for their attempts to end.
#[tokio::test]
async fn slow_upstreams_together_take_half_the_workers_and_others_go_meanwhile() {
    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(FakeHttp::start(|_| Reply::status(200).delayed(Duration::from_millis(1_500))).await);
    }
    let fast = FakeHttp::start(|_| Reply::status(200)).await;
    let app = upstream_app(&fast, &[("CALLGATE_DELIVERY_WORKERS", "4")]).await;
    let (tenant, other) = (app.create_org("Slow").await, app.create_org("Other").await);
    // Three numbers, each with its own slow upstream (its own origin), four calls deep each.
    for (n, upstream) in slow.iter().enumerate() {
        let mut cfg = config(None, None);
        cfg.upstream_url = Some(upstream.url(&format!("/slow{n}")));
        let line = add_line(&app, &tenant, Carrier::Twilio, &format!("+1628202005{n}"), cfg);
        for i in 0..4 {
            let call = format!("CASLOW{n}X{i}");
            assert_eq!(twilio_status(&app.client, &app.base, &line, &call, "completed", 1).await, 200);
        }
    }
    // Each upstream is known slow once an attempt of it has taken its 1.5 s.
    for upstream in &slow {
        wait_hits_within(upstream, "an attempt at every slow upstream", Duration::from_secs(12), |h| !h.is_empty())
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    let line = add_line(&app, &other, Carrier::Twilio, "+16282020059", config(None, None));
    let slow: Vec<&FakeHttp> = slow.iter().collect();
    goes_at_once_beside_two_slow_attempts(&app, &slow, &fast, &other, &line).await;
}

#[tokio::test]
async fn deliveries_are_signed_with_both_secrets_during_rotation_and_carry_the_event() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let own = FakeHttp::start(|_| Reply::status(204)).await;
    let previous = whsec(&PREVIOUS_SECRET_RAW);
    let app = upstream_app(&upstream, &[("CALLGATE_UPSTREAM_PREVIOUS_SECRET", &previous)]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(own.url("/own"));
    let own_line = add_line(&app, &org, Carrier::Twilio, "+16282020002", cfg);

    let id = record_status(&app, &org, &line, "CA01", "completed", 1).await;
    let d = wait_state(&app, &org, &id, "delivered").await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(d["attempts"][0]["status_code"], 200);
    assert_eq!(d["next_attempt_at"], Value::Null);

    let hits = upstream.hits_to("/hook");
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    assert_eq!(hit.webhook_id(), id);
    assert_eq!(hit.header("webhook-timestamp"), (T0 / 1000).to_string());
    assert!(hit.header("content-type").starts_with("application/json"));
    // Current secret first, then the one being rotated out; each verifies on its own.
    let sigs: Vec<&str> = hit.header("webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    let (ts, body) = (hit.header("webhook-timestamp"), hit.body.as_bytes());
    assert!(verifies(&UPSTREAM_SECRET_RAW, &id, ts, body, sigs[0]));
    assert!(verifies(&PREVIOUS_SECRET_RAW, &id, ts, body, sigs[1]));
    assert!(!verifies(&UPSTREAM_SECRET_RAW, &id, ts, body, sigs[1]));

    // The body: the normalized event with its provenance, exactly as GET /events/{id} shows it.
    let body = hit.json();
    let mut shown = event(&app, &org, &id).await;
    shown.as_object_mut().unwrap().remove("delivery");
    assert_eq!(body, shown);
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["provider"], "twilio");
    assert_eq!(body["kind"], "call.hangup");
    assert_eq!(body["call_id"], "CA01");
    assert_eq!(body["received_at"], rfc3339(T0));
    assert_eq!(body["verified_by"]["scheme"], "twilio-hmac-sha1");
    assert_eq!(body["verified_by"]["credential"], "current");
    assert!(body["verified_by"]["secret_id"].as_str().unwrap().starts_with("sec_"));
    assert_eq!(body["params"]["CallStatus"], "completed");
    assert!(body.get("received_at_ms").is_none());

    // A number's own upstream wins over the global one.
    let id = record_status(&app, &org, &own_line, "CA02", "completed", 1).await;
    wait_state(&app, &org, &id, "delivered").await;
    assert_eq!(own.hits_to("/own").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [id]);
    assert_eq!(upstream.hits().len(), 1);
}

/// A deleted number's events still to be delivered go to the upstream of its own, whether
/// they wait for a retry or wait parked, as do its events delivered again, after a restart
/// too: the gateway's upstream, where they used to go, may be another party's.
#[tokio::test]
async fn a_deleted_numbers_events_still_go_to_its_own_upstream() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let (own, up) = down_until_up(204).await;
    let app = upstream_app(&upstream, &[("CALLGATE_DELIVERY_BREAKER_AFTER", "1")]).await;
    let org = app.create_org("Acme").await;
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(own.url("/own"));
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020071", cfg);
    let plain = add_line(&app, &org, Carrier::Twilio, "+16282020072", config(None, None));
    let id = record_status(&app, &org, &line, "CA01", "completed", 1).await;
    let d = wait_attempts(&app, &org, &id, 1).await;
    assert_eq!((d["state"].as_str(), d["attempts"][0]["status_code"].as_u64()), (Some("failed"), Some(503)));
    // Its upstream is held after that failure (the breaker hears of it just after the outcome
    // is recorded): the next event waits parked, untried.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let parked = record_status(&app, &org, &line, "CA03", "completed", 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(event(&app, &org, &parked).await["delivery"]["attempts"], json!([]));
    let plain_id = record_status(&app, &org, &plain, "CA02", "completed", 1).await;
    wait_state(&app, &org, &plain_id, "delivered").await;

    for l in [&line, &plain] {
        let res = app.delete(&org, &format!("/phone-numbers/{}", l.phone_id)).send().await.unwrap();
        assert_eq!(res.status(), 204);
    }
    let app = app.restart().await;
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    // Past the first retry's 5 s and its jitter.
    app.clock.set_ms(app.clock.now_ms() + 6_000);
    let d = wait_state(&app, &org, &id, "delivered").await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(d["attempts"][1]["status_code"], 204);
    let d = wait_state(&app, &org, &parked, "delivered").await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);

    for ev in [&id, &plain_id] {
        let res = app.post(&org, &format!("/events/{ev}/redeliver")).send().await.unwrap();
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    }
    let hits = wait_hits(&own, "the redelivery", |h| h.len() >= 4).await;
    let mut ids: Vec<String> = hits.iter().map(Hit::webhook_id).collect();
    ids.sort();
    let mut want = vec![id.clone(), id.clone(), id.clone(), parked.clone()];
    want.sort();
    assert_eq!(ids, want);
    // The number that had no upstream of its own: the gateway's, as before it was deleted.
    let hits = wait_hits(&upstream, "the other redelivery", |h| h.len() >= 2).await;
    assert_eq!(hits.iter().map(Hit::webhook_id).collect::<Vec<_>>(), [plain_id.as_str(); 2]);
    assert_eq!(own.hits().len(), 4);
}

/// Events that belong to no call are each a call of their own: one whose upstream fails holds
/// back no other, of its org or another.
#[tokio::test]
async fn an_event_of_no_call_waits_behind_no_other() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let failing = FakeHttp::start(|_| Reply::status(500)).await;
    let app = upstream_app(&upstream, &[]).await;
    let (acme, globex) = (app.create_org("Acme").await, app.create_org("Globex").await);
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(failing.url("/down"));
    let down = add_line(&app, &acme, Carrier::Twilio, "+16282020001", cfg);
    let acme_line = add_line(&app, &acme, Carrier::Twilio, "+16282020002", config(None, None));
    let globex_line = add_line(&app, &globex, Carrier::Twilio, "+16282020003", config(None, None));
    let callless = |line: &Line, n: u32| {
        vec![
            ("AccountSid", "AC0123456789abcdef0123456789abcdef".to_owned()),
            ("CallStatus", "completed".to_owned()),
            ("SequenceNumber", n.to_string()),
            ("To", line.number.clone()),
        ]
    };
    assert_eq!(twilio_callback(&app.client, &app.base, &down, &callless(&down, 1)).await, 200);
    let first = events_of(&app, &acme, &down).await[0]["id"].as_str().unwrap().to_owned();
    let d = wait_attempts(&app, &acme, &first, 1).await;
    assert_eq!((d["state"].as_str(), d["attempts"][0]["status_code"].as_u64()), (Some("failed"), Some(500)));

    // The clock stands still, so the failed one is not tried again; the others go at once.
    let mut ids = Vec::new();
    for (org, line, n) in [(&acme, &acme_line, 2), (&globex, &globex_line, 3)] {
        assert_eq!(twilio_callback(&app.client, &app.base, line, &callless(line, n)).await, 200);
        let evs = events_of(&app, org, line).await;
        assert_eq!((evs.len(), &evs[0]["call_id"]), (1, &Value::Null));
        let id = evs[0]["id"].as_str().unwrap().to_owned();
        assert_eq!(wait_state(&app, org, &id, "delivered").await["attempts"].as_array().unwrap().len(), 1);
        ids.push(id);
    }
    assert_eq!(upstream.hits_to("/hook").iter().map(Hit::webhook_id).collect::<Vec<_>>(), ids);
    assert_eq!(failing.hits().len(), 1);
    assert_eq!(event(&app, &acme, &first).await["delivery"]["state"], "failed");
}

/// The base delay after `failures` failures: 5 s, 30 s, 2 min, 10 min, 1 h, then hourly.
fn schedule_ms(failures: usize) -> i64 {
    [5_000, 30_000, 120_000, 600_000, 3_600_000].get(failures - 1).copied().unwrap_or(3_600_000)
}

#[tokio::test]
async fn failed_deliveries_back_off_on_schedule_and_die_at_the_horizon() {
    let upstream = FakeHttp::start(|_| Reply::status(503)).await;
    // 2.5 h: attempts at about 0, 5 s, 35 s, 2.6 min, 12.6 min, 1.2 h and 2.2 h (whatever the
    // jitter); the next would come after the horizon, so it comes at the horizon, the last.
    let app = upstream_app(&upstream, &[("CALLGATE_DELIVERY_HORIZON_SECS", "9000")]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let id = record_status(&app, &org, &line, "CA01", "completed", 1).await;

    let mut at = T0;
    let mut d = wait_attempts(&app, &org, &id, 1).await;
    for n in 1.. {
        let last = &d["attempts"][n - 1];
        assert_eq!(last["at"], rfc3339(at), "attempt {n}");
        assert_eq!(last["status_code"], 503, "attempt {n}");
        assert_eq!(upstream.hits().len(), n);
        assert_eq!(upstream.hits()[n - 1].header("webhook-timestamp"), (at / 1000).to_string());
        if d["state"] == "dead" {
            assert_eq!(n, 8, "dead after {n} attempts");
            assert_eq!(at, T0 + 9_000_000, "the last attempt is at the horizon");
            assert_eq!(d["next_attempt_at"], Value::Null);
            break;
        }
        assert_eq!(d["state"], "failed", "attempt {n}");
        let next = ms(d["next_attempt_at"].as_str().unwrap());
        let base = schedule_ms(n);
        if n == 7 {
            assert_eq!(next, T0 + 9_000_000, "the attempt after the horizon comes at it");
        } else {
            assert!(
                (at + base - base / 10..=at + base + base / 10).contains(&next),
                "after {n} failures the next attempt is {} ms later, not {base} ± 10 %",
                next - at
            );
        }
        assert!(n < 8, "still retrying after {n} attempts");
        if n == 1 {
            // Not a millisecond early.
            app.clock.set_ms(next - 1);
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert_eq!(event(&app, &org, &id).await["delivery"]["attempts"].as_array().unwrap().len(), 1);
        }
        app.clock.set_ms(next);
        at = next;
        d = wait_attempts(&app, &org, &id, n + 1).await;
    }
    assert_eq!(ids_with_delivery(&app, &org, "dead").await, [id.as_str()]);
    assert!(ids_with_delivery(&app, &org, "failed").await.is_empty());
    // Dead stays dead.
    app.clock.set_ms(at + 10 * 3_600_000);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(upstream.hits().len(), 8);
}

/// The horizon and the backoff run from an event's first attempt, not from when it was
/// recorded: one that waited untried past the horizon (parked with no upstream, here) gets its
/// retries, where it used to die at its first failure. An operator's redelivery starts the
/// schedule again too (it went on from the attempts before).
#[tokio::test]
async fn an_event_that_waited_past_the_horizon_still_gets_its_retries() {
    let upstream = FakeHttp::start(|_| Reply::status(503)).await;
    let app = spawn_with(pinned(&[("CALLGATE_DELIVERY_HORIZON_SECS", "600")])).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020031", config(None, None));
    let id = record_status(&app, &org, &line, "CAWAITED", "completed", 1).await;
    let later = T0 + 3_600_000;
    app.clock.set_ms(later);
    let res = set_upstream(&app, &org, &line, Some(&upstream.url("/own"))).await;
    assert_eq!(res.status(), 200);
    let d = wait_attempts(&app, &org, &id, 1).await;
    assert_eq!(d["state"], "failed", "{d}");
    let next = ms(d["next_attempt_at"].as_str().unwrap());
    assert!((later + 4_500..=later + 5_500).contains(&next), "{d}");

    // Two more failures, then a redelivery: its failure waits 5 s again, not 2 min.
    let mut at = next;
    for n in 2..=3 {
        app.clock.set_ms(at);
        let d = wait_attempts(&app, &org, &id, n).await;
        at = ms(d["next_attempt_at"].as_str().unwrap());
    }
    let asked = at - 1_000;
    app.clock.set_ms(asked);
    let res = app.post(&org, &format!("/events/{id}/redeliver")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let d = wait_attempts(&app, &org, &id, 4).await;
    assert_eq!(d["state"], "failed", "{d}");
    let next = ms(d["next_attempt_at"].as_str().unwrap());
    assert!((asked + 4_500..=asked + 5_500).contains(&next), "after a redelivery: {d}");

    // And the horizon runs from the redelivery's first attempt: the last try is at it.
    let mut n = 4;
    loop {
        let d = event(&app, &org, &id).await["delivery"].clone();
        if d["state"] == "dead" {
            assert_eq!(ms(d["attempts"][n - 1]["at"].as_str().unwrap()), asked + 600_000, "{d}");
            break;
        }
        app.clock.set_ms(ms(d["next_attempt_at"].as_str().unwrap()));
        n += 1;
        wait_attempts(&app, &org, &id, n).await;
    }
}

#[tokio::test]
async fn an_upstream_that_is_down_then_slow_then_up_gets_the_event() {
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let app = spawn_with(
        Options::default()
            .clock(Clock::pinned(T0))
            .env("CALLGATE_UPSTREAM_URL", url)
            .env("CALLGATE_DELIVERY_TIMEOUT_MS", "400"),
    )
    .await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let id = record_status(&app, &org, &line, "CA01", "completed", 1).await;

    // Nothing listens.
    let d = wait_attempts(&app, &org, &id, 1).await;
    assert_eq!(d["state"], "failed");
    assert_eq!(d["attempts"][0]["status_code"], Value::Null);
    assert_eq!(d["attempts"][0]["error"], "connection failed");

    // It comes up on that port, but answers too slowly.
    let upstream = FakeHttp::start_on(TcpListener::bind(("127.0.0.1", port)).expect("the port is still free"), |_| {
        Reply::status(200).delayed(Duration::from_secs(3))
    });
    app.clock.set_ms(ms(d["next_attempt_at"].as_str().unwrap()));
    let d = wait_attempts(&app, &org, &id, 2).await;
    assert_eq!(d["state"], "failed");
    assert_eq!(d["attempts"][1]["status_code"], Value::Null);
    assert_eq!(d["attempts"][1]["error"], "timeout");
    let latency = d["attempts"][1]["latency_ms"].as_u64().unwrap();
    assert!((400..2_000).contains(&latency), "{latency} ms");

    // Then well.
    upstream.set(|_| Reply::status(202));
    app.clock.set_ms(ms(d["next_attempt_at"].as_str().unwrap()));
    let d = wait_attempts(&app, &org, &id, 3).await;
    assert_eq!(d["state"], "delivered");
    assert_eq!(d["attempts"][2]["status_code"], 202);
    assert_eq!(d["attempts"][2]["error"], Value::Null);
    assert_eq!(upstream.hits().iter().map(Hit::webhook_id).collect::<Vec<_>>(), [id.as_str(), &id]);
}

/// Many callbacks of many calls while the upstream fails fast: with the clock standing still no
/// event may be tried twice, however the outbox's scans and finishing attempts interleave.
#[tokio::test]
async fn a_failed_attempt_is_never_retried_before_its_backoff() {
    let upstream = FakeHttp::start(|_| Reply::status(503)).await;
    // Every head is tried here, so the breaker that would hold the upstream is off.
    let app = upstream_app(&upstream, &[("CALLGATE_DELIVERY_BREAKER_AFTER", "0")]).await;
    let org = app.create_org("Acme").await;
    let line = Arc::new(add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None)));
    for round in 0..8u32 {
        let sends = (0..16u32).map(|i| {
            let (client, base, line) = (app.client.clone(), app.base.clone(), Arc::clone(&line));
            async move {
                let seq = round * 100 + i;
                twilio_status(&client, &base, &line, &format!("CA-{}-{i}", round / 2), "in-progress", seq).await
            }
        });
        assert!(futures_util::future::join_all(sends).await.iter().all(|s| *s == 200));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v: Value = app.get(&org, "/events?limit=1000").send().await.unwrap().json().await.unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 128);
    for ev in events {
        let id = ev["id"].as_str().unwrap();
        let attempts = event(&app, &org, id).await["delivery"]["attempts"].as_array().unwrap().len();
        assert!(attempts <= 1, "{id} ({}) was tried {attempts} times with the clock standing still", ev["call_id"]);
    }
    // One head per call was tried; the rest wait behind it.
    assert_eq!(upstream.hits().len(), 64);
}

/// With the clock a millisecond short of `at_ms` the upstream still has only `hits`; then the
/// clock reaches `at_ms`.
async fn no_probe_until(app: &TestApp, upstream: &FakeHttp, at_ms: i64, hits: usize) {
    app.clock.set_ms(at_ms - 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(upstream.hits().len(), hits, "a probe before {at_ms}");
    app.clock.set_ms(at_ms);
}

/// Forty calls while the upstream fails: after five failures in a row it is held, the other
/// events wait untried, one probe goes after each pause (1 s, then 2 s), and once a probe gets
/// through everything waiting is delivered.
#[tokio::test]
async fn an_upstream_that_keeps_failing_is_held_and_probed_until_it_answers() {
    held_and_probed_until_it_answers(503).await;
}

/// An upstream that answers 401 (a wrong secret) refuses every event alike: it is held as a
/// down one is, so its events wait parked instead of retrying on the queue for a day.
#[tokio::test]
async fn an_upstream_that_refuses_every_event_is_held_and_probed_until_it_takes_them() {
    held_and_probed_until_it_answers(401).await;
}

/// So is one that redirects every event (its URL moved): deliveries follow no redirect, so each
/// event would otherwise retry on the queue for a day.
#[tokio::test]
async fn an_upstream_that_redirects_every_event_is_held_and_probed_too() {
    held_and_probed_until_it_answers(308).await;
}

async fn held_and_probed_until_it_answers(status: u16) {
    let upstream = FakeHttp::start(move |_| Reply::status(status)).await;
    // One worker: attempts go one after the other, so exactly five are made before the hold.
    let app = upstream_app(&upstream, &[("CALLGATE_DELIVERY_WORKERS", "1")]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(record_status(&app, &org, &line, &format!("CA{i:02}"), "completed", 1).await);
    }
    let failed_first = wait_hits(&upstream, "five attempts", |h| h.len() >= 5).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(upstream.hits().len(), 5, "attempts went on after five failures in a row");
    let failed = ids_with_delivery(&app, &org, "failed").await;
    assert_eq!(failed.len(), 5);
    assert_eq!(ids_with_delivery(&app, &org, "pending").await.len(), 35);
    let mut tried: Vec<String> = failed_first.iter().map(Hit::webhook_id).collect();
    tried.sort();
    let mut failed = failed;
    failed.sort();
    assert_eq!(tried, failed);

    // Not a millisecond before the first pause ends; then one probe, which fails too.
    no_probe_until(&app, &upstream, T0 + 1_000, 5).await;
    wait_hits(&upstream, "the first probe", |h| h.len() == 6).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(upstream.hits().len(), 6, "one probe at a time");

    // The upstream recovers; the next probe (after a pause twice as long) finds it.
    upstream.set(|_| Reply::status(200));
    no_probe_until(&app, &upstream, T0 + 3_000, 6).await;
    wait_hits(&upstream, "the held events", |h| h.len() == 40).await;
    // The upstream counts a hit before it answers; the outcome is recorded just after.
    wait_delivered(&app, &org, 34).await;
    assert!(ids_with_delivery(&app, &org, "pending").await.is_empty());
    // The six that failed keep their own backoff (5 s ± 10 % after their attempt).
    assert_eq!(ids_with_delivery(&app, &org, "failed").await.len(), 6);
    app.clock.set_ms(T0 + 7_000);
    wait_hits(&upstream, "the retries", |h| h.len() == 46).await;
    wait_delivered(&app, &org, 40).await;
    let mut delivered = ids_with_delivery(&app, &org, "delivered").await;
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(upstream.hits().len(), 46, "each event delivered once");
}

/// The outbox gauges: (queued, parked).
async fn outbox_depth(app: &TestApp) -> (u64, u64) {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    (metric_value(&text, "callgate_outbox_queued"), metric_value(&text, "callgate_outbox_parked"))
}

async fn wait_depth(app: &TestApp, want: (u64, u64)) {
    let until = Instant::now() + Duration::from_secs(8);
    loop {
        let got = outbox_depth(app).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < until, "outbox (queued, parked) is {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// 700 callbacks of one number while its upstream fails, more than one scan of the queue
/// holds: once the upstream is held they wait off the queue, so another number's event goes
/// to its own upstream at once instead of queuing behind them; then the held upstream recovers
/// and every event is delivered exactly once.
#[tokio::test]
async fn a_held_upstreams_backlog_waits_parked_and_never_delays_another_upstream() {
    let down = FakeHttp::start(|_| Reply::status(503)).await;
    let own = FakeHttp::start(|_| Reply::status(200)).await;
    let app = upstream_app(&down, &[("CALLGATE_DELIVERY_WORKERS", "1")]).await;
    let org = app.create_org("Acme").await;
    let busy = Arc::new(add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None)));
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(own.url("/own"));
    let other = add_line(&app, &org, Carrier::Twilio, "+16282020002", cfg);

    for round in 0..25u32 {
        let sends = (0..28u32).map(|i| {
            let (client, base, line) = (app.client.clone(), app.base.clone(), Arc::clone(&busy));
            async move { twilio_status(&client, &base, &line, &format!("CA-{round}-{i}"), "completed", 1).await }
        });
        assert!(futures_util::future::join_all(sends).await.iter().all(|s| *s == 200));
    }
    // Five failures hold the upstream (one worker: no more are tried); those five wait for
    // their retry on the queue, the other 695 wait parked.
    wait_hits(&down, "five attempts", |h| h.len() >= 5).await;
    wait_depth(&app, (5, 695)).await;

    // The other number's event is due after all 700 of them, and goes at once.
    let id = record_status(&app, &org, &other, "CA-OTHER", "completed", 1).await;
    wait_state(&app, &org, &id, "delivered").await;
    assert_eq!(own.hits_to("/own").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [id.as_str()]);
    assert_eq!(down.hits().len(), 5, "the held upstream was tried again before its pause ended");
    assert_eq!(outbox_depth(&app).await, (5, 695));

    // The upstream recovers: one probe, then the parked events go; the five failed ones go
    // once their backoff is over.
    down.set(|_| Reply::status(200));
    app.clock.set_ms(T0 + 1_000);
    wait_hits_within(&down, "the parked events", Duration::from_secs(40), |h| h.len() == 700).await;
    wait_depth(&app, (5, 0)).await;
    app.clock.set_ms(T0 + 6_000);
    wait_hits(&down, "the retries", |h| h.len() == 705).await;
    wait_depth(&app, (0, 0)).await;
    let hits = down.hits();
    let mut delivered: Vec<String> = hits[5..].iter().map(Hit::webhook_id).collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 700, "each event delivered once");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(down.hits().len(), 705);
}

/// An incoming call's event is delivered once its answer is noted on it, and a retry sends
/// the same body under the same `webhook-id`: before, it went while the assistant was still
/// deciding, without its answer, and the retry carried a different body.
#[tokio::test]
async fn an_incoming_calls_delivery_waits_for_its_answer_and_retries_send_the_same_body() {
    let upstream = FakeHttp::start(|_| Reply::status(500)).await;
    let assistant = FakeHttp::start(|_| {
        Reply::json(json!({"action": "stream", "stream_url": AI_STREAM})).delayed(Duration::from_millis(300))
    })
    .await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, Some(&assistant.url("/answer"))));

    let res = incoming_request(&app.client, &app.base, &line, "CAINCOMING").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let first = wait_hits(&upstream, "the first attempt", |h| !h.is_empty()).await;
    assert_eq!(first[0].json()["answer"]["source"], "assistant", "{}", first[0].body);
    assert_eq!(first[0].json()["answer"]["decision"]["stream_url"], AI_STREAM);

    upstream.set(|_| Reply::status(200));
    app.clock.set_ms(T0 + 6_000);
    let hits = wait_hits(&upstream, "the retry", |h| h.len() == 2).await;
    assert_eq!(hits[1].webhook_id(), hits[0].webhook_id());
    assert_eq!(hits[1].body, hits[0].body, "one id, one body");
    wait_state(&app, &org, &hits[0].webhook_id(), "delivered").await;
}

/// An incoming call recorded while its number has no upstream waits parked; given one while
/// the assistant still decides, the event is released, and still goes only with its answer.
#[tokio::test]
async fn a_parked_incoming_call_released_before_its_answer_still_goes_with_it() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let assistant = FakeHttp::start(|_| {
        Reply::json(json!({"action": "stream", "stream_url": AI_STREAM})).delayed(Duration::from_millis(2_000))
    })
    .await;
    let app = spawn_with(pinned(&[("CALLGATE_ANSWER_DEADLINE_MS", "3000")])).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, Some(&assistant.url("/answer"))));
    let calling = incoming_request(&app.client, &app.base, &line, "CAPARKED").send();
    let releasing = async {
        wait_hits(&assistant, "the assistant asked", |h| !h.is_empty()).await;
        let res = set_upstream(&app, &org, &line, Some(&upstream.url("/hook"))).await;
        assert_eq!(res.status(), 200);
        // The outbox looks at what it released while the call is still being decided.
        tokio::time::sleep(Duration::from_millis(500)).await;
        upstream.hits().len()
    };
    let (res, early) = tokio::join!(calling, releasing);
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(early, 0, "delivered before its answer");
    let hits = wait_hits(&upstream, "the delivery", |h| !h.is_empty()).await;
    assert_eq!(hits[0].json()["answer"]["source"], "assistant", "{}", hits[0].body);
    wait_state(&app, &org, &hits[0].webhook_id(), "delivered").await;
}

/// A call's events wait for each other's delivery, but only within one organization: another
/// organization's event with the same call id, whose upstream is down, holds up nothing.
#[tokio::test]
async fn another_organizations_event_with_the_same_call_id_holds_up_nothing() {
    let down = FakeHttp::start(|_| Reply::status(503)).await;
    let up = FakeHttp::start(|_| Reply::status(200)).await;
    let app = upstream_app(&down, &[]).await;
    let (mallory, victim) = (app.create_org("Mallory").await, app.create_org("Victim").await);
    let theirs = add_line(&app, &mallory, Carrier::Twilio, "+16282020001", config(None, None));
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(up.url("/own"));
    let own = add_line(&app, &victim, Carrier::Twilio, "+16282020002", cfg);

    record_status(&app, &mallory, &theirs, "CASHAREDCALL", "ringing", 1).await;
    wait_hits(&down, "the first attempt", |h| !h.is_empty()).await;
    let id = record_status(&app, &victim, &own, "CASHAREDCALL", "completed", 1).await;
    wait_state(&app, &victim, &id, "delivered").await;
    assert_eq!(up.hits_to("/own").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [id.as_str()]);
}

/// A redelivery asked while an attempt of the event is out happens after that attempt: its
/// outcome, written when it is done, used to overwrite the request, and the API had answered
/// 202 for a redelivery that never came.
#[tokio::test]
async fn a_redelivery_asked_during_an_attempt_is_made_after_it() {
    let upstream = FakeHttp::start(|_| Reply::status(200).delayed(Duration::from_millis(800))).await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let id = record_status(&app, &org, &line, "CAREDELIVER", "completed", 1).await;
    wait_hits(&upstream, "the attempt, still out", |h| h.len() == 1).await;
    let res = app.post(&org, &format!("/events/{id}/redeliver")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"event_id": id, "delivery": "pending"}));
    let hits = wait_hits(&upstream, "the redelivery", |h| h.len() == 2).await;
    assert_eq!((hits[0].webhook_id(), hits[1].webhook_id()), (id.clone(), id.clone()));
    assert_eq!(hits[0].body, hits[1].body, "a redelivery sends what the first attempt did");
    let d = wait_state(&app, &org, &id, "delivered").await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2, "both attempts are on record: {d}");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(upstream.hits().len(), 2, "asked once, sent once more");
}

/// URLs stored before their address was refused (AWS's IPv6 metadata address was accepted
/// once) are not called: the delivery fails with the reason, the answer falls back.
#[tokio::test]
async fn a_stored_url_naming_a_refused_address_is_not_called() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let mut cfg = config(Some(STATIC_STREAM), Some("http://[fd00:ec2::254]/decide"));
    cfg.upstream_url = Some("http://[fd00:ec2::254]/latest/meta-data".into());
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", cfg);
    let res = incoming_request(&app.client, &app.base, &line, "CAMETADATA").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let evs = events_of(&app, &org, &line).await;
    let id = evs[0]["id"].as_str().unwrap().to_owned();
    let ev = event(&app, &org, &id).await;
    assert_eq!((&ev["answer"]["source"], &ev["answer"]["reason"]), (&json!("fallback"), &json!("address_not_allowed")));
    let d = wait_state(&app, &org, &id, "failed").await;
    assert_eq!(d["attempts"][0]["error"], "address not allowed", "{d}");
    assert_eq!(d["attempts"][0]["status_code"], Value::Null);
    assert!(upstream.hits().is_empty());
}

/// With `CALLGATE_ORG_URL_DENY`, a number's own upstream and assistant may not lead into the
/// networks it names: set through the API they are refused, in any spelling; stored before,
/// or behind a name that resolves there, they are not called. The operator's own upstream, in
/// the same network, still gets its events, and a number may name it.
#[tokio::test]
async fn an_organizations_urls_may_not_lead_into_the_networks_the_operator_denies() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let own = FakeHttp::start(|_| Reply::status(204)).await;
    let app = upstream_app(&upstream, &[("CALLGATE_ORG_URL_DENY", "127.0.0.0/8,::1/128")]).await;
    let org = app.create_org("Acme").await;
    let plain = add_line(&app, &org, Carrier::Twilio, "+16282020081", config(None, None));
    let mapped = own.url("/own").replace("127.0.0.1", "[::ffff:127.0.0.1]");
    for (field, url) in
        [("upstream_url", own.url("/own")), ("upstream_url", mapped), ("assistant_url", own.url("/decide"))]
    {
        let body = json!({"config": {field: url}});
        let res = app.patch(&org, &format!("/phone-numbers/{}", plain.phone_id)).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 422, "{url}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_field");
        assert_eq!(
            err["error"]["message"],
            format!("config.{field}: must not be an address of the networks this gateway runs in")
        );
    }
    // The operator's own upstream, even spelled otherwise, is the operator's: taken, and called.
    let operators = upstream.url("/hook").replace("http://", "HTTP://");
    assert_eq!(set_upstream(&app, &org, &plain, Some(&operators)).await.status(), 200);
    let via_operator = record_status(&app, &org, &plain, "CAOPERATOR", "completed", 1).await;
    wait_state(&app, &org, &via_operator, "delivered").await;
    assert_eq!(set_upstream(&app, &org, &plain, None).await.status(), 200);

    let mut cfg = config(Some(STATIC_STREAM), Some(&own.url("/decide")));
    cfg.upstream_url = Some(own.url("/own"));
    let stored = add_line(&app, &org, Carrier::Twilio, "+16282020082", cfg);
    let res = incoming_request(&app.client, &app.base, &stored, "CASTORED").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let id = events_of(&app, &org, &stored).await[0]["id"].as_str().unwrap().to_owned();
    let ev = event(&app, &org, &id).await;
    assert_eq!((&ev["answer"]["source"], &ev["answer"]["reason"]), (&json!("fallback"), &json!("address_not_allowed")));
    let d = wait_state(&app, &org, &id, "failed").await;
    assert_eq!(d["attempts"][0]["error"], "address not allowed", "{d}");

    let mut cfg = config(None, None);
    cfg.upstream_url = Some(own.url("/named").replace("127.0.0.1", "localhost"));
    let named = add_line(&app, &org, Carrier::Twilio, "+16282020083", cfg);
    let id = record_status(&app, &org, &named, "CANAMED", "completed", 1).await;
    let d = wait_state(&app, &org, &id, "failed").await;
    assert_eq!(d["attempts"][0]["status_code"], Value::Null, "{d}");
    assert_eq!(d["attempts"][0]["error"], "connection failed", "{d}");

    let second = record_status(&app, &org, &plain, "CAPLAIN", "completed", 1).await;
    wait_state(&app, &org, &second, "delivered").await;
    assert_eq!(upstream.hits_to("/hook").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [via_operator, second]);
    assert!(own.hits().is_empty());
}

/// An upstream that answers 429 or 503 with `Retry-After` is not tried again before then
/// (within the longest backoff step); one without it, or with a date, gets the backoff.
#[tokio::test]
async fn an_upstream_asking_for_a_pause_gets_it() {
    let upstream = FakeHttp::start(|_| Reply { retry_after: Some("120"), ..Reply::status(429) }).await;
    let app = upstream_app(&upstream, &[("CALLGATE_DELIVERY_BREAKER_AFTER", "0")]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let paused = record_status(&app, &org, &line, "CAPAUSE", "completed", 1).await;
    let d = wait_state(&app, &org, &paused, "failed").await;
    assert_eq!(ms(d["next_attempt_at"].as_str().unwrap()), T0 + 120_000, "{d}");

    upstream.set(|_| Reply { retry_after: Some("Wed, 21 Oct 2015 07:28:00 GMT"), ..Reply::status(503) });
    let backoff = record_status(&app, &org, &line, "CABACKOFF", "completed", 1).await;
    let d = wait_state(&app, &org, &backoff, "failed").await;
    let after = ms(d["next_attempt_at"].as_str().unwrap()) - T0;
    assert!((4_000..=6_000).contains(&after), "the first backoff step: {d}");

    upstream.set(|_| Reply::status(200));
    app.clock.set_ms(T0 + 60_000);
    wait_state(&app, &org, &backoff, "delivered").await;
    assert_eq!(event(&app, &org, &paused).await["delivery"]["state"], "failed", "paused until its time");
    app.clock.set_ms(T0 + 120_000);
    wait_state(&app, &org, &paused, "delivered").await;
}

#[tokio::test]
async fn the_jitter_spreads_retries() {
    let upstream = FakeHttp::start(|_| Reply::status(500)).await;
    let app = upstream_app(&upstream, &[("CALLGATE_DELIVERY_BREAKER_AFTER", "0")]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let mut nexts = Vec::new();
    for i in 0..8 {
        let id = record_status(&app, &org, &line, &format!("CA{i:02}"), "completed", 1).await;
        let d = wait_attempts(&app, &org, &id, 1).await;
        nexts.push(ms(d["next_attempt_at"].as_str().unwrap()));
    }
    assert!(nexts.iter().all(|n| (T0 + 4_500..=T0 + 5_500).contains(n)), "{nexts:?}");
    nexts.sort();
    nexts.dedup();
    assert!(nexts.len() > 1, "eight failures, one retry time: no jitter");
}

#[tokio::test]
async fn events_of_one_call_are_delivered_in_order_after_an_outage() {
    let upstream = FakeHttp::start(|_| Reply::status(503)).await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));

    let first = record_status(&app, &org, &line, "CA01", "ringing", 0).await;
    wait_attempts(&app, &org, &first, 1).await;
    let mut ids = vec![first.clone()];
    for (seq, status) in [(1, "in-progress"), (2, "completed")] {
        ids.push(record_status(&app, &org, &line, "CA01", status, seq).await);
    }
    // The later events wait behind the first: never sent, still pending.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(upstream.hits().iter().map(Hit::webhook_id).collect::<Vec<_>>(), [first.as_str()]);
    assert_eq!(ids_with_delivery(&app, &org, "failed").await, [first.as_str()]);
    assert_eq!(ids_with_delivery(&app, &org, "pending").await, ids[1..]);
    assert!(ids_with_delivery(&app, &org, "delivered").await.is_empty());
    assert!(ids_with_delivery(&app, &org, "dead").await.is_empty());
    let res = app.get(&org, "/events?delivery=lost").send().await.unwrap();
    assert_eq!(res.status(), 400);
    let res = app.get(&org, "/events?limit=0").send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"error": {"code": "invalid_query", "message": "limit: must be at least 1 (at most 1000 are taken at once)"}})
    );
    let res = app.get(&org, "/events?limit=1000000").send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["events"].as_array().unwrap().len(), ids.len());

    // The upstream recovers; once the retry is due, the call drains in order.
    upstream.set(|_| Reply::status(200));
    app.clock.set_ms(T0 + 6_000);
    wait_state(&app, &org, &ids[2], "delivered").await;
    let sent: Vec<String> = upstream.hits().iter().map(Hit::webhook_id).collect();
    assert_eq!(sent, [ids[0].as_str(), &ids[0], &ids[1], &ids[2]]);
    assert_eq!(ids_with_delivery(&app, &org, "delivered").await, ids);
    for id in &ids[1..] {
        assert_eq!(event(&app, &org, id).await["delivery"]["attempts"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn different_calls_are_delivered_in_parallel() {
    let hold = Duration::from_millis(1500);
    let upstream = FakeHttp::start(move |hit| {
        let slow = hit.json()["call_id"] == "CA-SLOW";
        Reply::status(200).delayed(if slow { hold } else { Duration::ZERO })
    })
    .await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));

    let slow1 = record_status(&app, &org, &line, "CA-SLOW", "ringing", 0).await;
    wait_hits(&upstream, "first delivery", |h| !h.is_empty()).await;
    let slow2 = record_status(&app, &org, &line, "CA-SLOW", "completed", 1).await;
    let fast = record_status(&app, &org, &line, "CA-FAST", "completed", 0).await;
    // The other call is delivered while the slow one is still waiting for its answer.
    wait_state(&app, &org, &fast, "delivered").await;
    assert_eq!(event(&app, &org, &slow1).await["delivery"]["state"], "pending");
    wait_state(&app, &org, &slow2, "delivered").await;

    let hits = upstream.hits();
    let at = |id: &str| hits.iter().find(|h| h.webhook_id() == id).unwrap().at;
    assert!(at(&fast) < at(&slow1) + hold, "the fast call waited for the slow one");
    // The slow call's second event waited for its first.
    assert!(at(&slow2) >= at(&slow1) + hold, "the call's events overlapped");
    assert_eq!(hits.len(), 3);
}

#[tokio::test]
async fn gone_is_dead_at_once_and_redelivery_brings_events_back() {
    let upstream = FakeHttp::start(|_| Reply::status(410)).await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let x = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let y = add_line(&app, &org, Carrier::Twilio, "+16282020002", config(None, None));
    let x1 = record_status(&app, &org, &x, "CA-X1", "completed", 0).await;
    let x2 = record_status(&app, &org, &x, "CA-X2", "completed", 0).await;
    let y1 = record_status(&app, &org, &y, "CA-Y1", "completed", 0).await;
    for id in [x1.as_str(), &x2, &y1] {
        let d = wait_attempts(&app, &org, id, 1).await;
        assert_eq!(d["state"], "dead");
        assert_eq!(d["attempts"][0]["status_code"], 410);
        assert_eq!(d["next_attempt_at"], Value::Null);
    }
    assert_eq!(ids_with_delivery(&app, &org, "dead").await, [x1.as_str(), &x2, &y1]);

    // Another organization sees none of it.
    let other = app.create_org("Other").await;
    assert_eq!(app.post(&other, &format!("/events/{x1}/redeliver")).send().await.unwrap().status(), 404);
    assert_eq!(app.get(&other, &format!("/events/{x1}")).send().await.unwrap().status(), 404);
    assert!(ids_with_delivery(&app, &other, "dead").await.is_empty());
    let res = app.post(&other, "/events/redeliver").json(&json!({"state": "dead"})).send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["requeued"], 0);
    let unknown = format!("/events/evt_{}/redeliver", "0".repeat(32));
    assert_eq!(app.post(&org, &unknown).send().await.unwrap().status(), 404);
    // A limit of none redelivers nothing, rather than one.
    let res = app.post(&org, "/events/redeliver").json(&json!({"state": "dead", "limit": 0})).send().await.unwrap();
    assert_eq!(res.status(), 422);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"error": {"code": "invalid_field", "message": "limit: must be at least 1 (at most 10000 are taken at once)"}})
    );
    assert_eq!(ids_with_delivery(&app, &org, "dead").await, [x1.as_str(), &x2, &y1]);

    upstream.set(|_| Reply::status(200));
    // One.
    let res = app.post(&org, &format!("/events/{x1}/redeliver")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"event_id": x1, "delivery": "pending"}));
    let d = wait_state(&app, &org, &x1, "delivered").await;
    let codes: Vec<&Value> = d["attempts"].as_array().unwrap().iter().map(|a| &a["status_code"]).collect();
    assert_eq!(codes, [410, 200]);
    // Many, of one number.
    let res = app
        .post(&org, "/events/redeliver")
        .json(&json!({"state": "dead", "phone_id": y.phone_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"requeued": 1}));
    wait_state(&app, &org, &y1, "delivered").await;
    assert_eq!(ids_with_delivery(&app, &org, "dead").await, [x2.as_str()]);
    // Many: the rest.
    let res = app.post(&org, "/events/redeliver").json(&json!({"state": "dead"})).send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"requeued": 1}));
    wait_state(&app, &org, &x2, "delivered").await;
    assert!(ids_with_delivery(&app, &org, "dead").await.is_empty());
    let delivered: Vec<String> = upstream.hits().iter().skip(3).map(Hit::webhook_id).collect();
    assert_eq!(delivered, [x1.as_str(), &y1, &x2]);

    // Only failed or dead deliveries can be re-driven in bulk; a state that is none is the
    // body's field at fault, not a query.
    for state in ["pending", "bogus"] {
        let res = app.post(&org, "/events/redeliver").json(&json!({ "state": state })).send().await.unwrap();
        assert_eq!(res.status(), 422, "{state}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v, json!({"error": {"code": "invalid_field", "message": "state: failed or dead"}}), "{state}");
    }
}

#[tokio::test]
async fn redelivering_failed_events_retries_them_now() {
    let upstream = FakeHttp::start(|_| Reply::status(502)).await;
    let app = upstream_app(&upstream, &[]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020001", config(None, None));
    let a = record_status(&app, &org, &line, "CA-A", "completed", 0).await;
    let b = record_status(&app, &org, &line, "CA-B", "completed", 0).await;
    for id in [&a, &b] {
        assert_eq!(wait_attempts(&app, &org, id, 1).await["state"], "failed");
    }
    assert_eq!(ids_with_delivery(&app, &org, "failed").await, [a.as_str(), &b]);
    upstream.set(|_| Reply::status(200));
    // No state given: the failed ones, at once, without waiting out the backoff (the clock
    // does not move).
    let res = app.post(&org, "/events/redeliver").json(&json!({})).send().await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"requeued": 2}));
    for id in [&a, &b] {
        let d = wait_state(&app, &org, id, "delivered").await;
        assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
        assert_eq!(d["attempts"][1]["at"], rfc3339(T0));
    }
}

// ---------------------------------------------------------------------------------------
// A crash: every acknowledged event still reaches the upstream.

struct Server {
    child: std::process::Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_binary(data_dir: &Path, port: u16, upstream: &str) -> Server {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("server.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_callgate"))
        .arg("serve")
        .env_clear()
        .env("CALLGATE_DATA_DIR", data_dir)
        .env("CALLGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("CALLGATE_PUBLIC_URL", PUBLIC_URL)
        .env("CALLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("CALLGATE_UPSTREAM_URL", upstream)
        .env("CALLGATE_LOG", "info")
        .env("EXOTEL_ALLOWED_IPS", "127.0.0.1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start callgate");
    let server = Server { child, base: format!("http://127.0.0.1:{port}") };
    let client = client_builder().build().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = client.get(format!("{}/health", server.base)).send().await {
            if r.status() == 200 {
                return server;
            }
        }
        assert!(Instant::now() < until, "callgate did not start: {}", server_log(data_dir));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn server_log(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default()
}

#[tokio::test]
async fn acknowledged_events_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path();

    // Provision on the stopped server's data dir, through the library.
    let env: std::collections::HashMap<String, String> = [
        ("CALLGATE_DATA_DIR".to_owned(), data_dir.display().to_string()),
        ("CALLGATE_PUBLIC_URL".to_owned(), PUBLIC_URL.to_owned()),
    ]
    .into();
    let settings = callgate::settings::Settings::load(None, &env).unwrap();
    let (line, org) = {
        let (store, keyring) = callgate::startup::open_data(&settings).unwrap();
        let vault = callgate::vault::Vault::new(keyring);
        let now = Clock::system().now_ms();
        let created = callgate::orgs::create(store.as_ref(), "Crash".into(), now).unwrap();
        let org = Org { id: created.org.id.to_string(), key: created.api_key };
        let line =
            provision_line(store.as_ref(), &vault, &org.id, Carrier::Twilio, "+16282020001", config(None, None), now);
        store.flush().unwrap();
        (line, org)
    };

    let port = closed_port();
    let down = format!("http://127.0.0.1:{}/hook", closed_port());
    let mut first = start_binary(data_dir, port, &down).await;

    // Callbacks of several calls, concurrently; the server dies while they are coming in.
    const N: u32 = 40;
    let client = client_builder().timeout(Duration::from_secs(5)).build().unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..N {
        let (client, base, acked) = (client.clone(), first.base.clone(), Arc::clone(&acked));
        let line = Line {
            carrier: line.carrier,
            phone_id: line.phone_id.clone(),
            number: line.number.clone(),
            token: line.token.clone(),
        };
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 5)).await;
            let call = format!("CA-CRASH-{}", i % 4);
            if twilio_status(&client, &base, &line, &call, "in-progress", i).await == 200 {
                acked.lock().unwrap().push((call, i));
            }
        }));
    }
    let until = Instant::now() + Duration::from_secs(5);
    while acked.lock().unwrap().len() < (N / 2) as usize {
        assert!(Instant::now() < until, "callgate acknowledged too little: {}", server_log(data_dir));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.child.kill().unwrap(); // SIGKILL: no shutdown, no flush.
    first.child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= (N / 2) as usize);

    // Restarted on the same data dir with the upstream up: everything acknowledged arrives.
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    let server = start_binary(data_dir, closed_port(), &upstream.url("/hook")).await;
    let client = client_builder().build().unwrap();
    let listed = || async {
        let v: Value = client
            .get(format!("{}/events?limit=1000", server.base))
            .bearer_auth(&org.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["events"].as_array().unwrap().clone()
    };
    // Failed first attempts are due 5 s (± 10 %) after they were made.
    let until = Instant::now() + Duration::from_secs(12);
    let hits = loop {
        let hits = upstream.hits();
        let seqs: Vec<String> =
            hits.iter().filter_map(|h| h.json()["params"]["SequenceNumber"].as_str().map(str::to_owned)).collect();
        let missing: Vec<u32> = acked.iter().map(|(_, i)| *i).filter(|i| !seqs.contains(&i.to_string())).collect();
        if missing.is_empty() {
            break hits;
        }
        if Instant::now() > until {
            let events = listed().await;
            let state: Vec<String> = events
                .iter()
                .filter(|e| {
                    e["params"]["SequenceNumber"].as_str().is_some_and(|s| missing.contains(&s.parse().unwrap()))
                })
                .map(|e| format!("{} {} {}", e["params"]["SequenceNumber"], e["call_id"], e["delivery"]))
                .collect();
            panic!("acknowledged callbacks {missing:?} never arrived; {state:#?}\n{}", server_log(data_dir));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // By id, too: the events the restarted server lists are the ones that arrived.
    let events = listed().await;
    let delivered: Vec<String> = hits.iter().map(Hit::webhook_id).collect();
    for (call, i) in &acked {
        let ev = events
            .iter()
            .find(|e| e["call_id"] == call.as_str() && seq_of(e) == Some(*i))
            .unwrap_or_else(|| panic!("acknowledged callback {i} was not recorded"));
        assert!(delivered.contains(&ev["id"].as_str().unwrap().to_owned()), "event of callback {i} never delivered");
    }
    // Signed with the secret the first start generated into the data dir.
    let secret = std::fs::read_to_string(data_dir.join("upstream.secret")).unwrap();
    let raw = B64.decode(secret.trim().strip_prefix("whsec_").unwrap()).unwrap();
    assert!(hits.iter().all(|h| standard_webhooks_accepts(&raw, h)));
}

#[tokio::test]
async fn a_repeated_answer_request_gets_the_first_answer_without_asking_again() {
    let assistant = fake_assistant().await;
    let app = spawn_with(answer_env(&assistant).await).await;
    let org = app.create_org("Acme").await;
    let transfer = assistant.url("/transfer");
    let line = add_line(
        &app,
        &org,
        Carrier::Plivo,
        &number_for(Carrier::Plivo, 0),
        config(Some(STATIC_STREAM), Some(&transfer)),
    );
    let request = incoming_request(&app.client, &app.base, &line, "call-repeat");
    let repeat = request.try_clone().unwrap();
    let first = request.send().await.unwrap().text().await.unwrap();
    let res = repeat.send().await.unwrap();
    assert_eq!(res.status(), 200);
    let second = res.text().await.unwrap();
    assert!(first.contains(&format!("<Dial><Number>{TRANSFER_TO}</Number></Dial>")), "{first}");
    assert_eq!(second, first);
    assert_eq!(assistant.hits().len(), 1);
    assert_eq!(events_of(&app, &org, &line).await.len(), 1);
}

/// A carrier retrying its answer URL while the first request still waits on the assistant gets
/// the assistant's answer too: before, it got the number's fallback at once, so the carrier
/// could act on an answer the event does not record.
#[tokio::test]
async fn a_retry_while_the_assistant_decides_gets_the_assistants_answer() {
    let assistant = FakeHttp::start(|_| {
        Reply::json(json!({"action": "transfer", "to": TRANSFER_TO})).delayed(Duration::from_millis(400))
    })
    .await;
    let app = spawn_with(answer_env(&assistant).await).await;
    let org = app.create_org("Acme").await;
    for (i, carrier) in [Carrier::Plivo, Carrier::Twilio, Carrier::Exotel].into_iter().enumerate() {
        let line = add_line(
            &app,
            &org,
            carrier,
            &number_for(carrier, i),
            config(Some(STATIC_STREAM), Some(&assistant.url("/answer"))),
        );
        let asked = assistant.hits().len();
        let request = incoming_request(&app.client, &app.base, &line, &format!("call-retried-{i}"));
        let retry = request.try_clone().unwrap();
        let first = tokio::spawn(async move { request.send().await.unwrap().text().await.unwrap() });
        wait_hits(&assistant, "the assistant asked", |h| h.len() > asked).await;
        let res = retry.send().await.unwrap();
        assert_eq!(res.status(), 200);
        let second = res.text().await.unwrap();
        let first = first.await.unwrap();
        assert!(first.contains(TRANSFER_TO), "{carrier}: {first}");
        assert_eq!(second, first, "{carrier}");
        assert_eq!(assistant.hits().len(), asked + 1, "{carrier}: the assistant asked again");
        let events = events_of(&app, &org, &line).await;
        assert_eq!(events.len(), 1, "{carrier}");
        assert_eq!(events[0]["answer"]["source"], "assistant", "{carrier}");
    }
}

/// A carrier's retry of an answer request whose first request a crash cut off (the assistant
/// still deciding) is answered as that first one would have been, and the answer is noted on
/// the event: before, the retry got the number's fallback and the event kept no answer.
#[tokio::test]
async fn a_retry_after_a_crash_took_the_first_answer_is_decided_and_noted() {
    let assistant = FakeHttp::start(|_| {
        Reply::json(json!({"action": "transfer", "to": TRANSFER_TO})).delayed(Duration::from_secs(30))
    })
    .await;
    let fake = FakeCarrier::start().await;
    let number = "+918045550177";
    let cred = credential(Carrier::Exotel, "exotelSECRETcrash0001");
    fake.add_account(Carrier::Exotel, cred.clone(), [number]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [
        ("CALLGATE_EXOTEL_API_URL", fake.base_url()),
        ("EXOTEL_ALLOWED_IPS", "127.0.0.1".to_owned()),
        ("CALLGATE_ANSWER_DEADLINE_MS", "1500".to_owned()),
        ("CALLGATE_UPSTREAM_SECRET", whsec(&UPSTREAM_SECRET_RAW)),
    ];
    let client = client_builder().build().unwrap();
    let server = BinaryServer::start(&data, &env, None).await;
    let res = client.post(server.url("/admin/orgs")).bearer_auth(ADMIN_TOKEN).json(&json!({"name": "Acme"})).send();
    let key = res.await.unwrap().json::<Value>().await.unwrap()["api_key"].as_str().unwrap().to_owned();
    let body = json!({"number": number, "credentials": cred,
                      "config": {"stream_url": STATIC_STREAM, "assistant_url": assistant.url("/answer")}});
    let res = client.post(server.url("/voice/exotel/byok/import")).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let phone_id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let query = form_body(&[
        ("CallSid", "CACRASHED".into()),
        ("CallFrom", "04155550111".into()),
        ("CallTo", number.into()),
        ("Direction", "incoming".into()),
    ]);
    let path = format!("/exotel/incoming/{phone_id}?{query}");
    let first = tokio::spawn(client.get(server.url(&path)).send());
    wait_hits(&assistant, "the assistant asked", |h| !h.is_empty()).await;
    drop(server);
    assert!(first.await.unwrap().is_err(), "the first request was cut off");

    assistant.set(|_| Reply::json(json!({"action": "transfer", "to": TRANSFER_TO})));
    let server = BinaryServer::start(&data, &env, None).await;
    // Past the first request's deadline and the half second a retry waits beyond it.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let res = client.get(server.url(&path)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let answer = res.text().await.unwrap();
    assert!(answer.contains(&TRANSFER_TO[1..]), "the assistant's answer: {answer}");
    assert_eq!(assistant.hits().len(), 2, "asked again");
    let v: Value = client
        .get(server.url(&format!("/events?phone_id={phone_id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{v}");
    assert_eq!(events[0]["answer"]["source"], "assistant", "{v}");
    assert_eq!(events[0]["answer"]["decision"], json!({"action": "transfer", "to": TRANSFER_TO}), "{v}");
}

/// An assistant whose reply never ends: a body past 64 KiB is given up on there, as a
/// malformed reply, instead of being read (into memory) until the deadline. A second assistant
/// announces a body of a gigabyte, which is refused before any of it is read.
#[tokio::test]
async fn an_assistant_reply_past_64_kib_is_given_up_on_at_once() {
    async fn endless(announce: Option<u64>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/answer", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 8192];
                    let _ = conn.read(&mut request).await;
                    let head = match announce {
                        Some(n) => {
                            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n")
                        }
                        None => {
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                                .into()
                        }
                    };
                    let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    while conn.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        url
    }
    let app = spawn_with(
        Options::default()
            .env("CALLGATE_ANSWER_DEADLINE_MS", "3000")
            .env("CALLGATE_UPSTREAM_SECRET", whsec(&UPSTREAM_SECRET_RAW)),
    )
    .await;
    let org = app.create_org("Acme").await;
    for (i, announce) in [None, Some(1u64 << 30)].into_iter().enumerate() {
        let url = endless(announce).await;
        let line = add_line(
            &app,
            &org,
            Carrier::Plivo,
            &number_for(Carrier::Plivo, i),
            config(Some(STATIC_STREAM), Some(&url)),
        );
        let started = Instant::now();
        let res = incoming_request(&app.client, &app.base, &line, &format!("call-endless-{i}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.text().await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(2_000), "{announce:?}: took {:?}", started.elapsed());
        assert!(body.contains("static.example.com"), "{announce:?}: the number's stream answers: {body}");
        let events = events_of(&app, &org, &line).await;
        assert_eq!(events[0]["answer"]["source"], "fallback", "{announce:?}");
        assert_eq!(events[0]["answer"]["reason"], "malformed_reply", "{announce:?}");
    }
}

/// A status callback carrying the same fields as the answer request is a callback of its own:
/// the hook is in the URL the carrier signed. Exotel signs nothing and Twilio's request here
/// has no idempotency token, so only the hook tells them apart.
#[tokio::test]
async fn a_status_callback_with_the_answer_requests_fields_is_not_taken_for_its_replay() {
    let assistant = fake_assistant().await;
    let app = spawn_with(answer_env(&assistant).await).await;
    let org = app.create_org("Acme").await;
    for (i, carrier) in [Carrier::Exotel, Carrier::Twilio].into_iter().enumerate() {
        let line = add_line(&app, &org, carrier, &number_for(carrier, i), config(Some(STATIC_STREAM), None));
        for hook in ["status", "incoming", "status", "incoming"] {
            let res = request_to(&app.client, &app.base, &line, "call-both", hook).send().await.unwrap();
            assert_eq!(res.status(), 200, "{carrier} {hook}");
        }
        let mut kinds: Vec<String> =
            events_of(&app, &org, &line).await.iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect();
        kinds.sort();
        assert_eq!(kinds, ["call.incoming", "call.status"], "{carrier}");
    }
}

#[tokio::test]
async fn events_recorded_with_no_upstream_wait_and_are_delivered_once_their_number_gets_one() {
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    // No gateway-wide upstream: nothing can take the events yet.
    let app = spawn_with(pinned(&[])).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020009", config(None, None));
    let first = record_status(&app, &org, &line, "CA09", "ringing", 1).await;
    let second = record_status(&app, &org, &line, "CA09", "completed", 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for id in [&first, &second] {
        let d = event(&app, &org, id).await["delivery"].clone();
        assert_eq!(d["state"], "pending");
        assert_eq!(d["attempts"], json!([]));
    }
    assert!(upstream.hits().is_empty());

    // They stay waiting across a restart...
    let app = app.restart().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(upstream.hits().is_empty());
    assert_eq!(event(&app, &org, &first).await["delivery"]["state"], "pending");

    // ...and go, in order, once the number has an upstream.
    let res = set_upstream(&app, &org, &line, Some(&upstream.url("/own"))).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    wait_state(&app, &org, &second, "delivered").await;
    let ids: Vec<String> = upstream.hits_to("/own").iter().map(|h| h.webhook_id()).collect();
    assert_eq!(ids, vec![first.clone(), second.clone()]);
    assert_eq!(wait_state(&app, &org, &first, "delivered").await["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_event_whose_number_loses_its_upstream_waits_parked_untouched_until_it_has_one_again() {
    let first = FakeHttp::start(|_| Reply::status(503)).await;
    let second = FakeHttp::start(|_| Reply::status(200)).await;
    // No gateway-wide upstream: the number's own is all there is.
    let app = spawn_with(pinned(&[])).await;
    let org = app.create_org("Acme").await;
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(first.url("/a"));
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020010", cfg);
    let id = record_status(&app, &org, &line, "CA10", "completed", 1).await;
    let failed = wait_attempts(&app, &org, &id, 1).await;
    assert_eq!(failed["state"], "failed");
    let patch = |url: Value| {
        app.patch(&org, &format!("/phone-numbers/{}", line.phone_id)).json(&json!({"config": {"upstream_url": url}}))
    };

    // The number loses its upstream, then the retry comes due: the event parks, untried and
    // its record untouched (no rewrite with a later time, again and again).
    assert_eq!(patch(Value::Null).send().await.unwrap().status(), 200);
    app.clock.set_ms(T0 + 6_000);
    wait_depth(&app, (0, 1)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(event(&app, &org, &id).await["delivery"], failed);
    assert_eq!(first.hits().len(), 1);

    // A new upstream: it goes there at once.
    assert_eq!(patch(json!(second.url("/b"))).send().await.unwrap().status(), 200);
    let d = wait_state(&app, &org, &id, "delivered").await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(second.hits_to("/b").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [id.as_str()]);
    wait_depth(&app, (0, 0)).await;
    assert_eq!(first.hits().len(), 1);
}

/// A record damaged on disk (a bad sector, a file edited by hand) is passed over: the other
/// events are still listed and delivered, and the damage is counted where operators look.
#[tokio::test]
async fn a_damaged_record_hides_no_other_event_and_holds_up_no_other_delivery() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let mut lines = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let line = add_line(&app, &org, Carrier::Twilio, &format!("+1628202001{i}"), config(None, None));
        ids.push(record_status(&app, &org, &line, &format!("CADAMAGED{i}"), "completed", 1).await);
        lines.push(line);
    }
    // No upstream yet: all three wait parked.
    let (data_dir, mut env) = (app.data_dir.clone(), app.env.clone());
    let _dir = app.stop().await;

    // One byte of the second event's call id flipped: its frame's checksum no longer holds.
    flip_first(&data_dir, b"CADAMAGED1");

    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    env.insert("CALLGATE_UPSTREAM_URL".into(), upstream.url("/hook"));
    let app = spawn_on_with(&data_dir, env).await;
    for i in [0, 2] {
        wait_state(&app, &org, &ids[i], "delivered").await;
    }
    let listed: Value = app.get(&org, "/events").send().await.unwrap().json().await.unwrap();
    let listed: Vec<&str> = listed["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[0].as_str(), ids[2].as_str()]);
    let res = app.get(&org, &format!("/events/{}", ids[1])).send().await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "internal_error");
    let mut delivered: Vec<String> = upstream.hits_to("/hook").iter().map(Hit::webhook_id).collect();
    delivered.sort();
    assert_eq!(delivered, [ids[0].clone(), ids[2].clone()]);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "callgate_journal_damaged_events 1"), "{metrics}");

    // A redelivery that fails on the damaged record frees the call it took before it: kept,
    // that call's deliveries waited for a restart.
    let org_id = callgate::domain::OrgId::parse(&org.id).unwrap();
    let both: Vec<_> =
        ids[..2].iter().map(|id| (org_id.clone(), callgate::domain::EventId::parse(id).unwrap())).collect();
    assert!(callgate::handoff::outbox::redeliver(&app.state, &both).await.is_err());
    let first = ids[0].clone();
    let sent = |n: usize| {
        let first = first.clone();
        move |h: &[Hit]| h.iter().filter(|h| h.webhook_id() == first).count() >= n
    };
    // What it read before the damaged record is redelivered, and its call is free again for the
    // next redelivery.
    wait_hits(&upstream, "the event sent again", sent(2)).await;
    let res = app.post(&org, &format!("/events/{}/redeliver", ids[0])).send().await.unwrap();
    assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    wait_hits(&upstream, "the event sent a third time", sent(3)).await;

    // The carrier sends the damaged event again. The record its replay marker points at cannot
    // be read: it is passed over, and the event recorded anew, where it once failed the whole
    // batch it was written in (everyone's webhooks of that moment).
    assert_eq!(twilio_status(&app.client, &app.base, &lines[1], "CADAMAGED1", "completed", 1).await, 200);
    let listed: Value = app.get(&org, "/events").send().await.unwrap().json().await.unwrap();
    let again = listed["events"].as_array().unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(again[2]["call_id"], "CADAMAGED1");
    app.stop().await;
}

/// A damaged event at the head of its call is passed over on the queue too: left there, it held
/// every later event of its call, and each pass read it again.
#[tokio::test]
async fn a_damaged_event_heading_its_call_holds_up_none_of_the_calls_later_events() {
    let down = FakeHttp::start(|_| Reply::status(503)).await;
    let app = upstream_app(&down, &[]).await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020071", config(None, None));
    let first = record_status(&app, &org, &line, "CAHEAD", "ringing", 1).await;
    wait_state(&app, &org, &first, "failed").await;
    // Behind it in its call: not tried while the first waits for its retry.
    let second = record_status(&app, &org, &line, "CAHEAD", "completed", 2).await;
    let (data_dir, mut env) = (app.data_dir.clone(), app.env.clone());
    let _dir = app.stop().await;

    // One byte of the first event's status flipped: only its first version holds the word.
    flip_first(&data_dir, b"ringing");

    // Started on the system clock, long after the first's retry was due.
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    env.insert("CALLGATE_UPSTREAM_URL".into(), upstream.url("/hook"));
    let app = spawn_on_with(&data_dir, env).await;
    wait_state(&app, &org, &second, "delivered").await;
    assert_eq!(upstream.hits_to("/hook").iter().map(Hit::webhook_id).collect::<Vec<_>>(), [second]);
    app.stop().await;
}

/// Flips a bit of the first byte of `needle` in the stopped server's journal, as a damaged disk
/// or a hand edit would: the frame holding it no longer passes its checksum. The segment's
/// file, and what it now holds.
fn flip_first(data_dir: &Path, needle: &[u8]) -> (std::path::PathBuf, Vec<u8>) {
    let segments = std::fs::read_dir(data_dir.join("db/events")).unwrap().map(|e| e.unwrap().path());
    let (segment, mut bytes, at) = segments
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .find_map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let at = bytes.windows(needle.len()).position(|w| w == needle)?;
            Some((p, bytes, at))
        })
        .expect("the bytes are in the journal");
    bytes[at] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();
    (segment, bytes)
}

/// Runs the binary's `args` on `data_dir`: whether it succeeded, and what it printed.
fn cli(data_dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(args)
        .env_clear()
        .env("CALLGATE_DATA_DIR", data_dir)
        .env("CALLGATE_LOG", "warn")
        .output()
        .expect("run callgate");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The numbers in a line of salvage's output, in order.
fn numbers_in(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).map(|w| w.parse().unwrap()).collect()
}

/// A journal start-up refuses (a damaged record with acknowledged batches after it) is
/// rewritten by `callgate salvage` from every record that still reads back: the other events
/// keep their ids, their order and their delivery, and new ones follow them.
#[tokio::test]
async fn salvage_rewrites_a_damaged_journal_from_every_record_that_reads_back() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020300", config(None, None));
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(record_status(&app, &org, &line, &format!("CASALVAGE{i}"), "completed", 1).await);
    }
    // Delivered on the next start: each event gets later versions that point at its first.
    let (data_dir, mut env) = (app.data_dir.clone(), app.env.clone());
    let _dir = app.stop().await;
    let upstream = FakeHttp::start(|_| Reply::status(200)).await;
    env.insert("CALLGATE_UPSTREAM_URL".into(), upstream.url("/hook"));
    let app = spawn_on_with(&data_dir, env.clone()).await;
    for id in &ids {
        wait_state(&app, &org, id, "delivered").await;
    }
    app.stop().await;

    // One byte of the second event's first version flipped, and the index snapshot gone: a
    // start must read the journal, and refuses it.
    let events = data_dir.join("db/events");
    // Whichever segment holds it: the first may have rolled over before the events came.
    let (segment, bytes) = flip_first(&data_dir, b"CASALVAGE1");
    let name = segment.file_name().unwrap().to_str().unwrap().to_owned();
    let no: u32 = name.trim_end_matches(".log").parse().unwrap();
    std::fs::remove_file(events.join("index.snapshot")).unwrap();
    let (ok, out) = cli(&data_dir, &["check"]);
    assert!(!ok && out.contains(&format!("segment {no} is damaged at byte")), "{out}");
    // What opens the data as a start does (`org list` here) says where the damage is, and what to do.
    let (ok, out) = cli(&data_dir, &["org", "list"]);
    assert!(!ok && out.contains(&format!("segment {no} is damaged at byte")), "{out}");
    assert!(out.contains("Nothing was changed") && out.contains("callgate salvage --dry-run"), "{out}");

    let (ok, out) = cli(&data_dir, &["salvage", "--dry-run"]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(&format!("damaged: segment {no}, ")), "{out}");
    let would = numbers_in(lines[1]);
    // [records, events, dropped, lost]: the damaged record is lost, and the later versions
    // of its event, which need it, are dropped; the other three events keep as many.
    assert_eq!(would.len(), 4, "{out}");
    let (records, events_kept, dropped, lost) = (would[0], would[1], would[2], would[3]);
    assert_eq!((events_kept, lost), (3, 1), "{out}");
    assert!(dropped >= 1 && records == 3 * (1 + dropped), "{out}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "a dry run changes nothing");

    let (ok, out) = cli(&data_dir, &["salvage"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("salvaged: {records} records kept (3 events); {dropped} unreadable")), "{out}");
    let damaged: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("events.damaged-"))
        .collect();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    let kept = data_dir.join(&damaged[0]);
    assert_eq!(std::fs::read(kept.join(&name)).unwrap(), bytes, "the damaged journal is kept as it was");
    let note: Value = serde_json::from_slice(&std::fs::read(events.join("SALVAGED.json")).unwrap()).unwrap();
    assert_eq!(
        (&note["damaged_journal"], &note["events_kept"], &note["records_lost"]),
        (&json!(damaged[0]), &json!(3), &json!(1))
    );
    let (ok, out) = cli(&data_dir, &["check"]);
    assert!(ok, "{out}");

    let app = spawn_on_with(&data_dir, env.clone()).await;
    let listed: Value = app.get(&org, "/events").send().await.unwrap().json().await.unwrap();
    let listed: Vec<&str> = listed["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[0].as_str(), ids[2].as_str(), ids[3].as_str()]);
    for i in [0, 2, 3] {
        let ev = event(&app, &org, &ids[i]).await;
        assert_eq!((&ev["call_id"], &ev["delivery"]["state"]), (&json!(format!("CASALVAGE{i}")), &json!("delivered")));
    }
    let res = app.get(&org, &format!("/events/{}", ids[1])).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let later = record_status(&app, &org, &line, "CASALVAGE4", "completed", 1).await;
    wait_state(&app, &org, &later, "delivered").await;
    let mut delivered: Vec<String> = upstream.hits_to("/hook").iter().map(Hit::webhook_id).collect();
    delivered.sort();
    let mut expected = [ids.clone(), vec![later.clone()]].concat();
    expected.sort();
    assert_eq!(delivered, expected, "nothing kept was delivered again");
    let (ok, out) = cli(&data_dir, &["salvage"]);
    assert!(!ok && out.contains("locked by a running callgate server"), "{out}");
    app.stop().await;
    // What salvages stopped midway leave beside the database is settled by the next one: the
    // damaged journal swapped out but not yet renamed (as here, put back to that state) is
    // renamed, and new journals never swapped in go.
    let midway = data_dir.join(damaged[0].replace("damaged", "salvage"));
    std::fs::rename(&kept, &midway).unwrap();
    // As if it had come from an earlier salvage itself, with that one's note.
    std::fs::write(midway.join("SALVAGED.json"), br#"{"damaged_journal": "events.damaged-1"}"#).unwrap();
    let unfinished = data_dir.join("events.salvage-1700000000");
    std::fs::create_dir(&unfinished).unwrap();
    let not_swapped = data_dir.join("events.salvage-1700000001");
    std::fs::create_dir(&not_swapped).unwrap();
    std::fs::write(not_swapped.join("SALVAGED.json"), br#"{"damaged_journal": "events.damaged-1700000001"}"#).unwrap();
    let (ok, out) = cli(&data_dir, &["salvage"]);
    assert!(ok, "{out}");
    assert!(kept.is_dir() && !midway.exists() && !unfinished.exists() && !not_swapped.exists(), "{out}");
    assert_eq!(std::fs::read(kept.join(&name)).unwrap(), bytes, "{out}");
    assert!(out.contains(&format!("to {}", damaged[0])) && out.contains("events.salvage-1700000000"), "{out}");
    assert!(out.ends_with("nothing to salvage: every record of the journal reads back (4 events)\n"), "{out}");
}

/// A GET is signed over its URL only: a body sent with it is not the carrier's, so it is
/// neither recorded nor a way to make a captured URL count as a new event.
#[tokio::test]
async fn the_body_of_a_signed_get_is_not_taken_for_the_carriers() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020031", config(None, None));
    let params: Vec<(&str, String)> =
        vec![("CallSid", "CAget".into()), ("CallStatus", "completed".into()), ("To", line.number.clone())];
    let hook = format!("/twilio/status/{}?{}", line.phone_id, form_body(&params));
    let sig = twilio_sig::sign_url(&TwilioKey::new(line.token.as_bytes()), &format!("{PUBLIC_URL}{hook}"));
    for (n, body) in [
        (1, r#"{"CallSid":"CAforged","From":"+19990000000","injected":1}"#),
        (2, "CallSid=CAforged&From=%2B19990000000&injected=2"),
        (3, ""),
    ] {
        let res = app
            .client
            .get(app.url(&hook))
            .header("X-Twilio-Signature", &sig)
            .header("content-type", if n == 2 { "application/x-www-form-urlencoded" } else { "application/json" })
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{body}");
    }
    let evs = events_of(&app, &org, &line).await;
    assert_eq!(evs.len(), 1, "one signed URL, one event: {evs:?}");
    assert_eq!(evs[0]["call_id"], "CAget");
    assert_eq!(evs[0]["from"], Value::Null);
    assert_eq!(evs[0]["params"], json!({"CallSid": "CAget", "CallStatus": "completed", "To": line.number}));
}

/// Twilio has no nonce: a callback is the same callback when what its signature covers (the
/// decoded, sorted fields) is the same, however the bytes of its body are arranged.
#[tokio::test]
async fn a_twilio_replay_with_its_body_rearranged_is_not_recorded_again() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let line = add_line(&app, &org, Carrier::Twilio, "+16282020041", config(None, None));
    let params: Vec<(&str, String)> = vec![
        ("CallDuration", "42".into()),
        ("CallSid", "CArearranged".into()),
        ("CallStatus", "completed".into()),
        ("To", line.number.clone()),
    ];
    let hook = format!("/twilio/status/{}", line.phone_id);
    let sig = twilio_sig::sign(&TwilioKey::new(line.token.as_bytes()), &format!("{PUBLIC_URL}{hook}"), &params);
    let to = form_body(&[("To", line.number.clone())]);
    let original = form_body(&params);
    assert!(to.contains("%2B"), "{to}");
    for body in [
        original.clone(),
        format!("{original}&"),
        format!("{to}&CallStatus=completed&CallSid=CArearranged&CallDuration=42"),
        original.replace("%2B", "%2b"),
        format!("{original}&CallDuration=42"),
    ] {
        let res = app
            .client
            .post(app.url(&hook))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("X-Twilio-Signature", &sig)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{body}");
    }
    assert_eq!(events_of(&app, &org, &line).await.len(), 1);
    // A field that changes what is signed is a new callback.
    let mut next = params.clone();
    next[0].1 = "43".into();
    assert_eq!(twilio_callback(&app.client, &app.base, &line, &next).await, 200);
    assert_eq!(events_of(&app, &org, &line).await.len(), 2);
}

/// `call.answered` and `call.hangup` carry no direction, so either party could be the
/// gateway's number; the one on the event's application (`connection_id`) is, even when the
/// other party is a number here too, of another tenant or carrier.
#[tokio::test]
async fn a_telnyx_event_without_direction_goes_to_the_number_on_its_application() {
    let app = spawn_app().await;
    let (one, two) = (app.create_org("One").await, app.create_org("Two").await);
    let on_app = |org: &Org, number: &str, connection: &str| {
        let line = add_line(&app, org, Carrier::Telnyx, number, config(None, None));
        let id = callgate::domain::PhoneId::parse(&line.phone_id).unwrap();
        let mut p = app.state.store.phone_get(&callgate::domain::OrgId::parse(&org.id).unwrap(), &id).unwrap().unwrap();
        p.connection_id = Some(connection.to_owned());
        assert!(app.state.store.phone_update(&p, None).unwrap());
        line
    };
    let first = on_app(&one, "+13125550111", "conn-one");
    let second = on_app(&two, "+13125550122", "conn-two");
    let twilio = add_line(&app, &one, Carrier::Twilio, "+14155550133", config(None, None));
    let event = |id: &str, kind: &str, from: &str, to: &str, connection: &str| {
        json!({"data": {"event_type": kind, "id": id, "record_type": "event", "payload": {
            "call_control_id": format!("v3:{id}"), "connection_id": connection, "from": from, "to": to,
            "state": "hangup", "hangup_cause": "normal_clearing"}}})
        .to_string()
    };
    // One's outgoing call to Two's number, and to a Twilio number of One's own.
    let sent = [
        event("e1", "call.hangup", &first.number, &second.number, "conn-one"),
        event("e2", "call.answered", &first.number, &twilio.number, "conn-one"),
        event("e3", "call.hangup", &second.number, &first.number, "conn-two"),
    ];
    for body in sent {
        assert_eq!(send_telnyx(&app, body).await.0, 200);
    }
    let ids = |evs: Vec<Value>| evs.iter().map(|e| e["call_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(ids(events_of(&app, &one, &first).await), ["v3:e1", "v3:e2"]);
    assert_eq!(ids(events_of(&app, &two, &second).await), ["v3:e3"]);
    assert!(events_of(&app, &one, &twilio).await.is_empty());
}

/// A call between numbers of two accounts here, neither on a known application, is signed by
/// whichever account the event is for: both parties' keys are tried, so neither account's
/// events are refused, and a key of neither still is.
#[tokio::test]
async fn a_telnyx_event_between_two_accounts_here_is_verified_by_either_partys_key() {
    let app = spawn_app().await;
    let (one, two) = (app.create_org("One").await, app.create_org("Two").await);
    let keys =
        [SigningKey::from_bytes(&[21; 32]), SigningKey::from_bytes(&[22; 32]), SigningKey::from_bytes(&[24; 32])];
    let with_key = |org: &Org, number: &str, key: &SigningKey| {
        let credential = json!({"api_key": TELNYX_API_KEY, "public_key": B64.encode(key.verifying_key().as_bytes())});
        insert_phone(
            app.state.store.as_ref(),
            &app.state.vault,
            &org.id,
            Carrier::Telnyx,
            number,
            &credential,
            config(None, None),
            app.clock.now_ms(),
        )
    };
    let a = with_key(&one, "+13125550171", &keys[0]);
    let b = with_key(&two, "+13125550172", &keys[1]);
    // A number of a third account, on a known application, that is neither party of the call.
    let mut c = with_key(&two, "+13125550173", &keys[2]);
    c.connection_id = Some("conn-c".into());
    assert!(app.state.store.phone_update(&c, None).unwrap());
    let send = |id: &str, key: &SigningKey, from: &str, to: &str, connection: &str| {
        let body = json!({"data": {"event_type": "call.hangup", "id": id, "record_type": "event", "payload": {
            "call_control_id": format!("v3:{id}"), "connection_id": connection, "from": from,
            "to": to, "state": "hangup", "hangup_cause": "normal_clearing"}}})
        .to_string();
        send_telnyx_signed(&app, body, key.clone())
    };
    let (an, bn) = (a.number.as_str(), b.number.as_str());
    // Two's leg (signed by Two, `from` its number), then One's.
    assert_eq!(send("e-two", &keys[1], bn, an, "conn-unknown").await.status(), 200);
    assert_eq!(send("e-one", &keys[0], bn, an, "conn-unknown").await.status(), 200);
    // The event of the application's own number, which One's number (`to`) comes before.
    assert_eq!(send("e-app", &keys[2], "+13125550999", an, "conn-c").await.status(), 200);
    let refused = send("e-none", &SigningKey::from_bytes(&[23; 32]), bn, an, "conn-unknown").await;
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"]["code"], "invalid_signature");
    for (org, phone, id) in [(&one, &a, "v3:e-one"), (&two, &b, "v3:e-two"), (&two, &c, "v3:e-app")] {
        let line = Line {
            carrier: Carrier::Telnyx,
            phone_id: phone.id.to_string(),
            number: String::new(),
            token: String::new(),
        };
        let evs = events_of(&app, org, &line).await;
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert_eq!((&evs[0]["call_id"], &evs[0]["verified_by"]["scheme"]), (&json!(id), &json!("telnyx-ed25519")));
    }
}

/// Two tenants on one Telnyx account share its key, so the signature cannot say whose leg an
/// event without direction is. The leg's first event, which says its direction, does: each
/// leg's hang-up goes to the number its `call.initiated` was for, whichever party comes first.
#[tokio::test]
async fn a_telnyx_legs_later_events_go_to_the_number_its_first_event_was_for() {
    let app = spawn_app().await;
    let (one, two) = (app.create_org("One").await, app.create_org("Two").await);
    // Both with the account's one key, neither on a known application.
    let a = add_line(&app, &one, Carrier::Telnyx, "+13125550181", config(None, None));
    let b = add_line(&app, &two, Carrier::Telnyx, "+13125550182", config(None, None));
    let event = |kind: &str, id: &str, leg: &str, direction: Option<&str>| {
        let mut payload = json!({"call_control_id": leg, "connection_id": "conn-shared", "from": a.number,
            "to": b.number, "state": "parked"});
        if let Some(d) = direction {
            payload["direction"] = json!(d);
        }
        json!({"data": {"event_type": kind, "id": id, "record_type": "event", "payload": payload}}).to_string()
    };
    // One calls Two: One's leg is outgoing, Two's incoming, and each ends with a hang-up that
    // names Two's number first.
    let sent = [
        event("call.initiated", "e1", "v3:leg-one", Some("outgoing")),
        event("call.initiated", "e2", "v3:leg-two", Some("incoming")),
        event("call.hangup", "e3", "v3:leg-one", None),
        event("call.hangup", "e4", "v3:leg-two", None),
        // What can follow a hang-up still knows its leg.
        event("call.recording.saved", "e5", "v3:leg-one", None),
    ];
    for body in sent {
        assert_eq!(send_telnyx(&app, body).await.0, 200);
    }
    let kinds = |evs: Vec<Value>| {
        evs.iter()
            .map(|e| (e["call_id"].as_str().unwrap().to_owned(), e["kind"].as_str().unwrap().to_owned()))
            .collect::<Vec<_>>()
    };
    let of = |leg: &str, kinds: &[&str]| kinds.iter().map(|k| (leg.to_owned(), (*k).to_owned())).collect::<Vec<_>>();
    assert_eq!(
        kinds(events_of(&app, &one, &a).await),
        of("v3:leg-one", &["call.initiated", "call.hangup", "call.recording.saved"])
    );
    assert_eq!(kinds(events_of(&app, &two, &b).await), of("v3:leg-two", &["call.incoming", "call.hangup"]));
    assert_eq!(app.state.telnyx_legs.len(), 2);
}

/// The lookup by application finds the one number on it, none where several share it, and
/// follows the numbers as they are changed.
#[tokio::test]
async fn numbers_are_found_by_their_application_and_the_index_follows_changes() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let store = app.state.store.as_ref();
    let org_id = callgate::domain::OrgId::parse(&org.id).unwrap();
    let on = |line: &Line, connection: Option<&str>| {
        let id = callgate::domain::PhoneId::parse(&line.phone_id).unwrap();
        let mut p = store.phone_get(&org_id, &id).unwrap().unwrap();
        p.connection_id = connection.map(str::to_owned);
        assert!(store.phone_update(&p, None).unwrap());
    };
    let found = |connection: &str| {
        store.phone_by_connection(Carrier::Telnyx, connection).unwrap().map(|p| p.number.as_str().to_owned())
    };
    let a = add_line(&app, &org, Carrier::Telnyx, "+13125550151", config(None, None));
    let b = add_line(&app, &org, Carrier::Telnyx, "+13125550152", config(None, None));
    assert_eq!(found("conn-a"), None);
    on(&a, Some("conn-a"));
    on(&b, Some("conn-b"));
    assert_eq!((found("conn-a"), found("conn-b")), (Some(a.number.clone()), Some(b.number.clone())));
    assert!(store.phone_by_connection(Carrier::Twilio, "conn-a").unwrap().is_none(), "another carrier's");
    on(&b, Some("conn-a"));
    assert_eq!((found("conn-a"), found("conn-b")), (None, None), "shared: it names neither");
    on(&a, None);
    assert_eq!(found("conn-a"), Some(b.number.clone()));
}

/// A nonce is a replay only on the number it was used on: a signed event of another number,
/// of this organization or another, that happens to repeat it is recorded.
#[tokio::test]
async fn a_nonce_repeated_on_another_number_is_not_taken_for_a_replay() {
    let app = spawn_app().await;
    let (one, two) = (app.create_org("One").await, app.create_org("Two").await);
    let lines = [
        (&one, add_line(&app, &one, Carrier::Plivo, "+918035550161", config(None, None))),
        (&one, add_line(&app, &one, Carrier::Plivo, "+918035550162", config(None, None))),
        (&two, add_line(&app, &two, Carrier::Plivo, "+918035550163", config(None, None))),
    ];
    let n = nonce();
    let send = |line: &Line, call: &str| {
        let hook = format!("/plivo/status/{}", line.phone_id);
        let params: Vec<(&str, String)> = vec![
            ("CallUUID", call.to_owned()),
            ("CallStatus", "completed".into()),
            ("Event", "Hangup".into()),
            ("To", line.number.trim_start_matches('+').to_owned()),
        ];
        let key = PlivoKey::new(line.token.as_bytes());
        let sig = plivo_sig::sign_v3(&key, Method::Post, &format!("{PUBLIC_URL}{hook}"), &params, &n).unwrap();
        app.client
            .post(app.url(&hook))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("X-Plivo-Signature-V3", sig)
            .header("X-Plivo-Signature-V3-Nonce", n.clone())
            .body(form_body(&params))
    };
    for (i, (_, line)) in lines.iter().enumerate() {
        let res = send(line, &format!("call-{i}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // The same request again on the first number is the replay.
    assert_eq!(send(&lines[0].1, "call-0").send().await.unwrap().status(), 200);
    for (i, (org, line)) in lines.iter().enumerate() {
        let evs = events_of(&app, org, line).await;
        assert_eq!(evs.len(), 1, "line {i}");
        assert_eq!(evs[0]["call_id"], format!("call-{i}"));
    }
}

/// An upstream that answers but refuses each event (here 422) keeps its events queued for their retries
/// for as long as the delivery horizon. Thousands of them once took all the queue's room, so a
/// held upstream's parked events were never released, not even for its probe, and it stayed held.
#[tokio::test]
async fn events_queued_for_retries_leave_room_for_another_upstreams_parked_events() {
    let refusing = FakeHttp::start(|_| Reply::status(422)).await;
    let (recovering, up) = down_until_up(200).await;
    let app = upstream_app(&recovering, &[]).await;
    let (tenant, other) = (app.create_org("Refused").await, app.create_org("Recovering").await);
    let mut cfg = config(None, None);
    cfg.upstream_url = Some(refusing.url("/refuse"));
    let refused = add_line(&app, &tenant, Carrier::Twilio, "+16282020061", cfg);
    // More than the queue's room (4,096), each its own call, each tried once.
    let backlog = 4_100;
    let calls: Vec<String> = (0..backlog).map(|i| format!("CAREF{i}")).collect();
    for chunk in calls.chunks(50) {
        let posts = chunk.iter().map(|call| twilio_status(&app.client, &app.base, &refused, call, "completed", 1));
        assert!(futures_util::future::join_all(posts).await.iter().all(|s| *s == 200));
    }
    wait_hits_within(&refusing, "every refused event tried", Duration::from_secs(60), |h| h.len() >= backlog).await;
    let line = add_line(&app, &other, Carrier::Twilio, "+16282020062", config(None, None));
    // Five failures hold the upstream; what comes after waits parked.
    let mut failing = Vec::new();
    for i in 0..5 {
        failing.push(record_status(&app, &other, &line, &format!("CAFAIL{i}"), "completed", 1).await);
    }
    for id in &failing {
        wait_state(&app, &other, id, "failed").await;
    }
    // The breaker hears of an attempt just after its outcome is recorded (the same task, once
    // woken: a second is far more than that takes on a loaded machine).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut parked = Vec::new();
    for i in 0..3 {
        parked.push(record_status(&app, &other, &line, &format!("CAPARK{i}"), "completed", 1).await);
    }
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&text, "callgate_outbox_retrying"), backlog as u64 + 5, "{text}");
    // The upstream answers again; its probe is due after a second.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    app.clock.set_ms(app.clock.now_ms() + 1_100);
    for id in &parked {
        wait_state(&app, &other, id, "delivered").await;
    }
    assert_eq!(refusing.hits().len(), backlog, "no retry was due yet");
}
