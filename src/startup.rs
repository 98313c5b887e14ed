//! Builds the application: the binary and the tests start the server through the same path.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;

use crate::carriers::rest::ProviderApi;
use crate::clock::Clock;
use crate::error::{extractors, ApiError};
use crate::rate_limit::RateLimiter;
use crate::settings::Settings;
use crate::state::AppState;
use crate::store::{GroupCommit, SledStore, Store, StoreError};
use crate::vault::{Keyring, Vault};

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

/// Opens the store and the keyring under the data dir: shared by `serve` and the CLI commands.
///
/// Refuses a master key that cannot open every stored secret. Started with the wrong one, the
/// gateway would look ready and then refuse every webhook of the numbers whose credentials it
/// cannot open; a missing key file replaced by a new key would do the same, for good.
pub fn open_data(settings: &Settings) -> anyhow::Result<(Arc<dyn Store>, Keyring)> {
    // Made readable by its owner alone: besides the key files it holds every webhook's body
    // (callers' numbers) and the numbers' configuration. A data dir that exists keeps its mode.
    let mut dir = std::fs::DirBuilder::new();
    dir.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
    dir.create(&settings.data_dir).map_err(|e| {
        anyhow::anyhow!("cannot create the data dir {} (CALLGATE_DATA_DIR): {e}", settings.data_dir.display())
    })?;
    let store = SledStore::open(&settings.data_dir.join("db"), settings.journal).map_err(|e| match e {
        // Damage found in the journal as it opened: said where it is, and what to do.
        StoreError::Corrupt { tree: "journal", ref detail } if !detail.contains("Nothing was changed") => {
            anyhow::anyhow!(
                "{e}. Nothing was changed: restore db/events/ from a backup, or see what `callgate salvage --dry-run` \
             would keep and then run `callgate salvage`"
            )
        }
        e => e.into(),
    })?;
    let keyring = keyring_for(settings, &store)?;
    Ok((Arc::new(store), keyring))
}

/// The master key, checked against every stored secret: generated when there is none and
/// nothing is sealed yet.
pub fn keyring_for(settings: &Settings, store: &dyn Store) -> anyhow::Result<Keyring> {
    let mut sealed_under: BTreeMap<String, usize> = BTreeMap::new();
    for rec in store.secrets_all()? {
        *sealed_under.entry(rec.sealed.master_key_id).or_default() += 1;
    }
    let secrets = sealed_under.values().sum();
    let (keyring, generated) = Keyring::load(&settings.data_dir, settings.master_key.as_ref(), secrets)?;
    if generated {
        tracing::info!(path = %settings.data_dir.join(crate::vault::crypto::KEY_FILE).display(),
            "generated a new master key (mode 0600); back it up: without it the stored secrets cannot be opened");
    }
    if let Some((id, n)) = sealed_under.iter().find(|(id, _)| !keyring.holds(id)) {
        anyhow::bail!(
            "the master key given ({}) is not the one {n} stored secret(s) were sealed under ({id}): \
             start with that key (CALLGATE_MASTER_KEY or {})",
            keyring.current_id(),
            settings.data_dir.join(crate::vault::crypto::KEY_FILE).display()
        );
    }
    Ok(keyring)
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Clock::system()).await
    }

    pub async fn build_with_clock(settings: Settings, clock: Clock) -> anyhow::Result<Self> {
        let (store, keyring) = open_data(&settings)?;
        if settings.exotel_allowed_ips.is_empty() {
            tracing::warn!("EXOTEL_ALLOWED_IPS is empty: every Exotel callback will be refused (403 ip_not_allowed) until it is set");
        }
        let listener = TcpListener::bind(settings.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
        let port = listener.local_addr()?.port();
        let commit = GroupCommit::start(Arc::clone(&store), settings.commit_linger);
        let (upstream_secret, generated) = crate::handoff::load_or_create_secret(&settings)?;
        if generated {
            tracing::info!("generated the upstream signing secret (see `callgate upstream secret`)");
        }
        let signer =
            crate::handoff::signing::Signer::new(&upstream_secret, settings.handoff.upstream_previous_secret.as_ref())
                .ok_or_else(|| anyhow::anyhow!("the upstream signing secret is not whsec_ + base64"))?;
        let client = |reach: crate::net::outbound::Reach| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .dns_resolver(Arc::new(crate::net::outbound::AllowedOnly(Arc::new(reach))))
                .user_agent(concat!("callgate/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        let http = client(crate::net::outbound::OPERATOR.clone())?;
        let org_http = if settings.org_reach.is_open() { http.clone() } else { client(settings.org_reach.clone())? };
        let state = web::Data::new(AppState {
            provider_api: ProviderApi::new(settings.carrier_urls.clone(), settings.provider_timeout)?,
            byok_limiter: RateLimiter::per_minute(settings.byok_rate_limit_per_minute),
            carrier_limiter: RateLimiter::per_minute(settings.carrier_rate_limit_per_minute),
            outbox: crate::handoff::outbox::Outbox::new(settings.handoff.delivery_breaker_after),
            telnyx_legs: Default::default(),
            settings: Arc::new(settings),
            store,
            commit,
            vault: Vault::new(keyring),
            credentials: Default::default(),
            clock,
            metrics: Default::default(),
            http,
            org_http,
            signer,
        });
        spawn_maintenance(state.clone());
        crate::handoff::outbox::spawn(Arc::downgrade(&state.clone().into_inner()));
        let body_limit = state.settings.body_limit_bytes;
        let workers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let fd_limit = crate::net::fds::limit();
        let per_worker = crate::net::fds::connection_cap(fd_limit, workers);
        tracing::info!(
            workers,
            per_worker,
            open_file_limit = ?fd_limit,
            "connections beyond {} wait in the listen backlog",
            per_worker * workers
        );
        let data = state.clone();
        let server = HttpServer::new(move || {
            // Runs on each worker as it starts.
            crate::store::serve_replies_here();
            App::new()
                .app_data(data.clone())
                .configure(|cfg| extractors::configure(cfg, body_limit))
                .configure(routes)
                .default_service(web::to(unrouted))
        })
        .workers(workers)
        .max_connections(per_worker)
        // actix-web's default, written out because clients must let go of idle connections
        // sooner: one reused at the instant it is closed fails (the tests' client allows 2 s).
        .keep_alive(Duration::from_secs(5))
        .client_request_timeout(Duration::from_secs(5))
        .client_disconnect_timeout(Duration::from_secs(2))
        .shutdown_timeout(20)
        .listen(listener)?
        .run();
        Ok(Self { port, server, state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Serves until SIGTERM/SIGINT (actix stops accepting and drains in-flight requests), then
    /// flushes the store.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Application { server, state, .. } = self;
        server.await?;
        // Background tasks let go of the state within a tick; in-flight deliveries finish.
        let mut state = state.into_inner();
        for _ in 0..250 {
            match Arc::try_unwrap(state) {
                Ok(owned) => {
                    let AppState { store, commit, .. } = owned;
                    tokio::task::spawn_blocking(move || {
                        commit.shutdown();
                        store.close()
                    })
                    .await??;
                    tracing::info!("stopped; store flushed and closed");
                    return Ok(());
                }
                Err(shared) => {
                    state = shared;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let store = Arc::clone(&state.store);
        tokio::task::spawn_blocking(move || store.close()).await??;
        tracing::warn!("stopped with background work still holding the store; flushed");
        Ok(())
    }
}

/// A URL of the API, taking the methods `allow` names (as its routes, added by the caller, do):
/// any other gets a 405 whose `Allow` names them, as HTTP asks of every 405.
pub fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        Err::<HttpResponse, _>(ApiError::method_not_allowed_but(allow))
    }))
}

/// A GET route that answers HEAD too, as HTTP asks of whatever answers GET (load balancers
/// check health so). actix leaves the body out of an answer to HEAD, keeping its length.
pub fn get_or_head() -> actix_web::Route {
    web::route().guard(actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()))
}

/// An admin URL: like [`resource`], except that while the admin API is off (no admin token)
/// every method is 404, so that a 405 does not tell it exists.
pub fn admin_resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |state: web::Data<AppState>| async move {
        Err::<HttpResponse, _>(match state.settings.admin_token {
            None => ApiError::not_found("resource"),
            Some(_) => ApiError::method_not_allowed_but(allow),
        })
    }))
}

