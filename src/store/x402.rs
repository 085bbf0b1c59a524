//! SQL of standard x402 payments: settlements (for linking and reorg handling), their events, and the
//! `payment-identifier` answers. Functions take a connection: callers compose them inside one transaction.

use super::StoreError;
use super::sql::{Row, Sql};
use crate::params;

/// A settlement to record.
#[derive(Debug, Clone)]
pub struct NewSettlement<'a> {
    /// CAIP-2 id of the network it was settled on.
    pub network: &'a str,
    pub tx_hash: &'a str,
    pub payer: &'a str,
    pub nonce: &'a str,
    pub x402_version: u32,
    pub authorization: &'a str,
    pub signature: &'a str,
    pub requirements: &'a str,
    pub resource: &'a str,
    /// `credits`, `subscription` or `request`.
    pub product: &'a str,
    pub amount_atomic: i64,
    pub key_id: Option<i64>,
    pub now: i64,
}

/// A recorded settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRow {
    pub id: i64,
    pub tx_hash: String,
    pub payer: String,
    pub nonce: String,
    pub x402_version: u32,
    pub authorization: String,
    pub signature: String,
    pub requirements: String,
    pub resource: String,
    pub product: String,
    pub amount_atomic: i64,
    pub key_id: Option<i64>,
    pub status: String,
}

/// `authorization` is a reserved word in PostgreSQL: quoted (SQLite takes the quoted name too).
const COLUMNS: &str = "id, tx_hash, payer, nonce, x402_version, \"authorization\", signature, requirements, \
                       resource, product, amount_atomic, key_id, status";

fn row(r: &Row) -> Result<SettlementRow, StoreError> {
    Ok(SettlementRow {
        id: r.get(0)?,
        tx_hash: r.get(1)?,
        payer: r.get(2)?,
        nonce: r.get(3)?,
        x402_version: r.get(4)?,
        authorization: r.get(5)?,
        signature: r.get(6)?,
        requirements: r.get(7)?,
        resource: r.get(8)?,
        product: r.get(9)?,
        amount_atomic: r.get(10)?,
        key_id: r.get(11)?,
        status: r.get(12)?,
    })
}

/// Records a settlement; returns its id.
pub fn insert_settlement(c: &dyn Sql, s: &NewSettlement<'_>) -> Result<i64, StoreError> {
    c.query_value(
        "INSERT INTO x402_settlements (tx_hash, payer, nonce, x402_version, \"authorization\", signature, \
         requirements, resource, product, amount_atomic, key_id, status, settled_at, updated_at, network) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'settled', ?12, ?12, ?13) RETURNING id",
        params![
            s.tx_hash,
            s.payer,
            s.nonce,
            s.x402_version,
            s.authorization,
            s.signature,
            s.requirements,
            s.resource,
            s.product,
            s.amount_atomic,
            s.key_id,
            s.now,
            s.network
        ],
    )
}

/// The settlement whose current transaction is `tx_hash`.
pub fn settlement_by_tx(c: &dyn Sql, tx_hash: &str) -> Result<Option<SettlementRow>, StoreError> {
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM x402_settlements WHERE tx_hash = ?1"),
        params![tx_hash],
        row,
    )
}

/// All settlements, oldest first.
pub fn list_settlements(c: &dyn Sql) -> Result<Vec<SettlementRow>, StoreError> {
    c.query_map(
        &format!("SELECT {COLUMNS} FROM x402_settlements ORDER BY id"),
        params![],
        row,
    )
}

/// Live settlements whose transaction the indexer has seen and that are now only orphaned (reorged out and not
/// mined again).
pub fn orphaned_settlements(c: &dyn Sql, network: &str) -> Result<Vec<SettlementRow>, StoreError> {
    c.query_map(
        &format!(
            "SELECT {COLUMNS} FROM x402_settlements s WHERE s.status = 'settled' AND s.network = ?1 \
             AND EXISTS (SELECT 1 FROM transfers t WHERE t.network = ?1 AND t.tx_hash = s.tx_hash) \
             AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.network = ?1 AND t.tx_hash = s.tx_hash \
             AND t.status <> 'orphaned') ORDER BY s.id"
        ),
        params![network],
        row,
    )
}

/// Points a settlement at a new transaction (a re-submission of the same authorization).
pub fn replace_tx(c: &dyn Sql, id: i64, tx_hash: &str, now: i64) -> Result<(), StoreError> {
    c.execute(
        "UPDATE x402_settlements SET tx_hash = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, tx_hash, now],
    )?;
    Ok(())
}

