//! Zero-copy forwarding of one direction with `splice(2)`: socket → pipe → socket, so the
//! payload never enters userspace. Readiness comes from tokio, so a pump costs no thread.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per `splice` call; the pipe is grown to match so one call can fill it.
const CHUNK: usize = 64 * 1024;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: the default 64 KiB is also fine.
        let _ = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Ok(Pipe { read, write })
    }
}

/// Why a direction stopped: reading failed (typically the source reset) or writing did.
pub enum SpliceEnd {
    Read(io::Error),
    Write(io::Error),
}

/// Moves bytes from `from` to `to` until EOF on `from`; returns the byte count through
/// `on_bytes` as they go. Does not shut `to` down: the caller passes the EOF on.
pub async fn splice_until_eof(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    mut on_bytes: impl FnMut(usize),
) -> Result<(), SpliceEnd> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = loop {
            from.readable().await.map_err(SpliceEnd::Read)?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, &pipe.write, None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceEnd::Read(e)),
            }
        };
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(SpliceEnd::Write)?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, to.as_fd(), None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(SpliceEnd::Write(io::ErrorKind::WriteZero.into())),
                Ok(written) => {
                    left -= written;
                    on_bytes(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceEnd::Write(e)),
            }
        }
    }
}

/// `shutdown(SHUT_WR)`: passes an EOF on without closing the other direction.
pub fn shutdown_write(stream: &TcpStream) {
    // SAFETY: the fd is valid for the duration of the call; shutdown has no memory effects.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
}
