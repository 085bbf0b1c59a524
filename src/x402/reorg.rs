//! Settlements whose block was reorged out: a background task finds recorded settlements whose transfer the
//! indexer has seen and now holds only as `orphaned`, and re-submits the same authorization (still valid while
//! `validBefore` has not passed, and unused on the new chain). The new transaction replaces the old one in the
//! settlement record and gets a copy of its claim row (so it cannot be claimed by txHash either). If the
//! re-submission is refused (expired, the payer's balance moved, …), the purchase is reversed (its credits taken
//! back, through `store::reversals`, if the indexer has not done so already), the key minted from the payment is
//! revoked with reason `settlement_reorged` (a credit key only when nothing else funds it), and the settlement is
//! marked `failed`. If the authorization was already used on chain by a transaction of someone else (the payer
//! re-mined it), that transaction is found in the index, checked by its `AuthorizationUsed` log, and adopted as the
//! settlement's. Every step is an `x402_events` row; reversals and restores are `claim_reversals` rows.

use std::time::Duration;

use alloy::primitives::{B256, Bytes, b256};
use tokio_util::sync::CancellationToken;

use super::engine::X402;
use super::error::{PaymentError, Reason};
use super::types::{
    AnyPaymentPayload, Authorization, ExactEvmPayload, PaymentPayload, PaymentRequirements,
    ResourceInfo,
};
use super::verify::PaymentRequest;
use crate::billing::Billing;
use crate::store::x402::{FailedResettlement, SettlementRow};
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
    /// The authorization was used on chain by a transaction of someone else (the payer re-mined it): that
    /// transaction is the settlement's now.
    Adopted { settlement_id: i64, tx_hash: String },
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
    billing: &Billing,
    now: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let rows = store
        .orphaned_settlements(&engine.network().caip2())
        .await?;
    let mut out = Vec::new();
    let usdc_engine = billing
        .settings()
        .network(&engine.network().caip2())
        .is_some_and(|n| n.network.token == engine.network().token);
    for row in rows {
        let id = row.id;
        // Each token's engine re-submits its own token's settlements (the USDC one also those that do not decode).
        let mine = match request_of(&row) {
            Some(req) => req.requirements.asset == engine.network().token,
            None => usdc_engine,
        };
        if !mine {
            continue;
        }
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
                store.record_resettlement(id, old, new.clone(), now).await?;
                tracing::warn!(settlement = id, old = %row.tx_hash, new = %new, "reorged x402 settlement re-submitted");
                Outcome::Resubmitted {
                    settlement_id: id,
                    tx_hash: new,
                }
            }
            Err(PaymentError::Rejected(Reason::NonceAlreadyUsed | Reason::Duplicate)) => {
                // Used on chain: the original came back (the indexer will see it), or the payer (or anyone holding
                // the signed authorization) submitted it in a transaction of their own. The money reached payTo
                // in that transaction: find it in the index and adopt it.
                match adopt(store, engine, billing, &row, now).await {
                    Ok(Some(tx_hash)) => Outcome::Adopted {
                        settlement_id: id,
                        tx_hash,
                    },
                    Ok(None) => Outcome::Pending {
                        settlement_id: id,
                        reason: "authorization used on chain by a transaction the index has not seen yet".into(),
                    },
                    Err(e) => Outcome::Pending {
                        settlement_id: id,
                        reason: format!("authorization used on chain; looking for its transaction failed: {e}"),
                    },
                }
            }
            Err(PaymentError::Unavailable { .. }) | Err(PaymentError::OutcomeUnknown { .. }) => {
                // Nothing known: look again next round.
                Outcome::Pending {
                    settlement_id: id,
                    reason: "chain unavailable".into(),
                }
            }
            Err(PaymentError::Rejected(reason)) => {
                let code = reason.code().to_string();
                let detail = format!("{code}: {reason}");
                store
                    .fail_resettlement(
                        FailedResettlement {
                            settlement_id: id,
                            tx_hash: row.tx_hash.clone(),
                            key_id: row.key_id,
                            product: row.product.clone(),
                            payer: row.payer.clone(),
                            detail,
                        },
                        now,
                    )
                    .await?;
                tracing::error!(settlement = id, tx = %row.tx_hash, %code, "reorged x402 settlement could not be re-submitted; its credits reversed and its key suspended");
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

/// `keccak256("AuthorizationUsed(address,bytes32)")`, the EIP-3009 event of a used authorization.
pub const AUTHORIZATION_USED_TOPIC: B256 =
    b256!("98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5");

/// Finds the transaction in which the settlement's authorization was used by someone else (the payer re-mined it
/// after the reorg): an indexed, unclaimed transfer with the authorization's from, to and value whose receipt
/// holds the token's `AuthorizationUsed(from, nonce)`. Adopts it like a re-submission: it becomes the settlement's
/// transaction, gets a copy of the claim row, and restores the purchase once it is confirmed. Returns its hash.
async fn adopt(
    store: &Store,
    engine: &X402,
    billing: &Billing,
    row: &SettlementRow,
    now: i64,
) -> Result<Option<String>, StoreError> {
    let Ok(auth) = serde_json::from_str::<Authorization>(&row.authorization) else {
        return Ok(None);
    };
    let Ok(value) = i64::try_from(auth.value) else {
        return Ok(None);
    };
    let (from, to) = (format!("{:#x}", auth.from), format!("{:#x}", auth.to));
    let network = engine.network();
    let candidates = store
        .adoption_candidates(network.caip2(), from, to, value)
        .await?;
    let token = network.token;
    let Some(rpc) = billing.rpc_of(&network.caip2()) else {
        return Ok(None);
    };
    let authorizer = B256::left_padding_from(auth.from.as_slice());
    for candidate in candidates {
        let Ok(hash) = candidate.parse::<B256>() else {
            continue;
        };
        let receipt = match rpc.receipt(hash).await {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => return Err(StoreError::Task(format!("receipt of {candidate}: {e}"))),
        };
        let used = receipt.succeeded()
            && receipt.logs.iter().any(|l| {
                l.address == token
                    && l.topics.as_slice() == [AUTHORIZATION_USED_TOPIC, authorizer, auth.nonce]
            });
        if !used {
            continue;
        }
        let adopted = store
            .adopt_resettlement(row.id, row.tx_hash.clone(), candidate.clone(), now)
            .await?;
        if adopted {
            tracing::warn!(settlement = row.id, old = %row.tx_hash, new = %candidate, "reorged x402 settlement: the payer's own transaction used the authorization; adopted");
            return Ok(Some(candidate));
        }
    }
    Ok(None)
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
            if let Err(e) = check_once(&store, &engine, &billing, billing.now()).await {
                tracing::warn!(error = %e, "checking x402 settlements for reorgs failed");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_used_topic_is_keccak_of_the_event() {
        assert_eq!(
            AUTHORIZATION_USED_TOPIC,
            alloy::primitives::keccak256("AuthorizationUsed(address,bytes32)")
        );
    }
}
