//! The keyless 402s against an outside x402 conformance checker: PyPI `x402-conformance` (the version scripts/test
//! installs into `.venv`), whose `x402conf resource` makes one unpaid GET per paid URL and checks the 402 and its
//! PaymentRequired (P1-P7: status, the PAYMENT-REQUIRED header decoding, x402Version/resource/accepts, each
//! requirement's fields, the EVM `exact` EIP-712 domain in `extra`, the header's size, `paymentFlow`). Run on the
//! chat completions route (priced per request: its GET answers the keyless 402) and on `/x402/credits/{min}`.
//! Without `.venv/bin/x402conf` the test says so and passes, unless X402_INTEROP_REQUIRED=1 (scripts/test and CI).

use serde_json::Value;

use crate::clients::{interop_required, root};
use crate::support::*;
use crate::x402_routes::{Mode, X402Gateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x402conf_resource_passes_on_the_keyless_402s() {
    let checker = root().join(".venv/bin/x402conf");
    if !checker.exists() {
        assert!(
            !interop_required(),
            "x402-conformance is not installed in .venv (scripts/test installs it)"
        );
        eprintln!("skipping the x402-conformance check: .venv has no x402conf (run scripts/test)");
        return;
    }
    let chain = TestChain::start().await;
    let gw = X402Gateway::start(&chain, Mode::SelfSettle).await;
    let urls = [
        format!("{}/v1/chat/completions", gw.base),
        format!("{}/x402/credits/10", gw.base),
        format!("{}/x402/pools/kimi26?blocks=asia,europe", gw.base),
    ];
    let out = tokio::process::Command::new(&checker)
        .arg("resource")
        .arg("--fail-on-error")
        .args(&urls)
        .current_dir(root())
        .output()
        .await
        .expect("x402conf runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "x402conf resource failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), urls.len(), "{report}");
    for r in results {
        assert_eq!(r["http"], 402, "{r}");
        let checks = r["checks"].as_array().unwrap();
        // P1-P7 all ran (P6 and P7 included: a V2 header was found) and every one passed, warnings too.
        assert_eq!(checks.len(), 7, "{r}");
        for c in checks {
            assert_eq!(c["pass"], true, "{}: {c}", r["target"]);
            if c["check"].as_str().is_some_and(|n| n.starts_with("P6")) {
                eprintln!("x402conf: {} PAYMENT-REQUIRED {}", r["target"], c["detail"]);
            }
        }
    }
}
