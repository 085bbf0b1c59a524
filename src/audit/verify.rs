//! `audit verify`: reconciles the database against the chain and against itself.
//!
//! Checks, in order:
//! 1. **transfers** — every `confirmed` transfer is re-read from the chain (`eth_getTransactionReceipt`): the
//!    transaction succeeded, in the stored block (number and hash); the log at the stored index is a USDC `Transfer`
//!    with the stored from, to and value; the stored block is canonical (`eth_getBlockByNumber`) and deep enough.
//! 2. **claims** — every claim is backed by confirmed transfers from its account worth exactly what it paid, and
//!    its price and surplus add up; no transaction is claimed twice (case-insensitive), sold twice as a
//!    subscription, or credited twice in the ledger. A claim is checked as part of its purchase (an x402
//!    settlement re-submitted after a reorg has one claim row per transaction): a purchase that is **reversed** (its
//!    payment left the chain, see `store::reversals`) must have no confirmed transfer (else its restore is missing),
//!    and each reversal and restore must be matched by exactly one `reversal` / `reinstatement` ledger row of its
//!    amount. The report lists every reversal.
//! 3. **ledger** — every row's running balance follows from the previous one, and each account's balance equals
//!    the sum of its ledger; each top-up claim credited its price and its surplus. A negative balance is a
//!    discrepancy unless the account has a purchase that is reversed now.
//! 4. **seats** — every seat belongs to an existing subscription of the same pool, one of its blocks, with the same
//!    expiry; every subscription holds exactly one seat per block it bought.
//! 5. **usage** — every settled credit request was charged its reported tokens at the prices it was reserved at
//!    (the model's configured prices for rows older than the metering migration), never more than its
//!    reservation; the reservation exactly when the documented policy says so (an overrun, or a client that hung
//!    up before the usage chunk); nothing for an interrupted request or a pool key. Overruns (an upstream that went
//!    past the bound) and what they left uncharged are listed, not hidden.
//!
//! Each discrepancy names the check, the row and what differs. The run prints a progress line every 2 s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use futures::StreamExt;
use serde::Serialize;

use crate::chain::Rpc;
use crate::chain::indexer::transfer_from_log;
use crate::config::Settings;
use crate::store::Store;
use crate::store::audit::{Books, SettledUsage};
use crate::store::reversals::ReversalEvent;
use crate::store::transfers::{Transfer, TransferStatus};
use crate::usdc::Usdc;

/// One thing that does not reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discrepancy {
    /// `transfers`, `claims`, `ledger` or `seats`.
    pub check: &'static str,
    /// The row: `transfer 0x…:3`, `claim 0x…`, `account 0x…`, `seat 12/asia` …
    pub subject: String,
    pub detail: String,
}

impl std::fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}: {}", self.check, self.subject, self.detail)
    }
}

/// What was checked and what was found.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub transfers_checked: u64,
    pub claims_checked: u64,
    pub accounts_checked: u64,
    pub ledger_rows_checked: u64,
    pub seats_checked: u64,
    pub subscriptions_checked: u64,
    pub usage_rows_checked: u64,
    /// The first network's head when it was read.
    pub chain_head: u64,
    /// Every network's head when it was read, by CAIP-2 id.
    pub chain_heads: BTreeMap<String, u64>,
    /// Claimed payments reversed because a reorg removed them, and restored when mined again (oldest first).
    pub reversals: Vec<ReversalEvent>,
    pub discrepancies: Vec<Discrepancy>,
    /// Requests whose upstream generated past the gateway's bound (charged the reservation, the rest recorded).
    pub overruns: Vec<Overrun>,
    pub upto_payments_checked: u64,
    /// Keyless pay-per-token (x402 `upto`) payments served and not settled: the operator's loss until they settle.
    pub upto_unsettled: Vec<UnsettledUpto>,
}

/// An upto payment served whose settlement failed (the payer moved funds or revoked the allowance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnsettledUpto {
    pub payer: String,
    pub nonce: String,
    pub request_id: String,
    pub owed: Usdc,
    pub last_error: Option<String>,
}

/// One request an upstream overran: what it reported beyond the bound, and what that left uncharged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overrun {
    pub request_id: String,
    pub model: String,
    pub status: String,
    pub overrun_tokens: u64,
    pub charged: Usdc,
    pub uncharged: Usdc,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.discrepancies.is_empty()
    }
}

fn d(check: &'static str, subject: impl Into<String>, detail: impl Into<String>) -> Discrepancy {
    Discrepancy {
        check,
        subject: subject.into(),
        detail: detail.into(),
    }
}

