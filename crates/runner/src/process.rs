//! Runs the built train binary: its own process group that dies with the harness, a scrubbed
//! environment, output captured with a size cap, the harness's own clock over three phases
//! (start-up, training, evaluation), each with its own deadline, and the evaluation served over
//! the protocol's pipes.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prepare::env;
use prepare::protocol::{HARNESS_FD, Mark, ProtocolError, Request, TrainStats};

use crate::evaluate::{self, EvalError, LinkError, Rows, Scored, Tolerance};
use crate::{Experiment, RunnerError, io_err};

/// Variables a run may see besides the contract's: the system's basics, locale, and the paths
/// CUDA needs. Nothing else, so no API key, token or proxy credential reaches the train file.
const ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_ROOT",
    "CUDA_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_VISIBLE_DEVICES",
    "RAYON_NUM_THREADS",
    "RUST_BACKTRACE",
];

/// The CUDA driver's JIT cache, under the data cache (`Experiment::writes_jit_cache`).
pub const JIT_CACHE_DIR: &str = "cuda-jit";

pub(crate) fn allowed(key: &str) -> bool {
    (ALLOWED.contains(&key) || key.starts_with("LC_")) && !crate::build::is_secret(key)
}

/// Bytes of output kept: the first `head` and the last `tail`.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct LogCap {
    pub head: usize,
    pub tail: usize,
}

impl Default for LogCap {
    fn default() -> Self {
        LogCap {
            head: 1 << 20,
            tail: 4 << 20,
        }
    }
}

struct CappedLog {
    cap: LogCap,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
    /// Bytes printed once the evaluation began: never kept, so no validation text leaves the
    /// run through its log (which the agent reads).
    hidden: u64,
}

impl CappedLog {
    fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.cap.head - self.head.len();
        let take = room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..take]);
        bytes = &bytes[take..];
        if bytes.len() >= self.cap.tail {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.cap.tail..]);
            return;
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.cap.tail);
        self.tail.drain(..overflow);
        self.tail.extend(bytes);
    }

    fn omitted(&self) -> u64 {
        self.total - self.head.len() as u64 - self.tail.len() as u64
    }
}

/// How the run ended, as the harness saw it.
#[derive(Debug)]
pub enum End {
    /// Trained, served its model, passed the audits.
    Evaluated {
        scored: Box<Scored>,
        stats: TrainStats,
    },
    /// Exited before asking to be evaluated.
    Exited(ExitStatus),
    /// Killed at a phase's deadline; the message says which.
    TimedOut(String),
    /// Broke the protocol or failed an audit; the message says how.
    Invalid(String),
}

/// What the train process did.
pub struct ChildRun {
    pub end: End,
    /// Spawn to exit, as the runner measured it.
    pub wall: Duration,
    /// Spawn to the training-start mark.
    pub startup: Option<Duration>,
    /// The first evaluation request's round trip: the process could have gone on training
    /// before answering it, so it counts as training time.
    pub first_reply: Option<Duration>,
    /// Training-start mark to the request for evaluation: the harness's training time.
    pub training: Option<Duration>,
    /// The evaluation, audits included.
    pub evaluation: Option<Duration>,
    /// The end of the output (up to the tail cap), for the evidence.
    pub tail: String,
    pub output_bytes: u64,
}

/// A pipe pair end for the child's marks: the read end stays here, the write end becomes the
/// child's fd 3.
fn mark_pipe() -> Result<(OwnedFd, OwnedFd), RunnerError> {
    let mut fds = [0i32; 2];
    // SAFETY: plain syscall filling two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io_err("creating the evaluation pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both were just returned by the kernel.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the main loop waits for.
enum Event {
    Mark(Instant, Result<Mark, ProtocolError>),
    Exited(ExitStatus),
    Deadline,
    Interrupted,
}

/// The live child: its marks, its output lines, its exit.
struct Live<'a> {
    child: Child,
    /// The supervisor's pid, which leads a process group of its own.
    pgid: i32,
    marks: mpsc::Receiver<(Instant, Result<Mark, ProtocolError>)>,
    /// The most values the next reply may hold (the mark reader's bound).
    reply_limit: Arc<AtomicUsize>,
    lines: mpsc::Receiver<String>,
    on_line: &'a mut dyn FnMut(&str),
    requests: mpsc::Sender<Vec<u8>>,
    deadline: Instant,
    /// Each evaluation request's round trip, in order.
    latencies: Vec<Duration>,
}

