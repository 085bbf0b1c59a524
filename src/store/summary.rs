//! The operator's console figures (`/api/admin/summary`, `/admin`): what was sold, used and paid in a time range —
//! per UTC day, per model, per account and per network — read in one read transaction, so the figures of one
//! answer are of one moment.
//!
//! Money is USD micro-units as everywhere: `received` is what confirmed transfers are credited at; `earned` is what
//! was sold: credits spent by requests, pool blocks sold (subscription claims at their price), per-request x402
//! payments and settled `upto` payments.

use std::collections::BTreeMap;

use serde::Serialize;

use super::audit::utc_day;
use super::sql::Sql;
use super::{Store, StoreError};
use crate::params;

/// Durations read per range for the latency percentiles (the newest first): enough for a month of a busy gateway,
/// bounded so one page view never reads the whole table.
const MAX_DURATIONS: i64 = 200_000;

/// One UTC day of the range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryDay {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Confirmed payments, credited value, by network (CAIP-2).
    pub received_by_network: BTreeMap<String, i64>,
    pub received_atomic: i64,
    /// Credits spent by credit-key requests (their metered cost).
    pub credits_spent_atomic: i64,
    /// Pool blocks sold: subscription claims at their price.
    pub pool_sold_atomic: i64,
    /// Standard x402 per-request payments settled.
    pub per_request_atomic: i64,
    /// x402 `upto` payments settled (their metered cost).
    pub upto_atomic: i64,
    /// Inference requests: with a key, paid per request, or paid per token (`upto`).
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Key requests that did not end `ok` (upstream errors and cuts, clients gone, interrupted).
    pub errors: i64,
}

impl SummaryDay {
    /// Everything sold that day.
    pub fn earned_atomic(&self) -> i64 {
        self.credits_spent_atomic
            + self.pool_sold_atomic
            + self.per_request_atomic
            + self.upto_atomic
    }
}

/// One model's traffic in the range (key requests and `upto` payments).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelStats {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Credits spent and `upto` costs settled on it.
    pub spend_atomic: i64,
    pub errors: i64,
    /// Request durations of key requests (ms): median and 95th percentile, `None` without any.
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    /// Time to the response headers (ms), median and 95th percentile.
    pub ttfb_p50_ms: Option<i64>,
    pub ttfb_p95_ms: Option<i64>,
    /// Tokens upstreams generated past the gateway's bound (their cost is the operator's loss).
    pub overrun_tokens: i64,
    pub uncharged_atomic: i64,
}

/// One deployment's key requests in the range (the upstream that answered them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStats {
    pub model: String,
    pub deployment: String,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub ttfb_p50_ms: Option<i64>,
    pub ttfb_p95_ms: Option<i64>,
}

/// An account's spend in the range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountSpend {
    pub account: String,
    pub spend_atomic: i64,
    pub requests: i64,
}

/// One network's payments in the range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPayments {
    pub network: String,
    pub confirmed_transfers: i64,
    pub received_atomic: i64,
    /// Transfers seen, not yet at depth (now, whatever their time).
    pub pending_transfers: i64,
    pub orphaned_transfers: i64,
    pub claims: i64,
    pub claimed_atomic: i64,
    pub x402_settled: i64,
    pub x402_failed: i64,
    pub upto_settled: i64,
    pub upto_unsettled: i64,
    /// What unsettled `upto` payments owe (the operator's loss until they settle).
    pub upto_owed_atomic: i64,
    pub reorgs: i64,
    /// Credits taken back from claims of this network by reorgs or failed re-settlements in the range, and given
    /// back when the payment came back.
    pub reversed_atomic: i64,
    pub restored_atomic: i64,
    /// What stays reversed now (whatever the time): taken back and not given back.
    pub still_reversed_atomic: i64,
    /// The network's checkpoint block (confirmations are counted against it).
    pub indexed_head: Option<i64>,
    /// The latest transfers to payTo, claims, x402 settlements (exact and `upto`) and reorgs, newest first, at
    /// most [`RECENT`] of each (whatever the range: the console shows what happened last).
    pub recent_transfers: Vec<RecentTransfer>,
    pub recent_claims: Vec<RecentClaim>,
    pub recent_settlements: Vec<RecentSettlement>,
    pub recent_reorgs: Vec<RecentReorg>,
}

