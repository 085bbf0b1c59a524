//! Test support: a real anvil chain with the test USDC, an in-process indexer on a temp SQLite file, fault-injecting
//! proxies for RPC outages and provider range limits, and polling with a deadline (never fixed sleeps).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alloy::eips::Encodable2718;
use alloy::network::{Ethereum, EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::ext::AnvilApi;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use x402_gateway::chain::{Indexer, IndexerError, StatusHandle};
use x402_gateway::config::{ChainSettings, Config, Network};
use x402_gateway::dev::{self, DevChain, contracts::TestUSDC};
use x402_gateway::store::Store;
use x402_gateway::store::transfers::{Transfer, TransferStatus};
use x402_gateway::usdc::Usdc;

/// How long any condition may take before a test fails.
/// The dev chain's CAIP-2 id: the network every test row is keyed by.
pub const DEV_NETWORK: &str = "eip155:31337";

pub const DEADLINE: Duration = Duration::from_secs(30);

/// anvil from the project's npm install.
pub fn anvil_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(dev::ANVIL_RELATIVE);
    assert!(
        p.is_file(),
        "anvil not found at {}; run `npm ci` (scripts/test does)",
        p.display()
    );
    p
}

/// Polls `check` until it yields `Some`, failing the test with `what` after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A real anvil chain (mining on every transaction) with the test USDC and funded payers.
pub struct TestChain {
    pub dev: DevChain,
    pub provider: DynProvider,
}

impl TestChain {
    pub async fn start() -> TestChain {
        TestChain::start_with_id(dev::DEV_CHAIN_ID).await
    }

    /// A chain with another chain id (a second network).
    pub async fn start_with_id(chain_id: u64) -> TestChain {
        let dev = dev::start_chain_with_id(&anvil_path(), chain_id, 0, Usdc::whole(1_000_000))
            .await
            .expect("dev chain starts");
        let mut wallet = EthereumWallet::from(dev.deployer.clone());
        for agent in &dev.agents {
            wallet.register_signer(agent.clone());
        }
        let provider = ProviderBuilder::new()
            .wallet(wallet)
            .connect_http(dev.anvil.endpoint_url())
            .erased();
        TestChain { dev, provider }
    }

    pub fn token(&self) -> Address {
        self.dev.token
    }

    pub fn pay_to(&self) -> Address {
        self.dev.pay_to
    }

    pub fn payer(&self, i: usize) -> &PrivateKeySigner {
        &self.dev.agents[i]
    }

    pub fn rpc_url(&self) -> String {
        self.dev.anvil.endpoint()
    }

    /// Indexer settings against this chain: `confirmations` deep, polling every 50 ms.
    pub fn settings(&self, confirmations: u64) -> ChainSettings {
        ChainSettings {
            network: Network {
                name: "custom".into(),
                chain_id: dev::DEV_CHAIN_ID,
                token: self.token(),
                token_name: "USDC".into(),
                token_version: "2".into(),
            },
            rpc_http: vec![self.rpc_url()],
            rpc_ws: None,
            pay_to: self.pay_to(),
            confirmations,
            start_block: 0,
            poll_interval: Duration::from_millis(50),
            max_block_range: 2_000,
            reorg_window: (confirmations * 2).max(64),
            rpc_timeout: Duration::from_secs(2),
            ready_max_lag_blocks: confirmations * 3,
            extra_tokens: Vec::new(),
        }
    }

    /// The receipt of `hash`, polled until anvil has it. (alloy's `PendingTransaction::get_receipt` can fail with
    /// `NullResp` when the node answers its receipt query before the transaction is indexed, which a loaded
    /// machine makes likely: seen once in `reversals`.)
    pub async fn receipt(&self, hash: B256) -> alloy::rpc::types::TransactionReceipt {
        wait_for(&format!("the receipt of {hash:#x}"), || async move {
            self.provider
                .get_transaction_receipt(hash)
                .await
                .ok()
                .flatten()
        })
        .await
    }

