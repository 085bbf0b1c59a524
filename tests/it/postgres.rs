//! PostgreSQL, the second engine (issue 14, in progress): the real `migrate` on a real PostgreSQL (scripts/test
//! starts a throwaway cluster and exports `X402_TEST_POSTGRES_URL`), the schema twin compared with SQLite's,
//! idempotence, concurrent migrators, a database ahead of the binary, the ledger rules in PL/pgSQL, and the
//! refusals of a PostgreSQL config by `serve` and of a literal URL in the file.
//!
//! Each test creates its own database with a random name on the shared server, so they run in parallel.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tokio_postgres::NoTls;

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

/// `url` with its database name replaced by `name` (query kept).
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

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
        .query_one("SELECT to_regclass('chain_binding') IS NOT NULL", &[])
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

/// The money rules written in PostgreSQL's dialect hold: the ledger is append-only (PL/pgSQL triggers), a debit
/// never ends below zero, a reversal may (migration 6's constraints, replaced in place), and a claim is unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_rules_hold_on_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate_ok(&postgres_config(dir.path()), &db.url);
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO accounts (address, created_at) VALUES ('0xaa', 0);
             INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at)
                 VALUES ('0xaa', 'topup', 5, 5, 0);
             INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at)
                 VALUES ('0xaa', 'reversal', -7, -2, 0);",
        )
        .await
        .unwrap();
    let err = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(sql)
                .await
                .expect_err(sql)
                .as_db_error()
                .map(|e| e.message().to_string())
                .unwrap_or_default()
        }
    };
    assert_eq!(
        err("UPDATE ledger SET note = 'x'").await,
        "the ledger is append-only"
    );
    assert_eq!(err("DELETE FROM ledger").await, "the ledger is append-only");
    assert!(
        err(
            "INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at)
             VALUES ('0xaa', 'debit', -1, -3, 0)"
        )
        .await
        .contains("ledger_debit_not_negative")
    );
    assert!(
        err(
            "INSERT INTO ledger (account, kind, amount_atomic, balance_after, created_at)
             VALUES ('0xaa', 'topup', -1, 4, 0)"
        )
        .await
        .contains("ledger_sign_check")
    );
    drop(client);
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

