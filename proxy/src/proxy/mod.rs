//! The data path in userspace: accept on an in-pod listener → identify the original
//! destination → route → detect → forward. Each stage hands the connection to the next;
//! none calls back.

pub mod admission;
mod detect;
mod dial;
mod forward;
pub mod sniff;
mod sockmap;
mod splice;
#[allow(unsafe_code)]
mod sys;

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use shunt_common::ClientKey;
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

use crate::{
    bpf::{OriginalDstTable, Sockmap},
    config::{Config, Forwarding, KernelPathMode, Limits},
    discovery,
    fault::{self, Faults},
    http2,
    net::{canonical, from_raw, to_raw},
    route::{DiscoveredServices, Route, Routes},
    state::{ConnGuard, ConnTable, Learner, Observer, ProxyCounters, StreamLog, Verdict},
    workers::{WorkerId, Workers},
};

use self::{
    admission::{Admission, Backoff, OpenCount, Permit, Refused},
    dial::dial,
    forward::{How, Meters, forward, reset},
};

/// What a config reload may change; each connection works with the snapshot it started
/// with, so a reload never touches established connections.
pub struct Settings {
    pub routes: Routes,
    pub detect_timeout: Duration,
    pub opaque_ports: HashSet<u16>,
    /// Which destinations connect() sends past the proxy.
    pub kernel_path: KernelPathMode,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub forwarding: Forwarding,
    /// HTTP/2 PINGs toward clients.
    pub downstream_keepalive: http2::Keepalive,
    /// How new pods' upstream pools connect, ping and close idle connections.
    pub upstream_pool: http2::PoolSettings,
    /// Connection counts and buffer sizes.
    pub limits: Limits,
    /// What HTTP/2 clients may open and how long they may take.
    pub http2_limits: http2::Limits,
    /// Keeps the DNS Services' endpoints current while these settings are in force.
    _discovery: discovery::Watchers,
}

impl Settings {
    pub fn new(config: &Config) -> Settings {
        let intercept = &config.intercept;
        let routes = Routes::new(&config.services);
        Settings {
            _discovery: discovery::watch(config, &routes),
            routes,
            detect_timeout: intercept.detect_timeout,
            opaque_ports: intercept.opaque_ports.iter().copied().collect(),
            kernel_path: intercept.kernel_path,
            connect_timeout: intercept.connect_timeout,
            idle_timeout: intercept.idle_timeout,
            forwarding: intercept.forwarding,
            downstream_keepalive: http2::Keepalive {
                interval: config.http2.downstream_keepalive_interval,
                timeout: config.http2.keepalive_timeout,
            },
            upstream_pool: http2::PoolSettings {
                connect_timeout: intercept.connect_timeout,
                keepalive: http2::Keepalive {
                    interval: config.http2.upstream_keepalive_interval,
                    timeout: config.http2.keepalive_timeout,
                },
                idle_timeout: config.http2.upstream_idle_timeout,
                max_idle: config.http2.upstream_max_idle as usize,
            },
            limits: config.limits.clone(),
            http2_limits: http2::Limits::from(&config.http2),
        }
    }
}

/// Everything a connection's task needs, shared by all pods.
pub struct Proxy {
    pub dst_table: OriginalDstTable,
    /// Flips to `true` when the daemon stops: HTTP/2 connections send GOAWAY and drain.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub conns: Arc<ConnTable>,
    pub counters: Arc<ProxyCounters>,
    pub mark: u32,
    /// Shared with telemetry, which reports the routes' endpoints and the limits.
    pub settings: Arc<ArcSwap<Settings>>,
    /// Services from Kubernetes; the configuration's own take precedence.
    pub discovered: Arc<DiscoveredServices>,
    pub faults: Arc<Faults>,
    pub streams: Arc<StreamLog>,
    /// Told of connections as they open and of those with nowhere to go (metrics, access
    /// log); the table and the stream log tell it of the rest.
    pub observer: Arc<dyn Observer>,
    /// The threads connections run on.
    pub workers: Workers,
    /// The kernel fast path for `forwarding: sockmap`, or why this kernel lacks it.
    pub sockmap: Result<Arc<Sockmap>, String>,
    /// `intercept.local_fast_path` is in force, or was in the daemon this one took over from
    /// and its sockets are still open: client sockets may be on it, and then what
    /// the application sends waits in the socket's sk_msg queue, which only `recv` reads
    /// (`splice` and the sockmap verdict read the TCP receive queue), so opaque bytes are
    /// copied.
    pub local_fast_path: bool,
    /// Connections open on the node, against `limits.max_connections`.
    pub admission: Admission,
    /// Told what each connection was detected as (`intercept.kernel_path: learned`).
    pub learner: Arc<Learner>,
    /// `true` while the listeners must not accept yet: a daemon taking over in Kubernetes
    /// mode waits for its first view of the cluster's Services (as Envoy warms a listener
    /// before it takes traffic); meanwhile the daemon it takes over from, which accepts on
    /// the same sockets, serves them.
    pub warming: tokio::sync::watch::Receiver<bool>,
}

