//! The operator's TOML configuration: parsing, defaults, validation and network presets.
//!
//! Unknown keys are errors that name the key (serde `deny_unknown_fields`), so a typo never silently falls back to
//! a default. Secrets never live in the file: an RPC URL written as `"$NAME"` is read from the environment variable
//! `NAME` (provider URLs often embed an API key).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::Address;
use serde::Deserialize;

use crate::proxy::key_rates::{KeyRate, MAX_TOKENS_PER_MINUTE};
use crate::usdc::Usdc;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

pub mod svm;
pub use svm::{Commitment, SvmSettings};

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole configuration file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// The first network (`[chain]`): the catalog's top-level `network`/`payTo`/`asset`, and the default of claims.
    #[serde(default)]
    pub chain: Option<ChainConfig>,
    /// More networks agents may pay on (`[[networks]]`, the same keys as `[chain]`); without `[chain]` the first
    /// of them is the first network.
    #[serde(default)]
    pub networks: Vec<ChainConfig>,
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Pool subscriptions sold by 8-hour (or any) daily UTC blocks.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub credits: CreditsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// OpenAI-compatible backends: `[[upstreams]]`.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Models served, each on one or more upstreams with its prices: `[[models]]`.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Failover and cooldown of deployments.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Standard x402 payments (`PAYMENT-SIGNATURE`); absent = not offered.
    #[serde(default)]
    pub x402: Option<X402Config>,
    /// Unpaid traffic: per-client-IP rate limits and request timeouts (protective defaults when absent).
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[limits]` as written: what unpaid traffic may cost. Every key has a default, so an operator who writes nothing
/// is protected; tests that burst from one loopback address set `rate_limits = false`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Per-IP rate limits on keyless requests and claim attempts. `false` switches both off (load tests, or a
    /// gateway behind a proxy that limits); body limits and timeouts stay on.
    #[serde(default = "default_true")]
    pub rate_limits: bool,
    /// Keyless requests one client IP may make per minute (token bucket refill).
    #[serde(default = "default_keyless_per_minute")]
    pub keyless_per_minute: u32,
    /// Keyless requests one client IP may make at once before the refill rate applies (bucket size).
    #[serde(default = "default_keyless_burst")]
    pub keyless_burst: u32,
    /// Keyless requests from all clients together per minute: a flood from many addresses cannot take more.
    #[serde(default = "default_keyless_total_per_minute")]
    pub keyless_total_per_minute: u32,
    /// Keyless requests from all clients together at once.
    #[serde(default = "default_keyless_total_burst")]
    pub keyless_total_burst: u32,
    /// Claim attempts (`/api/agent/{subscribe-pool,topup,keys/rotate}`, `/x402/*`) per client IP per minute.
    #[serde(default = "default_claims_per_minute")]
    pub claims_per_minute: u32,
    /// Claim attempts one client IP may make at once.
    #[serde(default = "default_claims_burst")]
    pub claims_burst: u32,
    /// Claim attempts from all clients together per minute (each may cost an RPC call).
    #[serde(default = "default_claims_total_per_minute")]
    pub claims_total_per_minute: u32,
    /// Claim attempts from all clients together at once.
    #[serde(default = "default_claims_total_burst")]
    pub claims_total_burst: u32,
    /// Client IPs whose buckets are kept in memory (per limit); idle ones are evicted first when full.
    #[serde(default = "default_max_tracked_clients")]
    pub max_tracked_clients: u32,
    /// Longest time to receive a request body and answer it (not the streaming body of a completion).
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Longest time a connection may take to send a request's headers (slow-loris); also closes idle
    /// keep-alive connections after this long.
    #[serde(default = "default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Socket peers (IPs or CIDRs, e.g. your reverse proxy) whose `X-Forwarded-For` names the client. Empty: the
    /// client is always the socket peer and the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Requests one credit account (its key, and any key rotated from it) may have in flight at once. Each is
    /// reserved before it is forwarded, so this bounds the operator's exposure to one key, not its balance.
    #[serde(default = "default_credit_key_max_in_flight")]
    pub credit_key_max_in_flight: u32,
    /// API keys whose per-key rate buckets (`requests_per_minute`, `tokens_per_minute` of `[credits]` and
    /// `[[pools]]`) are kept in memory; keys with full buckets are forgotten first when full.
    #[serde(default = "default_max_rate_tracked_keys")]
    pub max_rate_tracked_keys: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            rate_limits: true,
            keyless_per_minute: default_keyless_per_minute(),
            keyless_burst: default_keyless_burst(),
            keyless_total_per_minute: default_keyless_total_per_minute(),
            keyless_total_burst: default_keyless_total_burst(),
            claims_per_minute: default_claims_per_minute(),
            claims_burst: default_claims_burst(),
            claims_total_per_minute: default_claims_total_per_minute(),
            claims_total_burst: default_claims_total_burst(),
            max_tracked_clients: default_max_tracked_clients(),
            request_timeout_secs: default_request_timeout_secs(),
            header_read_timeout_secs: default_header_read_timeout_secs(),
            trusted_proxies: Vec::new(),
            credit_key_max_in_flight: default_credit_key_max_in_flight(),
            max_rate_tracked_keys: default_max_rate_tracked_keys(),
        }
    }
}

fn default_credit_key_max_in_flight() -> u32 {
    16
}

fn default_keyless_per_minute() -> u32 {
    600
}
fn default_keyless_burst() -> u32 {
    100
}
fn default_keyless_total_per_minute() -> u32 {
    12_000
}
fn default_keyless_total_burst() -> u32 {
    1_000
}
fn default_claims_total_per_minute() -> u32 {
    1_200
}
fn default_claims_total_burst() -> u32 {
    200
}
fn default_claims_per_minute() -> u32 {
    30
}
fn default_claims_burst() -> u32 {
    10
}
fn default_max_tracked_clients() -> u32 {
    100_000
}
fn default_max_rate_tracked_keys() -> u32 {
    100_000
}
fn default_request_timeout_secs() -> u64 {
    30
}
fn default_header_read_timeout_secs() -> u64 {
    10
}

/// An OpenAI-compatible backend (vLLM, SGLang, any `/v1` API): `[[upstreams]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Environment variable holding the upstream's API key (sent as `Authorization: Bearer`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Time to establish a connection, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest silence between two reads of a response (never a total timeout: streams may run long).
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Which request field(s) carry the gateway's output bound: `both` (default: vLLM and SGLang read
    /// `max_completion_tokens` first, older servers `max_tokens`), or one of `max_tokens` /
    /// `max_completion_tokens` for an upstream that rejects the other (which is then removed from the request).
    #[serde(default)]
    pub output_limit_field: OutputLimitField,
    /// Longest wait for the response's status line and headers, in milliseconds (default: `read_timeout_ms`). A
    /// deployment that has not answered by then is failed over (nothing has reached the client yet).
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    /// How Anthropic Messages requests (`POST /v1/messages`) reach this upstream: `translate` (default: sent as
    /// chat completions, the answer translated back) or `native` (the upstream serves `/v1/messages` itself, as
    /// vLLM and SGLang do).
    #[serde(default)]
    pub messages_api: MessagesApi,
}

/// How `/v1/messages` is served by an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessagesApi {
    #[default]
    Translate,
    Native,
}

/// Where the output bound is written in a forwarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputLimitField {
    #[default]
    Both,
    MaxTokens,
    MaxCompletionTokens,
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_read_timeout_ms() -> u64 {
    120_000
}

/// A model served through an upstream: `[[models]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The id agents send as `model`.
    pub id: String,
    /// `[[upstreams]]` name, for a model served by one deployment (else `deployments`).
    #[serde(default)]
    pub upstream: Option<String>,
    /// The model name the upstream knows (defaults to `id`), with `upstream`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// The upstreams serving this model (instead of `upstream`): requests are spread by weight over the healthy
    /// ones, the least busy preferred, and failed over before any byte reaches the client.
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
    /// Credit price per million input tokens, a decimal string.
    pub input_usdc_per_mtok: String,
    /// Credit price per million output tokens.
    pub output_usdc_per_mtok: String,
    /// The most output tokens one choice may generate: the client's `max_tokens`/`max_completion_tokens` is capped
    /// to it, and it is the bound (written into the forwarded request) when the client sets none.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u64,
    /// The largest `n` (choices) a credit request may ask for; each choice is reserved. Pool keys and per-request
    /// payments are always served with `n = 1`.
    #[serde(default = "default_max_choices")]
    pub max_choices: u64,
    /// Prompt tokens reserved for each non-text content part, by part type (e.g. `{ image_url = 1600 }`). A part
    /// type not listed is refused: its cost cannot be bounded from the request's bytes.
    #[serde(default)]
    pub content_part_tokens: std::collections::BTreeMap<String, u64>,
    /// Price of one request paid with a standard x402 `PAYMENT-SIGNATURE` (no key), a decimal string; absent = not
    /// offered. `max_tokens` is capped to what it covers at `output_usdc_per_mtok`.
    #[serde(default)]
    pub per_request_usdc: Option<String>,
    /// Keyless pay-per-token with the x402 `upto` scheme: the 402 offers this request's worst-case cost (prompt
    /// bound + output bound at the model's prices) as a maximum, and the payment settles the metered cost. Needs
    /// `[x402]` with self settlement.
    #[serde(default)]
    pub upto: bool,
}

/// One upstream serving a model: `[[models]] deployments = [{ upstream = "gpu-a", weight = 2 }]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// `[[upstreams]]` name.
    pub upstream: String,
    /// Share of the traffic relative to the model's other deployments (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The model name this upstream knows (defaults to the model's `upstream_model`, else its `id`).
    #[serde(default)]
    pub upstream_model: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// `[routing]`: how failing deployments are taken out of rotation and brought back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Consecutive failures (connect error, timeout before the first byte, 429, 5xx) after which a deployment
    /// cools down.
    #[serde(default = "default_failures_before_cooldown")]
    pub failures_before_cooldown: u32,
    /// How long a deployment cools down before it is probed (`GET <base_url>/models`) and, if it answers, used
    /// again.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: u64,
    /// Retry a request that failed before any byte reached the client once on another deployment.
    #[serde(default = "default_true")]
    pub retry_other_deployment: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            failures_before_cooldown: default_failures_before_cooldown(),
            cooldown_secs: default_cooldown_secs(),
            retry_other_deployment: true,
        }
    }
}

fn default_failures_before_cooldown() -> u32 {
    3
}
fn default_cooldown_secs() -> u64 {
    30
}

fn default_max_output_tokens() -> u64 {
    4_096
}
fn default_max_choices() -> u64 {
    1
}

/// A pool subscription product: `[[pools]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Identifier agents send as `poolSlug` (lower-case letters, digits, `-`, `_`).
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Model ids a key of this pool may call.
    pub models: Vec<String>,
    /// How long a subscription lasts from its claim.
    #[serde(default = "default_duration_days")]
    pub duration_days: u32,
    pub blocks: Vec<BlockConfig>,
    /// Requests one key of this pool may make per minute (absent: no limit).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens (prompt bound + output bound, given back down to the actual use) one key of this pool may take per
    /// minute (absent: no limit).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

fn default_duration_days() -> u32 {
    30
}

/// One daily block of a pool: `{ name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 100 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub name: String,
    /// Daily UTC window `HH:MM-HH:MM` (end may be `24:00`).
    pub hours_utc: String,
    /// Price of the block for one subscription period, a decimal string.
    pub price_usdc: String,
    /// Subscriptions that may hold this block at the same time.
    pub seats: u32,
}

/// `[credits]`: pay-as-you-go balances.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    #[serde(default = "default_min_topup")]
    pub min_topup_usdc: String,
    /// Requests one credit key may make per minute (absent: no limit).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens one credit key may take per minute (absent: no limit).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        CreditsConfig {
            min_topup_usdc: default_min_topup(),
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }
}

fn default_min_topup() -> String {
    "10.00".to_string()
}

/// `[auth]`: who may claim, and the operator's tokens (read from the environment).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Require the payer's signature on claims. Turning it off lets anyone who sees a txHash claim it (seed-000
    /// compatibility only); the gateway warns at start-up.
    #[serde(default = "default_true")]
    pub claims_require_signature: bool,
    /// Environment variable holding the admin token.
    #[serde(default)]
    pub admin_token_env: Option<String>,
    /// Environment variable holding the read-only auditor token.
    #[serde(default)]
    pub auditor_token_env: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            claims_require_signature: true,
            admin_token_env: None,
            auditor_token_env: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server binds, e.g. `127.0.0.1:8402` (`:0` picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL agents reach this gateway at (used in catalogs and agent cards).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Documentation link shown in the 402 catalog.
    #[serde(default)]
    pub docs_url: Option<String>,
    /// x402 facilitator URL shown in the 402 catalog, if one is used.
    #[serde(default)]
    pub facilitator: Option<String>,
    /// `GET /readyz` answers 503 when the indexer lags the chain head by more blocks than this
    /// (default 3 × `chain.confirmations`).
    #[serde(default)]
    pub ready_max_lag_blocks: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            public_url: None,
            docs_url: None,
            facilitator: None,
            ready_max_lag_blocks: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8402))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// A preset (`base`, `base-sepolia`, `polygon`, `arbitrum`, `optimism`, `avalanche`: see [`PRESETS`]), or
    /// `custom` (then `chain_id`, `token_address`, `token_name`, `token_version`).
    pub network: String,
    pub chain_id: Option<u64>,
    pub token_address: Option<String>,
    pub token_name: Option<String>,
    pub token_version: Option<String>,
    /// JSON-RPC HTTP endpoints, tried in order: the second takes over when the first fails.
    pub rpc_http: Vec<String>,
    /// Optional WebSocket endpoint, used only as a wake-up signal (block ranges stay the truth).
    #[serde(default)]
    pub rpc_ws: Option<String>,
    /// The operator's address that receives payments.
    pub pay_to: String,
    /// Depth at which a transfer counts as paid: confirmations = indexed head − block + 1.
    #[serde(default = "default_confirmations")]
    pub confirmations: u64,
    /// First block to index when the database is new.
    #[serde(default)]
    pub start_block: u64,
    /// How often the head is polled, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Largest `eth_getLogs` range tried, in blocks (the indexer shrinks it when the provider objects).
    #[serde(default = "default_max_block_range")]
    pub max_block_range: u64,
    /// Recent blocks kept for reorg detection; defaults to max(2 × confirmations, 64).
    #[serde(default)]
    pub reorg_window: Option<u64>,
    /// Per-request timeout for RPC calls, in milliseconds.
    #[serde(default = "default_rpc_timeout_ms")]
    pub rpc_timeout_ms: u64,
    /// Tokens accepted on this network besides its USDC (e.g. EURC), each with its USD price policy.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Solana only (`network = "solana-custom"`): the cluster's genesis hash (base58); its first 32 characters make
    /// the CAIP-2 id `solana:<…>`.
    #[serde(default)]
    pub genesis_hash: Option<String>,
    /// Solana only: the USDC mint (base58); presets fill it, `solana-custom` requires it.
    #[serde(default)]
    pub mint: Option<String>,
    /// Solana only: the commitment at which a payment counts as paid, `finalized` (default) or `confirmed`
    /// (Solana's answer to a confirmation depth).
    #[serde(default)]
    pub commitment: Option<String>,
    /// Solana only: the environment variable holding the fee payer's key (base58 of the 64-byte keypair, as
    /// `solana-keygen` writes it, or a JSON array of its bytes) that co-signs and pays the fee of standard x402
    /// payments on this network. Without it the network takes claimed transfers only.
    #[serde(default)]
    pub fee_payer_key_env: Option<String>,
}

/// `tokens = [{ … }]` of a network as written: a token accepted besides the network's USDC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Short name shown to agents (`EURC`).
    pub symbol: String,
    pub address: String,
    /// EIP-712 domain name and version (what `transferWithAuthorization` signatures are made over).
    pub name: String,
    pub version: String,
    /// Decimals of the token's atomic unit (USDC and EURC: 6).
    #[serde(default = "default_token_decimals")]
    pub decimals: u8,
    /// USD per whole token, a decimal string with at most 6 decimals (`"1"` for a USD stablecoin, `"1.08"` for a
    /// euro one). Required: a token without a USD price is refused, never guessed.
    pub usd_per_token: Option<String>,
}

fn default_token_decimals() -> u8 {
    6
}

/// A network's `tokens` validated: priced, distinct, and not its USDC again.
fn resolve_tokens(
    key: &str,
    network: &Network,
    written: &[TokenConfig],
) -> Result<Vec<Token>, ConfigError> {
    let mut tokens: Vec<Token> = Vec::new();
    for (i, t) in written.iter().enumerate() {
        let at = |field: &str| format!("{key}.tokens[{i}].{field}");
        let address = parse_address(&at("address"), &t.address)?;
        if address == network.token || tokens.iter().any(|x| x.address == address) {
            return Err(invalid(
                &at("address"),
                "this token is already accepted on this network",
            ));
        }
        if t.symbol.trim().is_empty() || t.name.trim().is_empty() || t.version.trim().is_empty() {
            return Err(invalid(
                &at("symbol"),
                "symbol, name and version are required",
            ));
        }
        if t.decimals > 36 {
            return Err(invalid(&at("decimals"), "at most 36"));
        }
        let Some(price) = &t.usd_per_token else {
            return Err(invalid(
                &at("usd_per_token"),
                format!(
                    "token `{}` has no USD price: set usd_per_token (\"1\" for a USD stablecoin); a token without \
                     one is refused, never guessed",
                    t.symbol
                ),
            ));
        };
        let rate = parse_usdc(&at("usd_per_token"), price)?;
        if rate == Usdc::ZERO {
            return Err(invalid(&at("usd_per_token"), "must be positive"));
        }
        tokens.push(Token {
            symbol: t.symbol.trim().to_string(),
            address,
            name: t.name.clone(),
            version: t.version.clone(),
            decimals: t.decimals,
            usd_micro_per_token: rate.atomic() as u64,
        });
    }
    Ok(tokens)
}

/// A token a network accepts, with the fixed USD price every payment in it is credited at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub symbol: String,
    pub address: Address,
    /// EIP-712 domain name and version.
    pub name: String,
    pub version: String,
    pub decimals: u8,
    /// USD micro-units (the ledger's unit) per whole token: 1,000,000 for a USD stablecoin.
    pub usd_micro_per_token: u64,
}

impl Token {
    /// The ledger value (USD micro-units) of `raw` atomic units of the token, rounded down (a payment is never
    /// credited with more than it is worth); `None` when it does not fit.
    pub fn to_usd(&self, raw: alloy::primitives::U256) -> Option<i64> {
        let scaled = raw.checked_mul(alloy::primitives::U256::from(self.usd_micro_per_token))?;
        let usd = scaled
            / alloy::primitives::U256::from(10u64)
                .pow(alloy::primitives::U256::from(self.decimals));
        i64::try_from(usd).ok()
    }

    /// The token amount (atomic units) that is worth at least `usd`, rounded up (an offer never asks for less than
    /// its price); `to_usd` of it is at least `usd`.
    pub fn from_usd(&self, usd: Usdc) -> alloy::primitives::U256 {
        use alloy::primitives::U256;
        let unit = U256::from(10u64).pow(U256::from(self.decimals));
        let numerator = U256::from(usd.atomic().max(0) as u64) * unit;
        let rate = U256::from(self.usd_micro_per_token.max(1));
        numerator.div_ceil(rate)
    }
}

impl ChainConfig {
    /// One network's section (`[chain]` or `[[networks]]` entry `key`) validated, presets and secrets resolved.
    fn resolve(
        &self,
        key: &str,
        server: &ServerConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ChainSettings, ConfigError> {
        let chain = self;
        for (field, set) in [
            ("genesis_hash", chain.genesis_hash.is_some()),
            ("mint", chain.mint.is_some()),
            ("commitment", chain.commitment.is_some()),
            ("fee_payer_key_env", chain.fee_payer_key_env.is_some()),
        ] {
            if set {
                return Err(invalid(
                    &format!("{key}.{field}"),
                    "is a Solana network's key (network = \"solana\", \"solana-devnet\" or \"solana-custom\")",
                ));
            }
        }
        let custom_keys = [
            (format!("{key}.chain_id"), chain.chain_id.is_some()),
            (
                format!("{key}.token_address"),
                chain.token_address.is_some(),
            ),
            (format!("{key}.token_name"), chain.token_name.is_some()),
            (
                format!("{key}.token_version"),
                chain.token_version.is_some(),
            ),
        ];
        let preset = PRESETS.iter().find(|p| p.name == chain.network);
        let network = match chain.network.as_str() {
            _ if let Some(preset) = preset => {
                if let Some((custom, _)) = custom_keys.iter().find(|(_, set)| *set) {
                    return Err(invalid(
                        custom,
                        format!(
                            "only allowed with network = \"custom\" (network `{}` is a preset)",
                            chain.network
                        ),
                    ));
                }
                Network {
                    name: chain.network.clone(),
                    chain_id: preset.chain_id,
                    token: parse_address(&format!("{key}.network"), preset.usdc)?,
                    token_name: preset.usdc_name.to_string(),
                    token_version: "2".to_string(),
                }
            }
            "custom" => {
                let need = |key: &str, v: &Option<String>| {
                    v.clone()
                        .ok_or_else(|| invalid(key, "required when network = \"custom\""))
                };
                let chain_id = chain.chain_id.ok_or_else(|| {
                    invalid(
                        &format!("{key}.chain_id"),
                        "required when network = \"custom\"",
                    )
                })?;
                if chain_id == 0 {
                    return Err(invalid(
                        &format!("{key}.chain_id"),
                        "must be a positive chain id",
                    ));
                }
                Network {
                    name: "custom".to_string(),
                    chain_id,
                    token: parse_address(
                        &format!("{key}.token_address"),
                        &need(&format!("{key}.token_address"), &chain.token_address)?,
                    )?,
                    token_name: need(&format!("{key}.token_name"), &chain.token_name)?,
                    token_version: need(&format!("{key}.token_version"), &chain.token_version)?,
                }
            }
            other => {
                return Err(invalid(
                    &format!("{key}.network"),
                    format!(
                        "unknown network `{other}`; expected a preset ({}), \"custom\", or a Solana cluster \
                         (solana, solana-devnet, solana-custom)",
                        PRESETS
                            .iter()
                            .map(|p| p.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        };

        let rpc_http = resolve_rpc_http(key, &chain.rpc_http, env)?;
        let rpc_ws = match chain.rpc_ws.as_deref() {
            None | Some("") => None,
            Some(url) => Some(resolve_url(
                &format!("{key}.rpc_ws"),
                url,
                &["ws://", "wss://"],
                env,
            )?),
        };
        let pay_to = parse_address(&format!("{key}.pay_to"), &chain.pay_to)?;
        if pay_to == Address::ZERO {
            return Err(invalid(
                &format!("{key}.pay_to"),
                "the zero address cannot receive payments",
            ));
        }
        if chain.confirmations == 0 {
            return Err(invalid(
                &format!("{key}.confirmations"),
                "must be at least 1 (1 = the block that mined it)",
            ));
        }
        if chain.poll_interval_ms == 0 {
            return Err(invalid(
                &format!("{key}.poll_interval_ms"),
                "must be positive",
            ));
        }
        if chain.max_block_range == 0 {
            return Err(invalid(
                &format!("{key}.max_block_range"),
                "must be positive",
            ));
        }
        if chain.rpc_timeout_ms == 0 {
            return Err(invalid(
                &format!("{key}.rpc_timeout_ms"),
                "must be positive",
            ));
        }
        let min_window = chain.confirmations.saturating_mul(2);
        let reorg_window = match chain.reorg_window {
            None => min_window.max(64),
            Some(w) if w < min_window => {
                return Err(invalid(
                    &format!("{key}.reorg_window"),
                    format!("must be at least 2 × confirmations = {min_window}"),
                ));
            }
            Some(w) => w,
        };

        let extra_tokens = resolve_tokens(key, &network, &chain.tokens)?;
        Ok(ChainSettings {
            network,
            rpc_http,
            rpc_ws,
            pay_to,
            confirmations: chain.confirmations,
            start_block: chain.start_block,
            poll_interval: Duration::from_millis(chain.poll_interval_ms),
            max_block_range: chain.max_block_range,
            reorg_window,
            rpc_timeout: Duration::from_millis(chain.rpc_timeout_ms),
            ready_max_lag_blocks: server
                .ready_max_lag_blocks
                .unwrap_or(chain.confirmations.saturating_mul(3)),
            extra_tokens,
        })
    }
}

fn default_confirmations() -> u64 {
    12
}
fn default_poll_interval_ms() -> u64 {
    2_000
}
fn default_max_block_range() -> u64 {
    2_000
}
fn default_rpc_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// SQLite file; relative paths are relative to the config file's folder. Default `x402-gateway.db` when
    /// `url` is not set either.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// PostgreSQL instead of SQLite: `"$NAME"`, the environment variable holding a `postgres://` URL (it carries
    /// the password, so a literal URL is refused). Only `migrate` runs on PostgreSQL so far.
    #[serde(default)]
    pub url: Option<String>,
    /// Sync every per-request metering commit (credit reservations, settlements, pool usage rows) to disk before
    /// answering. Default false: they survive a crash of the process; a power cut can drop the last few, always in
    /// the customer's favour (see docs/api.md, "Durability" under "What a request can cost"). Payments, claims, keys
    /// and grants are always synced.
    #[serde(default)]
    pub fsync_metering: bool,
}

fn default_db_path() -> PathBuf {
    PathBuf::from("x402-gateway.db")
}

/// The database engine a config selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// `[database] path` (or neither key): the embedded SQLite file.
    Sqlite { path: PathBuf },
    /// `[database] url = "$NAME"`: a PostgreSQL server.
    Postgres { url: PostgresUrl },
}

impl Database {
    /// `SQLite` or `PostgreSQL`, for messages.
    pub fn engine(&self) -> &'static str {
        match self {
            Database::Sqlite { .. } => "SQLite",
            Database::Postgres { .. } => "PostgreSQL",
        }
    }
}

/// A `postgres://` URL read from the environment. It carries the password: `Debug` and `Display` show it through
/// [`redact_url`]; [`PostgresUrl::expose`] is for the driver only.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// A URL from wherever the caller got it (the environment, a test's server).
    pub fn new(url: String) -> PostgresUrl {
        PostgresUrl(url)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", redact_url(&self.0))
    }
}

impl std::fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl DatabaseConfig {
    /// The engine and where its database is.
    fn resolve(
        &self,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Database, ConfigError> {
        let relative = self.path.clone().unwrap_or_else(default_db_path);
        let path = if relative.is_absolute() {
            relative
        } else {
            base_dir.join(relative)
        };
        let Some(raw) = &self.url else {
            return Ok(Database::Sqlite { path });
        };
        if self.path.is_some() {
            return Err(invalid(
                "database.url",
                "`database.path` and `database.url` are both set: choose one engine, `path` for SQLite or `url` \
                 for PostgreSQL",
            ));
        }
        let Some(var) = raw.strip_prefix('$') else {
            return Err(invalid(
                "database.url",
                "must name an environment variable, e.g. `url = \"$DATABASE_URL\"`: a PostgreSQL URL carries its \
                 password, and secrets never go in the config file",
            ));
        };
        let url = env(var).ok_or_else(|| {
            invalid(
                "database.url",
                format!("environment variable `{var}` is not set"),
            )
        })?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                format!(
                    "environment variable `{var}` must hold a postgres:// or postgresql:// URL"
                ),
            ));
        }
        Ok(Database::Postgres {
            url: PostgresUrl(url),
        })
    }
}

/// How x402 payments are settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettlementMode {
    /// The gateway submits `transferWithAuthorization` from its own hot wallet (pays gas in ETH).
    #[default]
    #[serde(rename = "self")]
    SelfSettle,
    /// A facilitator verifies and settles (`POST {facilitator_url}/verify` and `/settle`).
    Facilitator,
}

/// `[x402]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X402Config {
    #[serde(default)]
    pub settlement: SettlementMode,
    /// Name of the environment variable holding the hot wallet's private key (self settlement only).
    #[serde(default)]
    pub settler_key_env: Option<String>,
    /// Facilitator base URL (facilitator settlement only); `"$NAME"` reads it from the environment.
    #[serde(default)]
    pub facilitator_url: Option<String>,
    /// The facilitator's settling address for the `upto` scheme (the `extra.facilitatorAddress` of its
    /// `/supported` upto kind; facilitator settlement only). Clients bind it in their authorization; without it,
    /// `upto` models need self settlement.
    #[serde(default)]
    pub facilitator_address: Option<String>,
    /// How long a signed authorization may take to settle; clients sign `validBefore = now + this`.
    #[serde(default = "default_max_timeout_seconds")]
    pub max_timeout_seconds: u64,
}

fn default_max_timeout_seconds() -> u64 {
    300
}

/// Default name of the environment variable with the settlement hot wallet's key.
pub const DEFAULT_SETTLER_KEY_ENV: &str = "X402_SETTLER_KEY";

/// Resolved settlement: the key itself is never stored here, only where to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    SelfSettle {
        key_env: String,
    },
    Facilitator {
        url: String,
        /// Settles `upto` payments (bound in the clients' witness), when set.
        upto_address: Option<Address>,
    },
}

/// `[x402]` validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X402Settings {
    pub settlement: Settlement,
    pub max_timeout_seconds: u64,
}

impl X402Settings {
    /// Reads the settlement hot wallet's key from the environment (self settlement only). Errors name the
    /// variable, never its value.
    pub fn settler_key(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<alloy::signers::local::PrivateKeySigner>, ConfigError> {
        let Settlement::SelfSettle { key_env } = &self.settlement else {
            return Ok(None);
        };
        let raw = env(key_env).ok_or_else(|| {
            invalid(
                "x402.settler_key_env",
                format!("environment variable `{key_env}` (the settlement wallet's private key) is not set"),
            )
        })?;
        raw.trim()
            .parse::<alloy::signers::local::PrivateKeySigner>()
            .map(Some)
            .map_err(|_| {
                invalid(
                    "x402.settler_key_env",
                    format!("environment variable `{key_env}` is not a hex private key (32 bytes)"),
                )
            })
    }
}

/// A network's fixed facts: where USDC lives and its EIP-712 domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Short name as written in the config (`base`, `base-sepolia`, `custom`).
    pub name: String,
    pub chain_id: u64,
    pub token: Address,
    pub token_name: String,
    pub token_version: String,
}

impl Network {
    /// CAIP-2 identifier, e.g. `eip155:8453`.
    pub fn caip2(&self) -> String {
        format!("eip155:{}", self.chain_id)
    }
}

/// Base mainnet USDC.
pub const BASE_USDC: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";
/// Base Sepolia USDC.
pub const BASE_SEPOLIA_USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

/// A network preset: `[chain] network = "<name>"` fills the chain id and Circle's native USDC with its EIP-712
/// domain (name, version "2"). Sources: x402's `DEFAULT_STABLECOINS` (typescript/packages/mechanisms/evm/src/shared/
/// defaultAssets.ts) for Base, Base Sepolia, Polygon and Arbitrum One (address, name and version); Circle's "USDC
/// Contract Addresses" page (developers.circle.com/stablecoins/usdc-contract-addresses) for OP Mainnet and
/// Avalanche C-Chain, whose native USDC is FiatToken v2.2 with the domain "USD Coin" / "2" like the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub chain_id: u64,
    pub usdc: &'static str,
    pub usdc_name: &'static str,
}

/// Every preset network.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "base",
        chain_id: 8453,
        usdc: BASE_USDC,
        usdc_name: "USD Coin",
    },
    Preset {
        name: "base-sepolia",
        chain_id: 84532,
        usdc: BASE_SEPOLIA_USDC,
        usdc_name: "USDC",
    },
    Preset {
        name: "polygon",
        chain_id: 137,
        usdc: "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359",
        usdc_name: "USD Coin",
    },
    Preset {
        name: "arbitrum",
        chain_id: 42161,
        usdc: "0xaf88d065e77c8cC2239327C5EDb3A432268e5831",
        usdc_name: "USD Coin",
    },
    Preset {
        name: "optimism",
        chain_id: 10,
        usdc: "0x0b2C639c533813f4Aa9D7837CAf62653d097Ff85",
        usdc_name: "USD Coin",
    },
    Preset {
        name: "avalanche",
        chain_id: 43114,
        usdc: "0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E",
        usdc_name: "USD Coin",
    },
];

/// Everything the indexer needs, validated and resolved (env secrets read, presets applied). Its `Debug` shows the
/// RPC URLs through [`redact_url`]: they carry the provider's key.
#[derive(Clone)]
pub struct ChainSettings {
    pub network: Network,
    pub rpc_http: Vec<String>,
    pub rpc_ws: Option<String>,
    pub pay_to: Address,
    pub confirmations: u64,
    pub start_block: u64,
    pub poll_interval: Duration,
    pub max_block_range: u64,
    pub reorg_window: u64,
    pub rpc_timeout: Duration,
    /// Largest indexer lag (blocks) at which `/readyz` still counts this network ready.
    pub ready_max_lag_blocks: u64,
    /// Tokens accepted besides the network's USDC.
    pub extra_tokens: Vec<Token>,
}

impl ChainSettings {
    /// The network's USDC as a [`Token`] (6 decimals, 1:1 with the ledger's USD).
    pub fn usdc(&self) -> Token {
        Token {
            symbol: "USDC".into(),
            address: self.network.token,
            name: self.network.token_name.clone(),
            version: self.network.token_version.clone(),
            decimals: 6,
            usd_micro_per_token: 1_000_000,
        }
    }

    /// Every token accepted on this network: its USDC first, then the extra ones.
    pub fn tokens(&self) -> Vec<Token> {
        let mut all = vec![self.usdc()];
        all.extend(self.extra_tokens.iter().cloned());
        all
    }

    /// The accepted token at `address`.
    pub fn token(&self, address: Address) -> Option<Token> {
        self.tokens().into_iter().find(|t| t.address == address)
    }
}

impl std::fmt::Debug for ChainSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSettings")
            .field("network", &self.network)
            .field(
                "rpc_http",
                &self
                    .rpc_http
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("rpc_ws", &self.rpc_ws.as_deref().map(redact_url))
            .field("pay_to", &self.pay_to)
            .field("confirmations", &self.confirmations)
            .field("start_block", &self.start_block)
            .field("poll_interval", &self.poll_interval)
            .field("max_block_range", &self.max_block_range)
            .field("reorg_window", &self.reorg_window)
            .field("rpc_timeout", &self.rpc_timeout)
            .field("ready_max_lag_blocks", &self.ready_max_lag_blocks)
            .finish()
    }
}

/// A configuration ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    /// The first network: the catalog's top-level `network`/`payTo`/`asset`, and the network a claim names by
    /// default.
    pub chain: ChainSettings,
    /// The other networks agents may pay on, in configuration order (each with its own chain id).
    pub other_networks: Vec<ChainSettings>,
    /// The Solana networks agents may pay on (`[[networks]]` entries of a Solana cluster), in configuration order.
    pub svm_networks: Vec<SvmSettings>,
    /// The database engine and where it is (`[database] path` or `url`).
    pub database: Database,
    /// Durability of per-request metering commits (`[database] fsync_metering`).
    pub metering_durability: crate::store::Durability,
    pub docs_url: Option<String>,
    pub facilitator: Option<String>,
    pub pools: Vec<Pool>,
    pub credits: Credits,
    pub auth: Auth,
    pub x402: Option<X402Settings>,
    /// Largest indexer lag (blocks) at which `/readyz` still answers 200.
    pub ready_max_lag_blocks: u64,
    pub upstreams: Vec<Upstream>,
    pub models: Vec<Model>,
    /// `[routing]` validated.
    pub routing: Routing,
    /// `[limits]` validated.
    pub limits: Limits,
}

/// A token bucket: `per_minute` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

/// A network a trusted proxy may connect from: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One rate limit: a bucket per client IP, and one for all clients together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_ip: Rate,
    pub total: Rate,
}

/// Most tokens a bucket shared by all clients may hold (it packs its level into 32 bits).
pub const MAX_TOTAL_BURST: u32 = 70_000;

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `None` when `rate_limits = false`.
    pub keyless: Option<RateLimit>,
    pub claims: Option<RateLimit>,
    pub max_tracked_clients: u32,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// Requests in flight per credit account.
    pub credit_key_max_in_flight: u32,
    /// Keys whose per-key rate buckets are kept in memory (`proxy::key_rates::KeyRates::new`).
    pub max_rate_tracked_keys: u32,
}

impl LimitsConfig {
    fn resolve(&self) -> Result<Limits, ConfigError> {
        let positive = |key: &str, v: u32, max: u32| {
            if v == 0 || v > max {
                Err(invalid(key, format!("must be between 1 and {max}")))
            } else {
                Ok(v)
            }
        };
        let rate = |name: &str,
                    per_minute: u32,
                    burst: u32,
                    max_burst: u32|
         -> Result<Rate, ConfigError> {
            Ok(Rate {
                per_minute: positive(&format!("limits.{name}_per_minute"), per_minute, 6_000_000)?,
                burst: positive(&format!("limits.{name}_burst"), burst, max_burst)?,
            })
        };
        let keyless = RateLimit {
            per_ip: rate(
                "keyless",
                self.keyless_per_minute,
                self.keyless_burst,
                1_000_000,
            )?,
            total: rate(
                "keyless_total",
                self.keyless_total_per_minute,
                self.keyless_total_burst,
                MAX_TOTAL_BURST,
            )?,
        };
        let claims = RateLimit {
            per_ip: rate(
                "claims",
                self.claims_per_minute,
                self.claims_burst,
                1_000_000,
            )?,
            total: rate(
                "claims_total",
                self.claims_total_per_minute,
                self.claims_total_burst,
                MAX_TOTAL_BURST,
            )?,
        };
        if !(64..=10_000_000).contains(&self.max_tracked_clients) {
            return Err(invalid(
                "limits.max_tracked_clients",
                "must be between 64 and 10000000",
            ));
        }
        if !(1..=3600).contains(&self.request_timeout_secs) {
            return Err(invalid(
                "limits.request_timeout_secs",
                "must be between 1 and 3600 seconds",
            ));
        }
        if !(1..=300).contains(&self.header_read_timeout_secs) {
            return Err(invalid(
                "limits.header_read_timeout_secs",
                "must be between 1 and 300 seconds",
            ));
        }
        if !(1..=100_000).contains(&self.credit_key_max_in_flight) {
            return Err(invalid(
                "limits.credit_key_max_in_flight",
                "must be between 1 and 100000",
            ));
        }
        if !(64..=10_000_000).contains(&self.max_rate_tracked_keys) {
            return Err(invalid(
                "limits.max_rate_tracked_keys",
                "must be between 64 and 10000000",
            ));
        }
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                parse_net(raw).ok_or_else(|| {
                    invalid(
                        &format!("limits.trusted_proxies[{i}]"),
                        format!("`{raw}` is not an IP address or CIDR network (e.g. 10.0.0.0/8)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Limits {
            keyless: self.rate_limits.then_some(keyless),
            claims: self.rate_limits.then_some(claims),
            max_tracked_clients: self.max_tracked_clients,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            trusted_proxies,
            credit_key_max_in_flight: self.credit_key_max_in_flight,
            max_rate_tracked_keys: self.max_rate_tracked_keys,
        })
    }
}

/// `10.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`.
fn parse_net(raw: &str) -> Option<IpNet> {
    let raw = raw.trim();
    let (addr, prefix) = match raw.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (raw, None),
    };
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let addr = addr.to_canonical();
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    (prefix <= max).then_some(IpNet { addr, prefix })
}

/// A validated upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// Without a trailing `/`.
    pub base_url: String,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Longest wait for the response headers.
    pub first_byte_timeout: Duration,
    pub output_limit_field: OutputLimitField,
    pub messages_api: MessagesApi,
}

/// `[routing]` validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub failures_before_cooldown: u32,
    pub cooldown: Duration,
    pub retry_other_deployment: bool,
}

impl RoutingConfig {
    fn resolve(&self) -> Result<Routing, ConfigError> {
        if self.failures_before_cooldown == 0 {
            return Err(invalid(
                "routing.failures_before_cooldown",
                "must be at least 1",
            ));
        }
        if self.cooldown_secs == 0 || self.cooldown_secs > 86_400 {
            return Err(invalid(
                "routing.cooldown_secs",
                "must be between 1 and 86400",
            ));
        }
        Ok(Routing {
            failures_before_cooldown: self.failures_before_cooldown,
            cooldown: Duration::from_secs(self.cooldown_secs),
            retry_other_deployment: self.retry_other_deployment,
        })
    }
}

/// One upstream serving a model, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Index into `Settings::upstreams`.
    pub upstream: usize,
    pub weight: u32,
    /// The model name sent to this upstream.
    pub upstream_model: String,
}

/// A validated model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub id: String,
    /// Where it is served: one or more deployments (never empty).
    pub deployments: Vec<Deployment>,
    pub input_per_mtok: Usdc,
    pub output_per_mtok: Usdc,
    pub max_output_tokens: u64,
    /// Per-request x402 price (`per_request_usdc`), if offered.
    pub per_request: Option<Usdc>,
    /// Keyless pay-per-token with x402 `upto` offered.
    pub upto: bool,
    /// Largest `n` for credit requests.
    pub max_choices: u64,
    /// Prompt tokens reserved per non-text content part, by type.
    pub content_part_tokens: std::collections::BTreeMap<String, u64>,
}

impl Settings {
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    pub fn pool(&self, slug: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.slug == slug)
    }
}

/// A validated pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub slug: String,
    pub name: String,
    pub models: Vec<String>,
    pub duration_days: u32,
    pub blocks: Vec<Block>,
    /// Per-key rates of this pool's keys.
    pub key_rate: KeyRate,
}

impl Pool {
    pub fn block(&self, name: &str) -> Option<&Block> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// Subscription length in seconds.
    pub fn duration_secs(&self) -> i64 {
        i64::from(self.duration_days) * 86_400
    }
}

/// A validated daily block: `[start_minute, end_minute)` of the UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub name: String,
    pub start_minute: u32,
    pub end_minute: u32,
    pub price: Usdc,
    pub seats: u32,
}

impl Block {
    /// `"00:00-08:00"`.
    pub fn hours(&self) -> String {
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        format!("{}-{}", hm(self.start_minute), hm(self.end_minute))
    }
}

/// Validated credit settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credits {
    pub min_topup: Usdc,
    /// Per-key rates of credit keys.
    pub key_rate: KeyRate,
}

/// Validated auth settings (tokens already read from the environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub claims_require_signature: bool,
    pub admin_token: Option<String>,
    pub auditor_token: Option<String>,
}

impl Config {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        config.resolve(base_dir, &|name| std::env::var(name).ok())
    }

    /// Validates and resolves presets and secrets. `env` looks up environment variables (injected for tests).
    pub fn resolve(
        &self,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut written: Vec<(String, &ChainConfig)> = Vec::new();
        if let Some(chain) = &self.chain {
            written.push(("chain".to_string(), chain));
        }
        for (i, n) in self.networks.iter().enumerate() {
            written.push((format!("networks[{i}]"), n));
        }
        let mut networks: Vec<ChainSettings> = Vec::new();
        let mut svm_networks: Vec<SvmSettings> = Vec::new();
        for (key, config) in &written {
            if svm::is_svm(&config.network) {
                if key == "chain" {
                    return Err(invalid(
                        "chain.network",
                        "[chain] is the first network, an EVM one (the catalog's top level); put a Solana \
                         network in [[networks]]",
                    ));
                }
                let resolved = config.resolve_svm(key, &self.server, env)?;
                if let Some(twin) = svm_networks.iter().find(|n| n.caip2 == resolved.caip2) {
                    return Err(invalid(
                        &format!("{key}.network"),
                        format!(
                            "{} is already configured (network `{}`); one entry per cluster",
                            resolved.caip2, twin.name
                        ),
                    ));
                }
                svm_networks.push(resolved);
                continue;
            }
            let resolved = config.resolve(key, &self.server, env)?;
            if let Some(twin) = networks
                .iter()
                .find(|n| n.network.chain_id == resolved.network.chain_id)
            {
                return Err(invalid(
                    &format!("{key}.network"),
                    format!(
                        "chain id {} is already configured (network `{}`); one entry per chain",
                        resolved.network.chain_id, twin.network.name
                    ),
                ));
            }
            networks.push(resolved);
        }
        let mut networks = networks.into_iter();
        let chain = networks.next().ok_or_else(|| {
            invalid(
                "chain",
                "no EVM network to accept payments on: write a [chain] section (or an EVM [[networks]] entry); \
                 Solana networks join an EVM one",
            )
        })?;
        let other_networks: Vec<ChainSettings> = networks.collect();

        let database = self.database.resolve(base_dir, env)?;

        if let Some(url) = &self.server.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "server.public_url",
                "must start with http:// or https://",
            ));
        }

        for (key, url) in [
            ("server.docs_url", &self.server.docs_url),
            ("server.facilitator", &self.server.facilitator),
        ] {
            if let Some(url) = url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(invalid(key, "must start with http:// or https://"));
            }
        }
        let pools = resolve_pools(&self.pools)?;
        let min_topup = parse_usdc("credits.min_topup_usdc", &self.credits.min_topup_usdc)?;
        if min_topup == Usdc::ZERO {
            return Err(invalid("credits.min_topup_usdc", "must be positive"));
        }
        let credit_key_rate = resolve_key_rate(
            "credits",
            self.credits.requests_per_minute,
            self.credits.tokens_per_minute,
        )?;
        let token = |key: &str, var: &Option<String>| -> Result<Option<String>, ConfigError> {
            match var {
                None => Ok(None),
                Some(name) => match env(name) {
                    Some(v) if !v.trim().is_empty() => Ok(Some(v)),
                    _ => Err(invalid(
                        key,
                        format!("environment variable `{name}` is not set"),
                    )),
                },
            }
        };
        let auth = Auth {
            claims_require_signature: self.auth.claims_require_signature,
            admin_token: token("auth.admin_token_env", &self.auth.admin_token_env)?,
            auditor_token: token("auth.auditor_token_env", &self.auth.auditor_token_env)?,
        };

        let (upstreams, models) = resolve_models(&self.upstreams, &self.models, env)?;
        for (i, pool) in pools.iter().enumerate() {
            if let Some(m) = pool
                .models
                .iter()
                .find(|m| !models.iter().any(|x| &x.id == *m))
            {
                return Err(invalid(
                    &format!("pools[{i}].models"),
                    format!("model `{m}` is not a configured [[models]] id"),
                ));
            }
        }

        Settings {
            ready_max_lag_blocks: chain.ready_max_lag_blocks,
            upstreams,
            models,
            routing: self.routing.resolve()?,
            docs_url: self.server.docs_url.clone(),
            facilitator: self.server.facilitator.clone(),
            pools,
            credits: Credits {
                min_topup,
                key_rate: credit_key_rate,
            },
            auth,
            listen: self.server.listen,
            public_url: self
                .server
                .public_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_string()),
            chain,
            other_networks,
            svm_networks,
            database,
            metering_durability: if self.database.fsync_metering {
                crate::store::Durability::Full
            } else {
                crate::store::Durability::Relaxed
            },
            x402: self.x402.as_ref().map(|x| x.resolve(env)).transpose()?,
            limits: self.limits.resolve()?,
        }
        .check_upto()
    }
}

impl Settings {
    /// Every network agents may pay on, the first one first.
    pub fn networks(&self) -> impl Iterator<Item = &ChainSettings> {
        std::iter::once(&self.chain).chain(self.other_networks.iter())
    }

    /// The network with CAIP-2 id `caip2` (`eip155:8453`), or whose preset name is `caip2` (`base`).
    pub fn network(&self, caip2: &str) -> Option<&ChainSettings> {
        self.networks()
            .find(|n| n.network.caip2() == caip2 || n.network.name == caip2)
    }

    /// The Solana network with CAIP-2 id `caip2` (`solana:5eykt…`), or whose preset name is `caip2` (`solana`).
    pub fn svm_network(&self, caip2: &str) -> Option<&SvmSettings> {
        self.svm_networks
            .iter()
            .find(|n| n.caip2 == caip2 || n.name == caip2)
    }

    /// `upto` models need a settler of upto payments: the hot wallet, or a facilitator whose address is known.
    fn check_upto(self) -> Result<Settings, ConfigError> {
        let upto_settled = self.x402.as_ref().is_some_and(|x| match &x.settlement {
            Settlement::SelfSettle { .. } => true,
            Settlement::Facilitator { upto_address, .. } => upto_address.is_some(),
        });
        if let Some(i) = self.models.iter().position(|m| m.upto)
            && !upto_settled
        {
            return Err(invalid(
                &format!("models[{i}].upto"),
                "needs an [x402] section with settlement = \"self\" (the gateway's hot wallet settles upto \
                 payments through the upto Permit2 proxy), or a facilitator with x402.facilitator_address (its \
                 upto settling address)",
            ));
        }
        Ok(self)
    }
}

fn parse_usdc(key: &str, raw: &str) -> Result<Usdc, ConfigError> {
    raw.parse::<Usdc>().map_err(|e| invalid(key, e.to_string()))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `"HH:MM"` → minutes of the day (`24:00` allowed as an end).
fn parse_hm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return None;
    }
    Some(h * 60 + m)
}

fn resolve_models(
    upstreams: &[UpstreamConfig],
    models: &[ModelConfig],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<Upstream>, Vec<Model>), ConfigError> {
    let mut out_up: Vec<Upstream> = Vec::new();
    for (i, u) in upstreams.iter().enumerate() {
        let key = |k: &str| format!("upstreams[{i}].{k}");
        if u.name.trim().is_empty() {
            return Err(invalid(&key("name"), "must not be empty"));
        }
        if out_up.iter().any(|x| x.name == u.name) {
            return Err(invalid(
                &key("name"),
                format!("`{}` is defined twice", u.name),
            ));
        }
        if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
            return Err(invalid(
                &key("base_url"),
                "must start with http:// or https://",
            ));
        }
        if u.connect_timeout_ms == 0 || u.read_timeout_ms == 0 {
            return Err(invalid(
                &key("read_timeout_ms"),
                "timeouts must be positive",
            ));
        }
        let api_key = match &u.api_key_env {
            None => None,
            Some(var) => Some(env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                invalid(
                    &key("api_key_env"),
                    format!("environment variable `{var}` is not set"),
                )
            })?),
        };
        out_up.push(Upstream {
            name: u.name.clone(),
            base_url: u.base_url.trim_end_matches('/').to_string(),
            api_key,
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            read_timeout: Duration::from_millis(u.read_timeout_ms),
            first_byte_timeout: Duration::from_millis(
                u.first_byte_timeout_ms.unwrap_or(u.read_timeout_ms),
            ),
            output_limit_field: u.output_limit_field,
            messages_api: u.messages_api,
        });
    }
    let mut out_models: Vec<Model> = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let key = |k: &str| format!("models[{i}].{k}");
        if m.id.trim().is_empty() {
            return Err(invalid(&key("id"), "must not be empty"));
        }
        if out_models.iter().any(|x| x.id == m.id) {
            return Err(invalid(&key("id"), format!("`{}` is defined twice", m.id)));
        }
        let find = |field: String, name: &str| {
            out_up.iter().position(|u| u.name == name).ok_or_else(|| {
                invalid(
                    &field,
                    format!("`{name}` is not a configured [[upstreams]] name"),
                )
            })
        };
        let default_upstream_model = m.upstream_model.clone().unwrap_or_else(|| m.id.clone());
        let deployments = match (&m.upstream, m.deployments.is_empty()) {
            (Some(name), true) => vec![Deployment {
                upstream: find(key("upstream"), name)?,
                weight: 1,
                upstream_model: default_upstream_model,
            }],
            (None, false) => {
                let mut out: Vec<Deployment> = Vec::new();
                for (j, d) in m.deployments.iter().enumerate() {
                    let field = |k: &str| key(&format!("deployments[{j}].{k}"));
                    let upstream = find(field("upstream"), &d.upstream)?;
                    if out.iter().any(|o| o.upstream == upstream) {
                        return Err(invalid(
                            &field("upstream"),
                            format!("`{}` is listed twice for this model", d.upstream),
                        ));
                    }
                    if d.weight == 0 || d.weight > 1_000 {
                        return Err(invalid(&field("weight"), "must be between 1 and 1000"));
                    }
                    out.push(Deployment {
                        upstream,
                        weight: d.weight,
                        upstream_model: d
                            .upstream_model
                            .clone()
                            .unwrap_or_else(|| default_upstream_model.clone()),
                    });
                }
                out
            }
            (Some(_), false) => {
                return Err(invalid(
                    &key("deployments"),
                    "set either `upstream` (one deployment) or `deployments`, not both",
                ));
            }
            (None, true) => {
                return Err(invalid(
                    &key("upstream"),
                    "missing: name the [[upstreams]] serving this model (or list `deployments`)",
                ));
            }
        };
        if m.max_output_tokens == 0 {
            return Err(invalid(&key("max_output_tokens"), "must be positive"));
        }
        if m.max_choices == 0 || m.max_choices > 128 {
            return Err(invalid(&key("max_choices"), "must be between 1 and 128"));
        }
        if let Some((part, _)) = m.content_part_tokens.iter().find(|(_, t)| **t == 0) {
            return Err(invalid(
                &key(&format!("content_part_tokens.{part}")),
                "must be positive",
            ));
        }
        out_models.push(Model {
            id: m.id.clone(),
            deployments,
            input_per_mtok: parse_usdc(&key("input_usdc_per_mtok"), &m.input_usdc_per_mtok)?,
            output_per_mtok: parse_usdc(&key("output_usdc_per_mtok"), &m.output_usdc_per_mtok)?,
            max_output_tokens: m.max_output_tokens,
            per_request: match &m.per_request_usdc {
                None => None,
                Some(raw) => {
                    let price = parse_usdc(&key("per_request_usdc"), raw)?;
                    if price <= Usdc::ZERO {
                        return Err(invalid(&key("per_request_usdc"), "must be positive"));
                    }
                    Some(price)
                }
            },
            upto: m.upto,
            max_choices: m.max_choices,
            content_part_tokens: m.content_part_tokens.clone(),
        });
    }
    Ok((out_up, out_models))
}

fn resolve_pools(pools: &[PoolConfig]) -> Result<Vec<Pool>, ConfigError> {
    let mut out: Vec<Pool> = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        let key = |field: &str| format!("pools[{i}].{field}");
        if !valid_name(&p.slug) {
            return Err(invalid(&key("slug"), "must be 1-64 of a-z, 0-9, `-`, `_`"));
        }
        if out.iter().any(|o| o.slug == p.slug) {
            return Err(invalid(
                &key("slug"),
                format!("`{}` is used by another pool", p.slug),
            ));
        }
        if p.name.trim().is_empty() {
            return Err(invalid(&key("name"), "must not be empty"));
        }
        if p.models.is_empty() || p.models.iter().any(|m| m.trim().is_empty()) {
            return Err(invalid(
                &key("models"),
                "needs at least one non-empty model id",
            ));
        }
        if p.duration_days == 0 || p.duration_days > 3650 {
            return Err(invalid(&key("duration_days"), "must be between 1 and 3650"));
        }
        if p.blocks.is_empty() {
            return Err(invalid(&key("blocks"), "needs at least one block"));
        }
        let mut blocks: Vec<Block> = Vec::new();
        for (j, b) in p.blocks.iter().enumerate() {
            let bkey = |field: &str| format!("pools[{i}].blocks[{j}].{field}");
            if !valid_name(&b.name) {
                return Err(invalid(&bkey("name"), "must be 1-64 of a-z, 0-9, `-`, `_`"));
            }
            if blocks.iter().any(|o| o.name == b.name) {
                return Err(invalid(
                    &bkey("name"),
                    format!("`{}` is used by another block of this pool", b.name),
                ));
            }
            let (start, end) = b
                .hours_utc
                .split_once('-')
                .and_then(|(a, z)| Some((parse_hm(a)?, parse_hm(z)?)))
                .ok_or_else(|| {
                    invalid(
                        &bkey("hours_utc"),
                        format!("`{}` is not `HH:MM-HH:MM`", b.hours_utc),
                    )
                })?;
            if start >= end || start >= 24 * 60 {
                return Err(invalid(
                    &bkey("hours_utc"),
                    format!("`{}`: the start must be before the end", b.hours_utc),
                ));
            }
            if let Some(o) = blocks
                .iter()
                .find(|o| start < o.end_minute && o.start_minute < end)
            {
                return Err(invalid(
                    &bkey("hours_utc"),
                    format!("`{}` overlaps block `{}`", b.hours_utc, o.name),
                ));
            }
            let price = parse_usdc(&bkey("price_usdc"), &b.price_usdc)?;
            if price == Usdc::ZERO {
                return Err(invalid(&bkey("price_usdc"), "must be positive"));
            }
            if b.seats == 0 {
                return Err(invalid(&bkey("seats"), "must be at least 1"));
            }
            blocks.push(Block {
                name: b.name.clone(),
                start_minute: start,
                end_minute: end,
                price,
                seats: b.seats,
            });
        }
        out.push(Pool {
            slug: p.slug.clone(),
            name: p.name.clone(),
            models: p.models.clone(),
            duration_days: p.duration_days,
            blocks,
            key_rate: resolve_key_rate(
                &format!("pools[{i}]"),
                p.requests_per_minute,
                p.tokens_per_minute,
            )?,
        });
    }
    Ok(out)
}

/// A product's `requests_per_minute` and `tokens_per_minute` (under `table`, for error keys). Zero is refused
/// rather than read as "no limit" or "nothing allowed": leaving the key out is how to say no limit.
fn resolve_key_rate(
    table: &str,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
) -> Result<KeyRate, ConfigError> {
    if requests_per_minute == Some(0) {
        return Err(invalid(
            &format!("{table}.requests_per_minute"),
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    if let Some(t) = tokens_per_minute
        && !(1..=MAX_TOKENS_PER_MINUTE).contains(&t)
    {
        return Err(invalid(
            &format!("{table}.tokens_per_minute"),
            format!("must be between 1 and {MAX_TOKENS_PER_MINUTE} (leave it out for no limit)"),
        ));
    }
    Ok(KeyRate {
        requests_per_minute,
        tokens_per_minute,
    })
}

impl X402Config {
    fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<X402Settings, ConfigError> {
        if !(10..=86_400).contains(&self.max_timeout_seconds) {
            return Err(invalid(
                "x402.max_timeout_seconds",
                "must be between 10 and 86400 seconds",
            ));
        }
        let settlement = match self.settlement {
            SettlementMode::SelfSettle => {
                if self.facilitator_url.is_some() {
                    return Err(invalid(
                        "x402.facilitator_url",
                        "only used with settlement = \"facilitator\"",
                    ));
                }
                if self.facilitator_address.is_some() {
                    return Err(invalid(
                        "x402.facilitator_address",
                        "only used with settlement = \"facilitator\" (self settlement settles upto from the hot \
                         wallet)",
                    ));
                }
                let key_env = self
                    .settler_key_env
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SETTLER_KEY_ENV.to_string());
                let hex = key_env.trim_start_matches("0x");
                let looks_like_key = hex.len() >= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
                let valid_name = !looks_like_key
                    && key_env
                        .bytes()
                        .next()
                        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && key_env
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid_name {
                    return Err(invalid(
                        "x402.settler_key_env",
                        "must be the NAME of an environment variable (letters, digits, `_`), not a key",
                    ));
                }
                Settlement::SelfSettle { key_env }
            }
            SettlementMode::Facilitator => {
                if self.settler_key_env.is_some() {
                    return Err(invalid(
                        "x402.settler_key_env",
                        "only used with settlement = \"self\"",
                    ));
                }
                let raw = self.facilitator_url.as_deref().ok_or_else(|| {
                    invalid(
                        "x402.facilitator_url",
                        "required when settlement = \"facilitator\"",
                    )
                })?;
                let url = resolve_url("x402.facilitator_url", raw, &["http://", "https://"], env)?;
                let upto_address = self
                    .facilitator_address
                    .as_deref()
                    .map(|a| parse_address("x402.facilitator_address", a))
                    .transpose()?;
                Settlement::Facilitator {
                    url: url.trim_end_matches('/').to_string(),
                    upto_address,
                }
            }
        };
        let settings = X402Settings {
            settlement,
            max_timeout_seconds: self.max_timeout_seconds,
        };
        // Fail at start-up, not at the first payment.
        settings.settler_key(env)?;
        Ok(settings)
    }
}

fn parse_address(key: &str, raw: &str) -> Result<Address, ConfigError> {
    raw.trim().parse::<Address>().map_err(|e| {
        invalid(
            key,
            format!("`{raw}` is not an address (0x + 40 hex digits): {e}"),
        )
    })
}

/// A network's `rpc_http` list: at least one URL, each http(s), `$NAME` read from the environment.
fn resolve_rpc_http(
    key: &str,
    urls: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    if urls.is_empty() {
        return Err(invalid(
            &format!("{key}.rpc_http"),
            "needs at least one JSON-RPC URL",
        ));
    }
    urls.iter()
        .enumerate()
        .map(|(i, url)| {
            resolve_url(
                &format!("{key}.rpc_http[{i}]"),
                url,
                &["http://", "https://"],
                env,
            )
        })
        .collect()
}

fn resolve_url(
    key: &str,
    raw: &str,
    schemes: &[&str],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let url = match raw.strip_prefix('$') {
        Some(var) => env(var)
            .ok_or_else(|| invalid(key, format!("environment variable `{var}` is not set")))?,
        None => raw.to_string(),
    };
    if !schemes.iter().any(|s| url.starts_with(s)) {
        return Err(invalid(
            key,
            format!("URL must start with {}", schemes.join(" or ")),
        ));
    }
    Ok(url)
}

/// The URL without any path, query or credentials, safe to print in logs.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let has_more = rest.len() > authority.len();
    format!("{scheme}://{host}{}", if has_more { "/…" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[chain]
network = "base"
rpc_http = ["https://mainnet.base.org"]
pay_to = "0x1111111111111111111111111111111111111111"
"#;

    fn resolve(text: &str) -> Result<Settings, ConfigError> {
        Config::parse(text, Path::new("test.toml"))?.resolve(Path::new("/srv"), &|name| {
            (name == "RPC_SECRET").then(|| "https://rpc.example/key123".to_string())
        })
    }

    #[test]
    fn solana_networks_join_an_evm_one_with_their_own_keys() {
        let solana = |extra: &str| {
            format!(
                "{MINIMAL}\n[[networks]]\nnetwork = \"solana\"\nrpc_http = [\"https://sol.example\"]\n\
                 pay_to = \"9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM\"\n{extra}"
            )
        };
        let s = resolve(&solana("")).unwrap();
        let sol = s.svm_network("solana").unwrap();
        assert_eq!(sol.caip2, "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp");
        assert_eq!(
            sol.mint.to_string(),
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
        );
        assert_eq!(sol.commitment, Commitment::Finalized);
        assert!(
            s.svm_network("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp")
                .is_some()
        );
        // Not an EVM network: the EVM lookups do not see it.
        assert!(s.network("solana").is_none());
        assert_eq!(s.networks().count(), 1);

        let refused = |text: &str, key: &str| {
            let err = resolve(text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        };
        refused(
            &solana("commitment = \"processed\"\n"),
            "networks[0].commitment",
        );
        refused(&solana("chain_id = 1\n"), "networks[0].chain_id");
        refused(
            &solana("fee_payer_key_env = \"NOT_SET\"\n"),
            "networks[0].fee_payer_key_env",
        );
        refused(
            &solana("genesis_hash = \"x\"\n"),
            "networks[0].genesis_hash",
        );
        refused(&solana("mint = \"0x12\"\n"), "networks[0].mint");
        refused(
            &solana("").replace(
                "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM",
                "0x2222222222222222222222222222222222222222",
            ),
            "networks[0].pay_to",
        );
        // A Solana key on an EVM network, and Solana as the first network.
        refused(&format!("{MINIMAL}mint = \"x\"\n"), "chain.mint");
        refused(
            &solana("").replace(
                "[chain]\nnetwork = \"base\"",
                "[chain]\nnetwork = \"solana\"",
            ),
            "chain.network",
        );
        // The same cluster twice.
        let twice = format!(
            "{}\n[[networks]]\nnetwork = \"solana\"\nrpc_http = [\"https://b.example\"]\n\
             pay_to = \"9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM\"\n",
            solana("")
        );
        refused(&twice, "networks[1].network");
        // A custom cluster names its genesis hash (the CAIP-2 id is its first 32 characters) and its mint.
        let custom = format!(
            "{MINIMAL}\n[[networks]]\nnetwork = \"solana-custom\"\nrpc_http = [\"http://127.0.0.1:8899\"]\n\
             pay_to = \"9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM\"\n\
             genesis_hash = \"EtWTRABZaYq6iMfeYKouRu166VU2xqa1wcaWoxPkrZBG\"\n\
             mint = \"4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU\"\ncommitment = \"confirmed\"\n"
        );
        let s = resolve(&custom).unwrap();
        let c = &s.svm_networks[0];
        assert_eq!(c.caip2, "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1");
        assert_eq!(c.commitment, Commitment::Confirmed);
        refused(
            &custom.replace("genesis_hash", "# genesis_hash"),
            "networks[0].genesis_hash",
        );
    }

    #[test]
    fn networks_join_the_first_each_with_its_own_chain_and_priced_tokens() {
        let more = |extra: &str| {
            format!(
                "{MINIMAL}\n[[networks]]\nnetwork = \"arbitrum\"\nrpc_http = [\"https://arb.example\"]\n\
                 pay_to = \"0x2222222222222222222222222222222222222222\"\n{extra}"
            )
        };
        let s = resolve(&more("")).unwrap();
        let ids: Vec<String> = s.networks().map(|n| n.network.caip2()).collect();
        assert_eq!(ids, ["eip155:8453", "eip155:42161"]);
        assert_eq!(
            s.network("arbitrum").map(|n| n.network.chain_id),
            Some(42161)
        );
        assert_eq!(s.network("eip155:42161").map(|n| n.confirmations), Some(12));
        assert!(s.network("eip155:1").is_none());

        // The same chain twice is refused, naming the key.
        let twice = format!(
            "{MINIMAL}\n[[networks]]\nnetwork = \"base\"\nrpc_http = [\"https://b.example\"]\n\
             pay_to = \"0x2222222222222222222222222222222222222222\"\n"
        );
        let err = resolve(&twice).unwrap_err().to_string();
        assert!(
            err.contains("networks[0].network") && err.contains("8453"),
            "{err}"
        );

        // A token needs a USD price; with one, amounts convert exactly (down when credited, up when asked).
        let token = |price: &str| {
            more(&format!(
                "tokens = [{{ symbol = \"EURC\", address = \"0x60a3E35Cc302bFA44Cb288Bc5a4F316Fdb1adb42\", \
                 name = \"EURC\", version = \"2\"{price} }}]\n"
            ))
        };
        let err = resolve(&token("")).unwrap_err().to_string();
        assert!(err.contains("networks[0].tokens[0].usd_per_token"), "{err}");
        assert!(resolve(&token(", usd_per_token = \"0\"")).is_err());
        let s = resolve(&token(", usd_per_token = \"1.08\"")).unwrap();
        let arb = s.network("arbitrum").unwrap();
        let eurc = &arb.tokens()[1];
        assert_eq!(eurc.usd_micro_per_token, 1_080_000);
        use alloy::primitives::U256;
        assert_eq!(eurc.to_usd(U256::from(9_259_260u64)), Some(10_000_000));
        assert_eq!(eurc.to_usd(U256::from(9_259_259u64)), Some(9_999_999));
        assert_eq!(eurc.from_usd(Usdc(10_000_000)), U256::from(9_259_260u64));
        let wei = Token {
            decimals: 18,
            usd_micro_per_token: 1_000_000,
            ..eurc.clone()
        };
        assert_eq!(
            wei.to_usd(U256::from(10u64).pow(U256::from(18))),
            Some(1_000_000)
        );
        assert_eq!(wei.from_usd(Usdc(1)), U256::from(10u64).pow(U256::from(12)));
        // USDC itself is not a second token.
        let dup = more(
            "tokens = [{ symbol = \"USDC\", address = \"0xaf88d065e77c8cC2239327C5EDb3A432268e5831\", \
             name = \"USD Coin\", version = \"2\", usd_per_token = \"1\" }]\n",
        );
        assert!(
            resolve(&dup)
                .unwrap_err()
                .to_string()
                .contains("already accepted")
        );
    }

    #[test]
    fn database_url_comes_from_the_environment_and_selects_postgres() {
        let env = |name: &str| {
            (name == "DATABASE_URL")
                .then(|| "postgres://gw:hunter2@db.internal:5432/x402".to_string())
        };
        let parse = |db: &str| {
            Config::parse(&format!("{MINIMAL}[database]\n{db}\n"), Path::new("t.toml"))
                .unwrap()
                .resolve(Path::new("/srv"), &env)
        };
        let s = parse("url = \"$DATABASE_URL\"").unwrap();
        let Database::Postgres { url } = &s.database else {
            panic!("expected PostgreSQL, got {:?}", s.database)
        };
        assert_eq!(url.expose(), "postgres://gw:hunter2@db.internal:5432/x402");
        // The password never reaches a log line.
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!url.to_string().contains("hunter2"));

        let literal = parse("url = \"postgres://gw:hunter2@db.internal/x402\"")
            .unwrap_err()
            .to_string();
        assert!(
            literal.contains("database.url") && literal.contains("environment variable"),
            "{literal}"
        );
        assert!(!literal.contains("hunter2"), "{literal}");
        let both = parse("url = \"$DATABASE_URL\"\npath = \"g.db\"")
            .unwrap_err()
            .to_string();
        assert!(
            both.contains("database.path") && both.contains("database.url"),
            "{both}"
        );
        let unset = parse("url = \"$NOPE\"").unwrap_err().to_string();
        assert!(unset.contains("`NOPE` is not set"), "{unset}");

        let sqlite = parse("path = \"g.db\"").unwrap();
        assert_eq!(
            sqlite.database,
            Database::Sqlite {
                path: PathBuf::from("/srv/g.db")
            }
        );
        assert_eq!(
            sqlite.database,
            Database::Sqlite {
                path: PathBuf::from("/srv/g.db")
            }
        );
    }

    #[test]
    fn preset_fills_network_facts_and_defaults() {
        let s = resolve(MINIMAL).unwrap();
        assert_eq!(s.chain.network.chain_id, 8453);
        assert_eq!(s.chain.network.token, BASE_USDC.parse::<Address>().unwrap());
        assert_eq!(s.chain.network.token_name, "USD Coin");
        assert_eq!(s.chain.confirmations, 12);
        assert_eq!(s.chain.reorg_window, 64);
        assert_eq!(
            s.database,
            Database::Sqlite {
                path: PathBuf::from("/srv/x402-gateway.db")
            }
        );
        assert_eq!(s.metering_durability, crate::store::Durability::Relaxed);
        let synced = resolve(&format!("{MINIMAL}[database]\nfsync_metering = true\n")).unwrap();
        assert_eq!(synced.metering_durability, crate::store::Durability::Full);
    }

    #[test]
    fn every_preset_names_its_chain_and_circles_usdc() {
        let ids: Vec<u64> = PRESETS.iter().map(|p| p.chain_id).collect();
        assert_eq!(ids, [8453, 84532, 137, 42161, 10, 43114]);
        for p in PRESETS {
            let s = resolve(
                &MINIMAL.replace("network = \"base\"", &format!("network = \"{}\"", p.name)),
            )
            .unwrap();
            assert_eq!(s.chain.network.chain_id, p.chain_id);
            assert_eq!(s.chain.network.caip2(), format!("eip155:{}", p.chain_id));
            // Checksummed as published: a typo in one hex digit would fail EIP-55.
            assert_eq!(s.chain.network.token.to_checksum(None), p.usdc);
            assert_eq!(s.chain.network.token_version, "2");
        }
        let err = resolve(&MINIMAL.replace("network = \"base\"", "network = \"fantom\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("polygon") && err.contains("avalanche") && err.contains("solana-devnet"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = resolve(&format!("{MINIMAL}confirmatons = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("confirmatons"), "{err}");
        let err = resolve(&format!("{MINIMAL}[surprise]\nx = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("surprise"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = resolve(&MINIMAL.replace("0x1111111111111111111111111111111111111111", "0x12"))
            .unwrap_err();
        assert!(err.to_string().contains("chain.pay_to"), "{err}");
        let err = resolve(&MINIMAL.replace("\"base\"", "\"base-mainnet\"")).unwrap_err();
        assert!(err.to_string().contains("chain.network"), "{err}");
        let err = resolve(&format!("{MINIMAL}token_name = \"X\"\n")).unwrap_err();
        assert!(err.to_string().contains("chain.token_name"), "{err}");
        let err = resolve(&format!("{MINIMAL}confirmations = 10\nreorg_window = 5\n")).unwrap_err();
        assert!(err.to_string().contains("chain.reorg_window"), "{err}");
    }

    #[test]
    fn custom_network_and_env_secrets() {
        let text = r#"
[chain]
network = "custom"
chain_id = 31337
token_address = "0x2222222222222222222222222222222222222222"
token_name = "USDC"
token_version = "2"
rpc_http = ["$RPC_SECRET", "http://127.0.0.1:8545"]
pay_to = "0x1111111111111111111111111111111111111111"
"#;
        let s = resolve(text).unwrap();
        assert_eq!(s.chain.network.chain_id, 31337);
        assert_eq!(s.chain.rpc_http[0], "https://rpc.example/key123");
        let err = resolve(&text.replace("$RPC_SECRET", "$MISSING"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MISSING") && err.contains("chain.rpc_http[0]"),
            "{err}"
        );
        let err = resolve(&text.replace("chain_id = 31337\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("chain.chain_id"), "{err}");
    }

    const POOL: &str = r#"
[[upstreams]]
name = "u"
base_url = "http://127.0.0.1:9/v1"

[[models]]
id = "kimi-k2.6"
upstream = "u"
input_usdc_per_mtok = "0.60"
output_usdc_per_mtok = "2.50"

[[pools]]
slug = "kimi26"
name = "Kimi"
models = ["kimi-k2.6"]
blocks = [
  { name = "asia", hours_utc = "00:00-08:00", price_usdc = "39.00", seats = 100 },
  { name = "americas", hours_utc = "16:00-24:00", price_usdc = "45.5", seats = 2 },
]
"#;

    #[test]
    fn pools_credits_and_auth() {
        let s = resolve(&format!("{MINIMAL}{POOL}")).unwrap();
        let pool = &s.pools[0];
        assert_eq!(pool.duration_days, 30);
        assert_eq!(pool.blocks[1].hours(), "16:00-24:00");
        assert_eq!(pool.blocks[1].price, Usdc(45_500_000));
        assert_eq!(s.credits.min_topup, Usdc::whole(10));
        assert!(s.auth.claims_require_signature);
        for (from, to, key) in [
            (
                "\"00:00-08:00\"",
                "\"08:00-07:00\"",
                "pools[0].blocks[0].hours_utc",
            ),
            (
                "\"16:00-24:00\"",
                "\"07:00-24:00\"",
                "pools[0].blocks[1].hours_utc",
            ),
            ("\"00:00-08:00\"", "\"0-8\"", "pools[0].blocks[0].hours_utc"),
            (
                "name = \"americas\"",
                "name = \"asia\"",
                "pools[0].blocks[1].name",
            ),
            ("\"39.00\"", "\"3.9.0\"", "pools[0].blocks[0].price_usdc"),
            ("seats = 2", "seats = 0", "pools[0].blocks[1].seats"),
            ("slug = \"kimi26\"", "slug = \"Kimi 26\"", "pools[0].slug"),
        ] {
            let err = resolve(&format!("{MINIMAL}{}", POOL.replace(from, to)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{to}: {err}");
        }
        let err = resolve(&format!("{MINIMAL}{POOL}{POOL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pools[1].slug"), "{err}");
        let err = resolve(&format!("{MINIMAL}[credits]\nmin_topup = \"1\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_topup"), "{err}");
        let err = resolve(&format!("{MINIMAL}[auth]\nadmin_token_env = \"NOPE\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.admin_token_env") && err.contains("NOPE"),
            "{err}"
        );
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../fixtures/example-config.toml");
        let s = Config::parse(text, Path::new("example-config.toml"))
            .unwrap()
            .resolve(Path::new("/srv"), &|name| match name {
                "BASE_RPC_URL" => Some("https://rpc.example/k".to_string()),
                "VLLM_API_KEY" => Some("vllm-secret".to_string()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            s.chain.rpc_http,
            vec!["https://rpc.example/k", "https://mainnet.base.org"]
        );
        assert_eq!(s.chain.network.chain_id, 8453);
    }

    #[test]
    fn a_model_has_one_upstream_or_weighted_deployments_and_routing_has_defaults() {
        let ups = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://a/v1\"\n\
                   [[upstreams]]\nname = \"b\"\nbase_url = \"http://b/v1\"\nmessages_api = \"native\"\n";
        let model = |placement: &str| {
            format!(
                "{MINIMAL}{ups}[[models]]\nid = \"m\"\n{placement}\ninput_usdc_per_mtok = \"1\"\n\
                 output_usdc_per_mtok = \"1\"\n"
            )
        };
        let s = resolve(&model(
            "deployments = [{ upstream = \"a\", weight = 3 }, { upstream = \"b\", upstream_model = \"m-b\" }]",
        ))
        .unwrap();
        let d = &s.models[0].deployments;
        assert_eq!(
            (d[0].upstream, d[0].weight, d[0].upstream_model.as_str()),
            (0, 3, "m")
        );
        assert_eq!(
            (d[1].upstream, d[1].weight, d[1].upstream_model.as_str()),
            (1, 1, "m-b")
        );
        assert_eq!(s.upstreams[1].messages_api, MessagesApi::Native);
        assert_eq!(s.upstreams[0].messages_api, MessagesApi::Translate);
        assert_eq!(
            s.upstreams[0].first_byte_timeout,
            s.upstreams[0].read_timeout
        );
        assert_eq!(
            s.routing,
            Routing {
                failures_before_cooldown: 3,
                cooldown: Duration::from_secs(30),
                retry_other_deployment: true,
            }
        );
        let s = resolve(&model("upstream = \"b\"\nupstream_model = \"x\"")).unwrap();
        assert_eq!(s.models[0].deployments[0].upstream_model, "x");
        for (placement, key) in [
            ("", "models[0].upstream"),
            (
                "upstream = \"a\"\ndeployments = [{ upstream = \"b\" }]",
                "models[0].deployments",
            ),
            (
                "deployments = [{ upstream = \"a\" }, { upstream = \"a\" }]",
                "models[0].deployments[1].upstream",
            ),
            (
                "deployments = [{ upstream = \"a\", weight = 0 }]",
                "models[0].deployments[0].weight",
            ),
            (
                "deployments = [{ upstream = \"nope\" }]",
                "models[0].deployments[0].upstream",
            ),
        ] {
            let e = resolve(&model(placement)).unwrap_err().to_string();
            assert!(e.contains(key), "{placement}: {e}");
        }
        let e = resolve(&format!(
            "{}[routing]\ncooldown_secs = 0\n",
            model("upstream = \"a\"")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("routing.cooldown_secs"), "{e}");
    }

    const KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    fn resolve_x402(section: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let text = format!("{MINIMAL}\n[x402]\n{section}");
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(&text, Path::new("test.toml"))?.resolve(Path::new("/srv"), &|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn x402_section_is_optional_and_defaults_to_self_settlement() {
        assert!(resolve(MINIMAL).unwrap().x402.is_none());
        let s = resolve_x402("", &[("X402_SETTLER_KEY", KEY)]).unwrap();
        let x = s.x402.unwrap();
        assert_eq!(
            x.settlement,
            Settlement::SelfSettle {
                key_env: "X402_SETTLER_KEY".into()
            }
        );
        assert_eq!(x.max_timeout_seconds, 300);
        let key = x
            .settler_key(&|n| (n == "X402_SETTLER_KEY").then(|| KEY.to_string()))
            .unwrap()
            .unwrap();
        assert_eq!(
            format!("{:#x}", key.address()),
            "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
        );
        // The debug form of the settings never holds the key.
        assert!(!format!("{x:?}").contains(&KEY[2..]));
    }

    #[test]
    fn x402_self_settlement_needs_a_key_in_the_environment() {
        let err = resolve_x402("settler_key_env = \"HOT\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x402.settler_key_env") && err.contains("HOT"),
            "{err}"
        );
        let err = resolve_x402("settler_key_env = \"HOT\"\n", &[("HOT", "nope")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x402.settler_key_env") && !err.contains("nope"),
            "{err}"
        );
        for pasted in [KEY, &KEY[2..]] {
            let err = resolve_x402(&format!("settler_key_env = \"{pasted}\"\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("NAME of an environment variable"), "{err}");
            assert!(!err.contains(&KEY[2..]), "the key is echoed: {err}");
        }
        let err = resolve_x402(
            "facilitator_url = \"https://f.example\"\n",
            &[("X402_SETTLER_KEY", KEY)],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x402.facilitator_url"), "{err}");
    }

    #[test]
    fn x402_facilitator_mode_needs_a_url() {
        let s = resolve_x402(
            "settlement = \"facilitator\"\nfacilitator_url = \"$FAC\"\nmax_timeout_seconds = 60\n",
            &[("FAC", "https://x402.example/facilitator/")],
        )
        .unwrap();
        let x = s.x402.unwrap();
        assert_eq!(
            x.settlement,
            Settlement::Facilitator {
                url: "https://x402.example/facilitator".into(),
                upto_address: None,
            }
        );
        assert_eq!(x.max_timeout_seconds, 60);
        assert!(x.settler_key(&|_| None).unwrap().is_none());
        let err = resolve_x402("settlement = \"facilitator\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("x402.facilitator_url"), "{err}");
        let err = resolve_x402(
            "settlement = \"facilitator\"\nfacilitator_url = \"ftp://x\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x402.facilitator_url"), "{err}");
        let err = resolve_x402("settlement = \"somebody\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("somebody"), "{err}");
        let err = resolve_x402("setlement = \"self\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("setlement"), "{err}");
        let err = resolve_x402("max_timeout_seconds = 0\n", &[("X402_SETTLER_KEY", KEY)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("x402.max_timeout_seconds"), "{err}");
    }

    #[test]
    fn per_key_rates_resolve_per_product_and_zero_is_refused() {
        let s = resolve(&format!("{MINIMAL}{POOL}")).unwrap();
        assert_eq!(s.pools[0].key_rate, KeyRate::default());
        assert_eq!(s.credits.key_rate, KeyRate::default());
        assert_eq!(s.limits.max_rate_tracked_keys, 100_000);
        let limited = POOL.replace(
            "models = [\"kimi-k2.6\"]\n",
            "models = [\"kimi-k2.6\"]\nrequests_per_minute = 60\ntokens_per_minute = 200000\n",
        );
        let s = resolve(&format!(
            "{MINIMAL}{limited}[credits]\ntokens_per_minute = 1000000\n[limits]\nmax_rate_tracked_keys = 64\n"
        ))
        .unwrap();
        assert_eq!(
            s.pools[0].key_rate,
            KeyRate {
                requests_per_minute: Some(60),
                tokens_per_minute: Some(200_000),
            }
        );
        assert_eq!(
            s.credits.key_rate,
            KeyRate {
                requests_per_minute: None,
                tokens_per_minute: Some(1_000_000),
            }
        );
        assert_eq!(s.credits.min_topup, Usdc::whole(10));
        assert_eq!(s.limits.max_rate_tracked_keys, 64);
        for (pool_line, rest, key) in [
            (
                "requests_per_minute = 0",
                "",
                "pools[0].requests_per_minute",
            ),
            ("tokens_per_minute = 0", "", "pools[0].tokens_per_minute"),
            (
                "tokens_per_minute = 1000000000001",
                "",
                "pools[0].tokens_per_minute",
            ),
            ("requests_per_minute = -1", "", "requests_per_minute"),
            ("rpm = 10", "", "rpm"),
            (
                "",
                "[credits]\nrequests_per_minute = 0\n",
                "credits.requests_per_minute",
            ),
            (
                "",
                "[credits]\ntokens_per_minute = 0\n",
                "credits.tokens_per_minute",
            ),
            (
                "",
                "[limits]\nmax_rate_tracked_keys = 63\n",
                "limits.max_rate_tracked_keys",
            ),
        ] {
            let pool = POOL.replace(
                "models = [\"kimi-k2.6\"]\n",
                &format!("models = [\"kimi-k2.6\"]\n{pool_line}\n"),
            );
            let err = resolve(&format!("{MINIMAL}{pool}{rest}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{pool_line}{rest}: {err}");
        }
        let err = resolve(&format!("{MINIMAL}[credits]\nrequests_per_minute = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("leave it out for no limit"), "{err}");
    }

    #[test]
    fn limits_default_to_protection_and_errors_name_the_key() {
        let l = resolve(MINIMAL).unwrap().limits;
        let rate = |per_minute, burst| Rate { per_minute, burst };
        assert_eq!(
            l.keyless,
            Some(RateLimit {
                per_ip: rate(600, 100),
                total: rate(12_000, 1_000)
            })
        );
        assert_eq!(
            l.claims,
            Some(RateLimit {
                per_ip: rate(30, 10),
                total: rate(1_200, 200)
            })
        );
        assert_eq!(l.request_timeout, Duration::from_secs(30));
        assert_eq!(l.header_read_timeout, Duration::from_secs(10));
        assert!(l.trusted_proxies.is_empty());
        let off = resolve(&format!("{MINIMAL}[limits]\nrate_limits = false\n")).unwrap();
        assert_eq!((off.limits.keyless, off.limits.claims), (None, None));
        let set = resolve(&format!(
            "{MINIMAL}[limits]\nkeyless_per_minute = 60\nkeyless_burst = 5\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n"
        ))
        .unwrap()
        .limits;
        assert_eq!(set.keyless.unwrap().per_ip, rate(60, 5));
        assert!(set.trusted_proxies[0].contains("10.9.8.7".parse().unwrap()));
        assert!(!set.trusted_proxies[0].contains("11.0.0.1".parse().unwrap()));
        assert!(set.trusted_proxies[1].contains("::1".parse().unwrap()));
        for (line, key) in [
            ("keyless_per_minute = 0", "limits.keyless_per_minute"),
            ("keyless_burst = 0", "limits.keyless_burst"),
            ("claims_per_minute = 0", "limits.claims_per_minute"),
            ("claims_burst = 0", "limits.claims_burst"),
            (
                "keyless_total_per_minute = 0",
                "limits.keyless_total_per_minute",
            ),
            ("keyless_total_burst = 70001", "limits.keyless_total_burst"),
            (
                "claims_total_per_minute = 0",
                "limits.claims_total_per_minute",
            ),
            ("claims_total_burst = 0", "limits.claims_total_burst"),
            ("max_tracked_clients = 3", "limits.max_tracked_clients"),
            ("request_timeout_secs = 0", "limits.request_timeout_secs"),
            (
                "header_read_timeout_secs = 0",
                "limits.header_read_timeout_secs",
            ),
            (
                "trusted_proxies = [\"10.0.0.0/33\"]",
                "limits.trusted_proxies[0]",
            ),
            (
                "trusted_proxies = [\"::1\", \"proxy.local\"]",
                "limits.trusted_proxies[1]",
            ),
            ("keyless_per_minute = -1", "keyless_per_minute"),
            ("rate_limit = false", "rate_limit"),
        ] {
            let err = resolve(&format!("{MINIMAL}[limits]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn redacts_secrets_in_urls() {
        assert_eq!(
            redact_url("https://base-mainnet.g.alchemy.com/v2/SECRET"),
            "https://base-mainnet.g.alchemy.com/…"
        );
        assert_eq!(
            redact_url("http://user:pw@127.0.0.1:8545"),
            "http://127.0.0.1:8545"
        );
    }

    #[test]
    fn debug_output_hides_rpc_url_secrets() {
        let s = resolve(&MINIMAL.replace(
            "rpc_http = [\"https://mainnet.base.org\"]",
            "rpc_http = [\"$RPC_SECRET\"]\nrpc_ws = \"wss://ws.example/wskey456\"",
        ))
        .unwrap();
        assert_eq!(s.chain.rpc_http, vec!["https://rpc.example/key123"]);
        let text = format!("{s:?}");
        assert!(text.contains("https://rpc.example/…"), "{text}");
        assert!(
            !text.contains("key123") && !text.contains("wskey456"),
            "{text}"
        );
    }
}
