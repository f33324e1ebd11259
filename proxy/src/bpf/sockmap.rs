//! The maps of `forwarding: sockmap` as connection tasks use them: raw descriptors and one
//! syscall per operation, so no task ever waits on the datapath's lock.
//!
//! A socket is named by its cookie (`SO_COOKIE`) in all three maps: `SM_PEERS` (its peer and
//! the bytes redirected from it), `SM_TARGETS` (where redirected skbs may go) and
//! `SM_SOURCES` (whose received skbs the stream verdict redirects).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use shunt_common::SockmapPeer;

use super::sys;

pub struct Sockmap {
    sources: OwnedFd,
    targets: OwnedFd,
    peers: OwnedFd,
}

impl Sockmap {
    pub(super) fn new(sources: OwnedFd, targets: OwnedFd, peers: OwnedFd) -> Sockmap {
        Sockmap {
            sources,
            targets,
            peers,
        }
    }

    /// Records `a` and `b` as each other's peer, with no bytes redirected yet.
    pub fn pair(&self, a: u64, b: u64) -> io::Result<()> {
        for (me, peer) in [(a, b), (b, a)] {
            let entry = SockmapPeer {
                peer_cookie: peer,
                bytes: 0,
            };
            sys::map_update(self.peers.as_fd(), &me, &entry)?;
        }
        Ok(())
    }

    pub fn unpair(&self, a: u64, b: u64) -> io::Result<()> {
        sys::map_delete(self.peers.as_fd(), &a)?;
        sys::map_delete(self.peers.as_fd(), &b)
    }

    /// Bytes the verdict has redirected from the socket so far (0 once unpaired).
    pub fn redirected(&self, cookie: u64) -> io::Result<u64> {
        let entry: Option<SockmapPeer> = sys::map_lookup(self.peers.as_fd(), &cookie)?;
        Ok(entry.map_or(0, |e| e.bytes))
    }

    /// Lets skbs be redirected to the socket. Fails for a socket that is no longer
    /// established (the kernel refuses it) or when the map is full.
    pub fn add_target(&self, cookie: u64, socket: BorrowedFd<'_>) -> io::Result<()> {
        sys::map_update(self.targets.as_fd(), &cookie, &(socket.as_raw_fd() as u32))
    }

    /// From now on every skb the socket receives goes through the verdict; those already
    /// queued go through it at the next arrival or `recv`.
    pub fn add_source(&self, cookie: u64, socket: BorrowedFd<'_>) -> io::Result<()> {
        sys::map_update(self.sources.as_fd(), &cookie, &(socket.as_raw_fd() as u32))
    }

    /// The socket's skbs stay in its receive queue from now on. The kernel also removes a
    /// socket from every sockmap by itself when it closes, so absent is not an error.
    pub fn remove_source(&self, cookie: u64) -> io::Result<()> {
        sys::map_delete(self.sources.as_fd(), &cookie)
    }

    /// Drops the socket as a target; skbs still queued for it are discarded with it.
    pub fn remove_target(&self, cookie: u64) -> io::Result<()> {
        sys::map_delete(self.targets.as_fd(), &cookie)
    }
}
