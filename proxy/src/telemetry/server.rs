//! The metrics and health listeners: plain HTTP/1.1 on TCP, served by a thread of their own
//! with its own single-threaded runtime, apart from the proxy's.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding, registry::Registry};
use tokio::sync::Semaphore;

use super::{Addresses, Health, TelemetryError};
use crate::config::{self, Listen};

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

/// Binds the configured listeners (so a taken port fails start-up, naming the field) and
/// serves them on a new thread.
pub fn start(config: &config::Telemetry, served: Arc<Served>) -> Result<Addresses, TelemetryError> {
    let mut listeners = Vec::new();
    let mut addresses = Addresses::default();
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
        let listener = std::net::TcpListener::bind(addr).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let bound = listener.local_addr().map_err(listen_err)?;
        match role {
            Role::Metrics => addresses.metrics = Some(bound),
            Role::Health => addresses.health = Some(bound),
        }
        listeners.push((listener, role));
    }
    if listeners.is_empty() {
        return Ok(addresses);
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
                            tasks.spawn(serve(listener, role, served.clone(), limit.clone()));
                        }
                        Err(e) => tracing::error!("telemetry listener: {e}"),
                    }
                }
                while tasks.join_next().await.is_some() {}
            });
        })
        .map_err(thread_err)?;
    Ok(addresses)
}

async fn serve(
    listener: tokio::net::TcpListener,
    role: Role,
    served: Arc<Served>,
    limit: Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
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
