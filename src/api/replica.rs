//! What a gateway process runs beside its HTTP server: the leader-only work (the indexer and the x402 reorg
//! watcher), started when this replica wins leadership and stopped the moment it loses it, and, on PostgreSQL, the
//! lease that keeps this replica's reservations its own and the sweep that refunds those of replicas that died.
//!
//! On SQLite the process always leads (one process per file, `GatewayLock`), so this is the old start-up order.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::billing::Clock;
use crate::store::Store;
use crate::store::replicas::{LEASE_RENEW, Leadership};

/// How often a replica that does not lead tries to, and a leader checks it still does.
const LEAD_POLL: Duration = Duration::from_secs(1);

/// Starts the leader-only work under `token`; returns the tasks to wait for when it stops.
pub type StartLeaderWork = Box<dyn Fn(CancellationToken) -> Vec<JoinHandle<()>> + Send + Sync>;

/// Runs until `shutdown`: wins leadership when it can, runs `start` while it leads, stops it when leadership is
/// lost (and tries again). Each term's work gets its own token, so nothing of a lost term keeps running.
pub fn spawn_leadership(
    store: Store,
    statuses: crate::chain::NetworkStatuses,
    start: StartLeaderWork,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let leadership = tokio::select! {
                _ = shutdown.cancelled() => return,
                won = store.try_lead() => won,
            };
            let leadership = match leadership {
                Ok(Some(l)) => l,
                Ok(None) => {
                    for (network, status) in statuses.iter() {
                        follow(&store, network, status).await;
                    }
                    if wait(&shutdown, LEAD_POLL).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot try for leadership; retrying");
                    if wait(&shutdown, LEAD_POLL).await {
                        return;
                    }
                    continue;
                }
            };
            if matches!(leadership, Leadership::Postgres(_)) {
                tracing::info!(
                    replica = store.replica_id().unwrap_or("-"),
                    "this replica leads: running the indexer and the x402 reorg watcher"
                );
            }
            for (_, status) in statuses.iter() {
                status.update(|s| {
                    s.follower = false;
                });
            }
            let term = shutdown.child_token();
            let tasks = start(term.clone());
            let stopping = loop {
                if wait(&shutdown, LEAD_POLL).await {
                    break true;
                }
                if !leadership.still_leading().await {
                    tracing::warn!("leadership lost: stopping the indexer and the reorg watcher");
                    break false;
                }
            };
            term.cancel();
            for task in tasks {
                let _ = task.await;
            }
            if stopping {
                leadership.resign().await;
                return;
            }
        }
    })
}

/// A follower's status: the shared checkpoint as the index's progress (so `/healthz` and `/readyz` answer for the
/// database this replica serves from), no chain head of its own.
async fn follow(store: &Store, network: &str, status: &crate::chain::StatusHandle) {
    match store.checkpoint(network).await {
        Ok(checkpoint) => status.update(|s| {
            s.follower = true;
            s.indexed_head = checkpoint.map(|c| c.number);
            s.chain_head = None;
            s.ws_connected = false;
            s.last_error = None;
        }),
        Err(e) => status.update(|s| {
            s.follower = true;
            s.last_error = Some(format!("cannot read the shared checkpoint: {e}"));
        }),
    }
}

/// Renews this replica's lease and refunds the reservations of replicas whose lease expired, every
/// [`LEASE_RENEW`], until `shutdown` (PostgreSQL only; returns at once on SQLite).
pub fn spawn_lease(store: Store, clock: Clock, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        if store.replica_id().is_none() {
            return;
        }
        loop {
            let now = (clock)();
            if let Err(e) = store.renew_lease(now).await {
                tracing::warn!(error = %e, "cannot renew this replica's lease");
            }
            match crate::billing::metering::recover_dead_replicas(&store, now).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    requests = n,
                    "refunded the reservations of a replica that stopped renewing its lease"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot sweep expired replicas' reservations"),
            }
            if wait(&shutdown, LEASE_RENEW).await {
                return;
            }
        }
    })
}

/// Sleeps `d`; `true` when `shutdown` came first.
async fn wait(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
