//! Telnyx: one events URL for every number; Ed25519 over `timestamp|body` with the account's
//! public key; answered afterwards by a Call Control command, not in the response.

pub mod batch;
mod envelope;
pub mod legs;
pub mod rest;
pub mod signature;

use std::sync::Arc;

use actix_web::HttpResponse;

use super::answer::Decision;
use super::{CarrierHooks, Check, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::domain::{Carrier, E164};
use crate::store::{EventRecord, PhoneRecord, Store, StoreError};
pub use envelope::Envelope;
use signature::TelnyxError;

pub struct Telnyx;

const SIGNATURE: &str = "telnyx-signature-ed25519";
const TIMESTAMP: &str = "telnyx-timestamp";
const SCHEME: &str = "telnyx-ed25519";

/// Finds the number an event is for, to know whose key verifies it. Nothing read here is
/// trusted until that key has verified the body. A request whose signature headers fail the
/// checks that need no key (missing, malformed, stale) stops before any lookup, so its answer
/// does not depend on the number it names. The parsed body is kept on `req` for `parse`, and
/// for [`other_party`] should this number's key refuse the event.
pub fn locate(
    req: &mut Inbound<'_>,
    store: &dyn Store,
    legs: &legs::Legs,
) -> Result<Result<Option<Arc<PhoneRecord>>, StoreError>, Reject> {
    signature::check_headers(req.header(SIGNATURE), req.header(TIMESTAMP), req.now_secs).map_err(rejection)?;
    let envelope = req.envelope.insert(Envelope::read(req.body).ok_or(Reject::MalformedBody)?);
    let payload = &envelope.data.payload;
    // A leg whose first event was for a number here is that number's, whoever else it names.
    if directionless(payload) {
        if let Some(id) = payload.call_control_id.as_deref().and_then(|c| legs.get(c, req.now_secs)) {
            match store.phone_resolve(&id) {
                Ok(Some(p)) if p.provider == Carrier::Telnyx => return Ok(Ok(Some(p))),
                Ok(_) => {}
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    Ok(candidates(payload, store, None))
}

/// What a verified event tells of its leg, taken before the event is parsed (which takes its
/// envelope), to be noted once it is recorded: `Some(false)`, the number it is for, as it says
/// its direction; `Some(true)`, that the leg hung up.
pub fn leg_news(req: &Inbound<'_>) -> Option<bool> {
    let envelope = req.envelope.as_ref()?;
    let hung_up = envelope.data.event_type.as_deref() == Some("call.hangup");
    (hung_up || !directionless(&envelope.data.payload)).then_some(hung_up)
}

/// Notes the news of an event of leg `call` now recorded for `phone`.
pub fn note(hung_up: bool, call: &str, legs: &legs::Legs, phone: &PhoneRecord, now_secs: i64) {
    if hung_up {
        legs.hung_up(call, &phone.id, now_secs);
    } else {
        legs.learn(call, &phone.id, &phone.org_id, now_secs);
    }
}

/// The number of a directionless event that comes after `first` among those it may be for,
/// to be tried once `first`'s key has refused it: a call between two accounts here, neither
/// on a known application, is signed by whichever account the event is for, and tried with
/// one key only, the other account's events would be refused for good. Looked up only then,
/// so that the events `first` takes pay for no lookup more.
pub fn other_party(
    req: &Inbound<'_>,
    store: &dyn Store,
    first: &PhoneRecord,
) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
    match &req.envelope {
        Some(envelope) if directionless(&envelope.data.payload) => {
            candidates(&envelope.data.payload, store, Some(first))
        }
        _ => Ok(None),
    }
}

/// The signature checks the refusal of this event costs, whatever is imported here: two for
/// one without direction (either party may be the number it is for: the other party's key,
/// else the decoy's), else one.
pub fn refusal_checks(req: &Inbound<'_>) -> usize {
    if req.envelope.as_ref().is_some_and(|e| directionless(&e.data.payload)) {
        2
    } else {
        1
    }
}

fn directionless(payload: &envelope::Payload) -> bool {
    !matches!(payload.direction.as_deref(), Some("incoming" | "outgoing"))
}

/// The most likely number the event is for, or with `after`, the next one after that number.
fn candidates(
    payload: &envelope::Payload,
    store: &dyn Store,
    after: Option<&PhoneRecord>,
) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
    let connection = payload.connection_id.as_deref();
    let telnyx_number = |n: &Option<String>| -> Result<Option<Arc<PhoneRecord>>, StoreError> {
        let Some(number) = n.as_deref().and_then(|s| E164::normalize(s).ok()) else { return Ok(None) };
        // A number held at another carrier has no key for a Telnyx event.
        Ok(store.phone_by_number(&number)?.filter(|p| p.provider == Carrier::Telnyx))
    };
    // Our number is `to` of an incoming call and `from` of an outgoing one.
    match payload.direction.as_deref() {
        Some("incoming") => return or_connection(telnyx_number(&payload.to)?, store, connection),
        Some("outgoing") => return or_connection(telnyx_number(&payload.from)?, store, connection),
        _ => {}
    }
    // Most events after the first (`call.answered`, `call.hangup`) carry no direction, and
    // either party may hold a number here, at another carrier or another tenant: the account's
    // application (`connection_id`) tells ours from theirs: a party on it comes first, then a
    // party whose application is not known (`to`, then `from`), then the number on the event's
    // application, then a party last seen on another application (it may have been moved).
    let mut parties = [None, None];
    for (party, n) in parties.iter_mut().zip([&payload.to, &payload.from]) {
        let Some(p) = telnyx_number(n)? else { continue };
        if let (Some(ours), Some(theirs)) = (p.connection_id.as_deref(), connection) {
            if ours == theirs && after.is_none() {
                return Ok(Some(p));
            }
        }
        *party = Some(p);
    }
    let on_app = |p: &&Arc<PhoneRecord>| p.connection_id.is_some() && p.connection_id.as_deref() == connection;
    let moved = |p: &&Arc<PhoneRecord>| p.connection_id.is_some() && connection.is_some() && !on_app(p);
    let all = || parties.iter().flatten();
    let ranked = || all().filter(on_app).chain(all().filter(|p| !on_app(p) && !moved(p)));
    // The first candidate is looked up on the application only when no party is one.
    let on_connection = match after {
        None if ranked().next().is_some() => None,
        _ => or_connection(None, store, connection)?,
    };
    let mut found = ranked().chain(&on_connection).chain(all().filter(moved));
    Ok(match after {
        None => found.next().cloned(),
        Some(first) => found.find(|p| p.id != first.id).cloned(),
    })
}

fn rejection(e: TelnyxError) -> Reject {
    match e {
        TelnyxError::Missing => Reject::MissingSignature,
        TelnyxError::Stale => Reject::StaleTimestamp,
        TelnyxError::Malformed | TelnyxError::Invalid => Reject::InvalidSignature,
    }
}

/// The check of an event whose number is not here, against a key no account has: it costs
/// what a bad signature for an imported number costs, so that the time of the refusal does not
/// tell either. Its private half is no secret (a seed of sevens): it can only ever refuse,
/// because the event is refused whatever the check says.
pub fn decoy_check(req: &Inbound<'_>) -> Result<Check, Reject> {
    static DECOY: std::sync::OnceLock<signature::TelnyxKey> = std::sync::OnceLock::new();
    let key = DECOY.get_or_init(|| {
        let public = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        signature::TelnyxKey::from_bytes(public.as_bytes()).expect("a key from a seed is never of small order")
    });
    signature::prepare(key, req.header(SIGNATURE), req.header(TIMESTAMP), req.body, req.now_secs)
        .map(|pending| Check::Ed25519 { pending, scheme: SCHEME })
        .map_err(rejection)
}

/// `found`, else the one number on the event's application.
fn or_connection(
    found: Option<Arc<PhoneRecord>>,
    store: &dyn Store,
    connection: Option<&str>,
) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
    match (found, connection) {
        (Some(p), _) => Ok(Some(p)),
        (None, Some(conn)) => store.phone_by_connection(Carrier::Telnyx, conn),
        (None, None) => Ok(None),
    }
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
            .map_err(rejection)
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
