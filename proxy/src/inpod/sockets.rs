//! Sockets opened inside a pod's network namespace: the in-pod listeners the programs redirect
//! to, and the upstream sockets the proxy dials from (so the server sees the pod's address and
//! NetworkPolicy applies as if the pod had connected itself).

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::Netns;

const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener inside `netns`. Must be called from within the runtime.
pub fn listen_in(netns: &Netns, addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))??;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `addr` from inside `netns`, with `mark` set before `connect()` so the
/// programs let the connection through instead of redirecting it back to us.
pub async fn connect_from(netns: &Netns, mark: u32, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))??;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(addr).await
}

/// Takes a listening socket handed over by the previous daemon, checking it is what it is
/// said to be.
pub fn adopt(fd: std::os::fd::OwnedFd, addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::from(fd);
    if !socket.is_listener()? || socket.local_addr()?.as_socket() != Some(addr) {
        return Err(io::Error::other(format!(
            "the handed-over socket is not a listener on {addr}"
        )));
    }
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}
