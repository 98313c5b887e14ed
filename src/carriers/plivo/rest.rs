//! Plivo REST (protocols.md §1.5): numbers listed with `limit`/`offset` + `meta.next`, and
//! pointed at the gateway through an application. Vobiz clones the application API, so
//! [`ensure_application`] serves both.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::rest::{
    id_string, listed, non_empty, segment, Auth, Exchange, ListedNumber, Listing, ProviderApi, ProviderError,
    WebhookTargets, APP_NAME, MAX_NUMBERS,
};
use crate::domain::credentials::AuthPair;
use crate::domain::Carrier;

/// Plivo's largest `limit`.
pub(crate) const PAGE_SIZE: usize = 20;

/// An account with more applications than this is not searched further for ours: a new
/// one is created instead of paging without end. As many as numbers may be listed.
const MAX_APP_PAGES: usize = MAX_NUMBERS / PAGE_SIZE;

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    next: Option<String>,
}

/// The list envelope Plivo and Vobiz share for numbers (Plivo) and applications (both).
#[derive(Deserialize)]
struct Page {
    meta: Meta,
    objects: Vec<Value>,
}

#[derive(Deserialize)]
struct Item {
    number: String,
    #[serde(default)]
    alias: Option<String>,
}

fn exchange<'a>(api: &'a ProviderApi, cred: &'a AuthPair) -> Result<Exchange<'a>, ProviderError> {
    api.exchange(Carrier::Plivo, &api.urls().plivo, Auth::Basic { user: &cred.auth_id, password: &cred.auth_token })
}

fn account_path(cred: &AuthPair) -> Result<String, ProviderError> {
    Ok(format!("/v1/Account/{}/", segment(&cred.auth_id)?))
}

pub(crate) async fn list_numbers(api: &ProviderApi, cred: &AuthPair) -> Result<Vec<ListedNumber>, ProviderError> {
    const OP: &str = "list numbers";
    let ex = exchange(api, cred)?;
    let mut listing = Listing::new(Carrier::Plivo);
    let mut req = ex
        .request(Method::GET, &format!("{}Number/", account_path(cred)?))
        .query(&[("limit", PAGE_SIZE), ("offset", 0)]);
    loop {
        let page: Page = ex.json(OP, req).await?;
        // Plivo lists digits without `+`; they are also the number's id in its paths.
        let count =
            listing.add_page(page.objects, |item: Item| listed(&item.number, item.number.clone(), item.alias, None));
        match non_empty(page.meta.next) {
            Some(next) if count > 0 && !listing.full() => req = ex.follow(OP, &next)?,
            _ => break,
        }
    }
    Ok(listing.finish())
}

pub(crate) async fn configure_number(
    api: &ProviderApi,
    cred: &AuthPair,
    number: &ListedNumber,
    targets: &WebhookTargets,
) -> Result<Value, ProviderError> {
    let ex = exchange(api, cred)?;
    let base = account_path(cred)?;
    let mut actions = Vec::new();
    let name = app_name(number);
    let app_id = ensure_application(&ex, &format!("{base}Application/"), &name, targets, &mut actions).await?;
    let link = ex
        .request(Method::POST, &format!("{base}Number/{}/", segment(number.number.digits())?))
        .json(&json!({ "app_id": app_id }));
    ex.send("link number", link).await?;
    actions.push("linked number");
    Ok(configured(&app_id, &name, targets, actions))
}

/// The application that routes `number`: one per number, because the gateway's answer URL
/// names the phone, and a shared application would route every number to the last one set.
/// What configuring a Plivo-family number changed, for `provider_configuration`.
pub(crate) fn configured(app_id: &str, name: &str, targets: &WebhookTargets, actions: Vec<&str>) -> Value {
    json!({
        "changed": true,
        "application_id": app_id,
        "application_name": name,
        "answer_url": targets.incoming,
        "hangup_url": targets.status,
        "actions": actions,
    })
}

pub(crate) fn app_name(number: &ListedNumber) -> String {
    format!("{APP_NAME}-{}", number.number.digits())
}

/// Finds the application called `name` under `apps_path` (`…/Application/`), updating its
/// URLs if they differ from `targets`, or creates it. Returns its `app_id`.
pub(crate) async fn ensure_application(
    ex: &Exchange<'_>,
    apps_path: &str,
    name: &str,
    targets: &WebhookTargets,
    actions: &mut Vec<&'static str>,
) -> Result<String, ProviderError> {
    const LIST: &str = "list applications";

    #[derive(Deserialize)]
    struct App {
        app_id: Value,
        #[serde(default)]
        app_name: Option<String>,
        #[serde(default)]
        answer_url: Option<String>,
        #[serde(default)]
        answer_method: Option<String>,
        #[serde(default)]
        hangup_url: Option<String>,
        #[serde(default)]
        hangup_method: Option<String>,
    }

    #[derive(Deserialize)]
    struct Created {
        app_id: Value,
    }

    // The SDKs document no name filter on this list, so the name is matched here.
    let mut req = ex.request(Method::GET, apps_path).query(&[("limit", PAGE_SIZE), ("offset", 0)]);
    let mut found = None;
    for _ in 0..MAX_APP_PAGES {
        let page: Page = ex.json(LIST, req).await?;
        let count = page.objects.len();
        found = page
            .objects
            .into_iter()
            .filter_map(|o| serde_json::from_value::<App>(o).ok())
            .find(|a| a.app_name.as_deref() == Some(name));
        match non_empty(page.meta.next) {
            Some(next) if found.is_none() && count > 0 => req = ex.follow(LIST, &next)?,
            _ => break,
        }
    }

    let urls = json!({
        "answer_url": targets.incoming,
        "answer_method": "POST",
        "hangup_url": targets.status,
        "hangup_method": "POST",
    });
    let is_post = |m: &Option<String>| m.as_deref().is_some_and(|m| m.eq_ignore_ascii_case("POST"));
    match found {
        Some(app) => {
            let id = id_string(&app.app_id).ok_or_else(|| ex.unavailable(LIST, "application without app_id"))?;
            let current = app.answer_url.as_deref() == Some(targets.incoming.as_str())
                && app.hangup_url.as_deref() == Some(targets.status.as_str())
                && is_post(&app.answer_method)
                && is_post(&app.hangup_method);
            if current {
                actions.push("reused application");
            } else {
                let update = ex.request(Method::POST, &format!("{apps_path}{}/", segment(&id)?)).json(&urls);
                ex.send("update application", update).await?;
                actions.push("updated application");
            }
            Ok(id)
        }
        None => {
            let mut body = urls;
            body["app_name"] = json!(name);
            let created: Created =
                ex.json("create application", ex.request(Method::POST, apps_path).json(&body)).await?;
            let id = id_string(&created.app_id)
                .ok_or_else(|| ex.unavailable("create application", "answer without app_id"))?;
            actions.push("created application");
            Ok(id)
        }
    }
}
