//! Several gateway replicas on one PostgreSQL database: who this replica is, its lease, and leadership.
//!
//! - **Identity and lease.** Each replica has an id (host, process, random suffix) and renews a row of
//!   `replica_leases` while it runs; its in-flight credit reservations and request slots name it. A replica that
//!   stops renewing (it crashed, its machine died) loses them to the next sweep of any other replica, each claimed
//!   by a guarded statement that re-checks the lease, so they are refunded exactly once and a live replica's never.
//! - **Leadership.** Exactly one replica runs the indexer and the x402 reorg watcher: whoever holds a session-level
//!   advisory lock on a connection it keeps. PostgreSQL releases the lock the moment that session ends (a SIGKILL
//!   closes the socket), so another replica's next attempt wins within its polling interval, with no lease clock to
//!   trust; a leader whose session is gone learns it from [`Leadership::still_leading`] and stops.
//!
//! On SQLite there is one process per database file (`GatewayLock`): it always leads, has no id and no lease, and
//! recovers every in-flight reservation at start-up.

use super::{Store, StoreError};

/// Key of the leadership lock ("x402lead" in ASCII).
const LEADER_LOCK: i64 = 0x7834_3032_6c65_6164;

/// How long a lease lasts without renewal: a crashed replica's reservations wait this long before another refunds
/// them (a request in flight on a live replica is never affected).
pub const LEASE_TTL_SECS: i64 = 15;

/// How often a replica renews its lease and sweeps expired replicas' reservations.
pub const LEASE_RENEW: std::time::Duration = std::time::Duration::from_secs(3);

/// A unique id for this process's replica: host name, process id and a random suffix (a restarted process on the
/// same host gets a new id, so it never inherits its previous life's reservations).
pub fn new_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A live replica as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    pub replica_id: String,
    /// Unix seconds its lease runs to.
    pub expires_at: i64,
    /// Whether it holds the leadership lock (runs the indexer).
    pub leader: bool,
}

/// This replica's claim to run the leader-only work.
pub enum Leadership {
    /// The only process on a SQLite file.
    Sole,
    /// The advisory lock, held by the session of this connection (taken out of the pool: dropping it closes the
    /// session, which releases the lock, instead of returning a locked session to the pool).
    Postgres(deadpool_postgres::ClientWrapper),
}

impl Leadership {
    /// Whether this replica still leads (its lock's session is alive). Call it before each step of leader work.
    pub async fn still_leading(&self) -> bool {
        match self {
            Leadership::Sole => true,
            Leadership::Postgres(client) => client
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
                     AND classid = (($1::bigint >> 32) & 4294967295)::oid \
                     AND objid = ($1::bigint & 4294967295)::oid AND objsubid = 1 AND granted",
                    &[&LEADER_LOCK],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false),
        }
    }

    /// Steps down so that another replica takes over at once (a clean shutdown).
    pub async fn resign(self) {
        if let Leadership::Postgres(client) = self {
            let _ = client
                .execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK])
                .await;
        }
    }
}

impl Store {
    /// This replica's id (PostgreSQL); `None` on SQLite.
    pub fn replica_id(&self) -> Option<&str> {
        self.inner.replica.as_deref()
    }

    /// Renews this replica's lease until `now + LEASE_TTL_SECS` (nothing on SQLite).
    pub async fn renew_lease(&self, now: i64) -> Result<(), StoreError> {
        let Some(replica) = self.inner.replica.clone() else {
            return Ok(());
        };
        self.write(move |c| -> Result<(), StoreError> {
            c.execute(
                "INSERT INTO replica_leases (replica_id, expires_at) VALUES (?1, ?2) \
                 ON CONFLICT (replica_id) DO UPDATE SET expires_at = excluded.expires_at",
                crate::params![replica, now + LEASE_TTL_SECS],
            )?;
            Ok(())
        })
        .await
    }

    /// Tries to become the leader; `None` while another replica leads. Always leads on SQLite.
    pub async fn try_lead(&self) -> Result<Option<Leadership>, StoreError> {
        let Some(pool) = self.pg_pool() else {
            return Ok(Some(Leadership::Sole));
        };
        let client = pool.get().await.map_err(super::pg_pool_error)?;
        let won: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            .await?
            .get(0);
        if won {
            // The leader's session carries its replica id, so every replica can tell who leads (the console):
            // see [`Store::replicas`].
            if let Some(id) = self.inner.replica.as_deref() {
                client
                    .execute("SELECT set_config('application_name', $1, false)", &[&id])
                    .await?;
            }
        }
        Ok(won.then(|| Leadership::Postgres(deadpool_postgres::Object::take(client))))
    }

