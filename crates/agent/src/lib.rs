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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tool_calls: 40,
            tool_result_chars: 24_000,
            result_rows: 40,
            notes_chars: 6_000,
        }
    }
}

pub struct LlmAgent {
    client: Client,
    program: String,
    price: Option<Price>,
    limits: Limits,
    runtime: tokio::runtime::Runtime,
    last_outcome: Option<String>,
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

    /// The episode's opening message, rebuilt from the session's state every time.
    fn opening(&self, bench: &dyn Workbench) -> Result<String, ToolError> {
        let info = bench.info();
        let mut out = format!(
            "Experiment #{} of session `{}` is next. Best val_bpb so far: {}.\n{}\n\n## Results so far\n",
            info.experiments,
            info.tag,
            info.best_val_bpb
                .map_or("none yet".into(), |v| format!("{v:.6}")),
            noise_line(&info)
        );
        out += &results_table(&bench.results(), self.limits.result_rows);
        let notes = bench.notes();
        if !notes.trim().is_empty() {
            let skip = notes
                .chars()
                .count()
                .saturating_sub(self.limits.notes_chars);
            out += "\n## Your notes\n";
            if skip > 0 {
                out += "[earlier notes cut]\n";
            }
            out += &notes.chars().skip(skip).collect::<String>();
        }
        if let Some(last) = &self.last_outcome {
            out += &format!("\n## Last experiment\n{last}\n");
        }
        let train = bench.train_file()?;
        out += &format!(
            "\n## train/src/main.rs (the kept state, {} lines)\n```rust\n{}\n```\n\nMake one change and call {} with a one-line description and your rationale.",
            train.lines().count(),
            train.trim_end(),
            tools::RUN
        );
        Ok(out)
    }

    fn cost(&self, usage: &conversation::Usage) -> Option<f64> {
        self.price
            .map(|p| p.cost(usage.input_tokens, usage.output_tokens))
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
        let mut messages = vec![Message::User(self.opening(bench)?)];
        let mut calls = 0usize;
        let mut shrinks = 0usize;
        loop {
            if bench.stop_requested() {
                return Err(ToolError::Interrupted.into());
            }
            let request = Request {
                system: &system,
                messages: &messages,
                tools: &specs,
            };
            let stop = || bench.stop_requested();
            let reply = match self.runtime.block_on(self.client.complete(&request, &stop)) {
                Ok(reply) => reply,
                Err(ApiError::ContextTooLong(why)) => {
                    shrinks += 1;
                    if shrinks > 4 || !shrink(&mut messages) {
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
            bench.record_spend(Spend {
                tokens_in: reply.usage.input_tokens,
                tokens_out: reply.usage.output_tokens,
                cost_usd: self.cost(&reply.usage),
            });
            let tool_calls = reply.tool_calls.clone();
            messages.push(Message::Assistant {
                text: reply.text,
                tool_calls: tool_calls.clone(),
            });
            if tool_calls.is_empty() {
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

const ELIDED: &str = "[elided to fit the context window]";

/// Frees room: elides the oldest tool results not yet elided. False when nothing is left to cut.
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
    fn long_tool_results_say_they_were_cut() {
        let t = tools::truncate(&"a".repeat(100), 10);
        assert!(t.starts_with("aaaaaaaaaa\n[truncated: 90 of 100"));
        assert_eq!(tools::truncate("short", 10), "short");
    }
}
