//! The admin commands of the CLI: ask the daemon, print a table or JSON.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper::Method;
use serde::Serialize;

use crate::{
    admin::{
        api::{
            ConnRecord, Done, EnrollRequest, FaultsRequest, FaultsSet, KernelPathSummary,
            KernelStatus, KubernetesStatus, LogFilter, PodSummary, Reloaded, RuleSummary,
            ServiceSummary, Stats, Status, StreamRecord, Uninstalled,
        },
        client::{AdminClient, ClientError},
    },
    bpf,
    cli::{Command, FaultsAction, Output},
    config::{Config, DEFAULT_PIN_DIR},
    telemetry::labels::flags,
};

/// Runs `command` against the daemon serving `socket`; `config` is the configuration the
/// command was given (`--config`), whose pins `uninstall` cleans when no daemon runs.
pub async fn run(
    command: Command,
    socket: &Path,
    config: Option<&Config>,
    output: Output,
) -> anyhow::Result<()> {
    let client = AdminClient::new(socket);
    match command {
        Command::Run { .. } | Command::Crd => unreachable!("handled by main"),
        Command::Kernel => {
            let kernel = KernelStatus::from(&bpf::Kernel::probe()?);
            print(output, &kernel, || kernel_text(&kernel));
        }
        Command::Enroll { name, netns } => {
            let netns = std::fs::canonicalize(&netns).unwrap_or(netns);
            let pod: PodSummary = client
                .call(Method::POST, "/pods", Some(EnrollRequest { name, netns }))
                .await?;
            print(output, &pod, || pods_table(std::slice::from_ref(&pod)));
        }
        Command::Unenroll { name } => {
            let _: Done = client
                .call(Method::DELETE, &format!("/pods/{name}"), Option::<()>::None)
                .await?;
            println!("unenrolled {name}");
        }
        Command::Status => {
            let s: Status = client.get("/status").await?;
            print(output, &s, || {
                format!(
                    "shunt {} (pid {}), up {}s\nprograms: attached to {} ({}), pinned under {}\nlisteners: port {} in each pod, fail mode {}\nlocal fast path: {} ({} sockets)\npods: {}  connections: {}  services: {}  fault rules: {}\n",
                    s.version,
                    s.pid,
                    s.uptime_secs,
                    s.cgroup.display(),
                    s.attachment,
                    s.pin_dir.display(),
                    s.listen_port,
                    s.fail_mode,
                    s.local_fast_path,
                    s.local_fast_path_sockets,
                    s.pods,
                    s.connections,
                    s.services,
                    s.fault_rules
                ) + &format!(
                    "metrics: {}  health: {} ({})\naccess log: {}  log filter: {}\n",
                    s.metrics
                        .map_or("off".into(), |a| format!("http://{a}/metrics")),
                    s.health
                        .map_or("off".into(), |a| format!("http://{a}/ready")),
                    s.ready,
                    s.access_log,
                    s.log_filter
                ) + &kernel_text(&s.kernel)
                    + &limits_text(&s)
                    + &s.kubernetes
                        .as_ref()
                        .map(kubernetes_text)
                        .unwrap_or_default()
            });
        }
        Command::Pods => {
            let pods: Vec<PodSummary> = client.get("/pods").await?;
            print(output, &pods, || pods_table(&pods));
        }
        Command::Conns {
            closed,
            pod,
            protocol,
        } => {
            let path = if closed { "/conns/closed" } else { "/conns" };
            let mut conns: Vec<ConnRecord> = client.get(path).await?;
            conns.retain(|c| {
                pod.as_ref().is_none_or(|p| &c.pod == p)
                    && protocol.is_none_or(|p| c.protocol() == Some(p.as_str()))
            });
            print(output, &conns, || conns_table(&conns));
        }
        Command::Streams => {
            let streams: Vec<StreamRecord> = client.get("/streams").await?;
            print(output, &streams, || streams_table(&streams));
        }
        Command::Services => {
            let services: Vec<ServiceSummary> = client.get("/services").await?;
            print(output, &services, || services_table(&services));
        }
        Command::KernelPath => {
            let summary: KernelPathSummary = client.get("/kernel-path").await?;
            print(output, &summary, || kernel_path_text(&summary));
        }
        Command::Faults { action } => match action {
            FaultsAction::List => {
                let rules: Vec<RuleSummary> = client.get("/faults").await?;
                print(output, &rules, || faults_table(&rules));
            }
            FaultsAction::Set { file } => {
                let rules = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let set: FaultsSet = client
                    .call(Method::POST, "/faults", Some(FaultsRequest { rules }))
                    .await?;
                print(output, &set, || format!("set: {}\n", set.set.join(", ")));
            }
            FaultsAction::Clear { name } => {
                let _: Done = client
                    .call(
                        Method::DELETE,
                        &format!("/faults/{name}"),
                        Option::<()>::None,
                    )
                    .await?;
                println!("cleared {name}");
            }
        },
        Command::Reload => {
            let reloaded: Reloaded = client
                .call(Method::POST, "/reload", Option::<()>::None)
                .await?;
            print(output, &reloaded, || {
                let mut text = format!("reloaded: {} services\n", reloaded.services);
                if !reloaded.restart_needed.is_empty() {
                    text.push_str(&format!(
                        "not applied until shunt restarts: {}\n",
                        reloaded.restart_needed.join(", ")
                    ));
                }
                text
            });
        }
        Command::Stats => {
            let stats: Stats = client.get("/stats").await?;
            print(output, &stats, || {
                let mut rows = vec![vec!["source".into(), "counter".into(), "value".into()]];
                for (source, map) in [("ebpf", &stats.ebpf), ("proxy", &stats.proxy)] {
                    rows.extend(
                        map.iter()
                            .map(|(k, v)| vec![source.into(), k.clone(), v.to_string()]),
                    );
                }
                table(&rows)
            });
        }
        Command::LogLevel { filter } => {
            let now: LogFilter = match filter {
                Some(filter) => {
                    client
                        .call(Method::PUT, "/log-level", Some(LogFilter { filter }))
                        .await?
                }
                None => client.get("/log-level").await?,
            };
            print(output, &now, || format!("{}\n", now.filter));
        }
        Command::Config => {
            let config: Config = client.get("/config").await?;
            match output {
                Output::Json => print(output, &config, String::new),
                Output::Table => print!(
                    "{}",
                    serde_yaml_ng::to_string(&config).context("printing the configuration")?
                ),
            }
        }
        Command::Uninstall { pin_dir } => {
            let pin_dir = pin_dir
                .or_else(|| config.map(|c| c.intercept.pin_dir.clone()))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
            uninstall(&client, &pin_dir, output).await?
        }
    }
    Ok(())
}

