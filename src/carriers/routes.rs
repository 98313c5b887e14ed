//! The carriers' webhook URLs. Every one goes through the same pipeline.

use actix_web::{web, HttpRequest, HttpResponse};

use super::exotel::Exotel;
use super::pipeline::{handle, Locate};
use super::plivo::Plivo;
use super::telnyx::Telnyx;
use super::twilio::Twilio;
use super::vobiz::Vobiz;
use super::{CarrierHooks, Hook};
use crate::error::ApiError;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    carrier::<Plivo>(cfg, "plivo");
    carrier::<Vobiz>(cfg, "vobiz");
    carrier::<Twilio>(cfg, "twilio");
    carrier::<Exotel>(cfg, "exotel");
    cfg.service(
        web::resource("/webhooks/telnyx/voice")
            .route(web::post().to(telnyx))
            .default_service(web::to(method_not_allowed)),
    );
}

fn carrier<C: CarrierHooks>(cfg: &mut web::ServiceConfig, name: &str) {
    cfg.service(
        web::resource(format!("/{name}/incoming/{{phone_id}}"))
            .route(web::get().to(incoming::<C>))
            .route(web::post().to(incoming::<C>))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("/{name}/status/{{phone_id}}"))
            .route(web::get().to(status::<C>))
            .route(web::post().to(status::<C>))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn incoming<C: CarrierHooks>(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    handle::<C>(state, req, payload, Locate::Path(path.into_inner()), Hook::Incoming).await
}

async fn status<C: CarrierHooks>(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    handle::<C>(state, req, payload, Locate::Path(path.into_inner()), Hook::Status).await
}

async fn telnyx(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    handle::<Telnyx>(state, req, payload, Locate::Payload, Hook::Events).await
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this URL does not take that method",
    ))
}
