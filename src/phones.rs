//! Phone numbers: validate a carrier account, import one of its numbers (BYOK billing), and
//! manage what was imported.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::auth::OrgAuth;
use crate::carriers::rest::{ListedNumber, ProviderError, Release, WebhookTargets};
use crate::clock::rfc3339;
use crate::domain::{Carrier, OrgId, PhoneCredential, PhoneId, SecretId, E164};
use crate::error::ApiError;
use crate::net::outbound::Reach;
use crate::net::strict_json::{self, Strict};
use crate::paging;
use crate::settings::Settings;
use crate::startup::{get_or_head, resource};
use crate::state::AppState;
use crate::store::{Conflict, Modified, PhoneConfig, PhoneRecord, PreviousCredential, SecretRecord};
use crate::vault;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/voice/{provider}/byok/validate", "POST").route(web::post().to(validate)))
        .service(resource("/voice/{provider}/byok/import", "POST").route(web::post().to(import)))
        .service(resource("/phone-numbers", "GET, HEAD").route(get_or_head().to(list)))
        .service(
            resource("/phone-numbers/{id}", "GET, HEAD, PATCH, DELETE")
                .route(get_or_head().to(get))
                .route(web::patch().to(patch))
                .route(web::delete().to(delete)),
        );
}

fn carrier(path: &str) -> Result<Carrier, ApiError> {
    path.parse().map_err(|_| ApiError::not_found("carrier (accepted: vobiz, twilio, plivo, exotel, telnyx)"))
}

fn provider_error(carrier: Carrier, e: ProviderError) -> ApiError {
    match e {
        ProviderError::InvalidCredentials { message } => ApiError::unprocessable(
            "invalid_provider_credentials",
            match message {
                Some(m) => format!("{carrier} rejected the credentials: {m}"),
                None => format!("{carrier} rejected the credentials"),
            },
        ),
        ProviderError::Timeout => ApiError::new(
            actix_web::http::StatusCode::GATEWAY_TIMEOUT,
            "provider_timeout",
            format!("{carrier}'s API did not answer in time"),
        ),
        ProviderError::Refused { message } => ApiError::unprocessable("provider_refused", message),
        ProviderError::PreviousUnknown { message } => ApiError::conflict("previous_route_unknown", message),
        ProviderError::RateLimited { retry_after_secs } => ApiError::new(
            actix_web::http::StatusCode::TOO_MANY_REQUESTS,
            "provider_rate_limited",
            format!("{carrier} is rate-limiting this account's API requests; try again later"),
        )
        .retry_after(retry_after_secs.unwrap_or(60)),
        ProviderError::NotFound | ProviderError::Unavailable { .. } => {
            tracing::warn!(carrier = %carrier, error = %e, "carrier API unavailable");
            ApiError::new(
                actix_web::http::StatusCode::BAD_GATEWAY,
                "provider_unavailable",
                format!("{carrier}'s API is unavailable or gave an answer callgate cannot read"),
            )
        }
    }
}

/// The credential to talk to the carrier with: given inline (validated, to be sealed), or the
/// organization's saved BYOK credential.
enum Source {
    Inline(Box<vault::NewSecret>, PhoneCredential),
    Saved(Box<SecretRecord>, PhoneCredential),
}

impl Source {
    fn credential(&self) -> &PhoneCredential {
        match self {
            Source::Inline(_, c) | Source::Saved(_, c) => c,
        }
    }
}

fn credential_source(
    state: &AppState,
    auth: &OrgAuth,
    carrier: Carrier,
    given: Option<&Value>,
) -> Result<Source, ApiError> {
    match given {
        Some(v) if !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()) => {
            let (new, cred) = inline_credential(carrier, v)?;
            Ok(Source::Inline(Box::new(new), cred))
        }
        _ => {
            let rec = state.store.byok_get(&auth.org_id, carrier.as_str())?.ok_or_else(|| {
                ApiError::unprocessable(
                    "no_saved_credentials",
                    format!("no saved {carrier} credentials; set them with POST /byok or pass credentials"),
                )
            })?;
            let cred = state.vault.open_phone(&rec).map_err(ApiError::internal)?;
            Ok(Source::Saved(Box::new(rec), cred))
        }
    }
}

