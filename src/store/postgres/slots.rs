//! Concurrency slots across replicas on PostgreSQL (issue 14): a pool subscription serves one request at a time
//! and a credit account at most N, whichever replica receives them. Slot `k` of an owner is a row taken by one
//! guarded upsert — it succeeds only if the slot is free or held by a replica whose lease (`store::postgres::lease`)
//! has expired — and released only by the request that holds it, so a crashed replica's slots come back and a slow
//! replica's late release never frees a slot someone else took over.

use tokio_postgres::GenericClient;

use super::money::MoneyError;

/// A slot held by one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub owner: String,
    pub slot_no: i64,
    pub request_id: String,
}

/// Takes one of `limit` slots of `owner` for `request_id` on `replica` at `now`; `None` when all are busy.
pub async fn acquire(
    c: &impl GenericClient,
    owner: &str,
    limit: u32,
    replica: &str,
    request_id: &str,
    now: i64,
) -> Result<Option<Held>, MoneyError> {
    for slot_no in 1..=i64::from(limit) {
        let taken = c
            .execute(
                "INSERT INTO request_slots (owner, slot_no, replica_id, request_id) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (owner, slot_no) DO UPDATE SET replica_id = excluded.replica_id, \
                 request_id = excluded.request_id \
                 WHERE NOT EXISTS (SELECT 1 FROM replica_leases l WHERE l.replica_id = request_slots.replica_id \
                 AND l.expires_at > $5)",
                &[&owner, &slot_no, &replica, &request_id, &now],
            )
            .await?;
        if taken == 1 {
            return Ok(Some(Held {
                owner: owner.to_string(),
                slot_no,
                request_id: request_id.to_string(),
            }));
        }
    }
    Ok(None)
}

/// Releases `held`, only if its request still holds it; returns whether it did.
pub async fn release(c: &impl GenericClient, held: &Held) -> Result<bool, MoneyError> {
    let n = c
        .execute(
            "DELETE FROM request_slots WHERE owner = $1 AND slot_no = $2 AND request_id = $3",
            &[&held.owner, &held.slot_no, &held.request_id],
        )
        .await?;
    Ok(n == 1)
}
