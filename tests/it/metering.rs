//! Metering against an upstream that behaves like vLLM and SGLang, sharp edges included (the demo upstream:
//! `max_completion_tokens` honoured before `max_tokens`, `n` choices, `best_of` candidates, image parts at their
//! real token cost, and an `overrun-N` model that ignores every cap). Each test is an agent trying to get more
//! inference than it paid for, through the real server, real SQLite and a real top-up on anvil:
//! - the output bound is the gateway's, written into both fields the upstream may read;
//! - `n`, `best_of` and other multipliers are refused or reserved;
//! - settlement never exceeds the reservation; an upstream that ignores caps is cut at the bound and recorded;
//! - a credit account has a cap on requests in flight; a pool subscription one request at a time, across rotation;
//! - non-text parts are refused unless bounded; a hang-up before usage charges the reservation (prompt at its
//!   bound: tools and tool calls included), a JSON request whose client hung up is still settled from its usage;
//! - the 1,000-request exploit of the issue: what the upstream generated, priced, never exceeds what was paid.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats, IMAGE_TOKENS};
use x402_gateway::proxy::TEMPLATE_TOKEN_MARGIN;
use x402_gateway::proxy::pricing::Prices;
use x402_gateway::store::{Store, StoreError};
use x402_gateway::usdc::Usdc;

use crate::proxy::{MIDNIGHT, messages, sse_events};
use crate::support::*;
use x402_gateway::params;

/// The `max_output_tokens` of the `demo` model.
const CAP: u64 = 40;
const PRICES: Prices = Prices {
    input_per_mtok: Usdc(600_000),
    output_per_mtok: Usdc(2_500_000),
};

/// Gateway, anvil and demo upstream, with `extra` appended to the config (e.g. a `[limits]` table).
struct Meter {
    chain: TestChain,
    gw: Gateway,
    upstream: Arc<DemoStats>,
    _dir: tempfile::TempDir,
}

fn config(chain: &TestChain, upstream: &str, db: &std::path::Path, extra: &str) -> String {
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
name = "vllm"
base_url = "{upstream}"

[[upstreams]]
name = "max-tokens-only"
base_url = "{upstream}"
output_limit_field = "max_tokens"

[[models]]
id = "demo"
upstream = "vllm"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}

[[models]]
id = "demo-n"
upstream = "vllm"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}
max_choices = 4

[[models]]
id = "demo-vision"
upstream = "vllm"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}
content_part_tokens = {{ image_url = 1500 }}

[[models]]
id = "demo-old"
upstream = "max-tokens-only"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}

[[models]]
id = "demo-overrun"
upstream = "vllm"
upstream_model = "overrun-500"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}

# The same, for the audit test: the overrun counter is one per process, and each test counts its own model's.
[[models]]
id = "demo-overrun-audited"
upstream = "vllm"
upstream_model = "overrun-500"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = {CAP}

[[pools]]
slug = "p"
name = "Demo pool"
models = ["demo"]
blocks = [{{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "3.00", seats = 5 }}]

[credits]
min_topup_usdc = "1.00"
{extra}
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

