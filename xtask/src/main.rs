//! `cargo xtask <task>`: the project's development tasks.
//!
//! Every task that builds first runs `setup`, which installs what a fresh Debian machine lacks
//! and costs well under a second when everything is already there.

#![forbid(unsafe_code)]

mod fuzz;
mod image;
mod kernels;
mod layers;
mod run;
mod setup;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::run::{Step, cargo};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "shunt development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test peers that are missing (Debian packages, bpf-linker).
    Setup {
        /// Only the toolchain that building shunt needs, no test peers (container builds).
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build `target/release/shunt` (eBPF object embedded) and the test helpers.
    Build,
    /// Run the whole suite: formatting, lints, fuzzing, then unit, sandbox integration and soak
    /// tests under per-test time limits, then the kernel matrix (`kernels`: Debian's 5.10,
    /// 6.1 and 6.12 in qemu, and this machine's kernel) (as root).
    Test {
        /// Arguments for `cargo nextest run`, e.g. a test name filter or `-E 'binary(http2)'`;
        /// with any, fuzzing and the kernel matrix are skipped.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers of untrusted input (libFuzzer), each target for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all of fuzz/fuzz_targets).
        targets: Vec<String>,
    },
    /// Build the container images `localhost/shunt:TAG` and `localhost/shunt-greeter:TAG` with
    /// podman (deploy/Dockerfile), from a local Debian base made by mmdebstrap: no registry.
    Image {
        /// Put this checkout's release binaries in the images (built first if stale, on this
        /// machine) instead of compiling them inside the build: seconds instead of minutes.
        #[arg(long)]
        prebuilt: bool,
        /// The images' tag [default: the workspace version; `dev` with --prebuilt].
        #[arg(long)]
        tag: Option<String>,
    },
    /// Run the local sandbox demo: pods as network namespaces, traffic through shunt.
    Demo,
    /// Write deploy/crd.yaml, the FaultInjection CustomResourceDefinition, from the Rust types.
    Crd,
    /// Run shunt under mixed traffic, endpoint churn, fault rules and a restart (as root);
    /// fails on unexpected errors, RSS growth or leaks; writes target/soak/soak.json.
    Soak {
        /// How long traffic runs, in minutes (fractions allowed).
        #[arg(long, default_value_t = 10.0, conflicts_with = "seconds")]
        minutes: f64,
        /// How long traffic runs, in seconds (instead of --minutes).
        #[arg(long)]
        seconds: Option<f64>,
        /// Also copy the report of a passing run to bench/results/soak.json (tracked by git).
        #[arg(long)]
        publish: bool,
    },
    /// Measure shunt against the direct path in the sandbox (as root); writes
    /// target/bench/results.{json,md} and SVG charts of some sections (*.svg).
    Bench {
        /// One round of each workload, 2 s per measurement.
        #[arg(long)]
        quick: bool,
        /// Also install and measure HAProxy and nginx.
        #[arg(long)]
        peers: bool,
        /// Also copy the results to bench/results/ (tracked by git), which the README quotes.
        #[arg(long)]
        publish: bool,
    },
    /// Boot Debian's kernels in qemu and run shunt and some of its sandbox tests under each
    /// (as root); prints a table kernel × check. Kernels are cached in target/kernels.
    Kernels {
        /// Kernel versions, e.g. `6.1` (the newest Debian linux-image-6.1…-amd64 of
        /// bullseye, bookworm or bookworm-backports); default: 5.10 6.1 6.12.
        versions: Vec<String>,
        /// Acceleration: `auto` tries KVM on the first kernel and falls back to TCG.
        #[arg(long, value_enum, default_value_t = kernels::Accel::Auto)]
        accel: kernels::Accel,
        /// Time limit of one machine (boot and checks), and of the checks on this machine's
        /// kernel, in seconds.
        #[arg(long, default_value_t = kernels::MACHINE_TIMEOUT.as_secs())]
        timeout: u64,
        /// Time limit of one test inside a machine, in seconds (checks slow under emulation
        /// have their own).
        #[arg(long, default_value_t = kernels::TEST_TIMEOUT.as_secs())]
        test_timeout: u64,
        /// Skip the row of this machine's own kernel (the checks run on it without a VM).
        #[arg(long)]
        no_host: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { toolchain_only } => match toolchain_only {
            true => setup::toolchain(),
            false => setup::run(),
        },
        Task::Build => setup::run().and_then(|()| build()),
        Task::Test { args } => setup::run().and_then(|()| test(&args)),
        Task::Image { prebuilt, tag } => {
            let options = image::Options { prebuilt, tag };
            match prebuilt {
                true => setup::toolchain()
                    .and_then(|()| build())
                    .and_then(|()| image::build(&options)),
                false => image::build(&options),
            }
        }
        Task::Demo => setup::run().and_then(|()| demo()),
        Task::Fuzz { seconds, targets } => setup::run().and_then(|()| fuzz(seconds, targets)),
        Task::Crd => setup::run().and_then(|()| crd()),
        Task::Soak {
            minutes,
            seconds,
            publish,
        } => setup::run()
            .and_then(|()| {
                run::require_root("the soak creates network namespaces, a cgroup and BPF programs")
            })
            .and_then(|()| build())
            .and_then(|()| soak(seconds.unwrap_or(minutes * 60.0), publish)),
        Task::Bench {
            quick,
            peers,
            publish,
        } => setup::run()
            .and_then(|()| if peers { setup::peers() } else { Ok(()) })
            .and_then(|()| bench(quick, peers, publish)),
        Task::Kernels {
            versions,
            accel,
            timeout,
            test_timeout,
            no_host,
        } => setup::run().and_then(|()| {
            let versions = match versions.is_empty() {
                true => kernels::DEFAULT_VERSIONS
                    .iter()
                    .map(|v| v.to_string())
                    .collect(),
                false => versions,
            };
            kernels::run(&kernels::Options {
                versions,
                accel,
                timeout: std::time::Duration::from_secs(timeout),
                test_timeout: std::time::Duration::from_secs(test_timeout),
                host: !no_host,
                build: true,
            })
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Each fuzz target's share of `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_owned()
}

fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

/// Says, before cargo's own progress, how long a build from nothing takes: about 300 crates
/// in release mode, about 10 minutes on 2 cores. Later builds take seconds.
fn first_build_note() {
    if !release_bin("shunt").exists() {
        println!(
            "    first build: about 10 minutes on 2 cores (the dependencies, the eBPF object \
             and shunt, in release mode); later builds take seconds"
        );
    }
}

fn build() -> anyhow::Result<()> {
    let step = Step::start(
        "building shunt (with its eBPF object), the demo, benchmark and soak programs and the \
         test peers (target/release)",
    );
    first_build_note();
    cargo(&[
        "build",
        "--release",
        "--locked",
        "-p",
        "shunt",
        "-p",
        "shunt-tests",
        "--bins",
    ])?;
    step.done();
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    run::require_root("the integration tests create network namespaces, cgroups and BPF programs")?;
    let step = Step::start("checking formatting");
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["fmt", "--check", "--manifest-path", "ebpf/shunt-ebpf/Cargo.toml"])
        .context("the eBPF crate is not formatted: run `cargo fmt --manifest-path ebpf/shunt-ebpf/Cargo.toml`")?;
    step.done();

    let step = Step::start("checking the module layering (ARCHITECTURE.md)");
    layers::check(&workspace_root())?;
    step.done();

    build()?;

    // The images of the container tests, from the binaries just built (seconds).
    let images = image::Options {
        prebuilt: true,
        tag: None,
    };
    image::build(&images)?;
    let images = image::names(&images);

    let step = Step::start("linting (clippy, warnings are errors)");
    cargo(&[
        "clippy",
        "--release",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step.done();

    let step = Step::start("linting the eBPF crate (Debian's clippy, warnings are errors)");
    lint_ebpf()?;
    step.done();

    // Fuzzing first: the run ends with the test runner's own summary.
    if extra.is_empty() {
        fuzz(FUZZ_SECONDS_IN_TEST, Vec::new())?;
    }

    setup::ensure_cargo_nextest()?;
    println!(
        "==> running unit, sandbox integration and soak tests (limits per test: \
         .config/nextest.toml; JUnit report: target/nextest/default/junit.xml)"
    );
    let mut args = vec!["nextest", "run", "--release", "--locked", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    let mut cmd = run::cargo_command();
    cmd.args(&args)
        .env("SHUNT_BIN", release_bin("shunt"))
        .env("SHUNT_PROBE_BIN", release_bin("shunt-probe"))
        .env("SHUNT_GREETER_BIN", release_bin("shunt-greeter"))
        .env("SHUNT_IMAGE", &images[0])
        .env("SHUNT_GREETER_IMAGE", &images[1]);
    let status = cmd.status().context("could not start `cargo nextest`")?;
    // The runner's summary is the last word: on failure, only its exit status is added.
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }

    // The kernels shunt supports, each in a machine of its own (about 2 minutes each under
    // emulation), with the binaries built above; its table is then the last word.
    if extra.is_empty() {
        kernels::run(&kernels::Options {
            versions: kernels::DEFAULT_VERSIONS
                .iter()
                .map(|v| v.to_string())
                .collect(),
            accel: kernels::Accel::Auto,
            timeout: kernels::MACHINE_TIMEOUT,
            test_timeout: kernels::TEST_TIMEOUT,
            host: true,
            build: false,
        })?;
    }
    Ok(())
}

/// Clippy on the kernel programs. They build with Debian's compiler (its `core` for
/// `bpfel-unknown-none`), so they are checked with the clippy of that same compiler: rustup's
/// has no `core` for the target. The environment of the cargo that runs us is removed, as
/// `proxy/build.rs` does for the eBPF build itself.
fn lint_ebpf() -> anyhow::Result<()> {
    let root = workspace_root();
    let mut cmd = std::process::Command::new("/usr/bin/cargo-clippy");
    cmd.current_dir(root.join("ebpf/shunt-ebpf"))
        .args([
            "clippy",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"]);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let ours = key.starts_with("CARGO") && key != "CARGO_HOME";
        if ours || key.starts_with("RUSTC") || key.starts_with("RUSTFLAGS") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("CARGO", "/usr/bin/cargo")
        .env("RUSTC", "/usr/bin/rustc")
        // aya-ebpf needs `asm_experimental_arch`; scoped to this check only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", "/usr/bin:/bin");
    run::status(&mut cmd)
}

fn fuzz(seconds: u64, mut targets: Vec<String>) -> anyhow::Result<()> {
    setup::ensure_cargo_fuzz()?;
    let root = workspace_root();
    if targets.is_empty() {
        targets = fuzz::targets(&root)?;
    }
    fuzz::run(&root, &targets, seconds)
}

fn crd() -> anyhow::Result<()> {
    let step = Step::start("building shunt (with its eBPF object)");
    first_build_note();
    cargo(&["build", "--release", "--locked", "-p", "shunt"])?;
    step.done();
    let out = std::process::Command::new(release_bin("shunt"))
        .arg("crd")
        .output()
        .context("running `shunt crd`")?;
    anyhow::ensure!(
        out.status.success(),
        "`shunt crd` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = workspace_root().join("deploy/crd.yaml");
    std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    run::require_root("the demo creates network namespaces, a cgroup and BPF programs")?;
    build()?;
    let status = std::process::Command::new(release_bin("shunt-demo"))
        .env("SHUNT_BIN", release_bin("shunt"))
        .env("SHUNT_PROBE_BIN", release_bin("shunt-probe"))
        .status()
        .context("starting the demo")?;
    anyhow::ensure!(
        status.success(),
        "the demo failed ({status}); its output above says where"
    );
    Ok(())
}

/// Where runs write what they measured: under `target/`, so running them leaves the checkout
/// as it was. `--publish` copies a run's files into `bench/results/`, which git tracks.
const RESULTS: &str = "bench/results";

/// Copies `files` from `from` into [`RESULTS`].
fn publish_results(from: &Path, files: &[&str]) -> anyhow::Result<()> {
    let to = workspace_root().join(RESULTS);
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for file in files {
        std::fs::copy(from.join(file), to.join(file))
            .with_context(|| format!("copying {file} into {RESULTS}/"))?;
        println!("published {RESULTS}/{file}");
    }
    Ok(())
}

/// Runs the built `shunt-soak` for `seconds` of traffic; its report goes to `target/soak/`,
/// and with `publish` (only if it passed) to `bench/results/` as well.
fn soak(seconds: f64, publish: bool) -> anyhow::Result<()> {
    let out = workspace_root().join("target/soak");
    let mut cmd = std::process::Command::new(release_bin("shunt-soak"));
    cmd.env("SHUNT_BIN", release_bin("shunt"))
        .env("SHUNT_PROBE_BIN", release_bin("shunt-probe"))
        .env("SHUNT_GREETER_BIN", release_bin("shunt-greeter"))
        .arg("--seconds")
        .arg(seconds.to_string())
        .arg("--out")
        .arg(&out);
    run::status(&mut cmd)?;
    if publish {
        publish_results(&out, &["soak.json"])?;
    }
    Ok(())
}

/// Runs the built `shunt-bench`; its results and charts go to `target/bench/`, and with
/// `publish` to `bench/results/` as well.
fn bench(quick: bool, peers: bool, publish: bool) -> anyhow::Result<()> {
    run::require_root("the benchmarks create network namespaces, a cgroup and BPF programs")?;
    build()?;
    let out = workspace_root().join("target/bench");
    let mut cmd = std::process::Command::new(release_bin("shunt-bench"));
    cmd.env("SHUNT_BIN", release_bin("shunt"))
        .env("SHUNT_PROBE_BIN", release_bin("shunt-probe"))
        .env("SHUNT_GREETER_BIN", release_bin("shunt-greeter"))
        .arg("--out")
        .arg(&out);
    if quick {
        cmd.arg("--quick");
    }
    if peers {
        cmd.arg("--peers");
    }
    run::status(&mut cmd)?;
    if publish {
        let mut files = vec!["results.json".to_string(), "results.md".to_string()];
        files.extend(charts(&out)?);
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        publish_results(&out, &files)?;
    }
    Ok(())
}

/// The charts (`*.svg`) the benchmark left in `dir`: it writes those of the sections it ran
/// and removes the others, so they match `results.json`.
fn charts(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        if let Some(name) = name.to_str().filter(|n| n.ends_with(".svg")) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}
