//! Test and demo support for shunt.
//!
//! [`sandbox`] builds "pods" out of network namespaces on one machine, as root, and removes
//! everything it made when dropped; [`daemon`] runs `shunt run` inside a sandbox; [`probe`]
//! drives the `shunt-probe` test peer; [`demo`] is what `cargo xtask demo` shows; [`soak`] is
//! what `cargo xtask soak` runs;
//! [`kube_api`] stands in for the Kubernetes API server.

pub mod bench;
pub mod container;
pub mod daemon;
pub mod demo;
pub mod fixture;
pub mod grpc;
pub mod interrupts;
pub mod iptables;
pub mod kernel;
pub mod kube_api;
pub mod probe;
pub mod sandbox;
pub mod soak;
#[allow(unsafe_code)]
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod web;

use std::path::PathBuf;

/// The `shunt` binary under test: `$SHUNT_BIN`, else the workspace's release build.
pub fn shunt_bin() -> PathBuf {
    bin_from_env("SHUNT_BIN", "shunt")
}

/// The `shunt-probe` test peer: `$SHUNT_PROBE_BIN`, else the workspace's release build.
pub fn probe_bin() -> PathBuf {
    bin_from_env("SHUNT_PROBE_BIN", "shunt-probe")
}

/// The tonic greeter (`shunt-greeter`): `$SHUNT_GREETER_BIN`, else the release build.
pub fn greeter_bin() -> PathBuf {
    bin_from_env("SHUNT_GREETER_BIN", "shunt-greeter")
}

fn bin_from_env(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release")
            .join(name)
    })
}

/// Fails with a clear message unless running as root: the sandbox needs namespaces, cgroups
/// and BPF.
pub fn require_root() -> anyhow::Result<()> {
    if sys::geteuid() != 0 {
        anyhow::bail!("the sandbox needs root (network namespaces, cgroups, BPF): run as root");
    }
    Ok(())
}

/// IPv4-mapped IPv6 addresses as plain IPv4, so addresses compare the way people read them.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}
