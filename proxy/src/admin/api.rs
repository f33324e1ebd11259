//! Request and response bodies of the admin API.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{bpf::Attachment, config::FailMode, open_files::OpenFiles};

pub use crate::{
    fault::RuleSummary,
    inpod::PodSummary,
    k8s::KubernetesStatus,
    route::ServiceSummary,
    state::{ConnRecord, StreamRecord},
};

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

/// `GET`/`PUT /log-level`: a `tracing` filter (`debug`, `info,shunt=debug`, …).
#[derive(Debug, Serialize, Deserialize)]
pub struct LogFilter {
    pub filter: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    /// What the kernel programs did, summed over CPUs.
    pub ebpf: BTreeMap<String, u64>,
    /// What the proxy did.
    pub proxy: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub name: String,
    pub netns: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Uninstalled {
    pub removed: Vec<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reloaded {
    /// Services in force after the reload.
    pub services: usize,
    /// Changed fields that take effect only when the daemon restarts.
    #[serde(default)]
    pub restart_needed: Vec<String>,
}

/// `POST /faults`: one rule or a list, as YAML or JSON text.
#[derive(Debug, Serialize, Deserialize)]
pub struct FaultsRequest {
    pub rules: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FaultsSet {
    pub set: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /handoff`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandoffRequest {
    /// The new daemon's rendezvous socket.
    pub socket: PathBuf,
    pub pid: u32,
}

/// The answer to `POST /handoff`: the running daemon will connect to the rendezvous socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandoffAccepted {
    pub pid: u32,
}
