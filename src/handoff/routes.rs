//! Re-driving deliveries by hand: one event, or many after an outage.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::auth::OrgAuth;
use crate::domain::{EventId, PhoneId};
use crate::error::ApiError;
use crate::events::parse_state;
use crate::handoff::outbox::redeliver;
use crate::paging;
use crate::startup::resource;
use crate::state::AppState;
use crate::store::{DeliveryState, EventFilter};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/events/redeliver", "POST").route(web::post().to(redeliver_many)))
        .service(resource("/events/{id}/redeliver", "POST").route(web::post().to(redeliver_one)));
}

async fn redeliver_one(
    state: web::Data<AppState>,
    auth: OrgAuth,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = EventId::parse(&id).map_err(|_| ApiError::not_found("event"))?;
    if redeliver(&state, &[(auth.org_id.clone(), id.clone())]).await? == 0 {
        return Err(ApiError::not_found("event"));
    }
    Ok(HttpResponse::Accepted().json(json!({"event_id": id, "delivery": "pending"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    /// Which deliveries to re-drive: failed (default) or dead.
    state: Option<String>,
    phone_id: Option<String>,
    limit: Option<usize>,
}

async fn redeliver_many(
    state: web::Data<AppState>,
    auth: OrgAuth,
    body: web::Json<Filter>,
) -> Result<HttpResponse, ApiError> {
    let wanted = parse_state(body.state.as_deref().unwrap_or("failed"))
        .ok()
        .filter(|s| matches!(s, DeliveryState::Failed | DeliveryState::Dead))
        .ok_or_else(|| ApiError::unprocessable("invalid_field", "state: failed or dead"))?;
    let phone_id = body
        .phone_id
        .as_deref()
        .map(|p| {
            PhoneId::parse(p).map_err(|_| ApiError::unprocessable("invalid_field", "phone_id: not a phone number id"))
        })
        .transpose()?;
    let limit = paging::limit(body.limit, 1000, 10_000).map_err(|m| ApiError::unprocessable("invalid_field", m))?;
    let filter = EventFilter { phone_id, kind: None, after: None, delivery: Some(wanted), limit };
    let events = state.store.event_list(&auth.org_id, &filter)?;
    let ids: Vec<_> = events.into_iter().map(|ev| (auth.org_id.clone(), ev.id)).collect();
    let n = redeliver(&state, &ids).await?;
    Ok(HttpResponse::Accepted().json(json!({"requeued": n})))
}
