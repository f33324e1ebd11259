//! The daemon's own types, as the admin API shows them. Here and not in the domain modules,
//! which do not know the admin API (the layering), nor in `api`, which knows nothing of the
//! daemon so that the CLI's view of the wire depends on the wire alone.
//!
//! Domain structs are taken apart field by field rather than with `..`: a field added to one
//! stops the build here, so whether the API shows it is decided, not left to chance.

use super::api;
use crate::{
    bpf, config,
    config::fault::{AbortFault, DelayFault, FaultMatch, FaultRule, PathMatch, TcpFault},
    fault, inpod, k8s, kernel_path, open_files, route, state,
};

impl From<bpf::Attachment> for api::Attachment {
    fn from(attachment: bpf::Attachment) -> Self {
        match attachment {
            bpf::Attachment::Attached => api::Attachment::Attached,
            bpf::Attachment::TookOverPinned => api::Attachment::TookOverPinned,
        }
    }
}

impl From<&bpf::Kernel> for api::KernelStatus {
    fn from(kernel: &bpf::Kernel) -> Self {
        api::KernelStatus {
            release: kernel.release.clone(),
            features: kernel
                .features()
                .into_iter()
                .map(|f| api::KernelFeature {
                    name: f.name.to_owned(),
                    available: f.available,
                    needs: f.needs.to_owned(),
                })
                .collect(),
        }
    }
}

impl From<config::FailMode> for api::FailMode {
    fn from(mode: config::FailMode) -> Self {
        match mode {
            config::FailMode::Open => api::FailMode::Open,
            config::FailMode::Closed => api::FailMode::Closed,
        }
    }
}

impl From<open_files::OpenFiles> for api::OpenFiles {
    fn from(open_files::OpenFiles { soft, hard }: open_files::OpenFiles) -> Self {
        api::OpenFiles { soft, hard }
    }
}

impl From<k8s::KubernetesStatus> for api::KubernetesStatus {
    fn from(status: k8s::KubernetesStatus) -> Self {
        let k8s::KubernetesStatus {
            node,
            connected,
            watches,
        } = status;
        api::KubernetesStatus {
            node,
            connected,
            watches: watches
                .into_iter()
                .map(|watch| api::WatchStatus {
                    resource: watch.resource,
                    synced: watch.synced,
                    error: watch.error,
                    failing_secs: watch.failing_secs,
                })
                .collect(),
        }
    }
}

impl From<inpod::PodSummary> for api::PodSummary {
    fn from(pod: inpod::PodSummary) -> Self {
        let inpod::PodSummary {
            name,
            netns,
            netns_cookie,
            listeners,
        } = pod;
        api::PodSummary {
            name,
            netns,
            netns_cookie,
            listeners,
        }
    }
}

impl From<kernel_path::KernelPathSummary> for api::KernelPathSummary {
    fn from(summary: kernel_path::KernelPathSummary) -> Self {
        let kernel_path::KernelPathSummary {
            mode,
            destinations,
            ports,
            error,
        } = summary;
        api::KernelPathSummary {
            mode,
            destinations: destinations
                .into_iter()
                .map(|d| api::KernelPathEntry {
                    destination: d.destination,
                    service: d.service,
                    reason: d.reason,
                    path: d.path,
                    endpoints: d.endpoints,
                    sample_every: d.sample_every,
                })
                .collect(),
            ports,
            error,
        }
    }
}

