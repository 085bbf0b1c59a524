//! Property tests ("fuzzing" with `proptest`) over the bodies, headers, paths and query strings of every public
//! route, against ONE real gateway (real anvil, real SQLite file, the demo upstream, `[x402]` self-settlement, audit
//! and admin tokens), and over the two decoders that read outside bytes (the SSE usage tap, the x402 header).
//!
//! For every generated request the server must: answer (a panic drops the connection), never with a 5xx, and — when
//! it refuses the request — change nothing: a digest of every table a request can write (accounts, claims,
//! subscriptions, seats, ledger, keys, rotation nonces, usage, x402 settlements, events and idempotency answers,
//! transfers) is equal before and after. Refusals on a route's documented method must also have the route's error
//! shape (OpenAI error object or the 402 catalog on `/v1/*`, `{success: false, error}` on `/api/agent/*` and
//! `/x402/*`, `{error: {code, message}}` on `/api/audit/*`).
//!
//! The routes come from `x402_gateway::api::openapi::ROUTES` (the list the OpenAPI test keeps equal to the router),
//! so a new route fails here until it has a generator. Inputs are arbitrary bytes, arbitrary JSON, and JSON near the
//! valid shape: each field valid, missing, or replaced by a wrong type, a huge number, an odd string or unicode;
//! claims and payments reuse real confirmed payments, real claim and rotation signatures, and real EIP-3009
//! signatures over mutated authorizations, so generated input reaches the deep checks, not only the parsers.
//!
//! Cases per route: `PROPTEST_CASES` (default 64 here: about 4 s for this file in CI); long form, about 4 minutes:
//! `PROPTEST_CASES=2000 cargo test --test it fuzz:: -- --nocapture` (prints what each route answered).

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use x402_gateway::billing::catalog::{claim_text, rotate_text};
use x402_gateway::dev::upstream::{self, DemoConfig, DemoStats};
use x402_gateway::proxy::sse::UsageTap;
use x402_gateway::store::{Store, StoreError};
use x402_gateway::usdc::Usdc;
use x402_gateway::x402::header::{self, HeaderError, MAX_HEADER_LEN};
use x402_gateway::x402::types::{Authorization, ExactEvmPayload, PaymentPayloadV1};
use x402_gateway::x402::{AnyPaymentPayload, PaymentPayload, PaymentRequired};

use crate::support::*;
use crate::x402_routes::{network, required};
use x402_gateway::params;

/// 2026-01-01T01:00:00Z: inside the pool's asia block.
const NOW: i64 = 1_767_225_600 + 3600;
pub(crate) const AUDITOR: &str = "auditor-token-0123456789";
pub(crate) const ADMIN: &str = "admin-token-0123456789";
const HOT_ENV: &str = "FUZZ_X402_HOT_KEY";

/// Cases per route (and per decoder property).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        // A shrunk case is what the report needs; each step is an HTTP round trip, so keep it bounded.
        max_shrink_iters: 256,
        ..RunnerConfig::default()
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The gateway under test.

/// Tables a request can write. The indexer's bookkeeping (checkpoint, recent headers) moves on its own.
const STATE_TABLES: &[&str] = &[
    "accounts",
    "claims",
    "subscriptions",
    "seats",
    "ledger",
    "api_keys",
    "rotation_nonces",
    "usage",
    "x402_settlements",
    "x402_events",
    "x402_idempotency",
    "transfers",
    "transfer_status_history",
];

/// A gateway with tokens, keys and payments to use (also the target of the contract test, `contract.rs`).
pub(crate) struct Target {
    chain: TestChain,
    pub(crate) gw: Gateway,
    http: reqwest::Client,
    store: Store,
    _upstream: Arc<DemoStats>,
    _dir: tempfile::TempDir,
    pub(crate) credit_key: String,
    pool_key: String,
    /// Confirmed, unclaimed payments of payer 1 (two of 20 USDC, one of 0.50): (tx, claim signature).
    paid: Vec<(String, String)>,
    /// A rotation signature of payer 2 (who has no account) at `NOW`.
    rotation: (String, String),
    /// The offers of `/x402/credits/1`, `/x402/pools/p?blocks=asia` and the per-request model.
    offers: Vec<PaymentRequired>,
    chain_now: u64,
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
name = "demo"
base_url = "{upstream}"
api_key_env = "FUZZ_UPSTREAM_KEY"

[[models]]
id = "demo"
upstream = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
max_output_tokens = 32

[[models]]
id = "paid"
upstream = "demo"
upstream_model = "demo"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"
per_request_usdc = "0.01"

[[pools]]
slug = "p"
name = "Fuzz pool"
models = ["demo"]
blocks = [
  {{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "3.00", seats = 50 }},
  {{ name = "europe", hours_utc = "08:00-16:00", price_usdc = "4.00", seats = 50 }},
]

[credits]
min_topup_usdc = "1.00"

[auth]
auditor_token_env = "FUZZ_AUDITOR"
admin_token_env = "FUZZ_ADMIN"

[x402]
settler_key_env = "{HOT_ENV}"
"#,
        token = chain.token(),
        rpc = chain.rpc_url(),
        pay_to = chain.pay_to(),
        db = db.display(),
    )
}

