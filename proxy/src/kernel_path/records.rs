//! Kernel-path connections in shunt's records: sock_ops reports each one when connect()
//! starts it and when it closes, and this turns the reports into the same connection records
//! the proxy keeps — live and closed in `shunt conns` (verdict `kernel-path`, flag `KP`),
//! the access log and the metrics — and counts them on their Service's endpoint.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use arc_swap::ArcSwap;
use nix::time::{ClockId, clock_gettime};
use shunt_common::{EVENT_CLOSED, EVENT_CONNECTING, KernelPathEvent, OriginalDst, TCP_SYN_SENT};

use crate::{
    bpf::KernelEvents,
    net::{canonical, from_raw},
    proxy::Settings,
    route::{DiscoveredServices, InUse, Service},
    state::{ConnGuard, ConnTable, Observer, ProxyCounters, Verdict},
};

/// Names the enrolled pod of a network namespace cookie.
pub type PodNames = Box<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// Told of each kernel-path connect that failed, so that its endpoint leaves the path.
pub type OnConnectFailed = Box<dyn Fn() + Send + Sync>;

/// Connections open at once that are tracked; past it (close reports lost), the oldest
/// half is dropped.
const OPEN_MAX: usize = 65536;

/// Turns the programs' reports into connection records.
pub struct Recorder {
    pub conns: Arc<ConnTable>,
    pub observer: Arc<dyn Observer>,
    pub counters: Arc<ProxyCounters>,
    pub settings: Arc<ArcSwap<Settings>>,
    pub discovered: Arc<DiscoveredServices>,
    pub pods: PodNames,
    pub connect_failed: OnConnectFailed,
}

struct Open {
    guard: ConnGuard,
    /// Counts the connection as active on its endpoint until dropped.
    _on_endpoint: Option<InUse>,
    service: Option<Arc<Service>>,
    seq: u64,
}

impl Recorder {
    /// Reads reports until the ring fails (the daemon is stopping).
    pub async fn run(self, events: KernelEvents) {
        let mut ring = match events.register() {
            Ok(ring) => ring,
            Err(e) => {
                tracing::warn!("kernel path: connections will not be recorded: {e}");
                return;
            }
        };
        let mut open: HashMap<u64, Open> = HashMap::new();
        let mut seq = 0;
        let mut batch = Vec::new();
        loop {
            if let Err(e) = KernelEvents::next_batch(&mut ring, &mut batch).await {
                tracing::warn!("kernel path: reading reports: {e}");
                return;
            }
            for event in batch.drain(..) {
                seq += 1;
                self.handle(&mut open, event, seq);
            }
            if open.len() > OPEN_MAX {
                let mut ages: Vec<u64> = open.values().map(|o| o.seq).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                open.retain(|_, o| o.seq > cut);
            }
        }
    }

    fn handle(&self, open: &mut HashMap<u64, Open>, event: KernelPathEvent, seq: u64) {
        match event.kind {
            EVENT_CONNECTING => {
                let connection = self.opened(&event, seq);
                open.insert(event.socket_cookie, connection);
            }
            EVENT_CLOSED => {
                // A connection that started before this daemon did is not recorded.
                if let Some(connection) = open.remove(&event.socket_cookie) {
                    self.closed(connection, &event);
                }
            }
            _ => {}
        }
    }

    fn opened(&self, event: &KernelPathEvent, seq: u64) -> Open {
        let original = socket_addr(&event.original);
        let remote = socket_addr(&event.remote);
        let service = self.service(original);
        let name = service.as_ref().map(|s| s.name.as_str());
        let pod = (self.pods)(event.netns_cookie)
            .unwrap_or_else(|| format!("netns:{}", event.netns_cookie));
        let guard = self
            .conns
            .open(&pod, socket_addr(&event.local), original, name);
        guard.started_ago(age(event));
        guard.set_verdict(Verdict::KernelPath, None);
        guard.set_upstream(remote);
        guard.set_forwarding("kernel path");
        guard.flag("KP");
        ProxyCounters::inc(self.counters.verdict(Verdict::KernelPath));
        self.observer.connection_opened(name, Verdict::KernelPath);
        let on_endpoint = service
            .as_ref()
            .and_then(|s| s.endpoint(remote))
            .map(|e| e.connection());
        Open {
            guard,
            _on_endpoint: on_endpoint,
            service,
            seq,
        }
    }

