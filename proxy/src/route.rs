//! Where a connection goes: the original destination, or — when it is a Service's virtual
//! address — one of the Service's endpoints in round-robin order.
//!
//! A [`Routes`] table is immutable once built; a config reload builds a new one and swaps it
//! in whole, so connections never see half of an update and the hot path takes no lock.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::{
    config::{ServiceConfig, ServiceProtocol},
    net::canonical,
};

/// A virtual address and the endpoints behind it.
pub struct Service {
    pub name: String,
    pub vip: SocketAddr,
    /// What its port carries, as declared (`auto`: sniffed).
    pub protocol: ServiceProtocol,
    /// In rotation. Replaced whole when discovery finds a new set; readers never block.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Taken out of rotation while streams or connections were still on them; listed until
    /// those finish.
    draining: Mutex<Vec<Arc<Endpoint>>>,
    cursor: AtomicUsize,
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// HTTP/2 streams sent to it.
    pub streams: Usage,
    /// Opaque and TLS connections sent to it.
    pub connections: Usage,
    /// Connects to it that failed.
    pub failed: AtomicU64,
    /// shunt's pooled HTTP/2 connections to it, from every pod and worker. The pools count
    /// them here but hold the endpoint only weakly, so that they notice when it has left its
    /// Service and close what they keep open to it.
    pub upstreams: Usage,
}

/// How many of something an endpoint has now, and has had.
#[derive(Default)]
pub struct Usage {
    active: AtomicU64,
    total: AtomicU64,
}

impl Usage {
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// One more, until [`Usage::ended`] is called for it.
    pub fn started(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ended(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream or connection on an endpoint; no longer active once dropped.
pub struct InUse {
    endpoint: Arc<Endpoint>,
    stream: bool,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.usage().ended();
    }
}

impl InUse {
    fn usage(&self) -> &Usage {
        if self.stream {
            &self.endpoint.streams
        } else {
            &self.endpoint.connections
        }
    }
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr: canonical(addr),
            streams: Usage::default(),
            connections: Usage::default(),
            failed: AtomicU64::new(0),
            upstreams: Usage::default(),
        })
    }

    /// Counts a stream sent here, active until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> InUse {
        self.start(true)
    }

    /// Counts a connection sent here, active until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> InUse {
        self.start(false)
    }

    fn start(self: &Arc<Self>, stream: bool) -> InUse {
        let in_use = InUse {
            endpoint: self.clone(),
            stream,
        };
        in_use.usage().started();
        in_use
    }

    fn is_busy(&self) -> bool {
        self.streams.active() + self.connections.active() > 0
    }

    fn summary(&self, in_rotation: bool) -> EndpointSummary {
        EndpointSummary {
            addr: self.addr,
            in_rotation,
            streams_active: self.streams.active(),
            streams_total: self.streams.total(),
            connections_active: self.connections.active(),
            connections_total: self.connections.total(),
            failed: self.failed.load(Ordering::Relaxed),
            upstreams_open: self.upstreams.active(),
        }
    }
}

impl Service {
    fn new(config: &ServiceConfig) -> Service {
        Service {
            name: config.name.clone(),
            vip: canonical(config.vip),
            protocol: config.protocol,
            endpoints: ArcSwap::from_pointee(
                config.endpoints.iter().map(|&a| Endpoint::new(a)).collect(),
            ),
            draining: Mutex::default(),
            cursor: AtomicUsize::new(random_start()),
        }
    }

    /// Continues where `previous` (the same Service before a reload) left off: its rotation,
    /// so reloads neither restart it nor favour any endpoint, and the endpoints that are
    /// still there (counts and all; those that went and are still busy are listed as
    /// draining). A DNS Service not yet resolved keeps the previous endpoints until its
    /// first lookup, so a reload never leaves it without any.
    fn inherit(&self, previous: &Service) {
        self.cursor
            .store(previous.cursor.load(Ordering::Relaxed), Ordering::Relaxed);
        let old = previous.endpoints.load_full();
        *lock(&self.draining) = lock(&previous.draining).clone();
        if self.endpoints.load().is_empty() {
            self.endpoints.store(old);
            return;
        }
        let wanted: Vec<SocketAddr> = self.endpoints.load().iter().map(|e| e.addr).collect();
        self.replace_endpoints(&old, wanted);
    }

    /// Every endpoint once, starting at the next one in rotation: callers try them in this
    /// order until one accepts, so a dead endpoint costs one retry, not a failed request.
    pub fn endpoint_order(&self) -> impl Iterator<Item = Arc<Endpoint>> + use<> {
        let endpoints = self.endpoints.load_full();
        let n = endpoints.len();
        let start = if n == 0 {
            0
        } else {
            self.cursor.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| endpoints[(start + i) % n].clone())
    }

