//! The Solana indexer's writes: one batch of newly found SPL transfers to payTo, the status changes of those found
//! earlier, and the network's checkpoint (the newest signature read), in ONE transaction, so a restart resumes
//! after exactly what is stored: no gap, no duplicate.
//!
//! A Solana row of `transfers` is one `transfer`/`transferChecked` instruction into payTo's token account:
//! `tx_hash` is the transaction's signature (base58), `block_number` its slot, `block_hash` the signature again (a
//! transaction lands in exactly one block, so the schema's uniqueness of (block_hash, log_index) is one row per
//! instruction), `log_index` the instruction's position (outer index × 256 + inner position + 1 for an
//! instruction run by another program), `from_address` the transfer's authority (the wallet that signed it),
//! `to_address` the payTo wallet, `token` the mint.

use std::collections::HashSet;

use super::sql::{Sql, params};
use super::transfers::{
    NewTransfer, Transfer, TransferStatus, insert_new, orphan, record_status, select_transfers,
    serialize_index_writes,
};
use super::{Store, StoreError, now_unix};

/// What one poll of a Solana network found.
#[derive(Debug, Clone, Default)]
pub struct SvmBatch {
    pub network: String,
    /// New transfers, each with whether it has reached the configured commitment.
    pub transfers: Vec<(NewTransfer, bool)>,
    /// Signatures of `seen` transfers that reached the configured commitment.
    pub confirm: Vec<String>,
    /// Signatures of `seen` transfers the cluster no longer knows (their fork was abandoned), with why.
    pub orphan: Vec<(String, String)>,
    /// The newest signature read and its slot: the next poll asks for what came after it.
    pub checkpoint: Option<(u64, String)>,
    /// The slot the poll read up to (the history's `head_block`).
    pub head_slot: u64,
}

/// What a batch changed.
#[derive(Debug, Clone, Default)]
pub struct SvmOutcome {
    pub inserted: usize,
    pub newly_confirmed: Vec<Transfer>,
    pub orphaned: Vec<Transfer>,
}

fn apply_in(c: &dyn Sql, b: &SvmBatch, now: i64) -> Result<SvmOutcome, StoreError> {
    serialize_index_writes(c)?;
    let mut out = SvmOutcome::default();
    for (t, at_commitment) in &b.transfers {
        // insert_new confirms a row whose block is at or below its second argument.
        let confirm_upto = if *at_commitment { i64::MAX } else { -1 };
        if let Some(row) = insert_new(c, t, confirm_upto)? {
            out.inserted += 1;
            if row.status == TransferStatus::Confirmed {
                out.newly_confirmed.push(row);
            }
        }
    }
    for sig in &b.confirm {
        let rows = select_transfers(
            c,
            "network = ?1 AND tx_hash = ?2 AND status = 'seen'",
            params![b.network, sig],
        )?;
        for mut row in rows {
            c.execute(
                "UPDATE transfers SET status = 'confirmed', confirmed_at = ?2 WHERE id = ?1 AND status = 'seen'",
                params![row.id, now],
            )?;
            record_status(
                c,
                row.id,
                TransferStatus::Confirmed,
                b.head_slot,
                "the configured commitment reached",
            )?;
            row.status = TransferStatus::Confirmed;
            row.confirmed_at = Some(now);
            out.newly_confirmed.push(row);
        }
    }
    for (sig, reason) in &b.orphan {
        let rows = select_transfers(
            c,
            "network = ?1 AND tx_hash = ?2 AND status <> 'orphaned'",
            params![b.network, sig],
        )?;
        for row in rows {
            orphan(c, row.id, now, b.head_slot, reason)?;
            out.orphaned.push(row);
        }
    }
    if let Some((slot, signature)) = &b.checkpoint {
        c.execute(
            "INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (network) DO UPDATE SET block_number = excluded.block_number, \
             block_hash = excluded.block_hash, updated_at = excluded.updated_at",
            params![b.network, *slot as i64, signature, now],
        )?;
    }
    Ok(out)
}

impl Store {
    /// Applies one poll of a Solana network atomically (see [`SvmBatch`]); claims of transfers that changed are
    /// reconciled (reversed or restored) in the same transaction, as for EVM.
    pub async fn apply_svm_batch(&self, batch: SvmBatch) -> Result<SvmOutcome, StoreError> {
        self.write(move |tx| {
            let now = now_unix();
            let out = apply_in(tx, &batch, now)?;
            let changed: HashSet<&str> = out
                .orphaned
                .iter()
                .chain(&out.newly_confirmed)
                .map(|t| t.tx_hash.as_str())
                .collect();
            for sig in changed {
                super::reversals::reconcile_tx(tx, &batch.network, sig, now)?;
            }
            Ok(out)
        })
        .await
    }

    /// The confirmed transfers of `network` in slots above `slot` (at `confirmed` commitment: not rooted yet).
    pub async fn confirmed_since(
        &self,
        network: &str,
        slot: u64,
    ) -> Result<Vec<Transfer>, StoreError> {
        let network = network.to_string();
        self.read(move |c| {
            select_transfers(
                c,
                "network = ?1 AND status = 'confirmed' AND block_number > ?2 ORDER BY block_number, log_index",
                params![network, slot as i64],
            )
        })
        .await
    }

    /// The `seen` transfers of `network` (found, not yet at the configured commitment).
    pub async fn seen_transfers(&self, network: &str) -> Result<Vec<Transfer>, StoreError> {
        let network = network.to_string();
        self.read(move |c| {
            select_transfers(
                c,
                "network = ?1 AND status = 'seen' ORDER BY block_number, log_index",
                params![network],
            )
        })
        .await
    }
}
