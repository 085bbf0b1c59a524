//! Indexer benchmark (`cargo bench --bench indexer`): prints figures, asserts nothing about time.
//!
//! 1. Starts two anvil chains, the dev chain (chain id 31337) and a second network (chain id 31338; the same
//!    deployer, so the same token address), and makes 10,000 USDC transfers to payTo over 1,000 blocks on each
//!    (both chains built at once, the same way).
//! 2. Backfill:
//!    - 2a. one network (the dev chain): the indexer's `eth_getLogs` calls made bare over the whole range, in its
//!      default 2,000-block ranges, timed;
//!    - 2b. one network: the real binary (`x402-gateway index --once`) on a fresh database over the same range,
//!      timed; prints the ratio to 2a and the indexer's peak RSS;
//!    - 2c. two networks at once: the bare `eth_getLogs` calls of 2a on both chains concurrently, then both
//!      networks' indexers (`Indexer::run_until_synced`, in this process) concurrently on one fresh SQLite store.
//!      Each network's figure is timed from the common start to that network's own completion; prints, per
//!      network, the bare and backfill times, their ratio and the transfers written, and the time for both
//!      together. In process, this ratio leaves out what 2b's includes of the process start (configuration,
//!      migrations, opening the database), so the two are not comparable to the millisecond.
//! 3. SQLite: writes 100,000 synthetic transfers through the store in indexer-sized batches (1,000 per range
//!    transaction) and prints transfers/s.
//!
//! Environment: `BENCH_BLOCKS` (default 1000) and `BENCH_PER_BLOCK` (default 10) change each chain's size;
//! `BENCH_LOG=x402_gateway=debug` shows the indexer's per-range timings (on stderr: the binary's in 2b, the
//! in-process indexers' in 2c).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/figures.rs"]
#[allow(dead_code)]
mod figures;
use figures::{env_u64, ms};

use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::U256;
use alloy::providers::ext::AnvilApi;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::sol_types::SolCall;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use x402_gateway::chain::{Indexer, StatusHandle};
use x402_gateway::config::{ChainSettings, Network};
use x402_gateway::dev::{self, DevChain, contracts::TestUSDC};
use x402_gateway::store::Store;
use x402_gateway::store::transfers::{BlockRef, NewTransfer, RangeUpdate};
use x402_gateway::usdc::Usdc;

type BenchError = Box<dyn std::error::Error>;

/// Chain id of the second network (the dev chain is [`dev::DEV_CHAIN_ID`]).
const SECOND_CHAIN_ID: u64 = 31_338;

/// The blocks a chain's history occupies.
struct History {
    first_block: u64,
    last_block: u64,
    head: u64,
}