    /// The endpoints in rotation now.
    pub fn in_rotation(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// The endpoint at `addr`, in rotation or draining.
    pub fn endpoint(&self, addr: SocketAddr) -> Option<Arc<Endpoint>> {
        let addr = canonical(addr);
        let found = self
            .endpoints
            .load()
            .iter()
            .find(|e| e.addr == addr)
            .cloned();
        found.or_else(|| {
            lock(&self.draining)
                .iter()
                .find(|e| e.addr == addr)
                .cloned()
        })
    }

    /// Replaces the endpoint set (from discovery). Endpoints that stay keep their counters;
    /// streams already on a removed endpoint finish there, new ones never go to it.
    /// Returns whether anything changed.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) -> bool {
        let current = self.endpoints.load_full();
        let mut wanted: Vec<SocketAddr> = addrs.iter().map(|&a| canonical(a)).collect();
        wanted.sort();
        wanted.dedup();
        if current.iter().map(|e| e.addr).eq(wanted.iter().copied()) {
            return false;
        }
        self.replace_endpoints(&current, wanted);
        true
    }

    /// Puts `wanted` in rotation, reusing the endpoints of `current` (or draining ones) with
    /// the same address; those of `current` left out drain if busy.
    fn replace_endpoints(&self, current: &[Arc<Endpoint>], wanted: Vec<SocketAddr>) {
        let mut draining = lock(&self.draining);
        let next: Vec<Arc<Endpoint>> = wanted
            .into_iter()
            .map(|addr| {
                let known = current
                    .iter()
                    .chain(draining.iter())
                    .find(|e| e.addr == addr);
                known.cloned().unwrap_or_else(|| Endpoint::new(addr))
            })
            .collect();
        draining.retain(|e| !next.iter().any(|n| n.addr == e.addr));
        for endpoint in current {
            let gone = !next.iter().any(|n| n.addr == endpoint.addr);
            let listed = draining.iter().any(|d| d.addr == endpoint.addr);
            if gone && !listed {
                draining.push(endpoint.clone());
            }
        }
        draining.retain(|e| e.is_busy());
        self.endpoints.store(Arc::new(next));
    }

    /// Endpoints in rotation, and out of rotation but still busy.
    pub fn endpoint_counts(&self) -> (usize, usize) {
        let draining = lock(&self.draining).iter().filter(|e| e.is_busy()).count();
        (self.endpoints.load().len(), draining)
    }

    pub fn summary(&self) -> ServiceSummary {
        let mut endpoints: Vec<EndpointSummary> = self
            .endpoints
            .load()
            .iter()
            .map(|e| e.summary(true))
            .collect();
        let mut draining = lock(&self.draining);
        draining.retain(|e| e.is_busy());
        endpoints.extend(draining.iter().map(|e| e.summary(false)));
        ServiceSummary {
            name: self.name.clone(),
            vip: self.vip,
            endpoints,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where one connection goes.
#[derive(Clone)]
pub enum Route {
    /// Not a known virtual address: dial it as it is.
    Direct(SocketAddr),
    Service(Arc<Service>),
}

impl Route {
    pub fn service_name(&self) -> Option<&str> {
        match self {
            Route::Direct(_) => None,
            Route::Service(service) => Some(&service.name),
        }
    }
}

#[derive(Default)]
pub struct Routes {
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    in_order: Vec<Arc<Service>>,
}

impl Routes {
    pub fn new(services: &[ServiceConfig]) -> Routes {
        let in_order: Vec<Arc<Service>> =
            services.iter().map(|s| Arc::new(Service::new(s))).collect();
        let by_vip = in_order.iter().map(|s| (s.vip, s.clone())).collect();
        Routes { by_vip, in_order }
    }

    /// Carries each Service's rotation and endpoint counts over from the table this one
    /// replaces (matched by name).
    pub fn inherit(&self, previous: &Routes) {
        for service in &self.in_order {
            if let Some(old) = previous.in_order.iter().find(|o| o.name == service.name) {
                service.inherit(old);
            }
        }
    }

    #[cfg(test)]
    pub fn route(&self, original_dst: SocketAddr) -> Route {
        match self.lookup(original_dst) {
            Some(service) => Route::Service(service),
            None => Route::Direct(original_dst),
        }
    }

    /// The Service whose virtual address `dst` is.
    pub fn lookup(&self, dst: SocketAddr) -> Option<Arc<Service>> {
        self.by_vip.get(&canonical(dst)).cloned()
    }

    pub fn summaries(&self) -> Vec<ServiceSummary> {
        self.in_order.iter().map(|s| s.summary()).collect()
    }

    pub fn len(&self) -> usize {
        self.in_order.len()
    }

    /// The Service named `name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<Service>> {
        self.in_order.iter().find(|s| s.name == name).cloned()
    }

    /// The Services in configuration order.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.in_order
    }
}

/// Services a discovery source owns as a whole set (Kubernetes' Services and EndpointSlices),
/// beside those of the configuration. The source hands over the complete set on every change;
/// a Service already known (same name and virtual address) stays the same object and only
/// its endpoints are swapped, so HTTP/2 connections routed to it earlier send their next
/// streams to the new endpoints, and its rotation and counts carry on.
#[derive(Default)]
pub struct DiscoveredServices {
    table: ArcSwap<Routes>,
}

/// What [`DiscoveredServices::replace`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
    pub endpoints_changed: usize,
}

