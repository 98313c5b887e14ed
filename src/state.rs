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
    pub signer: crate::handoff::signing::Signer,
    pub outbox: crate::handoff::outbox::Outbox,
    /// The number each Telnyx call leg is for, as its first event said.
    pub telnyx_legs: crate::carriers::telnyx::legs::Legs,
}
