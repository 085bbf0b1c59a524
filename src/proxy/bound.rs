//! The gateway's own bound on one chat request: the most prompt and output tokens it can cost, computed from the
//! request by the gateway and written into the request it forwards, so that the reservation covers whatever an
//! upstream that honours the request can generate.
//!
//! The rule this module keeps: **no field of the agent's request can make the upstream generate more than the
//! bound.** vLLM and SGLang read `max_completion_tokens` before `max_tokens`, generate `n` choices and run
//! `best_of` candidates; so the bound is
//! - **output**: the smaller of the client's `max_tokens` / `max_completion_tokens`, capped by the model's
//!   `max_output_tokens` (that cap when the client sets neither), and for a per-request payment by what the price
//!   buys after the prompt. It is written into the field(s) the upstream reads (both by default; one, with the
//!   other removed, when `[[upstreams]].output_limit_field` names it);
//! - **choices**: `n` is 1 unless the model allows more (`max_choices`), and then the output bound is reserved
//!   `n` times; `best_of`, beam search and length fields the gateway cannot bound are refused;
//! - **prompt**: the body's bytes (no tokenizer makes more tokens than bytes of the JSON that carries the text) plus
//!   a template margin, plus a configured per-part bound for each non-text content part (images, audio, …); a part
//!   with no configured bound is refused, since a few bytes of URL can cost thousands of tokens.

use serde_json::{Map, Value, json};

use super::api::Api;
use super::pricing::Prices;
use crate::config::{Model, OutputLimitField};
use crate::usdc::Usdc;

/// Tokens added to a request's byte length: chat templates add tokens (role markers, tool preambles) the body
/// does not show.
pub const TEMPLATE_TOKEN_MARGIN: u64 = 256;

/// The most one request can cost, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bound {
    /// Prompt tokens the request can hold at most.
    pub prompt_tokens: u64,
    /// Output tokens per choice, as written into the forwarded request.
    pub output_tokens_per_choice: u64,
    /// Choices generated (`n`).
    pub choices: u64,
}

impl Bound {
    /// Output tokens over all choices.
    pub fn output_tokens(&self) -> u64 {
        self.output_tokens_per_choice.saturating_mul(self.choices)
    }

    /// The worst-case cost at `prices`: what a credit request reserves.
    pub fn cost(&self, prices: &Prices) -> Usdc {
        prices.cost(self.prompt_tokens, self.output_tokens())
    }
}

/// Who pays, which decides the multipliers allowed and any budget.
#[derive(Debug, Clone, Copy)]
pub enum Payer {
    /// A credit key: `n` up to the model's `max_choices`, reserved `n` times.
    Credit,
    /// A pool key: `n = 1`, the model's output cap (no token budget, but the operator's GPU time is).
    Subscription,
    /// One x402 payment of `price` for this request: `n = 1`, and the output bound is what the price buys after
    /// the prompt bound.
    PerRequest { price: Usdc },
}

/// Why a request cannot be bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundError {
    /// A parameter the gateway refuses, named for the OpenAI error's `param`.
    Param(BadParam),
    /// A per-request payment cannot cover this request's prompt bound plus one output token.
    Unaffordable { needed: Usdc, price: Usdc },
}

/// A refused parameter, with its name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub param: &'static str,
    pub message: String,
}

impl From<BadParam> for BoundError {
    fn from(e: BadParam) -> Self {
        BoundError::Param(e)
    }
}

fn bad(param: &'static str, message: impl Into<String>) -> BadParam {
    BadParam {
        param,
        message: message.into(),
    }
}

/// Content part types that are text: bounded by their bytes.
const TEXT_PARTS: &[&str] = &["text", "refusal", "input_text"];

/// Output tokens a legacy completion generates when the request names no `max_tokens` (OpenAI's and vLLM's
/// default): the gateway writes it explicitly so the upstream's default cannot differ from the bound.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

