//! The data path's system calls, as small safe wrappers: the non-blocking `recv`/`send`,
//! `TCP_INFO`, `SIOCOUTQ` and epoll set of `forwarding: sockmap` (`sockmap.rs`),
//! and `shutdown(SHUT_WR)` for every forwarding mode. The `unsafe` of `proxy/` lives here
//! only (the crate denies it elsewhere); each wrapper takes borrowed descriptors, so a call
//! never outlives the socket it acts on.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// `recv(2)` into `buf` with `flags`: `Ok(0)` at EOF, the OS error if it fails.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length for the whole call; the descriptor is
    // borrowed, so it stays open until the call returns.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `send(2)` of `buf` with `flags`: the bytes taken, or the OS error.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length for the whole call; the descriptor is
    // borrowed, so it stays open until the call returns.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `shutdown(SHUT_WR)`: passes an EOF on without closing the other direction. Its result is
/// not needed (a socket that cannot be shut down has already failed in a way that is
/// reported elsewhere).
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    // SAFETY: shutdown has no memory effects; the descriptor is borrowed, so it is open.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// Reads `struct tcp_info` (`TCP_INFO`) into `info`; returns the length the kernel wrote.
pub fn tcp_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<usize> {
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is valid for writes of `len` bytes, and `len` is a valid socklen_t the
    // kernel updates; the descriptor is borrowed, so it is open.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// Bytes in the socket's send queue not yet acknowledged (`SIOCOUTQ`, alias `TIOCOUTQ`).
pub fn send_queued(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int, which `queued` is; the descriptor is
    // borrowed, so it is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued)
}

/// An epoll set of its own for one connection's two sockets, asking only for `EPOLLRDHUP`
/// (errors and hang-ups are always reported), edge-triggered: every wake-up is evaluated in
/// full, so no event needs to be kept.
pub mod epoll {
    use super::*;

    pub fn watch(fds: &[BorrowedFd<'_>]) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: plain syscall without pointers; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 returned a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        for fd in fds {
            let fd = fd.as_raw_fd();
            let mut event = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: fd as u64,
            };
            // SAFETY: both descriptors are open (one owned here, one borrowed); the event is
            // valid for the call.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the epoll descriptor (an `OwnedFd`, whose `as_raw_fd` never
        // changes) for as long as it is registered.
        unsafe { AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)
    }

    /// Sets both sockets' interest: `EPOLLRDHUP`, plus `EPOLLIN` when `reading`.
    pub fn interest(epfd: BorrowedFd<'_>, fds: &[BorrowedFd<'_>], reading: bool) -> io::Result<()> {
        let mut events = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if reading {
            events |= libc::EPOLLIN as u32;
        }
        for fd in fds {
            let fd = fd.as_raw_fd();
            let mut event = libc::epoll_event {
                events,
                u64: fd as u64,
            };
            // SAFETY: both descriptors are borrowed, so open; the event is valid for the call.
            if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut event) }
                != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Empties the ready list (the events themselves are not needed).
    pub fn drain(epfd: BorrowedFd<'_>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        loop {
            // SAFETY: the buffer holds `events.len()` entries; the descriptor is borrowed.
            let n = unsafe {
                libc::epoll_wait(
                    epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n < events.len() as i32 {
                return;
            }
        }
    }
}

/// CPU time the calling thread has used, in seconds (`CLOCK_THREAD_CPUTIME_ID`).
#[cfg(test)]
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
