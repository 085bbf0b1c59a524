//! PostgreSQL, the second engine: the real `migrate` on a real PostgreSQL (scripts/test
//! starts a throwaway cluster and exports `X402_TEST_POSTGRES_URL`), the schema twin compared with SQLite's,
//! idempotence, concurrent migrators, a database ahead of the binary, the ledger rules in PL/pgSQL, and the
//! refusals of a PostgreSQL config by `serve` and of a literal URL in the file. Then the product's own money and
//! replica code raced by several `Store`s on one database, as several gateway replicas run it (see "Several
//! replicas on one database" below).
//!
//! Each test creates its own database with a random name on the shared server, so they run in parallel.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio_postgres::NoTls;
use x402_gateway::config::{Database, PostgresUrl};
use x402_gateway::params;
use x402_gateway::store::billing::LedgerError;
use x402_gateway::store::sql::Sql;
use x402_gateway::store::usage::{self, NewUsage, Outcome};
use x402_gateway::store::{Store, StoreError};
use x402_gateway::usdc::Usdc;

const BIN: &str = env!("CARGO_BIN_EXE_x402-gateway");

/// The environment variable the test configs name in `[database] url`.
const URL_VAR: &str = "X402_TEST_DATABASE_URL";

/// The server to create test databases on, or `None` (the test prints why and passes) when
/// `X402_TEST_POSTGRES_URL` is unset, unless `X402_POSTGRES_REQUIRED=1` (scripts/test) makes that a failure.
fn server_url() -> Option<String> {
    match std::env::var("X402_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("X402_POSTGRES_REQUIRED").as_deref() != Ok("1"),
                "X402_POSTGRES_REQUIRED=1 but X402_TEST_POSTGRES_URL is not set (scripts/test starts a PostgreSQL \
                 cluster and sets it)"
            );
            eprintln!(
                "SKIPPED: X402_TEST_POSTGRES_URL is not set; run scripts/test (it starts a throwaway PostgreSQL) or \
                 point it at a server where this user may CREATE DATABASE"
            );
            None
        }
    }
}

use crate::support::with_dbname;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}"));
    tokio::spawn(connection);
    client
}

/// A fresh, empty database of its own on the test server; dropped by [`TestDb::drop_db`].
struct TestDb {
    server: String,
    name: String,
    url: String,
}

impl TestDb {
    async fn create() -> Option<TestDb> {
        let server = server_url()?;
        let name = format!("x402_test_{:016x}", rand::random::<u64>());
        connect(&server)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = with_dbname(&server, &name);
        Some(TestDb { server, name, url })
    }

    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    async fn drop_db(self) {
        connect(&self.server)
            .await
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .unwrap();
    }
}

/// A config file with `database` as its `[database]` table (no chain is contacted by `migrate`).
fn write_config(dir: &Path, database: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[chain]\nnetwork = \"base\"\nrpc_http = [\"https://mainnet.base.org\"]\n\
             pay_to = \"0x1111111111111111111111111111111111111111\"\n\n[database]\n{database}\n"
        ),
    )
    .unwrap();
    path
}

fn postgres_config(dir: &Path) -> PathBuf {
    write_config(dir, &format!("url = \"${URL_VAR}\""))
}