/// Computes the bound of `body` (a request of `api` of `body_len` bytes as the client sent it) and rewrites `body`
/// so that the upstream cannot exceed it.
pub fn bound_request(
    api: Api,
    body: &mut Map<String, Value>,
    body_len: usize,
    model: &Model,
    field: OutputLimitField,
    payer: Payer,
) -> Result<Bound, BoundError> {
    let extra_prompt = match api {
        Api::Chat => {
            refuse_unbounded_fields(body)?;
            chat_parts_bound(body, model)?
        }
        Api::Completions => {
            refuse_unbounded_fields(body)?;
            0
        }
        Api::Embeddings => 0,
        Api::Responses => {
            refuse_foreign_multipliers(body)?;
            responses_parts_bound(body, model)?
        }
        Api::Messages => {
            refuse_foreign_multipliers(body)?;
            messages_parts_bound(body, model)?
        }
    };
    let prompt_tokens = (body_len as u64)
        .saturating_add(TEMPLATE_TOKEN_MARGIN)
        .saturating_add(extra_prompt);
    if api == Api::Embeddings {
        // Input tokens only: nothing is generated.
        if let Payer::PerRequest { price } = payer {
            let needed = model_prices(model).cost(prompt_tokens, 0);
            if needed > price {
                return Err(BoundError::Unaffordable { needed, price });
            }
        }
        return Ok(Bound {
            prompt_tokens,
            output_tokens_per_choice: 0,
            choices: 1,
        });
    }
    let choices = match api {
        Api::Chat => choices(body, model, payer)?,
        Api::Completions => completion_choices(body, model, payer)?,
        _ => 1,
    };
    let requested = match api {
        Api::Chat => requested_output(body)?,
        Api::Completions => Some(
            positive(body, "max_tokens")?
                .unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS)
                .min(positive(body, "max_completion_tokens")?.unwrap_or(u64::MAX)),
        ),
        Api::Responses => positive(body, "max_output_tokens")?,
        Api::Messages => Some(positive(body, "max_tokens")?.ok_or_else(|| {
            bad(
                "max_tokens",
                "`max_tokens` is required: the most tokens to generate before stopping",
            )
        })?),
        Api::Embeddings => None,
    };
    let mut output = requested
        .unwrap_or(model.max_output_tokens)
        .min(model.max_output_tokens);
    if let Payer::PerRequest { price } = payer {
        let prices = model_prices(model);
        let affordable = prices.max_output_tokens(price, prompt_tokens);
        if affordable == 0 {
            return Err(BoundError::Unaffordable {
                needed: prices.cost(prompt_tokens, 1),
                price,
            });
        }
        output = output.min(affordable);
    }
    match api {
        Api::Chat => write_output_limit(body, field, output),
        // These APIs have one output field: written, and any other length field removed so no upstream reads it.
        Api::Completions | Api::Messages => {
            body.insert("max_tokens".into(), json!(output));
            body.remove("max_completion_tokens");
        }
        Api::Responses => {
            body.insert("max_output_tokens".into(), json!(output));
            body.remove("max_tokens");
            body.remove("max_completion_tokens");
        }
        Api::Embeddings => {}
    }
    Ok(Bound {
        prompt_tokens,
        output_tokens_per_choice: output,
        choices,
    })
}

fn model_prices(model: &Model) -> Prices {
    Prices {
        input_per_mtok: model.input_per_mtok,
        output_per_mtok: model.output_per_mtok,
    }
}

/// `v` as a whole non-negative number: an integer, or a float without a fraction (`16.0`: JSON Schema's integers
/// include it, and the upstreams' parsers take it).
pub(crate) fn whole(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
            .map(|f| f as u64)
    })
}

/// `field` as a positive integer, if present.
fn positive(body: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, BadParam> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => whole(v)
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| bad(field, format!("`{field}` must be a positive integer"))),
    }
}

