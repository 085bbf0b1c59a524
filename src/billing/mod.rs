//! Billing: the product catalog, claims of confirmed payments, accounts and their ledger, seats, keys.
//!
//! A claim names a transaction; its worth is the sum of the **confirmed** USDC transfers to payTo in it, which must
//! all come from one payer, and the claim must carry that payer's signature over
//! [`catalog::claim_text`]. All checks that depend on state (not claimed yet, seats left, the transfers still
//! confirmed) and all effects (claim row, subscription, seats, key, ledger rows) run in ONE `BEGIN IMMEDIATE`
//! transaction on the store's writer, and the claim row's primary key is the tx hash: a payment is claimed at most
//! once under any concurrency and across restarts. A failed claim changes nothing, so the payment stays claimable.

pub mod catalog;
pub mod metering;
pub mod proof;
mod svm;
pub mod upto;

use std::collections::HashMap;
use std::sync::Arc;

use alloy::primitives::Address;
use serde::Serialize;
use serde_json::Value;

use crate::chain::{NetworkStatuses, Rpc, RpcError};
use crate::config::{Pool, Settings};
use crate::keys::{self, KeyGenError, NewKey};
use crate::store::billing::{
    self as sql, ClaimRecord, KeyRecord, LedgerError, LedgerKind, LedgerRow,
};
use crate::store::sql::Sql;
use crate::store::transfers::TransferStatus;
use crate::store::{Store, StoreError};
use crate::usdc::Usdc;

/// Unix seconds "now"; injected so tests can move time (seat expiry, rotation windows).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::store::now_unix)
}

/// What a claim buys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Product {
    /// Blocks of a pool, by name (validated: known, no repeats).
    Pool { slug: String, blocks: Vec<String> },
    /// Credits.
    Topup { amount: Usdc },
}

/// A validated claim request.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// CAIP-2 id of the network the payment was made on (a configured one; the first network when the agent named
    /// none).
    pub network: String,
    /// Lower-case 0x-hex.
    pub tx_hash: String,
    pub product: Product,
    /// Raw signature bytes, if sent.
    pub signature: Option<Vec<u8>>,
}

/// The one account that paid `live` (confirmed transfers of one transaction) and what it paid in all; a
/// transaction paid by several is refused (who would the claim belong to?).
pub(crate) fn single_payer(
    live: &[crate::store::transfers::Transfer],
) -> Result<(String, Usdc), ClaimError> {
    let mut payers: Vec<&str> = live.iter().map(|t| t.from.as_str()).collect();
    payers.sort_unstable();
    payers.dedup();
    match payers.as_slice() {
        [one] => Ok((one.to_string(), Usdc(live.iter().map(|t| t.value.0).sum()))),
        _ => Err(ClaimError::MultiplePayers(payers.join(", "))),
    }
}

/// A transaction's id as claims are keyed: an EVM hash in lower-case hex; a Solana signature as written (base58
/// is case-sensitive).
fn canonical_tx(tx: &str) -> String {
    if tx.starts_with("0x") || tx.starts_with("0X") {
        tx.to_ascii_lowercase()
    } else {
        tx.to_string()
    }
}

/// Why a claim failed. Every variant leaves the database as it was.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    #[error("a signature by the paying address is required: personal_sign of \"{text}\"")]
    SignatureRequired { text: String },
    #[error("the signature does not prove the payer: {0}")]
    BadSignature(String),
    #[error(
        "transaction {tx_hash} is not indexed (yet): no USDC transfer to payTo in it is known{head}"
    )]
    NotIndexed { tx_hash: String, head: String },
    #[error("payment pending: {confirmations} of {required} confirmations")]
    Pending { confirmations: u64, required: u64 },
    /// Solana: the transaction is confirmed but the gateway counts payments at `finalized` commitment.
    #[error(
        "payment pending: the transaction has not reached `{commitment}` commitment yet (about 13 seconds after it \
         landed)"
    )]
    PendingCommitment { commitment: &'static str },
    #[error(
        "the block with this transaction left the canonical chain (reorg); the payment does not count unless the \
         transaction is mined again"
    )]
    Orphaned,
    #[error(
        "the transaction pays payTo from several addresses ({0}); it cannot be claimed by one payer"
    )]
    MultiplePayers(String),
    #[error("this transaction was already claimed ({})", describe(.0))]
    AlreadyClaimed(Box<ClaimRecord>),
    #[error(
        "block `{block}` of pool `{pool}` is sold out; the payment stays claimable (for example as credits)"
    )]
    SoldOut { pool: String, block: String },
    #[error(
        "underpaid: paid {paid} USDC, the price is {price} USDC (short by {shortfall}); the payment stays claimable"
    )]
    Underpaid {
        paid: Usdc,
        price: Usdc,
        shortfall: Usdc,
    },
    #[error("the payment changed while it was being claimed (reorg?); try again")]
    PaymentChanged,
    #[error("cannot check the contract wallet's signature right now: {0}")]
    Rpc(RpcError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("key generation: {0}")]
    KeyGen(#[from] KeyGenError),
}

