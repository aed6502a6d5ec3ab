//! The proposer interface.
//!
//! A *proposer* (the offline [`sweep`], or an LLM agent) does research through a [`Workbench`]:
//! a small set of plain operations on the session (read a file, edit the train file, check that
//! it compiles, run the experiment, read results and past experiments, keep notes). Each call to
//! [`Proposer::episode`] proposes and runs exactly one experiment; the harness, not the
//! proposer, decides whether it is kept.

pub mod ideas;
pub mod sweep;

use serde::Serialize;

/// What a proposer knows about the session it works in.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub tag: String,
    pub preset: String,
    pub device: String,
    pub budget_s: f64,
    pub experiments: usize,
    /// The best's val_bpb: the mean of its runs.
    pub best_val_bpb: Option<f64>,
    /// The seed noise of one run, measured in this session (None until something ran twice).
    pub noise_sigma: Option<f64>,
    /// The degrees of freedom behind `noise_sigma`.
    pub noise_samples: usize,
    /// The keep rule, in a line.
    pub keep_rule: String,
}

/// A past experiment, one line of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct ResultLine {
    pub index: usize,
    pub hash: String,
    pub val_bpb: Option<f64>,
    pub memory_gb: f64,
    /// keep, discard or crash.
    pub status: String,
    /// Successful runs (seeds) behind val_bpb, their mean; more than one = confirmed.
    pub runs: usize,
    /// Gain over the best before it, in units of one run's noise σ.
    pub gain_sigma: Option<f64>,
    pub description: String,
}

/// Whether the train file compiles, without training.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub compiles: bool,
    /// The compiler's errors, rendered (empty when it compiles).
    pub diagnostics: String,
}

/// How an experiment went, as the harness decided.
#[derive(Clone, Debug, Serialize)]
pub struct ExperimentReport {
    pub index: usize,
    pub hash: String,
    /// ok, compile_error, crash, timeout, invalid_report, tampered.
    pub outcome: String,
    /// keep, discard or crash.
    pub status: String,
    /// The mean of its runs.
    pub val_bpb: Option<f64>,
    /// Each successful run's val_bpb (a run with another seed each).
    pub runs: Vec<f64>,
    /// The session's seed noise σ when it was decided.
    pub sigma: Option<f64>,
    /// (best before − val_bpb) / σ.
    pub gain_sigma: Option<f64>,
    /// The best kept val_bpb before this experiment.
    pub best_before: Option<f64>,
    /// The run's summary block, when it reported.
    pub summary: String,
    /// Why it failed (diagnostics, log tail), empty when ok.
    pub evidence: String,
}

/// What a proposer spent on model calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spend {
    /// Every input token, cached or not.
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Of `tokens_in`, read from the provider's prompt cache.
    pub tokens_cached: u64,
    /// `None` when the model's price is unknown.
    pub cost_usd: Option<f64>,
}

impl Spend {
    pub fn add(&mut self, other: Spend) {
        self.tokens_in += other.tokens_in;
        self.tokens_out += other.tokens_out;
        self.tokens_cached += other.tokens_cached;
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
    }
}

/// An operation that did not succeed. Everything but [`ToolError::Fatal`] is the proposer's to
/// handle (an LLM gets the message back); `Fatal` ends the session.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ToolError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "this exact train file was already run as experiment {hash} ({outcome}): change something else"
    )]
    AlreadyTried { hash: String, outcome: String },
    #[error(
        "{settings} was already tried as experiment {hash} ({outcome}): try other values or another idea"
    )]
    SettingsTried {
        settings: String,
        hash: String,
        outcome: String,
    },
    #[error("this episode's experiment has already run; end the episode")]
    AlreadyRan,
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Fatal(String),
}

/// The operations a proposer may perform. Paths are relative to the repository root.
pub trait Workbench {
    fn info(&self) -> SessionInfo;
    /// A repository file the proposer may see (never `.git/`, other sessions' runs, or
    /// anything outside the repository), optionally only lines `first..=last` (1-based).
    fn read_file(&self, path: &str, lines: Option<(usize, usize)>) -> Result<String, ToolError>;
    /// The train file as it stands in the work tree.
    fn train_file(&self) -> Result<String, ToolError>;
    /// Replaces the one occurrence of `old` in the train file with `new`.
    fn edit_train_file(&mut self, old: &str, new: &str) -> Result<(), ToolError>;
    fn write_train_file(&mut self, content: &str) -> Result<(), ToolError>;
    /// Builds the train file without running it.
    fn check(&mut self) -> Result<CheckReport, ToolError>;
    /// Commits the train file as an experiment, runs it, and returns the harness's verdict.
    /// Once per episode. A train file identical to one already run is refused
    /// ([`ToolError::AlreadyTried`]) without running anything.
    fn run_experiment(
        &mut self,
        description: &str,
        rationale: &str,
    ) -> Result<ExperimentReport, ToolError>;
    fn results(&self) -> Vec<ResultLine>;
    /// A past experiment: its metrics, outcome and diff against its parent.
    fn show(&self, hash: &str) -> Result<String, ToolError>;
    /// Appends to the session's notes, the proposer's memory across episodes.
    fn append_notes(&mut self, text: &str) -> Result<(), ToolError>;
    /// The session's notes so far.
    fn notes(&self) -> String;
    /// The ledger of ideas tried (settings by name and the values tried, other changes by
    /// description), bounded in size; empty where the workbench keeps none.
    fn ideas(&self) -> String {
        String::new()
    }
    /// Adds to what the proposer has spent; recorded with this episode's experiment.
    fn record_spend(&mut self, spend: Spend);
    /// Whether the user asked the session to stop (Ctrl-C): a proposer waiting on something
    /// should give up.
    fn stop_requested(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum ProposerError {
    /// Nothing left to try: the session ends normally.
    #[error("{0}")]
    Exhausted(String),
    /// The session cannot go on (bad credentials, an unknown model, …).
    #[error("{0}")]
    Fatal(String),
    #[error(transparent)]
    Tool(#[from] ToolError),
}

pub trait Proposer {
    /// How the session's journal names this proposer.
    fn name(&self) -> String;
    /// Proposes one change and runs it through `bench.run_experiment`. Returning without
    /// running abandons the episode (the harness restores the train file).
    fn episode(&mut self, bench: &mut dyn Workbench) -> Result<(), ProposerError>;
}
