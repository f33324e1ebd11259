//! Shared, observable state: live connections (with what detection concluded about each),
//! recent streams, the proxy's counters and the destinations learned to carry only opaque
//! TCP. The proxy writes it; the admin API, telemetry and the kernel path read it, and an
//! [`Observer`] hears of every connection and stream as it ends.

mod conns;
mod counters;
pub mod learned;
mod protocol;
mod streams;

use std::{net::SocketAddr, time::Duration};

pub use conns::{ConnGuard, ConnRecord, ConnTable, KernelBytes};
pub use counters::ProxyCounters;
pub use learned::Learner;
pub use protocol::{ClientHello, Verdict};
pub use streams::{Recording, StreamLog, StreamRecord};

/// Told of each connection once detection has classified it, of each finished connection
/// and stream, and of connections with nowhere to go (metrics, access log). Called on the
/// data path, outside any lock: implementations must not block.
pub trait Observer: Send + Sync {
    fn connection_opened(&self, service: Option<&str>, verdict: Verdict);
    fn connection_closed(&self, record: &ConnRecord);
    fn stream_ended(&self, record: &StreamRecord, elapsed: Duration);
    /// An accepted connection without an original destination, closed at once (Envoy's
    /// `NR`).
    fn unrouted(&self, pod: &str, client: SocketAddr);
}

/// For tables that nobody watches (unit tests).
pub struct Unobserved;

impl Observer for Unobserved {
    fn connection_opened(&self, _: Option<&str>, _: Verdict) {}
    fn connection_closed(&self, _: &ConnRecord) {}
    fn stream_ended(&self, _: &StreamRecord, _: Duration) {}
    fn unrouted(&self, _: &str, _: SocketAddr) {}
}
