//! `cargo xtask kernels [VERSION…]`: shunt's release build and a set of its sandbox tests,
//! run under Debian's packaged kernels in qemu, one virtual machine per kernel, and on this
//! machine's own kernel; a table kernel × check. `cargo xtask test` ends with it.
//!
//! The approach:
//!
//! - **Kernels** come from Debian's archive, the one this machine's apt sources name, through
//!   a private apt configuration under `target/kernels/apt` (bullseye, bookworm and
//!   bookworm-backports; the system's apt configuration is never changed, though its
//!   settings such as a proxy apply). A VERSION such as `6.1` picks the newest
//!   `linux-image-6.1…-amd64` in those suites. The `.deb`s are kept in `target/kernels/debs`
//!   and unpacked once into `target/kernels/<package>/root`; without network, the lists and
//!   `.deb`s of an earlier run are used.
//! - **The root filesystem** of each machine is this machine's own, shared read-only over
//!   virtio-9p: the binaries under test, the test peers (`openssl`…), `ip`, `bpftool` and the
//!   shell run from where they are, at the same paths. Only `/tmp` and `/run` are fresh
//!   (tmpfs).
//! - **An initramfs** per kernel, written here as a `newc` cpio archive: Debian's static
//!   busybox, and the kernel's own modules for virtio-pci, 9p and what the sandbox needs
//!   (veth, bridge), with their dependencies read from each module's `depends=`. Its `/init`
//!   loads them, brings up loopback, mounts the shared root, proc, sys, devtmpfs, cgroup2 and
//!   bpffs under it, runs the check script there with `chroot`, and powers the machine off.
//!   Nothing is loaded later: the shared `/lib/modules` is this machine's, not the guest
//!   kernel's. (No check uses iptables, so no netfilter module is loaded.)
//! - **The checks** ([`CHECKS`]) are a shell script under `target/kernels/`: whether
//!   `shunt run` starts and answers on its admin socket, then single tests of
//!   `tests/tests/{redirect,http2,passthrough}.rs` run one by one from their compiled
//!   binaries, each under its time limit. Results come back over the serial console (a
//!   file), as `@@check NAME ok|FAIL SECONDS` lines, each check's output as `@@out NAME …`
//!   lines. The same script runs on this machine for the `host` row, in a process group
//!   of its own that is killed at the time limit; it leaves no cgroup, pin or daemon.
//! - **Optional features** (the local fast path, `forwarding: sockmap`): a test whose feature
//!   the kernel lacks prints `shunt-test: feature unavailable: <feature>: <reason>` and
//!   passes; its cell shows `off`, the reason is listed under the table, and it is not a
//!   failure. Any other cell but `ok` is.
//! - **Acceleration**: `/dev/kvm` may be a paravirtualised KVM on which stock kernels hang,
//!   or on which qemu cannot start them at all.
//!   With `--accel auto`, the first machine boots under KVM and must reach its `/init` within
//!   [`KVM_PROBE`]; otherwise it is killed and every machine of the run uses TCG (emulation:
//!   about two minutes per kernel for these checks on two cores). Every machine is killed
//!   at its time limit.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::ValueEnum;

use crate::run::{self, Step};

/// The kernels run when no VERSION is given: bullseye's, bookworm's and bookworm-backports'.
pub const DEFAULT_VERSIONS: &[&str] = &["5.10", "6.1", "6.12"];

/// The suites the private apt configuration lists.
const SUITES: &[&str] = &["bullseye", "bookworm", "bookworm-backports"];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Used when the system's sources name no Debian archive.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Package lists younger than this are not refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Modules the initramfs loads (with their dependencies), where the kernel has them as
/// modules: the 9p root, the entropy source, and the sandbox's veth pairs and bridge.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "veth",
    "bridge",
];

/// Default time limit of one machine, boot and checks together.
pub const MACHINE_TIMEOUT: Duration = Duration::from_secs(600);

/// Default time limit of one test inside a machine.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// How long a machine under KVM has to reach its `/init` before KVM is given up.
const KVM_PROBE: Duration = Duration::from_secs(40);

/// The test binaries (`tests/tests/<name>.rs`) the checks run tests of.
const TEST_BINARIES: &[&str] = &["redirect", "http2", "passthrough", "kernel_path"];

/// What a test prints (to stdout, one line) when the kernel lacks the optional feature it
/// exercises, before returning without failing: `<marker><feature>: <reason>`.
const UNAVAILABLE: &str = "shunt-test: feature unavailable: ";

/// One column of the matrix.
struct Check {
    name: &'static str,
    /// The test it runs, `(binary, test)`; `None`: the script's own start check.
    test: Option<(&'static str, &'static str)>,
    /// An optional feature: a kernel without it shows `off` (with the test's reason), which
    /// is not a failure.
    optional: bool,
    /// Its own time limit, for a check that takes longer under emulation; else
    /// `--test-timeout`.
    limit: Option<Duration>,
}

impl Check {
    const fn required(name: &'static str, binary: &'static str, test: &'static str) -> Check {
        Check {
            name,
            test: Some((binary, test)),
            optional: false,
            limit: None,
        }
    }

    const fn optional(name: &'static str, binary: &'static str, test: &'static str) -> Check {
        Check {
            optional: true,
            ..Check::required(name, binary, test)
        }
    }

