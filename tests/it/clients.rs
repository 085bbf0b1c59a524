//! Runs the official client programs (npm and PyPI packages installed by scripts/test) against a test's gateway.
//! A client prints one JSON line as its last line of output; the test asserts on it. Without the installed client
//! the test says so and passes, unless X402_INTEROP_REQUIRED=1 (scripts/test and CI set it).

use serde_json::Value;

pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn interop_required() -> bool {
    std::env::var("X402_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

/// The project's Python (`.venv`, made by scripts/test).
pub fn python() -> std::path::PathBuf {
    root().join(".venv/bin/python")
}

pub async fn run_client(program: &std::path::Path, script: &str, args: &[&str]) -> Option<Value> {
    if !program.exists() && program.components().count() > 1 {
        assert!(
            !interop_required(),
            "{} is not installed",
            program.display()
        );
        eprintln!(
            "skipping {script}: {} is not installed (run scripts/test)",
            program.display()
        );
        return None;
    }
    let out = tokio::process::Command::new(program)
        .arg(root().join(script))
        .args(args)
        .current_dir(root())
        .output()
        .await
        .expect("client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "{script}: no JSON result; stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
