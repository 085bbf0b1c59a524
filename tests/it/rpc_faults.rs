//! A JSON-RPC-aware fault-injecting HTTP proxy for the RPC fault suite (`faults.rs`).
//!
//! It listens on 127.0.0.1:0 in front of anvil, speaks just enough HTTP/1.1 (keep-alive, `Content-Length` bodies)
//! to control every byte it answers, and understands single and batch JSON-RPC requests. For each HTTP request it
//! takes the next fault a test forced for one of the request's methods, or else draws at most one fault from a
//! seeded RNG: with probability `rate`, one of the plan's kinds that applies to this request, uniformly. It counts
//! every request, every JSON-RPC call and every fault it injected, by kind.
//!
//! The RNG is drawn in the order requests arrive, so a seed fixes the sequence of faults for a given sequence of
//! requests; the interleaving with payments mined on anvil still depends on timing.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One fault the proxy can inject into one HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// The connection is closed and the request never reaches the node.
    DropBeforeRead,
    /// The node answers, then the connection is closed without passing the answer on.
    DropAfterRead,
    /// The answer is held back for up to `max_delay` (beyond the client's timeout when that is longer).
    Delay,
    /// HTTP 429 with a plain-text body.
    TooManyRequests,
    /// HTTP 429 with `Retry-After: 1`.
    TooManyRequestsRetryAfter,
    /// HTTP 429 whose body is a JSON-RPC error (code 429), as hosted providers send it.
    TooManyRequestsJsonRpc,
    /// HTTP 500 with a plain-text body.
    InternalServerError,
    /// HTTP 502 with an HTML page, as a load balancer sends it.
    BadGatewayHtml,
    /// HTTP 503 whose body is a JSON-RPC error (code -32603).
    UnavailableJsonRpc,
    /// The node's answer cut at a random byte, with a `Content-Length` that matches the cut body.
    TruncatedJson,
    /// The node's answer announced in full by `Content-Length`, then the connection closes part way.
    CutMidBody,
    /// HTTP 200 with an HTML page.
    NotJson,
    /// HTTP 200 with an empty body.
    EmptyBody,
    /// A single call answered with a batch (`[]` or `[answer]`), or a batch answered with one object.
    WrongEnvelope,
    /// One answer's `result` replaced by a value of the wrong type (never a valid one such as `[]` for logs).
    WrongResultType,
    /// One answer without `result` (and without `error`).
    MissingResult,
    /// Every answer carries an id nobody asked for.
    UnknownIds,
    /// Two answers of a batch swap their ids.
    SwappedIds,
    /// A batch answered with one item fewer.
    FewerItems,
    /// A batch answer that repeats one id, the first copy empty (`[]` for logs, `null` otherwise).
    DuplicateIdEmptyFirst,
    /// Answered as a backend `1..=max_lag` blocks behind: a lower `eth_blockNumber`, `null` for the blocks it does
    /// not have, `eth_getLogs` without the logs of those blocks (`[]` for a range above its head).
    Lagging,
    /// A load balancer that sends the calls of one batch to different backends: `eth_getLogs` to one `1..=max_lag`
    /// blocks behind (no logs for the blocks it lacks, an error for a block asked by hash), the rest to a current one.
    SplitLagging,
    /// `eth_blockNumber` lower than the highest head answered before, by `1..=max_backwards`.
    HeadBackwards,
}

use Fault::*;

impl Fault {
    pub const CONNECTION: &[Fault] = &[DropBeforeRead, DropAfterRead, Delay];
    pub const HTTP_STATUS: &[Fault] = &[
        TooManyRequests,
        TooManyRequestsRetryAfter,
        TooManyRequestsJsonRpc,
        InternalServerError,
        BadGatewayHtml,
        UnavailableJsonRpc,
    ];
    pub const BROKEN_BODIES: &[Fault] =
        &[TruncatedJson, CutMidBody, NotJson, EmptyBody, WrongEnvelope];
    pub const WRONG_SHAPES: &[Fault] = &[
        WrongResultType,
        MissingResult,
        UnknownIds,
        SwappedIds,
        FewerItems,
        DuplicateIdEmptyFirst,
    ];

