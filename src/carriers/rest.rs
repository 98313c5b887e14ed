//! The carriers' REST APIs: listing an account's numbers and pointing one at the gateway.
//!
//! One `reqwest::Client` serves every carrier so connections are pooled across requests.
//! Credentials travel only in headers, never in a URL, and no error built here carries a
//! credential: carrier error texts that echo one are dropped, transport errors lose their URL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::carriers::{exotel, plivo, telnyx, twilio, vobiz};
use crate::domain::{Carrier, PhoneCredential, Secret, E164};

/// Listing stops here even if the carrier has more: bounds the memory and the number of
/// requests one import can cost.
pub const MAX_NUMBERS: usize = 10_000;

/// The name of the Call Control application callgate creates or reuses on Telnyx, whose
/// single webhook URL serves every number; on Plivo and Vobiz, where the gateway's URLs
/// name the phone, it prefixes one application per number.
pub const APP_NAME: &str = "callgate";

/// A carrier body larger than this is not a number listing; refusing it bounds memory.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Carrier error texts end up in API responses; a long one is noise, not information.
const MAX_MESSAGE: usize = 300;
/// How far past what is shown a carrier's text is searched for the credential, so that one
/// quoted just before the cut is found whole; longer than any credential.
const MESSAGE_SLACK: usize = 512;
/// Bytes in a row of a credential that make a text count as quoting it.
const QUOTED_RUN: usize = 8;

/// Origins (`scheme://host[:port]`, no trailing slash) of the carriers' REST APIs; tests
/// point them at a fake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarrierUrls {
    pub plivo: String,
    pub vobiz: String,
    pub twilio: String,
    pub telnyx: String,
    /// `None`: `https://<subdomain>` from the credential, since Exotel accounts live on
    /// regional clusters.
    pub exotel: Option<String>,
}

impl Default for CarrierUrls {
    fn default() -> Self {
        Self {
            plivo: "https://api.plivo.com".to_owned(),
            vobiz: "https://api.vobiz.ai".to_owned(),
            twilio: "https://api.twilio.com".to_owned(),
            telnyx: "https://api.telnyx.com".to_owned(),
            exotel: None,
        }
    }
}

/// A number as the carrier lists it, normalized to E.164.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedNumber {
    pub number: E164,
    /// The carrier's own handle for the number: Twilio `PN…` sid, Telnyx and Vobiz ids,
    /// Exotel sid, Plivo's digits.
    pub provider_number_id: String,
    pub friendly_name: Option<String>,
    pub voice_url: Option<String>,
    /// Where the carrier routes the number's calls as listed (Plivo and Vobiz application,
    /// Telnyx connection), so that what configuring replaces can be put back on release.
    #[serde(skip)]
    pub routed_to: Option<String>,
}

impl ListedNumber {
    pub(crate) fn routed_to(self, route: Option<String>) -> Self {
        ListedNumber { routed_to: non_empty(route), ..self }
    }
}

/// A number whose carrier configuration is to be undone, and what configuring it reported
/// (`provider_configuration`): what callgate set, and what that replaced.
pub struct Release<'a> {
    pub number: &'a E164,
    pub provider_number_id: &'a str,
    pub configured: &'a Value,
}

impl Release<'_> {
    /// A string field of the configuration report.
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.configured.get(name).and_then(Value::as_str).filter(|s| !s.is_empty())
    }

    /// What the configuration replaced, as its report recorded it under `name`: `Err` when the
    /// report has no such field (configured by a version that did not record it), which is
    /// not the same as having had nothing.
    pub(crate) fn previous(&self, name: &str) -> Result<Option<&str>, ProviderError> {
        match self.configured.get(name) {
            Some(_) => Ok(self.field(name)),
            None => Err(ProviderError::PreviousUnknown {
                message: format!(
                    "{} was configured by a version of callgate that did not record what it replaced, so it \
                     cannot be put back: route the number at the carrier by hand",
                    self.number
                ),
            }),
        }
    }
}

