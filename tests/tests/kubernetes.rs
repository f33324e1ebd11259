//! Kubernetes mode against a mock API server speaking real list/watch JSON
//! (`shunt_tests::kube_api`), with real enrollment: sandbox pods whose processes sit in
//! cgroups named the way the kubelet names them, found by shunt through `/proc`, and real
//! clients whose connections are intercepted (or not). The last tests run the DaemonSet's
//! pod itself, its image in podman (`shunt_tests::container`). Run as root.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use shunt::admin::api::{ConnRecord, PodSummary, RuleSummary, ServiceSummary};
use shunt_tests::{
    container::{self, Manifest, PodmanRun},
    daemon::{AsDaemonSet, Daemon, Options},
    grpc, kernel,
    kube_api::MockApi,
    probe,
    sandbox::{Pod, Sandbox},
    telemetry,
};

const NODE: &str = "node-a";
const NS: &str = "demo";
const WAIT: Duration = Duration::from_secs(30);

/// How the kubelet named the pod's cgroup.
#[derive(Clone, Copy)]
enum Driver {
    Cgroupfs,
    Systemd,
}

/// A Kubernetes pod backed by a sandbox pod: a process in its network namespace and in a
/// cgroup that names its UID.
struct KubePod<'a> {
    pod: &'a Pod,
    uid: String,
    node: &'a str,
    annotations: Value,
}

impl<'a> KubePod<'a> {
    fn new(sandbox: &Sandbox, pod: &'a Pod, driver: Driver) -> anyhow::Result<KubePod<'a>> {
        let seed = u32::from_str_radix(sandbox.id(), 16).unwrap_or(0);
        let index = pod.ipv4.octets()[3];
        let uid = format!("{seed:08x}-0000-4000-8000-{index:012x}");
        let cgroup = match driver {
            Driver::Cgroupfs => format!("kubepods/besteffort/pod{uid}"),
            Driver::Systemd => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ),
        };
        let mut sleep = Command::new("sleep");
        sleep.arg("300");
        sandbox.spawn_in_pod_cgroup(pod, &cgroup, sleep)?;
        Ok(KubePod {
            pod,
            uid,
            node: NODE,
            annotations: json!({}),
        })
    }

    fn object(&self) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": NS, "name": self.pod.name, "uid": self.uid,
                         "annotations": self.annotations},
            "spec": {"nodeName": self.node, "containers": [{"name": "main", "image": "app"}]},
            "status": {"phase": "Running", "podIP": self.pod.ipv4.to_string()},
        })
    }
}

fn namespace(labelled: bool) -> Value {
    let labels = if labelled {
        json!({"shunt.io/intercept": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}})
}

fn service(name: &str, vip: SocketAddr) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": NS, "name": name},
        "spec": {"clusterIP": vip.ip().to_string(), "clusterIPs": [vip.ip().to_string()],
                 "ports": [{"name": "grpc", "port": vip.port(), "targetPort": "grpc", "protocol": "TCP"}]},
    })
}

/// An endpoint: its pod, and its `ready`, `serving`, `terminating` conditions.
type Ep<'a> = (&'a Pod, bool, bool, bool);

fn slice(service: &str, port: u16, endpoints: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ready, serving, terminating)| {
            json!({"addresses": [pod.ipv4.to_string()],
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": NS, "name": format!("{service}-x1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn ready(pod: &Pod) -> Ep<'_> {
    (pod, true, true, false)
}

/// A virtual address no interface has, unique per sandbox.
fn vip(sandbox: &Sandbox, port: u16) -> SocketAddr {
    let seed = u32::from_str_radix(sandbox.id(), 16).unwrap_or(0);
    SocketAddr::new(
        IpAddr::from([10, 96, (seed % 250) as u8, 10 + (seed / 250 % 200) as u8]),
        port,
    )
}

fn start<'a>(sandbox: &'a Sandbox, api: &MockApi) -> anyhow::Result<Daemon<'a>> {
    let kubeconfig = api.write_kubeconfig(&sandbox.scratch_dir("kube")?)?;
    let daemon = Daemon::start(
        sandbox,
        &[],
        &Options {
            kubernetes: true,
            ..Options::default()
        }
        .with_config(|c| {
            c.kubernetes.node_name = Some(NODE.into());
            c.kubernetes.kubeconfig = Some(kubeconfig);
        }),
    )?;
    daemon.eventually("every watch synced", || connected(&daemon))?;
    Ok(daemon)
}