/// Runs the real binary with `args`, `X402_TEST_DATABASE_URL` = `url`.
fn run(args: &[&str], config: &Path, url: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env(URL_VAR, url)
        .env("X402_LOG", "warn")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `migrate` that must succeed; returns its stdout.
fn migrate_ok(config: &Path, url: &str) -> String {
    let out = run(&["migrate"], config, url);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "migrate failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

fn known_migrations() -> Vec<(u32, String)> {
    x402_gateway::store::postgres::schema()
        .unwrap()
        .into_iter()
        .map(|m| (m.version, m.name))
        .collect()
}

/// A schema as a set of comparable facts, one line each: tables and their columns (name, type class,
/// nullability, default), unique column sets (PRIMARY KEY, UNIQUE, unique indexes), foreign keys, explicitly
/// created indexes, triggers. Engine-specific spellings are mapped to one class: INTEGER/BIGINT → integer, TEXT →
/// text, BLOB/BYTEA → blob. CHECK constraints are not compared (their text differs by dialect):
/// `ledger_rules_hold_on_postgres` tests the ones that guard money.
fn type_class(declared: &str) -> String {
    let t = declared.to_ascii_lowercase();
    if t.contains("int") {
        "integer".into()
    } else if t == "text" {
        "text".into()
    } else if t == "blob" || t == "bytea" {
        "blob".into()
    } else {
        format!("other({t})")
    }
}

fn column_fact(
    table: &str,
    name: &str,
    declared: &str,
    not_null: bool,
    default: Option<&str>,
) -> String {
    // PostgreSQL spells a default with its type (`'none'::text`); SQLite as written (`'none'`).
    let default = default.map(|d| d.split("::").next().unwrap_or(d).to_string());
    format!(
        "column {table}.{name} {}{}{}",
        type_class(declared),
        if not_null { " not null" } else { "" },
        default.map(|d| format!(" default {d}")).unwrap_or_default()
    )
}

fn unique_fact(table: &str, mut columns: Vec<String>, partial: bool) -> String {
    columns.sort();
    format!(
        "unique {table}({}){}",
        columns.join(", "),
        if partial { " partial" } else { "" }
    )
}

fn index_fact(name: &str, table: &str, columns: &[String], unique: bool, partial: bool) -> String {
    format!(
        "index {name} on {table}({}){}{}",
        columns.join(", "),
        if unique { " unique" } else { "" },
        if partial { " partial" } else { "" }
    )
}

fn sqlite_schema(path: &Path) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut facts = BTreeSet::new();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for table in &tables {
        facts.insert(format!("table {table}"));
        let mut pk: Vec<(i64, String)> = Vec::new();
        let mut rowid_alias: Option<String> = None;
        let mut stmt = conn
            .prepare("SELECT name, type, \"notnull\", pk, dflt_value FROM pragma_table_info(?1)")
            .unwrap();
        let columns = stmt
            .query_map([table], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .unwrap()
            .map(Result::unwrap);
        for (name, declared, not_null, pk_pos, default) in columns {
            if pk_pos > 0 {
                pk.push((pk_pos, name.clone()));
                if declared.eq_ignore_ascii_case("INTEGER") {
                    rowid_alias = Some(name.clone());
                }
            }
            // PRIMARY KEY columns count as NOT NULL: PostgreSQL makes them so, SQLite's rowid alias cannot be
            // NULL, and its other (legacy: nullable) key columns are never written NULL by the gateway.
            let not_null = not_null || pk_pos > 0;
            facts.insert(column_fact(
                table,
                &name,
                &declared,
                not_null,
                default.as_deref(),
            ));
        }
        let foreign_keys: Vec<(String, String, Option<String>)> = conn
            .prepare("SELECT \"from\", \"table\", \"to\" FROM pragma_foreign_key_list(?1)")
            .unwrap()
            .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (from, target, to) in foreign_keys {
            let to = to.unwrap_or_else(|| "(primary key)".into());
            facts.insert(format!("foreign key {table}.{from} -> {target}.{to}"));
        }
        if !pk.is_empty() {
            pk.sort();
            facts.insert(unique_fact(
                table,
                pk.into_iter().map(|(_, n)| n).collect(),
                false,
            ));
        }
        let indexes: Vec<(String, bool, String, bool)> = conn
            .prepare("SELECT name, \"unique\", origin, partial FROM pragma_index_list(?1)")
            .unwrap()
            .query_map([table], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (index, unique, origin, partial) in indexes {
            // An indexed `INTEGER PRIMARY KEY` column is the rowid, which index_info reports without a name.
            let columns: Vec<String> = conn
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .unwrap()
                .query_map([&index], |r| r.get::<_, Option<String>>(0))
                .unwrap()
                .map(|name| {
                    name.unwrap()
                        .or_else(|| rowid_alias.clone())
                        .unwrap_or_else(|| "rowid".into())
                })
                .collect();
            if unique {
                facts.insert(unique_fact(table, columns.clone(), partial));
            }
            if origin == "c" {
                facts.insert(index_fact(&index, table, &columns, unique, partial));
            }
        }
    }
    let triggers: Vec<(String, String)> = conn
        .prepare("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (table, name) in triggers {
        facts.insert(format!("trigger {table}.{name}"));
    }
    facts
}

async fn postgres_schema(client: &tokio_postgres::Client) -> BTreeSet<String> {
    let mut facts = BTreeSet::new();
    // The runner's own bookkeeping; SQLite keeps its version in `PRAGMA user_version`.
    for r in client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE' AND table_name <> 'schema_migrations'",
            &[],
        )
        .await
        .unwrap()
    {
        facts.insert(format!("table {}", r.get::<_, String>(0)));
    }
    for r in client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'NO',
                    column_default::text
             FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name <> 'schema_migrations'",
            &[],
        )
        .await
        .unwrap()
    {
        let (table, name, declared, not_null, default): (
            String,
            String,
            String,
            bool,
            Option<String>,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        facts.insert(column_fact(
            &table,
            &name,
            &declared,
            not_null,
            default.as_deref(),
        ));
    }
    // Every foreign key of the schema is on one column.
    for r in client
        .query(
            "SELECT t.relname::text, a.attname::text, ft.relname::text, fa.attname::text
             FROM pg_constraint c
             JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_class ft ON ft.oid = c.confrelid
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
             JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1]
             JOIN pg_namespace n ON n.oid = c.connamespace
             WHERE c.contype = 'f' AND n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap()
    {
        facts.insert(format!(
            "foreign key {}.{} -> {}.{}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3)
        ));
    }
    for r in client
        .query(
            "SELECT t.relname::text, i.relname::text, ix.indisunique, ix.indpred IS NOT NULL,
                    ARRAY(SELECT a.attname::text
                          FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                          JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.attnum
                          ORDER BY k.ord),
                    EXISTS (SELECT 1 FROM pg_constraint c
                            WHERE c.conindid = ix.indexrelid AND c.conrelid = ix.indrelid
                              AND c.contype IN ('p', 'u'))
             FROM pg_index ix
             JOIN pg_class i ON i.oid = ix.indexrelid
             JOIN pg_class t ON t.oid = ix.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = 'public' AND t.relname <> 'schema_migrations'",
            &[],
        )
        .await
        .unwrap()
    {
        let (table, index, unique, partial, columns, from_constraint): (
            String,
            String,
            bool,
            bool,
            Vec<String>,
            bool,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        if unique {
            facts.insert(unique_fact(&table, columns.clone(), partial));
        }
        if !from_constraint {
            facts.insert(index_fact(&index, &table, &columns, unique, partial));
        }
    }
    for r in client
        .query(
            "SELECT DISTINCT event_object_table::text, trigger_name::text FROM information_schema.triggers
             WHERE trigger_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
    {
        facts.insert(format!(
            "trigger {}.{}",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ));
    }
    facts
}

/// `migrate` on an empty PostgreSQL database and on an empty SQLite file gives the same tables, columns, unique
/// column sets, indexes and triggers: schema.sql and schema.postgres.sql are kept in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_match() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pg_dir = dir.path().join("pg");
    let lite_dir = dir.path().join("lite");
    std::fs::create_dir_all(&pg_dir).unwrap();
    std::fs::create_dir_all(&lite_dir).unwrap();

    let known = known_migrations();
    let last = known.last().unwrap().0;
    for (engine, out) in [
        ("PostgreSQL", migrate_ok(&postgres_config(&pg_dir), &db.url)),
        (
            "SQLite",
            migrate_ok(&write_config(&lite_dir, "path = \"gateway.db\""), ""),
        ),
    ] {
        assert!(out.contains(&format!("database: {engine}")), "{out}");
        for (version, name) in &known {
            assert!(
                out.contains(&format!("applied migration {version} {name}")),
                "{engine}: {out}"
            );
        }
        assert!(
            out.contains(&format!("schema version {last} (was 0;")),
            "{engine}: {out}"
        );
    }
    let lite = sqlite_schema(&lite_dir.join("gateway.db"));
    let pg = postgres_schema(&db.client().await).await;
    // The introspection itself sees what it compares (on SQLite's side; the comparison covers PostgreSQL's).
    for fact in [
        "table ledger",
        "column usage.usage_source text not null default 'none'",
        "column api_keys.secret_hash blob not null",
        "unique transfers(block_hash, log_index)",
        "foreign key ledger.account -> accounts.address",
        "index claims_origin on claims(origin_tx) partial",
        "index ledger_account on ledger(account, id)",
        "trigger ledger.ledger_append_only_update",
    ] {
        assert!(lite.contains(fact), "{fact} not in {lite:#?}");
    }
    let only_lite: Vec<_> = lite.difference(&pg).collect();
    let only_pg: Vec<_> = pg.difference(&lite).collect();
    assert!(
        only_lite.is_empty() && only_pg.is_empty(),
        "schema.sql and schema.postgres.sql differ after migrating empty databases:\n  only in SQLite: \
         {only_lite:#?}\n  only in PostgreSQL: {only_pg:#?}"
    );
    db.drop_db().await;
}

/// A second `migrate` changes nothing and says so; the versions are recorded once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_idempotent() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path());
    let known = known_migrations();
    let last = known.last().unwrap().0;
    let first = migrate_ok(&config, &db.url);
    assert!(first.contains("applied migration 1 indexer"), "{first}");
    let second = migrate_ok(&config, &db.url);
    assert!(!second.contains("applied migration"), "{second}");
    assert!(
        second.contains(&format!("schema version {last}: up to date")),
        "{second}"
    );
    let client = db.client().await;
    let recorded: Vec<(i64, String)> = client
        .query(
            "SELECT version, name FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(i64, String)> = known
        .iter()
        .map(|(v, n)| (i64::from(*v), n.clone()))
        .collect();
    assert_eq!(recorded, expected);

    // SQLite the same way.
    let lite = write_config(dir.path(), "path = \"gateway.db\"");
    assert!(migrate_ok(&lite, "").contains("applied migration 1 indexer"));
    let again = migrate_ok(&lite, "");
    assert!(
        again.contains(&format!("schema version {last}: up to date")),
        "{again}"
    );
    // And an SQLite file ahead of the binary is refused by `migrate` as by `serve`.
    rusqlite::Connection::open(dir.path().join("gateway.db"))
        .unwrap()
        .pragma_update(None, "user_version", last + 1)
        .unwrap();
    let out = run(&["migrate"], &lite, "");
    let stderr = text(&out).1;
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is at schema version {}, newer than this binary knows ({last})",
            last + 1
        )),
        "{stderr}"
    );
    drop(client);
    db.drop_db().await;
}

