//! `AUTORESEARCH_SELF_CHECKS=in-process` (the harness sets it on sandboxed runs): no child is
//! started, every kernel is left to the caller's own process. A test binary of its own: the
//! variable is the process's.

use std::time::Duration;

use candle_core::Device;
use fused::Kernel;
use fused::isolated::in_children;

#[test]
fn in_process_self_checks_start_no_child() {
    // SAFETY: the only test in this binary; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("AUTORESEARCH_SELF_CHECKS", "in-process") };
    let outcomes = in_children(&Kernel::ALL, &Device::Cpu, Duration::from_secs(60), None);
    assert!(outcomes.is_empty(), "{outcomes:?}");
}
