//! A scripted OpenAI-compatible upstream for `dev`, tests and benchmarks (there is no GPU model here).
//!
//! It speaks the real wire format — `POST /v1/chat/completions` (JSON, or SSE with `data: [DONE]` and the
//! `stream_options.include_usage` chunk) and `GET /v1/models` — and reports exact usage: `prompt_tokens` is the
//! number of whitespace-separated words in the messages' text, their tool calls and the `tools` definitions (real
//! servers render those into the prompt), plus [`IMAGE_TOKENS`] per image part; `completion_tokens` the number of
//! tokens it produced over all choices.
//!
//! It behaves like vLLM and SGLang, sharp edges included: `max_completion_tokens` is honoured before `max_tokens`,
//! `n` choices are generated (each up to the limit), and `best_of` candidates are generated and counted. The
//! upstream model name selects a behaviour, so a gateway config can map a model to a fault:
//!
//! | model | behaviour |
//! |---|---|
//! | anything else | answers `max_completion_tokens` (else `max_tokens`, default 16, at most `max_tokens_limit`) tokens per choice, one SSE chunk each, `token_delay` apart |
//! | `fail-500` | HTTP 500 with an OpenAI error body |
//! | `hang` | accepts the request and never answers |
//! | `cut-N` | streams N tokens, then closes the connection with no usage chunk and no `[DONE]` |
//! | `overrun-N` | ignores every output cap and generates N tokens per choice (an upstream that ignores caps) |
//!
//! With `count_in_flight` it counts the requests it is answering at once per caller label (the request's `user`
//! field, else its model), so tests can check from the upstream's side that a pool key never has two in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Words the demo model "generates", in turn.
const WORDS: &[&str] = &[
    "Paid",
    "inference",
    "served",
    "by",
    "x402-gateway",
    "on",
    "a",
    "local",
    "chain.",
];

/// Prompt tokens an image content part costs (a vision model's tiles), whatever bytes carry it.
pub const IMAGE_TOKENS: u64 = 1_200;

/// How the demo upstream behaves.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Pause before each streamed token.
    pub token_delay: Duration,
    /// Tokens produced when the request sets no `max_tokens`.
    pub default_tokens: u64,
    /// When set, requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Models listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// Most tokens one answer has, whatever `max_tokens` asks (a model's output limit): a client's huge
    /// `max_tokens` makes a long answer, never an unbounded allocation.
    pub max_tokens_limit: u64,
    /// Keep [`DemoStats::in_flight`] and [`DemoStats::max_in_flight`] (off by default: a map entry per label).
    pub count_in_flight: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            token_delay: Duration::from_millis(20),
            default_tokens: 16,
            api_key: None,
            models: vec!["demo".into()],
            max_tokens_limit: 100_000,
            count_in_flight: false,
        }
    }
}

/// What the upstream has seen, for tests.
#[derive(Debug, Default)]
pub struct DemoStats {
    pub requests: AtomicU64,
    /// Streams that ended because the client went away before the last token.
    pub cancelled: AtomicU64,
    pub completed: AtomicU64,
    /// Output tokens generated over all requests and choices (streamed ones as each is produced, so a stream the
    /// client or gateway cut counts only what was generated before the cut).
    pub generated_tokens: AtomicU64,
    /// Prompt tokens of all requests answered (as reported in their usage).
    pub prompt_tokens: AtomicU64,
    /// The last request body received, as JSON text.
    pub last_body: Mutex<Option<Value>>,
    /// Requests being answered now, per caller label (`user` field, else model), with `count_in_flight`.
    pub in_flight: Mutex<HashMap<String, u64>>,
    /// The most requests answered at once, per caller label, with `count_in_flight`.
    pub max_in_flight: Mutex<HashMap<String, u64>>,
}

impl DemoStats {
    /// The most requests `label` had in flight at once (0 if it sent none).
    pub fn max_in_flight_of(&self, label: &str) -> u64 {
        lock(&self.max_in_flight).get(label).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One request being answered; counted in `in_flight` until dropped (answered, or the client went away).
struct Busy {
    stats: Arc<DemoStats>,
    label: String,
}

impl Busy {
    fn start(stats: Arc<DemoStats>, label: String) -> Busy {
        let now = {
            let mut in_flight = lock(&stats.in_flight);
            let n = in_flight.entry(label.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let mut max = lock(&stats.max_in_flight);
        let m = max.entry(label.clone()).or_insert(0);
        *m = (*m).max(now);
        drop(max);
        Busy { stats, label }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.stats.in_flight);
        if let Some(n) = in_flight.get_mut(&self.label) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&self.label);
            }
        }
    }
}

#[derive(Clone)]
struct DemoState {
    config: Arc<DemoConfig>,
    stats: Arc<DemoStats>,
}

/// The demo upstream's router; `stats` is shared with the caller.
pub fn router(config: DemoConfig, stats: Arc<DemoStats>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .with_state(DemoState {
            config: Arc::new(config),
            stats,
        })
}

/// Serves the demo upstream on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: DemoConfig,
    stats: Arc<DemoStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(config, stats))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