/// Two `migrate` runs at once on an empty database: the advisory lock makes them take turns, so each migration is
/// applied exactly once and both succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_apply_each_migration_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path());
    let spawn = || {
        Command::new(BIN)
            .args(["migrate", "--config"])
            .arg(&config)
            .env(URL_VAR, &db.url)
            .env("X402_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{:?}", text(&a));
    assert!(b.status.success(), "{:?}", text(&b));
    let applied = |o: &Output| text(o).0.matches("applied migration").count();
    assert_eq!(applied(&a) + applied(&b), known_migrations().len());
    let n: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, known_migrations().len());
    db.drop_db().await;
}

/// A database migrated by a newer binary is refused with a clear error, and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_ahead_of_the_binary_is_refused() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path());
    migrate_ok(&config, &db.url);
    let known = known_migrations().len() as i64;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, 'from_the_future', 0)",
            &[&(known + 1)],
        )
        .await
        .unwrap();
    let out = run(&["migrate"], &config, &db.url);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "is at schema version {}, newer than this binary knows ({known}); upgrade the binary",
            known + 1
        )),
        "{stderr}"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, known + 1);

    // Another history (a version this binary knows under another name) is refused too, naming both.
    client
        .batch_execute(
            "DELETE FROM schema_migrations WHERE name = 'from_the_future';
             UPDATE schema_migrations SET name = 'someone_elses' WHERE version = 2",
        )
        .await
        .unwrap();
    let out = run(&["migrate"], &config, &db.url);
    let stderr = text(&out).1;
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr
            .contains("schema_migrations has 2 `someone_elses` where this binary has 2 `checkout`"),
        "{stderr}"
    );
    drop(client);
    db.drop_db().await;
}

/// TLS (rustls, the platform's trust store): with `sslmode=require`, `migrate` connects over TLS when the server's
/// certificate chains to a trusted CA (`SSL_CERT_FILE`, as for the rest of the machine), and refuses a server whose
/// CA it does not trust. scripts/test runs the cluster with TLS on and a throwaway CA (`X402_TEST_POSTGRES_CA`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_over_tls_verifies_the_server() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let Some(ca) = std::env::var("X402_TEST_POSTGRES_CA")
        .ok()
        .filter(|c| !c.is_empty())
    else {
        assert!(
            std::env::var("X402_POSTGRES_REQUIRED").as_deref() != Ok("1"),
            "X402_POSTGRES_REQUIRED=1 but X402_TEST_POSTGRES_CA is not set"
        );
        eprintln!(
            "SKIPPED: X402_TEST_POSTGRES_CA is not set (scripts/test's cluster runs TLS with its own CA)"
        );
        return db.drop_db().await;
    };
    let url = if db.url.contains("sslmode=") {
        db.url
            .replace("sslmode=disable", "sslmode=require")
            .replace("sslmode=prefer", "sslmode=require")
    } else {
        format!(
            "{}{}sslmode=require",
            db.url,
            if db.url.contains('?') { "&" } else { "?" }
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path());
    let migrate = |ca_file: &str| {
        Command::new(BIN)
            .args(["migrate", "--config"])
            .arg(&config)
            .env(URL_VAR, &url)
            .env("X402_LOG", "warn")
            .env("SSL_CERT_FILE", ca_file)
            // No other trust roots: only SSL_CERT_FILE decides.
            .env("SSL_CERT_DIR", dir.path())
            .output()
            .unwrap()
    };
    // A CA the server's certificate does not chain to: the handshake is refused, nothing is applied.
    let stranger = dir.path().join("stranger.crt");
    let other_ca = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=stranger",
        ])
        .arg("-keyout")
        .arg(dir.path().join("stranger.key"))
        .arg("-out")
        .arg(&stranger)
        .output()
        .unwrap();
    assert!(other_ca.status.success(), "{other_ca:?}");
    let refused = migrate(stranger.to_str().unwrap());
    let (stdout, stderr) = text(&refused);
    assert!(!refused.status.success(), "{stdout}{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let client = db.client().await;
    let applied: bool = client
        .query_one("SELECT to_regclass('network_bindings') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!applied, "a migration ran over an unverified connection");

    // The right CA: migrated over TLS.
    let out = migrate(&ca);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("applied migration 1 indexer"), "{stdout}");
    drop(client);
    db.drop_db().await;
}

/// An unreachable server fails `migrate` at once, saying so, without printing the password.
#[test]
fn migrate_names_an_unreachable_server_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path());
    // Port 1 on loopback: nothing listens there.
    let out = run(
        &["migrate"],
        &config,
        "postgres://gw:hunter2@127.0.0.1:1/x402",
    );
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("PostgreSQL postgres://127.0.0.1:1/…") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!format!("{stdout}{stderr}").contains("hunter2"));
}

/// The ledger rules on PostgreSQL, through the product's own store (`Store::write`, `store::billing`): a reversal
/// may take a balance below zero and then no debit passes, not even 1, and nothing is written for it; a claim is
/// unique. Behind the functions, the database holds the same rules on its own, and the store reports each refusal
/// with the server's words: the ledger is append-only (PL/pgSQL triggers), a debit row never ends below zero and a
/// row's sign matches its kind (migration 6's constraints, replaced in place; both reported as constraint refusals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_rules_hold_on_postgres() {
    use x402_gateway::store::billing::{self, LedgerError, LedgerKind};
    use x402_gateway::store::sql::Refusal;

    let Some((db, stores)) = replicas(1).await else {
        return;
    };
    let store = &stores[0];
    let (after_reversal, refused, claims) = store
        .write(|c| -> Result<_, LedgerError> {
            let entry = |kind, amount| {
                billing::append_ledger(c, "0xaa", kind, Usdc(amount), None, None, None, 0)
            };
            assert_eq!(entry(LedgerKind::Topup, 5)?, Usdc(5));
            let after_reversal = entry(LedgerKind::Reversal, -7)?;
            let refused = match entry(LedgerKind::Debit, -1) {
                Err(LedgerError::Insufficient { balance, needed }) => Some((balance, needed)),
                Err(e) => return Err(e),
                Ok(_) => None,
            };
            let claim = || {
                billing::insert_claim(
                    c,
                    crate::support::DEV_NETWORK,
                    "0xc1",
                    "0xaa",
                    "topup",
                    Usdc(5),
                    Usdc(5),
                    None,
                    None,
                    None,
                    0,
                )
            };
            Ok((after_reversal, refused, (claim()?, claim()?)))
        })
        .await
        .unwrap();
    assert_eq!(after_reversal, Usdc(-2), "a reversal may go below zero");
    assert_eq!(
        refused,
        Some((Usdc(-2), Usdc(1))),
        "then no debit passes, not even 1"
    );
    assert_eq!(claims, (true, false), "a transaction is claimed once");
    assert_eq!(balance_checked(store, "0xaa").await, -2);

    // The database's own rules, each statement refused on its own (a refused statement ends its transaction).
    let refused = |sql: &'static str| async move {
        store
            .write(move |c| -> Result<usize, StoreError> { c.execute(sql, params![]) })
            .await
            .expect_err(sql)
    };
    for sql in ["UPDATE ledger SET note = 'x'", "DELETE FROM ledger"] {
        let e = refused(sql).await;
        assert!(e.to_string().contains("the ledger is append-only"), "{e}");
    }
    for (sql, constraint) in [
        (
            "INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at) \
             VALUES ('0xaa', 'debit', -1, -3, 0)",
            "ledger_debit_not_negative",
        ),
        (
            "INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at) \
             VALUES ('0xaa', 'topup', -1, 4, 0)",
            "ledger_sign_check",
        ),
    ] {
        let e = refused(sql).await;
        assert!(e.to_string().contains(constraint), "{e}");
        assert_eq!(e.refusal(), Some(Refusal::Constraint), "{e}");
    }
    assert_eq!(
        balance_checked(store, "0xaa").await,
        -2,
        "nothing refused was written"
    );
    drop(stores);
    db.drop_db().await;
}