    const fn limit(self, seconds: u64) -> Check {
        Check {
            limit: Some(Duration::from_secs(seconds)),
            ..self
        }
    }
}

/// The checks, in the order the script runs them. The three redirect checks each assert
/// that `getpeername()` in the pod shows the original destination; `h2-per-stream`, that
/// a tonic gRPC client's calls on one HTTP/2 connection to a Service VIP are spread evenly over
/// its endpoints; `tls`, that a TLS handshake through a Service verifies end to end and is
/// recorded with its SNI; `kernel-path`, that connect() sends a declared Service's
/// connections straight to its endpoints in turn, getpeername() still names the Service, and
/// sock_ops reports them with the bytes the proxy would have counted; `kernel-path-tls`, that
/// TLS to a declared Service verifies with no connection through shunt; `fail-open`, that
/// with the daemon killed connections go direct,
/// and a restart takes the pinned programs back; `uninstall`, that no program, link or pin
/// is left. The optional features: the local fast path (`sk_msg` between a pod's client
/// and shunt) and `forwarding: sockmap` (`sk_skb` between shunt's two sockets).
const CHECKS: &[Check] = &[
    Check {
        name: "start",
        test: None,
        optional: false,
        limit: None,
    },
    Check::required(
        "ipv4+peername",
        "redirect",
        "enrolled_pod_is_redirected_and_keeps_its_view_of_the_connection",
    ),
    Check::required(
        "ipv6+peername",
        "redirect",
        "ipv6_and_ipv4_mapped_destinations_are_redirected",
    ),
    Check::required(
        "orig-dst",
        "redirect",
        "concurrent_pods_each_get_their_own_original_destination",
    ),
    // tonic's client and servers (shunt-greeter): Python's grpcio peers load too slowly
    // under emulation for the test's wait for their port.
    Check::required(
        "h2-per-stream",
        "http2",
        "tonic_calls_on_one_channel_are_spread_evenly",
    )
    // About a minute under emulation on two cores (3000 calls), seconds elsewhere.
    .limit(300),
    Check::required(
        "tls",
        "passthrough",
        "splice::tls_passes_through_untouched_and_is_recorded_with_its_sni",
    ),
    Check::required(
        "kernel-path",
        "kernel_path",
        "the_kernel_path_is_one_connection_and_records_the_same_bytes_as_the_proxy",
    ),
    Check::required(
        "kernel-path-tls",
        "kernel_path",
        "tls_to_a_declared_service_reaches_each_endpoint_in_turn_without_shunt",
    ),
    Check::required(
        "fail-open",
        "redirect",
        "fail_open_goes_direct_while_down_and_a_restart_takes_back_interception",
    ),
    Check::required(
        "uninstall",
        "redirect",
        "uninstall_leaves_no_program_link_or_pin",
    ),
    Check::optional(
        "fast-path",
        "passthrough",
        "local_fast_path_carries_an_opaque_connection",
    ),
    Check::optional(
        "sockmap",
        "passthrough",
        "sockmap::tls_passes_through_untouched_and_is_recorded_with_its_sni",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM if the first kernel boots under it in time, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

pub struct Options {
    pub versions: Vec<String>,
    pub accel: Accel,
    /// Time limit of one machine, boot and checks together (and of the host's run).
    pub timeout: Duration,
    /// Time limit of one test inside a machine, for checks without their own.
    pub test_timeout: Duration,
    /// Also run the checks on this machine's own kernel, without a virtual machine.
    pub host: bool,
    /// Build shunt's release binaries first (`cargo xtask test` has just built them).
    pub build: bool,
}

/// One kernel, downloaded and unpacked.
struct Kernel {
    /// What was asked for, e.g. `6.1`.
    version: String,
    /// `uname -r`, e.g. `6.1.0-50-amd64`.
    release: String,
    vmlinuz: PathBuf,
    dir: PathBuf,
}

/// What one machine (or the host) reported.
struct Outcome {
    /// `kvm`, `tcg` or `host`.
    how: &'static str,
    elapsed: Duration,
    /// Check name → `ok`/`FAIL` as the script saw it; checks not reported are missing.
    results: BTreeMap<String, String>,
    /// Check name → how long it took, in seconds.
    seconds: HashMap<String, u64>,
    /// Check name → its output lines.
    output: HashMap<String, Vec<String>>,
    /// Whether the kernel ran the initramfs's `/init`.
    reached_init: bool,
    /// Why the machine ended early, if it did.
    ended: Option<String>,
    log: PathBuf,
}

/// One line of the table: a kernel and what its machine reported.
struct Row {
    /// What was asked for (`6.1`), or `host`.
    label: String,
    release: String,
    outcome: Outcome,
}

/// A check's cell in the table.
#[derive(Debug, PartialEq)]
enum Cell {
    Ok,
    /// The test said the kernel lacks its optional feature.
    Off {
        feature: String,
        reason: String,
    },
    Fail,
    /// Not reported: the machine ended first.
    Missing,
}

impl Cell {
    fn of(check: &Check, outcome: &Outcome) -> Cell {
        let Some(result) = outcome.results.get(check.name) else {
            return Cell::Missing;
        };
        if result != "ok" {
            return Cell::Fail;
        }
        let output = outcome.output.get(check.name).map(Vec::as_slice);
        match unavailable(output.unwrap_or(&[])) {
            None => Cell::Ok,
            Some((feature, reason)) if check.optional => Cell::Off { feature, reason },
            // A required check cannot be skipped.
            Some(_) => Cell::Fail,
        }
    }

    fn text(&self) -> &'static str {
        match self {
            Cell::Ok => "ok",
            Cell::Off { .. } => "off",
            Cell::Fail => "FAIL",
            Cell::Missing => "-",
        }
    }

    fn passed(&self) -> bool {
        matches!(self, Cell::Ok | Cell::Off { .. })
    }
}

/// The feature and reason of the first [`UNAVAILABLE`] line in a test's output (which may
/// start mid-line: with `--nocapture` the harness's `test NAME ... ` precedes it).
fn unavailable(output: &[String]) -> Option<(String, String)> {
    output.iter().find_map(|line| {
        let at = line.find(UNAVAILABLE)?;
        let rest = line[at + UNAVAILABLE.len()..].trim_end();
        let (feature, reason) = rest.split_once(": ").unwrap_or((rest, ""));
        Some((feature.trim().to_owned(), reason.trim().to_owned()))
    })
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    run::require_root(
        "the machines share this machine's root filesystem, which only root can read whole",
    )?;
    let started = Instant::now();
    let dir = crate::workspace_root().join("target/kernels");

    let apt = PrivateApt::new(&dir)?;
    apt.refresh()?;
    let step = Step::start("fetching Debian's kernels and busybox (cached in target/kernels/debs)");
    let busybox_deb = apt.download("busybox-static")?;
    let mut kernels = Vec::new();
    for version in &options.versions {
        let package = apt.kernel_package(version)?;
        println!("    {version}: {package}");
        let deb = apt.download(&package)?;
        kernels.push(unpack_kernel(&dir, version, &package, &deb)?);
    }
    let busybox = unpack_busybox(&dir, &busybox_deb)?;
    step.done();

    if options.build {
        crate::build()?;
    }
    let tests = build_tests()?;

    let script = dir.join("check.sh");
    std::fs::write(&script, check_script(&tests, options.test_timeout))
        .with_context(|| format!("writing {}", script.display()))?;

    let mut accel = match options.accel {
        Accel::Auto if !Path::new("/dev/kvm").exists() => Accel::Tcg,
        other => other,
    };
    let mut rows = Vec::new();
    for kernel in &kernels {
        let step = Step::start(format!("building the initramfs for {}", kernel.release));
        let initramfs = build_initramfs(kernel, &busybox, &script)?;
        step.done();
        let outcome = boot_and_check(kernel, &initramfs, &mut accel, options.timeout)?;
        print_outcome(&kernel.release, &outcome);
        rows.push(Row {
            label: kernel.version.clone(),
            release: kernel.release.clone(),
            outcome,
        });
    }
    if options.host {
        let release = run::output("uname", &["-r"]).unwrap_or_default();
        let release = release.trim().to_owned();
        let step = Step::start(format!(
            "running the checks on this machine's kernel, {release} (time limit {}s)",
            options.timeout.as_secs()
        ));
        let outcome = check_on_host(&dir, &script, options.timeout)?;
        step.done();
        print_outcome(&release, &outcome);
        rows.push(Row {
            label: "host".to_owned(),
            release,
            outcome,
        });
    }
    print_table(&rows);
    println!(
        "    {} kernels in {:.0}s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    let failed = rows
        .iter()
        .flat_map(|row| CHECKS.iter().map(|check| Cell::of(check, &row.outcome)))
        .any(|cell| !cell.passed());
    if failed {
        bail!(
            "some kernels failed checks or did not run them (table above; logs in \
             target/kernels/*/console.log)"
        );
    }
    Ok(())
}

/// Builds the workspace's tests in release mode exactly as `cargo nextest run --release
/// --workspace` does, and returns the executables of [`TEST_BINARIES`] by name. Building
/// fewer targets would resolve the dependencies' features differently (the daemon's own
/// dev-dependencies would be left out) and build everything a second time; this way, after
/// `cargo xtask test`'s run, nothing is built.
fn build_tests() -> anyhow::Result<HashMap<String, PathBuf>> {
    let step = Step::start(format!(
        "building the tests (as `cargo xtask test` does; the checks run those of \
         tests/tests/{{{}}}.rs)",
        TEST_BINARIES.join(",")
    ));
    let mut cmd = run::cargo_command();
    cmd.args(["test", "--release", "--locked", "--workspace", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    let out = cmd
        .output()
        .context("could not start `cargo test --no-run`")?;
    anyhow::ensure!(out.status.success(), "building the tests failed");
    let mut found = HashMap::new();
    for msg in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
    {
        let source = msg["target"]["src_path"].as_str().unwrap_or_default();
        let ours = TEST_BINARIES
            .iter()
            .find(|name| source.ends_with(&format!("/tests/tests/{name}.rs")));
        if let (Some(name), Some(executable)) = (ours, msg["executable"].as_str()) {
            found.insert((*name).to_owned(), PathBuf::from(executable));
        }
    }
    for name in TEST_BINARIES {
        anyhow::ensure!(
            found.contains_key(*name),
            "cargo named no executable for tests/tests/{name}.rs"
        );
    }
    step.done();
    Ok(found)
}

/// apt with its own sources, lists and cache under `target/kernels/apt`.
struct PrivateApt {
    root: PathBuf,
    debs: PathBuf,
    mirror: String,
}

impl PrivateApt {
    fn new(dir: &Path) -> anyhow::Result<PrivateApt> {
        let root = dir.join("apt");
        for sub in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "etc/apt.conf.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        let mirror = system_mirror().unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
        let sources: String = SUITES
            .iter()
            .map(|suite| format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n"))
            .collect();
        std::fs::write(root.join("etc/sources.list"), sources)
            .context("writing the private sources.list")?;
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        Ok(PrivateApt { root, debs, mirror })
    }

    /// The options that make apt use only this configuration and state.
    fn options(&self) -> Vec<String> {
        let root = self.root.display();
        [
            format!("Dir::Etc={root}/etc"),
            format!("Dir::Etc::sourcelist={root}/etc/sources.list"),
            format!("Dir::Etc::sourceparts={root}/etc/sources.list.d"),
            format!("Dir::State={root}/state"),
            format!("Dir::Cache={root}/cache"),
            // Root downloads into a directory the `_apt` user cannot write.
            "APT::Sandbox::User=root".to_owned(),
            "Debug::NoLocking=1".to_owned(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option])
        .collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(self.options());
        cmd
    }

    /// `apt-get update` of the private lists, unless the last one was less than a day ago
    /// (a stamp file: apt gives the lists the archive's times, not the download's).
    fn refresh(&self) -> anyhow::Result<()> {
        let stamp = self.root.join("state/updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if fresh {
            return Ok(());
        }
        let step = Step::start(format!(
            "reading the package lists of {} (private apt state in target/kernels/apt)",
            SUITES.join(", ")
        ));
        if let Err(e) = run::status(self.command("apt-get").args(["-q", "update"])) {
            // Lists from an earlier run still name the kernels, whose `.deb`s may be cached.
            if self.has_lists() {
                println!("    could not refresh them ({e:#}); using the lists of an earlier run");
                return Ok(());
            }
            return Err(e).context(format!(
                "could not read the package lists of {} from {}. The kernels come from \
                 Debian's archive: make it reachable from this machine (the mirror is the \
                 system's apt sources' Debian archive; apt's proxy settings in \
                 /etc/apt/apt.conf.d apply), or copy target/kernels/ from a machine that \
                 fetched them",
                SUITES.join(", "),
                self.mirror
            ));
        }
        std::fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
        step.done();
        Ok(())
    }

    /// Whether an earlier `apt-get update` left package lists.
    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.root.join("state/lists")).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
        })
    }

    /// The newest `linux-image-<version>…-amd64` (the signed, generic flavour).
    fn kernel_package(&self, version: &str) -> anyhow::Result<String> {
        let out = self
            .command("apt-cache")
            .args(["search", "--names-only", "^linux-image-"])
            .output()
            .context("running apt-cache search")?;
        anyhow::ensure!(out.status.success(), "apt-cache search failed");
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
            .collect();
        newest_kernel(&names, version).with_context(|| {
            format!(
                "no linux-image-{version}…-amd64 in {} (kernels there: 5.10, 6.1, 6.12)",
                SUITES.join(", ")
            )
        })
    }

    /// The `.deb` of `package` in `target/kernels/debs`, downloaded unless already there.
    fn download(&self, package: &str) -> anyhow::Result<PathBuf> {
        let cached = |debs: &Path| -> Option<PathBuf> {
            std::fs::read_dir(debs)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
                })
        };
        if let Some(deb) = cached(&self.debs) {
            return Ok(deb);
        }
        println!("    downloading {package}");
        run::status(
            self.command("apt-get")
                .args(["-q", "download", package])
                .current_dir(&self.debs),
        )
        .with_context(|| {
            format!(
                "downloading {package} from {} failed: make the archive reachable from this \
                 machine, or copy target/kernels/debs/ from a machine that has the .debs",
                self.mirror
            )
        })?;
        cached(&self.debs).with_context(|| format!("apt-get download left no {package}_*.deb"))
    }
}

