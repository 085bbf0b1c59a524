//! Reversals of claimed payments that a reorg removed, and their restores (issue 13, hole 8).
//!
//! This module owns the `claim_reversals` table, the `suspended_*` columns of `api_keys` and the `reversal` /
//! `reinstatement` ledger rows. A **purchase** is a claim row and its copies (an x402 settlement that was
//! re-submitted, or adopted from the payer's own transaction, has one claim row per transaction; the copies name
//! the original in `origin_tx`). Its state follows from the index:
//!
//! - **reversed** when the index holds transfers of its transactions and every one is `orphaned`: its credits
//!   (price + surplus of a top-up, surplus of a subscription) are taken back with one `reversal` row, which may take
//!   the balance below zero; the keys of its subscription are suspended (credit keys are per account and funded by
//!   other payments too: the lower balance is what stops them). A suspended subscription keeps its seats until it
//!   is restored or expires, so a restore can never oversell a block.
//! - **restored** when a reversed purchase has a `confirmed` transfer again (the same transaction mined again, or a
//!   re-submission): a `reinstatement` row gives the same amount back and the keys this reversal suspended are
//!   unsuspended (a key revoked for another reason stays revoked).
//!
//! [`reconcile_tx`] runs inside the indexer's write that changed a transfer's status, so the status change and
//! its money effects commit together. Every step is guarded by the purchase's last `claim_reversals` row (odd
//! `seq` = reversed, even = restored, `(claim_tx, seq)` unique): running it again, after a crash or a restart,
//! changes nothing.

use serde::Serialize;

use super::StoreError;
use super::billing::{LedgerError, LedgerKind, append_ledger};
use super::sql::{Row, Sql};
use crate::params;
use crate::usdc::Usdc;

/// What a reconcile did to one purchase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReversalEvent {
    /// Tx hash of the purchase's original claim.
    pub claim_tx: String,
    /// `reversed` or `restored`.
    pub kind: String,
    pub account: String,
    pub amount_usdc: Usdc,
    pub cause: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_hash: Option<String>,
    pub at: i64,
}

/// The original claim's tx hash of the purchase that `tx_hash` is a claim of, if it is claimed.
pub fn origin_of(c: &dyn Sql, tx_hash: &str) -> Result<Option<String>, StoreError> {
    c.query_opt(
        "SELECT coalesce(origin_tx, tx_hash) FROM claims WHERE tx_hash = ?1",
        params![tx_hash],
        |r| r.get(0),
    )
}

/// Whether the purchase is reversed now (its last event is `reversed`).
pub fn is_reversed(c: &dyn Sql, origin: &str) -> Result<bool, StoreError> {
    Ok(last_seq(c, origin)? % 2 == 1)
}

fn last_seq(c: &dyn Sql, origin: &str) -> Result<i64, StoreError> {
    c.query_value(
        "SELECT coalesce(max(seq), 0) FROM claim_reversals WHERE claim_tx = ?1",
        params![origin],
    )
}

/// What the index says about a purchase's transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// A transaction of it is confirmed.
    Confirmed,
    /// Every indexed transfer of it is orphaned (and there is at least one).
    Gone,
    /// Seen but not confirmed yet, or not indexed at all: no change either way.
    Undecided,
}

/// The transactions of a purchase: its original claim's and its copies'.
fn transactions(c: &dyn Sql, origin: &str) -> Result<Vec<String>, StoreError> {
    c.query_map(
        "SELECT tx_hash FROM claims WHERE tx_hash = ?1 UNION SELECT tx_hash FROM claims WHERE origin_tx = ?1",
        params![origin],
        |r| r.get(0),
    )
}

