//! Several experiments at once, in one session: a worker per GPU (or per share of the CPU's
//! cores), each with a proposer and a git checkout of its own, all writing one journal.
//!
//! Concurrency: an episode starts from the kept state of the moment (the branch tip) in its
//! worker's checkout, and its experiment is that state's child. The ledger is held only between
//! runs, so journal appends are whole and ordered. An experiment is judged against the best at
//! the time it finishes, not the one it began from: kept, the branch moves onto it even when
//! another experiment was kept meanwhile (the history is then a tree, and the branch is on its
//! best leaf: every kept experiment beat every one kept before it).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ledger::{Checkout, Ledger};
use runner::Experiment;
use workbench::{Proposer, ProposerError, Spend};

use crate::bench::{Bench, Place};
use crate::{Progress, SessionError, Settings, Stop, episode_end, lock, run_pending, settle};

/// How the session's workers stop: the first reason any of them found (or the first error).
type Halt = Mutex<Option<Result<Stop, SessionError>>>;

/// Starts (or resumes) the session with one worker per proposer, and runs experiments on all of
/// them until a stop condition; `progress` hears from each by its number. A worker's
/// experiments are pinned to `settings.gpus[worker]` on CUDA and to an equal share of the cores
/// on the CPU. Experiments a kill left in flight run again first, each on a worker.
pub fn run_workers(
    settings: &Settings,
    proposers: Vec<Box<dyn Proposer + Send>>,
    progress: &(dyn Fn(usize, Progress) + Sync),
) -> Result<Stop, SessionError> {
    let n = proposers.len().max(1);
    let agent = proposers.first().map(|p| p.name()).unwrap_or_default();
    let (ledger, mut exp) = crate::open(settings, &agent, n)?;
    // The memory limit is the workers' together (a Slurm job has its node's).
    if exp.slurm.is_none() {
        exp.limits.memory /= n as u64;
    }
    let ledger = Mutex::new(ledger);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    // Worker k's share of the machine: a GPU, or cores / N (a Slurm job gets its own).
    let pin = |exp: &mut Experiment, k: usize| match exp.device {
        _ if exp.slurm.is_some() => {}
        runner::Device::Cuda => exp.gpus = settings.gpus.get(k).cloned(),
        runner::Device::Cpu => exp.threads = Some((cores / n).max(1)),
    };
    // The baseline (and an experiment of a one-worker run left in flight) goes first, alone,
    // with worker 0's share: what every experiment after it gets.
    let mut first = |p: Progress| progress(0, p);
    let mut alone = exp.clone();
    pin(&mut alone, 0);
    if let Some(stop) = settle(settings, &ledger, &alone, &mut first, true)? {
        lock(&ledger).restore_train_file()?;
        return Ok(stop);
    }
    let (tag, dir, tip) = {
        let l = lock(&ledger);
        (
            l.session().meta.tag.clone(),
            l.dir().to_path_buf(),
            l.tip()?,
        )
    };
    let checkouts = (0..n)
        .map(|k| {
            Checkout::add(
                &settings.repo,
                &dir.join("workers").join(format!("w{k}")),
                &format!("autoresearch-{tag}-w{k}"),
                tip,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let left: Vec<String> = lock(&ledger)
        .session()
        .in_flight()
        .iter()
        .map(|r| r.begin.hash.clone())
        .collect();
    let resumed = Mutex::new(left);
    let claims = AtomicUsize::new(0);
    let halt: Halt = Mutex::new(None);
    std::thread::scope(|scope| {
        for (k, (proposer, checkout)) in proposers.into_iter().zip(&checkouts).enumerate() {
            let mut exp = exp.clone();
            exp.repo = checkout.path().to_path_buf();
            exp.run_dir = dir.join(format!("work-w{k}"));
            pin(&mut exp, k);
            let shared = Shared {
                settings,
                ledger: &ledger,
                resumed: &resumed,
                claims: &claims,
                halt: &halt,
            };
            scope.spawn(move || {
                let mut hear = |p: Progress| progress(k, p);
                // A worker that panics stops the others (after their experiment in flight)
                // instead of leaving them to wait on it.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    work(&shared, k, proposer, &exp, checkout, &mut hear)
                }))
                .unwrap_or_else(|_| {
                    Err(SessionError::Proposer(format!(
                        "worker {k} panicked: see the message above"
                    )))
                });
                let mut halt = shared.halt.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(stop) if halt.is_none() => *halt = Some(Ok(stop)),
                    Err(e) if !matches!(*halt, Some(Err(_))) => *halt = Some(Err(e)),
                    _ => {}
                }
            });
        }
    });
    drop(checkouts);
    let _ = std::fs::remove_dir(dir.join("workers"));
    lock(&ledger).restore_train_file()?;
    halt.into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(Ok(Stop::Interrupted))
}

