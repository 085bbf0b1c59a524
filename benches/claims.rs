//! Checkout benchmark: claims per second through the real HTTP API, and the claim latency, on each engine.
//!
//! Loads N distinct **synthetic** confirmed transfers straight into a fresh database (no chain is needed to
//! claim a confirmed transfer; the indexer is not running), each from one of 64 payers whose real ECDSA keys sign
//! the claim text. Then a concurrent in-process HTTP client (reqwest over loopback) claims every transfer as a
//! credit top-up through the real server — signature recovery, the claim transaction (claim row, account,
//! ledger, key), durable commits — and prints claims/s, p50/p90/p99 latency and this process's CPU per claim.
//!
//! Setups, in one run on the same machine (`ENGINES`, default `sqlite`; `postgres1` and `postgres2` need
//! `X402_TEST_POSTGRES_URL` naming a server where this user may create databases — `scripts/postgres-test-cluster`
//! starts a throwaway one):
//! - `sqlite`: the embedded file;
//! - `postgres1`: one gateway on PostgreSQL;
//! - `postgres2`: two gateways (two replicas: two pools, two replica ids) on one PostgreSQL database, the clients
//!   alternating between them.
//!
//! `cargo bench --bench claims` (env: `CLAIMS=20000`, `CONCURRENCY=64`, `ENGINES=sqlite,postgres1,postgres2`).
//! Client, servers and PostgreSQL share the machine; the CPU figure is this process's (client and gateways), not
//! PostgreSQL's.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/postgres.rs"]
mod postgres;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use tokio_util::sync::CancellationToken;
use x402_gateway::api::{self, AppState};
use x402_gateway::billing::{catalog::claim_text, system_clock};
use x402_gateway::chain::StatusHandle;
use x402_gateway::config::Config;
use x402_gateway::params;
use x402_gateway::store::{Store, StoreError};

const PAY_TO: &str = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8";
const CHAIN_ID: u64 = 31337;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Figures {
    setup: String,
    elapsed: Duration,
    failures: usize,
    claimed: i64,
    latencies: Vec<Duration>,
    cpu: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = env_usize("CLAIMS", 20_000);
    let concurrency = env_usize("CONCURRENCY", 64);
    let server = postgres::server();
    // `cargo test --all-targets` (CI) runs this binary too: PostgreSQL only when asked for.
    let engines = std::env::var("ENGINES").unwrap_or_else(|_| "sqlite".into());
    println!(
        "claims: {n} distinct confirmed transfers per setup, {concurrency} concurrent clients, {} CPUs",
        num_cpus()
    );
    let mut all = Vec::new();
    for setup in engines.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let replicas = match setup {
            "sqlite" => 0,
            "postgres1" => 1,
            "postgres2" => 2,
            other => anyhow::bail!("unknown setup `{other}` (sqlite, postgres1, postgres2)"),
        };
        let url = match (replicas, &server) {
            (0, _) => None,
            (_, Some(server)) => Some(postgres::fresh_database(server).await?),
            (_, None) => anyhow::bail!("{setup} needs X402_TEST_POSTGRES_URL"),
        };
        let figures = run(setup, n, concurrency, url, replicas.max(1)).await?;
        report(&figures, n);
        all.push(figures);
    }
    for f in &all {
        anyhow::ensure!(
            f.failures == 0 && f.claimed as usize == n,
            "{}: not every claim succeeded",
            f.setup
        );
    }
    Ok(())
}

