//! Driving the `shunt-probe` peer inside sandbox pods.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::{
    fixture,
    sandbox::{Pod, Sandbox},
};

/// What one probe connection saw.
#[derive(Debug, Clone, Deserialize)]
pub struct Seen {
    pub to: String,
    /// `getpeername()` in the application.
    #[serde(default)]
    pub peername: Option<String>,
    #[serde(default)]
    pub local: Option<String>,
    /// The client address the server's `accept()` returned.
    #[serde(default)]
    pub server_saw: Option<String>,
    /// The name of the server that answered.
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub echo: Option<String>,
    /// With `--expect-banner`: the greeting and how long after connecting it arrived.
    #[serde(default)]
    pub banner: Option<Banner>,
    /// With `--payload-bytes`: whether the echo matched, byte for byte.
    #[serde(default)]
    pub payload_echoed: Option<bool>,
    /// With `--await-end`: `eof` or `reset`.
    #[serde(default)]
    pub end: Option<String>,
    #[serde(default)]
    pub ms: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Banner {
    pub text: String,
    pub ms: u64,
}

impl Seen {
    /// The application's own address: a loopback one means the connection was redirected to
    /// shunt's in-pod listener, the pod's address means it went direct.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        let addr: SocketAddr = self.local.as_deref()?.parse().ok()?;
        Some(crate::canonical_ip(addr.ip()))
    }

    pub fn was_redirected(&self) -> bool {
        self.local_ip().is_some_and(|ip| ip.is_loopback())
    }

    /// Fails with the connection's error, if it had one.
    pub fn ok(&self) -> anyhow::Result<&Seen> {
        match &self.error {
            Some(e) => bail!("connection to {} failed: {e}", self.to),
            None => Ok(self),
        }
    }

    /// The IP address (without port) the server saw the connection come from.
    pub fn server_saw_ip(&self) -> Option<std::net::IpAddr> {
        let addr: SocketAddr = self.server_saw.as_deref()?.parse().ok()?;
        Some(crate::canonical_ip(addr.ip()))
    }
}

/// Starts a probe server in `pod`, named after the pod, and waits until it accepts
/// connections.
pub fn serve(sandbox: &Sandbox, pod: &Pod, listen: SocketAddr) -> anyhow::Result<u32> {
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args([
        "serve",
        "--name",
        &pod.name,
        "--listen",
        &listen.to_string(),
    ]);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    wait_listening(sandbox, pod, listen.port(), pid)?;
    Ok(pid)
}

/// A sandbox with a pod `client` and a pod `backend` running a probe server on `port`: the
/// client, and the server's address.
pub fn client_and_server(port: u16) -> anyhow::Result<(Sandbox, Pod, SocketAddr)> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    let listen = SocketAddr::new(backend.ipv4.into(), port);
    serve(&sandbox, &backend, listen)?;
    Ok((sandbox, client, listen))
}

