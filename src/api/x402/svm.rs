//! Standard x402 `exact` payments on Solana over HTTP, beside the EVM ones of the parent module: every offer lists
//! one `accepts` entry per Solana network with a fee payer (`extra.feePayer`), and a `PAYMENT-SIGNATURE` whose
//! `accepted.network` is a Solana one carries the client's partially signed transaction (`payload.transaction`),
//! which is checked as the specification lists, refused if its signature was already credited (stored, so also
//! after a restart), co-signed by the fee payer, simulated, sent, awaited to `confirmed`, and then redeemed like any
//! settled payment (credits or a subscription) in one transaction keyed by the transaction's signature.

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use serde_json::{Value, json};

use super::{Answer, challenge};
use crate::api::AppState;
use crate::billing::{ClaimError, Product, SettledPayment, X402Record};
use crate::usdc::Usdc;
use crate::x402::PaymentRequired;
use crate::x402::header as xh;
use crate::x402::svm::settle::{SvmSettleError, SvmSettlement};

/// The `accepts` entries for `price` on every Solana network that takes standard x402 (payTo is the wallet: the
/// client derives its token account).
pub(super) fn accepts(state: &AppState, price: Usdc, max_timeout: u64) -> Vec<Value> {
    state
        .svm_x402
        .iter()
        .map(|s| {
            json!({
                "scheme": "exact",
                "network": s.settings.caip2,
                "amount": price.atomic().max(0).to_string(),
                "asset": s.settings.mint.to_string(),
                "payTo": s.settings.pay_to.to_string(),
                "maxTimeoutSeconds": max_timeout,
                "extra": crate::x402::svm::exact::offer_extra(&s.fee_payer_address()),
            })
        })
        .collect()
}

/// A payment header naming a Solana network, decoded: `None` when the header is absent or names another network.
pub(super) fn presented(headers: &HeaderMap) -> Option<Result<Value, String>> {
    let raw = headers.get(xh::PAYMENT_SIGNATURE)?.to_str().ok()?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())?;
    let network = json.pointer("/accepted/network").and_then(Value::as_str)?;
    if !network.starts_with("solana:") {
        return None;
    }
    if json.get("x402Version").and_then(Value::as_u64) != Some(2) {
        return Some(Err("a Solana payment must be x402 version 2".into()));
    }
    Some(Ok(json))
}

fn failure_header(code: &str, network: &str, payer: Option<String>) -> String {
    xh::encode(&json!({
        "success": false,
        "errorReason": code,
        "network": network,
        "payer": payer,
        "transaction": "",
    }))
}

