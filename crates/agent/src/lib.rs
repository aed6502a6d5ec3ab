//! The LLM proposer. Each episode builds a fresh context (program.md, the current train file, a
//! compact results table, the session's notes, the last outcome), lets the model work through
//! the workbench's tools, and ends when the model runs its experiment. Hundreds of experiments
//! never fill a context window, and the harness, never the model, decides keep or revert.

pub mod client;
pub mod conversation;
pub mod prices;
pub mod provider;
pub mod tools;

use workbench::{Proposer, ProposerError, ResultLine, Spend, ToolError, Workbench};

pub use client::{ApiError, Client, RetryPolicy};
use conversation::{Message, Request};
pub use prices::Price;
pub use provider::Provider;

/// How an episode may go.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Tool calls an episode may make before it is abandoned.
    pub tool_calls: usize,
    /// Characters of one tool result the model sees.
    pub tool_result_chars: usize,
    /// Rows of the results table in the context (the latest, plus the best).
    pub result_rows: usize,
    /// Characters of the notes in the context (the latest).
    pub notes_chars: usize,
    /// Output tokens a reply may have.
    pub max_output_tokens: u32,
    /// The model's context window in tokens, where known (a flag, `autoresearch.toml`, the
    /// model table, or learned from the server's error): no request of an episode outgrows it.
    pub context_window: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tool_calls: 40,
            tool_result_chars: 24_000,
            result_rows: 40,
            notes_chars: 6_000,
            max_output_tokens: prices::DEFAULT_OUTPUT,
            context_window: None,
        }
    }
}

/// The fewest output tokens a request asks for when the window is tight: room for an edit
/// and a short rationale.
const MIN_OUTPUT: u32 = 2_048;

/// Characters per token until a reply's usage has measured it: code and English run ~3.5–4,
/// so 3 errs on the side of a request that fits.
const CHARS_PER_TOKEN: f64 = 3.0;

/// A reply without tool calls keeps this many characters in the history.
const TALK_KEPT: usize = 600;

pub struct LlmAgent {
    client: Client,
    program: String,
    price: Option<Price>,
    limits: Limits,
    runtime: tokio::runtime::Runtime,
    last_outcome: Option<String>,
    /// Measured characters per token of this model's tokenizer (from the last reply's usage).
    chars_per_token: f64,
}

