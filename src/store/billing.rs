//! Checkout persistence: accounts, the append-only ledger, claims, subscriptions, seats, API keys and rotation
//! nonces. Every function that changes state takes the writer's `BEGIN IMMEDIATE` transaction, so a claim's
//! checks (not claimed yet, seats left) and its effects (claim row, subscription, seats, key, ledger rows) commit
//! together or not at all.

use serde::Serialize;

use super::StoreError;
use super::sql::{Row, Sql};
use crate::params;

use crate::keys::NewKey;
use crate::usdc::Usdc;

/// Kinds of ledger entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    Topup,
    Surplus,
    Grant,
    Debit,
    Refund,
    /// Credits taken back because the payment that bought them left the chain (may take the balance below zero).
    Reversal,
    /// Reversed credits given back because the payment was confirmed again.
    Reinstatement,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Topup => "topup",
            LedgerKind::Surplus => "surplus",
            LedgerKind::Grant => "grant",
            LedgerKind::Debit => "debit",
            LedgerKind::Refund => "refund",
            LedgerKind::Reversal => "reversal",
            LedgerKind::Reinstatement => "reinstatement",
        }
    }
}

/// Why a ledger entry cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient balance: {balance} available, {needed} needed")]
    Insufficient { balance: Usdc, needed: Usdc },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates the account row if it is new.
pub fn ensure_account(c: &dyn Sql, address: &str, now: i64) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO accounts (address, created_at) VALUES (?1, ?2) ON CONFLICT (address) DO NOTHING",
        params![address, now],
    )?;
    Ok(())
}

/// The account's balance (`accounts.balance_atomic`, equal to its last ledger row's running total and to the sum of
/// its rows; 0 for an account that has none).
pub fn balance(c: &dyn Sql, address: &str) -> Result<Usdc, StoreError> {
    let b: Option<i64> = c.query_opt(
        "SELECT balance_atomic FROM accounts WHERE address = ?1",
        params![address],
        |r| r.get(0),
    )?;
    Ok(Usdc(b.unwrap_or(0)))
}

/// Appends a ledger row. Returns the new balance.
///
/// The balance changes in ONE guarded statement (`UPDATE accounts … WHERE balance_atomic + delta >= 0 RETURNING`),
/// so the rule holds in the database under any number of writers: a `debit` that would leave the balance below zero
/// changes nothing and is refused — a reservation never overdraws, and an account whose balance is negative (after
/// a reversal) cannot spend at all until it is topped up. A `reversal` may take the balance below zero (the credits
/// are gone whatever was spent from them), and rows that add credits may leave it there. The ledger row carries the
/// balance the statement returned.
#[allow(clippy::too_many_arguments)]
pub fn append_ledger(
    c: &dyn Sql,
    address: &str,
    kind: LedgerKind,
    amount: Usdc,
    tx_hash: Option<&str>,
    key_id: Option<i64>,
    note: Option<&str>,
    now: i64,
) -> Result<Usdc, LedgerError> {
    let guarded = kind == LedgerKind::Debit;
    // The last two conditions refuse an i64 overflow (SQLite would turn it into a float).
    let change = || -> Result<Option<i64>, StoreError> {
        c.query_opt(
            "UPDATE accounts SET balance_atomic = balance_atomic + ?2 \
             WHERE address = ?1 AND (?3 = 0 OR balance_atomic + ?2 >= 0) \
             AND (?2 <= 0 OR balance_atomic <= 9223372036854775807 - ?2) \
             AND (?2 >= 0 OR balance_atomic >= -9223372036854775807 - 1 - ?2) \
             RETURNING balance_atomic",
            params![address, amount.0, guarded],
            |r| r.get(0),
        )
    };
    // The account exists on every per-request path (a reservation, a refund), so it is looked for only when the
    // guarded statement changed nothing, and the statement then runs once more whether it had to be created or not:
    // under PostgreSQL's READ COMMITTED another writer may have created it (committed its first entry) between our
    // statement and our look, and that entry's account must not make ours a refusal. (`ensure_account` waits for a
    // concurrent creation still in progress, and the second statement sees it.)
    let mut after = change()?;
    if after.is_none() {
        if !account_exists(c, address)? {
            ensure_account(c, address, now)?;
        }
        after = change()?;
    }
    let Some(after) = after else {
        return Err(LedgerError::Insufficient {
            balance: balance(c, address)?,
            needed: Usdc(amount.0.saturating_neg()),
        });
    };
    c.execute(
        "INSERT INTO ledger (account, kind, amount_atomic, balance_after, tx_hash, key_id, note, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![address, kind.as_str(), amount.0, after, tx_hash, key_id, note, now],
    )?;
    Ok(Usdc(after))
}

