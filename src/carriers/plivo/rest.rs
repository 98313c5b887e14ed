//! Plivo REST (protocols.md §1.5): numbers listed with `limit`/`offset` + `meta.next`, and
//! pointed at the gateway through an application. Vobiz clones the application API, so
//! [`ensure_application`] serves both.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::rest::{
    id_string, link_to, listed, non_empty, nothing_to_release, segment, Auth, Exchange, ListedNumber, Listing,
    ProviderApi, ProviderError, Release, Unfinished, WebhookTargets, APP_NAME, MAX_NUMBERS,
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
    /// The linked application's URI, `/v1/Account/{auth_id}/Application/{app_id}/`.
    #[serde(default)]
    application: Option<String>,
}

/// The `app_id` at the end of an application URI.
fn app_in(uri: Option<&str>) -> Option<String> {
    uri?.trim_end_matches('/').rsplit('/').next().filter(|id| !id.is_empty()).map(str::to_owned)
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
        let count = listing.add_page(page.objects, |item: Item| {
            let app = app_in(item.application.as_deref());
            Some(listed(&item.number, item.number.clone(), item.alias, None)?.routed_to(app))
        });
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
) -> Result<Value, Unfinished> {
    let ex = exchange(api, cred)?;
    let base = account_path(cred)?;
    let mut actions = Vec::new();
    let name = app_name(number);
    let app_id = ensure_application(&ex, &format!("{base}Application/"), &name, targets, &mut actions).await?;
    let link = ex
        .request(Method::POST, &format!("{base}Number/{}/", segment(number.number.digits())?))
        .json(&json!({ "app_id": app_id }));
    link_to(&ex, "link number", link, configured(&app_id, &name, targets, actions, previous_app(number, &app_id))).await
}

/// The application a number was linked to before callgate's, to link it back on release.
pub(crate) fn previous_app<'a>(number: &'a ListedNumber, ours: &str) -> Option<&'a str> {
    number.routed_to.as_deref().filter(|p| *p != ours)
}

/// Links the number back to the application it had (or, if it had none, to the account's
/// default one) where it still uses callgate's, then deletes callgate's application.
pub(crate) async fn release_number(
    api: &ProviderApi,
    cred: &AuthPair,
    release: &Release<'_>,
) -> Result<Value, ProviderError> {
    #[derive(Deserialize)]
    struct Current {
        number: String,
        #[serde(default)]
        application: Option<String>,
    }

    let Some(ours) = release.field("application_id") else { return Ok(nothing_to_release()) };
    let ex = exchange(api, cred)?;
    let base = account_path(cred)?;
    let number_path = format!("{base}Number/{}/", segment(release.number.digits())?);
    let current = match ex.json::<Current>("fetch number", ex.request(Method::GET, &number_path)).await {
        Ok(c) if c.number == release.number.digits() => Some(app_in(c.application.as_deref())),
        Ok(c) => {
            return Err(ProviderError::Refused {
                message: format!("Plivo answered for {} when asked for {}", c.number, release.number),
            })
        }
        Err(ProviderError::NotFound) => None,
        Err(e) => return Err(e),
    };
    let relink = current.as_ref().is_some_and(|app| app.as_deref() == Some(ours));
    let apps_path = format!("{base}Application/");
    let (previous, previous_gone) = route_back(&ex, &apps_path, release, relink).await?;
    if relink {
        // Plivo links the account's default number application when no app_id is given.
        let body = previous.map_or_else(|| json!({}), |p| json!({ "app_id": p }));
        ex.send("link number", ex.request(Method::POST, &number_path).json(&body)).await?;
    }
    let outcome = Unlinked { on_account: current.is_some(), relinked: relink, previous, previous_gone };
    delete_application(&ex, &apps_path, ours, outcome).await
}

/// The application to link a number that still uses callgate's (`relink`) back to, if it had
/// one and the carrier still has it; and whether it had one that is gone since (the customer
/// deleted it), so there is none to go back to.
pub(crate) async fn route_back<'a>(
    ex: &Exchange<'_>,
    apps_path: &str,
    release: &'a Release<'_>,
    relink: bool,
) -> Result<(Option<&'a str>, bool), ProviderError> {
    if !relink {
        return Ok((None, false));
    }
    let Some(p) = release.previous("previous_application_id")? else { return Ok((None, false)) };
    match ex.send("fetch application", ex.request(Method::GET, &format!("{apps_path}{}/", segment(p)?))).await {
        Ok(_) => Ok((Some(p), false)),
        Err(ProviderError::NotFound) => Ok((None, true)),
        Err(e) => Err(e),
    }
}

/// What releasing did to a Plivo-family number before its application goes.
pub(crate) struct Unlinked<'a> {
    /// The carrier still lists the number.
    pub on_account: bool,
    /// It used callgate's application, and was linked back.
    pub relinked: bool,
    pub previous: Option<&'a str>,
    /// It had an application before callgate's that the carrier no longer has.
    pub previous_gone: bool,
}

/// Deletes callgate's application for one number (made for it alone, so nothing else uses
/// it) and reports the release.
pub(crate) async fn delete_application(
    ex: &Exchange<'_>,
    apps_path: &str,
    ours: &str,
    done: Unlinked<'_>,
) -> Result<Value, ProviderError> {
    let mut actions = vec![match (done.on_account, done.relinked, done.previous) {
        (false, ..) => "none on the number: it is no longer on the account",
        (true, false, _) => "left number as found: it no longer uses callgate's application",
        (true, true, Some(_)) => "linked number to its previous application",
        (true, true, None) if done.previous_gone => {
            "unlinked number from callgate's application: its previous application no longer exists"
        }
        (true, true, None) => "unlinked number from callgate's application",
    }];
    let req = ex.request(Method::DELETE, &format!("{apps_path}{}/", segment(ours)?));
    const DELETED: &str = "deleted application";
    let outcome = match ex.send("delete application", req).await {
        Ok(_) => DELETED,
        Err(ProviderError::NotFound) => "application already gone",
        // The number's routing is already put back: what is left is only an application
        // nothing uses, so the release stands and says so.
        Err(e) if done.relinked => {
            tracing::warn!(error = %e, application = ours, "could not delete callgate's application after releasing its number");
            "application left in place: the carrier failed to delete it"
        }
        Err(e) => return Err(e),
    };
    actions.push(outcome);
    let deleted = outcome == DELETED;
    Ok(json!({
        "changed": done.relinked || deleted,
        "application_id": ours,
        "linked_application_id": done.previous.filter(|_| done.relinked),
        "actions": actions,
    }))
}

/// The application that routes `number`: one per number, because the gateway's answer URL
/// names the phone, and a shared application would route every number to the last one set.
/// What configuring a Plivo-family number changed, for `provider_configuration`.
pub(crate) fn configured(
    app_id: &str,
    name: &str,
    targets: &WebhookTargets,
    actions: Vec<&str>,
    previous: Option<&str>,
) -> Value {
    json!({
        "changed": true,
        "application_id": app_id,
        "application_name": name,
        "previous_application_id": previous,
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
