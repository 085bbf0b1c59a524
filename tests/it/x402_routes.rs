//! Standard x402 purchases over HTTP against a real anvil chain and the real server on port 0: the 402 challenge,
//! buying credits and a pool subscription with `PAYMENT-SIGNATURE` (and v1 `X-PAYMENT`), one ledger with the
//! claim-by-txHash flow, the same header replayed concurrently, every refusal reason, `payment-identifier`
//! idempotency, re-submission after a reorg, facilitator mode against a settling double, a contract-wallet payer,
//! and the official clients (npm `@x402/fetch` + `@x402/evm`, PyPI `x402`) when installed.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::{ReorgOptions, TransactionData};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use x402_gateway::config::{Config, Network};
use x402_gateway::dev::contracts::{SmartWallet, TestUSDC};
use x402_gateway::store::Store;
use x402_gateway::store::transfers::TransferStatus;
use x402_gateway::usdc::Usdc;
use x402_gateway::x402::types::{Authorization, ExactEvmPayload, PaymentPayloadV1};
use x402_gateway::x402::{
    self, AnyPaymentPayload, PaymentPayload, PaymentRequired, PaymentRequirements, SelfSettler,
    Settler, header,
};

use crate::clients::{interop_required, root, run_client};
use crate::support::*;

const CHAIN_ID: u64 = 31337;
/// anvil account 5: the settlement hot wallet (ETH only).
const HOT_ENV: &str = "TEST_X402_HOT_KEY";

pub struct X402Gateway {
    pub base: String,
    pub http: reqwest::Client,
    pub database: x402_gateway::config::Database,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for X402Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub enum Mode {
    SelfSettle,
    Facilitator(String),
}

fn config(chain: &TestChain, db: &std::path::Path, mode: &Mode, europe_seats: u32) -> String {
    let x402 = match mode {
        Mode::SelfSettle => format!("settler_key_env = \"{HOT_ENV}\""),
        Mode::Facilitator(url) => {
            format!("settlement = \"facilitator\"\nfacilitator_url = \"{url}\"")
        }
    };
    format!(
        r#"[chain]
network = "custom"
chain_id = {CHAIN_ID}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = 1
poll_interval_ms = 50

[database]
path = "{db}"

[[upstreams]]
name = "none"
base_url = "http://127.0.0.1:9/v1"

[[models]]
id = "kimi-k2.6"
upstream = "none"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
per_request_usdc = "0.01"

[[pools]]
slug = "kimi26"
name = "Kimi K2.6"
models = ["kimi-k2.6"]
blocks = [
  {{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 100 }},
  {{ name = "europe", hours_utc = "08:00-16:00", price_usdc = "49.00", seats = {europe_seats} }},
]

[credits]
min_topup_usdc = "10.00"

[x402]
{x402}
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

impl X402Gateway {
    pub async fn start(chain: &TestChain, mode: Mode) -> X402Gateway {
        Self::start_seats(chain, mode, 100).await
    }

    pub async fn start_seats(chain: &TestChain, mode: Mode, europe_seats: u32) -> X402Gateway {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let hot = format!(
            "0x{}",
            alloy::hex::encode(chain.dev.anvil.keys()[5].to_bytes())
        );
        let mut vars = vec![(HOT_ENV.to_string(), hot)];
        let text = engine_config(
            without_rate_limits(config(chain, &db, &mode, europe_seats)),
            &mut vars,
        )
        .await;
        let env = move |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let settings = Config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .resolve(std::path::Path::new("/"), &env)
            .unwrap();
        let database = settings.database.clone();
        assert_engine(&database);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                x402_gateway::api::serve_with_env(
                    settings,
                    listener,
                    shutdown,
                    x402_gateway::billing::system_clock(),
                    &env,
                )
                .await
                .expect("gateway runs");
            }
        });
        let gw = X402Gateway {
            base,
            http: reqwest::Client::new(),
            database,
            shutdown,
            _dir: dir,
        };
        let http = gw.http.clone();
        let url = format!("{}/healthz", gw.base);
        wait_for("the gateway to listen", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.ok().map(|_| ()) }
        })
        .await;
        gw
    }

    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.json::<Value>().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    pub async fn store(&self) -> Store {
        Store::open_database(&self.database).await.unwrap()
    }

    pub async fn settlements(&self) -> Vec<x402_gateway::store::x402::SettlementRow> {
        self.store()
            .await
            .read(|c| -> Result<_, x402_gateway::store::StoreError> {
                x402_gateway::store::x402::list_settlements(c)
            })
            .await
            .unwrap()
    }
}

pub fn required(headers: &HeaderMap) -> PaymentRequired {
    header::decode(headers["payment-required"].to_str().unwrap()).unwrap()
}

pub(crate) fn payment_response(headers: &HeaderMap, name: &str) -> Value {
    header::decode_json(headers[name].to_str().unwrap()).unwrap()
}

