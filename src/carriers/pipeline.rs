//! The webhook path, written once for every carrier: resolve the number, reconstruct the URL
//! the carrier signed, verify with the number's credential (or the previous one inside its
//! grace), refuse replays, record durably, answer.

use std::sync::Arc;

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::answer::Decision;
use super::{CarrierHooks, Check, Hook, Inbound, Parsed, Prepared, Reject, VerifyContext};
use crate::clock::rfc3339;
use crate::domain::{EventId, PhoneId, SecretId};
use crate::error::ApiError;
use crate::net::{body, client, form};
use crate::state::AppState;
use crate::store::{EventRecord, PhoneRecord, PreparedEvent, Recorded, VerifiedBy};

fn rejected(
    carrier: crate::domain::Carrier,
    state: &AppState,
    why: Reject,
    phone: Option<&PhoneId>,
    ip: std::net::IpAddr,
) -> HttpResponse {
    state.metrics.rejected(carrier, why.code());
    tracing::warn!(carrier = %carrier, phone = ?phone, client_ip = %ip, reason = why.code(), "webhook rejected");
    refusal(why)
}

fn refusal(why: Reject) -> HttpResponse {
    HttpResponse::build(why.status()).json(json!({"error": {"code": why.code(), "message": why.message()}}))
}

fn not_found(carrier: crate::domain::Carrier, state: &AppState, ip: std::net::IpAddr) -> HttpResponse {
    unknown_noted(carrier, state, ip);
    HttpResponse::NotFound().json(json!({"error": {"code": "not_found", "message": "phone number not found"}}))
}

/// An event whose payload names no number here (Telnyx) is refused as a bad signature is, in
/// answer and in time: a 404 would tell anyone who posts events naming numbers which ones are
/// imported, across every tenant. A path names one of this gateway's own URLs, which tells
/// nothing, so there an unknown number stays a 404.
async fn unknown_in_payload(
    carrier: crate::domain::Carrier,
    state: &AppState,
    ip: std::net::IpAddr,
    inbound: &Inbound<'_>,
) -> HttpResponse {
    // Whatever it says, the event is refused: its number has no key here.
    decoy_checks(state, inbound, super::telnyx::refusal_checks(inbound)).await;
    unknown_noted(carrier, state, ip);
    refusal(Reject::InvalidSignature)
}

fn unknown_noted(carrier: crate::domain::Carrier, state: &AppState, ip: std::net::IpAddr) {
    state.metrics.rejected(carrier, "unknown_phone");
    tracing::info!(carrier = %carrier, client_ip = %ip, "webhook for an unknown phone number");
}

/// The other party of a Telnyx event that `first`'s key refused, with what verified it, if its
/// key takes the event. An event without direction is refused after two checks whatever is
/// imported (the other party's key, else the decoy's), so that the time of the refusal does not
/// tell whether its other number is here.
async fn other_party<C: CarrierHooks>(
    state: &AppState,
    inbound: &Inbound<'_>,
    first: &PhoneRecord,
    ctx: &VerifyContext<'_>,
    now_ms: i64,
) -> Result<Option<(Arc<PhoneRecord>, VerifiedBy)>, crate::store::StoreError> {
    match super::telnyx::other_party(inbound, state.store.as_ref(), first)? {
        Some(other) => Ok(verify::<C>(state, inbound, &other, ctx, now_ms).await.ok().map(|v| (other, v))),
        None => {
            // The first number's check was one of them.
            decoy_checks(state, inbound, super::telnyx::refusal_checks(inbound) - 1).await;
            Ok(None)
        }
    }
}

/// `n` checks against the decoy key, which refuses whatever they say: what a refused event
/// costs whether or not its numbers are here.
async fn decoy_checks(state: &AppState, inbound: &Inbound<'_>, n: usize) {
    for _ in 0..n {
        let _ = settle(state, super::telnyx::decoy_check(inbound)).await;
    }
}

/// Where the phone number comes from: the path, or (Telnyx) the verified-later payload.
pub enum Locate {
    Path(String),
    Payload,
}

