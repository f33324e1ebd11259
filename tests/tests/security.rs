//! What shunt refuses to do: serve its admin API to anyone but root and `admin.group`, keep
//! capabilities it does not use, start without one it needs, relay a connection anywhere but
//! its destination's Service, touch pods that are not enrolled, or let requests inject
//! faults unless a rule allows it. Run as root.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::Context;
use shunt::admin::api::RuleSummary;
use shunt_tests::{
    daemon::{Daemon, Options},
    fixture,
    sandbox::{Pod, Sandbox},
    web,
};

/// The first fault rule in force (`shunt faults list`).
fn first_rule(daemon: &Daemon) -> anyhow::Result<RuleSummary> {
    let rules: Vec<RuleSummary> = daemon.ctl_as(&["faults", "list"])?;
    rules.into_iter().next().context("no fault rule in force")
}

/// An unprivileged user and group, and a group that only the admin-group tests use.
const NOBODY: &str = "65534";
const ADMINS: &str = "4242";

/// The shunt binary where an unprivileged user can run it whatever the checkout's modes.
fn shunt_for_anyone(sandbox: &Sandbox) -> anyhow::Result<PathBuf> {
    let dir = sandbox.scratch_dir("bin")?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let bin = dir.join("shunt");
    std::fs::copy(shunt_tests::shunt_bin(), &bin).context("copying shunt")?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// Runs `shunt status` against `socket` as `uid` with primary group `gid` and the
/// supplementary `groups` (none when empty).
fn status_as(bin: &Path, socket: &Path, uid: &str, gid: &str, groups: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", uid, "--regid", gid]);
    match groups {
        [] => cmd.arg("--clear-groups"),
        _ => cmd.args(["--groups", &groups.join(",")]),
    };
    cmd.arg(bin).arg("--admin-socket").arg(socket).arg("status");
    // The copy may be briefly "busy" while a test running beside this one forks with the
    // copy's write descriptor open (until its exec closes it).
    for _ in 0..50 {
        let out = cmd.output().expect("setpriv runs");
        if !text(&out).contains("Text file busy") {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cmd.output().expect("setpriv runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The socket's directory, traversable by everyone, so that only the socket's own mode and
/// the daemon's credential check decide.
fn open_socket_dir(daemon: &Daemon) -> anyhow::Result<()> {
    let dir = daemon
        .socket
        .parent()
        .context("the socket has a directory")?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[test]
fn the_admin_socket_is_root_only_by_default() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let daemon = Daemon::start(&sandbox, &[], &Options::default())?;
    open_socket_dir(&daemon)?;
    let bin = shunt_for_anyone(&sandbox)?;

    let mode = std::fs::metadata(&daemon.socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    let root = status_as(&bin, &daemon.socket, "0", "0", &[]);
    assert!(root.status.success(), "root: {}", text(&root));
    let nobody = status_as(&bin, &daemon.socket, NOBODY, NOBODY, &[]);
    assert!(
        !nobody.status.success(),
        "nobody was served: {}",
        text(&nobody)
    );
    assert!(
        text(&nobody).contains("permission denied"),
        "{}",
        text(&nobody)
    );
    Ok(())
}

#[test]
fn the_admin_group_is_admitted_by_primary_or_supplementary_group_and_no_one_else()
-> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let options = Options::default().with_config(|c| c.admin.group = Some(ADMINS.into()));
    let daemon = Daemon::start(&sandbox, &[], &options)?;
    open_socket_dir(&daemon)?;
    let bin = shunt_for_anyone(&sandbox)?;

    let meta = std::fs::metadata(&daemon.socket)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid().to_string(), ADMINS);

    let primary = status_as(&bin, &daemon.socket, NOBODY, ADMINS, &[]);
    assert!(
        primary.status.success(),
        "primary group: {}",
        text(&primary)
    );
    let supplementary = status_as(&bin, &daemon.socket, NOBODY, NOBODY, &[ADMINS]);
    assert!(
        supplementary.status.success(),
        "supplementary group: {}",
        text(&supplementary)
    );
    let outsider = status_as(&bin, &daemon.socket, NOBODY, NOBODY, &[]);
    assert!(!outsider.status.success(), "outsider: {}", text(&outsider));

    // Loosen the file's mode: the daemon's own check still refuses the outsider.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666))?;
    let outsider = status_as(&bin, &daemon.socket, NOBODY, NOBODY, &[]);
    assert!(!outsider.status.success(), "outsider: {}", text(&outsider));
    assert!(
        text(&outsider).contains("neither root nor in admin.group"),
        "{}",
        text(&outsider)
    );

    // A member may inspect and steer, but not take the listeners over.
    let handoff = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", ADMINS, "--clear-groups"])
        .args(["curl", "-s", "--unix-socket"])
        .arg(&daemon.socket)
        .args([
            "-X",
            "POST",
            "-d",
            r#"{"socket":"/tmp/steal.sock","pid":1}"#,
        ])
        .arg("http://shunt/handoff")
        .output()?;
    assert!(
        text(&handoff).contains("only root may take over"),
        "{}",
        text(&handoff)
    );
    assert!(daemon.is_running(), "the daemon kept serving");
    Ok(())
}

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// A `Cap…:` line of `/proc/…/status`, as a bit set.
fn cap_set(status: &str, name: &str) -> anyhow::Result<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .with_context(|| format!("no {name} in status"))?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

#[test]
fn every_thread_of_the_daemon_keeps_only_the_capabilities_it_needs() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let server = sandbox.add_pod("web")?;
    web::serve(&sandbox, &server, 8080, &[("index.html", "served\n")])?;
    let daemon = Daemon::start(&sandbox, &[&client], &Options::default())?;
    // The daemon still proxies with what it kept.
    assert_eq!(
        web::curl(
            &sandbox,
            &client,
            SocketAddr::new(server.ipv4.into(), 8080),
            &[]
        )?,
        "served\n"
    );
    assert!(daemon.counter("proxy", "accepted")? >= 1);

    let kept = (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_SYS_ADMIN);
    let tasks = PathBuf::from(format!("/proc/{}/task", daemon.pid()?));
    let mut threads = 0;
    for task in std::fs::read_dir(&tasks)? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                cap_set(&status, set)?,
                kept,
                "{set} of a daemon thread:\n{status}"
            );
        }
        for set in ["CapInh", "CapAmb"] {
            assert_eq!(cap_set(&status, set)?, 0, "{set}:\n{status}");
        }
        threads += 1;
    }
    assert!(threads > 1, "the workers are threads of their own");
    Ok(())
}