/// How many recent rows of each kind the console lists per network.
pub const RECENT: i64 = 10;

/// A transfer to payTo, with its confirmations at the network's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentTransfer {
    pub tx_hash: String,
    pub log_index: i64,
    pub block_number: i64,
    pub from: String,
    pub value_atomic: i64,
    /// `seen`, `confirmed` or `orphaned`.
    pub status: String,
    pub confirmations: i64,
    pub claimed: bool,
    /// Block time, or when the indexer first saw it.
    pub at: i64,
}

/// A claim of a payment, and whether it stands reversed now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentClaim {
    pub tx_hash: String,
    pub account: String,
    /// `subscription` or `topup`.
    pub kind: String,
    pub paid_atomic: i64,
    pub claimed_at: i64,
    pub reversed: bool,
}

/// An x402 settlement: `exact` (a purchase or a paid request) or `upto` (metered).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentSettlement {
    pub scheme: String,
    pub tx_hash: Option<String>,
    pub payer: String,
    /// The product (`credits`, `subscription`, `request`) or, for `upto`, the model.
    pub what: String,
    /// What was settled (exact), or the metered cost (upto; `None` while serving).
    pub amount_atomic: Option<i64>,
    /// exact: `settled` or `failed`; upto: `serving`, `settling`, `settled`, `zero` or `unsettled`.
    pub status: String,
    pub at: i64,
}

/// A reorg the indexer handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentReorg {
    pub detected_at: i64,
    pub fork_block: i64,
    pub old_head: i64,
    pub depth: i64,
    pub orphaned_transfers: i64,
}

/// The console's figures for `[from, to)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub from: i64,
    pub to: i64,
    pub days: Vec<SummaryDay>,
    pub models: Vec<ModelStats>,
    pub deployments: Vec<DeploymentStats>,
    /// The ten accounts that spent most.
    pub top_accounts: Vec<AccountSpend>,
    pub networks: Vec<NetworkPayments>,
    /// Distinct keys that made a request in the range.
    pub active_keys: i64,
    /// Credits taken back by reorgs in the range (reversals), and given back (restores).
    pub reversed_atomic: i64,
    pub restored_atomic: i64,
}

/// `YYYY-MM-DD` of unix second `t`.
fn day_of(t: i64) -> String {
    crate::billing::rfc3339(t)[..10].to_string()
}