/// A path no route serves is 404. (One that a route serves with another method never comes
/// here: each URL's [`resource`] answers that with its 405.)
async fn unrouted() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("resource"))
}

fn routes(cfg: &mut web::ServiceConfig) {
    // The carriers' webhooks first: they are the hot path, and actix tries routes in order.
    cfg.configure(crate::carriers::routes::configure)
        .service(resource("/health", "GET, HEAD").route(get_or_head().to(health)))
        .service(resource("/ready", "GET, HEAD").route(get_or_head().to(ready)))
        .service(resource("/metrics", "GET, HEAD").route(get_or_head().to(metrics)))
        .configure(crate::orgs::configure)
        .configure(crate::vault::routes::configure)
        .configure(crate::phones::configure)
        .configure(crate::handoff::routes::configure)
        .configure(crate::events::configure);
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    // A store that opens but cannot write (disk full, read-only) answers every webhook 503:
    // not ready, so that a load balancer sends carriers elsewhere.
    if state.commit.stats().failing.load(std::sync::atomic::Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status": "not_ready", "store": "writes failing", "master_key": "loaded"}));
    }
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.health()).await {
        Ok(Ok(())) => HttpResponse::Ok().json(json!({"status": "ready", "store": "ok", "master_key": "loaded"})),
        _ => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "not_ready", "store": "unavailable", "master_key": "loaded"})),
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let outbox = state.store.outbox();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render(
        state.commit.stats(),
        &outbox,
        state.store.damaged_events(),
    ))
}

/// Holds the state weakly so a stopped server's store (and its file lock) is released.
/// Runs `job` on the store every `period` (on a blocking thread) for as long as the app lives.
fn every<T: Send + 'static>(
    state: &web::Data<AppState>,
    period: Duration,
    job: fn(&dyn Store, i64) -> Result<T, crate::store::StoreError>,
    done: fn(T),
    what: &'static str,
) {
    let weak = Arc::downgrade(&state.clone().into_inner());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            let now = state.clock.now_ms();
            let store = Arc::clone(&state.store);
            drop(state);
            match tokio::task::spawn_blocking(move || job(store.as_ref(), now)).await {
                Ok(Ok(v)) => done(v),
                Ok(Err(e)) => tracing::warn!(error = %e, "{what} failed"),
                Err(_) => {}
            }
        }
    });
}

fn spawn_maintenance(state: web::Data<AppState>) {
    every(
        &state,
        Duration::from_secs(60),
        |store, now| store.sweep(now),
        |n| {
            if n > 0 {
                tracing::debug!(removed = n, "swept expired replay markers and retired secrets")
            }
        },
        "sweep",
    );
    // Saves the event index every so often under load, so a crash never leaves a long journal
    // to read at the next start.
    every(
        &state,
        Duration::from_secs(5),
        |store, _| store.checkpoint(),
        |saved| {
            if saved {
                tracing::debug!("saved the event index")
            }
        },
        "saving the event index",
    );
}
