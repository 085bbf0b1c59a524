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
            "lastError": s.last_error,
            "fatal": s.fatal,
        },
        "chainId": state.settings.chain.network.chain_id,
        "payTo": format!("{:#x}", state.settings.chain.pay_to),
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

/// 200 when the gateway can take payments right now: the indexer runs, lags the chain by at most
/// `server.ready_max_lag_blocks`, and the database accepts a write. 503 with the reasons otherwise.
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
    // A real write: rewriting the schema version in the file's header goes through the writer and the journal.
    let writable = state
        .store
        .write(|tx| -> Result<(), crate::store::StoreError> {
            let v: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            tx.pragma_update(None, "user_version", v)?;
            Ok(())
        })
        .await;
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
    let now = state.billing.now();
    let counts = state
        .store
        .read(move |c| -> Result<_, crate::store::StoreError> {
            let mut transfers = Vec::new();
            let mut stmt = c.prepare_cached("SELECT status, count(*) FROM transfers GROUP BY status")?;
            for r in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                transfers.push(r?);
            }
            let reorgs: i64 = c.query_row("SELECT count(*) FROM reorgs", [], |r| r.get(0))?;
            let mut keys = Vec::new();
            let mut stmt = c.prepare_cached(
                "SELECT k.kind, CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked' WHEN k.suspended_at IS NOT NULL THEN 'suspended' \
                 WHEN s.expires_at IS NOT NULL AND s.expires_at <= ?1 THEN 'expired' ELSE 'live' END AS state, \
                 count(*) FROM api_keys k LEFT JOIN subscriptions s ON s.id = k.subscription_id \
                 GROUP BY k.kind, state",
            )?;
            for r in stmt.query_map([now], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })? {
                keys.push(r?);
            }
            Ok((transfers, reorgs, keys))
        })
        .await;
    match counts {
        Ok((transfers, reorgs, keys)) => {
            for status in ["seen", "confirmed", "orphaned"] {
                let n = transfers
                    .iter()
                    .find(|(s, _)| s == status)
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                metrics::gauge!(m::TRANSFERS, "status" => status).set(n as f64);
            }
            metrics::counter!(m::REORGS).absolute(reorgs.max(0) as u64);
            for kind in ["subscription", "credit"] {
                for st in ["live", "revoked", "expired"] {
                    let n = keys
                        .iter()
                        .find(|(k, s, _)| k == kind && s == st)
                        .map(|(_, _, n)| *n)
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
        Json(super::openapi::document(
            state.settings.public_url.as_deref(),
        )),
    )
}
