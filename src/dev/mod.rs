//! `x402-gateway dev`: the whole product on one machine with no outside services.
//!
//! Starts anvil from the project's own npm install, deploys the test USDC, funds throwaway agent wallets, writes a
//! config and runs the gateway on it. The dev chain uses chain id 31337, never a mainnet id: a signature made for
//! it is worthless anywhere else.

pub mod contracts;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::network::EthereumWallet;
use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::usdc::Usdc;
use contracts::TestUSDC;

/// The dev chain's id (anvil's default; not a mainnet).
pub const DEV_CHAIN_ID: u64 = 31337;

/// Options of `x402-gateway dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Folder for the generated config and the SQLite file.
    #[arg(long, default_value = ".x402-dev")]
    pub data_dir: PathBuf,
    /// Gateway HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8402)]
    pub port: u16,
    /// Seconds between dev-chain blocks (Base makes one every 2 s).
    #[arg(long, default_value_t = 2)]
    pub block_time: u64,
    /// Confirmations required before a payment counts.
    #[arg(long, default_value_t = 3)]
    pub confirmations: u64,
    /// Send a 1.00 USDC demo payment to payTo every N seconds so the indexer has something to show (0 = never).
    #[arg(long, default_value_t = 15)]
    pub demo_payments: u64,
    /// Path to the anvil binary (default: node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil, installed by
    /// `npm ci`).
    #[arg(long, env = "X402_ANVIL")]
    pub anvil: Option<PathBuf>,
}

/// Why the dev stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "anvil not found (looked for {0}); run `npm ci` in the project folder, or pass --anvil PATH"
    )]
    AnvilMissing(String),
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> DevError {
    move |e| DevError::Step {
        step,
        message: e.to_string(),
    }
}

/// Where the project's npm install puts anvil, relative to a project folder.
pub const ANVIL_RELATIVE: &str = "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil";

/// Finds anvil: an explicit path, then `node_modules` in the current folder or above the binary
/// (`target/{debug,release}/x402-gateway` sits two levels below the project), then `anvil` on PATH.
pub fn find_anvil(explicit: Option<&Path>) -> Result<PathBuf, DevError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(DevError::AnvilMissing(p.display().to_string()))
        };
    }
    let mut candidates = vec![PathBuf::from(ANVIL_RELATIVE)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(ANVIL_RELATIVE));
        }
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("anvil");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DevError::AnvilMissing(
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// A running dev chain with the test USDC deployed and wallets funded.
pub struct DevChain {
    pub anvil: AnvilInstance,
    pub token: Address,
    /// Deployer of the token (anvil account 0).
    pub deployer: PrivateKeySigner,
    /// The operator's payTo (anvil account 1).
    pub pay_to: Address,
    /// Throwaway agent wallets (anvil accounts 2..), each funded with test USDC.
    pub agents: Vec<PrivateKeySigner>,
}

/// Starts anvil and deploys the token; `block_time` 0 means mine on every transaction.
pub async fn start_chain(
    anvil_path: &Path,
    block_time: u64,
    agent_funds: Usdc,
) -> Result<DevChain, DevError> {
    let mut builder = Anvil::at(anvil_path).chain_id(DEV_CHAIN_ID).port(0u16);
    if block_time > 0 {
        builder = builder.block_time(block_time);
    }
    let anvil = builder.try_spawn().map_err(step("starting anvil"))?;
    let keys = anvil.keys().to_vec();
    let signer = |i: usize| -> Result<PrivateKeySigner, DevError> {
        keys.get(i)
            .cloned()
            .map(PrivateKeySigner::from)
            .ok_or_else(|| DevError::Step {
                step: "reading anvil accounts",
                message: format!("no account {i}"),
            })
    };
    let deployer = signer(0)?;
    let pay_to = signer(1)?.address();
    let agents = (2..5).map(signer).collect::<Result<Vec<_>, _>>()?;
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(deployer.clone()))
        .connect_http(anvil.endpoint_url());
    let token = TestUSDC::deploy(&provider, "USDC".to_string(), "2".to_string())
        .await
        .map_err(step("deploying the test USDC"))?;
    let token_address = *token.address();
    for agent in &agents {
        token
            .mint(agent.address(), U256::from(agent_funds.atomic() as u64))
            .send()
            .await
            .map_err(step("funding agent wallets"))?
            .get_receipt()
            .await
            .map_err(step("funding agent wallets"))?;
    }
    Ok(DevChain {
        anvil,
        token: token_address,
        deployer,
        pay_to,
        agents,
    })
}

