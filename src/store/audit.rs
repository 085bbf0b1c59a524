//! The auditor's reads: the paged listings behind `/api/audit/*` and `audit export`, revenue per day, everything
//! about one payment, and the rows `audit verify` reconciles. Nothing here writes.
//!
//! This module owns the SQL of those reads and returns plain row structs; what the rows mean (confirmations, key
//! states, JSON and CSV shapes, what counts as a discrepancy) is decided in `crate::audit`, which never sees a
//! connection. Every listing is a keyset page on real columns, the same SQL on both engines. Payments, the ledger
//! and keys page by their `id`: a page is the rows after the last id of the previous one. Claims have no numeric
//! key (their key is the tx hash), so they page by claim time, then tx hash: a page ends at a whole second of claim
//! time and the next one starts after it (see [`claims_page`]). Either way a page never shifts when new rows
//! arrive.
//!
//! An optional filter is written `(col = ?N OR ?N IS NULL)`, the column first: PostgreSQL types a parameter at its
//! first use, and `?N IS NULL` alone gives it none ("could not determine data type of parameter").

use std::collections::BTreeMap;

use super::reversals::{self, ReversalEvent};
use super::sql::{Engine, Row, Sql};
use super::transfers::TransferStatus;
use super::{Store, StoreError};
use crate::params;

/// Filters of the payments listing (all optional; combined with AND).
#[derive(Debug, Clone, Default)]
pub struct PaymentFilter {
    /// CAIP-2 id of one network.
    pub network: Option<String>,
    pub status: Option<TransferStatus>,
    /// Lower-case 0x-hex payer.
    pub payer: Option<String>,
    pub from_block: Option<u64>,
    pub to_block: Option<u64>,
    /// Unix seconds, inclusive; compared with the block time (or first-seen time when unknown).
    pub from_time: Option<i64>,
    /// Unix seconds, exclusive.
    pub to_time: Option<i64>,
    pub min_atomic: Option<i64>,
}

/// Filters of the claims listing.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    pub account: Option<String>,
    /// `subscription` or `topup`.
    pub kind: Option<String>,
    pub from_time: Option<i64>,
    pub to_time: Option<i64>,
}

/// Filters of the ledger listing: one account or all, a time range on `created_at`.
#[derive(Debug, Clone, Default)]
pub struct LedgerFilter {
    pub account: Option<String>,
    pub from_time: Option<i64>,
    pub to_time: Option<i64>,
}

/// One transfer to payTo, as the payments listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRow {
    pub id: i64,
    /// CAIP-2 id of the network it was mined on.
    pub network: String,
    /// The token paid in, and the amount in its own atomic units (`value_atomic` is the USD value credited).
    pub token: String,
    pub token_value: Option<String>,
    pub tx_hash: String,
    pub log_index: i64,
    pub block_number: i64,
    pub block_hash: String,
    pub block_time: Option<i64>,
    pub from: String,
    pub to: String,
    pub value_atomic: i64,
    /// `seen`, `confirmed` or `orphaned`.
    pub status: String,
    pub first_seen_at: Option<i64>,
    pub confirmed_at: Option<i64>,
    pub orphaned_at: Option<i64>,
    /// Whether a claim names this transfer's transaction.
    pub claimed: bool,
}

/// A page of payments and the indexed head it is read against (for confirmations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentsPage {
    /// Each network's checkpoint block (a network appears once its indexer has indexed a block).
    pub indexed_heads: BTreeMap<String, i64>,
    pub rows: Vec<PaymentRow>,
}

impl PaymentsPage {
    /// The checkpoint block of `network`, if it has indexed one.
    pub fn head_of(&self, network: &str) -> Option<i64> {
        self.indexed_heads.get(network).copied()
    }
}

/// One claim with what it bought. Its key is the tx hash (claims have no numeric id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRow {
    /// CAIP-2 id of the network the claimed payment was made on.
    pub network: String,
    pub tx_hash: String,
    pub account: String,
    /// `subscription` or `topup`.
    pub kind: String,
    pub paid_atomic: i64,
    pub price_atomic: i64,
    pub surplus_atomic: i64,
    /// The subscription's pool, for a subscription claim.
    pub pool: Option<String>,
    /// The subscription's blocks as stored (a JSON array).
    pub blocks_json: Option<String>,
    pub expires_at: Option<i64>,
    pub key_public_id: Option<String>,
    /// Unix seconds (the listing's order and cursor).
    pub claimed_at: i64,
}

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub id: i64,
    pub account: String,
    pub kind: String,
    pub amount_atomic: i64,
    pub balance_after_atomic: i64,
    pub tx_hash: Option<String>,
    pub key_public_id: Option<String>,
    pub note: Option<String>,
    pub created_at: Option<i64>,
}

/// One API key, without its secret or hash (never read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: i64,
    pub public_id: String,
    pub kind: String,
    pub account: String,
    pub pool: Option<String>,
    /// The subscription's blocks as stored (a JSON array).
    pub blocks_json: Option<String>,
    pub expires_at: Option<i64>,
    pub created_at: Option<i64>,
    pub created_by: String,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    /// Set while the payment behind the key is reversed by a reorg.
    pub suspended_at: Option<i64>,
}

/// Money of one UTC day: confirmed payments received (by block time) and claims (by claim time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevenueDay {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// What each network received that day: (received, payments) by CAIP-2 id.
    pub by_network: BTreeMap<String, (i64, i64)>,
    pub received_atomic: i64,
    pub payments: i64,
    pub claims: i64,
    pub subscriptions_atomic: i64,
    pub topups_atomic: i64,
    pub surplus_atomic: i64,
}

