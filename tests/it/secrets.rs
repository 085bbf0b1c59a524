//! Issue 13, hole 9: secrets and replays across gateways.
//!
//! - RPC URLs carry provider keys (path, query, userinfo). With endpoints that refuse connections, answer HTTP 500
//!   or garbage echoing the request path, and a WebSocket that refuses, no key reaches `/healthz`, `/readyz`,
//!   `/metrics`, `/admin`, a claim's or a rotation's 503 body, `audit verify`'s output, or the real binary's logs at
//!   `debug`.
//! - A key-rotation signature names the gateway (host, payTo, chain): one made for gateway A is refused by gateway
//!   B, which knows the same payer on the same chain.
//! - A top-up's `newBalance` is a JSON number written from the exact decimal, with the string in `newBalanceUsdc`.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use axum::body::Bytes;
use axum::http::{StatusCode as AxumStatus, Uri};
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::{claim_text, rotate_text};

use crate::checkout::{CHAIN_ID, GATEWAY_HOST, Options, T0, config_text, confirm, usdc};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_x402-gateway");
const ADMIN: &str = "admin-token-secrets-test-0001";
const AUDITOR: &str = "auditor-token-secrets-test-0002";
/// What the configured URLs hide; none may appear anywhere the gateway writes.
const SECRETS: [&str; 5] = [
    "SecretUser7f3a",
    "SecretPass9c2e",
    "SecretQuery4b1d",
    "SecretPathKey8e6f",
    "SecretWsKey2a9c",
];

fn sign(signer: &PrivateKeySigner, text: &str) -> String {
    format!(
        "0x{}",
        alloy::hex::encode(
            signer
                .sign_message_sync(text.as_bytes())
                .unwrap()
                .as_bytes()
        )
    )
}

/// A provider in front of anvil that can fail the way providers do, echoing the request path (and so the key in
/// it) in its error pages: HTTP 500 and HTTP 200 with a body that is not JSON, in turn.
#[derive(Clone)]
struct EchoingProvider {
    port: u16,
    failing: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
}

