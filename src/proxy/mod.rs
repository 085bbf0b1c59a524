//! The gated inference proxy: upstream clients, per-key concurrency slots, request rewriting, and metering of
//! what the upstream actually produced (see `sse` for streams, `pricing` for money, `windows` for pool hours).
//!
//! Every request is bounded first (`bound`: output bound written into the forwarded request, prompt bound, `n`).
//! Credit requests reserve the bound's cost before anything is forwarded and settle when the response ends —
//! completed, failed, cut by the upstream or dropped by the client (the metered body's `Drop` settles then).
//! **Settlement never exceeds the reservation.** When no usage object arrives because the upstream stream broke,
//! prompt tokens are charged at their bound (what was reserved for them) and completion tokens are the output
//! chunks actually read (`usage_source = estimated`); when the client hung up mid-stream, the gateway cannot know
//! what the upstream generated past the last byte it read, so the reservation is charged
//! (`usage_source = reservation`). An upstream that generates past the bound is an **overrun**: a stream is cut at
//! the bound, the reservation is charged, and the usage row and a metric record it.

pub mod anthropic;
pub mod api;
pub mod bound;
pub mod key_rates;
pub mod pricing;
pub mod router;
pub mod sse;
pub mod windows;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use alloy::transports::http::reqwest;
use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};

use crate::config::{MessagesApi, Model, OutputLimitField, Settings, Upstream};
use crate::store::Store;
use crate::store::usage::{NewUsage, Outcome};
use crate::usdc::Usdc;
pub use api::Api;
pub use bound::{BadParam, Bound, BoundError, Payer, TEMPLATE_TOKEN_MARGIN};
use pricing::Prices;
use router::{Attempt, Router};
use sse::{Dialect, Usage, UsageTap};

/// Why the upstream could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach upstream `{upstream}`: {message}")]
    Unreachable { upstream: String, message: String },
    #[error("upstream `{upstream}` did not answer in time")]
    Timeout { upstream: String },
    #[error("upstream `{upstream}` failed: {message}")]
    Failed { upstream: String, message: String },
}

/// One HTTP client per upstream (each with its own timeouts), the router over every model's deployments, and the
/// per-key concurrency slots.
pub struct Proxy {
    clients: Vec<reqwest::Client>,
    router: Arc<Router>,
    slots: Slots,
    key_rates: key_rates::KeyRates,
}

/// What an upstream answered, and on which deployment (held in flight until the answer is metered).
pub struct Answer {
    pub response: reqwest::Response,
    pub attempt: Attempt,
    /// The upstream speaks another API than the client's (an Anthropic Messages request sent as chat
    /// completions): the answer must be translated back.
    pub translated: bool,
}

/// Why a request was not answered by any deployment.
#[derive(Debug)]
pub enum SendError {
    /// Every deployment tried failed before answering.
    Upstream(UpstreamError),
    /// The request cannot be expressed in the upstream's API (a translation refused a parameter).
    Untranslatable(BadParam),
    /// The model has no deployment (not configured).
    NoDeployment,
}

