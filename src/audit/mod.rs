//! Audit: read-only views of payments, claims, the ledger and keys (for `/api/audit/*` and `audit export`), CSV
//! encoding, and reconciliation against the chain ([`verify`]).
//!
//! Every listing is a [`Dataset`] read in pages ordered by row id; the cursor is the last id of a page, so a page
//! never shifts when new rows arrive. Money is given twice: a decimal string (`…Usdc`) and the exact atomic integer
//! as a string (`…Atomic`). Key secrets and hashes are never read.

pub mod verify;

use rusqlite::{Connection, OptionalExtension, ToSql, params};
use serde_json::{Map, Value, json};

use crate::billing::rfc3339;
use crate::store::transfers::TransferStatus;
use crate::store::{Store, StoreError};
use crate::usdc::Usdc;

/// Largest page.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 100;

/// Filters of the payments listing (all optional; combined with AND).
#[derive(Debug, Clone, Default)]
pub struct PaymentFilter {
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

/// A listing read in pages.
#[derive(Debug, Clone)]
pub enum Dataset {
    Payments(PaymentFilter),
    Claims(ClaimFilter),
    /// The ledger, of one account or of all; time range on `created_at`.
    Ledger {
        account: Option<String>,
        from_time: Option<i64>,
        to_time: Option<i64>,
    },
    /// Keys, optionally of one account.
    Keys {
        account: Option<String>,
    },
}

pub const PAYMENT_COLUMNS: &[&str] = &[
    "id",
    "txHash",
    "logIndex",
    "blockNumber",
    "blockHash",
    "blockTime",
    "from",
    "to",
    "valueUsdc",
    "valueAtomic",
    "status",
    "confirmations",
    "firstSeenAt",
    "confirmedAt",
    "orphanedAt",
    "claimed",
];
pub const CLAIM_COLUMNS: &[&str] = &[
    "id",
    "txHash",
    "account",
    "kind",
    "paidUsdc",
    "paidAtomic",
    "priceUsdc",
    "priceAtomic",
    "surplusUsdc",
    "surplusAtomic",
    "pool",
    "blocks",
    "expiresAt",
    "keyPublicId",
    "claimedAt",
];
pub const LEDGER_COLUMNS: &[&str] = &[
    "id",
    "account",
    "kind",
    "amountUsdc",
    "amountAtomic",
    "balanceAfterUsdc",
    "balanceAfterAtomic",
    "txHash",
    "keyPublicId",
    "note",
    "createdAt",
];
pub const KEY_COLUMNS: &[&str] = &[
    "id",
    "publicId",
    "kind",
    "state",
    "account",
    "pool",
    "blocks",
    "expiresAt",
    "createdAt",
    "createdBy",
    "revokedAt",
    "revokedReason",
];
pub const REVENUE_COLUMNS: &[&str] = &[
    "day",
    "receivedUsdc",
    "receivedAtomic",
    "payments",
    "claims",
    "subscriptionsUsdc",
    "subscriptionsAtomic",
    "topupsUsdc",
    "topupsAtomic",
    "surplusUsdc",
    "surplusAtomic",
];

fn money(obj: &mut Map<String, Value>, name: &str, atomic: i64) {
    obj.insert(format!("{name}Usdc"), json!(Usdc(atomic).to_string()));
    obj.insert(format!("{name}Atomic"), json!(atomic.to_string()));
}

fn time(t: Option<i64>) -> Value {
    t.map(|t| json!(rfc3339(t))).unwrap_or(Value::Null)
}

impl Dataset {
    /// Column order for CSV.
    pub fn columns(&self) -> &'static [&'static str] {
        match self {
            Dataset::Payments(_) => PAYMENT_COLUMNS,
            Dataset::Claims(_) => CLAIM_COLUMNS,
            Dataset::Ledger { .. } => LEDGER_COLUMNS,
            Dataset::Keys { .. } => KEY_COLUMNS,
        }
    }