/// Seats of `pool`/`block` held by subscriptions that have not expired at `now`.
pub fn seats_taken(c: &dyn Sql, pool: &str, block: &str, now: i64) -> Result<u32, StoreError> {
    c.query_value::<i64>(
        "SELECT count(*) FROM seats WHERE pool = ?1 AND block = ?2 AND expires_at > ?3",
        params![pool, block, now],
    )
    .map(|n| n as u32)
}

/// Seats held at `now`, per (pool, block).
pub fn all_seats_taken(c: &dyn Sql, now: i64) -> Result<Vec<(String, String, u32)>, StoreError> {
    c.query_map(
        "SELECT pool, block, count(*) FROM seats WHERE expires_at > ?1 GROUP BY pool, block",
        params![now],
        |r| Ok((r.get(0)?, r.get(1)?, r.get::<i64>(2)? as u32)),
    )
}

/// Stores a new key; returns its row id.
pub fn insert_key(
    c: &dyn Sql,
    key: &NewKey,
    kind: &str,
    account: &str,
    subscription_id: Option<i64>,
    created_by: &str,
    now: i64,
) -> Result<i64, StoreError> {
    c.query_one(
        "INSERT INTO api_keys (public_id, secret_hash, kind, account, subscription_id, created_at, created_by) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        params![key.public_id, key.secret_hash.as_slice(), kind, account, subscription_id, now, created_by],
        |r| r.get(0),
    )
}

/// Stores `key` as the account's credit key unless it already has a live one; returns the new row id, or `None`
/// when the account keeps the key it has. One statement guarded by the unique index of live credit keys, so two
/// concurrent first top-ups can never mint two.
pub fn insert_credit_key_if_none(
    c: &dyn Sql,
    key: &NewKey,
    account: &str,
    created_by: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    c.query_opt(
        "INSERT INTO api_keys (public_id, secret_hash, kind, account, subscription_id, created_at, created_by) \
         VALUES (?1, ?2, 'credit', ?3, NULL, ?4, ?5) \
         ON CONFLICT (account) WHERE kind = 'credit' AND revoked_at IS NULL DO NOTHING RETURNING id",
        params![key.public_id, key.secret_hash.as_slice(), account, now, created_by],
        |r| r.get(0),
    )
}

