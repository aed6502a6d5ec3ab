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

    pub fn body(self, model: &str, req: &Request) -> Value {
        match self {
            Provider::OpenAi => openai_body(model, req),
            Provider::Anthropic => anthropic_body(model, req),
        }
    }

    pub fn parse_reply(self, body: &Value) -> Result<Reply, String> {
        match self {
            Provider::OpenAi => openai_reply(body),
            Provider::Anthropic => anthropic_reply(body),
        }
    }
}

/// The arguments to send back in the history: the model's own text when it is a JSON object,
/// else `{}`. Strict servers (vLLM, llama.cpp) parse replayed arguments and answer 500 to
/// anything else; the tool result already told the model what was wrong.
fn replayable_arguments(arguments: &str) -> &str {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(_)) => arguments,
        _ => "{}",
    }
}

/// An id for a tool call whose server gave none, unique within the process.
fn fresh_call_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "call_ar{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn openai_body(model: &str, req: &Request) -> Value {
    // The system prompt, the tools and the opening's stable part come first and never change
    // within a session: OpenAI-compatible servers cache a byte-identical prefix on their own.
    let mut messages = vec![json!({"role": "system", "content": req.system})];
    for m in req.messages {
        messages.push(match m {
            Message::Opening { stable, fresh } => {
                json!({"role": "user", "content": format!("{stable}{fresh}")})
            }
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
                                "function": {"name": c.name, "arguments": replayable_arguments(&c.arguments)},
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
        "max_tokens": req.max_tokens,
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
            id: call_id(&call["id"]),
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
    let count = |path: &str| body.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    // prompt_tokens counts every input token; the cached ones are a part of it.
    let usage = Usage {
        input_tokens: count("/usage/prompt_tokens"),
        cache_read_tokens: count("/usage/prompt_tokens_details/cached_tokens"),
        cache_write_tokens: 0,
        output_tokens: count("/usage/completion_tokens"),
    };
    Ok(Reply {
        text,
        tool_calls,
        usage,
        truncated: body.pointer("/choices/0/finish_reason") == Some(&json!("length")),
    })
}

/// The server's id for a tool call, or one of ours where it gave none (some compatible
/// servers do not), so the result can still be matched to its call.
fn call_id(id: &Value) -> String {
    match id.as_str() {
        Some(id) if !id.trim().is_empty() => id.to_string(),
        _ => fresh_call_id(),
    }
}

const EPHEMERAL: &str = "ephemeral";

fn anthropic_body(model: &str, req: &Request) -> Value {
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
            // Cache breakpoint 2: tools, system and the kept train file, shared by every
            // episode until an experiment is kept.
            Message::Opening { stable, fresh } => {
                push(
                    "user",
                    json!({"type": "text", "text": stable, "cache_control": {"type": EPHEMERAL}}),
                );
                if !fresh.is_empty() {
                    push("user", json!({"type": "text", "text": fresh}));
                }
            }
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
    // Breakpoint 3 moves with the conversation: the last block, so the next call of this
    // episode reads everything before it from the cache.
    if let Some(block) = messages
        .last_mut()
        .and_then(|m| m["content"].as_array_mut())
        .and_then(|blocks| blocks.last_mut())
    {
        block["cache_control"] = json!({"type": EPHEMERAL});
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
        "max_tokens": req.max_tokens,
        // Breakpoint 1: the tools and the system prompt, the same all session.
        "system": [{"type": "text", "text": req.system, "cache_control": {"type": EPHEMERAL}}],
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
                id: call_id(&b["id"]),
                name: b["name"].as_str().unwrap_or_default().to_string(),
                arguments: b["input"].to_string(),
            }),
            _ => {}
        }
    }
    let count = |key: &str| body["usage"][key].as_u64().unwrap_or(0);
    // Anthropic's input_tokens are only those after the last cache breakpoint.
    let (read, write) = (
        count("cache_read_input_tokens"),
        count("cache_creation_input_tokens"),
    );
    let usage = Usage {
        input_tokens: count("input_tokens") + read + write,
        cache_read_tokens: read,
        cache_write_tokens: write,
        output_tokens: count("output_tokens"),
    };
    Ok(Reply {
        text,
        tool_calls,
        usage,
        truncated: body["stop_reason"] == "max_tokens",
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
            &Request {
                system: "sys",
                messages: &msgs,
                tools: &tools,
                max_tokens: 100,
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
            &Request {
                system: "sys",
                messages: &msgs,
                tools: &[],
                max_tokens: 100,
            },
        );
        let m = body["messages"].as_array().unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"], r#"{"path":"x"}"#,
            "well-formed arguments go back as the model wrote them"
        );
        assert_eq!(
            m[2]["tool_calls"][1]["function"]["arguments"], "{}",
            "malformed arguments go back as an empty object"
        );
        assert_eq!(m[3]["tool_call_id"], "a");
        assert_eq!(m[4]["content"], "error: not JSON");
        let reply = Provider::OpenAi
            .parse_reply(&json!({"choices": [{"message": {"content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add_note", "arguments": "{}"}}]}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
            .unwrap();
        assert_eq!(reply.tool_calls[0].id, "c1");
        assert_eq!(reply.usage.input_tokens, 5);
        assert!(!reply.truncated);
    }

    #[test]
    fn usage_counts_cached_tokens_and_truncation_is_read_from_both_providers() {
        let openai = Provider::OpenAi
            .parse_reply(&json!({"choices": [{"finish_reason": "length", "message": {"content": "x", "tool_calls": [
                {"type": "function", "function": {"name": "read_file", "arguments": "{\"pa"}},
                {"id": "", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]}}],
                "usage": {"prompt_tokens": 5000, "completion_tokens": 8192, "prompt_tokens_details": {"cached_tokens": 4096}}}))
            .unwrap();
        assert!(openai.truncated);
        assert_eq!(
            (openai.usage.input_tokens, openai.usage.cache_read_tokens),
            (5000, 4096)
        );
        let ids: Vec<&str> = openai.tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert!(
            ids.iter().all(|id| id.starts_with("call_ar")) && ids[0] != ids[1],
            "missing ids are made up, distinct: {ids:?}"
        );
        let anthropic = Provider::Anthropic
            .parse_reply(&json!({"content": [{"type": "text", "text": "hi"}], "stop_reason": "max_tokens",
                "usage": {"input_tokens": 10, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 200, "output_tokens": 7}}))
            .unwrap();
        assert!(anthropic.truncated);
        assert_eq!(
            anthropic.usage,
            Usage {
                input_tokens: 3210,
                cache_read_tokens: 3000,
                cache_write_tokens: 200,
                output_tokens: 7
            }
        );
    }

    #[test]
    fn anthropic_marks_system_opening_and_the_latest_block_for_caching() {
        let msgs = vec![
            Message::Opening {
                stable: "the train file".into(),
                fresh: "the results".into(),
            },
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![ToolCall {
                    id: "a".into(),
                    name: "show_results".into(),
                    arguments: "{}".into(),
                }],
            },
            Message::ToolResult {
                id: "a".into(),
                content: "rows".into(),
                is_error: false,
            },
        ];
        let req = Request {
            system: "sys",
            messages: &msgs,
            tools: &[],
            max_tokens: 100,
        };
        let body = Provider::Anthropic.body("m", &req);
        let marked = body.to_string().matches("\"cache_control\"").count();
        assert_eq!(marked, 3, "at most 4 breakpoints are allowed: {body}");
        assert_eq!(body["system"][0]["cache_control"]["type"], "ephemeral");
        let first = &body["messages"][0]["content"];
        assert_eq!(first[0]["text"], "the train file");
        assert_eq!(first[0]["cache_control"]["type"], "ephemeral");
        assert!(first[1].get("cache_control").is_none());
        assert_eq!(
            body["messages"][2]["content"][0]["cache_control"]["type"],
            "ephemeral"
        );
        // OpenAI: one user message whose text starts with the stable part.
        let body = Provider::OpenAi.body("m", &req);
        assert_eq!(body["messages"][1]["content"], "the train filethe results");
        assert_eq!(body["max_tokens"], 100);
    }
}
