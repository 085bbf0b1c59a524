//! `x402-gateway dev`: the whole product on one machine with no outside services, and `x402-gateway demo`.
//!
//! Starts anvil from the project's own npm install, deploys the test USDC (and puts the test Permit2 and x402 upto
//! proxy at their canonical addresses), funds throwaway agent wallets, writes a config and runs the gateway and a
//! demo upstream on it. The dev chain uses chain id 31337, never a mainnet id: a signature made for it is worthless
//! anywhere else.
//!
//! The data folder (`.x402-dev/` by default) keeps the chain and the database together between runs: anvil loads
//! and saves its whole state (blocks, receipts, balances) in `chain-state.json` (`anvil --state`), and the gateway's
//! SQLite file indexes that same chain. A run reuses both, after checking that the database's last indexed block is
//! on the saved chain with the same hash; `--reset` deletes both and starts over. Stopping (Ctrl-C or SIGTERM) stops
//! the gateway first and then anvil with SIGTERM, on which anvil saves its state, so the saved chain always holds
//! everything the database has seen. An anvil left running by a `dev` that was killed outright is stopped (and so
//! saves its state) by the next run. `agent` is the demo agent.

pub mod agent;
pub mod contracts;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;
use crate::usdc::Usdc;
use contracts::TestUSDC;

/// The dev chain's id (anvil's default; not a mainnet).
pub const DEV_CHAIN_ID: u64 = 31337;

/// Files in the data folder.
pub const CONFIG_FILE: &str = "config.toml";
pub const DB_FILE: &str = "x402-gateway.db";
/// anvil's saved state (`--state`): loaded at start, written when anvil stops.
pub const CHAIN_STATE_FILE: &str = "chain-state.json";
/// What `demo` and a later `dev` need to know about the stack: token, payTo, wallets, URLs.
pub const DEV_FILE: &str = "dev.json";
/// The dev secrets as `export NAME=value` lines (mode 0600), for CLI commands run on the generated config.
pub const ENV_FILE: &str = "dev.env";
const ANVIL_PID_FILE: &str = "anvil.pid";
/// Environment variables the generated config names: the dev settler's key (anvil account 5) and the dev admin and
/// auditor tokens. `dev` gives them to its in-process gateway without touching its own process environment.
pub const SETTLER_KEY_ENV: &str = "X402_DEV_SETTLER_KEY";
pub const ADMIN_TOKEN_ENV: &str = "X402_DEV_ADMIN_TOKEN";
pub const AUDITOR_TOKEN_ENV: &str = "X402_DEV_AUDITOR_TOKEN";
const LOCK_FILE: &str = ".lock";

/// What a fresh chain gives each agent wallet, and the floor under which a reused one is refilled.
const AGENT_FUNDS_USDC: i64 = 1_000;
const REFILL_BELOW_USDC: i64 = 100;

/// Options of `x402-gateway dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Folder for the generated config, the SQLite file and the saved chain (kept between runs).
    #[arg(long, default_value = ".x402-dev")]
    pub data_dir: PathBuf,
    /// Start over: delete the saved chain and the database, then start a fresh chain. Without it, a run continues
    /// the previous run's chain and database.
    #[arg(long)]
    pub reset: bool,
    /// Once the stack is up, run the demo agent (credits, then a pool block) and stop; exits non-zero naming the
    /// step that failed.
    #[arg(long)]
    pub demo: bool,
    /// Gateway HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8402)]
    pub port: u16,
    /// Seconds between dev-chain blocks (Base makes one every 2 s).
    #[arg(long, default_value_t = 2)]
    pub block_time: u64,
    /// Confirmations required before a payment counts.
    #[arg(long, default_value_t = 3)]
    pub confirmations: u64,
    /// Send a 1.00 USDC payment to payTo from dev wallet 3 every N seconds, to watch the indexer (0 = never).
    #[arg(long, default_value_t = 0)]
    pub demo_payments: u64,
    /// Path to the anvil binary (default: node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil, installed by
    /// `npm ci`).
    #[arg(long, env = "X402_ANVIL")]
    pub anvil: Option<PathBuf>,
}

/// Options of `x402-gateway demo`: the demo agent against a running gateway on the dev chain.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The gateway's base URL (default: the one `dev` wrote to DATA_DIR/dev.json).
    #[arg(long, env = "X402_GATEWAY_URL")]
    pub gateway: Option<String>,
    /// JSON-RPC URL of the dev chain (default: from DATA_DIR/dev.json).
    #[arg(long)]
    pub rpc: Option<String>,
    /// The paying wallet's private key, 0x-hex; a throwaway dev key only (default: dev wallet 1 from dev.json).
    #[arg(long, env = "X402_DEMO_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Where `dev` keeps dev.json.
    #[arg(long, default_value = ".x402-dev")]
    pub data_dir: PathBuf,
    /// What to buy, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [agent::Journey::Credits, agent::Journey::Pool, agent::Journey::Upto])]
    pub journeys: Vec<agent::Journey>,
    /// The model to ask for.
    #[arg(long, default_value = "kimi-k2.6")]
    pub model: String,
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
    #[error(
        "another `x402-gateway dev` is running on {0} (stop it first, or pass another --data-dir)"
    )]
    Busy(PathBuf),
    #[error(
        "cannot reuse {dir}: {reason}. The saved chain and the database must be kept together; run again with \
         --reset to start over (it deletes the saved chain and the database in {dir})"
    )]
    CannotReuse { dir: PathBuf, reason: String },
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> DevError {
    move |e| DevError::Step {
        step,
        message: e.to_string(),
    }
}

