//! The Solana payment indexer: follows SPL `transfer`/`transferChecked` instructions of the configured mint into
//! payTo's associated token account (Token program or Token-2022, whichever owns the mint) into the store.
//!
//! Each poll asks `getSignaturesForAddress` of the token account for every signature after the checkpoint (the
//! newest signature already read; paged with `before` when there are more than a page), oldest first; reads each
//! successful transaction `jsonParsed` and keeps the token instructions into the account (outer and inner); a
//! transfer found at the configured commitment is `confirmed` at once, one found below it (`confirmed` while
//! `finalized` is required) is `seen` and promoted by `getSignatureStatuses` on a later poll, and orphaned when the
//! cluster no longer knows it once its slot is rooted (its fork was abandoned). The new rows, the status changes and
//! the checkpoint are written in one transaction ([`Store::apply_svm_batch`]): a restart resumes after exactly
//! what is stored.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::address::{Pubkey, TOKEN_2022_PROGRAM, TOKEN_PROGRAM, associated_token_address};
use super::rpc::SvmRpc;
use crate::chain::status::StatusHandle;
use crate::chain::{IndexerError, RpcError};
use crate::config::{Commitment, SvmSettings};
use crate::store::Store;
use crate::store::svm::SvmBatch;
use crate::store::transfers::NewTransfer;
use crate::usdc::Usdc;

/// Most signatures read per poll (then the checkpoint is written and the next poll goes on at once).
const MAX_PER_POLL: usize = 1_000;

/// After a restart at `confirmed` commitment, the confirmed transfers of the last this many slots below the
/// checkpoint are watched again until rooted (rooting takes about 32 slots; 300 is two minutes).
const UNROOTED_WINDOW_SLOTS: u64 = 300;

/// Longest wait between failed polls.
const MAX_STEP_DELAY: Duration = Duration::from_secs(30);

/// The token account payments arrive in, and the program that owns the mint.
#[derive(Debug, Clone, Copy)]
pub struct PayToAccount {
    pub token_account: Pubkey,
    pub token_program: Pubkey,
}

/// Finds the program that owns `mint` (Token or Token-2022) and payTo's associated token account under it;
/// refuses a mint that does not exist or is not a 6-decimal token (the ledger counts USD micro-units).
pub async fn pay_to_account(rpc: &SvmRpc, s: &SvmSettings) -> Result<PayToAccount, IndexerError> {
    let mint = rpc
        .account_info(&s.mint.to_string())
        .await?
        .ok_or_else(|| {
            IndexerError::Inconsistent(format!(
                "the mint {} does not exist on {} (yet)",
                s.mint, s.caip2
            ))
        })?;
    let token_program: Pubkey = mint.owner.parse().map_err(|_| {
        IndexerError::Inconsistent(format!(
            "the mint's owner `{}` is not an address",
            mint.owner
        ))
    })?;
    if token_program != TOKEN_PROGRAM && token_program != TOKEN_2022_PROGRAM {
        return Err(IndexerError::Inconsistent(format!(
            "the mint {} is owned by {token_program}, not by a token program",
            s.mint
        )));
    }
    // SPL Mint layout: mint_authority (36), supply u64 (8), decimals u8 at byte 44.
    let decimals = mint.data.get(44).copied();
    if decimals != Some(6) {
        return Err(IndexerError::Inconsistent(format!(
            "the mint {} has {decimals:?} decimals; the gateway takes 6-decimal USD stablecoins (USDC)",
            s.mint
        )));
    }
    Ok(PayToAccount {
        token_account: associated_token_address(&s.pay_to, &s.mint, &token_program),
        token_program,
    })
}

/// The Solana indexer of one network; `run` drives it until shutdown.
pub struct SvmIndexer {
    settings: SvmSettings,
    rpc: Arc<SvmRpc>,
    store: Store,
    status: StatusHandle,
    account: Option<PayToAccount>,
    /// At `confirmed` commitment: confirmed transfers from this slot up are not rooted yet and are still watched.
    watched_from: Option<u64>,
}

impl SvmIndexer {
    pub fn new(
        settings: SvmSettings,
        rpc: Arc<SvmRpc>,
        store: Store,
        status: StatusHandle,
    ) -> SvmIndexer {
        SvmIndexer {
            settings,
            rpc,
            store,
            status,
            account: None,
            watched_from: None,
        }
    }

