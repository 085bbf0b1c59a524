//! Why a payment is refused ([`Reason`], each with a stable snake_case code for `invalidReason`/`errorReason`) and
//! the error type of the x402 engine ([`PaymentError`]): a refusal of the payment, or an outage of the chain or the
//! facilitator (which says nothing about the payment and is worth retrying).

use alloy::primitives::{Address, B256};

/// A payment refused, with the reason a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("scheme `{0}` is not supported (only `exact`)")]
    InvalidScheme(String),
    #[error("network `{got}` is not the one offered ({expected})")]
    InvalidNetwork { got: String, expected: String },
    #[error("the accepted requirements do not match any offer: {0}")]
    RequirementsMismatch(String),
    #[error("extra.name / extra.version (the token's EIP-712 domain) are missing")]
    MissingEip712Domain,
    #[error("the signature does not authorize this transfer: {0}")]
    InvalidSignature(String),
    #[error(
        "the payer is a smart wallet that is not deployed yet (ERC-6492 signature); deploy it first, then pay again"
    )]
    Erc6492Undeployed,
    #[error("authorization.to is {got}, not payTo {expected}")]
    RecipientMismatch { got: Address, expected: Address },
    #[error("authorization.value is {got}, the price is exactly {expected}")]
    ValueMismatch { got: String, expected: String },
    #[error("authorization is not valid yet (validAfter {valid_after} > now {now})")]
    NotYetValid { valid_after: String, now: u64 },
    #[error("authorization expires too soon (validBefore {valid_before} < now {now} + 6 s)")]
    Expired { valid_before: String, now: u64 },
    #[error("the payer's balance {balance} is below the amount {amount}")]
    InsufficientFunds { balance: String, amount: String },
    #[error("this authorization's nonce has already been used on chain")]
    NonceAlreadyUsed,
    #[error("this authorization is already being settled (or was settled) by this gateway")]
    Duplicate,
    #[error("the transfer would fail on chain: {0}")]
    SimulationFailed(String),
    #[error("the settlement transaction {tx} reverted")]
    SettlementReverted { tx: B256 },
    #[error("amount out of range: {0}")]
    InvalidAmount(String),
    /// An `upto` (Permit2) payment refused, with the code the official x402 SDKs use for it (e.g.
    /// `permit2_allowance_required`, `permit2_deadline_expired`, `upto_facilitator_mismatch`).
    #[error("{message}")]
    Upto { code: &'static str, message: String },
    /// A facilitator's own reason code (opaque; passed through).
    #[error("facilitator refused: {code}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Facilitator {
        code: String,
        message: Option<String>,
    },
}

impl Reason {
    /// The stable code sent as `invalidReason` / `errorReason`.
    pub fn code(&self) -> &str {
        match self {
            Reason::InvalidScheme(_) => "invalid_scheme",
            Reason::InvalidNetwork { .. } => "invalid_network",
            Reason::RequirementsMismatch(_) => "invalid_payment_requirements",
            Reason::MissingEip712Domain => "invalid_exact_evm_payload_missing_eip712_domain",
            Reason::InvalidSignature(_) => "invalid_exact_evm_payload_signature",
            Reason::Erc6492Undeployed => "invalid_exact_evm_payload_undeployed_smart_wallet",
            Reason::RecipientMismatch { .. } => "invalid_exact_evm_payload_recipient_mismatch",
            Reason::ValueMismatch { .. } => "invalid_exact_evm_payload_authorization_value",
            Reason::NotYetValid { .. } => "invalid_exact_evm_payload_authorization_valid_after",
            Reason::Expired { .. } => "invalid_exact_evm_payload_authorization_valid_before",
            Reason::InsufficientFunds { .. } => "insufficient_funds",
            Reason::NonceAlreadyUsed => "nonce_already_used",
            Reason::Duplicate => "duplicate_payment",
            Reason::SimulationFailed(_) => "invalid_exact_evm_payload_simulation_failed",
            Reason::SettlementReverted { .. } => "invalid_transaction_state",
            Reason::InvalidAmount(_) => "invalid_exact_evm_payload_authorization_value",
            Reason::Upto { code, .. } => code,
            Reason::Facilitator { code, .. } => code,
        }
    }
}

/// Why a payment could not be verified or settled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PaymentError {
    /// The payment is refused; answer 402 with the reason.
    #[error("{0}")]
    Rejected(Reason),
    /// The chain or the facilitator could not be asked; nothing is known about the payment. Answer 502/503 (or a
    /// 402 with `unexpected_*`) and let the client retry the same header.
    #[error("{what}: {message}")]
    Unavailable { what: &'static str, message: String },
    /// Settlement may or may not have happened (a transaction sent without a receipt before the timeout, a
    /// facilitator that failed mid-settle). The authorization stays reserved: it may still land, and must not be
    /// processed twice. If it lands, the indexer records the transfer like any other payment.
    #[error("{what}: outcome unknown: {message}")]
    OutcomeUnknown {
        what: &'static str,
        message: String,
        tx: Option<B256>,
    },
}

impl PaymentError {
    /// The code for `invalidReason` / `errorReason`.
    pub fn code(&self) -> &str {
        match self {
            PaymentError::Rejected(r) => r.code(),
            PaymentError::Unavailable { what, .. } if what.contains("settle") => {
                "unexpected_settle_error"
            }
            PaymentError::Unavailable { .. } => "unexpected_verify_error",
            PaymentError::OutcomeUnknown { .. } => "unexpected_settle_error",
        }
    }

    /// The refusal reason, if the payment itself was refused.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            PaymentError::Rejected(r) => Some(r),
            _ => None,
        }
    }
}

impl From<Reason> for PaymentError {
    fn from(r: Reason) -> Self {
        PaymentError::Rejected(r)
    }
}