    /// The live replicas (lease not expired at `now`) and which one leads, for the console (PostgreSQL; empty on
    /// SQLite, where the one process leads). The leader is the session holding the leadership lock, named by the
    /// `application_name` it set when it won (PostgreSQL keeps its first 63 bytes).
    pub async fn replicas(&self, now: i64) -> Result<Vec<ReplicaInfo>, StoreError> {
        let Some(pool) = self.pg_pool() else {
            return Ok(Vec::new());
        };
        let client = pool.get().await.map_err(super::pg_pool_error)?;
        let leader: Option<String> = client
            .query_opt(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.classid = (($1::bigint >> 32) & 4294967295)::oid \
                 AND l.objid = ($1::bigint & 4294967295)::oid AND l.objsubid = 1 AND l.granted LIMIT 1",
                &[&LEADER_LOCK],
            )
            .await?
            .map(|r| r.get(0));
        let rows = client
            .query(
                "SELECT replica_id, expires_at FROM replica_leases WHERE expires_at > $1 ORDER BY replica_id",
                &[&now],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let replica_id: String = r.get(0);
                let leader = leader
                    .as_deref()
                    .is_some_and(|l| !l.is_empty() && replica_id.starts_with(l));
                ReplicaInfo {
                    replica_id,
                    expires_at: r.get(1),
                    leader,
                }
            })
            .collect())
    }

    /// Refunds the in-flight reservations of replicas whose lease has expired at `now` (they crashed); returns
    /// how many. Each row is claimed by one guarded update that re-checks the lease (`WHERE status = 'in_flight'
    /// AND` no live lease), then refunded, in one short transaction per row: a reservation is refunded exactly once
    /// whichever replicas sweep at the same time, and a live replica's (or a settled one) is never touched.
    pub async fn recover_dead_replicas(&self, now: i64) -> Result<usize, StoreError> {
        if self.inner.replica.is_none() {
            return Ok(0);
        }
        let candidates: Vec<i64> = self
            .read(move |c| -> Result<Vec<i64>, StoreError> {
                c.query_map(
                    "SELECT id FROM usage WHERE status = 'in_flight' AND replica_id IS NOT NULL \
                     AND NOT EXISTS (SELECT 1 FROM replica_leases l WHERE l.replica_id = usage.replica_id \
                     AND l.expires_at > ?1) ORDER BY id",
                    crate::params![now],
                    |r| r.get(0),
                )
            })
            .await?;
        let mut recovered = 0;
        for id in candidates {
            let refunded = self
                .write(move |c| {
                    super::usage::interrupt(c, id, now, super::usage::Interrupted::ByDeadReplica)
                        .map_err(|e| match e {
                            super::billing::LedgerError::Store(e) => e,
                            other => StoreError::Task(other.to_string()),
                        })
                })
                .await?;
            recovered += usize::from(refunded);
        }
        Ok(recovered)
    }

    /// Takes one of `limit` request slots of `owner` for `request_id` (PostgreSQL: the slot is shared by every
    /// replica); `None` when all are held by live replicas. A slot is a numbered row taken by one guarded upsert —
    /// it succeeds only if the slot is free or its holder's lease has expired — so two replicas never hold one slot.
    pub async fn take_request_slot(
        &self,
        owner: String,
        limit: u32,
        request_id: String,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let Some(replica) = self.inner.replica.clone() else {
            return Ok(None);
        };
        let held: std::collections::HashSet<i64> = {
            let owner = owner.clone();
            self.read(move |c| -> Result<Vec<i64>, StoreError> {
                c.query_map(
                    "SELECT slot_no FROM request_slots s WHERE owner = ?1 AND EXISTS (SELECT 1 FROM replica_leases l \
                     WHERE l.replica_id = s.replica_id AND l.expires_at > ?2)",
                    crate::params![owner, now],
                    |r| r.get(0),
                )
            })
            .await?
            .into_iter()
            .collect()
        };
        if held.len() >= limit as usize {
            return Ok(None);
        }
        // Free numbers, from a random one on: racers for the same owner spread over the free slots instead of all
        // queueing on the lowest (each loser of a slot tries the next). Each attempt is its own short transaction:
        // an upsert locks the row it conflicts with even when its WHERE refuses, so one transaction trying several
        // slots could hold one row while waiting for another — and deadlock with a racer going the other way.
        let limit = i64::from(limit);
        let start = rand::random_range(0..limit);
        let free = (0..limit)
            .map(|i| (start + i) % limit + 1)
            .filter(|n| !held.contains(n));
        for slot_no in free.take(64) {
            let (owner, replica, request_id) = (owner.clone(), replica.clone(), request_id.clone());
            let taken = self
                .write_with(super::Durability::Relaxed, move |c| -> Result<bool, StoreError> {
                    Ok(c.execute(
                        "INSERT INTO request_slots (owner, slot_no, replica_id, request_id) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (owner, slot_no) DO UPDATE SET replica_id = excluded.replica_id, \
                         request_id = excluded.request_id \
                         WHERE NOT EXISTS (SELECT 1 FROM replica_leases l \
                         WHERE l.replica_id = request_slots.replica_id AND l.expires_at > ?5)",
                        crate::params![owner, slot_no, replica, request_id, now],
                    )? == 1)
                })
                .await?;
            if taken {
                return Ok(Some(slot_no));
            }
        }
        Ok(None)
    }

    /// Frees a slot taken by [`Store::take_request_slot`], only if `request_id` still holds it (a slot taken over
    /// after this replica's lease expired is not freed by its late release).
    pub async fn release_request_slot(
        &self,
        owner: String,
        slot_no: i64,
        request_id: String,
    ) -> Result<bool, StoreError> {
        // Relaxed: a slot lost by a crash before its release is synced frees itself with this replica's lease.
        self.write_with(
            super::Durability::Relaxed,
            move |c| -> Result<bool, StoreError> {
                Ok(c.execute(
                "DELETE FROM request_slots WHERE owner = ?1 AND slot_no = ?2 AND request_id = ?3",
                crate::params![owner, slot_no, request_id],
            )? == 1)
            },
        )
        .await
    }
}