    fn closed(&self, mut connection: Open, event: &KernelPathEvent) {
        let guard = &mut connection.guard;
        guard.ended_ago(age(event));
        let (sent, received) = payload_bytes(event);
        guard.bytes_from_client.store(sent, Ordering::Relaxed);
        guard.bytes_to_client.store(received, Ordering::Relaxed);
        if event.old_state == TCP_SYN_SENT {
            guard.flag("UF");
            guard.set_close_reason("connect-failed");
            let remote = socket_addr(&event.remote);
            if let Some(endpoint) = connection.service.as_ref().and_then(|s| s.endpoint(remote)) {
                endpoint.failed.fetch_add(1, Ordering::Relaxed);
            }
            (self.connect_failed)();
        } else {
            guard.set_close_reason("closed");
        }
        let counters = &self.counters;
        counters
            .bytes_from_clients
            .fetch_add(sent, Ordering::Relaxed);
        counters
            .bytes_to_clients
            .fetch_add(received, Ordering::Relaxed);
    }

    fn service(&self, original: SocketAddr) -> Option<Arc<Service>> {
        let settings = self.settings.load();
        settings
            .routes
            .lookup(original)
            .or_else(|| self.discovered.lookup(original))
    }
}

/// TCP states a socket may close from (`include/net/tcp_states.h`).
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// Payload bytes (sent and acknowledged, received) of a closed connection. The kernel's
/// counts move with the sequence numbers, which the SYN and each FIN take one of: the state
/// the socket closed from tells which of them it saw.
fn payload_bytes(event: &KernelPathEvent) -> (u64, u64) {
    let state = event.old_state;
    let syn_acked = state != TCP_SYN_SENT;
    let own_fin_acked = matches!(
        state,
        TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_LAST_ACK | TCP_CLOSING
    );
    let peer_fin = matches!(
        state,
        TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING
    );
    let sent = event
        .bytes_acked
        .saturating_sub(u64::from(syn_acked) + u64::from(own_fin_acked));
    let received = event.bytes_received.saturating_sub(u64::from(peer_fin));
    (sent, received)
}

/// How long ago the program reported the event (the ring is read on a timer).
fn age(event: &KernelPathEvent) -> Duration {
    // bpf_ktime_get_ns() reads CLOCK_MONOTONIC.
    let Ok(now) = clock_gettime(ClockId::CLOCK_MONOTONIC) else {
        return Duration::ZERO;
    };
    Duration::from(now).saturating_sub(Duration::from_nanos(event.time_ns))
}

fn socket_addr(dst: &OriginalDst) -> SocketAddr {
    canonical(SocketAddr::new(from_raw(dst.addr), dst.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(old_state: u8, bytes_acked: u64, bytes_received: u64) -> KernelPathEvent {
        KernelPathEvent {
            kind: EVENT_CLOSED,
            old_state,
            bytes_acked,
            bytes_received,
            ..KernelPathEvent::default()
        }
    }

    #[test]
    fn payload_leaves_out_the_syn_and_fins_the_socket_saw() {
        // Closed first, both FINs exchanged: SYN + FIN acknowledged, the peer's FIN received.
        assert_eq!(payload_bytes(&closed(TCP_FIN_WAIT2, 102, 51)), (100, 50));
        // The peer closed first.
        assert_eq!(payload_bytes(&closed(TCP_LAST_ACK, 102, 51)), (100, 50));
        // Reset while established: only the SYN.
        assert_eq!(payload_bytes(&closed(1, 101, 50)), (100, 50));
        // Refused: nothing.
        assert_eq!(payload_bytes(&closed(TCP_SYN_SENT, 0, 0)), (0, 0));
    }
}