fn hex_sig(signer: &PrivateKeySigner, text: &str) -> String {
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

impl Target {
    pub(crate) async fn start() -> Target {
        let chain = TestChain::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stats = Arc::new(DemoStats::default());
        tokio::spawn(upstream::run(
            listener,
            DemoConfig {
                token_delay: Duration::ZERO,
                api_key: Some("upstream-secret".into()),
                max_tokens_limit: 64,
                ..DemoConfig::default()
            },
            stats.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let hot = format!(
            "0x{}",
            alloy::hex::encode(chain.dev.anvil.keys()[5].to_bytes())
        );
        let gw = Gateway::start_with_env(
            config(&chain, &upstream_url, &db),
            db,
            Arc::new(AtomicI64::new(NOW)),
            &[
                ("FUZZ_UPSTREAM_KEY", "upstream-secret"),
                ("FUZZ_AUDITOR", AUDITOR),
                ("FUZZ_ADMIN", ADMIN),
                (HOT_ENV, &hot),
            ],
        )
        .await;
        let store = gw.store().await;

        // A credit key with enough for thousands of small requests (the demo upstream answers at most 64 tokens).
        let (_, key) = x402_gateway::billing::grant(
            &store,
            Address::repeat_byte(0x11),
            Usdc::whole(1),
            None,
            NOW,
        )
        .await
        .unwrap();
        let credit_key = key.unwrap().full;

        // A pool key of payer 0, bought and claimed over HTTP.
        let (tx, block) = chain.pay(0, "3.00".parse().unwrap()).await;
        gw.confirm(&chain, block, 1).await;
        let (status, _, body) = gw
            .post(
                "/api/agent/subscribe-pool",
                json!({"txHash": tx, "poolSlug": "p", "blocks": ["asia"],
                       "signature": hex_sig(chain.payer(0), &claim_text(&tx, 31337))}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let pool_key = body["data"]["apiKey"].as_str().unwrap().to_string();

        // Payments of payer 1 that generated claims may use: two worth buying with, one below the minimum.
        let payer = chain.payer(1).clone();
        let mut paid = Vec::new();
        let mut last = 0;
        for amount in ["20.00", "20.00", "0.50"] {
            let (tx, block) = chain.pay(1, amount.parse().unwrap()).await;
            let sig = hex_sig(&payer, &claim_text(&tx, 31337));
            paid.push((tx, sig));
            last = block;
        }
        gw.confirm(&chain, last, 1).await;
        let payer2 = chain.payer(2);
        let addr2 = format!("{:#x}", payer2.address());
        let rotation = (
            addr2.clone(),
            // No `server.public_url`: the text names the configured listen address.
            hex_sig(
                payer2,
                &rotate_text(&addr2, "127.0.0.1:8402", chain.pay_to(), 31337, NOW),
            ),
        );

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut offers = Vec::new();
        for path in ["/x402/credits/1", "/x402/pools/p?blocks=asia"] {
            let resp = http
                .post(format!("{}{path}", gw.base))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
            offers.push(required(resp.headers()));
        }
        let resp = http
            .post(format!("{}/v1/chat/completions", gw.base))
            .json(&json!({"model": "paid", "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYMENT_REQUIRED);
        offers.push(required(resp.headers()));
        let chain_now = crate::x402_routes::chain_now(&chain).await;
        Target {
            chain,
            gw,
            http,
            store,
            _upstream: stats,
            _dir: dir,
            credit_key,
            pool_key,
            paid,
            rotation,
            offers,
            chain_now,
        }
    }

    /// SHA-256 over every row of [`STATE_TABLES`].
    async fn digest(&self) -> String {
        self.store
            .read(|c| -> Result<String, StoreError> {
                let mut h = Sha256::new();
                for table in STATE_TABLES {
                    h.update(table.as_bytes());
                    // Each row encoded, then sorted: the digest does not depend on the order rows come back in.
                    let mut rows: Vec<Vec<u8>> = Vec::new();
                    c.each_row(&format!("SELECT * FROM {table}"), params![], &mut |row| {
                        let mut out = Vec::new();
                        for value in &row.0 {
                            use x402_gateway::store::sql::Value;
                            match value {
                                Value::Null => out.push(0),
                                Value::Int(n) => {
                                    out.push(1);
                                    out.extend(n.to_le_bytes());
                                }
                                Value::Real(f) => {
                                    out.push(2);
                                    out.extend(f.to_le_bytes());
                                }
                                Value::Text(t) => {
                                    out.push(3);
                                    out.extend((t.len() as u64).to_le_bytes());
                                    out.extend(t.as_bytes());
                                }
                                Value::Blob(t) => {
                                    out.push(3);
                                    out.extend((t.len() as u64).to_le_bytes());
                                    out.extend(t);
                                }
                            }
                        }
                        rows.push(out);
                        Ok(())
                    })?;
                    rows.sort();
                    for row in rows {
                        h.update(row);
                    }
                }
                Ok(alloy::hex::encode(h.finalize()))
            })
            .await
            .unwrap()
    }

    /// After an accepted request: its metering has settled and the indexer has seen any settlement it mined.
    async fn quiesce(&self) {
        let store = self.store.clone();
        wait_for("accepted requests to settle", || {
            let store = store.clone();
            async move {
                let open: i64 = store
                    .read(|c| -> Result<i64, StoreError> {
                        c.query_one(
                            "SELECT count(*) FROM usage WHERE status = 'in_flight'",
                            params![],
                            |r| r.get(0),
                        )
                    })
                    .await
                    .unwrap();
                (open == 0).then_some(())
            }
        })
        .await;
        let head = self.chain.head().await;
        self.gw.wait_indexed(head).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Generated requests.

#[derive(Clone)]
struct Case {
    method: String,
    /// Path and query, already encoded as sent.
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Readable in a failure report: header values and the body as (lossy) text.
impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} {}", self.method, self.target)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {}", String::from_utf8_lossy(value))?;
        }
        write!(f, "\n{}", String::from_utf8_lossy(&self.body))
    }
}

/// The response families a route's refusals must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    OpenAi,
    /// Anthropic's `{"type": "error", "error": {"type", "message"}}` (`/v1/messages`), or the 402 catalog.
    Anthropic,
    Agent,
    X402,
    Audit,
    Any,
}

fn shape_of(path: &str) -> Shape {
    if path == "/v1/messages" {
        Shape::Anthropic
    } else if path.starts_with("/v1") {
        Shape::OpenAi
    } else if path.starts_with("/api/agent/") && path != "/api/agent/plans" {
        Shape::Agent
    } else if path.starts_with("/x402/") {
        Shape::X402
    } else if path.starts_with("/api/audit/") {
        Shape::Audit
    } else {
        Shape::Any
    }
}

/// Whether a 2xx on this (method, path) may change state.
fn may_write(method: &str, path: &str) -> bool {
    method == "POST"
        && (x402_gateway::proxy::Api::of_path(path).is_some()
            || path.starts_with("/api/agent/")
            || path.starts_with("/x402/"))
}

/// Strings that have broken parsers before: signs, exponents, overflow edges, unicode digits and direction marks,
/// NUL, path tricks, markup.
const ODD: &[&str] = &[
    "",
    " ",
    "0",
    "-0",
    "-1",
    "+1",
    "1e9",
    "1E-7",
    "NaN",
    "inf",
    "-inf",
    "0x10",
    "10.000000001",
    "0.0000001",
    "1.",
    ".5",
    "1,5",
    "1_000",
    " 10",
    "10 ",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "115792089237316195423570985008687907853269984665640564039457584007913129639936",
    "٣",
    "１０",
    "\u{0}",
    "\u{202e}",
    "\u{feff}10",
    "null",
    "true",
    "[]",
    "{}",
    "../../etc/passwd",
    "%00",
    "%ZZ",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "😀",
    "\u{10ffff}",
    "a\nb",
    "\r\n\r\n",
    "asia,asia",
    "asia,,europe",
    ",",
    "P",
    "ASIA",
];

fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(ODD).prop_map(str::to_string),
        2 => "\\PC{0,24}",
        1 => ".{0,12}",
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => "[0-9]{19,100}",
        1 => "-?[0-9]{1,25}\\.[0-9]{0,25}",
        1 => "0[xX][0-9a-fA-F]{0,140}",
        1 => (1usize..3000).prop_map(|n| "9".repeat(n)),
    ]
    .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![1e300, -1e300, 1.5, -0.0, 5e-324]).prop_map(Value::from),
        odd_string().prop_map(Value::from),
    ]
    .boxed()
}

fn json_any() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((odd_string(), inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A field near the valid shape: one of the valid values, a wrong type or odd value, or missing (`None`).
fn near(valid: Vec<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        12 => prop::sample::select(valid).prop_map(Some),
        2 => json_leaf().prop_map(Some),
        1 => json_any().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// An object near the valid shape: each field takes one of its plausible values (`None` = left out), then 0, 1, 2
/// or all of the fields are replaced by a wrong type, an odd value or nothing; sometimes an unknown field is added.
/// Mutating only a few fields at a time is what lets most requests get past the first check.
fn object(fields: Vec<(&'static str, Vec<Option<Value>>)>) -> BoxedStrategy<Value> {
    let n = fields.len();
    let (names, valid): (Vec<&'static str>, Vec<Vec<Option<Value>>>) = fields.into_iter().unzip();
    let valid: Vec<BoxedStrategy<Option<Value>>> = valid
        .into_iter()
        .map(|v| prop::sample::select(v).boxed())
        .collect();
    let wrong: Vec<BoxedStrategy<Option<Value>>> = (0..n)
        .map(|_| {
            prop_oneof![
                3 => json_leaf().prop_map(Some),
                1 => json_any().prop_map(Some),
                1 => Just(None),
            ]
            .boxed()
        })
        .collect();
    let mutated = prop_oneof![3 => Just(0usize), 4 => Just(1), 2 => Just(2), 1 => Just(n)];
    (
        valid,
        wrong,
        mutated,
        prop::collection::vec(any::<prop::sample::Index>(), 2),
        prop::option::weighted(0.1, (odd_string(), json_leaf())),
    )
        .prop_map(move |(mut values, wrong, mutated, picks, extra)| {
            let chosen: Vec<usize> = if mutated >= n {
                (0..n).collect()
            } else {
                picks[..mutated].iter().map(|i| i.index(n)).collect()
            };
            for i in chosen {
                values[i] = wrong[i].clone();
            }
            let mut map = Map::new();
            for (name, value) in names.iter().zip(values) {
                if let Some(v) = value {
                    map.insert((*name).to_string(), v);
                }
            }
            if let Some((k, v)) = extra {
                map.insert(k, v);
            }
            Value::Object(map)
        })
        .boxed()
}

fn some(values: Vec<Value>) -> Vec<Option<Value>> {
    values.into_iter().map(Some).collect()
}

/// Body bytes: a JSON value as sent, truncated, with a byte-order mark or trailing garbage; any JSON; any bytes.
fn body(near_valid: BoxedStrategy<Value>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        12 => near_valid.clone().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => (near_valid.clone(), any::<prop::sample::Index>()).prop_map(|(v, i)| {
            let bytes = serde_json::to_vec(&v).unwrap();
            let cut = i.index(bytes.len().max(1));
            bytes[..cut].to_vec()
        }),
        1 => (near_valid, prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(v, tail)| {
            let mut bytes = b"\xef\xbb\xbf".to_vec();
            bytes.extend(serde_json::to_vec(&v).unwrap());
            bytes.extend(tail);
            bytes
        }),
        1 => json_any().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => Just(Vec::new()),
    ]
    .boxed()
}

/// Bytes that make a legal header value (no control characters other than tab).
fn header_bytes(s: impl Into<Vec<u8>>) -> Vec<u8> {
    s.into()
        .into_iter()
        .map(|b| {
            if (b < 0x20 && b != b'\t') || b == 0x7f {
                b'?'
            } else {
                b
            }
        })
        .collect()
}

fn garbage_header() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        odd_string().prop_map(header_bytes),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(header_bytes),
    ]
    .boxed()
}

/// Percent-encodes everything but unreserved characters (a path segment or query value).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A path segment: encoded, or raw URL-ish garbage (bad escapes, dots).
fn segment(valid: Vec<String>) -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(valid),
        3 => odd_string().prop_map(|s| enc(&s)),
        1 => "(%[0-9A-Fa-f]{2}|%[g-z]{1,2}|[a-z0-9.]){0,12}",
    ]
    .boxed()
}

/// A query string from (name, value) pairs (names may repeat), or raw garbage.
fn query(names: Vec<&'static str>, values: BoxedStrategy<String>) -> BoxedStrategy<String> {
    let mut names: Vec<String> = names.into_iter().map(str::to_string).collect();
    names.extend(["", "x", "cursor", "limit", "format", "token"].map(str::to_string));
    names.sort();
    names.dedup();
    prop_oneof![
        6 => prop::collection::vec((prop::sample::select(names), values), 0..4).prop_map(|pairs| {
            if pairs.is_empty() {
                return String::new();
            }
            let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
            format!("?{}", q.join("&"))
        }),
        1 => "(%[0-9A-Fa-f]{2}|%[g-z]|[a-z0-9=&;+]){0,24}".prop_map(|q| format!("?{q}")),
    ]
    .boxed()
}

/// Times as the audit API reads them, and broken ones: huge years and hours, negative fields.
fn time_value() -> BoxedStrategy<String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (any::<i64>(), 0i64..14, 0i64..33).prop_map(|(y, m, d)| format!("{y}-{m:02}-{d:02}")),
        (
            prop::sample::select(vec![
                0i64,
                1970,
                2026,
                9999,
                -1,
                i64::MAX,
                i64::MIN,
                25_252_734_927_766_555
            ]),
            1i64..13,
            1i64..29,
            any::<i64>(),
            prop::sample::select(vec![0i64, 59, -1, i64::MIN, i64::MAX]),
            prop::sample::select(vec![0i64, 60, -61, i64::MAX]),
        )
            .prop_map(|(y, m, d, h, mi, s)| format!("{y}-{m:02}-{d:02}T{h}:{mi}:{s}Z")),
        Just("2026-01-01T24:00:00Z".to_string()),
        Just("2026-02-31".to_string()),
        odd_string(),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------------------------
// Payment headers.

/// A 32-byte hex nonce or hash.
fn random_b256() -> B256 {
    B256::from(rand::random::<[u8; 32]>())
}

/// Payment header values: garbage, base64 of garbage or of any JSON, a payment JSON with odd fields, or a payment
/// really signed (EIP-3009, payer 1) over an authorization that is valid or mutated in any field.
fn payment_header(t: &Target) -> BoxedStrategy<String> {
    let offers = t.offers.clone();
    let pay_to = t.chain.pay_to();
    let payer = t.chain.payer(1).clone();
    let payer_addr = payer.address();
    let domain = x402_gateway::x402::eip3009::network_domain(&network(&t.chain));
    let now = t.chain_now;
    let signed = (
        prop::sample::select(offers.clone()),
        prop::sample::select(vec![payer_addr, t.chain.payer(2).address(), Address::ZERO]),
        prop::sample::select(vec![pay_to, Address::repeat_byte(0x42)]),
        prop_oneof![
            Just(None),
            prop::sample::select(vec![
                U256::ZERO,
                U256::from(1),
                U256::from(9_999),
                U256::from(u64::MAX),
                U256::MAX
            ])
            .prop_map(Some)
        ],
        prop::sample::select(vec![
            U256::ZERO,
            U256::from(now - 600),
            U256::from(now + 100_000),
            U256::MAX
        ]),
        prop::sample::select(vec![
            U256::from(now + 300),
            U256::from(now + 3),
            U256::from(now - 1),
            U256::ZERO,
            U256::from(u64::MAX),
            U256::MAX
        ]),
        0u8..4,
        prop_oneof![
            2 => Just(None),
            2 => "[A-Za-z0-9_-]{16,40}".prop_map(|id| Some(json!({"payment-identifier": {"info": {"id": id}}}))),
            1 => json_any().prop_map(|v| Some(json!({"payment-identifier": v}))),
        ],
    )
        .prop_map(
            move |(offer, from, to, value, valid_after, valid_before, form, ext)| {
                let accepted = offer.accepts[0].clone();
                let auth = Authorization {
                    from,
                    to,
                    value: value.unwrap_or(accepted.amount),
                    valid_after,
                    valid_before,
                    nonce: random_b256(),
                };
                let digest = x402_gateway::x402::eip3009::digest(&auth, &domain);
                let signature =
                    Bytes::from(payer.sign_hash_sync(&digest).unwrap().as_bytes().to_vec());
                let exact = ExactEvmPayload {
                    signature,
                    authorization: auth,
                };
                match form {
                    // v1, as `X-PAYMENT` carries it.
                    0 => header::encode(&PaymentPayloadV1 {
                        x402_version: 1,
                        scheme: "exact".into(),
                        network: accepted.network.clone(),
                        payload: exact,
                    }),
                    _ => {
                        let encoded = header::encode(&PaymentPayload {
                            x402_version: 2,
                            resource: Some(offer.resource.clone()),
                            accepted,
                            payload: exact,
                            extensions: ext.and_then(|e| e.as_object().cloned()),
                        });
                        // The lenient forms the decoder also reads.
                        if form == 3 {
                            URL_SAFE_NO_PAD.encode(STANDARD.decode(&encoded).unwrap())
                        } else {
                            encoded
                        }
                    }
                }
            },
        );
    let offered = offers[0].accepts[0].clone();
    let template = json!({
        "x402Version": 2,
        "accepted": serde_json::to_value(&offered).unwrap(),
        "payload": {"signature": format!("0x{}", "11".repeat(65)), "authorization": {
            "from": format!("{payer_addr:#x}"), "to": format!("{pay_to:#x}"), "value": offered.amount.to_string(),
            "validAfter": "0", "validBefore": (now + 300).to_string(), "nonce": format!("{:#x}", random_b256())}},
    });
    let odd_payment = (
        near(vec![json!(2), json!(1)]),
        near(vec![template["accepted"].clone()]),
        near(vec![template["payload"]["signature"].clone()]),
        near(vec![template["payload"]["authorization"].clone()]),
        near(vec![template["payload"]["authorization"]["value"].clone()]),
        near(vec![
            template["payload"]["authorization"]["validBefore"].clone(),
        ]),
        near(vec![template["payload"]["authorization"]["from"].clone()]),
    )
        .prop_map(move |(version, accepted, sig, auth, value, before, from)| {
            let mut p = template.clone();
            let set = |slot: &mut Value, v: Option<Value>| match v {
                Some(v) => *slot = v,
                None => *slot = Value::Null,
            };
            set(&mut p["x402Version"], version);
            set(&mut p["accepted"], accepted);
            set(&mut p["payload"]["signature"], sig);
            set(&mut p["payload"]["authorization"], auth);
            if p["payload"]["authorization"].is_object() {
                set(&mut p["payload"]["authorization"]["value"], value);
                set(&mut p["payload"]["authorization"]["validBefore"], before);
                set(&mut p["payload"]["authorization"]["from"], from);
            }
            header::encode(&p)
        });
    prop_oneof![
        8 => signed,
        3 => odd_payment,
        1 => odd_string(),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| STANDARD.encode(b)),
        1 => json_any().prop_map(|v| header::encode(&v)),
        1 => Just("A".repeat(MAX_HEADER_LEN + 8)),
    ]
    .boxed()
}

