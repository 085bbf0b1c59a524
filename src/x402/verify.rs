//! Verification of an exact-scheme EIP-3009 payment against our offer, in the reference order:
//! scheme → EIP-712 domain present → network → signature (ECDSA, else ERC-1271; ERC-6492 unwrapped for deployed
//! wallets) → recipient → value (exactly) → validity window → an `eth_call` simulation of the settlement, whose
//! failure is explained by `authorizationState` and `balanceOf`.
//!
//! Also: choosing which of our offers a payment is for ([`select_offer`]), and the checks that need no chain
//! ([`check_offline`], used in front of a facilitator). `now` (unix seconds) is always passed in by the caller.

use std::sync::Arc;

use alloy::primitives::{Address, Bytes, U256};
use alloy::sol_types::SolValue;

use super::eip3009::{self, Rsv};
use super::error::{PaymentError, Reason};
use super::requirements::{find_accepted, network_matches};
use super::types::{
    AnyPaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SCHEME_EXACT,
    usdc_from_u256,
};
use crate::chain::{Rpc, RpcError};
use crate::config::Network;
use crate::usdc::Usdc;

/// `validBefore` must leave at least this many seconds (one Base block plus slack) for settlement.
pub const VALID_BEFORE_SLACK_SECS: u64 = 6;

/// A payment paired with the offer it pays for.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRequest {
    pub payload: AnyPaymentPayload,
    /// Our offer (never the client's echo).
    pub requirements: PaymentRequirements,
    pub resource: ResourceInfo,
}

impl PaymentRequest {
    pub fn payer(&self) -> Address {
        self.payload.exact().authorization.from
    }
}

/// How the payer's signature is checked on chain, and so which `transferWithAuthorization` overload settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerKind {
    /// An externally owned account: the `(v, r, s)` overload, `v` normalised.
    Eoa(Rsv),
    /// A contract wallet (ERC-1271): the `bytes signature` overload with this signature (ERC-6492 unwrapped).
    Contract(Bytes),
}

/// A payment that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub payer: Address,
    pub amount: Usdc,
    pub signer: SignerKind,
    /// The authorization's `validBefore`, unix seconds (saturated).
    pub valid_before: u64,
}

/// Picks the offer `payload` pays for: the one its `accepted` matches by value (v2), or else the only offer with
/// the same scheme, network and asset, verified against ours (so a client whose echo is slightly off still gets the
/// specific reason, e.g. a value mismatch, instead of a generic one).
pub fn select_offer(
    payload: AnyPaymentPayload,
    offered: &PaymentRequired,
    network: &Network,
) -> Result<PaymentRequest, Reason> {
    if !payload.scheme().eq_ignore_ascii_case(SCHEME_EXACT) {
        return Err(Reason::InvalidScheme(payload.scheme().to_string()));
    }
    if !network_matches(network, payload.network()) {
        return Err(Reason::InvalidNetwork {
            got: payload.network().to_string(),
            expected: network.caip2(),
        });
    }
    let exact: Vec<&PaymentRequirements> = offered
        .accepts
        .iter()
        .filter(|o| o.scheme == SCHEME_EXACT && network_matches(network, &o.network))
        .collect();
    let auth = &payload.exact().authorization;
    let chosen = payload
        .accepted()
        .and_then(|a| find_accepted(a, &offered.accepts))
        .or_else(|| {
            let same_asset: Vec<_> = exact
                .iter()
                .filter(|o| payload.accepted().is_none_or(|a| a.asset == o.asset))
                .collect();
            match same_asset.as_slice() {
                [one] => Some(**one),
                // Several offers (different prices or payees): the one the authorization pays exactly.
                many => many
                    .iter()
                    .find(|o| o.amount == auth.value && o.pay_to == auth.to)
                    .map(|o| **o),
            }
        })
        .ok_or_else(|| {
            Reason::RequirementsMismatch(
                "`accepted` is not one of the offered requirements".to_string(),
            )
        })?;
    Ok(PaymentRequest {
        requirements: chosen.clone(),
        resource: offered.resource.clone(),
        payload,
    })
}

