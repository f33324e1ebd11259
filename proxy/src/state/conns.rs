//! The table of proxied connections, for `shunt conns`: the live ones, and the most recent
//! closed ones (bounded), so what a connection was detected as and how it ended can be seen
//! after it is gone.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{ClientHello, Observer, Unobserved, Verdict};

/// Closed connections kept for inspection.
const CLOSED_KEPT: usize = 1024;

/// One connection as the admin API shows it.
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

/// Bytes proxied for one Service (or none) and protocol, closed and live connections
/// together: a counter that only ever grows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteTotal {
    pub service: Option<String>,
    /// `h2`, `tls`, `opaque`, or `unknown` for connections that ended while detecting.
    pub protocol: &'static str,
    pub from_client: u64,
    pub to_client: u64,
}

/// Bytes the kernel moves on a connection's behalf (`forwarding: sockmap`), read only when
/// the table is listed, so counting them costs the data path nothing.
#[derive(Default)]
pub struct KernelBytes(Mutex<Option<KernelBytesSource>>);

/// Returns (from client, to client).
pub type KernelBytesSource = Box<dyn Fn() -> (u64, u64) + Send + Sync>;

impl KernelBytes {
    pub fn set(&self, source: KernelBytesSource) {
        *self.lock() = Some(source);
    }

    pub fn clear(&self) {
        *self.lock() = None;
    }

