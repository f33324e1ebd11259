//! `cargo xtask setup`: installs what building and testing shunt needs on Debian.
//!
//! The kernel programs are compiled with Debian's `rustc-web`, whose `libstd-rust-web-dev-bpf`
//! ships a prebuilt `core` for `bpfel-unknown-none`, and linked by `bpf-linker` built against
//! the same LLVM major as that rustc. The major is read from `/usr/bin/rustc -vV`, so a newer
//! Debian rustc brings its matching LLVM without a change here. Everything already present is
//! detected first, so a second run does nothing and takes milliseconds.
//!
//! Test peers that are not plain tools stay inside the checkout's `target/`: Python's grpcio
//! in a virtual environment (`target/venv`), `promtool` unpacked from Debian's package
//! (`target/tools/bin`). Set-up installs no Python package into the system's Python and
//! enables no service.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::run::{self, Step};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian's Rust compiler with a `core` for the BPF target.
const COMPILER_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"];

/// What `bpf-linker` links against, besides `llvm-N-dev` itself.
const LINKER_BUILD_PACKAGES: &[&str] = &["zlib1g-dev", "libzstd-dev"];

/// The sandbox and the real peers the tests and the demo talk to.
const SANDBOX_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "openssl",
    "iperf3",
    "iptables",
    "curl",
    "nghttp2-client",
    "nghttp2-server",
    "dnsmasq-base",
    // Debian's Python, and `venv` (with pip) for the virtual environment holding grpcio.
    "python3",
    "python3-venv",
    // libFuzzer (C++) is compiled by `libfuzzer-sys` for the fuzz step of the test suite.
    "g++",
    // Clippy of the compiler the kernel programs build with, which lints them.
    "rust-web-clippy",
    // The machines of `cargo xtask kernels` (part of the test suite), and `xz` for the
    // kernels' compressed modules.
    "qemu-system-x86",
    "xz-utils",
];

/// What `cargo xtask image` builds shunt's container images with, and the container tests
/// run them with: podman and buildah, `runc` (podman's default `crun` refuses this kind of
/// machine's hybrid cgroup layout), `mmdebstrap` for the local Debian base image, and what
/// podman only recommends but `podman run` needs here: a network stack and an init.
const CONTAINER_PACKAGES: &[&str] = &[
    "podman",
    "buildah",
    "runc",
    "mmdebstrap",
    "netavark",
    "aardvark-dns",
    "catatonit",
];

/// The units Debian's podman package enables: an API socket, a daily `podman auto-update`
/// (which pulls images), restarts at boot. Setting up asked for none of them.
const CONTAINER_SERVICES: &[&str] = &[
    "podman.socket",
    "podman.service",
    "podman-restart.service",
    "podman-auto-update.timer",
    "podman-auto-update.service",
];

/// Python's grpcio, the independent gRPC implementation the tests talk to.
const GRPCIO_VERSION: &str = "1.85.3";

/// The virtual environment holding grpcio, under the workspace root. The tests run its
/// interpreter (`tests/src/grpc.rs`).
const VENV: &str = "target/venv";

/// Where `promtool` is unpacked, under the workspace root (`tests/src/telemetry.rs` looks
/// here first).
const PROMTOOL: &str = "target/tools/bin/promtool";

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The test runner: per-test time limits (`.config/nextest.toml`).
const CARGO_NEXTEST_VERSION: &str = "0.9.143";

pub fn run() -> anyhow::Result<()> {
    setup(true)
}

/// Only what building `shunt` needs (the container image's build stage).
pub fn toolchain() -> anyhow::Result<()> {
    setup(false)
}

