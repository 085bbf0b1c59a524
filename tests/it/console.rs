//! The operator's console (issue 20) on a gateway with real traffic: claims, metered requests on two models, an x402
//! `exact` payment and a reorg that reverses a claimed top-up, with an RPC endpoint that refuses (so every RPC
//! client fails over once, and warns). The real binary on a real anvil chain; the page is rendered by headless
//! Chromium (DOM and screenshots at desktop and phone width, with the network closed except loopback) and its
//! numbers are checked against `/api/admin/summary`, the audit API, the key's own `/v1/usage` and `/metrics`.

use std::path::Path;
use std::sync::Arc;

use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::ReorgOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats};
use x402_gateway::usdc::Usdc;

use crate::audit::{ADMIN, AUDITOR, render_dom, screenshot, serve_with_env, sign, visible_text};
use crate::support::*;

/// A secret in the refusing RPC endpoint's URL: it must reach neither the page nor the JSON.
const RPC_SECRET: &str = "k3y0f7h3pr0v1d3r";

/// The config file, on the engine of this run (`env` gets the PostgreSQL URL's variable on PostgreSQL).
async fn config(
    dir: &Path,
    chain: &TestChain,
    upstream: &str,
    env: &mut Vec<(String, String)>,
) -> std::path::PathBuf {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"

[chain]
network = "custom"
chain_id = 31337
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["http://127.0.0.1:9/v3/{RPC_SECRET}", "{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = 1
poll_interval_ms = 50

[database]
path = "gateway.db"

[[upstreams]]
name = "demo"
base_url = "{upstream}"

[[models]]
id = "demo-a"
upstream = "demo"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[models]]
id = "demo-b"
upstream = "demo"
upstream_model = "demo"
input_usdc_per_mtok = "3.00"
output_usdc_per_mtok = "15.00"

[credits]
min_topup_usdc = "1.00"

[auth]
admin_token_env = "TEST_ADMIN_TOKEN"
auditor_token_env = "TEST_AUDITOR_TOKEN"

[x402]
settler_key_env = "TEST_SETTLER_KEY"
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
    );
    let text = engine_config(text, env).await;
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, String) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn json(&self, path: &str, token: Option<&str>) -> Value {
        let (status, body) = self.get(path, token).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn indexed(&self, block: u64) {
        wait_for(&format!("indexed head ≥ {block}"), || async {
            let (_, body) = self.get("/healthz", None).await;
            let v: Value = serde_json::from_str(&body).ok()?;
            v["indexer"]["indexedHead"].as_u64().filter(|h| *h >= block)
        })
        .await;
    }

    /// Claims payment `tx` of payer `i` as a top-up; returns the credit key.
    async fn topup(&self, chain: &TestChain, i: usize, tx: &str, amount: &str) -> String {
        let body = json!({"txHash": tx, "amount": amount, "signature": sign(chain.payer(i), &claim_text(tx, 31337))});
        let resp = self
            .http
            .post(format!("{}/api/agent/topup", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "{v}");
        v["data"]["apiKey"].as_str().unwrap().to_string()
    }

    async fn chat(&self, key: &str, model: &str, text: &str) {
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 7}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{model}: {body}");
    }
}

fn atomic(v: &Value) -> i64 {
    v.as_str()
        .unwrap_or_else(|| panic!("not a USDC string: {v}"))
        .parse::<Usdc>()
        .unwrap()
        .atomic()
}

/// The text after `marker` in `seen`, as whitespace-separated words (at most `n`).
fn after<'a>(seen: &'a str, marker: &str, n: usize) -> Vec<&'a str> {
    seen.split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("{marker:?} is not on the page: {seen}"))
        .split_whitespace()
        .take(n)
        .collect()
}

