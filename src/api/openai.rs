//! The inference routes — OpenAI's `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses` and Anthropic's `POST /v1/messages` — and `GET /v1/models`, `GET /v1/usage`.
//!
//! Every inference API takes the same path: key (or per-request payment), bound, reservation, routing to a
//! deployment, metering of the answer, settlement (`crate::proxy`). Every error is `{"error": {"message", "type",
//! "param", "code"}}` with all four keys — malformed JSON and wrong content types included — except on
//! `/v1/messages`, whose errors are Anthropic's `{"type": "error", "error": {"type", "message"}}`, and "pay first":
//! a request without a valid key (or an expired one) gets the seed's 402 catalog, the body agents read to buy
//! access. Keys are read from `Authorization: Bearer` or `x-api-key` (Anthropic's SDKs). Every response carries
//! `x-request-id`.

use std::time::Instant;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use crate::billing::AuthorizedKey;
use crate::billing::metering::ReserveError;
use crate::proxy::key_rates::{Admission as RateAdmission, KeyRate, RateHeaders};
use crate::proxy::pricing::Prices;
use crate::proxy::{
    self, Api, BoundError, Charge, Meter, MeteredStream, Payer, SendError, SlotOwner,
    UpstreamError, windows,
};
use crate::store::StoreError;
use crate::store::usage::NewUsage;

/// Largest accepted chat request body.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Largest non-streamed upstream response read into memory.
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(list_models))
        .route("/v1/usage", get(key_usage))
        // Another method on these routes: an OpenAI-shaped 405 (axum's own has no body).
        .method_not_allowed_fallback(wrong_method)
        // The chat route reads its body itself, so an oversized one gets an OpenAI-shaped 413.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Another method on one of these routes (or the `/v1` catch-alls, which serve GET and POST): 405 with `Allow`, in
/// the route's error shape — OpenAI's, Anthropic's on `/v1/messages` (axum's own 405 has no body).
pub(crate) async fn wrong_method(
    State(state): State<AppState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let api = Api::of_path(uri.path());
    // A keyless GET of a paid inference route (discovery crawlers, GET-only x402 checkers) on an x402 gateway:
    // the keyless 402 with its PAYMENT-REQUIRED, which names how to pay and that the route takes POST.
    if method == axum::http::Method::GET
        && api.is_some()
        && state.x402_enabled()
        && presented_key(&headers).is_none()
    {
        let message = format!(
            "{} takes POST; without an API key it answers 402: buy credits (PAYMENT-REQUIRED, or the catalog \
             below), or pay a per-request-priced model's request with PAYMENT-SIGNATURE",
            uri.path()
        );
        return super::agent::payment_required_with(&state, &headers, Some(message)).await;
    }
    let allowed = if api.is_some() {
        "POST"
    } else if matches!(uri.path(), "/v1/models" | "/v1/usage") {
        "GET"
    } else {
        "GET, POST"
    };
    let mut response = OpenAiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not served on {}; use {allowed}", uri.path()),
    )
    .into_response();
    if api == Some(Api::Messages) {
        response = anthropic_error(response).await;
    }
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    with_request_id(response, &new_request_id())
}

/// An OpenAI-shaped error.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl OpenAiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        OpenAiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        OpenAiError {
            param: Some(param),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                message,
            )
        }
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error on /v1");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal error",
        )
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

fn new_request_id() -> String {
    let bytes: [u8; 12] = rand::random();
    format!("req_{}", alloy::hex::encode(bytes))
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// The key behind `Authorization: Bearer`, or the response to send instead (402 catalog, or 500). `checked` is the
/// key the limits middleware already looked up (it does so to exempt key holders from the keyless limit).
async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    checked: Option<Extension<AuthorizedKey>>,
) -> Result<AuthorizedKey, Response> {
    if let Some(Extension(key)) = checked {
        return Ok(key);
    }
    let presented = presented_key(headers);
    let mut message = None;
    if let Some(key) = presented {
        match state.billing.authorize(key).await {
            Ok(Some(k)) => return Ok(k),
            Ok(None) => {}
            Err(e) => return Err(OpenAiError::internal(e).into_response()),
        }
        // A suspended key gets the same 402 (it cannot be used), with the reason and when it comes back.
        if let Ok(Some(k)) = state.billing.suspended_key(key).await {
            message = Some(format!(
                "key {} is suspended: the payment that bought it (transaction {}) left the canonical chain in a \
                 reorg. It works again, by itself, once that payment is confirmed on chain again.",
                k.public_id,
                k.suspended_by.unwrap_or_default()
            ));
        }
    }
    Err(super::agent::payment_required_with(state, headers, message).await)
}