fn backing(c: &dyn Sql, origin: &str) -> Result<(Backing, Option<String>), StoreError> {
    let (mut all, mut live) = (0i64, 0i64);
    for tx in transactions(c, origin)? {
        // `CASE … THEN 1 ELSE 0`, not a summed comparison: PostgreSQL has no sum() of booleans.
        let (n, l, confirmed): (i64, i64, i64) = c.query_one(
            "SELECT count(*), coalesce(sum(CASE WHEN status <> 'orphaned' THEN 1 ELSE 0 END), 0), \
             coalesce(sum(CASE WHEN status = 'confirmed' THEN 1 ELSE 0 END), 0) FROM transfers \
             WHERE tx_hash = ?1 AND network = (SELECT network FROM claims WHERE tx_hash = ?1)",
            params![tx],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if confirmed > 0 {
            return Ok((Backing::Confirmed, Some(tx)));
        }
        all += n;
        live += l;
    }
    Ok(if all > 0 && live == 0 {
        (Backing::Gone, None)
    } else {
        (Backing::Undecided, None)
    })
}

/// The purchase's account, its credits (what a reversal takes back) and its subscription.
fn purchase(c: &dyn Sql, origin: &str) -> Result<Option<(String, Usdc, Option<i64>)>, StoreError> {
    c.query_opt(
        "SELECT account, kind, paid_atomic, surplus_atomic, subscription_id FROM claims WHERE tx_hash = ?1",
        params![origin],
        |r| {
            let kind: String = r.get(1)?;
            let paid: i64 = r.get(2)?;
            let surplus: i64 = r.get(3)?;
            // A top-up credited its price and its surplus (= what it paid); a subscription only its surplus.
            let credits = if kind == "topup" { paid } else { surplus };
            Ok((r.get(0)?, Usdc(credits), r.get(4)?))
        },
    )
}

fn ledger_error(e: LedgerError) -> StoreError {
    match e {
        LedgerError::Store(e) => e,
        // Only a debit can be refused; a reversal or reinstatement never is (an overflow of i64 aside).
        other => StoreError::Task(other.to_string()),
    }
}

fn record(c: &dyn Sql, origin: &str, seq: i64, ev: &ReversalEvent) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO claim_reversals (claim_tx, seq, kind, account, amount_atomic, cause, tx_hash, at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            origin,
            seq,
            ev.kind,
            ev.account,
            ev.amount_usdc.atomic(),
            ev.cause,
            ev.tx_hash,
            ev.at
        ],
    )?;
    Ok(())
}

/// Reverses the purchase unless it is reversed already. `cause`: `reorg`, `settlement_failed`.
///
/// Takes a SQLite `Connection` until `billing::append_ledger` takes `&dyn Sql`; its own statements already run
/// through [`Sql`].
pub fn reverse(
    c: &dyn Sql,
    origin: &str,
    cause: &str,
    now: i64,
) -> Result<Option<ReversalEvent>, StoreError> {
    // Read the last step, then write the next: one reconciler at a time (see `serialize_index_writes`).
    super::transfers::serialize_index_writes(c)?;
    let seq = last_seq(c, origin)?;
    if seq % 2 == 1 {
        return Ok(None);
    }
    let Some((account, credits, subscription)) = purchase(c, origin)? else {
        return Ok(None);
    };
    if credits > Usdc::ZERO {
        append_ledger(
            c,
            &account,
            LedgerKind::Reversal,
            Usdc(-credits.atomic()),
            Some(origin),
            None,
            Some("claim reversed: its payment left the canonical chain"),
            now,
        )
        .map_err(ledger_error)?;
    }
    if let Some(sub) = subscription {
        c.execute(
            "UPDATE api_keys SET suspended_at = ?2, suspended_by = ?3 WHERE subscription_id = ?1 \
             AND suspended_at IS NULL",
            params![sub, now, origin],
        )?;
    }
    let ev = ReversalEvent {
        claim_tx: origin.to_string(),
        kind: "reversed".into(),
        account,
        amount_usdc: credits,
        cause: cause.to_string(),
        tx_hash: None,
        at: now,
    };
    record(c, origin, seq + 1, &ev)?;
    tracing::warn!(claim = %origin, account = %ev.account, credits = %credits, %cause, "claimed payment reversed: its transaction left the canonical chain");
    Ok(Some(ev))
}