/// Takes one seat of `pool`/`block` (capacity `seats`) for a subscription until `expires_at`; `false` when the block
/// is sold out at `now`. A seat is a numbered slot taken by one guarded upsert — it succeeds only if the slot is free
/// or its holder has expired — so concurrent claims can never take one seat twice, on any engine.
pub fn take_seat(
    c: &dyn Sql,
    pool: &str,
    block: &str,
    seats: u32,
    subscription_id: i64,
    expires_at: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let held: std::collections::HashSet<i64> = c
        .query_map(
            "SELECT seat_no FROM seat_slots WHERE pool = ?1 AND block = ?2 AND expires_at > ?3",
            params![pool, block, now],
            |r| r.get(0),
        )?
        .into_iter()
        .collect();
    // A capacity lowered below the seats held: sold out until enough expire.
    if held.len() >= seats as usize {
        return Ok(false);
    }
    for seat_no in (1..=i64::from(seats)).filter(|n| !held.contains(n)) {
        let taken = c.execute(
            "INSERT INTO seat_slots (pool, block, seat_no, subscription_id, expires_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (pool, block, seat_no) DO UPDATE SET subscription_id = excluded.subscription_id, \
             expires_at = excluded.expires_at WHERE seat_slots.expires_at <= ?6",
            params![pool, block, seat_no, subscription_id, expires_at, now],
        )?;
        if taken == 1 {
            c.execute(
                "INSERT INTO seats (subscription_id, pool, block, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![subscription_id, pool, block, expires_at],
            )?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// The id of the account's live credit key, if it has one.
pub fn live_credit_key(c: &dyn Sql, account: &str) -> Result<Option<i64>, StoreError> {
    c.query_opt(
        "SELECT id FROM api_keys WHERE account = ?1 AND kind = 'credit' AND revoked_at IS NULL ORDER BY id DESC LIMIT 1",
        params![account],
        |r| r.get(0),
    )
}

/// What a claimed transaction bought.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRecord {
    pub tx_hash: String,
    pub account: String,
    /// `subscription` or `topup`.
    pub kind: String,
    pub paid_usdc: Usdc,
    pub price_usdc: Usdc,
    pub surplus_usdc: Usdc,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub claimed_at: i64,
}

pub fn claim_of(c: &dyn Sql, tx_hash: &str) -> Result<Option<ClaimRecord>, StoreError> {
    c.query_opt(
        "SELECT c.tx_hash, c.account, c.kind, c.paid_atomic, c.price_atomic, c.surplus_atomic, s.pool, s.blocks, \
         s.expires_at, k.public_id, c.claimed_at FROM claims c \
         LEFT JOIN subscriptions s ON s.id = c.subscription_id LEFT JOIN api_keys k ON k.id = c.key_id \
         WHERE c.tx_hash = ?1",
        params![tx_hash],
        |r| {
            let blocks: Option<String> = r.get(7)?;
            Ok(ClaimRecord {
                tx_hash: r.get(0)?,
                account: r.get(1)?,
                kind: r.get(2)?,
                paid_usdc: Usdc(r.get(3)?),
                price_usdc: Usdc(r.get(4)?),
                surplus_usdc: Usdc(r.get(5)?),
                pool: r.get(6)?,
                blocks: blocks.and_then(|b| serde_json::from_str(&b).ok()),
                expires_at: r.get(8)?,
                key_id: r.get(9)?,
                claimed_at: r.get(10)?,
            })
        },
    )
}

/// Confirmed value of a transaction per payer: `(from, sum)`, ordered by payer.
pub fn confirmed_value_by_payer(
    c: &dyn Sql,
    network: &str,
    tx_hash: &str,
) -> Result<Vec<(String, Usdc)>, StoreError> {
    c.query_map(
        "SELECT from_address, sum(value_atomic) FROM transfers WHERE network = ?1 AND tx_hash = ?2 \
         AND status = 'confirmed' GROUP BY from_address ORDER BY from_address",
        params![network, tx_hash],
        |r| Ok((r.get(0)?, Usdc(r.get(1)?))),
    )
}

/// The claim row itself: inserted last in a claim's transaction; `false` when the transaction is already claimed.
#[allow(clippy::too_many_arguments)]
pub fn insert_claim(
    c: &dyn Sql,
    network: &str,
    tx_hash: &str,
    account: &str,
    kind: &str,
    paid: Usdc,
    price: Usdc,
    subscription_id: Option<i64>,
    key_id: Option<i64>,
    signature: Option<&str>,
    now: i64,
) -> Result<bool, StoreError> {
    let changed = c.execute(
        "INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, subscription_id, \
         key_id, signature, claimed_at, network) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
         ON CONFLICT (tx_hash) DO NOTHING",
        params![
            tx_hash,
            account,
            kind,
            paid.0,
            price.0,
            paid.0 - price.0,
            subscription_id,
            key_id,
            signature,
            now,
            network
        ],
    )?;
    Ok(changed == 1)
}

/// A key as operators and audits see it (never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    pub id: i64,
    pub public_id: String,
    pub kind: String,
    pub account: String,
    pub subscription_id: Option<i64>,
    pub pool: Option<String>,
    pub blocks: Option<Vec<String>>,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub created_by: String,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    /// Set while the payment that bought the key is reversed (see `store::reversals`).
    pub suspended_at: Option<i64>,
    /// The purchase (its original claim's tx hash) whose reversal suspended the key.
    pub suspended_by: Option<String>,
}

impl KeyRecord {
    /// Not revoked and not suspended (expiry is checked apart, against the caller's clock).
    pub fn is_live(&self) -> bool {
        self.revoked_at.is_none() && self.suspended_at.is_none()
    }
}

const KEY_SELECT: &str = "SELECT k.id, k.public_id, k.kind, k.account, k.subscription_id, s.pool, s.blocks, \
     s.expires_at, k.created_at, k.created_by, k.revoked_at, k.revoked_reason, k.secret_hash, k.suspended_at, k.suspended_by FROM api_keys k \
     LEFT JOIN subscriptions s ON s.id = k.subscription_id";

fn key_from_row(r: &Row) -> Result<KeyRecord, StoreError> {
    let blocks: Option<String> = r.get(6)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        public_id: r.get(1)?,
        kind: r.get(2)?,
        account: r.get(3)?,
        subscription_id: r.get(4)?,
        pool: r.get(5)?,
        blocks: blocks.and_then(|b| serde_json::from_str(&b).ok()),
        expires_at: r.get(7)?,
        created_at: r.get(8)?,
        created_by: r.get(9)?,
        revoked_at: r.get(10)?,
        revoked_reason: r.get(11)?,
        suspended_at: r.get(13)?,
        suspended_by: r.get(14)?,
    })
}

