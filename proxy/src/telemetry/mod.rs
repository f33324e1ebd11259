//! Telemetry: Prometheus metrics, the health endpoints and the access log.
//!
//! What the data path counts as it goes (connections opened and closed, streams by status,
//! stream durations) lives in `prometheus-client` families: an atomic increment per event.
//! Everything the daemon keeps anyway — the programs' per-CPU counters, the connection
//! table's bytes, endpoints, fault counts, `/proc` — is read when scraped. Scrapes, health
//! checks and access-log writes run on threads of their own, never on the proxy's runtime,
//! so neither a slow scraper nor a slow disk holds up a connection.

mod access_log;
mod collect;
mod health;
pub mod labels;
mod metrics;
mod process;
mod server;
#[allow(unsafe_code)]
mod sys;

use std::{
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

pub use self::collect::Sources;
pub use self::health::Health;
pub use self::server::TelemetryListener;
use self::{access_log::Entry, metrics::Metrics, server::Served};
use crate::{
    config,
    state::{ConnRecord, Observer, StreamRecord, Verdict},
};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.{field}: listening on {addr}: {source}")]
    Listen {
        field: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("telemetry.access_log: opening {path}: {source}")]
    AccessLog { path: PathBuf, source: io::Error },
    #[error("starting the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: io::Error,
    },
}

/// Where the metrics and health endpoints actually listen (a configured port 0 becomes the
/// port the kernel chose).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addresses {
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
}

pub struct Telemetry {
    recorder: Arc<Recorder>,
    health: Arc<Health>,
    served: Arc<Served>,
    listeners: Arc<server::Listeners>,
    pub addresses: Addresses,
}

impl Telemetry {
    /// Opens the listeners (or takes those a previous daemon handed over) and the access log
    /// and starts their threads. `/live` answers from here on; `/ready` once
    /// [`Health::set_ready`] is called, `/metrics` once [`Telemetry::serve_metrics`] is.
    pub fn start(
        config: &config::Telemetry,
        inherited: Vec<(TelemetryListener, OwnedFd)>,
    ) -> Result<Arc<Telemetry>, TelemetryError> {
        let metrics = Metrics::default();
        let access_log = access_log::start(
            &config.access_log,
            config.access_log_buffer,
            metrics.access_log_lines.clone(),
            metrics.access_log_dropped.clone(),
        )?;
        let health = Arc::new(Health::default());
        let served = Arc::new(Served::new(health.clone()));
        let (addresses, listeners) = server::start(config, served.clone(), inherited)?;
        for (what, addr) in [("metrics", addresses.metrics), ("health", addresses.health)] {
            if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                tracing::warn!(%addr, "{what} endpoint reachable beyond this node, as configured");
            }
        }
        Ok(Arc::new(Telemetry {
            recorder: Arc::new(Recorder {
                metrics,
                access_log,
            }),
            health,
            served,
            listeners,
            addresses,
        }))
    }

    /// What hears of every connection and stream as it ends (the connection table's and
    /// stream log's [`Observer`]): the metric families and the access log, without the
    /// registry that reads the connection table, so the two do not keep each other alive.
    pub fn observer(&self) -> Arc<dyn Observer> {
        self.recorder.clone()
    }

    /// From now on `/metrics` answers, reading what the daemon keeps at each scrape.
    pub fn serve_metrics(&self, sources: Sources) {
        self.served.install(self.recorder.metrics.registry(sources));
    }

    /// Duplicates of the metrics and health listeners, for a new daemon taking over.
    pub fn offer_listeners(&self) -> Vec<(TelemetryListener, OwnedFd)> {
        self.listeners.offer()
    }

    /// Stops serving the metrics and health listeners: a new daemon serves them now.
    pub fn close_listeners(&self) {
        self.listeners.close();
    }

    pub fn health(&self) -> &Health {
        &self.health
    }
}

