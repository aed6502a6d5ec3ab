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

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

// Filesystem rights (landlock.h).
const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const REMOVE_DIR: u64 = 1 << 4;
const REMOVE_FILE: u64 = 1 << 5;
const MAKE_CHAR: u64 = 1 << 6;
const MAKE_DIR: u64 = 1 << 7;
const MAKE_REG: u64 = 1 << 8;
const MAKE_SOCK: u64 = 1 << 9;
const MAKE_FIFO: u64 = 1 << 10;
const MAKE_BLOCK: u64 = 1 << 11;
const MAKE_SYM: u64 = 1 << 12;
const REFER: u64 = 1 << 13; // ABI 2
const TRUNCATE: u64 = 1 << 14; // ABI 3
// Network rights (ABI 4) and scopes (ABI 6).
const BIND_TCP: u64 = 1 << 0;
const CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// A ruleset ready to be applied in the child between fork and exec.
pub struct Sandbox {
    ruleset: OwnedFd,
    pub abi: i64,
}

/// What a rule grants beneath a path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Access {
    /// Read and execute.
    Read,
    /// Everything: read, execute, create, write, remove.
    Write,
}

/// Rights that apply to a file (the rest only make sense on a directory).
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE;

impl Sandbox {
    /// Builds the ruleset; `None` when this kernel has no Landlock. Paths that do not exist are
    /// skipped.
    pub fn new(rules: &[(PathBuf, Access)]) -> Option<Sandbox> {
        // SAFETY: the version query takes no pointers.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        if abi < 1 {
            return None;
        }
        let mut fs = EXECUTE
            | READ_FILE
            | READ_DIR
            | WRITE_FILE
            | REMOVE_DIR
            | REMOVE_FILE
            | MAKE_CHAR
            | MAKE_DIR
            | MAKE_REG
            | MAKE_SOCK
            | MAKE_FIFO
            | MAKE_BLOCK
            | MAKE_SYM;
        if abi >= 2 {
            fs |= REFER;
        }
        if abi >= 3 {
            fs |= TRUNCATE;
        }
        let attr = RulesetAttr {
            handled_access_fs: fs,
            handled_access_net: if abi >= 4 { BIND_TCP | CONNECT_TCP } else { 0 },
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            } else {
                0
            },
        };
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` outlives the call and `size` does not exceed it.
        let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &attr, size, 0u32) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this descriptor to us.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        for (path, access) in rules {
            let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated path; the descriptor is closed below.
            let parent = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if parent < 0 {
                continue;
            }
            let mut allowed = match access {
                Access::Read => EXECUTE | READ_FILE | READ_DIR,
                Access::Write => fs,
            };
            if !path.is_dir() {
                allowed &= FILE_RIGHTS;
            }
            let rule = PathBeneathAttr {
                allowed_access: allowed & fs,
                parent_fd: parent,
            };
            // SAFETY: `rule` outlives the call; both descriptors are valid.
            unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    std::os::fd::AsRawFd::as_raw_fd(&ruleset),
                    RULE_PATH_BENEATH,
                    &rule,
                    0u32,
                );
                libc::close(parent);
            }
        }
        Some(Sandbox { ruleset, abi })
    }

    pub fn raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.ruleset)
    }

    /// In the child, between fork and exec: async-signal-safe syscalls only. The run may read
    /// its own `/proc/PID` (the ruleset grants it here, where the PID is known), never another
    /// process's: their `environ` holds the user's exported keys.
    pub fn restrict_self(fd: RawFd) -> std::io::Result<()> {
        // SAFETY: plain syscalls on a static path, a stack struct and descriptors we own.
        unsafe {
            let own = libc::open(c"/proc/self".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            if own < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rule = PathBeneathAttr {
                allowed_access: READ_FILE | READ_DIR,
                parent_fd: own,
            };
            let added = libc::syscall(
                libc::SYS_landlock_add_rule,
                fd,
                RULE_PATH_BENEATH,
                &rule,
                0u32,
            );
            libc::close(own);
            if added != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    pub fn describe(&self, run_dir: &Path) -> String {
        format!(
            "# sandbox: environment scrubbed to an allowlist; Landlock ABI {}: reads only from the allowlist (not the validation data, not the home directory), writes only under {} and to device files; seccomp: no sockets (TCP, UDP, Unix), no io_uring, no other process's memory",
            self.abi,
            run_dir.display(),
        )
    }
}

/// The system calls a run may not make, each answered EPERM: `socket` of any family (the
/// network, UDP included, and Unix sockets to the session bus, tmux or docker), io_uring (its
/// own path to sockets and files), and reading, writing or tracing another process
/// (`process_vm_*`, `ptrace`, `pidfd_getfd`, which could borrow a socket), and raising its own
/// limits (`setrlimit`, `prlimit64` with a new limit). `socketpair` stays:
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
/// `CUDA_PATH`, `CUDA_ROOT`), the prepared data's training files, `extra` (read), the run dir
/// (write). Refuses when a rule would make a validation file readable.
pub fn rules(
    run_dir: &Path,
    data: &prepare::Dataset,
    extra: &[PathBuf],
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
    rules.extend(extra.iter().map(|p| (p.clone(), Access::Read)));
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
