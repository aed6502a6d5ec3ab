//! How much of the machine one run may take: a cap on its tasks (processes and threads: a fork
//! bomb stops at it) and on each process's memory (an allocation past it fails).
//!
//! Tasks are capped by a `pids` cgroup where the harness can make one (cgroup v1's `pids`
//! hierarchy or v2 with the controller enabled: as root, typically), else by `RLIMIT_NPROC`
//! (any user but root, whom the kernel exempts from it). Memory is capped by `RLIMIT_AS` on CPU;
//! on CUDA by `RLIMIT_DATA`, since the driver reserves address space far beyond what it uses.
//! The run cannot raise either: the seccomp filter refuses `setrlimit` and `prlimit64` with a
//! new limit.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// What one run may take. Zero means no cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Tasks (processes and threads) the run may have at once.
    pub tasks: u64,
    /// Bytes each of the run's processes may map.
    pub memory: u64,
}

impl Limits {
    /// Sized from this machine: 256 tasks plus 64 per CPU (a CPU run has a thread per CPU, the
    /// CUDA driver a handful), and three quarters of its memory.
    pub fn for_machine() -> Limits {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        Limits {
            tasks: 256 + 64 * cpus,
            memory: mem_total().map_or(16 << 30, |total| total / 4 * 3),
        }
    }
}

/// Total memory from /proc/meminfo, in bytes.
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The task cap, made ready in the harness and joined by the train process before exec.
pub enum TaskCap {
    None,
    /// A cgroup of the run's own, removed when this is dropped.
    Cgroup {
        dir: PathBuf,
        procs: OwnedFd,
    },
    /// `RLIMIT_NPROC`, which counts every task of the user's: the run may start this many more
    /// than the user has now.
    Rlimit(u64),
}

static RUNS: AtomicU64 = AtomicU64::new(0);

impl TaskCap {
    pub fn new(tasks: u64) -> Result<TaskCap, String> {
        if tasks == 0 {
            return Ok(TaskCap::None);
        }
        if let Some(cap) = cgroup(tasks) {
            return Ok(cap);
        }
        // SAFETY: plain syscalls.
        let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        if uid == 0 || euid == 0 {
            return Err("no pids cgroup could be made here and the harness runs as root, whom the kernel exempts from RLIMIT_NPROC, so a run's processes cannot be capped: run as another user, give the harness a writable cgroup (a container with --cgroupns=private, say), or pass --max-run-tasks 0 to run without the cap".into());
        }
        Ok(TaskCap::Rlimit(user_tasks(uid) + tasks))
    }

    pub fn describe(&self) -> String {
        match self {
            TaskCap::None => "no cap on tasks".into(),
            TaskCap::Cgroup { dir, .. } => format!("tasks capped by the cgroup {}", dir.display()),
            TaskCap::Rlimit(n) => format!("tasks capped by RLIMIT_NPROC at {n} for the user"),
        }
    }

    pub fn procs_fd(&self) -> Option<RawFd> {
        match self {
            TaskCap::Cgroup { procs, .. } => Some(procs.as_raw_fd()),
            _ => None,
        }
    }

    pub fn rlimit(&self) -> Option<u64> {
        match self {
            TaskCap::Rlimit(n) => Some(*n),
            _ => None,
        }
    }
}

