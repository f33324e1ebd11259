//! DNS discovery: a Service given as `dns: host:port` (like a headless Kubernetes Service)
//! has every A/AAAA record of `host` as an endpoint, resolved again every `refresh`. A failed
//! resolution keeps the last good set and is logged; it is never fatal.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
};
use tokio::task::AbortHandle;

use crate::{
    config::{Config, split_host_port},
    route::{Routes, Service},
};

/// The resolution tasks of one configuration; dropping it (a reload replaced the
/// configuration, or the daemon stops) ends them.
#[derive(Default)]
pub struct Watchers(Vec<AbortHandle>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts a watcher for every DNS Service of `config` in `routes`. Must run in the runtime.
pub fn watch(config: &Config, routes: &Routes) -> Watchers {
    let dns_services: Vec<_> = config
        .services
        .iter()
        .filter_map(|s| Some((s, split_host_port(s.dns.as_deref()?)?)))
        .collect();
    if dns_services.is_empty() {
        return Watchers::default();
    }
    let resolver = match resolver(config.discovery.dns_server) {
        Ok(resolver) => Arc::new(resolver),
        Err(e) => {
            tracing::error!("DNS discovery disabled: {e}");
            return Watchers::default();
        }
    };
    let tasks = dns_services
        .into_iter()
        .filter_map(|(config, (host, port))| {
            let service = routes.by_name(&config.name)?;
            let task = tokio::spawn(resolve_every(
                resolver.clone(),
                service,
                host.to_owned(),
                port,
                config.refresh,
            ));
            Some(task.abort_handle())
        })
        .collect();
    Watchers(tasks)
}

fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, hickory_resolver::ResolveError> {
    let mut builder = match server {
        Some(server) => {
            let servers =
                NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioConnectionProvider::default(),
            )
        }
        None => Resolver::builder_tokio()?,
    };
    // We poll on our own schedule; a cache would only delay changes.
    builder.options_mut().cache_size = 0;
    Ok(builder.build())
}

async fn resolve_every(
    resolver: Arc<TokioResolver>,
    service: Arc<Service>,
    host: String,
    port: u16,
    refresh: Duration,
) {
    let mut ticks = tokio::time::interval(refresh);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match resolver.lookup_ip(host.as_str()).await {
            Ok(lookup) => {
                let addrs: Vec<SocketAddr> =
                    lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if service.set_endpoints(&addrs) {
                    tracing::info!(service = %service.name, %host, endpoints = ?addrs, "endpoints changed");
                }
            }
            Err(e) => {
                tracing::warn!(service = %service.name, %host, "DNS lookup failed, keeping the last endpoints: {e}");
            }
        }
    }
}
