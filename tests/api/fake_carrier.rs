//! A fake of the five carriers' REST APIs: their real paths, auth checks, error bodies,
//! list shapes and pagination, and the endpoints auto-configuration uses, with switchable
//! failure modes. Every request is recorded so a test can assert exactly what was sent.
//!
//! ```ignore
//! let fake = FakeCarrier::start().await;
//! fake.add_account(Carrier::Plivo, json!({"auth_id": "MA1", "auth_token": "t"}), ["+14155550100"]);
//! fake.set_page_size(2);
//! let api = ProviderApi::new(fake.carrier_urls(), Duration::from_secs(5)).unwrap();
//! ```

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use callgate::carriers::rest::CarrierUrls;
use callgate::domain::Carrier;

/// How the fake answers every request until changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Ok,
    /// 401 with the carrier's real error body, whatever the credentials.
    Unauthorized,
    /// 401 whose error text quotes the presented secret, as a careless API might.
    UnauthorizedEcho,
    /// 500 with the carrier's error body.
    ServerError,
    /// 200 with an HTML body.
    Garbage,
    /// 200 with JSON that has none of the carrier's fields.
    WrongShape,
    /// Answers only after [`HANG`], far past any client timeout.
    Hang,
    /// 429 with `Retry-After: 17`.
    RateLimited,
    /// As `Ok`, after [`SLOW`]: long enough for another request to come in meanwhile.
    Slow,
}

pub const SLOW: Duration = Duration::from_millis(600);

pub const HANG: Duration = Duration::from_secs(30);

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// As sent, still percent-encoded.
    pub path: String,
    /// Raw query string, "" if none.
    pub query: String,
    /// Every header, names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    /// The JSON body; panics if there is none.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("{} {} has no JSON body: {:?}", self.method, self.path, self.body))
    }

    /// The form-encoded body, in order.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.body.as_bytes()).into_owned().collect()
    }

    /// The decoded query, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.query.as_bytes()).into_owned().collect()
    }
}

/// A number as the fake carrier stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeNumber {
    pub id: String,
    /// As given to `add_account`; may be deliberately malformed.
    pub number: String,
    pub friendly_name: String,
    /// Plivo / Vobiz application.
    pub app_id: Option<String>,
    /// Telnyx connection (Call Control application).
    pub connection_id: Option<String>,
    pub voice_url: Option<String>,
    pub voice_method: String,
    pub status_callback: Option<String>,
    pub status_callback_method: String,
    pub voice_application_sid: Option<String>,
    pub trunk_sid: Option<String>,
}

/// A Plivo / Vobiz application or a Telnyx Call Control application (its
/// `webhook_event_url` is `answer_url`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeApp {
    pub id: String,
    pub name: String,
    pub answer_url: String,
    pub answer_method: String,
    pub hangup_url: String,
    pub hangup_method: String,
    pub webhook_api_version: String,
}

struct Account {
    carrier: Carrier,
    /// The id in the URL path (auth_id / account sid); empty for Telnyx.
    path_id: String,
    /// The Basic-auth user or X-Auth-ID; empty for Telnyx.
    user: String,
    secret: String,
    /// Further secrets the account accepts (a token rotated on the carrier's side).
    also: Vec<String>,
    numbers: Vec<FakeNumber>,
    apps: Vec<FakeApp>,
}

