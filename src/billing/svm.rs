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
        let live = self
            .live_transfers(&network, &req.tx_hash, &status, "read up to slot")
            .await?;
        if live.iter().any(|t| t.status == TransferStatus::Seen) {
            return Err(ClaimError::PendingCommitment {
                commitment: s.commitment.as_str(),
            });
        }
        let (payer, paid) = super::single_payer(&live)?;

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