/// Credentials given with the request: checked, ready to seal, and usable with the carrier.
fn inline_credential(carrier: Carrier, v: &Value) -> Result<(vault::NewSecret, PhoneCredential), ApiError> {
    let mut new = vault::validate(carrier.as_str(), v)?;
    let cred = new.carrier.take().ok_or_else(|| ApiError::internal("a carrier's credential was not parsed as one"))?;
    Ok((new, cred))
}

/// The numbers on the account `cred` opens, as the carrier lists them. Every operation that
/// reaches the carrier lists first, and each makes requests on the customer's own carrier
/// account, so an organization gets only so many such operations a minute.
async fn listed_numbers(
    state: &AppState,
    org: &OrgId,
    carrier: Carrier,
    cred: &PhoneCredential,
) -> Result<Vec<ListedNumber>, ApiError> {
    state.carrier_limiter.check(org, state.clock.now_ms()).map_err(ApiError::rate_limited)?;
    state.provider_api.list_numbers(cred).await.map_err(|e| provider_error(carrier, e))
}

/// The carrier's listing of `number` on the account `cred` opens; 422 if it is not there.
async fn on_account(
    state: &AppState,
    org: &OrgId,
    carrier: Carrier,
    cred: &PhoneCredential,
    number: &E164,
) -> Result<ListedNumber, ApiError> {
    let listed = listed_numbers(state, org, carrier, cred).await?;
    listed.into_iter().find(|n| &n.number == number).ok_or_else(|| {
        ApiError::unprocessable("number_not_on_account", format!("{number} is not on this {carrier} account"))
    })
}

/// Whether the carrier lists every one of `numbers` on the account `cred` opens; 422 naming
/// those it does not (the first few), as [`on_account`] does for one.
pub(crate) async fn all_on_account(
    state: &AppState,
    org: &OrgId,
    carrier: Carrier,
    cred: &PhoneCredential,
    numbers: &[&E164],
) -> Result<(), ApiError> {
    const NAMED: usize = 5;
    let listed = listed_numbers(state, org, carrier, cred).await?;
    let missing: Vec<&E164> = numbers.iter().copied().filter(|n| !listed.iter().any(|l| &l.number == *n)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut named = missing.iter().take(NAMED).map(ToString::to_string).collect::<Vec<_>>().join(", ");
    if missing.len() > NAMED {
        named.push_str(&format!(" and {} more", missing.len() - NAMED));
    }
    Err(ApiError::unprocessable(
        "number_not_on_account",
        format!(
            "{} number(s) verifying their webhooks with the saved {carrier} credential are not on this account: {named}",
            missing.len()
        ),
    ))
}

async fn validate(
    state: web::Data<AppState>,
    auth: OrgAuth,
    path: web::Path<String>,
    body: web::Json<Strict>,
) -> Result<HttpResponse, ApiError> {
    let carrier = carrier(&path)?;
    let obj =
        body.as_object().ok_or_else(|| ApiError::unprocessable("invalid_field", "the body must be a JSON object"))?;
    // Either {"credentials": {...}} and nothing else, or the credential object itself.
    if let Some(other) = obj.get("credentials").and_then(|_| obj.keys().find(|k| *k != "credentials")) {
        return Err(ApiError::unprocessable(
            "invalid_field",
            format!("{}: unknown field", crate::error::shown_field(other)),
        ));
    }
    let given = obj.get("credentials").or((!obj.is_empty()).then_some(&*body));
    let source = credential_source(&state, &auth, carrier, given)?;
    let numbers = listed_numbers(&state, &auth.org_id, carrier, source.credential()).await?;
    Ok(HttpResponse::Ok().json(json!({"valid": true, "provider": carrier, "numbers": numbers})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    number: String,
    #[serde(default, deserialize_with = "strict_json::option")]
    credentials: Option<Value>,
    label: Option<String>,
    #[serde(default, deserialize_with = "strict_json::option_object")]
    config: Option<Map<String, Value>>,
    #[serde(default)]
    configure_provider: bool,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_field", msg)
}

fn label(v: Option<&str>) -> Result<Option<String>, ApiError> {
    match v {
        Some(l) if !crate::domain::text::displayable(l, 200) => {
            Err(invalid("label: must be at most 200 printable characters, without invisible formatting characters"))
        }
        other => Ok(other.map(str::to_owned)),
    }
}

fn url_field(v: &Value, name: &str, schemes: &[&str]) -> Result<Option<String>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            let ok = crate::net::outbound::well_formed(s, schemes);
            if ok && s.len() <= 2048 {
                Ok(Some(s.clone()))
            } else {
                Err(invalid(format!("config.{name}: must be a {} URL", schemes.join(" or "))))
            }
        }
        _ => Err(invalid(format!("config.{name}: must be a string"))),
    }
}

