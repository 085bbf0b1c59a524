//! Proxy persistence: per-request usage rows and the credit reservations that go with them.
//!
//! A credit request reserves its worst-case cost with a `debit` ledger row in the same transaction that writes
//! its usage row (`in_flight`), so concurrent requests can never overdraw: the ledger refuses a debit that would take
//! the balance below zero (so an account left negative by a reversal cannot reserve anything). Settlement refunds
//! the unused part and records what was actually charged, which is never more than the reservation: what an
//! upstream produced beyond it is recorded (`overrun_tokens`, `uncharged_atomic`), not charged.

use serde::Serialize;

use super::StoreError;
use super::billing::{LedgerError, LedgerKind, append_ledger, balance};
use super::sql::{Row, Sql};
use crate::params;
use crate::usdc::Usdc;

/// A request about to be forwarded.
#[derive(Debug, Clone)]
pub struct NewUsage {
    pub request_id: String,
    pub key_id: i64,
    pub account: String,
    /// `subscription` or `credit`.
    pub key_kind: &'static str,
    pub model: String,
    pub stream: bool,
    pub started_at: i64,
    /// The gateway's bound: prompt tokens, and output tokens over all choices.
    pub bound_prompt_tokens: u64,
    pub bound_output_tokens: u64,
    /// The model's prices the request is charged at (per million tokens).
    pub input_per_mtok: Usdc,
    pub output_per_mtok: Usdc,
}

/// How a request ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the tokens cost at the model's prices (0 for subscription keys).
    pub cost: Usdc,
    /// `ok`, `upstream_error`, `upstream_cut`, `client_closed`.
    pub status: &'static str,
    /// `upstream`, `estimated` or `none`.
    pub usage_source: &'static str,
    pub http_status: Option<u16>,
    pub duration_ms: u64,
    pub overhead_us: u64,
    /// Tokens the upstream produced beyond the bound (at least 1 when the gateway cut a stream there).
    pub overrun_tokens: u64,
    /// What the reported tokens cost beyond what was charged (the reservation caps the charge).
    pub uncharged: Usdc,
    /// The API the request came in on (`chat.completions`, `messages`, …).
    pub api: Option<&'static str>,
    /// The deployment (upstream name) that answered, if one did.
    pub deployment: Option<String>,
    /// Time from the request's arrival to the upstream's response headers.
    pub first_byte_ms: Option<u64>,
}

/// What settlement charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub charged: Usdc,
    /// Account balance afterwards (credit keys).
    pub balance: Usdc,
}

/// Writes the usage row of a credit request and reserves `reserve` from its account. Returns the row id and the
/// balance left after the reservation.
pub fn reserve(
    tx: &dyn Sql,
    usage: &NewUsage,
    reserve: Usdc,
    replica: Option<&str>,
) -> Result<(i64, Usdc), LedgerError> {
    let left = append_ledger(
        tx,
        &usage.account,
        LedgerKind::Debit,
        Usdc(-reserve.atomic()),
        None,
        Some(usage.key_id),
        Some(&format!("reserve for request {}", usage.request_id)),
        usage.started_at,
    )?;
    let id = insert(tx, usage, reserve, "in_flight", replica)?;
    Ok((id, left))
}

/// `replica`: the PostgreSQL replica holding an `in_flight` reservation (`store::replicas`); `None` on SQLite.
fn insert(
    tx: &dyn Sql,
    usage: &NewUsage,
    reserved: Usdc,
    status: &str,
    replica: Option<&str>,
) -> Result<i64, StoreError> {
    tx.query_one(
        "INSERT INTO usage (request_id, key_id, account, key_kind, model, stream, reserved_atomic, status, started_at, \
         bound_prompt_tokens, bound_output_tokens, input_price_atomic, output_price_atomic, replica_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) RETURNING id",
        params![
            usage.request_id,
            usage.key_id,
            usage.account,
            usage.key_kind,
            usage.model,
            usage.stream,
            reserved.atomic(),
            status,
            usage.started_at,
            usage.bound_prompt_tokens.min(i64::MAX as u64) as i64,
            usage.bound_output_tokens.min(i64::MAX as u64) as i64,
            usage.input_per_mtok.atomic(),
            usage.output_per_mtok.atomic(),
            replica,
        ],
        |r| r.get(0),
    )
}