fn setup(test_peers: bool) -> anyhow::Result<()> {
    let mut apt = Apt::default();
    apt.ensure(COMPILER_PACKAGES)?;

    let llvm = llvm_major().context("reading the LLVM version of /usr/bin/rustc")?;
    let llvm_dev = [format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")];
    let mut packages: Vec<&str> = llvm_dev.iter().map(String::as_str).collect();
    packages.extend(LINKER_BUILD_PACKAGES);
    if test_peers {
        packages.extend(SANDBOX_PACKAGES);
    }
    apt.ensure(&packages)?;

    ensure_bpf_linker(llvm)?;
    if test_peers {
        containers(&mut apt)?;
        ensure_grpcio()?;
        ensure_promtool(&mut apt)?;
    }
    Ok(())
}

/// Installs what building and running container images needs (`cargo xtask image`), leaving
/// podman's units disabled.
pub fn containers(apt: &mut Apt) -> anyhow::Result<()> {
    apt.ensure_without_services(CONTAINER_PACKAGES, CONTAINER_SERVICES)
}

/// The proxies `cargo xtask bench --peers` compares shunt with, and their services.
const PEER_PACKAGES: &[&str] = &["haproxy", "nginx"];
const PEER_SERVICES: &[&str] = &["haproxy", "nginx"];

/// Installs HAProxy and nginx (the benchmark runs its own instances inside sandbox pods).
pub fn peers() -> anyhow::Result<()> {
    Apt::default().ensure_without_services(PEER_PACKAGES, PEER_SERVICES)
}

/// grpcio in a virtual environment of Debian's Python under `target/`, so the system's Python
/// is left as it is (Debian's refuses pip installs outside one, and Debian's own
/// `python3-grpcio` is years older than the version the tests are written against). Already
/// there at the right version costs one start of its interpreter, about 50 ms.
fn ensure_grpcio() -> anyhow::Result<()> {
    let venv = crate::workspace_root().join(VENV);
    let python = venv.join("bin/python3");
    let installed = run::output(
        &python.to_string_lossy(),
        &[
            "-c",
            "import importlib.metadata as m; print(m.version('grpcio'))",
        ],
    );
    if installed.as_deref().map(str::trim) == Some(GRPCIO_VERSION) {
        return Ok(());
    }
    let step = Step::start(format!(
        "installing Python grpcio {GRPCIO_VERSION} (test peer) into {VENV}"
    ));
    // `--clear` starts afresh from an environment left broken (e.g. by a Python upgrade).
    run::status(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .context("making the virtual environment failed; is python3-venv installed?")?;
    run::status(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg(format!("grpcio=={GRPCIO_VERSION}")),
    )
    .context("installing grpcio with pip failed")?;
    step.done();
    Ok(())
}

/// `promtool`, which checks shunt's `/metrics` in the tests, ships only in Debian's
/// `prometheus` package, with the Prometheus server. Installing that package creates a system
/// user and enables `prometheus.service` (on a machine without systemd running, its SysV
/// script), so the next boot starts a server nobody asked for. Instead the package is
/// downloaded (`apt-get download`, no dpkg state changes) and only `promtool`, a binary that
/// needs nothing but libc, is unpacked from it into `target/tools/bin`: nothing outside the
/// checkout changes, with or without systemd. A `promtool` already in `PATH` is used as it is.
fn ensure_promtool(apt: &mut Apt) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let promtool = root.join(PROMTOOL);
    if promtool.exists() || tool_paths("promtool").iter().any(|p| p.exists()) {
        return Ok(());
    }
    run::require_root("downloading Debian's prometheus package for promtool")?;
    let step = Step::start(format!(
        "unpacking promtool from Debian's prometheus package into {PROMTOOL}"
    ));
    // The package lists may be missing or stale (a fresh container): the download needs them.
    apt.update()?;
    let download = root.join("target/tools/download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    run::status(
        Command::new("apt-get")
            // Root downloads into a directory the `_apt` user cannot write; say so, quietly.
            .args([
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                "download",
                "prometheus",
            ])
            .current_dir(&download),
    )
    .context("downloading Debian's prometheus package failed")?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("apt-get download left no .deb")?;
    run::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&download))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    let bin = promtool.parent().context("promtool's directory")?;
    std::fs::create_dir_all(bin).with_context(|| format!("creating {}", bin.display()))?;
    std::fs::copy(download.join("usr/bin/promtool"), &promtool)
        .context("the prometheus package has no usr/bin/promtool")?;
    let _ = std::fs::remove_dir_all(&download);
    step.done();
    Ok(())
}

/// Installs missing Debian packages; refreshes the package lists at most once per run.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    pub fn ensure(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| !is_installed(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        run::require_root(&format!("installing Debian packages {}", missing.join(" ")))?;
        let step = Step::start("installing Debian packages");
        println!("    {}", missing.join(" "));
        self.update()?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        apt_get(&args)?;
        step.done();
        Ok(())
    }

    /// `apt-get update`, once per run.
    fn update(&mut self) -> anyhow::Result<()> {
        if !self.updated {
            apt_get(&["update", "-q"])?;
            self.updated = true;
        }
        Ok(())
    }

    /// As [`Apt::ensure`], without letting the packages start `services` or enable them for
    /// the next boot (an nginx listening on the node's ports is not what setting up asked
    /// for). `policy-rc.d` keeps them from starting while they are installed, with or without
    /// systemd running; afterwards a service that was not enabled before is disabled again.
    fn ensure_without_services(
        &mut self,
        packages: &[&str],
        services: &[&str],
    ) -> anyhow::Result<()> {
        if packages.iter().all(|p| is_installed(p)) {
            return Ok(());
        }
        let enabled_before: Vec<bool> = services.iter().map(|s| service_enabled(s)).collect();
        let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
        let guard = !policy.exists();
        if guard {
            std::fs::write(
                policy,
                "#!/bin/sh\n# services stay stopped while shunt's setup installs packages\nexit 101\n",
            )
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
            })
            .context("writing /usr/sbin/policy-rc.d")?;
        }
        let installed = self.ensure(packages);
        if guard {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
        for (service, before) in services.iter().zip(enabled_before) {
            if !before && service_enabled(service) {
                disable_service(service)?;
            }
        }
        Ok(())
    }
}