impl Proxy {
    pub fn new(settings: &Settings, store: &Store) -> Result<Proxy, reqwest::Error> {
        let clients = settings
            .upstreams
            .iter()
            .map(|u| {
                reqwest::Client::builder()
                    .connect_timeout(u.connect_timeout)
                    .read_timeout(u.read_timeout)
                    .pool_max_idle_per_host(256)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let router = Arc::new(Router::new(settings));
        let proxy = Proxy {
            clients,
            router,
            slots: Slots::for_store(store),
            key_rates: key_rates::KeyRates::new(settings.limits.max_rate_tracked_keys as usize),
        };
        proxy.start_prober(settings);
        Ok(proxy)
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Per-key requests and tokens per minute.
    pub fn key_rates(&self) -> &key_rates::KeyRates {
        &self.key_rates
    }

    /// Probes cooled-down deployments once a second (`GET <base_url>/models`) until the proxy is dropped.
    fn start_prober(&self, settings: &Settings) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let router = Arc::downgrade(&self.router);
        let clients = self.clients.clone();
        let upstreams = settings.upstreams.clone();
        handle.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(router) = router.upgrade() else {
                    return;
                };
                for deployment in router.due_for_probe(Instant::now()) {
                    let (Some(upstream), Some(client)) = (
                        upstreams.get(deployment.upstream),
                        clients.get(deployment.upstream),
                    ) else {
                        continue;
                    };
                    let mut probe = client.get(format!("{}/models", upstream.base_url)).timeout(
                        upstream
                            .first_byte_timeout
                            .min(std::time::Duration::from_secs(5)),
                    );
                    if let Some(key) = &upstream.api_key {
                        probe = probe.bearer_auth(key);
                    }
                    let ok = probe.send().await.is_ok_and(|r| r.status().is_success());
                    router.probed(&deployment, ok, Instant::now());
                }
            }
        });
    }

    /// Sends `prepared` to a deployment of `model` chosen by the router; a failure before any answer (connect
    /// error, no headers within the first-byte timeout, 429 or 5xx) is retried once on another deployment.
    pub async fn send(
        &self,
        settings: &Settings,
        model: &Model,
        prepared: &Prepared,
        request_id: &str,
    ) -> Result<Answer, SendError> {
        let attempts = if self.router.routing().retry_other_deployment {
            2
        } else {
            1
        };
        let mut tried: Vec<usize> = Vec::new();
        let mut random = |n: u64| rand::random::<u64>() % n.max(1);
        let mut last_error = None;
        let mut last_answer: Option<Answer> = None;
        while tried.len() < attempts {
            let Some((index, attempt)) =
                self.router
                    .pick(&model.id, &tried, Instant::now(), &mut random)
            else {
                break;
            };
            if !tried.is_empty() {
                crate::metrics::record_failover(&model.id);
            }
            tried.push(index);
            let deployment = &attempt.deployment;
            let (Some(upstream), Some(client)) = (
                settings.upstreams.get(deployment.upstream),
                self.clients.get(deployment.upstream),
            ) else {
                return Err(SendError::NoDeployment);
            };
            let outgoing = prepared
                .for_upstream(&deployment.upstream_model, upstream)
                .map_err(SendError::Untranslatable)?;
            let mut req = client
                .post(format!("{}{}", upstream.base_url, outgoing.path))
                .header("content-type", "application/json")
                .header("x-request-id", request_id)
                .body(outgoing.body);
            if let Some(key) = &upstream.api_key {
                req = req.bearer_auth(key);
                if outgoing.anthropic {
                    // Servers of Anthropic's API read the key from here.
                    req = req.header("x-api-key", key.as_str());
                }
            }
            if outgoing.anthropic {
                req = req.header("anthropic-version", "2023-06-01");
            }
            let answered = tokio::time::timeout(upstream.first_byte_timeout, req.send()).await;
            match answered {
                Ok(Ok(response)) => {
                    let status = response.status();
                    let failed = status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error();
                    if !failed {
                        self.router.succeeded(&attempt, Instant::now());
                        return Ok(Answer {
                            response,
                            attempt,
                            translated: outgoing.translated,
                        });
                    }
                    self.router.failed(&attempt, Instant::now());
                    tracing::warn!(model = %model.id, upstream = %upstream.name, status = status.as_u16(),
                        "deployment answered with an error status");
                    // Kept: if no other deployment answers, this answer is the one the client reads.
                    last_answer = Some(Answer {
                        response,
                        attempt,
                        translated: outgoing.translated,
                    });
                    last_error = None;
                }
                Ok(Err(e)) => {
                    self.router.failed(&attempt, Instant::now());
                    last_answer = None;
                    let e = classify(&upstream.name, e);
                    tracing::warn!(model = %model.id, error = %e, "deployment failed before answering");
                    last_error = Some(e);
                }
                Err(_) => {
                    self.router.failed(&attempt, Instant::now());
                    last_answer = None;
                    tracing::warn!(model = %model.id, upstream = %upstream.name,
                        "deployment sent no response headers within its first-byte timeout");
                    last_error = Some(UpstreamError::Timeout {
                        upstream: upstream.name.clone(),
                    });
                }
            }
        }
        if let Some(answer) = last_answer {
            return Ok(answer);
        }
        Err(last_error.map_or(SendError::NoDeployment, SendError::Upstream))
    }
}

/// Maps a client error to what happened.
pub fn classify(upstream: &str, e: reqwest::Error) -> UpstreamError {
    let upstream = upstream.to_string();
    // reqwest's error text names the URL, which may carry a key; the upstream is named by its configured name.
    let e = e.without_url();
    if e.is_timeout() {
        UpstreamError::Timeout { upstream }
    } else if e.is_connect() {
        UpstreamError::Unreachable {
            upstream,
            message: e.to_string(),
        }
    } else {
        UpstreamError::Failed {
            upstream,
            message: e.to_string(),
        }
    }
}

/// What a concurrency slot is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotOwner {
    /// A pool subscription: one request at a time, whichever of its keys (a rotated one included) sends it.
    Subscription(i64),
    /// A credit account: at most `[limits] credit_key_max_in_flight` requests at once.
    Account(String),
}