/// Verifies, settles and redeems a Solana payment for `product` (see the module documentation).
pub(super) async fn pay_and_redeem(
    state: &AppState,
    payment: Value,
    offered: &PaymentRequired,
    product: Product,
    product_view: &Value,
) -> Answer {
    let accepted = payment.get("accepted").cloned().unwrap_or(Value::Null);
    let network = accepted["network"].as_str().unwrap_or_default().to_string();
    let refuse = |code: &str, message: String, payer: Option<String>| {
        let mut a = challenge(offered, Some((code, message)), product_view)
            .header(xh::PAYMENT_RESPONSE, failure_header(code, &network, payer));
        a.final_answer = false;
        a
    };
    // Verified, held in flight, refused if already credited, co-signed and simulated: the per-request path's
    // first half, then sent here at once.
    let paid = match authorize(state, payment, offered).await {
        Ok(p) => p,
        Err((StatusCode::PAYMENT_REQUIRED, code, message, payer)) => {
            return refuse(code, message, payer);
        }
        Err((status, code, message, payer)) => {
            let mut a = Answer::error(
                status,
                code,
                format!("{message}; nothing was charged, retry"),
            )
            .header(xh::PAYMENT_RESPONSE, failure_header(code, &network, payer))
            .header("Retry-After", "5");
            a.final_answer = false;
            return a;
        }
    };
    let PaidSvm {
        exact,
        prepared,
        record,
        _held,
    } = paid;
    let payer = prepared.verified.payer.to_string();
    let signature = prepared.verified.signature_id.clone();
    let settlement: SvmSettlement = match exact.submit(prepared).await {
        Ok(s) => s,
        Err(
            e @ (SvmSettleError::Rejected(_)
            | SvmSettleError::Duplicate(_)
            | SvmSettleError::Simulation(_)
            | SvmSettleError::Failed { .. }),
        ) => {
            return refuse(e.code(), e.to_string(), Some(payer));
        }
        Err(e @ SvmSettleError::Unavailable(_)) => {
            let mut a = Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                e.code(),
                format!("{e}; nothing was charged, retry the same request"),
            )
            .header(
                xh::PAYMENT_RESPONSE,
                failure_header(e.code(), &network, Some(payer)),
            )
            .header("Retry-After", "5");
            a.final_answer = false;
            return a;
        }
        Err(e @ SvmSettleError::OutcomeUnknown { .. }) => {
            let mut a = Answer::error(
                StatusCode::BAD_GATEWAY,
                e.code(),
                format!(
                    "{e}; if it lands it is indexed like any payment and can be claimed with its signature as txHash \
                     at /api/agent/topup (network {network})"
                ),
            )
            .header(xh::PAYMENT_RESPONSE, failure_header(e.code(), &network, Some(payer)));
            a.body["error"]["transaction"] = json!(signature);
            a.final_answer = false;
            return a;
        }
    };
    let ok_header = xh::encode(&json!({
        "success": true,
        "transaction": settlement.signature,
        "network": settlement.network,
        "payer": settlement.payer.to_string(),
        "amount": settlement.amount.to_string(),
    }));
    let paid = SettledPayment {
        network: settlement.network.clone(),
        tx_hash: settlement.signature.clone(),
        payer: settlement.payer.to_string(),
        paid: Usdc(i64::try_from(settlement.amount).unwrap_or(i64::MAX)),
        product,
        record,
    };
    match state.billing.claim_settled(paid).await {
        Ok((claimed, fallback)) => {
            let payment = json!({
                "transaction": settlement.signature,
                "network": settlement.network,
                "payer": settlement.payer.to_string(),
                "amount": super::usdc_number(Usdc(i64::try_from(settlement.amount).unwrap_or(i64::MAX))),
            });
            super::redeemed(claimed, fallback, payment).header(xh::PAYMENT_RESPONSE, ok_header)
        }
        Err(ClaimError::AlreadyClaimed(_)) => {
            // A concurrent copy of the same transaction was credited first: this one moved nothing more (the
            // cluster processes one transaction once).
            let mut a = challenge(
                offered,
                Some((
                    "duplicate_settlement",
                    format!(
                        "transaction {} was already settled and credited",
                        settlement.signature
                    ),
                )),
                product_view,
            );
            a.final_answer = false;
            a
        }
        Err(e) => {
            tracing::error!(error = %e, tx = %settlement.signature, "settled Solana x402 payment not recorded");
            let mut a = Answer::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "not_recorded",
                format!(
                    "the payment settled in {} but could not be recorded; claim it with that signature as txHash \
                     at /api/agent/topup (network {})",
                    settlement.signature, settlement.network
                ),
            )
            .header(xh::PAYMENT_RESPONSE, ok_header);
            a.final_answer = false;
            a
        }
    }
}

/// A per-request payment on Solana verified, held in flight, co-signed and simulated: sent by [`settle`] once the
/// upstream accepted the request; dropped unsent when it did not (nothing moves).
#[derive(Debug)]
pub(super) struct PaidSvm {
    exact: std::sync::Arc<crate::x402::svm::settle::SvmExact>,
    prepared: crate::x402::svm::settle::PreparedSvm,
    record: X402Record,
    _held: crate::x402::svm::settle::InFlight,
}