/// One funded dev wallet, as written to `dev.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevWallet {
    pub address: Address,
    /// anvil's well-known test key: public knowledge, dev chain only.
    pub private_key: String,
}

/// `dev.json`: what the stack is made of, for `demo` and for the next `dev`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevState {
    pub warning: String,
    pub chain_id: u64,
    pub token: Address,
    pub pay_to: Address,
    pub wallets: Vec<DevWallet>,
    pub created_at: i64,
    /// The URLs of the last run (they change between runs; the contents do not).
    pub rpc_url: String,
    pub gateway_url: String,
    /// The standard x402 settlement hot wallet (anvil account 5; pays gas in dev ETH). Absent in a dev.json written
    /// before x402 was on in dev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settler: Option<DevWallet>,
    /// Dev-only operator tokens (random, made on the first run that lacks them, then kept): `/admin` takes the admin
    /// token, `/api/audit/*` the auditor token, each as `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auditor_token: Option<String>,
}

impl DevState {
    /// Reads `dir/dev.json`.
    pub fn load(dir: &Path) -> Result<DevState, DevError> {
        let path = dir.join(DEV_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DevError::Step {
            step: "reading dev.json",
            message: format!("{}: {e}", path.display()),
        })?;
        serde_json::from_str(&text).map_err(|e| DevError::Step {
            step: "reading dev.json",
            message: format!("{}: {e}", path.display()),
        })
    }

    fn save(&self, dir: &Path) -> Result<(), DevError> {
        let text = serde_json::to_string_pretty(self).map_err(step("writing dev.json"))?;
        write_atomically(&dir.join(DEV_FILE), text.as_bytes()).map_err(step("writing dev.json"))
    }
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
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
    /// The standard x402 settler (anvil account 5): submits `transferWithAuthorization`, holds dev ETH only.
    pub settler: PrivateKeySigner,
}

/// Starts anvil and deploys the token; `block_time` 0 means mine on every transaction. Nothing is saved.
pub async fn start_chain(
    anvil_path: &Path,
    block_time: u64,
    agent_funds: Usdc,
) -> Result<DevChain, DevError> {
    start_chain_with_id(anvil_path, DEV_CHAIN_ID, block_time, agent_funds).await
}

/// [`start_chain`] with another chain id: a second network beside the dev chain (the same deployer deploys the
/// token at the same address on both, as CREATE2 deployments do on real networks).
pub async fn start_chain_with_id(
    anvil_path: &Path,
    chain_id: u64,
    block_time: u64,
    agent_funds: Usdc,
) -> Result<DevChain, DevError> {
    deploy(
        spawn_anvil_with_id(anvil_path, chain_id, block_time, None)?,
        agent_funds,
    )
    .await
}

/// Spawns anvil on a free port; with `state`, it loads that file if it exists and writes it when stopped.
fn spawn_anvil(
    anvil_path: &Path,
    block_time: u64,
    state: Option<&Path>,
) -> Result<AnvilInstance, DevError> {
    spawn_anvil_with_id(anvil_path, DEV_CHAIN_ID, block_time, state)
}

fn spawn_anvil_with_id(
    anvil_path: &Path,
    chain_id: u64,
    block_time: u64,
    state: Option<&Path>,
) -> Result<AnvilInstance, DevError> {
    let mut builder = Anvil::at(anvil_path).chain_id(chain_id).port(0u16);
    if block_time > 0 {
        builder = builder.block_time(block_time);
    }
    if let Some(state) = state {
        builder = builder.arg("--state").arg(state);
    }
    builder.try_spawn().map_err(step("starting anvil"))
}

/// anvil's well-known accounts: 0 deploys, 1 is payTo, 2..5 are the agent wallets, 5 settles standard x402.
type Accounts = (
    PrivateKeySigner,
    Address,
    Vec<PrivateKeySigner>,
    PrivateKeySigner,
);

fn accounts(anvil: &AnvilInstance) -> Result<Accounts, DevError> {
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
    let settler = signer(5)?;
    Ok((deployer, pay_to, agents, settler))
}

/// Deploys the test USDC on a new chain, installs Permit2 and the x402 upto proxy at their canonical addresses
/// ([`contracts::install_upto_contracts`]) and funds the agent wallets.
async fn deploy(anvil: AnvilInstance, agent_funds: Usdc) -> Result<DevChain, DevError> {
    let (deployer, pay_to, agents, settler) = accounts(&anvil)?;
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(deployer.clone()))
        .connect_http(anvil.endpoint_url());
    let token = TestUSDC::deploy(&provider, "USDC".to_string(), "2".to_string())
        .await
        .map_err(step("deploying the test USDC"))?;
    let token_address = *token.address();
    contracts::install_upto_contracts(&provider)
        .await
        .map_err(step("installing Permit2 and the upto proxy"))?;
    let chain = DevChain {
        anvil,
        token: token_address,
        deployer,
        pay_to,
        agents,
        settler,
    };
    fund(&chain, agent_funds, None).await?;
    Ok(chain)
}

