//! The chain side: JSON-RPC access, the payment indexer, its WebSocket wake-up, its live status, and keeping the
//! RPC URLs' secrets out of every text made from their errors.

pub mod indexer;
pub mod redact;
pub mod rpc;
pub mod status;
pub mod svm;
mod transport;
pub mod ws;

pub use indexer::{Indexer, IndexerError, Step};
pub use rpc::{Rpc, RpcError};
pub use status::{IndexerStatus, NetworkStatuses, StatusHandle};

use tokio_util::sync::CancellationToken;

use crate::config::ChainSettings;
use crate::store::Store;

/// Starts the indexer (and the WebSocket wake-up when `rpc_ws` is set) as background tasks.
pub fn spawn(
    settings: ChainSettings,
    store: Store,
    status: StatusHandle,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(), IndexerError>>, IndexerError> {
    let indexer = Indexer::new(settings.clone(), store.clone(), status.clone())?;
    if let Some(url) = settings.rpc_ws.clone() {
        tokio::spawn(ws::follow(
            url,
            settings,
            store,
            indexer.waker(),
            status,
            shutdown.clone(),
        ));
    }
    Ok(tokio::spawn(indexer.run(shutdown)))
}
