//! Auditor API `/api/audit/*`: read-only, behind `Authorization: Bearer <auditor or admin token>` (compared in
//! constant time). Without a configured token the API answers 404 and never opens up.
//!
//! Listings page by an opaque cursor (`?cursor=` from the previous `nextCursor`, `?limit=` ≤ 1000). With
//! `Accept: text/csv` or `?format=csv` they stream the whole filtered range as CSV, read page by page.

// Parsing helpers return the finished error response; it is the cold path and boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::audit::{self, ClaimFilter, Dataset, PaymentFilter};
use crate::store::StoreError;
use crate::store::transfers::TransferStatus;
use crate::usdc::Usdc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/audit/payments", get(payments))
        .route("/api/audit/payments/{tx_hash}", get(payment))
        .route("/api/audit/claims", get(claims))
        .route("/api/audit/ledger", get(ledger_all))
        .route("/api/audit/accounts/{address}/ledger", get(ledger_of))
        .route("/api/audit/keys", get(keys))
        .route("/api/audit/revenue", get(revenue))
        .route("/api/audit/upto", get(upto_payments))
}

/// `GET /api/audit/upto[?status=…]`: every keyless pay-per-token payment (x402 `upto`), oldest first: payer,
/// Permit2 nonce, request, model, maximum, tokens, prices, metered cost, settlement transaction and state
/// (`serving`, `settling`, `settled`, `zero`, `unsettled`), with what is owed in total.
async fn upto_payments(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    if let Some(unknown) = q.keys().find(|k| k.as_str() != "status") {
        return bad(
            unknown,
            "unknown parameter (this listing takes `status` only)",
        );
    }
    const STATUSES: [&str; 5] = ["serving", "settling", "settled", "zero", "unsettled"];
    let status = match q.get("status").map(String::as_str) {
        None => None,
        Some(s) if STATUSES.contains(&s) => Some(s.to_string()),
        Some(_) => {
            return bad(
                "status",
                "must be serving, settling, settled, zero or unsettled",
            );
        }
    };
    let rows = match state.billing.upto_payments().await {
        Ok(rows) => rows,
        Err(e) => return internal(e),
    };
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| status.as_deref().is_none_or(|s| r.status == s))
        .collect();
    let owed: i64 = rows
        .iter()
        .filter(|r| r.status == "unsettled")
        .map(|r| r.cost_atomic.unwrap_or(0))
        .sum();
    let settled: i64 = rows
        .iter()
        .filter(|r| r.status == "settled")
        .map(|r| r.cost_atomic.unwrap_or(0))
        .sum();
    let mut r = Json(json!({
        "data": rows,
        "settledUsdc": Usdc(settled).to_string(),
        "unsettledUsdc": Usdc(owed).to_string(),
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON error `{"error": {"code", "message"}}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let mut r = (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"x402-gateway audit\""),
        );
    }
    r
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "audit request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; try again later",
    )
}

/// Constant-time token comparison (on SHA-256 digests, so the length does not leak either).
pub fn token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Allows the auditor or the admin token; `Err` is the response to send.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let auth = &state.settings.auth;
    let tokens: Vec<&str> = [auth.auditor_token.as_deref(), auth.admin_token.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    if tokens.is_empty() {
        // A switched-off feature is not an outage: 404, as for a path that is not served.
        return Err(error(
            StatusCode::NOT_FOUND,
            "audit_disabled",
            "the audit API is off: no auditor or admin token is configured (set auth.auditor_token_env or \
             auth.admin_token_env to the name of an environment variable holding a token)",
        ));
    }
    let Some(presented) = bearer(headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <auditor token>`",
        ));
    };
    // Compare against every token (no early exit), then decide.
    let ok = tokens
        .iter()
        .fold(false, |acc, t| acc | token_matches(presented, t));
    if ok {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the token is not valid for the audit API",
        ))
    }
}

type Params = HashMap<String, String>;

fn bad(param: &str, message: impl std::fmt::Display) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        format!("{param}: {message}"),
    )
}