    fn read(&self) -> (u64, u64) {
        self.lock().as_ref().map_or((0, 0), |source| source())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<KernelBytesSource>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Entry {
    record: ConnRecord,
    since: Instant,
    bytes_from_client: Arc<AtomicU64>,
    bytes_to_client: Arc<AtomicU64>,
    kernel_bytes: Arc<KernelBytes>,
}

impl Entry {
    fn current(&self) -> ConnRecord {
        let (kernel_from, kernel_to) = self.kernel_bytes.read();
        ConnRecord {
            duration_ms: self.since.elapsed().as_millis() as u64,
            bytes_from_client: self.bytes_from_client.load(Ordering::Relaxed) + kernel_from,
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed) + kernel_to,
            ..self.record.clone()
        }
    }
}

pub struct ConnTable {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
    observer: Arc<dyn Observer>,
}

impl Default for ConnTable {
    fn default() -> Self {
        ConnTable::new(Arc::new(Unobserved))
    }
}

type ByteKey = (Option<String>, &'static str);

#[derive(Default)]
struct Inner {
    live: HashMap<u64, Entry>,
    closed: VecDeque<ConnRecord>,
    /// Bytes of every closed connection, so totals stay exact when records leave the ring.
    closed_bytes: HashMap<ByteKey, (u64, u64)>,
}

fn byte_key(record: &ConnRecord) -> ByteKey {
    (
        record.service.clone(),
        record.protocol().unwrap_or("unknown"),
    )
}

impl ConnTable {
    pub fn new(observer: Arc<dyn Observer>) -> ConnTable {
        ConnTable {
            next_id: AtomicU64::new(0),
            inner: Mutex::default(),
            observer,
        }
    }

    /// Registers a connection; it is live until the guard is dropped.
    pub fn open(
        self: &Arc<Self>,
        pod: &str,
        client: SocketAddr,
        original_dst: SocketAddr,
        service: Option<&str>,
    ) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes_from_client = Arc::new(AtomicU64::new(0));
        let bytes_to_client = Arc::new(AtomicU64::new(0));
        let kernel_bytes = Arc::new(KernelBytes::default());
        let entry = Entry {
            record: ConnRecord {
                id,
                pod: pod.to_owned(),
                client,
                original_dst,
                service: service.map(str::to_owned),
                upstream: None,
                verdict: None,
                sni: None,
                alpn: Vec::new(),
                started: SystemTime::now(),
                duration_ms: 0,
                bytes_from_client: 0,
                bytes_to_client: 0,
                forwarding: None,
                close_reason: None,
                flags: Vec::new(),
            },
            since: Instant::now(),
            bytes_from_client: bytes_from_client.clone(),
            bytes_to_client: bytes_to_client.clone(),
            kernel_bytes: kernel_bytes.clone(),
        };
        self.lock().live.insert(id, entry);
        ConnGuard {
            table: self.clone(),
            id,
            close_reason: None,
            ended_ago: Duration::ZERO,
            bytes_from_client,
            bytes_to_client,
            kernel_bytes,
        }
    }

    pub fn live(&self) -> Vec<ConnRecord> {
        let inner = self.lock();
        let mut records: Vec<ConnRecord> = inner.live.values().map(Entry::current).collect();
        records.sort_by_key(|r| r.id);
        records
    }

    /// The most recently closed connections, oldest first.
    pub fn closed(&self) -> Vec<ConnRecord> {
        self.lock().closed.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// Bytes proxied so far, by Service and protocol, live connections included.
    pub fn byte_totals(&self) -> Vec<ByteTotal> {
        let inner = self.lock();
        let mut totals = inner.closed_bytes.clone();
        for entry in inner.live.values() {
            let total = totals.entry(byte_key(&entry.record)).or_default();
            total.0 += entry.bytes_from_client.load(Ordering::Relaxed);
            total.1 += entry.bytes_to_client.load(Ordering::Relaxed);
        }
        let mut totals: Vec<ByteTotal> = totals
            .into_iter()
            .map(
                |((service, protocol), (from_client, to_client))| ByteTotal {
                    service,
                    protocol,
                    from_client,
                    to_client,
                },
            )
            .collect();
        totals.sort_by(|a, b| (&a.service, a.protocol).cmp(&(&b.service, b.protocol)));
        totals
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ConnRecord)) {
        if let Some(entry) = self.lock().live.get_mut(&id) {
            f(&mut entry.record);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the maps themselves consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The connection's handle on its record; moves the record to the closed list when the
/// connection's task ends, however it ends.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    close_reason: Option<String>,
    /// How long before the guard's drop the connection really ended.
    ended_ago: Duration,
    pub bytes_from_client: Arc<AtomicU64>,
    pub bytes_to_client: Arc<AtomicU64>,
    pub kernel_bytes: Arc<KernelBytes>,
}

impl ConnGuard {
    pub fn set_forwarding(&self, forwarding: impl Into<String>) {
        let forwarding = forwarding.into();
        self.table
            .update(self.id, |r| r.forwarding = Some(forwarding));
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.table.update(self.id, |r| r.upstream = Some(upstream));
    }

    pub fn set_verdict(&self, verdict: Verdict, hello: Option<&ClientHello>) {
        self.table.update(self.id, |r| {
            r.verdict = Some(verdict);
            if let Some(hello) = hello {
                r.sni = hello.sni.clone();
                r.alpn = hello.alpn.clone();
            }
        });
    }

    /// The connection started `ago` before it was registered: its start was reported late.
    pub fn started_ago(&self, ago: Duration) {
        if let Some(entry) = self.table.lock().live.get_mut(&self.id) {
            entry.since = entry.since.checked_sub(ago).unwrap_or(entry.since);
            let started = entry.record.started;
            entry.record.started = started.checked_sub(ago).unwrap_or(started);
        }
    }

    /// The connection ended `ago` before the guard is dropped: its end was reported late.
    pub fn ended_ago(&mut self, ago: Duration) {
        self.ended_ago = ago;
    }

    pub fn set_close_reason(&mut self, reason: impl Into<String>) {
        self.close_reason = Some(reason.into());
    }

    /// Adds an Envoy-style response flag (once).
    pub fn flag(&self, flag: &'static str) {
        self.table.update(self.id, |r| {
            if !r.flags.iter().any(|f| f == flag) {
                r.flags.push(flag.to_owned());
            }
        });
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let record = {
            let mut inner = self.table.lock();
            let Some(entry) = inner.live.remove(&self.id) else {
                return;
            };
            let mut record = entry.current();
            let lasted = entry.since.elapsed().saturating_sub(self.ended_ago);
            record.duration_ms = lasted.as_millis() as u64;
            record.close_reason = Some(self.close_reason.take().unwrap_or_else(|| "closed".into()));
            // Moved from live to closed under one lock: a scrape never sees them twice.
            let total = inner.closed_bytes.entry(byte_key(&record)).or_default();
            total.0 += record.bytes_from_client;
            total.1 += record.bytes_to_client;
            if inner.closed.len() == CLOSED_KEPT {
                inner.closed.pop_front();
            }
            inner.closed.push_back(record.clone());
            record
        };
        self.table.observer.connection_closed(&record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_totals_count_live_and_closed_connections_and_never_go_back() {
        let table = Arc::new(ConnTable::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let guard = table.open("pod", addr, addr, Some("svc"));
        guard.set_verdict(Verdict::Tls, None);
        guard.bytes_from_client.store(100, Ordering::Relaxed);
        guard.bytes_to_client.store(7, Ordering::Relaxed);
        let live = table.byte_totals();
        assert_eq!(live.len(), 1);
        assert_eq!(
            (live[0].protocol, live[0].from_client, live[0].to_client),
            ("tls", 100, 7)
        );
        drop(guard);
        assert_eq!(table.byte_totals(), live);
        assert_eq!(table.closed().len(), 1);
        let other = table.open("pod", addr, addr, None);
        other.bytes_from_client.store(5, Ordering::Relaxed);
        let totals = table.byte_totals();
        assert_eq!(totals.len(), 2, "{totals:?}");
        assert!(totals.contains(&ByteTotal {
            service: None,
            protocol: "unknown",
            from_client: 5,
            to_client: 0,
        }));
    }
}