impl LlmAgent {
    pub fn new(
        client: Client,
        program: String,
        price: Option<Price>,
        limits: Limits,
    ) -> Result<Self, ApiError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ApiError::Fatal(format!("async runtime: {e}")))?;
        Ok(LlmAgent {
            client,
            program,
            price,
            limits,
            runtime,
            last_outcome: None,
            chars_per_token: CHARS_PER_TOKEN,
        })
    }

    fn system(&self, bench: &dyn Workbench) -> String {
        let info = bench.info();
        format!(
            "{}\n\n# This session\nsession `{}`, preset `{}` on {}, training budget {:.0} s per experiment.",
            self.program.trim_end(),
            info.tag,
            info.preset,
            info.device,
            info.budget_s
        )
    }

    /// The episode's opening message, rebuilt from the session's state every time. The kept
    /// train file comes first (the part providers can cache until an experiment is kept), then
    /// what changes every episode. Where the window is too small for the file, the model is
    /// told to read it in pages instead.
    fn opening(
        &self,
        bench: &dyn Workbench,
        room_chars: Option<usize>,
    ) -> Result<Message, ToolError> {
        let info = bench.info();
        let train = bench.train_file()?;
        let lines = train.lines().count();
        let mut stable = format!(
            "## train/src/main.rs (the kept state, {lines} lines)\n```rust\n{}\n```\n\n",
            train.trim_end()
        );
        let mut fresh = format!(
            "Experiment #{} of session `{}` is next. Best val_bpb so far: {}.\n{}\n\n## Results so far\n",
            info.experiments,
            info.tag,
            info.best_val_bpb
                .map_or("none yet".into(), |v| format!("{v:.6}")),
            noise_line(&info)
        );
        fresh += &results_table(&bench.results(), self.limits.result_rows);
        fresh += &bench.ideas();
        let notes = bench.notes();
        if !notes.trim().is_empty() {
            let skip = notes
                .chars()
                .count()
                .saturating_sub(self.limits.notes_chars);
            fresh += "\n## Your notes\n";
            if skip > 0 {
                fresh += "[earlier notes cut]\n";
            }
            fresh += &notes.chars().skip(skip).collect::<String>();
        }
        if let Some(last) = &self.last_outcome {
            fresh += &format!("\n## Last experiment\n{last}\n");
        }
        if room_chars.is_some_and(|room| stable.len() + fresh.len() > room) {
            stable = format!(
                "## train/src/main.rs\nThe kept train file ({lines} lines, {} characters) does not fit this model's context window beside the rest: read it with {} in pages, then change it with {} (never {}: the whole file does not fit one reply).\n\n",
                train.len(),
                tools::READ_FILE,
                tools::EDIT,
                tools::WRITE
            );
        }
        fresh += &format!(
            "\nMake one change to train/src/main.rs and call {} with a one-line description and your rationale.",
            tools::RUN
        );
        Ok(Message::Opening { stable, fresh })
    }

    fn cost(&self, usage: &conversation::Usage) -> Option<f64> {
        self.price.map(|p| p.cost(usage))
    }

    /// Characters the opening may take: 60 % of the window, less the system prompt and the
    /// tools, so the episode has room to work. `None` when the window is not known.
    fn opening_room(&self, fixed_chars: usize) -> Option<usize> {
        let window = self.limits.context_window?;
        let tokens = ((window as f64 * 0.95 * 0.6) as u64).saturating_sub(self.tokens(fixed_chars));
        Some((tokens as f64 * self.chars_per_token) as usize)
    }

    /// Tokens a request of this many characters is likely to take.
    fn tokens(&self, chars: usize) -> u64 {
        (chars as f64 / self.chars_per_token).ceil() as u64
    }

    /// Output tokens to ask for, given what the prompt takes of the window; `None` when even
    /// the smallest reply does not fit beside it.
    fn output_room(&self, prompt_chars: usize) -> Option<u32> {
        let Some(window) = self.limits.context_window else {
            return Some(self.limits.max_output_tokens);
        };
        // 5 % for the chat template's own tokens and our estimate's error.
        let free = (window as f64 * 0.95) as u64;
        let room = free.saturating_sub(self.tokens(prompt_chars));
        let want = u64::from(self.limits.max_output_tokens);
        let floor = u64::from(MIN_OUTPUT).min(want);
        (room >= floor).then(|| room.min(want) as u32)
    }
}

/// What the noise is, so the model stops chasing differences inside it.
fn noise_line(info: &workbench::SessionInfo) -> String {
    let sigma = match info.noise_sigma {
        Some(s) => format!(
            "Seed noise in this session: σ = {s:.6} val_bpb per run ({} degrees of freedom); a difference smaller than about 2σ is luck, not a result.",
            info.noise_samples
        ),
        None => "Seed noise not measured yet.".into(),
    };
    format!(
        "{sigma} The harness decides what is kept; {}. val_bpb below is the mean of an experiment's runs; runs > 1 means it was re-run with other seeds to confirm.",
        info.keep_rule
    )
}

/// The results as a compact table: the latest `rows`, and the best kept if older.
pub fn results_table(results: &[ResultLine], rows: usize) -> String {
    let mut out = String::from(
        "| # | commit | val_bpb | runs | gain σ | mem GB | status | description |\n|---|---|---|---|---|---|---|---|\n",
    );
    let line = |r: &ResultLine| {
        let desc: String = r.description.chars().take(100).collect();
        format!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} |\n",
            r.index,
            r.hash,
            r.val_bpb.map_or("-".into(), |v| format!("{v:.6}")),
            r.runs,
            r.gain_sigma.map_or("-".into(), |g| format!("{g:+.1}")),
            r.memory_gb,
            r.status,
            desc
        )
    };
    let start = results.len().saturating_sub(rows);
    let best = results
        .iter()
        .filter(|r| r.status == "keep")
        .filter_map(|r| r.val_bpb.map(|v| (v, r)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, r)| r);
    if start > 0 {
        out += &format!(
            "| … | {start} earlier experiments not shown (show_results lists all) | | | | | | |\n"
        );
        if let Some(b) = best.filter(|b| b.index < start) {
            out += &line(b);
        }
    }
    for r in &results[start..] {
        out += &line(r);
    }
    out
}

