//! Keyless pay-per-token payments (x402 `upto`) in the books: an authorization is recorded before it is served
//! (single use), its metered cost once the answer ended, and its settlement together with the claim of the
//! settlement's transaction and the ledger's top-up + debit, so an upto payment reconciles like every other
//! payment. A payer with an unsettled payment is refused until it settles.

use alloy::primitives::Address;

use super::{Billing, ClaimError, lost_claim_race, sql};
use crate::store::StoreError;
use crate::store::billing::LedgerKind;
pub use crate::store::upto::{NewUpto, UptoRow};
use crate::usdc::Usdc;

impl Billing {
    /// Records an authorization about to be served; `None` when it was recorded before (a replay).
    pub async fn upto_begin(&self, new: NewUpto) -> Result<Option<i64>, StoreError> {
        let now = self.now();
        self.store
            .write(move |tx| crate::store::upto::insert(tx, &new, now))
            .await
    }

    /// The payer's oldest unsettled upto payment (the payer is refused while there is one).
    pub async fn upto_unsettled(&self, payer: Address) -> Result<Option<UptoRow>, StoreError> {
        let payer = format!("{payer:#x}");
        self.store
            .read(move |c| crate::store::upto::unsettled_of(c, &payer))
            .await
    }

    /// The metered tokens and cost of a served payment.
    pub async fn upto_metered(
        &self,
        id: i64,
        prompt_tokens: u64,
        completion_tokens: u64,
        cost: Usdc,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        let (p, c) = (
            i64::try_from(prompt_tokens).unwrap_or(i64::MAX),
            i64::try_from(completion_tokens).unwrap_or(i64::MAX),
        );
        self.store
            .write(move |tx| crate::store::upto::set_cost(tx, id, p, c, cost.atomic(), now))
            .await
    }

    /// A settlement of `cost` landed in `tx_hash`: the payment row, a `topup` claim of the transaction (so it can
    /// never be claimed again by txHash) and the ledger's top-up + debit, in one transaction.
    pub async fn upto_settled(
        &self,
        id: i64,
        payer: Address,
        tx_hash: String,
        cost: Usdc,
        note: String,
    ) -> Result<(), ClaimError> {
        let now = self.now();
        self.store
            .write(move |tx| -> Result<(), ClaimError> {
                let tx_hash = tx_hash.to_ascii_lowercase();
                if let Some(existing) = sql::claim_of(tx, &tx_hash)? {
                    return Err(ClaimError::AlreadyClaimed(Box::new(existing)));
                }
                if !crate::store::upto::mark_settled(tx, id, &tx_hash, now)? {
                    return Err(ClaimError::PaymentChanged);
                }
                let payer = format!("{payer:#x}");
                sql::ensure_account(tx, &payer, now)?;
                for (kind, amount) in [
                    (LedgerKind::Topup, cost),
                    (LedgerKind::Debit, Usdc(-cost.0)),
                ] {
                    sql::append_ledger(
                        tx,
                        &payer,
                        kind,
                        amount,
                        Some(&tx_hash),
                        None,
                        Some(&note),
                        now,
                    )?;
                }
                let network = crate::store::upto::network_of(tx, id)?;
                if !sql::insert_claim(
                    tx, &network, &tx_hash, &payer, "topup", cost, cost, None, None, None, now,
                )? {
                    return Err(lost_claim_race(tx, &tx_hash));
                }
                Ok(())
            })
            .await
    }

    /// Remembers (or forgets) a settlement transaction sent without a receipt.
    pub async fn upto_pending_tx(&self, id: i64, tx: Option<String>) -> Result<bool, StoreError> {
        let now = self.now();
        self.store
            .write(move |c| crate::store::upto::set_pending_tx(c, id, tx.as_deref(), now))
            .await
    }

    /// A settlement attempt failed (`give_up`: the payment is now `unsettled`, the payer refused).
    pub async fn upto_failed(
        &self,
        id: i64,
        error: String,
        give_up: bool,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        self.store
            .write(move |tx| crate::store::upto::record_failure(tx, id, &error, give_up, now))
            .await
    }

    /// The payment of `payer`'s authorization `nonce` (0x-hex).
    pub async fn upto_payment(
        &self,
        payer: Address,
        nonce: String,
    ) -> Result<Option<UptoRow>, StoreError> {
        let payer = format!("{payer:#x}");
        self.store
            .read(move |c| crate::store::upto::by_payer_nonce(c, &payer, &nonce))
            .await
    }

    /// Payments to settle again (failed attempts) whose authorization is still valid.
    pub async fn upto_retryable(&self) -> Result<Vec<UptoRow>, StoreError> {
        let now = self.now();
        self.store
            .read(move |c| crate::store::upto::retryable(c, now))
            .await
    }

    /// Every upto payment (audit).
    pub async fn upto_payments(&self) -> Result<Vec<UptoRow>, StoreError> {
        self.store.read(|c| crate::store::upto::list(c)).await
    }
}

/// What a served upto request used: its tokens and their cost at the payment's prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Usdc,
}

/// How long a settlement is retried in the request before it is left to the background retrier.
const INLINE_ATTEMPTS: u32 = 3;
/// A `settling` row untouched this long was left by a process that stopped mid-settlement.
const STALE_SETTLING_SECS: i64 = 600;

