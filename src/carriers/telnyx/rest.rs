//! Telnyx REST (protocols.md §4.3, §4.4): Bearer auth, `page[number]`/`page[size]` with
//! `meta.total_pages`, a Call Control application, and call answering.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::rest::{
    id_string, link_to, listed, nothing_to_release, segment, Auth, Exchange, ListedNumber, Listing, ProviderApi,
    ProviderError, Release, Unfinished, WebhookTargets, APP_NAME,
};
use crate::domain::credentials::TelnyxCredential;
use crate::domain::{Carrier, Secret, E164};

const PAGE_SIZE: u64 = 100;

/// An account with more matching applications than this many pages is not searched further.
const MAX_APP_PAGES: u64 = 20;

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    total_pages: u64,
}

#[derive(Deserialize)]
struct Page {
    data: Vec<Value>,
    meta: Meta,
}

#[derive(Deserialize)]
struct Item {
    id: Value,
    phone_number: String,
    #[serde(default)]
    connection_id: Value,
}

#[derive(Deserialize)]
struct App {
    id: Value,
    #[serde(default)]
    application_name: Option<String>,
    #[serde(default)]
    webhook_event_url: Option<String>,
    #[serde(default)]
    webhook_api_version: Option<String>,
}

#[derive(Deserialize)]
struct Created {
    data: App,
}

fn exchange<'a>(api: &'a ProviderApi, key: &'a Secret) -> Result<Exchange<'a>, ProviderError> {
    api.exchange(Carrier::Telnyx, &api.urls().telnyx, Auth::Bearer(key))
}

pub(crate) async fn list_numbers(
    api: &ProviderApi,
    cred: &TelnyxCredential,
) -> Result<Vec<ListedNumber>, ProviderError> {
    let ex = exchange(api, &cred.api_key)?;
    let mut listing = Listing::new(Carrier::Telnyx);
    let mut page_no: u64 = 1;
    loop {
        let req =
            ex.request(Method::GET, "/v2/phone_numbers").query(&[("page[number]", page_no), ("page[size]", PAGE_SIZE)]);
        let page: Page = ex.json("list numbers", req).await?;
        let count = listing.add_page(page.data, |item: Item| {
            let id = id_string(&item.id)?;
            Some(listed(&item.phone_number, id, None, None)?.routed_to(id_string(&item.connection_id)))
        });
        if count == 0 || listing.full() || page_no >= page.meta.total_pages {
            break;
        }
        page_no += 1;
    }
    Ok(listing.finish())
}

pub(crate) async fn configure_number(
    api: &ProviderApi,
    cred: &TelnyxCredential,
    number: &ListedNumber,
    targets: &WebhookTargets,
) -> Result<Value, Unfinished> {
    const LIST: &str = "list applications";
    let ex = exchange(api, &cred.api_key)?;
    let webhook_url = targets.incoming.as_str();

    // `contains` narrows the search; the exact name is matched here.
    let mut found = None;
    for page_no in 1..=MAX_APP_PAGES {
        let req = ex.request(Method::GET, "/v2/call_control_applications").query(&[
            ("filter[application_name][contains]", APP_NAME.to_owned()),
            ("page[number]", page_no.to_string()),
            ("page[size]", PAGE_SIZE.to_string()),
        ]);
        let page: Page = ex.json(LIST, req).await?;
        let count = page.data.len();
        found = page
            .data
            .into_iter()
            .filter_map(|o| serde_json::from_value::<App>(o).ok())
            .find(|a| a.application_name.as_deref() == Some(APP_NAME));
        if found.is_some() || count == 0 || page_no >= page.meta.total_pages {
            break;
        }
    }

    let body = json!({
        "application_name": APP_NAME,
        "webhook_event_url": webhook_url,
        "webhook_api_version": "2",
    });
    let mut actions = Vec::new();
    let app_id = match found {
        Some(app) => {
            let id = id_string(&app.id).ok_or_else(|| ex.unavailable(LIST, "application without id"))?;
            if app.webhook_event_url.as_deref() == Some(webhook_url) && app.webhook_api_version.as_deref() == Some("2")
            {
                actions.push("reused application");
            } else {
                let path = format!("/v2/call_control_applications/{}", segment(&id)?);
                ex.send("update application", ex.request(Method::PATCH, &path).json(&body)).await?;
                actions.push("updated application");
            }
            id
        }
        None => {
            let req = ex.request(Method::POST, "/v2/call_control_applications").json(&body);
            let created: Created = ex.json("create application", req).await?;
            actions.push("created application");
            id_string(&created.data.id).ok_or_else(|| ex.unavailable("create application", "answer without id"))?
        }
    };

    let path = format!("/v2/phone_numbers/{}", segment(&number.provider_number_id)?);
    let link = ex.request(Method::PATCH, &path).json(&json!({ "connection_id": app_id }));
    let previous = number.routed_to.as_deref().filter(|p| *p != app_id);
    let report = json!({
        "changed": true,
        "application_id": app_id,
        "application_name": APP_NAME,
        "previous_connection_id": previous,
        "webhook_event_url": webhook_url,
        "actions": actions,
    });
    link_to(&ex, "link number", link, report).await
}

