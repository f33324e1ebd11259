//! Request and response bodies of the admin API: the daemon and the CLI agree on these and
//! nothing else, so they import nothing from the crate. A domain type can change without
//! changing what clients read; the server converts (`super::convert`). `GET /config` is the
//! exception: it answers with the configuration itself, whose shape is the config file's.

mod faults;
mod services;
mod status;
mod traffic;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use faults::{
    AbortFault, DelayFault, FaultMatch, FaultRule, PathMatch, Percentage, RuleSummary, TcpFault,
};
pub use services::{EndpointSummary, KernelPathEntry, KernelPathSummary, ServiceSummary};
pub use status::{
    Attachment, FailMode, KernelFeature, KernelStatus, KubernetesStatus, OpenFiles, Status,
    WatchStatus,
};
pub use traffic::{ConnRecord, StreamRecord, Verdict};

/// An enrolled pod (`GET /pods`, and the answer to `POST /pods`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodSummary {
    pub name: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub listeners: Vec<SocketAddr>,
}

/// The answer to `DELETE /pods/<name>` and `DELETE /faults/<name>`: `{}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Done {}

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
