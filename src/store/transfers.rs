//! Indexer persistence: each network's binding, checkpoint and recent-block window, and the transfers.
//!
//! Every row and every statement names its network (CAIP-2 id): one network's indexer never reads or moves another's
//! rows, so several run side by side on one database.
//!
//! A range of blocks is applied in ONE transaction — its transfers, its headers and the new checkpoint — so a crash
//! leaves either all of it or none of it, and a restart resumes at checkpoint + 1 with no gap and no duplicate.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;

use super::sql::{Engine, Row, Sql, ToValue};
use super::{Store, StoreError, now_unix};
use crate::params;
use crate::usdc::Usdc;

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferStatus {
    /// Mined, fewer confirmations than required.
    Seen,
    /// At or past the required depth: it can be claimed.
    Confirmed,
    /// Its block left the canonical chain.
    Orphaned,
}

impl TransferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Seen => "seen",
            TransferStatus::Confirmed => "confirmed",
            TransferStatus::Orphaned => "orphaned",
        }
    }

    pub fn parse(s: &str) -> Option<TransferStatus> {
        match s {
            "seen" => Some(TransferStatus::Seen),
            "confirmed" => Some(TransferStatus::Confirmed),
            "orphaned" => Some(TransferStatus::Orphaned),
            _ => None,
        }
    }
}

/// A block header of the canonical chain as the indexer saw it. Hashes are lower-case 0x-hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    pub number: u64,
    pub hash: String,
    pub parent_hash: String,
    pub timestamp: u64,
}

/// A Transfer log to payTo, as fetched from the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransfer {
    /// CAIP-2 id of the network it was mined on.
    pub network: String,
    pub tx_hash: String,
    pub log_index: u64,
    pub block_number: u64,
    pub block_hash: String,
    pub block_time: Option<u64>,
    pub from: String,
    pub to: String,
    /// Its ledger value: USD micro-units at the token's configured price (USDC: the amount itself).
    pub value: Usdc,
    /// The token contract paid in (lower-case 0x-hex).
    pub token: String,
    /// The amount in the token's own atomic units (decimal).
    pub token_value: String,
}

/// A stored transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: i64,
    /// CAIP-2 id of the network it was mined on.
    pub network: String,
    pub tx_hash: String,
    pub log_index: u64,
    pub block_number: u64,
    pub block_hash: String,
    pub block_time: Option<u64>,
    pub from: String,
    pub to: String,
    /// Its ledger value: USD micro-units at the token's configured price (USDC: the amount itself).
    pub value: Usdc,
    /// The token contract paid in (lower-case 0x-hex).
    pub token: String,
    /// The amount in the token's own atomic units (decimal; `None` on rows older than several tokens).
    pub token_value: Option<String>,
    pub status: TransferStatus,
    pub first_seen_at: i64,
    pub confirmed_at: Option<i64>,
    pub orphaned_at: Option<i64>,
}

impl Transfer {
    /// Confirmations against the indexed head: the block that mined it counts as one; orphaned counts zero.
    pub fn confirmations(&self, indexed_head: Option<u64>) -> u64 {
        match (self.status, indexed_head) {
            (TransferStatus::Orphaned, _) | (_, None) => 0,
            (_, Some(head)) if head >= self.block_number => head - self.block_number + 1,
            _ => 0,
        }
    }
}

/// The last fully indexed block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub number: u64,
    pub hash: String,
}

/// One range of blocks to apply atomically.
#[derive(Debug, Clone)]
pub struct RangeUpdate {
    /// CAIP-2 id of the network the range belongs to.
    pub network: String,
    pub from: u64,
    pub to: u64,
    /// Every Transfer log to payTo in `[from, to]`, already checked against the headers.
    pub transfers: Vec<NewTransfer>,
    /// Headers to keep for reorg detection (always includes `to`).
    pub headers: Vec<BlockRef>,
    pub confirmations: u64,
    pub reorg_window: u64,
}

/// What changed when a range was applied, for status lines and metrics.
#[derive(Debug, Clone, Default)]
pub struct RangeOutcome {
    pub inserted: usize,
    pub reappeared: Vec<Transfer>,
    pub newly_confirmed: Vec<Transfer>,
    pub orphaned: Vec<Transfer>,
    /// Transfers still below the required depth, with the new head.
    pub pending: Vec<Transfer>,
}

const TRANSFER_COLUMNS: &str = "id, tx_hash, log_index, block_number, block_hash, block_time, from_address, \
     to_address, value_atomic, status, first_seen_at, confirmed_at, orphaned_at, network, token, token_value";