fn only_params(q: &Params, allowed: &[&str]) -> Result<(), Response> {
    let common = ["cursor", "limit", "format"];
    match q
        .keys()
        .find(|k| !allowed.contains(&k.as_str()) && !common.contains(&k.as_str()))
    {
        Some(k) => Err(bad(
            k,
            format!(
                "unknown parameter; expected one of {}",
                allowed
                    .iter()
                    .chain(common.iter())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn address_param(q: &Params, name: &str) -> Result<Option<String>, Response> {
    match q.get(name) {
        None => Ok(None),
        Some(raw) => normalize_address(raw)
            .map(Some)
            .ok_or_else(|| bad(name, "must be an address: 0x followed by 40 hex digits")),
    }
}

fn normalize_address(raw: &str) -> Option<String> {
    let hex = raw.strip_prefix("0x").or_else(|| raw.strip_prefix("0X"))?;
    (hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("0x{}", hex.to_ascii_lowercase()))
}

fn u64_param(q: &Params, name: &str) -> Result<Option<u64>, Response> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| bad(name, "must be a non-negative integer"))
        })
        .transpose()
}

fn time_param(q: &Params, name: &str) -> Result<Option<i64>, Response> {
    q.get(name)
        .map(|v| {
            audit::parse_time(v).ok_or_else(|| {
                bad(
                    name,
                    "must be unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)",
                )
            })
        })
        .transpose()
}

fn wants_csv(q: &Params, headers: &HeaderMap) -> Result<bool, Response> {
    match q.get("format").map(String::as_str) {
        Some("csv") => return Ok(true),
        Some("json") => return Ok(false),
        Some(_) => return Err(bad("format", "must be `json` or `csv`")),
        None => {}
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv")))
}

/// Serves a dataset as a JSON page or a streamed CSV.
async fn listing(
    state: AppState,
    headers: HeaderMap,
    q: Params,
    dataset: Dataset,
    name: &str,
) -> Response {
    // Opaque to clients, an integer here: an id, or a claim time for claims (see `audit::read_page`).
    let after = match q.get("cursor").map(|c| c.parse::<i64>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return bad("cursor", "not a cursor from a previous page's nextCursor"),
    };
    let limit = match u64_param(&q, "limit") {
        Ok(None) => audit::DEFAULT_LIMIT,
        Ok(Some(l)) if (1..=u64::from(audit::MAX_LIMIT)).contains(&l) => l as u32,
        Ok(Some(_)) => return bad("limit", format!("must be 1 to {}", audit::MAX_LIMIT)),
        Err(r) => return r,
    };
    let csv = match wants_csv(&q, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let now = state.billing.now();
    if csv {
        return csv_stream(state, dataset, after, name);
    }
    match audit::read_page(&state.store, dataset, after, limit, now).await {
        Ok(page) => {
            let next = page.next.map(|c| c.to_string());
            (
                [(header::CACHE_CONTROL, "no-store")],
                Json(json!({"data": page.rows, "nextCursor": next})),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}

/// Streams every row after the cursor `after` as CSV, reading 500 rows per page.
fn csv_stream(state: AppState, dataset: Dataset, after: Option<i64>, name: &str) -> Response {
    const PAGE: u32 = 500;
    let columns = dataset.columns();
    let now = state.billing.now();
    let header_line = futures::stream::once(async move {
        Ok::<_, std::io::Error>(audit::csv_header(columns).into_bytes())
    });
    let rows = futures::stream::try_unfold(Some(after), move |cursor| {
        let store = state.store.clone();
        let dataset = dataset.clone();
        async move {
            let Some(after) = cursor else {
                return Ok(None);
            };
            let page = audit::read_page(&store, dataset, after, PAGE, now)
                .await
                .map_err(|e: StoreError| {
                    tracing::error!(error = %e, "CSV export failed mid-stream");
                    std::io::Error::other(e.to_string())
                })?;
            if page.rows.is_empty() {
                return Ok(None);
            }
            let mut chunk = String::new();
            for row in &page.rows {
                chunk.push_str(&audit::csv_line(columns, row));
            }
            // `None` ends the stream; `Some(cursor)` reads the next page.
            Ok(Some((chunk.into_bytes(), page.next.map(Some))))
        }
    });
    use futures::StreamExt;
    let body = Body::from_stream(header_line.chain(rows));
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.csv\""),
            ),
        ],
        body,
    )
        .into_response()
}

async fn payments(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let parse = || -> Result<PaymentFilter, Response> {
        only_params(
            &q,
            &[
                "status",
                "payer",
                "fromBlock",
                "toBlock",
                "from",
                "to",
                "minAmount",
                "network",
            ],
        )?;
        let status = match q.get("status") {
            None => None,
            Some(s) => Some(
                TransferStatus::parse(s)
                    .ok_or_else(|| bad("status", "must be seen, confirmed or orphaned"))?,
            ),
        };
        let min_atomic = match q.get("minAmount") {
            None => None,
            Some(s) => Some(
                s.parse::<Usdc>()
                    .map_err(|e| bad("minAmount", format!("a USDC amount such as \"10.00\": {e}")))?
                    .atomic(),
            ),
        };
        Ok(PaymentFilter {
            network: q.get("network").filter(|v| !v.is_empty()).cloned(),
            status,
            payer: address_param(&q, "payer")?,
            from_block: u64_param(&q, "fromBlock")?,
            to_block: u64_param(&q, "toBlock")?,
            from_time: time_param(&q, "from")?,
            to_time: time_param(&q, "to")?,
            min_atomic,
        })
    };
    match parse() {
        Ok(f) => listing(state, headers, q, Dataset::Payments(f), "payments").await,
        Err(r) => r,
    }
}

async fn payment(
    State(state): State<AppState>,
    headers: HeaderMap,
    tx_hash: Result<Path<String>, PathRejection>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    // A segment that is not UTF-8 is no hash either: the same 400 as any malformed one.
    let tx_hash = tx_hash.map(|Path(t)| t).unwrap_or_default();
    let hex = tx_hash
        .strip_prefix("0x")
        .or_else(|| tx_hash.strip_prefix("0X"));
    let Some(hex) = hex.filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return bad("txHash", "must be 0x followed by 64 hex digits");
    };
    let tx = format!("0x{}", hex.to_ascii_lowercase());
    match audit::payment_detail(&state.store, &tx).await {
        Ok(Some(v)) => ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_payment",
            format!("no transfer to payTo and no claim is recorded for {tx}"),
        ),
        Err(e) => internal(e),
    }
}