/// One status change of a transfer after it was first indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub status: String,
    pub at: i64,
    pub head_block: i64,
    pub reason: String,
}

/// One transfer of a payment, with its status history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentTransfer {
    pub id: i64,
    /// CAIP-2 id of the network it was mined on.
    pub network: String,
    pub log_index: i64,
    pub block_number: i64,
    pub block_hash: String,
    pub block_time: Option<i64>,
    pub from: String,
    pub to: String,
    pub value_atomic: i64,
    pub status: String,
    pub first_seen_at: i64,
    pub confirmed_at: Option<i64>,
    pub orphaned_at: Option<i64>,
    /// `transfer_status_history`, oldest first.
    pub history: Vec<StatusChange>,
}

/// Everything the database knows about one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentDetail {
    /// Each network's checkpoint block.
    pub indexed_heads: BTreeMap<String, i64>,
    pub transfers: Vec<PaymentTransfer>,
    pub claim: Option<ClaimRow>,
    pub ledger: Vec<LedgerRow>,
    /// Sum of the transaction's confirmed transfers.
    pub confirmed_value_atomic: i64,
    /// Reversals and restores of the purchase it paid for, oldest first.
    pub reversals: Vec<ReversalEvent>,
}

const PAYMENT_SELECT: &str = "SELECT t.id, t.tx_hash, t.log_index, t.block_number, t.block_hash, t.block_time, \
     t.from_address, t.to_address, t.value_atomic, t.status, t.first_seen_at, t.confirmed_at, t.orphaned_at, \
     EXISTS (SELECT 1 FROM claims c WHERE c.tx_hash = t.tx_hash AND c.network = t.network), t.network, \
     t.token, t.token_value FROM transfers t";

fn payment_row(r: &Row) -> Result<PaymentRow, StoreError> {
    Ok(PaymentRow {
        id: r.get(0)?,
        tx_hash: r.get(1)?,
        log_index: r.get(2)?,
        block_number: r.get(3)?,
        block_hash: r.get(4)?,
        block_time: r.get(5)?,
        from: r.get(6)?,
        to: r.get(7)?,
        value_atomic: r.get(8)?,
        status: r.get(9)?,
        first_seen_at: r.get(10)?,
        confirmed_at: r.get(11)?,
        orphaned_at: r.get(12)?,
        claimed: r.get(13)?,
        network: r.get(14)?,
        token: r.get(15)?,
        token_value: r.get(16)?,
    })
}

/// The payments listing's rows with id > `after`, in id order, at most `limit`.
pub fn payments_page(
    c: &dyn Sql,
    f: &PaymentFilter,
    after: i64,
    limit: u32,
) -> Result<PaymentsPage, StoreError> {
    let indexed_heads = indexed_heads(c)?;
    let rows = c.query_map(
        &format!(
            "{PAYMENT_SELECT} WHERE t.id > ?1 \
             AND (t.status = ?2 OR ?2 IS NULL) AND (t.from_address = ?3 OR ?3 IS NULL) \
             AND (t.block_number >= ?4 OR ?4 IS NULL) AND (t.block_number <= ?5 OR ?5 IS NULL) \
             AND (coalesce(t.block_time, t.first_seen_at) >= ?6 OR ?6 IS NULL) \
             AND (coalesce(t.block_time, t.first_seen_at) < ?7 OR ?7 IS NULL) \
             AND (t.value_atomic >= ?8 OR ?8 IS NULL) AND (t.network = ?10 OR ?10 IS NULL) \
             ORDER BY t.id LIMIT ?9"
        ),
        params![
            after,
            f.status.map(|s| s.as_str()),
            f.payer,
            f.from_block,
            f.to_block,
            f.from_time,
            f.to_time,
            f.min_atomic,
            limit,
            f.network
        ],
        payment_row,
    )?;
    Ok(PaymentsPage {
        indexed_heads,
        rows,
    })
}

/// The last `n` payments by id, oldest first: the rows after `max(id) - n`. Ids are not dense once a reorg
/// deleted rows (or, on PostgreSQL, a rolled-back insert used one up), so this may return fewer than `n` (the status
/// page shows what it gets).
pub fn latest_payments(c: &dyn Sql, n: u32) -> Result<PaymentsPage, StoreError> {
    let max_id: i64 = c.query_value("SELECT coalesce(max(id), 0) FROM transfers", params![])?;
    payments_page(
        c,
        &PaymentFilter::default(),
        (max_id - i64::from(n)).max(0),
        n,
    )
}

const CLAIM_SELECT: &str = "SELECT c.tx_hash, c.account, c.kind, c.paid_atomic, c.price_atomic, c.surplus_atomic, \
     s.pool, s.blocks, s.expires_at, k.public_id, c.claimed_at, c.network FROM claims c \
     LEFT JOIN subscriptions s ON s.id = c.subscription_id LEFT JOIN api_keys k ON k.id = c.key_id";

/// The claims listing's filters, as parameters `?1` to `?4` (the keyset's come after them).
const CLAIM_FILTERS: &str = "(c.account = ?1 OR ?1 IS NULL) AND (c.kind = ?2 OR ?2 IS NULL) \
     AND (c.claimed_at >= ?3 OR ?3 IS NULL) AND (c.claimed_at < ?4 OR ?4 IS NULL)";

