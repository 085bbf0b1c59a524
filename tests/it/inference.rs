//! The inference APIs beyond chat — Anthropic Messages (served natively by one upstream, translated to chat
//! completions for another), OpenAI Responses, legacy completions and embeddings — through the real server to two
//! demo upstreams, used as agents use them: the official `anthropic` and `openai` Python SDKs, then raw HTTP
//! requests written to be served more than they pay for.
//!
//! Prices are whole atomic units per token (3.00 and 15.00 USDC per million: 3 and 15 atomic per input and output
//! token), so every expected charge below is computed by hand, independently of the gateway's pricing code. A
//! credit request reserves its bound: the body's bytes plus the template margin as prompt tokens, and its output
//! bound × choices.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use x402_gateway::dev::upstream::{DemoConfig, DemoServer, DemoStats};
use x402_gateway::proxy::TEMPLATE_TOKEN_MARGIN;
use x402_gateway::usdc::Usdc;

use crate::clients::{python, run_client};
use crate::proxy::MIDNIGHT;
use crate::support::*;

/// Every model's `max_output_tokens`.
const CAP: u64 = 40;

/// The models: id, upstream, upstream model (the demo's fault by name), `max_choices`.
const MODELS: &[(&str, &str, &str, u64)] = &[
    ("claude-native", "native", "demo", 1),
    ("claude-translate", "chat", "demo", 1),
    ("gpt", "chat", "demo", 6),
    ("gpt-one", "chat", "demo", 1),
    ("overrun-native", "native", "overrun-2000", 1),
    ("overrun", "chat", "overrun-2000", 1),
    ("cut-native", "native", "cut-3", 1),
    ("cut", "chat", "cut-3", 1),
];

/// The five inference paths.
const PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
];

/// The cost of `prompt` input and `completion` output tokens, in atomic USDC.
fn cost(prompt: u64, completion: u64) -> Usdc {
    Usdc((3 * prompt + 15 * completion) as i64)
}

/// The prompt bound of a request body of `body_len` bytes.
fn prompt_bound(body_len: usize) -> u64 {
    body_len as u64 + TEMPLATE_TOKEN_MARGIN
}

/// What a credit request of `body_len` bytes with `output` tokens of output bound (all choices) reserves.
fn reservation(body_len: usize, output: u64) -> Usdc {
    cost(prompt_bound(body_len), output)
}

fn usdc(v: &Value) -> Usdc {
    v.as_str()
        .unwrap_or_else(|| panic!("not a USDC string: {v}"))
        .parse()
        .unwrap()
}

fn words(v: &Value) -> usize {
    v.as_str().unwrap_or_default().split_whitespace().count()
}

