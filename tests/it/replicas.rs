//! Several replicas under SIGKILL (issue 14). Three real `x402-gateway serve` processes run on one real PostgreSQL
//! database behind a small round-robin TCP balancer in this process, with a real anvil and the demo upstream. The
//! agents of the crash suite (`crash.rs`: payments, claims of top-ups and pool subscriptions with key rotation when
//! a claim's answer was lost, metered JSON and SSE chats from credit and pool keys) talk to the balancer only; every
//! request is its own connection, so consecutive requests land on different replicas. A killer SIGKILLs replicas at
//! random moments — at any time, the indexer leader on purpose, with a claim or rotation on the wire to that
//! replica, right after one commits there and before its answer leaves, mid-stream, two replicas at once, and a
//! replacement during its start-up — and starts each killed replica again (a new process on a new port, added to
//! the balancer; the dead one leaves the balancer a moment after it died, like a health check would take it out,
//! so some connections meet a dead port).
//!
//! A killed replica's in-flight reservations are refunded by a live replica's sweep once its lease expires
//! (`LEASE_TTL_SECS`); the end waits for that (polling, with a deadline), then runs the crash suite's ground-truth
//! checks through the product's `Store` on PostgreSQL (nothing lost, nothing twice, every key and balance exact)
//! and the real `audit verify`.
//!
//! Needs `X402_TEST_POSTGRES_URL` (`source scripts/postgres-test-cluster; start_test_postgres`); without it the
//! test says SKIPPED and passes, unless `X402_POSTGRES_REQUIRED=1`. Short form (CI, 15 kills): `cargo test --test
//! it replicas::`. Long form: `REPLICA_KILLS=100 cargo test --test it replicas:: -- --nocapture` (any number);
//! `REPLICA_SEED=N` replays the kill plan and agent choices.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use x402_gateway::config::{Database, PostgresUrl};
use x402_gateway::params;
use x402_gateway::store::Store;
use x402_gateway::store::replicas::LEASE_TTL_SECS;

use crate::crash::{
    KillReport, Launch, Payers, Process, ServerLog, Shared, UpstreamLog, WRITES_COMMITTED, aim,
    check_end_state, check_enough_happened, check_logs, config_text, env_or, finish_agents,
    kill_after_commit, print_summary, spawn_agents, start_miner, start_upstream,
    wait_index_at_head,
};
use crate::support::*;

/// Replicas serving at once.
const REPLICAS: usize = 3;
/// Kills in the short form; `REPLICA_KILLS` sets another number.
const SHORT_KILLS: usize = 15;

// ---------------------------------------------------------------------------------------------------------------
// The balancer.

/// A replica behind the balancer, and what it is serving now (the killer aims by it).
struct Backend {
    generation: u64,
    addr: SocketAddr,
    pid: u32,
    /// Connections open now whose request is a claim or a rotation (`POST /api/agent/…`).
    writes: AtomicUsize,
    /// Connections open now whose request is a chat completion.
    chats: AtomicUsize,
}

#[derive(Default)]
struct BalancerStats {
    connections: AtomicU64,
    /// Connections sent to a replica that had died (connection refused): closed without an answer.
    refused: AtomicU64,
}

/// A round-robin TCP balancer on 127.0.0.1:0 over the live replicas: each client connection goes to the next
/// replica in the list, whole; a connection to a dead replica fails (the client's connection is closed without an
/// answer), as a real balancer's would before its health check takes the replica out.
struct Balancer {
    url: String,
    backends: Arc<Mutex<Vec<Arc<Backend>>>>,
    stats: Arc<BalancerStats>,
}

/// Which counter of its backend a connection holds while it is open.
struct Held(Arc<Backend>, fn(&Backend) -> &AtomicUsize);

impl Drop for Held {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::SeqCst);
    }
}

