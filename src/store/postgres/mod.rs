//! The PostgreSQL engine: the connection pool and the migrations of `schema.postgres.sql`. It owns the PostgreSQL
//! schema's version: migrations run in order, one transaction each, serialised by an advisory lock (so two
//! `migrate` runs, or several replicas starting at once, apply each migration exactly once), and a database that is
//! ahead of this binary, or whose history differs, is refused.
//!
//! Queries are not here: every store function is written once against `store::sql::Sql` and runs on either engine
//! (`Store::open_postgres` builds its pool with [`PgStore::connect_with`]; `store::sql::PgSql` drives it).
//!
//! Driver: tokio-postgres (async, pure Rust) with deadpool-postgres (a pool with no background task of its own).
//! TLS is rustls (already in the build for HTTPS) through tokio-postgres-rustls, with the platform's trust store
//! (rustls-platform-verifier: on Linux the system CA bundle, or `SSL_CERT_FILE`), so a private CA is trusted the
//! way the rest of the machine trusts it. `sslmode` follows libpq: `prefer` (the default) tries TLS and falls back
//! to plain only when the server does not offer it, `require` insists (and verifies the certificate: unlike libpq,
//! rustls never accepts an unverified one), `disable` never tries.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls_platform_verifier::ConfigVerifierExt;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PostgresUrl;

/// The whole PostgreSQL schema, embedded at build time.
pub const SCHEMA_POSTGRES_SQL: &str = include_str!("../../../schema.postgres.sql");

/// Connections a pool holds at most. `migrate` needs one; the store layer, once ported, sizes its own.
const POOL_SIZE: usize = 4;

/// How long connecting may take when the URL does not say (`connect_timeout`): a wrong host fails, never hangs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Key of the transaction-scoped advisory lock that serialises migrations (any constant; "x402mig" in ASCII).
const MIGRATION_LOCK: i64 = 0x0078_3430_326d_6967;

/// Why a PostgreSQL operation failed. Messages name the server by its redacted URL, never the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL {target}: {message}")]
    Connect { target: String, message: String },
    #[error("PostgreSQL {target}: {message}")]
    Query { target: String, message: String },
    #[error("schema.postgres.sql: {0}")]
    Schema(String),
    #[error(
        "PostgreSQL database {target} is at schema version {found}, newer than this binary knows ({known}); upgrade \
         the binary"
    )]
    TooNew {
        target: String,
        found: u32,
        known: u32,
    },
    #[error(
        "PostgreSQL database {target} has a migration history this binary does not know: {message}"
    )]
    History { target: String, message: String },
}

/// One migration applied by [`PgStore::migrate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: u32,
    pub name: String,
}

/// What [`PgStore::migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Schema version before the run (0: an empty database).
    pub before: u32,
    /// Migrations applied by this run, in order (empty when the database was current).
    pub applied: Vec<Applied>,
    /// Schema version after the run: the last migration this binary knows.
    pub version: u32,
}

/// A pool of connections to one PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The URL without credentials, for messages.
    target: String,
}

impl PgStore {
    /// Builds the pool; the first connection is made by the first query (so a bad URL fails there, with its
    /// reason).
    pub fn connect(url: &PostgresUrl) -> Result<PgStore, PgError> {
        Self::connect_to(url.expose(), url.to_string(), POOL_SIZE)
    }

