//! Prometheus metrics: the names (one place), the process-wide recorder, and helpers the proxy and the claim routes
//! call. `GET /metrics` renders them; indexer and database gauges are refreshed at scrape time (cheap queries), so
//! nothing polls in the background.
//!
//! Money is never a float here either: spend is counted in USDC atomic units (1 = 0.000001 USDC).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// Indexer (refreshed at scrape time from the indexer status and the database).
/// Gauge: last block whose logs are written.
pub const INDEXED_HEAD: &str = "x402_indexer_indexed_head";
/// Gauge: latest block the RPC reported.
pub const CHAIN_HEAD: &str = "x402_indexer_chain_head";
/// Gauge: chain head − indexed head, in blocks.
pub const INDEXER_LAG: &str = "x402_indexer_lag_blocks";
/// Gauge `{status="seen|confirmed|orphaned"}`: stored transfers to payTo by status.
pub const TRANSFERS: &str = "x402_transfers";
/// Counter: reorgs handled (from the database, so it survives restarts).
pub const REORGS: &str = "x402_reorgs_total";
/// Counter: failed indexer steps caused by RPC errors (since start).
pub const RPC_ERRORS: &str = "x402_rpc_errors_total";
/// Counter `{method}`: RPC calls retried after a transport fault.
pub const RPC_RETRIES: &str = "x402_rpc_retries_total";
/// Counter: RPC failovers to another endpoint (unlabelled: all networks; `{network}`: each).
pub const RPC_FAILOVERS: &str = "x402_rpc_failovers_total";
/// Gauge: 1 while the indexer runs, 0 once it stopped for good.
pub const INDEXER_UP: &str = "x402_indexer_up";
/// Gauge `{network}`: the credited value of confirmed payments, USDC atomic units (the console's "received").
pub const RECEIVED: &str = "x402_received_usdc_atomic";
/// Gauge `{network}`: what unsettled x402 `upto` payments owe, USDC atomic units (the operator's loss until settled).
pub const UPTO_OWED: &str = "x402_upto_owed_usdc_atomic";
/// Gauge `{network}`: credits taken back from claims by reorgs (or failed re-settlements) and not given back,
/// USDC atomic units.
pub const REVERSED: &str = "x402_reversed_usdc_atomic";
/// Gauge `{network, scheme="exact|upto", status}`: stored x402 settlements.
pub const SETTLEMENTS: &str = "x402_settlements";
/// Counter `{level="warn|error"}`: warnings and errors the gateway logged (the console lists the latest).
pub const LOG_EVENTS: &str = "x402_log_events_total";

// Checkout.
/// Counter `{route="subscribe-pool|topup", outcome="ok|pending|underpaid|already_claimed|…"}`.
pub const CLAIMS: &str = "x402_claims_total";
/// Gauge `{kind="subscription|credit", state="live|revoked|expired"}`.
pub const KEYS: &str = "x402_keys";

// Inference proxy (names follow what LiteLLM users know: requests, tokens, spend, overhead, in-flight).
/// Counter `{model, status}`: proxied requests by model and HTTP status.
pub const PROXY_REQUESTS: &str = "x402_proxy_total_requests";
/// Counter `{model, type="prompt|completion"}`: tokens.
pub const PROXY_TOKENS: &str = "x402_total_tokens";
/// Counter `{model}`: spend debited, in USDC atomic units.
pub const PROXY_SPEND: &str = "x402_spend_usdc_atomic";
/// Histogram `{model}`: gateway overhead per request (time not spent waiting for the upstream), seconds.
pub const PROXY_OVERHEAD: &str = "x402_overhead_latency_seconds";
/// Gauge: requests being proxied right now.
pub const PROXY_IN_FLIGHT: &str = "x402_in_flight_requests";
/// Counter `{model}`: requests whose upstream generated past the gateway's bound (it ignores the output cap).
pub const METERING_OVERRUNS: &str = "x402_metering_overruns_total";
/// Counter `{model}`: output tokens generated past the bound.
pub const METERING_OVERRUN_TOKENS: &str = "x402_metering_overrun_tokens_total";
/// Counter `{model}`: what overrun tokens cost beyond the reservation (not charged), USDC atomic units.
pub const METERING_UNCHARGED: &str = "x402_metering_uncharged_usdc_atomic";
/// Counter `{model, reason}`: requests refused before forwarding because they could not be bounded (`n`,
/// `best_of`, unbounded content parts) or a key had too many in flight.
pub const METERING_REFUSED: &str = "x402_metering_refused_total";

