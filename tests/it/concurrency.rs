//! Concurrency: many connections racing for one payment, one balance and one pool key's slot, against the real
//! server on 127.0.0.1:0, real anvil and a real SQLite file. Each test fires every request at once (one TCP
//! connection each) and then checks the invariants from both sides: what the clients were told, and what the
//! database (and, for pool keys, the upstream) saw.
//!
//! | test | race | invariant |
//! |---|---|---|
//! | claims | 500 claims of one transaction: valid top-up and subscribe-pool forms, forged and unsigned ones | one 200, one claim row, one key, one ledger row; valid losers 409 `already_claimed`, forged 401 |
//! | credits | 200 requests on a balance that covers a few | served = what the balance covers; never below zero; ledger sum = balance; refused = 402 |
//! | pool | 200 requests from 4 keys of one pool | at most one request per key at the upstream at any moment; others 429 + `Retry-After`; no slot leaked; seats unchanged |

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::proxy::TEMPLATE_TOKEN_MARGIN;
use x402_gateway::store::{Store, StoreError};
use x402_gateway::usdc::Usdc;

use crate::checkout::{self, CHAIN_ID, Options, claim_sig, state_counts, usdc};
use crate::proxy::{PRICES, Stack, assert_openai_error, messages, sse_events};
use crate::support::*;
use x402_gateway::params;

