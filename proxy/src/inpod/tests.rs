//! Enrollment against a stand-in data path and kernel, with real network namespaces (made
//! with `ip netns`, so these need root; without it they say so and pass nothing off as
//! checked).

use std::{
    collections::BTreeSet,
    net::TcpStream,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, sync::mpsc, task::AbortHandle};

use super::*;
use crate::proxy::{Intercept, Pod};

const PORT: u16 = 15001;

/// What happened, in order, across the stand-ins.
type Events = Arc<Mutex<Vec<String>>>;

/// The programs' `ENROLLED` map.
struct FakeKernel {
    cookies: Mutex<BTreeSet<u64>>,
    refuse: AtomicBool,
    events: Events,
}

impl EnrolledNamespaces for FakeKernel {
    fn netns_cookie(&self, socket: &socket2::Socket) -> Result<u64, KernelError> {
        Ok(crate::bpf::netns_cookie(socket.as_fd())?)
    }

    fn enroll(&self, netns_cookie: u64) -> Result<(), KernelError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err("map full".into());
        }
        self.cookies.lock().unwrap().insert(netns_cookie);
        self.events.lock().unwrap().push("enroll".into());
        Ok(())
    }

    fn unenroll(&self, netns_cookie: u64) -> Result<(), KernelError> {
        self.cookies.lock().unwrap().remove(&netns_cookie);
        self.events.lock().unwrap().push("unenroll".into());
        Ok(())
    }

    fn cookies(&self) -> Vec<u64> {
        self.cookies.lock().unwrap().iter().copied().collect()
    }
}

/// The data path: accepts on each listener and reports the pod each connection came to.
struct FakeIntercept {
    accepted: mpsc::UnboundedSender<String>,
    events: Events,
}

impl Intercept for FakeIntercept {
    fn serve_pod(self: Arc<Self>, pod: Pod, listeners: &[Arc<TcpListener>]) -> Vec<AbortHandle> {
        self.events
            .lock()
            .unwrap()
            .push(format!("serve {} on {}", pod.name, listeners.len()));
        listeners
            .iter()
            .map(|listener| {
                let (listener, accepted, name) =
                    (listener.clone(), self.accepted.clone(), pod.name.clone());
                tokio::spawn(async move {
                    while let Ok((_conn, _)) = listener.accept().await {
                        let _ = accepted.send(name.clone());
                    }
                })
                .abort_handle()
            })
            .collect()
    }
}

struct Harness {
    enrollments: Enrollments,
    kernel: Arc<FakeKernel>,
    accepted: mpsc::UnboundedReceiver<String>,
    events: Events,
}

fn harness() -> Harness {
    let events = Events::default();
    let kernel = Arc::new(FakeKernel {
        cookies: Mutex::default(),
        refuse: AtomicBool::new(false),
        events: events.clone(),
    });
    let (tx, accepted) = mpsc::unbounded_channel();
    let intercept = Arc::new(FakeIntercept {
        accepted: tx,
        events: events.clone(),
    });
    let config = EnrollmentConfig {
        listen_port: PORT,
        mark: 0,
    };
    Harness {
        enrollments: Enrollments::new(kernel.clone(), intercept, config),
        kernel,
        accepted,
        events,
    }
}

/// A network namespace with loopback up, deleted when dropped.
struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    fn new(tag: &str) -> TestNetns {
        let name = format!("shunt-unit-{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let netns = TestNetns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    fn cookie(&self) -> u64 {
        let socket = Netns::open(&self.path)
            .and_then(|n| n.tcp_socket())
            .expect("a socket in the namespace");
        crate::bpf::netns_cookie(socket.as_fd()).expect("netns cookie")
    }

    /// Connects to a pod's IPv4 listener from inside its namespace.
    fn connect(&self) -> std::io::Result<TcpStream> {
        let netns = Netns::open(&self.path)?;
        netns.run(|| {
            TcpStream::connect_timeout(&(([127, 0, 0, 1], PORT).into()), Duration::from_secs(1))
        })?
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        init_host_netns().expect("recording the host netns");
        return true;
    }
    eprintln!("skipped: enrollment enters network namespaces, which needs root");
    false
}