/// One network's figures in phase 2c.
struct Concurrent {
    network: String,
    bare: Duration,
    bare_logs: usize,
    backfill: Duration,
    written: usize,
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let blocks = env_u64("BENCH_BLOCKS", 1_000);
    let per_block = env_u64("BENCH_PER_BLOCK", 10);
    // In process (phase 2c) the indexers log through tracing; the binary (phase 2b) reads BENCH_LOG itself.
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let anvil = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dev::ANVIL_RELATIVE);
    let chain = dev::start_chain(&anvil, 0, Usdc::whole(1_000_000)).await?;
    let second =
        dev::start_chain_with_id(&anvil, SECOND_CHAIN_ID, 0, Usdc::whole(1_000_000)).await?;
    assert_eq!(
        chain.token, second.token,
        "the same deployer deploys the token at the same address"
    );
    let rpc = chain.anvil.endpoint();

    // --- 1. each chain: `per_block` transfers in each of `blocks` blocks, both chains at once ---------------
    let started = Instant::now();
    let (history, second_history) = tokio::try_join!(
        build_history(&chain, blocks, per_block),
        build_history(&second, blocks, per_block)
    )?;
    for (c, h) in [(&chain, &history), (&second, &second_history)] {
        eprintln!(
            "chain {} ready: {} transfers in blocks {}..={}, head {}",
            c.anvil.chain_id(),
            blocks * per_block,
            h.first_block,
            h.last_block,
            h.head
        );
    }
    eprintln!(
        "both chains ready ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    let head = history.head;

    // --- 2a. bare eth_getLogs over the same range, in the indexer's default 2,000-block ranges ---------------
    let http = alloy::transports::http::reqwest::Client::new();
    let bare_started = Instant::now();
    let bare_logs = bare_get_logs(&http, &chain, head).await?;
    let bare = bare_started.elapsed();

    // --- 2b. the real binary backfilling the same range ----------------------------------------------------
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[chain]\nnetwork = \"custom\"\nchain_id = {}\ntoken_address = \"{:#x}\"\ntoken_name = \"USDC\"\n\
             token_version = \"2\"\nrpc_http = [\"{rpc}\"]\npay_to = \"{:#x}\"\nconfirmations = 12\n\
             [database]\npath = \"bench.db\"\n",
            dev::DEV_CHAIN_ID,
            chain.token,
            chain.pay_to
        ),
    )?;
    let indexer_started = Instant::now();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["index", "--once", "--log"])
        .arg(std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .arg("--config")
        .arg(&config)
        .status()?;
    let indexer = indexer_started.elapsed();
    assert!(status.success(), "indexer failed");
    let peak_rss_kib = children_peak_rss_kib();
    let store = Store::open(&dir.path().join("bench.db"))?;
    let indexed = store.list_transfers(None).await?.len();

    // --- 2c. two networks backfilling at once ----------------------------------------------------------------
    let (concurrent, both) =
        two_networks(&http, [&chain, &second], [head, second_history.head]).await?;

    // --- 3. SQLite writes in isolation --------------------------------------------------------------------
    let (rows, write_time) = sqlite_write_rate(100_000, 1_000).await?;

    println!();
    println!("x402-gateway indexer benchmark");
    println!(
        "  chain: {} transfers to payTo over {blocks} blocks (anvil 1.7.1, local HTTP)",
        blocks * per_block
    );
    println!(
        "  bare eth_getLogs (2,000-block ranges) : {:>9.1} ms  ({bare_logs} logs)",
        ms(bare)
    );
    println!(
        "  indexer backfill (`index --once`)    : {:>9.1} ms  ({indexed} transfers written)",
        ms(indexer)
    );
    println!(
        "  ratio indexer / bare eth_getLogs     : {:>9.2}",
        indexer.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "  indexer peak RSS                     : {:>9.1} MiB",
        peak_rss_kib as f64 / 1024.0
    );
    println!(
        "  two networks at once, each {} transfers over {blocks} blocks (in process, one SQLite store):",
        blocks * per_block
    );
    for c in &concurrent {
        println!(
            "    {:<14} bare eth_getLogs {:>8.1} ms ({} logs), backfill {:>8.1} ms, ratio {:>5.2}, {} transfers written",
            c.network,
            ms(c.bare),
            c.bare_logs,
            ms(c.backfill),
            c.backfill.as_secs_f64() / c.bare.as_secs_f64(),
            c.written
        );
    }
    println!(
        "    both together  bare eth_getLogs {:>8.1} ms, backfill {:>8.1} ms, ratio {:>5.2}",
        ms(both.0),
        ms(both.1),
        both.1.as_secs_f64() / both.0.as_secs_f64()
    );
    println!(
        "  SQLite writes (1,000 per transaction) : {:>9.0} transfers/s  ({rows} rows in {:.1} ms, synchronous=FULL)",
        rows as f64 / write_time.as_secs_f64(),
        ms(write_time)
    );
    Ok(())
}