#[derive(Default)]
struct State {
    accounts: Vec<Account>,
    mode: Mode,
    /// Switches to this mode once this many requests have been answered.
    mode_after: Option<(usize, Mode)>,
    page_size: Option<usize>,
    /// Twilio's listing links each page to itself as its next page, as a broken API might.
    circling: bool,
    requests: Vec<Recorded>,
    next_id: u64,
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

type Shared = web::Data<Mutex<State>>;

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A failed assertion in one handler must not poison the fake for the rest of the test.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct FakeCarrier {
    state: Shared,
    base_url: String,
    handle: ServerHandle,
}

impl Drop for FakeCarrier {
    fn drop(&mut self) {
        // `stop` sends the command at once; the returned future only waits for completion.
        drop(self.handle.stop(false));
    }
}

impl FakeCarrier {
    /// Binds 127.0.0.1 on a free port and serves from the current tokio runtime.
    pub async fn start() -> FakeCarrier {
        let state: Shared = web::Data::new(Mutex::new(State::default()));
        let data = state.clone();
        let server = HttpServer::new(move || App::new().app_data(data.clone()).default_service(web::to(handle)))
            .workers(1)
            .disable_signals()
            .shutdown_timeout(0)
            .bind(("127.0.0.1", 0))
            .expect("bind the fake carrier");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        FakeCarrier { state, base_url: format!("http://{addr}"), handle }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Every carrier, Exotel included, pointed at this fake.
    pub fn carrier_urls(&self) -> CarrierUrls {
        CarrierUrls {
            plivo: self.base_url(),
            vobiz: self.base_url(),
            twilio: self.base_url(),
            telnyx: self.base_url(),
            exotel: Some(self.base_url()),
        }
    }

    /// Registers an account; `credentials` has the shape `PhoneCredential::parse` takes.
    pub fn add_account<S: Into<String>>(
        &self,
        carrier: Carrier,
        credentials: Value,
        numbers: impl IntoIterator<Item = S>,
    ) {
        let field = |name: &str| {
            credentials[name].as_str().unwrap_or_else(|| panic!("{carrier} credential lacks {name}")).to_owned()
        };
        let (path_id, user, secret) = match carrier {
            Carrier::Plivo | Carrier::Vobiz => (field("auth_id"), field("auth_id"), field("auth_token")),
            Carrier::Twilio => (field("account_sid"), field("account_sid"), field("auth_token")),
            Carrier::Exotel => (field("account_sid"), field("api_key"), field("api_token")),
            Carrier::Telnyx => (String::new(), String::new(), field("api_key")),
        };
        let mut st = lock(&self.state);
        let mut list = Vec::new();
        for (i, number) in numbers.into_iter().enumerate() {
            let number: String = number.into();
            let n = st.next_id();
            let id = match carrier {
                Carrier::Plivo => number.trim_start_matches('+').to_owned(),
                Carrier::Vobiz => format!("{:08x}-0000-4000-8000-{:012x}", n, i),
                Carrier::Twilio => format!("PN{n:032x}"),
                Carrier::Telnyx => format!("{}", 1_293_384_261_075_731_000u64 + n),
                Carrier::Exotel => format!("{n:032x}"),
            };
            list.push(FakeNumber {
                id,
                number,
                friendly_name: format!("Line {}", i + 1),
                app_id: None,
                connection_id: None,
                voice_url: None,
                voice_method: "POST".to_owned(),
                status_callback: None,
                status_callback_method: "POST".to_owned(),
                voice_application_sid: None,
                trunk_sid: None,
            });
        }
        st.accounts.push(Account { carrier, path_id, user, secret, also: Vec::new(), numbers: list, apps: Vec::new() });
    }

    /// The carrier's first account also accepts `secret`, as after a rotation on its side.
    pub fn accept_also(&self, carrier: Carrier, secret: &str) {
        let mut st = lock(&self.state);
        let account = st.accounts.iter_mut().find(|a| a.carrier == carrier).expect("an account of the carrier");
        account.also.push(secret.to_owned());
    }

    pub fn set_mode(&self, mode: Mode) {
        let mut st = lock(&self.state);
        st.mode = mode;
        st.mode_after = None;
    }

    /// Answers the next `requests` requests as now, then switches to `mode`: a failure on
    /// a later page.
    pub fn set_mode_after(&self, requests: usize, mode: Mode) {
        let mut st = lock(&self.state);
        st.mode_after = Some((st.requests.len() + requests, mode));
    }

    /// Caps every page at `n` items, whatever size the client asked for.
    pub fn set_page_size(&self, n: usize) {
        assert!(n > 0);
        lock(&self.state).page_size = Some(n);
    }

    /// Has Twilio's number listing give each page itself as the next one, forever.
    pub fn set_circling_pages(&self) {
        lock(&self.state).circling = true;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    /// The numbers of every account of `carrier`.
    pub fn numbers(&self, carrier: Carrier) -> Vec<FakeNumber> {
        let st = lock(&self.state);
        st.accounts.iter().filter(|a| a.carrier == carrier).flat_map(|a| a.numbers.clone()).collect()
    }

    /// The number `number` (as given to `add_account`) of `carrier`.
    pub fn number(&self, carrier: Carrier, number: &str) -> FakeNumber {
        self.numbers(carrier)
            .into_iter()
            .find(|n| n.number == number)
            .unwrap_or_else(|| panic!("no {carrier} number {number}"))
    }

    pub fn applications(&self, carrier: Carrier) -> Vec<FakeApp> {
        let st = lock(&self.state);
        st.accounts.iter().filter(|a| a.carrier == carrier).flat_map(|a| a.apps.clone()).collect()
    }

    /// Changes a number on the carrier's side, e.g. binds a Twilio number to a trunk.
    pub fn update_number(&self, carrier: Carrier, number: &str, f: impl FnOnce(&mut FakeNumber)) {
        let mut st = lock(&self.state);
        let n = st
            .accounts
            .iter_mut()
            .filter(|a| a.carrier == carrier)
            .flat_map(|a| a.numbers.iter_mut())
            .find(|n| n.number == number)
            .unwrap_or_else(|| panic!("no {carrier} number {number}"));
        f(n);
    }

    /// Deletes an application of `carrier`'s accounts, as the customer might in the console.
    pub fn remove_application(&self, carrier: Carrier, id: &str) {
        let mut st = lock(&self.state);
        for account in st.accounts.iter_mut().filter(|a| a.carrier == carrier) {
            account.apps.retain(|a| a.id != id);
        }
    }

    /// Creates an application (Telnyx: Call Control application) in the first account of
    /// `carrier`, as if the customer had made it; returns its id.
    pub fn add_application(&self, carrier: Carrier, name: &str, answer_url: &str, hangup_url: &str) -> String {
        let mut st = lock(&self.state);
        let n = st.next_id();
        let id = app_id(carrier, n);
        let account =
            st.accounts.iter_mut().find(|a| a.carrier == carrier).unwrap_or_else(|| panic!("no {carrier} account"));
        account.apps.push(FakeApp {
            id: id.clone(),
            name: name.to_owned(),
            answer_url: answer_url.to_owned(),
            answer_method: "POST".to_owned(),
            hangup_url: hangup_url.to_owned(),
            hangup_method: "POST".to_owned(),
            webhook_api_version: "2".to_owned(),
        });
        id
    }
}

fn app_id(carrier: Carrier, n: u64) -> String {
    match carrier {
        Carrier::Telnyx => format!("{}", 1_293_384_261_075_732_000u64 + n),
        Carrier::Twilio => format!("AP{n:032x}"),
        _ => format!("{}", 20_468_599_130_939_000u64 + n),
    }
}

// ---------------------------------------------------------------------------------------
// Serving

async fn handle(req: HttpRequest, body: web::Bytes, state: Shared) -> HttpResponse {
    let recorded = Recorded {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let slow;
    let response = {
        let mut st = lock(&state);
        slow = st.mode == Mode::Slow;
        if let Some((after, mode)) = st.mode_after {
            if st.requests.len() >= after {
                st.mode = mode;
                st.mode_after = None;
            }
        }
        st.requests.push(recorded.clone());
        if st.mode == Mode::Hang {
            None
        } else {
            Some(route(&mut st, &recorded))
        }
    };
    if slow {
        tokio::time::sleep(SLOW).await;
    }
    match response {
        Some(r) => r,
        None => {
            tokio::time::sleep(HANG).await;
            HttpResponse::Ok().json(json!({}))
        }
    }
}

fn reply(status: u16, body: Value) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).expect("valid status")).json(body)
}

fn api_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn route(st: &mut State, req: &Recorded) -> HttpResponse {
    let path = req.path.strip_prefix('/').unwrap_or(&req.path);
    let segs: Vec<&str> = path.split('/').collect();
    let (carrier, path_id, rest): (Carrier, &str, &[&str]) = match segs.as_slice() {
        ["v1", "Account", id, rest @ ..] => (Carrier::Plivo, *id, rest),
        ["api", "v1", "Account", id, rest @ ..] => (Carrier::Vobiz, *id, rest),
        ["2010-04-01", "Accounts", sid, rest @ ..] => (Carrier::Twilio, *sid, rest),
        ["v2_beta", "Accounts", sid, rest @ ..] => (Carrier::Exotel, *sid, rest),
        ["v2", rest @ ..] => (Carrier::Telnyx, "", rest),
        _ => return HttpResponse::NotFound().body("no such carrier path"),
    };
    match st.mode {
        Mode::Unauthorized => return unauthorized(carrier, req, None),
        Mode::UnauthorizedEcho => {
            let presented = presented_secret(carrier, req).unwrap_or_else(|| "<none>".to_owned());
            return unauthorized(carrier, req, Some(&presented));
        }
        Mode::ServerError => return server_error(carrier, req),
        Mode::Garbage => {
            return HttpResponse::Ok().content_type("text/html").body("<html><body><h1>Bad Gateway</h1></body></html>")
        }
        Mode::WrongShape => return reply(200, json!({"status": "ok", "result": []})),
        Mode::RateLimited => {
            return HttpResponse::TooManyRequests()
                .insert_header(("Retry-After", "17"))
                .json(json!({"message": "Too Many Requests"}))
        }
        Mode::Ok | Mode::Hang | Mode::Slow => {}
    }
    let Some(idx) = authenticate(st, carrier, path_id, req) else {
        return unauthorized(carrier, req, None);
    };
    let (cap, circling) = (st.page_size, st.circling);
    let n = st.next_id();
    let account = &mut st.accounts[idx];
    let method = req.method.as_str();
    match carrier {
        Carrier::Plivo => plivo(account, method, rest, req, cap, n),
        Carrier::Vobiz => vobiz(account, method, rest, req, cap, n),
        Carrier::Twilio => twilio(account, method, rest, req, cap, circling),
        Carrier::Telnyx => telnyx(account, method, rest, req, cap, n),
        Carrier::Exotel => exotel(account, method, rest, req, cap),
    }
}

fn basic_auth(req: &Recorded) -> Option<(String, String)> {
    let encoded = req.header("authorization")?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(B64.decode(encoded).ok()?).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

fn presented_secret(carrier: Carrier, req: &Recorded) -> Option<String> {
    match carrier {
        Carrier::Plivo | Carrier::Twilio | Carrier::Exotel => basic_auth(req).map(|(_, p)| p),
        Carrier::Vobiz => req.header("x-auth-token").map(str::to_owned),
        Carrier::Telnyx => req.header("authorization")?.strip_prefix("Bearer ").map(str::to_owned),
    }
}

fn authenticate(st: &State, carrier: Carrier, path_id: &str, req: &Recorded) -> Option<usize> {
    let (user, secret) = match carrier {
        Carrier::Plivo | Carrier::Twilio | Carrier::Exotel => basic_auth(req)?,
        Carrier::Vobiz => (req.header("x-auth-id")?.to_owned(), req.header("x-auth-token")?.to_owned()),
        Carrier::Telnyx => (String::new(), req.header("authorization")?.strip_prefix("Bearer ")?.to_owned()),
    };
    st.accounts.iter().position(|a| {
        a.carrier == carrier
            && a.user == user
            && (a.secret == secret || a.also.contains(&secret))
            && a.path_id == path_id
    })
}

fn unauthorized(carrier: Carrier, req: &Recorded, echo: Option<&str>) -> HttpResponse {
    let (body, realm) = match carrier {
        Carrier::Plivo => (
            json!({"api_id": api_id(), "error": echo.map_or("Authentication failed".to_owned(), |s| format!("invalid auth token {s}"))}),
            Some("Basic realm=\"Plivo\""),
        ),
        Carrier::Vobiz => (
            json!({"api_id": api_id(), "error": echo.map_or("Invalid X-Auth-ID or X-Auth-Token".to_owned(), |s| format!("invalid token {s}"))}),
            None,
        ),
        Carrier::Twilio => (
            json!({
                "code": 20003,
                "detail": "Your AccountSid or AuthToken was incorrect.",
                "message": echo.map_or("Authenticate".to_owned(), |s| format!("Authenticate with {s} failed")),
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            }),
            Some("Basic realm=\"Twilio API\""),
        ),
        Carrier::Telnyx => (
            json!({"errors": [{
                "code": "10009",
                "title": "Authentication failed",
                "detail": echo.map_or("The API key looks malformed. Check that you copied it correctly.".to_owned(), |s| format!("The API key {s} is not valid.")),
                "meta": {"url": "https://developers.telnyx.com/docs/overview/errors/10009"},
            }]}),
            None,
        ),
        Carrier::Exotel => (
            json!({
                "request_id": api_id(),
                "method": req.method,
                "http_code": 401,
                "response": {
                    "code": 401,
                    "error_data": {
                        "code": 1010,
                        "message": "Authentication failed",
                        "description": echo.map_or("Authentication is required to view this page.".to_owned(), |s| format!("Token {s} is not valid")),
                    },
                    "status": "failure",
                    "data": null,
                },
            }),
            Some("Basic realm=\"Exotel\""),
        ),
    };
    let mut resp = HttpResponse::Unauthorized();
    if let Some(realm) = realm {
        resp.insert_header(("WWW-Authenticate", realm));
    }
    resp.json(body)
}

fn server_error(carrier: Carrier, req: &Recorded) -> HttpResponse {
    let body = match carrier {
        Carrier::Plivo | Carrier::Vobiz => json!({"api_id": api_id(), "error": "internal server error"}),
        Carrier::Twilio => json!({
            "code": 20500,
            "message": "Internal Server Error",
            "more_info": "https://www.twilio.com/docs/errors/20500",
            "status": 500,
        }),
        Carrier::Telnyx => {
            json!({"errors": [{"code": "10007", "title": "Unexpected error", "detail": "An unexpected error occured."}]})
        }
        Carrier::Exotel => json!({
            "request_id": api_id(), "method": req.method, "http_code": 500,
            "response": {"code": 500, "error_data": {"code": 1000, "message": "Internal error", "description": "Internal error"}, "status": "failure", "data": null},
        }),
    };
    reply(500, body)
}

fn not_found(carrier: Carrier, req: &Recorded) -> HttpResponse {
    let body = match carrier {
        Carrier::Plivo | Carrier::Vobiz => json!({"api_id": api_id(), "error": "not found"}),
        Carrier::Twilio => json!({
            "code": 20404,
            "message": format!("The requested resource {} was not found", req.path),
            "more_info": "https://www.twilio.com/docs/errors/20404",
            "status": 404,
        }),
        Carrier::Telnyx => {
            json!({"errors": [{"code": "10005", "title": "Resource not found", "detail": "The requested resource or URL could not be found."}]})
        }
        Carrier::Exotel => json!({
            "request_id": api_id(), "method": req.method, "http_code": 404,
            "response": {"code": 404, "error_data": {"code": 1002, "message": "Not found", "description": "Resource not found"}, "status": "failure", "data": null},
        }),
    };
    reply(404, body)
}

fn bad_request(carrier: Carrier, message: &str) -> HttpResponse {
    match carrier {
        Carrier::Plivo | Carrier::Vobiz => reply(400, json!({"api_id": api_id(), "error": message})),
        Carrier::Twilio => reply(
            400,
            json!({"code": 21502, "message": message, "more_info": "https://www.twilio.com/docs/errors/21502", "status": 400}),
        ),
        Carrier::Telnyx => {
            reply(422, json!({"errors": [{"code": "10015", "title": "Invalid value", "detail": message}]}))
        }
        Carrier::Exotel => reply(
            400,
            json!({"http_code": 400, "response": {"code": 400, "error_data": {"code": 1001, "message": message, "description": message}, "status": "failure", "data": null}}),
        ),
    }
}

fn query(req: &Recorded) -> BTreeMap<String, String> {
    req.query_pairs().into_iter().collect()
}

/// A numeric query parameter: `default` if absent, `Err` if malformed or outside `range`.
fn param(
    q: &BTreeMap<String, String>,
    name: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, String> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| format!("{name} must be within {range:?}")),
    }
}

