//! The traffic, all from the enrolled client pod to the virtual addresses: the gRPC
//! workload (`shunt-greeter soak`: unary calls at a steady rate, server streams back to back),
//! TLS connections (`openssl s_client`, certificate verified, a request answered), opaque
//! connections (`shunt-probe connect`: a payload echoed and compared byte for byte) and, while
//! switched on, short gRPC connections (`shunt-greeter churn`: a new connection per call, in
//! batches of [`connection_churn::RATE`] a second). Each outcome is kept with when it
//! happened and judged at the end against the [`Timeline`].

use std::{
    collections::BTreeMap,
    io::Read,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    connection_churn,
    interval::{CHURN_FAULTED, FAULTED, GrpcInterval, churn_error_key},
    sandbox::{CHURNED, SoakSandbox, TLS_NAME},
    timeline::{Timeline, WindowKind, now_ms},
};

/// Unary calls started per second, server streams kept in flight, HTTP/2 connections.
const UNARY_RATE: u32 = 100;
const STREAMS: usize = 4;
const CONNECTIONS: usize = 2;
/// Opaque connections per `shunt-probe` run, and the payload each echoes.
const OPAQUE_BATCH: u32 = 5;
const OPAQUE_PAYLOAD: usize = 16 * 1024;
/// Pause between TLS and between opaque runs.
const PAUSE: Duration = Duration::from_millis(200);
/// Failures this long around a restart are the restart's.
const RESTART_BEFORE: Duration = Duration::from_secs(1);
const RESTART_AFTER: Duration = Duration::from_secs(3);
/// A fault rule is set and cleared by a command whose effect the client sees a moment later.
const FAULT_MARGIN: Duration = Duration::from_secs(1);
/// After a reload removes an endpoint, calls already on their way may still finish there.
const REMOVAL_SETTLE: Duration = Duration::from_secs(1);

/// What happened during `[from_ms, to_ms]`: successes by kind, failures by kind.
#[derive(Debug, Default, Clone)]
struct Record {
    from_ms: u64,
    to_ms: u64,
    ok: BTreeMap<&'static str, u64>,
    by_backend: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    messages: BTreeMap<String, String>,
}

impl Record {
    fn error(&mut self, key: String, message: &str) {
        self.errors_n(key, 1, message);
    }

    fn errors_n(&mut self, key: String, n: u64, message: &str) {
        *self.errors.entry(key.clone()).or_default() += n;
        self.messages
            .entry(key)
            .or_insert_with(|| message.chars().take(300).collect());
    }
}

/// Switches the short-connection workload on and off, and tells whether a batch is still
/// running (its connections are not done closing until it ends).
#[derive(Default)]
pub struct ChurnSwitch {
    on: AtomicBool,
    busy: AtomicBool,
}

impl ChurnSwitch {
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }
}

type Records = Arc<Mutex<Vec<Record>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Workloads {
    records: Records,
    greeter_pid: u32,
    threads: Vec<JoinHandle<()>>,
    deadline: Instant,
}

/// Outcomes so far, judged against the timeline.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcomes {
    /// Successes: `unary`, `streams`, `stream_replies`, `tls`, `opaque`; and
    /// `unary_unsent_retried` and `stream_unsent_retried`, calls retried because they were
    /// never sent.
    pub ok: BTreeMap<String, u64>,
    /// Unary calls the fault rule aborted, while it was set.
    pub faulted: u64,
    /// Calls on short connections the fault rule aborted, while it was set.
    pub churn_faulted: u64,
    /// Unary calls the churned greeter answered while out of the Service (from a second
    /// after its removal).
    pub served_while_removed: u64,
    /// Failures nothing scheduled explains, by kind.
    pub unexpected: BTreeMap<String, u64>,
    /// Failures around the restart, by kind.
    pub restart: BTreeMap<String, u64>,
    /// The first message of each kind of failure.
    pub messages: BTreeMap<String, String>,
}

impl Outcomes {
    pub fn ok(&self, kind: &str) -> u64 {
        self.ok.get(kind).copied().unwrap_or(0)
    }

    pub fn unexpected_total(&self) -> u64 {
        self.unexpected.values().sum()
    }

    pub fn restart_total(&self) -> u64 {
        self.restart.values().sum()
    }

