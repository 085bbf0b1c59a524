//! Standard x402 payments over HTTP: buying credits or a pool subscription with a `PAYMENT-SIGNATURE` (v2) or
//! `X-PAYMENT` (v1) header, the `PAYMENT-REQUIRED` challenge of the keyless `/v1/*` 402, and the payment half of
//! per-request x402 on `/v1/chat/completions` (called by the proxy).
//!
//! | path | buys |
//! |---|---|
//! | `POST /x402/credits/{amount}` | `amount` USDC of credits (a decimal such as `10` or `25.50`, ≥ `credits.min_topup_usdc`) |
//! | `POST /x402/pools/{slug}?blocks=asia,europe` | a subscription to the named blocks of a pool (price = their sum) |
//!
//! Unpaid (or an unreadable header): 402 with `PAYMENT-REQUIRED` (base64 of the v2 `PaymentRequired`), and a JSON
//! body that is both the legacy v1 402 body (`x402Version: 1`, `accepts`, `error`) and readable by an agent
//! (`paymentRequired`: the v2 object, `reason`, `product`). A refused payment: the same 402 plus `PAYMENT-RESPONSE`
//! `{success: false, errorReason}` (`X-PAYMENT-RESPONSE` for v1 clients). Paid: 200 with the seed's
//! `{success: true, data}` shapes and `PAYMENT-RESPONSE` `{success: true, transaction, network, payer}`.
//!
//! The `payment-identifier` extension makes a purchase idempotent: the same id with the same payload gets the
//! stored answer again; the same id with another payload gets 409.

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower_http::cors::{Any, CorsLayer};

use super::AppState;
use super::exact::usdc_number;
use crate::billing::{ClaimError, Claimed, Product, SettledPayment, X402Record, rfc3339};
use crate::usdc::Usdc;
use crate::x402::header::{self as xh, HeaderError};
use crate::x402::{
    AnyPaymentPayload, PaymentError, PaymentRequired, Reservation, ResourceInfo, Settlement, X402,
    failure_response, requirements,
};

mod svm;

/// Headers a browser client must be allowed to read.
pub const EXPOSE_HEADERS: &str = "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE";

/// The `payment-identifier` extension's key.
pub const PAYMENT_IDENTIFIER: &str = "payment-identifier";

pub fn router() -> Router<AppState> {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("payment-signature"),
            HeaderName::from_static("x-payment"),
        ])
        .expose_headers([
            HeaderName::from_static("payment-required"),
            HeaderName::from_static("payment-response"),
            HeaderName::from_static("x-payment-response"),
        ]);
    Router::new()
        .route(
            "/x402/credits/{amount}",
            post(buy_credits).get(challenge_credits),
        )
        .route("/x402/pools/{slug}", post(buy_pool).get(challenge_pool))
        .layer(cors)
}

/// Middleware: a 402 that carries no `PAYMENT-REQUIRED` (an underpaid claim, any other refusal) gets the minimum
/// credit top-up's, so every 402 of an x402 gateway is a standard challenge. Without `[x402]`, nothing changes.
pub async fn ensure_challenge(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers().clone();
    let mut response = next.run(request).await;
    if response.status() == StatusCode::PAYMENT_REQUIRED
        && !response.headers().contains_key(xh::PAYMENT_REQUIRED)
        && let Some(v) = v1_challenge_header(&state, &headers)
    {
        let h = response.headers_mut();
        h.insert(xh::PAYMENT_REQUIRED, v);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
    response
}

/// A GET of a purchase URL (what discovery crawlers and GET-only checkers send): the same 402 as an unpaid POST.
/// It never pays: a GET carrying a payment is told to POST it.
fn get_with_payment(headers: &HeaderMap) -> Option<Response> {
    if !headers.contains_key(xh::PAYMENT_SIGNATURE) && !headers.contains_key(xh::X_PAYMENT) {
        return None;
    }
    let mut answer = Answer::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "a payment is taken on POST only: send the same PAYMENT-SIGNATURE with POST",
    )
    .header("Allow", "POST");
    answer.final_answer = false;
    Some(answer.into_response())
}

async fn challenge_credits(
    state: State<AppState>,
    amount: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    match get_with_payment(&headers) {
        Some(refused) => refused,
        None => buy_credits(state, amount, headers).await,
    }
}