impl Proposer for LlmAgent {
    fn name(&self) -> String {
        format!("{}/{}", self.client.provider.as_str(), self.client.model)
    }

    fn episode(&mut self, bench: &mut dyn Workbench) -> Result<(), ProposerError> {
        let system = self.system(bench);
        let specs = tools::specs();
        let fixed_chars = system.len() + serde_json::to_string(&specs).map_or(0, |s| s.len());
        let mut messages = vec![self.opening(bench, self.opening_room(fixed_chars))?];
        let mut calls = 0usize;
        let mut shrinks = 0usize;
        loop {
            if bench.stop_requested() {
                return Err(ToolError::Interrupted.into());
            }
            // Within the window: old tool results are elided until the reply has room.
            let max_tokens = loop {
                let chars = fixed_chars + messages.iter().map(message_chars).sum::<usize>();
                if let Some(n) = self.output_room(chars) {
                    break Some((n, chars));
                }
                if !shrink(&mut messages) {
                    break None;
                }
            };
            let Some((max_tokens, prompt_chars)) = max_tokens else {
                self.last_outcome = Some(format!(
                    "the previous episode was abandoned: its context outgrew the model's window of {} tokens",
                    self.limits.context_window.unwrap_or(0)
                ));
                return Ok(());
            };
            let request = Request {
                system: &system,
                messages: &messages,
                tools: &specs,
                max_tokens,
            };
            let stop = || bench.stop_requested();
            let reply = match self.runtime.block_on(self.client.complete(&request, &stop)) {
                Ok(reply) => reply,
                Err(ApiError::ContextTooLong(why)) => {
                    shrinks += 1;
                    // The server named its window: every later request is sized to it, and
                    // the opening is rebuilt for it.
                    let learned = client::context_window_in(&why)
                        .filter(|&w| self.limits.context_window.is_none_or(|c| w < c));
                    if let Some(window) = learned {
                        tracing::warn!(
                            "the model's context window is {window} tokens (from the server's error); requests are sized to it"
                        );
                        self.limits.context_window = Some(window);
                        messages[0] = self.opening(bench, self.opening_room(fixed_chars))?;
                    }
                    if shrinks > 4 || (learned.is_none() && !shrink(&mut messages)) {
                        self.last_outcome = Some(format!(
                            "the previous episode was abandoned: its context grew too long ({why})"
                        ));
                        return Ok(());
                    }
                    tracing::warn!("context too long; dropped older tool results and retrying");
                    continue;
                }
                Err(ApiError::Fatal(why)) => return Err(ProposerError::Fatal(why)),
                Err(ApiError::GaveUp(_)) if bench.stop_requested() => {
                    return Err(ToolError::Interrupted.into());
                }
                Err(e @ (ApiError::Rejected(_) | ApiError::GaveUp(_))) => {
                    tracing::warn!("episode abandoned: {e}");
                    self.last_outcome = Some(format!("the previous episode was abandoned: {e}"));
                    return Ok(());
                }
            };
            if reply.usage.input_tokens > 0 {
                // This model's tokenizer, measured, with 5 % to spare.
                self.chars_per_token =
                    (prompt_chars as f64 / reply.usage.input_tokens as f64 / 1.05).clamp(1.5, 6.0);
            }
            bench.record_spend(Spend {
                tokens_in: reply.usage.input_tokens,
                tokens_out: reply.usage.output_tokens,
                tokens_cached: reply.usage.cache_read_tokens,
                cost_usd: self.cost(&reply.usage),
            });
            if reply.truncated {
                // A call cut off mid-arguments must not run (half a train file would be
                // written): each gets an error, and the model is steered to small edits.
                calls += 1;
                let cut: Vec<_> = reply
                    .tool_calls
                    .iter()
                    .map(|c| conversation::ToolCall {
                        arguments: "{}".into(),
                        ..c.clone()
                    })
                    .collect();
                messages.push(Message::Assistant {
                    text: trimmed(&reply.text),
                    tool_calls: cut.clone(),
                });
                for c in &cut {
                    messages.push(Message::ToolResult {
                        id: c.id.clone(),
                        content: format!(
                            "not run: the reply stopped at the output limit ({max_tokens} tokens), so these arguments may be cut off"
                        ),
                        is_error: true,
                    });
                }
                messages.push(Message::User(format!(
                    "Your last reply was cut off at the output limit of {max_tokens} tokens{}. Do not write the whole train file: change it with {} (a few lines of old_text and new_text per call), and keep your text short.",
                    if cut.is_empty() { "" } else { ", so its tool calls were not run" },
                    tools::EDIT
                )));
                tracing::warn!(
                    "a reply hit the output limit ({max_tokens} tokens); steering the model to edits"
                );
                if calls >= self.limits.tool_calls {
                    break;
                }
                continue;
            }
            let tool_calls = reply.tool_calls.clone();
            if tool_calls.is_empty() {
                // Talk without a tool call: keep its start, not all of it, in the history.
                messages.push(Message::Assistant {
                    text: trimmed(&reply.text),
                    tool_calls: vec![],
                });
                calls += 1;
                if calls >= self.limits.tool_calls {
                    break;
                }
                messages.push(Message::User(format!(
                    "Use the tools: change train/src/main.rs, then call {} to run it. Do not ask questions; decide.",
                    tools::RUN
                )));
                continue;
            }
            messages.push(Message::Assistant {
                text: reply.text,
                tool_calls: tool_calls.clone(),
            });
            let mut ran = false;
            for call in &tool_calls {
                calls += 1;
                let outcome = if ran {
                    tools::Outcome {
                        content: "not run: the experiment has already run, the episode is over"
                            .into(),
                        is_error: true,
                        ran: false,
                    }
                } else if calls > self.limits.tool_calls {
                    tools::Outcome {
                        content: "not run: this episode's tool-call budget is spent".into(),
                        is_error: true,
                        ran: false,
                    }
                } else {
                    tools::dispatch(bench, call, self.limits.tool_result_chars)?
                };
                if outcome.ran {
                    ran = true;
                    self.last_outcome = Some(outcome.content.clone());
                }
                messages.push(Message::ToolResult {
                    id: call.id.clone(),
                    content: outcome.content,
                    is_error: outcome.is_error,
                });
            }
            if ran {
                return Ok(());
            }
            if calls >= self.limits.tool_calls {
                break;
            }
        }
        self.last_outcome = Some(format!(
            "the previous episode was abandoned: {} tool calls without running an experiment. Be decisive: one change, then {}.",
            self.limits.tool_calls,
            tools::RUN
        ));
        Ok(())
    }
}