    pub fn progress_line(&self) -> String {
        format!(
            "unary {} ok {} faulted, streams {}, tls {}, opaque {}, short conns {}; unexpected {}, restart {}",
            self.ok("unary"),
            self.faulted,
            self.ok("streams"),
            self.ok("tls"),
            self.ok("opaque"),
            self.ok("churn"),
            self.unexpected_total(),
            self.restart_total()
        )
    }
}

impl Workloads {
    /// Starts every workload for `duration`; the short-connection one runs while `churn` is on.
    pub fn start(
        sandbox: &Arc<SoakSandbox>,
        duration: Duration,
        churn: Arc<ChurnSwitch>,
    ) -> anyhow::Result<Workloads> {
        let records: Records = Arc::default();
        let deadline = Instant::now() + duration;
        let out = sandbox.sandbox.scratch_dir("soak-grpc")?.join("grpc.jsonl");
        let mut cmd = Command::new(crate::greeter_bin());
        cmd.args(["soak", "--to", &SoakSandbox::grpc_vip().to_string()])
            .args(["--seconds", &duration.as_secs_f64().to_string()])
            .args(["--rate", &UNARY_RATE.to_string()])
            .args(["--streams", &STREAMS.to_string()])
            .args(["--connections", &CONNECTIONS.to_string()])
            .stdout(std::fs::File::create(&out)?);
        let greeter_pid = sandbox.sandbox.spawn_in_pod(&sandbox.client, cmd)?;
        let mut threads = Vec::new();
        let tail_records = records.clone();
        // The greeter ends by itself; the tail gives up a while after it should have.
        let tail_deadline = deadline + Duration::from_secs(90);
        threads.push(std::thread::spawn(move || {
            tail_grpc(&out, &tail_records, tail_deadline);
        }));
        for kind in [Kind::Tls, Kind::Opaque] {
            let sandbox = sandbox.clone();
            let records = records.clone();
            threads.push(std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let record = match kind {
                        Kind::Tls => tls_connection(&sandbox),
                        Kind::Opaque => opaque_connections(&sandbox),
                    };
                    lock(&records).push(record);
                    std::thread::sleep(PAUSE);
                }
            }));
        }
        {
            let sandbox = sandbox.clone();
            let records = records.clone();
            threads.push(std::thread::spawn(move || {
                churn_while_on(&sandbox, &churn, &records, deadline);
            }));
        }
        Ok(Workloads {
            records,
            greeter_pid,
            threads,
            deadline,
        })
    }

    pub fn tally(&self, timeline: &Timeline) -> Outcomes {
        tally(&lock(&self.records), timeline)
    }

    /// Waits for every workload to end (bounded: each has its own timeouts).
    pub fn finish(self, sandbox: &SoakSandbox) -> anyhow::Result<Finished> {
        let give_up = self.deadline + Duration::from_secs(120);
        while sandbox.sandbox.is_running(self.greeter_pid) {
            anyhow::ensure!(
                Instant::now() < give_up,
                "the gRPC workload did not finish within 2 minutes of its end"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for thread in self.threads {
            let _ = thread.join();
        }
        let records = std::mem::take(&mut *lock(&self.records));
        Ok(Finished { records })
    }
}

pub struct Finished {
    records: Vec<Record>,
}

impl Finished {
    pub fn tally(&self, timeline: &Timeline) -> Outcomes {
        tally(&self.records, timeline)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Tls,
    Opaque,
}

fn tally(records: &[Record], timeline: &Timeline) -> Outcomes {
    let mut outcomes = Outcomes::default();
    for record in records {
        let when = (record.from_ms, record.to_ms);
        for (kind, n) in &record.ok {
            *outcomes.ok.entry((*kind).to_owned()).or_default() += n;
        }
        // A reload reaches open HTTP/2 connections too: each new stream looks its Service up,
        // so once the reload has settled no call may land on the removed endpoint.
        if timeline.inside(WindowKind::EndpointRemoved, when, REMOVAL_SETTLE) {
            outcomes.served_while_removed += record.by_backend.get(CHURNED).copied().unwrap_or(0);
        }
        for (key, &n) in &record.errors {
            let key = key.clone();
            let bucket = if key == FAULTED || key == CHURN_FAULTED {
                if timeline.overlaps(WindowKind::Fault, when, FAULT_MARGIN, FAULT_MARGIN) {
                    match key == FAULTED {
                        true => outcomes.faulted += n,
                        false => outcomes.churn_faulted += n,
                    }
                    continue;
                }
                format!("{key} outside a fault window")
            } else if timeline.overlaps(WindowKind::Restart, when, RESTART_BEFORE, RESTART_AFTER) {
                *outcomes.restart.entry(key.clone()).or_default() += n;
                if let Some(message) = record.messages.get(&key) {
                    outcomes
                        .messages
                        .entry(key)
                        .or_insert_with(|| message.clone());
                }
                continue;
            } else {
                key.clone()
            };
            *outcomes.unexpected.entry(bucket.clone()).or_default() += n;
            let message = record.messages.get(&key).cloned().unwrap_or_default();
            outcomes.messages.entry(bucket).or_insert(message);
        }
    }
    outcomes
}

/// Reads the gRPC workload's lines as they are written, until its last one.
fn tail_grpc(path: &PathBuf, records: &Records, deadline: Instant) {
    let mut pending = String::new();
    let mut previous_ms: Option<u64> = None;
    let Ok(mut file) = std::fs::File::open(path) else {
        lock(records).push(unreadable("the gRPC workload's output cannot be opened"));
        return;
    };
    while Instant::now() < deadline {
        let mut chunk = String::new();
        if file.read_to_string(&mut chunk).is_err() {
            lock(records).push(unreadable("the gRPC workload's output is not UTF-8"));
            return;
        }
        pending.push_str(&chunk);
        while let Some(newline) = pending.find('\n') {
            let line: String = pending.drain(..=newline).collect();
            let Ok(parsed) = serde_json::from_str::<GrpcInterval>(&line) else {
                lock(records).push(unreadable(&format!("gRPC workload printed {line:?}")));
                continue;
            };
            let from_ms = previous_ms.unwrap_or(parsed.t_ms.saturating_sub(1000));
            previous_ms = Some(parsed.t_ms);
            let last = parsed.last;
            lock(records).push(Record {
                from_ms,
                to_ms: parsed.t_ms,
                ok: BTreeMap::from([
                    ("unary", parsed.unary_ok),
                    ("streams", parsed.streams_ok),
                    ("stream_replies", parsed.stream_replies),
                    ("unary_unsent_retried", parsed.unary_unsent_retried),
                    ("stream_unsent_retried", parsed.stream_unsent_retried),
                ]),
                by_backend: parsed.by_backend,
                errors: parsed.errors,
                messages: parsed.messages,
            });
            if last {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    lock(records).push(unreadable("the gRPC workload never printed its last line"));
}

fn unreadable(message: &str) -> Record {
    let now = now_ms();
    let mut record = Record {
        from_ms: now,
        to_ms: now,
        ..Record::default()
    };
    record.error("grpc workload output".into(), message);
    record
}

/// One TLS connection: handshake verifying the certificate and name, a request, the whole
/// answer read back.
fn tls_connection(sandbox: &SoakSandbox) -> Record {
    let mut record = Record {
        from_ms: now_ms(),
        ..Record::default()
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -quiet -connect \"$1\" \
             -servername \"$2\" -verify_return_error -verify_hostname \"$2\" -CAfile \"$3\"",
        )
        .arg("sh")
        .arg(SoakSandbox::tls_vip().to_string())
        .arg(TLS_NAME)
        .arg(&sandbox.ca);
    let outcome = sandbox
        .sandbox
        .run_in_pod(&sandbox.client, cmd, Duration::from_secs(20));
    record.to_ms = now_ms();
    match outcome {
        Ok(out) => {
            let page = String::from_utf8_lossy(&out.stdout);
            if out.status.success()
                && page.starts_with("HTTP/1.0 200 ok")
                && page.contains("</HTML>")
            {
                record.ok.insert("tls", 1);
            } else {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let why = stderr.lines().last().unwrap_or("no answer");
                record.error(
                    "tls exchange failed".into(),
                    &format!("{}: {why}", out.status),
                );
            }
        }
        Err(e) => record.error("tls client did not finish".into(), &format!("{e:#}")),
    }
    record
}

/// A few opaque connections one after the other, each echoing a payload.
fn opaque_connections(sandbox: &SoakSandbox) -> Record {
    let mut record = Record {
        from_ms: now_ms(),
        ..Record::default()
    };
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args(["connect", "--to", &SoakSandbox::opaque_vip().to_string()])
        .args(["--count", &OPAQUE_BATCH.to_string()])
        .args(["--payload-bytes", &OPAQUE_PAYLOAD.to_string()])
        .args(["--timeout-ms", "10000"]);
    let outcome = sandbox
        .sandbox
        .run_in_pod(&sandbox.client, cmd, Duration::from_secs(90));
    record.to_ms = now_ms();
    let out = match outcome {
        Ok(out) => out,
        Err(e) => {
            record.error("opaque client did not finish".into(), &format!("{e:#}"));
            return record;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut seen = 0;
    for line in stdout.lines() {
        seen += 1;
        let Ok(conn) = serde_json::from_str::<crate::probe::Seen>(line) else {
            record.error("opaque client output".into(), line);
            continue;
        };
        match (&conn.error, conn.payload_echoed, conn.was_redirected()) {
            (Some(error), _, _) => {
                // "Connection reset by peer (os error 104)" → one kind per errno.
                let kind = error.split(" (os error").next().unwrap_or(error);
                let kind: String = kind.chars().take(60).collect();
                record.error(format!("opaque: {kind}"), error);
            }
            (None, Some(true), true) => *record.ok.entry("opaque").or_default() += 1,
            (None, Some(true), false) => {
                record.error("opaque: not redirected".into(), line);
            }
            (None, _, _) => record.error("opaque: payload not echoed intact".into(), line),
        }
    }
    if seen < OPAQUE_BATCH {
        let stderr = String::from_utf8_lossy(&out.stderr);
        record.error(
            "opaque client ended early".into(),
            &format!("{seen} of {OPAQUE_BATCH} connections: {stderr}"),
        );
    }
    record
}

/// While the switch is on, a batch of short connections a second until `deadline`.
fn churn_while_on(
    sandbox: &SoakSandbox,
    switch: &ChurnSwitch,
    records: &Records,
    deadline: Instant,
) {
    while Instant::now() < deadline {
        // Busy before looking at the switch: whoever turns it off and then sees "not busy"
        // knows no batch started after.
        switch.busy.store(true, Ordering::SeqCst);
        if !switch.on.load(Ordering::SeqCst) {
            switch.busy.store(false, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let started = Instant::now();
        let record = churn_batch(sandbox);
        lock(records).push(record);
        switch.busy.store(false, Ordering::SeqCst);
        // One batch a second whatever a batch took: the rate stays bounded.
        std::thread::sleep(
            (started + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
        );
    }
}

/// [`connection_churn::RATE`] short connections to the gRPC Service,
/// [`connection_churn::CONCURRENCY`] at a time, for at most a second: each a new TCP +
/// HTTP/2 connection, one SayHello, closed.
fn churn_batch(sandbox: &SoakSandbox) -> Record {
    let mut record = Record {
        from_ms: now_ms(),
        ..Record::default()
    };
    let mut cmd = Command::new(crate::greeter_bin());
    cmd.args(["churn", "--to", &SoakSandbox::grpc_vip().to_string()])
        .args(["--count", &connection_churn::RATE.to_string()])
        .args(["--concurrency", &connection_churn::CONCURRENCY.to_string()])
        .args(["--seconds", "1"]);
    // The client's own bounds: a second of new connections, 15 s for each, 2 s to close.
    let outcome = sandbox
        .sandbox
        .run_in_pod(&sandbox.client, cmd, Duration::from_secs(30));
    record.to_ms = now_ms();
    let out = match outcome {
        Ok(out) => out,
        Err(e) => {
            record.error("churn client did not finish".into(), &format!("{e:#}"));
            return record;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed = serde_json::from_str::<crate::grpc::ChurnOutcome>(stdout.trim());
    let churned = match (out.status.success(), parsed) {
        (true, Ok(churned)) => churned,
        (_, _) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            record.error(
                "churn client failed".into(),
                &format!("{}: {stdout}{stderr}", out.status),
            );
            return record;
        }
    };
    record.ok.insert("churn", churned.ok as u64);
    for (backend, n) in churned.by_backend {
        *record.by_backend.entry(backend).or_default() += n as u64;
    }
    for (code, n) in &churned.errors {
        let message = churned.messages.get(code).map_or("", String::as_str);
        record.errors_n(churn_error_key(code, message), *n as u64, message);
    }
    if churned.sockets_open_at_end > 0 {
        record.error(
            "churn client kept connections open".into(),
            &format!("{} sockets open after closing", churned.sockets_open_at_end),
        );
    }
    record
}
