//! Anthropic Messages ⇄ OpenAI chat completions, for upstreams that do not serve `/v1/messages`.
//!
//! This module owns the wire translation only — pure functions and one stateful stream translator, no I/O:
//!
//! * [`request_to_chat`]: a client's Messages request → a chat-completions request. What has no faithful chat
//!   equivalent is refused with a [`BadParam`] naming the Anthropic parameter (documents, server tools, images in
//!   tool results or assistant turns, unknown block types or parameters), because a silently degraded prompt is
//!   billed like a good one. Hints that do not change what the model produces are dropped: `cache_control`,
//!   `thinking` blocks in past turns and the `thinking` / `service_tier` parameters (the chat model reasons or not
//!   on its own; its reasoning is never returned as a thinking block, which would need Anthropic's signature).
//! * [`response_from_chat`]: a chat-completions JSON answer → an Anthropic `Message`.
//! * [`StreamTranslator`]: a chat-completions SSE stream → Anthropic's event sequence.
//! * [`error_body`] / [`error_type`]: Anthropic's error shape and its error type per HTTP status.
//!
//! Only choice index 0 of an answer is translated: the request never asks for more (Messages has no `n`), so
//! other choices can only come from an upstream that ignored that, and they are dropped.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::proxy::BadParam;

fn bad(param: &'static str, message: impl Into<String>) -> BadParam {
    BadParam {
        param,
        message: message.into(),
    }
}

/// Top-level Messages parameters that are translated (or knowingly dropped, see the module doc).
const KNOWN_PARAMS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "stream",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
];

/// Client Messages request (a JSON object) → chat-completions request object. `max_tokens` copied as `max_tokens`
/// (the gateway's bound rewrites it later). Errors name the Anthropic parameter.
pub fn request_to_chat(body: &Map<String, Value>) -> Result<Map<String, Value>, BadParam> {
    if let Some(unknown) = body.keys().find(|k| !KNOWN_PARAMS.contains(&k.as_str())) {
        return Err(bad(
            "body",
            format!(
                "`{unknown}` is not supported by this model's upstream (it has no chat-completions equivalent)"
            ),
        ));
    }
    let mut chat = Map::new();
    match body.get("model") {
        Some(Value::String(m)) => {
            chat.insert("model".into(), json!(m));
        }
        _ => return Err(bad("model", "`model` must be a string")),
    }
    match body.get("max_tokens") {
        // A whole number (`16.0` too: JSON Schema's integers include it), forwarded as an integer.
        Some(Value::Number(n)) if whole(n).is_some_and(|n| n >= 1) => {
            chat.insert("max_tokens".into(), json!(whole(n)));
        }
        None | Some(Value::Null) => return Err(bad("max_tokens", "`max_tokens` is required")),
        Some(_) => return Err(bad("max_tokens", "`max_tokens` must be a positive integer")),
    }

    let mut messages = Vec::new();
    match body.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for b in blocks {
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    _ => return Err(bad("system", "`system` blocks must be text blocks")),
                }
            }
            // One system message: chat templates take a single system turn, and text blocks are one prompt.
            messages.push(json!({"role": "system", "content": texts.join("\n")}));
        }
        Some(_) => {
            return Err(bad(
                "system",
                "`system` must be a string or an array of text blocks",
            ));
        }
    }
    let Some(Value::Array(input)) = body.get("messages") else {
        return Err(bad("messages", "`messages` must be an array of messages"));
    };
    for m in input {
        translate_message(m, &mut messages)?;
    }
    chat.insert("messages".into(), Value::Array(messages));

    match body.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(s)) if s.iter().all(Value::is_string) => {
            chat.insert("stop".into(), Value::Array(s.clone()));
        }
        Some(_) => {
            return Err(bad(
                "stop_sequences",
                "`stop_sequences` must be an array of strings",
            ));
        }
    }
    for param in ["temperature", "top_p", "top_k"] {
        match body.get(param) {
            None | Some(Value::Null) => {}
            Some(v @ Value::Number(_)) => {
                chat.insert(param.into(), v.clone());
            }
            Some(_) => return Err(bad(param, format!("`{param}` must be a number"))),
        }
    }
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(meta)) => match meta.get("user_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(u)) => {
                chat.insert("user".into(), json!(u));
            }
            Some(_) => return Err(bad("metadata", "`metadata.user_id` must be a string")),
        },
        Some(_) => return Err(bad("metadata", "`metadata` must be an object")),
    }
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            chat.insert("stream".into(), json!(true));
            // The final usage is what `message_delta` reports (and what the gateway meters).
            chat.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Some(_) => return Err(bad("stream", "`stream` must be a boolean")),
    }
    match body.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            let mut out = Vec::with_capacity(tools.len());
            for t in tools {
                out.push(translate_tool(t)?);
            }
            chat.insert("tools".into(), Value::Array(out));
        }
        Some(_) => return Err(bad("tools", "`tools` must be an array")),
    }
    match body.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(choice) => {
            let kind = choice.get("type").and_then(Value::as_str);
            let mapped = match kind {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => match choice.get("name") {
                    Some(Value::String(name)) => {
                        json!({"type": "function", "function": {"name": name}})
                    }
                    _ => {
                        return Err(bad(
                            "tool_choice",
                            "`tool_choice.name` must be a string when `type` is `tool`",
                        ));
                    }
                },
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "`tool_choice.type` must be `auto`, `any`, `tool` or `none`",
                    ));
                }
            };
            chat.insert("tool_choice".into(), mapped);
            match choice.get("disable_parallel_tool_use") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => {
                    chat.insert("parallel_tool_calls".into(), json!(false));
                }
                Some(_) => {
                    return Err(bad(
                        "tool_choice",
                        "`tool_choice.disable_parallel_tool_use` must be a boolean",
                    ));
                }
            }
        }
    }
    Ok(chat)
}

