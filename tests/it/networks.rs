//! Several networks in one gateway (`[chain]` + `[[networks]]`): two real anvil chains with different chain ids,
//! the same token address and the same payTo on both (as CREATE2 deployments and one operator wallet give on real
//! networks), so nothing but the network key keeps their payments apart. Claims on each, a claim naming the wrong
//! network, a signature made for the other chain, an RPC outage of one chain and a reorg on the other while the first
//! keeps confirming, standard x402 purchases on each network with the official clients, and the upgrade of a
//! database made by the previous release (schema 10, one network) to the keyed schema.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::ReorgOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::store::Store;

use crate::checkout::{T0, sign, usdc};
use crate::clients::{interop_required, python, root, run_client};
use crate::support::*;

const CHAIN_A: u64 = 31337;
const CHAIN_B: u64 = 31338;
const NET_A: &str = "eip155:31337";
const NET_B: &str = "eip155:31338";
const CONFIRMATIONS: u64 = 2;
const HOT_ENV: &str = "TEST_NETWORKS_HOT_KEY";
const AUDITOR_ENV: &str = "TEST_NETWORKS_AUDITOR";
const AUDITOR: &str = "auditor-networks-5d1f0c2b7e";

fn network_section(header: &str, chain_id: u64, chain: &TestChain, rpc: &str) -> String {
    format!(
        r#"{header}
network = "custom"
chain_id = {chain_id}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = {CONFIRMATIONS}
poll_interval_ms = 50
rpc_timeout_ms = 1000
"#,
        token = chain.token(),
        pay_to = chain.pay_to(),
    )
}

/// A gateway selling on chain A (`[chain]`, the first network) and chain B (`[[networks]]`), with standard x402
/// settled by the hot wallet on each. `rpc_a`/`rpc_b` may be fault proxies in front of the chains.
fn config(a: &TestChain, rpc_a: &str, b: &TestChain, rpc_b: &str, db: &std::path::Path) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
public_url = "http://gateway.test"

{chain_a}
{chain_b}
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

[credits]
min_topup_usdc = "10.00"

[auth]
claims_require_signature = true
auditor_token_env = "{AUDITOR_ENV}"

[x402]
settler_key_env = "{HOT_ENV}"
"#,
        chain_a = network_section("[chain]", CHAIN_A, a, rpc_a),
        chain_b = network_section("[[networks]]", CHAIN_B, b, rpc_b),
        db = db.display(),
    )
}

async fn start(
    a: &TestChain,
    rpc_a: &str,
    b: &TestChain,
    rpc_b: &str,
    dir: &std::path::Path,
) -> Gateway {
    let db = dir.join("gateway.db");
    let hot = format!("0x{}", alloy::hex::encode(a.dev.settler.to_bytes()));
    Gateway::start_with_env(
        config(a, rpc_a, b, rpc_b, &db),
        db,
        Arc::new(AtomicI64::new(T0)),
        &[(HOT_ENV, hot.as_str()), (AUDITOR_ENV, AUDITOR)],
    )
    .await
}

