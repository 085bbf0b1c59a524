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
