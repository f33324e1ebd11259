//! `shunt run`: wires the parts together and owns their lifetimes.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    admin::{
        access::Access,
        server::{self as admin, AdminContext, Command},
    },
    bpf::{self, Datapath, DatapathConfig},
    config::Config,
    fault::Faults,
    handoff,
    inpod::{EnrollmentConfig, Enrollments, Origin},
    k8s,
    kernel_path::{self, KernelPath, Recorder},
    privileges,
    proxy::{Proxy, Settings},
    reload::{Configs, size_limits},
    state::{ConnTable, Learner, ProxyCounters, StreamLog},
    telemetry::{self, Telemetry},
    workers::Workers,
};

/// A daemon ready to start: its configuration read, the open-file limit raised and the
/// connection limits sized to it, privileges reduced.
pub struct Prepared {
    config_path: PathBuf,
    config: Config,
    kubernetes: bool,
}

/// What `shunt run` does before the process has any thread other than the caller: capability
/// sets are per thread, and each thread inherits its creator's, so reducing them here
/// reduces them for every thread the daemon will ever run.
pub fn prepare(config_path: &Path, kubernetes: bool) -> anyhow::Result<Prepared> {
    let mut config = Config::load(config_path)?;
    // Need CAP_SYS_RESOURCE, which is not kept: limits are the process's, not a thread's.
    crate::open_files::raise();
    bpf::raise_memlock_limit();
    config.limits = size_limits(&config.limits);
    privileges::restrict_to(&privileges::Needs::for_config(&config, kubernetes))?;
    Ok(Prepared {
        config_path: config_path.to_owned(),
        config,
        kubernetes,
    })
}

pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        config_path,
        config,
        kubernetes,
    } = prepared;
    let config_path = config_path.as_path();
    let started = Instant::now();
    let socket_path = config.admin.socket.clone();
    // Before taking over: a group that does not resolve must not stop the running daemon.
    let admin_access = Access::new(config.admin.group.as_deref())?;
    // A daemon already serving: take its work over (an upgrade or restart) rather than
    // refuse to start. It keeps serving until this one has adopted its listeners.
    let mut taken = match handoff::running_daemon(&socket_path).await {
        true => Some(handoff::take(&socket_path).await.with_context(|| {
            format!(
                "a daemon is serving {}; taking over from it",
                socket_path.display()
            )
        })?),
        false => None,
    };
    let handed = taken.as_ref().map(|t| (t.from_pid, t.listener_count()));
    let inherited = taken
        .as_mut()
        .map(|t| std::mem::take(&mut t.telemetry))
        .unwrap_or_default();
    // First, so `/live` answers (and `/ready` says "starting") while the rest comes up.
    let telemetry = Telemetry::start(&config.telemetry, inherited)?;
    let intercept = &config.intercept;

    // From here until the daemon runs, a failure removes the pins this start made.
    let rollback = bpf::Rollback::begin(&intercept.pin_dir);
    let mut datapath = Datapath::install(
        &DatapathConfig {
            cgroup: intercept.cgroup.clone(),
            pin_dir: intercept.pin_dir.clone(),
            listen_port: intercept.listen_port,
            mark: intercept.mark,
            fail_mode: intercept.fail_mode,
            exclude_cidrs: intercept.exclude_cidrs.clone(),
            exclude_ports: intercept.exclude_ports.clone(),
            local_fast_path: intercept.local_fast_path,
            taking_over: taken.is_some(),
        },
        current_log_level(),
    )
    .context("setting up the eBPF programs")?;
    tracing::info!(
        cgroup = %datapath.cgroup.display(),
        pin_dir = %datapath.pin_dir.display(),
        attachment = %datapath.attachment,
        local_fast_path = %datapath.local_fast_path,
        "programs attached"
    );

    let (kernel_routes, kernel_events) = datapath
        .take_kernel_path()
        .context("the kernel path's maps were taken twice")?;
    let conns = Arc::new(ConnTable::new(telemetry.observer()));
    let counters = Arc::new(ProxyCounters::default());
    let (stop_connections, shutdown) = tokio::sync::watch::channel(false);
    let (warmed, warming) = tokio::sync::watch::channel(kubernetes && taken.is_some());
    let faults = Arc::new(Faults::new(config.faults.clone(), config.max_active_faults));
    let settings = Arc::new(ArcSwap::from_pointee(Settings::new(&config)));
    let workers = match intercept.workers {
        0 => Workers::default_count(),
        n => n,
    };
    let workers = Workers::start(workers).context("starting the worker threads")?;
    tracing::info!(workers = workers.count(), "worker threads started");
    let learner = Arc::new(Learner::new(
        intercept.kernel_path == crate::config::KernelPathMode::Learned,
    ));
    let proxy = Arc::new(Proxy {
        workers,
        faults: faults.clone(),
        streams: Arc::new(StreamLog::new(telemetry.observer())),
        observer: telemetry.observer(),
        shutdown,
        dst_table: datapath.original_dst_table()?,
        sockmap: datapath.sockmap(),
        local_fast_path: datapath.local_fast_path_in_use(),
        conns: conns.clone(),
        counters: counters.clone(),
        mark: intercept.mark,
        settings: settings.clone(),
        discovered: Default::default(),
        admission: Default::default(),
        learner: learner.clone(),
        warming,
    });
    let datapath = Arc::new(Mutex::new(datapath));
    let enrollments = Arc::new(Enrollments::new(
        datapath.clone(),
        proxy.clone(),
        EnrollmentConfig {
            listen_port: intercept.listen_port,
            mark: intercept.mark,
        },
    ));

    let kernel_path = KernelPath::start(
        kernel_routes,
        kernel_path::Inputs {
            settings: settings.clone(),
            discovered: proxy.discovered.clone(),
            faults: faults.clone(),
            learner,
        },
    );
    let pods = Arc::downgrade(&enrollments);
    let failed = Arc::downgrade(&kernel_path);
    tokio::spawn(
        Recorder {
            conns: conns.clone(),
            observer: telemetry.observer(),
            counters: counters.clone(),
            settings: settings.clone(),
            discovered: proxy.discovered.clone(),
            pods: Box::new(move |cookie| pods.upgrade()?.pod_name(cookie)),
            connect_failed: Box::new(move || {
                if let Some(kernel_path) = failed.upgrade() {
                    kernel_path.connect_failed();
                }
            }),
        }
        .run(kernel_events),
    );

    // Handed-over listeners accept from here on, alongside the old daemon's copies.
    if let Some(taken) = taken.as_mut() {
        enrollments.adopt(std::mem::take(&mut taken.pods));
    }
    // One pod failing to enroll must not keep the others from being served.
    for (i, pod) in config.pods.iter().enumerate() {
        if let Err(e) = enrollments.enroll(&pod.name, &pod.netns, Origin::Config) {
            tracing::error!("pods[{i}]: {e}; skipping this pod");
        }
    }
    // In Kubernetes mode the pods' controller prunes once it has the cluster's view, so a
    // restart does not drop enrollments it is about to make again.
    let controllers = match kubernetes {
        true => {
            enrollments.release_unclaimed(&[Origin::Config]);
            Some(
                k8s::start(
                    &config.kubernetes,
                    enrollments.clone(),
                    proxy.discovered.clone(),
                    faults.clone(),
                )
                .await
                .context("starting Kubernetes mode")?,
            )
        }
        false => {
            enrollments.release_unclaimed(&[Origin::Config, Origin::Kubernetes]);
            enrollments.prune_stale();
            None
        }
    };
    let kubernetes = controllers.as_ref().map(|c| c.health.clone());
    if let (Some(health), true) = (&kubernetes, *warmed.borrow()) {
        warm_up(health).await;
    }
    warmed.send_replace(false);

    if let (Some(taken), Some((pid, listeners))) = (taken, handed) {
        taken
            .finish()
            .await
            .with_context(|| format!("completing the takeover from pid {pid}"))?;
        tracing::info!(
            pid,
            listeners,
            "took over {listeners} listeners from pid {pid}"
        );
    }
    let (commands, mut command_rx) = mpsc::channel(4);
    let admin_listener = admin::bind(&socket_path, &admin_access).await?;
    let configs = Arc::new(Configs::new(
        config_path,
        config,
        settings.clone(),
        faults.clone(),
    ));
    let handing_off = Arc::new(AtomicBool::new(false));
    let admin_ctx = Arc::new(AdminContext {
        configs: configs.clone(),
        settings: settings.clone(),
        discovered: proxy.discovered.clone(),
        faults: faults.clone(),
        streams: proxy.streams.clone(),
        telemetry: telemetry.clone(),
        started,
        enrollments: enrollments.clone(),
        programs: datapath.clone(),
        conns: conns.clone(),
        counters: counters.clone(),
        commands,
        kubernetes: kubernetes.clone(),
        handing_off: handing_off.clone(),
        kernel_path: {
            let kernel_path = kernel_path.clone();
            Arc::new(move || kernel_path.summary())
        },
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_access, admin_ctx));
    // Narrow handles, not the proxy: telemetry outlives what it reports on, and must not keep
    // it alive (the proxy holds telemetry).
    let ebpf = datapath.clone();
    let kernel_features = ebpf
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .kernel
        .features()
        .into_iter()
        .map(|f| (f.name, f.available))
        .collect();
    let ebpf_counters = move || ebpf.lock().unwrap_or_else(|p| p.into_inner()).counters();
    let enrolled = Arc::downgrade(&enrollments);
    telemetry.serve_metrics(telemetry::Sources {
        conns: conns.clone(),
        counters,
        faults,
        settings,
        ebpf_counters: Box::new(ebpf_counters),
        pods_enrolled: Box::new(move || enrolled.upgrade().map_or(0, |e| e.list().len())),
        kernel_features,
    });
    let watches = kubernetes.clone();
    telemetry.health().set_ready(move || {
        let missing = datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .missing_links();
        if !missing.is_empty() {
            return Some(format!("programs detached: {}", missing.join(", ")));
        }
        // In Kubernetes mode, not before every API watch has listed its objects once; a
        // watch failing later keeps the last known state, so the node stays ready.
        let summary = watches.as_ref()?.summary();
        let waiting: Vec<&str> = summary
            .watches
            .iter()
            .filter(|w| !w.synced)
            .map(|w| w.resource.as_str())
            .collect();
        (!waiting.is_empty())
            .then(|| format!("waiting for the first list of: {}", waiting.join(", ")))
    });
    let addresses = telemetry.addresses;
    tracing::info!(
        socket = %socket_path.display(),
        metrics = ?addresses.metrics,
        health = ?addresses.health,
        pods = enrollments.list().len(),
        "shunt is running"
    );

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    rollback.keep();
    let successor = loop {
        tokio::select! {
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: stopping (programs stay pinned; fail mode applies)");
                break None;
            }
            _ = sigint.recv() => {
                tracing::info!("SIGINT: stopping (programs stay pinned; fail mode applies)");
                break None;
            }
            _ = sighup.recv() => {
                // Errors are logged by `reload`; the running configuration stays.
                let _ = configs.reload();
            }
            Some(command) = command_rx.recv() => match command {
                Command::Uninstall => {
                    tracing::info!("uninstalled: stopping");
                    break None;
                }
                Command::HandOff(request) => {
                    let offered = enrollments.offer();
                    let listeners: usize = offered.iter().map(|p| p.listeners.len()).sum();
                    match handoff::give::give(request.socket, offered, telemetry.offer_listeners()).await {
                        Ok(adopted) => {
                            tracing::info!(
                                pid = adopted.pid,
                                "pid {} adopted {listeners} pod listeners: handing over",
                                adopted.pid
                            );
                            break Some(adopted);
                        }
                        Err(e) => {
                            tracing::error!(pid = request.pid, "handoff failed, carrying on serving: {e}");
                            handing_off.store(false, Ordering::Release);
                        }
                    }
                }
            },
        }
    };
    // New connections go direct (or are refused) from here, or to the daemon taking over;
    // established ones get `drain_timeout` to finish, HTTP/2 ones told so with GOAWAY.
    telemetry.health().set_stopping();
    drop(controllers);
    enrollments.close_all();
    let handed_over = successor.is_some();
    if let Some(successor) = successor {
        // Enrollments and pins are the new daemon's now: only this process's copies go.
        let pid = successor.pid;
        telemetry.close_listeners();
        admin_task.abort();
        let _ = std::fs::remove_file(&socket_path);
        if let Err(e) = successor.release().await {
            tracing::warn!(pid, "telling the new daemon the admin socket is free: {e}");
        }
        tracing::info!(pid, "handed over to pid {pid}");
    }
    let _ = stop_connections.send(true);
    tracing::info!(
        connections = conns.len(),
        "draining {} connections",
        conns.len()
    );
    let deadline = Instant::now() + configs.in_force().intercept.drain_timeout;
    while conns.len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if conns.len() > 0 {
        tracing::info!(
            connections = conns.len(),
            "drain timeout passed; closing the rest"
        );
    } else {
        tracing::info!("drained");
    }
    if !handed_over {
        let _ = std::fs::remove_file(&socket_path);
    } else if kubernetes.is_some() {
        // A container that exits is restarted by the kubelet, and would take the node's work
        // back from its successor: stay, idle, until the pod is deleted.
        tracing::info!("handed over and drained; waiting for SIGTERM");
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    }
    // What outlived the drain is cancelled here, with the worker threads joined, rather than
    // left to the process's exit; the proxy itself goes when the main runtime drops the
    // control plane's tasks (nothing else holds it: telemetry reads narrow handles).
    proxy.workers.shutdown();
    Ok(())
}

fn current_log_level() -> log::LevelFilter {
    use tracing_subscriber::filter::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => log::LevelFilter::Off,
        LevelFilter::ERROR => log::LevelFilter::Error,
        LevelFilter::WARN => log::LevelFilter::Warn,
        LevelFilter::INFO => log::LevelFilter::Info,
        LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Longest a daemon taking over in Kubernetes mode waits for its first view of the cluster
/// before its listeners accept anyway (the API server may be away: the old daemon must
/// still stop).
const WARM_UP_LIMIT: Duration = Duration::from_secs(30);

/// Waits until every API watch has listed its objects, so the first connection this daemon
/// accepts already finds its Service: before, a call to a Service address would be sent to
/// the address itself.
async fn warm_up(health: &k8s::Health) {
    let started = Instant::now();
    match tokio::time::timeout(WARM_UP_LIMIT, health.all_synced()).await {
        Ok(()) => tracing::info!(
            after = ?started.elapsed(),
            "every API watch listed: accepting on the handed-over listeners"
        ),
        Err(_) => tracing::warn!(
            "the API watches have not listed within {WARM_UP_LIMIT:?}: accepting anyway, \
             Service addresses are dialled as they are until they are known"
        ),
    }
}
