//! Exact decimal numbers in JSON answers: seed 000 answers a top-up with `"newBalance": 50`, a JSON number, and a
//! balance is money, so that number must be the exact decimal.
//!
//! serde_json (built without `arbitrary_precision`, which would change how every crate in the build buffers
//! numbers, and breaks untagged enums) keeps a non-integer number as an `f64`: 0.1 is no `f64`, at
//! 9,007,199,254.740991 USDC neighbouring amounts share one `f64`, and 0.000001 prints as `1e-6`. So an exact number
//! goes into a body as a marker object ([`usdc_number`], the trick serde_json itself uses for
//! `arbitrary_precision`), and [`ExactJson`], the response type of every answer that may carry one, writes it as a
//! raw JSON number. A marker whose text is not a plain decimal (one forged in echoed input) is written as the object
//! it is, so nothing but a number is ever written raw.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::usdc::Usdc;

/// The key of a marker object: `{MARKER: "12.345678"}` is written as `12.345678`.
const MARKER: &str = "$x402-gateway::exact-number";

/// `amount` as an exact JSON number in a body written by [`ExactJson`] (see the module doc).
pub fn usdc_number(amount: Usdc) -> Value {
    let mut marker = serde_json::Map::new();
    marker.insert(MARKER.into(), Value::String(json_decimal(amount)));
    Value::Object(marker)
}

/// The shortest decimal of `amount` in USDC: `50`, `70.5`, `0.000001`, `-1.25`.
pub fn json_decimal(amount: Usdc) -> String {
    let text = amount.to_string();
    match text.split_once('.') {
        Some((whole, frac)) => {
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() {
                whole.to_string()
            } else {
                format!("{whole}.{frac}")
            }
        }
        None => text,
    }
}

/// `-?digits(.digits)?`: a JSON number that needs no checking beyond this.
fn is_plain_decimal(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && (whole == "0" || !whole.starts_with('0')) && frac.is_none_or(digits)
}

/// The raw number a marker object stands for, if `v` is one.
fn marked_number(v: &Value) -> Option<&str> {
    let Value::Object(map) = v else { return None };
    if map.len() != 1 {
        return None;
    }
    map.get(MARKER)
        .and_then(Value::as_str)
        .filter(|s| is_plain_decimal(s))
}

/// Serializes a [`Value`] with its marker objects written as raw numbers (through a streaming serializer such as
/// `serde_json::to_vec`; `serde_json::to_value` would turn them back into `f64`s).
pub struct ExactJson<'a>(pub &'a Value);

impl Serialize for ExactJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(number) = marked_number(self.0) {
            let raw = RawValue::from_string(number.to_string())
                .map_err(<S::Error as serde::ser::Error>::custom)?;
            return raw.serialize(serializer);
        }
        match self.0 {
            Value::Object(map) => {
                let mut m = serializer.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    m.serialize_entry(k, &ExactJson(v))?;
                }
                m.end()
            }
            Value::Array(items) => {
                let mut s = serializer.serialize_seq(Some(items.len()))?;
                for v in items {
                    s.serialize_element(&ExactJson(v))?;
                }
                s.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// The bytes of `v` as JSON, marker objects written as raw numbers.
pub fn to_vec(v: &Value) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&ExactJson(v))
}

/// A JSON answer (like `axum::Json`) whose marker objects are written as raw numbers.
pub struct ExactJsonBody(pub Value);

impl IntoResponse for ExactJsonBody {
    fn into_response(self) -> Response {
        match to_vec(&self.0) {
            Ok(bytes) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response(),
            Err(e) => {
                tracing::error!(error = %e, "answer not serializable");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
                    "internal error",
                )
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn written(amount: &str) -> String {
        let body = json!({"newBalance": usdc_number(amount.parse().unwrap()), "list": [usdc_number(Usdc(1))]});
        String::from_utf8(to_vec(&body).unwrap()).unwrap()
    }

    #[test]
    fn every_six_decimal_amount_is_written_exactly() {
        for (amount, number) in [
            ("50.00", "50"),
            ("70.50", "70.5"),
            ("0.000001", "0.000001"),
            ("12.345678", "12.345678"),
            ("0.1", "0.1"),
            ("0", "0"),
            // 2^53 - 1 atomic units: beyond f64's reach at 6 decimals.
            ("9007199254.740991", "9007199254.740991"),
            ("9007199254.740992", "9007199254.740992"),
            ("9223372036854.775807", "9223372036854.775807"),
        ] {
            let text = written(amount);
            assert_eq!(
                text,
                format!(r#"{{"list":[0.000001],"newBalance":{number}}}"#),
                "{amount}"
            );
            // Valid JSON, and a number.
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["newBalance"].is_number(), "{text}");
        }
        assert_eq!(json_decimal(Usdc(-1_250_000)), "-1.25");
    }

    #[test]
    fn a_forged_marker_is_never_written_raw() {
        for forged in [
            json!({MARKER: "1}, \"x\": {"}),
            json!({MARKER: "1e5"}),
            json!({MARKER: "01"}),
            json!({MARKER: 5}),
            json!({MARKER: "1", "other": 2}),
        ] {
            let text = String::from_utf8(to_vec(&forged).unwrap()).unwrap();
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), forged);
        }
    }
}