impl Billing {
    /// Settles a served upto payment for its metered `cost` (≤ its maximum) and records it: zero moves nothing;
    /// otherwise the settlement is sent at once and retried with backoff while the chain or the node is the
    /// problem. A refusal (the payer moved funds or revoked the allowance) records the payment `unsettled`: the
    /// payer is refused until the background retrier settles it. `Ok(None)` = nothing to settle.
    pub async fn settle_upto(
        &self,
        settler: &crate::x402::upto::UptoSettler,
        id: i64,
        payment: &crate::x402::upto::UptoPaymentPayload,
        offer: &crate::x402::PaymentRequirements,
        metered: Metered,
        note: String,
    ) -> Result<Option<alloy::primitives::B256>, crate::x402::PaymentError> {
        let cost = metered.cost;
        if let Err(e) = self
            .upto_metered(id, metered.prompt_tokens, metered.completion_tokens, cost)
            .await
        {
            tracing::error!(error = %e, id, "upto payment: metered cost not recorded");
        }
        if cost <= Usdc::ZERO {
            return Ok(None);
        }
        let mut delay = std::time::Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            match settler.settle(payment, offer, cost).await {
                Ok(None) => return Ok(None),
                Ok(Some(tx)) => {
                    self.record_upto_settlement(id, payment.payer(), tx, cost, note)
                        .await;
                    return Ok(Some(tx));
                }
                Err(e) => {
                    // Sent without a receipt: never send another on top of it; the retrier reads its receipt.
                    if let crate::x402::PaymentError::OutcomeUnknown { tx: Some(tx), .. } = &e
                        && let Err(se) = self.upto_pending_tx(id, Some(format!("{tx:#x}"))).await
                    {
                        tracing::error!(error = %se, id, "upto payment: pending transaction not recorded");
                    }
                    let definite = matches!(e, crate::x402::PaymentError::Rejected(_));
                    let give_up = definite
                        || attempt >= INLINE_ATTEMPTS
                        || matches!(e, crate::x402::PaymentError::OutcomeUnknown { .. });
                    tracing::warn!(error = %e, id, attempt, give_up, "upto settlement failed");
                    if let Err(se) = self.upto_failed(id, e.to_string(), give_up).await {
                        tracing::error!(error = %se, id, "upto payment: failure not recorded");
                    }
                    if give_up {
                        return Err(e);
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }

    async fn record_upto_settlement(
        &self,
        id: i64,
        payer: Address,
        tx: alloy::primitives::B256,
        cost: Usdc,
        note: String,
    ) {
        if let Err(e) = self
            .upto_settled(id, payer, format!("{tx:#x}"), cost, note)
            .await
        {
            // The USDC moved: the transfer stays visible to auditors through the index.
            tracing::error!(error = %e, %tx, id, "upto settlement not recorded");
        }
    }

    /// One pass of the background retrier: settles again every unsettled payment (and every `settling` one a
    /// stopped process left) whose authorization is still valid. Returns how many settled.
    pub async fn retry_upto(&self, settler: &crate::x402::upto::UptoSettler) -> usize {
        let rows = match self.upto_retryable().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "upto retrier: cannot read payments");
                return 0;
            }
        };
        let now = self.now();
        let mut settled = 0;
        for row in rows {
            if row.status == "settling" && now - row.updated_at < STALE_SETTLING_SECS {
                continue; // being settled by its request
            }
            // A transaction sent earlier without a receipt: its receipt decides, before anything is sent again.
            if let Some(pending) = row.pending_tx.as_deref().and_then(|t| t.parse().ok()) {
                match settler.transaction_landed(pending).await {
                    Ok(Some(true)) => {
                        if let (Some(cost), Ok(payer)) = (row.cost_atomic, row.payer.parse()) {
                            let note =
                                format!("x402 upto: {} (its receipt found on retry)", row.model);
                            self.record_upto_settlement(row.id, payer, pending, Usdc(cost), note)
                                .await;
                            settled += 1;
                        }
                        continue;
                    }
                    // Reverted: nothing moved; settle afresh below.
                    Ok(Some(false)) => {
                        let _ = self.upto_pending_tx(row.id, None).await;
                    }
                    // Not mined (yet): wait; sending another could settle twice. Said in the row, for operators.
                    Ok(None) => {
                        let note = format!("waiting for the receipt of {pending:#x}");
                        let _ = self.upto_failed(row.id, note, true).await;
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            let (Some(cost), Ok(payment), Ok(offer)) = (
                row.cost_atomic,
                serde_json::from_str::<crate::x402::upto::UptoPaymentPayload>(&row.payment),
                serde_json::from_str::<crate::x402::PaymentRequirements>(&row.requirements),
            ) else {
                continue;
            };
            match settler.settle(&payment, &offer, Usdc(cost)).await {
                Ok(Some(tx)) => {
                    let note = format!("x402 upto: {} (settled on retry)", row.model);
                    self.record_upto_settlement(row.id, payment.payer(), tx, Usdc(cost), note)
                        .await;
                    settled += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    if let crate::x402::PaymentError::OutcomeUnknown { tx: Some(tx), .. } = &e {
                        let _ = self.upto_pending_tx(row.id, Some(format!("{tx:#x}"))).await;
                    }
                    let _ = self.upto_failed(row.id, e.to_string(), true).await;
                }
            }
        }
        settled
    }
}

/// Retries unsettled upto payments every `every` until `shutdown`.
pub fn spawn_retrier(
    billing: Billing,
    settler: std::sync::Arc<crate::x402::upto::UptoSettler>,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let n = billing.retry_upto(&settler).await;
            if n > 0 {
                tracing::info!(settled = n, "upto retrier settled payments");
            }
        }
    })
}
