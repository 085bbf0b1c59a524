//! The HTTP transport under [`super::Rpc`]: posts JSON-RPC packets and refuses answers that do not fit the request
//! before alloy matches them to calls.
//!
//! alloy's own HTTP transport (1) turns an HTTP 429 or 5xx whose body is a JSON-RPC error into that error, so a
//! rate limit or a load balancer's outage page reads as the node's verdict on the call (for `eth_getLogs`: "range
//! too large", and the range is needlessly halved; for the rest: no retry and no failover), and (2) matches the
//! answers of a batch to its calls by id, taking the first answer of a repeated id and ignoring ids nobody asked
//! for. With (2), a broken batch answer whose first copy of the `eth_getLogs` id says `[]` reads as "no logs", and
//! the indexer moves its checkpoint past payments it never saw (the RPC fault suite caught exactly that).
//!
//! So here an HTTP 408, 429 or 5xx is always a transport fault, carrying the server's `Retry-After`; another 4xx
//! with a JSON-RPC error body is the node's answer (some providers send "range too large" that way); and a batch
//! must be answered by a batch with exactly one answer per call.
//!
//! reqwest's errors are stripped of their URL here (it may carry the provider's key); [`super::Rpc`] scrubs the
//! rest of each error text with [`super::redact::UrlSecrets`].

use std::collections::HashSet;
use std::task::{Context, Poll};
use std::time::Duration;

use alloy::rpc::json_rpc::{Id, RequestPacket, ResponsePacket};
use alloy::transports::http::reqwest::{self, StatusCode, Url, header};
use alloy::transports::{TransportError, TransportErrorKind, TransportFut};

/// A JSON-RPC over HTTP transport that checks the shape of what comes back.
#[derive(Clone)]
pub(super) struct CheckedHttp {
    client: reqwest::Client,
    url: Url,
}

impl CheckedHttp {
    pub(super) fn new(client: reqwest::Client, url: Url) -> CheckedHttp {
        CheckedHttp { client, url }
    }

    async fn send(self, request: RequestPacket) -> Result<ResponsePacket, TransportError> {
        let resp = self
            .client
            .post(self.url)
            .headers(request.headers())
            .json(&request)
            .send()
            .await
            .map_err(request_error)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match resp.bytes().await {
            Ok(body) => body,
            Err(e) if !status.is_success() => {
                return Err(TransportErrorKind::http_error_with_retry_after(
                    status.as_u16(),
                    format!("<body unreadable: {}>", e.without_url()),
                    retry_after,
                ));
            }
            Err(e) => return Err(request_error(e)),
        };
        let text = || String::from_utf8_lossy(&body).into_owned();
        if is_transient_status(status.as_u16()) {
            return Err(TransportErrorKind::http_error_with_retry_after(
                status.as_u16(),
                text(),
                retry_after,
            ));
        }
        if !status.is_success() {
            return match serde_json::from_slice::<ResponsePacket>(&body) {
                Ok(packet) if packet.is_error() => {
                    check_ids(&request, &packet)?;
                    Ok(packet)
                }
                _ => Err(TransportErrorKind::http_error_with_retry_after(
                    status.as_u16(),
                    text(),
                    retry_after,
                )),
            };
        }
        let packet: ResponsePacket =
            serde_json::from_slice(&body).map_err(|e| TransportError::deser_err(e, text()))?;
        check_ids(&request, &packet)?;
        Ok(packet)
    }
}

/// A reqwest error as a transport error: without its URL (which names the provider's key) but with its causes
/// ("error sending request: client error (Connect): tcp connect error: Connection refused"), which reqwest's own
/// text leaves out.
fn request_error(e: reqwest::Error) -> TransportError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    TransportErrorKind::custom_str(&text)
}

/// Statuses that say nothing about the call itself: the server is busy, rate limiting, or broken.
pub(super) fn is_transient_status(status: u16) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS.as_u16()
        || status == StatusCode::REQUEST_TIMEOUT.as_u16()
        || StatusCode::from_u16(status).is_ok_and(|s| s.is_server_error())
}

/// A batch must come back as a batch holding exactly one answer for each call. (A single call is matched by alloy
/// whatever id it carries, so one answer is all it can take.)
fn check_ids(request: &RequestPacket, response: &ResponsePacket) -> Result<(), TransportError> {
    let RequestPacket::Batch(calls) = request else {
        return Ok(());
    };
    let ResponsePacket::Batch(answers) = response else {
        return Err(TransportErrorKind::custom_str(
            "malformed batch answer: a single object for a batch of calls",
        ));
    };
    let asked: HashSet<&Id> = calls.iter().map(|c| c.id()).collect();
    let mut answered = HashSet::with_capacity(answers.len());
    for answer in answers {
        if !asked.contains(&answer.id) {
            return Err(TransportErrorKind::custom_str(&format!(
                "malformed batch answer: id {} was not asked for",
                answer.id
            )));
        }
        if !answered.insert(&answer.id) {
            return Err(TransportErrorKind::custom_str(&format!(
                "malformed batch answer: id {} answered twice",
                answer.id
            )));
        }
    }
    if answered.len() != asked.len() {
        return Err(TransportErrorKind::custom_str(&format!(
            "malformed batch answer: {} answers for {} calls",
            answered.len(),
            asked.len()
        )));
    }
    Ok(())
}

impl tower::Service<RequestPacket> for CheckedHttp {
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RequestPacket) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::rpc::json_rpc::Request;

    fn batch(ids: &[u64]) -> RequestPacket {
        ids.iter()
            .map(|id| {
                Request::new("eth_blockNumber", Id::Number(*id), ())
                    .serialize()
                    .unwrap()
            })
            .collect()
    }

    fn answer(json: &str) -> ResponsePacket {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_batch_needs_exactly_one_answer_per_call() {
        let request = batch(&[1, 2]);
        let ok = answer(
            r#"[{"jsonrpc":"2.0","id":2,"result":"0x1"},{"jsonrpc":"2.0","id":1,"result":"0x2"}]"#,
        );
        assert!(check_ids(&request, &ok).is_ok(), "order does not matter");
        for bad in [
            // The first copy of a repeated id would win in alloy.
            r#"[{"jsonrpc":"2.0","id":1,"result":[]},{"jsonrpc":"2.0","id":1,"result":"0x2"},{"jsonrpc":"2.0","id":2,"result":"0x1"}]"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":"0x2"}]"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":"0x2"},{"jsonrpc":"2.0","id":9,"result":"0x1"}]"#,
            r#"{"jsonrpc":"2.0","id":1,"result":"0x2"}"#,
        ] {
            assert!(check_ids(&request, &answer(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_and_outages_are_transient_other_client_errors_are_not() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(status), "{status}");
        }
        for status in [200, 400, 404, 413] {
            assert!(!is_transient_status(status), "{status}");
        }
    }
}