/// Writes a request's outcome, only while it is still `in_flight` (the guard that makes settlement happen at most
/// once, whoever else — a start-up recovery, another replica — reaches the row). Returns whether it did.
fn finish(tx: &dyn Sql, id: i64, outcome: &Outcome, charged: Usdc) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE usage SET prompt_tokens = ?2, completion_tokens = ?3, cost_atomic = ?4, status = ?5, \
         usage_source = ?6, http_status = ?7, duration_ms = ?8, overhead_us = ?9, overrun_tokens = ?10, \
         uncharged_atomic = ?11, api = ?12, deployment = ?13, first_byte_ms = ?14 \
         WHERE id = ?1 AND status = 'in_flight'",
        // Counts are `u64`s bound saturated at `i64::MAX` (`ToValue for u64`), never wrapped negative.
        params![
            id,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            charged.atomic(),
            outcome.status,
            outcome.usage_source,
            outcome.http_status,
            outcome.duration_ms,
            outcome.overhead_us,
            outcome.overrun_tokens,
            outcome.uncharged.atomic().max(0),
            outcome.api,
            outcome.deployment,
            outcome.first_byte_ms,
        ],
    )?;
    Ok(changed == 1)
}

/// Settles a reserved credit request: charges `min(outcome.cost, reserved)` and refunds the rest. The charge never
/// exceeds the reservation, whatever the upstream reported: the excess is the operator's recorded loss
/// (`uncharged_atomic`, `overrun_tokens`), never a debit the account did not reserve.
pub fn settle_credit(
    tx: &dyn Sql,
    usage_id: i64,
    account: &str,
    key_id: i64,
    reserved: Usdc,
    outcome: &Outcome,
    now: i64,
) -> Result<Settled, LedgerError> {
    let charged = outcome.cost.min(reserved).max(Usdc::ZERO);
    let uncharged = Usdc(
        outcome
            .uncharged
            .atomic()
            .max(outcome.cost.atomic() - charged.atomic())
            .max(0),
    );
    let settled = Outcome {
        uncharged,
        ..outcome.clone()
    };
    // Only a row still `in_flight` holds its reservation, and the guarded update claims it. Another gateway process
    // that started on this database while this one was serving (an overlapping deploy) may have returned the whole
    // reservation in its start-up recovery and marked the row `interrupted`: settling it here too would return the
    // reservation twice, creating credits. The request stays `interrupted` and free, as the restart policy says.
    if !finish(tx, usage_id, &settled, charged)? {
        tracing::warn!(
            usage_id,
            "a request's reservation was already returned (by a start-up recovery); it is not charged \
             (is a second gateway running on this database?)"
        );
        return Ok(Settled {
            charged: Usdc::ZERO,
            balance: balance(tx, account)?,
        });
    }
    let balance_after = if charged < reserved {
        append_ledger(
            tx,
            account,
            LedgerKind::Refund,
            Usdc(reserved.atomic() - charged.atomic()),
            None,
            Some(key_id),
            Some(&format!("settle request #{usage_id}")),
            now,
        )?
    } else {
        balance(tx, account)?
    };
    Ok(Settled {
        charged,
        balance: balance_after,
    })
}

/// Records a finished subscription request (nothing to charge).
pub fn record_subscription(
    tx: &dyn Sql,
    usage: &NewUsage,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    let id = insert(tx, usage, Usdc::ZERO, "in_flight", None)?;
    finish(tx, id, outcome, Usdc::ZERO)?;
    Ok(())
}

/// Refunds and closes requests left `in_flight` by a process that stopped mid-request. Returns how many. Each row
/// is claimed by a guarded update (`WHERE status = 'in_flight'`) before its refund, so a row is refunded at most
/// once whatever else settles or recovers it.
pub fn recover_in_flight(tx: &dyn Sql, now: i64) -> Result<usize, LedgerError> {
    let ids: Vec<i64> = tx.query_map(
        "SELECT id FROM usage WHERE status = 'in_flight' ORDER BY id",
        params![],
        |r| r.get(0),
    )?;
    let mut recovered = 0;
    for id in ids {
        recovered += usize::from(interrupt(tx, id, now, Interrupted::ByRestart)?);
    }
    Ok(recovered)
}

/// Whose stop left a request `in_flight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// The only process on the database stopped (SQLite start-up).
    ByRestart,
    /// Its replica stopped renewing its lease (PostgreSQL): claimed only while that lease is expired at `now`.
    ByDeadReplica,
}

/// Claims in-flight request `id` as interrupted — one guarded `UPDATE … WHERE status = 'in_flight'` (and, for a
/// dead replica, no live lease) `RETURNING` what it reserved — then returns the reservation to its account. A row
/// already settled, refunded, or held by a live replica is left alone: `false`.
pub fn interrupt(tx: &dyn Sql, id: i64, now: i64, by: Interrupted) -> Result<bool, LedgerError> {
    let claimed = tx.query_opt(
        "UPDATE usage SET status = 'interrupted', usage_source = 'none' WHERE id = ?1 AND status = 'in_flight' \
         AND (?3 = 0 OR (replica_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM replica_leases l \
         WHERE l.replica_id = usage.replica_id AND l.expires_at > ?2))) \
         RETURNING account, key_id, reserved_atomic, replica_id",
        params![id, now, by == Interrupted::ByDeadReplica],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<i64>(1)?,
                r.get::<i64>(2)?,
                r.get::<Option<String>>(3)?,
            ))
        },
    )?;
    let Some((account, key_id, reserved, replica)) = claimed else {
        return Ok(false);
    };
    if reserved > 0 {
        let note = match by {
            Interrupted::ByRestart => {
                format!("request #{id} interrupted by a restart: reservation returned")
            }
            Interrupted::ByDeadReplica => format!(
                "request #{id} interrupted: replica {} stopped, reservation returned",
                replica.unwrap_or_default()
            ),
        };
        append_ledger(
            tx,
            &account,
            LedgerKind::Refund,
            Usdc(reserved),
            None,
            Some(key_id),
            Some(&note),
            now,
        )?;
    }
    Ok(true)
}

