//! Keyless pay-per-token over HTTP (x402 `upto`) on the inference routes, and the status of an upto payment.
//!
//! A keyless request to a model with `upto = true` gets a 402 whose `PAYMENT-REQUIRED` offers `upto` with
//! `amount` = this request's worst-case cost (the metering bound at the model's prices), next to `exact` when the
//! model also has a per-request price. The same request repeated with an upto `PAYMENT-SIGNATURE` is verified
//! (`x402::upto`), recorded as single-use (`billing::upto`), served and metered exactly as a credit request, then
//! settled for the metered cost ([`UptoHold`], called by the proxy's meter). The receipt is `PAYMENT-RESPONSE`
//! (`{success, transaction, network, payer, amount}`): a header on a JSON answer; on a stream, whose headers left
//! before the cost was known, the stream's last event `event: x402.payment-response` and
//! `GET /x402/upto/{payer}/{nonce}`.
//!
//! Refusals: 402 with `PAYMENT-REQUIRED` and a failed `PAYMENT-RESPONSE` (reason codes as the official SDKs name
//! them), 412 `permit2_allowance_required` when the payer has not approved Permit2, 503 when the chain cannot be
//! asked. A payer with an unsettled upto payment is refused (`upto_payer_has_unsettled_payment`) until it settles.

use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use serde_json::json;

use super::AppState;
use crate::billing::Billing;
use crate::billing::upto::NewUpto;
use crate::proxy::{Api, PaymentReceipt, SettlePayment};
use crate::store::usage::Outcome;
use crate::usdc::Usdc;
use crate::x402::header::{self as xh, HeaderError};
use crate::x402::upto::{UptoPaymentPayload, UptoSettler};
use crate::x402::{
    PaymentError, PaymentRequired, Reason, ResourceInfo, SettleResponse, requirements,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/x402/upto/{payer}/{nonce}", get(payment_status))
}

/// The upto payment in the request's `PAYMENT-SIGNATURE`: `None` when there is none or it is of another scheme;
/// `Some(Err)` when it says `upto` but does not decode.
pub fn presented(headers: &HeaderMap) -> Option<Result<UptoPaymentPayload, HeaderError>> {
    let raw = headers.get(xh::PAYMENT_SIGNATURE)?;
    let text = match raw.to_str() {
        Ok(t) => t,
        Err(_) => return None,
    };
    crate::x402::upto::decode(text).transpose()
}

/// What a keyless request to `model` may pay with: `exact` at `price` and `upto` of at most `max`.
pub fn required(
    state: &AppState,
    headers: &HeaderMap,
    api: Api,
    model: &str,
    price: Option<Usdc>,
    max: Option<Usdc>,
) -> Option<PaymentRequired> {
    let Some(engine) = state.x402.as_ref() else {
        // Standard x402 on Solana only: the exact per-request offer (upto is an EVM scheme here).
        return price.and_then(|price| {
            super::x402::per_request_required(state, headers, api, model, price)
        });
    };
    let mut required = match price {
        Some(price) => super::x402::per_request_required(state, headers, api, model, price)?,
        None => {
            let mut required = requirements::payment_required(
                ResourceInfo {
                    url: format!("{}{}", super::x402::base_url(state, headers), api.path()),
                    description: None,
                    mime_type: Some("application/json".into()),
                },
                Vec::new(),
                None,
            );
            // Discovery (x402 `bazaar`), as on every other offer.
            let mut extensions = serde_json::Map::new();
            extensions.insert(
                super::bazaar::KEY.into(),
                super::bazaar::inference(api, model),
            );
            required.extensions = Some(extensions);
            required
        }
    };
    if let (Some(max), Some(upto)) = (max, engine.upto()) {
        let max_timeout = state
            .settings
            .x402
            .as_ref()
            .map_or(300, |x| x.max_timeout_seconds);
        let offer = crate::x402::upto::requirements(
            engine.network(),
            state.settings.chain.pay_to,
            max,
            max_timeout,
            upto.verifier().facilitator(),
        )
        .ok()?;
        required.accepts.push(offer);
    }
    let description = match (price, max) {
        (Some(price), Some(max)) => format!(
            "one {} request to `{model}`: {price} USDC (exact), or its metered cost up to {max} USDC (upto)",
            api.name()
        ),
        (None, Some(max)) => format!(
            "one {} request to `{model}`, paid per token: its metered cost, at most {max} USDC (upto)",
            api.name()
        ),
        _ => required.resource.description.clone().unwrap_or_default(),
    };
    required.resource.description = Some(description);
    required.error = Some("an API key or an x402 payment is required".into());
    Some(required)
}

/// `response` with `PAYMENT-REQUIRED` = `required` (and the headers a browser client needs to read it).
pub fn with_required(mut response: Response, required: &PaymentRequired) -> Response {
    if let Ok(v) = HeaderValue::from_str(&xh::encode(required)) {
        let h = response.headers_mut();
        h.insert(xh::PAYMENT_REQUIRED, v);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(super::x402::EXPOSE_HEADERS),
        );
    }
    response
}