/// Legacy completions: one choice per prompt × `n` (vLLM and OpenAI both generate every prompt of an array).
fn completion_choices(
    body: &Map<String, Value>,
    model: &Model,
    payer: Payer,
) -> Result<u64, BadParam> {
    let prompts = match body.get("prompt") {
        Some(Value::String(_)) => 1,
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad("prompt", "`prompt` must not be empty"));
        }
        // Token ids: one prompt.
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items))
            if items.iter().all(|i| i.is_string())
                || items
                    .iter()
                    .all(|i| i.as_array().is_some_and(|t| t.iter().all(Value::is_number))) =>
        {
            items.len() as u64
        }
        _ => {
            return Err(bad(
                "prompt",
                "`prompt` must be a string, an array of strings, an array of token ids or an array of those",
            ));
        }
    };
    let n = positive(body, "n")?.unwrap_or(1);
    let total = n.saturating_mul(prompts);
    let allowed = match payer {
        Payer::Credit => model.max_choices,
        Payer::Subscription | Payer::PerRequest { .. } => 1,
    };
    if total > allowed {
        return Err(bad(
            if prompts > 1 { "prompt" } else { "n" },
            format!(
                "{prompts} prompt(s) × n = {n} makes {total} completions; this key and model serve at most {allowed} \
                 per request"
            ),
        ));
    }
    Ok(total)
}

/// A content part's bound: text parts cost their bytes (already counted); others their configured bound.
fn part_bound(
    kind: &str,
    text_kinds: &[&str],
    model: &Model,
    param: &'static str,
) -> Result<u64, BadParam> {
    if text_kinds.contains(&kind) {
        return Ok(0);
    }
    model.content_part_tokens.get(kind).copied().ok_or_else(|| {
        bad(
            param,
            format!(
                "content parts of type `{}` are not served by `{}`: their token count cannot be bounded from the \
                 request (send text, or ask the operator to set a per-part bound)",
                if kind.is_empty() { "(none)" } else { kind },
                model.id
            ),
        )
    })
}

/// Responses API: stored state and hosted tools add input the body does not show; media parts need their bound.
fn responses_parts_bound(body: &Map<String, Value>, model: &Model) -> Result<u64, BadParam> {
    for (field, why) in [
        (
            "previous_response_id",
            "it continues a stored response whose input the gateway cannot see",
        ),
        (
            "conversation",
            "it continues a stored conversation whose input the gateway cannot see",
        ),
        (
            "prompt",
            "a stored prompt template adds input the gateway cannot see",
        ),
    ] {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            return Err(bad(
                field,
                format!("`{field}` is not served: {why}; send the whole input"),
            ));
        }
    }
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "background",
            "background responses are not served: the answer must be metered while it is delivered",
        ));
    }
    for tool in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if !matches!(kind, "function" | "custom") {
            return Err(bad(
                "tools",
                format!(
                    "hosted tools (`{kind}`) are not served: what they fetch adds input the gateway cannot bound"
                ),
            ));
        }
    }
    const TEXT: &[&str] = &[
        "input_text",
        "output_text",
        "text",
        "refusal",
        "summary_text",
        "reasoning_text",
    ];
    let mut extra = 0u64;
    for item in body
        .get("input")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if item.get("type").and_then(Value::as_str) == Some("item_reference") {
            return Err(bad(
                "input",
                "`item_reference` inputs are not served: they name stored items the gateway cannot see",
            ));
        }
        for part in item
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
            extra = extra.saturating_add(part_bound(kind, TEXT, model, "input")?);
        }
    }
    Ok(extra)
}