async fn challenge_pool(
    state: State<AppState>,
    slug: Result<Path<String>, PathRejection>,
    query: Result<Query<PoolQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    match get_with_payment(&headers) {
        Some(refused) => refused,
        None => buy_pool(state, slug, query, headers).await,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Answers: built as data first, so an idempotent answer can be stored and replayed byte for byte.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
    /// Whether the same payment must get this answer again: only when money moved (it settled). Refusals, outages
    /// and concurrent duplicates are not stored: they changed nothing, a retry is verified afresh, and unpaid
    /// requests cannot grow the table.
    #[serde(skip)]
    final_answer: bool,
}

impl Answer {
    fn new(status: StatusCode, body: Value) -> Answer {
        Answer {
            status: status.as_u16(),
            headers: Vec::new(),
            body,
            final_answer: true,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Answer {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Answer {
        Answer::new(
            status,
            json!({"success": false, "error": {"code": code, "message": message.into()}}),
        )
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Exact numbers (a top-up's `newBalance`) stay exact, in stored answers replayed too.
        let mut response = (status, super::exact::ExactJsonBody(self.body)).into_response();
        let h = response.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                h.insert(k, v);
            }
        }
        response
    }
}

/// The base URL resources are named under: `public_url`, else `http://{Host}`.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.settings.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// The v2 offer of `price` for the resource at `path_and_query`: one `exact` entry per network, the first
/// network's first.
fn offer(
    state: &AppState,
    headers: &HeaderMap,
    path_and_query: &str,
    price: Usdc,
    description: String,
    bazaar: Value,
) -> Result<PaymentRequired, Answer> {
    let max_timeout = state
        .settings
        .x402
        .as_ref()
        .map_or(300, |x| x.max_timeout_seconds);
    let mut accepts = Vec::with_capacity(state.x402_networks.len());
    for engine in &state.x402_networks {
        let network = engine.network();
        let pay_to = state
            .settings
            .network(&network.caip2())
            .map_or(state.settings.chain.pay_to, |n| n.pay_to);
        let mut req = requirements::exact_requirements(network, pay_to, price, max_timeout)
            .map_err(|e| Answer::error(StatusCode::BAD_REQUEST, "invalid_amount", e.to_string()))?;
        // Another token than USDC: the price in its own units at its configured USD price, rounded up. A price
        // that does not fit a settlement's 64-bit amount in that token is not offered in it.
        if let Some(token) = state.x402_token(engine)
            && (token.usd_micro_per_token != 1_000_000 || token.decimals != 6)
        {
            let amount = token.from_usd(price);
            if amount > alloy::primitives::U256::from(i64::MAX as u64) {
                continue;
            }
            req.amount = amount;
        }
        accepts.push(req);
    }
    let mut required = requirements::payment_required(
        ResourceInfo {
            url: format!("{}{path_and_query}", base_url(state, headers)),
            description: Some(description),
            mime_type: Some("application/json".into()),
        },
        accepts,
        None,
    );
    required.svm_accepts = svm::accepts(state, price, max_timeout);
    // Discovery (x402 `bazaar` extension): how to call the resource, for facilitators that catalogue it.
    let mut extensions = serde_json::Map::new();
    extensions.insert(super::bazaar::KEY.into(), bazaar);
    required.extensions = Some(extensions);
    Ok(required)
}

/// 402: `PAYMENT-REQUIRED` and the combined v1/agent body. `reason` = (code, message) when a payment was refused.
fn challenge(offered: &PaymentRequired, reason: Option<(&str, String)>, product: &Value) -> Answer {
    let mut required = offered.clone();
    let message = reason
        .as_ref()
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| "payment required".to_string());
    required.error = Some(message.clone());
    let v1 = requirements::payment_required_v1(&required);
    let body = json!({
        "x402Version": 1,
        "error": message,
        "accepts": v1.accepts,
        "success": false,
        "reason": reason.as_ref().map_or("payment_required", |(c, _)| *c),
        "paymentRequired": required,
        "product": product,
        "howToPay": "sign an EIP-3009 transferWithAuthorization of `amount` to `payTo` (x402 `exact` scheme, \
                     EIP-712 domain in `extra`) and repeat this request with the PAYMENT-SIGNATURE header",
    });
    Answer::new(StatusCode::PAYMENT_REQUIRED, body)
        .header(xh::PAYMENT_REQUIRED, xh::encode(&required))
}

/// The `PAYMENT-REQUIRED` value of the keyless `/v1/*` 402: the minimum credit top-up at
/// `/x402/credits/{min}`. `None` when x402 is not configured.
pub fn v1_challenge_header(state: &AppState, headers: &HeaderMap) -> Option<HeaderValue> {
    if !state.x402_enabled() {
        return None;
    }
    let min = state.settings.credits.min_topup;
    let offered = offer(
        state,
        headers,
        &format!("/x402/credits/{min}"),
        min,
        format!("{min} USDC of credits for /v1/* (the minimum top-up); buys an API key"),
        super::bazaar::credits(),
    )
    .ok()?;
    let mut required = offered;
    required.error = Some("an API key or an x402 payment is required".into());
    HeaderValue::from_str(&xh::encode(&required)).ok()
}

// ---------------------------------------------------------------------------------------------------------------
// The payment in a request.

struct Presented {
    payload: AnyPaymentPayload,
    /// Sent as `X-PAYMENT` (v1): answer with `X-PAYMENT-RESPONSE`.
    legacy_header: bool,
}

impl Presented {
    fn response_header(&self) -> &'static str {
        if self.legacy_header {
            xh::X_PAYMENT_RESPONSE
        } else {
            xh::PAYMENT_RESPONSE
        }
    }
}

/// The payment header, if any: `Ok(None)` = none sent; `Err` = sent but unreadable (answer a fresh 402).
fn presented(headers: &HeaderMap) -> Result<Option<Presented>, HeaderError> {
    let (raw, legacy_header) = match (
        headers.get(xh::PAYMENT_SIGNATURE),
        headers.get(xh::X_PAYMENT),
    ) {
        (Some(v), _) => (v, false),
        (None, Some(v)) => (v, true),
        (None, None) => return Ok(None),
    };
    let text = raw
        .to_str()
        .map_err(|_| HeaderError::Base64("not ASCII".into()))?;
    Ok(Some(Presented {
        payload: xh::decode_payment(text)?,
        legacy_header,
    }))
}

/// The `payment-identifier` id of a v2 payment: `Ok(None)` when absent; `Err` when malformed.
fn payment_identifier(payload: &AnyPaymentPayload) -> Result<Option<String>, String> {
    let AnyPaymentPayload::V2(p) = payload else {
        return Ok(None);
    };
    let Some(ext) = p
        .extensions
        .as_ref()
        .and_then(|e| e.get(PAYMENT_IDENTIFIER))
    else {
        return Ok(None);
    };
    let id = ext
        .get("info")
        .and_then(|i| i.get("id"))
        .or_else(|| ext.get("id"))
        .and_then(Value::as_str)
        .ok_or("extensions.payment-identifier.info.id is missing")?;
    if !(16..=128).contains(&id.len())
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err("payment-identifier id must be 16-128 characters of [A-Za-z0-9_-]".into());
    }
    Ok(Some(id.to_string()))
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    alloy::hex::encode(h.finalize())
}

