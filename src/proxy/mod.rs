//! The gated inference proxy: upstream clients, per-key concurrency slots, request rewriting, and metering of
//! what the upstream actually produced (see `sse` for streams, `pricing` for money, `windows` for pool hours).
//!
//! Credit requests reserve their worst-case cost before anything is forwarded and settle the real cost when the
//! response ends — completed, failed, cut by the upstream or dropped by the client (the metered body's `Drop`
//! settles then). When no usage object arrives, the policy is **estimated**: prompt tokens are estimated from the
//! request text (4 bytes a token, rounded up) and completion tokens are the content chunks actually delivered;
//! the usage row says `usage_source = estimated`.

pub mod pricing;
pub mod sse;
pub mod windows;

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use alloy::transports::http::reqwest;
use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};

use crate::config::{Model, Settings};
use crate::store::Store;
use crate::store::usage::{self, NewUsage, Outcome};
use crate::usdc::Usdc;
use pricing::Prices;
use sse::{Usage, UsageTap};

/// Tokens added to a request's byte length when reserving: chat templates add tokens the text does not show.
pub const TEMPLATE_TOKEN_MARGIN: u64 = 256;

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

/// One HTTP client per upstream (each with its own timeouts) and the per-key concurrency slots.
pub struct Proxy {
    clients: Vec<reqwest::Client>,
    slots: Slots,
}

impl Proxy {
    pub fn new(settings: &Settings) -> Result<Proxy, reqwest::Error> {
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
        Ok(Proxy {
            clients,
            slots: Slots::default(),
        })
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Posts `body` to the model's upstream `/chat/completions`.
    pub async fn send(
        &self,
        settings: &Settings,
        model: &Model,
        body: Vec<u8>,
        request_id: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let upstream = &settings.upstreams[model.upstream];
        let client = &self.clients[model.upstream];
        let mut req = client
            .post(format!("{}/chat/completions", upstream.base_url))
            .header("content-type", "application/json")
            .header("x-request-id", request_id)
            .body(body);
        if let Some(key) = &upstream.api_key {
            req = req.bearer_auth(key);
        }
        req.send().await.map_err(|e| classify(&upstream.name, e))
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

/// Keys with a request in flight (pool keys allow one at a time).
#[derive(Debug, Clone, Default)]
pub struct Slots(Arc<Mutex<HashSet<i64>>>);

/// Holds a key's slot; dropping it (completion, error, panic, disconnect) frees the slot.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Slots,
    key: i64,
}

impl Slots {
    pub fn try_acquire(&self, key: i64) -> Option<SlotGuard> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(key).then(|| SlotGuard {
            slots: self.clone(),
            key,
        })
    }

    pub fn held(&self, key: i64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Estimated prompt tokens of a chat request: its message text at 4 bytes a token, rounded up.
pub fn estimate_prompt_tokens(body: &Value) -> u64 {
    let mut bytes = 0usize;
    for m in body["messages"].as_array().into_iter().flatten() {
        match &m["content"] {
            Value::String(s) => bytes += s.len(),
            Value::Array(parts) => {
                bytes += parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .map(str::len)
                    .sum::<usize>()
            }
            _ => {}
        }
    }
    (bytes as u64).div_ceil(4)
}

/// What the request was rewritten to and how it will be billed.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The body sent upstream.
    pub body: Vec<u8>,
    pub stream: bool,
    /// Whether the client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    /// Output tokens the request may produce (client's `max_tokens`, or the model's cap when injected).
    pub max_output_tokens: Option<u64>,
    pub estimated_prompt_tokens: u64,
}

/// Why a request body cannot be forwarded, with the offending parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub param: &'static str,
    pub message: String,
}

/// Rewrites a client body for the upstream: the upstream's model name, `stream_options.include_usage` merged in
/// for streams, and `max_tokens` set to `cap` when the client gives no limit and `cap` is set.
pub fn prepare(
    mut body: serde_json::Map<String, Value>,
    model: &Model,
    cap: Option<u64>,
) -> Result<Prepared, BadParam> {
    let bad = |param: &'static str, message: &str| BadParam {
        param,
        message: message.to_string(),
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(bad(
            "messages",
            "`messages` must be an array of chat messages",
        ));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "`stream` must be a boolean")),
    };
    let mut max_output = None;
    for field in ["max_tokens", "max_completion_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => max_output = Some(max_output.map_or(n, |m: u64| m.min(n))),
                _ => {
                    return Err(BadParam {
                        param: if field == "max_tokens" {
                            "max_tokens"
                        } else {
                            "max_completion_tokens"
                        },
                        message: format!("`{field}` must be a positive integer"),
                    });
                }
            },
        }
    }
    if max_output.is_none()
        && let Some(cap) = cap
    {
        body.insert("max_tokens".into(), json!(cap));
        max_output = Some(cap);
    }
    let mut client_wants_usage = false;
    if stream {
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if !options.is_object() {
            return Err(bad("stream_options", "`stream_options` must be an object"));
        }
        client_wants_usage = options["include_usage"].as_bool() == Some(true);
        options["include_usage"] = json!(true);
    }
    body.insert("model".into(), json!(model.upstream_model));
    let estimated_prompt_tokens = estimate_prompt_tokens(&Value::Object(body.clone()));
    let body = serde_json::to_vec(&body).map_err(|e| BadParam {
        param: "body",
        message: e.to_string(),
    })?;
    Ok(Prepared {
        body,
        stream,
        client_wants_usage,
        max_output_tokens: max_output,
        estimated_prompt_tokens,
    })
}

/// Usage from a non-streamed response body, if it has one.
pub fn usage_of_response(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| serde_json::from_value(v.get("usage")?.clone()).ok())
}