/// The API key a request presents: `Authorization: Bearer` (OpenAI's SDKs), else `x-api-key` (Anthropic's).
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::keys::from_bearer)
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
}

/// Rewrites an error answer of `/v1/messages` into Anthropic's shape (`{"type": "error", "error": {"type",
/// "message"}}`), keeping its status and headers. The 402 catalog is left as it is: it is the body agents read to
/// pay, on every route (a refused payment's 402 is an error like the others).
async fn anthropic_error(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let catalog = status == StatusCode::PAYMENT_REQUIRED && !parsed["error"].is_object();
    if parsed["type"] == "error" || catalog {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let message = parsed["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let body =
        proxy::anthropic::error_body(proxy::anthropic::error_type(status.as_u16()), &message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body.to_string()))
}

pub(crate) fn price_of(model: &crate::config::Model) -> Prices {
    Prices {
        input_per_mtok: model.input_per_mtok,
        output_per_mtok: model.output_per_mtok,
    }
}

/// A handler serving one inference API through [`infer`] (one named function per route, as the route table and
/// its test read them).
macro_rules! inference_route {
    ($name:ident, $api:expr) => {
        async fn $name(
            state: State<AppState>,
            checked: Option<Extension<AuthorizedKey>>,
            headers: HeaderMap,
            body: Body,
        ) -> Response {
            infer($api, state, checked, headers, body).await
        }
    };
}

inference_route!(chat_completions, Api::Chat);
inference_route!(completions, Api::Completions);
inference_route!(embeddings, Api::Embeddings);
inference_route!(responses, Api::Responses);

/// Anthropic Messages: the same path, with Anthropic's error shape.
async fn messages(
    state: State<AppState>,
    checked: Option<Extension<AuthorizedKey>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    anthropic_error(infer(Api::Messages, state, checked, headers, body).await).await
}

async fn infer(
    api: Api,
    State(state): State<AppState>,
    checked: Option<Extension<AuthorizedKey>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let response = match read_body(&headers, body).await {
        Err(e) => e.into_response(),
        Ok(body) => {
            // The request runs in its own task, so a client that hangs up while the upstream works cannot cancel
            // the bill: a JSON answer is still read and settled from its usage, and a per-request payment is still
            // settled for the answer the upstream produced. (A stream's body is metered by `MeteredStream`.)
            let id = request_id.clone();
            let task = tokio::spawn(async move {
                match serve(api, &state, &headers, checked, body, started, &id).await {
                    Ok(r) => r,
                    Err(r) => r,
                }
            });
            match task.await {
                Ok(r) => r,
                Err(e) => {
                    OpenAiError::internal(format!("the request task failed: {e}")).into_response()
                }
            }
        }
    };
    with_request_id(response, &request_id)
}

/// The request body, refused as soon as its declared or actual size passes [`MAX_BODY_BYTES`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, OpenAiError> {
    let too_large = || {
        OpenAiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large())
}