/// The release report when the configuration report names nothing callgate set up (its
/// configuring failed before the carrier changed anything).
pub(crate) fn nothing_to_release() -> Value {
    json!({"changed": false, "reason": "the import's configuration report names nothing callgate set up at the carrier"})
}

/// A configuration that failed after it had set something up at the carrier.
#[derive(Debug)]
pub struct Unfinished {
    pub error: ProviderError,
    /// What was set up before the failure, as a configuration report (a release reads it):
    /// a step that failed may still have happened (a timeout), and what it needed stays.
    pub left: Option<Value>,
}

impl Unfinished {
    /// `error` after the steps `report` describes; it says it is not complete.
    pub(crate) fn after(error: ProviderError, mut report: Value) -> Self {
        report["complete"] = Value::Bool(false);
        Self { error, left: Some(report) }
    }
}

impl From<ProviderError> for Unfinished {
    fn from(error: ProviderError) -> Self {
        Self { error, left: None }
    }
}

/// Links the number to callgate's application, the last step of `report`. A link that fails
/// leaves the report behind, so that a release can still find the application (and the link,
/// if it went through after all).
pub(crate) async fn link_to(
    ex: &Exchange<'_>,
    op: &'static str,
    link: RequestBuilder,
    mut report: Value,
) -> Result<Value, Unfinished> {
    if let Err(e) = ex.send(op, link).await {
        return Err(Unfinished::after(e, report));
    }
    if let Some(Value::Array(actions)) = report.get_mut("actions") {
        actions.push(json!("linked number"));
    }
    Ok(report)
}

/// Where auto-configuration points a number. For Telnyx both are the single voice URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTargets {
    pub incoming: String,
    pub status: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The carrier answered 401 or 403. `message` is the carrier's own text, unless it
    /// echoed a credential.
    #[error("the carrier rejected the credentials{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    InvalidCredentials { message: Option<String> },
    /// Connect error, 5xx, unexpected status or body. `reason` is for logs.
    #[error("the carrier's API is unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("the carrier's API did not answer in time")]
    Timeout,
    /// The carrier answered 429: this account is sending it too much. `retry_after_secs` is
    /// its `Retry-After` in seconds, when it gave one.
    #[error("the carrier is rate-limiting this account")]
    RateLimited { retry_after_secs: Option<u64> },
    #[error("the carrier does not know this number or resource")]
    NotFound,
    /// The carrier would accept the change, but making it would break something the
    /// customer set up (e.g. a Twilio number routed to a SIP trunk).
    #[error("{message}")]
    Refused { message: String },
    /// Undoing a configuration needs what it replaced, and that was not recorded.
    #[error("{message}")]
    PreviousUnknown { message: String },
}

/// The carriers' REST clients. Cheap to clone: the connection pool and the URLs are shared.
#[derive(Clone)]
pub struct ProviderApi {
    client: reqwest::Client,
    urls: Arc<CarrierUrls>,
    /// Bounds a whole number listing, however many pages it takes.
    listing_deadline: Duration,
}

/// A listing may take as long as this many requests that each take their whole timeout: an
/// account of [`MAX_NUMBERS`] at Plivo's 20 a page is 500 requests, which at half a second each
/// fit in 25 timeouts of 10 s.
const LISTING_REQUESTS: u32 = 30;

impl std::fmt::Debug for ProviderApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderApi").field("urls", &self.urls).finish_non_exhaustive()
    }
}

impl ProviderApi {
    /// `timeout` bounds each request from connecting to the end of its body.
    pub fn new(urls: CarrierUrls, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would resend the X-Auth-Token header (Vobiz) to wherever it points;
            // no carrier API redirects, so one is an error.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("callgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, urls: Arc::new(urls), listing_deadline: timeout * LISTING_REQUESTS })
    }

    pub fn urls(&self) -> &CarrierUrls {
        &self.urls
    }

