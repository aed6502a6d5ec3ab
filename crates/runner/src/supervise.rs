//! No process of a run outlives it, `setsid` daemons included.
//!
//! The harness's child is a small supervisor, forked from the harness between fork and exec,
//! that never execs: it makes itself the child subreaper, forks the train process, and waits.
//! Every process the run starts descends from the supervisor, and any that loses its parent
//! (a daemon that forked, called `setsid` and let its parent exit) is reparented to the
//! supervisor rather than to init. When the train process exits, or the harness asks (SIGTERM,
//! also its parent-death signal), the supervisor freezes every descendant it finds in /proc
//! (SIGSTOP, scanning again until a scan finds none it has not stopped: a stopped process cannot
//! fork), kills them all, reaps what comes back to it, and exits as the train process did.
//! Killing one process at a time would not do: a chain of `setsid` processes whose last one
//! forks again into each freed task slot would outrun it.
//!
//! Everything here runs in a forked copy of a multi-threaded process: system calls only, no
//! allocation, no locks.

use std::io;

/// The end of the run the harness asked for: sent to the supervisor, never to its group.
pub const STOP: libc::c_int = libc::SIGTERM;

/// Whether this kernel lists a process's children (`/proc/PID/task/TID/children`, from
/// `CONFIG_PROC_CHILDREN`), which the sweep reads.
pub fn available() -> bool {
    std::path::Path::new("/proc/thread-self/children").exists()
}

/// Room for the sweep, allocated before the fork: the machine's processes as (pid, parent)
/// pairs, and a bit per possible pid for the run's.
pub struct Sweep {
    pids: Vec<libc::pid_t>,
    parents: Vec<libc::pid_t>,
    marked: Vec<u64>,
}

impl Sweep {
    pub fn new() -> Sweep {
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1 << 22);
        let room = 1 << 16;
        Sweep {
            pids: vec![0; room],
            parents: vec![0; room],
            marked: vec![0; pid_max / 64 + 1],
        }
    }

    fn mark(&mut self, pid: libc::pid_t) -> bool {
        let (word, bit) = (pid as usize / 64, pid as usize % 64);
        match self.marked.get_mut(word) {
            Some(w) if *w & (1 << bit) == 0 => {
                *w |= 1 << bit;
                true
            }
            _ => false,
        }
    }

    fn is_marked(&self, pid: libc::pid_t) -> bool {
        let (word, bit) = (pid as usize / 64, pid as usize % 64);
        self.marked.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// Reads every process's parent from /proc; returns how many were read.
    unsafe fn scan(&mut self) -> usize {
        unsafe {
            let dir = libc::open(
                c"/proc".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if dir < 0 {
                return 0;
            }
            let mut n = 0;
            let mut buf = [0u8; 8192];
            loop {
                let got = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
                if got <= 0 {
                    break;
                }
                let mut at = 0usize;
                while at < got as usize {
                    // struct linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
                    let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                    let name = &buf[at + 19..at + reclen];
                    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                    at += reclen;
                    let Some(pid) = parse_pid(name) else {
                        continue;
                    };
                    if n == self.pids.len() {
                        break;
                    }
                    if let Some(parent) = parent_of(name) {
                        self.pids[n] = pid;
                        self.parents[n] = parent;
                        n += 1;
                    }
                }
            }
            libc::close(dir);
            n
        }
    }
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep::new()
    }
}

fn parse_pid(name: &[u8]) -> Option<libc::pid_t> {
    if name.is_empty() || name.len() > 9 || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        name.iter()
            .fold(0, |n: libc::pid_t, &b| n * 10 + (b - b'0') as libc::pid_t),
    )
}

/// The parent's pid from `/proc/NAME/stat` (the field after the state, after the last `)`).
unsafe fn parent_of(name: &[u8]) -> Option<libc::pid_t> {
    let mut path = [0u8; 32];
    path[..6].copy_from_slice(b"/proc/");
    path[6..6 + name.len()].copy_from_slice(name);
    path[6 + name.len()..6 + name.len() + 5].copy_from_slice(b"/stat");
    let mut stat = [0u8; 512];
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, stat.as_mut_ptr().cast(), stat.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return None;
    }
    let stat = &stat[..n as usize];
    let close = stat.iter().rposition(|&b| b == b')')?;
    // ") S PPID ..."
    let rest = stat.get(close + 4..)?;
    let end = rest.iter().position(|&b| b == b' ')?;
    parse_pid(&rest[..end])
}

