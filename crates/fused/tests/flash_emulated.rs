//! The CUDA flash attention kernels, run on the CPU: `emulator/flash_attention.cpp` compiles
//! `kernels/flash_attention.cu` as C++ with a thread per GPU thread and the PTX ISA's fragment
//! layouts for mma.sync, and checks forward and backward against attention in double precision
//! (several head sizes, windows and shapes). Needs a C++20 compiler (`CXX`, else `c++`).

use std::path::Path;
use std::process::Command;

#[test]
fn flash_attention_kernels_match_exact_attention_on_an_emulated_gpu() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = here.join("tests/emulator/flash_attention.cpp");
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flash_attention_emulated");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&compiler)
        // The kernel reads bf16 pairs through 32- and 128-bit words, as CUDA allows.
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
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(
        run.status.success(),
        "the kernels disagree with exact attention:\n{report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(report.lines().count(), 5, "one line per case:\n{report}");
}