fn json_body(req: &Recorded) -> Option<Value> {
    let ct = req.header("content-type")?;
    if !ct.starts_with("application/json") {
        return None;
    }
    serde_json::from_str::<Value>(&req.body).ok().filter(Value::is_object)
}

fn decode(seg: &str) -> String {
    percent_encoding::percent_decode_str(seg).decode_utf8_lossy().into_owned()
}

/// The page `[start, end)` of `len` items, the effective page size being the smaller of
/// what the client asked for and the fake's cap.
fn window(len: usize, start: usize, asked: usize, cap: Option<usize>) -> (usize, usize, usize) {
    let size = cap.map_or(asked, |c| asked.min(c));
    let start = start.min(len);
    (start, (start + size).min(len), size)
}

// --- Plivo and Vobiz --------------------------------------------------------------------

fn plivo(acct: &mut Account, method: &str, rest: &[&str], req: &Recorded, cap: Option<usize>, n: u64) -> HttpResponse {
    let base = format!("/v1/Account/{}/", acct.path_id);
    match (method, rest) {
        ("GET", ["Number", ""]) => {
            let q = query(req);
            let (limit, offset) = match (param(&q, "limit", 20, 1..=20), param(&q, "offset", 0, 0..=usize::MAX)) {
                (Ok(l), Ok(o)) => (l, o),
                (Err(e), _) | (_, Err(e)) => return bad_request(Carrier::Plivo, &e),
            };
            let (start, end, size) = window(acct.numbers.len(), offset, limit, cap);
            let objects: Vec<Value> = acct.numbers[start..end].iter().map(|num| plivo_number(&base, num)).collect();
            reply(
                200,
                json!({"api_id": api_id(), "meta": plivo_meta(&format!("{base}Number/"), acct.numbers.len(), start, end, size), "objects": objects}),
            )
        }
        (_, ["Number", digits, ""]) => {
            let digits = decode(digits);
            let Some(num) = acct.numbers.iter_mut().find(|x| x.number.trim_start_matches('+') == digits) else {
                return not_found(Carrier::Plivo, req);
            };
            match method {
                "GET" => reply(200, plivo_number(&base, num)),
                "POST" => {
                    let Some(body) = json_body(req) else { return bad_request(Carrier::Plivo, "body must be JSON") };
                    match body.get("app_id") {
                        Some(app) => {
                            let app = app.as_str().unwrap_or_default();
                            if !acct.apps.iter().any(|a| a.id == app) {
                                return bad_request(Carrier::Plivo, "app_id is not valid");
                            }
                            num.app_id = Some(app.to_owned());
                        }
                        // Plivo: without app_id the account's default number application is
                        // linked; this account has none.
                        None => num.app_id = None,
                    }
                    if let Some(alias) = body.get("alias").and_then(Value::as_str) {
                        num.friendly_name = alias.to_owned();
                    }
                    reply(202, json!({"api_id": api_id(), "message": "changed"}))
                }
                _ => not_found(Carrier::Plivo, req),
            }
        }
        (_, ["Application", tail @ ..]) => applications(Carrier::Plivo, acct, &base, method, tail, req, cap, n),
        _ => not_found(Carrier::Plivo, req),
    }
}

