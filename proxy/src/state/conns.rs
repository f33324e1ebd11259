//! The table of live proxied connections, for `shunt conns`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

/// What a connection was detected as and how it is forwarded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Opaque,
}

/// One live connection as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRecord {
    pub id: u64,
    pub pod: String,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub protocol: Protocol,
    pub started: SystemTime,
    pub age_ms: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

struct Entry {
    record: ConnRecord,
    since: Instant,
    bytes_from_client: Arc<AtomicU64>,
    bytes_to_client: Arc<AtomicU64>,
}

#[derive(Default)]
pub struct ConnTable {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

impl ConnTable {
    /// Registers a connection; it stays listed until the guard is dropped.
    pub fn open(
        self: &Arc<Self>,
        pod: &str,
        client: SocketAddr,
        original_dst: SocketAddr,
        protocol: Protocol,
    ) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes_from_client = Arc::new(AtomicU64::new(0));
        let bytes_to_client = Arc::new(AtomicU64::new(0));
        let entry = Entry {
            record: ConnRecord {
                id,
                pod: pod.to_owned(),
                client,
                original_dst,
                upstream: None,
                protocol,
                started: SystemTime::now(),
                age_ms: 0,
                bytes_from_client: 0,
                bytes_to_client: 0,
            },
            since: Instant::now(),
            bytes_from_client: bytes_from_client.clone(),
            bytes_to_client: bytes_to_client.clone(),
        };
        self.lock().insert(id, entry);
        ConnGuard {
            table: self.clone(),
            id,
            bytes_from_client,
            bytes_to_client,
        }
    }

    pub fn snapshot(&self) -> Vec<ConnRecord> {
        let live = self.lock();
        let mut records: Vec<ConnRecord> = live
            .values()
            .map(|e| ConnRecord {
                age_ms: e.since.elapsed().as_millis() as u64,
                bytes_from_client: e.bytes_from_client.load(Ordering::Relaxed),
                bytes_to_client: e.bytes_to_client.load(Ordering::Relaxed),
                ..e.record.clone()
            })
            .collect();
        records.sort_by_key(|r| r.id);
        records
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic elsewhere while holding the lock leaves the map itself consistent.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Removes the connection from the table when the connection's task ends, however it ends.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    pub bytes_from_client: Arc<AtomicU64>,
    pub bytes_to_client: Arc<AtomicU64>,
}

impl ConnGuard {
    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Some(entry) = self.table.lock().get_mut(&self.id) {
            entry.record.upstream = Some(upstream);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}
