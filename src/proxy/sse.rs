//! The SSE usage tap: reads an OpenAI chat-completion event stream as it passes through.
//!
//! Complete events are forwarded unchanged, byte for byte. The tap records the `usage` object (vLLM sends it with
//! `choices: null`, OpenAI with `choices: []`), counts the content chunks actually delivered (the fallback when a
//! stream ends without usage), and notices `data: [DONE]`. When the gateway injected `include_usage` on the
//! client's behalf, the usage-only event is held back so the client sees the stream it asked for.

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

/// An incremental reader of one SSE response.
#[derive(Debug)]
pub struct UsageTap {
    pending: BytesMut,
    strip_usage_event: bool,
    /// Usage from the stream, once seen.
    pub usage: Option<Usage>,
    /// Whether `data: [DONE]` arrived.
    pub done: bool,
    /// Events whose delta carried content text (≈ tokens delivered).
    pub content_chunks: u64,
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
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
}

impl UsageTap {
    /// `strip_usage_event`: drop the usage-only event from what is forwarded.
    pub fn new(strip_usage_event: bool) -> UsageTap {
        UsageTap {
            pending: BytesMut::new(),
            strip_usage_event,
            usage: None,
            done: false,
            content_chunks: 0,
        }
    }

    /// Takes upstream bytes; returns the complete events to forward now (possibly empty).
    pub fn feed(&mut self, bytes: &[u8]) -> Bytes {
        self.pending.extend_from_slice(bytes);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
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
        if !rest.is_empty() && !self.inspect(&rest) {
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
        if data == "[DONE]" {
            self.done = true;
            return true;
        }
        let Ok(chunk) = serde_json::from_str::<Chunk>(data) else {
            return true;
        };
        let choices = chunk.choices.unwrap_or_default();
        for choice in &choices {
            if let Some(delta) = &choice.delta
                && (delta.content.as_deref().is_some_and(|c| !c.is_empty())
                    || delta
                        .reasoning_content
                        .as_deref()
                        .is_some_and(|c| !c.is_empty()))
            {
                self.content_chunks += 1;
            }
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
    fn garbage_is_forwarded_not_fatal() {
        let mut tap = UsageTap::new(true);
        let out = tap.feed(b"data: {not json\n\n: comment\n\n");
        assert_eq!(out.as_ref(), b"data: {not json\n\n: comment\n\n");
    }
}
