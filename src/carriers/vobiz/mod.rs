//! Vobiz: a Plivo clone with its own header names and two documented canonical strings.

pub mod rest;
pub mod signature;

use actix_web::HttpResponse;

use super::answer::{self, Decision};
use super::plivo::{parse_family, verify_v3_family, V3Headers};
use super::{CarrierHooks, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::Carrier;
use crate::store::{EventRecord, PhoneRecord};

pub struct Vobiz;

const HEADERS: V3Headers = V3Headers {
    signature: "x-vobiz-signature-v3",
    main_account: "x-vobiz-signature-ma-v3",
    nonce: "x-vobiz-signature-v3-nonce",
};

impl CarrierHooks for Vobiz {
    const CARRIER: Carrier = Carrier::Vobiz;

    fn verify(
        req: &Inbound<'_>,
        keys: &Prepared,
        _: &PhoneRecord,
        _: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject> {
        let Prepared::Vobiz(key) = keys else { return Err(Reject::CredentialUnavailable) };
        let form = std::cell::Cell::new(None);
        verify_v3_family(req, &HEADERS, |method, nonce, header| {
            let matched = signature::v3_form(key, method, req.url, &req.form, nonce, header);
            form.set(form.get().or(matched));
            matched.is_some()
        })?;
        // The event says when its fields were not signed, for whoever acts on them.
        Ok(match form.get() {
            Some(signature::V3Form::Docs) => "vobiz-v3-url-only",
            _ => "vobiz-v3",
        })
    }

    fn parse(req: &mut Inbound<'_>, hook: Hook) -> Parsed {
        parse_family(req, hook, HEADERS.nonce)
    }

    fn answer(_: &PhoneRecord, decision: &Decision, _: &EventRecord) -> HttpResponse {
        answer::xml("application/xml", answer::plivo_xml(decision))
    }
}
