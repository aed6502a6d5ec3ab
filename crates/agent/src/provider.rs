//! The two wire formats: OpenAI-compatible Chat Completions and Anthropic Messages, both with
//! native tool calls. Only the request body, headers and response parsing differ.

use serde_json::{Value, json};

use crate::conversation::{Message, Reply, Request, ToolCall, Usage};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "openai" => Some(Provider::OpenAi),
            "anthropic" => Some(Provider::Anthropic),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
        }
    }

    /// Where the key comes from.
    pub fn key_var(self) -> &'static str {
        match self {
            Provider::OpenAi => "OPENAI_API_KEY",
            Provider::Anthropic => "ANTHROPIC_API_KEY",
        }
    }

    pub fn default_base_url(self) -> &'static str {
        match self {
            Provider::OpenAi => "https://api.openai.com/v1",
            Provider::Anthropic => "https://api.anthropic.com",
        }
    }

    pub fn endpoint(self, base_url: &str) -> String {
        let base = base_url.trim_end_matches('/');
        match self {
            Provider::OpenAi => format!("{base}/chat/completions"),
            Provider::Anthropic if base.ends_with("/v1") => format!("{base}/messages"),
            Provider::Anthropic => format!("{base}/v1/messages"),
        }
    }

    /// Authentication and version headers; the key goes nowhere else.
    pub fn headers(self, key: &str) -> Vec<(&'static str, String)> {
        match self {
            Provider::OpenAi => vec![("authorization", format!("Bearer {key}"))],
            Provider::Anthropic => vec![
                ("x-api-key", key.to_string()),
                ("anthropic-version", "2023-06-01".to_string()),
            ],
        }
    }

    pub fn body(self, model: &str, max_tokens: u32, req: &Request) -> Value {
        match self {
            Provider::OpenAi => openai_body(model, max_tokens, req),
            Provider::Anthropic => anthropic_body(model, max_tokens, req),
        }
    }

    pub fn parse_reply(self, body: &Value) -> Result<Reply, String> {
        match self {
            Provider::OpenAi => openai_reply(body),
            Provider::Anthropic => anthropic_reply(body),
        }
    }
}

fn openai_body(model: &str, max_tokens: u32, req: &Request) -> Value {
    let mut messages = vec![json!({"role": "system", "content": req.system})];
    for m in req.messages {
        messages.push(match m {
            Message::User(text) => json!({"role": "user", "content": text}),
            Message::Assistant { text, tool_calls } => {
                // null content is only valid beside tool calls.
                let content = if text.is_empty() && !tool_calls.is_empty() {
                    Value::Null
                } else {
                    json!(text)
                };
                let mut msg = json!({"role": "assistant", "content": content});
                if !tool_calls.is_empty() {
                    msg["tool_calls"] = tool_calls
                        .iter()
                        .map(|c| {
                            json!({
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments},
                            })
                        })
                        .collect();
                }
                msg
            }
            // Chat Completions has no error flag: say it in the content.
            Message::ToolResult {
                id,
                content,
                is_error,
            } => {
                let content = if *is_error {
                    format!("error: {content}")
                } else {
                    content.clone()
                };
                json!({"role": "tool", "tool_call_id": id, "content": content})
            }
        });
    }
    let tools: Vec<Value> = req
        .tools
        .iter()
        .map(|t| {
            json!({
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            })
        })
        .collect();
    json!({
        "model": model,
        "messages": messages,
        "tools": tools,
        "tool_choice": "auto",
        "max_tokens": max_tokens,
    })
}

fn openai_reply(body: &Value) -> Result<Reply, String> {
    let message = body
        .pointer("/choices/0/message")
        .ok_or("no choices[0].message in the response")?;
    let text = message["content"].as_str().unwrap_or_default().to_string();
    let mut tool_calls = Vec::new();
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        tool_calls.push(ToolCall {
            id: call["id"].as_str().unwrap_or_default().to_string(),
            name: call
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            arguments: call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}")
                .to_string(),
        });
    }
    let usage = usage(body, "prompt_tokens", "completion_tokens");
    Ok(Reply {
        text,
        tool_calls,
        usage,
    })
}

