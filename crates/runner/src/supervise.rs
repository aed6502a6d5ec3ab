//! No process of a run outlives it, `setsid` daemons included.
//!
//! The harness's child is a small supervisor, forked from the harness between fork and exec,
//! that never execs: it makes itself the child subreaper, forks the train process, and waits.
//! Every process the run starts descends from the supervisor, and any that loses its parent
//! (a daemon that forked, called `setsid` and let its parent exit) is reparented to the
//! supervisor rather than to init. When the train process exits, or the harness asks (SIGTERM,
//! also its parent-death signal), the supervisor kills the train process's group and then every
//! child it has, again and again until it has none, and exits as the train process did.
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

/// Called in the harness's forked child, before any confinement. Returns in the train process
/// (which goes on to confine itself and exec); never returns in the supervisor.
///
/// # Safety
/// Only between fork and exec in `Command::pre_exec`.
pub unsafe fn split(harness: libc::pid_t) -> io::Result<()> {
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
                // The train process: dies with the supervisor, leads a group of its own (which the
                // sweep kills first), starts with no signal blocked.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != supervisor {
                    libc::_exit(1);
                }
                libc::setpgid(0, 0);
                libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
                Ok(())
            }
            train => supervise(train),
        }
    }
}

unsafe fn supervise(train: libc::pid_t) -> ! {
    unsafe {
        // Hold nothing of the harness's: not its pipes (the run's output must close when the run's
        // processes are gone), not std's exec-error pipe (spawn returns once the train process
        // has exec'd).
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..65536 {
                libc::close(fd);
            }
        }
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
        libc::kill(-train, libc::SIGKILL);
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
        libc::signal(sig, libc::SIG_DFL);
        let mut only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut only);
        libc::sigaddset(&mut only, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
    }
}
