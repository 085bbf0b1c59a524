//! Agent routes: the catalog (`GET /api/agent/plans`), claims (`POST /api/agent/subscribe-pool`,
//! `POST /api/agent/topup`), key rotation (`POST /api/agent/keys/rotate`) and the keyless `/v1/*` fallback (402 with
//! the catalog).
//!
//! Every answer of `/api/agent/*` is `{"success": true, "data": …}` or `{"success": false, "error": {"code",
//! "message", …}}` — including malformed JSON (400) and oversized bodies (413). Input fields are checked one by one
//! so the message names the field.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use super::AppState;
use crate::billing::{ClaimError, ClaimRequest, Product, RotateError, RotateRequest};
use crate::usdc::Usdc;

/// Largest accepted request body on `/api/agent/*`.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub fn router() -> Router<AppState> {
    let agent = Router::new()
        .route("/api/agent/plans", get(plans))
        .route("/api/agent/subscribe-pool", post(subscribe_pool))
        .route("/api/agent/topup", post(topup))
        .route("/api/agent/keys/rotate", post(rotate))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    // GET and POST (the methods OpenAI's API uses); another method is a 405 with `Allow`, like the served routes.
    agent
        .route(
            "/v1",
            get(v1).post(v1).fallback(super::openai::wrong_method),
        )
        .route(
            "/v1/{*rest}",
            get(v1).post(v1).fallback(super::openai::wrong_method),
        )
}

/// An error in the seed's `{success: false, error}` shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Map<String, Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// 400 naming the field.
    fn field(field: &str, message: impl Into<String>) -> ApiError {
        let message = format!("{field}: {}", message.into());
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).with("field", field)
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "agent request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; try again later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.into());
        error.extend(self.extra);
        let mut response =
            (self.status, Json(json!({"success": false, "error": error}))).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// `{"success": true, "data": …}`, written by [`super::exact::ExactJsonBody`] so exact numbers (a top-up's
/// `newBalance`) stay exact.
fn success(data: Value) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        super::exact::ExactJsonBody(json!({"success": true, "data": data})),
    )
        .into_response()
}

/// A JSON object body whose rejections (too large, not JSON, not an object) are [`ApiError`]s.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    rejection.body_text(),
                )
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the body must be a JSON object",
            )),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            )),
        }
    }
}

fn only_fields(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::field(
            k,
            format!("unknown field; expected {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn string_field<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::field(field, "must be a string")),
    }
}

fn required_string<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    string_field(body, field)?.ok_or_else(|| ApiError::field(field, "is required"))
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `txHash` of a claim on `network`: on an EVM network 0x + 64 hex digits, returned lower-case; on Solana the
/// transaction's signature (base58 of 64 bytes), returned as written (base58 is case-sensitive).
fn claim_tx(network: &str, body: &Map<String, Value>) -> Result<String, ApiError> {
    if network.starts_with("solana:") {
        let raw = required_string(body, "txHash")?;
        return match bs58::decode(raw).into_vec() {
            Ok(bytes) if bytes.len() == 64 && bs58::encode(&bytes).into_string() == raw => {
                Ok(raw.to_string())
            }
            _ => Err(ApiError::field(
                "txHash",
                "must be a Solana transaction signature: base58 of 64 bytes",
            )),
        };
    }
    tx_hash(body)
}

/// `txHash`: 0x + 64 hex digits, returned lower-case.
fn tx_hash(body: &Map<String, Value>) -> Result<String, ApiError> {
    let raw = required_string(body, "txHash")?;
    match raw.strip_prefix("0x").or_else(|| raw.strip_prefix("0X")) {
        Some(hex) if hex.len() == 64 && is_hex(hex) => {
            Ok(format!("0x{}", hex.to_ascii_lowercase()))
        }
        _ => Err(ApiError::field(
            "txHash",
            "must be a transaction hash: 0x followed by 64 hex digits",
        )),
    }
}

/// `signature` of a claim on `network`: on Solana an ed25519 signature of 64 bytes, base58 (what wallets show) or
/// 0x-hex; elsewhere as [`signature`].
fn claim_signature(network: &str, body: &Map<String, Value>) -> Result<Option<Vec<u8>>, ApiError> {
    if !network.starts_with("solana:") {
        return signature(body);
    }
    let Some(raw) = string_field(body, "signature")? else {
        return Ok(None);
    };
    let bytes = match raw.strip_prefix("0x") {
        Some(hex) if is_hex(hex) => alloy::hex::decode(hex).ok(),
        _ => bs58::decode(raw).into_vec().ok(),
    };
    match bytes {
        Some(b) if b.len() == 64 => Ok(Some(b)),
        _ => Err(ApiError::field(
            "signature",
            "must be an ed25519 signature of 64 bytes (base58, or 0x-hex) by the paying wallet",
        )),
    }
}

/// `signature`: 0x-hex bytes (65 for an ECDSA signature; contract wallets may use other lengths).
fn signature(body: &Map<String, Value>) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(raw) = string_field(body, "signature")? else {
        return Ok(None);
    };
    let bad = || {
        ApiError::field(
            "signature",
            "must be 0x-prefixed hex bytes (65 bytes for personal_sign)",
        )
    };
    let hex = raw.strip_prefix("0x").ok_or_else(bad)?;
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 8192 || !is_hex(hex) {
        return Err(bad());
    }
    alloy::hex::decode(hex).map(Some).map_err(|_| bad())
}