/// The shared handler. `C` supplies the carrier's parts.
pub async fn handle<C: CarrierHooks>(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    locate: Locate,
    hook: Hook,
) -> HttpResponse {
    let carrier = C::CARRIER;
    let peer = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let settings = &state.settings;
    let ip = client::client_ip(peer, req.headers(), &settings.trusted_proxies);
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let raw = match body::read_limited(payload, settings.body_limit_bytes, declared).await {
        Ok(b) => b,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let is_form = req.method() == actix_web::http::Method::POST
        && content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded");
    let form_pairs = if is_form {
        match form::parse(&raw) {
            Ok(p) => p,
            Err(_) => return rejected(carrier, &state, Reject::MalformedBody, None, ip),
        }
    } else {
        Vec::new()
    };
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = client::signed_url(&settings.public_url, peer, req.headers(), &settings.trusted_proxies, path_and_query);
    let now_ms = state.clock.now_ms();
    // No carrier signs a GET's body (its parameters are in the URL), so none is taken from it:
    // a body sent along with a signed URL would otherwise be recorded as the carrier's.
    let body: &[u8] = if req.method() == actix_web::http::Method::GET { &[] } else { &raw };
    let mut inbound = Inbound {
        method: req.method().as_str(),
        headers: req.headers(),
        url: &url,
        query: req.uri().query().unwrap_or(""),
        body,
        form: form_pairs,
        is_form,
        envelope: None,
        client_ip: ip,
        now_secs: now_ms.div_euclid(1000),
    };

    let by_payload = matches!(locate, Locate::Payload);
    let found = match locate {
        Locate::Path(id) => {
            let Ok(id) = PhoneId::parse(&id) else { return not_found(carrier, &state, ip) };
            state.store.phone_resolve(&id)
        }
        Locate::Payload => match super::telnyx::locate(&mut inbound, state.store.as_ref(), &state.telnyx_legs) {
            Ok(p) => p,
            Err(why) => return rejected(carrier, &state, why, None, ip),
        },
    };
    let phone = match found {
        Ok(Some(p)) if p.provider == carrier => p,
        Ok(_) if by_payload => return unknown_in_payload(carrier, &state, ip, &inbound).await,
        Ok(_) => return not_found(carrier, &state, ip),
        Err(e) => return ApiError::internal(e).into_response(),
    };

    let ctx = VerifyContext { exotel_allowed: &settings.exotel_allowed_ips };
    let (phone, verified_by) = match verify::<C>(&state, &inbound, &phone, &ctx, now_ms).await {
        Ok(v) => (phone, v),
        // A Telnyx event without direction may be the other party's, at another account here.
        Err(Reject::InvalidSignature) if by_payload => {
            match other_party::<C>(&state, &inbound, &phone, &ctx, now_ms).await {
                Ok(Some(found)) => found,
                Ok(None) => return rejected(carrier, &state, Reject::InvalidSignature, Some(&phone.id), ip),
                Err(e) => return ApiError::internal(e).into_response(),
            }
        }
        Err(why) => return rejected(carrier, &state, why, Some(&phone.id), ip),
    };
    let leg_news = if by_payload { super::telnyx::leg_news(&inbound) } else { None };

    let parsed = C::parse(&mut inbound, hook);
    let replay_key = replay_key(carrier, &phone, hook, &parsed, &inbound);
    let expires = now_ms + settings.replay_window.as_millis() as i64;
    let mut ev = event(&phone, parsed, verified_by, now_ms);
    let incoming = hook == Hook::Incoming;
    let telnyx_call = carrier == crate::domain::Carrier::Telnyx && ev.kind == "call.incoming";
    // Without an assistant the answer is known now, and is recorded with the event itself.
    let mut preset = None;
    if incoming || telnyx_call {
        if let Some(d) = crate::handoff::assistant::without_assistant(&state, &phone) {
            ev.answer = Some(d.record);
            preset = Some(d.decision);
        }
    }
    let mut parked = phone.config.upstream_url.is_none() && settings.handoff.upstream_url.is_none();
    let mut prepared = PreparedEvent::new(&ev, Some((&replay_key, expires))).parked(parked);
    if (incoming || telnyx_call) && preset.is_none() {
        prepared = prepared.due_at(now_ms + crate::handoff::outbox::answer_hold(&state));
    }
    // The writer acknowledges only once the batch holding this event is on disk.
    let recorded = state.commit.record(prepared).await;
    // What the event tells of its Telnyx leg counts once the event is on disk: refused, its
    // retry must find the leg as it was.
    if let (Some(hung_up), Some(call), Ok(Recorded::New { .. } | Recorded::Duplicate(_))) =
        (leg_news, ev.call_id.as_deref(), &recorded)
    {
        super::telnyx::note(hung_up, call, &state.telnyx_legs, &phone, now_ms.div_euclid(1000));
    }
    match recorded {
        Ok(Recorded::New { id, parked: waits }) => {
            ev.id = id;
            parked = waits;
        }
        Ok(Recorded::Duplicate(first)) => {
            state.metrics.replayed(carrier);
            tracing::info!(carrier = %carrier, phone = %phone.id, "replayed webhook acknowledged, not recorded again");
            if !incoming {
                return HttpResponse::Ok().finish();
            }
            // A carrier retrying its answer URL gets the answer the first request got.
            let (first, noted) = match first {
                Some(id) => first_answer(&state, &phone, &id).await,
                None => (None, Noted::Unknown),
            };
            let decision = match (noted, &first) {
                (Noted::Answer(d), _) => d,
                // The first request is over and noted nothing: a crash took its answer with it,
                // so the carrier got none. This one is answered as the first would have been,
                // and its answer noted, so that the event records what the carrier acts on.
                (Noted::Lost, Some(f)) => crate::handoff::assistant::decide_and_note(&state, &phone, f, None).await,
                _ => Decision::fallback(&phone),
            };
            return respond::<C>(&phone, Some(&decision), first.as_ref().unwrap_or(&ev));
        }
        Ok(Recorded::TooLarge) => {
            tracing::warn!(carrier = %carrier, phone = %phone.id, "verified webhook too large to record");
            return ApiError::new(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the event is too large to record",
            )
            .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    }
    state.metrics.accepted(carrier);
    if !parked {
        state.outbox.poke();
    }
    tracing::debug!(carrier = %carrier, phone = %phone.id, event = %ev.id, kind = %ev.kind, "webhook recorded");
    if telnyx_call {
        let st = state.clone();
        tokio::spawn(async move { crate::handoff::assistant::answer_telnyx(&st, &phone, &ev, preset).await });
        return HttpResponse::Ok().finish();
    }
    if !incoming {
        return HttpResponse::Ok().finish();
    }
    let decision = crate::handoff::assistant::decide_and_note(&state, &phone, &ev, preset).await;
    respond::<C>(&phone, Some(&decision), &ev)
}

fn respond<C: CarrierHooks>(phone: &PhoneRecord, decision: Option<&Decision>, ev: &EventRecord) -> HttpResponse {
    match decision {
        Some(d) => C::answer(phone, d, ev),
        None => HttpResponse::Ok().finish(),
    }
}

/// What the first request of a repeated answer request noted.
enum Noted {
    Answer(Decision),
    /// Nothing, and its own deadline has passed: it will note nothing now.
    Lost,
    /// Nothing yet, and no longer waited for.
    Unknown,
}

/// The first request's event and the answer noted on it. While that request may still be
/// asking the assistant (until the answer deadline, and a little more for noting it), a retry
/// waits for it: answered with the fallback instead, the carrier would act on an answer the
/// event does not record. Retries are few, so they wait by looking again, not by a
/// registry of answers in flight that every incoming call would pay for.
async fn first_answer(state: &AppState, phone: &PhoneRecord, id: &EventId) -> (Option<EventRecord>, Noted) {
    const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(20);
    let wait = state.settings.handoff.answer_deadline + std::time::Duration::from_millis(500);
    let until = tokio::time::Instant::now() + wait;
    loop {
        let Some(first) = state.store.event_get(&phone.org_id, id).ok().flatten() else {
            return (None, Noted::Unknown);
        };
        let decision =
            first.answer.as_ref().and_then(|a| serde_json::from_value::<Decision>(a["decision"].clone()).ok());
        if let Some(d) = decision {
            return (Some(first), Noted::Answer(d));
        }
        if state.clock.now_ms() > first.received_at_ms + wait.as_millis() as i64 {
            return (Some(first), Noted::Lost);
        }
        if tokio::time::Instant::now() >= until {
            return (Some(first), Noted::Unknown);
        }
        tokio::time::sleep(LOOK_AGAIN).await;
    }
}

/// The event a verified callback becomes (public for the benchmarks).
pub fn event(phone: &PhoneRecord, p: Parsed, verified_by: VerifiedBy, now_ms: i64) -> EventRecord {
    EventRecord {
        id: EventId::unassigned(),
        org_id: phone.org_id.clone(),
        phone_id: phone.id.clone(),
        provider: phone.provider,
        kind: p.kind,
        call_id: p.call_id,
        from: p.from,
        to: p.to,
        direction: p.direction,
        status: p.status,
        received_at: rfc3339(now_ms),
        received_at_ms: now_ms,
        verified_by,
        params: p.params,
        form: p.form,
        answer: None,
    }
}

/// Longest carrier id a replay key holds as it is.
const REPLAY_ID_KEPT: usize = 256;

/// The carrier's own redelivery id when it has one, for this number: a nonce is the
/// carrier's to make unique, not a sender's, and one signed event of another number (or
/// organization) that repeats it must not pass for a replay and go unrecorded. Else what makes
/// this callback itself unique (call, status, and a hash of everything signed).
fn replay_key(
    carrier: crate::domain::Carrier,
    phone: &PhoneRecord,
    hook: Hook,
    p: &Parsed,
    req: &Inbound<'_>,
) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut key = Vec::with_capacity(64);
    key.extend_from_slice(carrier.as_str().as_bytes());
    key.push(0);
    match &p.replay_id {
        // A carrier's ids are short (a nonce, a UUID); a longer one, which only the holder of
        // the number's credential can sign, is kept as its hash, so that a key stays small
        // whatever a header or body holds. The separator tells the two forms apart.
        Some(id) if id.len() <= REPLAY_ID_KEPT => {
            key.extend_from_slice(phone.id.as_str().as_bytes());
            key.push(0);
            key.extend_from_slice(id.as_bytes());
        }
        Some(id) => {
            key.extend_from_slice(phone.id.as_str().as_bytes());
            key.push(1);
            key.extend_from_slice(&Sha256::digest(id.as_bytes()));
        }
        None => {
            let mut h = Sha256::new();
            h.update(phone.id.as_str());
            h.update([0]);
            h.update(p.call_id.as_deref().unwrap_or(""));
            h.update([0]);
            h.update(p.status.as_deref().unwrap_or(""));
            h.update([0]);
            // The hook is in the URL the carrier signed: a status callback and an answer request
            // that carry the same fields are two callbacks, not one sent twice.
            h.update([hook as u8]);
            // What the signature covers, in the form it covers it: bytes that differ only where
            // it does not look (a form's field order, its escapes, a repeated pair; a Telnyx
            // URL's query) would make a replay count as a new event.
            if carrier != crate::domain::Carrier::Telnyx {
                h.update(req.query);
            }
            h.update([0]);
            if req.is_form {
                let mut fields: Vec<(&str, &str)> = req.form.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
                fields.sort_unstable();
                fields.dedup();
                for (k, v) in fields {
                    for part in [k, v] {
                        h.update((part.len() as u64).to_le_bytes());
                        h.update(part);
                    }
                }
            } else {
                h.update(req.body);
            }
            key.extend_from_slice(&h.finalize());
        }
    }
    key
}

/// The prepared keys of one of the number's credentials: from the cache, else opened from the
/// vault once and cached.
pub fn keys_for(state: &AppState, phone: &PhoneRecord, secret: &SecretId) -> Option<Arc<Prepared>> {
    if let Some(k) = state.credentials.get(secret) {
        return Some(k);
    }
    let rec = state.store.secret_get(&phone.org_id, secret).ok()??;
    let cred = match state.vault.open_phone(&rec) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(phone = %phone.id, secret = %secret, error = %e, "cannot open the credential of a phone number");
            return None;
        }
    };
    if cred.carrier() != phone.provider {
        return None;
    }
    Some(state.credentials.insert(secret.clone(), Prepared::from_credential(&cred)?))
}