/// The first Debian archive (not the security one) the system's deb822 sources name.
fn system_mirror() -> Option<String> {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok()?;
    sources
        .lines()
        .filter_map(|line| line.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
        .map(|uri| uri.trim_end_matches('/').to_owned())
}

/// Among package names, the newest `linux-image-<version>[.-]…-amd64` that is the generic
/// flavour: not `-cloud-`, `-rt-`, `-unsigned` or `-dbg`.
fn newest_kernel(names: &[String], version: &str) -> Option<String> {
    names
        .iter()
        .filter_map(|name| {
            let middle = name.strip_prefix("linux-image-")?.strip_suffix("-amd64")?;
            let rest = middle.strip_prefix(version)?;
            let generic = middle
                .chars()
                .all(|c| c.is_ascii_digit() || ".-+deb".contains(c));
            (generic && (rest.starts_with('.') || rest.starts_with('-')))
                .then(|| (numbers(middle), name.clone()))
        })
        .max()
        .map(|(_, name)| name)
}

/// The runs of digits in `text`: `6.12.90+deb12.1` → [6, 12, 90, 12, 1].
fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// Unpacks a kernel's `.deb` into `target/kernels/<package>/root`, once.
fn unpack_kernel(dir: &Path, version: &str, package: &str, deb: &Path) -> anyhow::Result<Kernel> {
    let kernel_dir = dir.join(package);
    let root = kernel_dir.join("root");
    let marker = kernel_dir.join("unpacked");
    if !marker.exists() {
        println!("    unpacking {}", deb.display());
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        run::status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
        std::fs::write(&marker, "").context("marking the kernel unpacked")?;
    }
    let modules = root.join("lib/modules");
    let release = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    anyhow::ensure!(vmlinuz.exists(), "{package} has no boot/vmlinuz-{release}");
    Ok(Kernel {
        version: version.to_owned(),
        release,
        vmlinuz,
        dir: kernel_dir,
    })
}

/// Unpacks busybox-static and returns its binary.
fn unpack_busybox(dir: &Path, deb: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("busybox");
    let busybox = root.join("bin/busybox");
    if !busybox.exists() {
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        run::status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    anyhow::ensure!(busybox.exists(), "busybox-static has no bin/busybox");
    Ok(busybox)
}

/// The kernel's modules by name (`-` read as `_`, as the kernel does) → file.
fn module_files(kernel: &Kernel) -> anyhow::Result<HashMap<String, PathBuf>> {
    fn walk(dir: &Path, found: &mut HashMap<String, PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, found)?;
            } else if let Some(name) = module_name(&path) {
                found.insert(name, path);
            }
        }
        Ok(())
    }
    let dir = kernel
        .dir
        .join("root/lib/modules")
        .join(&kernel.release)
        .join("kernel");
    let mut found = HashMap::new();
    walk(&dir, &mut found).with_context(|| format!("reading {}", dir.display()))?;
    Ok(found)
}

