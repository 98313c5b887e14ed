//! The carriers' webhook URLs. Every one goes through the same pipeline.

use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use super::exotel::Exotel;
use super::pipeline::{handle, Locate};
use super::plivo::Plivo;
use super::telnyx::Telnyx;
use super::twilio::Twilio;
use super::vobiz::Vobiz;
use super::{CarrierHooks, Hook};
use crate::error::ApiError;
use crate::startup::resource;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    carrier::<Plivo>(cfg, "plivo");
    carrier::<Vobiz>(cfg, "vobiz");
    carrier::<Twilio>(cfg, "twilio");
    carrier::<Exotel>(cfg, "exotel");
    cfg.service(resource("/webhooks/telnyx/voice", "POST").route(web::post().to(telnyx)));
}

/// `/{name}/incoming/{phone_id}` and `/{name}/status/{phone_id}`, split by hand: actix matches
/// a path with a `{segment}` by regex, route by route, and that was a twentieth of the CPU of
/// each callback. A scope's static prefix is a plain string comparison.
fn carrier<C: CarrierHooks>(cfg: &mut web::ServiceConfig, name: &str) {
    cfg.service(web::scope(&format!("/{name}")).default_service(web::to(dispatch::<C>)));
}

async fn dispatch<C: CarrierHooks>(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let rest = req.match_info().unprocessed();
    let (hook, id) = match rest.strip_prefix('/').and_then(|r| r.split_once('/')) {
        Some(("incoming", id)) if !id.is_empty() && !id.contains('/') => (Hook::Incoming, id),
        Some(("status", id)) if !id.is_empty() && !id.contains('/') => (Hook::Status, id),
        _ => return ApiError::not_found("resource").error_response(),
    };
    if req.method() != Method::GET && req.method() != Method::POST {
        return ApiError::method_not_allowed_but("GET, POST").error_response();
    }
    let id = id.to_owned();
    handle::<C>(state, req, payload, Locate::Path(id), hook).await
}

async fn telnyx(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    handle::<Telnyx>(state, req, payload, Locate::Payload, Hook::Events).await
}
