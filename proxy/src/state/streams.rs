//! The most recent HTTP/2 streams, one record each, for `shunt streams` and the access log
//! that will read them: what was asked, where it went, how it ended and which faults (Envoy's
//! response flags) applied.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Streams kept for inspection.
const KEPT: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    pub started: SystemTime,
    pub duration_ms: u64,
    pub pod: String,
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
}

#[derive(Default)]
pub struct StreamLog {
    recent: Mutex<VecDeque<StreamRecord>>,
}

impl StreamLog {
    pub fn recent(&self) -> Vec<StreamRecord> {
        self.lock().iter().cloned().collect()
    }

    fn push(&self, record: StreamRecord) {
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
        self.record.duration_ms = self.since.elapsed().as_millis() as u64;
        let record = std::mem::replace(
            &mut self.record,
            StreamRecord {
                started: SystemTime::UNIX_EPOCH,
                duration_ms: 0,
                pod: String::new(),
                original_dst: SocketAddr::from(([0, 0, 0, 0], 0)),
                service: None,
                method: String::new(),
                path: String::new(),
                authority: String::new(),
                upstream: None,
                status: None,
                grpc_status: None,
                flags: Vec::new(),
                fault_rule: None,
            },
        );
        self.log.push(record);
    }
}
