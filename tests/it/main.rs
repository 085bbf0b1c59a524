//! The one integration-test binary (one link instead of one per file). Every test runs against a real anvil
//! chain from the project's npm install and a real SQLite file (the `postgres` tests also on a real PostgreSQL, see
//! scripts/postgres-test-cluster); servers bind 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod audit;
mod checkout;
mod cli;
mod clients;
mod concurrency;
mod conformance;
mod console;
mod contract;
mod crash;
mod dev;
mod faults;
mod fuzz;
mod indexer;
mod inference;
mod limits;
mod metering;
mod networks;
mod permit2;
mod postgres;
mod proxy;
mod replicas;
mod reversals;
mod routing;
mod rpc_faults;
mod secrets;
mod solana;
mod support;
mod svm_support;
mod upto;
mod x402;
mod x402_routes;