fn transfer_from_row(row: &Row) -> Result<Transfer, StoreError> {
    let status: String = row.get(9)?;
    Ok(Transfer {
        id: row.get(0)?,
        tx_hash: row.get(1)?,
        log_index: row.get::<i64>(2)? as u64,
        block_number: row.get::<i64>(3)? as u64,
        block_hash: row.get(4)?,
        block_time: row.get::<Option<i64>>(5)?.map(|t| t as u64),
        from: row.get(6)?,
        to: row.get(7)?,
        value: Usdc(row.get(8)?),
        status: TransferStatus::parse(&status).unwrap_or(TransferStatus::Orphaned),
        first_seen_at: row.get(10)?,
        confirmed_at: row.get(11)?,
        orphaned_at: row.get(12)?,
        network: row.get(13)?,
        token: row.get(14)?,
        token_value: row.get(15)?,
    })
}

pub(super) fn record_status(
    c: &dyn Sql,
    transfer_id: i64,
    status: TransferStatus,
    head: u64,
    reason: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO transfer_status_history (transfer_id, status, at, head_block, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![transfer_id, status.as_str(), now_unix(), head as i64, reason],
    )?;
    Ok(())
}

/// Marks transfer `id` orphaned at `now`, with its history row.
pub(super) fn orphan(
    c: &dyn Sql,
    id: i64,
    now: i64,
    head: u64,
    reason: &str,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE transfers SET status = 'orphaned', orphaned_at = ?2 WHERE id = ?1",
        params![id, now],
    )?;
    record_status(c, id, TransferStatus::Orphaned, head, reason)
}

pub(super) fn select_transfers(
    c: &dyn Sql,
    where_clause: &str,
    args: &[&dyn ToValue],
) -> Result<Vec<Transfer>, StoreError> {
    c.query_map(
        &format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE {where_clause}"),
        args,
        transfer_from_row,
    )
}

/// Inserts a transfer unless that (block hash, log index) is already stored: `confirmed` at once when its block
/// is at or below `confirm_upto` (found at depth, e.g. during backfill), `seen` otherwise. Returns the new row.
/// The row itself is the first entry of its history (`first_seen_at`, and `confirmed_at` equal to it when it was
/// found confirmed); `transfer_status_history` records the changes after that.
pub(super) fn insert_new(
    c: &dyn Sql,
    t: &NewTransfer,
    confirm_upto: i64,
) -> Result<Option<Transfer>, StoreError> {
    let now = now_unix();
    let status = if (t.block_number as i64) <= confirm_upto {
        TransferStatus::Confirmed
    } else {
        TransferStatus::Seen
    };
    let confirmed_at = (status == TransferStatus::Confirmed).then_some(now);
    // `ON CONFLICT DO NOTHING … RETURNING id`: no row when the transfer is already indexed (both engines).
    let inserted: Option<i64> = c.query_opt(
        "INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, block_time, from_address, \
         to_address, value_atomic, status, first_seen_at, confirmed_at, network, token, token_value) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) ON CONFLICT DO NOTHING RETURNING id",
        params![
            t.tx_hash,
            t.log_index as i64,
            t.block_number as i64,
            t.block_hash,
            t.block_time.map(|v| v as i64),
            t.from,
            t.to,
            t.value.atomic(),
            status.as_str(),
            now,
            confirmed_at,
            t.network,
            t.token,
            t.token_value,
        ],
        |r| r.get(0),
    )?;
    let Some(id) = inserted else {
        return Ok(None);
    };
    Ok(Some(Transfer {
        id,
        network: t.network.clone(),
        tx_hash: t.tx_hash.clone(),
        log_index: t.log_index,
        block_number: t.block_number,
        block_hash: t.block_hash.clone(),
        block_time: t.block_time,
        from: t.from.clone(),
        to: t.to.clone(),
        value: t.value,
        token: t.token.clone(),
        token_value: Some(t.token_value.clone()),
        status,
        first_seen_at: now,
        confirmed_at,
        orphaned_at: None,
    }))
}

/// [`Store::bind_chain`]'s statements; `path` only names the database in the refusal.
/// Key of the transaction-scoped lock that orders the index's writes on PostgreSQL ("x402idx" in ASCII).
const INDEX_WRITE_LOCK: i64 = 0x0078_3430_3269_6478;

