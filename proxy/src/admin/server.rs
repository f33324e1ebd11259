//! Serves the admin API on a unix socket, to root and `admin.group` only (see `access`).

use std::{convert::Infallible, path::Path, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::UnixListener, sync::mpsc};

use super::{
    AdminError,
    access::Access,
    api::{
        self, Done, ErrorBody, FaultsSet, HandoffAccepted, HandoffRequest, LogFilter, Reloaded,
        Stats, Status, Uninstalled,
    },
    convert,
    programs::Programs,
    request::AdminRequest,
};
use crate::{
    fault::Faults,
    inpod::{Enrollments, Origin},
    logging,
    open_files::OpenFiles,
    proxy::Settings,
    reload::Configs,
    route::DiscoveredServices,
    state::{ConnTable, ProxyCounters, StreamLog},
    telemetry::Telemetry,
};

/// Requests are tiny; anything larger is refused rather than buffered.
const MAX_BODY: usize = 64 * 1024;

/// What the admin API can ask of the daemon beyond answering.
#[derive(Debug)]
pub enum Command {
    /// Remove every pin and stop.
    Uninstall,
    /// A new daemon asks to take over: send it the listeners over its rendezvous socket.
    HandOff(HandoffRequest),
}

/// What the handlers read and steer: each piece of state from its owner, never the proxy.
pub struct AdminContext {
    pub configs: Arc<Configs>,
    /// The settings in force (Services of the configuration, limits).
    pub settings: Arc<ArcSwap<Settings>>,
    pub discovered: Arc<DiscoveredServices>,
    pub faults: Arc<Faults>,
    pub streams: Arc<StreamLog>,
    /// Health, for `shunt status`.
    pub telemetry: Arc<Telemetry>,
    pub started: Instant,
    pub enrollments: Arc<Enrollments>,
    pub programs: Arc<dyn Programs>,
    pub conns: Arc<ConnTable>,
    pub counters: Arc<ProxyCounters>,
    pub commands: mpsc::Sender<Command>,
    /// The API watches' state, in Kubernetes mode.
    pub kubernetes: Option<Arc<crate::k8s::Health>>,
    /// Set while a handoff is under way (one at a time); cleared if it fails.
    pub handing_off: Arc<std::sync::atomic::AtomicBool>,
    /// What the kernel path takes now.
    pub kernel_path: KernelPathView,
}

/// The admin server's view of the kernel path.
pub type KernelPathView = Arc<dyn Fn() -> crate::kernel_path::KernelPathSummary + Send + Sync>;

/// Binds the socket (replacing a stale file left by a dead daemon, never a live one).
pub async fn bind(path: &Path, access: &Access) -> Result<UnixListener, AdminError> {
    let io_err = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    access.apply(path).map_err(io_err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, access: Access, ctx: Arc<AdminContext>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = Peer {
            refused: access.check(&stream).err(),
            root: stream.peer_cred().is_ok_and(|cred| cred.uid() == 0),
        };
        if let Some(why) = &peer.refused {
            tracing::warn!("admin connection refused: {why}");
        }
        let ctx = ctx.clone();
        let peer = Arc::new(peer);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ctx = ctx.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(answer(req, &peer, &ctx).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("admin connection: {e}");
            }
        });
    }
}

/// Who is on the other end of an admin connection.
struct Peer {
    /// Why it may not use the API at all, if it may not.
    refused: Option<String>,
    root: bool,
}

type Reply = Response<Full<Bytes>>;

/// Reads the request, parses it, and only then acts: nothing is done for a request that
/// does not parse.
async fn answer(req: Request<Incoming>, peer: &Peer, ctx: &AdminContext) -> Reply {
    if let Some(why) = &peer.refused {
        return error(StatusCode::FORBIDDEN, why.clone());
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading request: {e}")),
    };
    match AdminRequest::parse(&method, &path, &body) {
        Ok(AdminRequest::HandOff(_)) if !peer.root => error(
            StatusCode::FORBIDDEN,
            "only root may take over the daemon: it hands over every listener".into(),
        ),
        Ok(request) => execute(request, ctx).await,
        Err(e) => error(e.status(), e.to_string()),
    }
}