fn translate_tool(t: &Value) -> Result<Value, BadParam> {
    // Server tools (web search, bash, text editor, …) carry a versioned `type` and run on Anthropic's side.
    match t.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "custom" => {}
        Some(Value::String(other)) => {
            return Err(bad(
                "tools",
                format!(
                    "tool type `{other}` runs on Anthropic's servers and is not available here"
                ),
            ));
        }
        Some(_) => return Err(bad("tools", "a tool's `type` must be a string")),
    }
    let Some(Value::String(name)) = t.get("name") else {
        return Err(bad("tools", "each tool needs a string `name`"));
    };
    let schema = match t.get("input_schema") {
        Some(s @ Value::Object(_)) => s.clone(),
        _ => {
            return Err(bad(
                "tools",
                format!("tool `{name}` needs an object `input_schema`"),
            ));
        }
    };
    let mut function = Map::new();
    function.insert("name".into(), json!(name));
    match t.get("description") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) => {
            function.insert("description".into(), json!(d));
        }
        Some(_) => {
            return Err(bad(
                "tools",
                format!("tool `{name}`: `description` must be a string"),
            ));
        }
    }
    function.insert("parameters".into(), schema);
    Ok(json!({"type": "function", "function": function}))
}

/// The chat `image_url` part of an Anthropic `image` block.
fn image_part(block: &Value) -> Result<Value, BadParam> {
    let source = &block["source"];
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => match (source.get("media_type"), source.get("data")) {
            (Some(Value::String(media)), Some(Value::String(data))) => {
                format!("data:{media};base64,{data}")
            }
            _ => {
                return Err(bad(
                    "messages",
                    "a base64 image source needs string `media_type` and `data`",
                ));
            }
        },
        Some("url") => match source.get("url") {
            Some(Value::String(u)) => u.clone(),
            _ => return Err(bad("messages", "a url image source needs a string `url`")),
        },
        _ => {
            return Err(bad(
                "messages",
                "image `source.type` must be `base64` or `url` (file references are not available here)",
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// The text of a `tool_result`'s `content`: a string or text blocks.
fn tool_result_text(block: &Value) -> Result<String, BadParam> {
    match block.get("content") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    _ => {
                        return Err(bad(
                            "messages",
                            "`tool_result` content can only be text here (chat tool messages carry no images)",
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(bad(
            "messages",
            "`tool_result.content` must be a string or text blocks",
        )),
    }
}

/// `n` as a whole non-negative number: an integer, or a float without a fraction below 2^53.
fn whole(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9_007_199_254_740_992.0)
            .map(|f| f as u64)
    })
}

fn block_type(block: &Value) -> Result<&str, BadParam> {
    block
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("messages", "every content block needs a string `type`"))
}

/// Appends the chat messages of one Anthropic message to `out`.
fn translate_message(m: &Value, out: &mut Vec<Value>) -> Result<(), BadParam> {
    let role = match m.get("role") {
        Some(Value::String(r)) if r == "user" || r == "assistant" => r.as_str(),
        Some(Value::String(r)) => {
            return Err(bad(
                "messages",
                format!(
                    "message role `{r}` is not `user` or `assistant` (the system prompt goes in `system`)"
                ),
            ));
        }
        _ => return Err(bad("messages", "every message needs a string `role`")),
    };
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(bad(
                "messages",
                "message `content` must be a string or an array of content blocks",
            ));
        }
    };
    if role == "assistant" {
        let mut texts = Vec::new();
        let mut calls = Vec::new();
        for b in blocks {
            match block_type(b)? {
                "text" => match b.get("text") {
                    Some(Value::String(t)) => texts.push(json!({"type": "text", "text": t})),
                    _ => return Err(bad("messages", "a `text` block needs a string `text`")),
                },
                "tool_use" => {
                    let (Some(Value::String(id)), Some(Value::String(name))) =
                        (b.get("id"), b.get("name"))
                    else {
                        return Err(bad(
                            "messages",
                            "a `tool_use` block needs string `id` and `name`",
                        ));
                    };
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({
                        "id": id, "type": "function",
                        "function": {"name": name, "arguments": input.to_string()},
                    }));
                }
                // Past reasoning is not replayed: a chat model cannot check Anthropic's signature.
                "thinking" | "redacted_thinking" => {}
                other => {
                    return Err(bad(
                        "messages",
                        format!(
                            "`{other}` blocks in assistant messages cannot be translated to chat completions"
                        ),
                    ));
                }
            }
        }
        let mut msg = Map::new();
        msg.insert("role".into(), json!("assistant"));
        // A single text block stays a plain string: every chat template accepts that form.
        let content = match texts.len() {
            0 => Value::Null,
            1 => texts[0]["text"].clone(),
            _ => Value::Array(texts),
        };
        msg.insert("content".into(), content);
        if !calls.is_empty() {
            msg.insert("tool_calls".into(), Value::Array(calls));
        }
        out.push(Value::Object(msg));
        return Ok(());
    }
    // A user turn: tool results become `tool` messages, in order, before the user's remaining content.
    let mut parts = Vec::new();
    for b in blocks {
        match block_type(b)? {
            "text" => match b.get("text") {
                Some(Value::String(t)) => parts.push(json!({"type": "text", "text": t})),
                _ => return Err(bad("messages", "a `text` block needs a string `text`")),
            },
            "image" => parts.push(image_part(b)?),
            "tool_result" => {
                let Some(Value::String(id)) = b.get("tool_use_id") else {
                    return Err(bad(
                        "messages",
                        "a `tool_result` block needs a string `tool_use_id`",
                    ));
                };
                out.push(
                    json!({"role": "tool", "tool_call_id": id, "content": tool_result_text(b)?}),
                );
            }
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(bad(
                    "messages",
                    format!("`{other}` content blocks are not supported by this model's upstream"),
                ));
            }
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

/// `msg_…` from a chat completion id (`chatcmpl-abc` → `msg_abc`), so logs of both sides can be matched.
fn message_id(chat_id: Option<&str>) -> String {
    match chat_id {
        Some(id) if !id.is_empty() => {
            format!("msg_{}", id.strip_prefix("chatcmpl-").unwrap_or(id))
        }
        _ => "msg_gateway".to_string(),
    }
}

/// Anthropic's `stop_reason` and `stop_sequence` for a chat choice. vLLM reports the matched stop string in the
/// choice's `stop_reason` (a token id there is an EOS-like stop token, not a stop sequence).
fn stop_of(finish_reason: Option<&str>, matched: Option<&str>) -> (&'static str, Value) {
    match finish_reason {
        Some("length") => ("max_tokens", Value::Null),
        Some("tool_calls") | Some("function_call") => ("tool_use", Value::Null),
        Some("content_filter") => ("refusal", Value::Null),
        Some("stop") if matched.is_some() => ("stop_sequence", json!(matched)),
        _ => ("end_turn", Value::Null),
    }
}

/// A tool call's `arguments` text as a `tool_use` input. Arguments that are not a JSON object (the model wrote
/// broken JSON) become `{}`: Anthropic's `input` must be an object, and an empty one makes the client's tool
/// validation report the missing fields back to the model, which is how such a turn recovers.
fn tool_input(arguments: Option<&Value>) -> Value {
    match arguments {
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({}),
        },
        Some(v @ Value::Object(_)) => v.clone(),
        _ => json!({}),
    }
}