/// Restores a reversed purchase; `by` is the confirmed transaction that backs it again.
///
/// Takes a SQLite `Connection` until `billing::append_ledger` takes `&dyn Sql`.
pub fn restore(
    c: &dyn Sql,
    origin: &str,
    by: &str,
    now: i64,
) -> Result<Option<ReversalEvent>, StoreError> {
    // Read the last step, then write the next: one reconciler at a time (see `serialize_index_writes`).
    super::transfers::serialize_index_writes(c)?;
    let seq = last_seq(c, origin)?;
    if seq % 2 == 0 {
        return Ok(None);
    }
    // Exactly what the reversal took back, not what the claim says now.
    let (account, amount): (String, i64) = c.query_one(
        "SELECT account, amount_atomic FROM claim_reversals WHERE claim_tx = ?1 AND seq = ?2",
        params![origin, seq],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if amount > 0 {
        append_ledger(
            c,
            &account,
            LedgerKind::Reinstatement,
            Usdc(amount),
            Some(origin),
            None,
            Some("claim restored: its payment is confirmed again"),
            now,
        )
        .map_err(ledger_error)?;
    }
    c.execute(
        "UPDATE api_keys SET suspended_at = NULL, suspended_by = NULL WHERE suspended_by = ?1",
        params![origin],
    )?;
    let ev = ReversalEvent {
        claim_tx: origin.to_string(),
        kind: "restored".into(),
        account,
        amount_usdc: Usdc(amount),
        cause: "confirmed_again".into(),
        tx_hash: Some(by.to_string()),
        at: now,
    };
    record(c, origin, seq + 1, &ev)?;
    tracing::info!(claim = %origin, account = %ev.account, credits = %ev.amount_usdc, tx = %by, "reversed claim restored: its payment is confirmed again");
    Ok(Some(ev))
}

/// Brings one purchase in line with the index: reverses it when all its transfers are orphaned, restores it when
/// one is confirmed again, else leaves it.
///
/// Takes a SQLite `Connection` because [`reverse`] and [`restore`] still do.
pub fn reconcile_origin(
    c: &dyn Sql,
    origin: &str,
    now: i64,
) -> Result<Option<ReversalEvent>, StoreError> {
    match backing(c, origin)? {
        (Backing::Gone, _) => reverse(c, origin, "reorg", now),
        (Backing::Confirmed, Some(by)) => restore(c, origin, &by, now),
        _ => Ok(None),
    }
}

/// [`reconcile_origin`] for the purchase `tx_hash` is a claim of, if any: called for every transfer whose status
/// changed, in the same transaction.
///
/// Takes a SQLite `Connection` because [`reconcile_origin`] still does.
pub fn reconcile_tx(
    c: &dyn Sql,
    network: &str,
    tx_hash: &str,
    now: i64,
) -> Result<Option<ReversalEvent>, StoreError> {
    // A transfer of another network with the same hash is no payment of this claim.
    let origin: Option<String> = c.query_opt(
        "SELECT coalesce(origin_tx, tx_hash) FROM claims WHERE tx_hash = ?1 AND network = ?2",
        params![tx_hash, network],
        |r| r.get(0),
    )?;
    match origin {
        Some(origin) => reconcile_origin(c, &origin, now),
        None => Ok(None),
    }
}

/// Reconciles every purchase (at start-up: a database written before reversals existed, or by `index` alone),
/// in the order they were claimed.
///
/// Takes a SQLite `Connection` because [`reconcile_origin`] still does.
pub fn reconcile_all(c: &dyn Sql, now: i64) -> Result<Vec<ReversalEvent>, StoreError> {
    // `claims` has no id column (its key is the tx hash): claim time, then the key, is an order both engines have.
    let origins: Vec<String> = c.query_map(
        "SELECT tx_hash FROM claims WHERE origin_tx IS NULL ORDER BY claimed_at, tx_hash",
        params![],
        |r| r.get(0),
    )?;
    let mut out = Vec::new();
    for o in origins {
        if let Some(ev) = reconcile_origin(c, &o, now)? {
            out.push(ev);
        }
    }
    Ok(out)
}

/// Whether the account has credits from anything but the purchase `origin` that are not reversed: other
/// claims with credits, or operator grants. A credit key funded that way must not be revoked with this purchase.
pub fn other_funding(c: &dyn Sql, account: &str, origin: &str) -> Result<bool, StoreError> {
    let grants = c
        .query_opt(
            "SELECT 1 FROM ledger WHERE account = ?1 AND kind = 'grant' LIMIT 1",
            params![account],
            |_| Ok(()),
        )?
        .is_some();
    if grants {
        return Ok(true);
    }
    Ok(c.query_opt(
        "SELECT 1 FROM claims cl WHERE cl.account = ?1 AND cl.origin_tx IS NULL AND cl.tx_hash <> ?2 \
         AND (cl.kind = 'topup' OR cl.surplus_atomic > 0) \
         AND coalesce((SELECT max(seq) FROM claim_reversals r WHERE r.claim_tx = cl.tx_hash), 0) % 2 = 0 LIMIT 1",
        params![account, origin],
        |_| Ok(()),
    )?
    .is_some())
}

/// Every reversal and restore, oldest first.
pub fn list(c: &dyn Sql) -> Result<Vec<ReversalEvent>, StoreError> {
    c.query_map(&select(""), params![], event)
}

/// The reversals and restores of one purchase (its original claim's tx hash), oldest first.
pub fn of_purchase(c: &dyn Sql, origin: &str) -> Result<Vec<ReversalEvent>, StoreError> {
    c.query_map(&select("WHERE claim_tx = ?1 "), params![origin], event)
}

fn select(filter: &str) -> String {
    format!(
        "SELECT claim_tx, kind, account, amount_atomic, cause, tx_hash, at FROM claim_reversals {filter}ORDER BY id"
    )
}

fn event(r: &Row) -> Result<ReversalEvent, StoreError> {
    Ok(ReversalEvent {
        claim_tx: r.get(0)?,
        kind: r.get(1)?,
        account: r.get(2)?,
        amount_usdc: Usdc(r.get(3)?),
        cause: r.get(4)?,
        tx_hash: r.get(5)?,
        at: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::billing::{balance, ensure_account, insert_claim};
    use crate::store::{Store, StoreError};

    const A: &str = "0xaaaa";
    const TX: &str = "0x01";

    fn transfer(c: &dyn Sql, status: &str, block_hash: &str) -> Result<(), StoreError> {
        c.execute(
            "INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, from_address, to_address, \
             value_atomic, status, first_seen_at) VALUES (?1, 0, 1, ?2, ?3, '0xbb', 10, ?4, 0)",
            params![TX, block_hash, A, status],
        )?;
        Ok(())
    }

    /// A database at migration 4 with a ledger, a failed x402 settlement and a re-submitted one is upgraded: the
    /// ledger keeps its rows and stays append-only, the re-submitted copy names its original, and the start-up
    /// reconcile reverses only the purchase whose every transaction is gone.
    #[tokio::test]
    async fn upgrade_keeps_the_ledger_links_resubmissions_and_reverses_only_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            for m in crate::store::migrations(crate::store::SCHEMA_SQL)
                .unwrap()
                .iter()
                .take(4)
            {
                c.execute_batch(&m.sql).unwrap();
            }
            c.pragma_update(None, "user_version", 4).unwrap();
            ensure_account(&c, A, 0).unwrap();
            let s: &dyn Sql = &c;
            for (tx, status, block) in [
                ("0x0a", "orphaned", "0xb1"),
                ("0x0b", "orphaned", "0xb2"),
                ("0x0c", "confirmed", "0xb3"),
            ] {
                s.execute(
                    "INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, from_address, to_address, \
                     value_atomic, status, first_seen_at) VALUES (?1, 0, 1, ?2, ?3, '0xbb', 10, ?4, 0)",
                    params![tx, block, A, status],
                )
                .unwrap();
            }
            // 0x0a: credits, re-submitted as 0x0c (confirmed). 0x0b: credits, re-submission failed.
            for tx in ["0x0a", "0x0b"] {
                s.execute(
                    "INSERT INTO ledger (account, kind, amount_atomic, balance_after, tx_hash, created_at) \
                     VALUES (?1, 'topup', 10, (SELECT coalesce(sum(amount_atomic), 0) + 10 FROM ledger), ?2, 0)",
                    params![A, tx],
                )
                .unwrap();
                // A schema-4 claim row (no network column yet).
                s.execute(
                    "INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, \
                     claimed_at) VALUES (?1, ?2, 'topup', 10, 10, 0, 0)",
                    params![tx, A],
                )
                .unwrap();
                s.execute(
                    "INSERT INTO x402_settlements (tx_hash, payer, nonce, x402_version, authorization, signature, \
                     requirements, resource, product, amount_atomic, status, settled_at, updated_at) \
                     VALUES (?1, ?2, ?1, 2, '{}', '0x', '{}', 'r', 'credits', 10, 'settled', 0, 0)",
                    params![tx, A],
                )
                .unwrap();
            }
            c.execute_batch(
                "INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, claimed_at) \
                 SELECT '0x0c', account, kind, paid_atomic, price_atomic, surplus_atomic, 1 FROM claims \
                 WHERE tx_hash = '0x0a';
                 UPDATE x402_settlements SET tx_hash = '0x0c' WHERE nonce = '0x0a';
                 INSERT INTO x402_events (settlement_id, kind, tx_hash, at) VALUES (1, 'reorged', '0x0a', 1);
                 INSERT INTO x402_events (settlement_id, kind, tx_hash, at) VALUES (1, 'resubmitted', '0x0c', 1);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        store
            .write(|c| -> Result<(), StoreError> {
                assert_eq!(balance(c, A)?, Usdc(20));
                assert_eq!(origin_of(c, "0x0c")?.as_deref(), Some("0x0a"));
                let done = reconcile_all(c, 5)?;
                assert_eq!(done.len(), 1, "{done:?}");
                assert_eq!(done[0].claim_tx, "0x0b");
                assert_eq!(balance(c, A)?, Usdc(10));
                assert!(
                    c.execute("UPDATE ledger SET amount_atomic = 0", params![])
                        .is_err()
                );
                assert!(c.execute("DELETE FROM ledger", params![]).is_err());
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_credit_key_is_funded_by_other_live_claims_or_grants_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("f.db")).unwrap();
        store
            .write(|c| -> Result<(), StoreError> {
                ensure_account(c, A, 0)?;
                insert_claim(c, "", TX, A, "topup", Usdc(10), Usdc(10), None, None, None, 0)?;
                assert!(!other_funding(c, A, TX)?, "only this purchase");
                // Another top-up funds it, until that one is reversed too.
                insert_claim(c, "", "0x02", A, "topup", Usdc(10), Usdc(10), None, None, None, 0)?;
                assert!(other_funding(c, A, TX)?);
                c.execute(
                    "INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, from_address, \
                     to_address, value_atomic, status, first_seen_at) VALUES ('0x02', 0, 1, '0xb9', ?1, '0xbb', \
                     10, 'orphaned', 0)",
                    params![A],
                )?;
                assert!(reconcile_tx(c, "", "0x02", 1)?.is_some());
                assert!(!other_funding(c, A, TX)?);
                // An operator grant funds it.
                append_ledger(c, A, LedgerKind::Grant, Usdc(1), None, None, None, 2)
                    .map_err(ledger_error)?;
                assert!(other_funding(c, A, TX)?);
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn reverses_below_zero_once_refuses_debits_and_restores_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db")).unwrap();
        store
            .write(|c| -> Result<(), StoreError> {
                ensure_account(c, A, 0)?;
                transfer(c, "confirmed", "0xb1")?;
                append_ledger(c, A, LedgerKind::Topup, Usdc(10), Some(TX), None, None, 0)
                    .map_err(ledger_error)?;
                insert_claim(c, "", TX, A, "topup", Usdc(10), Usdc(10), None, None, None, 0)?;
                // Spent 4 of it.
                append_ledger(c, A, LedgerKind::Debit, Usdc(-4), None, None, None, 0)
                    .map_err(ledger_error)?;
                assert_eq!(reconcile_tx(c, "", TX, 1)?, None, "confirmed: nothing to do");

                c.execute("UPDATE transfers SET status = 'orphaned' WHERE tx_hash = ?1", params![TX])?;
                let ev = reconcile_tx(c, "", TX, 2)?.expect("reversed");
                assert_eq!((ev.kind.as_str(), ev.amount_usdc), ("reversed", Usdc(10)));
                assert_eq!(balance(c, A)?, Usdc(-4));
                assert!(is_reversed(c, TX)?);
                // Again (a retry, a restart): nothing more.
                assert_eq!(reconcile_tx(c, "", TX, 3)?, None);
                assert_eq!(reverse(c, TX, "settlement_failed", 3)?, None);
                assert_eq!(reconcile_all(c, 3)?, vec![]);
                assert_eq!(balance(c, A)?, Usdc(-4));
                // No debit below zero, not even of nothing; credits may leave it negative.
                assert!(matches!(
                    append_ledger(c, A, LedgerKind::Debit, Usdc(-1), None, None, None, 3),
                    Err(LedgerError::Insufficient { .. })
                ));
                assert!(matches!(
                    append_ledger(c, A, LedgerKind::Debit, Usdc(0), None, None, None, 3),
                    Err(LedgerError::Insufficient { .. })
                ));
                // The database refuses such a debit too.
                assert!(
                    c.execute(
                        "INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at) \
                         VALUES (?1, 'debit', -1, -5, 0)",
                        params![A],
                    )
                    .is_err()
                );
                assert_eq!(
                    append_ledger(c, A, LedgerKind::Refund, Usdc(1), None, None, None, 3)
                        .map_err(ledger_error)?,
                    Usdc(-3)
                );

                // Mined again: seen restores nothing, confirmed restores once.
                transfer(c, "seen", "0xb2")?;
                assert_eq!(reconcile_tx(c, "", TX, 4)?, None);
                c.execute("UPDATE transfers SET status = 'confirmed' WHERE block_hash = '0xb2'", params![])?;
                let ev = reconcile_tx(c, "", TX, 5)?.expect("restored");
                assert_eq!((ev.kind.as_str(), ev.amount_usdc), ("restored", Usdc(10)));
                assert_eq!(balance(c, A)?, Usdc(7));
                assert_eq!(reconcile_tx(c, "", TX, 6)?, None);
                assert_eq!(restore(c, TX, TX, 6)?, None);
                assert_eq!(list(c)?.len(), 2);
                // Two reversals in a row are impossible in the table itself.
                assert!(
                    c.execute(
                        "INSERT INTO claim_reversals (claim_tx, seq, kind, account, amount_atomic, cause, at) \
                         VALUES (?1, 2, 'reversed', ?2, 1, 'x', 0)",
                        params![TX, A],
                    )
                    .is_err()
                );
                Ok(())
            })
            .await
            .unwrap();
    }
}
