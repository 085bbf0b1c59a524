//! `x402-gateway dev` and `demo` as a new user runs them (the real binary, real anvil, real SQLite), and the agent
//! cards: `dev --demo` end to end, a second run that continues the saved chain and database, SIGTERM stopping every
//! child, recovery after `kill -9`, `--reset`; `/.well-known/agent-card.json` and `agent.json` with their ETag and
//! read by the official A2A Python SDK.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;
use x402_gateway::usdc::Usdc;

const BIN: &str = env!("CARGO_BIN_EXE_x402-gateway");
/// A whole `dev --demo` run (three journeys, two each waiting for confirmations at one block per second).
const RUN_DEADLINE: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `dev` run in the background, its output collected as it comes.
struct DevRun {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for DevRun {
    fn drop(&mut self) {
        // A test that failed midway: stop dev gracefully so its anvil goes too, then make sure.
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    out
}

impl DevRun {
    fn start(dir: &Path, extra: &[&str]) -> DevRun {
        let mut child = Command::new(BIN)
            .args([
                "dev",
                "--port",
                "0",
                "--block-time",
                "1",
                "--confirmations",
                "2",
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .current_dir(root())
            .env("X402_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        DevRun {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the process to exit, failing the test after `deadline`.
    fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "dev did not exit within {deadline:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the "listening on" line and the banner; returns the gateway URL and anvil's pid.
    async fn ready(&self) -> (String, i32) {
        wait_for_long("dev's listening line and banner", || async {
            let err = self.stderr();
            let url = err
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|u| u.trim().to_string())?;
            let pid = err
                .lines()
                .find_map(|l| l.split("(anvil pid ").nth(1))
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse::<i32>().ok())?;
            Some((url, pid))
        })
        .await
    }

    fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id() as i32, libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with plain integers; the pids are children of this test or their anvil.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// [`wait_for`] with a longer deadline: a `dev` start deploys a contract and funds wallets first.
async fn wait_for_long<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The variables `dev` wrote to `dir/dev.env` (`export NAME='value'` lines): the generated config names them.
fn dev_env(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("dev.env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// Runs the binary; with `--config`, in the environment of the `dev.env` next to it (`set -a; . dev.env`).
fn run_cli(args: &[&str]) -> (bool, String, String) {
    let vars = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .and_then(|c| Path::new(c).parent().map(dev_env))
        .unwrap_or_default();
    let out = Command::new(BIN)
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .envs(vars)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn payments(dir: &Path) -> Vec<Value> {
    let config = dir.join("config.toml");
    let (ok, out, err) = run_cli(&["payments", "--json", "--config", config.to_str().unwrap()]);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn assert_steps(stdout: &str, journeys: &[&str]) {
    for journey in journeys {
        let steps: &[&str] = if *journey == "upto" {
            &x402_gateway::dev::agent::UPTO_STEPS
        } else {
            &x402_gateway::dev::agent::STEPS
        };
        for (i, step) in steps.iter().enumerate() {
            let line = format!("[{journey} {}/{}] {step}:", i + 1, steps.len());
            assert!(
                stdout.contains(&line),
                "missing step line `{line}` in:\n{stdout}"
            );
        }
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");
}

/// The USDC amount printed right after `marker` in `journey`'s step `step` (e.g. the balance read before paying).
fn amount_in(stdout: &str, journey: &str, step: &str, marker: &str) -> Usdc {
    let section = stdout
        .split(&format!("[{journey} {step}"))
        .nth(1)
        .unwrap_or_else(|| panic!("no step {journey} {step} in {stdout}"));
    let rest = section
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no `{marker}` after {journey} {step} in {stdout}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn dev_demo_runs_the_whole_journey_then_continues_the_saved_chain() {
    let dir = tempfile::tempdir().unwrap();

    // A fresh stack and the demo agent: exit 0 with every step of both journeys printed.
    let mut first = DevRun::start(dir.path(), &["--demo"]);
    let status = first.wait(RUN_DEADLINE);
    let (out, err) = (first.stdout(), first.stderr());
    assert!(
        status.success(),
        "dev --demo failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(err.contains("fresh chain and database"), "{err}");
    assert!(err.contains("DEV-ONLY WALLETS"), "{err}");
    assert_steps(&out, &["credits", "pool", "upto"]);
    assert!(out.contains("→ 402 Payment Required"), "{out}");
    assert!(out.contains("2/2 confirmations"), "{out}");
    assert!(out.contains("data: [DONE]"), "{out}");
    assert!(out.contains("active now"), "{out}");
    assert!(
        out.contains("demo passed: 3 journeys (credits + pool + upto), 25 of 25 steps OK"),
        "{out}"
    );
    // Keyless pay-per-token: the receipt is the metered cost, below the maximum, and the chain agrees.
    assert!(out.contains("approved 100 USDC to Permit2"), "{out}");
    let upto_paid = amount_in(&out, "upto", "6/7", "settled ");
    let upto_max = amount_in(&out, "upto", "6/7", " of at most ");
    assert!(upto_paid > Usdc::ZERO && upto_paid < upto_max, "{out}");
    assert!(out.contains("exactly the metered cost"), "{out}");
    assert!(err.contains("anvil saved the chain"), "{err}");
    assert_eq!(
        amount_in(&out, "credits", "4/9", " holds "),
        Usdc::whole(1000)
    );
    // What the wallet holds after the first run: its balance before the pool payment, minus that payment.
    let left = amount_in(&out, "pool", "4/9", " holds ").atomic()
        - amount_in(&out, "pool", "4/9", "transfer ").atomic()
        - upto_paid.atomic();
    let first_payments = payments(dir.path());
    assert_eq!(first_payments.len(), 3, "{first_payments:?}");

    // The second run continues: same chain (the wallet spent what it spent), same database (the account already has
    // its credit key, so the agent rotates it), and the demo passes again.
    let mut second = DevRun::start(dir.path(), &["--demo"]);
    let status = second.wait(RUN_DEADLINE);
    let (out, err) = (second.stdout(), second.stderr());
    assert!(
        status.success(),
        "second dev --demo failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        err.contains("reusing the saved chain and database"),
        "{err}"
    );
    assert_steps(&out, &["credits", "pool", "upto"]);
    assert_eq!(amount_in(&out, "credits", "4/9", " holds ").atomic(), left);
    assert!(out.contains("shown only once: rotating it"), "{out}");
    assert!(out.contains("already approved"), "{out}");
    // The top-up adds to what is left of the first run's credits.
    let balance = amount_in(&out, "credits", "7/9", ", balance ");
    assert!(
        balance > Usdc::whole(19) && balance < Usdc::whole(20),
        "{out}"
    );
    let all = payments(dir.path());
    assert_eq!(all.len(), 6, "{all:?}");
    // The last settlement may still wait for its confirmations when the run stops.
    assert!(
        all[..5].iter().all(|p| p["status"] == "confirmed"),
        "{all:?}"
    );
    assert_eq!(all[0]["txHash"], first_payments[0]["txHash"]);
    assert_eq!(all[1]["txHash"], first_payments[1]["txHash"]);
}

/// Signs the `exact` offer of `required` with `key` (EIP-3009 on the dev chain's test USDC) as a v2 header.
fn pay_exact(
    required: &x402_gateway::x402::PaymentRequired,
    key: &alloy::signers::local::PrivateKeySigner,
    token: alloy::primitives::Address,
) -> String {
    use alloy::primitives::{B256, Bytes, U256};
    use alloy::signers::SignerSync;
    use x402_gateway::x402::types::{Authorization, ExactEvmPayload};
    let req = &required.accepts[0];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let auth = Authorization {
        from: key.address(),
        to: req.pay_to,
        value: req.amount,
        valid_after: U256::from(now - 600),
        valid_before: U256::from(now + req.max_timeout_seconds),
        nonce: B256::from(rand::random::<[u8; 32]>()),
    };
    let network = x402_gateway::config::Network {
        name: "custom".into(),
        chain_id: x402_gateway::dev::DEV_CHAIN_ID,
        token,
        token_name: "USDC".into(),
        token_version: "2".into(),
    };
    let digest = x402_gateway::x402::eip3009::digest(
        &auth,
        &x402_gateway::x402::eip3009::network_domain(&network),
    );
    let signature = Bytes::from(key.sign_hash_sync(&digest).unwrap().as_bytes().to_vec());
    x402_gateway::x402::header::encode(&x402_gateway::x402::PaymentPayload {
        x402_version: 2,
        resource: Some(required.resource.clone()),
        accepted: req.clone(),
        payload: ExactEvmPayload {
            signature,
            authorization: auth,
        },
        extensions: required.extensions.clone(),
    })
}

/// The dev stack at `url` has standard x402 on (a 402 with PAYMENT-REQUIRED at `/x402/credits/10`, an `exact`
/// purchase of credits and of one glm-4.7 completion without a key), and the dev operator tokens printed in the
/// banner open `/admin` and the audit API (and nothing opens them without). Returns (admin, auditor) tokens.
async fn dev_x402_and_operator_pages(url: &str, dir: &Path, banner: &str) -> (Value, Value) {
    let http = reqwest::Client::new();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    let admin = state["adminToken"].as_str().unwrap().to_string();
    let auditor = state["auditorToken"].as_str().unwrap().to_string();
    assert!(admin.starts_with("dev_") && admin.len() > 40, "{admin}");
    assert_ne!(admin, auditor);
    assert!(
        banner.contains(&format!("Authorization: Bearer {admin}")),
        "{banner}"
    );
    assert!(
        banner.contains(&format!("Authorization: Bearer {auditor}")),
        "{banner}"
    );
    assert!(
        dev_env(dir)
            .iter()
            .any(|(k, v)| k == "X402_DEV_ADMIN_TOKEN" && *v == admin)
    );

    // /admin: 200 with the printed admin token, 401 without one or with the auditor's.
    let get = |path: &str, token: Option<&str>| {
        let mut req = http.get(format!("{url}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(
        get("/admin", Some(&admin)).await.unwrap().status(),
        StatusCode::OK
    );
    for token in [None, Some(auditor.as_str()), Some("dev_wrong")] {
        let status = get("/admin", token).await.unwrap().status();
        assert!(
            matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
            "{token:?}: {status}"
        );
    }
    // The audit API answers the auditor token (and refuses without one).
    let audit = get("/api/audit/payments", Some(&auditor)).await.unwrap();
    assert_eq!(audit.status(), StatusCode::OK);
    assert!(audit.json::<Value>().await.unwrap().is_object());
    assert_eq!(
        get("/api/audit/revenue", Some(&auditor))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        get("/api/audit/payments", None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // Standard x402: the credit purchase answers 402 with PAYMENT-REQUIRED (not 404 x402_disabled), and pays.
    let token: alloy::primitives::Address = state["token"].as_str().unwrap().parse().unwrap();
    let wallet: alloy::signers::local::PrivateKeySigner = state["wallets"][2]["privateKey"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let unpaid = http
        .post(format!("{url}/x402/credits/10"))
        .send()
        .await
        .unwrap();
    assert_eq!(unpaid.status(), StatusCode::PAYMENT_REQUIRED);
    let required: x402_gateway::x402::PaymentRequired =
        x402_gateway::x402::header::decode(unpaid.headers()["payment-required"].to_str().unwrap())
            .unwrap();
    assert_eq!(required.accepts[0].scheme, "exact");
    assert_eq!(required.accepts[0].network, "eip155:31337");
    assert!(required.extensions.as_ref().unwrap().contains_key("bazaar"));
    let paid = http
        .post(format!("{url}/x402/credits/10"))
        .header("payment-signature", pay_exact(&required, &wallet, token))
        .send()
        .await
        .unwrap();
    let status = paid.status();
    assert!(paid.headers().contains_key("payment-response"));
    let body: Value = paid.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["data"]["apiKey"].as_str().unwrap().starts_with("sk-"),
        "{body}"
    );

    // One glm-4.7 completion for 0.01 USDC with `exact`, no key.
    let chat = serde_json::json!({"model": "glm-4.7", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": "Hello"}]});
    let unpaid = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(unpaid.status(), StatusCode::PAYMENT_REQUIRED);
    let required: x402_gateway::x402::PaymentRequired =
        x402_gateway::x402::header::decode(unpaid.headers()["payment-required"].to_str().unwrap())
            .unwrap();
    assert!(
        required.resource.url.ends_with("/v1/chat/completions"),
        "{:?}",
        required.resource
    );
    assert_eq!(
        required.accepts[0].amount,
        alloy::primitives::U256::from(10_000u64)
    );
    let paid = http
        .post(format!("{url}/v1/chat/completions"))
        .header("payment-signature", pay_exact(&required, &wallet, token))
        .json(&chat)
        .send()
        .await
        .unwrap();
    let status = paid.status();
    let settled = paid.headers().get("payment-response").cloned();
    let body: Value = paid.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(settled.is_some(), "{body}");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
    (Value::from(admin), Value::from(auditor))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_sigterm_stops_every_child_and_the_next_run_reuses_or_resets() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let mut dev = DevRun::start(dir.path(), &[]);
    let (url, anvil) = dev.ready().await;
    assert!(x402_gateway::dev::alive(anvil), "anvil {anvil} runs");
    let err = dev.stderr();
    for expected in [
        "Try the whole flow",
        "curl -si $GW/v1/chat/completions",
        "cargo run -q -- demo",
        "DEV-ONLY OPERATOR TOKENS",
        "/admin",
        "/api/audit/payments",
        "standard x402 on",
    ] {
        assert!(err.contains(expected), "banner lacks {expected}: {err}");
    }
    let tokens = dev_x402_and_operator_pages(&url, dir.path(), &err).await;

    // `demo` against the running stack finds it through dev.json.
    let (ok, out, derr) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            run_cli(&[
                "demo",
                "--data-dir",
                dir.to_str().unwrap(),
                "--journeys",
                "credits",
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "demo failed\n{out}\n{derr}");
    assert_steps(&out, &["credits"]);
    assert!(out.contains(&format!("gateway {url}")), "{out}");

    // SIGTERM: dev exits 0, anvil is gone and saved the chain.
    let status = dev.terminate();
    assert!(status.success(), "{status:?}\n{}", dev.stderr());
    assert!(!x402_gateway::dev::alive(anvil), "anvil {anvil} still runs");
    assert!(dev.stderr().contains("anvil saved the chain"));
    assert!(dir.path().join("chain-state.json").is_file());

    // The next run continues: the payment is there, and the database agrees with the reloaded chain.
    let mut again = DevRun::start(dir.path(), &[]);
    let (url2, anvil2) = again.ready().await;
    // The dev tokens are kept with the rest of the dev state.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dev.json")).unwrap())
            .unwrap();
    assert_eq!(
        (state["adminToken"].clone(), state["auditorToken"].clone()),
        tokens
    );
    let admin = reqwest::Client::new()
        .get(format!("{url2}/admin"))
        .bearer_auth(tokens.0.as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);
    assert!(
        again
            .stderr()
            .contains("reusing the saved chain and database"),
        "{}",
        again.stderr()
    );
    let verify = tokio::task::spawn_blocking({
        let config = config.clone();
        move || run_cli(&["audit", "verify", "--config", config.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(
        verify.0,
        "audit verify on the reused data:\n{}\n{}",
        verify.1, verify.2
    );
    assert!(verify.2.contains("OK: no discrepancies"), "{}", verify.2);
    // The x402 credit purchase and the per-request payment of the first run, and the demo's top-up.
    assert_eq!(payments(dir.path()).len(), 3);
    assert!(again.terminate().success());
    assert!(!x402_gateway::dev::alive(anvil2));

    // --reset: a fresh chain and an empty database.
    let mut fresh = DevRun::start(dir.path(), &["--reset"]);
    let (_, anvil3) = fresh.ready().await;
    assert!(
        fresh.stderr().contains("--reset: deleted"),
        "{}",
        fresh.stderr()
    );
    assert!(fresh.stderr().contains("fresh chain and database"));
    assert_eq!(payments(dir.path()).len(), 0);
    assert!(fresh.terminate().success());
    assert!(!x402_gateway::dev::alive(anvil3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_recovers_from_kill_9_and_refuses_a_chain_that_lost_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let mut dev = DevRun::start(dir.path(), &[]);
    let (_, anvil) = dev.ready().await;
    let (ok, out, err) = tokio::task::spawn_blocking({
        let data = data.clone();
        move || run_cli(&["demo", "--data-dir", &data, "--journeys", "credits"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}\n{err}");

    // kill -9 of dev alone leaves its anvil running (nothing can catch SIGKILL); the next run stops that anvil
    // with SIGTERM, so it saves the chain, and continues.
    signal(dev.child.id() as i32, libc::SIGKILL);
    dev.wait(Duration::from_secs(10));
    assert!(x402_gateway::dev::alive(anvil), "the orphaned anvil runs");
    let mut next = DevRun::start(dir.path(), &[]);
    let (_, anvil2) = next.ready().await;
    assert!(
        !x402_gateway::dev::alive(anvil),
        "the orphaned anvil was stopped"
    );
    let err = next.stderr();
    assert!(
        err.contains(&format!("stopping anvil pid {anvil}")),
        "{err}"
    );
    assert!(
        err.contains("reusing the saved chain and database"),
        "{err}"
    );
    let paid = payments(dir.path());
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0]["status"], "confirmed");

    // kill -9 of both, after the database indexed blocks that were never saved: reuse is refused, naming --reset.
    let head = |url: String| async move {
        reqwest::get(format!("{url}/healthz"))
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()?["indexer"]["indexedHead"]
            .as_u64()
    };
    let (url, _) = next.ready().await;
    let start_head = wait_for_long("an indexed head", || head(url.clone())).await;
    wait_for_long("the indexer to pass the saved chain", || {
        let url = url.clone();
        async move { head(url).await.filter(|h| *h > start_head + 2) }
    })
    .await;
    signal(next.child.id() as i32, libc::SIGKILL);
    signal(anvil2, libc::SIGKILL);
    next.wait(Duration::from_secs(10));
    let mut refused = DevRun::start(dir.path(), &[]);
    let status = refused.wait(RUN_DEADLINE);
    let err = refused.stderr();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("cannot reuse") && err.contains("--reset"),
        "{err}"
    );
    assert!(err.contains("the database indexed block"), "{err}");

    // --reset starts over.
    let mut fresh = DevRun::start(dir.path(), &["--reset"]);
    fresh.ready().await;
    assert_eq!(payments(dir.path()).len(), 0);
    assert!(fresh.terminate().success());
}

// ---------------------------------------------------------------------------------------------------------------
// Agent cards.

const HOT_ENV: &str = "TEST_DEV_X402_HOT_KEY";

fn card_config(chain: &TestChain, db: &Path, x402: bool) -> String {
    let (public_url, x402_section, per_request) = if x402 {
        (
            String::new(),
            format!("[x402]\nsettler_key_env = \"{HOT_ENV}\"\n"),
            "per_request_usdc = \"0.01\"",
        )
    } else {
        (
            "public_url = \"https://gateway.example\"\ndocs_url = \"https://docs.example/x402\""
                .to_string(),
            String::new(),
            "",
        )
    };
    format!(
        r#"[server]
listen = "127.0.0.1:0"
{public_url}

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
path = "{db}"

[[upstreams]]
name = "none"
base_url = "http://127.0.0.1:9/v1"

[[models]]
id = "kimi-k2.6"
upstream = "none"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
{per_request}

[[pools]]
slug = "kimi26"
name = "Kimi K2.6"
models = ["kimi-k2.6"]
blocks = [{{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 100 }}]

[credits]
min_topup_usdc = "10.00"

{x402_section}"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

/// The gateway in this process with the x402 hot wallet's key given through `serve_with_env` (no process env).
struct CardGateway {
    base: String,
    http: reqwest::Client,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for CardGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl CardGateway {
    async fn start(config: String, hot_key: String) -> CardGateway {
        let env = move |n: &str| (n == HOT_ENV).then(|| hot_key.clone());
        let settings = x402_gateway::config::Config::parse(&config, Path::new("t.toml"))
            .unwrap()
            .resolve(Path::new("/"), &env)
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                x402_gateway::api::serve_with_env(
                    settings,
                    listener,
                    shutdown,
                    x402_gateway::billing::system_clock(),
                    &env,
                )
                .await
                .expect("gateway runs");
            }
        });
        let gw = CardGateway {
            base,
            http: reqwest::Client::new(),
            shutdown,
        };
        wait_for("the gateway answers /healthz", || async {
            let r = gw
                .http
                .get(format!("{}/healthz", gw.base))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        gw
    }
}

fn interop_required() -> bool {
    std::env::var("X402_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cards_are_cached_and_read_by_the_a2a_sdk() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hot = format!(
        "0x{}",
        alloy::hex::encode(chain.dev.anvil.keys()[6].to_bytes())
    );
    let gw = CardGateway::start(card_config(&chain, &dir.path().join("x402.db"), true), hot).await;

    // The v1.0 card: fields, and the URLs from the request's Host (no public_url here).
    let resp = gw
        .http
        .get(format!("{}/.well-known/agent-card.json", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "public, max-age=300");
    let etag = headers["etag"].to_str().unwrap().to_string();
    let body = resp.bytes().await.unwrap();
    assert_eq!(etag, x402_gateway::api::discovery::etag_of(&body));
    let card: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(card["name"], "x402-gateway");
    assert_eq!(card["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(card["capabilities"]["streaming"], true);
    assert_eq!(
        card["supportedInterfaces"][0]["url"],
        format!("{}/v1", gw.base)
    );
    assert_eq!(card["supportedInterfaces"][0]["protocolVersion"], "1.0");
    assert_eq!(
        card["documentationUrl"],
        format!("{}/openapi.json", gw.base)
    );
    assert_eq!(card["provider"]["url"], gw.base);
    let skills: Vec<&str> = card["skills"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        skills,
        [
            "chat-completion",
            "inference-apis",
            "list-models",
            "buy-access"
        ]
    );
    assert_eq!(
        card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"],
        "Bearer"
    );
    // x402 is on and a model takes per-request payment: the header scheme is offered as an alternative.
    assert_eq!(
        card["securitySchemes"]["x402"]["apiKeySecurityScheme"]["name"],
        "PAYMENT-SIGNATURE"
    );
    assert_eq!(card["securityRequirements"].as_array().unwrap().len(), 2);
    let ext = &card["capabilities"]["extensions"][0];
    assert_eq!(ext["params"]["payTo"], format!("{:#x}", chain.pay_to()));
    assert_eq!(ext["params"]["confirmations"], 2);
    assert_eq!(
        ext["params"]["catalog"],
        format!("{}/api/agent/plans", gw.base)
    );
    for mode in ["defaultInputModes", "defaultOutputModes"] {
        assert!(
            card[mode]
                .as_array()
                .unwrap()
                .contains(&Value::from("application/json"))
        );
    }

    // If-None-Match with the ETag (also weak, or in a list) → 304 without a body; another tag → 200.
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
    ] {
        let resp = gw
            .http
            .get(format!("{}/.well-known/agent-card.json", gw.base))
            .header("if-none-match", inm.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED, "{inm}");
        assert_eq!(resp.headers()["etag"], etag.as_str());
        assert_eq!(resp.headers()["cache-control"], "public, max-age=300");
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    let resp = gw
        .http
        .get(format!("{}/.well-known/agent-card.json", gw.base))
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // The legacy v0.3 card: same agent, v0.3 names, its own ETag.
    let resp = gw
        .http
        .get(format!("{}/.well-known/agent.json", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let legacy_etag = resp.headers()["etag"].to_str().unwrap().to_string();
    assert_ne!(legacy_etag, etag);
    let legacy: Value = resp.json().await.unwrap();
    assert_eq!(legacy["protocolVersion"], "0.3.0");
    assert_eq!(legacy["url"], format!("{}/v1", gw.base));
    assert_eq!(legacy["capabilities"]["streaming"], true);
    assert_eq!(legacy["securitySchemes"]["bearer"]["type"], "http");
    assert_eq!(legacy["securitySchemes"]["x402"]["in"], "header");
    assert_eq!(legacy["skills"].as_array().unwrap().len(), 4);
    let resp = gw
        .http
        .get(format!("{}/.well-known/agent.json", gw.base))
        .header("if-none-match", legacy_etag.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);

    // The official A2A SDK reads and validates both cards (tests/interop/agent_card.py).
    let python = root().join(".venv/bin/python");
    let has_sdk = python.exists()
        && Command::new(&python)
            .args(["-c", "import a2a.client"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(
            !interop_required(),
            "a2a-sdk is not installed in .venv (scripts/test installs it)"
        );
        eprintln!("skipping the a2a-sdk check: .venv has no a2a-sdk (run scripts/test)");
    } else {
        let out = tokio::process::Command::new(&python)
            .arg(root().join("tests/interop/agent_card.py"))
            .arg(&gw.base)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|_| {
                panic!(
                    "agent_card.py printed no JSON; stdout: {stdout}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert!(out.status.success() && result["ok"] == true, "{result}");
        assert_eq!(
            result["securitySchemes"],
            serde_json::json!(["bearer", "x402"])
        );
        assert_eq!(result["legacyProtocolVersion"], "0.3.0");
    }

    // Without [x402] and with public_url: bearer only, and every URL under public_url whatever the Host.
    let gw2 = CardGateway::start(
        card_config(&chain, &dir.path().join("plain.db"), false),
        String::new(),
    )
    .await;
    let resp = gw2
        .http
        .get(format!("{}/.well-known/agent-card.json", gw2.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_ne!(resp.headers()["etag"].to_str().unwrap(), etag);
    let card: Value = resp.json().await.unwrap();
    assert_eq!(
        card["supportedInterfaces"][0]["url"],
        "https://gateway.example/v1"
    );
    assert_eq!(card["documentationUrl"], "https://docs.example/x402");
    assert_eq!(card["provider"]["organization"], "gateway.example");
    assert!(card["securitySchemes"].get("x402").is_none(), "{card}");
    assert_eq!(card["securityRequirements"].as_array().unwrap().len(), 1);
    let legacy: Value = gw2
        .http
        .get(format!("{}/.well-known/agent.json", gw2.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(legacy["url"], "https://gateway.example/v1");
    assert!(legacy["securitySchemes"].get("x402").is_none());
}

/// Issue 20's "done when": after the demo on `dev`, the operator's console shows what was sold, used and paid, with
/// charts — the same figures as `/api/admin/summary` — rendered by headless Chromium with the network closed except
/// loopback (`X402_README_SAMPLES=<dir>` keeps `console-dev-desktop.png`, the README's screenshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_console_after_the_demo_shows_what_was_sold_used_and_paid() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = DevRun::start(dir.path(), &[]);
    let (url, _) = dev.ready().await;
    let (ok, out, err) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || run_cli(&["demo", "--data-dir", dir.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(ok, "demo failed\n{out}\n{err}");
    assert_steps(&out, &["credits", "pool", "upto"]);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dev.json")).unwrap())
            .unwrap();
    let admin = state["adminToken"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    // Every payment at depth and every request settled, so the figures hold still while the page is read.
    let summary = wait_for_long("the demo's payments confirmed on the console", || async {
        let v: Value = http
            .get(format!("{url}/api/admin/summary?range=7d"))
            .bearer_auth(&admin)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let n = &v["networks"][0];
        (n["pendingTransfers"] == 0
            && n["confirmedTransfers"].as_i64() >= Some(3)
            && n["uptoSettled"].as_i64() >= Some(1))
        .then_some(v)
    })
    .await;
    let t = &summary["totals"];
    let usdc = |v: &Value| v.as_str().unwrap().parse::<Usdc>().unwrap();
    assert!(usdc(&t["receivedUsdc"]) > Usdc::ZERO, "{summary}");
    assert!(usdc(&t["earnedUsdc"]) > Usdc::ZERO, "{summary}");
    assert!(usdc(&t["poolSoldUsdc"]) > Usdc::ZERO, "{summary}");
    assert!(usdc(&t["uptoUsdc"]) > Usdc::ZERO, "{summary}");
    assert!(t["requests"].as_i64().unwrap() >= 3, "{summary}");
    assert!(!summary["models"].as_array().unwrap().is_empty());

    let page = format!("{url}/admin?token={admin}&range=7d&refresh=0");
    let seen = crate::audit::visible_text(&crate::audit::render_dom(&page));
    for (key, label) in [
        ("receivedUsdc", "Received (USDC, confirmed payments)"),
        ("earnedUsdc", "Earned (USDC sold)"),
        ("poolSoldUsdc", "of which pool blocks sold"),
        ("uptoUsdc", "of which x402 upto"),
        ("requests", "Requests"),
        ("completionTokens", "Tokens out"),
    ] {
        let shown = match &t[key] {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        assert!(
            seen.contains(&format!("{label} {shown} ")),
            "{label} {shown}: {seen}"
        );
    }
    for section in ["Recent transfers", "Recent x402 settlements", "Health"] {
        assert!(seen.contains(section), "{section}: {seen}");
    }
    assert!(!seen.contains(&admin), "the admin token is on the page");
    let png = crate::audit::screenshot(&page, 1280, 2600);
    assert!(png.len() > 20_000, "a rendered page ({} bytes)", png.len());
    if let Ok(out) = std::env::var("X402_README_SAMPLES") {
        std::fs::write(Path::new(&out).join("console-dev-desktop.png"), &png).unwrap();
    }
    let status = dev.terminate();
    assert!(status.success(), "{status:?}\n{}", dev.stderr());
}
