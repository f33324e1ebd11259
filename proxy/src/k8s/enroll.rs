//! Which pods are intercepted: this node's running pods in namespaces labelled
//! `shunt.io/intercept=enabled`, except host-network pods and pods annotated
//! `shunt.io/intercept: disabled`. Each is enrolled under the name `namespace/pod` with the
//! network namespace of one of its processes, found through the host's `/proc`.
//!
//! Only pods enrolled here are ever unenrolled here: pods enrolled from the configuration or
//! with `shunt enroll` are left alone.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, Client, ResourceExt, runtime::watcher};

use super::{
    Health, INTERCEPT_ANNOTATION, INTERCEPT_DISABLED, INTERCEPT_ENABLED, INTERCEPT_LABEL, cgroup,
    watch::{Watched, settle},
};
use crate::inpod::{EnrollError, Enrollments, Origin};

/// How often pods whose processes could not be found yet are looked for again.
const RETRY: Duration = Duration::from_secs(2);

/// Why a pod is not intercepted; `None` when it is.
pub fn skip_reason(pod: &Pod, node: &str, enabled: &HashSet<String>) -> Option<&'static str> {
    let spec = pod.spec.as_ref();
    if !pod.namespace().is_some_and(|ns| enabled.contains(&ns)) {
        return Some("namespace not labelled shunt.io/intercept=enabled");
    }
    if spec.and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Some("on another node");
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Some("host network");
    }
    if pod
        .annotations()
        .get(INTERCEPT_ANNOTATION)
        .map(String::as_str)
        == Some(INTERCEPT_DISABLED)
    {
        return Some("opted out by annotation");
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        return Some("not running");
    }
    if pod.uid().is_none() {
        return Some("no UID");
    }
    None
}

pub fn intercept_enabled(namespace: &Namespace) -> bool {
    namespace.labels().get(INTERCEPT_LABEL).map(String::as_str) == Some(INTERCEPT_ENABLED)
}

/// The pods to intercept: `namespace/name` → UID.
pub fn desired_pods(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
    node: &str,
) -> BTreeMap<String, String> {
    let enabled: HashSet<String> = namespaces
        .iter()
        .filter(|ns| intercept_enabled(ns))
        .map(|ns| ns.name_any())
        .collect();
    pods.iter()
        .filter(|pod| skip_reason(pod, node, &enabled).is_none())
        .filter_map(|pod| {
            let key = format!("{}/{}", pod.namespace()?, pod.name_any());
            Some((key, pod.uid()?))
        })
        .collect()
}

/// A network namespace's identity: the nsfs device and inode.
type NetnsId = (u64, u64);

fn netns_id(path: &Path) -> std::io::Result<NetnsId> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

struct Mine {
    uid: String,
    netns: NetnsId,
}

/// Turns the desired pods into enrollments.
pub struct Enroller {
    enrollments: Arc<Enrollments>,
    node: String,
    proc_root: PathBuf,
    /// shunt's own namespace — the node's, as the DaemonSet uses the host network. A pod
    /// that resolves to it is never enrolled: that would intercept the whole node.
    host_netns: NetnsId,
    mine: HashMap<String, Mine>,
    /// Pods already reported as waiting, so a retry every few seconds does not repeat it.
    reported: HashSet<String>,
}

impl Enroller {
    pub fn new(
        enrollments: Arc<Enrollments>,
        node: String,
        proc_root: PathBuf,
    ) -> std::io::Result<Enroller> {
        Ok(Enroller {
            enrollments,
            node,
            proc_root,
            host_netns: netns_id(Path::new("/proc/self/ns/net"))?,
            mine: HashMap::new(),
            reported: HashSet::new(),
        })
    }