    /// One page: rows with id > `after`, in id order, at most `limit`.
    pub fn page(
        &self,
        c: &Connection,
        after: i64,
        limit: u32,
        now: i64,
    ) -> rusqlite::Result<Vec<(i64, Value)>> {
        let limit = i64::from(limit.clamp(1, MAX_LIMIT));
        match self {
            Dataset::Payments(f) => {
                let head: Option<i64> = c
                    .query_row(
                        "SELECT block_number FROM checkpoint WHERE id = 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                let mut stmt = c.prepare_cached(
                    "SELECT t.id, t.tx_hash, t.log_index, t.block_number, t.block_hash, t.block_time, t.from_address, \
                     t.to_address, t.value_atomic, t.status, t.first_seen_at, t.confirmed_at, t.orphaned_at, \
                     EXISTS (SELECT 1 FROM claims c WHERE c.tx_hash = t.tx_hash) \
                     FROM transfers t WHERE t.id > ?1 \
                     AND (?2 IS NULL OR t.status = ?2) AND (?3 IS NULL OR t.from_address = ?3) \
                     AND (?4 IS NULL OR t.block_number >= ?4) AND (?5 IS NULL OR t.block_number <= ?5) \
                     AND (?6 IS NULL OR coalesce(t.block_time, t.first_seen_at) >= ?6) \
                     AND (?7 IS NULL OR coalesce(t.block_time, t.first_seen_at) < ?7) \
                     AND (?8 IS NULL OR t.value_atomic >= ?8) ORDER BY t.id LIMIT ?9",
                )?;
                let args: [&dyn ToSql; 9] = [
                    &after,
                    &f.status.map(|s| s.as_str()),
                    &f.payer,
                    &f.from_block.map(|b| b as i64),
                    &f.to_block.map(|b| b as i64),
                    &f.from_time,
                    &f.to_time,
                    &f.min_atomic,
                    &limit,
                ];
                let rows = stmt.query_map(&args[..], |r| {
                    let id: i64 = r.get(0)?;
                    let block: i64 = r.get(3)?;
                    let status: String = r.get(9)?;
                    let confirmations = match head {
                        Some(h) if status != "orphaned" && h >= block => h - block + 1,
                        _ => 0,
                    };
                    let mut o = Map::new();
                    o.insert("id".into(), json!(id));
                    o.insert("txHash".into(), json!(r.get::<_, String>(1)?));
                    o.insert("logIndex".into(), json!(r.get::<_, i64>(2)?));
                    o.insert("blockNumber".into(), json!(block));
                    o.insert("blockHash".into(), json!(r.get::<_, String>(4)?));
                    o.insert("blockTime".into(), time(r.get(5)?));
                    o.insert("from".into(), json!(r.get::<_, String>(6)?));
                    o.insert("to".into(), json!(r.get::<_, String>(7)?));
                    money(&mut o, "value", r.get(8)?);
                    o.insert("status".into(), json!(status));
                    o.insert("confirmations".into(), json!(confirmations));
                    o.insert("firstSeenAt".into(), time(r.get(10)?));
                    o.insert("confirmedAt".into(), time(r.get(11)?));
                    o.insert("orphanedAt".into(), time(r.get(12)?));
                    o.insert("claimed".into(), json!(r.get::<_, bool>(13)?));
                    Ok((id, Value::Object(o)))
                })?;
                rows.collect()
            }
            Dataset::Claims(f) => {
                let mut stmt = c.prepare_cached(
                    "SELECT c.rowid, c.tx_hash, c.account, c.kind, c.paid_atomic, c.price_atomic, c.surplus_atomic, \
                     s.pool, s.blocks, s.expires_at, k.public_id, c.claimed_at FROM claims c \
                     LEFT JOIN subscriptions s ON s.id = c.subscription_id LEFT JOIN api_keys k ON k.id = c.key_id \
                     WHERE c.rowid > ?1 AND (?2 IS NULL OR c.account = ?2) AND (?3 IS NULL OR c.kind = ?3) \
                     AND (?4 IS NULL OR c.claimed_at >= ?4) AND (?5 IS NULL OR c.claimed_at < ?5) \
                     ORDER BY c.rowid LIMIT ?6",
                )?;
                let args: [&dyn ToSql; 6] = [
                    &after,
                    &f.account,
                    &f.kind,
                    &f.from_time,
                    &f.to_time,
                    &limit,
                ];
                let rows = stmt.query_map(&args[..], |r| {
                    let id: i64 = r.get(0)?;
                    let mut o = Map::new();
                    o.insert("id".into(), json!(id));
                    o.insert("txHash".into(), json!(r.get::<_, String>(1)?));
                    o.insert("account".into(), json!(r.get::<_, String>(2)?));
                    o.insert("kind".into(), json!(r.get::<_, String>(3)?));
                    money(&mut o, "paid", r.get(4)?);
                    money(&mut o, "price", r.get(5)?);
                    money(&mut o, "surplus", r.get(6)?);
                    o.insert("pool".into(), json!(r.get::<_, Option<String>>(7)?));
                    let blocks: Option<String> = r.get(8)?;
                    o.insert(
                        "blocks".into(),
                        blocks
                            .and_then(|b| serde_json::from_str(&b).ok())
                            .unwrap_or(Value::Null),
                    );
                    o.insert("expiresAt".into(), time(r.get(9)?));
                    o.insert("keyPublicId".into(), json!(r.get::<_, Option<String>>(10)?));
                    o.insert("claimedAt".into(), time(r.get(11)?));
                    Ok((id, Value::Object(o)))
                })?;
                rows.collect()
            }
            Dataset::Ledger {
                account,
                from_time,
                to_time,
            } => {
                let mut stmt = c.prepare_cached(
                    "SELECT l.id, l.account, l.kind, l.amount_atomic, l.balance_after, l.tx_hash, k.public_id, l.note, \
                     l.created_at FROM ledger l LEFT JOIN api_keys k ON k.id = l.key_id \
                     WHERE l.id > ?1 AND (?2 IS NULL OR l.account = ?2) AND (?3 IS NULL OR l.created_at >= ?3) \
                     AND (?4 IS NULL OR l.created_at < ?4) ORDER BY l.id LIMIT ?5",
                )?;
                let args: [&dyn ToSql; 5] = [&after, account, from_time, to_time, &limit];
                let rows = stmt.query_map(&args[..], |r| {
                    let id: i64 = r.get(0)?;
                    let mut o = Map::new();
                    o.insert("id".into(), json!(id));
                    o.insert("account".into(), json!(r.get::<_, String>(1)?));
                    o.insert("kind".into(), json!(r.get::<_, String>(2)?));
                    money(&mut o, "amount", r.get(3)?);
                    money(&mut o, "balanceAfter", r.get(4)?);
                    o.insert("txHash".into(), json!(r.get::<_, Option<String>>(5)?));
                    o.insert("keyPublicId".into(), json!(r.get::<_, Option<String>>(6)?));
                    o.insert("note".into(), json!(r.get::<_, Option<String>>(7)?));
                    o.insert("createdAt".into(), time(r.get(8)?));
                    Ok((id, Value::Object(o)))
                })?;
                rows.collect()
            }
            Dataset::Keys { account } => {
                let mut stmt = c.prepare_cached(
                    "SELECT k.id, k.public_id, k.kind, k.account, s.pool, s.blocks, s.expires_at, k.created_at, \
                     k.created_by, k.revoked_at, k.revoked_reason, k.suspended_at FROM api_keys k \
                     LEFT JOIN subscriptions s ON s.id = k.subscription_id \
                     WHERE k.id > ?1 AND (?2 IS NULL OR k.account = ?2) ORDER BY k.id LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![after, account, limit], |r| {
                    let id: i64 = r.get(0)?;
                    let expires: Option<i64> = r.get(6)?;
                    let revoked: Option<i64> = r.get(9)?;
                    let suspended: Option<i64> = r.get(11)?;
                    let state = if revoked.is_some() {
                        "revoked"
                    } else if suspended.is_some() {
                        // Its payment was reversed by a reorg; restored if it is mined again.
                        "suspended"
                    } else if expires.is_some_and(|e| e <= now) {
                        "expired"
                    } else {
                        "live"
                    };
                    let mut o = Map::new();
                    o.insert("id".into(), json!(id));
                    o.insert("publicId".into(), json!(r.get::<_, String>(1)?));
                    o.insert("kind".into(), json!(r.get::<_, String>(2)?));
                    o.insert("state".into(), json!(state));
                    o.insert("account".into(), json!(r.get::<_, String>(3)?));
                    o.insert("pool".into(), json!(r.get::<_, Option<String>>(4)?));
                    let blocks: Option<String> = r.get(5)?;
                    o.insert(
                        "blocks".into(),
                        blocks
                            .and_then(|b| serde_json::from_str(&b).ok())
                            .unwrap_or(Value::Null),
                    );
                    o.insert("expiresAt".into(), time(expires));
                    o.insert("createdAt".into(), time(r.get(7)?));
                    o.insert("createdBy".into(), json!(r.get::<_, String>(8)?));
                    o.insert("revokedAt".into(), time(revoked));
                    o.insert(
                        "revokedReason".into(),
                        json!(r.get::<_, Option<String>>(10)?),
                    );
                    Ok((id, Value::Object(o)))
                })?;
                rows.collect()
            }
        }
    }
}