fn connected(daemon: &Daemon) -> anyhow::Result<bool> {
    let status = daemon.status()?;
    let kubernetes = status.kubernetes.as_ref();
    ensure!(kubernetes.is_some_and(|k| k.node == NODE), "{status:?}");
    Ok(kubernetes.is_some_and(|k| k.connected))
}

fn enrolled(daemon: &Daemon) -> anyhow::Result<BTreeSet<String>> {
    let pods: Vec<PodSummary> = daemon.ctl_as(&["pods"])?;
    Ok(pods.into_iter().map(|p| p.name).collect())
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The endpoints `shunt services` lists for `vip`.
fn endpoints(daemon: &Daemon, vip: SocketAddr) -> anyhow::Result<BTreeSet<String>> {
    let services: Vec<ServiceSummary> = daemon.ctl_as(&["services"])?;
    let service = services
        .iter()
        .find(|s| s.vip == vip)
        .with_context(|| format!("no Service at {vip}: {services:?}"))?;
    Ok(service
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect())
}

fn addrs(pods: &[&Pod], port: u16) -> BTreeSet<String> {
    pods.iter()
        .map(|p| SocketAddr::new(p.ipv4.into(), port).to_string())
        .collect()
}

/// One connection from `pod` to `to`: `Ok(true)` if shunt intercepted it and the server got
/// it from the pod's own address, `Ok(false)` if it failed (the address is virtual).
fn intercepted(sandbox: &Sandbox, pod: &Pod, to: SocketAddr) -> anyhow::Result<bool> {
    let seen = probe::connect(sandbox, pod, to, 1)?.remove(0);
    if seen.error.is_some() {
        ensure!(!seen.was_redirected(), "redirected yet failed: {seen:?}");
        return Ok(false);
    }
    ensure!(
        seen.was_redirected(),
        "reached {to} without shunt: {seen:?}"
    );
    ensure!(
        seen.server_saw_ip() == Some(IpAddr::V4(pod.ipv4)),
        "the server saw {seen:?}"
    );
    Ok(true)
}

/// A pod `backend` with a probe server on port 8080, and the virtual address port 80 of a
/// Service in front of it gets.
fn probe_backend(sandbox: &Sandbox) -> anyhow::Result<(Pod, SocketAddr)> {
    let backend = sandbox.add_pod("backend")?;
    probe::serve(
        sandbox,
        &backend,
        SocketAddr::new(backend.ipv4.into(), 8080),
    )?;
    Ok((backend, vip(sandbox, 80)))
}

#[test]
fn a_labelled_namespace_enrolls_this_nodes_pods_until_the_label_goes() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let (backend, vip) = probe_backend(&sandbox)?;
    let app = sandbox.add_pod("app")?;
    let app2 = sandbox.add_pod("app2")?;
    let elsewhere = sandbox.add_pod("elsewhere")?;
    let opted_out = sandbox.add_pod("opted-out")?;

    // Both cgroup naming schemes, a pod of another node and one that opted out, each with
    // a live process shunt could find.
    api.apply(KubePod::new(&sandbox, &app, Driver::Cgroupfs)?.object())?;
    api.apply(KubePod::new(&sandbox, &app2, Driver::Systemd)?.object())?;
    let mut other = KubePod::new(&sandbox, &elsewhere, Driver::Cgroupfs)?;
    other.node = "node-b";
    api.apply(other.object())?;
    let mut optout = KubePod::new(&sandbox, &opted_out, Driver::Systemd)?;
    optout.annotations = json!({"shunt.io/intercept": "disabled"});
    api.apply(optout.object())?;
    api.apply(namespace(false))?;
    api.apply(service("backend", vip))?;
    api.apply(slice("backend", 8080, &[ready(&backend)]))?;

    let daemon = start(&sandbox, &api)?;
    ensure!(enrolled(&daemon)?.is_empty());
    ensure!(!intercepted(&sandbox, &app, vip)?, "not enrolled yet");

    api.apply(namespace(true))?;
    daemon.eventually("demo/app and demo/app2 enrolled", || {
        Ok(enrolled(&daemon)? == names(&["demo/app", "demo/app2"]))
    })?;
    ensure!(intercepted(&sandbox, &app, vip)?);
    ensure!(intercepted(&sandbox, &app2, vip)?);
    ensure!(!intercepted(&sandbox, &opted_out, vip)?);
    ensure!(!intercepted(&sandbox, &elsewhere, vip)?);
    // The pods shunt watches are only this node's.
    ensure!(api.requests("GET /api/v1/pods") > 0);

    api.apply(namespace(false))?;
    daemon.eventually("nothing enrolled", || Ok(enrolled(&daemon)?.is_empty()))?;
    ensure!(!intercepted(&sandbox, &app, vip)?, "unenrolled");
    Ok(())
}

