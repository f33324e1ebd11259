//! The proxy's own counters (the programs keep theirs in a per-CPU map).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Default)]
        pub struct ProxyCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl ProxyCounters {
            pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
                BTreeMap::from([$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*])
            }
        }
    };
}

counters! {
    /// Connections accepted on in-pod listeners.
    accepted,
    /// Accepted connections with no original destination recorded: not redirected by us
    /// (someone dialled the listener directly), so they are closed.
    no_original_dst,
    /// Connections forwarded to their upstream.
    forwarded,
    /// Upstream connects that failed; the client is reset.
    upstream_connect_failed,
    /// Connections that ended with an I/O error rather than a clean close.
    forward_errors,
    /// Bytes proxied from clients to upstreams.
    bytes_from_clients,
    /// Bytes proxied from upstreams to clients.
    bytes_to_clients,
    /// accept() errors (e.g. out of file descriptors).
    accept_errors,
}

impl ProxyCounters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
