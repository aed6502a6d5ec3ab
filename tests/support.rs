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
