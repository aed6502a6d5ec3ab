//! The fused kernels' self-checks for a sandboxed run, in checking processes of the harness's
//! own. A kernel that faults on the card leaves its CUDA context unusable, so `fused` checks them
//! in a child of the run; inside the sandbox such a child cannot open the GPU (Landlock grants
//! `/proc`, where the driver names its threads, to the run's own PID only). So the harness starts
//! the built binary as a checking process (`prepare::env::FUSED_SELF_CHECK`), confined as a run
//! is, and hands the run the verdicts. A check that crashes or hangs fails its kernel alone: the
//! next process checks the kernels after it.
//!
//! The protocol is `fused`'s (`isolated.rs`): the process prints `check I` before each kernel's
//! check, then `pass I`, `undecided I WHY` (out of memory) or `fail I WHY`, and stops after a
//! failure; `unavailable WHY` when it cannot use the device at all. It ends a check that hangs
//! itself (`fail I ...`, then an abort).

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::process::{End, Setup, run_child};
use crate::{Experiment, RunnerError, describe};

/// All the checking processes together. Checks take milliseconds once their kernels are loaded;
/// the first run on a card also compiles them (the PTX JIT).
const TOTAL: Duration = Duration::from_secs(90);

/// What the checking processes decided.
#[derive(Debug, Default)]
pub struct SelfChecks {
    /// One protocol line a decided kernel, in the order decided.
    pub verdicts: Vec<String>,
    /// How each checking process ended, in order.
    pub processes: Vec<String>,
    /// Their time in all, from the first one's start.
    pub seconds: f64,
}

impl SelfChecks {
    /// The run's `prepare::env::SELF_CHECKS`: the verdicts, or `in-process` where none was
    /// decided (the checks could not use the device, or the binary does not link the kernels).
    pub fn env_value(&self) -> String {
        if self.verdicts.is_empty() {
            "in-process".into()
        } else {
            format!("checked\n{}", self.verdicts.join("\n"))
        }
    }

    /// How many kernels failed.
    fn failed(&self) -> usize {
        self.verdicts
            .iter()
            .filter(|v| v.starts_with("fail "))
            .count()
    }
}

/// Checks every fused kernel of `setup.exe` on `device` (`cuda:0`, `cpu`), one confined process
/// after another. `fault` (tests only) is passed on as `AUTORESEARCH_FUSED_CHECK_FAULT`.
pub(crate) fn run(
    exp: &Experiment,
    setup: &Setup,
    device: &str,
    fault: Option<&str>,
) -> Result<SelfChecks, RunnerError> {
    let started = Instant::now();
    let mut checks = SelfChecks::default();
    let mut from = 0;
    loop {
        let left = TOTAL.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        let mut exp = exp.clone();
        exp.startup_grace = left;
        let request = format!("{device} from:{from}");
        let mut process = Process::default();
        let child = run_child(
            &exp,
            &Setup {
                check: Some(&request),
                fault,
                ..*setup
            },
            &mut |line| process.read(line),
        )?;
        let last_line = child
            .tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim()
            .to_string();
        let ended = match &child.end {
            End::Exited(status) => {
                process.ended(status, &last_line);
                describe(status)
            }
            End::TimedOut(why) | End::Invalid(why) => {
                process.stopped(why);
                why.clone()
            }
            End::Evaluated { .. } => unreachable!("a checking process is not evaluated"),
        };
        checks.processes.push(ended);
        let decided = !process.verdicts.is_empty();
        checks.verdicts.append(&mut process.verdicts);
        // Done, or nothing more to learn: it could not use the device, or checked nothing.
        let (Some(last), false) = (process.last, process.unavailable) else {
            break;
        };
        if !decided || matches!(child.end, End::Exited(s) if s.success()) {
            break;
        }
        // Onwards only, whatever the process printed.
        from = (last + 1).max(from + 1);
    }
    checks.seconds = started.elapsed().as_secs_f64();
    if checks.failed() > 0 {
        tracing::warn!(
            "the fused kernels' self-checks: {} of {} decided failed ({:.1}s, {} processes)",
            checks.failed(),
            checks.verdicts.len(),
            checks.seconds,
            checks.processes.len()
        );
    } else {
        tracing::info!(
            "the fused kernels' self-checks: {} decided, none failed ({:.1}s)",
            checks.verdicts.len(),
            checks.seconds
        );
    }
    Ok(checks)
}

/// One checking process, as its lines come.
#[derive(Default)]
struct Process {
    verdicts: Vec<String>,
    /// The last kernel whose check started.
    last: Option<usize>,
    /// Its check started and has no verdict yet.
    open: bool,
    unavailable: bool,
}

impl Process {
    fn read(&mut self, line: &str) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let index = rest.split(' ').next().and_then(|i| i.parse::<usize>().ok());
        match (word, index) {
            ("check", Some(i)) => {
                self.last = Some(i);
                self.open = true;
            }
            ("pass" | "fail" | "undecided", Some(i)) if self.last == Some(i) => {
                self.verdicts.push(line.to_string());
                self.open = false;
            }
            ("unavailable", _) => self.unavailable = true,
            // Whatever else a library printed.
            _ => {}
        }
    }

    /// The process exited: a check still open ended it.
    fn ended(&mut self, status: &ExitStatus, last_line: &str) {
        let Some(i) = self.last.filter(|_| self.open) else {
            return;
        };
        self.open = false;
        let out_of_memory = ["out of memory", "OUT_OF_MEMORY"]
            .iter()
            .any(|m| last_line.contains(m));
        self.verdicts.push(if out_of_memory {
            format!("undecided {i} {last_line}")
        } else {
            format!(
                "fail {i} its check ended the checking process ({}){}",
                describe(status),
                Some(last_line)
                    .filter(|l| !l.is_empty() && !l.starts_with("check "))
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default()
            )
        });
    }

    /// The process was stopped: a check still open did not finish.
    fn stopped(&mut self, why: &str) {
        if let Some(i) = self.last.filter(|_| self.open) {
            self.open = false;
            self.verdicts.push(format!("fail {i} {why}: stopped"));
        }
    }
}