/// A check's outcome, once its shared part (if any) is done.
async fn settle(state: &AppState, check: Result<Check, Reject>) -> Result<&'static str, Reject> {
    match check? {
        Check::Done(scheme) => Ok(scheme),
        Check::Ed25519 { pending, scheme } => {
            if super::telnyx::batch::verify(pending, &state.metrics).await {
                Ok(scheme)
            } else {
                Err(Reject::InvalidSignature)
            }
        }
    }
}

async fn verify<C: CarrierHooks>(
    state: &AppState,
    req: &Inbound<'_>,
    phone: &PhoneRecord,
    ctx: &VerifyContext<'_>,
    now_ms: i64,
) -> Result<VerifiedBy, Reject> {
    if !C::NEEDS_CREDENTIAL {
        let scheme = C::verify(req, &Prepared::Exotel, phone, ctx)?;
        return Ok(VerifiedBy { scheme: scheme.into(), credential: "current".into(), secret_id: None });
    }
    let current = keys_for(state, phone, &phone.credential);
    let first = match &current {
        Some(k) => match settle(state, C::check(req, k, phone, ctx)).await {
            Ok(scheme) => {
                return Ok(VerifiedBy {
                    scheme: scheme.into(),
                    credential: "current".into(),
                    secret_id: Some(phone.credential.clone()),
                })
            }
            Err(why) => why,
        },
        None => Reject::CredentialUnavailable,
    };
    if let Some(prev) = phone.previous_credential.as_ref().filter(|p| now_ms <= p.valid_until_ms) {
        if let Some(k) = keys_for(state, phone, &prev.secret_id) {
            if let Ok(scheme) = settle(state, C::check(req, &k, phone, ctx)).await {
                return Ok(VerifiedBy {
                    scheme: scheme.into(),
                    credential: "previous".into(),
                    secret_id: Some(prev.secret_id.clone()),
                });
            }
        }
    }
    Err(first)
}

trait IntoResponse {
    fn into_response(self) -> HttpResponse;
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        actix_web::ResponseError::error_response(&self)
    }
}
