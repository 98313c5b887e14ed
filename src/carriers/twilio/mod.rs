//! Twilio: HMAC-SHA1 over the full URL and sorted POST parameters (or `bodySHA256` for JSON),
//! TwiML answers.

pub mod rest;
pub mod signature;

use actix_web::HttpResponse;

use super::answer::{self, xml_escape, Decision, APOLOGY};
use super::{CarrierHooks, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::Carrier;
use crate::store::{EventRecord, PhoneRecord};

pub struct Twilio;

impl CarrierHooks for Twilio {
    const CARRIER: Carrier = Carrier::Twilio;

    fn verify(
        req: &Inbound<'_>,
        keys: &Prepared,
        _: &PhoneRecord,
        _: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject> {
        let Prepared::Twilio(key) = keys else { return Err(Reject::CredentialUnavailable) };
        let header = req.header("x-twilio-signature").filter(|h| !h.is_empty()).ok_or(Reject::MissingSignature)?;
        if let Some(settings) = req.header("x-twilio-webhooks-signature-settings") {
            // SharedKey signing uses a secret callgate does not hold; say so rather than guess.
            tracing::info!(
                settings_len = settings.len(),
                "Twilio SharedKey signature settings present; verifying with the auth token"
            );
        }
        let ok = match req.method {
            "GET" => signature::verify_get(key, req.url, header),
            "POST" if req.is_form => signature::verify_form(key, req.url, &req.form, header),
            "POST" if req.body.is_empty() => signature::verify_get(key, req.url, header),
            "POST" => signature::verify_raw_body(key, req.url, req.body, header),
            _ => false,
        };
        if ok {
            Ok(if req.is_form || req.body.is_empty() { "twilio-hmac-sha1" } else { "twilio-hmac-sha1-body-sha256" })
        } else {
            Err(Reject::InvalidSignature)
        }
    }

    fn parse(req: &mut Inbound<'_>, hook: Hook) -> Parsed {
        let status = req.param("CallStatus");
        let kind = match hook {
            Hook::Incoming => "call.incoming",
            _ if matches!(status.as_deref(), Some("completed" | "busy" | "failed" | "no-answer" | "canceled")) => {
                "call.hangup"
            }
            _ if status.as_deref() == Some("in-progress") => "call.answered",
            _ => "call.status",
        };
        let is_form = req.is_form || req.body.is_empty();
        let (params, form) =
            if is_form { super::params::form_fields(req) } else { (super::params::json_or_text(req.body), None) };
        // A JSON body's fields are read from the body itself; a form's answer through `param`.
        let json = if is_form {
            None
        } else {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(params.get()).ok()
        };
        let get = |k: &str| req.param(k).or_else(|| json.as_ref()?.get(k)?.as_str().map(str::to_owned));
        Parsed {
            kind: kind.to_owned(),
            call_id: get("CallSid"),
            from: get("From"),
            to: get("To"),
            direction: get("Direction"),
            status: status.or_else(|| get("Status")),
            // Not the I-Twilio-Idempotency-Token header: it is outside the signature, so a
            // captured request resent with a new token would count as new. The pipeline's
            // key hashes what the signature covers, which a retry repeats byte for byte.
            replay_id: None,
            params,
            form,
        }
    }

    fn answer(phone: &PhoneRecord, decision: &Decision, ev: &EventRecord) -> HttpResponse {
        answer::xml("text/xml", twiml(phone, decision, ev))
    }
}

/// TwiML. `<Stream url>` takes no query string, so a stream URL's query parameters travel as
/// `<Parameter>`s, which Twilio hands to the stream in its `start` message.
pub fn twiml(phone: &PhoneRecord, decision: &Decision, ev: &EventRecord) -> String {
    let inner = match decision {
        Decision::Stream { stream_url } => {
            let (base, query) = crate::net::form::split_url(stream_url);
            let mut params = format!(
                "<Parameter name=\"phone_id\" value=\"{}\"/><Parameter name=\"event_id\" value=\"{}\"/>",
                xml_escape(phone.id.as_str()),
                xml_escape(ev.id.as_str())
            );
            for (k, v) in crate::net::form::pairs(query.unwrap_or("").as_bytes()).filter_map(Result::ok) {
                params.push_str(&format!("<Parameter name=\"{}\" value=\"{}\"/>", xml_escape(&k), xml_escape(&v)));
            }
            format!("<Connect><Stream url=\"{}\">{params}</Stream></Connect>", xml_escape(base))
        }
        Decision::Hangup { message } => {
            format!("<Say>{}</Say><Hangup/>", xml_escape(message.as_deref().unwrap_or(APOLOGY)))
        }
        Decision::Transfer { to } => format!("<Dial>{}</Dial>", xml_escape(to)),
    };
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response>{inner}</Response>")
}