fn claim_row(r: &Row) -> Result<ClaimRow, StoreError> {
    Ok(ClaimRow {
        tx_hash: r.get(0)?,
        account: r.get(1)?,
        kind: r.get(2)?,
        paid_atomic: r.get(3)?,
        price_atomic: r.get(4)?,
        surplus_atomic: r.get(5)?,
        pool: r.get(6)?,
        blocks_json: r.get(7)?,
        expires_at: r.get(8)?,
        key_public_id: r.get(9)?,
        claimed_at: r.get(10)?,
        network: r.get(11)?,
    })
}

/// A page of the claims listing: the claims with `claimed_at` > `after` (all of them for `None`), in (claim time, tx
/// hash) order. A page ends at a whole second: it is the first `limit` rows plus the rest of the last row's second,
/// so it holds more than `limit` rows when claims of one second straddle the limit, and fewer than `limit` only at
/// the end. The next page is the claims after the last row's `claimed_at`.
///
/// Claims have no numeric id (the key is the tx hash, and PostgreSQL has no `rowid`); claim time is the order they
/// were made in, and a whole-second page keeps the cursor one number.
pub fn claims_page(
    c: &dyn Sql,
    f: &ClaimFilter,
    after: Option<i64>,
    limit: u32,
) -> Result<Vec<ClaimRow>, StoreError> {
    let mut rows = c.query_map(
        &format!(
            "{CLAIM_SELECT} WHERE {CLAIM_FILTERS} AND (c.claimed_at > ?5 OR ?5 IS NULL) \
             ORDER BY c.claimed_at, c.tx_hash LIMIT ?6"
        ),
        params![f.account, f.kind, f.from_time, f.to_time, after, limit],
        claim_row,
    )?;
    if rows.len() == limit as usize
        && let Some(last) = rows.last()
    {
        let (second, tx_hash) = (last.claimed_at, last.tx_hash.clone());
        let rest = c.query_map(
            &format!(
                "{CLAIM_SELECT} WHERE {CLAIM_FILTERS} AND c.claimed_at = ?5 AND c.tx_hash > ?6 \
                 ORDER BY c.tx_hash"
            ),
            params![f.account, f.kind, f.from_time, f.to_time, second, tx_hash],
            claim_row,
        )?;
        rows.extend(rest);
    }
    Ok(rows)
}

const LEDGER_SELECT: &str = "SELECT l.id, l.account, l.kind, l.amount_atomic, l.balance_after, l.tx_hash, \
     k.public_id, l.note, l.created_at FROM ledger l LEFT JOIN api_keys k ON k.id = l.key_id";

fn ledger_row(r: &Row) -> Result<LedgerRow, StoreError> {
    Ok(LedgerRow {
        id: r.get(0)?,
        account: r.get(1)?,
        kind: r.get(2)?,
        amount_atomic: r.get(3)?,
        balance_after_atomic: r.get(4)?,
        tx_hash: r.get(5)?,
        key_public_id: r.get(6)?,
        note: r.get(7)?,
        created_at: r.get(8)?,
    })
}

/// The ledger listing's rows with id > `after`, in id order, at most `limit`.
pub fn ledger_page(
    c: &dyn Sql,
    f: &LedgerFilter,
    after: i64,
    limit: u32,
) -> Result<Vec<LedgerRow>, StoreError> {
    c.query_map(
        &format!(
            "{LEDGER_SELECT} WHERE l.id > ?1 AND (l.account = ?2 OR ?2 IS NULL) \
             AND (l.created_at >= ?3 OR ?3 IS NULL) AND (l.created_at < ?4 OR ?4 IS NULL) ORDER BY l.id LIMIT ?5"
        ),
        params![after, f.account, f.from_time, f.to_time, limit],
        ledger_row,
    )
}

/// The keys listing's rows with id > `after`, in id order, at most `limit`.
pub fn keys_page(
    c: &dyn Sql,
    account: Option<&str>,
    after: i64,
    limit: u32,
) -> Result<Vec<KeyRow>, StoreError> {
    c.query_map(
        "SELECT k.id, k.public_id, k.kind, k.account, s.pool, s.blocks, s.expires_at, k.created_at, \
         k.created_by, k.revoked_at, k.revoked_reason, k.suspended_at FROM api_keys k \
         LEFT JOIN subscriptions s ON s.id = k.subscription_id \
         WHERE k.id > ?1 AND (k.account = ?2 OR ?2 IS NULL) ORDER BY k.id LIMIT ?3",
        params![after, account, limit],
        |r| {
            Ok(KeyRow {
                id: r.get(0)?,
                public_id: r.get(1)?,
                kind: r.get(2)?,
                account: r.get(3)?,
                pool: r.get(4)?,
                blocks_json: r.get(5)?,
                expires_at: r.get(6)?,
                created_at: r.get(7)?,
                created_by: r.get(8)?,
                revoked_at: r.get(9)?,
                revoked_reason: r.get(10)?,
                suspended_at: r.get(11)?,
            })
        },
    )
}

/// The last `n` keys by id, oldest first (the rows after `max(id) - n`, like [`latest_payments`]).
pub fn latest_keys(c: &dyn Sql, n: u32) -> Result<Vec<KeyRow>, StoreError> {
    let max_id: i64 = c.query_value("SELECT coalesce(max(id), 0) FROM api_keys", params![])?;
    keys_page(c, None, (max_id - i64::from(n)).max(0), n)
}