impl Live<'_> {
    fn drain_lines(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            (self.on_line)(&line);
        }
    }

    /// The next mark, exit, deadline or interruption, whichever comes first.
    fn next(&mut self) -> Result<Event, RunnerError> {
        loop {
            // Before anything else: a process that floods marks cannot outlive its deadline.
            if Instant::now() >= self.deadline {
                return Ok(Event::Deadline);
            }
            self.drain_lines();
            match self.marks.recv_timeout(Duration::from_millis(20)) {
                Ok((at, mark)) => return Ok(Event::Mark(at, mark)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
            }
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_err("waiting for the run"))?
            {
                // A mark sent just before exiting still counts.
                if let Ok((at, mark)) = self.marks.try_recv() {
                    return Ok(Event::Mark(at, mark));
                }
                return Ok(Event::Exited(status));
            }
            if crate::interrupted() {
                return Ok(Event::Interrupted);
            }
            if Instant::now() >= self.deadline {
                return Ok(Event::Deadline);
            }
        }
    }

    /// Ends the run: the supervisor kills every process of it, then exits. Should it not
    /// within a few seconds, its group goes too.
    fn kill(&mut self) {
        // Only a supervisor not yet reaped: its pid could be another process's by now.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: plain syscalls on our own child, still unreaped. SIGCONT first: a run could
        // have stopped its supervisor (on kernels without Landlock's signal scope).
        unsafe {
            libc::kill(self.pgid, libc::SIGCONT);
            libc::kill(self.pgid, crate::supervise::STOP);
        }
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(10) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::warn!("the run's supervisor did not stop within 10 s; killing it");
        // SAFETY: as above.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl evaluate::Link for Live<'_> {
    fn call(&mut self, request: Request, max_reply: usize) -> Result<Mark, LinkError> {
        self.reply_limit.store(max_reply, Ordering::SeqCst);
        let sent = Instant::now();
        if self.requests.send(request.encode()).is_err() {
            return Err(LinkError::Gone);
        }
        // After the first reply, each must come within 8 times its time (2 s at least), and all
        // of them together within 3 times as many first replies, + 10 s: a process cannot go on
        // training between requests.
        let overall = self.deadline;
        let first = self.latencies.first().copied();
        if let Some(first) = first {
            let bound = (first * 8).max(Duration::from_secs(2));
            let so_far: Duration = self.latencies.iter().sum();
            let total = first * 3 * (self.latencies.len() as u32 + 1) + Duration::from_secs(10);
            let left = total.saturating_sub(so_far);
            self.deadline = overall.min(sent + bound.min(left));
        }
        let event = self.next().map_err(|_| LinkError::Gone);
        self.deadline = overall;
        let reply = match event? {
            Event::Mark(_, Ok(Mark::Failed(why))) => {
                // Only the start: the message must not carry validation text out.
                Err(LinkError::Failed(why.chars().take(300).collect()))
            }
            Event::Mark(_, Ok(mark)) => Ok(mark),
            Event::Mark(_, Err(ProtocolError::Closed)) | Event::Exited(_) => Err(LinkError::Gone),
            Event::Mark(_, Err(e)) => Err(LinkError::Malformed(e.to_string())),
            Event::Deadline if Instant::now() < overall => Err(LinkError::Slow(format!(
                "evaluation request {} got no reply within {:.1}s (each may take 8 times the first's {:.2}s, and all together 3 times as many first replies + 10s)",
                self.latencies.len() + 1,
                sent.elapsed().as_secs_f64(),
                first.unwrap_or_default().as_secs_f64()
            ))),
            Event::Deadline => Err(LinkError::Timeout),
            Event::Interrupted => Err(LinkError::Interrupted),
        };
        self.latencies.push(sent.elapsed());
        reply
    }
}