    /// [`PgStore::connect`] with a pool of `size` connections.
    pub fn connect_with(url: &PostgresUrl, size: usize) -> Result<PgStore, PgError> {
        Self::connect_to(url.expose(), url.to_string(), size)
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// [`PgStore::connect`] with the URL in the clear and its redacted form for messages.
    fn connect_to(url: &str, target: String, size: usize) -> Result<PgStore, PgError> {
        let connect_error = |message: String| PgError::Connect {
            target: target.clone(),
            message,
        };
        // The parser's message never quotes the URL, so it cannot leak the password.
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| connect_error(format!("not a valid PostgreSQL URL: {e}")))?;
        let tls = rustls::ClientConfig::with_platform_verifier()
            .map_err(|e| connect_error(format!("TLS set-up: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("x402-gateway");
        let manager = Manager::from_config(
            config,
            MakeRustlsConnect::new(tls),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(size)
            .build()
            .map_err(|e| connect_error(e.to_string()))?;
        Ok(PgStore { pool, target })
    }

    /// The server, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        self.pool.get().await.map_err(|e| PgError::Connect {
            target: self.target.clone(),
            message: pool_error(&e),
        })
    }

    fn query_error(&self, e: &tokio_postgres::Error) -> PgError {
        PgError::Query {
            target: self.target.clone(),
            message: db_error(e),
        }
    }

    /// The applied schema version (0: no migration yet), checked against this binary's migrations without
    /// changing anything: a database ahead of the binary, or with another history, is an error.
    pub async fn schema_version(&self) -> Result<u32, PgError> {
        let known = schema()?;
        let client = self.client().await?;
        let exists: bool = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(|e| self.query_error(&e))?
            .get(0);
        if !exists {
            return Ok(0);
        }
        let recorded = self.recorded_history(&**client).await?;
        self.check_history(&recorded, &known)
    }

    /// The migrations `schema_migrations` records, in order: (version, name).
    async fn recorded_history(
        &self,
        c: &impl tokio_postgres::GenericClient,
    ) -> Result<Vec<(i64, String)>, PgError> {
        let rows = c
            .query(
                "SELECT version, name FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(|e| self.query_error(&e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Applies every pending migration of `schema.postgres.sql`, each in its own transaction that also records it
    /// in `schema_migrations`. Idempotent: a current database is left as it is.
    pub async fn migrate(&self) -> Result<MigrateReport, PgError> {
        let known = schema()?;
        let mut client = self.client().await?;
        let mut before = None;
        let mut applied = Vec::new();
        loop {
            let tx = client
                .transaction()
                .await
                .map_err(|e| self.query_error(&e))?;
            // Held until this transaction ends: a concurrent migrator waits here, then sees what we applied.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(|e| self.query_error(&e))?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    BIGINT PRIMARY KEY,
                     name       TEXT   NOT NULL,
                     applied_at BIGINT NOT NULL
                 )",
            )
            .await
            .map_err(|e| self.query_error(&e))?;
            let recorded = self.recorded_history(&*tx).await?;
            let current = self.check_history(&recorded, &known)?;
            before.get_or_insert(current);
            let Some(next) = known.iter().find(|m| m.version == current + 1) else {
                // Nothing left: the empty transaction (and the lock) ends here.
                tx.commit().await.map_err(|e| self.query_error(&e))?;
                break;
            };
            tx.batch_execute(&next.sql)
                .await
                .map_err(|e| PgError::Query {
                    target: self.target.clone(),
                    message: format!(
                        "migration {} ({}): {}",
                        next.version,
                        next.name,
                        db_error(&e)
                    ),
                })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&i64::from(next.version), &next.name, &super::now_unix()],
            )
            .await
            .map_err(|e| self.query_error(&e))?;
            tx.commit().await.map_err(|e| self.query_error(&e))?;
            tracing::info!(version = next.version, name = %next.name, "applied PostgreSQL migration");
            applied.push(Applied {
                version: next.version,
                name: next.name.clone(),
            });
        }
        Ok(MigrateReport {
            before: before.unwrap_or(0),
            applied,
            version: known.len() as u32,
        })
    }

    /// The version `recorded` amounts to, if it is a prefix of `known`: versions 1, 2, … n without gaps, each with
    /// the name this binary gives it.
    fn check_history(
        &self,
        recorded: &[(i64, String)],
        known: &[super::Migration],
    ) -> Result<u32, PgError> {
        let known_version = known.len() as u32;
        if let Some((found, _)) = recorded.last()
            && *found > i64::from(known_version)
        {
            return Err(PgError::TooNew {
                target: self.target.clone(),
                found: u32::try_from(*found).unwrap_or(u32::MAX),
                known: known_version,
            });
        }
        for (i, (version, name)) in recorded.iter().enumerate() {
            let expected = &known[i];
            if *version != i64::from(expected.version) || *name != expected.name {
                return Err(PgError::History {
                    target: self.target.clone(),
                    message: format!(
                        "schema_migrations has {version} `{name}` where this binary has {} `{}`",
                        expected.version, expected.name
                    ),
                });
            }
        }
        Ok(recorded.len() as u32)
    }
}

/// The migrations of `schema.postgres.sql`, split by the same parser as `schema.sql`.
pub fn schema() -> Result<Vec<super::Migration>, PgError> {
    super::migrations(SCHEMA_POSTGRES_SQL).map_err(|e| match e {
        super::StoreError::Schema(message) => PgError::Schema(message),
        other => PgError::Schema(other.to_string()),
    })
}

/// The server's own words (message, detail, hint) when it sent an error, else the driver's.
pub(crate) fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut out = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                out.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                out.push_str(&format!("; hint: {hint}"));
            }
            out
        }
        // `Display` of a connection error is terse ("error connecting to server"); its source says why.
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

pub(crate) fn pool_error(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_sslmode_builds_a_pool() {
        for url in [
            "postgres://gw@db.example/x",
            "postgres://gw@db.example/x?sslmode=disable",
            "postgres://gw@db.example/x?sslmode=require",
        ] {
            assert!(PgStore::connect_to(url, "t".into(), 1).is_ok(), "{url}");
        }
        let err = PgStore::connect_to(
            "postgres://gw:hunter2@db.example/x?sslmode=sometimes",
            "t".into(),
            1,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("not a valid PostgreSQL URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn postgres_schema_has_the_same_migrations_as_sqlite() {
        let pg = schema().unwrap();
        let lite = super::super::migrations(super::super::SCHEMA_SQL).unwrap();
        let names = |m: &[super::super::Migration]| {
            m.iter()
                .map(|m| (m.version, m.name.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&pg), names(&lite));
    }
}