    /// Polls until `shutdown` fires or a fatal error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), IndexerError> {
        let result = self.run_inner(&shutdown, false).await;
        if let Err(e) = &result {
            tracing::error!(network = %self.settings.caip2, error = %e, "Solana indexer stopped");
            self.status.update(|s| s.fatal = Some(e.to_string()));
        }
        result
    }

    /// Polls until everything up to the current slot is read, then returns (`index --once`, tests).
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
        let mut backoff = retry_backoff();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.step().await {
                Ok(more) => {
                    backoff = retry_backoff();
                    self.status.update(|s| s.last_error = None);
                    if more {
                        continue;
                    }
                    if until_synced {
                        return Ok(());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    let mut delay = backoff.next().unwrap_or(MAX_STEP_DELAY);
                    if let IndexerError::Rpc(rpc) = &e
                        && let Some(wait) = rpc.retry_after()
                    {
                        delay = delay.max(wait.min(MAX_STEP_DELAY));
                    }
                    tracing::warn!(network = %self.settings.caip2, error = %e, "Solana indexer poll failed; retrying in {delay:?}");
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

    /// One poll; `Ok(true)` when more signatures wait (a full page was read).
    pub async fn step(&mut self) -> Result<bool, IndexerError> {
        let network = self.settings.caip2.clone();
        let account = match self.account {
            Some(a) => a,
            None => {
                let a = pay_to_account(&self.rpc, &self.settings).await?;
                self.store
                    .bind_chain(
                        network.clone(),
                        0,
                        self.settings.mint.to_string(),
                        self.settings.pay_to.to_string(),
                    )
                    .await?;
                tracing::info!(network = %network, token_account = %a.token_account, token_program = %a.token_program, "Solana indexer: following payTo's token account");
                self.account = Some(a);
                a
            }
        };
        let commitment = self.settings.commitment;
        // The slot first: every signature up to it is in the answers below.
        let head = self.rpc.slot("confirmed").await?;
        self.status.update(|s| s.chain_head = Some(head));
        let checkpoint = self.store.checkpoint(&network).await?;

        // Every signature after the checkpoint, newest first, in pages.
        let mut found: Vec<super::rpc::SignatureInfo> = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let page = self
                .rpc
                .signatures_for_address(
                    &account.token_account.to_string(),
                    before.as_deref(),
                    checkpoint.as_ref().map(|c| c.hash.as_str()),
                    MAX_PER_POLL,
                    "confirmed",
                )
                .await?;
            let full = page.len() >= MAX_PER_POLL;
            before = page.last().map(|s| s.signature.clone());
            found.extend(page);
            if !full || found.len() >= 10 * MAX_PER_POLL {
                break;
            }
        }
        found.reverse();
        let more = found.len() > MAX_PER_POLL;
        found.truncate(MAX_PER_POLL);

        let mut batch = SvmBatch {
            network: network.clone(),
            head_slot: head,
            ..SvmBatch::default()
        };
        for sig in &found {
            if sig.err.is_none() && sig.slot >= self.settings.start_slot {
                let Some(tx) = self
                    .rpc
                    .transaction_parsed(&sig.signature, "confirmed")
                    .await?
                else {
                    // Listed but not served yet: stop here, the next poll starts from the last one written.
                    break;
                };
                let at_commitment = match commitment {
                    Commitment::Confirmed => true,
                    Commitment::Finalized => {
                        sig.confirmation_status.as_deref() == Some("finalized")
                    }
                };
                for t in transfers_into(&tx, &network, &sig.signature, &self.settings, &account)? {
                    batch.transfers.push((t, at_commitment));
                }
            }
            batch.checkpoint = Some((sig.slot, sig.signature.clone()));
        }

        // Transfers found below the commitment: promoted once there, orphaned once their slot is rooted without
        // them.
        let seen = self.store.seen_transfers(&network).await?;
        // The rooted slot, read once per poll when either check below needs it.
        let rooted = if !seen.is_empty() || commitment == Commitment::Confirmed {
            self.rpc.slot("finalized").await?
        } else {
            0
        };
        if !seen.is_empty() {
            let mut sigs: Vec<String> = seen.iter().map(|t| t.tx_hash.clone()).collect();
            sigs.dedup();
            let statuses = self.rpc.signature_statuses(&sigs).await?;
            for (sig, status) in sigs.iter().zip(statuses) {
                let slot = seen
                    .iter()
                    .find(|t| &t.tx_hash == sig)
                    .map(|t| t.block_number)
                    .unwrap_or(0);
                match status {
                    Some(st) if st.err.is_some() => batch
                        .orphan
                        .push((sig.clone(), "the transaction failed".into())),
                    Some(st) => {
                        let reached = match commitment {
                            Commitment::Confirmed => true,
                            Commitment::Finalized => {
                                st.confirmation_status.as_deref() == Some("finalized")
                            }
                        };
                        if reached {
                            batch.confirm.push(sig.clone());
                        }
                    }
                    None if slot <= rooted => batch.orphan.push((
                        sig.clone(),
                        format!(
                            "the cluster no longer knows the transaction; slot {rooted} is rooted"
                        ),
                    )),
                    None => {}
                }
            }
        }

        // At `confirmed` commitment a payment counts before its slot is rooted: until it is, it is watched, and
        // orphaned (its claim reversed, as after an EVM reorg) if the cluster drops it.
        if commitment == Commitment::Confirmed {
            let from = self.watched_from.unwrap_or_else(|| {
                checkpoint
                    .as_ref()
                    .map_or(0, |c| c.number.saturating_sub(UNROOTED_WINDOW_SLOTS))
            });
            let unrooted = self.store.confirmed_since(&network, from).await?;
            let mut sigs: Vec<String> = unrooted.iter().map(|t| t.tx_hash.clone()).collect();
            sigs.dedup();
            if !sigs.is_empty() {
                let statuses = self.rpc.signature_statuses(&sigs).await?;
                for (sig, status) in sigs.iter().zip(statuses) {
                    let slot = unrooted
                        .iter()
                        .find(|t| &t.tx_hash == sig)
                        .map_or(0, |t| t.block_number);
                    match status {
                        Some(st) if st.err.is_some() => batch
                            .orphan
                            .push((sig.clone(), "the transaction failed".into())),
                        None if slot <= rooted => batch.orphan.push((
                            sig.clone(),
                            format!(
                                "the cluster dropped the transaction before its slot was rooted (slot {rooted} is)"
                            ),
                        )),
                        _ => {}
                    }
                }
            }
            // Everything at or below the rooted slot has been checked once after rooting: never again.
            self.watched_from = Some(rooted.min(head));
        }

        let outcome = self.store.apply_svm_batch(batch).await?;
        if outcome.inserted > 0 || !outcome.orphaned.is_empty() {
            tracing::info!(network = %network, inserted = outcome.inserted, confirmed = outcome.newly_confirmed.len(), orphaned = outcome.orphaned.len(), "Solana payments indexed");
        }
        self.status.update(|s| {
            s.indexed_head = Some(head);
            s.transfers_indexed += outcome.inserted as u64;
        });
        Ok(more)
    }
}

fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(MAX_STEP_DELAY)
        .without_max_times()
        .with_jitter()
        .build()
}