/// Reads one page through the store.
pub async fn read_page(
    store: &Store,
    dataset: Dataset,
    after: i64,
    limit: u32,
    now: i64,
) -> Result<Vec<(i64, Value)>, StoreError> {
    store
        .read(move |c| -> Result<_, StoreError> { Ok(dataset.page(c, after, limit, now)?) })
        .await
}

/// Revenue per UTC day in `[from_time, to_time)`: confirmed payments received (by block time) and claims (by claim
/// time) split by product.
pub fn revenue(
    c: &Connection,
    from_time: Option<i64>,
    to_time: Option<i64>,
) -> rusqlite::Result<Vec<Value>> {
    use std::collections::BTreeMap;
    #[derive(Default)]
    struct Day {
        received: i64,
        payments: i64,
        claims: i64,
        subscriptions: i64,
        topups: i64,
        surplus: i64,
    }
    let mut days: BTreeMap<String, Day> = BTreeMap::new();
    let mut stmt = c.prepare_cached(
        "SELECT date(coalesce(block_time, first_seen_at), 'unixepoch') AS d, sum(value_atomic), count(*) \
         FROM transfers WHERE status = 'confirmed' \
         AND (?1 IS NULL OR coalesce(block_time, first_seen_at) >= ?1) \
         AND (?2 IS NULL OR coalesce(block_time, first_seen_at) < ?2) GROUP BY d",
    )?;
    for row in stmt.query_map(params![from_time, to_time], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })? {
        let (d, sum, n) = row?;
        let day = days.entry(d).or_default();
        day.received += sum;
        day.payments += n;
    }
    let mut stmt = c.prepare_cached(
        "SELECT date(claimed_at, 'unixepoch') AS d, kind, sum(price_atomic), sum(surplus_atomic), count(*) \
         FROM claims WHERE (?1 IS NULL OR claimed_at >= ?1) AND (?2 IS NULL OR claimed_at < ?2) GROUP BY d, kind",
    )?;
    for row in stmt.query_map(params![from_time, to_time], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })? {
        let (d, kind, price, surplus, n) = row?;
        let day = days.entry(d).or_default();
        day.claims += n;
        day.surplus += surplus;
        if kind == "subscription" {
            day.subscriptions += price;
        } else {
            day.topups += price;
        }
    }
    Ok(days
        .into_iter()
        .map(|(d, v)| {
            let mut o = Map::new();
            o.insert("day".into(), json!(d));
            money(&mut o, "received", v.received);
            o.insert("payments".into(), json!(v.payments));
            o.insert("claims".into(), json!(v.claims));
            money(&mut o, "subscriptions", v.subscriptions);
            money(&mut o, "topups", v.topups);
            money(&mut o, "surplus", v.surplus);
            Value::Object(o)
        })
        .collect())
}

