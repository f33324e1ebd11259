//! The kernel path: the destinations connect() sends straight to an endpoint (or leaves
//! alone), so the proxy never touches their bytes, and the records of those connections.
//!
//! [`KernelPath`] owns the kernel path's maps. It works out from scratch, whenever anything
//! it depends on may have changed, which destinations take the path and writes only the
//! difference ([`bpf::KernelRouteMaps::apply`]):
//! - `intercept.kernel_path: off` — none;
//! - `declared` — Services declared `tls` or `tcp`, and destinations on `opaque_ports`
//!   (Services declared `http2` never);
//! - `learned` — those, and destinations the [`Learner`] saw carry only TLS or opaque TCP,
//!   with one connection in [`learned::SAMPLE_EVERY`] still sent through the proxy.
//!
//! A destination named by a fault rule (by Service or address), or every destination while
//! an L4 rule names none, goes through the proxy while the rule exists: fault changes call
//! [`KernelPath::reconcile`] before they return, so the next connection sees them. A
//! Service's endpoints are those in rotation, less those whose connects failed in the last
//! [`FAILED_COOLDOWN`] (on either path) while others remain: a refused endpoint on the
//! kernel path is a refused connect for the client, as with kube-proxy, and this keeps it to
//! the first few — a refused kernel-path connect wakes the reconcile as soon as its report
//! is read ([`KernelPath::connect_failed`]). Endpoint changes from discovery reach the maps
//! within a second.

mod records;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak, atomic::Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    bpf::{KernelRouteMaps, WantedRoute},
    config::{KernelPathMode, ServiceProtocol},
    fault::Faults,
    proxy::Settings,
    route::{DiscoveredServices, Service},
    state::{Learner, learned},
};

pub use records::Recorder;

/// How long an endpoint whose connect failed stays off the kernel path.
pub const FAILED_COOLDOWN: Duration = Duration::from_secs(10);
/// How often the maps are brought up to date with discovery when nothing else asks.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// What the kernel path is worked out from.
pub struct Inputs {
    pub settings: Arc<ArcSwap<Settings>>,
    pub discovered: Arc<DiscoveredServices>,
    pub faults: Arc<Faults>,
    pub learner: Arc<Learner>,
}

/// One destination connect() treats specially, as `shunt kernel-path` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelPathEntry {
    pub destination: SocketAddr,
    pub service: Option<String>,
    /// Why it takes the kernel path: `declared tls`, `declared tcp`, `opaque port`,
    /// `learned: tls`….
    pub reason: String,
    /// `kernel`, or `proxy` with the fault rule that keeps it there.
    pub path: String,
    /// The endpoints connect() picks from (none: the connection goes where it was going).
    pub endpoints: Vec<SocketAddr>,
    /// One in this many connections still goes through the proxy (0: none).
    pub sample_every: u32,
}

/// The kernel path as the admin API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelPathSummary {
    pub mode: String,
    pub destinations: Vec<KernelPathEntry>,
    /// Destination ports whose connections take the kernel path unless listed above.
    pub ports: Vec<u16>,
    /// Why the maps could not be written, if they could not.
    pub error: Option<String>,
}

pub struct KernelPath {
    inputs: Inputs,
    state: Mutex<State>,
    /// Wakes the reconcile loop before its next tick.
    wake: Arc<Notify>,
}

struct State {
    maps: KernelRouteMaps,
    /// Per endpoint: its failed-connect count when last looked at, and when it last grew.
    failures: HashMap<SocketAddr, (u64, Option<Instant>)>,
    summary: KernelPathSummary,
}

impl KernelPath {
    /// Starts keeping the maps: now, on every fault change, whenever the learner learns or
    /// unlearns, and every second.
    pub fn start(maps: KernelRouteMaps, inputs: Inputs) -> Arc<KernelPath> {
        let kernel_path = Arc::new(KernelPath {
            inputs,
            state: Mutex::new(State {
                maps,
                failures: HashMap::new(),
                summary: KernelPathSummary::default(),
            }),
            wake: Arc::new(Notify::new()),
        });
        kernel_path.reconcile();
        let weak = Arc::downgrade(&kernel_path);
        let on_fault_change = weak.clone();
        kernel_path.inputs.faults.on_change(Box::new(move || {
            if let Some(kernel_path) = on_fault_change.upgrade() {
                kernel_path.reconcile();
            }
        }));
        tokio::spawn(keep_up(
            weak,
            kernel_path.inputs.learner.clone(),
            kernel_path.wake.clone(),
        ));
        kernel_path
    }

    /// A kernel-path connect failed: take its endpoint out now rather than at the next tick.
    /// Many failures at once make one reconcile.
    pub fn connect_failed(&self) {
        self.wake.notify_one();
    }