/// The UTC day (`YYYY-MM-DD`) of a unix-seconds expression, in the engine's dialect.
pub(crate) fn utc_day(engine: Engine, seconds: &str) -> String {
    match engine {
        Engine::Sqlite => format!("date({seconds}, 'unixepoch')"),
        Engine::Postgres => {
            format!("to_char(to_timestamp({seconds}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
        }
    }
}

/// Revenue per UTC day in `[from_time, to_time)`, oldest day first.
pub fn revenue(
    c: &dyn Sql,
    from_time: Option<i64>,
    to_time: Option<i64>,
) -> Result<Vec<RevenueDay>, StoreError> {
    let mut days: BTreeMap<String, RevenueDay> = BTreeMap::new();
    let received = c.query_map(
        &format!(
            "SELECT {} AS d, network, sum(value_atomic), count(*) FROM transfers WHERE status = 'confirmed' \
             AND (coalesce(block_time, first_seen_at) >= ?1 OR ?1 IS NULL) \
             AND (coalesce(block_time, first_seen_at) < ?2 OR ?2 IS NULL) GROUP BY d, network",
            utc_day(c.engine(), "coalesce(block_time, first_seen_at)")
        ),
        params![from_time, to_time],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
            ))
        },
    )?;
    for (d, network, sum, n) in received {
        let day = days.entry(d).or_default();
        day.received_atomic += sum;
        day.payments += n;
        let on = day.by_network.entry(network).or_default();
        on.0 += sum;
        on.1 += n;
    }
    let claimed = c.query_map(
        &format!(
            "SELECT {} AS d, kind, sum(price_atomic), sum(surplus_atomic), count(*) FROM claims \
             WHERE (claimed_at >= ?1 OR ?1 IS NULL) AND (claimed_at < ?2 OR ?2 IS NULL) GROUP BY d, kind",
            utc_day(c.engine(), "claimed_at")
        ),
        params![from_time, to_time],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
                r.get::<i64>(4)?,
            ))
        },
    )?;
    for (d, kind, price, surplus, n) in claimed {
        let day = days.entry(d).or_default();
        day.claims += n;
        day.surplus_atomic += surplus;
        if kind == "subscription" {
            day.subscriptions_atomic += price;
        } else {
            day.topups_atomic += price;
        }
    }
    Ok(days
        .into_iter()
        .map(|(d, mut v)| {
            v.day = d;
            v
        })
        .collect())
}

/// Each network's checkpoint block, by CAIP-2 id.
fn indexed_heads(c: &dyn Sql) -> Result<BTreeMap<String, i64>, StoreError> {
    Ok(c.query_map(
        "SELECT network, block_number FROM network_checkpoints",
        params![],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
    )?
    .into_iter()
    .collect())
}

/// Everything about one transaction; `None` when it has neither a transfer to payTo nor a claim.
pub fn payment_detail(c: &dyn Sql, tx_hash: &str) -> Result<Option<PaymentDetail>, StoreError> {
    let indexed_heads = indexed_heads(c)?;
    let mut transfers: Vec<PaymentTransfer> = c.query_map(
        "SELECT id, log_index, block_number, block_hash, block_time, from_address, to_address, value_atomic, status, \
         first_seen_at, confirmed_at, orphaned_at, network FROM transfers WHERE tx_hash = ?1 ORDER BY id",
        params![tx_hash],
        |r| {
            Ok(PaymentTransfer {
                id: r.get(0)?,
                log_index: r.get(1)?,
                block_number: r.get(2)?,
                block_hash: r.get(3)?,
                block_time: r.get(4)?,
                from: r.get(5)?,
                to: r.get(6)?,
                value_atomic: r.get(7)?,
                status: r.get(8)?,
                first_seen_at: r.get(9)?,
                confirmed_at: r.get(10)?,
                orphaned_at: r.get(11)?,
                network: r.get(12)?,
                history: Vec::new(),
            })
        },
    )?;
    for t in &mut transfers {
        t.history = c.query_map(
            "SELECT status, at, head_block, reason FROM transfer_status_history WHERE transfer_id = ?1 ORDER BY id",
            params![t.id],
            |r| {
                Ok(StatusChange {
                    status: r.get(0)?,
                    at: r.get(1)?,
                    head_block: r.get(2)?,
                    reason: r.get(3)?,
                })
            },
        )?;
    }
    // The claim and the ledger rows are read with the listings' own SELECTs and row readers, so the detail shows
    // them exactly as the listings do.
    let claim = c.query_opt(
        &format!("{CLAIM_SELECT} WHERE c.tx_hash = ?1"),
        params![tx_hash],
        claim_row,
    )?;
    let ledger = c.query_map(
        &format!("{LEDGER_SELECT} WHERE l.tx_hash = ?1 ORDER BY l.id"),
        params![tx_hash],
        ledger_row,
    )?;
    if transfers.is_empty() && claim.is_none() {
        return Ok(None);
    }
    // What backs the claim: the confirmed transfers on the claim's network (any network before it is claimed).
    let confirmed_value_atomic: i64 = c.query_value(
        "SELECT coalesce(sum(value_atomic), 0) FROM transfers WHERE tx_hash = ?1 AND status = 'confirmed' \
         AND (network = ?2 OR ?2 IS NULL)",
        params![tx_hash, claim.as_ref().map(|cl| cl.network.clone())],
    )?;
    let reversals = match reversals::origin_of(c, tx_hash)? {
        Some(origin) => reversals::of_purchase(c, &origin)?,
        None => Vec::new(),
    };
    Ok(Some(PaymentDetail {
        indexed_heads,
        transfers,
        claim,
        ledger,
        confirmed_value_atomic,
        reversals,
    }))
}

