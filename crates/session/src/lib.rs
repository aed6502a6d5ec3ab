//! The research loop. A session runs the baseline, then asks its proposer for one experiment
//! per episode; the proposer acts through the [`Workbench`](workbench::Workbench), the runner
//! builds and runs, the keep rule decides, and the ledger records and moves git.

mod bench;
mod paths;
mod replay;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ledger::{Begin, Decision, Finish, Judgement, Ledger, Record, RunEnd, SessionMeta, Status};
use runner::{Device, Experiment, RunnerError};
use workbench::{Proposer, ProposerError, Spend};

use bench::Place;
pub use bench::{Bench, describe};
pub use ledger::{KeepSettings, Margins, RuleKind};
pub use paths::resolve_readable;
pub use replay::{Replay, replay};
pub use workers::run_workers;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Prepare(#[from] prepare::Error),
    #[error("{0}")]
    Proposer(String),
    #[error("{0}")]
    Settings(String),
    #[error("{0}")]
    Baseline(String),
}

/// Everything a session needs, from the CLI.
#[derive(Clone, Debug)]
pub struct Settings {
    pub repo: PathBuf,
    pub tag: String,
    pub cache: PathBuf,
    pub device: Device,
    /// Training budget; `None` = the prepared preset's.
    pub budget: Option<Duration>,
    pub seed: u64,
    /// The keep rule of a new session (a resumed one keeps its own).
    pub keep: KeepSettings,
    pub sandbox: bool,
    /// More paths experiments may read.
    pub sandbox_allow: Vec<PathBuf>,
    /// What each run may take of the machine (with the sandbox).
    pub limits: runner::Limits,
    /// Stop once the session holds this many experiments (the baseline included).
    pub max_experiments: Option<usize>,
    /// Start no experiment after this time.
    pub until: Option<SystemTime>,
    /// Start no episode once the proposer has spent this much (USD).
    pub max_cost: Option<f64>,
    /// The experiments' cargo target dir (shared by every checkout).
    pub target_dir: PathBuf,
    /// With several workers on CUDA, worker k's experiments see only `gpus[k]`
    /// (`CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<String>,
    /// Run each experiment as a Slurm job (`job_dir` is set to the session's `jobs/`).
    pub slurm: Option<runner::slurm::Slurm>,
    pub resume: bool,
}