/// Orders this transaction after every other index write (and reversal step) in progress (PostgreSQL). The index's writes read, then
/// write (the checkpoint, then the rows below it; the rows of a range, then their new status), which is safe only
/// while they run one at a time: SQLite's single writer does that; on PostgreSQL the leader's range fetch and its
/// WebSocket task — and, for a moment, an old and a new leader — would otherwise interleave, and a `seen` row
/// inserted under a range being applied could be confirmed without ever being checked. The lock is released by the
/// transaction's end.
pub(crate) fn serialize_index_writes(c: &dyn Sql) -> Result<(), StoreError> {
    if c.engine() == Engine::Postgres {
        c.execute(
            "SELECT pg_advisory_xact_lock(?1)",
            params![INDEX_WRITE_LOCK],
        )?;
    }
    Ok(())
}

fn bind_chain_in(
    c: &dyn Sql,
    path: &Path,
    network: &str,
    chain_id: u64,
    token: &str,
    pay_to: &str,
) -> Result<(), StoreError> {
    serialize_index_writes(c)?;
    // Single writer: read, then insert when absent. A second concurrent binder would fail on the primary key.
    let existing: Option<(i64, String, String)> = c.query_opt(
        "SELECT chain_id, token_address, pay_to FROM network_bindings WHERE network = ?1",
        params![network],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let expected = format!("{network}: chain {chain_id}, token {token}, payTo {pay_to}");
    match existing {
        None => {
            c.execute(
                "INSERT INTO network_bindings (network, chain_id, token_address, pay_to, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![network, chain_id as i64, token, pay_to, now_unix()],
            )?;
            Ok(())
        }
        Some((c, t, p)) if c as u64 == chain_id && t == token && p == pay_to => Ok(()),
        Some((c, t, p)) => Err(StoreError::BindingMismatch {
            path: path.to_path_buf(),
            found: format!("{network}: chain {c}, token {t}, payTo {p}"),
            expected,
        }),
    }
}

fn read_checkpoint(c: &dyn Sql, network: &str) -> Result<Option<Checkpoint>, StoreError> {
    c.query_opt(
        "SELECT block_number, block_hash FROM network_checkpoints WHERE network = ?1",
        params![network],
        |r| {
            Ok(Checkpoint {
                number: r.get::<i64>(0)? as u64,
                hash: r.get(1)?,
            })
        },
    )
}

fn read_recent_block(
    c: &dyn Sql,
    network: &str,
    number: u64,
) -> Result<Option<BlockRef>, StoreError> {
    c.query_opt(
        "SELECT number, hash, parent_hash, timestamp FROM recent_blocks WHERE network = ?1 AND number = ?2",
        params![network, number as i64],
        |r| {
            Ok(BlockRef {
                number: r.get::<i64>(0)? as u64,
                hash: r.get(1)?,
                parent_hash: r.get(2)?,
                timestamp: r.get::<i64>(3)? as u64,
            })
        },
    )
}

/// [`Store::apply_range`]'s statements but the reversals, which the caller runs in the same transaction.
/// `now` stamps the status changes.
fn apply_range_in(c: &dyn Sql, update: &RangeUpdate, now: i64) -> Result<RangeOutcome, StoreError> {
    serialize_index_writes(c)?;
    let mut outcome = RangeOutcome::default();
    let head = update.to;
    let fetched: HashSet<(&str, u64)> = update
        .transfers
        .iter()
        .map(|t| (t.block_hash.as_str(), t.log_index))
        .collect();

    // Depth reached: confirmations = head − block + 1 ≥ N  ⇔  block ≤ head + 1 − N.
    let confirm_upto = (head + 1)
        .checked_sub(update.confirmations)
        .map(|v| v as i64)
        .unwrap_or(-1);
    for t in &update.transfers {
        if let Some(row) = insert_new(c, t, confirm_upto)? {
            outcome.inserted += 1;
            if row.status == TransferStatus::Confirmed {
                outcome.newly_confirmed.push(row);
            }
            continue;
        }
        // Already stored: a WebSocket announcement, or a block that comes back after a reorg.
        // Single writer: the rows read here are updated by id below without re-checking their status.
        let back = select_transfers(
            c,
            "network = ?1 AND block_hash = ?2 AND log_index = ?3 AND status = 'orphaned'",
            params![update.network, t.block_hash, t.log_index as i64],
        )?;
        for row in back {
            c.execute(
                "UPDATE transfers SET status = 'seen', orphaned_at = NULL WHERE id = ?1",
                params![row.id],
            )?;
            record_status(
                c,
                row.id,
                TransferStatus::Seen,
                head,
                "block is canonical again",
            )?;
            outcome.reappeared.push(row);
        }
    }

    // Rows announced over WebSocket whose block the canonical range does not contain were reorged away.
    // Single writer: a `seen` row inserted by a concurrent `record_announced` after this read would be missed
    // here and, once below the checkpoint, confirmed by a later range although its block is not canonical.
    let stale = select_transfers(
        c,
        "network = ?1 AND status = 'seen' AND block_number BETWEEN ?2 AND ?3",
        params![update.network, update.from as i64, update.to as i64],
    )?;
    for row in stale
        .into_iter()
        .filter(|r| !fetched.contains(&(r.block_hash.as_str(), r.log_index)))
    {
        orphan(c, row.id, now, head, "block not in the canonical chain")?;
        outcome.orphaned.push(row);
    }

    for h in &update.headers {
        c.execute(
            "INSERT INTO recent_blocks (network, number, hash, parent_hash, timestamp) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (network, number) DO UPDATE SET hash = excluded.hash, \
             parent_hash = excluded.parent_hash, timestamp = excluded.timestamp",
            params![update.network, h.number as i64, h.hash, h.parent_hash, h.timestamp as i64],
        )?;
    }
    let keep_from = update.to.saturating_sub(update.reorg_window) as i64;
    c.execute(
        "DELETE FROM recent_blocks WHERE network = ?1 AND number < ?2",
        params![update.network, keep_from],
    )?;
    let to_hash = update
        .headers
        .iter()
        .find(|h| h.number == update.to)
        .map(|h| h.hash.clone())
        .ok_or_else(|| {
            StoreError::Schema(format!(
                "range update without the header of block {}",
                update.to
            ))
        })?;
    c.execute(
        "INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (network) DO UPDATE SET block_number = excluded.block_number, \
         block_hash = excluded.block_hash, updated_at = excluded.updated_at",
        params![update.network, update.to as i64, to_hash, now],
    )?;

    // Single writer: as above, the rows read are updated by id without re-checking their status.
    let newly = select_transfers(
        c,
        "network = ?1 AND status = 'seen' AND block_number <= ?2",
        params![update.network, confirm_upto],
    )?;
    for mut row in newly {
        c.execute(
            "UPDATE transfers SET status = 'confirmed', confirmed_at = ?2 WHERE id = ?1",
            params![row.id, now],
        )?;
        record_status(
            c,
            row.id,
            TransferStatus::Confirmed,
            head,
            "required confirmations reached",
        )?;
        row.status = TransferStatus::Confirmed;
        row.confirmed_at = Some(now);
        outcome.newly_confirmed.push(row);
    }
    outcome.pending = select_transfers(
        c,
        "network = ?1 AND status = 'seen' ORDER BY block_number, log_index",
        params![update.network],
    )?;
    Ok(outcome)
}

/// [`Store::rollback_to`]'s statements but the reversals, which the caller runs in the same transaction.
fn rollback_in(
    c: &dyn Sql,
    network: &str,
    fork: &BlockRef,
    old_head: u64,
    now: i64,
) -> Result<Vec<Transfer>, StoreError> {
    serialize_index_writes(c)?;
    // Single writer: the rows read are updated by id without re-checking their status, and their count is
    // what the `reorgs` row records.
    let gone = select_transfers(
        c,
        "network = ?1 AND block_number > ?2 AND status != 'orphaned'",
        params![network, fork.number as i64],
    )?;
    for row in &gone {
        orphan(
            c,
            row.id,
            now,
            fork.number,
            "reorg: block left the canonical chain",
        )?;
    }
    c.execute(
        "DELETE FROM recent_blocks WHERE network = ?1 AND number > ?2",
        params![network, fork.number as i64],
    )?;
    c.execute(
        "UPDATE network_checkpoints SET block_number = ?2, block_hash = ?3, updated_at = ?4 WHERE network = ?1",
        params![network, fork.number as i64, fork.hash, now],
    )?;
    c.execute(
        "INSERT INTO reorgs (detected_at, fork_block, old_head, depth, orphaned_transfers, network) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            now,
            fork.number as i64,
            old_head as i64,
            old_head.saturating_sub(fork.number) as i64,
            gone.len() as i64,
            network
        ],
    )?;
    Ok(gone)
}