fn usage_tokens(usage: &Value) -> (u64, u64) {
    (
        usage["prompt_tokens"].as_u64().unwrap_or(0),
        usage["completion_tokens"].as_u64().unwrap_or(0),
    )
}

/// Chat-completions JSON answer → Anthropic Message JSON. `model`: the model id the client asked for.
pub fn response_from_chat(chat: &Value, model: &str) -> Value {
    let choice = chat["choices"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["index"].as_u64().unwrap_or(0) == 0)
                .or(c.first())
        })
        .cloned()
        .unwrap_or(Value::Null);
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for (i, call) in message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let id = match call["id"].as_str() {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("toolu_{i}"),
        };
        content.push(json!({
            "type": "tool_use", "id": id,
            "name": call["function"]["name"].as_str().unwrap_or(""),
            "input": tool_input(call["function"].get("arguments")),
        }));
    }
    let (stop_reason, stop_sequence) = stop_of(
        choice["finish_reason"].as_str(),
        choice["stop_reason"].as_str(),
    );
    let (input_tokens, output_tokens) = usage_tokens(&chat["usage"]);
    json!({
        "id": message_id(chat["id"].as_str()),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    })
}

/// The content block open in the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// A tool call of this chat `tool_calls[].index`.
    Tool(u64),
}

