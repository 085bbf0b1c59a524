//! Keyless pay-per-token with the x402 `upto` scheme, against the real server, real anvil (our own Permit2 and
//! upto proxy at the canonical addresses, so the official clients sign for them unchanged) and the demo upstream:
//! - the official TypeScript (`@x402/fetch` + `@x402/evm` UptoEvmScheme) and Python (`x402` UptoEvmScheme) clients
//!   pay for streamed and JSON completions; what moves on chain equals the metered cost to the atomic unit;
//! - a request that produced nothing billable moves nothing;
//! - one authorization, replayed concurrently and later, is served once;
//! - expired, underfunded, unapproved (412), re-targeted or tampered authorizations are refused before any upstream
//!   call;
//! - an allowance revoked while the answer streams is recorded unsettled, blocks the payer, and is settled by the
//!   retrier once the allowance is back; `audit verify` reconciles every upto settlement.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::dev::contracts::TestUSDC;
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats};
use x402_gateway::proxy::pricing::Prices;
use x402_gateway::usdc::Usdc;
use x402_gateway::x402::header as xh;
use x402_gateway::x402::permit2::{PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS};
use x402_gateway::x402::upto::{Permit2Authorization, Permitted, UptoWitness, digest};

use crate::clients::{interop_required, python, root, run_client};
use crate::proxy::messages;
use crate::support::*;

const SETTLER_ENV: &str = "TEST_UPTO_SETTLER_KEY";
/// anvil's account 8 settles (it pays gas only; the dev chain's payers are 2–4, payTo 1).
const SETTLER_INDEX: usize = 8;
const PRICES: Prices = Prices {
    input_per_mtok: Usdc(600_000),
    output_per_mtok: Usdc(2_500_000),
};

struct Upto {
    chain: TestChain,
    gw: Gateway,
    upstream: Arc<DemoStats>,
    _dir: tempfile::TempDir,
    /// The official facilitator the gateway settles through, when it does.
    _facilitator: Option<tokio::process::Child>,
}

/// The `[x402]` section: self settlement by anvil's account 8, or the facilitator at (url, address).
fn x402_section(facilitator: Option<&(String, String)>) -> String {
    match facilitator {
        None => format!("settler_key_env = \"{SETTLER_ENV}\"\n"),
        Some((url, address)) => format!(
            "settlement = \"facilitator\"\nfacilitator_url = \"{url}\"\nfacilitator_address = \"{address}\"\n"
        ),
    }
}

