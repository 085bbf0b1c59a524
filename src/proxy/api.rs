//! The inference APIs the gateway serves and what differs between them: the client's path, the upstream's path,
//! the stream dialect, where an answer reports usage, and how output is estimated when it does not.
//!
//! Everything else — bound, reservation, routing, settlement — is the same path for every API.

use serde_json::Value;

use super::sse::{Dialect, Usage, anthropic_input_tokens};

/// One inference API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI chat completions, `POST /v1/chat/completions`.
    Chat,
    /// OpenAI legacy completions, `POST /v1/completions`.
    Completions,
    /// OpenAI embeddings, `POST /v1/embeddings` (input tokens only).
    Embeddings,
    /// OpenAI Responses, `POST /v1/responses`.
    Responses,
    /// Anthropic Messages, `POST /v1/messages`.
    Messages,
}

impl Api {
    pub const ALL: [Api; 5] = [
        Api::Chat,
        Api::Completions,
        Api::Embeddings,
        Api::Responses,
        Api::Messages,
    ];

    /// The gateway's path.
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
            Api::Embeddings => "/v1/embeddings",
            Api::Responses => "/v1/responses",
            Api::Messages => "/v1/messages",
        }
    }

    /// The path under an upstream's base URL (which ends in `/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Completions => "/completions",
            Api::Embeddings => "/embeddings",
            Api::Responses => "/responses",
            Api::Messages => "/messages",
        }
    }

    /// A short name for logs, metrics and documents.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat.completions",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
        }
    }

    /// The API of a gateway path, if it is one.
    pub fn of_path(path: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.path() == path)
    }

    /// The event format of its streams.
    pub fn dialect(self) -> Dialect {
        match self {
            Api::Chat | Api::Completions | Api::Embeddings => Dialect::OpenAi,
            Api::Responses => Dialect::Responses,
            Api::Messages => Dialect::Anthropic,
        }
    }

    /// Usage reported in a non-streamed answer of this API.
    pub fn usage_of(self, answer: &Value) -> Option<Usage> {
        let usage = answer.get("usage").filter(|u| u.is_object())?;
        match self {
            Api::Chat | Api::Completions => serde_json::from_value(usage.clone()).ok(),
            Api::Embeddings => Some(Usage {
                prompt_tokens: usage["prompt_tokens"].as_u64()?,
                completion_tokens: 0,
            }),
            Api::Responses => Some(Usage {
                prompt_tokens: usage["input_tokens"].as_u64()?,
                completion_tokens: usage["output_tokens"].as_u64()?,
            }),
            Api::Messages => Some(Usage {
                prompt_tokens: anthropic_input_tokens(usage)?,
                completion_tokens: usage["output_tokens"].as_u64()?,
            }),
        }
    }

    /// Output tokens estimated from a non-streamed answer's text (4 bytes a token), for an answer without usage.
    pub fn estimate_output_tokens(self, answer: &Value) -> u64 {
        let mut bytes = 0usize;
        let mut add = |text: Option<&str>| bytes += text.map_or(0, str::len);
        match self {
            Api::Chat => {
                for choice in answer["choices"].as_array().into_iter().flatten() {
                    let message = &choice["message"];
                    for field in ["content", "reasoning_content", "reasoning"] {
                        add(message[field].as_str());
                    }
                    for call in message["tool_calls"].as_array().into_iter().flatten() {
                        add(call["function"]["arguments"].as_str());
                    }
                }
            }
            Api::Completions => {
                for choice in answer["choices"].as_array().into_iter().flatten() {
                    add(choice["text"].as_str());
                }
            }
            Api::Embeddings => {}
            Api::Responses => {
                for item in answer["output"].as_array().into_iter().flatten() {
                    add(item["arguments"].as_str());
                    for part in item["content"].as_array().into_iter().flatten() {
                        add(part["text"].as_str());
                    }
                    for part in item["summary"].as_array().into_iter().flatten() {
                        add(part["text"].as_str());
                    }
                }
            }
            Api::Messages => {
                for block in answer["content"].as_array().into_iter().flatten() {
                    add(block["text"].as_str());
                    add(block["thinking"].as_str());
                    if let Some(input) = block.get("input") {
                        add(Some(&input.to_string()));
                    }
                }
            }
        }
        (bytes as u64).div_ceil(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_read_where_each_api_reports_it() {
        let u = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        assert_eq!(
            Api::Chat.usage_of(&json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})),
            u(3, 4)
        );
        assert_eq!(
            Api::Embeddings.usage_of(&json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}})),
            u(8, 0)
        );
        assert_eq!(
            Api::Responses.usage_of(&json!({"usage": {"input_tokens": 5, "output_tokens": 6}})),
            u(5, 6)
        );
        assert_eq!(
            Api::Messages.usage_of(
                &json!({"usage": {"input_tokens": 5, "cache_creation_input_tokens": 2,
                "cache_read_input_tokens": 1, "output_tokens": 6}})
            ),
            u(8, 6)
        );
        assert_eq!(Api::Messages.usage_of(&json!({"usage": null})), None);
        assert_eq!(Api::Responses.usage_of(&json!({})), None);
    }

    #[test]
    fn output_is_estimated_from_each_apis_text() {
        assert_eq!(
            Api::Completions.estimate_output_tokens(&json!({"choices": [{"text": "12345678"}]})),
            2
        );
        assert_eq!(
            Api::Responses.estimate_output_tokens(
                &json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": "1234"}]}]})
            ),
            1
        );
        assert_eq!(
            Api::Messages
                .estimate_output_tokens(&json!({"content": [{"type": "text", "text": "12345"}]})),
            2
        );
        for api in Api::ALL {
            assert_eq!(Api::of_path(api.path()), Some(api));
        }
    }
}