/// What the loop tells its caller as it goes.
pub enum Progress<'a> {
    Started(&'a Begin),
    Line(&'a str),
    /// One run ended and the experiment runs again with another seed (`why`).
    Again {
        run: &'a RunEnd,
        why: String,
    },
    Finished(&'a Record),
    /// An episode ended without an experiment.
    Abandoned(&'a str),
}

/// Episodes in a row without an experiment before the session gives up.
const MAX_ABANDONED: u32 = 8;

/// Why the session stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum Stop {
    MaxExperiments,
    Until,
    Interrupted,
    MaxCost,
    Exhausted(String),
}

/// A SIGINT handler that asks the run in progress to stop; a second Ctrl-C kills at once.
pub fn install_interrupt_handler() {
    extern "C" fn on_sigint(_: libc::c_int) {
        runner::interrupt();
    }
    // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// Starts (or resumes) the session and runs experiments until a stop condition, one at a
/// time, in the repository itself.
pub fn run(
    settings: &Settings,
    proposer: &mut dyn Proposer,
    progress: &mut dyn FnMut(Progress),
) -> Result<Stop, SessionError> {
    let (ledger, exp) = open(settings, &proposer.name(), 1)?;
    let ledger = Mutex::new(ledger);
    // Spend of episodes that ended without an experiment, carried to the next one's record.
    let mut spend = Spend::default();
    let mut abandoned = 0u32;

    let stop = loop {
        if let Some(stop) = settle(settings, &ledger, &exp, progress, false)? {
            break stop;
        }
        if let Some(stop) = stop_condition(settings, &lock(&ledger), &spend, 0) {
            break stop;
        }
        let (outcome, ran) = {
            let place = Place {
                dir: settings.repo.clone(),
                worker: None,
                base: None,
                claims: None,
                halted: None,
            };
            let mut bench = Bench::new(&ledger, place, &exp, progress, &mut spend);
            (proposer.episode(&mut bench), bench.ran())
        };
        lock(&ledger).restore_train_file()?;
        match episode_end(outcome, ran, &mut abandoned, progress)? {
            Some(stop) => break stop,
            None if runner::interrupted() => break Stop::Interrupted,
            None => {}
        }
    };
    lock(&ledger).restore_train_file()?;
    Ok(stop)
}

/// Opens (or resumes) the session's ledger, journals who runs it, and makes the experiment
/// every run starts from.
fn open(
    settings: &Settings,
    agent: &str,
    workers: usize,
) -> Result<(Ledger, Experiment), SessionError> {
    let data = prepare::Dataset::open(&settings.cache)?;
    let preset = data.preset();
    let mut ledger = if settings.resume {
        let ledger = Ledger::resume(&settings.repo, &settings.tag)?;
        let meta = &ledger.session().meta;
        if meta.preset != preset.name {
            return Err(SessionError::Settings(format!(
                "session {} ran on preset {}, but the prepared data is {}: `autoresearch prepare --preset {}` first",
                meta.tag, meta.preset, preset.name, meta.preset
            )));
        }
        ledger
    } else {
        let budget = settings
            .budget
            .unwrap_or(Duration::from_secs(preset.time_budget_s));
        Ledger::start(
            &settings.repo,
            SessionMeta {
                tag: settings.tag.clone(),
                base: String::new(),
                preset: preset.name.to_string(),
                device: settings.device.as_str().into(),
                budget_s: budget.as_secs_f64(),
                seed: settings.seed,
                agent: agent.to_string(),
                started_unix: 0,
                keep: settings.keep,
            },
        )?
    };
    ledger.attach(ledger::Attach {
        pid: std::process::id(),
        started_unix: 0,
        until_unix: settings
            .until
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        max_experiments: settings.max_experiments,
        max_cost_usd: settings.max_cost,
        workers: (workers > 1).then_some(workers),
        executor: settings.slurm.is_some().then(|| "slurm".to_string()),
    })?;
    // A resumed session keeps its own budget, device and seed: its experiments stay comparable.
    let meta = ledger.session().meta.clone();
    let device = if meta.device == "cuda" {
        Device::Cuda
    } else {
        Device::Cpu
    };
    let mut exp = Experiment::new(
        &settings.repo,
        &settings.cache,
        device,
        Duration::from_secs_f64(meta.budget_s),
    );
    exp.sandbox = settings.sandbox;
    exp.sandbox_allow = settings.sandbox_allow.clone();
    exp.limits = settings.limits;
    exp.target_dir = settings.target_dir.clone();
    exp.run_dir = ledger.dir().join("work");
    // One GPU picked (`--gpus 3`): the runs see only it.
    if let [gpu] = settings.gpus.as_slice() {
        exp.gpus = Some(gpu.clone());
    }
    exp.slurm = settings.slurm.clone().map(|mut s| {
        s.job_dir = ledger.dir().join("jobs");
        s
    });
    if ledger.session().records.is_empty() {
        tracing::info!("{}", describe_rule(&meta.keep));
    }
    Ok((ledger, exp))
}

/// What must happen before any episode, in the repository itself: experiments left in flight
/// by a kill (each run again on its own commit), then the baseline until one is kept. `Some`
/// when the session must stop.
///
/// With `workers`, an experiment a worker left in flight is left for the workers to take up.
fn settle(
    settings: &Settings,
    ledger: &Mutex<Ledger>,
    exp: &Experiment,
    progress: &mut dyn FnMut(Progress),
    workers: bool,
) -> Result<Option<Stop>, SessionError> {
    loop {
        let pending = lock(ledger)
            .session()
            .in_flight()
            .into_iter()
            .find(|r| !workers || r.begin.worker.is_none())
            .cloned();
        if let Some(pending) = pending {
            // Killed mid-experiment: run the same commit again.
            tracing::info!(
                "re-running experiment {} ({}), interrupted last time",
                pending.begin.index,
                pending.short()
            );
            lock(ledger).checkout_train_file(&settings.repo, &pending.begin.hash)?;
            progress(Progress::Started(&pending.begin));
            let interrupted =
                run_pending(ledger, exp, &pending.begin.hash, progress, Spend::default())?;
            lock(ledger).restore_train_file()?;
            if interrupted {
                return Ok(Some(Stop::Interrupted));
            }
            continue;
        }
        if !lock(ledger).session().kept().is_empty() {
            return Ok(None);
        }
        if let Some(stop) = stop_condition(settings, &lock(ledger), &Spend::default(), 0) {
            return Ok(Some(stop));
        }
        // The baseline runs until one is kept: an interrupted one runs again on resume.
        let begin = {
            let mut l = lock(ledger);
            l.restore_train_file()?;
            l.begin("baseline", "the train file as the session found it")?
        };
        progress(Progress::Started(&begin));
        if run_pending(ledger, exp, &begin.hash, progress, Spend::default())? {
            return Ok(Some(Stop::Interrupted));
        }
        let l = lock(ledger);
        let baseline = l.session().record(&begin.hash).expect("just ran");
        if baseline.status() != Some(Status::Keep) {
            let end = baseline.end.as_ref().expect("finished");
            return Err(SessionError::Baseline(format!(
                "the baseline ({}) ended in {}: nothing can be compared with it. `autoresearch train` runs the train file alone to see why; fix it, commit, and start a new --tag.\n{}",
                baseline.short(),
                end.finish.outcome,
                end.finish.evidence
            )));
        }
    }
}

/// The stop condition that holds now, if any. `claimed`: experiments about to begin (a
/// worker's episode in progress) that count against `--max-experiments` already.
fn stop_condition(
    settings: &Settings,
    ledger: &Ledger,
    unrecorded: &Spend,
    claimed: usize,
) -> Option<Stop> {
    if runner::interrupted() {
        return Some(Stop::Interrupted);
    }
    if settings
        .max_experiments
        .is_some_and(|max| ledger.session().records.len() + claimed >= max)
    {
        return Some(Stop::MaxExperiments);
    }
    if settings.until.is_some_and(|t| SystemTime::now() >= t) {
        return Some(Stop::Until);
    }
    if let Some(max) = settings.max_cost {
        let spent = ledger.session().cost_usd() + unrecorded.cost_usd.unwrap_or(0.0);
        if spent >= max {
            return Some(Stop::MaxCost);
        }
    }
    None
}

/// What an episode's end means for the session: `Some` when it must stop. An episode without
/// an experiment waits longer each time, and a run of them ends the session, so a proposer
/// that keeps failing (a request the API always rejects) cannot spin all night.
fn episode_end(
    outcome: Result<(), ProposerError>,
    ran: bool,
    abandoned: &mut u32,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<Stop>, SessionError> {
    match outcome {
        Ok(()) if ran => *abandoned = 0,
        Ok(()) => {
            progress(Progress::Abandoned(
                "the proposer ended its episode without running an experiment",
            ));
            *abandoned += 1;
            if *abandoned >= MAX_ABANDONED {
                return Ok(Some(Stop::Exhausted(format!(
                    "{MAX_ABANDONED} episodes in a row ended without an experiment"
                ))));
            }
            let until = std::time::Instant::now() + Duration::from_secs(1 << (*abandoned).min(6));
            while std::time::Instant::now() < until && !runner::interrupted() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Err(ProposerError::Exhausted(why)) => return Ok(Some(Stop::Exhausted(why))),
        Err(ProposerError::Tool(workbench::ToolError::Interrupted)) => {
            return Ok(Some(Stop::Interrupted));
        }
        Err(e) => return Err(SessionError::Proposer(e.to_string())),
    }
    Ok(None)
}

/// The ledger, whoever held it last: a worker that panicked leaves the journal as it was
/// (each change is one synced append), so the lock is still good to take.
pub(crate) fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The keep rule in a line, for the log and the proposer.
pub fn describe_rule(k: &KeepSettings) -> String {
    match k.rule {
        ledger::RuleKind::Strict => {
            "keep rule: strict (one run each, kept when below the best)".into()
        }
        ledger::RuleKind::Noise => format!(
            "keep rule: noise (baseline × {}; kept at once {} standard errors better, discarded under {}, otherwise run again, up to {} runs, and kept {} better on the mean)",
            k.baseline_runs, k.margins.win, k.margins.loss, k.margins.max_runs, k.margins.confirm
        ),
    }
}

/// Runs experiment `hash` (in flight), as many times as the keep rule asks, and records it. A
/// run already journaled (a kill between runs) is not run again. True when it was interrupted.
/// The ledger is held only between runs: other workers' experiments go on meanwhile.
pub(crate) fn run_pending(
    ledger: &Mutex<Ledger>,
    exp: &Experiment,
    hash: &str,
    progress: &mut dyn FnMut(Progress),
    spend: Spend,
) -> Result<bool, SessionError> {
    loop {
        let mut l = lock(ledger);
        let settings = l.session().meta.keep;
        let pending = l
            .session()
            .record(hash)
            .filter(|r| r.end.is_none())
            .cloned()
            .expect("an experiment in flight");
        let failed = pending.runs.iter().any(|r| r.finish.outcome != "ok");
        let (decision, judgement) = ledger::judge_record(&settings, l.session(), &pending);
        let max_runs = if l.session().best().is_none() {
            settings.baseline_runs.max(1)
        } else {
            settings.margins.max_runs.max(1)
        };
        if !pending.runs.is_empty() && (failed || decision != Decision::Confirm) {
            finish_pending(&mut l, &pending, decision, judgement, spend, progress)?;
            return Ok(false);
        }
        if let Some(last) = pending.runs.last() {
            let why = match judgement.gain_sigma {
                None => format!(
                    "the baseline's runs for σ: run {} of {max_runs}",
                    pending.runs.len() + 1
                ),
                Some(g) => format!(
                    "{g:+.1} σ from the best: too close to call, run {} of at most {max_runs}",
                    pending.runs.len() + 1
                ),
            };
            progress(Progress::Again { run: last, why });
        }
        let seed = l.next_seed_of(Some(hash)).expect("in flight");
        let log_dir = l.dir().join("logs");
        let root = l.root().to_path_buf();
        drop(l);
        let (mut finish, interrupted) = run_once(&root, &log_dir, exp, &pending, seed, progress);
        let mut l = lock(ledger);
        if interrupted {
            // Ctrl-C ends the experiment (a crash the user caused, not the code).
            charge(&mut finish, spend);
            l.finish_of(Some(hash), finish, Status::Crash, Some(judgement))?;
            let record = l.session().record(hash).expect("finished").clone();
            progress(Progress::Finished(&record));
            return Ok(true);
        }
        l.record_run_of(Some(hash), seed, finish)?;
    }
}

/// One training run of the experiment in flight with `seed`. True when it was interrupted.
fn run_once(
    root: &Path,
    log_dir: &Path,
    exp: &Experiment,
    pending: &Record,
    seed: u64,
    progress: &mut dyn FnMut(Progress),
) -> (Finish, bool) {
    let mut exp = exp.clone();
    exp.seed = seed;
    // The baseline (always #0) is the train file the user started the session from: its runs
    // alone fill the CUDA JIT cache that every run reads.
    exp.writes_jit_cache = pending.begin.index == 0;
    let name = match pending.runs.len() {
        0 => format!("{}.log", pending.begin.hash),
        n => format!("{}-{n}.log", pending.begin.hash),
    };
    let log = log_dir.join(name);
    exp.log_path = log.clone();
    let rel_log = log
        .strip_prefix(root)
        .unwrap_or(&log)
        .to_string_lossy()
        .into_owned();
    match runner::run(&exp, &mut |line| progress(Progress::Line(line))) {
        Ok(verdict) => {
            let summary = verdict.report.as_ref().map(|r| &r.summary);
            (
                Finish {
                    outcome: verdict.outcome.as_str().into(),
                    val_bpb: summary.map(|s| s.val_bpb),
                    memory_gb: summary.map_or(0.0, |s| s.peak_vram_mb / 1024.0),
                    summary: summary.map(|s| serde_json::to_value(s).expect("serialisable")),
                    build_seconds: verdict.build_seconds,
                    run_seconds: verdict.run_seconds,
                    log: Some(rel_log),
                    evidence: verdict.evidence,
                    ..Finish::default()
                },
                false,
            )
        }
        Err(RunnerError::Interrupted) => (
            Finish {
                outcome: "interrupted".into(),
                log: Some(rel_log),
                evidence: "stopped by Ctrl-C".into(),
                ..Finish::default()
            },
            true,
        ),
        // The machine failed the run (a full disk, say), not the code: record it as a crash
        // and let the night go on. A setup error shows up in the baseline, which stops.
        Err(e) => (
            Finish {
                outcome: "crash".into(),
                log: Some(rel_log),
                evidence: format!("the harness could not run the experiment: {e}"),
                ..Finish::default()
            },
            false,
        ),
    }
}

/// The proposer's spend on the experiment goes on its record.
fn charge(finish: &mut Finish, spend: Spend) {
    if spend != Spend::default() {
        finish.tokens_in = Some(spend.tokens_in);
        finish.tokens_out = Some(spend.tokens_out);
        finish.tokens_cached = Some(spend.tokens_cached);
        finish.cost_usd = spend.cost_usd;
    }
}

/// Ends the experiment in flight from its runs: val_bpb is the mean of its runs (the value the
/// decision used); a run that failed fails the experiment, whatever seed it had.
fn finish_pending(
    ledger: &mut Ledger,
    pending: &Record,
    decision: Decision,
    judgement: Judgement,
    spend: Spend,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), SessionError> {
    let runs = &pending.runs;
    let first = &runs[0].finish;
    let failed = runs.iter().find(|r| r.finish.outcome != "ok");
    let values = pending.values();
    let mut finish = match failed {
        Some(bad) => {
            let mut f = bad.finish.clone();
            if bad.run > 0 {
                f.evidence = format!(
                    "run {} (seed {}) of this experiment failed after {} that did not:\n{}",
                    bad.run + 1,
                    bad.seed,
                    bad.run,
                    f.evidence
                );
            }
            f
        }
        None => Finish {
            val_bpb: Some(values.iter().sum::<f64>() / values.len() as f64),
            memory_gb: runs.iter().map(|r| r.finish.memory_gb).fold(0.0, f64::max),
            ..first.clone()
        },
    };
    finish.build_seconds = runs.iter().map(|r| r.finish.build_seconds).sum();
    finish.run_seconds = runs.iter().map(|r| r.finish.run_seconds).sum();
    charge(&mut finish, spend);
    let status = match (failed, decision) {
        (Some(_), _) => Status::Crash,
        (None, Decision::Keep) => Status::Keep,
        (None, _) => Status::Discard,
    };
    if judgement.seed_ignored {
        tracing::warn!(
            "experiment {} gave bit-identical results with {} different seeds: its train file ignores AUTORESEARCH_SEED, so its repeats measure no noise",
            pending.short(),
            runs.len()
        );
    }
    ledger.finish_of(Some(&pending.begin.hash), finish, status, Some(judgement))?;
    let record = ledger
        .session()
        .record(&pending.begin.hash)
        .expect("just finished")
        .clone();
    progress(Progress::Finished(&record));
    Ok(())
}

pub const TARGET_DIR_ENV: &str = "AUTORESEARCH_TARGET_DIR";

/// Where experiments build: `$AUTORESEARCH_TARGET_DIR`, else the repository's
/// `target/experiments` (apart from developers' builds, so neither waits on the other's lock).
pub fn default_target_dir(repo: &Path) -> PathBuf {
    match std::env::var_os(TARGET_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo.join("target").join("experiments"),
    }
}
