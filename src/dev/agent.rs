//! The demo agent: an autonomous client that buys access from a running gateway and uses it, printing every step.
//!
//! It does what an agent that has never seen this gateway would do, with nothing but a funded wallet: a keyless
//! `POST /v1/chat/completions` → 402 → reads the catalog in the body → picks a product → pays with a USDC transfer
//! → waits for the confirmations the catalog asks for → signs the catalog's claim text (EIP-191) → claims → gets a
//! key → streams a completion → reads `/v1/usage`. Once for credits and once for a pool block (the block that is
//! open now by the gateway's clock, read from its `Date` header). Any step that does not do what it should stops
//! the run with [`DemoError`], naming the step.
//!
//! It only runs against the dev chain (chain id 31337): it pays with throwaway keys, and on an idle dev chain it
//! mines blocks itself (`evm_mine`) to reach the confirmations.

use std::io::Write;
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::usdc::Usdc;

alloy::sol! {
    /// The part of ERC-20 the agent needs (real USDC has the same functions).
    #[sol(rpc)]
    interface IERC20 {
        function transfer(address to, uint256 value) external returns (bool);
        function balanceOf(address owner) external view returns (uint256);
        function approve(address spender, uint256 value) external returns (bool);
        function allowance(address owner, address spender) external view returns (uint256);
    }
}

/// The only chain the demo agent pays on.
pub const DEMO_CHAIN_ID: u64 = super::DEV_CHAIN_ID;
/// The steps of one journey, in order.
pub const STEPS: [&str; 9] = [
    "keyless request",
    "read the catalog",
    "pick a product",
    "pay",
    "wait for confirmations",
    "sign the claim",
    "claim the key",
    "stream a completion",
    "read usage",
];
/// The steps of the keyless pay-per-token journey (x402 `upto`), in order.
pub const UPTO_STEPS: [&str; 7] = [
    "keyless request",
    "read the upto offer",
    "approve Permit2",
    "sign the authorization",
    "stream a completion",
    "read the receipt",
    "check the chain",
];
/// How long any one wait (mining, confirmations, the indexer) may take.
const WAIT: Duration = Duration::from_secs(120);
/// With the head unchanged this long, the agent mines a block on the dev chain.
const IDLE_BEFORE_MINING: Duration = Duration::from_secs(3);

/// What to buy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Journey {
    /// Prepaid credits (the catalog's minimum top-up), metered per token.
    Credits,
    /// A pool subscription for the daily block open now.
    Pool,
    /// No key: one streamed completion paid with a standard x402 `upto` authorization (Permit2), settled for its
    /// exact metered cost.
    Upto,
}

impl Journey {
    fn name(self) -> &'static str {
        match self {
            Journey::Credits => "credits",
            Journey::Pool => "pool",
            Journey::Upto => "upto",
        }
    }

    /// The journey's steps.
    pub fn steps(self) -> &'static [&'static str] {
        match self {
            Journey::Upto => &UPTO_STEPS,
            _ => &STEPS,
        }
    }
}

/// Why the demo failed: the step and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo failed at [{journey} {n}/{total}] {step}: {message}")]
    Step {
        journey: &'static str,
        n: usize,
        total: usize,
        step: &'static str,
        message: String,
    },
    #[error("demo could not start: {0}")]
    Setup(String),
}

/// Where the agent goes and with what wallet.
pub struct AgentConfig {
    /// The gateway's base URL, e.g. `http://127.0.0.1:8402`.
    pub gateway: String,
    /// JSON-RPC URL of the chain the gateway indexes.
    pub rpc: String,
    /// The paying wallet (a throwaway dev key).
    pub wallet: PrivateKeySigner,
    /// The model to ask for in the keyless request (the catalog decides what is bought).
    pub model: String,
    pub journeys: Vec<Journey>,
}

