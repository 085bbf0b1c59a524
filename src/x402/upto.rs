//! The x402 `upto` scheme on EVM (`specs/schemes/upto/scheme_upto_evm.md`): the client signs a Permit2
//! `PermitWitnessTransferFrom` for a *maximum*, the gateway serves the request and settles the *actual* cost
//! through the upto Permit2 proxy (zero: no transaction).
//!
//! This module owns the wire types of an upto payment, the offer ([`requirements`]), verification in the
//! specification's order ([`UptoVerifier::verify`]: signature → Permit2 allowance → balance → amount → time
//! window → token/network → spender, recipient, facilitator → nonce unused → a simulation of the settlement at the
//! full amount) and the settlement call ([`settle_call`]). Recording, retries and the refusal of payers with an
//! unsettled debt live in `billing::upto`; the HTTP flow in `api::upto`.

use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol_types::{SolCall, SolStruct, SolValue, eip712_domain};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::eip3009::Rsv;
use super::error::{PaymentError, Reason};
use super::header::HeaderError;
use super::permit2::{PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS};
use super::requirements::network_matches;
use super::types::{Extra, PaymentRequirements, ResourceInfo, checksummed, usdc_from_u256};
use crate::chain::{Rpc, RpcError};
use crate::config::Network;
use crate::usdc::Usdc;

/// The scheme's name on the wire.
pub const SCHEME_UPTO: &str = "upto";

/// `deadline` must leave at least this many seconds to settle after the answer (a slow stream included is the
/// caller's business: it checks the deadline against the request's own timeout too).
pub const DEADLINE_SLACK_SECS: u64 = 6;

alloy::sol! {
    /// Permit2's `TokenPermissions`.
    #[derive(Debug)]
    struct TokenPermissions { address token; uint256 amount; }
    /// The upto witness: `Witness(address to,address facilitator,uint256 validAfter)`.
    #[derive(Debug)]
    struct Witness { address to; address facilitator; uint256 validAfter; }
    /// What the payer signs (EIP-712, domain `Permit2` / chain id / Permit2's address).
    #[derive(Debug)]
    struct PermitWitnessTransferFrom {
        TokenPermissions permitted;
        address spender;
        uint256 nonce;
        uint256 deadline;
        Witness witness;
    }
    /// Permit2's `PermitTransferFrom` (the proxy's first argument).
    #[derive(Debug)]
    struct PermitTransferFrom { TokenPermissions permitted; uint256 nonce; uint256 deadline; }

    function settle(PermitTransferFrom permit, uint256 amount, address owner, Witness witness, bytes signature);
    function nonceBitmap(address owner, uint256 wordPos) returns (uint256);
    function allowance(address owner, address spender) returns (uint256);
    function balanceOf(address account) returns (uint256);
}

/// `U256` as a decimal string; read from a decimal string, a `0x` hex string or a JSON integer (clients differ:
/// the TypeScript SDK writes nonces in decimal, the specification's example in hex).
mod flexible_u256 {
    use alloy::primitives::U256;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Str(String),
            Num(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(U256::from(n)),
            Raw::Str(s) => {
                let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) if !hex.is_empty() && hex.len() <= 64 => {
                        U256::from_str_radix(hex, 16).ok()
                    }
                    Some(_) => None,
                    None => super::super::types::decimal_u256::parse(&s),
                };
                parsed.ok_or_else(|| D::Error::custom(format!("`{s}` is not an integer")))
            }
        }
    }
}

/// `permitted` of an authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permitted {
    #[serde(with = "checksummed")]
    pub token: Address,
    #[serde(with = "flexible_u256")]
    pub amount: U256,
}

/// `witness` of an upto authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoWitness {
    #[serde(with = "checksummed")]
    pub to: Address,
    #[serde(with = "checksummed")]
    pub facilitator: Address,
    #[serde(with = "flexible_u256")]
    pub valid_after: U256,
}