fn describe(c: &ClaimRecord) -> String {
    match (&c.pool, &c.blocks) {
        (Some(pool), Some(blocks)) => {
            format!(
                "pool `{pool}` blocks {} for {} USDC, by {}",
                blocks.join(","),
                c.price_usdc,
                c.account
            )
        }
        _ => format!("{} USDC of credits, by {}", c.price_usdc, c.account),
    }
}

impl From<LedgerError> for ClaimError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Store(e) => ClaimError::Store(e),
            // Claims only add to balances.
            other => ClaimError::Store(StoreError::Task(other.to_string())),
        }
    }
}

/// Credits that the surplus of a payment became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Surplus {
    pub credited_usdc: Usdc,
    pub new_balance: Usdc,
    pub account: String,
}

/// A successful pool subscription.
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub api_key: String,
    pub key_id: String,
    pub pool: String,
    pub blocks: Vec<String>,
    pub price: Usdc,
    pub paid: Usdc,
    pub expires_at: i64,
    pub account: String,
    pub surplus: Option<Surplus>,
}

/// A successful top-up.
#[derive(Debug, Clone)]
pub struct ToppedUp {
    pub amount: Usdc,
    pub paid: Usdc,
    pub new_balance: Usdc,
    pub account: String,
    /// Set when this top-up minted the account's credit key.
    pub api_key: Option<(String, String)>,
    /// Paid beyond `amount`, also credited.
    pub surplus: Usdc,
}

/// A successful claim.
#[derive(Debug, Clone)]
pub enum Claimed {
    Subscription(Subscribed),
    Topup(ToppedUp),
}

/// How an x402 payment was made, kept with its settlement (for re-submission after a reorg and for auditors).
#[derive(Debug, Clone)]
pub struct X402Record {
    pub x402_version: u32,
    /// 0x-hex, lower-case.
    pub nonce: String,
    /// JSON of the EIP-3009 authorization.
    pub authorization: String,
    /// 0x-hex signature.
    pub signature: String,
    /// JSON of the offer it was verified against.
    pub requirements: String,
    pub resource: String,
}

/// A payment the gateway itself settled.
#[derive(Debug, Clone)]
pub struct SettledPayment {
    /// CAIP-2 id of the network it was settled on.
    pub network: String,
    pub tx_hash: String,
    /// The paying account: lower-case 0x-hex on EVM networks, the base58 wallet on Solana.
    pub payer: String,
    pub paid: Usdc,
    pub product: Product,
    pub record: X402Record,
}

/// A key handed out by a rotation.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotatedKey {
    pub api_key: String,
    pub key_id: String,
    pub kind: String,
    /// Public id of the revoked key it replaces (none for a newly minted credit key).
    pub replaces: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A validated rotation request.
#[derive(Debug, Clone)]
pub struct RotateRequest {
    pub address: Address,
    pub signed_at: i64,
    pub signature: Vec<u8>,
    /// Rotate only this key (public id); all live keys otherwise.
    pub key_id: Option<String>,
}

/// Why a rotation failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    #[error(
        "signedAt {signed_at} is more than {max} seconds away from the gateway's clock ({now}); sign a fresh message"
    )]
    Expired { signed_at: i64, now: i64, max: i64 },
    #[error("the signature does not prove the account: {0}")]
    BadSignature(String),
    #[error("this rotation message was already used; sign a fresh one (new signedAt)")]
    Replayed,
    #[error("no account {0}: it has never claimed a payment")]
    UnknownAccount(String),
    #[error("no live key {0} of this account")]
    UnknownKey(String),
    #[error("the account has no live key to rotate")]
    NothingToRotate,
    #[error("cannot check the contract wallet's signature right now: {0}")]
    Rpc(RpcError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("key generation: {0}")]
    KeyGen(#[from] KeyGenError),
}

/// A key presented on `/v1/*` that is valid now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    pub record: KeyRecord,
}

/// An account as the operator sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    pub address: String,
    pub exists: bool,
    pub balance_usdc: Usdc,
    pub ledger_sum_usdc: Usdc,
    pub ledger: Vec<LedgerRow>,
    pub claims: Vec<ClaimRecord>,
    pub keys: Vec<KeyRecord>,
}

/// Billing services shared by the HTTP handlers.
#[derive(Clone)]
pub struct Billing {
    settings: Arc<Settings>,
    store: Store,
    /// Each network's chain client (contract-wallet proofs), by CAIP-2 id, the first network first.
    rpcs: Arc<Vec<(String, Arc<Rpc>)>>,
    /// Each network's indexer status.
    indexers: NetworkStatuses,
    clock: Clock,
}

