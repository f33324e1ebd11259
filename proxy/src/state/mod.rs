//! Shared, observable state: live connections and the proxy's counters. The proxy writes it,
//! the admin API reads it; nothing else does.

mod conns;
mod counters;
mod streams;

pub use conns::{ConnGuard, ConnRecord, ConnTable, KernelBytes};
pub use counters::ProxyCounters;
pub use streams::{Recording, StreamLog, StreamRecord};