/// The money rules as the PostgreSQL store states them (`store::postgres::money`), raced by many connections at
/// once, each in its own READ COMMITTED transaction, all released together by a barrier: the guarded debit never
/// overdraws (exactly the balance's worth of debits pass), the last seat is sold once, and one account never gets
/// two live credit keys. A "read the balance, then write" done the same way would let every racer see the same
/// balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_rules_hold_under_concurrent_writers_on_postgres() {
    use std::sync::Arc;
    use x402_gateway::store::postgres::money::{self, MoneyError};
    use x402_gateway::usdc::Usdc;

    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate_ok(&postgres_config(dir.path()), &db.url);
    let setup = db.client().await;
    money::append_ledger(&setup, "0xaa", "topup", Usdc(25), None, None, None, 0)
        .await
        .unwrap();
    for i in 0..20i64 {
        setup
            .execute(
                "INSERT INTO subscriptions (id, account, pool, blocks, price_atomic, tx_hash, starts_at, expires_at) \
                 VALUES ($1, '0xaa', 'p', '[\"asia\"]', 1, $2, 0, 1000)",
                &[&(i + 1), &format!("0x{i:02x}")],
            )
            .await
            .unwrap();
    }

    const RACERS: usize = 40;
    let mut clients = Vec::new();
    for _ in 0..RACERS {
        clients.push(db.client().await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let tx = client.transaction().await.unwrap();
                barrier.wait().await;
                let debit =
                    money::append_ledger(&tx, "0xaa", "debit", Usdc(-1), None, None, None, 1).await;
                let seat = if i < 20 {
                    Some(
                        money::take_seat(&tx, "p", "asia", 5, i as i64 + 1, 1000, 1)
                            .await
                            .unwrap(),
                    )
                } else {
                    None
                };
                let key = x402_gateway::keys::generate().unwrap();
                let minted = if i < 10 {
                    money::insert_credit_key_if_none(&tx, &key, "0xaa", "claim", 1)
                        .await
                        .unwrap()
                        .is_some()
                } else {
                    false
                };
                tx.commit().await.unwrap();
                (debit, seat, minted)
            })
        })
        .collect();
    let mut debited = 0;
    let mut refused = 0;
    let mut seats = 0;
    let mut keys = 0;
    for t in tasks {
        let (debit, seat, minted) = t.await.unwrap();
        match debit {
            Ok(_) => debited += 1,
            Err(MoneyError::Insufficient { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        seats += usize::from(seat == Some(true));
        keys += usize::from(minted);
    }
    assert_eq!((debited, refused), (25, RACERS - 25));
    assert_eq!(seats, 5, "5 seats, sold once each");
    assert_eq!(keys, 1, "one live credit key per account");
    let row = setup
        .query_one(
            "SELECT (SELECT balance_atomic FROM accounts WHERE address = '0xaa'), \
             (SELECT sum(amount_atomic) FROM ledger)::BIGINT, (SELECT min(balance_after) FROM ledger), \
             (SELECT count(*) FROM seats WHERE pool = 'p' AND block = 'asia')",
            &[],
        )
        .await
        .unwrap();
    let (balance, sum, lowest, seat_rows): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((balance, sum, lowest, seat_rows), (0, 0, 0, 5));
    drop(setup);
    db.drop_db().await;
}

/// Metering as several replicas would run it on one PostgreSQL (`store::postgres::usage`): 60 reservations race for
/// a balance that covers 20, then each reserved request is settled while three "replicas" run the start-up recovery
/// at the same moment (as a replica that believes the others died would). Every row ends settled or refunded —
/// never both, never twice — and the balance is exact to the atomic unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_settle_or_refund_exactly_once_across_replicas_on_postgres() {
    use std::sync::Arc;
    use x402_gateway::store::postgres::{money, usage};
    use x402_gateway::store::usage::{NewUsage, Outcome};
    use x402_gateway::usdc::Usdc;

    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate_ok(&postgres_config(dir.path()), &db.url);
    let setup = db.client().await;
    money::append_ledger(
        &setup,
        "0xbb",
        "topup",
        Usdc(1_000_000),
        None,
        None,
        None,
        0,
    )
    .await
    .unwrap();
    let key = x402_gateway::keys::generate().unwrap();
    let key_id = money::insert_credit_key_if_none(&setup, &key, "0xbb", "claim", 0)
        .await
        .unwrap()
        .unwrap();
    let row = |i: usize| NewUsage {
        request_id: format!("req_{i}"),
        key_id,
        account: "0xbb".into(),
        key_kind: "credit",
        model: "m".into(),
        stream: false,
        started_at: 1,
        bound_prompt_tokens: 100,
        bound_output_tokens: 100,
        input_per_mtok: Usdc(1),
        output_per_mtok: Usdc(1),
    };
    const RESERVE: Usdc = Usdc(50_000);
    const COST: Usdc = Usdc(10_000);

    // 1. Reservations from 60 connections at once.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(db.client().await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let (barrier, row) = (barrier.clone(), row(i));
            tokio::spawn(async move {
                let tx = client.transaction().await.unwrap();
                barrier.wait().await;
                let reserved = usage::reserve(&tx, &row, RESERVE).await;
                tx.commit().await.unwrap();
                reserved.ok()
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

    // 2. Settle every request while three replicas recover "interrupted" requests at the same time.
    let mut clients = Vec::new();
    for _ in 0..reserved.len() + 3 {
        clients.push(db.client().await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut settlers = Vec::new();
    let mut recoverers = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let barrier = barrier.clone();
        if let Some(&id) = reserved.get(i) {
            settlers.push(tokio::spawn(async move {
                let tx = client.transaction().await.unwrap();
                barrier.wait().await;
                let outcome = Outcome {
                    cost: COST,
                    status: "ok",
                    usage_source: "upstream",
                    ..Outcome::default()
                };
                let settled = usage::settle_credit(&tx, id, "0xbb", key_id, RESERVE, &outcome, 2)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                settled.charged
            }));
        } else {
            recoverers.push(tokio::spawn(async move {
                barrier.wait().await;
                usage::recover_in_flight(&mut client, 2).await.unwrap()
            }));
        }
    }
    let mut charged = 0i64;
    let mut settled = 0usize;
    for t in settlers {
        let c = t.await.unwrap();
        if c > Usdc::ZERO {
            settled += 1;
            charged += c.atomic();
        }
    }
    let mut recovered = 0usize;
    for t in recoverers {
        recovered += t.await.unwrap();
    }
    assert_eq!(
        settled + recovered,
        reserved.len(),
        "each request settled or refunded, once"
    );
    assert_eq!(charged, settled as i64 * COST.atomic());
    let row = setup
        .query_one(
            "SELECT (SELECT balance_atomic FROM accounts WHERE address = '0xbb'), \
             (SELECT sum(amount_atomic) FROM ledger)::BIGINT, \
             (SELECT count(*) FROM ledger WHERE kind = 'refund'), \
             (SELECT count(*) FROM usage WHERE status = 'in_flight'), \
             (SELECT count(*) FROM usage WHERE status = 'ok'), \
             (SELECT count(*) FROM usage WHERE status = 'interrupted')",
            &[],
        )
        .await
        .unwrap();
    let (balance, sum, refunds, in_flight, ok, interrupted): (i64, i64, i64, i64, i64, i64) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    assert_eq!(balance, 1_000_000 - charged, "exact to the atomic unit");
    assert_eq!(sum, balance);
    assert_eq!(refunds, reserved.len() as i64, "one refund per reservation");
    assert_eq!(
        (in_flight, ok, interrupted),
        (0, settled as i64, recovered as i64)
    );
    eprintln!(
        "[postgres] 60 racing reservations: 20 taken; then {settled} settled and {recovered} refunded by 3 racing \
         recoveries; balance {}",
        Usdc(balance)
    );
    drop(setup);
    db.drop_db().await;
}

/// Replica leases (`store::postgres::lease`): replica A reserves three requests under its lease; replica B's
/// recovery leaves them alone while A's lease lives (even one renewed a moment before it expires), and once A stops
/// renewing (it crashed), three recoveries racing at once refund each exactly once; A's late settlement then charges
/// nothing. The balance is exact throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_reservations_are_refunded_once_and_a_live_ones_never() {
    use x402_gateway::store::postgres::{lease, money, usage};
    use x402_gateway::store::usage::{NewUsage, Outcome};
    use x402_gateway::usdc::Usdc;

    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate_ok(&postgres_config(dir.path()), &db.url);
    let mut a = db.client().await;
    money::append_ledger(&a, "0xcc", "topup", Usdc(1_000), None, None, None, 0)
        .await
        .unwrap();
    let key = x402_gateway::keys::generate().unwrap();
    let key_id = money::insert_credit_key_if_none(&a, &key, "0xcc", "claim", 0)
        .await
        .unwrap()
        .unwrap();
    const TTL: i64 = 30;
    lease::renew(&a, "replica-a", 100, TTL).await.unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let tx = a.transaction().await.unwrap();
        let row = NewUsage {
            request_id: format!("req_a{i}"),
            key_id,
            account: "0xcc".into(),
            key_kind: "credit",
            model: "m".into(),
            stream: true,
            started_at: 100,
            bound_prompt_tokens: 10,
            bound_output_tokens: 10,
            input_per_mtok: Usdc(1),
            output_per_mtok: Usdc(1),
        };
        let id = usage::reserve(&tx, &row, Usdc(100)).await.unwrap();
        lease::hold(&tx, id, "replica-a").await.unwrap();
        tx.commit().await.unwrap();
        held.push(id);
    }
    assert_eq!(lease_test_balance(&a).await, 700);

    // Replica B while A's lease lives: nothing to recover. A renews just before expiry; still nothing.
    let mut b = db.client().await;
    assert_eq!(lease::recover_expired(&mut b, 110).await.unwrap(), 0);
    lease::renew(&a, "replica-a", 129, TTL).await.unwrap();
    assert_eq!(lease::recover_expired(&mut b, 140).await.unwrap(), 0);
    assert_eq!(lease_test_balance(&a).await, 700);

    // A crashes (stops renewing): at 160 its lease (until 159) has expired. Three recoveries race.
    let mut recoverers = Vec::new();
    for _ in 0..3 {
        let mut c = db.client().await;
        recoverers.push(tokio::spawn(async move {
            lease::recover_expired(&mut c, 160).await.unwrap()
        }));
    }
    let mut refunded = 0;
    for r in recoverers {
        refunded += r.await.unwrap();
    }
    assert_eq!(refunded, 3, "each reservation refunded exactly once");
    assert_eq!(lease_test_balance(&a).await, 1_000);

    // A's settlement arriving after all (it was only slow): charged nothing, the refund stands.
    let tx = a.transaction().await.unwrap();
    let outcome = Outcome {
        cost: Usdc(40),
        status: "ok",
        usage_source: "upstream",
        ..Outcome::default()
    };
    let settled = usage::settle_credit(&tx, held[0], "0xcc", key_id, Usdc(100), &outcome, 161)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(settled.charged, Usdc::ZERO);
    assert_eq!(lease_test_balance(&a).await, 1_000);
    drop((a, b));
    db.drop_db().await;
}

/// The balance of 0xcc, checked equal to its ledger's sum.
async fn lease_test_balance(c: &tokio_postgres::Client) -> i64 {
    let r = c
        .query_one(
            "SELECT balance_atomic, (SELECT sum(amount_atomic) FROM ledger)::BIGINT FROM accounts \
             WHERE address = '0xcc'",
            &[],
        )
        .await
        .unwrap();
    let (b, s): (i64, i64) = (r.get(0), r.get(1));
    assert_eq!(b, s, "balance column = ledger sum");
    b
}

/// Leadership (`store::postgres::leader`): one replica leads; a second cannot while the first's session lives; when
/// the leader's connection is cut (its backend terminated, as a crash or a network cut would), it knows it no longer
/// leads and another replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_another_takes_over_when_its_session_dies() {
    use x402_gateway::store::postgres::leader;

    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = db.client().await;
    let a_pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let leading = leader::try_lead(a)
        .await
        .unwrap()
        .expect("the first replica leads");
    assert!(leading.still_leading().await);
    for _ in 0..3 {
        assert!(
            leader::try_lead(db.client().await).await.unwrap().is_none(),
            "a second leader while the first lives"
        );
    }
    // The leader's connection dies.
    let admin = db.client().await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&a_pid])
        .await
        .unwrap();
    assert!(!leading.still_leading().await, "a cut leader knows it");
    let next = crate::support::wait_for("another replica to take over", || async {
        leader::try_lead(db.client().await).await.unwrap()
    })
    .await;
    assert!(next.still_leading().await);
    // A graceful step-down hands over at once.
    next.resign().await.unwrap();
    assert!(leader::try_lead(db.client().await).await.unwrap().is_some());
    drop((leading, admin));
    db.drop_db().await;
}