// Deployments (refreshed at scrape time from the router, except the histogram and the failover counter).
/// Gauge `{model, upstream}`: 1 while the deployment is in rotation, 0 while it cools down.
pub const DEPLOYMENT_HEALTHY: &str = "x402_deployment_healthy";
/// Gauge `{model, upstream}`: requests the deployment is answering now.
pub const DEPLOYMENT_IN_FLIGHT: &str = "x402_deployment_in_flight_requests";
/// Counter `{model, upstream}`: failures before an answer (connect error, timeout before headers, 429, 5xx).
pub const DEPLOYMENT_FAILURES: &str = "x402_deployment_failures_total";
/// Counter `{model, upstream}`: cooldowns entered.
pub const DEPLOYMENT_COOLDOWNS: &str = "x402_deployment_cooldowns_total";
/// Histogram `{model, upstream}`: time to the response headers (first byte), seconds.
pub const DEPLOYMENT_LATENCY: &str = "x402_deployment_first_byte_seconds";
/// Counter `{model}`: requests retried on another deployment after a failure before any byte was sent.
pub const DEPLOYMENT_FAILOVERS: &str = "x402_deployment_failovers_total";

// Unpaid traffic (`[limits]`).
/// Counter `{limit="keyless|claims", scope="ip|all"}`: requests refused with 429 by the rate limits (the client's
/// own bucket, or the one all clients share).
pub const RATE_LIMITED: &str = "x402_rate_limited_total";
/// Counter: requests refused with 413 (body over the route's limit).
pub const BODY_TOO_LARGE: &str = "x402_body_too_large_total";
/// Counter `{phase="body|answer"}`: requests that ran out of time (408 while receiving the body, 503 answering).
pub const REQUEST_TIMEOUTS: &str = "x402_request_timeouts_total";

/// Every metric name, for docs and tests.
pub const ALL: &[&str] = &[
    INDEXED_HEAD,
    CHAIN_HEAD,
    INDEXER_LAG,
    TRANSFERS,
    REORGS,
    RPC_ERRORS,
    RPC_RETRIES,
    RPC_FAILOVERS,
    INDEXER_UP,
    RECEIVED,
    UPTO_OWED,
    REVERSED,
    SETTLEMENTS,
    LOG_EVENTS,
    CLAIMS,
    KEYS,
    PROXY_REQUESTS,
    PROXY_TOKENS,
    PROXY_SPEND,
    PROXY_OVERHEAD,
    PROXY_IN_FLIGHT,
    METERING_OVERRUNS,
    METERING_OVERRUN_TOKENS,
    METERING_UNCHARGED,
    METERING_REFUSED,
    RATE_LIMITED,
    BODY_TOO_LARGE,
    REQUEST_TIMEOUTS,
];