async fn serve(
    api: Api,
    state: &AppState,
    headers: &HeaderMap,
    checked: Option<Extension<AuthorizedKey>>,
    body: Bytes,
    started: Instant,
    request_id: &str,
) -> Result<Response, Response> {
    let key = match authorize(state, headers, checked).await {
        Ok(key) => key,
        Err(catalog) => {
            return per_request(api, state, headers, body, started, request_id, catalog).await;
        }
    };
    let (object, model_id) = parse_request(headers, &body)?;
    let settings = state.settings.clone();
    let Some(model) = settings.model(&model_id) else {
        return Err(unknown_model(&model_id));
    };
    let record = &key.record;
    let now = state.billing.now();
    let prices = price_of(model);
    let new_usage = |prepared: &proxy::Prepared| NewUsage {
        request_id: request_id.to_string(),
        key_id: record.id,
        account: record.account.clone(),
        key_kind: if record.kind == "credit" {
            "credit"
        } else {
            "subscription"
        },
        model: model_id.clone(),
        stream: prepared.stream,
        started_at: now,
        bound_prompt_tokens: prepared.bound.prompt_tokens,
        bound_output_tokens: prepared.bound.output_tokens(),
        input_per_mtok: prices.input_per_mtok,
        output_per_mtok: prices.output_per_mtok,
    };
    let body_len = body.len();

    let mut admission: Option<RateAdmission> = None;
    let charged: Result<(proxy::Prepared, Charge), Response> = async {
    let (prepared, charge) = if record.kind == "subscription" {
        let pool = record.pool.as_deref().and_then(|slug| settings.pool(slug));
        let Some(pool) = pool else {
            return Err(OpenAiError::internal(format!(
                "key {} has no known pool",
                record.public_id
            ))
            .into_response());
        };
        if !pool.models.iter().any(|m| m == &model_id) {
            return Err(OpenAiError {
                param: Some("model"),
                ..OpenAiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "model_not_in_plan",
                    format!(
                        "this key's pool `{}` serves {}; not `{model_id}`",
                        pool.slug,
                        pool.models.join(", ")
                    ),
                )
            }
            .into_response());
        }
        let bought: Vec<&crate::config::Block> = record
            .blocks
            .iter()
            .flatten()
            .filter_map(|name| pool.block(name))
            .collect();
        let wins: Vec<windows::Window> = bought
            .iter()
            .map(|b| windows::Window {
                start_minute: b.start_minute,
                end_minute: b.end_minute,
            })
            .collect();
        if !windows::inside(now, &wins) {
            let wait = windows::seconds_until_open(now, &wins)
                .unwrap_or(3600)
                .max(1) as u64;
            let names: Vec<String> = bought
                .iter()
                .map(|b| format!("{} ({} UTC)", b.name, b.hours()))
                .collect();
            return Err(OpenAiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "outside_subscription_window",
                format!(
                    "this key works during {}; the next window opens in {wait} s",
                    names.join(", ")
                ),
            )
            .retry_after(wait)
            .into_response());
        }
        let prepared =
            proxy::prepare(api, object, body_len, model, &settings, Payer::Subscription)
                .map_err(|e| bound_refused(&model_id, e))?;
        admission = admit_rate(state, &model_id, record.id, pool.key_rate, &prepared, now)?;
        // One request at a time per subscription, whichever of its keys (a rotated one too) sends it.
        let owner = SlotOwner::Subscription(record.subscription_id.unwrap_or(-record.id));
        let slot = state
            .proxy
            .slots()
            .try_acquire(owner, 1, request_id, state.billing.now())
            .await
            .map_err(|e| OpenAiError::internal(e).into_response())?;
        let Some(slot) = slot else {
            crate::metrics::record_metering_refusal(&model_id, "in_flight");
            return Err(OpenAiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "concurrency_limit",
                "a pool subscription serves one request at a time; wait for the current one to finish",
            )
            .retry_after(1)
            .into_response());
        };
        let usage = new_usage(&prepared);
        (prepared, Charge::Subscription { usage, slot })
    } else {
        let prepared = proxy::prepare(api, object, body_len, model, &settings, Payer::Credit)
            .map_err(|e| bound_refused(&model_id, e))?;
        admission = admit_rate(
            state,
            &model_id,
            record.id,
            settings.credits.key_rate,
            &prepared,
            now,
        )?;
        let limit = settings.limits.credit_key_max_in_flight;
        let slot = state
            .proxy
            .slots()
            .try_acquire(
                SlotOwner::Account(record.account.clone()),
                limit,
                request_id,
                state.billing.now(),
            )
            .await
            .map_err(|e| OpenAiError::internal(e).into_response())?;
        let Some(slot) = slot else {
            crate::metrics::record_metering_refusal(&model_id, "in_flight");
            return Err(OpenAiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "concurrency_limit",
                format!(
                    "this key already has {limit} requests in flight (the gateway's limit per credit account); \
                     retry when one finishes"
                ),
            )
            .retry_after(1)
            .into_response());
        };
        let reserve = prepared.bound.cost(&prices);
        let usage = new_usage(&prepared);
        let reserved = state.billing.reserve_request(usage.clone(), reserve).await;
        match reserved {
            Ok(usage_id) => (
                prepared,
                Charge::Credit {
                    usage,
                    usage_id,
                    reserved: reserve,
                    prices,
                    slot,
                },
            ),
            Err(ReserveError::Insufficient { balance, needed }) => {
                let message = format!(
                    "balance {balance} USDC is below this request's worst-case cost {needed} USDC \
                     (prompt bound + output bound × n at the model's prices); top up, or lower \
                     max_completion_tokens"
                );
                return Err(
                    super::agent::payment_required_with(state, headers, Some(message)).await,
                );
            }
            Err(e) => return Err(OpenAiError::internal(e).into_response()),
        }
    };
    Ok((prepared, charge))
    }
    .await;
    let (prepared, charge) = match charged {
        Ok(c) => c,
        Err(refused) => {
            // Refused after the rate limits admitted it (busy, unpaid): its tokens go back, its headers go out.
            let headers = admission.as_ref().map(|a| *a.headers());
            if let Some(a) = admission {
                a.settle(0, now.saturating_mul(1000));
            }
            return Err(with_rate_headers(refused, headers, api, now));
        }
    };
    let headers = admission.as_ref().map(|a| *a.headers());
    let answer = forward(
        state, model, prepared, charge, started, now, request_id, None, admission,
    )
    .await;
    match answer {
        Ok(r) => Ok(with_rate_headers(r, headers, api, now)),
        Err(r) => Err(with_rate_headers(r, headers, api, now)),
    }
}