/// Through the daemon when one runs (it removes its pins and stops); directly on the pins
/// in `pin_dir` otherwise.
async fn uninstall(client: &AdminClient, pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let result = match client
        .call::<(), Uninstalled>(Method::POST, "/uninstall", None)
        .await
    {
        Ok(done) => done,
        Err(ClientError::NotRunning(_)) => Uninstalled {
            removed: bpf::uninstall(pin_dir)?,
        },
        Err(e) => return Err(e.into()),
    };
    print(output, &result, || {
        let mut text = format!("removed {} pins\n", result.removed.len());
        for path in &result.removed {
            text.push_str(&format!("  {}\n", path.display()));
        }
        text
    });
    Ok(())
}

fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce() -> String) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Table => print!("{}", table()),
    }
}

/// The connection limits in force and the open-file limit they were sized to.
/// `kernel: 5.10.0-28-amd64, lacks: local_fast_path (needs Linux 5.15 …)`.
fn kernel_text(kernel: &KernelStatus) -> String {
    let missing: Vec<String> = kernel
        .features
        .iter()
        .filter(|f| !f.available)
        .map(|f| format!("\n  {} (needs {})", f.name, f.needs))
        .collect();
    match missing.is_empty() {
        true => format!(
            "kernel: {}, every optional feature available\n",
            kernel.release
        ),
        false => format!("kernel: {}, lacks:{}\n", kernel.release, missing.concat()),
    }
}

