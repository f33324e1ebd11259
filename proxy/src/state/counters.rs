//! The proxy's own counters (the programs keep theirs in a per-CPU map).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use super::Verdict;

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
    /// Forwarded connections that ended with an I/O error other than a reset (e.g. a
    /// timeout); the other side is reset.
    forward_errors,
    /// Bytes proxied from clients to upstreams.
    bytes_from_clients,
    /// Bytes proxied from upstreams to clients.
    bytes_to_clients,
    /// accept() errors (e.g. out of file descriptors); the accept loop backs off and retries.
    accept_errors,
    /// Connections reset on accept because `limits.max_connections` were open on the node.
    refused_node_limit,
    /// Connections reset on accept because `limits.max_connections_per_pod` were open from
    /// their pod.
    refused_pod_limit,
    /// Detection verdicts.
    verdict_h2,
    verdict_tls,
    verdict_opaque,
    verdict_server_first,
    verdict_timeout,
    verdict_skipped,
    /// Connections connect() sent past the proxy (reported by sock_ops).
    verdict_kernel_path,
    /// A Service endpoint refused or timed out and the next one was tried.
    endpoint_failovers,
    /// Resets passed on: from the client to the upstream, and the other way.
    client_resets,
    upstream_resets,
    /// Connections closed after `idle_timeout` without traffic.
    idle_timeouts,
    /// Connections forwarded in the kernel (`forwarding: sockmap`).
    sockmap_forwarded,
    /// `forwarding: sockmap` connections spliced instead (the record says why).
    sockmap_fallbacks,
    /// HTTP/2 streams accepted from clients.
    h2_streams,
    /// HTTP/2 streams answered UNAVAILABLE (503) because no upstream could take them.
    h2_unavailable,
    /// HTTP/2 streams ended by a reset from either side.
    h2_stream_resets,
    /// HTTP/2 client connections closed for not completing a request within
    /// `http2.header_timeout`.
    h2_header_timeouts,
    /// HTTP/2 client connections closed after `http2.idle_timeout` without a stream.
    h2_idle_timeouts,
    /// Upstream HTTP/2 connections that joined a pool: dialled for a stream, or dialled
    /// during detection and adopted.
    h2_upstreams_opened,
    /// Upstream HTTP/2 connections that ended, for whatever reason.
    h2_upstreams_closed,
    /// … of which shunt closed because nothing used them: idle past
    /// `http2.upstream_idle_timeout`, beyond `http2.upstream_max_idle`, to an endpoint that
    /// left its Service, or of a pod no longer enrolled.
    h2_upstreams_retired,
    /// Connections dialled during detection that the pool did not need (it had room on a
    /// connection to that endpoint already), closed at once.
    h2_upstreams_not_adopted,
}

impl ProxyCounters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn verdict(&self, verdict: Verdict) -> &AtomicU64 {
        match verdict {
            Verdict::H2 => &self.verdict_h2,
            Verdict::Tls => &self.verdict_tls,
            Verdict::Opaque => &self.verdict_opaque,
            Verdict::ServerFirst => &self.verdict_server_first,
            Verdict::Timeout => &self.verdict_timeout,
            Verdict::Skipped => &self.verdict_skipped,
            Verdict::KernelPath => &self.verdict_kernel_path,
        }
    }
}
