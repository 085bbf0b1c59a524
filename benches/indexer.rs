//! Indexer benchmark (`cargo bench --bench indexer`): prints figures, asserts nothing about time.
//!
//! 1. Makes 10,000 USDC transfers to payTo over 1,000 blocks on a real anvil chain.
//! 2. Backfill: runs the real binary (`x402-gateway index --once`) on a fresh database and times it, against the
//!    same `eth_getLogs` calls made bare over the same range; prints the ratio and the indexer's peak RSS.
//! 3. SQLite: writes 100,000 synthetic transfers through the store in indexer-sized batches (1,000 per range
//!    transaction) and prints transfers/s.
//!
//! Environment: `BENCH_BLOCKS` (default 1000) and `BENCH_PER_BLOCK` (default 10) change the chain's size;
//! `BENCH_LOG=x402_gateway=debug` shows the indexer's per-range timings.

use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::U256;
use alloy::providers::ext::AnvilApi;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::sol_types::SolCall;
use futures::StreamExt;
use serde_json::{Value, json};
use x402_gateway::dev::{self, contracts::TestUSDC};
use x402_gateway::store::Store;
use x402_gateway::store::transfers::{BlockRef, NewTransfer, RangeUpdate};
use x402_gateway::usdc::Usdc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let blocks = env_u64("BENCH_BLOCKS", 1_000);
    let per_block = env_u64("BENCH_PER_BLOCK", 10);
    let anvil = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dev::ANVIL_RELATIVE);
    let chain = dev::start_chain(&anvil, 0, Usdc::whole(1_000_000)).await?;
    let rpc = chain.anvil.endpoint();

    // --- 1. the chain: `per_block` transfers in each of `blocks` blocks -------------------------------------
    let started = Instant::now();
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
    eprintln!(
        "chain ready: {} transfers in blocks {first_block}..={last_block}, head {head} ({:.1}s)",
        blocks * per_block,
        started.elapsed().as_secs_f64()
    );

    // --- 2a. bare eth_getLogs over the same range, in the indexer's default 2,000-block ranges ---------------
    let http = alloy::transports::http::reqwest::Client::new();
    let topics = json!([
        x402_gateway::chain::indexer::TRANSFER_TOPIC,
        Value::Null,
        alloy::primitives::B256::left_padding_from(chain.pay_to.as_slice())
    ]);
    let bare_started = Instant::now();
    let mut bare_logs = 0usize;
    let mut from = 0u64;
    while from <= head {
        let to = (from + 1_999).min(head);
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [{
            "address": chain.token, "topics": topics, "fromBlock": format!("{from:#x}"), "toBlock": format!("{to:#x}")
        }]});
        let resp: Value = http.post(&rpc).json(&body).send().await?.json().await?;
        bare_logs += resp["result"].as_array().map_or(0, Vec::len);
        from = to + 1;
    }
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
        "  SQLite writes (1,000 per transaction) : {:>9.0} transfers/s  ({rows} rows in {:.1} ms, synchronous=FULL)",
        rows as f64 / write_time.as_secs_f64(),
        ms(write_time)
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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