/// Claims `n` synthetic transfers through `replicas` gateways on one database (SQLite when `url` is `None`).
async fn run(
    setup: &str,
    n: usize,
    concurrency: usize,
    url: Option<String>,
    replicas: usize,
) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let database = match &url {
        Some(_) => "url = \"$BENCH_DATABASE_URL\"".to_string(),
        None => format!("path = \"{}\"", dir.path().join("bench.db").display()),
    };
    let config = format!(
        r#"[chain]
network = "custom"
chain_id = {CHAIN_ID}
token_address = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
token_name = "USDC"
token_version = "2"
rpc_http = ["http://127.0.0.1:9"]
pay_to = "{PAY_TO}"
confirmations = 3

[database]
{database}

# Every claim comes from 127.0.0.1: the per-IP limits would refuse most of them.
[limits]
rate_limits = false
"#
    );
    let settings = Config::parse(&config, std::path::Path::new("bench.toml"))?.resolve(
        dir.path(),
        &|name| {
            (name == "BENCH_DATABASE_URL")
                .then(|| url.clone())
                .flatten()
        },
    )?;

    // Synthetic confirmed transfers and their signed claims.
    let payers: Vec<PrivateKeySigner> = (0..64).map(|_| PrivateKeySigner::random()).collect();
    let mut stores = Vec::new();
    for _ in 0..replicas {
        stores.push(Store::open_database(&settings.database).await?);
    }
    let mut bodies = Vec::with_capacity(n);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let tx_hash = format!("0x{:064x}", i + 1);
        let payer = &payers[i % payers.len()];
        rows.push((
            tx_hash.clone(),
            i as i64 + 1,
            format!("0x{:064x}", (i + 1) << 8),
            format!("{:#x}", payer.address()),
        ));
        let sig = payer.sign_message_sync(claim_text(&tx_hash, CHAIN_ID).as_bytes())?;
        bodies.push(
            serde_json::json!({
                "txHash": tx_hash,
                "amount": "10.00",
                "signature": format!("0x{}", alloy::hex::encode(sig.as_bytes())),
            })
            .to_string(),
        );
    }
    stores[0]
        .write(move |c| -> Result<(), StoreError> {
            for (tx_hash, block, block_hash, from) in &rows {
                c.execute(
                    "INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, from_address, \
                     to_address, value_atomic, status, first_seen_at, confirmed_at, network, token, token_value) \
                     VALUES (?1, 0, ?2, ?3, ?4, ?5, 10000000, 'confirmed', 0, 0, ?6, ?7, '10000000')",
                    params![
                        tx_hash,
                        block,
                        block_hash,
                        from,
                        PAY_TO,
                        format!("eip155:{CHAIN_ID}"),
                        "0x5fbdb2315678afecb367f032d93f642f64180aa3"
                    ],
                )?;
            }
            Ok(())
        })
        .await?;

    let shutdown = CancellationToken::new();
    let mut urls = Vec::new();
    let mut servers = Vec::new();
    for store in &stores {
        let state = AppState::new(
            settings.clone(),
            store.clone(),
            StatusHandle::default(),
            system_clock(),
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}/api/agent/topup", listener.local_addr()?));
        servers.push(tokio::spawn(api::run(
            listener,
            api::router(state),
            shutdown.clone(),
        )));
    }

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let bodies = Arc::new(bodies);
    let urls = Arc::new(urls);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_time();
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, urls, bodies, next) =
                (client.clone(), urls.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let url = &urls[i % urls.len()];
                    let t = Instant::now();
                    let ok = match client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    latencies.push(t.elapsed());
                    failures += usize::from(!ok);
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::with_capacity(n);
    let mut failures = 0;
    for w in workers {
        let (l, f) = w.await?;
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    shutdown.cancel();
    for server in servers {
        let _ = server.await;
    }
    let claimed: i64 = stores[0]
        .read(|c| c.query_value("SELECT count(*) FROM claims", params![]))
        .await?;
    latencies.sort();
    Ok(Figures {
        setup: setup.to_string(),
        elapsed,
        failures,
        claimed,
        latencies,
        cpu,
    })
}

fn report(f: &Figures, n: usize) {
    let pct = |p: f64| {
        f.latencies[((f.latencies.len() as f64 * p) as usize).min(f.latencies.len() - 1)]
            .as_secs_f64()
            * 1e3
    };
    println!(
        "{:<10} {:>6.0} claims/s  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  CPU {:>5.0} µs/claim  \
         ({:.2} s, {} failures, {} claim rows)",
        f.setup,
        n as f64 / f.elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        f.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        f.cpu.as_secs_f64() * 1e6 / n as f64,
        f.elapsed.as_secs_f64(),
        f.failures,
        f.claimed
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