/// Mints test USDC to every agent wallet holding less than `below` (all of them when `None`), up to `target`.
/// Returns how many were funded.
async fn fund(chain: &DevChain, target: Usdc, below: Option<Usdc>) -> Result<usize, DevError> {
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(chain.deployer.clone()))
        .connect_http(chain.anvil.endpoint_url());
    let token = TestUSDC::new(chain.token, &provider);
    let target_atomic = U256::from(target.atomic().max(0) as u64);
    let mut funded = 0;
    for agent in &chain.agents {
        let balance = token
            .balanceOf(agent.address())
            .call()
            .await
            .map_err(step("funding agent wallets"))?;
        let amount = match below {
            None => target_atomic,
            Some(floor) if balance < U256::from(floor.atomic().max(0) as u64) => {
                target_atomic.saturating_sub(balance)
            }
            Some(_) => continue,
        };
        token
            .mint(agent.address(), amount)
            .send()
            .await
            .map_err(step("funding agent wallets"))?
            .get_receipt()
            .await
            .map_err(step("funding agent wallets"))?;
        funded += 1;
    }
    Ok(funded)
}

/// Picks up the chain saved in the data folder and checks that the database indexed this very chain.
async fn resume(anvil: AnvilInstance, state: &DevState, dir: &Path) -> Result<DevChain, DevError> {
    let cannot = |reason: String| DevError::CannotReuse {
        dir: dir.to_path_buf(),
        reason,
    };
    let (deployer, pay_to, agents, settler) = accounts(&anvil)?;
    if state.pay_to != pay_to || state.chain_id != DEV_CHAIN_ID {
        return Err(cannot(format!(
            "dev.json names payTo {:#x} on chain {}, but this anvil's account 1 is {pay_to:#x} on chain {DEV_CHAIN_ID}",
            state.pay_to, state.chain_id
        )));
    }
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint_url());
    let head = provider
        .get_block_number()
        .await
        .map_err(step("reading the saved chain"))?;
    let code = provider
        .get_code_at(state.token)
        .await
        .map_err(step("reading the saved chain"))?;
    if code.is_empty() {
        return Err(cannot(format!(
            "the saved chain ({CHAIN_STATE_FILE}, head {head}) has no contract at the test USDC address {:#x}",
            state.token
        )));
    }
    // A chain saved before they existed lacks them; putting the same code back is harmless.
    contracts::install_upto_contracts(&provider)
        .await
        .map_err(step("installing Permit2 and the upto proxy"))?;
    // The database's checkpoint is the last block it indexed; the saved chain must hold that very block.
    let store = Store::open(&dir.join(DB_FILE)).map_err(step("opening the database"))?;
    let checkpoint = store
        .checkpoint(&format!("eip155:{DEV_CHAIN_ID}"))
        .await
        .map_err(step("reading the database"))?;
    drop(store);
    if let Some(cp) = checkpoint {
        let block = provider
            .get_block_by_number(cp.number.into())
            .await
            .map_err(step("reading the saved chain"))?;
        let saved = block.map(|b| format!("{:#x}", b.header.hash));
        if saved.as_deref() != Some(cp.hash.as_str()) {
            return Err(cannot(format!(
                "the database indexed block {} ({}), but the saved chain {} — the last run was probably killed \
                 before anvil could save its state (kill -9, a crash), so the chain lost blocks the database saw",
                cp.number,
                cp.hash,
                match saved {
                    Some(h) => format!("has another block there ({h})"),
                    None => format!("ends at block {head}"),
                }
            )));
        }
    }
    Ok(DevChain {
        anvil,
        token: state.token,
        deployer,
        pay_to,
        agents,
        settler,
    })
}

/// How a run starts.
enum Start {
    Fresh,
    Reuse(Box<DevState>),
}

/// Fresh when the folder holds none of the stack's files, reuse when it holds all three, an error otherwise.
fn how_to_start(dir: &Path) -> Result<Start, DevError> {
    let present = |f: &str| dir.join(f).exists();
    let (dev, db, chain) = (
        present(DEV_FILE),
        present(DB_FILE),
        present(CHAIN_STATE_FILE),
    );
    match (dev, db, chain) {
        (false, false, false) => Ok(Start::Fresh),
        (true, true, true) => Ok(Start::Reuse(Box::new(DevState::load(dir)?))),
        _ => Err(DevError::CannotReuse {
            dir: dir.to_path_buf(),
            reason: format!(
                "it is incomplete ({DEV_FILE} {}, {DB_FILE} {}, {CHAIN_STATE_FILE} {}); a run that was killed before \
                 its chain was first saved, or a folder from an older version that did not save the chain, leaves \
                 it so",
                if dev { "present" } else { "missing" },
                if db { "present" } else { "missing" },
                if chain { "present" } else { "missing" },
            ),
        }),
    }
}

/// Deletes everything in `dir` but the lock file.
fn reset(dir: &Path) -> Result<usize, DevError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(step("clearing the data folder"))? {
        let entry = entry.map_err(step("clearing the data folder"))?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .map_err(step("clearing the data folder"))?;
        removed += 1;
    }
    Ok(removed)
}

