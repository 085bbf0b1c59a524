//! What unpaid traffic may cost: per-client-IP rate limits, body size limits and request timeouts, enforced by one
//! middleware in front of every route (`[limits]` in the config).
//!
//! - **Rate limits** (token buckets per client IP, IPv6 by /64): *keyless* requests — anything without a valid API
//!   key or operator token — share one bucket per IP; *claim attempts* (`/api/agent/{subscribe-pool,topup,
//!   keys/rotate}` and the `/x402/*` purchases) another. Each limit also has one bucket for all clients together,
//!   so a flood from many addresses cannot take more than that either (the operator's probes `/healthz`,
//!   `/readyz`, `/metrics` only meet their address's bucket). A request with a valid key is never counted, so key
//!   holders are not slowed by other people's floods. A claim or an x402-paid request that succeeds (200) gives its
//!   token back: only unpaid and failed attempts use the budget. Over the limit: 429 with `Retry-After` (whole
//!   seconds).
//! - **Body limits** on every route: 4 MiB for `POST /v1/chat/completions`, 16 KiB for the rest of `/v1/*`,
//!   `/api/agent/*` and `/x402/*`, 1 KiB for everything else (no other route reads a body). The body is read here,
//!   before the handler, so each 413 has its route family's shape and nothing is half-read.
//! - **Timeouts**: the body must arrive within `request_timeout_secs` (408), and the answer must start within the
//!   same deadline (503) — except `POST /v1/chat/completions`, whose upstream has per-read timeouts and whose
//!   streams may run long. A handler that times out is not cancelled: it runs to completion in its own task, so a
//!   claim or an x402 settlement is never cut in half; the client retries and gets the recorded outcome.
//!
//! Every refusal uses the shape of its route family: the OpenAI error object on `/v1/*`, `{success: false, error}`
//! on `/api/agent/*` and `/x402/*` (with the x402 CORS headers), `{error: {code, message}}` elsewhere.
//!
//! The per-IP buckets live in a fixed number of shards, each behind its own short-lived lock (no global lock; the
//! all-clients bucket is one atomic word), and each shard holds at most its share of `max_tracked_clients`: when
//! full, buckets that have refilled (idle clients, which lose nothing by being forgotten) are dropped first, then
//! the fullest one. Time comes from the injected billing clock (whole seconds), so tests move it instead of
//! sleeping.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::AppState;
use crate::billing::{AuthorizedKey, Clock};
use crate::config::{IpNet, Rate, RateLimit};

/// Body limit of routes that read no body (GET routes, operator and discovery pages, unknown paths).
pub const SMALL_BODY_BYTES: usize = 1024;
/// Body limit of `/api/agent/*`, `/x402/*` and `/v1/*` other than chat completions.
pub const FORM_BODY_BYTES: usize = super::agent::MAX_BODY_BYTES;
/// Body limit of `POST /v1/chat/completions`.
pub const CHAT_BODY_BYTES: usize = super::openai::MAX_BODY_BYTES;
/// `Retry-After` of a 503 timeout: the work goes on in the background; a retry finds its outcome.
const TIMEOUT_RETRY_AFTER_SECS: u64 = 5;

/// One token, in the bucket's integer units (a per-minute rate refills `per_minute × 1000` units a second).
const UNIT: u64 = 60_000;
/// Shards of each limiter's map (a power of two).
const SHARDS: usize = 64;

/// A client as the limiter counts it: an IPv4 address, or an IPv6 /64 (one host's usual allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens × [`UNIT`].
    level: u64,
    /// Last refill, unix seconds.
    at: i64,
}