/// Stateful translator of a chat-completions SSE stream into Anthropic's event sequence.
///
/// Block indexes are assigned in order of appearance: text, then one `tool_use` block per tool call index. An
/// upstream that interleaves the argument deltas of parallel tool calls (none known does; vLLM and OpenAI send
/// them one call after the other) gets its late deltas sent to the block of their call, already stopped: the
/// Anthropic SDKs accumulate deltas by block index, so the arguments still arrive whole.
#[derive(Debug)]
pub struct StreamTranslator {
    model: String,
    /// `message_start` was sent.
    started: bool,
    /// `message_stop` (or an `error` event) was sent: nothing more is.
    ended: bool,
    open: Option<(usize, Open)>,
    next_block: usize,
    /// Block index of each chat tool call index seen.
    tool_blocks: Vec<(u64, usize)>,
    finish_reason: Option<String>,
    matched_stop: Option<String>,
    usage: Option<(u64, u64)>,
    /// Chunks of choice 0 that carried output: the `output_tokens` reported when the upstream sent no usage.
    output_chunks: u64,
}

fn event(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// The `data` of each SSE event in `bytes` (its `data:` lines joined; events without data skipped).
fn sse_data(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

impl StreamTranslator {
    pub fn new(model: &str) -> Self {
        StreamTranslator {
            model: model.to_string(),
            started: false,
            ended: false,
            open: None,
            next_block: 0,
            tool_blocks: Vec::new(),
            finish_reason: None,
            matched_stop: None,
            usage: None,
            output_chunks: 0,
        }
    }

    /// Takes bytes holding zero or more COMPLETE SSE events of the chat stream and returns the Anthropic SSE bytes
    /// to send now (`event: NAME\ndata: {json}\n\n` each).
    pub fn translate(&mut self, events: &[u8]) -> Bytes {
        let mut out = Vec::new();
        for data in sse_data(events) {
            if self.ended {
                break;
            }
            if data.trim() == "[DONE]" {
                self.end(&mut out);
                continue;
            }
            // A line that is not JSON is not something a client could use; skipping it keeps the stream valid.
            let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            self.chunk(&chunk, &mut out);
        }
        Bytes::from(out)
    }

    /// The upstream stream ended without `[DONE]`. When the answer was complete anyway (its `finish_reason` and
    /// usage arrived) the stream is closed normally; otherwise the client gets an `error` event (`api_error`), as
    /// Anthropic itself sends when a stream fails after the 200: a truncated answer must not look like a finished
    /// one (no `message_stop`). Nothing once the stream was already closed.
    pub fn finish(&mut self) -> Bytes {
        if self.ended {
            return Bytes::new();
        }
        let mut out = Vec::new();
        if self.finish_reason.is_some() && self.usage.is_some() {
            self.end(&mut out);
        } else {
            self.ended = true;
            event(
                &mut out,
                "error",
                &error_body(
                    "api_error",
                    "the upstream model server ended the stream early",
                ),
            );
        }
        Bytes::from(out)
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let input_tokens = chunk["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        let message = json!({
            "id": message_id(chunk["id"].as_str()),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        });
        event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
        event(out, "ping", &json!({"type": "ping"}));
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Opens a block of `kind` (closing the open one) unless it is the open one; returns its index.
    fn open_block(&mut self, kind: Open, block: Value, out: &mut Vec<u8>) -> usize {
        if let Some((index, open)) = self.open
            && open == kind
        {
            return index;
        }
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((index, kind));
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if let Some(err) = chunk.get("error").filter(|e| !e.is_null()) {
            let kind = err["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .map_or("api_error", error_type);
            let message = err["message"]
                .as_str()
                .unwrap_or("the upstream model server failed");
            event(out, "error", &error_body(kind, message));
            self.ended = true;
            return;
        }
        self.start(chunk, out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage_tokens(usage));
        }
        let Some(choice) = chunk["choices"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["index"].as_u64().unwrap_or(0) == 0))
        else {
            return;
        };
        let delta = &choice["delta"];
        let mut carried_output = false;
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            carried_output = true;
            let index = self.open_block(Open::Text, json!({"type": "text", "text": ""}), out);
            event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let tool = call["index"].as_u64().unwrap_or(0);
            let index = match self.tool_blocks.iter().find(|(t, _)| *t == tool) {
                Some(&(_, index)) => index,
                None => {
                    let id = match call["id"].as_str() {
                        Some(id) if !id.is_empty() => id.to_string(),
                        _ => format!("toolu_{tool}"),
                    };
                    let name = call["function"]["name"].as_str().unwrap_or("");
                    let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
                    let index = self.open_block(Open::Tool(tool), block, out);
                    self.tool_blocks.push((tool, index));
                    index
                }
            };
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                carried_output = true;
                event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
        let reasoning = ["reasoning_content", "reasoning"]
            .iter()
            .any(|k| delta[k].as_str().is_some_and(|r| !r.is_empty()));
        if carried_output || reasoning {
            self.output_chunks += 1;
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_string());
            self.matched_stop = choice["stop_reason"].as_str().map(str::to_string);
            self.close_block(out);
        }
    }

    /// `message_delta` (stop reason, usage) and `message_stop`, once.
    fn end(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if !self.started {
            self.start(&Value::Null, out);
        }
        self.close_block(out);
        let (stop_reason, stop_sequence) =
            stop_of(self.finish_reason.as_deref(), self.matched_stop.as_deref());
        let (input_tokens, output_tokens) = self.usage.unwrap_or((0, self.output_chunks));
        event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}),
        );
        event(out, "message_stop", &json!({"type": "message_stop"}));
        self.ended = true;
    }
}

