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
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::proxy::sniff::{ClientHello, Verdict};

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

#[derive(Default)]
pub struct ConnTable {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<u64, Entry>,
    closed: VecDeque<ConnRecord>,
}

impl ConnTable {
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

    pub fn set_close_reason(&mut self, reason: impl Into<String>) {
        self.close_reason = Some(reason.into());
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        if let Some(entry) = inner.live.remove(&self.id) {
            let mut record = entry.current();
            record.close_reason = Some(self.close_reason.take().unwrap_or_else(|| "closed".into()));
            if inner.closed.len() == CLOSED_KEPT {
                inner.closed.pop_front();
            }
            inner.closed.push_back(record);
        }
    }
}
