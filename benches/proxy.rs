//! Proxy benchmark (`cargo bench --bench proxy`, or `scripts/bench-proxy`, which also installs LiteLLM):
//! prints figures, asserts nothing about time.
//!
//! One run on this machine, three targets behind the same demo upstream (OpenAI wire format, no token delay):
//! - **direct**: the demo upstream itself (the baseline);
//! - **gateway**: the real `x402-gateway serve` binary with a credit key (each request reserves the worst-case
//!   cost, forwards, settles from `usage` and writes a usage row, all in SQLite with `synchronous=FULL`);
//! - **pg** and **pg x2**, with `BENCH_POSTGRES=1` and `X402_TEST_POSTGRES_URL` naming a PostgreSQL server
//!   (`scripts/postgres-test-cluster` starts a throwaway one): the same binary and config on a fresh PostgreSQL database, one process, then two
//!   processes (two replicas) on that database with requests taken in turn;
//! - **LiteLLM**: the LiteLLM proxy (PyPI `litellm[proxy]`), configured against the same upstream, when
//!   `LITELLM` names its executable (scripts/bench-proxy installs it; otherwise that column is skipped).
//!
//! For each: latency at fixed open-loop rates (`RATES`, default 500 and 2,000 req/s, `SECONDS` each, default 5),
//! timed from each request's *scheduled* start so a stalled server is not hidden (no coordinated omission), and
//! the maximum throughput of a closed loop of `CONCURRENCY` (default 64) clients. Then the gateway's RSS idle and
//! with `STREAMS` (default 1,000) concurrent open SSE streams.
//!
//! The load generator, the upstream and the proxy under test share the 2 cores, so the absolute figures include
//! contention; the "added" figures are gateway minus direct at the same rate. `FSYNC_METERING=1` runs the gateway
//! with `[database] fsync_metering = true` (every metering commit synced before the answer).

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use futures::StreamExt;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use x402_gateway::dev::{self, upstream};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Where requests go (one URL, or several replicas taken in turn), and how to authenticate.
#[derive(Clone)]
struct Target {
    name: &'static str,
    urls: Arc<Vec<String>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    key: String,
    /// The gateway processes behind it, for their CPU time (none for the baseline and LiteLLM).
    pids: Vec<u32>,
}

impl Target {
    fn new(name: &'static str, urls: Vec<String>, key: String, pids: Vec<u32>) -> Target {
        Target {
            name,
            urls: Arc::new(urls),
            next: Arc::default(),
            key,
            pids,
        }
    }

    /// The next replica's base URL (round robin).
    fn url(&self) -> &str {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.urls[i % self.urls.len()]
    }

    fn cpu(&self) -> Duration {
        self.pids.iter().map(|pid| cpu_time(*pid)).sum()
    }
}

/// The outcome of one load phase.
struct Phase {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
}

impl Phase {
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

fn body() -> serde_json::Value {
    json!({"model": "demo", "messages": [{"role": "user", "content": "benchmark me"}], "max_tokens": 8})
}

async fn one(http: &reqwest::Client, target: &Target) -> bool {
    let resp = http
        .post(format!("{}/v1/chat/completions", target.url()))
        .bearer_auth(&target.key)
        .json(&body())
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
        _ => false,
    }
}

/// Open loop: request `i` is due at `start + i / rate`, whatever happened to the earlier ones.
async fn fixed_rate(http: &reqwest::Client, target: &Target, rate: u64, seconds: u64) -> Phase {
    let n = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + period * i as u32;
        tokio::time::sleep_until(due).await;
        let http = http.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let ok = one(&http, &target).await;
            (ok, due.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(n as usize);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((true, d)) => latencies.push(d),
            _ => errors += 1,
        }
    }
    latencies.sort();
    Phase {
        latencies,
        errors,
        elapsed: start.elapsed(),
    }
}

/// Waits (up to 120 s) until `target` answers a lone request within 200 ms: an overloaded target has worked off
/// its backlog.
async fn drain(http: &reqwest::Client, target: &Target) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let t = Instant::now();
        if one(http, target).await && t.elapsed() < Duration::from_millis(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Closed loop: `concurrency` clients, each sending its next request when the last one is answered.
async fn max_throughput(
    http: &reqwest::Client,
    target: &Target,
    concurrency: u64,
    seconds: u64,
) -> Phase {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let http = http.clone();
            let target = target.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if one(&http, &target).await {
                        latencies.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            latencies.extend(l);
            errors += e;
        }
    }
    latencies.sort();
    Phase {
        latencies,
        errors,
        elapsed: start.elapsed(),
    }
}