/// `payload.permit2Authorization`: what the signature signs, and its signer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permit2Authorization {
    #[serde(with = "checksummed")]
    pub from: Address,
    pub permitted: Permitted,
    #[serde(with = "checksummed")]
    pub spender: Address,
    #[serde(with = "flexible_u256")]
    pub nonce: U256,
    #[serde(with = "flexible_u256")]
    pub deadline: U256,
    pub witness: UptoWitness,
}

/// `payload` of an upto EVM payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoEvmPayload {
    pub signature: Bytes,
    pub permit2_authorization: Permit2Authorization,
}

/// A v2 `PAYMENT-SIGNATURE` whose `accepted.scheme` is `upto`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoPaymentPayload {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    pub accepted: PaymentRequirements,
    pub payload: UptoEvmPayload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

impl UptoPaymentPayload {
    pub fn payer(&self) -> Address {
        self.payload.permit2_authorization.from
    }

    pub fn nonce(&self) -> U256 {
        self.payload.permit2_authorization.nonce
    }

    /// The Permit2 nonce as the 32-byte key the in-flight guard and the database use.
    pub fn nonce_key(&self) -> B256 {
        B256::from(self.nonce())
    }
}

/// `Ok(Some)` when the header value is an upto payment, `Ok(None)` when it is a payment of another scheme (for
/// the exact path), `Err` when it claims `upto` but does not decode as one.
pub fn decode(value: &str) -> Result<Option<UptoPaymentPayload>, HeaderError> {
    let json = super::header::decode_json(value)?;
    let scheme = json
        .get("accepted")
        .and_then(|a| a.get("scheme"))
        .and_then(Value::as_str);
    if !scheme.is_some_and(|s| s.eq_ignore_ascii_case(SCHEME_UPTO)) {
        return Ok(None);
    }
    if json.get("x402Version").and_then(Value::as_u64) != Some(2) {
        return Err(HeaderError::Json(
            "the upto scheme exists only in x402 version 2".into(),
        ));
    }
    serde_json::from_value(json)
        .map(Some)
        .map_err(|e| HeaderError::Json(e.to_string()))
}

/// The upto offer of at most `max` to `pay_to`, settled by `facilitator` (whose address the client binds in the
/// witness).
pub fn requirements(
    network: &Network,
    pay_to: Address,
    max: Usdc,
    max_timeout_seconds: u64,
    facilitator: Address,
) -> Result<PaymentRequirements, super::types::AmountError> {
    let mut other = Map::new();
    other.insert(
        "facilitatorAddress".into(),
        Value::String(facilitator.to_checksum(None)),
    );
    Ok(PaymentRequirements {
        scheme: SCHEME_UPTO.to_string(),
        network: network.caip2(),
        amount: super::types::u256_from_usdc(max)?,
        asset: network.token,
        pay_to,
        max_timeout_seconds,
        extra: Some(Extra {
            name: Some(network.token_name.clone()),
            version: Some(network.token_version.clone()),
            other,
        }),
    })
}

fn refuse(code: &'static str, message: impl Into<String>) -> PaymentError {
    Reason::Upto {
        code,
        message: message.into(),
    }
    .into()
}

/// The EIP-712 digest the payer signed.
pub fn digest(auth: &Permit2Authorization, chain_id: u64) -> B256 {
    let domain = eip712_domain! {
        name: "Permit2",
        chain_id: chain_id,
        verifying_contract: PERMIT2_ADDRESS,
    };
    let message = PermitWitnessTransferFrom {
        permitted: TokenPermissions {
            token: auth.permitted.token,
            amount: auth.permitted.amount,
        },
        spender: auth.spender,
        nonce: auth.nonce,
        deadline: auth.deadline,
        witness: Witness {
            to: auth.witness.to,
            facilitator: auth.witness.facilitator,
            validAfter: auth.witness.valid_after,
        },
    };
    message.eip712_signing_hash(&domain)
}

