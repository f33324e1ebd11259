//! `GET /status`: the daemon, its datapath, limits and, in Kubernetes mode, its API watches.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub attachment: Attachment,
    pub listen_port: u16,
    pub fail_mode: FailMode,
    /// `intercept.local_fast_path`: `off`, `on`, or `unavailable (<why>)` when the kernel
    /// refused the program and connections take the TCP path.
    #[serde(default)]
    pub local_fast_path: String,
    /// Sockets on the local fast path now (two per open connection).
    #[serde(default)]
    pub local_fast_path_sockets: u64,
    /// The kernel and which of the optional features it has.
    #[serde(default)]
    pub kernel: KernelStatus,
    pub pods: usize,
    pub connections: usize,
    pub services: usize,
    pub fault_rules: usize,
    /// Where `/metrics` and `/live`, `/ready` are served, if they are.
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    /// `ready`, or why not.
    pub ready: String,
    /// `off`, `stdout`, `stderr` or the file.
    pub access_log: String,
    /// The diagnostic log's filter in force.
    pub log_filter: String,
    /// The daemon's open-file limit now; `None` if it could not be read.
    #[serde(default)]
    pub open_files: Option<OpenFiles>,
    /// `limits.max_connections` and `limits.max_connections_per_pod` in force: as
    /// configured, or sized to the open-file limit.
    #[serde(default)]
    pub max_connections: usize,
    #[serde(default)]
    pub max_connections_per_pod: usize,
    /// Kubernetes mode only: the node and the state of each API watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesStatus>,
}

/// The kernel the daemon runs on and its optional features.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// `uname -r`.
    pub release: String,
    pub features: Vec<KernelFeature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeature {
    /// `local_fast_path`, `sockmap_forwarding`, `netns_cookie_sockopt`.
    pub name: String,
    pub available: bool,
    /// The kernel that has it, and what it is.
    pub needs: String,
}

/// Whether the links were created now or taken over from a previous daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    Attached,
    TookOverPinned,
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attachment::Attached => "attached now",
            Attachment::TookOverPinned => "taken over from pinned links",
        })
    }
}

/// `intercept.fail_mode`: what enrolled pods' connections do while no daemon runs.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// shunt down: enrolled pods' connections go direct.
    #[default]
    Open,
    /// shunt down: enrolled pods' connections are refused.
    Closed,
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

/// The daemon's open-file limit (`RLIMIT_NOFILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFiles {
    /// The limit in force: `open()`, `accept()` and `socket()` fail with `EMFILE` beyond it.
    pub soft: u64,
    /// How far the soft limit may be raised without `CAP_SYS_RESOURCE`.
    pub hard: u64,
}

/// Kubernetes mode: the node and the state of each API watch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubernetesStatus {
    pub node: String,
    /// Every watch has listed its objects and none is failing.
    pub connected: bool,
    pub watches: Vec<WatchStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchStatus {
    pub resource: String,
    /// Has had a complete list at least once.
    pub synced: bool,
    /// The last error while it keeps failing; `None` once it works again.
    pub error: Option<String>,
    pub failing_secs: u64,
}
