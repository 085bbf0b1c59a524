//! The engine routes call: decode nothing, trust nothing. It pairs a payment with the offer it pays for, verifies
//! it with the configured [`Settler`] at the [`Clock`]'s time, reserves the authorization in the in-flight guard
//! and settles it at most once.
//!
//! Two ways to use it:
//! - [`X402::pay`]: verify + settle in one call (buying credits or a subscription, then minting a key);
//! - [`X402::reserve`] then [`Reservation::settle`]: verify and hold the authorization, do the work (e.g. run the
//!   inference), then settle; dropping the reservation releases the authorization unsettled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::Address;

use super::error::{PaymentError, Reason};
use super::guard::{Claim, InFlight};
use super::settle::{Settlement, Settler};
use super::types::{AnyPaymentPayload, PaymentRequired};
use super::verify::{PaymentRequest, Verified, select_offer};
use crate::config::Network;

/// The time verification checks `validAfter`/`validBefore` against (unix seconds).
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock set by hand (tests, benchmarks, or following the chain's block time).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now: u64) -> ManualClock {
        ManualClock(AtomicU64::new(now))
    }

    pub fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Verifies and settles x402 payments for one network.
#[derive(Clone)]
pub struct X402 {
    network: Network,
    settler: Arc<dyn Settler>,
    clock: Arc<dyn Clock>,
    in_flight: InFlight,
    /// The database shared by several replicas (PostgreSQL): an authorization in flight is also held there, so a
    /// copy of the same payment sent to another replica is a duplicate too, not a second settlement attempt.
    shared: Option<crate::store::Store>,
    /// The `upto` scheme, when the hot wallet settles (it is the facilitator clients bind).
    upto: Option<Arc<super::upto::UptoSettler>>,
}