pub async fn chain_now(chain: &TestChain) -> u64 {
    chain
        .provider
        .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
        .await
        .unwrap()
        .unwrap()
        .header
        .timestamp
        .max(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
}

pub fn network(chain: &TestChain) -> Network {
    chain.settings(1).network
}

/// The authorization official clients build for `req`, as edited by `edit`.
pub fn authorization(from: Address, req: &PaymentRequirements, now: u64) -> Authorization {
    Authorization {
        from,
        to: req.pay_to,
        value: req.amount,
        valid_after: U256::from(now - 600),
        valid_before: U256::from(now + req.max_timeout_seconds),
        nonce: B256::from(rand::random::<[u8; 32]>()),
    }
}

pub fn sign(chain: &TestChain, key: &PrivateKeySigner, auth: &Authorization) -> Bytes {
    let digest = x402::eip3009::digest(auth, &x402::eip3009::network_domain(&network(chain)));
    Bytes::from(key.sign_hash_sync(&digest).unwrap().as_bytes().to_vec())
}

pub fn v2_header(
    offered: &PaymentRequired,
    auth: Authorization,
    signature: Bytes,
    extensions: Option<Value>,
) -> String {
    header::encode(&PaymentPayload {
        x402_version: 2,
        resource: Some(offered.resource.clone()),
        accepted: offered.accepts[0].clone(),
        payload: ExactEvmPayload {
            signature,
            authorization: auth,
        },
        extensions: extensions.and_then(|e| e.as_object().cloned()),
    })
}

/// Asks `path` for its 402 and pays it with payer `key`, the authorization edited by `edit`.
pub(crate) async fn pay_header(
    gw: &X402Gateway,
    chain: &TestChain,
    key: &PrivateKeySigner,
    path: &str,
    edit: impl FnOnce(&mut Authorization),
) -> String {
    let (status, headers, _) = gw.post(path, &[]).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let offered = required(&headers);
    let mut auth = authorization(key.address(), &offered.accepts[0], chain_now(chain).await);
    edit(&mut auth);
    let sig = sign(chain, key, &auth);
    v2_header(&offered, auth, sig, None)
}

pub(crate) async fn balance(chain: &TestChain, who: Address) -> U256 {
    TestUSDC::new(chain.token(), &chain.provider)
        .balanceOf(who)
        .call()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_challenge_buy_credits_and_pool_one_ledger() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let payer = chain.payer(0).clone();

    // The challenge: v2 header, v1 + agent body, no-store, CORS.
    let (status, headers, body) = gw.post("/x402/credits/10", &[]).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(
        headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("payment-required")
    );
    let raw = header::decode_json(headers["payment-required"].to_str().unwrap()).unwrap();
    assert_eq!(raw["x402Version"], 2);
    let a = &raw["accepts"][0];
    assert_eq!(a["scheme"], "exact");
    assert_eq!(a["network"], "eip155:31337");
    assert_eq!(a["amount"], "10000000");
    assert_eq!(a["asset"], chain.token().to_checksum(None));
    assert_eq!(a["payTo"], chain.pay_to().to_checksum(None));
    assert_eq!(a["maxTimeoutSeconds"], 300);
    assert_eq!(a["extra"], json!({"name": "USDC", "version": "2"}));
    assert!(
        raw["resource"]["url"]
            .as_str()
            .unwrap()
            .ends_with("/x402/credits/10.00")
    );
    assert_eq!(body["x402Version"], 1);
    assert_eq!(body["accepts"][0]["maxAmountRequired"], "10000000");
    assert_eq!(body["paymentRequired"]["accepts"][0]["amount"], "10000000");
    // A browser's preflight is allowed.
    let pre = gw
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/x402/credits/10", gw.base),
        )
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "payment-signature")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());

    // Bad products: 4xx before any payment.
    assert_eq!(
        gw.post("/x402/credits/9.99", &[]).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        gw.post("/x402/credits/abc", &[]).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        gw.post("/x402/pools/nope?blocks=asia", &[]).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        gw.post("/x402/pools/kimi26?blocks=mars", &[]).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        gw.post("/x402/pools/kimi26?blocks=asia,asia", &[]).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        gw.post("/x402/pools/kimi26", &[]).await.0,
        StatusCode::BAD_REQUEST
    );
    // A malformed header is no payment: a fresh 402.
    let (status, headers, body) = gw
        .post("/x402/credits/10", &[("PAYMENT-SIGNATURE", "%%%".into())])
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["reason"], "invalid_payload");
    assert!(headers.contains_key("payment-required"));

    // Buy credits.
    let before = balance(&chain, chain.pay_to()).await;
    let pay = pay_header(&gw, &chain, &payer, "/x402/credits/10", |_| {}).await;
    let (status, headers, body) = gw
        .post("/x402/credits/10", &[("PAYMENT-SIGNATURE", pay)])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["success"], true);
    let data = &body["data"];
    assert_eq!(data["credited"], true);
    assert_eq!(data["newBalance"], json!(10));
    assert_eq!(data["newBalanceUsdc"], "10.00");
    let key = data["apiKey"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-"));
    let pr = payment_response(&headers, "payment-response");
    assert_eq!(pr["success"], true);
    assert_eq!(pr["network"], "eip155:31337");
    assert_eq!(pr["payer"], format!("{:#x}", payer.address()));
    let tx = pr["transaction"].as_str().unwrap().to_string();
    assert_eq!(data["payment"]["transaction"], tx);
    assert_eq!(
        balance(&chain, chain.pay_to()).await - before,
        U256::from(10_000_000)
    );

    // The key works on /v1/* (no 402).
    let res = gw
        .http
        .get(format!("{}/v1/models", gw.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_ne!(res.status(), StatusCode::PAYMENT_REQUIRED);

    // One ledger: the indexer sees the transfer, and it cannot be claimed again by txHash.
    let store = gw.store().await;
    wait_for("the settlement to be indexed as confirmed", || {
        let (store, tx) = (store.clone(), tx.clone());
        async move {
            let rows = store
                .transfers_of_tx(crate::support::DEV_NETWORK, tx)
                .await
                .unwrap();
            rows.iter()
                .any(|t| t.status == TransferStatus::Confirmed)
                .then_some(())
        }
    })
    .await;
    let res = gw
        .http
        .post(format!("{}/api/agent/topup", gw.base))
        .json(&json!({"txHash": tx, "amount": "10.00", "signature": "0x00"}))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let err: Value = res.json().await.unwrap();
    assert!(
        status == StatusCode::CONFLICT || status == StatusCode::UNAUTHORIZED,
        "{status} {err}"
    );
    // With a valid proof, still already claimed.
    let text = x402_gateway::billing::catalog::claim_text(&tx, CHAIN_ID);
    let proof = payer.sign_message_sync(text.as_bytes()).unwrap();
    let res = gw
        .http
        .post(format!("{}/api/agent/topup", gw.base))
        .json(&json!({"txHash": tx, "amount": "10.00",
                      "signature": format!("0x{}", alloy::hex::encode(proof.as_bytes()))}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "already_claimed");

    // A second top-up credits the same account, no new key.
    let pay = pay_header(&gw, &chain, &payer, "/x402/credits/12.5", |_| {}).await;
    let (status, _, body) = gw
        .post("/x402/credits/12.5", &[("PAYMENT-SIGNATURE", pay)])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["newBalance"], json!(22.5));
    assert_eq!(body["data"]["newBalanceUsdc"], "22.50");
    assert!(body["data"].get("apiKey").is_none());

    // A pool subscription.
    let path = "/x402/pools/kimi26?blocks=asia,europe";
    let (_, headers, body) = gw.post(path, &[]).await;
    assert_eq!(
        required(&headers).accepts[0].amount,
        U256::from(88_000_000u64)
    );
    assert_eq!(body["product"]["blocks"], json!(["asia", "europe"]));
    let pay = pay_header(&gw, &chain, chain.payer(1), path, |_| {}).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let data = &body["data"];
    assert_eq!(data["pool"], "kimi26");
    assert_eq!(data["blocks"], json!(["asia", "europe"]));
    assert_eq!(data["amountUsdc"], "88.00");
    assert!(data["apiKey"].as_str().unwrap().starts_with("sk-"));
    assert!(data["expiresAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        payment_response(&headers, "payment-response")["success"],
        true
    );

    // The keyless /v1/* 402 carries the header for the minimum top-up, next to the seed catalog.
    let res = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.base))
        .json(&json!({"model": "kimi-k2.6", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    // kimi-k2.6 has a per-request price here, so the standard header offers that request itself.
    let offered = required(res.headers());
    assert!(
        offered.resource.url.ends_with("/v1/chat/completions"),
        "{}",
        offered.resource.url
    );
    assert_eq!(offered.accepts[0].amount, U256::from(10_000u64));
    let catalog: Value = res.json().await.unwrap();
    assert!(catalog.get("x402Version").is_none() || catalog["x402Version"] != 2);

    // Every settlement is recorded with its authorization and linked key.
    let rows = gw.settlements().await;
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r.status == "settled" && r.key_id.is_some())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_replay_reasons_v1_and_idempotency() {
    let chain = TestChain::start().await;
    let gw = Arc::new(X402Gateway::start(&chain, Mode::SelfSettle).await);
    let payer = chain.payer(0).clone();
    let path = "/x402/credits/10";

    // The same header twice, concurrently: one settlement, one key.
    let pay = pay_header(&gw, &chain, &payer, path, |_| {}).await;
    let before = balance(&chain, chain.pay_to()).await;
    let (h1, h2) = (
        [("PAYMENT-SIGNATURE", pay.clone())],
        [("PAYMENT-SIGNATURE", pay.clone())],
    );
    let (a, b) = tokio::join!(gw.post(path, &h1), gw.post(path, &h2));
    let statuses = [a.0, b.0];
    assert!(statuses.contains(&StatusCode::OK), "{a:?} {b:?}");
    assert!(
        statuses.contains(&StatusCode::PAYMENT_REQUIRED),
        "{a:?} {b:?}"
    );
    let refused = if a.0 == StatusCode::OK { &b } else { &a };
    assert!(
        refused.2["reason"] == "duplicate_payment" || refused.2["reason"] == "nonce_already_used",
        "{}",
        refused.2
    );
    assert!(refused.2.get("data").is_none());
    // And later: still refused, nothing moves.
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert!(
        body["reason"] == "duplicate_payment" || body["reason"] == "nonce_already_used",
        "{body}"
    );
    assert_eq!(
        payment_response(&headers, "payment-response")["success"],
        false
    );
    assert_eq!(
        balance(&chain, chain.pay_to()).await - before,
        U256::from(10_000_000)
    );
    assert_eq!(gw.settlements().await.len(), 1);

    // Every refusal: 402 with the reason, PAYMENT-RESPONSE success false, and no key.
    let now = chain_now(&chain).await;
    let poor = PrivateKeySigner::random();
    type Edit = Box<dyn FnOnce(&mut Authorization)>;
    let cases: Vec<(&str, Edit, &PrivateKeySigner)> = vec![
        (
            "invalid_exact_evm_payload_authorization_valid_before",
            Box::new(move |a| a.valid_before = U256::from(now - 1)),
            &payer,
        ),
        (
            "invalid_exact_evm_payload_authorization_valid_after",
            Box::new(move |a| a.valid_after = U256::from(now + 3600)),
            &payer,
        ),
        (
            "invalid_exact_evm_payload_authorization_value",
            Box::new(|a| a.value = U256::from(9_000_000u64)),
            &payer,
        ),
        (
            "invalid_exact_evm_payload_recipient_mismatch",
            Box::new(|a| a.to = Address::repeat_byte(0x42)),
            &payer,
        ),
        ("insufficient_funds", Box::new(|_| {}), &poor),
    ];
    for (reason, edit, key) in cases {
        let pay = pay_header(&gw, &chain, key, path, edit).await;
        let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{reason}: {body}");
        assert_eq!(body["reason"], reason, "{body}");
        assert!(headers.contains_key("payment-required"));
        let pr = payment_response(&headers, "payment-response");
        assert_eq!(pr["success"], false);
        assert_eq!(pr["errorReason"], reason);
        assert_eq!(pr["transaction"], "");
        assert!(body.get("data").is_none());
    }
    // Bad signature: signed by someone else.
    let (_, headers, _) = gw.post(path, &[]).await;
    let offered = required(&headers);
    let auth = authorization(payer.address(), &offered.accepts[0], now);
    let sig = sign(&chain, &PrivateKeySigner::random(), &auth);
    let (status, _, body) = gw
        .post(
            path,
            &[("PAYMENT-SIGNATURE", v2_header(&offered, auth, sig, None))],
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["reason"], "invalid_exact_evm_payload_signature");
    // Wrong network: the echo names another chain.
    let mut other = offered.clone();
    other.accepts[0].network = "eip155:8453".into();
    let auth = authorization(payer.address(), &offered.accepts[0], now);
    let sig = sign(&chain, &payer, &auth);
    let (status, _, body) = gw
        .post(
            path,
            &[("PAYMENT-SIGNATURE", v2_header(&other, auth, sig, None))],
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["reason"], "invalid_network");
    // Used nonce: the authorization was already used on chain (settled directly, not through us).
    let auth = authorization(payer.address(), &offered.accepts[0], now);
    let sig = sign(&chain, &payer, &auth);
    TestUSDC::new(chain.token(), &chain.provider)
        .transferWithAuthorization_0(
            auth.from,
            auth.to,
            auth.value,
            auth.valid_after,
            auth.valid_before,
            auth.nonce,
            sig.clone(),
        )
        .from(chain.dev.deployer.address())
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let (status, _, body) = gw
        .post(
            path,
            &[("PAYMENT-SIGNATURE", v2_header(&offered, auth, sig, None))],
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["reason"], "nonce_already_used");
    assert_eq!(
        gw.settlements().await.len(),
        1,
        "no refused payment was recorded"
    );

    // v1 client: X-PAYMENT in, X-PAYMENT-RESPONSE out.
    let auth = authorization(payer.address(), &offered.accepts[0], now);
    let sig = sign(&chain, &payer, &auth);
    let v1 = header::encode(&PaymentPayloadV1 {
        x402_version: 1,
        scheme: "exact".into(),
        network: "eip155:31337".into(),
        payload: ExactEvmPayload {
            signature: sig,
            authorization: auth,
        },
    });
    let (status, headers, body) = gw.post(path, &[("X-PAYMENT", v1)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        payment_response(&headers, "x-payment-response")["success"],
        true
    );
    assert!(!headers.contains_key("payment-response"));

    // payment-identifier: same id + same payload → the same answer; same id + another payload → 409.
    let id = "order-0123456789abcdef";
    let ext = json!({"payment-identifier": {"info": {"id": id}}});
    let auth = authorization(chain.payer(2).address(), &offered.accepts[0], now);
    let sig = sign(&chain, chain.payer(2), &auth);
    let pay = v2_header(&offered, auth, sig, Some(ext.clone()));
    let first = gw.post(path, &[("PAYMENT-SIGNATURE", pay.clone())]).await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.2);
    let again = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(again.0, StatusCode::OK);
    assert_eq!(again.2, first.2, "the stored answer, same key");
    assert_eq!(again.1["payment-response"], first.1["payment-response"]);
    let auth = authorization(chain.payer(2).address(), &offered.accepts[0], now);
    let sig = sign(&chain, chain.payer(2), &auth);
    let (status, _, body) = gw
        .post(
            path,
            &[(
                "PAYMENT-SIGNATURE",
                v2_header(&offered, auth, sig, Some(ext)),
            )],
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "payment_identifier_conflict");
    // The stored answer does not reveal the key without the id.
    let key = first.2["data"]["apiKey"].as_str().unwrap().to_string();
    // The raw bytes of the SQLite file (this byte-level check has no PostgreSQL twin).
    if let x402_gateway::config::Database::Sqlite { path } = &gw.database {
        let raw = std::fs::read(path).unwrap();
        assert!(!raw.windows(key.len()).any(|w| w == key.as_bytes()));
    }
    assert_eq!(gw.settlements().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_reorged_settlement_is_resubmitted_or_suspended() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let store = gw.store().await;
    let path = "/x402/credits/10";

    // Reorged out: the same authorization is settled again in a new transaction.
    let pay = pay_header(&gw, &chain, chain.payer(0), path, |_| {}).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tx = payment_response(&headers, "payment-response")["transaction"]
        .as_str()
        .unwrap()
        .to_string();
    let status_of = |tx: String| {
        let store = store.clone();
        async move {
            store
                .transfers_of_tx(crate::support::DEV_NETWORK, tx)
                .await
                .unwrap()
        }
    };
    wait_for("the settlement indexed", || {
        let f = status_of(tx.clone());
        async move { (!f.await.is_empty()).then_some(()) }
    })
    .await;
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    chain.mine(1).await;
    let new_tx = wait_for("the settlement re-submitted", || {
        let gw = &gw;
        let tx = tx.clone();
        async move {
            let rows = gw.settlements().await;
            (rows[0].tx_hash != tx).then(|| rows[0].tx_hash.clone())
        }
    })
    .await;
    wait_for("the re-submitted transfer indexed", || {
        let f = status_of(new_tx.clone());
        async move {
            f.await
                .iter()
                .any(|t| t.status != TransferStatus::Orphaned)
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        balance(&chain, chain.pay_to()).await,
        U256::from(10_000_000u64)
    );
    let key = body["data"]["apiKey"].as_str().unwrap();
    let res = gw
        .http
        .get(format!("{}/v1/models", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_ne!(
        res.status(),
        StatusCode::PAYMENT_REQUIRED,
        "the key still works"
    );
    // The new transaction is linked to the purchase too.
    let claims = store
        .read(move |c| -> Result<_, x402_gateway::store::StoreError> {
            x402_gateway::store::billing::claim_of(c, &new_tx)
        })
        .await
        .unwrap();
    assert!(claims.is_some());

    // Reorged out, and the payer's funds moved in the new chain: the re-submission fails, the key is suspended.
    let payer = chain.payer(1).clone();
    // Everything the payer holds before paying: in the new chain it all goes elsewhere.
    let all = balance(&chain, payer.address()).await;
    let pay = pay_header(&gw, &chain, &payer, path, |_| {}).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["data"]["apiKey"].as_str().unwrap().to_string();
    let tx = payment_response(&headers, "payment-response")["transaction"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the second settlement indexed", || {
        let f = status_of(tx.clone());
        async move { (!f.await.is_empty()).then_some(()) }
    })
    .await;
    let amount = Usdc(i64::try_from(all).unwrap());
    let (_, raw) = chain
        .signed_payment_to(1, Address::repeat_byte(0x99), amount)
        .await;
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![(TransactionData::Raw(raw), 0)],
        })
        .await
        .unwrap();
    chain.mine(1).await;
    wait_for("the key suspended", || {
        let (gw, key) = (&gw, key.clone());
        async move {
            let res = gw
                .http
                .get(format!("{}/v1/models", gw.base))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            (res.status() == StatusCode::PAYMENT_REQUIRED).then_some(())
        }
    })
    .await;
    let events = store
        .read(|c| -> Result<_, x402_gateway::store::StoreError> {
            x402_gateway::store::x402::list_events(c)
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["reorged", "resubmitted", "reorged", "suspended"]);
    assert!(
        events[3]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("insufficient_funds")
    );
    let rows = gw.settlements().await;
    assert_eq!(rows[1].status, "failed");
}

// ---------------------------------------------------------------------------------------------------------------
// Facilitator mode: a small facilitator double that really settles on the dev chain with its own hot wallet.

async fn settling_facilitator(chain: &TestChain) -> String {
    let rpc = Arc::new(
        x402_gateway::chain::Rpc::new(&[chain.rpc_url()], Duration::from_secs(5)).unwrap(),
    );
    let settler = Arc::new(
        SelfSettler::new(
            rpc,
            network(chain),
            PrivateKeySigner::from(chain.dev.anvil.keys()[6].clone()),
        )
        .with_receipt_timeout(Duration::from_secs(20)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    fn request(body: &Value) -> Option<x402::PaymentRequest> {
        let payload: PaymentPayload =
            serde_json::from_value(body["paymentPayload"].clone()).ok()?;
        let requirements: PaymentRequirements =
            serde_json::from_value(body["paymentRequirements"].clone()).ok()?;
        Some(x402::PaymentRequest {
            resource: payload.resource.clone().unwrap_or_default(),
            payload: AnyPaymentPayload::V2(payload),
            requirements,
        })
    }
    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }
    let (v, s) = (settler.clone(), settler);
    let app = axum::Router::new()
        .route(
            "/verify",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
                let req = request(&body).unwrap();
                axum::Json(match v.verify(&req, now()).await {
                    Ok(ok) => json!({"isValid": true, "payer": format!("{:#x}", ok.payer)}),
                    Err(e) => json!({"isValid": false, "invalidReason": e.code()}),
                })
            }),
        )
        .route(
            "/settle",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
                let req = request(&body).unwrap();
                let network = req.requirements.network.clone();
                let out = match s.verify(&req, now()).await {
                    Ok(verified) => match s.settle(&req, &verified).await {
                        Ok(st) => serde_json::to_value(st.response()).unwrap(),
                        Err(e) => json!({"success": false, "errorReason": e.code(), "transaction": "", "network": network}),
                    },
                    Err(e) => json!({"success": false, "errorReason": e.code(), "transaction": "", "network": network}),
                };
                axum::Json(out)
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_facilitator_mode_and_contract_wallet_payer() {
    let chain = TestChain::start().await;
    let facilitator = settling_facilitator(&chain).await;
    let gw = X402Gateway::start(&chain, Mode::Facilitator(facilitator)).await;
    let path = "/x402/credits/10";

    let pay = pay_header(&gw, &chain, chain.payer(0), path, |_| {}).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        payment_response(&headers, "payment-response")["success"],
        true
    );
    assert_eq!(
        balance(&chain, chain.pay_to()).await,
        U256::from(10_000_000u64)
    );
    // A refusal from the facilitator is passed through.
    let pay = pay_header(&gw, &chain, &PrivateKeySigner::random(), path, |_| {}).await;
    let (status, _, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["reason"], "insufficient_funds");

    // A contract wallet (ERC-1271) pays for a subscription; its key belongs to the wallet.
    let owner = PrivateKeySigner::random();
    let wallet = *SmartWallet::deploy(&chain.provider, owner.address())
        .await
        .unwrap()
        .address();
    TestUSDC::new(chain.token(), &chain.provider)
        .mint(wallet, U256::from(100_000_000u64))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let path = "/x402/pools/kimi26?blocks=asia";
    let pay = pay_header(&gw, &chain, &owner, path, |a| a.from = wallet).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["account"], format!("{wallet:#x}"));
    assert_eq!(
        payment_response(&headers, "payment-response")["payer"],
        format!("{wallet:#x}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_sold_out_before_payment_and_per_request_cap() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start_seats(&chain, Mode::SelfSettle, 1).await;
    let path = "/x402/pools/kimi26?blocks=europe";
    let pay = pay_header(&gw, &chain, chain.payer(0), path, |_| {}).await;
    let second = pay_header(&gw, &chain, chain.payer(1), path, |_| {}).await;
    let (status, _, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = balance(&chain, chain.payer(1).address()).await;
    let (status, _, body) = gw.post(path, &[("PAYMENT-SIGNATURE", second)]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "sold_out");
    assert_eq!(
        balance(&chain, chain.payer(1).address()).await,
        before,
        "nothing charged"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// The official clients, run as the project installs them (scripts/test): `node tests/interop/buy-credits.mjs`
// (npm `@x402/fetch` + `@x402/evm`, viem local account) and `.venv/bin/python tests/interop/buy_credits.py` (PyPI
// `x402`). Without them the test says so and passes, unless X402_INTEROP_REQUIRED=1 (scripts/test sets it).

fn key_hex(chain: &TestChain, i: usize) -> String {
    format!("0x{}", alloy::hex::encode(chain.payer(i).to_bytes()))
}

/// A stand-in for the proxy's `/v1/chat/completions`: per-request payment only, echoing the capped body.
async fn per_request_app(chain: &TestChain, db: &std::path::Path) -> String {
    use axum::response::IntoResponse;
    use x402_gateway::api::{AppState, x402 as routes};
    let settings = Config::parse(
        &config(
            chain,
            db,
            &Mode::Facilitator("http://127.0.0.1:1".into()),
            100,
        ),
        std::path::Path::new("t.toml"),
    )
    .unwrap()
    .resolve(std::path::Path::new("/"), &|_| None)
    .unwrap();
    let rpc = Arc::new(
        x402_gateway::chain::Rpc::new(&[chain.rpc_url()], Duration::from_secs(5)).unwrap(),
    );
    let settler = SelfSettler::new(
        rpc,
        network(chain),
        PrivateKeySigner::from(chain.dev.anvil.keys()[7].clone()),
    );
    let engine = x402::X402::new(
        network(chain),
        Arc::new(settler),
        Arc::new(x402::SystemClock),
    );
    let store = Store::open(db).unwrap();
    let state = AppState::new(
        settings,
        store,
        x402_gateway::chain::StatusHandle::default(),
        x402_gateway::billing::system_clock(),
    )
    .unwrap()
    .with_x402(engine);
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(
                |axum::extract::State(state): axum::extract::State<AppState>,
                 headers: axum::http::HeaderMap,
                 body: axum::body::Bytes| async move {
                    // The proxy's wiring: bound the request at the model's per-request price, then the payment.
                    let model = state.settings.model("kimi-k2.6").unwrap().clone();
                    let price = model.per_request.unwrap();
                    let object: serde_json::Map<String, Value> =
                        serde_json::from_slice(&body).unwrap();
                    let chat = x402_gateway::proxy::Api::Chat;
                    let prepared = match x402_gateway::proxy::prepare(
                        chat,
                        object,
                        body.len(),
                        &model,
                        &state.settings,
                        x402_gateway::proxy::Payer::PerRequest { price },
                    ) {
                        Ok(p) => p,
                        Err(e) => {
                            return (StatusCode::BAD_REQUEST, format!("{e:?}")).into_response();
                        }
                    };
                    let forwarded = Value::Object(prepared.body.clone());
                    match routes::authorize_per_request(&state, &headers, chat, "kimi-k2.6", price)
                        .await
                    {
                        Ok(None) => routes::per_request_challenge(
                            &state,
                            &headers,
                            chat,
                            "kimi-k2.6",
                            price,
                        )
                        .unwrap(),
                        Err(response) => response,
                        Ok(Some(paid)) => match paid.settle(&state).await {
                            Ok(s) => (
                                [(s.header_name, s.header_value)],
                                axum::Json(json!({
                                    "served": forwarded,
                                    "bound": prepared.bound.output_tokens_per_choice,
                                })),
                            )
                                .into_response(),
                            Err(response) => response,
                        },
                    }
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_official_clients_buy_and_pay_per_request() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let node = std::path::PathBuf::from("node");
    let fetch_installed = root()
        .join("node_modules/@x402/fetch/package.json")
        .exists();
    assert!(
        fetch_installed || !interop_required(),
        "@x402/fetch is not installed"
    );

    if fetch_installed {
        // @x402/fetch buys credits and a pool subscription.
        let url = format!("{}/x402/credits/10", gw.base);
        let out = run_client(
            &node,
            "tests/interop/buy-credits.mjs",
            &[&url, &key_hex(&chain, 0)],
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200, "{out}");
        assert!(
            out["body"]["data"]["apiKey"]
                .as_str()
                .unwrap()
                .starts_with("sk-")
        );
        assert_eq!(out["paymentResponse"]["success"], true, "{out}");
        let url = format!("{}/x402/pools/kimi26?blocks=asia", gw.base);
        let out = run_client(
            &node,
            "tests/interop/buy-credits.mjs",
            &[&url, &key_hex(&chain, 0)],
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["body"]["data"]["pool"], "kimi26");

        // Per-request payment: the output bound is what 0.01 USDC buys after the prompt bound (less than the
        // 4,000 tokens it would buy alone at 2.50 USDC/Mtok), written into both length fields.
        let dir = tempfile::tempdir().unwrap();
        let app = per_request_app(&chain, &dir.path().join("pr.db")).await;
        let url = format!("{app}/v1/chat/completions");
        let body = json!({"model": "kimi-k2.6", "messages": [], "max_tokens": 100000}).to_string();
        let out = run_client(
            &node,
            "tests/interop/buy-credits.mjs",
            &[&url, &key_hex(&chain, 1), "POST", &body],
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200, "{out}");
        let bound = out["body"]["bound"].as_u64().unwrap();
        assert!(bound > 0 && bound < 4000, "{out}");
        assert_eq!(out["body"]["served"]["max_tokens"], bound);
        assert_eq!(out["body"]["served"]["max_completion_tokens"], bound);
        assert_eq!(out["paymentResponse"]["success"], true);
    }

    // The Python x402 client buys credits.
    let python = root().join(".venv/bin/python");
    let url = format!("{}/x402/credits/10", gw.base);
    if let Some(out) = run_client(
        &python,
        "tests/interop/buy_credits.py",
        &[&url, &key_hex(&chain, 2)],
    )
    .await
    {
        assert_eq!(out["status"], 200, "{out}");
        assert!(
            out["body"]["data"]["apiKey"]
                .as_str()
                .unwrap()
                .starts_with("sk-")
        );
        assert_eq!(out["paymentResponse"]["success"], true, "{out}");
    }
}

/// Per-request payment (issue 13, hole 6): the price must cover the prompt bound plus the output it buys, `n = 1`.
/// A prompt the price cannot cover gets the 402 stating what it needs, before any payment is settled; `n > 1` is
/// refused with a payment in hand, and nothing moves on chain either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_per_request_price_covers_the_prompt_bound_and_buys_one_choice() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let payer = chain.payer(0).clone();
    let post = |body: Value, payment: Option<String>| {
        let mut req = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.base))
            .json(&body);
        if let Some(p) = payment {
            req = req.header("PAYMENT-SIGNATURE", p);
        }
        req.send()
    };
    let paid_header = |headers: &HeaderMap, now: u64| {
        let offered = required(headers);
        let auth = authorization(payer.address(), &offered.accepts[0], now);
        let sig = sign(&chain, &payer, &auth);
        v2_header(&offered, auth, sig, None)
    };
    let before = balance(&chain, payer.address()).await;

    // 100 KB of prompt: its bound alone (~100,000 tokens at 0.60 USDC/Mtok ≈ 0.06 USDC) is over the 0.01 price.
    let long = json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": "word ".repeat(20_000)}]});
    let res = post(long.clone(), None).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    let headers = res.headers().clone();
    let body: Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("needs") && message.contains("0.01 USDC"),
        "{body}"
    );
    // Paying the price anyway changes nothing: refused before the payment is looked at.
    let header = paid_header(&headers, chain_now(&chain).await);
    let res = post(long, Some(header)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);

    // n = 2 with a valid payment: 400 naming `n`, nothing settled.
    let short = json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}]});
    let res = post(short.clone(), None).await.unwrap();
    let header = paid_header(res.headers(), chain_now(&chain).await);
    let mut two = short.clone();
    two["n"] = json!(2);
    let res = post(two, Some(header)).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["param"], "n", "{err}");

    assert_eq!(balance(&chain, payer.address()).await, before);
    assert!(gw.settlements().await.is_empty());
}

/// Every route that answers a keyless request with 402 carries a standard `PAYMENT-REQUIRED` (a v2
/// `PaymentRequired` with an `exact` offer and the `bazaar` discovery extension): the inference routes (priced per
/// request or not, with a body or a GET), the `/v1/*` catch-all, `/v1/models` and `/v1/usage`, the x402 purchase
/// routes on POST and GET, and the agent checkout's underpaid claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402_routes_every_keyless_402_carries_payment_required() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let hello = json!([{"role": "user", "content": "Hello"}]);
    let priced = |api: &str| match api {
        "/v1/chat/completions" => json!({"model": "kimi-k2.6", "messages": hello}),
        "/v1/messages" => json!({"model": "kimi-k2.6", "max_tokens": 16, "messages": hello}),
        "/v1/completions" => json!({"model": "kimi-k2.6", "prompt": "Hello"}),
        _ => json!({"model": "kimi-k2.6", "input": "Hello"}),
    };
    let apis = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    ];
    // (method, path, body, the resource the offer names)
    let mut cases: Vec<(&str, String, Option<Value>, String)> = Vec::new();
    for api in apis {
        cases.push(("POST", api.into(), Some(priced(api)), api.into()));
        cases.push((
            "POST",
            api.into(),
            Some(json!({"model": "unknown", "messages": hello})),
            "/x402/credits/10.00".into(),
        ));
        cases.push(("POST", api.into(), None, "/x402/credits/10.00".into()));
        cases.push(("GET", api.into(), None, "/x402/credits/10.00".into()));
    }
    for path in ["/v1/models", "/v1/usage", "/v1/anything"] {
        cases.push(("GET", path.into(), None, "/x402/credits/10.00".into()));
    }
    cases.push((
        "POST",
        "/v1/anything".into(),
        None,
        "/x402/credits/10.00".into(),
    ));
    for method in ["POST", "GET"] {
        cases.push((
            method,
            "/x402/credits/10".into(),
            None,
            "/x402/credits/10.00".into(),
        ));
        cases.push((
            method,
            "/x402/pools/kimi26?blocks=asia".into(),
            None,
            "/x402/pools/kimi26?blocks=asia".into(),
        ));
    }
    let check = |what: &str, status: StatusCode, headers: &HeaderMap, resource: &str| {
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{what}");
        let raw = header::decode_json(
            headers
                .get("payment-required")
                .unwrap_or_else(|| panic!("{what}: no PAYMENT-REQUIRED"))
                .to_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(raw["x402Version"], 2, "{what}");
        assert_eq!(raw["accepts"][0]["scheme"], "exact", "{what}");
        assert!(
            raw["resource"]["url"].as_str().unwrap().ends_with(resource),
            "{what}: {}",
            raw["resource"]
        );
        let bazaar = &raw["extensions"]["bazaar"];
        assert_eq!(bazaar["info"]["input"]["type"], "http", "{what}");
        assert_eq!(bazaar["info"]["input"]["method"], "POST", "{what}");
        assert!(
            bazaar["schema"]["properties"]["input"].is_object(),
            "{what}"
        );
        assert!(
            headers["access-control-expose-headers"]
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("payment-required"),
            "{what}"
        );
    };
    for (method, path, body, resource) in &cases {
        let mut req = gw
            .http
            .request(method.parse().unwrap(), format!("{}{path}", gw.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.unwrap();
        let what = format!("{method} {path} {body:?}");
        check(&what, res.status(), res.headers(), resource);
        if resource.starts_with("/v1/") {
            // A per-request price: the offer is that request's, and the bazaar input is that API's body.
            let raw =
                header::decode_json(res.headers()["payment-required"].to_str().unwrap()).unwrap();
            assert_eq!(raw["accepts"][0]["amount"], "10000", "{what}");
            assert_eq!(
                raw["extensions"]["bazaar"]["info"]["input"]["body"]["model"], "kimi-k2.6",
                "{what}"
            );
        }
    }

    // The agent checkout: an underpaid claim (1.00 USDC for a 39.00 block) is a 402 with the standard challenge too.
    let (tx, _) = chain.pay(0, Usdc::whole(1)).await;
    let claim = json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["asia"],
                       "signature": crate::checkout::claim_sig(chain.payer(0), &tx)});
    let (status, headers, body) = wait_for("the underpaid claim's answer", || {
        let (gw, claim) = (&gw, claim.clone());
        async move {
            let res = gw
                .http
                .post(format!("{}/api/agent/subscribe-pool", gw.base))
                .json(&claim)
                .send()
                .await
                .unwrap();
            let status = res.status();
            if status == StatusCode::NOT_FOUND || status == StatusCode::ACCEPTED {
                return None;
            }
            let headers = res.headers().clone();
            Some((status, headers, res.json::<Value>().await.unwrap()))
        }
    })
    .await;
    assert_eq!(body["error"]["code"], "underpaid", "{body}");
    check(
        "underpaid subscribe-pool",
        status,
        &headers,
        "/x402/credits/10.00",
    );
}
