//! x402 wire types (v2 and legacy v1, EVM `exact` scheme) exactly as they travel in headers and facilitator bodies.
//!
//! Field names are camelCase as in the reference specification. Unknown keys are tolerated on input (serde's
//! default), so newer clients that add fields still decode. Amounts and EIP-3009 numbers are decimal strings on
//! the wire and [`U256`] here; addresses are parsed case-insensitively and written checksummed.

use alloy::primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::usdc::Usdc;

/// The only scheme this gateway speaks.
pub const SCHEME_EXACT: &str = "exact";

/// Why a wire amount does not fit the gateway's money type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount {0} is larger than any USDC amount this gateway handles")]
    Overflow(U256),
    #[error("amount {0} is negative")]
    Negative(Usdc),
}

/// A wire amount (atomic units) as [`Usdc`]; errors instead of wrapping.
pub fn usdc_from_u256(value: U256) -> Result<Usdc, AmountError> {
    i64::try_from(value)
        .map(Usdc)
        .map_err(|_| AmountError::Overflow(value))
}

/// A [`Usdc`] amount as a wire amount; negative amounts are not payments.
pub fn u256_from_usdc(value: Usdc) -> Result<U256, AmountError> {
    u64::try_from(value.atomic())
        .map(U256::from)
        .map_err(|_| AmountError::Negative(value))
}

/// `U256` as a decimal string (`"10000"`); accepts a decimal string or a non-negative JSON integer on input.
pub mod decimal_u256 {
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
            Raw::Str(s) => parse(&s)
                .ok_or_else(|| D::Error::custom(format!("`{s}` is not a decimal integer amount"))),
        }
    }

    /// Digits only (no sign, no `0x`, no spaces), at most 78 of them.
    pub fn parse(s: &str) -> Option<U256> {
        if s.is_empty() || s.len() > 78 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        U256::from_str_radix(s, 10).ok()
    }
}

/// Addresses written EIP-55 checksummed (as official clients write them); read in any case.
pub mod checksummed {
    use alloy::primitives::Address;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Address, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_checksum(None))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
        Address::deserialize(d)
    }
}

/// `extra` of the exact EVM scheme: the token's EIP-712 domain (clients throw without it). Other keys are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extra {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// What is being paid for (v2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// One way to pay (v2): what the server offers in `accepts` and the client echoes as `accepted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    pub scheme: String,
    /// CAIP-2, e.g. `eip155:8453`.
    pub network: String,
    /// Atomic units.
    #[serde(with = "decimal_u256")]
    pub amount: U256,
    #[serde(with = "checksummed")]
    pub asset: Address,
    #[serde(with = "checksummed")]
    pub pay_to: Address,
    pub max_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Extra>,
}

/// The body of a v2 402 (`PAYMENT-REQUIRED` header, base64).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    pub x402_version: u32,
    #[serde(default)]
    pub error: Option<String>,
    pub resource: ResourceInfo,
    pub accepts: Vec<PaymentRequirements>,
    #[serde(default)]
    pub extensions: Option<Map<String, Value>>,
    /// Offers on Solana networks (the `exact` scheme on SVM, see `x402::svm`), written after the EVM ones in
    /// `accepts`. Not read back: a decoded challenge keeps only its EVM offers here.
    #[serde(skip)]
    pub svm_accepts: Vec<Value>,
}

impl Serialize for PaymentRequired {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            x402_version: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: &'a Option<String>,
            resource: &'a ResourceInfo,
            accepts: Vec<Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            extensions: &'a Option<Map<String, Value>>,
        }
        let mut accepts = Vec::with_capacity(self.accepts.len() + self.svm_accepts.len());
        for a in &self.accepts {
            accepts.push(serde_json::to_value(a).map_err(serde::ser::Error::custom)?);
        }
        accepts.extend(self.svm_accepts.iter().cloned());
        Wire {
            x402_version: self.x402_version,
            error: &self.error,
            resource: &self.resource,
            accepts,
            extensions: &self.extensions,
        }
        .serialize(serializer)
    }
}

/// The EIP-3009 authorization a client signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    #[serde(with = "checksummed")]
    pub from: Address,
    #[serde(with = "checksummed")]
    pub to: Address,
    #[serde(with = "decimal_u256")]
    pub value: U256,
    #[serde(with = "decimal_u256")]
    pub valid_after: U256,
    #[serde(with = "decimal_u256")]
    pub valid_before: U256,
    pub nonce: B256,
}

/// `payload` of the exact EVM scheme: the signature and what it signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactEvmPayload {
    pub signature: Bytes,
    pub authorization: Authorization,
}