    /// Every fault kind.
    pub fn all() -> Vec<Fault> {
        [
            Fault::CONNECTION,
            Fault::HTTP_STATUS,
            Fault::BROKEN_BODIES,
            Fault::WRONG_SHAPES,
            &[Lagging, SplitLagging, HeadBackwards],
        ]
        .concat()
    }

    pub fn label(self) -> &'static str {
        match self {
            DropBeforeRead => "connection dropped before the node saw the request",
            DropAfterRead => "connection dropped after the node answered",
            Delay => "delayed answer",
            TooManyRequests => "HTTP 429",
            TooManyRequestsRetryAfter => "HTTP 429 with Retry-After",
            TooManyRequestsJsonRpc => "HTTP 429 with a JSON-RPC error body",
            InternalServerError => "HTTP 500",
            BadGatewayHtml => "HTTP 502 (HTML)",
            UnavailableJsonRpc => "HTTP 503 with a JSON-RPC error body",
            TruncatedJson => "truncated JSON",
            CutMidBody => "body cut short of its Content-Length",
            NotJson => "HTML instead of JSON",
            EmptyBody => "empty body",
            WrongEnvelope => "batch for single / single for batch",
            WrongResultType => "result of the wrong type",
            MissingResult => "answer without result",
            UnknownIds => "unknown ids",
            SwappedIds => "swapped ids in a batch",
            FewerItems => "batch answered with fewer items",
            DuplicateIdEmptyFirst => "duplicate id, empty first copy",
            Lagging => "lagging backend",
            SplitLagging => "batch split, logs from a lagging backend",
            HeadBackwards => "head went backwards",
        }
    }
}

/// What the proxy injects when no fault is forced.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Probability that a request gets a fault.
    pub rate: f64,
    /// The kinds to choose from, uniformly among those that apply to the request.
    pub kinds: Vec<Fault>,
    pub max_delay: Duration,
    pub max_lag: u64,
    pub max_backwards: u64,
}

impl FaultPlan {
    pub fn none() -> FaultPlan {
        FaultPlan::of(0.0, &[])
    }

    pub fn of(rate: f64, kinds: &[Fault]) -> FaultPlan {
        FaultPlan {
            rate,
            kinds: kinds.to_vec(),
            max_delay: Duration::from_millis(1_500),
            max_lag: 6,
            max_backwards: 6,
        }
    }
}

/// What the proxy did so far.
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    pub connections: u64,
    pub http_requests: u64,
    pub rpc_calls: u64,
    pub faults: BTreeMap<Fault, u64>,
    /// Every `eth_getLogs` range asked for, in order.
    pub logs_ranges: Vec<(u64, u64)>,
}

impl ProxyStats {
    pub fn injected(&self) -> u64 {
        self.faults.values().sum()
    }
}

impl fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} HTTP requests ({} JSON-RPC calls) on {} connections, {} faults injected:",
            self.http_requests,
            self.rpc_calls,
            self.connections,
            self.injected()
        )?;
        for (fault, n) in &self.faults {
            writeln!(f, "    {n:>5}  {}", fault.label())?;
        }
        Ok(())
    }
}

struct Inner {
    target: String,
    client: reqwest::Client,
    rng: Mutex<StdRng>,
    plan: Mutex<FaultPlan>,
    forced: Mutex<VecDeque<(&'static str, Fault)>>,
    stats: Mutex<ProxyStats>,
    /// The highest `eth_blockNumber` passed on unfaulted: the reference for "backwards".
    highest_head: AtomicU64,
}

/// The proxy; cheap to clone, serves until the test's runtime ends.
#[derive(Clone)]
pub struct FaultProxy {
    pub addr: std::net::SocketAddr,
    inner: Arc<Inner>,
}

/// One call of a request: what the answer with its id must be checked or bent against.
struct Call {
    id: Value,
    method: String,
    params: Value,
}

/// How the bytes of an answer go out.
enum Reply {
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Announce `declared` bytes, send `body`, close.
    CutShort {
        body: Vec<u8>,
        declared: usize,
    },
    Close,
}

impl FaultProxy {
    pub async fn start(target: String, seed: u64, plan: FaultPlan) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = FaultProxy {
            addr: listener.local_addr().unwrap(),
            inner: Arc::new(Inner {
                target,
                client: reqwest::Client::new(),
                rng: Mutex::new(StdRng::seed_from_u64(seed)),
                plan: Mutex::new(plan),
                forced: Mutex::default(),
                stats: Mutex::default(),
                highest_head: AtomicU64::new(0),
            }),
        };
        let inner = proxy.inner.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                inner.stats.lock().unwrap().connections += 1;
                tokio::spawn(inner.clone().serve(stream));
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        *self.inner.plan.lock().unwrap() = plan;
    }