/// One connection from `pod` to `to` with the probe's `extra` arguments, which must
/// succeed; what it saw.
pub fn connect_once(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<Seen> {
    let seen = connect_with(sandbox, pod, to, 1, extra)?.remove(0);
    seen.ok()?;
    Ok(seen)
}

/// Makes `count` connections from `pod` to `to` (one after the other) and returns what each
/// saw; failed connections have `error` set.
pub fn connect(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    count: u32,
) -> anyhow::Result<Vec<Seen>> {
    connect_with(sandbox, pod, to, count, &[])
}

pub fn connect_with(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    count: u32,
    extra: &[&str],
) -> anyhow::Result<Vec<Seen>> {
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args([
        "connect",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ])
    .args(extra);
    let timeout = Duration::from_secs(30) + Duration::from_millis(100) * count;
    let out = sandbox.run_in_pod(pod, cmd, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: Vec<Seen> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("probe printed {line:?}")))
        .collect::<anyhow::Result<_>>()?;
    if seen.len() != count as usize {
        bail!(
            "probe made {} of {count} connections; stderr: {}",
            seen.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(seen)
}

/// Polls `ss` in the pod until something listens on `port` (at most 5 s), failing early if
/// the server process `pid` exits.
pub fn wait_listening(sandbox: &Sandbox, pod: &Pod, port: u16, pid: u32) -> anyhow::Result<()> {
    let what = format!("the server in pod {} listens on port {port}", pod.name);
    fixture::until(&what, Duration::from_secs(5), || {
        let mut ss = Command::new("ss");
        ss.args(["-Htln", &format!("sport = :{port}")]);
        let out = sandbox.run_in_pod(pod, ss, Duration::from_secs(5))?;
        if out.stdout.is_empty() && !sandbox.is_running(pid) {
            return Err(fixture::give_up(format!(
                "the server in pod {} exited before listening on port {port}",
                pod.name
            )));
        }
        Ok(!out.stdout.is_empty())
    })
}

/// A probe connection running in the background, held open for a while.
pub struct Held {
    pid: u32,
    out: std::path::PathBuf,
}

/// Connects from `pod` to `to` in the background and keeps the connection open for `hold`,
/// so it can be observed while live.
pub fn connect_held(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    hold: Duration,
) -> anyhow::Result<Held> {
    let out = sandbox
        .scratch_dir("held")?
        .join(format!("{}-{}.json", pod.name, to.port()));
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args([
        "connect",
        "--to",
        &to.to_string(),
        "--hold-ms",
        &hold.as_millis().to_string(),
    ])
    .stdout(std::fs::File::create(&out)?);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    Ok(Held { pid, out })
}

impl Held {
    /// Waits for the connection to finish (bounded) and returns what it saw.
    pub fn finish(self, sandbox: &Sandbox) -> anyhow::Result<Seen> {
        fixture::exited(
            sandbox,
            self.pid,
            "the held probe connection finishes",
            Duration::from_secs(30),
        )?;
        let text = std::fs::read_to_string(&self.out)?;
        serde_json::from_str(text.trim()).with_context(|| format!("probe printed {text:?}"))
    }
}

/// `shunt-probe ARGS…` running in a pod in the background, its JSON lines going to a file.
pub struct Background {
    pid: u32,
    out: PathBuf,
}

impl Background {
    /// Starts `shunt-probe ARGS…` in `pod`; `name`, unique in the sandbox, names its output.
    pub fn start(
        sandbox: &Sandbox,
        pod: &Pod,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<Background> {
        let out = sandbox.scratch_dir("probe")?.join(format!("{name}.json"));
        let mut cmd = Command::new(crate::probe_bin());
        cmd.args(args).stdout(std::fs::File::create(&out)?);
        let pid = sandbox.spawn_in_pod(pod, cmd)?;
        Ok(Background { pid, out })
    }

    /// Whether the probe still runs.
    pub fn is_running(&self, sandbox: &Sandbox) -> bool {
        sandbox.is_running(self.pid)
    }

    /// Waits (at most `within`) until the probe has printed `n` lines and returns the `n`th;
    /// fails at once if it exits short of them.
    pub fn line(
        &self,
        sandbox: &Sandbox,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        fixture::eventually(&format!("the probe prints {n} lines"), within, || {
            // Whether it ran before reading: then an exit cannot hide a last line.
            let running = sandbox.is_running(self.pid);
            let text = std::fs::read_to_string(&self.out).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            match lines.get(n.saturating_sub(1)) {
                Some(line) if n > 0 => serde_json::from_str(line)
                    .map(Some)
                    .with_context(|| format!("probe printed {line:?}")),
                _ if running => Ok(None),
                _ => Err(fixture::give_up(format!(
                    "the probe exited having printed {} of {n} lines: {text:?}",
                    lines.len()
                ))),
            }
        })
    }

    /// Waits (at most `within`) for the probe to exit (killed past that) and returns the
    /// JSON line it printed.
    pub fn finish(self, sandbox: &Sandbox, within: Duration) -> anyhow::Result<serde_json::Value> {
        fixture::exited(sandbox, self.pid, "the probe finishes", within)?;
        let text = std::fs::read_to_string(&self.out)?;
        serde_json::from_str(text.trim()).with_context(|| format!("probe printed {text:?}"))
    }
}
