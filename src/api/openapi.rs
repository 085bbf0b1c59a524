//! The OpenAPI 3.1 document served at `/openapi.json`, built from [`ROUTES`]: one entry per (method, path) the
//! router serves. A test compares this list with the `.route(…)` registrations in `src/api/` and probes every
//! documented path on a live server, so a route cannot be added without being documented.
//!
//! Each operation's exact contract — parameter patterns and formats, the request body's JSON Schema, every status
//! it can send with its body shape and headers — is written next to the route table in `openapi_contract.json`
//! (keyed `"<method> <path>"`) and laid over the generated operation. schemathesis checks the whole document
//! against the running gateway (`tests/it/contract.rs`), and the route fuzzer checks that every status it sees on
//! an operation is documented there, so the hand-written contract cannot drift from the server unnoticed.

use serde_json::{Map, Value, json};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// An API key (`Authorization: Bearer sk-…`), or none to get the 402 catalog.
    ApiKey,
    /// The auditor or the admin token.
    Auditor,
    /// The admin token (header, or `?token=` for a browser).
    Admin,
}

/// One documented route.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// Lower-case HTTP method.
    pub method: &'static str,
    /// OpenAPI path (`{name}` parameters).
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    /// Whether the route answers CSV too.
    pub csv: bool,
}

const PAGE: &[(&str, &str)] = &[
    ("cursor", "opaque cursor: the previous page's nextCursor"),
    ("limit", "rows per page, 1-1000 (default 100)"),
    (
        "format",
        "json (default) or csv; `Accept: text/csv` also selects CSV, streamed over the whole filtered range",
    ),
];

const fn r(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    access: Access,
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        tag,
        summary,
        access,
        query: &[],
        csv: false,
    }
}

