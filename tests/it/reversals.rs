//! Claimed payments that a reorg removes (issue 13, hole 8), against real anvil reorgs and the real server: the
//! purchase is reversed at once (credits taken back, possibly below zero; subscription keys suspended; a
//! `claim_reversals` row), restored when the same transaction is mined again, never reversed twice across
//! restarts, and an x402 settlement whose re-submission fails loses its credits too. `audit verify` stays clean.

use alloy::eips::Encodable2718;
use alloy::network::{Ethereum, EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, Bytes};
use alloy::providers::Provider;
use alloy::providers::ext::AnvilApi;
use alloy::rpc::types::TransactionRequest;
use alloy::rpc::types::anvil::{ReorgOptions, TransactionData};
use alloy::signers::SignerSync;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::store::reversals::{self, ReversalEvent};
use x402_gateway::store::{Store, StoreError};
use x402_gateway::usdc::Usdc;
use x402_gateway::x402::eip3009::{Rsv, transfer_vrs_call};
use x402_gateway::x402::{PaymentPayload, header};

use crate::proxy::{Stack, messages};
use crate::support::*;
use crate::x402_routes::{Mode, X402Gateway, pay_header, payment_response};

fn usdc(s: &str) -> Usdc {
    s.parse().unwrap()
}

fn claim_sig(chain: &TestChain, payer: usize, tx: &str) -> String {
    let sig = chain
        .payer(payer)
        .sign_message_sync(claim_text(tx, 31337).as_bytes())
        .unwrap();
    format!("0x{}", alloy::hex::encode(sig.as_bytes()))
}

/// Sends a signed payment (kept, to mine the very same transaction again after a reorg); returns its block.
async fn send(chain: &TestChain, raw: &Bytes) -> u64 {
    let pending = chain.provider.send_raw_transaction(raw).await.unwrap();
    let receipt = chain.receipt(*pending.tx_hash()).await;
    assert!(receipt.status());
    receipt.block_number.unwrap()
}

/// Replaces the top `depth` blocks with empty ones: every payment in them leaves the chain.
async fn reorg(chain: &TestChain, depth: u64) {
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth,
            tx_block_pairs: vec![],
        })
        .await
        .unwrap();
}

async fn account_balance(store: &Store, account: Address) -> Usdc {
    let a = format!("{account:#x}");
    store
        .read(move |c| -> Result<_, StoreError> { x402_gateway::store::billing::balance(c, &a) })
        .await
        .unwrap()
}

async fn events(store: &Store) -> Vec<ReversalEvent> {
    store
        .read(|c| -> Result<_, StoreError> { reversals::list(c) })
        .await
        .unwrap()
}

/// Ledger rows of `kind` of the account.
async fn ledger_kinds(store: &Store, account: Address, kind: &str) -> Vec<Usdc> {
    let a = format!("{account:#x}");
    let kind = kind.to_string();
    store
        .read(move |c| -> Result<_, StoreError> { x402_gateway::store::billing::ledger_of(c, &a) })
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.amount_usdc)
        .collect()
}

async fn wait_events(store: &Store, n: usize) -> Vec<ReversalEvent> {
    wait_for(&format!("{n} reversal events"), || async {
        let ev = events(store).await;
        (ev.len() >= n).then_some(ev)
    })
    .await
}

/// `audit verify` against the chain, for the gateway's config.
async fn audit(gw: &Gateway, store: &Store) -> x402_gateway::audit::verify::Report {
    x402_gateway::audit::verify::verify(&gw.settings(), store, &mut |_| {})
        .await
        .unwrap()
}

