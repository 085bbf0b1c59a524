//! Settling standard x402 `exact` payments on a Solana network ourselves: the gateway's fee payer co-signs the
//! client's verified transaction, the cluster simulates it (signatures, balances, blockhash) and then lands it, and
//! the gateway waits until it is confirmed before anything is credited.
//!
//! Nothing here decides twice: a transaction's id is its first signature, the payer's, which the client made over
//! the whole message, so the same payment sent again is the same transaction — the cluster refuses to process it a
//! second time, and the store's claim of that signature (one row per transaction) refuses to credit it again, also
//! after a restart.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

use super::exact::{SvmPaymentError, SvmRequirements, VerifiedSvmPayment, cosign, verify_exact};
use crate::chain::RpcError;
use crate::chain::svm::SvmRpc;
use crate::chain::svm::address::Pubkey;
use crate::config::SvmSettings;

/// How long a sent payment may take to be confirmed before its outcome is reported unknown.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(45);

/// Reads the fee payer's key from the environment variable `var`: the base58 text of a 64-byte keypair (secret
/// seed then public key, as wallets export it) or a JSON array of its 64 bytes (`solana-keygen`'s file).
pub fn fee_payer_from_env(
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SigningKey, String> {
    let raw = env(var).ok_or_else(|| format!("environment variable `{var}` is not set"))?;
    let raw = raw.trim();
    let bytes: Vec<u8> = if raw.starts_with('[') {
        serde_json::from_str(raw).map_err(|_| format!("`{var}` is not a JSON array of 64 bytes"))?
    } else {
        bs58::decode(raw)
            .into_vec()
            .map_err(|_| format!("`{var}` is not base58"))?
    };
    if bytes.len() != 64 {
        return Err(format!(
            "`{var}` must hold a 64-byte keypair (secret seed, then public key); it holds {} bytes",
            bytes.len()
        ));
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&bytes[..32]);
    let key = SigningKey::from_bytes(&seed);
    if key.verifying_key().to_bytes()[..] != bytes[32..] {
        return Err(format!(
            "`{var}`: the public half of the keypair does not match its secret seed"
        ));
    }
    Ok(key)
}

/// Why a Solana payment did not settle.
#[derive(Debug, thiserror::Error)]
pub enum SvmSettleError {
    /// The payment is not acceptable (nothing was sent).
    #[error("{0}")]
    Rejected(#[from] SvmPaymentError),
    /// The cluster has already processed this very transaction (nothing was sent).
    #[error("transaction {0} was already processed by the cluster")]
    Duplicate(String),
    /// The cluster refused it in simulation (nothing was sent): insufficient funds, expired blockhash, …
    #[error("the transaction fails in simulation: {0}")]
    Simulation(String),
    /// The RPC could not be reached (nothing was sent, or nothing is known to have landed).
    #[error("the Solana RPC is unavailable: {0}")]
    Unavailable(RpcError),
    /// Sent, but not seen confirmed in time (or the node's answer was lost): it may still land.
    #[error("the transaction {signature} was sent but its confirmation was not seen in time")]
    OutcomeUnknown { signature: String },
    /// Sent and landed, but failed on chain: nothing moved.
    #[error("the transaction {signature} failed on chain: {reason}")]
    Failed { signature: String, reason: String },
}

impl SvmSettleError {
    /// The machine-readable reason (x402 `errorReason`).
    pub fn code(&self) -> &'static str {
        match self {
            SvmSettleError::Rejected(e) => e.reason(),
            SvmSettleError::Duplicate(_) => "duplicate_settlement",
            SvmSettleError::Simulation(_) => "transaction_simulation_failed",
            SvmSettleError::Unavailable(_) => "settlement_unavailable",
            SvmSettleError::OutcomeUnknown { .. } => "settlement_outcome_unknown",
            SvmSettleError::Failed { .. } => "transaction_failed",
        }
    }
}

/// A verified payment, co-signed and simulated, ready to send.
#[derive(Debug, Clone)]
pub struct PreparedSvm {
    wire: String,
    pub verified: VerifiedSvmPayment,
}

/// A settled Solana payment.
#[derive(Debug, Clone)]
pub struct SvmSettlement {
    pub signature: String,
    pub payer: Pubkey,
    pub amount: u64,
    pub network: String,
}

/// The `exact` scheme on one Solana network, settled by the gateway's fee payer.
pub struct SvmExact {
    pub settings: SvmSettings,
    rpc: Arc<SvmRpc>,
    fee_payer: SigningKey,
    /// Largest compute-unit price (micro-lamports) a payment may ask our fee payer to pay.
    pub max_compute_unit_price: u64,
    /// Signatures of payments between verification and their record (this process): a copy sent meanwhile is a
    /// duplicate, not a second settlement or a second served request.
    in_flight: Arc<Mutex<HashSet<String>>>,
}

/// Holds a payment's signature in flight until dropped.
#[derive(Debug)]
pub struct InFlight {
    set: Arc<Mutex<HashSet<String>>>,
    signature: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut set = match self.set.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        set.remove(&self.signature);
    }
}