fn limits_text(s: &Status) -> String {
    let open_files = s.open_files.map_or("unknown".into(), |f| {
        format!("soft {}, hard {}", f.soft, f.hard)
    });
    format!(
        "limits: {} connections, {} per pod  open files: {open_files}\n",
        s.max_connections, s.max_connections_per_pod
    )
}

/// One line for the node, one per API watch that is not in sync.
fn kubernetes_text(k: &KubernetesStatus) -> String {
    let mut text = format!(
        "kubernetes: node {}, API {}\n",
        k.node,
        if k.connected {
            "connected"
        } else {
            "unreachable or failing: last known state kept, retrying"
        }
    );
    for watch in k.watches.iter().filter(|w| !w.synced || w.error.is_some()) {
        text.push_str(&format!(
            "  {}: {}{}\n",
            watch.resource,
            if watch.synced {
                "synced"
            } else {
                "not synced yet"
            },
            watch
                .error
                .as_ref()
                .map(|e| format!(", failing for {}s: {e}", watch.failing_secs))
                .unwrap_or_default()
        ));
    }
    text
}

fn pods_table(pods: &[PodSummary]) -> String {
    let mut rows = vec![vec![
        "NAME".into(),
        "NETNS".into(),
        "COOKIE".into(),
        "LISTENERS".into(),
    ]];
    rows.extend(pods.iter().map(|p| {
        let listeners: Vec<String> = p.listeners.iter().map(|l| l.to_string()).collect();
        vec![
            p.name.clone(),
            p.netns.display().to_string(),
            p.netns_cookie.to_string(),
            listeners.join(","),
        ]
    }));
    table(&rows)
}