/// A labelled namespace with an enrolled client pod and Service `greeter` in front of
/// tonic greeters in `backends` (the slice lists the first); returns its virtual address.
fn greeter_service<'a>(
    sandbox: &'a Sandbox,
    api: &MockApi,
    client: &Pod,
    backends: &[&Pod],
) -> anyhow::Result<(Daemon<'a>, SocketAddr)> {
    for b in backends {
        grpc::tonic_serve(sandbox, b, &b.name, 50051)?;
    }
    let vip = vip(sandbox, 50051);
    api.apply(namespace(true))?;
    api.apply(KubePod::new(sandbox, client, Driver::Cgroupfs)?.object())?;
    api.apply(service("greeter", vip))?;
    api.apply(slice("greeter", 50051, &[ready(backends[0])]))?;
    let daemon = start(sandbox, api)?;
    daemon.eventually("the client enrolled", || {
        Ok(enrolled(&daemon)?.contains("demo/client"))
    })?;
    Ok((daemon, vip))
}

#[test]
fn endpoint_slice_updates_change_the_rotation() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let client = sandbox.add_pod("client")?;
    let b1 = sandbox.add_pod("b1")?;
    let b2 = sandbox.add_pod("b2")?;
    let b3 = sandbox.add_pod("b3")?;
    let (daemon, vip) = greeter_service(&sandbox, &api, &client, &[&b1, &b2, &b3])?;

    let steps: [(Vec<Ep<'_>>, Vec<&Pod>, &str); 5] = [
        (vec![ready(&b1), ready(&b2)], vec![&b1, &b2], "two ready"),
        (
            vec![ready(&b1), ready(&b2), ready(&b3)],
            vec![&b1, &b2, &b3],
            "b3 added",
        ),
        (
            vec![ready(&b1), (&b2, false, false, false), ready(&b3)],
            vec![&b1, &b3],
            "b2 not ready",
        ),
        (
            vec![(&b1, false, true, true), ready(&b3)],
            vec![&b3],
            "b1 terminating, b2 removed",
        ),
        (
            vec![(&b1, false, true, true)],
            vec![&b1],
            "only a terminating one left, still serving",
        ),
    ];
    for (slice_endpoints, expected, what) in steps {
        api.apply(slice("greeter", 50051, &slice_endpoints))?;
        let wanted = addrs(&expected, 50051);
        daemon.eventually(what, || Ok(endpoints(&daemon, vip)? == wanted))?;
        let calls = grpc::tonic_call(&sandbox, &client, vip, 30)?;
        let backends: BTreeSet<String> = calls.by_backend.keys().cloned().collect();
        let expected_names: BTreeSet<String> = expected.iter().map(|p| p.name.clone()).collect();
        ensure!(calls.ok == 30, "{what}: {calls:?}");
        ensure!(backends == expected_names, "{what}: {calls:?}");
        // Spread over each of them, not just touched.
        calls
            .check_even(30, expected.len(), 0.35)
            .with_context(|| what.to_owned())?;
    }
    Ok(())
}

#[test]
fn an_open_connection_sends_its_next_calls_to_the_new_endpoints() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let client = sandbox.add_pod("client")?;
    let b1 = sandbox.add_pod("b1")?;
    let b2 = sandbox.add_pod("b2")?;
    let (daemon, vip) = greeter_service(&sandbox, &api, &client, &[&b1, &b2])?;

    // One channel, one HTTP/2 connection, a call every 100 ms for the whole test.
    let log = sandbox.scratch_dir("calls")?.join("calls.jsonl");
    grpc::call_every_100ms(&sandbox, &client, vip, &log)?;
    daemon.eventually("calls answered by b1", || {
        Ok(grpc::answered_by(&log)
            .iter()
            .filter(|b| *b == "b1")
            .count()
            >= 3)
    })?;

    api.apply(slice("greeter", 50051, &[ready(&b2)]))?;
    let before = grpc::answered_by(&log).len();
    daemon.eventually("the same connection's calls answered by b2", || {
        let calls = grpc::answered_by(&log);
        Ok(calls.len() > before + 3 && calls[calls.len() - 3..].iter().all(|b| b == "b2"))
    })?;
    let calls = grpc::answered_by(&log);
    ensure!(!calls.contains(&"(failed)".to_owned()), "{calls:?}");
    // Still the one connection the client opened at the start.
    let conns: Vec<ConnRecord> = daemon.ctl_as(&["conns"])?;
    let to_vip: Vec<&ConnRecord> = conns.iter().filter(|c| c.original_dst == vip).collect();
    ensure!(to_vip.len() == 1, "{conns:?}");
    ensure!(daemon.closed_conns()?.iter().all(|c| c.original_dst != vip));
    Ok(())
}

