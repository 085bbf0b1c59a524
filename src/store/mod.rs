//! The store, on two engines behind one interface, and the schema (`schema.sql`, `schema.postgres.sql`).
//!
//! - **SQLite** (the embedded default): every write runs on the single writer thread inside `BEGIN IMMEDIATE` (a
//!   deferred transaction in WAL mode can fail with `SQLITE_BUSY` at once, ignoring the busy timeout). The journal
//!   is WAL with `synchronous=FULL`: an acknowledged commit — an issued key, a debit, a checkpoint — survives a power
//!   cut. Reads run on blocking-pool threads with their own read-only connections and never wait for the writer.
//! - **PostgreSQL** (several replicas): every write is one READ COMMITTED transaction on a pooled connection, every
//!   read a REPEATABLE READ READ ONLY snapshot, both driven from the blocking pool (`sql::PgSql`). Nothing is
//!   serialised in the process: each money rule is one guarded statement or a unique key, so it holds under any
//!   number of writers; the few read-then-write sequences of the index take a transaction-scoped lock
//!   (`transfers::serialize_index_writes`).
//!
//! Both hand a closure `&dyn sql::Sql`, and the SQL of each concern is written once, in a submodule (`transfers`
//! for the indexer, `audit` for the auditor, `ops` for the status page, metrics and start-up repairs, `x402`,
//! `reversals`, `billing`, `usage`, `replicas`); this file owns connections, transactions and migrations. Billing
//! composes store functions inside one transaction it asks for (`Store::write`); nothing outside the engines names
//! a database driver (the test `only_the_engines_name_a_database_driver` keeps it so).

pub mod audit;
pub mod billing;
/// `x402-gateway migrate`, on either engine.
pub mod migrate;
pub mod ops;
/// The PostgreSQL engine: connection pool, schema and migrations.
pub mod postgres;
pub mod replicas;
pub mod reversals;
pub mod sql;
pub mod summary;
pub mod svm;
pub mod transfers;
pub mod upto;
pub mod usage;
pub mod x402;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

/// The whole schema, embedded at build time.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// Queued writes before callers wait: bounds memory when the disk is slow.
const WRITE_QUEUE: usize = 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine refused or failed a statement; `refusal` says when a constraint was the reason.
    #[error("{engine} error: {message}")]
    Database {
        engine: &'static str,
        message: String,
        refusal: Option<sql::Refusal>,
    },
    #[error("column {column}: {message}")]
    Decode { column: usize, message: String },
    #[error("no row for: {0}")]
    NoRow(String),
    #[error("cannot open database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("schema.sql: {0}")]
    Schema(String),
    #[error(
        "database {path} is at schema version {found}, newer than this binary knows ({known}); upgrade the binary"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error(
        "database {path} indexes {found}, but the config says {expected}; use another database file for another chain, token or payTo"
    )]
    BindingMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "database {path} is in use by another running x402-gateway (serve or index): its lock {lock} is held; stop that process first (one gateway per database file)"
    )]
    InUse { path: PathBuf, lock: PathBuf },
    #[error(
        "PostgreSQL database {target} is at schema version {found}, behind this binary ({known}); run `x402-gateway \
         migrate --config …` first (a gateway never migrates a shared database on its own)"
    )]
    Behind {
        target: String,
        found: u32,
        known: u32,
    },
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("the write was not committed: {0}")]
    Commit(String),
    #[error("a database task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// The constraint a refused statement broke, if that was the reason.
    pub fn refusal(&self) -> Option<sql::Refusal> {
        match self {
            StoreError::Database { refusal, .. } => *refusal,
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database {
            engine: "SQLite",
            refusal: sql::sqlite_refusal(&e),
            message: e.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Database {
            engine: "PostgreSQL",
            refusal: sql::postgres_refusal(&e),
            message: postgres::db_error(&e),
        }
    }
}

/// Delivers a job's result once the batch it ran in has committed (`None`) or failed to (`Some(reason)`).
type Finish = Box<dyn FnOnce(Option<String>) + Send>;
/// Runs inside a savepoint of the batch's transaction; says whether it succeeded (keep its changes).
type JobFn = Box<dyn FnOnce(&Transaction<'_>) -> (bool, Finish) + Send>;

/// A queued write and how durable its commit must be before its caller hears "done".
struct WriteJob {
    run: JobFn,
    durability: Durability,
}

/// How far a commit must reach before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced to disk (`synchronous=FULL`): survives a power loss. Everything that moves money or mints keys.
    Full,
    /// Written to the WAL but not synced (`synchronous=NORMAL`): survives a crash of the process, not a power
    /// loss. For per-request metering only (unless `[database] fsync_metering`): a power cut can drop the last
    /// reservations and settlements, and each loss favours the customer — a lost hold vanishes with its
    /// `in_flight` row; a lost settlement leaves the row `in_flight`, refunded at the next start. The next `Full`
    /// commit syncs every earlier WAL frame, so order is kept. It takes the fsync off each metered request.
    Relaxed,
}

/// Connections a gateway's PostgreSQL pool holds at most: writes and reads each hold one for a transaction's
/// length, on blocking-pool threads.
const PG_POOL_SIZE: usize = 32;

fn pg_open_error(e: postgres::PgError) -> StoreError {
    match e {
        postgres::PgError::TooNew {
            target,
            found,
            known,
        } => StoreError::TooNew {
            path: PathBuf::from(target),
            found,
            known,
        },
        other => StoreError::Open {
            path: PathBuf::from("PostgreSQL"),
            message: other.to_string(),
        },
    }
}

fn pg_pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Database {
        engine: "PostgreSQL",
        message: postgres::pool_error(&e),
        refusal: None,
    }
}

