//! Discovery: the A2A agent card at `/.well-known/agent-card.json` (A2A v1.0 field names) and the legacy
//! `/.well-known/agent.json` (A2A v0.3 shape) for older clients.
//!
//! Both describe the same gateway, built from the config: what it offers (skills: chat completion, model listing,
//! buying access), how to authenticate (a bearer API key; a standard x402 `PAYMENT-SIGNATURE` when `[x402]` is on),
//! that it streams, where the docs and the catalog are. The gateway is not an A2A task server: its interface is the
//! OpenAI-compatible HTTP API, declared as a custom protocol binding (an open-form URI, as A2A allows), so an A2A
//! client sees at once that it should speak HTTP to `/v1` rather than send A2A messages.
//!
//! The body depends only on the config and on the request's `Host` (when `server.public_url` is unset), so it is
//! cacheable: a strong `ETag` (SHA-256 of the body) answers `If-None-Match` with 304, and
//! `Cache-Control: public, max-age=300`.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::AppState;
use crate::billing::catalog::CLAIM_TEXT_TEMPLATE;
use crate::config::Settings;

/// The v1.0 card's path (A2A `AGENT_CARD_WELL_KNOWN_PATH`).
pub const AGENT_CARD_PATH: &str = "/.well-known/agent-card.json";
/// The v0.3 card's path, still read by older clients.
pub const LEGACY_AGENT_CARD_PATH: &str = "/.well-known/agent.json";
/// How long shared caches may keep a card.
pub const CACHE_CONTROL: &str = "public, max-age=300";
/// The protocol binding of the gateway's one interface: the OpenAI HTTP API (not an A2A binding).
pub const OPENAI_BINDING: &str = "https://platform.openai.com/docs/api-reference/chat";
/// Identifies the x402 payment description in `capabilities.extensions` (informational, not required).
pub const X402_EXTENSION_URI: &str = "urn:x402-gateway:http-402-payments:v1";

pub fn router() -> Router<AppState> {
    Router::new()
        // Literal paths: the OpenAPI test reads `.route("…")` registrations from the source.
        .route("/.well-known/agent-card.json", get(agent_card))
        .route("/.well-known/agent.json", get(legacy_agent_card))
}

async fn agent_card(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let base = super::x402::base_url(&state, &headers);
    cached_json(
        &headers,
        &card_v1(&state.settings, &base, state.x402_enabled()),
    )
}

async fn legacy_agent_card(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let base = super::x402::base_url(&state, &headers);
    cached_json(
        &headers,
        &card_v0_3(&state.settings, &base, state.x402_enabled()),
    )
}

/// `"<hex>"`: the first 128 bits of SHA-256 of the body, quoted (a strong validator).
pub fn etag_of(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("\"{}\"", alloy::hex::encode(&digest[..16]))
}

/// Whether `If-None-Match` matches `etag` (weak comparison, as RFC 9110 §13.1.2 prescribes for GET).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

fn cached_json(headers: &HeaderMap, body: &Value) -> Response {
    let bytes = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "agent card serialization failed");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let etag = etag_of(&bytes);
    let mut response = if not_modified(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    // A public document: browser-based agents may read it from another origin.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("ETag"),
    );
    response
}

/// What both card versions say, in neutral form.
struct Facts {
    name: &'static str,
    description: String,
    version: &'static str,
    api_url: String,
    docs_url: String,
    provider: Value,
    /// Whether standard x402 payments (`PAYMENT-SIGNATURE`) are accepted somewhere.
    x402: bool,
    /// Whether some model takes a per-request x402 payment on `/v1/chat/completions`.
    per_request: bool,
    skills: Vec<Value>,
    extension: Value,
}

