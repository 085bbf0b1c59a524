//! Flood benchmark (`cargo bench --bench flood`): does a flood of keyless requests slow the key holders? Prints
//! figures, asserts nothing about time.
//!
//! The real `x402-gateway serve` binary, the demo upstream (no token delay) and a credit key, as in the proxy
//! benchmark. Key holders send non-streaming chat completions (8 tokens) at a fixed open-loop rate (`RATE`, default
//! 200 req/s, for `SECONDS`, default 10), timed from each request's scheduled start (no coordinated omission):
//! 1. **alone**;
//! 2. **with a flood**: at the same time, `FLOOD_CONCURRENCY` (default 64) clients send keyless
//!    `POST /v1/chat/completions` as fast as they are answered (or `FLOOD_RATE` req/s in all, when set), spread over
//!    `FLOOD_IPS` (default 200) loopback source addresses (127.1.0.1 …), against the gateway's default `[limits]`
//!    (or the lines in `LIMITS`, e.g. `LIMITS='keyless_burst = 10'`);
//! 3. the same flood against the same gateway with `[limits] rate_limits = false`, to show what the limits buy;
//!
//! and a control: the flood aimed at a trivial server that answers 429 to everything, while the key holders use the
//! gateway, which prices what sharing the machine with the flood costs by itself.
//!
//! The flood runs on its own thread and runtime; the load generators, the upstream and the gateway share the
//! machine's cores, so the flood's own CPU use is part of what the key holders feel. The gateway's CPU time per
//! phase is read from `/proc`. Everything is loopback; every phase is bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/figures.rs"]
#[allow(dead_code)]
mod figures;
use figures::{env_u64, ms, percentile};

#[path = "support/gateway.rs"]
mod gateway;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use serde_json::json;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use x402_gateway::dev::{self, upstream};

/// Key holders' latencies in one phase.
struct Phase {
    latencies: Vec<Duration>,
    errors: u64,
}

