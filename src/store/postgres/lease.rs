//! Replica leases on PostgreSQL (issue 14, several replicas on one database): each replica renews a lease row while
//! it runs; its in-flight credit reservations name it (`usage.replica_id`). Another replica's recovery refunds only
//! the reservations of replicas whose lease has expired (they crashed), each claimed by a guarded update that
//! re-checks the lease in the same statement, so a reservation is refunded exactly once and a live replica's never.
//! Time is the caller's (`now`, unix seconds), so tests drive it.

use tokio_postgres::GenericClient;

use super::money::MoneyError;

/// Renews (or takes) `replica`'s lease until `now + ttl_secs`.
pub async fn renew(
    c: &impl GenericClient,
    replica: &str,
    now: i64,
    ttl_secs: i64,
) -> Result<(), MoneyError> {
    c.execute(
        "INSERT INTO replica_leases (replica_id, expires_at) VALUES ($1, $2) \
         ON CONFLICT (replica_id) DO UPDATE SET expires_at = excluded.expires_at",
        &[&replica, &(now + ttl_secs)],
    )
    .await?;
    Ok(())
}

/// Marks in-flight reservation `usage_id` as held by `replica` (done in the reservation's own transaction).
pub async fn hold(c: &impl GenericClient, usage_id: i64, replica: &str) -> Result<(), MoneyError> {
    c.execute(
        "UPDATE usage SET replica_id = $2 WHERE id = $1 AND status = 'in_flight'",
        &[&usage_id, &replica],
    )
    .await?;
    Ok(())
}

/// Refunds the in-flight reservations of replicas whose lease has expired at `now`, each in its own short
/// transaction; returns how many this call refunded. The lease is re-checked in the claiming statement, so a replica
/// that renewed since the listing keeps its row.
pub async fn recover_expired(
    client: &mut tokio_postgres::Client,
    now: i64,
) -> Result<usize, MoneyError> {
    super::usage::recover_where(
        client,
        now,
        Some(
            "replica_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM replica_leases l \
             WHERE l.replica_id = usage.replica_id AND l.expires_at > $1)",
        ),
        "(its replica's lease expired)",
    )
    .await
}
