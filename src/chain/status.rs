//! The indexer's live status, shared with `/healthz` and the CLI.

use std::sync::{Arc, RwLock};

use serde::Serialize;

/// A snapshot of how the indexer is doing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IndexerStatus {
    /// Last block whose logs are written.
    pub indexed_head: Option<u64>,
    /// Latest block the RPC reported.
    pub chain_head: Option<u64>,
    /// The error of the last failed step, cleared when a step succeeds.
    pub last_error: Option<String>,
    /// Set when indexing has stopped for good (deep reorg, wrong chain, database failure).
    pub fatal: Option<String>,
    pub reorgs: u64,
    pub rpc_errors: u64,
    pub transfers_indexed: u64,
    /// Whether the WebSocket wake-up subscription is live (always false without `rpc_ws`).
    pub ws_connected: bool,
    /// Another replica leads and runs the indexer (PostgreSQL): `indexed_head` is the shared checkpoint as this
    /// replica last read it, and the chain head is the leader's to know.
    pub follower: bool,
}

impl IndexerStatus {
    /// Blocks between the chain head and the indexed head.
    pub fn lag(&self) -> Option<u64> {
        match (self.chain_head, self.indexed_head) {
            (Some(chain), Some(indexed)) => Some(chain.saturating_sub(indexed)),
            (Some(chain), None) => Some(chain + 1),
            _ => None,
        }
    }
}

/// Shared, cheaply cloned access to the status.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<RwLock<IndexerStatus>>);

impl StatusHandle {
    pub fn snapshot(&self) -> IndexerStatus {
        match self.0.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut IndexerStatus)) {
        match self.0.write() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

/// Every network's indexer status, in configuration order: the first network's first.
#[derive(Debug, Clone)]
pub struct NetworkStatuses(Arc<Vec<(String, StatusHandle)>>);

impl NetworkStatuses {
    /// `first` for the first network, a fresh handle for each other one of `settings`.
    pub fn new(first: StatusHandle, settings: &crate::config::Settings) -> NetworkStatuses {
        let mut all = vec![(settings.chain.network.caip2(), first)];
        all.extend(
            settings
                .other_networks
                .iter()
                .map(|n| (n.network.caip2(), StatusHandle::default())),
        );
        all.extend(
            settings
                .svm_networks
                .iter()
                .map(|n| (n.caip2.clone(), StatusHandle::default())),
        );
        NetworkStatuses(Arc::new(all))
    }

    /// The status of the network with CAIP-2 id `caip2`.
    pub fn get(&self, caip2: &str) -> Option<&StatusHandle> {
        self.0.iter().find(|(id, _)| id == caip2).map(|(_, s)| s)
    }

    /// Each network's CAIP-2 id and status, the first network first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &StatusHandle)> {
        self.0.iter().map(|(id, s)| (id.as_str(), s))
    }
}
