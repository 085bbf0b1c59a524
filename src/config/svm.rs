//! Solana networks in `[[networks]]`: the presets (cluster, CAIP-2 id, USDC mint) and the validation of an entry
//! whose `network` is `solana`, `solana-devnet` or `solana-custom`.
//!
//! Sources of the fixed facts: the CAIP-2 ids are the first 32 characters of each cluster's genesis hash, as the
//! x402 SVM specification and its reference packages (`@x402/svm` `SOLANA_MAINNET_CAIP2`, `SOLANA_DEVNET_CAIP2`)
//! write them; the USDC mints are Circle's "USDC Contract Addresses" page (developers.circle.com/stablecoins/
//! usdc-contract-addresses: Solana mainnet `EPjFWdd5…`, devnet `4zMMC9sr…`).

use std::time::Duration;

use super::{ChainConfig, ConfigError, ServerConfig, invalid, redact_url, resolve_rpc_http};
use crate::chain::svm::address::Pubkey;

/// A Solana cluster preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvmPreset {
    pub name: &'static str,
    pub caip2: &'static str,
    pub usdc_mint: &'static str,
}

/// Every Solana preset (`network = "<name>"`); `solana-custom` names its own genesis hash and mint.
pub const SVM_PRESETS: &[SvmPreset] = &[
    SvmPreset {
        name: "solana",
        caip2: "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
        usdc_mint: "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
    },
    SvmPreset {
        name: "solana-devnet",
        caip2: "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
        usdc_mint: "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU",
    },
];

/// Whether a `[[networks]]` entry is a Solana one.
pub fn is_svm(network: &str) -> bool {
    network == "solana-custom" || SVM_PRESETS.iter().any(|p| p.name == network)
}

/// The commitment at which a Solana payment counts as paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commitment {
    /// Voted on by a supermajority (optimistic confirmation): about 0.4 s after landing; not yet rooted.
    Confirmed,
    /// Rooted: 31+ confirmed blocks on top; cannot be rolled back.
    Finalized,
}

impl Commitment {
    /// The RPC's name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            Commitment::Confirmed => "confirmed",
            Commitment::Finalized => "finalized",
        }
    }
}

/// One Solana network, validated (presets applied, secrets read).
#[derive(Clone)]
pub struct SvmSettings {
    /// As written (`solana`, `solana-devnet`, `solana-custom`).
    pub name: String,
    /// `solana:<first 32 characters of the genesis hash>`.
    pub caip2: String,
    pub mint: Pubkey,
    /// The operator's wallet; payments go to its associated token account for `mint`.
    pub pay_to: Pubkey,
    pub rpc_http: Vec<String>,
    pub commitment: Commitment,
    /// First slot to index when the database is new (0: the token account's whole history).
    pub start_slot: u64,
    pub poll_interval: Duration,
    pub rpc_timeout: Duration,
    /// Largest indexer lag (slots) at which `/readyz` still counts this network ready.
    pub ready_max_lag_slots: u64,
    /// The environment variable with the x402 fee payer's key (`None`: no standard x402 on this network).
    pub fee_payer_key_env: Option<String>,
}

impl std::fmt::Debug for SvmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvmSettings")
            .field("name", &self.name)
            .field("caip2", &self.caip2)
            .field("mint", &self.mint)
            .field("pay_to", &self.pay_to)
            .field(
                "rpc_http",
                &self
                    .rpc_http
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("commitment", &self.commitment)
            .field("start_slot", &self.start_slot)
            .field("poll_interval", &self.poll_interval)
            .field("fee_payer_key_env", &self.fee_payer_key_env)
            .finish()
    }
}

fn parse_pubkey(key: &str, raw: &str) -> Result<Pubkey, ConfigError> {
    raw.trim().parse::<Pubkey>().map_err(|e| {
        invalid(
            key,
            format!("`{raw}` is not a Solana address (base58 of 32 bytes): {e}"),
        )
    })
}

