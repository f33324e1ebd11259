//! The most recent HTTP/2 streams, one record each, for `shunt streams`; every record also
//! goes to the [`Observer`] (metrics, access log): what was asked, where it went, how it
//! ended and which faults (Envoy's response flags) applied.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{Observer, Unobserved};

/// Streams kept for inspection.
const KEPT: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    pub started: SystemTime,
    pub duration_ms: u64,
    pub pod: String,
    /// The client's address as shunt's listener saw it.
    #[serde(default)]
    pub client: Option<SocketAddr>,
    pub original_dst: SocketAddr,
    pub service: Option<String>,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub upstream: Option<SocketAddr>,
    pub status: Option<u16>,
    pub grpc_status: Option<String>,
    /// Envoy-style: `DI` delay injected, `FI` abort injected, `UF` no upstream reachable,
    /// `UR` upstream reset, `DR` downstream (client) reset.
    pub flags: Vec<String>,
    pub fault_rule: Option<String>,
    /// The request's `content-type` was `application/grpc…`.
    #[serde(default)]
    pub grpc: bool,
    /// The request's `x-request-id`, if it had one.
    #[serde(default)]
    pub request_id: Option<String>,
    /// DATA bytes from the client, and to it.
    #[serde(default)]
    pub bytes_received: u64,
    #[serde(default)]
    pub bytes_sent: u64,
}

impl StreamRecord {
    /// A record for a stream that starts now.
    pub fn new(pod: String, original_dst: SocketAddr, service: Option<String>) -> StreamRecord {
        StreamRecord {
            started: SystemTime::now(),
            duration_ms: 0,
            pod,
            client: None,
            original_dst,
            service,
            method: String::new(),
            path: String::new(),
            authority: String::new(),
            upstream: None,
            status: None,
            grpc_status: None,
            flags: Vec::new(),
            fault_rule: None,
            grpc: false,
            request_id: None,
            bytes_received: 0,
            bytes_sent: 0,
        }
    }
}

pub struct StreamLog {
    recent: Mutex<VecDeque<StreamRecord>>,
    observer: Arc<dyn Observer>,
}

impl Default for StreamLog {
    fn default() -> Self {
        StreamLog::new(Arc::new(Unobserved))
    }
}

impl StreamLog {
    pub fn new(observer: Arc<dyn Observer>) -> StreamLog {
        StreamLog {
            recent: Mutex::default(),
            observer,
        }
    }

    pub fn recent(&self) -> Vec<StreamRecord> {
        self.lock().iter().cloned().collect()
    }

    fn push(&self, record: StreamRecord, elapsed: Duration) {
        self.observer.stream_ended(&record, elapsed);
        let mut recent = self.lock();
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<StreamRecord>> {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A stream's record while it runs; logged when dropped, however the stream ends.
pub struct Recording {
    log: Arc<StreamLog>,
    since: Instant,
    pub record: StreamRecord,
}

impl Recording {
    pub fn start(log: Arc<StreamLog>, record: StreamRecord) -> Recording {
        Recording {
            log,
            since: Instant::now(),
            record,
        }
    }

    pub fn flag(&mut self, flag: &str) {
        self.record.flags.push(flag.to_owned());
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let elapsed = self.since.elapsed();
        self.record.duration_ms = elapsed.as_millis() as u64;
        let placeholder =
            StreamRecord::new(String::new(), SocketAddr::from(([0, 0, 0, 0], 0)), None);
        let record = std::mem::replace(&mut self.record, placeholder);
        self.log.push(record, elapsed);
    }
}