/// [`Store::record_announced`]'s statements.
fn record_announced_in(c: &dyn Sql, t: &NewTransfer) -> Result<bool, StoreError> {
    serialize_index_writes(c)?;
    // The checkpoint read here cannot move before the insert commits: `serialize_index_writes` (PostgreSQL), the
    // single writer (SQLite).
    let checkpoint = read_checkpoint(c, &t.network)?;
    if checkpoint
        .as_ref()
        .is_some_and(|cp| t.block_number <= cp.number)
    {
        return Ok(false);
    }
    Ok(insert_new(c, t, -1)?.is_some())
}

fn list_transfers_in(
    c: &dyn Sql,
    status: Option<TransferStatus>,
) -> Result<Vec<Transfer>, StoreError> {
    match status {
        Some(s) => select_transfers(
            c,
            "status = ?1 ORDER BY block_number, log_index, id",
            params![s.as_str()],
        ),
        None => select_transfers(c, "1 = 1 ORDER BY block_number, log_index, id", params![]),
    }
}

fn transfers_of_tx_in(
    c: &dyn Sql,
    network: &str,
    tx_hash: &str,
) -> Result<Vec<Transfer>, StoreError> {
    select_transfers(
        c,
        "network = ?1 AND tx_hash = ?2 ORDER BY block_number, log_index, id",
        params![network, tx_hash],
    )
}

