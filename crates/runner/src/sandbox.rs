//! The run's confinement, without root, in two layers:
//! - Landlock: the run may read only what an allowlist names (system and toolchain paths, the
//!   GPU stack, the prepared data's training files: not the validation files, not the user's
//!   home), write only under its run directory and to a few device files, and (ABI 6+) may not
//!   signal processes or use abstract sockets outside its own domain.
//! - seccomp (`seccompiler`): no socket of any family (TCP, UDP, Unix sockets to programs
//!   outside the run), no io_uring (which would reach the network around those checks), and no
//!   access to another process's memory, on every kernel whatever its Landlock ABI.
//!
//! Fails closed: where the kernel has no Landlock, experiments are refused (`--no-sandbox` runs
//! them unconfined).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access as _, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};

/// The Landlock features asked for: every filesystem right through ABI 5 (device ioctls
/// included), TCP (4), and the signal and abstract-socket scopes (6). An older kernel gets what
/// it has; ABI 1 at least, or no run.
const TARGET: ABI = ABI::V6;

/// A ruleset ready to be applied in the child between fork and exec.
pub struct Sandbox {
    ruleset: RulesetCreated,
    /// The kernel's Landlock ABI, for the log.
    pub abi: i64,
}

/// What a rule grants beneath a path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Access {
    /// Read and execute.
    Read,
    /// Everything: read, execute, create, write, remove, device ioctls.
    Write,
}

/// The kernel's Landlock ABI (0 without Landlock): only to say so in the log, the crate decides
/// what to enforce.
fn kernel_abi() -> i64 {
    // SAFETY: the version query takes no pointers.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    }
}

impl Sandbox {
    /// Builds the ruleset (with the `landlock` crate); `Err(None)` when this kernel has no
    /// Landlock, `Err(Some(why))` when the ruleset cannot be built. Paths that do not exist are
    /// skipped.
    pub fn new(rules: &[(PathBuf, Access)]) -> Result<Sandbox, Option<String>> {
        let abi = kernel_abi();
        if abi < 1 {
            return Err(None);
        }
        let fail = |e: landlock::RulesetError| Some(format!("building the Landlock ruleset: {e}"));
        let all = AccessFs::from_all(TARGET);
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(ABI::V1))
            .map_err(fail)?
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(all)
            .and_then(|r| r.handle_access(AccessNet::from_all(TARGET)))
            .and_then(|r| r.scope(Scope::from_all(TARGET)))
            .and_then(|r| r.create())
            .map_err(fail)?;
        for (path, access) in rules {
            let Ok(fd) = PathFd::new(path) else {
                continue;
            };
            let mut allowed = match access {
                Access::Read => AccessFs::from_read(TARGET),
                Access::Write => all,
            };
            if !path.is_dir() {
                allowed &= AccessFs::from_file(TARGET);
            }
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, allowed))
                .map_err(fail)?;
        }
        Ok(Sandbox { ruleset, abi })
    }

    pub fn into_ruleset(self) -> RulesetCreated {
        self.ruleset
    }

    /// In the child, between fork and exec: no allocation on success. The run may read its own
    /// `/proc/PID` (granted here, where the PID is known), never another process's: their
    /// `environ` holds the user's exported keys. It may also write its threads' files under
    /// `/proc/PID/task`: the NVIDIA driver (570 and later) names the threads it starts through
    /// `task/TID/comm` while it initialises, and fails with CUDA error 304 when refused.
    pub fn restrict_self(ruleset: RulesetCreated) -> std::io::Result<()> {
        let open = |path: &std::ffi::CStr| {
            // SAFETY: a static path; the descriptor is ours.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(OwnedFd::from_raw_fd(fd))
            }
        };
        let own = open(c"/proc/self")?;
        let tasks = open(c"/proc/self/task")?;
        let refused = || std::io::Error::from_raw_os_error(libc::EPERM);
        let status = ruleset
            .add_rule(PathBeneath::new(
                own,
                AccessFs::ReadFile | AccessFs::ReadDir,
            ))
            .and_then(|r| {
                r.add_rule(PathBeneath::new(
                    tasks,
                    AccessFs::ReadFile
                        | AccessFs::ReadDir
                        | AccessFs::WriteFile
                        | AccessFs::Truncate,
                ))
            })
            .and_then(|r| r.restrict_self())
            .map_err(|_| refused())?;
        if status.ruleset == RulesetStatus::NotEnforced || !status.no_new_privs {
            return Err(refused());
        }
        Ok(())
    }

    /// In the child, between fork and exec: the run execs with no capability. Root's exec takes
    /// its permitted set from the bounding set (and the inheritable one), so a harness run as
    /// root (the GPU machines') empties both, and the ambient set: the run cannot load a kernel
    /// module, lower its OOM score (root's write of 1000 set its floor), or override a file's
    /// permissions, whatever Landlock allows. A harness with no capability changes nothing.
    /// Raw `prctl` and `capget`/`capset` (the `caps` crate allocates): no allocation.
    pub fn drop_capabilities() -> std::io::Result<()> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SETPCAP: u32 = 8;
        let error = std::io::Error::last_os_error;
        // SAFETY: plain syscalls on stack structs of the kernel's layout (version 3: two words).
        unsafe {
            // EINVAL before Linux 4.3, which has no ambient set to clear.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            let mut header = Header {
                version: VERSION_3,
                pid: 0,
            };
            let mut data = [Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
                return Err(error());
            }
            // Dropping from the bounding set takes CAP_SETPCAP; without it (not root) the set
            // gives an exec nothing anyway.
            if data[0].effective & (1 << CAP_SETPCAP) != 0 {
                for cap in 0..64 {
                    if libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) == 1
                        && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    {
                        return Err(error());
                    }
                }
            }
            if data.iter().any(|d| d.inheritable != 0) {
                for d in &mut data {
                    d.inheritable = 0;
                }
                if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
                    return Err(error());
                }
            }
        }
        Ok(())
    }

    pub fn describe(&self, run_dir: &Path, jit_cache: Option<&(PathBuf, Access)>) -> String {
        format!(
            "# sandbox: environment scrubbed to an allowlist; Landlock ABI {}: reads only from the allowlist (not the validation data, not the home directory), writes only under {} and to device files; the CUDA JIT cache {}; seccomp: no sockets (TCP, UDP, Unix), no io_uring, no other process's memory, no signal to the supervisor or the harness, no raised limits; no capabilities",
            self.abi,
            run_dir.display(),
            match jit_cache {
                Some((dir, Access::Write)) =>
                    format!("{} written (the baseline's runs only)", dir.display()),
                Some((dir, Access::Read)) => format!("{} read only", dir.display()),
                None => "none".to_string(),
            },
        )
    }
}