/// A URL the gateway itself will call with the number's events: an organization may not aim
/// it at addresses no service of its own can have (`net::outbound`), nor into the networks the
/// operator denies organizations (`CALLGATE_ORG_URL_DENY`), where the gateway's own network
/// position is all the request would gain. The operator's own URL for the same purpose
/// (`operators`) is taken as it is. A host name is checked when resolved.
fn fetched_url_field(
    v: &Value,
    name: &str,
    operators: Option<&str>,
    reach: &Reach,
) -> Result<Option<String>, ApiError> {
    let url = url_field(v, name, &["https", "http"])?;
    let Some(u) = url.as_deref().filter(|u| !operators.is_some_and(|o| crate::net::outbound::same_url(o, u))) else {
        return Ok(url);
    };
    if !crate::net::outbound::allowed_url(u) {
        return Err(invalid(format!(
            "config.{name}: must not be a link-local, unspecified, broadcast or metadata address"
        )));
    }
    if !reach.allows_url(u) {
        return Err(invalid(format!("config.{name}: must not be an address of the networks this gateway runs in")));
    }
    Ok(url)
}

/// A label may come as `label` or as `config.label`; given both, which one was meant cannot be
/// known (import and PATCH used to pick differently), so neither is taken.
fn both_labels(top: bool, config: Option<&Map<String, Value>>) -> Result<(), ApiError> {
    if top && config.is_some_and(|c| c.contains_key("label")) {
        return Err(invalid("label: give label or config.label, not both"));
    }
    Ok(())
}

const TOKEN_SHAPE: &str =
    "config.exotel_webhook_token: must be 16 to 256 characters from A-Z, a-z, 0-9 and - . _ ~ (it goes into a URL as is)";

/// Applies a `config` object onto `cfg`; keys set to null are cleared. Returns a label found
/// inside it, since the issue allows `config.label` as well as top-level `label`.
fn apply_config(
    cfg: &mut PhoneConfig,
    given: &Map<String, Value>,
    settings: &Settings,
) -> Result<Option<Option<String>>, ApiError> {
    let (h, reach) = (&settings.handoff, &settings.org_reach);
    let mut label_out = None;
    for (k, v) in given {
        match k.as_str() {
            "stream_url" => cfg.stream_url = url_field(v, "stream_url", &["wss", "ws"])?,
            "assistant_url" => {
                cfg.assistant_url = fetched_url_field(v, "assistant_url", h.assistant_url.as_deref(), reach)?
            }
            "upstream_url" => {
                cfg.upstream_url = fetched_url_field(v, "upstream_url", h.upstream_url.as_deref(), reach)?
            }
            "exotel_webhook_token" => {
                cfg.exotel_webhook_token_sha256 = match v {
                    Value::Null => None,
                    // Only what a URL carries as is: Exotel sends the token back in the query,
                    // where `+` is read as a space and `%`, `&` and `#` change what arrives, so a
                    // token holding one could never match.
                    Value::String(t)
                        if (16..=256).contains(&t.len())
                            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) =>
                    {
                        Some(Sha256::digest(t.as_bytes()).into())
                    }
                    _ => return Err(invalid(TOKEN_SHAPE)),
                }
            }
            "label" => {
                label_out = Some(match v {
                    Value::Null => None,
                    Value::String(s) => label(Some(s))?,
                    _ => return Err(invalid("config.label: must be a string")),
                })
            }
            other => return Err(invalid(format!("config.{}: unknown setting", crate::error::shown_field(other)))),
        }
    }
    Ok(label_out)
}

pub fn webhook_urls(public_url: &str, carrier: Carrier, id: &PhoneId) -> WebhookTargets {
    match carrier {
        Carrier::Telnyx => {
            let url = format!("{public_url}/webhooks/telnyx/voice");
            WebhookTargets { incoming: url.clone(), status: url }
        }
        c => WebhookTargets {
            incoming: format!("{public_url}/{c}/incoming/{id}"),
            status: format!("{public_url}/{c}/status/{id}"),
        },
    }
}

