//! Several deployments per model and per-key rate limits, through the real server to real demo upstream servers
//! (each on its own port, killed and restarted on the same port): failover before any byte reached the client,
//! cooldown and probe, `/readyz`, `/healthz` and `/metrics`; a stream cut after its first byte is never retried;
//! requests and tokens per minute per key with OpenAI's headers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::dev::upstream::{DemoConfig, DemoServer, DemoStats};
use x402_gateway::usdc::Usdc;

use crate::proxy::{MIDNIGHT, PRICES, messages};
use crate::support::*;

const CHAT: &str = "/v1/chat/completions";

struct Deployments {
    chain: TestChain,
    gw: Gateway,
    servers: Vec<Option<DemoServer>>,
    addrs: Vec<SocketAddr>,
    stats: Vec<Arc<DemoStats>>,
    demo: DemoConfig,
    _dir: tempfile::TempDir,
}

fn config(chain: &TestChain, urls: &[String], db: &std::path::Path, extra: &str) -> String {
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
name = "gpu-a"
base_url = "{a}"
connect_timeout_ms = 500

[[upstreams]]
name = "gpu-b"
base_url = "{b}"
connect_timeout_ms = 500

[[models]]
id = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = 24
deployments = [{{ upstream = "gpu-a" }}, {{ upstream = "gpu-b" }}]

[routing]
failures_before_cooldown = 2
cooldown_secs = 1

[credits]
min_topup_usdc = "1.00"
{extra}
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
        a = urls[0],
        b = urls[1],
    )
}

impl Deployments {
    async fn start(token_delay_ms: u64, extra: &str) -> Deployments {
        let chain = TestChain::start().await;
        let demo = DemoConfig {
            token_delay: Duration::from_millis(token_delay_ms),
            count_in_flight: true,
            ..DemoConfig::default()
        };
        let mut servers = Vec::new();
        let mut stats = Vec::new();
        for _ in 0..2 {
            let s = Arc::new(DemoStats::default());
            let server = DemoServer::start("127.0.0.1:0".parse().unwrap(), demo.clone(), s.clone())
                .await
                .unwrap();
            servers.push(Some(server));
            stats.push(s);
        }
        let addrs: Vec<SocketAddr> = servers.iter().flatten().map(DemoServer::addr).collect();
        let urls: Vec<String> = servers.iter().flatten().map(DemoServer::url).collect();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let gw = Gateway::start_with(
            config(&chain, &urls, &db, extra),
            db,
            Arc::new(AtomicI64::new(MIDNIGHT + 3600)),
        )
        .await;
        Deployments {
            chain,
            gw,
            servers,
            addrs,
            stats,
            demo,
            _dir: dir,
        }
    }

    async fn kill(&mut self, i: usize) {
        if let Some(server) = self.servers[i].take() {
            server.stop().await;
        }
    }

    /// Starts deployment `i` again on the port it had.
    async fn restart(&mut self, i: usize) {
        let server = DemoServer::start(self.addrs[i], self.demo.clone(), self.stats[i].clone())
            .await
            .unwrap();
        self.servers[i] = Some(server);
    }

    fn served(&self, i: usize) -> u64 {
        self.stats[i].requests_on(CHAT)
    }

    async fn credit_key(&self, byte: u8, amount: &str) -> String {
        let store = self.gw.store().await;
        let account = alloy::primitives::Address::repeat_byte(byte);
        let (_, key) =
            x402_gateway::billing::grant(&store, account, amount.parse().unwrap(), None, MIDNIGHT)
                .await
                .unwrap();
        key.unwrap().full
    }

    fn chat(&self, key: &str, body: Value) -> reqwest::RequestBuilder {
        self.gw
            .http
            .post(format!("{}{CHAT}", self.gw.base))
            .bearer_auth(key)
            .json(&body)
    }

