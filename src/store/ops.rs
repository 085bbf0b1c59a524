//! The operator's reads and probes: the `/admin` status page's figures, the database gauges of `/metrics`, the
//! write probe of `/readyz`, and the start-up repairs `serve` runs before it takes traffic.
//!
//! This module owns their SQL (or calls the concern's own store function) so the HTTP handlers and `serve` never
//! see a connection or a transaction.

use super::audit::{self, KeyRow, PaymentsPage, RevenueDay};
use super::reversals::{self, ReversalEvent};
use super::sql::{Engine, Sql};
use super::{Store, StoreError};
use crate::params;

/// Keys of one kind in one state (`live`, `revoked`, `suspended` or `expired`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCount {
    pub kind: String,
    pub state: String,
    pub count: i64,
}

/// Seats of one pool block held now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatsTaken {
    pub pool: String,
    pub block: String,
    pub taken: u32,
}

/// Transfers in one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCount {
    pub status: String,
    pub count: i64,
}

/// What the `/admin` status page shows from the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminOverview {
    /// The last 20 payments by id, oldest first.
    pub latest_payments: PaymentsPage,
    /// The last 14 days, oldest first.
    pub revenue: Vec<RevenueDay>,
    pub total_claimed_atomic: i64,
    pub total_received_atomic: i64,
    pub seats: Vec<SeatsTaken>,
    /// The last 20 keys by id, oldest first.
    pub latest_keys: Vec<KeyRow>,
    /// By kind, then state.
    pub key_counts: Vec<KeyCount>,
    pub reorgs: i64,
}

/// The database gauges of `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricCounts {
    pub transfers: Vec<StatusCount>,
    pub reorgs: i64,
    pub keys: Vec<KeyCount>,
    /// Per network (CAIP-2): the credited value of confirmed payments, and what unsettled `upto` payments owe.
    pub received_by_network: Vec<(String, i64)>,
    pub upto_owed_by_network: Vec<(String, i64)>,
    /// Per network: credits taken back from claims by reorgs (or failed re-settlements) and not given back.
    pub reversed_by_network: Vec<(String, i64)>,
    /// Per network, scheme (`exact`, `upto`) and status: x402 settlements.
    pub settlements: Vec<(String, String, String, i64)>,
}

/// Proves the database takes a durable write that changes nothing: rewrites the schema version where the engine
/// keeps it. SQLite: `PRAGMA user_version` in the file's header. PostgreSQL: the newest row of the migration
/// runner's `schema_migrations`, updated to itself (a new row version in the WAL, flushed at commit like any other
/// write; refused by a read-only server or transaction).
pub fn probe_write(c: &dyn Sql) -> Result<(), StoreError> {
    match c.engine() {
        Engine::Sqlite => {
            let v: i64 = c.query_value("PRAGMA user_version", params![])?;
            // A pragma takes no bound parameter; `v` is the integer just read.
            c.execute(&format!("PRAGMA user_version = {v}"), params![])?;
        }
        Engine::Postgres => {
            c.execute(
                "UPDATE schema_migrations SET applied_at = applied_at \
                 WHERE version = (SELECT max(version) FROM schema_migrations)",
                params![],
            )?;
        }
    }
    Ok(())
}

/// Rows the status page lists of payments and of keys.
const LATEST: u32 = 20;
/// Days of revenue the status page shows.
const REVENUE_DAYS: i64 = 14;

/// Keys per kind and state at `now`, ordered by kind then state.
pub fn key_counts(c: &dyn Sql, now: i64) -> Result<Vec<KeyCount>, StoreError> {
    c.query_map(
        "SELECT k.kind, CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked' WHEN k.suspended_at IS NOT NULL THEN 'suspended' \
         WHEN s.expires_at IS NOT NULL AND s.expires_at <= ?1 THEN 'expired' ELSE 'live' END AS state, \
         count(*) FROM api_keys k LEFT JOIN subscriptions s ON s.id = k.subscription_id \
         GROUP BY k.kind, state ORDER BY k.kind, state",
        params![now],
        |r| {
            Ok(KeyCount {
                kind: r.get(0)?,
                state: r.get(1)?,
                count: r.get(2)?,
            })
        },
    )
}

fn reorg_count(c: &dyn Sql) -> Result<i64, StoreError> {
    c.query_value("SELECT count(*) FROM reorgs", params![])
}

