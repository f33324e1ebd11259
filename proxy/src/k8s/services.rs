//! Services and EndpointSlices → the discovered Services the data path routes by.
//!
//! Each TCP port of a Service with a cluster IP becomes a virtual address `clusterIP:port`
//! (each cluster IP of a dual-stack Service) named `namespace/service`. Its endpoints come
//! from the Service's EndpointSlices of the same address family: the slice port with the
//! Service port's name gives the number (so named target ports resolve per pod, as the
//! EndpointSlice controller resolved them); endpoints that are `ready` are used, and only when
//! none is, those still `serving` while `terminating` (as kube-proxy does), so a rollout
//! never leaves a Service with nothing. Headless Services have no virtual address: a
//! connection to one of their pods' addresses goes to that pod, under the Service's name.
//!
//! A port's protocol is declared by its `appProtocol`, else by its name as Istio reads names
//! (`<protocol>[-<suffix>]`): see [`declared_protocol`]. `tls` and `tcp` take the kernel
//! path; `http2` never does; anything else is sniffed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use kube::{Api, Client, ResourceExt, runtime::watcher};

use super::{
    Health,
    watch::{Watched, settle},
};
use crate::{
    config::{ServiceConfig, ServiceProtocol},
    route::DiscoveredServices,
};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Services to route, sorted by name and address.
pub fn desired_services(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Vec<ServiceConfig> {
    let mut slices_of: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if let (Some(namespace), Some(service)) =
            (slice.namespace(), slice.labels().get(SERVICE_NAME_LABEL))
        {
            slices_of
                .entry((namespace, service.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut routes = Vec::new();
    for service in services {
        let (Some(namespace), Some(spec)) = (service.namespace(), service.spec.as_ref()) else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let name = format!("{namespace}/{}", service.name_any());
        let slices = slices_of
            .get(&(namespace, service.name_any()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ports = spec.ports.iter().flatten().filter(|p| is_tcp(&p.protocol));
        let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            (_, Some(ip)) => vec![ip.as_str()],
            _ => Vec::new(),
        };
        if cluster_ips.contains(&"None") {
            for port in ports {
                for addr in headless_addrs(slices, port) {
                    routes.push(service_config(&name, addr, vec![addr], port));
                }
            }
            continue;
        }
        for port in ports {
            for ip in cluster_ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
            {
                let Ok(vip_port) = u16::try_from(port.port) else {
                    continue;
                };
                let endpoints = endpoints(slices, port, ip.is_ipv4());
                routes.push(service_config(
                    &name,
                    SocketAddr::new(ip, vip_port),
                    endpoints,
                    port,
                ));
            }
        }
    }
    routes.sort_by(|a, b| (&a.name, a.vip).cmp(&(&b.name, b.vip)));
    routes
}

fn service_config(
    name: &str,
    vip: SocketAddr,
    endpoints: Vec<SocketAddr>,
    port: &ServicePort,
) -> ServiceConfig {
    ServiceConfig {
        name: name.to_owned(),
        vip,
        endpoints,
        protocol: declared_protocol(port),
        ..ServiceConfig::default()
    }
}

/// What a Service port says it carries: its `appProtocol` (`kubernetes.io/h2c`, `grpc`,
/// `http2`, `https`, `tls`, `tcp`…), else its name's first part (`grpc-api`, `https`,
/// `tcp-db`, `mysql`…); `auto` when neither says.
pub fn declared_protocol(port: &ServicePort) -> ServiceProtocol {
    let by_name = |name: &str| match name.to_ascii_lowercase().as_str() {
        "kubernetes.io/h2c" | "h2c" | "http2" | "grpc" => Some(ServiceProtocol::Http2),
        "https" | "tls" | "kubernetes.io/tls" => Some(ServiceProtocol::Tls),
        "tcp" | "mysql" | "mongo" | "redis" | "postgres" | "postgresql" => {
            Some(ServiceProtocol::Tcp)
        }
        _ => None,
    };
    let from_name = || {
        let name = port.name.as_deref()?;
        by_name(name.split('-').next().unwrap_or(name))
    };
    port.app_protocol
        .as_deref()
        .and_then(by_name)
        .or_else(from_name)
        .unwrap_or_default()
}

fn name_of(name: &Option<String>) -> &str {
    name.as_deref().unwrap_or_default()
}

fn is_tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// Every endpoint of `slices` for `port` in one address family with its conditions:
/// `(address, ready, serving and terminating)`.
fn candidates<'a>(
    slices: &'a [&'a EndpointSlice],
    port: &'a ServicePort,
    ipv4: Option<bool>,
) -> impl Iterator<Item = (SocketAddr, bool, bool)> + 'a {
    slices
        .iter()
        .filter(move |slice| match (slice.address_type.as_str(), ipv4) {
            ("IPv4", Some(true) | None) | ("IPv6", Some(false) | None) => true,
            _ => false, // FQDN slices, or the other family
        })
        .flat_map(move |slice| {
            let number = slice
                .ports
                .iter()
                .flatten()
                // An unnamed port is `""` in slices and may be absent in the Service.
                .find(|p| name_of(&p.name) == name_of(&port.name) && is_tcp(&p.protocol))
                .and_then(|p| p.port)
                .and_then(|n| u16::try_from(n).ok());
            number
                .into_iter()
                .flat_map(move |number| slice.endpoints.iter().map(move |e| (e, number)))
        })
        .filter_map(|(endpoint, number)| {
            // Addresses of one endpoint are fungible; the first is canonical.
            let ip: IpAddr = endpoint.addresses.first()?.parse().ok()?;
            let (ready, serving_terminating) = conditions(endpoint);
            Some((SocketAddr::new(ip, number), ready, serving_terminating))
        })
}

/// `(ready, serving and terminating)`, with the API's defaults for conditions left unset:
/// ready unless said otherwise, serving when ready, not terminating.
fn conditions(endpoint: &Endpoint) -> (bool, bool) {
    let c = endpoint.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving && terminating)
}

/// The endpoints new streams may go to.
fn endpoints(slices: &[&EndpointSlice], port: &ServicePort, ipv4: bool) -> Vec<SocketAddr> {
    let all: Vec<(SocketAddr, bool, bool)> = candidates(slices, port, Some(ipv4)).collect();
    let ready: BTreeSet<SocketAddr> = all.iter().filter(|e| e.1).map(|e| e.0).collect();
    if !ready.is_empty() {
        return ready.into_iter().collect();
    }
    all.iter()
        .filter(|e| e.2)
        .map(|e| e.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// A headless Service's pod addresses: each goes to itself, whatever its state (the client
/// chose that pod).
fn headless_addrs(slices: &[&EndpointSlice], port: &ServicePort) -> BTreeSet<SocketAddr> {
    candidates(slices, port, None).map(|e| e.0).collect()
}

/// Watches Services and EndpointSlices and keeps the discovered Services in step, until the
/// daemon stops.
pub async fn run(client: Client, discovered: Arc<DiscoveredServices>, health: Arc<Health>) {
    let mut services = Watched::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        (),
        "services",
        health.clone(),
    );
    let mut slices = Watched::new(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
        (),
        "endpointslices",
        health,
    );
    loop {
        if !settle(&mut (&mut services, &mut slices)).await {
            tracing::error!("the Services' watch ended; Services stay as they are");
            return;
        }
        if !(services.synced && slices.synced) {
            continue;
        }
        let desired = desired_services(&services.store.state(), &slices.store.state());
        let changes = discovered.replace(&desired);
        services.applied();
        slices.applied();
        if changes.any() {
            tracing::info!(
                addresses = desired.len(),
                added = changes.added,
                removed = changes.removed,
                endpoints_changed = changes.endpoints_changed,
                "Services from Kubernetes updated"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service(name: &str, spec: Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "demo", "name": name},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn slice(service: &str, family: &str, ports: Value, endpoints: Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "namespace": "demo",
                    "name": format!("{service}-{}", fastrand::u32(..)),
                    "labels": {SERVICE_NAME_LABEL: service},
                },
                "addressType": family,
                "ports": ports,
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    fn endpoint(ip: &str, conditions: Value) -> Value {
        json!({"addresses": [ip], "conditions": conditions})
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn app_protocol_then_the_port_name_declare_the_protocol() {
        let port = |name: Option<&str>, app: Option<&str>| -> ServicePort {
            serde_json::from_value(json!({"port": 1, "name": name, "appProtocol": app})).unwrap()
        };
        let cases = [
            (Some("grpc"), None, ServiceProtocol::Http2),
            (Some("grpc-api"), None, ServiceProtocol::Http2),
            (None, Some("kubernetes.io/h2c"), ServiceProtocol::Http2),
            (Some("https"), None, ServiceProtocol::Tls),
            (Some("tcp-db"), None, ServiceProtocol::Tcp),
            (Some("mysql"), None, ServiceProtocol::Tcp),
            // appProtocol wins over the name.
            (
                Some("https"),
                Some("kubernetes.io/h2c"),
                ServiceProtocol::Http2,
            ),
            (Some("web"), None, ServiceProtocol::Auto),
            (None, Some("example.com/custom"), ServiceProtocol::Auto),
            (None, None, ServiceProtocol::Auto),
        ];
        for (name, app, want) in cases {
            assert_eq!(
                declared_protocol(&port(name, app)),
                want,
                "{name:?} {app:?}"
            );
        }
    }

    #[test]
    fn ready_endpoints_of_each_port_with_named_target_ports() {
        let services = [service(
            "greeter",
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [
                {"name": "grpc", "port": 50051, "targetPort": "grpc"},
                {"name": "metrics", "port": 9090, "targetPort": 9100},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]}),
        )];
        let slices = [
            // Pods whose port named `grpc` differs: each slice has its own number.
            slice(
                "greeter",
                "IPv4",
                json!([{"name": "grpc", "port": 8080}, {"name": "metrics", "port": 9100}]),
                json!([
                    endpoint("10.1.0.1", json!({"ready": true})),
                    endpoint("10.1.0.2", json!({})),
                    endpoint("10.1.0.3", json!({"ready": false, "serving": true})),
                    endpoint(
                        "10.1.0.4",
                        json!({"ready": false, "serving": true, "terminating": true})
                    ),
                ]),
            ),
            slice(
                "greeter",
                "IPv4",
                json!([{"name": "grpc", "port": 9000}]),
                json!([endpoint("10.1.0.5", json!({"ready": true}))]),
            ),
            slice(
                "other",
                "IPv4",
                json!([{"name": "grpc", "port": 1}]),
                json!([endpoint("10.9.9.9", json!({}))]),
            ),
        ];
        let routes = desired_services(&services, &slices);
        let got: Vec<(String, SocketAddr, Vec<SocketAddr>)> = routes
            .into_iter()
            .map(|r| (r.name, r.vip, r.endpoints))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "demo/greeter".to_owned(),
                    "10.96.0.10:9090".parse().unwrap(),
                    addrs(&["10.1.0.1:9100", "10.1.0.2:9100"])
                ),
                (
                    "demo/greeter".to_owned(),
                    "10.96.0.10:50051".parse().unwrap(),
                    addrs(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.5:9000"])
                ),
            ]
        );
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let services = [service(
            "api",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        )];
        let slices = [slice(
            "api",
            "IPv4",
            json!([{"name": "", "port": 8080}]),
            json!([
                endpoint(
                    "10.1.0.1",
                    json!({"ready": false, "serving": true, "terminating": true})
                ),
                endpoint(
                    "10.1.0.2",
                    json!({"ready": false, "serving": false, "terminating": true})
                ),
                endpoint("10.1.0.3", json!({"ready": false})),
            ]),
        )];
        let routes = desired_services(&services, &slices);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].endpoints, addrs(&["10.1.0.1:8080"]));

        // None serving either: the Service is there, with nothing behind it.
        let slices = [slice(
            "api",
            "IPv4",
            json!([{"port": 8080}]),
            json!([endpoint("10.1.0.3", json!({"ready": false}))]),
        )];
        let routes = desired_services(&services, &slices);
        assert!(routes[0].endpoints.is_empty());
    }

    #[test]
    fn dual_stack_takes_each_family_from_its_slices() {
        let services = [service(
            "dual",
            json!({"clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30", "fd00::30"],
                   "ports": [{"name": "http", "port": 80}]}),
        )];
        let slices = [
            slice(
                "dual",
                "IPv4",
                json!([{"name": "http", "port": 8080}]),
                json!([endpoint("10.1.0.1", json!({}))]),
            ),
            slice(
                "dual",
                "IPv6",
                json!([{"name": "http", "port": 8080}]),
                json!([endpoint("fd00::1:1", json!({}))]),
            ),
            slice(
                "dual",
                "FQDN",
                json!([{"name": "http", "port": 8080}]),
                json!([{"addresses": ["example.test"]}]),
            ),
        ];
        let routes = desired_services(&services, &slices);
        let got: Vec<(SocketAddr, Vec<SocketAddr>)> =
            routes.into_iter().map(|r| (r.vip, r.endpoints)).collect();
        assert_eq!(
            got,
            [
                ("10.96.0.30:80".parse().unwrap(), addrs(&["10.1.0.1:8080"])),
                (
                    "[fd00::30]:80".parse().unwrap(),
                    addrs(&["[fd00::1:1]:8080"])
                ),
            ]
        );
    }

    #[test]
    fn headless_and_external_name_services() {
        let services = [
            service(
                "db",
                json!({"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}),
            ),
            service(
                "external",
                json!({"type": "ExternalName", "externalName": "example.test", "ports": [{"port": 80}]}),
            ),
            service("selectorless-pending", json!({"ports": [{"port": 80}]})),
        ];
        let slices = [slice(
            "db",
            "IPv4",
            json!([{"name": "pg", "port": 5432}]),
            json!([
                endpoint("10.1.0.7", json!({"ready": true})),
                endpoint("10.1.0.8", json!({"ready": false})),
            ]),
        )];
        let routes = desired_services(&services, &slices);
        let got: Vec<(&str, SocketAddr, Vec<SocketAddr>)> = routes
            .iter()
            .map(|r| (r.name.as_str(), r.vip, r.endpoints.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "demo/db",
                    "10.1.0.7:5432".parse().unwrap(),
                    addrs(&["10.1.0.7:5432"])
                ),
                (
                    "demo/db",
                    "10.1.0.8:5432".parse().unwrap(),
                    addrs(&["10.1.0.8:5432"])
                ),
            ]
        );
    }
}