/// Holds the data folder's lock for the life of the run: two `dev` on one folder would corrupt each other.
fn lock(dir: &Path) -> Result<std::fs::File, DevError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(step("locking the data folder"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DevError::Busy(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(step("locking the data folder")(e)),
    }
}

/// Stops an anvil that a previous `dev` on this folder left running (it was killed outright, so it could not stop
/// its child). SIGTERM makes that anvil save its state, which then holds everything the database saw.
fn stop_stale_anvil(dir: &Path) {
    let pid_file = dir.join(ANVIL_PID_FILE);
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    // Only an anvil started on this folder's state file: the pid may have been reused by anything else.
    let state = dir.join(CHAIN_STATE_FILE);
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        args.first().is_some_and(|a| a.ends_with("anvil"))
            && args.iter().any(|a| Path::new(a) == state)
    });
    if ours {
        eprintln!(
            "stopping anvil pid {pid}, left running by a dev run that was killed; it saves its chain first"
        );
        signal(pid, Signal::Term);
        let deadline = Instant::now() + Duration::from_secs(15);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            signal(pid, Signal::Kill);
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

/// Whether `pid` runs (a zombie, exited but not yet reaped by its new parent, does not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // `pid (comm) state …`: comm may hold spaces, so the state follows the last `)`.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

enum Signal {
    Term,
    Kill,
}

fn signal(pid: i32, sig: Signal) {
    let sig = match sig {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of this process; the pid was checked above to be
    // an anvil started on this data folder.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The config text the dev stack runs on.
/// `gpu_a` and `gpu_b` are the two demo upstreams' base URLs (with `/v1`): `kimi-k2.6` is served by both (two
/// deployments, failover between them), `glm-4.7` by the first.
pub fn dev_config(
    chain: &DevChain,
    port: u16,
    confirmations: u64,
    gpu_a: &str,
    gpu_b: &str,
) -> String {
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

# Two demo "GPU servers". Each can play a failing one: POST <base_url>/../demo/fault {{"mode": "fail-500"}}.
[[upstreams]]
name = "gpu-a"
base_url = "{gpu_a}"

[[upstreams]]
name = "gpu-b"
base_url = "{gpu_b}"

# Served by both: spread by weight over the healthy ones, failed over before any byte reaches the client.
[[models]]
id = "kimi-k2.6"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
deployments = [
  {{ upstream = "gpu-a", weight = 1 }},
  {{ upstream = "gpu-b", weight = 1 }},
]

# Also sold one request at a time for a standard x402 `exact` payment, no key needed (PAYMENT-SIGNATURE on
# /v1/chat/completions and the other inference routes; output capped to what 0.01 USDC buys).
[[models]]
id = "glm-4.7"
upstream = "gpu-a"
input_usdc_per_mtok = "0.40"
output_usdc_per_mtok = "1.60"
per_request_usdc = "0.01"
# And per token with the x402 `upto` scheme: the 402 offers this request's worst case as a maximum (Permit2), the
# payment settles the metered cost (`x402-gateway demo --journeys upto`).
upto = true

# A failing deployment cools down after 3 failures for 10 s, then is probed (GET <base_url>/models).
[routing]
failures_before_cooldown = 3
cooldown_secs = 10

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
# DEV-ONLY operator tokens, random per data folder (kept in dev.json, exported in dev.env): /admin takes the admin
# token, /api/audit/* the auditor token, as `Authorization: Bearer <token>`.
admin_token_env = "{admin_env}"
auditor_token_env = "{auditor_env}"

# Standard x402 (PAYMENT-SIGNATURE / X-PAYMENT): POST /x402/credits/{{amount}}, /x402/pools/{{slug}}?blocks=…, and
# per-request payment for glm-4.7. Settled by the gateway itself from a dev settler wallet (anvil account 5, a
# publicly known test key with dev ETH for gas), whose key `dev` passes in {settler_env}.
[x402]
settlement = "self"
settler_key_env = "{settler_env}"

# Per-IP limits on requests without a key and on claim attempts (429 + Retry-After). Everything on this machine
# comes from 127.0.0.1: set rate_limits = false (or raise the numbers) before load-testing the dev stack.
[limits]
rate_limits = true
keyless_per_minute = 600
keyless_burst = 100
claims_per_minute = 30
claims_burst = 10
"#,
        chain_id = DEV_CHAIN_ID,
        token = chain.token,
        http = chain.anvil.endpoint(),
        ws = chain.anvil.ws_endpoint(),
        pay_to = chain.pay_to,
        admin_env = ADMIN_TOKEN_ENV,
        auditor_env = AUDITOR_TOKEN_ENV,
        settler_env = SETTLER_KEY_ENV,
    )
}

/// A random dev token: `dev_` and 32 bytes of hex.
fn new_token() -> String {
    format!("dev_{}", alloy::hex::encode(rand::random::<[u8; 32]>()))
}

fn key_hex(key: &PrivateKeySigner) -> String {
    format!("0x{}", alloy::hex::encode(key.to_bytes()))
}

/// The variables the generated config names, with their values: the settler's key and the two dev tokens.
fn dev_env(chain: &DevChain, admin: &str, auditor: &str) -> Vec<(String, String)> {
    vec![
        (SETTLER_KEY_ENV.to_string(), key_hex(&chain.settler)),
        (ADMIN_TOKEN_ENV.to_string(), admin.to_string()),
        (AUDITOR_TOKEN_ENV.to_string(), auditor.to_string()),
    ]
}

/// Writes `dir/dev.env` (0600): `export NAME='value'` lines, so CLI commands can read the generated config
/// (`set -a; . .x402-dev/dev.env; set +a`).
fn write_env_file(dir: &Path, vars: &[(String, String)]) -> Result<(), DevError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::from(
        "# Written by `x402-gateway dev`: DEV-ONLY secrets of this local stack (anvil's public test key, random dev \
         tokens).\n# Load before CLI commands on config.toml: set -a; . ./dev.env; set +a\n",
    );
    for (k, v) in vars {
        text.push_str(&format!("export {k}='{v}'\n"));
    }
    let path = dir.join(ENV_FILE);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(step("writing dev.env"))?;
    f.write_all(text.as_bytes())
        .map_err(step("writing dev.env"))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(step("writing dev.env"))
}

/// Runs the dev stack until `shutdown` (or, with `--demo`, until the demo agent is done).
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let anvil_path = find_anvil(args.anvil.as_deref())?;
    std::fs::create_dir_all(&args.data_dir).map_err(step("creating the data folder"))?;
    // anvil is given an absolute state path; it runs in this folder but the path must survive any cd.
    let dir = args
        .data_dir
        .canonicalize()
        .map_err(step("creating the data folder"))?;
    let _lock = lock(&dir)?;
    stop_stale_anvil(&dir);
    if args.reset {
        let removed = reset(&dir)?;
        eprintln!(
            "--reset: deleted {removed} files from {} (saved chain, database, config); starting a fresh chain",
            dir.display()
        );
    }
    let start = how_to_start(&dir)?;
    // The gateway's port first: a busy port must fail before anything is created in the data folder.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .map_err(|e| DevError::Step {
            step: "binding the HTTP port",
            message: format!(
                "127.0.0.1:{}: {e} (pass --port, or 0 for any free one)",
                args.port
            ),
        })?;
    let addr = listener
        .local_addr()
        .map_err(step("binding the HTTP port"))?;
    // Until dev.json is written, a fresh start that fails must not leave a half folder that the next run would refuse
    // to reuse. Declared before the chain, so it runs after anvil (dropped first) has saved its state.
    let mut half_made = HalfMadeGuard {
        dir: matches!(start, Start::Fresh).then(|| dir.clone()),
    };
    tracing::info!(anvil = %anvil_path.display(), "starting the dev chain");
    let anvil = spawn_anvil(
        &anvil_path,
        args.block_time,
        Some(&dir.join(CHAIN_STATE_FILE)),
    )?;
    let anvil_pid = anvil.child().id();
    // anvil writes its state when it stops: on our SIGTERM, or on its own when Ctrl-C in a terminal reaches the
    // whole process group. Either way the file changes after this point.
    let state_file = dir.join(CHAIN_STATE_FILE);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let loaded = modified(&state_file);
    std::fs::write(dir.join(ANVIL_PID_FILE), anvil_pid.to_string())
        .map_err(step("writing anvil.pid"))?;
    let start_state = match &start {
        Start::Reuse(state) => Some(DevState::clone(state)),
        Start::Fresh => None,
    };
    let (chain, created_at, reused) = match start {
        Start::Fresh => (
            deploy(anvil, Usdc::whole(AGENT_FUNDS_USDC)).await?,
            crate::store::now_unix(),
            false,
        ),
        Start::Reuse(ref state) => {
            let chain = resume(anvil, state, &dir).await?;
            let refilled = fund(
                &chain,
                Usdc::whole(AGENT_FUNDS_USDC),
                Some(Usdc::whole(REFILL_BELOW_USDC)),
            )
            .await?;
            if refilled > 0 {
                tracing::info!(
                    wallets = refilled,
                    "refilled dev wallets below {REFILL_BELOW_USDC} USDC"
                );
            }
            (chain, state.created_at, true)
        }
    };

    let mut upstream_urls = Vec::new();
    for _ in 0..2 {
        let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(step("binding a demo upstream"))?;
        upstream_urls.push(format!(
            "http://{}/v1",
            upstream_listener
                .local_addr()
                .map_err(step("binding a demo upstream"))?
        ));
        tokio::spawn(upstream::run(
            upstream_listener,
            upstream::DemoConfig {
                models: vec!["kimi-k2.6".into(), "glm-4.7".into()],
                ..upstream::DemoConfig::default()
            },
            std::sync::Arc::new(upstream::DemoStats::default()),
            shutdown.clone(),
        ));
    }
    let upstream_url = upstream_urls.join("  ");
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(
        &config_path,
        dev_config(
            &chain,
            addr.port(),
            args.confirmations,
            &upstream_urls[0],
            &upstream_urls[1],
        ),
    )
    .map_err(step("writing the dev config"))?;
    // Dev tokens: made once per data folder, then kept in dev.json like the rest of the stack.
    let previous = match &start_state {
        Some(s) => (s.admin_token.clone(), s.auditor_token.clone()),
        None => (None, None),
    };
    let admin_token = previous.0.unwrap_or_else(new_token);
    let auditor_token = previous.1.unwrap_or_else(new_token);
    let vars = dev_env(&chain, &admin_token, &auditor_token);
    write_env_file(&dir, &vars)?;
    // The in-process gateway reads these through its env lookup, not through this process's environment.
    let env = move |name: &str| {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
    };
    let config_text =
        std::fs::read_to_string(&config_path).map_err(step("reading the dev config"))?;
    let settings = Config::parse(&config_text, &config_path)?.resolve(&dir, &env)?;
    let gateway_url = format!("http://{addr}");
    let state = DevState {
        warning: "Written by `x402-gateway dev`. The private keys are anvil's publicly known test keys: they are \
                  for this local dev chain only and must never hold real funds."
            .into(),
        chain_id: DEV_CHAIN_ID,
        token: chain.token,
        pay_to: chain.pay_to,
        wallets: chain
            .agents
            .iter()
            .map(|a| DevWallet {
                address: a.address(),
                private_key: format!("0x{}", alloy::hex::encode(a.to_bytes())),
            })
            .collect(),
        created_at,
        rpc_url: chain.anvil.endpoint(),
        gateway_url: gateway_url.clone(),
        settler: Some(DevWallet {
            address: chain.settler.address(),
            private_key: key_hex(&chain.settler),
        }),
        admin_token: Some(admin_token.clone()),
        auditor_token: Some(auditor_token.clone()),
    };
    state.save(&dir)?;
    half_made.dir = None;

    let balances = wallet_balances(&chain).await;
    print_banner(&Banner {
        chain: &chain,
        dir: &dir,
        gateway: &gateway_url,
        upstream: &upstream_url,
        gpu_b_root: upstream_urls[1].trim_end_matches("/v1"),
        anvil_pid,
        block_time: args.block_time,
        confirmations: args.confirmations,
        reused,
        balances: &balances,
        demo: args.demo,
        admin_token: &admin_token,
        auditor_token: &auditor_token,
    });

    if args.demo_payments > 0
        && let Some(wallet) = chain.agents.get(2)
    {
        tokio::spawn(demo_payments(
            chain.anvil.endpoint_url(),
            chain.token,
            wallet.clone(),
            chain.pay_to,
            Duration::from_secs(args.demo_payments),
            shutdown.clone(),
        ));
    }
    let mut server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            crate::api::serve_with_env(
                settings,
                listener,
                shutdown,
                crate::billing::system_clock(),
                &env,
            )
            .await
        }
    });
    let demo = async {
        if !args.demo {
            return std::future::pending().await;
        }
        let config = agent::AgentConfig {
            gateway: gateway_url.clone(),
            rpc: chain.anvil.endpoint(),
            wallet: chain.agents[0].clone(),
            model: "kimi-k2.6".into(),
            journeys: vec![
                agent::Journey::Credits,
                agent::Journey::Pool,
                agent::Journey::Upto,
            ],
        };
        wait_ready(&gateway_url).await?;
        agent::run(config).await
    };
    let (served, demo_result) = tokio::select! {
        served = &mut server => (served, None),
        result = demo => {
            shutdown.cancel();
            (server.await, Some(result))
        }
    };
    shutdown.cancel();
    // Stop anvil off the async threads: it gets SIGTERM, saves its state and exits (alloy waits up to 10 s).
    let stopped = tokio::task::spawn_blocking(move || drop(chain)).await;
    let _ = std::fs::remove_file(dir.join(ANVIL_PID_FILE));
    let saved = modified(&state_file);
    if stopped.is_ok() && saved.is_some() && saved != loaded {
        eprintln!(
            "stopped: anvil saved the chain to {}; run again to continue with it, or with --reset to start over",
            state_file.display()
        );
    } else {
        eprintln!(
            "stopped, but anvil did not save its chain to {}; the next run will say whether it can continue",
            state_file.display()
        );
    }
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => anyhow::bail!("the gateway task failed: {e}"),
    }
    match demo_result {
        Some(result) => result?,
        None if args.demo => anyhow::bail!("the stack stopped before the demo finished"),
        None => {}
    }
    Ok(())
}

