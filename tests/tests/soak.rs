//! A minute of the soak (`cargo xtask soak` runs ten): unary calls, server streams, TLS,
//! opaque and short connections through shunt while faults are set and cleared, an endpoint
//! leaves its Service and the daemon hands over to a new process; it fails on any failure its
//! schedule does not explain, on RSS growth and on descriptors, upstream connections or map
//! entries left behind. Run as root, alone (`.config/nextest.toml`).

use std::{path::PathBuf, process::Command};

use anyhow::Context;

/// Seconds of traffic: enough for every phase of the schedule, a restart in the middle.
const SECONDS: u32 = 60;

#[test]
fn a_minute_of_mixed_traffic_with_a_restart_has_no_unexplained_failures_or_leaks()
-> anyhow::Result<()> {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    let status = Command::new(env!("CARGO_BIN_EXE_shunt-soak"))
        .env("SHUNT_BIN", shunt_tests::shunt_bin())
        .env("SHUNT_PROBE_BIN", shunt_tests::probe_bin())
        .env("SHUNT_GREETER_BIN", shunt_tests::greeter_bin())
        .arg("--seconds")
        .arg(SECONDS.to_string())
        .arg("--out")
        .arg(&out)
        .status()
        .context("starting shunt-soak")?;
    anyhow::ensure!(
        status.success(),
        "the soak failed ({status}): its report is above and in {}",
        out.join("soak.json").display()
    );
    Ok(())
}
