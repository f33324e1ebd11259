//! Shared, observable state: live connections and the proxy's counters. The proxy writes it,
//! the admin API reads it; nothing else does.

mod conns;
mod counters;

pub use conns::{ConnGuard, ConnRecord, ConnTable};
pub use counters::ProxyCounters;