/// Token buckets per client, sharded, with a bound on how many clients are remembered.
pub struct RateLimiter {
    refill_per_sec: u64,
    capacity: u64,
    per_shard: usize,
    shards: Box<[Mutex<HashMap<ClientKey, Bucket>>]>,
    hasher: RandomState,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("refill_per_sec", &self.refill_per_sec)
            .field("capacity", &self.capacity)
            .field("tracked", &self.tracked())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `rate` per client; at most `max_clients` buckets (rounded up to a multiple of the shard count).
    pub fn new(rate: Rate, max_clients: usize) -> RateLimiter {
        RateLimiter {
            refill_per_sec: u64::from(rate.per_minute).max(1) * (UNIT / 60),
            capacity: u64::from(rate.burst).max(1) * UNIT,
            per_shard: max_clients.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: ClientKey) -> &Mutex<HashMap<ClientKey, Bucket>> {
        let i = (self.hasher.hash_one(key) as usize) & (SHARDS - 1);
        &self.shards[i]
    }

    fn refilled(&self, b: Bucket, now: i64) -> Bucket {
        let elapsed = u64::try_from(now.saturating_sub(b.at)).unwrap_or(0);
        Bucket {
            level: b
                .level
                .saturating_add(elapsed.saturating_mul(self.refill_per_sec))
                .min(self.capacity),
            // A clock that steps back does not move the bucket back (nor refill it twice).
            at: b.at.max(now),
        }
    }

    /// Takes one token for `key` at `now` (unix seconds): `Err(seconds)` until one is available when empty.
    pub fn take(&self, key: ClientKey, now: i64) -> Result<(), u64> {
        let mut map = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bucket = match map.get(&key) {
            Some(b) => self.refilled(*b, now),
            None => {
                if map.len() >= self.per_shard {
                    self.evict(&mut map, now);
                }
                Bucket {
                    level: self.capacity,
                    at: now,
                }
            }
        };
        let (bucket, result) = if bucket.level >= UNIT {
            (
                Bucket {
                    level: bucket.level - UNIT,
                    ..bucket
                },
                Ok(()),
            )
        } else {
            let missing = UNIT - bucket.level;
            (bucket, Err(missing.div_ceil(self.refill_per_sec).max(1)))
        };
        map.insert(key, bucket);
        result
    }

    /// Gives back the token of a request that turned out paid.
    pub fn refund(&self, key: ClientKey, now: i64) {
        let mut map = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = map.get(&key).copied() {
            let b = self.refilled(b, now);
            map.insert(
                key,
                Bucket {
                    level: b.level.saturating_add(UNIT).min(self.capacity),
                    ..b
                },
            );
        }
    }

    /// Makes room in a full shard: forgets buckets that have refilled (their clients lose nothing), and if every
    /// client is active, the one with the most tokens left.
    fn evict(&self, map: &mut HashMap<ClientKey, Bucket>, now: i64) {
        map.retain(|_, b| self.refilled(*b, now).level < self.capacity);
        if map.len() >= self.per_shard
            && let Some(fullest) = map
                .iter()
                .max_by_key(|(_, b)| self.refilled(**b, now).level)
                .map(|(k, _)| *k)
        {
            map.remove(&fullest);
        }
    }

    /// Clients remembered now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// The most clients this limiter remembers.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

/// One token bucket for all clients together, in one atomic word (level in the low 32 bits, the last refill in
/// the high 32 as seconds since `base`): no lock, a compare-and-swap per request.
pub struct SharedBucket {
    state: AtomicU64,
    base: i64,
    refill_per_sec: u64,
    capacity: u64,
}

impl std::fmt::Debug for SharedBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBucket")
            .field("refill_per_sec", &self.refill_per_sec)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl SharedBucket {
    /// Full at `now`. The burst is capped so the level fits 32 bits (the config allows at most
    /// [`crate::config::MAX_TOTAL_BURST`]).
    pub fn new(rate: Rate, now: i64) -> SharedBucket {
        let capacity = (u64::from(rate.burst).max(1) * UNIT).min(u64::from(u32::MAX));
        SharedBucket {
            state: AtomicU64::new(capacity),
            base: now,
            refill_per_sec: u64::from(rate.per_minute).max(1) * (UNIT / 60),
            capacity,
        }
    }

    fn offset(&self, now: i64) -> u64 {
        u64::try_from(now.saturating_sub(self.base))
            .unwrap_or(0)
            .min(u64::from(u32::MAX))
    }

    fn refilled(&self, word: u64, now: u64) -> (u64, u64) {
        let (level, at) = (word & u64::from(u32::MAX), word >> 32);
        let elapsed = now.saturating_sub(at);
        let level = level
            .saturating_add(elapsed.saturating_mul(self.refill_per_sec))
            .min(self.capacity);
        (level, at.max(now))
    }

    /// Takes one token at `now`: `Err(seconds)` until one is available when empty.
    pub fn take(&self, now: i64) -> Result<(), u64> {
        let now = self.offset(now);
        let mut word = self.state.load(Ordering::Relaxed);
        loop {
            let (level, at) = self.refilled(word, now);
            if level < UNIT {
                return Err((UNIT - level).div_ceil(self.refill_per_sec).max(1));
            }
            match self.state.compare_exchange_weak(
                word,
                (at << 32) | (level - UNIT),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => word = current,
            }
        }
    }

    /// Gives a token back.
    pub fn refund(&self, now: i64) {
        let now = self.offset(now);
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (level, at) = self.refilled(word, now);
                Some((at << 32) | level.saturating_add(UNIT).min(self.capacity))
            });
    }
}