fn fault(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "shunt.io/v1alpha1", "kind": "FaultInjection",
        "metadata": {"namespace": NS, "name": name},
        "spec": spec,
    })
}

fn rule_names(daemon: &Daemon) -> anyhow::Result<Vec<(String, String)>> {
    let rules: Vec<RuleSummary> = daemon.ctl_as(&["faults", "list"])?;
    Ok(rules.into_iter().map(|r| (r.rule.name, r.source)).collect())
}

#[test]
fn fault_injection_resources_become_rules_or_report_their_error() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let client = sandbox.add_pod("client")?;
    let greeter = sandbox.add_pod("greeter")?;
    let (daemon, vip) = greeter_service(&sandbox, &api, &client, &[&greeter])?;
    ensure!(grpc::tonic_call(&sandbox, &client, vip, 3)?.ok == 3);

    let abort = json!({"match": {"service": "greeter", "path": "/helloworld.Greeter/SayHello"},
                       "abort": {"grpc_status": "UNAVAILABLE", "percentage": 100}});
    api.apply(fault("abort-all", abort))?;
    let accepted = api.wait_for("FaultInjection", NS, "abort-all", WAIT, |o| {
        o["status"]["state"] == "Accepted"
    })?;
    ensure!(accepted["status"]["observedGeneration"] == 1, "{accepted}");
    ensure!(
        rule_names(&daemon)? == [("demo/abort-all".to_owned(), "kubernetes".to_owned())],
        "{:?}",
        rule_names(&daemon)
    );
    let calls = grpc::tonic_call(&sandbox, &client, vip, 5)?;
    ensure!(
        calls.ok == 0 && calls.errors.get("Unavailable") == Some(&5),
        "{calls:?}"
    );

    // Invalid: the error, field named, in its status; the rules stay as they were.
    api.apply(fault(
        "broken",
        json!({"match": {"service": "greeter"}, "delay": {"fixed": "soon"}}),
    ))?;
    let broken = api.wait_for("FaultInjection", NS, "broken", WAIT, |o| {
        o["status"]["state"] == "Invalid"
    })?;
    let message = broken["status"]["message"].as_str().unwrap_or_default();
    ensure!(message.contains("spec.delay.fixed"), "{broken}");
    ensure!(rule_names(&daemon)?.len() == 1, "{:?}", rule_names(&daemon));

    // An accepted resource edited into an invalid one keeps its last accepted spec.
    api.apply(fault(
        "abort-all",
        json!({"match": {"service": "greeter"}, "abort": {"grpc_status": 14, "http_status": 503}}),
    ))?;
    let edited = api.wait_for("FaultInjection", NS, "abort-all", WAIT, |o| {
        o["status"]["state"] == "Invalid" && o["status"]["observedGeneration"] == 2
    })?;
    ensure!(
        edited["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.abort") && m.contains("stays in force")),
        "{edited}"
    );
    ensure!(grpc::tonic_call(&sandbox, &client, vip, 2)?.ok == 0);

    ensure!(api.delete("FaultInjection", NS, "abort-all"));
    daemon.eventually("no rule left", || Ok(rule_names(&daemon)?.is_empty()))?;
    ensure!(grpc::tonic_call(&sandbox, &client, vip, 3)?.ok == 3);
    Ok(())
}