impl Proxy {
    /// Where a connection to `original_dst` goes: a Service of the configuration, else one
    /// discovered, else the destination itself.
    pub fn route(&self, settings: &Settings, original_dst: SocketAddr) -> Route {
        let service = settings.routes.lookup(original_dst);
        match service.or_else(|| self.discovered.lookup(original_dst)) {
            Some(service) => Route::Service(service),
            None => Route::Direct(original_dst),
        }
    }
}

/// How the data path takes a pod's connections. Enrollment, which owns the pod's network
/// namespace and listeners, hands them over through this and never sees the proxy behind it
/// (a test gives it a stand-in).
pub trait Intercept: Send + Sync {
    /// Accepts the pod's connections on each of `listeners`, one task per listener, until
    /// the tasks are aborted (on unenroll or shutdown).
    fn serve_pod(self: Arc<Self>, pod: Pod, listeners: &[Arc<TcpListener>]) -> Vec<AbortHandle>;
}

/// A pod as enrollment hands it to the data path.
pub struct Pod {
    pub name: String,
    pub netns_cookie: u64,
    /// Opens the pod's upstream connections: from inside its network namespace, marked so
    /// the programs let them through.
    pub connector: http2::Connector,
}

impl Intercept for Proxy {
    fn serve_pod(self: Arc<Self>, pod: Pod, listeners: &[Arc<TcpListener>]) -> Vec<AbortHandle> {
        let pod = Arc::new(PodContext::new(pod, &self));
        listeners
            .iter()
            .map(|listener| {
                tokio::spawn(serve(listener.clone(), pod.clone(), self.clone())).abort_handle()
            })
            .collect()
    }
}

/// The pod a listener belongs to.
struct PodContext {
    name: String,
    /// Opens this pod's upstream connections: from inside its network namespace, marked so
    /// the programs let them through (enrollment, which owns the namespace, provides it).
    connector: http2::Connector,
    netns_cookie: u64,
    /// This pod's upstream HTTP/2 connections, opened from inside its netns: one pool per
    /// worker, so a stream and the upstream connection it uses run on the same thread.
    upstreams: Vec<Arc<http2::Pool>>,
    /// Connections open from this pod, against `limits.max_connections_per_pod`.
    open: OpenCount,
}

impl PodContext {
    fn new(pod: Pod, proxy: &Proxy) -> PodContext {
        let pool_settings = proxy.settings.load().upstream_pool;
        PodContext {
            upstreams: (0..proxy.workers.count())
                .map(|_| {
                    Arc::new(http2::Pool::new(
                        pod.connector.clone(),
                        pool_settings,
                        proxy.counters.clone(),
                    ))
                })
                .collect(),
            name: pod.name,
            connector: pod.connector,
            netns_cookie: pod.netns_cookie,
            open: OpenCount::default(),
        }
    }

    /// The upstream pool of the worker a connection runs on.
    fn upstreams(&self, worker: WorkerId) -> &Arc<http2::Pool> {
        &self.upstreams[worker % self.upstreams.len()]
    }
}