/// A JSON number that names an integer: an integer, or a whole float exactly representable (below 2^53 in
/// magnitude: `50.0` is JSON Schema's integer 50, and the OpenAPI document says integer).
fn whole_number(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0)
            .map(|f| f as i64)
    })
}

/// `amount`: a decimal string (`"50.00"`) or, for seed compatibility, a whole JSON number (`50`, or `50.0`: JSON
/// Schema's integers include it, and the OpenAPI document says integer).
fn amount(body: &Map<String, Value>) -> Result<Usdc, ApiError> {
    let parsed = match body.get("amount") {
        None | Some(Value::Null) => return Err(ApiError::field("amount", "is required")),
        Some(Value::String(s)) => s
            .parse::<Usdc>()
            .map_err(|e| ApiError::field("amount", e.to_string()))?,
        Some(Value::Number(n)) => match whole_number(n)
            .filter(|v| *v >= 0)
            .and_then(|v| v.checked_mul(1_000_000))
        {
            Some(atomic) => Usdc(atomic),
            None => {
                return Err(ApiError::field(
                    "amount",
                    "must be a decimal string such as \"50.00\" (or a whole number)",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::field(
                "amount",
                "must be a decimal string such as \"50.00\"",
            ));
        }
    };
    Ok(parsed)
}

async fn plans(State(state): State<AppState>) -> Response {
    match state.billing.catalog().await {
        Ok(catalog) => ([(header::CACHE_CONTROL, "no-store")], Json(catalog)).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// Any other `/v1/*` request: 402 with the catalog unless it carries a valid key; with one, the path is not served.
async fn v1(
    State(state): State<AppState>,
    checked: Option<axum::Extension<crate::billing::AuthorizedKey>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::keys::from_bearer)
        .map(str::to_string);
    if let Some(key) = presented {
        // The limits middleware may have checked the key already.
        let authorized = match checked {
            Some(axum::Extension(key)) => Ok(Some(key)),
            None => state.billing.authorize(&key).await,
        };
        match authorized {
            Ok(Some(_)) => {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": {
                        "message": format!("`{}` is not served here; this gateway serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and /v1/messages, GET /v1/models and GET /v1/usage", uri.path()),
                        "type": "invalid_request_error",
                        "param": null,
                        "code": "unknown_endpoint",
                    }})),
                )
                    .into_response();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "key lookup failed");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"error": {"message": "internal error", "type": "server_error", "param": null, "code": null}})),
                )
                    .into_response();
            }
        }
    }
    payment_required_with(&state, &headers, None).await
}

/// 402 with the live catalog (`Cache-Control: no-store`); `message` replaces the catalog's generic message.
/// With `[x402]`, also `PAYMENT-REQUIRED` for the minimum credit top-up (resource URL from `server.public_url`;
/// use [`payment_required_with`] to fall back to the request's `Host`).
pub async fn payment_required(state: &AppState, message: Option<String>) -> Response {
    payment_required_with(state, &HeaderMap::new(), message).await
}