#[test]
fn a_lost_api_connection_keeps_the_state_and_catches_up() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let client = sandbox.add_pod("client")?;
    let greeter = sandbox.add_pod("greeter")?;
    let (daemon, vip) = greeter_service(&sandbox, &api, &client, &[&greeter])?;

    api.set_down(true);
    daemon.eventually("the watches failing", || Ok(!connected(&daemon)?))?;
    let status = daemon.ctl(&["status"])?;
    ensure!(status.contains("last known state kept"), "{status}");
    // A change made while shunt cannot see it.
    api.apply(namespace(false))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(enrolled(&daemon)? == names(&["demo/client"]));
    ensure!(endpoints(&daemon, vip)? == addrs(&[&greeter], 50051));
    let calls = grpc::tonic_call(&sandbox, &client, vip, 3)?;
    ensure!(
        calls.ok == 3,
        "still served while the API is away: {calls:?}"
    );

    api.set_down(false);
    daemon.eventually("the watches back", || connected(&daemon))?;
    daemon.eventually("the missed change applied", || {
        Ok(enrolled(&daemon)?.is_empty())
    })?;
    Ok(())
}

#[test]
fn a_new_daemon_takes_over_the_enrolled_pods_and_the_old_one_waits_for_sigterm()
-> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let (backend, vip) = probe_backend(&sandbox)?;
    let app = sandbox.add_pod("app")?;
    api.apply(KubePod::new(&sandbox, &app, Driver::Cgroupfs)?.object())?;
    api.apply(namespace(true))?;
    api.apply(service("backend", vip))?;
    api.apply(slice("backend", 8080, &[ready(&backend)]))?;
    let mut old = start(&sandbox, &api)?;
    old.eventually("demo/app enrolled", || {
        Ok(enrolled(&old)? == names(&["demo/app"]))
    })?;
    old.eventually("the Service known and demo/app intercepted", || {
        intercepted(&sandbox, &app, vip)
    })?;

    let new = old.start_successor()?;
    new.eventually("every watch synced", || connected(&new))?;
    // Until its Services are discovered the new daemon dials the original destination.
    new.eventually("the Service's endpoints known", || {
        Ok(endpoints(&new, vip)? == addrs(&[&backend], 8080))
    })?;
    // The controller claimed the handed-over pod: same listeners, never unenrolled.
    new.eventually("demo/app enrolled", || {
        Ok(enrolled(&new)? == names(&["demo/app"]))
    })?;
    let log = new.log_text();
    ensure!(log.contains("took over"), "{log}");
    ensure!(!log.contains("unenrolled"), "{log}");
    ensure!(
        intercepted(&sandbox, &app, vip)?,
        "not intercepted after the takeover; new log:\n{}\nold log:\n{}",
        new.log_text(),
        old.log_text()
    );
    ensure!(new.counter("proxy", "accepted")? >= 1);
    // Drained, the old daemon stays until its pod is deleted (SIGTERM, on drop), so the
    // kubelet would not restart it into taking the node back.
    old.eventually("the old daemon drained", || {
        Ok(old.log_text().contains("waiting for SIGTERM"))
    })?;
    ensure!(old.is_running());
    ensure!(
        intercepted(&sandbox, &app, vip)?,
        "not intercepted once the old daemon drained; new log:\n{}",
        new.log_text()
    );
    Ok(())
}

/// The DaemonSet's pod (`deploy/daemonset.yaml`) from `image` in podman, configured by
/// `deploy/configmap.yaml`, against `api`: its kubeconfig rides in the config volume where a
/// cluster gives the service account's token.
fn start_in_podman<'a>(
    sandbox: &'a Sandbox,
    api: &MockApi,
    image: &str,
) -> anyhow::Result<Daemon<'a>> {
    container::require_image(image)?;
    let mut config = container::configmap_config()?;
    // The directory standing in for the ConfigMap volume (`Daemon` mounts the same one).
    config.kubernetes.kubeconfig = Some(api.write_kubeconfig(&sandbox.scratch_dir("etc-shunt")?)?);
    let daemon = Daemon::start(
        sandbox,
        &[],
        &Options {
            kubernetes: true,
            config,
            daemonset: Some(AsDaemonSet {
                image: image.to_owned(),
                node: NODE.into(),
            }),
            ..Options::default()
        },
    )?;
    daemon.eventually("every watch synced", || connected(&daemon))?;
    Ok(daemon)
}

/// A greeter server: tonic's or grpcio's (`grpc::tonic_serve`, `grpc::serve`).
type Serve = fn(&Sandbox, &Pod, &str, u16) -> anyhow::Result<u32>;

