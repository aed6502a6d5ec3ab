//! Landlock: the run may write only under its run directory and `/dev` (GPU device files,
//! `/dev/shm`), may not open TCP connections or listen, and (ABI 6+) may not signal processes or use
//! abstract sockets outside its own domain. Reads stay open everywhere. Without root; where the
//! kernel lacks Landlock the run goes on unconfined and the log says so.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

// Filesystem rights (landlock.h).
const WRITE_FILE: u64 = 1 << 1;
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

impl Sandbox {
    /// Builds the ruleset; `None` when this kernel has no Landlock.
    pub fn new(writable: &[&Path]) -> Option<Sandbox> {
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
        let mut fs = WRITE_FILE
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
        for dir in writable {
            let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated path; the descriptor is closed below.
            let parent = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if parent < 0 {
                continue;
            }
            let rule = PathBeneathAttr {
                allowed_access: fs,
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

    pub fn describe(&self, writable: &[&Path]) -> String {
        let dirs: Vec<String> = writable.iter().map(|p| p.display().to_string()).collect();
        format!(
            "# sandbox: environment scrubbed to an allowlist; Landlock ABI {}: writes only under {}{}",
            self.abi,
            dirs.join(", "),
            if self.abi >= 4 {
                "; TCP connect and bind denied"
            } else {
                "; network not restricted (Landlock ABI < 4)"
            }
        )
    }
}