/// Which credentials a route's generated requests lean towards, so that most of them get past the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Focus {
    /// API keys (`/v1/*`).
    Keys,
    /// Auditor and admin tokens (`/api/audit/*`, `/admin`).
    Tokens,
    /// No key, a payment header (x402 purchases, per-request payment).
    Payment,
    /// Anything.
    Plain,
}

/// Request headers: Authorization (valid keys and tokens, broken ones, garbage), Content-Type, a payment header
/// (`PAYMENT-SIGNATURE`, `X-PAYMENT` or both), Accept, and a few others with garbage values.
fn headers(t: &Target, focus: Focus) -> BoxedStrategy<Vec<(String, Vec<u8>)>> {
    let credit = format!("Bearer {}", t.credit_key);
    let pool = format!("Bearer {}", t.pool_key);
    let (auditor, admin) = (format!("Bearer {AUDITOR}"), format!("Bearer {ADMIN}"));
    let (valid, valid_weight, none_weight): (Vec<String>, u32, u32) = match focus {
        Focus::Keys => (vec![credit.clone(), credit.clone(), pool.clone()], 8, 1),
        Focus::Tokens => (vec![auditor, admin], 8, 1),
        Focus::Payment => (vec![credit.clone(), pool.clone()], 1, 6),
        Focus::Plain => (vec![credit.clone(), pool, auditor, admin], 3, 1),
    };
    let broken: Vec<String> = vec![
        format!("bearer   {}  ", t.credit_key),
        format!("Bearer {}x", t.credit_key),
        format!("Bearer {}", &t.credit_key[..t.credit_key.len() - 1]),
        format!("Bearer sk-{}-{}", "0".repeat(16), "0".repeat(64)),
        format!("Bearer {AUDITOR}x"),
        format!("Basic {}", STANDARD.encode("user:pass")),
        "Bearer".into(),
        "Bearer ".into(),
        "Bearer sk-".into(),
        "Bearer sk--".into(),
    ];
    let payment_odds = match focus {
        Focus::Payment => 0.85,
        Focus::Keys => 0.15,
        Focus::Tokens | Focus::Plain => 0.1,
    };
    let content_types: Vec<&'static str> = vec![
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/json;",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ];
    let accepts: Vec<&'static str> =
        vec!["text/csv", "application/json", "*/*", "text/event-stream"];
    let others: Vec<&'static str> = vec![
        "host",
        "if-none-match",
        "x-forwarded-for",
        "origin",
        "user-agent",
        "x-request-id",
        "cookie",
    ];
    (
        prop_oneof![
            none_weight => Just(None),
            valid_weight => prop::sample::select(valid).prop_map(|a| Some(a.into_bytes())),
            2 => prop::sample::select(broken).prop_map(|a| Some(a.into_bytes())),
            1 => garbage_header().prop_map(Some),
        ],
        prop_oneof![
            1 => Just(None),
            8 => Just(Some(b"application/json".to_vec())),
            3 => prop::sample::select(content_types).prop_map(|c| Some(c.as_bytes().to_vec())),
            1 => garbage_header().prop_map(Some),
        ],
        prop::option::weighted(payment_odds, (0u8..3, payment_header(t))),
        prop::option::weighted(0.2, prop::sample::select(accepts)),
        prop::collection::vec((prop::sample::select(others), garbage_header()), 0..3),
    )
        .prop_map(|(auth, ct, payment, accept, others)| {
            let mut h: Vec<(String, Vec<u8>)> = Vec::new();
            if let Some(a) = auth {
                h.push(("authorization".into(), a));
            }
            if let Some(c) = ct {
                h.push(("content-type".into(), c));
            }
            if let Some((which, value)) = payment {
                let value = header_bytes(value);
                if which != 1 {
                    h.push(("payment-signature".into(), value.clone()));
                }
                if which != 0 {
                    h.push(("x-payment".into(), value));
                }
            }
            if let Some(a) = accept {
                h.push(("accept".into(), a.as_bytes().to_vec()));
            }
            for (name, value) in others {
                h.push((name.to_string(), value));
            }
            h
        })
        .boxed()
}

