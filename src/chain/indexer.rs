//! The payment indexer: follows USDC `Transfer` logs to payTo into the store, reorg-aware.
//!
//! Each step reads the head, checks that the checkpoint is still canonical (else walks back to the fork point and
//! orphans everything above it), then fetches the next range with `eth_getLogs` in an adaptive size. Headers of
//! the recent window are fetched and linked by parent hash, every log's block hash is checked against the header
//! of its block, a window block whose `logsBloom` may hold a payment the answer lacks is asked again by its hash,
//! and the range is written with its checkpoint in one transaction. The window headers are asked while the logs
//! are; while backfilling far below the head, the next range is fetched while the last one is written.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bloom, U256, b256};
use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::rpc::{RawLog, Rpc, RpcError, suggested_range};
use super::status::StatusHandle;
use crate::config::{ChainSettings, Token};
use crate::store::transfers::{
    BlockRef, Checkpoint, NewTransfer, RangeOutcome, RangeUpdate, Transfer,
};
use crate::store::{Store, StoreError};
use crate::usdc::Usdc;

/// `keccak256("Transfer(address,address,uint256)")`.
pub const TRANSFER_TOPIC: B256 =
    b256!("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef");

/// Longest wait between failed steps.
const MAX_STEP_DELAY: Duration = Duration::from_secs(30);

/// How often a progress line is printed while backfilling.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Why the indexer stopped or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexerError {
    #[error("RPC: {0}")]
    Rpc(#[from] RpcError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(
        "deep reorg: block {number} changed and no common ancestor was found within the {window}-block window; \
         indexing stopped. Check the RPC endpoints, then restart (a larger chain.reorg_window, or re-indexing into a new database, may be needed)"
    )]
    DeepReorg { number: u64, window: u64 },
    #[error("the RPC endpoint serves chain id {found}, but the config says {expected}")]
    WrongChain { found: u64, expected: u64 },
    #[error("the chain moved while a range was fetched ({0}); retrying")]
    Inconsistent(String),
}

impl IndexerError {
    /// Errors that stop indexing for good (until an operator acts).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            IndexerError::DeepReorg { .. }
                | IndexerError::WrongChain { .. }
                | IndexerError::Store(_)
        )
    }
}

/// What a step achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Indexed up to the head.
    CaughtUp,
    /// More blocks are waiting: step again at once.
    MoreToDo,
}

/// The indexer; `run` drives it until shutdown.
pub struct Indexer {
    settings: ChainSettings,
    /// Every token accepted on the network (its USDC first): the logs are asked for all of them.
    tokens: Vec<Token>,
    token_addresses: Vec<Address>,
    /// The network's CAIP-2 id: every row this indexer writes or reads carries it.
    network_id: String,
    rpc: Rpc,
    store: Store,
    status: StatusHandle,
    wake: Arc<Notify>,
    topics: Value,
    range: u64,
    checkpoint: Option<Checkpoint>,
    follow_mode: bool,
    last_pending: HashMap<i64, u64>,
    progress: Progress,
    /// The next range, fetched while the last one was written (backfill only; see [`Indexer::step`]).
    ahead: Option<FetchedRange>,
}

/// A range fetched and checked, not yet written.
struct FetchedRange {
    from: u64,
    to: u64,
    /// Every Transfer to payTo in `[from, to]`, with its block time.
    transfers: Vec<NewTransfer>,
    /// The headers of the range's blocks inside the reorg window, and always the header of `to`.
    headers: Vec<BlockRef>,
    /// Headers fetched only for a block time the node did not put on the logs.
    extra_headers: usize,
    fetch_time: Duration,
}

/// What fetching a range found.
enum Fetch {
    Range(FetchedRange),
    /// The range's first header does not link to the checkpoint at this block: a reorg.
    Forked(u64),
    /// The provider refused the range (too large, most likely).
    Refused {
        code: i64,
        message: String,
    },
}

struct Progress {
    last_print: Instant,
    started: Instant,
    first_block: Option<u64>,
    transfers: usize,
}