fn vobiz(acct: &mut Account, method: &str, rest: &[&str], req: &Recorded, cap: Option<usize>, n: u64) -> HttpResponse {
    let base = format!("/api/v1/Account/{}/", acct.path_id);
    match (method, rest) {
        ("GET", ["numbers"]) => {
            let q = query(req);
            let (page, per_page) = match (param(&q, "page", 1, 1..=usize::MAX), param(&q, "per_page", 20, 1..=100)) {
                (Ok(p), Ok(pp)) => (p, pp),
                (Err(e), _) | (_, Err(e)) => return bad_request(Carrier::Vobiz, &e),
            };
            let size = cap.map_or(per_page, |c| per_page.min(c));
            // `search` matches part of the number.
            let search = q.get("search").cloned().unwrap_or_default();
            let numbers: Vec<&FakeNumber> = acct.numbers.iter().filter(|n| n.number.contains(&search)).collect();
            let (start, end, size) = window(numbers.len(), (page - 1).saturating_mul(size), size, None);
            let items: Vec<Value> = numbers[start..end]
                .iter()
                .map(|num| {
                    json!({
                        "id": num.id,
                        "account_id": acct.path_id,
                        "e164": num.number,
                        "country": "IN",
                        "region": "Karnataka",
                        "capabilities": {"voice": true, "sms": false, "mms": false, "fax": false},
                        "status": "active",
                        "provider": "vobiz",
                        "application_id": num.app_id,
                        "voice_enabled": true,
                        "trunk_group_id": null,
                        "tags": [],
                        "setup_fee": 0,
                        "monthly_fee": 500,
                        "currency": "INR",
                        "created_at": "2025-01-02T03:04:05Z",
                        "updated_at": "2025-01-02T03:04:05Z",
                    })
                })
                .collect();
            reply(200, json!({"items": items, "page": page, "per_page": size, "total": numbers.len()}))
        }
        ("DELETE", ["numbers", number, "application"]) => {
            let number = decode(number);
            let Some(num) = acct.numbers.iter_mut().find(|x| x.number == number) else {
                return not_found(Carrier::Vobiz, req);
            };
            num.app_id = None;
            reply(200, json!({"api_id": api_id(), "message": "Application detached from number", "number": number}))
        }
        ("POST", ["numbers", number, "application"]) => {
            let number = decode(number);
            let Some(body) = json_body(req) else { return bad_request(Carrier::Vobiz, "body must be JSON") };
            let app = body["application_id"].as_str().unwrap_or_default().to_owned();
            if !acct.apps.iter().any(|a| a.id == app) {
                return bad_request(Carrier::Vobiz, "application_id is not valid");
            }
            let Some(num) = acct.numbers.iter_mut().find(|x| x.number == number) else {
                return not_found(Carrier::Vobiz, req);
            };
            num.app_id = Some(app.clone());
            reply(
                200,
                json!({"api_id": api_id(), "message": "Application attached to number", "number": number, "application_id": app}),
            )
        }
        (_, ["Application", tail @ ..]) => applications(Carrier::Vobiz, acct, &base, method, tail, req, cap, n),
        _ => not_found(Carrier::Vobiz, req),
    }
}