/// Requests in flight per owner: counted in this process on SQLite (one process per database), and in the
/// database's `request_slots` on PostgreSQL, so the limits hold across every replica.
#[derive(Clone, Default)]
pub struct Slots {
    local: Arc<Mutex<HashMap<SlotOwner, u32>>>,
    shared: Option<Store>,
    /// Shared slots this process is still freeing, per owner key: a guard's release runs after it is dropped.
    releasing: Arc<Mutex<HashMap<String, u32>>>,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.shared.is_some() {
            "Slots(shared)"
        } else {
            "Slots(local)"
        })
    }
}

/// Holds one slot; dropping it (completion, error, panic, disconnect) frees it.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Slots,
    owner: SlotOwner,
    /// The shared slot's number and holder (PostgreSQL).
    shared: Option<(i64, String)>,
}

impl SlotOwner {
    /// The owner's key in `request_slots`.
    fn key(&self) -> String {
        match self {
            SlotOwner::Subscription(id) => format!("subscription:{id}"),
            SlotOwner::Account(account) => format!("account:{account}"),
        }
    }
}

impl Slots {
    /// Slots for `store`: shared through the database when several replicas may run on it.
    pub fn for_store(store: &Store) -> Slots {
        Slots {
            local: Arc::default(),
            shared: store.replica_id().is_some().then(|| store.clone()),
            releasing: Arc::default(),
        }
    }

    /// Takes a slot of `owner` for `request_id` if it has fewer than `limit` in flight (`now`: the gateway's clock,
    /// for the holders' leases).
    pub async fn try_acquire(
        &self,
        owner: SlotOwner,
        limit: u32,
        request_id: &str,
        now: i64,
    ) -> Result<Option<SlotGuard>, crate::store::StoreError> {
        if let Some(store) = &self.shared {
            let key = owner.key();
            let mut taken = store
                .take_request_slot(key.clone(), limit, request_id.to_string(), now)
                .await?;
            // The owner's previous request on this replica may have just finished, its slot still being freed
            // in the background: wait (briefly) for those releases and try once more, so that an agent's
            // sequential requests are never refused for a request that is already over.
            if taken.is_none() && self.is_releasing(&key) {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while self.is_releasing(&key) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                taken = store
                    .take_request_slot(key, limit, request_id.to_string(), now)
                    .await?;
            }
            return Ok(taken.map(|slot_no| SlotGuard {
                slots: self.clone(),
                owner,
                shared: Some((slot_no, request_id.to_string())),
            }));
        }
        let mut held = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(owner.clone()).or_insert(0);
        if *n >= limit {
            return Ok(None);
        }
        *n += 1;
        Ok(Some(SlotGuard {
            slots: self.clone(),
            owner,
            shared: None,
        }))
    }
}

/// Calls its closure when dropped: ends a counted release however the release task ends.
struct ReleaseDone(Option<Box<dyn FnOnce() + Send>>);

impl Drop for ReleaseDone {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done();
        }
    }
}

impl Slots {
    fn is_releasing(&self, key: &str) -> bool {
        self.releasing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|n| *n > 0)
    }

    /// Counts a release of `key` in progress until the returned closure is called.
    fn start_release(&self, key: &str) -> impl FnOnce() + Send + 'static {
        *self
            .releasing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert(0) += 1;
        let (releasing, key) = (self.releasing.clone(), key.to_string());
        move || {
            let mut map = releasing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some((slot_no, request_id)) = self.shared.take() {
            let Some(store) = self.slots.shared.clone() else {
                return;
            };
            let owner = self.owner.key();
            // Freed in the background (a drop cannot wait); `try_acquire` on this replica waits for it.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let done = self.slots.start_release(&owner);
                handle.spawn(async move {
                    let _done = ReleaseDone(Some(Box::new(done)));
                    // A live replica's lease does not expire: a slot whose release failed would stay taken
                    // until this replica stops, so retry a while before giving up.
                    let mut delay = std::time::Duration::from_millis(100);
                    for attempt in 1..=6 {
                        match store
                            .release_request_slot(owner.clone(), slot_no, request_id.clone())
                            .await
                        {
                            Ok(_) => return,
                            Err(e) if attempt == 6 => tracing::error!(
                                error = %e,
                                owner,
                                "cannot free a request slot; it stays taken until this replica stops"
                            ),
                            Err(_) => {
                                tokio::time::sleep(delay).await;
                                delay *= 2;
                            }
                        }
                    }
                });
            }
            return;
        }
        let mut held = self.slots.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.owner);
            }
        }
    }
}

