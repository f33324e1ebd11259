//! Connection churn: clients that make a new connection for every call (health checkers,
//! CLIs, cron jobs, misconfigured gRPC clients) must not make shunt hold more and more
//! upstream connections, descriptors or memory. Run as root.

use std::net::SocketAddr;

use shunt::admin::api::ServiceSummary;
use shunt_tests::{
    bench::process::{established_to_port, fd_count, rss_kib},
    daemon::{Daemon, Options},
    fixture::{self, vip},
    grpc,
    sandbox::{Pod, Sandbox},
};

const PORT: u16 = 50051;
const GREETERS: usize = 3;
/// The daemon's worker threads: each has its own pool per pod.
const WORKERS: usize = 2;
/// `http2.upstream_max_idle` in these tests.
const MAX_IDLE: usize = 1;

/// Daemon options with Service `greeter` at [`vip`] in front of `endpoints`, [`WORKERS`]
/// workers and [`MAX_IDLE`] idle upstream connections.
fn options(endpoints: &[SocketAddr]) -> Options {
    Options {
        // Ten thousand connections' debug lines would only slow the daemon down.
        log: Some("info"),
        ..fixture::service("greeter", vip(PORT), endpoints).with_config(|c| {
            c.intercept.workers = WORKERS;
            c.http2.upstream_max_idle = MAX_IDLE as u32;
        })
    }
}

/// shunt's upstream sockets: in the client pod's namespace (where shunt dials from),
/// established to the greeters' port.
fn upstream_sockets(sandbox: &Sandbox, client: &Pod) -> anyhow::Result<u64> {
    established_to_port(sandbox, client, PORT)
}

/// What the daemon holds: descriptors, resident memory, and the pooled upstream connections
/// it reports itself in `shunt services`.
struct Held {
    descriptors: u64,
    rss_kib: f64,
    reported_upstreams: u64,
}

fn held(daemon: &Daemon) -> anyhow::Result<Held> {
    let pid = daemon.pid()?;
    let services: Vec<ServiceSummary> = daemon.ctl_as(&["services"])?;
    let reported_upstreams = services
        .iter()
        .flat_map(|s| &s.endpoints)
        .map(|e| e.upstreams_open)
        .sum();
    Ok(Held {
        descriptors: fd_count(pid),
        rss_kib: rss_kib(pid),
        reported_upstreams,
    })
}

#[test]
fn ten_thousand_short_connections_leave_no_upstream_connections_behind() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_tonic_greeters(GREETERS, PORT)?;
    let daemon = Daemon::start(&sandbox, &[&client], &options(&endpoints))?;
    // At most this many idle connections may stay: per endpoint, pod and worker.
    let kept = (GREETERS * WORKERS * MAX_IDLE) as u64;

    // Warm up (pools, allocator, the greeters' own connections), then take the baseline.
    let warm = grpc::churn(&sandbox, &client, vip(PORT), 300, 8)?;
    anyhow::ensure!(warm.ok == 300, "warm-up: {warm:?}");
    daemon.eventually("the pools are down to their idle cap", || {
        Ok(upstream_sockets(&sandbox, &client)? <= kept)
    })?;
    let before = held(&daemon)?;

    let churn = grpc::churn(&sandbox, &client, vip(PORT), 10_000, 8)?;
    anyhow::ensure!(churn.ok == 10_000, "{churn:?}");
    // Per-stream balancing still spreads them.
    for (backend, served) in &churn.by_backend {
        anyhow::ensure!(
            *served > 10_000 / GREETERS / 2,
            "{backend} served only {served}: {churn:?}"
        );
    }

    daemon.eventually("the pools are down to their idle cap again", || {
        Ok(upstream_sockets(&sandbox, &client)? <= kept)
    })?;
    daemon.eventually("shunt services reports what ss sees", || {
        let seen = upstream_sockets(&sandbox, &client)?;
        Ok(held(&daemon)?.reported_upstreams == seen)
    })?;
    let after = held(&daemon)?;
    anyhow::ensure!(
        after.descriptors <= before.descriptors + 16,
        "descriptors {} before, {} after 10,000 connections",
        before.descriptors,
        after.descriptors
    );
    anyhow::ensure!(
        after.rss_kib <= before.rss_kib + 8.0 * 1024.0,
        "RSS {:.0} KiB before, {:.0} KiB after 10,000 connections",
        before.rss_kib,
        after.rss_kib
    );
    let not_adopted = daemon.counter("proxy", "h2_upstreams_not_adopted")?;
    let retired = daemon.counter("proxy", "h2_upstreams_retired")?;
    let opened = daemon.counter("proxy", "h2_upstreams_opened")?;
    let closed = daemon.counter("proxy", "h2_upstreams_closed")?;
    eprintln!(
        "upstream HTTP/2 connections: opened {opened}, closed {closed} (retired {retired}), \
         not adopted {not_adopted}; descriptors {} -> {}, RSS {:.0} -> {:.0} KiB",
        before.descriptors, after.descriptors, before.rss_kib, after.rss_kib
    );
    // The pool grew with concurrent streams, not with client connections.
    anyhow::ensure!(
        opened < 200,
        "{opened} upstream connections opened for 10,000 client connections"
    );
    anyhow::ensure!(
        opened - closed == after.reported_upstreams,
        "the counters disagree with shunt services: opened {opened}, closed {closed}, reported {}",
        after.reported_upstreams
    );
    Ok(())
}

#[test]
fn pools_of_an_unenrolled_pod_are_closed() -> anyhow::Result<()> {
    let (sandbox, client, endpoints) = grpc::client_and_tonic_greeters(GREETERS, PORT)?;
    let daemon = Daemon::start(&sandbox, &[&client], &options(&endpoints))?;
    let calls = grpc::call(&sandbox, &client, vip(PORT), 30)?;
    calls.check_even(30, GREETERS, 0.5)?;
    anyhow::ensure!(upstream_sockets(&sandbox, &client)? > 0);
    daemon.ctl(&["unenroll", "--name", &client.name])?;
    daemon.eventually("no upstream connection left in the pod", || {
        Ok(upstream_sockets(&sandbox, &client)? == 0)
    })?;
    Ok(())
}
