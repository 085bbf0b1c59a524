//! The one connection interface both engines implement, so every query of `store/` is written once.
//!
//! Store functions take `&dyn Sql` (a transaction on the writer, or a read snapshot) and pass parameters as
//! [`Value`]s; rows come back as [`Row`]s of values. SQL is written in the dialect both engines share: numbered
//! parameters `?1`, `?2` … (rewritten to `$1`, `$2` … for PostgreSQL), `ON CONFLICT … DO NOTHING / DO UPDATE`,
//! `RETURNING`, `COALESCE`, and no `rowid`. Where the engines really differ (date functions, two-argument `MAX`),
//! a function asks [`Sql::engine`] and writes each form. Both schemas store every integer as a 64-bit integer,
//! so a value read from either engine is the same Rust value.
//!
//! PostgreSQL runs on a blocking-pool thread and waits for each statement (`Handle::block_on`): the connection
//! task runs on the runtime, so a transaction's statements run in order with the same code as SQLite's.

use std::fmt;

use super::StoreError;

/// Which engine a connection talks to, for the few statements whose SQL differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }
}

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// Anything that can be bound as a parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8, i16, i8, bool);

impl ToValue for u64 {
    /// Block numbers, amounts and counts fit in an `i64`; a value that does not is stored saturated (SQLite's own
    /// binding of a `u64` would fail instead, and both engines' columns are signed 64-bit).
    fn to_value(&self) -> Value {
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ToValue for usize {
    fn to_value(&self) -> Value {
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}

/// Builds a parameter list: `params![a, b, c]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::store::sql::ToValue] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::store::sql::ToValue),+] as &[&dyn $crate::store::sql::ToValue] };
}
pub use params;

/// A column value read back as a Rust type.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i),
            other => Err(format!("expected an integer, found {}", other.kind())),
        }
    }
}

macro_rules! narrow_int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, String> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i} is out of range for {}", stringify!($t)))
            }
        }
    )*};
}
narrow_int_from_value!(i32, u32, u64, usize, u16, u8);

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Real(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            other => Err(format!("expected a number, found {}", other.kind())),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("expected text, found {}", other.kind())),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(format!("expected bytes, found {}", other.kind())),
        }
    }
}

impl FromValue for Value {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(v.clone())
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Real(_) => "a real",
            Value::Text(_) => "text",
            Value::Blob(_) => "a blob",
        }
    }
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as `T`; a NULL or a value of another type is a [`StoreError::Decode`] naming the column.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let value = self.0.get(i).ok_or_else(|| StoreError::Decode {
            column: i,
            message: format!("the row has {} columns", self.0.len()),
        })?;
        T::from_value(value).map_err(|message| StoreError::Decode { column: i, message })
    }
}

/// What kind of rule a refused statement broke, for the few callers that answer differently to each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A UNIQUE or PRIMARY KEY constraint.
    Unique,
    /// A FOREIGN KEY, CHECK or NOT NULL constraint.
    Constraint,
}

/// A connection (inside a transaction, or a read snapshot) of either engine.
pub trait Sql {
    fn engine(&self) -> Engine;

    /// Runs one statement; returns the rows it changed.
    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize, StoreError>;

    /// Runs one statement and hands each row to `f`, in order, without holding them all in memory.
    fn each_row(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: &mut dyn FnMut(Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

impl dyn Sql + '_ {
    /// Every row of the statement, mapped by `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        mut f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        self.each_row(sql, params, &mut |row| {
            out.push(f(&row)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The first row, if any, mapped by `f`.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut first = None;
        self.each_row(sql, params, &mut |row| {
            if first.is_none() {
                first = Some(row);
            }
            Ok(())
        })?;
        first.as_ref().map(f).transpose()
    }

    /// The first row, mapped by `f`; no row is [`StoreError::NoRow`].
    pub fn query_one<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.query_opt(sql, params, f)?
            .ok_or_else(|| StoreError::NoRow(first_words(sql)))
    }

    /// Column 0 of the first row (the usual `SELECT count(*) …`).
    pub fn query_value<T: FromValue>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
    ) -> Result<T, StoreError> {
        self.query_one(sql, params, |r| r.get(0))
    }
}

/// The start of a statement, to name it in an error without its parameters.
fn first_words(sql: &str) -> String {
    let flat: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.chars().take(80).collect()
}

