//! The self-checks in child processes, on the CPU: each child is this test binary started again
//! and caught before `main`, running the kernels' real checks (the CPU's fused ops against their
//! plain paths); injected faults stand in for a kernel that crashes, hangs or fails on a card.

use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::Device;
use fused::Kernel;
use fused::isolated::{Outcome, in_children};

const PLENTY: Duration = Duration::from_secs(300);

#[test]
fn every_kernel_is_checked_in_a_child_and_the_attention_kernels_fail_off_cuda() {
    let outcomes = in_children(&Kernel::ALL, &Device::Cpu, PLENTY, None);
    assert_eq!(outcomes.len(), Kernel::ALL.len(), "{outcomes:?}");
    for (kernel, outcome) in &outcomes {
        match kernel {
            // Its failure stops the child; the kernels after it are checked by the next one.
            Kernel::Attention | Kernel::CudnnAttention => assert!(
                matches!(outcome, Outcome::Failed(why) if why.contains("CUDA only")),
                "{kernel:?}: {outcome:?}"
            ),
            _ => assert_eq!(outcome, &Outcome::Passed, "{kernel:?}"),
        }
    }
}

#[test]
fn a_check_that_crashes_its_process_fails_its_kernel_alone() {
    let kernels = [Kernel::CrossEntropy, Kernel::RmsNorm, Kernel::ReluSquared];
    let outcomes = in_children(&kernels, &Device::Cpu, PLENTY, Some("RmsNorm:abort"));
    assert_eq!(outcomes[&Kernel::CrossEntropy], Outcome::Passed);
    assert_eq!(outcomes[&Kernel::ReluSquared], Outcome::Passed);
    match &outcomes[&Kernel::RmsNorm] {
        Outcome::Failed(why) => assert!(
            why.contains("ended the checking process") && why.contains("SIGABRT"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_check_that_hangs_is_stopped_at_its_timeout_and_the_rest_go_on() {
    let kernels = [Kernel::Rotary, Kernel::ReluSquared, Kernel::CausalSoftmax];
    let timeout = Duration::from_secs(3);
    let started = Instant::now();
    let outcomes = in_children(&kernels, &Device::Cpu, timeout, Some("ReluSquared:hang"));
    assert_eq!(outcomes[&Kernel::Rotary], Outcome::Passed);
    assert_eq!(outcomes[&Kernel::CausalSoftmax], Outcome::Passed);
    assert_eq!(
        outcomes[&Kernel::ReluSquared],
        Outcome::Failed("its check did not finish within 3s: stopped".into())
    );
    assert!(started.elapsed() >= timeout);
}

#[test]
fn a_failed_check_keeps_its_message_and_out_of_memory_decides_nothing() {
    let kernels = [Kernel::Mix, Kernel::GateHeads, Kernel::Heads];
    let outcomes = in_children(&kernels, &Device::Cpu, PLENTY, Some("Mix:fail"));
    assert_eq!(
        outcomes[&Kernel::Mix],
        Outcome::Failed("injected failure".into())
    );
    assert_eq!(outcomes[&Kernel::GateHeads], Outcome::Passed);
    assert_eq!(outcomes[&Kernel::Heads], Outcome::Passed);

    let outcomes = in_children(&kernels, &Device::Cpu, PLENTY, Some("GateHeads:oom"));
    assert_eq!(outcomes[&Kernel::GateHeads], Outcome::Undecided);
    assert_eq!(outcomes[&Kernel::Mix], Outcome::Passed);
    assert_eq!(outcomes[&Kernel::Heads], Outcome::Passed);
}

#[test]
fn the_kernels_list_follows_their_indices() {
    for (i, kernel) in Kernel::ALL.iter().enumerate() {
        assert_eq!(*kernel as usize, i);
    }
}

#[test]
fn a_child_that_cannot_use_the_device_decides_nothing() {
    let kernels = [Kernel::RmsNorm, Kernel::ReluSquared];
    let outcomes = in_children(&kernels, &Device::Cpu, PLENTY, Some("Device:fail"));
    assert!(outcomes.is_empty(), "{outcomes:?}");
}

/// This test binary started as a checking process, as the harness starts a train binary.
fn checking_process(request: &str, fault: &str) -> (String, std::process::ExitStatus) {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("AUTORESEARCH_FUSED_SELF_CHECK", request)
        .env("AUTORESEARCH_FUSED_CHECK_FAULT", fault)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

#[test]
fn the_harness_form_checks_every_kernel_from_the_one_it_names() {
    let (stdout, status) = checking_process("cpu from:8", "");
    assert!(
        stdout.starts_with(
            "check 8\npass 8\ncheck 9\npass 9\ncheck 10\nfail 10 cuDNN's attention runs on CUDA only"
        ),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
    // Stopped at its last kernel: nothing is left for another process.
    assert!(status.success(), "{status}");
    let (stdout, status) = checking_process("cpu from:11", "");
    assert_eq!(stdout, "");
    assert!(status.success(), "{status}");
}

#[test]
fn a_check_that_hangs_ends_its_own_process_for_a_parent_without_a_clock_per_check() {
    use std::os::unix::process::ExitStatusExt;
    let started = Instant::now();
    let (stdout, status) = checking_process("cpu 4,5,6", "ReluSquared:hang");
    assert_eq!(
        stdout,
        "check 4\npass 4\ncheck 5\nfail 5 its check did not finish within 20s: stopped\n"
    );
    assert_eq!(status.signal(), Some(6), "{status}");
    assert!(started.elapsed() >= Duration::from_secs(20));
}