/// The proxy's `settle(permit, amount, owner, witness, signature)` calldata for `amount`.
pub fn settle_call(payment: &UptoPaymentPayload, amount: U256) -> Bytes {
    let auth = &payment.payload.permit2_authorization;
    settleCall {
        permit: PermitTransferFrom {
            permitted: TokenPermissions {
                token: auth.permitted.token,
                amount: auth.permitted.amount,
            },
            nonce: auth.nonce,
            deadline: auth.deadline,
        },
        amount,
        owner: auth.from,
        witness: Witness {
            to: auth.witness.to,
            facilitator: auth.witness.facilitator,
            validAfter: auth.witness.valid_after,
        },
        signature: payment.payload.signature.clone(),
    }
    .abi_encode()
    .into()
}

/// An upto payment that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedUpto {
    pub payer: Address,
    /// The authorized maximum (= the offer's amount).
    pub max: Usdc,
    /// `deadline`, unix seconds (saturated).
    pub deadline: u64,
}

/// Verifies upto payments against the chain, for payments the `facilitator` address settles.
#[derive(Clone)]
pub struct UptoVerifier {
    rpc: Arc<Rpc>,
    network: Network,
    facilitator: Address,
}

impl std::fmt::Debug for UptoVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UptoVerifier")
            .field("network", &self.network)
            .field("facilitator", &self.facilitator)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &'static str) -> impl FnOnce(RpcError) -> PaymentError {
    move |e| PaymentError::Unavailable {
        what,
        message: e.to_string(),
    }
}

impl UptoVerifier {
    pub fn new(rpc: Arc<Rpc>, network: Network, facilitator: Address) -> UptoVerifier {
        UptoVerifier {
            rpc,
            network,
            facilitator,
        }
    }