fn facts(settings: &Settings, base: &str, x402: bool) -> Facts {
    let models: Vec<&str> = settings.models.iter().map(|m| m.id.as_str()).collect();
    let chain = &settings.chain;
    let per_request = x402 && settings.models.iter().any(|m| m.per_request.is_some());
    let description = format!(
        "OpenAI-compatible inference ({models}) sold for USDC on {network} (chain {chain_id}). Call /v1 without a \
         key to get HTTP 402 with the catalog; pay USDC to {pay_to:#x}, wait for {confirmations} confirmations, claim \
         the transaction by its hash with the payer's signature and use the returned API key as a bearer token.{x402}",
        pay_to = chain.pay_to,
        models = if models.is_empty() {
            "no models configured".to_string()
        } else {
            models.join(", ")
        },
        network = chain.network.caip2(),
        chain_id = chain.network.chain_id,
        confirmations = chain.confirmations,
        x402 = if x402 {
            " Standard x402 clients can also pay with a PAYMENT-SIGNATURE header at /x402/*."
        } else {
            ""
        },
    );
    let host = base
        .split("://")
        .nth(1)
        .unwrap_or(base)
        .split('/')
        .next()
        .unwrap_or(base);
    let json_modes = ["application/json"];
    let stream_modes = ["application/json", "text/event-stream"];
    let model_list = models.join(", ");
    let skills = vec![
        json!({
            "id": "chat-completion",
            "name": "Chat completion",
            "description": format!(
                "POST {base}/v1/chat/completions, OpenAI-compatible (JSON, or SSE with \"stream\": true). Models: \
                 {model_list}. Credit keys pay per token; pool keys work inside their daily UTC blocks.{}",
                if per_request { " Some models also take one x402 payment per request, no key needed." } else { "" }
            ),
            "tags": ["llm", "chat", "completions", "openai-compatible", "inference", "streaming"],
            "examples": [format!(
                "curl -N {base}/v1/chat/completions -H 'Authorization: Bearer sk-…' -H 'Content-Type: application/json' \
                 -d '{{\"model\":\"{}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
                models.first().copied().unwrap_or("MODEL")
            )],
            "inputModes": json_modes,
            "outputModes": stream_modes,
        }),
        json!({
            "id": "inference-apis",
            "name": "Completions, embeddings, Responses and Anthropic Messages",
            "description": format!(
                "The same keys and per-token metering on POST {base}/v1/completions (legacy completions), \
                 {base}/v1/embeddings (input tokens only), {base}/v1/responses (OpenAI Responses API, JSON or SSE) \
                 and {base}/v1/messages (Anthropic Messages API: key in x-api-key or Authorization: Bearer, \
                 Anthropic's errors and stream events). Models: {model_list}."
            ),
            "tags": ["llm", "completions", "embeddings", "responses", "anthropic", "messages", "inference"],
            "examples": [format!(
                "curl {base}/v1/messages -H 'x-api-key: sk-…' -H 'anthropic-version: 2023-06-01' \
                 -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"max_tokens\":256,\
                 \"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
                models.first().copied().unwrap_or("MODEL")
            )],
            "inputModes": json_modes,
            "outputModes": stream_modes,
        }),
        json!({
            "id": "list-models",
            "name": "List models",
            "description": format!(
                "GET {base}/v1/models: the models the key may call (OpenAI shape). GET {base}/v1/usage: the key's \
                 plan, balance and recent usage."
            ),
            "tags": ["models", "usage", "openai-compatible"],
            "examples": [format!("curl {base}/v1/models -H 'Authorization: Bearer sk-…'")],
            "inputModes": json_modes,
            "outputModes": json_modes,
        }),
        json!({
            "id": "buy-access",
            "name": "Buy access with USDC",
            "description": format!(
                "No key needed. GET {base}/api/agent/plans (or any /v1 call without a key: HTTP 402) lists the \
                 products: pool subscriptions by daily UTC block, and prepaid credits. Pay USDC {token:#x} on {network} \
                 to {pay_to:#x}, wait for {confirmations} confirmations, then POST {base}/api/agent/subscribe-pool \
                 or {base}/api/agent/topup with the txHash and an EIP-191 signature by the payer of \"{claim}\". The \
                 answer carries the API key (shown once).{x402}",
                token = chain.network.token,
                network = chain.network.caip2(),
                pay_to = chain.pay_to,
                confirmations = chain.confirmations,
                claim = CLAIM_TEXT_TEMPLATE.replace("{chainId}", &chain.network.chain_id.to_string()),
                x402 = if x402 {
                    format!(
                        " Or pay in one step with a standard x402 client: POST {base}/x402/credits/{{amount}} or \
                         {base}/x402/pools/{{slug}}?blocks=…"
                    )
                } else {
                    String::new()
                },
            ),
            "tags": ["payment", "x402", "usdc", "http-402", "api-key", "subscription", "credits"],
            "examples": [format!("curl {base}/api/agent/plans")],
            "inputModes": json_modes,
            "outputModes": json_modes,
        }),
    ];
    let mut params = json!({
        "catalog": format!("{base}/api/agent/plans"),
        "network": chain.network.caip2(),
        "chainId": chain.network.chain_id,
        "asset": "USDC",
        "assetAddress": format!("{:#x}", chain.network.token),
        "payTo": format!("{:#x}", chain.pay_to),
        "confirmations": chain.confirmations,
        "claimMessage": CLAIM_TEXT_TEMPLATE.replace("{chainId}", &chain.network.chain_id.to_string()),
        "claimEndpoints": {
            "credits": format!("{base}/api/agent/topup"),
            "subscription": format!("{base}/api/agent/subscribe-pool"),
        },
        "openapi": format!("{base}/openapi.json"),
    });
    if x402 {
        params["x402Endpoints"] = json!([
            format!("{base}/x402/credits/{{amount}}"),
            format!("{base}/x402/pools/{{slug}}"),
        ]);
    }
    let extension = json!({
        "uri": X402_EXTENSION_URI,
        "description": "Access is bought over plain HTTP 402 (x402): pay USDC on chain, then claim the payment for \
                        an API key (or pay per request with PAYMENT-SIGNATURE where offered). This describes the \
                        gateway's HTTP payment flow; it is not the A2A x402 message extension.",
        "required": false,
        "params": params,
    });
    Facts {
        name: "x402-gateway",
        description,
        version: env!("CARGO_PKG_VERSION"),
        api_url: format!("{base}/v1"),
        docs_url: settings
            .docs_url
            .clone()
            .unwrap_or_else(|| format!("{base}/openapi.json")),
        provider: json!({"organization": host, "url": base}),
        x402,
        per_request,
        skills,
        extension,
    }
}

