//! Exotel: signs nothing, so a callback is let through only from an allowed address and, when
//! the number has one, with its token in the query string.

pub mod rest;

use actix_web::HttpResponse;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::answer::{Decision, APOLOGY};
use super::{CarrierHooks, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::Carrier;
use crate::store::{EventRecord, PhoneRecord};

pub struct Exotel;

impl CarrierHooks for Exotel {
    const CARRIER: Carrier = Carrier::Exotel;
    const NEEDS_CREDENTIAL: bool = false;

    fn verify(
        req: &Inbound<'_>,
        _: &Prepared,
        phone: &PhoneRecord,
        ctx: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject> {
        let ip = crate::net::client::canonical(req.client_ip);
        if !ctx.exotel_allowed.iter().any(|n| n.contains(&ip)) {
            return Err(Reject::IpNotAllowed);
        }
        let Some(expected) = &phone.config.exotel_webhook_token_sha256 else { return Ok("exotel-ip-allowlist") };
        let given = crate::net::form::pairs(req.query.as_bytes())
            .filter_map(Result::ok)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
            .ok_or(Reject::InvalidToken)?;
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        if bool::from(digest.ct_eq(expected)) {
            Ok("exotel-ip-allowlist+token")
        } else {
            Err(Reject::InvalidToken)
        }
    }

    fn parse(req: &mut Inbound<'_>, hook: Hook) -> Parsed {
        // The token authenticated the request; it has no place in a stored event.
        let params = super::params::form_params(req, &["token"]);
        let status = req.param("CallStatus").or_else(|| req.param("Status"));
        let call_type = req.param("CallType");
        let kind = match hook {
            Hook::Incoming => "call.incoming",
            _ if matches!(status.as_deref(), Some("completed" | "busy" | "failed" | "no-answer" | "canceled"))
                || matches!(call_type.as_deref(), Some("completed" | "client-hangup" | "incomplete")) =>
            {
                "call.hangup"
            }
            _ if status.as_deref() == Some("in-progress") => "call.answered",
            _ => "call.status",
        };
        Parsed {
            kind: kind.to_owned(),
            call_id: req.param("CallSid"),
            from: req.param("CallFrom").or_else(|| req.param("From")).map(|s| super::e164_or_raw(&s)),
            to: req.param("CallTo").or_else(|| req.param("To")).map(|s| super::e164_or_raw(&s)),
            direction: req.param("Direction"),
            status: status.or(call_type),
            params,
            form: None,
            replay_id: None,
        }
    }

    /// The Voicebot applet's dynamic-URL answer: the stream to connect to.
    fn answer(_: &PhoneRecord, decision: &Decision, _: &EventRecord) -> HttpResponse {
        let body = match decision {
            Decision::Stream { stream_url } => json!({"url": stream_url}),
            Decision::Hangup { message } => {
                json!({"action": "hangup", "message": message.as_deref().unwrap_or(APOLOGY)})
            }
            Decision::Transfer { to } => json!({"action": "transfer", "to": to}),
        };
        HttpResponse::Ok().json(body)
    }
}
