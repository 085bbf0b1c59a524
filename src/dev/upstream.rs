//! A scripted inference server for `dev`, tests and benchmarks (there is no GPU model here).
//!
//! It speaks the real wire formats of the endpoints vLLM and SGLang serve — OpenAI's chat completions, legacy
//! completions, embeddings and Responses, and Anthropic's Messages — and reports exact usage, so a test can assert
//! the numbers a gateway meters:
//!
//! | endpoint | prompt tokens | output |
//! |---|---|---|
//! | `POST /v1/chat/completions` | words of the messages' text, their tool calls and the `tools` definitions, plus [`IMAGE_TOKENS`] per image part | `max_completion_tokens`, else `max_tokens`, else `default_tokens` per choice (`n`; `best_of` candidates generated and counted); JSON, or SSE chunks with `data: [DONE]` and the `stream_options.include_usage` chunk |
//! | `POST /v1/completions` | words of each prompt string, or the length of each token-id array | `max_tokens` (default `default_tokens`, 16 like OpenAI and vLLM) per choice; one choice per prompt × `n` (index = prompt × n + i, as vLLM numbers them); JSON or SSE like chat; `echo` is ignored (the prompt is never repeated in the text) |
//! | `POST /v1/embeddings` | words of each input string, or the length of each token-id array | one deterministic unit vector of `dimensions` (default 8) floats per input; `encoding_format: "base64"` (what the openai Python SDK asks for by default) gives base64 of little-endian f32 |
//! | `POST /v1/responses` | words of `instructions`, of the `input` string or its items' text parts, and of the `tools`, plus [`IMAGE_TOKENS`] per `input_image` | `max_output_tokens` (default `default_tokens`); status `incomplete` (`max_output_tokens`) when the cap was set, as it always is reached; SSE with the Responses event sequence, `response.completed` (or `response.incomplete`) carrying the usage |
//! | `POST /v1/messages` | the chat count of the request as the gateway would translate it (system, messages, tool calls, tool results, tools) | `max_tokens` (required: 400 in Anthropic's error shape without it), stop reason `max_tokens`, or `end_turn` when the model's output limit ended it first; SSE with Anthropic's event sequence |
//! | `GET /v1/models` | — | the configured models (the gateway's health probe) |
//! | `GET`/`POST /demo/fault` | — | reads or sets the fault mode (`{"mode": "healthy"}`) |
//!
//! Every answer is at most `max_tokens_limit` tokens per choice (a model's output limit), streamed tokens
//! `token_delay` apart. It behaves like vLLM and SGLang, sharp edges included: `max_completion_tokens` is honoured
//! before `max_tokens`, `n` choices and `best_of` candidates are all generated and counted.
//!
//! Two switches make it misbehave. The **upstream model name** selects a fault per request, so a gateway config can
//! map a model to one (on every endpoint; errors in the endpoint's own shape):
//!
//! | model | behaviour |
//! |---|---|
//! | anything else | answers as above |
//! | `fail-500` | HTTP 500 with an error body |
//! | `hang` | accepts the request and never answers |
//! | `cut-N` | streams N tokens, then closes the connection with no usage and no end event (embeddings: answers) |
//! | `overrun-N` | ignores every output cap and generates N tokens per choice (embeddings: answers) |
//!
//! And the **fault mode** ([`Fault`]) plays a whole failing server, switchable at runtime from Rust
//! ([`DemoStats::set_fault`]) or over HTTP (`POST /demo/fault`): `healthy`, `fail-500` (every request answers 500,
//! `GET /v1/models` included), `refuse-429` (429 with `Retry-After: 1`) or `hang` (requests are accepted and never
//! answered). [`DemoServer`] binds a given address and stops for real — new connections refused and open ones
//! (streams in progress included) dropped — so a test can kill a deployment and restart it on the same port.
//!
//! With `count_in_flight` it counts the requests it is answering at once per caller label (the request's `user`
//! field, else its model), so tests can check from the upstream's side that a pool key never has two in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures::stream;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::anthropic;

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

/// Embedding size when the request sets no `dimensions`.
pub const DEFAULT_DIMENSIONS: u64 = 8;

/// Largest `dimensions` an embedding request may ask (a client's number is never an unbounded allocation).
const MAX_DIMENSIONS: u64 = 4_096;

/// How the demo upstream behaves.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Pause before each streamed token.
    pub token_delay: Duration,
    /// Tokens produced when the request sets no output cap.
    pub default_tokens: u64,
    /// When set, requests must carry `Authorization: Bearer <key>` (or `x-api-key: <key>` on `/v1/messages`).
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

/// A whole-server fault mode (see the module doc), independent of the model asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    Healthy,
    /// Every request answers 500.
    Fail500,
    /// Every request answers 429 with `Retry-After: 1`.
    Refuse429,
    /// Every request is accepted and never answered.
    Hang,
}

impl Fault {
    pub const ALL: [Fault; 4] = [
        Fault::Healthy,
        Fault::Fail500,
        Fault::Refuse429,
        Fault::Hang,
    ];

    /// The mode's name over HTTP (`healthy`, `fail-500`, `refuse-429`, `hang`).
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Healthy => "healthy",
            Fault::Fail500 => "fail-500",
            Fault::Refuse429 => "refuse-429",
            Fault::Hang => "hang",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// What the upstream has seen, for tests, and its fault mode.
#[derive(Debug, Default)]
pub struct DemoStats {
    /// Inference requests received (every endpoint but `GET /v1/models` and `/demo/fault`).
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
    /// Requests received per path (`/v1/models` included: a gateway's health probes show here).
    pub requests_by_path: Mutex<HashMap<String, u64>>,
    /// The [`Fault`] mode, as its index in [`Fault::ALL`] (an atomic: every request reads it).
    fault: AtomicU8,
}

impl DemoStats {
    /// The most requests `label` had in flight at once (0 if it sent none).
    pub fn max_in_flight_of(&self, label: &str) -> u64 {
        lock(&self.max_in_flight).get(label).copied().unwrap_or(0)
    }

    /// Requests received on `path` (e.g. `/v1/messages`).
    pub fn requests_on(&self, path: &str) -> u64 {
        lock(&self.requests_by_path).get(path).copied().unwrap_or(0)
    }

    /// Switches the whole server's fault mode; requests already being answered are not affected.
    pub fn set_fault(&self, fault: Fault) {
        let index = Fault::ALL.iter().position(|f| *f == fault).unwrap_or(0);
        self.fault.store(index as u8, Ordering::SeqCst);
    }