/// [`payment_required`], naming x402 resources after the request's `Host` when `server.public_url` is not set.
pub async fn payment_required_with(
    state: &AppState,
    headers: &HeaderMap,
    message: Option<String>,
) -> Response {
    match state.billing.catalog().await {
        Ok(mut catalog) => {
            if let Some(message) = message {
                catalog["message"] = json!(message);
            }
            let mut response = (
                StatusCode::PAYMENT_REQUIRED,
                [(header::CACHE_CONTROL, "no-store")],
                Json(catalog),
            )
                .into_response();
            // Standard x402 clients: the minimum credit top-up at /x402/credits/{min}.
            if let Some(v) = super::x402::v1_challenge_header(state, headers) {
                let h = response.headers_mut();
                h.insert(crate::x402::header::PAYMENT_REQUIRED, v);
                h.insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static(super::x402::EXPOSE_HEADERS),
                );
            }
            response
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// The optional `network` of a claim: a configured network's CAIP-2 id (`eip155:8453`) or preset name (`base`),
/// answered as its CAIP-2 id; the first network when absent.
fn network(state: &AppState, body: &Map<String, Value>) -> Result<String, ApiError> {
    let settings = state.billing.settings();
    match body.get("network") {
        None | Some(Value::Null) => Ok(settings.chain.network.caip2()),
        Some(Value::String(name)) => settings
            .network(name)
            .map(|n| n.network.caip2())
            .or_else(|| settings.svm_network(name).map(|n| n.caip2.clone()))
            .ok_or_else(|| {
                ApiError::field(
                    "network",
                    format!(
                        "`{name}` is not a network this gateway accepts payments on (one of: {})",
                        settings
                            .networks()
                            .map(|n| n.network.caip2())
                            .chain(settings.svm_networks.iter().map(|n| n.caip2.clone()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }),
        Some(_) => Err(ApiError::field(
            "network",
            "must be a string: a CAIP-2 network id such as \"eip155:8453\"",
        )),
    }
}

async fn subscribe_pool(State(state): State<AppState>, JsonObject(body): JsonObject) -> Response {
    let parse = || -> Result<ClaimRequest, ApiError> {
        only_fields(
            &body,
            &["txHash", "poolSlug", "blocks", "signature", "network"],
        )?;
        let network = network(&state, &body)?;
        let tx_hash = claim_tx(&network, &body)?;
        let slug = required_string(&body, "poolSlug")?;
        let pool = state
            .billing
            .pool(slug)
            .ok_or_else(|| ApiError::field("poolSlug", format!("unknown pool `{slug}`")))?;
        let names = match body.get("blocks") {
            None | Some(Value::Null) => return Err(ApiError::field("blocks", "is required")),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(ApiError::field("blocks", "must be an array of block names")),
        };
        if names.is_empty() {
            return Err(ApiError::field("blocks", "must name at least one block"));
        }
        let mut blocks: Vec<String> = Vec::with_capacity(names.len());
        for item in names {
            let Value::String(name) = item else {
                return Err(ApiError::field(
                    "blocks",
                    "must be an array of block names (strings)",
                ));
            };
            if pool.block(name).is_none() {
                let known: Vec<&str> = pool.blocks.iter().map(|b| b.name.as_str()).collect();
                return Err(ApiError::field(
                    "blocks",
                    format!(
                        "pool `{slug}` has no block `{name}` (blocks: {})",
                        known.join(", ")
                    ),
                ));
            }
            if blocks.contains(name) {
                return Err(ApiError::field(
                    "blocks",
                    format!("block `{name}` is named twice"),
                ));
            }
            blocks.push(name.clone());
        }
        let signature = claim_signature(&network, &body)?;
        Ok(ClaimRequest {
            network,
            tx_hash,
            product: Product::Pool {
                slug: slug.to_string(),
                blocks,
            },
            signature,
        })
    };
    let req = match parse() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    claim(state, req, "subscribe-pool").await
}

async fn topup(State(state): State<AppState>, JsonObject(body): JsonObject) -> Response {
    let parse = || -> Result<ClaimRequest, ApiError> {
        only_fields(&body, &["txHash", "amount", "signature", "network"])?;
        let network = network(&state, &body)?;
        let tx_hash = claim_tx(&network, &body)?;
        let amount = amount(&body)?;
        let min = state.billing.settings().credits.min_topup;
        if amount < min {
            return Err(ApiError::field(
                "amount",
                format!("the minimum top-up is {min} USDC"),
            ));
        }
        let signature = claim_signature(&network, &body)?;
        Ok(ClaimRequest {
            network,
            tx_hash,
            product: Product::Topup { amount },
            signature,
        })
    };
    let req = match parse() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    claim(state, req, "topup").await
}

async fn claim(state: AppState, req: ClaimRequest, route: &'static str) -> Response {
    match state.billing.claim(req).await {
        Ok(claimed) => {
            crate::metrics::record_claim(route, "ok");
            success(super::x402::claimed_data(claimed))
        }
        Err(e) => {
            let err = claim_error(e);
            crate::metrics::record_claim(route, err.code);
            err.into_response()
        }
    }
}

fn claim_error(e: ClaimError) -> ApiError {
    let message = e.to_string();
    match e {
        ClaimError::InvalidField { field, message } => ApiError::field(field, message),
        ClaimError::SignatureRequired { text } => {
            ApiError::new(StatusCode::UNAUTHORIZED, "signature_required", message).with("messageToSign", text)
        }
        ClaimError::BadSignature(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", message),
        ClaimError::NotIndexed { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_indexed", message)
            .with(
                "hint",
                "if the transaction was just sent, wait for it to be mined and retry; it must transfer USDC to payTo \
                 on this chain",
            )
            .retry_after(5),
        ClaimError::Pending { confirmations, required } => {
            ApiError::new(StatusCode::ACCEPTED, "pending", message)
                .with("confirmations", confirmations)
                .with("required", required)
                .retry_after((required - confirmations).clamp(1, 30) * 2)
        }
        ClaimError::PendingCommitment { commitment } => {
            ApiError::new(StatusCode::ACCEPTED, "pending", message)
                .with("commitment", commitment)
                .retry_after(5)
        }
        ClaimError::Orphaned => ApiError::new(StatusCode::GONE, "payment_orphaned", message),
        ClaimError::MultiplePayers(_) => ApiError::new(StatusCode::CONFLICT, "multiple_payers", message),
        ClaimError::AlreadyClaimed(record) => {
            ApiError::new(StatusCode::CONFLICT, "already_claimed", message).with("claimed", json!(record))
        }
        ClaimError::SoldOut { pool, block } => {
            ApiError::new(StatusCode::CONFLICT, "sold_out", message).with("pool", pool).with("block", block)
        }
        ClaimError::Underpaid { paid, price, shortfall } => {
            ApiError::new(StatusCode::PAYMENT_REQUIRED, "underpaid", message)
                .with("paidUsdc", json!(paid))
                .with("priceUsdc", json!(price))
                .with("shortfallUsdc", json!(shortfall))
        }
        ClaimError::PaymentChanged => {
            ApiError::new(StatusCode::CONFLICT, "payment_changed", message).retry_after(2)
        }
        ClaimError::Rpc(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "rpc_unavailable", message).retry_after(5)
        }
        ClaimError::Store(e) => ApiError::internal(e),
        ClaimError::KeyGen(e) => ApiError::internal(e),
    }
}

async fn rotate(State(state): State<AppState>, JsonObject(body): JsonObject) -> Response {
    let parse = || -> Result<RotateRequest, ApiError> {
        only_fields(&body, &["address", "signedAt", "signature", "keyId"])?;
        let address = required_string(&body, "address")?;
        let address = match address.strip_prefix("0x") {
            Some(hex) if hex.len() == 40 && is_hex(hex) => address
                .to_ascii_lowercase()
                .parse()
                .map_err(|_| ApiError::field("address", "must be 0x followed by 40 hex digits"))?,
            _ => {
                return Err(ApiError::field(
                    "address",
                    "must be 0x followed by 40 hex digits",
                ));
            }
        };
        let signed_at = match body.get("signedAt") {
            Some(Value::Number(n)) => whole_number(n)
                .ok_or_else(|| ApiError::field("signedAt", "must be unix seconds"))?,
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| ApiError::field("signedAt", "must be unix seconds"))?,
            None | Some(Value::Null) => return Err(ApiError::field("signedAt", "is required")),
            Some(_) => return Err(ApiError::field("signedAt", "must be unix seconds")),
        };
        let signature =
            signature(&body)?.ok_or_else(|| ApiError::field("signature", "is required"))?;
        let key_id = string_field(&body, "keyId")?.map(str::to_string);
        Ok(RotateRequest {
            address,
            signed_at,
            signature,
            key_id,
        })
    };
    let req = match parse() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match state.billing.rotate(req).await {
        Ok(keys) => success(json!({"keys": keys})),
        Err(e) => {
            let message = e.to_string();
            let err = match e {
                RotateError::InvalidField { field, message } => ApiError::field(field, message),
                RotateError::Expired { .. } => {
                    ApiError::new(StatusCode::UNAUTHORIZED, "signature_expired", message)
                }
                RotateError::BadSignature(_) => {
                    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", message)
                }
                RotateError::Replayed => {
                    ApiError::new(StatusCode::UNAUTHORIZED, "signature_replayed", message)
                }
                RotateError::UnknownAccount(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "unknown_account", message)
                }
                RotateError::UnknownKey(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "unknown_key", message)
                }
                RotateError::NothingToRotate => {
                    ApiError::new(StatusCode::NOT_FOUND, "no_live_keys", message)
                }
                RotateError::Rpc(_) => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "rpc_unavailable", message)
                        .retry_after(5)
                }
                RotateError::Store(e) => ApiError::internal(e),
                RotateError::KeyGen(e) => ApiError::internal(e),
            };
            err.into_response()
        }
    }
}
