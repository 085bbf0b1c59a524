//! Proxy benchmark (`cargo bench --bench proxy`, or `scripts/bench-proxy`, which also installs LiteLLM):
//! prints figures, asserts nothing about time.
//!
//! One run on this machine, several targets behind the same demo upstream (OpenAI wire format, no token delay):
//! - **direct**: the demo upstream itself (the baseline);
//! - **gateway**: the real `x402-gateway serve` binary with a credit key (each request reserves the worst-case
//!   cost, forwards, settles from `usage` and writes a usage row, all in SQLite with `synchronous=FULL`);
//! - **pg** and **pg x2**, with `BENCH_POSTGRES=1` and `X402_TEST_POSTGRES_URL` naming a PostgreSQL server
//!   (`scripts/postgres-test-cluster` starts a throwaway one): the same binary and config on a fresh PostgreSQL
//!   database, one process, then two processes (two replicas) on that database with requests taken in turn;
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
//!
//! **CPU time per request**, the figure that the other work on the cores does not move: the demo upstream runs in
//! a child process (this binary re-executed with `X402_BENCH_PROXY_UPSTREAM=1`), so the CPU time (user + system,
//! from `/proc/<pid>/stat`, all threads and child processes) of the upstream and of the proxy under test are read
//! apart, per phase above and in a table of its own: every target at the same fixed open-loop rate (`CPU_RATE`
//! req/s, default 25, which LiteLLM's one worker sustains on a loaded 2-core machine) for `CPU_SECONDS`, after an
//! idle window of `IDLE_SECONDS` in which each process's background CPU (indexer polling, timers) is read, to be
//! subtracted ("net"). Rows: direct (the upstream alone), the gateway with a credit key (reserve, forward, settle),
//! the gateway with a pool key bought on the dev chain (one request at a time, so its requests are paced one after
//! another at the same rate), and LiteLLM.
//!
//! **Instructions per request** of the gateway process, counted by `valgrind --tool=callgrind` (`perf stat -e
//! instructions` says "not supported" on these machines): after the runs above, the gateway is restarted under
//! callgrind on the same database; `callgrind_control` zeroes the counters, `INSTR_REQUESTS` requests go one after
//! another (credit key, then pool key), and the dump's total is divided by the answered requests, less what the
//! same process runs idle over as long. Instruction counts do not depend on the machine's load.
//!
//! Under `cargo bench` (which passes `--bench`) the CPU phases default to 40 s after 20 s idle, and callgrind runs
//! (500 requests per key) when installed. Under `cargo test --all-targets` (CI) they default to 2 s after 1 s idle,
//! and callgrind is skipped unless `INSTRUCTIONS=1` (`INSTRUCTIONS=0` skips it under `cargo bench`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/figures.rs"]
#[allow(dead_code)]
mod figures;
use figures::{env_u64, ms, percentile};

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::ProviderBuilder;
use alloy::signers::SignerSync;
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::dev::contracts::TestUSDC;
use x402_gateway::dev::{self, upstream};

