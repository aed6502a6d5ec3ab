//! `cargo build --release -p train` into the experiments' own target directory, with compile
//! errors returned as structured diagnostics (warnings left out).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{Device, RunnerError, io_err};

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Diagnostic {
    /// Relative to the repository, as cargo reports it.
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// rustc's own rendering, with the source excerpt.
    pub rendered: String,
}

pub enum BuildOutput {
    Built(PathBuf),
    Failed(Vec<Diagnostic>),
}

/// Environment variables that never reach a build or a run: credentials of any kind.
pub(crate) fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_uppercase();
    [
        "KEY",
        "TOKEN",
        "SECRET",
        "PASSWORD",
        "PASSWD",
        "CREDENTIAL",
        "AUTH",
    ]
    .iter()
    .any(|s| k.contains(s))
        || k.ends_with("_PROXY")
}

/// Makes cargo's view of the checkout's sources match what `target_dir` holds.
///
/// Cargo judges freshness by modification time, and its paths for packages under the
/// workspace root are relative to it, so two checkouts sharing a target dir look alike: an
/// older file in a second checkout would pass for built, and a fresh checkout's new files would
/// pass for edited. The train file is always touched (its crate rebuilds in about a second).
/// The train crate's other sources and its path dependencies (`prepare`, `crates/fused`, the
/// patched candle-core in `vendor`, the manifests) are touched when their content differs from
/// the last build's, whichever checkout that was; when it is the same, any of them newer than
/// that build are set back to its time, so a fresh checkout (a new worker's, a test's copy)
/// does not rebuild candle-core and everything above it.
fn mark_sources_newer(repo: &Path, target_dir: &Path) -> Result<(), RunnerError> {
    let marker = target_dir.join("last-sources");
    let train_file = repo.join(crate::TRAIN_FILE);
    let mut shared = Vec::new();
    let mut stack: Vec<PathBuf> = ["prepare", "train", "crates/fused", "vendor"]
        .iter()
        .map(|d| repo.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.map_err(io_err("listing sources"))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path != train_file {
                shared.push(path);
            }
        }
    }
    shared.extend(["Cargo.toml", "Cargo.lock"].map(|f| repo.join(f)));
    shared.sort();
    let mut digest = Sha256::new();
    for file in &shared {
        digest.update(
            file.strip_prefix(repo)
                .unwrap_or(file)
                .as_os_str()
                .as_encoded_bytes(),
        );
        digest.update([0]);
        digest.update(std::fs::read(file).unwrap_or_default());
        digest.update([0]);
    }
    let digest = format!("{:x}", digest.finalize());
    let now = std::time::SystemTime::now();
    let set_time = |file: &Path, time| -> Result<(), RunnerError> {
        if let Ok(f) = std::fs::File::options().append(true).open(file) {
            f.set_modified(time)
                .map_err(io_err(format!("touching {}", file.display())))?;
        }
        Ok(())
    };
    set_time(&train_file, now)?;
    let built = std::fs::read_to_string(&marker)
        .ok()
        .filter(|last| *last == digest)
        .and_then(|_| std::fs::metadata(&marker).and_then(|m| m.modified()).ok());
    match built {
        // The marker's time is when the build of these very sources began: older than
        // everything that build wrote.
        Some(built) => {
            for file in &shared {
                let modified = std::fs::metadata(file).and_then(|m| m.modified()).ok();
                if modified.is_some_and(|m| m > built) {
                    set_time(file, built)?;
                }
            }
            Ok(())
        }
        None => {
            for file in &shared {
                set_time(file, now)?;
            }
            std::fs::create_dir_all(target_dir).map_err(io_err("creating the target dir"))?;
            std::fs::write(&marker, digest.as_bytes()).map_err(io_err("writing the sources marker"))
        }
    }
}

/// Builds `train/`. `timeout` bounds the time since cargo last finished a dependency: the train
/// crate's own compile (a const evaluation or a type that never ends stalls it for ever), never
/// a cold build of candle, whose crates each report as they finish.
pub fn build_train(
    repo: &Path,
    target_dir: &Path,
    device: Device,
    timeout: Duration,
) -> Result<BuildOutput, RunnerError> {
    mark_sources_newer(repo, target_dir)?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "build",
        "--release",
        "--locked",
        "-p",
        "train",
        "--message-format=json",
    ]);
    if device == Device::Cuda {
        cmd.args(["--features", "cuda"]);
        if which("nvcc").is_none() {
            return Err(RunnerError::NoCuda);
        }
    }
    for (key, _) in std::env::vars_os() {
        if is_secret(&key.to_string_lossy()) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_dir)
        .current_dir(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that a timeout kills rustc with it.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RunnerError::NoCargo,
        _ => io_err("starting cargo")(e),
    })?;
    // cargo's own messages (Compiling…, and why it failed when rustc never ran).
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text += &line;
            text.push('\n');
        }
        text
    });
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut diagnostics = Vec::new();
    let mut executable = None;
    let mut progress = Instant::now();
    loop {
        let line = match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if crate::interrupted() || progress.elapsed() >= timeout {
                    // SAFETY: plain syscall; a negative pid names cargo's process group.
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    let _ = child.wait();
                    if crate::interrupted() {
                        return Err(RunnerError::Interrupted);
                    }
                    let message = format!(
                        "the build did not finish within {:.0}s of its last dependency (a constant evaluation, a recursion or a type that never ends?): stopped",
                        timeout.as_secs_f64()
                    );
                    return Ok(BuildOutput::Failed(vec![Diagnostic {
                        file: crate::TRAIN_FILE.into(),
                        line: 0,
                        column: 0,
                        rendered: format!("error: {message}"),
                        message,
                    }]));
                }
                continue;
            }
        };
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-message") => {
                if let Some(d) = diagnostic(&msg["message"]) {
                    diagnostics.push(d);
                }
            }
            Some("compiler-artifact") if msg["target"]["name"] == "train" => {
                if let Some(exe) = msg["executable"].as_str() {
                    executable = Some(PathBuf::from(exe));
                }
            }
            Some("compiler-artifact") | Some("build-script-executed") => progress = Instant::now(),
            _ => {}
        }
    }
    let status = child.wait().map_err(io_err("waiting for cargo"))?;
    let cargo_stderr = stderr.join().unwrap_or_default();
    match (status.success(), executable) {
        (true, Some(exe)) => Ok(BuildOutput::Built(exe)),
        _ if !diagnostics.is_empty() => Ok(BuildOutput::Failed(diagnostics)),
        _ => {
            // No rustc error to show: cargo failed on its own (lock file, registry, toolchain).
            let tail: Vec<&str> = cargo_stderr.lines().rev().take(20).collect();
            let text = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            Ok(BuildOutput::Failed(vec![Diagnostic {
                file: String::new(),
                line: 0,
                column: 0,
                message: "cargo build failed".into(),
                rendered: text,
            }]))
        }
    }
}

/// An error-level rustc diagnostic with its primary span.
fn diagnostic(message: &serde_json::Value) -> Option<Diagnostic> {
    if message["level"] != "error" {
        return None;
    }
    let spans = message["spans"].as_array()?;
    let span = spans
        .iter()
        .find(|s| s["is_primary"] == true)
        .or(spans.first())?;
    Some(Diagnostic {
        file: span["file_name"].as_str()?.to_string(),
        line: span["line_start"].as_u64()? as usize,
        column: span["column_start"].as_u64().unwrap_or(0) as usize,
        message: message["message"].as_str()?.to_string(),
        rendered: message["rendered"].as_str().unwrap_or_default().to_string(),
    })
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
