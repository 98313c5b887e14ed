//! Telnyx: one events URL for every number; Ed25519 over `timestamp|body` with the account's
//! public key; answered afterwards by a Call Control command, not in the response.

pub mod rest;
pub mod signature;

use actix_web::HttpResponse;
use serde_json::Value;

use super::answer::Decision;
use super::{CarrierHooks, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::{Carrier, E164};
use crate::store::{EventRecord, PhoneRecord, Store};
use signature::TelnyxError;

pub struct Telnyx;

const SIGNATURE: &str = "telnyx-signature-ed25519";
const TIMESTAMP: &str = "telnyx-timestamp";

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
    let v: &Value = req.json.insert(serde_json::from_slice(req.body).map_err(|_| Reject::InvalidSignature)?);
    let payload = &v["data"]["payload"];
    let outgoing = payload["direction"].as_str() == Some("outgoing");
    let number = payload[if outgoing { "from" } else { "to" }].as_str().and_then(|s| E164::normalize(s).ok());
    let by_number = match number {
        Some(n) => store.phone_by_number(&n),
        None => Ok(None),
    };
    Ok(match by_number {
        Ok(None) => match payload["connection_id"].as_str() {
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
        _: &PhoneRecord,
        _: &VerifyContext<'_>,
    ) -> Result<&'static str, Reject> {
        let Prepared::Telnyx { key, .. } = keys else { return Err(Reject::CredentialUnavailable) };
        signature::verify(key, req.header(SIGNATURE), req.header(TIMESTAMP), req.body, req.now_secs)
            .map(|()| "telnyx-ed25519")
            .map_err(|e| match e {
                TelnyxError::Missing => Reject::MissingSignature,
                TelnyxError::Stale => Reject::StaleTimestamp,
                TelnyxError::Malformed | TelnyxError::Invalid => Reject::InvalidSignature,
            })
    }

    fn parse(req: &mut Inbound<'_>, _: Hook) -> Parsed {
        let v = req.json.take().unwrap_or_else(|| serde_json::from_slice(req.body).unwrap_or(Value::Null));
        let data = &v["data"];
        let p = &data["payload"];
        let s = |x: &Value| x.as_str().map(str::to_owned);
        let event_type = data["event_type"].as_str().unwrap_or("unknown");
        let direction = s(&p["direction"]);
        let kind = match (event_type, direction.as_deref()) {
            ("call.initiated", Some("incoming")) => "call.incoming".to_owned(),
            (t, _) => t.to_owned(),
        };
        Parsed {
            kind,
            call_id: s(&p["call_control_id"]),
            from: s(&p["from"]),
            to: s(&p["to"]),
            direction,
            status: s(&p["state"]).or_else(|| s(&p["hangup_cause"])),
            replay_id: s(&data["id"]).map(|id| format!("event:{id}")),
            params: v,
        }
    }

    fn answer(_: &PhoneRecord, _: &Decision, _: &EventRecord) -> HttpResponse {
        HttpResponse::Ok().finish()
    }
}