    pub fn fault(&self) -> Fault {
        Fault::ALL
            .get(usize::from(self.fault.load(Ordering::SeqCst)))
            .copied()
            .unwrap_or_default()
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
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/demo/fault", get(get_fault).post(set_fault))
        .with_state(DemoState {
            config: Arc::new(config),
            stats,
        })
}

/// Serves the demo upstream on `listener` until `shutdown`. Then it stops like a killed process: the listener is
/// closed (new connections are refused) and every open connection is dropped, streams in progress included —
/// unlike a graceful shutdown, which would wait for them (forever, for `hang`).
pub async fn run(
    listener: TcpListener,
    config: DemoConfig,
    stats: Arc<DemoStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(config, stats);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let socket = match accepted {
            Ok((socket, _)) => socket,
            // Out of file descriptors and the like: the listener itself is fine, so wait a little and go on.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Tokens leave as they are produced, as from uvicorn (vLLM, SGLang), which disables Nagle too.
        let _ = socket.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(socket), service);
            // Dropping the connection future closes the socket mid-response: that is the point.
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// A demo upstream serving on its own address until stopped (or dropped), for tests that kill a deployment and
/// start it again on the same port.
#[derive(Debug)]
pub struct DemoServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl DemoServer {
    /// Binds `addr` (port 0 picks a free port; a port a stopped `DemoServer` used can be bound again at once)
    /// and serves on it.
    pub async fn start(
        addr: SocketAddr,
        config: DemoConfig,
        stats: Arc<DemoStats>,
    ) -> std::io::Result<DemoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listener, config, stats, shutdown.clone()));
        Ok(DemoServer {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI-style base URL, `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops serving and returns once the port is closed and every connection dropped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Which API's error shape an endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

/// An error in `api`'s shape; `kind` is the OpenAI error type (Anthropic's comes from the status).
fn fail(api: Api, status: StatusCode, message: &str, kind: &str) -> Response {
    match api {
        Api::OpenAi => error(status, message, kind),
        Api::Anthropic => (
            status,
            Json(anthropic::error_body(
                anthropic::error_type(status.as_u16()),
                message,
            )),
        )
            .into_response(),
    }
}

/// The fault mode's answer, if it is not `healthy` (`hang` never returns).
async fn fault_answer(stats: &DemoStats, api: Api) -> Option<Response> {
    match stats.fault() {
        Fault::Healthy => None,
        Fault::Fail500 => Some(fail(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the demo upstream is in fault mode fail-500",
            "server_error",
        )),
        Fault::Refuse429 => {
            let mut r = fail(
                api,
                StatusCode::TOO_MANY_REQUESTS,
                "the demo upstream is in fault mode refuse-429",
                "rate_limit_exceeded",
            );
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            Some(r)
        }
        Fault::Hang => std::future::pending().await,
    }
}

fn count_path(stats: &DemoStats, path: &str) {
    *lock(&stats.requests_by_path)
        .entry(path.to_string())
        .or_insert(0) += 1;
}

async fn models(State(state): State<DemoState>) -> Response {
    count_path(&state.stats, "/v1/models");
    if let Some(r) = fault_answer(&state.stats, Api::OpenAi).await {
        return r;
    }
    let data: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "demo"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_fault(State(state): State<DemoState>) -> Json<Value> {
    Json(json!({"mode": state.stats.fault().as_str()}))
}

async fn set_fault(State(state): State<DemoState>, body: Bytes) -> Response {
    let mode = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b["mode"].as_str().and_then(Fault::parse));
    let Some(mode) = mode else {
        let names: Vec<&str> = Fault::ALL.iter().map(|f| f.as_str()).collect();
        return error(
            StatusCode::BAD_REQUEST,
            &format!("body must be {{\"mode\": one of {names:?}}}"),
            "invalid_request_error",
        );
    };
    state.stats.set_fault(mode);
    Json(json!({"mode": mode.as_str()})).into_response()
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Words of a JSON value's text once its punctuation is blanked (tool calls and definitions rendered into a prompt).
fn json_words(v: &Value) -> u64 {
    words(&v.to_string().replace([',', ':', '{', '}', '"'], " "))
}

/// Whitespace-separated words of every message's text content and tool calls, of the `tools` definitions, and
/// [`IMAGE_TOKENS`] per image part.
fn count_prompt_tokens(body: &Value) -> u64 {
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
            n += json_words(calls);
        }
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        n += json_words(tools);
    }
    n
}

/// A `prompt` or `input` of the completions and embeddings APIs, as its prompts' token counts: a string, an array
/// of strings, an array of token ids, or an array of token-id arrays. `None` when it is none of those (or empty).
fn prompt_lengths(v: &Value) -> Option<Vec<(u64, String)>> {
    // A token id is a whole number (`55.0` too, as JSON Schema and OpenAI's own parser take it).
    let is_id = |x: &Value| x.is_u64() || x.as_f64().is_some_and(|f| f >= 0.0 && f.fract() == 0.0);
    let is_ids = |a: &[Value]| !a.is_empty() && a.iter().all(is_id);
    match v {
        Value::String(s) => Some(vec![(words(s), s.clone())]),
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) if a.iter().all(Value::is_string) => Some(
            a.iter()
                .map(|s| {
                    let s = s.as_str().unwrap_or_default();
                    (words(s), s.to_string())
                })
                .collect(),
        ),
        Value::Array(a) if is_ids(a) => Some(vec![(a.len() as u64, v.to_string())]),
        Value::Array(a) if a.iter().all(|x| x.as_array().is_some_and(|x| is_ids(x))) => Some(
            a.iter()
                .map(|x| (x.as_array().map_or(0, Vec::len) as u64, x.to_string()))
                .collect(),
        ),
        _ => None,
    }
}

/// Prompt tokens of a Responses request: `instructions`, the `input` string or its items' text (message parts,
/// function call arguments and outputs), [`IMAGE_TOKENS`] per `input_image`, and the `tools` definitions.
fn count_responses_prompt(body: &Value) -> u64 {
    let mut n = body["instructions"].as_str().map_or(0, words);
    match &body["input"] {
        Value::String(s) => n += words(s),
        Value::Array(items) => {
            for item in items {
                match &item["content"] {
                    Value::String(s) => n += words(s),
                    Value::Array(parts) => {
                        for p in parts {
                            if p["type"] == "input_image" {
                                n += IMAGE_TOKENS;
                            }
                            n += p["text"].as_str().map_or(0, words);
                        }
                    }
                    _ => {}
                }
                n += item["arguments"].as_str().map_or(0, words);
                n += item["output"].as_str().map_or(0, words);
            }
        }
        _ => {}
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        n += json_words(tools);
    }
    n
}

/// Prompt tokens of a Messages request: the chat count of the request the gateway's translation makes of it
/// (vLLM and SGLang render a Messages request through the same chat template), else — for what the translation
/// refuses — the words of every `text` in it plus [`IMAGE_TOKENS`] per image.
fn count_messages_prompt(body: &Value) -> u64 {
    let mut core = Map::new();
    core.insert("model".into(), json!("demo"));
    core.insert("max_tokens".into(), json!(1));
    for key in ["system", "messages", "tools"] {
        if let Some(v) = body.get(key) {
            core.insert(key.into(), v.clone());
        }
    }
    if let Ok(chat) = anthropic::request_to_chat(&core) {
        return count_prompt_tokens(&Value::Object(chat));
    }
    fn walk(v: &Value) -> u64 {
        match v {
            Value::Object(o) => {
                let own = match (o.get("type").and_then(Value::as_str), o.get("text")) {
                    (Some("image"), _) => IMAGE_TOKENS,
                    (_, Some(Value::String(t))) => words(t),
                    _ => 0,
                };
                own + o
                    .iter()
                    .filter(|(k, _)| k.as_str() != "text")
                    .map(|(_, v)| walk(v))
                    .sum::<u64>()
            }
            Value::Array(a) => a.iter().map(walk).sum(),
            _ => 0,
        }
    }
    let system = match &body["system"] {
        Value::String(s) => words(s),
        other => walk(other),
    };
    let contents: u64 = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match &m["content"] {
            Value::String(s) => words(s),
            other => walk(other),
        })
        .sum();
    system + contents
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

/// A request past the checks every endpoint makes.
struct Accepted {
    body: Value,
    model: String,
    busy: Option<Busy>,
}

/// What every inference endpoint does first: count the request, apply the fault mode, check the key, parse the
/// JSON object body, remember it, count it in flight, and apply the `fail-500` and `hang` model faults.
async fn accept(
    state: &DemoState,
    api: Api,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Accepted, Response> {
    state.stats.requests.fetch_add(1, Ordering::SeqCst);
    count_path(&state.stats, path);
    if let Some(r) = fault_answer(&state.stats, api).await {
        return Err(r);
    }
    if let Some(key) = &state.config.api_key {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer "));
        // vLLM and SGLang take Anthropic's `x-api-key` on their Messages endpoint.
        let x_api_key = header("x-api-key").filter(|_| api == Api::Anthropic);
        if bearer != Some(key.as_str()) && x_api_key != Some(key.as_str()) {
            return Err(fail(
                api,
                StatusCode::UNAUTHORIZED,
                "invalid upstream API key",
                "invalid_request_error",
            ));
        }
    }
    let body = match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err(fail(
                api,
                StatusCode::BAD_REQUEST,
                "body is not a JSON object",
                "invalid_request_error",
            ));
        }
    };
    *lock(&state.stats.last_body) = Some(body.clone());
    let model = body["model"].as_str().unwrap_or("demo").to_string();
    let busy = state.config.count_in_flight.then(|| {
        let label = body["user"]
            .as_str()
            .or_else(|| body["metadata"]["user_id"].as_str())
            .unwrap_or(&model)
            .to_string();
        Busy::start(state.stats.clone(), label)
    });
    match model.as_str() {
        "fail-500" => Err(fail(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the demo upstream was told to fail",
            "server_error",
        )),
        "hang" => std::future::pending().await,
        _ => Ok(Accepted { body, model, busy }),
    }
}

/// Tokens one answer (one choice) has: `cap` (else `default_tokens`) within the output limit, then the `cut-N`
/// and `overrun-N` model faults. Returns the tokens and whether the stream is to be cut after them.
fn output_tokens(config: &DemoConfig, model: &str, cap: Option<u64>) -> (u64, bool) {
    let tokens = cap
        .unwrap_or(config.default_tokens)
        .min(config.max_tokens_limit);
    if let Some(n) = model.strip_prefix("cut-") {
        return (tokens.min(n.parse().unwrap_or(0)), true);
    }
    if let Some(n) = model.strip_prefix("overrun-") {
        return (n.parse().unwrap_or(0), false);
    }
    (tokens, false)
}

fn word(i: u64) -> &'static str {
    WORDS[(i as usize) % WORDS.len()]
}

/// The demo model's answer of `tokens` tokens.
fn answer_text(tokens: u64) -> String {
    let words: Vec<&str> = (0..tokens).map(word).collect();
    words.join(" ")
}

/// Token `i` of a streamed answer: words separated by spaces, as the joined answer has them.
fn token_text(i: u64) -> String {
    let sep = if i == 0 { "" } else { " " };
    format!("{sep}{}", word(i))
}

/// Counts a non-streamed answer and waits as long as generating it takes (at most 50 tokens' worth).
async fn settle(state: &DemoState, tokens: u64, prompt_tokens: u64, generated: u64) {
    if !state.config.token_delay.is_zero() {
        tokio::time::sleep(state.config.token_delay * tokens.min(50) as u32).await;
    }
    state.stats.completed.fetch_add(1, Ordering::SeqCst);
    state
        .stats
        .generated_tokens
        .fetch_add(generated, Ordering::SeqCst);
    state
        .stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
}

/// One SSE event of a streamed answer.
struct Ev {
    text: String,
    /// Output tokens it carries (counted as generated when it is sent).
    tokens: u64,
    /// Whether `token_delay` passes before it.
    paced: bool,
}

impl Ev {
    fn token(text: String) -> Ev {
        Ev {
            text,
            tokens: 1,
            paced: true,
        }
    }

    fn other(text: String) -> Ev {
        Ev {
            text,
            tokens: 0,
            paced: false,
        }
    }
}

/// `event: TYPE\ndata: JSON\n\n`, the framing of the Responses and Messages streams.
fn named(kind: &str, data: &Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// Streams `events` from a producer task; with `cut`, the connection is closed after the last one as an upstream
/// that died would. A failed send means the client went away (the body was dropped).
fn sse(state: &DemoState, events: Vec<Ev>, cut: bool, busy: Option<Busy>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let delay = state.config.token_delay;
    let stats = state.stats.clone();
    tokio::spawn(async move {
        let _busy = busy;
        let mut guard = CountOnDrop {
            stats: stats.clone(),
            finished: false,
        };
        for event in events {
            if event.paced && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // A token counts as generated once the model has produced it (it is about to be sent).
            stats
                .generated_tokens
                .fetch_add(event.tokens, Ordering::SeqCst);
            if tx.send(Ok(Bytes::from(event.text))).await.is_err() {
                return;
            }
        }
        if cut {
            // Let the last token leave before the connection dies, as it would from a real upstream.
            tokio::time::sleep(delay.max(Duration::from_millis(5))).await;
            // An error ends the body abruptly: the connection closes mid-stream, like an upstream that died.
            let _ = tx
                .send(Err(std::io::Error::other("demo upstream cut the stream")))
                .await;
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

fn request_id(state: &DemoState) -> u64 {
    state.stats.requests.load(Ordering::SeqCst)
}

async fn chat(State(state): State<DemoState>, headers: HeaderMap, body: Bytes) -> Response {
    let Accepted { body, model, busy } =
        match accept(&state, Api::OpenAi, "/v1/chat/completions", &headers, &body).await {
            Ok(a) => a,
            Err(r) => return r,
        };
    let prompt_tokens = count_prompt_tokens(&body);
    // vLLM and SGLang read `max_completion_tokens` first; `max_tokens` only when it is absent.
    let max_tokens = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64());
    let (tokens, cut) = output_tokens(&state.config, &model, max_tokens);
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
    let id = format!("chatcmpl-demo-{}", request_id(&state));
    let completion_tokens = tokens * candidates;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});

    if body["stream"].as_bool() != Some(true) {
        settle(&state, tokens, prompt_tokens, completion_tokens).await;
        drop(busy);
        let content = answer_text(tokens);
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
    // Every chat event is paced (the role and finish chunks too), as this endpoint always was.
    let paced = |text: String, tokens: u64| Ev {
        text,
        tokens,
        paced: true,
    };
    let mut events = Vec::with_capacity((tokens * choices) as usize + 4);
    for c in 0..choices {
        events.push(paced(
            chunk(c, json!({"role": "assistant", "content": ""}), Value::Null),
            0,
        ));
    }
    for i in 0..tokens {
        for c in 0..choices {
            events.push(paced(
                chunk(c, json!({"content": token_text(i)}), Value::Null),
                1,
            ));
        }
    }
    if !cut {
        for c in 0..choices {
            events.push(paced(chunk(c, json!({}), json!(finish)), 0));
        }
        if include_usage {
            let u = json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage});
            events.push(paced(format!("data: {u}\n\n"), 0));
        }
        events.push(paced("data: [DONE]\n\n".to_string(), 0));
    }
    state
        .stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    // Tokens of candidates that are generated but not streamed (`best_of` beyond `n`) count at once.
    state
        .stats
        .generated_tokens
        .fetch_add(tokens * (candidates - choices), Ordering::SeqCst);
    sse(&state, events, cut, busy)
}

async fn completions(State(state): State<DemoState>, headers: HeaderMap, body: Bytes) -> Response {
    let Accepted { body, model, busy } =
        match accept(&state, Api::OpenAi, "/v1/completions", &headers, &body).await {
            Ok(a) => a,
            Err(r) => return r,
        };
    let Some(prompts) = prompt_lengths(&body["prompt"]) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`prompt` must be a string, an array of strings, an array of token ids or an array of token-id arrays",
            "invalid_request_error",
        );
    };
    let prompt_tokens: u64 = prompts.iter().map(|(n, _)| n).sum();
    let max_tokens = body["max_tokens"].as_u64();
    let (tokens, cut) = output_tokens(&state.config, &model, max_tokens);
    let n = body["n"].as_u64().unwrap_or(1).clamp(1, 16);
    let candidates = body["best_of"].as_u64().unwrap_or(n).clamp(n, 16);
    let choices = prompts.len() as u64 * n;
    let finish = if max_tokens.is_some() {
        "length"
    } else {
        "stop"
    };
    let id = format!("cmpl-demo-{}", request_id(&state));
    let completion_tokens = tokens * candidates * prompts.len() as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});

    if body["stream"].as_bool() != Some(true) {
        settle(&state, tokens, prompt_tokens, completion_tokens).await;
        drop(busy);
        let text = answer_text(tokens);
        let choices: Vec<Value> = (0..choices)
            .map(|i| json!({"index": i, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}))
            .collect();
        return Json(json!({
            "id": id, "object": "text_completion", "created": 0, "model": model,
            "choices": choices, "usage": usage,
        }))
        .into_response();
    }

    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunk = |index: u64, text: &str, finish_reason: Value| {
        let mut c = json!({
            "id": id, "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": null, "finish_reason": finish_reason}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = Vec::with_capacity((tokens * choices) as usize + 2);
    for i in 0..tokens {
        let text = token_text(i);
        for c in 0..choices {
            events.push(Ev::token(chunk(c, &text, Value::Null)));
        }
    }
    if !cut {
        for c in 0..choices {
            events.push(Ev::other(chunk(c, "", json!(finish))));
        }
        if include_usage {
            let u = json!({"id": id, "object": "text_completion", "created": 0, "model": model, "choices": [], "usage": usage});
            events.push(Ev::other(format!("data: {u}\n\n")));
        }
        events.push(Ev::other("data: [DONE]\n\n".to_string()));
    }
    state
        .stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    state.stats.generated_tokens.fetch_add(
        tokens * (candidates - n) * prompts.len() as u64,
        Ordering::SeqCst,
    );
    sse(&state, events, cut, busy)
}

/// A deterministic unit vector of `dims` floats for `key` (FNV-1a seed, xorshift stream): the same input always
/// embeds the same, different inputs differently.
fn embedding(key: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h |= 1;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

async fn embeddings(State(state): State<DemoState>, headers: HeaderMap, body: Bytes) -> Response {
    let Accepted { body, model, busy } =
        match accept(&state, Api::OpenAi, "/v1/embeddings", &headers, &body).await {
            Ok(a) => a,
            Err(r) => return r,
        };
    let Some(inputs) = prompt_lengths(&body["input"]) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`input` must be a string, an array of strings, an array of token ids or an array of token-id arrays",
            "invalid_request_error",
        );
    };
    let dims = match &body["dimensions"] {
        Value::Null => DEFAULT_DIMENSIONS,
        v => match v.as_u64() {
            Some(d @ 1..=MAX_DIMENSIONS) => d,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}"),
                    "invalid_request_error",
                );
            }
        },
    } as usize;
    let base64 = match body["encoding_format"].as_str() {
        None if body["encoding_format"].is_null() => false,
        Some("float") => false,
        Some("base64") => true,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "`encoding_format` must be `float` or `base64`",
                "invalid_request_error",
            );
        }
    };
    let prompt_tokens: u64 = inputs.iter().map(|(n, _)| n).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, (_, key))| {
            let v = embedding(key, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    settle(&state, 0, prompt_tokens, 0).await;
    drop(busy);
    Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}

async fn responses(State(state): State<DemoState>, headers: HeaderMap, body: Bytes) -> Response {
    let Accepted { body, model, busy } =
        match accept(&state, Api::OpenAi, "/v1/responses", &headers, &body).await {
            Ok(a) => a,
            Err(r) => return r,
        };
    if !(body["input"].is_string() || body["input"].is_array()) {
        return error(
            StatusCode::BAD_REQUEST,
            "`input` must be a string or an array of input items",
            "invalid_request_error",
        );
    }
    let prompt_tokens = count_responses_prompt(&body);
    let cap = body["max_output_tokens"].as_u64();
    let (tokens, cut) = output_tokens(&state.config, &model, cap);
    let n = request_id(&state);
    let (resp_id, item_id) = (format!("resp_demo_{n}"), format!("msg_demo_{n}"));
    // The demo model always writes until the cap, so a set cap is always what ended the answer.
    let status = if cap.is_some() {
        "incomplete"
    } else {
        "completed"
    };
    let usage = json!({
        "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + tokens,
    });
    let text = answer_text(tokens);
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
    let item = |status: &str, content: Vec<Value>| json!({"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content});
    // Every field the official SDKs' `Response` type has, as vLLM fills them.
    let response = |status: &str, output: Vec<Value>, usage: Value| {
        json!({
            "id": resp_id, "object": "response", "created_at": 0, "status": status,
            "background": false, "error": null,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": cap, "model": model, "output": output,
            "parallel_tool_calls": body["parallel_tool_calls"].as_bool().unwrap_or(true),
            "previous_response_id": null, "reasoning": null, "service_tier": "auto", "store": false,
            "temperature": body["temperature"].as_f64().unwrap_or(1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice").filter(|c| !c.is_null()).cloned().unwrap_or(json!("auto")),
            "tools": body["tools"].as_array().cloned().unwrap_or_default(),
            "top_p": body["top_p"].as_f64().unwrap_or(1.0), "truncation": "disabled",
            "usage": usage, "user": body.get("user").cloned().unwrap_or(Value::Null),
            "metadata": body.get("metadata").filter(|m| m.is_object()).cloned().unwrap_or(json!({})),
        })
    };

    if body["stream"].as_bool() != Some(true) {
        settle(&state, tokens, prompt_tokens, tokens).await;
        drop(busy);
        return Json(response(
            status,
            vec![item(status, vec![part(&text)])],
            usage,
        ))
        .into_response();
    }

    let mut seq = 0u64;
    let mut ev = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        named(kind, &data)
    };
    let pending = response("in_progress", vec![], Value::Null);
    let mut events = vec![
        Ev::other(ev("response.created", json!({"response": pending}))),
        Ev::other(ev("response.in_progress", json!({"response": pending}))),
        Ev::other(ev(
            "response.output_item.added",
            json!({"output_index": 0, "item": item("in_progress", vec![])}),
        )),
        Ev::other(ev(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part("")}),
        )),
    ];
    for i in 0..tokens {
        events.push(Ev::token(ev(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": token_text(i), "logprobs": []}),
        )));
    }
    if !cut {
        let done = item(status, vec![part(&text)]);
        events.push(Ev::other(ev(
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        )));
        events.push(Ev::other(ev(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part(&text)}),
        )));
        events.push(Ev::other(ev(
            "response.output_item.done",
            json!({"output_index": 0, "item": done}),
        )));
        // OpenAI ends an answer cut by `max_output_tokens` with `response.incomplete`, a full one with
        // `response.completed`; both carry the whole response and its usage.
        let last = format!("response.{status}");
        events.push(Ev::other(ev(
            &last,
            json!({"response": response(status, vec![done], usage)}),
        )));
    }
    state
        .stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    sse(&state, events, cut, busy)
}

async fn messages(State(state): State<DemoState>, headers: HeaderMap, body: Bytes) -> Response {
    let Accepted { body, model, busy } =
        match accept(&state, Api::Anthropic, "/v1/messages", &headers, &body).await {
            Ok(a) => a,
            Err(r) => return r,
        };
    let bad = |message: &str| fail(Api::Anthropic, StatusCode::BAD_REQUEST, message, "");
    let Some(max_tokens) = body["max_tokens"].as_u64().filter(|m| *m >= 1) else {
        return bad("max_tokens: Field required (a positive integer)");
    };
    if !body["messages"].is_array() {
        return bad("messages: Field required (an array of messages)");
    }
    let prompt_tokens = count_messages_prompt(&body);
    let (tokens, cut) = output_tokens(&state.config, &model, Some(max_tokens));
    // The model stops on its own (`end_turn`) only when its output limit (or an overrun's length) comes first.
    let stop_reason = if tokens >= max_tokens {
        "max_tokens"
    } else {
        "end_turn"
    };
    let id = format!("msg_demo_{}", request_id(&state));
    let text = answer_text(tokens);

    if body["stream"].as_bool() != Some(true) {
        settle(&state, tokens, prompt_tokens, tokens).await;
        drop(busy);
        return Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": tokens},
        }))
        .into_response();
    }

    let message = json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    });
    let ev = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        named(kind, &data)
    };
    let mut events = vec![
        Ev::other(ev("message_start", json!({"message": message}))),
        Ev::other(ev(
            "content_block_start",
            json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
        )),
        Ev::other(ev("ping", json!({}))),
    ];
    for i in 0..tokens {
        events.push(Ev::token(ev(
            "content_block_delta",
            json!({"index": 0, "delta": {"type": "text_delta", "text": token_text(i)}}),
        )));
    }
    if !cut {
        events.push(Ev::other(ev("content_block_stop", json!({"index": 0}))));
        events.push(Ev::other(ev(
            "message_delta",
            json!({"delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": tokens}}),
        )));
        events.push(Ev::other(ev("message_stop", json!({}))));
    }
    state
        .stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    sse(&state, events, cut, busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Demo {
        server: DemoServer,
        stats: Arc<DemoStats>,
        http: reqwest::Client,
    }

    async fn demo(config: DemoConfig) -> Demo {
        let stats = Arc::new(DemoStats::default());
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = DemoServer::start(addr, config, stats.clone())
            .await
            .unwrap();
        Demo {
            server,
            stats,
            http: reqwest::Client::new(),
        }
    }

    fn fast() -> DemoConfig {
        DemoConfig {
            token_delay: Duration::ZERO,
            ..DemoConfig::default()
        }
    }

    impl Demo {
        async fn post(&self, path: &str, body: Value) -> (u16, HeaderMap, String) {
            let r = self
                .http
                .post(format!("http://{}{path}", self.server.addr()))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            (status, headers, r.text().await.unwrap())
        }

        async fn json(&self, path: &str, body: Value) -> Value {
            let (status, _, text) = self.post(path, body).await;
            assert_eq!(status, 200, "{text}");
            serde_json::from_str(&text).unwrap()
        }

        async fn get(&self, path: &str) -> (u16, String) {
            let r = self
                .http
                .get(format!("http://{}{path}", self.server.addr()))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    }

    /// The body of a stream the upstream cuts: what arrived before the connection closed.
    async fn read_until_cut(r: reqwest::Response) -> String {
        let mut body = r.bytes_stream();
        let mut got = String::new();
        let mut broke = false;
        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
            match chunk {
                Ok(b) => got.push_str(std::str::from_utf8(&b).unwrap()),
                Err(_) => broke = true,
            }
        }
        assert!(broke, "the connection was closed mid-stream");
        got
    }

    /// `data:` payloads of an OpenAI-style SSE body.
    fn data_events(text: &str) -> Vec<String> {
        text.split_terminator("\n\n")
            .map(|e| e.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    /// `(event, data)` pairs of a named-event SSE body, checking each data's `type` is its event name.
    fn named_events(text: &str) -> Vec<(String, Value)> {
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.split_terminator("\n\n")
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    #[tokio::test]
    async fn chat_keeps_its_exact_usage_and_stream() {
        let d = demo(fast()).await;
        let v = d
            .json(
                "/v1/chat/completions",
                json!({"model": "demo", "max_tokens": 3, "n": 2,
                       "messages": [{"role": "user", "content": "one two three"}]}),
            )
            .await;
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9})
        );
        assert_eq!(
            v["choices"][1]["message"]["content"],
            "Paid inference served"
        );
        let (_, _, text) = d
            .post(
                "/v1/chat/completions",
                json!({"model": "demo", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true},
                       "messages": [{"role": "user", "content": "a b"}]}),
            )
            .await;
        let events = data_events(&text);
        assert_eq!(events.len(), 1 + 2 + 1 + 1 + 1);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let usage: Value = serde_json::from_str(&events[4]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        assert_eq!(d.stats.generated_tokens.load(Ordering::SeqCst), 6 + 2);
        assert_eq!(d.stats.requests_on("/v1/chat/completions"), 2);
    }

    #[tokio::test]
    async fn completions_prompt_forms_choices_and_usage() {
        let d = demo(fast()).await;
        let v = d
            .json(
                "/v1/completions",
                json!({"model": "demo", "prompt": "one two three", "max_tokens": 4, "n": 2}),
            )
            .await;
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11})
        );
        assert_eq!(
            v["choices"][1],
            json!({"index": 1, "text": "Paid inference served by", "logprobs": null,
                                          "finish_reason": "length", "stop_reason": null})
        );
        // Two prompts × n=2: indexes prompt*n + i; prompt tokens summed once per prompt.
        let v = d
            .json(
                "/v1/completions",
                json!({"model": "demo", "prompt": ["a b", "c d e"], "max_tokens": 1, "n": 2}),
            )
            .await;
        let indexes: Vec<u64> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, [0, 1, 2, 3]);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
        );
        // Token ids: one prompt; arrays of token ids: one prompt each.
        let v = d
            .json(
                "/v1/completions",
                json!({"model": "demo", "prompt": [1, 2, 3, 4, 5], "max_tokens": 1}),
            )
            .await;
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
        let v = d
            .json(
                "/v1/completions",
                json!({"model": "demo", "prompt": [[1, 2], [3]], "max_tokens": 1}),
            )
            .await;
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["choices"].as_array().unwrap().len(), 2);
        // No max_tokens: 16, OpenAI's and vLLM's default, and the model stopped on its own.
        let v = d
            .json(
                "/v1/completions",
                json!({"model": "demo", "prompt": "x", "echo": true}),
            )
            .await;
        assert_eq!(v["usage"]["completion_tokens"], 16);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        for bad in [json!([]), json!({"a": 1}), json!([1, "x"]), Value::Null] {
            let (status, _, _) = d
                .post("/v1/completions", json!({"model": "demo", "prompt": bad}))
                .await;
            assert_eq!(status, 400);
        }
        assert_eq!(
            d.stats.prompt_tokens.load(Ordering::SeqCst),
            3 + 5 + 5 + 3 + 1
        );
        assert_eq!(
            d.stats.generated_tokens.load(Ordering::SeqCst),
            8 + 4 + 1 + 2 + 16
        );
    }

    #[tokio::test]
    async fn completions_stream_cut_and_overrun() {
        let d = demo(fast()).await;
        let (status, headers, text) = d
            .post(
                "/v1/completions",
                json!({"model": "demo", "prompt": ["a", "b c"], "max_tokens": 3, "stream": true,
                       "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "text/event-stream");
        let events = data_events(&text);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        for index in 0..2 {
            let text: String = chunks
                .iter()
                .filter_map(|c| {
                    c["choices"]
                        .as_array()
                        .and_then(|a| a.first())
                        .filter(|c| c["index"] == index)
                })
                .map(|c| c["text"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(text, "Paid inference served");
        }
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9})
        );
        assert!(
            chunks[..chunks.len() - 1]
                .iter()
                .all(|c| c["usage"].is_null())
        );

        // cut-2: two tokens, then the connection dies (no usage, no [DONE]).
        let r = d
            .http
            .post(format!("http://{}/v1/completions", d.server.addr()))
            .json(&json!({"model": "cut-2", "prompt": "a", "max_tokens": 9, "stream": true}))
            .send()
            .await
            .unwrap();
        let got = read_until_cut(r).await;
        assert_eq!(data_events(&got).len(), 2);
        assert!(!got.contains("[DONE]"));

        // overrun-5 ignores max_tokens.
        let v = d
            .json(
                "/v1/completions",
                json!({"model": "overrun-5", "prompt": "a", "max_tokens": 1}),
            )
            .await;
        assert_eq!(v["usage"]["completion_tokens"], 5);
    }

    #[tokio::test]
    async fn embeddings_float_base64_and_usage() {
        let d = demo(fast()).await;
        let v = d
            .json(
                "/v1/embeddings",
                json!({"model": "demo", "input": ["hello world", "x"]}),
            )
            .await;
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "demo");
        assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        let first: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
        assert_eq!(first.len(), DEFAULT_DIMENSIONS as usize);
        assert!((first.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
        assert_eq!(data[1]["index"], 1);
        assert_eq!(data[0]["object"], "embedding");
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);

        // base64 (the openai SDK's default): little-endian f32 of the same vector.
        let b = d
            .json(
                "/v1/embeddings",
                json!({"model": "demo", "input": "hello world", "encoding_format": "base64"}),
            )
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(decoded, first);

        let v = d
            .json("/v1/embeddings", json!({"model": "demo", "input": [[1, 2, 3], [4]], "dimensions": 3, "encoding_format": "float"}))
            .await;
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 3);
        for bad in [
            json!({"model": "demo", "input": "x", "dimensions": 0}),
            json!({"model": "demo", "input": "x", "encoding_format": "hex"}),
            json!({"model": "demo", "input": []}),
        ] {
            assert_eq!(d.post("/v1/embeddings", bad).await.0, 400);
        }
        assert_eq!(d.stats.prompt_tokens.load(Ordering::SeqCst), 3 + 2 + 4);
        assert_eq!(d.stats.generated_tokens.load(Ordering::SeqCst), 0);
        let (status, _, _) = d
            .post("/v1/embeddings", json!({"model": "fail-500", "input": "x"}))
            .await;
        assert_eq!(status, 500);
    }

    #[tokio::test]
    async fn responses_json_has_every_field_and_exact_usage() {
        let d = demo(fast()).await;
        let v = d
            .json(
                "/v1/responses",
                json!({"model": "demo", "instructions": "Be brief.", "max_output_tokens": 3,
                       "input": [{"role": "user", "content": [{"type": "input_text", "text": "three more words"}]},
                                 {"type": "message", "role": "user", "content": "and two"}]}),
            )
            .await;
        assert_eq!(v["object"], "response");
        assert!(v["id"].as_str().unwrap().starts_with("resp_"));
        assert_eq!(v["status"], "incomplete");
        assert_eq!(
            v["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        for field in [
            "created_at",
            "error",
            "instructions",
            "metadata",
            "model",
            "output",
            "parallel_tool_calls",
            "tool_choice",
            "tools",
            "temperature",
            "top_p",
            "max_output_tokens",
            "text",
            "truncation",
        ] {
            assert!(v.get(field).is_some(), "{field}");
        }
        assert_eq!(v["instructions"], "Be brief.");
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 10})
        );
        let item = &v["output"][0];
        assert_eq!(item["type"], "message");
        assert_eq!(item["role"], "assistant");
        assert_eq!(
            item["content"][0],
            json!({"type": "output_text", "text": "Paid inference served",
                                              "annotations": [], "logprobs": []})
        );
        let v = d
            .json("/v1/responses", json!({"model": "demo", "input": "hi"}))
            .await;
        assert_eq!(v["status"], "completed");
        assert_eq!(v["incomplete_details"], Value::Null);
        assert_eq!(v["usage"]["output_tokens"], 16);
        assert_eq!(
            d.post("/v1/responses", json!({"model": "demo"})).await.0,
            400
        );
    }

    #[tokio::test]
    async fn responses_stream_event_sequence_cut_and_overrun() {
        let d = demo(fast()).await;
        let (_, _, text) = d
            .post(
                "/v1/responses",
                json!({"model": "demo", "input": "a b c", "stream": true}),
            )
            .await;
        let events = named_events(&text);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        expected.extend(std::iter::repeat_n("response.output_text.delta", 16));
        expected.extend([
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]);
        assert_eq!(names, expected);
        for (i, (_, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], i as u64);
        }
        let deltas: String = events
            .iter()
            .filter_map(|(_, d)| d["delta"].as_str())
            .collect();
        assert_eq!(events[20].1["text"], deltas.as_str());
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        let done = &events.last().unwrap().1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], deltas.as_str());
        assert_eq!(done["usage"]["input_tokens"], 3);
        assert_eq!(done["usage"]["output_tokens"], 16);
        assert_eq!(done["usage"]["total_tokens"], 19);

        // A capped answer ends with `response.incomplete`, as OpenAI's does.
        let (_, _, text) = d
            .post(
                "/v1/responses",
                json!({"model": "demo", "input": "a", "stream": true, "max_output_tokens": 2}),
            )
            .await;
        let events = named_events(&text);
        let (name, last) = events.last().unwrap();
        assert_eq!(name, "response.incomplete");
        assert_eq!(last["response"]["usage"]["output_tokens"], 2);

        let (_, _, text) = d
            .post(
                "/v1/responses",
                json!({"model": "overrun-5", "input": "a", "stream": true, "max_output_tokens": 2}),
            )
            .await;
        let events = named_events(&text);
        assert_eq!(
            events
                .iter()
                .filter(|(n, _)| n == "response.output_text.delta")
                .count(),
            5
        );

        let r = d
            .http
            .post(format!("http://{}/v1/responses", d.server.addr()))
            .json(&json!({"model": "cut-2", "input": "a", "stream": true}))
            .send()
            .await
            .unwrap();
        let got = read_until_cut(r).await;
        let events = named_events(&got);
        assert_eq!(
            events
                .iter()
                .filter(|(n, _)| n == "response.output_text.delta")
                .count(),
            2
        );
        assert_eq!(events.last().unwrap().0, "response.output_text.delta");
        assert_eq!(
            d.stats.generated_tokens.load(Ordering::SeqCst),
            16 + 2 + 5 + 2
        );
    }

    #[tokio::test]
    async fn messages_json_stream_errors_and_auth() {
        let d = demo(DemoConfig {
            api_key: Some("k".into()),
            max_tokens_limit: 20,
            ..fast()
        })
        .await;
        let post = |body: Value, auth: Option<(&'static str, &'static str)>| {
            let mut r = d
                .http
                .post(format!("http://{}/v1/messages", d.server.addr()))
                .json(&body);
            if let Some((name, value)) = auth {
                r = r.header(name, value);
            }
            async move {
                let r = r.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        let key = Some(("x-api-key", "k"));
        let body = json!({"model": "demo", "max_tokens": 4, "system": "Be brief.",
                          "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]});
        let (status, text) = post(body.clone(), None).await;
        assert_eq!(status, 401);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid upstream API key"}})
        );
        let (status, text) = post(body.clone(), Some(("authorization", "Bearer k"))).await;
        assert_eq!(status, 200, "{text}");
        let (status, text) = post(body.clone(), key).await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(
            v["content"],
            json!([{"type": "text", "text": "Paid inference served by"}])
        );
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["stop_sequence"], Value::Null);
        assert_eq!(v["usage"], json!({"input_tokens": 4, "output_tokens": 4}));
        // The model's output limit (20) ends it before max_tokens: end_turn.
        let (_, text) = post(json!({"model": "demo", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}), key).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (
                v["stop_reason"].clone(),
                v["usage"]["output_tokens"].clone()
            ),
            (json!("end_turn"), json!(20))
        );

        let (status, text) = post(json!({"model": "demo", "messages": []}), key).await;
        assert_eq!(status, 400);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_tokens")
        );
        let (status, text) = post(
            json!({"model": "fail-500", "max_tokens": 1, "messages": []}),
            key,
        )
        .await;
        assert_eq!(status, 500);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
            "api_error"
        );

        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let (_, text) = post(stream, key).await;
        let events = named_events(&text);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            events[0].1["message"]["usage"],
            json!({"input_tokens": 4, "output_tokens": 0})
        );
        assert_eq!(events[0].1["message"]["content"], json!([]));
        assert_eq!(
            events[3].1["delta"],
            json!({"type": "text_delta", "text": "Paid"})
        );
        assert_eq!(
            events[8].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
                   "usage": {"output_tokens": 4}})
        );

        let r = d
            .http
            .post(format!("http://{}/v1/messages", d.server.addr()))
            .header("x-api-key", "k")
            .json(&json!({"model": "cut-1", "max_tokens": 9, "stream": true, "messages": []}))
            .send()
            .await
            .unwrap();
        let text = read_until_cut(r).await;
        let names: Vec<String> = named_events(&text).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta"
            ]
        );
        assert_eq!(d.stats.requests_on("/v1/messages"), 8);
    }

    #[tokio::test]
    async fn messages_count_the_prompt_as_its_chat_translation() {
        let d = demo(fast()).await;
        let body = json!({"model": "demo", "max_tokens": 1, "system": [{"type": "text", "text": "sys one"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "weather in Paris"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny and warm"},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
        ]});
        let anthropic = d.json("/v1/messages", body.clone()).await;
        let chat = anthropic::request_to_chat(body.as_object().unwrap()).unwrap();
        let chat = d.json("/v1/chat/completions", Value::Object(chat)).await;
        assert_eq!(
            anthropic["usage"]["input_tokens"],
            chat["usage"]["prompt_tokens"]
        );
        assert!(anthropic["usage"]["input_tokens"].as_u64().unwrap() > IMAGE_TOKENS);
        // What the translation refuses is still counted, by its text.
        let doc = json!({"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "ignored"}, "title": "t"},
            {"type": "text", "text": "two words"}]}]});
        assert_eq!(
            d.json("/v1/messages", doc).await["usage"]["input_tokens"],
            2
        );
    }

    #[tokio::test]
    async fn fault_mode_switches_at_runtime() {
        let d = demo(fast()).await;
        assert_eq!(d.get("/v1/models").await.0, 200);
        assert_eq!(
            d.get("/demo/fault").await,
            (200, json!({"mode": "healthy"}).to_string())
        );

        let (status, _, text) = d.post("/demo/fault", json!({"mode": "fail-500"})).await;
        assert_eq!(
            (status, text),
            (200, json!({"mode": "fail-500"}).to_string())
        );
        assert_eq!(d.stats.fault(), Fault::Fail500);
        assert_eq!(d.get("/v1/models").await.0, 500);
        let chat = json!({"model": "demo", "messages": [{"role": "user", "content": "x"}]});
        assert_eq!(d.post("/v1/chat/completions", chat.clone()).await.0, 500);
        let (status, _, text) = d
            .post(
                "/v1/messages",
                json!({"model": "demo", "max_tokens": 1, "messages": []}),
            )
            .await;
        assert_eq!(status, 500);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["type"],
            "error"
        );

        d.stats.set_fault(Fault::Refuse429);
        let (status, headers, _) = d
            .post("/v1/embeddings", json!({"model": "demo", "input": "x"}))
            .await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(d.get("/v1/models").await.0, 429);
        let (status, _, text) = d
            .post(
                "/v1/messages",
                json!({"model": "demo", "max_tokens": 1, "messages": []}),
            )
            .await;
        assert_eq!(status, 429);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
            "rate_limit_error"
        );

        d.stats.set_fault(Fault::Hang);
        let url = format!("http://{}/v1/models", d.server.addr());
        let probe = tokio::spawn(d.http.get(url).send());
        // The request arrives and is never answered; switching back does not release it (it hangs for good).
        while d.stats.requests_on("/v1/models") < 4 {
            tokio::task::yield_now().await;
        }
        assert!(!probe.is_finished());
        assert_eq!(
            d.post("/demo/fault", json!({"mode": "healthy"})).await.0,
            200
        );
        assert_eq!(d.get("/v1/models").await.0, 200);
        assert_eq!(d.post("/v1/chat/completions", chat).await.0, 200);
        assert!(!probe.is_finished());
        probe.abort();

        assert_eq!(
            d.post("/demo/fault", json!({"mode": "broken"})).await.0,
            400
        );
        assert_eq!(d.stats.fault(), Fault::Healthy);
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.as_str()), Some(f));
        }
    }

    #[tokio::test]
    async fn stop_cuts_streams_refuses_connections_and_restarts_on_the_same_port() {
        let config = DemoConfig {
            token_delay: Duration::from_millis(5),
            ..DemoConfig::default()
        };
        let d = demo(config.clone()).await;
        let addr = d.server.addr();
        // A long stream in progress, and a hanging request.
        let r = d
            .http
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(
                &json!({"model": "demo", "max_tokens": 100_000, "stream": true,
                          "messages": [{"role": "user", "content": "x"}]}),
            )
            .send()
            .await
            .unwrap();
        let mut body = r.bytes_stream();
        let first = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "));
        let hanging = tokio::spawn(
            d.http
                .post(format!("http://{addr}/v1/chat/completions"))
                .json(&json!({"model": "hang", "messages": []}))
                .send(),
        );
        while d.stats.requests.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }

        let Demo {
            server,
            stats,
            http,
        } = d;
        server.stop().await;
        // The stream in progress ends without its [DONE]; the hanging request fails.
        let mut rest = Vec::new();
        while let Some(Ok(b)) = futures::StreamExt::next(&mut body).await {
            rest.extend_from_slice(&b);
        }
        assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
        assert!(hanging.await.unwrap().is_err());
        // A fresh client (no pooled connection): the port refuses.
        let fresh = reqwest::Client::new();
        assert!(
            fresh
                .get(format!("http://{addr}/v1/models"))
                .send()
                .await
                .is_err()
        );

        let again = DemoServer::start(addr, config, stats.clone())
            .await
            .unwrap();
        assert_eq!(again.addr(), addr);
        assert_eq!(again.url(), format!("http://{addr}/v1"));
        let r = http
            .get(format!("http://{addr}/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        again.stop().await;
    }
}