/// Anthropic Messages: server tools add input the body does not show; media blocks need their bound.
fn messages_parts_bound(body: &Map<String, Value>, model: &Model) -> Result<u64, BadParam> {
    for field in ["mcp_servers", "container"] {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            return Err(bad(
                field,
                format!(
                    "`{field}` is not served: what it fetches adds input the gateway cannot bound"
                ),
            ));
        }
    }
    for tool in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("custom");
        if ["web_search", "web_fetch", "code_execution"]
            .iter()
            .any(|p| kind.starts_with(p))
        {
            return Err(bad(
                "tools",
                format!(
                    "server tools (`{kind}`) are not served: what they fetch adds input the gateway cannot bound"
                ),
            ));
        }
    }
    const TEXT: &[&str] = &["text", "tool_use", "thinking", "redacted_thinking"];
    fn blocks(content: &Value, model: &Model, extra: &mut u64) -> Result<(), BadParam> {
        for block in content.as_array().into_iter().flatten() {
            let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
            if kind == "tool_result" {
                blocks(block.get("content").unwrap_or(&Value::Null), model, extra)?;
                continue;
            }
            *extra = extra.saturating_add(part_bound(kind, TEXT, model, "messages")?);
        }
        Ok(())
    }
    let mut extra = 0u64;
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(bad("messages", "`messages` must be an array of messages"));
    };
    for message in messages {
        blocks(
            message.get("content").unwrap_or(&Value::Null),
            model,
            &mut extra,
        )?;
    }
    blocks(
        body.get("system").unwrap_or(&Value::Null),
        model,
        &mut extra,
    )?;
    Ok(extra)
}

/// The Responses and Messages APIs have no `n` or length fields of their own besides their output field, but an
/// upstream that shares its request model with chat completions (vLLM's servers do) may still read the chat ones:
/// refused, so no field outside the API can multiply what is generated.
fn refuse_foreign_multipliers(body: &Map<String, Value>) -> Result<(), BadParam> {
    refuse_unbounded_fields(body)?;
    match body.get("n") {
        None | Some(Value::Null) => Ok(()),
        Some(v) if whole(v) == Some(1) => Ok(()),
        Some(_) => Err(bad(
            "n",
            "`n` is not part of this API: one answer per request (use /v1/chat/completions for several choices)",
        )),
    }
}

/// Fields that make an upstream generate more than `max_tokens × n`, or name a length the gateway does not bound.
fn refuse_unbounded_fields(body: &Map<String, Value>) -> Result<(), BadParam> {
    match body.get("best_of") {
        None | Some(Value::Null) => {}
        Some(v) if whole(v) == Some(1) => {}
        Some(_) => {
            return Err(bad(
                "best_of",
                "`best_of` is not served: it generates several candidates per choice that the gateway cannot bound",
            ));
        }
    }
    if body.get("use_beam_search").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "use_beam_search",
            "beam search is not served: it generates more candidates than the request's bound",
        ));
    }
    for field in ["max_new_tokens", "min_tokens"] {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            return Err(bad(
                field,
                format!("`{field}` is not served; limit the output with `max_completion_tokens`"),
            ));
        }
    }
    Ok(())
}

/// `n`: 1 unless the payer and the model allow more.
fn choices(body: &Map<String, Value>, model: &Model, payer: Payer) -> Result<u64, BadParam> {
    let n = match body.get("n") {
        None | Some(Value::Null) => return Ok(1),
        Some(v) => whole(v)
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("n", "`n` must be a positive integer"))?,
    };
    let allowed = match payer {
        Payer::Credit => model.max_choices,
        Payer::Subscription | Payer::PerRequest { .. } => 1,
    };
    if n > allowed {
        let why = match payer {
            Payer::Credit => format!("the model `{}` serves at most n = {allowed}", model.id),
            Payer::Subscription => "pool keys are served with n = 1".to_string(),
            Payer::PerRequest { .. } => "a per-request payment buys n = 1".to_string(),
        };
        return Err(bad("n", format!("`n` = {n} is not served: {why}")));
    }
    Ok(n)
}

/// The client's own output limit: the smaller of the two fields it may set (each must be a positive integer).
fn requested_output(body: &Map<String, Value>) -> Result<Option<u64>, BadParam> {
    let mut requested: Option<u64> = None;
    for field in ["max_tokens", "max_completion_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = whole(v)
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(field, format!("`{field}` must be a positive integer")))?;
                requested = Some(requested.map_or(n, |r| r.min(n)));
            }
        }
    }
    Ok(requested)
}

