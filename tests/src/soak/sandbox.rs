//! The soak's sandbox: an enrolled client pod; three tonic greeters behind one virtual
//! address, a TLS server (`openssl s_server`) and an echo server (`shunt-probe`) behind
//! others; and the changes made to them while traffic runs.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use crate::{
    daemon::{Daemon, Options},
    fixture, grpc, probe,
    sandbox::{Pod, Sandbox},
    tls,
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const GRPC_PORT: u16 = 50051;
pub const TLS_PORT: u16 = 443;
pub const OPAQUE_PORT: u16 = 7000;
pub const TLS_NAME: &str = "soak.test";
pub const GREETERS: usize = 3;
/// The greeter taken out of the Service and put back by the endpoint churn.
pub const CHURNED: &str = "greeter-2";
const FAULT_RULE: &str = "soak-abort";

pub struct SoakSandbox {
    pub sandbox: Sandbox,
    pub client: Pod,
    greeters: Vec<SocketAddr>,
    tls_endpoint: SocketAddr,
    echo_endpoint: SocketAddr,
    /// The TLS server's certificate, which the clients verify.
    pub ca: PathBuf,
    rule_file: PathBuf,
}

impl SoakSandbox {
    pub fn new() -> anyhow::Result<SoakSandbox> {
        let sandbox = Sandbox::new()?;
        let client = sandbox.add_pod("client")?;
        let mut greeters = Vec::new();
        for i in 0..GREETERS {
            let pod = sandbox.add_pod(&format!("greeter{i}"))?;
            grpc::tonic_serve(&sandbox, &pod, &format!("greeter-{i}"), GRPC_PORT)?;
            greeters.push(SocketAddr::new(pod.ipv4.into(), GRPC_PORT));
        }
        let tls_pod = sandbox.add_pod("tls")?;
        let dir = sandbox.scratch_dir("soak")?;
        let (cert, key) = tls::self_signed(&dir, TLS_NAME)?;
        tls::serve(&sandbox, &tls_pod, 8443, &cert, &key)?;
        let echo_pod = sandbox.add_pod("echo")?;
        let echo_endpoint = SocketAddr::new(echo_pod.ipv4.into(), 7000);
        probe::serve(&sandbox, &echo_pod, echo_endpoint)?;
        let rule_file = dir.join("fault.yaml");
        std::fs::write(
            &rule_file,
            format!(
                "name: {FAULT_RULE}\nmatch: {{service: greeter, path: /helloworld.Greeter/SayHello}}\n\
                 abort: {{grpc_status: RESOURCE_EXHAUSTED, percentage: 50}}\n"
            ),
        )?;
        Ok(SoakSandbox {
            sandbox,
            client,
            greeters,
            tls_endpoint: SocketAddr::new(tls_pod.ipv4.into(), 8443),
            echo_endpoint,
            ca: cert,
            rule_file,
        })
    }

    pub fn grpc_vip() -> SocketAddr {
        SocketAddr::new(VIP.into(), GRPC_PORT)
    }

    pub fn tls_vip() -> SocketAddr {
        SocketAddr::new(VIP.into(), TLS_PORT)
    }

    pub fn opaque_vip() -> SocketAddr {
        SocketAddr::new(VIP.into(), OPAQUE_PORT)
    }

    /// The daemon's options; with `removed`, the churned greeter is left out of the Service.
    fn options(&self, removed: bool) -> Options {
        let greeters: Vec<SocketAddr> = self
            .greeters
            .iter()
            .enumerate()
            .filter(|(i, _)| !(removed && format!("greeter-{i}") == CHURNED))
            .map(|(_, addr)| *addr)
            .collect();
        Options {
            // As a production node would log; debug would make the log the biggest cost.
            log: Some("info"),
            ..Options::default()
        }
        .with_config(|c| {
            c.services = vec![
                fixture::service_config("greeter", Self::grpc_vip(), &greeters),
                fixture::service_config("tls", Self::tls_vip(), &[self.tls_endpoint]),
                fixture::service_config("echo", Self::opaque_vip(), &[self.echo_endpoint]),
            ];
        })
    }

    pub fn start_daemon(&self) -> anyhow::Result<Daemon<'_>> {
        Daemon::start(&self.sandbox, &[&self.client], &self.options(false))
    }

    /// Takes the churned greeter out of the Service, or puts it back: the config file is
    /// rewritten and reloaded, as an operator (or discovery) would.
    pub fn set_endpoint_removed(&self, daemon: &Daemon<'_>, removed: bool) -> anyhow::Result<()> {
        daemon.rewrite_config(&[&self.client], &self.options(removed))?;
        daemon.ctl(&["reload"])?;
        Ok(())
    }

    /// Switches the abort rule on SayHello on or off at runtime.
    pub fn set_fault(&self, daemon: &Daemon<'_>, on: bool) -> anyhow::Result<()> {
        match on {
            true => daemon.ctl(&["faults", "set", "-f", &self.rule_file.to_string_lossy()])?,
            false => daemon.ctl(&["faults", "clear", FAULT_RULE])?,
        };
        Ok(())
    }
}