impl Phase {
    fn p(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// What the flood got back.
#[derive(Default)]
struct FloodStats {
    sent: AtomicU64,
    limited: AtomicU64,
    payment_required: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
}

fn chat_body() -> serde_json::Value {
    json!({"model": "demo", "messages": [{"role": "user", "content": "benchmark me"}], "max_tokens": 8})
}

/// Open loop: key-holder request `i` is due at `start + i / rate`, whatever happened to the earlier ones.
async fn key_holders(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    rate: u64,
    seconds: u64,
) -> Phase {
    let n = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + period * i as u32;
        tokio::time::sleep_until(due).await;
        let request = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body());
        tasks.push(tokio::spawn(async move {
            let ok = match request.send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
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
    Phase { latencies, errors }
}

/// The flood, on its own thread: `concurrency` closed-loop workers, each cycling through its share of `ips`.
fn start_flood(
    url: String,
    ips: Vec<IpAddr>,
    concurrency: usize,
    rate: u64,
    stop: CancellationToken,
    stats: Arc<FloodStats>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let clients: Vec<reqwest::Client> = ips
                .iter()
                .filter_map(|ip| {
                    reqwest::Client::builder()
                        .local_address(*ip)
                        .timeout(Duration::from_secs(30))
                        .build()
                        .ok()
                })
                .collect();
            let clients = Arc::new(clients);
            let workers: Vec<_> = (0..concurrency)
                .map(|w| {
                    let (clients, url, stop, stats) =
                        (clients.clone(), url.clone(), stop.clone(), stats.clone());
                    tokio::spawn(async move {
                        let mine: Vec<&reqwest::Client> =
                            clients.iter().skip(w).step_by(concurrency).collect();
                        if mine.is_empty() {
                            return;
                        }
                        let mut i = 0usize;
                        // With a rate, each worker sends its share on a schedule (catching up when late).
                        let period = (rate > 0)
                            .then(|| Duration::from_secs_f64(concurrency as f64 / rate as f64));
                        let mut due = tokio::time::Instant::now();
                        while !stop.is_cancelled() {
                            if let Some(period) = period {
                                due += period;
                                tokio::time::sleep_until(due).await;
                            }
                            let client = mine[i % mine.len()];
                            i += 1;
                            stats.sent.fetch_add(1, Ordering::Relaxed);
                            let sent = client
                                .post(format!("{url}/v1/chat/completions"))
                                .json(&chat_body())
                                .send()
                                .await;
                            let counter = match sent {
                                Ok(r) => {
                                    let status = r.status().as_u16();
                                    if r.bytes().await.is_err() {
                                        &stats.errors
                                    } else if status == 429 {
                                        &stats.limited
                                    } else if status == 402 {
                                        &stats.payment_required
                                    } else {
                                        &stats.other
                                    }
                                }
                                Err(_) => &stats.errors,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        });
    })
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start after the last ')'.
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant of the system; no memory of this process is touched.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

fn config_text(chain: &dev::DevChain, upstream: &str, limits: &str) -> String {
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
path = "gateway.db"

[[upstreams]]
name = "demo"
base_url = "{upstream}"

[[models]]
id = "demo"
upstream = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[pools]]
slug = "demo"
name = "Demo pool"
models = ["demo"]
blocks = [{{ name = "day", hours_utc = "00:00-24:00", price_usdc = "3.00", seats = 100 }}]

{limits}
"#,
        chain_id = dev::DEV_CHAIN_ID,
        token = chain.token,
        rpc = chain.anvil.endpoint(),
        pay_to = chain.pay_to,
    )
}

/// One measured phase: key holders at `rate` for `seconds`, with a flood when `flood` is set.
struct Measured {
    name: String,
    holders: Phase,
    flood: Option<(Arc<FloodStats>, Duration)>,
    gateway_cpu: f64,
    wall: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    name: &str,
    http: &reqwest::Client,
    url: &str,
    key: &str,
    pid: u32,
    rate: u64,
    seconds: u64,
    flood: Option<(usize, u64, &[IpAddr], &str)>,
) -> Measured {
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let flooding = flood.map(|(concurrency, flood_rate, ips, target)| {
        let stats = Arc::new(FloodStats::default());
        let stop = CancellationToken::new();
        let thread = start_flood(
            target.to_string(),
            ips.to_vec(),
            concurrency,
            flood_rate,
            stop.clone(),
            stats.clone(),
        );
        (stats, stop, thread, Instant::now())
    });
    // Let the flood reach its pace before the key holders start.
    if flooding.is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let holders = key_holders(http, url, key, rate, seconds).await;
    let flood = flooding.map(|(stats, stop, thread, since)| {
        stop.cancel();
        let elapsed = since.elapsed();
        let _ = thread.join();
        (stats, elapsed)
    });
    Measured {
        name: name.to_string(),
        holders,
        flood,
        gateway_cpu: cpu_seconds(pid) - cpu0,
        wall: started.elapsed(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rate = env_u64("RATE", 200);
    let seconds = env_u64("SECONDS", 10);
    let concurrency = env_u64("FLOOD_CONCURRENCY", 64) as usize;
    // 0: as fast as the flood's clients are answered; otherwise that many requests a second in all.
    let flood_rate = env_u64("FLOOD_RATE", 0);
    let n_ips = env_u64("FLOOD_IPS", 200).clamp(1, 65_000) as u32;
    let ips: Vec<IpAddr> = (0..n_ips)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + i)))
        .collect();

    // The demo upstream on its own thread and runtime.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let upstream_url = format!("http://{}/v1", listener.local_addr()?);
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let config = upstream::DemoConfig {
                token_delay: Duration::ZERO,
                models: vec!["demo".into()],
                ..upstream::DemoConfig::default()
            };
            let stats = Arc::new(upstream::DemoStats::default());
            let _ = upstream::run(listener, config, stats, CancellationToken::new()).await;
        });
    });

