//! The handoff channel: a `SOCK_SEQPACKET` unix socket, so every message arrives whole, each
//! a JSON document with the listening sockets it describes attached (`SCM_RIGHTS`). Calls
//! block, bounded by the socket's send and receive timeouts; they run on a blocking thread.

use std::{
    io::IoSlice,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::{
    socket::{
        self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
        sockopt,
    },
    time::TimeVal,
};

use super::{
    HandoffError, Message,
    sys::{self, MAX_FDS},
};

/// Messages are small: a pod's name, namespace path and addresses.
const MAX_MESSAGE: usize = 16 * 1024;

/// One end of the channel.
pub struct Channel {
    fd: OwnedFd,
}

fn io(what: &'static str) -> impl Fn(nix::errno::Errno) -> HandoffError {
    move |e| HandoffError::Channel {
        what,
        source: std::io::Error::from(e),
    }
}

fn with_timeout(fd: &OwnedFd, timeout: Duration) -> Result<(), HandoffError> {
    let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv).map_err(io("setting a timeout"))?;
    socket::setsockopt(fd, sockopt::SendTimeout, &tv).map_err(io("setting a timeout"))
}

fn seqpacket() -> Result<OwnedFd, HandoffError> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io("creating the handoff socket"))
}

/// The taking side's listening end, at a path only root can reach.
pub struct Rendezvous {
    fd: OwnedFd,
}

impl Rendezvous {
    pub fn bind(path: &Path) -> Result<Rendezvous, HandoffError> {
        let _ = std::fs::remove_file(path);
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(io("naming the handoff socket"))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(io("binding the handoff socket"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| HandoffError::Channel {
                what: "restricting the handoff socket",
                source,
            },
        )?;
        socket::listen(&fd, Backlog::new(1).unwrap_or(Backlog::MAXCONN))
            .map_err(io("listening on the handoff socket"))?;
        Ok(Rendezvous { fd })
    }

    /// Waits (at most `timeout`) for the giving daemon to connect.
    pub fn accept(&self, timeout: Duration) -> Result<Channel, HandoffError> {
        with_timeout(&self.fd, timeout)?;
        let fd = sys::accept(self.fd.as_fd())
            .map_err(io("waiting for the running daemon to connect"))?;
        with_timeout(&fd, timeout)?;
        Ok(Channel { fd })
    }
}

impl Channel {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Channel, HandoffError> {
        let fd = seqpacket()?;
        with_timeout(&fd, timeout)?;
        let addr = UnixAddr::new(path).map_err(io("naming the handoff socket"))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(io("connecting to the new daemon"))?;
        Ok(Channel { fd })
    }

    pub fn send(&self, message: &Message, fds: &[RawFd]) -> Result<(), HandoffError> {
        let body = serde_json::to_vec(message).map_err(HandoffError::Encode)?;
        if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(HandoffError::Protocol(format!(
                "message too large ({} bytes, {} descriptors)",
                body.len(),
                fds.len()
            )));
        }
        let iov = [IoSlice::new(&body)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        socket::sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .map_err(io("sending to the other daemon"))?;
        Ok(())
    }

    /// The next message and the descriptors that came with it; `None` when the other side
    /// closed the channel.
    pub fn recv(&self) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoffError> {
        let mut body = vec![0u8; MAX_MESSAGE];
        let sys::Received {
            len,
            fds,
            truncated,
        } = sys::recv_with_fds(self.fd.as_fd(), &mut body)
            .map_err(io("receiving from the other daemon"))?;
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        if truncated {
            return Err(HandoffError::Protocol("a message was truncated".into()));
        }
        let message = serde_json::from_slice(&body[..len])
            .map_err(|e| HandoffError::Protocol(format!("undecodable message: {e}")))?;
        Ok(Some((message, fds)))
    }
}