fn check_scheme_and_network(req: &PaymentRequest, network: &Network) -> Result<(), Reason> {
    let r = &req.requirements;
    if !req.payload.scheme().eq_ignore_ascii_case(SCHEME_EXACT) || r.scheme != SCHEME_EXACT {
        return Err(Reason::InvalidScheme(req.payload.scheme().to_string()));
    }
    let extra = r.extra.as_ref();
    if extra.and_then(|e| e.name.as_ref()).is_none()
        || extra.and_then(|e| e.version.as_ref()).is_none()
    {
        return Err(Reason::MissingEip712Domain);
    }
    if !network_matches(network, req.payload.network()) || !network_matches(network, &r.network) {
        return Err(Reason::InvalidNetwork {
            got: req.payload.network().to_string(),
            expected: network.caip2(),
        });
    }
    Ok(())
}

fn check_terms(req: &PaymentRequest, now: u64) -> Result<Usdc, Reason> {
    let r = &req.requirements;
    let auth = &req.payload.exact().authorization;
    if auth.to != r.pay_to {
        return Err(Reason::RecipientMismatch {
            got: auth.to,
            expected: r.pay_to,
        });
    }
    if auth.value != r.amount {
        return Err(Reason::ValueMismatch {
            got: auth.value.to_string(),
            expected: r.amount.to_string(),
        });
    }
    if auth.valid_after > U256::from(now) {
        return Err(Reason::NotYetValid {
            valid_after: auth.valid_after.to_string(),
            now,
        });
    }
    if auth.valid_before < U256::from(now) + U256::from(VALID_BEFORE_SLACK_SECS) {
        return Err(Reason::Expired {
            valid_before: auth.valid_before.to_string(),
            now,
        });
    }
    usdc_from_u256(auth.value).map_err(|e| Reason::InvalidAmount(e.to_string()))
}

/// Everything that needs no chain: scheme, EIP-712 domain, network, recipient, value and validity window (not the
/// signature). Used in front of a facilitator so obviously wrong payments never leave the gateway.
pub fn check_offline(req: &PaymentRequest, network: &Network, now: u64) -> Result<Usdc, Reason> {
    check_scheme_and_network(req, network)?;
    check_terms(req, now)
}

/// The `authorization.validBefore` as unix seconds (saturated at `u64::MAX`).
pub fn valid_before_secs(req: &PaymentRequest) -> u64 {
    let vb = req.payload.exact().authorization.valid_before;
    u64::try_from(vb).unwrap_or(u64::MAX)
}

fn unavailable(what: &'static str) -> impl FnOnce(RpcError) -> PaymentError {
    move |e| PaymentError::Unavailable {
        what,
        message: e.to_string(),
    }
}

