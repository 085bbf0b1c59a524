//! Solana (SVM): the wire format of addresses and transactions written from the specifications (no Solana SDK
//! crates: they would add hundreds of crates), the JSON-RPC calls the gateway makes, and the indexer of USDC
//! (SPL) payments to payTo's token account.

pub mod address;
pub mod indexer;
pub mod instructions;
pub mod offchain;
pub mod rpc;
pub mod tx;

pub use indexer::SvmIndexer;
pub use rpc::SvmRpc;

/// Starts the Solana indexer of one network as a background task.
pub fn spawn(
    settings: crate::config::SvmSettings,
    store: crate::store::Store,
    status: crate::chain::StatusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<
    tokio::task::JoinHandle<Result<(), crate::chain::IndexerError>>,
    crate::chain::IndexerError,
> {
    let rpc = std::sync::Arc::new(
        SvmRpc::new(&settings.rpc_http, settings.rpc_timeout)?.for_network(settings.caip2.clone()),
    );
    let indexer = SvmIndexer::new(settings, rpc, store, status);
    Ok(tokio::spawn(indexer.run(shutdown)))
}