// ---- SQLite ------------------------------------------------------------------------------------------------------

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Sql for rusqlite::Connection {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize, StoreError> {
        let values: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
        Ok(self
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(values.iter()))?)
    }

    fn each_row(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: &mut dyn FnMut(Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let values: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
        let mut stmt = self.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
        while let Some(row) = rows.next()? {
            let mut out = Vec::with_capacity(columns);
            for i in 0..columns {
                out.push(sqlite_value(row.get_ref(i)?));
            }
            f(Row(out))?;
        }
        Ok(())
    }
}

impl Sql for rusqlite::Transaction<'_> {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize, StoreError> {
        Sql::execute(&**self, sql, params)
    }

    fn each_row(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: &mut dyn FnMut(Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        Sql::each_row(&**self, sql, params, f)
    }
}

/// Whether a SQLite error is a constraint refusal, and of which kind.
pub(super) fn sqlite_refusal(e: &rusqlite::Error) -> Option<Refusal> {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Some(match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => Refusal::Unique,
                _ => Refusal::Constraint,
            })
        }
        _ => None,
    }
}

// ---- PostgreSQL --------------------------------------------------------------------------------------------------

/// `?N` (and a bare `?`, numbered in order) to PostgreSQL's `$N`, leaving quoted text alone.
pub fn to_postgres_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut next_bare = 1;
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                out.push('$');
                if digits.is_empty() {
                    out.push_str(&next_bare.to_string());
                    next_bare += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// A [`Value`] bound to a PostgreSQL parameter of whatever type the server inferred for it.
struct PgParam(Value);

impl fmt::Debug for PgParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl tokio_postgres::types::ToSql for PgParam {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        let text_like = |t: &Type| {
            matches!(
                *t,
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
            )
        };
        match &self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::NUMERIC => Ok(numeric_from_i64(*i, out)),
                ref t if text_like(t) => i.to_string().as_str().to_sql(&Type::TEXT, out),
                ref t => Err(format!("cannot bind an integer to a {t} parameter").into()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                ref t => Err(format!("cannot bind a real to a {t} parameter").into()),
            },
            Value::Text(s) => match *ty {
                Type::INT8 => s.parse::<i64>()?.to_sql(ty, out),
                ref t if text_like(t) => s.as_str().to_sql(&Type::TEXT, out),
                ref t => Err(format!("cannot bind text to a {t} parameter").into()),
            },
            Value::Blob(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                ref t => Err(format!("cannot bind bytes to a {t} parameter").into()),
            },
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The binary NUMERIC form of an integer (base-10000 digits), for a parameter the server typed NUMERIC.
fn numeric_from_i64(i: i64, out: &mut bytes::BytesMut) -> tokio_postgres::types::IsNull {
    use bytes::BufMut;
    let mut magnitude = i.unsigned_abs();
    let mut digits = Vec::new();
    while magnitude > 0 {
        digits.push((magnitude % 10_000) as i16);
        magnitude /= 10_000;
    }
    digits.reverse();
    let weight = digits.len() as i16 - 1;
    out.put_i16(digits.len() as i16);
    out.put_i16(weight.max(0));
    out.put_u16(if i < 0 { 0x4000 } else { 0 });
    out.put_u16(0);
    for d in digits {
        out.put_i16(d);
    }
    tokio_postgres::types::IsNull::No
}

/// A column of any type this store reads, as a [`Value`].
struct PgColumn(Value);

impl<'a> tokio_postgres::types::FromSql<'a> for PgColumn {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{FromSql, Type};
        Ok(PgColumn(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => Value::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::OID => Value::Int(i64::from(u32::from_sql(ty, raw)?)),
            Type::BOOL => Value::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f64::from(f32::from_sql(ty, raw)?)),
            Type::NUMERIC => Value::Int(numeric_to_i64(raw)?),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::VOID => Value::Null,
            _ => Value::Text(<&str as FromSql>::from_sql(&Type::TEXT, raw)?.to_string()),
        }))
    }

    fn from_sql_null(
        _: &tokio_postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgColumn(Value::Null))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// A NUMERIC that holds an integer (`sum()` of BIGINT columns is NUMERIC) as an `i64`.
fn numeric_to_i64(raw: &[u8]) -> Result<i64, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<i16, Box<dyn std::error::Error + Sync + Send>> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "a truncated NUMERIC".into())
    };
    let ndigits = word(0)?;
    let weight = word(1)?;
    let sign = word(2)? as u16;
    if sign == 0xC000 {
        return Err("NUMERIC NaN".into());
    }
    let mut value: i128 = 0;
    for i in 0..ndigits.max(0) as usize {
        let digit = i128::from(word(4 + i)?);
        let power = i32::from(weight) - i as i32;
        if power < 0 {
            if digit != 0 {
                return Err("a NUMERIC with a fraction where an integer was expected".into());
            }
            continue;
        }
        value += digit * 10_000i128.pow(power as u32);
    }
    if sign == 0x4000 {
        value = -value;
    }
    i64::try_from(value).map_err(|_| "a NUMERIC beyond 64 bits".into())
}