    /// The address clients must name as `witness.facilitator` (the one that sends settlements).
    pub fn facilitator(&self) -> Address {
        self.facilitator
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Checks that need no chain, in the specification's order where it has one.
    pub fn check_offline(
        &self,
        payment: &UptoPaymentPayload,
        offer: &PaymentRequirements,
        now: u64,
    ) -> Result<Usdc, PaymentError> {
        let auth = &payment.payload.permit2_authorization;
        if offer.scheme != SCHEME_UPTO {
            return Err(refuse("invalid_upto_evm_scheme", "the offer is not upto"));
        }
        if !network_matches(&self.network, &payment.accepted.network)
            || !network_matches(&self.network, &offer.network)
        {
            return Err(refuse(
                "invalid_upto_evm_network_mismatch",
                format!(
                    "network `{}` is not the one offered ({})",
                    payment.accepted.network,
                    self.network.caip2()
                ),
            ));
        }
        if auth.permitted.amount != offer.amount {
            return Err(refuse(
                "permit2_amount_mismatch",
                format!(
                    "permitted.amount is {}; this request's maximum is exactly {} (the amount in the 402)",
                    auth.permitted.amount, offer.amount
                ),
            ));
        }
        if U256::from(now) + U256::from(DEADLINE_SLACK_SECS) > auth.deadline {
            return Err(refuse(
                "permit2_deadline_expired",
                format!(
                    "the authorization's deadline {} is past (or within {DEADLINE_SLACK_SECS} s of) now {now}",
                    auth.deadline
                ),
            ));
        }
        if auth.witness.valid_after > U256::from(now) {
            return Err(refuse(
                "permit2_not_yet_valid",
                format!(
                    "witness.validAfter {} is after now {now}",
                    auth.witness.valid_after
                ),
            ));
        }
        if auth.permitted.token != offer.asset {
            return Err(refuse(
                "permit2_token_mismatch",
                format!(
                    "permitted.token is {}, not the offered asset {}",
                    auth.permitted.token, offer.asset
                ),
            ));
        }
        if auth.spender != UPTO_PROXY_ADDRESS {
            return Err(refuse(
                "invalid_permit2_spender",
                format!(
                    "spender is {}, not the upto proxy {UPTO_PROXY_ADDRESS}",
                    auth.spender
                ),
            ));
        }
        if auth.witness.to != offer.pay_to {
            return Err(refuse(
                "invalid_permit2_recipient_mismatch",
                format!(
                    "witness.to is {}, not payTo {}",
                    auth.witness.to, offer.pay_to
                ),
            ));
        }
        if auth.witness.facilitator != self.facilitator {
            return Err(refuse(
                "upto_facilitator_mismatch",
                format!(
                    "witness.facilitator is {}; this gateway settles from {} (extra.facilitatorAddress)",
                    auth.witness.facilitator, self.facilitator
                ),
            ));
        }
        usdc_from_u256(auth.permitted.amount)
            .map_err(|e| refuse("permit2_invalid_amount", e.to_string()))
    }

    /// Full verification at `now` (unix seconds). A missing Permit2 allowance is `permit2_allowance_required`
    /// (answered 412 by the routes).
    pub async fn verify(
        &self,
        payment: &UptoPaymentPayload,
        offer: &PaymentRequirements,
        now: u64,
    ) -> Result<VerifiedUpto, PaymentError> {
        let auth = &payment.payload.permit2_authorization;
        // 1. The signature recovers to `from` (a contract wallet is checked by Permit2 itself: the simulation).
        let digest = digest(auth, self.network.chain_id);
        let recovered = Rsv::parse(&payment.payload.signature).and_then(|rsv| rsv.recover(&digest));
        if recovered != Some(auth.from) {
            let code = self
                .rpc
                .code(auth.from)
                .await
                .map_err(unavailable("eth_getCode"))?;
            if code.is_empty() {
                return Err(refuse(
                    "invalid_permit2_signature",
                    "the signature does not recover to permit2Authorization.from",
                ));
            }
        }
        let max = self.check_offline(payment, offer, now)?;
        // 2., 3. Permit2 allowance and balance; the nonce unused.
        let ((allowance, balance), bitmap) = futures::join!(
            self.allowance_and_balance(auth),
            self.read_u256(
                PERMIT2_ADDRESS,
                nonceBitmapCall {
                    owner: auth.from,
                    wordPos: auth.nonce >> 8,
                }
                .abi_encode(),
                "Permit2 nonceBitmap",
            ),
        );
        let bit = auth.nonce & U256::from(0xff);
        let allowance = allowance?;
        if allowance < auth.permitted.amount {
            return Err(refuse(
                "permit2_allowance_required",
                format!(
                    "the payer's allowance to Permit2 ({PERMIT2_ADDRESS}) is {allowance}, below the maximum {}; \
                     approve Permit2 once, then retry",
                    auth.permitted.amount
                ),
            ));
        }
        let balance = balance?;
        if balance < auth.permitted.amount {
            return Err(refuse(
                "permit2_insufficient_balance",
                format!(
                    "the payer's balance {balance} is below the maximum {}",
                    auth.permitted.amount
                ),
            ));
        }
        let bitmap = bitmap?;
        if (bitmap >> bit) & U256::from(1) == U256::from(1) {
            return Err(refuse(
                "permit2_invalid_nonce",
                "this Permit2 nonce has already been used",
            ));
        }
        // 7. Simulate the settlement at the full amount, as the facilitator.
        let call = settle_call(payment, auth.permitted.amount);
        match self
            .rpc
            .call_from(Some(self.facilitator), UPTO_PROXY_ADDRESS, call)
            .await
        {
            Ok(_) => {}
            Err(RpcError::Node { message, .. }) => {
                return Err(refuse("permit2_simulation_failed", message));
            }
            Err(e) => return Err(unavailable("simulating the upto settlement")(e)),
        }
        Ok(VerifiedUpto {
            payer: auth.from,
            max,
            deadline: u64::try_from(auth.deadline).unwrap_or(u64::MAX),
        })
    }

    /// A `uint256` view call of `to`.
    async fn read_u256(
        &self,
        to: Address,
        data: Vec<u8>,
        what: &'static str,
    ) -> Result<U256, PaymentError> {
        let bytes = self
            .rpc
            .call(to, data.into())
            .await
            .map_err(unavailable(what))?;
        U256::abi_decode(&bytes).map_err(|e| PaymentError::Unavailable {
            what,
            message: format!("undecodable answer: {e}"),
        })
    }

    /// The payer's ERC-20 allowance to Permit2 and its balance, asked at once.
    async fn allowance_and_balance(
        &self,
        auth: &Permit2Authorization,
    ) -> (Result<U256, PaymentError>, Result<U256, PaymentError>) {
        let token = auth.permitted.token;
        futures::join!(
            self.read_u256(
                token,
                allowanceCall {
                    owner: auth.from,
                    spender: PERMIT2_ADDRESS,
                }
                .abi_encode(),
                "ERC-20 allowance",
            ),
            self.read_u256(
                token,
                balanceOfCall { account: auth.from }.abi_encode(),
                "ERC-20 balanceOf",
            ),
        )
    }

    /// Why a settlement of `amount` would fail now (after serving): the allowance or the balance gone, the nonce
    /// used, or the node's revert message.
    pub async fn explain_failure(
        &self,
        payment: &UptoPaymentPayload,
        amount: U256,
        revert: String,
    ) -> PaymentError {
        let (allowance, balance) = self
            .allowance_and_balance(&payment.payload.permit2_authorization)
            .await;
        // Unknown (the node did not answer): not the reason; the revert message is.
        let value = |r: Result<U256, PaymentError>| r.unwrap_or(U256::MAX);
        let allowance = value(allowance);
        if allowance < amount {
            return refuse(
                "permit2_allowance_required",
                format!("the payer's allowance to Permit2 fell to {allowance}, below {amount}"),
            );
        }
        let balance = value(balance);
        if balance < amount {
            return refuse(
                "permit2_insufficient_balance",
                format!("the payer's balance fell to {balance}, below {amount}"),
            );
        }
        refuse("permit2_simulation_failed", revert)
    }
}

/// Who sends upto settlements.
enum Sender {
    /// The gateway's hot wallet, through the upto proxy.
    Wallet(Arc<super::settle::SelfSettler>),
    /// A facilitator: `POST {url}/verify` with the maximum, `POST {url}/settle` with the metered amount.
    Facilitator(FacilitatorClient),
}

/// Verifies upto payments and settles them: from the gateway's hot wallet (its address is the
/// `witness.facilitator` clients bind), or through a facilitator whose settling address clients bind.
pub struct UptoSettler {
    verifier: UptoVerifier,
    sender: Sender,
}

impl std::fmt::Debug for UptoSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UptoSettler")
            .field("verifier", &self.verifier)
            .field(
                "sender",
                &match &self.sender {
                    Sender::Wallet(_) => "hot wallet",
                    Sender::Facilitator(_) => "facilitator",
                },
            )
            .finish()
    }
}