/// Occasionally another method than the route's.
fn method(documented: &str) -> BoxedStrategy<String> {
    prop_oneof![
        8 => Just(documented.to_ascii_uppercase()),
        1 => prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
            .prop_map(str::to_string),
    ]
    .boxed()
}

fn chat_body() -> BoxedStrategy<Vec<u8>> {
    let hello = json!([{"role": "user", "content": "hello there"}]);
    body(object(vec![
        (
            "model",
            some(vec![
                json!("demo"),
                json!("demo"),
                json!("demo"),
                json!("paid"),
                json!("paid"),
                json!("nope"),
                json!("DEMO"),
            ]),
        ),
        (
            "messages",
            some(vec![
                hello.clone(),
                hello,
                json!([]),
                json!([{"role": "system", "content": [{"type": "text", "text": "parts"}]}, {"role": "user"}]),
                json!([{"role": "user", "content": "😀 \u{202e} ٣"}]),
                // Non-text parts: refused unless the model bounds them.
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/i.png"}}]}]),
                json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}, {"type": 7}]}]),
            ]),
        ),
        ("stream", vec![None, Some(json!(true)), Some(json!(false))]),
        (
            "max_tokens",
            vec![
                None,
                Some(json!(1)),
                Some(json!(8)),
                Some(json!(64)),
                Some(json!(100_000)),
                Some(json!(u64::MAX)),
            ],
        ),
        (
            "max_completion_tokens",
            vec![
                None,
                None,
                None,
                Some(json!(4)),
                Some(json!(100_000)),
                Some(json!(0)),
            ],
        ),
        // Multipliers: refused (n > 1 on a model that serves 1, best_of, beam search) or harmless.
        (
            "n",
            vec![
                None,
                None,
                None,
                Some(json!(1)),
                Some(json!(2)),
                Some(json!(0)),
                Some(json!(-3)),
            ],
        ),
        (
            "best_of",
            vec![None, None, None, Some(json!(1)), Some(json!(4))],
        ),
        ("use_beam_search", vec![None, None, None, Some(json!(true))]),
        (
            "tools",
            vec![
                None,
                None,
                Some(
                    json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
                ),
            ],
        ),
        (
            "stream_options",
            vec![
                None,
                None,
                Some(json!({"include_usage": true})),
                Some(json!({"include_usage": false, "continuous_usage_stats": true})),
            ],
        ),
        ("user", vec![None, Some(json!("fuzz"))]),
    ]))
}

