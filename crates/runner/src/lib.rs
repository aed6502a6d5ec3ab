//! Runs one experiment: build `train/`, run the binary under a harness-owned clock, environment
//! and deadlines, and score it.
//!
//! The train file is untrusted code, hostile or buggy. The runner owns the time (start-up,
//! training and evaluation each have a deadline; training time is measured between the
//! process's marks and refused past the budget), the environment (an allowlist: no API keys,
//! tokens or proxy credentials), the data the run may read (not the validation rows), and the
//! metric: it feeds the served model the validation rows itself, computes val_bpb from the losses
//! and audits them (`evaluate`). Files other than `train/src/main.rs` must be unchanged, and
//! are restored if not. Each run gets a fresh directory, removed afterwards.

mod build;
pub mod evaluate;
mod guard;
mod limits;
mod process;
mod sandbox;
mod self_checks;
pub mod slurm;
mod supervise;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prepare::{Dataset, RunReport, Summary};
use serde::{Deserialize, Serialize};

pub use build::{BuildOutput, Diagnostic, build_train};
pub use evaluate::AuditSummary;
pub use guard::Snapshot;
pub use limits::Limits;
pub use process::{ChildRun, End, JIT_CACHE_DIR, LogCap, last_lines};
pub use self_checks::SelfChecks;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// One experiment to run (as JSON, a Slurm job's whole instructions).
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// Where the run's output goes (capped); outside `run_dir`.
    pub log_path: PathBuf,
    /// The train binary's working directory: made afresh for each run (whatever was there is
    /// removed first) and removed afterwards, so no run starts from another's leftovers.
    pub run_dir: PathBuf,
    /// Start-up (data, device, the warm-up steps) until the training-start mark; killed past it.
    pub startup_grace: Duration,
    /// Start-up that is free. Past it, start-up counts as training: work done before the
    /// training-start mark is training too.
    pub startup_allowance: Duration,
    /// The evaluation, audits included, from the request for it.
    pub eval_grace: Duration,
    pub log_cap: LogCap,
    /// Confine the run with Landlock where the kernel has it (reads from an allowlist, writes
    /// only under the run dir; no TCP).
    pub sandbox: bool,
    /// More paths the run may read (a GPU stack outside the usual places, say).
    pub sandbox_allow: Vec<PathBuf>,
    /// What the run may take of the machine (with the sandbox): tasks and memory.
    pub limits: Limits,
    /// How long the build may go on after its last dependency is built: the train crate's own
    /// compile. Past it the build is stopped and reported as a compile error.
    pub build_timeout: Duration,
    /// The GPUs the run may see (`CUDA_VISIBLE_DEVICES`), when experiments share the machine:
    /// a worker's own. `None`: the harness's own setting, if any.
    pub gpus: Option<String>,
    /// CPU threads for the run's tensor work (`RAYON_NUM_THREADS`), when experiments share the
    /// machine's cores. `None`: the harness's own setting, if any.
    pub threads: Option<usize>,
    /// A train binary already built (`build_to`): copied into the run dir instead of building.
    /// A Slurm job's run, built on the submit host.
    #[serde(default)]
    pub prebuilt: Option<PathBuf>,
    /// Run it as a Slurm job instead of a child of this process.
    #[serde(default)]
    pub slurm: Option<slurm::Slurm>,
    /// A Slurm job's run: `limits` are those of the node it lands on, not the submit host's.
    #[serde(default)]
    pub limits_from_node: bool,
    /// Whether the run may write the CUDA driver's JIT cache (`CUDA_CACHE_PATH`, `cuda-jit`
    /// under the data cache), which every run reads. Only the baseline, the train file as the
    /// user committed it, writes it: a cache every experiment could write would carry files
    /// (trained weights, say) from one experiment to the next.
    #[serde(default)]
    pub writes_jit_cache: bool,
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
            run_dir: repo.join("runs").join("work"),
            startup_grace: Duration::from_secs(60),
            startup_allowance: (budget / 10).max(Duration::from_secs(30)),
            eval_grace: budget / 2 + Duration::from_secs(60),
            log_cap: LogCap::default(),
            sandbox: true,
            sandbox_allow: Vec::new(),
            limits: Limits::for_machine(),
            // An edited train file rebuilds in seconds; its crate alone, fresh, in about a
            // minute. Ten leaves room for a loaded machine.
            build_timeout: Duration::from_secs(600),
            gpus: None,
            threads: None,
            prebuilt: None,
            slurm: None,
            limits_from_node: false,
            writes_jit_cache: false,
        }
    }

    /// Room past the budget before a run still training is killed: 10 % of the budget, at
    /// least 5 s. A run that stops inside it but later than its last step allows is refused.
    pub fn step_grace(&self) -> Duration {
        (self.budget / 10).max(Duration::from_secs(5))
    }

    /// How much past the budget the harness's training time may be: the last step (it starts
    /// before the budget is spent and ends after; twice the mean step, for its variance), at most
    /// 2 % of the budget or 2 s (the step count is the run's word), plus the pipes' latency.
    pub fn overrun_allowed(&self, training: Duration, timed_steps: u64) -> Duration {
        let step = 2.0 * training.as_secs_f64() / timed_steps.max(1) as f64;
        let cap = (self.budget.as_secs_f64() / 50.0).max(2.0);
        Duration::from_secs_f64(step.min(cap) + 0.25)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// What the audits saw (a run that was evaluated).
    pub audits: Option<AuditSummary>,
}