impl UptoSettler {
    /// The hot wallet settles; its address is the facilitator clients bind.
    pub fn new(
        rpc: Arc<Rpc>,
        network: Network,
        wallet: Arc<super::settle::SelfSettler>,
    ) -> UptoSettler {
        UptoSettler {
            verifier: UptoVerifier::new(rpc, network, wallet.address()),
            sender: Sender::Wallet(wallet),
        }
    }

    /// A facilitator at `url` settles from `address` (its `/supported` upto kind's `extra.facilitatorAddress`).
    pub fn through_facilitator(
        rpc: Arc<Rpc>,
        network: Network,
        url: &str,
        address: Address,
        timeout: std::time::Duration,
    ) -> Result<UptoSettler, PaymentError> {
        Ok(UptoSettler {
            verifier: UptoVerifier::new(rpc, network, address),
            sender: Sender::Facilitator(FacilitatorClient::new(url, timeout)?),
        })
    }

    pub fn verifier(&self) -> &UptoVerifier {
        &self.verifier
    }

    /// Whether a settlement transaction sent earlier landed: `Some(succeeded)` once mined, `None` while it is not.
    pub async fn transaction_landed(&self, tx: B256) -> Result<Option<bool>, PaymentError> {
        match self.verifier.rpc.receipt(tx).await {
            Ok(Some(receipt)) if receipt.block_number.is_some() => Ok(Some(receipt.succeeded())),
            Ok(_) => Ok(None),
            Err(e) => Err(unavailable("settlement receipt")(e)),
        }
    }

