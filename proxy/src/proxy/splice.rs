//! Zero-copy forwarding of one direction with `splice(2)`: socket → pipe → socket, so the
//! payload never enters userspace. Readiness comes from tokio, so a pump costs no thread.
//!
//! A pipe is two descriptors and up to 64 KiB of kernel memory, and most connections are idle
//! most of the time: a direction borrows a pipe from a shared pool only while it has bytes in
//! flight and gives it back once the pipe is empty again, so an idle connection holds none.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
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

/// Empty pipes kept for reuse; beyond this many, returned pipes are closed.
const POOL_CAPACITY: usize = 256;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// An empty pipe from the pool, or a new one.
fn borrow_pipe() -> io::Result<Pipe> {
    let pooled = POOL.lock().ok().and_then(|mut pool| pool.pop());
    pooled.map_or_else(Pipe::new, Ok)
}

/// Returns a pipe the caller has drained completely.
fn return_pipe(pipe: Pipe) {
    if let Ok(mut pool) = POOL.lock()
        && pool.len() < POOL_CAPACITY
    {
        pool.push(pipe);
    }
}

/// Why a direction stopped: reading failed (typically the source reset), writing did, or no
/// pipe could be created.
pub enum SpliceEnd {
    Read(io::Error),
    Write(io::Error),
    NoPipe(io::Error),
}

/// Moves bytes from `from` to `to` until EOF on `from`; returns the byte count through
/// `on_bytes` as they go. Does not shut `to` down: the caller passes the EOF on. Fails with
/// `SpliceEnd::NoPipe` when no pipe can be had (descriptor limit); every byte read so far has
/// been written by then, so the caller can go on copying.
pub async fn splice_until_eof(
    from: &TcpStream,
    to: &TcpStream,
    mut on_bytes: impl FnMut(usize),
) -> Result<(), SpliceEnd> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        from.readable().await.map_err(SpliceEnd::Read)?;
        // Held only while bytes are in flight; dropped (closed) rather than pooled if this
        // future is cancelled with bytes still inside.
        let pipe = borrow_pipe().map_err(SpliceEnd::NoPipe)?;
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
        return_pipe(pipe);
    }
}

/// `shutdown(SHUT_WR)`: passes an EOF on without closing the other direction.
pub fn shutdown_write(stream: &TcpStream) {
    super::sys::shutdown_write(stream.as_fd());
}