fn phone_json(state: &AppState, p: &PhoneRecord) -> Value {
    let urls = webhook_urls(&state.settings.public_url, p.provider, &p.id);
    json!({
        "id": p.id,
        "number": p.number,
        "provider": p.provider,
        "provider_number_id": p.provider_number_id,
        "friendly_name": p.friendly_name,
        "label": p.label,
        "billing_status": p.billing_status,
        "monthly_cost_cents": p.monthly_cost_cents,
        "config": {
            "stream_url": p.config.stream_url,
            "assistant_url": p.config.assistant_url,
            "upstream_url": p.config.upstream_url,
            "exotel_webhook_token_set": p.config.exotel_webhook_token_sha256.is_some(),
        },
        "credential_secret_id": p.credential,
        "previous_credential": p.previous_credential.as_ref().map(|pc| json!({
            "secret_id": pc.secret_id, "valid_until": rfc3339(pc.valid_until_ms)})),
        "webhook_urls": {"incoming": urls.incoming, "status": urls.status},
        "provider_configuration": p.provider_configuration,
        "created_at": rfc3339(p.created_at_ms),
        "updated_at": rfc3339(p.updated_at_ms),
    })
}

async fn import(
    state: web::Data<AppState>,
    auth: OrgAuth,
    path: web::Path<String>,
    body: web::Json<ImportBody>,
) -> Result<HttpResponse, ApiError> {
    let carrier = carrier(&path)?;
    let body = body.into_inner();
    let number = E164::parse(&body.number).map_err(|e| invalid(format!("number: {e}")))?;
    both_labels(body.label.is_some(), body.config.as_ref())?;
    let mut config = PhoneConfig::default();
    let mut lbl = label(body.label.as_deref())?;
    if let Some(c) = &body.config {
        if let Some(l) = apply_config(&mut config, c, &state.settings)? {
            lbl = lbl.or(l);
        }
    }
    if config.exotel_webhook_token_sha256.is_some() && carrier != Carrier::Exotel {
        return Err(invalid("config.exotel_webhook_token: only Exotel numbers take a webhook token"));
    }
    // Only the organization's own numbers are refused before its credential is checked: for
    // another's, the answer waits until the carrier has shown the number on this account,
    // or anyone could ask which numbers are imported here.
    if state.store.phone_by_number(&number)?.is_some_and(|p| p.org_id == auth.org_id) {
        return Err(ApiError::conflict("number_already_imported", format!("{number} is already imported")));
    }
    let source = credential_source(&state, &auth, carrier, body.credentials.as_ref())?;
    let found = on_account(&state, &auth.org_id, carrier, source.credential(), &number).await?;
    let now = state.clock.now_ms();
    let (inline, credential_id) = match &source {
        Source::Inline(new, _) => {
            let rec = state.vault.seal(&auth.org_id, new, Some(format!("number {number}")), now);
            let id = rec.id.clone();
            (Some(rec), id)
        }
        Source::Saved(rec, _) => (None, rec.id.clone()),
    };
    let mut phone = PhoneRecord {
        id: PhoneId::generate(),
        org_id: auth.org_id.clone(),
        provider: carrier,
        number: number.clone(),
        provider_number_id: found.provider_number_id.clone(),
        friendly_name: found.friendly_name.clone(),
        label: lbl,
        config,
        credential: credential_id,
        previous_credential: None,
        billing_status: "byok".into(),
        monthly_cost_cents: 0,
        // Until the carrier has answered: a release asked meanwhile would not know what to undo.
        provider_configuration: body.configure_provider.then(|| configuring(now)),
        connection_id: None,
        created_at_ms: now,
        updated_at_ms: now,
    };
    match state.store.phone_insert(&phone, inline.as_ref())? {
        Ok(()) => {}
        Err(Conflict::NumberTaken) | Err(Conflict::InUse(_)) => {
            return Err(ApiError::conflict("number_already_imported", format!("{number} is already imported")))
        }
        Err(Conflict::CredentialChanged) => {
            return Err(ApiError::conflict(
                "credential_changed",
                format!("the saved {carrier} credential was deleted or replaced during the import; try again"),
            ))
        }
    }
    state.commit.commit().await?;
    tracing::info!(org = %auth.org_id, phone = %phone.id, carrier = %carrier, "phone number imported");
    if body.configure_provider {
        // On a task of its own: a client that hangs up must not stop it between the carrier's
        // change and the note of what it replaced.
        let (st, cred) = (state.clone(), source.credential().clone());
        let configuring = tokio::spawn(async move {
            let r = configure_on_carrier(&st, &mut phone, &cred, &found).await;
            r.map(|()| phone)
        });
        phone = configuring.await.map_err(ApiError::internal)??;
    }
    Ok(HttpResponse::Created().json(phone_json(&state, &phone)))
}