/// Everything the child needs from the harness beyond the experiment.
pub(crate) struct Setup<'a> {
    pub exe: &'a Path,
    pub data: &'a prepare::Dataset,
    pub rows: &'a Rows,
    /// What a run checks instead of training: the binary becomes a checking process for the
    /// fused kernels (`self_checks`), with no descriptor for marks (fd 3).
    pub check: Option<&'a str>,
    /// Tests only: a fault injected into a checking process's check of one kernel
    /// (`AUTORESEARCH_FUSED_CHECK_FAULT`, `Kernel:abort|hang|fail|oom`).
    pub fault: Option<&'a str>,
    /// The fused kernels' verdicts for a sandboxed run (`prepare::env::SELF_CHECKS`); `None`:
    /// the run checks them in its own process.
    pub verdicts: Option<&'a str>,
}

pub(crate) fn run_child(
    exp: &Experiment,
    setup: &Setup,
    on_line: &mut dyn FnMut(&str),
) -> Result<ChildRun, RunnerError> {
    let secrets = secret_values();
    let mut on_line =
        |line: &str| on_line(&String::from_utf8_lossy(&redact(line.as_bytes(), &secrets)));
    let mut cmd = Command::new(setup.exe);
    cmd.env_clear();
    for (key, value) in std::env::vars_os() {
        if allowed(&key.to_string_lossy()) {
            cmd.env(key, value);
        }
    }
    cmd.env(env::CACHE, &exp.cache)
        .env(env::PRESET, &setup.data.preset().name)
        .env(env::DEVICE, exp.device.as_str())
        .env(env::TIME_BUDGET, format!("{}", exp.budget.as_secs_f64()))
        .env(env::SEED, exp.seed.to_string())
        .current_dir(&exp.run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match setup.check {
        Some(request) => cmd.env(env::FUSED_SELF_CHECK, request),
        None => cmd.env(env::HARNESS_FD, HARNESS_FD.to_string()),
    };
    if let Some(fault) = setup.fault {
        cmd.env("AUTORESEARCH_FUSED_CHECK_FAULT", fault);
    }
    if let Some(gpus) = &exp.gpus {
        cmd.env("CUDA_VISIBLE_DEVICES", gpus);
    }
    if let Some(threads) = exp.threads {
        cmd.env("RAYON_NUM_THREADS", threads.to_string());
    }
    let harness = std::process::id() as i32;
    // Temporary files go to a directory of the run's own, not to /tmp (which may hold the
    // repository itself, as in tests).
    let tmp = exp.run_dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(io_err("creating the run's tmp dir"))?;
    cmd.env("TMPDIR", &tmp);
    // The driver's PTX JIT cache, so kernels compile for this GPU once, not at every run's
    // start. Set on the CPU too (nothing reads it there), so its confinement is tested anywhere.
    // A data cache the harness cannot write (a read-only mount) leaves runs without one.
    let jit_cache = exp.cache.join(JIT_CACHE_DIR);
    let jit_cache = match std::fs::create_dir_all(&jit_cache) {
        Ok(()) => {
            cmd.env("CUDA_CACHE_PATH", &jit_cache);
            let access = if exp.writes_jit_cache {
                crate::sandbox::Access::Write
            } else {
                crate::sandbox::Access::Read
            };
            Some((jit_cache, access))
        }
        Err(e) => {
            tracing::warn!(
                "no CUDA JIT cache at {}: {e}; kernels compile at every run's start",
                jit_cache.display()
            );
            None
        }
    };
    if !crate::supervise::available() {
        return Err(RunnerError::Other(
            "this kernel does not list a process's children (/proc/PID/task/TID/children, CONFIG_PROC_CHILDREN), which the harness needs to stop every process a run starts: use a kernel built with it".into(),
        ));
    }
    let (sandbox, mut filter) = if exp.sandbox {
        let mut allow: Vec<_> = exp
            .sandbox_allow
            .iter()
            .map(|p| (p.clone(), crate::sandbox::Access::Read))
            .collect();
        allow.extend(jit_cache.clone());
        let rules =
            crate::sandbox::rules(&exp.run_dir, setup.data, &allow).map_err(RunnerError::Other)?;
        // Fail closed: a run the harness cannot confine does not start.
        let sandbox = crate::sandbox::Sandbox::new(&rules).map_err(|why| {
            RunnerError::Other(why.unwrap_or_else(|| "this kernel has no Landlock (Linux 5.13+ with `landlock` in its lsm= list), so the experiment cannot be confined: it could read the validation data and your home directory. Enable Landlock, or pass --no-sandbox to run experiments unconfined at your own risk".into()))
        })?;
        let filter = crate::sandbox::syscall_filter().map_err(|e| {
            RunnerError::Other(format!(
                "{e}: the experiment cannot be confined; pass --no-sandbox to run it unconfined at your own risk"
            ))
        })?;
        (Some(sandbox), Some(filter))
    } else {
        (None, None)
    };
    if exp.sandbox && setup.check.is_none() {
        // A child of the run cannot open the GPU: Landlock grants /proc (where the driver names
        // its threads) to the run's own PID only. The harness's checking processes could.
        cmd.env(env::SELF_CHECKS, setup.verdicts.unwrap_or("in-process"));
    }
    let sandbox_line = match &sandbox {
        Some(s) => s.describe(&exp.run_dir, jit_cache.as_ref()),
        None => {
            "# sandbox: environment scrubbed to an allowlist; confinement turned off (--no-sandbox)"
                .into()
        }
    };
    let mut ruleset = sandbox.map(crate::sandbox::Sandbox::into_ruleset);
    // The limits come with the confinement: made here, joined by the train process.
    let tasks = if exp.sandbox {
        crate::limits::TaskCap::new(exp.limits.tasks).map_err(RunnerError::Other)?
    } else {
        crate::limits::TaskCap::None
    };
    let (procs_fd, nproc) = (tasks.procs_fd(), tasks.rlimit());
    let memory = if exp.sandbox { exp.limits.memory } else { 0 };
    let data_only = exp.device != crate::Device::Cpu;
    let sandbox_line = if exp.sandbox {
        format!(
            "{sandbox_line}; {}; memory capped at {:.1} GiB per process",
            tasks.describe(),
            memory as f64 / (1u64 << 30) as f64
        )
    } else {
        sandbox_line
    };
    let confine = exp.sandbox;
    let marks_wanted = setup.check.is_none();
    let mut sweep = crate::supervise::Sweep::new();
    let (marks_read, marks_write) = mark_pipe()?;
    let marks_fd = marks_write.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The harness's child stays behind as the run's supervisor (it dies with the
            // harness); what returns here is the train process.
            crate::supervise::split(harness, &mut sweep)?;
            crate::limits::apply(procs_fd, nproc, memory, data_only)?;
            // Confine first: the ruleset's descriptor may be the number fd 3 takes next.
            if let Some(ruleset) = ruleset.take() {
                crate::sandbox::Sandbox::restrict_self(ruleset)?;
            }
            if confine {
                crate::sandbox::Sandbox::drop_capabilities()?;
            }
            if let Some(filter) = &mut filter {
                crate::sandbox::aim_at_supervisor(filter, libc::getppid());
                seccompiler::apply_filter(filter).map_err(|_| std::io::Error::last_os_error())?;
            }
            // The mark pipe becomes fd 3, open across exec.
            if !marks_wanted {
                // A checking process: the pipe closes at exec.
            } else if marks_fd == HARNESS_FD {
                libc::fcntl(marks_fd, libc::F_SETFD, 0);
            } else if libc::dup2(marks_fd, HARNESS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(dir) = exp.log_path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("creating the log directory"))?;
    }
    let log = Arc::new(Mutex::new(CappedLog {
        cap: exp.log_cap,
        head: Vec::new(),
        tail: VecDeque::new(),
        total: 0,
        hidden: 0,
    }));
    let evaluating = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", setup.exe.display())))?;
    drop(marks_write);
    let pgid = child.id() as i32;
    let (lines_tx, lines_rx) = mpsc::sync_channel::<String>(256);
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut pipe| {
        let log = log.clone();
        let lines = lines_tx.clone();
        let evaluating = evaluating.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut partial = Vec::new();
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if evaluating.load(Ordering::SeqCst) {
                    log.lock().unwrap().hidden += n as u64;
                    continue;
                }
                log.lock().unwrap().push(&buf[..n]);
                // Lines for live progress; dropped rather than slowing a flood down.
                for &b in &buf[..n] {
                    if b == b'\n' || b == b'\r' {
                        if !partial.is_empty() {
                            let _ = lines.try_send(String::from_utf8_lossy(&partial).into_owned());
                            partial.clear();
                        }
                    } else if partial.len() < 4096 {
                        partial.push(b);
                    }
                }
            }
        })
    })
    .collect();
    drop(lines_tx);
    // Marks in, stamped as they arrive; requests out, on threads of their own so that no read or
    // write ever blocks the clock. Neither is joined: a pipe held open elsewhere cannot hang us.
    let (marks_tx, marks_rx) = mpsc::sync_channel(2);
    let reply_limit = Arc::new(AtomicUsize::new(0));
    let limit = reply_limit.clone();
    std::thread::spawn(move || {
        let mut pipe = std::io::BufReader::new(std::fs::File::from(marks_read));
        loop {
            let mark = Mark::read_at_most(&mut pipe, || limit.load(Ordering::SeqCst));
            let last = mark.is_err();
            if marks_tx.send((Instant::now(), mark)).is_err() || last {
                break;
            }
        }
    });
    let (requests_tx, requests_rx) = mpsc::channel::<Vec<u8>>();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        for frame in requests_rx {
            if stdin.write_all(&frame).and_then(|_| stdin.flush()).is_err() {
                break;
            }
        }
    });

    let mut live = Live {
        child,
        pgid,
        marks: marks_rx,
        reply_limit,
        lines: lines_rx,
        on_line: &mut on_line,
        requests: requests_tx,
        deadline: start + exp.startup_grace,
        latencies: Vec::new(),
    };
    let mut phases = Phases::default();
    let end = match setup.check {
        Some(_) => drive_check(exp, &mut live)?,
        None => drive(exp, setup, &mut live, start, &mut phases, &evaluating)?,
    };
    let wall = start.elapsed();
    // Anything the run left in its group goes too.
    live.kill();
    drop(live.requests);
    // The output pipes close when the last process holding them ends; one that escaped the
    // group could hold them for ever, so the readers get a few seconds, not a join.
    let waited = Instant::now();
    while readers.iter().any(|r| !r.is_finished()) && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let held_open = readers.iter().any(|r| !r.is_finished());
    while let Ok(line) = live.lines.try_recv() {
        (live.on_line)(&line);
    }

    let log = log.lock().unwrap();
    // The log lives outside the run directory. Still, an unconfined run (--no-sandbox) could
    // have planted a link there: whatever is at the path goes (a link is removed, not followed)
    // and the log is made afresh, exclusive and no-follow. No process of the run is left to race.
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::remove_file(&exp.log_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err(format!("replacing {}", exp.log_path.display()))(e));
            }
            _ => {}
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&exp.log_path)
            .map_err(io_err(format!("writing {}", exp.log_path.display())))?
    };
    let head = redact(&log.head, &secrets);
    let tail = redact(&log.tail.iter().copied().collect::<Vec<u8>>(), &secrets);
    let write = (|| {
        writeln!(file, "{sandbox_line}")?;
        file.write_all(&head)?;
        if log.omitted() > 0 {
            writeln!(file, "\n[... {} bytes omitted ...]", log.omitted())?;
        }
        file.write_all(&tail)?;
        if log.hidden > 0 {
            writeln!(
                file,
                "[{} bytes printed during the evaluation, not kept: validation text must not leave the run]",
                log.hidden
            )?;
        }
        if held_open {
            writeln!(
                file,
                "[the output pipes were still held open after the run was killed: a process escaped its group]"
            )?;
        }
        Ok(())
    })();
    write.map_err(io_err(format!("writing {}", exp.log_path.display())))?;
    // The whole output when nothing was dropped, else the tail.
    let mut tail_bytes = if log.omitted() == 0 { head } else { Vec::new() };
    tail_bytes.extend(tail);
    Ok(ChildRun {
        end,
        wall,
        startup: phases.startup,
        first_reply: live.latencies.first().copied(),
        training: phases.training,
        evaluation: phases.evaluation,
        tail: String::from_utf8_lossy(&tail_bytes).into_owned(),
        output_bytes: log.total,
    })
}