/// A refused upto payment: 412 for a missing Permit2 allowance (the client approves once, then retries), 503 when
/// the chain could not be asked, else 402; with `PAYMENT-REQUIRED` and the failed `PAYMENT-RESPONSE`.
fn refused(
    state: &AppState,
    required: &PaymentRequired,
    e: &PaymentError,
    payer: Option<Address>,
) -> Response {
    let status = match e {
        PaymentError::Rejected(r) if r.code() == "permit2_allowance_required" => {
            StatusCode::PRECONDITION_FAILED
        }
        PaymentError::Rejected(_) => StatusCode::PAYMENT_REQUIRED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let network = state.settings.chain.network.caip2();
    let failure = receipt(Some(e.code()), None, &network, payer, Usdc::ZERO);
    let mut response = (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(super::x402::openai_error(status, e.code(), e.to_string())),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&xh::encode(&failure)) {
        response.headers_mut().insert(xh::PAYMENT_RESPONSE, v);
    }
    let mut required = required.clone();
    required.error = Some(e.to_string());
    with_required(response, &required)
}

/// An unreadable upto header: a fresh 402.
pub fn unreadable(state: &AppState, required: &PaymentRequired, e: &HeaderError) -> Response {
    let _ = state;
    let response = (
        StatusCode::PAYMENT_REQUIRED,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(super::x402::openai_error(
            StatusCode::PAYMENT_REQUIRED,
            e.code(),
            format!("the payment header is unreadable: {e}"),
        )),
    )
        .into_response();
    with_required(response, required)
}

/// The `PAYMENT-RESPONSE` of an upto payment: the x402 `SettleResponse` with the scheme's `amount`.
fn receipt(
    error_reason: Option<&str>,
    transaction: Option<B256>,
    network: &str,
    payer: Option<Address>,
    amount: Usdc,
) -> SettleResponse {
    SettleResponse {
        success: error_reason.is_none(),
        error_reason: error_reason.map(str::to_string),
        transaction: transaction.map(|t| format!("{t:#x}")).unwrap_or_default(),
        network: network.to_string(),
        payer: payer.map(|p| p.to_checksum(None)),
        amount: Some(amount.atomic().max(0).to_string()),
    }
}

/// A verified upto payment recorded as being served: settled for the metered cost when the answer ends.
pub struct UptoHold {
    id: i64,
    payment: UptoPaymentPayload,
    /// The offer it was verified against (a facilitator settles against it, with the metered amount).
    offer: crate::x402::PaymentRequirements,
    settler: Arc<UptoSettler>,
    billing: Billing,
    model: String,
    network: String,
}

impl UptoHold {
    /// Where the payment's status can be read (`GET`), for the `x-payment-status` header.
    pub fn status_path(&self) -> String {
        status_path(self.payment.payer(), self.payment.nonce_key())
    }
}

fn status_path(payer: Address, nonce: B256) -> String {
    format!("/x402/upto/{payer:#x}/{nonce:#x}")
}

impl SettlePayment for UptoHold {
    fn settle(self: Box<Self>, outcome: Outcome, cost: Usdc) -> BoxFuture<'static, PaymentReceipt> {
        Box::pin(async move {
            let payer = self.payment.payer();
            let note = format!("x402 upto: {}", self.model);
            let metered = crate::billing::upto::Metered {
                prompt_tokens: outcome.prompt_tokens,
                completion_tokens: outcome.completion_tokens,
                cost,
            };
            let json = match self
                .billing
                .settle_upto(
                    &self.settler,
                    self.id,
                    &self.payment,
                    &self.offer,
                    metered,
                    note,
                )
                .await
            {
                Ok(tx) => receipt(None, tx, &self.network, Some(payer), cost),
                Err(e) => receipt(Some(e.code()), None, &self.network, Some(payer), Usdc::ZERO),
            };
            PaymentReceipt {
                header_name: xh::PAYMENT_RESPONSE,
                header_value: xh::encode(&json),
                json: serde_json::to_value(&json).unwrap_or_default(),
            }
        })
    }
}

