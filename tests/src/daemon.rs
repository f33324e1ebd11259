//! `shunt run` inside a sandbox, with its own pins, admin socket and cgroup attachment, so
//! any number of daemons can run side by side on one machine.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::sandbox::{Pod, Sandbox};

/// What differs between test daemons; everything else is per-sandbox.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `open` (default) or `closed`.
    pub fail_mode: Option<&'static str>,
    pub exclude_cidrs: Vec<String>,
    pub exclude_ports: Vec<u16>,
    /// Lines added to the `intercept:` section, e.g. `"  detect_timeout: 5s\n"`.
    pub intercept_yaml: String,
    /// YAML appended at the top level (further sections such as `services:`).
    pub extra_yaml: String,
    /// Run in Kubernetes mode (`--kubernetes`); its settings go in `extra_yaml`.
    pub kubernetes: bool,
    /// `SHUNT_LOG` for the daemon; tests default to `debug` (their failures print the log),
    /// benchmarks use `info` as a production node would.
    pub log: Option<&'static str>,
    /// Write the access log to [`Daemon::access_log`] (off by default, as in production).
    pub access_log: bool,
    /// Attach to this cgroup instead of the sandbox's.
    pub cgroup: Option<PathBuf>,
    /// `admin.group`: who besides root may use the admin socket.
    pub admin_group: Option<String>,
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
}