/// Builds and runs `exp`, calling `on_line` with each line the train binary prints.
pub fn run(exp: &Experiment, on_line: &mut dyn FnMut(&str)) -> Result<Verdict, RunnerError> {
    if let Some(cluster) = &exp.slurm {
        return slurm::run(exp, cluster, on_line);
    }
    if exp.log_path.starts_with(&exp.run_dir) {
        return Err(RunnerError::Other(format!(
            "the log {} lies inside the run directory {}, which is removed after the run: put it elsewhere",
            exp.log_path.display(),
            exp.run_dir.display()
        )));
    }
    let data = Dataset::open(&exp.cache)?;
    let rows = evaluate::Rows::load(&data)?;
    let snapshot = Snapshot::take(&exp.repo)?;
    fresh_dir(&exp.run_dir)?;
    let result = build_and_run(exp, &data, &rows, &snapshot, on_line);
    // The run's files go with it; the log lives elsewhere.
    if let Err(e) = std::fs::remove_dir_all(&exp.run_dir) {
        tracing::warn!("could not remove {}: {e}", exp.run_dir.display());
    }
    result
}

/// Builds the train binary and copies it to `dest`, under the target dir's lock (checkouts, and
/// other harness processes, share cargo's output path).
fn build_copy(exp: &Experiment, dest: &Path) -> Result<BuildOutput, RunnerError> {
    let _lock = lock_file(&exp.target_dir.join("runner.lock"))?;
    Ok(
        match build_train(&exp.repo, &exp.target_dir, exp.device, exp.build_timeout)? {
            BuildOutput::Built(exe) => {
                copy_fresh(&exe, dest)?;
                BuildOutput::Built(dest.to_path_buf())
            }
            failed => failed,
        },
    )
}

