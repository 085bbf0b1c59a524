//! The test Permit2 and x402 upto proxy (`fixtures/contracts/`) at their canonical addresses on anvil: installed by
//! the dev chain, re-installable (idempotent), with the constants the official clients rely on.

use alloy::primitives::keccak256;
use alloy::providers::Provider;
use alloy::sol_types::eip712_domain;
use x402_gateway::dev::{
    self,
    contracts::{TestPermit2, TestUptoPermit2Proxy, install_upto_contracts},
};
use x402_gateway::x402::permit2::{PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS};

use crate::support::TestChain;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_contracts_are_installed_at_the_canonical_addresses() {
    let chain = TestChain::start().await;
    // The dev chain installed them already; installing again changes nothing.
    for _ in 0..2 {
        assert_eq!(
            chain.provider.get_code_at(PERMIT2_ADDRESS).await.unwrap(),
            TestPermit2::DEPLOYED_BYTECODE
        );
        assert_eq!(
            chain
                .provider
                .get_code_at(UPTO_PROXY_ADDRESS)
                .await
                .unwrap(),
            TestUptoPermit2Proxy::DEPLOYED_BYTECODE
        );
        install_upto_contracts(&chain.provider)
            .await
            .expect("anvil_setCode");
    }

    let proxy = TestUptoPermit2Proxy::new(UPTO_PROXY_ADDRESS, &chain.provider);
    assert_eq!(proxy.PERMIT2().call().await.unwrap(), PERMIT2_ADDRESS);
    assert_eq!(
        proxy.WITNESS_TYPEHASH().call().await.unwrap(),
        keccak256("Witness(address to,address facilitator,uint256 validAfter)")
    );
    assert_eq!(
        proxy.WITNESS_TYPE_STRING().call().await.unwrap(),
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)"
    );

    // EIP712Domain(string name,uint256 chainId,address verifyingContract), computed in Rust.
    let domain = eip712_domain! {
        name: "Permit2",
        chain_id: dev::DEV_CHAIN_ID,
        verifying_contract: PERMIT2_ADDRESS,
    };
    let permit2 = TestPermit2::new(PERMIT2_ADDRESS, &chain.provider);
    assert_eq!(
        permit2.DOMAIN_SEPARATOR().call().await.unwrap(),
        domain.separator()
    );
    // Nonces start unused.
    let word = permit2
        .nonceBitmap(chain.payer(0).address(), alloy::primitives::U256::ZERO)
        .call()
        .await
        .unwrap();
    assert!(word.is_zero());
}