/// Everything about one transaction: its transfers (with confirmations and status history), what it bought, the
/// key's public id and the ledger rows it caused. `None` when the database knows nothing of it.
pub fn payment_detail(c: &Connection, tx_hash: &str) -> rusqlite::Result<Option<Value>> {
    let head: Option<i64> = c
        .query_row(
            "SELECT block_number FROM checkpoint WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let mut transfers = Vec::new();
    let mut stmt = c.prepare_cached(
        "SELECT id, log_index, block_number, block_hash, block_time, from_address, to_address, value_atomic, status, \
         first_seen_at, confirmed_at, orphaned_at FROM transfers WHERE tx_hash = ?1 ORDER BY id",
    )?;
    let rows: Vec<_> = stmt
        .query_map([tx_hash], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, Option<i64>>(10)?,
                r.get::<_, Option<i64>>(11)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (id, log_index, block, hash, btime, from, to, value, status, first, confirmed, orphaned) in
        rows
    {
        // The row itself is the first history entry (found confirmed when confirmed_at = first_seen_at).
        let first_status = if confirmed == Some(first) {
            "confirmed"
        } else {
            "seen"
        };
        let mut history = vec![json!({
            "status": first_status, "at": rfc3339(first), "reason": "first indexed", "headBlock": Value::Null,
        })];
        let mut h = c.prepare_cached(
            "SELECT status, at, head_block, reason FROM transfer_status_history WHERE transfer_id = ?1 ORDER BY id",
        )?;
        for entry in h.query_map([id], |r| {
            Ok(json!({
                "status": r.get::<_, String>(0)?,
                "at": rfc3339(r.get(1)?),
                "headBlock": r.get::<_, i64>(2)?,
                "reason": r.get::<_, String>(3)?,
            }))
        })? {
            history.push(entry?);
        }
        let confirmations = match head {
            Some(h) if status != "orphaned" && h >= block => h - block + 1,
            _ => 0,
        };
        let mut o = Map::new();
        o.insert("logIndex".into(), json!(log_index));
        o.insert("blockNumber".into(), json!(block));
        o.insert("blockHash".into(), json!(hash));
        o.insert("blockTime".into(), time(btime));
        o.insert("from".into(), json!(from));
        o.insert("to".into(), json!(to));
        money(&mut o, "value", value);
        o.insert("status".into(), json!(status));
        o.insert("confirmations".into(), json!(confirmations));
        o.insert("firstSeenAt".into(), time(Some(first)));
        o.insert("confirmedAt".into(), time(confirmed));
        o.insert("orphanedAt".into(), time(orphaned));
        o.insert("history".into(), Value::Array(history));
        transfers.push(Value::Object(o));
    }
    let claim = Dataset::Claims(ClaimFilter::default());
    let claim_row = {
        let rowid: Option<i64> = c
            .query_row(
                "SELECT rowid FROM claims WHERE tx_hash = ?1",
                [tx_hash],
                |r| r.get(0),
            )
            .optional()?;
        match rowid {
            Some(id) => claim.page(c, id - 1, 1, 0)?.pop().map(|(_, v)| v),
            None => None,
        }
    };
    let mut ledger = Vec::new();
    let mut stmt = c.prepare_cached("SELECT id FROM ledger WHERE tx_hash = ?1 ORDER BY id")?;
    let ids: Vec<i64> = stmt
        .query_map([tx_hash], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let all_ledger = Dataset::Ledger {
        account: None,
        from_time: None,
        to_time: None,
    };
    for id in ids {
        if let Some((_, v)) = all_ledger.page(c, id - 1, 1, 0)?.pop() {
            ledger.push(v);
        }
    }
    if transfers.is_empty() && claim_row.is_none() {
        return Ok(None);
    }
    let total_confirmed: i64 = c.query_row(
        "SELECT coalesce(sum(value_atomic), 0) FROM transfers WHERE tx_hash = ?1 AND status = 'confirmed'",
        [tx_hash],
        |r| r.get(0),
    )?;
    let mut o = Map::new();
    o.insert("txHash".into(), json!(tx_hash));
    o.insert("indexedHead".into(), json!(head));
    money(&mut o, "confirmedValue", total_confirmed);
    o.insert("transfers".into(), Value::Array(transfers));
    o.insert("claim".into(), claim_row.unwrap_or(Value::Null));
    o.insert("ledger".into(), Value::Array(ledger));
    // Reversals and restores of the purchase this transaction paid for (a reorg removed its payment).
    let reversals = match crate::store::reversals::origin_of(c, tx_hash)? {
        Some(origin) => crate::store::reversals::of_purchase(c, &origin)?,
        None => Vec::new(),
    };
    o.insert("reversals".into(), json!(reversals));
    Ok(Some(Value::Object(o)))
}

/// One CSV line (RFC 4180) of `row`'s `columns`, with `\r\n`. Cells that a spreadsheet would run as a formula get a
/// leading `'`.
pub fn csv_line(columns: &[&str], row: &Value) -> String {
    let mut out = String::new();
    for (i, col) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let cell = match row.get(*col) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).unwrap_or(v.to_string()))
                .collect::<Vec<_>>()
                .join(" "),
            Some(v) => v.to_string(),
        };
        out.push_str(&csv_cell(&cell));
    }
    out.push_str("\r\n");
    out
}

