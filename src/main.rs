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
    /// Apply the database migrations this binary knows (SQLite `[database] path` or PostgreSQL `[database] url`)
    /// and print what was applied and the resulting schema version. Safe to run again: a current database is left
    /// as it is; a database newer than the binary is refused.
    Migrate {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
    },
    /// List indexed transfers to payTo from the database (no RPC needed).
    Payments {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        /// Only transfers with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Print one JSON array instead of a table (fields documented in docs/operations.md, "payments --json").
        #[arg(long)]
        json: bool,
    },
    /// Run everything locally: anvil (from node_modules), a test USDC, a demo upstream, the indexer and the server,
    /// with a generated config in the data folder. Prints the endpoints, throwaway dev wallets and copy-paste
    /// commands. The next run continues with the same chain and database (`--reset` starts over); `--demo` runs
    /// the demo agent once the stack is up, then stops. Ctrl-C stops it all, anvil included.
    Dev(dev::DevArgs),
    /// The demo agent, against a running gateway on the dev chain (by default the one `dev` runs): a keyless
    /// request, the 402 catalog, a USDC payment, confirmations, the signed claim, the key, a streamed completion
    /// and /v1/usage, for credits and for a pool block. Exits non-zero naming the step that failed.
    Demo(dev::DemoArgs),
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
    /// Audit: reconcile the database against the chain, export records for accountants.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Reconcile the database against the chain: every confirmed transfer re-read and checked canonical and
    /// identical, every claim backed by confirmed transfers, no transfer claimed twice, every balance equal to the
    /// sum of its ledger, seats consistent with subscriptions. Exits non-zero on any discrepancy, naming it.
    Verify {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        /// Print the report as JSON on stdout (progress still goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Export records in a time range, as CSV or JSON (money as decimal strings and atomic integers).
    Export {
        #[arg(long, short, env = "X402_CONFIG")]
        config: PathBuf,
        /// Start (inclusive): YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or unix seconds (UTC).
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive), same forms.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        /// What to export.
        #[arg(long, value_enum, default_value_t = ExportWhat::Payments)]
        what: ExportWhat,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Csv,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportWhat {
    /// Transfers to payTo (every status), by block time.
    Payments,
    /// Claims, by claim time.
    Claims,
    /// Ledger entries of every account, by entry time.
    Ledger,
    /// Revenue per UTC day.
    Revenue,
    /// API keys (public ids only; the time range is ignored).
    Keys,
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
    x402_gateway::logs::init(matches!(format, LogFormat::Json), filter)
        .map_err(|e| anyhow::anyhow!("--log: {e}"))
}

/// The settings of a command.
fn load(path: &std::path::Path) -> Result<Settings> {
    Ok(Config::load(path)?)
}

/// The lock that keeps a second gateway off a SQLite file (`GatewayLock`); PostgreSQL is shared by replicas, which
/// coordinate in the database (`store::replicas`).
fn lock_sqlite(settings: &Settings) -> Result<Option<x402_gateway::store::GatewayLock>> {
    match &settings.database {
        x402_gateway::config::Database::Sqlite { path } => {
            Ok(Some(x402_gateway::store::GatewayLock::acquire(path)?))
        }
        x402_gateway::config::Database::Postgres { .. } => Ok(None),
    }
}

/// `migrate`: the configured database, on either engine, brought to this binary's schema version.
async fn migrate(config: &std::path::Path) -> Result<()> {
    let settings = Config::load(config)?;
    let database = &settings.database;
    let location = match database {
        x402_gateway::config::Database::Sqlite { path } => path.display().to_string(),
        x402_gateway::config::Database::Postgres { url } => url.to_string(),
    };
    println!("database: {} {location}", database.engine());
    let report = x402_gateway::store::migrate::migrate(database).await?;
    for m in &report.applied {
        println!("applied migration {} {}", m.version, m.name);
    }
    if report.applied.is_empty() {
        println!(
            "schema version {}: up to date, nothing to apply",
            report.version
        );
    } else {
        println!(
            "schema version {} (was {}; {} migrations applied)",
            report.version,
            report.before,
            report.applied.len()
        );
    }
    Ok(())
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
            let _lock = lock_sqlite(&settings)?;
            serve(settings, shutdown).await
        }
        Command::Index { config, once } => {
            let settings = load(&config)?;
            let _lock = lock_sqlite(&settings)?;
            let store = Store::open_database(&settings.database).await?;
            // On PostgreSQL the indexer is the leader's work: wait for leadership so that a running replica's
            // indexer and this one never index at once.
            let _leadership = loop {
                if let Some(l) = store.try_lead().await? {
                    break l;
                }
                eprintln!(
                    "another gateway replica leads (runs the indexer); waiting for leadership"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
            };
            // One indexer per network, all at once: a slow network never holds up another's sync.
            let networks: Vec<_> = settings.networks().cloned().collect();
            if once {
                let mut syncs = Vec::new();
                for chain in networks {
                    let indexer = Indexer::new(chain, store.clone(), StatusHandle::default())?;
                    syncs.push(indexer.run_until_synced(shutdown.clone()));
                }
                let mut svm_syncs = Vec::new();
                for svm in settings.svm_networks.iter().cloned() {
                    let rpc = std::sync::Arc::new(
                        chain::svm::SvmRpc::new(&svm.rpc_http, svm.rpc_timeout)?
                            .for_network(svm.caip2.clone()),
                    );
                    let indexer = chain::svm::SvmIndexer::new(
                        svm,
                        rpc,
                        store.clone(),
                        StatusHandle::default(),
                    );
                    svm_syncs.push(indexer.run_until_synced(shutdown.clone()));
                }
                let (evm, svm) = futures::future::join(
                    futures::future::join_all(syncs),
                    futures::future::join_all(svm_syncs),
                )
                .await;
                for synced in evm.into_iter().chain(svm) {
                    synced?;
                }
            } else {
                let mut running = Vec::new();
                for svm in settings.svm_networks.iter().cloned() {
                    running.push(chain::svm::spawn(
                        svm,
                        store.clone(),
                        StatusHandle::default(),
                        shutdown.clone(),
                    )?);
                }
                for chain in networks {
                    running.push(chain::spawn(
                        chain,
                        store.clone(),
                        StatusHandle::default(),
                        shutdown.clone(),
                    )?);
                }
                for indexer in running {
                    indexer.await??;
                }
            }
            Ok(())
        }
        Command::Migrate { config } => migrate(&config).await,
        Command::Payments {
            config,
            status,
            json,
        } => {
            let settings = load(&config)?;
            payments(&settings, status.map(Into::into), json).await
        }
        Command::Dev(args) => dev::run(args, shutdown).await,
        Command::Demo(args) => tokio::select! {
            result = dev::demo(args) => result,
            _ = shutdown.cancelled() => anyhow::bail!("demo interrupted"),
        },
        Command::Audit { command } => audit_command(command).await,
        Command::Keys { command } => keys_command(command).await,
        Command::Accounts {
            command:
                AccountsCommand::Show {
                    config,
                    address,
                    json,
                },
        } => {
            let store = Store::open_existing(&load(&config)?.database, false).await?;
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
                (None, _) if k.suspended_at.is_some() => format!(
                    "SUSPENDED (payment {} reversed by a reorg)",
                    k.suspended_by.as_deref().unwrap_or("")
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
            let store = Store::open_existing(&load(&config)?.database, false).await?;
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
            let store = Store::open_existing(&load(&config)?.database, true).await?;
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
            let store = Store::open_existing(&load(&config)?.database, true).await?;
            let (balance, key) = billing::grant(&store, address, amount, note, now_unix()).await?;
            println!("granted {amount} USDC to {address:#x}; balance {balance} USDC");
            if let Some(key) = key {
                println!("new credit key (shown once): {}", key.full);
            }
            Ok(())
        }
    }
}

async fn audit_command(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { config, json } => {
            let settings = load(&config)?;
            let store = Store::open_existing(&settings.database, false).await?;
            eprintln!(
                "audit verify: database {}, chain {}, payTo {:#x}",
                store.path().display(),
                settings.chain.network.chain_id,
                settings.chain.pay_to
            );
            let report = x402_gateway::audit::verify::verify(&settings, &store, &mut |line| {
                eprintln!("{line}")
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            eprintln!(
                "checked {} confirmed transfers against the chain (head {}), {} claims, {} ledger rows of {} accounts, \
                 {} seats of {} subscriptions, {} usage rows, {} upto payments",
                report.transfers_checked,
                report.chain_head,
                report.claims_checked,
                report.ledger_rows_checked,
                report.accounts_checked,
                report.seats_checked,
                report.subscriptions_checked,
                report.usage_rows_checked,
                report.upto_payments_checked
            );
            for u in &report.upto_unsettled {
                eprintln!(
                    "UNSETTLED upto payment {}:{} (request {}): {} USDC owed, not settled ({}); the payer is \
                     refused until it settles",
                    u.payer,
                    u.nonce,
                    u.request_id,
                    u.owed,
                    u.last_error.as_deref().unwrap_or("no error recorded")
                );
            }
            for o in &report.overruns {
                eprintln!(
                    "OVERRUN request {} ({}, {}): the upstream went {} tokens past the bound; charged {} (the \
                     reservation), {} uncharged",
                    o.request_id, o.model, o.status, o.overrun_tokens, o.charged, o.uncharged
                );
            }
            if report.is_clean() {
                eprintln!("OK: no discrepancies");
                return Ok(());
            }
            for d in &report.discrepancies {
                eprintln!("DISCREPANCY {d}");
            }
            anyhow::bail!("{} discrepancies found", report.discrepancies.len())
        }
        AuditCommand::Export {
            config,
            from,
            to,
            format,
            what,
            out,
        } => {
            use std::io::Write;
            use x402_gateway::audit::{self, ClaimFilter, Dataset, PaymentFilter};
            let time = |name: &str, v: &Option<String>| -> Result<Option<i64>> {
                v.as_deref()
                    .map(|s| {
                        audit::parse_time(s).with_context(|| {
                            format!("--{name} `{s}`: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or unix seconds")
                        })
                    })
                    .transpose()
            };
            let (from, to) = (time("from", &from)?, time("to", &to)?);
            let store = Store::open_existing(&load(&config)?.database, false).await?;
            let mut w: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let csv = matches!(format, ExportFormat::Csv);
            let dataset = match what {
                ExportWhat::Revenue => {
                    let rows = audit::revenue(&store, from, to).await?;
                    if csv {
                        write!(w, "{}", audit::csv_header(audit::REVENUE_COLUMNS))?;
                        for r in &rows {
                            write!(w, "{}", audit::csv_line(audit::REVENUE_COLUMNS, r))?;
                        }
                    } else {
                        serde_json::to_writer_pretty(&mut w, &rows)?;
                        writeln!(w)?;
                    }
                    w.flush()?;
                    return Ok(());
                }
                ExportWhat::Payments => Dataset::Payments(PaymentFilter {
                    from_time: from,
                    to_time: to,
                    ..Default::default()
                }),
                ExportWhat::Claims => Dataset::Claims(ClaimFilter {
                    from_time: from,
                    to_time: to,
                    ..Default::default()
                }),
                ExportWhat::Ledger => Dataset::Ledger {
                    account: None,
                    from_time: from,
                    to_time: to,
                },
                ExportWhat::Keys => Dataset::Keys { account: None },
            };
            let columns = dataset.columns();
            if csv {
                write!(w, "{}", audit::csv_header(columns))?;
            } else {
                write!(w, "[")?;
            }
            let mut after = None;
            let mut n = 0u64;
            loop {
                let page =
                    audit::read_page(&store, dataset.clone(), after, audit::MAX_LIMIT, now_unix())
                        .await?;
                for row in &page.rows {
                    if csv {
                        write!(w, "{}", audit::csv_line(columns, row))?;
                    } else {
                        write!(
                            w,
                            "{}\n  {}",
                            if n == 0 { "" } else { "," },
                            serde_json::to_string(row)?
                        )?;
                    }
                    n += 1;
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            if !csv {
                writeln!(w, "{}]", if n == 0 { "" } else { "\n" })?;
            }
            w.flush()?;
            if out.is_some() {
                eprintln!("exported {n} rows");
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
    let store = Store::open_existing(&settings.database, false).await?;
    let mut heads = std::collections::HashMap::new();
    for chain in settings.networks() {
        let network = chain.network.caip2();
        let head = store.checkpoint(&network).await?.map(|c| c.number);
        heads.insert(network, head);
    }
    let head_of =
        |t: &x402_gateway::store::transfers::Transfer| heads.get(&t.network).copied().flatten();
    let rows = store.list_transfers(status).await?;
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|t| {
                serde_json::json!({
                    "network": t.network,
                    "txHash": t.tx_hash,
                    "logIndex": t.log_index,
                    "blockNumber": t.block_number,
                    "blockHash": t.block_hash,
                    "from": t.from,
                    "to": t.to,
                    "valueUsdc": t.value.to_string(),
                    "valueAtomic": t.value.atomic().to_string(),
                    "status": t.status.as_str(),
                    "confirmations": t.confirmations(head_of(t)),
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
        "{:<16}  {:<66}  {:>5}  {:>10}  {:<66}  {:<42}  {:>14}  {:>16}  {:<9}  {:>5}",
        "NETWORK",
        "TX HASH",
        "LOG",
        "BLOCK",
        "BLOCK HASH",
        "FROM",
        "USDC",
        "ATOMIC",
        "STATUS",
        "CONF"
    );
    for t in &rows {
        println!(
            "{:<16}  {:<66}  {:>5}  {:>10}  {:<66}  {:<42}  {:>14}  {:>16}  {:<9}  {:>5}",
            t.network,
            t.tx_hash,
            t.log_index,
            t.block_number,
            t.block_hash,
            t.from,
            t.value.to_string(),
            t.value.atomic(),
            t.status.as_str(),
            t.confirmations(head_of(t))
        );
    }
    let heads: Vec<String> = settings
        .networks()
        .map(|n| {
            let id = n.network.caip2();
            let head = heads.get(&id).copied().flatten();
            format!(
                "{id} {}",
                head.map_or("none".to_string(), |h| h.to_string())
            )
        })
        .collect();
    println!(
        "{} transfers; indexed heads: {}",
        rows.len(),
        heads.join(", ")
    );
    Ok(())
}
