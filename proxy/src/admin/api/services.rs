//! `GET /services`: each Service's virtual address and its endpoints' load.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub vip: SocketAddr,
    pub endpoints: Vec<EndpointSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointSummary {
    pub addr: SocketAddr,
    /// Gets new streams and connections; `false`: removed, finishing what it has.
    pub in_rotation: bool,
    pub streams_active: u64,
    pub streams_total: u64,
    pub connections_active: u64,
    pub connections_total: u64,
    /// Connects to it that failed.
    pub failed: u64,
    /// shunt's pooled HTTP/2 connections to it, open now.
    #[serde(default)]
    pub upstreams_open: u64,
}

/// `GET /kernel-path`: the destinations connect() sends past the proxy, and why.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelPathSummary {
    /// `intercept.kernel_path`: `off`, `declared` or `learned`.
    pub mode: String,
    pub destinations: Vec<KernelPathEntry>,
    /// Destination ports whose connections take the kernel path unless listed above.
    pub ports: Vec<u16>,
    /// Why the kernel's maps could not be written, if they could not.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelPathEntry {
    pub destination: SocketAddr,
    pub service: Option<String>,
    /// `declared tls`, `declared tcp`, `opaque port`, `learned: tls`, …
    pub reason: String,
    /// `kernel`, or `proxy (…)` with what keeps it there (a fault rule, no endpoint).
    pub path: String,
    /// The endpoints connect() picks from in turn; none: the destination itself.
    pub endpoints: Vec<SocketAddr>,
    /// One connection in this many still goes through the proxy (0: none).
    pub sample_every: u32,
}
