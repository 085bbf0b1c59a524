//! Operator routes: liveness with the indexer's progress.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz))
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