/// Runs `f` in one PostgreSQL transaction on a pooled connection (READ COMMITTED: every money rule is a guarded
/// statement or a unique key, which hold under any number of writers); commits if it returns `Ok`.
fn pg_write<T, E>(
    pool: &deadpool_postgres::Pool,
    durability: Durability,
    f: impl FnOnce(&dyn sql::Sql) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    let handle = tokio::runtime::Handle::current();
    let mut client = handle.block_on(pool.get()).map_err(pg_pool_error)?;
    let tx = handle
        .block_on(client.transaction())
        .map_err(StoreError::from)?;
    if durability == Durability::Relaxed {
        // PostgreSQL's form of the same trade: the commit is acknowledged before its WAL record is flushed.
        handle
            .block_on(tx.batch_execute("SET LOCAL synchronous_commit = off"))
            .map_err(StoreError::from)?;
    }
    let result = f(&sql::PgSql::new(&tx, &handle));
    match result {
        Ok(value) => {
            handle
                .block_on(tx.commit())
                .map_err(|e| StoreError::Commit(postgres::db_error(&e)))?;
            Ok(value)
        }
        Err(e) => {
            let _ = handle.block_on(tx.rollback());
            Err(e)
        }
    }
}

/// Runs `f` in a read-only REPEATABLE READ transaction: one consistent snapshot, like a SQLite reader in WAL mode.
fn pg_read<T, E>(
    pool: &deadpool_postgres::Pool,
    f: impl FnOnce(&dyn sql::Sql) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    let handle = tokio::runtime::Handle::current();
    let mut client = handle.block_on(pool.get()).map_err(pg_pool_error)?;
    let tx = handle
        .block_on(
            client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start(),
        )
        .map_err(StoreError::from)?;
    let result = f(&sql::PgSql::new(&tx, &handle));
    let _ = handle.block_on(tx.rollback());
    result
}

/// Most jobs committed together by one `COMMIT` (group commit).
const MAX_BATCH: usize = 256;

/// A handle to the database, SQLite or PostgreSQL; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    engine: Arc<EngineHandle>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("engine", &self.engine().name())
            .field("at", &self.inner.path)
            .finish()
    }
}

/// The engine behind a [`Store`].
enum EngineHandle {
    Sqlite,
    Postgres(PgHandle),
}

/// A PostgreSQL pool: every write is one transaction on a pooled connection, driven from a blocking-pool thread.
struct PgHandle {
    pool: deadpool_postgres::Pool,
}

