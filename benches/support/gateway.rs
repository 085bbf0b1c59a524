//! What the benchmarks that drive the real binary share: starting `x402-gateway serve` and reading its
//! "listening on" line. Included by each benchmark with `#[path = "support/gateway.rs"] mod gateway;`.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts the real binary with `envs` and waits for its "listening on http://ADDR" line.
pub async fn start_gateway(
    config: &std::path::Path,
    envs: &[(&str, &str)],
) -> anyhow::Result<(Child, String)> {
    start_gateway_under(&[], config, envs).await
}

/// [`start_gateway`] run under `wrapper` (a program and its arguments, e.g. `valgrind --tool=callgrind`, which
/// keeps the binary's process id); an empty `wrapper` runs the binary itself.
pub async fn start_gateway_under(
    wrapper: &[String],
    config: &std::path::Path,
    envs: &[(&str, &str)],
) -> anyhow::Result<(Child, String)> {
    let binary = env!("CARGO_BIN_EXE_x402-gateway");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = command
        .args(["--log", "warn,x402_gateway::api=info", "serve", "--config"])
        .arg(config)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for stream in [
        Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    // Generous: under valgrind the start takes tens of seconds.
    let found = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = rx.recv().await {
            if let Some(i) = line.find("listening on http://") {
                return Some(line[i + "listening on ".len()..].trim().to_string());
            }
        }
        None
    })
    .await;
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    match found {
        Ok(Some(url)) => Ok((child, url)),
        _ => anyhow::bail!("the gateway did not print its listening line"),
    }
}