    /// Sends `amount` of `token` from `from` to `to`; returns (tx hash, block number).
    pub async fn transfer_token(
        &self,
        token: Address,
        from: Address,
        to: Address,
        amount: Usdc,
    ) -> (String, u64) {
        let pending = TestUSDC::new(token, &self.provider)
            .transfer(to, U256::from(amount.atomic() as u64))
            .from(from)
            .send()
            .await
            .expect("transfer sent");
        let receipt = self.receipt(*pending.tx_hash()).await;
        assert!(receipt.status(), "transfer reverted");
        (
            format!("{:#x}", receipt.transaction_hash),
            receipt.block_number.expect("mined"),
        )
    }

    /// Payer `i` pays `amount` test USDC to payTo.
    pub async fn pay(&self, i: usize, amount: Usdc) -> (String, u64) {
        self.transfer_token(self.token(), self.payer(i).address(), self.pay_to(), amount)
            .await
    }

    /// A signed, not yet sent payment from payer `i` (to send now, or to place into a reorg).
    pub async fn signed_payment(&self, i: usize, amount: Usdc) -> (B256, Bytes) {
        self.signed_payment_to(i, self.pay_to(), amount).await
    }

    /// A signed, not yet sent transfer of `amount` from payer `i` to `to`.
    pub async fn signed_payment_to(&self, i: usize, to: Address, amount: Usdc) -> (B256, Bytes) {
        let from = self.payer(i).address();
        let nonce = self
            .provider
            .get_transaction_count(from)
            .pending()
            .await
            .expect("nonce");
        let call = TestUSDC::transferCall {
            to,
            value: U256::from(amount.atomic() as u64),
        };
        let tx = TransactionRequest::default()
            .with_from(from)
            .with_to(self.token())
            .with_input(call.abi_encode())
            .with_nonce(nonce)
            .with_chain_id(self.provider.get_chain_id().await.expect("chain id"))
            .with_gas_limit(200_000)
            .with_max_fee_per_gas(20_000_000_000)
            .with_max_priority_fee_per_gas(1_000_000_000);
        let wallet = EthereumWallet::from(self.payer(i).clone());
        let envelope =
            <TransactionRequest as NetworkTransactionBuilder<Ethereum>>::build(tx, &wallet)
                .await
                .expect("signs");
        let hash = *envelope.tx_hash();
        (hash, Bytes::from(envelope.encoded_2718()))
    }

    pub async fn head(&self) -> u64 {
        self.provider.get_block_number().await.expect("head")
    }

    pub async fn mine(&self, blocks: u64) {
        self.provider
            .anvil_mine(Some(blocks), None)
            .await
            .expect("mines");
    }

    /// Deploys a second token, to check that its Transfer events are ignored.
    pub async fn other_token(&self) -> Address {
        let token = TestUSDC::deploy(&self.provider, "Other".to_string(), "1".to_string())
            .await
            .expect("deploys");
        let addr = *token.address();
        for agent in &self.dev.agents {
            token
                .mint(agent.address(), U256::from(1_000_000_000_000u64))
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
        }
        addr
    }
}

/// An indexer running in this process on its own SQLite file.
pub struct RunningIndexer {
    pub store: Store,
    pub status: StatusHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), IndexerError>>,
}

impl RunningIndexer {
    pub fn start(settings: ChainSettings, db: &Path) -> RunningIndexer {
        let store = Store::open(db).expect("store opens");
        let status = StatusHandle::default();
        let shutdown = CancellationToken::new();
        let task =
            x402_gateway::chain::spawn(settings, store.clone(), status.clone(), shutdown.clone())
                .expect("indexer starts");
        RunningIndexer {
            store,
            status,
            shutdown,
            task,
        }
    }

    /// Stops the indexer and returns how it ended.
    pub async fn stop(self) -> Result<(), IndexerError> {
        self.shutdown.cancel();
        self.task.await.expect("indexer task joins")
    }

    /// Waits until blocks up to `block` are indexed.
    pub async fn wait_indexed(&self, block: u64) {
        let status = self.status.clone();
        wait_for(&format!("indexed head ≥ {block}"), || {
            let s = status.snapshot();
            async move { s.indexed_head.filter(|h| *h >= block) }
        })
        .await;
    }

    pub async fn transfers_of(&self, tx: &str) -> Vec<Transfer> {
        self.store
            .transfers_of_tx(crate::support::DEV_NETWORK, tx.to_string())
            .await
            .expect("reads")
    }