fn plivo_meta(list_path: &str, total: usize, start: usize, end: usize, size: usize) -> Value {
    let next = (end < total).then(|| format!("{list_path}?limit={size}&offset={end}"));
    let previous = (start > 0).then(|| format!("{list_path}?limit={size}&offset={}", start.saturating_sub(size)));
    json!({"limit": size, "next": next, "offset": start, "previous": previous, "total_count": total})
}

fn plivo_number(base: &str, num: &FakeNumber) -> Value {
    let digits = num.number.trim_start_matches('+');
    json!({
        "added_on": "2024-05-06",
        "alias": num.friendly_name,
        "application": num.app_id.as_ref().map(|a| format!("{base}Application/{a}/")),
        "carrier": "Plivo",
        "city": "San Francisco",
        "country": "UNITED STATES",
        "monthly_rental_rate": "0.50000",
        "number": digits,
        "number_type": "local",
        "region": "California, UNITED STATES",
        "resource_uri": format!("{base}Number/{digits}/"),
        "sms_enabled": true,
        "sub_account": null,
        "voice_enabled": true,
        "active": true,
    })
}

fn plivo_app(base: &str, app: &FakeApp) -> Value {
    json!({
        "answer_method": app.answer_method,
        "answer_url": app.answer_url,
        "app_id": app.id,
        "app_name": app.name,
        "default_app": false,
        "default_endpoint_app": false,
        "enabled": true,
        "fallback_answer_url": "",
        "fallback_method": "POST",
        "hangup_method": app.hangup_method,
        "hangup_url": app.hangup_url,
        "log_incoming_messages": true,
        "message_method": "POST",
        "message_url": "",
        "public_uri": false,
        "resource_uri": format!("{base}Application/{}/", app.id),
        "sip_uri": format!("sip:{}@app.plivo.com", app.id),
        "sub_account": null,
    })
}