/// One limit: a bucket per client, then one for all clients together.
#[derive(Debug)]
pub struct Limiter {
    pub per_ip: RateLimiter,
    pub total: SharedBucket,
}

/// Which bucket refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Ip,
    All,
}

impl Limiter {
    pub fn new(limit: RateLimit, max_clients: usize, now: i64) -> Limiter {
        Limiter {
            per_ip: RateLimiter::new(limit.per_ip, max_clients),
            total: SharedBucket::new(limit.total, now),
        }
    }

    /// A token from the client's bucket and (when `shared`) one from the shared bucket, or neither.
    pub fn take(&self, key: ClientKey, now: i64, shared: bool) -> Result<(), (Scope, u64)> {
        self.per_ip
            .take(key, now)
            .map_err(|wait| (Scope::Ip, wait))?;
        if !shared {
            return Ok(());
        }
        if let Err(wait) = self.total.take(now) {
            // The client is not charged for a refusal that is not its own doing.
            self.per_ip.refund(key, now);
            return Err((Scope::All, wait));
        }
        Ok(())
    }

    pub fn refund(&self, key: ClientKey, now: i64, shared: bool) {
        self.per_ip.refund(key, now);
        if shared {
            self.total.refund(now);
        }
    }
}

/// The limits of one running gateway (`AppState::limits`).
pub struct Limits {
    keyless: Option<Limiter>,
    claims: Option<Limiter>,
    request_timeout: Duration,
    trusted_proxies: Vec<IpNet>,
    clock: Clock,
    /// Whether the operator was told about `X-Forwarded-For` from an untrusted peer (once per process).
    warned_forwarded: AtomicBool,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("keyless", &self.keyless)
            .field("claims", &self.claims)
            .field("request_timeout", &self.request_timeout)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// The limits of `[limits]`, counting time with `clock`.
    pub fn new(settings: &crate::config::Limits, clock: Clock) -> Limits {
        let max = usize::try_from(settings.max_tracked_clients).unwrap_or(usize::MAX);
        let now = clock();
        Limits {
            keyless: settings.keyless.map(|l| Limiter::new(l, max, now)),
            claims: settings.claims.map(|l| Limiter::new(l, max, now)),
            request_timeout: settings.request_timeout,
            trusted_proxies: settings.trusted_proxies.clone(),
            clock,
            warned_forwarded: AtomicBool::new(false),
        }
    }

    /// The keyless limiter (`None` with `rate_limits = false`).
    pub fn keyless(&self) -> Option<&Limiter> {
        self.keyless.as_ref()
    }

    /// The claim-attempt limiter.
    pub fn claims(&self) -> Option<&Limiter> {
        self.claims.as_ref()
    }

    /// The client's address: the socket peer, or — when the peer is a trusted proxy — the right-most address in
    /// `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(peer) {
            if headers.contains_key("x-forwarded-for")
                && !self.warned_forwarded.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    peer = %peer,
                    "requests carry X-Forwarded-For from {peer}, which is not in limits.trusted_proxies: the rate \
                     limits count every client behind it as one. Behind a reverse proxy, list it there."
                );
            }
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if trusted(ip) => client = ip,
                Ok(ip) => return ip,
                // A hop we cannot read: the last address we could vouch for is the client.
                Err(_) => return client,
            }
        }
        client
    }
}

/// A route family: the error shape its clients read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `/v1/*`: `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
    /// `/v1/messages`: Anthropic's `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
    /// `/api/agent/*`: `{"success": false, "error": {"code", "message"}}`.
    Agent,
    /// `/x402/*`: the agent shape, with the x402 routes' CORS and cache headers.
    X402,
    /// Everything else: `{"error": {"code", "message"}}`.
    Plain,
}

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Keyless,
    Claims,
}

/// What the middleware needs to know about a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub family: Family,
    pub budget: Budget,
    /// Whether the bucket all clients share applies too. Not for the operator's probes (`/healthz`, `/readyz`,
    /// `/metrics`): a flood from many addresses must not make a load balancer or Prometheus see a dead gateway.
    pub shared: bool,
    pub body_limit: usize,
    /// The answer may stream for long (no total timeout on the handler).
    pub streams: bool,
}

