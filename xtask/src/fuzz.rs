//! `cargo xtask fuzz`: every libFuzzer target in `fuzz/` for a bounded time, starting from its
//! committed corpus (`fuzz/corpus/<target>/`).
//!
//! `cargo fuzz` runs on the stable toolchain with `--sanitizer none`: the code under test is
//! safe Rust, so what the fuzzer looks for is panics, failed checks, hangs and runaway memory,
//! none of which needs a sanitizer. Inputs it discovers go to `target/fuzz-corpus/`, so a run
//! leaves the repository clean.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::run::{self, Step};

/// Every target, from `fuzz/fuzz_targets/*.rs`.
pub fn targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some(name.strip_suffix(".rs")?.to_owned())
        })
        .collect();
    targets.sort();
    Ok(targets)
}

/// Runs each of `targets` for `seconds`; fails on the first crash, naming the input.
pub fn run(root: &Path, targets: &[String], seconds: u64) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let step = Step::start("building the fuzz targets");
    // The targets never load the kernel programs: an empty object is embedded instead.
    run::status(
        std::process::Command::new(&cargo)
            .current_dir(root)
            .env("SHUNT_SKIP_EBPF_BUILD", "1")
            .args(["fuzz", "build", "--sanitizer", "none", "--fuzz-dir", "fuzz"]),
    )?;
    step.done();
    for target in targets {
        let found = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        let seeds: PathBuf = root.join("fuzz/corpus").join(target);
        let step = Step::start(format!("fuzzing {target} for {seconds}s"));
        let status = std::process::Command::new(&cargo)
            .current_dir(root)
            .env("SHUNT_SKIP_EBPF_BUILD", "1")
            .args(["fuzz", "run", "--sanitizer", "none", "--fuzz-dir", "fuzz"])
            .arg(target)
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A single input slower than this, or a process larger, is a finding too.
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .status()
            .with_context(|| format!("running cargo fuzz for {target}"))?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed: the input is in fuzz/artifacts/{target}/. \
                 Reproduce with `cargo fuzz run --sanitizer none --fuzz-dir fuzz {target} <input>`, \
                 fix the code, and add the input to fuzz/regressions/{target}/ so \
                 proxy/tests/fuzz_inputs.rs keeps checking it"
            );
        }
        step.done();
    }
    Ok(())
}
