//! Probes on a TCP port (`admin.health_listen`), for the kubelet: `/healthz/live` answers
//! while the daemon runs; `/healthz/ready` once it serves — in Kubernetes mode, once every
//! API watch has listed its objects (a watch failing later keeps the last known state, so
//! the node stays ready and keeps intercepting).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::k8s::Health;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, kubernetes: Option<Arc<Health>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("health accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let kubernetes = kubernetes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = answer(req.uri().path(), kubernetes.as_deref());
                async move { Ok::<_, Infallible>(reply) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, kubernetes: Option<&Health>) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz/live" => (StatusCode::OK, "live\n".to_owned()),
        "/healthz/ready" => match kubernetes.map(Health::summary) {
            Some(k) if !k.watches.iter().all(|w| w.synced) => {
                let waiting: Vec<&str> = k
                    .watches
                    .iter()
                    .filter(|w| !w.synced)
                    .map(|w| w.resource.as_str())
                    .collect();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("waiting for the first list of: {}\n", waiting.join(", ")),
                )
            }
            _ => (StatusCode::OK, "ready\n".to_owned()),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_watch_has_synced() {
        assert_eq!(answer("/healthz/ready", None).status(), StatusCode::OK);
        let health = Health::new("node-a".into());
        health.register("pods", "/api/v1/pods");
        health.register("services", "/api/v1/services");
        health.synced("pods");
        assert_eq!(
            answer("/healthz/ready", Some(&health)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            answer("/healthz/live", Some(&health)).status(),
            StatusCode::OK
        );
        health.synced("services");
        // A watch failing later keeps the node ready: it serves from the last known state.
        health.failed("services", "connection refused".into());
        assert_eq!(
            answer("/healthz/ready", Some(&health)).status(),
            StatusCode::OK
        );
        assert_eq!(
            answer("/other", Some(&health)).status(),
            StatusCode::NOT_FOUND
        );
    }
}