struct Inner {
    /// The SQLite file, or for PostgreSQL the server's URL without credentials (for messages).
    path: PathBuf,
    /// Dropped with the last handle, which stops the checkpoint thread (SQLite).
    _checkpointer: Option<std::sync::mpsc::Sender<()>>,
    /// Durability of per-request metering writes; `Relaxed` unless the operator asks for more.
    metering_full: std::sync::atomic::AtomicBool,
    /// The SQLite writer thread's queue (`None` on PostgreSQL).
    writer: Option<mpsc::Sender<WriteJob>>,
    readers: Mutex<Vec<Connection>>,
    /// This process's replica id on PostgreSQL (`store::replicas`); `None` on SQLite.
    replica: Option<String>,
}

/// Current unix time in seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database, applies pending migrations and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        let mut conn = Connection::open(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        configure(&conn)?;
        migrate(&mut conn, path)?;
        // The checkpoint thread does this work (see `start_checkpointer`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;

        let (tx, mut rx) = mpsc::channel::<WriteJob>(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut synchronous = Durability::Full;
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    // One job that needs a synced commit makes the whole batch's commit synced.
                    let wanted = if batch.iter().any(|j| j.durability == Durability::Full) {
                        Durability::Full
                    } else {
                        Durability::Relaxed
                    };
                    if wanted != synchronous {
                        let level = match wanted {
                            Durability::Full => "FULL",
                            Durability::Relaxed => "NORMAL",
                        };
                        match conn.pragma_update(None, "synchronous", level) {
                            Ok(()) => synchronous = wanted,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot set synchronous={level}");
                                // Never acknowledge a durable write on a weaker setting: dropping the jobs
                                // drops their reply senders, so each caller gets `WriterGone`.
                                if wanted == Durability::Full {
                                    drop(batch);
                                    continue;
                                }
                            }
                        }
                    }
                    run_batch(&mut conn, batch);
                }
            })
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;

        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                _checkpointer: Some(start_checkpointer(path)?),
                metering_full: std::sync::atomic::AtomicBool::new(false),
                writer: Some(tx),
                readers: Mutex::new(Vec::new()),
                replica: None,
            }),
            engine: Arc::new(EngineHandle::Sqlite),
        })
    }

    /// Connects to PostgreSQL and checks its schema is exactly this binary's (`x402-gateway migrate` brings it
    /// there: a running gateway never migrates a shared database behind the other replicas' backs).
    pub async fn open_postgres(url: &crate::config::PostgresUrl) -> Result<Store, StoreError> {
        let pg = postgres::PgStore::connect_with(url, PG_POOL_SIZE).map_err(pg_open_error)?;
        let target = pg.target().to_string();
        let version = pg.schema_version().await.map_err(pg_open_error)?;
        let known = postgres::schema().map_err(pg_open_error)?.len() as u32;
        if version < known {
            return Err(StoreError::Behind {
                target,
                found: version,
                known,
            });
        }
        Ok(Store {
            inner: Arc::new(Inner {
                path: PathBuf::from(&target),
                _checkpointer: None,
                metering_full: std::sync::atomic::AtomicBool::new(false),
                writer: None,
                readers: Mutex::new(Vec::new()),
                replica: Some(replicas::new_replica_id()),
            }),
            engine: Arc::new(EngineHandle::Postgres(PgHandle {
                pool: pg.pool().clone(),
            })),
        })
    }

    /// Opens an existing SQLite file for reading only (operator commands: `payments`, `keys list`, `accounts show`,
    /// `audit`): a path that does not exist is refused (a mistyped `[database] path` must not read as an empty
    /// database), so is a file whose schema is not exactly this binary's (`migrate` brings it there); nothing is
    /// created, migrated or written, and writes through this store fail with [`StoreError::WriterGone`].
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                message: "no database file here; check `[database] path` in the config (`serve` or `migrate` \
                          creates it)"
                    .into(),
            });
        }
        let conn = open_reader(path)?;
        let known = migrations(SCHEMA_SQL)?.len() as u32;
        let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found,
                known,
            });
        }
        if found < known {
            return Err(StoreError::Behind {
                target: path.display().to_string(),
                found,
                known,
            });
        }
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                _checkpointer: None,
                metering_full: std::sync::atomic::AtomicBool::new(false),
                writer: None,
                readers: Mutex::new(vec![conn]),
                replica: None,
            }),
            engine: Arc::new(EngineHandle::Sqlite),
        })
    }

    /// Opens the database the config names for an operator command: [`Store::open_read_only`] for SQLite (or, with
    /// `write`, the existing file for writing, still never creating one); PostgreSQL as [`Store::open_postgres`]
    /// (which creates nothing and refuses a schema behind this binary's).
    pub async fn open_existing(
        database: &crate::config::Database,
        write: bool,
    ) -> Result<Store, StoreError> {
        match database {
            crate::config::Database::Sqlite { path } if write => {
                // Refused the same way when missing; the read-only open also checks the schema is this binary's.
                drop(Store::open_read_only(path)?);
                Store::open(path)
            }
            crate::config::Database::Sqlite { path } => Store::open_read_only(path),
            crate::config::Database::Postgres { url } => Store::open_postgres(url).await,
        }
    }

    /// Opens the database the config names: a SQLite file (created and migrated if needed) or PostgreSQL.
    pub async fn open_database(database: &crate::config::Database) -> Result<Store, StoreError> {
        match database {
            crate::config::Database::Sqlite { path } => Store::open(path),
            crate::config::Database::Postgres { url } => Store::open_postgres(url).await,
        }
    }

    /// The PostgreSQL pool, when this store runs on PostgreSQL.
    fn pg_pool(&self) -> Option<&deadpool_postgres::Pool> {
        match &*self.engine {
            EngineHandle::Postgres(pg) => Some(&pg.pool),
            EngineHandle::Sqlite => None,
        }
    }

    /// Which engine this store runs on.
    pub fn engine(&self) -> sql::Engine {
        match *self.engine {
            EngineHandle::Sqlite => sql::Engine::Sqlite,
            EngineHandle::Postgres(_) => sql::Engine::Postgres,
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Sets how durable per-request metering commits are (`[database] fsync_metering`).
    pub fn set_metering_durability(&self, durability: Durability) {
        self.inner.metering_full.store(
            durability == Durability::Full,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The durability for per-request metering commits: reservations, settlements, pool usage rows.
    pub fn metering_durability(&self) -> Durability {
        if self
            .inner
            .metering_full
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            Durability::Full
        } else {
            Durability::Relaxed
        }
    }

    /// Runs `f` in one write transaction — on SQLite a `BEGIN IMMEDIATE` batch on the writer thread, on
    /// PostgreSQL a transaction on a pooled connection — commits if it returns `Ok`, and answers once the commit is
    /// durable.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&dyn sql::Sql) -> Result<T, E> + Send + 'static,
    {
        self.write_with(Durability::Full, f).await
    }

    /// Like [`Store::write`], with the durability the caller needs (see [`Durability::Relaxed`] for when a
    /// weaker one is right).
    pub async fn write_with<T, E, F>(&self, durability: Durability, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&dyn sql::Sql) -> Result<T, E> + Send + 'static,
    {
        if let EngineHandle::Postgres(pg) = &*self.engine {
            let pool = pg.pool.clone();
            return tokio::task::spawn_blocking(move || pg_write(&pool, durability, f))
                .await
                .map_err(|e| E::from(StoreError::Task(e.to_string())))?;
        }
        let Some(writer) = self.inner.writer.clone() else {
            return Err(E::from(StoreError::WriterGone));
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let run: JobFn = Box::new(move |tx: &Transaction<'_>| match f(tx) {
            Ok(value) => {
                let finish: Finish = Box::new(move |commit_error| {
                    let _ = reply_tx.send(match commit_error {
                        None => Ok(value),
                        Some(reason) => Err(E::from(StoreError::Commit(reason))),
                    });
                });
                (true, finish)
            }
            Err(e) => {
                let finish: Finish = Box::new(move |_| {
                    let _ = reply_tx.send(Err(e));
                });
                (false, finish)
            }
        });
        writer
            .send(WriteJob { run, durability })
            .await
            .map_err(|_| E::from(StoreError::WriterGone))?;
        reply_rx
            .await
            .map_err(|_| E::from(StoreError::WriterGone))?
    }

    /// Runs `f` on a consistent read-only snapshot on the blocking pool (a SQLite reader connection in WAL mode, or
    /// a PostgreSQL REPEATABLE READ READ ONLY transaction); it never waits for the writer.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&dyn sql::Sql) -> Result<T, E> + Send + 'static,
    {
        if let EngineHandle::Postgres(pg) = &*self.engine {
            let pool = pg.pool.clone();
            return tokio::task::spawn_blocking(move || pg_read(&pool, f))
                .await
                .map_err(|e| E::from(StoreError::Task(e.to_string())))?;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock().map(|mut pool| pool.pop()) {
                Ok(Some(conn)) => conn,
                _ => open_reader(&inner.path).map_err(E::from)?,
            };
            // One read transaction: every statement of `f` sees the same snapshot (WAL), as on PostgreSQL.
            if let Err(e) = conn.execute_batch("BEGIN") {
                return Err(E::from(StoreError::from(e)));
            }
            let result = f(&conn);
            let _ = conn.execute_batch("COMMIT");
            if let Ok(mut pool) = inner.readers.lock() {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| E::from(StoreError::Task(e.to_string())))?
    }
}

/// Group commit: runs queued jobs in ONE `BEGIN IMMEDIATE` transaction, each inside its own savepoint (a job that
/// fails is rolled back alone), then commits once and only then answers every job. Each job is still atomic and
/// isolated (jobs run one after another on this thread), and nobody hears "done" before the fsync: one fsync is
/// shared by the batch instead of paid per job.
fn run_batch(conn: &mut Connection, batch: Vec<WriteJob>) {
    let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // The jobs never ran; dropping them drops their reply senders, so each caller gets `WriterGone`.
            tracing::error!(error = %e, "cannot begin a write transaction; {} writes dropped", batch.len());
            return;
        }
    };
    let mut broken: Option<String> = None;
    for job in batch {
        if let Some(reason) = &broken {
            // Not run: the transaction is gone; dropping the job drops its reply sender (`WriterGone`).
            tracing::error!("write skipped: {reason}");
            drop(job);
            continue;
        }
        if let Err(e) = tx.execute_batch("SAVEPOINT job") {
            broken = Some(format!("savepoint: {e}"));
            drop(job);
            continue;
        }
        let (ok, finish) = (job.run)(&tx);
        let end = if ok {
            tx.execute_batch("RELEASE job")
        } else {
            tx.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = end {
            broken = Some(format!("ending a savepoint: {e}"));
        }
        // Some errors (disk full, I/O) make SQLite roll back the whole transaction on its own.
        if tx.is_autocommit() {
            broken = Some("the transaction was rolled back by SQLite after an error".to_string());
        }
        finishers.push(finish);
    }
    let commit_error = match broken {
        Some(reason) => {
            let _ = tx.rollback();
            Some(reason)
        }
        None => tx.commit().err().map(|e| e.to_string()),
    };
    for finish in finishers {
        finish(commit_error.clone());
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// How often the background thread copies the WAL back into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Moves WAL checkpoints off the writer: SQLite's automatic checkpoint runs inside whichever commit crosses 1,000
/// WAL pages and stalls every write queued behind it (it shows as the p99 of metered requests). The writer turns it
/// off; this thread runs a `PASSIVE` checkpoint (never blocks writers or readers) every [`CHECKPOINT_EVERY`] on its
/// own connection, and a last one when the store is dropped.
fn start_checkpointer(path: &Path) -> Result<std::sync::mpsc::Sender<()>, StoreError> {
    let conn = Connection::open(path).map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            loop {
                let last = matches!(
                    stopped.recv_timeout(CHECKPOINT_EVERY),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
                );
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                }
                if last {
                    break;
                }
            }
        })
        .map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(stop)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// One migration of `schema.sql`.
#[derive(Debug, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: String,
    pub sql: String,
}

/// Splits a schema file (`schema.sql`, and `schema.postgres.sql` for PostgreSQL) at its `-- migration: N name`
/// lines; versions must run 1, 2, 3 … without gaps.
pub fn migrations(schema: &str) -> Result<Vec<Migration>, StoreError> {
    let mut out: Vec<Migration> = Vec::new();
    for line in schema.lines() {
        if let Some(rest) = line.strip_prefix("-- migration:") {
            let mut parts = rest.trim().splitn(2, ' ');
            let version: u32 = parts
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StoreError::Schema(format!("bad migration line `{line}`")))?;
            let expected = out.len() as u32 + 1;
            if version != expected {
                return Err(StoreError::Schema(format!(
                    "migration {version} found where {expected} was expected"
                )));
            }
            out.push(Migration {
                version,
                name: parts.next().unwrap_or("").trim().to_string(),
                sql: String::new(),
            });
        } else if let Some(current) = out.last_mut() {
            current.sql.push_str(line);
            current.sql.push('\n');
        }
    }
    if out.is_empty() {
        return Err(StoreError::Schema("no `-- migration: N` sections".into()));
    }
    Ok(out)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let all = migrations(SCHEMA_SQL)?;
    let known = all.len() as u32;
    let current: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if current > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: current,
            known,
        });
    }
    for migration in all.into_iter().filter(|m| m.version > current) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have applied it while we waited for the write lock.
        let applied: u32 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if applied >= migration.version {
            continue;
        }
        tx.execute_batch(&migration.sql).map_err(|e| {
            StoreError::Schema(format!(
                "migration {} ({}): {e}",
                migration.version, migration.name
            ))
        })?;
        tx.pragma_update(None, "user_version", migration.version)?;
        tx.commit()?;
        tracing::info!(version = migration.version, name = %migration.name, "applied database migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files outside `store/` that may still name the SQLite driver, relative to `src/`. The metering rework moves
    /// their SQL under `store/` and shrinks this list; nothing may be added to it.
    /// The files that name a database driver: the engines themselves. Every other store file writes its SQL once,
    /// against `&dyn Sql` (a test module may open a raw connection to build an old database).
    const DRIVER_FILES: &[&str] = &[
        "store/mod.rs",
        "store/sql.rs",
        "store/migrate.rs",
        "store/replicas.rs",
    ];
    const DRIVERS: &[&str] = &["rusqlite", "tokio_postgres", "deadpool_postgres"];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }

    /// SQL lives only under `store/`: nothing else names the driver (issue 14), so a second engine can be added
    /// behind the same `Store` methods without touching the callers.
    #[test]
    fn only_the_engines_name_a_database_driver() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(
            files.len() > 10,
            "found only {files:?} under {}",
            src.display()
        );
        let mut offenders = Vec::new();
        for file in files {
            let relative = file
                .strip_prefix(&src)
                .unwrap_or(&file)
                .to_string_lossy()
                .replace('\\', "/");
            if relative.starts_with("store/postgres/") || DRIVER_FILES.contains(&relative.as_str())
            {
                continue;
            }
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            // A store file's test module may build fixtures with a raw connection.
            let code = match text.find("#[cfg(test)]") {
                Some(i) if relative.starts_with("store/") => &text[..i],
                _ => &text[..],
            };
            for (n, line) in code.lines().enumerate() {
                if DRIVERS.iter().any(|d| line.contains(d)) {
                    offenders.push(format!("src/{relative}:{}: {}", n + 1, line.trim()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "a database driver is named outside the engines (write the SQL once in a store function on `&dyn Sql`):\n{}",
            offenders.join("\n")
        );
    }

    #[test]
    fn schema_splits_into_numbered_migrations() {
        let all = migrations(SCHEMA_SQL).unwrap();
        assert_eq!(all[0].version, 1);
        assert!(all[0].sql.contains("CREATE TABLE transfers"));
        assert!(migrations("-- migration: 2 skip\nSELECT 1;").is_err());
    }

    /// The writer's `synchronous` level as a job sees it while its batch runs.
    async fn synchronous_seen_by(store: &Store, durability: Durability) -> i64 {
        store
            .write_with(durability, |tx| -> Result<i64, StoreError> {
                tx.query_value("PRAGMA synchronous", crate::params![])
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn relaxed_writes_skip_the_sync_and_durable_ones_get_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let store = Store::open(&path).unwrap();
        // SQLite's codes: 1 = NORMAL (WAL written, not synced), 2 = FULL.
        assert_eq!(synchronous_seen_by(&store, Durability::Full).await, 2);
        assert_eq!(synchronous_seen_by(&store, Durability::Relaxed).await, 1);
        assert_eq!(synchronous_seen_by(&store, Durability::Full).await, 2);
        // A relaxed commit is still in the WAL for the next process (a crash of the process loses nothing).
        store
            .write_with(Durability::Relaxed, |tx| -> Result<(), StoreError> {
                tx.execute(
                    "INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at) VALUES ('n', 9, '0xcd', 0)",
                    crate::params![],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        drop(store);
        let reopened = Store::open(&path).unwrap();
        let got: i64 = reopened
            .read(|c| -> Result<i64, StoreError> {
                c.query_value(
                    "SELECT block_number FROM network_checkpoints",
                    crate::params![],
                )
            })
            .await
            .unwrap();
        assert_eq!(got, 9);
    }

    #[tokio::test]
    async fn the_background_thread_checkpoints_the_wal_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = Store::open(&path).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        store
            .write(|tx| -> Result<(), StoreError> {
                tx.execute("CREATE TABLE filler (b BLOB)", crate::params![])?;
                for _ in 0..64 {
                    tx.execute(
                        "INSERT INTO filler VALUES (zeroblob(4096))",
                        crate::params![],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        // The writer never checkpoints (wal_autocheckpoint = 0): only the checkpoint thread can move the pages.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::metadata(&path).unwrap().len() < before + 64 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not checkpointed into {}",
                path.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn opens_migrates_writes_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.db");
        let store = Store::open(&path).unwrap();
        let n: i64 = store
            .write(|tx| -> Result<i64, StoreError> {
                tx.execute(
                    "INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at) VALUES ('n', 7, '0xab', 0)",
                    crate::params![],
                )?;
                tx.query_value("SELECT count(*) FROM network_checkpoints", crate::params![])
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
        let got: i64 = store
            .read(|c| -> Result<i64, StoreError> {
                c.query_value(
                    "SELECT block_number FROM network_checkpoints",
                    crate::params![],
                )
            })
            .await
            .unwrap();
        assert_eq!(got, 7);
        drop(store);
        // Re-opening applies nothing new and keeps the data.
        let store = Store::open(&path).unwrap();
        let mode: String = store
            .read(|c| -> Result<String, StoreError> {
                c.query_value("PRAGMA journal_mode", crate::params![])
            })
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn failed_write_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("x.db")).unwrap();
        let result: Result<(), StoreError> = store
            .write(|tx| {
                tx.execute(
                    "INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at) VALUES ('n', 7, '0xab', 0)",
                    crate::params![],
                )?;
                Err(StoreError::Schema("boom".into()))
            })
            .await;
        assert!(result.is_err());
        let count: i64 = store
            .read(|c| -> Result<i64, StoreError> {
                c.query_value("SELECT count(*) FROM network_checkpoints", crate::params![])
            })
            .await
            .unwrap();
        assert_eq!(count, 0);
    }
}

/// An exclusive, process-wide claim on a database file for the commands that run the gateway (`serve`, `index`).
///
/// SQLite would serialize two gateways' writes, but two gateways on one file still act on each other's state: a
/// start-up refunds the reservations "left by a crashed process" while the other process is serving them, and two
/// indexers race over the checkpoint. The lock is an advisory `flock` on `<database>.lock`, which the kernel
/// releases when the holder exits, however it exits (SIGKILL included), so a restart never finds a stale lock.
/// The operator commands (`payments`, `keys`, `accounts`, `audit`) do not take it: they are meant to run beside
/// a live gateway.
#[derive(Debug)]
pub struct GatewayLock {
    _file: std::fs::File,
}

impl GatewayLock {
    /// Takes the lock for `database`, or says which process class holds it.
    pub fn acquire(database: &Path) -> Result<GatewayLock, StoreError> {
        let mut name = database.as_os_str().to_os_string();
        name.push(".lock");
        let lock = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|e| StoreError::Open {
                path: lock.clone(),
                message: e.to_string(),
            })?;
        match file.try_lock() {
            Ok(()) => Ok(GatewayLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
                path: database.to_path_buf(),
                lock,
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Open {
                path: lock,
                message: e.to_string(),
            }),
        }
    }
}
