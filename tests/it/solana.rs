//! Solana payments (issue 19) against a real local Solana RPC (surfnet, see `svm_support`): SPL transfers to payTo's
//! token account indexed and claimed by signature with an ed25519 proof by the payer; a front-runner who saw the
//! signature cannot claim it; a replay is refused; transfers to other accounts, failed transactions and the unchecked
//! `transfer` instruction are handled as they must be; a restart resumes with no gap and no duplicate; an RPC outage
//! is survived; at `finalized` commitment a claim waits for finality.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text_svm;

use crate::checkout::{Options, T0, config_text};
use crate::support::*;
use crate::svm_support::*;

const AUDITOR_ENV: &str = "TEST_SOLANA_AUDITOR";
const AUDITOR: &str = "auditor-solana-8c41d07e";
const ADMIN_ENV: &str = "TEST_SOLANA_ADMIN";
const ADMIN: &str = "admin-solana-3f9e2a61";

fn solana_section(rpc: &str, pay_to: &str, commitment: &str) -> String {
    format!(
        r#"
[[networks]]
network = "solana-devnet"
rpc_http = ["{rpc}"]
pay_to = "{pay_to}"
commitment = "{commitment}"
poll_interval_ms = 50
rpc_timeout_ms = 2000
"#
    )
}

/// A gateway selling on the EVM test chain and on the local Solana (devnet preset, RPC `rpc`).
async fn gateway(
    chain: &TestChain,
    dir: &std::path::Path,
    rpc: &str,
    pay_to: &str,
    commitment: &str,
) -> Gateway {
    let db = dir.join("gateway.db");
    let mut config = config_text(chain, &db, &Options::default());
    config = config.replace(
        "[auth]\n",
        &format!(
            "[auth]\nauditor_token_env = \"{AUDITOR_ENV}\"\nadmin_token_env = \"{ADMIN_ENV}\"\n"
        ),
    );
    config.push_str(&solana_section(rpc, pay_to, commitment));
    Gateway::start_with_env(
        config,
        db,
        Arc::new(AtomicI64::new(T0)),
        &[(AUDITOR_ENV, AUDITOR), (ADMIN_ENV, ADMIN)],
    )
    .await
}

async fn claim(gw: &Gateway, body: Value) -> (StatusCode, Value) {
    let (status, _, body) = gw.post("/api/agent/topup", body).await;
    (status, body)
}

/// Claims until the indexer has the transaction (404 `not_indexed` meanwhile).
async fn claim_when_indexed(gw: &Gateway, body: Value) -> (StatusCode, Value) {
    wait_for("the Solana payment is indexed", || {
        let body = body.clone();
        async move {
            let (status, answer) = claim(gw, body).await;
            (answer["error"]["code"] != "not_indexed").then_some((status, answer))
        }
    })
    .await
}

