//! The SSE usage tap: reads an upstream's event stream as it passes through, in the dialect of the API it speaks.
//!
//! Complete events are forwarded unchanged, byte for byte. The tap records the usage the stream reports, counts
//! the output chunks actually delivered (the fallback when a stream ends without usage), and notices the stream's
//! proper end. Per dialect ([`Dialect`]):
//! - **OpenAI** chat and legacy completions: the `usage` chunk (vLLM sends it with `choices: null`, OpenAI with
//!   `choices: []`), `choices[].delta` (chat) or `choices[].text` (completions) as output, `data: [DONE]` as the
//!   end. When the gateway injected `include_usage` on the client's behalf, the usage-only event is held back so
//!   the client sees the stream it asked for.
//! - **Responses**: `response.*.delta` events as output, the usage of `response.completed` (or `incomplete`,
//!   `failed`) as usage and end.
//! - **Anthropic** Messages: `content_block_delta` as output, input tokens from `message_start`, output tokens
//!   from `message_delta` (cumulative), `message_stop` as the end.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The event format of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `data: {chat.completion.chunk | text_completion}` … `data: [DONE]`.
    OpenAi,
    /// OpenAI Responses API events (`event: response.output_text.delta` …).
    Responses,
    /// Anthropic Messages events (`event: message_start` … `message_stop`).
    Anthropic,
}

/// An incremental reader of one SSE response.
#[derive(Debug)]
pub struct UsageTap {
    dialect: Dialect,
    pending: BytesMut,
    /// Anthropic: input tokens from `message_start`, until `message_delta` brings the output count.
    input_tokens: Option<u64>,
    strip_usage_event: bool,
    /// Usage from the stream, once seen.
    pub usage: Option<Usage>,
    /// Whether `data: [DONE]` arrived.
    pub done: bool,
    /// Events whose delta carried output (content, reasoning or tool-call text; ≈ tokens delivered).
    pub content_chunks: u64,
    /// Output events allowed before the stream is over its bound.
    output_limit: u64,
    /// Set when an output event past `output_limit` arrived: it and everything after it is held back.
    pub over_limit: bool,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    /// Legacy completions stream their output here.
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<serde_json::Value>>,
}

impl Delta {
    /// Whether this delta carries generated output (a token or more).
    fn has_output(&self) -> bool {
        let text = |s: &Option<String>| s.as_deref().is_some_and(|c| !c.is_empty());
        text(&self.content)
            || text(&self.reasoning_content)
            || text(&self.reasoning)
            || self.tool_calls.as_ref().is_some_and(|calls| {
                calls.iter().any(|c| {
                    c["function"]["arguments"]
                        .as_str()
                        .is_some_and(|a| !a.is_empty())
                        || c["function"]["name"]
                            .as_str()
                            .is_some_and(|n| !n.is_empty())
                })
            })
    }
}

impl UsageTap {
    /// `strip_usage_event`: drop the usage-only event from what is forwarded.
    pub fn new(strip_usage_event: bool) -> UsageTap {
        UsageTap::for_dialect(Dialect::OpenAi, strip_usage_event)
    }

    /// A tap for a stream in `dialect` (`strip_usage_event` applies to the OpenAI dialect only).
    pub fn for_dialect(dialect: Dialect, strip_usage_event: bool) -> UsageTap {
        UsageTap {
            dialect,
            pending: BytesMut::new(),
            input_tokens: None,
            strip_usage_event,
            usage: None,
            done: false,
            content_chunks: 0,
            output_limit: u64::MAX,
            over_limit: false,
        }
    }

    /// Holds back every output event after the first `limit` (and sets `over_limit`).
    pub fn with_output_limit(mut self, limit: u64) -> UsageTap {
        self.output_limit = limit;
        self
    }

