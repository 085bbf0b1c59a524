//! Settlement: the [`Settler`] trait and [`SelfSettler`], which submits `transferWithAuthorization` from the
//! operator's own hot wallet and waits for the receipt.
//!
//! The hot wallet only pays gas; the USDC moves from the payer to payTo. Its private key is passed in by the caller
//! (read from the environment variable named in the config) and is never logged: `Debug` shows the address only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy::eips::Encodable2718;
use alloy::network::TxSignerSync;
use alloy::primitives::{Address, B256, Bytes, TxKind};
use alloy::signers::local::PrivateKeySigner;
use futures::future::BoxFuture;

use super::error::{PaymentError, Reason};
use super::types::SettleResponse;
use super::verify::{PaymentRequest, Verified, Verifier};
use crate::chain::{Rpc, RpcError};
use crate::config::Network;
use crate::usdc::Usdc;

/// A settled payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub transaction: B256,
    /// CAIP-2.
    pub network: String,
    pub payer: Address,
    pub amount: Usdc,
}

impl Settlement {
    /// The `PAYMENT-RESPONSE` body.
    pub fn response(&self) -> SettleResponse {
        SettleResponse {
            success: true,
            error_reason: None,
            transaction: format!("{:#x}", self.transaction),
            network: self.network.clone(),
            payer: Some(format!("{:#x}", self.payer)),
            amount: None,
        }
    }
}

/// The `PAYMENT-RESPONSE` body of a failed payment.
pub fn failure_response(
    err: &PaymentError,
    network: &str,
    payer: Option<Address>,
) -> SettleResponse {
    SettleResponse {
        success: false,
        error_reason: Some(err.code().to_string()),
        transaction: String::new(),
        network: network.to_string(),
        payer: payer.map(|p| format!("{p:#x}")),
        amount: None,
    }
}

/// Verifies and settles payments: by ourselves on chain, or through a facilitator.
pub trait Settler: Send + Sync {
    /// Verifies `req` at time `now` (unix seconds).
    fn verify<'a>(
        &'a self,
        req: &'a PaymentRequest,
        now: u64,
    ) -> BoxFuture<'a, Result<Verified, PaymentError>>;

    /// Settles a verified payment. Call at most once per authorization (the engine's in-flight guard does this).
    fn settle<'a>(
        &'a self,
        req: &'a PaymentRequest,
        verified: &'a Verified,
    ) -> BoxFuture<'a, Result<Settlement, PaymentError>>;

    /// Forgets cached chain state (the hot wallet's next nonce) after a reorg dropped transactions.
    fn forget_pending(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Settles with the operator's hot wallet.
pub struct SelfSettler {
    verifier: Verifier,
    signer: PrivateKeySigner,
    receipt_timeout: Duration,
    /// The next nonce of the hot wallet, once known; transactions are signed and sent one at a time. Shared by
    /// every settler of the same wallet on the same chain (one per accepted token).
    next_nonce: NonceSequence,
}

/// A hot wallet's next nonce on one chain, shared by the settlers that send from it.
pub type NonceSequence = Arc<tokio::sync::Mutex<Option<u64>>>;

impl std::fmt::Debug for SelfSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSettler")
            .field("address", &self.signer.address())
            .field("network", self.verifier.network())
            .field("receipt_timeout", &self.receipt_timeout)
            .finish_non_exhaustive()
    }
}