/// A client pod and three greeters behind Service `greeter` at `vip`.
struct Greeters {
    client: Pod,
    backends: [Pod; 3],
    vip: SocketAddr,
}

/// Three greeters behind Service `greeter`, all ready, and an enrolled client pod in a
/// labelled namespace.
fn three_greeters(sandbox: &Sandbox, api: &MockApi, serve: Serve) -> anyhow::Result<Greeters> {
    let client = sandbox.add_pod("client")?;
    let backends = [
        sandbox.add_pod("b1")?,
        sandbox.add_pod("b2")?,
        sandbox.add_pod("b3")?,
    ];
    for b in &backends {
        serve(sandbox, b, &b.name, 50051)?;
    }
    let vip = vip(sandbox, 50051);
    api.apply(namespace(true))?;
    api.apply(KubePod::new(sandbox, &client, Driver::Systemd)?.object())?;
    api.apply(service("greeter", vip))?;
    api.apply(slice("greeter", 50051, &backends.each_ref().map(ready)))?;
    Ok(Greeters {
        client,
        backends,
        vip,
    })
}

/// Waits until `daemon` has enrolled the client and knows the three endpoints.
fn served(daemon: &Daemon, greeters: &Greeters) -> anyhow::Result<()> {
    daemon.eventually("the client enrolled", || {
        Ok(enrolled(daemon)?.contains("demo/client"))
    })?;
    let wanted = addrs(&greeters.backends.each_ref(), 50051);
    daemon.eventually("the Service's three endpoints known", || {
        Ok(endpoints(daemon, greeters.vip)? == wanted)
    })
}

#[test]
fn the_daemonset_pod_in_podman_serves_probes_cli_and_stops_and_uninstalls_as_promised()
-> anyhow::Result<()> {
    let manifest = Manifest::read("daemonset.yaml")?;
    let image = container::shunt_image();
    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    let greeters = three_greeters(&sandbox, &api, grpc::tonic_serve)?;
    let (client, vip) = (&greeters.client, greeters.vip);
    let mut daemon = start_in_podman(&sandbox, &api, &image)?;
    let name = daemon.container_name().context("not in a container")?;
    served(&daemon, &greeters)?;

    // Per-stream balancing: one connection, its calls spread evenly.
    let calls = grpc::tonic_call(&sandbox, client, vip, 30)?;
    calls.check_even(30, 3, 0.35)?;

    // A FaultInjection resource in force.
    let abort = json!({"match": {"service": "greeter"},
                       "abort": {"grpc_status": "UNAVAILABLE", "percentage": 100}});
    api.apply(fault("abort-all", abort))?;
    api.wait_for("FaultInjection", NS, "abort-all", WAIT, |o| {
        o["status"]["state"] == "Accepted"
    })?;
    let calls = grpc::tonic_call(&sandbox, client, vip, 5)?;
    ensure!(
        calls.ok == 0 && calls.errors.get("Unavailable") == Some(&5),
        "{calls:?}"
    );
    ensure!(api.delete("FaultInjection", NS, "abort-all"));
    daemon.eventually("no rule left", || Ok(rule_names(&daemon)?.is_empty()))?;

    // The kubelet's probes, as the manifest writes them.
    let shunt = manifest.container("shunt")?;
    let health = daemon.telemetry_addr("health")?;
    for (what, probe) in [
        ("readiness", &shunt.readiness_probe),
        ("liveness", &shunt.liveness_probe),
    ] {
        let path = &probe
            .as_ref()
            .with_context(|| format!("no {what} probe"))?
            .http_get
            .path;
        let (code, body) = telemetry::http_get(health, path, "*/*")?;
        ensure!(
            (200..400).contains(&code),
            "{what} probe {path}: {code} {body}"
        );
    }

    // `kubectl exec … shunt status`: the CLI in the image finds the daemon by itself.
    let out = container::podman(&["exec", &name, "shunt", "status"], WAIT)?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "podman exec {name} shunt status: {}{printed}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        printed.contains(&format!("(pid {})", daemon.pid()?)),
        "{printed}"
    );

    // Deleting the pod: SIGTERM, then the grace period. The daemon drains and exits; its
    // programs stay attached and pinned on the host for the next one.
    let grace = manifest.grace();
    ensure!(
        daemon.terminate(grace),
        "still running {grace:?} after SIGTERM; its log:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    ensure!(!log.contains("panicked"), "{log}");
    ensure!(
        kernel::attached_programs(sandbox.cgroup())?.len() == 5,
        "the programs did not stay attached: {:?}",
        kernel::attached_programs(sandbox.cgroup())
    );
    ensure!(
        std::fs::read_dir(&daemon.pin_dir)?.next().is_some(),
        "no pins on the host's bpffs under {}",
        daemon.pin_dir.display()
    );

    // The uninstall DaemonSet's container, with the same ConfigMap: nothing of shunt left.
    let uninstall = Manifest::read("uninstall/daemonset.yaml")?;
    let hosts = std::collections::BTreeMap::from([("config".to_owned(), daemon.config_dir())]);
    let mut run = uninstall.podman_run(&PodmanRun {
        container: "uninstall",
        name: &format!("shunt-uninstall-{}", sandbox.id()),
        image: &image,
        node: NODE,
        hosts: &hosts,
        env: &[],
        cgroup_parent: None,
    })?;
    let child = run
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting podman")?;
    let out = shunt_tests::sandbox::wait_with_timeout(child, Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "the uninstall container failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        kernel::attached_programs(sandbox.cgroup())?.is_empty(),
        "still attached after uninstall: {:?}",
        kernel::attached_programs(sandbox.cgroup())
    );
    ensure!(
        !daemon.pin_dir.exists(),
        "uninstall left {}",
        daemon.pin_dir.display()
    );
    Ok(())
}

