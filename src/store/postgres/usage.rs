//! Metering on PostgreSQL: the credit reservation, its settlement and the refund of reservations a stopped process
//! left `in_flight` — the same operations and rules as the SQLite store's `store::usage`, each money rule one
//! guarded statement, so that they hold with several gateway replicas writing at once:
//! - a reservation is a guarded debit (it can never overdraw) and the usage row, in one transaction;
//! - settlement first claims the row with `UPDATE … WHERE id = $1 AND status = 'in_flight'`, then refunds: a row
//!   that another replica (or a start-up recovery) has already refunded is charged nothing, and never refunded
//!   twice; the charge is never more than the reservation;
//! - recovery claims each row the same way before refunding it, one short transaction per row (the lock order of a
//!   settlement: usage row, then account), so replicas recovering and settling at once cannot deadlock.

use tokio_postgres::GenericClient;

use super::money::{MoneyError, append_ledger};
use crate::store::usage::{NewUsage, Outcome, Settled};
use crate::usdc::Usdc;

fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Debits `amount` from the request's account and writes its `in_flight` usage row; returns the row id. Run it in
/// a transaction: a refused debit writes nothing.
pub async fn reserve(
    c: &impl GenericClient,
    usage: &NewUsage,
    amount: Usdc,
) -> Result<i64, MoneyError> {
    append_ledger(
        c,
        &usage.account,
        "debit",
        Usdc(-amount.atomic()),
        None,
        Some(usage.key_id),
        Some(&format!("reserve for request {}", usage.request_id)),
        usage.started_at,
    )
    .await?;
    let row = c
        .query_one(
            "INSERT INTO usage (request_id, key_id, account, key_kind, model, stream, reserved_atomic, status, \
             started_at, bound_prompt_tokens, bound_output_tokens, input_price_atomic, output_price_atomic) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'in_flight', $8, $9, $10, $11, $12) RETURNING id",
            &[
                &usage.request_id,
                &usage.key_id,
                &usage.account,
                &usage.key_kind,
                &usage.model,
                &i64::from(usage.stream),
                &amount.atomic(),
                &usage.started_at,
                &clamp(usage.bound_prompt_tokens),
                &clamp(usage.bound_output_tokens),
                &usage.input_per_mtok.atomic(),
                &usage.output_per_mtok.atomic(),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Settles reservation `usage_id`: charges `min(outcome.cost, reserved)` and refunds the rest, only if the row is
/// still `in_flight` (else charges nothing). Run it in a transaction.
pub async fn settle_credit(
    c: &impl GenericClient,
    usage_id: i64,
    account: &str,
    key_id: i64,
    reserved: Usdc,
    outcome: &Outcome,
    now: i64,
) -> Result<Settled, MoneyError> {
    let charged = outcome.cost.min(reserved).max(Usdc::ZERO);
    let uncharged = outcome
        .uncharged
        .atomic()
        .max(outcome.cost.atomic() - charged.atomic())
        .max(0);
    let claimed = c
        .execute(
            "UPDATE usage SET prompt_tokens = $2, completion_tokens = $3, cost_atomic = $4, status = $5, \
             usage_source = $6, http_status = $7, duration_ms = $8, overhead_us = $9, overrun_tokens = $10, \
             uncharged_atomic = $11 WHERE id = $1 AND status = 'in_flight'",
            &[
                &usage_id,
                &clamp(outcome.prompt_tokens),
                &clamp(outcome.completion_tokens),
                &charged.atomic(),
                &outcome.status,
                &outcome.usage_source,
                &outcome.http_status.map(i64::from),
                &clamp(outcome.duration_ms),
                &clamp(outcome.overhead_us),
                &clamp(outcome.overrun_tokens),
                &uncharged,
            ],
        )
        .await?;
    if claimed == 0 {
        return Ok(Settled {
            charged: Usdc::ZERO,
            balance: balance_of(c, account).await?,
        });
    }
    let balance = if charged < reserved {
        append_ledger(
            c,
            account,
            "refund",
            Usdc(reserved.atomic() - charged.atomic()),
            None,
            Some(key_id),
            Some(&format!("settle request #{usage_id}")),
            now,
        )
        .await?
    } else {
        balance_of(c, account).await?
    };
    Ok(Settled { charged, balance })
}

/// Refunds every reservation still `in_flight`, each in its own short transaction that claims the row with a
/// guarded update first and then refunds it; returns how many it refunded.
///
/// One transaction per row is what keeps replicas from deadlocking: a settlement locks its usage row, then the
/// account; one long recovery holding the account while it claims the next row would wait for a settlement that
/// waits for it (PostgreSQL reports `deadlock detected`; the race test found exactly that).
pub async fn recover_in_flight(
    client: &mut tokio_postgres::Client,
    now: i64,
) -> Result<usize, MoneyError> {
    recover_where(client, now, None, "interrupted by a restart").await
}

/// The recovery loop of [`recover_in_flight`] and `lease::recover_expired`: every `in_flight` row that also meets
/// `condition` (SQL over `usage` whose parameter `$1` is `now`; checked both when listing and in the claiming
/// update, so a row that stops meeting it meanwhile is left alone) is claimed and refunded, one transaction each.
pub(super) async fn recover_where(
    client: &mut tokio_postgres::Client,
    now: i64,
    condition: Option<&str>,
    why: &str,
) -> Result<usize, MoneyError> {
    // `$1` is `now` in both statements (the condition's parameter), `$2` the claimed row's id.
    let extra = condition.map_or(String::new(), |c| format!(" AND {c}"));
    let rows = client
        .query(
            &format!(
                "SELECT id, account, key_id, reserved_atomic FROM usage \
                 WHERE status = 'in_flight' AND $1::BIGINT IS NOT NULL{extra} ORDER BY id"
            ),
            &[&now],
        )
        .await?;
    let claim = format!(
        "UPDATE usage SET status = 'interrupted', usage_source = 'none' \
         WHERE id = $2 AND status = 'in_flight' AND $1::BIGINT IS NOT NULL{extra}"
    );
    let mut recovered = 0;
    for row in rows {
        let (id, account, key_id, reserved): (i64, String, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let tx = client.transaction().await?;
        if tx.execute(&claim, &[&now, &id]).await? == 0 {
            continue;
        }
        if reserved > 0 {
            append_ledger(
                &tx,
                &account,
                "refund",
                Usdc(reserved),
                None,
                Some(key_id),
                Some(&format!("request #{id} {why}: reservation returned")),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        recovered += 1;
    }
    Ok(recovered)
}

async fn balance_of(c: &impl GenericClient, account: &str) -> Result<Usdc, MoneyError> {
    let row = c
        .query_opt(
            "SELECT balance_atomic FROM accounts WHERE address = $1",
            &[&account],
        )
        .await?;
    Ok(Usdc(row.map_or(0, |r| r.get(0))))
}