/// Claim and rotation bodies. The transaction and its signature are chosen together (a real confirmed payment
/// with the payer's signature, or a mismatched pair) before fields are mutated, so whole valid claims occur too.
fn claim_body(t: &Target, path: &str) -> BoxedStrategy<Vec<u8>> {
    // The real pairs three times over: most claims should be the payer's own.
    let mut pairs: Vec<(Value, Value)> = t
        .paid
        .iter()
        .cycle()
        .take(3 * t.paid.len())
        .map(|(tx, sig)| (json!(tx), json!(sig)))
        .collect();
    let (tx0, sig0) = t.paid[0].clone();
    pairs.extend([
        (
            json!(tx0.to_ascii_uppercase().replacen("0X", "0x", 1)),
            json!(sig0),
        ),
        (
            json!(tx0),
            json!(hex_sig(t.chain.payer(0), &claim_text(&tx0, 31337))),
        ),
        (json!(format!("{:#x}", random_b256())), json!(sig0)),
        (json!(&tx0[2..]), json!(&sig0[..sig0.len() - 2])),
        (json!(tx0), json!("0x")),
        (json!(tx0), json!(format!("0x{}", "ab".repeat(5000)))),
    ]);
    let path = path.to_string();
    let rotation = t.rotation.clone();
    let payer1 = format!("{:#x}", t.chain.payer(1).address());
    prop::sample::select(pairs)
        .prop_flat_map(move |(tx, sig)| {
            let fields = match path.as_str() {
                "/api/agent/topup" => vec![
                    ("txHash", vec![Some(tx)]),
                    (
                        "amount",
                        some(vec![
                            json!("1.00"),
                            json!("20"),
                            json!("20.000001"),
                            json!("0.5"),
                            json!(20),
                            json!(1),
                            json!("-1"),
                            json!("1e2"),
                            json!(i64::MAX),
                            json!(u64::MAX),
                        ]),
                    ),
                    ("signature", vec![Some(sig.clone()), Some(sig), None]),
                ],
                "/api/agent/subscribe-pool" => vec![
                    ("txHash", vec![Some(tx)]),
                    (
                        "poolSlug",
                        some(vec![
                            json!("p"),
                            json!("p"),
                            json!("p"),
                            json!("P"),
                            json!("nope"),
                        ]),
                    ),
                    (
                        "blocks",
                        some(vec![
                            json!(["asia"]),
                            json!(["asia"]),
                            json!(["europe"]),
                            json!(["asia", "europe"]),
                            json!(["asia", "asia"]),
                            json!([]),
                            json!(["nope"]),
                            json!([1]),
                            json!("asia"),
                        ]),
                    ),
                    ("signature", vec![Some(sig.clone()), Some(sig), None]),
                ],
                "/api/agent/keys/rotate" => vec![
                    (
                        "address",
                        some(vec![
                            json!(rotation.0),
                            json!(rotation.0.to_ascii_uppercase().replacen("0X", "0x", 1)),
                            json!(payer1),
                            json!("0x1234"),
                        ]),
                    ),
                    (
                        "signedAt",
                        some(vec![
                            json!(NOW),
                            json!(NOW.to_string()),
                            json!(NOW - 100_000),
                            json!(i64::MAX),
                            json!(i64::MIN),
                            json!(u64::MAX),
                            json!(1.5),
                        ]),
                    ),
                    (
                        "signature",
                        some(vec![json!(rotation.1), json!(rotation.1), json!("0x00")]),
                    ),
                    ("keyId", vec![None, None, Some(json!("0123456789abcdef"))]),
                ],
                other => unreachable!("{other}"),
            };
            body(object(fields))
        })
        .boxed()
}

