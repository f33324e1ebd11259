//! The names the programs know sockets and network namespaces by: a socket's cookie and its
//! namespace's cookie. Kernels before 5.14 have no `SO_NETNS_COOKIE`; there the daemon
//! connects a socket of the namespace to the probe address, which `connect4` refuses after
//! recording the namespace's cookie under the socket's cookie.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
};

use aya::maps::{HashMap, MapData};
use shunt_common::{NETNS_PROBE_ADDR, NETNS_PROBE_PORT, maps};

use super::{BpfError, sys};

/// The socket's cookie (`SO_COOKIE`), the key of the sockmaps.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    sys::getsockopt_u64(socket, libc::SO_COOKIE)
}

/// The cookie of the network namespace the socket belongs to (`SO_NETNS_COOKIE`, 5.14).
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    sys::getsockopt_u64(socket, libc::SO_NETNS_COOKIE)
}

/// The answers `connect4` leaves in `NETNS_PROBES`.
pub struct NetnsProbes {
    answers: HashMap<MapData, u64, u64>,
    /// Where the programs are attached: only sockets of processes inside it meet `connect4`.
    cgroup: PathBuf,
}

impl NetnsProbes {
    pub fn new(answers: HashMap<MapData, u64, u64>, cgroup: PathBuf) -> NetnsProbes {
        NetnsProbes { answers, cgroup }
    }

    /// The cookie of the namespace `socket` (an unconnected TCP/IPv4 socket) belongs to, as
    /// `connect4` sees it.
    pub fn cookie_of(&mut self, socket: &socket2::Socket) -> Result<u64, BpfError> {
        let probe = SocketAddr::from((Ipv4Addr::from(NETNS_PROBE_ADDR), NETNS_PROBE_PORT));
        let refused = match socket.connect(&probe.into()) {
            Err(e) => e.raw_os_error() == Some(libc::EPERM),
            Ok(()) => false,
        };
        let cookie = socket_cookie(socket.as_fd()).map_err(|e| self.failed(e.to_string()))?;
        let answer = self.answers.get(&cookie, 0).ok();
        let _ = self.answers.remove(&cookie);
        match (refused, answer) {
            (true, Some(netns_cookie)) => Ok(netns_cookie),
            _ => Err(self.failed(format!(
                "connect4 did not answer the probe: is the daemon running inside cgroup {}?",
                self.cgroup.display()
            ))),
        }
    }

    fn failed(&self, message: String) -> BpfError {
        BpfError::Map {
            name: maps::NETNS_PROBES,
            message: format!(
                "learning a network namespace's cookie without SO_NETNS_COOKIE (Linux 5.14): \
                 {message}"
            ),
        }
    }
}
