//! The HTTP surface: one axum router per audience, assembled here, and `run(listener, shutdown)`.
//!
//! It serves operations (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`), the agent checkout (`/api/agent/*`),
//! standard x402 purchases (`/x402/*`), the inference routes (`/v1/*`), the audit API (`/api/audit/*`) and the
//! operator's console (`/admin`). Every route passes the [`limits`] middleware (rate limits, body
//! limits, timeouts), and [`run`] serves HTTP with a header read timeout and the client's address for the limits.

mod admin;
pub mod agent;
pub mod audit;
pub mod bazaar;
pub mod discovery;
pub mod exact;
pub mod limits;
pub mod openai;
pub mod openapi;
mod ops;
pub mod replica;
pub mod upto;
pub mod x402;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::billing::{Billing, Clock};
use crate::chain::{NetworkStatuses, StatusHandle};
use crate::config::Settings;
use crate::store::Store;

/// How often unsettled upto payments are tried again.
const UPTO_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    /// The first network's indexer status.
    pub indexer: StatusHandle,
    /// Every network's indexer status, the first network's first (the same handle as `indexer`).
    pub indexers: NetworkStatuses,
    pub billing: Billing,
    /// The standard x402 engine of the first network (`[x402]` configured), shared by the purchase routes and
    /// per-request payment; it alone offers `upto`.
    pub x402: Option<crate::x402::X402>,
    /// One x402 engine per network, the first network's first: every offer lists each (one `accepts` entry per
    /// network), and a payment is verified and settled by the engine of the network it names.
    pub x402_networks: Vec<crate::x402::X402>,
    /// Standard x402 `exact` on each Solana network with a fee payer (`fee_payer_key_env`), offered after the EVM
    /// networks.
    pub svm_x402: Vec<Arc<crate::x402::svm::settle::SvmExact>>,
    pub proxy: Arc<crate::proxy::Proxy>,
    /// Per-IP rate limits, body limits and timeouts (`[limits]`).
    pub limits: Arc<limits::Limits>,
}

impl AppState {
    /// The state for `settings` on `store`, with `clock` as "now" for seats and rotations.
    pub fn new(
        settings: Settings,
        store: Store,
        indexer: StatusHandle,
        clock: Clock,
    ) -> Result<AppState, ServeError> {
        let settings = Arc::new(settings);
        let limits = Arc::new(limits::Limits::new(&settings.limits, clock.clone()));
        let indexers = NetworkStatuses::new(indexer.clone(), &settings);
        let billing = Billing::new(settings.clone(), store.clone(), indexers.clone(), clock)
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let proxy = crate::proxy::Proxy::new(&settings, &store)
            .map_err(|e| ServeError::Config(format!("upstream HTTP client: {e}")))?;
        Ok(AppState {
            settings,
            store,
            indexer,
            indexers,
            billing,
            x402: None,
            x402_networks: Vec::new(),
            svm_x402: Vec::new(),
            proxy: Arc::new(proxy),
            limits,
        })
    }

    /// Whether standard x402 payments are taken at all (an EVM engine, or a Solana network with a fee payer).
    pub fn x402_enabled(&self) -> bool {
        self.x402.is_some() || !self.svm_x402.is_empty()
    }

    /// With the standard x402 engine (one network).
    pub fn with_x402(self, engine: crate::x402::X402) -> AppState {
        self.with_x402_networks(vec![engine])
    }

    /// With one standard x402 engine per network, the first network's first.
    pub fn with_x402_networks(mut self, engines: Vec<crate::x402::X402>) -> AppState {
        self.x402 = engines.first().cloned();
        self.x402_networks = engines;
        self
    }

    /// The x402 engine of the network a client named (CAIP-2 id or v1 name) and the token it pays in (`None`: the
    /// network's USDC, the first engine of that network), if one is configured.
    pub fn x402_for(
        &self,
        network: &str,
        asset: Option<alloy::primitives::Address>,
    ) -> Option<&crate::x402::X402> {
        self.x402_networks.iter().find(|e| {
            crate::x402::requirements::network_matches(e.network(), network)
                && asset.is_none_or(|a| e.network().token == a)
        })
    }

