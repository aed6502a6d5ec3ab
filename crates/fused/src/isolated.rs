//! The self-checks in a child process. A kernel that faults on the card (an address out of
//! bounds, a trap) leaves its CUDA context unusable for the rest of the process: checked inside
//! the training process, it would end the run where the plain path could have gone on. So the
//! first check in a process runs them all in a child: the same executable started again with
//! `CHILD_ENV` naming the kernels, caught by a constructor before `main` (the `ctor` crate), so
//! the child runs none of the train file's code. A check that crashes, hangs or fails fails its
//! kernel alone: the child stops at a failure (its context may be unusable) and a new one checks
//! the kernels after it.
//!
//! Inside the harness's sandbox a child of the run could not open the GPU (Landlock grants
//! `/proc`, where the driver names its threads, to the run's own PID only), so there the harness
//! runs the checking processes itself, each confined as a run is, and hands the run their
//! verdicts in `WHERE_ENV` (`checked`, then one protocol line a kernel).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use candle_core::{Device, DeviceLocation};

use crate::Kernel;

/// What a child checks: `cpu 0,3` or `cuda:1 0,3` (the device, then the kernels' indices), or
/// `cuda:0 from:3` (every kernel from the fourth on; the harness's form, which knows no list).
const CHILD_ENV: &str = "AUTORESEARCH_FUSED_SELF_CHECK";
/// `prepare::env::SELF_CHECKS`, set by the harness on sandboxed runs: `in-process` (no child),
/// or `checked` and a line a kernel the harness's checking processes decided (`pass 3`,
/// `fail 7 WHY`, `undecided 2 WHY`), and `unchecked K WHY` where their time ran out.
const WHERE_ENV: &str = "AUTORESEARCH_SELF_CHECKS";
/// How long one check may take, its module's load (and PTX JIT) included, though a check takes
/// milliseconds once loaded.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// How long all the checks may take, restarts included: past it the kernels not yet checked take
/// the plain path, unchecked (in the run's process, one that hung its child could hang the run).
const TOTAL_TIMEOUT: Duration = Duration::from_secs(45);
/// The harness's descriptor for the run's marks: not the child's to use.
const HARNESS_FD_ENV: &str = "AUTORESEARCH_HARNESS_FD";

/// A kernel's check, as a child ran it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(String),
    /// Ran out of memory: decides nothing (the caller checks again later).
    Undecided,
}

/// Each of `kernels`' outcome on `device`, checked in child processes. A kernel missing from the
/// answer could not be checked there (`AUTORESEARCH_SELF_CHECKS=in-process`, or no child started,
/// or none could open the device and run a plain op on it: a GPU in exclusive-process mode, say):
/// the caller checks it in its own process. `timeout` bounds each check. `fault` (tests only) is
/// `Name:mode`: the check of the kernel of that `Debug` name aborts, hangs, fails or runs out of
/// memory.
pub fn in_children(
    kernels: &[Kernel],
    device: &Device,
    timeout: Duration,
    fault: Option<&str>,
) -> BTreeMap<Kernel, Outcome> {
    let mut outcomes = BTreeMap::new();
    // In a child already (a check that reached a public op): no grandchildren.
    if std::env::var_os(CHILD_ENV).is_some() {
        return outcomes;
    }
    match std::env::var(WHERE_ENV) {
        Ok(v) if v == "in-process" => return outcomes,
        Ok(v) if v.starts_with("checked") => return given(&v, kernels),
        _ => {}
    }
    let device = match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { .. } => return outcomes,
    };
    let deadline = Instant::now() + TOTAL_TIMEOUT.max(timeout);
    loop {
        let left: Vec<Kernel> = kernels
            .iter()
            .filter(|k| !outcomes.contains_key(*k))
            .copied()
            .collect();
        let decided = outcomes.len();
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for k in left {
                let why = format!(
                    "not checked: the self-checks' {:.0}s were spent",
                    TOTAL_TIMEOUT.as_secs_f64()
                );
                outcomes.insert(k, Outcome::Failed(why));
            }
            break;
        }
        if let Err(why) = one_child(&device, &left, timeout, deadline, fault, &mut outcomes) {
            eprintln!("note: the fused kernels are checked in this process ({why})");
            break;
        }
        if outcomes.len() == decided {
            break;
        }
    }
    outcomes
}