impl Meter {
    async fn start(token_delay_ms: u64, extra: &str) -> Meter {
        let chain = TestChain::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stats = Arc::new(DemoStats::default());
        let demo = DemoConfig {
            token_delay: std::time::Duration::from_millis(token_delay_ms),
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
        let gw = Gateway::start_with(
            config(&chain, &url, &db, extra),
            db,
            Arc::new(AtomicI64::new(MIDNIGHT + 3600)),
        )
        .await;
        Meter {
            chain,
            gw,
            upstream: stats,
            _dir: dir,
        }
    }

    /// A credit key bought the way an agent buys it: a USDC transfer on anvil, claimed with the payer's signature.
    async fn topup(&self, payer: usize, amount: &str) -> String {
        let (tx, block) = self.chain.pay(payer, amount.parse().unwrap()).await;
        self.gw.confirm(&self.chain, block, 1).await;
        let (status, _, body) = self
            .gw
            .post(
                "/api/agent/topup",
                json!({"txHash": tx, "amount": amount, "signature": crate::checkout::sign(self.chain.payer(payer), &claim_text(&tx, 31337))}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["data"]["apiKey"].as_str().unwrap().to_string()
    }

    fn chat(&self, key: &str, body: &Value) -> reqwest::RequestBuilder {
        self.gw
            .http
            .post(format!("{}/v1/chat/completions", self.gw.base))
            .bearer_auth(key)
            .json(body)
    }

    async fn balance(&self, key: &str) -> Usdc {
        let (status, _, usage) = self.gw.get("/v1/usage", Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        usage["credits"]["balanceUsdc"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn last_upstream_body(&self) -> Value {
        self.upstream
            .last_body
            .lock()
            .unwrap()
            .clone()
            .expect("the upstream saw a request")
    }

    async fn store(&self) -> Store {
        self.gw.store().await
    }

    /// Waits until no usage row is `in_flight`; returns every usage row.
    async fn settled_rows(&self) -> Vec<Row> {
        let store = self.store().await;
        wait_for("every request settled", || {
            let store = store.clone();
            async move {
                let rows = usage_rows(&store).await;
                rows.iter().all(|r| r.status != "in_flight").then_some(rows)
            }
        })
        .await
    }

    async fn metrics(&self) -> String {
        self.gw
            .http
            .get(format!("{}/metrics", self.gw.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// One usage row with the metering columns.
#[derive(Debug, Clone)]
struct Row {
    status: String,
    usage_source: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    reserved: i64,
    cost: i64,
    bound_prompt: u64,
    bound_output: u64,
    overrun_tokens: u64,
    uncharged: i64,
}

async fn usage_rows(store: &Store) -> Vec<Row> {
    store
        .read(|c| -> Result<_, StoreError> {
            c.query_map(
                "SELECT status, usage_source, prompt_tokens, completion_tokens, reserved_atomic, cost_atomic, \
                 bound_prompt_tokens, bound_output_tokens, overrun_tokens, uncharged_atomic FROM usage ORDER BY id",
                params![],
                |r| {
                    Ok(Row {
                        status: r.get(0)?,
                        usage_source: r.get(1)?,
                        prompt_tokens: r.get(2)?,
                        completion_tokens: r.get(3)?,
                        reserved: r.get(4)?,
                        cost: r.get(5)?,
                        bound_prompt: r.get(6)?,
                        bound_output: r.get(7)?,
                        overrun_tokens: r.get(8)?,
                        uncharged: r.get(9)?,
                    })
                },
            )
        })
        .await
        .unwrap()
}

/// Sum of the account's ledger rows (the balance by definition).
async fn ledger_sum(store: &Store) -> i64 {
    store
        .read(|c| -> Result<_, StoreError> {
            c.query_one(
                "SELECT coalesce(sum(amount_atomic), 0) FROM ledger",
                params![],
                |r| r.get::<i64>(0),
            )
        })
        .await
        .unwrap()
}

/// The prompt bound of `body` as the client sends it (reqwest's `.json` writes `serde_json::to_vec`).
fn prompt_bound(body: &Value) -> u64 {
    serde_json::to_vec(body).unwrap().len() as u64 + TEMPLATE_TOKEN_MARGIN
}

fn error_param(body: &Value) -> Option<&str> {
    body["error"]["param"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_bound_is_the_gateways_whatever_fields_the_agent_mixes() {
    let m = Meter::start(0, "").await;
    let key = m.topup(0, "5").await;

    // The issue's trick: a tiny max_tokens for the reservation, a huge max_completion_tokens for vLLM.
    let body = json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 1, "max_completion_tokens": 100000});
    let resp = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 1, "{answer}");
    let sent = m.last_upstream_body();
    assert_eq!(
        (&sent["max_tokens"], &sent["max_completion_tokens"]),
        (&json!(1), &json!(1))
    );

    // Only the field vLLM honours: capped by the model.
    let body = json!({"model": "demo", "messages": messages("one two three"), "max_completion_tokens": 100000});
    let answer: Value = m
        .chat(&key, &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], CAP);
    let sent = m.last_upstream_body();
    assert_eq!(
        (&sent["max_tokens"], &sent["max_completion_tokens"]),
        (&json!(CAP), &json!(CAP))
    );

    // Neither field: the cap, written into both.
    let body = json!({"model": "demo", "messages": messages("one two three"), "stream": true});
    let text = m
        .chat(&key, &body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let sent = m.last_upstream_body();
    assert_eq!(sent["max_completion_tokens"], CAP);

    // An upstream configured to read only `max_tokens` never sees `max_completion_tokens`.
    let body =
        json!({"model": "demo-old", "messages": messages("x"), "max_completion_tokens": 100000});
    assert_eq!(
        m.chat(&key, &body).send().await.unwrap().status(),
        StatusCode::OK
    );
    let sent = m.last_upstream_body();
    assert_eq!(sent["max_tokens"], CAP);
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");

    // Every request was charged within its reservation, and the reservation was the bound.
    for row in m.settled_rows().await {
        assert!(row.cost <= row.reserved, "{row:?}");
        assert!(row.completion_tokens <= row.bound_output, "{row:?}");
        assert_eq!(row.overrun_tokens, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_and_best_of_are_refused_or_reserved_per_choice() {
    let m = Meter::start(0, "").await;
    let key = m.topup(0, "5").await;
    let before = m.upstream.requests.load(Ordering::SeqCst);

    // A model that serves n = 1: refused, naming `n`, nothing forwarded.
    for trick in [
        json!({"n": 8}),
        json!({"best_of": 4}),
        json!({"n": 0}),
        json!({"use_beam_search": true}),
        json!({"max_new_tokens": 100000}),
    ] {
        let mut body = json!({"model": "demo", "messages": messages("hi"), "max_tokens": 5});
        for (k, v) in trick.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = m.chat(&key, &body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{trick}");
        let err: Value = resp.json().await.unwrap();
        let expected = trick.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(error_param(&err), Some(expected.as_str()), "{err}");
    }
    assert_eq!(m.upstream.requests.load(Ordering::SeqCst), before);

    // A model that allows n ≤ 4: reserved and charged for every choice.
    let body =
        json!({"model": "demo-n", "messages": messages("one two three"), "n": 3, "max_tokens": 10});
    let resp = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cost: Usdc = resp.headers()["x-gateway-cost-usdc"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["choices"].as_array().unwrap().len(), 3);
    assert_eq!(answer["usage"]["completion_tokens"], 30);
    assert_eq!(cost, PRICES.cost(3, 30));
    let rows = m.settled_rows().await;
    let row = rows.last().unwrap();
    assert_eq!(row.bound_output, 30);
    assert_eq!(row.reserved, PRICES.cost(prompt_bound(&body), 30).atomic());
    let body = json!({"model": "demo-n", "messages": messages("x"), "n": 5});
    let resp = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // A pool key: n = 1 always.
    let pool = crate::proxy::buy_pool_key(&m.chain, &m.gw, 1, &["asia"], "3").await;
    let body = json!({"model": "demo", "messages": messages("x"), "n": 2});
    let resp = m.chat(&pool, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_param(&resp.json::<Value>().await.unwrap()), Some("n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_ignores_caps_is_cut_at_the_bound_and_charged_only_the_reservation() {
    let m = Meter::start(1, "").await;
    let key = m.topup(0, "5").await;
    let start = m.balance(&key).await;

    // Streamed: the gateway counts the output it forwards and cuts at the bound (5 tokens).
    let body = json!({"model": "demo-overrun", "messages": messages("one two"), "max_tokens": 5, "stream": true});
    let text = m
        .chat(&key, &body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let content = events
        .iter()
        .filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\""))
        .count();
    assert_eq!(content, 5, "{text}");
    assert!(events.iter().any(|e| e.contains("output_bound_exceeded")));
    let reservation = PRICES.cost(prompt_bound(&body), 5);
    let rows = m.settled_rows().await;
    let row = rows.last().unwrap();
    assert_eq!(row.status, "overrun_cut");
    assert!(row.overrun_tokens >= 1, "{row:?}");
    assert_eq!(row.cost, reservation.atomic(), "charged the reservation");
    assert_eq!(
        m.balance(&key).await,
        Usdc(start.atomic() - reservation.atomic())
    );
    // The upstream stopped soon after the cut (the connection was dropped), far short of its 500 tokens.
    wait_for("the upstream to notice the cut", || async {
        (m.upstream.cancelled.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;

    // JSON: the whole answer was generated already; it is charged the reservation and the rest recorded.
    let body = json!({"model": "demo-overrun", "messages": messages("one two"), "max_tokens": 5});
    let before = m.balance(&key).await;
    let resp = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 500);
    let reservation = PRICES.cost(prompt_bound(&body), 5);
    let rows = m.settled_rows().await;
    let row = rows.last().unwrap();
    assert_eq!(row.cost, reservation.atomic());
    assert_eq!(row.overrun_tokens, 495);
    assert_eq!(
        row.uncharged,
        PRICES.cost(2, 500).atomic() - reservation.atomic()
    );
    assert_eq!(
        m.balance(&key).await,
        Usdc(before.atomic() - reservation.atomic())
    );

    let metrics = m.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("x402_metering_overruns_total{model=\"demo-overrun\"} 2")),
        "{metrics}"
    );
    // The balance is the ledger, exactly.
    assert_eq!(
        ledger_sum(&m.store().await).await,
        m.balance(&key).await.atomic()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_key_has_a_cap_on_requests_in_flight() {
    let m = Meter::start(
        20,
        "[limits]\nrate_limits = false\ncredit_key_max_in_flight = 2\n",
    )
    .await;
    let key = m.topup(0, "5").await;
    let body =
        json!({"model": "demo", "messages": messages("x"), "max_tokens": 20, "stream": true});
    // Two slow streams hold both slots.
    let a = m.chat(&key, &body).send().await.unwrap();
    let b = m.chat(&key, &body).send().await.unwrap();
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    let third = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["retry-after"], "1");
    let err: Value = third.json().await.unwrap();
    assert_eq!(err["error"]["code"], "concurrency_limit");
    assert_eq!(err["error"]["type"], "rate_limit_error");
    // Once they end, the key works again.
    a.text().await.unwrap();
    b.text().await.unwrap();
    wait_for("a slot to free", || async {
        let r = m.chat(&key, &body).send().await.unwrap();
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_text_parts_are_refused_unless_bounded_and_then_reserved() {
    let m = Meter::start(0, "").await;
    let key = m.topup(0, "5").await;
    let image = json!({"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}});
    let content = json!([{"type": "text", "text": "what is this"}, image, image]);
    let before = m.upstream.requests.load(Ordering::SeqCst);

    // `demo` declares no bound for images: a 60-byte URL would cost 1,200 tokens.
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 3});
    let resp = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(error_param(&err), Some("messages"));
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("image_url")
    );
    let audio = json!([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]);
    let body = json!({"model": "demo-vision", "messages": [{"role": "user", "content": audio}]});
    assert_eq!(
        m.chat(&key, &body).send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(m.upstream.requests.load(Ordering::SeqCst), before);

    // `demo-vision` bounds an image at 1,500 tokens: reserved, and the real usage (1,200 each) fits.
    let body = json!({"model": "demo-vision", "messages": [{"role": "user", "content": content}], "max_tokens": 3});
    let resp = m.chat(&key, &body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], 3 + 2 * IMAGE_TOKENS);
    let rows = m.settled_rows().await;
    let row = rows.last().unwrap();
    assert_eq!(row.bound_prompt, prompt_bound(&body) + 3000);
    assert_eq!(row.cost, PRICES.cost(3 + 2 * IMAGE_TOKENS, 3).atomic());
    assert_eq!(row.overrun_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_before_usage_charges_the_reservation_prompt_included() {
    let m = Meter::start(30, "").await;
    let key = m.topup(0, "5").await;
    // Tools, a system prompt and earlier tool calls: text the old estimate (message contents only) did not count.
    let tools = json!([{"type": "function", "function": {"name": "lookup", "description": "word ".repeat(400), "parameters": {"type": "object", "properties": {}}}}]);
    let body = json!({
        "model": "demo", "stream": true, "max_tokens": 30, "tools": tools,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"long arguments text here\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "result"},
            {"role": "user", "content": "go"}
        ],
    });
    let start = m.balance(&key).await;
    let resp = m.chat(&key, &body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    // Read the first content event, then hang up.
    let mut seen = String::new();
    while !seen.contains("\"content\":\"Paid\"") {
        let chunk = stream.next().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);
    let rows = m.settled_rows().await;
    let row = rows.last().unwrap();
    assert_eq!(row.status, "client_closed");
    assert_eq!(row.usage_source, "reservation");
    assert_eq!(row.prompt_tokens, prompt_bound(&body));
    assert_eq!(row.completion_tokens, 30);
    assert_eq!(row.cost, PRICES.cost(prompt_bound(&body), 30).atomic());
    assert_eq!(row.cost, row.reserved);
    assert_eq!(m.balance(&key).await, Usdc(start.atomic() - row.cost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_subscription_serves_one_request_at_a_time_across_key_rotation() {
    let m = Meter::start(20, "").await;
    let payer = m.chain.payer(2).clone();
    let old_key = crate::proxy::buy_pool_key(&m.chain, &m.gw, 2, &["asia"], "3").await;
    let body =
        json!({"model": "demo", "messages": messages("x"), "max_tokens": 30, "stream": true});
    let running = m.chat(&old_key, &body).send().await.unwrap();
    assert_eq!(running.status(), StatusCode::OK);
    // The payer rotates (its key leaked, or an answer was lost) while the old key's stream runs.
    let new_key = crate::checkout::rotate(&m.gw, &payer, MIDNIGHT + 3600).await;
    assert_ne!(new_key, old_key);
    let second = m.chat(&new_key, &body).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let err: Value = second.json().await.unwrap();
    assert_eq!(err["error"]["code"], "concurrency_limit");
    running.text().await.unwrap();
    wait_for("the subscription's slot to free", || async {
        let r = m.chat(&new_key, &body).send().await.unwrap();
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
}

/// The issue's exploit at scale: 10.00 USDC paid, then 1,000 concurrent requests from one credit key mixing every
/// trick. Whatever the gateway answers, what the upstream generated (its own count), priced at the model's prices,
/// is at most what was paid; the balance is exact against the ledger; no request was charged beyond its
/// reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tricks_never_get_more_inference_than_was_paid_for() {
    // Expensive output (250 USDC per million tokens), a generous cap (2,000 tokens): one request's bound is about
    // 0.5 USDC, so 10.00 USDC runs out after a few dozen requests and the rest must be refused.
    let extra = r#"
[[models]]
id = "dear"
upstream = "vllm"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "250.00"
max_output_tokens = 2000
max_choices = 2
"#;
    // Twice: with the in-flight cap off, so all 1,000 race for the balance (the reservation alone must hold
    // them), and with the default cap of 16 per credit account.
    for limits in ["", "[limits]\nrate_limits = false\n"] {
        exploit(&format!("{extra}{limits}")).await;
    }
}

async fn exploit(config: &str) {
    let m = Meter::start(0, config).await;
    let prices = Prices {
        input_per_mtok: "0.60".parse().unwrap(),
        output_per_mtok: "250.00".parse().unwrap(),
    };
    let key = m.topup(0, "10").await;
    let paid: Usdc = "10".parse().unwrap();
    let tools = json!([{"type": "function", "function": {"name": "f", "description": "tool text ".repeat(300), "parameters": {"type": "object"}}}]);
    let image = json!({"type": "image_url", "image_url": {"url": "https://example.test/i.png"}});

    let tricks: Vec<(Value, bool)> = vec![
        (
            json!({"max_tokens": 1, "max_completion_tokens": 100000}),
            false,
        ),
        (
            json!({"max_completion_tokens": 100000, "stream": true}),
            false,
        ),
        (json!({"n": 2, "max_completion_tokens": 100000}), false),
        (json!({"n": 16}), false),
        (json!({"best_of": 8, "max_tokens": 1}), false),
        (json!({"tools": tools}), false),
        (
            json!({"stream": true, "max_tokens": 1, "max_completion_tokens": 100000}),
            true,
        ),
        (
            json!({"messages": [{"role": "user", "content": [image]}]}),
            false,
        ),
        (json!({}), false),
    ];
    let requests = 1000usize;
    let outcomes = futures::stream::iter(0..requests)
        .map(|i| {
            let (trick, disconnect) = tricks[i % tricks.len()].clone();
            let mut body = json!({"model": "dear", "messages": messages("spend it all")});
            for (k, v) in trick.as_object().unwrap() {
                body[k] = v.clone();
            }
            let m = &m;
            let key = &key;
            async move {
                // An attacker retries every 429 (busy: the in-flight cap) until it is served or told it cannot
                // pay, so the balance runs out whatever the cap and the machine's speed.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                let resp = loop {
                    let resp = m.chat(key, &body).send().await.unwrap();
                    if resp.status() != StatusCode::TOO_MANY_REQUESTS
                        || std::time::Instant::now() > deadline
                    {
                        break resp;
                    }
                    let _ = resp.bytes().await;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                };
                let status = resp.status();
                if disconnect && status == StatusCode::OK {
                    let mut s = resp.bytes_stream();
                    let _ = s.next().await;
                    drop(s);
                } else {
                    let _ = resp.bytes().await;
                }
                status
            }
        })
        .buffer_unordered(requests)
        .collect::<Vec<StatusCode>>()
        .await;
    let count = |s: StatusCode| outcomes.iter().filter(|o| **o == s).count();
    let (ok, refused, busy, broke) = (
        count(StatusCode::OK),
        count(StatusCode::BAD_REQUEST),
        count(StatusCode::TOO_MANY_REQUESTS),
        count(StatusCode::PAYMENT_REQUIRED),
    );
    assert_eq!(ok + refused + busy + broke, requests, "{outcomes:?}");
    assert!(ok > 0 && broke > 0, "ok {ok}, 402 {broke}");

    let rows = m.settled_rows().await;
    let store = m.store().await;
    let balance = m.balance(&key).await;
    // Exact to the atomic unit: balance = ledger = paid − Σ charges.
    assert_eq!(ledger_sum(&store).await, balance.atomic());
    let charged: i64 = rows.iter().map(|r| r.cost).sum();
    assert_eq!(balance.atomic(), paid.atomic() - charged);
    assert!(balance >= Usdc::ZERO);
    for row in &rows {
        assert!(
            row.cost <= row.reserved,
            "charged beyond its reservation: {row:?}"
        );
        assert_eq!(row.overrun_tokens, 0, "{row:?}");
    }
    // What the upstream generated, by its own count, priced: never more than was paid.
    let generated = m.upstream.generated_tokens.load(Ordering::SeqCst);
    let prompt = m.upstream.prompt_tokens.load(Ordering::SeqCst);
    let served = prices.cost(prompt, generated);
    eprintln!(
        "exploit: {ok} served, {refused} refused (400), {busy} busy (429), {broke} unpaid (402); upstream generated \
         {generated} output + {prompt} prompt tokens = {served} USDC of inference for {paid} USDC paid; balance {balance}"
    );
    assert!(
        served <= paid,
        "served {served} USDC of inference for {paid} USDC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_request_whose_client_hung_up_is_still_settled_from_its_usage() {
    // 30 ms a token: a 20-token JSON answer takes 600 ms; the client gives up after 100 ms.
    let m = Meter::start(30, "").await;
    let key = m.topup(0, "5").await;
    let start = m.balance(&key).await;
    let body = json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 20});
    let gave_up = m
        .chat(&key, &body)
        .timeout(std::time::Duration::from_millis(100))
        .send()
        .await;
    assert!(gave_up.is_err());
    let rows = m.settled_rows().await;
    wait_for("the upstream to answer", || async {
        (m.upstream.completed.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    let store = m.store().await;
    let rows = wait_for("the request to settle from its usage", || {
        let store = store.clone();
        let n = rows.len();
        async move {
            let rows = usage_rows(&store).await;
            (rows.len() == n && rows.iter().all(|r| r.status == "ok")).then_some(rows)
        }
    })
    .await;
    let row = rows.last().unwrap();
    assert_eq!(row.usage_source, "upstream");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (3, 20));
    assert_eq!(row.cost, PRICES.cost(3, 20).atomic());
    assert_eq!(m.balance(&key).await, Usdc(start.atomic() - row.cost));
}

async fn audit(m: &Meter) -> x402_gateway::audit::verify::Report {
    x402_gateway::audit::verify::verify(&m.gw.settings(), &m.store().await, &mut |_| {})
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_checks_every_charge_and_lists_overruns() {
    let m = Meter::start(0, "").await;
    let key = m.topup(0, "5").await;
    for body in [
        json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 7}),
        json!({"model": "demo", "messages": messages("four"), "stream": true}),
        json!({"model": "demo-overrun-audited", "messages": messages("one two"), "max_tokens": 5}),
    ] {
        assert_eq!(
            m.chat(&key, &body).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    let rows = m.settled_rows().await;
    let report = audit(&m).await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert_eq!(report.usage_rows_checked, 3);
    assert_eq!(report.overruns.len(), 1, "{:?}", report.overruns);
    assert_eq!(report.overruns[0].overrun_tokens, 495);
    assert_eq!(report.overruns[0].uncharged, Usdc(rows[2].uncharged));

    // Tamper as the old code settled: an undercharge with no overrun recorded, and a charge beyond the reservation.
    m.store()
        .await
        .write(|c| -> Result<(), StoreError> {
            c.execute(
                "UPDATE usage SET cost_atomic = cost_atomic - 1 WHERE id = 1",
                params![],
            )?;
            c.execute(
                "UPDATE usage SET cost_atomic = reserved_atomic + 5 WHERE id = 2",
                params![],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let report = audit(&m).await;
    let text: Vec<String> = report.discrepancies.iter().map(|d| d.to_string()).collect();
    assert!(
        text.iter()
            .any(|d| d.starts_with("[usage]") && d.contains("undercharged")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|d| d.starts_with("[usage]") && d.contains("beyond its reservation")),
        "{text:?}"
    );
}