/// Step 1 for one network: its confirmed transfers re-read from its RPC (receipt, log, canonical block). Returns
/// the network's head.
async fn reread_network(
    chain: &crate::config::ChainSettings,
    confirmed: Vec<Transfer>,
    report: &mut Report,
    progress: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<u64> {
    let rpc = Rpc::new(&chain.rpc_http, chain.rpc_timeout)?;
    let chain_id = rpc.chain_id().await?;
    anyhow::ensure!(
        chain_id == chain.network.chain_id,
        "the RPC serves chain {chain_id}, the config says {}",
        chain.network.chain_id
    );
    let head = rpc.block_number().await?;
    let network = chain.network.caip2();
    progress(&format!(
        "[1/6] transfers: re-reading {} confirmed transfers from {network} (head {head})",
        confirmed.len()
    ));
    let mut by_tx: BTreeMap<String, Vec<Transfer>> = BTreeMap::new();
    for t in confirmed {
        by_tx.entry(t.tx_hash.clone()).or_default().push(t);
    }
    let total = by_tx.values().map(Vec::len).sum::<usize>();
    let started = Instant::now();
    let mut last_line = Instant::now();
    let tokens = chain.tokens();
    let pay_to = chain.pay_to;
    let mut blocks_needed: BTreeMap<u64, Vec<Transfer>> = BTreeMap::new();
    let mut fetches = futures::stream::iter(by_tx.into_iter().map(|(hash, rows)| {
        let rpc = &rpc;
        async move {
            let parsed: Result<B256, _> = hash.parse();
            let receipt = match parsed {
                Ok(h) => rpc.receipt(h).await.map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::anyhow!(
                    "stored tx hash `{hash}` is not a hash: {e}"
                )),
            };
            (hash, rows, receipt)
        }
    }))
    .buffer_unordered(CONCURRENCY);
    while let Some((hash, rows, receipt)) = fetches.next().await {
        report.transfers_checked += rows.len() as u64;
        let receipt = match receipt {
            Ok(Some(r)) => r,
            Ok(None) => {
                for t in &rows {
                    report.discrepancies.push(d(
                        "transfers",
                        format!("transfer {}:{}", t.tx_hash, t.log_index),
                        format!(
                            "confirmed in the database (block {}), but the chain has no such transaction",
                            t.block_number
                        ),
                    ));
                }
                continue;
            }
            Err(e) if e.to_string().contains("is not a hash") => {
                report.discrepancies.push(d(
                    "transfers",
                    format!("transaction {hash}"),
                    e.to_string(),
                ));
                continue;
            }
            Err(e) => return Err(e.context(format!("reading the receipt of {hash}"))),
        };
        let onchain_block = receipt.block_number.map(|n| n.to::<u64>());
        let onchain_hash = receipt.block_hash.map(|h| format!("{h:#x}"));
        for t in rows {
            let subject = format!("transfer {}:{}", t.tx_hash, t.log_index);
            if !receipt.succeeded() {
                report.discrepancies.push(d(
                    "transfers",
                    &subject,
                    "the transaction reverted on chain",
                ));
                continue;
            }
            if onchain_block != Some(t.block_number)
                || onchain_hash.as_deref() != Some(t.block_hash.as_str())
            {
                report.discrepancies.push(d(
                    "transfers",
                    &subject,
                    format!(
                        "stored in block {} {}, but the chain mined it in block {} {}",
                        t.block_number,
                        t.block_hash,
                        onchain_block.map(|n| n.to_string()).unwrap_or("?".into()),
                        onchain_hash.clone().unwrap_or("?".into())
                    ),
                ));
                continue;
            }
            let log = receipt
                .logs
                .iter()
                .find(|l| l.log_index.map(|i| i.to::<u64>()) == Some(t.log_index));
            let found = log.and_then(|l| {
                transfer_from_log(l, &network, &tokens, pay_to)
                    .ok()
                    .flatten()
            });
            match found {
                None => report.discrepancies.push(d(
                    "transfers",
                    &subject,
                    format!(
                        "log {} of the transaction is not a transfer of an accepted token to payTo",
                        t.log_index
                    ),
                )),
                Some(onchain) => {
                    let mut diffs = Vec::new();
                    if !t.token.is_empty() && onchain.token != t.token {
                        diffs.push(format!(
                            "token on chain {}, in the database {}",
                            onchain.token, t.token
                        ));
                    }
                    let is_usdc = onchain.token == format!("{:#x}", chain.network.token);
                    if let Some(stored) = &t.token_value
                        && *stored != onchain.token_value
                    {
                        diffs.push(format!(
                            "amount on chain {} (token units), in the database {stored}",
                            onchain.token_value
                        ));
                    }
                    // USDC is credited 1:1, so its value is re-derived exactly; another token's value is its amount
                    // at the price configured when it was indexed, which the amount check above covers.
                    if is_usdc && onchain.value != t.value {
                        diffs.push(format!(
                            "value on chain {} USDC, in the database {} USDC",
                            onchain.value, t.value
                        ));
                    }
                    if onchain.from != t.from {
                        diffs.push(format!(
                            "from on chain {}, in the database {}",
                            onchain.from, t.from
                        ));
                    }
                    if onchain.to != t.to {
                        diffs.push(format!(
                            "to on chain {}, in the database {}",
                            onchain.to, t.to
                        ));
                    }
                    if !diffs.is_empty() {
                        report
                            .discrepancies
                            .push(d("transfers", &subject, diffs.join("; ")));
                    }
                }
            }
            let depth = (head + 1).saturating_sub(t.block_number);
            if depth < chain.confirmations {
                report.discrepancies.push(d(
                    "transfers",
                    &subject,
                    format!(
                        "confirmed in the database, but only {depth} of {} confirmations on chain",
                        chain.confirmations
                    ),
                ));
            }
            blocks_needed.entry(t.block_number).or_default().push(t);
        }
        if last_line.elapsed() >= Duration::from_secs(2) {
            last_line = Instant::now();
            progress(&format!(
                "      {}/{total} transfers re-read ({:.0?} elapsed)",
                report.transfers_checked,
                started.elapsed()
            ));
        }
    }
    drop(fetches);
    let numbers: Vec<u64> = blocks_needed.keys().copied().collect();
    for (header, number) in rpc.headers(&numbers).await?.into_iter().zip(&numbers) {
        for t in &blocks_needed[number] {
            if header.hash != t.block_hash {
                report.discrepancies.push(d(
                    "transfers",
                    format!("transfer {}:{}", t.tx_hash, t.log_index),
                    format!(
                        "block {} {} is not canonical: the chain's block {} is {}",
                        t.block_number, t.block_hash, number, header.hash
                    ),
                ));
            }
        }
    }
    progress(&format!(
        "      {} transfers re-read in {:.1?}",
        report.transfers_checked,
        started.elapsed()
    ));

    Ok(head)
}

