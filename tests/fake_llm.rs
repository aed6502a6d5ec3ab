//! A model API on loopback for tests: real HTTP, the providers' exact wire formats, a check of
//! everything the client sends, and a scripted "model" that decides each turn.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Anthropic,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub bytes: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The conversation of a request, provider-neutral, for the script to read.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The first user message (the episode's opening).
    pub opening: String,
    /// How many assistant turns the conversation already holds.
    pub turns: usize,
    /// The tool results of the last turn, in order: (content, is_error).
    pub results: Vec<(String, bool)>,
}

/// What the scripted model does with a request.
pub enum Act {
    /// Call these tools: (name, arguments as raw JSON text).
    Call(Vec<(String, String)>),
    /// Call these tools, giving no ids (as some compatible servers do).
    CallWithoutIds(Vec<(String, String)>),
    /// A reply cut at the output limit: this text, then these calls with their arguments cut
    /// off halfway (`finish_reason: length` / `stop_reason: max_tokens`).
    Truncated(String, Vec<(String, String)>),
    /// Reply with text only.
    Say(String),
    /// An HTTP error with a JSON error body and extra headers.
    Error(u16, String, Vec<(String, String)>),
    /// Close the connection without answering.
    Drop,
    /// Say nothing for this long, then close.
    Stall(Duration),
}

pub fn call(name: &str, args: Value) -> (String, String) {
    (name.to_string(), args.to_string())
}

type Script = Box<dyn FnMut(&Seen) -> Act + Send>;

/// How the server behaves beyond the script.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Usage counted from the request (a token per 4 bytes), with a prompt cache: OpenAI's
    /// automatic prefix cache (1,024 tokens or more, in steps of 128) or Anthropic's
    /// breakpoints. Off: every reply reports 1,000 input and 100 output tokens.
    pub simulate_cache: bool,
    /// Refuse a prompt over this many tokens (a token per 4 bytes) as llama.cpp's server does.
    pub context_window: Option<usize>,
}

/// Tokens as the fake counts them.
pub fn fake_tokens(bytes: usize) -> usize {
    bytes.div_ceil(4)
}

pub struct FakeLlm {
    pub wire: Wire,
    pub port: u16,
    pub key: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Protocol violations found in what the client sent.
    pub violations: Arc<Mutex<Vec<String>>>,
}

impl FakeLlm {
    pub fn start(
        wire: Wire,
        key: &str,
        script: impl FnMut(&Seen) -> Act + Send + 'static,
    ) -> FakeLlm {
        Self::start_with(wire, key, Options::default(), script)
    }

