//! A plain HTTP/2 web server peer: `nghttpd` (Debian's nghttp2-server) without TLS.

use std::process::{Command, Stdio};

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
