//! The access log: one JSON line per HTTP/2 stream and per opaque/TLS connection.
//!
//! The data path only hands a finished record to a bounded channel (never waiting: a full
//! channel drops the record and counts it); a thread of its own formats and writes the
//! lines, flushing whenever it has caught up.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::SystemTime,
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::{TelemetryError, labels};
use crate::{
    config::AccessLog,
    state::{ConnRecord, StreamRecord},
};

/// A finished stream or connection, as the data path hands it over.
pub enum Entry {
    Stream(Box<StreamRecord>),
    Connection(Box<ConnRecord>),
    /// Accepted without an original destination, and closed.
    Unrouted {
        at: SystemTime,
        pod: String,
        client: SocketAddr,
    },
}

pub struct Sender {
    tx: SyncSender<Entry>,
    dropped: Counter,
}

impl Sender {
    pub fn send(&self, entry: Entry) {
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Opens the destination and starts the writer; `None` when the log is off.
pub fn start(
    destination: &AccessLog,
    capacity: usize,
    lines: Counter,
    dropped: Counter,
) -> Result<Option<Sender>, TelemetryError> {
    let out: Box<dyn Write + Send> = match destination {
        AccessLog::Off => return Ok(None),
        AccessLog::Stdout => Box::new(io::stdout()),
        AccessLog::Stderr => Box::new(io::stderr()),
        AccessLog::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .map_err(|source| TelemetryError::AccessLog {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let (tx, rx) = sync_channel(capacity);
    let writer_dropped = dropped.clone();
    std::thread::Builder::new()
        .name("shunt-access-log".into())
        .spawn(move || write_lines(rx, out, &lines, &writer_dropped))
        .map_err(|source| TelemetryError::Thread {
            what: "access log",
            source,
        })?;
    Ok(Some(Sender { tx, dropped }))
}

fn write_lines(
    rx: Receiver<Entry>,
    out: Box<dyn Write + Send>,
    lines: &Counter,
    dropped: &Counter,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut failing = false;
    // Ends when every sender is gone, i.e. with the process.
    while let Ok(first) = rx.recv() {
        let mut written = 0;
        let mut batch = 0;
        for entry in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            batch += 1;
            let mut line = match serde_json::to_vec(&Line::from(&entry)) {
                Ok(line) => line,
                Err(_) => continue,
            };
            line.push(b'\n');
            if out.write_all(&line).is_ok() {
                written += 1;
            }
        }
        match out.flush() {
            Ok(()) => {
                lines.inc_by(written);
                failing = false;
            }
            Err(e) => {
                // What was buffered is lost with the failed write; say so once per outage.
                dropped.inc_by(batch);
                if !failing {
                    tracing::warn!("access log write failed, lines are dropped: {e}");
                }
                failing = true;
                out = BufWriter::with_capacity(64 * 1024, out.into_parts().0);
            }
        }
    }
}

/// One access-log line. Every key is always present (`null` when it does not apply), so
/// consumers can rely on the shape.
#[derive(Debug, Serialize)]
struct Line<'a> {
    /// RFC 3339, UTC, milliseconds.
    start_time: String,
    duration_ms: u64,
    /// `grpc` or `http2` for a stream; `tls` or `opaque` for a connection; `null` for one
    /// that ended before detection decided.
    protocol: Option<&'static str>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    authority: Option<&'a str>,
    response_code: Option<u16>,
    grpc_status: Option<&'a str>,
    /// Envoy's response flags, comma-separated; `-` for none.
    response_flags: String,
    bytes_received: u64,
    bytes_sent: u64,
    upstream_host: Option<SocketAddr>,
    source_pod: &'a str,
    source_address: Option<SocketAddr>,
    original_dst: Option<SocketAddr>,
    service: Option<&'a str>,
    sni: Option<&'a str>,
    request_id: Option<&'a str>,
    fault_rule: Option<&'a str>,
    /// How a connection ended (`eof`, `client-reset`, …).
    close_reason: Option<&'a str>,
}

impl<'a> From<&'a Entry> for Line<'a> {
    fn from(entry: &'a Entry) -> Line<'a> {
        match entry {
            Entry::Stream(s) => Line {
                start_time: rfc3339(s.started),
                duration_ms: s.duration_ms,
                protocol: Some(if s.grpc { "grpc" } else { "http2" }),
                method: Some(&s.method),
                path: Some(&s.path),
                authority: Some(&s.authority)
                    .filter(|a| !a.is_empty())
                    .map(|a| a.as_str()),
                response_code: s.status,
                grpc_status: s.grpc_status.as_deref(),
                response_flags: labels::flags(&s.flags),
                bytes_received: s.bytes_received,
                bytes_sent: s.bytes_sent,
                upstream_host: s.upstream,
                source_pod: &s.pod,
                source_address: s.client,
                original_dst: Some(s.original_dst),
                service: s.service.as_deref(),
                sni: None,
                request_id: s.request_id.as_deref(),
                fault_rule: s.fault_rule.as_deref(),
                close_reason: None,
            },
            Entry::Connection(c) => Line {
                start_time: rfc3339(c.started),
                duration_ms: c.duration_ms,
                protocol: c.protocol(),
                method: None,
                path: None,
                authority: None,
                response_code: None,
                grpc_status: None,
                response_flags: labels::flags(&c.flags),
                bytes_received: c.bytes_from_client,
                bytes_sent: c.bytes_to_client,
                upstream_host: c.upstream,
                source_pod: &c.pod,
                source_address: Some(c.client),
                original_dst: Some(c.original_dst),
                service: c.service.as_deref(),
                sni: c.sni.as_deref(),
                request_id: None,
                fault_rule: None,
                close_reason: c.close_reason.as_deref(),
            },
            Entry::Unrouted { at, pod, client } => Line {
                start_time: rfc3339(*at),
                duration_ms: 0,
                protocol: None,
                method: None,
                path: None,
                authority: None,
                response_code: None,
                grpc_status: None,
                response_flags: "NR".into(),
                bytes_received: 0,
                bytes_sent: 0,
                upstream_host: None,
                source_pod: pod,
                source_address: Some(*client),
                original_dst: None,
                service: None,
                sni: None,
                request_id: None,
                fault_rule: None,
                close_reason: Some("no-original-destination"),
            },
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_line_has_every_field() {
        let mut record = StreamRecord::new(
            "client".into(),
            "10.96.0.10:50051".parse().unwrap(),
            Some("greeter".into()),
        );
        record.method = "POST".into();
        record.path = "/helloworld.Greeter/SayHello".into();
        record.grpc = true;
        record.status = Some(200);
        record.grpc_status = Some("14".into());
        record.flags = vec!["FI".into()];
        record.request_id = Some("abc-123".into());
        let entry = Entry::Stream(Box::new(record));
        let json = serde_json::to_value(Line::from(&entry)).unwrap();
        // Keys that do not apply to a stream are there, as null.
        assert_eq!(json["sni"], serde_json::Value::Null);
        assert_eq!(json["protocol"], "grpc");
        assert_eq!(json["response_flags"], "FI");
        assert_eq!(json["request_id"], "abc-123");
        assert!(
            json["start_time"].as_str().unwrap().ends_with('Z'),
            "{json}"
        );
    }

    #[test]
    fn lines_are_written_and_a_full_channel_drops_and_counts() {
        let dir = std::env::temp_dir().join(format!("shunt-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let (lines, dropped) = (Counter::default(), Counter::default());
        let sender = start(
            &AccessLog::File(path.clone()),
            1,
            lines.clone(),
            dropped.clone(),
        )
        .unwrap()
        .unwrap();
        let unrouted = || Entry::Unrouted {
            at: SystemTime::now(),
            pod: "p".into(),
            client: "127.0.0.1:1".parse().unwrap(),
        };
        for _ in 0..1000 {
            sender.send(unrouted());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lines.get() + dropped.get() < 1000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(lines.get() + dropped.get(), 1000);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count() as u64, lines.get());
        for line in text.lines() {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(json["response_flags"], "NR");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