/// Runs every journey in `config`, printing each step to stdout.
pub async fn run(config: AgentConfig) -> Result<(), DemoError> {
    let mut agent = Agent::new(config).await?;
    let journeys = agent.config.journeys.clone();
    println!(
        "demo agent: wallet {:#x} (dev-only key), gateway {}, chain {}",
        agent.config.wallet.address(),
        agent.base,
        agent.config.rpc
    );
    let started = Instant::now();
    for journey in &journeys {
        agent.journey(*journey).await?;
    }
    println!(
        "\ndemo passed: {} journeys ({}), {} of {} steps OK in {:.1} s",
        journeys.len(),
        journeys
            .iter()
            .map(|j| j.name())
            .collect::<Vec<_>>()
            .join(" + "),
        journeys.iter().map(|j| j.steps().len()).sum::<usize>(),
        journeys.iter().map(|j| j.steps().len()).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the catalog says about paying and claiming.
struct Catalog {
    chain_id: u64,
    asset: Address,
    pay_to: Address,
    confirmations: u64,
    claim_message: String,
    rotate_message: Option<String>,
    rotate_endpoint: Option<String>,
    products: Vec<Value>,
}

/// What was picked: the amount to pay and the claim to make.
struct Pick {
    amount: Usdc,
    endpoint: String,
    body: serde_json::Map<String, Value>,
    /// For pools: the pool's models; for credits: none (any model).
    models: Vec<String>,
}

struct Agent {
    config: AgentConfig,
    base: String,
    http: reqwest::Client,
    provider: DynProvider,
    chain_id: u64,
    journey: &'static str,
    steps: &'static [&'static str],
    step: usize,
    /// The gateway's clock at its last answer (unix seconds), from `Date`.
    gateway_now: Option<i64>,
}

impl Agent {
    async fn new(config: AgentConfig) -> Result<Agent, DemoError> {
        let rpc_url = config
            .rpc
            .parse()
            .map_err(|e| DemoError::Setup(format!("--rpc `{}`: {e}", config.rpc)))?;
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(config.wallet.clone()))
            .connect_http(rpc_url)
            .erased();
        let chain_id = provider.get_chain_id().await.map_err(|e| {
            DemoError::Setup(format!("reading the chain id from {}: {e}", config.rpc))
        })?;
        if chain_id != DEMO_CHAIN_ID {
            return Err(DemoError::Setup(format!(
                "the RPC serves chain {chain_id}; the demo agent pays with throwaway keys and only runs on the dev \
                 chain {DEMO_CHAIN_ID}"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| DemoError::Setup(format!("HTTP client: {e}")))?;
        Ok(Agent {
            base: config.gateway.trim_end_matches('/').to_string(),
            config,
            http,
            provider,
            chain_id,
            journey: "",
            steps: &STEPS,
            step: 0,
            gateway_now: None,
        })
    }

    /// Starts step `n` (1-based) and prints its header.
    fn begin(&mut self, n: usize, detail: impl std::fmt::Display) {
        self.step = n;
        println!(
            "[{} {n}/{}] {}: {detail}",
            self.journey,
            self.steps.len(),
            self.steps[n - 1]
        );
    }

    /// A line under the current step.
    fn note(&self, text: impl std::fmt::Display) {
        println!("      {text}");
    }

    fn fail(&self, message: impl Into<String>) -> DemoError {
        let message = message.into();
        println!(
            "[{} {}/{}] {}: FAILED: {message}",
            self.journey,
            self.step,
            self.steps.len(),
            self.steps[self.step.saturating_sub(1)]
        );
        DemoError::Step {
            journey: self.journey,
            n: self.step,
            total: self.steps.len(),
            step: self.steps[self.step.saturating_sub(1)],
            message,
        }
    }

    fn url(&self, endpoint: &str) -> String {
        if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            endpoint.to_string()
        } else {
            format!("{}{endpoint}", self.base)
        }
    }

    /// Remembers the gateway's clock from a response's `Date`.
    fn clock_from(&mut self, headers: &reqwest::header::HeaderMap) {
        if let Some(t) = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date)
        {
            self.gateway_now = Some(t);
        }
    }

    async fn journey(&mut self, journey: Journey) -> Result<(), DemoError> {
        self.journey = journey.name();
        self.steps = journey.steps();
        println!("\n== {} journey ==", journey.name());
        if journey == Journey::Upto {
            return self.upto_journey().await;
        }

        // 1. A request without a key gets the 402 and the catalog.
        self.begin(
            1,
            format!(
                "POST {}/v1/chat/completions without a key (model {})",
                self.base, self.config.model
            ),
        );
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&json!({"model": self.config.model, "messages": [{"role": "user", "content": "Hello"}]}))
            .send()
            .await
            .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
        let status = resp.status();
        self.clock_from(resp.headers());
        let body: Value = resp
            .json()
            .await
            .map_err(|e| self.fail(format!("HTTP {status}, body is not JSON: {e}")))?;
        if status != StatusCode::PAYMENT_REQUIRED || !body["x402"].is_object() {
            return Err(self.fail(format!(
                "expected 402 with an x402 catalog, got HTTP {status}: {body}"
            )));
        }
        self.note(format!(
            "→ {status}: {}",
            body["message"].as_str().unwrap_or("(no message)")
        ));

        // 2. Read the catalog.
        self.begin(2, "the 402 body's x402 object");
        let catalog = self.read_catalog(&body["x402"])?;

        // 3. Pick a product.
        let pick = match journey {
            Journey::Pool => self.pick_pool(&catalog)?,
            _ => self.pick_credits(&catalog)?,
        };

        // 4. Pay.
        let (tx_hash, block) = self.pay(&catalog, pick.amount).await?;

        // 5. Wait for the confirmations the catalog asks for.
        self.wait_confirmations(block, catalog.confirmations)
            .await?;

        // 6. Sign the claim text.
        let message = catalog.claim_message.replace("{txHash}", &tx_hash);
        self.begin(6, format!("personal_sign(\"{message}\")"));
        let signature = self
            .config
            .wallet
            .sign_message_sync(message.as_bytes())
            .map_err(|e| self.fail(format!("signing: {e}")))?;
        let signature = format!("0x{}", alloy::hex::encode(signature.as_bytes()));
        self.note(format!("→ {}…", &signature[..20]));

        // 7. Claim: the key.
        let mut body = pick.body.clone();
        body.insert("txHash".into(), json!(tx_hash));
        body.insert("signature".into(), json!(signature));
        let key = self.claim(&catalog, &pick.endpoint, body).await?;

        // 8. Stream a completion with the key.
        let model = self.choose_model(&key, &pick).await?;
        self.stream_completion(&key, &model).await?;

        // 9. Usage.
        self.read_usage(&key, journey).await
    }

    fn read_catalog(&self, x402: &Value) -> Result<Catalog, DemoError> {
        let address = |field: &str| -> Result<Address, DemoError> {
            x402[field]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.fail(format!("x402.{field} is missing or not an address")))
        };
        let chain_id = x402["chainId"]
            .as_u64()
            .ok_or_else(|| self.fail("x402.chainId is missing"))?;
        if chain_id != self.chain_id {
            return Err(self.fail(format!(
                "the catalog asks for payment on chain {chain_id}, but the RPC serves chain {}: refusing to pay",
                self.chain_id
            )));
        }
        let claim = &x402["claim"];
        let claim_message = claim["message"]
            .as_str()
            .filter(|m| m.contains("{txHash}"))
            .ok_or_else(|| self.fail("x402.claim.message (with {txHash}) is missing"))?
            .to_string();
        let catalog = Catalog {
            chain_id,
            asset: address("assetAddress")?,
            pay_to: address("payTo")?,
            confirmations: claim["confirmations"].as_u64().unwrap_or(1).max(1),
            claim_message,
            rotate_message: x402["keyRotation"]["message"].as_str().map(str::to_string),
            rotate_endpoint: x402["keyRotation"]["endpoint"].as_str().map(str::to_string),
            products: x402["products"].as_array().cloned().unwrap_or_default(),
        };
        self.note(format!(
            "pay {} {:#x} on chain {} to {:#x}; {} confirmations; claim text \"{}\"",
            x402["asset"].as_str().unwrap_or("USDC"),
            catalog.asset,
            catalog.chain_id,
            catalog.pay_to,
            catalog.confirmations,
            catalog.claim_message
        ));
        for p in &catalog.products {
            match p["type"].as_str() {
                Some("subscription") => self.note(format!(
                    "product: pool `{}` ({}), {} days, blocks {}",
                    p["pool"].as_str().unwrap_or("?"),
                    p["models"]
                        .as_array()
                        .map(|m| m
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default(),
                    p["durationDays"],
                    p["blocks"]
                        .as_array()
                        .map(|bs| bs
                            .iter()
                            .map(|b| format!(
                                "{} {} {} USDC ({} seats left)",
                                b["block"].as_str().unwrap_or("?"),
                                b["hoursUtc"].as_str().unwrap_or("?"),
                                b["priceUsdc"].as_str().unwrap_or("?"),
                                b["availableSeats"]
                            ))
                            .collect::<Vec<_>>()
                            .join("; "))
                        .unwrap_or_default()
                )),
                Some("credits") => self.note(format!(
                    "product: credits, at least {} USDC, metered per token",
                    p["minAmount"].as_str().unwrap_or("?")
                )),
                other => self.note(format!("product of type {other:?} (ignored)")),
            }
        }
        if catalog.products.is_empty() {
            return Err(self.fail("the catalog lists no products"));
        }
        Ok(catalog)
    }

    fn pick_credits(&mut self, catalog: &Catalog) -> Result<Pick, DemoError> {
        self.step = 3;
        let product = catalog
            .products
            .iter()
            .find(|p| p["type"] == "credits")
            .ok_or_else(|| self.fail("the catalog sells no credits"))?;
        let amount: Usdc = product["minAmount"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.fail("credits.minAmount is missing"))?;
        let endpoint = product["agentTopup"]["endpoint"]
            .as_str()
            .unwrap_or("/api/agent/topup")
            .to_string();
        self.begin(
            3,
            format!("credits: the minimum top-up, {amount} USDC → POST {endpoint}"),
        );
        let mut body = serde_json::Map::new();
        body.insert("amount".into(), json!(amount.to_string()));
        Ok(Pick {
            amount,
            endpoint,
            body,
            models: Vec::new(),
        })
    }

    fn pick_pool(&mut self, catalog: &Catalog) -> Result<Pick, DemoError> {
        self.step = 3;
        let now = match self.gateway_now {
            Some(t) => t,
            None => {
                let t = crate::store::now_unix();
                self.note("the gateway sent no Date header: using this machine's clock");
                t
            }
        };
        let minute = ((now.rem_euclid(86_400)) / 60) as u32;
        for product in catalog
            .products
            .iter()
            .filter(|p| p["type"] == "subscription")
        {
            let Some(blocks) = product["blocks"].as_array() else {
                continue;
            };
            let parsed: Vec<(String, u32, u32, Usdc, u64)> = blocks
                .iter()
                .filter_map(|b| {
                    let (start, end) = parse_hours(b["hoursUtc"].as_str()?)?;
                    Some((
                        b["block"].as_str()?.to_string(),
                        start,
                        end,
                        b["priceUsdc"].as_str()?.parse().ok()?,
                        b["availableSeats"].as_u64().unwrap_or(0),
                    ))
                })
                .collect();
            let Some(open) = parsed
                .iter()
                .find(|(_, start, end, _, seats)| *start <= minute && minute < *end && *seats > 0)
            else {
                continue;
            };
            let mut chosen = vec![open.clone()];
            // So close to the block's end that the completion might land after it: take the next block too.
            if open.2 - minute < 10
                && let Some(next) = parsed
                    .iter()
                    .find(|b| b.1 == open.2 % 1440 && b.4 > 0 && b.0 != open.0)
            {
                chosen.push(next.clone());
            }
            let amount = chosen
                .iter()
                .try_fold(0i64, |sum, b| sum.checked_add(b.3.atomic()))
                .map(Usdc)
                .ok_or_else(|| self.fail("block prices overflow"))?;
            let slug = product["pool"]
                .as_str()
                .ok_or_else(|| self.fail("a pool product has no `pool` slug"))?;
            let endpoint = product["agentCheckout"]["endpoint"]
                .as_str()
                .unwrap_or("/api/agent/subscribe-pool")
                .to_string();
            let names: Vec<String> = chosen.iter().map(|b| b.0.clone()).collect();
            self.begin(
                3,
                format!(
                    "pool `{slug}` block {} (open now: {:02}:{:02} UTC by the gateway's clock), {amount} USDC → POST {endpoint}",
                    names.join(" + "),
                    minute / 60,
                    minute % 60
                ),
            );
            let mut body = serde_json::Map::new();
            body.insert("poolSlug".into(), json!(slug));
            body.insert("blocks".into(), json!(names));
            return Ok(Pick {
                amount,
                endpoint,
                body,
                models: product["models"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Err(self.fail(format!(
            "no pool has a block open at {:02}:{:02} UTC (the gateway's clock) with a free seat",
            minute / 60,
            minute % 60
        )))
    }

    /// The keyless pay-per-token journey: the 402's `upto` offer (a maximum for this request), a one-time Permit2
    /// approval, a Permit2 witness signature for the maximum, one streamed completion, and the receipt at the end of
    /// the stream: what moved on chain is the metered cost, not the maximum.
    async fn upto_journey(&mut self) -> Result<(), DemoError> {
        let body = |model: &str| {
            json!({
                "model": model,
                "stream": true,
                "max_tokens": 24,
                "messages": [{"role": "user", "content": "Say hello to the agent paying you by the token"}],
            })
        };
        // 1. The catalog names the models sold per token.
        self.begin(
            1,
            format!(
                "POST {}/v1/chat/completions without a key or a payment",
                self.base
            ),
        );
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body(&self.config.model))
            .send()
            .await
            .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
        let status = resp.status();
        let catalog: Value = resp.json().await.unwrap_or(Value::Null);
        let Some(model) = catalog["x402"]["models"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["upto"] == true))
            .and_then(|m| m["id"].as_str())
            .map(str::to_string)
        else {
            return Err(self.fail(format!(
                "HTTP {status}: the catalog names no model sold per token (`upto`)"
            )));
        };
        self.note(format!(
            "→ {status}; `{model}` is sold per token (x402 upto)"
        ));

        // 2. The 402 for this very request offers its worst case as the maximum.
        self.begin(
            2,
            format!("the PAYMENT-REQUIRED of a keyless request to `{model}`"),
        );
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body(&model))
            .send()
            .await
            .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
        let required = resp
            .headers()
            .get("PAYMENT-REQUIRED")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::x402::header::decode_json(v).ok())
            .ok_or_else(|| self.fail(format!("HTTP {}: no PAYMENT-REQUIRED", resp.status())))?;
        let offer = required["accepts"]
            .as_array()
            .and_then(|a| a.iter().find(|o| o["scheme"] == "upto"))
            .cloned()
            .ok_or_else(|| self.fail(format!("no upto offer in {required}")))?;
        let parse = |v: &Value| -> Option<Address> { v.as_str()?.parse().ok() };
        let (Some(asset), Some(pay_to), Some(facilitator)) = (
            parse(&offer["asset"]),
            parse(&offer["payTo"]),
            parse(&offer["extra"]["facilitatorAddress"]),
        ) else {
            return Err(self.fail(format!("the upto offer is incomplete: {offer}")));
        };
        let max: U256 = offer["amount"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| self.fail(format!("the upto offer has no amount: {offer}")))?;
        self.note(format!(
            "scheme upto, at most {} USDC to {pay_to:#x}, settled by {facilitator:#x}",
            usdc_of(max)
        ));

        // 3. Permit2 may move this wallet's USDC (once per wallet; a real agent approves what it means to spend).
        let permit2 = crate::x402::permit2::PERMIT2_ADDRESS;
        self.begin(3, format!("ERC-20 approve of Permit2 {permit2:#x}"));
        let token = IERC20::new(asset, self.provider.clone());
        let me = self.config.wallet.address();
        let allowance = token
            .allowance(me, permit2)
            .call()
            .await
            .map_err(|e| self.fail(format!("reading the allowance: {e}")))?;
        if allowance < max {
            let pending = token
                .approve(permit2, U256::from(100_000_000u64))
                .send()
                .await
                .map_err(|e| self.fail(format!("sending the approval: {e}")))?;
            let receipt = self
                .mined(async { pending.get_receipt().await })
                .await
                .map_err(|e| self.fail(format!("waiting for the approval: {e}")))?;
            if !receipt.status() {
                return Err(self.fail("the approval reverted"));
            }
            self.note("approved 100 USDC to Permit2 (one transaction, once)");
        } else {
            self.note(format!("already approved ({} USDC)", usdc_of(allowance)));
        }

        // 4. Sign the Permit2 witness transfer for the maximum: payTo and the facilitator are bound.
        self.begin(
            4,
            "EIP-712 PermitWitnessTransferFrom (Permit2 domain) for the maximum",
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let timeout = offer["maxTimeoutSeconds"].as_u64().unwrap_or(300);
        let auth = crate::x402::upto::Permit2Authorization {
            from: me,
            permitted: crate::x402::upto::Permitted {
                token: asset,
                amount: max,
            },
            spender: crate::x402::permit2::UPTO_PROXY_ADDRESS,
            nonce: U256::from_be_bytes(rand::random::<[u8; 32]>()),
            deadline: U256::from(now + timeout),
            witness: crate::x402::upto::UptoWitness {
                to: pay_to,
                facilitator,
                valid_after: U256::from(now.saturating_sub(600)),
            },
        };
        let digest = crate::x402::upto::digest(&auth, self.chain_id);
        let signature = self
            .config
            .wallet
            .sign_hash_sync(&digest)
            .map_err(|e| self.fail(format!("signing: {e}")))?;
        let payment = crate::x402::header::encode(&json!({
            "x402Version": 2,
            "accepted": offer,
            "payload": {
                "signature": format!("0x{}", alloy::hex::encode(signature.as_bytes())),
                "permit2Authorization": auth,
            },
        }));
        self.note(format!("nonce {:#x}, valid for {timeout} s", auth.nonce));

        // 5. The same request with PAYMENT-SIGNATURE: served, metered, then settled.
        let before = token
            .balanceOf(me)
            .call()
            .await
            .map_err(|e| self.fail(format!("reading the balance: {e}")))?;
        self.begin(
            5,
            format!("the same request with PAYMENT-SIGNATURE (model {model})"),
        );
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .header("PAYMENT-SIGNATURE", payment)
            .json(&body(&model))
            .send()
            .await
            .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.fail(format!("HTTP {status}: {text}")));
        }
        let status_path = resp
            .headers()
            .get("x-payment-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut receipt = Value::Null;
        let mut chunks = 0u64;
        print!("      > ");
        let _ = std::io::stdout().flush();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.fail(format!("the stream broke: {e}")))?;
            buf.extend_from_slice(&piece);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..pos + 2).collect();
                let event = String::from_utf8_lossy(&event).to_string();
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data:").map(str::trim))
                    .unwrap_or_default();
                if event.starts_with("event: x402.payment-response") {
                    receipt = serde_json::from_str(data).unwrap_or(Value::Null);
                } else if let Ok(chunk) = serde_json::from_str::<Value>(data)
                    && let Some(content) = chunk["choices"][0]["delta"]["content"].as_str()
                {
                    chunks += 1;
                    print!("{content}");
                    let _ = std::io::stdout().flush();
                }
            }
        }
        println!();
        if chunks == 0 {
            return Err(self.fail("the stream carried no content"));
        }
        self.note(format!("{chunks} chunks"));

        // 6. The stream's last event is the settlement of its metered cost.
        self.begin(6, "the stream's last event, x402.payment-response");
        if receipt["success"] != true {
            return Err(self.fail(format!("the payment did not settle: {receipt}")));
        }
        let paid: U256 = receipt["amount"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| self.fail(format!("the receipt has no amount: {receipt}")))?;
        self.note(format!(
            "settled {} USDC of at most {} in tx {}{}",
            usdc_of(paid),
            usdc_of(max),
            receipt["transaction"].as_str().unwrap_or("?"),
            status_path
                .map(|p| format!("; status at {}{p}", self.base))
                .unwrap_or_default()
        ));

        // 7. The chain agrees: the wallet paid exactly the metered cost.
        self.begin(7, "the wallet's USDC balance before and after");
        let after = token
            .balanceOf(me)
            .call()
            .await
            .map_err(|e| self.fail(format!("reading the balance: {e}")))?;
        if before.saturating_sub(after) != paid {
            return Err(self.fail(format!(
                "the wallet paid {} USDC, the receipt says {}",
                usdc_of(before.saturating_sub(after)),
                usdc_of(paid)
            )));
        }
        self.note(format!(
            "{} → {} USDC: exactly the metered cost",
            usdc_of(before),
            usdc_of(after)
        ));
        Ok(())
    }

    async fn pay(&mut self, catalog: &Catalog, amount: Usdc) -> Result<(String, u64), DemoError> {
        self.begin(
            4,
            format!(
                "transfer {amount} USDC to payTo {:#x} (ERC-20 transfer on chain {})",
                catalog.pay_to, self.chain_id
            ),
        );
        let token = IERC20::new(catalog.asset, &self.provider);
        let me = self.config.wallet.address();
        let balance = token
            .balanceOf(me)
            .call()
            .await
            .map_err(|e| self.fail(format!("reading the wallet's USDC balance: {e}")))?;
        let atomic =
            U256::from(u64::try_from(amount.atomic()).map_err(|_| self.fail("negative amount"))?);
        if balance < atomic {
            return Err(self.fail(format!(
                "wallet {me:#x} holds {} USDC, less than {amount}",
                usdc_of(balance)
            )));
        }
        self.note(format!("wallet {me:#x} holds {} USDC", usdc_of(balance)));
        let pending = token
            .transfer(catalog.pay_to, atomic)
            .send()
            .await
            .map_err(|e| self.fail(format!("sending the transfer: {e}")))?;
        let tx_hash = format!("{:#x}", pending.tx_hash());
        self.note(format!("sent tx {tx_hash}"));
        let receipt = self
            .mined(async { pending.get_receipt().await })
            .await
            .map_err(|e| self.fail(format!("waiting for tx {tx_hash} to be mined: {e}")))?;
        if !receipt.status() {
            return Err(self.fail(format!("tx {tx_hash} reverted")));
        }
        let block = receipt
            .block_number
            .ok_or_else(|| self.fail("the receipt has no block number"))?;
        self.note(format!("mined in block {block}"));
        Ok((tx_hash, block))
    }

    /// Waits for `fut` (a receipt), mining blocks on an idle dev chain so it can complete.
    async fn mined<T, E: std::fmt::Display>(
        &self,
        fut: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        tokio::pin!(fut);
        let deadline = Instant::now() + WAIT;
        loop {
            tokio::select! {
                r = &mut fut => return r.map_err(|e| e.to_string()),
                _ = tokio::time::sleep(IDLE_BEFORE_MINING) => {
                    if Instant::now() > deadline {
                        return Err(format!("not mined within {WAIT:?}"));
                    }
                    self.mine().await?;
                }
            }
        }
    }

    /// `evm_mine`, only ever on the dev chain.
    async fn mine(&self) -> Result<(), String> {
        if self.chain_id != DEMO_CHAIN_ID {
            return Err("not the dev chain: the agent never mines here".into());
        }
        self.provider
            .raw_request::<_, Value>("evm_mine".into(), ())
            .await
            .map(|_| ())
            .map_err(|e| format!("evm_mine: {e}"))
    }

    async fn wait_confirmations(&mut self, block: u64, required: u64) -> Result<(), DemoError> {
        self.begin(
            5,
            format!("the catalog asks for {required}; the payment's block counts as 1"),
        );
        let deadline = Instant::now() + WAIT;
        let mut last_head = 0u64;
        let mut last_change = Instant::now();
        let mut shown = 0u64;
        loop {
            let head = self
                .provider
                .get_block_number()
                .await
                .map_err(|e| self.fail(format!("reading the chain head: {e}")))?;
            let confirmations = head.saturating_sub(block) + 1;
            if confirmations != shown {
                shown = confirmations;
                self.note(format!(
                    "{}/{required} confirmations (head {head}) {}",
                    confirmations.min(required),
                    progress_bar(confirmations.min(required), required)
                ));
            }
            if confirmations >= required {
                return Ok(());
            }
            if head != last_head {
                last_head = head;
                last_change = Instant::now();
            } else if last_change.elapsed() >= IDLE_BEFORE_MINING {
                self.mine().await.map_err(|e| self.fail(e))?;
                self.note("(the dev chain was idle: mined a block with evm_mine)");
                last_change = Instant::now();
            }
            if Instant::now() > deadline {
                return Err(self.fail(format!(
                    "only {confirmations} of {required} confirmations after {WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Posts the claim until the gateway has indexed the confirmations (202/404 with `Retry-After`), then reads
    /// the key from the answer (rotating it when the account's key was issued earlier).
    async fn claim(
        &mut self,
        catalog: &Catalog,
        endpoint: &str,
        body: serde_json::Map<String, Value>,
    ) -> Result<String, DemoError> {
        let url = self.url(endpoint);
        self.begin(7, format!("POST {url}"));
        let deadline = Instant::now() + WAIT;
        let data = loop {
            let resp = self
                .http
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
            let status = resp.status();
            self.clock_from(resp.headers());
            let retry = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            let answer: Value = resp
                .json()
                .await
                .map_err(|e| self.fail(format!("HTTP {status}, body is not JSON: {e}")))?;
            if status == StatusCode::OK && answer["success"] == true {
                break answer["data"].clone();
            }
            let code = answer["error"]["code"].as_str().unwrap_or("");
            if (status == StatusCode::ACCEPTED || status == StatusCode::NOT_FOUND)
                && matches!(code, "pending" | "not_indexed")
                && Instant::now() < deadline
            {
                // The indexer polls the chain; it may be a moment behind the head the agent saw.
                self.note(format!(
                    "→ {status} {code}: {} (retrying in {}s)",
                    answer["error"]["message"].as_str().unwrap_or(""),
                    retry.min(2)
                ));
                tokio::time::sleep(Duration::from_secs(retry.clamp(1, 2))).await;
                continue;
            }
            return Err(self.fail(format!("HTTP {status}: {answer}")));
        };
        let summary = match (data["credited"].as_bool(), data["pool"].as_str()) {
            (Some(true), _) => format!(
                "credited {} USDC, balance {} USDC",
                data["amountUsdc"].as_str().unwrap_or("?"),
                // `newBalance` is a JSON number (seed 000); the exact decimal is `newBalanceUsdc`.
                data["newBalanceUsdc"].as_str().unwrap_or("?")
            ),
            (_, Some(pool)) => format!(
                "pool {pool} blocks {} for {} USDC until {}",
                data["blocks"],
                data["amountUsdc"].as_str().unwrap_or("?"),
                data["expiresAt"].as_str().unwrap_or("?")
            ),
            _ => data.to_string(),
        };
        self.note(format!("→ 200 OK: {summary}"));
        if let Some(key) = data["apiKey"].as_str() {
            self.note(format!("→ API key {} (shown once)", redact(key)));
            return Ok(key.to_string());
        }
        // A later top-up credits the account's existing key, shown once when it was minted (an earlier run).
        // The payer gets a usable key back the documented way: rotation, signed by the same wallet.
        self.note("this account's credit key was issued by an earlier purchase and is shown only once: rotating it");
        self.rotate(catalog, "credit").await
    }

    async fn rotate(&mut self, catalog: &Catalog, kind: &str) -> Result<String, DemoError> {
        let template = catalog
            .rotate_message
            .clone()
            .ok_or_else(|| self.fail("the catalog has no keyRotation.message"))?;
        let endpoint = catalog
            .rotate_endpoint
            .clone()
            .unwrap_or_else(|| "/api/agent/keys/rotate".into());
        let address = format!("{:#x}", self.config.wallet.address());
        let signed_at = self.gateway_now.unwrap_or_else(crate::store::now_unix);
        let text = template
            .replace("{address}", &address)
            .replace("{signedAt}", &signed_at.to_string());
        let signature = self
            .config
            .wallet
            .sign_message_sync(text.as_bytes())
            .map_err(|e| self.fail(format!("signing the rotation: {e}")))?;
        let url = self.url(&endpoint);
        self.note(format!("POST {url} signed \"{text}\""));
        let resp = self
            .http
            .post(&url)
            .json(&json!({
                "address": address,
                "signedAt": signed_at,
                "signature": format!("0x{}", alloy::hex::encode(signature.as_bytes())),
            }))
            .send()
            .await
            .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
        let status = resp.status();
        let answer: Value = resp
            .json()
            .await
            .map_err(|e| self.fail(format!("HTTP {status}, body is not JSON: {e}")))?;
        let key = answer["data"]["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|k| k["kind"] == kind)
            .and_then(|k| k["apiKey"].as_str())
            .ok_or_else(|| {
                self.fail(format!(
                    "rotation gave no {kind} key: HTTP {status}: {answer}"
                ))
            })?;
        self.note(format!(
            "→ new API key {} (the old one is revoked)",
            redact(key)
        ));
        Ok(key.to_string())
    }

    /// The model to call: one of the pool's models for a pool key, else the first the key may call.
    async fn choose_model(&mut self, key: &str, pick: &Pick) -> Result<String, DemoError> {
        self.step = 8;
        let resp = self
            .http
            .get(format!("{}/v1/models", self.base))
            .bearer_auth(key)
            .send()
            .await
            .map_err(|e| self.fail(format!("GET /v1/models: {e}")))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| self.fail(format!("GET /v1/models: HTTP {status}, not JSON: {e}")))?;
        let models: Vec<String> = body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect();
        if status != StatusCode::OK || models.is_empty() {
            return Err(self.fail(format!(
                "GET /v1/models with the key: HTTP {status}: {body}"
            )));
        }
        let preferred = if pick.models.contains(&self.config.model) || pick.models.is_empty() {
            self.config.model.clone()
        } else {
            pick.models[0].clone()
        };
        Ok(if models.contains(&preferred) {
            preferred
        } else {
            models[0].clone()
        })
    }

    async fn stream_completion(&mut self, key: &str, model: &str) -> Result<(), DemoError> {
        self.begin(
            8,
            format!(
                "POST {}/v1/chat/completions, model {model}, \"stream\": true",
                self.base
            ),
        );
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(&json!({
                "model": model,
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 12,
                "messages": [{"role": "user", "content": "Say hello to the agent that just paid for you"}],
            }))
            .send()
            .await
            .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.fail(format!("HTTP {status}: {text}")));
        }
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            return Err(self.fail("the answer is not an SSE stream (text/event-stream)"));
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut text = String::new();
        let mut chunks = 0u64;
        let mut usage = Value::Null;
        let mut done = false;
        print!("      > ");
        let _ = std::io::stdout().flush();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.fail(format!("the stream broke: {e}")))?;
            buf.extend_from_slice(&piece);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..pos + 2).collect();
                for line in String::from_utf8_lossy(&event).lines() {
                    let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                        continue;
                    };
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str() {
                        chunks += 1;
                        text.push_str(content);
                        print!("{content}");
                        let _ = std::io::stdout().flush();
                    }
                    if chunk["usage"].is_object() {
                        usage = chunk["usage"].clone();
                    }
                }
            }
        }
        println!();
        if chunks == 0 || !done {
            return Err(self.fail(format!(
                "the stream ended after {chunks} content chunks{}",
                if done { "" } else { " without data: [DONE]" }
            )));
        }
        self.note(format!(
            "{chunks} chunks, data: [DONE]; usage {} prompt + {} completion tokens",
            usage["prompt_tokens"], usage["completion_tokens"]
        ));
        Ok(())
    }

    async fn read_usage(&mut self, key: &str, journey: Journey) -> Result<(), DemoError> {
        self.begin(9, format!("GET {}/v1/usage", self.base));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let resp = self
                .http
                .get(format!("{}/v1/usage", self.base))
                .bearer_auth(key)
                .send()
                .await
                .map_err(|e| self.fail(format!("the gateway did not answer: {e}")))?;
            let status = resp.status();
            let usage: Value = resp
                .json()
                .await
                .map_err(|e| self.fail(format!("HTTP {status}, body is not JSON: {e}")))?;
            if status != StatusCode::OK {
                return Err(self.fail(format!("HTTP {status}: {usage}")));
            }
            // The row is written when the request starts (`in_flight`, with a reservation) and settled when the
            // stream ends, which may trail the last byte the agent read by a moment.
            let settled = usage["recent"]
                .as_array()
                .and_then(|r| r.first())
                .is_some_and(|row| row["status"].as_str().is_some_and(|s| s != "in_flight"));
            let expected_kind = match journey {
                Journey::Pool => "subscription",
                _ => "credit",
            };
            if usage["key"]["kind"] != expected_kind {
                return Err(self.fail(format!(
                    "expected a {expected_kind} key, /v1/usage says {}",
                    usage["key"]["kind"]
                )));
            }
            if !settled {
                if Instant::now() > deadline {
                    return Err(
                        self.fail(format!("the completion is not in recent usage: {usage}"))
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let last = &usage["recent"][0];
            if last["status"] != "ok" {
                return Err(self.fail(format!(
                    "the completion was recorded as {}: {last}",
                    last["status"]
                )));
            }
            match journey {
                Journey::Credits | Journey::Upto => self.note(format!(
                    "→ credit key {}, balance {} USDC after the completion; last request {} tokens, cost {} USDC ({})",
                    usage["key"]["id"].as_str().unwrap_or("?"),
                    usage["credits"]["balanceUsdc"].as_str().unwrap_or("?"),
                    total_tokens(last),
                    last["costUsdc"].as_str().unwrap_or("?"),
                    last["status"].as_str().unwrap_or("?")
                )),
                Journey::Pool => {
                    if usage["subscription"]["activeNow"] != true {
                        return Err(self.fail(format!(
                            "the subscription is not active now: {}",
                            usage["subscription"]
                        )));
                    }
                    self.note(format!(
                        "→ subscription key {}, pool {} blocks {}, active now, expires {}; last request {} tokens",
                        usage["key"]["id"].as_str().unwrap_or("?"),
                        usage["subscription"]["pool"].as_str().unwrap_or("?"),
                        usage["subscription"]["blocks"]
                            .as_array()
                            .map(|bs| bs
                                .iter()
                                .filter_map(|b| b["name"].as_str())
                                .collect::<Vec<_>>()
                                .join("+"))
                            .unwrap_or_default(),
                        usage["subscription"]["expiresAt"].as_str().unwrap_or("?"),
                        total_tokens(last)
                    ))
                }
            }
            return Ok(());
        }
    }
}

fn total_tokens(row: &Value) -> String {
    match (
        row["promptTokens"].as_u64(),
        row["completionTokens"].as_u64(),
    ) {
        (Some(p), Some(c)) => format!("{p} + {c}"),
        _ => "?".into(),
    }
}

fn usdc_of(atomic: U256) -> String {
    i64::try_from(atomic)
        .map(|a| Usdc(a).to_string())
        .unwrap_or_else(|_| format!("{atomic} atomic units of"))
}

/// `sk-<public id>-<first 4 of the secret>…`: enough to recognise a key, not to use it.
pub fn redact(key: &str) -> String {
    match key.rsplit_once('-') {
        Some((head, secret)) => format!("{head}-{}…", secret.chars().take(4).collect::<String>()),
        None => "sk-…".into(),
    }
}

fn progress_bar(done: u64, total: u64) -> String {
    let total = total.clamp(1, 40);
    let done = done.min(total);
    format!(
        "[{}{}]",
        "#".repeat(done as usize),
        ".".repeat((total - done) as usize)
    )
}

/// `"08:00-16:00 UTC"` → minutes of the day `[start, end)`.
fn parse_hours(s: &str) -> Option<(u32, u32)> {
    let s = s.trim().trim_end_matches("UTC").trim();
    let (a, b) = s.split_once('-')?;
    let minutes = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        Some(h.parse::<u32>().ok()? * 60 + m.parse::<u32>().ok()?)
    };
    Some((minutes(a)?, minutes(b)?))
}

/// Unix seconds of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP servers send in `Date`.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace();
    let _weekday = parts.next()?;
    let day: i64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: i64 = hms.next()?.parse().ok()?;
    let m: i64 = hms.next()?.parse().ok()?;
    let sec: i64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_and_block_hours_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Sun, 29 Feb 2032 23:59:59 GMT"),
            Some(1_961_711_999)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_hours("08:00-16:00 UTC"), Some((480, 960)));
        assert_eq!(parse_hours("16:00-24:00 UTC"), Some((960, 1440)));
        assert_eq!(parse_hours("16-24"), None);
    }

    #[test]
    fn keys_are_redacted() {
        assert_eq!(
            redact("sk-cb691d966f233405-d3418d022328d65020ea"),
            "sk-cb691d966f233405-d341…"
        );
        assert_eq!(redact("nothing"), "sk-…");
    }
}