impl SelfSettler {
    /// `signer` pays the gas of settlements (it needs ETH on the chain, no USDC).
    pub fn new(rpc: Arc<Rpc>, network: Network, signer: PrivateKeySigner) -> SelfSettler {
        SelfSettler {
            verifier: Verifier::new(rpc, network, Some(signer.address())),
            signer,
            receipt_timeout: Duration::from_secs(60),
            next_nonce: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Sends from the same nonce sequence as another settler of this wallet on this chain.
    pub fn with_nonce_sequence(mut self, sequence: NonceSequence) -> SelfSettler {
        self.next_nonce = sequence;
        self
    }

    /// This wallet's nonce sequence, to share with another token's settler on the same chain.
    pub fn nonce_sequence(&self) -> NonceSequence {
        self.next_nonce.clone()
    }

    /// How long to wait for a receipt before reporting the outcome as unknown (default 60 s).
    pub fn with_receipt_timeout(mut self, timeout: Duration) -> SelfSettler {
        self.receipt_timeout = timeout;
        self
    }

    /// The hot wallet's address.
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    async fn settle_inner(
        &self,
        req: &PaymentRequest,
        verified: &Verified,
    ) -> Result<Settlement, PaymentError> {
        let token = req.requirements.asset;
        let data = Verifier::settlement_call(req, &verified.signer);
        let tx_hash = match self.send_call(token, data).await {
            Ok(hash) => hash,
            // It would revert now: explain (the payment was fine at verification; something changed).
            Err(SendError::WouldRevert(message)) => {
                return Err(self.verifier.explain_failure(req, message).await);
            }
            Err(SendError::Failed(e)) => return Err(e),
        };
        self.await_receipt(tx_hash).await?;
        Ok(Settlement {
            transaction: tx_hash,
            network: self.verifier.network().caip2(),
            payer: verified.payer,
            amount: verified.amount,
        })
    }

    /// Waits for `tx_hash`'s receipt: `Ok` when it succeeded, a reverted settlement, or an unknown outcome after
    /// the receipt timeout.
    pub async fn await_receipt(&self, tx_hash: B256) -> Result<(), PaymentError> {
        let rpc = self.verifier.rpc();
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            match rpc.receipt(tx_hash).await {
                Ok(Some(receipt)) if receipt.block_number.is_some() => {
                    if !receipt.succeeded() {
                        return Err(Reason::SettlementReverted { tx: tx_hash }.into());
                    }
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, tx = %tx_hash, "settlement receipt poll failed")
                }
            }
            if started.elapsed() >= self.receipt_timeout {
                // The transaction may be dropped: learn the nonce afresh next time.
                *self.next_nonce.lock().await = None;
                return Err(PaymentError::OutcomeUnknown {
                    what: "settle",
                    message: format!(
                        "transaction {tx_hash:#x} has no receipt after {:?}",
                        self.receipt_timeout
                    ),
                    tx: Some(tx_hash),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Signs and submits a call of `to` with `data` from the hot wallet (one at a time, nonces in order);
    /// returns its hash. Errors before submission are definite.
    pub async fn send_call(&self, to: Address, data: Bytes) -> Result<B256, SendError> {
        let rpc = self.verifier.rpc();
        let from = self.signer.address();
        let before_send = |what: &'static str| {
            move |e: RpcError| PaymentError::Unavailable {
                what,
                message: e.to_string(),
            }
        };
        let mut next_nonce = self.next_nonce.lock().await;
        for attempt in 0..2 {
            let nonce = match *next_nonce {
                Some(n) => n,
                None => rpc
                    .pending_nonce(from)
                    .await
                    .map_err(before_send("settle: nonce"))?,
            };
            let gas = match rpc.estimate_gas(from, to, data.clone()).await {
                Ok(g) => g,
                Err(RpcError::Node { message, .. }) => return Err(SendError::WouldRevert(message)),
                Err(e) => return Err(before_send("settle: estimate gas")(e).into()),
            };
            let gas_price = rpc
                .gas_price()
                .await
                .map_err(before_send("settle: gas price"))?;
            let tip = rpc.max_priority_fee().await.unwrap_or(0);
            let max_fee = gas_price.saturating_mul(2).max(tip);
            let mut tx = TxEip1559 {
                chain_id: self.verifier.network().chain_id,
                nonce,
                gas_limit: gas.saturating_add(gas / 5),
                max_fee_per_gas: max_fee,
                max_priority_fee_per_gas: tip.min(max_fee),
                to: TxKind::Call(to),
                input: data.clone(),
                ..Default::default()
            };
            let signature = self.signer.sign_transaction_sync(&mut tx).map_err(|e| {
                PaymentError::Unavailable {
                    what: "settle: signing",
                    message: e.to_string(),
                }
            })?;
            let envelope = TxEnvelope::from(tx.into_signed(signature));
            let hash = *envelope.tx_hash();
            let raw = Bytes::from(envelope.encoded_2718());
            match rpc.send_raw_transaction(raw).await {
                Ok(_) => {
                    *next_nonce = Some(nonce + 1);
                    return Ok(hash);
                }
                Err(RpcError::Node { message, .. })
                    if message.to_ascii_lowercase().contains("already known") =>
                {
                    *next_nonce = Some(nonce + 1);
                    return Ok(hash);
                }
                Err(RpcError::Node { message, .. })
                    if attempt == 0 && message.to_ascii_lowercase().contains("nonce") =>
                {
                    tracing::warn!(%message, "settlement nonce out of step; refetching it");
                    *next_nonce = None;
                }
                Err(e @ RpcError::Node { .. }) => {
                    *next_nonce = None;
                    return Err(before_send("settle: send")(e).into());
                }
                Err(e) => {
                    // The node may have received it: wait for its receipt rather than guess.
                    tracing::warn!(error = %e, tx = %hash, "settlement send failed in transport; waiting for a receipt");
                    *next_nonce = None;
                    return Ok(hash);
                }
            }
        }
        Err(PaymentError::Unavailable {
            what: "settle: send",
            message: "nonce still out of step after refetching it".into(),
        }
        .into())
    }
}

/// Why [`SelfSettler::send_call`] sent nothing.
#[derive(Debug)]
pub enum SendError {
    /// Gas estimation reverted: the call would fail now (the node's message).
    WouldRevert(String),
    /// Any other failure (definite: nothing was sent).
    Failed(PaymentError),
}

impl From<PaymentError> for SendError {
    fn from(e: PaymentError) -> Self {
        SendError::Failed(e)
    }
}

impl Settler for SelfSettler {
    fn verify<'a>(
        &'a self,
        req: &'a PaymentRequest,
        now: u64,
    ) -> BoxFuture<'a, Result<Verified, PaymentError>> {
        Box::pin(self.verifier.verify(req, now))
    }

    fn settle<'a>(
        &'a self,
        req: &'a PaymentRequest,
        verified: &'a Verified,
    ) -> BoxFuture<'a, Result<Settlement, PaymentError>> {
        Box::pin(self.settle_inner(req, verified))
    }

    fn forget_pending(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            *self.next_nonce.lock().await = None;
        })
    }
}