// ---- `audit verify`: the rows its database checks reconcile ----

/// What confirmed transfers from one payer add up to in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayerTotal {
    pub payer: String,
    pub value_atomic: i64,
}

/// Ledger rows of one kind that name a transaction (compared case-insensitively).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credited {
    pub rows: i64,
    pub sum_atomic: i64,
}

/// One claim and everything its checks compare it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimFacts {
    pub tx_hash: String,
    pub account: String,
    pub kind: String,
    pub paid_atomic: i64,
    pub price_atomic: i64,
    pub surplus_atomic: i64,
    pub subscription_id: Option<i64>,
    /// The original claim's tx hash when this row is a copy (an x402 re-submission).
    pub origin_tx: Option<String>,
    /// Whether the transaction has a confirmed transfer (tx hash compared case-insensitively).
    pub confirmed: bool,
    /// Whether the purchase (the original claim) is reversed now.
    pub purchase_reversed: bool,
    /// Confirmed transfers of the transaction per payer.
    pub payers: Vec<PayerTotal>,
    /// Ledger rows of kind `reversal`, `reinstatement`, `topup` and `surplus` that name the transaction.
    pub reversal: Credited,
    pub reinstatement: Credited,
    pub topup: Credited,
    pub surplus: Credited,
    /// What `claim_reversals` records for this claim: taken back (`reversed`) and given back (`restored`).
    pub recorded_reversed_atomic: i64,
    pub recorded_restored_atomic: i64,
    /// The tx hash of the claim's subscription, when it names one that exists.
    pub subscription_tx: Option<String>,
}

/// One ledger row's amount and stated running balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerStep {
    pub id: i64,
    pub account: String,
    pub amount_atomic: i64,
    pub balance_after_atomic: i64,
}

/// An account's ledger total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountTotal {
    pub account: String,
    pub sum_atomic: i64,
    /// `accounts.balance_atomic`: the balance the guarded debit reads (must equal the sum).
    pub balance_column_atomic: i64,
    /// Whether a purchase of the account is reversed now (only such an account may be below zero).
    pub has_open_reversal: bool,
}

/// A seat and the subscription it names (the subscription's fields are `None` when it does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatFacts {
    pub subscription_id: i64,
    pub pool: String,
    pub block: String,
    pub expires_at: i64,
    pub subscription_exists: bool,
    pub subscription_pool: Option<String>,
    /// As stored (a JSON array).
    pub subscription_blocks_json: Option<String>,
    pub subscription_expires_at: Option<i64>,
}

/// A subscription, the seats it holds and whether a claim paid for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFacts {
    pub id: i64,
    /// As stored (a JSON array).
    pub blocks_json: String,
    pub seats_held: i64,
    pub claimed: bool,
}

/// The rows `audit verify` checks the database against itself with (claims, ledger, seats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Books {
    /// In claim order: claim time, then tx hash.
    pub claims: Vec<ClaimFacts>,
    /// Transactions credited by `topup` / `surplus` ledger rows that no claim names.
    pub credits_without_claim: Vec<String>,
    /// Every ledger row, by account then id.
    pub ledger: Vec<LedgerStep>,
    pub accounts: Vec<AccountTotal>,
    /// By subscription, then block.
    pub seats: Vec<SeatFacts>,
    /// By id.
    pub subscriptions: Vec<SubscriptionFacts>,
}

