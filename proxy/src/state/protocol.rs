//! What detection concluded about a connection: the verdict and what a TLS ClientHello
//! told, as the connection table records them. The data path decides them (`proxy::detect`,
//! `proxy::sniff`); they live here, with the table, because everything that reads the table —
//! the admin API, telemetry, the counters — needs them without the data path.

use serde::{Deserialize, Serialize};

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
    /// Not through the proxy at all: connect() sent it straight to an endpoint.
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

/// What a TLS ClientHello told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
}
