//! An experiment's run as a Slurm job. The train binary is built here, on the submit host (a
//! compile error costs no queue wait and no GPU time, and nodes need no Rust toolchain or crate
//! registry); the job runs `autoresearch job-run SPEC VERDICT` on the node, which is this
//! runner with the same sandbox, limits, clock and evaluation, and writes its verdict as JSON.
//! Files move through the filesystem a cluster's nodes share: the repository, its `runs/`
//! and the prepared data must be on it.
//!
//! Each run's files are named after its log (`runs/TAG/jobs/HASH[-N].*`), so a harness killed
//! while a job was queued or running finds the job again on `--resume` and waits for it
//! (adopts it) instead of running the experiment twice; a job that ended meanwhile is read
//! from its verdict. Ctrl-C cancels the job.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{
    BuildOutput, Experiment, Outcome, RunnerError, Verdict, build_copy, compile_error, failed,
    interrupted, io_err,
};

/// How experiments become jobs (`[slurm]` in `autoresearch.toml`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Slurm {
    /// Where the jobs' files go, on the shared filesystem: `runs/TAG/jobs`.
    pub job_dir: PathBuf,
    /// The `autoresearch` binary a job runs (on the shared filesystem).
    pub harness: PathBuf,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// GPUs a job asks for (`--gres=gpu:N`); none when 0.
    pub gpus_per_job: u32,
    /// CPUs a job asks for (`--cpus-per-task`); Slurm's default when absent.
    pub cpus_per_job: Option<u32>,
    /// Minutes of the job's time limit beyond the run's own deadlines (start-up, budget,
    /// evaluation).
    pub grace_minutes: u64,
    /// More `sbatch` flags, as given.
    pub sbatch_args: Vec<String>,
    /// How often the queue is asked about a job.
    pub poll: Duration,
    /// The node sizes the run's limits (tasks, memory) from its own machine: no
    /// `--max-run-tasks` or `--max-run-memory` was given.
    pub node_limits: bool,
}

/// The files of one run's job.
struct JobFiles {
    /// `HASH` or `HASH-N`: the run's log name.
    stem: String,
    exe: PathBuf,
    spec: PathBuf,
    script: PathBuf,
    id: PathBuf,
    verdict: PathBuf,
    out: PathBuf,
}

impl JobFiles {
    fn of(exp: &Experiment, cluster: &Slurm) -> JobFiles {
        let stem = exp
            .log_path
            .file_stem()
            .map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
        let file = |ext: &str| cluster.job_dir.join(format!("{stem}.{ext}"));
        JobFiles {
            stem: stem.clone(),
            exe: file("bin"),
            spec: file("json"),
            script: file("sh"),
            id: file("job"),
            verdict: file("verdict.json"),
            out: file("out"),
        }
    }

