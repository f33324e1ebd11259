//! The metrics the data path updates as it goes, and the registry a scrape encodes.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{
    collect::{NodeCollector, ProcessCollector, Sources},
    labels,
};
use crate::state::{ConnRecord, StreamRecord, Verdict};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnOpened {
    service: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnClosed {
    service: String,
    protocol: &'static str,
    response_flags: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamEnded {
    service: String,
    /// `grpc` or `http2`.
    protocol: &'static str,
    /// The HTTP status sent to the client; 0 when none was (a reset).
    response_code: u16,
    grpc_status: &'static str,
    response_flags: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceOnly {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// Upper bounds of the stream duration buckets, in seconds: sub-millisecond unary calls up
/// to minute-long streams.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

pub struct Metrics {
    connections_opened: Family<ConnOpened, Counter>,
    connections_closed: Family<ConnClosed, Counter>,
    streams: Family<StreamEnded, Counter>,
    stream_duration: Family<ServiceOnly, Histogram, fn() -> Histogram>,
    pub access_log_lines: Counter,
    pub access_log_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            streams: Family::default(),
            stream_duration: Family::new_with_constructor(duration_histogram),
            access_log_lines: Counter::default(),
            access_log_dropped: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn connection_opened(&self, service: Option<&str>, verdict: Verdict) {
        self.connections_opened
            .get_or_create(&ConnOpened {
                service: labels::service(service),
                protocol: verdict.protocol(),
            })
            .inc();
    }

    pub fn connection_closed(&self, record: &ConnRecord) {
        self.connections_closed
            .get_or_create(&ConnClosed {
                service: labels::service(record.service.as_deref()),
                protocol: record.protocol().unwrap_or("unknown"),
                response_flags: labels::flags(&record.flags),
            })
            .inc();
    }

    pub fn stream_ended(&self, record: &StreamRecord, elapsed: Duration) {
        let service = labels::service(record.service.as_deref());
        self.streams
            .get_or_create(&StreamEnded {
                service: service.clone(),
                protocol: if record.grpc { "grpc" } else { "http2" },
                response_code: record.status.unwrap_or(0),
                grpc_status: labels::grpc_status(record.grpc_status.as_deref()),
                response_flags: labels::flags(&record.flags),
            })
            .inc();
        self.stream_duration
            .get_or_create(&ServiceOnly { service })
            .observe(elapsed.as_secs_f64());
    }

    /// Everything a scrape shows: these families, shared with the data path, and what
    /// `sources` hold, read at scrape time.
    pub fn registry(&self, sources: Sources) -> Registry {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let shunt = root.sub_registry_with_prefix("shunt");
        let build_info: Family<Version, Gauge> = Family::default();
        build_info
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        shunt.register("build_info", "The running shunt's version", build_info);
        shunt.register(
            "connections_opened",
            "Redirected connections, by Service (`passthrough`: no Service) and protocol as detected (h2, tls, opaque)",
            self.connections_opened.clone(),
        );
        shunt.register(
            "connections_closed",
            "Closed connections, by Service, protocol and Envoy response flags (`-`: none; `unknown` protocol: closed while detecting)",
            self.connections_closed.clone(),
        );
        shunt.register(
            "streams",
            "HTTP/2 streams (gRPC calls), by Service, protocol (grpc, http2), HTTP status sent (0: none), gRPC status and Envoy response flags",
            self.streams.clone(),
        );
        shunt.register_with_unit(
            "request_duration",
            "HTTP/2 stream duration from its HEADERS to its end, by Service",
            Unit::Seconds,
            self.stream_duration.clone(),
        );
        shunt.register(
            "access_log_lines",
            "Access-log lines written",
            self.access_log_lines.clone(),
        );
        shunt.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind or failed",
            self.access_log_dropped.clone(),
        );
        shunt.register_collector(Box::new(NodeCollector::new(sources)));
        root
    }
}
