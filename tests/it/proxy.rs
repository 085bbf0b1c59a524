//! The inference proxy through the real server to the demo upstream (real HTTP, real SQLite, real anvil for the
//! pool purchase): streaming and JSON, exact billing, window edges, the one-request limit, disconnects, upstream
//! faults, and the OpenAI error shape. Requests racing for one balance or one pool slot are in `concurrency.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use alloy::signers::SignerSync;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats};
use x402_gateway::proxy::pricing::Prices;
use x402_gateway::store::Store;
use x402_gateway::usdc::Usdc;

use crate::support::*;
use x402_gateway::params;

/// 2026-01-01T00:00:00Z, a Thursday midnight UTC.
pub(crate) const MIDNIGHT: i64 = 1_767_225_600;
pub(crate) const PRICES: Prices = Prices {
    input_per_mtok: Usdc(600_000),
    output_per_mtok: Usdc(2_500_000),
};
/// The `max_output_tokens` cap configured for the demo model.
const CAP: u64 = 24;

pub(crate) struct Stack {
    pub(crate) chain: TestChain,
    pub(crate) gw: Gateway,
    pub(crate) upstream: Arc<DemoStats>,
    _dir: tempfile::TempDir,
}

fn config(chain: &TestChain, upstream: &str, db: &std::path::Path) -> String {
    format!(
        r#"
[chain]
network = "custom"
chain_id = 31337
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
name = "demo"
base_url = "{upstream}"
api_key_env = "DEMO_UPSTREAM_KEY"

[[upstreams]]
name = "slow"
base_url = "{upstream}"
api_key_env = "DEMO_UPSTREAM_KEY"
read_timeout_ms = 400

[[models]]
id = "demo"
upstream = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}

[[models]]
id = "demo-out"
upstream = "demo"
upstream_model = "demo"
input_usdc_per_mtok = "0"
output_usdc_per_mtok = "2.50"

[[models]]
id = "demo-cut"
upstream = "demo"
upstream_model = "cut-3"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[models]]
id = "demo-fail"
upstream = "demo"
upstream_model = "fail-500"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[models]]
id = "demo-hang"
upstream = "slow"
upstream_model = "hang"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[pools]]
slug = "p"
name = "Demo pool"
models = ["demo", "demo-cut"]
blocks = [
  {{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "3.00", seats = 5 }},
  {{ name = "europe", hours_utc = "08:00-16:00", price_usdc = "4.00", seats = 5 }},
]

[credits]
min_topup_usdc = "1.00"
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