/// Whether `service` starts at boot. `systemctl is-enabled` reads the unit's links, so it
/// answers on a machine without systemd running too; without `systemctl` there is no systemd
/// to start anything.
fn service_enabled(service: &str) -> bool {
    Command::new("systemctl")
        .args(["is-enabled", "--quiet", service])
        .status()
        .is_ok_and(|status| status.success())
}

/// Disables `service` (and stops it, where systemd runs). Without systemd running,
/// `systemctl disable` edits the links offline, and also disables the package's SysV script.
fn disable_service(service: &str) -> anyhow::Result<()> {
    let systemd_running = std::path::Path::new("/run/systemd/system").exists();
    let mut cmd = Command::new("systemctl");
    cmd.args(["disable", "--quiet"]);
    if systemd_running {
        cmd.arg("--now");
    }
    let unit = match service.contains('.') {
        true => service.to_owned(),
        false => format!("{service}.service"),
    };
    run::status(cmd.arg(service))
        .with_context(|| format!("disabling {unit}, which its package enabled"))
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    run::status(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get failed; check the network and `/etc/apt/sources.list`, then rerun `cargo xtask setup`")
}

fn is_installed(package: &str) -> bool {
    run::output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// The LLVM major version Debian's rustc was built with, e.g. 22.
fn llvm_major() -> anyhow::Result<u32> {
    let version = run::output("/usr/bin/rustc", &["-vV"]).context("/usr/bin/rustc -vV failed")?;
    parse_llvm_major(&version).context("no `LLVM version:` line in `/usr/bin/rustc -vV`")
}

fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let line = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?;
    line.trim().split('.').next()?.parse().ok()
}

fn ensure_bpf_linker(llvm: u32) -> anyhow::Result<()> {
    let feature = format!("llvm-{llvm}");
    ensure_cargo_tool(
        "bpf-linker",
        BPF_LINKER_VERSION,
        "a few minutes, once",
        |cmd| {
            cmd.args(["--no-default-features", "--features", &feature])
                .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}"));
        },
    )
    .with_context(|| format!("is llvm-{llvm}-dev installed?"))
}

/// libFuzzer driver for the fuzz targets in `fuzz/` (`cargo xtask fuzz`, and part of `test`).
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    ensure_cargo_tool(
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        "about a minute, once",
        |_| {},
    )
}

pub fn ensure_cargo_nextest() -> anyhow::Result<()> {
    ensure_cargo_tool(
        "cargo-nextest",
        CARGO_NEXTEST_VERSION,
        "several minutes, once",
        |_| {},
    )
}

/// `cargo install`s `tool` at exactly `version` unless that version is already installed.
fn ensure_cargo_tool(
    tool: &str,
    version: &str,
    how_long: &str,
    configure: impl FnOnce(&mut Command),
) -> anyhow::Result<()> {
    let installed = tool_paths(tool)
        .iter()
        .filter_map(|p| run::output(&p.to_string_lossy(), &["--version"]))
        .any(|v| v.split_whitespace().nth(1) == Some(version));
    if installed {
        return Ok(());
    }
    let step = Step::start(format!("building {tool} {version} ({how_long})"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["install", tool, "--version", version, "--locked"]);
    configure(&mut cmd);
    run::status(&mut cmd).with_context(|| format!("installing {tool} failed"))?;
    step.done();
    if tool_paths(tool).iter().all(|p| !p.exists()) {
        bail!("{tool} was installed but is not in PATH or $CARGO_HOME/bin");
    }
    Ok(())
}

/// Where `cargo install` puts `tool`, then whatever `PATH` has.
fn tool_paths(tool: &str) -> Vec<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut paths: Vec<PathBuf> = cargo_home
        .map(|h| h.join("bin").join(tool))
        .into_iter()
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path).map(|d| d.join(tool)));
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::parse_llvm_major;

    #[test]
    fn reads_llvm_major_from_rustc() {
        let vv =
            "rustc 1.96.0\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.96.0\n"), None);
    }
}