/// What a message adds to a request, in characters (the wire format's own few aside).
fn message_chars(m: &Message) -> usize {
    match m {
        Message::Opening { stable, fresh } => stable.len() + fresh.len(),
        Message::User(t) => t.len(),
        Message::Assistant { text, tool_calls } => {
            text.len()
                + tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments.len() + c.id.len() + 16)
                    .sum::<usize>()
        }
        Message::ToolResult { content, id, .. } => content.len() + id.len() + 16,
    }
}

/// The start of what a model wrote, for the history.
fn trimmed(text: &str) -> String {
    if text.chars().count() <= TALK_KEPT {
        return text.to_string();
    }
    let kept: String = text.chars().take(TALK_KEPT).collect();
    format!("{kept} [… trimmed]")
}

const ELIDED: &str = "[elided to fit the context window]";

/// Frees room: elides the oldest tool results not yet elided, else the arguments of the
/// oldest long tool calls (a whole train file written). False when nothing is left to cut.
fn shrink(messages: &mut [Message]) -> bool {
    let mut cut = 0;
    let candidates = messages.len().saturating_sub(2);
    for m in messages.iter_mut().take(candidates) {
        if let Message::ToolResult { content, .. } = m
            && !content.starts_with(ELIDED)
        {
            *content = ELIDED.into();
            cut += 1;
            if cut >= 4 {
                break;
            }
        }
    }
    if cut == 0 {
        for m in messages.iter_mut().take(candidates) {
            if let Message::Assistant { tool_calls, .. } = m {
                for c in tool_calls.iter_mut().filter(|c| c.arguments.len() > 2_000) {
                    c.arguments = "{}".into();
                    cut += 1;
                }
            }
        }
    }
    cut > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize, status: &str, v: f64) -> ResultLine {
        ResultLine {
            index: i,
            hash: format!("{i:07}"),
            val_bpb: Some(v),
            memory_gb: 1.0,
            status: status.into(),
            runs: 1,
            gain_sigma: None,
            description: format!("experiment {i}"),
        }
    }

    #[test]
    fn the_results_table_keeps_the_latest_rows_and_the_best() {
        let mut rows: Vec<ResultLine> = (0..50).map(|i| line(i, "discard", 1.0)).collect();
        rows[3] = line(3, "keep", 0.5);
        let table = results_table(&rows, 5);
        assert_eq!(table.lines().count(), 2 + 1 + 1 + 5, "{table}");
        assert!(table.contains("| 3 | 0000003 | 0.500000") && table.contains("| 49 |"));
        assert!(table.contains("45 earlier experiments"));
        assert_eq!(results_table(&rows[..2], 5).lines().count(), 4);
    }

    #[test]
    fn shrinking_elides_old_tool_results_only() {
        let long = "x".repeat(500);
        let mut msgs = vec![
            Message::User("opening".into()),
            Message::ToolResult {
                id: "1".into(),
                content: long.clone(),
                is_error: false,
            },
            Message::ToolResult {
                id: "2".into(),
                content: long.clone(),
                is_error: false,
            },
            Message::ToolResult {
                id: "3".into(),
                content: long.clone(),
                is_error: false,
            },
        ];
        assert!(shrink(&mut msgs));
        assert_eq!(msgs[0], Message::User("opening".into()));
        assert!(
            matches!(&msgs[1], Message::ToolResult { content, .. } if content.starts_with("[elided"))
        );
        assert!(matches!(&msgs[3], Message::ToolResult { content, .. } if *content == long));
    }

    #[test]
    fn a_long_file_is_read_in_pages_of_whole_lines_that_say_where_the_next_starts() {
        let text: String = (1..=100).map(|i| format!("line {i:03}\n")).collect();
        // 9 characters a line: 50 fit in 450.
        let first = tools::page("f.rs", &text, None, None, 450);
        assert!(first.starts_with("f.rs, lines 1..=50 of 100\n"), "{first}");
        assert!(first.contains("line 050\n") && !first.contains("line 051"));
        assert!(first.ends_with("call read_file with start_line 51 for the next page]"));
        let last = tools::page("f.rs", &text, Some(51), None, 450);
        assert!(last.starts_with("f.rs, lines 51..=100 of 100\n") && !last.contains("next page"));
        assert!(tools::page("f.rs", &text, None, None, 10_000).starts_with("f.rs (100 lines)\n"));
        let range = tools::page("f.rs", &text, Some(10), Some(12), 450);
        assert!(
            range.contains("line 012\n")
                && !range.contains("line 013")
                && !range.contains("next page"),
            "{range}"
        );
        assert!(tools::page("f.rs", &text, Some(200), None, 450).contains("has 100 lines"));
    }

    #[test]
    fn shrinking_cuts_long_written_files_once_no_tool_result_is_left() {
        let mut msgs = vec![
            Message::User("opening".into()),
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![conversation::ToolCall {
                    id: "w".into(),
                    name: tools::WRITE.into(),
                    arguments: format!("{{\"content\": \"{}\"}}", "x".repeat(5_000)),
                }],
            },
            Message::ToolResult {
                id: "w".into(),
                content: ELIDED.into(),
                is_error: false,
            },
            Message::User("go on".into()),
            Message::User("go on".into()),
        ];
        assert!(shrink(&mut msgs));
        assert!(
            matches!(&msgs[1], Message::Assistant { tool_calls, .. } if tool_calls[0].arguments == "{}")
        );
        assert!(!shrink(&mut msgs), "nothing left to cut");
    }

    /// A session of `n` experiments as the opening reads it: results, ideas, long notes.
    struct Synthetic {
        n: usize,
    }

    impl Workbench for Synthetic {
        fn info(&self) -> workbench::SessionInfo {
            workbench::SessionInfo {
                tag: "night".into(),
                preset: "h100".into(),
                device: "cuda".into(),
                budget_s: 300.0,
                experiments: self.n,
                best_val_bpb: Some(0.97),
                noise_sigma: Some(0.002),
                noise_samples: 12,
                keep_rule: "noise-aware".into(),
            }
        }
        fn train_file(&self) -> Result<String, ToolError> {
            Ok(include_str!("../../../train/src/main.rs").into())
        }
        fn results(&self) -> Vec<ResultLine> {
            (0..self.n)
                .map(|i| line(i, if i % 9 == 0 { "keep" } else { "discard" }, 0.98))
                .collect()
        }
        fn ideas(&self) -> String {
            // Settings over the h100 block's 15 fields and 6 constants; every third a rewrite.
            let names: Vec<String> = (0..21).map(|k| format!("H100.setting_{k}")).collect();
            let ideas: Vec<workbench::ideas::Idea> = (1..self.n)
                .map(|i| workbench::ideas::Idea {
                    index: i,
                    hash: format!("{i:07x}"),
                    description: format!(
                        "restructure the attention block, variant {i}, with a longer description"
                    ),
                    settings: (i % 3 != 0).then(|| {
                        workbench::ideas::Settings::from([(
                            names[i % 21].clone(),
                            format!("0.{i:04}"),
                        )])
                    }),
                    val_bpb: Some(0.98),
                    status: "discard".into(),
                    gain_sigma: Some(-0.5),
                })
                .collect();
            workbench::ideas::render(&ideas)
        }
        fn notes(&self) -> String {
            "a note about what was learned so far. ".repeat(40 * self.n)
        }
        fn read_file(&self, _: &str, _: Option<(usize, usize)>) -> Result<String, ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn edit_train_file(&mut self, _: &str, _: &str) -> Result<(), ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn write_train_file(&mut self, _: &str) -> Result<(), ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn check(&mut self) -> Result<workbench::CheckReport, ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn run_experiment(
            &mut self,
            _: &str,
            _: &str,
        ) -> Result<workbench::ExperimentReport, ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn show(&self, _: &str) -> Result<String, ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn append_notes(&mut self, _: &str) -> Result<(), ToolError> {
            Err(ToolError::Invalid("not part of this measurement".into()))
        }
        fn record_spend(&mut self, _: Spend) {}
        fn stop_requested(&self) -> bool {
            false
        }
    }

    /// What an episode opens with beside the train file, at any session length.
    const FRESH_BUDGET: usize = 30_000;

    #[test]
    fn the_opening_stays_under_its_budget_at_10_100_and_500_experiments() {
        let client = Client::new(
            Provider::OpenAi,
            "m",
            "http://127.0.0.1:9",
            String::new(),
            RetryPolicy::default(),
        )
        .unwrap();
        let agent = LlmAgent::new(client, "program".into(), None, Limits::default()).unwrap();
        let mut sizes = Vec::new();
        for n in [10, 100, 500] {
            let Message::Opening { stable, fresh } = agent.opening(&Synthetic { n }, None).unwrap()
            else {
                panic!("an opening");
            };
            assert!(stable.contains("fn main()"));
            assert!(
                fresh.contains("## Ideas tried so far") && fresh.contains("[earlier notes cut]")
            );
            sizes.push((n, stable.len(), fresh.len()));
        }
        eprintln!("opening at (experiments, train file chars, rest chars): {sizes:?}");
        assert!(
            sizes.iter().all(|&(_, _, fresh)| fresh < FRESH_BUDGET),
            "{sizes:?}"
        );
        // A small window: the file is not inlined, and the opening fits what it was given.
        let Message::Opening { stable, fresh } =
            agent.opening(&Synthetic { n: 500 }, Some(25_000)).unwrap()
        else {
            panic!("an opening");
        };
        assert!(stable.contains("in pages") && stable.len() + fresh.len() < 40_000);
    }

    #[test]
    fn long_tool_results_say_they_were_cut() {
        let t = tools::truncate(&"a".repeat(100), 10);
        assert!(t.starts_with("aaaaaaaaaa\n[truncated: 90 of 100"));
        assert_eq!(tools::truncate("short", 10), "short");
    }
}