    pub fn start_with(
        wire: Wire,
        key: &str,
        options: Options,
        script: impl FnMut(&Seen) -> Act + Send + 'static,
    ) -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(script)));
        let (r, v, k) = (received.clone(), violations.clone(), key.to_string());
        std::thread::spawn(move || {
            let mut ids = 0u64;
            let mut cache = PromptCache::default();
            for stream in listener.incoming().flatten() {
                let Some(req) = read_request(&stream) else {
                    continue;
                };
                r.lock().unwrap().push(req.clone());
                let problems = validate(wire, &k, &req);
                if !problems.is_empty() {
                    v.lock().unwrap().extend(problems.iter().cloned());
                    respond(
                        &stream,
                        400,
                        &[],
                        &json!({"error": {"message": problems.join("; ")}}),
                    );
                    continue;
                }
                let prompt = prompt_tokens(wire, &req.body);
                if let Some(window) = options.context_window
                    && prompt > window
                {
                    // llama.cpp's server, word for word.
                    let message = format!(
                        "request ({prompt} tokens) exceeds the available context size ({window} tokens), try increasing it"
                    );
                    respond(
                        &stream,
                        400,
                        &[],
                        &json!({"error": {"code": 400, "message": message, "type": "exceed_context_size_error", "n_prompt_tokens": prompt, "n_ctx": window}}),
                    );
                    continue;
                }
                let usage = if options.simulate_cache {
                    cache.usage(wire, &req.body)
                } else {
                    Counted {
                        input: 1000,
                        ..Counted::default()
                    }
                };
                let seen = seen(wire, &req.body);
                let act = (script.lock().unwrap())(&seen);
                match act {
                    Act::Drop => drop(stream),
                    Act::Stall(d) => {
                        std::thread::spawn(move || {
                            std::thread::sleep(d);
                            drop(stream);
                        });
                    }
                    Act::Error(status, message, headers) => {
                        let body = match wire {
                            Wire::OpenAi => json!({"error": {"message": message, "type": "test"}}),
                            Wire::Anthropic => {
                                json!({"type": "error", "error": {"type": "test", "message": message}})
                            }
                        };
                        respond(&stream, status, &headers, &body);
                    }
                    Act::Say(text) => respond(
                        &stream,
                        200,
                        &[],
                        &reply(wire, &text, &[], Shape::Whole, usage, &mut ids),
                    ),
                    Act::Call(calls) => respond(
                        &stream,
                        200,
                        &[],
                        &reply(wire, "", &calls, Shape::Whole, usage, &mut ids),
                    ),
                    Act::CallWithoutIds(calls) => respond(
                        &stream,
                        200,
                        &[],
                        &reply(wire, "", &calls, Shape::NoIds, usage, &mut ids),
                    ),
                    Act::Truncated(text, calls) => respond(
                        &stream,
                        200,
                        &[],
                        &reply(wire, &text, &calls, Shape::Truncated, usage, &mut ids),
                    ),
                }
            }
        });
        FakeLlm {
            wire,
            port,
            key: key.to_string(),
            received,
            violations,
        }
    }

    pub fn base_url(&self) -> String {
        match self.wire {
            Wire::OpenAi => format!("http://127.0.0.1:{}/v1", self.port),
            Wire::Anthropic => format!("http://127.0.0.1:{}", self.port),
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> Option<Received> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(Received {
        path,
        headers,
        body: json,
        bytes: len,
    })
}

fn respond(mut stream: &TcpStream, status: u16, headers: &[(String, String)], body: &Value) {
    let body = body.to_string();
    let mut head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    let _ = stream.write_all(format!("{head}\r\n{body}").as_bytes());
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Whole,
    NoIds,
    Truncated,
}

/// Input tokens of a reply: all of them, and those read from and written to the cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counted {
    pub input: usize,
    pub read: usize,
    pub written: usize,
}

/// A request's prompt in the fake's tokens.
pub fn prompt_tokens(wire: Wire, body: &Value) -> usize {
    fake_tokens(prompt_text(wire, body).len())
}

/// The text a request's prompt is made of, in the order the provider reads it (tools, system,
/// messages), as the cache sees it.
fn prompt_text(wire: Wire, body: &Value) -> String {
    let parts = prompt_parts(wire, body);
    parts.iter().map(|(text, _)| text.as_str()).collect()
}

/// The prompt as pieces, each flagged where Anthropic's `cache_control` ends a prefix.
fn prompt_parts(wire: Wire, body: &Value) -> Vec<(String, bool)> {
    let mut parts = vec![(body["tools"].to_string(), false)];
    match wire {
        Wire::OpenAi => {
            for m in body["messages"].as_array().into_iter().flatten() {
                parts.push((m.to_string(), false));
            }
        }
        Wire::Anthropic => {
            match &body["system"] {
                Value::Array(blocks) => {
                    for b in blocks {
                        parts.push((b["text"].to_string(), b.get("cache_control").is_some()));
                    }
                }
                other => parts.push((other.to_string(), false)),
            }
            for m in body["messages"].as_array().into_iter().flatten() {
                parts.push((m["role"].to_string(), false));
                for b in m["content"].as_array().into_iter().flatten() {
                    let mut plain = b.clone();
                    if let Some(o) = plain.as_object_mut() {
                        o.remove("cache_control");
                    }
                    parts.push((plain.to_string(), b.get("cache_control").is_some()));
                }
            }
        }
    }
    parts
}

