//! Transparent redirection of enrolled pods' connections, against the real kernel: every test
//! builds its own sandbox (network namespaces, bridge, cgroup) and daemon (pins, admin
//! socket), so tests run in parallel and leave nothing behind. Run as root.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use ipnet::IpNet;
use shunt::{admin::api::PodSummary, config::FailMode};
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture, kernel, probe,
    sandbox::{Pod, Sandbox},
};

const PORT: u16 = 8080;

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ipv4.into(), port)
}

/// Counter deltas over `f`, read from the daemon before and after.
fn delta(
    daemon: &Daemon,
    counters: &[(&str, &str)],
    f: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<u64>> {
    let before: Vec<u64> = counters
        .iter()
        .map(|(s, n)| daemon.counter(s, n))
        .collect::<anyhow::Result<_>>()?;
    f()?;
    let after: Vec<u64> = counters
        .iter()
        .map(|(s, n)| daemon.counter(s, n))
        .collect::<anyhow::Result<_>>()?;
    Ok(after.iter().zip(&before).map(|(a, b)| a - b).collect())
}

#[test]
fn enrolled_pod_is_redirected_and_keeps_its_view_of_the_connection() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    let daemon = Daemon::start(&sandbox, &[&client], &Options::default())?;

    let held = probe::connect_held(
        &sandbox,
        &client,
        v4(&backend, PORT),
        Duration::from_millis(1500),
    )?;
    // While it is open, shunt lists it with the destination the application asked for.
    let conn = daemon.connection_with_upstream(Duration::from_secs(5))?;
    let seen = held.finish(&sandbox)?;
    seen.ok()?;

    assert_eq!(conn.pod, "client");
    assert_eq!(conn.original_dst, v4(&backend, PORT));
    assert_eq!(conn.upstream, Some(v4(&backend, PORT)));
    assert!(
        seen.was_redirected(),
        "the client's socket was not connected to shunt: {seen:?}"
    );
    // getpeername() shows the original destination, not the listener.
    assert_eq!(
        seen.peername.as_deref(),
        Some(v4(&backend, PORT).to_string().as_str())
    );
    // The backend sees the client pod's address: shunt dialled from inside the pod.
    assert_eq!(seen.server_saw_ip(), Some(IpAddr::from(client.ipv4)));
    assert_eq!(seen.server.as_deref(), Some("backend"));
    assert_eq!(seen.echo.as_deref(), Some("hello"));

    for (source, name) in [
        ("ebpf", "redirected"),
        ("ebpf", "dst_recorded"),
        ("ebpf", "peername_rewritten"),
        ("proxy", "accepted"),
        ("proxy", "forwarded"),
    ] {
        assert_eq!(daemon.counter(source, name)?, 1, "{source}.{name}");
    }
    assert_eq!(
        daemon.counter("proxy", "bytes_from_clients")?,
        "hello\n".len() as u64
    );

    // The kernel programs' aya-log messages reach the daemon's log.
    let expected = format!("redirect {} to listener", v4(&backend, PORT));
    fixture::until(
        &format!("{expected:?} in the log"),
        Duration::from_secs(3),
        || Ok(daemon.log_text().contains(&expected)),
    )
    .with_context(|| format!("shunt's log:\n{}", daemon.log_text()))
}

#[test]
fn non_enrolled_pod_is_left_alone() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let enrolled = sandbox.add_pod("enrolled")?;
    let other = sandbox.add_pod("other")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    let daemon = Daemon::start(&sandbox, &[&enrolled], &Options::default())?;

    let d = delta(
        &daemon,
        &[
            ("ebpf", "redirected"),
            ("ebpf", "skip_not_enrolled"),
            ("proxy", "accepted"),
        ],
        || {
            let seen = probe::connect_once(&sandbox, &other, v4(&backend, PORT), &[])?;
            assert!(!seen.was_redirected(), "{seen:?}");
            assert_eq!(seen.local_ip(), Some(IpAddr::from(other.ipv4)));
            assert_eq!(seen.server_saw_ip(), Some(IpAddr::from(other.ipv4)));
            Ok(())
        },
    )?;
    assert_eq!(d[0], 0, "redirected");
    assert!(d[1] >= 1, "skip_not_enrolled");
    assert_eq!(d[2], 0, "accepted");
    Ok(())
}