/// Accepts until the task is aborted (on unenroll or shutdown); established connections
/// live in their own tasks and are unaffected. Never stops on its own: over a limit the
/// connection is refused and the loop goes on; when `accept()` fails (out of descriptors or
/// memory) it waits a little and tries again, so it neither spins nor gives up.
async fn serve(listener: Arc<TcpListener>, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    // A closed channel (the daemon gone past its start) means warm.
    let _ = proxy.warming.clone().wait_for(|warming| !*warming).await;
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff.succeeded();
                ProxyCounters::inc(&proxy.counters.accepted);
                let peer = canonical(peer);
                let limits = &proxy.settings.load().limits;
                match admission::admit(&proxy.admission.open, &pod.open, limits) {
                    Ok(permit) => {
                        // A proxy must not add Nagle's delay to small writes (HTTP/2
                        // frames, RPCs); the upstream side is set the same way when dialled.
                        let _ = stream.set_nodelay(true);
                        hand_to_worker(stream, peer, permit, &pod, &proxy);
                    }
                    Err(refused) => refuse(stream, peer, refused, limits, &pod, &proxy),
                }
            }
            Err(e) => {
                ProxyCounters::inc(&proxy.counters.accept_errors);
                let wait = backoff.failed();
                if let Some(held_back) = proxy.admission.accept_errors.ready() {
                    tracing::warn!(pod = %pod.name, retry_in = ?wait, held_back, "accept failed: {e}");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Resets a connection over a limit (see `admission`), and forgets its original destination
/// so the kernel's table does not fill with entries nobody will read.
fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    refused: Refused,
    limits: &Limits,
    pod: &PodContext,
    proxy: &Proxy,
) {
    reset(&stream);
    drop(stream);
    let _ = proxy.dst_table.take(&client_key(pod, peer));
    let counters = &proxy.counters;
    let (counter, max) = match refused {
        Refused::Node => (&counters.refused_node_limit, limits.max_connections),
        Refused::Pod => (&counters.refused_pod_limit, limits.max_connections_per_pod),
    };
    ProxyCounters::inc(counter);
    if let Some(held_back) = proxy.admission.refusals.ready() {
        tracing::warn!(
            pod = %pod.name,
            %peer,
            limit = refused.field(),
            max,
            node_open = proxy.admission.open.get(),
            pod_open = pod.open.get(),
            held_back,
            "connection refused (reset): limit reached"
        );
    }
}

/// Moves an accepted connection to the next worker, which runs it from here on.
fn hand_to_worker(
    stream: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    pod: &Arc<PodContext>,
    proxy: &Arc<Proxy>,
) {
    // Re-registered with the worker's reactor on arrival.
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(pod = %pod.name, %peer, "handing the connection over: {e}");
            return;
        }
    };
    let (pod, task_proxy) = (pod.clone(), proxy.clone());
    proxy
        .workers
        .dispatch(move |worker| match TcpStream::from_std(stream) {
            Ok(client) => {
                tokio::spawn(async move {
                    handle(client, peer, worker, pod, task_proxy).await;
                    drop(permit);
                });
            }
            Err(e) => tracing::warn!(pod = %pod.name, %peer, "taking the connection over: {e}"),
        });
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    worker: WorkerId,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    let Some(original_dst) = identify(&proxy, &pod, &client, peer) else {
        ProxyCounters::inc(&proxy.counters.no_original_dst);
        proxy.observer.unrouted(&pod.name, peer);
        tracing::debug!(pod = %pod.name, %peer, "no original destination recorded; closing");
        return;
    };
    let settings = proxy.settings.load_full();
    let route = proxy.route(&settings, original_dst);
    tracing::debug!(pod = %pod.name, client = %peer, %original_dst, service = route.service_name(), "intercepted");
    let mut guard = proxy
        .conns
        .open(&pod.name, peer, original_dst, route.service_name());
    let counters = &proxy.counters;

    let target = fault::Target {
        service: route.service_name(),
        original_dst,
        pod: &pod.name,
    };
    let connection_fault = proxy.faults.for_connection(&target);
    let dialing = async {
        if let Some(delay) = connection_fault.connect_delay {
            tokio::time::sleep(delay).await;
        }
        dial(&route, &pod.connector, settings.connect_timeout, counters).await
    };
    tokio::pin!(dialing);
    let detected = if settings.opaque_ports.contains(&original_dst.port()) {
        detect::Detected {
            verdict: Verdict::Skipped,
            hello: None,
            prefix: Vec::new(),
            dialed: None,
        }
    } else {
        match detect::detect(&mut client, dialing.as_mut(), settings.detect_timeout).await {
            Ok(detected) => detected,
            Err(e) => {
                tracing::debug!(pod = %pod.name, %peer, "client failed during detection: {e}");
                ProxyCounters::inc(&counters.client_resets);
                guard.flag("DR");
                guard.set_close_reason("client-reset");
                return;
            }
        }
    };
    ProxyCounters::inc(counters.verdict(detected.verdict));
    proxy.learner.observe(original_dst, detected.verdict);
    proxy
        .observer
        .connection_opened(route.service_name(), detected.verdict);
    guard.set_verdict(detected.verdict, detected.hello.as_ref());
    tracing::debug!(pod = %pod.name, client = %peer, verdict = detected.verdict.as_str(), sni = detected.hello.as_ref().and_then(|h| h.sni.as_deref()), "detected");

    if detected.verdict == Verdict::H2 {
        // Streams are routed one by one; a connection dialled meanwhile joins the pool if
        // the pool needs it, before the first stream looks for one.
        let pool = pod.upstreams(worker);
        if let Some(Ok(dialed)) = detected.dialed {
            pool.adopt(dialed.upstream, dialed.endpoint.as_ref(), dialed.stream)
                .await;
        }
        let lookup = proxy.clone();
        let downstream = http2::Downstream {
            routes: Arc::new(move |dst| lookup.route(&lookup.settings.load(), dst)),
            pool: pool.clone(),
            counters: proxy.counters.clone(),
            shutdown: proxy.shutdown.clone(),
            keepalive: settings.downstream_keepalive,
            faults: proxy.faults.clone(),
            pod: pod.name.as_str().into(),
            original_dst,
            client: peer,
            streams: proxy.streams.clone(),
            bytes: http2::StreamBytes {
                request: guard.bytes_from_client.clone(),
                response: guard.bytes_to_client.clone(),
            },
            limits: settings.http2_limits,
        };
        let reason = match http2::serve(client, detected.prefix, downstream).await {
            Ok(reason) => {
                if reason == "idle-timeout" {
                    guard.flag("SI");
                }
                reason.to_string()
            }
            Err(e) => format!("h2: {e}"),
        };
        add_bytes(counters, &guard);
        guard.set_close_reason(reason);
        return;
    }

    if connection_fault.connect_delay.is_some() {
        guard.flag("DI");
    }
    if connection_fault.reset {
        // An injected fault: as if the destination had reset the connection.
        reset(&client);
        guard.flag("FI");
        guard.set_close_reason("fault-reset");
        return;
    }

    let dialed = match detected.dialed {
        Some(result) => result,
        None => dialing.await,
    };
    let upstream = match dialed {
        Ok(dialed) => dialed,
        Err(e) => {
            // As if the destination had refused the client itself.
            ProxyCounters::inc(&counters.upstream_connect_failed);
            tracing::info!(pod = %pod.name, %original_dst, "upstream unreachable: {e}");
            guard.flag(e.flag());
            reset(&client);
            guard.set_close_reason(format!("upstream-unreachable: {e}"));
            return;
        }
    };
    guard.set_upstream(upstream.upstream);
    let _in_use = upstream.endpoint.as_ref().map(|e| e.connection());
    ProxyCounters::inc(&counters.forwarded);

    let closed = forward_opaque(
        &proxy,
        &guard,
        client,
        upstream.stream,
        &detected.prefix,
        &settings,
    )
    .await;
    match &closed {
        forward::Closed::ClientReset => {
            ProxyCounters::inc(&counters.client_resets);
            guard.flag("DR");
        }
        forward::Closed::UpstreamReset => {
            ProxyCounters::inc(&counters.upstream_resets);
            guard.flag("UR");
        }
        forward::Closed::IdleTimeout => {
            ProxyCounters::inc(&counters.idle_timeouts);
            guard.flag("SI");
        }
        forward::Closed::Error { .. } => ProxyCounters::inc(&counters.forward_errors),
        forward::Closed::Eof => {}
    }
    add_bytes(counters, &guard);
    guard.set_close_reason(closed.to_string());
}