/// Keys, newest first, optionally of one account.
pub fn list_keys(c: &dyn Sql, account: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
    c.query_map(
        // The CAST types the parameter for PostgreSQL, which cannot infer it from `?1 IS NULL`.
        &format!(
            "{KEY_SELECT} WHERE CAST(?1 AS TEXT) IS NULL OR k.account = ?1 ORDER BY k.id DESC"
        ),
        params![account],
        key_from_row,
    )
}

/// A key by public id, with its stored hash.
pub fn key_by_public_id(
    c: &dyn Sql,
    public_id: &str,
) -> Result<Option<(KeyRecord, Vec<u8>)>, StoreError> {
    c.query_opt(
        &format!("{KEY_SELECT} WHERE k.public_id = ?1"),
        params![public_id],
        |r| Ok((key_from_row(r)?, r.get::<Vec<u8>>(12)?)),
    )
}

/// Revokes a live key; `false` when it does not exist or is already revoked.
pub fn revoke_key(
    c: &dyn Sql,
    id: i64,
    reason: &str,
    replaced_by: Option<i64>,
    now: i64,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE api_keys SET revoked_at = ?2, revoked_reason = ?3, replaced_by = ?4 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, now, reason, replaced_by],
    )?;
    Ok(n == 1)
}

/// Links a rotated key to the key that replaced it.
pub fn set_replaced_by(c: &dyn Sql, id: i64, replaced_by: i64) -> Result<(), StoreError> {
    c.execute(
        "UPDATE api_keys SET replaced_by = ?2 WHERE id = ?1",
        params![id, replaced_by],
    )?;
    Ok(())
}

/// Stores a subscription; returns its row id.
#[allow(clippy::too_many_arguments)]
pub fn insert_subscription(
    c: &dyn Sql,
    account: &str,
    pool: &str,
    blocks: &[String],
    price: Usdc,
    tx_hash: &str,
    starts_at: i64,
    expires_at: i64,
) -> Result<Option<i64>, StoreError> {
    let blocks_json = serde_json::to_string(blocks).unwrap_or_else(|_| "[]".into());
    // A subscription is unique per payment: `None` when another claim of the same payment holds it (several
    // writers; a plain INSERT would abort the whole transaction on PostgreSQL instead of letting it answer).
    c.query_opt(
        "INSERT INTO subscriptions (account, pool, blocks, price_atomic, tx_hash, starts_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tx_hash) DO NOTHING RETURNING id",
        params![account, pool, blocks_json, price.0, tx_hash, starts_at, expires_at],
        |r| r.get(0),
    )
}

/// One row of an account's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerRow {
    pub id: i64,
    pub kind: String,
    pub amount_usdc: Usdc,
    pub balance_after_usdc: Usdc,
    pub tx_hash: Option<String>,
    pub note: Option<String>,
    pub created_at: i64,
}

pub fn ledger_of(c: &dyn Sql, account: &str) -> Result<Vec<LedgerRow>, StoreError> {
    c.query_map(
        "SELECT id, kind, amount_atomic, balance_after, tx_hash, note, created_at FROM ledger WHERE account = ?1 \
         ORDER BY id",
        params![account],
        |r| {
            Ok(LedgerRow {
                id: r.get(0)?,
                kind: r.get(1)?,
                amount_usdc: Usdc(r.get(2)?),
                balance_after_usdc: Usdc(r.get(3)?),
                tx_hash: r.get(4)?,
                note: r.get(5)?,
                created_at: r.get(6)?,
            })
        },
    )
}

/// Claims of an account, oldest first.
pub fn claims_of_account(c: &dyn Sql, account: &str) -> Result<Vec<ClaimRecord>, StoreError> {
    // Claims of one second are ordered by tx hash (the primary key), the same on every engine.
    let hashes: Vec<String> = c.query_map(
        "SELECT tx_hash FROM claims WHERE account = ?1 ORDER BY claimed_at, tx_hash",
        params![account],
        |r| r.get(0),
    )?;
    let mut out = Vec::with_capacity(hashes.len());
    for h in hashes {
        if let Some(c) = claim_of(c, &h)? {
            out.push(c);
        }
    }
    Ok(out)
}

pub fn account_exists(c: &dyn Sql, address: &str) -> Result<bool, StoreError> {
    Ok(c.query_opt(
        "SELECT 1 FROM accounts WHERE address = ?1",
        params![address],
        |_| Ok(()),
    )?
    .is_some())
}