/// Anthropic's error body `{"type":"error","error":{"type": kind,"message": message}}`.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Anthropic's error type for an HTTP status, as its API documents them (and its SDKs' `ErrorType` lists them):
/// 502 has no type of its own and is `api_error` (an unexpected server-side failure); 503 is what the gateway
/// answers when no deployment can take the request, which is Anthropic's `overloaded_error` (retry later); 504 is
/// `timeout_error`; other 4xx are `invalid_request_error`, other 5xx `api_error`.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn to_chat(v: Value) -> Value {
        Value::Object(request_to_chat(&obj(v)).unwrap())
    }

    fn refused(v: Value) -> BadParam {
        request_to_chat(&obj(v)).unwrap_err()
    }

    #[test]
    fn system_string_and_blocks_come_first() {
        let chat = to_chat(json!({
            "model": "m", "max_tokens": 10, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hi"}],
        }));
        assert_eq!(
            chat,
            json!({"model": "m", "max_tokens": 10, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]})
        );
        let chat = to_chat(json!({
            "model": "m", "max_tokens": 10,
            "system": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        }));
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "One.\nTwo."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ])
        );
    }

    #[test]
    fn images_from_base64_and_url() {
        let chat = to_chat(
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                {"type": "text", "text": "What are these?"},
            ]}]}),
        );
        assert_eq!(
            chat["messages"][0]["content"],
            json!([
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                {"type": "text", "text": "What are these?"},
            ])
        );
        let e = refused(
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f_1"}}]}]}),
        );
        assert_eq!(e.param, "messages");
    }

    #[test]
    fn tool_use_round_trip() {
        let chat = to_chat(json!({
            "model": "m", "max_tokens": 100,
            "tools": [{"name": "get_weather", "description": "Weather of a city",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "two calls", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "21C"}], "is_error": false},
                    {"type": "text", "text": "Which is warmer?"},
                ]},
            ],
        }));
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
        );
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "21C"},
                {"role": "user", "content": [{"type": "text", "text": "Which is warmer?"}]},
            ])
        );
        // An assistant turn of tool calls only has null content, as chat expects.
        let chat = to_chat(json!({"model": "m", "max_tokens": 1, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}));
        assert_eq!(chat["messages"][0]["content"], Value::Null);
        assert_eq!(
            chat["messages"][0]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
    }

    #[test]
    fn tool_choice_each_form() {
        let choice = |c: Value| {
            let chat =
                to_chat(json!({"model": "m", "max_tokens": 1, "messages": [], "tool_choice": c}));
            (
                chat["tool_choice"].clone(),
                chat.get("parallel_tool_calls").cloned(),
            )
        };
        assert_eq!(choice(json!({"type": "auto"})), (json!("auto"), None));
        assert_eq!(choice(json!({"type": "any"})), (json!("required"), None));
        assert_eq!(choice(json!({"type": "none"})), (json!("none"), None));
        assert_eq!(
            choice(json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})),
            (
                json!({"type": "function", "function": {"name": "f"}}),
                Some(json!(false))
            )
        );
        let e = refused(
            json!({"model": "m", "max_tokens": 1, "messages": [], "tool_choice": {"type": "tool"}}),
        );
        assert_eq!(e.param, "tool_choice");
        let e =
            refused(json!({"model": "m", "max_tokens": 1, "messages": [], "tool_choice": "auto"}));
        assert_eq!(e.param, "tool_choice");
    }

    #[test]
    fn sampling_stop_metadata_and_stream() {
        let chat = to_chat(json!({
            "model": "m", "max_tokens": 5, "messages": [],
            "stop_sequences": ["\n\nHuman:"], "temperature": 0.5, "top_p": 0.9, "top_k": 40,
            "metadata": {"user_id": "agent-7"}, "stream": true,
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "service_tier": "auto",
        }));
        assert_eq!(
            chat,
            json!({"model": "m", "max_tokens": 5, "messages": [], "stop": ["\n\nHuman:"],
                   "temperature": 0.5, "top_p": 0.9, "top_k": 40, "user": "agent-7",
                   "stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn refusals_name_the_parameter() {
        let base = |extra: Value| {
            let mut b = obj(json!({"model": "m", "max_tokens": 1, "messages": []}));
            b.extend(obj(extra));
            request_to_chat(&b).unwrap_err()
        };
        let doc = json!({"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]});
        let e = base(doc);
        assert_eq!(e.param, "messages");
        assert!(e.message.contains("document"), "{}", e.message);
        assert_eq!(
            base(json!({"messages": [{"role": "user", "content": [{"type": "mystery"}]}]})).param,
            "messages"
        );
        assert_eq!(
            base(json!({"messages": [{"role": 1, "content": "x"}]})).param,
            "messages"
        );
        assert_eq!(
            base(json!({"messages": [{"role": "system", "content": "x"}]})).param,
            "messages"
        );
        assert_eq!(base(json!({"messages": "hi"})).param, "messages");
        assert_eq!(base(json!({"system": 5})).param, "system");
        assert_eq!(base(json!({"max_tokens": 0})).param, "max_tokens");
        assert_eq!(base(json!({"max_tokens": null})).param, "max_tokens");
        assert_eq!(base(json!({"stop_sequences": "x"})).param, "stop_sequences");
        assert_eq!(base(json!({"temperature": "hot"})).param, "temperature");
        assert_eq!(base(json!({"stream": "yes"})).param, "stream");
        assert_eq!(
            base(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})).param,
            "tools"
        );
        assert_eq!(base(json!({"tools": [{"name": "f"}]})).param, "tools");
        assert_eq!(base(json!({"mcp_servers": []})).param, "body");
        let tool_image = json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
            "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]});
        assert_eq!(base(tool_image).param, "messages");
        let assistant_image = json!({"messages": [{"role": "assistant", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]});
        assert_eq!(base(assistant_image).param, "messages");
        let no_model = request_to_chat(&obj(json!({"max_tokens": 1, "messages": []}))).unwrap_err();
        assert_eq!(no_model.param, "model");
    }

    #[test]
    fn response_text_and_usage() {
        let chat = json!({
            "id": "chatcmpl-abc123", "object": "chat.completion", "created": 0, "model": "upstream-name",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there", "reasoning_content": "hm"},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
        });
        assert_eq!(
            response_from_chat(&chat, "claude-like"),
            json!({"id": "msg_abc123", "type": "message", "role": "assistant", "model": "claude-like",
                   "content": [{"type": "text", "text": "Hello there"}],
                   "stop_reason": "max_tokens", "stop_sequence": null,
                   "usage": {"input_tokens": 12, "output_tokens": 2}})
        );
    }

    #[test]
    fn response_tool_calls_and_stop_reasons() {
        let chat = json!({
            "id": "chatcmpl-x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "broken", "arguments": "{\"city\": "}},
            ]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 20},
        });
        let msg = response_from_chat(&chat, "m");
        assert_eq!(
            msg["content"],
            json!([
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "broken", "input": {}},
            ])
        );
        assert_eq!(msg["stop_reason"], "tool_use");
        let with = |finish: Value, stop_reason: Value| {
            let chat = json!({"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"content": "a"},
                "finish_reason": finish, "stop_reason": stop_reason}]});
            let m = response_from_chat(&chat, "m");
            (m["stop_reason"].clone(), m["stop_sequence"].clone())
        };
        assert_eq!(
            with(json!("stop"), Value::Null),
            (json!("end_turn"), Value::Null)
        );
        // vLLM names the stop string it matched; a token id is an end-of-turn token, not a stop sequence.
        assert_eq!(
            with(json!("stop"), json!("END")),
            (json!("stop_sequence"), json!("END"))
        );
        assert_eq!(
            with(json!("stop"), json!(128009)),
            (json!("end_turn"), Value::Null)
        );
        assert_eq!(
            with(json!("length"), Value::Null),
            (json!("max_tokens"), Value::Null)
        );
        // No usage and no choices still gives a well-formed message.
        let m = response_from_chat(&json!({}), "m");
        assert_eq!(m["content"], json!([]));
        assert_eq!(m["usage"], json!({"input_tokens": 0, "output_tokens": 0}));
        assert_eq!(m["id"], "msg_gateway");
    }

    #[test]
    fn error_types_and_body() {
        let cases = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (409, "invalid_request_error"),
            (413, "request_too_large"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
        ];
        for (status, kind) in cases {
            assert_eq!(error_type(status), kind, "{status}");
        }
        assert_eq!(
            error_body("rate_limit_error", "slow down"),
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
        );
    }

    /// Parses Anthropic SSE bytes into (event name, data) pairs, checking each event's framing.
    fn parse(bytes: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text:?}");
        text.split_terminator("\n\n")
            .map(|ev| {
                let mut lines = ev.lines();
                let name = lines
                    .next()
                    .unwrap()
                    .strip_prefix("event: ")
                    .unwrap()
                    .to_string();
                let data: Value =
                    serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap())
                        .unwrap();
                assert_eq!(lines.next(), None);
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    fn chunk(delta: Value, finish: Value) -> String {
        let c = json!({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "qwen",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}], "usage": null});
        format!("data: {c}\n\n")
    }

    /// A vLLM chat stream: role chunk, text, two tool calls streamed one after the other, finish, usage, DONE.
    fn vllm_stream() -> Vec<String> {
        let tool = |index: u64, head: Option<(&str, &str)>, args: &str| {
            let mut call = json!({"index": index, "function": {"arguments": args}});
            if let Some((id, name)) = head {
                call["id"] = json!(id);
                call["type"] = json!("function");
                call["function"]["name"] = json!(name);
            }
            chunk(json!({"tool_calls": [call]}), Value::Null)
        };
        vec![
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "Let me"}), Value::Null),
            chunk(json!({"content": " check."}), Value::Null),
            tool(0, Some(("chatcmpl-tool-a", "get_weather")), ""),
            tool(0, None, "{\"city\": "),
            tool(0, None, "\"Paris\"}"),
            tool(1, Some(("chatcmpl-tool-b", "get_time")), "{\"tz\": \"CET\"}"),
            chunk(json!({}), json!("tool_calls")),
            "data: {\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"qwen\",\"choices\":[],\"usage\":{\"prompt_tokens\":31,\"total_tokens\":52,\"completion_tokens\":21}}\n\n".to_string(),
            "data: [DONE]\n\n".to_string(),
        ]
    }

    #[test]
    fn stream_translates_a_vllm_stream_fed_at_awkward_splits() {
        let events = vllm_stream();
        // Whole events, several per call, in uneven groups (1, 3, 2, 4 …), the way reads arrive.
        let mut translator = StreamTranslator::new("claude-like");
        let mut out = Vec::new();
        let mut i = 0;
        for size in [1, 3, 2, 4] {
            let group: String = events[i..(i + size).min(events.len())].concat();
            out.extend_from_slice(&translator.translate(group.as_bytes()));
            i += size;
        }
        assert_eq!(i, events.len());
        assert!(
            translator.finish().is_empty(),
            "a finished stream needs nothing more"
        );
        // One event per call gives the same bytes.
        let mut one_by_one = StreamTranslator::new("claude-like");
        let mut same = Vec::new();
        for e in &events {
            same.extend_from_slice(&one_by_one.translate(e.as_bytes()));
        }
        assert_eq!(out, same);

        let got = parse(&out);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(
            got[0].1,
            json!({"type": "message_start", "message": {"id": "msg_7", "type": "message", "role": "assistant",
                "model": "claude-like", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}})
        );
        assert_eq!(
            got[2].1,
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        );
        assert_eq!(
            got[4].1,
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " check."}})
        );
        assert_eq!(
            got[6].1,
            json!({"type": "content_block_start", "index": 1, "content_block":
                {"type": "tool_use", "id": "chatcmpl-tool-a", "name": "get_weather", "input": {}}})
        );
        let partial: String = got
            .iter()
            .filter(|(_, d)| d["index"] == 1 && d["delta"]["type"] == "input_json_delta")
            .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap())
            .collect();
        assert_eq!(partial, "{\"city\": \"Paris\"}");
        assert_eq!(got[10].1["content_block"]["name"], "get_time");
        assert_eq!(got[10].1["index"], 2);
        assert_eq!(got[12].1, json!({"type": "content_block_stop", "index": 2}));
        assert_eq!(
            got[13].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                   "usage": {"input_tokens": 31, "output_tokens": 21}})
        );
    }

    #[test]
    fn stream_cut_before_done_ends_with_an_error_event() {
        let events = vllm_stream();
        let mut t = StreamTranslator::new("m");
        let out = t.translate(events[..3].concat().as_bytes());
        assert!(parse(&out).iter().all(|(n, _)| n != "message_stop"));
        let end = parse(&t.finish());
        assert_eq!(end.len(), 1);
        assert_eq!(end[0].0, "error");
        assert_eq!(end[0].1["error"]["type"], "api_error");
        assert!(t.finish().is_empty());
        assert!(
            t.translate(events[3].as_bytes()).is_empty(),
            "nothing after the end"
        );

        // Complete but for `[DONE]`: closed normally, with the usage.
        let mut t = StreamTranslator::new("m");
        let _ = t.translate(events[..events.len() - 1].concat().as_bytes());
        let end = parse(&t.finish());
        let names: Vec<&str> = end.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["message_delta", "message_stop"]);
        assert_eq!(end[0].1["usage"]["output_tokens"], 21);
    }

    #[test]
    fn stream_error_event_and_other_choices() {
        let mut t = StreamTranslator::new("m");
        let mut input = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
        input.push_str(&chunk(json!({"content": "Hi"}), Value::Null));
        // A second choice (an upstream that ignored n=1) is not translated.
        input.push_str("data: {\"id\":\"chatcmpl-7\",\"choices\":[{\"index\":1,\"delta\":{\"content\":\"other\"},\"finish_reason\":null}]}\n\n");
        input.push_str("data: {\"error\": {\"object\": \"error\", \"message\": \"KV cache exhausted\", \"type\": \"InternalServerError\", \"code\": 503}}\n\n");
        input.push_str(&chunk(json!({"content": "late"}), Value::Null));
        let got = parse(&t.translate(input.as_bytes()));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "error"
            ]
        );
        assert_eq!(
            got[4].1,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "KV cache exhausted"}})
        );
        assert!(t.finish().is_empty());
    }

    #[test]
    fn stream_without_usage_reports_chunks_and_stop_sequence() {
        let mut t = StreamTranslator::new("m");
        let mut input = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
        for w in ["a", " b", " c"] {
            input.push_str(&chunk(json!({"content": w}), Value::Null));
        }
        let last = json!({"id": "chatcmpl-7", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "###"}]});
        input.push_str(&format!("data: {last}\r\n\r\ndata: [DONE]\r\n\r\n"));
        let got = parse(&t.translate(input.as_bytes()));
        let delta = &got[got.len() - 2].1;
        assert_eq!(
            delta,
            &json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "###"},
                    "usage": {"input_tokens": 0, "output_tokens": 3}})
        );
    }
}