/// `serve` (and the other commands) on a PostgreSQL database that is behind the binary refuse at start and say to
/// run `migrate` (a replica never migrates a shared database on its own); an unreachable server is named without
/// its password. Neither falls back to a default SQLite file.
#[tokio::test]
async fn serve_refuses_a_database_behind_the_binary_or_out_of_reach() {
    let dir = tempfile::tempdir().unwrap();
    let config = postgres_config(dir.path());
    let unreachable = "postgres://gw:hunter2@127.0.0.1:1/x402?connect_timeout=2";
    for args in [&["serve"][..], &["index", "--once"], &["payments"]] {
        let out = run(args, &config, unreachable);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains("PostgreSQL"), "{args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    if let Some(db) = TestDb::create().await {
        // An empty database: behind by every migration.
        let out = run(&["serve"], &config, &db.url);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{stdout}{stderr}");
        assert!(
            stderr.contains("behind this binary") && stderr.contains("migrate"),
            "{stderr}"
        );
        db.drop_db().await;
    }
    assert!(
        !dir.path().join("x402-gateway.db").exists(),
        "a refused command created the default SQLite file"
    );
}

/// A URL written in the file (with its password) is refused, naming the key; so is a config with both engines.
#[test]
fn a_literal_url_in_the_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "url = \"postgres://gw:hunter2@127.0.0.1:5432/x402\"",
    );
    let out = run(&["migrate"], &config, "");
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("config key `database.url`: must name an environment variable"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let both = write_config(
        dir.path(),
        &format!("url = \"${URL_VAR}\"\npath = \"g.db\""),
    );
    let out = run(&["migrate"], &both, "postgres://127.0.0.1/x");
    let stderr = text(&out).1;
    assert!(!out.status.success());
    assert!(
        stderr.contains("`database.path` and `database.url` are both set"),
        "{stderr}"
    );
}

#[test]
fn test_database_urls_keep_the_server_and_query() {
    assert_eq!(
        with_dbname("postgres://u@127.0.0.1:5433/postgres", "x"),
        "postgres://u@127.0.0.1:5433/x"
    );
    assert_eq!(
        with_dbname("postgres://u@h?sslmode=disable", "x"),
        "postgres://u@h/x?sslmode=disable"
    );
}

// ---- Several replicas on one database ---------------------------------------------------------------------------
//
// The race tests below run the product's own code: each "replica" is a `Store` opened on the same migrated database
// as `serve` opens it (its own connection pool, its own replica id), and racers call the real store functions inside
// `Store::write` transactions (`store::billing`, `store::usage`) or the real replica methods (`Store::renew_lease`,
// `Store::recover_dead_replicas`, `Store::try_lead`, `Store::take_request_slot`). Time is the caller's `now`, so
// the tests drive leases without sleeping.

/// A fresh database migrated by the product's `migrate`, and `n` replicas on it.
async fn replicas(n: usize) -> Option<(TestDb, Vec<Store>)> {
    let db = TestDb::create().await?;
    let database = Database::Postgres {
        url: PostgresUrl::new(db.url.clone()),
    };
    x402_gateway::store::migrate::migrate(&database)
        .await
        .unwrap();
    let mut stores = Vec::new();
    for _ in 0..n {
        stores.push(Store::open_database(&database).await.unwrap());
    }
    let ids: BTreeSet<&str> = stores.iter().map(|s| s.replica_id().unwrap()).collect();
    assert_eq!(ids.len(), n, "each replica has an id of its own");
    Some((db, stores))
}

/// The replica id of `store` (PostgreSQL always has one).
fn replica_of(store: &Store) -> Option<String> {
    store.replica_id().map(str::to_string)
}

/// Releases `n` racers at once. Each waits on a blocking thread — inside its transaction when it waits in a
/// `Store::write` closure, so all of them have begun before any statement runs. A racer that never arrives fails
/// the test after [`support::DEADLINE`] instead of hanging it.
struct Gate {
    n: usize,
    arrived: Mutex<usize>,
    all_in: Condvar,
}

impl Gate {
    fn new(n: usize) -> Arc<Gate> {
        Arc::new(Gate {
            n,
            arrived: Mutex::new(0),
            all_in: Condvar::new(),
        })
    }

    /// Blocks until all `n` racers are here (call it on a blocking thread).
    fn wait(&self) {
        let deadline = Instant::now() + crate::support::DEADLINE;
        let mut arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        *arrived += 1;
        self.all_in.notify_all();
        while *arrived < self.n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {} racers reached the gate",
                *arrived,
                self.n
            );
            arrived = self
                .all_in
                .wait_timeout(arrived, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// [`Gate::wait`] from async code.
    async fn wait_async(self: &Arc<Gate>) {
        let gate = self.clone();
        tokio::task::spawn_blocking(move || gate.wait())
            .await
            .unwrap();
    }
}

/// The balance of `account`, read by `store`, after checking it equals the sum of its ledger rows and its last row's
/// running balance (what `audit verify` checks).
async fn balance_checked(store: &Store, account: &'static str) -> i64 {
    store
        .read(move |c| -> Result<i64, StoreError> {
            let (balance, sum, last): (i64, i64, Option<i64>) = c.query_one(
                "SELECT balance_atomic, \
                 (SELECT coalesce(sum(amount_atomic), 0) FROM ledger WHERE account = ?1), \
                 (SELECT balance_after FROM ledger WHERE account = ?1 ORDER BY id DESC LIMIT 1) \
                 FROM accounts WHERE address = ?1",
                params![account],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            assert_eq!(balance, sum, "{account}: balance column = ledger sum");
            assert_eq!(
                Some(balance),
                last,
                "{account}: balance column = last running balance"
            );
            Ok(balance)
        })
        .await
        .unwrap()
}

/// One integer from a query run by `store` (counts in the assertions).
async fn count(store: &Store, sql: &'static str) -> i64 {
    store
        .read(move |c| -> Result<i64, StoreError> { c.query_value(sql, params![]) })
        .await
        .unwrap()
}

/// Runs `f(i, c)` for `i` in `0..n`, each in its own `Store::write` transaction on the replicas in turn, all
/// released together once every transaction has begun; returns the results in order.
async fn race<T, F>(stores: &[Store], n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, &dyn Sql) -> Result<T, StoreError> + Send + Sync + 'static,
{
    let (f, gate) = (Arc::new(f), Gate::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (store, f, gate) = (stores[i % stores.len()].clone(), f.clone(), gate.clone());
            tokio::spawn(async move {
                store
                    .write(move |c| {
                        gate.wait();
                        f(i, c)
                    })
                    .await
            })
        })
        .collect();
    let mut out = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        out.push(
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("racer {i}: {e}")),
        );
    }
    out
}