/// What every worker shares.
struct Shared<'a> {
    settings: &'a Settings,
    ledger: &'a Mutex<Ledger>,
    /// Experiments a kill left in flight, not yet taken up by a worker.
    resumed: &'a Mutex<Vec<String>>,
    /// Episodes in progress that have not committed their experiment yet: they count against
    /// `--max-experiments` already.
    claims: &'a AtomicUsize,
    halt: &'a Halt,
}

impl Shared<'_> {
    fn halted(&self) -> bool {
        self.halt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// One worker's loop: experiments left in flight first, then episodes from the kept state of
/// the moment, until a stop condition or another worker's stop.
fn work(
    shared: &Shared,
    k: usize,
    mut proposer: Box<dyn Proposer + Send>,
    exp: &Experiment,
    checkout: &Checkout,
    hear: &mut dyn FnMut(Progress),
) -> Result<Stop, SessionError> {
    let mut spend = Spend::default();
    let mut abandoned = 0u32;
    loop {
        if shared.halted() {
            return Ok(Stop::Interrupted);
        }
        let left = shared
            .resumed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        if let Some(hash) = left {
            let begin = {
                let l = lock(shared.ledger);
                checkout.reset(ledger::Oid::from_str(&hash).map_err(ledger::LedgerError::from)?)?;
                l.session().record(&hash).expect("in flight").begin.clone()
            };
            tracing::info!(
                "worker {k}: re-running experiment {} ({}), interrupted last time",
                begin.index,
                &hash[..7]
            );
            hear(Progress::Started(&begin));
            if run_pending(shared.ledger, exp, &hash, hear, Spend::default())? {
                return Ok(Stop::Interrupted);
            }
            continue;
        }
        let base = {
            let l = lock(shared.ledger);
            let claimed = shared.claims.load(Ordering::SeqCst);
            if let Some(stop) = crate::stop_condition(shared.settings, &l, &spend, claimed) {
                return Ok(stop);
            }
            shared.claims.fetch_add(1, Ordering::SeqCst);
            let tip = l.tip()?;
            checkout.reset(tip)?;
            tip
        };
        let halted = || shared.halted();
        let place = Place {
            dir: checkout.path().to_path_buf(),
            worker: Some(k),
            base: Some(base),
            claims: Some(shared.claims),
            halted: Some(&halted),
        };
        let (outcome, ran) = {
            let mut bench = Bench::new(shared.ledger, place, exp, hear, &mut spend);
            (proposer.episode(&mut bench), bench.ran())
        };
        if !ran {
            shared.claims.fetch_sub(1, Ordering::SeqCst);
        }
        if matches!(outcome, Err(ProposerError::Exhausted(_))) && wait_for_news(shared, base) {
            // Nothing new from this kept state, but experiments in flight may move it.
            continue;
        }
        if let Some(stop) = episode_end(outcome, ran, &mut abandoned, hear)? {
            return Ok(stop);
        }
        if runner::interrupted() {
            return Ok(Stop::Interrupted);
        }
    }
}

/// After an episode from `base` found nothing to try: true at once when the kept state has
/// moved since, else waits until another worker's experiment ends; false at once when none is
/// in flight or about to be (then nothing can change the kept state).
fn wait_for_news(shared: &Shared, base: ledger::Oid) -> bool {
    let ended = |l: &Ledger| {
        l.session()
            .records
            .iter()
            .filter(|r| r.end.is_some())
            .count()
    };
    let (before, busy, moved) = {
        let l = lock(shared.ledger);
        let busy = !l.session().in_flight().is_empty() || shared.claims.load(Ordering::SeqCst) > 0;
        (ended(&l), busy, l.tip().ok() != Some(base))
    };
    if moved {
        return true;
    }
    if !busy {
        return false;
    }
    while !shared.halted() && !runner::interrupted() && ended(&lock(shared.ledger)) == before {
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}
