//! x402-gateway: a self-hosted payment gateway for AI inference.
//!
//! Agents pay USDC on Base to the operator's `payTo` address; the indexer ([`chain`]) records those transfers in
//! SQLite ([`store`]) with reorg-aware confirmation depth; the HTTP API ([`api`]) turns confirmed payments into API
//! keys and serves inference. [`config`] reads the operator's TOML file and [`dev`] runs the whole thing locally on
//! a real anvil chain.

pub mod api;
pub mod billing;
pub mod chain;
pub mod config;
pub mod dev;
pub mod keys;
pub mod proxy;
pub mod store;
pub mod usdc;
pub mod x402;