#[test]
fn a_missing_capability_is_named_and_nothing_is_set_up() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let dir = sandbox.scratch_dir("nocaps")?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/shunt-nocaps-{}", sandbox.id()));
    sandbox.track_pin_dir(pin_dir.clone());
    let socket = dir.join("admin.sock");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "intercept:\n  cgroup: {}\n  pin_dir: {}\nadmin:\n  socket: {}\ntelemetry:\n  metrics: 'off'\n  health: 'off'\n",
            sandbox.cgroup().display(),
            pin_dir.display(),
            socket.display()
        ),
    )?;
    let run_without = |cap: &str, extra: &[&str]| -> anyhow::Result<Output> {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--bounding-set",
            &format!("-{cap}"),
            "--inh-caps",
            &format!("-{cap}"),
        ])
        .arg(shunt_tests::shunt_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(extra);
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        shunt_tests::sandbox::wait_with_timeout(child, Duration::from_secs(20))
    };
    for (cap, extra, name) in [
        ("net_admin", &[][..], "CAP_NET_ADMIN"),
        ("sys_admin", &[][..], "CAP_SYS_ADMIN"),
        ("sys_ptrace", &["--kubernetes"][..], "CAP_SYS_PTRACE"),
    ] {
        let out = run_without(cap, extra)?;
        assert!(!out.status.success(), "started without {name}");
        let said = text(&out);
        assert!(
            said.contains(&format!("needs {name}")) && said.contains("run it as root"),
            "without {name}: {said}"
        );
        assert!(
            !socket.exists(),
            "an admin socket was created without {name}"
        );
        assert!(!pin_dir.exists(), "pins were created without {name}");
    }
    Ok(())
}