/// The system calls a run may not make, each answered EPERM: `socket` of any family (the
/// network, UDP included, and Unix sockets to the session bus, tmux or docker), io_uring (its
/// own path to sockets and files), and reading, writing or tracing another process
/// (`process_vm_*`, `ptrace`, `pidfd_getfd`, which could borrow a socket), and raising its own
/// limits (`setrlimit`, `prlimit64` with a new limit), and signalling the supervisor, the harness
/// or every process at once. `socketpair` stays:
/// it reaches nothing outside the run. Compiled before the fork; installing it allocates
/// nothing.
pub fn syscall_filter() -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let denied = [
        libc::SYS_socket,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_ptrace,
        libc::SYS_pidfd_getfd,
        // The run's limits stay where the harness set them (root could raise them).
        libc::SYS_setrlimit,
    ];
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        denied.iter().map(|&n| (n, Vec::new())).collect();
    // prlimit64 only when it sets a limit: its third argument, the new limit, is null to read.
    let setting = SeccompCondition::new(2, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, 0)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| format!("building the seccomp filter: {e}"))?;
    rules.insert(libc::SYS_prlimit64, vec![setting]);
    // No signal to the supervisor or the harness, nor to every process at once (Landlock's
    // signal scope does this from ABI 6; before it, this filter does). The supervisor's pid is
    // known only after the fork: `aim_at_supervisor` writes it over SUPERVISOR.
    let harness = std::process::id() as i32;
    // SAFETY: a plain syscall.
    let group = unsafe { libc::getpgrp() };
    let pid_is = |value: i32| {
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            value as u32 as u64,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| format!("building the seccomp filter: {e}"))
    };
    let processes = [SUPERVISOR, harness];
    let mut kill_targets: Vec<i32> = vec![-1, -SUPERVISOR, -group];
    kill_targets.extend(processes);
    rules.insert(
        libc::SYS_kill,
        kill_targets
            .into_iter()
            .map(pid_is)
            .collect::<Result<_, _>>()?,
    );
    for call in [
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_pidfd_open,
    ] {
        rules.insert(
            call,
            processes
                .into_iter()
                .map(pid_is)
                .collect::<Result<_, _>>()?,
        );
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| format!("no seccomp filter for {}", std::env::consts::ARCH))?;
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("building the seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("compiling the seccomp filter: {e}"))
}

