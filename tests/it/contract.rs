//! The API contract: schemathesis (PyPI, the version scripts/test installs into `.venv`) runs every check it has
//! (`--checks all`) against `/openapi.json` of a gateway with a credit key, the auditor and admin tokens, x402 on
//! and rate limits off (the fuzz test's target, see `fuzz.rs`), with a fixed seed and a bounded number of examples
//! per operation, and must find no failure. Its configuration (which token each operation sends, the statuses a
//! valid request may get) is tests/contract/schemathesis.toml; a second run (tests/contract/keyless.toml) checks the
//! inference routes as a client without a key sees them. Without `.venv/bin/st` the test says so and passes,
//! unless X402_INTEROP_REQUIRED=1 (scripts/test and CI set it).

use std::time::{Duration, Instant};

use crate::clients::{interop_required, root};
use crate::fuzz::{ADMIN, AUDITOR, Target};

/// The schemathesis version scripts/test installs (keep them equal).
const SCHEMATHESIS: &str = "4.32.5";
/// Generated examples per operation and phase, and the seed: the run stays well under a minute.
const EXAMPLES: &str = "30";
const SEED: &str = "1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_contract_failure() {
    let st = root().join(".venv/bin/st");
    if !st.exists() {
        assert!(
            !interop_required(),
            "{} is not installed (scripts/test installs schemathesis=={SCHEMATHESIS})",
            st.display()
        );
        eprintln!(
            "skipping the contract test: {} is not installed (run scripts/test)",
            st.display()
        );
        return;
    }
    let t = Target::start().await;
    let version = std::process::Command::new(&st)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(
        version.contains(SCHEMATHESIS),
        "expected schemathesis {SCHEMATHESIS}, found {version}"
    );
    // Every operation, with the credit key on the inference routes and the tokens where they are needed.
    let all = schemathesis(&st, &t, "schemathesis.toml", &t.credit_key, &[]).await;
    // The inference routes as a client without a key sees them: the 402 catalog with PAYMENT-REQUIRED.
    let unknown_key = format!("sk-{}-{}", "0".repeat(16), "0".repeat(64));
    let keyless = schemathesis(
        &st,
        &t,
        "keyless.toml",
        &unknown_key,
        &["--include-tag", "inference"],
    )
    .await;
    assert!(
        all && keyless,
        "schemathesis found contract failures (reports above)"
    );
}

/// One `st run` with tests/contract/`config` and `key` as the bearer key; prints the report and the time taken, and
/// says whether it found no failure.
async fn schemathesis(
    st: &std::path::Path,
    t: &Target,
    config: &str,
    key: &str,
    extra: &[&str],
) -> bool {
    let started = Instant::now();
    let run = tokio::process::Command::new(st)
        .arg("--config-file")
        .arg(root().join("tests/contract").join(config))
        .arg("run")
        .arg(format!("{}/openapi.json", t.gw.base))
        .args([
            "--checks",
            "all",
            "--seed",
            SEED,
            "--max-examples",
            EXAMPLES,
        ])
        .args(["--request-timeout", "20", "--no-color"])
        .args(extra)
        .env("X402_CT_KEY", key)
        .env("X402_CT_AUDITOR", AUDITOR)
        .env("X402_CT_ADMIN", ADMIN)
        .current_dir(root())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("schemathesis finishes within 3 minutes")
        .expect("schemathesis runs");
    eprintln!(
        "{}\n{}\nschemathesis {SCHEMATHESIS} ({config} {}), seed {SEED}, {EXAMPLES} examples: {:.1} s",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        extra.join(" "),
        started.elapsed().as_secs_f64()
    );
    out.status.success()
}