    /// Takes upstream bytes; returns the complete events to forward now (possibly empty).
    pub fn feed(&mut self, bytes: &[u8]) -> Bytes {
        self.pending.extend_from_slice(bytes);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            if self.over_limit {
                self.pending.clear();
                break;
            }
            let event = self.pending.split_to(end).freeze();
            if self.inspect(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// What is left when the upstream closes (an unterminated event), forwarded as is.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending).freeze();
        if self.over_limit || (!rest.is_empty() && !self.inspect(&rest)) {
            return Bytes::new();
        }
        rest
    }

    /// Reads one event; returns whether to forward it.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let text = String::from_utf8_lossy(event);
        let mut data = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            }
        }
        let data = data.trim();
        if data.is_empty() {
            return true;
        }
        match self.dialect {
            Dialect::OpenAi => self.inspect_openai(data),
            Dialect::Responses => self.inspect_responses(data),
            Dialect::Anthropic => self.inspect_anthropic(data),
        }
    }

    /// Counts `outputs` more output chunks; false (and `over_limit`) when that passes the bound.
    fn count_output(&mut self, outputs: u64) -> bool {
        if outputs > 0 {
            if self.content_chunks.saturating_add(outputs) > self.output_limit {
                // Past the bound the gateway wrote into the request: the upstream ignores it. Nothing more is
                // forwarded (the caller cuts the stream).
                self.over_limit = true;
                return false;
            }
            self.content_chunks += outputs;
        }
        true
    }

    fn inspect_responses(&mut self, data: &str) -> bool {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
            return true;
        };
        let kind = event["type"].as_str().unwrap_or("");
        if kind.starts_with("response.")
            && kind.ends_with(".delta")
            && event["delta"].as_str().is_some_and(|d| !d.is_empty())
            && !self.count_output(1)
        {
            return false;
        }
        if matches!(
            kind,
            "response.completed" | "response.incomplete" | "response.failed"
        ) {
            self.done = true;
            let usage = &event["response"]["usage"];
            if let (Some(input), Some(output)) = (
                usage["input_tokens"].as_u64(),
                usage["output_tokens"].as_u64(),
            ) {
                self.usage = Some(Usage {
                    prompt_tokens: input,
                    completion_tokens: output,
                });
            }
        }
        true
    }

    fn inspect_anthropic(&mut self, data: &str) -> bool {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
            return true;
        };
        match event["type"].as_str().unwrap_or("") {
            "message_start" => {
                if let Some(input) = anthropic_input_tokens(&event["message"]["usage"]) {
                    self.input_tokens = Some(input);
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                let has_output = ["text", "partial_json", "thinking"]
                    .iter()
                    .any(|f| delta[*f].as_str().is_some_and(|t| !t.is_empty()));
                if has_output && !self.count_output(1) {
                    return false;
                }
            }
            "message_delta" => {
                let usage = &event["usage"];
                if let Some(input) = anthropic_input_tokens(usage) {
                    self.input_tokens = Some(input);
                }
                if let Some(output) = usage["output_tokens"].as_u64() {
                    self.usage = Some(Usage {
                        prompt_tokens: self.input_tokens.unwrap_or(0),
                        completion_tokens: output,
                    });
                }
            }
            "message_stop" => self.done = true,
            _ => {}
        }
        true
    }

    fn inspect_openai(&mut self, data: &str) -> bool {
        if data == "[DONE]" {
            self.done = true;
            return true;
        }
        let Ok(chunk) = serde_json::from_str::<Chunk>(data) else {
            return true;
        };
        let choices = chunk.choices.unwrap_or_default();
        let outputs = choices
            .iter()
            .filter(|c| {
                c.delta.as_ref().is_some_and(Delta::has_output)
                    || c.text.as_deref().is_some_and(|t| !t.is_empty())
            })
            .count() as u64;
        if !self.count_output(outputs) {
            return false;
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
            if self.strip_usage_event && choices.is_empty() {
                return false;
            }
        }
        true
    }
}

/// Anthropic's input tokens: uncached + written to cache + read from cache (all are prompt tokens the upstream
/// processed), if the usage object names any.
pub fn anthropic_input_tokens(usage: &serde_json::Value) -> Option<u64> {
    let fields = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ];
    let values: Vec<u64> = fields.iter().filter_map(|f| usage[*f].as_u64()).collect();
    (!values.is_empty()).then(|| values.iter().fold(0u64, |a, b| a.saturating_add(*b)))
}