/// A start that fails after the programs are loaded, attached and pinned (here: Kubernetes
/// mode with a kubeconfig that is not there) undoes all of it. Fail-closed shows it: programs
/// left attached with no daemon would refuse the pod's connections.
#[test]
fn a_start_that_fails_after_loading_the_programs_leaves_nothing_behind() -> anyhow::Result<()> {
    let (sandbox, client, server) = shunt_tests::probe::client_and_server(7201)?;
    let missing = sandbox.scratch_dir("kube")?.join("no-such-kubeconfig");
    let options = Options {
        kubernetes: true,
        ..Default::default()
    }
    .with_config(|config| {
        config.intercept.fail_mode = shunt::config::FailMode::Closed;
        config.kubernetes.kubeconfig = Some(missing.clone());
        config.kubernetes.node_name = Some("node-a".into());
    });
    let mut daemon = Daemon::configure(&sandbox, &[&client], &options)?;
    let started = daemon.launch();
    let log = daemon.log_text();
    anyhow::ensure!(
        started.is_err(),
        "shunt started without its kubeconfig: {log}"
    );
    anyhow::ensure!(
        log.contains("programs attached") && log.contains(&missing.display().to_string()),
        "it failed after attaching, naming the kubeconfig: {log}"
    );
    anyhow::ensure!(log.contains("start-up failed: removed the"), "{log}");
    anyhow::ensure!(
        !daemon.pin_dir.exists(),
        "pins left in {}",
        daemon.pin_dir.display()
    );
    let seen = shunt_tests::probe::connect_once(&sandbox, &client, server, &[])?;
    anyhow::ensure!(
        !seen.was_redirected(),
        "the pod's connection was redirected: {seen:?}"
    );
    Ok(())
}

/// Two web servers: the Service's endpoint, and one that is not part of it.
struct Web {
    sandbox: Sandbox,
    client: Pod,
    endpoint: SocketAddr,
    other: SocketAddr,
}

fn two_web_servers() -> anyhow::Result<Web> {
    let sandbox = Sandbox::new()?;
    let client = sandbox.add_pod("client")?;
    let endpoint = sandbox.add_pod("endpoint")?;
    let other = sandbox.add_pod("other")?;
    web::serve(&sandbox, &endpoint, 8080, &[("index.html", "endpoint\n")])?;
    web::serve(&sandbox, &other, 8080, &[("index.html", "other\n")])?;
    Ok(Web {
        endpoint: SocketAddr::new(endpoint.ipv4.into(), 8080),
        other: SocketAddr::new(other.ipv4.into(), 8080),
        sandbox,
        client,
    })
}

#[test]
fn a_redirected_connection_reaches_only_its_destinations_service_whatever_it_asks_for()
-> anyhow::Result<()> {
    let web = two_web_servers()?;
    let vip: SocketAddr = "10.96.0.80:80".parse()?;
    let _daemon = Daemon::start(
        &web.sandbox,
        &[&web.client],
        &fixture::service("web", vip, &[web.endpoint]),
    )?;
    let (sandbox, client) = (&web.sandbox, &web.client);
    let elsewhere = web.other.to_string();
    // HTTP/2 streams are routed by the connection's original destination, never by
    // :authority (curl sends Host as :authority).
    for args in [vec![], vec!["-H", &*format!("Host: {elsewhere}")]] {
        assert_eq!(
            web::curl(sandbox, client, vip, &args)?,
            "endpoint\n",
            "{args:?}"
        );
    }
    // A destination that is no Service's goes where the client sent it, and only there.
    assert_eq!(web::curl(sandbox, client, web.other, &[])?, "other\n");
    Ok(())
}