impl Balancer {
    async fn start() -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let balancer = Balancer {
            url: format!("http://{}", listener.local_addr().unwrap()),
            backends: Arc::default(),
            stats: Arc::default(),
        };
        let (backends, stats) = (balancer.backends.clone(), balancer.stats.clone());
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(client, backends.clone(), next.clone(), stats.clone()));
            }
        });
        balancer
    }

    fn add(&self, generation: u64, url: &str, pid: u32) -> Arc<Backend> {
        let addr = url
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("a replica's address {url}: {e}"));
        let backend = Arc::new(Backend {
            generation,
            addr,
            pid,
            writes: AtomicUsize::new(0),
            chats: AtomicUsize::new(0),
        });
        self.backends.lock().unwrap().push(backend.clone());
        backend
    }

    /// Takes the replica of `generation` out of the rotation after `delay` (the balancer's health check).
    fn remove_after(&self, generation: u64, delay: Duration) {
        let backends = self.backends.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            backends
                .lock()
                .unwrap()
                .retain(|b| b.generation != generation);
        });
    }
}

/// One client connection: reads the request line (to count what each replica is serving), then relays the
/// connection to the next replica both ways until either side closes.
async fn relay(
    mut client: TcpStream,
    backends: Arc<Mutex<Vec<Arc<Backend>>>>,
    next: Arc<AtomicUsize>,
    stats: Arc<BalancerStats>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let backend = {
        let list = backends.lock().unwrap();
        if list.is_empty() {
            return;
        }
        list[next.fetch_add(1, Ordering::Relaxed) % list.len()].clone()
    };
    let Ok(mut server) = TcpStream::connect(backend.addr).await else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let counter: Option<fn(&Backend) -> &AtomicUsize> = if head.starts_with(b"POST /api/agent/") {
        Some(|b| &b.writes)
    } else if head.starts_with(b"POST /v1/chat/completions") {
        Some(|b| &b.chats)
    } else {
        None
    };
    let _held = counter.map(|c| {
        c(&backend).fetch_add(1, Ordering::SeqCst);
        Held(backend.clone(), c)
    });
    if server.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

// ---------------------------------------------------------------------------------------------------------------
// The replicas and the killer.

struct Replica {
    process: Process,
    backend: Arc<Backend>,
}

struct Fleet<'a> {
    shared: &'a Arc<Shared>,
    balancer: &'a Balancer,
    launch: &'a Launch,
    store: &'a Store,
    log: &'a Arc<Mutex<ServerLog>>,
    live: Vec<Replica>,
    /// The last generation given to a process.
    generation: u64,
}