fn short(s: &str) -> String {
    format!("{}…{}", &s[..6], &s[s.len() - 4..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_real_traffic_equal_to_the_summary_and_the_audit_api() {
    let chain = TestChain::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(upstream::run(
        listener,
        DemoConfig::default(),
        Arc::new(DemoStats::default()),
        tokio_util::sync::CancellationToken::new(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut env = Vec::new();
    let config = config(dir.path(), &chain, &upstream_url, &mut env).await;
    let log = dir.path().join("gateway.log");
    let (server, base) = serve_with_env(&config, &log, &env).await;
    let api = Api {
        http: reqwest::Client::new(),
        base: base.clone(),
    };
    let network = DEV_NETWORK;

    // 1. A top-up claimed, spent on two models.
    let (topup_tx, block) = chain.pay(0, "5.00".parse().unwrap()).await;
    api.indexed(block).await;
    let key = api.topup(&chain, 0, &topup_tx, "5.00").await;
    api.chat(&key, "demo-a", "one two three").await;
    api.chat(&key, "demo-a", "four five").await;
    api.chat(&key, "demo-b", "six seven eight nine").await;

    // 2. An x402 `exact` payment buying credits.
    let path = "/x402/credits/10";
    let resp = api.http.post(format!("{base}{path}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
    let offered = crate::x402_routes::required(resp.headers());
    let payer1 = chain.payer(1).clone();
    let auth = crate::x402_routes::authorization(
        payer1.address(),
        &offered.accepts[0],
        crate::x402_routes::chain_now(&chain).await,
    );
    let sig = crate::x402_routes::sign(&chain, &payer1, &auth);
    let pay = crate::x402_routes::v2_header(&offered, auth, sig, None);
    let resp = api
        .http
        .post(format!("{base}{path}"))
        .header("PAYMENT-SIGNATURE", pay)
        .send()
        .await
        .unwrap();
    let settled_header = resp
        .headers()
        .get("payment-response")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
    let x402_tx =
        x402_gateway::x402::header::decode_json(&settled_header.unwrap()).unwrap()["transaction"]
            .as_str()
            .unwrap()
            .to_string();

    // 3. A top-up claimed, then reorged out: the claim is reversed.
    let (reorged_tx, block) = chain.pay(2, "2.00".parse().unwrap()).await;
    api.indexed(block).await;
    let _reorged_key = api.topup(&chain, 2, &reorged_tx, "2.00").await;
    assert_eq!(chain.head().await, block, "the payment is the head block");
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    chain.mine(1).await;
    let summary = wait_for("the reversal and every request on the console", || async {
        let v = api.json("/api/admin/summary?range=7d", Some(ADMIN)).await;
        let n = &v["networks"][0];
        (atomic(&n["stillReversedUsdc"]) == 2_000_000
            && n["reorgs"].as_i64() >= Some(1)
            && v["totals"]["requests"].as_i64() == Some(3)
            && n["x402Settled"].as_i64() == Some(1))
        .then_some(v)
    })
    .await;

    // --- The summary against the audit API and the key's own view.
    let n = &summary["networks"][0];
    assert_eq!(n["network"], network, "{summary}");
    let revenue = api.json("/api/audit/revenue", Some(AUDITOR)).await;
    let audit_sum = |key: &str| -> i64 {
        revenue["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                d[key]
                    .as_str()
                    .map_or_else(|| d[key].as_i64().unwrap(), |s| s.parse().unwrap())
            })
            .sum()
    };
    // Received: the top-up and the x402 payment; the reorged one is not confirmed any more.
    assert_eq!(atomic(&summary["totals"]["receivedUsdc"]), 15_000_000);
    assert_eq!(
        atomic(&summary["totals"]["receivedUsdc"]),
        audit_sum("receivedAtomic")
    );
    assert_eq!(atomic(&n["receivedUsdc"]), audit_sum("receivedAtomic"));
    assert_eq!(n["claims"].as_i64().unwrap(), audit_sum("claims"), "{n}");
    let detail = api
        .json(&format!("/api/audit/payments/{reorged_tx}"), Some(AUDITOR))
        .await;
    let reversals = detail["reversals"].as_array().unwrap();
    assert_eq!(reversals.len(), 1, "{detail}");
    assert_eq!(reversals[0]["kind"], "reversed");
    assert_eq!(
        atomic(&reversals[0]["amountUsdc"]),
        atomic(&n["stillReversedUsdc"])
    );
    assert_eq!(
        atomic(&summary["totals"]["reversedUsdc"]),
        atomic(&n["reversedUsdc"])
    );
    assert_eq!(atomic(&n["reversedUsdc"]), 2_000_000);
    let x402_detail = api
        .json(&format!("/api/audit/payments/{x402_tx}"), Some(AUDITOR))
        .await;
    assert_eq!(
        atomic(&x402_detail["confirmedValueUsdc"]),
        10_000_000,
        "{x402_detail}"
    );
    // Two models, their spend what the key was charged.
    let models = summary["models"].as_array().unwrap();
    let model = |id: &str| models.iter().find(|m| m["model"] == id).unwrap().clone();
    assert_eq!(model("demo-a")["requests"], 2, "{summary}");
    assert_eq!(model("demo-b")["requests"], 1, "{summary}");
    let spend = atomic(&model("demo-a")["spendUsdc"]) + atomic(&model("demo-b")["spendUsdc"]);
    assert!(spend > 0);
    let usage = api.json("/v1/usage", Some(&key)).await;
    assert_eq!(
        5_000_000 - spend,
        atomic(&usage["credits"]["balanceUsdc"]),
        "{usage}"
    );
    assert_eq!(atomic(&summary["totals"]["creditsSpentUsdc"]), spend);
    // Recent lists: the orphaned transfer, the claims (one reversed), the settlement, the reorg.
    let transfers = n["recentTransfers"].as_array().unwrap();
    let orphaned = transfers
        .iter()
        .find(|t| t["txHash"] == reorged_tx.as_str())
        .unwrap();
    assert_eq!(orphaned["status"], "orphaned", "{n}");
    assert_eq!(orphaned["confirmations"], 0);
    let first = transfers
        .iter()
        .find(|t| t["txHash"] == topup_tx.as_str())
        .unwrap();
    assert_eq!(first["status"], "confirmed");
    assert!(first["confirmations"].as_i64().unwrap() >= 2, "{first}");
    assert_eq!(first["claimed"], true);
    let claims = n["recentClaims"].as_array().unwrap();
    let reversed: Vec<&Value> = claims.iter().filter(|c| c["reversed"] == true).collect();
    assert_eq!(reversed.len(), 1, "{n}");
    assert_eq!(reversed[0]["txHash"], reorged_tx.as_str());
    let settlements = n["recentSettlements"].as_array().unwrap();
    let exact = settlements.iter().find(|s| s["scheme"] == "exact").unwrap();
    assert_eq!(
        (
            exact["txHash"].as_str(),
            exact["what"].as_str(),
            exact["status"].as_str()
        ),
        (Some(x402_tx.as_str()), Some("credits"), Some("settled"))
    );
    assert_eq!(atomic(&exact["amountUsdc"]), 10_000_000);
    let reorgs = n["recentReorgs"].as_array().unwrap();
    assert!(!reorgs.is_empty(), "{n}");
    assert!(reorgs[0]["orphanedTransfers"].as_i64().unwrap() >= 1);
    // Health: the refusing endpoint made every RPC client fail over, and said so in a warning.
    let health = &summary["health"];
    let h = &health["networks"][0];
    assert_eq!(h["network"], network);
    assert_eq!(h["state"], "running", "{health}");
    assert_eq!(h["rpcEndpoints"], 2);
    let failovers = h["rpcFailovers"].as_u64().unwrap();
    assert!(failovers >= 1, "{health}");
    let warnings = health["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w["message"].as_str().unwrap().contains("RPC failover")),
        "{health}"
    );
    assert_eq!(health["upstreams"]["deployments"], 2, "{health}");
    assert_eq!(health["upstreams"]["healthy"], 2, "{health}");
    let db = &summary["database"];
    assert!(db["sizeBytes"].as_i64().unwrap() > 0, "{db}");
    if on_postgres() {
        let replicas = db["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 1, "{db}");
        assert_eq!(db["leader"], db["replica"], "{db}");
        assert_eq!(replicas[0]["leader"], true, "{db}");
        assert_eq!(db["engine"], "postgres");
    } else {
        assert_eq!(db["engine"], "sqlite");
    }
    let json_text = summary.to_string();
    assert!(
        !json_text.contains(RPC_SECRET),
        "an RPC URL secret in the JSON"
    );
    assert!(!json_text.contains(&key), "a key secret in the JSON");

    // --- /metrics has the console's figures per network.
    let (_, metrics) = api.get("/metrics", None).await;
    let line = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing:\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        line(&format!(
            "x402_rpc_failovers_total{{network=\"{network}\"}}"
        )) >= failovers as f64
    );
    assert_eq!(
        line(&format!(
            "x402_reversed_usdc_atomic{{network=\"{network}\"}}"
        )),
        2_000_000.0
    );
    assert_eq!(
        line(&format!(
            "x402_settlements{{network=\"{network}\",scheme=\"exact\",status=\"settled\"}}"
        )),
        1.0
    );
    assert!(line("x402_log_events_total{level=\"warn\"}") >= 1.0);

    // --- The page, as a person sees it: the same numbers.
    let url = format!("{base}/admin?token={ADMIN}&range=7d&refresh=0");
    let dom = render_dom(&url);
    let seen = visible_text(&dom);
    if let Ok(dir) = std::env::var("X402_README_SAMPLES") {
        std::fs::write(Path::new(&dir).join("console-traffic.txt"), &seen).unwrap();
    }
    let s = |v: &Value| v.as_str().unwrap().to_string();
    assert_eq!(
        after(&seen, "Received (USDC, confirmed payments)", 1),
        [s(&summary["totals"]["receivedUsdc"])]
    );
    assert_eq!(
        after(&seen, "of which credits spent", 1),
        [s(&summary["totals"]["creditsSpentUsdc"])]
    );
    assert_eq!(
        after(&seen, "Reversed by reorgs (USDC)", 1),
        [s(&summary["totals"]["reversedUsdc"])]
    );
    for id in ["demo-a", "demo-b"] {
        let m = model(id);
        let row = after(&seen, &format!("{id} "), 5);
        assert_eq!(
            row,
            [
                m["requests"].to_string(),
                m["promptTokens"].to_string(),
                m["completionTokens"].to_string(),
                s(&m["spendUsdc"]),
                m["errors"].to_string(),
            ],
            "{seen}"
        );
    }
    // The payments-by-network row: network, then its figures in column order.
    let row = after(&seen, &format!("Still reversed (USDC) {network}"), 14);
    let expect: Vec<String> = [
        "confirmedTransfers",
        "receivedUsdc",
        "pendingTransfers",
        "orphanedTransfers",
        "claims",
        "x402Settled",
        "x402Failed",
        "uptoSettled",
        "uptoUnsettled",
        "uptoOwedUsdc",
        "reorgs",
        "reversedUsdc",
        "restoredUsdc",
        "stillReversedUsdc",
    ]
    .iter()
    .map(|k| match &n[*k] {
        Value::String(v) => v.clone(),
        v => v.to_string(),
    })
    .collect();
    assert_eq!(row, expect, "{seen}");
    // The recent lists.
    let row = after(&seen, &short(&reorged_tx), 5);
    assert_eq!(row[3], "orphaned", "{seen}");
    assert_eq!(row[4], "0", "{seen}");
    let row = after(&seen, &format!("exact {}", short(&x402_tx)), 4);
    assert_eq!(row[1..], ["credits", "10.00", "settled"], "{seen}");
    assert!(seen.contains("reversed"), "{seen}");
    // Health.
    let row = after(&seen, &format!("WebSocket {network}"), 7);
    assert_eq!(row[0], "running", "{seen}");
    assert_eq!(row[4], "2", "{seen}");
    assert_eq!(row[6], h["rpcFailovers"].to_string(), "{seen}");
    assert!(
        seen.contains("Upstreams: 2 of 2 deployments in rotation"),
        "{seen}"
    );
    assert!(seen.contains("RPC failover"), "{seen}");
    // Nothing secret, nothing from elsewhere.
    assert!(!dom.contains(RPC_SECRET), "an RPC URL secret on the page");
    assert!(!dom.contains(&key), "a key secret on the page");
    for attr in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!dom.contains(attr), "an external reference: {attr}");
    }
    for (name, width, height) in [
        ("console-traffic-desktop.png", 1280, 3000),
        ("console-traffic-narrow.png", 420, 6000),
    ] {
        let png = screenshot(&url, width, height);
        let w = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
        assert_eq!(w, width, "{name}");
        assert!(
            png.len() > 20_000,
            "{name}: a rendered page ({} bytes)",
            png.len()
        );
        if let Ok(dir) = std::env::var("X402_README_SAMPLES") {
            std::fs::write(Path::new(&dir).join(name), &png).unwrap();
        }
    }
    drop(server);
}
