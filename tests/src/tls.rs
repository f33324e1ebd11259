//! Real TLS peers from `openssl`: a throwaway certificate, `s_server` and `s_client`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, ensure};

use crate::sandbox::{Pod, Sandbox};

/// A self-signed certificate (P-256) for `name`, valid one day: `(cert, key)` in `dir`.
pub fn self_signed(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl (cargo xtask setup installs it)")?;
    ensure!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((cert, key))
}

/// Starts `openssl s_server -www` on `port` in `pod` and waits until it listens.
pub fn serve(
    sandbox: &Sandbox,
    pod: &Pod,
    port: u16,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<u32> {
    let mut server = Command::new("openssl");
    server
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdout(std::process::Stdio::null());
    let pid = sandbox.spawn_in_pod(pod, server)?;
    crate::probe::wait_listening(sandbox, pod, port, pid)?;
    Ok(pid)
}

/// `openssl s_client` from `pod` to `to` with SNI `name`, verifying the server's certificate
/// against `ca` and `name`. Its summary (`-brief`) is on stderr.
pub fn connect(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    name: &str,
    ca: &Path,
) -> anyhow::Result<Output> {
    let mut client = Command::new("openssl");
    client
        .args([
            "s_client",
            "-brief",
            "-connect",
            &to.to_string(),
            "-servername",
            name,
        ])
        .args([
            "-verify_return_error",
            "-verify_hostname",
            name,
            "-alpn",
            "h2,http/1.1",
        ])
        .arg("-CAfile")
        .arg(ca);
    sandbox.run_in_pod(pod, client, Duration::from_secs(20))
}
