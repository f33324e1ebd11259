//! What the kernel under test offers, as `shunt kernel` reports it, so that a test of an
//! optional feature can tell "this kernel lacks it" from "it is broken". `cargo xtask
//! kernels` runs the suite on older kernels and shows such a test as `off`.

use std::sync::OnceLock;

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
