//! Enrollment: which pods are intercepted. For each enrolled pod we hold its network
//! namespace, its listeners inside that namespace, and its cookie in the `ENROLLED` map.
//! Order matters: listeners first, then the cookie, so the programs never redirect a pod to
//! a listener that is not there yet (and on unenroll, the reverse).

mod netns;
mod sockets;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, task::AbortHandle};

pub use netns::{Netns, init_host_netns};

use crate::{
    bpf::Datapath,
    http2,
    proxy::{Intercept, Pod},
};

/// An error from the kernel's side of enrollment.
pub type KernelError = Box<dyn std::error::Error + Send + Sync>;

/// The kernel's side of enrollment: the network namespaces (by cookie) whose new connections
/// the programs redirect to their pod's listeners. The loaded programs' `ENROLLED` map in the
/// daemon; a test gives enrollment a stand-in.
pub trait EnrolledNamespaces: Send + Sync {
    /// The cookie of the namespace `socket` (an unconnected TCP/IPv4 socket made inside it
    /// for this) belongs to, as the programs see it.
    fn netns_cookie(&self, socket: &socket2::Socket) -> Result<u64, KernelError>;
    fn enroll(&self, netns_cookie: u64) -> Result<(), KernelError>;
    fn unenroll(&self, netns_cookie: u64) -> Result<(), KernelError>;
    fn cookies(&self) -> Vec<u64>;
}

impl EnrolledNamespaces for Mutex<Datapath> {
    fn netns_cookie(&self, socket: &socket2::Socket) -> Result<u64, KernelError> {
        Ok(lock(self).netns_cookie(socket)?)
    }

    fn enroll(&self, netns_cookie: u64) -> Result<(), KernelError> {
        Ok(lock(self).enroll(netns_cookie)?)
    }

    fn unenroll(&self, netns_cookie: u64) -> Result<(), KernelError> {
        Ok(lock(self).unenroll(netns_cookie)?)
    }

    fn cookies(&self) -> Vec<u64> {
        lock(self).enrolled_cookies()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {0:?} is already enrolled")]
    AlreadyEnrolled(String),
    #[error("pod {name:?}: its network namespace is already enrolled as {other:?}")]
    SameNetns { name: String, other: String },
    #[error("pod {0:?} is not enrolled")]
    NotEnrolled(String),
    #[error("pod {name:?}: network namespace {path}: {source}")]
    Netns {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {name:?}: listening on {addr} in its network namespace: {source}")]
    Listen {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {name:?}: {source}")]
    Kernel { name: String, source: KernelError },
}

/// Why a namespace's cookie could not be learned: the namespace, or the kernel's side.
enum CookieError {
    Netns(std::io::Error),
    Kernel(KernelError),
}

/// Who enrolled a pod, so the daemon that takes it over knows whether it is still wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Listed in the configuration file.
    Config,
    /// `shunt enroll` (the admin API).
    Operator,
    /// The Kubernetes pods' controller.
    Kubernetes,
}

/// An enrolled pod with its listening sockets, as one daemon hands it to the next.
pub struct HandedPod {
    pub name: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub origin: Origin,
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
}

/// An enrolled pod as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodSummary {
    pub name: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub listeners: Vec<SocketAddr>,
}

struct Enrolled {
    name: String,
    netns_cookie: u64,
    netns: Arc<Netns>,
    origin: Origin,
    /// Handed over by the daemon before this one and not enrolled again here yet.
    unclaimed: bool,
    listeners: Vec<(SocketAddr, Arc<TcpListener>)>,
    accept_tasks: Vec<AbortHandle>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        // Closing the listeners makes the programs fail open for this pod immediately.
        for task in &self.accept_tasks {
            task.abort();
        }
    }
}

/// Where enrolled pods' connections are sent, and how the data path dials for them.
pub struct EnrollmentConfig {
    /// `intercept.listen_port`: the port of each pod's listeners.
    pub listen_port: u16,
    /// `intercept.mark`: set on upstream sockets so the programs let them through.
    pub mark: u32,
}

/// The enrolled pods: the one owner of their namespaces and listeners.
pub struct Enrollments {
    pods: Mutex<BTreeMap<String, Enrolled>>,
    kernel: Arc<dyn EnrolledNamespaces>,
    intercept: Arc<dyn Intercept>,
    config: EnrollmentConfig,
}

impl Enrollments {
    pub fn new(
        kernel: Arc<dyn EnrolledNamespaces>,
        intercept: Arc<dyn Intercept>,
        config: EnrollmentConfig,
    ) -> Self {
        Self {
            pods: Mutex::default(),
            kernel,
            intercept,
            config,
        }
    }

