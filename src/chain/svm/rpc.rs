//! Solana JSON-RPC over HTTP: the few calls the indexer, the claims and x402 settlement make, against a list of
//! endpoints used as one (the next takes over when one fails, as for EVM).
//!
//! As in [`crate::chain::rpc`]: an unreachable endpoint, a timeout, an HTTP 408/429/5xx or an answer that is not a
//! JSON-RPC answer to this call is a transport fault (retried, then the next endpoint); a JSON-RPC error is the
//! node's verdict (final). Error texts never carry an endpoint's URL path or query (where providers put keys).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::chain::RpcError;
use crate::chain::redact::UrlSecrets;
use crate::config::redact_url;

const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Endpoint {
    url: String,
    label: String,
}

/// A set of Solana JSON-RPC endpoints used as one.
pub struct SvmRpc {
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    secrets: Arc<UrlSecrets>,
    preferred: AtomicUsize,
    retries: usize,
    /// CAIP-2 id of the network the endpoints serve, for the per-network failover count.
    network: Option<String>,
}

/// One entry of `getSignaturesForAddress` (newest first).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureInfo {
    pub signature: String,
    pub slot: u64,
    /// Set when the transaction failed (it then moved no tokens).
    #[serde(default)]
    pub err: Option<Value>,
    #[serde(default)]
    pub block_time: Option<i64>,
    #[serde(default)]
    pub confirmation_status: Option<String>,
}

/// One entry of `getSignatureStatuses`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureStatus {
    pub slot: u64,
    #[serde(default)]
    pub err: Option<Value>,
    /// `processed`, `confirmed` or `finalized`.
    #[serde(default)]
    pub confirmation_status: Option<String>,
}

/// What `getAccountInfo` says of an account (base64 data).
#[derive(Debug, Clone)]
pub struct AccountInfo {
    pub owner: String,
    pub lamports: u64,
    pub data: Vec<u8>,
}