/// Takes one request and the request's token bound from the key's per-minute budgets (`rate`); the refusal is
/// the answer (429 with `Retry-After`, or 400 when the bound can never fit the per-minute tokens).
#[allow(clippy::result_large_err)] // The error is the response to send, as in the handlers.
fn admit_rate(
    state: &AppState,
    model_id: &str,
    key_id: i64,
    rate: KeyRate,
    prepared: &proxy::Prepared,
    now: i64,
) -> Result<Option<RateAdmission>, Response> {
    if rate.is_unlimited() {
        return Ok(None);
    }
    let tokens = prepared
        .bound
        .prompt_tokens
        .saturating_add(prepared.bound.output_tokens());
    match state
        .proxy
        .key_rates()
        .admit(key_id, rate, tokens, now.saturating_mul(1000))
    {
        Ok(admission) => Ok(Some(admission)),
        Err(refusal) if refusal.never_fits => {
            let param = match prepared.api {
                Api::Responses => "max_output_tokens",
                Api::Chat => "max_completion_tokens",
                _ => "max_tokens",
            };
            let response = OpenAiError::invalid(
                param,
                format!(
                    "{} (this request's bound is {tokens} tokens: its prompt bound plus its output bound; lower \
                     {param} or shorten the prompt)",
                    refusal.message
                ),
            )
            .into_response();
            Err(with_rate_headers(
                response,
                Some(refusal.headers),
                prepared.api,
                now,
            ))
        }
        Err(refusal) => {
            crate::metrics::record_metering_refusal(
                model_id,
                match refusal.exhausted {
                    proxy::key_rates::Axis::Requests => "requests_per_minute",
                    proxy::key_rates::Axis::Tokens => "tokens_per_minute",
                },
            );
            let response = OpenAiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                refusal.message,
            )
            .retry_after(refusal.retry_after_secs.max(1))
            .into_response();
            Err(with_rate_headers(
                response,
                Some(refusal.headers),
                prepared.api,
                now,
            ))
        }
    }
}