    /// The token an engine settles in, with its USD price (the settings' entry for its network and asset).
    pub fn x402_token(&self, engine: &crate::x402::X402) -> Option<crate::config::Token> {
        self.settings
            .network(&engine.network().caip2())
            .and_then(|n| n.token(engine.network().token))
    }
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    // Install the metrics recorder before anything records.
    crate::metrics::handle();
    Router::new()
        .merge(ops::router())
        .merge(openai::router())
        .merge(agent::router())
        .merge(x402::router())
        .merge(upto::router())
        .merge(audit::router())
        .merge(admin::router())
        .merge(discovery::router())
        .fallback(no_route)
        // With [x402], every 402 carries PAYMENT-REQUIRED (a route's own offer, else the minimum credit top-up).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            x402::ensure_challenge,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::enforce,
        ))
        .with_state(state)
}

/// 404 for paths no route serves (the OpenAPI test tells it from a handler's own 404 by the code).
async fn no_route(uri: axum::http::Uri) -> axum::response::Response {
    audit::error(
        axum::http::StatusCode::NOT_FOUND,
        "no_route",
        format!("no route {}; see /openapi.json", uri.path()),
    )
}

/// How the HTTP server treats connections (beyond what the router does with requests).
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Longest time a connection may take to send a request's headers (slow-loris); idle keep-alive connections
    /// are closed after it too.
    pub header_read_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with(listener, router, shutdown, ServerOptions::default()).await
}