/// The config text the dev stack runs on.
/// `upstream` is the demo upstream's base URL (with `/v1`).
pub fn dev_config(chain: &DevChain, port: u16, confirmations: u64, upstream: &str) -> String {
    format!(
        r#"# Generated by `x402-gateway dev`: a local anvil chain with a test USDC. Not for real money.
[server]
listen = "127.0.0.1:{port}"

[chain]
network = "custom"
chain_id = {chain_id}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{http}"]
rpc_ws = "{ws}"
pay_to = "{pay_to:#x}"
confirmations = {confirmations}
poll_interval_ms = 500

[database]
path = "x402-gateway.db"

[[upstreams]]
name = "demo"
base_url = "{upstream}"

[[models]]
id = "kimi-k2.6"
upstream = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[models]]
id = "glm-4.7"
upstream = "demo"
input_usdc_per_mtok = "0.40"
output_usdc_per_mtok = "1.60"

[[pools]]
slug = "kimi26"
name = "Kimi K2.6, GLM 4.7"
models = ["kimi-k2.6", "glm-4.7"]
duration_days = 30
blocks = [
  {{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 100 }},
  {{ name = "europe", hours_utc = "08:00-16:00", price_usdc = "49.00", seats = 100 }},
  {{ name = "americas", hours_utc = "16:00-24:00", price_usdc = "45.00", seats = 100 }},
]

[credits]
min_topup_usdc = "10.00"

[auth]
claims_require_signature = true
"#,
        chain_id = DEV_CHAIN_ID,
        token = chain.token,
        http = chain.anvil.endpoint(),
        ws = chain.anvil.ws_endpoint(),
        pay_to = chain.pay_to,
        upstream = upstream,
    )
}

/// Runs the dev stack until `shutdown`.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let anvil_path = find_anvil(args.anvil.as_deref())?;
    tracing::info!(anvil = %anvil_path.display(), "starting the dev chain");
    let chain = start_chain(&anvil_path, args.block_time, Usdc::whole(1_000)).await?;

    if args.data_dir.exists() {
        // The chain is new on every run, so an old index would not match it.
        std::fs::remove_dir_all(&args.data_dir).map_err(step("clearing the data folder"))?;
    }
    std::fs::create_dir_all(&args.data_dir).map_err(step("creating the data folder"))?;
    let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(step("binding the demo upstream"))?;
    let upstream_url = format!(
        "http://{}/v1",
        upstream_listener
            .local_addr()
            .map_err(step("binding the demo upstream"))?
    );
    tokio::spawn(upstream::run(
        upstream_listener,
        upstream::DemoConfig {
            models: vec!["kimi-k2.6".into(), "glm-4.7".into()],
            ..upstream::DemoConfig::default()
        },
        std::sync::Arc::new(upstream::DemoStats::default()),
        shutdown.clone(),
    ));
    let config_path = args.data_dir.join("config.toml");
    std::fs::write(
        &config_path,
        dev_config(&chain, args.port, args.confirmations, &upstream_url),
    )
    .map_err(step("writing the dev config"))?;
    let settings = Config::load(&config_path)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(step("binding the HTTP port"))?;
    let addr = listener
        .local_addr()
        .map_err(step("binding the HTTP port"))?;

    print_banner(&chain, &config_path, addr);

    if args.demo_payments > 0 {
        tokio::spawn(demo_payments(
            chain.anvil.endpoint_url(),
            chain.token,
            chain.agents[0].clone(),
            chain.pay_to,
            Duration::from_secs(args.demo_payments),
            shutdown.clone(),
        ));
    }
    crate::api::serve(settings, listener, shutdown).await?;
    drop(chain);
    tracing::info!("dev chain stopped");
    Ok(())
}

fn print_banner(chain: &DevChain, config: &Path, addr: std::net::SocketAddr) {
    let mut out = String::new();
    out.push_str("\n=== x402-gateway dev stack ===\n");
    out.push_str(&format!("gateway      http://{addr}   (GET /healthz)\n"));
    out.push_str(&format!(
        "chain        {}  (anvil, chain id {DEV_CHAIN_ID})\n",
        chain.anvil.endpoint()
    ));
    out.push_str(&format!("test USDC    {:#x}\n", chain.token));
    out.push_str(&format!("payTo        {:#x}\n", chain.pay_to));
    out.push_str(&format!("config       {}\n", config.display()));
    out.push_str(
        "\nThrowaway dev wallets (anvil's well-known keys; NEVER use them on a real network):\n",
    );
    for agent in &chain.agents {
        out.push_str(&format!(
            "  {:#x}  key 0x{}  (1000.00 test USDC)\n",
            agent.address(),
            alloy::hex::encode(agent.to_bytes())
        ));
    }
    out.push_str(&format!(
        "\nTry:\n  curl -s http://{addr}/healthz\n  x402-gateway payments --config {}\n\nCtrl-C stops everything.\n",
        config.display()
    ));
    eprintln!("{out}");
}

async fn demo_payments(
    rpc: alloy::transports::http::reqwest::Url,
    token: Address,
    agent: PrivateKeySigner,
    pay_to: Address,
    every: Duration,
    shutdown: CancellationToken,
) {
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(agent))
        .connect_http(rpc);
    let token = TestUSDC::new(token, &provider);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match token
            .transfer(pay_to, U256::from(1_000_000u64))
            .send()
            .await
        {
            Ok(pending) => {
                tracing::info!(tx = %pending.tx_hash(), "demo agent paid 1.00 USDC to payTo")
            }
            Err(e) => tracing::warn!(error = %e, "demo payment failed"),
        }
        let _ = provider.get_block_number().await;
    }
}