/// XOR with a SHA-256 counter-mode keystream keyed by the id (symmetric: encrypts and decrypts).
fn seal(id: &str, data: &[u8]) -> Vec<u8> {
    let key = Sha256::new()
        .chain_update(b"x402-gateway payment-identifier answer v1\0")
        .chain_update(id.as_bytes())
        .finalize();
    data.chunks(32)
        .enumerate()
        .flat_map(|(i, chunk)| {
            let block = Sha256::new()
                .chain_update(key)
                .chain_update((i as u64).to_be_bytes())
                .finalize();
            chunk
                .iter()
                .zip(block)
                .map(|(a, b)| a ^ b)
                .collect::<Vec<u8>>()
        })
        .collect()
}

enum Stored {
    None,
    Replay(Answer),
    Conflict,
}

async fn stored_answer(state: &AppState, id: &str, payload_hash: &str) -> Result<Stored, Answer> {
    let id_hash = sha256_hex(&[id.as_bytes()]);
    let found = state
        .store
        .x402_idempotent_answer(id_hash)
        .await
        .map_err(internal)?;
    Ok(match found {
        None => Stored::None,
        Some((hash, _)) if hash != payload_hash => Stored::Conflict,
        Some((_, sealed)) => match serde_json::from_slice::<Answer>(&seal(id, &sealed)) {
            Ok(a) => Stored::Replay(a),
            Err(_) => Stored::None,
        },
    })
}

async fn store_answer(state: &AppState, id: &str, payload_hash: String, answer: &Answer) {
    let id_hash = sha256_hex(&[id.as_bytes()]);
    let sealed = seal(id, &serde_json::to_vec(answer).unwrap_or_default());
    let now = state.billing.now();
    let result = state
        .store
        .x402_store_idempotent_answer(id_hash, payload_hash, sealed, now)
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "storing a payment-identifier answer failed");
    }
}

fn internal(e: impl std::fmt::Display) -> Answer {
    tracing::error!(error = %e, "x402 request failed");
    let mut a = Answer::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; try again later",
    );
    a.final_answer = false;
    a
}

// ---------------------------------------------------------------------------------------------------------------
// Purchases.

