//! The money of inference requests, and the only code that moves it: a credit request's **reservation** (the
//! worst-case cost of the gateway's bound, debited before anything is forwarded), its **settlement** (the metered
//! cost, never more than the reservation, the rest refunded), a pool key's usage record, and the **start-up
//! refund** of reservations a stopped process left `in_flight`. Handlers and the proxy call these; none of them
//! touches the store for metering. Each rule is one guarded statement in the store: the debit that cannot overdraw,
//! the settlement that happens only while the row is `in_flight`.

use crate::store::billing::LedgerError;
use crate::store::usage::{self, NewUsage, Outcome, Settled};
use crate::store::{Store, StoreError};
use crate::usdc::Usdc;

use super::Billing;

/// Why a reservation was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The balance does not cover the request's worst case (the caller answers with the top-up 402).
    #[error("balance {balance} USDC is below the request's worst-case cost {needed} USDC")]
    Insufficient { balance: Usdc, needed: Usdc },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key's usage as `/v1/usage` shows it.
#[derive(Debug, Clone)]
pub struct KeyUsage {
    pub last_24h: usage::Totals,
    pub all_time: usage::Totals,
    /// The 20 most recent requests, newest first.
    pub recent: Vec<usage::UsageRow>,
    /// The key's account's balance.
    pub balance: Usdc,
}

impl Billing {
    /// The usage of key `key_id` of `account` at `now`.
    pub async fn key_usage(
        &self,
        key_id: i64,
        account: String,
        now: i64,
    ) -> Result<KeyUsage, StoreError> {
        self.store()
            .read(move |c| -> Result<_, StoreError> {
                Ok(KeyUsage {
                    last_24h: usage::totals(c, key_id, now - 86_400)?,
                    all_time: usage::totals(c, key_id, i64::MIN)?,
                    recent: usage::recent(c, key_id, 20)?,
                    balance: crate::store::billing::balance(c, &account)?,
                })
            })
            .await
    }

    /// Debits `amount` (the bound's worst-case cost) from the request's account and writes its `in_flight` usage
    /// row, in one transaction; returns the usage row's id.
    pub async fn reserve_request(&self, row: NewUsage, amount: Usdc) -> Result<i64, ReserveError> {
        let store = self.store();
        let replica = store.replica_id().map(str::to_string);
        store
            .write_with(store.metering_durability(), move |tx| {
                usage::reserve(tx, &row, amount, replica.as_deref())
                    .map(|(id, _left)| id)
                    .map_err(|e| match e {
                        LedgerError::Insufficient { balance, needed } => {
                            ReserveError::Insufficient { balance, needed }
                        }
                        LedgerError::Store(e) => ReserveError::Store(e),
                    })
            })
            .await
    }
}

/// Settles a credit request reserved as `usage_id`: charges `outcome.cost`, at most `reserved`, refunds the rest.
/// Returns what was charged and the balance after. A row no longer `in_flight` (refunded by a start-up recovery)
/// is charged nothing.
pub async fn settle_credit(
    store: &Store,
    usage_id: i64,
    account: String,
    key_id: i64,
    reserved: Usdc,
    outcome: Outcome,
    now: i64,
) -> Result<Settled, StoreError> {
    store
        .write_with(store.metering_durability(), move |tx| {
            usage::settle_credit(tx, usage_id, &account, key_id, reserved, &outcome, now).map_err(
                |e| match e {
                    LedgerError::Store(e) => e,
                    other => StoreError::Task(other.to_string()),
                },
            )
        })
        .await
}

/// Records a pool key's finished request (nothing is charged).
pub async fn record_subscription(
    store: &Store,
    row: NewUsage,
    outcome: Outcome,
) -> Result<(), StoreError> {
    store
        .write_with(
            store.metering_durability(),
            move |tx| -> Result<_, StoreError> {
                usage::record_subscription(tx, &row, &outcome)?;
                Ok(())
            },
        )
        .await
}

/// Refunds every reservation left `in_flight` by a process that stopped mid-request (at start-up); returns how many.
pub async fn recover_interrupted(store: &Store, now: i64) -> Result<usize, StoreError> {
    store
        .write(move |tx| {
            usage::recover_in_flight(tx, now).map_err(|e| match e {
                LedgerError::Store(e) => e,
                other => StoreError::Task(other.to_string()),
            })
        })
        .await
}