    /// Opens the pod's listeners and starts intercepting its new connections. Must be called
    /// from within the runtime. A pod of the same name handed over by the previous daemon,
    /// in the same network namespace, is taken as it is: its listeners never closed.
    pub fn enroll(
        &self,
        name: &str,
        netns_path: &Path,
        origin: Origin,
    ) -> Result<PodSummary, EnrollError> {
        let mut pods = lock(&self.pods);
        let netns_err = |source| EnrollError::Netns {
            name: name.to_owned(),
            path: netns_path.to_owned(),
            source,
        };
        let netns = Netns::open(netns_path).map_err(netns_err)?;
        let netns_cookie = self.cookie_of(&netns).map_err(|source| match source {
            CookieError::Netns(e) => netns_err(e),
            CookieError::Kernel(source) => EnrollError::Kernel {
                name: name.to_owned(),
                source,
            },
        })?;
        if let Some(pod) = pods.get_mut(name).filter(|p| p.unclaimed) {
            if pod.netns_cookie == netns_cookie {
                pod.unclaimed = false;
                pod.origin = origin;
                return Ok(summarize(pod));
            }
            // The pod's namespace was recreated meanwhile: the adopted one is stale.
            self.remove(&mut pods, name)?;
        }
        if pods.contains_key(name) {
            return Err(EnrollError::AlreadyEnrolled(name.to_owned()));
        }
        if let Some(other) = pods.values().find(|p| p.netns_cookie == netns_cookie) {
            return Err(EnrollError::SameNetns {
                name: name.to_owned(),
                other: other.name.clone(),
            });
        }
        let enrolled = self.start(name, netns, netns_cookie, origin, Vec::new())?;
        let summary = summarize(&enrolled);
        pods.insert(name.to_owned(), enrolled);
        tracing::info!(pod = name, netns = %netns_path.display(), netns_cookie, "enrolled");
        Ok(summary)
    }

    /// The namespace's cookie, the identity the programs know it by.
    fn cookie_of(&self, netns: &Netns) -> Result<u64, CookieError> {
        let socket = netns.tcp_socket().map_err(CookieError::Netns)?;
        self.kernel
            .netns_cookie(&socket)
            .map_err(CookieError::Kernel)
    }

    /// Takes over pods a previous daemon handed over, with their listening sockets, and
    /// accepts on them at once. Each stays unclaimed until enrolled again here (from the
    /// configuration, the Kubernetes controller or `shunt enroll`); see
    /// [`Enrollments::release_unclaimed`]. Returns the number of listeners adopted.
    pub fn adopt(&self, handed: Vec<HandedPod>) -> usize {
        let mut adopted = 0;
        let mut pods = lock(&self.pods);
        for pod in handed {
            let netns = match Netns::open(&pod.netns) {
                Ok(netns) => netns,
                Err(e) => {
                    tracing::info!(pod = pod.name, netns = %pod.netns.display(), "not adopted: {e}");
                    continue;
                }
            };
            if self.cookie_of(&netns).ok() != Some(pod.netns_cookie) || pods.contains_key(&pod.name)
            {
                tracing::info!(pod = pod.name, "not adopted: its network namespace changed");
                continue;
            }
            let count = pod.listeners.len();
            match self.start(
                &pod.name,
                netns,
                pod.netns_cookie,
                pod.origin,
                pod.listeners,
            ) {
                Ok(mut enrolled) => {
                    enrolled.unclaimed = true;
                    adopted += count;
                    pods.insert(pod.name, enrolled);
                }
                Err(e) => tracing::warn!("not adopted: {e}"),
            }
        }
        adopted
    }

