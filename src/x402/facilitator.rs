//! [`FacilitatorSettler`]: delegates verification and settlement to an x402 facilitator over HTTP
//! (`POST {url}/verify`, `POST {url}/settle` with `{x402Version, paymentPayload, paymentRequirements}`).
//!
//! The checks that need no chain run locally first ([`check_offline`]), so an obviously wrong payment never
//! leaves the gateway. A 2xx settle answer without a transaction hash is not a settlement.

use std::time::Duration;

use alloy::primitives::B256;
use alloy::transports::http::reqwest;
use futures::future::BoxFuture;
use serde_json::Value;

use super::eip3009::Rsv;
use super::error::{PaymentError, Reason};
use super::requirements::to_v1;
use super::settle::{Settlement, Settler};
use super::types::{AnyPaymentPayload, FacilitatorRequest, SettleResponse, VerifyResponse};
use super::verify::{PaymentRequest, SignerKind, Verified, check_offline, valid_before_secs};
use crate::config::{Network, redact_url};

/// A facilitator reached over HTTP.
#[derive(Clone)]
pub struct FacilitatorSettler {
    client: reqwest::Client,
    /// Base URL without a trailing slash (may embed an API key: never logged as is).
    url: String,
    network: Network,
}

impl std::fmt::Debug for FacilitatorSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FacilitatorSettler")
            .field("url", &redact_url(&self.url))
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

impl FacilitatorSettler {
    /// `timeout` bounds each request (settlement waits for a block on the facilitator's side: allow ~30 s).
    pub fn new(
        url: &str,
        network: Network,
        timeout: Duration,
    ) -> Result<FacilitatorSettler, PaymentError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| PaymentError::Unavailable {
                what: "facilitator client",
                message: e.to_string(),
            })?;
        Ok(FacilitatorSettler {
            client,
            url: url.trim_end_matches('/').to_string(),
            network,
        })
    }

    fn body(&self, req: &PaymentRequest) -> FacilitatorRequest {
        let requirements = match &req.payload {
            AnyPaymentPayload::V1(_) => {
                serde_json::to_value(to_v1(&req.requirements, &req.resource))
            }
            AnyPaymentPayload::V2(_) => serde_json::to_value(&req.requirements),
        }
        .unwrap_or(Value::Null);
        FacilitatorRequest {
            x402_version: req.payload.x402_version(),
            payment_payload: req.payload.to_json(),
            payment_requirements: requirements,
        }
    }

    /// Posts to `{url}/{path}`; returns the status and the JSON body (if it is JSON).
    async fn post(
        &self,
        path: &str,
        req: &PaymentRequest,
    ) -> Result<(reqwest::StatusCode, Option<Value>), reqwest::Error> {
        let response = self
            .client
            .post(format!("{}/{path}", self.url))
            .json(&self.body(req))
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        Ok((status, serde_json::from_slice(&bytes).ok()))
    }

    async fn verify_inner(&self, req: &PaymentRequest, now: u64) -> Result<Verified, PaymentError> {
        let amount = check_offline(req, &self.network, now)?;
        let (status, body) =
            self.post("verify", req)
                .await
                .map_err(|e| PaymentError::Unavailable {
                    what: "facilitator verify",
                    message: redact(&e),
                })?;
        let parsed = body.and_then(|b| serde_json::from_value::<VerifyResponse>(b).ok());
        match parsed {
            Some(v) if v.is_valid && status.is_success() => {
                let sig = &req.payload.exact().signature;
                let signer = match Rsv::parse(sig) {
                    Some(rsv) => SignerKind::Eoa(rsv),
                    None => SignerKind::Contract(sig.clone()),
                };
                Ok(Verified {
                    payer: req.payer(),
                    amount,
                    signer,
                    valid_before: valid_before_secs(req),
                })
            }
            Some(v) if !v.is_valid => Err(Reason::Facilitator {
                code: v
                    .invalid_reason
                    .unwrap_or_else(|| "invalid_payment".to_string()),
                message: None,
            }
            .into()),
            _ => Err(PaymentError::Unavailable {
                what: "facilitator verify",
                message: format!("unexpected answer (HTTP {status})"),
            }),
        }
    }

    async fn settle_inner(
        &self,
        req: &PaymentRequest,
        verified: &Verified,
    ) -> Result<Settlement, PaymentError> {
        let (status, body) = match self.post("settle", req).await {
            Ok(answer) => answer,
            Err(e) if e.is_connect() => {
                return Err(PaymentError::Unavailable {
                    what: "facilitator settle",
                    message: redact(&e),
                });
            }
            Err(e) => {
                return Err(PaymentError::OutcomeUnknown {
                    what: "facilitator settle",
                    message: redact(&e),
                    tx: None,
                });
            }
        };
        let Some(body) = body else {
            return Err(PaymentError::OutcomeUnknown {
                what: "facilitator settle",
                message: format!("HTTP {status} without a JSON body"),
                tx: None,
            });
        };
        let success = body.get("success").and_then(Value::as_bool);
        if success == Some(false) {
            let parsed: Option<SettleResponse> = serde_json::from_value(body).ok();
            return Err(Reason::Facilitator {
                code: parsed
                    .and_then(|p| p.error_reason)
                    .unwrap_or_else(|| "settle_failed".to_string()),
                message: None,
            }
            .into());
        }
        let transaction = body
            .get("transaction")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !status.is_success() || success != Some(true) || transaction.is_empty() {
            return Err(PaymentError::OutcomeUnknown {
                what: "facilitator settle",
                message: format!(
                    "HTTP {status}: answer without success and a transaction hash is not a settlement"
                ),
                tx: None,
            });
        }
        let tx: B256 = transaction
            .parse()
            .map_err(|_| PaymentError::OutcomeUnknown {
                what: "facilitator settle",
                message: format!("transaction `{transaction}` is not a transaction hash"),
                tx: None,
            })?;
        Ok(Settlement {
            transaction: tx,
            network: self.network.caip2(),
            payer: verified.payer,
            amount: verified.amount,
        })
    }
}

/// A reqwest error without the URL (which may carry an API key).
fn redact(e: &reqwest::Error) -> String {
    let text = e.to_string();
    match e.url() {
        Some(url) => text.replace(url.as_str(), &redact_url(url.as_str())),
        None => text,
    }
}

impl Settler for FacilitatorSettler {
    fn verify<'a>(
        &'a self,
        req: &'a PaymentRequest,
        now: u64,
    ) -> BoxFuture<'a, Result<Verified, PaymentError>> {
        Box::pin(self.verify_inner(req, now))
    }

    fn settle<'a>(
        &'a self,
        req: &'a PaymentRequest,
        verified: &'a Verified,
    ) -> BoxFuture<'a, Result<Settlement, PaymentError>> {
        Box::pin(self.settle_inner(req, verified))
    }
}
