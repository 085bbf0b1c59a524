//! JSON-RPC over HTTP with failover, retries and error classification.
//!
//! Endpoints are tried in the configured order; the one that last answered is tried first next time. Transport
//! faults (refused or cut connections, timeouts, HTTP 408/429/5xx whatever their body, malformed JSON, a batch
//! answer that does not hold one answer per call, a node that does not know a block) are retried with exponential
//! backoff and jitter, never sooner than a `Retry-After` asks, and fail over to the next endpoint. Node errors (a
//! JSON-RPC `error` object) are returned to the caller, which knows whether they mean "range too large".

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alloy::primitives::{Address, B256, Bloom, Bytes, U64, U128};
use alloy::rpc::client::RpcClient;
use alloy::transports::http::reqwest;
use alloy::transports::{RpcError as AlloyRpcError, TransportErrorKind};
use backon::{ExponentialBuilder, Retryable};
use serde::Deserialize;
use serde_json::{Value, json};

use super::redact::{UrlSecrets, redact_url};
use super::transport::{CheckedHttp, is_transient_status};
use crate::store::transfers::BlockRef;

/// Largest number of requests put in one JSON-RPC batch.
const MAX_BATCH: usize = 100;
/// Header batches sent at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// Longest wait between retry rounds; also caps a server's `Retry-After`, so a provider cannot park a caller.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// A failed RPC call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The endpoint could not be reached or answered garbage; worth retrying elsewhere.
    #[error("{endpoint}: {message}")]
    Transport {
        endpoint: String,
        message: String,
        /// How long the server asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The node answered with a JSON-RPC error.
    #[error("{endpoint}: node error {code}: {message}")]
    Node {
        endpoint: String,
        code: i64,
        message: String,
    },
}

impl RpcError {
    pub fn is_transport(&self) -> bool {
        matches!(self, RpcError::Transport { .. })
    }

    fn transport(endpoint: impl Into<String>, message: impl Into<String>) -> RpcError {
        RpcError::Transport {
            endpoint: endpoint.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// How long the server asked us to wait before the next try, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RpcError::Transport { retry_after, .. } => *retry_after,
            RpcError::Node { .. } => None,
        }
    }
}

/// A block header as the indexer needs it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHeader {
    number: U64,
    hash: B256,
    parent_hash: B256,
    timestamp: U64,
    logs_bloom: Bloom,
}

impl From<RawHeader> for BlockRef {
    fn from(h: RawHeader) -> BlockRef {
        BlockRef {
            number: h.number.to::<u64>(),
            hash: format!("{:#x}", h.hash),
            parent_hash: format!("{:#x}", h.parent_hash),
            timestamp: h.timestamp.to::<u64>(),
        }
    }
}

/// An `eth_getLogs` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawLog {
    pub address: Address,
    pub topics: Vec<B256>,
    pub data: Bytes,
    pub block_number: Option<U64>,
    pub block_hash: Option<B256>,
    pub transaction_hash: Option<B256>,
    pub log_index: Option<U64>,
    /// The block's timestamp, which current nodes (geth ≥ 1.16, reth, op-geth, anvil) put on each log; older ones
    /// do not, and then the indexer fetches the block header for it.
    #[serde(default)]
    pub block_timestamp: Option<U64>,
    #[serde(default)]
    pub removed: bool,
}

/// An `eth_getTransactionReceipt` answer, as far as settlement needs it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawReceipt {
    pub transaction_hash: B256,
    pub block_number: Option<U64>,
    pub block_hash: Option<B256>,
    /// `0x1` success, `0x0` reverted.
    pub status: Option<U64>,
    #[serde(default)]
    pub logs: Vec<RawLog>,
}

impl RawReceipt {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s == U64::from(1))
    }
}

#[derive(Clone)]
struct Endpoint {
    label: String,
    client: RpcClient,
    /// The secrets of every configured URL: an error text is scrubbed of all of them, not only its own.
    secrets: Arc<UrlSecrets>,
}