/// Completion tokens estimated from a non-streamed response's text (4 bytes a token).
pub fn estimate_completion_tokens(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let bytes: usize = v["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["message"]["content"].as_str())
        .map(str::len)
        .sum();
    (bytes as u64).div_ceil(4)
}

/// How a request is billed, and what settles it.
pub enum Charge {
    /// Paid per request with an x402 payment (recorded by the payment itself): nothing to settle here.
    PerRequest { model: String },
    /// A pool key: nothing to charge; the slot is held until the response ends.
    Subscription { usage: NewUsage, slot: SlotGuard },
    /// A credit key with `reserved` already debited.
    Credit {
        usage: NewUsage,
        usage_id: i64,
        reserved: Usdc,
        prices: Prices,
    },
}

/// The open bill of one request; `settle` closes it exactly once.
pub struct Meter {
    _in_flight: crate::metrics::InFlight,
    store: Store,
    billing: Option<Charge>,
    started: Instant,
    overhead_us: u64,
    estimated_prompt_tokens: u64,
    now: i64,
}

impl Meter {
    pub fn new(
        store: Store,
        billing: Charge,
        started: Instant,
        estimated_prompt_tokens: u64,
        now: i64,
    ) -> Meter {
        Meter {
            _in_flight: crate::metrics::InFlight::start(),
            store,
            billing: Some(billing),
            started,
            overhead_us: 0,
            estimated_prompt_tokens,
            now,
        }
    }

    /// Time the gateway spent before the upstream was called.
    pub fn set_overhead(&mut self, overhead: std::time::Duration) {
        self.overhead_us = overhead.as_micros() as u64;
    }

    /// Builds the outcome from what was observed: `usage` when the upstream reported it, else the estimate.
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
            None => (
                self.estimated_prompt_tokens,
                delivered_completion,
                "estimated",
            ),
        };
        let cost = match &self.billing {
            Some(Charge::Credit { prices, .. }) => prices.cost(prompt, completion),
            _ => Usdc::ZERO,
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
        }
    }

    /// Writes the outcome (and for credit keys the refund); returns (charged, balance) for credit keys.
    pub async fn settle(mut self, outcome: Outcome) -> Option<(Usdc, Usdc)> {
        let billing = self.billing.take()?;
        settle(self.store.clone(), billing, outcome, self.now).await
    }

    /// Settles in the background (from `Drop` paths that cannot wait).
    pub fn settle_later(mut self, outcome: Outcome) {
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

async fn settle(store: Store, billing: Charge, outcome: Outcome, now: i64) -> Option<(Usdc, Usdc)> {
    let model = match &billing {
        Charge::PerRequest { model } => model.clone(),
        Charge::Subscription { usage, .. } | Charge::Credit { usage, .. } => usage.model.clone(),
    };
    let (status, prompt, completion, overhead) = (
        outcome.http_status.unwrap_or(0),
        outcome.prompt_tokens,
        outcome.completion_tokens,
        outcome.overhead_us,
    );
    let result = match billing {
        Charge::PerRequest { .. } => Ok(None),
        Charge::Subscription { usage, slot } => {
            drop(slot);
            store
                .write_with(
                    store.metering_durability(),
                    move |tx| -> Result<_, crate::store::StoreError> {
                        usage::record_subscription(tx, &usage, &outcome)?;
                        Ok(None)
                    },
                )
                .await
        }
        Charge::Credit {
            usage,
            usage_id,
            reserved,
            ..
        } => {
            store
                .write_with(
                    store.metering_durability(),
                    move |tx| -> Result<_, crate::store::StoreError> {
                        let settled = usage::settle_credit(
                            tx,
                            usage_id,
                            &usage.account,
                            usage.key_id,
                            reserved,
                            &outcome,
                            now,
                        )
                        .map_err(|e| crate::store::StoreError::Task(e.to_string()))?;
                        Ok(Some((settled.charged, settled.balance)))
                    },
                )
                .await
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
    settled
}

/// The body of a streamed response: forwards complete SSE events through the usage tap and settles the meter
/// when the stream ends, fails, or is dropped because the client went away.
pub struct MeteredStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
    tap: UsageTap,
    meter: Option<Meter>,
    finished: bool,
}

impl MeteredStream {
    pub fn new(
        inner: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
        strip_usage_event: bool,
        meter: Meter,
    ) -> MeteredStream {
        MeteredStream {
            inner,
            tap: UsageTap::new(strip_usage_event),
            meter: Some(meter),
            finished: false,
        }
    }

    fn close(&mut self, status: &'static str) {
        if let Some(meter) = self.meter.take() {
            let outcome = meter.outcome(self.tap.usage, self.tap.content_chunks, status, Some(200));
            meter.settle_later(outcome);
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    let out = self.tap.feed(&bytes);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.finished = true;
                    let rest = self.tap.finish();
                    let status = if e.is_timeout() {
                        "upstream_timeout"
                    } else {
                        "upstream_cut"
                    };
                    self.close(status);
                    tracing::warn!(error = %e, "upstream stream ended with an error");
                    let event = json!({"error": {
                        "message": format!("the upstream stream failed: {}", if e.is_timeout() { "timed out" } else { "connection closed" }),
                        "type": "upstream_error", "param": null, "code": status,
                    }});
                    let mut out = rest.to_vec();
                    out.extend_from_slice(format!("data: {event}\n\n").as_bytes());
                    return Poll::Ready(Some(Ok(Bytes::from(out))));
                }
                Poll::Ready(None) => {
                    self.finished = true;
                    let rest = self.tap.finish();
                    let status = if self.tap.done { "ok" } else { "upstream_cut" };
                    self.close(status);
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // Still open: the client went away. Dropping `inner` closes the upstream connection, cancelling it.
        self.close("client_closed");
    }
}