/// Moves an opaque connection's bytes the configured way; `sockmap` falls back to splice
/// where the kernel cannot take the connection, and the record says why.
async fn forward_opaque(
    proxy: &Proxy,
    guard: &ConnGuard,
    client: TcpStream,
    upstream: TcpStream,
    prefix: &[u8],
    settings: &Settings,
) -> forward::Closed {
    let meters = Meters {
        from_client: &guard.bytes_from_client,
        to_client: &guard.bytes_to_client,
    };
    let how = |mode| How {
        mode,
        idle_timeout: settings.idle_timeout,
        copy_buffer: settings.limits.copy_buffer,
    };
    let splice_instead = |why: &str| {
        ProxyCounters::inc(&proxy.counters.sockmap_fallbacks);
        tracing::debug!("sockmap: spliced instead: {why}");
        guard.set_forwarding(format!("splice (sockmap: {why})"));
    };
    if proxy.local_fast_path && settings.forwarding != Forwarding::Copy {
        guard.set_forwarding(format!(
            "copy (local fast path; {})",
            settings.forwarding.as_str()
        ));
        return forward(client, upstream, prefix, meters, how(Forwarding::Copy)).await;
    }
    match (settings.forwarding, &proxy.sockmap) {
        (Forwarding::Sockmap, Ok(sockmap)) => {
            guard.set_forwarding(Forwarding::Sockmap.as_str());
            let outcome = sockmap::forward(
                sockmap,
                client,
                upstream,
                prefix,
                meters,
                &guard.kernel_bytes,
                settings.idle_timeout,
            )
            .await;
            match outcome {
                sockmap::Outcome::Done(closed) => {
                    ProxyCounters::inc(&proxy.counters.sockmap_forwarded);
                    closed
                }
                sockmap::Outcome::Fallback(f) => {
                    splice_instead(&f.reason);
                    let how = how(Forwarding::Splice);
                    forward(f.client, f.upstream, &f.prefix, meters, how).await
                }
            }
        }
        (Forwarding::Sockmap, Err(why)) => {
            splice_instead(why);
            forward(client, upstream, prefix, meters, how(Forwarding::Splice)).await
        }
        (mode, _) => {
            guard.set_forwarding(mode.as_str());
            forward(client, upstream, prefix, meters, how(mode)).await
        }
    }
}