    pub fn summary(&self) -> KernelPathSummary {
        lock(&self.state).summary.clone()
    }

    /// Brings the maps up to date with the inputs.
    pub fn reconcile(&self) {
        let settings = self.inputs.settings.load_full();
        let mode = settings.kernel_path;
        self.inputs
            .learner
            .set_enabled(mode == KernelPathMode::Learned);
        let mut state = lock(&self.state);
        let plan = match mode {
            KernelPathMode::Off => Plan::default(),
            _ => self.plan(&settings, &mut state.failures),
        };
        let error = state
            .maps
            .apply(&plan.routes, &plan.ports)
            .err()
            .map(|e| e.to_string());
        if let Some(error) = &error
            && state.summary.error.as_ref() != Some(error)
        {
            tracing::warn!("kernel path: writing the maps: {error}");
        }
        state.summary = KernelPathSummary {
            mode: mode.as_str().to_owned(),
            destinations: plan.entries,
            ports: plan.ports.into_iter().collect(),
            error,
        };
    }

    fn plan(
        &self,
        settings: &Settings,
        failures: &mut HashMap<SocketAddr, (u64, Option<Instant>)>,
    ) -> Plan {
        let exceptions = Exceptions::from(&self.inputs.faults);
        let learned: HashMap<SocketAddr, String> = self
            .inputs
            .learner
            .learned()
            .into_iter()
            .map(|l| (l.destination, l.verdict))
            .collect();
        let mut plan = Plan::default();
        if exceptions.all.is_none() {
            plan.ports = settings.opaque_ports.iter().copied().collect();
        }
        // The configuration's Services win over discovered ones at the same address.
        let mut services: Vec<Arc<Service>> = settings.routes.services().to_vec();
        let configured: HashSet<SocketAddr> = services.iter().map(|s| s.vip).collect();
        services.extend(
            self.inputs
                .discovered
                .services()
                .into_iter()
                .filter(|s| !configured.contains(&s.vip)),
        );
        let now = Instant::now();
        for service in &services {
            let vip = service.vip;
            let reason = match service.protocol {
                ServiceProtocol::Tls | ServiceProtocol::Tcp => {
                    Some((format!("declared {}", service.protocol.as_str()), 0))
                }
                ServiceProtocol::Http2 => None,
                ServiceProtocol::Auto if plan.ports.contains(&vip.port()) => {
                    Some(("opaque port".to_owned(), 0))
                }
                ServiceProtocol::Auto => learned
                    .get(&vip)
                    .map(|v| (format!("learned: {v}"), learned::SAMPLE_EVERY)),
            };
            let kept_by = exceptions.keeping(Some(&service.name), vip);
            let Some((reason, sample_every)) = reason else {
                // Declared HTTP/2 on an opaque port: the port's entry must not catch it.
                if plan.ports.contains(&vip.port()) {
                    plan.add_proxy(vip, Some(&service.name), "declared http2", None);
                }
                continue;
            };
            let endpoints = usable_endpoints(service, failures, now);
            if endpoints.is_empty() {
                // Nowhere to send it: the proxy answers for a Service without endpoints.
                plan.add_proxy(vip, Some(&service.name), &reason, Some("no endpoint"));
                continue;
            }
            match kept_by {
                Some(rule) => plan.add_proxy(vip, Some(&service.name), &reason, Some(rule)),
                None => plan.add(vip, Some(&service.name), reason, endpoints, sample_every),
            }
        }
        for (&destination, verdict) in &learned {
            if plan.routes.contains_key(&destination) || configured.contains(&destination) {
                continue;
            }
            let reason = format!("learned: {verdict}");
            match exceptions.keeping(None, destination) {
                Some(rule) => plan.add_proxy(destination, None, &reason, Some(rule)),
                None => plan.add(destination, None, reason, Vec::new(), learned::SAMPLE_EVERY),
            }
        }
        // Addresses a rule names that the port entries would otherwise take.
        for (&destination, rule) in &exceptions.by_address {
            if !plan.routes.contains_key(&destination) && plan.ports.contains(&destination.port()) {
                plan.add_proxy(destination, None, "opaque port", Some(rule));
            }
        }
        plan
    }
}

/// Endpoints in rotation, less those whose connects failed lately (unless that is all).
fn usable_endpoints(
    service: &Service,
    failures: &mut HashMap<SocketAddr, (u64, Option<Instant>)>,
    now: Instant,
) -> Vec<SocketAddr> {
    let in_rotation = service.in_rotation();
    let mut healthy = Vec::new();
    for endpoint in in_rotation.iter() {
        let failed = endpoint.failed.load(Ordering::Relaxed);
        let seen = failures.entry(endpoint.addr).or_insert((failed, None));
        if failed > seen.0 {
            *seen = (failed, Some(now));
        }
        let cooling = seen
            .1
            .is_some_and(|at| now.duration_since(at) < FAILED_COOLDOWN);
        if !cooling {
            healthy.push(endpoint.addr);
        }
    }
    if healthy.is_empty() {
        return in_rotation.iter().map(|e| e.addr).collect();
    }
    healthy
}