    /// The next request that calls `method` gets `fault` (in the order given), whatever the plan says.
    pub fn force(&self, method: &'static str, fault: Fault) {
        self.inner.forced.lock().unwrap().push_back((method, fault));
    }

    pub fn forced_left(&self) -> usize {
        self.inner.forced.lock().unwrap().len()
    }

    pub fn stats(&self) -> ProxyStats {
        self.inner.stats.lock().unwrap().clone()
    }
}

impl Inner {
    async fn serve(self: Arc<Inner>, mut stream: TcpStream) {
        let mut buf = Vec::new();
        while let Some((body, client_closes)) = read_request(&mut stream, &mut buf).await {
            let reply = self.answer(&body).await;
            let keep_open = match reply {
                Reply::Answer {
                    status,
                    headers,
                    body,
                } => write_answer(&mut stream, status, &headers, &body, body.len())
                    .await
                    .is_ok(),
                Reply::CutShort { body, declared } => {
                    let _ = write_answer(&mut stream, 200, &[], &body, declared).await;
                    false
                }
                Reply::Close => false,
            };
            if !keep_open || client_closes {
                return;
            }
        }
    }

    async fn answer(&self, body: &[u8]) -> Reply {
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return Reply::Answer {
                status: 400,
                headers: vec![],
                body: b"not JSON".to_vec(),
            };
        };
        let is_batch = request.is_array();
        let calls = calls_of(&request);
        {
            let mut stats = self.stats.lock().unwrap();
            stats.http_requests += 1;
            stats.rpc_calls += calls.len() as u64;
            for call in calls.iter().filter(|c| c.method == "eth_getLogs") {
                let filter = &call.params[0];
                if let (Some(from), Some(to)) = (
                    hex_number(&filter["fromBlock"]),
                    hex_number(&filter["toBlock"]),
                ) {
                    stats.logs_ranges.push((from, to));
                }
            }
        }
        let picked = self.pick(&calls, is_batch);
        let fault = picked.map(|(f, _)| f);
        // The call a fault bends: the one of the method a test forced it on, else a random one.
        let target = |rng: &mut StdRng| -> usize {
            picked
                .and_then(|(_, method)| method)
                .and_then(|m| calls.iter().position(|c| c.method == m))
                .unwrap_or_else(|| rng.random_range(0..calls.len()))
        };
        if let Some(f) = fault {
            *self.stats.lock().unwrap().faults.entry(f).or_default() += 1;
        }
        let first_id = calls.first().map_or(Value::Null, |c| c.id.clone());
        let plain = |status: u16, headers: Vec<(&'static str, String)>, body: &str| Reply::Answer {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        };
        let json_error = |code: i64, message: &str| {
            json!({"jsonrpc": "2.0", "id": first_id, "error": {"code": code, "message": message}})
                .to_string()
        };
        match fault {
            Some(DropBeforeRead) => return Reply::Close,
            Some(TooManyRequests) => return plain(429, vec![], "Too Many Requests"),
            Some(TooManyRequestsRetryAfter) => {
                return plain(429, vec![("retry-after", "1".into())], "slow down");
            }
            Some(TooManyRequestsJsonRpc) => {
                let body = json_error(
                    429,
                    "Your app has exceeded its compute units per second capacity",
                );
                return plain(
                    429,
                    vec![("content-type", "application/json".into())],
                    &body,
                );
            }
            Some(InternalServerError) => return plain(500, vec![], "Internal Server Error"),
            Some(BadGatewayHtml) => {
                return plain(
                    502,
                    vec![("content-type", "text/html".into())],
                    BAD_GATEWAY_PAGE,
                );
            }
            Some(UnavailableJsonRpc) => {
                let body = json_error(-32603, "upstream unavailable, please retry");
                return plain(
                    503,
                    vec![("content-type", "application/json".into())],
                    &body,
                );
            }
            Some(NotJson) => {
                return plain(
                    200,
                    vec![("content-type", "text/html".into())],
                    BAD_GATEWAY_PAGE,
                );
            }
            Some(EmptyBody) => return plain(200, vec![], ""),
            _ => {}
        }

        let lagging = matches!(fault, Some(Lagging | SplitLagging));
        let lag_head = if lagging {
            let real = self
                .forward(br#"{"jsonrpc":"2.0","id":0,"method":"eth_blockNumber","params":[]}"#)
                .await
                .and_then(|v| hex_number(&v["result"]));
            let lag = self.rng.lock().unwrap().random_range(1..=self.max_lag());
            real.map(|h| h.saturating_sub(lag))
        } else {
            None
        };
        let Some(mut response) = self.forward(body).await else {
            return plain(502, vec![], "upstream unreachable");
        };
        if fault == Some(DropAfterRead) {
            return Reply::Close;
        }
        if let Some(lag_head) = lag_head {
            // With a split batch, only the logs come from the lagging backend.
            let whole = fault == Some(Lagging);
            let mut unknown_blocks = Vec::new();
            for call in calls.iter().filter(|c| c.method == "eth_getLogs") {
                let Some(hash) = call.params[0]["blockHash"].as_str() else {
                    continue;
                };
                let lookup = json!({"jsonrpc": "2.0", "id": 0, "method": "eth_getBlockByHash", "params": [hash, false]});
                let number = self
                    .forward(lookup.to_string().as_bytes())
                    .await
                    .and_then(|v| hex_number(&v["result"]["number"]));
                if number.is_none_or(|n| n > lag_head) {
                    unknown_blocks.push(call.id.clone());
                }
            }
            bend_items(&calls, &mut response, |call, item| {
                match call.method.as_str() {
                    "eth_blockNumber" if whole => item["result"] = json!(format!("{lag_head:#x}")),
                    "eth_getBlockByNumber"
                        if whole && hex_number(&call.params[0]).is_some_and(|n| n > lag_head) =>
                    {
                        item["result"] = Value::Null;
                    }
                    // What geth and anvil answer for a block they do not have.
                    "eth_getLogs" if unknown_blocks.contains(&call.id) => {
                        *item = json!({"jsonrpc": "2.0", "id": call.id, "error": {"code": -32000, "message": "unknown block"}});
                    }
                    "eth_getLogs" => {
                        if let Some(logs) = item["result"].as_array_mut() {
                            logs.retain(|l| {
                                hex_number(&l["blockNumber"]).is_some_and(|n| n <= lag_head)
                            });
                        }
                    }
                    _ => {}
                }
            });
        } else if fault == Some(HeadBackwards) {
            let highest = self.highest_head.load(Ordering::SeqCst);
            let back = self
                .rng
                .lock()
                .unwrap()
                .random_range(1..=self.max_backwards());
            let head = highest.saturating_sub(back);
            bend_items(&calls, &mut response, |call, item| {
                if call.method == "eth_blockNumber" {
                    item["result"] = json!(format!("{head:#x}"));
                }
            });
        } else if matches!(fault, None | Some(Delay)) {
            bend_items(&calls, &mut response, |call, item| {
                if call.method == "eth_blockNumber"
                    && let Some(n) = hex_number(&item["result"])
                {
                    self.highest_head.fetch_max(n, Ordering::SeqCst);
                }
            });
        }

        let body = {
            let mut rng = self.rng.lock().unwrap();
            match fault {
                Some(WrongEnvelope) => {
                    response = match response {
                        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
                        Value::Array(_) => json!({}),
                        single if rng.random_bool(0.5) => json!([single]),
                        _ => json!([]),
                    };
                    serde_json::to_vec(&response).unwrap()
                }
                Some(WrongResultType) => {
                    let call = &calls[target(&mut rng)];
                    let wrong = wrong_result(&call.method, &mut rng);
                    if let Some(item) = item_for(&mut response, &call.id) {
                        item["result"] = wrong;
                    }
                    serde_json::to_vec(&response).unwrap()
                }
                Some(MissingResult) => {
                    let call = &calls[target(&mut rng)];
                    if let Some(item) = item_for(&mut response, &call.id)
                        && let Some(o) = item.as_object_mut()
                    {
                        o.remove("result");
                    }
                    serde_json::to_vec(&response).unwrap()
                }
                Some(UnknownIds) => {
                    for item in items_mut(&mut response) {
                        item["id"] = json!(1_000_000 + item["id"].as_u64().unwrap_or(0));
                    }
                    serde_json::to_vec(&response).unwrap()
                }
                Some(SwappedIds) => {
                    if let Value::Array(items) = &mut response
                        && items.len() >= 2
                    {
                        let a = rng.random_range(0..items.len());
                        let b = (a + rng.random_range(1..items.len())) % items.len();
                        let id_a = items[a]["id"].clone();
                        items[a]["id"] = items[b]["id"].clone();
                        items[b]["id"] = id_a;
                    }
                    serde_json::to_vec(&response).unwrap()
                }
                Some(FewerItems) => {
                    if let Value::Array(items) = &mut response
                        && !items.is_empty()
                    {
                        let id = &calls[target(&mut rng)].id;
                        let gone = items.iter().position(|i| i["id"] == *id).unwrap_or(0);
                        items.remove(gone);
                    }
                    serde_json::to_vec(&response).unwrap()
                }
                Some(DuplicateIdEmptyFirst) => {
                    if let Value::Array(items) = &mut response
                        && !items.is_empty()
                    {
                        let id = calls[target(&mut rng)].id.clone();
                        let at = items.iter().position(|i| i["id"] == id).unwrap_or(0);
                        let method = calls
                            .iter()
                            .find(|c| c.id == id)
                            .map_or("", |c| c.method.as_str());
                        let empty = if method == "eth_getLogs" {
                            json!([])
                        } else {
                            Value::Null
                        };
                        items.insert(at, json!({"jsonrpc": "2.0", "id": id, "result": empty}));
                    }
                    serde_json::to_vec(&response).unwrap()
                }
                Some(TruncatedJson) => {
                    let full = serde_json::to_vec(&response).unwrap();
                    let cut = rng.random_range(1..full.len().max(2));
                    full[..cut.min(full.len())].to_vec()
                }
                Some(CutMidBody) => {
                    let full = serde_json::to_vec(&response).unwrap();
                    let cut = rng.random_range(0..full.len().max(1));
                    return Reply::CutShort {
                        declared: full.len(),
                        body: full[..cut].to_vec(),
                    };
                }
                _ => serde_json::to_vec(&response).unwrap(),
            }
        };
        if fault == Some(Delay) {
            let max = self.plan.lock().unwrap().max_delay;
            let wait = self.rng.lock().unwrap().random_range(Duration::ZERO..=max);
            tokio::time::sleep(wait).await;
        }
        Reply::Answer {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body,
        }
    }

    fn max_lag(&self) -> u64 {
        self.plan.lock().unwrap().max_lag.max(1)
    }

    fn max_backwards(&self) -> u64 {
        self.plan.lock().unwrap().max_backwards.max(1)
    }

    /// The forced fault for this request (with the method it targets), else a random one from the plan that
    /// applies to it.
    fn pick(&self, calls: &[Call], is_batch: bool) -> Option<(Fault, Option<&'static str>)> {
        {
            let mut forced = self.forced.lock().unwrap();
            if let Some(at) = forced
                .iter()
                .position(|(method, _)| calls.iter().any(|c| c.method == *method))
            {
                return forced.remove(at).map(|(method, f)| (f, Some(method)));
            }
        }
        let plan = self.plan.lock().unwrap().clone();
        let mut rng = self.rng.lock().unwrap();
        if plan.rate <= 0.0 || !rng.random_bool(plan.rate.min(1.0)) {
            return None;
        }
        let has = |m: &str| calls.iter().any(|c| c.method == m);
        let applicable: Vec<Fault> = plan
            .kinds
            .iter()
            .copied()
            .filter(|f| match f {
                SwappedIds => is_batch && calls.len() >= 2,
                FewerItems | DuplicateIdEmptyFirst => is_batch,
                Lagging => {
                    has("eth_blockNumber") || has("eth_getBlockByNumber") || has("eth_getLogs")
                }
                SplitLagging => has("eth_getLogs"),
                HeadBackwards => {
                    has("eth_blockNumber") && self.highest_head.load(Ordering::SeqCst) > 0
                }
                _ => !calls.is_empty(),
            })
            .collect();
        if applicable.is_empty() {
            return None;
        }
        Some((applicable[rng.random_range(0..applicable.len())], None))
    }

    async fn forward(&self, body: &[u8]) -> Option<Value> {
        let resp = self
            .client
            .post(&self.target)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .ok()?;
        resp.json::<Value>().await.ok()
    }
}

const BAD_GATEWAY_PAGE: &str = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>";

fn calls_of(request: &Value) -> Vec<Call> {
    let one = |v: &Value| Call {
        id: v["id"].clone(),
        method: v["method"].as_str().unwrap_or("").to_string(),
        params: v["params"].clone(),
    };
    match request {
        Value::Array(items) => items.iter().map(one).collect(),
        single => vec![one(single)],
    }
}

fn items_mut(response: &mut Value) -> Vec<&mut Value> {
    match response {
        Value::Array(items) => items.iter_mut().collect(),
        single => vec![single],
    }
}

fn item_for<'a>(response: &'a mut Value, id: &Value) -> Option<&'a mut Value> {
    items_mut(response)
        .into_iter()
        .find(|item| item["id"] == *id)
}