    /// The deployment's entry in `/healthz`.
    async fn deployment(&self, upstream: &str) -> Value {
        let (_, _, health) = self.gw.get("/healthz", None).await;
        health["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["upstream"] == upstream)
            .cloned()
            .unwrap()
    }

    async fn usage_row(&self, request_id: &str) -> x402_gateway::store::usage::UsageRow {
        crate::proxy::settled_usage_row(&self.gw, request_id).await
    }

    async fn balance(&self, key: &str) -> Usdc {
        let (_, _, usage) = self.gw.get("/v1/usage", Some(key)).await;
        usage["credits"]["balanceUsdc"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// When a polling loop gives up.
fn deadline() -> std::time::Instant {
    std::time::Instant::now() + Duration::from_secs(60)
}

/// One chat request, JSON or streamed, that must be answered completely: returns its request id.
async fn answered(d: &Deployments, key: &str, stream: bool) -> String {
    let resp = d
        .chat(
            key,
            json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 3, "stream": stream}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = resp.text().await.unwrap();
    if stream {
        assert!(body.ends_with("data: [DONE]\n\n"), "a whole stream: {body}");
        assert!(!body.contains("\"error\""), "{body}");
    } else {
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 3, "{body}");
    }
    id
}

/// Two deployments; one is killed: every request is still answered, by the other, before any byte reached the
/// client, and billed exactly once; the dead one cools down (`/healthz`, `/metrics`), `/readyz` stays ready while
/// the model has a healthy deployment, and the killed one is probed back into rotation once restarted. With both
/// dead, `/readyz` says which model has no deployment, and the requests get a clean 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_deployment_is_failed_over_cooled_down_and_probed_back() {
    let mut d = Deployments::start(1, "").await;
    let key = d.credit_key(0x21, "10").await;
    let deadline = self::deadline;
    let mut ids = Vec::new();

    // Both deployments take traffic (weights 1:1; two idle draws, the first wins).
    let deadline = deadline();
    while !(d.served(0) > 0 && d.served(1) > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "both deployments served"
        );
        ids.push(answered(&d, &key, false).await);
    }

    // Kill gpu-a. Every request is answered by gpu-b (mixed JSON and streams) until gpu-a is out of rotation.
    let before_kill = ids.len();
    d.kill(0).await;
    let a_before = d.served(0);
    let b_before = d.served(1);
    let mut after_kill = 0u64;
    let deadline = self::deadline();
    while d.deployment("gpu-a").await["healthy"] == true {
        assert!(std::time::Instant::now() < deadline, "gpu-a cooling down");
        ids.push(answered(&d, &key, after_kill % 2 == 1).await);
        after_kill += 1;
    }
    // A few more while it cools: none goes to the dead one.
    for i in 0..6 {
        ids.push(answered(&d, &key, i % 2 == 0).await);
        after_kill += 1;
    }
    assert_eq!(d.served(0), a_before, "the killed server saw nothing");
    assert_eq!(
        d.served(1) - b_before,
        after_kill,
        "gpu-b answered every request after the kill, each once"
    );
    let a = d.deployment("gpu-a").await;
    assert!(a["failures"].as_u64().unwrap() >= 2, "{a}");
    assert_eq!(a["cooldowns"], 1, "{a}");
    let (status, _, ready) = d.gw.get("/readyz", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "gpu-b still serves the model: {ready}"
    );
    let metrics =
        d.gw.http
            .get(format!("{}/metrics", d.gw.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    assert!(
        metrics.contains("x402_deployment_healthy{model=\"demo\",upstream=\"gpu-a\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("x402_deployment_failovers_total{model=\"demo\"}"),
        "{metrics}"
    );

    // Billed exactly once each: one settled `ok` row per request, and the balance is 10 minus their sum.
    let mut spent = 0i64;
    for id in &ids {
        let row = d.usage_row(id).await;
        assert_eq!(row.status, "ok", "{id}");
        assert_eq!(row.completion_tokens, 3);
        spent += row.cost_usdc.atomic();
    }
    assert_eq!(d.balance(&key).await, Usdc(10_000_000 - spent));

    // The console's per-request facts: the API, the deployment that answered (gpu-b for every request after the
    // kill, a failover included) and the time to its headers, never more than the request took.
    let store = d.gw.store().await;
    let mut answered_by: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        let id = id.clone();
        let (api, deployment, ttfb, duration): (Option<String>, Option<String>, Option<i64>, Option<i64>) = store
            .read(move |c| {
                c.query_one(
                    "SELECT api, deployment, first_byte_ms, duration_ms FROM usage WHERE request_id = ?1",
                    x402_gateway::params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
            })
            .await
            .unwrap();
        assert_eq!(api.as_deref(), Some("chat.completions"));
        let deployment = deployment.expect("the answering deployment is recorded");
        if i >= before_kill {
            assert_eq!(deployment, "gpu-b", "request {i} after the kill");
        }
        answered_by.insert(deployment);
        assert!(ttfb.unwrap() <= duration.unwrap(), "{ttfb:?} {duration:?}");
    }
    assert_eq!(
        answered_by.len(),
        2,
        "both deployments answered before the kill"
    );
    // The console adds them up per model and per deployment (the figures of /api/admin/summary).
    let summary = store
        .admin_summary(0, 4_102_444_800, Vec::new())
        .await
        .unwrap();
    let per_deployment: i64 = summary.deployments.iter().map(|x| x.requests).sum();
    assert_eq!(
        per_deployment,
        ids.len() as i64,
        "{:?}",
        summary.deployments
    );
    let names: Vec<&str> = summary
        .deployments
        .iter()
        .map(|x| x.deployment.as_str())
        .collect();
    assert_eq!(names, ["gpu-a", "gpu-b"]);
    let demo = summary.models.iter().find(|m| m.model == "demo").unwrap();
    assert_eq!(demo.requests, ids.len() as i64);
    assert_eq!(demo.completion_tokens, 3 * ids.len() as i64);
    assert!(
        demo.ttfb_p50_ms.is_some() && demo.ttfb_p50_ms <= demo.p50_ms,
        "{demo:?}"
    );

    // Restarted on the same port: the probe brings it back, and it takes traffic again.
    d.restart(0).await;
    wait_for("gpu-a back in rotation", || async {
        (d.deployment("gpu-a").await["healthy"] == true).then_some(())
    })
    .await;
    let a_back = d.served(0);
    let deadline = self::deadline();
    while d.served(0) == a_back {
        assert!(std::time::Instant::now() < deadline, "gpu-a serves again");
        answered(&d, &key, false).await;
    }

    // Both dead: 502s (never a hang), both cool down, /readyz names the model; both back: ready again.
    d.kill(0).await;
    d.kill(1).await;
    wait_for("no healthy deployment", || {
        let d = &d;
        let key = &key;
        async move {
            let resp = d
                .chat(
                    key,
                    json!({"model": "demo", "messages": messages("hi"), "max_tokens": 2}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            let (status, _, ready) = d.gw.get("/readyz", None).await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(ready)
        }
    })
    .await;
    let (_, _, ready) = d.gw.get("/readyz", None).await;
    assert_eq!(ready["modelsWithoutHealthyDeployment"], json!(["demo"]));
    d.restart(0).await;
    d.restart(1).await;
    wait_for("ready again", || async {
        let (status, _, _) = d.gw.get("/readyz", None).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    answered(&d, &key, true).await;
    drop(d.chain);
}

/// A stream whose deployment dies after its first byte reached the client is not retried (the client would get
/// a second, different answer and the upstream would generate twice): the client sees the stream end with an
/// error event, the upstreams saw exactly one request, and the bill is the metering rule for a cut stream
/// (prompt at its bound, output as delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_its_first_byte_is_not_retried_and_billed_as_delivered() {
    let mut d = Deployments::start(40, "").await;
    let key = d.credit_key(0x22, "10").await;
    let before = d.served(0) + d.served(1);
    let resp = d
        .chat(
            &key,
            json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 20, "stream": true,
                   "user": "cut-me"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"content\":\"Paid") {
        let chunk = body.next().await.expect("a first token").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Kill whichever deployment is answering.
    let serving = (0..2)
        .find(|i| d.stats[*i].in_flight.lock().unwrap().contains_key("cut-me"))
        .expect("one deployment answers the stream");
    d.kill(serving).await;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => break,
        }
    }
    assert!(text.contains("\"code\":\"upstream_cut\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(
        d.served(0) + d.served(1),
        before + 1,
        "not retried on the other deployment"
    );
    let delivered = text.matches("\"content\":\"").count() as u64 - 1; // the role chunk carries "" content
    let row = d.usage_row(&id).await;
    assert_eq!(row.status, "upstream_cut");
    assert_eq!(row.usage_source, "estimated");
    assert!(
        row.completion_tokens >= delivered.max(1) && row.completion_tokens <= 20,
        "{row:?}"
    );
    assert_eq!(
        row.cost_usdc,
        PRICES.cost(row.prompt_tokens, row.completion_tokens)
    );
    assert_eq!(
        d.balance(&key).await,
        Usdc(10_000_000 - row.cost_usdc.atomic())
    );
}

fn rate(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(format!("x-ratelimit-{name}"))
        .map(|v| v.to_str().unwrap().to_string())
}

/// Requests and tokens per minute per key (`[credits] requests_per_minute`, `tokens_per_minute`): OpenAI's six
/// headers on every answer, 429 + `Retry-After` when a budget is spent, other keys untouched, a bound that can
/// never fit refused with 400, unused tokens given back when a request ends, and the budgets refilled with time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limits_answer_429_with_openai_headers_and_spare_other_keys() {
    let d = Deployments::start(100, "requests_per_minute = 4\ntokens_per_minute = 900\n").await;
    let a = d.credit_key(0x31, "10").await;
    let b = d.credit_key(0x32, "10").await;
    let small = json!({"model": "demo", "messages": messages("hi"), "max_tokens": 1});

    // Key a: four requests, the budget counting down in the headers.
    for remaining in ["3", "2", "1", "0"] {
        let resp = d.chat(&a, small.clone()).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(rate(h, "limit-requests").as_deref(), Some("4"));
        assert_eq!(rate(h, "remaining-requests").as_deref(), Some(remaining));
        assert_eq!(rate(h, "limit-tokens").as_deref(), Some("900"));
        assert!(rate(h, "remaining-tokens").is_some() && rate(h, "reset-tokens").is_some());
        assert!(rate(h, "reset-requests").is_some());
    }
    // The fifth: 429, one request refills every 15 s.
    let resp = d.chat(&a, small.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "15");
    assert_eq!(
        rate(resp.headers(), "remaining-requests").as_deref(),
        Some("0")
    );
    let body: Value = resp.json().await.unwrap();
    crate::proxy::assert_openai_error(&body, "rate_limit_exceeded");
    // Another key is not affected.
    let resp = d.chat(&b, small.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        rate(resp.headers(), "remaining-requests").as_deref(),
        Some("3")
    );

    // Tokens: two slow streams hold their bounds (prompt bound + 24), a third does not fit while they run.
    let stream = json!({"model": "demo", "messages": messages("hi"), "stream": true});
    let first = d.chat(&b, stream.clone()).send().await.unwrap();
    let second = d.chat(&b, stream.clone()).send().await.unwrap();
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let resp = d.chat(&b, stream.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let left: u64 = rate(resp.headers(), "remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left < 900 / 3, "two bounds are held: {left} left");
    let body: Value = resp.json().await.unwrap();
    crate::proxy::assert_openai_error(&body, "rate_limit_exceeded");
    // When they end, what they did not use goes back: the same request fits at once, no time passing.
    let (t1, t2) = (first.text().await.unwrap(), second.text().await.unwrap());
    assert!(t1.ends_with("[DONE]\n\n") && t2.ends_with("[DONE]\n\n"));
    let resp = wait_for("the unused tokens back", || {
        let d = &d;
        let b = &b;
        async move {
            let resp = d
                .chat(
                    b,
                    json!({"model": "demo", "messages": messages("hi"), "max_tokens": 1}),
                )
                .send()
                .await
                .unwrap();
            (resp.status() == StatusCode::OK).then_some(resp)
        }
    })
    .await;
    let left: u64 = rate(resp.headers(), "remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 900 / 2, "{left}");

    // A bound that can never fit the per-minute tokens: 400 naming the parameter, not an endless 429.
    let long = "word ".repeat(1000);
    let resp = d
        .chat(
            &b,
            json!({"model": "demo", "messages": messages(&long), "max_tokens": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "max_completion_tokens", "{body}");

    // On /v1/messages the same limits answer in Anthropic's shape, with Anthropic's headers too (reset as the
    // RFC 3339 time the bucket is full: b spent its 4 requests at the frozen clock, so a minute from now).
    let messages = |key: &str| {
        d.gw.http
            .post(format!("{}/v1/messages", d.gw.base))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "demo", "max_tokens": 2, "messages": messages("hi")}))
    };
    let resp = messages(&b).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers().clone();
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "4");
    assert_eq!(
        h["anthropic-ratelimit-requests-reset"],
        "2026-01-01T01:01:00Z"
    );
    assert_eq!(rate(&h, "remaining-requests").as_deref(), Some("0"));
    assert!(h.contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let c = d.credit_key(0x33, "10").await;
    let resp = messages(&c).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "3");
    assert_eq!(
        h["anthropic-ratelimit-requests-reset"],
        "2026-01-01T01:00:15Z"
    );
    assert_eq!(h["anthropic-ratelimit-tokens-limit"], "900");
    assert!(h.contains_key("anthropic-ratelimit-tokens-reset"));

    // Time refills: 15 s later key a has one request again.
    d.gw.set_time(MIDNIGHT + 3600 + 15);
    let resp = d.chat(&a, small).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        rate(resp.headers(), "remaining-requests").as_deref(),
        Some("0")
    );
}