impl Fleet<'_> {
    /// Starts a replica, waits for it to listen and puts it in the balancer.
    async fn start_replica(&mut self) -> Duration {
        self.generation += 1;
        let started = Instant::now();
        let mut process = Process::spawn(self.launch, self.generation, self.log);
        let url = process.wait_listening(self.log).await;
        let took = started.elapsed();
        let backend = self.balancer.add(self.generation, &url, process.pid());
        self.live.push(Replica { process, backend });
        self.moved();
        took
    }

    /// Tells the agents the fleet changed (an agent whose request failed retries at once).
    fn moved(&self) {
        let url = self.balancer.url.clone();
        self.shared
            .server
            .send_replace((self.generation, Some(url)));
    }

    /// The live replica that leads (by its log), waiting up to 3 s for one (leadership moves within a second of
    /// a leader's death).
    async fn leader(&self) -> Option<usize> {
        let start = Instant::now();
        loop {
            if let Some(i) = self.live.iter().position(|r| r.process.leads()) {
                return Some(i);
            }
            if start.elapsed() > Duration::from_secs(3) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The live replica with the most open connections counted by `counter`, if any has one.
    fn busiest(&self, counter: fn(&Backend) -> &AtomicUsize) -> Option<usize> {
        self.live
            .iter()
            .enumerate()
            .map(|(i, r)| (counter(&r.backend).load(Ordering::SeqCst), i))
            .filter(|(n, _)| *n > 0)
            .max()
            .map(|(_, i)| i)
    }

    /// Waits (up to 3 s) for a claim or rotation on the wire to a replica; returns that replica.
    async fn replica_with_a_write(&self) -> Option<usize> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Some(i) = self.busiest(|b| &b.writes) {
                return Some(i);
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        None
    }

    /// SIGKILLs `kills` times at moments drawn from `rng`, starting a replacement after each.
    async fn run_killer(&mut self, kills: usize, rng: &mut StdRng) -> KillReport {
        let mut report = KillReport::default();
        // Until the leader has died at least once: the last planned kill (and any after it) aims at the leader if no
        // kill has taken it yet.
        while report.kills < kills || report.leader_killed == 0 {
            let roll = if report.leader_killed == 0 && report.kills + 1 >= kills {
                0
            } else {
                rng.random_range(0..100)
            };
            let victim = match roll {
                0..20 => {
                    // The indexer leader: the next leader must index on from where it stopped.
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
                    let leader = self.leader().await;
                    if leader.is_some() {
                        report.at_leader += 1;
                    } else {
                        report.unaimed += 1;
                    }
                    leader
                }
                20..40 => {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(50..2500))).await;
                    report.anytime += 1;
                    None
                }
                40..55 => {
                    // A claim or rotation on the wire to this replica: die before, during or after its commit.
                    let found = self.replica_with_a_write().await;
                    if found.is_some() {
                        tokio::time::sleep(Duration::from_micros(rng.random_range(0..6000))).await;
                        report.during_write += 1;
                    } else {
                        report.unaimed += 1;
                    }
                    found
                }
                55..75 => {
                    // Right after a claim or rotation commits on this replica, before its answer leaves.
                    match self.replica_with_a_write().await {
                        Some(i) => {
                            let backend = self.live[i].backend.clone();
                            let store = self.store.clone();
                            let handle = tokio::runtime::Handle::current();
                            let killed = tokio::task::spawn_blocking(move || {
                                let writes = || {
                                    handle
                                        .block_on(store.read(|c| {
                                            c.query_value::<i64>(WRITES_COMMITTED, params![])
                                        }))
                                        .unwrap_or(-1)
                                };
                                kill_after_commit(&writes, &backend.writes, backend.pid)
                            })
                            .await
                            .unwrap();
                            if killed {
                                report.after_commit += 1;
                            } else {
                                report.unaimed += 1;
                            }
                            Some(i)
                        }
                        None => {
                            report.unaimed += 1;
                            None
                        }
                    }
                }
                _ => {
                    // Mid-stream: the replica serving the most chats while a stream's body is coming.
                    let found = if aim(&self.shared.streams_in_flight).await {
                        self.busiest(|b| &b.chats)
                    } else {
                        None
                    };
                    if found.is_some() {
                        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
                        report.during_stream += 1;
                    } else {
                        report.unaimed += 1;
                    }
                    found
                }
            };
            let first = victim.unwrap_or_else(|| rng.random_range(0..self.live.len()));
            let mut victims = vec![self.live.remove(first)];
            if report.kills + 1 < kills && !self.live.is_empty() && rng.random_bool(0.1) {
                // A second replica at the same moment (a host with two of them dies).
                victims.push(self.live.remove(rng.random_range(0..self.live.len())));
                report.two_at_once += 1;
            }
            for replica in victims.iter() {
                if replica.process.leads() {
                    report.leader_killed += 1;
                }
            }
            let dead = victims.len();
            for replica in victims {
                let generation = replica.backend.generation;
                replica.process.sigkill();
                report.kills += 1;
                // The health check notices within 300 ms: until then some connections meet a dead port.
                self.balancer
                    .remove_after(generation, Duration::from_millis(rng.random_range(0..300)));
            }
            self.moved();
            if report.kills < kills && rng.random_bool(0.15) {
                // A replacement dies while starting: before or after it has taken its lease.
                self.generation += 1;
                let early = Process::spawn(self.launch, self.generation, self.log);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
                early.sigkill();
                report.kills += 1;
                report.during_startup += 1;
            }
            for _ in 0..dead {
                let took = self.start_replica().await;
                report.restart_ms.push(took.as_millis());
            }
        }
        report
    }
}