/// Phase 1 on one chain: `per_block` transfers to payTo in each of `blocks` blocks, then 12 empty blocks on top.
async fn build_history(
    chain: &DevChain,
    blocks: u64,
    per_block: u64,
) -> Result<History, BenchError> {
    let mut wallet = EthereumWallet::from(chain.deployer.clone());
    for a in &chain.agents {
        wallet.register_signer(a.clone());
    }
    let provider = ProviderBuilder::new()
        .wallet(wallet)
        .connect_http(chain.anvil.endpoint_url());
    provider.anvil_set_auto_mine(false).await?;
    let senders: Vec<_> = chain.agents.iter().map(|a| a.address()).collect();
    let mut nonces = Vec::new();
    for s in &senders {
        nonces.push(provider.get_transaction_count(*s).await?);
    }
    let first_block = provider.get_block_number().await? + 1;
    let fees = provider.estimate_eip1559_fees().await?;
    for b in 0..blocks {
        let mut txs = Vec::new();
        for k in 0..per_block {
            let who = ((b * per_block + k) % senders.len() as u64) as usize;
            let call = TestUSDC::transferCall {
                to: chain.pay_to,
                value: U256::from(1_000 + b * per_block + k),
            };
            let tx = alloy::rpc::types::TransactionRequest::default()
                .from(senders[who])
                .to(chain.token)
                .input(call.abi_encode().into())
                .nonce(nonces[who])
                .gas_limit(100_000)
                .max_fee_per_gas(fees.max_fee_per_gas * 2)
                .max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
            nonces[who] += 1;
            txs.push(tx);
        }
        let sent: Vec<_> =
            futures::stream::iter(txs.into_iter().map(|tx| provider.send_transaction(tx)))
                .buffered(16)
                .collect()
                .await;
        for s in sent {
            drop(s?);
        }
        provider.anvil_mine(Some(1), None).await?;
    }
    let last_block = provider.get_block_number().await?;
    // A few empty blocks on top so everything is past the default 12 confirmations.
    provider.anvil_mine(Some(12), None).await?;
    let head = provider.get_block_number().await?;
    Ok(History {
        first_block,
        last_block,
        head,
    })
}

/// The indexer's `eth_getLogs` calls made bare: blocks 0..=head in its default 2,000-block ranges; returns the logs.
async fn bare_get_logs(
    http: &alloy::transports::http::reqwest::Client,
    chain: &DevChain,
    head: u64,
) -> Result<usize, BenchError> {
    let rpc = chain.anvil.endpoint();
    let topics = json!([
        x402_gateway::chain::indexer::TRANSFER_TOPIC,
        Value::Null,
        alloy::primitives::B256::left_padding_from(chain.pay_to.as_slice())
    ]);
    let mut logs = 0usize;
    let mut from = 0u64;
    while from <= head {
        let to = (from + 1_999).min(head);
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [{
            "address": chain.token, "topics": topics, "fromBlock": format!("{from:#x}"), "toBlock": format!("{to:#x}")
        }]});
        let resp: Value = http.post(&rpc).json(&body).send().await?.json().await?;
        logs += resp["result"].as_array().map_or(0, Vec::len);
        from = to + 1;
    }
    Ok(logs)
}

/// The settings `[chain]` gives this chain with the defaults the binary uses in 2b (12 confirmations, 2,000-block
/// ranges, a 64-block reorg window, 10 s RPC timeout).
fn chain_settings(chain: &DevChain) -> ChainSettings {
    let confirmations = 12;
    ChainSettings {
        network: Network {
            name: "custom".into(),
            chain_id: chain.anvil.chain_id(),
            token: chain.token,
            token_name: "USDC".into(),
            token_version: "2".into(),
        },
        rpc_http: vec![chain.anvil.endpoint()],
        rpc_ws: None,
        pay_to: chain.pay_to,
        confirmations,
        start_block: 0,
        poll_interval: Duration::from_secs(2),
        max_block_range: 2_000,
        reorg_window: (confirmations * 2).max(64),
        rpc_timeout: Duration::from_secs(10),
        ready_max_lag_blocks: confirmations * 3,
        extra_tokens: Vec::new(),
    }
}

