//! Crash consistency under SIGKILL. The real `x402-gateway serve` binary runs on a real SQLite file, a real anvil
//! and the demo upstream, under a steady stream of USDC payments, claims (top-ups and pool subscriptions, with key
//! rotation when a claim's answer was lost), and metered chat requests (JSON and SSE) from credit and pool keys. A
//! killer SIGKILLs it at random moments — any time, while a claim or rotation is on the wire, right after one
//! commits, mid-stream, and during start-up — and restarts it on a new port each time. At the end the database is
//! checked against the chain's ground truth, the upstream's log of what it served and the agents' own records
//! (`check_ground_truth`), and `audit verify` must exit 0. A second test runs two processes on one database at once
//! (the overlap of a deploy), whose start-up refund must not be returned twice.
//!
//! The harness (the launcher, the agents, the killer's aim, the ground-truth checks, which read the database through
//! the product's `Store` so they hold on either engine) is shared with `replicas.rs`, which runs three replicas on
//! one PostgreSQL under the same agents.
//!
//! Short form (CI, 30 kills): `cargo test --test it crash::`. Long form: `CRASH_KILLS=200 cargo test --test it
//! crash::sigkill -- --nocapture` (any number). `CRASH_SEED=N` replays the same kill plan and agent choices (thread
//! timing still differs from run to run, so the interleaving does too). The summary is printed (`--nocapture`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::U256;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};
use tokio::sync::watch;
use x402_gateway::billing::catalog::{claim_text, rotate_text};
use x402_gateway::dev::contracts::TestUSDC;
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats};
use x402_gateway::params;
use x402_gateway::proxy::pricing::Prices;
use x402_gateway::store::sql::Sql;
use x402_gateway::store::{Store, StoreError};
use x402_gateway::usdc::Usdc;

use crate::support::*;

/// The binary under test; `X402_GATEWAY_BIN` overrides it (as in `audit.rs`).
pub(crate) fn bin() -> String {
    std::env::var("X402_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_x402-gateway").to_string())
}

pub(crate) const CHAIN_ID: u64 = 31337;
pub(crate) const CONFIRMATIONS: u64 = 2;
/// Kills in the short form; `CRASH_KILLS` sets another number.
const SHORT_KILLS: usize = 30;
/// Agent tasks, one paying address each (anvil's dev wallets 2..4, plus account 5 funded here).
pub(crate) const AGENTS: usize = 4;
/// Longest one agent operation (a claim, a rotation, a wait for the index) may take across restarts.
pub(crate) const OP_DEADLINE: Duration = Duration::from_secs(90);
pub(crate) const POOL: &str = "crash";
/// Pool blocks: (name, hours, price). Together they cover the whole UTC day, so an "am"+"pm" key always works
/// whatever the wall-clock hour (the real binary runs on the wall clock).
const BLOCKS: [(&str, &str, &str); 2] =
    [("am", "00:00-12:00", "1.50"), ("pm", "12:00-24:00", "1.70")];
/// Models with prices per million tokens. High, odd prices: balances run out (so agents top up again and some
/// requests are refused for their worst case), and every cost is rounded up from a fraction of an atomic unit.
const MODELS: [(&str, &str, &str); 2] = [
    ("alpha", "613.373301", "2511.130007"),
    ("beta", "99.999999", "1234.567891"),
];
/// `max_output_tokens` of both models: the output bound (reserved for credit keys, and sent upstream) when a request
/// names no `max_tokens`.
pub(crate) const MODEL_CAP: u64 = 64;
const MIN_TOPUP: &str = "1.00";

fn usdc(s: &str) -> Usdc {
    s.parse().unwrap()
}

fn prices(model: &str) -> Prices {
    let (_, input, output) = MODELS
        .iter()
        .find(|(id, _, _)| *id == model)
        .unwrap_or_else(|| panic!("unknown model {model}"));
    Prices {
        input_per_mtok: usdc(input),
        output_per_mtok: usdc(output),
    }
}

fn block_price(name: &str) -> Usdc {
    usdc(BLOCKS.iter().find(|(n, _, _)| *n == name).unwrap().2)
}

pub(crate) fn config_text(chain: &TestChain, upstream: &str) -> String {
    let blocks: Vec<String> = BLOCKS
        .iter()
        .map(|(name, hours, price)| {
            format!(
                r#"{{ name = "{name}", hours_utc = "{hours}", price_usdc = "{price}", seats = 100000 }}"#
            )
        })
        .collect();
    let models: String = MODELS
        .iter()
        .map(|(id, input, output)| {
            format!(
                "[[models]]\nid = \"{id}\"\nupstream = \"demo\"\ninput_usdc_per_mtok = \"{input}\"\n\
                 output_usdc_per_mtok = \"{output}\"\nmax_output_tokens = {MODEL_CAP}\n\n"
            )
        })
        .collect();
    let ws = chain.rpc_url().replacen("http://", "ws://", 1);
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[chain]
network = "custom"
chain_id = {CHAIN_ID}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
rpc_ws = "{ws}"
pay_to = "{pay_to:#x}"
confirmations = {CONFIRMATIONS}
poll_interval_ms = 50

[database]
path = "gateway.db"

[[upstreams]]
name = "demo"
base_url = "{upstream}"

{models}[[pools]]
slug = "{POOL}"
name = "Crash pool"
models = ["alpha", "beta"]
blocks = [{blocks}]

[credits]
min_topup_usdc = "{MIN_TOPUP}"

# Every agent here shares 127.0.0.1; the per-IP limits have their own suite (tests/it/limits.rs).
[limits]
rate_limits = false
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        blocks = blocks.join(", "),
    )
}

// ---------------------------------------------------------------------------------------------------------------
// The gateway process.

/// What every generation of the server wrote to stderr: a tail for failure messages, panics, and the refunds
/// its start-up recovery (SQLite) or a replica's sweep of a dead replica's reservations (PostgreSQL) reported.
#[derive(Default)]
pub(crate) struct ServerLog {
    tail: VecDeque<String>,
    pub(crate) panics: Vec<String>,
    /// Sum of `requests` over the "refunded the reservations …" lines.
    pub(crate) recovered_reported: u64,
    /// Generations that logged "this replica leads" (PostgreSQL), in order.
    pub(crate) leaders: Vec<u64>,
}

