//! The CUDA kernels run on the CPU: `emulator/cuda_emulator.h` runs a kernel file compiled as
//! C++ with a thread per GPU thread (shuffles, barriers, and mma.sync in the PTX ISA's fragment
//! layouts), and each driver checks its kernels against a reference in double precision. This
//! is how CI tests kernels that no GPU has run yet: the flash attention kernels, the heads, and
//! the embedding's chunked backward.
//! Needs a C++20 compiler (`CXX`, else `c++`).

use std::path::Path;
use std::process::Command;

/// Builds `emulator/{driver}.cpp`, runs it, and returns its report (a line per case).
fn run_driver(driver: &str) -> String {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = here.join(format!("tests/emulator/{driver}.cpp"));
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{driver}-emulated"));
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&compiler)
        // The kernels read bf16 pairs through 32- and 128-bit words, as CUDA allows.
        .args([
            "-std=c++20",
            "-O2",
            "-fno-strict-aliasing",
            "-pthread",
            "-I",
        ])
        .arg(here.join("tests/emulator"))
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| {
            panic!("{compiler} could not start ({e}): install a C++20 compiler or set CXX")
        });
    assert!(
        built.status.success(),
        "{compiler} failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&binary).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{report}");
    assert!(
        run.status.success(),
        "{driver}: the kernels disagree with the reference:\n{report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    report
}

#[test]
fn flash_attention_kernels_match_exact_attention_on_an_emulated_gpu() {
    let report = run_driver("flash_attention");
    assert_eq!(report.lines().count(), 5, "one line per case:\n{report}");
}

#[test]
fn heads_kernels_match_the_reference_and_its_finite_differences_on_an_emulated_gpu() {
    let report = run_driver("heads");
    assert_eq!(report.lines().count(), 4, "one line per case:\n{report}");
}

#[test]
fn embedding_backward_matches_the_sum_of_its_rows_on_an_emulated_gpu() {
    let report = run_driver("embedding");
    assert_eq!(report.lines().count(), 4, "one line per case:\n{report}");
}
