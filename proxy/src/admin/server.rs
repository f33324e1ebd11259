//! Serves the admin API on a unix socket readable and writable by root only.

use std::{
    convert::Infallible,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::UnixListener, sync::mpsc};

use super::api::{
    EnrollRequest, ErrorBody, FaultsRequest, FaultsSet, LogFilter, Reloaded, Stats, Status,
    Uninstalled,
};
use crate::{
    bpf::{self, Datapath},
    daemon::Configs,
    handoff::{HandoffAccepted, HandoffRequest, Origin},
    inpod::Enrollments,
    logging,
    proxy::Proxy,
    state::{ConnTable, ProxyCounters},
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

pub struct AdminContext {
    pub configs: Arc<Configs>,
    pub proxy: Arc<Proxy>,
    pub started: Instant,
    pub enrollments: Arc<Enrollments>,
    pub datapath: Arc<Mutex<Datapath>>,
    pub conns: Arc<ConnTable>,
    pub counters: Arc<ProxyCounters>,
    pub commands: mpsc::Sender<Command>,
    /// The API watches' state, in Kubernetes mode.
    pub kubernetes: Option<Arc<crate::k8s::Health>>,
    /// Set while a handoff is under way (one at a time); cleared if it fails.
    pub handing_off: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("another shunt daemon is already serving {0}")]
    InUse(PathBuf),
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket (replacing a stale file left by a dead daemon, never a live one).
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, ctx: Arc<AdminContext>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(req, &ctx).await) }
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

type Reply = Response<Full<Bytes>>;

async fn route(req: Request<Incoming>, ctx: &AdminContext) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/status") => json(StatusCode::OK, &status(ctx)),
        (&Method::GET, "/pods") => json(StatusCode::OK, &ctx.enrollments.list()),
        (&Method::POST, "/pods") => match body::<EnrollRequest>(req).await {
            Ok(r) => match ctx.enrollments.enroll(&r.name, &r.netns, Origin::Operator) {
                Ok(summary) => json(StatusCode::CREATED, &summary),
                Err(e) => error(StatusCode::CONFLICT, e.to_string()),
            },
            Err(reply) => reply,
        },
        (&Method::DELETE, p) if p.starts_with("/pods/") => {
            match ctx.enrollments.unenroll(&p["/pods/".len()..]) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({})),
                Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
            }
        }
        (&Method::GET, "/conns") => json(StatusCode::OK, &ctx.conns.live()),
        (&Method::GET, "/conns/closed") => json(StatusCode::OK, &ctx.conns.closed()),
        (&Method::GET, "/services") => json(StatusCode::OK, &ctx.proxy.service_summaries()),
        (&Method::GET, "/config") => json(StatusCode::OK, &ctx.configs.in_force()),
        (&Method::GET, "/log-level") => json(
            StatusCode::OK,
            &LogFilter {
                filter: logging::current(),
            },
        ),
        (&Method::PUT, "/log-level") => match body::<LogFilter>(req).await {
            Ok(request) => match logging::set(&request.filter) {
                Ok(filter) => json(StatusCode::OK, &LogFilter { filter }),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
            },
            Err(reply) => reply,
        },
        (&Method::POST, "/reload") => match ctx.configs.reload(&ctx.proxy) {
            Ok((config, restart_needed)) => json(
                StatusCode::OK,
                &Reloaded {
                    services: config.services.len(),
                    restart_needed: restart_needed.into_iter().map(String::from).collect(),
                },
            ),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        },
        (&Method::GET, "/streams") => json(StatusCode::OK, &ctx.proxy.streams.recent()),
        (&Method::GET, "/faults") => json(StatusCode::OK, &ctx.proxy.faults.list()),
        (&Method::POST, "/faults") => match body::<FaultsRequest>(req).await {
            Ok(request) => match crate::fault::parse_rules(&request.rules) {
                Ok(rules) => {
                    let set = rules.iter().map(|r| r.name.clone()).collect();
                    ctx.proxy.faults.set(rules);
                    tracing::info!(rules = ?set, "fault rules set");
                    json(StatusCode::OK, &FaultsSet { set })
                }
                Err((field, message)) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{field}: {message}"),
                ),
            },
            Err(reply) => reply,
        },
        (&Method::DELETE, p) if p.starts_with("/faults/") => {
            let name = &p["/faults/".len()..];
            if ctx.proxy.faults.clear(name) {
                tracing::info!(rule = name, "fault rule cleared");
                json(StatusCode::OK, &serde_json::json!({}))
            } else {
                error(StatusCode::NOT_FOUND, format!("no fault rule {name:?}"))
            }
        }
        (&Method::GET, "/stats") => json(StatusCode::OK, &stats(ctx)),
        (&Method::POST, "/uninstall") => uninstall(ctx).await,
        (&Method::POST, "/handoff") => match body::<HandoffRequest>(req).await {
            Ok(request) => hand_off(ctx, request).await,
            Err(reply) => reply,
        },
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}"),
        ),
    }
}

fn status(ctx: &AdminContext) -> Status {
    let telemetry = &ctx.proxy.telemetry;
    // Before taking the datapath: the readiness probe locks it too.
    let ready = telemetry
        .health()
        .ready()
        .err()
        .unwrap_or_else(|| "ready".into());
    let datapath = ctx.datapath.lock().unwrap_or_else(|p| p.into_inner());
    let running = ctx.configs.running();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        cgroup: datapath.cgroup.clone(),
        pin_dir: datapath.pin_dir.clone(),
        attachment: datapath.attachment,
        listen_port: running.intercept.listen_port,
        fail_mode: running.intercept.fail_mode,
        local_fast_path: datapath.local_fast_path.to_string(),
        local_fast_path_sockets: datapath.local_fast_path_sockets(),
        pods: ctx.enrollments.list().len(),
        connections: ctx.conns.len(),
        services: ctx.proxy.settings.load().routes.len() + ctx.proxy.discovered.len(),
        fault_rules: ctx.proxy.faults.rules_in_force(),
        metrics: telemetry.addresses.metrics,
        health: telemetry.addresses.health,
        ready,
        access_log: running.telemetry.access_log.clone().into(),
        log_filter: logging::current(),
        kubernetes: ctx.kubernetes.as_ref().map(|health| health.summary()),
    }
}

fn stats(ctx: &AdminContext) -> Stats {
    let ebpf = ctx
        .datapath
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .counters();
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
    let pin_dir = ctx
        .datapath
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pin_dir
        .clone();
    match bpf::uninstall(&pin_dir) {
        Ok(removed) => {
            let _ = ctx.commands.send(Command::Uninstall).await;
            json(StatusCode::OK, &Uninstalled { removed })
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
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

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))
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
