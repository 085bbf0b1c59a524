//! The `x402-gateway` command line: parses arguments and hands over to the library.

use std::path::PathBuf;

use alloy::primitives::Address;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use x402_gateway::billing;
use x402_gateway::chain::{self, Indexer, StatusHandle};
use x402_gateway::config::{Config, Settings};
use x402_gateway::store::billing as billing_store;
use x402_gateway::store::transfers::TransferStatus;
use x402_gateway::store::{Store, now_unix};
use x402_gateway::usdc::Usdc;
use x402_gateway::{api, dev};

/// Self-hosted x402 payment gateway for AI inference.
///
/// Agents pay USDC on Base to your payTo address; the gateway indexes those transfers (reorg-aware, into SQLite)
/// and turns confirmed payments into API keys for an OpenAI-compatible endpoint.
///
/// Start with `x402-gateway dev`: a local chain, a test USDC and the gateway, on one command.
#[derive(Parser)]
#[command(name = "x402-gateway", version, propagate_version = true)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "X402_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing syntax), e.g. `info` or `x402_gateway=debug`.
    #[arg(long, global = true, default_value = "info", env = "X402_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: the payment indexer plus the HTTP server (`GET /healthz` reports the indexer's progress).
    Serve {
        /// The TOML configuration file (see fixtures/example-config.toml).
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
    },
    /// Run the payment indexer alone: backfill from the checkpoint (or `chain.start_block`) with progress lines,
    /// then follow the head, printing a line whenever a payment's confirmations change.
    Index {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        /// Stop once the index has caught up with the chain head instead of following it.
        #[arg(long)]
        once: bool,
    },
    /// List indexed transfers to payTo from the database (no RPC needed).
    Payments {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        /// Only transfers with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Print one JSON array instead of a table (fields documented in README.md).
        #[arg(long)]
        json: bool,
    },
    /// Run everything locally: anvil (from node_modules), a test USDC, the indexer and the server, with a generated
    /// config in the data folder. Prints the endpoints and throwaway dev wallets. Ctrl-C stops it all.
    Dev(dev::DevArgs),
    /// Operator key management: list, revoke, grant credits.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Accounts (payer addresses): balance, ledger, claims and keys.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List keys (public ids only; secrets are never stored).
    List {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        /// Only the keys of this account (payer address).
        #[arg(long)]
        account: Option<Address>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its public id (the part after `sk-`, before the second `-`).
    Revoke {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        public_id: String,
    },
    /// Grant credits to an account (a `grant` ledger entry). Prints a new credit key if the account has none.
    Grant {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        address: Address,
        /// Amount in USDC, e.g. "25.00".
        amount: Usdc,
        /// Why (kept in the ledger).
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Show an account's balance, ledger, claims and keys.
    Show {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        address: Address,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusArg {
    Seen,
    Confirmed,
    Orphaned,
}

impl From<StatusArg> for TransferStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Seen => TransferStatus::Seen,
            StatusArg::Confirmed => TransferStatus::Confirmed,
            StatusArg::Orphaned => TransferStatus::Orphaned,
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("invalid --log filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn load(path: &std::path::Path) -> Result<Settings> {
    Ok(Config::load(path)?)
}

/// Cancels `token` on Ctrl-C or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log)?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());

    match cli.command {
        Command::Serve { config } => {
            let settings = load(&config)?;
            serve(settings, shutdown).await
        }
        Command::Index { config, once } => {
            let settings = load(&config)?;
            let store = Store::open(&settings.database_path)?;
            let status = StatusHandle::default();
            let chain_settings = settings.chain.clone();
            if once {
                Indexer::new(chain_settings, store, status)?
                    .run_until_synced(shutdown)
                    .await?;
            } else {
                chain::spawn(chain_settings, store, status, shutdown)?.await??;
            }
            Ok(())
        }
        Command::Payments {
            config,
            status,
            json,
        } => {
            let settings = load(&config)?;
            payments(&settings, status.map(Into::into), json).await
        }
        Command::Dev(args) => dev::run(args, shutdown).await,
        Command::Keys { command } => keys_command(command).await,
        Command::Accounts {
            command:
                AccountsCommand::Show {
                    config,
                    address,
                    json,
                },
        } => {
            let store = Store::open(&load(&config)?.database_path)?;
            let view = billing::account_view(&store, address).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(());
            }
            if !view.exists {
                println!(
                    "no account {} (it has never claimed a payment or received a grant)",
                    view.address
                );
                return Ok(());
            }
            println!(
                "account {}\nbalance {} USDC (ledger sum {})",
                view.address, view.balance_usdc, view.ledger_sum_usdc
            );
            println!("\nledger:");
            for r in &view.ledger {
                println!(
                    "  #{:<6} {:<8} {:>14} → {:>14}  {}  {}",
                    r.id,
                    r.kind,
                    r.amount_usdc.to_string(),
                    r.balance_after_usdc.to_string(),
                    r.tx_hash.as_deref().unwrap_or("-"),
                    r.note.as_deref().unwrap_or("")
                );
            }
            println!("\nclaims:");
            for c in &view.claims {
                println!(
                    "  {}  {:<12} paid {} price {} surplus {}  {}",
                    c.tx_hash,
                    c.kind,
                    c.paid_usdc,
                    c.price_usdc,
                    c.surplus_usdc,
                    c.pool
                        .as_ref()
                        .map(|p| format!("{p} {:?}", c.blocks.clone().unwrap_or_default()))
                        .unwrap_or_default()
                );
            }
            println!("\nkeys:");
            print_keys(&view.keys);
            Ok(())
        }
    }
}

fn print_keys(keys: &[billing_store::KeyRecord]) {
    for k in keys {
        println!(
            "  sk-{}-…  {:<12} {}  {}  created {} by {}  {}",
            k.public_id,
            k.kind,
            k.account,
            k.pool
                .as_ref()
                .map(|p| format!(
                    "{p} {:?} until {}",
                    k.blocks.clone().unwrap_or_default(),
                    k.expires_at.map(billing::rfc3339).unwrap_or_default()
                ))
                .unwrap_or_default(),
            billing::rfc3339(k.created_at),
            k.created_by,
            match (k.revoked_at, &k.revoked_reason) {
                (Some(at), reason) => format!(
                    "REVOKED {} ({})",
                    billing::rfc3339(at),
                    reason.as_deref().unwrap_or("")
                ),
                (None, _) => "live".to_string(),
            }
        );
    }
}

async fn keys_command(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::List {
            config,
            account,
            json,
        } => {
            let store = Store::open(&load(&config)?.database_path)?;
            let keys = billing::list_keys(&store, account.map(|a| format!("{a:#x}"))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else if keys.is_empty() {
                println!("no keys");
            } else {
                print_keys(&keys);
            }
            Ok(())
        }
        KeysCommand::Revoke { config, public_id } => {
            let store = Store::open(&load(&config)?.database_path)?;
            let id = public_id
                .trim_start_matches("sk-")
                .split('-')
                .next()
                .unwrap_or("")
                .to_string();
            if billing::revoke_key(&store, id.clone(), now_unix()).await? {
                println!("revoked sk-{id}-…");
                Ok(())
            } else {
                anyhow::bail!("no live key with public id `{id}`")
            }
        }
        KeysCommand::Grant {
            config,
            address,
            amount,
            note,
        } => {
            anyhow::ensure!(amount > Usdc::ZERO, "the amount must be positive");
            let store = Store::open(&load(&config)?.database_path)?;
            let (balance, key) = billing::grant(&store, address, amount, note, now_unix()).await?;
            println!("granted {amount} USDC to {address:#x}; balance {balance} USDC");
            if let Some(key) = key {
                println!("new credit key (shown once): {}", key.full);
            }
            Ok(())
        }
    }
}

/// Runs the indexer and the HTTP server until shutdown.
async fn serve(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    api::serve(settings, listener, shutdown).await?;
    Ok(())
}

async fn payments(settings: &Settings, status: Option<TransferStatus>, json: bool) -> Result<()> {
    let store = Store::open(&settings.database_path)?;
    let head = store.checkpoint().await?.map(|c| c.number);
    let rows = store.list_transfers(status).await?;
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|t| {
                serde_json::json!({
                    "txHash": t.tx_hash,
                    "logIndex": t.log_index,
                    "blockNumber": t.block_number,
                    "blockHash": t.block_hash,
                    "from": t.from,
                    "to": t.to,
                    "valueUsdc": t.value.to_string(),
                    "valueAtomic": t.value.atomic().to_string(),
                    "status": t.status.as_str(),
                    "confirmations": t.confirmations(head),
                    "firstSeenAt": t.first_seen_at,
                    "confirmedAt": t.confirmed_at,
                    "orphanedAt": t.orphaned_at,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no transfers indexed{}",
            status
                .map(|s| format!(" with status {}", s.as_str()))
                .unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<66}  {:>5}  {:>10}  {:<66}  {:<42}  {:>14}  {:>16}  {:<9}  {:>5}",
        "TX HASH", "LOG", "BLOCK", "BLOCK HASH", "FROM", "USDC", "ATOMIC", "STATUS", "CONF"
    );
    for t in &rows {
        println!(
            "{:<66}  {:>5}  {:>10}  {:<66}  {:<42}  {:>14}  {:>16}  {:<9}  {:>5}",
            t.tx_hash,
            t.log_index,
            t.block_number,
            t.block_hash,
            t.from,
            t.value.to_string(),
            t.value.atomic(),
            t.status.as_str(),
            t.confirmations(head)
        );
    }
    println!(
        "{} transfers; indexed head {}",
        rows.len(),
        head.map_or("none".to_string(), |h| h.to_string())
    );
    Ok(())
}
