//! The DaemonSet's pod as a container runtime runs it: a pod template of `deploy/` translated
//! field for field into `podman run`, so the tests run the daemon inside a container with its
//! own root filesystem, seeing the host only through the manifest's `hostPath` mounts,
//! `hostPID`, `hostNetwork` and environment.
//!
//! Every field of the pod template is either translated or named here as deliberately left
//! out (`serde(deny_unknown_fields)`): a field added to the manifest fails the translation
//! until this module says what it means in a container, so the tests cannot silently drift
//! from what a node runs.
//!
//! What only this machine needs is handled here, not in the product: podman runs with `runc`
//! (the default `crun` refuses hybrid cgroup layouts), and with `nofile`/`nproc` limits
//! within the hard limits root has here (it lacks `CAP_SYS_RESOURCE`).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use serde::{Deserialize, de::IgnoredAny};

/// The image the container tests run: `$SHUNT_IMAGE`, else the one `cargo xtask test` builds
/// from the release binaries (`cargo xtask image --prebuilt`).
pub fn shunt_image() -> String {
    std::env::var("SHUNT_IMAGE").unwrap_or_else(|_| "localhost/shunt:dev".to_owned())
}

/// A file of `deploy/`, from the workspace root.
pub fn deploy_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

/// Whether podman and the image are there; the error says how to get them.
pub fn require_image(image: &str) -> anyhow::Result<()> {
    let out = Command::new("podman")
        .args(["image", "exists", image])
        .output()
        .context("running podman: install it with `cargo xtask setup`")?;
    if !out.status.success() {
        bail!(
            "no image {image}: build it with `cargo xtask image --prebuilt` (after `cargo build \
             --release --workspace --bins`), or set $SHUNT_IMAGE"
        );
    }
    Ok(())
}

