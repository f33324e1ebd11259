//! The system calls of enrollment (`netns.rs`) that the safe crates do not wrap, as small
//! safe wrappers; the crate denies `unsafe` everywhere but in `sys` modules.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// The cookie of the network namespace the socket belongs to (`SO_NETNS_COOKIE`).
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed, so open for the call; SO_NETNS_COOKIE writes one
    // u64 into `cookie`, whose size `len` gives.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
