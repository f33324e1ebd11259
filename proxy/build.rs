//! Builds the kernel programs (`ebpf/shunt-ebpf`) and embeds the object in the `shunt` binary,
//! so `target/release/shunt` is self-contained.
//!
//! The eBPF crate needs a compiler with a prebuilt `core` for `bpfel-unknown-none` (Debian's
//! `rustc-web` + `libstd-rust-web-dev-bpf`) and `bpf-linker`; `cargo xtask setup` installs both.
//! We call Debian's cargo and rustc explicitly so that rustup's toolchain (which lacks that
//! `core`) is never picked up, and give the eBPF build its own target directory so it does not
//! wait on the lock of the build that runs us.
//!
//! `SHUNT_SKIP_EBPF_BUILD=1` skips all of that and embeds an empty object (as aya-build's
//! `AYA_BUILD_SKIP` does), so the unit tests and clippy run on a machine without the eBPF
//! toolchain; a daemon built so refuses to start and says why.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";
/// Set (and not `0`): embed no eBPF object.
const SKIP: &str = "SHUNT_SKIP_EBPF_BUILD";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../ebpf/shunt-ebpf");
    let common_dir = manifest_dir.join("../ebpf/shunt-common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.lock").display()
    );
    for var in ["SHUNT_BPF_CARGO", "SHUNT_BPF_RUSTC", SKIP] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let embedded = out_dir.join("shunt.bpf.o");
    if env::var(SKIP).is_ok_and(|v| !v.is_empty() && v != "0") {
        println!(
            "cargo:warning={SKIP} is set: no eBPF programs embedded; `shunt run` will refuse to start"
        );
        std::fs::write(&embedded, b"")
            .unwrap_or_else(|e| fail(&format!("writing {}: {e}", embedded.display())));
        return;
    }
    let target_dir = out_dir.join("ebpf-target");
    let cargo = env::var("SHUNT_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = env::var("SHUNT_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    for tool in [&cargo, &rustc] {
        if !Path::new(tool).exists() {
            fail(&format!("{tool} not found"));
        }
    }

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // Our own build's settings must not leak into a build for another target and compiler.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("RUSTC", &rustc)
        // aya-ebpf needs `asm_experimental_arch`; scoped to this child build only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .env("PATH", path_with_cargo_bin());

    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("running {cargo}: {e}")));
    if !status.success() {
        fail(&format!("building the eBPF programs failed ({status})"));
    }
    let object = target_dir.join(TARGET).join("release").join("shunt");
    std::fs::copy(&object, &embedded)
        .unwrap_or_else(|e| fail(&format!("copying {}: {e}", object.display())));
}

/// `bpf-linker` is installed by `cargo install` into `$CARGO_HOME/bin`, which may be missing
/// from `PATH` in non-interactive shells.
fn path_with_cargo_bin() -> std::ffi::OsString {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut paths: Vec<PathBuf> = cargo_home.map(|h| h.join("bin")).into_iter().collect();
    if let Some(path) = env::var_os("PATH") {
        paths.extend(env::split_paths(&path));
    }
    env::join_paths(paths).unwrap_or_default()
}

fn fail(msg: &str) -> ! {
    panic!(
        "{msg}\nThe eBPF toolchain is missing or broken: run `cargo xtask setup` (as root) first."
    );
}