impl<'a> Daemon<'a> {
    /// Writes a config enrolling `pods`, starts the daemon and waits until it answers.
    pub fn start(
        sandbox: &'a Sandbox,
        pods: &[&Pod],
        options: &Options,
    ) -> anyhow::Result<Daemon<'a>> {
        let dir = sandbox.scratch_dir("daemon")?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/shunt-sandbox-{}", sandbox.id()));
        sandbox.track_pin_dir(pin_dir.clone());
        let daemon = Daemon {
            sandbox,
            config: dir.join("config.yaml"),
            socket: dir.join("admin.sock"),
            pin_dir,
            log: dir.join("shunt.log"),
            access_log: dir.join("access.log"),
            log_level: options.log.unwrap_or("debug"),
            kubernetes: options.kubernetes,
            pid: None,
            owns_pins: true,
            generation: 0,
        };
        std::fs::write(&daemon.config, daemon.render_config(pods, options))
            .context("writing the daemon's config")?;
        let mut daemon = daemon;
        daemon.launch()?;
        Ok(daemon)
    }

    fn render_config(&self, pods: &[&Pod], options: &Options) -> String {
        let mut yaml = String::new();
        let _ = writeln!(yaml, "intercept:");
        let cgroup = options.cgroup.as_deref().unwrap_or(self.sandbox.cgroup());
        let _ = writeln!(yaml, "  cgroup: {}", cgroup.display());
        let _ = writeln!(yaml, "  pin_dir: {}", self.pin_dir.display());
        let _ = writeln!(yaml, "  fail_mode: {}", options.fail_mode.unwrap_or("open"));
        let _ = writeln!(
            yaml,
            "  exclude_cidrs: [{}]",
            options.exclude_cidrs.join(", ")
        );
        let ports: Vec<String> = options.exclude_ports.iter().map(u16::to_string).collect();
        let _ = writeln!(yaml, "  exclude_ports: [{}]", ports.join(", "));
        yaml.push_str(&options.intercept_yaml);
        let _ = writeln!(yaml, "pods:{}", if pods.is_empty() { " []" } else { "" });
        for pod in pods {
            let _ = writeln!(
                yaml,
                "  - name: {}\n    netns: {}",
                pod.name,
                pod.netns_path().display()
            );
        }
        let _ = writeln!(yaml, "admin:\n  socket: {}", self.socket.display());
        if let Some(group) = &options.admin_group {
            let _ = writeln!(yaml, "  group: '{group}'");
        }
        // Port 0: daemons of tests running side by side never compete for 15020/15021.
        let access_log = if options.access_log {
            self.access_log.display().to_string()
        } else {
            "off".into()
        };
        let _ = writeln!(
            yaml,
            "telemetry:\n  metrics: 127.0.0.1:0\n  health: 127.0.0.1:0\n  access_log: {access_log}"
        );
        yaml.push_str(&options.extra_yaml);
        yaml
    }

    /// Replaces the config file (same pins, socket and cgroup), e.g. before `shunt reload`.
    pub fn rewrite_config(&self, pods: &[&Pod], options: &Options) -> anyhow::Result<()> {
        std::fs::write(&self.config, self.render_config(pods, options))
            .context("rewriting the config")
    }

    /// Recently closed connections (`shunt conns --closed -o json`).
    pub fn closed_conns(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let conns = self.ctl_json(&["conns", "--closed"])?;
        Ok(conns.as_array().cloned().unwrap_or_default())
    }

    /// Starts a second `shunt run` with the same configuration while this one runs: it takes
    /// this one's work over. Returns once the new daemon answers on the admin socket; this
    /// one then drains and exits by itself ([`Daemon::wait_exit`]), leaving the pins to the
    /// new one.
    pub fn start_successor(&mut self) -> anyhow::Result<Daemon<'a>> {
        let generation = self.generation + 1;
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
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // This process answering, not one it is taking over from.
            let answering = self
                .ctl_json(&["status"])
                .is_ok_and(|status| status["pid"].as_u64() == Some(u64::from(pid)));
            if answering {
                return Ok(());
            }
            if !self.sandbox.is_running(pid) {
                bail!(
                    "shunt exited during start-up; its log:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "shunt did not answer on its admin socket within 15s; its log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `shunt run` with this config, its output appended to the log, without waiting.
    fn spawn_process(&self) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening the daemon's log")?;
        let mut cmd = Command::new(crate::shunt_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .args(self.kubernetes.then_some("--kubernetes"))
            .env("SHUNT_LOG", self.log_level)
            .stdin(Stdio::null())
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
        let _ = crate::sys::kill(pid as i32, libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while self.sandbox.is_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let exited = !self.sandbox.is_running(pid);
        self.sandbox.kill(pid);
        exited
    }

    /// `kill -9`: no chance to clean up, as after a crash.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.sandbox.kill(pid);
        }
    }

    pub fn is_running(&self) -> bool {
        self.pid.is_some_and(|pid| self.sandbox.is_running(pid))
    }

    /// Waits (at most `timeout`) for the process to exit on its own, e.g. after `uninstall`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                bail!("shunt still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = self.pid.take() {
            self.sandbox.kill(pid); // reaps it
        }
        Ok(())
    }

    /// Runs the admin CLI against this daemon; returns stdout, or an error with stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        ctl(&self.socket, args)
    }

    /// Runs the admin CLI with `-o json` and parses the output.
    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ctl(&all)?;
        serde_json::from_str(&out)
            .with_context(|| format!("`shunt {}` printed {out:?}", args.join(" ")))
    }

    /// A counter from `shunt stats -o json`, e.g. `("ebpf", "redirected")`.
    pub fn counter(&self, source: &str, name: &str) -> anyhow::Result<u64> {
        let stats = self.ctl_json(&["stats"])?;
        stats[source][name]
            .as_u64()
            .with_context(|| format!("no counter {source}.{name} in {stats}"))
    }

    /// Where the daemon serves `/metrics` (`which` = `metrics`) or `/live` and `/ready`
    /// (`health`), from `shunt status`.
    pub fn telemetry_addr(&self, which: &str) -> anyhow::Result<std::net::SocketAddr> {
        let status = self.ctl_json(&["status"])?;
        status[which]
            .as_str()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no {which} address in {status}"))
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.pid.context("the daemon is not running")
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

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        // SIGTERM first: a clean stop is part of what is tested.
        self.terminate(Duration::from_secs(5));
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
    let mut cmd = Command::new(crate::shunt_bin());
    cmd.arg("--admin-socket").arg(socket).args(args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("starting shunt")?;
    let out = crate::sandbox::wait_with_timeout(child, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "shunt {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
