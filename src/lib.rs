//! x402-gateway: a self-hosted payment gateway for AI inference.
//!
//! Agents pay USDC (on Base, other EVM networks or Solana) to the operator's `payTo`; one indexer per network
//! ([`chain`]) records those transfers in SQLite or PostgreSQL ([`store`]) with reorg-aware confirmation; the HTTP
//! API ([`api`]) turns payments (claimed, or standard x402) into API keys through [`billing`] and serves inference
//! through the metering [`proxy`]; [`audit`] reconciles it all. [`config`] reads the operator's TOML file and [`dev`]
//! runs the whole thing locally on a real anvil chain. docs/architecture.md maps every module.

pub mod api;
pub mod audit;
pub mod billing;
pub mod chain;
pub mod config;
pub mod dev;
pub mod keys;
pub mod logs;
pub mod metrics;
pub mod proxy;
pub mod store;
pub mod usdc;
pub mod x402;
