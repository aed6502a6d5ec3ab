//! `journal.jsonl`: the session's full record, one JSON event per line, appended and synced
//! before git moves. It is the source of truth: results.tsv, notes and refs are redone from it
//! on resume.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{LedgerError, io_err, keep::KeepSettings};

/// The session's settings, written once when it starts, so resume and replay use the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub tag: String,
    /// The commit the session branched from.
    pub base: String,
    pub preset: String,
    pub device: String,
    pub budget_s: f64,
    pub seed: u64,
    /// The proposer: `sweep`, or the LLM's provider/model.
    pub agent: String,
    pub started_unix: u64,
    /// How experiments are kept. Sessions from before the noise-aware rule kept on a single
    /// run, strictly below the best: they resume with that rule.
    #[serde(default = "KeepSettings::strict")]
    pub keep: KeepSettings,
}

/// An experiment committed and about to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Begin {
    pub index: usize,
    pub hash: String,
    pub parent: String,
    pub description: String,
    pub rationale: String,
    pub started_unix: u64,
    /// The worker that runs it, in a session of several: the branch does not move onto such an
    /// experiment when it begins (its parent is the kept state when its episode began), only
    /// when it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
}

/// What an experiment came to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Finish {
    /// The runner's outcome: ok, compile_error, crash, timeout, invalid_report, tampered,
    /// or interrupted (Ctrl-C).
    pub outcome: String,
    pub val_bpb: Option<f64>,
    pub memory_gb: f64,
    /// The run's summary block as JSON (absent unless the run reported).
    pub summary: Option<serde_json::Value>,
    pub build_seconds: f64,
    pub run_seconds: f64,
    /// The run's log, relative to the repository.
    pub log: Option<String>,
    /// Why it failed, in a few lines (empty when ok).
    pub evidence: String,
    /// The proposer's spend on this experiment (LLM agents only).
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    /// Of `tokens_in`, read from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_cached: Option<u64>,
    pub cost_usd: Option<f64>,
}

/// One training run of an experiment, with the seed it was given. An experiment too close to
/// call runs again with other seeds; each run is journaled as it ends, so a kill between runs
/// resumes with the next one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    pub hash: String,
    /// 0 for the first run of the experiment.
    pub run: usize,
    pub seed: u64,
    #[serde(flatten)]
    pub finish: Finish,
}

/// How the keep rule came to its decision: what the user and the agent see of the noise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// `noise` or `strict`.
    pub rule: String,
    /// Successful runs behind the experiment's val_bpb (their mean).
    pub runs: usize,
    /// The session's seed noise (one run's standard deviation) when it decided.
    pub sigma: Option<f64>,
    /// The best's val_bpb (the mean of its runs) it was compared with.
    pub best: Option<f64>,
    /// (best − val_bpb) / σ: the gain in units of one run's noise.
    pub gain_sigma: Option<f64>,
    /// Runs with different seeds gave bit-identical results: the train file ignores
    /// `AUTORESEARCH_SEED`, so its repeats measure nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seed_ignored: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct End {
    pub index: usize,
    pub hash: String,
    pub status: crate::Status,
    pub finished_unix: u64,
    /// val_bpb here is the value the decision used: the mean of the runs.
    #[serde(flatten)]
    pub finish: Finish,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judgement: Option<Judgement>,
}

/// A harness process took the session up (at its start, and at each `--resume`), with the
/// stop conditions it was given: what `status` needs to tell whether the session is alive and
/// when it will stop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attach {
    pub pid: u32,
    pub started_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_experiments: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// Experiments it runs at once (absent: one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Where they run: `slurm` (absent: on this machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Session(SessionMeta),
    Attach(Attach),
    Begin(Begin),
    Run(RunEnd),
    End(End),
}

/// Appends one event and syncs it to disk before returning.
pub fn append(path: &Path, event: &Event) -> Result<(), LedgerError> {
    let mut line = serde_json::to_string(event).expect("events serialise");
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(io_err(format!("appending to {}", path.display())))
}

/// Reads every event. A torn last line (a kill mid-write) is ignored: its event never happened.
pub fn read(path: &Path) -> Result<Vec<Event>, LedgerError> {
    let text =
        std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut events = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(event) => events.push(event),
            Err(_) if n + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(LedgerError::Journal(format!(
                    "{}:{}: {e}",
                    path.display(),
                    n + 1
                )));
            }
        }
    }
    Ok(events)
}