    fn remove(&self) {
        for f in [
            &self.exe,
            &self.spec,
            &self.script,
            &self.id,
            &self.verdict,
            &self.out,
        ] {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Runs `exp` as a job of `cluster` and returns the node's verdict.
/// The job's output reaches the log when it ends, so `_on_line` hears nothing meanwhile.
pub fn run(
    exp: &Experiment,
    cluster: &Slurm,
    _on_line: &mut dyn FnMut(&str),
) -> Result<Verdict, RunnerError> {
    let files = JobFiles::of(exp, cluster);
    std::fs::create_dir_all(&cluster.job_dir)
        .map_err(io_err(format!("creating {}", cluster.job_dir.display())))?;
    let mut build_seconds = 0.0;
    // A job a killed harness submitted (its id on file, or, killed before it could write the
    // id, found by name): still queued or running, wait for it; ended, its verdict stands.
    let earlier = std::fs::read_to_string(&files.id)
        .ok()
        .map(|id| id.trim().to_string())
        .or_else(|| by_name(&job_name(&files.stem)));
    let id = match earlier {
        Some(id) if queued(&id) != Some(false) || files.verdict.is_file() => {
            tracing::info!(
                "{}: adopting Slurm job {id}, left by an earlier harness",
                exp.log_path.display()
            );
            id
        }
        _ => {
            let t = Instant::now();
            if let BuildOutput::Failed(diagnostics) = build_copy(exp, &files.exe)? {
                return Ok(compile_error(exp, diagnostics, t.elapsed().as_secs_f64()));
            }
            build_seconds = t.elapsed().as_secs_f64();
            if interrupted() {
                return Err(RunnerError::Interrupted);
            }
            let _ = std::fs::remove_file(&files.verdict);
            let id = submit(exp, cluster, &files)?;
            write_atomic(&files.id, id.as_bytes())?;
            tracing::info!("{}: Slurm job {id} submitted", exp.log_path.display());
            id
        }
    };
    // `squeue` failing (a busy controller) is not the job ending: ask again.
    let mut unanswered = 0u32;
    loop {
        if interrupted() {
            cancel(&id);
            files.remove();
            return Err(RunnerError::Interrupted);
        }
        match queued(&id) {
            Some(true) => unanswered = 0,
            Some(false) => break,
            None => {
                unanswered += 1;
                if unanswered % 30 == 1 {
                    tracing::warn!("squeue does not answer about job {id}; asking again");
                }
            }
        }
        std::thread::sleep(cluster.poll);
    }
    // On a network filesystem the node's last write may show here a little later.
    let seen = Instant::now();
    while !files.verdict.is_file() && seen.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let verdict = match std::fs::read(&files.verdict) {
        Ok(bytes) => serde_json::from_slice::<Verdict>(&bytes).map_err(|e| {
            RunnerError::Other(format!(
                "Slurm job {id} left an unreadable verdict {}: {e}",
                files.verdict.display()
            ))
        }),
        // Killed by Slurm (its time limit, a node failure, scancel) before it could say.
        Err(_) => {
            let out = std::fs::read_to_string(&files.out).unwrap_or_default();
            Ok(failed(
                exp,
                Outcome::Crash,
                format!(
                    "Slurm job {id} ended without a verdict (its time limit, a node failure or a scancel?); its output:\n{}",
                    crate::last_lines(&out, 20)
                ),
            ))
        }
    };
    files.remove();
    let mut verdict = verdict?;
    verdict.build_seconds += build_seconds;
    Ok(verdict)
}

/// Submits the run's job: the experiment as JSON, a two-line script, `sbatch --parsable`.
/// The job's environment is the allowlist's variables only (`--export`), so no key of the
/// harness's reaches the node.
fn submit(exp: &Experiment, cluster: &Slurm, files: &JobFiles) -> Result<String, RunnerError> {
    let mut node = exp.clone();
    node.slurm = None;
    node.prebuilt = Some(files.exe.clone());
    // A run dir of the run's own: a job adopted after a resume may still be using its worker's.
    node.run_dir = cluster.job_dir.join(format!("{}.run", files.stem));
    node.limits_from_node = cluster.node_limits;
    write_atomic(
        &files.spec,
        &serde_json::to_vec_pretty(&node).expect("an experiment serialises"),
    )?;
    let quote = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"));
    write_atomic(
        &files.script,
        format!(
            "#!/bin/sh\nexec {} job-run {} {}\n",
            quote(&cluster.harness),
            quote(&files.spec),
            quote(&files.verdict)
        )
        .as_bytes(),
    )?;
    let deadlines =
        exp.startup_grace + exp.budget + exp.step_grace() + exp.eval_grace + exp.build_timeout;
    let minutes = deadlines.as_secs().div_ceil(60) + cluster.grace_minutes;
    let exported: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| crate::process::allowed(k))
        .collect();
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable")
        .arg(format!("--job-name={}", job_name(&files.stem)))
        // A preempted job ends (and says so) rather than running again behind our back.
        .arg("--no-requeue")
        .arg(format!("--output={}", files.out.display()))
        .arg(format!("--time={minutes}"))
        .arg(format!("--chdir={}", exp.repo.display()))
        .arg(format!("--export={}", exported.join(",")));
    if let Some(p) = &cluster.partition {
        cmd.arg(format!("--partition={p}"));
    }
    if let Some(a) = &cluster.account {
        cmd.arg(format!("--account={a}"));
    }
    if cluster.gpus_per_job > 0 {
        cmd.arg(format!("--gres=gpu:{}", cluster.gpus_per_job));
    }
    if let Some(c) = cluster.cpus_per_job {
        cmd.arg(format!("--cpus-per-task={c}"));
    }
    cmd.args(&cluster.sbatch_args).arg(&files.script);
    for (key, _) in std::env::vars_os() {
        if crate::build::is_secret(&key.to_string_lossy()) {
            cmd.env_remove(key);
        }
    }
    let out = cmd.output().map_err(|e| {
        RunnerError::Other(format!(
            "could not start `sbatch` ({e}): --executor slurm needs Slurm's client commands on PATH"
        ))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    if !out.status.success() || id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(RunnerError::Other(format!(
            "sbatch refused the job: {}{}: check the [slurm] settings in autoresearch.toml (partition, account, sbatch_args)",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(id)
}

fn job_name(stem: &str) -> String {
    format!("autoresearch-{stem}")
}

/// The id of this user's job named `name`, if the queue holds one.
fn by_name(name: &str) -> Option<String> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%i", "--name", name])
        .arg(format!("--user={uid}"))
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// Whether job `id` is still queued or running: `Some(false)` once the queue no longer holds
/// it (or holds it ended), `None` when `squeue` does not answer.
pub fn queued(id: &str) -> Option<bool> {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%T", "--jobs", id])
        .output()
        .ok()?;
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        // An id the controller has forgotten (ended long ago) is an answer too.
        let err = String::from_utf8_lossy(&out.stderr);
        return err.contains("Invalid job id").then_some(false);
    }
    Some(
        !state.is_empty()
            && !matches!(
                state.as_str(),
                "COMPLETED"
                    | "CANCELLED"
                    | "FAILED"
                    | "TIMEOUT"
                    | "NODE_FAIL"
                    | "PREEMPTED"
                    | "OUT_OF_MEMORY"
                    | "BOOT_FAIL"
                    | "DEADLINE"
            ),
    )
}

/// Cancels job `id` (Ctrl-C).
pub fn cancel(id: &str) {
    let _ = Command::new("scancel").arg(id).status();
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunnerError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_err(format!("writing {}", path.display())))
}

/// The node's side (`autoresearch job-run SPEC VERDICT`): runs the experiment here and writes
/// the verdict, through a rename, for the submit host. A harness error becomes a crash verdict
/// naming it.
pub fn run_job(spec: &Path, verdict_path: &Path) -> Result<(), RunnerError> {
    let bytes = std::fs::read(spec).map_err(io_err(format!("reading {}", spec.display())))?;
    let mut exp: Experiment = serde_json::from_slice(&bytes)
        .map_err(|e| RunnerError::Other(format!("{}: not an experiment: {e}", spec.display())))?;
    if exp.limits_from_node {
        exp.limits = crate::Limits::for_machine();
    }
    // As many threads as the CPUs Slurm gave the job (its affinity), not the node's.
    if exp.threads.is_none() {
        exp.threads = std::thread::available_parallelism().ok().map(|n| n.get());
    }
    let verdict = match crate::run(&exp, &mut |_| {}) {
        Ok(v) => v,
        Err(RunnerError::Interrupted) => return Err(RunnerError::Interrupted),
        Err(e) => failed(
            &exp,
            Outcome::Crash,
            format!("the harness on the node could not run the experiment: {e}"),
        ),
    };
    write_atomic(
        verdict_path,
        &serde_json::to_vec(&verdict).expect("a verdict serialises"),
    )
}
