//! The optional WebSocket wake-up: `newHeads` and filtered `Transfer` logs.
//!
//! A subscription is only a signal. Announced logs are recorded as `seen` at once (so an agent sees its payment
//! the moment it is mined), and every notification wakes the indexer, whose block-range fetch stays the truth. A
//! dropped connection loses the notifications sent during the gap; that is harmless because the range fetch reads
//! them anyway, and the loop reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::indexer::{TRANSFER_TOPIC, transfer_from_log};
use super::redact::{UrlSecrets, redact_url};
use super::rpc::RawLog;
use super::status::StatusHandle;
use crate::config::ChainSettings;
use crate::store::Store;

/// Buffer for notifications: a slow consumer must not silently skip announced payments.
const CHANNEL_SIZE: usize = 1024;

/// Runs until `shutdown`, reconnecting as needed.
pub async fn follow(
    url: String,
    settings: ChainSettings,
    store: Store,
    wake: Arc<Notify>,
    status: StatusHandle,
    shutdown: CancellationToken,
) {
    let label = redact_url(&url);
    // alloy's and tungstenite's error texts may name the URL (and its key).
    let secrets = UrlSecrets::new([url.as_str()]);
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let session = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&url, &settings, &store, &wake, &status) => r,
        };
        status.update(|s| s.ws_connected = false);
        // Whatever was announced during the gap is fetched by range.
        wake.notify_one();
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        match session {
            Ok(()) => {
                tracing::warn!(endpoint = %label, "WebSocket subscription ended; reconnecting in {delay:?}")
            }
            Err(e) => {
                let e = secrets.scrub(&e);
                tracing::warn!(endpoint = %label, error = %e, "WebSocket failed; reconnecting in {delay:?}")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    url: &str,
    settings: &ChainSettings,
    store: &Store,
    wake: &Notify,
    status: &StatusHandle,
) -> Result<(), String> {
    // One quiet reconnect attempt at most: past that the streams end and this module reconnects itself, so it
    // knows to wake the indexer for the gap. (A quiet reconnect that succeeds is followed by `newHeads`, which
    // wake it anyway.)
    let connect = WsConnect::new(url)
        .with_max_retries(1)
        .with_retry_interval(Duration::from_millis(200));
    let provider = ProviderBuilder::new()
        .connect_ws(connect)
        .await
        .map_err(|e| e.to_string())?;
    let (network, tokens) = (settings.network.caip2(), settings.tokens());
    let filter = json!({
        "address": tokens.iter().map(|t| t.address).collect::<Vec<_>>(),
        "topics": [TRANSFER_TOPIC, Value::Null, alloy::primitives::B256::left_padding_from(settings.pay_to.as_slice())],
    });
    let heads = provider
        .subscribe::<_, Value>(("newHeads",))
        .channel_size(CHANNEL_SIZE)
        .await
        .map_err(|e| e.to_string())?;
    let logs = provider
        .subscribe::<_, RawLog>(("logs", filter))
        .channel_size(CHANNEL_SIZE)
        .await
        .map_err(|e| e.to_string())?;
    status.update(|s| s.ws_connected = true);
    // Anything announced while we were not subscribed is fetched by range now.
    wake.notify_one();
    tracing::info!(endpoint = %redact_url(url), "WebSocket subscriptions live (newHeads, Transfer logs)");
    let mut heads = heads.into_stream();
    let mut logs = logs.into_stream();
    loop {
        tokio::select! {
            head = heads.next() => match head {
                Some(_) => wake.notify_one(),
                None => return Ok(()),
            },
            log = logs.next() => match log {
                Some(log) => {
                    if let Ok(Some(t)) = transfer_from_log(&log, &network, &tokens, settings.pay_to) {
                        match store.record_announced(t.clone()).await {
                            Ok(true) => tracing::info!(tx = %t.tx_hash, from = %t.from, amount = %t.value, "payment announced over WebSocket: seen"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, "could not record an announced payment; the range fetch will"),
                        }
                    }
                    wake.notify_one();
                }
                None => return Ok(()),
            },
        }
    }
}
