//! Agent checkout against a real anvil chain and the real HTTP server on port 0: 402 catalog, claims by txHash
//! with payer proof (EOA and ERC-1271 contract wallet), at-most-once, seats, credits, key rotation, bad input,
//! restart. Claims racing each other are in `concurrency.rs`.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use alloy::primitives::{Address, U256};
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::ReorgOptions;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::{claim_text, rotate_text};
use x402_gateway::dev::contracts::{SmartWallet, TestUSDC};
use x402_gateway::store::Store;
use x402_gateway::usdc::Usdc;

use crate::support::*;
use x402_gateway::params;

pub(crate) const CHAIN_ID: u64 = 31337;
pub(crate) const CONFIRMATIONS: u64 = 3;
/// The host of the test config's `server.public_url`, which rotation texts name.
pub(crate) const GATEWAY_HOST: &str = "gateway.test";
/// A fixed "now" for the injected clock (2026-01-01T00:00:00Z).
pub(crate) const T0: i64 = 1_767_225_600;

pub(crate) fn usdc(s: &str) -> Usdc {
    s.parse().unwrap()
}

pub(crate) struct Options {
    pub(crate) europe_seats: u32,
    pub(crate) require_signature: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            europe_seats: 100,
            require_signature: true,
        }
    }
}

pub(crate) fn config_text(chain: &TestChain, db: &std::path::Path, opts: &Options) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
public_url = "http://gateway.test"

[chain]
network = "custom"
chain_id = {CHAIN_ID}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = {CONFIRMATIONS}
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

[[models]]
id = "glm-4.7"
upstream = "none"
input_usdc_per_mtok = "0.40"
output_usdc_per_mtok = "1.60"

[[pools]]
slug = "kimi26"
name = "Kimi K2.6, GLM 4.7"
models = ["kimi-k2.6", "glm-4.7"]
blocks = [
  {{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 100 }},
  {{ name = "europe", hours_utc = "08:00-16:00", price_usdc = "49.00", seats = {seats} }},
  {{ name = "americas", hours_utc = "16:00-24:00", price_usdc = "45.00", seats = 100 }},
]

[credits]
min_topup_usdc = "10.00"

[auth]
claims_require_signature = {sig}
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
        seats = opts.europe_seats,
        sig = opts.require_signature,
    )
}

/// Starts the gateway on `chain` with the checkout test config.
pub(crate) async fn start_gateway(
    chain: &TestChain,
    dir: &std::path::Path,
    opts: Options,
) -> Gateway {
    let db = dir.join("gateway.db");
    Gateway::start_with(
        config_text(chain, &db, &opts),
        db,
        Arc::new(AtomicI64::new(T0)),
    )
    .await
}

/// Waits until the index has `block` at the required depth (mining the blocks it needs).
pub(crate) async fn confirm(gw: &Gateway, chain: &TestChain, block: u64) {
    gw.confirm(chain, block, CONFIRMATIONS).await
}

pub(crate) fn sign(signer: &PrivateKeySigner, text: &str) -> String {
    format!(
        "0x{}",
        alloy::hex::encode(
            signer
                .sign_message_sync(text.as_bytes())
                .unwrap()
                .as_bytes()
        )
    )
}

/// Rotates `signer`'s keys with a message signed at `at`, over the text the gateway's catalog states; returns the
/// first new key.
pub(crate) async fn rotate(gw: &Gateway, signer: &PrivateKeySigner, at: i64) -> String {
    let address = format!("{:#x}", signer.address());
    let (_, _, plans) = gw.get("/api/agent/plans", None).await;
    let text = plans["x402"]["keyRotation"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no rotation text in the catalog: {plans}"))
        .replace("{address}", &address)
        .replace("{signedAt}", &at.to_string());
    let body = json!({"address": address, "signedAt": at, "signature": sign(signer, &text)});
    let (status, _, ok) = gw.post("/api/agent/keys/rotate", body).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    ok["data"]["keys"][0]["apiKey"]
        .as_str()
        .unwrap()
        .to_string()
}

pub(crate) fn claim_sig(signer: &PrivateKeySigner, tx: &str) -> String {
    sign(signer, &claim_text(tx, CHAIN_ID))
}

/// Counts of rows that a claim writes: (claims, api_keys, ledger, subscriptions, seats).
pub(crate) async fn state_counts(store: &Store) -> (i64, i64, i64, i64, i64) {
    store
        .read(|c| -> Result<_, x402_gateway::store::StoreError> {
            let n = |t: &str| {
                c.query_one(&format!("SELECT count(*) FROM {t}"), params![], |r| {
                    r.get::<i64>(0)
                })
            };
            Ok((
                n("claims")?,
                n("api_keys")?,
                n("ledger")?,
                n("subscriptions")?,
                n("seats")?,
            ))
        })
        .await
        .unwrap()
}

pub(crate) fn available(catalog: &Value, block: &str) -> u64 {
    catalog["x402"]["products"][0]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["block"] == block)
        .unwrap()["availableSeats"]
        .as_u64()
        .unwrap()
}