/// What the request was rewritten to and how it will be billed.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub api: Api,
    /// The bounded request in the client's API (the model name and the deployment's details are set per attempt).
    pub body: serde_json::Map<String, Value>,
    pub stream: bool,
    /// Whether the client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    /// The gateway's bound on this request (its output part is written into `body`).
    pub bound: Bound,
    /// An Anthropic request as chat completions, made once when a deployment of the model needs it translated.
    chat_translation: Option<serde_json::Map<String, Value>>,
}

/// A request as one deployment receives it.
#[derive(Debug)]
pub struct Outgoing {
    /// Under the upstream's base URL.
    pub path: &'static str,
    pub body: Vec<u8>,
    /// Sent in another API than the client's (Messages as chat completions).
    pub translated: bool,
    /// Sent in Anthropic's API (its version header goes with it).
    pub anthropic: bool,
}

impl Prepared {
    /// The request for `upstream`, naming `upstream_model`: the output bound in the field(s) it reads, and an
    /// Anthropic request translated to chat completions when it does not serve `/v1/messages`.
    pub fn for_upstream(
        &self,
        upstream_model: &str,
        upstream: &Upstream,
    ) -> Result<Outgoing, BadParam> {
        let translate =
            self.api == Api::Messages && upstream.messages_api == MessagesApi::Translate;
        let (api, mut body) = if translate {
            let chat = match &self.chat_translation {
                Some(chat) => chat.clone(),
                None => anthropic::request_to_chat(&self.body)?,
            };
            (Api::Chat, chat)
        } else {
            (self.api, self.body.clone())
        };
        if api == Api::Chat {
            bound::write_output_limit(
                &mut body,
                upstream.output_limit_field,
                self.bound.output_tokens_per_choice,
            );
        }
        if self.stream && matches!(api, Api::Chat | Api::Completions) {
            let options = body.entry("stream_options").or_insert_with(|| json!({}));
            if let Some(options) = options.as_object_mut() {
                options.insert("include_usage".into(), json!(true));
            }
        }
        body.insert("model".into(), json!(upstream_model));
        let body = serde_json::to_vec(&body).map_err(|e| BadParam {
            param: "body",
            message: e.to_string(),
        })?;
        Ok(Outgoing {
            path: api.upstream_path(),
            body,
            translated: translate,
            anthropic: api == Api::Messages,
        })
    }
}

/// Bounds a client body of `api` (`body_len` bytes as received) for the upstream (see [`bound`]). An Anthropic
/// request that a deployment of `model` must receive as chat completions is translated here, once, so one that
/// cannot be is refused before anything is reserved or paid.
pub fn prepare(
    api: Api,
    mut body: serde_json::Map<String, Value>,
    body_len: usize,
    model: &Model,
    settings: &Settings,
    payer: Payer,
) -> Result<Prepared, BoundError> {
    let bad = |param: &'static str, message: &str| BadParam {
        param,
        message: message.to_string(),
    };
    match api {
        Api::Chat | Api::Messages if !body.get("messages").is_some_and(Value::is_array) => {
            return Err(bad("messages", "`messages` must be an array of messages").into());
        }
        Api::Completions if !body.contains_key("prompt") => {
            return Err(bad("prompt", "`prompt` is required").into());
        }
        Api::Embeddings
            if !body
                .get("input")
                .is_some_and(|v| v.is_string() || v.is_array()) =>
        {
            return Err(bad(
                "input",
                "`input` must be a string or an array of strings or token ids",
            )
            .into());
        }
        Api::Responses
            if !body
                .get("input")
                .is_some_and(|v| v.is_string() || v.is_array()) =>
        {
            return Err(bad(
                "input",
                "`input` must be a string or an array of input items",
            )
            .into());
        }
        _ => {}
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "`stream` must be a boolean").into()),
    };
    if stream && api == Api::Embeddings {
        return Err(bad("stream", "embeddings are not streamed").into());
    }
    let bound = bound::bound_request(
        api,
        &mut body,
        body_len,
        model,
        OutputLimitField::Both,
        payer,
    )?;
    let mut client_wants_usage = false;
    if stream && matches!(api, Api::Chat | Api::Completions) {
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if !options.is_object() {
            return Err(bad("stream_options", "`stream_options` must be an object").into());
        }
        client_wants_usage = options["include_usage"].as_bool() == Some(true);
    }
    let translated_somewhere = model.deployments.iter().any(|d| {
        settings
            .upstreams
            .get(d.upstream)
            .is_some_and(|u| u.messages_api == MessagesApi::Translate)
    });
    let chat_translation = if api == Api::Messages && translated_somewhere {
        Some(anthropic::request_to_chat(&body)?)
    } else {
        None
    };
    Ok(Prepared {
        api,
        body,
        stream,
        client_wants_usage,
        bound,
        chat_translation,
    })
}