    /// Enrolls what is desired and not enrolled, unenrolls what is enrolled and no longer
    /// desired. Returns whether some pod could not be enrolled yet (to retry).
    pub fn reconcile(&mut self, desired: &BTreeMap<String, String>) -> bool {
        let gone: Vec<String> = self
            .mine
            .iter()
            .filter(|(name, mine)| desired.get(*name) != Some(&mine.uid))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.unenroll(&name);
        }
        self.reported.retain(|name| desired.contains_key(name));
        if desired.is_empty() {
            return false;
        }
        let pids = match cgroup::scan(&self.proc_root) {
            Ok(pids) => pids,
            Err(e) => {
                tracing::warn!(proc_root = %self.proc_root.display(), "cannot scan for pods' processes: {e}");
                return true;
            }
        };
        let mut pending = false;
        for (name, uid) in desired {
            let Some(&pid) = pids.get(uid) else {
                // Not started yet, or already gone: the pod object is ahead of its processes.
                if !self.mine.contains_key(name) {
                    self.report(name, "no process of the pod found yet; retrying");
                    pending = true;
                }
                continue;
            };
            let path = cgroup::netns_path(&self.proc_root, pid);
            let id = match netns_id(&path) {
                Ok(id) => id,
                Err(e) => {
                    self.report(name, &format!("{}: {e}; retrying", path.display()));
                    pending = true;
                    continue;
                }
            };
            if id == self.host_netns {
                self.report(
                    name,
                    "its processes are in the node's network namespace; not intercepted",
                );
                continue;
            }
            match self.mine.get(name) {
                Some(mine) if mine.netns == id => continue,
                // The pod's sandbox was recreated: a new namespace under the same pod.
                Some(_) => self.unenroll(name),
                None => {}
            }
            match self.enrollments.enroll(name, &path, Origin::Kubernetes) {
                Ok(_) => {
                    self.reported.remove(name);
                    self.mine.insert(
                        name.clone(),
                        Mine {
                            uid: uid.clone(),
                            netns: id,
                        },
                    );
                }
                Err(e) => {
                    self.report(name, &format!("{e}; retrying"));
                    pending = true;
                }
            }
        }
        pending
    }

    fn unenroll(&mut self, name: &str) {
        match self.enrollments.unenroll(name) {
            Ok(()) | Err(EnrollError::NotEnrolled(_)) => {
                self.mine.remove(name);
            }
            // Kept as ours, so the next reconcile tries again.
            Err(e) => tracing::warn!(pod = name, "unenrolling: {e}"),
        }
    }

    fn report(&mut self, name: &str, message: &str) {
        if self.reported.insert(name.to_owned()) {
            tracing::info!(pod = name, node = %self.node, "not enrolled: {message}");
        }
    }
}

/// Watches namespaces and this node's pods and keeps the enrollments in step, until the
/// daemon stops.
pub async fn run(client: Client, mut enroller: Enroller, health: Arc<Health>) {
    let mut namespaces = Watched::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        (),
        "namespaces",
        health.clone(),
    );
    let mut pods = Watched::new(
        Api::<Pod>::all(client),
        watcher::Config::default().fields(&format!("spec.nodeName={}", enroller.node)),
        (),
        "pods",
        health,
    );
    let mut pending = false;
    let mut pruned = false;
    loop {
        let mut both = (&mut namespaces, &mut pods);
        let alive = tokio::select! {
            alive = settle(&mut both) => alive,
            () = tokio::time::sleep(RETRY), if pending => true,
        };
        if !alive {
            tracing::error!("the pods' watch ended; enrollments stay as they are");
            return;
        }
        if !(namespaces.synced && pods.synced) {
            continue;
        }
        let desired = desired_pods(
            &namespaces.store.state(),
            &pods.store.state(),
            &enroller.node,
        );
        pending = enroller.reconcile(&desired);
        namespaces.applied();
        pods.applied();
        if !pruned {
            // Pods the daemon before this one intercepted and Kubernetes no longer wants,
            // then kernel-side enrollments of an earlier daemon no pod accounts for now.
            enroller
                .enrollments
                .release_unclaimed(&[Origin::Kubernetes]);
            enroller.enrollments.prune_stale();
            pruned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str, label: Option<&str>) -> Arc<Namespace> {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        if let Some(value) = label {
            ns.metadata.labels = Some([(INTERCEPT_LABEL.to_owned(), value.to_owned())].into());
        }
        Arc::new(ns)
    }

    fn pod(namespace: &str, name: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": namespace, "name": name, "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    #[test]
    fn only_running_pods_of_this_node_in_enabled_namespaces() {
        let namespaces = [
            namespace("on", Some("enabled")),
            namespace("off", None),
            namespace("other-value", Some("disabled")),
        ];
        let mut host = pod("on", "host", "node-a");
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut opted_out = pod("on", "opted-out", "node-a");
        opted_out.metadata.annotations = Some(
            [(
                INTERCEPT_ANNOTATION.to_owned(),
                INTERCEPT_DISABLED.to_owned(),
            )]
            .into(),
        );
        let mut pending = pod("on", "pending", "node-a");
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        let mut other_annotation = pod("on", "annotated", "node-a");
        other_annotation.metadata.annotations =
            Some([(INTERCEPT_ANNOTATION.to_owned(), "whatever".to_owned())].into());
        let pods: Vec<Arc<Pod>> = [
            pod("on", "app", "node-a"),
            pod("on", "elsewhere", "node-b"),
            pod("off", "app", "node-a"),
            pod("other-value", "app", "node-a"),
            host,
            opted_out,
            pending,
            other_annotation,
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let desired = desired_pods(&namespaces, &pods, "node-a");
        let names: Vec<&str> = desired.keys().map(String::as_str).collect();
        assert_eq!(names, ["on/annotated", "on/app"]);
        assert_eq!(desired["on/app"], "uid-app");

        let enabled: HashSet<String> = ["on".to_owned()].into();
        let reason = |name: &str| {
            let pod = pods.iter().find(|p| p.name_any() == name).unwrap();
            skip_reason(pod, "node-a", &enabled)
        };
        assert_eq!(reason("elsewhere"), Some("on another node"));
        assert_eq!(reason("host"), Some("host network"));
        assert_eq!(reason("opted-out"), Some("opted out by annotation"));
        assert_eq!(reason("pending"), Some("not running"));
    }
}
