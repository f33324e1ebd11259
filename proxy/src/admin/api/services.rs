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