async fn audit(gw: &Gateway, path: &str) -> Value {
    let r = gw
        .http
        .get(format!("{}{path}", gw.base))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spl_payments_claimed_by_signature_with_an_ed25519_proof() {
    let (sol, chain) = tokio::join!(TestSolana::start(), TestChain::start());
    let dir = tempfile::tempdir().unwrap();
    let operator = wallet(1);
    let pay_to = pubkey(&operator).to_string();
    let gw = gateway(&chain, dir.path(), &sol.url, &pay_to, "confirmed").await;

    // The catalog offers the Solana network with its mint and payTo.
    let (status, _, catalog) = gw.get("/api/agent/plans", None).await;
    assert_eq!(status, StatusCode::OK);
    let networks = catalog["x402"]["networks"].as_array().unwrap();
    let svm = networks
        .iter()
        .find(|n| n["caip2"] == SVM_DEVNET)
        .unwrap_or_else(|| panic!("no Solana network in the catalog: {catalog}"));
    assert_eq!(svm["payTo"], pay_to.as_str());
    assert_eq!(svm["assetAddress"], sol.mint.to_string());

    let payer = sol.funded_wallet(7, 100_000_000).await;
    let thief = sol.funded_wallet(8, 0).await;
    let sig = sol.pay(&payer, &pubkey(&operator), 12_000_000).await;
    assert_eq!(sol.usdc_of(&pubkey(&operator)).await, 12_000_000);

    // Found (a claim signed by someone else is refused for its signature, so the payment is indexed); without
    // a proof the answer names the text to sign, which names the payment and the network.
    let text = claim_text_svm(&sig, SVM_DEVNET);
    let (status, body) = claim_when_indexed(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": SVM_DEVNET, "signature": sign_text(&thief, &text)}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": SVM_DEVNET}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["messageToSign"], text.as_str(), "{body}");

    // A front-runner who saw the signature on chain signs with its own wallet: refused.
    let (status, body) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": SVM_DEVNET, "signature": sign_text(&thief, &text)}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "invalid_signature", "{body}");
    // The payer's signature of another text (the EVM one, another network) proves nothing either.
    let (status, _) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": SVM_DEVNET,
               "signature": sign_text(&payer, &claim_text_svm(&sig, "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"))}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Claimed on the EVM network, the Solana signature is not even a transaction hash there.
    let (status, body) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "signature": sign_text(&payer, &text)}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "txHash", "{body}");

    // The payer: credited once, by preset name or CAIP-2 id.
    let (status, body) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": "solana-devnet", "signature": sign_text(&payer, &text)}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["newBalance"], 12, "{body}");
    assert!(body["data"]["apiKey"].as_str().is_some(), "{body}");
    let (status, body) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": SVM_DEVNET, "signature": sign_text(&payer, &text)}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "already_claimed", "{body}");

    // The unchecked `transfer` instruction counts too; a transfer to another wallet is not a payment.
    let sig2 = sol
        .pay_unchecked(&payer, &pubkey(&operator), 10_000_000)
        .await;
    let elsewhere = sol.pay(&payer, &pubkey(&thief), 15_000_000).await;
    let text2 = claim_text_svm(&sig2, SVM_DEVNET);
    let (status, body) = claim_when_indexed(
        &gw,
        json!({"txHash": sig2, "amount": "10", "network": SVM_DEVNET, "signature": sign_text(&payer, &text2)}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["newBalance"], 22, "{body}");
    // Not to payTo: never indexed (the indexer has read past it once a later payment is claimable).
    let later = sol.pay(&payer, &pubkey(&operator), 10_000_000).await;
    let text3 = claim_text_svm(&later, SVM_DEVNET);
    let (status, body) = claim_when_indexed(
        &gw,
        json!({"txHash": later, "amount": "10", "network": SVM_DEVNET, "signature": sign_text(&payer, &text3)}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // One account (the payer's wallet), credited for the three payments.
    assert_eq!(body["data"]["newBalance"], 32, "{body}");
    assert_eq!(
        body["data"]["account"],
        pubkey(&payer).to_string(),
        "{body}"
    );
    let (status, body) = claim(
        &gw,
        json!({"txHash": elsewhere, "amount": "15", "network": SVM_DEVNET,
               "signature": sign_text(&payer, &claim_text_svm(&elsewhere, SVM_DEVNET))}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Bad input: a signature of the wrong size, a txHash that is not base58 of 64 bytes.
    let (status, body) = claim(
        &gw,
        json!({"txHash": sig, "amount": "12", "network": SVM_DEVNET, "signature": "3xQ"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "signature", "{body}");
    let (status, body) = claim(
        &gw,
        json!({"txHash": "0x1234", "amount": "12", "network": SVM_DEVNET}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // The audit API names the network, the mint and the payer wallet of each payment, exactly once.
    let payments = audit(&gw, &format!("/api/audit/payments?network={SVM_DEVNET}")).await;
    let rows = payments["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{payments}");
    for row in rows {
        assert_eq!(row["network"], SVM_DEVNET);
        assert_eq!(row["from"], pubkey(&payer).to_string(), "{row}");
        assert_eq!(row["token"], sol.mint.to_string(), "{row}");
        assert_eq!(row["claimed"], true, "{row}");
    }
    let total: u64 = rows
        .iter()
        .map(|r| r["tokenValue"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 32_000_000);

    // The operator's console: the Solana network with its payments and its indexer, in the JSON and on the page.
    let summary: Value = gw
        .http
        .get(format!("{}/api/admin/summary?range=30d", gw.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let on_solana = summary["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["network"] == SVM_DEVNET)
        .unwrap_or_else(|| panic!("{summary}"))
        .clone();
    // (The range is the gateway's clock, set to T0 here, while the index stamps rows with the real time: the
    // claims are in the range, the transfers are listed among the recent ones.)
    assert_eq!(on_solana["claims"], 3, "{on_solana}");
    assert_eq!(on_solana["claimedUsdc"], "32.00", "{on_solana}");
    assert_eq!(
        on_solana["recentTransfers"].as_array().unwrap().len(),
        3,
        "{on_solana}"
    );
    assert!(
        summary["health"]["networks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["network"] == SVM_DEVNET && n["state"] == "running"),
        "{summary}"
    );
    let page = gw
        .http
        .get(format!("{}/admin?refresh=0", gw.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(SVM_DEVNET) && page.contains(&pay_to),
        "the console names the Solana network"
    );

    // `audit verify` re-reads every confirmed Solana transfer from the cluster: clean.
    let report =
        x402_gateway::audit::verify::verify(&gw.settings(), &gw.store().await, &mut |_| {})
            .await
            .unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert!(
        report.chain_heads.contains_key(SVM_DEVNET),
        "{:?}",
        report.chain_heads
    );
    assert!(report.transfers_checked >= 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_resumes_with_no_gap_and_no_duplicate() {
    let (sol, chain) = tokio::join!(TestSolana::start(), TestChain::start());
    let dir = tempfile::tempdir().unwrap();
    let operator = wallet(2);
    let pay_to = pubkey(&operator).to_string();
    let gw = gateway(&chain, dir.path(), &sol.url, &pay_to, "confirmed").await;
    let payer = sol.funded_wallet(9, 100_000_000).await;
    let first = sol.pay(&payer, &pubkey(&operator), 10_000_000).await;
    let text = claim_text_svm(&first, SVM_DEVNET);
    let (status, _) = claim_when_indexed(
        &gw,
        json!({"txHash": first, "amount": "10", "network": SVM_DEVNET, "signature": sign_text(&payer, &text)}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Paid while the gateway is down (the restart keeps its database and environment).
    let (gw, missed) = gw
        .restart_after(async {
            let mut missed = Vec::new();
            for _ in 0..3 {
                missed.push(sol.pay(&payer, &pubkey(&operator), 11_000_000).await);
            }
            missed
        })
        .await;
    for sig in &missed {
        let text = claim_text_svm(sig, SVM_DEVNET);
        let (status, body) = claim_when_indexed(
            &gw,
            json!({"txHash": sig, "amount": "11", "network": SVM_DEVNET, "signature": sign_text(&payer, &text)}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let payments = audit(&gw, &format!("/api/audit/payments?network={SVM_DEVNET}")).await;
    let rows = payments["data"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "each payment once: {payments}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_rpc_outage_is_survived_and_finalized_commitment_is_waited_for() {
    let (sol, chain) = tokio::join!(TestSolana::start(), TestChain::start());
    let target: std::net::SocketAddr = sol.url.trim_start_matches("http://").parse().unwrap();
    let proxy = TcpFaultProxy::start(target).await;
    let dir = tempfile::tempdir().unwrap();
    let operator = wallet(3);
    let pay_to = pubkey(&operator).to_string();
    let gw = gateway(&chain, dir.path(), &proxy.url(), &pay_to, "finalized").await;
    let payer = sol.funded_wallet(10, 100_000_000).await;

    proxy.down();
    let sig = sol.pay(&payer, &pubkey(&operator), 10_000_000).await;
    let text = claim_text_svm(&sig, SVM_DEVNET);
    let body = json!({"txHash": sig, "amount": "10", "network": SVM_DEVNET, "signature": sign_text(&payer, &text)});
    // While the RPC is down: not indexed, and /healthz says why.
    let (status, answer) = claim(&gw, body.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    wait_for("the Solana network reports RPC errors", || async {
        let (_, _, health) = gw.get("/healthz", None).await;
        let n = health["networks"]
            .as_array()?
            .iter()
            .find(|n| n["network"] == SVM_DEVNET)?
            .clone();
        (n["rpcErrors"].as_u64()? > 0).then_some(())
    })
    .await;
    proxy.up();

    // Back up: found, then 202 until finalized (unless it already is), then claimed.
    let (status, answer) = claim_when_indexed(&gw, body.clone()).await;
    if status == StatusCode::ACCEPTED {
        assert_eq!(answer["error"]["code"], "pending", "{answer}");
        assert_eq!(answer["error"]["commitment"], "finalized", "{answer}");
    }
    sol.wait_finalized(&sig).await;
    let (status, answer) = wait_for("the claim succeeds once finalized", || {
        let body = body.clone();
        let gw = &gw;
        async move {
            let (status, answer) = claim(gw, body).await;
            (status != StatusCode::ACCEPTED).then_some((status, answer))
        }
    })
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    gw.stop().await;
}

const FEE_PAYER_ENV: &str = "TEST_SVM_FEE_PAYER";

/// The base58 text of `k`'s 64-byte keypair (secret seed, then public key), as wallets export it.
fn keypair_b58(k: &ed25519_dalek::SigningKey) -> String {
    let mut bytes = k.to_bytes().to_vec();
    bytes.extend_from_slice(&k.verifying_key().to_bytes());
    bs58::encode(bytes).into_string()
}

/// A gateway selling on the local Solana with standard x402 settled by `fee_payer`.
async fn x402_gateway(
    chain: &TestChain,
    dir: &std::path::Path,
    sol: &TestSolana,
    pay_to: &str,
    fee_payer: &ed25519_dalek::SigningKey,
) -> Gateway {
    let db = dir.join("gateway.db");
    let mut config = config_text(chain, &db, &Options::default());
    config = config.replace(
        "[auth]\n",
        &format!("[auth]\nauditor_token_env = \"{AUDITOR_ENV}\"\n"),
    );
    config.push_str(&solana_section(&sol.url, pay_to, "confirmed"));
    config.push_str(&format!("fee_payer_key_env = \"{FEE_PAYER_ENV}\"\n"));
    let key = keypair_b58(fee_payer);
    Gateway::start_with_env(
        config,
        db,
        Arc::new(AtomicI64::new(T0)),
        &[(AUDITOR_ENV, AUDITOR), (FEE_PAYER_ENV, key.as_str())],
    )
    .await
}

/// The 402's Solana offer for `path`.
async fn svm_offer(gw: &Gateway, path: &str) -> Value {
    use base64::Engine;
    let r = gw
        .http
        .post(format!("{}{path}", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let header = r.headers()["payment-required"]
        .to_str()
        .unwrap()
        .to_string();
    let required: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    required["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["network"] == SVM_DEVNET)
        .unwrap_or_else(|| panic!("no Solana offer: {required}"))
        .clone()
}

/// A `PAYMENT-SIGNATURE` for `offer` built as the official client builds it (compute limit, compute price,
/// transferChecked, memo nonce), signed by `payer` only: the fee payer's slot is left for the gateway.
async fn svm_payment(
    sol: &TestSolana,
    offer: &Value,
    payer: &ed25519_dalek::SigningKey,
    memo: &str,
) -> String {
    let pay_to = offer["payTo"].as_str().unwrap().to_string();
    let amount: u64 = offer["amount"].as_str().unwrap().parse().unwrap();
    svm_payment_of(sol, offer, payer, memo, &pay_to, amount).await
}

/// [`svm_payment`] transferring `amount` to `pay_to`'s token account whatever the offer says.
async fn svm_payment_of(
    sol: &TestSolana,
    offer: &Value,
    payer: &ed25519_dalek::SigningKey,
    memo: &str,
    pay_to: &str,
    amount: u64,
) -> String {
    use base64::Engine;
    use x402_gateway::chain::svm::address::{TOKEN_PROGRAM, associated_token_address};
    use x402_gateway::chain::svm::instructions::{
        memo as memo_ix, set_compute_unit_limit, set_compute_unit_price, token_transfer_checked,
    };
    use x402_gateway::chain::svm::tx::{Message, Transaction};
    let fee_payer: x402_gateway::chain::svm::address::Pubkey = offer["extra"]["feePayer"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pay_to: x402_gateway::chain::svm::address::Pubkey = pay_to.parse().unwrap();
    let from = pubkey(payer);
    let ixs = [
        set_compute_unit_limit(20_000),
        set_compute_unit_price(1),
        token_transfer_checked(
            &TOKEN_PROGRAM,
            &associated_token_address(&from, &sol.mint, &TOKEN_PROGRAM),
            &sol.mint,
            &associated_token_address(&pay_to, &sol.mint, &TOKEN_PROGRAM),
            &from,
            amount,
            6,
        ),
        memo_ix(memo.as_bytes()),
    ];
    let message = Message::new_legacy(&fee_payer, &ixs, sol.blockhash().await);
    let mut tx = Transaction::new_unsigned(message);
    tx.sign(payer).unwrap();
    let payload = json!({
        "x402Version": 2,
        "accepted": offer,
        "payload": {"transaction": tx.to_base64()},
    });
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&payload).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standard_x402_on_solana_with_the_official_client_and_replays_refused() {
    use crate::clients::{interop_required, root, run_client};
    let (sol, chain) = tokio::join!(TestSolana::start(), TestChain::start());
    let dir = tempfile::tempdir().unwrap();
    let operator = wallet(4);
    let fee_payer = wallet(5);
    sol.airdrop(&pubkey(&fee_payer), 10_000_000_000).await;
    // payTo's token account exists (the client pays into it; it does not create it).
    sol.set_usdc(&pubkey(&operator), 0).await;
    let pay_to = pubkey(&operator).to_string();
    let gw = x402_gateway(&chain, dir.path(), &sol, &pay_to, &fee_payer).await;

    // The 402 offers `exact` on Solana with our fee payer; the catalog says so too.
    let offer = svm_offer(&gw, "/x402/credits/10").await;
    assert_eq!(offer["scheme"], "exact");
    assert_eq!(offer["amount"], "10000000");
    assert_eq!(offer["asset"], sol.mint.to_string());
    assert_eq!(offer["payTo"], pay_to.as_str());
    assert_eq!(offer["extra"]["feePayer"], pubkey(&fee_payer).to_string());

    // The official client (`@x402/fetch` + `@x402/svm`) buys 10 USDC of credits; the payer pays no SOL.
    let node = std::path::PathBuf::from("node");
    let installed = root().join("node_modules/@x402/svm").exists();
    assert!(
        installed || !interop_required(),
        "@x402/svm is not installed"
    );
    if installed {
        let buyer = sol.funded_wallet(11, 25_000_000).await;
        let sol_before = sol
            .rpc("getBalance", json!([pubkey(&buyer).to_string()]))
            .await["value"]
            .as_u64()
            .unwrap();
        let out = run_client(
            &node,
            "tests/interop/buy-svm.mjs",
            &[
                &format!("{}/x402/credits/10", gw.base),
                &keypair_b58(&buyer),
                &sol.url,
            ],
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["paymentResponse"]["network"], SVM_DEVNET, "{out}");
        assert_eq!(
            out["paymentResponse"]["payer"],
            pubkey(&buyer).to_string(),
            "{out}"
        );
        let signature = out["paymentResponse"]["transaction"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(out["body"]["data"]["newBalance"], 10, "{out}");
        assert_eq!(sol.usdc_of(&pubkey(&buyer)).await, 15_000_000);
        assert_eq!(sol.usdc_of(&pubkey(&operator)).await, 10_000_000);
        let sol_after = sol
            .rpc("getBalance", json!([pubkey(&buyer).to_string()]))
            .await["value"]
            .as_u64()
            .unwrap();
        assert_eq!(sol_before, sol_after, "the fee payer pays the fee");
        // The indexer finds the same transfer; its claim is the settlement's: claiming it again is refused.
        let text = claim_text_svm(&signature, SVM_DEVNET);
        let (status, body) = claim_when_indexed(
            &gw,
            json!({"txHash": signature, "amount": "10", "network": SVM_DEVNET, "signature": sign_text(&buyer, &text)}),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "already_claimed", "{body}");
    }

    // Our own copy of the client's payment: settled once; the same header again (before and after a restart)
    // is refused before anything is sent.
    let payer = sol.funded_wallet(12, 30_000_000).await;
    let header = svm_payment(&sol, &offer, &payer, "5f0c1e9a2b7d4c36").await;
    let pay = |gw: &Gateway, header: String| {
        let http = gw.http.clone();
        let url = format!("{}/x402/credits/10", gw.base);
        async move {
            let r = http
                .post(url)
                .header("PAYMENT-SIGNATURE", header)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            (status, body)
        }
    };
    let (status, body) = pay(&gw, header.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sol.usdc_of(&pubkey(&payer)).await, 20_000_000);
    let (status, body) = pay(&gw, header.clone()).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["reason"], "duplicate_settlement", "{body}");
    let gw = gw.restart().await;
    let (status, body) = pay(&gw, header.clone()).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["reason"], "duplicate_settlement", "{body}");
    assert_eq!(sol.usdc_of(&pubkey(&payer)).await, 20_000_000, "paid once");

    // Concurrent copies of a fresh payment: exactly one is credited.
    let header = svm_payment(&sol, &offer, &payer, "a93e77c0d1b24f58").await;
    let answers = futures::future::join_all((0..4).map(|_| pay(&gw, header.clone()))).await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(ok, 1, "{answers:?}");
    assert_eq!(sol.usdc_of(&pubkey(&payer)).await, 10_000_000, "paid once");

    // Refused before anything is sent: an underpayment under the true offer, a transfer to another wallet, an
    // `accepted` that is not our offer.
    let (status, body) = pay(
        &gw,
        svm_payment_of(&sol, &offer, &payer, "0b1c2d3e4f506172", &pay_to, 1_000_000).await,
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let other = pubkey(&payer).to_string();
    let (status, body) = pay(
        &gw,
        svm_payment_of(&sol, &offer, &payer, "1c2d3e4f50617283", &other, 10_000_000).await,
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let mut cheap = offer.clone();
    cheap["amount"] = json!("1000000");
    let (status, body) = pay(
        &gw,
        svm_payment(&sol, &cheap, &payer, "2d3e4f5061728394").await,
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(
        sol.usdc_of(&pubkey(&payer)).await,
        10_000_000,
        "nothing moved"
    );

    // The audit API lists the settlements on Solana.
    let claims = audit(&gw, "/api/audit/claims").await;
    let on_solana = claims["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["network"] == SVM_DEVNET)
        .count();
    assert_eq!(on_solana, if installed { 3 } else { 2 }, "{claims}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_paid_on_solana_with_the_official_client() {
    use crate::clients::{interop_required, root, run_client};
    use std::sync::atomic::Ordering;
    use x402_gateway::dev::upstream::{DemoConfig, DemoServer, DemoStats};
    let (sol, chain) = tokio::join!(TestSolana::start(), TestChain::start());
    let stats = Arc::new(DemoStats::default());
    let upstream = DemoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        DemoConfig {
            token_delay: std::time::Duration::from_millis(1),
            ..DemoConfig::default()
        },
        stats.clone(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let operator = wallet(13);
    let fee_payer = wallet(14);
    sol.airdrop(&pubkey(&fee_payer), 10_000_000_000).await;
    sol.set_usdc(&pubkey(&operator), 0).await;
    let pay_to = pubkey(&operator).to_string();
    let db = dir.path().join("gateway.db");
    let mut config = config_text(&chain, &db, &Options::default())
        .replace("http://127.0.0.1:9/v1", &upstream.url())
        .replacen(
            "output_usdc_per_mtok = \"2.50\"\n",
            "output_usdc_per_mtok = \"2.50\"\nper_request_usdc = \"0.01\"\n",
            1,
        );
    config.push_str(&solana_section(&sol.url, &pay_to, "confirmed"));
    config.push_str(&format!("fee_payer_key_env = \"{FEE_PAYER_ENV}\"\n"));
    let key = keypair_b58(&fee_payer);
    let gw = Gateway::start_with_env(
        config,
        db,
        Arc::new(AtomicI64::new(T0)),
        &[(FEE_PAYER_ENV, key.as_str())],
    )
    .await;
    let body = json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8});

    // Unpaid: the 402 offers the request's price on Solana.
    let r = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let required: Value = {
        use base64::Engine;
        serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(r.headers()["payment-required"].to_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let offer = required["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["network"] == SVM_DEVNET)
        .unwrap_or_else(|| panic!("{required}"))
        .clone();
    assert_eq!(offer["amount"], "10000");

    let installed = root().join("node_modules/@x402/svm").exists();
    assert!(
        installed || !interop_required(),
        "@x402/svm is not installed"
    );
    if installed {
        let buyer = sol.funded_wallet(15, 1_000_000).await;
        let out = run_client(
            &std::path::PathBuf::from("node"),
            "tests/interop/buy-svm.mjs",
            &[
                &format!("{}/v1/chat/completions", gw.base),
                &keypair_b58(&buyer),
                &sol.url,
                "POST",
                &body.to_string(),
            ],
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["body"]["object"], "chat.completion", "{out}");
        assert_eq!(out["paymentResponse"]["network"], SVM_DEVNET, "{out}");
        assert_eq!(sol.usdc_of(&pubkey(&buyer)).await, 990_000);
        assert_eq!(sol.usdc_of(&pubkey(&operator)).await, 10_000);
    }

    // A replayed payment header is refused before the upstream is asked.
    let payer = sol.funded_wallet(16, 1_000_000).await;
    let header = svm_payment(&sol, &offer, &payer, "77aa00bb11cc22dd").await;
    let send = || {
        let http = gw.http.clone();
        let url = format!("{}/v1/chat/completions", gw.base);
        let header = header.clone();
        let body = body.clone();
        async move {
            let r = http
                .post(url)
                .header("PAYMENT-SIGNATURE", header)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            (status, text)
        }
    };
    let (status, text) = send().await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let asked = stats.requests.load(Ordering::SeqCst);
    let (status, text) = send().await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{text}");
    assert!(text.contains("duplicate_settlement"), "{text}");
    assert_eq!(
        stats.requests.load(Ordering::SeqCst),
        asked,
        "not forwarded"
    );
    assert_eq!(sol.usdc_of(&pubkey(&payer)).await, 990_000, "paid once");
    gw.stop().await;
}