/// Links the number back to the connection it had where it still uses callgate's
/// application. The application stays: every number callgate configured on the
/// account shares it.
pub(crate) async fn release_number(
    api: &ProviderApi,
    cred: &TelnyxCredential,
    release: &Release<'_>,
) -> Result<Value, ProviderError> {
    #[derive(Deserialize)]
    struct One {
        data: Item,
    }

    let Some(ours) = release.field("application_id") else { return Ok(nothing_to_release()) };
    let ex = exchange(api, &cred.api_key)?;
    let path = format!("/v2/phone_numbers/{}", segment(release.provider_number_id)?);
    let current = match ex.json::<One>("fetch number", ex.request(Method::GET, &path)).await {
        Ok(one) => one.data,
        Err(ProviderError::NotFound) => {
            return Ok(json!({"changed": false, "actions": ["none: the number is no longer on the account"]}))
        }
        Err(e) => return Err(e),
    };
    if E164::normalize(&current.phone_number).ok().as_ref() != Some(release.number) {
        return Err(ProviderError::Refused {
            message: format!("Telnyx number {} is not {}", release.provider_number_id, release.number),
        });
    }
    if id_string(&current.connection_id).as_deref() != Some(ours) {
        return Ok(json!({
            "changed": false,
            "actions": ["left number as found: it no longer uses callgate's application"],
        }));
    }
    // Telnyx documents setting a connection, not taking one away: with nothing to go back to,
    // the number stays on callgate's application and the answer says what to do.
    let manual = |before: &str| {
        json!({
            "changed": false,
            "manual_steps": format!(
                "{} {before}; assign it to another connection in the Telnyx portal, or its calls keep \
                 reaching callgate, which no longer has it.",
                release.number
            ),
        })
    };
    let Some(previous) = release.previous("previous_connection_id")? else {
        return Ok(manual("had no connection before callgate's Call Control application"));
    };
    let req = ex.request(Method::PATCH, &path).json(&json!({ "connection_id": previous }));
    if let Err(e) = ex.send("link number", req).await {
        // Refused, perhaps because the customer has deleted that connection since: then there
        // is nothing to go back to. Anything else is the error it was.
        if connection_gone(&ex, previous).await {
            return Ok(manual(&format!(
                "was on connection {previous} before callgate's Call Control application, and Telnyx no longer has it"
            )));
        }
        return Err(e);
    }
    Ok(json!({
        "changed": true,
        "connection_id": previous,
        "actions": ["linked number to its previous connection"],
    }))
}

/// Whether Telnyx says it has no connection `id` of any kind: each place one can be read
/// answers 404. Any other answer (it is there, an error) is not taken as gone.
async fn connection_gone(ex: &Exchange<'_>, id: &str) -> bool {
    let Ok(id) = segment(id) else { return false };
    for kind in ["connections", "call_control_applications", "texml_applications"] {
        match ex.send("fetch connection", ex.request(Method::GET, &format!("/v2/{kind}/{id}"))).await {
            Err(ProviderError::NotFound) => {}
            _ => return false,
        }
    }
    true
}

/// A Call Control command (`answer`, `reject`, `transfer`, ...) on one call.
pub(crate) async fn call_action(
    api: &ProviderApi,
    api_key: &Secret,
    call_control_id: &str,
    action: CallAction,
    body: &Value,
) -> Result<(), ProviderError> {
    let ex = exchange(api, api_key)?;
    let path = format!("/v2/calls/{}/actions/{}", segment(call_control_id)?, action.as_str());
    ex.send(action.as_str(), ex.request(Method::POST, &path).json(body)).await?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallAction {
    Answer,
    Reject,
    Transfer,
}

impl CallAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CallAction::Answer => "answer",
            CallAction::Reject => "reject",
            CallAction::Transfer => "transfer",
        }
    }
}
