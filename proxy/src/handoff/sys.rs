//! The system calls of the handoff channel (`wire.rs`) that hand out new descriptors, as
//! small safe wrappers that take ownership of them at once; the crate denies `unsafe`
//! everywhere but in `sys` modules.

use std::{
    io::IoSliceMut,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockFlag};

/// The most descriptors one message carries: a pod's listeners, or the telemetry ones.
pub const MAX_FDS: usize = 8;

/// `accept4(2)` with `SOCK_CLOEXEC`: the new connection's descriptor, owned.
pub fn accept(listener: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// What one `recvmsg` brought.
pub struct Received {
    /// Bytes written into the buffer.
    pub len: usize,
    /// The descriptors attached (`SCM_RIGHTS`, at most `MAX_FDS`), owned.
    pub fds: Vec<OwnedFd>,
    /// The message or its descriptors did not fit (`MSG_TRUNC` or `MSG_CTRUNC`).
    pub truncated: bool,
}

/// `recvmsg(2)` of one message into `body`, taking ownership of the descriptors it carries
/// (received close-on-exec).
pub fn recv_with_fds(fd: BorrowedFd<'_>, body: &mut [u8]) -> nix::Result<Received> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(body)];
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel installed these descriptors for us alone, by this call;
                // they are wrapped exactly once, here.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated,
    })
}