async fn models(State(state): State<DemoState>) -> Json<Value> {
    let data: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "demo"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Whitespace-separated words of every message's text content and tool calls, of the `tools` definitions, and
/// [`IMAGE_TOKENS`] per image part.
fn count_prompt_tokens(body: &Value) -> u64 {
    let words = |s: &str| s.split_whitespace().count() as u64;
    let mut n = 0;
    for m in body["messages"].as_array().into_iter().flatten() {
        match &m["content"] {
            Value::String(s) => n += words(s),
            Value::Array(parts) => {
                for p in parts {
                    if p["type"] == "image_url" {
                        n += IMAGE_TOKENS;
                    }
                    n += p["text"].as_str().map_or(0, words);
                }
            }
            _ => {}
        }
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            n += words(&calls.to_string().replace([',', ':', '{', '}', '"'], " "));
        }
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        n += words(&tools.to_string().replace([',', ':', '{', '}', '"'], " "));
    }
    n
}

struct CountOnDrop {
    stats: Arc<DemoStats>,
    finished: bool,
}

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.stats.completed
        } else {
            &self.stats.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

async fn chat(State(state): State<DemoState>, headers: HeaderMap, body: Bytes) -> Response {
    state.stats.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(key) = &state.config.api_key {
        let expected = format!("Bearer {key}");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid upstream API key",
                "invalid_request_error",
            );
        }
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body is not JSON",
            "invalid_request_error",
        );
    };
    *lock(&state.stats.last_body) = Some(body.clone());
    let model = body["model"].as_str().unwrap_or("demo").to_string();
    let busy = state.config.count_in_flight.then(|| {
        let label = body["user"].as_str().unwrap_or(&model).to_string();
        Busy::start(state.stats.clone(), label)
    });
    let prompt_tokens = count_prompt_tokens(&body);
    // vLLM and SGLang read `max_completion_tokens` first; `max_tokens` only when it is absent.
    let max_tokens = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64());
    let mut tokens = max_tokens
        .unwrap_or(state.config.default_tokens)
        .min(state.config.max_tokens_limit);
    let choices = body["n"].as_u64().unwrap_or(1).clamp(1, 16);
    // `best_of` candidates are all generated (and billed by usage), `n` of them returned.
    let candidates = body["best_of"]
        .as_u64()
        .unwrap_or(choices)
        .clamp(choices, 16);
    let finish = if max_tokens.is_some() {
        "length"
    } else {
        "stop"
    };
    let mut cut = false;
    match model.as_str() {
        "fail-500" => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the demo upstream was told to fail",
                "server_error",
            );
        }
        "hang" => {
            std::future::pending::<()>().await;
        }
        m if m.starts_with("cut-") => {
            tokens = tokens.min(m[4..].parse().unwrap_or(0));
            cut = true;
        }
        m if m.starts_with("overrun-") => {
            tokens = m[8..].parse().unwrap_or(0);
        }
        _ => {}
    }
    let id = format!(
        "chatcmpl-demo-{}",
        state.stats.requests.load(Ordering::SeqCst)
    );
    let completion_tokens = tokens * candidates;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let text = |i: u64| WORDS[(i as usize) % WORDS.len()];

    if body["stream"].as_bool() != Some(true) {
        if !state.config.token_delay.is_zero() {
            tokio::time::sleep(state.config.token_delay * tokens.min(50) as u32).await;
        }
        let content: Vec<&str> = (0..tokens).map(text).collect();
        let content = content.join(" ");
        state.stats.completed.fetch_add(1, Ordering::SeqCst);
        state
            .stats
            .generated_tokens
            .fetch_add(completion_tokens, Ordering::SeqCst);
        state
            .stats
            .prompt_tokens
            .fetch_add(prompt_tokens, Ordering::SeqCst);
        drop(busy);
        let choices: Vec<Value> = (0..choices)
            .map(|i| json!({"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": finish}))
            .collect();
        return Json(json!({
            "id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": choices,
            "usage": usage,
        }))
        .into_response();
    }

    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunk = |index: u64, delta: Value, finish_reason: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events: Vec<String> = Vec::with_capacity((tokens * choices) as usize + 4);
    for c in 0..choices {
        events.push(chunk(
            c,
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        ));
    }
    for i in 0..tokens {
        let sep = if i == 0 { "" } else { " " };
        for c in 0..choices {
            events.push(chunk(
                c,
                json!({"content": format!("{sep}{}", text(i))}),
                Value::Null,
            ));
        }
    }
    if !cut {
        for c in 0..choices {
            events.push(chunk(c, json!({}), json!(finish)));
        }
        if include_usage {
            let u = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage});
            events.push(format!("data: {u}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_string());
    }

    // A producer task feeds the body; a failed send means the client went away (the stream was dropped).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let delay = state.config.token_delay;
    let stats = state.stats.clone();
    stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    // Tokens of candidates that are generated but not streamed (`best_of` beyond `n`) count at once.
    stats
        .generated_tokens
        .fetch_add(tokens * (candidates - choices), Ordering::SeqCst);
    tokio::spawn(async move {
        let _busy = busy;
        let mut guard = CountOnDrop {
            stats: stats.clone(),
            finished: false,
        };
        for event in events {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // A token counts as generated once the model has produced it (it is about to be sent).
            if event.contains("\"content\":\"") && !event.contains("\"content\":\"\"") {
                stats.generated_tokens.fetch_add(1, Ordering::SeqCst);
            }
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                return;
            }
        }
        if cut {
            // Let the last token leave before the connection dies, as it would from a real upstream.
            tokio::time::sleep(delay.max(std::time::Duration::from_millis(5))).await;
            // An error ends the body abruptly: the connection closes mid-stream, like an upstream that died.
            let _ = tx
                .send(Err(std::io::Error::other("demo upstream cut the stream")))
                .await;
            guard.finished = true;
            return;
        }
        guard.finished = true;
    });
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "response build failed",
                "server_error",
            )
        })
}