/// The money rules (`store::billing`) raced on four replicas, each racer in its own READ COMMITTED transaction, all
/// released together once every transaction has begun, one rule at a time (racers that first debited one account
/// would queue on its row and never race for the rest):
/// - 40 debits of 1 on a balance of 25: exactly 25 pass, and the balance, the ledger's sum and the lowest running
///   balance all end at 0 (a "read the balance, then write" lets every racer see the same balance and fails this);
/// - 20 subscriptions of 20 payers claim a block of 5 seats: 5 are sold, once each;
/// - 10 first top-ups of one account, each minting a credit key if it has none (as a top-up claim does): one key;
/// - 20 first credits to an account that does not exist yet: all land, each on the one before (none is mistaken for
///   a refusal because another writer created the account meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_rules_hold_under_concurrent_writers_on_postgres() {
    use x402_gateway::store::billing::{self, LedgerKind};

    let Some((db, stores)) = replicas(4).await else {
        return;
    };
    let subscriptions: Vec<i64> = stores[0]
        .write(|c| -> Result<_, LedgerError> {
            billing::append_ledger(c, "0xaa", LedgerKind::Topup, Usdc(25), None, None, None, 0)?;
            let blocks = vec!["asia".to_string()];
            let mut ids = Vec::new();
            for i in 0..20 {
                let payer = format!("0xs{i:02}");
                billing::ensure_account(c, &payer, 0)?;
                ids.push(
                    billing::insert_subscription(
                        c,
                        &payer,
                        "p",
                        &blocks,
                        Usdc(1),
                        &format!("0x{i:02x}"),
                        0,
                        1000,
                    )?
                    .expect("a new subscription"),
                );
            }
            Ok(ids)
        })
        .await
        .unwrap();
    let store = &stores[1];

    // Debits.
    let debits = race(&stores, 40, |_, c| {
        match billing::append_ledger(c, "0xaa", LedgerKind::Debit, Usdc(-1), None, None, None, 1) {
            Ok(_) => Ok(true),
            Err(LedgerError::Insufficient { .. }) => Ok(false),
            Err(LedgerError::Store(e)) => Err(e),
        }
    })
    .await;
    let passed = debits.iter().filter(|d| **d).count();
    assert_eq!((passed, debits.len() - passed), (25, 15));
    assert_eq!(balance_checked(store, "0xaa").await, 0);
    assert_eq!(
        count(
            store,
            "SELECT min(balance_after) FROM ledger WHERE account = '0xaa'"
        )
        .await,
        0,
        "never below zero, even for a moment"
    );

    // Seats.
    let seats = race(&stores, subscriptions.len(), move |i, c| {
        billing::take_seat(c, "p", "asia", 5, subscriptions[i], 1000, 1)
    })
    .await;
    assert_eq!(
        seats.iter().filter(|s| **s).count(),
        5,
        "5 seats, sold once each"
    );
    assert_eq!(
        count(
            store,
            "SELECT count(*) FROM seats WHERE pool = 'p' AND block = 'asia'"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            store,
            "SELECT count(DISTINCT subscription_id) FROM seat_slots WHERE pool = 'p' AND block = 'asia' \
             AND expires_at > 1"
        )
        .await,
        5,
        "each seat's slot held by its own buyer"
    );

    // Credit keys.
    let keys: Vec<_> = (0..10)
        .map(|_| x402_gateway::keys::generate().unwrap())
        .collect();
    let minted = race(&stores, keys.len(), move |i, c| {
        let minted = billing::insert_credit_key_if_none(c, &keys[i], "0xaa", "claim", 2)?;
        billing::append_ledger(c, "0xaa", LedgerKind::Topup, Usdc(1), None, None, None, 2)
            .map_err(|e| match e {
                LedgerError::Store(e) => e,
                other => panic!("{other}"),
            })?;
        Ok(minted.is_some())
    })
    .await;
    assert_eq!(
        minted.iter().filter(|m| **m).count(),
        1,
        "one live credit key per account"
    );
    assert_eq!(
        count(
            store,
            "SELECT count(*) FROM api_keys WHERE account = '0xaa' AND kind = 'credit' AND revoked_at IS NULL"
        )
        .await,
        1
    );
    assert_eq!(balance_checked(store, "0xaa").await, 10);

    // First credits to a new account.
    let landed: BTreeSet<i64> = race(&stores, 20, |_, c| {
        billing::append_ledger(c, "0xnew", LedgerKind::Topup, Usdc(1), None, None, None, 3)
            .map(|after| after.atomic())
            .map_err(|e| match e {
                LedgerError::Store(e) => e,
                refused => panic!("a first credit to a new account was refused: {refused}"),
            })
    })
    .await
    .into_iter()
    .collect();
    assert_eq!(
        landed,
        (1..=20).collect::<BTreeSet<_>>(),
        "each credit lands on the one before"
    );
    assert_eq!(balance_checked(store, "0xnew").await, 20);
    drop(stores);
    db.drop_db().await;
}

/// A credit request's row, as the proxy writes it.
fn credit_request(request_id: String, key_id: i64, account: &str, started_at: i64) -> NewUsage {
    NewUsage {
        request_id,
        key_id,
        account: account.into(),
        key_kind: "credit",
        model: "m".into(),
        stream: false,
        started_at,
        bound_prompt_tokens: 100,
        bound_output_tokens: 100,
        input_per_mtok: Usdc(1),
        output_per_mtok: Usdc(1),
    }
}

/// Tops `account` up by `amount` and mints its credit key; returns the key's id.
async fn funded_account(store: &Store, account: &'static str, amount: i64) -> i64 {
    use x402_gateway::store::billing::{self, LedgerError, LedgerKind};
    let key = x402_gateway::keys::generate().unwrap();
    store
        .write(move |c| -> Result<i64, LedgerError> {
            billing::append_ledger(
                c,
                account,
                LedgerKind::Topup,
                Usdc(amount),
                None,
                None,
                None,
                0,
            )?;
            Ok(billing::insert_credit_key_if_none(c, &key, account, "claim", 0)?.unwrap())
        })
        .await
        .unwrap()
}