    /// Every number on the account, once each, following the carrier's pagination up to
    /// [`MAX_NUMBERS`] and [`LISTING_REQUESTS`] times the request timeout in all. Items whose
    /// number is not E.164 are skipped.
    pub async fn list_numbers(&self, cred: &PhoneCredential) -> Result<Vec<ListedNumber>, ProviderError> {
        let listing = async {
            match cred {
                PhoneCredential::Plivo(c) => plivo::rest::list_numbers(self, c).await,
                PhoneCredential::Vobiz(c) => vobiz::rest::list_numbers(self, c).await,
                PhoneCredential::Twilio(c) => twilio::rest::list_numbers(self, c).await,
                PhoneCredential::Telnyx(c) => telnyx::rest::list_numbers(self, c).await,
                PhoneCredential::Exotel(c) => exotel::rest::list_numbers(self, c).await,
            }
        };
        tokio::time::timeout(self.listing_deadline, listing).await.unwrap_or(Err(ProviderError::Timeout))
    }

    /// Points `number` at the gateway and describes what changed on the carrier's side.
    pub async fn configure_number(
        &self,
        cred: &PhoneCredential,
        number: &ListedNumber,
        urls: &WebhookTargets,
    ) -> Result<Value, Unfinished> {
        match cred {
            PhoneCredential::Plivo(c) => plivo::rest::configure_number(self, c, number, urls).await,
            PhoneCredential::Vobiz(c) => vobiz::rest::configure_number(self, c, number, urls).await,
            PhoneCredential::Twilio(c) => twilio::rest::configure_number(self, c, number, urls).await,
            PhoneCredential::Telnyx(c) => telnyx::rest::configure_number(self, c, number, urls).await,
            PhoneCredential::Exotel(_) => Ok(exotel::rest::configure_number(number, urls)),
        }
    }

    /// Undoes what [`Self::configure_number`] did, where the carrier still routes the number
    /// as it left it, and describes what changed on the carrier's side.
    pub async fn release_number(&self, cred: &PhoneCredential, release: &Release<'_>) -> Result<Value, ProviderError> {
        match cred {
            PhoneCredential::Plivo(c) => plivo::rest::release_number(self, c, release).await,
            PhoneCredential::Vobiz(c) => vobiz::rest::release_number(self, c, release).await,
            PhoneCredential::Twilio(c) => twilio::rest::release_number(self, c, release).await,
            PhoneCredential::Telnyx(c) => telnyx::rest::release_number(self, c, release).await,
            PhoneCredential::Exotel(_) => Ok(exotel::rest::release_number(release)),
        }
    }

    /// Answers a Telnyx call; `body` carries the stream fields and the caller's `command_id`.
    pub async fn telnyx_answer(
        &self,
        api_key: &Secret,
        call_control_id: &str,
        body: &Value,
    ) -> Result<(), ProviderError> {
        self.telnyx_command(api_key, call_control_id, telnyx::rest::CallAction::Answer, body).await
    }

    /// Any Call Control command on one call.
    pub async fn telnyx_command(
        &self,
        api_key: &Secret,
        call_control_id: &str,
        action: telnyx::rest::CallAction,
        body: &Value,
    ) -> Result<(), ProviderError> {
        telnyx::rest::call_action(self, api_key, call_control_id, action, body).await
    }

    pub(crate) fn exchange<'a>(
        &'a self,
        carrier: Carrier,
        origin: &str,
        auth: Auth<'a>,
    ) -> Result<Exchange<'a>, ProviderError> {
        Exchange::new(&self.client, carrier, origin, auth)
    }
}

/// How a carrier wants to be authenticated.
pub(crate) enum Auth<'a> {
    Basic {
        user: &'a str,
        password: &'a Secret,
    },
    /// Vobiz: `X-Auth-ID` / `X-Auth-Token`.
    VobizHeaders {
        auth_id: &'a str,
        auth_token: &'a Secret,
    },
    Bearer(&'a Secret),
}

/// Requests to one carrier account: the origin, the auth headers, and the strings that
/// must never appear in an error.
pub(crate) struct Exchange<'a> {
    client: &'a reqwest::Client,
    carrier: Carrier,
    origin: String,
    headers: HeaderMap,
    secrets: Vec<&'a str>,
    /// A header value that carries a secret in another form (Basic's base64), as sent: a
    /// carrier that echoes the request's headers quotes it.
    encoded: Option<zeroize::Zeroizing<String>>,
}