async fn buy_credits(
    State(state): State<AppState>,
    amount: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    // A segment that is not UTF-8 is no amount either: the same answer as any unparsable one.
    let amount = amount.map(|Path(a)| a).unwrap_or_default();
    let min = state.settings.credits.min_topup;
    let amount = match amount.parse::<Usdc>() {
        Ok(a) if a >= min => a,
        Ok(_) => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("amount: the minimum top-up is {min} USDC"),
            )
            .into_response();
        }
        Err(e) => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("amount: {e} (use a decimal such as 10 or 25.50)"),
            )
            .into_response();
        }
    };
    let product = json!({"type": "credits", "amountUsdc": amount});
    purchase(
        state,
        headers,
        format!("/x402/credits/{amount}"),
        Product::Topup { amount },
        amount,
        format!("{amount} USDC of prepaid credits (API key on the first top-up)"),
        product,
    )
    .await
}

#[derive(Debug, Deserialize)]
struct PoolQuery {
    blocks: Option<String>,
}

async fn buy_pool(
    State(state): State<AppState>,
    slug: Result<Path<String>, PathRejection>,
    query: Result<Query<PoolQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let bad =
        |m: String| Answer::error(StatusCode::BAD_REQUEST, "invalid_field", m).into_response();
    // A slug that is not UTF-8 names no pool; a query that does not parse (`blocks` twice) is a bad field.
    let slug = slug.map(|Path(s)| s).unwrap_or_default();
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad(format!("blocks: {}", e.body_text())),
    };
    let Some(pool) = state.billing.pool(&slug).cloned() else {
        return Answer::error(
            StatusCode::NOT_FOUND,
            "unknown_pool",
            format!("poolSlug: unknown pool `{slug}`"),
        )
        .into_response();
    };
    let raw = q.blocks.unwrap_or_default();
    let mut blocks: Vec<String> = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if pool.block(name).is_none() {
            let known: Vec<&str> = pool.blocks.iter().map(|b| b.name.as_str()).collect();
            return bad(format!(
                "blocks: pool `{slug}` has no block `{name}` (blocks: {})",
                known.join(", ")
            ));
        }
        if blocks.iter().any(|b| b == name) {
            return bad(format!("blocks: block `{name}` is named twice"));
        }
        blocks.push(name.to_string());
    }
    if blocks.is_empty() {
        return bad("blocks: name at least one block, e.g. ?blocks=asia,europe".into());
    }
    let price = Usdc(
        blocks
            .iter()
            .filter_map(|b| pool.block(b))
            .map(|b| b.price.0)
            .sum(),
    );
    // Sold out: refuse before any money moves.
    match state.billing.seats_left(&slug, &blocks).await {
        Ok(Some(block)) => {
            return Answer::error(
                StatusCode::CONFLICT,
                "sold_out",
                format!("block `{block}` of pool `{slug}` is sold out"),
            )
            .into_response();
        }
        Ok(None) => {}
        Err(e) => return internal(e).into_response(),
    }
    let product = json!({"type": "subscription", "pool": slug, "blocks": blocks, "amountUsdc": price,
                         "durationDays": pool.duration_days});
    let path = format!("/x402/pools/{slug}?blocks={}", blocks.join(","));
    purchase(
        state,
        headers,
        path,
        Product::Pool {
            slug: slug.clone(),
            blocks: blocks.clone(),
        },
        price,
        format!(
            "pool `{slug}` ({}) blocks {} for {} days",
            pool.name,
            blocks.join(","),
            pool.duration_days
        ),
        product,
    )
    .await
}

