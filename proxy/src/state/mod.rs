//! Shared, observable state: live connections, recent streams and the proxy's counters. The
//! proxy writes it; the admin API and telemetry read it, and an [`Observer`] hears of every
//! connection and stream as it ends.

mod conns;
mod counters;
mod streams;

use std::time::Duration;

pub use conns::{ConnGuard, ConnRecord, ConnTable, KernelBytes};
pub use counters::ProxyCounters;
pub use streams::{Recording, StreamLog, StreamRecord};

/// Told of each finished connection and stream (metrics, access log). Called on the data
/// path, outside any lock: implementations must not block.
pub trait Observer: Send + Sync {
    fn connection_closed(&self, record: &ConnRecord);
    fn stream_ended(&self, record: &StreamRecord, elapsed: Duration);
}

/// For tables that nobody watches (unit tests).
pub struct Unobserved;

impl Observer for Unobserved {
    fn connection_closed(&self, _: &ConnRecord) {}
    fn stream_ended(&self, _: &StreamRecord, _: Duration) {}
}
