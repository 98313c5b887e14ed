//! `/byok…` and `/audit`: the organization's view of its vault. No response ever carries a
//! secret, not even right after it was set.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{catalog, validate};
use crate::auth::OrgAuth;
use crate::clock::rfc3339;
use crate::domain::{AuditId, PhoneCredential, PhoneId, E164};
use crate::error::ApiError;
use crate::net::strict_json::Strict;
use crate::startup::{get_or_head, resource};
use crate::state::AppState;
use crate::store::{AuditRecord, Conflict, SecretRecord};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/byok/providers", "GET, HEAD").route(get_or_head().to(providers)))
        .service(resource("/byok/config", "GET, HEAD").route(get_or_head().to(config)))
        .service(
            resource("/byok", "GET, HEAD, POST, DELETE")
                .route(get_or_head().to(list))
                .route(web::post().to(set))
                .route(web::delete().to(delete_body)),
        )
        .service(resource("/byok/set", "POST").route(web::post().to(set_alias)))
        .service(resource("/byok/{provider}", "DELETE").route(web::delete().to(delete_path)))
        .service(resource("/audit", "GET, HEAD").route(get_or_head().to(audit)));
}

async fn providers() -> HttpResponse {
    HttpResponse::Ok().json(json!({"providers": catalog::all()}))
}

async fn config() -> HttpResponse {
    let providers: Vec<Value> = catalog::all()
        .iter()
        .map(|p| {
            json!({"id": p.provider, "name": p.name, "category": p.kind, "docs_url": p.docs_url,
                   "models": p.models.clone().unwrap_or_default()})
        })
        .collect();
    HttpResponse::Ok().json(json!({"providers": providers}))
}

fn credential_json(r: &SecretRecord) -> Value {
    let prefix = catalog::find(&r.provider).and_then(|p| p.key_prefix.as_deref());
    let hint = r.hint.as_deref().map(|h| stored_hint(h, prefix));
    json!({
        "provider": r.provider,
        "secret_id": r.id,
        "hint": hint.as_deref().or(r.identifier.as_deref()),
        "label": r.label,
        "created_at": rfc3339(r.created_at_ms),
        "updated_at": rfc3339(r.updated_at_ms),
    })
}

/// A hint as stored, cut to what hints show now: the provider's published prefix and the last
/// four characters. Hints stored before showed up to six characters before the key's first
/// dash, most of a short key whose dash is its own; those are not shown again.
fn stored_hint(stored: &str, prefix: Option<&str>) -> String {
    let (head, tail) = stored.rsplit_once("...").unwrap_or(("", stored));
    let tail_at = tail.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
    let head = prefix.filter(|p| *p == head).unwrap_or("");
    format!("{head}...{}", &tail[tail_at..])
}

fn byok_keys(recs: &[SecretRecord]) -> Value {
    let mut keys = Map::new();
    for p in catalog::all() {
        let id = recs.iter().find(|r| r.provider == p.provider).map(|r| json!(r.id)).unwrap_or(Value::Null);
        keys.insert(format!("{}_secret_id", p.provider), id);
    }
    Value::Object(keys)
}

async fn list(state: web::Data<AppState>, auth: OrgAuth) -> Result<HttpResponse, ApiError> {
    let recs = state.store.byok_list(&auth.org_id)?;
    let creds: Vec<Value> = recs.iter().map(credential_json).collect();
    Ok(HttpResponse::Ok().json(json!({"byok_keys": byok_keys(&recs), "credentials": creds})))
}

fn field<'a>(body: &'a Value, name: &'static str) -> Result<&'a Value, ApiError> {
    body.get(name).ok_or_else(|| ApiError::unprocessable("invalid_field", format!("{name}: is required")))
}

fn provider_of(body: &Value) -> Result<&str, ApiError> {
    field(body, "provider")?
        .as_str()
        .ok_or_else(|| ApiError::unprocessable("invalid_field", "provider: must be a string"))
}

async fn set(state: web::Data<AppState>, auth: OrgAuth, body: web::Json<Strict>) -> Result<HttpResponse, ApiError> {
    store_secret(&state, &auth, &body, "api_key").await
}

async fn set_alias(
    state: web::Data<AppState>,
    auth: OrgAuth,
    body: web::Json<Strict>,
) -> Result<HttpResponse, ApiError> {
    store_secret(&state, &auth, &body, "key").await
}

async fn store_secret(
    state: &AppState,
    auth: &OrgAuth,
    body: &Value,
    key_field: &'static str,
) -> Result<HttpResponse, ApiError> {
    if !body.is_object() {
        return Err(ApiError::unprocessable("invalid_field", "the body must be a JSON object"));
    }
    if let Some(unknown) = body
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|k| !["provider", key_field, "label"].contains(&k.as_str()))
    {
        return Err(ApiError::unprocessable(
            "invalid_field",
            format!("{}: unknown field", crate::error::shown_field(unknown)),
        ));
    }
    let now = state.clock.now_ms();
    state.byok_limiter.check(&auth.org_id, now).map_err(ApiError::rate_limited)?;
    let provider = provider_of(body)?;
    let label =
        match body.get("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if crate::domain::text::displayable(s, 200) => Some(s.clone()),
            Some(_) => return Err(ApiError::unprocessable(
                "invalid_field",
                "label: must be a string of at most 200 printable characters, without invisible formatting characters",
            )),
        };
    let new = validate(provider, field(body, key_field)?)?;
    let checked = match &new.carrier {
        Some(cred) => numbers_kept_on_the_account(state, auth, cred).await?,
        None => Vec::new(),
    };
    let rec = state.vault.seal(&auth.org_id, &new, label, now);
    let audit = AuditRecord {
        org_id: auth.org_id.clone(),
        key_id: Some(auth.key_id.clone()),
        action: "set".into(),
        provider: rec.provider.clone(),
        at_ms: now,
    };
    let grace_until = now + state.settings.credential_grace.as_millis() as i64;
    let replaced = match state.store.byok_put(&rec, &audit, grace_until, &checked)? {
        Ok(replaced) => replaced,
        Err(_) => {
            return Err(ApiError::conflict(
                "credential_changed",
                format!("a number was imported with the saved {} credential meanwhile; try again", rec.provider),
            ))
        }
    };
    state.commit.commit().await?;
    state.credentials.invalidate_all();
    tracing::info!(org = %auth.org_id, provider = %rec.provider, replaced = replaced.is_some(), "byok credential set");
    let recs = state.store.byok_list(&auth.org_id)?;
    Ok(HttpResponse::Ok()
        .json(json!({"success": true, "byok_keys": byok_keys(&recs), "credential": credential_json(&rec)})))
}

