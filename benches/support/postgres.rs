//! What the benchmarks that run on PostgreSQL share: a fresh, migrated database on the server that
//! `X402_TEST_POSTGRES_URL` names (`scripts/postgres-test-cluster` starts a throwaway one). Included with
//! `#[path = "support/postgres.rs"] mod postgres;`.

use x402_gateway::config::{Database, PostgresUrl};

/// The server to create benchmark databases on, if one is named.
pub fn server() -> Option<String> {
    std::env::var("X402_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A fresh database on `server`, migrated to this binary's schema; prints the server's durability settings (a
/// figure measured with `fsync = off` is not comparable with SQLite's `synchronous=FULL`). Returns its URL.
pub async fn fresh_database(server: &str) -> anyhow::Result<String> {
    let name = format!("x402_bench_{:016x}", rand::random::<u64>());
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let show = |row: tokio_postgres::Row| row.get::<_, String>(0);
    println!(
        "PostgreSQL {}: fsync = {}, synchronous_commit = {}",
        show(client.query_one("SHOW server_version", &[]).await?),
        show(client.query_one("SHOW fsync", &[]).await?),
        show(client.query_one("SHOW synchronous_commit", &[]).await?)
    );
    let (base, query) = server.split_once('?').unwrap_or((server, ""));
    let root = base.rsplit_once('/').map_or(base, |(r, _)| r);
    let url = if query.is_empty() {
        format!("{root}/{name}")
    } else {
        format!("{root}/{name}?{query}")
    };
    x402_gateway::store::migrate::migrate(&Database::Postgres {
        url: PostgresUrl::new(url.clone()),
    })
    .await?;
    Ok(url)
}