#[derive(Default)]
struct Plan {
    routes: BTreeMap<SocketAddr, WantedRoute>,
    ports: BTreeSet<u16>,
    entries: Vec<KernelPathEntry>,
}

impl Plan {
    fn add(
        &mut self,
        destination: SocketAddr,
        service: Option<&str>,
        reason: String,
        endpoints: Vec<SocketAddr>,
        sample_every: u32,
    ) {
        self.entries.push(KernelPathEntry {
            destination,
            service: service.map(str::to_owned),
            reason,
            path: "kernel".to_owned(),
            endpoints: endpoints.clone(),
            sample_every,
        });
        self.routes.insert(
            destination,
            WantedRoute {
                endpoints,
                sample_every,
                proxy: false,
            },
        );
    }

    fn add_proxy(
        &mut self,
        destination: SocketAddr,
        service: Option<&str>,
        reason: &str,
        kept_by: Option<&str>,
    ) {
        self.entries.push(KernelPathEntry {
            destination,
            service: service.map(str::to_owned),
            reason: reason.to_owned(),
            path: match kept_by {
                Some(why) => format!("proxy ({why})"),
                None => "proxy".to_owned(),
            },
            endpoints: Vec::new(),
            sample_every: 0,
        });
        self.routes.insert(
            destination,
            WantedRoute {
                endpoints: Vec::new(),
                sample_every: 0,
                proxy: true,
            },
        );
    }
}

/// The fault rules that keep destinations on the proxy path.
struct Exceptions {
    by_service: HashMap<String, String>,
    by_address: HashMap<SocketAddr, String>,
    /// An L4 rule that names no destination applies to all of them.
    all: Option<String>,
}

impl Exceptions {
    fn from(faults: &Faults) -> Exceptions {
        let mut exceptions = Exceptions {
            by_service: HashMap::new(),
            by_address: HashMap::new(),
            all: None,
        };
        for summary in faults.list() {
            let rule = summary.rule;
            let why = format!("fault rule {}", rule.name);
            match (&rule.matches.service, rule.matches.vip) {
                (Some(service), _) => {
                    exceptions.by_service.insert(service.clone(), why);
                }
                (None, Some(vip)) => {
                    exceptions
                        .by_address
                        .insert(crate::net::canonical(vip), why);
                }
                (None, None) if rule.tcp.is_some() => {
                    exceptions.all.get_or_insert(why);
                }
                (None, None) => {}
            }
        }
        exceptions
    }

    /// The rule that keeps this destination on the proxy, if any.
    fn keeping(&self, service: Option<&str>, destination: SocketAddr) -> Option<&str> {
        let by_service = service.and_then(|name| self.by_service.get(name));
        by_service
            .or_else(|| self.by_address.get(&destination))
            .or(self.all.as_ref())
            .map(String::as_str)
    }
}

/// Reconciles on every change the learner reports, on every failed kernel-path connect, and
/// every second for discovery.
async fn keep_up(kernel_path: Weak<KernelPath>, learner: Arc<Learner>, wake: Arc<Notify>) {
    loop {
        tokio::select! {
            () = learner.changed() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
        let Some(kernel_path) = kernel_path.upgrade() else {
            return;
        };
        kernel_path.reconcile();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::ServiceConfig, route::Routes};

    #[test]
    fn an_endpoint_whose_connect_failed_sits_out_the_cooldown_unless_it_is_the_last() {
        let addrs: Vec<SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let routes = Routes::new(&[ServiceConfig {
            name: "backend".into(),
            vip: "10.96.0.1:80".parse().unwrap(),
            endpoints: addrs.clone(),
            ..ServiceConfig::default()
        }]);
        let service = &routes.services()[0];
        let mut failures = HashMap::new();
        let start = Instant::now();
        assert_eq!(usable_endpoints(service, &mut failures, start), addrs);

        let failing = service.endpoint(addrs[0]).unwrap();
        failing.failed.fetch_add(1, Ordering::Relaxed);
        let soon = start + Duration::from_secs(1);
        assert_eq!(usable_endpoints(service, &mut failures, soon), [addrs[1]]);
        let later = soon + FAILED_COOLDOWN;
        assert_eq!(usable_endpoints(service, &mut failures, later), addrs);

        // Every endpoint failing: all of them, rather than none.
        for addr in &addrs {
            service
                .endpoint(*addr)
                .unwrap()
                .failed
                .fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(usable_endpoints(service, &mut failures, later), addrs);
    }
}