/// A prompt cache as the providers describe theirs.
#[derive(Default)]
struct PromptCache {
    /// OpenAI: earlier prompts. Anthropic: prefixes written at breakpoints.
    seen: Vec<String>,
}

impl PromptCache {
    fn usage(&mut self, wire: Wire, body: &Value) -> Counted {
        let parts = prompt_parts(wire, body);
        let text: String = parts.iter().map(|(t, _)| t.as_str()).collect();
        let input = fake_tokens(text.len());
        match wire {
            Wire::OpenAi => {
                // The longest prefix shared with an earlier prompt, in 128-token steps from 1,024.
                let shared = self
                    .seen
                    .iter()
                    .map(|s| {
                        s.bytes()
                            .zip(text.bytes())
                            .take_while(|(a, b)| a == b)
                            .count()
                    })
                    .max()
                    .unwrap_or(0);
                let tokens = shared / 4;
                let read = if tokens >= 1024 {
                    tokens / 128 * 128
                } else {
                    0
                };
                self.seen.push(text);
                Counted {
                    input,
                    read,
                    written: 0,
                }
            }
            Wire::Anthropic => {
                // Each breakpoint's prefix: read if cached, else written.
                let mut prefix = String::new();
                let mut read = 0;
                let mut last = 0;
                for (t, marked) in &parts {
                    prefix += t;
                    if *marked {
                        if self.seen.contains(&prefix) {
                            read = fake_tokens(prefix.len());
                        } else {
                            self.seen.push(prefix.clone());
                        }
                        last = fake_tokens(prefix.len());
                    }
                }
                Counted {
                    input,
                    read,
                    written: last.saturating_sub(read),
                }
            }
        }
    }
}

fn reply(
    wire: Wire,
    text: &str,
    calls: &[(String, String)],
    shape: Shape,
    usage: Counted,
    ids: &mut u64,
) -> Value {
    let mut next = || {
        *ids += 1;
        if shape == Shape::NoIds {
            String::new()
        } else {
            format!("call_{ids}")
        }
    };
    let cut = |args: &str| -> String {
        if shape == Shape::Truncated {
            args.chars().take(args.chars().count() / 2).collect()
        } else {
            args.to_string()
        }
    };
    let output = if shape == Shape::Truncated { 4096 } else { 100 };
    match wire {
        Wire::OpenAi => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .map(|(name, args)| {
                    let mut call = json!({"type": "function", "function": {"name": name, "arguments": cut(args)}});
                    let id = next();
                    if !id.is_empty() {
                        call["id"] = json!(id);
                    }
                    call
                })
                .collect();
            let mut message = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !tool_calls.is_empty() {
                message["tool_calls"] = json!(tool_calls);
            }
            let finish = match (shape, calls.is_empty()) {
                (Shape::Truncated, _) => "length",
                (_, true) => "stop",
                (_, false) => "tool_calls",
            };
            json!({
                "id": "chatcmpl-test", "object": "chat.completion", "model": "test",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": usage.input, "completion_tokens": output, "total_tokens": usage.input + output,
                    "prompt_tokens_details": {"cached_tokens": usage.read}},
            })
        }
        Wire::Anthropic => {
            let mut content = Vec::new();
            if !text.is_empty() {
                content.push(json!({"type": "text", "text": text}));
            }
            for (name, args) in calls {
                // A model's malformed input reaches us as a string; keep it one.
                let args = cut(args);
                let input = serde_json::from_str::<Value>(&args).unwrap_or(json!(args));
                content
                    .push(json!({"type": "tool_use", "id": next(), "name": name, "input": input}));
            }
            let stop = match (shape, calls.is_empty()) {
                (Shape::Truncated, _) => "max_tokens",
                (_, true) => "end_turn",
                (_, false) => "tool_use",
            };
            json!({
                "id": "msg_test", "type": "message", "role": "assistant", "model": "test",
                "content": content,
                "stop_reason": stop,
                "usage": {"input_tokens": usage.input - usage.read - usage.written, "output_tokens": output,
                    "cache_read_input_tokens": usage.read, "cache_creation_input_tokens": usage.written},
            })
        }
    }
}

