//! Bindings for the test contracts in `fixtures/` (compiled artifacts embedded at build time).
//!
//! `TestUSDC` behaves like Circle's FiatToken v2.2 for what the gateway uses (6 decimals, EIP-3009, ERC-1271
//! signers); `SmartWallet` is a minimal ERC-1271 contract wallet; `TestPermit2` is Permit2's SignatureTransfer
//! subset and `TestUptoPermit2Proxy` is ABI-compatible with x402's `x402UptoPermit2Proxy` (installed at their
//! canonical addresses by [`install_upto_contracts`]). All are for dev chains and tests only.

alloy::sol!(
    #[allow(missing_docs, clippy::too_many_arguments)]
    #[sol(rpc)]
    TestUSDC,
    "fixtures/artifacts/TestUSDC.json"
);

alloy::sol!(
    #[allow(missing_docs)]
    #[sol(rpc)]
    SmartWallet,
    "fixtures/artifacts/SmartWallet.json"
);

// Both ABIs name structs `ISignatureTransfer.*`, for which sol! generates a module each: one module per binding.

/// `TestPermit2` and the `ISignatureTransfer` structs of its ABI.
pub mod permit2 {
    alloy::sol!(
        #[allow(missing_docs, clippy::too_many_arguments)]
        #[sol(rpc)]
        TestPermit2,
        "fixtures/artifacts/TestPermit2.json"
    );
}

/// `TestUptoPermit2Proxy` and the `ISignatureTransfer` structs of its ABI.
pub mod upto_proxy {
    alloy::sol!(
        #[allow(missing_docs, clippy::too_many_arguments)]
        #[sol(rpc)]
        TestUptoPermit2Proxy,
        "fixtures/artifacts/TestUptoPermit2Proxy.json"
    );
}

pub use permit2::TestPermit2;
pub use upto_proxy::TestUptoPermit2Proxy;

/// Puts the runtime code of `TestPermit2` and `TestUptoPermit2Proxy` at the canonical Permit2 and x402 upto proxy
/// addresses ([`PERMIT2_ADDRESS`](crate::x402::permit2::PERMIT2_ADDRESS),
/// [`UPTO_PROXY_ADDRESS`](crate::x402::permit2::UPTO_PROXY_ADDRESS)) with `anvil_setCode`, so the official x402
/// clients sign for them unchanged. Anvil only; idempotent (the contracts keep no constructor state: the Permit2
/// domain is computed from `block.chainid`/`address(this)` and the proxy's `PERMIT2` is a constant, and storage such
/// as used nonces is left as it is).
pub async fn install_upto_contracts(
    provider: &impl alloy::providers::Provider,
) -> Result<(), alloy::transports::TransportError> {
    use crate::x402::permit2::{PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS};
    use alloy::providers::ext::AnvilApi;
    provider
        .anvil_set_code(PERMIT2_ADDRESS, TestPermit2::DEPLOYED_BYTECODE.clone())
        .await?;
    provider
        .anvil_set_code(
            UPTO_PROXY_ADDRESS,
            TestUptoPermit2Proxy::DEPLOYED_BYTECODE.clone(),
        )
        .await
}