/// The header line.
pub fn csv_header(columns: &[&str]) -> String {
    let mut out = columns.join(",");
    out.push_str("\r\n");
    out
}

fn csv_cell(cell: &str) -> String {
    let formula = cell.starts_with(['=', '+', '@', '\t', '\r'])
        || (cell.starts_with('-') && !cell[1..].starts_with(|c: char| c.is_ascii_digit()));
    let cell = if formula {
        format!("'{cell}")
    } else {
        cell.to_string()
    };
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell
    }
}

/// Parses a time bound: unix seconds, `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    let (date, clock) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Years and clock fields are the caller's numbers: a time outside i64 seconds is not a time (None), never an
    // overflow.
    let mut secs = days_from_civil(y, m, d)?.checked_mul(86_400)?;
    if let Some(t) = clock {
        let mut hms = t.split(':');
        let h: i64 = hms.next()?.parse().ok()?;
        let mi: i64 = hms.next().unwrap_or("0").parse().ok()?;
        let se: i64 = hms.next().unwrap_or("0").parse().ok()?;
        if hms.next().is_some()
            || !(0..=24).contains(&h)
            || !(0..=59).contains(&mi)
            || !(0..=60).contains(&se)
        {
            return None;
        }
        secs = secs.checked_add(h * 3600 + mi * 60 + se)?;
    }
    Some(secs)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm); `None` outside i64.
