//! The tools the model may call, as JSON schemas, and their dispatch onto the workbench. There
//! is no shell: these operations are everything the model can do.

use serde_json::{Value, json};
use workbench::{ToolError, Workbench};

use crate::conversation::{ToolCall, ToolSpec};

pub const READ_FILE: &str = "read_file";
pub const EDIT: &str = "edit_train_file";
pub const WRITE: &str = "write_train_file";
pub const CHECK: &str = "check_compiles";
pub const RUN: &str = "run_experiment";
pub const RESULTS: &str = "show_results";
pub const SHOW: &str = "show_experiment";
pub const NOTE: &str = "add_note";

pub fn specs() -> Vec<ToolSpec> {
    let obj = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
    vec![
        ToolSpec {
            name: READ_FILE,
            description: "Read a file of the repository (e.g. prepare/src/eval.rs), optionally only lines start_line..=end_line (1-based). A long file comes in pages of whole lines; the result says which lines it holds and where the next page starts. Not .git/, target/ or runs/.",
            parameters: obj(
                json!({
                    "path": {"type": "string", "description": "relative to the repository root"},
                    "start_line": {"type": "integer", "minimum": 1},
                    "end_line": {"type": "integer", "minimum": 1},
                }),
                &["path"],
            ),
        },
        ToolSpec {
            name: EDIT,
            description: "Replace old_text with new_text in train/src/main.rs. old_text must match exactly once (whitespace included).",
            parameters: obj(
                json!({"old_text": {"type": "string"}, "new_text": {"type": "string"}}),
                &["old_text", "new_text"],
            ),
        },
        ToolSpec {
            name: WRITE,
            description: "Replace the whole of train/src/main.rs with content.",
            parameters: obj(json!({"content": {"type": "string"}}), &["content"]),
        },
        ToolSpec {
            name: CHECK,
            description: "Build train/src/main.rs without training; returns the compiler's errors, if any.",
            parameters: obj(json!({}), &[]),
        },
        ToolSpec {
            name: RUN,
            description: "Commit train/src/main.rs as this episode's experiment, train it for the fixed budget and evaluate it. Once per episode; it ends the episode. The harness keeps it if val_bpb beats the best so far.",
            parameters: obj(
                json!({
                    "description": {"type": "string", "description": "one line: what changed, e.g. 'matrix_lr 0.04 -> 0.05'"},
                    "rationale": {"type": "string", "description": "why you expect it to help"},
                }),
                &["description", "rationale"],
            ),
        },
        ToolSpec {
            name: RESULTS,
            description: "Every experiment of this session: hash, val_bpb, memory, status, description.",
            parameters: obj(json!({}), &[]),
        },
        ToolSpec {
            name: SHOW,
            description: "One past experiment by hash: its outcome, figures and diff against its parent.",
            parameters: obj(json!({"hash": {"type": "string"}}), &["hash"]),
        },
        ToolSpec {
            name: NOTE,
            description: "Append to the session's notes, which you will see at the start of every later experiment.",
            parameters: obj(json!({"text": {"type": "string"}}), &["text"]),
        },
    ]
}

/// What a tool call came to.
pub struct Outcome {
    pub content: String,
    pub is_error: bool,
    /// The experiment ran: the episode is over.
    pub ran: bool,
}

impl Outcome {
    fn ok(content: String) -> Self {
        Outcome {
            content,
            is_error: false,
            ran: false,
        }
    }
    fn err(content: String) -> Self {
        Outcome {
            content,
            is_error: true,
            ran: false,
        }
    }
}