/// Receipts fetched at once.
const CONCURRENCY: usize = 8;

/// Step 1 for a Solana network: each confirmed transfer re-read from the cluster (the transaction at the
/// network's commitment, its token instructions into payTo's account, amount, mint, authority and slot). Returns
/// the cluster's slot at that commitment.
async fn reread_svm_network(
    svm: &crate::config::SvmSettings,
    confirmed: Vec<Transfer>,
    report: &mut Report,
    progress: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<u64> {
    use crate::chain::svm::{SvmRpc, indexer};
    let rpc = SvmRpc::new(&svm.rpc_http, svm.rpc_timeout)?;
    let commitment = svm.commitment.as_str();
    let head = rpc.slot(commitment).await?;
    let account = indexer::pay_to_account(&rpc, svm).await?;
    progress(&format!(
        "[1/6] transfers: re-reading {} confirmed transfers from {} (slot {head}, {commitment})",
        confirmed.len(),
        svm.caip2
    ));
    let mut by_tx: BTreeMap<String, Vec<Transfer>> = BTreeMap::new();
    for t in confirmed {
        by_tx.entry(t.tx_hash.clone()).or_default().push(t);
    }
    for (signature, rows) in by_tx {
        report.transfers_checked += rows.len() as u64;
        let onchain = match rpc.transaction_parsed(&signature, commitment).await? {
            Some(tx) => indexer::transfers_into(&tx, &svm.caip2, &signature, svm, &account)?,
            None => {
                for t in &rows {
                    report.discrepancies.push(d(
                        "transfers",
                        format!("transfer {}:{}", t.tx_hash, t.log_index),
                        format!(
                            "confirmed in the database (slot {}), but the cluster has no such transaction at                              `{commitment}`",
                            t.block_number
                        ),
                    ));
                }
                continue;
            }
        };
        for t in rows {
            let subject = format!("transfer {}:{}", t.tx_hash, t.log_index);
            match onchain.iter().find(|o| o.log_index == t.log_index) {
                None => report.discrepancies.push(d(
                    "transfers",
                    &subject,
                    format!(
                        "instruction {} of the transaction is not a USDC transfer into payTo's token account",
                        t.log_index
                    ),
                )),
                Some(o) => {
                    let mut diffs = Vec::new();
                    if o.token_value != t.token_value.clone().unwrap_or_default() || o.value != t.value {
                        diffs.push(format!(
                            "amount on chain {}, in the database {}",
                            o.token_value,
                            t.token_value.clone().unwrap_or_default()
                        ));
                    }
                    if o.from != t.from {
                        diffs.push(format!("authority on chain {}, in the database {}", o.from, t.from));
                    }
                    if o.token != t.token {
                        diffs.push(format!("mint on chain {}, in the database {}", o.token, t.token));
                    }
                    if o.block_number != t.block_number {
                        diffs.push(format!(
                            "slot on chain {}, in the database {}",
                            o.block_number, t.block_number
                        ));
                    }
                    if !diffs.is_empty() {
                        report.discrepancies.push(d("transfers", &subject, diffs.join("; ")));
                    }
                }
            }
        }
    }
    Ok(head)
}

/// Runs every check. `progress` receives human-readable lines (a line per phase, and a progress line at most every
/// 2 s during the chain re-read). Errors are reserved for failures to check (RPC down, unreadable database); what
/// does not reconcile is in the report.
pub async fn verify(
    settings: &Settings,
    store: &Store,
    progress: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    // 1. Transfers against the chain, each network against its own.
    let confirmed = store
        .list_transfers(Some(TransferStatus::Confirmed))
        .await?;
    let mut by_network: BTreeMap<String, Vec<Transfer>> = BTreeMap::new();
    for t in confirmed {
        by_network.entry(t.network.clone()).or_default().push(t);
    }
    for (i, chain) in settings.networks().enumerate() {
        let transfers = by_network
            .remove(&chain.network.caip2())
            .unwrap_or_default();
        let head = reread_network(chain, transfers, &mut report, progress).await?;
        if i == 0 {
            report.chain_head = head;
        }
        report.chain_heads.insert(chain.network.caip2(), head);
    }
    for svm in &settings.svm_networks {
        let transfers = by_network.remove(&svm.caip2).unwrap_or_default();
        let head = reread_svm_network(svm, transfers, &mut report, progress).await?;
        report.chain_heads.insert(svm.caip2.clone(), head);
    }
    for (network, rows) in by_network {
        for t in rows {
            report.discrepancies.push(d(
                "transfers",
                format!("transfer {}:{}", t.tx_hash, t.log_index),
                format!("confirmed on {network}, a network the config no longer names: it cannot be re-read"),
            ));
        }
    }

    // 2-4. The database against itself.
    progress("[2/6] claims: backed by confirmed transfers, claimed once");
    let (found, counts) = check_books(store.audit_books().await?);
    report.reversals = store.reversal_events().await?;
    if !report.reversals.is_empty() {
        let open = open_reversals(&report.reversals);
        progress(&format!(
            "      {} reversal events; {open} purchases reversed now (their payments left the chain)",
            report.reversals.len()
        ));
    }
    report.claims_checked = counts.claims;
    report.accounts_checked = counts.accounts;
    report.ledger_rows_checked = counts.ledger_rows;
    report.seats_checked = counts.seats;
    report.subscriptions_checked = counts.subscriptions;
    progress(&format!(
        "[3/6] ledger: {} rows of {} accounts",
        counts.ledger_rows, counts.accounts
    ));
    progress(&format!(
        "[4/6] seats: {} seats of {} subscriptions",
        counts.seats, counts.subscriptions
    ));
    report.discrepancies.extend(found);

    progress("[5/6] usage: every charge against its tokens, prices and reservation");
    let prices: HashMap<String, crate::proxy::pricing::Prices> = settings
        .models
        .iter()
        .map(|m| {
            (
                m.id.clone(),
                crate::proxy::pricing::Prices {
                    input_per_mtok: m.input_per_mtok,
                    output_per_mtok: m.output_per_mtok,
                },
            )
        })
        .collect();
    let usage = UsageCheck {
        configured: prices,
        found: Vec::new(),
        overruns: Vec::new(),
        checked: 0,
    };
    let usage = store.fold_settled_usage(usage, UsageCheck::check).await?;
    report.usage_rows_checked = usage.checked;
    report.discrepancies.extend(usage.found);
    report.overruns = usage.overruns;

    progress(
        "[6/6] upto: every pay-per-token charge against its tokens, prices, maximum and settlement",
    );
    let upto = store
        .read(|c| -> Result<Vec<_>, crate::store::StoreError> {
            let rows = crate::store::upto::list(c)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let claim = match &row.tx_hash {
                    Some(tx) => crate::store::billing::claim_of(c, tx)?,
                    None => None,
                };
                out.push((row, claim));
            }
            Ok(out)
        })
        .await?;
    for (row, claim) in upto {
        report.upto_payments_checked += 1;
        let (found, unsettled) = check_upto(&row, claim.as_ref());
        report.discrepancies.extend(found);
        report.upto_unsettled.extend(unsettled);
    }
    Ok(report)
}

