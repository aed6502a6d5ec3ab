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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(script)));
        let (r, v, k) = (received.clone(), violations.clone(), key.to_string());
        std::thread::spawn(move || {
            let mut ids = 0u64;
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
                    Act::Say(text) => {
                        respond(&stream, 200, &[], &reply(wire, &text, &[], &mut ids))
                    }
                    Act::Call(calls) => {
                        respond(&stream, 200, &[], &reply(wire, "", &calls, &mut ids))
                    }
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

fn reply(wire: Wire, text: &str, calls: &[(String, String)], ids: &mut u64) -> Value {
    let mut next = || {
        *ids += 1;
        format!("call_{ids}")
    };
    match wire {
        Wire::OpenAi => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .map(|(name, args)| {
                    json!({"id": next(), "type": "function", "function": {"name": name, "arguments": args}})
                })
                .collect();
            let mut message = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !tool_calls.is_empty() {
                message["tool_calls"] = json!(tool_calls);
            }
            json!({
                "id": "chatcmpl-test", "object": "chat.completion", "model": "test",
                "choices": [{"index": 0, "message": message, "finish_reason": if calls.is_empty() { "stop" } else { "tool_calls" }}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
            })
        }
        Wire::Anthropic => {
            let mut content = Vec::new();
            if !text.is_empty() {
                content.push(json!({"type": "text", "text": text}));
            }
            for (name, args) in calls {
                // A model's malformed input reaches us as a string; keep it one.
                let input = serde_json::from_str::<Value>(args).unwrap_or(json!(args));
                content
                    .push(json!({"type": "tool_use", "id": next(), "name": name, "input": input}));
            }
            json!({
                "id": "msg_test", "type": "message", "role": "assistant", "model": "test",
                "content": content,
                "stop_reason": if calls.is_empty() { "end_turn" } else { "tool_use" },
                "usage": {"input_tokens": 1000, "output_tokens": 100},
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
            if !b["max_tokens"].is_u64() || !b["system"].is_string() {
                bad.push("max_tokens and a string system prompt are required".into());
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
                        if b["type"] == "tool_use" {
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
            s.opening = msgs
                .first()
                .and_then(|m| m["content"].as_array())
                .and_then(|b| b.iter().find(|b| b["type"] == "text"))
                .and_then(|b| b["text"].as_str())
                .unwrap_or("")
                .to_string();
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
