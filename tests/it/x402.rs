//! Standard x402 payments against a real anvil chain: EIP-3009 verification in the reference order, self
//! settlement (EOA and ERC-1271 payers), the in-flight guard under concurrency, header codecs, and facilitator
//! mode against an in-process facilitator double. Time is injected (the chain's latest block time), never read
//! from the wall clock; nothing sleeps for a fixed time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::providers::Provider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent, SolValue};
use serde_json::{Value, json};
use x402_gateway::chain::Rpc;
use x402_gateway::config::Network;
use x402_gateway::dev::contracts::{SmartWallet, TestUSDC};
use x402_gateway::store::Store;
use x402_gateway::usdc::Usdc;
use x402_gateway::x402::types::{Authorization, ExactEvmPayload, PaymentPayloadV1};
use x402_gateway::x402::{
    self, AnyPaymentPayload, FacilitatorSettler, ManualClock, PaymentError, PaymentPayload,
    PaymentRequired, ResourceInfo, SelfSettler, Settler, X402, header, requirements,
};

use crate::support::*;

/// Independent EIP-712 digest: the token's own on-chain DOMAIN_SEPARATOR and a hand-rolled struct hash.
async fn onchain_digest(chain: &TestChain, auth: &Authorization) -> B256 {
    let token = TestUSDC::new(chain.token(), &chain.provider);
    let domain_separator = token.DOMAIN_SEPARATOR().call().await.unwrap();
    let typehash = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)",
    );
    let struct_hash = keccak256(
        (
            typehash,
            auth.from,
            auth.to,
            auth.value,
            auth.valid_after,
            auth.valid_before,
            auth.nonce,
        )
            .abi_encode(),
    );
    let mut buf = vec![0x19, 0x01];
    buf.extend_from_slice(domain_separator.as_slice());
    buf.extend_from_slice(struct_hash.as_slice());
    keccak256(buf)
}

struct Fixture {
    chain: TestChain,
    network: Network,
    rpc: Arc<Rpc>,
    hot_wallet: PrivateKeySigner,
    clock: Arc<ManualClock>,
    now: u64,
}

impl Fixture {
    async fn start() -> Fixture {
        let chain = TestChain::start().await;
        let network = chain.settings(1).network;
        let rpc = Arc::new(Rpc::new(&[chain.rpc_url()], Duration::from_secs(5)).unwrap());
        // anvil account 5: funded with ETH, used by nothing else in the tests.
        let hot_wallet = PrivateKeySigner::from(chain.dev.anvil.keys()[5].clone());
        let now = chain_now(&chain).await;
        Fixture {
            chain,
            network,
            rpc,
            hot_wallet,
            clock: Arc::new(ManualClock::new(now)),
            now,
        }
    }

    fn self_settler(&self) -> SelfSettler {
        SelfSettler::new(
            self.rpc.clone(),
            self.network.clone(),
            self.hot_wallet.clone(),
        )
        .with_receipt_timeout(Duration::from_secs(20))
    }

    fn engine(&self) -> X402 {
        X402::new(
            self.network.clone(),
            Arc::new(self.self_settler()),
            self.clock.clone(),
        )
    }

    fn offer(&self, amount: Usdc) -> PaymentRequired {
        let req = requirements::exact_requirements(&self.network, self.chain.pay_to(), amount, 300)
            .unwrap();
        requirements::payment_required(
            ResourceInfo {
                url: "http://127.0.0.1/x402/credits".into(),
                description: Some("credits".into()),
                mime_type: Some("application/json".into()),
            },
            vec![req],
            None,
        )
    }

    /// The authorization official clients build for `offer`: validAfter = now − 600, validBefore = now + 300.
    fn authorization(&self, from: Address, offer: &PaymentRequired) -> Authorization {
        Authorization {
            from,
            to: offer.accepts[0].pay_to,
            value: offer.accepts[0].amount,
            valid_after: U256::from(self.now - 600),
            valid_before: U256::from(self.now + 300),
            nonce: B256::from(rand::random::<[u8; 32]>()),
        }
    }

