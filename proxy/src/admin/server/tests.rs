//! The handlers, driven as the server drives them (a request parsed, then executed) against
//! the daemon's own state types and stand-ins for the kernel's side.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex};

use http_body_util::BodyExt;
use hyper::Method;
use serde::de::DeserializeOwned;
use tokio::{net::TcpListener, task::AbortHandle};

use super::*;
use crate::{
    admin::programs::ProgramsStatus,
    config::{self, Config, Listen},
    inpod::{EnrolledNamespaces, EnrollmentConfig, KernelError},
    proxy::{Intercept, Pod},
};

/// The loaded programs: fixed figures, and a record of uninstalls.
#[derive(Default)]
struct FakePrograms {
    uninstalled: Mutex<usize>,
}

impl Programs for FakePrograms {
    fn status(&self) -> ProgramsStatus {
        ProgramsStatus {
            cgroup: "/sys/fs/cgroup/test".into(),
            pin_dir: "/sys/fs/bpf/test".into(),
            attachment: api::Attachment::Attached,
            local_fast_path: "off".into(),
            local_fast_path_sockets: 0,
            kernel: api::KernelStatus {
                release: "5.10.0-28-amd64".into(),
                features: vec![api::KernelFeature {
                    name: "local_fast_path".into(),
                    available: false,
                    needs: "Linux 5.15".into(),
                }],
            },
        }
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([("redirected", 11)])
    }

    fn uninstall(&self) -> Result<Vec<PathBuf>, String> {
        *self.uninstalled.lock().unwrap() += 1;
        Ok(vec!["/sys/fs/bpf/test/maps/ENROLLED".into()])
    }
}

/// Neither kernel nor data path: these tests enroll nothing that succeeds.
struct Nowhere;

impl EnrolledNamespaces for Nowhere {
    fn netns_cookie(&self, _: &socket2::Socket) -> Result<u64, KernelError> {
        Err("no kernel in this test".into())
    }
    fn enroll(&self, _: u64) -> Result<(), KernelError> {
        Err("no kernel in this test".into())
    }
    fn unenroll(&self, _: u64) -> Result<(), KernelError> {
        Ok(())
    }
    fn cookies(&self) -> Vec<u64> {
        Vec::new()
    }
}

impl Intercept for Nowhere {
    fn serve_pod(self: Arc<Self>, _: Pod, _: &[Arc<TcpListener>]) -> Vec<AbortHandle> {
        Vec::new()
    }
}

struct Harness {
    ctx: AdminContext,
    programs: Arc<FakePrograms>,
    commands: mpsc::Receiver<Command>,
    config_path: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}

fn harness(name: &str) -> Harness {
    let config_path =
        std::env::temp_dir().join(format!("shunt-admin-{}-{name}.yaml", std::process::id()));
    std::fs::write(&config_path, "{}\n").expect("writing the config");
    let config = Config::default();
    let telemetry = Telemetry::start(
        &config::Telemetry {
            metrics: Listen::Off,
            health: Listen::Off,
            ..Default::default()
        },
        Vec::new(),
    )
    .expect("telemetry");
    let settings = Arc::new(ArcSwap::from_pointee(Settings::new(&config)));
    let faults = Arc::new(Faults::new(Vec::new(), config.max_active_faults));
    let programs = Arc::new(FakePrograms::default());
    let (commands, command_rx) = mpsc::channel(4);
    let ctx = AdminContext {
        configs: Arc::new(Configs::new(
            &config_path,
            config.clone(),
            settings.clone(),
            faults.clone(),
        )),
        settings,
        discovered: Default::default(),
        faults,
        streams: Arc::new(StreamLog::new(telemetry.observer())),
        conns: Arc::new(ConnTable::new(telemetry.observer())),
        telemetry,
        started: Instant::now(),
        enrollments: Arc::new(Enrollments::new(
            Arc::new(Nowhere),
            Arc::new(Nowhere),
            EnrollmentConfig {
                listen_port: 15001,
                mark: 0,
            },
        )),
        programs: programs.clone(),
        counters: Arc::default(),
        commands,
        kubernetes: None,
        handing_off: Arc::default(),
        kernel_path: Arc::new(|| crate::kernel_path::KernelPathSummary {
            mode: "declared".into(),
            ports: vec![6379],
            ..Default::default()
        }),
    };
    Harness {
        ctx,
        programs,
        commands: command_rx,
        config_path,
    }
}

