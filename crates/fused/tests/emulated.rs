//! The CUDA kernels run on the CPU: `emulator/cuda_emulator.h` runs a kernel file compiled as
//! C++ with a thread per GPU thread (shuffles, barriers, and mma.sync in the PTX ISA's fragment
//! layouts), and each driver checks its kernels against a reference in double precision. This
//! is how CI tests kernels that no GPU has run yet: the flash attention kernels, the heads, the
//! embedding's chunked backward, the residual mix and the gated value heads.
//! Each launch gets the shared memory its launcher gives (`fused::launch`); the drivers are built
//! with AddressSanitizer, so a kernel that reads or writes past that, or past a tensor, stops the
//! test where the card would fault; a block that some thread never lets finish (a barrier or
//! shuffle not every thread reaches) stops it too, with the block named.
//! Needs a C++20 compiler (`CXX`, else `c++`) with AddressSanitizer and UBSan (gcc's libasan and
//! libubsan, or clang).

use std::path::{Path, PathBuf};
use std::process::Command;

use fused::launch;

/// Builds `emulator/{driver}.cpp` (with `defines`, `-D` arguments) and returns the binary.
fn build_driver(driver: &str, defines: &[&str]) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = here.join(format!("tests/emulator/{driver}.cpp"));
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{driver}-emulated"));
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&compiler)
        // The kernels read bf16 pairs through 32- and 128-bit words, as CUDA allows.
        .args([
            "-std=c++20",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-strict-aliasing",
            "-pthread",
            "-I",
        ])
        .arg(here.join("tests/emulator"))
        .args(defines)
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| {
            panic!("{compiler} could not start ({e}): install a C++20 compiler or set CXX")
        });
    assert!(
        built.status.success(),
        "{compiler} failed on {} (it needs C++20 and AddressSanitizer: install g++ with \
         libasan, or set CXX=clang++):\n{}",
        source.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    binary
}

/// Builds `emulator/{driver}.cpp`, runs it with each kernel's shared memory as its launcher gives
/// it (`SHARED_<kernel>`), and returns its report (a line per case).
fn run_driver(driver: &str, shared: &[(String, usize)]) -> String {
    let binary = build_driver(driver, &[]);
    let run = Command::new(&binary)
        .envs(
            shared
                .iter()
                .map(|(kernel, bytes)| (format!("SHARED_{kernel}"), bytes.to_string())),
        )
        // Leak checks need ptrace, which containers often deny; a leak is not a fault on the card.
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .unwrap();
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
fn a_block_that_never_reaches_its_barrier_stops_the_emulator_with_its_name() {
    // Its second warp returns before the barrier its first waits at: a hang without the
    // emulator's limit (here 2 s).
    let binary = build_driver("hung_block", &["-DEMULATOR_BLOCK_SECONDS=2"]);
    let run = Command::new(&binary)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("block (0, 0, 0): 32 of 64 threads finished in 2 s"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&run.stdout).is_empty());
}

#[test]
fn flash_attention_kernels_match_exact_attention_on_an_emulated_gpu() {
    let shared: Vec<(String, usize)> = [64, 128]
        .into_iter()
        .flat_map(|hd| {
            [
                (format!("flash_forward_{hd}"), launch::flash_forward(hd)),
                (
                    format!("flash_backward_kv_{hd}"),
                    launch::flash_backward_kv(hd),
                ),
                (
                    format!("flash_backward_q_{hd}"),
                    launch::flash_backward_q(hd),
                ),
            ]
        })
        .collect();
    let report = run_driver("flash_attention", &shared);
    assert_eq!(report.lines().count(), 7, "one line per case:\n{report}");
}

#[test]
fn heads_kernels_match_the_reference_and_its_finite_differences_on_an_emulated_gpu() {
    let report = run_driver("heads", &[]);
    assert_eq!(report.lines().count(), 4, "one line per case:\n{report}");
}

#[test]
fn embedding_gathers_rows_and_its_backward_sums_them_on_an_emulated_gpu() {
    let shared = [(
        "embedding_grad_chunk".to_string(),
        launch::EMBEDDING_GRAD_CHUNK,
    )];
    let report = run_driver("embedding", &shared);
    assert_eq!(report.lines().count(), 9, "one line per case:\n{report}");
}

#[test]
fn mix_kernels_match_the_residual_mix_and_its_sums_on_an_emulated_gpu() {
    let shared = [("mix_backward".to_string(), launch::MIX_BACKWARD)];
    let report = run_driver("mix", &shared);
    assert_eq!(report.lines().count(), 5, "one line per case:\n{report}");
}

#[test]
fn gate_heads_kernels_match_the_gated_value_term_on_an_emulated_gpu() {
    let report = run_driver("gate_heads", &[]);
    assert_eq!(report.lines().count(), 4, "one line per case:\n{report}");
}

#[test]
fn cross_entropy_kernels_match_the_soft_capped_loss_on_an_emulated_gpu() {
    let shared = [(
        "softcap_ce_forward".to_string(),
        launch::CROSS_ENTROPY_FORWARD,
    )];
    let report = run_driver("cross_entropy", &shared);
    assert_eq!(report.lines().count(), 4, "one line per case:\n{report}");
}

#[test]
fn rms_norm_kernels_match_the_norm_and_its_gradient_on_an_emulated_gpu() {
    let report = run_driver("rms_norm", &[]);
    assert_eq!(report.lines().count(), 5, "one line per case:\n{report}");
}

#[test]
fn relu_squared_kernels_match_on_an_emulated_gpu() {
    let report = run_driver("relu_squared", &[]);
    assert_eq!(report.lines().count(), 4, "one line per case:\n{report}");
}