/// `/healthz`'s entry for `network`.
async fn health_of(gw: &Gateway, network: &str) -> Value {
    let (_, _, body) = gw.get("/healthz", None).await;
    body["networks"]
        .as_array()
        .and_then(|all| all.iter().find(|n| n["network"] == network))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Mines until `block` is `CONFIRMATIONS` deep on `chain` and waits for `network`'s indexer to get there.
async fn confirm_on(gw: &Gateway, chain: &TestChain, network: &str, block: u64) {
    let need = block + CONFIRMATIONS - 1;
    let head = chain.head().await;
    if head < need {
        chain.mine(need - head).await;
    }
    wait_for(&format!("{network} indexed to {need}"), || async {
        let h = health_of(gw, network).await;
        h["indexer"]["indexedHead"].as_u64().filter(|h| *h >= need)
    })
    .await;
}

async fn claim(gw: &Gateway, body: Value) -> (StatusCode, Value) {
    let (status, _, body) = gw.post("/api/agent/topup", body).await;
    (status, body)
}

async fn audit(gw: &Gateway, path: &str) -> Value {
    let resp = gw
        .http
        .get(format!("{}{path}", gw.base))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn two_networks_index_and_claim_side_by_side_and_never_mix() {
    let (a, b) = tokio::join!(TestChain::start(), TestChain::start_with_id(CHAIN_B));
    assert_eq!(
        a.token(),
        b.token(),
        "the same token address on both chains"
    );
    assert_eq!(a.pay_to(), b.pay_to(), "the same payTo on both chains");
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&a, &a.rpc_url(), &b, &b.rpc_url(), dir.path()).await;

    // The catalog keeps its seed-000 top level (the first network) and lists both.
    let (status, _, catalog) = gw.get("/v1/chat/completions", None).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(catalog["x402"]["chainId"], CHAIN_A);
    let listed: Vec<&str> = catalog["x402"]["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["caip2"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [NET_A, NET_B]);
    assert!(
        catalog["x402"]["networks"][1]["claimMessage"]
            .as_str()
            .unwrap()
            .contains(&format!("chain {CHAIN_B}")),
        "{catalog}"
    );

    // The same payer pays on both chains.
    let payer = a.payer(0).clone();
    let (tx_a, block_a) = a.pay(0, usdc("12")).await;
    let (tx_b, block_b) = b.pay(0, usdc("15")).await;
    assert_ne!(tx_a, tx_b);
    confirm_on(&gw, &a, NET_A, block_a).await;
    confirm_on(&gw, &b, NET_B, block_b).await;

    // B's transaction claimed without a network is looked up on the first network: not there.
    let sig_b = sign(&payer, &claim_text(&tx_b, CHAIN_B));
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b, "amount": "15", "signature": sig_b}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(NET_A)
            || body.to_string().contains(NET_A),
        "{body}"
    );
    // A's transaction claimed on B: not there either.
    let sig_a = sign(&payer, &claim_text(&tx_a, CHAIN_A));
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_a, "amount": "12", "signature": sig_a, "network": NET_B}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // A signature of the claim text for chain A does not claim B's payment.
    let wrong = sign(&payer, &claim_text(&tx_b, CHAIN_A));
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b, "amount": "15", "signature": wrong, "network": NET_B}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // An unknown network is a clear field error.
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b, "amount": "15", "signature": sig_b, "network": "eip155:1"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("network"), "{body}");

    // Each on its own network: credited once.
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b, "amount": "15", "signature": sig_b, "network": NET_B}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_a, "amount": "12", "signature": sig_a, "network": "eip155:31337"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["newBalance"], 27, "{body}");
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b, "amount": "15", "signature": sig_b, "network": NET_B}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Every record names its network; the listing filters by it; revenue is split per network.
    let payments = audit(&gw, &format!("/api/audit/payments?network={NET_B}")).await;
    let rows = payments["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{payments}");
    assert_eq!(rows[0]["txHash"], tx_b.as_str());
    assert_eq!(rows[0]["network"], NET_B);
    assert_eq!(rows[0]["claimed"], true);
    assert!(rows[0]["confirmations"].as_u64().unwrap() >= CONFIRMATIONS);
    let claims = audit(&gw, "/api/audit/claims").await;
    let networks: Vec<(&str, &str)> = claims["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["txHash"].as_str().unwrap(),
                c["network"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(networks.contains(&(tx_a.as_str(), NET_A)), "{claims}");
    assert!(networks.contains(&(tx_b.as_str(), NET_B)), "{claims}");
    let revenue = audit(&gw, "/api/audit/revenue").await;
    let per_network: Vec<(String, String)> = revenue["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["networks"].as_array().cloned().unwrap_or_default())
        .map(|n| {
            (
                n["network"].as_str().unwrap().to_string(),
                n["receivedAtomic"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        per_network.contains(&(NET_A.into(), "12000000".into())),
        "{revenue}"
    );
    assert!(
        per_network.contains(&(NET_B.into(), "15000000".into())),
        "{revenue}"
    );
    let detail = audit(&gw, &format!("/api/audit/payments/{tx_b}")).await;
    assert_eq!(detail["network"], NET_B, "{detail}");
    assert_eq!(detail["transfers"][0]["network"], NET_B, "{detail}");

    // /metrics has each network's indexer gauges, labelled by network.
    let metrics = gw
        .http
        .get(format!("{}/metrics", gw.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for network in [NET_A, NET_B] {
        assert!(
            metrics.contains(&format!(
                "x402_indexer_indexed_head{{network=\"{network}\"}}"
            )),
            "{metrics}"
        );
    }
    // What each network received, as the console and the audit API count it.
    for (network, atomic) in [(NET_A, 12_000_000), (NET_B, 15_000_000)] {
        assert!(
            metrics.contains(&format!(
                "x402_received_usdc_atomic{{network=\"{network}\"}} {atomic}"
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "x402_upto_owed_usdc_atomic{{network=\"{network}\"}} 0"
            )),
            "{metrics}"
        );
    }

    // The database agrees: one binding and one checkpoint per network.
    let store = gw.store().await;
    let bindings: Vec<(String, i64)> = store
        .read(|c| {
            c.query_map(
                "SELECT network, chain_id FROM network_bindings ORDER BY network",
                x402_gateway::params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert_eq!(
        bindings,
        [
            (NET_A.into(), CHAIN_A as i64),
            (NET_B.into(), CHAIN_B as i64)
        ]
    );
    for network in [NET_A, NET_B] {
        assert!(store.checkpoint(network).await.unwrap().is_some());
    }
    gw.stop().await;
}

#[tokio::test]
async fn one_networks_outage_and_anothers_reorg_stall_neither() {
    let (a, b) = tokio::join!(TestChain::start(), TestChain::start_with_id(CHAIN_B));
    let proxy_a =
        TcpFaultProxy::start(format!("127.0.0.1:{}", a.dev.anvil.port()).parse().unwrap()).await;
    let rpc_a = format!("http://{}", proxy_a.addr);
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&a, &rpc_a, &b, &b.rpc_url(), dir.path()).await;
    let payer = a.payer(1).clone();

    // Chain A's RPC goes down (once A is indexed to its head): B's payments are still indexed and claimed.
    let synced_a = a.head().await;
    confirm_on(&gw, &a, NET_A, synced_a.saturating_sub(CONFIRMATIONS - 1)).await;
    let head_a = health_of(&gw, NET_A).await["indexer"]["indexedHead"].as_u64();
    proxy_a.down();
    let (tx_b, block_b) = b.pay(1, usdc("10")).await;
    confirm_on(&gw, &b, NET_B, block_b).await;
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b, "amount": "10", "network": NET_B,
               "signature": sign(&payer, &claim_text(&tx_b, CHAIN_B))}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A payment on A meanwhile is unknown to the gateway, and /healthz says why.
    let (tx_a, block_a) = a.pay(1, usdc("11")).await;
    a.mine(CONFIRMATIONS).await;
    let down = wait_for("chain A's indexer reports the outage", || async {
        let h = health_of(&gw, NET_A).await;
        (h["indexer"]["rpcErrors"].as_u64().unwrap_or(0) > 0).then_some(h)
    })
    .await;
    assert_eq!(down["indexer"]["indexedHead"].as_u64(), head_a, "{down}");
    let (status, _, ready) = gw.get("/readyz", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a lag within bounds is still ready: {ready}"
    );

    // A reorg on B orphans a payment there while A, back up, catches up and confirms its payment.
    let (tx_b2, block_b2) = b.pay(2, usdc("13")).await;
    confirm_on(&gw, &b, NET_B, block_b2).await;
    proxy_a.up();
    b.provider
        .anvil_reorg(ReorgOptions {
            depth: b.head().await - block_b2 + 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    b.mine(CONFIRMATIONS + 1).await;
    confirm_on(&gw, &a, NET_A, block_a).await;
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_a, "amount": "11",
               "signature": sign(&payer, &claim_text(&tx_a, CHAIN_A))}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let store = gw.store().await;
    let orphaned = wait_for("B's reorged payment orphaned", || async {
        let rows = store.transfers_of_tx(NET_B, tx_b2.clone()).await.ok()?;
        rows.iter()
            .all(|t| t.status == x402_gateway::store::transfers::TransferStatus::Orphaned)
            .then_some(rows)
    })
    .await;
    assert!(!orphaned.is_empty());
    let b_health = health_of(&gw, NET_B).await;
    assert!(
        b_health["indexer"]["reorgs"].as_u64().unwrap() >= 1,
        "{b_health}"
    );
    assert_eq!(
        health_of(&gw, NET_A).await["indexer"]["reorgs"].as_u64(),
        Some(0),
        "the reorg was B's alone"
    );
    assert_eq!(store.reorg_count(NET_A).await.unwrap(), 0);
    assert!(store.reorg_count(NET_B).await.unwrap() >= 1);
    let (status, body) = claim(
        &gw,
        json!({"txHash": tx_b2, "amount": "13", "network": NET_B,
               "signature": sign(a.payer(2), &claim_text(&tx_b2, CHAIN_B))}),
    )
    .await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    gw.stop().await;
}

/// Standard x402 on each network with the official clients: the 402 offers one `exact` entry per network, a client
/// told to pay on B signs B's entry, the hot wallet settles on B, and the purchase is recorded on B.
#[tokio::test]
async fn standard_x402_buys_on_each_network_with_the_official_clients() {
    let (a, b) = tokio::join!(TestChain::start(), TestChain::start_with_id(CHAIN_B));
    // The hot wallet pays gas on both chains (anvil funds the same accounts on each).
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&a, &a.rpc_url(), &b, &b.rpc_url(), dir.path()).await;

    let resp = gw
        .http
        .post(format!("{}/x402/credits/10", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
    let header = resp.headers()["payment-required"]
        .to_str()
        .unwrap()
        .to_string();
    let required: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, header).unwrap(),
    )
    .unwrap();
    let offered: Vec<&str> = required["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["network"].as_str().unwrap())
        .collect();
    assert_eq!(offered, [NET_A, NET_B], "{required}");

    let node = std::path::PathBuf::from("node");
    let installed = root().join("node_modules/@x402/fetch").exists();
    assert!(
        installed || !interop_required(),
        "@x402/fetch is not installed"
    );
    let key = |chain: &TestChain, i: usize| {
        format!("0x{}", alloy::hex::encode(chain.payer(i).to_bytes()))
    };
    let token_b = x402_gateway::dev::contracts::TestUSDC::new(b.token(), &b.provider);
    let balance_b = |who| {
        let token_b = token_b.clone();
        async move { token_b.balanceOf(who).call().await.unwrap() }
    };
    let payer = b.payer(0).address();
    let before = balance_b(payer).await;
    let url = format!("{}/x402/credits/10", gw.base);
    let mut bought = Vec::new();
    if installed {
        let out = run_client(
            &node,
            "tests/interop/buy-credits.mjs",
            &[&url, &key(&b, 0), "POST", "", NET_B],
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["paymentResponse"]["network"], NET_B, "{out}");
        bought.push((
            NET_B,
            out["paymentResponse"]["transaction"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
        // It paid on B, from B's balance.
        assert_eq!(
            before - balance_b(payer).await,
            alloy::primitives::U256::from(10_000_000u64)
        );
    }
    if let Some(out) = run_client(
        &python(),
        "tests/interop/buy_credits.py",
        &[&url, &key(&a, 1), "POST", NET_A],
    )
    .await
    {
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["paymentResponse"]["network"], NET_A, "{out}");
        bought.push((
            NET_A,
            out["paymentResponse"]["transaction"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
    }
    // Each settlement is a transaction on its own chain, and its claim names that network.
    let store = gw.store().await;
    for (network, tx) in &bought {
        let chain = if *network == NET_B { &b } else { &a };
        let hash: alloy::primitives::B256 = tx.parse().unwrap();
        let receipt = chain.provider.get_transaction_receipt(hash).await.unwrap();
        assert!(
            receipt.is_some_and(|r| r.status()),
            "{tx} is not mined on {network}"
        );
        let recorded: Vec<(String, String)> = store
            .read({
                let tx = tx.clone();
                move |c| {
                    c.query_map(
                        "SELECT c.network, s.network FROM claims c JOIN x402_settlements s ON s.tx_hash = c.tx_hash \
                         WHERE c.tx_hash = ?1",
                        x402_gateway::params![tx],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                }
            })
            .await
            .unwrap();
        assert_eq!(
            recorded,
            [(network.to_string(), network.to_string())],
            "{tx}"
        );
        // The indexer of that network sees the settlement's transfer; the claim keeps it from being claimed again.
        wait_for(&format!("{tx} indexed on {network}"), || async {
            (!store
                .transfers_of_tx(network, tx.clone())
                .await
                .ok()?
                .is_empty())
            .then_some(())
        })
        .await;
    }
    gw.stop().await;
}

/// A database written by the previous release (schema 10, bound to one network; `fixtures/db/`, made by the
/// binary of commit 190d5b0 through `dev --demo` and the official x402 client) upgrades in place: every row kept,
/// every chain-derived row keyed by the network it was bound to, and `audit verify` against the saved chain is as
/// clean after the upgrade as the old binary found it before.
#[tokio::test]
async fn a_previous_release_database_upgrades_losslessly() {
    let fixtures = root().join("fixtures/db");
    let facts: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("main-schema10.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    std::fs::copy(fixtures.join("main-schema10.sqlite"), &db).unwrap();
    let old_version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(old_version, 10);

    // The saved chain, loaded into a fresh anvil (never written back).
    let anvil = alloy::node_bindings::Anvil::at(anvil_path())
        .chain_id(CHAIN_A)
        .port(0u16)
        .arg("--load-state")
        .arg(fixtures.join("main-schema10.chain.json"))
        .try_spawn()
        .unwrap();
    let config = format!(
        r#"[chain]
network = "custom"
chain_id = {CHAIN_A}
token_address = "{token}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to}"
confirmations = 1

[database]
path = "{db}"

[auth]
claims_require_signature = false
"#,
        token = facts["chain_binding"][0]["token_address"].as_str().unwrap(),
        pay_to = facts["chain_binding"][0]["pay_to"].as_str().unwrap(),
        rpc = anvil.endpoint(),
        db = db.display(),
    );
    let settings = x402_gateway::config::Config::parse(&config, std::path::Path::new("t.toml"))
        .unwrap()
        .resolve(std::path::Path::new("/"), &|_| None)
        .unwrap();
    let store = Store::open(&db).unwrap();
    let count = |table: &'static str| {
        let store = store.clone();
        async move {
            store
                .read(move |c| {
                    c.query_value::<i64>(
                        &format!("SELECT count(*) FROM {table}"),
                        x402_gateway::params![],
                    )
                })
                .await
                .unwrap()
        }
    };
    let counts = facts["row_counts"].as_object().unwrap();
    for (table, n) in counts {
        let moved = match table.as_str() {
            "chain_binding" => "network_bindings",
            "checkpoint" => "network_checkpoints",
            "sqlite_sequence" => continue,
            other => other,
        };
        let table: &'static str = Box::leak(moved.to_string().into_boxed_str());
        assert_eq!(count(table).await, n.as_i64().unwrap(), "rows of {table}");
    }
    // Every chain-derived row is keyed by the network the database was bound to.
    for table in ["transfers", "claims", "x402_settlements", "recent_blocks"] {
        let unkeyed = store
            .read(move |c| {
                c.query_value::<i64>(
                    &format!("SELECT count(*) FROM {table} WHERE network <> '{NET_A}'"),
                    x402_gateway::params![],
                )
            })
            .await
            .unwrap();
        assert_eq!(unkeyed, 0, "{table} rows not keyed by {NET_A}");
    }
    assert_eq!(
        store.checkpoint(NET_A).await.unwrap().map(|c| c.number),
        facts["checkpoint"][0]["block_number"].as_u64()
    );
    // The money is what it was: every account's ledger and balance.
    for (account, sum) in facts["ledger_amount_atomic_by_account"]
        .as_object()
        .unwrap()
    {
        let sum = &sum["sum_amount_atomic"];
        let account = account.clone();
        let (ledger, balance): (i64, i64) = store
            .read(move |c| {
                c.query_one(
                    "SELECT (SELECT coalesce(sum(amount_atomic), 0) FROM ledger WHERE account = ?1), \
                     (SELECT balance_atomic FROM accounts WHERE address = ?1)",
                    x402_gateway::params![account],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await
            .unwrap();
        assert_eq!(ledger, sum.as_i64().unwrap());
        assert_eq!(balance, ledger);
    }
    // `audit verify` (re-reading every transfer from the chain) is as clean as the old binary found it.
    assert_eq!(
        facts["audit_verify"]["exit_code"], 0,
        "the fixture was clean"
    );
    let report = x402_gateway::audit::verify::verify(&settings, &store, &mut |_| {})
        .await
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert_eq!(
        report.transfers_checked as i64,
        counts["transfers"].as_i64().unwrap()
    );
    assert_eq!(
        report.claims_checked as i64,
        counts["claims"].as_i64().unwrap()
    );
    drop(store);

    // The upgraded database serves: a claimed payment stays claimed, and one more network can join it.
    let b = TestChain::start_with_id(CHAIN_B).await;
    let config = format!(
        "{config}\n{}",
        network_section("[[networks]]", CHAIN_B, &b, &b.rpc_url())
    );
    let gw = Gateway::start_with(config, db.clone(), Arc::new(AtomicI64::new(T0))).await;
    let claimed = facts["subscriptions"][0]["tx_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = claim(&gw, json!({"txHash": claimed, "amount": "10"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (tx, block) = b.pay(0, usdc("10")).await;
    confirm_on(&gw, &b, NET_B, block).await;
    let (status, body) = claim(&gw, json!({"txHash": tx, "amount": "10", "network": NET_B})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    gw.stop().await;
}

/// A second token on a network (a euro stablecoin priced at 1.08 USD): indexed beside USDC, credited at its price
/// (rounded down), offered in x402 at the price in its own units (rounded up) and settled in it; an unconfigured
/// token sent to payTo is not a payment.
#[tokio::test]
async fn a_second_token_is_credited_at_its_price_and_sold_in_its_own_units() {
    use alloy::primitives::{B256, Bytes, U256};
    use alloy::signers::SignerSync;
    use x402_gateway::dev::contracts::TestUSDC;
    use x402_gateway::x402::types::{Authorization, ExactEvmPayload, PaymentPayload};
    use x402_gateway::x402::{eip3009, header};

    let a = TestChain::start().await;
    let eurc = TestUSDC::deploy(&a.provider, "EURC".to_string(), "2".to_string())
        .await
        .unwrap();
    let payer = a.payer(0).clone();
    eurc.mint(payer.address(), U256::from(100_000_000u64))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let stray = a.other_token().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let section = network_section("[chain]", CHAIN_A, &a, &a.rpc_url()).replace(
        "rpc_timeout_ms = 1000\n",
        &format!(
            "rpc_timeout_ms = 1000\ntokens = [{{ symbol = \"EURC\", address = \"{:#x}\", name = \"EURC\", \
             version = \"2\", decimals = 6, usd_per_token = \"1.08\" }}]\n",
            eurc.address()
        ),
    );
    let config = format!(
        "{section}\n[database]\npath = \"{}\"\n\n[credits]\nmin_topup_usdc = \"10.00\"\n\n[auth]\n\
         claims_require_signature = false\nauditor_token_env = \"{AUDITOR_ENV}\"\n\n[x402]\nsettler_key_env = \"{HOT_ENV}\"\n",
        db.display()
    );
    let hot = format!("0x{}", alloy::hex::encode(a.dev.settler.to_bytes()));
    let gw = Gateway::start_with_env(
        config,
        db,
        Arc::new(AtomicI64::new(T0)),
        &[(HOT_ENV, hot.as_str()), (AUDITOR_ENV, AUDITOR)],
    )
    .await;

    // The catalog names both tokens with their prices.
    let (_, _, catalog) = gw.get("/api/agent/plans", None).await;
    let tokens = &catalog["x402"]["networks"][0]["tokens"];
    assert_eq!(tokens[0]["symbol"], "USDC", "{catalog}");
    assert_eq!(tokens[1]["symbol"], "EURC");
    assert_eq!(tokens[1]["usdPerToken"], "1.08");

    // 10 EURC to payTo: worth 10.80 USD of credits. A stray token to payTo is no payment.
    let (tx, block) = a
        .transfer_token(*eurc.address(), payer.address(), a.pay_to(), usdc("10"))
        .await;
    let (stray_tx, _) = a
        .transfer_token(stray, payer.address(), a.pay_to(), usdc("10"))
        .await;
    confirm_on(&gw, &a, NET_A, block).await;
    let (status, body) = claim(&gw, json!({"txHash": stray_tx, "amount": "10"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = claim(&gw, json!({"txHash": tx, "amount": "10.81"})).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "more than the payment is worth: {body}"
    );
    let (status, body) = claim(&gw, json!({"txHash": tx, "amount": "10.80"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["newBalanceUsdc"], "10.80", "{body}");
    let payments = audit(&gw, "/api/audit/payments").await;
    let row = payments["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["txHash"] == tx.as_str())
        .cloned()
        .unwrap();
    assert_eq!(row["token"], format!("{:#x}", eurc.address()), "{row}");
    assert_eq!(row["tokenValue"], "10000000");
    assert_eq!(row["valueAtomic"], "10800000");

    // x402: one offer per token; the EURC one asks ceil(10 / 1.08) EURC and settles in EURC.
    let resp = gw
        .http
        .post(format!("{}/x402/credits/10", gw.base))
        .send()
        .await
        .unwrap();
    let offered = header::decode::<x402_gateway::x402::types::PaymentRequired>(
        resp.headers()["payment-required"].to_str().unwrap(),
    )
    .unwrap();
    assert_eq!(offered.accepts.len(), 2);
    assert_eq!(offered.accepts[0].amount, U256::from(10_000_000u64));
    let offer = offered.accepts[1].clone();
    assert_eq!(offer.asset, *eurc.address());
    assert_eq!(offer.amount, U256::from(9_259_260u64));
    let now = {
        use x402_gateway::x402::Clock as _;
        x402_gateway::x402::SystemClock.now()
    };
    let auth = Authorization {
        from: payer.address(),
        to: offer.pay_to,
        value: offer.amount,
        valid_after: U256::from(now - 600),
        valid_before: U256::from(now + offer.max_timeout_seconds),
        nonce: B256::from(rand::random::<[u8; 32]>()),
    };
    let domain = eip3009::network_domain(&x402_gateway::config::Network {
        name: "custom".into(),
        chain_id: CHAIN_A,
        token: *eurc.address(),
        token_name: "EURC".into(),
        token_version: "2".into(),
    });
    let signature = Bytes::from(
        payer
            .sign_hash_sync(&eip3009::digest(&auth, &domain))
            .unwrap()
            .as_bytes()
            .to_vec(),
    );
    let payment = header::encode(&PaymentPayload {
        x402_version: 2,
        resource: Some(offered.resource.clone()),
        accepted: offer,
        payload: ExactEvmPayload {
            signature,
            authorization: auth,
        },
        extensions: None,
    });
    let before = eurc.balanceOf(payer.address()).call().await.unwrap();
    let resp = gw
        .http
        .post(format!("{}/x402/credits/10", gw.base))
        .header("PAYMENT-SIGNATURE", payment)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        before - eurc.balanceOf(payer.address()).call().await.unwrap(),
        U256::from(9_259_260u64),
        "paid in EURC"
    );
    // Credited at the token's price, rounded down: 9.259260 EURC × 1.08 = 10.0000008 → 10.000000 USD.
    let claims = audit(&gw, "/api/audit/claims").await;
    let x402_claim = claims["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["txHash"] != tx.as_str())
        .cloned()
        .unwrap();
    assert_eq!(x402_claim["paidAtomic"], "10000000", "{claims}");
    gw.stop().await;
}