/// Deletes what a failed fresh start created (the saved chain, dev.json, the database) unless disarmed.
struct HalfMadeGuard {
    dir: Option<PathBuf>,
}

impl Drop for HalfMadeGuard {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            for f in [
                CHAIN_STATE_FILE,
                DEV_FILE,
                ENV_FILE,
                DB_FILE,
                CONFIG_FILE,
                ANVIL_PID_FILE,
            ] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
    }
}

/// Polls `/healthz` until the gateway answers and its indexer has indexed a block.
async fn wait_ready(gateway: &str) -> Result<(), agent::DemoError> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match http.get(format!("{gateway}/healthz")).send().await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|b| b["indexer"]["indexedHead"].is_u64()),
            Err(_) => false,
        };
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(agent::DemoError::Setup(format!(
                "the gateway at {gateway} did not report an indexed block within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wallet_balances(chain: &DevChain) -> Vec<Option<Usdc>> {
    let provider = ProviderBuilder::new().connect_http(chain.anvil.endpoint_url());
    let token = TestUSDC::new(chain.token, &provider);
    let mut out = Vec::new();
    for a in &chain.agents {
        out.push(
            token
                .balanceOf(a.address())
                .call()
                .await
                .ok()
                .and_then(|b| i64::try_from(b).ok())
                .map(Usdc),
        );
    }
    out
}

/// `x402-gateway demo`: the demo agent against a running gateway (by default the one `dev` runs).
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let saved = DevState::load(&args.data_dir);
    let need = |what: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "no {what}: pass --{what}, or start `scripts/dev` first (it writes {}){}",
            args.data_dir.join(DEV_FILE).display(),
            match &saved {
                Err(e) => format!("; {e}"),
                Ok(_) => String::new(),
            }
        )
    };
    let saved = saved.as_ref().ok();
    let gateway = args
        .gateway
        .clone()
        .or_else(|| saved.map(|s| s.gateway_url.clone()))
        .ok_or_else(|| need("gateway"))?;
    let rpc = args
        .rpc
        .clone()
        .or_else(|| saved.map(|s| s.rpc_url.clone()))
        .ok_or_else(|| need("rpc"))?;
    let key = args
        .key
        .clone()
        .or_else(|| saved.and_then(|s| s.wallets.first().map(|w| w.private_key.clone())))
        .ok_or_else(|| need("key"))?;
    let wallet: PrivateKeySigner = key
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--key: not a 0x-hex private key"))?;
    agent::run(agent::AgentConfig {
        gateway,
        rpc,
        wallet,
        model: args.model,
        journeys: args.journeys,
    })
    .await?;
    Ok(())
}