async fn chat(s: &Stack, key: &str) -> (StatusCode, Value) {
    let resp = s
        .chat(
            key,
            json!({"model": "demo", "messages": messages("one two three"), "max_tokens": 7}),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// (a) A credit top-up claimed and partly spent, then reorged out: the balance drops by the claim (below zero),
/// the key gets the 402 top-up answer, a reversal is recorded; mined again: balance and key come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_credit_topup_reorged_out_goes_negative_and_comes_back_when_mined_again() {
    let s = Stack::start(0).await;
    let store = s.gw.store().await;
    let payer = s.chain.payer(0).address();
    let (hash, raw) = s.chain.signed_payment(0, usdc("2")).await;
    let tx = format!("{hash:#x}");
    let block = send(&s.chain, &raw).await;
    s.gw.confirm(&s.chain, block, 1).await;
    let (status, _, body) =
        s.gw.post(
            "/api/agent/topup",
            json!({"txHash": tx, "amount": "2", "signature": claim_sig(&s.chain, 0, &tx)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["data"]["apiKey"].as_str().unwrap().to_string();

    // Spend from it: 20 atomic (3 prompt words, 7 completion tokens).
    let (status, answer) = chat(&s, &key).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(account_balance(&store, payer).await, Usdc(2_000_000 - 20));

    // The block with the payment is replaced: the claim is reversed at once.
    assert_eq!(
        s.chain.head().await,
        block,
        "the payment is in the head block"
    );
    reorg(&s.chain, 1).await;
    let ev = wait_events(&store, 1).await;
    assert_eq!(ev[0].kind, "reversed");
    assert_eq!(ev[0].claim_tx, tx);
    assert_eq!(ev[0].amount_usdc, usdc("2"));
    assert_eq!(ev[0].cause, "reorg");
    assert_eq!(account_balance(&store, payer).await, Usdc(-20));
    assert_eq!(
        ledger_kinds(&store, payer, "reversal").await,
        vec![Usdc(-2_000_000)]
    );
    // The key cannot spend: the 402 with the catalog and the balance in the message.
    let (status, answer) = chat(&s, &key).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("balance -0.00002 USDC"),
        "{answer}"
    );
    let (_, _, usage) = s.gw.get("/v1/usage", Some(&key)).await;
    assert_eq!(usage["credits"]["balanceUsdc"], "-0.00002", "{usage}");
    // An auditor sees the reversal and no discrepancy (the negative balance is explained by it).
    let report = audit(&s.gw, &store).await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert_eq!(report.reversals.len(), 1);

    // The very same transaction is mined again: restored, and the key spends again.
    let again = send(&s.chain, &raw).await;
    s.gw.confirm(&s.chain, again, 1).await;
    let ev = wait_events(&store, 2).await;
    assert_eq!(ev[1].kind, "restored");
    assert_eq!(ev[1].tx_hash.as_deref(), Some(tx.as_str()));
    assert_eq!(account_balance(&store, payer).await, Usdc(2_000_000 - 20));
    assert_eq!(
        ledger_kinds(&store, payer, "reinstatement").await,
        vec![usdc("2")]
    );
    let (status, answer) = chat(&s, &key).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let report = audit(&s.gw, &store).await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert_eq!(report.reversals.len(), 2);
    // The auditor's view of the payment shows both, and the ledger rows that went with them.
    let detail = x402_gateway::audit::payment_detail(&store, &tx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail["reversals"][0]["kind"], "reversed", "{detail}");
    assert_eq!(detail["reversals"][1]["kind"], "restored", "{detail}");
    let kinds: Vec<&str> = detail["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["topup", "reversal", "reinstatement"], "{detail}");
}

/// (b) A pool subscription claimed, then reorged out: its key is refused (402 naming the suspension) while its
/// seat stays held; mined again: the key works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_pool_subscription_reorged_out_is_suspended_then_restored() {
    let s = Stack::start(0).await;
    let store = s.gw.store().await;
    let (hash, raw) = s.chain.signed_payment(1, usdc("3.50")).await;
    let tx = format!("{hash:#x}");
    let block = send(&s.chain, &raw).await;
    s.gw.confirm(&s.chain, block, 1).await;
    let (status, _, body) = s
        .gw
        .post(
            "/api/agent/subscribe-pool",
            json!({"txHash": tx, "poolSlug": "p", "blocks": ["asia"], "signature": claim_sig(&s.chain, 1, &tx)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["data"]["apiKey"].as_str().unwrap().to_string();
    let (status, answer) = chat(&s, &key).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let payer = s.chain.payer(1).address();
    // 0.50 paid beyond the price became credits.
    assert_eq!(account_balance(&store, payer).await, usdc("0.50"));

    reorg(&s.chain, 1).await;
    let ev = wait_events(&store, 1).await;
    assert_eq!(ev[0].kind, "reversed");
    assert_eq!(ev[0].amount_usdc, usdc("0.50"), "the surplus credits");
    assert_eq!(account_balance(&store, payer).await, Usdc::ZERO);
    let (status, answer) = chat(&s, &key).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("is suspended"), "{message}");
    assert!(message.contains(&tx), "{message}");
    // The seat stays held while suspended.
    let (_, _, plans) = s.gw.get("/api/agent/plans", None).await;
    assert!(
        plans.to_string().contains("\"availableSeats\":4"),
        "{plans}"
    );

    let again = send(&s.chain, &raw).await;
    s.gw.confirm(&s.chain, again, 1).await;
    let ev = wait_events(&store, 2).await;
    assert_eq!(ev[1].kind, "restored");
    assert_eq!(account_balance(&store, payer).await, usdc("0.50"));
    let (status, answer) = chat(&s, &key).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let report = audit(&s.gw, &store).await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

/// (c) An x402 credits settlement reorged out whose re-submission fails: its credits are reversed, not only its
/// key revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_x402_credits_settlement_that_cannot_be_resubmitted_loses_its_credits() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let store = gw.store().await;
    let path = "/x402/credits/10";
    let payer = chain.payer(1).clone();
    let all = crate::x402_routes::balance(&chain, payer.address()).await;
    let pay = pay_header(&gw, &chain, &payer, path, |_| {}).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tx = payment_response(&headers, "payment-response")["transaction"]
        .as_str()
        .unwrap()
        .to_string();
    let t = tx.clone();
    wait_for("the settlement indexed", || {
        let (store, t) = (store.clone(), t.clone());
        async move {
            (!store
                .transfers_of_tx(crate::support::DEV_NETWORK, t)
                .await
                .unwrap()
                .is_empty())
            .then_some(())
        }
    })
    .await;
    assert_eq!(account_balance(&store, payer.address()).await, usdc("10"));

    // In the new chain the payer's funds went elsewhere: the authorization cannot be settled again.
    let amount = Usdc(i64::try_from(all).unwrap());
    let (_, raw) = chain
        .signed_payment_to(1, Address::repeat_byte(0x99), amount)
        .await;
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![(TransactionData::Raw(raw), 0)],
        })
        .await
        .unwrap();
    chain.mine(1).await;
    wait_for("the settlement marked failed", || async {
        let rows = gw.settlements().await;
        (rows[0].status == "failed").then_some(())
    })
    .await;
    assert_eq!(account_balance(&store, payer.address()).await, Usdc::ZERO);
    assert_eq!(
        ledger_kinds(&store, payer.address(), "reversal").await,
        vec![Usdc(-10_000_000)]
    );
    let ev = events(&store).await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].kind.as_str(), ev[0].amount_usdc),
        ("reversed", usdc("10"))
    );
    let key = body["data"]["apiKey"].as_str().unwrap();
    let res = gw
        .http
        .get(format!("{}/v1/models", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
}

/// (d) Restarts while a payment is reversed, and after it is restored, never reverse or restore twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_restart_in_the_middle_does_not_reverse_twice() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = crate::checkout::start_gateway(&chain, dir.path(), Default::default()).await;
    let store = gw.store().await;
    let payer = chain.payer(2).address();
    let (hash, raw) = chain.signed_payment(2, usdc("12")).await;
    let tx = format!("{hash:#x}");
    let block = send(&chain, &raw).await;
    crate::checkout::confirm(&gw, &chain, block).await;
    let (status, _, body) = gw
        .post(
            "/api/agent/topup",
            json!({"txHash": tx, "amount": "12", "signature": claim_sig(&chain, 2, &tx)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Confirmed at depth 3: a reorg of 3 blocks removes it.
    reorg(&chain, crate::checkout::CONFIRMATIONS).await;
    wait_events(&store, 1).await;
    assert_eq!(account_balance(&store, payer).await, Usdc::ZERO);
    let gw = gw.restart().await;
    let gw = gw.restart().await;
    chain.mine(2).await;
    gw.wait_indexed(chain.head().await).await;
    assert_eq!(events(&store).await.len(), 1);
    assert_eq!(ledger_kinds(&store, payer, "reversal").await.len(), 1);
    assert_eq!(account_balance(&store, payer).await, Usdc::ZERO);
    // Running the reconcile by hand again changes nothing either.
    let again = store
        .write(|tx| -> Result<_, StoreError> { reversals::reconcile_all(tx, 0) })
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");

    let block = send(&chain, &raw).await;
    crate::checkout::confirm(&gw, &chain, block).await;
    wait_events(&store, 2).await;
    let gw = gw.restart().await;
    chain.mine(1).await;
    gw.wait_indexed(chain.head().await).await;
    let ev = events(&store).await;
    assert_eq!(
        ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["reversed", "restored"]
    );
    assert_eq!(account_balance(&store, payer).await, usdc("12"));
    assert_eq!(ledger_kinds(&store, payer, "reinstatement").await.len(), 1);
    let report = audit(&gw, &store).await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

/// A transaction of payer `i` itself that uses the x402 payment `pay` (a `PAYMENT-SIGNATURE` value): the payer
/// submits its own authorization, signed and not sent.
async fn payer_submits(chain: &TestChain, i: usize, pay: &str) -> (String, Bytes) {
    let payload: PaymentPayload = header::decode(pay).unwrap();
    let auth = &payload.payload.authorization;
    let rsv = Rsv::parse(&payload.payload.signature).unwrap();
    let from = chain.payer(i).address();
    let nonce = chain
        .provider
        .get_transaction_count(from)
        .pending()
        .await
        .unwrap();
    let tx = TransactionRequest::default()
        .with_from(from)
        .with_to(chain.token())
        .with_input(transfer_vrs_call(auth, &rsv))
        .with_nonce(nonce)
        .with_chain_id(31337)
        .with_gas_limit(300_000)
        .with_max_fee_per_gas(20_000_000_000)
        .with_max_priority_fee_per_gas(1_000_000_000);
    let wallet = EthereumWallet::from(chain.payer(i).clone());
    let envelope = <TransactionRequest as NetworkTransactionBuilder<Ethereum>>::build(tx, &wallet)
        .await
        .unwrap();
    (
        format!("{:#x}", envelope.tx_hash()),
        Bytes::from(envelope.encoded_2718()),
    )
}

/// (e) An x402 settlement reorged out whose authorization the payer used in a transaction of its own: the gateway
/// recognises that transaction (its `AuthorizationUsed` log), adopts it as the settlement's, and restores the
/// purchase, instead of leaving it pending forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_x402_settlement_re_mined_by_the_payer_is_adopted_and_restored() {
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let store = gw.store().await;
    let path = "/x402/credits/10";
    let payer = chain.payer(0).clone();
    let pay = pay_header(&gw, &chain, &payer, path, |_| {}).await;
    let (status, headers, body) = gw.post(path, &[("PAYMENT-SIGNATURE", pay.clone())]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tx = payment_response(&headers, "payment-response")["transaction"]
        .as_str()
        .unwrap()
        .to_string();
    let t = tx.clone();
    wait_for("the settlement indexed", || {
        let (store, t) = (store.clone(), t.clone());
        async move {
            (!store
                .transfers_of_tx(crate::support::DEV_NETWORK, t)
                .await
                .unwrap()
                .is_empty())
            .then_some(())
        }
    })
    .await;

    // The new chain holds the payer's own transaction with the same authorization instead of ours.
    let (own, raw) = payer_submits(&chain, 0, &pay).await;
    chain
        .provider
        .anvil_reorg(ReorgOptions {
            depth: 1,
            tx_block_pairs: vec![(TransactionData::Raw(raw), 0)],
        })
        .await
        .unwrap();
    chain.mine(1).await;
    wait_for("the payer's transaction adopted", || async {
        let rows = gw.settlements().await;
        (rows[0].tx_hash == own).then_some(())
    })
    .await;
    let ev = wait_events(&store, 2).await;
    assert_eq!(
        ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["reversed", "restored"]
    );
    assert_eq!(ev[0].claim_tx, tx);
    assert_eq!(ev[1].tx_hash.as_deref(), Some(own.as_str()));
    assert_eq!(account_balance(&store, payer.address()).await, usdc("10"));
    let x402_events = store
        .read(|c| -> Result<_, StoreError> { x402_gateway::store::x402::list_events(c) })
        .await
        .unwrap();
    let kinds: Vec<&str> = x402_events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["reorged", "resubmitted"]);
    assert!(
        x402_events[1]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("adopted")
    );
    assert_eq!(gw.settlements().await[0].status, "settled");
    // The adopted transaction cannot be claimed again by txHash.
    let claimed = store
        .read(move |c| -> Result<_, StoreError> { x402_gateway::store::billing::claim_of(c, &own) })
        .await
        .unwrap();
    assert!(claimed.is_some());
    let key = body["data"]["apiKey"].as_str().unwrap();
    let res = gw
        .http
        .get(format!("{}/v1/models", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_ne!(res.status(), StatusCode::PAYMENT_REQUIRED);
}
