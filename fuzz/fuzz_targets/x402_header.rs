//! Fuzzes the x402 payment header decoder (`x402_gateway::x402::header`) with arbitrary header values.
//! Input: the header value as bytes (HTTP header values are bytes; the gateway decodes only ASCII ones).
//!
//! Properties, beyond "never panics":
//! - a decoded payment round-trips: encoding it and decoding that gives the same payment;
//! - any JSON it reads round-trips through `encode` (standard, padded base64) and through the lenient forms it
//!   accepts (unpadded, URL-safe alphabet), and `encode` writes only the standard padded alphabet;
//! - over-long values are refused as `TooLarge`, whatever they hold.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use x402_gateway::x402::header::{self, HeaderError, MAX_HEADER_LEN};

/// Floats may not survive a text round trip bit for bit; the payment types hold none.
fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn check_encoding(json: &Value) {
    let encoded = header::encode(json);
    assert!(
        encoded.len() % 4 == 0
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='),
        "encode wrote non-standard base64: {encoded}"
    );
    if encoded.len() > MAX_HEADER_LEN {
        return;
    }
    let bytes = STANDARD.decode(&encoded).expect("our own encoding decodes");
    for form in [encoded.clone(), URL_SAFE_NO_PAD.encode(&bytes)] {
        let back = header::decode_json(&form).expect("our own encoding decodes");
        if !has_float(json) {
            assert_eq!(&back, json, "JSON did not round-trip through {form}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let payment = header::decode_payment(value);
    let json = header::decode_json(value);
    if value.trim().len() > MAX_HEADER_LEN {
        assert!(matches!(payment, Err(HeaderError::TooLarge(_))));
        assert!(matches!(json, Err(HeaderError::TooLarge(_))));
        return;
    }
    if let Ok(json) = &json {
        check_encoding(json);
    }
    if let Ok(payment) = payment {
        let json = payment.to_json();
        if !has_float(&json) {
            let again = header::decode_payment(&header::encode(&json))
                .expect("a decoded payment re-decodes");
            assert_eq!(again, payment, "the payment did not round-trip");
        }
    }
});