/// Waits (a little) until the pod's listener refuses connections: it closes as its accept
/// task is dropped, which the runtime does soon after the abort.
async fn refused_soon(netns: &TestNetns) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if netns.connect().is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn enrolls_listeners_first_and_unenrolls_cookie_first() {
    if !root() {
        return;
    }
    let mut h = harness();
    let netns = TestNetns::new("order");
    let summary = h
        .enrollments
        .enroll("a", &netns.path, Origin::Operator)
        .expect("enroll");
    assert_eq!(summary.netns_cookie, netns.cookie());
    assert!(
        summary
            .listeners
            .contains(&SocketAddr::from(([127, 0, 0, 1], PORT)))
    );
    assert_eq!(h.kernel.cookies(), vec![netns.cookie()]);

    // The pod's connections reach the data path through its listener.
    let _conn = netns.connect().expect("connecting to the pod's listener");
    assert_eq!(h.accepted.recv().await.as_deref(), Some("a"));

    h.enrollments.unenroll("a").expect("unenroll");
    assert!(h.kernel.cookies().is_empty());
    assert!(h.enrollments.list().is_empty());
    assert!(
        refused_soon(&netns).await,
        "the listener closed on unenroll"
    );
    let events = h.events.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![
            format!("serve a on {}", summary.listeners.len()),
            "enroll".into(),
            "unenroll".into()
        ]
    );
}

#[tokio::test]
async fn refuses_duplicates_and_leaves_nothing_behind_a_failed_enrollment() {
    if !root() {
        return;
    }
    let h = harness();
    let (one, two) = (TestNetns::new("dup1"), TestNetns::new("dup2"));
    h.enrollments
        .enroll("a", &one.path, Origin::Config)
        .expect("enroll");
    let same_name = h.enrollments.enroll("a", &two.path, Origin::Config);
    assert!(
        matches!(same_name, Err(EnrollError::AlreadyEnrolled(_))),
        "{same_name:?}"
    );
    let same_netns = h.enrollments.enroll("b", &one.path, Origin::Config);
    assert!(
        matches!(&same_netns, Err(EnrollError::SameNetns { other, .. }) if other == "a"),
        "{same_netns:?}"
    );
    let missing =
        h.enrollments
            .enroll("c", Path::new("/run/netns/shunt-unit-none"), Origin::Config);
    assert!(
        matches!(missing, Err(EnrollError::Netns { .. })),
        "{missing:?}"
    );

    // The kernel refuses the cookie: the listeners already opened close again.
    h.kernel.refuse.store(true, Ordering::SeqCst);
    let refused = h.enrollments.enroll("b", &two.path, Origin::Config);
    assert!(
        matches!(refused, Err(EnrollError::Kernel { .. })),
        "{refused:?}"
    );
    assert!(refused_soon(&two).await, "the failed pod's listener closed");
    assert_eq!(h.kernel.cookies(), vec![one.cookie()]);
    let names: Vec<String> = h.enrollments.list().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["a"]);

    // Nothing left over blocks enrolling it once the kernel takes it.
    h.kernel.refuse.store(false, Ordering::SeqCst);
    h.enrollments
        .enroll("b", &two.path, Origin::Config)
        .expect("enroll after the failure");
    assert_eq!(h.enrollments.list().len(), 2);
}

#[tokio::test]
async fn a_new_daemon_adopts_handed_pods_and_releases_those_no_longer_wanted() {
    if !root() {
        return;
    }
    let old = harness();
    let (kept, dropped) = (TestNetns::new("kept"), TestNetns::new("dropped"));
    old.enrollments
        .enroll("kept", &kept.path, Origin::Operator)
        .expect("enroll");
    old.enrollments
        .enroll("dropped", &dropped.path, Origin::Config)
        .expect("enroll");

    let mut new = harness();
    let handed = old.enrollments.offer();
    let listeners: usize = handed.iter().map(|p| p.listeners.len()).sum();
    assert_eq!(new.enrollments.adopt(handed), listeners);
    // The old daemon goes; its copies of the listeners close, the new one's stay open.
    old.enrollments.close_all();
    drop(old);
    let _conn = kept.connect().expect("the adopted listener accepts");
    assert_eq!(new.accepted.recv().await.as_deref(), Some("kept"));

    // The configuration no longer lists "dropped"; "kept" was enrolled by an operator.
    new.kernel.enroll(kept.cookie()).expect("kernel");
    new.kernel.enroll(dropped.cookie()).expect("kernel");
    new.enrollments.release_unclaimed(&[Origin::Config]);
    let names: Vec<String> = new.enrollments.list().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(new.kernel.cookies(), vec![kept.cookie()]);
    assert!(
        refused_soon(&dropped).await,
        "the released pod's listener closed"
    );

    // Kernel-side enrollments no pod accounts for are pruned; the pod's own stays.
    new.kernel.enroll(4242).expect("kernel");
    new.enrollments.prune_stale();
    assert_eq!(new.kernel.cookies(), vec![kept.cookie()]);
}
