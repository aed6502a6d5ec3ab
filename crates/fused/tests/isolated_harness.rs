//! What the harness sets on sandboxed runs, where a child of the run cannot open the GPU:
//! `AUTORESEARCH_SELF_CHECKS=in-process` (no child; every kernel is left to the run's own
//! process) or `checked` and its own checking processes' verdicts. A test binary of its own: the
//! variable is the process's.

use std::time::Duration;

use candle_core::Device;
use fused::Kernel;
use fused::isolated::{Outcome, in_children};

#[test]
fn the_harness_says_where_the_checks_run_or_what_they_decided() {
    let set = |value: &str| {
        // SAFETY: the only test in this binary; nothing else reads the environment meanwhile.
        unsafe { std::env::set_var("AUTORESEARCH_SELF_CHECKS", value) };
    };
    set("in-process");
    let outcomes = in_children(&Kernel::ALL, &Device::Cpu, Duration::from_secs(60), None);
    assert!(outcomes.is_empty(), "{outcomes:?}");

    // The harness's verdicts, taken as they are (these are not what the CPU's checks decide):
    // no child starts, and a kernel it did not decide is left to the caller.
    set(
        "checked\npass 0\nfail 3 its check ended the checking process (killed by signal 6)\nundecided 5 CUDA_ERROR_OUT_OF_MEMORY\nfail 7 CUDA only",
    );
    let asked = [
        Kernel::CrossEntropy,
        Kernel::RmsNorm,
        Kernel::ReluSquared,
        Kernel::Heads,
    ];
    let outcomes = in_children(&asked, &Device::Cpu, Duration::from_secs(60), None);
    assert_eq!(
        outcomes.into_iter().collect::<Vec<_>>(),
        [
            (Kernel::CrossEntropy, Outcome::Passed),
            (
                Kernel::RmsNorm,
                Outcome::Failed("its check ended the checking process (killed by signal 6)".into())
            ),
            (Kernel::ReluSquared, Outcome::Undecided),
        ]
    );

    // The harness's time ran out at the ninth kernel: it and those after it take the plain
    // path (cuDNN's attention: the flash kernels'), unchecked.
    set(
        "checked\npass 7\nfail 8 the self-checks' time ran out: stopped\nunchecked 9 the self-checks' 90s were spent",
    );
    let outcomes = in_children(&Kernel::ALL, &Device::Cpu, Duration::from_secs(60), None);
    assert_eq!(
        outcomes.into_iter().collect::<Vec<_>>(),
        [
            (Kernel::Attention, Outcome::Passed),
            (
                Kernel::Mix,
                Outcome::Failed("the self-checks' time ran out: stopped".into())
            ),
            (
                Kernel::GateHeads,
                Outcome::Failed("the self-checks' 90s were spent".into())
            ),
            (
                Kernel::CudnnAttention,
                Outcome::Failed("the self-checks' 90s were spent".into())
            ),
        ]
    );
}
