//! `cargo xtask image`: shunt's container images (`deploy/Dockerfile`), built with podman
//! from Debian's packages alone: no container registry is needed.
//!
//! The Dockerfile starts from a Debian 12 image; here that is a local one,
//! `localhost/shunt-debian:bookworm`, made once by `mmdebstrap` from Debian's archive and
//! imported into podman (about 20 s), then reused. Two images are built from it:
//! `localhost/shunt:TAG` (the DaemonSet's) and `localhost/shunt-greeter:TAG`
//! (deploy/example's).
//!
//! By default the binaries are compiled inside a build of the Dockerfile's `binaries` stage
//! (about 15 minutes on 2 cores from nothing; cache mounts keep the crates and `target/` for
//! the next), tagged `localhost/shunt-binaries:TAG`, and both images take them from that
//! image. With `--prebuilt` they are this checkout's `target/release` binaries instead,
//! stripped into `target/images/prebuilt`, which is all the build is given of them: seconds,
//! which is how `cargo xtask test` makes the images its container tests run (`dev`).
//!
//! What only this machine needs stays here, not in the Dockerfile: podman runs with `runc`
//! (its default `crun` refuses a hybrid cgroup layout), the build's network is the host's
//! (apt and crates.io), and cargo inside the build trusts the host's CA bundle, which may hold
//! the CA of a TLS proxy between this machine and crates.io.

use std::{path::Path, process::Command};

use anyhow::{Context, bail};

use crate::{
    run::{self, Step},
    setup::{self, Apt},
};

/// The local Debian base image the Dockerfile's `DEBIAN_IMAGE` is set to.
pub const BASE_IMAGE: &str = "localhost/shunt-debian:bookworm";

/// The Debian release of [`BASE_IMAGE`]: the one this machine runs, whose glibc the prebuilt
/// binaries are linked against.
const SUITE: &str = "bookworm";

/// The tag `--prebuilt` gives when none is asked for; the container tests run it.
pub const PREBUILT_TAG: &str = "dev";

/// Each image: the Dockerfile's stage, and the image's name.
const IMAGES: &[(&str, &str)] = &[
    ("shunt", "localhost/shunt"),
    ("greeter", "localhost/shunt-greeter"),
];

/// The image a source build compiles the binaries into (the Dockerfile's `binaries` stage),
/// which the two images then take them from. Kept: the next build's layer cache starts from
/// it.
const BINARIES_IMAGE: &str = "localhost/shunt-binaries";

/// The binaries the images hold, as `target/release` names them.
const BINARIES: &[&str] = &["shunt", "shunt-greeter"];

/// The CA bundle this machine's cargo trusts (Debian's `ca-certificates`, plus any local CA
/// `update-ca-certificates` added).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the base's tarball and the staged prebuilt binaries go, under the workspace root.
const DIR: &str = "target/images";

pub struct Options {
    /// Use `target/release`'s binaries instead of compiling them in the build.
    pub prebuilt: bool,
    /// The images' tag; default [`PREBUILT_TAG`] with `prebuilt`, else the workspace version.
    pub tag: Option<String>,
}

/// The images `options` builds, e.g. `localhost/shunt:dev`.
pub fn names(options: &Options) -> Vec<String> {
    let tag = tag(options);
    IMAGES
        .iter()
        .map(|(_, name)| format!("{name}:{tag}"))
        .collect()
}