async fn purchase(
    state: AppState,
    headers: HeaderMap,
    path: String,
    product: Product,
    price: Usdc,
    description: String,
    product_view: Value,
) -> Response {
    if !state.x402_enabled() {
        return Answer::error(
            StatusCode::NOT_FOUND,
            "x402_disabled",
            "standard x402 payments are not enabled on this gateway (no [x402] section); pay to payTo and claim \
             by txHash at /api/agent/*",
        )
        .into_response();
    };
    let bazaar = match &product {
        Product::Pool { blocks, .. } => super::bazaar::pool(blocks),
        _ => super::bazaar::credits(),
    };
    let offered = match offer(&state, &headers, &path, price, description, bazaar) {
        Ok(o) => o,
        Err(a) => return a.into_response(),
    };
    // A payment on a Solana network (its own payload shape: a partially signed transaction).
    match svm::presented(&headers) {
        Some(Ok(payment)) => {
            return svm::pay_and_redeem(&state, payment, &offered, product, &product_view)
                .await
                .into_response();
        }
        Some(Err(message)) => {
            return challenge(&offered, Some(("invalid_payload", message)), &product_view)
                .into_response();
        }
        None => {}
    }
    let presented = match presented(&headers) {
        Ok(Some(p)) => p,
        Ok(None) => return challenge(&offered, None, &product_view).into_response(),
        Err(e) => {
            return challenge(
                &offered,
                Some((e.code(), format!("the payment header is unreadable: {e}"))),
                &product_view,
            )
            .into_response();
        }
    };
    let idempotency = match payment_identifier(&presented.payload) {
        Ok(id) => id.map(|id| {
            let hash =
                sha256_hex(
                    &[&serde_json::to_vec(&presented.payload.to_json()).unwrap_or_default()],
                );
            (id, hash)
        }),
        Err(m) => {
            return challenge(
                &offered,
                Some(("invalid_payment_identifier", m)),
                &product_view,
            )
            .into_response();
        }
    };
    if let Some((id, hash)) = &idempotency {
        match stored_answer(&state, id, hash).await {
            Ok(Stored::Replay(a)) => return a.into_response(),
            Ok(Stored::Conflict) => {
                return Answer::error(
                    StatusCode::CONFLICT,
                    "payment_identifier_conflict",
                    "this payment-identifier was already used with a different payment",
                )
                .into_response();
            }
            Ok(Stored::None) => {}
            Err(a) => return a.into_response(),
        }
    }
    let answer = pay_and_redeem(&state, presented, &offered, product, &product_view).await;
    if let Some((id, hash)) = idempotency
        && answer.final_answer
    {
        store_answer(&state, &id, hash, &answer).await;
    }
    answer.into_response()
}

/// What a settled payment is recorded as.
fn record_of(reservation: &Reservation) -> X402Record {
    let req = reservation.request();
    let exact = req.payload.exact();
    X402Record {
        x402_version: req.payload.x402_version(),
        nonce: format!("{:#x}", exact.authorization.nonce),
        authorization: serde_json::to_string(&exact.authorization).unwrap_or_default(),
        signature: exact.signature.to_string(),
        requirements: serde_json::to_string(&req.requirements).unwrap_or_default(),
        resource: req.resource.url.clone(),
    }
}

/// The answer for a refused or failed payment.
fn payment_failed(
    offered: &PaymentRequired,
    err: &PaymentError,
    response_header: &str,
    payer: Option<alloy::primitives::Address>,
    product_view: &Value,
    network: &str,
) -> Answer {
    let settle = xh::encode(&failure_response(err, network, payer));
    match err {
        PaymentError::Rejected(reason) => {
            let mut a = challenge(
                offered,
                Some((reason.code(), reason.to_string())),
                product_view,
            )
            .header(response_header, settle);
            // Nothing moved: not an answer to keep (a concurrent duplicate's own settlement is the one kept).
            a.final_answer = false;
            a
        }
        PaymentError::Unavailable { .. } => {
            let mut a = Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                err.code(),
                format!("{err}; nothing was charged, retry the same request"),
            )
            .header(response_header, settle)
            .header("Retry-After", "5");
            a.final_answer = false;
            a
        }
        PaymentError::OutcomeUnknown { tx, .. } => {
            let mut a = Answer::error(
                StatusCode::BAD_GATEWAY,
                err.code(),
                format!(
                    "{err}; if the transfer lands it is indexed like any payment and can be claimed by txHash at \
                     /api/agent/topup"
                ),
            )
            .header(response_header, settle);
            if let Some(tx) = tx {
                a.body["error"]["transaction"] = json!(format!("{tx:#x}"));
            }
            a.final_answer = false;
            a
        }
    }
}

/// The engine of the network a payment names; the first network's when it names none we know (that engine refuses
/// it with `invalid_network`, naming what it expected).
fn engine_for<'a>(state: &'a AppState, payload: &AnyPaymentPayload) -> Option<&'a X402> {
    let asset = payload.accepted().map(|a| a.asset);
    state
        .x402_for(payload.network(), asset)
        .or(state.x402_networks.first())
}

/// The ledger value (USD micro-units) of a settled `amount` of `token`: its amount at the token's price (`None`:
/// USDC as the ledger counts it).
fn settled_value(token: Option<&crate::config::Token>, amount: Usdc) -> Usdc {
    match token {
        Some(token) => token
            .to_usd(alloy::primitives::U256::from(amount.atomic().max(0) as u64))
            .map_or(amount, Usdc),
        None => amount,
    }
}