    /// Unenrolls the pods handed over from `origins` that were not enrolled again here: the
    /// configuration no longer lists them, or Kubernetes no longer wants them intercepted.
    /// Other unclaimed pods (`shunt enroll`ed ones) are kept as this daemon's own.
    pub fn release_unclaimed(&self, origins: &[Origin]) {
        let mut pods = lock(&self.pods);
        let stale: Vec<String> = pods
            .iter()
            .filter(|(_, p)| p.unclaimed && origins.contains(&p.origin))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            match self.remove(&mut pods, &name) {
                Ok(()) => {
                    tracing::info!(pod = name, "handed over but no longer wanted: unenrolled")
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        for pod in pods.values_mut().filter(|p| p.unclaimed) {
            if !origins.contains(&pod.origin) {
                pod.unclaimed = false;
            }
        }
    }

    /// Duplicates of every pod's listening sockets, for a new daemon taking over.
    pub fn offer(&self) -> Vec<HandedPod> {
        lock(&self.pods)
            .values()
            .filter_map(|p| {
                let listeners = p
                    .listeners
                    .iter()
                    .map(|(addr, l)| Ok((*addr, l.as_fd().try_clone_to_owned()?)))
                    .collect::<std::io::Result<Vec<_>>>()
                    .inspect_err(|e| tracing::warn!(pod = p.name, "not handed over: {e}"))
                    .ok()?;
                Some(HandedPod {
                    name: p.name.clone(),
                    netns: p.netns.path().to_owned(),
                    netns_cookie: p.netns_cookie,
                    origin: p.origin,
                    listeners,
                })
            })
            .collect()
    }

    /// Opens (or adopts) the listeners, hands them to the data path, and enrolls the
    /// cookie: listeners first. On an error nothing is left: the listeners close as the
    /// half-made pod is dropped.
    fn start(
        &self,
        name: &str,
        netns: Netns,
        netns_cookie: u64,
        origin: Origin,
        mut handed: Vec<(SocketAddr, OwnedFd)>,
    ) -> Result<Enrolled, EnrollError> {
        let netns = Arc::new(netns);
        let mut enrolled = Enrolled {
            name: name.to_owned(),
            netns_cookie,
            netns: netns.clone(),
            origin,
            unclaimed: false,
            listeners: Vec::new(),
            accept_tasks: Vec::new(),
        };
        for addr in listener_addrs(self.config.listen_port) {
            let listener = match handed.iter().position(|(a, _)| *a == addr) {
                Some(i) => sockets::adopt(handed.swap_remove(i).1, addr),
                None => sockets::listen_in(&netns, addr),
            };
            match listener {
                Ok(listener) => enrolled.listeners.push((addr, Arc::new(listener))),
                // A pod without IPv6 has no [::1]; its IPv6 connects then simply go direct.
                Err(e) if addr.is_ipv6() => {
                    tracing::warn!(
                        pod = name,
                        "no IPv6 listener ({e}); IPv6 connections go direct"
                    );
                }
                Err(source) => {
                    return Err(EnrollError::Listen {
                        name: name.to_owned(),
                        addr,
                        source,
                    });
                }
            }
        }
        let listeners: Vec<Arc<TcpListener>> =
            enrolled.listeners.iter().map(|(_, l)| l.clone()).collect();
        let pod = Pod {
            name: name.to_owned(),
            netns_cookie,
            connector: upstream_connector(netns, self.config.mark),
        };
        enrolled.accept_tasks = self.intercept.clone().serve_pod(pod, &listeners);
        self.kernel
            .enroll(netns_cookie)
            .map_err(|source| EnrollError::Kernel {
                name: name.to_owned(),
                source,
            })?;
        Ok(enrolled)
    }

    fn remove(&self, pods: &mut BTreeMap<String, Enrolled>, name: &str) -> Result<(), EnrollError> {
        let enrolled = pods
            .get(name)
            .ok_or_else(|| EnrollError::NotEnrolled(name.to_owned()))?;
        self.kernel
            .unenroll(enrolled.netns_cookie)
            .map_err(|source| EnrollError::Kernel {
                name: name.to_owned(),
                source,
            })?;
        pods.remove(name);
        Ok(())
    }

    /// Stops intercepting the pod's new connections; its established ones carry on.
    pub fn unenroll(&self, name: &str) -> Result<(), EnrollError> {
        self.remove(&mut lock(&self.pods), name)?;
        tracing::info!(pod = name, "unenrolled");
        Ok(())
    }

    /// Forgets kernel-side enrollments no pod here accounts for (left by an earlier daemon).
    pub fn prune_stale(&self) {
        let pods = lock(&self.pods);
        for cookie in self.kernel.cookies() {
            if !pods.values().any(|p| p.netns_cookie == cookie) {
                tracing::info!(netns_cookie = cookie, "removing stale enrollment");
                if let Err(e) = self.kernel.unenroll(cookie) {
                    tracing::warn!("removing stale enrollment {cookie}: {e}");
                }
            }
        }
    }

    pub fn list(&self) -> Vec<PodSummary> {
        lock(&self.pods).values().map(summarize).collect()
    }

    /// The pod enrolled with this network namespace cookie.
    pub fn pod_name(&self, netns_cookie: u64) -> Option<String> {
        lock(&self.pods)
            .values()
            .find(|p| p.netns_cookie == netns_cookie)
            .map(|p| p.name.clone())
    }

    /// Closes every listener (the daemon is stopping); kernel enrollments stay, so the fail
    /// mode decides what enrolled pods' connections do while no daemon runs.
    pub fn close_all(&self) {
        lock(&self.pods).clear();
    }
}

fn summarize(p: &Enrolled) -> PodSummary {
    PodSummary {
        name: p.name.clone(),
        netns: p.netns.path().to_owned(),
        netns_cookie: p.netns_cookie,
        listeners: p.listeners.iter().map(|(addr, _)| *addr).collect(),
    }
}

/// The addresses of a pod's listeners: loopback, IPv4 and IPv6, on `intercept.listen_port`,
/// where the connect programs send the pod's intercepted connections.
fn listener_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ]
}

/// How the data path opens a pod's upstream connections: from inside its namespace, with
/// `mark` set so the programs let them through.
fn upstream_connector(netns: Arc<Netns>, mark: u32) -> http2::Connector {
    Arc::new(move |addr| {
        let netns = netns.clone();
        Box::pin(async move { sockets::connect_from(&netns, mark, addr).await })
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