/// The harness's verdicts (`checked`, then protocol lines) on `kernels`; a kernel it did not
/// decide is left to the caller.
fn given(verdicts: &str, kernels: &[Kernel]) -> BTreeMap<Kernel, Outcome> {
    let mut outcomes = BTreeMap::new();
    for line in verdicts.lines() {
        match Line::parse(line) {
            Line::Verdict(k, outcome) if kernels.contains(&k) => {
                outcomes.insert(k, outcome);
            }
            // The harness's time ran out: the kernels from the K-th on take the plain path, as
            // past `TOTAL_TIMEOUT` here (checked in the run's process, a hang would hang it).
            Line::Unchecked(first, why) => {
                for k in kernels.iter().filter(|k| **k as usize >= first) {
                    outcomes.insert(*k, Outcome::Failed(why.clone()));
                }
            }
            _ => {}
        }
    }
    outcomes
}

/// One line of a child's output.
enum Line {
    /// `check I`: the check of kernel I starts.
    Check(Kernel),
    /// `pass I`, `fail I WHY`, `undecided I WHY`.
    Verdict(Kernel, Outcome),
    /// `unavailable WHY`: the child could not use the device.
    Unavailable(String),
    /// `unchecked K WHY` (the harness's only): no time was left for the kernels from index K on.
    Unchecked(usize, String),
    /// Whatever else a library printed.
    Other,
}

impl Line {
    fn parse(line: &str) -> Line {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let (index, message) = rest.split_once(' ').unwrap_or((rest, ""));
        let kernel = index.parse().ok().and_then(Kernel::from_index);
        match (word, kernel) {
            ("check", Some(k)) => Line::Check(k),
            ("unavailable", _) => Line::Unavailable(rest.to_string()),
            ("unchecked", _) => match index.parse() {
                Ok(first) => Line::Unchecked(first, message.to_string()),
                Err(_) => Line::Other,
            },
            ("pass", Some(k)) => Line::Verdict(k, Outcome::Passed),
            ("fail", Some(k)) => Line::Verdict(k, Outcome::Failed(message.to_string())),
            ("undecided", Some(k)) => Line::Verdict(k, Outcome::Undecided),
            _ => Line::Other,
        }
    }
}

