//! The payment indexer against a real anvil chain: backfill, following, confirmation depth, reorgs, restarts,
//! RPC outages and provider range limits.

use alloy::primitives::Address;
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::anvil::{ReorgOptions, TransactionData};
use x402_gateway::chain::IndexerError;
use x402_gateway::store::Store;
use x402_gateway::store::transfers::TransferStatus;
use x402_gateway::usdc::Usdc;

use crate::support::*;

fn usdc(s: &str) -> Usdc {
    s.parse().unwrap()
}

/// (a) Transfers made before start are backfilled; other recipients and other tokens are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfills_only_usdc_transfers_to_pay_to() {
    let chain = TestChain::start().await;
    let other = chain.other_token().await;
    let (t1, _) = chain.pay(0, usdc("12.50")).await;
    let (t2, _) = chain.pay(1, usdc("0.000001")).await;
    let stranger = Address::repeat_byte(0x42);
    chain
        .transfer_token(chain.token(), chain.payer(0).address(), stranger, usdc("5"))
        .await;
    chain
        .transfer_token(other, chain.payer(0).address(), chain.pay_to(), usdc("7"))
        .await;
    let (t3, _) = chain.pay(2, usdc("39.00")).await;
    chain.mine(3).await;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
    index_once(chain.settings(3), &store).await.unwrap();

    let rows = store.list_transfers(None).await.unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|t| (t.tx_hash.clone(), t.value, t.from.clone(), t.status))
        .collect();
    let from = |i: usize| format!("{:#x}", chain.payer(i).address());
    assert_eq!(
        got,
        vec![
            (t1, usdc("12.50"), from(0), TransferStatus::Confirmed),
            (t2, Usdc(1), from(1), TransferStatus::Confirmed),
            (t3, usdc("39.00"), from(2), TransferStatus::Confirmed),
        ]
    );
    assert!(
        rows.iter()
            .all(|t| t.to == format!("{:#x}", chain.pay_to()))
    );
    let head = store
        .checkpoint(crate::support::DEV_NETWORK)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.number, chain.head().await);
}

/// (b) + (c) Live following: a new payment is seen at once and confirmed at exactly the configured depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_live_and_confirms_at_exact_depth() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let indexer = RunningIndexer::start(chain.settings(5), &dir.path().join("db.sqlite"));
    indexer.wait_indexed(chain.head().await).await;

    let (tx, block) = chain.pay(0, usdc("3.25")).await;
    let seen = indexer.wait_status(&tx, TransferStatus::Seen).await;
    assert_eq!(seen.block_number, block);
    assert_eq!(seen.value, usdc("3.25"));

    // 4 confirmations (block + 3): still only seen.
    chain.mine(3).await;
    indexer.wait_indexed(block + 3).await;
    let rows = indexer.transfers_of(&tx).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].status,
        TransferStatus::Seen,
        "confirmed before the 5th confirmation"
    );
    assert_eq!(rows[0].confirmations(Some(block + 3)), 4);

    // The 5th confirmation confirms it.
    chain.mine(1).await;
    let confirmed = indexer.wait_status(&tx, TransferStatus::Confirmed).await;
    assert_eq!(confirmed.block_number, block);
    // The status snapshot is published after the commit that confirmed the row, so wait for it rather than race it.
    indexer.wait_indexed(block + 4).await;
    assert_eq!(indexer.status.snapshot().indexed_head, Some(block + 4));
    indexer.stop().await.unwrap();
}

/// (d) A reorg that drops an unconfirmed payment orphans it; it never becomes confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_that_drops_a_payment_orphans_it() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let indexer = RunningIndexer::start(chain.settings(4), &dir.path().join("db.sqlite"));
    let (tx, block) = chain.pay(0, usdc("20")).await;
    indexer.wait_status(&tx, TransferStatus::Seen).await;
    indexer.wait_indexed(block).await;

    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    let orphaned = indexer.wait_status(&tx, TransferStatus::Orphaned).await;
    assert_eq!(orphaned.block_number, block);

    // Long past the depth it would have needed: still orphaned, never confirmed.
    chain.mine(8).await;
    indexer.wait_indexed(block + 8).await;
    let rows = indexer.transfers_of(&tx).await;
    assert!(
        rows.iter().all(|t| t.status == TransferStatus::Orphaned),
        "{rows:?}"
    );
    assert!(indexer.status.snapshot().reorgs >= 1);
    assert_eq!(
        indexer
            .store
            .reorg_count(crate::support::DEV_NETWORK)
            .await
            .unwrap(),
        indexer.status.snapshot().reorgs
    );
    indexer.stop().await.unwrap();
}