    pub async fn all(&self) -> Vec<Transfer> {
        self.store.list_transfers(None).await.expect("reads")
    }

    /// Waits until `tx` has a row with `status`, and returns that row.
    pub async fn wait_status(&self, tx: &str, status: TransferStatus) -> Transfer {
        wait_for(&format!("{tx} to be {status:?}"), || async {
            self.transfers_of(tx)
                .await
                .into_iter()
                .find(|t| t.status == status)
        })
        .await
    }
}

/// Indexes `settings` until synced with the head, in this task.
pub async fn index_once(settings: ChainSettings, store: &Store) -> Result<(), IndexerError> {
    Indexer::new(settings, store.clone(), StatusHandle::default())?
        .run_until_synced(CancellationToken::new())
        .await
}

// ---------------------------------------------------------------------------------------------------------------
// A TCP proxy that can cut every connection and refuse new ones (an RPC outage), or delay traffic.

#[derive(Clone)]
pub struct TcpFaultProxy {
    pub addr: std::net::SocketAddr,
    down: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    pub connections: Arc<AtomicUsize>,
}

impl TcpFaultProxy {
    pub async fn start(target: std::net::SocketAddr) -> TcpFaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (cut, _) = watch::channel(0u64);
        let proxy = TcpFaultProxy {
            addr: listener.local_addr().unwrap(),
            down: Arc::new(AtomicBool::new(false)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            cut,
            connections: Arc::new(AtomicUsize::new(0)),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if p.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                p.connections.fetch_add(1, Ordering::SeqCst);
                let p = p.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut cut = p.cut.subscribe();
                    let delay = Duration::from_millis(p.delay_ms.load(Ordering::SeqCst));
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every open connection and refuses new ones until [`TcpFaultProxy::up`].
    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A JSON-RPC proxy that refuses `eth_getLogs` spans above a limit the way providers do.

#[derive(Clone)]
pub struct RangeLimitProxy {
    pub addr: std::net::SocketAddr,
    pub refused: Arc<AtomicUsize>,
    pub largest_served: Arc<AtomicU64>,
    /// Block numbers asked for with `eth_getBlockByNumber`.
    pub headers_requested: Arc<std::sync::Mutex<Vec<u64>>>,
    /// Play an older node: remove `blockTimestamp` from the logs.
    pub strip_log_timestamps: Arc<std::sync::atomic::AtomicBool>,
}

impl RangeLimitProxy {
    /// `hint`: whether the error names a range that would work (Alchemy style) or not.
    pub async fn start(target: String, max_span: u64, hint: bool) -> RangeLimitProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = RangeLimitProxy {
            addr: listener.local_addr().unwrap(),
            refused: Arc::new(AtomicUsize::new(0)),
            largest_served: Arc::new(AtomicU64::new(0)),
            headers_requested: Arc::default(),
            strip_log_timestamps: Arc::default(),
        };
        let p = proxy.clone();
        let client = alloy::transports::http::reqwest::Client::new();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let p = p.clone();
                let client = client.clone();
                let target = target.clone();
                async move {
                    let answer = |req: Value| {
                        let p = p.clone();
                        let client = client.clone();
                        let target = target.clone();
                        async move {
                            if req["method"] == "eth_getLogs" {
                                let num = |v: &Value| u64::from_str_radix(v.as_str().unwrap_or("0x0").trim_start_matches("0x"), 16).unwrap_or(0);
                                let (from, to) = (num(&req["params"][0]["fromBlock"]), num(&req["params"][0]["toBlock"]));
                                let span = to.saturating_sub(from) + 1;
                                if span > max_span {
                                    p.refused.fetch_add(1, Ordering::SeqCst);
                                    let message = if hint {
                                        format!("query exceeds max results. Try with this block range [{:#x}, {:#x}].", from, from + max_span - 1)
                                    } else {
                                        "block range too large".to_string()
                                    };
                                    return json!({"jsonrpc": "2.0", "id": req["id"], "error": {"code": -32005, "message": message}});
                                }
                                p.largest_served.fetch_max(span, Ordering::SeqCst);
                            }
                            if req["method"] == "eth_getBlockByNumber" {
                                let n = req["params"][0].as_str().and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
                                p.headers_requested.lock().unwrap().extend(n);
                            }
                            let mut answer = client.post(&target).json(&req).send().await.unwrap().json::<Value>().await.unwrap();
                            if req["method"] == "eth_getLogs" && p.strip_log_timestamps.load(Ordering::SeqCst) {
                                for log in answer["result"].as_array_mut().into_iter().flatten() {
                                    log.as_object_mut().map(|o| o.remove("blockTimestamp"));
                                }
                            }
                            answer
                        }
                    };
                    let out = match body {
                        Value::Array(reqs) => {
                            let mut out = Vec::new();
                            for r in reqs {
                                out.push(answer(r).await);
                            }
                            Value::Array(out)
                        }
                        single => answer(single).await,
                    };
                    axum::Json(out)
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// `config` with `[limits] rate_limits = false` appended, unless it has a `[limits]` table of its own: the per-IP
/// rate limits count every test request as coming from one client, 127.0.0.1.
pub fn without_rate_limits(config: String) -> String {
    if config.lines().any(|l| l.trim() == "[limits]") {
        config
    } else {
        // Tests also race hundreds of requests on one credit key on purpose (the reservation must hold them);
        // the in-flight cap per key has its own test (metering.rs).
        format!("{config}\n[limits]\nrate_limits = false\ncredit_key_max_in_flight = 100000\n")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The engine the gateway suites run on. `X402_TEST_ENGINE=postgres` (scripts/test runs the money suites a second
// time so) gives each gateway a fresh PostgreSQL database of its own on `X402_TEST_POSTGRES_URL`'s server,
// migrated with the real `migrate`, in place of the SQLite file its config names.

/// The environment variable a PostgreSQL-mode config names in `[database] url`.
pub const TEST_DATABASE_URL_VAR: &str = "X402_TEST_DATABASE_URL";

/// Whether this run puts the gateway suites on PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("X402_TEST_ENGINE").as_deref() == Ok("postgres")
}

/// `url` with its database name replaced by `name` (query kept).
pub fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh PostgreSQL database on the test server, migrated to this binary's schema; returns its URL.
pub async fn fresh_postgres_database() -> String {
    let server = std::env::var("X402_TEST_POSTGRES_URL").expect(
        "X402_TEST_ENGINE=postgres needs X402_TEST_POSTGRES_URL (scripts/test starts a throwaway cluster)",
    );
    let name = format!("x402_gw_{:016x}", rand::random::<u64>());
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .expect("connects to the test PostgreSQL");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("creates a test database");
    let url = with_dbname(&server, &name);
    let database = x402_gateway::config::Database::Postgres {
        url: x402_gateway::config::PostgresUrl::new(url.clone()),
    };
    x402_gateway::store::migrate::migrate(&database)
        .await
        .expect("migrates the test database");
    url
}

/// On PostgreSQL, `config` with its `[database]` table's `path` replaced by `url = "$X402_TEST_DATABASE_URL"`
/// and that variable pointing at a fresh database (kept across restarts: an existing variable is reused).
pub async fn engine_config(config: String, env: &mut Vec<(String, String)>) -> String {
    if !on_postgres() {
        return config;
    }
    let mut in_database = false;
    let mut out = String::with_capacity(config.len());
    for line in config.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_database = trimmed == "[database]";
        }
        if in_database && trimmed.starts_with("path") {
            out.push_str(&format!("url = \"${TEST_DATABASE_URL_VAR}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !env.iter().any(|(k, _)| k == TEST_DATABASE_URL_VAR) {
        env.push((
            TEST_DATABASE_URL_VAR.to_string(),
            fresh_postgres_database().await,
        ));
    }
    out
}

/// Fails a PostgreSQL run whose gateway config kept SQLite (a config without a `[database] path` line).
pub fn assert_engine(database: &x402_gateway::config::Database) {
    if on_postgres() {
        assert!(
            matches!(database, x402_gateway::config::Database::Postgres { .. }),
            "X402_TEST_ENGINE=postgres but this gateway runs on {database:?}"
        );
    }
}

/// The gateway running in this process (indexer + HTTP) on a temp database, with a movable clock.
pub struct Gateway {
    pub base: String,
    pub http: reqwest::Client,
    pub clock: Arc<AtomicI64>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pub config: String,
    /// The SQLite file the config names (unused on PostgreSQL: see [`Gateway::store`]).
    pub db: std::path::PathBuf,
    /// The database the gateway really runs on.
    pub database: x402_gateway::config::Database,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Waits until the index has `block` at `confirmations` depth (mining the blocks it needs).
    pub async fn confirm(&self, chain: &TestChain, block: u64, confirmations: u64) {
        let head = chain.head().await;
        let need = block + confirmations - 1;
        if head < need {
            chain.mine(need - head).await;
        }
        self.wait_indexed(need).await;
    }

    pub async fn start_with(
        config: String,
        db: std::path::PathBuf,
        clock: Arc<AtomicI64>,
    ) -> Gateway {
        Gateway::start_with_env(config, db, clock, &[]).await
    }

    /// [`Gateway::start_with`] with environment variables for the config's `*_env` keys.
    ///
    /// Tests send bursts from 127.0.0.1 (hundreds of concurrent claims, polling loops), so a config without a
    /// `[limits]` table gets `[limits] rate_limits = false` (see [`without_rate_limits`]). Write a `[limits]` table to
    /// test the limits themselves.
    pub async fn start_with_env(
        config: String,
        db: std::path::PathBuf,
        clock: Arc<AtomicI64>,
        env: &[(&str, &str)],
    ) -> Gateway {
        let config = without_rate_limits(config);
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = engine_config(config, &mut env).await;
        let settings = Config::parse(&config, std::path::Path::new("test.toml"))
            .unwrap()
            .resolve(std::path::Path::new("/"), &|name| {
                env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
            .unwrap();
        let database = settings.database.clone();
        assert_engine(&database);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let c = clock.clone();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            // Secrets the gateway reads at start (the x402 hot wallet's key) come from `env` too.
            let env = env.clone();
            async move {
                x402_gateway::api::serve_with_env(
                    settings,
                    listener,
                    shutdown,
                    Arc::new(move || c.load(Ordering::SeqCst)),
                    &|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
                )
                .await
                .expect("gateway runs");
            }
        });
        let gw = Gateway {
            base,
            http: reqwest::Client::new(),
            clock,
            shutdown,
            task,
            config,
            db,
            database,
            env,
        };
        // Ready (database migrated) once /healthz answers.
        wait_for("the gateway answers /healthz", || async {
            let r = gw
                .http
                .get(format!("{}/healthz", gw.base))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        gw
    }

    /// The gateway's settings, resolved with the environment it was started with (its database URL included).
    pub fn settings(&self) -> x402_gateway::config::Settings {
        Config::parse(&self.config, std::path::Path::new("test.toml"))
            .unwrap()
            .resolve(std::path::Path::new("/"), &|name| {
                self.env
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
            .unwrap()
    }

    /// Stops the server (a clean shutdown: its requests finish, a leader resigns).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    /// Stops the server, runs `meanwhile` while it is down, then starts a new one on the same database and config.
    pub async fn restart_after<T>(self, meanwhile: impl Future<Output = T>) -> (Gateway, T) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        let done = meanwhile.await;
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let gw = Gateway::start_with_env(
            self.config.clone(),
            self.db.clone(),
            self.clock.clone(),
            &env,
        )
        .await;
        (gw, done)
    }

    /// Stops the server and starts a new one on the same database and config.
    pub async fn restart(self) -> Gateway {
        self.shutdown.cancel();
        self.task.await.unwrap();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Gateway::start_with_env(
            self.config.clone(),
            self.db.clone(),
            self.clock.clone(),
            &env,
        )
        .await
    }

    pub async fn get(
        &self,
        path: &str,
        key: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(
        &self,
        path: &str,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn wait_indexed(&self, block: u64) {
        wait_for(&format!("indexed head ≥ {block}"), || async {
            let (_, _, body) = self.get("/healthz", None).await;
            body["indexer"]["indexedHead"]
                .as_u64()
                .filter(|h| *h >= block)
        })
        .await;
    }

    pub fn set_time(&self, t: i64) {
        self.clock.store(t, Ordering::SeqCst);
    }

    /// The gateway's database, on whichever engine it runs.
    pub async fn store(&self) -> Store {
        Store::open_database(&self.database).await.unwrap()
    }
}