/// Stands for the supervisor's pid in the filter until `aim_at_supervisor`: above any pid.
const SUPERVISOR: i32 = 0x7fff_fff0;

/// In the train process, before the filter is applied: the supervisor's pid in place of
/// `SUPERVISOR` (and of its negation, its process group). No allocation.
pub fn aim_at_supervisor(filter: &mut seccompiler::BpfProgram, supervisor: libc::pid_t) {
    for insn in filter.iter_mut() {
        if insn.k == SUPERVISOR as u32 {
            insn.k = supervisor as u32;
        } else if insn.k == (-SUPERVISOR) as u32 {
            insn.k = (-supervisor) as u32;
        }
    }
}

/// System paths a run reads: libraries, the loader's configuration, `/sys` (CPU counts, the
/// GPU driver's files), `/dev`, and of `/proc` only the machine-wide files (CPU, memory, kernel
/// settings, the NVIDIA driver's) and the run's own `/proc/PID` (granted at exec). Not `/home`,
/// `/root`, `/tmp`, `/var`, `/run`, or other processes' `/proc` entries.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/sys",
    "/dev",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/sys",
    "/proc/driver",
    "/proc/devices",
    "/proc/filesystems",
];

/// Device files a run may write to: the usual character devices and the NVIDIA driver's nodes.
/// Not `/dev/shm`, which outlives the run.
fn writable_devices() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = ["null", "zero", "full", "random", "urandom"]
        .iter()
        .map(|d| Path::new("/dev").join(d))
        .collect();
    if let Ok(entries) = std::fs::read_dir("/dev") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("nvidia") {
                out.push(entry.path());
            }
        }
    }
    out
}

/// The rules for one run: the system, the GPU stack (`LD_LIBRARY_PATH`, `CUDA_HOME`,
/// `CUDA_PATH`, `CUDA_ROOT`), the prepared data's training files, `extra`, the run dir
/// (write). Refuses when a rule would make a validation file readable.
pub fn rules(
    run_dir: &Path,
    data: &prepare::Dataset,
    extra: &[(PathBuf, Access)],
) -> Result<Vec<(PathBuf, Access)>, String> {
    let mut rules: Vec<(PathBuf, Access)> = SYSTEM_READ
        .iter()
        .map(|p| (PathBuf::from(p), Access::Read))
        .collect();
    for var in ["LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(value) = std::env::var_os(var) {
            for dir in std::env::split_paths(&value).filter(|d| d.is_absolute()) {
                rules.push((dir, Access::Read));
            }
        }
    }
    rules.extend(extra.iter().cloned());
    let cache = &data.cache;
    let m = &data.manifest;
    rules.push((cache.join(prepare::manifest::MANIFEST_FILE), Access::Read));
    rules.push((cache.join(&m.tokenizer.token_bytes_file), Access::Read));
    rules.push((cache.join(&m.tokenizer.file), Access::Read));
    for shard in data.shard_paths(prepare::Split::Train) {
        rules.push((shard, Access::Read));
    }
    rules.extend(writable_devices().into_iter().map(|d| (d, Access::Write)));
    rules.push((run_dir.to_path_buf(), Access::Write));

    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let secret: Vec<PathBuf> = data.shard_paths(prepare::Split::Val);
    for hidden in secret.iter().filter(|p| p.exists()).map(|p| canonical(p)) {
        for (path, _) in &rules {
            let granted = canonical(path);
            if hidden.starts_with(&granted) {
                return Err(format!(
                    "the validation data {} would be readable by the run through {}: keep the cache (--cache) outside the paths runs may read",
                    hidden.display(),
                    granted.display()
                ));
            }
        }
    }
    Ok(rules)
}