impl EchoingProvider {
    async fn start(anvil: String) -> EchoingProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = EchoingProvider {
            port: listener.local_addr().unwrap().port(),
            failing: Arc::default(),
            served: Arc::default(),
        };
        let state = p.clone();
        let client = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |uri: Uri, body: Bytes| {
            let state = state.clone();
            let client = client.clone();
            let anvil = anvil.clone();
            async move {
                let n = state.served.fetch_add(1, Ordering::SeqCst);
                if state.failing.load(Ordering::SeqCst) {
                    return if n.is_multiple_of(2) {
                        (
                            AxumStatus::INTERNAL_SERVER_ERROR,
                            format!("upstream failure serving {uri}"),
                        )
                    } else {
                        (AxumStatus::OK, format!("<html>no route for {uri}</html>"))
                    };
                }
                match client
                    .post(&anvil)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => (AxumStatus::OK, r.text().await.unwrap_or_default()),
                    Err(_) => (AxumStatus::BAD_GATEWAY, String::new()),
                }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        p
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("SECRETS_ADMIN", ADMIN)
        .env("SECRETS_AUDITOR", AUDITOR)
        .env("X402_LOG", "debug");
    cmd
}

fn assert_clean(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} shows the RPC URL secret {secret}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_url_secrets_reach_no_answer_and_no_log() {
    let chain = TestChain::start().await;
    let provider = EchoingProvider::start(chain.rpc_url()).await;
    let dir = tempfile::tempdir().unwrap();
    // The first endpoint refuses connections (the key in userinfo and query), the second is the echoing provider
    // (the key in the path), the WebSocket refuses (the key in the path).
    let refusing = format!(
        "http://{}:{}@127.0.0.1:{}/v3/{}?apikey={}",
        SECRETS[0],
        SECRETS[1],
        closed_port(),
        SECRETS[3],
        SECRETS[2]
    );
    let echoing = format!("http://127.0.0.1:{}/v2/{}", provider.port, SECRETS[3]);
    let ws = format!("ws://127.0.0.1:{}/ws/{}", closed_port(), SECRETS[4]);
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"

[chain]
network = "custom"
chain_id = {CHAIN_ID}
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{refusing}", "{echoing}"]
rpc_ws = "{ws}"
pay_to = "{pay_to:#x}"
confirmations = 1
poll_interval_ms = 50
rpc_timeout_ms = 2000

[database]
path = "gateway.db"

[credits]
min_topup_usdc = "1.00"

[auth]
admin_token_env = "SECRETS_ADMIN"
auditor_token_env = "SECRETS_AUDITOR"

[limits]
rate_limits = false
"#,
            token = chain.token(),
            pay_to = chain.pay_to(),
        ),
    )
    .unwrap();
    let (tx, block) = chain.pay(0, usdc("5")).await;

    let (stdout_log, stderr_log) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
    let server = Server(
        gateway(&["serve"], &config)
            .stdout(std::fs::File::create(&stdout_log).unwrap())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = wait_for("the server's listening line", || async {
        let text = std::fs::read_to_string(&stderr_log).ok()?;
        let pos = text.find("listening on ")?;
        let rest = &text[pos + "listening on ".len()..];
        let end = rest.find(['"', '\n', ' '])?;
        Some(rest[..end].trim().to_string())
    })
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("{base}{path}"));
        async move {
            let resp = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
            (resp.status(), resp.text().await.unwrap())
        }
    };

    // Indexed through the second endpoint while the first refuses.
    wait_for("the payment to be indexed", || async {
        let (_, body) = get("/healthz").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["indexer"]["indexedHead"].as_u64().filter(|h| *h >= block)
    })
    .await;

    // Now the provider fails too: 500 and garbage, both echoing the path with its key.
    provider.failing.store(true, Ordering::SeqCst);
    let health = wait_for("/healthz to report the RPC failure", || async {
        let (_, body) = get("/healthz").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["indexer"]["lastError"].as_str().map(|_| body)
    })
    .await;
    // The failing endpoint is still named, by scheme and host.
    assert!(health.contains("http://127.0.0.1:"), "{health}");
    assert!(health.contains("/…"), "{health}");

    // A claim signed by someone else needs the RPC (ERC-1271 check): 503, naming no key.
    let stranger = chain.payer(1);
    let resp = http
        .post(format!("{base}/api/agent/topup"))
        .json(&json!({"txHash": tx, "amount": "5.00", "signature": sign(stranger, &claim_text(&tx, CHAIN_ID))}))
        .send()
        .await
        .unwrap();
    let (status, claim_body) = (resp.status(), resp.text().await.unwrap());
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{claim_body}");
    assert!(claim_body.contains("rpc_unavailable"), "{claim_body}");
    // A rotation signed by someone else needs it too.
    let address = format!("{:#x}", chain.payer(0).address());
    let resp = http
        .post(format!("{base}/api/agent/keys/rotate"))
        .json(&json!({"address": address, "signedAt": x402_gateway::store::now_unix(), "signature": sign(stranger, "not the text")}))
        .send()
        .await
        .unwrap();
    let (status, rotate_body) = (resp.status(), resp.text().await.unwrap());
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{rotate_body}");

    let mut texts = vec![
        ("/healthz", health),
        ("the claim's 503", claim_body),
        ("the rotation's 503", rotate_body),
    ];
    for path in ["/healthz", "/readyz", "/metrics", "/admin"] {
        let (status, body) = get(path).await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        texts.push((path, body));
    }
    let (_, audit) = {
        let resp = http
            .get(format!("{base}/api/audit/payments"))
            .bearer_auth(AUDITOR)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    };
    texts.push(("the auditor's payments", audit));
    drop(server);

    // The auditor's reconciliation against the chain, with the RPC still failing.
    let out = gateway(&["audit", "verify"], &config).output().unwrap();
    texts.push((
        "audit verify's stdout",
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ));
    texts.push((
        "audit verify's stderr",
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ));

    let logs = format!(
        "{}{}",
        std::fs::read_to_string(&stdout_log).unwrap(),
        std::fs::read_to_string(&stderr_log).unwrap()
    );
    // The failures were logged (and so were looked at), by endpoint host.
    assert!(
        logs.contains("WebSocket failed"),
        "the WebSocket failure is logged"
    );
    assert!(logs.contains("retrying"), "the RPC retries are logged");
    texts.push(("the logs", logs));
    for (what, text) in &texts {
        assert_clean(what, text);
    }
}

