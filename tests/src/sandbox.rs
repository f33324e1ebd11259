//! Pods as network namespaces on one machine.
//!
//! A [`Sandbox`] owns a bridge in the root namespace (with no address, so nothing on it is
//! reachable from the host), one network namespace per pod joined to the bridge by a veth
//! pair, and a cgroup v2 directory every process it starts is placed in (the kernel programs
//! under test attach there). Names carry a per-sandbox id, so parallel tests never collide.
//! Dropping the sandbox — on success, failure or panic — kills its processes and removes
//! everything it made; [`clean_up_all`] does the same for signal handlers. A process that
//! makes a sandbox also cleans up when it is sent SIGTERM, SIGINT or SIGHUP — a test runner
//! stopping a test past its time limit — so a killed test leaves nothing running.

use std::{
    ffi::CString,
    fs::File,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex, Once, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};

/// One "pod": a network namespace with an IPv4 and an IPv6 (ULA) address on the bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// The namespace's name for `ip netns` (also the file under `/var/run/netns`).
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

pub struct Sandbox {
    id: String,
    bridge: String,
    cgroup: PathBuf,
    subnet: (u8, u8),
    /// Shared with [`LIVE`], so a signal handler can clean up without the `Sandbox`.
    state: Arc<Mutex<State>>,
}

/// Every sandbox of this process not yet dropped.
static LIVE: Mutex<Vec<Weak<Mutex<State>>>> = Mutex::new(Vec::new());

/// Cleans up every sandbox of this process: for SIGINT/SIGTERM handlers, which have no
/// `Sandbox` at hand (the one being used belongs to the interrupted code).
pub fn clean_up_all() {
    let live: Vec<_> = lock(&LIVE).iter().filter_map(Weak::upgrade).collect();
    for state in live {
        lock(&state).clean_up();
    }
}

/// Once per process: on SIGTERM, SIGINT or SIGHUP, cleans up every sandbox and exits as the
/// signal would have. A handler, not `sigwait`: a test process has threads already running
/// that would take the signal. Tools that block these signals and wait for them themselves
/// ([`crate::interrupts`]) keep doing so: a blocked signal never reaches a handler.
fn clean_up_on_termination() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
            Ok(mut signals) => {
                std::thread::spawn(move || {
                    if let Some(signal) = signals.forever().next() {
                        eprintln!("sandbox: signal {signal}: killing its processes, removing it");
                        clean_up_all();
                        std::process::exit(128 + signal);
                    }
                });
            }
            Err(e) => eprintln!("sandbox: no cleanup on SIGTERM ({e}); Drop still cleans up"),
        }
    });
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct State {
    bridge: String,
    cgroup: PathBuf,
    pods: Vec<Pod>,
    children: Vec<Child>,
    /// BPF pin directories of daemons started in the sandbox, removed with `shunt uninstall`.
    pin_dirs: Vec<PathBuf>,
    scratch_dirs: Vec<PathBuf>,
    cleaned: bool,
}