impl Changes {
    pub fn any(&self) -> bool {
        *self != Changes::default()
    }
}

impl DiscoveredServices {
    /// Makes `services` the whole set. A virtual address listed twice keeps its first entry.
    pub fn replace(&self, services: &[ServiceConfig]) -> Changes {
        let current = self.table.load_full();
        let mut changes = Changes::default();
        let mut by_vip: HashMap<SocketAddr, Arc<Service>> = HashMap::new();
        let mut in_order = Vec::with_capacity(services.len());
        for config in services {
            let vip = canonical(config.vip);
            if by_vip.contains_key(&vip) {
                continue;
            }
            let known = current
                .by_vip
                .get(&vip)
                .filter(|s| s.name == config.name && s.protocol == config.protocol);
            let service = match known {
                Some(known) => {
                    if known.set_endpoints(&config.endpoints) {
                        changes.endpoints_changed += 1;
                    }
                    known.clone()
                }
                None => {
                    changes.added += 1;
                    Arc::new(Service::new(config))
                }
            };
            by_vip.insert(vip, service.clone());
            in_order.push(service);
        }
        changes.removed = current
            .in_order
            .iter()
            .filter(|old| {
                !by_vip
                    .get(&old.vip)
                    .is_some_and(|new| Arc::ptr_eq(old, new))
            })
            .count();
        if changes.any() {
            self.table.store(Arc::new(Routes { by_vip, in_order }));
        }
        changes
    }

    pub fn lookup(&self, dst: SocketAddr) -> Option<Arc<Service>> {
        self.table.load().lookup(dst)
    }

    /// The Services, in the order they were handed over.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.table.load().in_order.clone()
    }

    pub fn summaries(&self) -> Vec<ServiceSummary> {
        self.table.load().summaries()
    }

    pub fn len(&self) -> usize {
        self.table.load().len()
    }
}

/// Where a new Service's rotation starts. Random, so that the shunt on every node does not
/// send its first connections to the same endpoint.
fn random_start() -> usize {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS once per process and varied per instance.
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as usize
}