/// Runs one tool call. Only `ToolError::Fatal` and `Interrupted` escape; everything else goes
/// back to the model as an error result.
pub fn dispatch(
    bench: &mut dyn Workbench,
    call: &ToolCall,
    limit: usize,
) -> Result<Outcome, ToolError> {
    let args: Value = match serde_json::from_str(&call.arguments) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) | Err(_) => {
            return Ok(Outcome::err(format!(
                "the arguments of {} are not a JSON object ({}): call it again with arguments matching its schema",
                call.name,
                call.arguments.chars().take(200).collect::<String>()
            )));
        }
    };
    if let Some(spec) = specs().iter().find(|s| s.name == call.name) {
        let allowed: Vec<&str> = spec.parameters["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        if let Some(extra) = args
            .as_object()
            .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())))
        {
            return Ok(Outcome::err(format!(
                "{} takes no `{extra}` (its arguments: {}){}",
                call.name,
                allowed.join(", "),
                if extra == "path" {
                    "; only train/src/main.rs can be changed"
                } else {
                    ""
                }
            )));
        }
    }
    let text = |key: &str| -> Result<String, String> {
        args.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("{} needs a string `{key}`", call.name))
    };
    let result: Result<Result<Outcome, ToolError>, String> = (|| {
        Ok(match call.name.as_str() {
            READ_FILE => {
                let path = text("path")?;
                let line = |key: &str| match args.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v
                        .as_u64()
                        .filter(|&n| n >= 1)
                        .map(|n| Some(n as usize))
                        .ok_or_else(|| format!("{key} must be a line number, 1 or more")),
                };
                let (start, end) = (line("start_line")?, line("end_line")?);
                bench
                    .read_file(&path, None)
                    .map(|t| Outcome::ok(page(&path, &t, start, end, limit)))
            }
            EDIT => bench
                .edit_train_file(&text("old_text")?, &text("new_text")?)
                .map(|()| Outcome::ok("edited train/src/main.rs".into())),
            WRITE => bench
                .write_train_file(&text("content")?)
                .map(|()| Outcome::ok("wrote train/src/main.rs".into())),
            CHECK => bench.check().map(|c| {
                if c.compiles {
                    Outcome::ok("it compiles".into())
                } else {
                    Outcome::err(truncate(
                        &format!("it does not compile:\n{}", c.diagnostics),
                        limit,
                    ))
                }
            }),
            RUN => bench
                .run_experiment(
                    &text("description")?,
                    &text("rationale").unwrap_or_default(),
                )
                .map(|r| Outcome {
                    content: truncate(&serde_json::to_string_pretty(&r).expect("json"), limit),
                    is_error: false,
                    ran: true,
                }),
            RESULTS => Ok(Outcome::ok(truncate(
                &serde_json::to_string(&bench.results()).expect("json"),
                limit,
            ))),
            SHOW => bench
                .show(&text("hash")?)
                .map(|t| Outcome::ok(truncate(&t, limit))),
            NOTE => bench
                .append_notes(&text("text")?)
                .map(|()| Outcome::ok("noted".into())),
            other => {
                let names: Vec<&str> = specs().iter().map(|s| s.name).collect();
                return Err(format!(
                    "there is no tool `{other}`; the tools are: {}",
                    names.join(", ")
                ));
            }
        })
    })();
    match result {
        Err(bad_args) => Ok(Outcome::err(bad_args)),
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e @ (ToolError::Fatal(_) | ToolError::Interrupted))) => Err(e),
        Ok(Err(e)) => Ok(Outcome::err(e.to_string())),
    }
}

/// Lines `start..=end` of `text` (1-based; the whole file by default), as many whole lines as
/// fit in `limit` characters, under a header that says which lines these are and, when lines
/// are left, where the next page starts. Nothing is dropped without saying so.
pub fn page(
    path: &str,
    text: &str,
    start: Option<usize>,
    end: Option<usize>,
    limit: usize,
) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let total = lines.len();
    let first = start.unwrap_or(1);
    let last = end.unwrap_or(total).min(total);
    if first > total || first > last {
        return format!(
            "{path} has {total} lines: lines {first}..={} hold nothing",
            end.map_or("end".into(), |e| e.to_string())
        );
    }
    let mut body = String::new();
    let mut shown = first - 1;
    for (i, l) in lines[first - 1..last].iter().enumerate() {
        // A single line longer than the page is cut, and says so.
        if body.len() + l.len() + 1 > limit {
            if i == 0 {
                body = truncate(l, limit);
                body.push('\n');
                shown += 1;
            }
            break;
        }
        body.push_str(l);
        body.push('\n');
        shown += 1;
    }
    let whole = first == 1 && shown == total;
    let mut out = if whole {
        format!("{path} ({total} lines)\n")
    } else {
        format!("{path}, lines {first}..={shown} of {total}\n")
    };
    out += &body;
    if shown < last {
        out += &format!(
            "[page ends at line {shown}: call read_file with start_line {} for the next page]",
            shown + 1
        );
    }
    out
}

/// At most `limit` characters, with a note saying what was cut.
pub fn truncate(text: &str, limit: usize) -> String {
    let total = text.chars().count();
    if total <= limit {
        return text.to_string();
    }
    let kept: String = text.chars().take(limit).collect();
    format!(
        "{kept}\n[truncated: {} of {total} characters not shown; read a line range to see the rest]",
        total - limit
    )
}
