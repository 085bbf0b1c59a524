//! Leadership among replicas on one PostgreSQL (issue 14): exactly one replica runs the indexer and the x402 reorg
//! watcher. The leader is whoever holds a session-level advisory lock on its own connection; PostgreSQL releases it
//! the moment that connection ends (the replica crashed, its machine died, the network cut it), so another replica's
//! next `try_lead` wins within its polling interval — no lease clock to trust, no split brain while the old session
//! lives. A leader that loses its connection must stop leading before it reconnects (`still_leading` fails).

use super::money::MoneyError;

/// Key of the leadership lock ("x402lead" in ASCII).
pub const LEADER_LOCK: i64 = 0x7834_3032_6c65_6164;

/// One replica's claim to leadership, on a connection it keeps for as long as it leads.
pub struct Leadership {
    client: tokio_postgres::Client,
}

/// Tries to become the leader on `client` (a connection reserved for this); `Ok(None)` when another replica leads.
pub async fn try_lead(client: tokio_postgres::Client) -> Result<Option<Leadership>, MoneyError> {
    let won: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
        .await?
        .get(0);
    Ok(won.then_some(Leadership { client }))
}

impl Leadership {
    /// Whether this replica still leads: its session (and so its lock) is alive. Call it before each step of
    /// leader-only work.
    pub async fn still_leading(&self) -> bool {
        self.client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
                 AND classid = (($1::bigint >> 32) & 4294967295)::oid \
                 AND objid = ($1::bigint & 4294967295)::oid AND objsubid = 1 AND granted",
                &[&LEADER_LOCK],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    }

    /// Steps down (the next replica to try wins).
    pub async fn resign(self) -> Result<(), MoneyError> {
        self.client
            .execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK])
            .await?;
        Ok(())
    }
}