fn conns_table(conns: &[ConnRecord]) -> String {
    let header = [
        "ID",
        "POD",
        "CLIENT",
        "ORIGINAL DST",
        "SERVICE",
        "UPSTREAM",
        "VERDICT",
        "SNI",
        "FLAGS",
        "IN",
        "OUT",
        "AGE",
        "CLOSE",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    rows.extend(conns.iter().map(|c| {
        vec![
            c.id.to_string(),
            c.pod.clone(),
            c.client.to_string(),
            c.original_dst.to_string(),
            or_dash(c.service.clone()),
            or_dash(c.upstream.map(|u| u.to_string())),
            c.verdict.map_or("detecting", |v| v.as_str()).to_string(),
            or_dash(c.sni.clone()),
            flags(&c.flags),
            c.bytes_from_client.to_string(),
            c.bytes_to_client.to_string(),
            format!("{:.1}s", c.duration_ms as f64 / 1000.0),
            or_dash(c.close_reason.clone()),
        ]
    }));
    table(&rows)
}

fn streams_table(streams: &[StreamRecord]) -> String {
    let header = [
        "POD", "METHOD", "PATH", "UPSTREAM", "STATUS", "GRPC", "FLAGS", "MS",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    rows.extend(streams.iter().map(|s| {
        vec![
            s.pod.clone(),
            s.method.clone(),
            s.path.clone(),
            or_dash(s.upstream.map(|u| u.to_string())),
            or_dash(s.status.map(|c| c.to_string())),
            or_dash(s.grpc_status.clone()),
            flags(&s.flags),
            s.duration_ms.to_string(),
        ]
    }));
    table(&rows)
}

fn faults_table(rules: &[RuleSummary]) -> String {
    let header = [
        "RULE", "SOURCE", "MATCH", "FAULTS", "DELAYS", "ABORTS", "TCP", "OVERFLOW",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for r in rules {
        let m = &r.rule.matches;
        let target = m
            .service
            .clone()
            .or_else(|| m.vip.map(|v| v.to_string()))
            .unwrap_or_default();
        let mut kinds = Vec::new();
        if let Some(d) = &r.rule.delay {
            kinds.push(format!("delay {:?} @{}%", d.fixed, d.percentage.0));
        }
        if let Some(a) = &r.rule.abort {
            let status = a
                .grpc_status
                .clone()
                .or_else(|| a.http_status.map(|s| s.to_string()))
                .unwrap_or_default();
            kinds.push(format!("abort {status} @{}%", a.percentage.0));
        }
        if r.rule.tcp.is_some() {
            kinds.push("tcp".into());
        }
        if r.rule.header_control {
            kinds.push("header-control".into());
        }
        rows.push(vec![
            r.rule.name.clone(),
            r.source.clone(),
            target,
            kinds.join(", "),
            r.delays.to_string(),
            r.aborts.to_string(),
            r.tcp_faults.to_string(),
            r.overflow.to_string(),
        ]);
    }
    table(&rows)
}

fn kernel_path_text(summary: &KernelPathSummary) -> String {
    let mut text = format!("kernel path: {}", summary.mode);
    if !summary.ports.is_empty() {
        let ports: Vec<String> = summary.ports.iter().map(u16::to_string).collect();
        text.push_str(&format!("; ports {}", ports.join(", ")));
    }
    text.push('\n');
    if let Some(error) = &summary.error {
        text.push_str(&format!("error: {error}\n"));
    }
    let header = [
        "DESTINATION",
        "SERVICE",
        "WHY",
        "PATH",
        "ENDPOINTS",
        "SAMPLED",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for entry in &summary.destinations {
        let endpoints: Vec<String> = entry.endpoints.iter().map(|e| e.to_string()).collect();
        rows.push(vec![
            entry.destination.to_string(),
            entry.service.clone().unwrap_or_else(|| "-".into()),
            entry.reason.clone(),
            entry.path.clone(),
            match endpoints.is_empty() {
                true => "-".into(),
                false => endpoints.join(" "),
            },
            match entry.sample_every {
                0 => "-".into(),
                n => format!("1 in {n}"),
            },
        ]);
    }
    text.push_str(&table(&rows));
    text
}

fn services_table(services: &[ServiceSummary]) -> String {
    let header = [
        "SERVICE",
        "VIP",
        "ENDPOINT",
        "IN ROTATION",
        "STREAMS (ACTIVE/TOTAL)",
        "CONNS (ACTIVE/TOTAL)",
        "FAILED",
        "UPSTREAM H2 CONNS",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for service in services {
        if service.endpoints.is_empty() {
            rows.push(vec![
                service.name.clone(),
                service.vip.to_string(),
                "(none)".into(),
            ]);
        }
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let (name, vip) = if i == 0 {
                (service.name.clone(), service.vip.to_string())
            } else {
                (String::new(), String::new())
            };
            rows.push(vec![
                name,
                vip,
                endpoint.addr.to_string(),
                if endpoint.in_rotation {
                    "yes"
                } else {
                    "draining"
                }
                .into(),
                format!("{}/{}", endpoint.streams_active, endpoint.streams_total),
                format!(
                    "{}/{}",
                    endpoint.connections_active, endpoint.connections_total
                ),
                endpoint.failed.to_string(),
                endpoint.upstreams_open.to_string(),
            ]);
        }
    }
    table(&rows)
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::KernelFeature;

    #[test]
    fn the_kernel_line_names_what_is_missing_and_what_has_it() {
        let feature = |name: &str, available| KernelFeature {
            name: name.into(),
            available,
            needs: "Linux 5.15 (x)".into(),
        };
        let mut kernel = KernelStatus {
            release: "5.10.0-28-amd64".into(),
            features: vec![
                feature("local_fast_path", false),
                feature("sockmap_forwarding", true),
            ],
        };
        assert_eq!(
            kernel_text(&kernel),
            "kernel: 5.10.0-28-amd64, lacks:\n  local_fast_path (needs Linux 5.15 (x))\n"
        );
        kernel.features[0].available = true;
        assert_eq!(
            kernel_text(&kernel),
            "kernel: 5.10.0-28-amd64, every optional feature available\n"
        );
    }
}