/// Check 6, one upto payment: its cost is its tokens at its prices (the maximum when the upstream overran it),
/// never above the maximum; a settled one has a transaction claimed for exactly that cost by its payer; a zero one
/// moved nothing; an unsettled one is listed as owed.
fn check_upto(
    row: &crate::store::upto::UptoRow,
    claim: Option<&crate::store::billing::ClaimRecord>,
) -> (Vec<Discrepancy>, Option<UnsettledUpto>) {
    let subject = format!("upto {}:{}", row.payer, row.nonce);
    let mut found = Vec::new();
    if row.status == "serving" {
        return (found, None);
    }
    let prices = crate::proxy::pricing::Prices {
        input_per_mtok: Usdc(row.input_price_atomic),
        output_per_mtok: Usdc(row.output_price_atomic),
    };
    let tokens = (
        u64::try_from(row.prompt_tokens.unwrap_or(0)).unwrap_or(0),
        u64::try_from(row.completion_tokens.unwrap_or(0)).unwrap_or(0),
    );
    let cost = row.cost_atomic.unwrap_or(-1);
    let full = prices.cost(tokens.0, tokens.1).atomic();
    if cost < 0 || cost > row.max_atomic || (cost != full && cost != row.max_atomic) {
        found.push(d(
            "upto",
            subject.clone(),
            format!(
                "cost {cost} atomic is not {} prompt + {} completion tokens at its prices ({full}) nor its \
                 maximum {}",
                tokens.0, tokens.1, row.max_atomic
            ),
        ));
    }
    match row.status.as_str() {
        "settled" => match claim {
            Some(c) if c.paid_usdc.atomic() == cost && c.account == row.payer => {}
            Some(c) => found.push(d(
                "upto",
                subject.clone(),
                format!(
                    "settled {cost} atomic, but its transaction is claimed by {} for {}",
                    c.account,
                    c.paid_usdc.atomic()
                ),
            )),
            None => found.push(d(
                "upto",
                subject.clone(),
                format!(
                    "settled in {} but that transaction has no claim",
                    row.tx_hash.as_deref().unwrap_or("(no transaction)")
                ),
            )),
        },
        "zero" if cost != 0 || row.tx_hash.is_some() => found.push(d(
            "upto",
            subject.clone(),
            "settled for zero, yet has a cost or a transaction",
        )),
        _ => {}
    }
    let unsettled = (row.status == "unsettled").then(|| UnsettledUpto {
        payer: row.payer.clone(),
        nonce: row.nonce.clone(),
        request_id: row.request_id.clone(),
        owed: Usdc(cost.max(0)),
        last_error: row.last_error.clone(),
    });
    (found, unsettled)
}