#[derive(Default)]
struct Phases {
    startup: Option<Duration>,
    training: Option<Duration>,
    evaluation: Option<Duration>,
}

/// The phases, on the harness's clock: start-up until the training-start mark, training until
/// the request for evaluation, then the evaluation. Each has its own deadline.
fn drive(
    exp: &Experiment,
    setup: &Setup,
    live: &mut Live,
    start: Instant,
    phases: &mut Phases,
    evaluating: &AtomicBool,
) -> Result<End, RunnerError> {
    let interrupted = |live: &mut Live| {
        live.kill();
        Err(RunnerError::Interrupted)
    };
    // Start-up: data, device, the warm-up steps.
    let deadline_note = || {
        format!(
            "no training-start mark within {:.0}s of start-up (data, device and the {} warm-up steps must fit in it)",
            exp.startup_grace.as_secs_f64(),
            prepare::clock::WARMUP_STEPS + 1
        )
    };
    let started = match next_mark(live, "during start-up", &deadline_note)? {
        Ok((at, Mark::Start)) => at,
        Ok((_, Mark::Evaluate(_))) => {
            return Ok(End::Invalid(
                "the run asked for evaluation without marking the start of training: the budget clock must come from prepare's `Run::clock`".into(),
            ));
        }
        Ok((_, other)) => {
            return Ok(End::Invalid(format!(
                "unexpected {} during start-up",
                evaluate::describe(&other)
            )));
        }
        Err(end) => return Ok(end),
    };
    phases.startup = Some(started - start);
    // Training: the budget plus room for the last step, then killed.
    live.deadline = started + exp.budget + exp.step_grace();
    let deadline_note = || {
        format!(
            "still training {:.1}s after its training started, for a budget of {:.1}s: the harness keeps the time",
            started.elapsed().as_secs_f64(),
            exp.budget.as_secs_f64()
        )
    };
    let (asked, stats) = match next_mark(live, "during training", &deadline_note)? {
        Ok((at, Mark::Evaluate(stats))) => (at, stats),
        Ok((_, other)) => {
            return Ok(End::Invalid(format!(
                "unexpected {} during training",
                evaluate::describe(&other)
            )));
        }
        Err(end) => return Ok(end),
    };
    phases.training = Some(asked - started);
    evaluating.store(true, Ordering::SeqCst);
    // Evaluation, under its own deadline.
    live.deadline = asked + exp.eval_grace;
    let mut rng = prepare::loader::Rng::new(audit_seed());
    let scored = evaluate::evaluate(
        live,
        setup.rows,
        setup.data.token_bytes(),
        setup.data.vocab_size(),
        stats.eval_batch_rows as usize,
        Tolerance::for_device(exp.device),
        &mut rng,
    );
    phases.evaluation = Some(asked.elapsed());
    let end = match scored {
        Ok(scored) => {
            let _ = live.requests.send(Request::Done.encode());
            // A moment to exit on its own; the group is killed after anyway.
            live.deadline = Instant::now() + Duration::from_secs(5);
            while let Event::Mark(..) = live.next()? {}
            End::Evaluated {
                scored: Box::new(scored),
                stats,
            }
        }
        Err(EvalError::Invalid(why)) => End::Invalid(why),
        Err(EvalError::Link(LinkError::Timeout)) => End::TimedOut(format!(
            "the evaluation took longer than {:.0}s",
            exp.eval_grace.as_secs_f64()
        )),
        Err(EvalError::Link(LinkError::Slow(why))) => {
            End::TimedOut(format!("{why}: no training during the evaluation"))
        }
        Err(EvalError::Link(LinkError::Interrupted)) => return interrupted(live),
        Err(EvalError::Link(LinkError::Failed(why))) => {
            End::Invalid(format!("the model failed during the evaluation: {why}"))
        }
        Err(EvalError::Link(LinkError::Malformed(why))) => {
            End::Invalid(format!("the evaluation's replies were malformed: {why}"))
        }
        Err(EvalError::Link(LinkError::Gone)) => {
            // The process ended mid-evaluation: its status says how.
            live.deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match live.next()? {
                    Event::Exited(status) if !status.success() => break End::Exited(status),
                    Event::Mark(..) => continue,
                    _ => {
                        break End::Invalid(
                            "the run stopped answering in the middle of its evaluation".into(),
                        );
                    }
                }
            }
        }
    };
    Ok(end)
}