impl Indexer {
    pub fn new(
        settings: ChainSettings,
        store: Store,
        status: StatusHandle,
    ) -> Result<Indexer, IndexerError> {
        let rpc = Rpc::new(&settings.rpc_http, settings.rpc_timeout)?
            .for_network(settings.network.caip2());
        let pay_to_topic = B256::left_padding_from(settings.pay_to.as_slice());
        let topics = json!([TRANSFER_TOPIC, Value::Null, pay_to_topic]);
        let range = settings.max_block_range;
        let tokens = settings.tokens();
        Ok(Indexer {
            token_addresses: tokens.iter().map(|t| t.address).collect(),
            tokens,
            network_id: settings.network.caip2(),
            settings,
            rpc,
            store,
            status,
            wake: Arc::new(Notify::new()),
            topics,
            range,
            checkpoint: None,
            follow_mode: false,
            last_pending: HashMap::new(),
            progress: Progress {
                last_print: Instant::now(),
                started: Instant::now(),
                first_block: None,
                transfers: 0,
            },
            ahead: None,
        })
    }

    /// A handle that makes the indexer poll at once (used by the WebSocket wake-up).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Checks the node's chain id and binds the database to this chain, token and payTo.
    pub async fn prepare(&mut self) -> Result<(), IndexerError> {
        let found = self.rpc.chain_id().await?;
        let expected = self.settings.network.chain_id;
        if found != expected {
            return Err(IndexerError::WrongChain { found, expected });
        }
        self.store
            .bind_chain(
                self.network_id.clone(),
                expected,
                format!("{:#x}", self.settings.network.token),
                format!("{:#x}", self.settings.pay_to),
            )
            .await?;
        self.checkpoint = self.store.checkpoint(&self.network_id).await?;
        self.status
            .update(|s| s.indexed_head = self.checkpoint.as_ref().map(|c| c.number));
        Ok(())
    }

