//! The carriers. Each module owns its credential handling, signature check, payload parsing,
//! answer format and REST client; `pipeline` is the one webhook path they all share.

pub mod answer;
pub mod exotel;
pub mod keys;
pub mod params;
pub mod pipeline;
pub mod plivo;
pub mod rest;
pub mod routes;
pub mod telnyx;
pub mod twilio;
pub mod vobiz;

use std::net::IpAddr;

use actix_web::http::header::HeaderMap;
use actix_web::HttpResponse;

use crate::domain::Carrier;
use crate::net::form::Pair;
use crate::store::{EventRecord, PhoneRecord};
pub use keys::Prepared;

/// Which of a carrier's callbacks this is. The numbers are part of replay keys already stored:
/// they are fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The answer URL: the carrier waits for instructions.
    Incoming = 0,
    /// Status and hangup callbacks: acknowledged with an empty 200.
    Status = 1,
    /// Telnyx's single events URL.
    Events = 2,
}

/// A request as the carrier sent it, with the URL it signed. Only the pipeline builds it.
pub struct Inbound<'a> {
    pub method: &'a str,
    pub headers: &'a HeaderMap,
    /// The public URL the carrier called, query included, exactly as received.
    pub url: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
    /// Decoded form fields of a form-encoded body; empty otherwise.
    pub form: Vec<Pair<'a>>,
    pub is_form: bool,
    /// Telnyx's body, already read to find its number, handed on so it is parsed once.
    pub envelope: Option<telnyx::Envelope>,
    pub client_ip: IpAddr,
    pub now_secs: i64,
}

/// Stands for a header value that is not visible ASCII: not base64, hex, a number or a token.
/// A check that signs a header's text (Plivo's nonce) must refuse it outright.
pub(crate) const UNREADABLE: &str = "\u{fffd}";

impl Inbound<'_> {
    /// A header's value. One that is not visible ASCII (no carrier sends such a signature,
    /// nonce or timestamp) is still there: it reads as [`UNREADABLE`], so the request is
    /// refused as wrongly signed rather than as unsigned.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap_or(UNREADABLE))
    }

    /// A field from the form body, else from the query string.
    pub fn param(&self, name: &str) -> Option<String> {
        if let Some((_, v)) = self.form.iter().find(|(k, _)| k == name) {
            return Some(v.to_string());
        }
        crate::net::form::pairs(self.query.as_bytes())
            .filter_map(Result::ok)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// Why a webhook was refused. The response names the class, never which part failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    InvalidSignature,
    MissingSignature,
    StaleTimestamp,
    IpNotAllowed,
    InvalidToken,
    CredentialUnavailable,
    /// A Telnyx body that is not JSON: no number to take a key from, so nothing to verify.
    MalformedBody,
}

impl Reject {
    /// 403 for a request that failed to prove itself; 400 for one whose body is malformed
    /// before any proof can be looked at.
    pub fn status(self) -> actix_web::http::StatusCode {
        match self {
            Reject::MalformedBody => actix_web::http::StatusCode::BAD_REQUEST,
            _ => actix_web::http::StatusCode::FORBIDDEN,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Reject::InvalidSignature => "invalid_signature",
            Reject::MissingSignature => "missing_signature",
            Reject::StaleTimestamp => "stale_timestamp",
            Reject::IpNotAllowed => "ip_not_allowed",
            Reject::InvalidToken => "invalid_token",
            Reject::CredentialUnavailable => "credential_unavailable",
            Reject::MalformedBody => "malformed_body",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reject::InvalidSignature => "the request signature is not valid",
            Reject::MissingSignature => "the request carries no signature",
            Reject::StaleTimestamp => "the request timestamp is outside the accepted window",
            Reject::IpNotAllowed => "the request comes from an address that is not allowed",
            Reject::InvalidToken => "the request token is missing or not valid",
            Reject::CredentialUnavailable => "no credential is available to verify this request",
            Reject::MalformedBody => "the body cannot be read: not a form that decodes, or (Telnyx) not JSON",
        }
    }
}

/// The carrier's payload in the normalized event's terms.
#[derive(Debug, Default)]
pub struct Parsed {
    pub kind: String,
    pub call_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub direction: Option<String>,
    pub status: Option<String>,
    pub params: Box<serde_json::value::RawValue>,
    /// The fields as they arrived, when they are kept so (`params` is then `null`).
    pub form: Option<String>,
    /// What identifies a redelivery of this very callback; it must be covered by the signature
    /// (a signed nonce or event id), or anyone holding one request could replay it under a new id.
    pub replay_id: Option<String>,
}

/// The parts a carrier module supplies to the shared pipeline.
pub trait CarrierHooks: Send + Sync + 'static {
    const CARRIER: Carrier;

    /// Whether `verify` needs the number's stored credential (Exotel's check does not).
    const NEEDS_CREDENTIAL: bool = true;

    /// Checks the request with one credential's keys; the name of the scheme that passed.
    fn verify(
        req: &Inbound<'_>,
        keys: &Prepared,
        phone: &PhoneRecord,
        ctx: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject>;

    /// `verify`, leaving to the caller the part of the check it can share with other requests
    /// (Telnyx's curve arithmetic).
    fn check(
        req: &Inbound<'_>,
        keys: &Prepared,
        phone: &PhoneRecord,
        ctx: &VerifyContext<'_>,
    ) -> Result<Check, Reject> {
        Self::verify(req, keys, phone, ctx).map(Check::Done)
    }

    fn parse(req: &mut Inbound<'_>, hook: Hook) -> Parsed;

    /// The answer document for an incoming call, from the decision the hand-off reached.
    fn answer(phone: &PhoneRecord, decision: &answer::Decision, ev: &EventRecord) -> HttpResponse;
}

/// How far `CarrierHooks::check` got.
// Moved once, into the batch queue, where it is stored whole anyway: boxing would only add an
// allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Check {
    /// Verified, by this scheme.
    Done(&'static str),
    /// Everything but the Ed25519 arithmetic passed.
    Ed25519 { pending: telnyx::signature::Pending, scheme: &'static str },
}

/// Settings a verifier may need beyond the credential.
pub struct VerifyContext<'a> {
    pub exotel_allowed: &'a [ipnet::IpNet],
}

/// Converts a carrier's number (with or without `+`, maybe a SIP URI) to E.164 when it is one.
pub fn e164_or_raw(s: &str) -> String {
    crate::domain::E164::normalize(s).map(String::from).unwrap_or_else(|_| s.to_owned())
}