fn sensitive(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| ProviderError::InvalidCredentials {
        message: Some("the credential contains characters that cannot be sent in an HTTP header".to_owned()),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

impl<'a> Exchange<'a> {
    fn new(client: &'a reqwest::Client, carrier: Carrier, origin: &str, auth: Auth<'a>) -> Result<Self, ProviderError> {
        let mut headers = HeaderMap::new();
        let mut secrets = Vec::new();
        let mut encoded = None;
        match auth {
            Auth::Basic { user, password } => {
                let raw = zeroize::Zeroizing::new(format!("{user}:{}", password.expose()));
                let b64 = B64.encode(raw.as_bytes());
                headers.insert(AUTHORIZATION, sensitive(&format!("Basic {b64}"))?);
                secrets.push(password.expose());
                encoded = Some(zeroize::Zeroizing::new(b64));
            }
            Auth::VobizHeaders { auth_id, auth_token } => {
                headers.insert(HeaderName::from_static("x-auth-id"), sensitive(auth_id)?);
                headers.insert(HeaderName::from_static("x-auth-token"), sensitive(auth_token.expose())?);
                secrets.push(auth_token.expose());
            }
            Auth::Bearer(key) => {
                headers.insert(AUTHORIZATION, sensitive(&format!("Bearer {}", key.expose()))?);
                secrets.push(key.expose());
            }
        }
        Ok(Self { client, carrier, origin: origin.trim_end_matches('/').to_owned(), headers, secrets, encoded })
    }

    /// Also keeps `s` out of errors (Exotel's API key is half of its credential).
    pub(crate) fn also_secret(mut self, s: &'a str) -> Self {
        self.secrets.push(s);
        self
    }

    /// `path` starts with `/` and is already percent-encoded.
    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{}", self.origin, path)).headers(self.headers.clone())
    }

    /// A next-page link from the carrier. Only a path on the same origin is followed, so a
    /// response can never send our credentials to another host.
    pub(crate) fn follow(&self, op: &'static str, next: &str) -> Result<RequestBuilder, ProviderError> {
        let path = next.strip_prefix(self.origin.as_str()).unwrap_or(next);
        let relative = path.starts_with('/')
            && !path.starts_with("//")
            && !path.bytes().any(|b| b == b'\\' || b == b'#' || b.is_ascii_whitespace() || b.is_ascii_control());
        if !relative {
            return Err(self.unavailable(op, "next-page link is not a path on the API's origin"));
        }
        Ok(self.request(Method::GET, path))
    }

    pub(crate) fn unavailable(&self, op: &'static str, what: &str) -> ProviderError {
        let what = if self.mentions_secret(what) { "an answer that quoted the credential (withheld)" } else { what };
        ProviderError::Unavailable { reason: format!("{} {op}: {what}", self.carrier) }
    }

    /// Whether `s` quotes a secret: whole, or any [`QUOTED_RUN`] bytes of it in a row (a text
    /// cut short, or the header that carried it).
    fn mentions_secret(&self, s: &str) -> bool {
        let hay = s.as_bytes();
        let found = |needle: &[u8]| memchr::memmem::find(hay, needle).is_some();
        self.secrets.iter().copied().chain(self.encoded.as_ref().map(|e| e.as_str())).map(str::as_bytes).any(|secret| {
            match secret.len() {
                0 => false,
                n if n <= QUOTED_RUN => found(secret),
                _ => secret.windows(QUOTED_RUN).any(found),
            }
        })
    }

    /// The carrier's own error text as shown to the operator: none if it quotes the
    /// credential anywhere in what is shown or just past it, else cut to [`MAX_MESSAGE`].
    fn shown(&self, text: Option<String>) -> Option<String> {
        let text = text.filter(|t| !self.mentions_secret(t))?;
        let mut cut: String = text.chars().take(MAX_MESSAGE).collect();
        if cut.len() < text.len() {
            cut.push('…');
        }
        Some(cut)
    }

    /// Sends, and returns the body of a 2xx answer; every other outcome is a `ProviderError`.
    pub(crate) async fn send(&self, op: &'static str, req: RequestBuilder) -> Result<Vec<u8>, ProviderError> {
        let resp = req.send().await.map_err(|e| self.transport(op, e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after_secs = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| s.clamp(1, 3_600));
            return Err(ProviderError::RateLimited { retry_after_secs });
        }
        let Some(body) = crate::net::outbound::body_within(resp, MAX_BODY).await.map_err(|e| self.transport(op, e))?
        else {
            return Err(self.unavailable(op, "response body too large"));
        };
        if status.is_success() {
            return Ok(body);
        }
        let message = self.shown(carrier_message(&body));
        match status.as_u16() {
            401 | 403 => Err(ProviderError::InvalidCredentials { message }),
            404 => Err(ProviderError::NotFound),
            _ => {
                let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
                Err(self.unavailable(op, &format!("HTTP {}{detail}", status.as_u16())))
            }
        }
    }

    /// Sends and parses a 2xx JSON answer into `T`, whose required fields are the
    /// top-level shape the carrier documents.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        req: RequestBuilder,
    ) -> Result<T, ProviderError> {
        let body = self.send(op, req).await?;
        serde_json::from_slice(&body).map_err(|e| {
            // serde's message can quote the body; the position is enough for a log.
            self.unavailable(
                op,
                &format!(
                    "unexpected response body ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            )
        })
    }

    fn transport(&self, op: &'static str, e: reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            return ProviderError::Timeout;
        }
        let kind = if e.is_connect() {
            "could not connect"
        } else if e.is_body() || e.is_decode() {
            "reading the response failed"
        } else {
            "request failed"
        };
        let e = e.without_url();
        let mut detail = kind.to_owned();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        self.unavailable(op, &detail)
    }
}

/// The carrier's own error text from an error body, whichever carrier's shape it has:
/// Telnyx `errors[0].detail|title`, Twilio `message`, Plivo `error`, Exotel
/// `RestException.Message` or `response.error_data.description|message`.
fn carrier_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let candidates = [
        &v["errors"][0]["detail"],
        &v["errors"][0]["title"],
        &v["message"],
        &v["error"],
        &v["error"]["message"],
        &v["RestException"]["Message"],
        &v["response"]["error_data"]["description"],
        &v["response"]["error_data"]["message"],
        &v["detail"],
    ];
    let text = candidates.iter().find_map(|c| c.as_str().map(str::trim).filter(|s| !s.is_empty()))?;
    Some(text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_MESSAGE + MESSAGE_SLACK).collect())
}