/// Generated requests for one documented route.
fn route_cases(t: &Target, method_doc: &str, path: &str) -> BoxedStrategy<Case> {
    let small_body = prop_oneof![
        4 => Just(Vec::new()),
        1 => body(json_any()),
    ]
    .boxed();
    let (target, body): (BoxedStrategy<String>, BoxedStrategy<Vec<u8>>) = match path {
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/responses" | "/v1/messages" => {
            (Just(path.to_string()).boxed(), chat_body())
        }
        "/api/agent/topup" | "/api/agent/subscribe-pool" | "/api/agent/keys/rotate" => {
            (Just(path.to_string()).boxed(), claim_body(t, path))
        }
        "/x402/credits/{amount}" => (
            segment(vec!["1".into(), "1.00".into(), "10".into(), "0.999999".into(), "25.50".into()])
                .prop_map(|a| format!("/x402/credits/{a}"))
                .boxed(),
            small_body,
        ),
        "/x402/pools/{slug}" => (
            (
                segment(vec!["p".into()]),
                query(
                    vec!["blocks"],
                    prop_oneof![
                        3 => prop::sample::select(vec!["asia", "europe", "asia,europe", "asia,asia", "", "nope"])
                            .prop_map(str::to_string),
                        2 => odd_string(),
                    ]
                    .boxed(),
                ),
            )
                .prop_map(|(slug, q)| format!("/x402/pools/{slug}{q}"))
                .boxed(),
            small_body,
        ),
        "/x402/upto/{payer}/{nonce}" => (
            (
                segment(vec![format!("{:#x}", t.chain.payer(1).address()), format!("{:#x}", Address::ZERO)]),
                segment(vec!["1".into(), "0x01".into(), format!("{:#x}", random_b256()), "0x".into()]),
            )
                .prop_map(|(payer, nonce)| format!("/x402/upto/{payer}/{nonce}"))
                .boxed(),
            small_body,
        ),
        "/api/audit/payments/{txHash}" => (
            segment(vec![t.paid[0].0.clone(), format!("{:#x}", random_b256())])
                .prop_map(|tx| format!("/api/audit/payments/{tx}"))
                .boxed(),
            small_body,
        ),
        "/api/audit/accounts/{address}/ledger" => (
            (
                segment(vec![
                    format!("{:#x}", Address::repeat_byte(0x11)),
                    format!("{:#x}", Address::ZERO),
                ]),
                query(vec!["from", "to"], time_value()),
            )
                .prop_map(|(a, q)| format!("/api/audit/accounts/{a}/ledger{q}"))
                .boxed(),
            small_body,
        ),
        p if p.starts_with("/api/audit/") => {
            let payer = format!("{:#x}", t.chain.payer(1).address());
            let values = prop_oneof![
                2 => time_value(),
                1 => prop::sample::select(vec![
                    payer, "confirmed".into(), "seen".into(), "topup".into(), "subscription".into(),
                    "csv".into(), "json".into(), "1000".into(), "1001".into(), "10.00".into(),
                ]),
            ]
            .boxed();
            let path = p.to_string();
            (
                query(
                    vec![
                        "status", "payer", "fromBlock", "toBlock", "from", "to", "minAmount", "account", "kind",
                    ],
                    values,
                )
                .prop_map(move |q| format!("{path}{q}"))
                .boxed(),
                small_body,
            )
        }
        "/admin" => (
            query(
                vec!["token"],
                prop_oneof![Just(ADMIN.to_string()), Just(AUDITOR.to_string()), odd_string()].boxed(),
            )
            .prop_map(|q| format!("/admin{q}"))
            .boxed(),
            small_body,
        ),
        "/api/admin/summary" => (
            query(
                vec!["token", "range"],
                prop_oneof![
                    Just(ADMIN.to_string()),
                    Just(AUDITOR.to_string()),
                    Just("7d".to_string()),
                    Just("30d".to_string()),
                    odd_string()
                ]
                .boxed(),
            )
            .prop_map(|q| format!("/api/admin/summary{q}"))
            .boxed(),
            small_body,
        ),
        "/v1/{rest}" => (
            prop::collection::vec(segment(vec!["images".into(), "models".into(), "x".into()]), 1..3)
                .prop_map(|s| format!("/v1/{}", s.join("/")))
                .boxed(),
            small_body,
        ),
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/api/agent/plans" | "/v1/models" | "/v1/usage"
        | "/v1" | "/.well-known/agent-card.json" | "/.well-known/agent.json" => {
            let path = path.to_string();
            (
                query(vec!["x"], odd_string())
                    .prop_map(move |q| format!("{path}{q}"))
                    .boxed(),
                small_body,
            )
        }
        other => panic!("no fuzz generator for the documented route {method_doc} {other}: add one"),
    };
    let focus = if path.starts_with("/x402/") {
        Focus::Payment
    } else if path.starts_with("/api/audit/") || path == "/admin" {
        Focus::Tokens
    } else if path.starts_with("/v1") {
        Focus::Keys
    } else {
        Focus::Plain
    };
    let headers = if x402_gateway::proxy::Api::of_path(path).is_some() {
        // Key holders, and keyless requests paying per request.
        prop_oneof![2 => headers(t, Focus::Keys), 1 => headers(t, Focus::Payment)].boxed()
    } else {
        headers(t, focus)
    };
    (method(method_doc), target, headers, body)
        .prop_map(|(method, target, headers, body)| Case {
            method,
            target,
            headers,
            body,
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------------------------
// Checking one case.

async fn send_case(t: &Target, case: &Case) -> Result<(StatusCode, HeaderMap, Vec<u8>), String> {
    let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
    let mut req = t
        .http
        .request(method, format!("{}{}", t.gw.base, case.target))
        .body(case.body.clone());
    for (name, value) in &case.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
        let value = HeaderValue::from_bytes(value).unwrap();
        req = req.header(name, value);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("no answer (a panic drops the connection): {e:?}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("the body broke off: {e:?}"))?;
    Ok((status, headers, body.to_vec()))
}

/// Whether a refusal has the shape the route's clients read.
fn shape_ok(shape: Shape, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> bool {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return shape == Shape::Any,
    };
    let s = |v: &Value| v.is_string();
    match shape {
        Shape::OpenAi => {
            let e = &v["error"];
            let openai = e.is_object()
                && s(&e["message"])
                && s(&e["type"])
                && e.get("param").is_some()
                && e.get("code").is_some();
            let catalog = status == StatusCode::PAYMENT_REQUIRED
                && v["error"] == "Payment Required"
                && v["x402"].is_object();
            openai || catalog
        }
        Shape::Anthropic => {
            // A client error is never labelled as the server's (`api_error`, `overloaded_error`).
            let anthropic = v["type"] == "error"
                && s(&v["error"]["type"])
                && s(&v["error"]["message"])
                && !(status.is_client_error()
                    && matches!(
                        v["error"]["type"].as_str(),
                        Some("api_error" | "overloaded_error")
                    ));
            let catalog = status == StatusCode::PAYMENT_REQUIRED
                && v["error"] == "Payment Required"
                && v["x402"].is_object();
            anthropic || catalog
        }
        Shape::Agent => {
            v["success"] == false && s(&v["error"]["code"]) && s(&v["error"]["message"])
        }
        Shape::X402 => {
            if status == StatusCode::PAYMENT_REQUIRED {
                v["success"] == false
                    && headers
                        .get("payment-required")
                        .and_then(|h| h.to_str().ok())
                        .is_some_and(|h| header::decode::<PaymentRequired>(h).is_ok())
            } else {
                v["success"] == false && s(&v["error"]["code"]) && s(&v["error"]["message"])
            }
        }
        Shape::Audit => s(&v["error"]["code"]) && s(&v["error"]["message"]),
        Shape::Any => true,
    }
}

/// What the answers were, per route: (status, error code or x402 reason) → count. Printed with `--nocapture`, to
/// see that generated input reaches past the parsers.
type Seen = std::sync::Mutex<std::collections::BTreeMap<(u16, String), u32>>;

fn code_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = if v["reason"].is_string() {
        &v["reason"]
    } else {
        &v["error"]["code"]
    };
    match v["error"]["field"].as_str() {
        Some(field) => format!("{}({field})", code.as_str().unwrap_or("")),
        None => code.as_str().unwrap_or("").to_string(),
    }
}

async fn check(
    t: &Target,
    documented: &str,
    path: &str,
    case: &Case,
    seen: &Seen,
) -> Result<(), TestCaseError> {
    let before = t.digest().await;
    let (status, headers, body) = send_case(t, case).await.map_err(TestCaseError::fail)?;
    *seen
        .lock()
        .unwrap()
        .entry((status.as_u16(), code_of(&body)))
        .or_default() += 1;
    let text = String::from_utf8_lossy(&body);
    let text = &text[..text.len().min(600)];
    prop_assert!(
        status.as_u16() < 500,
        "{} {} answered {status}: {text}",
        case.method,
        case.target
    );
    let route_path = case.target.split('?').next().unwrap_or("");
    if status.is_success() && may_write(&case.method, route_path) {
        t.quiesce().await;
        return Ok(());
    }
    let after = t.digest().await;
    prop_assert_eq!(
        &before,
        &after,
        "{} {} answered {} and changed the database: {}",
        &case.method,
        &case.target,
        status,
        text
    );
    // A path that left the route (an empty segment) gets the router's own 404 `no_route`.
    let left_the_route = status == StatusCode::NOT_FOUND
        && serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["error"]["code"] == "no_route");
    if status.is_client_error() && case.method.eq_ignore_ascii_case(documented) && !left_the_route {
        prop_assert!(
            shape_ok(shape_of(path), status, &headers, &body),
            "{} {} answered {status} in the wrong shape for {path}: {text}",
            case.method,
            case.target
        );
    }
    Ok(())
}

/// Every documented route, `PROPTEST_CASES` generated requests each (plus unknown paths), against one gateway.
#[test]
fn every_public_route_refuses_hostile_input_without_5xx_or_state_change() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(Target::start());
    let cases = cases();
    let started = std::time::Instant::now();
    let mut routes: Vec<(String, String)> = x402_gateway::api::openapi::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    routes.dedup();
    let mut total = 0;
    // Every route is run even when an earlier one fails, so one run reports every finding.
    let mut failures = Vec::new();
    let document = x402_gateway::api::openapi::document_for(&t.gw.settings());
    for (method, path) in &routes {
        let strategy = route_cases(&t, method, path);
        let route_started = std::time::Instant::now();
        let seen = Seen::default();
        let result = runner(cases).run(&strategy, |case| {
            rt.block_on(check(&t, method, path, &case, &seen))
        });
        if let Err(e) = result {
            failures.push(format!("{method} {path}: {e}"));
        }
        let seen = seen.into_inner().unwrap();
        // Every status the route answered is one its operation documents (with the key, tokens and gateway the
        // document is served for); another method's 405 and a path that left the route (404 `no_route`) are the
        // router's, documented by what the path serves.
        let responses = &document["paths"][path.as_str()][method.as_str()]["responses"];
        let undocumented: Vec<String> = seen
            .keys()
            .filter(|(status, code)| {
                responses.get(status.to_string()).is_none()
                    && *status != 405
                    && !(*status == 404 && code == "no_route")
            })
            .map(|(status, code)| format!("{status} {code}"))
            .collect();
        if !undocumented.is_empty() {
            failures.push(format!(
                "{method} {path} answered statuses src/api/openapi_contract.json does not document: {}",
                undocumented.join(", ")
            ));
        }
        let seen: Vec<String> = seen
            .into_iter()
            .map(|((status, code), n)| format!("{status} {code}: {n}"))
            .collect();
        eprintln!(
            "fuzz: {method} {path}: {cases} cases in {:.1} s; {}",
            route_started.elapsed().as_secs_f64(),
            seen.join(", ")
        );
        total += cases;
    }
    // Paths no route serves.
    let unknown = (
        method("get"),
        "(/[a-zA-Z0-9%._~-]{0,12}){1,4}",
        headers(&t, Focus::Plain),
        body(json_any()),
    )
        .prop_map(|(method, target, headers, body)| Case {
            method,
            target,
            headers,
            body,
        });
    let seen = Seen::default();
    let result = runner(cases).run(&unknown, |case| {
        rt.block_on(check(&t, "get", "/unknown", &case, &seen))
    });
    if let Err(e) = result {
        failures.push(format!("unknown paths: {e}"));
    }
    total += cases;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!(
        "fuzz: {total} requests over {} routes in {:.1} s",
        routes.len() + 1,
        started.elapsed().as_secs_f64()
    );
    // Still alive and ready after all of it.
    let (status, _, _) = rt.block_on(t.gw.get("/readyz", None));
    assert_eq!(status, StatusCode::OK);
}

