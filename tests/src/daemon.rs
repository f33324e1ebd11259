//! `shunt run` inside a sandbox, with its own pins, admin socket and cgroup attachment, so
//! any number of daemons can run side by side on one machine.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use shunt::{
    admin::api::{ConnRecord, Stats, Status},
    config::{AccessLog, Config, Listen, PodConfig},
};

use crate::{
    container::{self, Manifest, PodmanRun},
    fixture,
    sandbox::{Pod, Sandbox},
};

/// What differs between test daemons; everything else is per-sandbox.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The daemon's configuration. What each sandbox sets itself is filled in when it is
    /// written: the cgroup, pin directory, pods, admin socket, telemetry listeners and access
    /// log (see [`Daemon::config_text`]).
    pub config: Config,
    /// Run in Kubernetes mode (`--kubernetes`); its settings go in `config.kubernetes`.
    pub kubernetes: bool,
    /// `SHUNT_LOG` for the daemon; tests default to `debug` (their failures print the log),
    /// benchmarks use `info` as a production node would.
    pub log: Option<&'static str>,
    /// Write the access log to [`Daemon::access_log`] (off by default, as in production).
    pub access_log: bool,
    /// Attach to this cgroup instead of the sandbox's.
    pub cgroup: Option<PathBuf>,
    /// Run as the DaemonSet's container (`deploy/daemonset.yaml`) in podman, instead of as
    /// a process of the host.
    pub daemonset: Option<AsDaemonSet>,
}

/// What running as the DaemonSet's container takes besides the manifest.
#[derive(Debug, Clone)]
pub struct AsDaemonSet {
    pub image: String,
    /// The node the pod is scheduled on (the downward API's `spec.nodeName`).
    pub node: String,
}

impl Options {
    /// These options with `change` applied to the configuration.
    pub fn with_config(mut self, change: impl FnOnce(&mut Config)) -> Options {
        change(&mut self.config);
        self
    }
}

pub struct Daemon<'a> {
    sandbox: &'a Sandbox,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// Where the access log goes when [`Options::access_log`] is set.
    pub access_log: PathBuf,
    log_level: &'static str,
    kubernetes: bool,
    pid: Option<u32>,
    /// Whether dropping this daemon removes the pins: not once a successor has taken over.
    owns_pins: bool,
    /// How many daemons took over before this one (names its log).
    generation: u32,
    /// Set when the daemon runs as the DaemonSet's container.
    container: Option<InContainer>,
}

/// A daemon run as the DaemonSet's container: the pod template, and where its volumes are.
#[derive(Clone)]
struct InContainer {
    manifest: std::sync::Arc<Manifest>,
    image: String,
    node: String,
    /// The host directories standing in for the ConfigMap (`config`) and for `/run/shunt`
    /// (`run`), per sandbox.
    hosts: BTreeMap<String, PathBuf>,
    /// The cgroup (below each hierarchy's root) podman makes the container's in: the
    /// sandbox's, as a node's containers are below the root shunt attaches to.
    cgroup_parent: String,
}

/// The DaemonSet's container.
const CONTAINER: &str = "shunt";

impl InContainer {
    fn new(sandbox: &Sandbox, daemonset: &AsDaemonSet) -> anyhow::Result<InContainer> {
        let manifest = Manifest::read("daemonset.yaml")?;
        let hosts = BTreeMap::from([
            ("config".to_owned(), sandbox.scratch_dir("etc-shunt")?),
            ("run".to_owned(), sandbox.scratch_dir("run-shunt")?),
        ]);
        let cgroup = sandbox.cgroup();
        let below_root = cgroup
            .strip_prefix(crate::sandbox::cgroup2_mount()?)
            .with_context(|| format!("{} is not below the cgroup v2 root", cgroup.display()))?;
        Ok(InContainer {
            manifest: std::sync::Arc::new(manifest),
            image: daemonset.image.clone(),
            node: daemonset.node.clone(),
            hosts,
            cgroup_parent: format!("/{}", below_root.display()),
        })
    }

    fn spec(&self) -> anyhow::Result<&container::ContainerSpec> {
        self.manifest.container(CONTAINER)
    }