/// A PostgreSQL client or transaction, driven from a blocking-pool thread.
pub struct PgSql<'a, C> {
    client: &'a C,
    handle: &'a tokio::runtime::Handle,
}

impl<'a, C: deadpool_postgres::GenericClient + Sync> PgSql<'a, C> {
    pub fn new(client: &'a C, handle: &'a tokio::runtime::Handle) -> Self {
        PgSql { client, handle }
    }

    fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        self.handle
            .block_on(self.client.prepare_cached(&to_postgres_placeholders(sql)))
    }
}

fn bind(params: &[&dyn ToValue]) -> Vec<PgParam> {
    params.iter().map(|p| PgParam(p.to_value())).collect()
}

impl<C: deadpool_postgres::GenericClient + Sync> Sql for PgSql<'_, C> {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize, StoreError> {
        let statement = self.prepare(sql)?;
        let bound = bind(params);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = bound
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let changed = self
            .handle
            .block_on(self.client.execute(&statement, &refs))?;
        Ok(usize::try_from(changed).unwrap_or(usize::MAX))
    }

    fn each_row(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: &mut dyn FnMut(Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        use futures::StreamExt;
        let statement = self.prepare(sql)?;
        let bound = bind(params);
        let stream = self
            .handle
            .block_on(self.client.query_raw(&statement, bound.iter()))?;
        let mut stream = std::pin::pin!(stream);
        while let Some(row) = self.handle.block_on(stream.next()) {
            let row = row?;
            let mut out = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                out.push(row.try_get::<_, PgColumn>(i)?.0);
            }
            f(Row(out))?;
        }
        Ok(())
    }
}

/// Whether a PostgreSQL error is a constraint refusal, and of which kind.
pub(super) fn postgres_refusal(e: &tokio_postgres::Error) -> Option<Refusal> {
    use tokio_postgres::error::SqlState;
    let code = e.code()?;
    if *code == SqlState::UNIQUE_VIOLATION {
        Some(Refusal::Unique)
    } else if *code == SqlState::FOREIGN_KEY_VIOLATION
        || *code == SqlState::CHECK_VIOLATION
        || *code == SqlState::NOT_NULL_VIOLATION
    {
        Some(Refusal::Constraint)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollar_numbers_outside_quotes() {
        assert_eq!(
            to_postgres_placeholders("SELECT ?2, ?1, '?3', ? FROM t WHERE a = ?"),
            "SELECT $2, $1, '?3', $1 FROM t WHERE a = $2"
        );
    }

    #[test]
    fn numeric_round_trips_integers() {
        for i in [
            0i64,
            1,
            -1,
            9_999,
            10_000,
            123_456_789,
            -987_654_321_012,
            i64::MAX,
        ] {
            let mut out = bytes::BytesMut::new();
            numeric_from_i64(i, &mut out);
            assert_eq!(numeric_to_i64(&out).unwrap(), i, "{i}");
        }
    }

    #[test]
    fn sqlite_rows_come_back_as_values() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let c: &dyn Sql = &c;
        c.execute("CREATE TABLE t (a INTEGER, b TEXT)", params![])
            .unwrap();
        let n = c
            .execute(
                "INSERT INTO t (a, b) VALUES (?1, ?2), (?3, NULL)",
                params![7i64, "x", 8u32],
            )
            .unwrap();
        assert_eq!(n, 2);
        let rows = c
            .query_map("SELECT a, b FROM t ORDER BY a", params![], |r| {
                Ok((r.get::<i64>(0)?, r.get::<Option<String>>(1)?))
            })
            .unwrap();
        assert_eq!(rows, vec![(7, Some("x".into())), (8, None)]);
        assert!(matches!(
            c.query_one("SELECT a FROM t WHERE a = 9", params![], |r| r
                .get::<i64>(0)),
            Err(StoreError::NoRow(_))
        ));
        let err = c.query_value::<i64>("SELECT b FROM t WHERE a = 7", params![]);
        assert!(
            matches!(err, Err(StoreError::Decode { column: 0, .. })),
            "{err:?}"
        );
    }
}
