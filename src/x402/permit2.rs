//! Permit2 (`permitWitnessTransferFrom`) facts the `upto` scheme relies on: the canonical contract addresses and
//! the EIP-712 types the official x402 clients sign.
//!
//! Addresses: Permit2 is Uniswap's canonical deployment (the same address on every EVM chain, CREATE2); the upto
//! proxy is x402's `x402UptoPermit2Proxy` (`specs/schemes/upto/scheme_upto_evm.md`, annex). Dev chains and tests
//! put the project's own test contracts (`fixtures/contracts/`) at these addresses so clients sign unchanged.

use alloy::primitives::{Address, address};

/// Uniswap's canonical Permit2.
pub const PERMIT2_ADDRESS: Address = address!("000000000022D473030F116dDEE9F6B43aC78BA3");

/// x402's upto Permit2 proxy (`x402UptoPermit2Proxy`): the `spender` of every upto authorization.
pub const UPTO_PROXY_ADDRESS: Address = address!("4020A4f3b7b90ccA423B9fabCc0CE57C6C240002");