    /// The host file behind `inside`, a path in the container.
    fn host_path(&self, inside: &Path) -> anyhow::Result<PathBuf> {
        self.manifest
            .host_path(self.spec()?, &self.hosts, inside)
            .with_context(|| format!("{} is on no volume of the container", inside.display()))
    }

    fn inside(&self, host: &Path) -> anyhow::Result<PathBuf> {
        self.manifest.inside_path(self.spec()?, &self.hosts, host)
    }

    /// The path the container's `--config` argument names.
    fn config_arg(&self) -> anyhow::Result<PathBuf> {
        let args = &self.spec()?.args;
        let at = args
            .iter()
            .position(|a| a == "--config")
            .context("the DaemonSet's container has no --config argument")?;
        args.get(at + 1)
            .map(PathBuf::from)
            .context("--config without a path")
    }
}

impl<'a> Daemon<'a> {
    /// Writes a config enrolling `pods`, starts the daemon and waits until it answers.
    pub fn start(
        sandbox: &'a Sandbox,
        pods: &[&Pod],
        options: &Options,
    ) -> anyhow::Result<Daemon<'a>> {
        let mut daemon = Daemon::configure(sandbox, pods, options)?;
        daemon.launch()?;
        Ok(daemon)
    }

    /// Writes a config enrolling `pods` ([`Daemon::config`]) without starting a process: for
    /// a daemon run in the test's own process. Its pins are removed when this is dropped.
    pub fn configure(
        sandbox: &'a Sandbox,
        pods: &[&Pod],
        options: &Options,
    ) -> anyhow::Result<Daemon<'a>> {
        let dir = sandbox.scratch_dir("daemon")?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/shunt-sandbox-{}", sandbox.id()));
        sandbox.track_pin_dir(pin_dir.clone());
        let container = match &options.daemonset {
            Some(daemonset) => Some(InContainer::new(sandbox, daemonset)?),
            None => None,
        };
        // In a container: the files the ConfigMap and `/run/shunt` volumes hold.
        let (config, socket) = match &container {
            Some(c) => (
                c.host_path(&c.config_arg()?)?,
                c.host_path(&options.config.admin.socket)?,
            ),
            None => (dir.join("config.yaml"), dir.join("admin.sock")),
        };
        let daemon = Daemon {
            sandbox,
            config,
            socket,
            pin_dir,
            log: dir.join("shunt.log"),
            access_log: dir.join("access.log"),
            log_level: options.log.unwrap_or("debug"),
            kubernetes: options.kubernetes,
            pid: None,
            owns_pins: true,
            generation: 0,
            container,
        };
        std::fs::write(&daemon.config, daemon.config_text(pods, options)?)
            .context("writing the daemon's config")?;
        Ok(daemon)
    }

    /// The configuration file `options` make for this daemon enrolling `pods`, as written.
    pub fn config_text(&self, pods: &[&Pod], options: &Options) -> anyhow::Result<String> {
        let mut config = options.config.clone();
        let cgroup = options.cgroup.as_deref().unwrap_or(self.sandbox.cgroup());
        config.intercept.cgroup = Some(cgroup.to_owned());
        config.intercept.pin_dir = self.pin_dir.clone();
        config.pods = pods
            .iter()
            .map(|pod| PodConfig {
                name: pod.name.clone(),
                netns: pod.netns_path(),
            })
            .collect();
        config.admin.socket = self.socket.clone();
        // Port 0: daemons of tests running side by side never compete for 15020/15021.
        let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        config.telemetry.metrics = Listen::On(any_port);
        config.telemetry.health = Listen::On(any_port);
        config.telemetry.access_log = if options.access_log {
            AccessLog::File(self.access_log.clone())
        } else {
            AccessLog::Off
        };
        if let Some(container) = &self.container {
            // The same files, as the container sees them through its mounts.
            let inside = |path: &Path| container.inside(path);
            config.intercept.cgroup = Some(inside(cgroup)?);
            config.intercept.pin_dir = inside(&self.pin_dir)?;
            config.admin.socket = inside(&self.socket)?;
            if let Some(kubeconfig) = &config.kubernetes.kubeconfig {
                config.kubernetes.kubeconfig = Some(inside(kubeconfig)?);
            }
            if let AccessLog::File(path) = &config.telemetry.access_log {
                config.telemetry.access_log = AccessLog::File(inside(path)?);
            }
        }
        fixture::config_yaml(&config)
    }

    /// Where files the container reads from its config volume go (a kubeconfig, say).
    pub fn config_dir(&self) -> PathBuf {
        self.config
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_owned)
    }

    /// The podman container this daemon runs in, if it runs in one.
    pub fn container_name(&self) -> Option<String> {
        self.container
            .as_ref()
            .map(|_| format!("shunt-{}-{}", self.sandbox.id(), self.generation))
    }

    /// Replaces the config file (same pins, socket and cgroup), e.g. before `shunt reload`.
    pub fn rewrite_config(&self, pods: &[&Pod], options: &Options) -> anyhow::Result<()> {
        self.write_config_text(&self.config_text(pods, options)?)
    }

    /// Replaces the config file with `yaml` as it is: for configurations the daemon must
    /// refuse, which its types cannot express.
    pub fn write_config_text(&self, yaml: &str) -> anyhow::Result<()> {
        std::fs::write(&self.config, yaml).context("rewriting the config")
    }

    /// Recently closed connections (`shunt conns --closed -o json`).
    pub fn closed_conns(&self) -> anyhow::Result<Vec<ConnRecord>> {
        self.ctl_as(&["conns", "--closed"])
    }

    /// Starts a second `shunt run` with the same configuration while this one runs: it takes
    /// this one's work over. Returns once the new daemon answers on the admin socket; this
    /// one then drains and exits by itself ([`Daemon::wait_exit`]), leaving the pins to the
    /// new one.
    pub fn start_successor(&mut self) -> anyhow::Result<Daemon<'a>> {
        self.start_successor_from(None)
    }

    /// [`Daemon::start_successor`] from another image, when this daemon runs in a container:
    /// a DaemonSet's rolling update.
    pub fn start_successor_from(&mut self, image: Option<&str>) -> anyhow::Result<Daemon<'a>> {
        let generation = self.generation + 1;
        let mut container = self.container.clone();
        if let (Some(container), Some(image)) = (&mut container, image) {
            container.image = image.to_owned();
        }
        let mut next = Daemon {
            sandbox: self.sandbox,
            config: self.config.clone(),
            socket: self.socket.clone(),
            pin_dir: self.pin_dir.clone(),
            log: self.log.with_file_name(format!("shunt-{generation}.log")),
            access_log: self.access_log.clone(),
            log_level: self.log_level,
            kubernetes: self.kubernetes,
            pid: None,
            // Until it has taken over, the pins stay this one's.
            owns_pins: false,
            generation,
            container,
        };
        next.launch()?;
        next.owns_pins = true;
        self.owns_pins = false;
        Ok(next)
    }

    /// Starts (or restarts) the process with the same config and pins.
    pub fn launch(&mut self) -> anyhow::Result<()> {
        let pid = self.spawn_process()?;
        self.pid = Some(pid);
        fixture::until(
            "shunt answers on its admin socket",
            Duration::from_secs(15),
            || {
                // This process answering, not one it is taking over from.
                let answering = self
                    .status()
                    .is_ok_and(|status| self.daemon_pid().is_ok_and(|pid| status.pid == pid));
                if !answering && !self.sandbox.is_running(pid) {
                    return Err(fixture::give_up("shunt exited during start-up"));
                }
                Ok(answering)
            },
        )
        .with_context(|| format!("its log:\n{}", self.log_text()))
    }

    /// Starts `shunt run` with this config, its output appended to the log, without waiting.
    fn spawn_process(&self) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening the daemon's log")?;
        let mut cmd = match (&self.container, self.container_name()) {
            (Some(container), Some(name)) => container.manifest.podman_run(&PodmanRun {
                container: CONTAINER,
                name: &name,
                image: &container.image,
                node: &container.node,
                hosts: &container.hosts,
                env: &[("SHUNT_LOG", self.log_level)],
                cgroup_parent: Some(&container.cgroup_parent),
            })?,
            _ => {
                let mut cmd = Command::new(crate::shunt_bin());
                cmd.arg("run")
                    .arg("--config")
                    .arg(&self.config)
                    .args(self.kubernetes.then_some("--kubernetes"))
                    .env("SHUNT_LOG", self.log_level);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // In the sandbox cgroup, so its own upstream sockets meet the programs it attached.
        self.sandbox.spawn_in_host(cmd)
    }

    /// Starts a second `shunt run` with the same config while this one runs (an upgrade in
    /// place) and returns its pid without waiting; [`Daemon::adopt`] makes it this handle's
    /// process once the first has gone.
    pub fn spawn_successor(&self) -> anyhow::Result<u32> {
        self.spawn_process()
    }

    /// Makes `pid` (from [`Daemon::spawn_successor`]) the process this handle drives; the
    /// previous one is reaped (killed, if it has not exited yet).
    pub fn adopt(&mut self, pid: u32) {
        if let Some(old) = self.pid.replace(pid) {
            self.sandbox.kill(old);
        }
    }

    /// `SIGTERM`, then waits at most `timeout` for the process to exit (a clean stop: it
    /// drains); killed if it has not. Returns whether it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(pid) = self.pid.take() else {
            return true;
        };
        match self.container_name() {
            // As the kubelet stops a pod: SIGTERM to the container's main process.
            Some(name) => {
                let _ = container::podman(&["kill", "--signal", "TERM", &name], PODMAN);
            }
            None => {
                let _ = crate::sys::kill(pid as i32, libc::SIGTERM);
            }
        }
        // Not exiting in time is an outcome here, not a failure.
        let _ = fixture::until("shunt exits", timeout, || Ok(!self.sandbox.is_running(pid)));
        let exited = !self.sandbox.is_running(pid);
        self.remove_container();
        self.sandbox.kill(pid);
        exited
    }

    /// `kill -9`: no chance to clean up, as after a crash.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.remove_container();
            self.sandbox.kill(pid);
        }
    }

    /// Kills and removes the container, if the daemon runs in one (`podman run --rm` removes
    /// it too when it stops by itself).
    fn remove_container(&self) {
        if let Some(name) = self.container_name() {
            let _ = container::podman(&["rm", "--force", "--time", "0", &name], PODMAN);
        }
    }

    pub fn is_running(&self) -> bool {
        self.pid.is_some_and(|pid| self.sandbox.is_running(pid))
    }

    /// Waits (at most `timeout`) for the process to exit on its own, e.g. after `uninstall`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        fixture::until("shunt exits by itself", timeout, || Ok(!self.is_running()))?;
        if let Some(pid) = self.pid.take() {
            self.sandbox.kill(pid); // reaps it
        }
        Ok(())
    }

    /// Runs the admin CLI against this daemon; returns stdout, or an error with stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        ctl(&self.socket, args)
    }

    /// Runs the admin CLI with `-o json` and reads the output as the admin API's `T`
    /// (`shunt::admin::api`); the error shows what was printed if it is not one.
    pub fn ctl_as<T: DeserializeOwned>(&self, args: &[&str]) -> anyhow::Result<T> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ctl(&all)?;
        serde_json::from_str(&out).with_context(|| {
            format!(
                "`shunt {}` printed no {}: {out}",
                args.join(" "),
                std::any::type_name::<T>()
            )
        })
    }

    /// `shunt status`.
    pub fn status(&self) -> anyhow::Result<Status> {
        self.ctl_as(&["status"])
    }

    /// Installs the fault rule `yaml` at runtime (`shunt faults set -f`); what the CLI printed.
    pub fn set_faults(&self, yaml: &str) -> anyhow::Result<String> {
        let file = self.sandbox.scratch_dir("rules")?.join("rule.yaml");
        std::fs::write(&file, yaml)?;
        self.ctl(&["faults", "set", "-f", &file.to_string_lossy()])
    }

    /// Waits (at most `within`) until `shunt conns` lists a connection whose upstream is
    /// connected, and returns the first one listed.
    pub fn connection_with_upstream(&self, within: Duration) -> anyhow::Result<ConnRecord> {
        fixture::eventually("shunt lists the connection", within, || {
            let conns: Vec<ConnRecord> = self.ctl_as(&["conns"])?;
            // Listed once accepted; upstream set once the upstream connection is up too.
            let first = conns.into_iter().next();
            Ok(first.filter(|c| c.upstream.is_some()))
        })
        .with_context(|| format!("shunt's log:\n{}", self.log_text()))
    }

    /// Waits (at most `within`) until `shunt conns --closed` lists a connection `wanted`
    /// accepts, and returns it; the error names `what`.
    pub fn closed_conn(
        &self,
        what: &str,
        within: Duration,
        wanted: impl Fn(&ConnRecord) -> bool,
    ) -> anyhow::Result<ConnRecord> {
        fixture::eventually(what, within, || {
            Ok(self.closed_conns()?.into_iter().find(&wanted))
        })
    }

    /// A counter from `shunt stats -o json`, e.g. `("ebpf", "redirected")`.
    pub fn counter(&self, source: &str, name: &str) -> anyhow::Result<u64> {
        let stats: Stats = self.ctl_as(&["stats"])?;
        let counters = match source {
            "ebpf" => &stats.ebpf,
            "proxy" => &stats.proxy,
            _ => bail!("no source {source} of counters (ebpf or proxy)"),
        };
        counters
            .get(name)
            .copied()
            .with_context(|| format!("no counter {source}.{name} in {stats:?}"))
    }

    /// Where the daemon serves `/metrics` (`which` = `metrics`) or `/live` and `/ready`
    /// (`health`), from `shunt status`.
    pub fn telemetry_addr(&self, which: &str) -> anyhow::Result<std::net::SocketAddr> {
        let status = self.status()?;
        let addr = match which {
            "metrics" => status.metrics,
            "health" => status.health,
            _ => bail!("no telemetry listener {which} (metrics or health)"),
        };
        addr.with_context(|| format!("no {which} address in {status:?}"))
    }

    /// The running daemon's process id (in a container: as the host sees it).
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.daemon_pid()
    }

    fn daemon_pid(&self) -> anyhow::Result<u32> {
        let pid = self.pid.context("the daemon is not running")?;
        match self.container_name() {
            Some(name) => container::host_pid(&name),
            None => Ok(pid),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `check` until it holds (at most 30 s); the error shows the daemon's log.
    pub fn eventually(
        &self,
        what: &str,
        check: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        crate::fixture::until(what, Duration::from_secs(30), check)
            .with_context(|| format!("shunt's log:\n{}", self.log_text()))
    }
}

/// Longest a podman command that stops or removes a container may take.
const PODMAN: Duration = Duration::from_secs(30);

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        // SIGTERM first: a clean stop is part of what is tested.
        self.terminate(Duration::from_secs(5));
        if let Some(container) = &self.container {
            container::remove_v1_cgroups(&container.cgroup_parent);
        }
        if self.owns_pins && self.pin_dir.exists() {
            let _ = Command::new(crate::shunt_bin())
                .args(["uninstall", "--pin-dir"])
                .arg(&self.pin_dir)
                .output();
        }
    }
}

