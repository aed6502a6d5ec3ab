//! A provider-neutral conversation: what the agent says to the model and back. Each provider
//! module maps it to its wire format.

use serde::Serialize;
use serde_json::Value;

/// A tool as the model sees it: a name, what it does, and a JSON schema of its arguments.
#[derive(Clone, Debug, Serialize)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub parameters: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The provider's id, echoed back with the result.
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (JSON text, not yet trusted).
    pub arguments: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// An episode's first message in two parts: `stable`, which stays byte-identical from one
    /// episode to the next until the kept state changes (so providers can cache it), then
    /// `fresh`, rebuilt every episode.
    Opening {
        stable: String,
        fresh: String,
    },
    User(String),
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    ToolResult {
        id: String,
        content: String,
        is_error: bool,
    },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Every input token of the request, cached or not.
    pub input_tokens: u64,
    /// Of those, read from the provider's prompt cache.
    pub cache_read_tokens: u64,
    /// Of those, written to the provider's prompt cache (Anthropic bills them extra).
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
}

/// The model's turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    /// The reply stopped at the output limit (`finish_reason: length`, `stop_reason:
    /// max_tokens`): its last tool call's arguments are likely cut off.
    pub truncated: bool,
}

/// Everything one request carries.
pub struct Request<'a> {
    pub system: &'a str,
    pub messages: &'a [Message],
    pub tools: &'a [ToolSpec],
    /// The most output tokens the reply may have.
    pub max_tokens: u32,
}