/// Totals of a key's requests.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usdc: Usdc,
}

/// One request as `/v1/usage` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    pub request_id: String,
    pub model: String,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usdc: Usdc,
    pub status: String,
    pub usage_source: String,
    pub started_at: i64,
    pub duration_ms: Option<i64>,
}

/// A key's totals since `since` (unix seconds).
pub fn totals(c: &dyn Sql, key_id: i64, since: i64) -> Result<Totals, StoreError> {
    c.query_one(
        "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), \
         coalesce(sum(cost_atomic), 0) FROM usage WHERE key_id = ?1 AND started_at >= ?2",
        params![key_id, since],
        |r| {
            Ok(Totals {
                requests: r.get::<i64>(0)? as u64,
                prompt_tokens: r.get::<i64>(1)? as u64,
                completion_tokens: r.get::<i64>(2)? as u64,
                cost_usdc: Usdc(r.get(3)?),
            })
        },
    )
}

const USAGE_COLUMNS: &str = "request_id, model, stream, prompt_tokens, completion_tokens, cost_atomic, status, \
     usage_source, started_at, duration_ms";

fn usage_row(r: &Row) -> Result<UsageRow, StoreError> {
    Ok(UsageRow {
        request_id: r.get(0)?,
        model: r.get(1)?,
        stream: r.get(2)?,
        prompt_tokens: r.get::<i64>(3)? as u64,
        completion_tokens: r.get::<i64>(4)? as u64,
        cost_usdc: Usdc(r.get(5)?),
        status: r.get(6)?,
        usage_source: r.get(7)?,
        started_at: r.get(8)?,
        duration_ms: r.get(9)?,
    })
}

/// A key's most recent requests, newest first.
pub fn recent(c: &dyn Sql, key_id: i64, limit: u32) -> Result<Vec<UsageRow>, StoreError> {
    c.query_map(
        &format!("SELECT {USAGE_COLUMNS} FROM usage WHERE key_id = ?1 ORDER BY id DESC LIMIT ?2"),
        params![key_id, limit],
        usage_row,
    )
}

/// The usage row of a request id (tests and audits).
pub fn by_request_id(c: &dyn Sql, request_id: &str) -> Result<Option<UsageRow>, StoreError> {
    c.query_opt(
        &format!("SELECT {USAGE_COLUMNS} FROM usage WHERE request_id = ?1"),
        params![request_id],
        usage_row,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, billing};

    #[tokio::test]
    async fn counts_beyond_i64_are_stored_saturated_never_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("u.db")).unwrap();
        store
            .write(|c| -> Result<_, StoreError> {
                billing::ensure_account(c, "0xaa", 0)?;
                let key = crate::keys::generate().unwrap();
                let key_id = billing::insert_credit_key_if_none(c, &key, "0xaa", "claim", 0)?.unwrap();
                let row = NewUsage {
                    request_id: "req_1".into(),
                    key_id,
                    account: "0xaa".into(),
                    key_kind: "subscription",
                    model: "m".into(),
                    stream: true,
                    started_at: 0,
                    bound_prompt_tokens: u64::MAX,
                    bound_output_tokens: u64::MAX,
                    input_per_mtok: Usdc::ZERO,
                    output_per_mtok: Usdc::ZERO,
                };
                let outcome = Outcome {
                    prompt_tokens: u64::MAX,
                    completion_tokens: u64::MAX,
                    status: "ok",
                    usage_source: "upstream",
                    duration_ms: u64::MAX,
                    overhead_us: u64::MAX,
                    overrun_tokens: u64::MAX,
                    ..Outcome::default()
                };
                record_subscription(c, &row, &outcome)?;
                let stored: Vec<i64> = c.query_one(
                    "SELECT prompt_tokens, completion_tokens, duration_ms, overhead_us, overrun_tokens, \
                     bound_prompt_tokens, bound_output_tokens FROM usage",
                    params![],
                    |r| (0..7).map(|i| r.get(i)).collect(),
                )?;
                assert_eq!(stored, vec![i64::MAX; 7]);
                Ok(())
            })
            .await
            .unwrap();
    }
}