impl std::fmt::Debug for X402 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X402")
            .field("network", &self.network)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl X402 {
    pub fn new(network: Network, settler: Arc<dyn Settler>, clock: Arc<dyn Clock>) -> X402 {
        X402 {
            network,
            settler,
            clock,
            in_flight: InFlight::new(),
            shared: None,
            upto: None,
        }
    }

    /// Offers and settles `upto` payments with `upto`.
    pub fn with_upto(mut self, upto: super::upto::UptoSettler) -> X402 {
        self.upto = Some(Arc::new(upto));
        self
    }

    /// The `upto` scheme, if this engine settles it.
    pub fn upto(&self) -> Option<&Arc<super::upto::UptoSettler>> {
        self.upto.as_ref()
    }

    /// Holds authorizations in flight in `store` as well when several replicas may share it (PostgreSQL).
    pub fn with_store(mut self, store: &crate::store::Store) -> X402 {
        self.shared = store.replica_id().is_some().then(|| store.clone());
        self
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The in-flight guard (shared by clones of this engine).
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Pairs `payload` with the offer in `offered` it pays for.
    pub fn request(
        &self,
        payload: AnyPaymentPayload,
        offered: &PaymentRequired,
    ) -> Result<PaymentRequest, PaymentError> {
        Ok(select_offer(payload, offered, &self.network)?)
    }

    /// Verifies without reserving or settling (e.g. to answer a facilitator-style `/verify`).
    pub async fn verify(&self, req: &PaymentRequest) -> Result<Verified, PaymentError> {
        self.settler.verify(req, self.clock.now()).await
    }

    /// Verifies `payload` against `offered` and reserves its authorization. A second reservation of the same
    /// authorization fails with [`Reason::Duplicate`] while this one lives, and after it settled.
    pub async fn reserve(
        &self,
        payload: AnyPaymentPayload,
        offered: &PaymentRequired,
    ) -> Result<Reservation, PaymentError> {
        let req = self.request(payload, offered)?;
        let auth = &req.payload.exact().authorization;
        let now = self.clock.now();
        if self.in_flight.contains(auth.from, auth.nonce) {
            return Err(Reason::Duplicate.into());
        }
        let verified = match self.settler.verify(&req, now).await {
            Ok(v) => v,
            // A concurrent copy settled while this one was being verified: say so, not "nonce used".
            Err(_) if self.in_flight.contains(auth.from, auth.nonce) => {
                return Err(Reason::Duplicate.into());
            }
            Err(e) => return Err(e),
        };
        let auth = &req.payload.exact().authorization;
        let claim = self
            .in_flight
            .try_claim(
                auth.from,
                auth.nonce,
                verified.valid_before,
                self.clock.now(),
            )
            .ok_or(PaymentError::Rejected(Reason::Duplicate))?;
        let shared = match &self.shared {
            Some(store) => {
                Some(SharedHold::take(store, auth.from, auth.nonce, self.clock.now()).await?)
            }
            None => None,
        };
        Ok(Reservation {
            settler: self.settler.clone(),
            req,
            verified,
            claim,
            shared,
        })
    }

    /// Verifies and settles: `Ok` means the USDC reached payTo in the returned transaction.
    pub async fn pay(
        &self,
        payload: AnyPaymentPayload,
        offered: &PaymentRequired,
    ) -> Result<Settlement, PaymentError> {
        self.reserve(payload, offered).await?.settle().await
    }
}

impl X402 {
    /// Verifies and settles a payment that was settled before and whose transaction a reorg dropped: the same
    /// authorization, bypassing the in-flight guard (which holds it as settled). Only for recorded settlements; the
    /// chain's `authorizationState` still refuses it if the first transaction comes back.
    pub async fn resettle(&self, req: &PaymentRequest) -> Result<Settlement, PaymentError> {
        // The reorg may have dropped our own transactions: learn the hot wallet's nonce afresh.
        self.settler.forget_pending().await;
        let verified = self.settler.verify(req, self.clock.now()).await?;
        self.settler.settle(req, &verified).await
    }

    /// The engine's "now" (unix seconds).
    pub fn now(&self) -> u64 {
        self.clock.now()
    }
}

/// A verified payment whose authorization is held by this process until settled or dropped.
#[derive(Debug)]
pub struct Reservation {
    settler: Arc<dyn Settler>,
    req: PaymentRequest,
    verified: Verified,
    claim: Claim,
    shared: Option<SharedHold>,
}

/// An authorization held in the shared database (a `request_slots` row of owner `x402:<from>:<nonce>`, limit 1),
/// for as long as its reservation lives. Released when the settlement's outcome is known (then the chain refuses a
/// replay: the nonce is used); kept when it is unknown, until this replica's lease expires.
#[derive(Debug)]
struct SharedHold {
    store: crate::store::Store,
    owner: String,
    slot: i64,
    holder: String,
    keep: bool,
}

impl SharedHold {
    async fn take(
        store: &crate::store::Store,
        from: Address,
        nonce: alloy::primitives::B256,
        now: u64,
    ) -> Result<SharedHold, PaymentError> {
        let owner = format!("x402:{from:#x}:{nonce:#x}");
        let holder = format!("x402-{:016x}", rand::random::<u64>());
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        match store
            .take_request_slot(owner.clone(), 1, holder.clone(), now)
            .await
        {
            Ok(Some(slot)) => Ok(SharedHold {
                store: store.clone(),
                owner,
                slot,
                holder,
                keep: false,
            }),
            Ok(None) => Err(Reason::Duplicate.into()),
            Err(e) => Err(PaymentError::Unavailable {
                what: "the shared in-flight guard",
                message: e.to_string(),
            }),
        }
    }
}

impl Drop for SharedHold {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let (store, owner, slot, holder) = (
            self.store.clone(),
            std::mem::take(&mut self.owner),
            self.slot,
            std::mem::take(&mut self.holder),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = store.release_request_slot(owner, slot, holder).await;
            });
        }
    }
}

impl std::fmt::Debug for dyn Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settler")
    }
}

impl Reservation {
    pub fn payer(&self) -> Address {
        self.verified.payer
    }

    pub fn verified(&self) -> &Verified {
        &self.verified
    }

    pub fn request(&self) -> &PaymentRequest {
        &self.req
    }

    /// Settles. On a definite failure (refused, reverted, or not sent) the authorization is released so the
    /// client may retry; when the outcome is unknown, or on success, it stays blocked.
    pub async fn settle(self) -> Result<Settlement, PaymentError> {
        let result = self.settler.settle(&self.req, &self.verified).await;
        let mut shared = self.shared;
        match &result {
            Ok(_) => self.claim.settled(),
            Err(PaymentError::OutcomeUnknown { .. }) => {
                self.claim.settled();
                if let Some(hold) = shared.as_mut() {
                    hold.keep = true;
                }
            }
            Err(_) => drop(self.claim),
        }
        drop(shared);
        result
    }
}

/// Why the x402 engine could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Rpc(#[from] crate::chain::RpcError),
    #[error(transparent)]
    Settler(#[from] PaymentError),
}