impl Sandbox {
    pub fn new() -> anyhow::Result<Sandbox> {
        crate::require_root()?;
        clean_up_on_termination();
        let id = unique_id();
        let bridge = format!("shb{id}");
        let cgroup = cgroup2_mount()?.join(format!("shunt-sandbox-{id}"));
        let seed = u32::from_str_radix(&id, 16).unwrap_or(0);
        let subnet = (100 + (seed % 100) as u8, (seed / 100 % 250) as u8);
        let state = Arc::new(Mutex::new(State {
            bridge: bridge.clone(),
            cgroup: cgroup.clone(),
            pods: Vec::new(),
            children: Vec::new(),
            pin_dirs: Vec::new(),
            scratch_dirs: Vec::new(),
            cleaned: false,
        }));
        {
            let mut live = lock(&LIVE);
            live.retain(|state| state.strong_count() > 0);
            live.push(Arc::downgrade(&state));
        }
        let sandbox = Sandbox {
            id,
            bridge,
            cgroup,
            subnet,
            state,
        };
        // From here on, Drop removes whatever was made even if a later step fails.
        std::fs::create_dir(&sandbox.cgroup)
            .with_context(|| format!("creating cgroup {}", sandbox.cgroup.display()))?;
        ip(&["link", "add", &sandbox.bridge, "type", "bridge"])?;
        ip(&["link", "set", &sandbox.bridge, "up"])?;
        Ok(sandbox)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup every process of the sandbox runs in.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A scratch directory removed with the sandbox.
    pub fn scratch_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("shunt-{}-{name}", self.id));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.lock().scratch_dirs.push(dir.clone());
        Ok(dir)
    }

    /// Registers a pin directory to remove on cleanup, in case its daemon could not.
    pub fn track_pin_dir(&self, dir: PathBuf) {
        self.lock().pin_dirs.push(dir);
    }

    pub fn add_pod(&self, name: &str) -> anyhow::Result<Pod> {
        let index = self.lock().pods.len();
        anyhow::ensure!(index < 200, "too many pods in one sandbox");
        let host = index as u8 + 10;
        let pod = Pod {
            name: name.to_owned(),
            netns: format!("sh{}-{name}", self.id),
            ipv4: Ipv4Addr::new(10, self.subnet.0, self.subnet.1, host),
            ipv6: Ipv6Addr::new(
                0xfd00,
                0x5348,
                self.subnet.0.into(),
                self.subnet.1.into(),
                0,
                0,
                0,
                host.into(),
            ),
        };
        let veth = format!("shv{}{index}", self.id);
        ip(&["netns", "add", &pod.netns])?;
        // Tracked before the next steps, so a failure below still deletes the namespace.
        self.lock().pods.push(pod.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        let v4 = format!("{}/24", pod.ipv4);
        let v6 = format!("{}/64", pod.ipv6);
        ip(&["-n", &pod.netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &pod.netns, "addr", "add", &v4, "dev", "eth0"])?;
        ip(&[
            "-n", &pod.netns, "-6", "addr", "add", &v6, "dev", "eth0", "nodad",
        ])?;
        ip(&["-n", &pod.netns, "link", "set", "eth0", "up"])?;
        Ok(pod)
    }

    /// Starts `cmd` inside `pod`'s network namespace and the sandbox cgroup.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> anyhow::Result<u32> {
        let netns = File::open(pod.netns_path())
            .with_context(|| format!("opening {}", pod.netns_path().display()))?;
        self.spawn(cmd, Some(netns))
    }

    /// Starts `cmd` in `pod`'s network namespace and in the cgroup `sub` below the sandbox
    /// cgroup (created if missing), e.g. `kubepods/besteffort/pod<uid>`: a process of a
    /// Kubernetes pod, as the kubelet would place it.
    pub fn spawn_in_pod_cgroup(&self, pod: &Pod, sub: &str, cmd: Command) -> anyhow::Result<u32> {
        let cgroup = self.cgroup.join(sub);
        anyhow::ensure!(
            cgroup.starts_with(&self.cgroup) && !sub.contains(".."),
            "{sub} is not below the sandbox cgroup"
        );
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let netns = File::open(pod.netns_path())
            .with_context(|| format!("opening {}", pod.netns_path().display()))?;
        self.spawn_at(cmd, Some(netns), &cgroup)
    }

    /// Starts `cmd` in the root network namespace, inside the sandbox cgroup.
    pub fn spawn_in_host(&self, cmd: Command) -> anyhow::Result<u32> {
        self.spawn(cmd, None)
    }

    /// Runs `cmd` in `pod` to completion (killed after `timeout`) and returns its output.
    pub fn run_in_pod(
        &self,
        pod: &Pod,
        mut cmd: Command,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let netns = File::open(pod.netns_path())
            .with_context(|| format!("opening {}", pod.netns_path().display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.enter_on_exec(&mut cmd, Some(netns))?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        wait_with_timeout(child, timeout)
    }

    /// Stops a process started with one of the `spawn_*` methods (SIGKILL) and reaps it.
    pub fn kill(&self, pid: u32) {
        let mut state = self.lock();
        if let Some(pos) = state.children.iter().position(|c| c.id() == pid) {
            let mut child = state.children.swap_remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether a spawned process is still running.
    pub fn is_running(&self, pid: u32) -> bool {
        let mut state = self.lock();
        state
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&self, cmd: Command, netns: Option<File>) -> anyhow::Result<u32> {
        self.spawn_at(cmd, netns, &self.cgroup)
    }

    fn spawn_at(
        &self,
        mut cmd: Command,
        netns: Option<File>,
        cgroup: &Path,
    ) -> anyhow::Result<u32> {
        enter_on_exec(&mut cmd, netns, cgroup)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let pid = child.id();
        self.lock().children.push(child);
        Ok(pid)
    }

    /// Makes the child join the sandbox cgroup (and `netns`, if given) before it executes,
    /// so not even its first socket is created outside them.
    fn enter_on_exec(&self, cmd: &mut Command, netns: Option<File>) -> anyhow::Result<()> {
        enter_on_exec(cmd, netns, &self.cgroup)
    }

    /// Kills every process of the sandbox and removes its pins, namespaces, links and cgroup.
    /// Idempotent; errors are reported on stderr, never raised, so cleanup always finishes.
    pub fn cleanup(&self) {
        self.lock().clean_up();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl State {
    fn clean_up(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        kill_cgroup(&self.cgroup);
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pin_dir in &self.pin_dirs {
            if pin_dir.exists() {
                let result = Command::new(crate::shunt_bin())
                    .arg("uninstall")
                    .arg("--pin-dir")
                    .arg(pin_dir)
                    .output();
                if !matches!(&result, Ok(out) if out.status.success()) {
                    eprintln!(
                        "sandbox: could not uninstall {}: {result:?}",
                        pin_dir.display()
                    );
                }
            }
        }
        for pod in &self.pods {
            quiet_ip(&["netns", "del", &pod.netns]);
        }
        quiet_ip(&["link", "del", &self.bridge]);
        remove_cgroup(&self.cgroup);
        for dir in &self.scratch_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Makes the child join `cgroup` (and `netns`, if given) before it executes.
fn enter_on_exec(cmd: &mut Command, netns: Option<File>, cgroup: &Path) -> anyhow::Result<()> {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .context("cgroup path contains NUL")?;
    crate::sys::enter_on_exec(cmd, netns, procs);
    Ok(())
}

/// Waits for `child` at most `timeout`, then kills it; returns whatever it printed.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> anyhow::Result<Output> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let out_reader = std::thread::spawn(move || read_all(stdout.as_mut()));
    let err_reader = std::thread::spawn(move || read_all(stderr.as_mut()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn read_all(pipe: Option<&mut impl Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.read_to_end(&mut buf);
    }
    buf
}

/// Six hex digits, unique per process and call, and unlikely to repeat across processes.
fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503))
        .wrapping_add(nanos);
    format!("{:06x}", mixed & 0xff_ffff)
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on
/// hybrid hosts).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 filesystem is mounted")
}

fn kill_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    if std::fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill.
        for pid in cgroup_pids(cgroup) {
            let _ = crate::sys::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cgroup_pids(cgroup).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn remove_cgroup(cgroup: &Path) {
    // Child cgroups (pods' cgroups made by `spawn_in_pod_cgroup`) go first.
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while cgroup.exists() {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return,
            // EBUSY while the last processes are still exiting.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                eprintln!("sandbox: could not remove {}: {e}", cgroup.display());
                return;
            }
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn quiet_ip(args: &[&str]) {
    if let Err(e) = ip(args) {
        eprintln!("sandbox cleanup: {e}");
    }
}
