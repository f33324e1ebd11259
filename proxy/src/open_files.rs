//! The process's open-file limit (`RLIMIT_NOFILE`): raised at start-up, read by the daemon
//! to size its connection limits and reported by `shunt status` and `/metrics`.

use serde::{Deserialize, Serialize};

/// The process's open-file limit (`RLIMIT_NOFILE`), as `shunt status` and `/metrics` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFiles {
    /// The limit in force: `open()`, `accept()` and `socket()` fail with `EMFILE` beyond it.
    pub soft: u64,
    /// How far the soft limit may be raised without `CAP_SYS_RESOURCE`.
    pub hard: u64,
}

impl OpenFiles {
    /// The limit now; `None` if it cannot be read.
    pub fn now() -> Option<OpenFiles> {
        use nix::sys::resource::{Resource, getrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        Some(OpenFiles { soft, hard })
    }
}

/// Every proxied connection holds two sockets: a node's worth of connections needs far more
/// descriptors than the usual soft limit of 1024. As HAProxy and Envoy do, raise the limit
/// as far as the kernel allows (`fs.nr_open`, with CAP_SYS_RESOURCE), or at least the soft
/// limit to the hard one; the daemon then sizes its connection limits to what was got.
pub fn raise() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let wanted = nr_open.max(hard);
    let raised = setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted)
        .map(|()| wanted)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard));
    match raised {
        Ok(limit) => tracing::debug!(from = soft, to = limit, "raised the open-file limit"),
        Err(e) => tracing::warn!(soft, hard, "could not raise the open-file limit: {e}"),
    }
}