/// Verifies payments against the chain.
#[derive(Clone)]
pub struct Verifier {
    rpc: Arc<Rpc>,
    network: Network,
    simulate_from: Option<Address>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("network", &self.network)
            .field("simulate_from", &self.simulate_from)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// `simulate_from`: the address that will send the settlement (the simulation runs as it).
    pub fn new(rpc: Arc<Rpc>, network: Network, simulate_from: Option<Address>) -> Verifier {
        Verifier {
            rpc,
            network,
            simulate_from,
        }
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    pub fn rpc(&self) -> &Arc<Rpc> {
        &self.rpc
    }

    /// Full verification at time `now` (unix seconds). `Rejected` says why the payment is refused;
    /// `Unavailable` means the chain could not be asked.
    pub async fn verify(&self, req: &PaymentRequest, now: u64) -> Result<Verified, PaymentError> {
        check_scheme_and_network(req, &self.network)?;
        let signer = self.check_signature(req).await?;
        let amount = check_terms(req, now)?;
        self.simulate(req, &signer).await?;
        Ok(Verified {
            payer: req.payer(),
            amount,
            signer,
            valid_before: valid_before_secs(req),
        })
    }

    /// The EIP-712 digest of this payment under the offered token's domain.
    pub fn digest(&self, req: &PaymentRequest) -> alloy::primitives::B256 {
        let extra = req.requirements.extra.clone().unwrap_or_default();
        let domain = eip3009::domain(
            extra.name.as_deref().unwrap_or(&self.network.token_name),
            extra
                .version
                .as_deref()
                .unwrap_or(&self.network.token_version),
            self.network.chain_id,
            req.requirements.asset,
        );
        eip3009::digest(&req.payload.exact().authorization, &domain)
    }

    async fn check_signature(&self, req: &PaymentRequest) -> Result<SignerKind, PaymentError> {
        let exact = req.payload.exact();
        let from = exact.authorization.from;
        let digest = self.digest(req);
        let sig = &exact.signature;
        if let Some(wrapped) = eip3009::unwrap_erc6492(sig) {
            let wrapped = wrapped.map_err(|e| {
                Reason::InvalidSignature(format!("malformed ERC-6492 signature: {e}"))
            })?;
            let code = self
                .rpc
                .code(from)
                .await
                .map_err(unavailable("eth_getCode"))?;
            if code.is_empty() {
                return Err(Reason::Erc6492Undeployed.into());
            }
            self.check_erc1271(from, digest, &wrapped.inner).await?;
            return Ok(SignerKind::Contract(wrapped.inner));
        }
        if let Some(rsv) = Rsv::parse(sig)
            && rsv.recover(&digest) == Some(from)
        {
            return Ok(SignerKind::Eoa(rsv));
        }
        let code = self
            .rpc
            .code(from)
            .await
            .map_err(unavailable("eth_getCode"))?;
        if code.is_empty() {
            let why = if sig.len() == 65 {
                "it does not recover to authorization.from (or has a high s / bad v)"
            } else {
                "an account without code needs a 65-byte ECDSA signature"
            };
            return Err(Reason::InvalidSignature(why.to_string()).into());
        }
        self.check_erc1271(from, digest, sig).await?;
        Ok(SignerKind::Contract(sig.clone()))
    }

    async fn check_erc1271(
        &self,
        wallet: Address,
        digest: alloy::primitives::B256,
        sig: &Bytes,
    ) -> Result<(), PaymentError> {
        let call = eip3009::is_valid_signature_call(digest, sig);
        match self.rpc.call(wallet, call).await {
            Ok(answer) if eip3009::is_erc1271_magic(&answer) => Ok(()),
            Ok(_) => Err(Reason::InvalidSignature(
                "the payer's wallet (ERC-1271) does not accept this signature".to_string(),
            )
            .into()),
            Err(RpcError::Node { message, .. }) => Err(Reason::InvalidSignature(format!(
                "the payer's wallet (ERC-1271) rejected the signature: {message}"
            ))
            .into()),
            Err(e) => Err(unavailable("isValidSignature")(e)),
        }
    }

    /// The settlement calldata for `signer`.
    pub fn settlement_call(req: &PaymentRequest, signer: &SignerKind) -> Bytes {
        let auth = &req.payload.exact().authorization;
        match signer {
            SignerKind::Eoa(rsv) => eip3009::transfer_vrs_call(auth, rsv),
            SignerKind::Contract(sig) => eip3009::transfer_bytes_call(auth, sig),
        }
    }

    async fn simulate(
        &self,
        req: &PaymentRequest,
        signer: &SignerKind,
    ) -> Result<(), PaymentError> {
        let token = req.requirements.asset;
        let call = Verifier::settlement_call(req, signer);
        match self.rpc.call_from(self.simulate_from, token, call).await {
            Ok(_) => Ok(()),
            Err(RpcError::Node { message, .. }) => Err(self.explain_failure(req, message).await),
            Err(e) => Err(unavailable("simulating transferWithAuthorization")(e)),
        }
    }

    /// Why `transferWithAuthorization` would fail: a used nonce, too little balance, or the revert message.
    pub async fn explain_failure(&self, req: &PaymentRequest, revert: String) -> PaymentError {
        let token = req.requirements.asset;
        let auth = &req.payload.exact().authorization;
        let (used, balance) = futures::join!(
            self.rpc.call(
                token,
                eip3009::authorization_state_call(auth.from, auth.nonce)
            ),
            self.rpc.call(token, eip3009::balance_of_call(auth.from)),
        );
        if let Ok(used) = used
            && bool::abi_decode(&used).unwrap_or(false)
        {
            return Reason::NonceAlreadyUsed.into();
        }
        if let Ok(balance) = balance
            && let Ok(balance) = U256::abi_decode(&balance)
            && balance < auth.value
        {
            return Reason::InsufficientFunds {
                balance: balance.to_string(),
                amount: auth.value.to_string(),
            }
            .into();
        }
        Reason::SimulationFailed(revert).into()
    }
}