/// CPU time the process `pid` has used (user + system, all threads), from `/proc/<pid>/stat` in clock ticks of
/// 10 ms (Linux's USER_HZ is 100 on every architecture it ships for).
fn cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces), which ends at the last ')'.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line: 12 and 13 after ')'.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts the LiteLLM proxy against the demo upstream, when installed.
async fn start_litellm(
    dir: &std::path::Path,
    upstream: &str,
) -> anyhow::Result<Option<(Child, Target, String)>> {
    let Ok(exe) = std::env::var("LITELLM") else {
        return Ok(None);
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: demo\n    litellm_params:\n      model: openai/demo\n      \
             api_base: {upstream}\n      api_key: upstream-secret\n\
             litellm_settings:\n  telemetry: false\n  turn_off_message_logging: true\n\
             general_settings:\n  disable_spend_logs: true\n"
        ),
    )?;
    let version = Command::new(
        std::path::Path::new(&exe)
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("python"),
    )
    .args([
        "-c",
        "import importlib.metadata as m; print(m.version('litellm'))",
    ])
    .output()
    .await
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default();
    let child = Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOG", "ERROR")
        .env("LITELLM_TELEMETRY", "False")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = http
            .get(format!("{url}/health/liveliness"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("LiteLLM did not become ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let target = Target::new("LiteLLM", vec![url], "none".into(), Vec::new());
    Ok(Some((child, target, version)))
}

/// Opens `n` SSE streams to the slow model and waits until each has received its first chunk.
/// `x402-gateway keys grant` for the benchmark's credit account; returns the key it prints.
async fn grant_key(config: &std::path::Path, envs: &[(&str, &str)]) -> anyhow::Result<String> {
    let granted = Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["keys", "grant", "--config"])
        .arg(config)
        .arg(format!("{:#x}", Address::repeat_byte(0xbe)))
        .arg("1000000")
        .env("DEMO_UPSTREAM_KEY", "upstream-secret")
        .envs(envs.iter().copied())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&granted.stdout).to_string();
    Ok(stdout
        .split_whitespace()
        .find(|w| w.starts_with("sk-"))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no key in `keys grant` output: {stdout}{}",
                String::from_utf8_lossy(&granted.stderr)
            )
        })?
        .to_string())
}