    /// Verifies `payment` against `offer` at `now`: every check on the chain here, then (through a facilitator)
    /// the facilitator's own `/verify` of the maximum.
    pub async fn verify(
        &self,
        payment: &UptoPaymentPayload,
        offer: &PaymentRequirements,
        now: u64,
    ) -> Result<VerifiedUpto, PaymentError> {
        let verified = self.verifier.verify(payment, offer, now).await?;
        if let Sender::Facilitator(f) = &self.sender {
            f.verify(payment, offer).await?;
        }
        Ok(verified)
    }

    /// Settles `amount` (≤ the authorized maximum) of a verified payment against `offer`: `Ok(None)` for zero (no
    /// transaction), `Ok(Some(tx))` once the transaction succeeded. Refusals are definite (nothing moved);
    /// `OutcomeUnknown` means a transaction was sent without a receipt.
    pub async fn settle(
        &self,
        payment: &UptoPaymentPayload,
        offer: &PaymentRequirements,
        amount: Usdc,
    ) -> Result<Option<B256>, PaymentError> {
        if amount <= Usdc::ZERO {
            return Ok(None);
        }
        let amount = super::types::u256_from_usdc(amount)
            .map_err(|e| refuse("permit2_invalid_amount", e.to_string()))?;
        if amount > payment.payload.permit2_authorization.permitted.amount {
            return Err(refuse(
                "invalid_upto_evm_payload_settlement_exceeds_amount",
                format!(
                    "settling {amount} exceeds the authorized {}",
                    payment.payload.permit2_authorization.permitted.amount
                ),
            ));
        }
        match &self.sender {
            Sender::Wallet(wallet) => {
                let data = settle_call(payment, amount);
                let tx = match wallet.send_call(UPTO_PROXY_ADDRESS, data).await {
                    Ok(tx) => tx,
                    Err(super::settle::SendError::WouldRevert(message)) => {
                        return Err(self
                            .verifier
                            .explain_failure(payment, amount, message)
                            .await);
                    }
                    Err(super::settle::SendError::Failed(e)) => return Err(e),
                };
                wallet.await_receipt(tx).await?;
                Ok(Some(tx))
            }
            // The settle-time requirements carry the amount to settle (the scheme's phase-dependent `amount`).
            Sender::Facilitator(f) => {
                let mut at = offer.clone();
                at.amount = amount;
                f.settle(payment, &at).await.map(Some)
            }
        }
    }
}

/// The HTTP half of a facilitator, for upto payments.
struct FacilitatorClient {
    client: alloy::transports::http::reqwest::Client,
    /// Without a trailing slash; may embed an API key, so it is never logged.
    url: String,
}