/// The token transfers into payTo's account in one `jsonParsed` transaction (outer and inner instructions), in
/// execution order. A transaction that failed moved nothing and yields none.
pub fn transfers_into(
    tx: &Value,
    network: &str,
    signature: &str,
    s: &SvmSettings,
    account: &PayToAccount,
) -> Result<Vec<NewTransfer>, RpcError> {
    let bad = |what: &str| RpcError::Node {
        endpoint: "(getTransaction)".into(),
        code: 0,
        message: format!("transaction {signature}: {what}"),
    };
    if tx.pointer("/meta/err").is_some_and(|e| !e.is_null()) {
        return Ok(Vec::new());
    }
    let slot = tx
        .get("slot")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no slot"))?;
    let block_time = tx.get("blockTime").and_then(Value::as_u64);
    let outer = tx
        .pointer("/transaction/message/instructions")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no instructions (not jsonParsed?)"))?;
    let mut positioned: Vec<(u64, &Value)> = Vec::new();
    for (i, ix) in outer.iter().enumerate() {
        positioned.push(((i as u64) << 8, ix));
    }
    if let Some(inner) = tx
        .pointer("/meta/innerInstructions")
        .and_then(Value::as_array)
    {
        for group in inner {
            let index = group
                .get("index")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("inner group without index"))?;
            if let Some(list) = group.get("instructions").and_then(Value::as_array) {
                for (j, ix) in list.iter().enumerate().take(255) {
                    positioned.push(((index << 8) + j as u64 + 1, ix));
                }
            }
        }
    }
    positioned.sort_by_key(|(p, _)| *p);
    let token_account = account.token_account.to_string();
    let mint = s.mint.to_string();
    let token_programs = [TOKEN_PROGRAM.to_string(), TOKEN_2022_PROGRAM.to_string()];
    let mut out = Vec::new();
    for (position, ix) in positioned {
        let program = ix.get("programId").and_then(Value::as_str).unwrap_or("");
        if !token_programs.iter().any(|p| p == program) {
            continue;
        }
        let kind = ix
            .pointer("/parsed/type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(info) = ix.pointer("/parsed/info") else {
            continue;
        };
        let text = |k: &str| info.get(k).and_then(Value::as_str);
        if text("destination") != Some(token_account.as_str()) {
            continue;
        }
        let amount = match kind {
            "transfer" => text("amount"),
            "transferChecked" => {
                if text("mint") != Some(mint.as_str()) {
                    continue;
                }
                info.pointer("/tokenAmount/amount").and_then(Value::as_str)
            }
            _ => continue,
        };
        let amount: u64 = amount
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| bad("a token transfer without a decimal amount"))?;
        let authority = text("authority")
            .or_else(|| text("multisigAuthority"))
            .ok_or_else(|| bad("a token transfer without an authority"))?;
        let value =
            i64::try_from(amount).map_err(|_| bad("an amount beyond the ledger's range"))?;
        out.push(NewTransfer {
            network: network.to_string(),
            tx_hash: signature.to_string(),
            log_index: position,
            block_number: slot,
            block_hash: signature.to_string(),
            block_time,
            from: authority.to_string(),
            to: s.pay_to.to_string(),
            value: Usdc(value),
            token: mint.clone(),
            token_value: amount.to_string(),
        });
    }
    Ok(out)
}