/// Overhead buckets: 100 µs … 1 s.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder's handle, installing the recorder on first use. Safe to call from every server in a
/// process (tests run several): they share one registry.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        // The bucket lists are non-empty constants, so setting them cannot fail; if it ever did, the histograms
        // would fall back to summaries rather than the process stopping.
        let builder = || {
            let with_buckets = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(PROXY_OVERHEAD.to_string()), OVERHEAD_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(DEPLOYMENT_LATENCY.to_string()),
                        LATENCY_BUCKETS,
                    )
                });
            with_buckets.unwrap_or_else(|_| PrometheusBuilder::new())
        };
        let handle = match builder().install_recorder() {
            Ok(h) => h,
            // Someone else installed a global recorder: keep a private one so /metrics still renders.
            Err(_) => builder().build_recorder().handle(),
        };
        describe();
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(INDEXED_HEAD, "Last block whose logs are written.");
    describe_gauge!(CHAIN_HEAD, "Latest block the RPC reported.");
    describe_gauge!(INDEXER_LAG, "Chain head minus indexed head, in blocks.");
    describe_gauge!(TRANSFERS, "Stored USDC transfers to payTo by status.");
    describe_counter!(REORGS, "Reorgs handled.");
    describe_counter!(RPC_ERRORS, "Indexer steps failed by RPC errors.");
    describe_counter!(RPC_RETRIES, "RPC calls retried after a transport fault.");
    describe_counter!(RPC_FAILOVERS, "RPC failovers to another endpoint.");
    describe_gauge!(
        INDEXER_UP,
        "1 while the indexer runs, 0 after a fatal error."
    );
    describe_gauge!(
        RECEIVED,
        "Credited value of confirmed payments by network, USDC atomic units."
    );
    describe_gauge!(
        UPTO_OWED,
        "What unsettled x402 upto payments owe by network, USDC atomic units."
    );
    describe_gauge!(
        REVERSED,
        "Credits taken back from claims by reorgs and not given back, by network, USDC atomic units."
    );
    describe_gauge!(
        SETTLEMENTS,
        "Stored x402 settlements by network, scheme (exact, upto) and status."
    );
    describe_counter!(LOG_EVENTS, "Warnings and errors logged, by level.");
    describe_counter!(CLAIMS, "Claims of payments by route and outcome.");
    describe_gauge!(KEYS, "API keys by kind and state.");
    describe_counter!(
        PROXY_REQUESTS,
        "Proxied inference requests by model and HTTP status."
    );
    describe_counter!(
        PROXY_TOKENS,
        "Tokens by model and type (prompt, completion)."
    );
    describe_counter!(
        PROXY_SPEND,
        "Spend debited by model, in USDC atomic units (1e-6 USDC)."
    );
    describe_histogram!(
        PROXY_OVERHEAD,
        Unit::Seconds,
        "Gateway overhead per proxied request."
    );
    describe_gauge!(PROXY_IN_FLIGHT, "Requests being proxied now.");
    describe_counter!(
        METERING_OVERRUNS,
        "Requests whose upstream generated past the gateway's output bound (an upstream that ignores caps)."
    );
    describe_counter!(
        METERING_OVERRUN_TOKENS,
        "Output tokens upstreams generated past the gateway's bound."
    );
    describe_counter!(
        METERING_UNCHARGED,
        "Cost of overrun tokens beyond the reservation, not charged (USDC atomic units)."
    );
    describe_counter!(
        METERING_REFUSED,
        "Requests refused before forwarding: not boundable (n, best_of, content parts) or too many in flight."
    );
    describe_gauge!(
        DEPLOYMENT_HEALTHY,
        "1 while a deployment (model on an upstream) is in rotation, 0 while it cools down."
    );
    describe_gauge!(
        DEPLOYMENT_IN_FLIGHT,
        "Requests a deployment is answering now."
    );
    describe_counter!(
        DEPLOYMENT_FAILURES,
        "Deployment failures before an answer: connect error, timeout before the headers, 429, 5xx."
    );
    describe_counter!(DEPLOYMENT_COOLDOWNS, "Cooldowns a deployment entered.");
    describe_histogram!(
        DEPLOYMENT_LATENCY,
        Unit::Seconds,
        "Time to a deployment's response headers."
    );
    describe_counter!(
        DEPLOYMENT_FAILOVERS,
        "Requests retried on another deployment after a failure before any byte reached the client."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by the rate limits (429), by limit and scope (ip, all)."
    );
    describe_counter!(
        BODY_TOO_LARGE,
        "Requests refused for a body over the route's limit (413)."
    );
    describe_counter!(
        REQUEST_TIMEOUTS,
        "Requests that ran out of time, by phase (body: 408, answer: 503)."
    );
}

/// Records one finished proxied request. `spend_atomic` is what was debited (0 for subscription keys);
/// `overhead_seconds` is the time the gateway added (total minus upstream wait).
pub fn record_proxy_request(
    model: &str,
    status: u16,
    prompt_tokens: u64,
    completion_tokens: u64,
    spend_atomic: u64,
    overhead_seconds: f64,
) {
    let model = model.to_string();
    metrics::counter!(PROXY_REQUESTS, "model" => model.clone(), "status" => status.to_string())
        .increment(1);
    if prompt_tokens > 0 {
        metrics::counter!(PROXY_TOKENS, "model" => model.clone(), "type" => "prompt")
            .increment(prompt_tokens);
    }
    if completion_tokens > 0 {
        metrics::counter!(PROXY_TOKENS, "model" => model.clone(), "type" => "completion")
            .increment(completion_tokens);
    }
    if spend_atomic > 0 {
        metrics::counter!(PROXY_SPEND, "model" => model.clone()).increment(spend_atomic);
    }
    metrics::histogram!(PROXY_OVERHEAD, "model" => model).record(overhead_seconds.max(0.0));
}

