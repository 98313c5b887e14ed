//! Telnyx: one events URL for every number; Ed25519 over `timestamp|body` with the account's
//! public key; answered afterwards by a Call Control command, not in the response.

pub mod batch;
mod envelope;
pub mod rest;
pub mod signature;

use actix_web::HttpResponse;

use super::answer::Decision;
use super::{CarrierHooks, Check, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::{Carrier, E164};
use crate::store::{EventRecord, PhoneRecord, Store};
pub use envelope::Envelope;
use signature::TelnyxError;

pub struct Telnyx;

const SIGNATURE: &str = "telnyx-signature-ed25519";
const TIMESTAMP: &str = "telnyx-timestamp";
const SCHEME: &str = "telnyx-ed25519";

/// Finds the number an event is for, to know whose key verifies it. Nothing read here is
/// trusted until that key has verified the body. Unsigned requests stop before any lookup.
/// The parsed body is kept on `req` for `parse`.
pub fn locate(
    req: &mut Inbound<'_>,
    store: &dyn Store,
) -> Result<Result<Option<std::sync::Arc<PhoneRecord>>, crate::store::StoreError>, Reject> {
    if req.header(SIGNATURE).is_none_or(str::is_empty) || req.header(TIMESTAMP).is_none_or(str::is_empty) {
        return Err(Reject::MissingSignature);
    }
    let envelope = req.envelope.insert(Envelope::read(req.body).ok_or(Reject::InvalidSignature)?);
    let payload = &envelope.data.payload;
    let outgoing = payload.direction.as_deref() == Some("outgoing");
    let number = if outgoing { &payload.from } else { &payload.to };
    let number = number.as_deref().and_then(|s| E164::normalize(s).ok());
    let by_number = match number {
        Some(n) => store.phone_by_number(&n),
        None => Ok(None),
    };
    Ok(match by_number {
        Ok(None) => match payload.connection_id.as_deref() {
            Some(conn) => store.phone_by_connection(Carrier::Telnyx, conn),
            None => Ok(None),
        },
        other => other,
    })
}

impl CarrierHooks for Telnyx {
    const CARRIER: Carrier = Carrier::Telnyx;

    fn verify(
        req: &Inbound<'_>,
        keys: &Prepared,
        phone: &PhoneRecord,
        ctx: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject> {
        match Self::check(req, keys, phone, ctx)? {
            Check::Ed25519 { pending, scheme } if pending.check() => Ok(scheme),
            Check::Ed25519 { .. } => Err(Reject::InvalidSignature),
            Check::Done(scheme) => Ok(scheme),
        }
    }

    fn check(req: &Inbound<'_>, keys: &Prepared, _: &PhoneRecord, _: &VerifyContext<'_>) -> Result<Check, Reject> {
        let Prepared::Telnyx { key, .. } = keys else { return Err(Reject::CredentialUnavailable) };
        signature::prepare(key, req.header(SIGNATURE), req.header(TIMESTAMP), req.body, req.now_secs)
            .map(|pending| Check::Ed25519 { pending, scheme: SCHEME })
            .map_err(|e| match e {
                TelnyxError::Missing => Reject::MissingSignature,
                TelnyxError::Stale => Reject::StaleTimestamp,
                TelnyxError::Malformed | TelnyxError::Invalid => Reject::InvalidSignature,
            })
    }

    fn parse(req: &mut Inbound<'_>, _: Hook) -> Parsed {
        let Envelope { data, body } = req.envelope.take().or_else(|| Envelope::read(req.body)).unwrap_or_default();
        let p = data.payload;
        let kind = match (data.event_type.as_deref().unwrap_or("unknown"), p.direction.as_deref()) {
            ("call.initiated", Some("incoming")) => "call.incoming".to_owned(),
            (t, _) => t.to_owned(),
        };
        Parsed {
            kind,
            call_id: p.call_control_id,
            from: p.from,
            to: p.to,
            direction: p.direction,
            status: p.state.or(p.hangup_cause),
            replay_id: data.id.map(|id| ["event:", &id].concat()),
            params: body.unwrap_or_else(|| super::params::json_or_text(req.body)),
            form: None,
        }
    }

    fn answer(_: &PhoneRecord, _: &Decision, _: &EventRecord) -> HttpResponse {
        HttpResponse::Ok().finish()
    }
}