#[test]
fn concurrent_pods_each_get_their_own_original_destination() -> anyhow::Result<()> {
    const EACH: u32 = 50;
    let sandbox = Sandbox::new()?;
    let a = sandbox.add_pod("a")?;
    let b = sandbox.add_pod("b")?;
    let backend_a = sandbox.add_pod("backend-a")?;
    let backend_b = sandbox.add_pod("backend-b")?;
    probe::serve(&sandbox, &backend_a, v4(&backend_a, 8081))?;
    probe::serve(&sandbox, &backend_b, v4(&backend_b, 8082))?;
    let daemon = Daemon::start(&sandbox, &[&a, &b], &Options::default())?;

    let (seen_a, seen_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| probe::connect(&sandbox, &a, v4(&backend_a, 8081), EACH));
        let tb = s.spawn(|| probe::connect(&sandbox, &b, v4(&backend_b, 8082), EACH));
        (ta.join(), tb.join())
    });
    let seen_a = seen_a.map_err(|_| anyhow::anyhow!("client a panicked"))??;
    let seen_b = seen_b.map_err(|_| anyhow::anyhow!("client b panicked"))??;
    for (pod, backend, port, seen) in [
        (&a, &backend_a, 8081, &seen_a),
        (&b, &backend_b, 8082, &seen_b),
    ] {
        for s in seen {
            s.ok()?;
            assert!(s.was_redirected(), "{s:?}");
            assert_eq!(s.server.as_deref(), Some(backend.name.as_str()), "{s:?}");
            assert_eq!(
                s.peername.as_deref(),
                Some(v4(backend, port).to_string().as_str())
            );
            assert_eq!(s.server_saw_ip(), Some(IpAddr::from(pod.ipv4)));
        }
    }
    assert_eq!(daemon.counter("ebpf", "redirected")?, u64::from(2 * EACH));
    Ok(())
}

#[test]
fn shunts_own_upstream_connections_are_not_redirected() -> anyhow::Result<()> {
    const N: u32 = 20;
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    // The daemon runs in the cgroup the programs are attached to, in the client's netns for
    // its upstream sockets: only its mark keeps them from being redirected to itself.
    let daemon = Daemon::start(&sandbox, &[&client], &Options::default())?;
    let d = delta(
        &daemon,
        &[
            ("ebpf", "redirected"),
            ("ebpf", "skip_marked"),
            ("proxy", "forwarded"),
        ],
        || {
            for seen in probe::connect(&sandbox, &client, v4(&backend, PORT), N)? {
                seen.ok()?;
                assert_eq!(seen.server_saw_ip(), Some(IpAddr::from(client.ipv4)));
            }
            Ok(())
        },
    )?;
    assert_eq!(
        d,
        vec![u64::from(N); 3],
        "redirected, skip_marked, forwarded"
    );
    Ok(())
}

#[test]
fn ipv6_and_ipv4_mapped_destinations_are_redirected() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    // Dual-stack listener: sees IPv6 and IPv4 clients.
    probe::serve(
        &sandbox,
        &backend,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), PORT),
    )?;
    let daemon = Daemon::start(&sandbox, &[&client], &Options::default())?;

    let v6_dst = SocketAddr::new(backend.ipv6.into(), PORT);
    let seen = probe::connect_once(&sandbox, &client, v6_dst, &[])?;
    assert!(seen.was_redirected(), "{seen:?}");
    assert_eq!(seen.peername.as_deref(), Some(v6_dst.to_string().as_str()));
    assert_eq!(seen.server_saw_ip(), Some(IpAddr::from(client.ipv6)));

    let mapped_dst = SocketAddr::new(backend.ipv4.to_ipv6_mapped().into(), PORT);
    let seen = probe::connect_once(&sandbox, &client, mapped_dst, &[])?;
    assert!(seen.was_redirected(), "{seen:?}");
    assert_eq!(
        seen.peername.as_deref(),
        Some(mapped_dst.to_string().as_str())
    );
    assert_eq!(seen.server_saw_ip(), Some(IpAddr::from(client.ipv4)));

    assert_eq!(daemon.counter("ebpf", "redirected")?, 2);
    assert_eq!(daemon.counter("proxy", "forwarded")?, 2);
    Ok(())
}

#[test]
fn fail_open_goes_direct_while_down_and_a_restart_takes_back_interception() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    let mut daemon = Daemon::start(&sandbox, &[&client], &Options::default())?;
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());

    daemon.kill9();
    let seen = probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?;
    assert!(
        !seen.was_redirected(),
        "shunt is down, yet redirected: {seen:?}"
    );
    assert_eq!(seen.server_saw_ip(), Some(IpAddr::from(client.ipv4)));

    daemon.launch()?;
    assert!(
        daemon.log_text().contains("took over pinned link"),
        "log:\n{}",
        daemon.log_text()
    );
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());
    // Counters live in the pinned map, so they span the restart.
    assert_eq!(daemon.counter("ebpf", "skip_no_listener")?, 1);
    assert_eq!(daemon.counter("ebpf", "redirected")?, 2);
    // Taking over replaced the programs in place: each is attached once.
    let mut attached = kernel::attached_programs(sandbox.cgroup())?;
    attached.sort();
    assert_eq!(
        attached,
        [
            "shunt_connect4",
            "shunt_connect6",
            "shunt_getpeer4",
            "shunt_getpeer6",
            "shunt_sock_ops"
        ]
    );
    Ok(())
}