async fn claims(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let parse = || -> Result<ClaimFilter, Response> {
        only_params(&q, &["account", "kind", "from", "to"])?;
        let kind = match q.get("kind").map(String::as_str) {
            None => None,
            Some(k @ ("subscription" | "topup")) => Some(k.to_string()),
            Some(_) => return Err(bad("kind", "must be subscription or topup")),
        };
        Ok(ClaimFilter {
            account: address_param(&q, "account")?,
            kind,
            from_time: time_param(&q, "from")?,
            to_time: time_param(&q, "to")?,
        })
    };
    match parse() {
        Ok(f) => listing(state, headers, q, Dataset::Claims(f), "claims").await,
        Err(r) => r,
    }
}

async fn ledger_all(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let parse = || -> Result<Dataset, Response> {
        only_params(&q, &["account", "from", "to"])?;
        Ok(Dataset::Ledger {
            account: address_param(&q, "account")?,
            from_time: time_param(&q, "from")?,
            to_time: time_param(&q, "to")?,
        })
    };
    match parse() {
        Ok(d) => listing(state, headers, q, d, "ledger").await,
        Err(r) => r,
    }
}

async fn ledger_of(
    State(state): State<AppState>,
    headers: HeaderMap,
    address: Result<Path<String>, PathRejection>,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let address = address.map(|Path(a)| a).unwrap_or_default();
    let parse = || -> Result<Dataset, Response> {
        only_params(&q, &["from", "to"])?;
        let account = normalize_address(&address)
            .ok_or_else(|| bad("address", "must be 0x followed by 40 hex digits"))?;
        Ok(Dataset::Ledger {
            account: Some(account),
            from_time: time_param(&q, "from")?,
            to_time: time_param(&q, "to")?,
        })
    };
    match parse() {
        Ok(d) => listing(state, headers, q, d, "ledger").await,
        Err(r) => r,
    }
}

async fn keys(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let parse = || -> Result<Dataset, Response> {
        only_params(&q, &["account"])?;
        Ok(Dataset::Keys {
            account: address_param(&q, "account")?,
        })
    };
    match parse() {
        Ok(d) => listing(state, headers, q, d, "keys").await,
        Err(r) => r,
    }
}

async fn revenue(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    if let Err(r) = only_params(&q, &["from", "to"]) {
        return r;
    }
    let (from, to) = match (time_param(&q, "from"), time_param(&q, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let csv = match wants_csv(&q, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let rows = match audit::revenue(&state.store, from, to).await {
        Ok(rows) => rows,
        Err(e) => return internal(e),
    };
    if csv {
        let mut text = audit::csv_header(audit::REVENUE_COLUMNS);
        for r in &rows {
            text.push_str(&audit::csv_line(audit::REVENUE_COLUMNS, r));
        }
        return (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            text,
        )
            .into_response();
    }
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"data": rows})),
    )
        .into_response()
}