/// Check 5, folded over the settled usage rows: each row's charge.
struct UsageCheck {
    configured: HashMap<String, crate::proxy::pricing::Prices>,
    found: Vec<Discrepancy>,
    overruns: Vec<Overrun>,
    checked: u64,
}

impl UsageCheck {
    fn check(&mut self, u: SettledUsage) {
        self.checked += 1;
        let out = &mut self.found;
        let SettledUsage {
            request_id,
            key_kind: kind,
            model,
            status,
            usage_source: source,
            prompt_tokens: prompt,
            completion_tokens: completion,
            reserved_atomic: reserved,
            cost_atomic: cost,
            input_price_atomic: input,
            output_price_atomic: output,
            overrun_tokens,
            uncharged_atomic: uncharged,
        } = u;
        let subject = format!("request {request_id}");
        if kind != "credit" || status == "interrupted" {
            if cost != 0 {
                out.push(d(
                    "usage",
                    subject,
                    format!(
                        "a {kind} request with status {status} was charged {}",
                        Usdc(cost)
                    ),
                ));
            }
            return;
        }
        let prices = match (input, output) {
            (Some(i), Some(o)) => Some(crate::proxy::pricing::Prices {
                input_per_mtok: Usdc(i),
                output_per_mtok: Usdc(o),
            }),
            _ => self.configured.get(&model).copied(),
        };
        let Some(prices) = prices else {
            out.push(d(
                "usage",
                subject,
                format!("no prices recorded and model `{model}` is not configured: the charge cannot be checked"),
            ));
            return;
        };
        let full = prices
            .cost(prompt.max(0) as u64, completion.max(0) as u64)
            .atomic();
        if cost > reserved {
            out.push(d(
                "usage",
                subject.clone(),
                format!(
                    "charged {} beyond its reservation {}",
                    Usdc(cost),
                    Usdc(reserved)
                ),
            ));
        }
        let overrun = overrun_tokens > 0 || status == "overrun_cut";
        let expected = if overrun || source == "reservation" {
            reserved
        } else {
            full.min(reserved)
        };
        if cost != expected {
            out.push(d(
                "usage",
                subject.clone(),
                format!(
                    "charged {}, but {prompt} prompt + {completion} completion tokens at the recorded prices cost {} \
                     (reservation {}, status {status}, usage {source})",
                    Usdc(cost),
                    Usdc(full),
                    Usdc(reserved)
                ),
            ));
        }
        if !overrun && full > cost {
            out.push(d(
                "usage",
                subject.clone(),
                format!(
                    "undercharged: reported tokens cost {}, charged {}, and no overrun is recorded",
                    Usdc(full),
                    Usdc(cost)
                ),
            ));
        }
        if overrun {
            if uncharged != (full - cost).max(0) {
                out.push(d(
                    "usage",
                    subject.clone(),
                    format!(
                        "overrun records {} uncharged, but the reported tokens cost {} beyond the charge",
                        Usdc(uncharged),
                        Usdc((full - cost).max(0))
                    ),
                ));
            }
            self.overruns.push(Overrun {
                request_id,
                model,
                status,
                overrun_tokens: overrun_tokens.max(0) as u64,
                charged: Usdc(cost),
                uncharged: Usdc(uncharged),
            });
        }
    }
}