/// Where requests go (one URL, or several replicas taken in turn), and how to authenticate.
#[derive(Clone)]
struct Target {
    name: &'static str,
    urls: Arc<Vec<String>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    key: String,
    /// The proxy processes behind it, for their CPU time (none for the baseline: the upstream alone).
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
        self.pids.iter().map(|pid| tree_cpu(*pid)).sum()
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

/// Waits (up to 120 s) until the upstream has been quiet for a second (at most one 10 ms clock tick of CPU): a
/// proxy that fell behind (LiteLLM at 2,000 req/s) goes on forwarding requests that its clients gave up on, and
/// that work would be charged to the next phase's upstream CPU time.
async fn settle(upstream_pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let before = tree_cpu(upstream_pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if tree_cpu(upstream_pid).saturating_sub(before) <= Duration::from_millis(10) {
            return;
        }
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

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and ends at the last ')'):
/// index 0 is the state, 1 the parent pid, 11 and 12 utime and stime.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time the process `pid` has used (user + system, all threads), from `/proc/<pid>/stat` in clock ticks of
/// 10 ms (Linux's USER_HZ is 100 on every architecture it ships for).
fn cpu_time(pid: u32) -> Duration {
    let ticks = stat_fields(pid)
        .and_then(|f| Some(f.get(11)? + f.get(12)?))
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// [`cpu_time`] of `root` and of every live process descending from it (LiteLLM's launcher may start workers).
fn tree_cpu(root: u32) -> Duration {
    let mut children: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).copied()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut total = Duration::ZERO;
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        total += cpu_time(pid);
        todo.extend(children.get(&u64::from(pid)).into_iter().flatten());
    }
    total
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
    let pids = child.id().into_iter().collect();
    let target = Target::new("LiteLLM", vec![url], "none".into(), pids);
    Ok(Some((child, target, version)))
}

/// Opens `n` SSE streams to the slow model and waits until each has received its first chunk.
/// `x402-gateway keys grant` for the benchmark's credit account; returns the key it prints.
async fn grant_key(config: &std::path::Path, envs: &[(&str, &str)]) -> anyhow::Result<String> {
    // `keys grant` writes to an existing database only: `migrate` creates it.
    let migrated = Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["migrate", "--config"])
        .arg(config)
        .env("DEMO_UPSTREAM_KEY", "upstream-secret")
        .envs(envs.iter().copied())
        .status()
        .await
        .map(|s| s.success());
    assert!(matches!(migrated, Ok(true)), "migrate failed");
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

/// Set (to anything) in the environment of this binary's re-executed copy that serves the demo upstreams.
const UPSTREAM_ENV: &str = "X402_BENCH_PROXY_UPSTREAM";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(UPSTREAM_ENV).is_some() {
        return serve_upstreams();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}

/// The demo upstreams, in a child process of the benchmark so that their CPU time is read apart from the load
/// generator's: "demo" answers at once, "slow" streams a token every 100 ms (for the open-streams figure). One
/// runtime worker thread, as before they moved here. Prints `upstreams FAST_URL SLOW_URL`, then serves until its
/// standard input closes (the benchmark is done, or gone).
fn serve_upstreams() -> anyhow::Result<()> {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let fast = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!(
            "upstreams http://{}/v1 http://{}/v1",
            fast.local_addr()?,
            slow.local_addr()?
        );
        std::io::Write::flush(&mut std::io::stdout())?;
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
        let (a, b) = tokio::join!(a, b);
        a?;
        b?;
        Ok(())
    })
}

/// Starts [`serve_upstreams`] as a child (this binary again); returns it with the fast and slow base URLs.
async fn start_upstreams() -> anyhow::Result<(Child, String, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(UPSTREAM_ENV, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await??;
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("upstreams"), Some(fast), Some(slow)) => {
            let (fast, slow) = (fast.to_string(), slow.to_string());
            Ok((child, fast, slow))
        }
        _ => anyhow::bail!("the upstream child printed {line:?}"),
    }
}

/// Paced one after another: request `i` starts at `start + i / rate`, or when request `i - 1` is answered if
/// that is later (a pool key runs one request at a time). Latency is timed from the scheduled start.
async fn paced_sequential(
    http: &reqwest::Client,
    target: &Target,
    rate: u64,
    seconds: u64,
) -> Phase {
    let n = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut latencies = Vec::with_capacity(n as usize);
    let mut errors = 0;
    for i in 0..n {
        let due = start + period * i as u32;
        tokio::time::sleep_until(due).await;
        if one(http, target).await {
            latencies.push(due.elapsed());
        } else {
            errors += 1;
        }
    }
    latencies.sort();
    Phase {
        latencies,
        errors,
        elapsed: start.elapsed(),
    }
}

/// CPU time used by a target's proxy processes and by the upstream over one window.
#[derive(Clone, Copy)]
struct CpuUse {
    proxy: Duration,
    upstream: Duration,
    wall: Duration,
}

/// Reads the CPU time of `target`'s proxy processes and of `upstream_pid` around `work`.
async fn measure_cpu<T>(
    target: &Target,
    upstream_pid: u32,
    work: impl std::future::Future<Output = T>,
) -> (T, CpuUse) {
    let (proxy, upstream, t) = (target.cpu(), tree_cpu(upstream_pid), Instant::now());
    let out = work.await;
    let used = CpuUse {
        proxy: target.cpu().saturating_sub(proxy),
        upstream: tree_cpu(upstream_pid).saturating_sub(upstream),
        wall: t.elapsed(),
    };
    (out, used)
}

/// One row of the CPU-per-request table.
struct CpuRow {
    name: String,
    phase: Phase,
    load: CpuUse,
    idle: CpuUse,
    has_proxy: bool,
}

impl CpuRow {
    /// Microseconds per answered request of `pick(load)`, and the same less `pick(idle)` scaled to the load
    /// window (the process's background CPU, which a busier server spreads over more requests).
    fn per_request(&self, pick: impl Fn(&CpuUse) -> Duration) -> (f64, f64) {
        let n = self.phase.latencies.len().max(1) as f64;
        let used = pick(&self.load).as_secs_f64();
        let idle = pick(&self.idle).as_secs_f64() * self.load.wall.as_secs_f64()
            / self.idle.wall.as_secs_f64().max(1e-9);
        (used * 1e6 / n, (used - idle) * 1e6 / n)
    }
}