/// Every route the gateway serves.
pub const ROUTES: &[RouteDoc] = &[
    r(
        "get",
        "/healthz",
        "operations",
        "Liveness with the indexer's progress (503 once the indexer stopped for good)",
        Access::Public,
    ),
    r(
        "get",
        "/readyz",
        "operations",
        "Readiness: indexer running, lag within server.ready_max_lag_blocks, database writable",
        Access::Public,
    ),
    r(
        "get",
        "/metrics",
        "operations",
        "Prometheus metrics",
        Access::Public,
    ),
    r(
        "get",
        "/openapi.json",
        "operations",
        "This document",
        Access::Public,
    ),
    r(
        "get",
        "/admin",
        "operations",
        "Operator status page (HTML): indexer, recent payments, revenue, seats, keys, recent errors",
        Access::Admin,
    ),
    RouteDoc {
        query: &[(
            "range",
            "today (default), 7d or 30d: whole UTC days, the last one today",
        )],
        ..r(
            "get",
            "/api/admin/summary",
            "operations",
            "The console's figures as JSON: received and earned per day and network, requests, tokens, errors, \
             per-model latency, top accounts, payments per network, indexers, deployments, database",
            Access::Admin,
        )
    },
    r(
        "get",
        "/.well-known/agent-card.json",
        "discovery",
        "A2A v1.0 agent card: skills, auth (bearer key, x402), streaming, docs; ETag + If-None-Match → 304",
        Access::Public,
    ),
    r(
        "get",
        "/.well-known/agent.json",
        "discovery",
        "Legacy A2A v0.3 agent card for older clients; ETag + If-None-Match → 304",
        Access::Public,
    ),
    r(
        "get",
        "/api/agent/plans",
        "agent",
        "The live catalog (pools, blocks, seats, prices, credits)",
        Access::Public,
    ),
    r(
        "post",
        "/api/agent/subscribe-pool",
        "agent",
        "Claim a confirmed payment for pool blocks: {txHash, poolSlug, blocks, signature}",
        Access::Public,
    ),
    r(
        "post",
        "/api/agent/topup",
        "agent",
        "Claim a confirmed payment as credits: {txHash, amount, signature} → {credited, newBalance (JSON number, \
         exact), newBalanceUsdc (decimal string), apiKey?, …}",
        Access::Public,
    ),
    r(
        "post",
        "/x402/credits/{amount}",
        "x402",
        "Buy credits with a standard x402 payment (PAYMENT-SIGNATURE or X-PAYMENT), answered like /api/agent/topup \
         (newBalance a JSON number, newBalanceUsdc a string); unpaid: 402 with PAYMENT-REQUIRED",
        Access::Public,
    ),
    r(
        "get",
        "/x402/credits/{amount}",
        "x402",
        "The 402 challenge of a credit purchase, as an unpaid POST gets it (for discovery crawlers and GET-only \
         checkers); never pays",
        Access::Public,
    ),
    r(
        "get",
        "/x402/pools/{slug}",
        "x402",
        "The 402 challenge of a pool subscription (?blocks=asia,europe), as an unpaid POST gets it; never pays",
        Access::Public,
    ),
    r(
        "post",
        "/x402/pools/{slug}",
        "x402",
        "Buy a pool subscription (?blocks=asia,europe) with a standard x402 payment; unpaid: 402 with PAYMENT-REQUIRED",
        Access::Public,
    ),
    r(
        "post",
        "/api/agent/keys/rotate",
        "agent",
        "Rotate lost keys with the payer's signature of the catalog's keyRotation.message (it names this gateway's \
         host, payTo and chain): {address, signedAt, signature, keyId?}",
        Access::Public,
    ),
    r(
        "post",
        "/v1/chat/completions",
        "inference",
        "OpenAI chat completions (JSON or SSE stream), metered per token for credit keys",
        Access::ApiKey,
    ),
    r(
        "post",
        "/v1/completions",
        "inference",
        "OpenAI legacy completions (prompt: string, strings or token ids; JSON or SSE stream), metered per token",
        Access::ApiKey,
    ),
    r(
        "post",
        "/v1/embeddings",
        "inference",
        "OpenAI embeddings (input: string, strings or token ids), metered on input tokens",
        Access::ApiKey,
    ),
    r(
        "post",
        "/v1/responses",
        "inference",
        "OpenAI Responses API (JSON, or SSE events ending in response.completed with usage), metered per token; \
         stored state (previous_response_id, conversation) and hosted tools are refused",
        Access::ApiKey,
    ),
    r(
        "post",
        "/v1/messages",
        "inference",
        "Anthropic Messages API (max_tokens required; JSON or SSE message_start … message_stop), key in x-api-key \
         or Authorization: Bearer, Anthropic's error shape; metered per token",
        Access::ApiKey,
    ),
    r(
        "get",
        "/v1/models",
        "inference",
        "The models this key may call (OpenAI shape)",
        Access::ApiKey,
    ),
    r(
        "get",
        "/v1/usage",
        "inference",
        "The key's type, plan, blocks, expiry, balance and recent usage",
        Access::ApiKey,
    ),
    r(
        "get",
        "/v1",
        "inference",
        "OpenAI-compatible API root; without a valid key: 402 with the catalog",
        Access::ApiKey,
    ),
    r(
        "post",
        "/v1",
        "inference",
        "OpenAI-compatible API root; without a valid key: 402 with the catalog",
        Access::ApiKey,
    ),
    r(
        "get",
        "/v1/{rest}",
        "inference",
        "OpenAI-compatible API (e.g. /v1/models); without a valid key: 402 with the catalog",
        Access::ApiKey,
    ),
    r(
        "post",
        "/v1/{rest}",
        "inference",
        "OpenAI-compatible API (e.g. /v1/chat/completions); without a valid key: 402 with the catalog",
        Access::ApiKey,
    ),
    RouteDoc {
        query: &[
            ("status", "seen, confirmed or orphaned"),
            ("payer", "payer address"),
            ("fromBlock", "first block (inclusive)"),
            ("toBlock", "last block (inclusive)"),
            (
                "from",
                "block time from (inclusive): unix seconds, YYYY-MM-DD or RFC 3339 UTC",
            ),
            ("to", "block time to (exclusive)"),
            ("minAmount", "minimum value in USDC, e.g. \"10.00\""),
            ("network", "CAIP-2 id of one network, e.g. \"eip155:8453\""),
            PAGE[0],
            PAGE[1],
            PAGE[2],
        ],
        csv: true,
        ..r(
            "get",
            "/api/audit/payments",
            "audit",
            "Transfers to payTo with confirmations and whether they were claimed",
            Access::Auditor,
        )
    },
    r(
        "get",
        "/api/audit/payments/{txHash}",
        "audit",
        "One transaction: transfers, confirmations, status history, what it bought, key public id, ledger rows",
        Access::Auditor,
    ),
    RouteDoc {
        query: &[
            ("account", "payer address"),
            ("kind", "subscription or topup"),
            ("from", "claim time from (inclusive)"),
            ("to", "claim time to (exclusive)"),
            PAGE[0],
            PAGE[1],
            PAGE[2],
        ],
        csv: true,
        ..r(
            "get",
            "/api/audit/claims",
            "audit",
            "Claims: what each payment bought",
            Access::Auditor,
        )
    },
    RouteDoc {
        query: &[
            ("account", "payer address"),
            ("from", "entry time from (inclusive)"),
            ("to", "entry time to (exclusive)"),
            PAGE[0],
            PAGE[1],
            PAGE[2],
        ],
        csv: true,
        ..r(
            "get",
            "/api/audit/ledger",
            "audit",
            "The credit ledger of every account (append-only, with running balances)",
            Access::Auditor,
        )
    },
    RouteDoc {
        query: &[
            ("from", "entry time from (inclusive)"),
            ("to", "entry time to (exclusive)"),
            PAGE[0],
            PAGE[1],
            PAGE[2],
        ],
        csv: true,
        ..r(
            "get",
            "/api/audit/accounts/{address}/ledger",
            "audit",
            "One account's ledger",
            Access::Auditor,
        )
    },
    RouteDoc {
        query: &[("account", "payer address"), PAGE[0], PAGE[1], PAGE[2]],
        csv: true,
        ..r(
            "get",
            "/api/audit/keys",
            "audit",
            "API keys: public ids, kind, state, expiry (never secrets)",
            Access::Auditor,
        )
    },
    RouteDoc {
        query: &[
            ("from", "day from (inclusive)"),
            ("to", "day to (exclusive)"),
            ("format", "json (default) or csv"),
        ],
        csv: true,
        ..r(
            "get",
            "/api/audit/revenue",
            "audit",
            "Revenue per UTC day: confirmed payments received, claims by product, surplus",
            Access::Auditor,
        )
    },
    RouteDoc {
        query: &[(
            "status",
            "serving, settling, settled, zero or unsettled (default: all)",
        )],
        ..r(
            "get",
            "/api/audit/upto",
            "audit",
            "Keyless pay-per-token payments (x402 upto): maximum, tokens, prices, metered cost, settlement and state; \
             the totals settled and still owed",
            Access::Auditor,
        )
    },
    r(
        "get",
        "/x402/upto/{payer}/{nonce}",
        "x402",
        "The state of one upto payment (the x-payment-status of its answer): serving, settling, settled, zero or \
         unsettled; tokens, cost, transaction, and its paymentResponse once final",
        Access::Public,
    ),
];

