//! The organization's recorded events and their delivery state.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::OrgAuth;
use crate::clock::rfc3339;
use crate::domain::{EventId, PhoneId};
use crate::error::ApiError;
use crate::paging;
use crate::startup::{get_or_head, resource};
use crate::state::AppState;
use crate::store::{DeliveryRecord, DeliveryState, EventFilter, EventRecord};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/events", "GET, HEAD").route(get_or_head().to(list)))
        .service(resource("/events/{id}", "GET, HEAD").route(get_or_head().to(get)));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    phone_id: Option<String>,
    kind: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    delivery: Option<String>,
}

pub fn event_json(ev: &EventRecord, delivery: Option<&DeliveryRecord>) -> Value {
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("received_at_ms");
        if let Some(form) = &ev.form {
            let params = crate::carriers::params::received_json(form);
            obj.insert("params".into(), serde_json::from_str(params.get()).unwrap_or(Value::Null));
        }
        if let Some(d) = delivery {
            obj.insert(
                "delivery".into(),
                json!({
                    "state": d.state,
                    "next_attempt_at": matches!(d.state, DeliveryState::Pending | DeliveryState::Failed).then(|| rfc3339(d.next_attempt_ms)),
                    "attempts": d.attempts.iter().map(|a| json!({
                        "at": rfc3339(a.at_ms), "status_code": a.status_code, "latency_ms": a.latency_ms, "error": a.error,
                    })).collect::<Vec<_>>(),
                }),
            );
        }
    }
    v
}

pub fn parse_state(s: &str) -> Result<DeliveryState, ApiError> {
    match s {
        "pending" => Ok(DeliveryState::Pending),
        "delivered" => Ok(DeliveryState::Delivered),
        "failed" => Ok(DeliveryState::Failed),
        "dead" => Ok(DeliveryState::Dead),
        _ => Err(ApiError::bad_request("invalid_query", "delivery: one of pending, delivered, failed, dead")),
    }
}

async fn list(state: web::Data<AppState>, auth: OrgAuth, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let bad = |m: &str| ApiError::bad_request("invalid_query", m.to_owned());
    let filter = EventFilter {
        phone_id: q
            .phone_id
            .as_deref()
            .map(|p| PhoneId::parse(p).map_err(|_| bad("phone_id: not a phone number id")))
            .transpose()?,
        kind: q.kind.clone(),
        after: q.after.as_deref().map(|a| EventId::parse(a).map_err(|_| bad("after: not an event id"))).transpose()?,
        delivery: q.delivery.as_deref().map(parse_state).transpose()?,
        limit: paging::limit(q.limit, 100, 1000).map_err(|m| ApiError::bad_request("invalid_query", m))?,
    };
    let events = state.store.event_list(&auth.org_id, &filter)?;
    let next = (events.len() == filter.limit).then(|| events.last().map(|e| e.id.clone())).flatten();
    let mut out = Vec::with_capacity(events.len());
    for ev in &events {
        out.push(event_json(ev, state.store.delivery_get(&auth.org_id, &ev.id)?.as_ref()));
    }
    Ok(HttpResponse::Ok().json(json!({"events": out, "next_after": next})))
}

async fn get(state: web::Data<AppState>, auth: OrgAuth, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = EventId::parse(&id).map_err(|_| ApiError::not_found("event"))?;
    let ev = state.store.event_get(&auth.org_id, &id)?.ok_or_else(|| ApiError::not_found("event"))?;
    let d = state.store.delivery_get(&auth.org_id, &id)?;
    Ok(HttpResponse::Ok().json(event_json(&ev, d.as_ref())))
}
