//! Replays one experiment by hash in a temporary worktree, with its session's budget, device,
//! preset and seed, leaving the user's tree untouched.

use std::path::Path;
use std::time::Duration;

use ledger::{Record, Worktree};
use runner::{Device, Experiment, Verdict};

use crate::SessionError;

pub struct Replay {
    pub tag: String,
    pub record: Record,
    /// The value its decision used (the mean of its runs).
    pub recorded: Option<f64>,
    /// The session's seed noise, to read the drift against.
    pub sigma: Option<f64>,
    pub seed: u64,
    pub verdict: Verdict,
}

impl Replay {
    pub fn replayed(&self) -> Option<f64> {
        self.verdict.report.as_ref().map(|r| r.summary.val_bpb)
    }

    /// Replayed minus recorded.
    pub fn drift(&self) -> Option<f64> {
        Some(self.replayed()? - self.recorded?)
    }

    /// The drift in units of the session's σ: within ±2 it reproduces as well as noise allows.
    pub fn drift_sigma(&self) -> Option<f64> {
        let sigma = self.sigma.filter(|s| *s > 0.0)?;
        Some(self.drift()? / sigma)
    }
}

pub fn replay(
    repo: &Path,
    hash: &str,
    cache: &Path,
    target_dir: &Path,
    sandbox: bool,
    on_line: &mut dyn FnMut(&str),
) -> Result<Replay, SessionError> {
    let (session, record) = ledger::find_experiment(repo, hash)?;
    let meta = &session.meta;
    let data = prepare::Dataset::open(cache)?;
    if data.preset().name != meta.preset {
        return Err(SessionError::Settings(format!(
            "experiment {} ran on preset {}, the prepared data is {}: `autoresearch prepare --preset {}` first",
            record.short(),
            meta.preset,
            data.preset().name,
            meta.preset
        )));
    }
    let worktree = Worktree::add(repo, &record.begin.hash)?;
    let device = if meta.device == "cuda" {
        Device::Cuda
    } else {
        Device::Cpu
    };
    let mut exp = Experiment::new(
        worktree.path(),
        cache,
        device,
        Duration::from_secs_f64(meta.budget_s),
    );
    // The seed of its first run: a replay reproduces the run, so what drifts is the machine's.
    exp.seed = record.runs.first().map_or(meta.seed, |r| r.seed);
    exp.sandbox = sandbox;
    exp.target_dir = target_dir.to_path_buf();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = format!("{}-{stamp}", record.short());
    exp.run_dir = session.dir.join("replays").join(&name);
    exp.log_path = session.dir.join("replays").join(format!("{name}.log"));
    let verdict = runner::run(&exp, on_line)?;
    drop(worktree);
    Ok(Replay {
        tag: meta.tag.clone(),
        recorded: record.val_bpb(),
        sigma: session.noise().map(|n| n.sigma),
        seed: exp.seed,
        record,
        verdict,
    })
}
