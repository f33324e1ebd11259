//! The state of each API watch, for `shunt status`: whether it has its first complete list,
//! and whether it is failing (and since when). Failing watches keep their last known objects.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub struct Health {
    node: String,
    watches: Mutex<BTreeMap<&'static str, WatchState>>,
    /// Woken when a watch has its first complete list.
    synced: tokio::sync::Notify,
}

#[derive(Default)]
struct WatchState {
    /// The resource's collection path, e.g. `/api/v1/pods`.
    path: String,
    synced: bool,
    error: Option<(String, Instant)>,
}

/// Kubernetes mode as `shunt status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubernetesStatus {
    pub node: String,
    /// Every watch has listed its objects and none is failing.
    pub connected: bool,
    pub watches: Vec<WatchStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchStatus {
    pub resource: String,
    /// Has had a complete list at least once, and it is in force.
    pub synced: bool,
    /// The last error while it keeps failing; `None` once it works again.
    pub error: Option<String>,
    pub failing_secs: u64,
}

impl Health {
    pub fn new(node: String) -> Health {
        Health {
            node,
            watches: Mutex::default(),
            synced: tokio::sync::Notify::new(),
        }
    }

    /// A watch that will be registered: it counts as not synced until it is.
    pub fn expect(&self, resource: &'static str) {
        self.lock().entry(resource).or_default();
    }

    pub fn register(&self, resource: &'static str, path: &str) {
        self.lock().entry(resource).or_default().path = path.to_owned();
    }

    /// The watched resource a request path is for.
    fn resource_at(&self, path: &str) -> Option<&'static str> {
        self.lock()
            .iter()
            .find(|(_, w)| w.path == path)
            .map(|(resource, _)| *resource)
    }

    /// The watch delivered something: it works.
    pub fn ok(&self, resource: &'static str) {
        let mut watches = self.lock();
        let watch = watches.entry(resource).or_default();
        if let Some((error, since)) = watch.error.take() {
            tracing::info!(
                resource,
                after = ?round(since.elapsed()),
                "Kubernetes API watch works again (last error: {error})"
            );
        }
    }

    /// The watch's complete list is in force (its controller has acted on it).
    pub fn synced(&self, resource: &'static str) {
        self.ok(resource);
        self.lock().entry(resource).or_default().synced = true;
        self.synced.notify_waiters();
    }

    /// Returns once every registered watch has had a complete list in force.
    pub async fn all_synced(&self) {
        loop {
            // Registered before the check, so a list completing in between still wakes it.
            let notified = self.synced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let all = {
                let watches = self.lock();
                !watches.is_empty() && watches.values().all(|w| w.synced)
            };
            if all {
                return;
            }
            notified.await;
        }
    }

    pub fn failed(&self, resource: &'static str, error: String) {
        let mut watches = self.lock();
        let watch = watches.entry(resource).or_default();
        match &mut watch.error {
            Some((last, _)) => *last = error,
            None => {
                tracing::warn!(
                    resource,
                    "Kubernetes API watch failing, keeping the last known state and retrying: {error}"
                );
                watch.error = Some((error, Instant::now()));
            }
        }
    }

    pub fn summary(&self) -> KubernetesStatus {
        let watches: Vec<WatchStatus> = self
            .lock()
            .iter()
            .map(|(resource, state)| WatchStatus {
                resource: (*resource).to_owned(),
                synced: state.synced,
                error: state.error.as_ref().map(|(e, _)| e.clone()),
                failing_secs: state
                    .error
                    .as_ref()
                    .map_or(0, |(_, since)| since.elapsed().as_secs()),
            })
            .collect();
        KubernetesStatus {
            node: self.node.clone(),
            connected: watches.iter().all(|w| w.synced && w.error.is_none()),
            watches,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, WatchState>> {
        self.watches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Marks a watch as working again as soon as a request for its resource is answered: a
/// resumed watch that has nothing new to say delivers no event, so the events alone would
/// leave it reported as failing.
#[derive(Clone)]
pub struct HealthLayer(pub Arc<Health>);

impl<S> tower::Layer<S> for HealthLayer {
    type Service = HealthService<S>;

    fn layer(&self, inner: S) -> HealthService<S> {
        HealthService {
            inner,
            health: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HealthService<S> {
    inner: S,
    health: Arc<Health>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for HealthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let resource = self.health.resource_at(request.uri().path());
        let health = self.health.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            if let (Some(resource), Ok(response)) = (resource, &answer)
                && response.status().is_success()
            {
                health.ok(resource);
            }
            answer
        })
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_only_when_every_watch_is_synced_and_working() {
        let health = Health::new("node-a".into());
        health.register("pods", "/api/v1/pods");
        health.register("services", "/api/v1/services");
        assert_eq!(health.resource_at("/api/v1/pods"), Some("pods"));
        assert_eq!(health.resource_at("/api/v1/namespaces/a/pods/b"), None);
        assert!(!health.summary().connected);
        health.synced("pods");
        health.synced("services");
        assert!(health.summary().connected);
        health.failed("pods", "connection refused".into());
        let summary = health.summary();
        assert!(!summary.connected);
        let pods = summary
            .watches
            .iter()
            .find(|w| w.resource == "pods")
            .unwrap();
        assert!(pods.synced, "a failing watch keeps what it had");
        assert_eq!(pods.error.as_deref(), Some("connection refused"));
        health.ok("pods");
        assert!(health.summary().connected);
    }
}