impl FacilitatorClient {
    fn new(url: &str, timeout: std::time::Duration) -> Result<FacilitatorClient, PaymentError> {
        let client = alloy::transports::http::reqwest::Client::builder()
            .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| PaymentError::Unavailable {
                what: "facilitator client",
                message: e.to_string(),
            })?;
        Ok(FacilitatorClient {
            client,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    async fn post(
        &self,
        what: &'static str,
        path: &str,
        payment: &UptoPaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<(u16, Value), PaymentError> {
        let body = serde_json::json!({
            "x402Version": 2,
            "paymentPayload": payment,
            "paymentRequirements": requirements,
        });
        let unavailable = |e: alloy::transports::http::reqwest::Error| PaymentError::Unavailable {
            what,
            message: e.without_url().to_string(),
        };
        let response = self
            .client
            .post(format!("{}/{path}", self.url))
            .json(&body)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unavailable)?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    async fn verify(
        &self,
        payment: &UptoPaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<(), PaymentError> {
        let (status, body) = self
            .post("facilitator verify", "verify", payment, requirements)
            .await?;
        match body.get("isValid").and_then(Value::as_bool) {
            Some(true) if (200..300).contains(&status) => Ok(()),
            Some(false) => Err(facilitator_refusal(&body, "invalidReason")),
            _ => Err(PaymentError::Unavailable {
                what: "facilitator verify",
                message: format!("HTTP {status} without a verdict"),
            }),
        }
    }

    async fn settle(
        &self,
        payment: &UptoPaymentPayload,
        requirements: &PaymentRequirements,
    ) -> Result<B256, PaymentError> {
        let (status, body) = self
            .post("facilitator settle", "settle", payment, requirements)
            .await?;
        match body.get("success").and_then(Value::as_bool) {
            Some(true) if (200..300).contains(&status) => body
                .get("transaction")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<B256>().ok())
                .ok_or_else(|| PaymentError::OutcomeUnknown {
                    what: "facilitator settle",
                    message: "success without a transaction hash".into(),
                    tx: None,
                }),
            Some(false) => Err(facilitator_refusal(&body, "errorReason")),
            _ => Err(PaymentError::Unavailable {
                what: "facilitator settle",
                message: format!("HTTP {status} without a result"),
            }),
        }
    }
}

/// A facilitator's refusal, its reason code passed through (`permit2_allowance_required` included, so the routes
/// answer it as they answer ours).
fn facilitator_refusal(body: &Value, field: &str) -> PaymentError {
    let code = body
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or("facilitator_refused")
        .to_string();
    let message = body
        .get("invalidMessage")
        .or_else(|| body.get("errorMessage"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Reason::Facilitator { code, message }.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{address, keccak256};
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    #[test]
    fn type_hash_is_permit2s_witness_type() {
        let expected = keccak256(
            "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,\
             Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,\
             uint256 validAfter)",
        );
        let message = PermitWitnessTransferFrom {
            permitted: TokenPermissions {
                token: Address::ZERO,
                amount: U256::ZERO,
            },
            spender: Address::ZERO,
            nonce: U256::ZERO,
            deadline: U256::ZERO,
            witness: Witness {
                to: Address::ZERO,
                facilitator: Address::ZERO,
                validAfter: U256::ZERO,
            },
        };
        assert_eq!(message.eip712_type_hash(), expected);
    }

    #[test]
    fn decodes_the_specification_example_and_signs_round_trip() {
        let json = serde_json::json!({
            "x402Version": 2,
            "accepted": {"scheme": "upto", "network": "eip155:84532", "amount": "5000000",
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C", "maxTimeoutSeconds": 300,
                "extra": {"name": "USDC", "version": "2"}},
            "payload": {"signature": "0x00", "permit2Authorization": {
                "permitted": {"token": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "amount": "5000000"},
                "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
                "spender": "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002",
                "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
                "deadline": "1740672154",
                "witness": {"to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
                    "facilitator": "0x1111111111111111111111111111111111111111", "validAfter": "1740672089"}}}
        });
        let encoded = super::super::header::encode(&json);
        let payment = decode(&encoded).unwrap().unwrap();
        assert_eq!(
            payment.payer(),
            address!("857b06519E91e3A54538791bDbb0E22373e36b66")
        );
        assert_eq!(
            payment.nonce_key(),
            "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"
                .parse::<B256>()
                .unwrap()
        );
        // An exact payment is not ours.
        let exact = serde_json::json!({"x402Version": 2, "accepted": {"scheme": "exact"}});
        assert!(
            decode(&super::super::header::encode(&exact))
                .unwrap()
                .is_none()
        );
        // A signature by `from` recovers.
        let signer = PrivateKeySigner::random();
        let mut auth = payment.payload.permit2_authorization.clone();
        auth.from = signer.address();
        let d = digest(&auth, 84532);
        let sig = signer.sign_hash_sync(&d).unwrap();
        let rsv = Rsv::parse(&sig.as_bytes()).unwrap();
        assert_eq!(rsv.recover(&d), Some(signer.address()));
        // The digest depends on the chain (a signature for one chain is useless on another).
        assert_ne!(digest(&auth, 8453), d);
    }
}