/// Every ledger row of `account` in order: (kind, amount, balance_after).
async fn ledger_of(store: &Store, account: &str) -> Vec<(String, i64, i64)> {
    let account = account.to_string();
    store
        .read(move |c| -> Result<_, StoreError> {
            c.query_map(
                "SELECT kind, amount_atomic, balance_after FROM ledger WHERE account = ?1 ORDER BY id",
                params![account],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .await
        .unwrap()
}

/// Checks the ledger of `account` row by row: every `balance_after` is the running sum and never negative.
/// Returns the final balance (the sum).
fn check_ledger(rows: &[(String, i64, i64)]) -> i64 {
    let mut sum = 0;
    for (kind, amount, after) in rows {
        sum += amount;
        assert!(*after >= 0, "{kind} row left a negative balance: {rows:?}");
        assert_eq!(
            *after, sum,
            "balance_after is not the running sum: {rows:?}"
        );
    }
    sum
}

/// How one racing claim is formed, and the answer it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClaimForm {
    TopupAll,
    TopupWholeNumber,
    PoolAsia,
    PoolEurope,
    /// Signed by another wallet.
    ForgedOtherWallet,
    /// Signed by the payer, but over another transaction's claim text.
    ForgedOtherText,
    /// 65 random bytes.
    ForgedGarbage,
    Unsigned,
}

impl ClaimForm {
    const ALL: [ClaimForm; 10] = [
        ClaimForm::TopupAll,
        ClaimForm::TopupAll,
        ClaimForm::TopupWholeNumber,
        ClaimForm::PoolAsia,
        ClaimForm::PoolAsia,
        ClaimForm::PoolEurope,
        ClaimForm::ForgedOtherWallet,
        ClaimForm::ForgedOtherText,
        ClaimForm::ForgedGarbage,
        ClaimForm::Unsigned,
    ];

    fn valid(self) -> bool {
        matches!(
            self,
            ClaimForm::TopupAll
                | ClaimForm::TopupWholeNumber
                | ClaimForm::PoolAsia
                | ClaimForm::PoolEurope
        )
    }
}

/// 500 concurrent claims of one 50 USDC payment, each on its own connection: every valid form the payer could send
/// (top-up of all of it, as a decimal string or a whole number; a subscription to asia or europe, whose surplus
/// becomes credits) mixed with forged and unsigned ones. Exactly one wins; it bought exactly one thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_racing_claims_of_one_payment_buy_exactly_one_thing() {
    const CLAIMS: usize = 500;
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(checkout::start_gateway(&chain, dir.path(), Options::default()).await);
    let payer = chain.payer(0).clone();
    let (tx, block) = chain.pay(0, usdc("50")).await;
    checkout::confirm(&gw, &chain, block).await;
    let (_, _, catalog_before) = gw.get("/api/agent/plans", None).await;

    let other_tx = format!("0x{}", "ab".repeat(32));
    let body_of = |form: ClaimForm| -> (&'static str, Value) {
        let good = claim_sig(&payer, &tx);
        match form {
            ClaimForm::TopupAll => (
                "/api/agent/topup",
                json!({"txHash": tx, "amount": "50.00", "signature": good}),
            ),
            ClaimForm::TopupWholeNumber => (
                "/api/agent/topup",
                json!({"txHash": tx, "amount": 50, "signature": good}),
            ),
            ClaimForm::PoolAsia => (
                "/api/agent/subscribe-pool",
                json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["asia"], "signature": good}),
            ),
            ClaimForm::PoolEurope => (
                "/api/agent/subscribe-pool",
                json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["europe"], "signature": good}),
            ),
            ClaimForm::ForgedOtherWallet => (
                "/api/agent/subscribe-pool",
                json!({"txHash": tx, "poolSlug": "kimi26", "blocks": ["asia"],
                       "signature": claim_sig(chain.payer(1), &tx)}),
            ),
            ClaimForm::ForgedOtherText => (
                "/api/agent/topup",
                json!({"txHash": tx, "amount": "50.00", "signature": claim_sig(&payer, &other_tx)}),
            ),
            ClaimForm::ForgedGarbage => (
                "/api/agent/topup",
                json!({"txHash": tx, "amount": "50.00",
                       "signature": format!("0x{}", alloy::hex::encode(rand::random::<[u8; 32]>()).repeat(2) + "1b")}),
            ),
            ClaimForm::Unsigned => ("/api/agent/topup", json!({"txHash": tx, "amount": "50.00"})),
        }
    };
    let forms: Vec<ClaimForm> = (0..CLAIMS)
        .map(|i| ClaimForm::ALL[i % ClaimForm::ALL.len()])
        .collect();
    let requests = forms.iter().map(|form| {
        let (path, body) = body_of(*form);
        let gw = gw.clone();
        tokio::spawn(async move { gw.post(path, body).await })
    });
    let answers: Vec<_> = join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();

    let mut winners = Vec::new();
    let mut claimed_records = Vec::new();
    let mut counts: HashMap<(ClaimForm, u16, String), usize> = HashMap::new();
    for (form, (status, headers, body)) in forms.iter().zip(&answers) {
        assert_eq!(headers["cache-control"], "no-store", "{body}");
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        *counts.entry((*form, status.as_u16(), code)).or_default() += 1;
        match (form.valid(), *status) {
            (true, StatusCode::OK) => winners.push((*form, body.clone())),
            (true, StatusCode::CONFLICT) => {
                assert_eq!(body["success"], false);
                assert_eq!(body["error"]["code"], "already_claimed", "{body}");
                claimed_records.push(body["error"]["claimed"].clone());
            }
            (false, StatusCode::UNAUTHORIZED) => {
                assert_eq!(body["success"], false);
                if *form == ClaimForm::Unsigned {
                    assert_eq!(body["error"]["code"], "signature_required", "{body}");
                    assert_eq!(
                        body["error"]["messageToSign"],
                        claim_text(&tx, CHAIN_ID),
                        "{body}"
                    );
                } else {
                    assert_eq!(body["error"]["code"], "invalid_signature", "{body}");
                }
            }
            (valid, status) => panic!("{form:?} (valid: {valid}) got {status}: {body}"),
        }
    }
    let forged = forms.iter().filter(|f| !f.valid()).count();
    assert_eq!(
        (winners.len(), claimed_records.len(), forged),
        (1, CLAIMS - forged - 1, CLAIMS * 4 / 10),
        "{counts:?}"
    );
    let (winner, won) = winners.pop().unwrap();
    assert_eq!(won["success"], true);
    let key = won["data"]["apiKey"].as_str().unwrap().to_string();

    // Every loser was told the same thing: what the winner bought.
    let first = &claimed_records[0];
    assert!(
        claimed_records.iter().all(|c| c == first),
        "losers disagree about the winner"
    );

    // The database holds exactly one purchase, and it is the one the winner was told about.
    let store = gw.store().await;
    let (claims, keys, ledger, subscriptions, seats) = state_counts(&store).await;
    let account = format!("{:#x}", payer.address());
    let rows = ledger_of(&store, &account).await;
    let balance = check_ledger(&rows);
    let (_, _, catalog_after) = gw.get("/api/agent/plans", None).await;
    let seats_left = |catalog: &Value, block: &str| checkout::available(catalog, block);
    match winner {
        ClaimForm::TopupAll | ClaimForm::TopupWholeNumber => {
            assert_eq!(
                (claims, keys, ledger, subscriptions, seats),
                (1, 1, 1, 0, 0)
            );
            assert_eq!(rows[0].0, "topup");
            assert_eq!(balance, usdc("50").atomic());
            assert_eq!(won["data"]["newBalance"], json!(50), "{won}");
            assert_eq!(won["data"]["newBalanceUsdc"], "50.00", "{won}");
            assert_eq!(first["kind"], "topup", "{first}");
        }
        ClaimForm::PoolAsia | ClaimForm::PoolEurope => {
            let (block, price) = if winner == ClaimForm::PoolAsia {
                ("asia", "39")
            } else {
                ("europe", "49")
            };
            assert_eq!(
                (claims, keys, ledger, subscriptions, seats),
                (1, 1, 1, 1, 1)
            );
            assert_eq!(rows[0].0, "surplus", "the surplus of the 50 USDC paid");
            assert_eq!(balance, usdc("50").atomic() - usdc(price).atomic());
            assert_eq!(won["data"]["blocks"], json!([block]), "{won}");
            assert_eq!(first["kind"], "subscription", "{first}");
            assert_eq!(
                seats_left(&catalog_after, block),
                seats_left(&catalog_before, block) - 1
            );
        }
        other => unreachable!("{other:?} cannot win"),
    }
    let (claim_tx, claim_account): (String, String) = store
        .read(|c| -> Result<_, StoreError> {
            c.query_one("SELECT tx_hash, account FROM claims", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
        .await
        .unwrap();
    assert_eq!((claim_tx, claim_account), (tx.clone(), account));
    // The key works.
    let (status, _, usage) = gw.get("/v1/usage", Some(&key)).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
}

/// 200 concurrent credit requests, each on its own connection, against a balance that covers only a few.
///
/// With a zero input price the worst-case reservation IS the final cost (the demo upstream produces exactly
/// `max_tokens`), so the number served does not depend on the order: it is ⌊balance / cost⌋, exactly. With a
/// non-zero input price the reservation (request bytes + margin) exceeds the cost, and at least ⌊balance /
/// reservation⌋ are served; either way every success is charged exactly and every refusal nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_racing_credit_requests_spend_exactly_the_balance() {
    const REQUESTS: usize = 200;
    let s = Stack::start(2).await;
    let store = s.gw.store().await;

    // Phase 1: reservation = cost = 40 tokens × 2.50 USDC/Mtok = 100 atomic; the balance covers 7 and a bit.
    let out_only = x402_gateway::proxy::pricing::Prices {
        input_per_mtok: Usdc::ZERO,
        output_per_mtok: PRICES.output_per_mtok,
    };
    let cost = out_only.cost(0, 40);
    assert_eq!(cost, Usdc(100));
    let grant = Usdc(cost.atomic() * 7 + 57);
    let key = s.credit_key(0x21, grant).await;
    let account = format!("{:#x}", alloy::primitives::Address::repeat_byte(0x21));
    let bodies: Vec<Value> = (0..REQUESTS)
        .map(|i| json!({"model": "demo-out", "messages": messages("race for the balance"), "max_tokens": 40, "stream": i % 2 == 0}))
        .collect();
    let (served, refused) = race_credit_requests(&s, &key, &bodies).await;
    let expected = (grant.atomic() / cost.atomic()) as usize;
    assert_eq!(
        (served, refused),
        (expected, REQUESTS - expected),
        "served must be exactly what the balance covers"
    );
    let rows = ledger_of(&store, &account).await;
    let balance = check_ledger(&rows);
    assert_eq!(balance, grant.atomic() - expected as i64 * cost.atomic());
    assert_eq!(
        s.balance(&key).await,
        Usdc(balance),
        "ledger sum == balance"
    );
    let (ok_rows, billed): (i64, i64) = store
        .read(move |c| -> Result<_, StoreError> {
            c.query_one(
                "SELECT count(*), coalesce(sum(cost_atomic), 0) FROM usage WHERE account = ?1 AND status = 'ok'", params![format!("{:#x}", alloy::primitives::Address::repeat_byte(0x21))],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert_eq!(
        (ok_rows, billed),
        (expected as i64, expected as i64 * cost.atomic()),
        "a usage row per success, none for a refusal"
    );

    // Phase 2: the reservation (request bytes + 256 margin at the input price) is well above the cost.
    let body = json!({"model": "demo", "messages": messages("hello there"), "max_tokens": 20});
    let reserve = PRICES.cost(body.to_string().len() as u64 + TEMPLATE_TOKEN_MARGIN, 20);
    let cost = PRICES.cost(2, 20);
    assert!(reserve.atomic() > 4 * cost.atomic());
    let grant = Usdc(reserve.atomic() * 10);
    let key = s.credit_key(0x22, grant).await;
    let account = format!("{:#x}", alloy::primitives::Address::repeat_byte(0x22));
    let (served, refused) = race_credit_requests(&s, &key, &vec![body; REQUESTS]).await;
    assert!(
        served >= 10 && refused > 0,
        "served {served}, refused {refused}"
    );
    let rows = ledger_of(&store, &account).await;
    let balance = check_ledger(&rows);
    assert_eq!(
        balance,
        grant.atomic() - served as i64 * cost.atomic(),
        "every success charged exactly, every refusal nothing"
    );
    assert_eq!(s.balance(&key).await, Usdc(balance));
}

/// Sends every body at once with `key`; checks each answer's shape; waits until every reservation has settled.
/// Returns (served, refused).
async fn race_credit_requests(s: &Stack, key: &str, bodies: &[Value]) -> (usize, usize) {
    let answers = join_all(bodies.iter().map(|body| async move {
        let resp = s.chat(key, body.clone()).send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap())
    }))
    .await;
    let (mut served, mut refused) = (0, 0);
    for ((status, headers, text), body) in answers.iter().zip(bodies) {
        match *status {
            StatusCode::OK if body["stream"] == true => {
                let events = sse_events(text);
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
                served += 1;
            }
            StatusCode::OK => {
                let v: Value = serde_json::from_str(text).unwrap();
                assert_eq!(v["usage"]["completion_tokens"], body["max_tokens"], "{v}");
                served += 1;
            }
            // The documented answer to a balance below the worst case: 402 with the top-up catalog and a message
            // naming the shortfall (docs/api.md, "Credit keys").
            StatusCode::PAYMENT_REQUIRED => {
                let v: Value = serde_json::from_str(text).unwrap();
                assert!(v["message"].as_str().unwrap().contains("worst-case"), "{v}");
                assert_eq!(v["x402"]["version"], 2, "{v}");
                assert_eq!(headers["cache-control"], "no-store");
                assert!(headers.contains_key("x-request-id"));
                refused += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    // Streams settle when their body ends, which the client may see a moment before the write lands.
    let store = s.gw.store().await;
    wait_for("every reservation to settle", || {
        let store = store.clone();
        async move {
            let open: i64 = store
                .read(|c| -> Result<_, StoreError> {
                    c.query_one(
                        "SELECT count(*) FROM usage WHERE status = 'in_flight'",
                        params![],
                        |r| r.get(0),
                    )
                })
                .await
                .unwrap();
            (open == 0).then_some(())
        }
    })
    .await;
    (served, refused)
}

/// 200 concurrent requests, one connection each, from 4 keys of one pool (JSON and streamed): the upstream, which
/// counts the requests it is answering per key, never sees two of one key at once; the rest get 429 with
/// `Retry-After` and never reach it; afterwards every key works again (no slot leaked) and no seat moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_keys_hammered_from_many_connections_run_one_request_at_a_time() {
    const REQUESTS: usize = 200;
    let s = Stack::start(10).await;
    let keys = [
        s.pool_key(0, &["asia"], "3.00").await,
        s.pool_key(1, &["asia"], "3.00").await,
        s.pool_key(2, &["asia", "europe"], "7.00").await,
        s.pool_key(0, &["asia"], "3.00").await,
    ];
    let store = s.gw.store().await;
    let seat_rows = || async {
        store
            .read(|c| -> Result<i64, StoreError> {
                c.query_one("SELECT count(*) FROM seats", params![], |r| r.get(0))
            })
            .await
            .unwrap()
    };
    let (_, _, catalog_before) = s.gw.get("/api/agent/plans", None).await;
    let seats_before = seat_rows().await;
    let upstream_before = s
        .upstream
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);

    let label = |k: usize| format!("pool-key-{k}");
    let answers = join_all((0..REQUESTS).map(|i| {
        let k = i % keys.len();
        let body = json!({"model": "demo", "messages": messages("one at a time"), "max_tokens": 5,
                          "stream": i % 3 == 0, "user": label(k)});
        let req = s.chat(&keys[k], body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            (k, i % 3 == 0, status, headers, resp.text().await.unwrap())
        }
    }))
    .await;
    let mut served = vec![0u64; keys.len()];
    let mut limited = 0;
    for (k, stream, status, headers, text) in &answers {
        match *status {
            StatusCode::OK => {
                if *stream {
                    assert_eq!(sse_events(text).last().map(String::as_str), Some("[DONE]"));
                } else {
                    let v: Value = serde_json::from_str(text).unwrap();
                    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
                }
                served[*k] += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(headers["retry-after"], "1");
                assert_openai_error(&serde_json::from_str(text).unwrap(), "concurrency_limit");
                limited += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let total_served: u64 = served.iter().sum();
    assert_eq!(total_served as usize + limited, REQUESTS);
    assert!(limited > 0, "the race did not overlap: {served:?}");
    for (k, n) in served.iter().enumerate() {
        assert!(*n >= 1, "key {k} was never served: {served:?}");
        assert_eq!(
            s.upstream.max_in_flight_of(&label(k)),
            1,
            "key {k} had two requests at the upstream at once"
        );
    }
    assert_eq!(
        s.upstream
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
            - upstream_before,
        total_served,
        "a refused request reached the upstream"
    );

    // No slot leaked: each key is served again once its last stream has closed.
    for (k, key) in keys.iter().enumerate() {
        let body = json!({"model": "demo", "messages": messages("again"), "max_tokens": 1, "user": label(k)});
        let status = wait_for(&format!("key {k}'s slot to be free"), || async {
            let r = s.chat(key, body.clone()).send().await.unwrap();
            (r.status() != StatusCode::TOO_MANY_REQUESTS).then_some(r.status())
        })
        .await;
        assert_eq!(status, StatusCode::OK, "key {k}");
    }
    // A subscription holds its seats whatever its keys do.
    let (_, _, catalog_after) = s.gw.get("/api/agent/plans", None).await;
    assert_eq!(
        catalog_after["x402"]["products"][0]["blocks"],
        catalog_before["x402"]["products"][0]["blocks"]
    );
    assert_eq!(seat_rows().await, seats_before);
    let usage_rows: i64 = store
        .read(|c| -> Result<i64, StoreError> {
            c.query_one(
                "SELECT count(*) FROM usage WHERE key_kind = 'subscription' AND status = 'ok'",
                params![],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(usage_rows as u64, total_served + keys.len() as u64);
}