/// Plivo's application API, which Vobiz clones.
#[allow(clippy::too_many_arguments)]
fn applications(
    carrier: Carrier,
    acct: &mut Account,
    base: &str,
    method: &str,
    tail: &[&str],
    req: &Recorded,
    cap: Option<usize>,
    n: u64,
) -> HttpResponse {
    let set = |app: &mut FakeApp, body: &Value| {
        for (key, field) in [
            ("answer_url", &mut app.answer_url),
            ("answer_method", &mut app.answer_method),
            ("hangup_url", &mut app.hangup_url),
            ("hangup_method", &mut app.hangup_method),
            ("app_name", &mut app.name),
        ] {
            if let Some(v) = body.get(key).and_then(Value::as_str) {
                *field = v.to_owned();
            }
        }
    };
    match (method, tail) {
        ("GET", [""]) => {
            let q = query(req);
            let (limit, offset) = match (param(&q, "limit", 20, 1..=20), param(&q, "offset", 0, 0..=usize::MAX)) {
                (Ok(l), Ok(o)) => (l, o),
                (Err(e), _) | (_, Err(e)) => return bad_request(carrier, &e),
            };
            let (start, end, size) = window(acct.apps.len(), offset, limit, cap);
            let objects: Vec<Value> = acct.apps[start..end].iter().map(|a| plivo_app(base, a)).collect();
            reply(
                200,
                json!({"api_id": api_id(), "meta": plivo_meta(&format!("{base}Application/"), acct.apps.len(), start, end, size), "objects": objects}),
            )
        }
        ("POST", [""]) => {
            let Some(body) = json_body(req) else { return bad_request(carrier, "body must be JSON") };
            if body["app_name"].as_str().is_none_or(str::is_empty) {
                return bad_request(carrier, "app_name is required");
            }
            let mut app = FakeApp {
                id: app_id(carrier, n),
                name: String::new(),
                answer_url: String::new(),
                answer_method: "POST".to_owned(),
                hangup_url: String::new(),
                hangup_method: "POST".to_owned(),
                webhook_api_version: String::new(),
            };
            set(&mut app, &body);
            let id = app.id.clone();
            acct.apps.push(app);
            reply(201, json!({"api_id": api_id(), "app_id": id, "message": "created"}))
        }
        ("DELETE", [id, ""]) => {
            let Some(i) = acct.apps.iter().position(|a| a.id == *id) else { return not_found(carrier, req) };
            let gone = acct.apps.remove(i).id;
            // Numbers linked to a deleted application are left without one.
            for num in acct.numbers.iter_mut().filter(|x| x.app_id.as_deref() == Some(gone.as_str())) {
                num.app_id = None;
            }
            HttpResponse::NoContent().finish()
        }
        (_, [id, ""]) => {
            let Some(app) = acct.apps.iter_mut().find(|a| a.id == *id) else { return not_found(carrier, req) };
            match method {
                "GET" => reply(200, plivo_app(base, app)),
                "POST" => {
                    let Some(body) = json_body(req) else { return bad_request(carrier, "body must be JSON") };
                    set(app, &body);
                    reply(202, json!({"api_id": api_id(), "message": "changed"}))
                }
                _ => not_found(carrier, req),
            }
        }
        _ => not_found(carrier, req),
    }
}

// --- Twilio ------------------------------------------------------------------------------

fn twilio_number(sid: &str, num: &FakeNumber) -> Value {
    json!({
        "account_sid": sid,
        "address_requirements": "none",
        "api_version": "2010-04-01",
        "beta": false,
        "capabilities": {"voice": true, "sms": true, "mms": true, "fax": false},
        "date_created": "Thu, 30 Jul 2015 23:19:04 +0000",
        "date_updated": "Thu, 30 Jul 2015 23:19:04 +0000",
        "emergency_status": "Inactive",
        "friendly_name": num.friendly_name,
        "identity_sid": null,
        "origin": "twilio",
        "phone_number": num.number,
        "sid": num.id,
        "sms_application_sid": "",
        "sms_method": "POST",
        "sms_url": "",
        "status": "in-use",
        "status_callback": num.status_callback.clone().unwrap_or_default(),
        "status_callback_method": num.status_callback_method,
        "trunk_sid": num.trunk_sid,
        "uri": format!("/2010-04-01/Accounts/{sid}/IncomingPhoneNumbers/{}.json", num.id),
        "voice_application_sid": num.voice_application_sid.clone().unwrap_or_default(),
        "voice_caller_id_lookup": false,
        "voice_fallback_method": "POST",
        "voice_fallback_url": null,
        "voice_method": num.voice_method,
        "voice_url": num.voice_url.clone().unwrap_or_default(),
    })
}