    async fn sign(&self, key: &PrivateKeySigner, auth: &Authorization) -> Bytes {
        let digest = onchain_digest(&self.chain, auth).await;
        Bytes::from(key.sign_hash_sync(&digest).unwrap().as_bytes().to_vec())
    }

    async fn payment(
        &self,
        key: &PrivateKeySigner,
        offer: &PaymentRequired,
        edit: impl FnOnce(&mut Authorization),
    ) -> AnyPaymentPayload {
        let mut auth = self.authorization(key.address(), offer);
        edit(&mut auth);
        let signature = self.sign(key, &auth).await;
        v2(offer, auth, signature)
    }

    async fn balance(&self, who: Address) -> U256 {
        TestUSDC::new(self.chain.token(), &self.chain.provider)
            .balanceOf(who)
            .call()
            .await
            .unwrap()
    }
}

fn v2(
    offer: &PaymentRequired,
    authorization: Authorization,
    signature: Bytes,
) -> AnyPaymentPayload {
    AnyPaymentPayload::V2(PaymentPayload {
        x402_version: 2,
        resource: Some(offer.resource.clone()),
        accepted: offer.accepts[0].clone(),
        payload: ExactEvmPayload {
            signature,
            authorization,
        },
        extensions: None,
    })
}

async fn chain_now(chain: &TestChain) -> u64 {
    chain
        .provider
        .get_block_by_number(BlockNumberOrTag::Latest)
        .await
        .unwrap()
        .unwrap()
        .header
        .timestamp
}

