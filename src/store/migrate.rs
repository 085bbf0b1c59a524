//! `x402-gateway migrate`: brings the configured database to this binary's schema version, on either engine, and
//! says what it did. SQLite migrates exactly as `Store::open` does at every start; PostgreSQL through
//! [`super::postgres::PgStore::migrate`]. Both are idempotent.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::postgres::{Applied, MigrateReport, PgError, PgStore};
use super::{SCHEMA_SQL, Store, StoreError, migrations};
use crate::config::Database;

/// Why `migrate` failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Sqlite(#[from] StoreError),
    #[error(transparent)]
    Postgres(#[from] PgError),
}

/// Applies every pending migration to `database`.
pub async fn migrate(database: &Database) -> Result<MigrateReport, MigrateError> {
    match database {
        Database::Sqlite { path } => {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || migrate_sqlite(&path))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
        }
        Database::Postgres { url } => Ok(PgStore::connect(url)?.migrate().await?),
    }
}

fn migrate_sqlite(path: &Path) -> Result<MigrateReport, MigrateError> {
    let known = migrations(SCHEMA_SQL)?;
    let before = sqlite_version(path)?;
    // Opening migrates (and refuses a database newer than the binary); dropping the store stops its threads.
    drop(Store::open(path)?);
    let version = sqlite_version(path)?;
    Ok(MigrateReport {
        before,
        applied: known
            .into_iter()
            .filter(|m| m.version > before && m.version <= version)
            .map(|m| Applied {
                version: m.version,
                name: m.name,
            })
            .collect(),
        version,
    })
}

/// `PRAGMA user_version` of the file (0 when it does not exist yet), read without creating or changing it.
fn sqlite_version(path: &Path) -> Result<u32, StoreError> {
    if !path.exists() {
        return Ok(0);
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| {
            StoreError::Open {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    Ok(conn.pragma_query_value(None, "user_version", |row| row.get(0))?)
}