/// The verdict on a train file that does not compile.
fn compile_error(exp: &Experiment, diagnostics: Vec<Diagnostic>, build_seconds: f64) -> Verdict {
    let evidence = diagnostics
        .iter()
        .map(|d| d.rendered.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Verdict {
        diagnostics,
        build_seconds,
        ..failed(exp, Outcome::CompileError, evidence)
    }
}

/// A verdict without a report.
fn failed(exp: &Experiment, outcome: Outcome, evidence: String) -> Verdict {
    Verdict {
        outcome,
        report: None,
        evidence,
        diagnostics: Vec::new(),
        log_path: exp.log_path.clone(),
        build_seconds: 0.0,
        run_seconds: 0.0,
        audits: None,
    }
}

fn build_and_run(
    exp: &Experiment,
    data: &Dataset,
    rows: &evaluate::Rows,
    snapshot: &Snapshot,
    on_line: &mut dyn FnMut(&str),
) -> Result<Verdict, RunnerError> {
    let t = Instant::now();
    // Checkouts share the target dir, and so the path cargo leaves the binary at: build and take
    // a private copy of it under a file lock (other harness processes included).
    let private = exp.run_dir.join("train-bin");
    let built = match &exp.prebuilt {
        Some(exe) => {
            copy_fresh(exe, &private)?;
            BuildOutput::Built(private)
        }
        None => build_copy(exp, &private)?,
    };
    let build_seconds = t.elapsed().as_secs_f64();
    // A Ctrl-C at the terminal reaches cargo too: its failure is the interruption, not the code's.
    if interrupted() {
        return Err(RunnerError::Interrupted);
    }
    let exe = match built {
        BuildOutput::Built(exe) => exe,
        BuildOutput::Failed(diagnostics) => {
            return Ok(compile_error(exp, diagnostics, build_seconds));
        }
    };

    let mut setup = process::Setup {
        exe: &exe,
        data,
        rows,
        check: None,
        fault: None,
        verdicts: None,
    };
    // Sandboxed on a GPU, the fused kernels are checked in the harness's own checking
    // processes (`self_checks`): a child of the run could not open the device.
    let verdicts = match (exp.sandbox, exp.device) {
        (true, Device::Cuda) => match self_checks::run(exp, &setup, "cuda:0", None) {
            Err(RunnerError::Interrupted) => {
                snapshot.restore_changes()?;
                return Err(RunnerError::Interrupted);
            }
            checks => Some(checks?.env_value()),
        },
        _ => None,
    };
    setup.verdicts = verdicts.as_deref();
    let child = match process::run_child(exp, &setup, on_line) {
        Err(RunnerError::Interrupted) => {
            snapshot.restore_changes()?;
            return Err(RunnerError::Interrupted);
        }
        child => child?,
    };
    let verdict = |outcome, evidence| Verdict {
        build_seconds,
        run_seconds: child.wall.as_secs_f64(),
        ..failed(exp, outcome, evidence)
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
    let phases = [child.startup, child.training, child.evaluation];
    let first_reply = child.first_reply.unwrap_or_default();
    let (scored, stats) = match child.end {
        process::End::TimedOut(why) => {
            return Ok(verdict(
                Outcome::Timeout,
                format!("{why}; killed. Last output:\n{tail}"),
            ));
        }
        process::End::Exited(status) => {
            return Ok(verdict(
                Outcome::Crash,
                format!(
                    "{}; last output:\n{tail}{}",
                    describe(&status),
                    refusal_note(exp, &tail)
                ),
            ));
        }
        process::End::Invalid(why) => {
            return Ok(verdict(
                Outcome::InvalidReport,
                format!("{why}. Last output:\n{tail}{}", refusal_note(exp, &tail)),
            ));
        }
        process::End::Evaluated { scored, stats } => (scored, stats),
    };
    // Training, by the harness's clock: training-start mark to the request for evaluation,
    // plus the first request's round trip and any start-up past its allowance (work the run
    // could have done outside the marks).
    let excess_startup = phases[0]
        .unwrap_or_default()
        .saturating_sub(exp.startup_allowance);
    let training = phases[1].unwrap_or_default() + first_reply + excess_startup;
    let timed_steps = stats
        .num_steps
        .saturating_sub(prepare::clock::WARMUP_STEPS + 1);
    let allowed = exp.budget + exp.overrun_allowed(training, timed_steps);
    if training > allowed {
        let startup_note = if excess_startup.is_zero() {
            String::new()
        } else {
            format!(
                " (of which {:.2}s of start-up past its {:.0}s allowance)",
                excess_startup.as_secs_f64(),
                exp.startup_allowance.as_secs_f64()
            )
        };
        return Ok(verdict(
            Outcome::InvalidReport,
            format!(
                "trained {:.2}s by the harness's clock{startup_note}, for a budget of {:.2}s (at most {:.2}s with its last step): a run must stop when prepare's budget clock is spent. Last output:\n{tail}",
                training.as_secs_f64(),
                exp.budget.as_secs_f64(),
                allowed.as_secs_f64()
            ),
        ));
    }
    if scored.spec != data.manifest.eval {
        return Err(RunnerError::Other(format!(
            "the validation rows ({} tokens) do not match the manifest's ({} tokens): run `autoresearch prepare --force`",
            scored.spec.tokens, data.manifest.eval.tokens
        )));
    }
    let training_seconds = training.as_secs_f64();
    let summary = Summary {
        val_bpb: scored.val_bpb,
        training_seconds,
        total_seconds: child.wall.as_secs_f64(),
        peak_vram_mb: stats.peak_vram_mb,
        mfu_percent: prepare::protocol::mfu_percent(
            exp.device == Device::Cuda,
            stats.flops_per_token,
            prepare::protocol::timed_tokens(&stats),
            training_seconds,
        ),
        total_tokens_m: stats.total_tokens as f64 / 1e6,
        num_steps: stats.num_steps,
        num_params_m: stats.num_params as f64 / 1e6,
        depth: stats.depth,
    };
    append_summary(exp, phases, &summary, &scored)?;
    Ok(Verdict {
        report: Some(RunReport {
            summary,
            eval: scored.spec.clone(),
            preset: data.preset().name.clone(),
            device: exp.device.as_str().into(),
        }),
        audits: Some(scored.audits.clone()),
        ..verdict(Outcome::Ok, String::new())
    })
}

/// The harness's figures at the end of the log, as the original's summary block (people and
/// tools grep it), with the phases and the audits.
fn append_summary(
    exp: &Experiment,
    phases: [Option<Duration>; 3],
    summary: &Summary,
    scored: &evaluate::Scored,
) -> Result<(), RunnerError> {
    use std::io::Write;
    let secs = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    let a = &scored.audits;
    let text = format!(
        "# harness: start-up {:.1}s, training {:.1}s (start mark to evaluation request), evaluation {:.1}s ({} requests of up to {} rows; audits: {} causal rows, {} repeated rows, {} logit prefixes; largest differences {:.1e} / {:.1e} / {:.1e} nats, mean logit bias {:.1e}, tolerance {})\n{}",
        secs(phases[0]),
        secs(phases[1]),
        secs(phases[2]),
        a.requests,
        a.request_rows,
        a.plan.causal_rows,
        a.plan.repeat_rows,
        a.plan.logit_prefixes,
        a.max_causal_delta,
        a.max_repeat_delta,
        a.max_logit_delta,
        a.mean_logit_bias,
        a.tolerance.atol,
        summary.to_block()
    );
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&exp.log_path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io_err(format!("writing {}", exp.log_path.display())))
}

/// Makes `dir` empty and new: whatever a run left there (links included) is removed, never
/// followed.
fn fresh_dir(dir: &Path) -> Result<(), RunnerError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir),
        Ok(_) => std::fs::remove_file(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(io_err(format!("clearing {}", dir.display())))?;
    std::fs::create_dir_all(dir).map_err(io_err("creating the run directory"))
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

/// Builds the checkout's train file and checks its fused kernels on `device` (`cpu`, `cuda:0`)
/// as a sandboxed run's are checked, in confined processes of the harness's own: what a run of
/// `exp` would be told. `fault` (tests only): `Kernel:abort|hang|fail|oom`, injected into that
/// kernel's check. The last checking process's output is left at `exp.log_path`.
pub fn self_checks(
    exp: &Experiment,
    device: &str,
    fault: Option<&str>,
) -> Result<SelfChecks, RunnerError> {
    let data = Dataset::open(&exp.cache)?;
    let rows = evaluate::Rows::load(&data)?;
    fresh_dir(&exp.run_dir)?;
    let exe = exp.run_dir.join("train-bin");
    let result = match build_copy(exp, &exe)? {
        BuildOutput::Built(exe) => {
            let setup = process::Setup {
                exe: &exe,
                data: &data,
                rows: &rows,
                check: None,
                fault: None,
                verdicts: None,
            };
            self_checks::run(exp, &setup, device, fault)
        }
        BuildOutput::Failed(diagnostics) => Err(RunnerError::Other(format!(
            "the train file does not build: {}",
            diagnostics
                .first()
                .map(|d| d.rendered.as_str())
                .unwrap_or("")
        ))),
    };
    let _ = std::fs::remove_dir_all(&exp.run_dir);
    result
}

/// Builds the checkout's train file without running it: the compiler's errors, none if it builds.
pub fn check(exp: &Experiment) -> Result<Vec<Diagnostic>, RunnerError> {
    let _lock = lock_file(&exp.target_dir.join("runner.lock"))?;
    let built = build_train(&exp.repo, &exp.target_dir, exp.device, exp.build_timeout)?;
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

/// Where a confined run's output shows a refusal, what refused it and how to allow a path.
fn refusal_note(exp: &Experiment, tail: &str) -> String {
    let refused = ["Permission denied", "Operation not permitted"]
        .iter()
        .any(|e| tail.contains(e));
    if !exp.sandbox || !refused {
        return String::new();
    }
    "\n[the sandbox refuses reads outside its allowlist (the validation data and the home directory among them), writes outside the run directory and every socket; a path a run needs can be allowed with `--sandbox-allow PATH`]".into()
}

pub(crate) fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".into(),
    }
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