struct Banner<'a> {
    chain: &'a DevChain,
    dir: &'a Path,
    gateway: &'a str,
    upstream: &'a str,
    /// The second demo upstream's root (its fault switch is `/demo/fault` there).
    gpu_b_root: &'a str,
    anvil_pid: u32,
    block_time: u64,
    confirmations: u64,
    reused: bool,
    balances: &'a [Option<Usdc>],
    demo: bool,
    admin_token: &'a str,
    auditor_token: &'a str,
}

fn print_banner(b: &Banner) {
    let chain = b.chain;
    let gw = b.gateway;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(String::new());
    line(format!(
        "=== x402-gateway dev stack ({}) ===",
        if b.reused {
            "reusing the saved chain and database; --reset starts over"
        } else {
            "fresh chain and database"
        }
    ));
    line(format!("gateway      {gw}"));
    line(format!(
        "chain        {}  (anvil pid {}, chain id {DEV_CHAIN_ID}, {})",
        chain.anvil.endpoint(),
        b.anvil_pid,
        if b.block_time > 0 {
            format!("a block every {} s", b.block_time)
        } else {
            "a block per transaction".to_string()
        }
    ));
    line(format!("test USDC    {:#x}", chain.token));
    line(format!(
        "payTo        {:#x}  ({} confirmations)",
        chain.pay_to, b.confirmations
    ));
    line(format!(
        "upstreams    {}  (two demo GPU servers: kimi-k2.6 on both, glm-4.7 on the first)",
        b.upstream
    ));
    line(format!(
        "data         {}  ({CONFIG_FILE}, {DB_FILE}, {CHAIN_STATE_FILE}, {DEV_FILE}, {ENV_FILE}; kept between runs)",
        b.dir.display()
    ));
    line(format!(
        "x402         standard x402 on: POST {gw}/x402/credits/{{amount}}, {gw}/x402/pools/{{slug}}?blocks=…; \
         glm-4.7 also per request (0.01 USDC, `exact`) and per token (`upto`: the metered cost, settled after the \
         answer; `x402-gateway demo --journeys upto`), PAYMENT-SIGNATURE, no key"
    ));
    line(format!(
        "settler      {:#x}  (anvil account 5, self settlement; key in {SETTLER_KEY_ENV})",
        chain.settler.address()
    ));
    line(String::new());
    line(
        "DEV-ONLY OPERATOR TOKENS: random for this data folder and kept in dev.json/dev.env; not for a real \
         deployment."
            .into(),
    );
    line(format!(
        "  admin        {gw}/admin  (status page)  curl -s $GW/admin -H 'Authorization: Bearer {}'",
        b.admin_token
    ));
    line(format!(
        "  audit API    {gw}/api/audit/payments, /api/audit/ledger, /api/audit/revenue, /api/audit/keys  \
         curl -s $GW/api/audit/payments -H 'Authorization: Bearer {}'",
        b.auditor_token
    ));
    line(format!(
        "  admin token   {}  ({ADMIN_TOKEN_ENV})",
        b.admin_token
    ));
    line(format!(
        "  auditor token {}  ({AUDITOR_TOKEN_ENV})",
        b.auditor_token
    ));
    line(format!(
        "  CLI on the generated config: set -a; . {}; set +a",
        b.dir.join(ENV_FILE).display()
    ));
    line(String::new());
    line(
        "DEV-ONLY WALLETS: anvil's publicly known test keys. Anyone can take funds sent to them on a real network;"
            .into(),
    );
    line("never use them outside this local chain.".into());
    for (i, agent) in chain.agents.iter().enumerate() {
        line(format!(
            "  wallet {}  {:#x}  key 0x{}  ({} test USDC)",
            i + 1,
            agent.address(),
            alloy::hex::encode(agent.to_bytes()),
            b.balances
                .get(i)
                .copied()
                .flatten()
                .map_or("?".to_string(), |u| u.to_string())
        ));
    }
    if b.demo {
        line(String::new());
        line("--demo: the demo agent (dev wallet 1) runs once the gateway is ready; the stack stops after it.".into());
        eprint!("{out}");
        return;
    }
    let w2 = chain.agents.get(1).unwrap_or(&chain.agents[0]);
    let key2 = format!("0x{}", alloy::hex::encode(w2.to_bytes()));
    let chat = r#"{"model":"kimi-k2.6","messages":[{"role":"user","content":"Hello"}]}"#;
    let chat_stream = r#"{"model":"kimi-k2.6","stream":true,"max_tokens":16,"messages":[{"role":"user","content":"Hello"}]}"#;
    line(String::new());
    line("Try the whole flow (copy-paste into another terminal, in the project folder):".into());
    line(format!("  GW={gw}"));
    line(
        "  # 1. no key: 402 Payment Required with the catalog; the catalog alone; the agent card"
            .into(),
    );
    line(format!(
        "  curl -si $GW/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'"
    ));
    line("  curl -s $GW/api/agent/plans".into());
    line("  curl -s $GW/.well-known/agent-card.json".into());
    line(
        "  # 2. pay 10.00 USDC from dev wallet 2 and sign the claim text (viem, from npm ci)"
            .into(),
    );
    line(format!(
        "  PAID=$(node scripts/agent-pay.mjs pay --rpc {} --token {:#x} --to {:#x} --key {key2} --amount 10.00); echo \"$PAID\"",
        chain.anvil.endpoint(),
        chain.token,
        chain.pay_to
    ));
    line("  TX=$(node -pe 'JSON.parse(process.argv[1]).txHash' \"$PAID\"); SIG=$(node -pe 'JSON.parse(process.argv[1]).signature' \"$PAID\")".into());
    line(format!(
        "  # 3. claim it: 202 pending until it has {} confirmations (the loop retries), then the key, shown once",
        b.confirmations
    ));
    line("  while CLAIM=$(curl -s $GW/api/agent/topup -H 'Content-Type: application/json' -d \"{\\\"txHash\\\":\\\"$TX\\\",\\\"amount\\\":\\\"10.00\\\",\\\"signature\\\":\\\"$SIG\\\"}\"); echo \"$CLAIM\"; echo \"$CLAIM\" | grep -qE '\"code\":\"(pending|not_indexed)\"'; do sleep 2; done".into());
    line("  KEY=$(node -pe 'JSON.parse(process.argv[1]).data.apiKey ?? \"\"' \"$CLAIM\"); echo \"KEY=$KEY\"".into());
    line("  # 3b. KEY empty? The account got its key on an earlier top-up (keys are shown once): rotate it, signed by the payer".into());
    line(format!(
        "  NEW=$(curl -s $GW/api/agent/keys/rotate -H 'Content-Type: application/json' -d \"$(node scripts/agent-pay.mjs rotate --gateway $GW --key {key2})\"); echo \"$NEW\""
    ));
    line("  KEY=$(node -pe 'JSON.parse(process.argv[1]).data.keys.find(k => k.kind === \"credit\").apiKey' \"$NEW\")".into());
    line("  # 4. use the key: a streamed completion, then the key's usage".into());
    line(format!(
        "  curl -sN $GW/v1/chat/completions -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' -d '{chat_stream}'"
    ));
    line("  curl -s $GW/v1/usage -H \"Authorization: Bearer $KEY\"".into());
    line("  # 5. the same key on Anthropic's Messages API (translated to the demo's chat completions)".into());
    line("  curl -s $GW/v1/messages -H \"x-api-key: $KEY\" -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' -d '{\"model\":\"kimi-k2.6\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'".into());
    line(format!(
        "  # 6. failover: make gpu-b fail; kimi-k2.6 keeps answering from gpu-a, gpu-b cools down (see /healthz), then heal it\n  \
         curl -s -X POST {}/demo/fault -d '{{\"mode\":\"fail-500\"}}'; curl -s $GW/healthz\n  \
         curl -s -X POST {}/demo/fault -d '{{\"mode\":\"healthy\"}}'",
        b.gpu_b_root, b.gpu_b_root
    ));
    line("  # or let the demo agent do all of it, credits and a pool block (dev wallet 1):".into());
    line("  cargo run -q -- demo".into());
    line(
        "  # 7. standard x402: the 402 of a credit purchase (PAYMENT-REQUIRED), and glm-4.7 per request without a key\n  \
         curl -si -X POST $GW/x402/credits/10\n  \
         curl -si $GW/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\":\"glm-4.7\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'"
            .into(),
    );
    line(format!(
        "  # the operator's view (the config names dev.env's variables)\n  set -a; . {}; set +a; cargo run -q -- payments --config {}",
        b.dir.join(ENV_FILE).display(),
        b.dir.join(CONFIG_FILE).display()
    ));
    line(String::new());
    line("Ctrl-C stops everything (anvil included) and saves the chain; the next run continues from it.".into());
    eprint!("{out}");
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
