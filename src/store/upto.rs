//! SQL of keyless pay-per-token payments (x402 `upto`, table `upto_payments`). Each rule is one statement: the
//! authorization is single-use by a unique key, each status change is guarded by the status it leaves, and a
//! settlement's row, claim and ledger rows are written by the caller in one transaction.

use super::StoreError;
use super::sql::{Row, Sql};
use crate::params;

/// An authorization about to be served.
#[derive(Debug, Clone)]
pub struct NewUpto {
    pub payer: String,
    pub nonce: String,
    pub network: String,
    pub request_id: String,
    pub model: String,
    pub resource: String,
    pub max_atomic: i64,
    pub deadline: i64,
    pub input_price_atomic: i64,
    pub output_price_atomic: i64,
    /// The payer's PAYMENT-SIGNATURE, JSON.
    pub payment: String,
    /// Our offer, JSON.
    pub requirements: String,
}

/// A recorded upto payment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoRow {
    pub id: i64,
    pub payer: String,
    pub nonce: String,
    pub network: String,
    pub request_id: String,
    pub model: String,
    pub resource: String,
    pub max_atomic: i64,
    pub deadline: i64,
    pub input_price_atomic: i64,
    pub output_price_atomic: i64,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cost_atomic: Option<i64>,
    pub tx_hash: Option<String>,
    /// A settlement transaction sent without a receipt yet (its outcome unknown).
    pub pending_tx: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub payment: String,
    #[serde(skip)]
    pub requirements: String,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str = "id, payer, nonce, network, request_id, model, resource, max_atomic, deadline, \
                       input_price_atomic, output_price_atomic, prompt_tokens, completion_tokens, cost_atomic, \
                       tx_hash, status, attempts, last_error, payment, requirements, created_at, updated_at, \
                       pending_tx";

fn row(r: &Row) -> Result<UptoRow, StoreError> {
    Ok(UptoRow {
        id: r.get(0)?,
        payer: r.get(1)?,
        nonce: r.get(2)?,
        network: r.get(3)?,
        request_id: r.get(4)?,
        model: r.get(5)?,
        resource: r.get(6)?,
        max_atomic: r.get(7)?,
        deadline: r.get(8)?,
        input_price_atomic: r.get(9)?,
        output_price_atomic: r.get(10)?,
        prompt_tokens: r.get(11)?,
        completion_tokens: r.get(12)?,
        cost_atomic: r.get(13)?,
        tx_hash: r.get(14)?,
        status: r.get(15)?,
        attempts: r.get(16)?,
        last_error: r.get(17)?,
        payment: r.get(18)?,
        requirements: r.get(19)?,
        created_at: r.get(20)?,
        updated_at: r.get(21)?,
        pending_tx: r.get(22)?,
    })
}

/// Records an authorization as `serving`; `None` when (payer, nonce) is already recorded (a replay).
pub fn insert(c: &dyn Sql, u: &NewUpto, now: i64) -> Result<Option<i64>, StoreError> {
    c.query_opt(
        "INSERT INTO upto_payments (payer, nonce, network, request_id, model, resource, max_atomic, deadline, \
         input_price_atomic, output_price_atomic, status, payment, requirements, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'serving', ?11, ?12, ?13, ?13) \
         ON CONFLICT (payer, nonce) DO NOTHING RETURNING id",
        params![
            u.payer,
            u.nonce,
            u.network,
            u.request_id,
            u.model,
            u.resource,
            u.max_atomic,
            u.deadline,
            u.input_price_atomic,
            u.output_price_atomic,
            u.payment,
            u.requirements,
            now
        ],
        |r| r.get(0),
    )
}

/// The metered outcome of a `serving` payment: `settling` (cost > 0) or `zero`. `false` if it was not serving.
pub fn set_cost(
    c: &dyn Sql,
    id: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_atomic: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let status = if cost_atomic > 0 { "settling" } else { "zero" };
    let changed = c.execute(
        "UPDATE upto_payments SET prompt_tokens = ?2, completion_tokens = ?3, cost_atomic = ?4, status = ?5, \
         updated_at = ?6 WHERE id = ?1 AND status = 'serving'",
        params![id, prompt_tokens, completion_tokens, cost_atomic, status, now],
    )?;
    Ok(changed == 1)
}

