//! Runs the built train binary: its own process group that dies with the harness, a scrubbed
//! environment, output captured with a size cap, and a hard timeout that kills the group.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prepare::env;

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

fn allowed(key: &str) -> bool {
    (ALLOWED.contains(&key) || key.starts_with("LC_")) && !crate::build::is_secret(key)
}

/// Bytes of output kept: the first `head` and the last `tail`.
#[derive(Clone, Copy, Debug)]
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

/// What the train process did.
pub struct ChildRun {
    pub status: ExitStatus,
    pub timed_out: bool,
    /// Spawn to exit, as the runner measured it.
    pub wall: Duration,
    /// The end of the output (up to the tail cap), for the summary and the evidence.
    pub tail: String,
    pub output_bytes: u64,
    /// The process group the run had (its pid): gone once this returns.
    pub pgid: i32,
}

pub(crate) fn run_child(
    exp: &Experiment,
    preset: &str,
    exe: &Path,
    report: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<ChildRun, RunnerError> {
    let secrets = secret_values();
    let mut on_line =
        |line: &str| on_line(&String::from_utf8_lossy(&redact(line.as_bytes(), &secrets)));
    let mut cmd = Command::new(exe);
    cmd.env_clear();
    for (key, value) in std::env::vars_os() {
        if allowed(&key.to_string_lossy()) {
            cmd.env(key, value);
        }
    }
    cmd.env(env::CACHE, &exp.cache)
        .env(env::PRESET, preset)
        .env(env::DEVICE, exp.device.as_str())
        .env(env::TIME_BUDGET, format!("{}", exp.budget.as_secs_f64()))
        .env(env::REPORT, report)
        .env(env::SEED, exp.seed.to_string())
        .current_dir(&exp.run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let harness = std::process::id() as i32;
    // Temporary files go to a directory of the run's own, not to /tmp (which may hold the
    // repository itself, as in tests).
    let tmp = exp.run_dir.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(io_err("creating the run's tmp dir"))?;
    cmd.env("TMPDIR", &tmp);
    let writable = [exp.run_dir.as_path(), Path::new("/dev")];
    let sandbox = exp
        .sandbox
        .then(|| crate::sandbox::Sandbox::new(&writable))
        .flatten();
    let sandbox_line = match (&sandbox, exp.sandbox) {
        (Some(s), _) => s.describe(&writable),
        (None, true) => "# sandbox: environment scrubbed to an allowlist; this kernel has no Landlock, so network and file-system writes are not confined".into(),
        (None, false) => "# sandbox: environment scrubbed to an allowlist; Landlock turned off".into(),
    };
    let ruleset = sandbox.as_ref().map(|s| s.raw_fd());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the harness, even when it is killed with SIGKILL.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != harness {
                libc::_exit(1);
            }
            if let Some(fd) = ruleset {
                crate::sandbox::Sandbox::restrict_self(fd)?;
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
    }));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", exe.display())))?;
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
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut partial = Vec::new();
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
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

    let deadline = start + exp.hard_timeout();
    let mut timed_out = false;
    let status = loop {
        while let Ok(line) = lines_rx.try_recv() {
            on_line(&line);
        }
        if let Some(status) = child.try_wait().map_err(io_err("waiting for the run"))? {
            break status;
        }
        if crate::interrupted() {
            // SAFETY: plain syscall; a negative pid names the process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(RunnerError::Interrupted);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // SAFETY: plain syscall; a negative pid names the process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait().map_err(io_err("waiting for the killed run"))?;
        }
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(50)) {
            on_line(&line);
        }
    };
    let wall = start.elapsed();
    // Anything the run left in its group (it should have none) goes too.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    for reader in readers {
        let _ = reader.join();
    }
    while let Ok(line) = lines_rx.try_recv() {
        on_line(&line);
    }

    let log = log.lock().unwrap();
    let mut file = std::fs::File::create(&exp.log_path)
        .map_err(io_err(format!("writing {}", exp.log_path.display())))?;
    let head = redact(&log.head, &secrets);
    let tail = redact(&log.tail.iter().copied().collect::<Vec<u8>>(), &secrets);
    let write = (|| {
        writeln!(file, "{sandbox_line}")?;
        file.write_all(&head)?;
        if log.omitted() > 0 {
            writeln!(file, "\n[... {} bytes omitted ...]", log.omitted())?;
        }
        file.write_all(&tail)
    })();
    write.map_err(io_err(format!("writing {}", exp.log_path.display())))?;
    // The whole output when nothing was dropped, else the tail.
    let mut tail_bytes = if log.omitted() == 0 { head } else { Vec::new() };
    tail_bytes.extend(tail);
    Ok(ChildRun {
        status,
        timed_out,
        wall,
        tail: String::from_utf8_lossy(&tail_bytes).into_owned(),
        output_bytes: log.total,
        pgid,
    })
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