/// Everything but unreserved characters, and `:` which Telnyx ids contain and which the
/// carriers' own SDKs send unescaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b':');

/// One percent-encoded path segment. An id that would change the path's shape (empty, `.`,
/// `..`) names nothing the carrier could have.
pub(crate) fn segment(s: &str) -> Result<String, ProviderError> {
    if s.is_empty() || s == "." || s == ".." {
        return Err(ProviderError::NotFound);
    }
    Ok(utf8_percent_encode(s, SEGMENT).to_string())
}

/// Carrier ids arrive as JSON strings or, from some endpoints, as numbers.
pub(crate) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(crate) fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// Accumulates one listing across pages, enforcing [`MAX_NUMBERS`] over the raw items and
/// [`MAX_PAGES`] over the pages, so a carrier that returns only unusable items, or pages that
/// never end, still terminates.
pub(crate) struct Listing {
    carrier: Carrier,
    numbers: Vec<ListedNumber>,
    /// The numbers listed so far: a carrier that lists one again is going round in circles.
    listed: HashSet<E164>,
    /// The same for items skipped as unusable (a short code, a SIP address), by a hash of
    /// their JSON.
    unusable: HashSet<u64>,
    seen: usize,
    skipped: usize,
    pages: usize,
    repeated: usize,
}

