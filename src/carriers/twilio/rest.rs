//! Twilio REST (protocols.md §3.5): `PageSize` + `next_page_uri`, and form-encoded writes
//! on the number itself.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::rest::{
    listed, non_empty, nothing_to_release, segment, Auth, Exchange, ListedNumber, Listing, ProviderApi, ProviderError,
    Release, WebhookTargets,
};
use crate::domain::credentials::TwilioCredential;
use crate::domain::{Carrier, E164};

const PAGE_SIZE: usize = 100;

#[derive(Deserialize)]
struct Page {
    incoming_phone_numbers: Vec<Value>,
    #[serde(default)]
    next_page_uri: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    sid: String,
    phone_number: String,
    #[serde(default)]
    friendly_name: Option<String>,
    #[serde(default)]
    voice_url: Option<String>,
}

#[derive(Deserialize)]
struct Current {
    phone_number: String,
    #[serde(default)]
    trunk_sid: Option<String>,
    #[serde(default)]
    voice_application_sid: Option<String>,
    #[serde(default)]
    voice_url: Option<String>,
    #[serde(default)]
    status_callback: Option<String>,
}

fn exchange<'a>(api: &'a ProviderApi, cred: &'a TwilioCredential) -> Result<Exchange<'a>, ProviderError> {
    api.exchange(
        Carrier::Twilio,
        &api.urls().twilio,
        Auth::Basic { user: &cred.account_sid, password: &cred.auth_token },
    )
}

fn account_path(cred: &TwilioCredential) -> Result<String, ProviderError> {
    Ok(format!("/2010-04-01/Accounts/{}/", segment(&cred.account_sid)?))
}

pub(crate) async fn list_numbers(
    api: &ProviderApi,
    cred: &TwilioCredential,
) -> Result<Vec<ListedNumber>, ProviderError> {
    const OP: &str = "list numbers";
    let ex = exchange(api, cred)?;
    let mut listing = Listing::new(Carrier::Twilio);
    let mut req = ex
        .request(Method::GET, &format!("{}IncomingPhoneNumbers.json", account_path(cred)?))
        .query(&[("PageSize", PAGE_SIZE)]);
    loop {
        let page: Page = ex.json(OP, req).await?;
        let count = listing.add_page(page.incoming_phone_numbers, |i: Item| {
            listed(&i.phone_number, i.sid, i.friendly_name, i.voice_url)
        });
        match non_empty(page.next_page_uri) {
            Some(next) if count > 0 && !listing.full() => req = ex.follow(OP, &next)?,
            _ => break,
        }
    }
    Ok(listing.finish())
}

/// The number as Twilio has it now, refused if its sid has come to name another number.
async fn fetch(ex: &Exchange<'_>, path: &str, number: &E164, sid: &str) -> Result<Current, ProviderError> {
    let current: Current = ex.json("fetch number", ex.request(Method::GET, path)).await?;
    if E164::normalize(&current.phone_number).ok().as_ref() != Some(number) {
        return Err(ProviderError::Refused { message: format!("Twilio number {sid} is not {number}") });
    }
    Ok(current)
}

pub(crate) async fn configure_number(
    api: &ProviderApi,
    cred: &TwilioCredential,
    number: &ListedNumber,
    targets: &WebhookTargets,
) -> Result<Value, ProviderError> {
    let ex = exchange(api, cred)?;
    let path = format!("{}IncomingPhoneNumbers/{}.json", account_path(cred)?, segment(&number.provider_number_id)?);
    // Fetched fresh rather than trusted from the listing: the trunk binding may have
    // changed since, and the sid must still be this number.
    let current = fetch(&ex, &path, &number.number, &number.provider_number_id).await?;
    if let Some(trunk) = non_empty(current.trunk_sid) {
        // Twilio ignores VoiceUrl on a trunked number; unbinding it would cut the trunk.
        return Err(ProviderError::Refused {
            message: format!(
                "{} is routed to the Elastic SIP Trunk {trunk}; remove it from the trunk in the Twilio console first",
                number.number
            ),
        });
    }
    // An empty VoiceApplicationSid detaches a TwiML app, which would otherwise win over VoiceUrl.
    let form = [
        ("VoiceUrl", targets.incoming.as_str()),
        ("VoiceMethod", "POST"),
        ("StatusCallback", targets.status.as_str()),
        ("StatusCallbackMethod", "POST"),
        ("VoiceApplicationSid", ""),
    ];
    ex.send("update number", ex.request(Method::POST, &path).form(&form)).await?;
    let previous_app = non_empty(current.voice_application_sid);
    let mut actions = Vec::new();
    if previous_app.is_some() {
        actions.push("detached TwiML application");
    }
    actions.push("set voice URL and status callback");
    Ok(json!({
        "changed": true,
        "number_sid": number.provider_number_id,
        "voice_url": targets.incoming,
        "status_callback": targets.status,
        "previous_voice_url": non_empty(current.voice_url),
        "previous_status_callback": non_empty(current.status_callback),
        "previous_voice_application_sid": previous_app,
        "actions": actions,
    }))
}

/// Puts back the voice URL, status callback and TwiML application the number had before it
/// was configured, unless its voice URL is no longer callgate's (someone has repointed it since).
pub(crate) async fn release_number(
    api: &ProviderApi,
    cred: &TwilioCredential,
    release: &Release<'_>,
) -> Result<Value, ProviderError> {
    if release.field("number_sid") != Some(release.provider_number_id) {
        return Ok(nothing_to_release());
    }
    let ex = exchange(api, cred)?;
    let path = format!("{}IncomingPhoneNumbers/{}.json", account_path(cred)?, segment(release.provider_number_id)?);
    let current = match fetch(&ex, &path, release.number, release.provider_number_id).await {
        Ok(c) => c,
        Err(ProviderError::NotFound) => {
            return Ok(json!({"changed": false, "actions": ["none: the number is no longer on the account"]}))
        }
        Err(e) => return Err(e),
    };
    // The URL as configured, which a later change of the public URL does not move.
    if current.voice_url.is_none() || current.voice_url.as_deref() != release.field("voice_url") {
        return Ok(
            json!({"changed": false, "actions": ["left number as found: its voice URL is no longer callgate's"]}),
        );
    }
    let voice_url = release.field("previous_voice_url");
    let status_callback = release.field("previous_status_callback");
    let app = release.field("previous_voice_application_sid");
    // Empty values clear what callgate set where the number had nothing before.
    let form = [
        ("VoiceUrl", voice_url.unwrap_or_default()),
        ("StatusCallback", status_callback.unwrap_or_default()),
        ("VoiceApplicationSid", app.unwrap_or_default()),
    ];
    ex.send("update number", ex.request(Method::POST, &path).form(&form)).await?;
    let mut actions = vec!["restored voice URL and status callback"];
    if app.is_some() {
        actions.push("reattached TwiML application");
    }
    Ok(json!({
        "changed": true,
        "voice_url": voice_url,
        "status_callback": status_callback,
        "voice_application_sid": app,
        "actions": actions,
    }))
}