/// The numbers that verify their webhooks with the organization's saved credential of `cred`'s
/// carrier, once the carrier has shown each of them on the account of `cred`, the credential
/// that replaces it. Replacing moves them all to the new one and keeps only the replaced one as
/// their previous: taken on trust, a mistyped token set twice would leave them none their
/// carrier signs with. So it is checked as a number's own new credential is.
async fn numbers_kept_on_the_account(
    state: &AppState,
    auth: &OrgAuth,
    cred: &PhoneCredential,
) -> Result<Vec<PhoneId>, ApiError> {
    let carrier = cred.carrier();
    let Some(saved) = state.store.byok_get(&auth.org_id, carrier.as_str())? else { return Ok(Vec::new()) };
    let users = state.store.phones_using(&auth.org_id, &saved.id)?;
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let numbers: Vec<&E164> = users.iter().map(|p| &p.number).collect();
    crate::phones::all_on_account(state, &auth.org_id, carrier, cred, &numbers).await?;
    Ok(users.into_iter().map(|p| p.id).collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    provider: String,
}

async fn delete_body(
    state: web::Data<AppState>,
    auth: OrgAuth,
    body: web::Json<DeleteBody>,
) -> Result<HttpResponse, ApiError> {
    remove(&state, &auth, &body.provider).await
}

async fn delete_path(
    state: web::Data<AppState>,
    auth: OrgAuth,
    provider: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    remove(&state, &auth, &provider).await
}

async fn remove(state: &AppState, auth: &OrgAuth, provider: &str) -> Result<HttpResponse, ApiError> {
    let entry = catalog::find(provider).ok_or_else(|| {
        ApiError::unprocessable("unknown_provider", format!("unknown provider; accepted: {}", catalog::accepted_list()))
    })?;
    let audit = AuditRecord {
        org_id: auth.org_id.clone(),
        key_id: Some(auth.key_id.clone()),
        action: "delete".into(),
        provider: entry.provider.clone(),
        at_ms: state.clock.now_ms(),
    };
    match state.store.byok_delete(&auth.org_id, &entry.provider, &audit)? {
        Ok(true) => {}
        Ok(false) => return Err(ApiError::not_found("credential")),
        Err(Conflict::InUse(n)) => {
            return Err(ApiError::conflict(
                "credential_in_use",
                format!("{n} phone number(s) verify their webhooks with this credential; delete them or give them another credential first"),
            ))
        }
        Err(Conflict::NumberTaken | Conflict::CredentialChanged) => return Err(ApiError::internal("unexpected conflict")),
    }
    state.commit.commit().await?;
    state.credentials.invalidate_all();
    let recs = state.store.byok_list(&auth.org_id)?;
    Ok(HttpResponse::Ok().json(json!({"success": true, "byok_keys": byok_keys(&recs)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    /// The `next_before` of the page before: the entries older than it.
    before: Option<String>,
}

async fn audit(state: web::Data<AppState>, auth: OrgAuth, q: web::Query<AuditQuery>) -> Result<HttpResponse, ApiError> {
    let limit = crate::paging::limit(q.limit, 100, 1000).map_err(|m| ApiError::bad_request("invalid_query", m))?;
    let before = q
        .before
        .as_deref()
        .map(|b| AuditId::parse(b).map_err(|_| ApiError::bad_request("invalid_query", "before: not an audit entry id")))
        .transpose()?;
    let entries = state.store.audit_list(&auth.org_id, before.as_ref(), limit)?;
    // A full page may have older entries behind it; its oldest is where the next page ends.
    let next_before = entries.first().filter(|_| entries.len() == limit).map(|(id, _)| id.to_string());
    let items: Vec<Value> = entries
        .into_iter()
        .map(|(id, a)| {
            json!({"id": id, "key_id": a.key_id, "action": a.action, "provider": a.provider, "at": rfc3339(a.at_ms)})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"audit": items, "next_before": next_before})))
}

#[cfg(test)]
mod tests {
    use super::stored_hint;

    #[test]
    fn hints_stored_before_show_only_the_published_prefix_and_four_characters() {
        assert_eq!(stored_hint("sk-...AbCd", Some("sk-")), "sk-...AbCd");
        assert_eq!(stored_hint("sk-ant-...AbCd", Some("sk-ant-")), "sk-ant-...AbCd");
        // An Anthropic key's old hint stopped at its first dash: not its prefix.
        assert_eq!(stored_hint("sk-...AbCd", Some("sk-ant-")), "...AbCd");
        // A key of a provider without a published prefix showed its own head.
        assert_eq!(stored_hint("abcdef-...-ijk", None), "...-ijk");
        assert_eq!(stored_hint("...mnop", None), "...mnop");
    }
}