/// Reads [`Books`].
pub fn books(c: &dyn Sql) -> Result<Books, StoreError> {
    let mut claims: Vec<ClaimFacts> = c.query_map(
        "SELECT tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, subscription_id, origin_tx \
         FROM claims ORDER BY claimed_at, tx_hash",
        params![],
        |r| {
            Ok(ClaimFacts {
                tx_hash: r.get(0)?,
                account: r.get(1)?,
                kind: r.get(2)?,
                paid_atomic: r.get(3)?,
                price_atomic: r.get(4)?,
                surplus_atomic: r.get(5)?,
                subscription_id: r.get(6)?,
                origin_tx: r.get(7)?,
                confirmed: false,
                purchase_reversed: false,
                payers: Vec::new(),
                reversal: Credited::default(),
                reinstatement: Credited::default(),
                topup: Credited::default(),
                surplus: Credited::default(),
                recorded_reversed_atomic: 0,
                recorded_restored_atomic: 0,
                subscription_tx: None,
            })
        },
    )?;
    for claim in &mut claims {
        let tx = claim.tx_hash.as_str();
        claim.confirmed = c.query_value(
            "SELECT EXISTS (SELECT 1 FROM transfers WHERE lower(tx_hash) = lower(?1) AND status = 'confirmed' \
             AND network = (SELECT network FROM claims WHERE tx_hash = ?1))",
            params![tx],
        )?;
        let purchase = claim.origin_tx.as_deref().unwrap_or(tx);
        claim.purchase_reversed = reversals::is_reversed(c, purchase)?;
        claim.payers = c.query_map(
            "SELECT from_address, sum(value_atomic) FROM transfers WHERE lower(tx_hash) = lower(?1) \
             AND status = 'confirmed' AND network = (SELECT network FROM claims WHERE tx_hash = ?1) \
             GROUP BY from_address",
            params![tx],
            |r| {
                Ok(PayerTotal {
                    payer: r.get(0)?,
                    value_atomic: r.get(1)?,
                })
            },
        )?;
        let credited = |kind: &str| -> Result<Credited, StoreError> {
            c.query_one(
                "SELECT count(*), coalesce(sum(amount_atomic), 0) FROM ledger WHERE lower(tx_hash) = lower(?1) \
                 AND kind = ?2",
                params![tx, kind],
                |r| {
                    Ok(Credited {
                        rows: r.get(0)?,
                        sum_atomic: r.get(1)?,
                    })
                },
            )
        };
        claim.reversal = credited("reversal")?;
        claim.reinstatement = credited("reinstatement")?;
        claim.topup = credited("topup")?;
        claim.surplus = credited("surplus")?;
        (claim.recorded_reversed_atomic, claim.recorded_restored_atomic) = c.query_one(
            "SELECT coalesce(sum(CASE WHEN kind = 'reversed' THEN amount_atomic END), 0), \
             coalesce(sum(CASE WHEN kind = 'restored' THEN amount_atomic END), 0) FROM claim_reversals \
             WHERE claim_tx = ?1",
            params![tx],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        // A subscription that cannot be read counts as missing: the check reports the claim, not a failed run.
        claim.subscription_tx = match claim.subscription_id {
            Some(id) => c
                .query_opt(
                    "SELECT tx_hash FROM subscriptions WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .ok()
                .flatten(),
            None => None,
        };
    }

    let credits_without_claim = c.query_map(
        "SELECT DISTINCT l.tx_hash FROM ledger l WHERE l.tx_hash IS NOT NULL AND l.kind IN ('topup', 'surplus') \
         AND NOT EXISTS (SELECT 1 FROM claims c WHERE lower(c.tx_hash) = lower(l.tx_hash)) ORDER BY l.tx_hash",
        params![],
        |r| r.get(0),
    )?;

    let ledger = c.query_map(
        "SELECT id, account, amount_atomic, balance_after FROM ledger ORDER BY account, id",
        params![],
        |r| {
            Ok(LedgerStep {
                id: r.get(0)?,
                account: r.get(1)?,
                amount_atomic: r.get(2)?,
                balance_after_atomic: r.get(3)?,
            })
        },
    )?;

    // Every account with ledger rows or a balance: the balance column must equal the ledger's sum.
    let sums: Vec<(String, i64, i64)> = c.query_map(
        "SELECT a.address, coalesce((SELECT sum(l.amount_atomic) FROM ledger l WHERE l.account = a.address), 0), \
         a.balance_atomic FROM accounts a \
         WHERE a.balance_atomic != 0 OR EXISTS (SELECT 1 FROM ledger l WHERE l.account = a.address) \
         ORDER BY a.address",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let mut accounts = Vec::with_capacity(sums.len());
    for (account, sum_atomic, balance_column_atomic) in sums {
        let has_open_reversal = has_open_reversal(c, &account)?;
        accounts.push(AccountTotal {
            account,
            sum_atomic,
            balance_column_atomic,
            has_open_reversal,
        });
    }

    let seats = c.query_map(
        "SELECT st.subscription_id, st.pool, st.block, st.expires_at, s.id, s.pool, s.blocks, s.expires_at \
         FROM seats st LEFT JOIN subscriptions s ON s.id = st.subscription_id ORDER BY st.subscription_id, st.block",
        params![],
        |r| {
            Ok(SeatFacts {
                subscription_id: r.get(0)?,
                pool: r.get(1)?,
                block: r.get(2)?,
                expires_at: r.get(3)?,
                subscription_exists: r.get::<Option<i64>>(4)?.is_some(),
                subscription_pool: r.get(5)?,
                subscription_blocks_json: r.get(6)?,
                subscription_expires_at: r.get(7)?,
            })
        },
    )?;

    let subscriptions = c.query_map(
        "SELECT s.id, s.blocks, (SELECT count(*) FROM seats st WHERE st.subscription_id = s.id), \
         EXISTS (SELECT 1 FROM claims c WHERE lower(c.tx_hash) = lower(s.tx_hash)) FROM subscriptions s ORDER BY s.id",
        params![],
        |r| {
            Ok(SubscriptionFacts {
                id: r.get(0)?,
                blocks_json: r.get(1)?,
                seats_held: r.get(2)?,
                claimed: r.get(3)?,
            })
        },
    )?;

    Ok(Books {
        claims,
        credits_without_claim,
        ledger,
        accounts,
        seats,
        subscriptions,
    })
}

/// Whether a purchase of `account` is reversed now (its last `claim_reversals` event is `reversed`).
fn has_open_reversal(c: &dyn Sql, account: &str) -> Result<bool, StoreError> {
    Ok(c
        .query_opt(
            "SELECT 1 FROM claim_reversals r WHERE r.account = ?1 AND r.kind = 'reversed' \
             AND r.seq = (SELECT max(seq) FROM claim_reversals x WHERE x.claim_tx = r.claim_tx) LIMIT 1",
            params![account],
            |_| Ok(()),
        )?
        .is_some())
}

/// One settled (not `in_flight`) metered request, with what it was charged and at which prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledUsage {
    pub request_id: String,
    /// `credit` or `subscription` (pool key).
    pub key_kind: String,
    pub model: String,
    pub status: String,
    /// Where the token counts came from (`reservation` when the upstream reported none).
    pub usage_source: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reserved_atomic: i64,
    pub cost_atomic: i64,
    /// The prices it was reserved at; `None` for rows older than the metering migration.
    pub input_price_atomic: Option<i64>,
    pub output_price_atomic: Option<i64>,
    pub overrun_tokens: i64,
    pub uncharged_atomic: i64,
}

/// Calls `each` with every settled usage row in id order. A visitor rather than a `Vec`: the usage table is the
/// largest one, and `audit verify` needs each row only once (both engines stream the rows).
pub fn each_settled_usage(
    c: &dyn Sql,
    each: &mut dyn FnMut(SettledUsage),
) -> Result<(), StoreError> {
    c.each_row(
        "SELECT request_id, key_kind, model, status, usage_source, prompt_tokens, completion_tokens, reserved_atomic, \
         cost_atomic, input_price_atomic, output_price_atomic, overrun_tokens, uncharged_atomic FROM usage \
         WHERE status != 'in_flight' ORDER BY id",
        params![],
        &mut |r| {
            each(SettledUsage {
                request_id: r.get(0)?,
                key_kind: r.get(1)?,
                model: r.get(2)?,
                status: r.get(3)?,
                usage_source: r.get(4)?,
                prompt_tokens: r.get(5)?,
                completion_tokens: r.get(6)?,
                reserved_atomic: r.get(7)?,
                cost_atomic: r.get(8)?,
                input_price_atomic: r.get(9)?,
                output_price_atomic: r.get(10)?,
                overrun_tokens: r.get(11)?,
                uncharged_atomic: r.get(12)?,
            });
            Ok(())
        },
    )
}

impl Store {
    /// A page of the payments listing (see [`payments_page`]).
    pub async fn audit_payments(
        &self,
        filter: PaymentFilter,
        after: i64,
        limit: u32,
    ) -> Result<PaymentsPage, StoreError> {
        self.read(move |c| payments_page(c, &filter, after, limit))
            .await
    }

    /// A page of the claims listing (see [`claims_page`]).
    pub async fn audit_claims(
        &self,
        filter: ClaimFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        self.read(move |c| claims_page(c, &filter, after, limit))
            .await
    }

    /// A page of the ledger listing (see [`ledger_page`]).
    pub async fn audit_ledger(
        &self,
        filter: LedgerFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        self.read(move |c| ledger_page(c, &filter, after, limit))
            .await
    }

    /// A page of the keys listing (see [`keys_page`]).
    pub async fn audit_keys(
        &self,
        account: Option<String>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<KeyRow>, StoreError> {
        self.read(move |c| keys_page(c, account.as_deref(), after, limit))
            .await
    }

    /// Revenue per UTC day in `[from_time, to_time)` (see [`revenue`]).
    pub async fn audit_revenue(
        &self,
        from_time: Option<i64>,
        to_time: Option<i64>,
    ) -> Result<Vec<RevenueDay>, StoreError> {
        self.read(move |c| revenue(c, from_time, to_time)).await
    }

    /// Everything about one transaction (see [`payment_detail`]).
    pub async fn audit_payment(
        &self,
        tx_hash: String,
    ) -> Result<Option<PaymentDetail>, StoreError> {
        self.read(move |c| payment_detail(c, &tx_hash)).await
    }

    /// The rows `audit verify` checks claims, the ledger and seats with (see [`books`]).
    pub async fn audit_books(&self) -> Result<Books, StoreError> {
        self.read(|c| books(c)).await
    }

    /// Every reversal and restore, oldest first.
    pub async fn reversal_events(&self) -> Result<Vec<ReversalEvent>, StoreError> {
        self.read(|c| reversals::list(c)).await
    }

    /// Folds every settled usage row into `state` on a blocking thread, and hands the state back when the scan is
    /// done (see [`each_settled_usage`]).
    pub async fn fold_settled_usage<S, F>(&self, state: S, mut f: F) -> Result<S, StoreError>
    where
        S: Send + 'static,
        F: FnMut(&mut S, SettledUsage) + Send + 'static,
    {
        self.read(move |c| {
            let mut state = state;
            each_settled_usage(c, &mut |row| f(&mut state, row))?;
            Ok(state)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with transfers of ids 1..=5 (values 10..=50, id 3 orphaned, block time = day `id`) and id 2 deleted
    /// (as a reorg's rollback does), so ids have a gap.
    async fn store_with_transfers() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        store
            .write(|tx| -> Result<(), StoreError> {
                for id in 1..=5i64 {
                    let status = if id == 3 { "orphaned" } else { "confirmed" };
                    tx.execute(
                        "INSERT INTO transfers (id, tx_hash, log_index, block_number, block_hash, block_time, \
                         from_address, to_address, value_atomic, status, first_seen_at) \
                         VALUES (?1, ?2, 0, ?1, ?3, ?4, '0xpayer', '0xpayto', ?5, ?6, 0)",
                        params![
                            id,
                            format!("0xt{id}"),
                            format!("0xb{id}"),
                            id * 86_400,
                            id * 10,
                            status
                        ],
                    )?;
                }
                tx.execute("DELETE FROM transfers WHERE id = 2", params![])?;
                tx.execute(
                    "INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at) VALUES ('', 5, '0xb5', 0)",
                    params![],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn payments_page_after_the_cursor_and_filter() {
        let (_dir, store) = store_with_transfers().await;
        let page = store
            .audit_payments(PaymentFilter::default(), 1, 2)
            .await
            .unwrap();
        assert_eq!(page.head_of(""), Some(5));
        assert_eq!(page.rows.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 4]);
        let confirmed = PaymentFilter {
            status: Some(TransferStatus::Confirmed),
            min_atomic: Some(20),
            ..Default::default()
        };
        let page = store.audit_payments(confirmed, 0, 100).await.unwrap();
        assert_eq!(page.rows.iter().map(|r| r.id).collect::<Vec<_>>(), [4, 5]);
        assert!(page.rows.iter().all(|r| !r.claimed));
    }

    #[tokio::test]
    async fn latest_rows_are_the_ids_after_max_minus_n_even_across_a_gap() {
        let (_dir, store) = store_with_transfers().await;
        // max(id) = 5, so the window is ids 2..=5; id 2 is gone, which leaves 3 rows (the status page's behaviour).
        let latest = store.read(|c| latest_payments(c, 4)).await.unwrap();
        assert_eq!(
            latest.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [3, 4, 5]
        );
    }

    #[tokio::test]
    async fn revenue_counts_confirmed_payments_per_day_and_detail_knows_only_recorded_transactions()
    {
        let (_dir, store) = store_with_transfers().await;
        let days = store.audit_revenue(Some(86_400), None).await.unwrap();
        let got: Vec<(&str, i64)> = days
            .iter()
            .map(|d| (d.day.as_str(), d.received_atomic))
            .collect();
        assert_eq!(
            got,
            [("1970-01-02", 10), ("1970-01-05", 40), ("1970-01-06", 50)]
        );
        let detail = store.audit_payment("0xt4".into()).await.unwrap().unwrap();
        assert_eq!(detail.transfers.len(), 1);
        assert_eq!(detail.confirmed_value_atomic, 40);
        assert_eq!(detail.claim, None);
        assert_eq!(store.audit_payment("0xt2".into()).await.unwrap(), None);
    }

    /// Claims of accounts `0xa` (tx 0x01..0x03 at second 100, 0x05 at 300) and `0xb` (0x04 at 200).
    async fn store_with_claims() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        store
            .write(|tx| -> Result<(), StoreError> {
                for account in ["0xa", "0xb"] {
                    tx.execute(
                        "INSERT INTO accounts (address, created_at) VALUES (?1, 0)",
                        params![account],
                    )?;
                }
                // Inserted out of claim-time order: the listing's order is claim time, then tx hash.
                for (tx_hash, account, at) in [
                    ("0x05", "0xa", 300i64),
                    ("0x03", "0xa", 100),
                    ("0x04", "0xb", 200),
                    ("0x01", "0xa", 100),
                    ("0x02", "0xa", 100),
                ] {
                    tx.execute(
                        "INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, \
                         claimed_at) VALUES (?1, ?2, 'topup', 10, 10, 0, ?3)",
                        params![tx_hash, account, at],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn claims_page_by_claim_time_in_whole_seconds() {
        let (_dir, store) = store_with_claims().await;
        let txs = |rows: Vec<ClaimRow>| rows.into_iter().map(|r| r.tx_hash).collect::<Vec<_>>();
        // Two rows asked for, but second 100 holds three: the page ends at the end of that second.
        let page = store
            .audit_claims(ClaimFilter::default(), None, 2)
            .await
            .unwrap();
        assert_eq!(txs(page), ["0x01", "0x02", "0x03"]);
        let page = store
            .audit_claims(ClaimFilter::default(), Some(100), 2)
            .await
            .unwrap();
        assert_eq!(txs(page), ["0x04", "0x05"]);
        let page = store
            .audit_claims(ClaimFilter::default(), Some(300), 2)
            .await
            .unwrap();
        assert!(page.is_empty());
        // The rest of a second is read with the page's filters.
        let only_a = ClaimFilter {
            account: Some("0xa".into()),
            ..Default::default()
        };
        let page = store.audit_claims(only_a.clone(), None, 1).await.unwrap();
        assert_eq!(txs(page), ["0x01", "0x02", "0x03"]);
        let page = store.audit_claims(only_a, Some(100), 1).await.unwrap();
        assert_eq!(txs(page), ["0x05"]);
        // The listing's next cursor is the last row's claim time, until a page is not full.
        let mut cursors = Vec::new();
        let mut after = None;
        loop {
            let dataset = crate::audit::Dataset::Claims(ClaimFilter::default());
            let page = crate::audit::read_page(&store, dataset, after, 2, 0)
                .await
                .unwrap();
            cursors.push((page.rows.len(), page.next));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(cursors, [(3, Some(100)), (2, Some(300)), (0, None)]);
        let detail = store.audit_payment("0x02".into()).await.unwrap().unwrap();
        assert_eq!(
            detail.claim.map(|c| (c.account, c.claimed_at)),
            Some(("0xa".to_string(), 100))
        );
        let books = store.audit_books().await.unwrap();
        assert_eq!(
            books
                .claims
                .iter()
                .map(|c| c.tx_hash.as_str())
                .collect::<Vec<_>>(),
            ["0x01", "0x02", "0x03", "0x04", "0x05"]
        );
    }

    #[tokio::test]
    async fn books_and_usage_of_an_empty_database_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("e.db")).unwrap();
        assert_eq!(store.audit_books().await.unwrap(), Books::default());
        let seen = store
            .fold_settled_usage(0u32, |n, _| *n += 1)
            .await
            .unwrap();
        assert_eq!(seen, 0);
    }
}
