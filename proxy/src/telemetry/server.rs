//! The metrics and health listeners: plain HTTP/1.1 on TCP, served by a thread of their own
//! with its own single-threaded runtime, apart from the proxy's.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding, registry::Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use super::{Addresses, Health, TelemetryError};
use crate::config::{self, Listen};

/// Which telemetry listener a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TelemetryRole {
    Metrics,
    Health,
}

/// A telemetry listener as configured (a configured port 0 matches a new daemon configured
/// the same way, which then serves on the port the old one was given).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TelemetryListener {
    pub role: TelemetryRole,
    pub configured: SocketAddr,
}

/// Scrapers and probers at once; more wait. Bounds what a misbehaving client can take.
const MAX_CONNECTIONS: usize = 32;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the listeners serve.
pub struct Served {
    registry: OnceLock<Registry>,
    health: Arc<Health>,
}

impl Served {
    pub fn new(health: Arc<Health>) -> Served {
        Served {
            registry: OnceLock::new(),
            health,
        }
    }

    pub fn install(&self, registry: Registry) {
        let _ = self.registry.set(registry);
    }
}

#[derive(Clone, Copy)]
enum Role {
    Metrics,
    Health,
}

/// The listening sockets as bound, kept so a new daemon can be handed them, and the switch
/// that stops serving them.
pub struct Listeners {
    held: Mutex<Vec<(TelemetryListener, OwnedFd)>>,
    stop: watch::Sender<bool>,
}

impl Listeners {
    /// Duplicates of the listeners, for a new daemon taking over.
    pub fn offer(&self) -> Vec<(TelemetryListener, OwnedFd)> {
        lock(&self.held)
            .iter()
            .filter_map(|(l, fd)| Some((*l, fd.try_clone().ok()?)))
            .collect()
    }

    /// Stops accepting and closes this process's copies (a new daemon serves them now).
    pub fn close(&self) {
        let _ = self.stop.send(true);
        lock(&self.held).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the configured listeners (so a taken port fails start-up, naming the field), or
/// takes the ones a previous daemon handed over for the same configured address, and serves
/// them on a new thread.
pub fn start(
    config: &config::Telemetry,
    served: Arc<Served>,
    mut inherited: Vec<(TelemetryListener, OwnedFd)>,
) -> Result<(Addresses, Arc<Listeners>), TelemetryError> {
    let mut listeners = Vec::new();
    let mut addresses = Addresses::default();
    let mut held = Vec::new();
    for (field, listen, role) in [
        ("metrics", config.metrics, Role::Metrics),
        ("health", config.health, Role::Health),
    ] {
        let Listen::On(addr) = listen else { continue };
        let listen_err = |source| TelemetryError::Listen {
            field,
            addr,
            source,
        };
        let described = TelemetryListener {
            role: match role {
                Role::Metrics => TelemetryRole::Metrics,
                Role::Health => TelemetryRole::Health,
            },
            configured: addr,
        };
        let same = |l: &TelemetryListener| l.role == described.role && l.configured == addr;
        let listener = match inherited.iter().position(|(l, _)| same(l)) {
            Some(i) => std::net::TcpListener::from(inherited.swap_remove(i).1),
            None => std::net::TcpListener::bind(addr).map_err(listen_err)?,
        };
        listener.set_nonblocking(true).map_err(listen_err)?;
        let bound = listener.local_addr().map_err(listen_err)?;
        match role {
            Role::Metrics => addresses.metrics = Some(bound),
            Role::Health => addresses.health = Some(bound),
        }
        held.push((
            described,
            listener.as_fd().try_clone_to_owned().map_err(listen_err)?,
        ));
        listeners.push((listener, role));
    }
    let (stop, stopped) = watch::channel(false);
    let handle = Arc::new(Listeners {
        held: Mutex::new(held),
        stop,
    });
    if listeners.is_empty() {
        return Ok((addresses, handle));
    }
    let thread_err = |source| TelemetryError::Thread {
        what: "telemetry",
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(thread_err)?;
    std::thread::Builder::new()
        .name("shunt-telemetry".into())
        .spawn(move || {
            runtime.block_on(async move {
                let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                let mut tasks = tokio::task::JoinSet::new();
                for (listener, role) in listeners {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let stopped = stopped.clone();
                            tasks.spawn(serve(
                                listener,
                                role,
                                served.clone(),
                                limit.clone(),
                                stopped,
                            ));
                        }
                        Err(e) => tracing::error!("telemetry listener: {e}"),
                    }
                }
                while tasks.join_next().await.is_some() {}
            });
        })
        .map_err(thread_err)?;
    Ok((addresses, handle))
}

async fn serve(
    listener: tokio::net::TcpListener,
    role: Role,
    served: Arc<Served>,
    limit: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            _ = stopped.wait_for(|&s| s) => return,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stopped.wait_for(|&s| s) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("telemetry accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = answer(&req, role, &served);
                async move { Ok::<_, Infallible>(reply) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn answer(req: &Request<Incoming>, role: Role, served: &Served) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match (role, req.uri().path()) {
        (Role::Metrics, "/metrics") => metrics(req, served),
        (Role::Health, "/live") => text(StatusCode::OK, "live\n".into()),
        (Role::Health, "/ready") => match served.health.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (Role::Metrics, _) => text(StatusCode::NOT_FOUND, "try /metrics\n".into()),
        (Role::Health, _) => text(StatusCode::NOT_FOUND, "try /live or /ready\n".into()),
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format
/// otherwise (older scrapers, promtool, curl).
fn metrics(req: &Request<Incoming>, served: &Served) -> Response<Full<Bytes>> {
    let Some(registry) = served.registry.get() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
    };
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::with_capacity(16 * 1024);
    let (encoded, content_type) = if openmetrics {
        (encoding::text::encode(&mut body, registry), OPENMETRICS)
    } else {
        (
            encoding::prometheus_text::encode(&mut body, registry),
            encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n".into(),
        );
    }
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    reply
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}