/// A set of JSON-RPC endpoints used as one.
pub struct Rpc {
    endpoints: Vec<Endpoint>,
    preferred: AtomicUsize,
    retries: usize,
    /// CAIP-2 id of the network the endpoints serve, for the per-network failover count.
    network: Option<String>,
}

impl Rpc {
    /// Builds clients for `urls`; `timeout` bounds each HTTP request.
    pub fn new(urls: &[String], timeout: Duration) -> Result<Rpc, RpcError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| RpcError::transport("http client", e.without_url().to_string()))?;
        let secrets = Arc::new(UrlSecrets::new(urls.iter().map(String::as_str)));
        let endpoints = urls
            .iter()
            .map(|url| {
                let parsed = url.parse().map_err(|e| {
                    RpcError::transport(redact_url(url), format!("invalid URL: {e}"))
                })?;
                let transport = CheckedHttp::new(http.clone(), parsed);
                let is_local = url.contains("127.0.0.1") || url.contains("localhost");
                Ok(Endpoint {
                    label: redact_url(url),
                    client: RpcClient::new(transport, is_local),
                    secrets: secrets.clone(),
                })
            })
            .collect::<Result<Vec<_>, RpcError>>()?;
        Ok(Rpc {
            endpoints,
            preferred: AtomicUsize::new(0),
            retries: 4,
            network: None,
        })
    }

    /// Sets how many times a round over all endpoints is retried after transport faults.
    pub fn with_retries(mut self, retries: usize) -> Rpc {
        self.retries = retries;
        self
    }

    /// Names the network (CAIP-2) these endpoints serve: failovers are counted per network (`/metrics`, `/admin`).
    pub fn for_network(mut self, network: String) -> Rpc {
        self.network = Some(network);
        self
    }

    /// Runs `op` against the endpoints in failover order, with backoff between rounds. Node errors are final.
    async fn with_failover<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RpcError>
    where
        F: Fn(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, RpcError>>,
    {
        let round = || async {
            let start = self.preferred.load(Ordering::Relaxed);
            let mut last = None;
            for k in 0..self.endpoints.len() {
                let i = (start + k) % self.endpoints.len();
                let endpoint = &self.endpoints[i];
                match op(endpoint.clone()).await {
                    Ok(v) => {
                        if i != start {
                            tracing::warn!(endpoint = %endpoint.label, "RPC failover: now using this endpoint");
                            crate::metrics::record_rpc_failover(self.network.as_deref());
                        }
                        self.preferred.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(e) if e.is_transport() => {
                        if self.endpoints.len() > 1 {
                            tracing::warn!(error = %e, "{what} failed on this endpoint; trying the next");
                        }
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(last
                .unwrap_or_else(|| RpcError::transport("(none)", "no RPC endpoints configured")))
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
            // A rate-limited endpoint that says when to come back is not asked again sooner.
            .adjust(|e, delay| {
                delay.map(|d| d.max(e.retry_after().unwrap_or_default().min(MAX_RETRY_DELAY)))
            })
            .notify(|e, delay| {
                crate::metrics::record_rpc_retry(what);
                tracing::warn!(error = %e, "{what}: retrying in {delay:?}")
            })
            .await
    }

    async fn request<
        T: serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + Unpin + 'static,
    >(
        &self,
        method: &'static str,
        params: Value,
    ) -> Result<T, RpcError> {
        self.with_failover(method, |ep| {
            let params = params.clone();
            async move {
                ep.client
                    .request::<_, T>(method, params)
                    .await
                    .map_err(|e| classify(&ep, e))
            }
        })
        .await
    }

    /// The chain id the node reports.
    pub async fn chain_id(&self) -> Result<u64, RpcError> {
        let id: U64 = self.request("eth_chainId", json!([])).await?;
        Ok(id.to::<u64>())
    }

    /// The latest block number.
    pub async fn block_number(&self) -> Result<u64, RpcError> {
        let n: U64 = self.request("eth_blockNumber", json!([])).await?;
        Ok(n.to::<u64>())
    }

    /// Headers of `numbers`, in the same order, fetched in JSON-RPC batches from one endpoint. A block the node
    /// does not know (a lagging backend) is a transport error, so another endpoint or a later retry is used.
    pub async fn headers(&self, numbers: &[u64]) -> Result<Vec<BlockRef>, RpcError> {
        Ok(self
            .headers_with_blooms(numbers)
            .await?
            .into_iter()
            .map(|(header, _)| header)
            .collect())
    }

    /// [`Rpc::headers`], each with the block's `logsBloom`.
    pub async fn headers_with_blooms(
        &self,
        numbers: &[u64],
    ) -> Result<Vec<(BlockRef, Bloom)>, RpcError> {
        let mut out = Vec::with_capacity(numbers.len());
        for group in numbers.chunks(MAX_BATCH * BATCHES_IN_FLIGHT) {
            let batches: Vec<_> = group
                .chunks(MAX_BATCH)
                .map(|chunk| self.header_batch(chunk))
                .collect();
            for batch in futures::future::try_join_all(batches).await? {
                out.extend(batch);
            }
        }
        Ok(out)
    }

    async fn header_batch(&self, chunk: &[u64]) -> Result<Vec<(BlockRef, Bloom)>, RpcError> {
        self.with_failover("eth_getBlockByNumber", |ep| async move {
            let mut batch = ep.client.new_batch();
            let mut waiters = Vec::with_capacity(chunk.len());
            for n in chunk {
                let w = batch
                    .add_call::<_, Option<RawHeader>>(
                        "eth_getBlockByNumber",
                        &(U64::from(*n), false),
                    )
                    .map_err(|e| classify(&ep, e))?;
                waiters.push(w);
            }
            batch.send().await.map_err(|e| classify(&ep, e))?;
            let mut headers = Vec::with_capacity(chunk.len());
            for (w, n) in waiters.into_iter().zip(chunk) {
                match w.await.map_err(|e| classify(&ep, e))? {
                    // Answers are matched to calls by id only: a header must also be the block asked for.
                    Some(h) if h.number.to::<u64>() == *n => {
                        headers.push((BlockRef::from(h.clone()), h.logs_bloom));
                    }
                    Some(h) => {
                        return Err(RpcError::transport(
                            ep.label.clone(),
                            format!("asked for block {n}, answered with block {}", h.number),
                        ));
                    }
                    None => {
                        return Err(RpcError::transport(
                            ep.label.clone(),
                            format!("node does not know block {n} yet"),
                        ));
                    }
                }
            }
            Ok(headers)
        })
        .await
    }

    /// `eth_getLogs` for `filter` over `[from, to]`, batched with the header of `to` so both answers come from the
    /// same backend: a lagging node that does not know `to` yet cannot pass off an empty list as the truth.
    pub async fn logs_with_header(
        &self,
        tokens: &[Address],
        topics: &Value,
        from: u64,
        to: u64,
    ) -> Result<(Vec<RawLog>, BlockRef), RpcError> {
        let filter = json!({
            "address": tokens,
            "topics": topics,
            "fromBlock": format!("{from:#x}"),
            "toBlock": format!("{to:#x}"),
        });
        self.with_failover("eth_getLogs", |ep| {
            let filter = filter.clone();
            async move {
                let mut batch = ep.client.new_batch();
                let logs = batch
                    .add_call::<_, Vec<RawLog>>("eth_getLogs", &[filter])
                    .map_err(|e| classify(&ep, e))?;
                let header = batch
                    .add_call::<_, Option<RawHeader>>(
                        "eth_getBlockByNumber",
                        &(U64::from(to), false),
                    )
                    .map_err(|e| classify(&ep, e))?;
                batch.send().await.map_err(|e| classify(&ep, e))?;
                let logs = logs.await.map_err(|e| classify(&ep, e))?;
                let header = header.await.map_err(|e| classify(&ep, e))?.ok_or_else(|| {
                    RpcError::transport(
                        ep.label.clone(),
                        format!("node does not know block {to} yet"),
                    )
                })?;
                if header.number.to::<u64>() != to {
                    return Err(RpcError::transport(
                        ep.label.clone(),
                        format!(
                            "asked for block {to}, answered with block {}",
                            header.number
                        ),
                    ));
                }
                Ok((logs, BlockRef::from(header)))
            }
        })
        .await
    }

    /// `eth_getLogs` for `filter` in the one block `hash` (EIP-234): a node that does not have that block answers
    /// with an error, never with an empty list.
    pub async fn logs_in_block(
        &self,
        tokens: &[Address],
        topics: &Value,
        hash: B256,
    ) -> Result<Vec<RawLog>, RpcError> {
        let filter = json!({ "address": tokens, "topics": topics, "blockHash": hash });
        self.request("eth_getLogs", json!([filter])).await
    }

    /// `eth_call` of `data` to `to` at the latest block.
    pub async fn call(&self, to: Address, data: Bytes) -> Result<Bytes, RpcError> {
        self.request("eth_call", json!([{ "to": to, "data": data }, "latest"]))
            .await
    }

    /// Code at `address` (empty for an externally owned account).
    pub async fn code(&self, address: Address) -> Result<Bytes, RpcError> {
        self.request("eth_getCode", json!([address, "latest"]))
            .await
    }

    /// `eth_call` of `data` to `to` at the latest block, sent as `from` (when given).
    pub async fn call_from(
        &self,
        from: Option<Address>,
        to: Address,
        data: Bytes,
    ) -> Result<Bytes, RpcError> {
        let mut tx = json!({ "to": to, "data": data });
        if let Some(from) = from {
            tx["from"] = json!(from);
        }
        self.request("eth_call", json!([tx, "latest"])).await
    }

    /// Gas `data` to `to` from `from` would use (a node error if it would revert).
    pub async fn estimate_gas(
        &self,
        from: Address,
        to: Address,
        data: Bytes,
    ) -> Result<u64, RpcError> {
        let gas: U64 = self
            .request(
                "eth_estimateGas",
                json!([{ "from": from, "to": to, "data": data }]),
            )
            .await?;
        Ok(gas.to::<u64>())
    }

    /// The next nonce of `address`, counting its pending transactions.
    pub async fn pending_nonce(&self, address: Address) -> Result<u64, RpcError> {
        let n: U64 = self
            .request("eth_getTransactionCount", json!([address, "pending"]))
            .await?;
        Ok(n.to::<u64>())
    }

    /// The node's gas price suggestion (base fee + tip), in wei.
    pub async fn gas_price(&self) -> Result<u128, RpcError> {
        let p: U128 = self.request("eth_gasPrice", json!([])).await?;
        Ok(p.to::<u128>())
    }

    /// The node's priority fee suggestion, in wei.
    pub async fn max_priority_fee(&self) -> Result<u128, RpcError> {
        let p: U128 = self.request("eth_maxPriorityFeePerGas", json!([])).await?;
        Ok(p.to::<u128>())
    }

    /// Submits a signed transaction; returns the hash the node reports.
    pub async fn send_raw_transaction(&self, raw: Bytes) -> Result<B256, RpcError> {
        self.request("eth_sendRawTransaction", json!([raw])).await
    }

    /// The receipt of `tx`, `None` while it is not mined.
    pub async fn receipt(&self, tx: B256) -> Result<Option<RawReceipt>, RpcError> {
        self.request("eth_getTransactionReceipt", json!([tx])).await
    }
}

/// The [`RpcError`] of an alloy error on `ep`, its texts scrubbed of the URLs' secrets (alloy's and reqwest's
/// messages, and a provider's error page, may hold the URL or its path).
fn classify(ep: &Endpoint, e: AlloyRpcError<TransportErrorKind>) -> RpcError {
    match classify_unscrubbed(&ep.label, e) {
        RpcError::Transport {
            endpoint,
            message,
            retry_after,
        } => RpcError::Transport {
            endpoint,
            message: ep.secrets.scrub(&message),
            retry_after,
        },
        RpcError::Node {
            endpoint,
            code,
            message,
        } => RpcError::Node {
            endpoint,
            code,
            message: ep.secrets.scrub(&message),
        },
    }
}

fn classify_unscrubbed(endpoint: &str, e: AlloyRpcError<TransportErrorKind>) -> RpcError {
    let endpoint = endpoint.to_string();
    match e {
        AlloyRpcError::ErrorResp(payload) => RpcError::Node {
            endpoint,
            code: payload.code,
            message: payload.message.to_string(),
        },
        AlloyRpcError::NullResp => RpcError::transport(endpoint, "null response"),
        AlloyRpcError::DeserError { err, text } => {
            let snippet: String = text.chars().take(120).collect();
            RpcError::transport(endpoint, format!("malformed response ({err}): {snippet}"))
        }
        AlloyRpcError::Transport(kind) if kind.as_http_error().is_some() => {
            let retry_after = kind.retry_after();
            let (status, body) = kind
                .as_http_error()
                .map_or((0, ""), |http| (http.status, http.body.as_str()));
            // Some providers send "range too large" as an HTTP 4xx with a JSON-RPC body; keep it a node error.
            // Never for 408, 429 or 5xx: those are a rate limit or an outage whatever the body says, and taking
            // them for the node's verdict would halve the logs range or skip the retry and the failover.
            if !is_transient_status(status)
                && let Ok(v) = serde_json::from_str::<Value>(body)
                && let Some(err) = v.get("error")
            {
                return RpcError::Node {
                    endpoint,
                    code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                    message: err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                };
            }
            let snippet: String = body.chars().take(200).collect();
            RpcError::Transport {
                endpoint,
                message: format!("HTTP {status}: {snippet}"),
                retry_after,
            }
        }
        other => RpcError::transport(endpoint, other.to_string()),
    }
}

/// The range a provider suggests in a "range too large" message, if it names one:
/// `this block range should work: [0x1, 0x7d0]`, `try with this block range [1, 2000]`,
/// `retry with the range 100-199`.
pub fn suggested_range(message: &str) -> Option<(u64, u64)> {
    fn number(s: &str) -> Option<u64> {
        let s = s.trim().trim_matches(|c: char| c == '"' || c == '\'');
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    }
    if let Some(open) = message.find('[')
        && let Some(close) = message[open..].find(']')
    {
        let inner = &message[open + 1..open + close];
        let mut parts = inner.split(',');
        if let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next())
            && let (Some(a), Some(b)) = (number(a), number(b))
            && a <= b
        {
            return Some((a, b));
        }
    }
    let lower = message.to_ascii_lowercase();
    if let Some(pos) = lower.find("range ") {
        let rest = &message[pos + "range ".len()..];
        let token: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<String>();
        if let Some((a, b)) = token.split_once('-')
            && let (Some(a), Some(b)) = (number(a), number(b))
            && a <= b
        {
            return Some((a, b));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_provider_range_hints() {
        assert_eq!(
            suggested_range(
                "query returned more than 10000 results. Try with this block range [0x1, 0x7D0]."
            ),
            Some((1, 2000))
        );
        assert_eq!(
            suggested_range("this block range should work: [100, 150]"),
            Some((100, 150))
        );
        assert_eq!(
            suggested_range("please retry with the range 5000-5999"),
            Some((5000, 5999))
        );
        assert_eq!(suggested_range("block range too large"), None);
        assert_eq!(suggested_range("range [9, 3] is weird"), None);
    }
}