async fn pay_and_redeem(
    state: &AppState,
    presented: Presented,
    offered: &PaymentRequired,
    product: Product,
    product_view: &Value,
) -> Answer {
    let response_header = presented.response_header();
    let payer = presented.payload.exact().authorization.from;
    let Some(engine) = engine_for(state, &presented.payload) else {
        return Answer::error(
            StatusCode::NOT_FOUND,
            "x402_disabled",
            "standard x402 payments are not enabled on this gateway",
        );
    };
    let network = engine.network().caip2();
    let reservation = match engine.reserve(presented.payload, offered).await {
        Ok(r) => r,
        Err(e) => {
            return payment_failed(
                offered,
                &e,
                response_header,
                Some(payer),
                product_view,
                &network,
            );
        }
    };
    let record = record_of(&reservation);
    let settlement = match reservation.settle().await {
        Ok(s) => s,
        Err(e) => {
            return payment_failed(
                offered,
                &e,
                response_header,
                Some(payer),
                product_view,
                &network,
            );
        }
    };
    let ok_header = xh::encode(&settlement.response());
    let paid = SettledPayment {
        network,
        tx_hash: format!("{:#x}", settlement.transaction),
        payer: format!("{:#x}", settlement.payer),
        paid: settled_value(state.x402_token(engine).as_ref(), settlement.amount),
        product,
        record,
    };
    match state.billing.claim_settled(paid).await {
        Ok((claimed, fallback)) => redeemed(claimed, fallback, payment_view(&settlement))
            .header(response_header, ok_header),
        Err(e) => {
            // The money moved; the record did not. The transfer stays claimable by txHash.
            tracing::error!(error = %e, tx = %settlement.transaction, "settled x402 payment not recorded");
            let mut a = Answer::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "not_recorded",
                format!(
                    "the payment settled in {:#x} but could not be recorded ({}); claim it by txHash at \
                     /api/agent/topup once confirmed",
                    settlement.transaction,
                    match e {
                        ClaimError::Store(_) => "database error".to_string(),
                        other => other.to_string(),
                    }
                ),
            )
            .header(response_header, ok_header);
            a.final_answer = false;
            a
        }
    }
}

/// The answer to a settled and redeemed payment: 200 with the purchase (and `payment`), or 409 `sold_out` when a
/// subscription could not be sold any more and the payment became credits instead.
fn redeemed(claimed: Claimed, fallback: Option<ClaimError>, payment: Value) -> Answer {
    let mut data = claimed_data(claimed);
    data["payment"] = payment;
    match fallback {
        None => Answer::new(StatusCode::OK, json!({"success": true, "data": data})),
        Some(why) => Answer::new(
            StatusCode::CONFLICT,
            json!({"success": false, "error": {
                "code": "sold_out",
                "message": format!("{why}; the payment was credited to the payer instead"),
            }, "data": data}),
        ),
    }
}

fn payment_view(s: &Settlement) -> Value {
    json!({
        "transaction": format!("{:#x}", s.transaction),
        "network": s.network,
        "payer": format!("{:#x}", s.payer),
        "amountUsdc": s.amount,
    })
}