/// What a number's `provider_configuration` says while its import is still configuring it at
/// the carrier, since `now_ms`.
fn configuring(now_ms: i64) -> Value {
    json!({"changed": false, "configuring": true, "since": rfc3339(now_ms)})
}

/// An import still configuring its number after this long was stopped midway (configuring
/// takes a few carrier requests, each bounded by the request timeout).
const CONFIGURING_STALE_MS: i64 = 30 * 60 * 1000;

/// Points the number at callgate on the carrier's side. The import stands either way; what
/// happened (or why not) is reported in `provider_configuration`.
async fn configure_on_carrier(
    state: &AppState,
    phone: &mut PhoneRecord,
    cred: &PhoneCredential,
    listed: &ListedNumber,
) -> Result<(), ApiError> {
    let targets = webhook_urls(&state.settings.public_url, phone.provider, &phone.id);
    let report = match state.provider_api.configure_number(cred, listed, &targets).await {
        Ok(v) => v,
        Err(unfinished) => {
            let api = provider_error(phone.provider, unfinished.error);
            // What was set up before the failure stays on record, for a release to undo.
            let mut report = unfinished.left.unwrap_or_else(|| json!({"changed": false}));
            report["error"] = json!({"code": api.code, "message": api.message});
            report
        }
    };
    // Only a link known to have been made says which application the number's events carry.
    let connection_id = match report.get("error") {
        None => report.get("application_id").and_then(Value::as_str).map(str::to_owned),
        Some(_) => None,
    };
    let now = state.clock.now_ms();
    let mut change = |p: &mut PhoneRecord| {
        if p.provider == Carrier::Telnyx {
            p.connection_id = connection_id.clone();
        }
        let mut report = report.clone();
        // Only the token's hash is kept, so the URLs shown cannot carry it: the steps say so,
        // or URLs pasted as given would be refused.
        if p.config.exotel_webhook_token_sha256.is_some() {
            if let Some(Value::String(steps)) = report.get_mut("manual_steps") {
                steps.push_str(
                    " This number has a webhook token: add ?token=<the token you set> to both URLs, \
                     or Exotel's requests will be refused (403 invalid_token).",
                );
            }
        }
        p.provider_configuration = Some(report);
        p.updated_at_ms = now;
    };
    // Written onto the number as it is now, which a PATCH may have changed meanwhile.
    *phone = match state.store.phone_modify(&phone.org_id, &phone.id, None, &mut change)? {
        Modified::Written(p) => *p,
        // It keeps its credential: this change names none.
        Modified::Gone | Modified::CredentialGone => {
            let undone = match report.get("changed") {
                Some(Value::Bool(true)) => set_back(state, cred, phone, &report).await,
                _ => String::new(),
            };
            return Err(ApiError::conflict(
                "number_deleted",
                format!("{} was deleted while it was being configured{undone}", phone.number),
            ));
        }
    };
    state.commit.commit().await?;
    Ok(())
}

/// Undoes the configuration `report` describes of a number deleted while it was being
/// configured; what became of it, to end the import's answer with.
async fn set_back(state: &AppState, cred: &PhoneCredential, phone: &PhoneRecord, report: &Value) -> String {
    match state.provider_api.release_number(cred, &release_of(phone, report)).await {
        Ok(r) if r.get("changed") == Some(&Value::Bool(true)) => {
            "; callgate set the number back at the carrier".to_owned()
        }
        Ok(r) => match r.get("manual_steps").and_then(Value::as_str) {
            Some(steps) => format!("; setting it back at the carrier needs a hand: {steps}"),
            None => "; the carrier had changed it since, so it was left as found".to_owned(),
        },
        Err(e) => {
            tracing::warn!(phone = %phone.id, error = %e, "could not set back a number deleted while it was configured");
            "; setting it back at the carrier failed: point it back by hand".to_owned()
        }
    }
}

