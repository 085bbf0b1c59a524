//! Audit: read-only views of payments, claims, the ledger and keys (for `/api/audit/*` and `audit export`), CSV
//! encoding, and reconciliation against the chain ([`verify`]).
//!
//! Every listing is a [`Dataset`] read in keyset pages ([`read_page`]): payments, the ledger and keys in id order
//! (the cursor is the last id of a page), claims in claim-time order (the cursor is the claim time of a page's last
//! row, and a page ends at a whole second), so a page never shifts when new rows arrive. Money is given twice: a decimal string (`…Usdc`) and the exact atomic integer
//! as a string (`…Atomic`). Key secrets and hashes are never read.
//!
//! This module owns what the rows mean and how they are shown (confirmations, key states, JSON and CSV shapes);
//! the SQL that reads them is `store::audit`'s, reached through `Store` methods, so nothing here names the
//! database engine.

pub mod verify;

use serde_json::{Map, Value, json};

use crate::billing::rfc3339;
use crate::store::audit::{
    ClaimRow, KeyRow, LedgerFilter, LedgerRow, PaymentDetail, PaymentRow, PaymentsPage, RevenueDay,
};
use crate::store::{Store, StoreError};
use crate::usdc::Usdc;

pub use crate::store::audit::{ClaimFilter, PaymentFilter};

/// Largest page.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 100;

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
    // Appended last, so the columns of files exported before several networks keep their positions.
    "network",
    "token",
    "tokenValue",
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
    // Appended last, so the columns of files exported before several networks keep their positions.
    "network",
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
}

/// Confirmations of a transfer in `block` when the index has reached `head` (none for an orphaned one).
fn confirmations(head: Option<i64>, status: &str, block: i64) -> i64 {
    match head {
        Some(h) if status != "orphaned" && h >= block => h - block + 1,
        _ => 0,
    }
}

/// A subscription's stored blocks as JSON (`null` when there are none or they do not parse).
fn blocks(json_text: &Option<String>) -> Value {
    json_text
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}

/// A payments-listing row, with its confirmations at the indexed head.
pub fn payment_json(head: Option<i64>, r: &PaymentRow) -> Value {
    let mut o = Map::new();
    o.insert("id".into(), json!(r.id));
    o.insert("network".into(), json!(r.network));
    o.insert("token".into(), json!(r.token));
    o.insert("tokenValue".into(), json!(r.token_value));
    o.insert("txHash".into(), json!(r.tx_hash));
    o.insert("logIndex".into(), json!(r.log_index));
    o.insert("blockNumber".into(), json!(r.block_number));
    o.insert("blockHash".into(), json!(r.block_hash));
    o.insert("blockTime".into(), time(r.block_time));
    o.insert("from".into(), json!(r.from));
    o.insert("to".into(), json!(r.to));
    money(&mut o, "value", r.value_atomic);
    o.insert("status".into(), json!(r.status));
    o.insert(
        "confirmations".into(),
        json!(confirmations(head, &r.status, r.block_number)),
    );
    o.insert("firstSeenAt".into(), time(r.first_seen_at));
    o.insert("confirmedAt".into(), time(r.confirmed_at));
    o.insert("orphanedAt".into(), time(r.orphaned_at));
    o.insert("claimed".into(), json!(r.claimed));
    Value::Object(o)
}

/// A page of payments as `(id, row)` pairs.
pub fn payments_json(page: &PaymentsPage) -> Vec<(i64, Value)> {
    page.rows
        .iter()
        .map(|r| (r.id, payment_json(page.head_of(&r.network), r)))
        .collect()
}

/// A claims-listing row.
pub fn claim_json(r: &ClaimRow) -> Value {
    let mut o = Map::new();
    // A claim's key is its tx hash: claims have no numeric id.
    o.insert("id".into(), json!(r.tx_hash));
    o.insert("network".into(), json!(r.network));
    o.insert("txHash".into(), json!(r.tx_hash));
    o.insert("account".into(), json!(r.account));
    o.insert("kind".into(), json!(r.kind));
    money(&mut o, "paid", r.paid_atomic);
    money(&mut o, "price", r.price_atomic);
    money(&mut o, "surplus", r.surplus_atomic);
    o.insert("pool".into(), json!(r.pool));
    o.insert("blocks".into(), blocks(&r.blocks_json));
    o.insert("expiresAt".into(), time(r.expires_at));
    o.insert("keyPublicId".into(), json!(r.key_public_id));
    o.insert("claimedAt".into(), time(Some(r.claimed_at)));
    Value::Object(o)
}

