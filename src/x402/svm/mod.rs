//! Standard x402 `exact` payments on Solana: the checks of the client's partially signed transaction
//! ([`exact`]) and settlement by the gateway's own fee payer ([`settle`]).

pub mod exact;
pub mod settle;