/// 402 → pay → wait → claim → key; front-running fails; duplicates, credits, seats live, restart keeps it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_front_running_credits_and_restart() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&chain, dir.path(), Options::default()).await;
    let payer = chain.payer(0).clone();
    let attacker = chain.payer(1).clone();

    // 1. No key: 402 with the catalog, never cached.
    let resp = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.base))
        .json(&json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let catalog: Value = resp.json().await.unwrap();
    assert_eq!(catalog["error"], "Payment Required");
    let x = &catalog["x402"];
    assert_eq!(x["version"], 2);
    assert_eq!(x["payTo"], format!("{:#x}", chain.pay_to()));
    assert_eq!(x["chainId"], CHAIN_ID);
    assert_eq!(x["claim"]["confirmations"], CONFIRMATIONS);
    assert_eq!(
        x["claim"]["message"],
        "x402-gateway: claim payment {txHash} on chain 31337"
    );
    let sub = &x["products"][0];
    assert_eq!(sub["type"], "subscription");
    assert_eq!(sub["pool"], "kimi26");
    assert_eq!(
        sub["blocks"][0],
        json!({"block": "asia", "hoursUtc": "00:00-08:00 UTC", "priceUsdc": "39.00", "seats": 100, "availableSeats": 100})
    );
    assert_eq!(
        sub["agentCheckout"]["endpoint"],
        "http://gateway.test/api/agent/subscribe-pool"
    );
    assert_eq!(sub["agentCheckout"]["body"]["poolSlug"], "kimi26");
    assert_eq!(x["products"][1]["type"], "credits");
    assert_eq!(x["products"][1]["minAmount"], "10.00");
    assert_eq!(
        x["products"][1]["agentTopup"]["endpoint"],
        "http://gateway.test/api/agent/topup"
    );
    let (status, _, plans) = gw.get("/api/agent/plans", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plans, catalog);
    let (status, _, _) = gw.get("/v1/models", Some("sk-0123456789abcdef-00")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);

    // 2. Pay for asia; before the depth the claim is pending.
    let (tx, block) = chain.pay(0, usdc("39.00")).await;
    let body = json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["asia"], "signature": claim_sig(&payer, &tx)});
    gw.wait_indexed(block).await;
    let (status, headers, pending) = gw.post("/api/agent/subscribe-pool", body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    assert_eq!(pending["error"]["code"], "pending");
    assert_eq!(pending["error"]["required"], CONFIRMATIONS);
    assert!(pending["error"]["confirmations"].as_u64().unwrap() < CONFIRMATIONS);
    assert!(headers.contains_key("retry-after"));
    confirm(&gw, &chain, block).await;

    // 3. Front-running: someone else's signature, or none, fails and changes nothing.
    let store = gw.store().await;
    let before = state_counts(&store).await;
    let mut stolen = body.clone();
    stolen["signature"] = json!(claim_sig(&attacker, &tx));
    let (status, _, err) = gw.post("/api/agent/subscribe-pool", stolen).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    assert_eq!(err["error"]["code"], "invalid_signature");
    let mut unsigned = body.clone();
    unsigned.as_object_mut().unwrap().remove("signature");
    let (status, _, err) = gw.post("/api/agent/subscribe-pool", unsigned).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    assert_eq!(err["error"]["code"], "signature_required");
    assert_eq!(err["error"]["messageToSign"], claim_text(&tx, CHAIN_ID));
    // A signature over another transaction's text does not count either.
    let mut other = body.clone();
    other["signature"] = json!(claim_sig(&payer, &format!("0x{}", "ab".repeat(32))));
    assert_eq!(
        gw.post("/api/agent/subscribe-pool", other).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(state_counts(&store).await, before);

    // 4. The payer claims (hash in upper case is the same transaction).
    let mut upper = body.clone();
    upper["txHash"] = json!(format!("0x{}", tx[2..].to_uppercase()));
    let (status, headers, ok) = gw.post("/api/agent/subscribe-pool", upper).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(ok["success"], true);
    let data = &ok["data"];
    let key = data["apiKey"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-"));
    assert_eq!(data["pool"], "kimi26");
    assert_eq!(data["blocks"], json!(["asia"]));
    assert_eq!(data["amountUsdc"], "39.00");
    assert_eq!(data["expiresAt"], "2026-01-31T00:00:00Z");
    assert!(data.get("surplus").is_none());

    // Twice: 409 naming what it bought.
    let (status, _, dup) = gw.post("/api/agent/subscribe-pool", body.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(dup["error"]["code"], "already_claimed");
    assert_eq!(dup["error"]["claimed"]["pool"], "kimi26");
    assert_eq!(dup["error"]["claimed"]["blocks"], json!(["asia"]));
    let mut as_topup =
        json!({"txHash": tx, "amount": "39.00", "signature": claim_sig(&payer, &tx)});
    assert_eq!(
        gw.post("/api/agent/topup", as_topup.clone()).await.0,
        StatusCode::CONFLICT
    );

    // The key opens /v1 (the proxy itself is issue 4); the seat is taken.
    let (status, _, models) = gw.get("/v1/models", Some(&key)).await;
    assert_eq!(status, StatusCode::OK, "{models}");
    assert_eq!(models["object"], "list");
    let (_, _, plans) = gw.get("/api/agent/plans", None).await;
    assert_eq!(available(&plans, "asia"), 99);
    assert_eq!(available(&plans, "europe"), 100);

    // 5. Credits: the first top-up mints the credit key, later ones credit the same account.
    let (tx1, b1) = chain.pay(0, usdc("50")).await;
    let (tx2, b2) = chain.pay(0, usdc("20.5")).await;
    confirm(&gw, &chain, b1.max(b2)).await;
    as_topup = json!({"txHash": tx1, "amount": 50, "signature": claim_sig(&payer, &tx1)});
    let (status, _, t1) = gw.post("/api/agent/topup", as_topup).await;
    assert_eq!(status, StatusCode::OK, "{t1}");
    assert_eq!(t1["data"]["credited"], true);
    assert_eq!(t1["data"]["newBalance"], json!(50));
    assert_eq!(t1["data"]["newBalanceUsdc"], "50.00");
    let credit_key = t1["data"]["apiKey"].as_str().unwrap().to_string();
    assert_ne!(credit_key, key);
    // Top up 20 of the 20.50 paid: the 0.50 beyond `amount` is credited as well (nothing is lost).
    let (status, _, t2) = gw
        .post(
            "/api/agent/topup",
            json!({"txHash": tx2, "amount": "20", "signature": claim_sig(&payer, &tx2)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{t2}");
    assert_eq!(t2["data"]["newBalance"], json!(70.5));
    assert_eq!(t2["data"]["newBalanceUsdc"], "70.50");
    assert_eq!(t2["data"]["surplusUsdc"], "0.50");
    assert!(t2["data"].get("apiKey").is_none());
    assert_eq!(
        gw.get("/v1/models", Some(&credit_key)).await.0,
        StatusCode::OK
    );

    // 6. Restart: keys, claims, balances and seats survive.
    let after = state_counts(&store).await;
    drop(store);
    let gw = gw.restart().await;
    assert_eq!(gw.get("/v1/models", Some(&key)).await.0, StatusCode::OK);
    assert_eq!(
        gw.get("/v1/models", Some(&credit_key)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        gw.post("/api/agent/subscribe-pool", body).await.0,
        StatusCode::CONFLICT
    );
    let (_, _, plans) = gw.get("/api/agent/plans", None).await;
    assert_eq!(available(&plans, "asia"), 99);
    let store = gw.store().await;
    assert_eq!(state_counts(&store).await, after);
    let view = x402_gateway::billing::account_view(&store, payer.address())
        .await
        .unwrap();
    assert_eq!(view.balance_usdc, usdc("70.50"));
    assert_eq!(view.ledger_sum_usdc, view.balance_usdc);
    assert_eq!(view.claims.len(), 3);

    // 7. Seats return at expiry, and the subscription key stops working.
    gw.set_time(T0 + 30 * 86_400);
    let (_, _, plans) = gw.get("/api/agent/plans", None).await;
    assert_eq!(available(&plans, "asia"), 100);
    assert_eq!(
        gw.get("/v1/models", Some(&key)).await.0,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(
        gw.get("/v1/models", Some(&credit_key)).await.0,
        StatusCode::OK
    );
}

/// Unknown, pending and orphaned payments; the seed-compatible switch that turns the proof off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pending_and_orphaned_payments() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(
        &chain,
        dir.path(),
        Options {
            require_signature: false,
            ..Options::default()
        },
    )
    .await;

    let unknown = format!("0x{}", "12".repeat(32));
    let (status, headers, err) = gw
        .post(
            "/api/agent/topup",
            json!({"txHash": unknown, "amount": "10.00"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(err["error"]["code"], "not_indexed");
    assert!(err["error"]["hint"].as_str().unwrap().contains("retry"));
    assert!(headers.contains_key("retry-after"));

    // Seen at depth 1, then dropped by a reorg.
    let (tx, block) = chain.pay(0, usdc("10")).await;
    gw.wait_indexed(block).await;
    let body = json!({"txHash": tx, "amount": "10.00"});
    let (status, _, err) = gw.post("/api/agent/topup", body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{err}");
    assert_eq!(err["error"]["confirmations"], 1);
    assert_eq!(
        err["error"]["message"],
        "payment pending: 1 of 3 confirmations"
    );
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    chain.mine(CONFIRMATIONS + 1).await;
    let err = wait_for("the payment is orphaned", || async {
        let (status, _, err) = gw.post("/api/agent/topup", body.clone()).await;
        (status == StatusCode::GONE).then_some(err)
    })
    .await;
    assert_eq!(err["error"]["code"], "payment_orphaned");
    assert_eq!(state_counts(&gw.store().await).await.0, 0);

    // With the proof switched off, a confirmed payment is claimable without a signature (seed 000).
    let (tx, block) = chain.pay(1, usdc("12")).await;
    confirm(&gw, &chain, block).await;
    let (status, _, ok) = gw
        .post("/api/agent/topup", json!({"txHash": tx, "amount": "12"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(
        ok["data"]["account"],
        format!("{:#x}", chain.payer(1).address())
    );
}

/// Underpaid, overpaid, the last seat raced, and every malformed field: the documented 4xx, no state change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_seats_and_bad_input() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(
        start_gateway(
            &chain,
            dir.path(),
            Options {
                europe_seats: 1,
                ..Options::default()
            },
        )
        .await,
    );
    let store = gw.store().await;
    let payer = chain.payer(0).clone();

    let (under, b1) = chain.pay(0, usdc("30")).await;
    let (over, b2) = chain.pay(0, usdc("100")).await;
    let (race_a, b3) = chain.pay(1, usdc("49")).await;
    let (race_b, b4) = chain.pay(2, usdc("49")).await;
    confirm(&gw, &chain, b1.max(b2).max(b3).max(b4)).await;
    let sub = |tx: &str, signer: &PrivateKeySigner, blocks: Value| json!({"txHash": tx, "poolSlug": "kimi26", "blocks": blocks, "signature": claim_sig(signer, tx)});

    // Bad input: 400 naming the field, 413 for an oversized body; nothing changes.
    let before = state_counts(&store).await;
    let good = sub(&over, &payer, json!(["asia"]));
    let with = |field: &str, value: Value| {
        let mut b = good.clone();
        b[field] = value;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("poolSlug", json!("nope")), "poolSlug"),
        (with("poolSlug", json!(7)), "poolSlug"),
        (with("blocks", json!(["mars"])), "blocks"),
        (with("blocks", json!(["asia", "asia"])), "blocks"),
        (with("blocks", json!([])), "blocks"),
        (with("blocks", json!("asia")), "blocks"),
        (with("txHash", json!("0x1234")), "txHash"),
        (
            with("txHash", json!(format!("0x{}", "zz".repeat(32)))),
            "txHash",
        ),
        (with("signature", json!("0xnothex")), "signature"),
        (with("signature", json!("abcd")), "signature"),
        (with("signature", json!(12)), "signature"),
        (with("extra", json!(1)), "extra"),
    ];
    for (body, field) in cases {
        let (status, _, err) = gw.post("/api/agent/subscribe-pool", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(err["success"], false);
        assert_eq!(err["error"]["code"], "invalid_field", "{err}");
        assert_eq!(err["error"]["field"], field, "{err}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(field),
            "{err}"
        );
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("txHash");
    let (status, _, err) = gw.post("/api/agent/subscribe-pool", missing).await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("txHash"))
    );
    let topup = |amount: Value| json!({"txHash": under, "amount": amount, "signature": claim_sig(&payer, &under)});
    for amount in [
        json!("ten"),
        json!("1.0000001"),
        json!("-5"),
        json!(10.5),
        json!("5.00"),
        json!("31.00"),
        json!([1]),
    ] {
        let (status, _, err) = gw.post("/api/agent/topup", topup(amount.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{amount}: {err}");
        assert_eq!(err["error"]["field"], "amount", "{err}");
    }
    for raw in ["{", "not json", "[1,2]", "", "{\"txHash\": }"] {
        let (status, _, err) = gw
            .post_raw("/api/agent/subscribe-pool", raw.to_string())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw}");
        assert_eq!(err["success"], false);
        assert_eq!(err["error"]["code"], "invalid_json", "{err}");
    }
    let huge = json!({"txHash": over, "poolSlug": "kimi26", "blocks": ["asia"], "pad": "x".repeat(20_000)});
    let (status, _, err) = gw.post("/api/agent/subscribe-pool", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err["error"]["code"], "body_too_large");
    assert_eq!(state_counts(&store).await, before);

    // Underpaid: 402 with the shortfall; the payment stays claimable, here as credits.
    let (status, _, err) = gw
        .post(
            "/api/agent/subscribe-pool",
            sub(&under, &payer, json!(["asia"])),
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{err}");
    assert_eq!(err["error"]["code"], "underpaid");
    assert_eq!(err["error"]["shortfallUsdc"], "9.00");
    let (status, _, err) = gw
        .post(
            "/api/agent/subscribe-pool",
            sub(&under, &payer, json!(["asia", "europe"])),
        )
        .await;
    assert_eq!(
        (status, err["error"]["shortfallUsdc"].as_str()),
        (StatusCode::PAYMENT_REQUIRED, Some("58.00"))
    );
    assert_eq!(state_counts(&store).await, before);
    let (status, _, ok) = gw.post("/api/agent/topup", topup(json!("30.00"))).await;
    assert_eq!(status, StatusCode::OK, "{ok}");

    // Overpaid: 100 for asia + americas (84): the 16 surplus becomes credits, and the answer says so.
    let (status, _, ok) = gw
        .post(
            "/api/agent/subscribe-pool",
            sub(&over, &payer, json!(["asia", "americas"])),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(ok["data"]["amountUsdc"], "84.00");
    assert_eq!(ok["data"]["paidUsdc"], "100.00");
    assert_eq!(ok["data"]["surplus"]["creditedUsdc"], "16.00");
    assert_eq!(ok["data"]["surplus"]["newBalance"], json!(46));
    assert_eq!(ok["data"]["surplus"]["newBalanceUsdc"], "46.00");

    // The last europe seat, raced by two payers: exactly one wins; the loser's payment stays claimable.
    let a = {
        let gw = gw.clone();
        let body = sub(&race_a, chain.payer(1), json!(["europe"]));
        tokio::spawn(async move { gw.post("/api/agent/subscribe-pool", body).await })
    };
    let b = {
        let gw = gw.clone();
        let body = sub(&race_b, chain.payer(2), json!(["europe"]));
        tokio::spawn(async move { gw.post("/api/agent/subscribe-pool", body).await })
    };
    let (ra, rb) = (a.await.unwrap(), b.await.unwrap());
    let mut statuses = [ra.0, rb.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::CONFLICT],
        "{} / {}",
        ra.2,
        rb.2
    );
    let (loser_tx, loser) = if ra.0 == StatusCode::CONFLICT {
        (&race_a, chain.payer(1))
    } else {
        (&race_b, chain.payer(2))
    };
    let lost = if ra.0 == StatusCode::CONFLICT {
        &ra.2
    } else {
        &rb.2
    };
    assert_eq!(lost["error"]["code"], "sold_out");
    assert_eq!(lost["error"]["block"], "europe");
    let (_, _, plans) = gw.get("/api/agent/plans", None).await;
    assert_eq!(available(&plans, "europe"), 0);
    let (status, _, ok) = gw
        .post(
            "/api/agent/topup",
            json!({"txHash": loser_tx, "amount": "49.00", "signature": claim_sig(loser, loser_tx)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");

    // The ledger's sum is each balance.
    for p in 0..3 {
        let view = x402_gateway::billing::account_view(&store, chain.payer(p).address())
            .await
            .unwrap();
        assert_eq!(view.ledger_sum_usdc, view.balance_usdc);
    }
}

/// A contract wallet (ERC-1271) pays and claims with its owner's signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_wallet_payer_claims_with_erc1271() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&chain, dir.path(), Options::default()).await;
    let owner = chain.payer(2).clone();
    let wallet = SmartWallet::deploy(&chain.provider, owner.address())
        .await
        .unwrap();
    let wallet_addr: Address = *wallet.address();
    // Fund the wallet, then let it pay payTo.
    chain
        .transfer_token(chain.token(), owner.address(), wallet_addr, usdc("60"))
        .await;
    let call = TestUSDC::transferCall {
        to: chain.pay_to(),
        value: U256::from(usdc("45").atomic() as u64),
    };
    let receipt = wallet
        .execute(chain.token(), U256::ZERO, call.abi_encode().into())
        .from(owner.address())
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status());
    let tx = format!("{:#x}", receipt.transaction_hash);
    confirm(&gw, &chain, receipt.block_number.unwrap()).await;

    let body = |sig: String| json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["americas"], "signature": sig});
    // Someone else's signature is refused by the wallet.
    let (status, _, err) = gw
        .post(
            "/api/agent/subscribe-pool",
            body(claim_sig(chain.payer(0), &tx)),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    let (status, _, ok) = gw
        .post("/api/agent/subscribe-pool", body(claim_sig(&owner, &tx)))
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(ok["data"]["account"], format!("{wallet_addr:#x}"));
    assert_eq!(ok["data"]["amountUsdc"], "45.00");
}

/// A lost key is replaced by a fresh signature; old signatures and replays are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_refuses_replays() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&chain, dir.path(), Options::default()).await;
    let payer = chain.payer(0).clone();
    let (tx, block) = chain.pay(0, usdc("49")).await;
    confirm(&gw, &chain, block).await;
    let (status, _, ok) = gw
        .post(
            "/api/agent/subscribe-pool",
            json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["europe"], "signature": claim_sig(&payer, &tx)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    let old_key = ok["data"]["apiKey"].as_str().unwrap().to_string();
    let address = format!("{:#x}", payer.address());

    let rotation = |signer: &PrivateKeySigner, at: i64| json!({"address": address, "signedAt": at, "signature": sign(signer, &rotate_text(&address, GATEWAY_HOST, chain.pay_to(), CHAIN_ID, at))});
    // Wrong signer, stale message, unknown account: refused.
    let (status, _, err) = gw
        .post("/api/agent/keys/rotate", rotation(chain.payer(1), T0))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_signature"))
    );
    let (status, _, err) = gw
        .post("/api/agent/keys/rotate", rotation(&payer, T0 - 3600))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("signature_expired"))
    );
    let stranger = chain.payer(1);
    let s_addr = format!("{:#x}", stranger.address());
    let (status, _, err) = gw
        .post(
            "/api/agent/keys/rotate",
            json!({"address": s_addr, "signedAt": T0, "signature": sign(stranger, &rotate_text(&s_addr, GATEWAY_HOST, chain.pay_to(), CHAIN_ID, T0))}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_account"))
    );
    let (status, _, err) = gw
        .post(
            "/api/agent/keys/rotate",
            json!({"address": "0x12", "signedAt": T0, "signature": "0x00"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("address"))
    );
    assert_eq!(gw.get("/v1/models", Some(&old_key)).await.0, StatusCode::OK);

    // A fresh signature: new key, old one revoked.
    let good = rotation(&payer, T0 + 10);
    gw.set_time(T0 + 20);
    let (status, _, ok) = gw.post("/api/agent/keys/rotate", good.clone()).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    let keys = ok["data"]["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kind"], "subscription");
    assert_eq!(keys[0]["pool"], "kimi26");
    let new_key = keys[0]["apiKey"].as_str().unwrap().to_string();
    assert!(old_key.contains(keys[0]["replaces"].as_str().unwrap()));
    assert_eq!(gw.get("/v1/models", Some(&new_key)).await.0, StatusCode::OK);
    assert_eq!(
        gw.get("/v1/models", Some(&old_key)).await.0,
        StatusCode::PAYMENT_REQUIRED
    );

    // The same signed message again (a replay): refused, and the new key stays valid.
    let (status, _, err) = gw.post("/api/agent/keys/rotate", good).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("signature_replayed"))
    );
    assert_eq!(gw.get("/v1/models", Some(&new_key)).await.0, StatusCode::OK);
}
