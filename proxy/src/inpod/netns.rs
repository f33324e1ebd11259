//! Network namespaces of pods. The daemon stays in the node's namespace; to open a socket
//! inside a pod it switches the calling thread into the pod's namespace just for the
//! `socket()` call (a socket belongs to the namespace it was created in), as ztunnel does.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};

/// The daemon's own namespace, captured once at start-up before any thread moves.
static HOST: OnceLock<File> = OnceLock::new();

/// Records the namespace of the calling thread as the one to return to. Call first thing in
/// `main`, before the runtime starts threads.
pub fn init_host_netns() -> io::Result<()> {
    let file = File::open("/proc/thread-self/ns/net")?;
    let _ = HOST.set(file);
    Ok(())
}

#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        Ok(Netns {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the calling thread while it is inside this namespace. `f` must not yield
    /// or block for long: it runs on whatever thread called us (usually a runtime worker).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let host = HOST
            .get()
            .ok_or_else(|| io::Error::other("host netns not recorded"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        if let Err(e) = setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's namespace would open later sockets in the
            // wrong place; nothing sane can continue from there.
            eprintln!("fatal: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
        Ok(result)
    }

    /// A TCP/IPv4 socket of this namespace, not yet bound or connected.
    pub fn tcp_socket(&self) -> io::Result<socket2::Socket> {
        self.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))?
    }
}
