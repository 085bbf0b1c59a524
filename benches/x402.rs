//! x402 benchmark (`cargo bench --bench x402`): prints figures, asserts nothing about time.
//!
//! On a real anvil chain that mines each transaction at once (so block time is not counted):
//! 1. verify only: `X402::verify` of pre-signed EIP-3009 payments (signature recovery + `eth_call` simulation);
//! 2. verify + self-settle: `X402::pay` (verification, in-flight guard, `eth_estimateGas`, send, receipt).
//!
//! 3. the 402 challenge through the real HTTP server: `POST /x402/credits/10` without payment, from
//!    `BENCH_CONCURRENCY` (default 32) concurrent keep-alive clients, `BENCH_CHALLENGES` (default 20000) requests:
//!    requests/s and latency percentiles;
//! 4. a paid purchase through the real HTTP server (verify + settle + key minted + recorded), sequential.
//!
//! Signing happens before timing starts. Environment: `BENCH_PAYMENTS` (default 300) payments per phase.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "support/figures.rs"]
#[allow(dead_code)]
mod figures;
use figures::{env_u64, percentile};

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{B256, Bytes, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use x402_gateway::chain::Rpc;
use x402_gateway::config::Network;
use x402_gateway::dev;
use x402_gateway::usdc::Usdc;
use x402_gateway::x402::types::{Authorization, ExactEvmPayload};
use x402_gateway::x402::{
    AnyPaymentPayload, ManualClock, PaymentPayload, PaymentRequired, ResourceInfo, SelfSettler,
    X402, eip3009, requirements,
};

fn report(what: &str, mut samples: Vec<Duration>, total: Duration) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what:<22} n={:<4} p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms  ({:.0}/s sequential)",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
        samples.len() as f64 / total.as_secs_f64(),
    );
}

