//! Twilio REST (protocols.md §3.5): `PageSize` + `next_page_uri`, and form-encoded writes
//! on the number itself.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::rest::{
    listed, non_empty, nothing_to_release, segment, Auth, Exchange, ListedNumber, Listing, ProviderApi, ProviderError,
    Release, Unfinished, WebhookTargets,
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
    voice_method: Option<String>,
    #[serde(default)]
    status_callback: Option<String>,
    #[serde(default)]
    status_callback_method: Option<String>,
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

/// `url`, unless it is one of callgate's own for this kind of callback (left by an earlier
/// import of the number, deleted without release): that is no route to go back to.
fn not_ours(url: Option<String>, target: &str) -> Option<String> {
    let ours = target.rsplit_once('/').map_or(target, |(dir, _)| dir);
    non_empty(url).filter(|u| u.rsplit_once('/').map(|(dir, _)| dir) != Some(ours))
}

pub(crate) async fn configure_number(
    api: &ProviderApi,
    cred: &TwilioCredential,
    number: &ListedNumber,
    targets: &WebhookTargets,
) -> Result<Value, Unfinished> {
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
        }
        .into());
    }
    // An empty VoiceApplicationSid detaches a TwiML app, which would otherwise win over VoiceUrl.
    let form = [
        ("VoiceUrl", targets.incoming.as_str()),
        ("VoiceMethod", "POST"),
        ("StatusCallback", targets.status.as_str()),
        ("StatusCallbackMethod", "POST"),
        ("VoiceApplicationSid", ""),
    ];
    let update = ex.request(Method::POST, &path).form(&form);
    let previous_app = non_empty(current.voice_application_sid);
    let mut report = json!({
        "changed": true,
        "number_sid": number.provider_number_id,
        "voice_url": targets.incoming,
        "status_callback": targets.status,
        "previous_voice_url": not_ours(current.voice_url, &targets.incoming),
        "previous_voice_method": non_empty(current.voice_method),
        "previous_status_callback": not_ours(current.status_callback, &targets.status),
        "previous_status_callback_method": non_empty(current.status_callback_method),
        "previous_voice_application_sid": previous_app,
        "actions": [],
    });
    // An update whose answer was lost may have been made: what it replaced stays on record,
    // and a release puts back only what is callgate's when it looks.
    if let Err(e) = ex.send("update number", update).await {
        return Err(Unfinished::after(e, report));
    }
    let detached = previous_app.map(|_| "detached TwiML application");
    report["actions"] = json!(detached.into_iter().chain(["set voice URL and status callback"]).collect::<Vec<_>>());
    Ok(report)
}

/// Puts back the voice routing (URL, method, TwiML application) and the status callback the
/// number had before it was configured, each only where it is still callgate's: what someone
/// has changed since is left as found.
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
    // Compared with the URLs as configured, which a later change of the public URL does not
    // move. Callgate's voice URL routes the number only while no TwiML application is attached.
    let still = |now: &Option<String>, set: &str| release.field(set).is_some_and(|s| now.as_deref() == Some(s));
    let voice = still(&current.voice_url, "voice_url") && non_empty(current.voice_application_sid).is_none();
    let status = still(&current.status_callback, "status_callback");
    if !voice && !status {
        return Ok(json!({
            "changed": false,
            "actions": ["left number as found: neither its voice URL nor its status callback is callgate's"],
        }));
    }
    // Empty values clear what callgate set where the number had nothing before. A method is
    // put back only where the import recorded it (the first versions did not): else it stays
    // POST, as callgate set it.
    let voice_method = release.previous("previous_voice_method");
    let status_method = release.previous("previous_status_callback_method").ok().flatten();
    let mut form: Vec<(&str, &str)> = Vec::new();
    let mut actions = Vec::new();
    let mut report = json!({"changed": true});
    if voice {
        let url = release.previous("previous_voice_url")?;
        let mut app = release.previous("previous_voice_application_sid")?;
        // A TwiML application the customer deleted since is none to go back to (Twilio would
        // refuse the whole update for it).
        if let Some(sid) = app {
            let req = ex.request(Method::GET, &format!("{}Applications/{}.json", account_path(cred)?, segment(sid)?));
            match ex.send("fetch application", req).await {
                Ok(_) => {}
                Err(ProviderError::NotFound) => {
                    app = None;
                    actions.push("left TwiML application off: it no longer exists");
                }
                Err(e) => return Err(e),
            }
        }
        form.push(("VoiceUrl", url.unwrap_or_default()));
        form.extend(voice_method.as_ref().ok().copied().flatten().map(|m| ("VoiceMethod", m)));
        form.push(("VoiceApplicationSid", app.unwrap_or_default()));
        actions.push("restored voice URL");
        if app.is_some() {
            actions.push("reattached TwiML application");
        }
        report["voice_url"] = json!(url);
        report["voice_method"] = json!(voice_method.as_ref().ok().copied().flatten());
        report["voice_application_sid"] = json!(app);
        if url.is_some() && voice_method.is_err() {
            report["manual_steps"] = json!(
                "callgate configured this number before it recorded the voice URL's method: it is POST now; \
                 set it back in the Twilio console if the URL expects GET"
            );
        }
    } else {
        actions.push("left voice routing as found: no longer callgate's");
    }
    if status {
        let url = release.previous("previous_status_callback")?;
        form.push(("StatusCallback", url.unwrap_or_default()));
        form.extend(status_method.map(|m| ("StatusCallbackMethod", m)));
        actions.push("restored status callback");
        report["status_callback"] = json!(url);
        report["status_callback_method"] = json!(status_method);
    } else {
        actions.push("left status callback as found: no longer callgate's");
    }
    ex.send("update number", ex.request(Method::POST, &path).form(&form)).await?;
    report["actions"] = json!(actions);
    Ok(report)
}