fn tag(options: &Options) -> String {
    match (&options.tag, options.prebuilt) {
        (Some(tag), _) => tag.clone(),
        (None, true) => PREBUILT_TAG.to_owned(),
        (None, false) => env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Builds the images (the prebuilt binaries must be there: `cargo xtask image` builds them
/// first, `cargo xtask test` has).
pub fn build(options: &Options) -> anyhow::Result<()> {
    run::require_root(
        "the images go to root's podman storage, where the tests (run as root) find them",
    )?;
    setup::containers(&mut Apt::default())?;
    let root = crate::workspace_root();
    let dir = root.join(DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    ensure_base(&dir)?;

    let tag = tag(options);
    // Where the images' binaries come from, as the Dockerfile's `binaries` build context.
    let binaries = match options.prebuilt {
        true => stage_prebuilt(&root, &dir.join("prebuilt"))?
            .display()
            .to_string(),
        false => compile(&root, &format!("{BINARIES_IMAGE}:{tag}"))?,
    };
    for (stage, name) in IMAGES {
        let image = format!("{name}:{tag}");
        let step = Step::start(format!("building {image}"));
        let mut cmd = podman_build(&root);
        cmd.arg("--build-context")
            .arg(format!("binaries={binaries}"))
            .args(["--target", stage, "-t", &image, "."]);
        run::status(&mut cmd).with_context(|| {
            format!("building {image} failed; podman's output above says at which step")
        })?;
        step.done();
    }
    for (_, name) in IMAGES {
        let image = format!("{name}:{tag}");
        let size = run::output(
            "podman",
            &["image", "inspect", "--format", "{{.Size}}", &image],
        )
        .and_then(|s| s.trim().parse::<u64>().ok())
        .with_context(|| format!("reading the size of {image}"))?;
        println!("    {image}: {:.1} MB", size as f64 / 1e6);
    }
    Ok(())
}

/// Compiles the binaries inside a build (the Dockerfile's `binaries` stage) into `image`, and
/// returns it as a build context for the images. Both images take it so, rather than each
/// compiling in its own build: a source tree that changes between the two (an editor, another
/// build) would have them compile twice and hold different binaries.
fn compile(root: &Path, image: &str) -> anyhow::Result<String> {
    let step = Step::start(format!(
        "compiling shunt and shunt-greeter inside a build ({image})"
    ));
    println!(
        "    from nothing: about 15 minutes on 2 cores (Debian's compiler, bpf-linker, then \
         shunt in release mode); later builds reuse the cached crates and target/"
    );
    let mut cmd = podman_build(root);
    // The host's CA bundle for cargo inside the build: the one this machine's own cargo
    // trusts, which may hold a TLS proxy's CA that Debian's bundle lacks.
    if Path::new(HOST_CA_BUNDLE).exists() {
        cmd.arg("--secret")
            .arg(format!("id=ca-certificates,src={HOST_CA_BUNDLE}"));
    }
    cmd.args(["--target", "binaries", "-t", image, "."]);
    run::status(&mut cmd).context(
        "compiling inside the build failed; podman's output above says at which step (apt \
         needs deb.debian.org, cargo crates.io)",
    )?;
    step.done();
    Ok(format!("container-image://{image}"))
}

/// `podman build` of deploy/Dockerfile from the workspace root, on [`BASE_IMAGE`], with the
/// host's network (apt, crates.io).
fn podman_build(root: &Path) -> Command {
    let mut cmd = podman();
    cmd.current_dir(root)
        .args(["build", "--network", "host", "-f", "deploy/Dockerfile"])
        .arg("--build-arg")
        .arg(format!("DEBIAN_IMAGE={BASE_IMAGE}"));
    cmd
}

/// `podman`, with `runc` as the runtime of whatever it runs (the build's RUN steps too).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc"]);
    cmd
}

/// Makes [`BASE_IMAGE`] unless podman has it: a minimal Debian (`mmdebstrap --variant=minbase`,
/// about 20 s) in a tarball under `dir`, imported into podman. The tarball is kept, so a podman
/// storage that lost the image re-imports it in seconds.
fn ensure_base(dir: &Path) -> anyhow::Result<()> {
    let exists = podman()
        .args(["image", "exists", BASE_IMAGE])
        .status()
        .context("could not start podman; `cargo xtask setup` installs it")?;
    if exists.success() {
        return Ok(());
    }
    let tarball = dir.join(format!("debian-{SUITE}.tar"));
    if !tarball.exists() {
        let step = Step::start(format!(
            "making a minimal Debian {SUITE} with mmdebstrap ({DIR}/debian-{SUITE}.tar, \
             about 20 s, once)"
        ));
        // Written aside and renamed, so an interrupted run leaves no half tarball behind.
        let partial = dir.join(format!("debian-{SUITE}.tar.partial"));
        run::status(
            Command::new("mmdebstrap")
                .args(["--quiet", "--variant=minbase", "--format=tar", SUITE])
                .arg(&partial),
        )
        .context("mmdebstrap failed; it needs deb.debian.org (or the mirror in /etc/apt)")?;
        std::fs::rename(&partial, &tarball)
            .with_context(|| format!("renaming {}", partial.display()))?;
        step.done();
    }
    let step = Step::start(format!("importing it into podman as {BASE_IMAGE}"));
    run::status(
        podman()
            .arg("import")
            .args([
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ])
            .args(["--change", "CMD [\"/bin/bash\"]"])
            .arg(&tarball)
            .arg(BASE_IMAGE),
    )
    .with_context(|| {
        format!(
            "importing {} failed; delete it to make it afresh",
            tarball.display()
        )
    })?;
    step.done();
    Ok(())
}

/// Copies `target/release`'s binaries, stripped of their debug information (the release
/// profile keeps line tables: 150 MB become 27), into `staging`: the small build context the
/// Dockerfile's `binaries` stage is replaced by.
fn stage_prebuilt(root: &Path, staging: &Path) -> anyhow::Result<std::path::PathBuf> {
    let release = root.join("target/release");
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !release.join(b).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "target/release lacks {}: run `cargo build --release --workspace --bins` (or \
             `cargo xtask build`) first, or build without --prebuilt",
            missing.join(" and ")
        );
    }
    std::fs::create_dir_all(staging).with_context(|| format!("creating {}", staging.display()))?;
    for bin in BINARIES {
        run::status(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(staging.join(bin))
                .arg(release.join(bin)),
        )
        .context("stripping the binaries failed; is binutils installed?")?;
    }
    Ok(staging.to_owned())
}