/// Adds a finished connection's bytes to the proxy-wide totals.
fn add_bytes(counters: &ProxyCounters, guard: &ConnGuard) {
    let ordering = std::sync::atomic::Ordering::Relaxed;
    let from_client = guard.bytes_from_client.load(ordering);
    counters.bytes_from_clients.fetch_add(from_client, ordering);
    let to_client = guard.bytes_to_client.load(ordering);
    counters.bytes_to_clients.fetch_add(to_client, ordering);
}

/// The destination the client asked for: recorded by the programs at `connect()`, or else,
/// for a connection an `iptables … REDIRECT` rule sent to the listener (a node migrating from
/// iptables interception, or the comparison benchmark), the one netfilter's NAT recorded.
fn identify(
    proxy: &Proxy,
    pod: &PodContext,
    client: &TcpStream,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    match proxy.dst_table.take(&client_key(pod, peer)) {
        Ok(Some(dst)) => Some(SocketAddr::new(from_raw(dst.addr), dst.port)),
        Ok(None) => netfilter_original_dst(client),
        Err(e) => {
            tracing::warn!(pod = %pod.name, %peer, "reading the original destination: {e}");
            None
        }
    }
}

/// How the programs key a connection's original destination.
fn client_key(pod: &PodContext, peer: SocketAddr) -> ClientKey {
    ClientKey {
        netns_cookie: pod.netns_cookie,
        addr: to_raw(peer.ip()),
        port: peer.port(),
        _pad: [0; 6],
    }
}

/// `SO_ORIGINAL_DST`; `None` when netfilter did not rewrite the destination (no conntrack
/// entry, or one whose destination is the listener itself: proxying that would loop).
fn netfilter_original_dst(client: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = client.local_addr().ok()?;
    let dst = if local.is_ipv4() || canonical(local).is_ipv4() {
        let raw = getsockopt(client, sockopt::OriginalDst).ok()?;
        SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
            u16::from_be(raw.sin_port),
        ))
    } else {
        let raw = getsockopt(client, sockopt::Ip6tOriginalDst).ok()?;
        SocketAddr::from((
            std::net::Ipv6Addr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
        ))
    };
    (canonical(dst) != canonical(local)).then_some(dst)
}
