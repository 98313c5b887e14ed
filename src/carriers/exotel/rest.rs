//! Exotel REST (protocols.md §5.2): ExoPhones listed with `Page`/`PageSize` +
//! `next_page_uri` on the account's regional cluster. Exotel routes a number only to a flow
//! built in its dashboard, so configuring one is a manual step.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::rest::{
    id_string, listed, non_empty, segment, Auth, ListedNumber, Listing, ProviderApi, ProviderError, Release,
    WebhookTargets,
};
use crate::domain::credentials::ExotelCredential;
use crate::domain::Carrier;

const PAGE_SIZE: usize = 50;

#[derive(Deserialize)]
struct Page {
    incoming_phone_numbers: Vec<Value>,
    #[serde(default)]
    next_page_uri: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    sid: Value,
    phone_number: String,
    #[serde(default)]
    friendly_name: Option<String>,
    #[serde(default)]
    voice_url: Option<String>,
}

pub(crate) async fn list_numbers(
    api: &ProviderApi,
    cred: &ExotelCredential,
) -> Result<Vec<ListedNumber>, ProviderError> {
    const OP: &str = "list numbers";
    let origin = match &api.urls().exotel {
        Some(origin) => origin.clone(),
        None => format!("https://{}", cred.subdomain),
    };
    let ex = api
        .exchange(Carrier::Exotel, &origin, Auth::Basic { user: &cred.api_key, password: &cred.api_token })?
        .also_secret(&cred.api_key);
    let mut listing = Listing::new(Carrier::Exotel);
    let path = format!("/v2_beta/Accounts/{}/IncomingPhoneNumbers", segment(&cred.account_sid)?);
    let mut req = ex.request(Method::GET, &path).query(&[("Page", 0), ("PageSize", PAGE_SIZE)]);
    loop {
        let page: Page = ex.json(OP, req).await?;
        let count = listing.add_page(page.incoming_phone_numbers, |item: Item| {
            let id = id_string(&item.sid).unwrap_or_else(|| item.phone_number.clone());
            listed(&item.phone_number, id, item.friendly_name, item.voice_url)
        });
        match non_empty(page.next_page_uri) {
            Some(next) if count > 0 && !listing.full() => req = ex.follow(OP, &next)?,
            _ => break,
        }
    }
    Ok(listing.finish())
}

/// Nothing is changed on Exotel's side: the answer tells the customer where to paste the URLs.
pub(crate) fn configure_number(number: &ListedNumber, targets: &WebhookTargets) -> Value {
    json!({
        "changed": false,
        "number": number.number,
        "exophone_sid": number.provider_number_id,
        "manual_steps": format!(
            "Exotel routes a number only to a flow built in its dashboard. In App Bazaar, open the flow \
             assigned to {} (or create one and assign the number to it), paste incoming_url into the flow's \
             Passthru or Voicebot applet, and status_url into the flow's call status callback.",
            number.number
        ),
        "incoming_url": targets.incoming,
        "status_url": targets.status,
    })
}

/// Nothing was changed on Exotel's side, so nothing is undone there: the customer takes the
/// URLs out of the flow.
pub(crate) fn release_number(release: &Release<'_>) -> Value {
    json!({
        "changed": false,
        "manual_steps": format!(
            "Exotel routes {} through a flow built in its dashboard: remove callgate's URLs from the \
             flow's Passthru or Voicebot applet and its call status callback, or assign the number to another flow.",
            release.number
        ),
    })
}