/// The PostgreSQL server to create the test database on, or `None` (the test says why and passes) when
/// `X402_TEST_POSTGRES_URL` is unset, unless `X402_POSTGRES_REQUIRED=1` makes that a failure.
fn postgres_server() -> Option<String> {
    match std::env::var("X402_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("X402_POSTGRES_REQUIRED").as_deref() != Ok("1"),
                "X402_POSTGRES_REQUIRED=1 but X402_TEST_POSTGRES_URL is not set"
            );
            eprintln!(
                "SKIPPED: X402_TEST_POSTGRES_URL is not set (source scripts/postgres-test-cluster; \
                 start_test_postgres)"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_postgresql_survive_sigkills() {
    if postgres_server().is_none() {
        return;
    }
    let kills: usize = env_or("REPLICA_KILLS", SHORT_KILLS);
    let seed: u64 = env_or("REPLICA_SEED", rand::rng().random());
    println!(
        "replicas: seed {seed} (replay the plan with REPLICA_SEED={seed}), {REPLICAS} replicas, {kills} kills"
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);

    let chain = Arc::new(TestChain::start().await);
    let payers = Payers::new(&chain).await;
    let upstream_log = UpstreamLog::default();
    // 2 ms a token: streams last long enough (up to ~130 ms) for kills to land inside them.
    let upstream_url = start_upstream(upstream_log.clone(), Duration::from_millis(2)).await;
    let database_url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch {
        config: dir.path().join("config.toml"),
        env: vec![(TEST_DATABASE_URL_VAR.to_string(), database_url.clone())],
    };
    let config = config_text(&chain, &upstream_url).replace(
        "path = \"gateway.db\"",
        &format!("url = \"${TEST_DATABASE_URL_VAR}\""),
    );
    assert!(config.contains(TEST_DATABASE_URL_VAR));
    std::fs::write(&launch.config, config).unwrap();
    let store = Store::open_database(&Database::Postgres {
        url: PostgresUrl::new(database_url),
    })
    .await
    .unwrap();
    let log = Arc::new(Mutex::new(ServerLog::default()));

    let balancer = Balancer::start().await;
    // One connection per request (no idle connections kept): round robin spreads every agent's requests over
    // every replica, and a retry after a lost answer goes to another one.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let shared = Shared::new(balancer.url.clone(), http, chain.clone(), payers);
    let mut fleet = Fleet {
        shared: &shared,
        balancer: &balancer,
        launch: &launch,
        store: &store,
        log: &log,
        live: Vec::new(),
        generation: 0,
    };
    for _ in 0..REPLICAS {
        fleet.start_replica().await;
    }
    let (mining, miner) = start_miner(&chain);
    let agents = spawn_agents(&shared, seed);

    let report = fleet.run_killer(kills, &mut rng).await;
    // A dead replica's reservations are refunded by a live one once its lease has expired (and a sweep ran).
    let settle_deadline = Duration::from_secs(LEASE_TTL_SECS as u64 * 4);
    let (records, settled_in) = finish_agents(&shared, agents, &store, settle_deadline, &log).await;
    mining.cancel();
    miner.await.unwrap();
    wait_index_at_head(&shared, DEADLINE).await;
    let leases: i64 = crate::crash::read_db(&store, |c| {
        c.query_value("SELECT count(*) FROM replica_leases", params![])
            .unwrap()
    })
    .await;
    // What each live replica's readiness probe answers (a balancer's health check would use it): printed, not
    // asserted.
    let mut readiness = Vec::new();
    for replica in &fleet.live {
        let role = if replica.process.leads() {
            "leader"
        } else {
            "follower"
        };
        let answer = match shared
            .http
            .get(format!("http://{}/readyz", replica.backend.addr))
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                format!("{status} {}", body["reasons"])
            }
            Err(e) => format!("no answer: {e}"),
        };
        readiness.push(format!("{role} → {answer}"));
    }
    for replica in fleet.live.drain(..) {
        replica.process.sigkill();
    }

    let checked = check_end_state(&store, &chain, records, &upstream_log).await;
    check_logs(&log, &checked);
    launch.audit_verify();
    check_enough_happened(&shared, &report, kills);
    assert!(report.leader_killed >= 1, "no kill took the indexer leader");
    print_summary("replicas", seed, started, &report, &shared, &checked, &log);
    let leaders = log.lock().unwrap().leaders.clone();
    println!(
        "replicas summary: {} kills aimed at the leader, {} kills took the leader ({} leadership terms began: \
         generations {leaders:?}), {} times two replicas at once; balancer: {} connections, {} met a dead replica; \
         {} replica leases written; the last reservations settled {:.1} s after the agents stopped; /readyz of the \
         live replicas at the end: {}",
        report.at_leader,
        report.leader_killed,
        leaders.len(),
        report.two_at_once,
        balancer.stats.connections.load(Ordering::Relaxed),
        balancer.stats.refused.load(Ordering::Relaxed),
        leases,
        settled_in.as_secs_f64(),
        readiness.join("; "),
    );
}
