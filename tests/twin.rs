//! The PyTorch twin (`bench/torch_twin.py`) against the real train binary: it agrees step by
//! step on the same data and seed, and the check catches a twin that is subtly wrong.
//!
//! Needs a Python with torch: `AUTORESEARCH_TWIN_PYTHON` (default `python3`). Without one the
//! test says so and passes, unless `AUTORESEARCH_TWIN_REQUIRED=1` (CI sets both).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use autoresearch_tests::{autoresearch_bin, project, workspace};

fn torch_python() -> Option<String> {
    let python = std::env::var("AUTORESEARCH_TWIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_torch {
        return Some(python);
    }
    let why = format!("`{python}` cannot import torch and numpy");
    assert!(
        std::env::var_os("AUTORESEARCH_TWIN_REQUIRED").is_none(),
        "{why}: install them (`pip install torch numpy`) or point AUTORESEARCH_TWIN_PYTHON at a Python that has them"
    );
    eprintln!("skipped: {why} (set AUTORESEARCH_TWIN_PYTHON to run this test)");
    None
}

/// The train binary `cargo test --workspace` built from this checkout (dev profile, optimised).
/// Not the runner tests' shared target dir: the loop tests build edited train files there, and
/// cargo, which judges freshness by mtime, may take their binary for this checkout's.
fn train_binary() -> PathBuf {
    let bin = autoresearch_bin().with_file_name(format!("train{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let built = modified(&bin).unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo test --workspace`, or `cargo build -p train` first",
            bin.display()
        )
    });
    for source in ["train/src/main.rs", "crates/fused/src/lib.rs"] {
        let source = workspace().join(source);
        assert!(
            modified(&source).is_some_and(|m| m <= built),
            "{} is newer than {}: run `cargo build -p train` (or `cargo test --workspace`)",
            source.display(),
            bin.display()
        );
    }
    bin
}

fn check(
    python: &str,
    train: &Path,
    cache: &Path,
    out_dir: &Path,
    softcap: Option<&str>,
) -> Output {
    let mut cmd = Command::new(python);
    cmd.arg(workspace().join("bench/side_by_side.py"))
        .args(["check", "--device", "cpu", "--train"])
        .arg(train)
        .arg("--out")
        .arg(out_dir)
        .env("AUTORESEARCH_CACHE", cache)
        .env_remove("TWIN_PERTURB_SOFTCAP");
    if let Some(value) = softcap {
        cmd.env("TWIN_PERTURB_SOFTCAP", value);
    }
    cmd.output().expect("the side-by-side script runs")
}

fn max_relative_difference(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("max relative difference"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn the_torch_twin_agrees_with_ours_step_by_step_and_a_wrong_twin_is_caught() {
    let Some(python) = torch_python() else {
        return;
    };
    let p = project();
    let train = train_binary();
    let logs = tempfile::tempdir().unwrap();

    let out = check(&python, &train, &p.cache, &logs.path().join("same"), None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("the twin agrees with ours"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both in f32 on the CPU: the 11 warm-up steps agree to the printed precision.
    let same = max_relative_difference(&stdout);
    assert!(same < 1e-4, "{stdout}");
    // Both evaluated the same validation rows (the twin checks the manifest's digest) and
    // wrote the same kind of report.
    for side in ["ours", "twin"] {
        let log = std::fs::read_to_string(logs.path().join(format!("same/{side}.log"))).unwrap();
        assert!(log.contains("val_bpb:"), "{side}: {log}");
    }

    // A twin with the soft-cap at 30 instead of 15 starts identically (the logits are tiny at
    // step 0) and drifts from step 1: the check must say it is no twin.
    let out = check(
        &python,
        &train,
        &p.cache,
        &logs.path().join("wrong"),
        Some("30"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no twin"),
        "{stdout}"
    );
    assert!(
        max_relative_difference(&stdout) > 100.0 * same.max(1e-7),
        "{stdout}"
    );
}
