//! `GET /faults`: the fault rules in force, where each came from and how often it applied.
//! The rule is shown as it is written (config file, `shunt faults set`, `FaultInjection`).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleSummary {
    pub rule: FaultRule,
    /// `config`, `kubernetes` or `admin`.
    pub source: String,
    pub delays: u64,
    pub aborts: u64,
    pub tcp_faults: u64,
    pub overflow: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: FaultMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
    /// Faults for connections forwarded as opaque TCP or TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpFault>,
    /// Let requests ask for a delay or abort with `x-shunt-fault-*` headers.
    #[serde(default)]
    pub header_control: bool,
}

/// Which streams and connections a rule applies to.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultMatch {
    /// A Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Or a destination address (a VIP, or any original destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Exact values, all of which must be present.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod: Option<String>,
}

/// `path: /pkg.Service/Method` (exact) or `path: {prefix: /pkg.Service/}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PathMatch {
    Exact(String),
    Prefix { prefix: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DelayFault {
    /// How long, e.g. `3s` or `250ms`.
    #[serde(with = "humantime_serde")]
    pub fixed: Duration,
    #[serde(default)]
    pub percentage: Percentage,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AbortFault {
    /// A gRPC status by name, e.g. `UNAVAILABLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub percentage: Percentage,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpFault {
    /// Held this long before the upstream is dialled.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect_delay: Option<Duration>,
    /// This share of connections is reset right after detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_percentage: Option<Percentage>,
}

/// A share of requests, 0–100 with decimals; 100 when omitted, as the rules' own default.
/// Not range-checked here: the daemon only reports rules it has validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Percentage(pub f64);

impl Default for Percentage {
    fn default() -> Self {
        Percentage(100.0)
    }
}