/// The engine for `[x402]` on `chain`: self settlement reads the hot wallet's key from `env` (the variable named
/// in the config), facilitator settlement talks to the configured URL. Uses the system clock.
pub fn from_settings(
    x402: &crate::config::X402Settings,
    chain: &crate::config::ChainSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<X402, SetupError> {
    build(x402, chain, env, &mut None)
}

/// One engine per token accepted on `chain` (its USDC first): each verifies and settles payments in its token
/// (the token is the EIP-712 domain of the authorization), and with self settlement they all send from one nonce
/// sequence of the hot wallet.
pub fn engines_for_network(
    x402: &crate::config::X402Settings,
    chain: &crate::config::ChainSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<X402>, SetupError> {
    let mut nonces = None;
    chain
        .tokens()
        .into_iter()
        .map(|token| {
            let mut on_token = chain.clone();
            on_token.network.token = token.address;
            on_token.network.token_name = token.name;
            on_token.network.token_version = token.version;
            build(x402, &on_token, env, &mut nonces)
        })
        .collect()
}

fn build(
    x402: &crate::config::X402Settings,
    chain: &crate::config::ChainSettings,
    env: &dyn Fn(&str) -> Option<String>,
    nonces: &mut Option<super::settle::NonceSequence>,
) -> Result<X402, SetupError> {
    use crate::config::Settlement as Mode;
    let mut upto = None;
    let settler: Arc<dyn Settler> = match &x402.settlement {
        Mode::SelfSettle { .. } => {
            let key =
                x402.settler_key(env)?
                    .ok_or_else(|| crate::config::ConfigError::Invalid {
                        key: "x402.settler_key_env".into(),
                        message: "self settlement needs a key".into(),
                    })?;
            let rpc = Arc::new(
                crate::chain::Rpc::new(&chain.rpc_http, chain.rpc_timeout)?
                    .for_network(chain.network.caip2()),
            );
            // A settlement waits for its receipt: allow a few blocks beyond the authorization's lifetime budget.
            let timeout = std::time::Duration::from_secs(x402.max_timeout_seconds.min(120));
            let mut wallet =
                super::settle::SelfSettler::new(rpc.clone(), chain.network.clone(), key)
                    .with_receipt_timeout(timeout);
            match nonces {
                Some(shared) => wallet = wallet.with_nonce_sequence(shared.clone()),
                None => *nonces = Some(wallet.nonce_sequence()),
            }
            let wallet = Arc::new(wallet);
            // One hot wallet (one nonce sequence) settles both schemes.
            upto = Some(super::upto::UptoSettler::new(
                rpc,
                chain.network.clone(),
                wallet.clone(),
            ));
            wallet
        }
        Mode::Facilitator { url, upto_address } => {
            if let Some(address) = upto_address {
                let rpc = Arc::new(
                    crate::chain::Rpc::new(&chain.rpc_http, chain.rpc_timeout)?
                        .for_network(chain.network.caip2()),
                );
                upto = Some(super::upto::UptoSettler::through_facilitator(
                    rpc,
                    chain.network.clone(),
                    url,
                    *address,
                    std::time::Duration::from_secs(60),
                )?);
            }
            Arc::new(super::facilitator::FacilitatorSettler::new(
                url,
                chain.network.clone(),
                std::time::Duration::from_secs(60),
            )?)
        }
    };
    let engine = X402::new(chain.network.clone(), settler, Arc::new(SystemClock));
    Ok(match upto {
        Some(upto) => engine.with_upto(upto),
        None => engine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    fn settings(x402: &str) -> crate::config::Settings {
        let text = format!(
            "[chain]\nnetwork = \"base-sepolia\"\nrpc_http = [\"http://127.0.0.1:1\"]\npay_to = \"0x1111111111111111111111111111111111111111\"\n[x402]\n{x402}"
        );
        Config::parse(&text, Path::new("t.toml"))
            .unwrap()
            .resolve(Path::new("/"), &|n| (n == "HOT").then(|| KEY.to_string()))
            .unwrap()
    }

    #[test]
    fn builds_from_settings() {
        let s = settings("settler_key_env = \"HOT\"\n");
        let engine = from_settings(s.x402.as_ref().unwrap(), &s.chain, &|n| {
            (n == "HOT").then(|| KEY.to_string())
        })
        .unwrap();
        assert_eq!(engine.network().chain_id, 84532);
        // Debug output never carries the key.
        assert!(!format!("{engine:?}").contains(&KEY[2..]));
        let err = from_settings(s.x402.as_ref().unwrap(), &s.chain, &|_| None).unwrap_err();
        assert!(err.to_string().contains("HOT"), "{err}");

        let s = settings("settlement = \"facilitator\"\nfacilitator_url = \"https://f.example\"\n");
        assert!(from_settings(s.x402.as_ref().unwrap(), &s.chain, &|_| None).is_ok());
    }
}
