//! What the kernel under test offers, as `shunt kernel` reports it, so that a test of an
//! optional feature can tell "this kernel lacks it" from "it is broken". `cargo xtask
//! kernels` runs the suite on older kernels and shows such a test as `off`.

use std::sync::OnceLock;

use std::process::Command;

use anyhow::Context;
use shunt::admin::api::KernelStatus;

/// `shunt kernel -o json`, asked once per test process.
pub fn status() -> anyhow::Result<&'static KernelStatus> {
    static STATUS: OnceLock<KernelStatus> = OnceLock::new();
    if let Some(status) = STATUS.get() {
        return Ok(status);
    }
    let out = std::process::Command::new(crate::shunt_bin())
        .args(["kernel", "-o", "json"])
        .output()
        .context("running `shunt kernel`")?;
    anyhow::ensure!(
        out.status.success(),
        "`shunt kernel` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = serde_json::from_slice(&out.stdout).context("reading `shunt kernel -o json`")?;
    Ok(STATUS.get_or_init(|| status))
}

/// Whether the kernel has the optional `feature` (a name `shunt status` lists). When it does
/// not, prints the line `cargo xtask kernels` looks for —
/// `shunt-test: feature unavailable: <feature>: needs <kernel>` — and the test should
/// return without asserting anything about the feature.
pub fn has(feature: &str) -> anyhow::Result<bool> {
    let status = status()?;
    let found = status
        .features
        .iter()
        .find(|f| f.name == feature)
        .with_context(|| format!("`shunt kernel` lists no feature {feature:?}"))?;
    if !found.available {
        println!(
            "shunt-test: feature unavailable: {feature}: needs {}",
            found.needs
        );
    }
    Ok(found.available)
}

/// Runs `bpftool ARGS…` (its output, whatever the exit status).
pub fn bpftool(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new("bpftool")
        .args(args)
        .output()
        .context("running bpftool (cargo xtask setup installs it)")
}

/// The cgroup attach points shunt's programs use: connect4, connect6, sock_ops,
/// getpeername4, getpeername6 (`enum bpf_attach_type`).
const ATTACH_TYPES: [(u32, &str); 5] = [
    (10, "connect4"),
    (11, "connect6"),
    (3, "sock_ops"),
    (29, "getpeername4"),
    (30, "getpeername6"),
];

/// Names of the programs attached to `cgroup` at shunt's attach points, one entry per
/// attachment.
pub fn attached_programs(cgroup: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let cgroup = std::fs::File::open(cgroup)?;
    let mut names = Vec::new();
    for (attach_type, hook) in ATTACH_TYPES {
        let ids = crate::sys::cgroup_programs(&cgroup, attach_type)
            .with_context(|| format!("querying the {hook} programs of the sandbox's cgroup"))?;
        for id in ids {
            let out = bpftool(&["-j", "prog", "show", "id", &id.to_string()])?;
            let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("bpftool prog show id {id}"))?;
            names.push(shown["name"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(names)
}