/// Starts one child on `kernels` and records what it decided; the check it was in when it
/// ended or stopped answering fails (or, out of memory, decides nothing).
fn one_child(
    device: &str,
    kernels: &[Kernel],
    timeout: Duration,
    deadline: Instant,
    fault: Option<&str>,
    outcomes: &mut BTreeMap<Kernel, Outcome>,
) -> Result<(), String> {
    let list: Vec<String> = kernels.iter().map(|k| (*k as usize).to_string()).collect();
    // This very executable, even if its file was replaced since it started.
    let mut command = Command::new("/proc/self/exe");
    command
        .env(CHILD_ENV, format!("{device} {}", list.join(",")))
        .env_remove(FAULT_ENV)
        .env_remove(HARNESS_FD_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(fault) = fault {
        command.env(FAULT_ENV, fault);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting a checking process: {e}"))?;
    let (tx, lines) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    std::thread::spawn(move || {
        // Bytes, not text: a stray non-UTF-8 line must not end the reading.
        for line in stdout.split(b'\n').map_while(Result::ok) {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().expect("piped");
    let (stderr_tx, stderr_text) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        let _ = stderr_tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    let mut current = None;
    let mut check_deadline = (Instant::now() + timeout).min(deadline);
    let unavailable = loop {
        match lines.recv_timeout(check_deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => match Line::parse(&line) {
                Line::Check(k) => {
                    current = Some(k);
                    check_deadline = (Instant::now() + timeout).min(deadline);
                }
                Line::Unavailable(why) => break Some(why),
                Line::Verdict(k, outcome) => {
                    outcomes.insert(k, outcome);
                    current = None;
                }
                Line::Unchecked(..) | Line::Other => {}
            },
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                if let Some(k) = current.take() {
                    let why = format!(
                        "its check did not finish within {:.0}s: stopped",
                        timeout.as_secs_f64()
                    );
                    outcomes.insert(k, Outcome::Failed(why));
                }
                break None;
            }
            Err(RecvTimeoutError::Disconnected) => break None,
        }
    };
    // Its output closed: it is ending, or hung with its pipes closed. Not waited on for ever.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < check_deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    // Anything it started may still hold its stderr: a second at most.
    let stderr = stderr_text
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    if let Some(k) = current {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let outcome = match (status, last) {
            (_, Some(last)) if crate::self_check::out_of_memory(last) => Outcome::Undecided,
            (Some(status), last) => Outcome::Failed(format!(
                "its check ended the checking process ({status}){}",
                last.map(|l| format!(": {}", l.trim())).unwrap_or_default()
            )),
            (None, _) => Outcome::Failed(format!(
                "its check did not finish within {:.0}s: stopped",
                timeout.as_secs_f64()
            )),
        };
        outcomes.insert(k, outcome);
    }
    match unavailable {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Tests only: `Name:mode` (`abort`, `hang`, `fail` or `oom`) for the check of one kernel, or
/// `Device:fail` for the device's opening.
const FAULT_ENV: &str = "AUTORESEARCH_FUSED_CHECK_FAULT";

// SAFETY (of running before `main`): the constructor reads one variable and returns at once
// unless a parent set it; a child then runs the checks and exits without returning to `main`.
#[ctor::ctor(unsafe)]
fn check_if_asked() {
    if let Some(request) = std::env::var_os(CHILD_ENV) {
        std::process::exit(serve(&request.to_string_lossy()));
    }
}

/// The child: `check I` before each kernel's check, then `pass I`, `undecided I WHY` (out of
/// memory) or `fail I WHY`, after which it stops (exit 1 if kernels were left): a kernel that
/// failed may have left the context unusable, and every later check would fail with it.
fn serve(request: &str) -> i32 {
    let (device, list) = request.split_once(' ').unwrap_or((request, ""));
    let device = match device.strip_prefix("cuda:") {
        Some(id) => match id.parse() {
            Ok(id) => Device::new_cuda(id),
            Err(_) => Err(candle_core::Error::Msg(format!("no device `{device}`"))),
        },
        None => Ok(Device::Cpu),
    };
    // A plain op first: where even that fails (a sandbox, a driver's state), the fault is the
    // process's, not any kernel's, and the caller checks them in its own.
    let canary = |device: Device| -> candle_core::Result<Device> {
        let sum = candle_core::Tensor::ones(4, candle_core::DType::F32, &device)?.sum_all()?;
        match sum.to_scalar::<f32>()? {
            4.0 => Ok(device),
            other => candle_core::bail!("a plain sum of four ones gave {other}"),
        }
    };
    let fault = std::env::var(FAULT_ENV).unwrap_or_default();
    let device = device.and_then(|device| match fault.as_str() {
        "Device:fail" => candle_core::bail!("injected failure of the device"),
        _ => Ok(device),
    });
    let device = match device.and_then(canary) {
        Ok(device) => device,
        Err(e) => {
            println!("unavailable {}", one_line(&e.to_string()));
            return 2;
        }
    };
    let kernels: Vec<Kernel> = match list.strip_prefix("from:") {
        Some(first) => Kernel::ALL
            .iter()
            .skip(first.parse().unwrap_or(Kernel::ALL.len()))
            .copied()
            .collect(),
        None => list
            .split(',')
            .filter_map(|i| i.parse().ok().and_then(Kernel::from_index))
            .collect(),
    };
    // A check that hangs (a kernel spinning on the card) fails and ends its process here, so a
    // parent with one deadline for the whole process (the harness's) still gets the rest checked.
    let started = std::sync::Arc::new(std::sync::Mutex::new(None::<(usize, Instant)>));
    let watched = started.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            if let Some((i, at)) = *watched.lock().unwrap_or_else(|e| e.into_inner())
                && at.elapsed() > CHECK_TIMEOUT
            {
                println!(
                    "fail {i} its check did not finish within {:.0}s: stopped",
                    CHECK_TIMEOUT.as_secs_f64()
                );
                // Not `exit`: its handlers could wait on the hung device.
                std::process::abort();
            }
        }
    });
    for (n, &kernel) in kernels.iter().enumerate() {
        let i = kernel as usize;
        println!("check {i}");
        *started.lock().unwrap_or_else(|e| e.into_inner()) = Some((i, Instant::now()));
        let result = match fault.strip_prefix(&format!("{kernel:?}:")) {
            Some(mode) => injected(mode),
            None => crate::self_check::run(kernel, &device),
        };
        *started.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match result {
            Ok(()) => println!("pass {i}"),
            Err(e) if crate::self_check::out_of_memory(&e.to_string()) => {
                println!("undecided {i} {}", one_line(&e.to_string()))
            }
            Err(e) => {
                println!("fail {i} {}", one_line(&e.to_string()));
                // 1: stopped with kernels left unchecked (the harness starts another process
                // for them); 0 where this was the last, so none is started for nothing.
                return i32::from(n + 1 < kernels.len());
            }
        }
    }
    0
}

fn injected(mode: &str) -> candle_core::Result<()> {
    match mode {
        "abort" => std::process::abort(),
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "oom" => candle_core::bail!("CUDA_ERROR_OUT_OF_MEMORY (injected)"),
        _ => candle_core::bail!("injected failure"),
    }
}

/// An error's first line: the message, without the backtrace candle appends under
/// `RUST_BACKTRACE`.
fn one_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_string()
}