/// The per-operation contract laid over the generated document (see the module docs).
const CONTRACT: &str = include_str!("openapi_contract.json");

/// [`CONTRACT`] parsed (a unit test proves it parses; an unparsable one leaves the generated document as it is).
fn contract() -> Value {
    serde_json::from_str(CONTRACT).unwrap_or_else(|e| {
        tracing::error!(error = %e, "src/api/openapi_contract.json does not parse");
        json!({})
    })
}

/// Lays `overlay` (parameters, requestBody, responses) over the generated operation `op`: a parameter replaces the
/// one of the same name and location, a response the one of the same status.
fn overlay(op: &mut Map<String, Value>, overlay: &Value) {
    if let Some(params) = overlay["parameters"].as_array() {
        let mut merged: Vec<Value> = op
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for p in params {
            merged.retain(|q| q["name"] != p["name"] || q["in"] != p["in"]);
            merged.push(p.clone());
        }
        op.insert("parameters".into(), Value::Array(merged));
    }
    if !overlay["requestBody"].is_null() {
        op.insert("requestBody".into(), overlay["requestBody"].clone());
    }
    if let (Some(responses), Some(Value::Object(into))) =
        (overlay["responses"].as_object(), op.get_mut("responses"))
    {
        for (status, response) in responses {
            into.insert(status.clone(), response.clone());
        }
    }
}