/// (e) A reorg that moves the payment into another block: confirmed once, with the new block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_that_moves_a_payment_confirms_it_once_in_the_new_block() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let indexer = RunningIndexer::start(chain.settings(3), &dir.path().join("db.sqlite"));
    let (hash, raw) = chain.signed_payment(0, usdc("45")).await;
    let tx = format!("{hash:#x}");
    chain
        .provider
        .send_raw_transaction(&raw)
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    chain.mine(1).await;
    let first = indexer.wait_status(&tx, TransferStatus::Seen).await;
    indexer.wait_indexed(first.block_number + 1).await;

    // Replace the payment's block and the one after it; the same transaction lands in the second new block.
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 2,
            tx_block_pairs: vec![(TransactionData::Raw(raw), 1)],
        })
        .await
        .unwrap();
    chain.mine(3).await;
    let confirmed = indexer.wait_status(&tx, TransferStatus::Confirmed).await;
    assert_eq!(
        confirmed.block_number,
        first.block_number + 1,
        "moved into the next block"
    );
    let receipt = chain
        .provider
        .get_transaction_receipt(hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        confirmed.block_hash,
        format!("{:#x}", receipt.block_hash.unwrap())
    );

    indexer.wait_indexed(chain.head().await).await;
    let rows = indexer.transfers_of(&tx).await;
    let confirmed_rows = rows
        .iter()
        .filter(|t| t.status == TransferStatus::Confirmed)
        .count();
    assert_eq!(confirmed_rows, 1, "{rows:?}");
    assert!(
        rows.iter()
            .any(|t| t.status == TransferStatus::Orphaned && t.block_hash == first.block_hash)
    );
    indexer.stop().await.unwrap();
}

/// (f) Stop, pay and reorg while down, restart: no gap, no duplicate, the orphan is detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_gap_or_duplicate_and_sees_offline_reorg() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let indexer = RunningIndexer::start(chain.settings(6), &db);
    let (kept, _) = chain.pay(0, usdc("1")).await;
    chain.mine(1).await;
    let (dropped, dropped_block) = chain.pay(1, usdc("2")).await;
    indexer.wait_status(&dropped, TransferStatus::Seen).await;
    indexer.wait_indexed(dropped_block).await;
    indexer.stop().await.unwrap();

    // While stopped: a reorg drops the second payment, then more payments arrive.
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    let (later1, _) = chain.pay(2, usdc("3")).await;
    let (later2, _) = chain.pay(0, usdc("4")).await;
    chain.mine(6).await;

    let indexer = RunningIndexer::start(chain.settings(6), &db);
    indexer.wait_indexed(chain.head().await).await;
    indexer
        .wait_status(&dropped, TransferStatus::Orphaned)
        .await;
    for tx in [&kept, &later1, &later2] {
        let rows = indexer.transfers_of(tx).await;
        assert_eq!(rows.len(), 1, "exactly one row for {tx}: {rows:?}");
        assert_eq!(rows[0].status, TransferStatus::Confirmed);
    }
    let all = indexer.all().await;
    assert_eq!(all.len(), 4, "{all:?}");
    indexer.stop().await.unwrap();
}

/// A reorg deeper than the window stops indexing loudly instead of guessing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_deeper_than_the_window_stops_indexing() {
    let chain = TestChain::start().await;
    chain.mine(80).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut settings = chain.settings(1);
    settings.reorg_window = 10;
    let store = Store::open(&db).unwrap();
    index_once(settings.clone(), &store).await.unwrap();
    drop(store);

    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 30,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
    let indexer = RunningIndexer::start(settings, &db);
    let status = indexer.status.clone();
    let fatal = wait_for("the indexer to stop", || {
        let s = status.snapshot();
        async move { s.fatal }
    })
    .await;
    assert!(fatal.contains("deep reorg"), "{fatal}");
    assert!(matches!(
        indexer.stop().await,
        Err(IndexerError::DeepReorg { .. })
    ));
}