/// The `p`-th percentile (nearest rank) of sorted `values`.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The figures of `[from, to)`; `networks` names the configured networks (each listed, even without payments).
pub fn summary(
    c: &dyn Sql,
    from: i64,
    to: i64,
    networks: &[String],
) -> Result<Summary, StoreError> {
    let engine = c.engine();
    let mut days: BTreeMap<String, SummaryDay> = BTreeMap::new();
    // Every day of the range, so charts have a bar (maybe empty) per day; a range of more than a year lists only
    // the days with figures.
    let mut t = from.div_euclid(86_400) * 86_400;
    while t < to && to - from <= 366 * 86_400 {
        days.insert(day_of(t), SummaryDay::default());
        t += 86_400;
    }
    let at = "coalesce(block_time, first_seen_at)";
    for (d, network, sum) in c.query_map(
        &format!(
            "SELECT {} AS d, network, sum(value_atomic) FROM transfers WHERE status = 'confirmed' \
             AND {at} >= ?1 AND {at} < ?2 GROUP BY d, network",
            utc_day(engine, at)
        ),
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?)),
    )? {
        let day = days.entry(d).or_default();
        day.received_atomic += sum;
        *day.received_by_network.entry(network).or_default() += sum;
    }
    for (d, kind, n, prompt, completion, cost, errors) in c.query_map(
        &format!(
            "SELECT {} AS d, key_kind, count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_atomic), \
             sum(CASE WHEN status IN ('ok', 'in_flight') THEN 0 ELSE 1 END) FROM usage \
             WHERE started_at >= ?1 AND started_at < ?2 GROUP BY d, key_kind",
            utc_day(engine, "started_at")
        ),
        params![from, to],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
                r.get::<i64>(4)?,
                r.get::<i64>(5)?,
                r.get::<i64>(6)?,
            ))
        },
    )? {
        let day = days.entry(d).or_default();
        day.requests += n;
        day.prompt_tokens += prompt;
        day.completion_tokens += completion;
        day.errors += errors;
        if kind == "credit" {
            day.credits_spent_atomic += cost;
        }
    }
    for (d, sum) in c.query_map(
        &format!(
            "SELECT {} AS d, sum(price_atomic) FROM claims WHERE kind = 'subscription' \
             AND claimed_at >= ?1 AND claimed_at < ?2 GROUP BY d",
            utc_day(engine, "claimed_at")
        ),
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
    )? {
        days.entry(d).or_default().pool_sold_atomic += sum;
    }
    for (d, n, sum) in c.query_map(
        &format!(
            "SELECT {} AS d, count(*), sum(amount_atomic) FROM x402_settlements WHERE product = 'request' \
             AND status = 'settled' AND settled_at >= ?1 AND settled_at < ?2 GROUP BY d",
            utc_day(engine, "settled_at")
        ),
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?)),
    )? {
        let day = days.entry(d).or_default();
        day.per_request_atomic += sum;
        day.requests += n;
    }
    for (d, n, prompt, completion, settled) in c.query_map(
        &format!(
            "SELECT {} AS d, count(*), sum(coalesce(prompt_tokens, 0)), sum(coalesce(completion_tokens, 0)), \
             sum(CASE WHEN status = 'settled' THEN coalesce(cost_atomic, 0) ELSE 0 END) FROM upto_payments \
             WHERE created_at >= ?1 AND created_at < ?2 GROUP BY d",
            utc_day(engine, "created_at")
        ),
        params![from, to],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<i64>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
                r.get::<i64>(4)?,
            ))
        },
    )? {
        let day = days.entry(d).or_default();
        day.requests += n;
        day.prompt_tokens += prompt;
        day.completion_tokens += completion;
        day.upto_atomic += settled;
    }

    // Per model: key requests, then upto payments.
    let mut models: BTreeMap<String, ModelStats> = BTreeMap::new();
    for (model, n, prompt, completion, cost, errors, overrun, uncharged) in c.query_map(
        "SELECT model, count(*), sum(prompt_tokens), sum(completion_tokens), \
         sum(CASE WHEN key_kind = 'credit' THEN cost_atomic ELSE 0 END), \
         sum(CASE WHEN status IN ('ok', 'in_flight') THEN 0 ELSE 1 END), sum(overrun_tokens), sum(uncharged_atomic) \
         FROM usage WHERE started_at >= ?1 AND started_at < ?2 GROUP BY model",
        params![from, to],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<i64>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
                r.get::<i64>(4)?,
                r.get::<i64>(5)?,
                r.get::<i64>(6)?,
                r.get::<i64>(7)?,
            ))
        },
    )? {
        let m = models.entry(model.clone()).or_default();
        m.model = model;
        m.requests += n;
        m.prompt_tokens += prompt;
        m.completion_tokens += completion;
        m.spend_atomic += cost;
        m.errors += errors;
        m.overrun_tokens += overrun;
        m.uncharged_atomic += uncharged;
    }
    for (model, n, prompt, completion, settled) in c.query_map(
        "SELECT model, count(*), sum(coalesce(prompt_tokens, 0)), sum(coalesce(completion_tokens, 0)), \
         sum(CASE WHEN status = 'settled' THEN coalesce(cost_atomic, 0) ELSE 0 END) FROM upto_payments \
         WHERE created_at >= ?1 AND created_at < ?2 GROUP BY model",
        params![from, to],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<i64>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
                r.get::<i64>(4)?,
            ))
        },
    )? {
        let m = models.entry(model.clone()).or_default();
        m.model = model;
        m.requests += n;
        m.prompt_tokens += prompt;
        m.completion_tokens += completion;
        m.spend_atomic += settled;
    }
    // Durations and times to first byte, per model and per (model, deployment).
    type Times = (Vec<i64>, Vec<i64>);
    let mut by_model: BTreeMap<String, Times> = BTreeMap::new();
    let mut by_deployment: BTreeMap<(String, String), Times> = BTreeMap::new();
    for (model, deployment, ms, ttfb) in c.query_map(
        "SELECT model, deployment, duration_ms, first_byte_ms FROM usage WHERE started_at >= ?1 AND started_at < ?2 \
         AND duration_ms IS NOT NULL ORDER BY id DESC LIMIT ?3",
        params![from, to, MAX_DURATIONS],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<Option<String>>(1)?,
                r.get::<i64>(2)?,
                r.get::<Option<i64>>(3)?,
            ))
        },
    )? {
        let m = by_model.entry(model.clone()).or_default();
        m.0.push(ms);
        m.1.extend(ttfb);
        if let Some(d) = deployment {
            let e = by_deployment.entry((model, d)).or_default();
            e.0.push(ms);
            e.1.extend(ttfb);
        }
    }
    for (model, (mut ms, mut ttfb)) in by_model {
        ms.sort_unstable();
        ttfb.sort_unstable();
        if let Some(m) = models.get_mut(&model) {
            m.p50_ms = percentile(&ms, 50.0);
            m.p95_ms = percentile(&ms, 95.0);
            m.ttfb_p50_ms = percentile(&ttfb, 50.0);
            m.ttfb_p95_ms = percentile(&ttfb, 95.0);
        }
    }
    let mut deployments: Vec<DeploymentStats> = c
        .query_map(
            "SELECT model, deployment, count(*), sum(CASE WHEN status IN ('ok', 'in_flight') THEN 0 ELSE 1 END), \
             sum(prompt_tokens), sum(completion_tokens) FROM usage WHERE started_at >= ?1 AND started_at < ?2 \
             AND deployment IS NOT NULL GROUP BY model, deployment ORDER BY model, deployment",
            params![from, to],
            |r| {
                Ok(DeploymentStats {
                    model: r.get(0)?,
                    deployment: r.get(1)?,
                    requests: r.get(2)?,
                    errors: r.get(3)?,
                    prompt_tokens: r.get(4)?,
                    completion_tokens: r.get(5)?,
                    ..DeploymentStats::default()
                })
            },
        )?;
    for d in &mut deployments {
        if let Some((ms, ttfb)) = by_deployment.get_mut(&(d.model.clone(), d.deployment.clone())) {
            ms.sort_unstable();
            ttfb.sort_unstable();
            d.p50_ms = percentile(ms, 50.0);
            d.p95_ms = percentile(ms, 95.0);
            d.ttfb_p50_ms = percentile(ttfb, 50.0);
            d.ttfb_p95_ms = percentile(ttfb, 95.0);
        }
    }

    // Spend per account: credit requests, upto payments and per-request payments.
    let mut spend: BTreeMap<String, AccountSpend> = BTreeMap::new();
    for (sql, with_requests) in [
        (
            "SELECT account, sum(CASE WHEN key_kind = 'credit' THEN cost_atomic ELSE 0 END), count(*) FROM usage \
             WHERE started_at >= ?1 AND started_at < ?2 GROUP BY account",
            true,
        ),
        (
            "SELECT payer, sum(CASE WHEN status = 'settled' THEN coalesce(cost_atomic, 0) ELSE 0 END), count(*) \
             FROM upto_payments WHERE created_at >= ?1 AND created_at < ?2 GROUP BY payer",
            true,
        ),
        (
            "SELECT payer, sum(amount_atomic), count(*) FROM x402_settlements WHERE product = 'request' \
             AND status = 'settled' AND settled_at >= ?1 AND settled_at < ?2 GROUP BY payer",
            true,
        ),
        (
            "SELECT account, sum(price_atomic), 0 FROM claims WHERE kind = 'subscription' \
             AND claimed_at >= ?1 AND claimed_at < ?2 GROUP BY account",
            false,
        ),
    ] {
        for (account, sum, n) in c.query_map(sql, params![from, to], |r| {
            Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?))
        })? {
            let a = spend.entry(account.clone()).or_default();
            a.account = account;
            a.spend_atomic += sum;
            if with_requests {
                a.requests += n;
            }
        }
    }
    let mut top_accounts: Vec<AccountSpend> = spend.into_values().collect();
    top_accounts.sort_by(|a, b| {
        b.spend_atomic
            .cmp(&a.spend_atomic)
            .then(a.account.cmp(&b.account))
    });
    top_accounts.truncate(10);

    // Per network: every configured one, then any other a row names.
    let mut per_network: BTreeMap<String, NetworkPayments> = networks
        .iter()
        .map(|n| {
            (
                n.clone(),
                NetworkPayments {
                    network: n.clone(),
                    ..NetworkPayments::default()
                },
            )
        })
        .collect();
    /// The entry of `n`, made when a row names a network the config does not (any more).
    fn slot<'a>(m: &'a mut BTreeMap<String, NetworkPayments>, n: &str) -> &'a mut NetworkPayments {
        m.entry(n.to_string()).or_insert_with(|| NetworkPayments {
            network: n.to_string(),
            ..NetworkPayments::default()
        })
    }
    for (network, n, sum) in c.query_map(
        &format!(
            "SELECT network, count(*), sum(value_atomic) FROM transfers WHERE status = 'confirmed' \
             AND {at} >= ?1 AND {at} < ?2 GROUP BY network"
        ),
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?)),
    )? {
        let p = slot(&mut per_network, &network);
        p.confirmed_transfers = n;
        p.received_atomic = sum;
    }
    for (network, status, n) in c.query_map(
        "SELECT network, status, count(*) FROM transfers WHERE status <> 'confirmed' GROUP BY network, status",
        params![],
        |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?)),
    )? {
        let p = slot(&mut per_network, &network);
        match status.as_str() {
            "seen" => p.pending_transfers = n,
            _ => p.orphaned_transfers = n,
        }
    }
    for (network, n, sum) in c.query_map(
        "SELECT network, count(*), sum(paid_atomic) FROM claims WHERE claimed_at >= ?1 AND claimed_at < ?2 \
         GROUP BY network",
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?)),
    )? {
        let p = slot(&mut per_network, &network);
        p.claims = n;
        p.claimed_atomic = sum;
    }
    for (network, status, n) in c.query_map(
        "SELECT network, status, count(*) FROM x402_settlements WHERE settled_at >= ?1 AND settled_at < ?2 \
         GROUP BY network, status",
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?)),
    )? {
        let p = slot(&mut per_network, &network);
        if status == "settled" {
            p.x402_settled = n;
        } else {
            p.x402_failed = n;
        }
    }
    for (network, status, n, owed) in c.query_map(
        "SELECT network, status, count(*), sum(coalesce(cost_atomic, 0)) FROM upto_payments \
         WHERE (created_at >= ?1 AND created_at < ?2) OR status = 'unsettled' GROUP BY network, status",
        params![from, to],
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<i64>(2)?,
                r.get::<i64>(3)?,
            ))
        },
    )? {
        let p = slot(&mut per_network, &network);
        match status.as_str() {
            "settled" => p.upto_settled = n,
            "unsettled" => {
                p.upto_unsettled = n;
                p.upto_owed_atomic = owed;
            }
            _ => {}
        }
    }
    for (network, n) in c.query_map(
        "SELECT network, count(*) FROM reorgs WHERE detected_at >= ?1 AND detected_at < ?2 GROUP BY network",
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
    )? {
        slot(&mut per_network, &network).reorgs = n;
    }
    for (network, reversed, restored) in c.query_map(
        "SELECT c.network, coalesce(sum(CASE WHEN r.kind = 'reversed' THEN r.amount_atomic ELSE 0 END), 0), \
         coalesce(sum(CASE WHEN r.kind = 'restored' THEN r.amount_atomic ELSE 0 END), 0) FROM claim_reversals r \
         JOIN claims c ON c.tx_hash = r.claim_tx WHERE r.at >= ?1 AND r.at < ?2 GROUP BY c.network",
        params![from, to],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?)),
    )? {
        let p = slot(&mut per_network, &network);
        p.reversed_atomic = reversed;
        p.restored_atomic = restored;
    }
    for (network, outstanding) in c.query_map(
        "SELECT c.network, coalesce(sum(CASE WHEN r.kind = 'reversed' THEN r.amount_atomic \
         ELSE -r.amount_atomic END), 0) FROM claim_reversals r JOIN claims c ON c.tx_hash = r.claim_tx \
         GROUP BY c.network",
        params![],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
    )? {
        slot(&mut per_network, &network).still_reversed_atomic = outstanding;
    }
    for (network, head) in c.query_map(
        "SELECT network, block_number FROM network_checkpoints",
        params![],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
    )? {
        if let Some(p) = per_network.get_mut(&network) {
            p.indexed_head = Some(head);
        }
    }
    for p in per_network.values_mut() {
        recent(c, p)?;
    }
    // Configured networks first, in configuration order; others after.
    let mut networks_out: Vec<NetworkPayments> = networks
        .iter()
        .filter_map(|n| per_network.remove(n))
        .collect();
    networks_out.extend(per_network.into_values());

    let active_keys: i64 = c.query_value(
        "SELECT count(DISTINCT key_id) FROM usage WHERE started_at >= ?1 AND started_at < ?2",
        params![from, to],
    )?;
    let (reversed_atomic, restored_atomic): (i64, i64) = c.query_one(
        "SELECT coalesce(sum(CASE WHEN kind = 'reversed' THEN amount_atomic ELSE 0 END), 0), \
         coalesce(sum(CASE WHEN kind = 'restored' THEN amount_atomic ELSE 0 END), 0) FROM claim_reversals \
         WHERE at >= ?1 AND at < ?2",
        params![from, to],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(Summary {
        from,
        to,
        days: days
            .into_iter()
            .map(|(d, mut v)| {
                v.day = d;
                v
            })
            .collect(),
        models: models.into_values().collect(),
        deployments,
        top_accounts,
        networks: networks_out,
        active_keys,
        reversed_atomic,
        restored_atomic,
    })
}