/// Marks a settlement failed (its transfer is gone and could not be re-submitted).
pub fn mark_failed(c: &dyn Sql, id: i64, now: i64) -> Result<(), StoreError> {
    c.execute(
        "UPDATE x402_settlements SET status = 'failed', updated_at = ?2 WHERE id = ?1",
        params![id, now],
    )?;
    Ok(())
}

/// Appends an event of a settlement.
pub fn insert_event(
    c: &dyn Sql,
    settlement_id: i64,
    kind: &str,
    tx_hash: Option<&str>,
    detail: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO x402_events (settlement_id, kind, tx_hash, detail, at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![settlement_id, kind, tx_hash, detail, now],
    )?;
    Ok(())
}

/// One event of a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub settlement_id: i64,
    pub kind: String,
    pub tx_hash: Option<String>,
    pub detail: Option<String>,
}

/// All events, oldest first.
pub fn list_events(c: &dyn Sql) -> Result<Vec<EventRow>, StoreError> {
    c.query_map(
        "SELECT settlement_id, kind, tx_hash, detail FROM x402_events ORDER BY id",
        params![],
        |r| {
            Ok(EventRow {
                settlement_id: r.get(0)?,
                kind: r.get(1)?,
                tx_hash: r.get(2)?,
                detail: r.get(3)?,
            })
        },
    )
}

/// The stored answer for a payment-identifier: `(payload_hash, encrypted response)`.
pub fn idempotent_answer(
    c: &dyn Sql,
    id_hash: &str,
) -> Result<Option<(String, Vec<u8>)>, StoreError> {
    c.query_opt(
        "SELECT payload_hash, response FROM x402_idempotency WHERE id_hash = ?1",
        params![id_hash],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Stores the answer for a payment-identifier unless one is stored already; `false` then.
pub fn store_idempotent_answer(
    c: &dyn Sql,
    id_hash: &str,
    payload_hash: &str,
    response: &[u8],
    now: i64,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "INSERT INTO x402_idempotency (id_hash, payload_hash, response, created_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (id_hash) DO NOTHING",
        params![id_hash, payload_hash, response, now],
    )?;
    Ok(n == 1)
}

/// Links another transaction of the same payment to its claim: a copy of `old`'s claim row keyed by `new`, so the
/// re-submitted transfer can never be claimed by txHash either. The copy names the purchase's original claim
/// (`origin_tx`), so a confirmation of `new` restores a purchase that was reversed when `old` left the chain.
/// `false` when `new` already has a claim.
pub fn link_claim(c: &dyn Sql, old: &str, new: &str, now: i64) -> Result<bool, StoreError> {
    let n = c.execute(
        "INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, subscription_id, \
         key_id, signature, claimed_at, origin_tx, network) SELECT ?2, account, kind, paid_atomic, price_atomic, \
         surplus_atomic, subscription_id, key_id, signature, ?3, coalesce(origin_tx, tx_hash), network FROM claims \
         WHERE tx_hash = ?1 ON CONFLICT (tx_hash) DO NOTHING",
        params![old, new, now],
    )?;
    Ok(n == 1)
}

/// Indexed, not orphaned, unclaimed transactions with a transfer of exactly `value` from `from` to `to`: where a
/// payer may have used a settlement's authorization themselves. Newest first.
pub fn adoption_candidates(
    c: &dyn Sql,
    network: &str,
    from: &str,
    to: &str,
    value: i64,
) -> Result<Vec<String>, StoreError> {
    c.query_map(
        "SELECT t.tx_hash FROM transfers t WHERE t.from_address = ?1 AND t.to_address = ?2 \
         AND t.value_atomic = ?3 AND t.status <> 'orphaned' AND t.network = ?4 \
         AND NOT EXISTS (SELECT 1 FROM claims c WHERE c.tx_hash = t.tx_hash) GROUP BY t.tx_hash \
         ORDER BY max(t.id) DESC LIMIT 16",
        params![from, to, value, network],
        |r| r.get(0),
    )
}

/// A settlement the reorg watcher could not settle again: what is needed to take its purchase back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedResettlement {
    pub settlement_id: i64,
    /// The transaction the reorg removed.
    pub tx_hash: String,
    /// The key minted from the payment, if any.
    pub key_id: Option<i64>,
    /// `credits`, `subscription` or `request`.
    pub product: String,
    pub payer: String,
    /// `code: reason`, recorded with the `suspended` event.
    pub detail: String,
}

/// The reorg watcher's whole operations: each is one write transaction, so a settlement's events, its new
/// transaction, its claim copy and the purchase's reversal state always commit together.
impl super::Store {
    /// The stored answer for a payment-identifier (by the SHA-256 of the id): `(payload_hash, encrypted response)`.
    pub async fn x402_idempotent_answer(
        &self,
        id_hash: String,
    ) -> Result<Option<(String, Vec<u8>)>, super::StoreError> {
        self.read(move |c| idempotent_answer(c, &id_hash)).await
    }

