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

#[cfg(test)]
mod tests {
    //! The channel between two ends in one process: no root, no second daemon.

    use std::{net::TcpListener, path::PathBuf};

    use super::*;

    /// A rendezvous path of its own per test, removed when dropped.
    struct TempSocket(PathBuf);

    impl TempSocket {
        fn new(name: &str) -> TempSocket {
            let path = std::env::temp_dir().join(format!(
                "shunt-handoff-test-{}-{name}.sock",
                std::process::id()
            ));
            TempSocket(path)
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Both ends, connected: (giving, taking).
    fn pair(name: &str) -> (Channel, Channel, TempSocket) {
        let socket = TempSocket::new(name);
        let rendezvous = Rendezvous::bind(&socket.0).unwrap();
        let giving = Channel::connect(&socket.0, Duration::from_secs(5)).unwrap();
        let taking = rendezvous.accept(Duration::from_secs(5)).unwrap();
        (giving, taking, socket)
    }

    fn pod_message(listeners: Vec<std::net::SocketAddr>) -> Message {
        Message::Pod {
            name: "client".into(),
            netns: "/var/run/netns/client".into(),
            netns_cookie: 4097,
            origin: crate::inpod::Origin::Operator,
            listeners,
        }
    }

    #[test]
    fn a_pod_arrives_whole_with_the_same_listening_socket() {
        let (giving, taking, _socket) = pair("pod");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        giving
            .send(&pod_message(vec![addr]), &[listener.as_raw_fd()])
            .unwrap();
        let (message, fds) = taking.recv().unwrap().unwrap();
        let Message::Pod {
            name,
            netns_cookie,
            origin,
            listeners,
            ..
        } = message
        else {
            panic!("not a pod: {message:?}");
        };
        assert_eq!(
            (name.as_str(), netns_cookie, listeners),
            ("client", 4097, vec![addr])
        );
        assert_eq!(origin, crate::inpod::Origin::Operator);
        assert_eq!(fds.len(), 1);
        // The descriptor that arrived is the same socket: a connection made to it is
        // accepted through the received copy.
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        received.accept().unwrap();
    }

    #[test]
    fn messages_keep_their_order_and_a_closed_end_reads_as_none() {
        let (giving, taking, _socket) = pair("order");
        giving
            .send(&Message::Done { pid: 7, pods: 0 }, &[])
            .unwrap();
        giving.send(&Message::Released, &[]).unwrap();
        drop(giving);
        assert!(matches!(
            taking.recv().unwrap(),
            Some((Message::Done { pid: 7, pods: 0 }, fds)) if fds.is_empty()
        ));
        assert!(matches!(
            taking.recv().unwrap(),
            Some((Message::Released, _))
        ));
        assert!(taking.recv().unwrap().is_none());
    }

    #[test]
    fn too_many_descriptors_are_refused_before_anything_is_sent() {
        let (giving, taking, _socket) = pair("many");
        let listeners: Vec<_> = (0..=MAX_FDS)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<_> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        let refused = giving.send(&pod_message(Vec::new()), &fds);
        assert!(
            matches!(refused, Err(HandoffError::Protocol(_))),
            "{refused:?}"
        );
        drop(giving);
        assert!(taking.recv().unwrap().is_none(), "something was sent");
    }

    #[test]
    fn an_undecodable_message_is_a_protocol_error() {
        let (giving, taking, _socket) = pair("garbage");
        let iov = [IoSlice::new(b"{\"kind\":\"surprise\"}")];
        socket::sendmsg::<()>(giving.fd.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        let error = taking.recv().unwrap_err();
        assert!(
            matches!(&error, HandoffError::Protocol(m) if m.contains("undecodable")),
            "{error}"
        );
    }

    #[test]
    fn an_oversized_message_is_reported_truncated() {
        let (giving, taking, _socket) = pair("big");
        let big = vec![b' '; MAX_MESSAGE + 1];
        let iov = [IoSlice::new(&big)];
        socket::sendmsg::<()>(giving.fd.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        let error = taking.recv().unwrap_err();
        assert!(
            matches!(&error, HandoffError::Protocol(m) if m.contains("truncated")),
            "{error}"
        );
    }

    #[test]
    fn the_rendezvous_is_reachable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let socket = TempSocket::new("mode");
        let _rendezvous = Rendezvous::bind(&socket.0).unwrap();
        let mode = std::fs::metadata(&socket.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