/// Index just past the blank line that ends the first complete event, if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn passes_events_through_byte_for_byte_in_any_split() {
        for split in [1, 2, 3, 7, 50, STREAM.len()] {
            let mut tap = UsageTap::new(false);
            let mut out = Vec::new();
            for piece in STREAM.as_bytes().chunks(split) {
                out.extend_from_slice(&tap.feed(piece));
            }
            out.extend_from_slice(&tap.finish());
            assert_eq!(out, STREAM.as_bytes(), "split {split}");
            assert_eq!(
                tap.usage,
                Some(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                })
            );
            assert!(tap.done);
            assert_eq!(tap.content_chunks, 2);
        }
    }

    #[test]
    fn strips_only_the_usage_event_when_asked() {
        let mut tap = UsageTap::new(true);
        let out = tap.feed(STREAM.as_bytes());
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(!text.contains("prompt_tokens"));
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2
            })
        );
    }

    #[test]
    fn vllm_usage_with_null_choices_and_crlf() {
        let mut tap = UsageTap::new(true);
        let out = tap.feed(b"data: {\"choices\":null,\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\r\n\r\n");
        assert!(out.is_empty());
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
    }

    #[test]
    fn cut_stream_keeps_delivered_count_and_no_usage() {
        let mut tap = UsageTap::new(false);
        let cut = &STREAM.as_bytes()[..STREAM.find(" world").unwrap()];
        let out = tap.feed(cut);
        let rest = tap.finish();
        assert_eq!([out.as_ref(), rest.as_ref()].concat(), cut);
        assert_eq!(tap.content_chunks, 1);
        assert!(tap.usage.is_none() && !tap.done);
    }

    #[test]
    fn output_past_the_limit_is_held_back() {
        for split in [1, 5, STREAM.len()] {
            let mut tap = UsageTap::new(false).with_output_limit(1);
            let mut out = Vec::new();
            for piece in STREAM.as_bytes().chunks(split) {
                out.extend_from_slice(&tap.feed(piece));
            }
            out.extend_from_slice(&tap.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(tap.over_limit, "split {split}");
            assert_eq!(tap.content_chunks, 1);
            assert!(text.contains("Hello") && !text.contains(" world"), "{text}");
            assert!(!text.contains("[DONE]"));
        }
    }

    #[test]
    fn tool_call_and_reasoning_deltas_count_as_output() {
        let mut tap = UsageTap::new(false);
        tap.feed(concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning\":\"hm\"}},{\"index\":1,\"delta\":{\"content\":\"x\"}}]}\n\n",
        ).as_bytes());
        assert_eq!(tap.content_chunks, 3);
    }

    #[test]
    fn completions_text_counts_as_output() {
        let mut tap = UsageTap::new(true).with_output_limit(2);
        tap.feed(
            b"data: {\"choices\":[{\"index\":0,\"text\":\"a\"},{\"index\":1,\"text\":\"b\"}]}\n\n",
        );
        assert_eq!(tap.content_chunks, 2);
        tap.feed(b"data: {\"choices\":[{\"index\":0,\"text\":\"c\"}]}\n\n");
        assert!(tap.over_limit);
    }

    #[test]
    fn responses_events_give_output_usage_and_end() {
        let stream = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\" there\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}}\n\n",
        );
        let mut tap = UsageTap::for_dialect(Dialect::Responses, false);
        let out = tap.feed(stream.as_bytes());
        assert_eq!(out.as_ref(), stream.as_bytes());
        assert_eq!(tap.content_chunks, 2);
        assert!(tap.done);
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2
            })
        );
        let mut tap = UsageTap::for_dialect(Dialect::Responses, false).with_output_limit(1);
        let out = tap.feed(stream.as_bytes());
        assert!(tap.over_limit && !String::from_utf8_lossy(&out).contains("there"));
    }

    #[test]
    fn anthropic_events_give_input_then_output_usage() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":4}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut tap = UsageTap::for_dialect(Dialect::Anthropic, false);
        for piece in stream.as_bytes().chunks(7) {
            tap.feed(piece);
        }
        assert!(tap.done);
        assert_eq!(tap.content_chunks, 1);
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 4
            })
        );
    }

    #[test]
    fn garbage_is_forwarded_not_fatal() {
        let mut tap = UsageTap::new(true);
        let out = tap.feed(b"data: {not json\n\n: comment\n\n");
        assert_eq!(out.as_ref(), b"data: {not json\n\n: comment\n\n");
    }
}