impl From<route::ServiceSummary> for api::ServiceSummary {
    fn from(service: route::ServiceSummary) -> Self {
        let route::ServiceSummary {
            name,
            vip,
            endpoints,
        } = service;
        api::ServiceSummary {
            name,
            vip,
            endpoints: endpoints.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<route::EndpointSummary> for api::EndpointSummary {
    fn from(endpoint: route::EndpointSummary) -> Self {
        let route::EndpointSummary {
            addr,
            in_rotation,
            streams_active,
            streams_total,
            connections_active,
            connections_total,
            failed,
            upstreams_open,
        } = endpoint;
        api::EndpointSummary {
            addr,
            in_rotation,
            streams_active,
            streams_total,
            connections_active,
            connections_total,
            failed,
            upstreams_open,
        }
    }
}

impl From<state::Verdict> for api::Verdict {
    fn from(verdict: state::Verdict) -> Self {
        match verdict {
            state::Verdict::H2 => api::Verdict::H2,
            state::Verdict::Tls => api::Verdict::Tls,
            state::Verdict::Opaque => api::Verdict::Opaque,
            state::Verdict::ServerFirst => api::Verdict::ServerFirst,
            state::Verdict::Timeout => api::Verdict::Timeout,
            state::Verdict::Skipped => api::Verdict::Skipped,
            state::Verdict::KernelPath => api::Verdict::KernelPath,
        }
    }
}

impl From<state::ConnRecord> for api::ConnRecord {
    fn from(record: state::ConnRecord) -> Self {
        let state::ConnRecord {
            id,
            pod,
            client,
            original_dst,
            service,
            upstream,
            verdict,
            sni,
            alpn,
            started,
            duration_ms,
            bytes_from_client,
            bytes_to_client,
            forwarding,
            close_reason,
            flags,
        } = record;
        api::ConnRecord {
            id,
            pod,
            client,
            original_dst,
            service,
            upstream,
            verdict: verdict.map(Into::into),
            sni,
            alpn,
            started,
            duration_ms,
            bytes_from_client,
            bytes_to_client,
            forwarding,
            close_reason,
            flags,
        }
    }
}

impl From<state::StreamRecord> for api::StreamRecord {
    fn from(record: state::StreamRecord) -> Self {
        let state::StreamRecord {
            started,
            duration_ms,
            pod,
            client,
            original_dst,
            service,
            method,
            path,
            authority,
            upstream,
            status,
            grpc_status,
            flags,
            fault_rule,
            grpc,
            request_id,
            bytes_received,
            bytes_sent,
        } = record;
        api::StreamRecord {
            started,
            duration_ms,
            pod,
            client,
            original_dst,
            service,
            method,
            path,
            authority,
            upstream,
            status,
            grpc_status,
            flags,
            fault_rule,
            grpc,
            request_id,
            bytes_received,
            bytes_sent,
        }
    }
}

impl From<fault::RuleSummary> for api::RuleSummary {
    fn from(summary: fault::RuleSummary) -> Self {
        let fault::RuleSummary {
            rule,
            source,
            delays,
            aborts,
            tcp_faults,
            overflow,
        } = summary;
        api::RuleSummary {
            rule: rule.into(),
            source,
            delays,
            aborts,
            tcp_faults,
            overflow,
        }
    }
}

impl From<FaultRule> for api::FaultRule {
    fn from(rule: FaultRule) -> Self {
        let FaultRule {
            name,
            matches,
            delay,
            abort,
            tcp,
            header_control,
        } = rule;
        api::FaultRule {
            name,
            matches: matches.into(),
            delay: delay.map(Into::into),
            abort: abort.map(Into::into),
            tcp: tcp.map(Into::into),
            header_control,
        }
    }
}

impl From<FaultMatch> for api::FaultMatch {
    fn from(matches: FaultMatch) -> Self {
        let FaultMatch {
            service,
            vip,
            path,
            headers,
            source_pod,
        } = matches;
        api::FaultMatch {
            service,
            vip,
            path: path.map(|path| match path {
                PathMatch::Exact(exact) => api::PathMatch::Exact(exact),
                PathMatch::Prefix { prefix } => api::PathMatch::Prefix { prefix },
            }),
            headers,
            source_pod,
        }
    }
}

impl From<DelayFault> for api::DelayFault {
    fn from(DelayFault { fixed, percentage }: DelayFault) -> Self {
        api::DelayFault {
            fixed,
            percentage: api::Percentage(percentage.0),
        }
    }
}

impl From<AbortFault> for api::AbortFault {
    fn from(abort: AbortFault) -> Self {
        let AbortFault {
            grpc_status,
            http_status,
            percentage,
        } = abort;
        api::AbortFault {
            // Its name, as the rule's own serialisation writes it.
            grpc_status: grpc_status.map(|code| code.to_string()),
            http_status,
            percentage: api::Percentage(percentage.0),
        }
    }
}

impl From<TcpFault> for api::TcpFault {
    fn from(tcp: TcpFault) -> Self {
        let TcpFault {
            connect_delay,
            reset_percentage,
        } = tcp;
        api::TcpFault {
            connect_delay,
            reset_percentage: reset_percentage.map(|p| api::Percentage(p.0)),
        }
    }
}

/// Every element converted: the lists the handlers answer with.
pub fn all<T, U: From<T>>(items: Vec<T>) -> Vec<U> {
    items.into_iter().map(U::from).collect()
}
