//! iptables NAT interception, the mechanism shunt's eBPF programs replace: used to show that a
//! connection sent to shunt's listener by a `REDIRECT` rule is proxied too, and to compare the
//! two mechanisms' connection setup rates.

use std::{process::Command, time::Duration};

use anyhow::ensure;

use crate::sandbox::{Pod, Sandbox};

/// shunt's default `intercept.listen_port` and `intercept.mark`.
const LISTEN_PORT: u16 = 15001;
const SHUNT_MARK: u32 = 0x5348_554e;

/// Adds `iptables -t nat … REDIRECT` in `pod` for `dst:port` to shunt's listener, sparing
/// shunt's own upstream sockets (they carry its mark), as the eBPF programs do.
pub fn redirect_to_shunt(
    sandbox: &Sandbox,
    pod: &Pod,
    dst: std::net::Ipv4Addr,
    port: u16,
) -> anyhow::Result<()> {
    let mut iptables = Command::new("iptables");
    iptables
        .args(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d"])
        .arg(dst.to_string())
        .args(["--dport", &port.to_string()])
        .args(["-m", "mark", "!", "--mark", &SHUNT_MARK.to_string()])
        .args(["-j", "REDIRECT", "--to-ports", &LISTEN_PORT.to_string()]);
    let out = sandbox.run_in_pod(pod, iptables, Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "iptables REDIRECT rule: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