fn twilio(
    acct: &mut Account,
    method: &str,
    rest: &[&str],
    req: &Recorded,
    cap: Option<usize>,
    circling: bool,
) -> HttpResponse {
    let sid = acct.path_id.clone();
    let list = format!("/2010-04-01/Accounts/{sid}/IncomingPhoneNumbers.json");
    match (method, rest) {
        ("GET", ["IncomingPhoneNumbers.json"]) => {
            let q = query(req);
            let (page_size, page) = match (param(&q, "PageSize", 50, 1..=1000), param(&q, "Page", 0, 0..=usize::MAX)) {
                (Ok(s), Ok(p)) => (s, p),
                (Err(e), _) | (_, Err(e)) => return bad_request(Carrier::Twilio, &e),
            };
            let size = cap.map_or(page_size, |c| page_size.min(c));
            let (start, end, size) = window(acct.numbers.len(), page.saturating_mul(size), size, None);
            let items: Vec<Value> = acct.numbers[start..end].iter().map(|num| twilio_number(&sid, num)).collect();
            let page_uri = |p: usize| format!("{list}?PageSize={size}&Page={p}");
            let next = (end < acct.numbers.len())
                .then(|| format!("{}&PageToken=PA{}", page_uri(page + 1), acct.numbers[end].id))
                .or_else(|| circling.then(|| format!("{}?{}", req.path, req.query)));
            reply(
                200,
                json!({
                    "end": end.saturating_sub(1),
                    "first_page_uri": page_uri(0),
                    "incoming_phone_numbers": items,
                    "next_page_uri": next,
                    "page": page,
                    "page_size": size,
                    "previous_page_uri": (page > 0).then(|| page_uri(page - 1)),
                    "start": start,
                    "uri": format!("{}?{}", req.path, req.query),
                }),
            )
        }
        // A TwiML application (`add_application` makes them for Twilio too).
        ("GET", ["Applications", file]) => {
            let Some(app) = file.strip_suffix(".json").and_then(|s| acct.apps.iter().find(|a| a.id == s)) else {
                return not_found(Carrier::Twilio, req);
            };
            reply(
                200,
                json!({"sid": app.id, "account_sid": sid, "friendly_name": app.name, "voice_url": app.answer_url, "voice_method": "POST"}),
            )
        }
        (_, ["IncomingPhoneNumbers", file]) => {
            let Some(pn) = file.strip_suffix(".json") else { return not_found(Carrier::Twilio, req) };
            let Some(num) = acct.numbers.iter_mut().find(|x| x.id == pn) else {
                return not_found(Carrier::Twilio, req);
            };
            match method {
                "GET" => reply(200, twilio_number(&sid, num)),
                "POST" => {
                    if !req.header("content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
                        return bad_request(Carrier::Twilio, "body must be form-encoded");
                    }
                    for (k, v) in req.form() {
                        let opt = (!v.is_empty()).then(|| v.clone());
                        match k.as_str() {
                            "VoiceUrl" => num.voice_url = opt,
                            "VoiceMethod" => num.voice_method = v,
                            "StatusCallback" => num.status_callback = opt,
                            "StatusCallbackMethod" => num.status_callback_method = v,
                            "VoiceApplicationSid" => num.voice_application_sid = opt,
                            "FriendlyName" => num.friendly_name = v,
                            _ => {}
                        }
                    }
                    reply(200, twilio_number(&sid, num))
                }
                _ => not_found(Carrier::Twilio, req),
            }
        }
        _ => not_found(Carrier::Twilio, req),
    }
}

// --- Telnyx ------------------------------------------------------------------------------

fn telnyx_meta(total: usize, page: usize, size: usize) -> Value {
    json!({"page_number": page, "page_size": size, "total_pages": total.div_ceil(size), "total_results": total})
}

fn telnyx_number(acct: &Account, num: &FakeNumber) -> Value {
    let connection_name =
        num.connection_id.as_ref().and_then(|c| acct.apps.iter().find(|a| &a.id == c)).map(|a| a.name.clone());
    json!({
        "id": num.id,
        "record_type": "phone_number",
        "phone_number": num.number,
        "status": "active",
        "tags": [],
        "connection_id": num.connection_id,
        "connection_name": connection_name,
        "customer_reference": null,
        "external_pin": null,
        "messaging_profile_id": null,
        "messaging_profile_name": null,
        "billing_group_id": null,
        "emergency_enabled": false,
        "emergency_address_id": null,
        "call_forwarding_enabled": true,
        "cnam_listing_enabled": false,
        "caller_id_name_enabled": false,
        "call_recording_enabled": false,
        "t38_fax_gateway_enabled": false,
        "phone_number_type": "local",
        "purchased_at": "2024-10-23T18:10:00.000Z",
        "created_at": "2024-10-23T18:10:02.574Z",
        "updated_at": "2024-10-23T18:10:02.574Z",
    })
}

fn telnyx_app(app: &FakeApp) -> Value {
    json!({
        "id": app.id,
        "record_type": "call_control_application",
        "application_name": app.name,
        "webhook_event_url": app.answer_url,
        "webhook_event_failover_url": "",
        "webhook_api_version": app.webhook_api_version,
        "webhook_timeout_secs": null,
        "active": true,
        "anchorsite_override": "Latency",
        "dtmf_type": "RFC 2833",
        "first_command_timeout": false,
        "first_command_timeout_secs": 30,
        "inbound": {"channel_limit": null, "shaken_stir_enabled": false, "sip_subdomain": null, "sip_subdomain_receive_settings": "from_anyone"},
        "outbound": {"channel_limit": null, "outbound_voice_profile_id": null},
        "created_at": "2024-10-23T18:10:02.574Z",
        "updated_at": "2024-10-23T18:10:02.574Z",
    })
}

fn telnyx_paging(q: &BTreeMap<String, String>, cap: Option<usize>) -> Result<(usize, usize), String> {
    let page = param(q, "page[number]", 1, 1..=usize::MAX)?;
    let size = param(q, "page[size]", 20, 1..=250)?;
    Ok((page, cap.map_or(size, |c| size.min(c))))
}