/// A v2 payment (`PAYMENT-SIGNATURE` header, base64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    pub accepted: PaymentRequirements,
    pub payload: ExactEvmPayload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// Legacy v1 payment requirements (in the 402 body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirementsV1 {
    pub scheme: String,
    /// `base`, `base-sepolia` (or CAIP-2 for chains without a v1 name).
    pub network: String,
    #[serde(with = "decimal_u256")]
    pub max_amount_required: U256,
    /// The resource URL.
    pub resource: String,
    pub description: String,
    pub mime_type: String,
    #[serde(with = "checksummed")]
    pub pay_to: Address,
    pub max_timeout_seconds: u64,
    #[serde(with = "checksummed")]
    pub asset: Address,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Extra>,
}

/// Legacy v1 402 body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV1 {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub accepts: Vec<PaymentRequirementsV1>,
}

/// A v1 payment (`X-PAYMENT` header, base64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    pub x402_version: u32,
    pub scheme: String,
    pub network: String,
    pub payload: ExactEvmPayload,
}

/// A payment in either protocol version.
// One per request, moved a handful of times: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AnyPaymentPayload {
    V1(PaymentPayloadV1),
    V2(PaymentPayload),
}

impl AnyPaymentPayload {
    pub fn x402_version(&self) -> u32 {
        match self {
            AnyPaymentPayload::V1(_) => 1,
            AnyPaymentPayload::V2(_) => 2,
        }
    }

    pub fn scheme(&self) -> &str {
        match self {
            AnyPaymentPayload::V1(p) => &p.scheme,
            AnyPaymentPayload::V2(p) => &p.accepted.scheme,
        }
    }

    /// The network as the client wrote it (a v1 name or CAIP-2).
    pub fn network(&self) -> &str {
        match self {
            AnyPaymentPayload::V1(p) => &p.network,
            AnyPaymentPayload::V2(p) => &p.accepted.network,
        }
    }

    pub fn exact(&self) -> &ExactEvmPayload {
        match self {
            AnyPaymentPayload::V1(p) => &p.payload,
            AnyPaymentPayload::V2(p) => &p.payload,
        }
    }

    /// The requirements the client says it accepted (v2 only).
    pub fn accepted(&self) -> Option<&PaymentRequirements> {
        match self {
            AnyPaymentPayload::V1(_) => None,
            AnyPaymentPayload::V2(p) => Some(&p.accepted),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            AnyPaymentPayload::V1(p) => serde_json::to_value(p),
            AnyPaymentPayload::V2(p) => serde_json::to_value(p),
        }
        .unwrap_or(Value::Null)
    }
}

/// The outcome of a settlement (`PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE` header, and a facilitator's `/settle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    /// Transaction hash; `""` on failure. Missing in a 2xx facilitator body is an error (checked by the caller).
    #[serde(default)]
    pub transaction: String,
    #[serde(default)]
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The `upto` scheme's settled amount, atomic units (`"0"` for nothing settled); absent for `exact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
}

/// A facilitator's `/verify` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    pub is_valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
}

/// The body of `POST {facilitator}/verify` and `/settle`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FacilitatorRequest {
    pub x402_version: u32,
    pub payment_payload: Value,
    pub payment_requirements: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requirements_round_trip_in_reference_shape() {
        let text = json!({
            "scheme": "exact",
            "network": "eip155:8453",
            "amount": "10000",
            "asset": "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
            "payTo": "0x1111111111111111111111111111111111111111",
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USD Coin", "version": "2", "future": 1},
            "unknownKey": true
        });
        let r: PaymentRequirements = serde_json::from_value(text).unwrap();
        assert_eq!(r.amount, U256::from(10_000));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["amount"], "10000");
        assert_eq!(back["payTo"], "0x1111111111111111111111111111111111111111");
        assert_eq!(back["asset"], "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913");
        assert_eq!(back["maxTimeoutSeconds"], 300);
        assert_eq!(back["extra"]["future"], 1);
        assert!(back.get("unknownKey").is_none());
    }

    #[test]
    fn amounts_are_decimal_strings_only() {
        for bad in ["0x10", "-1", " 1", "1.5", "", "1e3"] {
            assert!(decimal_u256::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(decimal_u256::parse("0010"), Some(U256::from(10)));
        let auth: Result<Authorization, _> = serde_json::from_value(json!({
            "from": "0x1111111111111111111111111111111111111111",
            "to": "0x2222222222222222222222222222222222222222",
            "value": 10000,
            "validAfter": "0",
            "validBefore": "99999999999",
            "nonce": format!("0x{}", "ab".repeat(32)),
        }));
        assert_eq!(auth.unwrap().value, U256::from(10_000));
    }

    #[test]
    fn usdc_conversions_check_bounds() {
        assert_eq!(usdc_from_u256(U256::from(10_000)), Ok(Usdc(10_000)));
        assert!(matches!(
            usdc_from_u256(U256::from(u64::MAX)),
            Err(AmountError::Overflow(_))
        ));
        assert!(matches!(
            usdc_from_u256(U256::MAX),
            Err(AmountError::Overflow(_))
        ));
        assert_eq!(u256_from_usdc(Usdc(5)), Ok(U256::from(5)));
        assert!(u256_from_usdc(Usdc(-5)).is_err());
    }
}