fn config(chain: &TestChain, upstream: &str, db: &std::path::Path) -> String {
    format!(
        r#"
[chain]
network = "custom"
chain_id = 31337
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = 1
poll_interval_ms = 50

[database]
path = "{db}"

[[upstreams]]
name = "vllm"
base_url = "{upstream}"

[[models]]
id = "demo"
upstream = "vllm"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = 40
upto = true

[[models]]
id = "demo-both"
upstream = "vllm"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = 40
per_request_usdc = "0.01"
upto = true

[[models]]
id = "demo-fail"
upstream = "vllm"
upstream_model = "fail-500"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = 40
upto = true

[credits]
min_topup_usdc = "1.00"

[x402]
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

impl Upto {
    async fn start(token_delay_ms: u64) -> Upto {
        Upto::start_with(token_delay_ms, false, "").await
    }

    /// With `through_facilitator`, the official facilitator (tests/interop/facilitator.mjs, anvil's account 8)
    /// settles instead of the gateway's hot wallet.
    async fn start_with(token_delay_ms: u64, through_facilitator: bool, x402_extra: &str) -> Upto {
        let chain = TestChain::start().await;
        let key = format!(
            "0x{}",
            alloy::hex::encode(chain.dev.anvil.keys()[SETTLER_INDEX].to_bytes())
        );
        let (facilitator, child) = if through_facilitator {
            use tokio::io::AsyncBufReadExt;
            let mut child = tokio::process::Command::new("node")
                .arg(root().join("tests/interop/facilitator.mjs"))
                .args([chain.rpc_url(), key.clone(), "31337".into()])
                .current_dir(root())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("node runs");
            let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the facilitator says where it listens");
            let v: Value = serde_json::from_str(&line).unwrap();
            let at = (
                v["url"].as_str().unwrap().to_string(),
                v["address"].as_str().unwrap().to_string(),
            );
            (Some(at), Some(child))
        } else {
            (None, None)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stats = Arc::new(DemoStats::default());
        let demo = DemoConfig {
            token_delay: std::time::Duration::from_millis(token_delay_ms),
            ..DemoConfig::default()
        };
        tokio::spawn(upstream::run(
            listener,
            demo,
            stats.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let gw = Gateway::start_with_env(
            config(&chain, &url, &db) + &x402_section(facilitator.as_ref()) + x402_extra,
            db,
            Arc::new(AtomicI64::new(now() as i64)),
            &[(SETTLER_ENV, &key)],
        )
        .await;
        Upto {
            chain,
            gw,
            upstream: stats,
            _dir: dir,
            _facilitator: child,
        }
    }

    fn settler(&self) -> Address {
        PrivateKeySigner::from(self.chain.dev.anvil.keys()[SETTLER_INDEX].clone()).address()
    }

    fn key_hex(&self, i: usize) -> String {
        format!("0x{}", alloy::hex::encode(self.chain.payer(i).to_bytes()))
    }

    async fn approve(&self, i: usize, amount: U256) {
        let pending = TestUSDC::new(self.chain.token(), &self.chain.provider)
            .approve(PERMIT2_ADDRESS, amount)
            .from(self.chain.payer(i).address())
            .send()
            .await
            .expect("approve sent");
        assert!(self.chain.receipt(*pending.tx_hash()).await.status());
    }

    async fn balance(&self, who: Address) -> i64 {
        let b = TestUSDC::new(self.chain.token(), &self.chain.provider)
            .balanceOf(who)
            .call()
            .await
            .unwrap();
        i64::try_from(b).unwrap()
    }

    async fn post(&self, path: &str, body: &Value, payment: Option<&str>) -> reqwest::Response {
        let mut req = self
            .gw
            .http
            .post(format!("{}{path}", self.gw.base))
            .json(body);
        if let Some(p) = payment {
            req = req.header("PAYMENT-SIGNATURE", p);
        }
        req.send().await.unwrap()
    }

    /// `body` to `path` with an upto payment of `offer` signed by `signer` (Permit2 nonce `nonce`).
    async fn post_signed(
        &self,
        path: &str,
        body: &Value,
        signer: &PrivateKeySigner,
        offer: &Value,
        nonce: u64,
    ) -> reqwest::Response {
        self.post(path, body, Some(&sign(signer, offer, nonce, |_| {})))
            .await
    }

    /// The 402 for `body`: its decoded PAYMENT-REQUIRED.
    async fn required(&self, body: &Value) -> Value {
        let r = self.post("/v1/chat/completions", body, None).await;
        assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
        let header = r
            .headers()
            .get("PAYMENT-REQUIRED")
            .expect("PAYMENT-REQUIRED")
            .to_str()
            .unwrap()
            .to_string();
        xh::decode_json(&header).unwrap()
    }

    async fn rows(&self) -> Vec<Value> {
        let store = self.gw.store().await;
        let rows = store
            .read(|c| x402_gateway::store::upto::list(c))
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect()
    }

    async fn audit(&self) -> x402_gateway::audit::verify::Report {
        x402_gateway::audit::verify::verify(
            &self.gw.settings(),
            &self.gw.store().await,
            &mut |_| {},
        )
        .await
        .unwrap()
    }
}

/// The upto entry of a decoded PAYMENT-REQUIRED.
fn upto_offer(required: &Value) -> Value {
    required["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["scheme"] == "upto")
        .cloned()
        .expect("an upto offer")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An upto PAYMENT-SIGNATURE signed by `signer` for `offer`, with `edit` applied to the authorization before it is
/// signed (an attacker's changes are signed by the attacker).
fn sign(
    signer: &PrivateKeySigner,
    offer: &Value,
    nonce: u64,
    edit: impl FnOnce(&mut Permit2Authorization),
) -> String {
    let mut auth = Permit2Authorization {
        from: signer.address(),
        permitted: Permitted {
            token: offer["asset"].as_str().unwrap().parse().unwrap(),
            amount: offer["amount"].as_str().unwrap().parse().unwrap(),
        },
        spender: UPTO_PROXY_ADDRESS,
        nonce: U256::from(nonce),
        deadline: U256::from(now() + 300),
        witness: UptoWitness {
            to: offer["payTo"].as_str().unwrap().parse().unwrap(),
            facilitator: offer["extra"]["facilitatorAddress"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
            valid_after: U256::from(now() - 600),
        },
    };
    edit(&mut auth);
    let signature = signer.sign_hash_sync(&digest(&auth, 31337)).unwrap();
    let payload = json!({
        "x402Version": 2,
        "accepted": offer,
        "payload": {
            "signature": format!("0x{}", alloy::hex::encode(signature.as_bytes())),
            "permit2Authorization": auth,
        }
    });
    xh::encode(&payload)
}

fn chat(content: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"model": "demo", "messages": messages(content), "max_tokens": max_tokens, "stream": stream})
}

async fn error_code(r: reqwest::Response) -> (StatusCode, String) {
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_the_402_offers_the_worst_case_next_to_exact() {
    let s = Upto::start(0).await;
    let body =
        json!({"model": "demo-both", "messages": messages("one two three"), "max_tokens": 7});
    let required = s.required(&body).await;
    let schemes: Vec<&str> = required["accepts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["scheme"].as_str().unwrap())
        .collect();
    assert_eq!(schemes, ["exact", "upto"], "{required}");
    let offer = upto_offer(&required);
    assert_eq!(
        offer["extra"]["facilitatorAddress"],
        s.settler().to_checksum(None)
    );
    assert_eq!(offer["extra"]["name"], "USDC");
    // The maximum is this request's bound at the model's prices: a longer answer allowed costs more.
    let small: i64 = offer["amount"].as_str().unwrap().parse().unwrap();
    let bigger = upto_offer(
        &s.required(
            &json!({"model": "demo-both", "messages": messages("one two three"), "max_tokens": 30}),
        )
        .await,
    );
    let big: i64 = bigger["amount"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        big - small,
        PRICES.cost(0, 23).atomic(),
        "23 more output tokens at 2.50/Mtok"
    );
    // A model with upto only: no exact offer.
    let only = s.required(&chat("one", 5, false)).await;
    assert_eq!(only["accepts"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_official_clients_pay_exactly_the_metered_cost_streamed_or_not() {
    let s = Upto::start(0).await;
    let node = std::path::PathBuf::from("node");
    let fetch_installed = root()
        .join("node_modules/@x402/fetch/package.json")
        .exists();
    assert!(
        fetch_installed || !interop_required(),
        "@x402/fetch is not installed"
    );
    let mut clients: Vec<(std::path::PathBuf, &str, usize)> = Vec::new();
    if fetch_installed {
        clients.push((node.clone(), "tests/interop/upto.mjs", 0));
    }
    clients.push((python(), "tests/interop/upto.py", 1));
    let url = format!("{}/v1/chat/completions", s.gw.base);
    let mut checked = 0;
    for (program, script, payer) in clients {
        s.approve(payer, U256::MAX).await;
        let address = s.chain.payer(payer).address();
        for stream in [false, true] {
            let before = (s.balance(address).await, s.balance(s.chain.pay_to()).await);
            let body = chat("pay me per token please", 12, stream).to_string();
            let Some(out) = run_client(&program, script, &[&url, &s.key_hex(payer), &body]).await
            else {
                continue;
            };
            assert_eq!(out["status"], 200, "{script} stream={stream}: {out}");
            let receipt = if stream {
                assert!(
                    out["paymentResponse"].is_null(),
                    "a stream's headers left before its cost"
                );
                let text = out["body"].as_str().unwrap();
                assert!(text.contains("data: [DONE]"), "{text}");
                out["paymentEvent"].clone()
            } else {
                assert_eq!(out["body"]["usage"]["completion_tokens"], 12, "{out}");
                out["paymentResponse"].clone()
            };
            assert_eq!(receipt["success"], true, "{script} stream={stream}: {out}");
            let paid: i64 = receipt["amount"].as_str().unwrap().parse().unwrap();
            // The ledger of the payment: tokens, prices and cost, computed like a credit request.
            let rows = s.rows().await;
            let row = rows
                .iter()
                .find(|r| r["txHash"] == receipt["transaction"])
                .unwrap_or_else(|| panic!("the row of {receipt}: {rows:?}"));
            assert_eq!(row["status"], "settled");
            assert_eq!(row["payer"], format!("{address:#x}"));
            assert_eq!(row["costAtomic"], paid);
            let (p, c) = (
                row["promptTokens"].as_u64().unwrap(),
                row["completionTokens"].as_u64().unwrap(),
            );
            assert_eq!(c, 12);
            assert_eq!(PRICES.cost(p, c).atomic(), paid, "{row}");
            assert!(
                paid < row["maxAtomic"].as_i64().unwrap(),
                "charged the usage, not the maximum"
            );
            // On chain: exactly the metered cost moved, from the payer to payTo.
            let after = (s.balance(address).await, s.balance(s.chain.pay_to()).await);
            assert_eq!(before.0 - after.0, paid, "{script} stream={stream}");
            assert_eq!(after.1 - before.1, paid, "{script} stream={stream}");
            // The status lookup tells the same.
            let path = out["paymentStatus"].as_str().unwrap();
            let (status, _, looked) = s.gw.get(path, None).await;
            assert_eq!(status, StatusCode::OK, "{looked}");
            assert_eq!(looked["settlement"]["amount"], receipt["amount"]);
            checked += 1;
        }
    }
    if interop_required() {
        assert_eq!(checked, 4);
    }
    // One ledger: every upto settlement is a claimed payment whose transfer the indexer holds.
    let head = s.chain.head().await;
    s.gw.confirm(&s.chain, head, 1).await;
    let report = s.audit().await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_nothing_billable_moves_nothing_and_an_authorization_is_single_use() {
    let s = Upto::start(0).await;
    s.approve(0, U256::MAX).await;
    let signer = s.chain.payer(0).clone();
    let before = s.balance(signer.address()).await;

    // The upstream fails before any output: nothing billable, no transaction, and the authorization is spent.
    let failing = json!({"model": "demo-fail", "messages": messages("hello"), "max_tokens": 5});
    let offer = upto_offer(&s.required(&failing).await);
    let header = sign(&signer, &offer, 1, |_| {});
    let r = s
        .post("/v1/chat/completions", &failing, Some(&header))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let rows = s.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "zero", "{rows:?}");
    assert!(rows[0]["txHash"].is_null());
    assert_eq!(s.balance(signer.address()).await, before);
    let again = s
        .post("/v1/chat/completions", &failing, Some(&header))
        .await;
    assert_eq!(
        error_code(again).await,
        (StatusCode::PAYMENT_REQUIRED, "duplicate_payment".into())
    );

    // One authorization sent five times at once, then once more: served once, settled once.
    let body = chat("one two three", 6, false);
    let offer = upto_offer(&s.required(&body).await);
    let header = sign(&signer, &offer, 2, |_| {});
    let answers = futures::future::join_all(
        (0..5).map(|_| s.post("/v1/chat/completions", &body, Some(&header))),
    )
    .await;
    let mut ok = 0;
    for r in answers {
        match r.status() {
            StatusCode::OK => ok += 1,
            _ => {
                let (status, code) = error_code(r).await;
                assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
                assert!(
                    [
                        "duplicate_payment",
                        "permit2_invalid_nonce",
                        "permit2_simulation_failed"
                    ]
                    .contains(&code.as_str()),
                    "{code}"
                );
            }
        }
    }
    assert_eq!(ok, 1);
    let later = s.post("/v1/chat/completions", &body, Some(&header)).await;
    assert_eq!(later.status(), StatusCode::PAYMENT_REQUIRED);
    let settled: Vec<Value> = s
        .rows()
        .await
        .into_iter()
        .filter(|r| r["status"] == "settled")
        .collect();
    assert_eq!(settled.len(), 1);
    let cost = settled[0]["costAtomic"].as_i64().unwrap();
    assert_eq!(before - s.balance(signer.address()).await, cost);
    assert_eq!(
        s.upstream.requests.load(Ordering::SeqCst),
        2,
        "the failing request and the one served"
    );

    // The audit reconciles both, and notices a charge that is not the tokens at their prices.
    let head = s.chain.head().await;
    s.gw.confirm(&s.chain, head, 1).await;
    let report = s.audit().await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert_eq!(report.upto_payments_checked, 2);
    let id = settled[0]["id"].as_i64().unwrap();
    s.gw.store()
        .await
        .write(move |c| -> Result<(), x402_gateway::store::StoreError> {
            c.execute(
                "UPDATE upto_payments SET cost_atomic = cost_atomic - 1 WHERE id = ?1",
                x402_gateway::params![id],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let report = s.audit().await;
    let checks: Vec<&str> = report.discrepancies.iter().map(|d| d.check).collect();
    assert!(checks.contains(&"upto"), "{:?}", report.discrepancies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_bad_authorizations_are_refused_before_any_upstream_call() {
    let s = Upto::start(0).await;
    let body = chat("one two three", 6, false);
    let offer = upto_offer(&s.required(&body).await);
    let max: U256 = offer["amount"].as_str().unwrap().parse().unwrap();
    let payer = s.chain.payer(0).clone();

    // No Permit2 allowance: 412, as the specification says.
    let r = s
        .post_signed("/v1/chat/completions", &body, &payer, &offer, 1)
        .await;
    assert!(r.headers().get("PAYMENT-RESPONSE").is_some());
    assert_eq!(
        error_code(r).await,
        (
            StatusCode::PRECONDITION_FAILED,
            "permit2_allowance_required".into()
        )
    );
    s.approve(0, U256::MAX).await;

    type Edit = Box<dyn FnOnce(&mut Permit2Authorization)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "permit2_deadline_expired",
            Box::new(|a| a.deadline = U256::from(now() - 1)),
        ),
        (
            "permit2_not_yet_valid",
            Box::new(|a| a.witness.valid_after = U256::from(now() + 600)),
        ),
        (
            "upto_facilitator_mismatch",
            Box::new(|a| a.witness.facilitator = Address::repeat_byte(7)),
        ),
        (
            "invalid_permit2_recipient_mismatch",
            Box::new(|a| a.witness.to = Address::repeat_byte(8)),
        ),
        (
            "invalid_permit2_spender",
            Box::new(|a| a.spender = Address::repeat_byte(9)),
        ),
        (
            "permit2_amount_mismatch",
            Box::new(move |a| a.permitted.amount = max - U256::from(1)),
        ),
    ];
    for (i, (code, edit)) in cases.into_iter().enumerate() {
        let header = sign(&payer, &offer, 10 + i as u64, edit);
        let r = s.post("/v1/chat/completions", &body, Some(&header)).await;
        assert_eq!(
            error_code(r).await,
            (StatusCode::PAYMENT_REQUIRED, code.to_string())
        );
    }
    // Signed by someone else for this payer.
    let forged = {
        let mut payload =
            xh::decode_json(&sign(&s.chain.payer(1).clone(), &offer, 20, |_| {})).unwrap();
        payload["payload"]["permit2Authorization"]["from"] =
            json!(payer.address().to_checksum(None));
        xh::encode(&payload)
    };
    let r = s.post("/v1/chat/completions", &body, Some(&forged)).await;
    assert_eq!(
        error_code(r).await,
        (
            StatusCode::PAYMENT_REQUIRED,
            "invalid_permit2_signature".into()
        )
    );
    // Underfunded: payer 2 approves but holds less than the maximum.
    s.approve(2, U256::MAX).await;
    let poor = s.chain.payer(2).address();
    let holding = s.balance(poor).await;
    s.chain
        .transfer_token(s.chain.token(), poor, s.chain.pay_to(), Usdc(holding - 1))
        .await;
    let r = s
        .post_signed(
            "/v1/chat/completions",
            &body,
            &s.chain.payer(2).clone(),
            &offer,
            30,
        )
        .await;
    assert_eq!(
        error_code(r).await,
        (
            StatusCode::PAYMENT_REQUIRED,
            "permit2_insufficient_balance".into()
        )
    );
    // Unreadable.
    let r = s
        .post(
            "/v1/chat/completions",
            &body,
            Some(&xh::encode(
                &json!({"x402Version": 2, "accepted": {"scheme": "upto"}}),
            )),
        )
        .await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);

    assert_eq!(
        s.upstream.requests.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
    assert!(s.rows().await.is_empty(), "nothing was recorded as served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_a_revoked_allowance_is_recorded_unsettled_blocks_the_payer_and_settles_on_retry() {
    // 60 ms per token: the stream lasts long enough to revoke the allowance in the middle of it.
    let s = Upto::start(60).await;
    s.approve(0, U256::MAX).await;
    let payer = s.chain.payer(0).clone();
    let body = chat("one two three", 20, true);
    let offer = upto_offer(&s.required(&body).await);
    let r = s
        .post_signed("/v1/chat/completions", &body, &payer, &offer, 1)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let status_path = r.headers()["x-payment-status"]
        .to_str()
        .unwrap()
        .to_string();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Verified, served, and now the payer pulls the allowance before the settlement.
    s.approve(0, U256::ZERO).await;
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let event = text
        .split("\n\n")
        .find(|e| e.starts_with("event: x402.payment-response"))
        .unwrap_or_else(|| panic!("no payment event: {text}"));
    let data: Value = serde_json::from_str(event.split("data: ").nth(1).unwrap()).unwrap();
    assert_eq!(data["success"], false, "{data}");
    assert_eq!(data["errorReason"], "permit2_allowance_required");
    let rows = s.rows().await;
    assert_eq!(rows[0]["status"], "unsettled", "{rows:?}");
    let owed = rows[0]["costAtomic"].as_i64().unwrap();
    assert!(owed > 0);

    // The payer is refused, before any upstream call, until it settles.
    let served = s.upstream.requests.load(Ordering::SeqCst);
    let again = chat("four", 3, false);
    let offer2 = upto_offer(&s.required(&again).await);
    let r = s
        .post_signed("/v1/chat/completions", &again, &payer, &offer2, 2)
        .await;
    assert_eq!(
        error_code(r).await,
        (
            StatusCode::PAYMENT_REQUIRED,
            "upto_payer_has_unsettled_payment".into()
        )
    );
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), served);

    // The auditor sees what is owed.
    let report = s.audit().await;
    assert_eq!(report.upto_unsettled.len(), 1, "{report:?}");
    assert_eq!(report.upto_unsettled[0].owed, Usdc(owed));

    // The allowance comes back: the retrier settles exactly what was owed, and the payer is served again.
    let before = s.balance(payer.address()).await;
    s.approve(0, U256::MAX).await;
    let looked = wait_for("the retrier settles the unsettled payment", || {
        let s = &s;
        let path = status_path.clone();
        async move {
            let (_, _, v) = s.gw.get(&path, None).await;
            (v["payment"]["status"] == "settled").then_some(v)
        }
    })
    .await;
    assert_eq!(looked["settlement"]["amount"], owed.to_string());
    assert_eq!(before - s.balance(payer.address()).await, owed);
    let r = s
        .post_signed("/v1/chat/completions", &again, &payer, &offer2, 3)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let head = s.chain.head().await;
    s.gw.confirm(&s.chain, head, 1).await;
    let report = s.audit().await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_every_metered_endpoint_settles_its_metered_cost() {
    let s = Upto::start(0).await;
    s.approve(0, U256::MAX).await;
    let payer = s.chain.payer(0).clone();
    let cases = [
        (
            "/v1/completions",
            json!({"model": "demo", "prompt": "one two", "max_tokens": 5, "stream": true}),
        ),
        (
            "/v1/responses",
            json!({"model": "demo", "input": "one two", "max_output_tokens": 6}),
        ),
        (
            "/v1/messages",
            json!({"model": "demo", "max_tokens": 7, "stream": true,
            "messages": [{"role": "user", "content": "one two"}]}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "demo", "input": "one two three"}),
        ),
    ];
    for (i, (path, body)) in cases.iter().enumerate() {
        let r = s.post(path, body, None).await;
        assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED, "{path}");
        let required = xh::decode_json(r.headers()["PAYMENT-REQUIRED"].to_str().unwrap()).unwrap();
        assert!(
            required["resource"]["url"]
                .as_str()
                .unwrap()
                .ends_with(path),
            "{required}"
        );
        let offer = upto_offer(&required);
        let r = s
            .post_signed(path, body, &payer, &offer, 100 + i as u64)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let header = r
            .headers()
            .get("PAYMENT-RESPONSE")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let receipt = match header {
            Some(h) => xh::decode_json(&h).unwrap(),
            None => {
                let event = text
                    .split("\n\n")
                    .find(|e| e.starts_with("event: x402.payment-response"))
                    .unwrap_or_else(|| panic!("{path}: no receipt in {text}"));
                serde_json::from_str(event.split("data: ").nth(1).unwrap()).unwrap()
            }
        };
        assert_eq!(receipt["success"], true, "{path}: {receipt}");
        let rows = s.rows().await;
        let row = rows.last().unwrap();
        assert_eq!(
            row["resource"].as_str().unwrap(),
            required["resource"]["url"].as_str().unwrap()
        );
        assert_eq!(
            receipt["amount"],
            row["costAtomic"].as_i64().unwrap().to_string(),
            "{path}"
        );
        assert!(row["costAtomic"].as_i64().unwrap() > 0, "{path}");
        assert_eq!(row["status"], "settled", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_through_the_official_facilitator_settles_the_metered_amount() {
    let fetch_installed = root().join("node_modules/@x402/core/package.json").exists();
    if !fetch_installed {
        assert!(!interop_required(), "@x402/core is not installed");
        eprintln!("skipping: @x402/core is not installed (run scripts/test)");
        return;
    }
    let s = Upto::start_with(0, true, "").await;
    s.approve(0, U256::MAX).await;
    let payer = s.chain.payer(0).address();
    let url = format!("{}/v1/chat/completions", s.gw.base);
    for stream in [false, true] {
        let before = s.balance(payer).await;
        let body = chat("settled by a facilitator", 9, stream).to_string();
        let out = run_client(
            std::path::Path::new("node"),
            "tests/interop/upto.mjs",
            &[&url, &s.key_hex(0), &body],
        )
        .await
        .expect("node runs");
        assert_eq!(out["status"], 200, "stream={stream}: {out}");
        let receipt = if stream {
            &out["paymentEvent"]
        } else {
            &out["paymentResponse"]
        };
        assert_eq!(receipt["success"], true, "stream={stream}: {out}");
        let paid: i64 = receipt["amount"].as_str().unwrap().parse().unwrap();
        let rows = s.rows().await;
        let row = rows
            .iter()
            .find(|r| r["txHash"] == receipt["transaction"])
            .unwrap();
        assert_eq!(row["costAtomic"], paid);
        assert!(paid < row["maxAtomic"].as_i64().unwrap());
        assert_eq!(
            before - s.balance(payer).await,
            paid,
            "the facilitator settled the metered amount"
        );
        // Sent by the facilitator's account, through the upto proxy.
        let tx: B256 = receipt["transaction"].as_str().unwrap().parse().unwrap();
        let mined = s.chain.receipt(tx).await;
        assert_eq!(mined.from, s.settler());
        assert_eq!(mined.to, Some(UPTO_PROXY_ADDRESS));
    }
    // The facilitator's own refusal reaches the client: a payer without a Permit2 allowance gets the 412.
    let body = chat("one", 3, false);
    let offer = upto_offer(&s.required(&body).await);
    let r = s
        .post_signed(
            "/v1/chat/completions",
            &body,
            &s.chain.payer(1).clone(),
            &offer,
            7,
        )
        .await;
    assert_eq!(
        error_code(r).await,
        (
            StatusCode::PRECONDITION_FAILED,
            "permit2_allowance_required".into()
        )
    );
    let head = s.chain.head().await;
    s.gw.confirm(&s.chain, head, 1).await;
    let report = s.audit().await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_the_402s_pass_the_x402_conformance_resource_checks() {
    let s = Upto::start(0).await;
    let url = format!("{}/v1/chat/completions", s.gw.base);
    let mut checked = 0;
    for model in ["demo", "demo-both"] {
        let body =
            json!({"model": model, "messages": messages("hello"), "max_tokens": 8}).to_string();
        let Some(out) = run_client(
            &python(),
            "tests/interop/conformance_post.py",
            &[&url, &body],
        )
        .await
        else {
            continue;
        };
        assert_eq!(out["http"], 402, "{out}");
        let checks = out["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 7, "P1-P7 all ran: {out}");
        for c in checks {
            assert_eq!(c["pass"], true, "{model}: {c}");
        }
        checked += 1;
    }
    if interop_required() {
        assert_eq!(checked, 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upto_a_settlement_without_a_receipt_is_never_sent_twice_and_is_recorded_once_it_lands() {
    // Receipts are awaited max_timeout_seconds (10 s here, the least allowed); the authorization is valid 300 s.
    let s = Upto::start_with(0, false, "max_timeout_seconds = 10\n").await;
    s.approve(0, U256::MAX).await;
    let payer = s.chain.payer(0).clone();
    let before = s.balance(payer.address()).await;
    let body = chat("one two three", 6, false);
    let offer = upto_offer(&s.required(&body).await);
    // The chain stops mining: the settlement is sent and sits in the mempool without a receipt.
    let _: Value = s
        .chain
        .provider
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .unwrap();
    let r = s
        .post_signed("/v1/chat/completions", &body, &payer, &offer, 1)
        .await;
    assert_eq!(r.status(), StatusCode::OK, "the answer was served");
    let receipt = xh::decode_json(r.headers()["PAYMENT-RESPONSE"].to_str().unwrap()).unwrap();
    assert_eq!(receipt["success"], false, "{receipt}");
    assert_eq!(receipt["errorReason"], "unexpected_settle_error");
    let rows = s.rows().await;
    assert_eq!(rows[0]["status"], "unsettled", "{rows:?}");
    let pending = rows[0]["pendingTx"]
        .as_str()
        .expect("the sent transaction is remembered")
        .to_string();
    // The retrier waits for that transaction instead of sending a second one (and says so in the row).
    let nonce_before: u64 = s
        .chain
        .provider
        .get_transaction_count(s.settler())
        .pending()
        .await
        .unwrap();
    wait_for("the retrier looks at the pending settlement", || async {
        let rows = s.rows().await;
        rows[0]["lastError"]
            .as_str()
            .is_some_and(|e| e.starts_with("waiting for the receipt of"))
            .then_some(())
    })
    .await;
    let nonce_after: u64 = s
        .chain
        .provider
        .get_transaction_count(s.settler())
        .pending()
        .await
        .unwrap();
    assert_eq!(
        nonce_after, nonce_before,
        "nothing else was sent while the first is pending"
    );
    // The chain mines again: the retrier finds the receipt and records that transaction, once.
    let _: Value = s
        .chain
        .provider
        .raw_request("evm_setAutomine".into(), (true,))
        .await
        .unwrap();
    let _: Value = s
        .chain
        .provider
        .raw_request("evm_mine".into(), ())
        .await
        .unwrap();
    let row = wait_for("the retrier records the landed settlement", || async {
        let rows = s.rows().await;
        (rows[0]["status"] == "settled").then(|| rows[0].clone())
    })
    .await;
    assert_eq!(row["txHash"], pending);
    assert!(row["pendingTx"].is_null());
    let cost = row["costAtomic"].as_i64().unwrap();
    assert_eq!(before - s.balance(payer.address()).await, cost, "paid once");
    let head = s.chain.head().await;
    s.gw.confirm(&s.chain, head, 1).await;
    let report = s.audit().await;
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}
