//! The CLI's surface. (Having an integration test here also makes `cargo test --workspace`
//! build the binary that the end-to-end tests in `tests/` drive.)

use std::process::Command;

#[test]
fn help_names_the_commands_and_prepare_flags() {
    let bin = env!("CARGO_BIN_EXE_autoresearch");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("prepare"));
    let out = Command::new(bin)
        .args(["prepare", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--source",
        "--preset",
        "--num-shards",
        "--download-workers",
        "--cache",
        "--base-url",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
