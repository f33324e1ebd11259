//! What the integration tests share: the Service virtual address they dial, the daemon's
//! configuration built from its own types, and one way to wait for a condition.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context;
use shunt::config::{
    Config, ConfiguredLimits, Limits, ServiceConfig,
    fault::{FaultMatch, FaultRule},
};

use crate::{daemon::Options, sandbox::Sandbox};

/// The virtual address of the tests' Services: nothing listens there, so a connection to it
/// succeeds only through shunt.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// [`VIP`] on `port`.
pub fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.into(), port)
}

/// A Service, `name` at `vip` in front of `endpoints`.
pub fn service_config(name: &str, vip: SocketAddr, endpoints: &[SocketAddr]) -> ServiceConfig {
    ServiceConfig {
        name: name.to_owned(),
        vip,
        endpoints: endpoints.to_vec(),
        ..ServiceConfig::default()
    }
}

/// Daemon options with one Service, `name` at `vip` in front of `endpoints`, and the
/// defaults for everything else: most tests need exactly this, and add to it.
pub fn service(name: &str, vip: SocketAddr, endpoints: &[SocketAddr]) -> Options {
    Options::default().with_config(|c| c.services = vec![service_config(name, vip, endpoints)])
}

/// A fault rule `name` for the streams and connections of Service `service`, with no
/// fault yet: tests add the one they need.
pub fn fault_rule(name: &str, service: &str) -> FaultRule {
    FaultRule {
        name: name.to_owned(),
        matches: FaultMatch {
            service: Some(service.to_owned()),
            ..FaultMatch::default()
        },
        delay: None,
        abort: None,
        tcp: None,
        header_control: false,
    }
}

/// Connection limits as a file sets them: `None` leaves one to be sized to the daemon's
/// descriptors.
pub fn limits(max_connections: Option<usize>, max_connections_per_pod: Option<usize>) -> Limits {
    let defaults = Limits::default();
    Limits {
        max_connections: max_connections.unwrap_or(defaults.max_connections),
        max_connections_per_pod: max_connections_per_pod
            .unwrap_or(defaults.max_connections_per_pod),
        configured: ConfiguredLimits {
            max_connections,
            max_connections_per_pod,
        },
        ..defaults
    }
}

/// `config` as a configuration file. Fails unless the file reads back as `config`, so a
/// field the daemon would read differently from what the test built fails here, naming it.
pub fn config_yaml(config: &Config) -> anyhow::Result<String> {
    let mut value = serde_yaml_ng::to_value(config).context("serialising the configuration")?;
    // `Config` serialises the limits in force, which a file would make configured ones:
    // only those the test configured are written, so the rest are sized as in production.
    if let Some(file) = value.as_mapping_mut() {
        let limits = &config.limits;
        let mut written = serde_yaml_ng::Mapping::new();
        let configured = [
            ("max_connections", limits.configured.max_connections),
            (
                "max_connections_per_pod",
                limits.configured.max_connections_per_pod,
            ),
        ];
        for (name, limit) in configured {
            if let Some(limit) = limit {
                written.insert(name.into(), limit.into());
            }
        }
        written.insert("copy_buffer".into(), limits.copy_buffer.into());
        file.insert("limits".into(), written.into());
    }
    let yaml = serde_yaml_ng::to_string(&value).context("writing the configuration")?;
    let read: Config = serde_yaml_ng::from_str(&yaml)
        .with_context(|| format!("the configuration does not read back:\n{yaml}"))?;
    anyhow::ensure!(
        read == *config,
        "the configuration reads back as\n{read:#?}\nnot as built:\n{config:#?}\nfrom:\n{yaml}"
    );
    Ok(yaml)
}

/// Polls `check` every 50 ms until it gives `Ok(Some(value))`; a `None` or an error means
/// "not yet", except an error from [`give_up`], which ends the wait at once. After `within`,
/// fails naming `what` and the last check's outcome.
pub fn eventually<T: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let last = check();
        match last {
            Ok(Some(value)) => return Ok(value),
            Err(e) if e.is::<GaveUp>() => return Err(e),
            _ if Instant::now() >= deadline => {
                anyhow::bail!("not so after {within:?}: {what} (last check: {last:?})");
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The error for a check of [`eventually`] to return when waiting longer cannot help (the
/// process it waits for has exited, say): the wait fails at once, with `why`.
pub fn give_up(why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(GaveUp(why.to_string()))
}

/// What [`give_up`] makes: [`eventually`] tells it from a "not yet" by its type.
#[derive(Debug)]
struct GaveUp(String);

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GaveUp {}

/// [`eventually`] for a condition that holds or not.
pub fn until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    eventually(what, within, || Ok(check()?.then_some(())))
}

/// Waits (at most `within`) for the sandbox process `pid` to exit; past that, kills it and
/// fails naming `what`. For background clients whose output is read once they are done.
pub fn exited(sandbox: &Sandbox, pid: u32, what: &str, within: Duration) -> anyhow::Result<()> {
    until(what, within, || Ok(!sandbox.is_running(pid))).inspect_err(|_| sandbox.kill(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_condition_holds_and_names_it_when_it_never_does() {
        let mut calls = 0;
        let value = eventually("third call", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
        let err = until("never", Duration::from_millis(120), || Ok(false)).unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
        let err = until("failing", Duration::from_millis(120), || {
            anyhow::bail!("boom")
        })
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn giving_up_ends_the_wait_at_once() {
        let mut calls = 0;
        let started = Instant::now();
        let err = until("hopeless", Duration::from_secs(30), || {
            calls += 1;
            Err(give_up("the server exited"))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.to_string(), "the server exited");
    }

    #[test]
    fn a_configuration_reads_back_as_built() {
        let mut options = service(
            "greeter",
            vip(50051),
            &[
                "10.200.0.11:50051".parse().unwrap(),
                "[fd00::11]:50051".parse().unwrap(),
            ],
        );
        let yaml = config_yaml(&options.config).unwrap();
        assert!(!yaml.contains("max_connections"), "{yaml}");
        let read = Config::parse(&yaml).unwrap();
        assert_eq!(read.services, options.config.services);
        assert_eq!(read.limits.configured, ConfiguredLimits::default());

        options.config.limits = limits(None, Some(100));
        options.config.intercept.detect_timeout = Duration::from_millis(1500);
        options.config.intercept.exclude_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        let yaml = config_yaml(&options.config).unwrap();
        let read = Config::parse(&yaml).unwrap();
        assert_eq!(read, options.config, "{yaml}");
        assert_eq!(read.limits.configured.max_connections, None, "{yaml}");
    }
}