/// Everything a real provider would reject, and a few things ours must never do.
fn validate(wire: Wire, key: &str, req: &Received) -> Vec<String> {
    let mut bad = Vec::new();
    let b = &req.body;
    if !b["model"].is_string() {
        bad.push("no model".into());
    }
    match wire {
        Wire::OpenAi => {
            if req.path != "/v1/chat/completions" {
                bad.push(format!("path {}", req.path));
            }
            if req.header("authorization") != Some(&format!("Bearer {key}")) {
                bad.push("missing or wrong Authorization: Bearer".into());
            }
            for t in b["tools"].as_array().into_iter().flatten() {
                if t["type"] != "function"
                    || !t["function"]["name"].is_string()
                    || t["function"]["parameters"]["type"] != "object"
                {
                    bad.push(format!("bad tool {t}"));
                }
            }
            let msgs = b["messages"].as_array().cloned().unwrap_or_default();
            if msgs.first().map(|m| &m["role"]) != Some(&json!("system")) {
                bad.push("the first message is not the system prompt".into());
            }
            let mut open: Vec<String> = Vec::new();
            for m in &msgs {
                match m["role"].as_str() {
                    Some("system") | Some("user") => {
                        if !open.is_empty() {
                            bad.push(format!(
                                "tool calls {open:?} not answered before a {} message",
                                m["role"]
                            ));
                            open.clear();
                        }
                    }
                    Some("assistant") => {
                        if !open.is_empty() {
                            bad.push(format!("tool calls {open:?} not answered"));
                        }
                        open = m["tool_calls"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|c| c["id"].as_str().unwrap_or("").to_string())
                            .collect();
                        for c in m["tool_calls"].as_array().into_iter().flatten() {
                            if c["type"] != "function" || !c["function"]["arguments"].is_string() {
                                bad.push(format!("bad tool call {c}"));
                            }
                            // vLLM and llama.cpp parse replayed arguments: text that is not
                            // a JSON object fails the whole request.
                            let args = c["function"]["arguments"].as_str().unwrap_or("");
                            if !serde_json::from_str::<Value>(args).is_ok_and(|v| v.is_object()) {
                                bad.push(format!(
                                    "replayed arguments are not a JSON object: {args}"
                                ));
                            }
                            if c["id"].as_str().is_none_or(str::is_empty) {
                                bad.push(format!("a tool call without an id: {c}"));
                            }
                        }
                    }
                    Some("tool") => {
                        let id = m["tool_call_id"].as_str().unwrap_or("");
                        match open.iter().position(|o| o == id) {
                            Some(i) => {
                                open.remove(i);
                            }
                            None => bad.push(format!("tool result for unknown id `{id}`")),
                        }
                        if !m["content"].is_string() {
                            bad.push("tool content is not a string".into());
                        }
                    }
                    other => bad.push(format!("unknown role {other:?}")),
                }
            }
        }
        Wire::Anthropic => {
            if req.path != "/v1/messages" {
                bad.push(format!("path {}", req.path));
            }
            if req.header("x-api-key") != Some(key) {
                bad.push("missing or wrong x-api-key".into());
            }
            if req.header("anthropic-version").is_none() {
                bad.push("no anthropic-version header".into());
            }
            if req.header("authorization").is_some() {
                bad.push("an Authorization header sent to Anthropic".into());
            }
            if !b["max_tokens"].is_u64() {
                bad.push("max_tokens is required".into());
            }
            let system_ok = b["system"].is_string()
                || b["system"].as_array().is_some_and(|blocks| {
                    blocks.iter().all(|x| {
                        x["type"] == "text" && x["text"].as_str().is_some_and(|t| !t.is_empty())
                    })
                });
            if !system_ok {
                bad.push("system must be a string or a list of non-empty text blocks".into());
            }
            let text = b.to_string();
            let breakpoints = text.matches("\"cache_control\"").count();
            if breakpoints > 4 {
                bad.push(format!("{breakpoints} cache_control blocks (at most 4)"));
            }
            let ephemeral = text
                .matches("\"cache_control\":{\"type\":\"ephemeral\"}")
                .count();
            if ephemeral != breakpoints {
                bad.push("a cache_control that is not {\"type\":\"ephemeral\"}".into());
            }
            for t in b["tools"].as_array().into_iter().flatten() {
                if !t["name"].is_string() || t["input_schema"]["type"] != "object" {
                    bad.push(format!("bad tool {t}"));
                }
            }
            let msgs = b["messages"].as_array().cloned().unwrap_or_default();
            let mut expect_user = true;
            let mut open: Vec<String> = Vec::new();
            for m in &msgs {
                let role = m["role"].as_str().unwrap_or("");
                if (role == "user") != expect_user {
                    bad.push(format!("roles do not alternate at a {role} message"));
                }
                expect_user = !expect_user;
                let blocks = m["content"].as_array().cloned().unwrap_or_default();
                if role == "user" {
                    let answered: Vec<String> = blocks
                        .iter()
                        .filter(|b| b["type"] == "tool_result")
                        .map(|b| b["tool_use_id"].as_str().unwrap_or("").to_string())
                        .collect();
                    if answered != open {
                        bad.push(format!("tool_use {open:?} answered with {answered:?}"));
                    }
                    // Tool results come first in their message.
                    if let Some(first_text) = blocks.iter().position(|b| b["type"] == "text")
                        && blocks
                            .iter()
                            .skip(first_text)
                            .any(|b| b["type"] == "tool_result")
                    {
                        bad.push("a tool_result after text in a user message".into());
                    }
                    open.clear();
                } else {
                    for b in &blocks {
                        if b["type"] == "text"
                            && b["text"].as_str().is_none_or(|t| t.trim().is_empty())
                        {
                            bad.push("an empty text block".into());
                        }
                        if b["type"] == "tool_use" {
                            if b["id"].as_str().is_none_or(str::is_empty) {
                                bad.push("a tool_use without an id".into());
                            }
                            if !b["input"].is_object() {
                                bad.push("tool_use input is not an object".into());
                            }
                            open.push(b["id"].as_str().unwrap_or("").to_string());
                        }
                    }
                }
            }
            if !open.is_empty() {
                bad.push(format!("tool_use {open:?} never answered"));
            }
        }
    }
    bad
}