/// A ledger-listing row.
pub fn ledger_json(r: &LedgerRow) -> Value {
    let mut o = Map::new();
    o.insert("id".into(), json!(r.id));
    o.insert("account".into(), json!(r.account));
    o.insert("kind".into(), json!(r.kind));
    money(&mut o, "amount", r.amount_atomic);
    money(&mut o, "balanceAfter", r.balance_after_atomic);
    o.insert("txHash".into(), json!(r.tx_hash));
    o.insert("keyPublicId".into(), json!(r.key_public_id));
    o.insert("note".into(), json!(r.note));
    o.insert("createdAt".into(), time(r.created_at));
    Value::Object(o)
}

/// A keys-listing row, with its state at `now`.
pub fn key_json(r: &KeyRow, now: i64) -> Value {
    let state = if r.revoked_at.is_some() {
        "revoked"
    } else if r.suspended_at.is_some() {
        // Its payment was reversed by a reorg; restored if it is mined again.
        "suspended"
    } else if r.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "live"
    };
    let mut o = Map::new();
    o.insert("id".into(), json!(r.id));
    o.insert("publicId".into(), json!(r.public_id));
    o.insert("kind".into(), json!(r.kind));
    o.insert("state".into(), json!(state));
    o.insert("account".into(), json!(r.account));
    o.insert("pool".into(), json!(r.pool));
    o.insert("blocks".into(), blocks(&r.blocks_json));
    o.insert("expiresAt".into(), time(r.expires_at));
    o.insert("createdAt".into(), time(r.created_at));
    o.insert("createdBy".into(), json!(r.created_by));
    o.insert("revokedAt".into(), time(r.revoked_at));
    o.insert("revokedReason".into(), json!(r.revoked_reason));
    Value::Object(o)
}

/// A revenue day.
pub fn revenue_json(v: &RevenueDay) -> Value {
    let mut o = Map::new();
    o.insert("day".into(), json!(v.day));
    money(&mut o, "received", v.received_atomic);
    o.insert("payments".into(), json!(v.payments));
    o.insert("claims".into(), json!(v.claims));
    money(&mut o, "subscriptions", v.subscriptions_atomic);
    money(&mut o, "topups", v.topups_atomic);
    money(&mut o, "surplus", v.surplus_atomic);
    let networks: Vec<Value> = v
        .by_network
        .iter()
        .map(|(network, (received, payments))| {
            let mut n = Map::new();
            n.insert("network".into(), json!(network));
            money(&mut n, "received", *received);
            n.insert("payments".into(), json!(payments));
            Value::Object(n)
        })
        .collect();
    o.insert("networks".into(), Value::Array(networks));
    Value::Object(o)
}

/// One page of a listing: its rows, and the cursor of the next page (`None` after the last page).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub rows: Vec<Value>,
    pub next: Option<i64>,
}

impl Page {
    /// A page of `rows` read with `limit`: a full page has a next one, after the cursor of its last row.
    fn of<T>(
        rows: &[T],
        limit: u32,
        cursor: impl Fn(&T) -> i64,
        json: impl Fn(&T) -> Value,
    ) -> Page {
        let full = rows.len() >= limit as usize;
        Page {
            next: rows.last().filter(|_| full).map(cursor),
            rows: rows.iter().map(json).collect(),
        }
    }
}

/// Reads one page through the store: the rows after the cursor `after` (`None`: from the first row), and the next
/// page's cursor. Payments, the ledger and keys: the rows with id > `after`, in id order, at most `limit` (clamped
/// to `1..=MAX_LIMIT`); the cursor is the last row's id. Claims: the claims after the claim time `after`, in claim
/// time then tx hash order, `limit` rows and the rest of the last row's second (so a page may hold more than
/// `limit` when several claims share that second); the cursor is the last row's claim time. `now` decides which
/// keys have expired.
pub async fn read_page(
    store: &Store,
    dataset: Dataset,
    after: Option<i64>,
    limit: u32,
    now: i64,
) -> Result<Page, StoreError> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let id = after.unwrap_or(0);
    Ok(match dataset {
        Dataset::Payments(f) => {
            let page = store.audit_payments(f, id, limit).await?;
            Page::of(
                &page.rows,
                limit,
                |r| r.id,
                |r| payment_json(page.head_of(&r.network), r),
            )
        }
        Dataset::Claims(f) => Page::of(
            &store.audit_claims(f, after, limit).await?,
            limit,
            |r| r.claimed_at,
            claim_json,
        ),
        Dataset::Ledger {
            account,
            from_time,
            to_time,
        } => {
            let filter = LedgerFilter {
                account,
                from_time,
                to_time,
            };
            Page::of(
                &store.audit_ledger(filter, id, limit).await?,
                limit,
                |r| r.id,
                ledger_json,
            )
        }
        Dataset::Keys { account } => Page::of(
            &store.audit_keys(account, id, limit).await?,
            limit,
            |r| r.id,
            |r| key_json(r, now),
        ),
    })
}

