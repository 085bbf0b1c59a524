//! Checkout benchmark: claims per second through the real HTTP API, and the claim latency.
//!
//! Loads N distinct **synthetic** confirmed transfers straight into a fresh database (no chain is needed to
//! claim a confirmed transfer; the indexer is not running), each from one of 64 payers whose real ECDSA keys sign
//! the claim text. Then a concurrent in-process HTTP client (reqwest over loopback) claims every transfer as a
//! credit top-up through the real server — signature recovery, the claim transaction (claim row, account,
//! ledger, key) with `synchronous=FULL` — and prints claims/s and p50/p90/p99 latency.
//!
//! `cargo bench --bench claims` (env: `CLAIMS=20000`, `CONCURRENCY=64`). Client and server share the machine.

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
use x402_gateway::store::Store;

const PAY_TO: &str = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8";
const CHAIN_ID: u64 = 31337;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = env_usize("CLAIMS", 20_000);
    let concurrency = env_usize("CONCURRENCY", 64);
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
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
path = "{}"

# Every claim comes from 127.0.0.1: the per-IP limits would refuse most of them.
[limits]
rate_limits = false
"#,
        db.display()
    );
    let settings = Config::parse(&config, std::path::Path::new("bench.toml"))?
        .resolve(dir.path(), &|_| None)?;

    // Synthetic confirmed transfers and their signed claims.
    let payers: Vec<PrivateKeySigner> = (0..64).map(|_| PrivateKeySigner::random()).collect();
    let store = Store::open(&db)?;
    let mut bodies = Vec::with_capacity(n);
    {
        let mut conn = rusqlite::Connection::open(&db)?;
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, from_address, to_address, \
                 value_atomic, status, first_seen_at, confirmed_at) VALUES (?1, 0, ?2, ?3, ?4, ?5, 10000000, \
                 'confirmed', 0, 0)",
            )?;
            for i in 0..n {
                let tx_hash = format!("0x{:064x}", i + 1);
                let payer = &payers[i % payers.len()];
                insert.execute(rusqlite::params![
                    tx_hash,
                    i as i64 + 1,
                    format!("0x{:064x}", (i + 1) << 8),
                    format!("{:#x}", payer.address()),
                    PAY_TO,
                ])?;
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
        }
        tx.commit()?;
    }

    let state = AppState::new(
        settings,
        store.clone(),
        StatusHandle::default(),
        system_clock(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/api/agent/topup", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::run(listener, api::router(state), shutdown.clone()));

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, bodies, next) =
                (client.clone(), url.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let t = Instant::now();
                    let ok = match client
                        .post(&url)
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
    shutdown.cancel();
    let _ = server.await;

    let claimed: i64 =
        rusqlite::Connection::open(&db)?
            .query_row("SELECT count(*) FROM claims", [], |r| r.get(0))?;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "claims: {n} distinct confirmed transfers, {concurrency} concurrent clients, {} CPUs",
        num_cpus()
    );
    println!(
        "elapsed: {:.2} s, failures: {failures}, claims rows: {claimed}",
        elapsed.as_secs_f64()
    );
    println!(
        "throughput: {:.0} claims/s",
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3
    );
    anyhow::ensure!(
        failures == 0 && claimed as usize == n,
        "not every claim succeeded"
    );
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