/// A Service as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub vip: SocketAddr,
    pub endpoints: Vec<EndpointSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointSummary {
    pub addr: SocketAddr,
    /// Gets new streams and connections; `false`: removed, finishing what it has.
    pub in_rotation: bool,
    pub streams_active: u64,
    pub streams_total: u64,
    pub connections_active: u64,
    pub connections_total: u64,
    /// Connects to it that failed.
    pub failed: u64,
    /// shunt's pooled HTTP/2 connections to it, open now.
    #[serde(default)]
    pub upstreams_open: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(endpoints: &[&str]) -> Routes {
        Routes::new(&[ServiceConfig {
            name: "greeter".into(),
            vip: "10.96.0.10:50051".parse().unwrap(),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            ..ServiceConfig::default()
        }])
    }

    fn service_of(routes: &Routes) -> Arc<Service> {
        match routes.route("10.96.0.10:50051".parse().unwrap()) {
            Route::Service(service) => service,
            Route::Direct(_) => panic!("VIP not routed to its service"),
        }
    }

    fn firsts(service: &Service, n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|_| service.endpoint_order().next().unwrap().addr)
            .collect()
    }

    #[test]
    fn round_robin_starts_one_further_each_time() {
        let all: Vec<SocketAddr> = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let routes = service(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
        let svc = service_of(&routes);
        // Wherever the rotation starts, it visits the endpoints in order.
        let got = firsts(&svc, 6);
        let start = all.iter().position(|a| *a == got[0]).unwrap();
        let expected: Vec<SocketAddr> = all.iter().cycle().skip(start).take(6).copied().collect();
        assert_eq!(got, expected);
        // Each order lists every endpoint exactly once, for failover.
        let order: Vec<SocketAddr> = svc.endpoint_order().map(|e| e.addr).collect();
        assert_eq!(order.len(), 3);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, all);
    }

    #[test]
    fn a_reload_continues_the_rotation_and_keeps_counts() {
        let endpoints = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"];
        let before = service(&endpoints);
        let old = service_of(&before);
        let picks = firsts(&old, 4);
        let second = old.endpoints.load()[1].clone();
        for _ in 0..7 {
            drop(second.stream());
        }

        // The same Service reloaded: the rotation goes on exactly where it was.
        let same = service(&endpoints);
        same.inherit(&before);
        let expected = firsts(&old, 1)[0];
        assert_eq!(firsts(&service_of(&same), 1)[0], expected);
        assert_ne!(expected, picks[3]);

        // Endpoint 10.0.0.1 goes (busy: it drains), 10.0.0.4 comes: the counts of those
        // kept are kept.
        let first = old.endpoints.load()[0].clone();
        let busy = first.connection();
        let changed = service(&["10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]);
        changed.inherit(&before);
        let summary = service_of(&changed).summary();
        assert_eq!(summary.endpoints[0].streams_total, 7);
        assert_eq!(summary.endpoints[2].streams_total, 0);
        let drained = &summary.endpoints[3];
        assert_eq!((drained.addr, drained.in_rotation), (first.addr, false));
        assert_eq!(drained.connections_active, 1);
        // Once its connection ends it is no longer listed.
        drop(busy);
        assert_eq!(service_of(&changed).summary().endpoints.len(), 3);
        assert_eq!(service_of(&changed).endpoint_counts(), (3, 0));
    }

    #[test]
    fn other_destinations_go_direct_and_mapped_vips_match() {
        let routes = service(&["10.0.0.1:1"]);
        assert!(matches!(
            routes.route("10.96.0.11:50051".parse().unwrap()),
            Route::Direct(_)
        ));
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:50051".parse().unwrap();
        assert!(matches!(routes.route(mapped), Route::Service(_)));
    }

    fn config(name: &str, vip: &str, endpoints: &[&str]) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            vip: vip.parse().unwrap(),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            ..ServiceConfig::default()
        }
    }

    #[test]
    fn discovered_services_keep_their_objects_across_replacements() {
        let discovered = DiscoveredServices::default();
        let changes = discovered.replace(&[
            config("ns/a", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.2:80"]),
            config("ns/b", "10.96.0.2:80", &["10.0.0.3:80"]),
        ]);
        assert_eq!((changes.added, changes.removed), (2, 0));
        // A connection routed earlier holds this object; it must see the next endpoint set.
        let held = discovered.lookup("10.96.0.1:80".parse().unwrap()).unwrap();
        held.endpoint_order()
            .next()
            .unwrap()
            .failed
            .fetch_add(5, Ordering::Relaxed);

        let changes = discovered.replace(&[config(
            "ns/a",
            "10.96.0.1:80",
            &["10.0.0.2:80", "10.0.0.1:80", "10.0.0.4:80"],
        )]);
        assert_eq!(
            changes,
            Changes {
                added: 0,
                removed: 1,
                endpoints_changed: 1
            }
        );
        let now = discovered.lookup("10.96.0.1:80".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(&held, &now));
        let order: Vec<SocketAddr> = held.endpoint_order().map(|e| e.addr).collect();
        assert_eq!(order.len(), 3);
        let failed: u64 = held.summary().endpoints.iter().map(|e| e.failed).sum();
        assert_eq!(failed, 5, "the endpoints' counts carry over");
        assert!(discovered.lookup("10.96.0.2:80".parse().unwrap()).is_none());
        // The same set again changes nothing.
        assert!(
            !discovered
                .replace(&[config(
                    "ns/a",
                    "10.96.0.1:80",
                    &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80"],
                )])
                .any()
        );
        // Another Service taking over the address is a new object.
        let changes = discovered.replace(&[config("ns/c", "10.96.0.1:80", &["10.0.0.9:80"])]);
        assert_eq!((changes.added, changes.removed), (1, 1));
    }

    #[test]
    fn endpoint_changes_keep_counters_of_endpoints_that_stay() {
        let routes = service(&["10.0.0.1:1", "10.0.0.2:1"]);
        let svc = routes.by_name("greeter").unwrap();
        let first = svc.endpoint_order().next().unwrap();
        for _ in 0..7 {
            drop(first.stream());
        }
        let active = first.stream();
        assert!(svc.set_endpoints(&["10.0.0.3:1".parse().unwrap(), first.addr]));
        assert!(!svc.set_endpoints(&[first.addr, "10.0.0.3:1".parse().unwrap()]));
        let summary = svc.summary();
        assert_eq!(summary.endpoints.len(), 2);
        let kept = summary
            .endpoints
            .iter()
            .find(|e| e.addr == first.addr)
            .unwrap();
        assert_eq!((kept.streams_total, kept.streams_active), (8, 1));
        assert!(kept.in_rotation);
        drop(active);
        assert_eq!(svc.summary().endpoints[0].streams_active, 0);
    }
}
