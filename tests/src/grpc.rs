//! gRPC peers independent of shunt's HTTP/2 code: Python grpcio (`tests/peers/greeter.py`)
//! and tonic (`shunt-greeter`), each as server and client.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::Context;
use serde::Deserialize;

use crate::{
    fixture, probe,
    sandbox::{Pod, Sandbox},
};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/greeter.py")
}

/// The Python interpreter the peers run with: that of the virtual environment `cargo xtask
/// setup` installs grpcio into (`target/venv`), else `python3` from `PATH`.
pub fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Starts a greeter in `pod` on `port` that answers with `name`; waits until it listens.
pub fn serve(sandbox: &Sandbox, pod: &Pod, name: &str, port: u16) -> anyhow::Result<u32> {
    serve_with_events(sandbox, pod, name, port, None)
}

/// As [`serve`]; the greeter appends `cancelled` to `events` when a call is cancelled.
pub fn serve_with_events(
    sandbox: &Sandbox,
    pod: &Pod,
    name: &str,
    port: u16,
    events: Option<&std::path::Path>,
) -> anyhow::Result<u32> {
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .args(["serve", name, &format!("{}:{port}", pod.ipv4)]);
    if let Some(events) = events {
        cmd.arg(events);
    }
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    probe::wait_listening(sandbox, pod, port, pid)?;
    Ok(pid)
}

/// The outcome of `count` unary calls over one channel.
#[derive(Debug, Deserialize)]
pub struct Calls {
    pub ok: usize,
    pub by_backend: HashMap<String, usize>,
    pub errors: HashMap<String, usize>,
    pub first_error: Option<String>,
}

impl Calls {
    /// All `total` calls succeeded, spread over exactly `backends` backends, each within
    /// `tolerance` (a fraction, e.g. 0.05) of an even share.
    pub fn check_even(&self, total: usize, backends: usize, tolerance: f64) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ok == total,
            "{} of {total} calls succeeded: {self:?}",
            self.ok
        );
        anyhow::ensure!(
            self.by_backend.len() == backends,
            "not {backends} backends: {self:?}"
        );
        let share = total as f64 / backends as f64;
        for (backend, n) in &self.by_backend {
            anyhow::ensure!(
                (*n as f64 - share).abs() <= share * tolerance,
                "{backend} served {n} of {total}, not {share} ± {:.0}%: {self:?}",
                tolerance * 100.0
            );
        }
        Ok(())
    }
}

/// `n` pods `greeter0…` each serving a grpcio greeter named as its pod on `port`; their
/// addresses, the endpoints of a Service.
pub fn greeters(sandbox: &Sandbox, n: usize, port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    (0..n)
        .map(|i| {
            let pod = sandbox.add_pod(&format!("greeter{i}"))?;
            serve(sandbox, &pod, &pod.name, port)?;
            Ok(SocketAddr::new(pod.ipv4.into(), port))
        })
        .collect()
}

/// A sandbox with a pod `client` and the [`greeters`] (grpcio) in front of it: the client
/// and the greeters' addresses.
pub fn client_and_greeters(n: usize, port: u16) -> anyhow::Result<(Sandbox, Pod, Vec<SocketAddr>)> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let endpoints = greeters(&sandbox, n, port)?;
    Ok((sandbox, client, endpoints))
}

/// As [`client_and_greeters`], with [`tonic_greeters`].
pub fn client_and_tonic_greeters(
    n: usize,
    port: u16,
) -> anyhow::Result<(Sandbox, Pod, Vec<SocketAddr>)> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let endpoints = tonic_greeters(&sandbox, n, port)?;
    Ok((sandbox, client, endpoints))
}

/// Starts a tonic greeter in `pod` on `port` that answers with `name`.
pub fn tonic_serve(sandbox: &Sandbox, pod: &Pod, name: &str, port: u16) -> anyhow::Result<u32> {
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args([
        "serve",
        "--name",
        name,
        "--listen",
        &format!("{}:{port}", pod.ipv4),
    ]);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    probe::wait_listening(sandbox, pod, port, pid)?;
    Ok(pid)
}