/// Two gateways on one chain, one payTo and one payer, told apart by their public host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_signed_for_another_gateway_is_refused() {
    let chain = TestChain::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dir: &Path, host: &str| {
        let db = dir.join("gateway.db");
        let config = config_text(&chain, &db, &Options::default())
            .replace("http://gateway.test", &format!("http://{host}"));
        Gateway::start_with(config, db, Arc::new(AtomicI64::new(T0)))
    };
    const OTHER_HOST: &str = "other-gateway.test";
    let gw_a = start(dir_a.path(), GATEWAY_HOST).await;
    let gw_b = start(dir_b.path(), OTHER_HOST).await;
    let payer = chain.payer(0).clone();
    let address = format!("{:#x}", payer.address());
    // The payer has a key at both gateways.
    for gw in [&gw_a, &gw_b] {
        let (tx, block) = chain.pay(0, usdc("10")).await;
        confirm(gw, &chain, block).await;
        let (status, _, body) = gw
            .post(
                "/api/agent/topup",
                json!({"txHash": tx, "amount": "10.00", "signature": sign(&payer, &claim_text(&tx, CHAIN_ID))}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // The catalog states the exact text, naming its gateway.
    let (_, _, plans) = gw_b.get("/api/agent/plans", None).await;
    let template = plans["x402"]["keyRotation"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        template,
        format!(
            "x402-gateway: rotate key for {{address}} at gateway {OTHER_HOST} (payTo {:#x}) on chain {CHAIN_ID} at \
             {{signedAt}}",
            chain.pay_to()
        )
    );
    let rotation = |host: &str, pay_to, at: i64| {
        json!({"address": address, "signedAt": at,
               "signature": sign(&payer, &rotate_text(&address, host, pay_to, CHAIN_ID, at))})
    };

    // Signed for A (or for another payTo): refused by B, which names the text it wanted.
    for (host, pay_to) in [
        (GATEWAY_HOST, chain.pay_to()),
        (OTHER_HOST, alloy::primitives::Address::repeat_byte(0x42)),
    ] {
        let (status, _, err) = gw_b
            .post("/api/agent/keys/rotate", rotation(host, pay_to, T0))
            .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_signature")),
            "{err}"
        );
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains(OTHER_HOST),
            "{err}"
        );
    }
    // The text filled in from B's catalog works at B; A's own text works at A.
    let text = template
        .replace("{address}", &address)
        .replace("{signedAt}", &T0.to_string());
    let (status, _, ok) = gw_b
        .post(
            "/api/agent/keys/rotate",
            json!({"address": address, "signedAt": T0, "signature": sign(&payer, &text)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(ok["data"]["keys"][0]["kind"], "credit");
    let (status, _, ok) = gw_a
        .post(
            "/api/agent/keys/rotate",
            rotation(GATEWAY_HOST, chain.pay_to(), T0),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    // Still once only.
    let (status, _, err) = gw_a
        .post(
            "/api/agent/keys/rotate",
            rotation(GATEWAY_HOST, chain.pay_to(), T0),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("signature_replayed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_up_new_balance_is_an_exact_json_number() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = crate::checkout::start_gateway(&chain, dir.path(), Options::default()).await;
    let payer = chain.payer(0).clone();
    let mut raw_answers = Vec::new();
    for amount in ["12.345678", "10.000001"] {
        let (tx, block) = chain.pay(0, usdc(amount)).await;
        confirm(&gw, &chain, block).await;
        let resp = gw
            .http
            .post(format!("{}/api/agent/topup", gw.base))
            .json(&json!({"txHash": tx, "amount": amount, "signature": sign(&payer, &claim_text(&tx, CHAIN_ID))}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        raw_answers.push(resp.text().await.unwrap());
    }
    for (raw, (number, string)) in raw_answers
        .iter()
        .zip([("12.345678", "12.345678"), ("22.345679", "22.345679")])
    {
        // Written digit for digit, never through a float.
        assert!(raw.contains(&format!(r#""newBalance":{number}"#)), "{raw}");
        assert!(
            raw.contains(&format!(r#""newBalanceUsdc":"{string}""#)),
            "{raw}"
        );
        let v: Value = serde_json::from_str(raw).unwrap();
        assert!(v["data"]["newBalance"].is_number(), "{raw}");
        assert_eq!(v["data"]["credited"], true);
    }
}