/// Verifies `payment` against the upto offer in `required` and records it as being served. `Err` is the answer.
pub async fn authorize(
    state: &AppState,
    required: &PaymentRequired,
    payment: UptoPaymentPayload,
    model: &crate::config::Model,
    request_id: &str,
) -> Result<UptoHold, Response> {
    let payer = payment.payer();
    let refuse = |e: PaymentError| refused(state, required, &e, Some(payer));
    let (Some(engine), Some(offer)) = (
        state.x402.as_ref(),
        required
            .accepts
            .iter()
            .find(|a| a.scheme == crate::x402::upto::SCHEME_UPTO),
    ) else {
        return Err(refuse(
            Reason::Upto {
                code: "invalid_upto_evm_scheme",
                message: format!("`{}` is not offered with the upto scheme", model.id),
            }
            .into(),
        ));
    };
    let Some(settler) = engine.upto().cloned() else {
        return Err(refuse(
            Reason::Upto {
                code: "invalid_upto_evm_scheme",
                message: "this gateway does not settle upto payments".into(),
            }
            .into(),
        ));
    };
    // A payer who owes an unsettled payment is served nothing until it is settled.
    match state.billing.upto_unsettled(payer).await {
        Ok(Some(owed)) => {
            return Err(refuse(
                Reason::Upto {
                    code: "upto_payer_has_unsettled_payment",
                    message: format!(
                        "this payer has an unsettled upto payment of {} USDC ({}; {}); restore the Permit2 \
                         allowance and balance so it can settle",
                        Usdc(owed.cost_atomic.unwrap_or(owed.max_atomic)),
                        status_path(payer, owed.nonce.parse().unwrap_or_default()),
                        owed.last_error.as_deref().unwrap_or("settlement failed"),
                    ),
                }
                .into(),
            ));
        }
        Ok(None) => {}
        Err(e) => {
            return Err(refuse(PaymentError::Unavailable {
                what: "the upto ledger",
                message: e.to_string(),
            }));
        }
    }
    let verified = settler
        .verify(&payment, offer, engine.now())
        .await
        .map_err(refuse)?;
    let prices = super::openai::price_of(model);
    let new = NewUpto {
        payer: format!("{payer:#x}"),
        nonce: format!("{:#x}", payment.nonce_key()),
        network: engine.network().caip2(),
        request_id: request_id.to_string(),
        model: model.id.clone(),
        resource: required.resource.url.clone(),
        max_atomic: verified.max.atomic(),
        deadline: i64::try_from(verified.deadline).unwrap_or(i64::MAX),
        input_price_atomic: prices.input_per_mtok.atomic(),
        output_price_atomic: prices.output_per_mtok.atomic(),
        payment: serde_json::to_string(&payment).unwrap_or_default(),
        requirements: serde_json::to_string(offer).unwrap_or_default(),
    };
    let id = match state.billing.upto_begin(new).await {
        Ok(Some(id)) => id,
        Ok(None) => return Err(refuse(Reason::Duplicate.into())),
        Err(e) => {
            return Err(refuse(PaymentError::Unavailable {
                what: "the upto ledger",
                message: e.to_string(),
            }));
        }
    };
    Ok(UptoHold {
        id,
        payment,
        offer: offer.clone(),
        settler,
        billing: state.billing.clone(),
        model: model.id.clone(),
        network: engine.network().caip2(),
    })
}

/// `GET /x402/upto/{payer}/{nonce}`: an upto payment's state (`serving`, `settling`, `settled`, `zero`,
/// `unsettled`), tokens, cost and transaction, with its `paymentResponse` once final. `nonce` in decimal or hex.
async fn payment_status(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Response {
    let bad = |message: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"success": false, "error": {"code": "invalid_request", "message": message}}),
            ),
        )
            .into_response()
    };
    let Ok(Path((payer, nonce))) = path else {
        return bad("the path must be /x402/upto/{payer}/{nonce} in UTF-8");
    };
    let Ok(payer) = payer.parse::<Address>() else {
        return bad("`payer` must be a 0x-prefixed 20-byte address");
    };
    let nonce = match nonce
        .strip_prefix("0x")
        .or_else(|| nonce.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && hex.len() <= 64 => U256::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None => crate::x402::types::decimal_u256::parse(&nonce),
    };
    let Some(nonce) = nonce else {
        return bad("`nonce` must be the Permit2 nonce, decimal or 0x-hex");
    };
    let row = match state
        .billing
        .upto_payment(payer, format!("{:#x}", B256::from(nonce)))
        .await
    {
        Ok(Some(row)) => row,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"success": false, "error": {"code": "not_found",
                    "message": "no upto payment of this payer with this nonce"}})),
            )
                .into_response();
        }
        Err(e) => return super::agent::ApiError::internal(e).into_response(),
    };
    let final_receipt = match row.status.as_str() {
        "settled" | "zero" => Some(receipt(
            None,
            row.tx_hash.as_deref().and_then(|t| t.parse().ok()),
            &row.network,
            Some(payer),
            Usdc(row.cost_atomic.unwrap_or(0)),
        )),
        "unsettled" => Some(receipt(
            Some("unexpected_settle_error"),
            None,
            &row.network,
            Some(payer),
            Usdc::ZERO,
        )),
        _ => None,
    };
    let mut body = json!({
        "success": true,
        "payment": row,
        "maxUsdc": Usdc(row.max_atomic).to_string(),
        "costUsdc": row.cost_atomic.map(|c| Usdc(c).to_string()),
    });
    if let Some(settled) = final_receipt {
        body["paymentResponse"] = json!(xh::encode(&settled));
        body["settlement"] = json!(settled);
    }
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}