/// (g) RPC outage: connections cut and refused, then delayed, while payments continue — the indexer recovers and
/// catches up; and a second RPC URL takes over when the first is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_rpc_outage_and_fails_over() {
    let chain = TestChain::start().await;
    let anvil_addr = chain
        .dev
        .anvil
        .endpoint_url()
        .socket_addrs(|| None)
        .unwrap()[0];
    let proxy = TcpFaultProxy::start(anvil_addr).await;
    let mut settings = chain.settings(2);
    settings.rpc_http = vec![proxy.url()];
    let dir = tempfile::tempdir().unwrap();
    let indexer = RunningIndexer::start(settings, &dir.path().join("db.sqlite"));
    let (before, _) = chain.pay(0, usdc("1")).await;
    indexer.wait_status(&before, TransferStatus::Seen).await;

    proxy.down();
    let (during1, _) = chain.pay(1, usdc("2")).await;
    let (during2, _) = chain.pay(2, usdc("3")).await;
    chain.mine(2).await;
    let status = indexer.status.clone();
    wait_for("the outage to be noticed", || {
        let s = status.snapshot();
        async move { (s.rpc_errors > 0).then_some(()) }
    })
    .await;
    proxy.set_delay(std::time::Duration::from_millis(300));
    proxy.up();
    for tx in [&before, &during1, &during2] {
        indexer.wait_status(tx, TransferStatus::Confirmed).await;
    }
    assert_eq!(indexer.all().await.len(), 3);
    indexer.stop().await.unwrap();

    // Failover: the first URL refuses everything, the second one serves.
    proxy.down();
    let mut settings = chain.settings(2);
    settings.rpc_http = vec![proxy.url(), chain.rpc_url()];
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
    index_once(settings, &store).await.unwrap();
    assert_eq!(
        store
            .list_transfers(Some(TransferStatus::Confirmed))
            .await
            .unwrap()
            .len(),
        3
    );
}

/// (h) A provider that refuses ranges over N blocks: the indexer splits and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_ranges_the_provider_refuses() {
    let chain = TestChain::start().await;
    let mut expected = Vec::new();
    for i in 0..6 {
        expected.push(chain.pay(i % 3, Usdc(1_000_000 + i as i64)).await.0);
        chain.mine(17).await;
    }
    for hint in [false, true] {
        let proxy = RangeLimitProxy::start(chain.rpc_url(), 10, hint).await;
        let mut settings = chain.settings(2);
        settings.rpc_http = vec![proxy.url()];
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        index_once(settings, &store).await.unwrap();
        let got: Vec<String> = store
            .list_transfers(None)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.tx_hash)
            .collect();
        assert_eq!(got, expected, "hint={hint}");
        assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
        assert!(
            proxy
                .largest_served
                .load(std::sync::atomic::Ordering::SeqCst)
                <= 10
        );
        assert_eq!(
            store
                .checkpoint(crate::support::DEV_NETWORK)
                .await
                .unwrap()
                .unwrap()
                .number,
            chain.head().await
        );
    }
}

/// A backfill of many small ranges far below the head fetches each next range while the last is written: every
/// payment once, the checkpoint at the head, and a second run over the same database adds only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_fetching_ahead_has_no_gap_or_duplicate() {
    let chain = TestChain::start().await;
    let mut expected = Vec::new();
    for i in 0..8 {
        expected.push(chain.pay(i % 3, Usdc(3_000_000 + i as i64)).await.0);
        chain.mine(9 + i as u64).await;
    }
    chain.mine(100).await;
    let mut settings = chain.settings(2);
    settings.max_block_range = 7;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
    index_once(settings.clone(), &store).await.unwrap();
    let hashes = |rows: Vec<x402_gateway::store::transfers::Transfer>| -> Vec<String> {
        rows.into_iter().map(|t| t.tx_hash).collect()
    };
    assert_eq!(hashes(store.list_transfers(None).await.unwrap()), expected);
    assert_eq!(
        store
            .checkpoint(crate::support::DEV_NETWORK)
            .await
            .unwrap()
            .unwrap()
            .number,
        chain.head().await
    );

    expected.push(chain.pay(1, Usdc(3_100_000)).await.0);
    chain.mine(90).await;
    index_once(settings, &store).await.unwrap();
    assert_eq!(hashes(store.list_transfers(None).await.unwrap()), expected);
    assert_eq!(
        store
            .checkpoint(crate::support::DEV_NETWORK)
            .await
            .unwrap()
            .unwrap()
            .number,
        chain.head().await
    );
}

