//! Unpaid traffic through the real server on a real anvil chain: per-IP rate limits on keyless requests and claim
//! attempts (429 + `Retry-After` in each route family's shape, other IPs and key holders unaffected, refill on the
//! injected clock, paid claims give their token back), a body limit on every route (413, no state change), request
//! timeouts (slow body → 408, slow headers → connection closed, slow answer → 503 while the work completes), and
//! no total timeout on completions.
//!
//! Distinct clients are distinct loopback addresses (127.0.0.0/8): each client binds its socket to its own one.
//! The harness itself polls from 127.0.0.1, so these tests wait for the index through the database instead.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::dev::contracts::{SmartWallet, TestUSDC};
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats};
use x402_gateway::store::Store;
use x402_gateway::store::transfers::TransferStatus;
use x402_gateway::usdc::Usdc;

use crate::support::*;
use x402_gateway::params;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
const CHAIN_ID: u64 = 31337;

struct Stack {
    chain: TestChain,
    gw: Gateway,
    _upstream: Arc<DemoStats>,
    _dir: tempfile::TempDir,
}

fn config(
    chain: &TestChain,
    rpc: &str,
    upstream: &str,
    db: &std::path::Path,
    limits: &str,
) -> String {
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
rpc_timeout_ms = 30000

[database]
path = "{db}"

[[upstreams]]
name = "demo"
base_url = "{upstream}"

[[models]]
id = "demo"
upstream = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[pools]]
slug = "p"
name = "Demo pool"
models = ["demo"]
blocks = [{{ name = "day", hours_utc = "00:00-24:00", price_usdc = "3.00", seats = 5 }}]

[credits]
min_topup_usdc = "1.00"