/// Fills `p`'s recent lists (newest first, at most [`RECENT`] each).
fn recent(c: &dyn Sql, p: &mut NetworkPayments) -> Result<(), StoreError> {
    let network = p.network.clone();
    let head = p.indexed_head;
    p.recent_transfers = c.query_map(
        "SELECT t.tx_hash, t.log_index, t.block_number, t.from_address, t.value_atomic, t.status, \
         EXISTS (SELECT 1 FROM claims c WHERE c.tx_hash = t.tx_hash AND c.network = t.network), \
         coalesce(t.block_time, t.first_seen_at) FROM transfers t WHERE t.network = ?1 ORDER BY t.id DESC LIMIT ?2",
        params![network.clone(), RECENT],
        |r| {
            let block_number: i64 = r.get(2)?;
            let status: String = r.get(5)?;
            // Confirmations at the checkpoint; none for an orphaned transfer.
            let confirmations = match head {
                Some(h) if status != "orphaned" && h >= block_number => h - block_number + 1,
                _ => 0,
            };
            Ok(RecentTransfer {
                tx_hash: r.get(0)?,
                log_index: r.get(1)?,
                block_number,
                from: r.get(3)?,
                value_atomic: r.get(4)?,
                status,
                confirmations,
                claimed: r.get(6)?,
                at: r.get(7)?,
            })
        },
    )?;
    p.recent_claims = c.query_map(
        "SELECT c.tx_hash, c.account, c.kind, c.paid_atomic, c.claimed_at, \
         (SELECT count(*) FROM claim_reversals r WHERE r.claim_tx = c.tx_hash) FROM claims c \
         WHERE c.network = ?1 ORDER BY c.claimed_at DESC, c.tx_hash DESC LIMIT ?2",
        params![network.clone(), RECENT],
        |r| {
            Ok(RecentClaim {
                tx_hash: r.get(0)?,
                account: r.get(1)?,
                kind: r.get(2)?,
                paid_atomic: r.get(3)?,
                claimed_at: r.get(4)?,
                // Reversals and restores alternate: an odd count means reversed now.
                reversed: r.get::<i64>(5)? % 2 == 1,
            })
        },
    )?;
    let mut settlements: Vec<RecentSettlement> = c.query_map(
        "SELECT tx_hash, payer, product, amount_atomic, status, updated_at FROM x402_settlements \
         WHERE network = ?1 ORDER BY updated_at DESC, id DESC LIMIT ?2",
        params![network.clone(), RECENT],
        |r| {
            Ok(RecentSettlement {
                scheme: "exact".into(),
                tx_hash: Some(r.get(0)?),
                payer: r.get(1)?,
                what: r.get(2)?,
                amount_atomic: Some(r.get(3)?),
                status: r.get(4)?,
                at: r.get(5)?,
            })
        },
    )?;
    settlements.extend(c.query_map(
        "SELECT tx_hash, payer, model, cost_atomic, status, updated_at FROM upto_payments \
         WHERE network = ?1 ORDER BY updated_at DESC, id DESC LIMIT ?2",
        params![network.clone(), RECENT],
        |r| {
            Ok(RecentSettlement {
                scheme: "upto".into(),
                tx_hash: r.get(0)?,
                payer: r.get(1)?,
                what: r.get(2)?,
                amount_atomic: r.get(3)?,
                status: r.get(4)?,
                at: r.get(5)?,
            })
        },
    )?);
    settlements.sort_by_key(|s| std::cmp::Reverse(s.at));
    settlements.truncate(RECENT as usize);
    p.recent_settlements = settlements;
    p.recent_reorgs = c.query_map(
        "SELECT detected_at, fork_block, old_head, depth, orphaned_transfers FROM reorgs WHERE network = ?1 \
         ORDER BY id DESC LIMIT ?2",
        params![network, RECENT],
        |r| {
            Ok(RecentReorg {
                detected_at: r.get(0)?,
                fork_block: r.get(1)?,
                old_head: r.get(2)?,
                depth: r.get(3)?,
                orphaned_transfers: r.get(4)?,
            })
        },
    )?;
    Ok(())
}

impl Store {
    /// The console's figures for `[from, to)` (see [`summary`]).
    pub async fn admin_summary(
        &self,
        from: i64,
        to: i64,
        networks: Vec<String>,
    ) -> Result<Summary, StoreError> {
        self.read(move |c| summary(c, from, to, &networks)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&[7], 95.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(86_399), "1970-01-01");
        assert_eq!(day_of(86_400), "1970-01-02");
    }
}