/// Each input the fuzzer found, pinned: they panicked, wrote state on a refusal, or answered in the wrong shape.
#[test]
fn fuzz_findings_stay_fixed() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = Target::start().await;
        let send = |method: &str, target: &str, headers: Vec<(&str, String)>, body: &str| Case {
            method: method.into(),
            target: target.into(),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_bytes()))
                .collect(),
            body: body.as_bytes().to_vec(),
        };
        let auditor = || vec![("authorization", format!("Bearer {AUDITOR}"))];
        let json_ct = || vec![("content-type", "application/json".to_string())];
        let cases = [
            // Times past i64 seconds overflowed parse_time (a panic: the connection dropped).
            (send("GET", "/api/audit/payments?from=292277026597-01-01", auditor(), ""), 400, "invalid_parameter"),
            (send("GET", "/api/audit/revenue?to=2026-01-01T-9223372036854775808:00:00Z", auditor(), ""), 400, "invalid_parameter"),
            // signedAt = i64::MIN overflowed `now - signedAt`.
            (
                send(
                    "POST",
                    "/api/agent/keys/rotate",
                    json_ct(),
                    &json!({"address": t.rotation.0, "signedAt": i64::MIN, "signature": t.rotation.1}).to_string(),
                ),
                401,
                "signature_expired",
            ),
            // Not-UTF-8 path segments and a repeated query parameter got axum's plain-text 400.
            (send("POST", "/x402/credits/%FF", vec![], ""), 400, "invalid_field"),
            (send("POST", "/x402/pools/%FF?blocks=asia", vec![], ""), 404, "unknown_pool"),
            (send("POST", "/x402/pools/p?blocks=asia&blocks=europe", vec![], ""), 400, "invalid_field"),
            (send("GET", "/api/audit/payments/%FF", auditor(), ""), 400, "invalid_parameter"),
            (send("GET", "/api/audit/accounts/%FF/ledger", auditor(), ""), 400, "invalid_parameter"),
            // Another method on /v1/* got axum's empty 405.
            (send("POST", "/v1/models", vec![], ""), 405, "method_not_allowed"),
            // (A keyless GET of an inference route answers the 402 on an x402 gateway: DELETE stays a 405.)
            (send("DELETE", "/v1/chat/completions", vec![], ""), 405, "method_not_allowed"),
        ];
        for (case, status, code) in cases {
            let before = t.digest().await;
            let (got, headers, body) = send_case(&t, &case).await.unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            assert_eq!(got.as_u16(), status, "{case:?} → {v}");
            assert_eq!(v["error"]["code"], code, "{case:?} → {v}");
            if status == 405 {
                assert!(v["error"]["type"].is_string() && v["error"].get("param").is_some(), "{v}");
                assert!(headers.contains_key("allow"));
            }
            assert_eq!(before, t.digest().await, "{case:?}");
        }

        // A refused payment with a payment-identifier stored its 402: unpaid requests wrote rows, and the id could
        // not be used again with a fixed payment.
        let offered = &t.offers[0];
        let id = json!({"payment-identifier": {"info": {"id": "order-fuzz-0123456789"}}});
        let now = crate::x402_routes::chain_now(&t.chain).await;
        let auth = crate::x402_routes::authorization(t.chain.payer(1).address(), &offered.accepts[0], now);
        let wrong = crate::x402_routes::sign(&t.chain, t.chain.payer(2), &auth);
        let refused = crate::x402_routes::v2_header(offered, auth, wrong, Some(id.clone()));
        let pay = |header: String| send("POST", "/x402/credits/1", vec![("payment-signature", header)], "");
        let before = t.digest().await;
        let (status, _, body) = send_case(&t, &pay(refused)).await.unwrap();
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{}", String::from_utf8_lossy(&body));
        assert_eq!(before, t.digest().await, "a refused payment wrote state");
        let auth = crate::x402_routes::authorization(t.chain.payer(1).address(), &offered.accepts[0], now);
        let good = crate::x402_routes::sign(&t.chain, t.chain.payer(1), &auth);
        let paid = crate::x402_routes::v2_header(offered, auth, good, Some(id));
        let (status, _, body) = send_case(&t, &pay(paid)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "the id is usable after a refusal: {}", String::from_utf8_lossy(&body));
    });
}