    let chain = dev::start_chain(&dev::find_anvil(None)?, 0, "1".parse()?).await?;
    let dir = tempfile::tempdir()?;
    let limited = dir.path().join("limited.toml");
    let unlimited = dir.path().join("unlimited.toml");
    // `LIMITS`: lines for the limited phase's `[limits]` table (default: none, so the defaults apply).
    let limits = std::env::var("LIMITS")
        .unwrap_or_default()
        .replace("\\n", "\n");
    let limits = if limits.trim().is_empty() {
        String::new()
    } else {
        format!("[limits]\n{limits}")
    };
    std::fs::write(&limited, config_text(&chain, &upstream_url, &limits))?;
    std::fs::write(
        &unlimited,
        config_text(&chain, &upstream_url, "[limits]\nrate_limits = false"),
    )?;
    // `keys grant` writes to an existing database only: `migrate` creates it.
    let migrated = Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["migrate", "--config"])
        .arg(&limited)
        .status()
        .await
        .map(|s| s.success());
    assert!(matches!(migrated, Ok(true)), "migrate failed");
    let granted = Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["keys", "grant", "--config"])
        .arg(&limited)
        .arg(format!("{:#x}", Address::repeat_byte(0xbe)))
        .arg("1000000")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&granted.stdout).to_string();
    let key = stdout
        .split_whitespace()
        .find(|w| w.starts_with("sk-"))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no key in `keys grant` output: {stdout}{}",
                String::from_utf8_lossy(&granted.stderr)
            )
        })?
        .to_string();

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(30))
        .build()?;

    println!();
    println!(
        "x402-gateway flood benchmark: key holders at {rate} req/s (open loop, {seconds} s, non-streaming chat \
         completions of 8 tokens, demo upstream with no delay); flood: {concurrency} clients sending keyless \
         POST /v1/chat/completions from {n_ips} loopback addresses, {}",
        if flood_rate == 0 {
            "as fast as they are answered".to_string()
        } else {
            format!("{flood_rate} req/s in all")
        }
    );
    // The control: the same flood aimed at a trivial server that answers every request 429 (in this process, on
    // its own thread), while the key holders use the gateway. What the key holders lose then is the price of
    // sharing the machine with the flood, not of the gateway handling it.
    let control = std::net::TcpListener::bind("127.0.0.1:0")?;
    let control_url = format!("http://{}", control.local_addr()?);
    control.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(control) else {
                return;
            };
            let app = axum::Router::new().fallback(|| async {
                (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    axum::Json(
                        json!({"error": {"message": "too many requests", "type": "rate_limit_error",
                                                "param": null, "code": "rate_limited"}}),
                    ),
                )
            });
            let _ = axum::serve(listener, app).await;
        });
    });

    enum Flood {
        None,
        Elsewhere,
        Gateway,
    }
    let mut results = Vec::new();
    for (config, phases) in [
        (
            &limited,
            vec![
                ("alone", Flood::None),
                ("flood elsewhere (control)", Flood::Elsewhere),
                ("flood, [limits] on", Flood::Gateway),
            ],
        ),
        (
            &unlimited,
            vec![("flood, rate_limits = false", Flood::Gateway)],
        ),
    ] {
        let (mut child, url) = gateway::start_gateway(config, &[]).await?;
        let pid = child.id().unwrap_or(0);
        // Warm the connection pool and caches.
        let _ = key_holders(&http, &url, &key, rate.min(200), 1).await;
        for (name, flood) in phases {
            let flood = match flood {
                Flood::None => None,
                Flood::Elsewhere => Some((
                    concurrency,
                    flood_rate,
                    ips.as_slice(),
                    control_url.as_str(),
                )),
                Flood::Gateway => Some((concurrency, flood_rate, ips.as_slice(), url.as_str())),
            };
            results.push(measure(name, &http, &url, &key, pid, rate, seconds, flood).await);
        }
        // Kill and reap: the next phase's gateway opens the same database, whose lock goes with this process.
        let _ = child.kill().await;
    }

    println!(
        "  {:<28} {:>8} {:>8} {:>8} {:>7} {:>12} {:>10} {:>10} {:>8} {:>11}",
        "phase",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "flood req/s",
        "flood 429",
        "flood 402",
        "other",
        "gateway CPU"
    );
    for m in &results {
        let (flood_rate, limited, paid, other) = match &m.flood {
            Some((s, elapsed)) => {
                let answered = s.limited.load(Ordering::Relaxed)
                    + s.payment_required.load(Ordering::Relaxed)
                    + s.other.load(Ordering::Relaxed);
                (
                    format!("{:.0}", answered as f64 / elapsed.as_secs_f64()),
                    s.limited.load(Ordering::Relaxed).to_string(),
                    s.payment_required.load(Ordering::Relaxed).to_string(),
                    format!(
                        "{}+{}e",
                        s.other.load(Ordering::Relaxed),
                        s.errors.load(Ordering::Relaxed)
                    ),
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "  {:<28} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>12} {:>10} {:>10} {:>8} {:>10.0}%",
            m.name,
            ms(m.holders.p(0.5)),
            ms(m.holders.p(0.99)),
            ms(m.holders.latencies.last().copied().unwrap_or_default()),
            m.holders.errors,
            flood_rate,
            limited,
            paid,
            other,
            100.0 * m.gateway_cpu / m.wall.as_secs_f64(),
        );
    }
    let alone = &results[0];
    for m in &results[1..] {
        println!(
            "  key holders, {} vs alone: p50 {:+.2} ms, p99 {:+.2} ms",
            m.name,
            ms(m.holders.p(0.5)) - ms(alone.holders.p(0.5)),
            ms(m.holders.p(0.99)) - ms(alone.holders.p(0.99)),
        );
    }
    Ok(())
}