impl Route {
    /// The class of `method path`.
    pub fn of(method: &Method, path: &str) -> Route {
        let route = |family, budget, body_limit| Route {
            family,
            budget,
            shared: true,
            body_limit,
            streams: false,
        };
        if let Some(api) = crate::proxy::Api::of_path(path)
            && method == Method::POST
        {
            let family = if api == crate::proxy::Api::Messages {
                Family::Anthropic
            } else {
                Family::OpenAi
            };
            return Route {
                streams: true,
                ..route(family, Budget::Keyless, CHAT_BODY_BYTES)
            };
        }
        if path == "/v1" || path.starts_with("/v1/") {
            return route(Family::OpenAi, Budget::Keyless, FORM_BODY_BYTES);
        }
        if matches!(
            path,
            "/api/agent/subscribe-pool" | "/api/agent/topup" | "/api/agent/keys/rotate"
        ) {
            return route(Family::Agent, Budget::Claims, FORM_BODY_BYTES);
        }
        if path == "/api/agent" || path.starts_with("/api/agent/") {
            return route(Family::Agent, Budget::Keyless, FORM_BODY_BYTES);
        }
        if path.starts_with("/x402/") {
            // A browser's CORS preflight is not a purchase attempt.
            let budget = if method == Method::OPTIONS {
                Budget::Keyless
            } else {
                Budget::Claims
            };
            return route(Family::X402, budget, FORM_BODY_BYTES);
        }
        if matches!(path, "/healthz" | "/readyz" | "/metrics") {
            return Route {
                shared: false,
                ..route(Family::Plain, Budget::Keyless, SMALL_BODY_BYTES)
            };
        }
        route(Family::Plain, Budget::Keyless, SMALL_BODY_BYTES)
    }
}

/// A refusal in the shape of `family`.
pub fn refusal(
    family: Family,
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
) -> Response {
    let body: Value = match family {
        Family::OpenAi => {
            let kind = match status {
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                s if s.is_server_error() => "server_error",
                _ => "invalid_request_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Family::Anthropic => crate::proxy::anthropic::error_body(
            crate::proxy::anthropic::error_type(status.as_u16()),
            &message,
        ),
        Family::Agent | Family::X402 => {
            json!({"success": false, "error": {"code": code, "message": message}})
        }
        Family::Plain => json!({"error": {"code": code, "message": message}}),
    };
    let mut response = (status, Json(body)).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string())
    {
        h.insert(header::RETRY_AFTER, v);
    }
    if family == Family::X402 {
        // The x402 router's CORS layer sits inside this middleware: say the same to browsers here.
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(super::x402::EXPOSE_HEADERS),
        );
    }
    response
}

/// The credential a request carries, as far as the keyless limit cares.
enum Credential {
    /// A valid API key (handed on to the handler so it does not look it up again).
    Key(Box<AuthorizedKey>),
    /// The admin or auditor token.
    Operator,
    /// The key could not be checked (database error): the handler meets the same error and answers it.
    Unchecked,
    None,
}

async fn credential(state: &AppState, headers: &HeaderMap) -> Credential {
    // A key as the inference routes read it (Bearer, else `x-api-key`); operator tokens come as Bearer.
    let Some(presented) = super::openai::presented_key(headers) else {
        return Credential::None;
    };
    if crate::keys::parse(presented).is_some() {
        return match state.billing.authorize(presented).await {
            Ok(Some(key)) => Credential::Key(Box::new(key)),
            Ok(None) => Credential::None,
            Err(_) => Credential::Unchecked,
        };
    }
    let auth = &state.settings.auth;
    let operator = [auth.admin_token.as_deref(), auth.auditor_token.as_deref()]
        .into_iter()
        .flatten()
        .fold(false, |acc, t| {
            acc | super::audit::token_matches(presented, t)
        });
    if operator {
        Credential::Operator
    } else {
        Credential::None
    }
}

fn carries_payment(headers: &HeaderMap) -> bool {
    headers.contains_key(crate::x402::header::PAYMENT_SIGNATURE)
        || headers.contains_key(crate::x402::header::X_PAYMENT)
}