/// Pages one listing may take: [`MAX_NUMBERS`] at the smallest page a carrier serves (Plivo's
/// 20). A listing that gets there has been cut off, as at [`MAX_NUMBERS`].
const MAX_PAGES: usize = MAX_NUMBERS / 20;

impl Listing {
    pub(crate) fn new(carrier: Carrier) -> Self {
        Self {
            carrier,
            numbers: Vec::new(),
            listed: HashSet::new(),
            unusable: HashSet::new(),
            seen: 0,
            skipped: 0,
            pages: 0,
            repeated: 0,
        }
    }

    /// Adds one page's items; an item that does not parse as `T` or whose number is not
    /// E.164 is skipped, and a number listed before is dropped. Returns how many of the page's
    /// items were not listed before: none, and the listing is over, whatever the page says
    /// comes next (a loop of next-page links repeats its numbers).
    pub(crate) fn add_page<T: DeserializeOwned>(
        &mut self,
        items: Vec<Value>,
        parse: impl Fn(T) -> Option<ListedNumber>,
    ) -> usize {
        self.pages += 1;
        let mut new = 0;
        for item in items {
            if self.seen >= MAX_NUMBERS {
                break;
            }
            self.seen += 1;
            let text = || {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                item.to_string().hash(&mut h);
                h.finish()
            };
            match T::deserialize(&item).ok().and_then(&parse) {
                Some(entry) if !self.listed.insert(entry.number.clone()) => self.repeated += 1,
                Some(entry) => {
                    self.numbers.push(entry);
                    new += 1;
                }
                None if !self.unusable.insert(text()) => self.repeated += 1,
                None => {
                    self.skipped += 1;
                    new += 1;
                }
            }
        }
        new
    }

    pub(crate) fn seen(&self) -> usize {
        self.seen
    }

    pub(crate) fn full(&self) -> bool {
        self.seen >= MAX_NUMBERS || self.pages >= MAX_PAGES
    }

    pub(crate) fn finish(self) -> Vec<ListedNumber> {
        if self.skipped > 0 {
            tracing::debug!(carrier = %self.carrier, skipped = self.skipped, "skipped listed numbers that are not E.164");
        }
        if self.repeated > 0 {
            tracing::warn!(carrier = %self.carrier, repeated = self.repeated, "the carrier listed numbers twice; kept once");
        }
        if self.full() {
            tracing::warn!(carrier = %self.carrier, numbers = MAX_NUMBERS, pages = MAX_PAGES, "number listing truncated");
        }
        self.numbers
    }
}