/// A refused per-request payment: (HTTP status, code, message, payer).
pub(super) type Refusal = (StatusCode, &'static str, String, Option<String>);

/// Verifies a per-request payment for the offer `offered` (see [`PaidSvm`]).
pub(super) async fn authorize(
    state: &AppState,
    payment: Value,
    offered: &PaymentRequired,
) -> Result<PaidSvm, Refusal> {
    let accepted = payment.get("accepted").cloned().unwrap_or(Value::Null);
    let network = accepted["network"].as_str().unwrap_or_default().to_string();
    let refused = |code: &'static str, message: String, payer: Option<String>| {
        (StatusCode::PAYMENT_REQUIRED, code, message, payer)
    };
    let offer = offered
        .svm_accepts
        .iter()
        .find(|o| {
            ["scheme", "network", "amount", "asset", "payTo"]
                .iter()
                .all(|k| o.get(k) == accepted.get(k))
        })
        .ok_or_else(|| {
            refused(
                "invalid_exact_svm_payload_accepted_mismatch",
                "`accepted` is not one of the offered Solana payment requirements".into(),
                None,
            )
        })?;
    let exact = state
        .svm_x402
        .iter()
        .find(|s| s.settings.caip2 == network)
        .ok_or_else(|| {
            refused(
                "invalid_network",
                format!("no Solana settlement on {network}"),
                None,
            )
        })?;
    let amount: u64 = offer["amount"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let transaction = payment
        .pointer("/payload/transaction")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            refused(
                "invalid_exact_svm_payload_transaction",
                "payload.transaction is missing".into(),
                None,
            )
        })?;
    let verified = exact
        .verify(transaction, &exact.requirements(amount))
        .map_err(|e| refused(e.code(), e.to_string(), None))?;
    let payer = verified.payer.to_string();
    let signature = verified.signature_id.clone();
    let held = exact.hold(&signature).ok_or_else(|| {
        refused(
            "duplicate_settlement",
            format!("transaction {signature} is being settled by another request"),
            Some(payer.clone()),
        )
    })?;
    match state.billing.claim_record(&signature).await {
        Ok(Some(_)) => {
            return Err(refused(
                "duplicate_settlement",
                format!("transaction {signature} was already settled and credited"),
                Some(payer),
            ));
        }
        Ok(None) => {}
        Err(e) => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                e.to_string(),
                Some(payer),
            ));
        }
    }
    let record = X402Record {
        x402_version: 2,
        nonce: signature.clone(),
        authorization: transaction.to_string(),
        signature: signature.clone(),
        requirements: offer.to_string(),
        resource: offered.resource.url.clone(),
    };
    let prepared = match exact.prepare(verified).await {
        Ok(p) => p,
        Err(e @ SvmSettleError::Unavailable(_)) => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                e.code(),
                e.to_string(),
                Some(payer),
            ));
        }
        Err(e) => return Err(refused(e.code(), e.to_string(), Some(payer))),
    };
    Ok(PaidSvm {
        exact: exact.clone(),
        prepared,
        record,
        _held: held,
    })
}

/// Sends a per-request payment and records it (a claim of its signature, top-up + debit); the
/// `PAYMENT-RESPONSE` value, or the failure (status, code, message, payer).
pub(super) async fn settle(
    state: &AppState,
    paid: PaidSvm,
    model: &str,
) -> Result<String, Refusal> {
    let PaidSvm {
        exact,
        prepared,
        record,
        _held,
    } = paid;
    let payer = prepared.verified.payer.to_string();
    let settlement = exact.submit(prepared).await.map_err(|e| {
        let status = match e {
            SvmSettleError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            SvmSettleError::OutcomeUnknown { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::PAYMENT_REQUIRED,
        };
        (status, e.code(), e.to_string(), Some(payer.clone()))
    })?;
    let value = Usdc(i64::try_from(settlement.amount).unwrap_or(i64::MAX));
    let paid = SettledPayment {
        network: settlement.network.clone(),
        tx_hash: settlement.signature.clone(),
        payer: settlement.payer.to_string(),
        paid: value,
        product: Product::Topup { amount: value },
        record,
    };
    if let Err(e) = state
        .billing
        .record_request_payment(paid, format!("x402 per-request: {model}"))
        .await
    {
        // Served anyway: it was paid. The transfer stays visible to auditors through the index.
        tracing::error!(error = %e, tx = %settlement.signature, "per-request Solana payment not recorded");
    }
    Ok(xh::encode(&json!({
        "success": true,
        "transaction": settlement.signature,
        "network": settlement.network,
        "payer": settlement.payer.to_string(),
        "amount": settlement.amount.to_string(),
    })))
}