/// [`run`] with `options`. Each request carries its peer's address (`ConnectInfo<SocketAddr>`) for the limits.
pub async fn run_with(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    options: ServerOptions,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!("listening on http://{addr}");
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for connections to close rather than spin.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                router.clone().oneshot(req)
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, peer = %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Indexer(#[from] crate::chain::IndexerError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// Runs the whole gateway — indexer and HTTP server — on `listener` until `shutdown`.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_with_clock(settings, listener, shutdown, crate::billing::system_clock()).await
}

/// [`serve`] with an injected clock (tests move time to expire seats).
pub async fn serve_with_clock(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
    clock: Clock,
) -> Result<(), ServeError> {
    serve_with_env(settings, listener, shutdown, clock, &|name| {
        std::env::var(name).ok()
    })
    .await
}

/// [`serve_with_clock`] reading secrets (the x402 hot wallet's key) through `env` instead of the process
/// environment (tests).
pub async fn serve_with_env(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
    clock: Clock,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<(), ServeError> {
    if !settings.auth.claims_require_signature {
        tracing::warn!(
            "auth.claims_require_signature = false: ANYONE who sees a payment's txHash can claim it before the payer \
             does. Use this only for seed-000 client compatibility."
        );
    }
    let store = Store::open_database(&settings.database).await?;
    store.set_metering_durability(settings.metering_durability);
    let now = (clock)();
    if store.replica_id().is_some() {
        // Several replicas may share the database: take the lease before the first reservation names this
        // replica; the lease task sweeps reservations of replicas that died, never a live one's.
        store.renew_lease(now).await?;
        tracing::info!(
            replica = store.replica_id().unwrap_or("-"),
            engine = store.engine().name(),
            "replica started"
        );
    } else {
        // The only process on this file: whatever is in flight was left by its last stop.
        let recovered = crate::billing::metering::recover_interrupted(&store, now).await?;
        if recovered > 0 {
            tracing::warn!(
                requests = recovered,
                "refunded the reservations of requests interrupted by the last stop"
            );
        }
    }
    // Purchases whose payments left the chain while no reversal code ran (a database from before migration 6):
    // the indexer reconciles the rest as it changes transfers.
    let reconciled = store.reconcile_reversals(now).await?;
    if !reconciled.is_empty() {
        tracing::warn!(
            purchases = reconciled.len(),
            "reconciled claimed payments with the index at start-up (reversed or restored)"
        );
    }
    let status = StatusHandle::default();
    // Fail now on an indexer that cannot be built (bad config), not in the leader loop.
    for network in settings.networks() {
        crate::chain::Indexer::new(network.clone(), store.clone(), StatusHandle::default())?;
    }
    // One engine per network and token (the same hot wallet or facilitator on each); the first (the first
    // network's USDC) settles `upto`.
    let mut engines: Vec<crate::x402::X402> = Vec::new();
    if let Some(x) = &settings.x402 {
        for chain in settings.networks() {
            engines.extend(
                crate::x402::engine::engines_for_network(x, chain, env)
                    .map_err(|e| ServeError::Config(e.to_string()))?,
            );
        }
    }
    // Standard x402 on each Solana network with a fee payer: its key is read now (a wrong key fails the start).
    let mut svm_x402 = Vec::new();
    for svm in &settings.svm_networks {
        if let Some(var) = &svm.fee_payer_key_env {
            let key = crate::x402::svm::settle::fee_payer_from_env(var, env)
                .map_err(|e| ServeError::Config(format!("{}: {e}", svm.caip2)))?;
            let rpc = crate::chain::svm::SvmRpc::new(&svm.rpc_http, svm.rpc_timeout)
                .map_err(|e| ServeError::Config(e.to_string()))?
                .for_network(svm.caip2.clone());
            svm_x402.push(Arc::new(crate::x402::svm::settle::SvmExact::new(
                svm.clone(),
                Arc::new(rpc),
                key,
            )));
        }
    }
    let engine = engines.first().cloned();
    let networks: Vec<crate::config::ChainSettings> = settings.networks().cloned().collect();
    let svm_networks: Vec<crate::config::SvmSettings> = settings.svm_networks.clone();
    let mut state = AppState::new(settings, store.clone(), status.clone(), clock.clone())?;
    if !svm_x402.is_empty() {
        let names: Vec<String> = svm_x402.iter().map(|s| s.settings.caip2.clone()).collect();
        tracing::info!(networks = %names.join(", "), "standard x402 payments enabled on Solana");
        state.svm_x402 = svm_x402;
    }
    if let Some(engine) = &engine {
        let names: Vec<String> = engines.iter().map(|e| e.network().caip2()).collect();
        tracing::info!(first = %engine.network().caip2(), networks = %names.join(", "), "standard x402 payments enabled");
        state = state.with_x402_networks(
            engines
                .iter()
                .map(|e| e.clone().with_store(&store))
                .collect(),
        );
    }
    // The indexer and the x402 reorg watcher run on the leader only (always this process on SQLite).
    let leader_work: replica::StartLeaderWork = {
        let (store, billing, indexers) =
            (store.clone(), state.billing.clone(), state.indexers.clone());
        Box::new(move |term: CancellationToken| {
            let mut tasks = Vec::new();
            // One indexer per network, each with its own checkpoint and status: a slow or dead RPC of one network
            // never stalls another's.
            for chain in &networks {
                let network = chain.network.caip2();
                let Some(status) = indexers.get(&network) else {
                    continue;
                };
                match crate::chain::spawn(
                    chain.clone(),
                    store.clone(),
                    status.clone(),
                    term.clone(),
                ) {
                    Ok(indexer) => tasks.push(tokio::spawn(async move {
                        if let Ok(Err(e)) = indexer.await {
                            tracing::warn!(%network, error = %e, "the indexer had stopped");
                        }
                    })),
                    Err(e) => tracing::error!(%network, error = %e, "cannot start the indexer"),
                }
            }
            for svm in &svm_networks {
                let network = svm.caip2.clone();
                let Some(status) = indexers.get(&network) else {
                    continue;
                };
                match crate::chain::svm::spawn(
                    svm.clone(),
                    store.clone(),
                    status.clone(),
                    term.clone(),
                ) {
                    Ok(indexer) => tasks.push(tokio::spawn(async move {
                        if let Ok(Err(e)) = indexer.await {
                            tracing::warn!(%network, error = %e, "the Solana indexer had stopped");
                        }
                    })),
                    Err(e) => {
                        tracing::error!(%network, error = %e, "cannot start the Solana indexer")
                    }
                }
            }
            if let Some(engine) = &engine {
                // Unsettled upto payments are settled again while their authorization is valid.
                if let Some(upto) = engine.upto() {
                    tasks.push(crate::billing::upto::spawn_retrier(
                        billing.clone(),
                        upto.clone(),
                        UPTO_RETRY_INTERVAL,
                        term.clone(),
                    ));
                }
            }
            // Each network's settlements are watched for reorgs by its own engine.
            for engine in &engines {
                tasks.push(crate::x402::reorg::spawn(
                    store.clone(),
                    engine.clone(),
                    billing.clone(),
                    term.clone(),
                ));
            }
            tasks
        })
    };
    let leadership = replica::spawn_leadership(
        store.clone(),
        state.indexers.clone(),
        leader_work,
        shutdown.clone(),
    );
    let lease = replica::spawn_lease(store, clock, shutdown.clone());
    let options = ServerOptions {
        header_read_timeout: state.settings.limits.header_read_timeout,
    };
    let served = run_with(listener, router(state), shutdown.clone(), options).await;
    shutdown.cancel();
    let _ = leadership.await;
    let _ = lease.await;
    Ok(served?)
}