/// A pool key of the benchmark's all-day pool, bought on the dev chain by agent wallet `agent` and claimed with
/// its signature (retrying while the gateway has not indexed or confirmed the payment).
async fn buy_pool_key(
    chain: &dev::DevChain,
    agent: usize,
    gateway_url: &str,
) -> anyhow::Result<String> {
    let wallet = chain
        .agents
        .get(agent)
        .ok_or_else(|| anyhow::anyhow!("no agent wallet {agent}"))?
        .clone();
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(wallet.clone()))
        .connect_http(chain.anvil.endpoint_url());
    let token = TestUSDC::new(chain.token, &provider);
    let receipt = token
        .transfer(chain.pay_to, U256::from(1_000_000u64))
        .send()
        .await?
        .get_receipt()
        .await?;
    anyhow::ensure!(receipt.status(), "the pool payment reverted");
    let tx = format!("{:#x}", receipt.transaction_hash);
    let signature = wallet.sign_message_sync(claim_text(&tx, dev::DEV_CHAIN_ID).as_bytes())?;
    let body = json!({"txHash": tx, "poolSlug": "bench", "blocks": ["day"],
                      "signature": format!("0x{}", alloy::hex::encode(signature.as_bytes()))});
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = http
            .post(format!("{gateway_url}/api/agent/subscribe-pool"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let answer: serde_json::Value = resp.json().await?;
        if let Some(key) = answer["data"]["apiKey"].as_str() {
            return Ok(key.to_string());
        }
        let pending = matches!(
            answer["error"]["code"].as_str(),
            Some("pending" | "not_indexed")
        );
        anyhow::ensure!(
            pending && Instant::now() < deadline,
            "pool claim: HTTP {status}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A gateway process under `valgrind --tool=callgrind`, controlled with `callgrind_control`.
struct Callgrind {
    child: Child,
    pid: u32,
    url: String,
    out_dir: tempfile::TempDir,
}

impl Callgrind {
    /// Whether valgrind and callgrind_control run here; `None`, or why not.
    async fn unavailable() -> Option<String> {
        for (program, arg) in [
            ("valgrind", "--version"),
            ("callgrind_control", "--version"),
        ] {
            let ran = Command::new(program).arg(arg).output().await;
            if !ran.is_ok_and(|o| o.status.success()) {
                return Some(format!("`{program} {arg}` did not run"));
            }
        }
        None
    }

    async fn start(config: &std::path::Path, envs: &[(&str, &str)]) -> anyhow::Result<Callgrind> {
        let out_dir = tempfile::tempdir()?;
        let wrapper = [
            "valgrind".to_string(),
            "--tool=callgrind".to_string(),
            format!(
                "--callgrind-out-file={}",
                out_dir.path().join("callgrind.out").display()
            ),
        ];
        let (child, url) = gateway::start_gateway_under(&wrapper, config, envs).await?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("callgrind exited"))?;
        Ok(Callgrind {
            child,
            pid,
            url,
            out_dir,
        })
    }

    async fn control(&self, option: &str) -> anyhow::Result<()> {
        let out = Command::new("callgrind_control")
            .arg(option)
            .arg(self.pid.to_string())
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "callgrind_control {option}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The `summary:` (instructions executed) of every dump so far, by dump number.
    fn dumps(&self) -> Vec<(u64, u64)> {
        let mut dumps = Vec::new();
        for entry in std::fs::read_dir(self.out_dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(n) = name
                .strip_prefix("callgrind.out.")
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let summary = std::fs::read_to_string(entry.path()).ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("summary:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            });
            if let Some(summary) = summary {
                dumps.push((n, summary));
            }
        }
        dumps.sort();
        dumps
    }

    /// Instructions executed while `work` ran (counters zeroed before, dumped after), and how long it took.
    async fn count<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> anyhow::Result<(T, u64, Duration)> {
        let before = self.dumps().len();
        self.control("--zero").await?;
        let t = Instant::now();
        let out = work.await;
        let wall = t.elapsed();
        self.control("--dump").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let dumps = self.dumps();
            if dumps.len() > before
                && let Some(&(_, summary)) = dumps.last()
            {
                return Ok((out, summary, wall));
            }
            anyhow::ensure!(Instant::now() < deadline, "no callgrind dump within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One after another, `n` requests; returns how many were answered.
async fn sequential(http: &reqwest::Client, target: &Target, n: u64) -> u64 {
    let mut ok = 0;
    for _ in 0..n {
        if one(http, target).await {
            ok += 1;
        }
    }
    ok
}

/// Instructions per request of the gateway under callgrind: idle first (for the background), then `n` requests
/// one after another on each of `keys` (name, key). Prints one line per key.
async fn instructions_per_request(
    config: &std::path::Path,
    envs: &[(&str, &str)],
    keys: &[(&str, String)],
    n: u64,
    idle: Duration,
) -> anyhow::Result<()> {
    let cg = Callgrind::start(config, envs).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    for (_, key) in keys {
        let target = Target::new("callgrind", vec![cg.url.clone()], key.clone(), Vec::new());
        sequential(&http, &target, 20).await;
    }
    let ((), idle_ir, idle_wall) = cg.count(tokio::time::sleep(idle)).await?;
    println!(
        "  gateway idle under callgrind: {:.0} instructions/s (background: indexer polling, timers)",
        idle_ir as f64 / idle_wall.as_secs_f64()
    );
    for (name, key) in keys {
        let target = Target::new("callgrind", vec![cg.url.clone()], key.clone(), Vec::new());
        let (ok, ir, wall) = cg.count(sequential(&http, &target, n)).await?;
        let background = idle_ir as f64 * wall.as_secs_f64() / idle_wall.as_secs_f64();
        println!(
            "  gateway instructions per request, {name}: {:.0} (net of idle: {:.0}); {ok} of {n} answered in {:.1} s \
             under callgrind",
            ir as f64 / ok.max(1) as f64,
            (ir as f64 - background) / ok.max(1) as f64,
            wall.as_secs_f64(),
        );
    }
    drop(cg.child);
    Ok(())
}

async fn bench() -> anyhow::Result<()> {
    let rates: Vec<u64> = std::env::var("RATES")
        .unwrap_or_else(|_| "500,2000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let seconds = env_u64("SECONDS", 5);
    let concurrency = env_u64("CONCURRENCY", 64);
    let streams = env_u64("STREAMS", 1_000);

    // Under `cargo bench` (which passes --bench) the long CPU phases and callgrind; short ones under `cargo test`.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let cpu_rate = env_u64("CPU_RATE", 25);
    let cpu_seconds = env_u64("CPU_SECONDS", if bench_mode { 40 } else { 2 });
    let idle_seconds = env_u64("IDLE_SECONDS", if bench_mode { 20 } else { 1 });
    let instr_requests = env_u64("INSTR_REQUESTS", if bench_mode { 500 } else { 20 });
    let instructions = match std::env::var("INSTRUCTIONS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => bench_mode,
    };

    // The demo upstreams, in a child process (for their own CPU time).
    let (upstream_child, fast_url, slow_url) = start_upstreams().await?;
    let upstream_pid = upstream_child.id().unwrap_or(0);

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

# A pool open all day, for the pool-key path (one request at a time per subscription).
[[pools]]
slug = "bench"
name = "Benchmark pool"
models = ["demo"]
blocks = [{{ name = "day", hours_utc = "00:00-24:00", price_usdc = "1.00", seats = 5 }}]
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
    let pool_key = buy_pool_key(&chain, 0, &gateway_url).await?;
    let gateway_pool = Target::new(
        "gateway (pool key)",
        vec![gateway_url.clone()],
        pool_key.clone(),
        vec![gateway_pid],
    );
    let gateway = Target::new("gateway", vec![gateway_url], key.clone(), vec![gateway_pid]);

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
    // The proxy's and the upstream's CPU time per answered request, per phase: figures that do not depend on what
    // else shares the machine's cores (unlike the latencies).
    let mut phase_cpu: Vec<(String, &'static str, Option<f64>, f64)> = Vec::new();
    let mut record_cpu = |load: String, t: &Target, phase: &Phase, used: CpuUse| {
        let n = phase.latencies.len().max(1) as f64;
        let proxy = (!t.pids.is_empty()).then(|| used.proxy.as_secs_f64() * 1e6 / n);
        phase_cpu.push((load, t.name, proxy, used.upstream.as_secs_f64() * 1e6 / n));
    };
    for t in &targets {
        drain(&http, t).await;
        settle(upstream_pid).await;
        let (phase, used) = measure_cpu(
            t,
            upstream_pid,
            max_throughput(&http, t, concurrency, seconds),
        )
        .await;
        record_cpu(format!("max, {concurrency} clients"), t, &phase, used);
        results.push((format!("max, {concurrency} clients"), t.name, phase));
    }
    for &rate in &rates {
        for t in &targets {
            drain(&http, t).await;
            settle(upstream_pid).await;
            let (phase, used) =
                measure_cpu(t, upstream_pid, fixed_rate(&http, t, rate, seconds)).await;
            record_cpu(format!("{rate} req/s"), t, &phase, used);
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
    for (load, name, proxy, upstream) in &phase_cpu {
        let proxy = proxy.map_or(String::new(), |us| format!("proxy {us:.0} µs, "));
        println!(
            "  CPU time per request, {name} at {load}: {proxy}upstream {upstream:.0} µs (user + system, all \
             threads; PostgreSQL's own CPU not included)"
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

    // CPU time per request at one fixed rate that every target sustains, each process's idle CPU subtracted.
    let mut cpu_targets: Vec<(&Target, bool)> = targets
        .iter()
        .filter(|t| matches!(t.name, "direct" | "gateway"))
        .map(|t| (t, false))
        .collect();
    cpu_targets.push((&gateway_pool, true));
    cpu_targets.extend(
        targets
            .iter()
            .filter(|t| !matches!(t.name, "direct" | "gateway"))
            .map(|t| (t, false)),
    );
    // Every target's backlog worked off first (an overloaded LiteLLM goes on forwarding abandoned requests for a
    // while, and the upstream's CPU time for them would be charged to whichever row comes next).
    for t in &targets {
        drain(&http, t).await;
    }
    let mut cpu_rows = Vec::new();
    for (t, one_at_a_time) in cpu_targets {
        drain(&http, t).await;
        settle(upstream_pid).await;
        let ((), idle) = measure_cpu(
            t,
            upstream_pid,
            tokio::time::sleep(Duration::from_secs(idle_seconds)),
        )
        .await;
        let (phase, load) = if one_at_a_time {
            measure_cpu(
                t,
                upstream_pid,
                paced_sequential(&http, t, cpu_rate, cpu_seconds),
            )
            .await
        } else {
            measure_cpu(t, upstream_pid, fixed_rate(&http, t, cpu_rate, cpu_seconds)).await
        };
        cpu_rows.push(CpuRow {
            name: t.name.to_string(),
            phase,
            load,
            idle,
            has_proxy: !t.pids.is_empty(),
        });
    }
    println!(
        "  CPU time per answered request at {cpu_rate} req/s for {cpu_seconds} s each (user + system from \
         /proc/<pid>/stat, all threads; net = less the process's own idle CPU, read over {idle_seconds} s idle just \
         before; the pool key's requests paced one after another)"
    );
    println!(
        "  {:<20} {:>8} {:>7} {:>8} {:>9} {:>12} {:>13} {:>12}",
        "target",
        "answered",
        "errors",
        "p50 ms",
        "proxy µs",
        "proxy net µs",
        "upstream µs",
        "upstr. net µs"
    );
    for row in &cpu_rows {
        let (proxy, proxy_net) = row.per_request(|c| c.proxy);
        let (up, up_net) = row.per_request(|c| c.upstream);
        let (proxy, proxy_net) = if row.has_proxy {
            (format!("{proxy:.0}"), format!("{proxy_net:.0}"))
        } else {
            ("-".to_string(), "-".to_string())
        };
        println!(
            "  {:<20} {:>8} {:>7} {:>8.2} {:>9} {:>12} {:>13.0} {:>12.0}",
            row.name,
            row.phase.latencies.len(),
            row.phase.errors,
            ms(row.phase.p(0.5)),
            proxy,
            proxy_net,
            up,
            up_net
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
    // Stop the gateway (so the callgrind run below has the database to itself) and wait until it is gone.
    let mut gateway_child = gateway_child;
    let _ = gateway_child.kill().await;

    // Instructions per request, the same binary and database under callgrind.
    if !instructions {
        println!(
            "  gateway instructions per request: skipped (runs under `cargo bench`, or with INSTRUCTIONS=1)"
        );
    } else if let Some(why) = Callgrind::unavailable().await {
        println!("  gateway instructions per request: skipped ({why})");
    } else {
        instructions_per_request(
            &config,
            &[("DEMO_UPSTREAM_KEY", "upstream-secret")],
            &[("credit key", key), ("pool key", pool_key)],
            instr_requests,
            Duration::from_secs(idle_seconds.max(5)),
        )
        .await?;
    }
    drop(upstream_child);
    Ok(())
}
