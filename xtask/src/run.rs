//! Running commands with visible progress.

use std::{process::Command, time::Instant};

use anyhow::{Context, bail};

/// A named stage of a task: prints when it starts and how long it took.
pub struct Step {
    what: String,
    started: Instant,
}

impl Step {
    pub fn start(what: impl Into<String>) -> Step {
        let what = what.into();
        println!("==> {what}");
        Step {
            what,
            started: Instant::now(),
        }
    }

    pub fn done(self) {
        println!(
            "    {} ({:.1}s)",
            self.what,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// The cargo that runs us (rustup's), from the workspace root.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    status(cargo_command().args(args))
}

/// Without the variables `cargo run` gave us (`CARGO_PKG_NAME=xtask`, …): build scripts
/// that watch them (ring's does) would otherwise see them change between `cargo xtask …` and
/// a plain `cargo …`, and the crates would be rebuilt each time one follows the other.
pub fn cargo_command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let ours = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&key.as_ref());
        if ours {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// Runs a command to completion, inheriting stdout/stderr so the user sees its progress.
pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = show(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; `None` if it cannot start or fails.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("run this as root: {why} (e.g. `sudo -E cargo xtask …`)");
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}