[limits]
{limits}
"#,
        token = chain.token(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

impl Stack {
    /// The gateway with `limits` as its `[limits]` table, the demo upstream (`token_delay` per token) and, when
    /// `rpc` is given, that RPC URL instead of anvil's.
    async fn start(limits: &str, token_delay: Duration, rpc: Option<String>) -> Stack {
        let chain = TestChain::start().await;
        Stack::start_on(chain, limits, token_delay, rpc).await
    }

    async fn start_on(
        chain: TestChain,
        limits: &str,
        token_delay: Duration,
        rpc: Option<String>,
    ) -> Stack {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stats = Arc::new(DemoStats::default());
        let demo = DemoConfig {
            token_delay,
            ..DemoConfig::default()
        };
        tokio::spawn(upstream::run(
            listener,
            demo,
            stats.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let rpc = rpc.unwrap_or_else(|| chain.rpc_url());
        let text = config(&chain, &rpc, &upstream_url, &db, limits);
        let gw = Gateway::start_with(text, db, Arc::new(AtomicI64::new(T0))).await;
        Stack {
            chain,
            gw,
            _upstream: stats,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gw.base)
    }

    /// A credit key granted by the operator.
    async fn credit_key(&self, account_byte: u8) -> String {
        let store = self.gw.store().await;
        let (_, key) = x402_gateway::billing::grant(
            &store,
            Address::repeat_byte(account_byte),
            Usdc::whole(5),
            None,
            T0,
        )
        .await
        .unwrap();
        key.expect("a new account gets a key").full
    }

    /// Waits until the index holds `tx` as confirmed (read from the database: no request from 127.0.0.1).
    async fn wait_confirmed(&self, tx: &str) {
        let store = self.gw.store().await;
        wait_for(&format!("{tx} confirmed"), || async {
            let rows = store
                .transfers_of_tx(crate::support::DEV_NETWORK, tx.to_string())
                .await
                .ok()?;
            rows.iter()
                .any(|t| t.status == TransferStatus::Confirmed)
                .then_some(())
        })
        .await;
    }

    /// Payer `i` pays `amount` and the payment is confirmed in the index.
    async fn paid(&self, i: usize, amount: &str) -> String {
        let (tx, _) = self.chain.pay(i, amount.parse().unwrap()).await;
        self.wait_confirmed(&tx).await;
        tx
    }
}

/// A client whose connections come from `ip` (any address of 127.0.0.0/8).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

fn sign(signer: &PrivateKeySigner, tx: &str) -> String {
    let sig = signer
        .sign_message_sync(claim_text(tx, CHAIN_ID).as_bytes())
        .unwrap();
    format!("0x{}", alloy::hex::encode(sig.as_bytes()))
}

/// `{"error": {"message", "type", "param", "code"}}`, all four keys.
fn assert_openai_error(body: &Value, code: &str) {
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(e.len(), 4, "{body}");
    assert_eq!(e["code"], code, "{body}");
    assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
    assert!(e["param"].is_null(), "{body}");
}

/// `{"success": false, "error": {"code", "message"}}`.
fn assert_agent_error(body: &Value, code: &str) {
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// `{"error": {"code", "message"}}`.
fn assert_plain_error(body: &Value, code: &str) {
    assert!(body.get("success").is_none(), "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

fn retry_after(headers: &HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no whole-seconds Retry-After in {headers:?}"))
}

/// Rows a claim writes: (claims, api_keys, ledger, usage).
async fn state_counts(store: &Store) -> (i64, i64, i64, i64) {
    store
        .read(|c| -> Result<_, x402_gateway::store::StoreError> {
            let n = |t: &str| {
                c.query_one(&format!("SELECT count(*) FROM {t}"), params![], |r| {
                    r.get::<i64>(0)
                })
            };
            Ok((n("claims")?, n("api_keys")?, n("ledger")?, n("usage")?))
        })
        .await
        .unwrap()
}

fn chat(stream: bool) -> Value {
    json!({"model": "demo", "stream": stream, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
}

/// One IP's keyless burst → 429 + `Retry-After` in each family's shape; other IPs and key holders (even from the
/// same IP) are not slowed; the bucket refills by the injected clock and never beyond the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_burst_is_limited_per_ip_and_key_holders_are_not() {
    // One request every 10 s, 5 at once.
    let s = Stack::start(
        "keyless_per_minute = 6\nkeyless_burst = 5\n",
        Duration::ZERO,
        None,
    )
    .await;
    let key = s.credit_key(0xa1).await;
    let flooder = client_from("127.0.0.2");
    let models = || flooder.get(s.url("/v1/models"));

    for i in 0..5 {
        let (status, _, body) = send(models()).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "request {i}: {body}");
    }
    let (status, headers, body) = send(models()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(retry_after(&headers), 10);
    assert_openai_error(&body, "rate_limited");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    // The same bucket on every keyless route, each refusal in its family's shape.
    let (status, _, body) = send(
        flooder
            .post(s.url("/v1/chat/completions"))
            .json(&chat(false)),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_openai_error(&body, "rate_limited");
    let (status, headers, body) = send(flooder.get(s.url("/api/agent/plans"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&headers) >= 1);
    assert_agent_error(&body, "rate_limited");
    for path in [
        "/healthz",
        "/.well-known/agent-card.json",
        "/openapi.json",
        "/nowhere",
    ] {
        let (status, headers, body) = send(flooder.get(s.url(path))).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert!(retry_after(&headers) >= 1);
        assert_plain_error(&body, "rate_limited");
    }
    // A well-formed key that is not valid is no key.
    let bogus = format!("sk-{}-{}", "0".repeat(16), "0".repeat(64));
    let (status, _, _) = send(models().bearer_auth(&bogus)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    // A key holder on the flooded address is served: models, usage, a completion (JSON and streamed).
    for _ in 0..20 {
        let (status, _, body) = send(models().bearer_auth(&key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _, body) = send(flooder.get(s.url("/v1/usage")).bearer_auth(&key)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = send(
        flooder
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(false)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let resp = flooder
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().contains("data: [DONE]"));

    // Another address has its own bucket.
    let other = client_from("127.0.0.3");
    let (status, _, _) = send(other.get(s.url("/v1/models"))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let (status, _, body) = send(other.get(s.url("/api/agent/plans"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Refill on the injected clock: after 4 s, 6 s to go; after 10 s, one request; after an hour, the burst only.
    s.gw.set_time(T0 + 4);
    let (status, headers, _) = send(models()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&headers), 6);
    s.gw.set_time(T0 + 10);
    let (status, _, _) = send(models()).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let (status, _, _) = send(models()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    s.gw.set_time(T0 + 3600);
    for _ in 0..5 {
        let (status, _, _) = send(models()).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    }
    let (status, _, _) = send(models()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    // Counted for the operator.
    let metrics = client_from("127.0.0.4")
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("x402_rate_limited_total{limit=\"keyless\",scope=\"ip\"}")),
        "{metrics}"
    );
}

/// A flood spread over many addresses meets the bucket all clients share: each address is within its own limit,
/// yet the total is capped; key holders still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_addresses_share_one_total_keyless_budget() {
    let s = Stack::start(
        "keyless_per_minute = 60\nkeyless_burst = 5\nkeyless_total_per_minute = 6\nkeyless_total_burst = 8\n",
        Duration::ZERO,
        None,
    )
    .await;
    let key = s.credit_key(0xd4).await;
    let clients: Vec<reqwest::Client> = (30..35)
        .map(|i| client_from(&format!("127.0.0.{i}")))
        .collect();
    // Four addresses, two requests each: within their own buckets (5 each), and exactly the shared one (8).
    for c in &clients[..4] {
        for _ in 0..2 {
            let (status, _, body) = send(c.get(s.url("/v1/models"))).await;
            assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
        }
    }
    // A fifth address, fresh in its own bucket, meets the shared one.
    let (status, headers, body) = send(clients[4].get(s.url("/v1/models"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_openai_error(&body, "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("all clients"),
        "{body}"
    );
    assert_eq!(retry_after(&headers), 10);
    let (status, _, _) = send(clients[4].get(s.url("/v1/models")).bearer_auth(&key)).await;
    assert_eq!(status, StatusCode::OK);
    // The refusal did not use the fifth address's own budget: after one refill it is served.
    s.gw.set_time(T0 + 10);
    let (status, _, _) = send(clients[4].get(s.url("/v1/models"))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let (status, _, _) = send(clients[0].get(s.url("/v1/models"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // The operator's probes only meet their own address's bucket: a flood does not make the gateway look dead.
    let (status, _, body) = send(clients[0].get(s.url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let metrics = send_text(clients[1].get(s.url("/metrics"))).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("x402_rate_limited_total{limit=\"keyless\",scope=\"all\"}")),
        "{metrics}"
    );
}

/// Behind a trusted proxy, `X-Forwarded-For` names the client: each forwarded client has its own bucket. From any
/// other peer the header is ignored, so forging it does not escape the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_clients_behind_a_trusted_proxy_only() {
    let s = Stack::start(
        "keyless_per_minute = 6\nkeyless_burst = 2\ntrusted_proxies = [\"127.0.0.20\"]\n",
        Duration::ZERO,
        None,
    )
    .await;
    let proxy = client_from("127.0.0.20");
    let via = |client: &str| {
        proxy
            .get(s.url("/api/agent/plans"))
            .header("x-forwarded-for", format!("{client}, 127.0.0.20"))
    };
    for _ in 0..2 {
        assert_eq!(send(via("203.0.113.1")).await.0, StatusCode::OK);
    }
    assert_eq!(
        send(via("203.0.113.1")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxy is not limited by the first.
    assert_eq!(send(via("203.0.113.2")).await.0, StatusCode::OK);
    // A peer that is not trusted cannot pick its identity by header.
    let forger = client_from("127.0.0.21");
    for i in 0..2 {
        let (status, _, _) = send(
            forger
                .get(s.url("/api/agent/plans"))
                .header("x-forwarded-for", format!("198.51.100.{i}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = send(
        forger
            .get(s.url("/api/agent/plans"))
            .header("x-forwarded-for", "198.51.100.99"),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

/// Claim attempts have their own per-IP bucket across `/api/agent/{subscribe-pool,topup,keys/rotate}` and
/// `/x402/*`; a successful claim gives its token back, so only failed attempts use the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_attempts_are_limited_per_ip_and_paid_claims_give_their_token_back() {
    let s = Stack::start(
        "claims_per_minute = 6\nclaims_burst = 3\n",
        Duration::ZERO,
        None,
    )
    .await;
    let unknown = format!("0x{}", "ab".repeat(32));
    let a = client_from("127.0.0.5");
    let topup = |client: &reqwest::Client, tx: &str, sig: Option<String>| {
        client
            .post(s.url("/api/agent/topup"))
            .json(&json!({"txHash": tx, "amount": "1.00", "signature": sig}))
    };

    // Three attempts at anything (unknown payment, a pool, a rotation), then 429 on every claim route.
    let (status, _, body) = send(topup(&a, &unknown, Some("0x00".into()))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = send(a.post(s.url("/api/agent/subscribe-pool")).json(
        &json!({"txHash": unknown, "poolSlug": "p", "blocks": ["day"], "signature": format!("0x{}", "11".repeat(65))}),
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = send(a.post(s.url("/api/agent/keys/rotate")).json(&json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    for path in [
        "/api/agent/topup",
        "/api/agent/subscribe-pool",
        "/api/agent/keys/rotate",
    ] {
        let (status, headers, body) = send(a.post(s.url(path)).json(&json!({}))).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{path}: {body}");
        assert_eq!(retry_after(&headers), 10);
        assert_agent_error(&body, "rate_limited");
    }
    // The x402 purchase routes share the bucket and answer in their own shape, readable by browsers.
    let (status, headers, body) = send(a.post(s.url("/x402/credits/10"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_agent_error(&body, "rate_limited");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(
        headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("PAYMENT-REQUIRED")
    );
    // Claims and keyless requests are separate budgets; another address is unaffected.
    let (status, _, _) = send(a.get(s.url("/api/agent/plans"))).await;
    assert_eq!(status, StatusCode::OK);
    let b = client_from("127.0.0.6");
    let (status, _, body) = send(b.post(s.url("/x402/credits/10"))).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "x402 is not configured here: {body}"
    );

    // Paid claims are free: fail, fail, claim (200), then one more attempt is still allowed.
    let payer = s.chain.payer(1).clone();
    let tx = s.paid(1, "2.00").await;
    let c = client_from("127.0.0.7");
    for _ in 0..2 {
        let (status, _, body) = send(topup(&c, &unknown, Some(sign(&payer, &unknown)))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let (status, _, body) = send(topup(&c, &tx, Some(sign(&payer, &tx)))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["data"]["apiKey"].is_string(), "{body}");
    let (status, _, body) = send(topup(&c, &tx, Some(sign(&payer, &tx)))).await;
    assert_eq!(status, StatusCode::CONFLICT, "the refunded token: {body}");
    let (status, _, _) = send(topup(&c, &tx, Some(sign(&payer, &tx)))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    // Refill: one attempt every 10 s.
    s.gw.set_time(T0 + 10);
    let (status, _, _) = send(topup(&a, &unknown, Some(sign(&payer, &unknown)))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(topup(&a, &unknown, Some(sign(&payer, &unknown)))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

/// Every route (each one in `/openapi.json`, the `/v1/*` fallback and unknown paths) refuses a body over its limit
/// with 413 in its family's shape — declared or chunked — and nothing changes; a body at the limit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_an_oversized_body_in_its_shape() {
    let s = Stack::start("rate_limits = false\n", Duration::ZERO, None).await;
    let key = s.credit_key(0xb2).await;
    let store = s.gw.store().await;
    let before = state_counts(&store).await;
    let http = client_from("127.0.0.8");

    let spec: Value = send(http.get(s.url("/openapi.json"))).await.2;
    let mut routes: Vec<(String, String)> = Vec::new();
    for (path, ops) in spec["paths"].as_object().expect("openapi paths") {
        for method in ops.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    assert!(routes.len() >= 15, "{routes:?}");
    routes.push(("POST".into(), "/v1/images/generations".into()));
    routes.push(("GET".into(), "/v1".into()));
    routes.push(("PUT".into(), "/not/a/route".into()));

    for (method, template) in &routes {
        // Path parameters: any value (the body is refused before the handler reads them).
        let path: String = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let inference = x402_gateway::proxy::Api::of_path(&path);
        let (family, limit) =
            if method == "POST" && inference == Some(x402_gateway::proxy::Api::Messages) {
                ("anthropic", 4 * 1024 * 1024)
            } else if method == "POST" && inference.is_some() {
                ("openai", 4 * 1024 * 1024)
            } else if path == "/v1" || path.starts_with("/v1/") {
                ("openai", 16 * 1024)
            } else if path.starts_with("/api/agent/") {
                ("agent", 16 * 1024)
            } else if path.starts_with("/x402/") {
                ("x402", 16 * 1024)
            } else {
                ("plain", 1024)
            };
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let over = vec![b'{'; limit + 1];
        // Declared by Content-Length, and chunked (no length: counted while it arrives); with and without a key.
        for chunked in [false, true] {
            let body = if chunked {
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                    over.chunks(8192).map(|c| Ok(c.to_vec())).collect();
                reqwest::Body::wrap_stream(futures::stream::iter(chunks))
            } else {
                reqwest::Body::from(over.clone())
            };
            let mut req = http
                .request(method.clone(), s.url(&path))
                .bearer_auth(&key)
                .header("content-type", "application/json");
            if chunked {
                // Without it, the client drops a GET's body of unknown length.
                req = req.header("transfer-encoding", "chunked");
            }
            let (status, _, body) = send(req.body(body)).await;
            assert_eq!(
                status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{method} {path} (chunked: {chunked}): {body}"
            );
            match family {
                "openai" => assert_openai_error(&body, "request_too_large"),
                "anthropic" => {
                    assert_eq!(body["type"], "error", "{body}");
                    assert_eq!(body["error"]["type"], "request_too_large", "{body}");
                }
                "agent" | "x402" => assert_agent_error(&body, "body_too_large"),
                _ => assert_plain_error(&body, "body_too_large"),
            }
        }
    }

    // At the limit is not over it.
    let (status, _, body) = send(http.get(s.url("/healthz")).body(vec![b' '; 1024])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut at_limit = json!({"txHash": "0x12", "amount": "1.00", "pad": ""}).to_string();
    let pad = 16 * 1024 - at_limit.len();
    at_limit = json!({"txHash": "0x12", "amount": "1.00", "pad": "x".repeat(pad)}).to_string();
    assert_eq!(at_limit.len(), 16 * 1024);
    let (status, _, body) = send(
        http.post(s.url("/api/agent/topup"))
            .header("content-type", "application/json")
            .body(at_limit),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "read and judged: {body}");

    // Nothing was claimed, minted, debited or metered.
    assert_eq!(state_counts(&store).await, before);
}

/// A body that does not arrive in time → 408; headers that do not arrive in time → the connection is closed; an
/// answer that takes too long → 503 + `Retry-After` while the claim completes in the background (a retry then gets
/// 409 naming it, never a second purchase); completions are never cut by the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_and_claims_are_never_cut_in_half() {
    let chain = TestChain::start().await;
    let anvil = chain
        .dev
        .anvil
        .endpoint_url()
        .socket_addrs(|| None)
        .unwrap()[0];
    let rpc = TcpFaultProxy::start(anvil).await;
    // 100 ms per token: a 16-token completion takes longer than the 1 s request timeout.
    let s = Stack::start_on(
        chain,
        "rate_limits = false\nrequest_timeout_secs = 1\nheader_read_timeout_secs = 1\n",
        Duration::from_millis(100),
        Some(rpc.url()),
    )
    .await;
    let addr = s.gw.base.trim_start_matches("http://").to_string();

    // A body that stops half way: 408 in the route family's shape.
    for (path, family) in [
        ("/api/agent/topup", "agent"),
        ("/v1/chat/completions", "openai"),
    ] {
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        );
        let answer = raw_exchange(&addr, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        match family {
            "agent" => assert_agent_error(&body, "request_timeout"),
            _ => assert_openai_error(&body, "request_timeout"),
        }
    }
    // Headers that never finish: the connection is closed without an answer.
    let answer = raw_exchange(
        &addr,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes(),
    )
    .await;
    assert!(!answer.contains("200 OK"), "{answer}");
    let http = client_from("127.0.0.9");
    let (status, _, _) = send(http.get(s.url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK);

    // Completions run past the request timeout, JSON and streamed.
    let key = s.credit_key(0xc3).await;
    let long =
        json!({"model": "demo", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, body) = send(
        http.post(s.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&long),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 16);
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut text = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("\"completion_tokens\":16"), "{text}");
    assert!(text.contains("data: [DONE]"));

    // A contract wallet pays; its claim needs the RPC (ERC-1271), which is now slower than the timeout.
    let owner = s.chain.payer(2).clone();
    let wallet = SmartWallet::deploy(&s.chain.provider, owner.address())
        .await
        .unwrap();
    let wallet_addr: Address = *wallet.address();
    s.chain
        .transfer_token(
            s.chain.token(),
            owner.address(),
            wallet_addr,
            Usdc::whole(5),
        )
        .await;
    let call = TestUSDC::transferCall {
        to: s.chain.pay_to(),
        value: U256::from(Usdc::whole(2).atomic() as u64),
    };
    let receipt = wallet
        .execute(s.chain.token(), U256::ZERO, call.abi_encode().into())
        .from(owner.address())
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let tx = format!("{:#x}", receipt.transaction_hash);
    s.wait_confirmed(&tx).await;
    let store = s.gw.store().await;
    let before = state_counts(&store).await;
    rpc.set_delay(Duration::from_secs(3));
    rpc.down();
    rpc.up();
    let claim = json!({"txHash": tx, "amount": "2.00", "signature": sign(&owner, &tx)});
    let (status, headers, body) = send(http.post(s.url("/api/agent/topup")).json(&claim)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_agent_error(&body, "timeout");
    assert_eq!(retry_after(&headers), 5);
    // The claim was not cancelled: it completes, whole (claim, key, ledger row).
    wait_for("the timed-out claim completes", || async {
        let now = state_counts(&store).await;
        (now != before).then_some(now)
    })
    .await;
    let after = state_counts(&store).await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (1, 1, 1)
    );
    // The retry is told what the payment bought; nothing is bought twice.
    rpc.set_delay(Duration::ZERO);
    let (status, _, body) = send(http.post(s.url("/api/agent/topup")).json(&claim)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_agent_error(&body, "already_claimed");
    assert_eq!(state_counts(&store).await, after);

    let metrics = send_text(http.get(s.url("/metrics"))).await;
    for phase in ["body", "answer"] {
        assert!(
            metrics.lines().any(
                |l| l.starts_with(&format!("x402_request_timeouts_total{{phase=\"{phase}\"}}"))
            ),
            "{metrics}"
        );
    }
}

/// `serve` refuses a bad `[limits]` value at start-up, naming the key (no server, no chain needed).
#[test]
fn bad_limits_values_stop_the_binary_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[chain]\nnetwork = \"base\"\nrpc_http = [\"http://127.0.0.1:9\"]\n\
                pay_to = \"0x1111111111111111111111111111111111111111\"\n[server]\nlisten = \"127.0.0.1:0\"\n[limits]\n";
    for (line, key) in [
        ("keyless_burst = 0", "limits.keyless_burst"),
        ("claims_per_minute = 0", "limits.claims_per_minute"),
        ("keyless_total_burst = 100000", "limits.keyless_total_burst"),
        ("request_timeout_secs = 0", "limits.request_timeout_secs"),
        (
            "header_read_timeout_secs = 301",
            "limits.header_read_timeout_secs",
        ),
        ("max_tracked_clients = 1", "limits.max_tracked_clients"),
        (
            "trusted_proxies = [\"10.0.0.0/99\"]",
            "limits.trusted_proxies[0]",
        ),
        ("rate_limit = false", "rate_limit"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{base}{line}\n")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A config that were accepted would serve forever: stop it rather than hang.
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > DEADLINE {
                child.kill().unwrap();
                panic!("{line}: the gateway started");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{line}");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(err.contains(key), "{line}: {err}");
    }
}

async fn send_text(req: reqwest::RequestBuilder) -> String {
    req.send().await.unwrap().text().await.unwrap()
}

/// Writes `request` on a new connection, then reads until the server closes it (or [`DEADLINE`] passes): what
/// came back, as text.
async fn raw_exchange(addr: &str, request: &[u8]) -> String {
    let addr = addr.to_string();
    let request = request.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(&request).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    // A complete JSON answer is enough; the server may keep the connection open.
                    let text = String::from_utf8_lossy(&out);
                    if let Some((head, body)) = text.split_once("\r\n\r\n")
                        && let Some(len) = head.lines().find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        && body.len() >= len
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("no answer and no close within {DEADLINE:?}: {e}"),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}