#[test]
fn a_rolling_update_of_the_daemonset_in_podman_fails_no_call() -> anyhow::Result<()> {
    // The manifest's update surges: the new pod starts while the old one runs, the old one
    // is deleted once the new one is ready. That is what the handoff needs (the old daemon
    // hands its listeners over); delete-then-create would leave the node without shunt.
    let manifest = Manifest::read("daemonset.yaml")?;
    let rolling = manifest
        .update_strategy
        .as_ref()
        .map(|s| (s["type"].clone(), s["rollingUpdate"].clone()));
    ensure!(
        rolling
            .as_ref()
            .is_some_and(|(kind, update)| kind == "RollingUpdate"
                && update["maxSurge"] == 1
                && update["maxUnavailable"] == 0),
        "{rolling:?}"
    );
    let image = container::shunt_image();
    let next = container::derived_image(&image, "next")?;

    let sandbox = Sandbox::new()?;
    let api = MockApi::start()?;
    // grpcio's greeters: they serve the steady load's stream.
    let greeters = three_greeters(&sandbox, &api, grpc::serve)?;
    let (client, vip) = (&greeters.client, greeters.vip);
    let mut old = start_in_podman(&sandbox, &api, &image)?;
    served(&old, &greeters)?;

    // grpcio: unary calls back to back, a new connection every tenth, for as long as a
    // server stream of 100 messages, one every 150 ms, lasts: it outlasts the update.
    let load = grpc::steady_in_background(&sandbox, client, vip, 100, 150)?;
    old.eventually("calls through the first pod", || {
        Ok(old.counter("proxy", "h2_streams")? >= 50)
    })?;

    let new = old.start_successor_from(Some(&next))?;
    ensure!(
        container::inspect(
            &new.container_name().context("no container")?,
            "{{.ImageName}}"
        )?
        .contains(&next),
        "the new pod does not run {next}"
    );
    new.eventually("every watch synced", || connected(&new))?;
    // Ready: the DaemonSet controller deletes the old pod only now.
    let health = new.telemetry_addr("health")?;
    new.eventually("the new pod ready", || {
        Ok(telemetry::http_get(health, "/ready", "*/*")?.0 == 200)
    })?;
    old.eventually("the old pod drained", || {
        Ok(old.log_text().contains("waiting for SIGTERM"))
    })?;
    ensure!(
        old.terminate(manifest.grace()),
        "the old pod outlived its grace period"
    );

    let steady = load.finish(&sandbox, Duration::from_secs(120))?;
    ensure!(
        steady.errors.is_empty(),
        "{} of {} calls failed across the update: {steady:?}\nthe new pod's log:\n{}",
        steady.calls - steady.ok,
        steady.calls,
        new.log_text()
    );
    ensure!(steady.drip.error.is_none(), "{steady:?}");
    ensure!(steady.drip.received == 100, "{steady:?}");
    ensure!(steady.by_backend.len() == 3, "{steady:?}");
    ensure!(new.counter("proxy", "h2_streams")? > 0);
    Ok(())
}
