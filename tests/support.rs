//! Helpers for end-to-end tests: find the real `autoresearch` binary and run it in a sandboxed
//! home and cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>/autoresearch`, built by `cargo test --workspace` (the binary's own
/// integration tests make cargo build it).
pub fn autoresearch_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(format!("autoresearch{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or `cargo build -p autoresearch` first",
        bin.display()
    );
    bin
}

/// Runs `autoresearch args…` with HOME and the cache inside `root`, and no inherited
/// `AUTORESEARCH_*` settings.
pub fn run(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(autoresearch_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTORESEARCH_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("HOME", root)
        .env("AUTORESEARCH_CACHE", root.join("cache"))
        .env("NO_COLOR", "1")
        .current_dir(root)
        .args(args)
        .output()
        .expect("autoresearch runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The workspace root (this crate lives in `tests/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .current_dir(repo)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh git repository holding the project as it is in this checkout (committed or not),
/// in one commit: the scenario a user starts a session from.
pub fn project_copy(dest: &Path) {
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(workspace())
        .output()
        .expect("git ls-files");
    for name in listed.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let from = workspace().join(&name);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let to = dest.join(&name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    git(dest, &["init", "-q", "-b", "main"]);
    git(dest, &["add", "-A"]);
    git(dest, &["commit", "-q", "-m", "project"]);
}