/// Runs `shunt --admin-socket SOCKET ARGS…`.
pub fn ctl(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec![OsStr::new("--admin-socket"), socket.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    shunt(&all, Duration::from_secs(10))
}

/// Runs `shunt ARGS…`, which must succeed within `timeout`: its stdout, or an error with
/// its stderr. See [`run_shunt`].
pub fn shunt<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> anyhow::Result<String> {
    let out = run_shunt(args, None, timeout)?;
    if !out.status.success() {
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        bail!(
            "shunt {}: {}",
            shown.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `shunt ARGS…` with only what the arguments say (no `$SHUNT_ADMIN_SOCKET` from the
/// environment), as user and group `uid` if given (through `setpriv`, no supplementary
/// groups), killed after `timeout`; its output, whatever the exit status.
pub fn run_shunt<S: AsRef<OsStr>>(
    args: &[S],
    uid: Option<u32>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let mut cmd = match uid {
        Some(uid) => {
            let mut setpriv = Command::new("setpriv");
            setpriv
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(crate::shunt_bin());
            setpriv
        }
        None => Command::new(crate::shunt_bin()),
    };
    cmd.args(args)
        .env_remove("SHUNT_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("starting shunt")?;
    crate::sandbox::wait_with_timeout(child, timeout)
}
