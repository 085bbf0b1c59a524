//! Operator routes: liveness with the indexer's progress (`/healthz`), readiness (`/readyz`), Prometheus
//! metrics (`/metrics`) and the OpenAPI document (`/openapi.json`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

/// One network's indexer as `/healthz` shows it.
fn indexer_view(s: &crate::chain::IndexerStatus, confirmations: u64) -> serde_json::Value {
    json!({
        "indexedHead": s.indexed_head,
        "chainHead": s.chain_head,
        "lag": s.lag(),
        "confirmations": confirmations,
        "reorgs": s.reorgs,
        "rpcErrors": s.rpc_errors,
        "wsConnected": s.ws_connected,
        "role": if s.follower { "follower" } else { "leader" },
        "lastError": s.last_error,
        "fatal": s.fatal,
    })
}

/// Every network with its indexer's status, the first network first.
fn networks(state: &AppState) -> Vec<(&crate::config::ChainSettings, crate::chain::IndexerStatus)> {
    state
        .settings
        .networks()
        .map(|chain| {
            let status = state
                .indexers
                .get(&chain.network.caip2())
                .map(|h| h.snapshot())
                .unwrap_or_default();
            (chain, status)
        })
        .collect()
}

/// Every Solana network with its indexer's status.
fn svm_networks(
    state: &AppState,
) -> Vec<(&crate::config::SvmSettings, crate::chain::IndexerStatus)> {
    state
        .settings
        .svm_networks
        .iter()
        .map(|n| {
            let status = state
                .indexers
                .get(&n.caip2)
                .map(|h| h.snapshot())
                .unwrap_or_default();
            (n, status)
        })
        .collect()
}

/// 200 while every network's indexer runs (even when it retries RPC errors), 503 once one has stopped for good.
/// The top-level `indexer`, `chainId` and `payTo` are the first network's; `networks` lists each.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.indexer.snapshot();
    let all = networks(&state);
    let svm = svm_networks(&state);
    let healthy =
        all.iter().all(|(_, s)| s.fatal.is_none()) && svm.iter().all(|(_, s)| s.fatal.is_none());
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "indexer": {
            "indexedHead": s.indexed_head,
            "chainHead": s.chain_head,
            "lag": s.lag(),
            "confirmations": state.settings.chain.confirmations,
            "reorgs": s.reorgs,
            "rpcErrors": s.rpc_errors,
            "wsConnected": s.ws_connected,
            "role": if s.follower { "follower" } else { "leader" },
            "lastError": s.last_error,
            "fatal": s.fatal,
        },
        "chainId": state.settings.chain.network.chain_id,
        "payTo": format!("{:#x}", state.settings.chain.pay_to),
        "networks": all.iter().map(|(chain, s)| json!({
            "network": chain.network.caip2(),
            "name": chain.network.name,
            "chainId": chain.network.chain_id,
            "payTo": format!("{:#x}", chain.pay_to),
            "asset": format!("{:#x}", chain.network.token),
            "indexer": indexer_view(s, chain.confirmations),
        })).chain(svm.iter().map(|(n, s)| json!({
            "network": n.caip2,
            "name": n.name,
            "kind": "svm",
            "payTo": n.pay_to.to_string(),
            "asset": n.mint.to_string(),
            "commitment": n.commitment.as_str(),
            "indexer": indexer_view(s, 1),
            "rpcErrors": s.rpc_errors,
        }))).collect::<Vec<_>>(),
        "deployments": state.proxy.router().status(std::time::Instant::now()),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
}

/// 200 when the gateway can take payments and serve right now: the indexer runs, lags the chain by at most
/// `server.ready_max_lag_blocks`, the database accepts a write, and every model has a deployment in rotation.
/// 503 with the reasons otherwise.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.indexer.snapshot();
    let bound = state.settings.ready_max_lag_blocks;
    let mut reasons: Vec<String> = Vec::new();
    let all = networks(&state);
    // With one network the reasons read as before; with several each names its network.
    let several = all.len() > 1;
    for (chain, s) in &all {
        let bound = chain.ready_max_lag_blocks;
        let on = if several {
            format!(" ({})", chain.network.caip2())
        } else {
            String::new()
        };
        if let Some(fatal) = &s.fatal {
            reasons.push(format!("the indexer{on} has stopped: {fatal}"));
        }
        match (s.indexed_head, s.lag()) {
            (None, _) => reasons.push(format!("the indexer{on} has not indexed a block yet")),
            (_, Some(lag)) if lag > bound => reasons.push(format!(
                "the indexer{on} lags the chain head by {lag} blocks (more than {bound})"
            )),
            _ => {}
        }
    }
    for (n, s) in svm_networks(&state) {
        let on = format!(" ({})", n.caip2);
        if let Some(fatal) = &s.fatal {
            reasons.push(format!("the indexer{on} has stopped: {fatal}"));
        }
        match (s.indexed_head, s.lag()) {
            (None, _) => reasons.push(format!("the indexer{on} has not read a slot yet")),
            (_, Some(lag)) if lag > n.ready_max_lag_slots => reasons.push(format!(
                "the indexer{on} lags the cluster by {lag} slots (more than {})",
                n.ready_max_lag_slots
            )),
            _ => {}
        }
    }
    let unserved = state.proxy.router().models_without_healthy_deployment();
    if !unserved.is_empty() {
        reasons.push(format!(
            "no healthy deployment (every one is cooling down after failures) for: {}",
            unserved.join(", ")
        ));
    }
    // A real write, through the writer thread and the journal (see `Store::probe_write`).
    let writable = state.store.probe_write().await;
    if let Err(e) = &writable {
        reasons.push(format!("the database does not accept writes: {e}"));
    }
    let ready = reasons.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "reasons": reasons,
            "indexedHead": s.indexed_head,
            "chainHead": s.chain_head,
            "lag": s.lag(),
            "maxLag": bound,
            "databaseWritable": writable.is_ok(),
            "modelsWithoutHealthyDeployment": unserved,
            "networks": all.iter().map(|(chain, s)| json!({
                "network": chain.network.caip2(),
                "indexedHead": s.indexed_head,
                "chainHead": s.chain_head,
                "lag": s.lag(),
                "maxLag": chain.ready_max_lag_blocks,
            })).collect::<Vec<_>>(),
        })),
    )
}