    /// Indexes until `shutdown` fires or a fatal error (then `/healthz` turns unhealthy and the error is returned).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), IndexerError> {
        let result = self.run_inner(&shutdown, false).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "indexer stopped");
            self.status.update(|s| s.fatal = Some(e.to_string()));
        }
        result
    }

    /// Indexes up to the current head, then returns (for `index --once`, benchmarks and tests).
    pub async fn run_until_synced(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<(), IndexerError> {
        self.run_inner(&shutdown, true).await
    }

    async fn run_inner(
        &mut self,
        shutdown: &CancellationToken,
        until_synced: bool,
    ) -> Result<(), IndexerError> {
        let mut prepared = false;
        let mut failures = 0usize;
        let mut backoff = retry_backoff();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let outcome = if prepared {
                self.step().await
            } else {
                self.prepare().await.map(|()| {
                    prepared = true;
                    Step::MoreToDo
                })
            };
            match outcome {
                Ok(Step::MoreToDo) => {
                    failures = 0;
                    backoff = retry_backoff();
                    tokio::task::yield_now().await;
                }
                Ok(Step::CaughtUp) => {
                    failures = 0;
                    backoff = retry_backoff();
                    self.status.update(|s| s.last_error = None);
                    if until_synced {
                        return Ok(());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.settings.poll_interval) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    failures += 1;
                    let mut delay = backoff.next().unwrap_or(MAX_STEP_DELAY);
                    // A rate-limited endpoint that says when to come back is not asked again sooner.
                    if let IndexerError::Rpc(rpc) = &e
                        && let Some(wait) = rpc.retry_after()
                    {
                        delay = delay.max(wait.min(MAX_STEP_DELAY));
                    }
                    tracing::warn!(error = %e, attempt = failures, "indexer step failed; retrying in {delay:?}");
                    self.status.update(|s| {
                        s.last_error = Some(e.to_string());
                        s.rpc_errors += 1;
                    });
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One step: reorg check, then the next range (or the one fetched ahead while the last was written).
    ///
    /// While backfilling far below the head, the next range is fetched while this one is written (see
    /// [`Indexer::write_and_fetch_ahead`]): at most one range is held ahead, so memory stays bounded.
    pub async fn step(&mut self) -> Result<Step, IndexerError> {
        let step_started = Instant::now();
        let head = self.rpc.block_number().await?;
        self.status.update(|s| s.chain_head = Some(head));

        if let Some(cp) = self.checkpoint.clone() {
            if cp.number > head {
                self.ahead = None;
                // The head went backwards: a lagging node or a shorter chain. Roll back only what is proven gone.
                if let Some(stored) = self.store.recent_block(&self.network_id, head).await? {
                    let now = self.rpc.headers(&[head]).await?.remove(0);
                    if now.hash != stored.hash {
                        self.handle_reorg(head).await?;
                    }
                }
                return Ok(Step::CaughtUp);
            }
            let canonical = self.rpc.headers(&[cp.number]).await?.remove(0);
            if canonical.hash != cp.hash {
                self.ahead = None;
                self.handle_reorg(cp.number).await?;
                return Ok(Step::MoreToDo);
            }
        }

        let from = self
            .checkpoint
            .as_ref()
            .map_or(self.settings.start_block, |c| c.number + 1);
        if from > head {
            self.ahead = None;
            self.follow_mode = true;
            return Ok(Step::CaughtUp);
        }
        let window_start = head.saturating_sub(self.settings.reorg_window) + 1;

        // A range fetched ahead is used only if it starts right after the checkpoint just checked and still lies
        // wholly below the reorg window of this head; else it is dropped and the range is fetched again.
        let range = match self.ahead.take() {
            Some(r) if r.from == from && r.to < window_start => r,
            _ => {
                let to = head.min(from.saturating_add(self.range - 1));
                match self.fetch_range(from, to, head).await? {
                    Fetch::Range(r) => r,
                    Fetch::Forked(at) => {
                        self.handle_reorg(at).await?;
                        return Ok(Step::MoreToDo);
                    }
                    Fetch::Refused { code, message } => {
                        let old = self.range;
                        self.range = shrink_range(to - from + 1, &message, from);
                        tracing::info!(code, message = %message, "eth_getLogs range of {} blocks refused; now {} (was {old})", to - from + 1, self.range);
                        return Ok(Step::MoreToDo);
                    }
                }
            }
        };
        let (from, to) = (range.from, range.to);
        let grown = self
            .range
            .saturating_add(self.range / 4 + 1)
            .min(self.settings.max_block_range);
        let count = range.transfers.len();
        let fetched = range.fetch_time;
        let extra_headers = range.extra_headers;
        let write_started = Instant::now();
        let (outcome, ahead) = self
            .write_and_fetch_ahead(range, head, window_start, grown)
            .await?;
        let written = write_started.elapsed();
        tracing::debug!(
            from,
            to,
            transfers = count,
            extra_headers,
            next_fetched_ahead = ahead.is_some(),
            "range fetched in {fetched:?}, written in {written:?} (the next range fetched meanwhile when \
             next_fetched_ahead; step {:?})",
            step_started.elapsed()
        );
        self.checkpoint = self.store.checkpoint(&self.network_id).await?;
        self.ahead = ahead.filter(|_| self.checkpoint.as_ref().map(|c| c.number) == Some(to));
        self.range = grown;
        self.status.update(|s| {
            s.indexed_head = Some(to);
            s.transfers_indexed += count as u64;
        });
        self.report(from, to, head, count, &outcome);
        Ok(if to >= head {
            Step::CaughtUp
        } else {
            Step::MoreToDo
        })
    }

    /// Writes `range` with its checkpoint in one transaction and, when the next range lies wholly below the
    /// reorg window of `head`, fetches that range (of the size `next_size`) meanwhile.
    ///
    /// Why fetching ahead keeps every guarantee:
    /// - Nothing fetched ahead is written here. It is kept in memory (one range at most) and used by the next
    ///   step only after that step has read the head again and checked that the checkpoint (this range's `to`)
    ///   is still canonical, exactly as for a range fetched then; a crash loses it and the restart fetches it
    ///   again from the checkpoint, so there is no gap and no duplicate.
    /// - A range fetched ahead holds no block of the reorg window, now or when it is used (else it is dropped),
    ///   so it needs no window headers, no parent link and no `logsBloom` check: the indexer holds blocks deeper
    ///   than `chain.reorg_window` for final, whenever they are fetched. A reorg during the backfill changes
    ///   blocks near the head only; it is found, as before, by the checkpoint check or the parent link of the
    ///   first window header, once the backfill reaches the window. A reorg deeper than the window is as
    ///   undetectable for a range fetched one step earlier as for one fetched later.
    /// - The logs are still asked together with the header of the range's last block (one batch, one backend),
    ///   so a lagging backend cannot answer "no logs" for blocks it lacks, and that header's hash is the
    ///   checkpoint's.
    /// - Any failure of the fetch ahead (transport, a range refused as too large, a block that changed) only
    ///   drops it: the next step fetches the range again and handles the error as before, so the adaptive range
    ///   size reacts to the provider exactly as without fetching ahead.
    async fn write_and_fetch_ahead(
        &self,
        range: FetchedRange,
        head: u64,
        window_start: u64,
        next_size: u64,
    ) -> Result<(RangeOutcome, Option<FetchedRange>), IndexerError> {
        let update = RangeUpdate {
            network: self.network_id.clone(),
            from: range.from,
            to: range.to,
            transfers: range.transfers,
            headers: range.headers,
            confirmations: self.settings.confirmations,
            reorg_window: self.settings.reorg_window,
        };
        let next_from = range.to + 1;
        let next_to = head.min(next_from.saturating_add(next_size - 1));
        if range.to >= head || next_to >= window_start {
            return Ok((self.store.apply_range(update).await?, None));
        }
        let (written, ahead) = tokio::join!(
            self.store.apply_range(update),
            self.fetch_range(next_from, next_to, head)
        );
        let ahead = match ahead {
            Ok(Fetch::Range(r)) => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "fetching blocks {next_from}-{next_to} ahead failed; fetched again next step");
                None
            }
        };
        Ok((written?, ahead))
    }

    /// Fetches and checks `[from, to]` without writing it: the headers of its part inside the reorg window
    /// (linked by parent hash, and to the checkpoint), concurrently with its logs and the header of `to`; the
    /// headers of deep blocks only when a log lacks its block time (an older node), in batches.
    async fn fetch_range(&self, from: u64, to: u64, head: u64) -> Result<Fetch, IndexerError> {
        let started = Instant::now();
        let window_start = head.saturating_sub(self.settings.reorg_window) + 1;

        // Headers for the part of the range inside the reorg window, asked while the logs are.
        let window_numbers: Vec<u64> = (from.max(window_start)..=to).collect();
        let window_headers = async {
            if window_numbers.is_empty() {
                Ok(Vec::new())
            } else {
                self.rpc.headers_with_blooms(&window_numbers).await
            }
        };
        let logs = self
            .rpc
            .logs_with_header(&self.token_addresses, &self.topics, from, to);
        let (window_headers, logs) = tokio::join!(window_headers, logs);
        let (mut headers, blooms): (Vec<BlockRef>, Vec<Bloom>) =
            window_headers?.into_iter().unzip();
        for pair in headers.windows(2) {
            if pair[1].parent_hash != pair[0].hash {
                return Err(IndexerError::Inconsistent(format!(
                    "block {} does not link to {}",
                    pair[1].number, pair[0].number
                )));
            }
        }
        if let (Some(first), Some(cp)) = (headers.first(), self.checkpoint.as_ref())
            && first.number == cp.number + 1
            && first.parent_hash != cp.hash
        {
            return Ok(Fetch::Forked(cp.number));
        }

        let (logs, to_header) = match logs {
            Ok(v) => v,
            Err(RpcError::Node { message, code, .. }) if to > from => {
                return Ok(Fetch::Refused { code, message });
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(h) = headers.iter().find(|h| h.number == to)
            && h.hash != to_header.hash
        {
            return Err(IndexerError::Inconsistent(format!(
                "block {to} changed during the fetch"
            )));
        }
        if headers.last().map(|h| h.number) != Some(to) {
            headers.push(to_header);
        }

        // Every log inside the reorg window must sit in the block we hold the header of. Below the window a block
        // is final for us; it needs a header only for its timestamp, when the node does not put it on the log.
        let mut by_number: HashMap<u64, BlockRef> =
            headers.iter().map(|h| (h.number, h.clone())).collect();
        let missing: Vec<u64> = logs
            .iter()
            .filter(|l| l.block_timestamp.is_none())
            .filter_map(|l| l.block_number.map(|n| n.to::<u64>()))
            .filter(|n| !by_number.contains_key(n))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            for h in self.rpc.headers(&missing).await? {
                by_number.insert(h.number, h);
            }
        }
        let mut transfers = Vec::with_capacity(logs.len());
        for log in &logs {
            if let Some(t) = self.decode(log, from, to, window_start, &by_number)? {
                transfers.push(t);
            }
        }
        self.check_nothing_left_out(&logs, &headers, &blooms)
            .await?;
        Ok(Fetch::Range(FetchedRange {
            from,
            to,
            transfers,
            headers,
            extra_headers: missing.len(),
            fetch_time: started.elapsed(),
        }))
    }

    fn decode(
        &self,
        log: &RawLog,
        from: u64,
        to: u64,
        window_start: u64,
        headers: &HashMap<u64, BlockRef>,
    ) -> Result<Option<NewTransfer>, IndexerError> {
        let Some(t) = transfer_from_log(log, &self.network_id, &self.tokens, self.settings.pay_to)
            .map_err(|e| IndexerError::Inconsistent(e.to_string()))?
        else {
            return Ok(None);
        };
        if t.block_number < from || t.block_number > to {
            return Err(IndexerError::Inconsistent(format!(
                "log in block {} outside the range {from}-{to}",
                t.block_number
            )));
        }
        let block_time = match headers.get(&t.block_number) {
            Some(header) if header.hash == t.block_hash => header.timestamp,
            Some(_) => {
                return Err(IndexerError::Inconsistent(format!(
                    "log block hash differs from the header of block {}",
                    t.block_number
                )));
            }
            // Below the reorg window, with the timestamp on the log: no header was fetched.
            None => match log.block_timestamp {
                Some(ts) if t.block_number < window_start => ts.to::<u64>(),
                _ => {
                    return Err(IndexerError::Inconsistent(format!(
                        "no header for block {} of a log",
                        t.block_number
                    )));
                }
            },
        };
        Ok(Some(NewTransfer {
            block_time: Some(block_time),
            ..t
        }))
    }

    /// A load balancer may send the calls of one batch to different backends: the logs to one that lags (no logs
    /// for the blocks it does not have yet) and the header to one that does not, so the header cannot vouch for the
    /// logs. Each window block whose `logsBloom` may hold a Transfer to payTo, but that has no log in the answer, is
    /// asked again by its hash (EIP-234), which a node without that block answers with an error, never with `[]`.
    /// A bloom does not say in which topic payTo appeared, so blocks where payTo sent or approved tokens cost that
    /// one extra call.
    async fn check_nothing_left_out(
        &self,
        logs: &[RawLog],
        window_headers: &[BlockRef],
        blooms: &[Bloom],
    ) -> Result<(), IndexerError> {
        let pay_to_topic = B256::left_padding_from(self.settings.pay_to.as_slice());
        let with_logs: HashSet<u64> = logs
            .iter()
            .filter_map(|l| l.block_number.map(|n| n.to::<u64>()))
            .collect();
        for (header, bloom) in window_headers.iter().zip(blooms) {
            if with_logs.contains(&header.number)
                || !self
                    .token_addresses
                    .iter()
                    .any(|token| bloom.contains_raw_log(*token, &[TRANSFER_TOPIC, pay_to_topic]))
            {
                continue;
            }
            let hash: B256 = header.hash.parse().map_err(|_| {
                IndexerError::Inconsistent(format!("bad hash of block {}", header.number))
            })?;
            let again = self
                .rpc
                .logs_in_block(&self.token_addresses, &self.topics, hash)
                .await?;
            let payments = again
                .iter()
                .filter(|l| {
                    matches!(
                        transfer_from_log(l, &self.network_id, &self.tokens, self.settings.pay_to),
                        Ok(Some(_))
                    )
                })
                .count();
            if payments > 0 {
                return Err(IndexerError::Inconsistent(format!(
                    "the logs answer left out {payments} payment(s) of block {} (a lagging backend?)",
                    header.number
                )));
            }
        }
        Ok(())
    }

    /// Walks back from `suspect` to the highest block whose stored hash is still canonical and rolls back to it.
    async fn handle_reorg(&mut self, suspect: u64) -> Result<(), IndexerError> {
        self.ahead = None;
        let old_head = self.checkpoint.as_ref().map_or(suspect, |c| c.number);
        let lowest = suspect.saturating_sub(self.settings.reorg_window);
        let mut n = suspect;
        loop {
            let Some(stored) = self.store.recent_block(&self.network_id, n).await? else {
                return Err(IndexerError::DeepReorg {
                    number: suspect,
                    window: self.settings.reorg_window,
                });
            };
            let canonical = self.rpc.headers(&[n]).await?.remove(0);
            if canonical.hash == stored.hash {
                let orphaned = self
                    .store
                    .rollback_to(&self.network_id, stored, old_head)
                    .await?;
                tracing::warn!(
                    fork_block = n,
                    depth = old_head - n,
                    orphaned = orphaned.len(),
                    "reorg detected: rolled back to block {n}"
                );
                for t in &orphaned {
                    tracing::warn!(tx = %t.tx_hash, from = %t.from, amount = %t.value, block = t.block_number, "payment orphaned by reorg");
                }
                self.checkpoint = self.store.checkpoint(&self.network_id).await?;
                self.status.update(|s| {
                    s.reorgs += 1;
                    s.indexed_head = self.checkpoint.as_ref().map(|c| c.number);
                });
                return Ok(());
            }
            if n == 0 || n <= lowest {
                return Err(IndexerError::DeepReorg {
                    number: suspect,
                    window: self.settings.reorg_window,
                });
            }
            n -= 1;
        }
    }

    fn report(
        &mut self,
        from: u64,
        to: u64,
        head: u64,
        count: usize,
        outcome: &crate::store::transfers::RangeOutcome,
    ) {
        let needed = self.settings.confirmations;
        // Per-payment lines only while following: a backfill reports progress instead.
        let following = self.follow_mode;
        let backfilling = !following || head.saturating_sub(to) > self.settings.reorg_window;
        self.progress.transfers += count;
        let first = *self.progress.first_block.get_or_insert(from);
        if backfilling || !self.follow_mode {
            if self.progress.last_print.elapsed() >= PROGRESS_EVERY || to >= head {
                let done = to.saturating_sub(first) + 1;
                let total = head.saturating_sub(first) + 1;
                let rate = done as f64 / self.progress.started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    "backfill: block {to} of {head} ({:.1}%), {} transfers, {:.0} blocks/s, range {} blocks",
                    100.0 * done as f64 / total as f64,
                    self.progress.transfers,
                    rate,
                    self.range
                );
                self.progress.last_print = Instant::now();
            }
            if to >= head {
                self.follow_mode = true;
                tracing::info!(head, "caught up; following the chain");
            }
        }
        for t in &outcome.orphaned {
            tracing::warn!(tx = %t.tx_hash, amount = %t.value, "announced payment is not in the canonical chain: orphaned");
        }
        for t in &outcome.reappeared {
            tracing::info!(tx = %t.tx_hash, amount = %t.value, block = t.block_number, "payment is canonical again");
        }
        if !backfilling {
            for t in &outcome.pending {
                let conf = t.confirmations(Some(to));
                if self.last_pending.get(&t.id) != Some(&conf) {
                    tracing::info!(tx = %t.tx_hash, from = %t.from, amount = %t.value, "payment seen: {conf}/{needed} confirmations");
                    self.last_pending.insert(t.id, conf);
                }
            }
            for t in &outcome.newly_confirmed {
                self.last_pending.remove(&t.id);
                log_confirmed(t, needed);
            }
        } else if !outcome.newly_confirmed.is_empty() {
            tracing::debug!(
                count = outcome.newly_confirmed.len(),
                "transfers confirmed during backfill"
            );
        }
    }
}

/// The payment in `log`, if it is a USDC `Transfer` to `pay_to`. Errors on a log that lacks its block,
/// transaction or index (a pending log, which is never indexed).
pub fn transfer_from_log(
    log: &RawLog,
    network: &str,
    tokens: &[Token],
    pay_to: Address,
) -> Result<Option<NewTransfer>, &'static str> {
    let Some(token) = tokens.iter().find(|t| t.address == log.address) else {
        return Ok(None);
    };
    if log.removed || log.topics.first() != Some(&TRANSFER_TOPIC) {
        return Ok(None);
    }
    let (Some(number), Some(block_hash), Some(tx_hash), Some(log_index)) = (
        log.block_number,
        log.block_hash,
        log.transaction_hash,
        log.log_index,
    ) else {
        return Err("a log without block, transaction or index");
    };
    let [_, from_topic, to_topic] = log.topics.as_slice() else {
        return Ok(None); // Not the ERC-20 shape (ERC-721 has a fourth topic).
    };
    let to_address = Address::from_word(*to_topic);
    if to_address != pay_to || log.data.len() != 32 {
        return Ok(None);
    }
    let value = U256::from_be_slice(&log.data);
    let Some(atomic) = token.to_usd(value) else {
        tracing::error!(tx = %tx_hash, %value, token = %token.symbol, "transfer value does not fit in 64 bits; not recorded");
        return Ok(None);
    };
    Ok(Some(NewTransfer {
        network: network.to_string(),
        tx_hash: format!("{tx_hash:#x}"),
        log_index: log_index.to::<u64>(),
        block_number: number.to::<u64>(),
        block_hash: format!("{block_hash:#x}"),
        block_time: None,
        from: format!("{:#x}", Address::from_word(*from_topic)),
        to: format!("{to_address:#x}"),
        value: Usdc(atomic),
        token: format!("{:#x}", token.address),
        token_value: value.to_string(),
    }))
}