/// Metering as several replicas run it (`store::usage` inside `Store::write_with`, the replicas' sweep
/// `Store::recover_dead_replicas`): 60 reservations on four replicas race for a balance that covers 20; each
/// reserved row names the replica that holds it. Then three other replicas sweep at the same moment, believing the
/// first four dead (their leases have expired at the sweep's `now`: a slow replica, or a network cut, looks exactly
/// like that), while the serving replicas settle half of their requests; they settle the other half after the
/// sweeps, too late. Every row ends settled or refunded — never both, never twice — a late settlement charges
/// nothing, and the balance is exact to the atomic unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_settle_or_refund_exactly_once_across_replicas_on_postgres() {
    let Some((db, stores)) = replicas(7).await else {
        return;
    };
    let (serving, sweepers) = stores.split_at(4);
    let key_id = funded_account(&serving[0], "0xbb", 1_000_000).await;
    for s in serving {
        s.renew_lease(100).await.unwrap();
    }
    const RESERVE: Usdc = Usdc(50_000);
    const COST: Usdc = Usdc(10_000);

    // 1. 60 reservations at once, 15 on each serving replica.
    const RACERS: usize = 60;
    let gate = Gate::new(RACERS);
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let replica = i % serving.len();
            let store = serving[replica].clone();
            let gate = gate.clone();
            let row = credit_request(format!("req_{i}"), key_id, "0xbb", 101);
            tokio::spawn(async move {
                let holder = replica_of(&store);
                let reserved = store
                    .write_with(store.metering_durability(), move |c| {
                        gate.wait();
                        usage::reserve(c, &row, RESERVE, holder.as_deref())
                    })
                    .await;
                match reserved {
                    Ok((id, _left)) => Some((replica, id)),
                    Err(LedgerError::Insufficient { .. }) => None,
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let mut reserved = Vec::new();
    for t in tasks {
        reserved.extend(t.await.unwrap());
    }
    assert_eq!(
        reserved.len(),
        20,
        "1.00 USDC covers 20 reservations of 0.05"
    );
    assert_eq!(balance_checked(&serving[0], "0xbb").await, 0);
    for &(replica, id) in &reserved {
        let named: Option<String> = serving[0]
            .read(move |c| -> Result<_, StoreError> {
                c.query_value("SELECT replica_id FROM usage WHERE id = ?1", params![id])
            })
            .await
            .unwrap();
        assert_eq!(
            named,
            replica_of(&serving[replica]),
            "a reservation names its replica"
        );
    }

    // 2. Three other replicas sweep at 200 (the serving replicas' leases ended at 115) while the serving replicas
    //    settle half of the requests, all released together. The other half settle only after the sweeps, as a
    //    replica that was merely slow would: every one of those was swept, and its settlement must charge nothing.
    for s in sweepers {
        // Each sweeper's pool holds a live connection before the race (the lease of every serving replica lives
        // at 100, so this sweep finds nothing), so it starts as fast as the settlers in their open transactions.
        assert_eq!(s.recover_dead_replicas(100).await.unwrap(), 0);
    }
    let settle = |replica: usize, id: i64, gate: Option<Arc<Gate>>| {
        let store = serving[replica].clone();
        tokio::spawn(async move {
            let outcome = Outcome {
                cost: COST,
                status: "ok",
                usage_source: "upstream",
                ..Outcome::default()
            };
            store
                .write_with(store.metering_durability(), move |c| {
                    if let Some(gate) = gate {
                        gate.wait();
                    }
                    usage::settle_credit(c, id, "0xbb", key_id, RESERVE, &outcome, 200)
                })
                .await
                .unwrap()
                .charged
        })
    };
    let (racing, late): (Vec<_>, Vec<_>) = reserved.iter().partition(|(_, id)| id % 2 == 0);
    let gate = Gate::new(racing.len() + sweepers.len());
    let settlers: Vec<_> = racing
        .iter()
        .map(|&&(replica, id)| settle(replica, id, Some(gate.clone())))
        .collect();
    let recoverers: Vec<_> = sweepers
        .iter()
        .map(|store| {
            let (store, gate) = (store.clone(), gate.clone());
            tokio::spawn(async move {
                gate.wait_async().await;
                store.recover_dead_replicas(200).await.unwrap()
            })
        })
        .collect();
    let (mut charged, mut settled) = (0i64, 0usize);
    for t in settlers {
        let c = t.await.unwrap();
        if c > Usdc::ZERO {
            assert_eq!(c, COST);
            settled += 1;
            charged += c.atomic();
        }
    }
    let mut recovered = 0usize;
    for t in recoverers {
        recovered += t.await.unwrap();
    }
    for &&(replica, id) in &late {
        assert_eq!(
            settle(replica, id, None).await.unwrap(),
            Usdc::ZERO,
            "a swept request's late settlement charges nothing"
        );
    }
    assert!(
        recovered >= late.len(),
        "the sweeps refunded every request still in flight"
    );
    assert_eq!(
        settled + recovered,
        reserved.len(),
        "each request settled or refunded, once"
    );
    let store = &sweepers[0];
    let balance = balance_checked(store, "0xbb").await;
    assert_eq!(balance, 1_000_000 - charged, "exact to the atomic unit");
    assert_eq!(
        count(store, "SELECT count(*) FROM ledger WHERE kind = 'refund'").await,
        reserved.len() as i64,
        "one refund per reservation"
    );
    let statuses = (
        count(
            store,
            "SELECT count(*) FROM usage WHERE status = 'in_flight'",
        )
        .await,
        count(store, "SELECT count(*) FROM usage WHERE status = 'ok'").await,
        count(
            store,
            "SELECT count(*) FROM usage WHERE status = 'interrupted'",
        )
        .await,
    );
    assert_eq!(statuses, (0, settled as i64, recovered as i64));
    assert_eq!(
        store.recover_dead_replicas(300).await.unwrap(),
        0,
        "nothing is refunded twice"
    );
    eprintln!(
        "[postgres] 60 racing reservations on 4 replicas: 20 taken; then {settled} settled and {recovered} refunded \
         by 3 racing sweeps; balance {}",
        Usdc(balance)
    );
    drop(stores);
    db.drop_db().await;
}

/// Replica leases (`Store::renew_lease`, `Store::recover_dead_replicas`): replica A reserves nine requests under its
/// lease, replica B one under its own. B's sweep leaves A's alone while A's lease lives, even past the lease's
/// first end once A has renewed it a moment before; once A stops renewing (it crashed), three sweeps racing at once
/// (B, C, D) refund each of A's reservations exactly once and never B's, whose lease lives; A's late settlement then
/// charges nothing, and B's settles as usual. The balance is exact throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_reservations_are_refunded_once_and_a_live_ones_never() {
    use x402_gateway::store::replicas::LEASE_TTL_SECS;

    let Some((db, stores)) = replicas(4).await else {
        return;
    };
    let (a, b) = (&stores[0], &stores[1]);
    let key_id = funded_account(a, "0xcc", 10_000).await;
    let t0 = 100;
    a.renew_lease(t0).await.unwrap();
    b.renew_lease(t0).await.unwrap();
    let reserve = |store: &Store, request: String| {
        let (store, holder) = (store.clone(), replica_of(store));
        let row = credit_request(request, key_id, "0xcc", t0);
        async move {
            store
                .write_with(store.metering_durability(), move |c| {
                    usage::reserve(c, &row, Usdc(100), holder.as_deref())
                })
                .await
                .unwrap()
                .0
        }
    };
    let mut held = Vec::new();
    for i in 0..9 {
        held.push(reserve(a, format!("req_a{i}")).await);
    }
    let b_held = reserve(b, "req_b".into()).await;
    assert_eq!(balance_checked(a, "0xcc").await, 9_000);

    // While A's lease lives, no sweep finds anything (this also gives each sweeper's pool a live connection).
    for s in &stores[1..] {
        assert_eq!(s.recover_dead_replicas(t0).await.unwrap(), 0);
    }
    // B's sweep later: still nothing. A (and B) renew a moment before their leases end; past that first end, still
    // nothing.
    assert_eq!(b.recover_dead_replicas(t0 + 10).await.unwrap(), 0);
    let renewed = t0 + LEASE_TTL_SECS - 1;
    a.renew_lease(renewed).await.unwrap();
    b.renew_lease(renewed).await.unwrap();
    assert_eq!(
        b.recover_dead_replicas(t0 + LEASE_TTL_SECS + 5)
            .await
            .unwrap(),
        0,
        "a renewed lease keeps its reservations"
    );
    assert_eq!(balance_checked(a, "0xcc").await, 9_000);

    // A crashes (stops renewing); B keeps renewing. When A's renewed lease has ended, three sweeps race.
    let crashed = renewed + LEASE_TTL_SECS;
    b.renew_lease(crashed - 1).await.unwrap();
    let gate = Gate::new(3);
    let sweeps: Vec<_> = stores[1..]
        .iter()
        .map(|s| {
            let (s, gate) = (s.clone(), gate.clone());
            tokio::spawn(async move {
                gate.wait_async().await;
                s.recover_dead_replicas(crashed).await.unwrap()
            })
        })
        .collect();
    let mut refunded = 0;
    for s in sweeps {
        refunded += s.await.unwrap();
    }
    assert_eq!(
        refunded, 9,
        "each of A's reservations refunded exactly once"
    );
    assert_eq!(balance_checked(a, "0xcc").await, 9_900);
    assert_eq!(
        count(b, "SELECT count(*) FROM ledger WHERE kind = 'refund'").await,
        9
    );
    let b_status: String = b
        .read(move |c| -> Result<_, StoreError> {
            c.query_value("SELECT status FROM usage WHERE id = ?1", params![b_held])
        })
        .await
        .unwrap();
    assert_eq!(
        b_status, "in_flight",
        "a live replica's reservation is never swept"
    );

    // A's settlement arriving after all (it was only slow): charged nothing, the refund stands. B's settles.
    let settle = |store: &Store, id: i64| {
        let store = store.clone();
        async move {
            let outcome = Outcome {
                cost: Usdc(40),
                status: "ok",
                usage_source: "upstream",
                ..Outcome::default()
            };
            store
                .write_with(store.metering_durability(), move |c| {
                    usage::settle_credit(c, id, "0xcc", key_id, Usdc(100), &outcome, crashed + 1)
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(settle(a, held[0]).await.charged, Usdc::ZERO);
    assert_eq!(balance_checked(a, "0xcc").await, 9_900);
    let settled = settle(b, b_held).await;
    assert_eq!((settled.charged, settled.balance), (Usdc(40), Usdc(9_960)));
    assert_eq!(balance_checked(a, "0xcc").await, 9_960);
    drop(stores);
    db.drop_db().await;
}

/// Leadership (`Store::try_lead`): one replica leads; no other can while the leader's session lives (nor the
/// leader itself a second time, from another connection of its pool); when the leader's connection is cut (its
/// backend terminated, as a crash or a network cut would), it knows it no longer leads and another replica takes
/// over; a graceful step-down hands over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_another_takes_over_when_its_session_dies() {
    let Some((db, stores)) = replicas(3).await else {
        return;
    };
    let (a, b, c) = (&stores[0], &stores[1], &stores[2]);
    let leading = a
        .try_lead()
        .await
        .unwrap()
        .expect("the first replica leads");
    assert!(leading.still_leading().await);
    for s in [a, b, c, b, c] {
        assert!(
            s.try_lead().await.unwrap().is_none(),
            "a second leader while the first lives"
        );
    }
    // The leader's connection dies: the session holding the lock in this database is terminated.
    let admin = db.client().await;
    let holders: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(holders.len(), 1, "one session holds the leadership");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&holders[0]])
        .await
        .unwrap();
    assert!(!leading.still_leading().await, "a cut leader knows it");
    let next = crate::support::wait_for("another replica to take over", || async {
        b.try_lead().await.unwrap()
    })
    .await;
    assert!(next.still_leading().await);
    assert!(a.try_lead().await.unwrap().is_none());
    assert!(c.try_lead().await.unwrap().is_none());
    // A graceful step-down hands over at once.
    next.resign().await;
    let third = c
        .try_lead()
        .await
        .unwrap()
        .expect("a resigned leader hands over");
    assert!(third.still_leading().await);
    drop((leading, third, admin));
    drop(stores);
    db.drop_db().await;
}

/// Request slots across replicas (`Store::take_request_slot`, `Store::release_request_slot`): ten requests of one
/// pool subscription arriving at two replicas at once get exactly one slot; ten of a credit account capped at 3 get
/// exactly 3; the pool slot is refused to the other replica while its holder's lease lives, taken over once that
/// lease has expired (the holder crashed), and the holder's late release does not free the new holder's slot; a
/// proper release frees it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_slots_hold_across_replicas_on_postgres() {
    use x402_gateway::store::replicas::LEASE_TTL_SECS;

    let Some((db, stores)) = replicas(2).await else {
        return;
    };
    let t0 = 100;
    for s in &stores {
        s.renew_lease(t0).await.unwrap();
    }
    let race = |owner: &'static str, limit: u32| {
        let stores = stores.clone();
        async move {
            let gate = Gate::new(10);
            let tasks: Vec<_> = (0..10)
                .map(|i| {
                    let (replica, gate) = (i % 2, gate.clone());
                    let store = stores[replica].clone();
                    tokio::spawn(async move {
                        gate.wait_async().await;
                        let request = format!("req_{owner}_{i}");
                        store
                            .take_request_slot(owner.into(), limit, request.clone(), t0 + 5)
                            .await
                            .unwrap()
                            .map(|slot| (replica, slot, request))
                    })
                })
                .collect();
            let mut held = Vec::new();
            for t in tasks {
                held.extend(t.await.unwrap());
            }
            held
        }
    };
    let pool = race("subscription:7", 1).await;
    assert_eq!(pool.len(), 1, "one request at a time per subscription");
    let credit = race("account:0xdd", 3).await;
    let numbers: BTreeSet<i64> = credit.iter().map(|(_, slot, _)| *slot).collect();
    assert_eq!(credit.len(), 3, "the account's cap");
    assert_eq!(numbers, BTreeSet::from([1, 2, 3]));

    // The pool slot's holder stops renewing (it crashed); the other replica renews.
    let (holder, old_slot, old_request) = pool[0].clone();
    let other = &stores[1 - holder];
    let take = |request: &str, now: i64| {
        other.take_request_slot("subscription:7".into(), 1, request.into(), now)
    };
    let expired = t0 + LEASE_TTL_SECS;
    other.renew_lease(expired - 1).await.unwrap();
    assert!(
        take("req_new", expired - 1).await.unwrap().is_none(),
        "not while the holder's lease lives"
    );
    let new_slot = take("req_new", expired)
        .await
        .unwrap()
        .expect("a crashed replica's slot is taken over");
    assert!(
        !stores[holder]
            .release_request_slot("subscription:7".into(), old_slot, old_request)
            .await
            .unwrap(),
        "a late release frees nothing"
    );
    assert!(take("req_third", expired + 1).await.unwrap().is_none());
    assert!(
        other
            .release_request_slot("subscription:7".into(), new_slot, "req_new".into())
            .await
            .unwrap()
    );
    assert!(take("req_third", expired + 2).await.unwrap().is_some());
    drop(stores);
    db.drop_db().await;
}