impl SvmRpc {
    /// Clients for `urls`; `timeout` bounds each HTTP request.
    pub fn new(urls: &[String], timeout: Duration) -> Result<SvmRpc, RpcError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| transport("http client", e.without_url().to_string()))?;
        let endpoints = urls
            .iter()
            .map(|url| Endpoint {
                url: url.clone(),
                label: redact_url(url),
            })
            .collect();
        Ok(SvmRpc {
            http,
            endpoints,
            secrets: Arc::new(UrlSecrets::new(urls.iter().map(String::as_str))),
            preferred: AtomicUsize::new(0),
            retries: 4,
            network: None,
        })
    }

    /// Names the network (CAIP-2) these endpoints serve: failovers are counted per network.
    pub fn for_network(mut self, network: String) -> SvmRpc {
        self.network = Some(network);
        self
    }

    async fn call_once(
        &self,
        ep: &Endpoint,
        method: &str,
        params: &Value,
    ) -> Result<Value, RpcError> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let resp = self
            .http
            .post(&ep.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(&ep.label, self.secrets.scrub(&e.without_url().to_string())))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport(&ep.label, self.secrets.scrub(&e.without_url().to_string())))?;
        if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
            return Err(RpcError::Transport {
                endpoint: ep.label.clone(),
                message: format!("HTTP {status}"),
                retry_after,
            });
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| {
            transport(
                &ep.label,
                format!(
                    "HTTP {status}: the answer is not JSON ({} bytes)",
                    bytes.len()
                ),
            )
        })?;
        if answer.get("id") != Some(&json!(1)) {
            return Err(transport(
                &ep.label,
                "the answer is not the answer to this call",
            ));
        }
        if let Some(error) = answer.get("error") {
            return Err(RpcError::Node {
                endpoint: ep.label.clone(),
                code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: self.secrets.scrub(
                    error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("(no message)"),
                ),
            });
        }
        match answer.get("result") {
            Some(result) => Ok(result.clone()),
            None if status.is_success() => Err(transport(
                &ep.label,
                "an answer with neither result nor error",
            )),
            None => Err(transport(&ep.label, format!("HTTP {status}"))),
        }
    }

    /// Calls `method` on the endpoints in failover order, with backoff between rounds. Node errors are final.
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: &'static str,
        params: Value,
    ) -> Result<T, RpcError> {
        let round = || async {
            let start = self.preferred.load(Ordering::Relaxed) % self.endpoints.len().max(1);
            let mut last = None;
            for k in 0..self.endpoints.len() {
                let i = (start + k) % self.endpoints.len();
                let ep = &self.endpoints[i];
                match self.call_once(ep, method, &params).await {
                    Ok(v) => {
                        if i != start {
                            tracing::warn!(endpoint = %ep.label, "Solana RPC failover: now using this endpoint");
                            crate::metrics::record_rpc_failover(self.network.as_deref());
                        }
                        self.preferred.store(i, Ordering::Relaxed);
                        return serde_json::from_value::<T>(v).map_err(|e| {
                            transport(&ep.label, format!("{method}: unexpected answer: {e}"))
                        });
                    }
                    Err(e) if e.is_transport() => {
                        if self.endpoints.len() > 1 {
                            tracing::warn!(error = %e, "{method} failed on this endpoint; trying the next");
                        }
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(last.unwrap_or_else(|| transport("(none)", "no RPC endpoints configured")))
        };
        round
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(MAX_RETRY_DELAY)
                    .with_max_times(self.retries)
                    .with_jitter(),
            )
            .when(RpcError::is_transport)
            .adjust(|e, delay| {
                delay.map(|d| d.max(e.retry_after().unwrap_or_default().min(MAX_RETRY_DELAY)))
            })
            .notify(|e, delay| {
                crate::metrics::record_rpc_retry(method);
                tracing::warn!(error = %e, "{method}: retrying in {delay:?}")
            })
            .await
    }

    /// The slot the node has reached at `commitment`.
    pub async fn slot(&self, commitment: &str) -> Result<u64, RpcError> {
        self.request("getSlot", json!([{"commitment": commitment}]))
            .await
    }

    /// Signatures of transactions touching `address`, newest first: those after `until` (exclusive), before
    /// `before` (exclusive), at most `limit` (≤ 1000), seen at `commitment` (`confirmed` or `finalized`).
    pub async fn signatures_for_address(
        &self,
        address: &str,
        before: Option<&str>,
        until: Option<&str>,
        limit: usize,
        commitment: &str,
    ) -> Result<Vec<SignatureInfo>, RpcError> {
        let mut config = json!({"limit": limit.clamp(1, 1000), "commitment": commitment});
        if let Some(b) = before {
            config["before"] = json!(b);
        }
        if let Some(u) = until {
            config["until"] = json!(u);
        }
        self.request("getSignaturesForAddress", json!([address, config]))
            .await
    }

    /// A transaction with its status meta, as `jsonParsed` (token instructions decoded by the node), or `None`
    /// when the node does not know it at `commitment`.
    pub async fn transaction_parsed(
        &self,
        signature: &str,
        commitment: &str,
    ) -> Result<Option<Value>, RpcError> {
        self.request(
            "getTransaction",
            json!([signature, {"encoding": "jsonParsed", "commitment": commitment, "maxSupportedTransactionVersion": 0}]),
        )
        .await
    }

    /// The statuses of `signatures` (searching the whole history), `None` for one the cluster does not know.
    pub async fn signature_statuses(
        &self,
        signatures: &[String],
    ) -> Result<Vec<Option<SignatureStatus>>, RpcError> {
        #[derive(Deserialize)]
        struct Answer {
            value: Vec<Option<SignatureStatus>>,
        }
        let mut all = Vec::with_capacity(signatures.len());
        // The RPC takes at most 256 signatures per call.
        for chunk in signatures.chunks(256) {
            let a: Answer = self
                .request(
                    "getSignatureStatuses",
                    json!([chunk, {"searchTransactionHistory": true}]),
                )
                .await?;
            if a.value.len() != chunk.len() {
                return Err(transport(
                    "(status)",
                    "getSignatureStatuses answered a different count",
                ));
            }
            all.extend(a.value);
        }
        Ok(all)
    }

    /// An account's owner, lamports and data, or `None` when it does not exist.
    pub async fn account_info(&self, address: &str) -> Result<Option<AccountInfo>, RpcError> {
        #[derive(Deserialize)]
        struct Raw {
            owner: String,
            lamports: u64,
            data: (String, String),
        }
        #[derive(Deserialize)]
        struct Answer {
            value: Option<Raw>,
        }
        let a: Answer = self
            .request("getAccountInfo", json!([address, {"encoding": "base64"}]))
            .await?;
        a.value
            .map(|raw| {
                use base64::Engine;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(raw.data.0.as_bytes())
                    .map_err(|e| {
                        transport("(account)", format!("account data is not base64: {e}"))
                    })?;
                Ok(AccountInfo {
                    owner: raw.owner,
                    lamports: raw.lamports,
                    data,
                })
            })
            .transpose()
    }

    /// Simulates a signed transaction (base64); the node's `err` (None: it would succeed) and its logs.
    pub async fn simulate(
        &self,
        transaction_base64: &str,
    ) -> Result<(Option<Value>, Vec<String>), RpcError> {
        #[derive(Deserialize)]
        struct Inner {
            #[serde(default)]
            err: Option<Value>,
            #[serde(default)]
            logs: Option<Vec<String>>,
        }
        #[derive(Deserialize)]
        struct Answer {
            value: Inner,
        }
        let a: Answer = self
            .request(
                "simulateTransaction",
                json!([transaction_base64, {"encoding": "base64", "sigVerify": true, "commitment": "confirmed"}]),
            )
            .await?;
        Ok((a.value.err, a.value.logs.unwrap_or_default()))
    }

    /// Sends a signed transaction (base64); the node's signature of it.
    pub async fn send_transaction(&self, transaction_base64: &str) -> Result<String, RpcError> {
        self.request(
            "sendTransaction",
            json!([transaction_base64, {"encoding": "base64", "preflightCommitment": "confirmed"}]),
        )
        .await
    }
}

fn transport(endpoint: &str, message: impl Into<String>) -> RpcError {
    RpcError::Transport {
        endpoint: endpoint.to_string(),
        message: message.into(),
        retry_after: None,
    }
}
