//! The state of each API watch, for `shunt status`: whether it has its first complete list,
//! and whether it is failing (and since when). Failing watches keep their last known objects.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub struct Health {
    node: String,
    watches: Mutex<BTreeMap<&'static str, WatchState>>,
}

#[derive(Default)]
struct WatchState {
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
    /// Has had a complete list at least once.
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
        }
    }

    pub fn register(&self, resource: &'static str) {
        self.lock().entry(resource).or_default();
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

    /// The watch has a complete list of its objects.
    pub fn synced(&self, resource: &'static str) {
        self.ok(resource);
        self.lock().entry(resource).or_default().synced = true;
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

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_only_when_every_watch_is_synced_and_working() {
        let health = Health::new("node-a".into());
        health.register("pods");
        health.register("services");
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
