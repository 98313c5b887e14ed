//! What every handler shares. Built once by `startup`.

use std::sync::Arc;

use crate::carriers::keys::KeyCache;
use crate::carriers::rest::ProviderApi;
use crate::clock::Clock;
use crate::rate_limit::RateLimiter;
use crate::settings::Settings;
use crate::store::{GroupCommit, Store};
use crate::vault::Vault;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub commit: GroupCommit,
    pub vault: Vault,
    pub credentials: KeyCache,
    pub clock: Clock,
    pub provider_api: ProviderApi,
    pub byok_limiter: RateLimiter,
    pub carrier_limiter: RateLimiter,
    pub metrics: crate::metrics::Metrics,
    /// For the assistant and the upstream: not the carriers' client, so a slow upstream can
    /// never hold the connections that carrier API calls need.
    pub http: reqwest::Client,
    /// The same, for the URLs organizations set on their numbers: its resolver also leaves out
    /// the ranges `CALLGATE_ORG_URL_DENY` names. `http` itself when there are none.
    pub org_http: reqwest::Client,
    pub signer: crate::handoff::signing::Signer,
    pub outbox: crate::handoff::outbox::Outbox,
    /// The number each Telnyx call leg is for, as its first event said.
    pub telnyx_legs: crate::carriers::telnyx::legs::Legs,
}

impl AppState {
    /// The client to call a hand-off `url` with, and where it may lead: the operator's own
    /// (`operators`, the gateway-wide setting) is held only to what nobody may reach; any other
    /// is an organization's, held to `CALLGATE_ORG_URL_DENY` as well. A number whose URL is the
    /// operator's gains nothing by naming it.
    pub fn reach(&self, url: &str, operators: Option<&str>) -> (&reqwest::Client, &crate::net::outbound::Reach) {
        if operators.is_some_and(|o| crate::net::outbound::same_url(o, url)) {
            (&self.http, &crate::net::outbound::OPERATOR)
        } else {
            (&self.org_http, &self.settings.org_reach)
        }
    }
}