/// Phase 2c: bare `eth_getLogs` on both chains at once (blocks 0..=head each), then both networks' backfills at
/// once on one fresh store.
/// Returns each network's figures and (bare, backfill) for both together.
async fn two_networks(
    http: &alloy::transports::http::reqwest::Client,
    chains: [&DevChain; 2],
    heads: [u64; 2],
) -> Result<(Vec<Concurrent>, (Duration, Duration)), BenchError> {
    // Bare: each chain's time runs from the common start to its own last response.
    let bare_started = Instant::now();
    let ((logs_a, bare_a), (logs_b, bare_b)) = futures::future::join(
        timed(bare_started, bare_get_logs(http, chains[0], heads[0])),
        timed(bare_started, bare_get_logs(http, chains[1], heads[1])),
    )
    .await;
    let bare_both = bare_started.elapsed();
    let bare = [(logs_a?, bare_a), (logs_b?, bare_b)];

    // Backfill: both indexers on one fresh SQLite store, each timed from the common start to its own sync.
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("two-networks.db"))?;
    let [first, second] = chains.map(chain_settings);
    let networks = [first.network.caip2(), second.network.caip2()];
    let first = Indexer::new(first, store.clone(), StatusHandle::default())?;
    let second = Indexer::new(second, store.clone(), StatusHandle::default())?;
    let backfill_started = Instant::now();
    let ((synced_a, backfill_a), (synced_b, backfill_b)) = futures::future::join(
        timed(
            backfill_started,
            first.run_until_synced(CancellationToken::new()),
        ),
        timed(
            backfill_started,
            second.run_until_synced(CancellationToken::new()),
        ),
    )
    .await;
    let backfill_both = backfill_started.elapsed();
    synced_a?;
    synced_b?;

    let transfers = store.list_transfers(None).await?;
    let figures = networks
        .into_iter()
        .zip(bare)
        .zip([backfill_a, backfill_b])
        .map(|((network, (bare_logs, bare)), backfill)| Concurrent {
            written: transfers.iter().filter(|t| t.network == network).count(),
            network,
            bare,
            bare_logs,
            backfill,
        })
        .collect();
    Ok((figures, (bare_both, backfill_both)))
}

/// Awaits `fut`; returns its output and the time from `start` to its completion.
async fn timed<T>(start: Instant, fut: impl Future<Output = T>) -> (T, Duration) {
    let out = fut.await;
    (out, start.elapsed())
}

/// Peak resident set of the waited-for children, in KiB (Linux reports ru_maxrss in KiB).
fn children_peak_rss_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage struct into the pointer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    if rc != 0 {
        return -1;
    }
    // SAFETY: initialised by the successful call above.
    unsafe { usage.assume_init() }.ru_maxrss
}
async fn sqlite_write_rate(
    total: u64,
    per_range: u64,
) -> Result<(u64, Duration), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("writes.db"))?;
    let mut updates = Vec::new();
    for r in 0..total / per_range {
        let block = r + 1;
        let hash = format!("{:#066x}", block);
        let transfers = (0..per_range)
            .map(|i| NewTransfer {
                network: "eip155:31337".into(),
                tx_hash: format!("{:#066x}", r * per_range + i + (1 << 40)),
                log_index: i,
                block_number: block,
                block_hash: hash.clone(),
                block_time: None,
                from: "0x1111111111111111111111111111111111111111".into(),
                to: "0x2222222222222222222222222222222222222222".into(),
                value: Usdc(1_000_000 + i as i64),
                token: "0x3333333333333333333333333333333333333333".into(),
                token_value: (1_000_000 + i).to_string(),
            })
            .collect();
        updates.push(RangeUpdate {
            network: "eip155:31337".into(),
            from: block,
            to: block,
            transfers,
            headers: vec![BlockRef {
                number: block,
                hash,
                parent_hash: format!("{:#066x}", block - 1),
                timestamp: 0,
            }],
            confirmations: 1,
            reorg_window: 64,
        });
    }
    let started = Instant::now();
    for u in updates {
        store.apply_range(u).await?;
    }
    Ok((total, started.elapsed()))
}