/// Reads [`AdminOverview`] at `now`.
///
pub fn admin_overview(c: &dyn Sql, now: i64) -> Result<AdminOverview, StoreError> {
    let latest_payments = audit::latest_payments(c, LATEST)?;
    let revenue = audit::revenue(c, Some(now - REVENUE_DAYS * 86_400), None)?;
    let total_claimed_atomic: i64 = c.query_value(
        "SELECT coalesce(sum(price_atomic), 0) FROM claims",
        params![],
    )?;
    let total_received_atomic: i64 = c.query_value(
        "SELECT coalesce(sum(value_atomic), 0) FROM transfers WHERE status = 'confirmed'",
        params![],
    )?;
    let seats = super::billing::all_seats_taken(c, now)?
        .into_iter()
        .map(|(pool, block, taken)| SeatsTaken { pool, block, taken })
        .collect();
    let latest_keys = audit::latest_keys(c, LATEST)?;
    Ok(AdminOverview {
        latest_payments,
        revenue,
        total_claimed_atomic,
        total_received_atomic,
        seats,
        latest_keys,
        key_counts: key_counts(c, now)?,
        reorgs: reorg_count(c)?,
    })
}

/// Reads [`MetricCounts`] at `now`.
pub fn metric_counts(c: &dyn Sql, now: i64) -> Result<MetricCounts, StoreError> {
    let transfers = c.query_map(
        "SELECT status, count(*) FROM transfers GROUP BY status",
        params![],
        |r| {
            Ok(StatusCount {
                status: r.get(0)?,
                count: r.get(1)?,
            })
        },
    )?;
    let received_by_network = c.query_map(
        "SELECT network, sum(value_atomic) FROM transfers WHERE status = 'confirmed' GROUP BY network",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let upto_owed_by_network = c.query_map(
        "SELECT network, sum(coalesce(cost_atomic, 0)) FROM upto_payments WHERE status = 'unsettled' \
         GROUP BY network",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let reversed_by_network = c.query_map(
        "SELECT c.network, coalesce(sum(CASE WHEN r.kind = 'reversed' THEN r.amount_atomic \
         ELSE -r.amount_atomic END), 0) FROM claim_reversals r JOIN claims c ON c.tx_hash = r.claim_tx \
         GROUP BY c.network",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut settlements: Vec<(String, String, String, i64)> = c.query_map(
        "SELECT network, status, count(*) FROM x402_settlements GROUP BY network, status",
        params![],
        |r| Ok((r.get(0)?, "exact".to_string(), r.get(1)?, r.get(2)?)),
    )?;
    settlements.extend(c.query_map(
        "SELECT network, status, count(*) FROM upto_payments GROUP BY network, status",
        params![],
        |r| Ok((r.get(0)?, "upto".to_string(), r.get(1)?, r.get(2)?)),
    )?);
    Ok(MetricCounts {
        transfers,
        reorgs: reorg_count(c)?,
        keys: key_counts(c, now)?,
        received_by_network,
        upto_owed_by_network,
        reversed_by_network,
        settlements,
    })
}

impl Store {
    /// The status page's figures at `now` (see [`admin_overview`]).
    pub async fn admin_overview(&self, now: i64) -> Result<AdminOverview, StoreError> {
        self.read(move |c| admin_overview(c, now)).await
    }

    /// The database's size in bytes: SQLite's pages (the main file, without the WAL), PostgreSQL's
    /// `pg_database_size`.
    pub async fn database_size(&self) -> Result<i64, StoreError> {
        self.read(|c| -> Result<i64, StoreError> {
            match c.engine() {
                Engine::Sqlite => c.query_value(
                    "SELECT p.page_count * s.page_size FROM pragma_page_count() p, pragma_page_size() s",
                    params![],
                ),
                Engine::Postgres => c.query_value(
                    "SELECT pg_database_size(current_database())",
                    params![],
                ),
            }
        })
        .await
    }

    /// The database gauges of `/metrics` at `now` (see [`metric_counts`]).
    pub async fn metric_counts(&self, now: i64) -> Result<MetricCounts, StoreError> {
        self.read(move |c| metric_counts(c, now)).await
    }

    /// Proves the database takes a durable write: rewrites the schema version in the file's header, which goes
    /// through the writer thread and the journal like any other write, and changes nothing.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        self.write(|tx| probe_write(tx)).await
    }

    /// Reverses or restores every claimed purchase whose payment's index state disagrees with its last reversal
    /// event (a database from before reversals existed). Returns what it did.
    pub async fn reconcile_reversals(&self, now: i64) -> Result<Vec<ReversalEvent>, StoreError> {
        self.write(move |tx| reversals::reconcile_all(tx, now))
            .await
    }
}