/// The OpenAPI document of a gateway configured with `settings`: [`document`], with the live catalog's pool slugs
/// and block names as enums and the minimum top-up in the amount patterns, so that a request valid by the document
/// is one the server accepts.
pub fn document_for(settings: &crate::config::Settings) -> Value {
    let mut doc = document(settings.public_url.as_deref());
    let slugs: Vec<&str> = settings.pools.iter().map(|p| p.slug.as_str()).collect();
    let mut blocks: Vec<&str> = Vec::new();
    for pool in &settings.pools {
        for block in &pool.blocks {
            if !blocks.contains(&block.name.as_str()) {
                blocks.push(&block.name);
            }
        }
    }
    let amount = min_amount_pattern(settings.credits.min_topup.atomic());
    let paths = &mut doc["paths"];
    // The inference routes serve the configured models; another `model` is a 404 (`model_not_found`).
    let models: Vec<&str> = settings.models.iter().map(|m| m.id.as_str()).collect();
    if !models.is_empty() {
        for route in ROUTES
            .iter()
            .filter(|r| crate::proxy::Api::of_path(r.path).is_some())
        {
            let schema = &mut paths[route.path][route.method]["requestBody"]["content"]["application/json"]
                ["schema"];
            if schema.is_object() {
                schema["properties"]["model"] = json!({"type": "string", "enum": models});
            }
        }
    }
    // Choices per request: prompts × n up to the model's max_choices for credit keys (1 for the others).
    let max_choices = settings
        .models
        .iter()
        .map(|m| m.max_choices)
        .max()
        .unwrap_or(1);
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let schema =
            &mut paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"];
        if schema["properties"]["n"].is_object() {
            schema["properties"]["n"]["maximum"] = json!(max_choices);
        }
    }
    // A completions prompt of several prompts (strings, or token-id arrays) makes one choice each.
    for variant in paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"]["prompt"]["anyOf"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if variant["items"]["type"] == "string" || variant["items"]["type"] == "array" {
            variant["maxItems"] = json!(max_choices);
        }
    }
    let body = &mut paths["/api/agent/subscribe-pool"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"];
    body["poolSlug"] = json!({"type": "string", "enum": slugs});
    body["blocks"]["items"] = json!({"type": "string", "enum": blocks});
    // The networks this gateway accepts claims on: CAIP-2 ids and preset names.
    let networks: Vec<String> = settings
        .networks()
        .flat_map(|n| [n.network.caip2(), n.network.name.clone()])
        .filter(|name| name != "custom")
        .collect();
    for path in ["/api/agent/subscribe-pool", "/api/agent/topup"] {
        paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
            ["network"]["enum"] = json!(networks);
    }
    let topup = &mut paths["/api/agent/topup"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"]["amount"];
    if let Some(amount) = &amount {
        topup["anyOf"][0]["pattern"] = json!(amount);
    }
    let whole_min = (settings.credits.min_topup.atomic() + 999_999) / 1_000_000;
    topup["anyOf"][1]["minimum"] = json!(whole_min);
    // The unpaid GET of the purchase routes takes the same parameters as their POST.
    for method in ["post", "get"] {
        for param in paths["/x402/credits/{amount}"][method]["parameters"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if let (Some(amount), "amount") = (&amount, param["name"].as_str().unwrap_or("")) {
                param["schema"]["pattern"] = json!(amount);
            }
        }
    }
    for method in ["post", "get"] {
        for param in paths["/x402/pools/{slug}"][method]["parameters"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            match param["name"].as_str() {
                Some("slug") => param["schema"] = json!({"type": "string", "enum": slugs}),
                Some("blocks") => {
                    param["schema"]["items"] = json!({"type": "string", "enum": blocks});
                }
                _ => {}
            }
        }
    }
    doc
}

/// A pattern for decimal USDC amounts (up to 12 integer and 6 fraction digits) of at least `min_atomic`, when the
/// minimum is whole (`None` otherwise: the generic pattern stays, and the server answers 400 below the minimum).
fn min_amount_pattern(min_atomic: i64) -> Option<String> {
    if min_atomic % 1_000_000 != 0 {
        return None;
    }
    let min = (min_atomic / 1_000_000).max(0);
    let frac = "(\\.[0-9]{1,6})?";
    if min == 0 {
        return Some(format!("^[0-9]{{1,12}}{frac}$"));
    }
    let digits: Vec<u32> = min
        .to_string()
        .chars()
        .filter_map(|c| c.to_digit(10))
        .collect();
    let d = digits.len();
    if d > 12 {
        return None;
    }
    // Integer parts of d digits at least `min`: `min` itself, or a prefix of it, then a larger digit, then any.
    let mut alternatives = vec![min.to_string()];
    for i in 0..d {
        if digits[i] < 9 {
            let prefix: String = digits[..i].iter().map(|x| x.to_string()).collect();
            let rest = d - i - 1;
            alternatives.push(format!("{prefix}[{}-9][0-9]{{{rest}}}", digits[i] + 1));
        }
    }
    // Or more digits (no leading zero).
    if d < 12 {
        alternatives.push(format!("[1-9][0-9]{{{},11}}", d));
    }
    Some(format!("^({}){frac}$", alternatives.join("|")))
}

/// The OpenAPI document.
pub fn document(public_url: Option<&str>) -> Value {
    let contract = contract();
    let mut paths: Map<String, Value> = Map::new();
    for route in ROUTES {
        let mut op = Map::new();
        op.insert("tags".into(), json!([route.tag]));
        op.insert("summary".into(), json!(route.summary));
        op.insert(
            "operationId".into(),
            json!(format!(
                "{}_{}",
                route.method,
                route
                    .path
                    .trim_matches('/')
                    .replace(['/', '{', '}', '.', '-'], "_")
            )),
        );
        let mut params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(route.query.iter().map(|(name, desc)| {
            json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "string"}})
        }));
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        let security = match route.access {
            Access::Public => None,
            Access::ApiKey => Some(json!([{"apiKey": []}, {"anthropicApiKey": []}, {}])),
            Access::Auditor => Some(json!([{"auditorToken": []}, {"adminToken": []}])),
            Access::Admin => Some(json!([{"adminToken": []}])),
        };
        if let Some(s) = security {
            op.insert("security".into(), s);
        }
        let mut content = Map::new();
        let ok_type = if route.path == "/admin" {
            "text/html"
        } else if route.path == "/metrics" {
            "text/plain"
        } else {
            "application/json"
        };
        content.insert(ok_type.into(), json!({}));
        if route.csv {
            content.insert("text/csv".into(), json!({}));
        }
        let mut responses = Map::new();
        responses.insert(
            "200".into(),
            json!({"description": "OK", "content": content}),
        );
        match route.access {
            Access::Auditor | Access::Admin => {
                responses.insert(
                    "401".into(),
                    json!({"description": "missing or wrong token"}),
                );
                responses.insert(
                    "404".into(),
                    json!({"description": "no token configured: the route is off"}),
                );
            }
            Access::ApiKey => {
                responses.insert(
                    "402".into(),
                    json!({"description": "payment required: the catalog"}),
                );
            }
            Access::Public => {}
        }
        if route.tag == "discovery" {
            responses.insert(
                "304".into(),
                json!({"description": "not modified: If-None-Match matched the ETag"}),
            );
        }
        if route.method == "post" || !route.query.is_empty() || route.path.contains('{') {
            responses.insert(
                "400".into(),
                json!({"description": "invalid input, naming the field"}),
            );
        }
        // What the limits middleware (src/api/limits.rs) may answer on any route, in the route family's shape.
        responses.insert(
            "413".into(),
            json!({"description": "request body larger than the route's limit"}),
        );
        responses.insert(
            "429".into(),
            json!({"description": "rate limited (keyless requests or claim attempts, per address or for all clients); see Retry-After"}),
        );
        if route.method == "post" {
            responses.insert(
                "408".into(),
                json!({"description": "the request body did not arrive within the request timeout"}),
            );
        }
        if crate::proxy::Api::of_path(route.path).is_none() {
            let timeout = "the answer did not start within the request timeout (the work still completes); see Retry-After";
            let description = match responses.get("503").and_then(|r| r["description"].as_str()) {
                Some(earlier) => format!("{earlier}; or {timeout}"),
                None => timeout.to_string(),
            };
            responses.insert("503".into(), json!({"description": description}));
        }
        op.insert("responses".into(), Value::Object(responses));
        overlay(
            &mut op,
            &contract["operations"][format!("{} {}", route.method, route.path)],
        );
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method] = Value::Object(op);
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "x402-gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Self-hosted x402 payment gateway for AI inference: USDC on Base in, OpenAI-compatible API keys out.",
        },
        "paths": paths,
        "components": {
            "schemas": contract["components"]["schemas"],
            "headers": contract["components"]["headers"],
            "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key sk-…"},
            "anthropicApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "the same API key sk-…, as Anthropic's SDKs send it"},
            "auditorToken": {"type": "http", "scheme": "bearer", "description": "the read-only auditor token"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "the operator's admin token"},
        }},
    });
    if let Some(url) = public_url {
        doc["servers"] = json!([{"url": url}]);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_amount_patterns() {
        // schemathesis checks them against the server (tests/it/contract.rs); here, their shape.
        assert_eq!(
            min_amount_pattern(10_000_000).unwrap(),
            "^(10|[2-9][0-9]{1}|1[1-9][0-9]{0}|[1-9][0-9]{2,11})(\\.[0-9]{1,6})?$"
        );
        assert_eq!(
            min_amount_pattern(0).unwrap(),
            "^[0-9]{1,12}(\\.[0-9]{1,6})?$"
        );
        assert_eq!(min_amount_pattern(500_000), None);
    }

    /// The contract parses, and names only documented operations (a typo would silently document nothing).
    #[test]
    fn contract_parses_and_names_documented_operations() {
        let contract: Value = serde_json::from_str(CONTRACT).unwrap();
        let operations = contract["operations"].as_object().unwrap();
        for key in operations.keys() {
            assert!(
                ROUTES
                    .iter()
                    .any(|r| format!("{} {}", r.method, r.path) == *key),
                "openapi_contract.json names {key}, which ROUTES does not document"
            );
        }
        // Every POST with a body the server reads declares it required; every referenced schema exists.
        let doc = document(None);
        let text = doc.to_string();
        for (name, _) in contract["components"]["schemas"].as_object().unwrap() {
            assert!(
                text.contains(&format!("#/components/schemas/{name}")),
                "{name} is unused"
            );
        }
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                if let Some(body) = op.get("requestBody") {
                    assert_eq!(body["required"], true, "{method} {path}");
                }
                for p in op["parameters"].as_array().into_iter().flatten() {
                    assert!(p["schema"].is_object(), "{method} {path}: {p}");
                }
            }
        }
    }
}