pub fn seen(wire: Wire, body: &Value) -> Seen {
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    let mut s = Seen::default();
    match wire {
        Wire::OpenAi => {
            s.opening = msgs
                .iter()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_string();
            s.turns = msgs.iter().filter(|m| m["role"] == "assistant").count();
            for m in msgs.iter().rev() {
                if m["role"] != "tool" {
                    break;
                }
                let content = m["content"].as_str().unwrap_or("").to_string();
                s.results.insert(0, (content, false));
            }
        }
        Wire::Anthropic => {
            // Every text block of the first message (the opening comes in two).
            s.opening = msgs
                .first()
                .and_then(|m| m["content"].as_array())
                .map(|blocks| {
                    blocks
                        .iter()
                        .filter(|b| b["type"] == "text")
                        .filter_map(|b| b["text"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            s.turns = msgs.iter().filter(|m| m["role"] == "assistant").count();
            if let Some(last) = msgs.last().filter(|m| m["role"] == "user") {
                for b in last["content"].as_array().into_iter().flatten() {
                    if b["type"] == "tool_result" {
                        s.results.push((
                            b["content"].as_str().unwrap_or("").to_string(),
                            b["is_error"] == true,
                        ));
                    }
                }
            }
        }
    }
    s
}

/// The experiment number the opening announces ("Experiment #N of session").
pub fn experiment(seen: &Seen) -> usize {
    seen.opening
        .split("Experiment #")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
