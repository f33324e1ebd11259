//! The system calls of the sandbox, the tools and the end-to-end tests that std and the safe
//! crates do not wrap, as small safe wrappers. `unsafe` is denied everywhere else in this
//! crate (`[lints]` in `tests/Cargo.toml`, which covers the tests and binaries too).

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
};

/// Sends `signal` to process `pid` (`kill(2)`).
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes no pointers and has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The effective user id of this process.
pub fn geteuid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), as `sysconf` returns it.
pub fn clock_ticks() -> libc::c_long {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
}

/// This process's hard limit on open files (`RLIMIT_NOFILE`), if it can be read.
pub fn open_file_hard_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, valid for the call.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    ok.then_some(limit.rlim_max)
}

/// Process `pid`'s limit on open files (`prlimit(2)`, `RLIMIT_NOFILE`): soft and hard.
pub fn open_file_limit_of(pid: libc::pid_t) -> io::Result<libc::rlimit> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes `old`, valid for the call, and reads nothing (no new limit).
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old)
}

/// Sets process `pid`'s limit on open files (`prlimit(2)`, `RLIMIT_NOFILE`).
pub fn set_open_file_limit_of(pid: libc::pid_t, new: libc::rlimit) -> io::Result<()> {
    // SAFETY: prlimit reads `new`, valid for the call, and writes nothing (no old limit).
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A set of signals blocked in the calling thread, to be waited for with [`Signals::wait`].
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks `signals` in the calling thread (and so in every thread it starts afterwards);
    /// `None` if `pthread_sigmask` fails.
    pub fn block(signals: &[libc::c_int]) -> Option<Signals> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before any other use;
        // every pointer is to that local set, valid for each call.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &signal in signals {
                libc::sigaddset(&mut set, signal);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return None;
            }
            Some(Signals(set))
        }
    }

    /// Waits for one of the signals (`sigwait`); the signal, or `None` if the wait failed.
    pub fn wait(&self) -> Option<libc::c_int> {
        let mut signal = 0;
        // SAFETY: the set was initialised by `block`; sigwait writes `signal`.
        (unsafe { libc::sigwait(&self.0, &mut signal) } == 0).then_some(signal)
    }
}

/// Makes `cmd`'s child, between fork and exec, unblock every signal, enter the network
/// namespace `netns` (if given) and move itself into the cgroup whose `cgroup.procs` file is
/// `procs`.
pub fn enter_on_exec(cmd: &mut Command, netns: Option<File>, procs: CString) {
    // SAFETY: the closure only makes async-signal-safe calls (sigprocmask, setns, open,
    // write, close) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // The mask is inherited across exec: a tool that blocks SIGINT/SIGTERM to wait
            // for them on a thread (`interrupts`) would start daemons deaf to SIGTERM.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(netns) = &netns
                && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The ids of the programs attached to the cgroup open as `cgroup` at `attach_type`
/// (`BPF_PROG_QUERY`; up to 64). Asked per attach type, as every kernel answers for the
/// types it knows; `bpftool cgroup show` asks for every type its own build knows and gives
/// up on older kernels.
pub fn cgroup_programs(cgroup: &File, attach_type: u32) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid BPF_PROG_QUERY attribute whose `prog_ids` points at `ids`,
    // `prog_cnt` entries long; both outlive the call, and the descriptor is open.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ids[..attr.prog_cnt as usize].to_vec())
}
