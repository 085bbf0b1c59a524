//! Standard x402 payments (EVM `exact` scheme, EIP-3009 USDC): wire types and header codecs, the requirements we
//! offer, verification, the in-flight guard and settlement (by our own hot wallet or through a facilitator).
//!
//! Routes use [`X402`]: decode the `PAYMENT-SIGNATURE` / `X-PAYMENT` header with [`header::decode_payment`] (a
//! [`header::HeaderError`] means "no payment": answer a fresh 402), then [`X402::pay`] (or [`X402::reserve`] +
//! [`Reservation::settle`]) against the [`PaymentRequired`] offered for that route, and answer with
//! `PAYMENT-RESPONSE` = [`header::encode`] of [`Settlement::response`] or [`settle::failure_response`].
//!
//! | module | owns |
//! |---|---|
//! | [`types`] | wire structs (v2, v1), amount conversions |
//! | [`header`] | base64 header codecs and header names |
//! | [`requirements`] | building offers, matching a client's `accepted` by value |
//! | [`eip3009`] | EIP-712 digest, signature forms, token calldata |
//! | [`verify`] | verification in the reference order, offer selection |
//! | [`guard`] | at most one settlement per `(from, nonce)` |
//! | [`settle`] | the [`Settler`] trait and [`SelfSettler`] |
//! | [`facilitator`] | [`FacilitatorSettler`] |
//! | [`engine`] | [`X402`]: select → verify → reserve → settle, with an injected [`Clock`] |
//! | [`error`] | [`Reason`] codes and [`PaymentError`] |

pub mod eip3009;
pub mod engine;
pub mod error;
pub mod facilitator;
pub mod guard;
pub mod header;
pub mod permit2;
pub mod reorg;
pub mod requirements;
pub mod settle;
pub mod svm;
pub mod types;
pub mod upto;
pub mod verify;

pub use engine::{Clock, ManualClock, Reservation, SetupError, SystemClock, X402, from_settings};
pub use error::{PaymentError, Reason};
pub use facilitator::FacilitatorSettler;
pub use guard::InFlight;
pub use settle::{SelfSettler, SendError, Settlement, Settler, failure_response};
pub use types::{
    AnyPaymentPayload, PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo,
    SettleResponse,
};
pub use verify::{PaymentRequest, SignerKind, Verified, Verifier};
