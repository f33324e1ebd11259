//! Kubernetes mode (`shunt run --kubernetes`): the cluster's API objects become what the
//! daemon's existing owners hold. Data flows one way — API objects → desired state → owner —
//! and nothing here touches the data path:
//!
//! - namespaces labelled `shunt.io/intercept=enabled` and this node's pods → enrolled pods
//!   (`enroll.rs`, finding each pod's network namespace through `/proc`, `cgroup.rs`);
//! - Services and EndpointSlices → the discovered Services (`services.rs`);
//! - `FaultInjection` resources → fault rules, with `Accepted` or the error in their status
//!   (`faults.rs`).
//!
//! Each controller keeps reflector stores (kube's watcher: list, then watch, resuming or
//! re-listing after errors with backoff). A lost API connection leaves the stores — and so
//! every enrollment, Service and rule — as they were; `health.rs` reports it in
//! `shunt status`.

mod cgroup;
mod enroll;
pub mod faults;
mod health;
#[cfg(test)]
mod manifests;
mod services;
mod watch;

use std::{path::PathBuf, sync::Arc};

use tokio::task::AbortHandle;

use kube::{
    Client,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
};

use health::HealthLayer;
pub use health::{Health, KubernetesStatus};

use crate::{config, fault::Faults, inpod::Enrollments, route::DiscoveredServices};

/// The label that enables interception in a namespace, and its value.
pub const INTERCEPT_LABEL: &str = "shunt.io/intercept";
pub const INTERCEPT_ENABLED: &str = "enabled";
/// The pod annotation that opts a pod out (`shunt.io/intercept: disabled`).
pub const INTERCEPT_ANNOTATION: &str = "shunt.io/intercept";
pub const INTERCEPT_DISABLED: &str = "disabled";

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "no node name: set kubernetes.node_name or $NODE_NAME (the downward API's spec.nodeName)"
    )]
    NoNodeName,
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("finding the API server (in-cluster, $KUBECONFIG or ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("creating the API client: {0}")]
    Client(#[from] kube::Error),
    #[error(
        "creating the API client: {0} (the configuration names no certificate authority for \
         the API server, so the system's are used: install CA certificates in \
         /etc/ssl/certs, or give the kubeconfig certificate-authority-data)"
    )]
    NoCertificateAuthority(kube::Error),
    #[error("reading this process's network namespace: {0}")]
    HostNetns(std::io::Error),
}

/// The running controllers; dropping this stops them (the daemon does, before it closes the
/// listeners, so no pod is enrolled while it shuts down).
pub struct Controllers {
    pub health: Arc<Health>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Controllers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the controllers: pods are enrolled through `enrollments`, Services kept in
/// `discovered`, `FaultInjection`s set in `faults`.
pub async fn start(
    settings: &config::Kubernetes,
    enrollments: Arc<Enrollments>,
    discovered: Arc<DiscoveredServices>,
    faults: Arc<Faults>,
) -> Result<Controllers, K8sError> {
    let node = match &settings.node_name {
        Some(node) => node.clone(),
        None => std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .ok_or(K8sError::NoNodeName)?,
    };
    let health = Arc::new(Health::new(node.clone()));
    // Known before the controllers' tasks run, so no one sees some watches synced and takes
    // it for all of them.
    for resource in WATCHED {
        health.expect(resource);
    }
    let client = client(settings, &health).await?;
    let enroller = enroll::Enroller::new(enrollments, node.clone(), settings.proc_root.clone())
        .map_err(K8sError::HostNetns)?;
    let tasks = vec![
        tokio::spawn(enroll::run(client.clone(), enroller, health.clone())).abort_handle(),
        tokio::spawn(services::run(client.clone(), discovered, health.clone())).abort_handle(),
        tokio::spawn(faults::run(client, faults, health.clone())).abort_handle(),
    ];
    tracing::info!(%node, "Kubernetes mode: watching namespaces, pods, Services, EndpointSlices and FaultInjections");
    Ok(Controllers { health, tasks })
}

/// The resources the controllers watch, as they name their watches.
const WATCHED: [&str; 5] = [
    "namespaces",
    "pods",
    "services",
    "endpointslices",
    "faultinjections",
];

async fn client(settings: &config::Kubernetes, health: &Arc<Health>) -> Result<Client, K8sError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| K8sError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| K8sError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    let names_a_ca = config.root_cert.is_some();
    let builder = ClientBuilder::try_from(config).map_err(|e| match names_a_ca {
        true => K8sError::Client(e),
        false => K8sError::NoCertificateAuthority(e),
    })?;
    Ok(builder.with_layer(&HealthLayer(health.clone())).build())
}

/// `shunt crd`: the CustomResourceDefinition of `FaultInjection`, as in `deploy/crd.yaml`.
pub fn print_crd() -> anyhow::Result<()> {
    print!("{}", faults::crd_yaml()?);
    Ok(())
}
