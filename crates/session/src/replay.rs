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
    pub recorded: Option<f64>,
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
    exp.seed = meta.seed;
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
        record,
        verdict,
    })
}
