//! The money rules on PostgreSQL, each one guarded statement (the same rules as the SQLite store's
//! `store::billing`): a balance that changes only with `… WHERE balance_atomic + delta >= 0 RETURNING`, one live
//! credit key per account by a unique index, seats as numbered slots taken by a guarded upsert. Under PostgreSQL's
//! default READ COMMITTED isolation a "read, then write" is not safe with several writers (two replicas both read
//! the same balance, both debit); these are, because the row lock and the re-checked `WHERE` of each statement decide.
//! The PostgreSQL store (issue 14, in progress) builds on these; `tests/it/postgres.rs` races them across
//! connections.

use tokio_postgres::GenericClient;

use crate::keys::NewKey;
use crate::usdc::Usdc;

/// A refused debit, or a database failure.
#[derive(Debug, thiserror::Error)]
pub enum MoneyError {
    #[error("insufficient balance: {balance} available, {needed} needed")]
    Insufficient { balance: Usdc, needed: Usdc },
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Ledger row kinds that may take a balance below zero (see `store::billing::append_ledger`).
fn guarded(kind: &str) -> bool {
    kind == "debit"
}

/// Appends a ledger row of `kind` and `amount` for `address`, changing the balance in one guarded statement;
/// returns the new balance. A `debit` that would end below zero changes nothing.
#[allow(clippy::too_many_arguments)]
pub async fn append_ledger(
    c: &impl GenericClient,
    address: &str,
    kind: &str,
    amount: Usdc,
    tx_hash: Option<&str>,
    key_id: Option<i64>,
    note: Option<&str>,
    now: i64,
) -> Result<Usdc, MoneyError> {
    // The last two conditions refuse a bigint overflow (PostgreSQL would raise an error).
    const CHANGE: &str = "UPDATE accounts SET balance_atomic = balance_atomic + $2 \
         WHERE address = $1 AND (NOT $3 OR balance_atomic + $2 >= 0) \
         AND ($2 <= 0 OR balance_atomic <= 9223372036854775807 - $2) \
         AND ($2 >= 0 OR balance_atomic >= -9223372036854775807 - 1 - $2) \
         RETURNING balance_atomic";
    let guard = guarded(kind);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&address, &amount.0, &guard];
    // The account exists on every per-request path: it is created (and the statement run again) only when the
    // guarded statement changed nothing, which also covers a concurrent first append creating it meanwhile.
    let mut row = c.query_opt(CHANGE, &params).await?;
    if row.is_none() {
        c.execute(
            "INSERT INTO accounts (address, created_at) VALUES ($1, $2) ON CONFLICT (address) DO NOTHING",
            &[&address, &now],
        )
        .await?;
        row = c.query_opt(CHANGE, &params).await?;
    }
    let Some(row) = row else {
        let balance: i64 = c
            .query_one(
                "SELECT balance_atomic FROM accounts WHERE address = $1",
                &[&address],
            )
            .await?
            .get(0);
        return Err(MoneyError::Insufficient {
            balance: Usdc(balance),
            needed: Usdc(amount.0.saturating_neg()),
        });
    };
    let after: i64 = row.get(0);
    c.execute(
        "INSERT INTO ledger (account, kind, amount_atomic, balance_after, tx_hash, key_id, note, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&address, &kind, &amount.0, &after, &tx_hash, &key_id, &note, &now],
    )
    .await?;
    Ok(Usdc(after))
}

/// Stores `key` as the account's credit key unless it has a live one; the new row id, or `None`.
pub async fn insert_credit_key_if_none(
    c: &impl GenericClient,
    key: &NewKey,
    account: &str,
    created_by: &str,
    now: i64,
) -> Result<Option<i64>, MoneyError> {
    let row = c
        .query_opt(
            "INSERT INTO api_keys (public_id, secret_hash, kind, account, subscription_id, created_at, created_by) \
             VALUES ($1, $2, 'credit', $3, NULL, $4, $5) \
             ON CONFLICT (account) WHERE kind = 'credit' AND revoked_at IS NULL DO NOTHING RETURNING id",
            &[&key.public_id, &key.secret_hash.as_slice(), &account, &now, &created_by],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Takes one seat of `pool`/`block` (capacity `seats`) for a subscription until `expires_at`; `false` when sold
/// out at `now`. Each slot is taken by one guarded upsert, so two transactions can never hold one slot.
pub async fn take_seat(
    c: &impl GenericClient,
    pool: &str,
    block: &str,
    seats: u32,
    subscription_id: i64,
    expires_at: i64,
    now: i64,
) -> Result<bool, MoneyError> {
    let held: Vec<i64> = c
        .query(
            "SELECT seat_no FROM seat_slots WHERE pool = $1 AND block = $2 AND expires_at > $3",
            &[&pool, &block, &now],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if held.len() >= seats as usize {
        return Ok(false);
    }
    for seat_no in (1..=i64::from(seats)).filter(|n| !held.contains(n)) {
        let taken = c
            .execute(
                "INSERT INTO seat_slots (pool, block, seat_no, subscription_id, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (pool, block, seat_no) DO UPDATE SET \
                 subscription_id = excluded.subscription_id, expires_at = excluded.expires_at \
                 WHERE seat_slots.expires_at <= $6",
                &[&pool, &block, &seat_no, &subscription_id, &expires_at, &now],
            )
            .await?;
        if taken == 1 {
            c.execute(
                "INSERT INTO seats (subscription_id, pool, block, expires_at) VALUES ($1, $2, $3, $4)",
                &[&subscription_id, &pool, &block, &expires_at],
            )
            .await?;
            return Ok(true);
        }
    }
    Ok(false)
}