/// How a request is billed, and what settles it.
pub enum Charge {
    /// Paid per request with an x402 payment (recorded by the payment itself): nothing to settle here.
    PerRequest { model: String },
    /// A pool key: nothing to charge; the subscription's slot is held until the response ends.
    Subscription { usage: NewUsage, slot: SlotGuard },
    /// A credit key with `reserved` already debited; the account's slot is held until the response ends.
    Credit {
        usage: NewUsage,
        usage_id: i64,
        reserved: Usdc,
        prices: Prices,
        slot: SlotGuard,
    },
    /// Paid per token with an x402 `upto` authorization of `reserved` (this request's worst-case cost): the
    /// metered cost, computed exactly as for a credit key, is settled by `payment` when the answer ends.
    Upto {
        model: String,
        reserved: Usdc,
        prices: Prices,
        payment: Box<dyn SettlePayment>,
    },
}

/// Settles a keyless payment for the metered cost once the answer ended (x402 `upto`).
pub trait SettlePayment: Send {
    /// Settles `cost` for `outcome`; the answer is what tells the client (a `PAYMENT-RESPONSE`).
    fn settle(
        self: Box<Self>,
        outcome: Outcome,
        cost: Usdc,
    ) -> futures::future::BoxFuture<'static, PaymentReceipt>;
}

/// What a settled keyless payment tells the client: the `PAYMENT-RESPONSE` header value (base64 JSON) and the
/// same JSON, for a stream's final event.
#[derive(Debug, Clone)]
pub struct PaymentReceipt {
    pub header_name: &'static str,
    pub header_value: String,
    pub json: Value,
}

impl PaymentReceipt {
    /// The final SSE event of a stream paid with `upto` (its headers left before the cost was known):
    /// `event: x402.payment-response` with `{"paymentResponse": <header value>, ...the decoded response}`.
    pub fn sse_event(&self) -> Bytes {
        let mut data = match &self.json {
            Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        data.insert(
            "paymentResponse".into(),
            Value::String(self.header_value.clone()),
        );
        Bytes::from(format!(
            "event: {PAYMENT_RESPONSE_EVENT}\ndata: {}\n\n",
            Value::Object(data)
        ))
    }
}

/// The name of a stream's final payment event.
pub const PAYMENT_RESPONSE_EVENT: &str = "x402.payment-response";

/// What settling a request produced: for a credit key (charged, balance); for an upto payment its receipt.
#[derive(Debug, Default)]
pub struct Settled {
    pub credit: Option<(Usdc, Usdc)>,
    pub payment: Option<PaymentReceipt>,
}

/// The open bill of one request; `settle` closes it exactly once.
pub struct Meter {
    _in_flight: crate::metrics::InFlight,
    /// The deployment answering, counted in flight until the meter is settled or dropped.
    attempt: Option<Attempt>,
    /// The key's per-minute token budget taken at the bound: what was not used goes back at settlement.
    rate: Option<key_rates::Admission>,
    store: Store,
    billing: Option<Charge>,
    started: Instant,
    overhead_us: u64,
    bound: Bound,
    now: i64,
    /// The API the request came in on, the deployment that answered and when its headers came (the console's).
    api: Option<&'static str>,
    deployment: Option<String>,
    first_byte_ms: Option<u64>,
}

impl Meter {
    pub fn new(store: Store, billing: Charge, started: Instant, bound: Bound, now: i64) -> Meter {
        Meter {
            _in_flight: crate::metrics::InFlight::start(),
            attempt: None,
            rate: None,
            store,
            billing: Some(billing),
            started,
            overhead_us: 0,
            bound,
            now,
            api: None,
            deployment: None,
            first_byte_ms: None,
        }
    }

    /// The API the request came in on.
    pub fn set_api(&mut self, api: Api) {
        self.api = Some(api.name());
    }

    /// The per-minute budget this request took; settled with the tokens it really used.
    pub fn set_rate_admission(&mut self, admission: key_rates::Admission) {
        self.rate = Some(admission);
    }

    /// Gives back to the key's per-minute token budget what `outcome` did not use.
    fn settle_rate(&mut self, outcome: &Outcome) {
        if let Some(admission) = self.rate.take() {
            admission.settle(
                outcome
                    .prompt_tokens
                    .saturating_add(outcome.completion_tokens),
                self.now.saturating_mul(1000),
            );
        }
    }