/// What the carrier is to be asked to undo for `phone`, as `configured` reports it.
fn release_of<'a>(phone: &'a PhoneRecord, configured: &'a Value) -> Release<'a> {
    Release { number: &phone.number, provider_number_id: &phone.provider_number_id, configured }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    provider: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(state: web::Data<AppState>, auth: OrgAuth, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let provider = q
        .provider
        .as_deref()
        .map(|p| p.parse::<Carrier>().map_err(|e| ApiError::bad_request("invalid_query", e.to_string())))
        .transpose()?;
    let after = q
        .after
        .as_deref()
        .map(|a| PhoneId::parse(a).map_err(|_| ApiError::bad_request("invalid_query", "after: not a phone number id")))
        .transpose()?;
    let limit = paging::limit(q.limit, 50, 500).map_err(|m| ApiError::bad_request("invalid_query", m))?;
    let items = state.store.phone_list(&auth.org_id, provider, after.as_ref(), limit)?;
    let next = (items.len() == limit).then(|| items.last().map(|p| p.id.clone())).flatten();
    let out: Vec<Value> = items.iter().map(|p| phone_json(&state, p)).collect();
    Ok(HttpResponse::Ok().json(json!({"phone_numbers": out, "next_after": next})))
}

fn phone_id(s: &str) -> Result<PhoneId, ApiError> {
    PhoneId::parse(s).map_err(|_| ApiError::not_found("phone number"))
}

async fn get(state: web::Data<AppState>, auth: OrgAuth, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let phone =
        state.store.phone_get(&auth.org_id, &phone_id(&id)?)?.ok_or_else(|| ApiError::not_found("phone number"))?;
    Ok(HttpResponse::Ok().json(phone_json(&state, &phone)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default, deserialize_with = "double_option")]
    label: Option<Option<String>>,
    #[serde(default, deserialize_with = "strict_json::option_object")]
    config: Option<Map<String, Value>>,
    /// A new credential for this number alone; the old one keeps verifying during the grace.
    #[serde(default, deserialize_with = "strict_json::option")]
    credentials: Option<Value>,
    /// `"byok"`: verify with the organization's saved credential for the carrier.
    credential: Option<String>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

async fn patch(
    state: web::Data<AppState>,
    auth: OrgAuth,
    id: web::Path<String>,
    body: web::Json<PatchBody>,
) -> Result<HttpResponse, ApiError> {
    let id = phone_id(&id)?;
    let phone = state.store.phone_get(&auth.org_id, &id)?.ok_or_else(|| ApiError::not_found("phone number"))?;
    let body = body.into_inner();
    let now = state.clock.now_ms();
    // Checked here on the number as read, and applied again when it is written, to the number
    // as it is then: a change another request made meanwhile (the carrier check below can
    // take seconds) is kept rather than overwritten with this request's old copy.
    let edit = |p: &mut PhoneRecord| -> Result<(), ApiError> {
        if let Some(l) = &body.label {
            p.label = label(l.as_deref())?;
        }
        if let Some(c) = &body.config {
            if let Some(l) = apply_config(&mut p.config, c, &state.settings)? {
                p.label = l;
            }
        }
        Ok(())
    };
    both_labels(body.label.is_some(), body.config.as_ref())?;
    let mut checked = phone.clone();
    edit(&mut checked)?;
    if checked.config.exotel_webhook_token_sha256.is_some() && phone.provider != Carrier::Exotel {
        return Err(invalid("config.exotel_webhook_token: only Exotel numbers take a webhook token"));
    }
    let new_secret: Option<SecretRecord>;
    let new_id: Option<SecretId> = match (body.credentials.as_ref(), body.credential.as_deref()) {
        (Some(_), Some(_)) => return Err(invalid("give either credentials or credential, not both")),
        (Some(v), None) => {
            let (new, cred) = inline_credential(phone.provider, v)?;
            // The number keeps one previous credential: a credential of another account, taken
            // on trust, would push out the one its carrier still signs with. So the carrier
            // must show the number on the new credential's account, as at import.
            on_account(&state, &auth.org_id, phone.provider, &cred, &phone.number).await?;
            let rec = state.vault.seal(&auth.org_id, &new, Some(format!("number {}", phone.number)), now);
            let id = rec.id.clone();
            new_secret = Some(rec);
            Some(id)
        }
        (None, Some("byok")) => {
            new_secret = None;
            let rec = state.store.byok_get(&auth.org_id, phone.provider.as_str())?.ok_or_else(|| {
                ApiError::unprocessable("no_saved_credentials", format!("no saved {} credentials", phone.provider))
            })?;
            // The same check as for credentials given inline: saved credentials may be of
            // another account, and taken on trust they would push out the ones the carrier signs
            // with. A number already on them changes nothing.
            if rec.id != phone.credential {
                let cred = state.vault.open_phone(&rec).map_err(ApiError::internal)?;
                on_account(&state, &auth.org_id, phone.provider, &cred, &phone.number).await?;
            }
            Some(rec.id)
        }
        (None, Some(_)) => return Err(invalid("credential: the only accepted value is \"byok\"")),
        (None, None) => {
            new_secret = None;
            None
        }
    };
    let grace_until = now + state.settings.credential_grace.as_millis() as i64;
    let mut change = |p: &mut PhoneRecord| {
        // The same edit passed above: its verdict depends on the request alone.
        let _ = edit(p);
        if let Some(new_id) = new_id.as_ref().filter(|n| **n != p.credential) {
            p.previous_credential =
                Some(PreviousCredential { secret_id: p.credential.clone(), valid_until_ms: grace_until });
            p.credential = new_id.clone();
        }
        p.updated_at_ms = now;
    };
    let phone = match state.store.phone_modify(&auth.org_id, &id, new_secret.as_ref(), &mut change)? {
        Modified::Written(p) => *p,
        Modified::Gone => return Err(ApiError::not_found("phone number")),
        Modified::CredentialGone => {
            return Err(ApiError::conflict(
                "credential_changed",
                format!("the saved {} credential was deleted or replaced meanwhile; try again", phone.provider),
            ))
        }
    };
    state.commit.commit().await?;
    // Events parked for want of an upstream (or held by the old one's breaker) may go now.
    state.outbox.release_soon();
    Ok(HttpResponse::Ok().json(phone_json(&state, &phone)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    release_provider: bool,
}

async fn delete(
    state: web::Data<AppState>,
    auth: OrgAuth,
    id: web::Path<String>,
    q: web::Query<DeleteQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = phone_id(&id)?;
    // The carrier first: if it fails, the number stays, so the release can be asked again.
    let released = if q.release_provider {
        let phone = state.store.phone_get(&auth.org_id, &id)?.ok_or_else(|| ApiError::not_found("phone number"))?;
        Some(release_on_carrier(&state, &phone).await?)
    } else {
        None
    };
    // A number another request deleted meanwhile is gone all the same: the release's report
    // is still the answer.
    if !state.store.phone_delete(&auth.org_id, &id)? && released.is_none() {
        return Err(ApiError::not_found("phone number"));
    }
    state.commit.commit().await?;
    state.credentials.invalidate_all();
    Ok(match released {
        None => HttpResponse::NoContent().finish(),
        Some(report) => HttpResponse::Ok().json(json!({"id": id, "deleted": true, "provider_release": report})),
    })
}

/// Undoes on the carrier's side what `configure_provider` did at import, as far as the
/// carrier still routes the number the way callgate left it.
async fn release_on_carrier(state: &AppState, phone: &PhoneRecord) -> Result<Value, ApiError> {
    let Some(configured) = &phone.provider_configuration else {
        return Ok(json!({
            "changed": false,
            "reason": "the number was imported without configure_provider: callgate changed nothing at the carrier",
        }));
    };
    if configured.get("configuring") == Some(&Value::Bool(true)) {
        let since = configured.get("since").and_then(Value::as_str).and_then(crate::clock::parse_rfc3339);
        if since.is_some_and(|t| state.clock.now_ms() - t < CONFIGURING_STALE_MS) {
            return Err(ApiError::conflict(
                "number_configuring",
                "the import of this number is still configuring it at the carrier: ask again once it has answered",
            ));
        }
        return Err(ApiError::conflict(
            "previous_route_unknown",
            format!(
                "the import of {} stopped before it had recorded what it changed at the carrier, so it cannot be \
                 put back: route the number at the carrier by hand, then delete it without release_provider",
                phone.number
            ),
        ));
    }
    let rec = state
        .store
        .secret_get(&phone.org_id, &phone.credential)?
        .ok_or_else(|| ApiError::internal(format!("phone {} has no credential record", phone.id)))?;
    let cred = state.vault.open_phone(&rec).map_err(ApiError::internal)?;
    state.carrier_limiter.check(&phone.org_id, state.clock.now_ms()).map_err(ApiError::rate_limited)?;
    state.provider_api.release_number(&cred, &release_of(phone, configured)).await.map_err(|e| {
        let mut api = provider_error(phone.provider, e);
        api.message
            .push_str("; the number was not deleted (without release_provider it would be, the carrier left as it is)");
        api
    })
}
