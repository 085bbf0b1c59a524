//! The x402 `bazaar` discovery extension (x402 specs/extensions/bazaar.md): each paid resource's 402 describes how to
//! call it, in `extensions.bazaar` of the v2 `PaymentRequired`, so facilitators that catalogue resources can list it.
//!
//! Shape (the spec's "POST Endpoint" example): `info.input` = `{type: "http", method: "POST", bodyType: "json",
//! body: <example>}` (plus `queryParams` where the route takes some), `info.output` = `{type: "json", example}`, and
//! `schema` = a JSON Schema (draft 2020-12) that validates `info`: `input` with `additionalProperties: false` and the
//! request body's schema summary under `properties.input.properties.body`, `output` with `type` required.

use serde_json::{Value, json};

use crate::proxy::Api;

/// The extension's key in `extensions`.
pub const KEY: &str = "bazaar";

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// The extension for a body (POST) endpoint: `body` is an example request body, `body_schema` its JSON Schema,
/// `query` example query parameters (with their schema), `output` an example response.
pub fn body_endpoint(
    body: Value,
    body_schema: Value,
    query: Option<(Value, Value)>,
    output: Value,
) -> Value {
    let mut input = json!({"type": "http", "method": "POST", "bodyType": "json", "body": body});
    let mut input_schema = json!({
        "type": "object",
        "properties": {
            "type": {"type": "string", "const": "http"},
            "method": {"type": "string", "enum": ["POST", "PUT", "PATCH"]},
            "bodyType": {"type": "string", "enum": ["json", "form-data", "text"]},
            "body": body_schema,
            "queryParams": {"type": "object", "additionalProperties": {"type": "string"}},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["type", "method", "bodyType", "body"],
        "additionalProperties": false,
    });
    if let Some((params, schema)) = query {
        input["queryParams"] = params;
        input_schema["properties"]["queryParams"] = schema;
    }
    json!({
        "info": {
            "input": input,
            "output": {"type": "json", "example": output},
        },
        "schema": {
            "$schema": DRAFT_2020_12,
            "type": "object",
            "properties": {
                "input": input_schema,
                "output": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "example": {"type": "object"},
                    },
                    "required": ["type"],
                },
            },
            "required": ["input"],
        },
    })
}

fn string() -> Value {
    json!({"type": "string"})
}

fn integer() -> Value {
    json!({"type": "integer", "minimum": 1})
}

fn messages_schema() -> Value {
    json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"role": string(), "content": {"type": ["string", "array"]}},
            "required": ["role", "content"],
        },
    })
}

/// One request to `model` on an inference route: its request body (example and schema summary) and response.
pub fn inference(api: Api, model: &str) -> Value {
    let hello = json!([{"role": "user", "content": "Hello"}]);
    let (body, schema, output) = match api {
        Api::Chat => (
            json!({"model": model, "messages": hello}),
            json!({
                "type": "object",
                "properties": {
                    "model": string(), "messages": messages_schema(), "max_completion_tokens": integer(),
                    "max_tokens": integer(), "stream": {"type": "boolean"}, "temperature": {"type": "number"},
                },
                "required": ["model", "messages"],
            }),
            json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11},
            }),
        ),
        Api::Completions => (
            json!({"model": model, "prompt": "Hello"}),
            json!({
                "type": "object",
                "properties": {
                    "model": string(), "prompt": {"type": ["string", "array"]}, "max_tokens": integer(),
                    "stream": {"type": "boolean"},
                },
                "required": ["model", "prompt"],
            }),
            json!({
                "id": "cmpl-1", "object": "text_completion", "model": model,
                "choices": [{"index": 0, "text": " world", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }),
        ),
        Api::Embeddings => (
            json!({"model": model, "input": "Hello"}),
            json!({
                "type": "object",
                "properties": {"model": string(), "input": {"type": ["string", "array"]}},
                "required": ["model", "input"],
            }),
            json!({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.01, -0.02]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }),
        ),
        Api::Responses => (
            json!({"model": model, "input": "Hello"}),
            json!({
                "type": "object",
                "properties": {
                    "model": string(), "input": {"type": ["string", "array"]}, "instructions": string(),
                    "max_output_tokens": integer(), "stream": {"type": "boolean"},
                },
                "required": ["model", "input"],
            }),
            json!({
                "id": "resp_1", "object": "response", "model": model, "status": "completed",
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hi!"}]}],
                "usage": {"input_tokens": 8, "output_tokens": 3, "total_tokens": 11},
            }),
        ),
        Api::Messages => (
            json!({"model": model, "max_tokens": 256, "messages": hello}),
            json!({
                "type": "object",
                "properties": {
                    "model": string(), "messages": messages_schema(), "max_tokens": integer(),
                    "system": {"type": ["string", "array"]}, "stream": {"type": "boolean"},
                },
                "required": ["model", "max_tokens", "messages"],
            }),
            json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Hi!"}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 8, "output_tokens": 3},
            }),
        ),
    };
    body_endpoint(body, schema, None, output)
}

fn empty_body_schema() -> Value {
    json!({"type": "object", "properties": {}, "additionalProperties": false})
}

