//! Organizations and their API keys: the admin API, and the same operations for the CLI.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{new_api_key, AdminAuth};
use crate::clock::rfc3339;
use crate::domain::{ApiKeyId, OrgId};
use crate::error::ApiError;
use crate::startup::{admin_resource, get_or_head};
use crate::state::AppState;
use crate::store::{ApiKeyRecord, OrgRecord, Store, StoreError};

pub struct Created {
    pub org: OrgRecord,
    pub key_id: ApiKeyId,
    /// Shown once, to whoever created it.
    pub api_key: String,
}

pub fn validate_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || !crate::domain::text::displayable(name, 200) {
        return Err(ApiError::unprocessable(
            "invalid_field",
            "name: must be 1 to 200 printable characters, without invisible formatting characters",
        ));
    }
    Ok(name.to_owned())
}

pub fn create(store: &dyn Store, name: String, now_ms: i64) -> Result<Created, StoreError> {
    let org = OrgRecord { id: OrgId::generate(), name, created_at_ms: now_ms };
    let (api_key, hash) = new_api_key();
    let key = ApiKeyRecord { id: ApiKeyId::generate(), org_id: org.id.clone(), hash, created_at_ms: now_ms };
    store.org_create(&org, &key)?;
    Ok(Created { org, key_id: key.id, api_key })
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        admin_resource("/admin/orgs", "GET, HEAD, POST")
            .route(web::post().to(create_org))
            .route(get_or_head().to(list_orgs)),
    )
    .service(admin_resource("/admin/orgs/{org_id}/api-keys", "POST").route(web::post().to(add_key)))
    .service(admin_resource("/admin/api-keys/{key_id}", "DELETE").route(web::delete().to(revoke_key)));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrg {
    name: String,
}

async fn create_org(
    state: web::Data<AppState>,
    _: AdminAuth,
    body: web::Json<NewOrg>,
) -> Result<HttpResponse, ApiError> {
    let name = validate_name(&body.name)?;
    let c = create(state.store.as_ref(), name, state.clock.now_ms())?;
    state.commit.commit().await?;
    tracing::info!(org = %c.org.id, key = %c.key_id, "organization created");
    Ok(HttpResponse::Created().json(json!({
        "org_id": c.org.id, "name": c.org.name, "key_id": c.key_id, "api_key": c.api_key,
        "created_at": rfc3339(c.org.created_at_ms),
    })))
}

async fn list_orgs(state: web::Data<AppState>, _: AdminAuth) -> Result<HttpResponse, ApiError> {
    let orgs: Vec<_> = state
        .store
        .org_list()?
        .into_iter()
        .map(|o| json!({"org_id": o.id, "name": o.name, "created_at": rfc3339(o.created_at_ms)}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"orgs": orgs})))
}

async fn add_key(
    state: web::Data<AppState>,
    _: AdminAuth,
    org_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let org_id = OrgId::parse(&org_id).map_err(|_| ApiError::not_found("organization"))?;
    let (api_key, hash) = new_api_key();
    let key = ApiKeyRecord { id: ApiKeyId::generate(), org_id, hash, created_at_ms: state.clock.now_ms() };
    if !state.store.api_key_add(&key)? {
        return Err(ApiError::not_found("organization"));
    }
    state.commit.commit().await?;
    tracing::info!(org = %key.org_id, key = %key.id, "api key issued");
    Ok(HttpResponse::Created().json(json!({"org_id": key.org_id, "key_id": key.id, "api_key": api_key})))
}

async fn revoke_key(
    state: web::Data<AppState>,
    _: AdminAuth,
    key_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key_id = ApiKeyId::parse(&key_id).map_err(|_| ApiError::not_found("api key"))?;
    if !state.store.api_key_revoke(&key_id)? {
        return Err(ApiError::not_found("api key"));
    }
    state.commit.commit().await?;
    tracing::info!(key = %key_id, "api key revoked");
    Ok(HttpResponse::NoContent().finish())
}
