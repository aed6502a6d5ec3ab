//! Runs one experiment: build `train/`, run the binary under a harness-owned clock, environment
//! and hard timeout, and decide the outcome from evidence the train file cannot forge alone.
//!
//! The train file is untrusted code. The runner owns the time (a hard timeout kills the whole
//! process group), the environment (an allowlist: no API keys, tokens or proxy credentials),
//! and the verdict (the JSON report must carry the manifest's evaluation count and digest, agree
//! with the printed summary and with the runner's own wall clock; files other than
//! `train/src/main.rs` must be unchanged, and are restored if not).

mod build;
mod guard;
mod process;
mod sandbox;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prepare::{Manifest, RunReport, Summary};
use serde::Serialize;

pub use build::{BuildOutput, Diagnostic, build_train};
pub use guard::Snapshot;
pub use process::{ChildRun, LogCap, last_lines};

/// The file the agent may change; everything else tracked is guarded.
pub const TRAIN_FILE: &str = "train/src/main.rs";

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("`cargo` was not found: install Rust with rustup (https://rustup.rs) and try again")]
    NoCargo,
    #[error(
        "the CUDA build needs `nvcc`: install the CUDA toolkit, or `source scripts/cuda-env.sh` for a wheel-based one"
    )]
    NoCuda,
    #[error("{0}")]
    Prepare(#[from] prepare::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Other(String),
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks the run in progress (and any later one) to stop: its process group is killed and
/// [`run`] returns [`RunnerError::Interrupted`]. Async-signal-safe: a SIGINT handler may call it.
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunnerError {
    let what = what.into();
    move |source| RunnerError::Io { what, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// CUDA when `nvidia-smi` finds a GPU, else CPU.
    pub fn detect() -> Self {
        let gpu = std::process::Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
        if gpu { Device::Cuda } else { Device::Cpu }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    CompileError,
    Crash,
    Timeout,
    InvalidReport,
    Tampered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::CompileError => "compile_error",
            Outcome::Crash => "crash",
            Outcome::Timeout => "timeout",
            Outcome::InvalidReport => "invalid_report",
            Outcome::Tampered => "tampered",
        }
    }
}

/// One experiment to run.
#[derive(Clone, Debug)]
pub struct Experiment {
    /// The checkout whose `train/` is built (the repository, or a worktree of it).
    pub repo: PathBuf,
    /// Cargo target directory for experiment builds, shared by every checkout of the repository
    /// so compiled dependencies are reused and developers' builds never hold its lock.
    pub target_dir: PathBuf,
    /// Prepared data.
    pub cache: PathBuf,
    pub device: Device,
    pub budget: Duration,
    pub seed: u64,
    /// Where the run's output goes (capped).
    pub log_path: PathBuf,
    /// The train binary's working directory; its report is written here.
    pub run_dir: PathBuf,
    /// Time allowed beyond the budget for start-up (data load, warm-up steps).
    pub startup_grace: Duration,
    /// Time allowed beyond the budget for the evaluation.
    pub eval_grace: Duration,
    pub log_cap: LogCap,
    /// Confine the run with Landlock where the kernel has it (writes only under the run dir
    /// and `/dev`; no TCP).
    pub sandbox: bool,
}

impl Experiment {
    /// Defaults for `repo`: target dir `target/experiments`, graces scaled to the budget.
    pub fn new(repo: &Path, cache: &Path, device: Device, budget: Duration) -> Self {
        Experiment {
            repo: repo.to_path_buf(),
            target_dir: repo.join("target").join("experiments"),
            cache: cache.to_path_buf(),
            device,
            budget,
            seed: 42,
            log_path: repo.join("runs").join("train.log"),
            run_dir: repo.join("runs"),
            startup_grace: Duration::from_secs(60),
            eval_grace: budget / 2 + Duration::from_secs(60),
            log_cap: LogCap::default(),
            sandbox: true,
        }
    }

    /// Budget plus both graces: past this the process group is killed.
    pub fn hard_timeout(&self) -> Duration {
        self.budget + self.startup_grace + self.eval_grace
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Present for `ok` (and for reports that were read but rejected).
    pub report: Option<RunReport>,
    /// Why, in a few lines: diagnostics, log tail, the check that failed, the files restored.
    pub evidence: String,
    pub diagnostics: Vec<Diagnostic>,
    pub log_path: PathBuf,
    pub build_seconds: f64,
    /// Process start to exit, measured by the runner.
    pub run_seconds: f64,
    /// The run's process group (its leader's pid), gone by the time the verdict exists.
    #[serde(skip)]
    pub pgid: Option<i32>,
}

/// How far the runner's wall clock may fall short of a reported training time: the process
/// measures its training inside its own lifetime, so only clock granularity separates them.
pub const CLOCK_TOLERANCE_S: f64 = 0.5;

/// Builds and runs `exp`, calling `on_line` with each line the train binary prints.
pub fn run(exp: &Experiment, on_line: &mut dyn FnMut(&str)) -> Result<Verdict, RunnerError> {
    let manifest = Manifest::load(&exp.cache)?;
    let snapshot = Snapshot::take(&exp.repo)?;
    let verdict = |outcome, evidence: String| Verdict {
        outcome,
        report: None,
        evidence,
        diagnostics: Vec::new(),
        log_path: exp.log_path.clone(),
        build_seconds: 0.0,
        run_seconds: 0.0,
        pgid: None,
    };

    std::fs::create_dir_all(&exp.run_dir).map_err(io_err("creating the run directory"))?;
    let t = Instant::now();
    // Checkouts share the target dir, and so the path cargo leaves the binary at: build and take
    // a private copy of it under a file lock (other harness processes included).
    let built = {
        let _lock = lock_file(&exp.target_dir.join("runner.lock"))?;
        match build_train(&exp.repo, &exp.target_dir, exp.device)? {
            BuildOutput::Built(exe) => {
                let private = exp.run_dir.join("train-bin");
                copy_fresh(&exe, &private)?;
                BuildOutput::Built(private)
            }
            failed => failed,
        }
    };
    let build_seconds = t.elapsed().as_secs_f64();
    // A Ctrl-C at the terminal reaches cargo too: its failure is the interruption, not the code's.
    if interrupted() {
        return Err(RunnerError::Interrupted);
    }
    let exe = match built {
        BuildOutput::Built(exe) => exe,
        BuildOutput::Failed(diagnostics) => {
            let evidence = diagnostics
                .iter()
                .map(|d| d.rendered.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            return Ok(Verdict {
                diagnostics,
                build_seconds,
                ..verdict(Outcome::CompileError, evidence)
            });
        }
    };

    let report_path = exp.run_dir.join("report.json");
    match std::fs::remove_file(&report_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("removing the last report")(e));
        }
        _ => {}
    }
    let child = match process::run_child(exp, &manifest.preset.name, &exe, &report_path, on_line) {
        Err(RunnerError::Interrupted) => {
            snapshot.restore_changes()?;
            return Err(RunnerError::Interrupted);
        }
        child => child?,
    };
    let verdict = |outcome, evidence| Verdict {
        build_seconds,
        run_seconds: child.wall.as_secs_f64(),
        pgid: Some(child.pgid),
        ..verdict(outcome, evidence)
    };
    let tail = last_lines(&child.tail, 40);

    // Whatever else happened, files outside the train file must be as they were.
    let restored = snapshot.restore_changes()?;
    if !restored.is_empty() {
        let evidence = format!(
            "changed files outside {TRAIN_FILE} (restored): {}",
            restored.join(", ")
        );
        return Ok(verdict(Outcome::Tampered, evidence));
    }
    if child.timed_out {
        let evidence = format!(
            "killed after {:.0}s (budget {:.0}s + grace); last output:\n{tail}",
            child.wall.as_secs_f64(),
            exp.budget.as_secs_f64(),
        );
        return Ok(verdict(Outcome::Timeout, evidence));
    }
    if !child.status.success() {
        let evidence = format!("{}; last output:\n{tail}", describe(&child.status));
        return Ok(verdict(Outcome::Crash, evidence));
    }
    match check_report(&report_path, &manifest, &child, exp) {
        Ok(report) => Ok(Verdict {
            report: Some(report),
            ..verdict(Outcome::Ok, String::new())
        }),
        Err(why) => Ok(verdict(
            Outcome::InvalidReport,
            format!("{why}; last output:\n{tail}"),
        )),
    }
}

/// Copies the binary into the run dir as a new file. The run dir is the last run's to write:
/// whatever it left at that name (a symlink to a hook, say) is removed, never written through.
fn copy_fresh(from: &Path, to: &Path) -> Result<(), RunnerError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("removing the last train binary")(e));
        }
        _ => {}
    }
    let mut src = std::fs::File::open(from).map_err(io_err("reading the train binary"))?;
    // create_new = O_CREAT|O_EXCL: fails on any existing path, a symlink included.
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(io_err("copying the train binary"))?;
    std::io::copy(&mut src, &mut dst).map_err(io_err("copying the train binary"))?;
    Ok(())
}