fn log_confirmed(t: &Transfer, needed: u64) {
    tracing::info!(tx = %t.tx_hash, from = %t.from, amount = %t.value, block = t.block_number, "payment confirmed ({needed}/{needed})");
}

fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(MAX_STEP_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The next range size after a provider refused `attempted` blocks starting at `from`: its hint when it names a
/// smaller range, else half. Never the same size again (base/base#2421 names the very range that failed).
pub fn shrink_range(attempted: u64, message: &str, from: u64) -> u64 {
    let hinted = suggested_range(message).and_then(|(a, b)| {
        let size = b.saturating_sub(a.max(from)) + 1;
        (a <= from.max(a) && size < attempted && b >= from).then_some(size)
    });
    hinted
        .unwrap_or(attempted / 2)
        .clamp(1, attempted.saturating_sub(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinks_by_hint_or_half_and_never_retries_the_same_range() {
        assert_eq!(shrink_range(2000, "block range too large", 100), 1000);
        assert_eq!(
            shrink_range(2000, "Try with this block range [0x64, 0x1f3]", 100),
            400
        );
        // A hint naming the very range that failed is ignored.
        assert_eq!(
            shrink_range(2000, "retry with the range 100-2099", 100),
            1000
        );
        assert_eq!(shrink_range(2, "too big", 5), 1);
    }

    #[test]
    fn transfer_topic_is_keccak_of_the_signature() {
        assert_eq!(
            TRANSFER_TOPIC,
            alloy::primitives::keccak256("Transfer(address,address,uint256)")
        );
    }
}