/// Raw bytes on a TCP connection (broken request lines, headers, framing): answered or closed, never a 5xx, and
/// the server keeps serving.
#[test]
fn raw_garbage_on_the_socket_is_answered_or_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(Target::start());
    let addr = t.gw.base.trim_start_matches("http://").to_string();
    let request_ish = (
        prop::sample::select(vec!["GET", "POST", "PUT", "G\0T", "", "PRI"]),
        prop_oneof![
            Just("/v1/chat/completions".to_string()),
            Just("/api/agent/topup".to_string()),
            "[ -~]{0,40}",
        ],
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", ""]),
        prop::collection::vec(
            ("[!-~]{0,12}", prop::collection::vec(any::<u8>(), 0..40)),
            0..4,
        ),
        prop::sample::select(vec![
            "",
            "content-length: 5\r\n",
            "content-length: -1\r\n",
            "content-length: 99999999999999999999\r\n",
            "transfer-encoding: chunked\r\n",
            "transfer-encoding: chunked\r\ncontent-length: 3\r\n",
        ]),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(m, path, version, headers, framing, body)| {
            let mut out = format!("{m} {path} {version}\r\nhost: x\r\n{framing}").into_bytes();
            for (k, v) in headers {
                out.extend(k.bytes());
                out.extend(b": ");
                out.extend(v);
                out.extend(b"\r\n");
            }
            out.extend(b"\r\n");
            out.extend(body);
            out
        });
    let raw = prop_oneof![
        3 => request_ish,
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ];
    let result = runner(cases() * 4).run(&raw, |bytes| {
        rt.block_on(async {
            let before = t.digest().await;
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let _ = conn.write_all(&bytes).await;
            let _ = conn.shutdown().await;
            let mut answer = Vec::new();
            // Either an answer or a close; a server that hangs on garbage fails here.
            let read = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut answer)).await;
            prop_assert!(read.is_ok(), "no answer and no close within {DEADLINE:?}");
            if let Some(status) = answer
                .strip_prefix(b"HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| std::str::from_utf8(code).ok())
                .and_then(|code| code.parse::<u16>().ok())
            {
                prop_assert!(
                    status < 500,
                    "answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            let (status, _, _) = t.gw.get("/healthz", None).await;
            prop_assert_eq!(status, StatusCode::OK);
            prop_assert_eq!(before, t.digest().await);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The two decoders of outside bytes, in CI (the same properties as the cargo-fuzz targets in fuzz/).

/// One SSE event of a generated upstream stream, and what the tap must make of it.
#[derive(Debug, Clone)]
enum Event {
    Content(String),
    Usage(u64, u64),
    /// A chunk with both content and usage (some servers send usage on every chunk).
    ContentAndUsage(String, u64, u64),
    Done,
    Comment(String),
    NotJson(String),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => "\\PC{0,8}".prop_map(Event::Content),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(p, c)| Event::Usage(p, c)),
        1 => ("\\PC{1,4}", any::<u32>(), any::<u32>())
            .prop_map(|(s, p, c)| Event::ContentAndUsage(s, u64::from(p), u64::from(c))),
        1 => Just(Event::Done),
        1 => "[ -~]{0,12}".prop_map(Event::Comment),
        1 => "[ -~]{0,12}".prop_map(Event::NotJson),
    ]
}

fn render(e: &Event, crlf: bool, null_choices: bool) -> String {
    let end = if crlf { "\r\n\r\n" } else { "\n\n" };
    let choices = if null_choices { json!(null) } else { json!([]) };
    match e {
        Event::Content(s) => format!(
            "data: {}{end}",
            json!({"choices": [{"index": 0, "delta": {"content": s}}], "usage": null})
        ),
        Event::Usage(p, c) => format!(
            "data: {}{end}",
            json!({"choices": choices, "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": 0}})
        ),
        Event::ContentAndUsage(s, p, c) => format!(
            "data: {}{end}",
            json!({"choices": [{"delta": {"content": s}}], "usage": {"prompt_tokens": p, "completion_tokens": c}})
        ),
        Event::Done => format!("data: [DONE]{end}"),
        Event::Comment(s) => format!(": {}{end}", s.replace(['\r', '\n'], " ")),
        Event::NotJson(s) => format!("data: {{not json {}{end}", s.replace(['\r', '\n'], " ")),
    }
}

/// Feeds `stream` to a tap in pieces of the given sizes (cycled); returns (forwarded bytes, tap).
fn tap(stream: &[u8], strip: bool, pieces: &[usize]) -> (Vec<u8>, UsageTap) {
    let mut tap = UsageTap::new(strip);
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = pieces[i % pieces.len()].clamp(1, stream.len() - at);
        out.extend_from_slice(&tap.feed(&stream[at..at + n]));
        at += n;
        i += 1;
    }
    out.extend_from_slice(&tap.finish());
    (out, tap)
}

/// Model-based: the tap reports exactly the stream's last usage, `[DONE]` and content count, forwards every byte
/// (or every byte but the usage-only events, when stripping), however the stream is cut into pieces.
#[test]
fn sse_usage_tap_reads_exactly_what_the_stream_says_in_any_pieces() {
    let strategy = (
        prop::collection::vec(event(), 0..12),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(1usize..40, 1..6),
    );
    runner(cases() * 10)
        .run(&strategy, |(events, crlf, null_choices, strip, pieces)| {
            let stream: String = events.iter().map(|e| render(e, crlf, null_choices)).collect();
            let (out, tap) = tap(stream.as_bytes(), strip, &pieces);
            let last_usage = events.iter().rev().find_map(|e| match e {
                Event::Usage(p, c) | Event::ContentAndUsage(_, p, c) => Some((*p, *c)),
                _ => None,
            });
            prop_assert_eq!(
                tap.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
                last_usage
            );
            prop_assert_eq!(tap.done, events.iter().any(|e| matches!(e, Event::Done)));
            let content = events
                .iter()
                .filter(|e| matches!(e, Event::Content(s) | Event::ContentAndUsage(s, ..) if !s.is_empty()))
                .count() as u64;
            prop_assert_eq!(tap.content_chunks, content);
            let expected: String = events
                .iter()
                .filter(|e| !(strip && matches!(e, Event::Usage(..))))
                .map(|e| render(e, crlf, null_choices))
                .collect();
            prop_assert_eq!(String::from_utf8_lossy(&out), expected);
            Ok(())
        })
        .unwrap();
}

/// Arbitrary bytes: no panic, the pieces do not matter, nothing invented (as the `sse_usage` fuzz target).
#[test]
fn sse_usage_tap_never_panics_or_invents_usage_on_arbitrary_bytes() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        // Mostly SSE-looking bytes, so that events do form.
        prop::collection::vec(
            prop::sample::select(
                b"data: {}[]\"usage\":prompt_tokens,completion_tokens0123456789\n\r[DONE]choices:delta content"
                    .to_vec()
            ),
            0..400
        ),
    ];
    let strategy = (
        bytes,
        any::<bool>(),
        prop::collection::vec(1usize..64, 1..6),
    );
    runner(cases() * 10)
        .run(&strategy, |(stream, strip, pieces)| {
            let (whole_out, whole) = tap(&stream, strip, &[usize::MAX]);
            let (out, split) = tap(&stream, strip, &pieces);
            prop_assert_eq!(&out, &whole_out);
            prop_assert_eq!(split.usage, whole.usage);
            prop_assert_eq!(split.done, whole.done);
            prop_assert_eq!(split.content_chunks, whole.content_chunks);
            if !strip || whole.usage.is_none() {
                prop_assert_eq!(&out, &stream);
            }
            let contains = |needle: &[u8]| stream.windows(needle.len()).any(|w| w == needle);
            if let Some(u) = whole.usage {
                for n in [u.prompt_tokens, u.completion_tokens] {
                    prop_assert!(
                        n == 0 || contains(n.to_string().as_bytes()),
                        "usage {} invented",
                        n
                    );
                }
            }
            prop_assert!(!whole.done || contains(b"[DONE]"));
            Ok(())
        })
        .unwrap();
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

/// Payments of both versions with arbitrary field values: encode → decode is the identity, in every alphabet and
/// padding the decoder accepts, with surrounding whitespace; arbitrary header text never panics, over-long text is
/// `TooLarge`, and whatever JSON is read re-encodes to the standard padded alphabet (as the `x402_header` target).
#[test]
fn x402_header_decoder_round_trips_payments_and_refuses_garbage_cleanly() {
    let payment = (
        any::<bool>(),
        any::<[u8; 20]>(),
        any::<[u8; 20]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        prop::collection::vec(any::<u8>(), 0..100),
        ("\\PC{0,12}", "\\PC{0,12}", any::<u64>()),
        prop::option::of(prop::collection::vec(("[a-z-]{1,10}", any::<i64>()), 0..3)),
    )
        .prop_map(
            |(v1, from, to, value, after, before, nonce, sig, (scheme, net, timeout), ext)| {
                let exact = ExactEvmPayload {
                    signature: Bytes::from(sig),
                    authorization: Authorization {
                        from: Address::from(from),
                        to: Address::from(to),
                        value: U256::from_be_bytes(value),
                        valid_after: U256::from_be_bytes(after),
                        valid_before: U256::from_be_bytes(before),
                        nonce: B256::from(nonce),
                    },
                };
                if v1 {
                    AnyPaymentPayload::V1(PaymentPayloadV1 {
                        x402_version: 1,
                        scheme,
                        network: net,
                        payload: exact,
                    })
                } else {
                    AnyPaymentPayload::V2(PaymentPayload {
                        x402_version: 2,
                        resource: None,
                        accepted: x402_gateway::x402::PaymentRequirements {
                            scheme,
                            network: net,
                            amount: U256::from_be_bytes(value),
                            asset: Address::from(to),
                            pay_to: Address::from(from),
                            max_timeout_seconds: timeout,
                            extra: None,
                        },
                        payload: exact,
                        extensions: ext
                            .map(|kv| kv.into_iter().map(|(k, n)| (k, json!(n))).collect()),
                    })
                }
            },
        );
    runner(cases() * 10)
        .run(&(payment, 0u8..4), |(payment, form)| {
            let encoded = header::encode(&payment.to_json());
            let bytes = STANDARD.decode(&encoded).unwrap();
            let text = match form {
                0 => encoded,
                1 => URL_SAFE_NO_PAD.encode(&bytes),
                2 => encoded.trim_end_matches('=').to_string(),
                _ => format!("  {encoded}\t"),
            };
            prop_assert_eq!(header::decode_payment(&text), Ok(payment));
            Ok(())
        })
        .unwrap();

    let text = prop_oneof![
        "\\PC{0,200}",
        "[A-Za-z0-9+/=_-]{0,200}",
        json_any().prop_map(|v| header::encode(&v)),
        (0usize..64).prop_map(|n| "A".repeat(MAX_HEADER_LEN + 1 + n)),
    ];
    runner(cases() * 10)
        .run(&text, |text| {
            let payment = header::decode_payment(&text);
            let json = header::decode_json(&text);
            if text.trim().len() > MAX_HEADER_LEN {
                prop_assert!(matches!(payment, Err(HeaderError::TooLarge(_))));
                return Ok(());
            }
            if let Ok(json) = json {
                let again = header::encode(&json);
                prop_assert!(again.len() % 4 == 0 && !again.contains(['-', '_']));
                if !has_float(&json) {
                    prop_assert_eq!(header::decode_json(&again), Ok(json));
                }
            }
            if let Ok(payment) = payment {
                let json = payment.to_json();
                if !has_float(&json) {
                    prop_assert_eq!(header::decode_payment(&header::encode(&json)), Ok(payment));
                }
            }
            Ok(())
        })
        .unwrap();
}
