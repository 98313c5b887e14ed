//! The answer path: ask the platform's assistant how to answer an incoming call, within the
//! deadline, and fall back to the number's static stream (or a polite goodbye) otherwise. The
//! carrier always gets a valid answer in time.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::carriers::answer::Decision;
use crate::carriers::telnyx::rest::CallAction;
use crate::carriers::Prepared;
use crate::domain::E164;
use crate::events::event_json;
use crate::state::AppState;
use crate::store::{EventRecord, PhoneRecord};

/// A decision and how it was reached, recorded with the event.
pub struct Decided {
    pub decision: Decision,
    pub record: Value,
}

fn valid(d: &Decision) -> bool {
    match d {
        Decision::Stream { stream_url } => crate::net::outbound::well_formed(stream_url, &["wss", "ws"]),
        Decision::Hangup { message } => message.as_ref().is_none_or(|m| m.len() <= 1000),
        Decision::Transfer { to } => E164::parse(to).is_ok(),
    }
}

/// The answer when no assistant is configured for the number: known before anything is asked.
pub fn without_assistant(state: &AppState, phone: &PhoneRecord) -> Option<Decided> {
    let none = phone.config.assistant_url.is_none() && state.settings.handoff.assistant_url.is_none();
    none.then(|| static_answer(phone))
}

fn static_answer(phone: &PhoneRecord) -> Decided {
    let decision = Decision::fallback(phone);
    Decided { record: json!({"decision": decision, "source": "static"}), decision }
}

/// The answer to a call: `preset`, the one recorded with the event, if there is one; else asked
/// for now and noted on the event.
pub async fn decide_and_note(
    state: &AppState,
    phone: &PhoneRecord,
    ev: &EventRecord,
    preset: Option<Decision>,
) -> Decision {
    if let Some(d) = preset {
        return d;
    }
    let d = decide(state, phone, ev).await;
    match state.commit.set_answer(ev.id.clone(), d.record).await {
        // Its delivery waited for this.
        Ok(()) => state.outbox.poke(),
        Err(e) => tracing::warn!(event = %ev.id, error = %e, "could not note the answer on the event"),
    }
    d.decision
}

async fn decide(state: &AppState, phone: &PhoneRecord, ev: &EventRecord) -> Decided {
    let url = phone.config.assistant_url.as_deref().or(state.settings.handoff.assistant_url.as_deref());
    let Some(url) = url else { return static_answer(phone) };
    let deadline = state.settings.handoff.answer_deadline;
    let started = Instant::now();
    let reason = match ask(state, url, ev, deadline).await {
        Ok(d) if valid(&d) => {
            let ms = started.elapsed().as_millis() as u64;
            return Decided { record: json!({"decision": d, "source": "assistant", "latency_ms": ms}), decision: d };
        }
        Ok(_) => "malformed_reply".to_owned(),
        Err(r) => r,
    };
    tracing::warn!(phone = %phone.id, event = %ev.id, reason = %reason, "assistant gave no usable answer; using the fallback");
    let decision = Decision::fallback(phone);
    Decided { record: json!({"decision": decision, "source": "fallback", "reason": reason}), decision }
}

async fn ask(state: &AppState, url: &str, ev: &EventRecord, deadline: Duration) -> Result<Decision, String> {
    // A URL stored before its address was refused is not called either.
    let (client, reach) = state.reach(url, state.settings.handoff.assistant_url.as_deref());
    if !reach.allows_url(url) {
        return Err("address_not_allowed".into());
    }
    let body = serde_json::to_vec(&event_json(ev, None)).map_err(|e| e.to_string())?;
    let ts = state.clock.now_secs();
    let req = client
        .post(url)
        .timeout(deadline)
        .header("content-type", "application/json")
        .header("webhook-id", ev.id.as_str())
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", state.signer.sign(ev.id.as_str(), ts, &body))
        .body(body);
    let started = Instant::now();
    let res = match tokio::time::timeout(deadline, req.send()).await {
        Err(_) => return Err("timeout".into()),
        Ok(Err(e)) if e.is_timeout() => return Err("timeout".into()),
        Ok(Err(_)) => return Err("unreachable".into()),
        Ok(Ok(r)) => r,
    };
    if !res.status().is_success() {
        return Err(format!("status {}", res.status().as_u16()));
    }
    // The body shares the deadline with the headers.
    let remaining = deadline.saturating_sub(started.elapsed());
    let bytes = match tokio::time::timeout(remaining, crate::net::outbound::body_within(res, REPLY_MAX)).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return Err("malformed_reply".into()),
        _ => return Err("timeout".into()),
    };
    serde_json::from_slice::<Decision>(&bytes).map_err(|_| "malformed_reply".into())
}

/// A reply holds a few hundred bytes; more than this is no reply. The assistant is the
/// organization's to point anywhere.
const REPLY_MAX: usize = 64 * 1024;

/// Telnyx takes no instructions in the webhook response: the call is answered (or rejected,
/// or transferred) by a Call Control command afterwards, with the number's API key, retried on
/// 5xx. `command_id` is the event id, so a retry can never act twice.
/// `preset`: the answer already recorded with the event (no assistant to ask).
pub async fn answer_telnyx(state: &AppState, phone: &PhoneRecord, ev: &EventRecord, preset: Option<Decision>) {
    let Some(ccid) = ev.call_id.clone() else { return };
    let decision = decide_and_note(state, phone, ev, preset).await;
    let keys = crate::carriers::pipeline::keys_for(state, phone, &phone.credential);
    let api_key = match keys.as_deref() {
        Some(Prepared::Telnyx { api_key, .. }) => api_key,
        _ => {
            tracing::error!(phone = %phone.id, "no Telnyx API key to answer the call with");
            return;
        }
    };
    let command_id = ev.id.as_str();
    let (action, body) = match &decision {
        Decision::Stream { stream_url } => (
            CallAction::Answer,
            json!({
                "stream_url": stream_url,
                "stream_track": "inbound_track",
                "stream_bidirectional_mode": "rtp",
                "stream_bidirectional_codec": "PCMU",
                "command_id": command_id,
            }),
        ),
        Decision::Transfer { to } => (CallAction::Transfer, json!({"to": to, "command_id": command_id})),
        Decision::Hangup { .. } => (CallAction::Reject, json!({"cause": "CALL_REJECTED", "command_id": command_id})),
    };
    for attempt in 0..4u32 {
        match state.provider_api.telnyx_command(api_key, &ccid, action, &body).await {
            Ok(()) => {
                tracing::info!(phone = %phone.id, event = %ev.id, action = action.as_str(), "Telnyx call command sent");
                return;
            }
            Err(
                crate::carriers::rest::ProviderError::Unavailable { .. }
                | crate::carriers::rest::ProviderError::Timeout
                | crate::carriers::rest::ProviderError::RateLimited { .. },
            ) if attempt < 3 => {
                tokio::time::sleep(Duration::from_millis(200 * 3u64.pow(attempt))).await;
            }
            Err(e) => {
                tracing::error!(phone = %phone.id, event = %ev.id, error = %e, "Telnyx call command failed");
                return;
            }
        }
    }
}