fn config(chain: &TestChain, native: &str, chat: &str, db: &Path) -> String {
    let models: String = MODELS
        .iter()
        .map(|(id, upstream, upstream_model, max_choices)| {
            format!(
                r#"
[[models]]
id = "{id}"
upstream = "{upstream}"
upstream_model = "{upstream_model}"
input_usdc_per_mtok = "3.00"
output_usdc_per_mtok = "15.00"
max_output_tokens = {CAP}
max_choices = {max_choices}
"#
            )
        })
        .collect();
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
name = "native"
base_url = "{native}"
api_key_env = "DEMO_UPSTREAM_KEY"
messages_api = "native"

[[upstreams]]
name = "chat"
base_url = "{chat}"
api_key_env = "DEMO_UPSTREAM_KEY"
messages_api = "translate"
{models}
[credits]
min_topup_usdc = "1.00"
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

/// How a request presents its key.
#[derive(Clone, Copy)]
enum Auth<'a> {
    Bearer(&'a str),
    XApiKey(&'a str),
    None,
}

/// An answer read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    /// Bytes of the request body sent.
    sent: usize,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn request_id(&self) -> String {
        self.headers["x-request-id"].to_str().unwrap().to_string()
    }

    fn reserved(&self) -> Usdc {
        self.headers["x-gateway-reserved-usdc"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The `event:` names of an SSE body, in order.
    fn event_names(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect()
    }

    /// The JSON `data:` payloads of an SSE body (`[DONE]` left out).
    fn data(&self) -> Vec<Value> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }

    /// Events of type `kind` (Responses and Messages streams name their type in the data too).
    fn count(&self, kind: &str) -> usize {
        self.data().iter().filter(|d| d["type"] == kind).count()
    }

    fn assert_anthropic_error(&self, status: StatusCode, kind: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let body = self.json();
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(
            body.as_object().unwrap().len(),
            2,
            "Anthropic's shape only: {body}"
        );
    }

    fn assert_openai_error(&self, status: StatusCode, param: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let body = self.json();
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
}

struct Stack {
    _chain: TestChain,
    gw: Gateway,
    /// Behind the upstream that serves `/v1/messages` itself.
    native: Arc<DemoStats>,
    /// Behind the upstream that does not: Messages reach it as chat completions.
    chat: Arc<DemoStats>,
    _servers: (DemoServer, DemoServer),
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        let chain = TestChain::start().await;
        let demo = || DemoConfig {
            token_delay: std::time::Duration::from_millis(1),
            api_key: Some("upstream-secret".into()),
            ..DemoConfig::default()
        };
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (native, chat) = (
            Arc::new(DemoStats::default()),
            Arc::new(DemoStats::default()),
        );
        let native_server = DemoServer::start(any, demo(), native.clone())
            .await
            .unwrap();
        let chat_server = DemoServer::start(any, demo(), chat.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let text = config(&chain, &native_server.url(), &chat_server.url(), &db);
        let gw = Gateway::start_with_env(
            text,
            db,
            Arc::new(AtomicI64::new(MIDNIGHT + 3600)),
            &[("DEMO_UPSTREAM_KEY", "upstream-secret")],
        )
        .await;
        Stack {
            _chain: chain,
            gw,
            native,
            chat,
            _servers: (native_server, chat_server),
            _dir: dir,
        }
    }

    /// A credit key of a new account holding exactly `amount`.
    async fn credit_key(&self, account_byte: u8, amount: Usdc) -> String {
        let store = self.gw.store().await;
        let account = alloy::primitives::Address::repeat_byte(account_byte);
        let (_, key) = x402_gateway::billing::grant(&store, account, amount, None, MIDNIGHT)
            .await
            .unwrap();
        key.expect("a new account gets a key").full
    }

    async fn send_bytes(
        &self,
        path: &str,
        auth: Auth<'_>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Answer {
        let sent = body.len();
        let mut req = self
            .gw
            .http
            .post(format!("{}{path}", self.gw.base))
            .header("content-type", content_type)
            .body(body);
        req = match auth {
            Auth::Bearer(k) => req.bearer_auth(k),
            Auth::XApiKey(k) => req.header("x-api-key", k),
            Auth::None => req,
        };
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        Answer {
            status,
            headers,
            text: resp.text().await.unwrap(),
            sent,
        }
    }

    /// POSTs `body` as JSON, read whole (a stream to its end).
    async fn send(&self, path: &str, auth: Auth<'_>, body: &Value) -> Answer {
        self.send_bytes(
            path,
            auth,
            "application/json",
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    async fn usage(&self, key: &str) -> Value {
        let (status, _, usage) = self.gw.get("/v1/usage", Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        usage
    }

    async fn balance(&self, key: &str) -> Usdc {
        usdc(&self.usage(key).await["credits"]["balanceUsdc"])
    }

    /// The request's row in `/v1/usage`, once settled.
    async fn row(&self, key: &str, request_id: &str) -> Value {
        wait_for(
            &format!("usage row of {request_id} to settle"),
            || async move {
                let usage = self.usage(key).await;
                usage["recent"]
                    .as_array()?
                    .iter()
                    .find(|r| r["requestId"] == request_id && r["status"] != "in_flight")
                    .cloned()
            },
        )
        .await
    }

    /// Checks the settled row of `request_id`: tokens, cost, status and usage source; returns its cost.
    async fn assert_row(
        &self,
        key: &str,
        request_id: &str,
        tokens: (u64, u64),
        cost: Usdc,
        status: &str,
        source: &str,
    ) -> Usdc {
        let row = self.row(key, request_id).await;
        assert_eq!(
            (
                row["promptTokens"].as_u64().unwrap(),
                row["completionTokens"].as_u64().unwrap()
            ),
            tokens,
            "{row}"
        );
        assert_eq!(usdc(&row["costUsdc"]), cost, "{row}");
        assert_eq!(row["status"], status, "{row}");
        assert_eq!(row["usageSource"], source, "{row}");
        cost
    }

    fn upstream_requests(&self) -> u64 {
        self.native.requests.load(Ordering::SeqCst) + self.chat.requests.load(Ordering::SeqCst)
    }
}

fn anthropic_request(model: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model, "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "tell me a story please"}],
    })
}

/// Runs tests/interop/anthropic_sdk.py with a fresh key against `model` and checks every number it saw against
/// the demo upstream's exact counts and against what `/v1/usage` and the balance say was billed.
async fn anthropic_sdk_run(s: &Stack, account_byte: u8, model: &str, upstream_path: &str) {
    let start = Usdc(1_000_000);
    let key = s.credit_key(account_byte, start).await;
    let before = (
        s.native.requests_on("/v1/messages"),
        s.chat.requests_on("/v1/chat/completions"),
    );
    let Some(out) = run_client(
        &python(),
        "tests/interop/anthropic_sdk.py",
        &[&s.gw.base, &key, model],
    )
    .await
    else {
        return;
    };
    assert!(out.get("error").is_none(), "{model}: {out}");
    // System "be brief" and the prompt "say hello to the auditor": 7 words, 7 input tokens at the demo upstream.
    const INPUT: u64 = 7;
    let mut billed = 0i64;
    for (call, output) in [("json", 5), ("auth_token", 3), ("x_api_key", 2)] {
        let seen = &out[call];
        assert_eq!(seen["type"], "message", "{call}: {seen}");
        assert_eq!(seen["role"], "assistant");
        if upstream_path != "/v1/messages" {
            // Translated answers name the client's model (a passed-through one names what the upstream says).
            assert_eq!(seen["model"], model, "{call}: {seen}");
        }
        assert_eq!(seen["stop_reason"], "max_tokens", "{call}: {seen}");
        assert_eq!(words(&seen["text"]), output as usize, "{call}: {seen}");
        assert_eq!(
            seen["usage"],
            json!({"input_tokens": INPUT, "output_tokens": output}),
            "{call}"
        );
        let charged = cost(INPUT, output);
        assert_eq!(
            usdc(&seen["cost"]),
            charged,
            "{call}: the SDK's response headers"
        );
        let id = seen["request_id"].as_str().unwrap();
        billed += s
            .assert_row(&key, id, (INPUT, output), charged, "ok", "upstream")
            .await
            .atomic();
    }
    // The SDK put the key where it was told to (`api_key` goes in one header or the other, by SDK version).
    let sent = &out["json"]["sent"];
    assert_ne!(sent["authorization"], sent["x_api_key"], "{sent}");
    assert_eq!(
        out["auth_token"]["sent"],
        json!({"authorization": true, "x_api_key": false})
    );
    assert_eq!(
        out["x_api_key"]["sent"],
        json!({"authorization": false, "x_api_key": true}),
        "the key only in x-api-key (Anthropic's own header)"
    );

    // messages.stream: the SDK's accumulated final message carries the usage of message_start + message_delta.
    let stream = &out["stream"];
    assert_eq!(
        stream["usage"],
        json!({"input_tokens": INPUT, "output_tokens": 6}),
        "{stream}"
    );
    assert_eq!(words(&stream["text"]), 6, "{stream}");
    assert_eq!(stream["text"], stream["final_text"]);
    assert_eq!(stream["stop_reason"], "max_tokens");
    let id = stream["request_id"].as_str().unwrap();
    assert!(usdc(&stream["reserved"]) > cost(INPUT, 6));
    billed += s
        .assert_row(&key, id, (INPUT, 6), cost(INPUT, 6), "ok", "upstream")
        .await
        .atomic();

    // stream=True: Anthropic's event sequence, as the SDK parsed it.
    let raw = &out["raw_stream"];
    let events: Vec<&str> = raw["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|e| *e != "ping")
        .collect();
    assert_eq!(events.first(), Some(&"message_start"), "{raw}");
    assert_eq!(events[1], "content_block_start", "{raw}");
    assert_eq!(
        events[events.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"],
        "{raw}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == "content_block_delta")
            .count(),
        4,
        "{raw}"
    );
    assert_eq!(words(&raw["text"]), 4);
    assert_eq!(
        raw["usage"],
        json!({"input_tokens": INPUT, "output_tokens": 4}),
        "{raw}"
    );
    if upstream_path == "/v1/messages" {
        // Passed through: the input count arrives with `message_start`, as from Anthropic. (A translated stream
        // learns it only from the chat stream's final usage chunk, so it comes with `message_delta`.)
        assert_eq!(raw["message_start_input_tokens"], INPUT, "{raw}");
    }
    let id = raw["request_id"].as_str().unwrap();
    billed += s
        .assert_row(&key, id, (INPUT, 4), cost(INPUT, 4), "ok", "upstream")
        .await
        .atomic();

    // The SDK's error classes, from Anthropic-shaped error bodies.
    let e = &out["unknown_model"];
    assert_eq!(
        (&e["class"], &e["status"], &e["body_type"], &e["error_type"]),
        (
            &json!("NotFoundError"),
            &json!(404),
            &json!("error"),
            &json!("not_found_error")
        ),
        "{e}"
    );
    let e = &out["bad_request"];
    assert_eq!(
        (&e["class"], &e["status"], &e["error_type"]),
        (
            &json!("BadRequestError"),
            &json!(400),
            &json!("invalid_request_error")
        ),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("max_tokens"), "{e}");
    // A key the gateway does not know: 402, and the body is the catalog an agent reads to buy one.
    let e = &out["bad_key"];
    assert_eq!(
        (&e["class"], &e["status"]),
        (&json!("PaymentRequiredError"), &json!(402)),
        "{e}"
    );
    let listed: Vec<&str> = e["catalog_models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(listed, MODELS.iter().map(|m| m.0).collect::<Vec<_>>());

    // Five requests billed, the refused ones not at all; the balance says the same to the atomic unit.
    let usage = s.usage(&key).await;
    assert_eq!(usage["totals"]["allTime"]["requests"], 5, "{usage}");
    assert_eq!(usdc(&usage["totals"]["allTime"]["costUsdc"]), Usdc(billed));
    assert_eq!(s.balance(&key).await, Usdc(start.atomic() - billed));
    // And they reached the upstream in the API its config names.
    let after = (
        s.native.requests_on("/v1/messages"),
        s.chat.requests_on("/v1/chat/completions"),
    );
    match upstream_path {
        "/v1/messages" => assert_eq!(after, (before.0 + 5, before.1), "{model}"),
        _ => assert_eq!(after, (before.0, before.1 + 5), "{model}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_is_served_natively_and_translated_and_billed_to_the_atomic_unit() {
    let s = Stack::start().await;
    anthropic_sdk_run(&s, 0x21, "claude-native", "/v1/messages").await;
    let native_body = s.native.last_body.lock().unwrap().clone();
    if let Some(body) = native_body {
        // Passed through as Messages, with the gateway's bound and the upstream's model name.
        assert_eq!(body["model"], "demo");
        assert!(body["max_tokens"].is_u64(), "{body}");
        assert!(body.get("max_completion_tokens").is_none(), "{body}");
    }
    anthropic_sdk_run(&s, 0x22, "claude-translate", "/v1/chat/completions").await;
    let chat_body = s.chat.last_body.lock().unwrap().clone();
    if let Some(body) = chat_body {
        // Translated: a chat request whose system prompt is a system message.
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(body["model"], "demo");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_uses_responses_completions_and_embeddings_billed_exactly() {
    let s = Stack::start().await;
    let start = Usdc(1_000_000);
    let key = s.credit_key(0x31, start).await;
    let Some(out) = run_client(
        &python(),
        "tests/interop/openai_apis.py",
        &[&s.gw.base, &key, "gpt"],
    )
    .await
    else {
        return;
    };
    assert!(out.get("error").is_none(), "{out}");
    let mut billed = 0i64;
    let mut check = |name: &str, tokens: (u64, u64), usage: Value| {
        let seen = &out[name];
        assert_eq!(seen["usage"], usage, "{name}: {seen}");
        if let Some(c) = seen["cost"].as_str() {
            assert_eq!(
                c.parse::<Usdc>().unwrap(),
                cost(tokens.0, tokens.1),
                "{name}"
            );
        }
        billed += cost(tokens.0, tokens.1).atomic();
        (seen["request_id"].as_str().unwrap().to_string(), tokens)
    };
    // Responses: "be brief" + "say hello to the auditor" in, 5 out (the demo writes to the cap: `incomplete`).
    let rows = vec![
        check(
            "responses_json",
            (7, 5),
            json!({"input_tokens": 7, "output_tokens": 5}),
        ),
        check(
            "responses_stream",
            (4, 4),
            json!({"input_tokens": 4, "output_tokens": 4}),
        ),
        check(
            "completions_json",
            (4, 5),
            json!({"prompt_tokens": 4, "completion_tokens": 5}),
        ),
        check(
            "completions_stream",
            (4, 3),
            json!({"prompt_tokens": 4, "completion_tokens": 3}),
        ),
        // Three prompts (2 + 3 + 1 words) × n = 2 choices × 3 tokens.
        check(
            "completions_list",
            (6, 18),
            json!({"prompt_tokens": 6, "completion_tokens": 18}),
        ),
        check(
            "embeddings_default",
            (5, 0),
            json!({"prompt_tokens": 5, "total_tokens": 5}),
        ),
        check(
            "embeddings_float",
            (5, 0),
            json!({"prompt_tokens": 5, "total_tokens": 5}),
        ),
    ];
    let r = &out["responses_json"];
    assert_eq!(r["status"], "incomplete");
    assert_eq!(words(&r["output_text"]), 5);
    let r = &out["responses_stream"];
    let events: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(events.first(), Some(&"response.created"), "{r}");
    assert_eq!(events.last(), Some(&"response.incomplete"), "{r}");
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == "response.output_text.delta")
            .count(),
        4
    );
    assert_eq!(words(&r["text"]), 4);
    assert_eq!(words(&out["completions_json"]["text"]), 5);
    assert_eq!(words(&out["completions_stream"]["text"]), 3);
    assert_eq!(
        out["completions_list"]["choices"],
        json!([0, 1, 2, 3, 4, 5])
    );
    // The SDK asks for base64 by default and decodes it; both give unit vectors of the demo's 8 floats.
    assert_eq!(out["embeddings_default"]["sent_encoding_format"], "base64");
    assert_eq!(out["embeddings_float"]["sent_encoding_format"], "float");
    for name in ["embeddings_default", "embeddings_float"] {
        let e = &out[name];
        assert_eq!(e["dimensions"], json!([8, 8]), "{e}");
        assert_eq!(e["all_floats"], true, "{e}");
        assert_eq!(e["norms"], json!([1.0, 1.0]), "{e}");
    }
    let e = &out["previous_response_id"];
    assert_eq!(
        (&e["class"], &e["status"], &e["param"]),
        (
            &json!("BadRequestError"),
            &json!(400),
            &json!("previous_response_id")
        ),
        "{e}"
    );

    for (id, tokens) in &rows {
        s.assert_row(
            &key,
            id,
            *tokens,
            cost(tokens.0, tokens.1),
            "ok",
            "upstream",
        )
        .await;
    }
    let usage = s.usage(&key).await;
    assert_eq!(
        usage["totals"]["allTime"]["requests"],
        rows.len(),
        "{usage}"
    );
    assert_eq!(usdc(&usage["totals"]["allTime"]["costUsdc"]), Usdc(billed));
    assert_eq!(s.balance(&key).await, Usdc(start.atomic() - billed));
    for path in ["/v1/responses", "/v1/completions", "/v1/embeddings"] {
        assert!(s.chat.requests_on(path) >= 2, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_pays_past_its_bound_or_less_than_its_usage() {
    let s = Stack::start().await;

    // Three prompts × n = 2 is six completions: reserved six times. A balance one atomic unit short of that
    // reservation is refused before anything is forwarded; exactly that reservation is served.
    let six = json!({"model": "gpt", "prompt": ["a b", "c d e", "f"], "n": 2, "max_tokens": 3});
    let len = serde_json::to_vec(&six).unwrap().len();
    let needed = reservation(len, 6 * 3);
    let short = s.credit_key(0x41, Usdc(needed.atomic() - 1)).await;
    let upstream_before = s.upstream_requests();
    let a = s.send("/v1/completions", Auth::Bearer(&short), &six).await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED, "{}", a.text);
    assert!(
        a.json()["x402"]["models"].is_array(),
        "the catalog: {}",
        a.text
    );
    assert_eq!(s.upstream_requests(), upstream_before, "nothing forwarded");
    assert_eq!(s.balance(&short).await, Usdc(needed.atomic() - 1));
    let exact = s.credit_key(0x42, needed).await;
    let a = s.send("/v1/completions", Auth::Bearer(&exact), &six).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let body = a.json();
    assert_eq!(body["choices"].as_array().unwrap().len(), 6);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 18, "total_tokens": 24})
    );
    s.assert_row(
        &exact,
        &a.request_id(),
        (6, 18),
        cost(6, 18),
        "ok",
        "upstream",
    )
    .await;
    assert_eq!(
        s.balance(&exact).await,
        Usdc(needed.atomic() - cost(6, 18).atomic())
    );

    let key = s.credit_key(0x43, Usdc(10_000_000)).await;
    let mut billed = 0i64;

    // Completions with both length fields, either way round: the smaller one is the bound, written as the one
    // field the upstream reads, the other removed (so no upstream can read the larger one).
    for (max_tokens, max_completion_tokens) in [(30, 2), (2, 30)] {
        let req = json!({"model": "gpt", "prompt": "a b c", "stream": true,
            "max_tokens": max_tokens, "max_completion_tokens": max_completion_tokens});
        let a = s.send("/v1/completions", Auth::Bearer(&key), &req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(a.reserved(), reservation(a.sent, 2));
        let sent = s.chat.last_body.lock().unwrap().clone().unwrap();
        assert_eq!(sent["max_tokens"], 2, "{sent}");
        assert!(sent.get("max_completion_tokens").is_none(), "{sent}");
        assert!(
            !a.text.contains("prompt_tokens"),
            "usage the client did not ask for: {}",
            a.text
        );
        billed += s
            .assert_row(&key, &a.request_id(), (3, 2), cost(3, 2), "ok", "upstream")
            .await
            .atomic();
    }
    // No max_tokens: OpenAI's default of 16 is written, not left to the upstream; a huge one is the model's cap.
    for (max_tokens, bound) in [(None, 16), (Some(1_000_000_000u64), CAP)] {
        let mut req = json!({"model": "gpt", "prompt": "a b c"});
        if let Some(m) = max_tokens {
            req["max_tokens"] = json!(m);
        }
        let a = s.send("/v1/completions", Auth::Bearer(&key), &req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let sent = s.chat.last_body.lock().unwrap().clone().unwrap();
        assert_eq!(sent["max_tokens"], bound, "{sent}");
        assert_eq!(a.json()["usage"]["completion_tokens"], bound);
        billed += s
            .assert_row(
                &key,
                &a.request_id(),
                (3, bound),
                cost(3, bound),
                "ok",
                "upstream",
            )
            .await
            .atomic();
    }

    // Responses asking for a billion tokens, with chat's length fields smuggled in: capped to the model's
    // max_output_tokens, the other fields removed, reserved at the cap and billed at usage.
    let req = json!({"model": "gpt", "input": "one two three", "stream": true,
        "max_output_tokens": 1_000_000_000u64, "max_tokens": 1_000_000_000u64, "max_completion_tokens": 1_000_000_000u64});
    let a = s.send("/v1/responses", Auth::Bearer(&key), &req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.reserved(), reservation(a.sent, CAP));
    let sent = s.chat.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["max_output_tokens"], CAP, "{sent}");
    assert!(
        sent.get("max_tokens").is_none() && sent.get("max_completion_tokens").is_none(),
        "{sent}"
    );
    assert_eq!(a.count("response.output_text.delta"), CAP as usize);
    let last = a.data().pop().unwrap();
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(last["response"]["usage"]["output_tokens"], CAP);
    billed += s
        .assert_row(
            &key,
            &a.request_id(),
            (3, CAP),
            cost(3, CAP),
            "ok",
            "upstream",
        )
        .await
        .atomic();

    // Messages asking for a billion tokens, natively and translated: the upstream is asked for the cap.
    for (model, stats) in [("claude-native", &s.native), ("claude-translate", &s.chat)] {
        let req = anthropic_request(model, 1_000_000_000, false);
        let a = s.send("/v1/messages", Auth::XApiKey(&key), &req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let body = a.json();
        assert_eq!(
            body["usage"],
            json!({"input_tokens": 5, "output_tokens": CAP}),
            "{body}"
        );
        assert_eq!(body["stop_reason"], "max_tokens");
        let sent = stats.last_body.lock().unwrap().clone().unwrap();
        assert_eq!(sent["max_tokens"], CAP, "{model}: {sent}");
        billed += s
            .assert_row(
                &key,
                &a.request_id(),
                (5, CAP),
                cost(5, CAP),
                "ok",
                "upstream",
            )
            .await
            .atomic();
    }

    // Embeddings: input only, billed from the upstream's usage.
    let req = json!({"model": "gpt", "input": ["one two", "three"]});
    let a = s.send("/v1/embeddings", Auth::Bearer(&key), &req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json()["usage"]["prompt_tokens"], 3);
    billed += s
        .assert_row(&key, &a.request_id(), (3, 0), cost(3, 0), "ok", "upstream")
        .await
        .atomic();

    // An upstream that ignores the cap in a JSON answer (2000 tokens for a bound of 5): the answer cannot be
    // cut, but the charge stops at the reservation, well under the usage's cost.
    for (path, model, req) in [
        (
            "/v1/responses",
            "overrun",
            json!({"model": "overrun", "input": "one two three", "max_output_tokens": 5}),
        ),
        (
            "/v1/messages",
            "overrun-native",
            anthropic_request("overrun-native", 5, false),
        ),
        (
            "/v1/messages",
            "overrun",
            anthropic_request("overrun", 5, false),
        ),
    ] {
        let a = s.send(path, Auth::Bearer(&key), &req).await;
        assert_eq!(a.status, StatusCode::OK, "{model}: {}", a.text);
        let row = s.row(&key, &a.request_id()).await;
        assert_eq!(row["completionTokens"], 2000, "{model}: {row}");
        assert_eq!(
            usdc(&row["costUsdc"]),
            reservation(a.sent, 5),
            "{model}: {row}"
        );
        assert!(reservation(a.sent, 5) < cost(row["promptTokens"].as_u64().unwrap(), 2000));
        billed += reservation(a.sent, 5).atomic();
    }

    let usage = s.usage(&key).await;
    assert_eq!(usdc(&usage["totals"]["allTime"]["costUsdc"]), Usdc(billed));
    assert_eq!(s.balance(&key).await, Usdc(10_000_000 - billed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_bounded_is_refused_before_anything_is_charged() {
    let s = Stack::start().await;
    let start = Usdc(1_000_000);
    let key = s.credit_key(0x51, start).await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    let openai_refusals = [
        (
            "/v1/responses",
            json!({"model": "gpt", "input": "go on", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt", "input": "go on", "conversation": "conv_1"}),
            "conversation",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt", "input": "go on", "prompt": {"id": "pmpt_1"}}),
            "prompt",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt", "input": "go on", "background": true}),
            "background",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt", "input": "go on", "tools": [{"type": "web_search"}]}),
            "tools",
        ),
        (
            "/v1/responses",
            json!({"model": "gpt", "input": [{"type": "item_reference", "id": "msg_1"}]}),
            "input",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-one", "prompt": ["a", "b", "c"]}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-one", "prompt": "a", "n": 2}),
            "n",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt", "prompt": ["a", "b", "c", "d"], "n": 2}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt", "prompt": "a", "best_of": 3}),
            "best_of",
        ),
        (
            "/v1/embeddings",
            json!({"model": "gpt", "input": "a", "stream": true}),
            "stream",
        ),
    ];
    for (path, body, param) in openai_refusals {
        let a = s.send(path, Auth::Bearer(&key), &body).await;
        a.assert_openai_error(StatusCode::BAD_REQUEST, param);
    }
    let anthropic_refusals = [
        json!({"model": "claude-native", "messages": hi}),
        json!({"model": "claude-translate", "messages": hi}),
        json!({"model": "claude-native", "messages": hi, "max_tokens": 0}),
        json!({"model": "claude-native", "messages": hi, "max_tokens": 5,
            "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]}),
        json!({"model": "claude-native", "messages": hi, "max_tokens": 5,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        json!({"model": "claude-native", "messages": hi, "max_tokens": 5, "container": "c_1"}),
        // An image has no configured bound; a parameter chat completions cannot carry cannot be translated.
        json!({"model": "claude-translate", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x.example/a.png"}}]}]}),
        json!({"model": "claude-translate", "messages": hi, "max_tokens": 5, "top_logprobs": 3}),
    ];
    for body in anthropic_refusals {
        let a = s.send("/v1/messages", Auth::XApiKey(&key), &body).await;
        a.assert_anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error");
        if body.get("max_tokens").is_none() {
            assert!(a.text.contains("max_tokens"), "{}", a.text);
        }
    }
    // Nothing reached an upstream, nothing was reserved or recorded.
    assert_eq!(s.upstream_requests(), 0);
    let usage = s.usage(&key).await;
    assert_eq!(usage["totals"]["allTime"]["requests"], 0, "{usage}");
    assert_eq!(s.balance(&key).await, start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_their_bound_are_cut_there_and_cut_streams_are_billed_as_delivered() {
    let s = Stack::start().await;
    let start = Usdc(10_000_000);
    let key = s.credit_key(0x61, start).await;
    let mut billed = 0i64;

    // An upstream ignoring every cap (2000 tokens for a bound of 5), on each streaming API that has its own
    // event format: the client gets the bound's 5 tokens and an error event, never the stream's proper end; the
    // upstream connection is dropped (it sees its client go away); the charge is the reservation, no more.
    let overruns = [
        (
            "/v1/responses",
            json!({"model": "overrun", "input": "one two three", "max_output_tokens": 5, "stream": true}),
            &s.chat,
            "response.output_text.delta",
            "response.incomplete",
        ),
        (
            "/v1/messages",
            anthropic_request("overrun-native", 5, true),
            &s.native,
            "content_block_delta",
            "message_stop",
        ),
        (
            "/v1/messages",
            anthropic_request("overrun", 5, true),
            &s.chat,
            "content_block_delta",
            "message_stop",
        ),
    ];
    for (path, req, stats, delta, end) in overruns {
        let cancelled = stats.cancelled.load(Ordering::SeqCst);
        let a = s.send(path, Auth::Bearer(&key), &req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(a.count(delta), 5, "{path} {}: {}", req["model"], a.text);
        assert!(a.event_names().contains(&"error"), "{}", a.text);
        assert_eq!(
            a.count(end),
            0,
            "a cut stream must not look finished: {}",
            a.text
        );
        assert_eq!(a.reserved(), reservation(a.sent, 5));
        let row = s.row(&key, &a.request_id()).await;
        assert_eq!(row["status"], "overrun_cut", "{row}");
        assert_eq!(usdc(&row["costUsdc"]), reservation(a.sent, 5), "{row}");
        billed += reservation(a.sent, 5).atomic();
        wait_for(
            "the overrunning upstream to see the gateway hang up",
            || async { (stats.cancelled.load(Ordering::SeqCst) > cancelled).then_some(()) },
        )
        .await;
    }

    // An upstream that dies after 3 tokens (no usage, no end event), on every streaming API: billed as delivered
    // — the prompt at its bound (what was reserved for it) and the 3 tokens read — which is less than the
    // reservation of 10 output tokens.
    let cuts = [
        (
            "/v1/chat/completions",
            json!({"model": "cut", "messages": [{"role": "user", "content": "one two three"}],
                "max_tokens": 10, "stream": true}),
        ),
        (
            "/v1/completions",
            json!({"model": "cut", "prompt": "one two three", "max_tokens": 10, "stream": true}),
        ),
        (
            "/v1/responses",
            json!({"model": "cut", "input": "one two three", "max_output_tokens": 10, "stream": true}),
        ),
        ("/v1/messages", anthropic_request("cut-native", 10, true)),
        ("/v1/messages", anthropic_request("cut", 10, true)),
    ];
    for (path, req) in cuts {
        let a = s.send(path, Auth::Bearer(&key), &req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let what = format!("{path} {}", req["model"]);
        let delivered = match path {
            "/v1/chat/completions" => a
                .data()
                .iter()
                .filter(|d| {
                    d["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
                })
                .count(),
            "/v1/completions" => a
                .data()
                .iter()
                .filter(|d| {
                    d["choices"][0]["text"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
                })
                .count(),
            "/v1/responses" => a.count("response.output_text.delta"),
            _ => a.count("content_block_delta"),
        };
        assert_eq!(delivered, 3, "{what}: {}", a.text);
        // The client is told the stream failed, and never sees a proper end.
        assert!(
            a.data()
                .iter()
                .any(|d| d.get("error").is_some() || d["type"] == "error"),
            "{what}: {}",
            a.text
        );
        for end in [
            "[DONE]",
            "message_stop",
            "response.completed",
            "response.incomplete",
        ] {
            assert!(!a.text.contains(end), "{what} ended with {end}: {}", a.text);
        }
        let charged = cost(prompt_bound(a.sent), 3);
        assert!(charged < reservation(a.sent, 10));
        billed += s
            .assert_row(
                &key,
                &a.request_id(),
                (prompt_bound(a.sent), 3),
                charged,
                "upstream_cut",
                "estimated",
            )
            .await
            .atomic();
    }
    assert_eq!(s.balance(&key).await, Usdc(start.atomic() - billed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_and_malformed_messages_get_the_catalog_and_anthropic_errors() {
    let s = Stack::start().await;
    let req = anthropic_request("claude-native", 5, false);

    // No key, or a key the gateway does not know (in either header): 402 with the catalog an agent reads.
    for auth in [
        Auth::None,
        Auth::XApiKey("sk-not-a-real-key"),
        Auth::Bearer("sk-not-a-real-key"),
    ] {
        let a = s.send("/v1/messages", auth, &req).await;
        assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED, "{}", a.text);
        assert_eq!(a.headers["content-type"], "application/json");
        let x402 = &a.json()["x402"];
        let models: Vec<&str> = x402["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(models, MODELS.iter().map(|m| m.0).collect::<Vec<_>>());
        assert_eq!(x402["models"][0]["inputUsdcPerMtok"], "3.00");
        let endpoints: Vec<String> = x402["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let url = e["endpoint"].as_str().unwrap();
                assert_eq!(e["method"], "POST");
                url[url.find("/v1/").unwrap()..].to_string()
            })
            .collect();
        assert_eq!(endpoints, PATHS);
        assert!(x402["products"].is_array());
    }
    assert_eq!(s.upstream_requests(), 0);

    let key = s.credit_key(0x71, Usdc(1_000_000)).await;
    // Malformed requests, each in Anthropic's error shape with the type its status has.
    let a = s
        .send_bytes(
            "/v1/messages",
            Auth::XApiKey(&key),
            "application/json",
            b"{\"model\": \"claude-native\",".to_vec(),
        )
        .await;
    a.assert_anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error");
    let a = s
        .send_bytes(
            "/v1/messages",
            Auth::XApiKey(&key),
            "text/plain",
            serde_json::to_vec(&req).unwrap(),
        )
        .await;
    a.assert_anthropic_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error");
    let a = s
        .send(
            "/v1/messages",
            Auth::XApiKey(&key),
            &json!(["not", "an", "object"]),
        )
        .await;
    a.assert_anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error");
    let a = s
        .send(
            "/v1/messages",
            Auth::XApiKey(&key),
            &anthropic_request("no-such-model", 5, false),
        )
        .await;
    a.assert_anthropic_error(StatusCode::NOT_FOUND, "not_found_error");
    let a = s
        .send(
            "/v1/messages",
            Auth::XApiKey(&key),
            &json!({"max_tokens": 5, "messages": []}),
        )
        .await;
    a.assert_anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error");
    // Another method on the route: 405, still Anthropic's shape.
    let resp =
        s.gw.http
            .get(format!("{}/v1/messages", s.gw.base))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
    let a = Answer {
        status: resp.status(),
        headers: resp.headers().clone(),
        text: resp.text().await.unwrap(),
        sent: 0,
    };
    a.assert_anthropic_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error");
    assert_eq!(a.headers["allow"], "POST");
    assert_eq!(s.upstream_requests(), 0);
    assert_eq!(s.usage(&key).await["totals"]["allTime"]["requests"], 0);

    // Anthropic's header works on the OpenAI routes too, and is billed like a bearer key.
    let a = s
        .send(
            "/v1/chat/completions",
            Auth::XApiKey(&key),
            &json!({"model": "gpt", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let charged: Usdc = a.headers["x-gateway-cost-usdc"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(charged, cost(3, 4));
    s.assert_row(&key, &a.request_id(), (3, 4), cost(3, 4), "ok", "upstream")
        .await;
    assert_eq!(s.balance(&key).await, Usdc(1_000_000 - cost(3, 4).atomic()));
}
