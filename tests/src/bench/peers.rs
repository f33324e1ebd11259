//! HAProxy and nginx, from Debian's packages, as the proxies shunt is compared with. Each runs
//! in its client's pod, on loopback (as shunt's listener does), with as many threads/workers
//! as the caller asks: the gRPC workloads give each proxy one, pinned alone on one core.

use std::{net::SocketAddr, process::Command};

use anyhow::Context;

use super::process::{Cpu, on_cpu};
use crate::{
    daemon::{Daemon, Options},
    fixture, probe,
    sandbox::{Pod, Sandbox},
};

/// A running peer proxy.
pub struct Peer {
    pub name: &'static str,
    pub pid: u32,
    pub listen: SocketAddr,
}

/// Whether both peers' programs are installed (`cargo xtask bench --peers` installs them).
pub fn available() -> bool {
    ["haproxy", "nginx"].iter().all(|p| {
        Command::new(p)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

pub const SKIPPED: &str =
    "HAProxy and nginx rows skipped: run `cargo xtask bench --peers` to install and measure them.";

/// Threads for a peer that may use the whole machine (the TCP passthrough comparison).
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// shunt (one worker, enrolling `client`) and, with `with_peers`, HAProxy and nginx (one
/// thread/worker each, in `direct`), all started on the last core alone, in front of
/// `backends` behind the Service `vip`: the gRPC workloads' proxies, so that each one's
/// CPU per call is its own.
pub fn pinned_grpc_proxies<'a>(
    sandbox: &'a Sandbox,
    client: &Pod,
    direct: &Pod,
    vip: SocketAddr,
    backends: &[SocketAddr],
    with_peers: bool,
) -> anyhow::Result<(Daemon<'a>, Vec<Peer>)> {
    let options = Options {
        log: Some("info"),
        ..fixture::service("greeter", vip, backends)
    }
    .with_config(|c| c.intercept.workers = 1);
    on_cpu(Cpu::Last, || {
        let daemon = Daemon::start(sandbox, &[client], &options)?;
        let mut peers = Vec::new();
        if with_peers {
            peers.push(haproxy_grpc(sandbox, direct, 10001, backends, 1)?);
            peers.push(nginx_grpc(sandbox, direct, 10002, backends, 1)?);
        }
        Ok((daemon, peers))
    })
}

/// HAProxy `mode http`, h2c on both sides, `balance roundrobin` (per request).
pub fn haproxy_grpc(
    sandbox: &Sandbox,
    pod: &Pod,
    port: u16,
    backends: &[SocketAddr],
    threads: usize,
) -> anyhow::Result<Peer> {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{i} {b} proto h2\n"))
        .collect();
    let config = format!(
        "global\n  nbthread {threads}\n  maxconn 9000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend grpc\n  bind 127.0.0.1:{port} proto h2\n  default_backend backends\n\
         backend backends\n  balance roundrobin\n{servers}"
    );
    haproxy(sandbox, pod, port, &config)
}

/// HAProxy `mode tcp` to one backend.
pub fn haproxy_tcp(
    sandbox: &Sandbox,
    pod: &Pod,
    port: u16,
    backend: SocketAddr,
) -> anyhow::Result<Peer> {
    let config = format!(
        "global\n  nbthread {}\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend tcp\n  bind 127.0.0.1:{port}\n  default_backend backends\n\
         backend backends\n  server b0 {backend}\n",
        all_cores()
    );
    haproxy(sandbox, pod, port, &config)
}

fn haproxy(sandbox: &Sandbox, pod: &Pod, port: u16, config: &str) -> anyhow::Result<Peer> {
    let dir = sandbox.scratch_dir(&format!("haproxy-{port}"))?;
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new("haproxy");
    // -db: foreground, no daemon; -q: quiet.
    cmd.arg("-db").arg("-q").arg("-f").arg(&path);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    probe::wait_listening(sandbox, pod, port, pid).context("HAProxy did not start")?;
    Ok(Peer {
        name: "HAProxy",
        pid,
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

/// nginx `grpc_pass` over an upstream block with keepalive (round-robin per request). nginx's
/// default of 1000 requests per connection would end client connections mid-run with GOAWAY.
pub fn nginx_grpc(
    sandbox: &Sandbox,
    pod: &Pod,
    port: u16,
    backends: &[SocketAddr],
    workers: usize,
) -> anyhow::Result<Peer> {
    let dir = sandbox.scratch_dir(&format!("nginx-{port}"))?;
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 upstream backends {{\n{servers}    keepalive 64;\n    keepalive_requests 1000000;\n  }}\n\
         \x20 server {{\n    listen 127.0.0.1:{port} http2;\n    keepalive_requests 1000000;\n    location / {{ grpc_pass grpc://backends; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&path).arg("-p").arg(&dir);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    probe::wait_listening(sandbox, pod, port, pid).context("nginx did not start")?;
    Ok(Peer {
        name: "nginx",
        pid,
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}