/// OpenAI's rate-limit headers on every answer of a limited key, and Anthropic's too on `/v1/messages` (`now`:
/// the gateway's clock, seconds).
fn with_rate_headers(
    mut response: Response,
    headers: Option<RateHeaders>,
    api: Api,
    now: i64,
) -> Response {
    if let Some(h) = headers {
        h.apply(response.headers_mut());
        if api == Api::Messages {
            h.apply_anthropic(response.headers_mut(), now.saturating_mul(1000));
        }
    }
    response
}

/// A keyless request: served when its model has a per-request price and it carries a valid x402 payment;
/// otherwise the 402 (the catalog body, with a `PAYMENT-REQUIRED` header offering that price when there is one).
async fn per_request(
    api: Api,
    state: &AppState,
    headers: &HeaderMap,
    body: Bytes,
    started: Instant,
    request_id: &str,
    catalog: Response,
) -> Result<Response, Response> {
    let requested = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_string));
    let upto_engine = state.x402.as_ref().and_then(|x| x.upto()).is_some();
    let priced = requested.and_then(|id| {
        let m = state.settings.model(&id)?;
        let upto = m.upto && upto_engine;
        (m.per_request.is_some() || upto).then_some((id, m.per_request, upto))
    });
    let Some((model_id, price, upto)) = priced.filter(|_| state.x402_enabled()) else {
        return Err(catalog);
    };
    let (object, _) = parse_request(headers, &body)?;
    let settings = state.settings.clone();
    let Some(model) = settings.model(&model_id) else {
        return Err(unknown_model(&model_id));
    };
    // Bound first: a price must cover the prompt bound and the output it buys, and an upto maximum is the
    // request's worst case, before a payment is looked at.
    let upto_prepared = if upto {
        let prepared = proxy::prepare(
            api,
            object.clone(),
            body.len(),
            model,
            &settings,
            Payer::Credit,
        )
        .map_err(|e| bound_refused(&model_id, e))?;
        Some(prepared)
    } else {
        None
    };
    let max = upto_prepared
        .as_ref()
        .map(|p| p.bound.cost(&price_of(model)));
    let exact_prepared = price.map(|price| {
        proxy::prepare(
            api,
            object,
            body.len(),
            model,
            &settings,
            Payer::PerRequest { price },
        )
    });
    // The exact price when it covers this request (otherwise only upto is offered, if it is).
    let exact_price = match &exact_prepared {
        Some(Ok(_)) => price,
        _ => None,
    };
    let required = super::upto::required(state, headers, api, &model_id, exact_price, max);
    if let Some(presented) = super::upto::presented(headers) {
        let (Some(required), Some(prepared), Some(max)) = (required, upto_prepared, max) else {
            let message =
                format!("`{model_id}` is not offered with the upto scheme; see PAYMENT-REQUIRED");
            let refused = OpenAiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_required",
                "invalid_upto_evm_scheme",
                message,
            )
            .into_response();
            return Err(
                match super::upto::required(state, headers, api, &model_id, exact_price, None) {
                    Some(r) => super::upto::with_required(refused, &r),
                    None => refused,
                },
            );
        };
        let payment = match presented {
            Ok(p) => p,
            Err(e) => return Err(super::upto::unreadable(state, &required, &e)),
        };
        let hold = super::upto::authorize(state, &required, payment, model, request_id).await?;
        let status_path = hold.status_path();
        let charge = Charge::Upto {
            model: model_id,
            reserved: max,
            prices: price_of(model),
            payment: Box::new(hold),
        };
        let answer = forward(
            state,
            model,
            prepared,
            charge,
            started,
            state.billing.now(),
            request_id,
            None,
            None,
        )
        .await;
        let add_status = |mut r: Response| {
            if let Ok(v) = HeaderValue::from_str(&status_path) {
                r.headers_mut().insert("x-payment-status", v);
            }
            r
        };
        return answer.map(add_status).map_err(add_status);
    }
    let prepared = match exact_prepared {
        Some(Ok(p)) => p,
        Some(Err(BoundError::Unaffordable { needed, price })) if max.is_none() => {
            crate::metrics::record_metering_refusal(&model_id, "prompt_over_price");
            let message = format!(
                "this request's prompt bound alone costs more than the per-request price {price} USDC: it needs \
                 at least {needed} USDC (prompt bound + 1 output token at the model's prices); shorten the \
                 prompt, or buy credits"
            );
            return Err(super::agent::payment_required_with(state, headers, Some(message)).await);
        }
        Some(Err(e)) if max.is_none() => return Err(bound_refused(&model_id, e)),
        // Only upto pays for this request (no exact price, or one that does not cover it): the 402 offers it.
        _ => {
            return Err(match required {
                Some(r) => super::upto::with_required(catalog, &r),
                None => catalog,
            });
        }
    };
    let Some(price) = price else {
        return Err(catalog);
    };
    let paid =
        match super::x402::authorize_per_request(state, headers, api, &model_id, price).await? {
            Some(paid) => paid,
            None => {
                return Err(match required {
                    Some(r) => super::upto::with_required(catalog, &r),
                    None => catalog,
                });
            }
        };
    let charge = Charge::PerRequest { model: model_id };
    forward(
        state,
        model,
        prepared,
        charge,
        started,
        state.billing.now(),
        request_id,
        Some(paid),
        None,
    )
    .await
}