impl ServerLog {
    pub(crate) fn tail_text(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// How to start `serve`: its config, and the environment it needs (the PostgreSQL URL the config names).
pub(crate) struct Launch {
    pub(crate) config: PathBuf,
    pub(crate) env: Vec<(String, String)>,
}

impl Launch {
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// `audit verify` on the database, which must exit 0.
    pub(crate) fn audit_verify(&self) {
        let verify = self.command(&["audit", "verify"]).output().unwrap();
        assert!(
            verify.status.success(),
            "audit verify: {}\n{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}

/// One `x402-gateway serve` process.
pub(crate) struct Process {
    child: Child,
    listening: std::sync::mpsc::Receiver<String>,
    /// Whether it leads (runs the indexer), by its log: set on "this replica leads", cleared on "leadership lost".
    leads: Arc<AtomicBool>,
}

impl Process {
    pub(crate) fn spawn(launch: &Launch, generation: u64, log: &Arc<Mutex<ServerLog>>) -> Process {
        let mut child = launch
            .command(&["--log-format", "json", "serve"])
            .env("X402_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, listening) = std::sync::mpsc::channel();
        let leads = Arc::new(AtomicBool::new(false));
        let (log, leading) = (log.clone(), leads.clone());
        // Drains stderr for the process's whole life, so a full pipe never blocks the server.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let message = event["fields"]["message"].as_str().unwrap_or_default();
                if let Some(url) = message.strip_prefix("listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut log = log.lock().unwrap();
                // A panic's message goes to stderr as plain text.
                if line.contains("panicked") {
                    log.panics.push(format!("[gen {generation}] {line}"));
                }
                if message.starts_with("refunded the reservations") {
                    log.recovered_reported += event["fields"]["requests"].as_u64().unwrap_or(0);
                }
                if message.starts_with("this replica leads") {
                    leading.store(true, Ordering::SeqCst);
                    log.leaders.push(generation);
                }
                if message.starts_with("leadership lost") {
                    leading.store(false, Ordering::SeqCst);
                }
                log.tail.push_back(format!("[gen {generation}] {line}"));
                if log.tail.len() > 300 {
                    log.tail.pop_front();
                }
            }
        });
        Process {
            child,
            listening,
            leads,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it said it leads (and has not said it lost it).
    pub(crate) fn leads(&self) -> bool {
        self.leads.load(Ordering::SeqCst)
    }

    /// The base URL from the "listening on" line.
    pub(crate) async fn wait_listening(&mut self, log: &Arc<Mutex<ServerLog>>) -> String {
        let start = Instant::now();
        loop {
            if let Ok(url) = self.listening.try_recv() {
                return url;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the gateway exited at start-up ({status}):\n{}",
                    log.lock().unwrap().tail_text()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no listening line after {DEADLINE:?}:\n{}",
                log.lock().unwrap().tail_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL (`Child::kill` sends SIGKILL on Unix): no handler runs, nothing is flushed or finished.
    pub(crate) fn sigkill(self) {
        drop(self);
    }
}

/// However the test ends, the process goes (SIGKILL also ends a process frozen with SIGSTOP).
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The demo upstream, with a log of every request it received (what the gateway forwarded, by x-request-id).

/// A request the upstream received.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    model: String,
    /// Sent with a credit key (the agents mark their prompts: `c0 c1 …` for credit keys, `p0 p1 …` for pool keys).
    credit: bool,
    /// Prompt tokens the demo upstream reports: whitespace-separated words.
    words: u64,
    /// Completion tokens it produces: `max_tokens`, or the demo default.
    completion: u64,
}

#[derive(Clone, Default)]
pub(crate) struct UpstreamLog(pub(crate) Arc<Mutex<HashMap<String, Served>>>);

async fn record_upstream_request(
    axum::extract::State(log): axum::extract::State<UpstreamLog>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    if let (Some(id), Ok(v)) = (
        parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        serde_json::from_slice::<Value>(&bytes),
    ) {
        let credit = v["messages"][0]["content"]
            .as_str()
            .is_some_and(|t| t.starts_with('c'));
        let words = v["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_str())
            .map(|s| s.split_whitespace().count() as u64)
            .sum();
        let completion = v["max_tokens"]
            .as_u64()
            .unwrap_or(DemoConfig::default().default_tokens);
        log.0.lock().unwrap().insert(
            id.to_string(),
            Served {
                model: v["model"].as_str().unwrap_or("").to_string(),
                credit,
                words,
                completion,
            },
        );
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

pub(crate) async fn start_upstream(log: UpstreamLog, token_delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let demo = DemoConfig {
        token_delay,
        ..DemoConfig::default()
    };
    let app = upstream::router(demo, Arc::new(DemoStats::default())).layer(
        axum::middleware::from_fn_with_state(log, record_upstream_request),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

// ---------------------------------------------------------------------------------------------------------------
// What agents and the killer share.

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) payments: AtomicU64,
    pub(crate) claims_ok: AtomicU64,
    /// Sum of the round-trip times of claims answered 200, in µs (the window the kills on the wire aim at).
    pub(crate) claim_ok_micros: AtomicU64,
    /// Claim attempts that got no answer (the server died under them).
    pub(crate) claim_answers_lost: AtomicU64,
    /// Retried claims answered 409 `already_claimed` naming our purchase: the lost attempt had committed.
    pub(crate) claims_recovered_by_409: AtomicU64,
    /// 202 pending / 404 not indexed / 429 answers before the claim went through.
    pub(crate) claim_waits: AtomicU64,
    pub(crate) rotations: AtomicU64,
    pub(crate) rotation_answers_lost: AtomicU64,
    pub(crate) chats_sent: AtomicU64,
    pub(crate) chats_json_done: AtomicU64,
    pub(crate) chats_stream_done: AtomicU64,
    pub(crate) chats_lost: AtomicU64,
    pub(crate) chats_refused_402: AtomicU64,
    pub(crate) pool_chats_done: AtomicU64,
    pub(crate) pool_chats_outside_window: AtomicU64,
    pub(crate) too_many_requests: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub(crate) struct Shared {
    /// (generation, base URL while that generation serves). With replicas the URL is the balancer's, always up,
    /// and the generation moves at each kill and restart.
    pub(crate) server: watch::Sender<(u64, Option<String>)>,
    pub(crate) stop: AtomicBool,
    /// Claim and rotation POSTs on the wire (the killer aims at them).
    pub(crate) writes_in_flight: AtomicUsize,
    /// Streams whose headers arrived and whose body is still coming.
    pub(crate) streams_in_flight: AtomicUsize,
    pub(crate) http: reqwest::Client,
    pub(crate) stats: Stats,
    pub(crate) chain: Arc<TestChain>,
    pub(crate) payers: Payers,
}

/// A request's fate as the client saw it.
pub(crate) enum Answer {
    Got(StatusCode, Value),
    /// No complete answer: the connection failed or the body was cut.
    Lost,
}

impl Shared {
    pub(crate) fn new(
        url: String,
        http: reqwest::Client,
        chain: Arc<TestChain>,
        payers: Payers,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            server: watch::Sender::new((0, Some(url))),
            stop: AtomicBool::new(false),
            writes_in_flight: AtomicUsize::new(0),
            streams_in_flight: AtomicUsize::new(0),
            http,
            stats: Stats::default(),
            chain,
            payers,
        })
    }

    /// The serving generation and its base URL, waiting through a restart.
    async fn server(&self) -> (u64, String) {
        let mut rx = self.server.subscribe();
        let found = tokio::time::timeout(OP_DEADLINE, rx.wait_for(|(_, b)| b.is_some()))
            .await
            .expect("the gateway serves again after a kill")
            .expect("the killer is alive");
        (found.0, found.1.clone().unwrap_or_default())
    }

    /// After a request to generation `generation` failed: until another generation serves (the usual case: it was
    /// killed), or half a second (a failure without a kill).
    async fn after_failure(&self, generation: u64) {
        let mut rx = self.server.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            rx.wait_for(|(g, b)| *g != generation && b.is_some()),
        )
        .await;
    }

    async fn post(&self, path: &str, body: &Value) -> (u64, Answer) {
        let (generation, base) = self.server().await;
        let sent = self
            .http
            .post(format!("{base}{path}"))
            .json(body)
            .send()
            .await;
        (generation, read_answer(sent).await)
    }

    pub(crate) async fn get(&self, path: &str, key: Option<&str>) -> (u64, Answer) {
        let (generation, base) = self.server().await;
        let mut req = self.http.get(format!("{base}{path}"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        (generation, read_answer(req.send().await).await)
    }
}

async fn read_answer(sent: reqwest::Result<reqwest::Response>) -> Answer {
    let Ok(resp) = sent else {
        return Answer::Lost;
    };
    let status = resp.status();
    match resp.bytes().await {
        Ok(b) => Answer::Got(status, serde_json::from_slice(&b).unwrap_or(Value::Null)),
        Err(_) => Answer::Lost,
    }
}

fn sign(signer: &PrivateKeySigner, text: &str) -> String {
    format!(
        "0x{}",
        alloy::hex::encode(
            signer
                .sign_message_sync(text.as_bytes())
                .unwrap()
                .as_bytes()
        )
    )
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The agents' wallets on one provider.
pub(crate) struct Payers {
    provider: DynProvider,
    signers: Vec<PrivateKeySigner>,
}

impl Payers {
    /// anvil's dev wallets 2..4 (funded by the chain set-up) and account 5, funded here.
    pub(crate) async fn new(chain: &TestChain) -> Payers {
        let mut signers: Vec<PrivateKeySigner> = chain.dev.agents.clone();
        let keys = chain.dev.anvil.keys();
        for key in keys
            .iter()
            .skip(5)
            .take(AGENTS.saturating_sub(signers.len()))
        {
            let signer = PrivateKeySigner::from(key.clone());
            TestUSDC::new(chain.token(), &chain.provider)
                .mint(
                    signer.address(),
                    U256::from(Usdc::whole(1_000_000).atomic() as u64),
                )
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
            signers.push(signer);
        }
        signers.truncate(AGENTS);
        let mut wallet = EthereumWallet::from(signers[0].clone());
        for s in &signers[1..] {
            wallet.register_signer(s.clone());
        }
        let provider = ProviderBuilder::new()
            .wallet(wallet)
            .connect_http(chain.dev.anvil.endpoint_url())
            .erased();
        Payers { provider, signers }
    }

    /// Agent `i` pays `amount` to payTo; returns the tx hash and its block.
    async fn pay(&self, chain: &TestChain, i: usize, amount: Usdc) -> (String, u64) {
        let receipt = TestUSDC::new(chain.token(), &self.provider)
            .transfer(chain.pay_to(), U256::from(amount.atomic() as u64))
            .from(self.signers[i].address())
            .send()
            .await
            .expect("payment sent")
            .get_receipt()
            .await
            .expect("payment mined");
        assert!(receipt.status(), "payment reverted");
        (
            format!("{:#x}", receipt.transaction_hash),
            receipt.block_number.expect("mined"),
        )
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Agents.

#[derive(Debug, Clone)]
enum Product {
    Topup { amount: Usdc },
    Pool { blocks: Vec<&'static str> },
}

/// A payment an agent made: the chain's ground truth, as the agent recorded it.
#[derive(Debug, Clone)]
struct Payment {
    tx: String,
    value: Usdc,
    product: Product,
}

/// A chat request whose answer the agent received whole.
#[derive(Debug, Clone)]
struct ChatDone {
    request_id: String,
    model: String,
    words: u64,
    completion: u64,
    stream: bool,
    credit: bool,
}

#[derive(Debug, Default)]
pub(crate) struct AgentRecord {
    address: String,
    payments: Vec<Payment>,
    /// Claims the agent saw succeed, with the key public id the answer (200 or 409) said they minted.
    claims: HashMap<String, Option<String>>,
    chats_done: Vec<ChatDone>,
    /// Request ids of chats refused with 402 (worst case above the balance).
    refused: Vec<String>,
    /// Public ids of the keys the agent holds at the end (each checked live with `/v1/usage`).
    held_keys: Vec<String>,
    /// The balance `/v1/usage` reported at the end.
    final_balance: Option<Usdc>,
}

fn public_id(key: &str) -> String {
    key.split('-').nth(1).unwrap_or_default().to_string()
}

pub(crate) struct Agent {
    index: usize,
    signer: PrivateKeySigner,
    rng: StdRng,
    credit_key: Option<String>,
    pool_keys: Vec<String>,
    last_signed_at: i64,
    record: AgentRecord,
}

enum ChatEnd {
    Done,
    NeedsCredits,
}

impl Agent {
    /// Pays, claims and chats until `s.stop`; [`finish_agents`] then runs its final check.
    async fn run(mut self, s: Arc<Shared>) -> Agent {
        while !s.stop.load(Ordering::SeqCst) {
            if self.credit_key.is_none() {
                self.buy_credits(&s).await;
                continue;
            }
            // Even agents shop a lot (claims to kill under), odd ones mostly chat (and run out of credits).
            let (subscribe, topup) = if self.index.is_multiple_of(2) {
                (20, 30)
            } else {
                (1, 3)
            };
            let roll = self.rng.random_range(0..100);
            if roll < subscribe {
                let blocks = match self.rng.random_range(0..3) {
                    0 => vec!["am"],
                    1 => vec!["pm"],
                    _ => vec!["am", "pm"],
                };
                self.buy(&s, Product::Pool { blocks }).await;
            } else if roll < topup {
                self.buy_credits(&s).await;
            } else if roll < topup + 8 && !self.pool_keys.is_empty() {
                self.chat(&s, false).await;
            } else if let ChatEnd::NeedsCredits = self.chat(&s, true).await {
                self.buy_credits(&s).await;
            }
        }
        self
    }

    async fn buy_credits(&mut self, s: &Shared) {
        // Between 1 and 3 USDC, to the atomic unit; sometimes less is claimed than paid (the rest is surplus).
        let amount = Usdc(self.rng.random_range(1_000_000..3_000_000));
        self.buy(s, Product::Topup { amount }).await;
    }

    /// Pays, waits for the confirmations, claims.
    async fn buy(&mut self, s: &Shared, product: Product) {
        let value = match &product {
            Product::Topup { amount } => {
                if self.rng.random_bool(0.3) {
                    Usdc(amount.atomic() + self.rng.random_range(1..2_000_000))
                } else {
                    *amount
                }
            }
            Product::Pool { blocks } => {
                let price: i64 = blocks.iter().map(|b| block_price(b).atomic()).sum();
                if self.rng.random_bool(0.3) {
                    Usdc(price + self.rng.random_range(1..3_000_000))
                } else {
                    Usdc(price)
                }
            }
        };
        let (tx, block) = s.payers.pay(&s.chain, self.index, value).await;
        bump(&s.stats.payments);
        self.record.payments.push(Payment {
            tx: tx.clone(),
            value,
            product: product.clone(),
        });
        self.wait_indexed(s, block + CONFIRMATIONS - 1).await;
        self.claim(s, &tx, value, &product).await;
    }

    /// Polls `/healthz` (through restarts) until the gateway has indexed `block`.
    async fn wait_indexed(&self, s: &Shared, block: u64) {
        let start = Instant::now();
        loop {
            if let (_, Answer::Got(StatusCode::OK, h)) = s.get("/healthz", None).await
                && h["indexer"]["indexedHead"]
                    .as_u64()
                    .is_some_and(|n| n >= block)
            {
                return;
            }
            assert!(
                start.elapsed() < OP_DEADLINE,
                "agent {}: block {block} not indexed after {OP_DEADLINE:?}",
                self.index
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn claim(&mut self, s: &Shared, tx: &str, value: Usdc, product: &Product) {
        let signature = sign(&self.signer, &claim_text(tx, CHAIN_ID));
        let (path, body, kind) = match product {
            Product::Topup { amount } => (
                "/api/agent/topup",
                json!({"txHash": tx, "amount": amount.to_string(), "signature": signature}),
                "topup",
            ),
            Product::Pool { blocks } => (
                "/api/agent/subscribe-pool",
                json!({"txHash": tx, "poolSlug": POOL, "blocks": blocks, "signature": signature}),
                "subscription",
            ),
        };
        let start = Instant::now();
        let mut lost = 0;
        loop {
            assert!(
                start.elapsed() < OP_DEADLINE,
                "agent {}: claim of {tx} unresolved after {OP_DEADLINE:?}",
                self.index
            );
            s.writes_in_flight.fetch_add(1, Ordering::SeqCst);
            let sent_at = Instant::now();
            let (generation, answer) = s.post(path, &body).await;
            s.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
            let took = sent_at.elapsed().as_micros() as u64;
            let (status, v) = match answer {
                Answer::Lost => {
                    lost += 1;
                    bump(&s.stats.claim_answers_lost);
                    s.after_failure(generation).await;
                    continue;
                }
                Answer::Got(status, v) => (status, v),
            };
            match status {
                StatusCode::OK => {
                    let data = &v["data"];
                    let minted = data["apiKey"].as_str().map(str::to_string);
                    match product {
                        Product::Topup { amount } => {
                            assert_eq!(data["amountUsdc"], amount.to_string(), "{v}");
                            assert_eq!(data["paidUsdc"], value.to_string(), "{v}");
                            if let Some(key) = &minted {
                                // A top-up mints a key only for an account without a live credit key.
                                assert!(
                                    self.credit_key.is_none(),
                                    "agent {}: a second credit key minted by {tx}: {v}",
                                    self.index
                                );
                                self.credit_key = Some(key.clone());
                            }
                        }
                        Product::Pool { blocks } => {
                            assert_eq!(data["blocks"], json!(blocks), "{v}");
                            assert_eq!(data["paidUsdc"], value.to_string(), "{v}");
                            let key = minted.clone().expect("a subscription answer has its key");
                            self.pool_keys.push(key);
                        }
                    }
                    assert_eq!(data["account"], self.record.address, "{v}");
                    bump(&s.stats.claims_ok);
                    s.stats.claim_ok_micros.fetch_add(took, Ordering::Relaxed);
                    self.record
                        .claims
                        .insert(tx.to_string(), minted.as_deref().map(public_id));
                    return;
                }
                StatusCode::CONFLICT if v["error"]["code"] == "already_claimed" => {
                    // Only our own lost attempt can have claimed it: the 409 must name exactly our purchase.
                    assert!(
                        lost > 0,
                        "agent {}: {tx} already claimed although every earlier attempt was answered: {v}",
                        self.index
                    );
                    let c = &v["error"]["claimed"];
                    assert_eq!(c["txHash"], tx, "{v}");
                    assert_eq!(c["account"], self.record.address, "{v}");
                    assert_eq!(c["kind"], kind, "{v}");
                    assert_eq!(c["paidUsdc"], value.to_string(), "{v}");
                    match product {
                        Product::Topup { amount } => {
                            assert_eq!(c["priceUsdc"], amount.to_string(), "{v}")
                        }
                        Product::Pool { blocks } => assert_eq!(c["blocks"], json!(blocks), "{v}"),
                    }
                    bump(&s.stats.claims_recovered_by_409);
                    let minted = c["keyId"].as_str().map(str::to_string);
                    self.record.claims.insert(tx.to_string(), minted.clone());
                    if minted.is_some() {
                        // The key it minted was in the lost answer: replace it with the payer's signature.
                        self.rotate(s).await;
                    }
                    return;
                }
                StatusCode::ACCEPTED | StatusCode::NOT_FOUND | StatusCode::TOO_MANY_REQUESTS => {
                    bump(&s.stats.claim_waits);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("agent {}: claim of {tx} → {other}: {v}", self.index),
            }
        }
    }

    /// Replaces every live key of the account (`/api/agent/keys/rotate`), retrying with a fresh signature when the
    /// answer is lost (the lost rotation may have committed: then this one rotates its keys).
    async fn rotate(&mut self, s: &Shared) {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < OP_DEADLINE,
                "agent {}: rotation unresolved after {OP_DEADLINE:?}",
                self.index
            );
            let signed_at = now_unix().max(self.last_signed_at + 1);
            self.last_signed_at = signed_at;
            // No `server.public_url`: the text names the configured listen address.
            let text = rotate_text(
                &self.record.address,
                "127.0.0.1:0",
                s.chain.pay_to(),
                CHAIN_ID,
                signed_at,
            );
            let body = json!({"address": self.record.address, "signedAt": signed_at, "signature": sign(&self.signer, &text)});
            s.writes_in_flight.fetch_add(1, Ordering::SeqCst);
            let (generation, answer) = s.post("/api/agent/keys/rotate", &body).await;
            s.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
            match answer {
                Answer::Lost => {
                    bump(&s.stats.rotation_answers_lost);
                    s.after_failure(generation).await;
                }
                Answer::Got(StatusCode::OK, v) => {
                    let keys = v["data"]["keys"].as_array().cloned().unwrap_or_default();
                    let credit: Vec<String> = keys
                        .iter()
                        .filter(|k| k["kind"] == "credit")
                        .filter_map(|k| k["apiKey"].as_str().map(str::to_string))
                        .collect();
                    assert!(credit.len() <= 1, "two credit keys from a rotation: {v}");
                    self.credit_key = credit.into_iter().next();
                    self.pool_keys = keys
                        .iter()
                        .filter(|k| k["kind"] == "subscription")
                        .filter_map(|k| k["apiKey"].as_str().map(str::to_string))
                        .collect();
                    bump(&s.stats.rotations);
                    return;
                }
                Answer::Got(StatusCode::TOO_MANY_REQUESTS, _) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Answer::Got(status, v) => {
                    panic!("agent {}: rotation → {status}: {v}", self.index)
                }
            }
        }
    }

    /// One chat request with the credit key (`credit`) or one of the pool keys.
    async fn chat(&mut self, s: &Shared, credit: bool) -> ChatEnd {
        let key = if credit {
            self.credit_key.clone().expect("a credit key")
        } else {
            let i = self.rng.random_range(0..self.pool_keys.len());
            self.pool_keys[i].clone()
        };
        let model = MODELS[self.rng.random_range(0..MODELS.len())].0;
        let words = self.rng.random_range(1..=24u64);
        let tag = if credit { 'c' } else { 'p' };
        let text: Vec<String> = (0..words).map(|i| format!("{tag}{i}")).collect();
        let max_tokens = self
            .rng
            .random_bool(0.7)
            .then(|| self.rng.random_range(1..=48u64));
        let stream = self.rng.random_bool(0.5);
        let include_usage = stream && self.rng.random_bool(0.5);
        // The gateway bounds every request, pool keys' too: the model's cap when the client sets no limit.
        let completion = max_tokens.unwrap_or(MODEL_CAP);
        let mut body =
            json!({"model": model, "messages": [{"role": "user", "content": text.join(" ")}]});
        if let Some(n) = max_tokens {
            body["max_tokens"] = json!(n);
        }
        if stream {
            body["stream"] = json!(true);
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
        }
        let (generation, base) = s.server().await;
        bump(&s.stats.chats_sent);
        let sent = s
            .http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await;
        let lost = |s: &Shared| bump(&s.stats.chats_lost);
        let Ok(resp) = sent else {
            lost(s);
            s.after_failure(generation).await;
            return ChatEnd::Done;
        };
        let status = resp.status();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let cost_header = resp
            .headers()
            .get("x-gateway-cost-usdc")
            .and_then(|v| v.to_str().ok())
            .map(usdc);
        let done = ChatDone {
            request_id: request_id.clone(),
            model: model.to_string(),
            words,
            completion,
            stream,
            credit,
        };
        match status {
            StatusCode::OK if stream => {
                s.streams_in_flight.fetch_add(1, Ordering::SeqCst);
                let text = resp.text().await;
                s.streams_in_flight.fetch_sub(1, Ordering::SeqCst);
                let Ok(text) = text else {
                    lost(s);
                    s.after_failure(generation).await;
                    return ChatEnd::Done;
                };
                let events: Vec<&str> = text
                    .split("\n\n")
                    .filter_map(|e| e.strip_prefix("data: "))
                    .collect();
                if events.last() != Some(&"[DONE]") {
                    // The server died mid-stream and the body still ended cleanly: as lost as a reset.
                    lost(s);
                    s.after_failure(generation).await;
                    return ChatEnd::Done;
                }
                let parsed: Vec<Value> = events
                    .iter()
                    .filter_map(|e| serde_json::from_str(e).ok())
                    .collect();
                let content = parsed
                    .iter()
                    .filter(|v| {
                        v["choices"][0]["delta"]["content"]
                            .as_str()
                            .is_some_and(|c| !c.is_empty())
                    })
                    .count() as u64;
                assert_eq!(content, completion, "{text}");
                let usage = parsed.iter().find(|v| v["usage"].is_object());
                if include_usage {
                    let u = &usage.expect("the usage chunk the client asked for")["usage"];
                    assert_eq!(
                        (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()),
                        (Some(words), Some(completion)),
                        "{text}"
                    );
                } else {
                    assert!(usage.is_none(), "usage chunk leaked: {text}");
                }
                bump(if credit {
                    &s.stats.chats_stream_done
                } else {
                    &s.stats.pool_chats_done
                });
                self.record.chats_done.push(done);
                ChatEnd::Done
            }
            StatusCode::OK => {
                let Ok(bytes) = resp.bytes().await else {
                    lost(s);
                    s.after_failure(generation).await;
                    return ChatEnd::Done;
                };
                let v: Value = serde_json::from_slice(&bytes).expect("a JSON completion");
                assert_eq!(
                    (
                        v["usage"]["prompt_tokens"].as_u64(),
                        v["usage"]["completion_tokens"].as_u64()
                    ),
                    (Some(words), Some(completion)),
                    "{v}"
                );
                if credit {
                    // The charge the client is told is the exact price of what it received.
                    assert_eq!(
                        cost_header,
                        Some(prices(model).cost(words, completion)),
                        "x-gateway-cost-usdc of {request_id}"
                    );
                }
                bump(if credit {
                    &s.stats.chats_json_done
                } else {
                    &s.stats.pool_chats_done
                });
                self.record.chats_done.push(done);
                ChatEnd::Done
            }
            StatusCode::PAYMENT_REQUIRED if credit => {
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                assert!(
                    v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("worst-case")),
                    "agent {}: its credit key was refused: {v}",
                    self.index
                );
                bump(&s.stats.chats_refused_402);
                self.record.refused.push(request_id);
                ChatEnd::NeedsCredits
            }
            StatusCode::FORBIDDEN if !credit => {
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                assert_eq!(v["error"]["code"], "outside_subscription_window", "{v}");
                bump(&s.stats.pool_chats_outside_window);
                ChatEnd::Done
            }
            StatusCode::TOO_MANY_REQUESTS => {
                bump(&s.stats.too_many_requests);
                ChatEnd::Done
            }
            other => {
                let v = resp.text().await.unwrap_or_default();
                panic!("agent {}: chat → {other}: {v}", self.index)
            }
        }
    }

    /// Every key the agent holds works (it knows its keys despite the lost answers), and the balance it sees.
    async fn final_check(&mut self, s: &Shared) {
        let mut keys: Vec<String> = self.pool_keys.clone();
        keys.extend(self.credit_key.clone());
        for key in keys {
            let start = Instant::now();
            let usage = loop {
                assert!(start.elapsed() < OP_DEADLINE);
                match s.get("/v1/usage", Some(&key)).await {
                    // The last stream settles just after its body ended: read the balance once nothing is in
                    // flight.
                    (_, Answer::Got(StatusCode::OK, v))
                        if v["recent"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|r| r["status"] == "in_flight") =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    (_, Answer::Got(StatusCode::OK, v)) => break v,
                    (_, Answer::Got(status, v)) if status != StatusCode::TOO_MANY_REQUESTS => {
                        panic!(
                            "agent {}: held key {} → {status}: {v}",
                            self.index,
                            public_id(&key)
                        )
                    }
                    (generation, _) => s.after_failure(generation).await,
                }
            };
            if usage["key"]["kind"] == "credit" {
                self.record.final_balance = usage["credits"]["balanceUsdc"].as_str().map(usdc);
            }
            self.record.held_keys.push(public_id(&key));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The killer.

#[derive(Debug, Default)]
pub(crate) struct KillReport {
    pub(crate) kills: usize,
    pub(crate) anytime: usize,
    pub(crate) during_write: usize,
    pub(crate) after_commit: usize,
    pub(crate) during_stream: usize,
    pub(crate) during_startup: usize,
    /// Aimed kills that found nothing to aim at within 3 s and killed anyway.
    pub(crate) unaimed: usize,
    /// Replicas: kills aimed at the indexer leader, kills whose victim led (aimed or not), kills of a second
    /// replica at the same moment.
    pub(crate) at_leader: usize,
    pub(crate) leader_killed: usize,
    pub(crate) two_at_once: usize,
    pub(crate) restart_ms: Vec<u128>,
}

/// Waits up to 3 s for `counter` to be non-zero; says whether it was.
pub(crate) async fn aim(counter: &AtomicUsize) -> bool {
    let start = Instant::now();
    while counter.load(Ordering::SeqCst) == 0 {
        if start.elapsed() > Duration::from_secs(3) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Claims and rotations committed: what a write the killer aims at adds to.
pub(crate) const WRITES_COMMITTED: &str =
    "SELECT (SELECT count(*) FROM claims) + (SELECT count(*) FROM rotation_nonces)";

/// Waits (up to 3 s) for a claim or rotation to commit while its request is on the wire (`on_the_wire` > 0), and
/// SIGKILLs the server (`pid`) before the answer leaves; says whether it did. While a write is on the wire the
/// server is frozen (SIGSTOP) every few hundred µs for a look at the database (`writes_committed`, -1 when it
/// cannot tell): if the write has committed, it dies frozen, so its answer cannot leave; if not, it thaws
/// (SIGCONT). Runs on a blocking thread.
pub(crate) fn kill_after_commit(
    writes_committed: &dyn Fn() -> i64,
    on_the_wire: &AtomicUsize,
    pid: u32,
) -> bool {
    // SAFETY: kill(2) with plain integers, on our own child (reaped later by `Process::sigkill`).
    let signal = |sig: i32| unsafe { libc::kill(pid as i32, sig) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if on_the_wire.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let before = writes_committed();
        while on_the_wire.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(3) {
            signal(libc::SIGSTOP);
            if writes_committed() > before {
                signal(libc::SIGKILL);
                return true;
            }
            signal(libc::SIGCONT);
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    false
}

/// SIGKILLs the server `kills` times at moments drawn from `rng`, restarting it after each; returns the running
/// last generation.
async fn killer(
    s: &Arc<Shared>,
    mut process: Process,
    launch: &Launch,
    db: &Path,
    log: &Arc<Mutex<ServerLog>>,
    kills: usize,
    rng: &mut StdRng,
) -> (Process, KillReport) {
    let mut report = KillReport::default();
    let mut generation = s.server.borrow().0;
    while report.kills < kills {
        match rng.random_range(0..100) {
            0..35 => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..2500))).await;
                report.anytime += 1;
            }
            35..50 => {
                // A claim or rotation is on the wire: die before, during or after its commit.
                if aim(&s.writes_in_flight).await {
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..6000))).await;
                    report.during_write += 1;
                } else {
                    report.unaimed += 1;
                }
            }
            50..75 => {
                // Right after a claim or rotation commits, before its answer leaves: the client must learn from
                // its retry (409 naming the purchase; a rotation) what it bought.
                let (s, db, pid) = (s.clone(), db.to_path_buf(), process.pid());
                if tokio::task::spawn_blocking(move || {
                    // A plain read-only connection: it reads while the server is frozen mid-write.
                    let Ok(c) = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
                    else {
                        return false;
                    };
                    let writes = || {
                        c.query_row(WRITES_COMMITTED, [], |r| r.get(0))
                            .unwrap_or(-1)
                    };
                    kill_after_commit(&writes, &s.writes_in_flight, pid)
                })
                .await
                .unwrap()
                {
                    report.after_commit += 1;
                } else {
                    report.unaimed += 1;
                }
            }
            _ => {
                if aim(&s.streams_in_flight).await {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
                    report.during_stream += 1;
                } else {
                    report.unaimed += 1;
                }
            }
        }
        process.sigkill();
        s.server.send_replace((generation, None));
        report.kills += 1;
        if report.kills < kills && rng.random_bool(0.15) {
            // Die again while starting: during migrations, the in-flight refunds, or the first requests.
            generation += 1;
            let early = Process::spawn(launch, generation, log);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
            early.sigkill();
            report.kills += 1;
            report.during_startup += 1;
        }
        generation += 1;
        let started = Instant::now();
        process = Process::spawn(launch, generation, log);
        let url = process.wait_listening(log).await;
        report.restart_ms.push(started.elapsed().as_millis());
        s.server.send_replace((generation, Some(url)));
    }
    (process, report)
}

// ---------------------------------------------------------------------------------------------------------------
// Ground truth.

/// A USDC Transfer log to payTo, read from the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainTransfer {
    tx: String,
    log_index: u64,
    block_hash: String,
    from: String,
    value: i64,
}

pub(crate) async fn chain_transfers(chain: &TestChain) -> Vec<ChainTransfer> {
    let head = chain.head().await;
    let filter = Filter::new()
        .address(chain.token())
        .event_signature(TestUSDC::Transfer::SIGNATURE_HASH)
        .topic2(chain.pay_to().into_word())
        .from_block(0u64)
        .to_block(head);
    chain
        .provider
        .get_logs(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|log| {
            let decoded = log.log_decode::<TestUSDC::Transfer>().unwrap();
            let event = &decoded.inner.data;
            assert_eq!(event.to, chain.pay_to());
            ChainTransfer {
                tx: format!("{:#x}", log.transaction_hash.unwrap()),
                log_index: log.log_index.unwrap(),
                block_hash: format!("{:#x}", log.block_hash.unwrap()),
                from: format!("{:#x}", event.from),
                value: i64::try_from(event.value).unwrap(),
            }
        })
        .collect()
}

/// Figures from the final checks, for the summary.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    pub(crate) transfers: usize,
    pub(crate) claims: usize,
    pub(crate) subscriptions: usize,
    pub(crate) keys: usize,
    pub(crate) rotated_keys: usize,
    pub(crate) ledger_rows: usize,
    pub(crate) credit_requests: usize,
    pub(crate) pool_requests: usize,
    pub(crate) interrupted: usize,
    /// Streams the client received whole whose settlement the kill beat: refunded in full at the restart.
    pub(crate) delivered_then_refunded: usize,
    /// Requests settled (and charged) whose answer the kill took from the client.
    pub(crate) settled_but_answer_lost: usize,
    /// Pool-key streams received whole whose usage row the kill beat.
    pub(crate) pool_rows_lost: usize,
}

/// Every check of the end state against the chain, the upstream's log and the agents' records. Panics naming the
/// first discrepancy.
pub(crate) fn check_ground_truth(
    c: &dyn Sql,
    chain: &[ChainTransfer],
    agents: &[AgentRecord],
    upstream: &HashMap<String, Served>,
) -> Checked {
    let mut out = Checked::default();
    let payments: HashMap<&str, (&AgentRecord, &Payment)> = agents
        .iter()
        .flat_map(|a| a.payments.iter().map(move |p| (p.tx.as_str(), (a, p))))
        .collect();
    assert_eq!(
        payments.len(),
        agents.iter().map(|a| a.payments.len()).sum::<usize>(),
        "a tx hash recorded twice"
    );

    // 1. Transfers: every Transfer log to payTo on the chain is in the database exactly once, confirmed, with its
    //    block, payer and value; nothing else is; and the chain's logs are exactly the agents' payments.
    let chain_txs: HashSet<&str> = chain.iter().map(|t| t.tx.as_str()).collect();
    let agent_txs: HashSet<&str> = payments.keys().copied().collect();
    assert_eq!(
        chain_txs, agent_txs,
        "the chain's payments to payTo are not the agents' payments"
    );
    assert_eq!(chain.len(), chain_txs.len(), "one transfer log per payment");
    let rows: Vec<(String, u64, String, String, i64, String)> = c.query_map("SELECT tx_hash, log_index, block_hash, from_address, value_atomic, status FROM transfers", params![], |r| {
            Ok((
                r.get(0)?,
                r.get::<i64>(1)? as u64,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        }).unwrap();
    let mut by_log: HashMap<(String, u64), usize> = HashMap::new();
    for (tx, log_index, _, _, _, _) in &rows {
        *by_log.entry((tx.clone(), *log_index)).or_default() += 1;
    }
    for t in chain {
        let matching: Vec<_> = rows
            .iter()
            .filter(|r| r.0 == t.tx && r.1 == t.log_index)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "transfer {}:{} is in the database {} times",
            t.tx,
            t.log_index,
            matching.len()
        );
        let r = matching[0];
        assert_eq!(
            (&r.2, &r.3, r.4, r.5.as_str()),
            (&t.block_hash, &t.from, t.value, "confirmed"),
            "transfer {}:{}",
            t.tx,
            t.log_index
        );
        let (agent, payment) = payments[t.tx.as_str()];
        assert_eq!((&t.from, t.value), (&agent.address, payment.value.atomic()));
    }
    assert_eq!(
        rows.len(),
        chain.len(),
        "the database has transfers the chain does not"
    );
    out.transfers = rows.len();

    // 2. Claims: every payment claimed exactly once, by its payer, for what the agent asked, at the chain's value.
    type ClaimRow = (
        String,
        String,
        String,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<i64>,
    );
    let claims: Vec<ClaimRow> = c.query_map("SELECT tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, subscription_id, key_id FROM claims", params![], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        }).unwrap();
    let claimed: HashSet<&str> = claims.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(claimed.len(), claims.len(), "a tx claimed twice");
    assert_eq!(
        claimed, agent_txs,
        "claims are not exactly the agents' payments"
    );
    let mut credits_in: HashMap<String, i64> = HashMap::new();
    for (tx, account, kind, paid, price, surplus, sub, key) in &claims {
        let (agent, payment) = payments[tx.as_str()];
        assert_eq!(account, &agent.address, "claim {tx}");
        assert_eq!(*paid, payment.value.atomic(), "claim {tx}: paid");
        assert_eq!(paid - price, *surplus, "claim {tx}: surplus");
        let expected_price = match &payment.product {
            Product::Topup { amount } => {
                assert_eq!(kind, "topup", "claim {tx}");
                assert!(sub.is_none());
                amount.atomic()
            }
            Product::Pool { blocks } => {
                assert_eq!(kind, "subscription", "claim {tx}");
                assert!(
                    sub.is_some() && key.is_some(),
                    "claim {tx}: no subscription or key"
                );
                blocks.iter().map(|b| block_price(b).atomic()).sum()
            }
        };
        assert_eq!(*price, expected_price, "claim {tx}: price");
        *credits_in.entry(account.clone()).or_default() +=
            if kind == "topup" { *paid } else { *surplus };
        // What the agent was told (200 or 409) names the key this claim minted.
        let key_public: Option<String> = key.map(|k| {
            c.query_value("SELECT public_id FROM api_keys WHERE id = ?1", params![k])
                .unwrap()
        });
        assert_eq!(
            agent.claims.get(tx.as_str()),
            Some(&key_public),
            "claim {tx}: the agent's view of its key"
        );
    }
    out.claims = claims.len();

    // 3. Keys: one key minted per claim that minted one, never two; one live key per subscription; at most one
    //    live credit key per account; every rotation revoked exactly the key it replaced; the agents hold exactly
    //    the live keys.
    type KeyRow = (
        i64,
        String,
        String,
        String,
        Option<i64>,
        String,
        Option<i64>,
        Option<String>,
        Option<i64>,
    );
    let keys: Vec<KeyRow> = c.query_map("SELECT id, public_id, kind, account, subscription_id, created_by, revoked_at, revoked_reason, replaced_by FROM api_keys", params![], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            ))
        }).unwrap();
    let by_id: HashMap<i64, &KeyRow> = keys.iter().map(|k| (k.0, k)).collect();
    let minted_by_claims: Vec<i64> = claims.iter().filter_map(|c| c.7).collect();
    let distinct: HashSet<i64> = minted_by_claims.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        minted_by_claims.len(),
        "one key for two claims"
    );
    let claim_keys: HashSet<i64> = keys
        .iter()
        .filter(|k| k.5 == "claim")
        .map(|k| k.0)
        .collect();
    assert_eq!(
        claim_keys, distinct,
        "keys created by claims are not exactly the keys the claims name"
    );
    for (tx, account, kind, _, _, _, sub, key) in &claims {
        if let Some(k) = key {
            let k = by_id[k];
            assert_eq!(&k.3, account, "key of claim {tx}");
            assert_eq!(
                k.2,
                if kind == "topup" {
                    "credit"
                } else {
                    "subscription"
                }
            );
            assert_eq!(&k.4, sub, "key of claim {tx}: subscription");
        }
    }
    for k in &keys {
        assert!(
            k.5 == "claim" || k.5 == "rotation",
            "key {} created by {}",
            k.1,
            k.5
        );
        if let Some(next) = k.8 {
            let n = by_id[&next];
            assert_eq!(k.7.as_deref(), Some("rotated"));
            assert!(k.6.is_some(), "key {} replaced but not revoked", k.1);
            assert_eq!(
                (&n.2, &n.3, &n.4, n.5.as_str()),
                (&k.2, &k.3, &k.4, "rotation"),
                "key {} replaced by a different key",
                k.1
            );
        } else {
            assert!(k.6.is_none(), "key {} revoked without a replacement", k.1);
        }
    }
    let replaced: Vec<i64> = keys.iter().filter_map(|k| k.8).collect();
    assert_eq!(
        replaced.iter().collect::<HashSet<_>>().len(),
        replaced.len(),
        "a key replaces two"
    );
    out.rotated_keys = replaced.len();
    let live: Vec<&KeyRow> = keys.iter().filter(|k| k.6.is_none()).collect();
    let subscriptions: Vec<(i64, String, String, String, i64, String, i64)> = c.query_map("SELECT id, account, pool, blocks, price_atomic, tx_hash, expires_at FROM subscriptions", params![], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        }).unwrap();
    for sub in &subscriptions {
        let n = live.iter().filter(|k| k.4 == Some(sub.0)).count();
        assert_eq!(n, 1, "subscription {} has {n} live keys", sub.0);
    }
    for a in agents {
        let credit = live
            .iter()
            .filter(|k| k.3 == a.address && k.2 == "credit")
            .count();
        assert!(credit <= 1, "{} has {credit} live credit keys", a.address);
        let mut db_live: Vec<String> = live
            .iter()
            .filter(|k| k.3 == a.address)
            .map(|k| k.1.clone())
            .collect();
        let mut held = a.held_keys.clone();
        db_live.sort();
        held.sort();
        assert_eq!(
            held, db_live,
            "{}: the keys the agent holds are not its live keys",
            a.address
        );
    }
    out.keys = keys.len();

    // 4. Subscriptions and seats: one subscription per subscription claim, one seat per bought block.
    let sub_claims = claims.iter().filter(|c| c.2 == "subscription").count();
    assert_eq!(subscriptions.len(), sub_claims);
    let seats: Vec<(i64, String, String, i64)> = c
        .query_map(
            "SELECT subscription_id, pool, block, expires_at FROM seats",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    let mut expected_seats = 0;
    for (id, account, pool, blocks, price, tx, expires) in &subscriptions {
        let blocks: Vec<String> = serde_json::from_str(blocks).unwrap();
        let (agent, payment) = payments[tx.as_str()];
        assert_eq!(account, &agent.address);
        assert_eq!(pool, POOL);
        let Product::Pool { blocks: bought } = &payment.product else {
            panic!("subscription {id} from a top-up payment {tx}")
        };
        assert_eq!(&blocks, bought, "subscription {id}");
        assert_eq!(
            *price,
            bought.iter().map(|b| block_price(b).atomic()).sum::<i64>()
        );
        let mut held: Vec<&str> = seats
            .iter()
            .filter(|s| s.0 == *id)
            .map(|s| {
                assert_eq!((&s.1, s.3), (pool, *expires), "seat of subscription {id}");
                s.2.as_str()
            })
            .collect();
        held.sort_unstable();
        let mut want: Vec<&str> = blocks.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(held, want, "seats of subscription {id}");
        expected_seats += blocks.len();
    }
    assert_eq!(seats.len(), expected_seats, "seats without a subscription");
    out.subscriptions = subscriptions.len();

    // 5. Usage: nothing left in flight; every request the upstream served for a credit key has its row; a settled
    //    row holds exactly the tokens the upstream produced and their price; an interrupted one was refunded whole.
    type UsageRow = (
        i64,
        String,
        i64,
        String,
        String,
        String,
        bool,
        u64,
        u64,
        i64,
        i64,
        String,
        String,
    );
    let usage: Vec<UsageRow> = c.query_map("SELECT id, request_id, key_id, account, key_kind, model, stream, prompt_tokens, completion_tokens, reserved_atomic, cost_atomic, status, usage_source FROM usage", params![], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get::<i64>(7)? as u64,
                r.get::<i64>(8)? as u64,
                r.get(9)?,
                r.get(10)?,
                r.get(11)?,
                r.get(12)?,
            ))
        }).unwrap();
    let usage_by_request: HashMap<&str, &UsageRow> =
        usage.iter().map(|u| (u.1.as_str(), u)).collect();
    assert_eq!(usage_by_request.len(), usage.len(), "a request id twice");
    let mut cost_by_account: HashMap<String, i64> = HashMap::new();
    for u in &usage {
        let (
            id,
            request,
            key_id,
            account,
            kind,
            model,
            _,
            prompt,
            completion,
            reserved,
            cost,
            status,
            source,
        ) = u;
        let key = by_id[key_id];
        assert_eq!(
            (&key.3, key.2.as_str()),
            (account, kind.as_str()),
            "usage {id}"
        );
        match (kind.as_str(), status.as_str()) {
            (_, "ok") => {
                let served = upstream
                    .get(request.as_str())
                    .unwrap_or_else(|| panic!("usage {id} ({request}) settled, never served"));
                assert_eq!(
                    (model, *prompt, *completion, source.as_str()),
                    (&served.model, served.words, served.completion, "upstream"),
                    "usage {id} ({request})"
                );
                let exact = if kind == "credit" {
                    prices(model).cost(*prompt, *completion).atomic()
                } else {
                    0
                };
                assert_eq!(*cost, exact, "usage {id} ({request}): cost");
                assert!(*cost <= *reserved || kind == "subscription");
            }
            ("credit", "interrupted") => {
                assert_eq!((*cost, source.as_str()), (0, "none"), "usage {id}");
                out.interrupted += 1;
            }
            _ => panic!("usage {id} ({request}): {kind} request ended `{status}`"),
        }
        if kind == "credit" {
            *cost_by_account.entry(account.clone()).or_default() += cost;
            out.credit_requests += 1;
        } else {
            assert_eq!(*reserved, 0);
            out.pool_requests += 1;
        }
    }
    for (request, served) in upstream {
        match usage_by_request.get(request.as_str()) {
            Some(u) => assert_eq!(
                (&u.5, u.4.as_str()),
                (
                    &served.model,
                    if served.credit {
                        "credit"
                    } else {
                        "subscription"
                    }
                ),
                "usage of {request}"
            ),
            // A credit request's row is its reservation, committed before anything is forwarded upstream.
            None => assert!(
                !served.credit,
                "credit request {request} reached the upstream but has no usage row"
            ),
        }
    }
    for a in agents {
        for d in &a.chats_done {
            let Some(u) = usage_by_request.get(d.request_id.as_str()) else {
                // A pool key's stream is recorded when its body ends, after the client has it all: a kill in
                // between leaves no row (there is nothing to charge).
                assert!(
                    d.stream && !d.credit,
                    "request {} was answered whole but has no usage row",
                    d.request_id
                );
                out.pool_rows_lost += 1;
                continue;
            };
            assert_eq!(
                (&u.5, u.6, u.4.as_str()),
                (
                    &d.model,
                    d.stream,
                    if d.credit { "credit" } else { "subscription" }
                ),
                "usage of {}",
                d.request_id
            );
            match u.11.as_str() {
                "ok" => assert_eq!((u.7, u.8), (d.words, d.completion), "{}", d.request_id),
                // A stream ends for the client before its settlement commits (it settles when the body is done):
                // a kill in between leaves it in flight, and the documented restart policy refunds it whole.
                "interrupted" if d.stream => out.delivered_then_refunded += 1,
                other => panic!(
                    "request {} was answered whole but its usage row is `{other}`",
                    d.request_id
                ),
            }
        }
        for r in &a.refused {
            assert!(
                !usage_by_request.contains_key(r.as_str()),
                "refused request {r} has a usage row"
            );
        }
    }
    let answered: HashSet<&str> = agents
        .iter()
        .flat_map(|a| a.chats_done.iter().map(|d| d.request_id.as_str()))
        .collect();
    out.settled_but_answer_lost = usage
        .iter()
        .filter(|u| u.11 == "ok" && !answered.contains(u.1.as_str()))
        .count();

    // 6. The ledger: every running balance follows from the one before; nothing but top-ups, surpluses and the
    //    metering of usage rows; each request's debit and refund add up to its exact cost; each account's balance
    //    is what it paid in minus the exact cost of its requests, to the atomic unit.
    type LedgerRow = (
        i64,
        String,
        String,
        i64,
        i64,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let ledger: Vec<LedgerRow> = c.query_map("SELECT id, account, kind, amount_atomic, balance_after, tx_hash, key_id, note FROM ledger ORDER BY id", params![], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        }).unwrap();
    out.ledger_rows = ledger.len();
    let mut running: HashMap<&str, i64> = HashMap::new();
    let mut paid_in: HashMap<&str, i64> = HashMap::new();
    let mut metered: BTreeMap<String, i64> = BTreeMap::new();
    let usage_by_id: HashMap<i64, &UsageRow> = usage.iter().map(|u| (u.0, u)).collect();
    for (id, account, kind, amount, after, tx, key, note) in &ledger {
        let balance = running.entry(account).or_default();
        *balance += amount;
        assert_eq!(*balance, *after, "ledger row {id}: balance_after");
        assert!(*after >= 0);
        match kind.as_str() {
            "topup" | "surplus" => {
                let tx = tx.as_deref().expect("a credit row names its tx");
                let claim = claims.iter().find(|c| c.0 == tx).expect("its claim");
                let want = if kind == "topup" { claim.4 } else { claim.5 };
                assert_eq!(*amount, want, "ledger row {id} ({kind} of {tx})");
                *paid_in.entry(account).or_default() += amount;
            }
            "debit" | "refund" => {
                let note = note.as_deref().unwrap_or_default();
                // Which usage row it meters, from the note the proxy writes.
                let usage_id = if let Some(request) = note.strip_prefix("reserve for request ") {
                    assert_eq!(kind, "debit");
                    usage_by_request
                        .get(request)
                        .unwrap_or_else(|| {
                            panic!("ledger row {id}: reservation of unknown {request}")
                        })
                        .0
                } else {
                    let digits = note
                        .split('#')
                        .nth(1)
                        .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
                        .and_then(|n| n.parse::<i64>().ok())
                        .unwrap_or_else(|| panic!("ledger row {id}: unexpected note `{note}`"));
                    // A settlement; a refund at a SQLite start-up; a refund by a replica sweeping the
                    // reservations of a replica whose lease expired (PostgreSQL).
                    assert!(
                        note.starts_with("settle request #")
                            || note.ends_with("interrupted by a restart: reservation returned")
                            || (note.contains(" interrupted: replica ")
                                && note.ends_with(" stopped, reservation returned")),
                        "ledger row {id}: unexpected note `{note}`"
                    );
                    digits
                };
                let u = usage_by_id
                    .get(&usage_id)
                    .unwrap_or_else(|| panic!("ledger row {id} meters no usage row"));
                assert_eq!((&u.3, Some(u.2)), (account, *key), "ledger row {id}");
                *metered.entry(u.1.clone()).or_default() += amount;
            }
            other => panic!("ledger row {id}: unexpected kind {other}"),
        }
    }
    for u in usage.iter().filter(|u| u.4 == "credit") {
        assert_eq!(
            metered.get(&u.1).copied().unwrap_or(0),
            -u.10,
            "usage {} ({}): its ledger rows do not add up to its cost",
            u.0,
            u.1
        );
    }
    for a in agents {
        let account = a.address.as_str();
        let paid = paid_in.get(account).copied().unwrap_or(0);
        assert_eq!(
            paid,
            credits_in.get(account).copied().unwrap_or(0),
            "{account}: credits in"
        );
        let cost = cost_by_account.get(account).copied().unwrap_or(0);
        let balance = running.get(account).copied().unwrap_or(0);
        assert_eq!(
            balance,
            paid - cost,
            "{account}: balance is not paid in − exact cost"
        );
        if let Some(seen) = a.final_balance {
            assert_eq!(seen.atomic(), balance, "{account}: /v1/usage balance");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The run: set-up, agents, the end, shared by this suite and `replicas.rs`.

/// `name`'s value in the environment, parsed, else `default`.
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Mines a block every 150 ms until the token is cancelled (payments also mine their own), so payments reach
/// their confirmations.
pub(crate) fn start_miner(
    chain: &Arc<TestChain>,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let mining = tokio_util::sync::CancellationToken::new();
    let miner = tokio::spawn({
        let chain = chain.clone();
        let mining = mining.clone();
        async move {
            while !mining.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(150)).await;
                chain.mine(1).await;
            }
        }
    });
    (mining, miner)
}

/// One task per agent (its choices drawn from `seed`), running until `shared.stop`.
pub(crate) fn spawn_agents(shared: &Arc<Shared>, seed: u64) -> Vec<tokio::task::JoinHandle<Agent>> {
    (0..AGENTS)
        .map(|i| {
            let signer = shared.payers.signers[i].clone();
            let agent = Agent {
                index: i,
                rng: StdRng::seed_from_u64(seed.wrapping_add(1 + i as u64)),
                credit_key: None,
                pool_keys: Vec::new(),
                last_signed_at: 0,
                record: AgentRecord {
                    address: format!("{:#x}", signer.address()),
                    ..AgentRecord::default()
                },
                signer,
            };
            tokio::spawn(agent.run(shared.clone()))
        })
        .collect()
}

/// Stops the agents; once every request has settled (`wait_settled`, up to `settle_deadline`), each checks its
/// keys and reads its balance. Returns their records and how long the settling took.
pub(crate) async fn finish_agents(
    shared: &Shared,
    agents: Vec<tokio::task::JoinHandle<Agent>>,
    store: &Store,
    settle_deadline: Duration,
    log: &Arc<Mutex<ServerLog>>,
) -> (Vec<AgentRecord>, Duration) {
    let failed = |e: tokio::task::JoinError| -> ! {
        panic!(
            "an agent failed: {e}\nserver log tail:\n{}",
            log.lock().unwrap().tail_text()
        )
    };
    shared.stop.store(true, Ordering::SeqCst);
    let mut stopped = Vec::new();
    for agent in agents {
        stopped.push(
            tokio::time::timeout(Duration::from_secs(180), agent)
                .await
                .expect("agents finish")
                .unwrap_or_else(|e| failed(e)),
        );
    }
    // The balance an agent reads must not still hold a reservation: a stream settles just after its last byte; a
    // dead replica's reservation waits for its lease to expire (PostgreSQL).
    let settled_in = wait_settled(store, settle_deadline).await;
    let mut records = Vec::new();
    for mut agent in stopped {
        agent.final_check(shared).await;
        records.push(agent.record);
    }
    (records, settled_in)
}

/// Runs `f` on a read snapshot of the store (either engine).
pub(crate) async fn read_db<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&dyn Sql) -> T + Send + 'static,
) -> T {
    store
        .read(move |c| -> Result<T, StoreError> { Ok(f(c)) })
        .await
        .unwrap_or_else(|e| panic!("reading the database: {e}"))
}

/// Polls (up to `deadline`) until no `usage` row is in flight: streams settle after their last byte; on
/// PostgreSQL a dead replica's reservations wait for its lease to expire and a live replica's sweep.
pub(crate) async fn wait_settled(store: &Store, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let in_flight: Result<i64, StoreError> = store
            .read(|c| {
                c.query_value(
                    "SELECT count(*) FROM usage WHERE status = 'in_flight'",
                    params![],
                )
            })
            .await;
        if in_flight.as_ref().is_ok_and(|n| *n == 0) {
            return start.elapsed();
        }
        if start.elapsed() >= deadline {
            let rows: Vec<(i64, String, Option<String>)> = read_db(store, |c| {
                c.query_map(
                    "SELECT id, request_id, replica_id FROM usage WHERE status = 'in_flight' ORDER BY id",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap()
            })
            .await;
            panic!("requests still in flight after {deadline:?} (id, request, replica): {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/healthz` until the gateway (whichever replica leads, behind a balancer) has indexed the chain's head.
pub(crate) async fn wait_index_at_head(shared: &Shared, deadline: Duration) {
    let head = shared.chain.head().await;
    let start = Instant::now();
    loop {
        if let (_, Answer::Got(_, h)) = shared.get("/healthz", None).await
            && h["indexer"]["indexedHead"]
                .as_u64()
                .is_some_and(|n| n >= head)
        {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "the index did not reach the chain head {head} within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The chain's side of the ground truth and every check against it, through `store`.
pub(crate) async fn check_end_state(
    store: &Store,
    chain: &TestChain,
    records: Vec<AgentRecord>,
    upstream: &UpstreamLog,
) -> Checked {
    let chain_log = chain_transfers(chain).await;
    // The logs are the whole story of payTo's balance (it receives nothing else and spends nothing).
    let pay_to_balance = TestUSDC::new(chain.token(), &chain.provider)
        .balanceOf(chain.pay_to())
        .call()
        .await
        .unwrap();
    assert_eq!(
        pay_to_balance,
        U256::from(chain_log.iter().map(|t| t.value).sum::<i64>() as u64)
    );
    let served = upstream.0.lock().unwrap().clone();
    read_db(store, move |c| {
        check_ground_truth(c, &chain_log, &records, &served)
    })
    .await
}

/// No panic in any process's log, and every refund a log reported is an interrupted row.
pub(crate) fn check_logs(log: &Arc<Mutex<ServerLog>>, checked: &Checked) {
    let server_log = log.lock().unwrap();
    assert!(
        server_log.panics.is_empty(),
        "the gateway panicked: {:?}",
        server_log.panics
    );
    // Every interrupted row was refunded by a start-up or a sweep (a kill between that commit and its log line is
    // possible, so the logs may report fewer).
    assert!(server_log.recovered_reported <= checked.interrupted as u64);
}

/// Enough happened for the checks to mean something.
pub(crate) fn check_enough_happened(shared: &Shared, report: &KillReport, kills: usize) {
    let st = &shared.stats;
    assert!(report.kills >= kills);
    assert!(
        get(&st.claims_ok) + get(&st.claims_recovered_by_409) >= AGENTS as u64,
        "too few claims"
    );
    assert!(
        get(&st.chats_json_done) + get(&st.chats_stream_done) >= 20,
        "too few chat requests"
    );
}

/// The summary (`--nocapture`), each line prefixed by `label`.
pub(crate) fn print_summary(
    label: &str,
    seed: u64,
    started: Instant,
    report: &KillReport,
    shared: &Shared,
    checked: &Checked,
    log: &Arc<Mutex<ServerLog>>,
) {
    let st = &shared.stats;
    let restart = &report.restart_ms;
    let mean_restart = restart.iter().sum::<u128>() / restart.len().max(1) as u128;
    println!(
        "{label} summary: seed {seed}; {} SIGKILLs in {:.1} s ({} at a random time, {} with a claim or rotation on \
         the wire, {} right after a claim or rotation committed, {} mid-stream, {} during start-up, {} aimed but nothing in flight within 3 s); restart to \
         listening: mean {mean_restart} ms, max {} ms",
        report.kills,
        started.elapsed().as_secs_f64(),
        report.anytime,
        report.during_write,
        report.after_commit,
        report.during_stream,
        report.during_startup,
        report.unaimed,
        restart.iter().max().copied().unwrap_or(0),
    );
    println!(
        "{label} summary: {} payments, all indexed once and confirmed ({} transfers); {} claims ({} subscriptions): \
         {} answered 200 (mean round trip {} µs), {} answers lost to a kill, {} recovered by the 409 naming the purchase; {} waits \
         (pending / not indexed); {} key rotations ({} answers lost), {} keys in all, {} replaced",
        get(&st.payments),
        checked.transfers,
        checked.claims,
        checked.subscriptions,
        get(&st.claims_ok),
        get(&st.claim_ok_micros) / get(&st.claims_ok).max(1),
        get(&st.claim_answers_lost),
        get(&st.claims_recovered_by_409),
        get(&st.claim_waits),
        get(&st.rotations),
        get(&st.rotation_answers_lost),
        checked.keys,
        checked.rotated_keys,
    );
    println!(
        "{label} summary: {} chat requests sent: {} JSON + {} streamed credit answers received whole, {} pool-key \
         answers ({} outside the window), {} refused 402 for their worst case, {} lost to a kill, {} 429; usage \
         rows: {} credit ({} interrupted and refunded, {} of them streams the client had received \
         whole; {} settled whose answer was lost), {} pool ({} pool streams received whole whose row the kill beat); {} ledger rows; the gateway logged {} refunds; \
         audit verify: clean",
        get(&st.chats_sent),
        get(&st.chats_json_done),
        get(&st.chats_stream_done),
        get(&st.pool_chats_done),
        get(&st.pool_chats_outside_window),
        get(&st.chats_refused_402),
        get(&st.chats_lost),
        get(&st.too_many_requests),
        checked.credit_requests,
        checked.interrupted,
        checked.delivered_then_refunded,
        checked.settled_but_answer_lost,
        checked.pool_requests,
        checked.pool_rows_lost,
        checked.ledger_rows,
        log.lock().unwrap().recovered_reported,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let kills: usize = env_or("CRASH_KILLS", SHORT_KILLS);
    let seed: u64 = env_or("CRASH_SEED", rand::rng().random());
    println!("crash: seed {seed} (replay the plan with CRASH_SEED={seed}), {kills} kills");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);

    let chain = Arc::new(TestChain::start().await);
    let payers = Payers::new(&chain).await;
    let upstream_log = UpstreamLog::default();
    // 2 ms a token: streams last long enough (up to ~130 ms) for kills to land inside them.
    let upstream_url = start_upstream(upstream_log.clone(), Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch {
        config: dir.path().join("config.toml"),
        env: Vec::new(),
    };
    std::fs::write(&launch.config, config_text(&chain, &upstream_url)).unwrap();
    let db = dir.path().join("gateway.db");
    let log = Arc::new(Mutex::new(ServerLog::default()));

    let mut process = Process::spawn(&launch, 0, &log);
    let url = process.wait_listening(&log).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let shared = Shared::new(url, http, chain.clone(), payers);
    let (mining, miner) = start_miner(&chain);
    let agents = spawn_agents(&shared, seed);

    let (process_now, report) = killer(&shared, process, &launch, &db, &log, kills, &mut rng).await;
    process = process_now;
    // Quiesce: streams settle after their last byte; the index reaches the head.
    let store = Store::open_database(&x402_gateway::config::Database::Sqlite { path: db.clone() })
        .await
        .unwrap();
    let (records, _) = finish_agents(&shared, agents, &store, DEADLINE, &log).await;
    mining.cancel();
    miner.await.unwrap();
    wait_index_at_head(&shared, DEADLINE).await;
    process.sigkill();

    let checked = check_end_state(&store, &chain, records, &upstream_log).await;
    check_logs(&log, &checked);
    launch.audit_verify();
    check_enough_happened(&shared, &report, kills);
    print_summary("crash", seed, started, &report, &shared, &checked, &log);
}

/// The start-up refund assumes the previous process is dead. A second gateway started on the same database while
/// the first still serves (a deploy that overlaps the old and new process on different ports) would refund the
/// first one's live reservations. So `serve` holds a lock on the database: the second one refuses to start, touches
/// nothing, and starts once the first is gone (a SIGKILLed holder leaves no stale lock). As a second line of
/// defence, settlement acts only on a row still in flight (src/store/usage.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_database_refuses_to_start_while_the_first_runs() {
    let chain = TestChain::start().await;
    // 100 ms a token: a 50-token JSON answer takes 5 s, time enough to try the second process under it.
    let upstream_url = start_upstream(UpstreamLog::default(), Duration::from_millis(100)).await;
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch {
        config: dir.path().join("config.toml"),
        env: Vec::new(),
    };
    let config = &launch.config;
    std::fs::write(config, config_text(&chain, &upstream_url)).unwrap();
    let db = dir.path().join("gateway.db");
    let account = "0x1111111111111111111111111111111111111111";
    let granted = usdc("5.00");
    // `keys grant` writes to an existing database only: `migrate` creates it.
    let migrated = Command::new(bin())
        .args(["migrate", "--config"])
        .arg(config)
        .status()
        .map(|s| s.success());
    assert!(matches!(migrated, Ok(true)), "migrate failed");
    let out = Command::new(bin())
        .args(["keys", "grant", "--config"])
        .arg(config)
        .args([account, "5.00"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .split("new credit key (shown once): ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no key in {stdout}"))
        .to_string();

    let log = Arc::new(Mutex::new(ServerLog::default()));
    let mut first = Process::spawn(&launch, 0, &log);
    let first_url = first.wait_listening(&log).await;
    let http = reqwest::Client::new();
    let request = tokio::spawn({
        let http = http.clone();
        let key = key.clone();
        async move {
            http.post(format!("{first_url}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({"model": "alpha", "messages": [{"role": "user", "content": "c0 c1 c2"}], "max_tokens": 50}))
                .send()
                .await
                .unwrap()
        }
    });
    let in_flight = || {
        let c = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        c.query_row(
            "SELECT count(*) FROM usage WHERE status = 'in_flight'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
    };
    wait_for("the reservation", || async {
        (in_flight() == 1).then_some(())
    })
    .await;

    // A second `serve` (and an `index`) on the same database, while the first is waiting for the upstream.
    for command in ["serve", "index"] {
        let mut second = Command::new(bin())
            .args([command, "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_for(&format!("a second `{command}` to exit"), || {
            let exited = second.try_wait().unwrap();
            async move { exited }
        })
        .await;
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "a second `{command}` ran: {stderr}");
        assert!(
            stderr.contains("is in use by another running x402-gateway"),
            "{stderr}"
        );
        assert_eq!(
            in_flight(),
            1,
            "the second `{command}` touched the reservation"
        );
    }

    let resp = request.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 50);
    assert_eq!(in_flight(), 0);
    assert_eq!(log.lock().unwrap().recovered_reported, 0);

    // The request was settled once, by the process that served it: the balance is the grant minus its exact cost.
    let (ledger_sum, charged): (i64, i64) = {
        let c = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        c.query_row(
            "SELECT (SELECT sum(amount_atomic) FROM ledger WHERE account = ?1), \
             (SELECT coalesce(sum(cost_atomic), 0) FROM usage WHERE account = ?1)",
            [account],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert!(charged > 0, "the request was not charged");
    assert_eq!(ledger_sum, granted.atomic() - charged);

    // SIGKILL releases the lock with the process: the next gateway starts at once and sees the same balance.
    first.sigkill();
    let mut second = Process::spawn(&launch, 1, &log);
    let second_url = second.wait_listening(&log).await;
    let usage: Value = http
        .get(format!("{second_url}/v1/usage"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        usage["credits"]["balanceUsdc"].as_str().map(usdc),
        Some(Usdc(ledger_sum))
    );
    second.sigkill();
}