async fn execute(request: AdminRequest, ctx: &AdminContext) -> Reply {
    match request {
        AdminRequest::Status => json(StatusCode::OK, &status(ctx)),
        AdminRequest::Pods => json(
            StatusCode::OK,
            &convert::all::<_, api::PodSummary>(ctx.enrollments.list()),
        ),
        AdminRequest::Enroll(r) => {
            match ctx.enrollments.enroll(&r.name, &r.netns, Origin::Operator) {
                Ok(summary) => json(StatusCode::CREATED, &api::PodSummary::from(summary)),
                Err(e) => error(StatusCode::CONFLICT, e.to_string()),
            }
        }
        AdminRequest::Unenroll(name) => match ctx.enrollments.unenroll(&name) {
            Ok(()) => json(StatusCode::OK, &Done {}),
            Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
        },
        AdminRequest::Conns => json(
            StatusCode::OK,
            &convert::all::<_, api::ConnRecord>(ctx.conns.live()),
        ),
        AdminRequest::ClosedConns => json(
            StatusCode::OK,
            &convert::all::<_, api::ConnRecord>(ctx.conns.closed()),
        ),
        AdminRequest::Services => {
            // The configuration's first: they take precedence over discovered ones.
            let mut services = ctx.settings.load().routes.summaries();
            services.extend(ctx.discovered.summaries());
            json(
                StatusCode::OK,
                &convert::all::<_, api::ServiceSummary>(services),
            )
        }
        AdminRequest::KernelPath => json(
            StatusCode::OK,
            &api::KernelPathSummary::from((ctx.kernel_path)()),
        ),
        // The configuration's shape is the config file's, not the admin API's own.
        AdminRequest::Config => json(StatusCode::OK, &ctx.configs.in_force()),
        AdminRequest::LogLevel => json(
            StatusCode::OK,
            &LogFilter {
                filter: logging::current(),
            },
        ),
        AdminRequest::SetLogLevel(request) => match logging::set(&request.filter) {
            Ok(filter) => json(StatusCode::OK, &LogFilter { filter }),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        },
        AdminRequest::Reload => match ctx.configs.reload() {
            Ok((config, restart_needed)) => json(
                StatusCode::OK,
                &Reloaded {
                    services: config.services.len(),
                    restart_needed: restart_needed.into_iter().map(String::from).collect(),
                },
            ),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        },
        AdminRequest::Streams => json(
            StatusCode::OK,
            &convert::all::<_, api::StreamRecord>(ctx.streams.recent()),
        ),
        AdminRequest::Faults => json(
            StatusCode::OK,
            &convert::all::<_, api::RuleSummary>(ctx.faults.list()),
        ),
        AdminRequest::SetFaults(rules) => {
            let set: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
            ctx.faults.set(rules);
            tracing::info!(rules = ?set, "fault rules set");
            json(StatusCode::OK, &FaultsSet { set })
        }
        AdminRequest::ClearFault(name) => {
            if ctx.faults.clear(&name) {
                tracing::info!(rule = name, "fault rule cleared");
                json(StatusCode::OK, &Done {})
            } else {
                error(StatusCode::NOT_FOUND, format!("no fault rule {name:?}"))
            }
        }
        AdminRequest::Stats => json(StatusCode::OK, &stats(ctx)),
        AdminRequest::Uninstall => uninstall(ctx).await,
        AdminRequest::HandOff(request) => hand_off(ctx, request).await,
    }
}

fn status(ctx: &AdminContext) -> Status {
    let telemetry = &ctx.telemetry;
    // Before taking the datapath: the readiness probe locks it too.
    let ready = telemetry
        .health()
        .ready()
        .err()
        .unwrap_or_else(|| "ready".into());
    let programs = ctx.programs.status();
    let running = ctx.configs.running();
    let settings = ctx.settings.load();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        cgroup: programs.cgroup,
        pin_dir: programs.pin_dir,
        attachment: programs.attachment,
        listen_port: running.intercept.listen_port,
        fail_mode: running.intercept.fail_mode.into(),
        local_fast_path: programs.local_fast_path,
        local_fast_path_sockets: programs.local_fast_path_sockets,
        kernel: programs.kernel,
        pods: ctx.enrollments.list().len(),
        connections: ctx.conns.len(),
        services: settings.routes.len() + ctx.discovered.len(),
        fault_rules: ctx.faults.rules_in_force(),
        metrics: telemetry.addresses.metrics,
        health: telemetry.addresses.health,
        ready,
        access_log: running.telemetry.access_log.clone().into(),
        log_filter: logging::current(),
        open_files: OpenFiles::now().map(Into::into),
        max_connections: settings.limits.max_connections,
        max_connections_per_pod: settings.limits.max_connections_per_pod,
        kubernetes: ctx
            .kubernetes
            .as_ref()
            .map(|health| health.summary().into()),
    }
}

fn stats(ctx: &AdminContext) -> Stats {
    let ebpf = ctx.programs.counters();
    Stats {
        ebpf: ebpf.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        proxy: ctx
            .counters
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    }
}

async fn uninstall(ctx: &AdminContext) -> Reply {
    ctx.enrollments.close_all();
    match ctx.programs.uninstall() {
        Ok(removed) => {
            let _ = ctx.commands.send(Command::Uninstall).await;
            json(StatusCode::OK, &Uninstalled { removed })
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn hand_off(ctx: &AdminContext, request: HandoffRequest) -> Reply {
    use std::sync::atomic::Ordering;
    if ctx.handing_off.swap(true, Ordering::AcqRel) {
        return error(
            StatusCode::CONFLICT,
            "a handoff to another daemon is already under way".into(),
        );
    }
    tracing::info!(pid = request.pid, "a new daemon asks to take over");
    if ctx.commands.send(Command::HandOff(request)).await.is_err() {
        ctx.handing_off.store(false, Ordering::Release);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is stopping".into(),
        );
    }
    json(
        StatusCode::ACCEPTED,
        &HandoffAccepted {
            pid: std::process::id(),
        },
    )
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut reply = Response::new(Full::new(Bytes::from(body)));
            *reply.status_mut() = status;
            reply.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            reply
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Reply {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply
}

#[cfg(test)]
mod tests;