    /// The deployment answering this request (in flight until the meter closes).
    pub fn set_attempt(&mut self, attempt: Attempt) {
        // Called when the deployment's response headers have arrived: the request's time to first byte.
        self.first_byte_ms = Some(self.started.elapsed().as_millis() as u64);
        self.deployment = Some(attempt.deployment.upstream_name.clone());
        self.attempt = Some(attempt);
    }

    /// Time the gateway spent before the upstream was called.
    pub fn set_overhead(&mut self, overhead: std::time::Duration) {
        self.overhead_us = overhead.as_micros() as u64;
    }

    /// Builds the outcome from what was observed: `usage` when the upstream reported it; otherwise the prompt at
    /// its bound and the output actually delivered. Nothing is ever charged beyond the reservation; an upstream
    /// that went past the bound (or a stream the gateway cut there: status `overrun_cut`) is charged the whole
    /// reservation and recorded as an overrun.
    pub fn outcome(
        &self,
        usage: Option<Usage>,
        delivered_completion: u64,
        status: &'static str,
        http_status: Option<u16>,
    ) -> Outcome {
        let (prompt, completion, source) = match usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens, "upstream"),
            None if delivered_completion == 0 && status == "upstream_error" => (0, 0, "none"),
            // The client hung up mid-stream: the gateway stopped reading, so what the upstream generated after the
            // last byte read (it runs ahead by its socket buffers) is unknown. It can be no more than the bound,
            // which is what is charged: the reservation.
            None if status == "client_closed" => (
                self.bound.prompt_tokens,
                self.bound.output_tokens(),
                "reservation",
            ),
            None => (self.bound.prompt_tokens, delivered_completion, "estimated"),
        };
        let overrun_tokens = completion.saturating_sub(self.bound.output_tokens());
        let overrun =
            status == "overrun_cut" || overrun_tokens > 0 || prompt > self.bound.prompt_tokens;
        let (cost, uncharged) = match &self.billing {
            Some(
                Charge::Credit {
                    prices, reserved, ..
                }
                | Charge::Upto {
                    prices, reserved, ..
                },
            ) => {
                let full = prices.cost(prompt, completion);
                let charged = if overrun {
                    *reserved
                } else {
                    full.min(*reserved)
                };
                (
                    charged,
                    Usdc(full.atomic().saturating_sub(charged.atomic()).max(0)),
                )
            }
            _ => (Usdc::ZERO, Usdc::ZERO),
        };
        Outcome {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost,
            status,
            usage_source: source,
            http_status,
            duration_ms: self.started.elapsed().as_millis() as u64,
            overhead_us: self.overhead_us,
            overrun_tokens: if overrun { overrun_tokens.max(1) } else { 0 },
            uncharged,
            api: self.api,
            deployment: self.deployment.clone(),
            first_byte_ms: self.first_byte_ms,
        }
    }

    /// Writes the outcome (and for credit keys the refund; for upto payments the settlement): (charged, balance)
    /// for credit keys, the receipt for upto payments.
    pub async fn settle(mut self, outcome: Outcome) -> Settled {
        self.settle_rate(&outcome);
        let Some(billing) = self.billing.take() else {
            return Settled::default();
        };
        settle(self.store.clone(), billing, outcome, self.now).await
    }

    /// Whether settling pays something the client must be told of after the answer (x402 `upto`).
    pub fn has_receipt(&self) -> bool {
        matches!(self.billing, Some(Charge::Upto { .. }))
    }

    /// Settles in the background (from `Drop` paths that cannot wait).
    pub fn settle_later(mut self, outcome: Outcome) {
        self.settle_rate(&outcome);
        if let Some(billing) = self.billing.take() {
            let store = self.store.clone();
            let now = self.now;
            tokio::spawn(async move {
                settle(store, billing, outcome, now).await;
            });
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // A meter dropped unsettled (a panic between reserve and response): return the whole reservation.
        if let Some(billing) = self.billing.take() {
            let outcome = Outcome {
                status: "client_closed",
                usage_source: "none",
                ..Outcome::default()
            };
            let store = self.store.clone();
            let now = self.now;
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    settle(store, billing, outcome, now).await;
                });
            }
        }
    }
}