#[derive(Default)]
struct Counts {
    claims: u64,
    accounts: u64,
    ledger_rows: u64,
    seats: u64,
    subscriptions: u64,
}

/// Checks 2-4: claims, the ledger and seats, against the database's own rows.
fn check_books(books: Books) -> (Vec<Discrepancy>, Counts) {
    let mut out = Vec::new();
    let mut counts = Counts::default();

    // Purchases: a claim and its copies (x402 re-submissions) are backed by any of their transactions.
    let mut confirmed_purchases: HashMap<String, String> = HashMap::new();
    for claim in &books.claims {
        if claim.confirmed {
            confirmed_purchases.insert(
                claim
                    .origin_tx
                    .clone()
                    .unwrap_or_else(|| claim.tx_hash.clone()),
                claim.tx_hash.clone(),
            );
        }
    }
    // Which spelling of a transaction is the original claim when several spell it: the lower-case one the gateway
    // writes, if there is one, else the first in claim order.
    let lower_case: HashSet<&str> = books
        .claims
        .iter()
        .map(|c| c.tx_hash.as_str())
        .filter(|tx| !tx.bytes().any(|b| b.is_ascii_uppercase()))
        .collect();
    let mut seen: HashMap<String, String> = HashMap::new();
    for claim in &books.claims {
        let (tx, account, kind) = (&claim.tx_hash, &claim.account, &claim.kind);
        let (paid, price, surplus) = (claim.paid_atomic, claim.price_atomic, claim.surplus_atomic);
        let origin = &claim.origin_tx;
        let purchase = origin.clone().unwrap_or_else(|| tx.clone());
        let reversed = claim.purchase_reversed;
        counts.claims += 1;
        let subject = format!("claim {tx}");
        let lower = tx.to_ascii_lowercase();
        let previous = seen.insert(lower.clone(), tx.clone());
        let original = if lower_case.contains(lower.as_str()) {
            Some(lower)
        } else {
            previous
        };
        if let Some(first) = original.filter(|first| first != tx) {
            out.push(d(
                "claims",
                &subject,
                format!("transaction claimed twice (also as {first})"),
            ));
        }
        let payers = &claim.payers;
        let from_account: i64 = payers
            .iter()
            .filter(|p| &p.payer == account)
            .map(|p| p.value_atomic)
            .sum();
        if reversed && origin.is_none() {
            if let Some(by) = confirmed_purchases.get(&purchase) {
                out.push(d(
                    "claims",
                    &subject,
                    format!(
                        "reversed, but its payment is confirmed (in {by}): the restore is missing"
                    ),
                ));
            }
        } else if payers.is_empty() && !confirmed_purchases.contains_key(&purchase) && !reversed {
            out.push(d(
                "claims",
                &subject,
                "no confirmed transfer backs this claim, and it is not reversed",
            ));
        } else if !payers.is_empty() && from_account != paid {
            out.push(d(
                "claims",
                &subject,
                format!(
                    "paid {} USDC by {account}, but confirmed transfers from it total {} USDC",
                    Usdc(paid),
                    Usdc(from_account)
                ),
            ));
        }
        if payers.iter().any(|p| &p.payer != account) {
            out.push(d(
                "claims",
                &subject,
                "the transaction also has transfers from other payers",
            ));
        }
        if price + surplus != paid {
            out.push(d(
                "claims",
                &subject,
                format!(
                    "price {} + surplus {} ≠ paid {}",
                    Usdc(price),
                    Usdc(surplus),
                    Usdc(paid)
                ),
            ));
        }
        if origin.is_some() {
            // A copy of a claim for another transaction of the same payment: the ledger rows name the original.
            continue;
        }
        let (reversed_sum, reinstated_sum) =
            (claim.reversal.sum_atomic, claim.reinstatement.sum_atomic);
        let (expected_rev, expected_rein) = (
            claim.recorded_reversed_atomic,
            claim.recorded_restored_atomic,
        );
        if reversed_sum != -expected_rev || reinstated_sum != expected_rein {
            out.push(d(
                "ledger",
                &subject,
                format!(
                    "reversals recorded {} USDC taken back and {} USDC given back, but the ledger has {} and {}",
                    Usdc(expected_rev),
                    Usdc(expected_rein),
                    Usdc(-reversed_sum),
                    Usdc(reinstated_sum)
                ),
            ));
        }
        let (topups, topup_sum) = (claim.topup.rows, claim.topup.sum_atomic);
        let (surpluses, surplus_sum) = (claim.surplus.rows, claim.surplus.sum_atomic);
        if topups > 1 || surpluses > 1 {
            out.push(d(
                "claims",
                &subject,
                format!("credited more than once in the ledger ({topups} top-up rows, {surpluses} surplus rows)"),
            ));
        }
        let expected_topup = if kind == "topup" { price } else { 0 };
        if topup_sum != expected_topup {
            out.push(d(
                "ledger",
                &subject,
                format!(
                    "top-up credited {} USDC, the claim says {}",
                    Usdc(topup_sum),
                    Usdc(expected_topup)
                ),
            ));
        }
        if surplus_sum != surplus {
            out.push(d(
                "ledger",
                &subject,
                format!(
                    "surplus credited {} USDC, the claim says {}",
                    Usdc(surplus_sum),
                    Usdc(surplus)
                ),
            ));
        }
        if kind == "subscription"
            && claim
                .subscription_tx
                .as_deref()
                .map(str::to_ascii_lowercase)
                != Some(tx.to_ascii_lowercase())
        {
            out.push(d(
                "claims",
                &subject,
                "subscription claim without its subscription",
            ));
        }
    }
    // Ledger credits of transactions that were never claimed.
    for tx in books.credits_without_claim {
        out.push(d(
            "ledger",
            format!("transaction {tx}"),
            "credited in the ledger without a claim",
        ));
    }

    // Ledger: running balances and totals.
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    let mut last_after: BTreeMap<String, i64> = BTreeMap::new();
    for row in books.ledger {
        let (id, account, amount, after) = (
            row.id,
            row.account,
            row.amount_atomic,
            row.balance_after_atomic,
        );
        counts.ledger_rows += 1;
        let sum = running.entry(account.clone()).or_insert(0);
        *sum += amount;
        if *sum != after {
            out.push(d(
                "ledger",
                format!("ledger row #{id} of {account}"),
                format!(
                    "balance after is {} USDC, but the rows so far sum to {} USDC",
                    Usdc(after),
                    Usdc(*sum)
                ),
            ));
            // Carry on from the stated balance so one bad row is reported once.
            *sum = after;
        }
        last_after.insert(account, after);
    }
    for total in books.accounts {
        let (account, sum) = (total.account, total.sum_atomic);
        counts.accounts += 1;
        let balance = last_after.get(&account).copied().unwrap_or(0);
        if balance != sum {
            out.push(d(
                "ledger",
                format!("account {account}"),
                format!(
                    "balance {} USDC ≠ sum of its ledger {} USDC",
                    Usdc(balance),
                    Usdc(sum)
                ),
            ));
        }
        if total.balance_column_atomic != sum {
            out.push(d(
                "ledger",
                format!("account {account}"),
                format!(
                    "balance column {} USDC ≠ sum of its ledger {} USDC",
                    Usdc(total.balance_column_atomic),
                    Usdc(sum)
                ),
            ));
        }
        // A reversal may take a balance below zero (credits spent before their payment left the chain); nothing
        // else may.
        if sum < 0 && !total.has_open_reversal {
            out.push(d(
                "ledger",
                format!("account {account}"),
                "negative balance, and no purchase of this account is reversed",
            ));
        }
    }

    // Seats against subscriptions.
    for seat in books.seats {
        let (sub_id, pool, block, expires) =
            (seat.subscription_id, seat.pool, seat.block, seat.expires_at);
        counts.seats += 1;
        let subject = format!("seat {pool}/{block} of subscription {sub_id}");
        if !seat.subscription_exists {
            out.push(d(
                "seats",
                &subject,
                "held by a subscription that does not exist",
            ));
            continue;
        }
        let blocks: Vec<String> = seat
            .subscription_blocks_json
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let s_pool = seat.subscription_pool;
        if s_pool.as_deref() != Some(pool.as_str()) {
            out.push(d(
                "seats",
                &subject,
                format!("the subscription is of pool {}", s_pool.unwrap_or_default()),
            ));
        }
        if !blocks.contains(&block) {
            out.push(d(
                "seats",
                &subject,
                format!("the subscription bought blocks {blocks:?}, not {block}"),
            ));
        }
        let s_expires = seat.subscription_expires_at;
        if s_expires != Some(expires) {
            out.push(d(
                "seats",
                &subject,
                format!(
                    "expires at {expires}, the subscription at {}",
                    s_expires.unwrap_or_default()
                ),
            ));
        }
    }
    for sub in books.subscriptions {
        let (id, held) = (sub.id, sub.seats_held);
        counts.subscriptions += 1;
        let n = serde_json::from_str::<Vec<String>>(&sub.blocks_json)
            .map(|b| b.len() as i64)
            .unwrap_or(-1);
        if n != held {
            out.push(d(
                "seats",
                format!("subscription {id}"),
                format!("bought {n} blocks but holds {held} seats"),
            ));
        }
        if !sub.claimed {
            out.push(d(
                "claims",
                format!("subscription {id}"),
                "no claim paid for this subscription",
            ));
        }
    }
    (out, counts)
}