/// Token counts from a reply's `usage` object, under the provider's names.
fn usage(body: &Value, input: &str, output: &str) -> Usage {
    let count = |key: &str| {
        body.get("usage")
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Usage {
        input_tokens: count(input),
        output_tokens: count(output),
    }
}

fn anthropic_body(model: &str, max_tokens: u32, req: &Request) -> Value {
    // Anthropic wants alternating roles: consecutive tool results (and a following user note)
    // share one user message.
    let mut messages: Vec<Value> = Vec::new();
    let mut push = |role: &str, block: Value| {
        if let Some(last) = messages.last_mut()
            && last["role"] == role
        {
            last["content"].as_array_mut().expect("blocks").push(block);
            return;
        }
        messages.push(json!({"role": role, "content": [block]}));
    };
    for m in req.messages {
        match m {
            Message::User(text) => push("user", json!({"type": "text", "text": text})),
            Message::Assistant { text, tool_calls } => {
                // Anthropic rejects whitespace-only text blocks.
                if !text.trim().is_empty() {
                    push("assistant", json!({"type": "text", "text": text}));
                }
                for c in tool_calls {
                    // The input must be an object; malformed JSON from the model is sent back
                    // as an empty object (its error went back as the tool result).
                    let input: Value = serde_json::from_str(&c.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    push(
                        "assistant",
                        json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}),
                    );
                }
            }
            Message::ToolResult {
                id,
                content,
                is_error,
            } => push(
                "user",
                json!({"type": "tool_result", "tool_use_id": id, "content": content, "is_error": is_error}),
            ),
        }
    }
    let tools: Vec<Value> = req
        .tools
        .iter()
        .map(
            |t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}),
        )
        .collect();
    json!({
        "model": model,
        "max_tokens": max_tokens,
        "system": req.system,
        "messages": messages,
        "tools": tools,
    })
}

fn anthropic_reply(body: &Value) -> Result<Reply, String> {
    let blocks = body["content"]
        .as_array()
        .ok_or("no content blocks in the response")?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        match b["type"].as_str() {
            Some("text") => text += b["text"].as_str().unwrap_or_default(),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: b["id"].as_str().unwrap_or_default().to_string(),
                name: b["name"].as_str().unwrap_or_default().to_string(),
                arguments: b["input"].to_string(),
            }),
            _ => {}
        }
    }
    let usage = usage(body, "input_tokens", "output_tokens");
    Ok(Reply {
        text,
        tool_calls,
        usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Message, ToolCall, ToolSpec};

    fn conversation() -> Vec<Message> {
        vec![
            Message::User("go".into()),
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![
                    ToolCall {
                        id: "a".into(),
                        name: "read_file".into(),
                        arguments: r#"{"path":"x"}"#.into(),
                    },
                    ToolCall {
                        id: "b".into(),
                        name: "check_compiles".into(),
                        arguments: "{bad".into(),
                    },
                ],
            },
            Message::ToolResult {
                id: "a".into(),
                content: "text".into(),
                is_error: false,
            },
            Message::ToolResult {
                id: "b".into(),
                content: "not JSON".into(),
                is_error: true,
            },
            Message::User("now run it".into()),
        ]
    }

    #[test]
    fn anthropic_merges_tool_results_into_one_user_turn_and_keeps_inputs_objects() {
        let tools = [ToolSpec {
            name: "read_file",
            description: "r",
            parameters: json!({"type": "object"}),
        }];
        let msgs = conversation();
        let body = Provider::Anthropic.body(
            "m",
            100,
            &Request {
                system: "sys",
                messages: &msgs,
                tools: &tools,
            },
        );
        let m = body["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{body}");
        assert_eq!(
            m[1]["content"][1]["input"],
            json!({}),
            "malformed input sent as an object"
        );
        assert_eq!(m[2]["content"][0]["tool_use_id"], "a");
        assert_eq!(m[2]["content"][1]["is_error"], true);
        assert_eq!(m[2]["content"][2]["type"], "text");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(
            Provider::Anthropic.endpoint("https://api.anthropic.com/"),
            "https://api.anthropic.com/v1/messages"
        );
    }

    #[test]
    fn openai_echoes_ids_and_flags_errors_in_content() {
        let msgs = conversation();
        let body = Provider::OpenAi.body(
            "m",
            100,
            &Request {
                system: "sys",
                messages: &msgs,
                tools: &[],
            },
        );
        let m = body["messages"].as_array().unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[2]["tool_calls"][1]["function"]["arguments"], "{bad");
        assert_eq!(m[3]["tool_call_id"], "a");
        assert_eq!(m[4]["content"], "error: not JSON");
        let reply = Provider::OpenAi
            .parse_reply(&json!({"choices": [{"message": {"content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add_note", "arguments": "{}"}}]}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
            .unwrap();
        assert_eq!(reply.tool_calls[0].id, "c1");
        assert_eq!(reply.usage.input_tokens, 5);
    }
}