fn limited(route: Route, budget: Budget, scope: Scope, wait: u64) -> Response {
    let (label, what) = match budget {
        Budget::Keyless => ("keyless", "requests without an API key"),
        Budget::Claims => ("claims", "claim or purchase attempts"),
    };
    let message = match (budget, scope) {
        (_, Scope::Ip) => format!("too many {what} from this address; retry in {wait} s"),
        (_, Scope::All) => {
            format!("too many {what} from all clients together right now; retry in {wait} s")
        }
    };
    let message = if budget == Budget::Keyless {
        format!("{message} (requests with a valid API key are not limited)")
    } else {
        message
    };
    crate::metrics::record_rate_limited(
        label,
        match scope {
            Scope::Ip => "ip",
            Scope::All => "all",
        },
    );
    refusal(
        route.family,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        message,
        Some(wait),
    )
}

/// The middleware: rate limits, then the body (limit and deadline), then the handler (deadline unless it streams).
pub async fn enforce(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = Route::of(req.method(), req.uri().path());
    let limits = state.limits.clone();
    let deadline = Instant::now() + limits.request_timeout;

    // Whose token to give back if the request turns out paid.
    let mut refund: Option<(Budget, ClientKey)> = None;
    let limiter = match route.budget {
        Budget::Keyless => limits.keyless(),
        Budget::Claims => limits.claims(),
    };
    if let Some(limiter) = limiter {
        let peer = match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => addr.ip(),
            None => {
                // Served without connection info (not through `api::run`): every client shares one bucket.
                IpAddr::from([0, 0, 0, 0])
            }
        };
        let client = ClientKey::of(limits.client_ip(peer, req.headers()));
        let counted = match route.budget {
            Budget::Claims => true,
            Budget::Keyless => match credential(&state, req.headers()).await {
                Credential::Key(key) => {
                    req.extensions_mut().insert(*key);
                    false
                }
                Credential::Operator | Credential::Unchecked => false,
                Credential::None => true,
            },
        };
        if counted {
            let now = (limits.clock)();
            if let Err((scope, wait)) = limiter.take(client, now, route.shared) {
                return limited(route, route.budget, scope, wait);
            }
            if route.budget == Budget::Claims || carries_payment(req.headers()) {
                refund = Some((route.budget, client));
            }
        }
    }

    let req = match read_body(req, route, deadline, limits.request_timeout).await {
        Ok(req) => req,
        Err(refused) => return refused,
    };

    let response = if route.streams {
        next.run(req).await
    } else {
        // Its own task: a deadline answers the client without cancelling work that may be half done.
        let task = tokio::spawn(next.run(req));
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "request handler failed");
                refusal(
                    route.family,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; try again later".to_string(),
                    None,
                )
            }
            Err(_) => {
                crate::metrics::record_request_timeout("answer");
                refusal(
                    route.family,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!(
                        "no answer within {} s; the request goes on in the background and is never applied \
                         twice: retry it (a repeated claim answers with the purchase it already made)",
                        limits.request_timeout.as_secs()
                    ),
                    Some(TIMEOUT_RETRY_AFTER_SECS),
                )
            }
        }
    };

    if let Some((budget, client)) = refund
        && response.status() == StatusCode::OK
    {
        let limiter = match budget {
            Budget::Keyless => limits.keyless(),
            Budget::Claims => limits.claims(),
        };
        if let Some(limiter) = limiter {
            limiter.refund(client, (limits.clock)(), route.shared);
        }
    }
    response
}