/// `POST /x402/credits/{amount}`: no body; the answer carries the API key (first top-up) and the new balance.
pub fn credits() -> Value {
    body_endpoint(
        json!({}),
        empty_body_schema(),
        None,
        json!({"success": true, "data": {
            "credited": true, "amountUsdc": "10.00", "newBalanceUsdc": "10.00", "account": "0x…",
            "apiKey": "sk-…", "keyId": "key_…",
            "payment": {"transaction": "0x…", "network": "eip155:8453", "payer": "0x…", "amountUsdc": "10.00"},
        }}),
    )
}

/// `POST /x402/pools/{slug}?blocks=…`: a subscription to the named blocks; the answer carries its API key.
pub fn pool(blocks: &[String]) -> Value {
    body_endpoint(
        json!({}),
        empty_body_schema(),
        Some((
            json!({"blocks": blocks.join(",")}),
            json!({
                "type": "object",
                "properties": {"blocks": {"type": "string", "description": "comma-separated block names"}},
                "required": ["blocks"],
                "additionalProperties": false,
            }),
        )),
        json!({"success": true, "data": {
            "apiKey": "sk-…", "keyId": "key_…", "blocks": blocks, "expiresAt": "2026-01-31T00:00:00Z",
            "payment": {"transaction": "0x…", "network": "eip155:8453", "payer": "0x…"},
        }}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's "Example: POST Endpoint" extension (specs/extensions/bazaar.md), verbatim.
    const SPEC_POST_EXAMPLE: &str = r#"{
      "info": {
        "input": {"type": "http", "method": "POST", "bodyType": "json", "body": {"query": "example"}},
        "output": {"type": "json", "example": {"results": []}}
      },
      "schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
          "input": {
            "type": "object",
            "properties": {
              "type": { "type": "string", "const": "http" },
              "method": { "type": "string", "enum": ["POST", "PUT", "PATCH"] },
              "bodyType": { "type": "string", "enum": ["json", "form-data", "text"] },
              "body": { "type": "object" },
              "queryParams": { "type": "object", "additionalProperties": { "type": "string" } },
              "headers": { "type": "object", "additionalProperties": { "type": "string" } }
            },
            "required": ["type", "method", "bodyType", "body"],
            "additionalProperties": false
          },
          "output": {
            "type": "object",
            "properties": { "type": { "type": "string" }, "example": { "type": "object" } },
            "required": ["type"]
          }
        },
        "required": ["input"]
      }
    }"#;

    #[test]
    fn a_body_endpoint_is_the_spec_post_example() {
        let spec: Value = serde_json::from_str(SPEC_POST_EXAMPLE).unwrap();
        let ours = body_endpoint(
            json!({"query": "example"}),
            json!({"type": "object"}),
            None,
            json!({"results": []}),
        );
        assert_eq!(ours, spec);
    }

    /// Every extension we send has the spec's structure: the same keys as the example at every level of `info` and
    /// `schema`, an `info.input` the schema's own rules accept (required keys present, no others), and a body the
    /// body schema's `required` names.
    #[test]
    fn every_paid_resource_follows_the_spec_shape() {
        let spec: Value = serde_json::from_str(SPEC_POST_EXAMPLE).unwrap();
        let mut all: Vec<(String, Value)> = Api::ALL
            .iter()
            .map(|a| (a.path().to_string(), inference(*a, "kimi-k2.6")))
            .collect();
        all.push(("credits".into(), credits()));
        all.push(("pool".into(), pool(&["asia".into(), "europe".into()])));
        for (name, ext) in all {
            let keys = |v: &Value| {
                let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
                k.sort();
                k
            };
            assert_eq!(keys(&ext), keys(&spec), "{name}");
            assert_eq!(keys(&ext["schema"]), keys(&spec["schema"]), "{name}");
            assert_eq!(
                ext["schema"]["$schema"],
                "https://json-schema.org/draft/2020-12/schema"
            );
            assert_eq!(
                ext["schema"]["properties"]["output"],
                spec["schema"]["properties"]["output"]
            );
            let input_schema = &ext["schema"]["properties"]["input"];
            let spec_input = &spec["schema"]["properties"]["input"];
            for k in ["type", "method", "bodyType", "headers"] {
                assert_eq!(
                    input_schema["properties"][k], spec_input["properties"][k],
                    "{name} {k}"
                );
            }
            assert_eq!(input_schema["required"], spec_input["required"], "{name}");
            assert_eq!(input_schema["additionalProperties"], false, "{name}");
            let input = ext["info"]["input"].as_object().unwrap();
            let allowed = input_schema["properties"].as_object().unwrap();
            assert!(input.keys().all(|k| allowed.contains_key(k)), "{name}");
            for k in spec_input["required"].as_array().unwrap() {
                assert!(input.contains_key(k.as_str().unwrap()), "{name} lacks {k}");
            }
            assert_eq!(input["type"], "http");
            assert_eq!(input["method"], "POST");
            assert_eq!(input["bodyType"], "json");
            assert!(input["body"].is_object(), "{name}");
            for k in input_schema["properties"]["body"]["required"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert!(
                    input["body"].get(k.as_str().unwrap()).is_some(),
                    "{name} body lacks {k}"
                );
            }
            assert_eq!(ext["info"]["output"]["type"], "json");
            assert!(ext["info"]["output"]["example"].is_object(), "{name}");
        }
        let p = pool(&["asia".into()]);
        assert_eq!(p["info"]["input"]["queryParams"], json!({"blocks": "asia"}));
    }
}