fn telnyx(acct: &mut Account, method: &str, rest: &[&str], req: &Recorded, cap: Option<usize>, n: u64) -> HttpResponse {
    let set = |app: &mut FakeApp, body: &Value| {
        for (key, field) in [
            ("application_name", &mut app.name),
            ("webhook_event_url", &mut app.answer_url),
            ("webhook_api_version", &mut app.webhook_api_version),
        ] {
            if let Some(v) = body.get(key).and_then(Value::as_str) {
                *field = v.to_owned();
            }
        }
    };
    match (method, rest) {
        ("GET", ["phone_numbers"]) => {
            let (page, size) = match telnyx_paging(&query(req), cap) {
                Ok(p) => p,
                Err(e) => return bad_request(Carrier::Telnyx, &e),
            };
            let (start, end, size) = window(acct.numbers.len(), (page - 1).saturating_mul(size), size, None);
            let data: Vec<Value> = acct.numbers[start..end].iter().map(|num| telnyx_number(acct, num)).collect();
            reply(200, json!({"data": data, "meta": telnyx_meta(acct.numbers.len(), page, size)}))
        }
        (_, ["phone_numbers", id]) => {
            let Some(i) = acct.numbers.iter().position(|x| x.id == *id) else { return not_found(Carrier::Telnyx, req) };
            match method {
                "GET" => reply(200, json!({"data": telnyx_number(acct, &acct.numbers[i])})),
                "PATCH" => {
                    let Some(body) = json_body(req) else { return bad_request(Carrier::Telnyx, "body must be JSON") };
                    match body.get("connection_id") {
                        Some(Value::Null) => acct.numbers[i].connection_id = None,
                        Some(conn) => {
                            let conn = conn.as_str().unwrap_or_default().to_owned();
                            if !acct.apps.iter().any(|a| a.id == conn) {
                                return bad_request(Carrier::Telnyx, "connection_id does not exist");
                            }
                            acct.numbers[i].connection_id = Some(conn);
                        }
                        None => {}
                    }
                    reply(200, json!({"data": telnyx_number(acct, &acct.numbers[i])}))
                }
                _ => not_found(Carrier::Telnyx, req),
            }
        }
        ("GET", ["call_control_applications"]) => {
            let q = query(req);
            let (page, size) = match telnyx_paging(&q, cap) {
                Ok(p) => p,
                Err(e) => return bad_request(Carrier::Telnyx, &e),
            };
            let needle = q.get("filter[application_name][contains]").cloned().unwrap_or_default();
            let matching: Vec<&FakeApp> = acct.apps.iter().filter(|a| a.name.contains(&needle)).collect();
            let (start, end, size) = window(matching.len(), (page - 1).saturating_mul(size), size, None);
            let data: Vec<Value> = matching[start..end].iter().map(|a| telnyx_app(a)).collect();
            reply(200, json!({"data": data, "meta": telnyx_meta(matching.len(), page, size)}))
        }
        ("POST", ["call_control_applications"]) => {
            let Some(body) = json_body(req) else { return bad_request(Carrier::Telnyx, "body must be JSON") };
            for required in ["application_name", "webhook_event_url"] {
                if body[required].as_str().is_none_or(str::is_empty) {
                    return bad_request(Carrier::Telnyx, &format!("{required} is required"));
                }
            }
            let mut app = FakeApp {
                id: app_id(Carrier::Telnyx, n),
                name: String::new(),
                answer_url: String::new(),
                answer_method: "POST".to_owned(),
                hangup_url: String::new(),
                hangup_method: "POST".to_owned(),
                webhook_api_version: "1".to_owned(),
            };
            set(&mut app, &body);
            let out = telnyx_app(&app);
            acct.apps.push(app);
            reply(201, json!({"data": out}))
        }
        (_, ["call_control_applications", id]) => {
            let Some(app) = acct.apps.iter_mut().find(|a| a.id == *id) else { return not_found(Carrier::Telnyx, req) };
            match method {
                "GET" => reply(200, json!({"data": telnyx_app(app)})),
                "PATCH" => {
                    let Some(body) = json_body(req) else { return bad_request(Carrier::Telnyx, "body must be JSON") };
                    set(app, &body);
                    reply(200, json!({"data": telnyx_app(app)}))
                }
                _ => not_found(Carrier::Telnyx, req),
            }
        }
        // Any connection, whatever its type; this fake's only connections are applications.
        ("GET", ["connections", id]) => match acct.apps.iter().find(|a| a.id == *id) {
            Some(app) => {
                let mut data = telnyx_app(app);
                data["connection_name"] = json!(app.name);
                reply(200, json!({"data": data}))
            }
            None => not_found(Carrier::Telnyx, req),
        },
        // Call Control commands: answer (with stream fields), reject, transfer.
        ("POST", ["calls", _, "actions", "answer" | "reject" | "transfer"]) => {
            if json_body(req).is_none() {
                return bad_request(Carrier::Telnyx, "body must be JSON");
            }
            reply(200, json!({"data": {"result": "ok"}}))
        }
        _ => not_found(Carrier::Telnyx, req),
    }
}

// --- Exotel ------------------------------------------------------------------------------

fn exotel(acct: &mut Account, method: &str, rest: &[&str], req: &Recorded, cap: Option<usize>) -> HttpResponse {
    let sid = acct.path_id.clone();
    let list = format!("/v2_beta/Accounts/{sid}/IncomingPhoneNumbers");
    match (method, rest) {
        ("GET", ["IncomingPhoneNumbers"]) => {
            let q = query(req);
            let (page, page_size) = match (param(&q, "Page", 0, 0..=usize::MAX), param(&q, "PageSize", 50, 1..=100)) {
                (Ok(p), Ok(s)) => (p, s),
                (Err(e), _) | (_, Err(e)) => return bad_request(Carrier::Exotel, &e),
            };
            let size = cap.map_or(page_size, |c| page_size.min(c));
            let (start, end, size) = window(acct.numbers.len(), page.saturating_mul(size), size, None);
            let items: Vec<Value> = acct.numbers[start..end]
                .iter()
                .map(|num| {
                    json!({
                        "sid": num.id,
                        "account_sid": sid,
                        "friendly_name": num.friendly_name,
                        "phone_number": num.number,
                        "voice_url": num.voice_url,
                        "sms_url": null,
                        "capabilities": {"voice": true, "sms": true},
                        "number_type": "Landline",
                        "region": "KA",
                        "country": "IN",
                        "date_created": "2024-02-01 10:00:00",
                        "date_updated": "2024-02-01 10:00:00",
                        "uri": format!("{list}/{}", num.id),
                    })
                })
                .collect();
            let page_uri = |p: usize| format!("{list}?Page={p}&PageSize={size}");
            reply(
                200,
                json!({
                    "page": page,
                    "page_size": size,
                    "uri": page_uri(page),
                    "first_page_uri": page_uri(0),
                    "next_page_uri": (end < acct.numbers.len()).then(|| page_uri(page + 1)),
                    "previous_page_uri": (page > 0).then(|| page_uri(page - 1)),
                    "incoming_phone_numbers": items,
                }),
            )
        }
        _ => not_found(Carrier::Exotel, req),
    }
}
