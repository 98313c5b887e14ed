//! Vobiz REST (protocols.md §2.1–2.3): `X-Auth-ID`/`X-Auth-Token` headers, numbers listed
//! by `page`/`per_page` until `total`, and Plivo's application API under `/api/v1`.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::carriers::plivo::rest::{
    app_name, configured, delete_application, ensure_application, previous_app, route_back, Unlinked,
};
use crate::carriers::rest::{
    id_string, link_to, listed, nothing_to_release, segment, Auth, Exchange, ListedNumber, Listing, ProviderApi,
    ProviderError, Release, Unfinished, WebhookTargets,
};
use crate::domain::credentials::AuthPair;
use crate::domain::{Carrier, E164};

/// Vobiz's largest `per_page`.
const PAGE_SIZE: u64 = 100;

#[derive(Deserialize)]
struct Page {
    items: Vec<Value>,
    total: u64,
}

#[derive(Deserialize)]
struct Item {
    id: Value,
    e164: String,
    #[serde(default)]
    application_id: Value,
}

fn to_listed(item: Item) -> Option<ListedNumber> {
    let id = id_string(&item.id).unwrap_or_else(|| item.e164.clone());
    Some(listed(&item.e164, id, None, None)?.routed_to(id_string(&item.application_id)))
}

fn exchange<'a>(api: &'a ProviderApi, cred: &'a AuthPair) -> Result<Exchange<'a>, ProviderError> {
    api.exchange(
        Carrier::Vobiz,
        &api.urls().vobiz,
        Auth::VobizHeaders { auth_id: &cred.auth_id, auth_token: &cred.auth_token },
    )
}

fn account_path(cred: &AuthPair) -> Result<String, ProviderError> {
    Ok(format!("/api/v1/Account/{}/", segment(&cred.auth_id)?))
}

pub(crate) async fn list_numbers(api: &ProviderApi, cred: &AuthPair) -> Result<Vec<ListedNumber>, ProviderError> {
    let ex = exchange(api, cred)?;
    let path = format!("{}numbers", account_path(cred)?);
    let mut listing = Listing::new(Carrier::Vobiz);
    let mut page_no: u64 = 1;
    loop {
        let req = ex.request(Method::GET, &path).query(&[("page", page_no), ("per_page", PAGE_SIZE)]);
        let page: Page = ex.json("list numbers", req).await?;
        let count = listing.add_page(page.items, to_listed);
        // Counting what was received, not pages, copes with a server that caps per_page.
        if count == 0 || listing.full() || listing.seen() as u64 >= page.total {
            break;
        }
        page_no += 1;
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
    // The number goes in the path with its `+`, which `segment` sends as `%2B`.
    let attach = ex
        .request(Method::POST, &format!("{base}numbers/{}/application", segment(number.number.as_str())?))
        .json(&json!({ "application_id": app_id }));
    let report = configured(&app_id, &name, targets, actions, previous_app(number, &app_id));
    link_to(&ex, "attach application", attach, report).await
}

/// The number as the account lists it, found with the listing's search. Vobiz documents no
/// read of a single number; the listing says where it points.
async fn find_number(ex: &Exchange<'_>, base: &str, number: &E164) -> Result<Option<ListedNumber>, ProviderError> {
    const OP: &str = "find number";
    let req = ex.request(Method::GET, &format!("{base}numbers")).query(&[
        ("page", "1"),
        ("per_page", &PAGE_SIZE.to_string()),
        ("search", number.as_str()),
    ]);
    let page: Page = ex.json(OP, req).await?;
    let seen = page.items.len() as u64;
    let mut found = None;
    for v in page.items {
        // An item that cannot be read could be this number: it is not taken as absent.
        let item = serde_json::from_value::<Item>(v).map_err(|_| ex.unavailable(OP, "a number it could not read"))?;
        found = found.or(to_listed(item).filter(|n| &n.number == number));
    }
    // A search for one number that brings more than a page and not it cannot say it is gone.
    if found.is_none() && page.total > seen {
        return Err(ex.unavailable(OP, "the search for the number did not bring it on its first page"));
    }
    Ok(found)
}

/// Attaches the number back to the application it had, or detaches callgate's, where it
/// still uses callgate's; then deletes callgate's application.
pub(crate) async fn release_number(
    api: &ProviderApi,
    cred: &AuthPair,
    release: &Release<'_>,
) -> Result<Value, ProviderError> {
    let Some(ours) = release.field("application_id") else { return Ok(nothing_to_release()) };
    let ex = exchange(api, cred)?;
    let base = account_path(cred)?;
    let Some(current) = find_number(&ex, &base, release.number).await? else {
        // Unseen is not known to be gone (the search may match it otherwise), so callgate's
        // application, which it may still use, stays.
        return Ok(json!({
            "changed": false,
            "application_id": ours,
            "actions": ["none: the account's search did not find the number; callgate's application left in place"],
        }));
    };
    let relink = current.routed_to.as_deref() == Some(ours);
    let apps_path = format!("{base}Application/");
    let (previous, previous_gone) = route_back(&ex, &apps_path, release, relink).await?;
    if relink {
        let path = format!("{base}numbers/{}/application", segment(release.number.as_str())?);
        match previous {
            Some(p) => {
                let req = ex.request(Method::POST, &path).json(&json!({ "application_id": p }));
                ex.send("attach application", req).await?
            }
            None => ex.send("detach application", ex.request(Method::DELETE, &path)).await?,
        };
    }
    let outcome = Unlinked { on_account: true, relinked: relink, previous, previous_gone };
    delete_application(&ex, &apps_path, ours, outcome).await
}