impl Drop for TaskCap {
    fn drop(&mut self) {
        let TaskCap::Cgroup { dir, .. } = self else {
            return;
        };
        // Empty once the sweep's last process is reaped; the kernel may lag a moment behind.
        for _ in 0..50 {
            if std::fs::remove_dir(&*dir).is_ok() || !dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!("could not remove the run's cgroup {}", dir.display());
    }
}

/// A `pids` cgroup beside the harness's own, where one can be made.
fn cgroup(tasks: u64) -> Option<TaskCap> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let name = format!("autoresearch-run-{}-{n}", std::process::id());
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "pids") {
            continue;
        }
        for parent in cgroup_dirs(&mounts, v2, path) {
            remove_stale(&parent);
            let dir = parent.join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let made = std::fs::write(dir.join("pids.max"), tasks.to_string()).is_ok();
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"));
            match (made, procs) {
                (true, Ok(procs)) => {
                    return Some(TaskCap::Cgroup {
                        dir,
                        procs: procs.into(),
                    });
                }
                _ => {
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
    }
    None
}

/// Removes the (empty) cgroups a killed harness left: those of processes no longer alive.
fn remove_stale(parent: &std::path::Path) {
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("autoresearch-run-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Where the harness's cgroup `path` is, in each mount of the hierarchy (v2's, or v1's with the
/// `pids` controller) that holds it: a mount whose root (a container's cgroup, say) is not the
/// hierarchy's shows `path` less that root.
fn cgroup_dirs(mountinfo: &str, v2: bool, path: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut fields = right.split(' ');
            let (fstype, _source, options) = (fields.next()?, fields.next()?, fields.next()?);
            let found = if v2 {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && options.split(',').any(|o| o == "pids")
            };
            if !found {
                return None;
            }
            let mut left = left.split(' ');
            let (root, mount) = (left.nth(3)?, left.next()?);
            let inside = if root == "/" {
                path
            } else {
                path.strip_prefix(root)
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))?
            };
            Some(PathBuf::from(mount).join(inside.trim_start_matches('/')))
        })
        .collect()
}

/// The tasks of `uid` (its real uid, as RLIMIT_NPROC counts them) on this machine now.
fn user_tasks(uid: libc::uid_t) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    let mut status = String::new();
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        status.clear();
        let Ok(mut f) = std::fs::File::open(entry.path().join("status")) else {
            continue;
        };
        if f.read_to_string(&mut status).is_err() {
            continue;
        }
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(uid as u64) {
            total += field("Threads:").unwrap_or(1);
        }
    }
    total
}

/// In the train process, between fork and exec, before the confinement: joins the cgroup or
/// sets RLIMIT_NPROC, and caps memory (`RLIMIT_AS`, or `RLIMIT_DATA` with `data_only`).
///
/// # Safety
/// Only between fork and exec.
pub unsafe fn apply(
    procs_fd: Option<RawFd>,
    nproc: Option<u64>,
    memory: u64,
    data_only: bool,
) -> std::io::Result<()> {
    // Never above the hard limit already there (which only root could raise).
    let set = |resource, n: u64| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: stack structs.
        unsafe {
            if libc::getrlimit(resource, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n.min(lim.rlim_max);
            lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // Should the machine run out of memory all the same, the run goes first, not the harness.
    // SAFETY: a static path and bytes. Written as root, it also sets the floor (oom_score_adj_min);
    // otherwise the run may set it back to 0, the harness's own, through its threads' files
    // (writable for the GPU driver), and no lower. The run holds no capability to go further.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, c"1000".as_ptr().cast(), 4);
            libc::close(fd);
        }
    }
    if let Some(fd) = procs_fd {
        // "0": the writing process itself.
        // SAFETY: a static byte on a descriptor the harness opened.
        if unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(n) = nproc {
        set(libc::RLIMIT_NPROC, n)?;
    }
    if memory > 0 {
        let resource = if data_only {
            libc::RLIMIT_DATA
        } else {
            libc::RLIMIT_AS
        };
        set(resource, memory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cgroup_dirs;
    use std::path::PathBuf;

    const MOUNTINFO: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory,pids
41 23 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn the_harness_cgroup_is_found_in_each_mount_that_holds_it() {
        assert_eq!(
            cgroup_dirs(MOUNTINFO, false, "/docker/abc/jobs"),
            [
                PathBuf::from("/sys/fs/cgroup/pids/docker/abc/jobs"),
                PathBuf::from("/sys/fs/cgroup/memory/jobs"),
            ]
        );
        // A mount rooted elsewhere does not hold it.
        assert_eq!(
            cgroup_dirs(MOUNTINFO, false, "/user.slice"),
            [PathBuf::from("/sys/fs/cgroup/pids/user.slice")]
        );
        assert_eq!(
            cgroup_dirs(MOUNTINFO, true, "/"),
            [PathBuf::from("/sys/fs/cgroup/unified/")]
        );
    }
}