    /// Stores the answer for a payment-identifier unless one is stored already (`false` then).
    pub async fn x402_store_idempotent_answer(
        &self,
        id_hash: String,
        payload_hash: String,
        response: Vec<u8>,
        now: i64,
    ) -> Result<bool, super::StoreError> {
        self.write(move |tx| store_idempotent_answer(tx, &id_hash, &payload_hash, &response, now))
            .await
    }

    /// Settlements whose transfer the indexer now holds only as `orphaned`.
    pub async fn orphaned_settlements(
        &self,
        network: &str,
    ) -> Result<Vec<SettlementRow>, super::StoreError> {
        let network = network.to_string();
        self.read(move |c| orphaned_settlements(c, &network)).await
    }

    /// Indexed, unclaimed transactions that may carry a settlement's authorization (see [`adoption_candidates`]).
    pub async fn adoption_candidates(
        &self,
        network: String,
        from: String,
        to: String,
        value: i64,
    ) -> Result<Vec<String>, super::StoreError> {
        self.read(move |c| adoption_candidates(c, &network, &from, &to, value))
            .await
    }

    /// Records that settlement `id`, reorged out of `old`, was settled again in `new`: the events, the new
    /// transaction, a copy of the claim, and the purchase's reversal state if the indexer already confirmed `new`.
    pub async fn record_resettlement(
        &self,
        id: i64,
        old: String,
        new: String,
        now: i64,
    ) -> Result<(), super::StoreError> {
        self.write(move |tx| -> Result<(), super::StoreError> {
            insert_event(tx, id, "reorged", Some(&old), None, now)?;
            replace_tx(tx, id, &new, now)?;
            link_claim(tx, &old, &new, now)?;
            insert_event(tx, id, "resubmitted", Some(&new), None, now)?;
            // The indexer may have confirmed the new transaction before this link existed.
            if let Some(origin) = super::reversals::origin_of(tx, &new)? {
                super::reversals::reconcile_origin(tx, &origin, now)?;
            }
            Ok(())
        })
        .await
    }

    /// Adopts `new` (the payer's own transaction that used the authorization) as settlement `id`'s, like a
    /// re-submission. `false`, changing nothing, when `new` was claimed meanwhile: it is not ours to adopt.
    pub async fn adopt_resettlement(
        &self,
        id: i64,
        old: String,
        new: String,
        now: i64,
    ) -> Result<bool, super::StoreError> {
        self.write(move |tx| -> Result<bool, super::StoreError> {
            if !link_claim(tx, &old, &new, now)? {
                return Ok(false);
            }
            insert_event(tx, id, "reorged", Some(&old), None, now)?;
            replace_tx(tx, id, &new, now)?;
            insert_event(
                tx,
                id,
                "resubmitted",
                Some(&new),
                Some("adopted: the payer's own transaction used this authorization"),
                now,
            )?;
            if let Some(origin) = super::reversals::origin_of(tx, &new)? {
                super::reversals::reconcile_origin(tx, &origin, now)?;
            }
            Ok(true)
        })
        .await
    }

    /// Fails a settlement that could not be settled again: reverses its purchase, revokes its key (see below),
    /// marks it `failed` and records why.
    pub async fn fail_resettlement(
        &self,
        f: FailedResettlement,
        now: i64,
    ) -> Result<(), super::StoreError> {
        self.write(move |tx| -> Result<(), super::StoreError> {
            let id = f.settlement_id;
            insert_event(tx, id, "reorged", Some(&f.tx_hash), None, now)?;
            // The credits it bought are taken back too, through the same reversal as the indexer's (a no-op when
            // the indexer already reversed the purchase when it orphaned the transfer).
            let origin =
                super::reversals::origin_of(tx, &f.tx_hash)?.unwrap_or_else(|| f.tx_hash.clone());
            super::reversals::reverse(tx, &origin, "settlement_failed", now)?;
            // A credit key is the account's: it stays when other payments fund it (the lower balance is what
            // limits it); a subscription key, or a credit key this payment alone funded, is revoked for good.
            let revoke =
                f.product != "credits" || !super::reversals::other_funding(tx, &f.payer, &origin)?;
            if let Some(key) = f.key_id.filter(|_| revoke) {
                super::billing::revoke_key(tx, key, "settlement_reorged", None, now)?;
            }
            mark_failed(tx, id, now)?;
            insert_event(tx, id, "suspended", None, Some(&f.detail), now)?;
            Ok(())
        })
        .await
    }
}