impl Stack {
    pub(crate) async fn start(token_delay_ms: u64) -> Stack {
        let chain = TestChain::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stats = Arc::new(DemoStats::default());
        let demo = DemoConfig {
            token_delay: std::time::Duration::from_millis(token_delay_ms),
            api_key: Some("upstream-secret".into()),
            count_in_flight: true,
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
        let text = config(&chain, &url, &db);
        let gw = Gateway::start_with_env(
            text,
            db,
            Arc::new(AtomicI64::new(MIDNIGHT + 3600)),
            &[("DEMO_UPSTREAM_KEY", "upstream-secret")],
        )
        .await;
        Stack {
            chain,
            gw,
            upstream: stats,
            _dir: dir,
        }
    }

    /// A credit key holding `amount`, granted by the operator.
    pub(crate) async fn credit_key(&self, account_byte: u8, amount: Usdc) -> String {
        let store = self.gw.store().await;
        let account = alloy::primitives::Address::repeat_byte(account_byte);
        let (_, key) = x402_gateway::billing::grant(&store, account, amount, None, MIDNIGHT)
            .await
            .unwrap();
        key.expect("a new account gets a key").full
    }

    /// A pool key for `blocks`, bought on chain and claimed with the payer's signature.
    pub(crate) async fn pool_key(&self, payer: usize, blocks: &[&str], price: &str) -> String {
        buy_pool_key(&self.chain, &self.gw, payer, blocks, price).await
    }
}

/// A key of pool `p` for `blocks`, bought on chain and claimed with the payer's signature.
pub(crate) async fn buy_pool_key(
    chain: &TestChain,
    gw: &Gateway,
    payer: usize,
    blocks: &[&str],
    price: &str,
) -> String {
    let (tx, block) = chain.pay(payer, price.parse().unwrap()).await;
    gw.confirm(chain, block, 1).await;
    let sig = chain
        .payer(payer)
        .sign_message_sync(claim_text(&tx, 31337).as_bytes())
        .unwrap();
    let (status, _, body) = gw
        .post(
            "/api/agent/subscribe-pool",
            json!({"txHash": tx, "poolSlug": "p", "blocks": blocks, "signature": format!("0x{}", alloy::hex::encode(sig.as_bytes()))}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]["apiKey"].as_str().unwrap().to_string()
}

impl Stack {
    pub(crate) fn chat(&self, key: &str, body: Value) -> reqwest::RequestBuilder {
        self.gw
            .http
            .post(format!("{}/v1/chat/completions", self.gw.base))
            .bearer_auth(key)
            .json(&body)
    }

    pub(crate) async fn balance(&self, key: &str) -> Usdc {
        let (status, _, usage) = self.gw.get("/v1/usage", Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        usage["credits"]["balanceUsdc"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    async fn usage_row(&self, request_id: &str) -> x402_gateway::store::usage::UsageRow {
        settled_usage_row(&self.gw, request_id).await
    }
}

/// The usage row of `request_id` once it is settled (no longer `in_flight`).
pub(crate) async fn settled_usage_row(
    gw: &Gateway,
    request_id: &str,
) -> x402_gateway::store::usage::UsageRow {
    let store: Store = gw.store().await;
    let id = request_id.to_string();
    wait_for(&format!("usage row of {request_id} to settle"), || {
        let store = store.clone();
        let id = id.clone();
        async move {
            store
                .read(move |c| -> Result<_, x402_gateway::store::StoreError> {
                    x402_gateway::store::usage::by_request_id(c, &id)
                })
                .await
                .unwrap()
                .filter(|r| r.status != "in_flight")
        }
    })
    .await
}

pub(crate) fn messages(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Parses an SSE body into its `data:` payloads.
pub(crate) fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_requests_are_billed_exactly_streamed_or_not() {
    let s = Stack::start(1).await;
    let key = s.credit_key(0x11, "10".parse().unwrap()).await;

    // JSON: 3 prompt words, 7 completion tokens → ceil((3 × 0.60 + 7 × 2.50) / 1e6 USDC) = 20 atomic.
    let resp = s
        .chat(
            &key,
            json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 7}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(PRICES.cost(3, 7), Usdc(20));
    assert_eq!(h["x-gateway-cost-usdc"], "0.00002");
    assert_eq!(h["x-gateway-balance-usdc"], "9.99998");
    assert!(h["x-request-id"].to_str().unwrap().starts_with("req_"));
    assert!(
        h["x-gateway-overhead-ms"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .is_ok()
    );
    let sent = s.upstream.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["model"], "demo");
    assert_eq!(s.balance(&key).await, "9.99998".parse().unwrap());

    // Stream without include_usage: the gateway asks the upstream for usage and hides that chunk from the client.
    let resp = s.chat(&key, json!({"model": "demo", "messages": messages("a b c d"), "max_tokens": 5, "stream": true})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !text.contains("prompt_tokens"),
        "usage chunk leaked: {text}"
    );
    let content: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content.split_whitespace().count(), 5);
    let sent = s.upstream.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let row = s.usage_row(&request_id).await;
    assert_eq!(
        (
            row.prompt_tokens,
            row.completion_tokens,
            row.usage_source.as_str()
        ),
        (4, 5, "upstream")
    );
    assert_eq!(row.cost_usdc, PRICES.cost(4, 5));

    // Stream asking for usage itself: the chunk is passed on, and other stream_options are kept.
    let resp = s
        .chat(
            &key,
            json!({"model": "demo", "messages": messages("x"), "max_tokens": 2, "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": false}}),
        )
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"prompt_tokens\":1"), "{text}");
    let sent = s.upstream.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["stream_options"]["continuous_usage_stats"], false);

    // No max_tokens: the model's cap is reserved and enforced upstream.
    let resp = s
        .chat(
            &key,
            json!({"model": "demo", "messages": messages("cap me")}),
        )
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], CAP);
    let sent = s.upstream.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["max_tokens"], CAP);

    let expected = Usdc::whole(10).atomic()
        - 20
        - PRICES.cost(4, 5).atomic()
        - PRICES.cost(1, 2).atomic()
        - PRICES.cost(2, CAP).atomic();
    assert_eq!(s.balance(&key).await, Usdc(expected));
    let (_, _, usage) = s.gw.get("/v1/usage", Some(&key)).await;
    assert_eq!(usage["totals"]["allTime"]["requests"], 4);
    assert_eq!(usage["key"]["kind"], "credit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_are_clean_errors_and_charge_only_what_was_delivered() {
    let s = Stack::start(1).await;
    let key = s.credit_key(0x33, "5".parse().unwrap()).await;

    // 500 upstream → 502, free.
    let resp = s
        .chat(
            &key,
            json!({"model": "demo-fail", "messages": messages("x")}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let err: Value = resp.json().await.unwrap();
    assert_openai_error(&err, "upstream_error");
    // Hang → 504 after the read timeout, free.
    let resp = s
        .chat(
            &key,
            json!({"model": "demo-hang", "messages": messages("x")}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_openai_error(&resp.json().await.unwrap(), "upstream_timeout");
    assert_eq!(s.balance(&key).await, "5".parse().unwrap());

    // Cut after 3 tokens: the client gets them and an error event; only 3 tokens (+ the estimated prompt) are billed.
    let body = json!({"model": "demo-cut", "messages": messages("count these four words"), "max_tokens": 10, "stream": true});
    let resp = s.chat(&key, body.clone()).send().await.unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    assert!(!events.contains(&"[DONE]".to_string()));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_cut", "{text}");
    // What the client actually received is what is billed.
    let delivered = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count() as u64;
    assert!((1..=3).contains(&delivered), "{text}");
    let row = s.usage_row(&request_id).await;
    assert_eq!(row.status, "upstream_cut");
    assert_eq!(row.usage_source, "estimated");
    assert_eq!(row.completion_tokens, delivered);
    // The prompt is charged at its bound (what was reserved for it): the body's bytes + the template margin.
    let prompt = serde_json::to_vec(&body).unwrap().len() as u64
        + x402_gateway::proxy::TEMPLATE_TOKEN_MARGIN;
    assert_eq!(row.prompt_tokens, prompt);
    assert_eq!(row.cost_usdc, PRICES.cost(prompt, delivered));
    assert_eq!(
        s.balance(&key).await,
        Usdc(5_000_000 - PRICES.cost(prompt, delivered).atomic())
    );
}

pub(crate) fn assert_openai_error(v: &Value, code: &str) {
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an OpenAI error: {v}"));
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "missing {k} in {v}");
    }
    assert_eq!(e["code"], code, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_an_openai_error() {
    let s = Stack::start(1).await;
    let key = s.credit_key(0x44, "1".parse().unwrap()).await;
    let url = format!("{}/v1/chat/completions", s.gw.base);
    let send = |body: &'static str, ct: &'static str| {
        s.gw.http
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let cases: Vec<(&str, &str, StatusCode, &str)> = vec![
        (
            "{not json",
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "{\"model\": \"demo\"}",
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "[1, 2]",
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "{\"model\": 7, \"messages\": []}",
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "{\"model\": \"nope\", \"messages\": []}",
            "application/json",
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            "{\"model\": \"demo\"}",
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "{\"model\": \"demo\", \"messages\": [], \"stream\": \"yes\"}",
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "{\"model\": \"demo\", \"messages\": [], \"max_tokens\": -1}",
            "application/json",
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
    ];
    for (body, ct, status, code) in cases {
        let resp = send(body, ct).await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        assert!(resp.headers().contains_key("x-request-id"));
        assert_openai_error(&resp.json().await.unwrap(), code);
    }
    // Oversized body: refused from its Content-Length, before it is read (a raw request, so the client is not
    // still writing 5 MiB when the server answers).
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        5 * 1024 * 1024
    );
    let addr = s.gw.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut conn, head.as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(&mut conn, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // No key → 402 with the catalog; nothing was charged for any of the above.
    let resp =
        s.gw.http
            .post(&url)
            .json(&json!({"model": "demo", "messages": []}))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["x402"]["version"], 2);
    assert_eq!(s.balance(&key).await, "1".parse().unwrap());
    // A valid key on a path that is not served.
    let (status, _, body) = s.gw.get("/v1/images/generations", Some(&key)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, "unknown_endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_keys_keep_to_their_windows_models_and_one_request_at_a_time() {
    let s = Stack::start(5).await;
    let key = s.pool_key(0, &["asia"], "3.00").await;
    let ok_body = json!({"model": "demo", "messages": messages("hi"), "max_tokens": 2});

    // 07:59:59 UTC: inside asia.
    s.gw.set_time(MIDNIGHT + 8 * 3600 - 1);
    let resp = s.chat(&key, ok_body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // 08:00:00 UTC: outside; the next asia window opens in 16 h.
    s.gw.set_time(MIDNIGHT + 8 * 3600);
    let resp = s.chat(&key, ok_body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        resp.headers()["retry-after"],
        (16 * 3600).to_string().as_str()
    );
    let err: Value = resp.json().await.unwrap();
    assert_openai_error(&err, "outside_subscription_window");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("asia (00:00-08:00 UTC)")
    );
    s.gw.set_time(MIDNIGHT + 3600);

    // A model outside the pool.
    let resp = s
        .chat(
            &key,
            json!({"model": "demo-fail", "messages": messages("x")}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_openai_error(&resp.json().await.unwrap(), "model_not_in_plan");

    // One request at a time: a second one while a stream is open gets 429; closing the stream frees the slot and
    // cancels the upstream request.
    let cancelled_before = s.upstream.cancelled.load(Ordering::SeqCst);
    let long = s.chat(&key, json!({"model": "demo", "messages": messages("go"), "max_tokens": 2000, "stream": true})).send().await.unwrap();
    assert_eq!(long.status(), StatusCode::OK);
    let mut stream = long.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let resp = s.chat(&key, ok_body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_openai_error(&resp.json().await.unwrap(), "concurrency_limit");
    drop(stream);
    wait_for("the upstream to see the cancel", || async {
        (s.upstream.cancelled.load(Ordering::SeqCst) > cancelled_before).then_some(())
    })
    .await;
    let status = wait_for("the slot to be free", || async {
        let r = s.chat(&key, ok_body.clone()).send().await.unwrap();
        (r.status() != StatusCode::TOO_MANY_REQUESTS).then_some(r.status())
    })
    .await;
    assert_eq!(status, StatusCode::OK);

    // /v1/usage shows the plan; /v1/models only the pool's models.
    let (_, _, usage) = s.gw.get("/v1/usage", Some(&key)).await;
    assert_eq!(usage["subscription"]["pool"], "p");
    assert_eq!(usage["subscription"]["activeNow"], true);
    assert_eq!(usage["subscription"]["blocks"][0]["name"], "asia");
    let (_, _, models) = s.gw.get("/v1/models", Some(&key)).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["demo", "demo-cut"]);

    // After expiry (30 days): 402 with the catalog to renew.
    s.gw.set_time(MIDNIGHT + 31 * 86_400 + 3600);
    let resp = s.chat(&key, ok_body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_refunds_requests_left_in_flight() {
    let s = Stack::start(1).await;
    let key = s.credit_key(0x55, "2".parse().unwrap()).await;
    let store = s.gw.store().await;
    let account = format!("{:#x}", alloy::primitives::Address::repeat_byte(0x55));
    // A reservation whose process died before settling it (on PostgreSQL: held by a replica with no live lease).
    let replica = on_postgres().then_some("replica-that-died");
    store
        .write(move |tx| -> Result<_, x402_gateway::store::StoreError> {
            let key_id: i64 = tx.query_one(
                "SELECT id FROM api_keys WHERE account = ?1",
                params![account],
                |r| r.get(0),
            )?;
            let usage = x402_gateway::store::usage::NewUsage {
                request_id: "req_crashed".into(),
                key_id,
                account: account.clone(),
                key_kind: "credit",
                model: "demo".into(),
                stream: true,
                started_at: MIDNIGHT,
                bound_prompt_tokens: 1000,
                bound_output_tokens: 100,
                input_per_mtok: PRICES.input_per_mtok,
                output_per_mtok: PRICES.output_per_mtok,
            };
            x402_gateway::store::usage::reserve(tx, &usage, Usdc(500_000), replica)
                .map_err(|e| x402_gateway::store::StoreError::Task(e.to_string()))?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(s.balance(&key).await, "1.50".parse().unwrap());
    let gw = s.gw.restart().await;
    // SQLite refunds at start; a PostgreSQL replica at its first sweep of expired leases, right after.
    let usage = wait_for("the reservation to be refunded", || async {
        let (_, _, usage) = gw.get("/v1/usage", Some(&key)).await;
        (usage["credits"]["balanceUsdc"] == "2.00").then_some(usage)
    })
    .await;
    assert_eq!(usage["recent"][0]["status"], "interrupted");
}

/// The official OpenAI Python SDK (PyPI `openai`, installed by scripts/test) as a key holder: model list, JSON and
/// streamed completions parsed by the SDK's own types, and the SDK's error classes fed by our error bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_lists_models_completes_and_streams() {
    let s = Stack::start(0).await;
    let key = s.credit_key(0x77, "1".parse().unwrap()).await;
    let Some(out) = crate::clients::run_client(
        &crate::clients::python(),
        "tests/interop/openai_sdk.py",
        &[&s.gw.base, &key, "demo"],
    )
    .await
    else {
        return;
    };
    assert!(out.get("error").is_none(), "{out}");
    let models: Vec<&str> = out["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        models.contains(&"demo") && models.contains(&"demo-cut"),
        "{out}"
    );

    // Non-streaming: the SDK's parsed usage is what was billed (prompt tokens from the demo upstream's count).
    let json = &out["json"];
    assert_eq!(json["usage"]["completion_tokens"], 5, "{out}");
    let prompt = json["usage"]["prompt_tokens"].as_u64().unwrap();
    let first_cost = PRICES.cost(prompt, 5);
    assert_eq!(json["cost"], first_cost.to_string(), "{out}");
    assert_eq!(json["finish_reason"], "length");

    // Streaming with include_usage: every delta parsed, and the final usage chunk reached the SDK.
    let stream = &out["stream"];
    assert_eq!(stream["usage"]["completion_tokens"], 6, "{out}");
    assert!(stream["chunks"].as_u64().unwrap() >= 7, "{out}");
    assert!(!stream["content"].as_str().unwrap().is_empty(), "{out}");
    // Without the option the usage chunk the gateway asked for upstream is not shown to the client.
    assert_eq!(out["stream_without_usage_option_saw_usage"], false, "{out}");

    // Errors: the SDK maps our status codes to its classes and reads the OpenAI error body.
    assert_eq!(out["unknown_model"]["class"], "NotFoundError", "{out}");
    assert_eq!(out["unknown_model"]["code"], "model_not_found", "{out}");
    assert_eq!(out["bad_key"]["status"], 402, "{out}");

    // Exactly the three completions were billed, to the atomic unit.
    let spent = "1".parse::<Usdc>().unwrap().0 - s.balance(&key).await.0;
    let expected = first_cost.0 + PRICES.cost(prompt, 6).0 + PRICES.cost(prompt, 3).0;
    assert_eq!(spent, expected, "{out}");
}