fn rejected_code(result: Result<impl std::fmt::Debug, PaymentError>) -> String {
    match result {
        Err(PaymentError::Rejected(reason)) => reason.code().to_string(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn usdc(s: &str) -> Usdc {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_digest_matches_the_token_domain() {
    let f = Fixture::start().await;
    let offer = f.offer(usdc("1.00"));
    let auth = f.authorization(f.chain.payer(0).address(), &offer);
    let ours = x402::eip3009::digest(&auth, &x402::eip3009::network_domain(&f.network));
    assert_eq!(ours, onchain_digest(&f.chain, &auth).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_valid_payment_verifies_and_self_settles() {
    let f = Fixture::start().await;
    let engine = f.engine();
    let offer = f.offer(usdc("0.25"));
    let payer = f.chain.payer(0).clone();
    // Through the header, as a client sends it.
    let payment = f.payment(&payer, &offer, |_| {}).await;
    let header_value = header::encode(&match &payment {
        AnyPaymentPayload::V2(p) => p.clone(),
        AnyPaymentPayload::V1(_) => unreachable!(),
    });
    let decoded = header::decode_payment(&header_value).unwrap();
    assert_eq!(decoded, payment);

    let req = engine.request(decoded.clone(), &offer).unwrap();
    let verified = engine.verify(&req).await.unwrap();
    assert_eq!(verified.payer, payer.address());
    assert_eq!(verified.amount, usdc("0.25"));
    assert!(matches!(verified.signer, x402::SignerKind::Eoa(_)));

    let (pay_to_before, payer_before) = (
        f.balance(f.chain.pay_to()).await,
        f.balance(payer.address()).await,
    );
    let settlement = engine.pay(decoded, &offer).await.unwrap();
    assert_eq!(settlement.payer, payer.address());
    assert_eq!(settlement.network, "eip155:31337");
    assert_eq!(
        f.balance(f.chain.pay_to()).await - pay_to_before,
        U256::from(250_000)
    );
    assert_eq!(
        payer_before - f.balance(payer.address()).await,
        U256::from(250_000)
    );

    // Sent by the hot wallet with the (v, r, s) overload; the Transfer log is there for the indexer.
    let tx = f
        .chain
        .provider
        .get_transaction_by_hash(settlement.transaction)
        .await
        .unwrap()
        .unwrap();
    use alloy::consensus::Transaction as _;
    assert_eq!(tx.inner.signer(), f.hot_wallet.address());
    assert_eq!(
        tx.input()[..4],
        TestUSDC::transferWithAuthorization_1Call::SELECTOR
    );
    let receipt = f
        .chain
        .provider
        .get_transaction_receipt(settlement.transaction)
        .await
        .unwrap()
        .unwrap();
    let transfers: Vec<_> = receipt
        .inner
        .logs()
        .iter()
        .filter(|l| l.topics().first() == Some(&TestUSDC::Transfer::SIGNATURE_HASH))
        .map(|l| l.log_decode::<TestUSDC::Transfer>().unwrap())
        .collect();
    assert_eq!(transfers.len(), 1);
    assert_eq!(transfers[0].address(), f.chain.token());
    assert_eq!(transfers[0].inner.from, payer.address());
    assert_eq!(transfers[0].inner.to, f.chain.pay_to());
    assert_eq!(transfers[0].inner.value, U256::from(250_000));

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
    index_once(f.chain.settings(1), &store).await.unwrap();
    let rows = store
        .transfers_of_tx(
            crate::support::DEV_NETWORK,
            format!("{:#x}", settlement.transaction),
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].value, usdc("0.25"));
    assert_eq!(rows[0].from, format!("{:#x}", payer.address()));

    // PAYMENT-RESPONSE
    let response: x402::SettleResponse =
        header::decode(&header::encode(&settlement.response())).unwrap();
    assert!(response.success);
    assert_eq!(
        response.transaction,
        format!("{:#x}", settlement.transaction)
    );
    assert_eq!(response.payer, Some(format!("{:#x}", payer.address())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_same_header_twice_concurrently_settles_once() {
    let f = Fixture::start().await;
    let engine = f.engine();
    let offer = f.offer(usdc("1.00"));
    let payment = f.payment(f.chain.payer(1), &offer, |_| {}).await;
    let before = f.balance(f.chain.pay_to()).await;

    let attempts = (0..4).map(|_| {
        let engine = engine.clone();
        let payment = payment.clone();
        let offer = offer.clone();
        tokio::spawn(async move { engine.pay(payment, &offer).await })
    });
    let results: Vec<_> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let settled: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(settled.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e.code(), "duplicate_payment" | "nonce_already_used"),
                "{e:?}"
            );
        }
    }
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(1_000_000)
    );

    // Later, to the same process: still refused.
    assert_eq!(
        rejected_code(engine.pay(payment.clone(), &offer).await),
        "duplicate_payment"
    );
    // To another process (a restart, a replica): the chain refuses it.
    let other = f.engine();
    assert_eq!(
        rejected_code(other.pay(payment, &offer).await),
        "nonce_already_used"
    );
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(1_000_000)
    );
}

/// Two replicas on one PostgreSQL database (two engines, each with its own in-process guard and its own store):
/// while one holds a payment's authorization (verified, not settled yet), the same payment sent to the other is a
/// `duplicate_payment` — held in the shared database — not a second settlement; once the first settles, a copy is
/// refused by the chain (`nonce_already_used`). USDC moves once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_a_payment_held_by_one_replica_is_a_duplicate_at_another() {
    if std::env::var("X402_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .is_none()
    {
        assert!(
            std::env::var("X402_POSTGRES_REQUIRED").as_deref() != Ok("1"),
            "X402_POSTGRES_REQUIRED=1 but X402_TEST_POSTGRES_URL is not set"
        );
        eprintln!("SKIPPED: X402_TEST_POSTGRES_URL is not set");
        return;
    }
    let database = x402_gateway::config::Database::Postgres {
        url: x402_gateway::config::PostgresUrl::new(fresh_postgres_database().await),
    };
    let f = Fixture::start().await;
    let (a, b) = (
        Store::open_database(&database).await.unwrap(),
        Store::open_database(&database).await.unwrap(),
    );
    // Both replicas are alive (their leases run on the engines' clock, as in `serve`).
    for store in [&a, &b] {
        store.renew_lease(f.now as i64).await.unwrap();
    }
    let (first, second) = (f.engine().with_store(&a), f.engine().with_store(&b));
    let offer = f.offer(usdc("1.00"));
    let payment = f.payment(f.chain.payer(1), &offer, |_| {}).await;
    let before = f.balance(f.chain.pay_to()).await;

    let held = first.reserve(payment.clone(), &offer).await.unwrap();
    assert_eq!(
        rejected_code(second.pay(payment.clone(), &offer).await),
        "duplicate_payment"
    );
    held.settle().await.unwrap();
    assert_eq!(
        rejected_code(second.pay(payment, &offer).await),
        "nonce_already_used"
    );
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(1_000_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_invalid_payments_get_the_right_reason_and_no_transfer() {
    let f = Fixture::start().await;
    let engine = f.engine();
    let offer = f.offer(usdc("2.00"));
    let payer = f.chain.payer(2).clone();
    let pay_to_before = f.balance(f.chain.pay_to()).await;
    let payer_before = f.balance(payer.address()).await;
    let now = f.now;

    let mut cases: Vec<(&str, AnyPaymentPayload)> = vec![
        (
            "invalid_exact_evm_payload_authorization_valid_before",
            f.payment(&payer, &offer, |a| a.valid_before = U256::from(now + 5))
                .await,
        ),
        (
            "invalid_exact_evm_payload_authorization_valid_after",
            f.payment(&payer, &offer, |a| a.valid_after = U256::from(now + 60))
                .await,
        ),
        (
            "invalid_exact_evm_payload_authorization_value",
            f.payment(&payer, &offer, |a| a.value = U256::from(1_999_999))
                .await,
        ),
        (
            "invalid_exact_evm_payload_authorization_value",
            f.payment(&payer, &offer, |a| a.value = U256::from(2_000_001))
                .await,
        ),
        (
            "invalid_exact_evm_payload_recipient_mismatch",
            f.payment(&payer, &offer, |a| a.to = Address::repeat_byte(0x77))
                .await,
        ),
    ];

    // Signed by someone else.
    let auth = f.authorization(payer.address(), &offer);
    let forged = f.sign(f.chain.payer(0), &auth).await;
    cases.push((
        "invalid_exact_evm_payload_signature",
        v2(&offer, auth.clone(), forged),
    ));
    // Not a signature at all.
    cases.push((
        "invalid_exact_evm_payload_signature",
        v2(&offer, auth.clone(), Bytes::from(vec![0xab; 64])),
    ));
    // Tampered after signing.
    let signature = f.sign(&payer, &auth).await;
    let mut tampered = auth.clone();
    tampered.valid_before += U256::from(1);
    cases.push((
        "invalid_exact_evm_payload_signature",
        v2(&offer, tampered, signature),
    ));

    // Wrong network, wrong scheme.
    let mut wrong_network = f.payment(&payer, &offer, |_| {}).await;
    if let AnyPaymentPayload::V2(p) = &mut wrong_network {
        p.accepted.network = "eip155:8453".into();
    }
    cases.push(("invalid_network", wrong_network));
    let mut wrong_scheme = f.payment(&payer, &offer, |_| {}).await;
    if let AnyPaymentPayload::V2(p) = &mut wrong_scheme {
        p.accepted.scheme = "upto".into();
    }
    cases.push(("invalid_scheme", wrong_scheme));

    // A payer without the funds (a fresh key: valid signature, empty balance).
    let broke = PrivateKeySigner::random();
    cases.push((
        "insufficient_funds",
        f.payment(&broke, &offer, |_| {}).await,
    ));

    for (expected, payment) in cases {
        let got = rejected_code(engine.pay(payment.clone(), &offer).await);
        assert_eq!(got, expected, "{payment:?}");
    }
    assert_eq!(f.balance(f.chain.pay_to()).await, pay_to_before);
    assert_eq!(f.balance(payer.address()).await, payer_before);
    assert!(
        engine.in_flight().is_empty(),
        "refused payments hold nothing"
    );

    // A nonce already used on chain (by another authorization with the same nonce).
    let first = f.payment(&payer, &offer, |_| {}).await;
    let nonce = first.exact().authorization.nonce;
    engine.pay(first, &offer).await.unwrap();
    let reused = f
        .payment(&payer, &offer, |a| {
            a.nonce = nonce;
            a.valid_before += U256::from(1);
        })
        .await;
    assert_eq!(
        rejected_code(f.engine().pay(reused, &offer).await),
        "nonce_already_used"
    );
    assert_eq!(
        f.balance(f.chain.pay_to()).await - pay_to_before,
        U256::from(2_000_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_contract_wallet_payer_settles_via_bytes_overload() {
    let f = Fixture::start().await;
    let owner = PrivateKeySigner::random();
    let wallet = SmartWallet::deploy(&f.chain.provider, owner.address())
        .await
        .unwrap();
    let wallet = *wallet.address();
    TestUSDC::new(f.chain.token(), &f.chain.provider)
        .mint(wallet, U256::from(10_000_000u64))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let engine = f.engine();
    let offer = f.offer(usdc("3.00"));
    let before = f.balance(f.chain.pay_to()).await;

    // Someone else's signature is refused by the wallet.
    let auth = f.authorization(wallet, &offer);
    let stranger = f.sign(&PrivateKeySigner::random(), &auth).await;
    assert_eq!(
        rejected_code(engine.pay(v2(&offer, auth, stranger), &offer).await),
        "invalid_exact_evm_payload_signature"
    );

    // The owner signs the digest: ERC-1271 accepts, the bytes overload settles.
    let payment = f.payment(&owner, &offer, |a| a.from = wallet).await;
    let req = engine.request(payment.clone(), &offer).unwrap();
    let verified = engine.verify(&req).await.unwrap();
    assert!(matches!(verified.signer, x402::SignerKind::Contract(_)));
    let settlement = engine.pay(payment, &offer).await.unwrap();
    assert_eq!(settlement.payer, wallet);
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(3_000_000)
    );
    assert_eq!(f.balance(wallet).await, U256::from(7_000_000));
    let tx = f
        .chain
        .provider
        .get_transaction_by_hash(settlement.transaction)
        .await
        .unwrap()
        .unwrap();
    use alloy::consensus::Transaction as _;
    assert_eq!(
        tx.input()[..4],
        TestUSDC::transferWithAuthorization_0Call::SELECTOR
    );

    // ERC-6492-wrapped signature of the deployed wallet: unwrapped and settled.
    let mut auth = f.authorization(wallet, &offer);
    auth.value = offer.accepts[0].amount;
    let inner = f.sign(&owner, &auth).await;
    let mut wrapped = (
        Address::repeat_byte(0xfa),
        Bytes::from(vec![1, 2, 3]),
        inner,
    )
        .abi_encode_params();
    wrapped.extend_from_slice(x402::eip3009::ERC6492_MAGIC.as_slice());
    engine
        .pay(v2(&offer, auth, Bytes::from(wrapped.clone())), &offer)
        .await
        .unwrap();
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(6_000_000)
    );

    // ERC-6492 for a wallet that is not deployed: refused with its own reason.
    let undeployed = Address::repeat_byte(0x5e);
    let auth = f.authorization(undeployed, &offer);
    assert_eq!(
        rejected_code(
            engine
                .pay(v2(&offer, auth, Bytes::from(wrapped)), &offer)
                .await
        ),
        "invalid_exact_evm_payload_undeployed_smart_wallet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_v1_x_payment_settles() {
    let f = Fixture::start().await;
    let engine = f.engine();
    let offer = f.offer(usdc("0.50"));
    let payer = f.chain.payer(0).clone();
    let auth = f.authorization(payer.address(), &offer);
    let signature = f.sign(&payer, &auth).await;
    let v1 = PaymentPayloadV1 {
        x402_version: 1,
        scheme: "exact".into(),
        network: "eip155:31337".into(),
        payload: ExactEvmPayload {
            signature,
            authorization: auth,
        },
    };
    let decoded = header::decode_payment(&header::encode(&v1)).unwrap();
    assert!(matches!(decoded, AnyPaymentPayload::V1(_)));
    let before = f.balance(f.chain.pay_to()).await;
    engine.pay(decoded, &offer).await.unwrap();
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(500_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_headers_round_trip_and_malformed_headers_are_typed_errors() {
    let f = Fixture::start().await;
    let offer = f.offer(usdc("1.00"));
    let required = header::encode(&offer);
    assert!(!required.contains('-') && !required.contains('_') && required.len() % 4 == 0);
    let back: PaymentRequired = header::decode(&required).unwrap();
    assert_eq!(back, offer);
    // The JSON is the reference shape.
    let json = header::decode_json(&required).unwrap();
    assert_eq!(
        json["accepts"][0]["extra"],
        json!({"name": "USDC", "version": "2"})
    );
    assert_eq!(json["accepts"][0]["amount"], "1000000");

    let payment = f.payment(f.chain.payer(0), &offer, |_| {}).await;
    let AnyPaymentPayload::V2(p) = &payment else {
        unreachable!()
    };
    let encoded = header::encode(p);
    // Unknown keys are tolerated; a client's lower-case addresses decode to the same payment.
    let mut j = header::decode_json(&encoded).unwrap();
    j["somethingNew"] = json!({"x": 1});
    j["payload"]["authorization"]["to"] = Value::String(
        j["payload"]["authorization"]["to"]
            .as_str()
            .unwrap()
            .to_lowercase(),
    );
    let reencoded = base64_std(&serde_json::to_vec(&j).unwrap());
    assert_eq!(header::decode_payment(&reencoded).unwrap(), payment);
    // Unpadded input is accepted too.
    assert_eq!(
        header::decode_payment(encoded.trim_end_matches('=')).unwrap(),
        payment
    );

    for bad in [
        "".to_string(),
        "not base64!".to_string(),
        base64_std(b"[1,2,3]"),
        base64_std(br#"{"x402Version":2,"accepted":{}}"#),
        base64_std(br#"{"x402Version":7}"#),
        {
            let mut j = header::decode_json(&encoded).unwrap();
            j["payload"]["authorization"]["value"] = json!("12.5");
            base64_std(&serde_json::to_vec(&j).unwrap())
        },
        {
            let mut j = header::decode_json(&encoded).unwrap();
            j["payload"]["authorization"]["from"] = json!("0x1234");
            base64_std(&serde_json::to_vec(&j).unwrap())
        },
    ] {
        let err = header::decode_payment(&bad).unwrap_err();
        assert!(
            matches!(err.code(), "invalid_payload" | "invalid_x402_version"),
            "{err:?}"
        );
    }
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------------------------
// Facilitator mode against an in-process double.

#[derive(Clone, Copy, PartialEq)]
enum FacilitatorMode {
    Ok,
    Refuse,
    NoTransaction,
}

#[derive(Clone)]
struct FacilitatorDouble {
    url: String,
    calls: Arc<Mutex<Vec<(String, Value)>>>,
    mode: Arc<Mutex<FacilitatorMode>>,
}

const DOUBLE_TX: &str = "0x1111111111111111111111111111111111111111111111111111111111111111";

impl FacilitatorDouble {
    async fn start() -> FacilitatorDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let double = FacilitatorDouble {
            url: format!("http://{}/facilitator", listener.local_addr().unwrap()),
            calls: Arc::default(),
            mode: Arc::new(Mutex::new(FacilitatorMode::Ok)),
        };
        let (v, s) = (double.clone(), double.clone());
        let app = axum::Router::new()
            .route(
                "/facilitator/verify",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
                    v.calls.lock().unwrap().push(("verify".into(), body.clone()));
                    let payer = body["paymentPayload"]["payload"]["authorization"]["from"].clone();
                    let answer = match *v.mode.lock().unwrap() {
                        FacilitatorMode::Refuse => {
                            json!({"isValid": false, "invalidReason": "insufficient_funds", "payer": payer})
                        }
                        _ => json!({"isValid": true, "payer": payer}),
                    };
                    axum::Json(answer)
                }),
            )
            .route(
                "/facilitator/settle",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
                    s.calls.lock().unwrap().push(("settle".into(), body.clone()));
                    let payer = body["paymentPayload"]["payload"]["authorization"]["from"].clone();
                    let network = body["paymentRequirements"]["network"].clone();
                    let answer = match *s.mode.lock().unwrap() {
                        FacilitatorMode::Ok => json!({"success": true, "transaction": DOUBLE_TX, "network": network, "payer": payer}),
                        FacilitatorMode::Refuse => json!({"success": false, "errorReason": "invalid_transaction_state", "transaction": "", "network": network}),
                        FacilitatorMode::NoTransaction => json!({"success": true, "network": network, "payer": payer}),
                    };
                    axum::Json(answer)
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        double
    }

    fn set(&self, mode: FacilitatorMode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn calls(&self) -> Vec<(String, Value)> {
        self.calls.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_facilitator_mode_passes_through_and_rejects_settle_without_transaction() {
    let f = Fixture::start().await;
    let double = FacilitatorDouble::start().await;
    let settler: Arc<dyn Settler> = Arc::new(
        FacilitatorSettler::new(&double.url, f.network.clone(), Duration::from_secs(5)).unwrap(),
    );
    let engine = X402::new(f.network.clone(), settler, f.clock.clone());
    let offer = f.offer(usdc("1.00"));
    let payer = f.chain.payer(0).clone();

    // Pass-through: verify then settle, with the reference body.
    let payment = f.payment(&payer, &offer, |_| {}).await;
    let settlement = engine.pay(payment.clone(), &offer).await.unwrap();
    assert_eq!(format!("{:#x}", settlement.transaction), DOUBLE_TX);
    assert_eq!(settlement.payer, payer.address());
    let calls = double.calls();
    assert_eq!(
        calls.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["verify", "settle"]
    );
    for (_, body) in &calls {
        assert_eq!(body["x402Version"], 2);
        assert_eq!(body["paymentRequirements"]["amount"], "1000000");
        assert_eq!(body["paymentRequirements"]["extra"]["name"], "USDC");
        assert_eq!(
            body["paymentPayload"]["payload"]["authorization"]["nonce"],
            format!("{:#x}", payment.exact().authorization.nonce)
        );
        assert_eq!(body["paymentPayload"]["accepted"]["scheme"], "exact");
    }
    // The same authorization again: this process refuses it without asking.
    assert_eq!(
        rejected_code(engine.pay(payment, &offer).await),
        "duplicate_payment"
    );
    assert_eq!(double.calls().len(), 2);

    // Checks that need no chain run first: an expired payment never reaches the facilitator.
    let expired = f
        .payment(&payer, &offer, |a| a.valid_before = U256::from(f.now + 1))
        .await;
    assert_eq!(
        rejected_code(engine.pay(expired, &offer).await),
        "invalid_exact_evm_payload_authorization_valid_before"
    );
    assert_eq!(double.calls().len(), 2);

    // The facilitator's refusal is passed through with its code.
    double.set(FacilitatorMode::Refuse);
    let refused = f.payment(&payer, &offer, |_| {}).await;
    assert_eq!(
        rejected_code(engine.pay(refused.clone(), &offer).await),
        "insufficient_funds"
    );
    // ... and frees the authorization for a retry.
    let auth = &refused.exact().authorization;
    assert!(!engine.in_flight().contains(auth.from, auth.nonce));

    // 2xx settle without a transaction is not a settlement; the authorization stays held.
    double.set(FacilitatorMode::NoTransaction);
    let err = engine.pay(refused.clone(), &offer).await.unwrap_err();
    assert!(
        matches!(err, PaymentError::OutcomeUnknown { .. }),
        "{err:?}"
    );
    assert_eq!(err.code(), "unexpected_settle_error");
    assert!(engine.in_flight().contains(auth.from, auth.nonce));
    let failure = x402::failure_response(&err, &f.network.caip2(), Some(auth.from));
    assert!(!failure.success && failure.transaction.is_empty());

    // Nothing moved on chain in facilitator mode (the double does not settle).
    let _ = f.balance(f.chain.pay_to()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_concurrent_distinct_payments_all_settle() {
    let f = Fixture::start().await;
    let engine = f.engine();
    let offer = f.offer(usdc("0.10"));
    let before = f.balance(f.chain.pay_to()).await;
    let mut payments = Vec::new();
    for i in 0..9 {
        payments.push(f.payment(f.chain.payer(i % 3), &offer, |_| {}).await);
    }
    let results = futures::future::join_all(payments.into_iter().map(|p| {
        let engine = engine.clone();
        let offer = offer.clone();
        tokio::spawn(async move { engine.pay(p, &offer).await })
    }))
    .await;
    let mut hashes = std::collections::HashSet::new();
    for r in results {
        hashes.insert(r.unwrap().unwrap().transaction);
    }
    assert_eq!(hashes.len(), 9);
    assert_eq!(
        f.balance(f.chain.pay_to()).await - before,
        U256::from(900_000)
    );
}