/// Records an upstream that generated past a request's bound.
pub fn record_overrun(model: &str, tokens: u64, uncharged_atomic: u64) {
    metrics::counter!(METERING_OVERRUNS, "model" => model.to_string()).increment(1);
    metrics::counter!(METERING_OVERRUN_TOKENS, "model" => model.to_string()).increment(tokens);
    if uncharged_atomic > 0 {
        metrics::counter!(METERING_UNCHARGED, "model" => model.to_string())
            .increment(uncharged_atomic);
    }
}

/// Records a deployment's time to its response headers.
pub fn record_deployment_latency(model: &str, upstream: &str, latency: std::time::Duration) {
    metrics::histogram!(DEPLOYMENT_LATENCY, "model" => model.to_string(), "upstream" => upstream.to_string())
        .record(latency.as_secs_f64());
}

/// Records a request retried on another deployment.
pub fn record_failover(model: &str) {
    metrics::counter!(DEPLOYMENT_FAILOVERS, "model" => model.to_string()).increment(1);
}

/// Sets the deployment gauges and counters from the router's state (at scrape time).
pub fn refresh_deployments(status: &[crate::proxy::router::DeploymentStatus]) {
    for d in status {
        let labels = [("model", d.model.clone()), ("upstream", d.upstream.clone())];
        metrics::gauge!(DEPLOYMENT_HEALTHY, &labels).set(if d.healthy { 1.0 } else { 0.0 });
        metrics::gauge!(DEPLOYMENT_IN_FLIGHT, &labels).set(d.in_flight as f64);
        metrics::counter!(DEPLOYMENT_FAILURES, &labels).absolute(d.failures);
        metrics::counter!(DEPLOYMENT_COOLDOWNS, &labels).absolute(d.cooldowns);
    }
}

/// Records a request refused before forwarding, by reason (the refused parameter, or `in_flight`).
pub fn record_metering_refusal(model: &str, reason: &'static str) {
    metrics::counter!(METERING_REFUSED, "model" => model.to_string(), "reason" => reason)
        .increment(1);
}

/// One more request in flight.
pub fn in_flight_inc() {
    metrics::gauge!(PROXY_IN_FLIGHT).increment(1.0);
}

/// One request fewer in flight.
pub fn in_flight_dec() {
    metrics::gauge!(PROXY_IN_FLIGHT).decrement(1.0);
}

/// Counts a request as in flight until dropped (also on early returns and cancelled streams).
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        in_flight_inc();
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight_dec();
    }
}

/// Records a claim's outcome (`ok` or the error code the agent saw).
pub fn record_claim(route: &'static str, outcome: &str) {
    metrics::counter!(CLAIMS, "route" => route, "outcome" => outcome.to_string()).increment(1);
}

/// Records an RPC retry of `method`.
pub fn record_rpc_retry(method: &str) {
    metrics::counter!(RPC_RETRIES, "method" => method.to_string()).increment(1);
}

/// Failovers per network since start, for the console (the counters above are write-only).
static FAILOVERS: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts a logged warning (`warn`) or error (`error`).
pub fn record_log_event(level: &'static str) {
    metrics::counter!(LOG_EVENTS, "level" => level).increment(1);
}

/// Records a failover to another RPC endpoint of `network` (CAIP-2; `None` for an RPC client not tied to one).
pub fn record_rpc_failover(network: Option<&str>) {
    metrics::counter!(RPC_FAILOVERS).increment(1);
    if let Some(network) = network {
        metrics::counter!(RPC_FAILOVERS, "network" => network.to_string()).increment(1);
        let mut m = match FAILOVERS.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        *m.entry(network.to_string()).or_default() += 1;
    }
}

/// RPC failovers on `network` since start (every RPC client of the network: indexer, claims, settlement).
pub fn rpc_failovers(network: &str) -> u64 {
    let m = match FAILOVERS.lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    m.get(network).copied().unwrap_or(0)
}

/// Counts a request refused by the `keyless` or `claims` rate limit, in the client's bucket (`ip`) or the shared
/// one (`all`).
pub fn record_rate_limited(limit: &'static str, scope: &'static str) {
    metrics::counter!(RATE_LIMITED, "limit" => limit, "scope" => scope).increment(1);
}

/// Counts a request refused for its body size.
pub fn record_body_too_large() {
    metrics::counter!(BODY_TOO_LARGE).increment(1);
}

/// Counts a request that ran out of time while its body arrived (`body`) or while it was answered (`answer`).
pub fn record_request_timeout(phase: &'static str) {
    metrics::counter!(REQUEST_TIMEOUTS, "phase" => phase).increment(1);
}