/// The daemon's configuration as `deploy/configmap.yaml` ships it (`data.config.yaml`).
pub fn configmap_config() -> anyhow::Result<shunt::config::Config> {
    let path = deploy_file("configmap.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let map: serde_json::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not YAML", path.display()))?;
    let config = map["data"]["config.yaml"]
        .as_str()
        .with_context(|| format!("{} has no data.config.yaml", path.display()))?;
    shunt::config::Config::parse(config)
        .map_err(|(field, error)| anyhow::anyhow!("{}: {field}: {error}", path.display()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSet {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    #[serde(rename = "metadata")]
    _metadata: IgnoredAny,
    spec: DaemonSetSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DaemonSetSpec {
    #[serde(rename = "selector")]
    _selector: IgnoredAny,
    /// How an upgrade replaces the pod: read by the upgrade test, not by `podman run`.
    #[serde(default)]
    update_strategy: Option<serde_json::Value>,
    template: Template,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Template {
    #[serde(rename = "metadata")]
    _metadata: IgnoredAny,
    spec: PodTemplate,
}

/// A pod template's spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodTemplate {
    /// API access comes from the test's API server (a kubeconfig in the config volume).
    #[serde(default, rename = "serviceAccountName")]
    _service_account: IgnoredAny,
    #[serde(default)]
    host_network: bool,
    #[serde(default, rename = "hostPID")]
    host_pid: bool,
    /// Name resolution: the daemon resolves no names (it is given addresses).
    #[serde(default, rename = "dnsPolicy")]
    _dns_policy: IgnoredAny,
    /// Scheduling only.
    #[serde(default, rename = "priorityClassName")]
    _priority_class: IgnoredAny,
    #[serde(default, rename = "tolerations")]
    _tolerations: IgnoredAny,
    #[serde(default = "default_grace")]
    termination_grace_period_seconds: u64,
    #[serde(default)]
    init_containers: Vec<ContainerSpec>,
    containers: Vec<ContainerSpec>,
    volumes: Vec<Volume>,
}

fn default_grace() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerSpec {
    pub name: String,
    /// Replaced by the image under test.
    #[serde(rename = "image")]
    _image: IgnoredAny,
    #[serde(default, rename = "imagePullPolicy")]
    _pull_policy: IgnoredAny,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    security_context: SecurityContext,
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    /// Requests and limits: this machine's hybrid cgroup layout gives podman v1 controllers
    /// only, where a node's kubelet uses v2; the tests measure no resource use.
    #[serde(default, rename = "resources")]
    _resources: IgnoredAny,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvVar {
    name: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    value_from: Option<EnvSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvSource {
    field_ref: FieldRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FieldRef {
    field_path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityContext {
    #[serde(default)]
    privileged: bool,
}

/// An HTTP probe (`httpGet`); the kubelet counts 200–399 as success.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    pub http_get: HttpGet,
    #[serde(default)]
    pub initial_delay_seconds: u64,
    #[serde(default)]
    pub period_seconds: Option<u64>,
    #[serde(default)]
    pub failure_threshold: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGet {
    pub host: String,
    pub path: String,
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: PathBuf,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    mount_propagation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Volume {
    name: String,
    #[serde(default)]
    config_map: Option<serde_json::Value>,
    #[serde(default)]
    host_path: Option<HostPath>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostPath {
    path: PathBuf,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// A DaemonSet of `deploy/`, read for running its pod in podman.
#[derive(Debug)]
pub struct Manifest {
    pub pod: PodTemplate,
    /// `spec.updateStrategy`, as written.
    pub update_strategy: Option<serde_json::Value>,
}

impl Manifest {
    /// Reads `deploy/<name>`; the error names a field the translation does not know.
    pub fn read(name: &str) -> anyhow::Result<Manifest> {
        let path = deploy_file(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let set: DaemonSet = serde_path_to_error::deserialize(
            serde_yaml_ng::Deserializer::from_str(&text),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {} at {} (a field tests/src/container.rs does not translate to podman: \
                 say there what it means in a container)",
                path.display(),
                e.inner(),
                e.path()
            )
        })?;
        Ok(Manifest {
            pod: set.spec.template.spec,
            update_strategy: set.spec.update_strategy,
        })
    }

    /// The container named `name` (an init container or a regular one).
    pub fn container(&self, name: &str) -> anyhow::Result<&ContainerSpec> {
        self.pod
            .init_containers
            .iter()
            .chain(&self.pod.containers)
            .find(|c| c.name == name)
            .with_context(|| format!("no container {name} in the pod template"))
    }

    /// The pod's grace period between SIGTERM and SIGKILL.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.pod.termination_grace_period_seconds)
    }

    /// What `path` inside container `name` is on the host, given where each volume lives on
    /// the host (`hosts`, by volume name, for ConfigMaps and for host paths moved per test).
    pub fn host_path(
        &self,
        container: &ContainerSpec,
        hosts: &BTreeMap<String, PathBuf>,
        inside: &Path,
    ) -> Option<PathBuf> {
        self.mounts(container, hosts)
            .ok()?
            .into_iter()
            .find_map(|m| {
                let rest = inside.strip_prefix(&m.inside).ok()?;
                Some(m.host.join(rest))
            })
    }

    /// What the host's `path` is inside container `name`, through its mounts.
    pub fn inside_path(
        &self,
        container: &ContainerSpec,
        hosts: &BTreeMap<String, PathBuf>,
        host: &Path,
    ) -> anyhow::Result<PathBuf> {
        let mounts = self.mounts(container, hosts)?;
        // The longest host path that holds `host` wins, as the deepest mount would.
        mounts
            .iter()
            .filter_map(|m| Some((m, host.strip_prefix(&m.host).ok()?)))
            .max_by_key(|(m, _)| m.host.as_os_str().len())
            .map(|(m, rest)| m.inside.join(rest))
            .with_context(|| {
                format!(
                    "{} is not visible in container {}",
                    host.display(),
                    container.name
                )
            })
    }

    fn mounts(
        &self,
        container: &ContainerSpec,
        hosts: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<Vec<Mount>> {
        container
            .volume_mounts
            .iter()
            .map(|mount| {
                let volume = self
                    .pod
                    .volumes
                    .iter()
                    .find(|v| v.name == mount.name)
                    .with_context(|| format!("volume {} is mounted but not defined", mount.name))?;
                let host = match (
                    &volume.host_path,
                    &volume.config_map,
                    hosts.get(&volume.name),
                ) {
                    (_, _, Some(moved)) => moved.clone(),
                    (Some(host_path), _, None) => host_path.path.clone(),
                    (None, _, None) => bail!(
                        "volume {} (a ConfigMap) needs a host directory holding its files",
                        volume.name
                    ),
                };
                let kind = volume.host_path.as_ref().and_then(|h| h.kind.as_deref());
                Ok(Mount {
                    host,
                    inside: mount.mount_path.clone(),
                    read_only: mount.read_only,
                    create: kind == Some("DirectoryOrCreate"),
                    propagation: mount.mount_propagation.clone(),
                })
            })
            .collect()
    }

    /// `podman run` for container `name` of the pod as image `image`: everything the
    /// manifest says, with the node name the downward API would give.
    pub fn podman_run(&self, run: &PodmanRun<'_>) -> anyhow::Result<Command> {
        let container = self.container(run.container)?;
        let mut cmd = Command::new("podman");
        cmd.args(["--runtime", "runc", "run", "--rm", "--name", run.name]);
        let (nofile, nproc) = ulimits();
        cmd.arg(format!("--ulimit=nofile={nofile}:{nofile}"))
            .arg(format!("--ulimit=nproc={nproc}:{nproc}"));
        if let Some(parent) = run.cgroup_parent {
            cmd.arg(format!("--cgroup-parent={parent}"));
        }
        if container.security_context.privileged {
            // As containerd and CRI-O run a privileged container: every capability and
            // device, and the host's cgroup namespace.
            cmd.args(["--privileged", "--cgroupns=host"]);
        }
        if self.pod.host_network {
            cmd.arg("--network=host");
        }
        if self.pod.host_pid {
            cmd.arg("--pid=host");
        }
        cmd.arg(format!(
            "--stop-timeout={}",
            self.pod.termination_grace_period_seconds
        ));
        for env in &container.env {
            let value = match (&env.value, &env.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(from)) if from.field_ref.field_path == "spec.nodeName" => {
                    run.node.to_owned()
                }
                (None, Some(from)) => bail!(
                    "env {}: field {} of the downward API is not translated",
                    env.name,
                    from.field_ref.field_path
                ),
                (None, None) => String::new(),
            };
            let value = run
                .env
                .iter()
                .find(|(name, _)| *name == env.name)
                .map_or(value, |(_, v)| (*v).to_owned());
            cmd.arg("--env").arg(format!("{}={value}", env.name));
        }
        for mount in self.mounts(container, run.hosts)? {
            if mount.create {
                std::fs::create_dir_all(&mount.host)
                    .with_context(|| format!("creating {}", mount.host.display()))?;
            }
            let mut options = vec![if mount.read_only { "ro" } else { "rw" }];
            // Bidirectional: mounts made inside (bpffs pins) reach the host, as the kubelet's
            // rshared bind does.
            if mount.propagation.as_deref() == Some("Bidirectional") {
                options.push("rshared");
            }
            let mut spec = OsString::from(&mount.host);
            spec.push(":");
            spec.push(&mount.inside);
            spec.push(":");
            spec.push(options.join(","));
            cmd.arg("--volume").arg(spec);
        }
        match &container.command {
            Some(command) => {
                let (entrypoint, rest) = command.split_first().context("an empty command")?;
                cmd.arg(format!("--entrypoint={entrypoint}"))
                    .arg(run.image)
                    .args(rest);
            }
            None => {
                cmd.arg(run.image);
            }
        }
        cmd.args(&container.args);
        Ok(cmd)
    }
}

struct Mount {
    host: PathBuf,
    inside: PathBuf,
    read_only: bool,
    create: bool,
    propagation: Option<String>,
}

/// One `podman run` of a pod template's container.
pub struct PodmanRun<'a> {
    /// The container of the pod template.
    pub container: &'a str,
    /// The container's name in podman: unique per test.
    pub name: &'a str,
    pub image: &'a str,
    /// What the downward API's `spec.nodeName` gives.
    pub node: &'a str,
    /// Host directories standing in for volumes, by volume name: ConfigMaps, and host paths
    /// a test moves to a directory of its own (e.g. `/run/shunt`).
    pub hosts: &'a BTreeMap<String, PathBuf>,
    /// Environment values replacing the manifest's (e.g. a more verbose log).
    pub env: &'a [(&'a str, &'a str)],
    /// The cgroup the container's cgroup is made under (the test's attached cgroup, as a
    /// node's containers are under the root shunt attaches to).
    pub cgroup_parent: Option<&'a str>,
}

/// `nofile` and `nproc` for containers: podman's defaults exceed what root may set here.
fn ulimits() -> (u64, u64) {
    let nofile = crate::sys::open_file_hard_limit().map_or(4096, |n| n.min(1 << 20));
    (nofile, 4096)
}

/// `podman inspect` field `format` of container `name` (e.g. `{{.State.Pid}}`).
pub fn inspect(name: &str, format: &str) -> anyhow::Result<String> {
    let out = Command::new("podman")
        .args(["inspect", "--type", "container", "--format", format, name])
        .output()
        .context("running podman inspect")?;
    if !out.status.success() {
        bail!(
            "podman inspect {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The container's main process as the host sees it, once it runs.
pub fn host_pid(name: &str) -> anyhow::Result<u32> {
    let pid: u32 = inspect(name, "{{.State.Pid}}")?
        .parse()
        .context("podman inspect printed no pid")?;
    anyhow::ensure!(pid != 0, "container {name} is not running");
    Ok(pid)
}

/// An image made from `image` with one more label, tagged `<image>-<suffix>`: a newer
/// image for an update, whose ID differs. Returns its name.
pub fn derived_image(image: &str, suffix: &str) -> anyhow::Result<String> {
    require_image(image)?;
    let name = format!("{image}-{suffix}");
    let dir = std::env::temp_dir().join(format!("shunt-image-{}-{suffix}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("Containerfile"),
        format!("FROM {image}\nLABEL io.shunt.test.derived={suffix}\n"),
    )?;
    let out = podman(
        &["build", "--quiet", "--tag", &name, &dir.to_string_lossy()],
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        bail!(
            "podman build {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(name)
}

/// `podman ARGS…` to completion, killed after `timeout`; its output, whatever the status.
pub fn podman(args: &[&str], timeout: Duration) -> anyhow::Result<std::process::Output> {
    let child = Command::new("podman")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting podman")?;
    crate::sandbox::wait_with_timeout(child, timeout)
}

/// Removes the cgroups podman made under `parent` in each cgroup v1 hierarchy (the sandbox
/// removes its own v2 cgroup); deepest first, as cgroups are removed.
pub fn remove_v1_cgroups(parent: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let v2 = crate::sandbox::cgroup2_mount().ok();
    for hierarchy in hierarchies.flatten() {
        if v2.as_deref() == Some(hierarchy.path().as_path()) {
            continue;
        }
        let root = hierarchy.path().join(parent.trim_start_matches('/'));
        let mut dirs = Vec::new();
        collect_dirs(&root, &mut dirs);
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_owned());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_the_daemonsets_is_translated_or_named_as_left_out() {
        for name in ["daemonset.yaml", "uninstall/daemonset.yaml"] {
            Manifest::read(name).unwrap();
        }
    }

    #[test]
    fn the_probes_ask_the_health_listener_the_configmap_sets() {
        let manifest = Manifest::read("daemonset.yaml").unwrap();
        let shunt = manifest.container("shunt").unwrap();
        let config = configmap_config().unwrap();
        let shunt::config::Listen::On(health) = config.telemetry.health else {
            panic!("the ConfigMap turns the health listener off");
        };
        for probe in [&shunt.readiness_probe, &shunt.liveness_probe] {
            let get = &probe.as_ref().unwrap().http_get;
            assert_eq!(
                (get.host.as_str(), get.port),
                (&*health.ip().to_string(), health.port())
            );
        }
    }

    #[test]
    fn paths_map_through_the_deepest_mount() {
        let manifest = Manifest::read("daemonset.yaml").unwrap();
        let shunt = manifest.container("shunt").unwrap();
        let mut hosts = BTreeMap::new();
        hosts.insert("config".to_owned(), PathBuf::from("/tmp/x/etc"));
        hosts.insert("run".to_owned(), PathBuf::from("/tmp/x/run"));
        let inside = |p: &str| manifest.inside_path(shunt, &hosts, Path::new(p)).unwrap();
        assert_eq!(
            inside("/sys/fs/cgroup/unified/a"),
            Path::new("/host/sys/fs/cgroup/unified/a")
        );
        assert_eq!(
            inside("/tmp/x/run/admin.sock"),
            Path::new("/run/shunt/admin.sock")
        );
        assert_eq!(inside("/sys/fs/bpf/p"), Path::new("/sys/fs/bpf/p"));
        assert!(
            manifest
                .inside_path(shunt, &hosts, Path::new("/etc"))
                .is_err()
        );
        assert_eq!(
            manifest.host_path(shunt, &hosts, Path::new("/etc/shunt/config.yaml")),
            Some(PathBuf::from("/tmp/x/etc/config.yaml"))
        );
    }
}
