//! HTTP header codecs: base64 (standard alphabet, with padding) of compact JSON.
//!
//! v2 uses `PAYMENT-REQUIRED` (server → client), `PAYMENT-SIGNATURE` (client → server) and `PAYMENT-RESPONSE`
//! (server → client); v1 uses `X-PAYMENT` and `X-PAYMENT-RESPONSE`. Output is always standard base64 with padding
//! (the reference TypeScript decoder rejects anything else). Input is read leniently (padding optional, URL-safe
//! alphabet accepted), and anything that does not decode is a typed [`HeaderError`]: callers answer a fresh 402,
//! never a 500.

use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::types::{AnyPaymentPayload, PaymentPayload, PaymentPayloadV1};

/// v2: the 402's requirements.
pub const PAYMENT_REQUIRED: &str = "PAYMENT-REQUIRED";
/// v2: the client's payment.
pub const PAYMENT_SIGNATURE: &str = "PAYMENT-SIGNATURE";
/// v2: the settlement result.
pub const PAYMENT_RESPONSE: &str = "PAYMENT-RESPONSE";
/// v1: the client's payment.
pub const X_PAYMENT: &str = "X-PAYMENT";
/// v1: the settlement result.
pub const X_PAYMENT_RESPONSE: &str = "X-PAYMENT-RESPONSE";

/// Largest header value decoded (a real payment is well under 2 KiB).
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// Why a header value is not a payment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header is empty")]
    Empty,
    #[error("header is {0} bytes; at most {MAX_HEADER_LEN} are accepted")]
    TooLarge(usize),
    #[error("header is not base64: {0}")]
    Base64(String),
    #[error("header is not the expected JSON: {0}")]
    Json(String),
    #[error("x402Version {0} is not supported (1 and 2 are)")]
    UnsupportedVersion(String),
}

impl HeaderError {
    /// Stable reason code for a 402 answer.
    pub fn code(&self) -> &'static str {
        match self {
            HeaderError::UnsupportedVersion(_) => "invalid_x402_version",
            _ => "invalid_payload",
        }
    }
}

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const LENIENT_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Compact JSON of `value`, base64 (standard, padded).
pub fn encode<T: Serialize>(value: &T) -> String {
    // Serializing our own wire types cannot fail (string keys, no non-finite floats).
    let json = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    STANDARD.encode(json)
}

/// The JSON inside a header value.
pub fn decode_json(value: &str) -> Result<Value, HeaderError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(HeaderError::Empty);
    }
    if value.len() > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge(value.len()));
    }
    let bytes = LENIENT_STANDARD
        .decode(value)
        .or_else(|_| LENIENT_URL_SAFE.decode(value))
        .map_err(|e| HeaderError::Base64(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| HeaderError::Json(e.to_string()))
}

/// A header value as `T`.
pub fn decode<T: DeserializeOwned>(value: &str) -> Result<T, HeaderError> {
    serde_json::from_value(decode_json(value)?).map_err(|e| HeaderError::Json(e.to_string()))
}

/// A `PAYMENT-SIGNATURE` or `X-PAYMENT` value, in whichever protocol version it declares.
pub fn decode_payment(value: &str) -> Result<AnyPaymentPayload, HeaderError> {
    let json = decode_json(value)?;
    let version = json.get("x402Version").cloned().unwrap_or(Value::Null);
    let typed = |e: serde_json::Error| HeaderError::Json(e.to_string());
    match version.as_u64() {
        Some(2) => serde_json::from_value::<PaymentPayload>(json)
            .map(AnyPaymentPayload::V2)
            .map_err(typed),
        Some(1) => serde_json::from_value::<PaymentPayloadV1>(json)
            .map(AnyPaymentPayload::V1)
            .map_err(typed),
        _ if version.is_null() => Err(HeaderError::Json("missing x402Version".into())),
        _ => Err(HeaderError::UnsupportedVersion(version.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::types::SettleResponse;

    #[test]
    fn output_is_standard_padded_base64() {
        let r = SettleResponse {
            success: true,
            error_reason: None,
            transaction: "0xab".into(),
            network: "eip155:8453".into(),
            payer: None,
            amount: None,
        };
        let h = encode(&r);
        assert!(!h.contains('-') && !h.contains('_'));
        assert_eq!(h.len() % 4, 0);
        assert_eq!(decode::<SettleResponse>(&h).unwrap(), r);
    }

    #[test]
    fn malformed_values_are_typed_errors() {
        assert_eq!(decode_payment(""), Err(HeaderError::Empty));
        assert!(matches!(decode_payment("%%%"), Err(HeaderError::Base64(_))));
        assert!(matches!(
            decode_payment(&STANDARD.encode("not json")),
            Err(HeaderError::Json(_))
        ));
        assert!(matches!(
            decode_payment(&STANDARD.encode(r#"{"x402Version": 3}"#)),
            Err(HeaderError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            decode_payment(&STANDARD.encode(r#"{"x402Version": 2, "payload": {}}"#)),
            Err(HeaderError::Json(_))
        ));
        assert!(matches!(
            decode_payment(&"A".repeat(MAX_HEADER_LEN + 4)),
            Err(HeaderError::TooLarge(_))
        ));
    }
}