/// A [`ListedNumber`] if `raw` normalizes to E.164.
pub(crate) fn listed(
    raw: &str,
    provider_number_id: String,
    friendly_name: Option<String>,
    voice_url: Option<String>,
) -> Option<ListedNumber> {
    Some(ListedNumber {
        number: E164::normalize(raw).ok()?,
        provider_number_id,
        // The carrier's text, shown by callgate as its own: nothing in it may hide or reorder.
        friendly_name: non_empty(friendly_name.map(|n| crate::domain::text::shown(&n, 200))),
        voice_url: non_empty(voice_url),
        routed_to: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_listed_name_keeps_nothing_that_hides_or_reorders_text() {
        let n = |name: &str| listed("+14155550100", "PN1".into(), Some(name.into()), None).unwrap().friendly_name;
        assert_eq!(n("\u{202E}\u{0}evil"), Some("evil".into()));
        assert_eq!(n("Front desk"), Some("Front desk".into()));
        assert_eq!(n("\u{200B}\u{FEFF}"), None);
    }

    #[test]
    fn carrier_messages_are_found_in_each_shape() {
        let twilio = br#"{"code": 20003, "detail": "x", "message": "Authenticate", "status": 401}"#;
        assert_eq!(carrier_message(twilio).as_deref(), Some("Authenticate"));
        let telnyx = br#"{"errors": [{"code": "10009", "title": "Authentication failed", "detail": "bad key"}]}"#;
        assert_eq!(carrier_message(telnyx).as_deref(), Some("bad key"));
        let telnyx_title = br#"{"errors": [{"code": "10009", "title": "Authentication failed"}]}"#;
        assert_eq!(carrier_message(telnyx_title).as_deref(), Some("Authentication failed"));
        assert_eq!(carrier_message(br#"{"api_id": "a", "error": "not valid"}"#).as_deref(), Some("not valid"));
        let exotel = br#"{"response": {"error_data": {"code": 1010, "message": "m", "description": "d"}}}"#;
        assert_eq!(carrier_message(exotel).as_deref(), Some("d"));
        assert_eq!(carrier_message(b"<html>401</html>"), None);
        assert_eq!(carrier_message(br#"{"error": ""}"#), None);
        let long = format!(r#"{{"message": "{}\n"}}"#, "a".repeat(1000));
        let m = carrier_message(long.as_bytes()).unwrap();
        assert_eq!(m.chars().count(), MAX_MESSAGE + MESSAGE_SLACK);
    }

    #[test]
    fn a_carrier_text_that_quotes_any_of_the_credential_is_not_shown() {
        let client = reqwest::Client::new();
        let token = Secret::new("AUDITTOKEN-0123456789abcdef".to_owned());
        let ex = Exchange::new(&client, Carrier::Twilio, "https://x", Auth::Basic { user: "AC1", password: &token })
            .unwrap();
        let text = |m: String| carrier_message(json!({ "message": m }).to_string().as_bytes());
        let basic = B64.encode("AC1:AUDITTOKEN-0123456789abcdef");
        for quoted in [
            // Whole, cut short by the length limit, or only a run of it.
            format!("bad token {}", token.expose()),
            format!("{} {}", "x".repeat(280), token.expose()),
            format!("{} {}", "x".repeat(MAX_MESSAGE - 5), token.expose()),
            "token ends in 3456789ab".to_owned(),
            // The request's own header, echoed back.
            format!("refused header Basic {basic}"),
            format!("{}Basic {basic}", "y".repeat(290)),
        ] {
            assert_eq!(ex.shown(text(quoted.clone())), None, "{quoted}");
            let e = ex.unavailable("list numbers", &quoted);
            assert!(!e.to_string().contains("AUDITTOKEN") && !e.to_string().contains(&basic[..12]), "{e}");
        }
        assert_eq!(ex.shown(text("Authenticate".to_owned())).as_deref(), Some("Authenticate"));
        let long = ex.shown(text("z".repeat(1000))).unwrap();
        assert_eq!(long.chars().count(), MAX_MESSAGE + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn segments_are_encoded_and_dot_segments_refused() {
        assert_eq!(segment("v3:ab_c-d.e~f").unwrap(), "v3:ab_c-d.e~f");
        assert_eq!(segment("a/b?c#d%e f+").unwrap(), "a%2Fb%3Fc%23d%25e%20f%2B");
        for bad in ["", ".", ".."] {
            assert!(matches!(segment(bad), Err(ProviderError::NotFound)));
        }
    }

    #[test]
    fn errors_redact_and_links_stay_on_origin() {
        let client = reqwest::Client::new();
        let token = Secret::new("tok-SECRET-123".to_owned());
        let ex = Exchange::new(
            &client,
            Carrier::Plivo,
            "https://api.plivo.com/",
            Auth::Basic { user: "MA1", password: &token },
        )
        .unwrap();
        let e = ex.unavailable("list numbers", "echo tok-SECRET-123 here");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        assert!(ex.follow("op", "/v1/Account/MA1/Number/?offset=20").is_ok());
        assert!(ex.follow("op", "https://api.plivo.com/v1/x").is_ok());
        for bad in ["https://evil.example/v1", "//evil.example/v1", "v1/x", "/a b"] {
            assert!(ex.follow("op", bad).is_err(), "{bad}");
        }
        let bad_header = Secret::new("line\nbreak".to_owned());
        let err = Exchange::new(&client, Carrier::Telnyx, "https://x", Auth::Bearer(&bad_header)).err().unwrap();
        assert!(!err.to_string().contains("break"));
    }
}
