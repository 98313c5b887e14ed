//! Plivo: V3 HMAC-SHA256 over the URL and sorted decoded parameters, PlivoXML answers.

pub mod rest;
pub mod signature;

use actix_web::HttpResponse;

use super::answer::{self, Decision};
use super::{CarrierHooks, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::Carrier;
use crate::store::{EventRecord, PhoneRecord};
use signature::{Method, PlivoKey};

pub struct Plivo;

/// The header names of one member of the Plivo family (Vobiz copies Plivo with its own names).
pub(crate) struct V3Headers {
    pub signature: &'static str,
    pub main_account: &'static str,
    pub nonce: &'static str,
}

/// The V3 check shared by Plivo and Vobiz: the nonce, and at least one V3 header; V2 alone
/// does not cover the parameters and is refused as if unsigned.
pub(crate) fn verify_v3_family(
    req: &Inbound<'_>,
    names: &V3Headers,
    check: impl Fn(Method, &str, &str) -> bool,
) -> Result<(), Reject> {
    let nonce = req.header(names.nonce).filter(|n| !n.is_empty());
    let sigs = [req.header(names.signature), req.header(names.main_account)];
    let Some(nonce) = nonce else { return Err(Reject::MissingSignature) };
    // The nonce is signed text: one that is not text must not be signable as its stand-in.
    if nonce == super::UNREADABLE {
        return Err(Reject::InvalidSignature);
    }
    if sigs.iter().all(|s| s.is_none_or(str::is_empty)) {
        return Err(Reject::MissingSignature);
    }
    let method = Method::from_http(req.method).ok_or(Reject::InvalidSignature)?;
    // No sender documents a signature over a JSON body: such a request cannot be verified.
    if method == Method::Post && !req.is_form && !req.body.is_empty() {
        return Err(Reject::InvalidSignature);
    }
    if sigs.into_iter().flatten().any(|h| check(method, nonce, h)) {
        Ok(())
    } else {
        Err(Reject::InvalidSignature)
    }
}

/// Plivo-family payloads: form or query fields named alike.
pub(crate) fn parse_family(req: &Inbound<'_>, hook: Hook, nonce_header: &str) -> Parsed {
    let (params, form) = super::params::form_fields(req);
    let status = req.param("CallStatus");
    let event = req.param("Event");
    let kind = match hook {
        Hook::Incoming => "call.incoming",
        _ if event.as_deref() == Some("Hangup")
            || matches!(
                status.as_deref(),
                Some("completed" | "busy" | "failed" | "timeout" | "no-answer" | "cancel" | "canceled")
            ) =>
        {
            "call.hangup"
        }
        _ if status.as_deref() == Some("in-progress") => "call.answered",
        _ => "call.status",
    };
    Parsed {
        kind: kind.to_owned(),
        call_id: req.param("CallUUID"),
        from: req.param("From").map(|s| super::e164_or_raw(&s)),
        to: req.param("To").map(|s| super::e164_or_raw(&s)),
        direction: req.param("Direction"),
        status,
        params,
        form,
        replay_id: req.header(nonce_header).map(|n| ["nonce:", n].concat()),
    }
}

const HEADERS: V3Headers = V3Headers {
    signature: "x-plivo-signature-v3",
    main_account: "x-plivo-signature-ma-v3",
    nonce: "x-plivo-signature-v3-nonce",
};

fn key(keys: &Prepared) -> Result<&PlivoKey, Reject> {
    match keys {
        Prepared::Plivo(k) => Ok(k),
        _ => Err(Reject::CredentialUnavailable),
    }
}

impl CarrierHooks for Plivo {
    const CARRIER: Carrier = Carrier::Plivo;

    fn verify(
        req: &Inbound<'_>,
        keys: &Prepared,
        _: &PhoneRecord,
        _: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject> {
        let key = key(keys)?;
        verify_v3_family(req, &HEADERS, |method, nonce, header| {
            signature::verify_v3(key, method, req.url, &req.form, nonce, header)
        })?;
        Ok("plivo-v3")
    }

    fn parse(req: &mut Inbound<'_>, hook: Hook) -> Parsed {
        parse_family(req, hook, HEADERS.nonce)
    }

    fn answer(_: &PhoneRecord, decision: &Decision, _: &EventRecord) -> HttpResponse {
        answer::xml("application/xml", answer::plivo_xml(decision))
    }
}