/// Builds the checkout's train file without running it: the compiler's errors, none if it builds.
pub fn check(exp: &Experiment) -> Result<Vec<Diagnostic>, RunnerError> {
    let _lock = lock_file(&exp.target_dir.join("runner.lock"))?;
    let built = build_train(&exp.repo, &exp.target_dir, exp.device)?;
    if interrupted() {
        return Err(RunnerError::Interrupted);
    }
    Ok(match built {
        BuildOutput::Built(_) => Vec::new(),
        BuildOutput::Failed(diagnostics) => diagnostics,
    })
}

/// An exclusive `flock` on `path`, held until the returned file is dropped.
fn lock_file(path: &Path) -> Result<std::fs::File, RunnerError> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("creating the target dir"))?;
    }
    let file =
        std::fs::File::create(path).map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: a plain syscall on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err("locking the target dir")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".into(),
    }
}

/// Accepts the report only when it is consistent with the manifest, the printed summary and
/// the runner's clock.
fn check_report(
    path: &Path,
    manifest: &Manifest,
    child: &ChildRun,
    exp: &Experiment,
) -> Result<RunReport, String> {
    let report = RunReport::read_json(path)
        .map_err(|e| format!("no valid JSON report from the evaluator ({e})"))?;
    if report.eval != manifest.eval {
        return Err(format!(
            "the report's evaluation ({} tokens, digest {}) is not the manifest's ({} tokens, digest {}): val_bpb must come from prepare::evaluate_bpb",
            report.eval.tokens,
            short(&report.eval.digest),
            manifest.eval.tokens,
            short(&manifest.eval.digest)
        ));
    }
    let printed = Summary::parse(&child.tail).ok_or("no summary block in the output")?;
    // Compared as printed: the block rounds each figure.
    if printed.to_block() != report.summary.to_block() {
        return Err(format!(
            "the printed summary (val_bpb {}) differs from the JSON report (val_bpb {})",
            printed.val_bpb, report.summary.val_bpb
        ));
    }
    let wall = child.wall.as_secs_f64();
    if report.summary.training_seconds > wall + CLOCK_TOLERANCE_S {
        return Err(format!(
            "reports {:.1}s of training in a process that ran {wall:.1}s",
            report.summary.training_seconds
        ));
    }
    if report.preset != manifest.preset.name || report.device != exp.device.as_str() {
        return Err(format!(
            "report is for preset {} on {}, the run was {} on {}",
            report.preset,
            report.device,
            manifest.preset.name,
            exp.device.as_str()
        ));
    }
    Ok(report)
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_link_left_in_the_run_dir_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim-hook");
        std::fs::write(&victim, "#!/bin/sh\necho original\n").unwrap();
        let exe = dir.path().join("built");
        std::fs::write(&exe, "new binary").unwrap();
        let planted = dir.path().join("train-bin");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        super::copy_fresh(&exe, &planted).unwrap();
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "#!/bin/sh\necho original\n"
        );
        assert!(
            !std::fs::symlink_metadata(&planted)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "new binary");
    }
}