/// Called in the harness's forked child, before any confinement. Returns in the train process
/// (which goes on to confine itself and exec); never returns in the supervisor.
///
/// # Safety
/// Only between fork and exec in `Command::pre_exec`.
pub unsafe fn split(harness: libc::pid_t, sweep: &mut Sweep) -> io::Result<()> {
    unsafe {
        // Signals wait for the supervisor's own `sigtimedwait`; the train process unblocks them.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_SETMASK, &all, &mut before);
        // The harness's death asks for the sweep, like its SIGTERM.
        libc::prctl(libc::PR_SET_PDEATHSIG, STOP);
        if libc::getppid() != harness {
            libc::_exit(1);
        }
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let supervisor = libc::getpid();
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // The train process: dies with the supervisor, leads a session of its own (no
                // way into the harness's process groups), starts with no signal blocked.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != supervisor {
                    libc::_exit(1);
                }
                libc::setsid();
                libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
                Ok(())
            }
            train => supervise(train, sweep),
        }
    }
}

unsafe fn supervise(train: libc::pid_t, sweep: &mut Sweep) -> ! {
    unsafe {
        // Hold nothing of the harness's: not its pipes (the run's output must close when the run's
        // processes are gone), not std's exec-error pipe (spawn returns once the train process
        // has exec'd).
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            let mut open = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut open);
            for fd in 0..open.rlim_cur.min(1 << 20) as libc::c_int {
                libc::close(fd);
            }
        }
        // The status of each child comes to this process, whatever the harness did with SIGCHLD.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut waiting: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut waiting);
        for sig in [libc::SIGCHLD, STOP, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut waiting, sig);
        }
        let mut status: Option<libc::c_int> = None;
        loop {
            reap(train, &mut status, libc::WNOHANG);
            if status.is_some() {
                break;
            }
            let tick = libc::timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            let sig = libc::sigtimedwait(&waiting, std::ptr::null_mut(), &tick);
            if sig == STOP || sig == libc::SIGINT || sig == libc::SIGHUP {
                break;
            }
        }
        freeze_and_kill(sweep);
        loop {
            kill_children();
            // Each pass reaps at least one: every child was just sent SIGKILL.
            if !reap(train, &mut status, 0) {
                break;
            }
        }
        exit_as(status.unwrap_or(libc::SIGKILL))
    }
}

/// Stops every descendant of this process, scanning /proc again until a scan finds none it had
/// not stopped (a stopped process forks no more), then kills them all.
unsafe fn freeze_and_kill(sweep: &mut Sweep) {
    unsafe {
        let me = libc::getpid();
        sweep.mark(me);
        let mut n = 0;
        for _ in 0..1000 {
            n = sweep.scan();
            let mut found = false;
            // Descendants: marked parents mark their children, until nothing changes.
            loop {
                let mut changed = false;
                for i in 0..n {
                    if sweep.is_marked(sweep.parents[i]) && sweep.mark(sweep.pids[i]) {
                        libc::kill(sweep.pids[i], libc::SIGSTOP);
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
                found = true;
            }
            if !found {
                break;
            }
        }
        for i in 0..n {
            if sweep.pids[i] != me && sweep.is_marked(sweep.pids[i]) {
                libc::kill(sweep.pids[i], libc::SIGKILL);
            }
        }
    }
}

/// Reaps what has ended (with `flags` 0, waits for one at least). False once no child is left.
unsafe fn reap(train: libc::pid_t, status: &mut Option<libc::c_int>, flags: libc::c_int) -> bool {
    let mut flags = flags;
    loop {
        let mut st = 0;
        let pid = unsafe { libc::waitpid(-1, &mut st, flags) };
        match pid {
            0 => return true,
            -1 => return io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD),
            _ => {
                if pid == train {
                    *status = Some(st);
                }
                flags = libc::WNOHANG;
            }
        }
    }
}

/// SIGKILL to every child of this (single-threaded) process, read from
/// `/proc/thread-self/children` in pieces, with no allocation.
unsafe fn kill_children() {
    unsafe {
        let fd = libc::open(
            c"/proc/thread-self/children".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut pid: libc::pid_t = 0;
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            for &b in &buf[..n as usize] {
                if b.is_ascii_digit() {
                    pid = pid
                        .saturating_mul(10)
                        .saturating_add((b - b'0') as libc::pid_t);
                } else {
                    if pid > 0 {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    pid = 0;
                }
            }
        }
        if pid > 0 {
            libc::kill(pid, libc::SIGKILL);
        }
        libc::close(fd);
    }
}

/// Ends the supervisor the way the train process ended: its exit code, or its signal (no core
/// dump: the supervisor is a copy of the harness).
unsafe fn exit_as(status: libc::c_int) -> ! {
    unsafe {
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let sig = if libc::WIFSIGNALED(status) {
            libc::WTERMSIG(status)
        } else {
            libc::SIGKILL
        };
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        // A core handler on a pipe may ignore RLIMIT_CORE; a non-dumpable process dumps nothing.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::signal(sig, libc::SIG_DFL);
        let mut only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut only);
        libc::sigaddset(&mut only, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
    }
}