/// Sends a prepared request upstream and meters the answer. A per-request payment is settled once the upstream
/// has accepted the request and before the first byte goes to the client.
#[allow(clippy::too_many_arguments)]
async fn forward(
    state: &AppState,
    model: &crate::config::Model,
    prepared: proxy::Prepared,
    charge: Charge,
    started: Instant,
    now: i64,
    request_id: &str,
    paid: Option<super::x402::PaidRequest>,
    admission: Option<RateAdmission>,
) -> Result<Response, Response> {
    let settings = state.settings.clone();
    // A stream's cost is known only at its end: its answer carries the hold instead.
    let reserved = match &charge {
        Charge::Credit { reserved, .. } | Charge::Upto { reserved, .. } => Some(*reserved),
        _ => None,
    };
    let (api, stream, client_wants_usage, bound) = (
        prepared.api,
        prepared.stream,
        prepared.client_wants_usage,
        prepared.bound,
    );
    let mut meter = Meter::new(state.store.clone(), charge, started, bound, now);
    meter.set_api(api);
    if let Some(admission) = admission {
        meter.set_rate_admission(admission);
    }
    let overhead = started.elapsed();
    meter.set_overhead(overhead);
    let answer = match state
        .proxy
        .send(&settings, model, &prepared, request_id)
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            let outcome = meter.outcome(None, 0, "upstream_error", None);
            meter.settle(outcome).await;
            return Err(match e {
                SendError::Upstream(e) => upstream_error(e).into_response(),
                SendError::Untranslatable(p) => {
                    OpenAiError::invalid(p.param, p.message).into_response()
                }
                SendError::NoDeployment => OpenAiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_error",
                    "no_deployment",
                    format!("the model `{}` has no deployment to serve it", model.id),
                )
                .into_response(),
            });
        }
    };
    let translated = answer.translated;
    // The API the upstream answered in (an Anthropic request may have been sent as chat completions).
    let upstream_api = if translated { Api::Chat } else { api };
    meter.set_attempt(answer.attempt);
    let upstream = answer.response;
    let status = upstream.status();
    if !status.is_success() {
        let code = status.as_u16();
        let text = upstream.bytes().await.unwrap_or_default();
        let outcome = meter.outcome(None, 0, "upstream_error", Some(code));
        meter.settle(outcome).await;
        // An upstream's own 4xx (a parameter it rejects) is the client's to read; 5xx become our 502.
        if status.is_client_error()
            && serde_json::from_slice::<Value>(&text).is_ok_and(|v| v.get("error").is_some())
        {
            return Ok((status, [(header::CONTENT_TYPE, "application/json")], text).into_response());
        }
        return Err(OpenAiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_error",
            format!("the upstream answered HTTP {code}"),
        )
        .into_response());
    }

    let payment_header = match paid {
        None => None,
        Some(paid) => match paid.settle(state).await {
            Ok(settled) => Some((settled.header_name, settled.header_value)),
            Err(refused) => {
                let outcome = meter.outcome(None, 0, "upstream_error", Some(status.as_u16()));
                meter.settle(outcome).await;
                return Err(refused);
            }
        },
    };
    let overhead_header = format!("{:.3}", overhead.as_secs_f64() * 1e3);
    if stream {
        // Only OpenAI streams have a usage chunk the gateway may have asked for on the client's behalf; a
        // translated stream keeps it for the translator, which turns it into Anthropic's `message_delta` usage.
        let strip_usage = matches!(upstream_api, Api::Chat | Api::Completions)
            && !client_wants_usage
            && !translated;
        let mut stream = MeteredStream::new(
            Box::pin(upstream.bytes_stream()),
            upstream_api.dialect(),
            strip_usage,
            bound.output_tokens(),
            meter,
        );
        if translated {
            stream = stream.reframed(Box::new(proxy::anthropic::StreamTranslator::new(&model.id)));
        }
        let mut response = Response::new(Body::from_stream(stream));
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        insert(h, "x-gateway-overhead-ms", &overhead_header);
        if let Some(reserved) = reserved {
            insert(h, "x-gateway-reserved-usdc", &reserved.to_string());
        }
        if let Some((name, value)) = payment_header {
            h.insert(name, value);
        }
        return Ok(response);
    }

    let body = match read_limited(upstream, MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let outcome = meter.outcome(None, 0, "upstream_error", Some(status.as_u16()));
            meter.settle(outcome).await;
            return Err(upstream_error(e).into_response());
        }
    };
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let usage = upstream_api.usage_of(&parsed);
    let delivered = if usage.is_some() {
        0
    } else {
        upstream_api.estimate_output_tokens(&parsed)
    };
    let outcome = meter.outcome(usage, delivered, "ok", Some(status.as_u16()));
    let settled = meter.settle(outcome).await;
    let body = if translated {
        Bytes::from(proxy::anthropic::response_from_chat(&parsed, &model.id).to_string())
    } else {
        body
    };
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    let h = response.headers_mut();
    insert(h, "x-gateway-overhead-ms", &overhead_header);
    if let Some((name, value)) = payment_header {
        h.insert(name, value);
    }
    if let Some((cost, balance)) = settled.credit {
        insert(h, "x-gateway-cost-usdc", &cost.to_string());
        insert(h, "x-gateway-balance-usdc", &balance.to_string());
    }
    if let Some(receipt) = settled.payment {
        if let Ok(v) = HeaderValue::from_str(&receipt.header_value) {
            h.insert(receipt.header_name, v);
        }
        if let Some(amount) = receipt.json.get("amount").and_then(Value::as_str)
            && let Ok(atomic) = amount.parse::<i64>()
        {
            insert(
                h,
                "x-gateway-cost-usdc",
                &crate::usdc::Usdc(atomic).to_string(),
            );
        }
    }
    Ok(response)
}