/// Request slots across replicas (`store::postgres::slots`): ten requests of one pool subscription arriving at
/// two replicas at once get exactly one slot; a credit account with a cap of 3 gets exactly 3; a crashed replica's
/// slot is taken over once its lease expires, and its late release does not free the new holder's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_slots_hold_across_replicas_on_postgres() {
    use std::sync::Arc;
    use x402_gateway::store::postgres::{lease, slots};

    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate_ok(&postgres_config(dir.path()), &db.url);
    let setup = db.client().await;
    for r in ["replica-a", "replica-b"] {
        lease::renew(&setup, r, 100, 30).await.unwrap();
    }
    let race = |owner: &'static str, limit: u32| {
        let db_url = db.url.clone();
        async move {
            let mut clients = Vec::new();
            for _ in 0..10 {
                clients.push(connect(&db_url).await);
            }
            let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
            let tasks: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(i, client)| {
                    let barrier = barrier.clone();
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let replica = if i % 2 == 0 { "replica-a" } else { "replica-b" };
                        slots::acquire(
                            &client,
                            owner,
                            limit,
                            replica,
                            &format!("req_{owner}_{i}"),
                            105,
                        )
                        .await
                        .unwrap()
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
    assert_eq!(credit.len(), 3, "the account's cap");

    // The pool slot's holder's replica stops renewing; at 140 (its lease ended at 130) another request takes it.
    let old = pool[0].clone();
    let (holder, other) = if old.request_id.ends_with(['0', '2', '4', '6', '8']) {
        ("replica-a", "replica-b")
    } else {
        ("replica-b", "replica-a")
    };
    lease::renew(&setup, other, 135, 30).await.unwrap();
    assert!(
        slots::acquire(&setup, "subscription:7", 1, other, "req_new", 125)
            .await
            .unwrap()
            .is_none(),
        "not while {holder}'s lease lives"
    );
    let new = slots::acquire(&setup, "subscription:7", 1, other, "req_new", 140)
        .await
        .unwrap()
        .expect("a crashed replica's slot is taken over");
    assert!(
        !slots::release(&setup, &old).await.unwrap(),
        "a late release frees nothing"
    );
    assert!(
        slots::acquire(&setup, "subscription:7", 1, other, "req_third", 141)
            .await
            .unwrap()
            .is_none()
    );
    assert!(slots::release(&setup, &new).await.unwrap());
    assert!(
        slots::acquire(&setup, "subscription:7", 1, other, "req_third", 142)
            .await
            .unwrap()
            .is_some()
    );
    drop(setup);
    db.drop_db().await;
}