/// Writes the bound where the upstream reads it, removing the field it does not read (so it cannot read it).
pub(crate) fn write_output_limit(
    body: &mut Map<String, Value>,
    field: OutputLimitField,
    output: u64,
) {
    match field {
        OutputLimitField::Both => {
            body.insert("max_tokens".into(), json!(output));
            body.insert("max_completion_tokens".into(), json!(output));
        }
        OutputLimitField::MaxTokens => {
            body.insert("max_tokens".into(), json!(output));
            body.remove("max_completion_tokens");
        }
        OutputLimitField::MaxCompletionTokens => {
            body.insert("max_completion_tokens".into(), json!(output));
            body.remove("max_tokens");
        }
    }
}

/// The configured bound of every non-text content part of a chat request.
fn chat_parts_bound(body: &Map<String, Value>, model: &Model) -> Result<u64, BadParam> {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(bad(
            "messages",
            "`messages` must be an array of chat messages",
        ));
    };
    let mut extra: u64 = 0;
    for message in messages {
        for part in message
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
            extra = extra.saturating_add(part_bound(kind, TEXT_PARTS, model, "messages")?);
        }
    }
    Ok(extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn model(max_choices: u64) -> Model {
        Model {
            id: "m".into(),
            deployments: vec![crate::config::Deployment {
                upstream: 0,
                weight: 1,
                upstream_model: "m".into(),
            }],
            input_per_mtok: "0.60".parse().unwrap(),
            output_per_mtok: "2.50".parse().unwrap(),
            max_output_tokens: 100,
            per_request: None,
            upto: false,
            max_choices,
            content_part_tokens: BTreeMap::from([("image_url".to_string(), 1000)]),
        }
    }

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn run(v: Value, payer: Payer) -> Result<(Bound, Map<String, Value>), BoundError> {
        let mut b = body(v);
        let len = serde_json::to_vec(&b).unwrap().len();
        let bound = bound_request(
            Api::Chat,
            &mut b,
            len,
            &model(4),
            OutputLimitField::Both,
            payer,
        )?;
        Ok((bound, b))
    }

    #[test]
    fn the_smaller_field_wins_and_both_are_written() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let (b, out) = run(
            json!({"messages": msgs, "max_tokens": 1, "max_completion_tokens": 100000}),
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(b.output_tokens_per_choice, 1);
        assert_eq!(out["max_tokens"], 1);
        assert_eq!(out["max_completion_tokens"], 1);
        let (b, out) = run(
            json!({"messages": msgs, "max_completion_tokens": 100000}),
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(b.output_tokens_per_choice, 100, "capped by the model");
        assert_eq!(out["max_tokens"], 100);
        let (b, _) = run(json!({"messages": msgs}), Payer::Credit).unwrap();
        assert_eq!(b.output_tokens_per_choice, 100, "the cap when none is set");
    }

    #[test]
    fn one_field_upstreams_lose_the_other_field() {
        let mut b = body(json!({"messages": [], "max_tokens": 5, "max_completion_tokens": 9}));
        bound_request(
            Api::Chat,
            &mut b,
            10,
            &model(1),
            OutputLimitField::MaxTokens,
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(b["max_tokens"], 5);
        assert!(!b.contains_key("max_completion_tokens"));
        let mut b = body(json!({"messages": [], "max_tokens": 5}));
        bound_request(
            Api::Chat,
            &mut b,
            10,
            &model(1),
            OutputLimitField::MaxCompletionTokens,
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(b["max_completion_tokens"], 5);
        assert!(!b.contains_key("max_tokens"));
    }

    #[test]
    fn n_is_priced_for_credit_and_refused_elsewhere() {
        let msgs = json!([]);
        let (b, _) = run(
            json!({"messages": msgs, "n": 3, "max_tokens": 10}),
            Payer::Credit,
        )
        .unwrap();
        assert_eq!((b.choices, b.output_tokens()), (3, 30));
        let e = run(json!({"messages": msgs, "n": 5}), Payer::Credit).unwrap_err();
        assert!(matches!(e, BoundError::Param(BadParam { param: "n", .. })));
        let e = run(json!({"messages": msgs, "n": 2}), Payer::Subscription).unwrap_err();
        assert!(matches!(e, BoundError::Param(BadParam { param: "n", .. })));
        for bad_n in [json!(0), json!(-1), json!(1.5), json!("2")] {
            let e = run(json!({"messages": msgs, "n": bad_n}), Payer::Credit).unwrap_err();
            assert!(matches!(e, BoundError::Param(BadParam { param: "n", .. })));
        }
        let e = run(json!({"messages": msgs, "best_of": 4}), Payer::Credit).unwrap_err();
        assert!(matches!(
            e,
            BoundError::Param(BadParam {
                param: "best_of",
                ..
            })
        ));
    }

    #[test]
    fn non_text_parts_need_a_configured_bound() {
        let img = json!({"type": "image_url", "image_url": {"url": "https://x/y.png"}});
        let audio =
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}});
        let (b, _) = run(
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, img, img]}]}),
            Payer::Credit,
        )
        .unwrap();
        assert!(b.prompt_tokens > 2000, "two images at 1000 each: {b:?}");
        let e = run(
            json!({"messages": [{"role": "user", "content": [audio]}]}),
            Payer::Credit,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            BoundError::Param(BadParam {
                param: "messages",
                ..
            })
        ));
    }

    fn run_api(
        api: Api,
        v: Value,
        payer: Payer,
    ) -> Result<(Bound, Map<String, Value>), BoundError> {
        let mut b = body(v);
        let len = serde_json::to_vec(&b).unwrap().len();
        let bound = bound_request(api, &mut b, len, &model(4), OutputLimitField::Both, payer)?;
        Ok((bound, b))
    }

    fn refused_param(r: Result<(Bound, Map<String, Value>), BoundError>) -> &'static str {
        match r {
            Err(BoundError::Param(p)) => p.param,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn completions_reserve_every_prompt_times_n_with_openais_default_length() {
        let (b, out) = run_api(Api::Completions, json!({"prompt": "hi"}), Payer::Credit).unwrap();
        assert_eq!(
            (b.choices, b.output_tokens_per_choice),
            (1, COMPLETIONS_DEFAULT_MAX_TOKENS)
        );
        assert_eq!(out["max_tokens"], 16);
        let (b, _) = run_api(
            Api::Completions,
            json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 50, "max_completion_tokens": 7}),
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(
            (b.choices, b.output_tokens()),
            (4, 28),
            "the smaller field, 2 prompts × n = 2"
        );
        assert_eq!(
            refused_param(run_api(
                Api::Completions,
                json!({"prompt": ["a", "b", "c"], "n": 2}),
                Payer::Credit
            )),
            "prompt",
            "6 completions > max_choices 4"
        );
        assert_eq!(
            refused_param(run_api(
                Api::Completions,
                json!({"prompt": ["a", "b"]}),
                Payer::Subscription
            )),
            "prompt"
        );
        let (b, _) = run_api(
            Api::Completions,
            json!({"prompt": [1, 2, 3]}),
            Payer::Subscription,
        )
        .unwrap();
        assert_eq!(b.choices, 1, "token ids are one prompt");
        assert_eq!(
            refused_param(run_api(
                Api::Completions,
                json!({"prompt": "x", "best_of": 3}),
                Payer::Credit
            )),
            "best_of"
        );
    }

    #[test]
    fn responses_and_messages_write_their_own_field_and_refuse_foreign_multipliers() {
        let (b, out) = run_api(
            Api::Responses,
            json!({"input": "hi", "max_output_tokens": 100000, "max_tokens": 5, "max_completion_tokens": 5}),
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(
            b.output_tokens(),
            100,
            "capped by the model, whatever other fields say"
        );
        assert_eq!(out["max_output_tokens"], 100);
        assert!(!out.contains_key("max_tokens") && !out.contains_key("max_completion_tokens"));
        for (field, value) in [
            ("previous_response_id", json!("resp_1")),
            ("conversation", json!("conv_1")),
            ("background", json!(true)),
            ("n", json!(3)),
            ("best_of", json!(2)),
            ("tools", json!([{"type": "web_search"}])),
        ] {
            let mut v = json!({"input": "hi"});
            v[field] = value;
            assert_eq!(
                refused_param(run_api(Api::Responses, v, Payer::Credit)),
                field
            );
        }
        assert_eq!(
            refused_param(run_api(
                Api::Responses,
                json!({"input": [{"type": "item_reference", "id": "x"}]}),
                Payer::Credit
            )),
            "input"
        );
        assert_eq!(
            refused_param(run_api(
                Api::Messages,
                json!({"messages": []}),
                Payer::Credit
            )),
            "max_tokens"
        );
        let (b, out) = run_api(
            Api::Messages,
            json!({"messages": [], "max_tokens": 7, "max_completion_tokens": 9000}),
            Payer::Credit,
        )
        .unwrap();
        assert_eq!(b.output_tokens(), 7);
        assert!(!out.contains_key("max_completion_tokens"));
        assert_eq!(
            refused_param(run_api(
                Api::Messages,
                json!({"messages": [], "max_tokens": 7, "n": 4}),
                Payer::Credit
            )),
            "n"
        );
        let image = json!({"type": "image", "source": {"type": "url", "url": "https://x/y.png"}});
        assert_eq!(
            refused_param(run_api(
                Api::Messages,
                json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [image]}]}],
                       "max_tokens": 7}),
                Payer::Credit
            )),
            "messages",
            "an image inside a tool result needs a bound too"
        );
    }

    #[test]
    fn embeddings_reserve_the_prompt_only_and_a_price_must_cover_it() {
        let (b, _) = run_api(Api::Embeddings, json!({"input": "hi"}), Payer::Credit).unwrap();
        assert_eq!(b.output_tokens(), 0);
        assert!(b.prompt_tokens > TEMPLATE_TOKEN_MARGIN);
        let long = "word ".repeat(5000);
        let e = run_api(
            Api::Embeddings,
            json!({"input": long}),
            Payer::PerRequest {
                price: "0.0001".parse().unwrap(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, BoundError::Unaffordable { .. }));
    }

    #[test]
    fn a_per_request_price_buys_the_prompt_first() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        // 0.001 USDC: the ~300-token prompt bound costs ≈ 0.00018, the rest buys (0.001 − that) / 2.5e-6 tokens,
        // more than the model's cap of 100.
        let (b, _) = run(
            json!({"messages": msgs}),
            Payer::PerRequest {
                price: "0.001".parse().unwrap(),
            },
        )
        .unwrap();
        assert_eq!(b.output_tokens_per_choice, 100);
        // 0.0002 USDC: the prompt bound takes almost all of it.
        let (b, _) = run(
            json!({"messages": msgs}),
            Payer::PerRequest {
                price: "0.0002".parse().unwrap(),
            },
        )
        .unwrap();
        assert!(b.output_tokens_per_choice < 100 && b.output_tokens_per_choice > 0);
        let prices = Prices {
            input_per_mtok: "0.60".parse().unwrap(),
            output_per_mtok: "2.50".parse().unwrap(),
        };
        assert!(b.cost(&prices) <= "0.0002".parse().unwrap());
        // A long prompt the price cannot cover: the amount it needs.
        let long = "word ".repeat(2000);
        let e = run(
            json!({"messages": [{"role": "user", "content": long}]}),
            Payer::PerRequest {
                price: "0.0002".parse().unwrap(),
            },
        )
        .unwrap_err();
        let BoundError::Unaffordable { needed, .. } = e else {
            panic!("{e:?}")
        };
        assert!(needed > "0.0002".parse().unwrap());
    }
}