/// Applies `bend` to every answer that has a result, with the call it answers.
fn bend_items(calls: &[Call], response: &mut Value, mut bend: impl FnMut(&Call, &mut Value)) {
    for item in items_mut(response) {
        if item.get("result").is_none() {
            continue;
        }
        if let Some(call) = calls.iter().find(|c| c.id == item["id"]) {
            bend(call, item);
        }
    }
}

/// A `result` of the wrong type for `method`: never one a correct node could send (not `[]` for logs, not `null`
/// for a block).
fn wrong_result(method: &str, rng: &mut StdRng) -> Value {
    let choices: Vec<Value> = match method {
        "eth_getLogs" => vec![
            Value::Null,
            json!({}),
            json!("0x"),
            json!(7),
            json!(true),
            json!([1, 2]),
            json!({"logs": []}),
        ],
        "eth_getBlockByNumber" => vec![
            json!([]),
            json!("0x1"),
            json!(7),
            json!(true),
            json!({}),
            json!({"number": "0xzz", "hash": "0x12"}),
        ],
        _ => vec![
            Value::Null,
            json!([]),
            json!({}),
            json!(true),
            json!("latest"),
            json!("0xzz"),
        ],
    };
    choices[rng.random_range(0..choices.len())].clone()
}

fn hex_number(v: &Value) -> Option<u64> {
    u64::from_str_radix(v.as_str()?.strip_prefix("0x")?, 16).ok()
}

/// Reads one HTTP/1.1 request with a `Content-Length` body; `None` once the client closed the connection. Returns
/// the body and whether the client asked to close after it.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Vec<u8>, bool)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let closes = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            let total = end + 4 + length;
            while buf.len() < total {
                read_more(stream, buf).await?;
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return Some((body, closes));
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

async fn write_answer(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&'static str, String)],
    body: &[u8],
    declared: usize,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\ncontent-length: {declared}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await?;
    stream.flush().await
}
