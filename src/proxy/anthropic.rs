//! Placeholder while the translation module is written on its own branch (replaced at merge).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::BadParam;

pub fn request_to_chat(_body: &Map<String, Value>) -> Result<Map<String, Value>, BadParam> {
    Err(BadParam {
        param: "messages",
        message: "translation is not available".into(),
    })
}

pub fn response_from_chat(chat: &Value, _model: &str) -> Value {
    chat.clone()
}

pub struct StreamTranslator;

impl StreamTranslator {
    pub fn new(_model: &str) -> Self {
        StreamTranslator
    }
    pub fn translate(&mut self, events: &[u8]) -> Bytes {
        Bytes::copy_from_slice(events)
    }
    pub fn finish(&mut self) -> Bytes {
        Bytes::new()
    }
}

pub fn error_body(kind: &str, message: &str) -> Value {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        s if (400..500).contains(&s) => "invalid_request_error",
        _ => "api_error",
    }
}