/// Below the reorg window, the block time comes from the log's `blockTimestamp` with no header fetched; a node
/// that does not send it (an older one) costs a header per block, with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_logs_take_their_time_from_the_log_and_old_nodes_from_the_header() {
    use alloy::providers::Provider;
    let chain = TestChain::start().await;
    let mut blocks = Vec::new();
    for i in 0..4 {
        blocks.push(chain.pay(i % 3, Usdc(2_000_000 + i as i64)).await.1);
        chain.mine(17).await;
    }
    // Out of the reorg window (64 blocks by default), which always has its headers fetched.
    chain.mine(100).await;
    let provider =
        alloy::providers::ProviderBuilder::new().connect_http(chain.rpc_url().parse().unwrap());
    let mut expected = Vec::new();
    for &b in &blocks {
        let block = provider
            .get_block_by_number(b.into())
            .await
            .unwrap()
            .unwrap();
        expected.push((b, Some(block.header.timestamp)));
    }
    for old_node in [false, true] {
        let proxy = RangeLimitProxy::start(chain.rpc_url(), 100_000, false).await;
        proxy
            .strip_log_timestamps
            .store(old_node, std::sync::atomic::Ordering::SeqCst);
        let mut settings = chain.settings(2);
        settings.rpc_http = vec![proxy.url()];
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        index_once(settings, &store).await.unwrap();
        let got: Vec<(u64, Option<u64>)> = store
            .list_transfers(None)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.block_number, t.block_time))
            .collect();
        assert_eq!(got, expected, "old_node={old_node}");
        let requested = proxy.headers_requested.lock().unwrap().clone();
        let fetched: Vec<u64> = blocks
            .iter()
            .copied()
            .filter(|b| requested.contains(b))
            .collect();
        if old_node {
            assert_eq!(fetched, blocks, "an old node's logs need their headers");
        } else {
            assert!(
                fetched.is_empty(),
                "headers fetched for deep logs: {fetched:?}"
            );
        }
    }
}

/// With `rpc_ws`, a payment is picked up through the subscription even when polling would take an hour, and
/// payments made while the WebSocket is cut are fetched by range after it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_wakes_the_indexer_and_gaps_are_fetched() {
    let chain = TestChain::start().await;
    let anvil_addr = chain
        .dev
        .anvil
        .endpoint_url()
        .socket_addrs(|| None)
        .unwrap()[0];
    let ws_proxy = TcpFaultProxy::start(anvil_addr).await;
    let mut settings = chain.settings(2);
    settings.poll_interval = std::time::Duration::from_secs(3600);
    settings.rpc_ws = Some(format!("ws://{}", ws_proxy.addr));
    let dir = tempfile::tempdir().unwrap();
    let indexer = RunningIndexer::start(settings, &dir.path().join("db.sqlite"));
    let status = indexer.status.clone();
    wait_for("the WebSocket to connect", || {
        let s = status.snapshot();
        async move { s.ws_connected.then_some(()) }
    })
    .await;
    let (tx, _) = chain.pay(0, usdc("8")).await;
    chain.mine(1).await;
    indexer.wait_status(&tx, TransferStatus::Confirmed).await;

    ws_proxy.down();
    wait_for("the WebSocket drop to be noticed", || {
        let s = status.snapshot();
        async move { (!s.ws_connected).then_some(()) }
    })
    .await;
    let (gap, _) = chain.pay(1, usdc("9")).await;
    chain.mine(1).await;
    ws_proxy.up();
    indexer.wait_status(&gap, TransferStatus::Confirmed).await;
    indexer.stop().await.unwrap();
}

/// The chain id the node reports must match the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_node_of_another_chain() {
    let chain = TestChain::start().await;
    let mut settings = chain.settings(2);
    settings.network.chain_id = 8453;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
    let err = index_once(settings, &store).await.unwrap_err();
    assert!(
        matches!(
            err,
            IndexerError::WrongChain {
                found: 31337,
                expected: 8453
            }
        ),
        "{err}"
    );
    assert!(store.list_transfers(None).await.unwrap().is_empty());
    let _ = chain.provider.get_chain_id().await;
}