/// Prometheus text format. Indexer and database gauges are refreshed here, at scrape time.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    use crate::metrics as m;
    let handle = m::handle();
    let s = state.indexer.snapshot();
    if let Some(h) = s.indexed_head {
        metrics::gauge!(m::INDEXED_HEAD).set(h as f64);
    }
    if let Some(h) = s.chain_head {
        metrics::gauge!(m::CHAIN_HEAD).set(h as f64);
    }
    if let Some(lag) = s.lag() {
        metrics::gauge!(m::INDEXER_LAG).set(lag as f64);
    }
    metrics::gauge!(m::INDEXER_UP).set(if s.fatal.is_none() { 1.0 } else { 0.0 });
    metrics::counter!(m::RPC_ERRORS).absolute(s.rpc_errors);
    // The same figures per network (the unlabelled series above are the first network's); a Solana network's
    // heads are slots.
    let labelled: Vec<(String, crate::chain::IndexerStatus)> = networks(&state)
        .into_iter()
        .map(|(chain, s)| (chain.network.caip2(), s))
        .chain(
            svm_networks(&state)
                .into_iter()
                .map(|(n, s)| (n.caip2.clone(), s)),
        )
        .collect();
    for (network, s) in labelled {
        if let Some(h) = s.indexed_head {
            metrics::gauge!(m::INDEXED_HEAD, "network" => network.clone()).set(h as f64);
        }
        if let Some(h) = s.chain_head {
            metrics::gauge!(m::CHAIN_HEAD, "network" => network.clone()).set(h as f64);
        }
        if let Some(lag) = s.lag() {
            metrics::gauge!(m::INDEXER_LAG, "network" => network.clone()).set(lag as f64);
        }
        metrics::gauge!(m::INDEXER_UP, "network" => network.clone()).set(if s.fatal.is_none() {
            1.0
        } else {
            0.0
        });
        metrics::counter!(m::RPC_ERRORS, "network" => network.clone()).absolute(s.rpc_errors);
        metrics::counter!(m::REORGS, "network" => network).absolute(s.reorgs);
    }
    m::refresh_deployments(&state.proxy.router().status(std::time::Instant::now()));
    let now = state.billing.now();
    match state.store.metric_counts(now).await {
        Ok(counts) => {
            for status in ["seen", "confirmed", "orphaned"] {
                let n = counts
                    .transfers
                    .iter()
                    .find(|t| t.status == status)
                    .map(|t| t.count)
                    .unwrap_or(0);
                metrics::gauge!(m::TRANSFERS, "status" => status).set(n as f64);
            }
            metrics::counter!(m::REORGS).absolute(counts.reorgs.max(0) as u64);
            // Every configured network has both series (0 until it has figures).
            for chain in state.settings.networks() {
                let network = chain.network.caip2();
                let of = |rows: &[(String, i64)]| {
                    rows.iter()
                        .find(|(n, _)| *n == network)
                        .map_or(0, |(_, v)| *v)
                };
                metrics::gauge!(m::RECEIVED, "network" => network.clone())
                    .set(of(&counts.received_by_network) as f64);
                metrics::gauge!(m::UPTO_OWED, "network" => network.clone())
                    .set(of(&counts.upto_owed_by_network) as f64);
                metrics::gauge!(m::REVERSED, "network" => network.clone())
                    .set(of(&counts.reversed_by_network) as f64);
                // Every configured network has the failover series too (0 until one happens).
                metrics::counter!(m::RPC_FAILOVERS, "network" => network.clone())
                    .absolute(m::rpc_failovers(&network));
            }
            // Every state of both schemes on every configured network (a state that emptied reads 0, not its
            // last count).
            for chain in state.settings.networks() {
                let network = chain.network.caip2();
                for (scheme, statuses) in [
                    ("exact", &["settled", "failed"][..]),
                    (
                        "upto",
                        &["serving", "settling", "settled", "zero", "unsettled"][..],
                    ),
                ] {
                    for status in statuses {
                        let n = counts
                            .settlements
                            .iter()
                            .find(|(n, sc, st, _)| *n == network && sc == scheme && st == status)
                            .map_or(0, |s| s.3);
                        metrics::gauge!(m::SETTLEMENTS, "network" => network.clone(), "scheme" => scheme, "status" => *status)
                            .set(n as f64);
                    }
                }
            }
            for kind in ["subscription", "credit"] {
                for st in ["live", "revoked", "expired"] {
                    let n = counts
                        .keys
                        .iter()
                        .find(|k| k.kind == kind && k.state == st)
                        .map(|k| k.count)
                        .unwrap_or(0);
                    metrics::gauge!(m::KEYS, "kind" => kind, "state" => st).set(n as f64);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: database counts unavailable"),
    }
    handle.run_upkeep();
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        handle.render(),
    )
}

async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CACHE_CONTROL, "no-cache")],
        Json(super::openapi::document_for(&state.settings)),
    )
}