fn sign(
    key: &PrivateKeySigner,
    network: &Network,
    offer: &PaymentRequired,
    now: u64,
) -> Result<AnyPaymentPayload, Box<dyn std::error::Error>> {
    let authorization = Authorization {
        from: key.address(),
        to: offer.accepts[0].pay_to,
        value: offer.accepts[0].amount,
        valid_after: U256::from(now - 600),
        valid_before: U256::from(now + 3_600),
        nonce: B256::from(rand::random::<[u8; 32]>()),
    };
    let digest = eip3009::digest(&authorization, &eip3009::network_domain(network));
    let signature = Bytes::from(key.sign_hash_sync(&digest)?.as_bytes().to_vec());
    Ok(AnyPaymentPayload::V2(PaymentPayload {
        x402_version: 2,
        resource: None,
        accepted: offer.accepts[0].clone(),
        payload: ExactEvmPayload {
            signature,
            authorization,
        },
        extensions: None,
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = env_u64("BENCH_PAYMENTS", 300) as usize;
    let anvil = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dev::ANVIL_RELATIVE);
    let chain = dev::start_chain(&anvil, 0, Usdc::whole(1_000_000)).await?;
    let provider = ProviderBuilder::new().connect_http(chain.anvil.endpoint_url());
    let now = provider
        .get_block_by_number(BlockNumberOrTag::Latest)
        .await?
        .ok_or("no latest block")?
        .header
        .timestamp;
    let network = Network {
        name: "custom".into(),
        chain_id: dev::DEV_CHAIN_ID,
        token: chain.token,
        token_name: "USDC".into(),
        token_version: "2".into(),
    };
    let rpc = Arc::new(Rpc::new(
        &[chain.anvil.endpoint()],
        Duration::from_secs(10),
    )?);
    let hot_wallet = PrivateKeySigner::from(chain.anvil.keys()[5].clone());
    let settler = SelfSettler::new(rpc, network.clone(), hot_wallet)
        .with_receipt_timeout(Duration::from_secs(30));
    let engine = X402::new(
        network.clone(),
        Arc::new(settler),
        Arc::new(ManualClock::new(now)),
    );
    let offer = requirements::payment_required(
        ResourceInfo {
            url: "http://127.0.0.1/x402/bench".into(),
            description: None,
            mime_type: None,
        },
        vec![requirements::exact_requirements(
            &network,
            chain.pay_to,
            Usdc(10_000),
            300,
        )?],
        None,
    );
    println!(
        "x402 benchmark: anvil automine, {n} payments per phase, payTo {:#x}",
        chain.pay_to
    );

    // 1. verify only
    let payments = (0..n)
        .map(|i| sign(&chain.agents[i % chain.agents.len()], &network, &offer, now))
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for p in payments {
        let t = Instant::now();
        let req = engine.request(p, &offer)?;
        engine.verify(&req).await?;
        samples.push(t.elapsed());
    }
    report("verify", samples, started.elapsed());

    // 2. verify + self-settle
    let payments = (0..n)
        .map(|i| sign(&chain.agents[i % chain.agents.len()], &network, &offer, now))
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for p in payments {
        let t = Instant::now();
        engine.pay(p, &offer).await?;
        samples.push(t.elapsed());
    }
    report("verify + self-settle", samples, started.elapsed());

    http_phases(&chain, n).await?;
    Ok(())
}

async fn http_phases(chain: &dev::DevChain, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let config = format!(
        "[chain]\nnetwork = \"custom\"\nchain_id = {}\ntoken_address = \"{:#x}\"\ntoken_name = \"USDC\"\n\
         token_version = \"2\"\nrpc_http = [\"{}\"]\npay_to = \"{:#x}\"\nconfirmations = 1\n\
         poll_interval_ms = 200\n[database]\npath = \"{}\"\n[credits]\nmin_topup_usdc = \"0.01\"\n\
         [x402]\nsettler_key_env = \"BENCH_HOT\"\n[limits]\nrate_limits = false\n",
        dev::DEV_CHAIN_ID,
        chain.token,
        chain.anvil.endpoint(),
        chain.pay_to,
        db.display()
    );
    // anvil account 6: a second hot wallet (account 5 settled the phases above).
    let hot = format!("0x{}", alloy::hex::encode(chain.anvil.keys()[6].to_bytes()));
    let env = move |name: &str| (name == "BENCH_HOT").then(|| hot.clone());
    let settings =
        x402_gateway::config::Config::parse(&config, std::path::Path::new("bench.toml"))?
            .resolve(std::path::Path::new("/"), &env)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = x402_gateway::api::serve_with_env(
                settings,
                listener,
                shutdown,
                x402_gateway::billing::system_clock(),
                &env,
            )
            .await;
        }
    });
    let http = reqwest::Client::new();
    let url = format!("{base}/x402/credits/10");
    for _ in 0..200 {
        if http.post(&url).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // 3. the 402 challenge
    let total = env_u64("BENCH_CHALLENGES", 20_000) as usize;
    let concurrency = env_u64("BENCH_CONCURRENCY", 32) as usize;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let (http, url) = (http.clone(), url.clone());
            let count = total / concurrency + usize::from(c < total % concurrency);
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(count);
                for _ in 0..count {
                    let t = Instant::now();
                    let res = http.post(&url).send().await.expect("challenge");
                    assert_eq!(res.status(), 402);
                    assert!(res.headers().contains_key("payment-required"));
                    res.bytes().await.expect("body");
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(total);
    for t in tasks {
        samples.extend(t.await?);
    }
    let elapsed = started.elapsed();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<22} n={:<5} {:.0} req/s with {concurrency} concurrent clients  p50={:.2} ms  p99={:.2} ms  max={:.2} ms",
        "402 challenge (HTTP)",
        samples.len(),
        samples.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
    );

    // 4. paid purchases over HTTP (verify + settle + claim row, key, ledger, settlement record)
    let res = http.post(&url).send().await?;
    let offered: PaymentRequired =
        x402_gateway::x402::header::decode(res.headers()["payment-required"].to_str()?)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let network = Network {
        name: "custom".into(),
        chain_id: dev::DEV_CHAIN_ID,
        token: chain.token,
        token_name: "USDC".into(),
        token_version: "2".into(),
    };
    let payments = (0..n)
        .map(|i| {
            sign(
                &chain.agents[i % chain.agents.len()],
                &network,
                &offered,
                now,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for p in payments {
        let AnyPaymentPayload::V2(p) = p else {
            continue;
        };
        let value = x402_gateway::x402::header::encode(&p);
        let t = Instant::now();
        let res = http
            .post(&url)
            .header("PAYMENT-SIGNATURE", value)
            .send()
            .await?;
        let status = res.status();
        res.bytes().await?;
        assert_eq!(status, 200, "paid purchase");
        samples.push(t.elapsed());
    }
    report("paid purchase (HTTP)", samples, started.elapsed());
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