/// Purchases whose last event is a reversal.
fn open_reversals(events: &[ReversalEvent]) -> usize {
    let mut last: HashMap<&str, &str> = HashMap::new();
    for e in events {
        last.insert(&e.claim_tx, &e.kind);
    }
    last.values().filter(|k| **k == "reversed").count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::audit::{ClaimFacts, Credited};

    fn claim(tx_hash: &str) -> ClaimFacts {
        ClaimFacts {
            tx_hash: tx_hash.into(),
            account: "0xa".into(),
            kind: "topup".into(),
            paid_atomic: 0,
            price_atomic: 0,
            surplus_atomic: 0,
            subscription_id: None,
            origin_tx: None,
            confirmed: true,
            purchase_reversed: false,
            payers: Vec::new(),
            reversal: Credited::default(),
            reinstatement: Credited::default(),
            topup: Credited::default(),
            surplus: Credited::default(),
            recorded_reversed_atomic: 0,
            recorded_restored_atomic: 0,
            subscription_tx: None,
        }
    }

    fn claimed_twice(order: &[&str]) -> Vec<String> {
        let books = Books {
            claims: order.iter().map(|tx| claim(tx)).collect(),
            ..Default::default()
        };
        check_books(books)
            .0
            .into_iter()
            .filter(|d| d.detail.contains("claimed twice"))
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn the_lower_case_spelling_is_the_original_of_a_transaction_claimed_twice() {
        let named = ["[claims] claim 0xAB: transaction claimed twice (also as 0xab)"];
        // Whichever comes first in claim order.
        assert_eq!(claimed_twice(&["0xAB", "0xab"]), named);
        assert_eq!(claimed_twice(&["0xab", "0xAB"]), named);
        // No lower-case spelling: the first in claim order is the original.
        assert_eq!(
            claimed_twice(&["0xAb", "0xaB"]),
            ["[claims] claim 0xaB: transaction claimed twice (also as 0xAb)"]
        );
    }
}