async fn open_streams(
    gateway: &Target,
    n: u64,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, CancellationToken)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let stop = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(n as usize);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let http = http.clone();
        let gateway = gateway.clone();
        let stop = stop.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(format!("{}/v1/chat/completions", gateway.url()))
                .bearer_auth(&gateway.key)
                .json(
                    &json!({"model": "slow", "messages": [{"role": "user", "content": "hold"}],
                               "max_tokens": 400, "stream": true}),
                )
                .send()
                .await;
            let Ok(resp) = resp else {
                let _ = tx.send(false).await;
                return;
            };
            let ok = resp.status().is_success();
            let mut body = resp.bytes_stream();
            let first = body.next().await.is_some_and(|c| c.is_ok());
            let _ = tx.send(ok && first).await;
            // Hold the stream open until told to go.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async { while body.next().await.is_some() {} } => {}
            }
        }));
    }
    drop(tx);
    let mut open = 0;
    let mut failed = 0;
    while let Some(ok) = rx.recv().await {
        if ok {
            open += 1;
        } else {
            failed += 1;
        }
        if open + failed == n {
            break;
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {n} streams failed to open");
    Ok((tasks, stop))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rates: Vec<u64> = std::env::var("RATES")
        .unwrap_or_else(|_| "500,2000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let seconds = env_u64("SECONDS", 5);
    let concurrency = env_u64("CONCURRENCY", 64);
    let streams = env_u64("STREAMS", 1_000);

    // The demo upstreams run on their own thread and runtime: "demo" answers at once, "slow" streams a token
    // every 100 ms (for the open-streams figure).
    let fast = std::net::TcpListener::bind("127.0.0.1:0")?;
    let slow = std::net::TcpListener::bind("127.0.0.1:0")?;
    let fast_url = format!("http://{}/v1", fast.local_addr()?);
    let slow_url = format!("http://{}/v1", slow.local_addr()?);
    fast.set_nonblocking(true)?;
    slow.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let (Ok(fast), Ok(slow)) = (
                tokio::net::TcpListener::from_std(fast),
                tokio::net::TcpListener::from_std(slow),
            ) else {
                return;
            };
            let config = |delay| upstream::DemoConfig {
                token_delay: Duration::from_millis(delay),
                api_key: Some("upstream-secret".into()),
                models: vec!["demo".into(), "slow".into()],
                ..upstream::DemoConfig::default()
            };
            let never = CancellationToken::new();
            let stats = Arc::new(upstream::DemoStats::default());
            let a = upstream::run(fast, config(0), stats.clone(), never.clone());
            let b = upstream::run(slow, config(100), stats, never);
            let _ = tokio::join!(a, b);
        });
    });

    // The gateway: a dev chain for its indexer, a config with both upstreams, and a credit key.
    let chain = dev::start_chain(&dev::find_anvil(None)?, 0, "1".parse()?).await?;
    let dir = tempfile::tempdir()?;
    let config_text = |database: &str| {
        format!(
            r#"[server]
listen = "127.0.0.1:0"

[chain]
network = "custom"
chain_id = {chain_id}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = 1

[database]
{database}
fsync_metering = {fsync_metering}

# One credit key carries the whole load (64 clients, 2,000 req/s, 1,000 open streams): lift its in-flight cap.
[limits]
credit_key_max_in_flight = 100000

[[upstreams]]
name = "fast"
base_url = "{fast_url}"
api_key_env = "DEMO_UPSTREAM_KEY"

[[upstreams]]
name = "slow"
base_url = "{slow_url}"
api_key_env = "DEMO_UPSTREAM_KEY"

[[models]]
id = "demo"
upstream = "fast"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[models]]
id = "slow"
upstream = "slow"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
"#,
            chain_id = dev::DEV_CHAIN_ID,
            token = chain.token,
            rpc = chain.anvil.endpoint(),
            pay_to = chain.pay_to,
            fsync_metering = std::env::var("FSYNC_METERING").is_ok_and(|v| v == "1"),
        )
    };
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text("path = \"gateway.db\""))?;
    let key = grant_key(&config, &[]).await?;
    let (gateway_child, gateway_url) =
        gateway::start_gateway(&config, &[("DEMO_UPSTREAM_KEY", "upstream-secret")]).await?;
    let gateway_pid = gateway_child.id().unwrap_or(0);

    let direct = Target::new(
        "direct",
        vec![fast_url.trim_end_matches("/v1").to_string()],
        "upstream-secret".into(),
        Vec::new(),
    );
    let gateway = Target::new("gateway", vec![gateway_url], key, vec![gateway_pid]);

    // With a PostgreSQL server: the same gateway on PostgreSQL, one replica and two (two processes on one
    // database, requests taken in turn; the second replica shares the first one's key, as replicas do).
    let mut pg_targets = Vec::new();
    let mut _pg_children = Vec::new();
    // Asked for with BENCH_POSTGRES=1 (`cargo test --all-targets` runs this binary too, with a server set).
    let server =
        postgres::server().filter(|_| std::env::var("BENCH_POSTGRES").is_ok_and(|v| v == "1"));
    if let Some(server) = server {
        let url = postgres::fresh_database(&server).await?;
        let pg_config = dir.path().join("gateway-pg.toml");
        std::fs::write(&pg_config, config_text("url = \"$BENCH_DATABASE_URL\""))?;
        let envs = [
            ("DEMO_UPSTREAM_KEY", "upstream-secret"),
            ("BENCH_DATABASE_URL", url.as_str()),
        ];
        let key = grant_key(&pg_config, &envs).await?;
        let (first, first_url) = gateway::start_gateway(&pg_config, &envs).await?;
        let (second, second_url) = gateway::start_gateway(&pg_config, &envs).await?;
        let pids = [first.id().unwrap_or(0), second.id().unwrap_or(0)];
        pg_targets.push(Target::new(
            "pg",
            vec![first_url.clone()],
            key.clone(),
            vec![pids[0]],
        ));
        pg_targets.push(Target::new(
            "pg x2",
            vec![first_url, second_url],
            key,
            pids.to_vec(),
        ));
        _pg_children = vec![first, second];
    }
    let litellm = start_litellm(dir.path(), &fast_url).await?;
    let mut targets = vec![direct, gateway.clone()];
    targets.extend(pg_targets);
    let mut litellm_version = None;
    let _litellm_child = litellm.map(|(child, target, version)| {
        targets.push(target);
        litellm_version = Some(version);
        child
    });

    // A request unanswered after 30 s counts as an error (an overloaded target would otherwise stall the run).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(30))
        .build()?;
    // Warm every target's connection pool and caches.
    for t in &targets {
        let _ = fixed_rate(&http, t, 200, 1).await;
    }
    let idle_rss = rss_kib(gateway_pid, "VmRSS:");

    println!();
    println!(
        "x402-gateway proxy benchmark (non-streaming chat completions, 8 tokens, demo upstream with no delay; \
         fsync_metering = {})",
        std::env::var("FSYNC_METERING").is_ok_and(|v| v == "1")
    );
    if let Some(v) = &litellm_version {
        println!("  LiteLLM proxy: litellm[proxy] {v}, 1 worker, no database, same upstream");
    } else {
        println!(
            "  LiteLLM proxy: skipped (set LITELLM=path/to/litellm, or run scripts/bench-proxy)"
        );
    }
    // Maximum throughput first, then the fixed rates (which overload a slow target; it is drained before the
    // next phase so its backlog is not charged to the next one).
    let mut results: Vec<(String, &'static str, Phase)> = Vec::new();
    // The gateway process's CPU time per answered request, per phase: a figure that does not depend on what else
    // shares the machine's cores (unlike the latencies).
    let mut gateway_cpu: Vec<(String, f64)> = Vec::new();
    for t in &targets {
        drain(&http, t).await;
        let cpu = t.cpu();
        let phase = max_throughput(&http, t, concurrency, seconds).await;
        if !t.pids.is_empty() {
            let used = t.cpu().saturating_sub(cpu);
            gateway_cpu.push((
                format!("{} at max, {concurrency} clients", t.name),
                used.as_secs_f64() * 1e6 / phase.latencies.len().max(1) as f64,
            ));
        }
        results.push((format!("max, {concurrency} clients"), t.name, phase));
    }
    for &rate in &rates {
        for t in &targets {
            drain(&http, t).await;
            let cpu = t.cpu();
            let phase = fixed_rate(&http, t, rate, seconds).await;
            if !t.pids.is_empty() {
                let used = t.cpu().saturating_sub(cpu);
                gateway_cpu.push((
                    format!("{} at {rate} req/s", t.name),
                    used.as_secs_f64() * 1e6 / phase.latencies.len().max(1) as f64,
                ));
            }
            results.push((format!("{rate} req/s"), t.name, phase));
        }
    }
    println!(
        "  {:<18} {:<8} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "load", "target", "p50 ms", "p99 ms", "max ms", "req/s", "errors"
    );
    for (load, name, p) in &results {
        println!(
            "  {:<18} {:<8} {:>9.2} {:>9.2} {:>9.2} {:>10.0} {:>7}",
            load,
            name,
            ms(p.p(0.5)),
            ms(p.p(0.99)),
            ms(p.latencies.last().copied().unwrap_or_default()),
            p.throughput(),
            p.errors
        );
    }
    let find = |load: &str, name: &str| results.iter().find(|(l, n, _)| l == load && *n == name);
    for &rate in &rates {
        let load = format!("{rate} req/s");
        if let (Some((_, _, d)), Some((_, _, g))) = (find(&load, "direct"), find(&load, "gateway"))
        {
            println!(
                "  added by the gateway at {rate} req/s: p50 {:+.2} ms, p99 {:+.2} ms",
                ms(g.p(0.5)) - ms(d.p(0.5)),
                ms(g.p(0.99)) - ms(d.p(0.99)),
            );
        }
    }
    for (load, us) in &gateway_cpu {
        println!(
            "  gateway CPU time per request, {load}: {us:.0} µs (user + system, all threads of its processes; \
             PostgreSQL's own CPU not included)"
        );
    }
    let max_load = format!("max, {concurrency} clients");
    if let (Some((_, _, g)), Some((_, _, l))) =
        (find(&max_load, "gateway"), find(&max_load, "LiteLLM"))
        && l.throughput() > 0.0
    {
        println!(
            "  maximum throughput gateway / LiteLLM: {:.1}x",
            g.throughput() / l.throughput()
        );
    }

    // Memory: idle (after warm-up), then with `streams` concurrent open SSE streams.
    let (tasks, stop) = open_streams(&gateway, streams).await?;
    let streams_rss = rss_kib(gateway_pid, "VmRSS:");
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "  gateway RSS: idle {:.1} MiB; with {streams} concurrent open streams {:.1} MiB (peak over the run {:.1} MiB)",
        idle_rss as f64 / 1024.0,
        streams_rss as f64 / 1024.0,
        rss_kib(gateway_pid, "VmHWM:") as f64 / 1024.0,
    );
    drop(gateway_child);
    Ok(())
}