fn days_from_civil(y: i64, m: i64, d: i64) -> Option<i64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = if y >= 0 { y } else { y.checked_sub(399)? } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era.checked_mul(146_097)?.checked_add(doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_time_bounds() {
        assert_eq!(parse_time("1767225600"), Some(1_767_225_600));
        assert_eq!(parse_time("2026-01-01"), Some(1_767_225_600));
        assert_eq!(parse_time("2026-01-01T01:00:00Z"), Some(1_767_229_200));
        assert_eq!(parse_time("1970-01-01"), Some(0));
        assert_eq!(parse_time("2026-13-01"), None);
        assert_eq!(parse_time("yesterday"), None);
        // Outside i64 seconds, or negative clock fields: not a time (these overflowed before).
        assert_eq!(parse_time("292277026597-01-01"), None);
        assert_eq!(parse_time("-9223372036854775808-01-01"), None);
        assert_eq!(parse_time("2026-01-01T-9223372036854775808:00:00Z"), None);
        assert_eq!(parse_time("2026-01-01T-1:00:00Z"), None);
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let row =
            json!({"a": "x,y", "b": "=cmd()", "c": "-1.50", "d": null, "e": 3, "f": "say \"hi\""});
        assert_eq!(
            csv_line(&["a", "b", "c", "d", "e", "f"], &row),
            "\"x,y\",'=cmd(),-1.50,,3,\"say \"\"hi\"\"\"\r\n"
        );
    }
}