/// The metric families the data path updates and the access log it writes to.
struct Recorder {
    metrics: Metrics,
    access_log: Option<access_log::Sender>,
}

impl Recorder {
    fn log(&self, entry: Entry) {
        if let Some(log) = &self.access_log {
            log.send(entry);
        }
    }
}

impl Observer for Recorder {
    fn connection_opened(&self, service: Option<&str>, verdict: Verdict) {
        self.metrics.connection_opened(service, verdict);
    }

    fn unrouted(&self, pod: &str, client: SocketAddr) {
        self.log(Entry::Unrouted {
            at: SystemTime::now(),
            pod: pod.to_owned(),
            client,
        });
    }

    fn connection_closed(&self, record: &ConnRecord) {
        self.metrics.connection_closed(record);
        // An HTTP/2 connection's streams have lines of their own.
        if record.verdict != Some(Verdict::H2) && self.access_log.is_some() {
            self.log(Entry::Connection(Box::new(record.clone())));
        }
    }

    fn stream_ended(&self, record: &StreamRecord, elapsed: Duration) {
        self.metrics.stream_ended(record, elapsed);
        if self.access_log.is_some() {
            self.log(Entry::Stream(Box::new(record.clone())));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Weak};

    use arc_swap::ArcSwap;

    use super::*;
    use crate::{
        config::{Config, Listen},
        fault::Faults,
        proxy::Settings,
        state::{ConnTable, ProxyCounters},
    };

    fn sources(
        conns: &Arc<ConnTable>,
        faults: &Arc<Faults>,
        settings: &Arc<ArcSwap<Settings>>,
    ) -> Sources {
        Sources {
            conns: conns.clone(),
            counters: Arc::new(ProxyCounters::default()),
            faults: faults.clone(),
            settings: settings.clone(),
            ebpf_counters: Box::new(|| BTreeMap::from([("redirected", 7)])),
            pods_enrolled: Box::new(|| 3),
            kernel_features: vec![("local_fast_path", false)],
        }
    }

    /// The proxy holds telemetry, and the connection table holds telemetry's observer:
    /// neither may be held back by the registry, or the daemon could never be taken apart.
    #[test]
    fn the_collector_reads_narrow_handles_and_keeps_nothing_alive() {
        let config = config::Telemetry {
            metrics: Listen::Off,
            health: Listen::Off,
            ..Default::default()
        };
        let telemetry = Telemetry::start(&config, Vec::new()).expect("telemetry");
        let conns = Arc::new(ConnTable::new(telemetry.observer()));
        let defaults = Config::default();
        let faults = Arc::new(Faults::new(Vec::new(), defaults.max_active_faults));
        let settings = Arc::new(ArcSwap::from_pointee(Settings::new(&defaults)));

        // What a scrape shows, read from the handles.
        let registry = telemetry
            .recorder
            .metrics
            .registry(sources(&conns, &faults, &settings));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "\nshunt_connections_active 0\n",
            "\nshunt_pods_enrolled 3\n",
            "shunt_ebpf_redirects_total{listener=\"up\"} 7\n",
            "shunt_kernel_feature_available{feature=\"local_fast_path\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        drop(registry);

        telemetry.serve_metrics(sources(&conns, &faults, &settings));
        let weak: (Weak<Telemetry>, Weak<ConnTable>, Weak<ArcSwap<Settings>>) = (
            Arc::downgrade(&telemetry),
            Arc::downgrade(&conns),
            Arc::downgrade(&settings),
        );
        // A stand-in for the proxy, which owns these (it cannot be built without a loaded
        // BPF object): once it goes, everything goes.
        let owner = Arc::new((telemetry, conns, faults, settings));
        drop(owner);
        assert!(weak.0.upgrade().is_none(), "telemetry was dropped");
        assert!(
            weak.1.upgrade().is_none(),
            "the connection table was dropped"
        );
        assert!(weak.2.upgrade().is_none(), "the settings were dropped");
    }
}