fn count_reorgs(c: &dyn Sql, network: &str) -> Result<u64, StoreError> {
    Ok(c.query_value::<i64>(
        "SELECT count(*) FROM reorgs WHERE network = ?1",
        params![network],
    )? as u64)
}

impl Store {
    /// Ties `network` (CAIP-2) to one chain id, token and payTo on first use; refuses a different one afterwards.
    pub async fn bind_chain(
        &self,
        network: String,
        chain_id: u64,
        token: String,
        pay_to: String,
    ) -> Result<(), StoreError> {
        let path = self.path().to_path_buf();
        self.write(move |tx| bind_chain_in(tx, &path, &network, chain_id, &token, &pay_to))
            .await
    }

    /// The last fully indexed block of `network`.
    pub async fn checkpoint(&self, network: &str) -> Result<Option<Checkpoint>, StoreError> {
        let network = network.to_string();
        self.read(move |c| read_checkpoint(c, &network)).await
    }

    /// The stored canonical hash of `network`'s block `number`, if it is in the window.
    pub async fn recent_block(
        &self,
        network: &str,
        number: u64,
    ) -> Result<Option<BlockRef>, StoreError> {
        let network = network.to_string();
        self.read(move |c| read_recent_block(c, &network, number))
            .await
    }

    /// Applies one fetched range atomically; see [`RangeUpdate`].
    pub async fn apply_range(&self, update: RangeUpdate) -> Result<RangeOutcome, StoreError> {
        self.write(move |tx| {
            let now = now_unix();
            let outcome = apply_range_in(tx, &update, now)?;
            // Claimed payments whose transfers left the chain, or came back confirmed: reversed or restored in
            // this same transaction (see `store::reversals`).
            let changed: HashSet<&str> = outcome
                .orphaned
                .iter()
                .chain(&outcome.newly_confirmed)
                .map(|t| t.tx_hash.as_str())
                .collect();
            for hash in changed {
                super::reversals::reconcile_tx(tx, &update.network, hash, now)?;
            }
            Ok(outcome)
        })
        .await
    }

    /// Rolls the index back to `fork` (the highest block still canonical): everything above it is orphaned.
    pub async fn rollback_to(
        &self,
        network: &str,
        fork: BlockRef,
        old_head: u64,
    ) -> Result<Vec<Transfer>, StoreError> {
        let network = network.to_string();
        self.write(move |tx| {
            let now = now_unix();
            let gone = rollback_in(tx, &network, &fork, old_head, now)?;
            // A claimed payment whose every transfer is gone is reversed in this same transaction: no window in
            // which the index says "orphaned" while its credits and keys still work.
            let hashes: HashSet<&str> = gone.iter().map(|t| t.tx_hash.as_str()).collect();
            for hash in hashes {
                super::reversals::reconcile_tx(tx, &network, hash, now)?;
            }
            Ok(gone)
        })
        .await
    }

    /// Records a transfer announced by a WebSocket subscription as `seen`, unless its block is already indexed
    /// (then the range fetch owns it). Returns whether a row was added.
    pub async fn record_announced(&self, t: NewTransfer) -> Result<bool, StoreError> {
        self.write(move |tx| record_announced_in(tx, &t)).await
    }

    /// Transfers in block order, optionally of one status.
    pub async fn list_transfers(
        &self,
        status: Option<TransferStatus>,
    ) -> Result<Vec<Transfer>, StoreError> {
        self.read(move |c| list_transfers_in(c, status)).await
    }

    /// All stored transfers of one transaction on `network`.
    pub async fn transfers_of_tx(
        &self,
        network: &str,
        tx_hash: String,
    ) -> Result<Vec<Transfer>, StoreError> {
        let network = network.to_string();
        self.read(move |c| transfers_of_tx_in(c, &network, &tx_hash))
            .await
    }

    /// How many reorgs `network`'s indexer has handled.
    pub async fn reorg_count(&self, network: &str) -> Result<u64, StoreError> {
        let network = network.to_string();
        self.read(move |c| count_reorgs(c, &network)).await
    }
}
