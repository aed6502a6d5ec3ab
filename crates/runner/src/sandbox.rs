//! Landlock: the run may read only what an allowlist names (system and toolchain paths, the GPU
//! stack, the prepared data's training files: not the validation files, not the user's home),
//! write only under its run directory and to a few device files, may not open TCP connections or
//! listen, and (ABI 6+) may not signal processes or use abstract sockets outside its own domain.
//! Without root; where the kernel lacks Landlock the run goes on unconfined and the log says so.

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

    /// In the child, between fork and exec: async-signal-safe syscalls only.
    pub fn restrict_self(fd: RawFd) -> std::io::Result<()> {
        // SAFETY: plain syscalls with integer arguments.
        unsafe {
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
            "# sandbox: environment scrubbed to an allowlist; Landlock ABI {}: reads only from the allowlist (not the validation data, not the home directory), writes only under {} and to device files{}",
            self.abi,
            run_dir.display(),
            if self.abi >= 4 {
                "; TCP connect and bind denied"
            } else {
                "; network not restricted (Landlock ABI < 4)"
            }
        )
    }
}

/// System paths a run reads: libraries, the loader's configuration, `/proc` and `/sys` (CPU
/// counts, the GPU driver's files), `/dev`. Not `/home`, `/root`, `/tmp`, `/var` or `/run`.
const SYSTEM_READ: &[&str] = &[
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/opt", "/proc",
    "/sys", "/dev",
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