/// `"2026-12-21T08:00:00Z"`.
pub fn rfc3339(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

impl Billing {
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        indexers: NetworkStatuses,
        clock: Clock,
    ) -> Result<Billing, RpcError> {
        // A claim waits for at most one retry round: the agent can retry itself.
        let rpcs = settings
            .networks()
            .map(|n| {
                Ok((
                    n.network.caip2(),
                    Arc::new(
                        Rpc::new(&n.rpc_http, n.rpc_timeout)?
                            .with_retries(1)
                            .for_network(n.network.caip2()),
                    ),
                ))
            })
            .collect::<Result<Vec<_>, RpcError>>()?;
        Ok(Billing {
            settings,
            store,
            rpcs: Arc::new(rpcs),
            indexers,
            clock,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The live catalog.
    pub async fn catalog(&self) -> Result<Value, StoreError> {
        let now = self.now();
        let taken = self
            .store
            .read(move |c| -> Result<_, StoreError> { sql::all_seats_taken(c, now) })
            .await?;
        let taken: HashMap<(String, String), u32> =
            taken.into_iter().map(|(p, b, n)| ((p, b), n)).collect();
        Ok(catalog::catalog(&self.settings, &taken))
    }

    pub fn pool(&self, slug: &str) -> Option<&Pool> {
        self.settings.pools.iter().find(|p| p.slug == slug)
    }

    /// The first of `blocks` of pool `slug` with no seat left now, if any.
    pub async fn seats_left(
        &self,
        slug: &str,
        blocks: &[String],
    ) -> Result<Option<String>, StoreError> {
        let Some(pool) = self.pool(slug).cloned() else {
            return Ok(None);
        };
        let now = self.now();
        let blocks = blocks.to_vec();
        self.store
            .read(move |c| -> Result<_, StoreError> {
                for b in &blocks {
                    let seats = pool.block(b).map_or(0, |x| x.seats);
                    if sql::seats_taken(c, &pool.slug, b, now)? >= seats {
                        return Ok(Some(b.clone()));
                    }
                }
                Ok(None)
            })
            .await
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The first network's chain client (contract-wallet proofs of rotations).
    pub fn rpc(&self) -> &Rpc {
        // `rpcs` holds one client per configured network and there is always a first one (see `new`).
        &self.rpcs[0].1
    }

    /// The chain client of the network with CAIP-2 id `network`.
    pub fn rpc_of(&self, network: &str) -> Option<&Rpc> {
        self.rpcs
            .iter()
            .find(|(id, _)| id == network)
            .map(|(_, r)| r.as_ref())
    }

    /// Each network's indexer status.
    pub fn indexers(&self) -> &NetworkStatuses {
        &self.indexers
    }

    /// The claim of transaction `tx_hash` (any network; a claim is keyed by its transaction), if one was made.
    pub async fn claim_record(&self, tx_hash: &str) -> Result<Option<ClaimRecord>, StoreError> {
        let tx_hash = tx_hash.to_string();
        self.store.read(move |c| sql::claim_of(c, &tx_hash)).await
    }

    /// Claims a confirmed payment; see the module documentation.
    pub async fn claim(&self, req: ClaimRequest) -> Result<Claimed, ClaimError> {
        if let Some(svm) = self.settings.svm_network(&req.network) {
            let svm = svm.clone();
            return self.claim_svm(req, &svm).await;
        }
        let chain =
            self.settings
                .network(&req.network)
                .ok_or_else(|| ClaimError::InvalidField {
                    field: "network",
                    message: format!(
                        "`{}` is not a network this gateway accepts payments on ({})",
                        req.network,
                        self.settings
                            .networks()
                            .map(|n| n.network.caip2())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?;
        let network = chain.network.caip2();
        let (rpc, status) = match (self.rpc_of(&network), self.indexers.get(&network)) {
            (Some(rpc), Some(status)) => (rpc, status.clone()),
            _ => {
                return Err(ClaimError::Store(StoreError::Task(format!(
                    "no chain client or indexer for {network}"
                ))));
            }
        };
        let required = chain.confirmations;
        // The text names the chain: a signature made for a payment on one network proves nothing on another.
        let text = catalog::claim_text(&req.tx_hash, chain.network.chain_id);
        if self.settings.auth.claims_require_signature && req.signature.is_none() {
            return Err(ClaimError::SignatureRequired { text });
        }

        // What the index knows about the transaction.
        let live = self
            .live_transfers(&network, &req.tx_hash, &status, "indexed up to block")
            .await?;
        if live.iter().any(|t| t.status == TransferStatus::Seen) {
            let head = status.snapshot().indexed_head.or(self
                .store
                .checkpoint(&network)
                .await?
                .map(|c| c.number));
            let confirmations = live
                .iter()
                .map(|t| t.confirmations(head))
                .min()
                .unwrap_or(0)
                .min(required - 1);
            return Err(ClaimError::Pending {
                confirmations,
                required,
            });
        }
        let (payer, paid) = single_payer(&live)?;

        // Only the payer can claim.
        if let Some(sig) = &req.signature
            && self.settings.auth.claims_require_signature
        {
            let signer: Address = payer
                .parse()
                .map_err(|_| ClaimError::BadSignature("stored payer".into()))?;
            match proof::verify(rpc, signer, &text, sig).await {
                Ok(()) => {}
                Err(proof::ProofError::WrongSigner(who)) => {
                    return Err(ClaimError::BadSignature(format!(
                        "it is not a signature by the payer {who} of \"{text}\""
                    )));
                }
                Err(proof::ProofError::Rpc(e)) => return Err(ClaimError::Rpc(e)),
            }
        }

        self.redeem_claim(req, network, payer, paid).await
    }

    /// The transfers of `tx_hash` on `network` that still count (not orphaned): `NotIndexed` when the index has
    /// none (saying how far it has read: `read_up_to` + the indexer's head), `Orphaned` when every one left the chain.
    pub(crate) async fn live_transfers(
        &self,
        network: &str,
        tx_hash: &str,
        status: &crate::chain::StatusHandle,
        read_up_to: &str,
    ) -> Result<Vec<crate::store::transfers::Transfer>, ClaimError> {
        let rows = self
            .store
            .transfers_of_tx(network, tx_hash.to_string())
            .await?;
        if rows.is_empty() {
            let head = status.snapshot().indexed_head;
            return Err(ClaimError::NotIndexed {
                tx_hash: tx_hash.to_string(),
                head: format!(
                    " on {network}{}",
                    head.map(|h| format!(" ({read_up_to} {h})"))
                        .unwrap_or_default()
                ),
            });
        }
        let live: Vec<_> = rows
            .into_iter()
            .filter(|t| t.status != TransferStatus::Orphaned)
            .collect();
        if live.is_empty() {
            return Err(ClaimError::Orphaned);
        }
        Ok(live)
    }

    /// The rest of a claim once the payment is found confirmed, paid by `payer` (proven): the product's price
    /// checked against `paid`, then the claim, key and ledger rows written in one transaction that first checks
    /// the transfers are still what was read.
    pub(crate) async fn redeem_claim(
        &self,
        req: ClaimRequest,
        network: String,
        payer: String,
        paid: Usdc,
    ) -> Result<Claimed, ClaimError> {
        // Static checks that need no state.
        let now = self.now();
        let (pool, price) = match &req.product {
            Product::Pool { slug, blocks } => {
                let pool = self
                    .pool(slug)
                    .ok_or_else(|| ClaimError::InvalidField {
                        field: "poolSlug",
                        message: format!("unknown pool `{slug}`"),
                    })?
                    .clone();
                let mut price = Usdc::ZERO;
                for b in blocks {
                    let block = pool.block(b).ok_or_else(|| ClaimError::InvalidField {
                        field: "blocks",
                        message: format!("pool `{slug}` has no block `{b}`"),
                    })?;
                    price = Usdc(price.0 + block.price.0);
                }
                (Some(pool), price)
            }
            Product::Topup { amount } => {
                let min = self.settings.credits.min_topup;
                if paid < min {
                    return Err(ClaimError::Underpaid {
                        paid,
                        price: min,
                        shortfall: Usdc(min.0 - paid.0),
                    });
                }
                if *amount > paid {
                    return Err(ClaimError::InvalidField {
                        field: "amount",
                        message: format!(
                            "{amount} USDC is more than the transaction paid ({paid} USDC)"
                        ),
                    });
                }
                (None, *amount)
            }
        };
        if paid < price {
            return Err(ClaimError::Underpaid {
                paid,
                price,
                shortfall: Usdc(price.0 - paid.0),
            });
        }

        let key = keys::generate()?;
        let signature = req
            .signature
            .as_ref()
            .map(|s| format!("0x{}", alloy::hex::encode(s)));
        let tx_hash = req.tx_hash.clone();
        let product = req.product.clone();
        self.store
            .write(move |tx| -> Result<Claimed, ClaimError> {
                if let Some(existing) = sql::claim_of(tx, &tx_hash)? {
                    return Err(ClaimError::AlreadyClaimed(Box::new(existing)));
                }
                // The transfers must still be what was checked above.
                if sql::confirmed_value_by_payer(tx, &network, &tx_hash)?
                    != vec![(payer.clone(), paid)]
                {
                    return Err(ClaimError::PaymentChanged);
                }
                redeem(
                    tx,
                    Redeem {
                        network: &network,
                        tx_hash: &tx_hash,
                        payer,
                        paid,
                        price,
                        product,
                        pool,
                        key: &key,
                        signature: signature.as_deref(),
                        created_by: "claim",
                        now,
                    },
                )
            })
            .await
    }

    /// Redeems a payment the gateway settled itself (standard x402): the claim row keyed by the settlement's tx
    /// hash, the key, the ledger rows and the settlement record are written in ONE transaction, before the HTTP
    /// answer, so a later claim of the same txHash (`/api/agent/topup`) is `already_claimed` and the indexer's copy
    /// of the transfer can never be credited again. No payer proof is needed: the EIP-3009 signature is it.
    ///
    /// The money has already moved, so nothing may be lost: when a subscription cannot be sold any more (a seat
    /// was taken meanwhile), the payment becomes credits of the payer and the second value says why.
    pub async fn claim_settled(
        &self,
        p: SettledPayment,
    ) -> Result<(Claimed, Option<ClaimError>), ClaimError> {
        let now = self.now();
        let key = keys::generate()?;
        let pool = match &p.product {
            Product::Pool { slug, .. } => Some(
                self.pool(slug)
                    .ok_or_else(|| ClaimError::InvalidField {
                        field: "pool",
                        message: format!("unknown pool `{slug}`"),
                    })?
                    .clone(),
            ),
            Product::Topup { .. } => None,
        };
        self.store
            .write(
                move |tx| -> Result<(Claimed, Option<ClaimError>), ClaimError> {
                    let tx_hash = canonical_tx(&p.tx_hash);
                    if let Some(existing) = sql::claim_of(tx, &tx_hash)? {
                        return Err(ClaimError::AlreadyClaimed(Box::new(existing)));
                    }
                    let payer = p.payer.clone();
                    let mut product = p.product.clone();
                    let mut price = p.paid;
                    let mut fallback = None;
                    if let (Product::Pool { slug, blocks }, Some(pool)) = (&p.product, &pool) {
                        price = Usdc::ZERO;
                        for b in blocks {
                            let block = pool.block(b);
                            price = Usdc(price.0 + block.map_or(0, |x| x.price.0));
                            if sql::seats_taken(tx, slug, b, now)? >= block.map_or(0, |x| x.seats) {
                                fallback = Some(ClaimError::SoldOut {
                                    pool: slug.clone(),
                                    block: b.clone(),
                                });
                            }
                        }
                        if fallback.is_some() || price > p.paid {
                            product = Product::Topup { amount: p.paid };
                            price = p.paid;
                        }
                    }
                    if let Product::Topup { amount } = &mut product {
                        *amount = (*amount).min(p.paid);
                        price = *amount;
                    }
                    let claimed = redeem(
                        tx,
                        Redeem {
                            network: &p.network,
                            tx_hash: &tx_hash,
                            payer: payer.clone(),
                            paid: p.paid,
                            price,
                            pool: matches!(product, Product::Pool { .. })
                                .then_some(pool)
                                .flatten(),
                            product,
                            key: &key,
                            signature: None,
                            created_by: "x402",
                            now,
                        },
                    )?;
                    let (kind, key_id) = match &claimed {
                        Claimed::Subscription(s) => (
                            "subscription",
                            sql::key_by_public_id(tx, &s.key_id)?.map(|(k, _)| k.id),
                        ),
                        Claimed::Topup(_) => ("credits", sql::live_credit_key(tx, &payer)?),
                    };
                    let r = &p.record;
                    crate::store::x402::insert_settlement(
                        tx,
                        &crate::store::x402::NewSettlement {
                            network: &p.network,
                            tx_hash: &tx_hash,
                            payer: &payer,
                            nonce: &r.nonce,
                            x402_version: r.x402_version,
                            authorization: &r.authorization,
                            signature: &r.signature,
                            requirements: &r.requirements,
                            resource: &r.resource,
                            product: kind,
                            amount_atomic: p.paid.0,
                            key_id,
                            now,
                        },
                    )?;
                    Ok((claimed, fallback))
                },
            )
            .await
    }

    /// Records a per-request x402 payment (no key): a `topup` claim of its tx hash, the top-up and the debit of
    /// the request in the ledger, and the settlement record, in one transaction.
    pub async fn record_request_payment(
        &self,
        p: SettledPayment,
        note: String,
    ) -> Result<(), ClaimError> {
        let now = self.now();
        self.store
            .write(move |tx| -> Result<(), ClaimError> {
                let tx_hash = canonical_tx(&p.tx_hash);
                if let Some(existing) = sql::claim_of(tx, &tx_hash)? {
                    return Err(ClaimError::AlreadyClaimed(Box::new(existing)));
                }
                let payer = p.payer.clone();
                sql::ensure_account(tx, &payer, now)?;
                sql::append_ledger(
                    tx,
                    &payer,
                    LedgerKind::Topup,
                    p.paid,
                    Some(&tx_hash),
                    None,
                    Some(&note),
                    now,
                )?;
                sql::append_ledger(
                    tx,
                    &payer,
                    LedgerKind::Debit,
                    Usdc(-p.paid.0),
                    Some(&tx_hash),
                    None,
                    Some(&note),
                    now,
                )?;
                if !sql::insert_claim(
                    tx, &p.network, &tx_hash, &payer, "topup", p.paid, p.paid, None, None, None,
                    now,
                )? {
                    return Err(lost_claim_race(tx, &tx_hash));
                }
                let r = &p.record;
                crate::store::x402::insert_settlement(
                    tx,
                    &crate::store::x402::NewSettlement {
                        network: &p.network,
                        tx_hash: &tx_hash,
                        payer: &payer,
                        nonce: &r.nonce,
                        x402_version: r.x402_version,
                        authorization: &r.authorization,
                        signature: &r.signature,
                        requirements: &r.requirements,
                        resource: &r.resource,
                        product: "request",
                        amount_atomic: p.paid.0,
                        key_id: None,
                        now,
                    },
                )?;
                Ok(())
            })
            .await
    }

    /// Rotates the account's keys after checking a fresh, unused signature by the account.
    pub async fn rotate(&self, req: RotateRequest) -> Result<Vec<RotatedKey>, RotateError> {
        let now = self.now();
        let max = catalog::ROTATION_MAX_SKEW_SECS;
        // Saturating: `signedAt` is the client's number, anywhere in i64 (i64::MIN - now would overflow).
        if now.saturating_sub(req.signed_at).saturating_abs() > max {
            return Err(RotateError::Expired {
                signed_at: req.signed_at,
                now,
                max,
            });
        }
        let account = format!("{:#x}", req.address);
        let text = catalog::rotate_text_for(&self.settings, &account, req.signed_at);
        match proof::verify(self.rpc(), req.address, &text, &req.signature).await {
            Ok(()) => {}
            Err(proof::ProofError::WrongSigner(who)) => {
                return Err(RotateError::BadSignature(format!(
                    "it is not a signature by {who} of \"{text}\""
                )));
            }
            Err(proof::ProofError::Rpc(e)) => return Err(RotateError::Rpc(e)),
        }
        // Keys for all live keys (and perhaps a credit key), generated outside the writer.
        let live: Vec<KeyRecord> = {
            let account = account.clone();
            self.store
                .read(move |c| -> Result<_, StoreError> { sql::list_keys(c, Some(&account)) })
                .await?
                .into_iter()
                .filter(|k| k.is_live())
                .collect()
        };
        let mut fresh = Vec::with_capacity(live.len() + 1);
        for _ in 0..=live.len() {
            fresh.push(keys::generate()?);
        }
        let signed_at = req.signed_at;
        let only = req.key_id.clone();
        self.store
            .write(move |tx| -> Result<Vec<RotatedKey>, RotateError> {
                if !sql::account_exists(tx, &account)? {
                    return Err(RotateError::UnknownAccount(account));
                }
                if !sql::use_rotation_nonce(tx, &account, signed_at, now)? {
                    return Err(RotateError::Replayed);
                }
                let live: Vec<KeyRecord> = sql::list_keys(tx, Some(&account))?
                    .into_iter()
                    .filter(|k| k.is_live())
                    .filter(|k| only.as_ref().is_none_or(|id| &k.public_id == id))
                    .collect();
                if let Some(id) = &only
                    && live.is_empty()
                {
                    return Err(RotateError::UnknownKey(id.clone()));
                }
                let mut fresh = fresh.into_iter();
                let mut out = Vec::new();
                for old in &live {
                    let Some(key) = fresh.next() else { break };
                    // Revoke first (a guarded update: a key another rotation already replaced is skipped), then
                    // mint: the unique index of live credit keys admits the new one only once the old is revoked.
                    if !sql::revoke_key(tx, old.id, "rotated", None, now)? {
                        continue;
                    }
                    let id = sql::insert_key(
                        tx,
                        &key,
                        &old.kind,
                        &account,
                        old.subscription_id,
                        "rotation",
                        now,
                    )?;
                    sql::set_replaced_by(tx, old.id, id)?;
                    out.push(RotatedKey {
                        api_key: key.full.clone(),
                        key_id: key.public_id.clone(),
                        kind: old.kind.clone(),
                        replaces: Some(old.public_id.clone()),
                        pool: old.pool.clone(),
                        blocks: old.blocks.clone(),
                        expires_at: old.expires_at.map(rfc3339),
                    });
                }
                // Credits without a key (a subscription's surplus, an operator grant) get one.
                if only.is_none()
                    && sql::balance(tx, &account)? > Usdc::ZERO
                    && let Some(key) = fresh.next()
                    && sql::insert_credit_key_if_none(tx, &key, &account, "rotation", now)?
                        .is_some()
                {
                    out.push(RotatedKey {
                        api_key: key.full.clone(),
                        key_id: key.public_id.clone(),
                        kind: "credit".into(),
                        replaces: None,
                        pool: None,
                        blocks: None,
                        expires_at: None,
                    });
                }
                if out.is_empty() {
                    return Err(RotateError::NothingToRotate);
                }
                Ok(out)
            })
            .await
    }

    /// The key behind `Authorization: Bearer …` when it is refused only because it is suspended (the payment that
    /// bought it left the chain and its purchase is reversed): the caller says so instead of a bare 402.
    pub async fn suspended_key(&self, presented: &str) -> Result<Option<KeyRecord>, StoreError> {
        let Some(parsed) = keys::parse(presented) else {
            return Ok(None);
        };
        let public_id = parsed.public_id.to_string();
        let secret = parsed.secret.to_string();
        self.store
            .read(move |c| -> Result<_, StoreError> {
                let Some((record, hash)) = sql::key_by_public_id(c, &public_id)? else {
                    return Ok(None);
                };
                let suspended = keys::secret_matches(&secret, &hash)
                    && record.revoked_at.is_none()
                    && record.suspended_at.is_some();
                Ok(suspended.then_some(record))
            })
            .await
    }

    /// The key behind `Authorization: Bearer …`, if it is valid now (exists, secret matches, not revoked, its
    /// subscription not expired).
    pub async fn authorize(&self, presented: &str) -> Result<Option<AuthorizedKey>, StoreError> {
        let Some(parsed) = keys::parse(presented) else {
            return Ok(None);
        };
        let public_id = parsed.public_id.to_string();
        let secret = parsed.secret.to_string();
        let now = self.now();
        self.store
            .read(move |c| -> Result<_, StoreError> {
                let Some((record, hash)) = sql::key_by_public_id(c, &public_id)? else {
                    return Ok(None);
                };
                let ok = keys::secret_matches(&secret, &hash)
                    && record.is_live()
                    && record.expires_at.is_none_or(|e| e > now);
                Ok(ok.then_some(AuthorizedKey { record }))
            })
            .await
    }
}

/// What a redemption writes: a payment of `paid` by `payer` in `tx_hash`, buying `product` at `price`.
pub(crate) struct Redeem<'a> {
    /// CAIP-2 id of the network the payment was made on.
    pub network: &'a str,
    pub tx_hash: &'a str,
    pub payer: String,
    pub paid: Usdc,
    pub price: Usdc,
    pub product: Product,
    pub pool: Option<Pool>,
    pub key: &'a NewKey,
    pub signature: Option<&'a str>,
    /// `created_by` of a minted key (`claim`, `x402`).
    pub created_by: &'a str,
    pub now: i64,
}

/// The claim row was refused although the claim was checked as new in this transaction: another claim of the same
/// payment committed in between (several writers on PostgreSQL; one writer on SQLite never gets here). The loser
/// gets the answer it would have got had it come second — `already_claimed` with the winner's record — and its
/// transaction (key, ledger rows, seats) rolls back.
fn lost_claim_race(tx: &dyn Sql, tx_hash: &str) -> ClaimError {
    match sql::claim_of(tx, tx_hash) {
        Ok(Some(existing)) => ClaimError::AlreadyClaimed(Box::new(existing)),
        Ok(None) => ClaimError::PaymentChanged,
        Err(e) => ClaimError::Store(e),
    }
}

/// The effects of a claim, inside the caller's write transaction (which has checked that `tx_hash` is not claimed
/// and what it paid): account, subscription and seats or credits, key, ledger rows and, last, the claim row.
pub(crate) fn redeem(tx: &dyn Sql, r: Redeem<'_>) -> Result<Claimed, ClaimError> {
    let Redeem {
        network,
        tx_hash,
        payer,
        paid,
        price,
        product,
        pool,
        key,
        signature,
        created_by,
        now,
    } = r;
    let tx_hash = tx_hash.to_string();
    let signature = signature.map(str::to_string);

    sql::ensure_account(tx, &payer, now)?;
    let surplus = Usdc(paid.0 - price.0);
    match (product, pool) {
        (Product::Pool { slug, blocks }, Some(pool)) => {
            let expires_at = now + pool.duration_secs();
            let Some(sub_id) = sql::insert_subscription(
                tx, &payer, &slug, &blocks, price, &tx_hash, now, expires_at,
            )?
            else {
                return Err(lost_claim_race(tx, &tx_hash));
            };
            // Seats in one order (by block name) whatever order the buyer listed them in: two claims of the same
            // blocks on PostgreSQL lock their seat rows in the same order, so they queue instead of deadlocking.
            let mut in_order: Vec<&String> = blocks.iter().collect();
            in_order.sort();
            for b in in_order {
                let seats = pool.block(b).map_or(0, |x| x.seats);
                // One guarded statement per seat (see `take_seat`); a sold-out block rolls the whole claim back.
                if !sql::take_seat(tx, &slug, b, seats, sub_id, expires_at, now)? {
                    return Err(ClaimError::SoldOut {
                        pool: slug.clone(),
                        block: b.clone(),
                    });
                }
            }
            let key_id = sql::insert_key(
                tx,
                key,
                "subscription",
                &payer,
                Some(sub_id),
                created_by,
                now,
            )?;
            let surplus_view = if surplus > Usdc::ZERO {
                let new_balance = sql::append_ledger(
                    tx,
                    &payer,
                    LedgerKind::Surplus,
                    surplus,
                    Some(&tx_hash),
                    None,
                    Some("paid beyond the subscription's price"),
                    now,
                )?;
                Some(Surplus {
                    credited_usdc: surplus,
                    new_balance,
                    account: payer.clone(),
                })
            } else {
                None
            };
            if !sql::insert_claim(
                tx,
                network,
                &tx_hash,
                &payer,
                "subscription",
                paid,
                price,
                Some(sub_id),
                Some(key_id),
                signature.as_deref(),
                now,
            )? {
                return Err(lost_claim_race(tx, &tx_hash));
            }
            Ok(Claimed::Subscription(Subscribed {
                api_key: key.full.clone(),
                key_id: key.public_id.clone(),
                pool: slug,
                blocks,
                price,
                paid,
                expires_at,
                account: payer,
                surplus: surplus_view,
            }))
        }
        (Product::Topup { amount }, _) => {
            let minted = sql::insert_credit_key_if_none(tx, key, &payer, created_by, now)?;
            let mut new_balance = sql::append_ledger(
                tx,
                &payer,
                LedgerKind::Topup,
                amount,
                Some(&tx_hash),
                None,
                None,
                now,
            )?;
            if surplus > Usdc::ZERO {
                new_balance = sql::append_ledger(
                    tx,
                    &payer,
                    LedgerKind::Surplus,
                    surplus,
                    Some(&tx_hash),
                    None,
                    Some("paid beyond the requested top-up amount"),
                    now,
                )?;
            }
            if !sql::insert_claim(
                tx,
                network,
                &tx_hash,
                &payer,
                "topup",
                paid,
                amount,
                None,
                minted,
                signature.as_deref(),
                now,
            )? {
                return Err(lost_claim_race(tx, &tx_hash));
            }
            Ok(Claimed::Topup(ToppedUp {
                amount,
                paid,
                new_balance,
                account: payer,
                api_key: minted.map(|_| (key.full.clone(), key.public_id.clone())),
                surplus,
            }))
        }
        (Product::Pool { .. }, None) => Err(ClaimError::PaymentChanged),
    }
}

/// Operator: all keys (or one account's), newest first.
pub async fn list_keys(
    store: &Store,
    account: Option<String>,
) -> Result<Vec<KeyRecord>, StoreError> {
    store
        .read(move |c| -> Result<_, StoreError> { sql::list_keys(c, account.as_deref()) })
        .await
}

/// Operator: revokes a key by public id; `false` when there is no such live key.
pub async fn revoke_key(store: &Store, public_id: String, now: i64) -> Result<bool, StoreError> {
    store
        .write(move |tx| -> Result<bool, StoreError> {
            let Some((record, _)) = sql::key_by_public_id(tx, &public_id)? else {
                return Ok(false);
            };
            sql::revoke_key(tx, record.id, "revoked by the operator", None, now)
        })
        .await
}

/// Operator-issued credits: a `grant` ledger row. Mints a credit key when the account has no live one.
pub async fn grant(
    store: &Store,
    account: Address,
    amount: Usdc,
    note: Option<String>,
    now: i64,
) -> Result<(Usdc, Option<NewKey>), StoreError> {
    let account = format!("{account:#x}");
    let key = keys::generate().map_err(|e| StoreError::Task(e.to_string()))?;
    store
        .write(move |tx| -> Result<_, StoreError> {
            sql::ensure_account(tx, &account, now)?;
            let balance = sql::append_ledger(
                tx,
                &account,
                LedgerKind::Grant,
                amount,
                None,
                None,
                note.as_deref(),
                now,
            )
            .map_err(|e| match e {
                LedgerError::Store(e) => e,
                other => StoreError::Task(other.to_string()),
            })?;
            let minted =
                sql::insert_credit_key_if_none(tx, &key, &account, "operator", now)?.map(|_| key);
            Ok((balance, minted))
        })
        .await
}

/// Operator: an account's balance, ledger, claims and keys.
pub async fn account_view(store: &Store, account: Address) -> Result<AccountView, StoreError> {
    let address = format!("{account:#x}");
    store
        .read(move |c| -> Result<_, StoreError> {
            let ledger = sql::ledger_of(c, &address)?;
            Ok(AccountView {
                exists: sql::account_exists(c, &address)?,
                balance_usdc: sql::balance(c, &address)?,
                ledger_sum_usdc: Usdc(ledger.iter().map(|r| r.amount_usdc.0).sum()),
                ledger,
                claims: sql::claims_of_account(c, &address)?,
                keys: sql::list_keys(c, Some(&address))?,
                address,
            })
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
