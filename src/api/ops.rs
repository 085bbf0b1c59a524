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

/// 200 while the indexer runs (even when it retries RPC errors), 503 once it has stopped for good.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.indexer.snapshot();
    let healthy = s.fatal.is_none();
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
    if let Some(fatal) = &s.fatal {
        reasons.push(format!("the indexer has stopped: {fatal}"));
    }
    match (s.indexed_head, s.lag()) {
        (None, _) => reasons.push("the indexer has not indexed a block yet".to_string()),
        (_, Some(lag)) if lag > bound => reasons.push(format!(
            "the indexer lags the chain head by {lag} blocks (more than {bound})"
        )),
        _ => {}
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