#[test]
fn fail_closed_refuses_while_down() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    let options = Options::default().with_config(|c| c.intercept.fail_mode = FailMode::Closed);
    let mut daemon = Daemon::start(&sandbox, &[&client], &options)?;
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());

    daemon.kill9();
    let seen = probe::connect(&sandbox, &client, v4(&backend, PORT), 1)?.remove(0);
    let error = seen
        .error
        .context("connection succeeded while shunt was down in fail-closed mode")?;
    assert!(error.contains("refused"), "{error}");

    daemon.launch()?;
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());
    assert_eq!(daemon.counter("ebpf", "redirected_no_listener")?, 1);
    Ok(())
}

#[test]
fn uninstall_leaves_no_program_link_or_pin() -> anyhow::Result<()> {
    uninstall_removes_everything(&Options::default(), 0)
}

/// With the local fast path on, its `sk_msg` program is pinned too, and goes as well.
#[test]
fn uninstall_with_the_local_fast_path_leaves_nothing() -> anyhow::Result<()> {
    if !shunt_tests::kernel::has("local_fast_path")? {
        return Ok(());
    }
    let options = Options::default().with_config(|c| c.intercept.local_fast_path = true);
    uninstall_removes_everything(&options, 1)
}

/// `extra_programs`: pinned programs beyond the cgroup ones and the sockmap verdict.
fn uninstall_removes_everything(options: &Options, extra_programs: usize) -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let mut daemon = Daemon::start(&sandbox, &[&client], options)?;

    let mut ids = Vec::new();
    for kind in ["progs", "links", "maps"] {
        let dir = daemon.pin_dir.join(kind);
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let pin = entry?.path();
            let object = &kind[..kind.len() - 1];
            let out = kernel::bpftool(&["-j", object, "show", "pinned", &pin.to_string_lossy()])?;
            let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let id = shown["id"]
                .as_u64()
                .with_context(|| format!("no id for {}", pin.display()))?;
            ids.push((object, id));
        }
    }
    // Five cgroup programs with their links plus the sockmap stream verdict (attached to its
    // map, no link; where the kernel has it) and, with the local fast path, its sk_msg program
    // (likewise); seven maps plus the three sockmap ones and the fast path's sockhash (always
    // there, empty when off).
    let verdict = shunt_tests::kernel::status()?
        .features
        .iter()
        .any(|f| f.name == "sockmap_forwarding" && f.available);
    assert_eq!(
        ids.len(),
        5 + usize::from(verdict) + extra_programs + 5 + 11,
        "programs, links, maps: {ids:?}"
    );
    assert_eq!(kernel::attached_programs(sandbox.cgroup())?.len(), 5);

    daemon.ctl(&["uninstall"])?;
    daemon.wait_exit(Duration::from_secs(10))?;
    assert!(
        !daemon.pin_dir.exists(),
        "{} still exists",
        daemon.pin_dir.display()
    );
    assert!(kernel::attached_programs(sandbox.cgroup())?.is_empty());
    // With the pins and the daemon gone, the kernel frees every object.
    fixture::until("every object freed", Duration::from_secs(5), || {
        for &(object, id) in &ids {
            let out = kernel::bpftool(&[object, "show", "id", &id.to_string()])?;
            ensure!(!out.status.success(), "{object} {id} still exists");
        }
        Ok(true)
    })
}

#[test]
fn sandbox_leaves_nothing_behind() -> anyhow::Result<()> {
    let (netns, bridge, cgroup, pid) = {
        let sandbox = Sandbox::new()?;
        let pod = sandbox.add_pod("pod")?;
        let mut sleep = Command::new("sleep");
        sleep.arg("60");
        let pid = sandbox.spawn_in_pod(&pod, sleep)?;
        (
            pod.netns_path(),
            format!("shb{}", sandbox.id()),
            sandbox.cgroup().to_owned(),
            pid,
        )
    };
    assert!(!netns.exists(), "{} still exists", netns.display());
    assert!(!cgroup.exists(), "{} still exists", cgroup.display());
    let link = Command::new("ip")
        .args(["link", "show", &bridge])
        .output()?;
    assert!(!link.status.success(), "bridge {bridge} still exists");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still runs"
    );
    Ok(())
}