/// Revenue per UTC day in `[from_time, to_time)`: confirmed payments received (by block time) and claims (by claim
/// time) split by product.
pub async fn revenue(
    store: &Store,
    from_time: Option<i64>,
    to_time: Option<i64>,
) -> Result<Vec<Value>, StoreError> {
    Ok(store
        .audit_revenue(from_time, to_time)
        .await?
        .iter()
        .map(revenue_json)
        .collect())
}

/// Everything about one transaction: its transfers (with confirmations and status history), what it bought, the
/// key's public id and the ledger rows it caused. `None` when the database knows nothing of it.
pub async fn payment_detail(store: &Store, tx_hash: &str) -> Result<Option<Value>, StoreError> {
    Ok(store
        .audit_payment(tx_hash.to_string())
        .await?
        .map(|detail| payment_detail_json(tx_hash, &detail)))
}

fn payment_detail_json(tx_hash: &str, p: &PaymentDetail) -> Value {
    // The payment's network: its claim's, else its first transfer's.
    let network = p
        .claim
        .as_ref()
        .map(|c| c.network.clone())
        .or_else(|| p.transfers.first().map(|t| t.network.clone()));
    let head = network
        .as_ref()
        .and_then(|n| p.indexed_heads.get(n).copied());
    let mut transfers = Vec::new();
    for t in &p.transfers {
        // The row itself is the first history entry (found confirmed when confirmed_at = first_seen_at).
        let first_status = if t.confirmed_at == Some(t.first_seen_at) {
            "confirmed"
        } else {
            "seen"
        };
        let mut history = vec![json!({
            "status": first_status, "at": rfc3339(t.first_seen_at), "reason": "first indexed", "headBlock": Value::Null,
        })];
        for entry in &t.history {
            history.push(json!({
                "status": entry.status,
                "at": rfc3339(entry.at),
                "headBlock": entry.head_block,
                "reason": entry.reason,
            }));
        }
        let mut o = Map::new();
        o.insert("network".into(), json!(t.network));
        o.insert("logIndex".into(), json!(t.log_index));
        o.insert("blockNumber".into(), json!(t.block_number));
        o.insert("blockHash".into(), json!(t.block_hash));
        o.insert("blockTime".into(), time(t.block_time));
        o.insert("from".into(), json!(t.from));
        o.insert("to".into(), json!(t.to));
        money(&mut o, "value", t.value_atomic);
        o.insert("status".into(), json!(t.status));
        o.insert(
            "confirmations".into(),
            json!(confirmations(
                p.indexed_heads.get(&t.network).copied(),
                &t.status,
                t.block_number
            )),
        );
        o.insert("firstSeenAt".into(), time(Some(t.first_seen_at)));
        o.insert("confirmedAt".into(), time(t.confirmed_at));
        o.insert("orphanedAt".into(), time(t.orphaned_at));
        o.insert("history".into(), Value::Array(history));
        transfers.push(Value::Object(o));
    }
    let mut o = Map::new();
    o.insert("txHash".into(), json!(tx_hash));
    o.insert("network".into(), json!(network));
    o.insert("indexedHead".into(), json!(head));
    money(&mut o, "confirmedValue", p.confirmed_value_atomic);
    o.insert("transfers".into(), Value::Array(transfers));
    o.insert(
        "claim".into(),
        p.claim.as_ref().map(claim_json).unwrap_or(Value::Null),
    );
    o.insert(
        "ledger".into(),
        Value::Array(p.ledger.iter().map(ledger_json).collect()),
    );
    // Reversals and restores of the purchase this transaction paid for (a reorg removed its payment).
    o.insert("reversals".into(), json!(p.reversals));
    Value::Object(o)
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