/// Parses and executes one request as the server does; the status and the body.
async fn call(ctx: &AdminContext, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let reply = match AdminRequest::parse(&method, path, body.as_bytes()) {
        Ok(request) => execute(request, ctx).await,
        Err(e) => error(e.status(), e.to_string()),
    };
    let status = reply.status();
    let body = reply.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get<T: DeserializeOwned>(ctx: &AdminContext, path: &str) -> T {
    let (status, body) = call(ctx, Method::GET, path, "").await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

#[tokio::test]
async fn status_and_stats_read_each_owner() {
    let h = harness("status");
    let status: Status = get(&h.ctx, "/status").await;
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.pin_dir, PathBuf::from("/sys/fs/bpf/test"));
    assert_eq!(status.attachment, api::Attachment::Attached);
    assert_eq!(
        (status.pods, status.services, status.fault_rules),
        (0, 0, 0)
    );
    let limits = &h.ctx.settings.load().limits;
    assert_eq!(status.max_connections, limits.max_connections);
    // No readiness check was installed: the daemon is still starting.
    assert_ne!(status.ready, "ready");
    assert_eq!(status.kernel.release, "5.10.0-28-amd64");
    assert!(!status.kernel.features[0].available);

    let stats: Stats = get(&h.ctx, "/stats").await;
    assert_eq!(stats.ebpf.get("redirected"), Some(&11));
    assert!(stats.proxy.contains_key("accepted"), "{:?}", stats.proxy);
}

#[tokio::test]
async fn fault_rules_are_set_listed_and_cleared() {
    let h = harness("faults");
    let rule = "name: slow\nmatch: {service: greeter}\ndelay: {fixed: 1s, percentage: 50}\n";
    let body = serde_json::to_string(&api::FaultsRequest { rules: rule.into() }).unwrap();
    let (status, reply) = call(&h.ctx, Method::POST, "/faults", &body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let set: FaultsSet = serde_json::from_str(&reply).unwrap();
    assert_eq!(set.set, ["slow"]);

    let listed: Vec<api::RuleSummary> = get(&h.ctx, "/faults").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].rule.name, "slow");
    let status: Status = get(&h.ctx, "/status").await;
    assert_eq!(status.fault_rules, 1);

    // A rule with an error is refused whole, the field named, and the rules stay.
    let bad = "name: bad\nmatch: {service: greeter}\ndelay: {fixed: 1s, percentage: 150}\n";
    let body = serde_json::to_string(&api::FaultsRequest { rules: bad.into() }).unwrap();
    let (status, reply) = call(&h.ctx, Method::POST, "/faults", &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert!(reply.contains("percentage"), "{reply}");
    assert_eq!(
        get::<Vec<api::RuleSummary>>(&h.ctx, "/faults").await.len(),
        1
    );

    let (status, _) = call(&h.ctx, Method::DELETE, "/faults/slow", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, reply) = call(&h.ctx, Method::DELETE, "/faults/slow", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert!(
        get::<Vec<api::RuleSummary>>(&h.ctx, "/faults")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_reload_swaps_services_in_and_a_bad_one_changes_nothing() {
    let h = harness("reload");
    std::fs::write(
        &h.config_path,
        "services:\n  - name: greeter\n    vip: 10.96.0.10:50051\n    endpoints: [10.200.0.11:50051]\n",
    )
    .unwrap();
    let (status, reply) = call(&h.ctx, Method::POST, "/reload", "").await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        serde_json::from_str::<Reloaded>(&reply).unwrap().services,
        1
    );
    let services: Vec<api::ServiceSummary> = get(&h.ctx, "/services").await;
    assert_eq!(services.len(), 1, "{services:?}");
    assert_eq!(services[0].name, "greeter");
    assert_eq!(services[0].endpoints.len(), 1);

    std::fs::write(
        &h.config_path,
        "services:\n  - name: broken\n    vip: nowhere\n",
    )
    .unwrap();
    let (status, reply) = call(&h.ctx, Method::POST, "/reload", "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert!(reply.contains("services"), "the field is named: {reply}");
    let services: Vec<api::ServiceSummary> = get(&h.ctx, "/services").await;
    assert_eq!(services[0].name, "greeter", "the running Services stay");
}

#[tokio::test]
async fn enrollment_errors_are_answered_not_fatal() {
    let h = harness("pods");
    let body = r#"{"name": "ghost", "netns": "/run/netns/shunt-no-such-netns"}"#;
    let (status, reply) = call(&h.ctx, Method::POST, "/pods", body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{reply}");
    assert!(
        reply.contains("ghost") && reply.contains("shunt-no-such-netns"),
        "{reply}"
    );
    let (status, reply) = call(&h.ctx, Method::DELETE, "/pods/ghost", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    let (status, reply) = call(&h.ctx, Method::POST, "/pods", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert!(
        get::<Vec<api::PodSummary>>(&h.ctx, "/pods")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn uninstall_removes_the_pins_and_stops_the_daemon() {
    let mut h = harness("uninstall");
    let (status, reply) = call(&h.ctx, Method::POST, "/uninstall", "").await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let uninstalled: Uninstalled = serde_json::from_str(&reply).unwrap();
    assert_eq!(uninstalled.removed.len(), 1);
    assert_eq!(*h.programs.uninstalled.lock().unwrap(), 1);
    assert!(matches!(h.commands.try_recv(), Ok(Command::Uninstall)));
}

#[tokio::test]
async fn one_handoff_at_a_time() {
    let mut h = harness("handoff");
    let request = serde_json::to_string(&HandoffRequest {
        pid: 4242,
        socket: "/run/shunt/handoff.sock".into(),
    })
    .unwrap();
    let (status, reply) = call(&h.ctx, Method::POST, "/handoff", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert!(matches!(h.commands.try_recv(), Ok(Command::HandOff(r)) if r.pid == 4242));
    let (status, reply) = call(&h.ctx, Method::POST, "/handoff", &request).await;
    assert_eq!(status, StatusCode::CONFLICT, "{reply}");
    assert!(
        h.commands.try_recv().is_err(),
        "the second was not passed on"
    );

    // The daemon clears the flag when a handoff fails; then another may try.
    h.ctx
        .handing_off
        .store(false, std::sync::atomic::Ordering::Release);
    let (status, _) = call(&h.ctx, Method::POST, "/handoff", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}
