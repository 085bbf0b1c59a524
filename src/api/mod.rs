//! The HTTP surface: one axum router per audience, assembled here, and `run(listener, shutdown)`.
//!
//! For now it serves operations (`/healthz`); the agent, x402 and audit routers join it as they are built.

mod ops;

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::chain::StatusHandle;
use crate::config::Settings;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub indexer: StatusHandle,
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    Router::new().merge(ops::router()).with_state(state)
}

/// Serves `router` on `listener` until `shutdown` fires, then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!("listening on http://{addr}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
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
}

/// Runs the whole gateway — indexer and HTTP server — on `listener` until `shutdown`.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let store = Store::open(&settings.database_path)?;
    let status = StatusHandle::default();
    let indexer = crate::chain::spawn(
        settings.chain.clone(),
        store.clone(),
        status.clone(),
        shutdown.clone(),
    )?;
    let state = AppState {
        settings: Arc::new(settings),
        store,
        indexer: status,
    };
    let served = run(listener, router(state), shutdown.clone()).await;
    shutdown.cancel();
    if let Ok(Err(e)) = indexer.await {
        tracing::warn!(error = %e, "the indexer had stopped");
    }
    Ok(served?)
}