/// Records a used rotation message; `false` when (account, signed_at) was used before.
pub fn use_rotation_nonce(
    c: &dyn Sql,
    account: &str,
    signed_at: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "INSERT INTO rotation_nonces (account, signed_at, used_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![account, signed_at, now],
    )?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    const A: &str = "0xaaaa";

    fn ledger(c: &dyn Sql, kind: LedgerKind, amount: i64) -> Result<Usdc, LedgerError> {
        append_ledger(c, A, kind, Usdc(amount), None, None, None, 0)
    }

    fn row_count(c: &dyn Sql) -> i64 {
        c.query_value("SELECT count(*) FROM ledger", params![])
            .unwrap()
    }

    #[tokio::test]
    async fn a_debit_is_one_guarded_statement_and_the_balance_column_follows_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("g.db")).unwrap();
        store
            .write(|c| -> Result<_, StoreError> {
                assert_eq!(ledger(c, LedgerKind::Topup, 10).unwrap(), Usdc(10));
                // Over the balance: refused, nothing written.
                let refused = ledger(c, LedgerKind::Debit, -11).unwrap_err();
                assert!(matches!(
                    refused,
                    LedgerError::Insufficient {
                        balance: Usdc(10),
                        needed: Usdc(11)
                    }
                ));
                assert_eq!(row_count(c), 1);
                assert_eq!(ledger(c, LedgerKind::Debit, -10).unwrap(), Usdc(0));
                // A reversal may go below zero; then no debit passes, not even 1.
                assert_eq!(ledger(c, LedgerKind::Reversal, -5).unwrap(), Usdc(-5));
                assert!(ledger(c, LedgerKind::Debit, -1).is_err());
                assert_eq!(ledger(c, LedgerKind::Topup, 7).unwrap(), Usdc(2));
                // An overflow is refused, not wrapped or turned into a float.
                assert!(ledger(c, LedgerKind::Grant, i64::MAX).is_err());
                let (last, sum): (i64, i64) = c.query_one(
                    "SELECT (SELECT balance_after FROM ledger ORDER BY id DESC LIMIT 1), \
                     (SELECT sum(amount_atomic) FROM ledger)",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                assert_eq!((balance(c, A)?, last, sum), (Usdc(2), 2, 2));
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn one_live_credit_key_per_account_is_a_unique_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        store
            .write(|c| -> Result<_, StoreError> {
                ensure_account(c, A, 0)?;
                let first = crate::keys::generate().unwrap();
                let second = crate::keys::generate().unwrap();
                let id = insert_credit_key_if_none(c, &first, A, "claim", 0)?.unwrap();
                assert_eq!(insert_credit_key_if_none(c, &second, A, "claim", 0)?, None);
                // Even a plain insert cannot make a second live credit key: the database refuses it.
                assert!(insert_key(c, &second, "credit", A, None, "claim", 0).is_err());
                assert!(revoke_key(c, id, "rotated", None, 0)?);
                assert!(insert_credit_key_if_none(c, &second, A, "rotation", 0)?.is_some());
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_seat_is_a_slot_taken_once_until_its_holder_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store
            .write(|c| -> Result<_, StoreError> {
                ensure_account(c, A, 0)?;
                let blocks = vec!["asia".to_string()];
                let sub = |tx: &str, expires: i64| {
                    insert_subscription(c, A, "p", &blocks, Usdc(1), tx, 0, expires)
                };
                let (s1, s2, s3) = (
                    sub("0x1", 100)?.unwrap(),
                    sub("0x2", 200)?.unwrap(),
                    sub("0x3", 300)?.unwrap(),
                );
                assert!(take_seat(c, "p", "asia", 2, s1, 100, 0)?);
                assert!(take_seat(c, "p", "asia", 2, s2, 200, 0)?);
                assert!(!take_seat(c, "p", "asia", 2, s3, 300, 0)?, "sold out");
                // The same slot cannot be taken over while its holder lives, whatever the caller believes.
                let stolen = c.execute(
                    "INSERT INTO seat_slots (pool, block, seat_no, subscription_id, expires_at) \
                     VALUES ('p', 'asia', 1, ?1, 300) ON CONFLICT (pool, block, seat_no) DO UPDATE SET \
                     subscription_id = excluded.subscription_id WHERE seat_slots.expires_at <= 50",
                    params![s3],
                )?;
                assert_eq!(stolen, 0);
                // At 150 the first holder has expired: its slot is free again.
                assert!(take_seat(c, "p", "asia", 2, s3, 300, 150)?);
                assert_eq!(seats_taken(c, "p", "asia", 150)?, 2);
                Ok(())
            })
            .await
            .unwrap();
    }
}