/// The seed's `data` of a claim (the same shapes as `/api/agent/subscribe-pool` and `/api/agent/topup`).
pub(crate) fn claimed_data(claimed: Claimed) -> Value {
    match claimed {
        Claimed::Subscription(s) => {
            let mut data = json!({
                "apiKey": s.api_key,
                "keyId": s.key_id,
                "pool": s.pool,
                "blocks": s.blocks,
                "amountUsdc": s.price,
                "paidUsdc": s.paid,
                "expiresAt": rfc3339(s.expires_at),
                "account": s.account,
            });
            if let Some(surplus) = s.surplus {
                data["surplus"] = json!({
                    "creditedUsdc": surplus.credited_usdc,
                    "newBalance": usdc_number(surplus.new_balance),
                    "newBalanceUsdc": surplus.new_balance,
                    "account": surplus.account,
                });
            }
            data
        }
        Claimed::Topup(t) => {
            let mut data = json!({
                "credited": true,
                "amountUsdc": t.amount,
                "paidUsdc": t.paid,
                // Seed 000: a JSON number (`"newBalance": 50`), written from the exact decimal; the same
                // amount as a decimal string for clients that keep money out of floats.
                "newBalance": usdc_number(t.new_balance),
                "newBalanceUsdc": t.new_balance,
                "account": t.account,
            });
            if let Some((key, id)) = t.api_key {
                data["apiKey"] = json!(key);
                data["keyId"] = json!(id);
            }
            if t.surplus > Usdc::ZERO {
                data["surplusUsdc"] = json!(t.surplus);
            }
            data
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-request payment (seed 002), for the proxy.

/// A verified per-request payment, held (not yet settled) while the proxy prepares the upstream call.
#[derive(Debug)]
pub struct PaidRequest {
    kind: Paid,
    response_header: &'static str,
    model: String,
    /// CAIP-2 id of the network the payment is settled on.
    network: String,
}

/// A per-request payment by network kind. One lives per paid request, so its size does not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Paid {
    Evm {
        reservation: Reservation,
        record: X402Record,
        /// The token it is paid in, with its USD price (`None`: USDC as the ledger counts it).
        token: Option<crate::config::Token>,
    },
    Svm(svm::PaidSvm),
}

/// The answer to send before the first streamed byte: the `PAYMENT-RESPONSE` header (name, value).
#[derive(Debug, Clone)]
pub struct SettledRequest {
    pub header_name: &'static str,
    pub header_value: HeaderValue,
}

/// The offer for one request to `model` at `price`, for the upto challenge (which adds its own offer to it).
pub(crate) fn per_request_required(
    state: &AppState,
    headers: &HeaderMap,
    api: crate::proxy::Api,
    model: &str,
    price: Usdc,
) -> Option<PaymentRequired> {
    if !state.x402_enabled() {
        return None;
    }
    per_request_offer(state, headers, api, model, price).ok()
}

/// The offer for one request to `model` at `price`.
fn per_request_offer(
    state: &AppState,
    headers: &HeaderMap,
    api: crate::proxy::Api,
    model: &str,
    price: Usdc,
) -> Result<PaymentRequired, Answer> {
    offer(
        state,
        headers,
        api.path(),
        price,
        format!(
            "one {} request to `{model}` ({price} USDC, its output capped to what the price covers)",
            api.name()
        ),
        super::bazaar::inference(api, model),
    )
}

/// The OpenAI-shaped error of a refused per-request payment (upto's too).
pub(crate) fn openai_error(status: StatusCode, code: &str, message: String) -> Value {
    let _ = status;
    json!({"error": {"message": message, "type": "payment_required", "param": null, "code": code}})
}

/// The 402 for a keyless, unpaid request to a per-request-priced `model`: `PAYMENT-REQUIRED` for that request.
pub fn per_request_challenge(
    state: &AppState,
    headers: &HeaderMap,
    api: crate::proxy::Api,
    model: &str,
    price: Usdc,
) -> Option<Response> {
    if !state.x402_enabled() {
        return None;
    }
    let offered = per_request_offer(state, headers, api, model, price).ok()?;
    Some(
        Answer::new(
            StatusCode::PAYMENT_REQUIRED,
            openai_error(
                StatusCode::PAYMENT_REQUIRED,
                "payment_required",
                format!("`{model}` costs {price} USDC per request: pay with PAYMENT-SIGNATURE, or use an API key"),
            ),
        )
        .header(xh::PAYMENT_REQUIRED, xh::encode(&offered))
        .into_response(),
    )
}

/// The payment half of per-request x402 on the inference routes (`/v1/chat/completions` and the others): `Ok(None)` when the request carries no payment
/// header (fall back to keys / the 402); `Ok(Some(paid))` when a payment for `price` verified and is reserved,
/// with `max_tokens` (and `max_completion_tokens`, if sent) in `body` capped to what the price covers at
/// `output_usdc_per_mtok`; `Err(response)` (402 + `PAYMENT-RESPONSE`, OpenAI error body) otherwise. Call
/// [`PaidRequest::settle`] once the upstream accepted the request and BEFORE streaming the first byte; dropping
/// the `PaidRequest` instead releases the authorization unsettled (nothing is charged).
pub async fn authorize_per_request(
    state: &AppState,
    headers: &HeaderMap,
    api: crate::proxy::Api,
    model: &str,
    price: Usdc,
) -> Result<Option<PaidRequest>, Response> {
    if !state.x402_enabled() {
        return Ok(None);
    }
    let offered =
        per_request_offer(state, headers, api, model, price).map_err(Answer::into_response)?;
    let unreadable = |message: String, code: &str| {
        Answer::new(
            StatusCode::PAYMENT_REQUIRED,
            openai_error(StatusCode::PAYMENT_REQUIRED, code, message),
        )
        .header(xh::PAYMENT_REQUIRED, xh::encode(&offered))
        .into_response()
    };
    // A payment on a Solana network: verified, held, co-signed and simulated now; sent by `settle`.
    if let Some(payment) = svm::presented(headers) {
        let payment = payment.map_err(|m| unreadable(m, "invalid_payload"))?;
        let network = payment
            .pointer("/accepted/network")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        return match svm::authorize(state, payment, &offered).await {
            Ok(paid) => Ok(Some(PaidRequest {
                kind: Paid::Svm(paid),
                response_header: xh::PAYMENT_RESPONSE,
                model: model.to_string(),
                network,
            })),
            Err((status, code, message, payer)) => {
                let failure = json!({"success": false, "errorReason": code, "network": network,
                                     "payer": payer, "transaction": ""});
                let mut a = Answer::new(status, openai_error(status, code, message))
                    .header(xh::PAYMENT_RESPONSE, xh::encode(&failure));
                if status == StatusCode::PAYMENT_REQUIRED {
                    a = a.header(xh::PAYMENT_REQUIRED, xh::encode(&offered));
                }
                Err(a.into_response())
            }
        };
    }
    let presented = match presented(headers) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(unreadable(
                format!("the payment header is unreadable: {e}"),
                e.code(),
            ));
        }
    };
    let response_header = presented.response_header();
    let payer = presented.payload.exact().authorization.from;
    let Some(engine) = engine_for(state, &presented.payload) else {
        return Ok(None);
    };
    let network = engine.network().caip2();
    match engine.reserve(presented.payload, &offered).await {
        // The request was bounded before the payment was looked at (`proxy::bound`: prompt bound + the output the
        // price buys after it, n = 1), so the price covers whatever the upstream may generate.
        Ok(reservation) => Ok(Some(PaidRequest {
            kind: Paid::Evm {
                record: record_of(&reservation),
                reservation,
                token: state.x402_token(engine),
            },
            response_header,
            model: model.to_string(),
            network,
        })),
        Err(e) => {
            let status = match e {
                PaymentError::Rejected(_) => StatusCode::PAYMENT_REQUIRED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut a = Answer::new(status, openai_error(status, e.code(), e.to_string())).header(
                response_header,
                xh::encode(&failure_response(&e, &network, Some(payer))),
            );
            if status == StatusCode::PAYMENT_REQUIRED {
                a = a.header(xh::PAYMENT_REQUIRED, xh::encode(&offered));
            }
            Err(a.into_response())
        }
    }
}

impl PaidRequest {
    /// Settles the payment and records it (a claim of its tx hash, top-up + debit in the ledger); returns the
    /// `PAYMENT-RESPONSE` header to send with the first byte. `Err` is the response to send instead (nothing is
    /// streamed).
    pub async fn settle(self, state: &AppState) -> Result<SettledRequest, Response> {
        let network = self.network.clone();
        let (reservation, record, token) = match self.kind {
            Paid::Evm {
                reservation,
                record,
                token,
            } => (reservation, record, token),
            Paid::Svm(paid) => {
                return match svm::settle(state, paid, &self.model).await {
                    Ok(value) => Ok(SettledRequest {
                        header_name: self.response_header,
                        header_value: HeaderValue::from_str(&value)
                            .unwrap_or_else(|_| HeaderValue::from_static("")),
                    }),
                    Err((status, code, message, payer)) => {
                        let failure = json!({"success": false, "errorReason": code, "network": network,
                                             "payer": payer, "transaction": ""});
                        Err(Answer::new(status, openai_error(status, code, message))
                            .header(self.response_header, xh::encode(&failure))
                            .into_response())
                    }
                };
            }
        };
        let payer = reservation.payer();
        let settlement = match reservation.settle().await {
            Ok(s) => s,
            Err(e) => {
                let status = match e {
                    PaymentError::Rejected(_) => StatusCode::PAYMENT_REQUIRED,
                    PaymentError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                    PaymentError::OutcomeUnknown { .. } => StatusCode::BAD_GATEWAY,
                };
                return Err(
                    Answer::new(status, openai_error(status, e.code(), e.to_string()))
                        .header(
                            self.response_header,
                            xh::encode(&failure_response(&e, &network, Some(payer))),
                        )
                        .into_response(),
                );
            }
        };
        // The ledger counts USD: a payment in another token is worth its amount at the token's price.
        let value = settled_value(token.as_ref(), settlement.amount);
        let paid = SettledPayment {
            network,
            tx_hash: format!("{:#x}", settlement.transaction),
            payer: format!("{:#x}", settlement.payer),
            paid: value,
            product: Product::Topup { amount: value },
            record,
        };
        if let Err(e) = state
            .billing
            .record_request_payment(paid, format!("x402 per-request: {}", self.model))
            .await
        {
            // Served anyway: it was paid. The transfer stays visible to auditors through the index.
            tracing::error!(error = %e, tx = %settlement.transaction, "per-request payment not recorded");
        }
        let value = HeaderValue::from_str(&xh::encode(&settlement.response()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Ok(SettledRequest {
            header_name: self.response_header,
            header_value: value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_depends_on_the_id() {
        let data = br#"{"status":200,"body":{"apiKey":"sk-abc"}}"#.repeat(3);
        let sealed = seal("id-aaaaaaaaaaaaaaaa", &data);
        assert_ne!(sealed, data);
        assert_eq!(seal("id-aaaaaaaaaaaaaaaa", &sealed), data);
        assert_ne!(seal("id-bbbbbbbbbbbbbbbb", &sealed), data);
    }
}
