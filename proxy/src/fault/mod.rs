//! Fault injection, like Istio's: per HTTP/2 stream a delay and/or an abort (HTTP status or
//! gRPC status), each with its own percentage; per opaque or TLS connection a connect delay
//! or a reset. Rules come from the config (replaced on reload) and from the admin API (kept
//! across reloads); the table in force is swapped whole, so a change applies to the next
//! stream or connection and the hot path takes no lock. The rules themselves are the
//! configuration's plain data (`crate::config::fault`); this is the table that decides.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::config::fault::{FaultRule, GrpcCode};

/// Requests may ask for faults with these headers when a rule allows it (`header_control`).
pub const DELAY_HEADER: &str = "x-shunt-fault-delay";
pub const ABORT_GRPC_HEADER: &str = "x-shunt-fault-abort-grpc";
pub const ABORT_HTTP_HEADER: &str = "x-shunt-fault-abort-http";

/// What a stream or connection is, for matching.
pub struct Target<'a> {
    pub service: Option<&'a str>,
    pub original_dst: SocketAddr,
    pub pod: &'a str,
}

/// How an aborted stream is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Grpc(GrpcCode),
    Http(u16),
}

/// The faults chosen for one stream; holds a slot of `max_active_faults` while alive.
pub struct StreamFault {
    pub rule: Arc<str>,
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
    _slot: ActiveSlot,
}

/// The faults chosen for one opaque/TLS connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionFault {
    pub connect_delay: Option<Duration>,
    pub reset: bool,
}

/// Counts of one rule, kept across rule-set changes by name.
#[derive(Debug, Default)]
pub struct RuleCounters {
    pub delays: AtomicU64,
    pub aborts: AtomicU64,
    /// Connections faulted at all, and by kind.
    pub tcp_faults: AtomicU64,
    pub tcp_delays: AtomicU64,
    pub tcp_resets: AtomicU64,
    pub overflow: AtomicU64,
}

/// How often one rule fired, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounts {
    pub rule: String,
    pub delays: u64,
    pub aborts: u64,
    pub tcp_delays: u64,
    pub tcp_resets: u64,
    pub overflow: u64,
}

struct Rule {
    spec: FaultRule,
    counters: Arc<RuleCounters>,
}

/// The rules in force and their counts.
pub struct Faults {
    in_force: ArcSwap<Vec<Rule>>,
    from_config: Mutex<Vec<FaultRule>>,
    /// From `FaultInjection` resources (Kubernetes mode), named `namespace/name`.
    from_cluster: Mutex<Vec<FaultRule>>,
    /// Set through the admin API; a rule here replaces a config or cluster rule of the same
    /// name.
    from_admin: Mutex<Vec<FaultRule>>,
    counters: Mutex<HashMap<String, Arc<RuleCounters>>>,
    active: Arc<AtomicUsize>,
    max_active: AtomicUsize,
    /// Told after every change of the rules in force, before the change returns.
    on_change: Mutex<Option<ChangeHook>>,
}

type ChangeHook = Box<dyn Fn() + Send + Sync>;

/// A rule as the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleSummary {
    pub rule: FaultRule,
    /// `config`, `kubernetes` or `admin`.
    pub source: String,
    pub delays: u64,
    pub aborts: u64,
    pub tcp_faults: u64,
    pub overflow: u64,
}

impl Faults {
    pub fn new(config_rules: Vec<FaultRule>, max_active: usize) -> Faults {
        let faults = Faults {
            in_force: ArcSwap::from_pointee(Vec::new()),
            from_config: Mutex::new(config_rules),
            from_cluster: Mutex::default(),
            from_admin: Mutex::default(),
            counters: Mutex::default(),
            active: Arc::default(),
            max_active: AtomicUsize::new(max_active),
            on_change: Mutex::default(),
        };
        faults.rebuild();
        faults
    }

    /// Has `hook` called after every change of the rules in force (the kernel path keeps
    /// the destinations rules name off it).
    pub fn on_change(&self, hook: ChangeHook) {
        *lock(&self.on_change) = Some(hook);
    }

    /// A reload: the config's rules replace the previous config's; admin rules stay.
    pub fn set_config_rules(&self, rules: Vec<FaultRule>, max_active: usize) {
        *lock(&self.from_config) = rules;
        self.max_active.store(max_active, Ordering::Relaxed);
        self.rebuild();
    }

    /// The rules of the cluster's `FaultInjection` resources, already validated: the whole
    /// set, replacing the previous one.
    pub fn set_cluster_rules(&self, rules: Vec<FaultRule>) {
        *lock(&self.from_cluster) = rules;
        self.rebuild();
    }

