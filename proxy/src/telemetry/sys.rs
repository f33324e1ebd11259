//! The system calls of the telemetry (`process.rs`), as small safe wrappers; the crate denies
//! `unsafe` everywhere but in `sys` modules.

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), as `sysconf` returns it (-1 if unknown).
pub fn clock_ticks() -> libc::c_long {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
}

/// The page size in bytes (`sysconf(_SC_PAGESIZE)`), as `sysconf` returns it (-1 if unknown).
pub fn page_size() -> libc::c_long {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }
}
