//! The real binary: `serve` with its "listening on" line and `/healthz`, `payments`, `--help`, config errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use x402_gateway::store::transfers::TransferStatus;
use x402_gateway::usdc::Usdc;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_x402-gateway");

fn write_config(dir: &std::path::Path, chain: &TestChain, rpc: &str) -> std::path::PathBuf {
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
"#,
        token = chain.token(),
        pay_to = chain.pay_to(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Kills the child when the test ends, however it ends.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `x402-gateway serve` and returns it with the base URL read from its "listening on" line.
fn serve(config: &std::path::Path) -> (Server, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("X402_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(pos) = line.find("listening on ") {
                let _ = tx.send(line[pos + "listening on ".len()..].trim().to_string());
                sent = true;
            }
        }
    });
    let url = rx
        .recv_timeout(DEADLINE)
        .expect("server printed its listening line");
    (server, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_indexer_progress_and_payments_lists_transfers() {
    let chain = TestChain::start().await;
    let (tx, block) = chain.pay(0, "12.345678".parse::<Usdc>().unwrap()).await;
    chain.mine(2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &chain, &chain.rpc_url());
    let (server, url) = serve(&config);

    let http = alloy::transports::http::reqwest::Client::new();
    let head = chain.head().await;
    let health: Value = wait_for("healthz to show the indexed head", || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let body: Value = http
                .get(format!("{url}/healthz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["indexer"]["indexedHead"].as_u64() == Some(head)).then_some(body)
        }
    })
    .await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["indexer"]["chainHead"].as_u64(), Some(head));
    assert_eq!(health["indexer"]["lag"].as_u64(), Some(0));
    drop(server);

    let out = Command::new(BIN)
        .args(["payments", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &rows.as_array().unwrap()[0];
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(row["txHash"], tx.as_str());
    assert_eq!(row["blockNumber"].as_u64(), Some(block));
    assert_eq!(row["valueUsdc"], "12.345678");
    assert_eq!(row["valueAtomic"], "12345678");
    assert_eq!(row["status"], TransferStatus::Confirmed.as_str());
    assert_eq!(row["confirmations"].as_u64(), Some(head - block + 1));
    assert_eq!(
        row["from"],
        format!("{:#x}", chain.payer(0).address()).as_str()
    );

    let out = Command::new(BIN)
        .args(["payments", "--status", "orphaned", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no transfers indexed with status orphaned")
    );
    let out = Command::new(BIN)
        .args(["payments", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&tx) && table.contains("12.345678") && table.contains("confirmed"),
        "{table}"
    );
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "index", "payments", "dev"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
    let out = Command::new(BIN)
        .args(["payments", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--status") && text.contains("--json") && text.contains("--config"),
        "{text}"
    );
}

#[test]
fn bad_config_names_the_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[chain]\nnetwork = \"base\"\nrpc_http = [\"https://mainnet.base.org\"]\npay_to = \"0x1111111111111111111111111111111111111111\"\nconfirmatoins = 3\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["payments", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("confirmatoins"), "{err}");
}

/// Operator commands that cannot lie: a mistyped database path is refused (non-zero, naming the path) and no file
/// appears there; on a real database they read without writing (the file and its journal are unchanged).
#[tokio::test]
async fn operator_commands_refuse_a_missing_database_and_only_read_an_existing_one() {
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &chain, &chain.rpc_url());
    let db = dir.path().join("gateway.db");
    let commands: [&[&str]; 5] = [
        &["payments", "--json"],
        &["keys", "list"],
        &[
            "accounts",
            "show",
            "0x1111111111111111111111111111111111111111",
        ],
        &["audit", "export", "--what", "payments"],
        &["audit", "verify"],
    ];
    for args in commands {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} on a missing database: {stderr}"
        );
        assert!(
            stderr.contains("gateway.db") && stderr.contains("no database file"),
            "{args:?}: {stderr}"
        );
        assert!(!db.exists(), "{args:?} created the database file");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "",
            "{args:?} printed a result"
        );
    }
    let out = Command::new(BIN)
        .args(["keys", "revoke", "key_nonexistent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        !db.exists(),
        "a write command does not create the file either"
    );

    // `migrate` makes it; then the read commands answer, and the file is byte for byte what it was.
    let out = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = std::fs::read(&db).unwrap();
    for args in [
        &["payments", "--json"][..],
        &["keys", "list"][..],
        &["audit", "export", "--what", "payments"][..],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "read commands wrote to the database"
    );
}