#[test]
fn a_pod_that_is_not_enrolled_reaches_a_vip_directly_never_through_shunt() -> anyhow::Result<()> {
    let web = two_web_servers()?;
    let bystander = web.sandbox.add_pod("bystander")?;
    // The Service's virtual address is a real one here, so that a connection that is not
    // redirected can be told from one that is by who answers.
    let vip = web.other;
    let daemon = Daemon::start(
        &web.sandbox,
        &[&web.client],
        &fixture::service("web", vip, &[web.endpoint]),
    )?;
    let before = daemon.counter("proxy", "accepted")?;
    let redirected = daemon.counter("ebpf", "redirected")?;
    for _ in 0..3 {
        assert_eq!(web::curl(&web.sandbox, &bystander, vip, &[])?, "other\n");
    }
    assert_eq!(daemon.counter("proxy", "accepted")?, before);
    assert_eq!(daemon.counter("ebpf", "redirected")?, redirected);
    assert!(daemon.counter("ebpf", "skip_not_enrolled")? >= 3);
    // The enrolled pod asking for the same address is balanced over the Service.
    assert_eq!(
        web::curl(&web.sandbox, &web.client, vip, &[])?,
        "endpoint\n"
    );
    assert_eq!(daemon.counter("proxy", "accepted")?, before + 1);
    Ok(())
}

/// The HTTP status of a request to `vip` carrying `headers`.
fn status_with(web: &Web, vip: SocketAddr, headers: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    for header in headers {
        args.extend(["-H", header]);
    }
    web::curl(&web.sandbox, &web.client, vip, &args)
}

#[test]
fn fault_headers_do_nothing_unless_a_rule_allows_them_and_max_active_faults_caps_them()
-> anyhow::Result<()> {
    let web = two_web_servers()?;
    let vip: SocketAddr = "10.96.0.81:80".parse()?;
    let abort = "x-shunt-fault-abort-http: 503";
    let daemon = Daemon::start(
        &web.sandbox,
        &[&web.client],
        &fixture::service("web", vip, &[web.endpoint]),
    )?;
    assert_eq!(
        status_with(&web, vip, &[abort])?,
        "200",
        "no rule, no fault"
    );

    let rule = "name: chaos\nmatch: {service: web}\nheader_control: true\n";
    daemon.set_faults(rule)?;
    assert_eq!(
        status_with(&web, vip, &[abort])?,
        "503",
        "allowed by the rule"
    );
    drop(daemon);

    // One fault at a time: a stream held by a header delay leaves none for another.
    let options =
        fixture::service("web", vip, &[web.endpoint]).with_config(|c| c.max_active_faults = 1);
    let daemon = Daemon::start(&web.sandbox, &[&web.client], &options)?;
    daemon.set_faults(rule)?;
    let mut slow = Command::new("curl");
    slow.args([
        "-s",
        "--http2-prior-knowledge",
        "-H",
        "x-shunt-fault-delay: 3s",
    ])
    .arg(format!("http://{vip}/index.html"));
    let held = web.sandbox.spawn_in_pod(&web.client, slow)?;
    daemon.eventually("the delayed stream holds the only fault slot", || {
        Ok(first_rule(&daemon)?.delays == 1)
    })?;
    assert_eq!(status_with(&web, vip, &[abort])?, "200", "capped");
    assert_eq!(first_rule(&daemon)?.overflow, 1);
    // The slot comes back when the delayed stream ends.
    web.sandbox.kill(held);
    daemon.eventually("the fault slot is free again", || {
        Ok(status_with(&web, vip, &[abort])? == "503")
    })?;
    Ok(())
}