/// Most bytes of a refused body read (and dropped) after the 413, so the client can read its answer: closing a
/// socket with unread data resets the connection, and the client may lose the 413 with it.
const DRAIN_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Reads the body up to the route's limit before `deadline`; the request goes on with the bytes read.
async fn read_body(
    req: Request,
    route: Route,
    deadline: Instant,
    timeout: Duration,
) -> Result<Request, Response> {
    let too_large = || {
        crate::metrics::record_body_too_large();
        refusal(
            route.family,
            StatusCode::PAYLOAD_TOO_LARGE,
            // The codes the handlers used before this middleware read bodies.
            if matches!(route.family, Family::OpenAi | Family::Anthropic) {
                "request_too_large"
            } else {
                "body_too_large"
            },
            format!(
                "the request body is larger than {} bytes, the limit of this route",
                route.body_limit
            ),
            None,
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // A client waiting for `100 Continue` has not sent the body: answering without reading it is enough.
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > route.body_limit as u64) {
        if !expects_continue && declared.is_some_and(|n| n <= DRAIN_MAX_BYTES as u64) {
            drain_later(stream, deadline);
        }
        return Err(too_large());
    }
    let read = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut first: Option<Bytes> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
            let so_far = first.as_ref().map_or(0, Bytes::len) + buf.len();
            if so_far + chunk.len() > route.body_limit {
                return Err(BodyError::TooLarge);
            }
            // One chunk (the usual case) is kept as is; more are joined.
            match first.take() {
                None if buf.is_empty() => first = Some(chunk),
                None => buf.extend_from_slice(&chunk),
                Some(f) => {
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&chunk);
                }
            }
        }
        Ok(first.unwrap_or_else(|| Bytes::from(buf)))
    };
    let outcome = tokio::time::timeout_at(deadline, read).await;
    match outcome {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(BodyError::TooLarge)) => {
            drain_later(stream, deadline);
            Err(too_large())
        }
        Ok(Err(BodyError::Unreadable)) => Err(refusal(
            route.family,
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the request body could not be read".to_string(),
            None,
        )),
        Err(_) => {
            crate::metrics::record_request_timeout("body");
            Err(refusal(
                route.family,
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
                None,
            ))
        }
    }
}

enum BodyError {
    TooLarge,
    Unreadable,
}

