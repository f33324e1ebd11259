//! Metrics read at scrape time from what the daemon keeps anyway, so the data path pays
//! nothing for them.

use std::{collections::BTreeMap, sync::Arc};

use arc_swap::ArcSwap;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::{labels, process};
use crate::{
    fault::Faults,
    open_files::OpenFiles,
    proxy::Settings,
    state::{ConnTable, ProxyCounters},
};

/// What the node collector reads: the pieces of state it reports, never their owners. The
/// registry lives as long as telemetry does, and the proxy holds telemetry, so a handle on
/// the proxy (or on the enrollments, which hold it) here would keep it alive for ever.
pub struct Sources {
    pub conns: Arc<ConnTable>,
    pub counters: Arc<ProxyCounters>,
    pub faults: Arc<Faults>,
    pub settings: Arc<ArcSwap<Settings>>,
    /// The eBPF programs' counters, by name.
    pub ebpf_counters: Box<dyn Fn() -> BTreeMap<&'static str, u64> + Send + Sync>,
    /// How many pods are enrolled.
    pub pods_enrolled: Box<dyn Fn() -> usize + Send + Sync>,
    /// The kernel's optional features and whether it has each.
    pub kernel_features: Vec<(&'static str, bool)>,
}

/// Writes one metric family: a descriptor, then one sample per label set.
fn family<M: EncodeMetric, const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = ([(&'static str, String); N], M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: M,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, unit, value.metric_type())?;
    value.encode(metric)
}

pub struct NodeCollector {
    sources: Sources,
}

impl NodeCollector {
    pub fn new(sources: Sources) -> NodeCollector {
        NodeCollector { sources }
    }

    fn connections(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = &self.sources;
        single(
            encoder,
            "connections_active",
            "Redirected connections open now.",
            None,
            ConstGauge::new(sources.conns.len() as u64),
        )?;
        let totals = sources.conns.byte_totals();
        family(
            encoder,
            "transferred",
            "Bytes proxied, by Service, protocol and direction (client_to_upstream, upstream_to_client); HTTP/2 counts DATA frames.",
            Some(&Unit::Bytes),
            totals.iter().flat_map(|t| {
                let service = labels::service(t.service.as_deref());
                [
                    ("client_to_upstream", t.from_client),
                    ("upstream_to_client", t.to_client),
                ]
                .map(|(direction, bytes)| {
                    (
                        [
                            ("service", service.clone()),
                            ("protocol", t.protocol.to_owned()),
                            ("direction", direction.to_owned()),
                        ],
                        ConstCounter::new(bytes),
                    )
                })
            }),
        )?;
        let counters = sources.counters.snapshot();
        let verdicts = counters.iter().filter_map(|(name, value)| {
            let verdict = name.strip_prefix("verdict_")?.replace('_', "-");
            Some(([("verdict", verdict)], ConstCounter::new(*value)))
        });
        family(
            encoder,
            "detection_verdicts",
            "What redirected connections were detected as (h2, tls, opaque, server-first, timeout, skipped).",
            None,
            verdicts,
        )?;
        for (name, metric, help) in [
            (
                "no_original_dst",
                "connections_unrouted",
                "Connections accepted on an in-pod listener without an original destination (not redirected by shunt), closed.",
            ),
            (
                "upstream_connect_failed",
                "upstream_connect_failures",
                "Opaque and TLS connections whose upstream could not be reached (the client is reset).",
            ),
            (
                "endpoint_failovers",
                "endpoint_failovers",
                "Times a Service endpoint failed to connect and the next one was tried.",
            ),
            (
                "accept_errors",
                "accept_errors",
                "accept() failures on in-pod listeners (e.g. out of file descriptors); the listener backs off and retries.",
            ),
            (
                "h2_header_timeouts",
                "http2_header_timeouts",
                "HTTP/2 client connections closed for not completing a request within http2.header_timeout.",
            ),
            (
                "h2_idle_timeouts",
                "http2_idle_timeouts",
                "HTTP/2 client connections closed after http2.idle_timeout without a stream.",
            ),
            (
                "h2_upstreams_opened",
                "upstream_http2_connections_opened",
                "Upstream HTTP/2 connections that joined a pod's pool (dialled for a stream, or adopted from detection).",
            ),
            (
                "h2_upstreams_retired",
                "upstream_http2_connections_retired",
                "Pooled upstream HTTP/2 connections closed by shunt because nothing used them (idle timeout, beyond upstream_max_idle, endpoint or pod gone).",
            ),
            (
                "h2_upstreams_not_adopted",
                "upstream_http2_connections_not_adopted",
                "Connections dialled during detection that the pool did not need, closed at once.",
            ),
        ] {
            let value = counters.get(name).copied().unwrap_or(0);
            single(encoder, metric, help, None, ConstCounter::new(value))?;
        }
        let refused =
            [("node", "refused_node_limit"), ("pod", "refused_pod_limit")].map(|(limit, name)| {
                let value = counters.get(name).copied().unwrap_or(0);
                ([("limit", limit.to_owned())], ConstCounter::new(value))
            });
        family(
            encoder,
            "connections_refused",
            "Connections reset on accept because a limit was reached: node (limits.max_connections) or pod (limits.max_connections_per_pod).",
            None,
            refused,
        )?;
        // Read apart, so a close counted after its open was read must not underflow.
        let pooled = counters
            .get("h2_upstreams_opened")
            .copied()
            .unwrap_or(0)
            .saturating_sub(counters.get("h2_upstreams_closed").copied().unwrap_or(0));
        single(
            encoder,
            "upstream_http2_connections",
            "Pooled upstream HTTP/2 connections open now, all pods and workers.",
            None,
            ConstGauge::new(pooled),
        )?;
        single(
            encoder,
            "pods_enrolled",
            "Pods whose connections are intercepted.",
            None,
            ConstGauge::new((self.sources.pods_enrolled)() as u64),
        )
    }

    fn endpoints(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let settings = self.sources.settings.load();
        let samples = settings.routes.services().iter().flat_map(|service| {
            let (in_rotation, draining) = service.endpoint_counts();
            [("in_rotation", in_rotation), ("draining", draining)].map(|(state, n)| {
                (
                    [
                        ("service", service.name.clone()),
                        ("state", state.to_owned()),
                    ],
                    ConstGauge::new(n as u64),
                )
            })
        });
        family(
            encoder,
            "endpoints",
            "Service endpoints: in rotation, or removed and finishing their streams and connections (draining).",
            None,
            samples,
        )
    }

    fn faults(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.sources.faults.counts();
        let injected = counts.iter().flat_map(|c| {
            [
                ("delay", c.delays),
                ("abort", c.aborts),
                ("tcp_delay", c.tcp_delays),
                ("tcp_reset", c.tcp_resets),
            ]
            .map(|(kind, n)| {
                (
                    [("rule", c.rule.clone()), ("kind", kind.to_owned())],
                    ConstCounter::new(n),
                )
            })
        });
        family(
            encoder,
            "faults_injected",
            "Faults injected, by rule and kind (delay, abort: per stream; tcp_delay, tcp_reset: per connection).",
            None,
            injected,
        )?;
        family(
            encoder,
            "faults_over_cap",
            "Streams a rule would have faulted, passed unfaulted because max_active_faults were in progress.",
            None,
            counts
                .iter()
                .map(|c| ([("rule", c.rule.clone())], ConstCounter::new(c.overflow))),
        )
    }

    fn ebpf(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        family(
            encoder,
            "kernel_feature_available",
            "Optional features by whether this kernel has them (1) or they are off because it lacks them (0); `shunt status` names the kernel each needs.",
            None,
            self.sources
                .kernel_features
                .iter()
                .map(|(feature, available)| {
                    (
                        [("feature", (*feature).to_owned())],
                        ConstGauge::new(u64::from(*available)),
                    )
                }),
        )?;
        let counters = (self.sources.ebpf_counters)();
        let get = |name: &str| counters.get(name).copied().unwrap_or(0);
        family(
            encoder,
            "ebpf_redirects",
            "connect() calls of enrolled pods sent to shunt's in-pod listener (listener down: fail-closed, the client is refused).",
            None,
            [
                ("up", get("redirected")),
                ("down", get("redirected_no_listener")),
            ]
            .map(|(listener, n)| ([("listener", listener.to_owned())], ConstCounter::new(n))),
        )?;
        let skips = counters.iter().filter_map(|(name, value)| {
            let reason = name.strip_prefix("skip_")?;
            Some(([("reason", reason.to_owned())], ConstCounter::new(*value)))
        });
        family(
            encoder,
            "ebpf_skips",
            "connect() calls the programs let through unchanged, by reason.",
            None,
            skips,
        )?;
        single(
            encoder,
            "ebpf_original_dst_recorded",
            "Original destinations handed to shunt by sock_ops.",
            None,
            ConstCounter::new(get("dst_recorded")),
        )?;
        single(
            encoder,
            "ebpf_getpeername_rewrites",
            "getpeername() calls answered with the original destination.",
            None,
            ConstCounter::new(get("peername_rewritten")),
        )?;
        single(
            encoder,
            "ebpf_local_fast_path_sockets",
            "Sockets on the local fast path (intercept.local_fast_path) now, two per open connection.",
            None,
            ConstGauge::new(get("local_fast_path_sockets")),
        )?;
        family(
            encoder,
            "ebpf_local_fast_path_messages",
            "Messages sent on local fast path sockets, by how they travelled: redirected into the peer socket, or over TCP when the peer was not (yet) in the map.",
            None,
            [
                ("redirected", get("local_fast_path_redirected")),
                ("tcp", get("local_fast_path_no_peer")),
            ]
            .map(|(path, n)| ([("path", path.to_owned())], ConstCounter::new(n))),
        )
    }

    /// The descriptors the daemon may hold and the connection limits sized to them.
    fn limits(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(open_files) = OpenFiles::now() {
            family(
                encoder,
                "open_files_limit",
                "The open-file limit (RLIMIT_NOFILE): soft (in force) and hard (how far it may be raised).",
                None,
                [("soft", open_files.soft), ("hard", open_files.hard)]
                    .map(|(kind, n)| ([("kind", kind.to_owned())], ConstGauge::new(n))),
            )?;
        }
        let limits = &self.sources.settings.load().limits;
        family(
            encoder,
            "connections_limit",
            "Connections served at once before new ones are reset: node (limits.max_connections) and pod (limits.max_connections_per_pod), as configured or sized to the open-file limit.",
            None,
            [
                ("node", limits.max_connections),
                ("pod", limits.max_connections_per_pod),
            ]
            .map(|(limit, n)| ([("limit", limit.to_owned())], ConstGauge::new(n as u64))),
        )
    }
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.connections(&mut encoder)?;
        self.endpoints(&mut encoder)?;
        self.faults(&mut encoder)?;
        self.limits(&mut encoder)?;
        self.ebpf(&mut encoder)
    }
}

/// The standard `process_*` metrics every Prometheus client exports, from `/proc/self`.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = process::read() else {
            // Not on Linux's /proc: nothing to say rather than zeros.
            return Ok(());
        };
        let encoder = &mut encoder;
        single(
            encoder,
            "process_cpu",
            "Total user and system CPU time spent.",
            Some(&Unit::Seconds),
            ConstCounter::new(p.cpu_seconds),
        )?;
        let (bytes, seconds) = (Unit::Bytes, Unit::Seconds);
        for (name, help, unit, value) in [
            (
                "process_open_fds",
                "Open file descriptors.",
                None,
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "The open file descriptor limit.",
                None,
                p.max_fds as f64,
            ),
            (
                "process_resident_memory",
                "Resident memory size.",
                Some(&bytes),
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size.",
                Some(&bytes),
                p.virtual_bytes as f64,
            ),
            ("process_threads", "OS threads.", None, p.threads as f64),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch.",
                Some(&seconds),
                p.start_time_seconds,
            ),
        ] {
            single(encoder, name, help, unit, ConstGauge::new(value))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_encode_in_both_formats() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        let mut open = String::new();
        prometheus_client::encoding::text::encode(&mut open, &registry).unwrap();
        assert!(open.ends_with("# EOF\n"), "{open}");
    }
}