/// Checks the content type and reads the JSON object and its `model`.
#[allow(clippy::result_large_err)] // The error is the response to send, as in the handlers.
fn parse_request(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(serde_json::Map<String, Value>, String), Response> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(OpenAiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "send the request body as JSON with `Content-Type: application/json`",
        )
        .into_response());
    }
    let parsed: Value = serde_json::from_slice(body).map_err(|e| {
        OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
        .into_response()
    })?;
    let Value::Object(object) = parsed else {
        return Err(OpenAiError::invalid("body", "the body must be a JSON object").into_response());
    };
    let model_id = match object.get("model") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(
                OpenAiError::invalid("model", "`model` must be a string naming a model")
                    .into_response(),
            );
        }
    };
    Ok((object, model_id))
}

fn unknown_model(model_id: &str) -> Response {
    OpenAiError {
        param: Some("model"),
        ..OpenAiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model `{model_id}` does not exist; GET /v1/models lists the models of this key"
            ),
        )
    }
    .into_response()
}

fn insert(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

async fn read_limited(
    response: alloy::transports::http::reqwest::Response,
    limit: usize,
) -> Result<Bytes, UpstreamError> {
    use futures::StreamExt;
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| proxy::classify("upstream", e))?;
        if out.len() + chunk.len() > limit {
            return Err(UpstreamError::Failed {
                upstream: "upstream".into(),
                message: format!("response over {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// A request the gateway cannot bound: 400 naming the parameter.
fn bound_refused(model: &str, e: BoundError) -> Response {
    match e {
        BoundError::Param(p) => {
            crate::metrics::record_metering_refusal(model, p.param);
            OpenAiError::invalid(p.param, p.message).into_response()
        }
        // Only per-request payments have a budget; they answer this with the 402 themselves.
        BoundError::Unaffordable { needed, price } => OpenAiError::invalid(
            "messages",
            format!("the prompt bound needs {needed} USDC, more than the price {price} USDC"),
        )
        .into_response(),
    }
}

fn upstream_error(e: UpstreamError) -> OpenAiError {
    match &e {
        UpstreamError::Timeout { .. } => OpenAiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
            e.to_string(),
        ),
        _ => OpenAiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_unavailable",
            e.to_string(),
        ),
    }
}

async fn list_models(
    State(state): State<AppState>,
    checked: Option<Extension<AuthorizedKey>>,
    headers: HeaderMap,
) -> Response {
    let request_id = new_request_id();
    let response = match authorize(&state, &headers, checked).await {
        Err(r) => r,
        Ok(key) => {
            let allowed: Vec<&str> = match key
                .record
                .pool
                .as_deref()
                .and_then(|p| state.settings.pool(p))
            {
                Some(pool) if key.record.kind == "subscription" => {
                    pool.models.iter().map(String::as_str).collect()
                }
                _ => state
                    .settings
                    .models
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect(),
            };
            let data: Vec<Value> = allowed
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "x402-gateway"}))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
    };
    with_request_id(response, &request_id)
}

async fn key_usage(
    State(state): State<AppState>,
    checked: Option<Extension<AuthorizedKey>>,
    headers: HeaderMap,
) -> Response {
    let request_id = new_request_id();
    let response = match authorize(&state, &headers, checked).await {
        Err(r) => r,
        Ok(key) => match usage_view(&state, key).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => OpenAiError::internal(e).into_response(),
        },
    };
    with_request_id(response, &request_id)
}