/// Reads and drops the rest of a refused body in the background (at most [`DRAIN_MAX_BYTES`], until `deadline`).
fn drain_later(mut stream: axum::body::BodyDataStream, deadline: Instant) {
    tokio::spawn(async move {
        let drain = async {
            let mut seen = 0usize;
            while let Some(Ok(chunk)) = stream.next().await {
                seen += chunk.len();
                if seen > DRAIN_MAX_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, drain).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_minute: u32, burst: u32) -> Rate {
        Rate { per_minute, burst }
    }

    #[test]
    fn bucket_allows_the_burst_then_refills_at_the_rate() {
        let l = RateLimiter::new(rate(120, 3), 1000);
        let ip = ClientKey::of("10.0.0.1".parse().unwrap());
        for _ in 0..3 {
            l.take(ip, 100).unwrap();
        }
        assert_eq!(l.take(ip, 100), Err(1));
        // 2 a second.
        l.take(ip, 101).unwrap();
        l.take(ip, 101).unwrap();
        assert_eq!(l.take(ip, 101), Err(1));
        // Never beyond the burst, however long the client was away.
        for _ in 0..3 {
            l.take(ip, 10_000).unwrap();
        }
        assert!(l.take(ip, 10_000).is_err());
        // Another client has its own bucket.
        l.take(ClientKey::of("10.0.0.2".parse().unwrap()), 10_000)
            .unwrap();
    }

    #[test]
    fn retry_after_is_whole_seconds_until_a_token() {
        let l = RateLimiter::new(rate(6, 1), 1000); // one every 10 s
        let ip = ClientKey::of("10.0.0.1".parse().unwrap());
        l.take(ip, 0).unwrap();
        assert_eq!(l.take(ip, 0), Err(10));
        assert_eq!(l.take(ip, 4), Err(6));
        l.take(ip, 10).unwrap();
        // A clock that steps back neither refills nor breaks the bucket.
        assert_eq!(l.take(ip, 5), Err(10));
    }

    #[test]
    fn refund_gives_a_token_back_up_to_the_burst() {
        let l = RateLimiter::new(rate(1, 2), 1000);
        let ip = ClientKey::of("10.0.0.1".parse().unwrap());
        l.take(ip, 0).unwrap();
        l.take(ip, 0).unwrap();
        assert!(l.take(ip, 0).is_err());
        l.refund(ip, 0);
        l.take(ip, 0).unwrap();
        l.refund(ip, 0);
        l.refund(ip, 0);
        l.refund(ip, 0);
        l.take(ip, 0).unwrap();
        l.take(ip, 0).unwrap();
        assert!(l.take(ip, 0).is_err(), "refunds stop at the burst");
    }

    #[test]
    fn memory_is_bounded_and_idle_clients_go_first() {
        let l = RateLimiter::new(rate(60, 5), 640);
        for i in 0..100_000u32 {
            let _ = l.take(ClientKey::V4(i), 0);
        }
        assert!(l.tracked() <= l.capacity(), "{}", l.tracked());
        assert_eq!(l.capacity(), 640);
        // A client that emptied its bucket stays remembered while newcomers arrive that refill (go idle).
        let busy = ClientKey::V4(u32::MAX);
        for _ in 0..5 {
            l.take(busy, 1).unwrap();
        }
        for i in 0..10_000u32 {
            l.take(ClientKey::V4(1_000_000 + i), 1).unwrap();
            l.refund(ClientKey::V4(1_000_000 + i), 1);
        }
        assert!(l.take(busy, 1).is_err(), "the limited client was forgotten");
    }

    #[test]
    fn the_shared_bucket_limits_all_clients_together() {
        let limit = RateLimit {
            per_ip: rate(60, 2),
            total: rate(120, 3),
        };
        let l = Limiter::new(limit, 1000, 50);
        let (a, b, c) = (ClientKey::V4(1), ClientKey::V4(2), ClientKey::V4(3));
        l.take(a, 100, true).unwrap();
        l.take(a, 100, true).unwrap();
        assert_eq!(l.take(a, 100, true), Err((Scope::Ip, 1)));
        l.take(b, 100, true).unwrap();
        assert_eq!(l.take(b, 100, true), Err((Scope::All, 1)));
        // Routes outside the shared bucket only meet their own.
        l.take(c, 100, false).unwrap();
        // `b` was not charged for the shared refusal: it still has a token once the shared bucket refills.
        l.take(b, 101, true).unwrap();
        // A refund goes to both buckets.
        l.refund(b, 101, true);
        l.take(b, 101, true).unwrap();
        // A clock before the limiter's start neither panics nor refills.
        assert!(SharedBucket::new(rate(60, 1), 100).take(0).is_ok());
    }

    #[test]
    fn the_shared_bucket_gives_out_exactly_its_tokens_under_contention() {
        let bucket = std::sync::Arc::new(SharedBucket::new(rate(1, 1000), 0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bucket = bucket.clone();
                std::thread::spawn(move || (0..1000).filter(|_| bucket.take(0).is_ok()).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 1000);
    }

    #[test]
    fn ipv6_clients_are_counted_by_slash_64() {
        let a = ClientKey::of("2001:db8:1:2::1".parse().unwrap());
        let b = ClientKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = ClientKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            ClientKey::of("::ffff:10.1.2.3".parse().unwrap()),
            ClientKey::of("10.1.2.3".parse().unwrap())
        );
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let settings = crate::config::Limits {
            keyless: None,
            claims: None,
            max_tracked_clients: 64,
            request_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            credit_key_max_in_flight: 16,
            max_rate_tracked_keys: 64,
            trusted_proxies: vec![
                IpNet {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix: 8,
                },
                IpNet {
                    addr: "127.0.0.1".parse().unwrap(),
                    prefix: 32,
                },
            ],
        };
        let limits = Limits::new(&settings, crate::billing::system_clock());
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.1.1.1, 203.0.113.7, 10.1.1.1".parse().unwrap(),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(limits.client_ip(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        assert_eq!(limits.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        assert_eq!(
            limits.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        h.insert("x-forwarded-for", "garbage, 10.2.2.2".parse().unwrap());
        assert_eq!(limits.client_ip(ip("127.0.0.1"), &h), ip("10.2.2.2"));
    }

    #[test]
    fn routes_are_classified_by_family_budget_and_body_limit() {
        let r = |m: Method, p: &str| Route::of(&m, p);
        let chat = r(Method::POST, "/v1/chat/completions");
        assert!(chat.streams);
        assert_eq!(chat.body_limit, CHAT_BODY_BYTES);
        assert_eq!(r(Method::GET, "/v1/models").family, Family::OpenAi);
        assert!(!r(Method::GET, "/v1/models").streams);
        assert_eq!(r(Method::POST, "/api/agent/topup").budget, Budget::Claims);
        assert_eq!(r(Method::GET, "/api/agent/plans").budget, Budget::Keyless);
        assert_eq!(r(Method::POST, "/x402/credits/10").budget, Budget::Claims);
        assert_eq!(
            r(Method::OPTIONS, "/x402/credits/10").budget,
            Budget::Keyless
        );
        assert_eq!(r(Method::POST, "/x402/credits/10").family, Family::X402);
        let plain = r(Method::GET, "/healthz");
        assert_eq!(
            (plain.family, plain.body_limit),
            (Family::Plain, SMALL_BODY_BYTES)
        );
        assert_eq!(r(Method::GET, "/v1x").family, Family::Plain);
    }
}
