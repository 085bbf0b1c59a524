//! Settlements whose block was reorged out: a background task finds recorded settlements whose transfer the
//! indexer has seen and now holds only as `orphaned`, and re-submits the same authorization (still valid while
//! `validBefore` has not passed, and unused on the new chain). The new transaction replaces the old one in the
//! settlement record and gets a copy of its claim row (so it cannot be claimed by txHash either). If the
//! re-submission is refused (expired, the payer's balance moved, …), the key minted from the payment is revoked
//! with reason `settlement_reorged` and the settlement marked `failed`. Every step is an `x402_events` row.

use std::time::Duration;

use alloy::primitives::Bytes;
use tokio_util::sync::CancellationToken;

use super::engine::X402;
use super::error::{PaymentError, Reason};
use super::types::{
    AnyPaymentPayload, Authorization, ExactEvmPayload, PaymentPayload, PaymentRequirements,
    ResourceInfo,
};
use super::verify::PaymentRequest;
use crate::billing::Billing;
use crate::store::x402::{self as sql, SettlementRow};
use crate::store::{Store, StoreError};

/// How often the task looks for reorged settlements.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What happened to one reorged settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Settled again in this transaction.
    Resubmitted { settlement_id: i64, tx_hash: String },
    /// Could not be settled again: the key was suspended.
    Suspended { settlement_id: i64, reason: String },
    /// Nothing decided this round (chain unavailable, or the authorization was used by a transaction the indexer
    /// has not seen yet).
    Pending { settlement_id: i64, reason: String },
}

/// The payment a recorded settlement was made with.
pub fn request_of(row: &SettlementRow) -> Option<PaymentRequest> {
    let authorization: Authorization = serde_json::from_str(&row.authorization).ok()?;
    let signature: Bytes = row.signature.parse().ok()?;
    let requirements: PaymentRequirements = serde_json::from_str(&row.requirements).ok()?;
    let resource = ResourceInfo {
        url: row.resource.clone(),
        description: None,
        mime_type: None,
    };
    Some(PaymentRequest {
        payload: AnyPaymentPayload::V2(PaymentPayload {
            x402_version: 2,
            resource: Some(resource.clone()),
            accepted: requirements.clone(),
            payload: ExactEvmPayload {
                signature,
                authorization,
            },
            extensions: None,
        }),
        requirements,
        resource,
    })
}

/// One pass: handles every settlement that is orphaned now.
pub async fn check_once(
    store: &Store,
    engine: &X402,
    now: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let rows = store
        .read(|c| -> Result<_, StoreError> { Ok(sql::orphaned_settlements(c)?) })
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let id = row.id;
        let result = match request_of(&row) {
            Some(req) => engine.resettle(&req).await,
            None => {
                Err(Reason::InvalidSignature("the stored payment does not decode".into()).into())
            }
        };
        let outcome = match result {
            Ok(s) => {
                let new = format!("{:#x}", s.transaction);
                let old = row.tx_hash.clone();
                let n = new.clone();
                store
                    .write(move |tx| -> Result<(), StoreError> {
                        sql::insert_event(tx, id, "reorged", Some(&old), None, now)?;
                        sql::replace_tx(tx, id, &n, now)?;
                        sql::link_claim(tx, &old, &n, now)?;
                        sql::insert_event(tx, id, "resubmitted", Some(&n), None, now)?;
                        Ok(())
                    })
                    .await?;
                tracing::warn!(settlement = id, old = %row.tx_hash, new = %new, "reorged x402 settlement re-submitted");
                Outcome::Resubmitted {
                    settlement_id: id,
                    tx_hash: new,
                }
            }
            Err(PaymentError::Rejected(Reason::NonceAlreadyUsed | Reason::Duplicate))
            | Err(PaymentError::Unavailable { .. })
            | Err(PaymentError::OutcomeUnknown { .. }) => {
                // Used on chain (the original came back, or someone else submitted it: the money reached payTo
                // either way), or nothing known: look again next round.
                Outcome::Pending {
                    settlement_id: id,
                    reason: "authorization used on chain or chain unavailable".into(),
                }
            }
            Err(PaymentError::Rejected(reason)) => {
                let code = reason.code().to_string();
                let detail = format!("{code}: {reason}");
                let (old, key_id) = (row.tx_hash.clone(), row.key_id);
                store
                    .write(move |tx| -> Result<(), StoreError> {
                        sql::insert_event(tx, id, "reorged", Some(&old), None, now)?;
                        if let Some(key) = key_id {
                            crate::store::billing::revoke_key(
                                tx,
                                key,
                                "settlement_reorged",
                                None,
                                now,
                            )?;
                        }
                        sql::mark_failed(tx, id, now)?;
                        sql::insert_event(tx, id, "suspended", None, Some(&detail), now)?;
                        Ok(())
                    })
                    .await?;
                tracing::error!(settlement = id, tx = %row.tx_hash, %code, "reorged x402 settlement could not be re-submitted; key suspended");
                Outcome::Suspended {
                    settlement_id: id,
                    reason: code,
                }
            }
        };
        out.push(outcome);
    }
    Ok(out)
}

/// Runs [`check_once`] every [`CHECK_INTERVAL`] until `shutdown`.
pub fn spawn(
    store: Store,
    engine: X402,
    billing: Billing,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = check_once(&store, &engine, billing.now()).await {
                tracing::warn!(error = %e, "checking x402 settlements for reorgs failed");
            }
        }
    })
}