/// A checking process (`Setup::check`): its exit, or its start-up deadline. It has no phases, so
/// a mark (a train file that does not link the fused kernels, training instead) ends it.
fn drive_check(exp: &Experiment, live: &mut Live) -> Result<End, RunnerError> {
    loop {
        return Ok(match live.next()? {
            Event::Mark(_, Err(ProtocolError::Closed)) => continue,
            Event::Mark(..) => End::Invalid("a checking process marked a run's phase".into()),
            Event::Exited(status) => End::Exited(status),
            Event::Interrupted => {
                live.kill();
                return Err(RunnerError::Interrupted);
            }
            Event::Deadline => End::TimedOut(format!(
                "the self-checks' time ran out ({:.0}s were left for this process)",
                exp.startup_grace.as_secs_f64()
            )),
        });
    }
}

/// The next mark of a phase (`during start-up`, ...), or how the run ended instead.
fn next_mark(
    live: &mut Live,
    phase: &str,
    deadline_note: &dyn Fn() -> String,
) -> Result<Result<(Instant, Mark), End>, RunnerError> {
    loop {
        let end = match live.next()? {
            Event::Mark(at, Ok(mark)) => return Ok(Ok((at, mark))),
            // The pipe closed: the process is exiting (or closed fd 3); its exit decides.
            Event::Mark(_, Err(ProtocolError::Closed)) => {
                live.deadline = live.deadline.min(Instant::now() + Duration::from_secs(10));
                continue;
            }
            Event::Mark(_, Err(e)) => End::Invalid(format!("a mark {phase}: {e}")),
            Event::Exited(status) if status.success() => End::Invalid(format!(
                "the run exited {phase} without serving its model for evaluation: it must end with prepare's `Run::finish`"
            )),
            Event::Exited(status) => End::Exited(status),
            Event::Interrupted => {
                live.kill();
                return Err(RunnerError::Interrupted);
            }
            Event::Deadline => End::TimedOut(deadline_note()),
        };
        return Ok(Err(end));
    }
}

/// Fresh randomness for where the audits look: the run cannot predict it from its seed.
fn audit_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ ((std::process::id() as u64) << 32);
    }
    u64::from_le_bytes(bytes)
}

/// The harness's secret values (API keys, tokens: the variables kept from runs) long enough to
/// be unambiguous. A run cannot see them in its environment, but it might find one elsewhere (the
/// environment of another process of the user's, a file) and print it: it is cut from the output
/// before the output reaches a log, the evidence, the journal or a model.
fn secret_values() -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    std::env::vars_os()
        .filter(|(k, v)| crate::build::is_secret(&k.to_string_lossy()) && v.len() >= 8)
        .map(|(_, v)| v.as_bytes().to_vec())
        .collect()
}

fn redact(bytes: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for secret in secrets {
        let mut i = 0;
        let mut next = Vec::with_capacity(out.len());
        while i < out.len() {
            if out[i..].starts_with(secret) {
                next.extend_from_slice(b"[redacted]");
                i += secret.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    out
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