#[test]
fn excluded_cidrs_and_ports_go_direct() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let excluded = sandbox.add_pod("excluded")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &excluded, v4(&excluded, PORT))?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    probe::serve(&sandbox, &backend, v4(&backend, 9090))?;
    let options = Options::default().with_config(|c| {
        c.intercept.exclude_cidrs = vec![IpNet::from(IpAddr::from(excluded.ipv4))];
        c.intercept.exclude_ports = vec![9090];
    });
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;

    assert!(!probe::connect_once(&sandbox, &client, v4(&excluded, PORT), &[])?.was_redirected());
    assert!(!probe::connect_once(&sandbox, &client, v4(&backend, 9090), &[])?.was_redirected());
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());
    assert_eq!(daemon.counter("ebpf", "skip_excluded_cidr")?, 1);
    assert_eq!(daemon.counter("ebpf", "skip_excluded_port")?, 1);
    assert_eq!(daemon.counter("ebpf", "redirected")?, 1);
    Ok(())
}

#[test]
fn a_connection_redirected_by_iptables_is_proxied_to_its_original_destination() -> anyhow::Result<()>
{
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, 9090))?;
    // The programs leave port 9090 alone; a NAT rule sends it to the listener instead.
    let options = Options::default().with_config(|c| c.intercept.exclude_ports = vec![9090]);
    let daemon = Daemon::start(&sandbox, &[&client], &options)?;
    shunt_tests::iptables::redirect_to_shunt(&sandbox, &client, backend.ipv4, 9090)?;

    let seen = probe::connect_once(&sandbox, &client, v4(&backend, 9090), &[])?;
    assert_eq!(seen.server.as_deref(), Some("backend"));
    assert_eq!(seen.echo.as_deref(), Some("hello"));
    assert_eq!(daemon.counter("ebpf", "redirected")?, 0);
    assert_eq!(daemon.counter("proxy", "forwarded")?, 1);
    let closed = fixture::eventually("a closed connection", Duration::from_secs(10), || {
        let closed = daemon.closed_conns()?;
        Ok((!closed.is_empty()).then_some(closed))
    })?;
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].original_dst, v4(&backend, 9090));
    Ok(())
}

#[test]
fn pods_enroll_and_unenroll_at_runtime() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    let daemon = Daemon::start(&sandbox, &[], &Options::default())?;
    assert!(!probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());

    let netns = client.netns_path().to_string_lossy().into_owned();
    daemon.ctl(&["enroll", "--name", "client", "--netns", &netns])?;
    let pods: Vec<PodSummary> = daemon.ctl_as(&["pods"])?;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].name, "client");
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());

    daemon.ctl(&["unenroll", "--name", "client"])?;
    assert!(!probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());
    assert_eq!(daemon.ctl_as::<Vec<PodSummary>>(&["pods"])?.len(), 0);
    Ok(())
}

#[test]
fn a_pod_that_cannot_be_enrolled_is_reported_and_the_others_are_served() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let backend = sandbox.add_pod("backend")?;
    probe::serve(&sandbox, &backend, v4(&backend, PORT))?;
    let ghost = Pod {
        name: "ghost".into(),
        netns: format!("sh{}-ghost", sandbox.id()),
        ..client.clone()
    };
    let daemon = Daemon::start(&sandbox, &[&ghost, &client], &Options::default())?;
    let log = daemon.log_text();
    assert!(
        log.contains("ghost") && log.contains(&ghost.netns),
        "log does not name the failed pod:\n{log}"
    );
    assert!(probe::connect_once(&sandbox, &client, v4(&backend, PORT), &[])?.was_redirected());
    Ok(())
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() -> anyhow::Result<()> {
    shunt_tests::require_root()?;
    let dir = std::env::temp_dir().join(format!("shunt-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cases = [
        (
            "intercept:\n  exclude_cidrs: [10.0.0.300/8]\n",
            "intercept.exclude_cidrs[0]",
        ),
        (
            "intercept:\n  exclude_ports: [70000]\n",
            "intercept.exclude_ports[0]",
        ),
        ("intercept:\n  listen_prot: 15001\n", "listen_prot"),
        (
            "intercept:\n  fail_mode: sometimes\n",
            "intercept.fail_mode",
        ),
    ];
    for (yaml, field) in cases {
        let pin_dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/shunt-badconfig-{}",
            std::process::id()
        ));
        let config = dir.join("config.yaml");
        let yaml_with_pins = yaml.replacen(
            "intercept:\n",
            &format!("intercept:\n  pin_dir: {}\n", pin_dir.display()),
            1,
        );
        std::fs::write(
            &config,
            format!(
                "{yaml_with_pins}admin:\n  socket: {}\n",
                dir.join("admin.sock").display()
            ),
        )?;
        let child = Command::new(shunt_tests::shunt_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let out = shunt_tests::sandbox::wait_with_timeout(child, Duration::from_secs(10))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {yaml:?}");
        assert!(
            stderr.contains(field),
            "error for {yaml:?} does not name {field}: {stderr}"
        );
        assert!(!pin_dir.exists());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