/// A payment settled in `tx_hash` (from `settling` or `unsettled`; from `serving` too, should its metered cost have
/// failed to be written: the money moved, and the row must say so). `false` if it was settled or zero already.
pub fn mark_settled(c: &dyn Sql, id: i64, tx_hash: &str, now: i64) -> Result<bool, StoreError> {
    let changed = c.execute(
        "UPDATE upto_payments SET tx_hash = ?2, status = 'settled', attempts = attempts + 1, last_error = NULL, \
         pending_tx = NULL, updated_at = ?3 WHERE id = ?1 AND status IN ('serving', 'settling', 'unsettled')",
        params![id, tx_hash, now],
    )?;
    Ok(changed == 1)
}

/// A settlement attempt failed: the payment stays `settling` (to retry) or becomes `unsettled` (`give_up`).
pub fn record_failure(
    c: &dyn Sql,
    id: i64,
    error: &str,
    give_up: bool,
    now: i64,
) -> Result<bool, StoreError> {
    let sql = if give_up {
        "UPDATE upto_payments SET attempts = attempts + 1, last_error = ?2, status = 'unsettled', updated_at = ?3 \
         WHERE id = ?1 AND status IN ('settling', 'unsettled')"
    } else {
        "UPDATE upto_payments SET attempts = attempts + 1, last_error = ?2, updated_at = ?3 \
         WHERE id = ?1 AND status IN ('settling', 'unsettled')"
    };
    let changed = c.execute(sql, params![id, error, now])?;
    Ok(changed == 1)
}

/// Remembers (or forgets, with `None`) a settlement transaction whose outcome is not known yet.
pub fn set_pending_tx(
    c: &dyn Sql,
    id: i64,
    tx: Option<&str>,
    now: i64,
) -> Result<bool, StoreError> {
    let changed = c.execute(
        "UPDATE upto_payments SET pending_tx = ?2, updated_at = ?3 WHERE id = ?1 AND status IN ('settling', 'unsettled')",
        params![id, tx, now],
    )?;
    Ok(changed == 1)
}

/// The payment of (payer, nonce).
pub fn by_payer_nonce(
    c: &dyn Sql,
    payer: &str,
    nonce: &str,
) -> Result<Option<UptoRow>, StoreError> {
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM upto_payments WHERE payer = ?1 AND nonce = ?2"),
        params![payer, nonce],
        row,
    )
}

/// The payer's oldest unsettled payment, if any (the payer is refused while there is one).
pub fn unsettled_of(c: &dyn Sql, payer: &str) -> Result<Option<UptoRow>, StoreError> {
    c.query_opt(
        &format!(
            "SELECT {COLUMNS} FROM upto_payments WHERE payer = ?1 AND status = 'unsettled' ORDER BY id LIMIT 1"
        ),
        params![payer],
        row,
    )
}

/// Payments still to settle whose authorization has not expired (`deadline` > `now`), oldest first.
pub fn retryable(c: &dyn Sql, now: i64) -> Result<Vec<UptoRow>, StoreError> {
    c.query_map(
        &format!(
            "SELECT {COLUMNS} FROM upto_payments WHERE status IN ('settling', 'unsettled') AND deadline > ?1 \
             ORDER BY id"
        ),
        params![now],
        row,
    )
}

/// Every upto payment, oldest first.
pub fn list(c: &dyn Sql) -> Result<Vec<UptoRow>, StoreError> {
    c.query_map(
        &format!("SELECT {COLUMNS} FROM upto_payments ORDER BY id"),
        params![],
        row,
    )
}

/// The CAIP-2 network of upto payment `id`.
pub fn network_of(c: &dyn Sql, id: i64) -> Result<String, StoreError> {
    c.query_value(
        "SELECT network FROM upto_payments WHERE id = ?1",
        params![id],
    )
}