/// `…/9pnet_virtio.ko.xz` → `9pnet_virtio`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// A module's object, decompressed: busybox's `insmod` loads plain ELF.
fn module_object(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => Some("xz"),
        Some("zst") => Some("zstd"),
        Some("gz") => Some("gzip"),
        _ => None,
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("running {tool}"))?;
            anyhow::ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
            Ok(out.stdout)
        }
    }
}

/// The modules a module needs loaded first, from its `.modinfo` `depends=` entry.
fn depends(object: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = object.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &object[start + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// [`MODULES`] that this kernel has as modules, with their dependencies, in an order
/// `insmod` can load them: every module after the ones it depends on.
fn modules_in_load_order(kernel: &Kernel) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn visit(
        name: &str,
        files: &HashMap<String, PathBuf>,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        // Not a module: built in (or absent, which the machine's own errors will show).
        let Some(path) = files.get(name) else {
            return Ok(());
        };
        let object = module_object(path)?;
        for dependency in depends(&object) {
            visit(&dependency, files, seen, order)?;
        }
        order.push((name.to_owned(), object));
        Ok(())
    }
    let files = module_files(kernel)?;
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for name in MODULES {
        visit(name, &files, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// Writes `target/kernels/<package>/initramfs.cpio`: busybox, the modules and `/init`.
fn build_initramfs(kernel: &Kernel, busybox: &Path, script: &Path) -> anyhow::Result<PathBuf> {
    let modules = modules_in_load_order(kernel)?;
    println!(
        "    modules: {}",
        modules
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "host", "modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    let busybox =
        std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for (index, (name, object)) in modules.iter().enumerate() {
        cpio.file(&format!("modules/{index:02}-{name}.ko"), 0o644, object);
    }
    let workspace = crate::workspace_root();
    cpio.file("init", 0o755, init_script(script, &workspace).as_bytes());
    let path = kernel.dir.join("initramfs.cpio");
    std::fs::write(&path, cpio.finish()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The initramfs's `/init`: loads the modules, mounts this machine's root read-only over 9p
/// with fresh kernel filesystems and tmpfs under it, runs the check script there and powers
/// off. `@@` lines are read by [`boot_and_check`]. The workspace (binaries, the script) is
/// bound back over the fresh `/tmp` and `/run`, where a CI checkout may live.
fn init_script(script: &Path, workspace: &Path) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "@@init $(uname -r)"
# Loopback, which the tests' clients of the daemon's telemetry use.
ip link set lo up
for module in /modules/*.ko; do
    insmod "$module" || echo "@@warn insmod $module failed"
done
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host; then
    mount -t proc proc /host/proc
    mount -t sysfs sysfs /host/sys
    mount -t devtmpfs devtmpfs /host/dev
    mkdir -p /host/dev/pts /host/dev/shm
    mount -t devpts devpts /host/dev/pts
    mount -t tmpfs tmpfs /host/dev/shm
    mkdir -p /workspace
    mount -o bind "/host{workspace}" /workspace
    mount -t tmpfs -o mode=1777 tmpfs /host/tmp
    mount -t tmpfs -o mode=755 tmpfs /host/run
    mkdir -p "/host{workspace}" 2>/dev/null
    mount -o bind /workspace "/host{workspace}" || echo "@@warn the workspace is not visible"
    mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
    mount -t bpf bpf /host/sys/fs/bpf
    echo "@@root mounted"
    chroot /host /bin/sh {script} /tmp/shunt-kernels
    echo "@@exit $?"
else
    echo "@@error the 9p root did not mount"
fi
sync
poweroff -f
"#,
        script = script.display(),
        workspace = workspace.display(),
    )
}

/// The checks, as a script for the host's `/bin/sh` in the host's filesystem: run inside
/// each kernel's machine by its `/init`, and on this machine directly. Its argument is a
/// directory for its files; names it creates in the kernel (cgroup, pins) carry its pid,
/// and it removes them again.
fn check_script(tests: &HashMap<String, PathBuf>, test_timeout: Duration) -> String {
    let mut script = format!(
        r#"#!/bin/sh
# Written by `cargo xtask kernels`: the checks of one kernel, run by each machine's /init
# (and on the host). $1: a directory for the checks' files.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp
export SHUNT_BIN={shunt}
export SHUNT_PROBE_BIN={probe}
export SHUNT_GREETER_BIN={greeter}
WORK=${{1:-/tmp/shunt-kernels}}
mkdir -p "$WORK"
# cgroup v2: the machines mount it at /sys/fs/cgroup, a host may have it elsewhere.
CGROUP2=$(awk '$3 == "cgroup2" {{ print $2; exit }}' /proc/mounts)

# report NAME ok|FAIL FILE: the check's output, then its result and its seconds.
report() {{
    sed "s/^/@@out $1 /" "$3"
    echo "@@check $1 $2 $(($(date +%s) - began))"
}}

# Whether `shunt run` starts and answers on its admin socket; removed again with uninstall.
check_start() {{
    began=$(date +%s)
    dir=$WORK/start
    cgroup=$CGROUP2/shunt-kernels-$$
    pins=/sys/fs/bpf/shunt-kernels-$$
    mkdir -p $dir $cgroup
    cat > $dir/config.yaml <<EOF
intercept:
  cgroup: $cgroup
  pin_dir: $pins
admin:
  socket: $dir/admin.sock
EOF
    SHUNT_LOG=info timeout --foreground -s KILL 300 "$SHUNT_BIN" run --config $dir/config.yaml > $dir/log 2>&1 &
    pid=$!
    result=FAIL
    i=0
    while [ $i -lt 120 ]; do
        if "$SHUNT_BIN" --admin-socket $dir/admin.sock status > $dir/status 2>&1; then
            result=ok
            break
        fi
        kill -0 $pid 2>/dev/null || break
        sleep 1
        i=$((i + 1))
    done
    if [ $result = ok ]; then
        "$SHUNT_BIN" --admin-socket $dir/admin.sock uninstall >> $dir/log 2>&1
    fi
    kill $pid 2>/dev/null
    wait $pid
    echo "shunt run: exit status $?" >> $dir/log
    if [ -e $pins ]; then
        echo "uninstall left $pins; removed" >> $dir/log
        rm -rf $pins
        result=FAIL
    fi
    rmdir $cgroup 2>> $dir/log
    report start $result $dir/log
}}

# check_test NAME TEST-BINARY TEST SECONDS: one test, alone, its output not captured (a test
# says so on stdout when the kernel lacks its optional feature).
check_test() {{
    began=$(date +%s)
    log=$WORK/$1.log
    timeout --foreground -k 10 $4 "$2" --exact "$3" --test-threads=1 --nocapture > $log 2>&1
    [ $? = 124 ] && echo "killed at the check's time limit ($4s)" >> $log
    if grep -q "test result: ok. 1 passed" $log; then result=ok; else result=FAIL; fi
    report "$1" $result $log
}}

echo "@@kernel $(uname -r)"
check_start
"#,
        shunt = crate::release_bin("shunt").display(),
        probe = crate::release_bin("shunt-probe").display(),
        greeter = crate::release_bin("shunt-greeter").display(),
    );
    for check in CHECKS {
        let Some((binary, test)) = check.test else {
            continue;
        };
        let limit = check.limit.unwrap_or(test_timeout).as_secs();
        let path = tests.get(binary).map(|p| p.display().to_string());
        let path = path.unwrap_or_else(|| format!("/missing/{binary}"));
        let _ = writeln!(script, "check_test {} {path} {test} {limit}", check.name);
    }
    script.push_str("echo @@done\n");
    script
}

/// Runs the check script on this machine, in its own process group, until it ends or
/// `timeout`: then the group gets SIGTERM (the tests' sandboxes remove what they made on
/// it) and, 20 seconds later, SIGKILL.
fn check_on_host(dir: &Path, script: &Path, timeout: Duration) -> anyhow::Result<Outcome> {
    use std::os::unix::process::CommandExt as _;
    let host = dir.join("host");
    let work = host.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let log = host.join("console.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg(script)
        .arg(&work)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("starting the check script")?;
    let group = format!("-{}", child.id());
    let signal = |name: &str| {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), "--", &group])
            .stderr(Stdio::null())
            .status();
    };
    let mut ended = None;
    let mut terminated: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            if terminated.is_none() && !status.success() {
                ended = Some(format!("the check script exited with {status}"));
            }
            break;
        }
        match terminated {
            None if started.elapsed() >= timeout => {
                signal("TERM");
                terminated = Some(Instant::now());
                ended = Some(format!(
                    "stopped at the time limit ({}s)",
                    timeout.as_secs()
                ));
            }
            Some(at) if at.elapsed() >= Duration::from_secs(20) => {
                signal("KILL");
                let _ = child.wait();
                break;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Whatever of the group outlived the script (nothing, when the tests clean up).
    signal("KILL");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let mut outcome = parse_console(&text);
    if ended.is_none() && !text.contains("@@done") {
        ended = Some("the check script stopped before the checks finished".to_owned());
    }
    outcome.how = "host";
    outcome.elapsed = started.elapsed();
    outcome.reached_init = true;
    outcome.ended = ended;
    outcome.log = log;
    Ok(outcome)
}

/// Boots `kernel` and collects its checks. Under `Accel::Auto`, tries KVM and switches
/// `accel` to TCG for this and every later machine if the kernel does not reach `/init`.
fn boot_and_check(
    kernel: &Kernel,
    initramfs: &Path,
    accel: &mut Accel,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    if *accel == Accel::Auto {
        let step = Step::start(format!(
            "booting {} under KVM (given up after {}s without reaching /init)",
            kernel.release,
            KVM_PROBE.as_secs()
        ));
        let outcome = boot(kernel, initramfs, Accel::Kvm, timeout, Some(KVM_PROBE))?;
        step.done();
        if outcome.reached_init {
            *accel = Accel::Kvm;
            return Ok(outcome);
        }
        println!(
            "    KVM did not boot it ({}): this run uses TCG (emulation)",
            outcome.ended.as_deref().unwrap_or("no /init")
        );
        *accel = Accel::Tcg;
    }
    let step = Step::start(format!(
        "booting {} under {} (time limit {}s)",
        kernel.release,
        accel.name().to_uppercase(),
        timeout.as_secs()
    ));
    let outcome = boot(kernel, initramfs, *accel, timeout, None)?;
    step.done();
    Ok(outcome)
}

const NO_INIT: &str = "did not reach /init in time";

/// Runs one machine until it powers off or `timeout` (or, with `init_within`, until it has
/// not reached `/init` by then) and reads its console log.
fn boot(
    kernel: &Kernel,
    initramfs: &Path,
    accel: Accel,
    timeout: Duration,
    init_within: Option<Duration>,
) -> anyhow::Result<Outcome> {
    let log = kernel.dir.join("console.log");
    let _ = std::fs::remove_file(&log);
    let qemu_err = kernel.dir.join("qemu.err");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-accel", accel.name()])
        .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-smp", "2", "-m", "2048"])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 random.trust_cpu=on",
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-device",
            "virtio-rng-pci",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&qemu_err)?);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut ended = None;
    let mut reached_init = false;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let err = std::fs::read_to_string(&qemu_err).unwrap_or_default();
                ended = Some(format!("qemu exited with {status}: {}", err.trim()));
            }
            break;
        }
        let text = std::fs::read(&log).unwrap_or_default();
        reached_init = reached_init || contains(&text, b"@@init");
        let elapsed = started.elapsed();
        let stop = match init_within {
            Some(limit) if !reached_init && elapsed >= limit => Some(NO_INIT.to_owned()),
            _ if elapsed >= timeout => {
                Some(format!("killed at the time limit ({}s)", timeout.as_secs()))
            }
            _ => None,
        };
        if let Some(why) = stop {
            let _ = child.kill();
            let _ = child.wait();
            ended = Some(why);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let mut outcome = parse_console(&text);
    if ended.is_none() && !text.contains("@@done") {
        ended = Some(
            text.lines()
                .find_map(|l| l.trim().strip_prefix("@@error "))
                .unwrap_or("the machine stopped before the checks finished")
                .to_owned(),
        );
    }
    outcome.how = accel.name();
    outcome.elapsed = elapsed;
    outcome.reached_init = reached_init || text.contains("@@init");
    outcome.ended = ended;
    outcome.log = log;
    Ok(outcome)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads the `@@check` and `@@out` lines of a console log.
fn parse_console(text: &str) -> Outcome {
    let mut results = BTreeMap::new();
    let mut seconds = HashMap::new();
    let mut output: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        // Kernel messages can share a line with the script's: the marker may start mid-line.
        if let Some(at) = line.find("@@check ") {
            let mut words = line[at + "@@check ".len()..].split_whitespace();
            if let (Some(name), Some(result)) = (words.next(), words.next()) {
                results.insert(name.to_owned(), result.to_owned());
                if let Some(took) = words.next().and_then(|w| w.parse().ok()) {
                    seconds.insert(name.to_owned(), took);
                }
            }
        } else if let Some(at) = line.find("@@out ") {
            let rest = &line[at + "@@out ".len()..];
            let (name, out) = rest.split_once(' ').unwrap_or((rest, ""));
            output
                .entry(name.to_owned())
                .or_default()
                .push(strip_ansi(out));
        }
    }
    Outcome {
        how: "",
        elapsed: Duration::ZERO,
        results,
        seconds,
        output,
        reached_init: false,
        ended: None,
        log: PathBuf::new(),
    }
}

/// `text` without ANSI colour sequences (`ESC [ … m`), as logs written for a terminal have.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Up to and including the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Results of one machine, with the last lines of each failed check's output.
fn print_outcome(release: &str, outcome: &Outcome) {
    if let Some(why) = &outcome.ended {
        println!("    {release}: {why}");
    }
    for check in CHECKS {
        let cell = Cell::of(check, outcome);
        let took = outcome
            .seconds
            .get(check.name)
            .map(|s| format!(" ({s}s)"))
            .unwrap_or_default();
        match &cell {
            Cell::Off { feature, reason } => {
                println!("    {}: off{took}: {feature}: {reason}", check.name)
            }
            _ => println!("    {}: {}{took}", check.name, cell.text()),
        }
        if !cell.passed() {
            let lines = outcome.output.get(check.name).map(Vec::as_slice);
            let lines = lines.unwrap_or(&[]);
            for line in &lines[lines.len().saturating_sub(12)..] {
                println!("      | {line}");
            }
        }
    }
    println!("    log: {}", outcome.log.display());
}

/// The kernel × check table, and under it why optional features were off.
fn print_table(rows: &[Row]) {
    let mut header: Vec<String> = ["kernel", "release", "run", "time"]
        .map(str::to_owned)
        .to_vec();
    header.extend(CHECKS.iter().map(|check| check.name.to_owned()));
    let mut table = vec![header];
    let mut notes = Vec::new();
    for row in rows {
        let mut line = vec![
            row.label.clone(),
            row.release.clone(),
            row.outcome.how.to_owned(),
            format!("{:.0}s", row.outcome.elapsed.as_secs_f64()),
        ];
        for check in CHECKS {
            let cell = Cell::of(check, &row.outcome);
            line.push(cell.text().to_owned());
            if let Cell::Off { feature, reason } = cell {
                notes.push(format!("{} {}: {feature}: {reason}", row.label, check.name));
            }
        }
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    println!();
    for line in &table {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    let optional: Vec<&str> = CHECKS
        .iter()
        .filter(|check| check.optional)
        .map(|check| check.name)
        .collect();
    println!(
        "(optional features: {}; off: the kernel lacks it, not a failure; \
         -: not reported, the machine ended first; FAIL: output above)",
        optional.join(", ")
    );
    for note in notes {
        println!("off: {note}");
    }
}

/// A `newc` cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, 0, &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, content: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 0, 0, content);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, major, minor, &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev_major: u32, rdev_minor: u32, content: &[u8]) {
        self.inode += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            content.len() as u32,
            0, // devmajor
            0, // devminor
            rdev_major,
            rdev_minor,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            let _ = write!(header, "{field:08x}");
        }
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_generic_kernel_of_a_version() {
        let names: Vec<String> = [
            "linux-image-5.10.0-30-amd64",
            "linux-image-5.10.0-32-amd64",
            "linux-image-5.10.0-32-cloud-amd64",
            "linux-image-5.10.0-32-amd64-unsigned",
            "linux-image-6.1.0-50-rt-amd64",
            "linux-image-6.1.0-47-amd64",
            "linux-image-6.12.90+deb12.1-amd64",
            "linux-image-6.12.95+deb12-amd64",
            "linux-image-6.12.95+deb12-cloud-amd64",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            newest_kernel(&names, "5.10").as_deref(),
            Some("linux-image-5.10.0-32-amd64")
        );
        assert_eq!(
            newest_kernel(&names, "6.1").as_deref(),
            Some("linux-image-6.1.0-47-amd64")
        );
        assert_eq!(
            newest_kernel(&names, "6.12").as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
        assert_eq!(newest_kernel(&names, "6.2"), None);
    }

    #[test]
    fn reads_module_dependencies() {
        let object = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0name=9p\0";
        assert_eq!(depends(object), ["9pnet", "netfs"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
    }

    #[test]
    fn an_optional_feature_the_kernel_lacks_is_off_not_failed() {
        let text = "@@out sockmap test x ... \u{1b}[1mshunt-test: feature unavailable: \
                    sockmap: needs 5.15\u{1b}[0m\r\n@@check sockmap ok\r\n\
                    @@out tls shunt-test: feature unavailable: tls: none\r\n@@check tls ok\r\n\
                    @@check fast-path ok\r\n@@check uninstall FAIL\r\n";
        let outcome = parse_console(text);
        let check = |name| CHECKS.iter().find(|c| c.name == name).expect("a check");
        assert_eq!(
            Cell::of(check("sockmap"), &outcome),
            Cell::Off {
                feature: "sockmap".to_owned(),
                reason: "needs 5.15".to_owned()
            }
        );
        assert_eq!(Cell::of(check("fast-path"), &outcome), Cell::Ok);
        // A required check cannot be skipped.
        assert_eq!(Cell::of(check("tls"), &outcome), Cell::Fail);
        assert_eq!(Cell::of(check("uninstall"), &outcome), Cell::Fail);
        assert_eq!(Cell::of(check("start"), &outcome), Cell::Missing);
    }

    #[test]
    fn reads_checks_from_the_console() {
        let text = "@@init 6.1.0\r\n@@out start shunt: refused\r\n[ 1.0] x @@check start FAIL\r\n\
                    @@check uninstall ok\r\n@@done\r\n";
        let outcome = parse_console(text);
        assert_eq!(outcome.results["start"], "FAIL");
        assert_eq!(outcome.results["uninstall"], "ok");
        assert_eq!(outcome.output["start"], ["shunt: refused"]);
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "time  INFO x"
        );
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let data = cpio.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        assert!(contains(&data, b"TRAILER!!!"));
    }
}
