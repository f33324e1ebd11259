//! `GET /conns`, `/conns/closed` and `/streams`: proxied connections and HTTP/2 streams.

use std::{net::SocketAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

/// One connection, live or closed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRecord {
    pub id: u64,
    pub pod: String,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    /// The Service whose virtual address was dialled, if any.
    pub service: Option<String>,
    pub upstream: Option<SocketAddr>,
    /// `None` while still detecting.
    pub verdict: Option<Verdict>,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    pub started: SystemTime,
    pub duration_ms: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// How an opaque connection's bytes move: `splice`, `copy`, `sockmap`, or
    /// `splice (sockmap: <why not>)`. `None` for HTTP/2 and before forwarding starts.
    #[serde(default)]
    pub forwarding: Option<String>,
    /// `None` while open.
    pub close_reason: Option<String>,
    /// Envoy-style response flags: `DI`/`FI` connect delay/reset injected, `UF` no
    /// upstream reachable, `UH` a Service without endpoints, `UR`/`DR` reset by the
    /// upstream/client, `SI` idle timeout.
    #[serde(default)]
    pub flags: Vec<String>,
}

impl ConnRecord {
    /// `h2`, `tls` or `opaque` once detected.
    pub fn protocol(&self) -> Option<&'static str> {
        self.verdict.map(Verdict::protocol)
    }
}

/// What a connection was detected as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The HTTP/2 client preface.
    H2,
    /// A TLS ClientHello.
    Tls,
    /// Anything else the client sent first.
    Opaque,
    /// The server spoke before the client did.
    ServerFirst,
    /// The client sent nothing decisive within `detect_timeout`.
    Timeout,
    /// The destination port is configured as opaque: not sniffed at all.
    Skipped,
    /// Not through the proxy: connect() sent it straight to an endpoint.
    KernelPath,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::H2 => "h2",
            Verdict::Tls => "tls",
            Verdict::Opaque => "opaque",
            Verdict::ServerFirst => "server-first",
            Verdict::Timeout => "timeout",
            Verdict::Skipped => "skipped",
            Verdict::KernelPath => "kernel-path",
        }
    }

    /// How the connection is handled: `h2` (terminated, balanced per stream), `tls` or
    /// `opaque` (everything else forwarded byte for byte).
    pub fn protocol(self) -> &'static str {
        match self {
            Verdict::H2 => "h2",
            Verdict::Tls => "tls",
            Verdict::Opaque
            | Verdict::ServerFirst
            | Verdict::Timeout
            | Verdict::Skipped
            | Verdict::KernelPath => "opaque",
        }
    }
}

/// One HTTP/2 stream: what was asked, where it went, how it ended and which faults applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    pub started: SystemTime,
    pub duration_ms: u64,
    pub pod: String,
    /// The client's address as shunt's listener saw it.
    #[serde(default)]
    pub client: Option<SocketAddr>,
    pub original_dst: SocketAddr,
    pub service: Option<String>,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub upstream: Option<SocketAddr>,
    pub status: Option<u16>,
    pub grpc_status: Option<String>,
    /// Envoy-style: `DI` delay injected, `FI` abort injected, `UF` no upstream reachable,
    /// `UR` upstream reset, `DR` downstream (client) reset.
    pub flags: Vec<String>,
    pub fault_rule: Option<String>,
    /// The request's `content-type` was `application/grpc…`.
    #[serde(default)]
    pub grpc: bool,
    /// The request's `x-request-id`, if it had one.
    #[serde(default)]
    pub request_id: Option<String>,
    /// DATA bytes from the client, and to it.
    #[serde(default)]
    pub bytes_received: u64,
    #[serde(default)]
    pub bytes_sent: u64,
}