/// Two gateways on one PostgreSQL database: one leads (runs the indexer), the other follows — it reports the shared
/// checkpoint, is ready, and serves claims from the index the leader writes; when the leader stops, the follower
/// takes over and indexes on from the shared checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_serves_from_the_shared_index_and_takes_over_when_the_leader_stops() {
    use crate::checkout::{CONFIRMATIONS, Options, T0, claim_sig, config_text, usdc};
    use crate::support::*;
    use reqwest::StatusCode;
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;

    if server_url().is_none() {
        return;
    }
    let url = fresh_postgres_database().await;
    let chain = TestChain::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("unused.db");
    let config = config_text(&chain, &db, &Options::default()).replace(
        &format!("path = \"{}\"", db.display()),
        &format!("url = \"${TEST_DATABASE_URL_VAR}\""),
    );
    assert!(config.contains(TEST_DATABASE_URL_VAR), "{config}");
    // `[auth]` is the config's last table: the console's admin token goes there.
    let config = format!("{config}admin_token_env = \"TEST_ADMIN_TOKEN\"\n");
    let env = [
        (TEST_DATABASE_URL_VAR, url.as_str()),
        ("TEST_ADMIN_TOKEN", "admin-token-of-the-replicas"),
    ];
    let clock = Arc::new(AtomicI64::new(T0));
    // The console's database figures: this replica, the live ones, and which one leads.
    let database = |gw: &Gateway| {
        let (http, base) = (gw.http.clone(), gw.base.clone());
        async move {
            let body: serde_json::Value = http
                .get(format!("{base}/api/admin/summary"))
                .bearer_auth("admin-token-of-the-replicas")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(body["database"].clone())
        }
    };
    let role = |gw: &Gateway| {
        let (http, base) = (gw.http.clone(), gw.base.clone());
        async move {
            let body: serde_json::Value = http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some((
                body["indexer"]["role"].as_str()?.to_string(),
                body["indexer"]["indexedHead"].as_u64(),
            ))
        }
    };
    let leader = Gateway::start_with_env(config.clone(), db.clone(), clock.clone(), &env).await;
    wait_for("the first gateway to lead and index", || async {
        matches!(role(&leader).await, Some((r, Some(_))) if r == "leader").then_some(())
    })
    .await;
    let follower = Gateway::start_with_env(config, db, clock, &env).await;
    wait_for(
        "the second gateway to follow the shared checkpoint",
        || async {
            matches!(role(&follower).await, Some((r, Some(_))) if r == "follower").then_some(())
        },
    )
    .await;
    let (status, _, ready) = follower.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    // Both replicas' consoles name the same two replicas and the first as the indexer leader.
    let leader_id = database(&leader).await.unwrap()["replica"]
        .as_str()
        .unwrap()
        .to_string();
    let follower_id = database(&follower).await.unwrap()["replica"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(leader_id, follower_id);
    for gw in [&leader, &follower] {
        let db = wait_for("both replicas' leases on the console", || async {
            database(gw)
                .await
                .filter(|d| d["replicas"].as_array().is_some_and(|r| r.len() == 2))
        })
        .await;
        assert_eq!(db["engine"], "postgres", "{db}");
        assert_eq!(db["leader"], leader_id.as_str(), "{db}");
        let leaders: Vec<&serde_json::Value> = db["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["leader"] == true)
            .collect();
        assert_eq!(leaders.len(), 1, "{db}");
        assert_eq!(leaders[0]["replicaId"], leader_id.as_str(), "{db}");
    }

    // A payment indexed by the leader is claimed at the follower, once, whichever replica is asked again.
    let (tx, block) = chain.pay(0, usdc("10")).await;
    leader.confirm(&chain, block, CONFIRMATIONS).await;
    let body = serde_json::json!({"txHash": tx, "amount": "10.00", "signature": claim_sig(chain.payer(0), &tx)});
    let (status, _, claimed) = follower.post("/api/agent/topup", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    let (status, _, again) = leader.post("/api/agent/topup", body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"]["code"], "already_claimed", "{again}");

    // The leader stops; the follower takes over and indexes new blocks.
    leader.stop().await;
    wait_for("the follower to take over", || async {
        matches!(role(&follower).await, Some((r, _)) if r == "leader").then_some(())
    })
    .await;
    let db = wait_for("the console to name the new leader", || async {
        database(&follower)
            .await
            .filter(|d| d["leader"] == follower_id.as_str())
    })
    .await;
    assert!(!db["replicas"].as_array().unwrap().is_empty(), "{db}");
    let head = chain.head().await;
    chain.mine(3).await;
    follower.wait_indexed(head + 3).await;
}

/// Migration 11 (networks) on a PostgreSQL database holding data of one network (schema 10): every chain-derived row
/// is keyed by the network it was bound to, the binding and the checkpoint move to their per-network tables, the
/// recent-block window is keyed by (network, number), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_network_database_is_keyed_by_its_network_in_place() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .await
        .unwrap();
    for m in x402_gateway::store::postgres::schema()
        .unwrap()
        .iter()
        .take_while(|m| m.version <= 10)
    {
        client.batch_execute(&m.sql).await.unwrap();
        client
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, 0)",
                &[&i64::from(m.version), &m.name],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO chain_binding (id, chain_id, token_address, pay_to, created_at) VALUES (1, 8453, '0xt', '0xp', 1);
             INSERT INTO checkpoint (id, block_number, block_hash, updated_at) VALUES (1, 42, '0xh42', 2);
             INSERT INTO recent_blocks (number, hash, parent_hash, timestamp) VALUES (41, '0xh41', '0xh40', 3), (42, '0xh42', '0xh41', 4);
             INSERT INTO transfers (tx_hash, log_index, block_number, block_hash, from_address, to_address, value_atomic, status, first_seen_at)
                 VALUES ('0xa1', 0, 41, '0xh41', '0xaa', '0xp', 7, 'confirmed', 5);
             INSERT INTO reorgs (detected_at, fork_block, old_head, depth, orphaned_transfers) VALUES (6, 40, 41, 1, 0);
             INSERT INTO accounts (address, created_at) VALUES ('0xaa', 7);
             INSERT INTO claims (tx_hash, account, kind, paid_atomic, price_atomic, surplus_atomic, claimed_at)
                 VALUES ('0xa1', '0xaa', 'topup', 7, 7, 0, 8);
             INSERT INTO x402_settlements (tx_hash, payer, nonce, x402_version, \"authorization\", signature, requirements,
                 resource, product, amount_atomic, status, settled_at, updated_at)
                 VALUES ('0xa1', '0xaa', '0xn', 2, '{}', '0x', '{}', 'r', 'credits', 7, 'settled', 9, 9);",
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = migrate_ok(&postgres_config(dir.path()), &db.url);
    assert!(out.contains("applied migration 11 networks"), "{out}");
    let one = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap() }
    };
    let binding =
        one("SELECT network, chain_id, token_address, pay_to FROM network_bindings").await;
    assert_eq!(binding.get::<_, String>(0), "eip155:8453");
    assert_eq!(binding.get::<_, i64>(1), 8453);
    let checkpoint = one("SELECT network, block_number, block_hash FROM network_checkpoints").await;
    assert_eq!(
        (checkpoint.get::<_, String>(0), checkpoint.get::<_, i64>(1)),
        ("eip155:8453".to_string(), 42)
    );
    for table in [
        "transfers",
        "claims",
        "x402_settlements",
        "reorgs",
        "recent_blocks",
    ] {
        let sql = format!(
            "SELECT count(*), count(*) FILTER (WHERE network = 'eip155:8453') FROM {table}"
        );
        let row = client.query_one(&sql, &[]).await.unwrap();
        let (all, keyed): (i64, i64) = (row.get(0), row.get(1));
        assert!(all > 0, "{table} lost its rows");
        assert_eq!(all, keyed, "{table}: every row keyed by the bound network");
    }
    // The window is keyed by network: the same block number on another network is another row.
    client
        .batch_execute(
            "INSERT INTO recent_blocks (network, number, hash, parent_hash, timestamp) VALUES ('eip155:10', 42, '0xo', '0xo', 1)",
        )
        .await
        .unwrap();
    let gone =
        one("SELECT to_regclass('chain_binding') IS NULL AND to_regclass('checkpoint') IS NULL")
            .await;
    assert!(gone.get::<_, bool>(0));
    drop(client);
    db.drop_db().await;
}
