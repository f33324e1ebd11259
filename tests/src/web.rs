//! A plain HTTP/2 web server peer: `nghttpd` (Debian's nghttp2-server) without TLS.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    probe,
    sandbox::{Pod, Sandbox},
};

/// Serves `files` (name, content) from a fresh directory on `port` in `pod`; waits until it
/// listens.
pub fn serve(
    sandbox: &Sandbox,
    pod: &Pod,
    port: u16,
    files: &[(&str, &str)],
) -> anyhow::Result<u32> {
    let docroot = sandbox.scratch_dir(&format!("docroot-{}-{port}", pod.name))?;
    for (name, content) in files {
        std::fs::write(docroot.join(name), content)?;
    }
    let mut nghttpd = Command::new("nghttpd");
    nghttpd
        .arg("--no-tls")
        .arg("-d")
        .arg(&docroot)
        .arg(port.to_string())
        .stdout(Stdio::null());
    let pid = sandbox.spawn_in_pod(pod, nghttpd)?;
    probe::wait_listening(sandbox, pod, port, pid)?;
    Ok(pid)
}

/// `curl` from `pod` for `http://{to}/index.html` over HTTP/2 (prior knowledge), with the
/// further `args`; what it printed, or an error if it failed.
pub fn curl(sandbox: &Sandbox, pod: &Pod, to: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10"]);
    cmd.arg("--http2-prior-knowledge")
        .args(args)
        .arg(format!("http://{to}/index.html"));
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(20))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "curl to {to}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}