async fn usage_view(state: &AppState, key: AuthorizedKey) -> Result<Value, StoreError> {
    let record = key.record;
    let now = state.billing.now();
    let key_id = record.id;
    let account = record.account.clone();
    let crate::billing::metering::KeyUsage {
        last_24h: day,
        all_time: all,
        recent,
        balance,
    } = state.billing.key_usage(key_id, account, now).await?;
    let mut view = json!({
        "object": "usage",
        "key": {"id": record.public_id, "kind": record.kind, "account": record.account},
        "totals": {"last24h": day, "allTime": all},
        "recent": recent,
    });
    if record.kind == "subscription" {
        let pool = record.pool.as_deref().and_then(|p| state.settings.pool(p));
        let blocks: Vec<Value> = record
            .blocks
            .iter()
            .flatten()
            .filter_map(|name| pool.and_then(|p| p.block(name)))
            .map(|b| json!({"name": b.name, "hoursUtc": format!("{} UTC", b.hours())}))
            .collect();
        let wins: Vec<windows::Window> = record
            .blocks
            .iter()
            .flatten()
            .filter_map(|name| pool.and_then(|p| p.block(name)))
            .map(|b| windows::Window {
                start_minute: b.start_minute,
                end_minute: b.end_minute,
            })
            .collect();
        view["subscription"] = json!({
            "pool": record.pool,
            "models": pool.map(|p| p.models.clone()).unwrap_or_default(),
            "blocks": blocks,
            "expiresAt": record.expires_at.map(crate::billing::rfc3339),
            "activeNow": windows::inside(now, &wins),
            "secondsToNextWindow": windows::seconds_until_open(now, &wins),
            "concurrentRequests": 1,
        });
    } else {
        view["credits"] = json!({
            "balanceUsdc": balance,
            "models": state.settings.models.iter().map(|m| json!({
                "id": m.id,
                "inputUsdcPerMtok": m.input_per_mtok,
                "outputUsdcPerMtok": m.output_per_mtok,
            })).collect::<Vec<_>>(),
        });
    }
    Ok(view)
}