async fn settle(store: Store, billing: Charge, outcome: Outcome, now: i64) -> Settled {
    let model = match &billing {
        Charge::PerRequest { model } | Charge::Upto { model, .. } => model.clone(),
        Charge::Subscription { usage, .. } | Charge::Credit { usage, .. } => usage.model.clone(),
    };
    let (status, prompt, completion, overhead, overrun) = (
        outcome.http_status.unwrap_or(0),
        outcome.prompt_tokens,
        outcome.completion_tokens,
        outcome.overhead_us,
        outcome.overrun_tokens,
    );
    if overrun > 0 {
        // The upstream generated past the bound the gateway wrote into the request: it ignores caps.
        tracing::warn!(
            model = %model,
            overrun_tokens = overrun,
            status = outcome.status,
            "upstream went past the request's output bound (charged the reservation, no more)"
        );
        crate::metrics::record_overrun(&model, overrun, outcome.uncharged.atomic().max(0) as u64);
    }
    let mut receipt = None;
    let result = match billing {
        Charge::PerRequest { .. } => Ok(None),
        Charge::Upto { payment, .. } => {
            let cost = outcome.cost;
            let r = payment.settle(outcome.clone(), cost).await;
            receipt = Some(r);
            Ok(Some((cost, Usdc::ZERO)))
        }
        Charge::Subscription { usage, slot } => {
            drop(slot);
            crate::billing::metering::record_subscription(&store, usage, outcome)
                .await
                .map(|()| None)
        }
        Charge::Credit {
            usage,
            usage_id,
            reserved,
            slot,
            ..
        } => {
            let settled = crate::billing::metering::settle_credit(
                &store,
                usage_id,
                usage.account,
                usage.key_id,
                reserved,
                outcome,
                now,
            )
            .await
            .map(|s| Some((s.charged, s.balance)));
            // The slot is freed only once the request's money is settled, so the in-flight cap also bounds
            // reservations not yet returned.
            drop(slot);
            settled
        }
    };
    let settled = match result {
        Ok(v) => v,
        Err(e) => {
            // The reservation stays debited; the row stays `in_flight` and is refunded at the next start.
            tracing::error!(error = %e, "could not settle a request");
            None
        }
    };
    let spent = settled.map_or(0, |(charged, _)| charged.atomic().max(0) as u64);
    crate::metrics::record_proxy_request(
        &model,
        status,
        prompt,
        completion,
        spent,
        overhead as f64 / 1e6,
    );
    match receipt {
        Some(payment) => Settled {
            credit: None,
            payment: Some(payment),
        },
        None => Settled {
            credit: settled,
            payment: None,
        },
    }
}

/// The body of a streamed response: forwards complete SSE events through the usage tap and settles the meter
/// when the stream ends, fails, is cut at the output bound, or is dropped because the client went away.
pub struct MeteredStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
    tap: UsageTap,
    dialect: Dialect,
    meter: Option<Meter>,
    finished: bool,
    /// Rewrites the upstream's events into the client's API (Anthropic events from a chat stream).
    reframe: Option<Box<dyn Reframe>>,
    /// An upto payment being settled after the last event: its `x402.payment-response` event ends the stream.
    trailer: Option<futures::future::BoxFuture<'static, Bytes>>,
}

/// Rewrites complete SSE events of one API into another's, as they pass.
pub trait Reframe: Send {
    /// Complete events in, the events to send now out.
    fn events(&mut self, events: &[u8]) -> Bytes;
    /// The upstream stream ended without its proper end: what closes the client's stream, if anything.
    fn end(&mut self) -> Bytes;
}

impl Reframe for anthropic::StreamTranslator {
    fn events(&mut self, events: &[u8]) -> Bytes {
        self.translate(events)
    }
    fn end(&mut self) -> Bytes {
        self.finish()
    }
}

impl MeteredStream {
    /// `dialect`: the upstream's event format; `output_limit`: output chunks (all choices together) after which the
    /// stream is cut.
    pub fn new(
        inner: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
        dialect: Dialect,
        strip_usage_event: bool,
        output_limit: u64,
        meter: Meter,
    ) -> MeteredStream {
        MeteredStream {
            inner,
            tap: UsageTap::for_dialect(dialect, strip_usage_event).with_output_limit(output_limit),
            dialect,
            meter: Some(meter),
            finished: false,
            reframe: None,
            trailer: None,
        }
    }

    /// Sends the events through `reframe` on their way to the client.
    pub fn reframed(mut self, reframe: Box<dyn Reframe>) -> MeteredStream {
        self.reframe = Some(reframe);
        self
    }

    /// Bytes on their way to the client.
    fn out(&mut self, bytes: Bytes) -> Bytes {
        match &mut self.reframe {
            Some(r) if !bytes.is_empty() => r.events(&bytes),
            _ => bytes,
        }
    }

