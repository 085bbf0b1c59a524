//! Claims of Solana payments: the transaction named by its signature, found by the Solana indexer at the
//! network's commitment, claimed by the wallet that signed the transfer, proven by an ed25519 signature of the
//! claim text (a Solana wallet's `signMessage`). The rest (price, key, ledger) is the EVM claim's.

use super::catalog;
use super::{Billing, ClaimError, ClaimRequest, Claimed};
use crate::chain::svm::address::Pubkey;
use crate::chain::svm::offchain::verify_message_signature;
use crate::config::SvmSettings;
use crate::store::StoreError;
use crate::store::transfers::TransferStatus;
use crate::usdc::Usdc;

impl Billing {
    /// Claims a payment on the Solana network `s` (see the module documentation).
    pub(super) async fn claim_svm(
        &self,
        req: ClaimRequest,
        s: &SvmSettings,
    ) -> Result<Claimed, ClaimError> {
        let network = s.caip2.clone();
        let status = self.indexers.get(&network).cloned().ok_or_else(|| {
            ClaimError::Store(StoreError::Task(format!("no indexer for {network}")))
        })?;
        let text = catalog::claim_text_svm(&req.tx_hash, &network);
        if self.settings.auth.claims_require_signature && req.signature.is_none() {
            return Err(ClaimError::SignatureRequired { text });
        }
        let rows = self
            .store
            .transfers_of_tx(&network, req.tx_hash.clone())
            .await?;
        if rows.is_empty() {
            let head = status.snapshot().indexed_head;
            return Err(ClaimError::NotIndexed {
                tx_hash: req.tx_hash,
                head: format!(
                    " on {network}{}",
                    head.map(|h| format!(" (read up to slot {h})"))
                        .unwrap_or_default()
                ),
            });
        }
        let live: Vec<_> = rows
            .iter()
            .filter(|t| t.status != TransferStatus::Orphaned)
            .collect();
        if live.is_empty() {
            return Err(ClaimError::Orphaned);
        }
        if live.iter().any(|t| t.status == TransferStatus::Seen) {
            return Err(ClaimError::PendingCommitment {
                commitment: s.commitment.as_str(),
            });
        }
        let mut payers: Vec<&str> = live.iter().map(|t| t.from.as_str()).collect();
        payers.sort_unstable();
        payers.dedup();
        if payers.len() > 1 {
            return Err(ClaimError::MultiplePayers(payers.join(", ")));
        }
        let payer = payers[0].to_string();
        let paid = Usdc(live.iter().map(|t| t.value.0).sum());

        // Only the payer can claim: the wallet that signed the transfer signs the claim text.
        if let Some(sig) = &req.signature
            && self.settings.auth.claims_require_signature
        {
            let signer: Pubkey = payer
                .parse()
                .map_err(|_| ClaimError::BadSignature("stored payer".into()))?;
            if verify_message_signature(&signer, text.as_bytes(), sig).is_err() {
                return Err(ClaimError::BadSignature(format!(
                    "it is not an ed25519 signature by the payer {payer} of \"{text}\""
                )));
            }
        }
        self.redeem_claim(req, network, payer, paid).await
    }
}
