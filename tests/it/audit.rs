//! Audit and operations against the real binary on a real anvil chain: the auditor API (auth, filters, cursor
//! pagination, CSV), `/metrics`, `/readyz`, `/openapi.json` probed route by route, the `/admin` status page rendered
//! by headless Chromium, secrets absent from a full run's logs, and `audit verify` / `audit export` — clean, then
//! with planted discrepancies.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use reqwest::StatusCode;
use serde_json::{Value, json};
use x402_gateway::billing::catalog::claim_text;
use x402_gateway::usdc::Usdc;

use crate::support::*;

/// The binary under test; `X402_GATEWAY_BIN` overrides it (worktrees sharing one target dir overwrite
/// `target/debug/x402-gateway`).
pub(crate) fn bin() -> String {
    std::env::var("X402_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_x402-gateway").to_string())
}
pub(crate) const ADMIN: &str = "admin-token-6c1f0e9b2a7d4c3e";
pub(crate) const AUDITOR: &str = "auditor-token-94b8e1d2f7a3c650";
/// anvil's well-known key #9, used as the x402 settlement hot wallet: it must never be logged.
pub(crate) const SETTLER_KEY: &str =
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6";

pub(crate) fn sign(signer: &PrivateKeySigner, text: &str) -> String {
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

fn write_config(dir: &Path, chain: &TestChain) -> PathBuf {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"

[chain]
network = "custom"
chain_id = 31337
token_address = "{token:#x}"
token_name = "USDC"
token_version = "2"
rpc_http = ["{rpc}"]
pay_to = "{pay_to:#x}"
confirmations = 2
poll_interval_ms = 50

[database]
path = "gateway.db"

[[upstreams]]
name = "none"
base_url = "http://127.0.0.1:9/v1"

[[models]]
id = "kimi-k2.6"
upstream = "none"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[pools]]
slug = "kimi26"
name = "Kimi K2.6"
models = ["kimi-k2.6"]
blocks = [
  {{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 10 }},
  {{ name = "europe", hours_utc = "08:00-16:00", price_usdc = "49.00", seats = 5 }},
]

[auth]
admin_token_env = "TEST_ADMIN_TOKEN"
auditor_token_env = "TEST_AUDITOR_TOKEN"

[x402]
settler_key_env = "TEST_SETTLER_KEY"
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn gateway_command(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("TEST_ADMIN_TOKEN", ADMIN)
        .env("TEST_AUDITOR_TOKEN", AUDITOR)
        .env("TEST_SETTLER_KEY", SETTLER_KEY)
        .env("X402_LOG", "debug");
    cmd
}

pub(crate) struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve --log-format json` with stderr going to `log`; returns the base URL once the log names it.
pub(crate) async fn serve(config: &Path, log: &Path) -> (Server, String) {
    serve_with_env(config, log, &[]).await
}

/// [`serve`] with more environment variables (a PostgreSQL database URL the config names).
pub(crate) async fn serve_with_env(
    config: &Path,
    log: &Path,
    env: &[(String, String)],
) -> (Server, String) {
    let file = std::fs::File::create(log).unwrap();
    let child = gateway_command(&["--log-format", "json", "serve"], config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let server = Server(child);
    let url = wait_for("the server's listening line", || async {
        let text = std::fs::read_to_string(log).ok()?;
        let pos = text.find("listening on ")?;
        let rest = &text[pos + "listening on ".len()..];
        let end = rest.find(['"', '\n', ' '])?;
        Some(rest[..end].to_string())
    })
    .await;
    (server, url)
}

pub(crate) fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "chromium is not installed; run scripts/test (it installs Debian's `chromium` with apt-get)"
    );
}

/// The DOM of `url` after headless Chromium rendered it.
pub(crate) fn render_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "chromium failed: {status}");
    out
}

/// The text a person sees: the DOM without tags, whitespace collapsed.
/// A PNG screenshot of `url` at `width`×`height`, by headless Chromium with the network closed except loopback
/// (every other request goes to a proxy on a closed local port, so a page that fetched anything from outside
/// would render without it, and the DOM check below would miss it). Returns the PNG's bytes.
pub(crate) fn screenshot(url: &str, width: u32, height: u32) -> Vec<u8> {
    let profile = tempfile::tempdir().unwrap();
    let out = profile.path().join("shot.png");
    let status = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--proxy-server=http://127.0.0.1:9",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("p").display()
        ))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "chromium failed: {status}");
    let png = std::fs::read(&out).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    png
}

pub(crate) fn visible_text(dom: &str) -> String {
    let body = dom.split("<body").nth(1).unwrap_or(dom);
    let mut out = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// With `X402_README_SAMPLES=DIR`, keeps what the run saw (README examples come from there).
fn sample(name: &str, text: &str) {
    if let Ok(dir) = std::env::var("X402_README_SAMPLES") {
        std::fs::write(Path::new(&dir).join(name), text).unwrap();
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (
            resp.status(),
            resp.headers().clone(),
            resp.text().await.unwrap(),
        )
    }

    async fn json(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let (status, _, body) = self.get(path, token).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditor_api_operations_and_verify() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &chain);
    let log = dir.path().join("gateway.log");
    let payer0 = chain.payer(0).clone();
    let payer1 = chain.payer(1).clone();
    let a0 = format!("{:#x}", payer0.address());
    let a1 = format!("{:#x}", payer1.address());

    let (topup_tx, _) = chain.pay(0, "25.00".parse::<Usdc>().unwrap()).await;
    let (sub_tx, sub_block) = chain.pay(1, "39.50".parse::<Usdc>().unwrap()).await;
    let (small_tx, _) = chain.pay(1, "1.25".parse::<Usdc>().unwrap()).await;
    chain.mine(2).await;
    let head = chain.head().await;

    let (server, base) = serve(&config, &log).await;
    let c = Client {
        http: reqwest::Client::new(),
        base: base.clone(),
    };
    wait_for("indexed to the head", || async {
        let (_, h) = c.json("/healthz", None).await;
        h["indexer"]["indexedHead"].as_u64().filter(|n| *n >= head)
    })
    .await;

    // Claims mint keys (whose secrets must never reach the logs).
    let (status, topup) = c
        .post(
            "/api/agent/topup",
            json!({"txHash": topup_tx, "amount": "25.00", "signature": sign(&payer0, &claim_text(&topup_tx, 31337))}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{topup}");
    let credit_key = topup["data"]["apiKey"].as_str().unwrap().to_string();
    let (status, sub) = c
        .post(
            "/api/agent/subscribe-pool",
            json!({"txHash": sub_tx, "poolSlug": "kimi26", "blocks": ["asia"], "signature": sign(&payer1, &claim_text(&sub_tx, 31337))}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sub}");
    let sub_key = sub["data"]["apiKey"].as_str().unwrap().to_string();
    let sub_key_id = sub["data"]["keyId"].as_str().unwrap().to_string();
    // A failed claim, for the outcome metric.
    let (status, _) = c
        .post(
            "/api/agent/topup",
            json!({"txHash": topup_tx, "amount": "25.00", "signature": sign(&payer0, &claim_text(&topup_tx, 31337))}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // --- Auditor API: auth.
    let (status, headers, body) = c.get("/api/audit/payments", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(headers.contains_key("www-authenticate"));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "unauthorized"
    );
    assert_eq!(
        c.get("/api/audit/payments", Some("wrong")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get("/api/audit/payments", Some(&credit_key)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get("/api/audit/payments", Some(ADMIN)).await.0,
        StatusCode::OK
    );

    // Payments, filters, pagination.
    let (status, all) = c.json("/api/audit/payments", Some(AUDITOR)).await;
    sample(
        "payments.json",
        &serde_json::to_string_pretty(&all).unwrap(),
    );
    assert_eq!(status, StatusCode::OK);
    let rows = all["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{all}");
    assert!(all["nextCursor"].is_null());
    let sub_row = rows
        .iter()
        .find(|r| r["txHash"] == sub_tx.as_str())
        .unwrap();
    assert_eq!(sub_row["valueUsdc"], "39.50");
    assert_eq!(sub_row["valueAtomic"], "39500000");
    assert_eq!(sub_row["status"], "confirmed");
    assert_eq!(sub_row["claimed"], true);
    assert_eq!(sub_row["from"], a1.as_str());
    assert!(sub_row["confirmations"].as_u64().unwrap() > head - sub_block);
    let (_, by_payer) = c
        .json(&format!("/api/audit/payments?payer={a1}"), Some(AUDITOR))
        .await;
    assert_eq!(by_payer["data"].as_array().unwrap().len(), 2);
    let (_, big) = c
        .json(
            &format!("/api/audit/payments?payer={a1}&minAmount=10"),
            Some(AUDITOR),
        )
        .await;
    assert_eq!(big["data"].as_array().unwrap().len(), 1);
    assert_eq!(big["data"][0]["txHash"], sub_tx.as_str());
    let (_, none) = c
        .json(
            &format!("/api/audit/payments?toBlock={}", sub_block - 1),
            Some(AUDITOR),
        )
        .await;
    assert!(
        none["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["blockNumber"].as_u64() < Some(sub_block))
    );
    let (_, seen) = c
        .json("/api/audit/payments?status=orphaned", Some(AUDITOR))
        .await;
    assert_eq!(seen["data"], json!([]));
    let mut cursor: Option<String> = None;
    let mut paged = Vec::new();
    loop {
        let path = match &cursor {
            Some(cur) => format!("/api/audit/payments?limit=1&cursor={cur}"),
            None => "/api/audit/payments?limit=1".to_string(),
        };
        let (_, page) = c.json(&path, Some(AUDITOR)).await;
        paged.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["txHash"].clone()),
        );
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
        assert!(paged.len() <= 4, "pagination does not end");
    }
    assert_eq!(
        paged,
        rows.iter().map(|r| r["txHash"].clone()).collect::<Vec<_>>()
    );
    for bad in [
        "status=paid",
        "payer=0x12",
        "minAmount=abc",
        "limit=0",
        "limit=1001",
        "cursor=x",
        "from=yesterday",
        "bogus=1",
        "format=xml",
    ] {
        let (status, body) = c
            .json(&format!("/api/audit/payments?{bad}"), Some(AUDITOR))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{bad}");
    }

    // CSV, by query and by Accept header.
    let (status, headers, csv) = c.get("/api/audit/payments?format=csv", Some(AUDITOR)).await;
    sample("payments.csv", &csv);
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("id,txHash,logIndex,blockNumber"),
        "{csv}"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        csv.contains(&small_tx) && csv.contains(",1.25,1250000,"),
        "{csv}"
    );
    let resp = c
        .http
        .get(format!("{base}/api/audit/claims"))
        .bearer_auth(AUDITOR)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    let claims_csv = resp.text().await.unwrap();
    assert!(
        claims_csv.starts_with("id,txHash,account,kind"),
        "{claims_csv}"
    );
    assert!(
        claims_csv.contains(&topup_tx) && claims_csv.contains(&sub_tx),
        "{claims_csv}"
    );

    // One payment: transfers, history, what it bought, the key's public id — never a secret.
    let (status, detail) = c
        .json(&format!("/api/audit/payments/{sub_tx}"), Some(AUDITOR))
        .await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    sample(
        "payment.json",
        &serde_json::to_string_pretty(&detail).unwrap(),
    );
    assert_eq!(detail["transfers"][0]["valueUsdc"], "39.50");
    let history = detail["transfers"][0]["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["status"], "confirmed", "{detail}");
    assert_eq!(detail["claim"]["kind"], "subscription");
    assert_eq!(detail["claim"]["pool"], "kimi26");
    assert_eq!(detail["claim"]["blocks"], json!(["asia"]));
    assert_eq!(detail["claim"]["priceUsdc"], "39.00");
    assert_eq!(detail["claim"]["surplusUsdc"], "0.50");
    assert_eq!(detail["claim"]["keyPublicId"], sub_key_id.as_str());
    assert_eq!(detail["ledger"][0]["kind"], "surplus");
    let text = detail.to_string();
    assert!(!text.contains(&sub_key) && !text.contains(&credit_key));
    let (status, body) = c
        .json(
            &format!("/api/audit/payments/0x{}", "ab".repeat(32)),
            Some(AUDITOR),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_payment"))
    );
    assert_eq!(
        c.json("/api/audit/payments/0x12", Some(AUDITOR)).await.0,
        StatusCode::BAD_REQUEST
    );

    // Claims, ledger, keys, revenue.
    let (_, claims) = c
        .json(&format!("/api/audit/claims?account={a0}"), Some(AUDITOR))
        .await;
    assert_eq!(claims["data"].as_array().unwrap().len(), 1);
    assert_eq!(claims["data"][0]["kind"], "topup");
    assert_eq!(claims["data"][0]["paidUsdc"], "25.00");
    let (_, ledger) = c
        .json(&format!("/api/audit/accounts/{a0}/ledger"), Some(AUDITOR))
        .await;
    assert_eq!(ledger["data"][0]["kind"], "topup");
    assert_eq!(ledger["data"][0]["amountUsdc"], "25.00");
    assert_eq!(ledger["data"][0]["balanceAfterAtomic"], "25000000");
    let (_, keys) = c.json("/api/audit/keys", Some(AUDITOR)).await;
    let keys = keys["data"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k["kind"] == "subscription"
        && k["state"] == "live"
        && k["expiresAt"].is_string()));
    assert!(!Value::Array(keys.clone()).to_string().contains(&credit_key));
    let (_, revenue) = c.json("/api/audit/revenue", Some(AUDITOR)).await;
    sample(
        "revenue.json",
        &serde_json::to_string_pretty(&revenue).unwrap(),
    );
    sample("keys.json", &serde_json::to_string_pretty(&keys).unwrap());
    let day = &revenue["data"][0];
    assert_eq!(day["receivedUsdc"], "65.75", "{revenue}");
    assert_eq!(day["subscriptionsUsdc"], "39.00");
    assert_eq!(day["topupsUsdc"], "25.00");
    assert_eq!(day["claims"], 2);

    // --- Operations: metrics, readiness, OpenAPI.
    let (status, _, metrics) = c.get("/metrics", None).await;
    sample("metrics.txt", &metrics);
    assert_eq!(status, StatusCode::OK);
    for line in [
        format!("x402_indexer_indexed_head {}", head),
        "x402_transfers{status=\"confirmed\"} 3".to_string(),
        "x402_claims_total{route=\"topup\",outcome=\"ok\"} 1".to_string(),
        "x402_claims_total{route=\"topup\",outcome=\"already_claimed\"} 1".to_string(),
        "x402_keys{kind=\"subscription\",state=\"live\"} 1".to_string(),
        "x402_reorgs_total 0".to_string(),
        "x402_indexer_up 1".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(&line)),
            "missing `{line}` in\n{metrics}"
        );
    }
    let (status, ready) = c.json("/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["databaseWritable"], true);

    let (status, doc) = c.json("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 15);
    for (path, item) in paths {
        let concrete = path
            .replace("{txHash}", &sub_tx)
            .replace("{address}", &a0)
            .replace("{rest}", "images/generations");
        for method in item.as_object().unwrap().keys() {
            let req = c.http.request(
                method.to_uppercase().parse().unwrap(),
                format!("{base}{concrete}"),
            );
            let resp = req.bearer_auth(ADMIN).send().await.unwrap();
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            assert!(
                !body.contains("\"no_route\"") && status != StatusCode::METHOD_NOT_ALLOWED,
                "documented {method} {path} is not served: {status} {body}"
            );
        }
    }
    for unknown in ["/api/audit/nope", "/admin/x", "/nothing-here"] {
        let (status, body) = c.json(unknown, Some(ADMIN)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("no_route")),
            "{unknown}"
        );
    }

    // --- The operator's status page, as a person sees it in a browser.
    let (status, _, _) = c.get("/admin", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = c.get("/admin", Some(AUDITOR)).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the auditor token does not open the admin page"
    );
    let indexed = c.json("/healthz", None).await.1["indexer"]["indexedHead"]
        .as_u64()
        .unwrap();
    let dom = render_dom(&format!("{base}/admin?token={ADMIN}"));
    let seen = visible_text(&dom);
    sample("admin.txt", &seen);
    assert!(seen.contains("x402-gateway status"), "{seen}");
    assert!(seen.contains("Indexer State running"), "{seen}");
    assert!(
        seen.contains(&format!("Indexed head {}", indexed)) || seen.contains("Indexed head"),
        "{seen}"
    );
    let row = seen
        .split(&sub_tx)
        .nth(1)
        .expect("the subscription payment is listed");
    let after_row: Vec<&str> = row.split_whitespace().take(8).collect();
    // tx, block, from, USDC, status, confirmations "n / 2", claimed
    assert_eq!(after_row[0], sub_block.to_string(), "{seen}");
    assert_eq!(after_row[2], "39.50", "{seen}");
    assert_eq!(after_row[3], "confirmed", "{seen}");
    assert!(
        after_row[4].parse::<u64>().unwrap() >= 2 && after_row[5] == "/" && after_row[6] == "2",
        "{seen}"
    );
    assert_eq!(after_row[7], "yes", "{seen}");
    assert!(
        seen.contains("kimi26 asia 00:00-08:00 1 10 9"),
        "seats per pool and block: {seen}"
    );
    assert!(seen.contains("kimi26 europe 08:00-16:00 0 5 5"), "{seen}");
    assert!(
        seen.contains("Confirmed payments received: 65.75 USDC"),
        "{seen}"
    );
    assert!(seen.contains(&format!("sk-{sub_key_id}-…")), "{seen}");
    assert!(!dom.contains(&sub_key) && !dom.contains(&credit_key));

    // --- The console's figures: /api/admin/summary (admin token only) equals the audit API, and the page shows them.
    let (status, _) = c.json("/api/admin/summary", Some(AUDITOR)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = c.json("/api/admin/summary?range=1y", Some(ADMIN)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, summary) = c.json("/api/admin/summary?range=30d", Some(ADMIN)).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["days"].as_array().unwrap().len(), 30, "{summary}");
    let (_, revenue) = c.json("/api/audit/revenue", Some(AUDITOR)).await;
    let audit_sum = |key: &str| -> i64 {
        revenue["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[key].as_str().unwrap().parse::<i64>().unwrap())
            .sum()
    };
    let usdc_atomic = |v: &Value| v.as_str().unwrap().parse::<Usdc>().unwrap().atomic();
    assert_eq!(
        usdc_atomic(&summary["totals"]["receivedUsdc"]),
        audit_sum("receivedAtomic"),
        "{summary}"
    );
    assert_eq!(
        usdc_atomic(&summary["totals"]["poolSoldUsdc"]),
        audit_sum("subscriptionsAtomic"),
        "{summary}"
    );
    let per_day: i64 = summary["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| usdc_atomic(&d["receivedUsdc"]))
        .sum();
    assert_eq!(per_day, usdc_atomic(&summary["totals"]["receivedUsdc"]));
    let dom = render_dom(&format!("{base}/admin?token={ADMIN}&range=30d&refresh=0"));
    let seen = visible_text(&dom);
    sample("admin-console.txt", &seen);
    assert!(
        seen.contains(&format!(
            "Received (USDC, confirmed payments) {}",
            summary["totals"]["receivedUsdc"].as_str().unwrap()
        )),
        "{seen}"
    );
    assert!(
        seen.contains(&format!(
            "of which pool blocks sold {}",
            summary["totals"]["poolSoldUsdc"].as_str().unwrap()
        )),
        "{seen}"
    );
    assert!(seen.contains("auto-refresh off"), "{seen}");
    for chart in [
        "chart-received",
        "chart-earned",
        "chart-requests",
        "chart-tokens",
    ] {
        assert!(dom.contains(&format!("id=\"{chart}\"")), "{chart}");
    }
    assert!(dom.contains("<svg"), "charts are inline SVG");
    assert!(!dom.contains(&sub_key) && !dom.contains(&credit_key));
    // Nothing on the page is fetched from elsewhere: no external URL in its markup (the CSP forbids any source
    // too), and it renders with the network closed except loopback, at desktop and at phone width.
    for attr in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!dom.contains(attr), "an external reference: {attr}");
    }
    let console = format!("{base}/admin?token={ADMIN}&range=30d&refresh=0");
    for (name, width, height) in [
        ("console-desktop.png", 1280, 2400),
        ("console-narrow.png", 420, 4200),
    ] {
        let png = screenshot(&console, width, height);
        // Width and height are the PNG header's (IHDR) first two big-endian words.
        let w = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
        assert_eq!(w, width, "{name}");
        assert!(
            png.len() > 20_000,
            "{name}: a rendered page, not a blank one ({} bytes)",
            png.len()
        );
        if let Ok(dir) = std::env::var("X402_README_SAMPLES") {
            std::fs::write(Path::new(&dir).join(name), &png).unwrap();
        }
    }

    drop(server);

    // --- Logs: JSON lines, and no secret anywhere in them.
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.lines().count() > 5);
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    let credit_secret = credit_key.rsplit('-').next().unwrap();
    let sub_secret = sub_key.rsplit('-').next().unwrap();
    for (what, secret) in [
        ("the credit key", credit_key.as_str()),
        ("the credit key's secret", credit_secret),
        ("the subscription key", sub_key.as_str()),
        ("the subscription key's secret", sub_secret),
        ("the admin token", ADMIN),
        ("the auditor token", AUDITOR),
        ("the settlement private key", &SETTLER_KEY[2..]),
    ] {
        assert!(!logs.contains(secret), "{what} appears in the logs");
    }

    // --- audit export.
    let out = gateway_command(
        &["audit", "export", "--format", "csv", "--what", "payments"],
        &config,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(
        csv.starts_with("id,txHash,") && csv.contains(&sub_tx) && csv.lines().count() == 4,
        "{csv}"
    );
    let json_file = dir.path().join("ledger.json");
    let json_arg = json_file.display().to_string();
    let out = gateway_command(
        &[
            "audit",
            "export",
            "--format",
            "json",
            "--what",
            "ledger",
            "--from",
            "2020-01-01",
            "--out",
            &json_arg,
        ],
        &config,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ledger: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    assert_eq!(ledger.as_array().unwrap().len(), 2, "{ledger}");
    let out = gateway_command(
        &[
            "audit",
            "export",
            "--format",
            "json",
            "--what",
            "claims",
            "--to",
            "2020-01-01",
        ],
        &config,
    )
    .output()
    .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([])
    );

    // --- audit verify: clean.
    let out = gateway_command(&["audit", "verify"], &config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{report}");
    sample("verify-clean.txt", &report);
    assert!(
        report.contains("OK: no discrepancies") && report.contains("checked 3 confirmed transfers"),
        "{report}"
    );

    // Plant discrepancies with a raw connection (no foreign keys, no writer).
    let db = rusqlite::Connection::open(dir.path().join("gateway.db")).unwrap();
    db.pragma_update(None, "foreign_keys", "OFF").unwrap();
    db.execute(
        "UPDATE transfers SET value_atomic = value_atomic + 1 WHERE tx_hash = ?1",
        [&small_tx],
    )
    .unwrap();
    let out = gateway_command(&["audit", "verify"], &config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains(&format!("DISCREPANCY [transfers] transfer {small_tx}"))
            && report.contains("value on chain 1.25 USDC, in the database 1.250001 USDC")
            && report.contains("1 discrepancies found"),
        "{report}"
    );
    db.execute(
        "UPDATE transfers SET value_atomic = value_atomic - 1 WHERE tx_hash = ?1",
        [&small_tx],
    )
    .unwrap();
    db.execute(
        "INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at) VALUES (?1, 'grant', 5000000, 99000000, 0)",
        [&a0],
    )
    .unwrap();
    let upper = format!("0x{}", sub_tx[2..].to_ascii_uppercase());
    db.execute(
        "INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, claimed_at) \
         VALUES (?1, ?2, 'topup', 39500000, 39500000, 0, 0)",
        [&upper, &a1],
    )
    .unwrap();
    db.execute("INSERT INTO seats (subscription_id, pool, block, expires_at) VALUES (999, 'kimi26', 'europe', 0)", []).unwrap();
    let out = gateway_command(&["audit", "verify"], &config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{report}");
    for needle in [
        format!("DISCREPANCY [ledger] ledger row #3 of {a0}: balance after is 99.00 USDC, but the rows so far sum to 30.00 USDC"),
        format!("DISCREPANCY [ledger] account {a0}: balance 99.00 USDC ≠ sum of its ledger 30.00 USDC"),
        format!("DISCREPANCY [claims] claim {upper}: transaction claimed twice (also as {sub_tx})"),
        "DISCREPANCY [seats] seat kimi26/europe of subscription 999: held by a subscription that does not exist".to_string(),
    ] {
        assert!(report.contains(&needle), "missing `{needle}` in\n{report}");
    }
    assert!(!report.contains("[transfers]"), "{report}");
}

/// The OpenAPI document lists exactly the routes registered in src/api/ (method and path).
#[test]
fn openapi_documents_every_registered_route() {
    use std::collections::BTreeSet;
    use x402_gateway::api::openapi::ROUTES;
    let norm = |p: &str| -> String {
        p.split('/')
            .map(|seg| if seg.starts_with('{') { "{}" } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    };
    let documented: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), norm(r.path)))
        .collect();
    let mut registered: BTreeSet<(String, String)> = BTreeSet::new();
    let mut any_paths: BTreeSet<String> = BTreeSet::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut files = vec![dir];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        // `.route("…", …)`, the path on the same line or (as rustfmt wraps a long handler) the next.
        for (i, _) in text.match_indices(".route(") {
            let Some(rest) = text[i + ".route(".len()..].trim_start().strip_prefix('"') else {
                continue;
            };
            let path = &rest[..rest.find('"').unwrap()];
            // The handler expression: up to the `)` closing `.route(`.
            let mut depth = 1;
            let mut end = 0;
            for (j, ch) in rest.char_indices() {
                match ch {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = j;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let handlers = &rest[path.len()..end];
            for method in ["get", "post", "put", "delete", "patch", "any"] {
                let called = handlers.match_indices(&format!("{method}(")).any(|(k, _)| {
                    k == 0 || !handlers[..k].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if called {
                    if method == "any" {
                        any_paths.insert(norm(path));
                    } else {
                        registered.insert((method.to_string(), norm(path)));
                    }
                }
            }
        }
    }
    assert!(
        registered.len() >= 10,
        "found too few routes: {registered:?}"
    );
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from src/api/openapi.rs ROUTES: {undocumented:?}"
    );
    for p in &any_paths {
        assert!(
            documented.iter().any(|(_, d)| d == p),
            "route {p} (any method) is not documented"
        );
    }
    let stale: Vec<_> = documented
        .iter()
        .filter(|(m, p)| !registered.contains(&(m.clone(), p.clone())) && !any_paths.contains(p))
        .collect();
    assert!(stale.is_empty(), "documented but not registered: {stale:?}");

    // Every operation documents what the limits middleware may answer on any route.
    let doc = x402_gateway::api::openapi::document(None);
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            for status in ["413", "429"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} does not document {status}"
                );
            }
            if method == "post" {
                assert!(responses.contains_key("408"), "{method} {path}: no 408");
            }
        }
    }
}