impl ChainConfig {
    /// A Solana `[[networks]]` entry validated. Keys of EVM networks that mean nothing here are refused rather
    /// than ignored.
    pub(super) fn resolve_svm(
        &self,
        key: &str,
        server: &ServerConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SvmSettings, ConfigError> {
        for (field, set) in [
            ("chain_id", self.chain_id.is_some()),
            ("token_address", self.token_address.is_some()),
            ("token_name", self.token_name.is_some()),
            ("token_version", self.token_version.is_some()),
            ("rpc_ws", self.rpc_ws.is_some()),
            ("reorg_window", self.reorg_window.is_some()),
            ("tokens", !self.tokens.is_empty()),
        ] {
            if set {
                return Err(invalid(
                    &format!("{key}.{field}"),
                    "is an EVM network's key; a Solana network takes mint, commitment, genesis_hash \
                     (solana-custom) and fee_payer_key_env",
                ));
            }
        }
        let (caip2, mint) = match SVM_PRESETS.iter().find(|p| p.name == self.network) {
            Some(preset) => {
                if self.genesis_hash.is_some() {
                    return Err(invalid(
                        &format!("{key}.genesis_hash"),
                        format!(
                            "only allowed with network = \"solana-custom\" (`{}` is a preset)",
                            self.network
                        ),
                    ));
                }
                let mint = match &self.mint {
                    Some(m) => parse_pubkey(&format!("{key}.mint"), m)?,
                    None => parse_pubkey(&format!("{key}.network"), preset.usdc_mint)?,
                };
                (preset.caip2.to_string(), mint)
            }
            _ => {
                let genesis = self.genesis_hash.as_deref().ok_or_else(|| {
                    invalid(
                        &format!("{key}.genesis_hash"),
                        "required when network = \"solana-custom\"",
                    )
                })?;
                // A genesis hash is 32 bytes; its base58 text is 43 or 44 characters.
                let checked = parse_pubkey(&format!("{key}.genesis_hash"), genesis)?.to_string();
                let mint = self.mint.as_deref().ok_or_else(|| {
                    invalid(
                        &format!("{key}.mint"),
                        "required when network = \"solana-custom\"",
                    )
                })?;
                (
                    format!("solana:{}", &checked[..32.min(checked.len())]),
                    parse_pubkey(&format!("{key}.mint"), mint)?,
                )
            }
        };
        let rpc_http = resolve_rpc_http(key, &self.rpc_http, env)?;
        let pay_to = parse_pubkey(&format!("{key}.pay_to"), &self.pay_to)?;
        let commitment = match self.commitment.as_deref() {
            None | Some("finalized") => Commitment::Finalized,
            Some("confirmed") => Commitment::Confirmed,
            Some(other) => {
                return Err(invalid(
                    &format!("{key}.commitment"),
                    format!(
                        "`{other}` is not a commitment a payment can count at; expected \"finalized\" or \
                         \"confirmed\""
                    ),
                ));
            }
        };
        if self.poll_interval_ms == 0 {
            return Err(invalid(
                &format!("{key}.poll_interval_ms"),
                "must be positive",
            ));
        }
        if self.rpc_timeout_ms == 0 {
            return Err(invalid(
                &format!("{key}.rpc_timeout_ms"),
                "must be positive",
            ));
        }
        if let Some(var) = &self.fee_payer_key_env
            && env(var).is_none_or(|v| v.trim().is_empty())
        {
            return Err(invalid(
                &format!("{key}.fee_payer_key_env"),
                format!("environment variable `{var}` is not set"),
            ));
        }
        Ok(SvmSettings {
            name: self.network.clone(),
            caip2,
            mint,
            pay_to,
            rpc_http,
            commitment,
            start_slot: self.start_block,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            rpc_timeout: Duration::from_millis(self.rpc_timeout_ms),
            // A slot is ~0.4 s: 150 slots is a minute behind.
            ready_max_lag_slots: server.ready_max_lag_blocks.unwrap_or(150),
            fee_payer_key_env: self.fee_payer_key_env.clone(),
        })
    }
}
