//! Bindings for the test contracts in `fixtures/` (compiled artifacts embedded at build time).
//!
//! `TestUSDC` behaves like Circle's FiatToken v2.2 for what the gateway uses (6 decimals, EIP-3009, ERC-1271
//! signers); `SmartWallet` is a minimal ERC-1271 contract wallet. Both are for dev chains and tests only.

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