    /// The gateway's own error event, in the upstream's dialect (a reframe turns it into the client's).
    fn error_event(&self, message: &str, code: &str) -> String {
        match self.dialect {
            Dialect::OpenAi => {
                let event = json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": code}});
                format!("data: {event}\n\n")
            }
            Dialect::Responses => {
                let event =
                    json!({"type": "error", "code": code, "message": message, "param": null});
                format!("event: error\ndata: {event}\n\n")
            }
            Dialect::Anthropic => {
                let event =
                    json!({"type": "error", "error": {"type": "api_error", "message": message}});
                format!("event: error\ndata: {event}\n\n")
            }
        }
    }

    fn close(&mut self, status: &'static str) {
        if let Some(meter) = self.meter.take() {
            let outcome = meter.outcome(self.tap.usage, self.tap.content_chunks, status, Some(200));
            if meter.has_receipt() {
                // Settled before the stream ends, so its receipt is the stream's last event.
                self.trailer = Some(Box::pin(async move {
                    meter
                        .settle(outcome)
                        .await
                        .payment
                        .map(|p| p.sse_event())
                        .unwrap_or_default()
                }));
            } else {
                meter.settle_later(outcome);
            }
        }
    }

    /// Ends the stream at the output bound: what was forwarded, then an error event and `[DONE]`, and the
    /// upstream connection is dropped (which cancels the generation).
    fn cut_at_bound(&mut self, forwarded: Bytes) -> Bytes {
        self.finished = true;
        self.close("overrun_cut");
        // Drop the upstream response now: hyper closes the connection, the upstream stops generating.
        self.inner = Box::pin(futures::stream::empty());
        let mut out = forwarded.to_vec();
        out.extend_from_slice(
            self.error_event(
                "the upstream generated more output than this request's bound; the stream was cut there",
                "output_bound_exceeded",
            )
            .as_bytes(),
        );
        if self.dialect == Dialect::OpenAi {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        self.out_ending(Bytes::from(out))
    }

    /// The last bytes of a stream that did not end properly, on their way to the client: a reframed stream gets
    /// what closes it in the client's API after them.
    fn out_ending(&mut self, bytes: Bytes) -> Bytes {
        let out = self.out(bytes);
        match &mut self.reframe {
            Some(r) => {
                let mut all = out.to_vec();
                all.extend_from_slice(&r.end());
                Bytes::from(all)
            }
            None => out,
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.finished {
                if let Some(trailer) = self.trailer.as_mut() {
                    let Poll::Ready(bytes) = trailer.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    self.trailer = None;
                    if !bytes.is_empty() {
                        return Poll::Ready(Some(Ok(bytes)));
                    }
                }
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    let out = self.tap.feed(&bytes);
                    if self.tap.over_limit {
                        let out = self.cut_at_bound(out);
                        return Poll::Ready(Some(Ok(out)));
                    }
                    let out = self.out(out);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.finished = true;
                    let rest = self.tap.finish();
                    if self.tap.over_limit {
                        let out = self.cut_at_bound(rest);
                        return Poll::Ready(Some(Ok(out)));
                    }
                    let status = if e.is_timeout() {
                        "upstream_timeout"
                    } else {
                        "upstream_cut"
                    };
                    self.close(status);
                    let timed_out = e.is_timeout();
                    tracing::warn!(error = %e.without_url(), "upstream stream ended with an error");
                    let message = format!(
                        "the upstream stream failed: {}",
                        if timed_out {
                            "timed out"
                        } else {
                            "connection closed"
                        }
                    );
                    let mut out = rest.to_vec();
                    out.extend_from_slice(self.error_event(&message, status).as_bytes());
                    let out = self.out_ending(Bytes::from(out));
                    return Poll::Ready(Some(Ok(out)));
                }
                Poll::Ready(None) => {
                    self.finished = true;
                    let rest = self.tap.finish();
                    if self.tap.over_limit {
                        let out = self.cut_at_bound(rest);
                        return Poll::Ready(Some(Ok(out)));
                    }
                    let status = if self.tap.done { "ok" } else { "upstream_cut" };
                    self.close(status);
                    let out = if status == "ok" {
                        self.out(rest)
                    } else {
                        self.out_ending(rest)
                    };
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                    // Finished: the next turn sends the payment receipt, if any, then ends.
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // Still open: the client went away. Dropping `inner` closes the upstream connection, cancelling it.
        self.close("client_closed");
        // A payment not yet settled (the client left before its receipt) is settled all the same.
        if let Some(trailer) = self.trailer.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(trailer);
        }
    }
}
