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

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::process::{End, Setup, run_child};
use crate::{Experiment, RunnerError, describe};

/// All the checking processes together. Checks take milliseconds once their kernels are loaded;
/// the first run on a card also compiles them (the PTX JIT).
const TOTAL: Duration = Duration::from_secs(90);
/// More kernels than `fused` has: an index past it is not a kernel's.
const MAX_KERNELS: usize = 64;
/// The longest reason kept from a verdict (it travels in the run's environment).
const MAX_REASON: usize = 300;

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
        if crate::interrupted() {
            return Err(RunnerError::Interrupted);
        }
        let left = TOTAL.saturating_sub(started.elapsed());
        if left.is_zero() {
            // The kernels not yet checked take the plain path: checked in the run's process,
            // one that hung would hang the run.
            checks.verdicts.push(format!(
                "unchecked {from} the self-checks' {:.0}s were spent",
                TOTAL.as_secs_f64()
            ));
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
        checks.verdicts.extend(process.verdicts.into_values());
        // Done, or nothing more to learn: it could not use the device, or checked nothing.
        let (Some(last), false) = (process.last, process.unavailable) else {
            break;
        };
        if !decided || matches!(child.end, End::Exited(s) if s.success()) {
            break;
        }
        // Onwards only, whatever the process printed.
        from = (last + 1).max(from + 1);
        if from >= MAX_KERNELS {
            break;
        }
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

/// One checking process, as its lines come. It is the train file's binary: what it prints is
/// taken only as far as the protocol allows, one verdict a kernel, a reason cut short.
#[derive(Default)]
struct Process {
    /// By kernel index.
    verdicts: BTreeMap<usize, String>,
    /// The last kernel whose check started.
    last: Option<usize>,
    /// Its check started and has no verdict yet.
    open: bool,
    unavailable: bool,
}

impl Process {
    fn read(&mut self, line: &str) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let (index, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let index = index.parse::<usize>().ok().filter(|&i| i < MAX_KERNELS);
        match (word, index) {
            ("check", Some(i)) if !self.open => {
                self.last = Some(i);
                self.open = true;
            }
            ("pass", Some(i)) if self.open && self.last == Some(i) => self.decide(i, "pass", ""),
            ("fail" | "undecided", Some(i)) if self.open && self.last == Some(i) => {
                self.decide(i, word, reason)
            }
            ("unavailable", _) => self.unavailable = true,
            // Whatever else a library printed.
            _ => {}
        }
    }

    fn decide(&mut self, i: usize, word: &str, reason: &str) {
        self.open = false;
        let reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_REASON)
            .collect();
        let line = format!("{word} {i} {reason}");
        self.verdicts.insert(i, line.trim_end().to_string());
    }

    /// The process exited: a check still open ended it.
    fn ended(&mut self, status: &ExitStatus, last_line: &str) {
        let Some(i) = self.last.filter(|_| self.open) else {
            return;
        };
        if out_of_memory(last_line) {
            self.decide(i, "undecided", last_line);
        } else {
            let said = Some(last_line)
                .filter(|l| !l.is_empty() && !l.starts_with("check "))
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            let why = format!(
                "its check ended the checking process ({}){said}",
                describe(status)
            );
            self.decide(i, "fail", &why);
        }
    }

    /// The process was stopped: a check still open did not finish.
    fn stopped(&mut self, why: &str) {
        if let Some(i) = self.last.filter(|_| self.open) {
            self.decide(i, "fail", &format!("{why}: stopped"));
        }
    }
}

/// `fused`'s own test (`self_check::out_of_memory`): such a check decides nothing.
fn out_of_memory(text: &str) -> bool {
    ["OUT_OF_MEMORY", "ALLOC_FAILED", "out of memory"]
        .iter()
        .any(|m| text.contains(m))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn read(lines: &[&str]) -> Process {
        let mut p = Process::default();
        for line in lines {
            p.read(line);
        }
        p
    }

    #[test]
    fn a_flood_of_verdicts_keeps_one_a_kernel_and_a_short_reason() {
        let long = format!("fail 0 {}\u{7}\u{0}end", "x".repeat(5000));
        let mut lines = vec!["check 0", "pass 0", "pass 0", "fail 0 late"];
        lines.extend(std::iter::repeat_n(long.as_str(), 1000));
        lines.extend(["check 1", &long, "fail 1 bad", "check 99", "pass 99"]);
        lines.extend(["check 18446744073709551615", "pass 18446744073709551615"]);
        let p = read(&lines);
        assert_eq!(
            p.verdicts.into_iter().collect::<Vec<_>>(),
            [(0, "pass 0".to_string()), (1, "fail 1 bad".to_string())]
        );
        // A reason cut short, with no control character: it travels in an environment variable.
        let mut p = read(&["check 2", &long.replace("fail 0", "fail 2")]);
        let kept = p.verdicts.remove(&2).unwrap();
        assert!(
            kept.len() <= MAX_REASON + 10 && !kept.contains('\u{0}'),
            "{kept:?}"
        );
    }

    #[test]
    fn a_verdict_counts_only_for_the_check_that_is_open() {
        // Out of order, before any check, for another kernel: ignored.
        let p = read(&[
            "pass 3",
            "check 4",
            "pass 3",
            "fail 5 no",
            "undecided 4 CUDA_ERROR_OUT_OF_MEMORY",
        ]);
        assert_eq!(
            p.verdicts.into_values().collect::<Vec<_>>(),
            ["undecided 4 CUDA_ERROR_OUT_OF_MEMORY"]
        );
    }

    #[test]
    fn a_check_open_at_the_end_fails_or_out_of_memory_decides_nothing() {
        let mut p = read(&["check 0", "pass 0", "check 1"]);
        p.ended(&ExitStatus::from_raw(6), "check 1");
        assert_eq!(
            p.verdicts[&1],
            "fail 1 its check ended the checking process (killed by signal 6)"
        );
        let mut p = read(&["check 2"]);
        p.ended(&ExitStatus::from_raw(6 << 8), "CUBLAS_STATUS_ALLOC_FAILED");
        assert_eq!(p.verdicts[&2], "undecided 2 CUBLAS_STATUS_ALLOC_FAILED");
        let mut p = read(&["check 3"]);
        p.stopped("the self-checks' time ran out");
        assert_eq!(
            p.verdicts[&3],
            "fail 3 the self-checks' time ran out: stopped"
        );
        // Nothing open: nothing decided.
        let mut p = read(&["check 0", "pass 0"]);
        p.ended(&ExitStatus::from_raw(6), "x");
        p.stopped("y");
        assert_eq!(p.verdicts.len(), 1);
    }
}
