//! Python grpcio peers (`tests/peers/greeter.py`): an implementation of gRPC independent of
//! shunt's, on both ends.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::Context;
use serde::Deserialize;

use crate::{
    probe,
    sandbox::{Pod, Sandbox},
};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/greeter.py")
}

/// Starts a greeter in `pod` on `port` that answers with `name`; waits until it listens.
pub fn serve(sandbox: &Sandbox, pod: &Pod, name: &str, port: u16) -> anyhow::Result<u32> {
    let mut cmd = Command::new("python3");
    cmd.arg(script())
        .args(["serve", name, &format!("{}:{port}", pod.ipv4)]);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    probe::wait_listening(sandbox, pod, port, pid)?;
    Ok(pid)
}

/// The outcome of `count` unary calls over one channel.
#[derive(Debug, Deserialize)]
pub struct Calls {
    pub ok: usize,
    pub by_backend: HashMap<String, usize>,
    pub errors: HashMap<String, usize>,
    pub first_error: Option<String>,
}

/// Makes `count` SayHello calls from `pod` to `to` over ONE channel (one TCP connection).
pub fn call(sandbox: &Sandbox, pod: &Pod, to: SocketAddr, count: usize) -> anyhow::Result<Calls> {
    let mut cmd = Command::new("python3");
    cmd.arg(script())
        .args(["call", &to.to_string(), &count.to_string()]);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "greeter client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("greeter client printed {stdout:?}"))
}