const BEARER_DESCRIPTION: &str = "An API key `sk-<16 hex>-<64 hex>` bought with USDC (see the buy-access skill), \
                                  sent as `Authorization: Bearer <key>`. Without one, /v1 answers 402 with the catalog.";
const X402_DESCRIPTION: &str = "A standard x402 v2 payment (EIP-3009 transferWithAuthorization of USDC, base64 JSON) \
                                in the PAYMENT-SIGNATURE header (X-PAYMENT for v1 clients); the 402 answer's \
                                PAYMENT-REQUIRED header says what to sign.";

/// The A2A v1.0 agent card (field names of `lf.a2a.v1.AgentCard`, proto3 JSON mapping).
pub fn card_v1(settings: &Settings, base: &str, x402: bool) -> Value {
    let f = facts(settings, base, x402);
    let mut schemes = json!({
        "bearer": {"httpAuthSecurityScheme": {
            "scheme": "Bearer",
            "bearerFormat": "sk-<16 hex>-<64 hex>",
            "description": BEARER_DESCRIPTION,
        }},
    });
    let mut requirements = vec![json!({"schemes": {"bearer": {"list": []}}})];
    if f.x402 {
        schemes["x402"] = json!({"apiKeySecurityScheme": {
            "location": "header",
            "name": "PAYMENT-SIGNATURE",
            "description": X402_DESCRIPTION,
        }});
        if f.per_request {
            requirements.push(json!({"schemes": {"x402": {"list": []}}}));
        }
    }
    json!({
        "name": f.name,
        "description": f.description,
        "supportedInterfaces": [{
            "url": f.api_url,
            "protocolBinding": OPENAI_BINDING,
            "protocolVersion": "1.0",
        }],
        "provider": f.provider,
        "version": f.version,
        "documentationUrl": f.docs_url,
        "capabilities": {
            "streaming": true,
            "pushNotifications": false,
            "extendedAgentCard": false,
            "extensions": [f.extension],
        },
        "securitySchemes": schemes,
        "securityRequirements": requirements,
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json", "text/event-stream"],
        "skills": f.skills,
    })
}

/// The A2A v0.3 agent card (`url` + `preferredTransport`, OpenAPI-style security schemes).
pub fn card_v0_3(settings: &Settings, base: &str, x402: bool) -> Value {
    let f = facts(settings, base, x402);
    let mut schemes = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "sk-<16 hex>-<64 hex>",
            "description": BEARER_DESCRIPTION,
        },
    });
    let mut security = vec![json!({"bearer": []})];
    if f.x402 {
        schemes["x402"] = json!({
            "type": "apiKey",
            "in": "header",
            "name": "PAYMENT-SIGNATURE",
            "description": X402_DESCRIPTION,
        });
        if f.per_request {
            security.push(json!({"x402": []}));
        }
    }
    json!({
        "protocolVersion": "0.3.0",
        "name": f.name,
        "description": f.description,
        "url": f.api_url,
        "preferredTransport": OPENAI_BINDING,
        "provider": f.provider,
        "version": f.version,
        "documentationUrl": f.docs_url,
        "capabilities": {
            "streaming": true,
            "pushNotifications": false,
            "stateTransitionHistory": false,
            "extensions": [f.extension],
        },
        "securitySchemes": schemes,
        "security": security,
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json", "text/event-stream"],
        "skills": f.skills,
        "supportsAuthenticatedExtendedCard": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_matches_lists_weak_tags_and_star() {
        let etag = etag_of(b"{}");
        let mut h = HeaderMap::new();
        assert!(!not_modified(&h, &etag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", W/{etag}")).unwrap(),
        );
        assert!(not_modified(&h, &etag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&h, &etag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(not_modified(&h, &etag));
    }

    #[test]
    fn etag_follows_the_body() {
        assert_eq!(etag_of(b"a"), etag_of(b"a"));
        assert_ne!(etag_of(b"a"), etag_of(b"b"));
        assert_eq!(etag_of(b"a").len(), 34);
    }
}