/// `n` pods `greeter0…` each serving a tonic greeter named as its pod on `port`; their
/// addresses, the endpoints of a Service.
pub fn tonic_greeters(sandbox: &Sandbox, n: usize, port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    (0..n)
        .map(|i| {
            let pod = sandbox.add_pod(&format!("greeter{i}"))?;
            tonic_serve(sandbox, &pod, &pod.name, port)?;
            Ok(SocketAddr::new(pod.ipv4.into(), port))
        })
        .collect()
}

/// Makes `count` SayHello calls with a tonic client on one channel.
pub fn tonic_call(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<Calls> {
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args([
        "call",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "tonic client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&stdout)
}

/// Makes `count` SayHello calls from `pod` to `to` over ONE channel (one TCP connection).
pub fn call(sandbox: &Sandbox, pod: &Pod, to: SocketAddr, count: usize) -> anyhow::Result<Calls> {
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .args(["call", &to.to_string(), &count.to_string()]);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "greeter client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&stdout)
}

/// Starts `count` calls of `method` (`SayHello`, `Slow`: 300 ms, `Fail`) in the background;
/// [`Background::finish`] collects the outcome.
pub fn call_in_background(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    method: &str,
) -> anyhow::Result<Background> {
    let out = sandbox
        .scratch_dir("grpc")?
        .join(format!("{method}-{count}.json"));
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .args(["call", &to.to_string(), &count.to_string(), method])
        .stdout(std::fs::File::create(&out)?);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    Ok(Background { pid, out })
}

/// Starts a tonic client in `pod` that calls `to` every 100 ms on one channel (one HTTP/2
/// connection) until killed, printing a JSON line per call to `log`; see [`answered_by`].
pub fn call_every_100ms(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    log: &std::path::Path,
) -> anyhow::Result<u32> {
    let mut caller = Command::new(crate::greeter_bin());
    caller
        .args(["call", "--to", &to.to_string(), "--every", "100ms"])
        .stdout(std::fs::File::create(log)?);
    sandbox.spawn_in_pod(pod, caller)
}

/// The backends of the calls a [`call_every_100ms`] client printed to `log` so far;
/// `(failed)` for a call that failed.
pub fn answered_by(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|call| call["backend"].as_str().unwrap_or("(failed)").to_owned())
        .collect()
}

pub struct Background {
    pid: u32,
    out: PathBuf,
}

impl Background {
    /// Waits (at most 60 s) for the calls to finish.
    pub fn finish(self, sandbox: &Sandbox) -> anyhow::Result<Calls> {
        fixture::exited(
            sandbox,
            self.pid,
            "the calls finish",
            Duration::from_secs(60),
        )?;
        parse(&std::fs::read_to_string(&self.out)?)
    }
}

/// Runs the streaming, deadline and cancellation checks of the greeter client from `pod`
/// against `to`; returns its JSON report.
pub fn semantics(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(python());
    cmd.arg(script()).args(["semantics", &to.to_string()]);
    let out = sandbox.run_in_pod(pod, cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "greeter semantics failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).with_context(|| format!("greeter printed {stdout:?}"))
}

fn parse(stdout: &str) -> anyhow::Result<Calls> {
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("greeter client printed {stdout:?}"))
}

/// What [`steady_in_background`] saw.
#[derive(Debug, Deserialize)]
pub struct Steady {
    pub ok: usize,
    pub calls: usize,
    pub by_backend: HashMap<String, usize>,
    pub errors: HashMap<String, usize>,
    pub first_error: Option<String>,
    pub drip: Drip,
}

/// The long-lived server-streaming call of [`Steady`].
#[derive(Debug, Deserialize)]
pub struct Drip {
    pub received: usize,
    pub error: Option<String>,
}

/// A steady load from `pod`: unary calls back to back on one channel, a fresh channel (a new
/// connection) every tenth call, for as long as a server-streaming call of `messages`
/// messages, one every `every_ms`, lasts. Returns once the stream's first message has
/// arrived (at most 30 s).
pub fn steady_in_background(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    messages: usize,
    every_ms: u64,
) -> anyhow::Result<SteadyLoad> {
    let dir = sandbox.scratch_dir("grpc")?;
    let out = dir.join("steady.json");
    let started = dir.join("steady.started");
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .args([
            "steady",
            &to.to_string(),
            &messages.to_string(),
            &every_ms.to_string(),
        ])
        .arg(&started)
        .stdout(std::fs::File::create(&out)?);
    let pid = sandbox.spawn_in_pod(pod, cmd)?;
    fixture::until(
        "the steady load's stream starts",
        Duration::from_secs(30),
        || {
            if started.exists() {
                return Ok(true);
            }
            if !sandbox.is_running(pid) {
                return Err(fixture::give_up(format!(
                    "the steady load ended before its stream started: {}",
                    std::fs::read_to_string(&out).unwrap_or_default()
                )));
            }
            Ok(false)
        },
    )?;
    Ok(SteadyLoad { pid, out })
}

pub struct SteadyLoad {
    pid: u32,
    out: PathBuf,
}

impl SteadyLoad {
    pub fn is_running(&self, sandbox: &Sandbox) -> bool {
        sandbox.is_running(self.pid)
    }

    /// Waits (at most `timeout`) for the stream to end and the load with it.
    pub fn finish(self, sandbox: &Sandbox, timeout: Duration) -> anyhow::Result<Steady> {
        fixture::exited(sandbox, self.pid, "the steady load finishes", timeout)?;
        let text = std::fs::read_to_string(&self.out)?;
        serde_json::from_str(text.trim()).with_context(|| format!("steady load printed {text:?}"))
    }
}

/// What a `shunt-greeter churn` run saw: one unary call per connection.
#[derive(Debug, Clone, Deserialize)]
pub struct ChurnOutcome {
    /// Connections whose call succeeded.
    pub ok: usize,
    pub by_backend: HashMap<String, usize>,
    /// Failed connections (connect or call) by gRPC code.
    pub errors: HashMap<String, usize>,
    /// The first message for each code in `errors`.
    #[serde(default)]
    pub messages: HashMap<String, String>,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Successful connections per second.
    pub per_second: f64,
    /// Sockets the client still held once every connection had been dropped: 0 unless the
    /// client itself kept connections open.
    pub sockets_open_at_end: usize,
}

impl ChurnOutcome {
    pub fn failed(&self) -> usize {
        self.errors.values().sum()
    }

    /// Every one of `count` connections made its call, and the client closed them all.
    pub fn check_all_ok(&self, count: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ok == count,
            "{} of {count} short connections succeeded: {self:?}",
            self.ok
        );
        anyhow::ensure!(
            self.sockets_open_at_end == 0,
            "the churn client still held {} sockets at the end",
            self.sockets_open_at_end
        );
        Ok(())
    }
}

/// Longest a churn run may take (the client's own bound is its `--seconds`).
const CHURN_SECONDS: Duration = Duration::from_secs(120);

/// Makes `count` short connections from `pod` to `to`, `concurrency` at a time, each a new
/// TCP + HTTP/2 connection carrying one SayHello call and then closed (`shunt-greeter
/// churn`); stops starting new ones after 120 s.
pub fn churn(
    sandbox: &Sandbox,
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<ChurnOutcome> {
    churn_to(sandbox, pod, &[to], count, concurrency, CHURN_SECONDS)
}

/// As [`churn`], to several addresses in turn (one per connection) and stopping after
/// `seconds`.
pub fn churn_to(
    sandbox: &Sandbox,
    pod: &Pod,
    to: &[SocketAddr],
    count: usize,
    concurrency: usize,
    seconds: Duration,
) -> anyhow::Result<ChurnOutcome> {
    let to: Vec<String> = to.iter().map(ToString::to_string).collect();
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args(["churn", "--to", &to.join(",")])
        .args(["--count", &count.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--seconds", &seconds.as_secs_f64().to_string()]);
    // Connections open when the time runs out still finish (each bounded at 15 s), and the
    // client waits up to 2 s for their sockets to close.
    let out = sandbox.run_in_pod(pod, cmd, seconds + Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "churn client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).with_context(|| format!("churn client printed {stdout:?}"))
}