impl std::fmt::Debug for SvmExact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvmExact")
            .field("network", &self.settings.caip2)
            .field("fee_payer", &self.fee_payer_address())
            .finish_non_exhaustive()
    }
}

impl SvmExact {
    pub fn new(settings: SvmSettings, rpc: Arc<SvmRpc>, fee_payer: SigningKey) -> SvmExact {
        SvmExact {
            settings,
            rpc,
            fee_payer,
            // The official clients ask 1 micro-lamport; 5 lamports per compute unit is far above any sane fee.
            max_compute_unit_price: 5_000_000,
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Holds `signature` in flight; `None` when a copy of it already is.
    pub fn hold(&self, signature: &str) -> Option<InFlight> {
        let mut set = match self.in_flight.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        set.insert(signature.to_string()).then(|| InFlight {
            set: self.in_flight.clone(),
            signature: signature.to_string(),
        })
    }

    pub fn fee_payer_address(&self) -> Pubkey {
        Pubkey(self.fee_payer.verifying_key().to_bytes())
    }

    /// What a payment of `amount` USDC atomic units must satisfy.
    pub fn requirements(&self, amount: u64) -> SvmRequirements {
        SvmRequirements {
            network: self.settings.caip2.clone(),
            amount,
            asset: self.settings.mint,
            pay_to: self.settings.pay_to,
            fee_payer: self.fee_payer_address(),
            decimals: 6,
            max_compute_unit_price: self.max_compute_unit_price,
        }
    }

    /// Verifies the client's transaction against `req` (the spec's checks, no RPC).
    pub fn verify(
        &self,
        transaction_base64: &str,
        req: &SvmRequirements,
    ) -> Result<VerifiedSvmPayment, SvmSettleError> {
        let mut verified = verify_exact(transaction_base64, req)?;
        // Co-signed here, once: the transaction's id is the fee payer's signature, deterministic (ed25519), so it is
        // known (and held, and looked up in the store) before anything is sent.
        cosign(&mut verified.transaction, &self.fee_payer)?;
        verified.signature_id = verified.transaction.signature_id();
        Ok(verified)
    }

    /// Has the cluster simulate a verified (co-signed) payment (every signature, the payer's balance, the
    /// blockhash's age): a payment that would fail is refused before any work is done for it.
    pub async fn prepare(
        &self,
        verified: VerifiedSvmPayment,
    ) -> Result<PreparedSvm, SvmSettleError> {
        let wire = verified.transaction.to_base64();
        let (err, logs) = self
            .rpc
            .simulate(&wire)
            .await
            .map_err(SvmSettleError::Unavailable)?;
        if let Some(err) = err {
            // The cluster has this very transaction already: a replay (of a payment this gateway may not have
            // recorded, e.g. one settled through another gateway with the same fee payer).
            if err.to_string().contains("AlreadyProcessed") {
                return Err(SvmSettleError::Duplicate(verified.signature_id));
            }
            let last = logs.last().cloned().unwrap_or_default();
            return Err(SvmSettleError::Simulation(
                format!("{err} {last}").trim().to_string(),
            ));
        }
        Ok(PreparedSvm { wire, verified })
    }

    /// Sends a prepared payment and waits until it is confirmed.
    pub async fn submit(&self, prepared: PreparedSvm) -> Result<SvmSettlement, SvmSettleError> {
        let PreparedSvm { wire, verified } = prepared;
        let signature = verified.signature_id.clone();
        match self.rpc.send_transaction(&wire).await {
            Ok(sent) if sent == signature => {}
            Ok(other) => {
                return Err(SvmSettleError::Failed {
                    signature,
                    reason: format!("the node reported another signature ({other})"),
                });
            }
            // A node error on send is a refusal: nothing landed.
            Err(RpcError::Node { message, .. }) => {
                return Err(SvmSettleError::Simulation(message));
            }
            // The answer was lost: it may have landed; wait below as for a sent one.
            Err(e @ RpcError::Transport { .. }) => {
                tracing::warn!(error = %e, %signature, "Solana sendTransaction: no answer; checking whether it landed");
            }
        }
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self
                .rpc
                .signature_statuses(std::slice::from_ref(&signature))
                .await
            {
                Ok(statuses) => {
                    if let Some(Some(st)) = statuses.first() {
                        if let Some(err) = &st.err {
                            return Err(SvmSettleError::Failed {
                                signature,
                                reason: err.to_string(),
                            });
                        }
                        if matches!(
                            st.confirmation_status.as_deref(),
                            Some("confirmed") | Some("finalized")
                        ) {
                            return Ok(SvmSettlement {
                                signature,
                                payer: verified.payer,
                                amount: verified.amount,
                                network: self.settings.caip2.clone(),
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, %signature, "Solana settlement status unavailable; retrying")
                }
            }
            if started.elapsed() > CONFIRM_TIMEOUT {
                return Err(SvmSettleError::OutcomeUnknown { signature });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}