    /// Adds or replaces (by name) rules, already validated.
    pub fn set(&self, rules: Vec<FaultRule>) {
        {
            let mut admin = lock(&self.from_admin);
            for rule in rules {
                admin.retain(|r| r.name != rule.name);
                admin.push(rule);
            }
        }
        self.rebuild();
    }

    /// Removes the rule `name` (an admin rule; a config rule until the next reload; a
    /// cluster rule until its resources change next).
    pub fn clear(&self, name: &str) -> bool {
        let remove = |rules: &Mutex<Vec<FaultRule>>| {
            let mut rules = lock(rules);
            let before = rules.len();
            rules.retain(|r| r.name != name);
            before != rules.len()
        };
        // From every list it is in, not only the first: no short-circuit.
        let removed: Vec<bool> = [&self.from_admin, &self.from_config, &self.from_cluster]
            .into_iter()
            .map(remove)
            .collect();
        self.rebuild();
        removed.contains(&true)
    }

    pub fn list(&self) -> Vec<RuleSummary> {
        let names = |rules: &Mutex<Vec<FaultRule>>| -> Vec<String> {
            lock(rules).iter().map(|r| r.name.clone()).collect()
        };
        let (admin, cluster) = (names(&self.from_admin), names(&self.from_cluster));
        self.in_force
            .load()
            .iter()
            .map(|rule| RuleSummary {
                rule: rule.spec.clone(),
                source: if admin.contains(&rule.spec.name) {
                    "admin"
                } else if cluster.contains(&rule.spec.name) {
                    "kubernetes"
                } else {
                    "config"
                }
                .into(),
                delays: rule.counters.delays.load(Ordering::Relaxed),
                aborts: rule.counters.aborts.load(Ordering::Relaxed),
                tcp_faults: rule.counters.tcp_faults.load(Ordering::Relaxed),
                overflow: rule.counters.overflow.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Rules in force.
    pub fn rules_in_force(&self) -> usize {
        self.in_force.load().len()
    }

    /// The counts of every rule ever in force (kept by name), so they only ever grow.
    pub fn counts(&self) -> Vec<RuleCounts> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counts: Vec<RuleCounts> = lock(&self.counters)
            .iter()
            .map(|(rule, c)| RuleCounts {
                rule: rule.clone(),
                delays: load(&c.delays),
                aborts: load(&c.aborts),
                tcp_delays: load(&c.tcp_delays),
                tcp_resets: load(&c.tcp_resets),
                overflow: load(&c.overflow),
            })
            .collect();
        counts.sort_by(|a, b| a.rule.cmp(&b.rule));
        counts
    }

    fn rebuild(&self) {
        let admin = lock(&self.from_admin).clone();
        let cluster = lock(&self.from_cluster).clone();
        let overridden = |r: &FaultRule, by: &[FaultRule]| by.iter().any(|a| a.name == r.name);
        let mut specs: Vec<FaultRule> = lock(&self.from_config)
            .iter()
            .filter(|r| !overridden(r, &admin) && !overridden(r, &cluster))
            .cloned()
            .collect();
        specs.extend(cluster.into_iter().filter(|r| !overridden(r, &admin)));
        specs.extend(admin);
        let mut counters = lock(&self.counters);
        let rules = specs
            .into_iter()
            .map(|spec| Rule {
                counters: counters.entry(spec.name.clone()).or_default().clone(),
                spec,
            })
            .collect();
        drop(counters);
        self.in_force.store(Arc::new(rules));
        if let Some(hook) = lock(&self.on_change).as_ref() {
            hook();
        }
    }

    /// The faults for one HTTP/2 stream: the first matching rule decides. `None` when no
    /// rule matches, none fires, or `max_active_faults` streams are already being faulted.
    pub fn for_stream(
        &self,
        target: &Target<'_>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<StreamFault> {
        let rules = self.in_force.load();
        let rule = rules
            .iter()
            .find(|r| matches(&r.spec, target) && matches_request(&r.spec, path, headers))?;
        let (mut delay, mut abort) = (None, None);
        if rule.spec.header_control {
            delay = header_delay(headers);
            abort = header_abort(headers);
        }
        if delay.is_none()
            && let Some(d) = rule.spec.delay.as_ref().filter(|d| d.percentage.roll())
        {
            delay = Some(d.fixed);
        }
        if abort.is_none()
            && let Some(a) = rule.spec.abort.as_ref().filter(|a| a.percentage.roll())
        {
            abort = match (a.grpc_status, a.http_status) {
                (Some(code), _) => Some(Abort::Grpc(code)),
                (None, Some(status)) => Some(Abort::Http(status)),
                (None, None) => None,
            };
        }
        if delay.is_none() && abort.is_none() {
            return None;
        }
        let Some(slot) = ActiveSlot::take(&self.active, self.max_active.load(Ordering::Relaxed))
        else {
            rule.counters.overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if delay.is_some() {
            rule.counters.delays.fetch_add(1, Ordering::Relaxed);
        }
        if abort.is_some() {
            rule.counters.aborts.fetch_add(1, Ordering::Relaxed);
        }
        Some(StreamFault {
            rule: rule.spec.name.as_str().into(),
            delay,
            abort,
            _slot: slot,
        })
    }

    /// The faults for one connection forwarded as opaque TCP or TLS.
    pub fn for_connection(&self, target: &Target<'_>) -> ConnectionFault {
        let rules = self.in_force.load();
        let Some(rule) = rules
            .iter()
            .find(|r| r.spec.tcp.is_some() && matches(&r.spec, target))
        else {
            return ConnectionFault::default();
        };
        let Some(tcp) = &rule.spec.tcp else {
            return ConnectionFault::default();
        };
        let fault = ConnectionFault {
            connect_delay: tcp.connect_delay,
            reset: tcp.reset_percentage.is_some_and(|p| p.roll()),
        };
        if fault != ConnectionFault::default() {
            rule.counters.tcp_faults.fetch_add(1, Ordering::Relaxed);
        }
        if fault.connect_delay.is_some() {
            rule.counters.tcp_delays.fetch_add(1, Ordering::Relaxed);
        }
        if fault.reset {
            rule.counters.tcp_resets.fetch_add(1, Ordering::Relaxed);
        }
        fault
    }
}

fn matches(rule: &FaultRule, target: &Target<'_>) -> bool {
    let m = &rule.matches;
    m.service
        .as_deref()
        .is_none_or(|s| target.service == Some(s))
        && m.vip.is_none_or(|vip| {
            crate::net::canonical(vip) == crate::net::canonical(target.original_dst)
        })
        && m.source_pod.as_deref().is_none_or(|p| p == target.pod)
}

fn matches_request(rule: &FaultRule, path: &str, headers: &HeaderMap) -> bool {
    let m = &rule.matches;
    m.path.as_ref().is_none_or(|p| p.matches(path))
        && m.headers.iter().all(|(name, value)| {
            headers
                .get(name.as_str())
                .is_some_and(|v| v.as_bytes() == value.as_bytes())
        })
}

/// `x-shunt-fault-delay: 200ms` (or plain milliseconds).
fn header_delay(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(DELAY_HEADER)?.to_str().ok()?.trim();
    humantime::parse_duration(value)
        .ok()
        .or_else(|| value.parse::<u64>().ok().map(Duration::from_millis))
}

fn header_abort(headers: &HeaderMap) -> Option<Abort> {
    if let Some(code) = headers.get(ABORT_GRPC_HEADER).and_then(|v| v.to_str().ok()) {
        let code: u8 = code.trim().parse().ok().filter(|c| *c <= 16)?;
        return Some(Abort::Grpc(GrpcCode(code)));
    }
    let status: u16 = headers
        .get(ABORT_HTTP_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (200..=599).contains(&status).then_some(Abort::Http(status))
}

/// One of the `max_active_faults` slots, given back when the faulted stream ends.
struct ActiveSlot(Arc<AtomicUsize>);

impl ActiveSlot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<ActiveSlot> {
        let taken = active.fetch_add(1, Ordering::AcqRel);
        if taken >= max {
            active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ActiveSlot(active.clone()))
    }
}

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fault::parse_rules;

    fn rule(name: &str, service: &str) -> FaultRule {
        parse_rules(&format!(
            "name: {name}\nmatch: {{service: {service}}}\nabort: {{http_status: 503}}\n"
        ))
        .unwrap()
        .remove(0)
    }

    fn sources(faults: &Faults) -> Vec<(String, String, Option<String>)> {
        faults
            .list()
            .into_iter()
            .map(|r| (r.rule.name, r.source, r.rule.matches.service))
            .collect()
    }

    #[test]
    fn cluster_rules_sit_between_config_and_admin_rules() {
        let faults = Faults::new(vec![rule("a", "from-config"), rule("b", "from-config")], 10);
        faults.set_cluster_rules(vec![rule("b", "from-cluster"), rule("c", "from-cluster")]);
        faults.set(vec![rule("c", "from-admin")]);
        let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), Some(c.to_owned()));
        assert_eq!(
            sources(&faults),
            [
                s("a", "config", "from-config"),
                s("b", "kubernetes", "from-cluster"),
                s("c", "admin", "from-admin"),
            ]
        );
        // The next set from the cluster replaces the previous one whole.
        faults.set_cluster_rules(Vec::new());
        assert_eq!(
            sources(&faults),
            [
                s("a", "config", "from-config"),
                s("b", "config", "from-config"),
                s("c", "admin", "from-admin"),
            ]
        );
    }
}
