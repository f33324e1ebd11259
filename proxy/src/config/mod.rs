//! The daemon's YAML configuration.
//!
//! Parsing is strict: unknown fields are rejected and every error names the field it is about
//! (`intercept.exclude_cidrs[1]: invalid IP network syntax`), because a proxy that silently
//! ignores a misspelt option is worse than one that refuses to start.
//!
//! The configuration is plain data: it imports nothing from the parts of the daemon that act
//! on it, so every one of them can depend on it.

pub mod fault;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use self::fault::FaultRule;

pub const DEFAULT_LISTEN_PORT: u16 = 15001;
pub const DEFAULT_MARK: u32 = 0x5348_554e; // "SHUN"
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/shunt";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/shunt/admin.sock";
/// SMTP, submission, MySQL, SPDY-era 4444, PostgreSQL, Redis, Elasticsearch transport,
/// memcached: server-first or binary protocols nothing is gained by sniffing.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub intercept: Intercept,
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    #[serde(default)]
    pub admin: Admin,
    /// Virtual addresses (a Service's ClusterIP:port) and the endpoints behind them.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub discovery: Discovery,
    #[serde(default)]
    pub http2: Http2,
    /// Fault injection rules.
    #[serde(default)]
    pub faults: Vec<FaultRule>,
    /// At most this many streams are being faulted at once; over it, requests pass unfaulted
    /// (a guard against clients asking for faults with headers).
    #[serde(default = "default_max_active_faults")]
    pub max_active_faults: usize,
    /// Metrics, health and access log.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// Settings of Kubernetes mode (`shunt run --kubernetes`).
    #[serde(default)]
    pub kubernetes: Kubernetes,
    /// Bounds on what clients can make the daemon hold.
    #[serde(default)]
    pub limits: Limits,
}

/// Bounds on connections and buffers, so a flood, a slow client or one busy pod cannot take
/// the node's proxy down with it. All apply to new connections after a reload.
///
/// A connection limit left out of the file is sized to the descriptors the daemon has, at
/// start and at every reload ([`Limits::sized_to`]); one that is given is kept as given.
/// Serialized (`shunt config`), the limits show the values in force.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(from = "LimitsFile", into = "LimitsFile")]
pub struct Limits {
    /// Proxied connections open at once on the node; over it, new ones are reset at once.
    pub max_connections: usize,
    /// Proxied connections open at once from one pod, so one pod cannot starve the others.
    pub max_connections_per_pod: usize,
    /// Bytes of each direction's buffer when bytes are copied through userspace
    /// (`forwarding: copy`, or splice without a pipe).
    pub copy_buffer: usize,
    /// The connection limits as the file gave them; `None`: left to the default.
    pub configured: ConfiguredLimits,
}

/// Which connection limits the configuration set itself: only those are promises the daemon
/// warns about when its descriptors cannot keep them; the others are sized to the descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfiguredLimits {
    pub max_connections: Option<usize>,
    pub max_connections_per_pod: Option<usize>,
}

/// `limits` as written in the file.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsFile {
    max_connections: Option<usize>,
    max_connections_per_pod: Option<usize>,
    copy_buffer: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_connections: None,
            max_connections_per_pod: None,
            copy_buffer: DEFAULT_COPY_BUFFER,
        }
    }
}

impl From<LimitsFile> for Limits {
    fn from(file: LimitsFile) -> Limits {
        Limits {
            max_connections: file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_connections_per_pod: file
                .max_connections_per_pod
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_POD),
            copy_buffer: file.copy_buffer,
            configured: ConfiguredLimits {
                max_connections: file.max_connections,
                max_connections_per_pod: file.max_connections_per_pod,
            },
        }
    }
}

impl From<Limits> for LimitsFile {
    /// The values in force, sized or not: what `shunt config` shows is what is enforced.
    fn from(limits: Limits) -> LimitsFile {
        LimitsFile {
            max_connections: Some(limits.max_connections),
            max_connections_per_pod: Some(limits.max_connections_per_pod),
            copy_buffer: limits.copy_buffer,
        }
    }
}

/// `limits.max_connections` when the descriptors allow it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// A quarter of the node's: one pod flooding shunt leaves room for the others.
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = DEFAULT_MAX_CONNECTIONS / 4;
const DEFAULT_COPY_BUFFER: usize = 32 << 10;

/// Descriptors each proxied connection holds: the client's socket and the upstream one.
/// Spliced bytes borrow pooled pipes only while they are in flight, and a pod's HTTP/2
/// upstream connections are shared by its client connections, so neither adds per
/// connection: both come out of the reserve.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 2;

/// Descriptors kept back from the connection limits for everything else: two listeners per
/// enrolled pod, the pooled splice pipes, the upstream HTTP/2 pools, the socket of each
/// connection being refused, the admin and telemetry sockets, the access log, the eBPF
/// programs, maps and links, and the runtime's own. A constant rather than a fraction, so
/// the sizing is easy to predict: HAProxy reserves a fixed number the same way.
pub const RESERVED_DESCRIPTORS: u64 = 1024;

/// Connections that `open_files` descriptors serve once the reserve is set aside.
pub fn connections_served(open_files: u64) -> usize {
    let served = open_files.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION;
    usize::try_from(served).unwrap_or(usize::MAX)
}

/// The connection limits sized to a descriptor limit ([`Limits::sized_to`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Sizing {
    /// The limits to enforce.
    pub limits: Limits,
    /// Connections the descriptors serve ([`connections_served`]).
    pub served: usize,
    /// The configured limits the descriptors cannot serve, by field name, with their values:
    /// past `served` connections, `accept()` and dials fail before the limit refuses cleanly.
    pub unserved: Vec<(&'static str, usize)>,
}

impl Sizing {
    /// Whether a default limit was lowered to fit the descriptors.
    pub fn reduced(&self) -> bool {
        self.limits.configured.max_connections.is_none()
            && self.limits.max_connections < DEFAULT_MAX_CONNECTIONS
    }
}

impl Limits {
    /// These limits with the connection limits the configuration left out sized to
    /// `open_files` descriptors (the soft open-file limit), as HAProxy sizes its `maxconn`:
    /// the node's default becomes at most what the descriptors serve, the pod's default a
    /// quarter of that. Configured limits stay as given, and those the descriptors cannot
    /// serve are named. At least one connection stays allowed, whatever the descriptors.
    pub fn sized_to(&self, open_files: u64) -> Sizing {
        let served = connections_served(open_files);
        let node_default = DEFAULT_MAX_CONNECTIONS.min(served);
        let configured = self.configured;
        let node = configured.max_connections.unwrap_or(node_default.max(1));
        let pod = configured
            .max_connections_per_pod
            .unwrap_or((node_default / 4).max(1));
        let mut unserved = Vec::new();
        if configured.max_connections.is_some_and(|n| n > served) {
            unserved.push(("limits.max_connections", node));
        }
        // A pod limit above a configured node limit is out of reach because of the node
        // limit, not of the descriptors (and an unserved node limit is named already).
        let node_caps_pod = configured.max_connections.is_some_and(|n| n < pod);
        if configured
            .max_connections_per_pod
            .is_some_and(|p| p > served)
            && !node_caps_pod
        {
            unserved.push(("limits.max_connections_per_pod", pod));
        }
        Sizing {
            limits: Limits {
                max_connections: node,
                max_connections_per_pod: pod,
                ..self.clone()
            },
            served,
            unserved,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        LimitsFile::default().into()
    }
}

/// Smallest and largest `limits.copy_buffer`: below a page, copying costs too many system
/// calls; above, idle memory per connection grows with no gain in throughput.
const COPY_BUFFER_RANGE: std::ops::RangeInclusive<usize> = 4096..=(16 << 20);

/// Kubernetes mode: where the API is and how pods are found on this node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Kubernetes {
    /// This node's name; default: `$NODE_NAME` (set from the downward API).
    pub node_name: Option<String>,
    /// The host's `/proc`, scanned for the processes of pods (mounted from the host).
    pub proc_root: PathBuf,
    /// A kubeconfig file; default: the in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Kubernetes {
            node_name: None,
            proc_root: PathBuf::from("/proc"),
            kubeconfig: None,
        }
    }
}

fn default_max_active_faults() -> usize {
    100
}

/// What an empty file gives: a configuration built in code from the defaults means what
/// the same one left out of the file does.
impl Default for Config {
    fn default() -> Self {
        Config {
            intercept: Intercept::default(),
            pods: Vec::new(),
            admin: Admin::default(),
            services: Vec::new(),
            discovery: Discovery::default(),
            http2: Http2::default(),
            faults: Vec::new(),
            max_active_faults: default_max_active_faults(),
            telemetry: Telemetry::default(),
            kubernetes: Kubernetes::default(),
            limits: Limits::default(),
        }
    }
}

/// HTTP/2 keepalive. PINGs more often than every 5 minutes make common gRPC servers close
/// the connection with `too_many_pings`, so upstream PINGs are off unless asked for.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Http2 {
    /// PING interval toward clients; `0s`: none.
    #[serde(with = "humantime_serde")]
    pub downstream_keepalive_interval: Duration,
    /// PING interval toward upstream endpoints; `0s`: none.
    #[serde(with = "humantime_serde")]
    pub upstream_keepalive_interval: Duration,
    /// How long a PONG may take before the connection is given up.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Streams one client connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// a client opening more gets `REFUSED_STREAM` for the extra ones.
    pub max_concurrent_streams: u32,
    /// Largest request header block accepted (`SETTINGS_MAX_HEADER_LIST_SIZE`, bytes as HTTP/2
    /// counts them); a larger one gets 431 and that stream is refused.
    pub max_header_list_size: u32,
    /// Time a client connection detected as HTTP/2 has to complete its first request's
    /// headers; one that has not (a slowloris client) gets GOAWAY and is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A client connection with no open stream for this long gets GOAWAY and is closed;
    /// `0s`: never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A pooled upstream connection with no stream for this long is closed; `0s`: never
    /// (idle ones beyond `upstream_max_idle` are closed all the same).
    #[serde(with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Idle upstream connections kept per endpoint, per client pod and worker thread; more
    /// are closed within a second of going idle. One HTTP/2 connection carries
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` streams, so a few serve any burst.
    pub upstream_max_idle: u32,
}

impl Default for Http2 {
    fn default() -> Self {
        Http2 {
            downstream_keepalive_interval: Duration::ZERO,
            upstream_keepalive_interval: Duration::ZERO,
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 1024,
            max_header_list_size: 64 << 10,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            // nginx's upstream `keepalive_timeout`; Envoy's default (1h) suits a sidecar with
            // a handful of upstreams, not a node proxy holding pools for every pod.
            upstream_idle_timeout: Duration::from_secs(60),
            upstream_max_idle: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// The address clients dial, e.g. `10.96.0.10:50051` or `[fd00::10]:50051`.
    pub vip: SocketAddr,
    /// Fixed endpoints; or
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// `host:port` whose A/AAAA records are the endpoints (a headless Service's name).
    #[serde(default)]
    pub dns: Option<String>,
    /// How often `dns` is resolved again.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh: Duration,
    /// What the Service's port carries: `auto` (sniffed), `http2`, `tls` or `tcp`. `tls`
    /// and `tcp` take the kernel path (`intercept.kernel_path`).
    #[serde(default)]
    pub protocol: ServiceProtocol,
}

/// What a Service's port carries, as declared in the configuration or by Kubernetes
/// (`appProtocol`, port names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// Sniffed on every connection.
    #[default]
    Auto,
    /// HTTP/2 (gRPC): always through the proxy, balanced per stream.
    Http2,
    /// TLS the application starts itself: opaque to shunt.
    Tls,
    /// Any other TCP.
    Tcp,
}

impl ServiceProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceProtocol::Auto => "auto",
            ServiceProtocol::Http2 => "http2",
            ServiceProtocol::Tls => "tls",
            ServiceProtocol::Tcp => "tcp",
        }
    }

    /// Declared as a protocol shunt can only pass through.
    pub fn is_opaque(self) -> bool {
        matches!(self, ServiceProtocol::Tls | ServiceProtocol::Tcp)
    }
}

/// Which connections skip the proxy: connect() sends them straight to an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPathMode {
    /// Every intercepted connection goes through the proxy.
    Off,
    /// Services declared `tls` or `tcp`, and destinations on `opaque_ports`.
    #[default]
    Declared,
    /// Those, and destinations shunt has seen carry only TLS or other opaque TCP.
    Learned,
}

impl KernelPathMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelPathMode::Off => "off",
            KernelPathMode::Declared => "declared",
            KernelPathMode::Learned => "learned",
        }
    }
}

fn default_refresh() -> Duration {
    Duration::from_secs(5)
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: String::new(),
            vip: SocketAddr::from(([0, 0, 0, 0], 0)),
            endpoints: Vec::new(),
            dns: None,
            refresh: default_refresh(),
            protocol: ServiceProtocol::Auto,
        }
    }
}

/// Where the Prometheus metrics and health endpoints listen, and where access-log lines go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// `GET /metrics` (Prometheus text, or OpenMetrics when asked for); `off`: none.
    pub metrics: Listen,
    /// `GET /live` and `GET /ready`; `off`: none.
    pub health: Listen,
    /// One JSON line per HTTP/2 stream and per opaque/TLS connection: `off`, `stdout`,
    /// `stderr` or an absolute file path (appended to).
    pub access_log: AccessLog,
    /// Lines waiting for the writer; beyond this they are dropped (and counted), so a slow
    /// disk never holds up a connection.
    pub access_log_buffer: usize,
}

pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15020);
pub const DEFAULT_HEALTH_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15021);

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            metrics: Listen::On(DEFAULT_METRICS_ADDR),
            health: Listen::On(DEFAULT_HEALTH_ADDR),
            access_log: AccessLog::Off,
            access_log_buffer: 4096,
        }
    }
}

/// A TCP address to listen on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Listen {
    Off,
    On(SocketAddr),
}

impl Listen {
    pub fn port(&self) -> Option<u16> {
        match self {
            Listen::Off => None,
            Listen::On(addr) => Some(addr.port()),
        }
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text == "off" {
            return Ok(Listen::Off);
        }
        text.parse()
            .map(Listen::On)
            .map_err(|_| format!("{text:?} is neither `off` nor an address:port"))
    }
}

impl From<Listen> for String {
    fn from(listen: Listen) -> String {
        match listen {
            Listen::Off => "off".into(),
            Listen::On(addr) => addr.to_string(),
        }
    }
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum AccessLog {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

impl TryFrom<String> for AccessLog {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "off" => Ok(AccessLog::Off),
            "stdout" => Ok(AccessLog::Stdout),
            "stderr" => Ok(AccessLog::Stderr),
            path if path.starts_with('/') => Ok(AccessLog::File(PathBuf::from(path))),
            _ => Err(format!(
                "{text:?} is not `off`, `stdout`, `stderr` or an absolute path"
            )),
        }
    }
}

impl From<AccessLog> for String {
    fn from(log: AccessLog) -> String {
        match log {
            AccessLog::Off => "off".into(),
            AccessLog::Stdout => "stdout".into(),
            AccessLog::Stderr => "stderr".into(),
            AccessLog::File(path) => path.display().to_string(),
        }
    }
}

/// Service discovery settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    /// DNS server for `services[].dns`; default: the system's (`/etc/resolv.conf`).
    pub dns_server: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Intercept {
    /// cgroup v2 directory the programs attach to; `None` = the cgroup v2 mount's root.
    pub cgroup: Option<PathBuf>,
    pub listen_port: u16,
    pub fail_mode: FailMode,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_ports: Vec<u16>,
    /// `SO_MARK` of shunt's own upstream sockets; the programs never redirect them.
    pub mark: u32,
    /// Where programs, links and maps are pinned on the BPF filesystem.
    pub pin_dir: PathBuf,
    /// Longest a silent client is held before its connection is forwarded as opaque TCP.
    #[serde(with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Destination ports never sniffed (server-first and binary protocols); with
    /// `kernel_path` on, connections to them skip the proxy.
    pub opaque_ports: Vec<u16>,
    /// Which connections connect() sends straight to an endpoint, leaving the proxy out of
    /// their bytes: `off`, `declared` (Services declared `tls`/`tcp`, `opaque_ports`), or
    /// `learned` (those, and destinations seen carrying only TLS or opaque TCP).
    pub kernel_path: KernelPathMode,
    /// Upstream connect timeout, per endpoint tried.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Opaque connections with no traffic either way for this long are closed; `0s`: never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How opaque bytes are moved: `splice` (zero-copy, the default), `copy`, or `sockmap`
    /// (in the kernel by an sk_skb verdict; splice where the kernel cannot).
    pub forwarding: Forwarding,
    /// Move bytes between an enrolled application's socket and shunt's in-pod socket with an
    /// `sk_msg` program instead of the loopback TCP/IP stack. Off by default: it only stays
    /// on where the benchmark shows it helps. Applies from the next start.
    pub local_fast_path: bool,
    /// On SIGTERM, how long established connections get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Threads that run connections; `0`: one per CPU shunt may use.
    pub workers: usize,
}

impl Default for Intercept {
    fn default() -> Self {
        Self {
            cgroup: None,
            listen_port: DEFAULT_LISTEN_PORT,
            fail_mode: FailMode::Open,
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
            mark: DEFAULT_MARK,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            detect_timeout: Duration::from_secs(1),
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            kernel_path: KernelPathMode::default(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::ZERO,
            forwarding: Forwarding::default(),
            local_fast_path: false,
            drain_timeout: Duration::from_secs(5),
            workers: 0,
        }
    }
}

/// How payload bytes are moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// `splice(2)` through a pipe: the payload stays in the kernel.
    #[default]
    Splice,
    /// `read(2)`/`write(2)` through a userspace buffer.
    Copy,
    /// An `sk_skb` stream verdict redirects each direction's skbs to the other socket in the
    /// kernel; userspace only passes EOFs and resets on. Falls back to splice where the
    /// kernel cannot (see `proxy/sockmap.rs`).
    Sockmap,
}

impl Forwarding {
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::Splice => "splice",
            Forwarding::Copy => "copy",
            Forwarding::Sockmap => "sockmap",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// shunt down: enrolled pods' connections go direct.
    #[default]
    Open,
    /// shunt down: enrolled pods' connections are refused.
    Closed,
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    pub name: String,
    /// A network namespace file, e.g. `/var/run/netns/client` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub socket: PathBuf,
    /// A group (name or number) whose members may use the admin socket besides root.
    pub group: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            group: None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(field, message)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        })
    }

    /// Parses and validates; the error is `(field path, message)`.
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(field_error)?;
        config.validate()?;
        fault::validate_all(&config.faults, "faults")?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: &str| Err((field.to_string(), message.to_string()));
        if self.intercept.listen_port == 0 {
            return bad("intercept.listen_port", "must be between 1 and 65535");
        }
        if self.intercept.mark == 0 {
            return bad(
                "intercept.mark",
                "must be non-zero (0 is every unmarked socket)",
            );
        }
        for (i, port) in self.intercept.exclude_ports.iter().enumerate() {
            if *port == 0 {
                return bad(
                    &format!("intercept.exclude_ports[{i}]"),
                    "port 0 is not a port",
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            if pod.name.is_empty() {
                return bad(&format!("pods[{i}].name"), "must not be empty");
            }
            if !names.insert(&pod.name) {
                return bad(
                    &format!("pods[{i}].name"),
                    &format!("duplicate pod name {:?}", pod.name),
                );
            }
            // Whether the namespace exists is checked when the pod is enrolled: a pod that
            // has gone is skipped, not a reason to refuse the whole configuration.
        }
        if self.admin.group.as_deref() == Some("") {
            return bad(
                "admin.group",
                "must not be empty (leave it out for root only)",
            );
        }
        if self.kubernetes.node_name.as_deref() == Some("") {
            return bad("kubernetes.node_name", "must not be empty");
        }
        if self.intercept.detect_timeout.is_zero() {
            return bad("intercept.detect_timeout", "must be longer than 0s");
        }
        if self.intercept.connect_timeout.is_zero() {
            return bad("intercept.connect_timeout", "must be longer than 0s");
        }
        for (i, port) in self.intercept.opaque_ports.iter().enumerate() {
            if *port == 0 {
                return bad(
                    &format!("intercept.opaque_ports[{i}]"),
                    "port 0 is not a port",
                );
            }
        }
        self.validate_limits()?;
        let telemetry = &self.telemetry;
        if let (Listen::On(metrics), Listen::On(health)) = (telemetry.metrics, telemetry.health)
            && metrics == health
            && metrics.port() != 0
        {
            return bad(
                "telemetry.health",
                &format!("{health} is already the metrics address"),
            );
        }
        if telemetry.access_log_buffer == 0 {
            return bad("telemetry.access_log_buffer", "must be at least 1");
        }
        let mut names = std::collections::HashSet::new();
        let mut vips = std::collections::HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            if service.name.is_empty() {
                return bad(&format!("services[{i}].name"), "must not be empty");
            }
            if !names.insert(&service.name) {
                return bad(
                    &format!("services[{i}].name"),
                    &format!("duplicate service name {:?}", service.name),
                );
            }
            if let Some(other) = vips.insert(service.vip, &service.name) {
                return bad(
                    &format!("services[{i}].vip"),
                    &format!(
                        "{} is already the address of service {other:?}",
                        service.vip
                    ),
                );
            }
            if service.vip.port() == 0 || service.vip.ip().is_unspecified() {
                return bad(&format!("services[{i}].vip"), "needs an address and a port");
            }
            match &service.dns {
                None if service.endpoints.is_empty() => {
                    return bad(
                        &format!("services[{i}].endpoints"),
                        "must list at least one endpoint (or give `dns`)",
                    );
                }
                Some(_) if !service.endpoints.is_empty() => {
                    return bad(
                        &format!("services[{i}].dns"),
                        "give `endpoints` or `dns`, not both",
                    );
                }
                Some(dns) if split_host_port(dns).is_none() => {
                    return bad(&format!("services[{i}].dns"), "must be host:port");
                }
                Some(_) if service.refresh.is_zero() => {
                    return bad(&format!("services[{i}].refresh"), "must be longer than 0s");
                }
                _ => {}
            }
            for (j, endpoint) in service.endpoints.iter().enumerate() {
                if endpoint.port() == 0 || endpoint.ip().is_unspecified() {
                    return bad(
                        &format!("services[{i}].endpoints[{j}]"),
                        "needs an address and a port",
                    );
                }
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_limits(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_string(), message));
        let limits = &self.limits;
        if limits.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1".into());
        }
        if limits.max_connections_per_pod == 0 {
            return bad(
                "limits.max_connections_per_pod",
                "must be at least 1".into(),
            );
        }
        if !COPY_BUFFER_RANGE.contains(&limits.copy_buffer) {
            return bad(
                "limits.copy_buffer",
                format!(
                    "must be between {} and {} bytes",
                    COPY_BUFFER_RANGE.start(),
                    COPY_BUFFER_RANGE.end()
                ),
            );
        }
        let http2 = &self.http2;
        if http2.max_concurrent_streams == 0 {
            return bad("http2.max_concurrent_streams", "must be at least 1".into());
        }
        // Below this, ordinary gRPC metadata (authority, path, content-type, user-agent,
        // grpc-timeout, a trace id) would not fit.
        if http2.max_header_list_size < 1024 {
            return bad("http2.max_header_list_size", "must be at least 1024".into());
        }
        if http2.header_timeout.is_zero() {
            return bad("http2.header_timeout", "must be longer than 0s".into());
        }
        Ok(())
    }
}

/// `greeter.test:50051` → (`greeter.test`, 50051).
pub fn split_host_port(hostport: &str) -> Option<(&str, u16)> {
    let (host, port) = hostport.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then_some((host, port))
}

impl Config {
    /// Fields that differ from `running` but only take effect when the daemon starts (they
    /// shape the attached programs, the listeners, the admin socket or telemetry); a reload
    /// leaves them as they are. `pods` is in the list too: pods are enrolled at runtime with
    /// `shunt enroll`/`unenroll`, not by reloading.
    pub fn needs_restart(&self, running: &Config) -> Vec<&'static str> {
        self.clone().restart_only_fields(running, false)
    }

    /// The configuration in force after reloading `self`: what a reload applies from it,
    /// every start-up-only field from `running`.
    pub fn in_force(&self, running: &Config) -> Config {
        let mut config = self.clone();
        config.restart_only_fields(running, true);
        config
    }

    /// The start-up-only fields that differ from `running`; with `restore`, also sets them
    /// back to `running`'s values. One list for both, so they never disagree.
    fn restart_only_fields(&mut self, running: &Config, restore: bool) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! field {
            ($name:literal, $($path:ident).+) => {
                if self.$($path).+ != running.$($path).+ {
                    changed.push($name);
                    if restore {
                        self.$($path).+ = running.$($path).+.clone();
                    }
                }
            };
        }
        field!("intercept.cgroup", intercept.cgroup);
        field!("intercept.listen_port", intercept.listen_port);
        field!("intercept.fail_mode", intercept.fail_mode);
        field!("intercept.exclude_cidrs", intercept.exclude_cidrs);
        field!("intercept.exclude_ports", intercept.exclude_ports);
        field!("intercept.mark", intercept.mark);
        field!("intercept.pin_dir", intercept.pin_dir);
        field!("intercept.workers", intercept.workers);
        field!("intercept.local_fast_path", intercept.local_fast_path);
        field!("pods", pods);
        field!("admin.socket", admin.socket);
        field!("admin.group", admin.group);
        field!("telemetry", telemetry);
        field!("kubernetes", kubernetes);
        changed
    }
}

/// A deserialization error as `(field, message)`. An error outside any field — a YAML syntax
/// error, a document that is not a mapping — is reported at `(top level)`, never unnamed.
///
/// The YAML parser starts its own message with the path it was at (the field itself, or the
/// mapping holding an unknown field); that prefix is dropped, so the field is named once. The
/// line and column stay at the end of the message.
pub fn field_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> (String, String) {
    let field = e.path().to_string();
    let message = e.into_inner().to_string();
    if field.is_empty() || field == "." {
        return ("(top level)".to_owned(), message);
    }
    let message = without_path_prefix(&field, &message).to_owned();
    (field, message)
}

/// `message` without a leading `PATH: `, where PATH is `field` or a field holding it (in the
/// YAML parser's spelling, which writes a list at the top level as `.[0]`).
fn without_path_prefix<'m>(field: &str, message: &'m str) -> &'m str {
    let mut path = field;
    while !path.is_empty() {
        let dotted = format!(".{path}");
        let spellings = [path, dotted.as_str()];
        for spelling in spellings {
            if let Some(rest) = message
                .strip_prefix(spelling)
                .and_then(|rest| rest.strip_prefix(": "))
            {
                return rest;
            }
        }
        path = &path[..path.rfind(['.', '[']).unwrap_or(0)];
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (String, String) {
        Config::parse(text).expect_err("config should be rejected")
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse("{}").unwrap();
        assert_eq!(c.intercept.listen_port, 15001);
        assert_eq!(c.intercept.fail_mode, FailMode::Open);
        assert_eq!(c.admin.socket, PathBuf::from("/run/shunt/admin.sock"));
        assert_eq!(c, Config::default());
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            "intercept:\n  listen_port: 15006\n  fail_mode: closed\n  exclude_cidrs: [10.0.0.1/32, fd00::/8]\n  exclude_ports: [22]\npods: []\nadmin:\n  socket: /tmp/a.sock\n",
        )
        .unwrap();
        assert_eq!(c.intercept.listen_port, 15006);
        assert_eq!(c.intercept.fail_mode, FailMode::Closed);
        assert_eq!(c.intercept.exclude_cidrs.len(), 2);
        assert_eq!(c.intercept.exclude_ports, vec![22]);
    }

    #[test]
    fn unknown_field_is_named() {
        let (field, msg) = err("intercept:\n  listen_prot: 1\n");
        assert_eq!(field, "intercept.listen_prot");
        assert!(msg.contains("listen_prot"), "{msg}");
    }

    #[test]
    fn an_error_names_its_field_once_and_gives_the_line() {
        let (field, message) = err("intercept:\n  listen_port: 99999\n");
        let error = ConfigError::Invalid {
            path: PathBuf::from("bad.yaml"),
            field,
            message,
        };
        assert_eq!(
            error.to_string(),
            "bad.yaml: intercept.listen_port: invalid value: integer `99999`, expected u16 \
             at line 2 column 16"
        );
        // The parser names the mapping of an unknown field, or a list at the top level as
        // `.[0]`: neither is repeated either.
        assert_eq!(
            err("pods:\n  - {name: a}\n"),
            (
                "pods[0]".to_owned(),
                "missing field `netns` at line 2 column 5".to_owned()
            )
        );
        let (field, msg) = err("intercept:\n  listen_prot: 1\n");
        assert_eq!(field, "intercept.listen_prot");
        assert!(
            msg.starts_with("unknown field `listen_prot`, expected one of"),
            "{msg}"
        );
        assert!(msg.ends_with(" at line 2 column 3"), "{msg}");
        assert_eq!(
            fault::parse_rules("- name: x\n  bogus: 1\n").unwrap_err(),
            (
                "[0].bogus".to_owned(),
                "unknown field `bogus`, expected one of `name`, `match`, `delay`, `abort`, \
                 `tcp`, `header_control` at line 2 column 3"
                    .to_owned()
            )
        );
    }

    #[test]
    fn malformed_cidr_is_named() {
        let (field, msg) = err("intercept:\n  exclude_cidrs: [10.0.0.0/8, 10.0.0.300/32]\n");
        assert_eq!(field, "intercept.exclude_cidrs[1]");
        assert!(msg.contains("invalid"), "{msg}");
    }

    #[test]
    fn malformed_port_is_named() {
        let (field, _) = err("intercept:\n  exclude_ports: [80, 70000]\n");
        assert_eq!(field, "intercept.exclude_ports[1]");
        let (field, _) = err("intercept:\n  exclude_ports: [0]\n");
        assert_eq!(field, "intercept.exclude_ports[0]");
    }

    #[test]
    fn bad_fail_mode_is_named() {
        let (field, msg) = err("intercept:\n  fail_mode: sideways\n");
        assert_eq!(field, "intercept.fail_mode");
        assert!(msg.contains("open"), "{msg}");
    }

    #[test]
    fn local_fast_path_is_off_by_default_named_when_malformed_and_needs_a_restart() {
        let off = Config::parse("{}").unwrap();
        assert!(!off.intercept.local_fast_path);
        let on = Config::parse("intercept:\n  local_fast_path: true\n").unwrap();
        assert!(on.intercept.local_fast_path);
        assert_eq!(on.needs_restart(&off), vec!["intercept.local_fast_path"]);
        let (field, msg) = err("intercept:\n  local_fast_path: sometimes\n");
        assert_eq!(field, "intercept.local_fast_path");
        assert!(msg.contains("bool"), "{msg}");
    }

    #[test]
    fn missing_netns_is_left_to_enrollment() {
        // A pod that has gone is skipped when enrolling, not a reason to refuse the config.
        let config =
            Config::parse("pods:\n  - name: a\n    netns: /nonexistent/netns/a\n").expect("parses");
        assert_eq!(
            config.pods[0].netns,
            std::path::Path::new("/nonexistent/netns/a")
        );
    }

    #[test]
    fn duplicate_pod_is_named() {
        let (field, _) = err(
            "pods:\n  - {name: a, netns: /proc/self/ns/net}\n  - {name: a, netns: /proc/self/ns/net}\n",
        );
        assert_eq!(field, "pods[1].name");
    }

    #[test]
    fn reload_names_the_changes_that_need_a_restart() {
        let running = Config::parse("intercept:\n  listen_port: 15001\n").unwrap();
        let same_but_reloadable = Config::parse(
            "intercept:\n  listen_port: 15001\n  detect_timeout: 3s\nservices:\n  - {name: a, vip: '10.96.0.1:80', endpoints: ['10.0.0.1:80']}\n",
        )
        .unwrap();
        assert!(same_but_reloadable.needs_restart(&running).is_empty());
        let moved = Config::parse(
            "intercept:\n  listen_port: 15006\n  exclude_ports: [22]\npods:\n  - {name: a, netns: /proc/self/ns/net}\n",
        )
        .unwrap();
        assert_eq!(
            moved.needs_restart(&running),
            ["intercept.listen_port", "intercept.exclude_ports", "pods"]
        );
    }

    #[test]
    fn services_and_detection_settings_parse() {
        let c = Config::parse(
            "services:\n  - name: greeter\n    vip: 10.96.0.10:50051\n    endpoints: [10.200.0.11:50051, '[fd00::12]:50051']\nintercept:\n  detect_timeout: 250ms\n  opaque_ports: [6379]\n",
        )
        .unwrap();
        assert_eq!(c.services[0].endpoints.len(), 2);
        assert_eq!(c.intercept.detect_timeout, Duration::from_millis(250));
        assert_eq!(c.intercept.opaque_ports, vec![6379]);
        let d = Config::parse("{}").unwrap();
        assert_eq!(d.intercept.detect_timeout, Duration::from_secs(1));
        assert_eq!(d.intercept.opaque_ports, DEFAULT_OPAQUE_PORTS.to_vec());
    }

    #[test]
    fn telemetry_defaults_to_loopback_with_the_access_log_off() {
        let c = Config::parse("{}").unwrap();
        assert_eq!(c.telemetry.metrics, Listen::On(DEFAULT_METRICS_ADDR));
        assert_eq!(c.telemetry.health, Listen::On(DEFAULT_HEALTH_ADDR));
        assert!(DEFAULT_METRICS_ADDR.ip().is_loopback() && DEFAULT_HEALTH_ADDR.ip().is_loopback());
        assert_eq!(c.telemetry.access_log, AccessLog::Off);
        let c = Config::parse(
            "telemetry:\n  metrics: off\n  health: '[::1]:9000'\n  access_log: /var/log/shunt/access.log\n",
        )
        .unwrap();
        assert_eq!(c.telemetry.metrics, Listen::Off);
        assert_eq!(
            c.telemetry.health,
            Listen::On("[::1]:9000".parse().unwrap())
        );
        assert_eq!(
            c.telemetry.access_log,
            AccessLog::File("/var/log/shunt/access.log".into())
        );
    }

    #[test]
    fn bad_telemetry_settings_are_named() {
        let (field, msg) = err("telemetry:\n  metrics: localhost\n");
        assert_eq!(field, "telemetry.metrics");
        assert!(msg.contains("localhost"), "{msg}");
        let (field, _) = err("telemetry:\n  access_log: relative/path.log\n");
        assert_eq!(field, "telemetry.access_log");
        let (field, _) = err("telemetry:\n  metrics: 127.0.0.1:9000\n  health: 127.0.0.1:9000\n");
        assert_eq!(field, "telemetry.health");
        let (field, _) = err("telemetry:\n  access_log_buffer: 0\n");
        assert_eq!(field, "telemetry.access_log_buffer");
    }

    #[test]
    fn the_configuration_in_force_keeps_start_up_fields() {
        let running = Config::parse("intercept:\n  listen_port: 15001\n").unwrap();
        let reloaded = Config::parse(
            "intercept:\n  listen_port: 15006\n  detect_timeout: 3s\ntelemetry:\n  metrics: off\n",
        )
        .unwrap();
        let in_force = reloaded.in_force(&running);
        assert_eq!(in_force.intercept.listen_port, 15001);
        assert_eq!(in_force.telemetry, running.telemetry);
        assert_eq!(in_force.intercept.detect_timeout, Duration::from_secs(3));
        assert_eq!(
            reloaded.needs_restart(&running),
            ["intercept.listen_port", "telemetry"]
        );
    }

    #[test]
    fn limits_have_production_defaults_and_parse() {
        let c = Config::parse("{}").unwrap();
        assert_eq!(c.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(c.limits.max_connections_per_pod < c.limits.max_connections);
        assert_eq!(c.limits.copy_buffer, 32 << 10);
        assert_eq!(c.http2.max_concurrent_streams, 1024);
        assert_eq!(c.http2.max_header_list_size, 64 << 10);
        assert_eq!(c.http2.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http2.idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.http2.upstream_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http2.upstream_max_idle, 4);
        let c = Config::parse(
            "limits:\n  max_connections: 100\n  max_connections_per_pod: 10\n  copy_buffer: 8192\nhttp2:\n  max_concurrent_streams: 4\n  max_header_list_size: 2048\n  header_timeout: 2s\n  idle_timeout: 0s\n  upstream_idle_timeout: 5s\n  upstream_max_idle: 0\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, 100);
        assert_eq!(c.limits.max_connections_per_pod, 10);
        assert_eq!(c.limits.copy_buffer, 8192);
        assert_eq!(c.http2.max_concurrent_streams, 4);
        assert_eq!(c.http2.max_header_list_size, 2048);
        assert_eq!(c.http2.header_timeout, Duration::from_secs(2));
        assert!(c.http2.idle_timeout.is_zero());
        assert_eq!(c.http2.upstream_idle_timeout, Duration::from_secs(5));
        assert_eq!(c.http2.upstream_max_idle, 0);
        // Limits apply to new connections on reload: no restart needed.
        assert!(c.needs_restart(&Config::default()).is_empty());
    }

    #[test]
    fn bad_limits_are_named() {
        for (yaml, field) in [
            ("limits:\n  max_connections: 0\n", "limits.max_connections"),
            ("limits:\n  max_connections: -1\n", "limits.max_connections"),
            (
                "limits:\n  max_connections: lots\n",
                "limits.max_connections",
            ),
            (
                "limits:\n  max_connections_per_pod: 0\n",
                "limits.max_connections_per_pod",
            ),
            ("limits:\n  copy_buffer: 100\n", "limits.copy_buffer"),
            ("limits:\n  copy_buffer: 1000000000\n", "limits.copy_buffer"),
            ("limits:\n  max_conections: 5\n", "limits.max_conections"),
            (
                "http2:\n  max_concurrent_streams: 0\n",
                "http2.max_concurrent_streams",
            ),
            (
                "http2:\n  max_header_list_size: 100\n",
                "http2.max_header_list_size",
            ),
            ("http2:\n  header_timeout: 0s\n", "http2.header_timeout"),
            ("http2:\n  idle_timeout: whenever\n", "http2.idle_timeout"),
            (
                "http2:\n  upstream_idle_timeout: soon\n",
                "http2.upstream_idle_timeout",
            ),
            (
                "http2:\n  upstream_max_idle: -1\n",
                "http2.upstream_max_idle",
            ),
        ] {
            let (named, msg) = err(yaml);
            assert_eq!(named, field, "{yaml}: {msg}");
            assert!(!msg.is_empty());
        }
    }

    #[test]
    fn bad_services_are_named() {
        let (field, _) =
            err("services:\n  - name: a\n    vip: 10.96.0.10\n    endpoints: [10.0.0.1:1]\n");
        assert_eq!(field, "services[0].vip");
        let (field, _) = err("services:\n  - name: a\n    vip: 10.96.0.10:80\n    endpoints: []\n");
        assert_eq!(field, "services[0].endpoints");
        let (field, _) = err(
            "services:\n  - {name: a, vip: '10.96.0.10:80', endpoints: ['10.0.0.1:80', 'nope']}\n",
        );
        assert_eq!(field, "services[0].endpoints[1]");
        let (field, _) = err(
            "services:\n  - {name: a, vip: '10.96.0.10:80', endpoints: ['10.0.0.1:80']}\n  - {name: b, vip: '10.96.0.10:80', endpoints: ['10.0.0.1:80']}\n",
        );
        assert_eq!(field, "services[1].vip");
        let (field, msg) = err("intercept:\n  detect_timeout: soon\n");
        assert_eq!(field, "intercept.detect_timeout");
        assert!(!msg.is_empty());
    }

    #[test]
    fn connection_limits_remember_whether_the_file_set_them() {
        let c = Config::parse("{}").unwrap();
        assert_eq!(c.limits.configured, ConfiguredLimits::default());
        assert_eq!(c.limits, Limits::default());
        // Set to the default's value is still set: a promise the daemon must keep or warn about.
        let c = Config::parse("limits:\n  max_connections: 65536\n").unwrap();
        assert_eq!(c.limits.configured.max_connections, Some(65_536));
        assert_eq!(c.limits.configured.max_connections_per_pod, None);
        assert_eq!(
            c.limits.max_connections_per_pod,
            DEFAULT_MAX_CONNECTIONS_PER_POD
        );
    }

    #[test]
    fn descriptors_serve_two_per_connection_after_the_reserve() {
        assert_eq!(connections_served(0), 0);
        assert_eq!(connections_served(RESERVED_DESCRIPTORS), 0);
        assert_eq!(connections_served(RESERVED_DESCRIPTORS + 1), 0);
        assert_eq!(connections_served(RESERVED_DESCRIPTORS + 2), 1);
        // The machine of issue 17: a hard limit of 20,000.
        assert_eq!(connections_served(20_000), 9_488);
        // No limit at all (RLIM_INFINITY) is no overflow.
        assert!(connections_served(u64::MAX) > DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn default_connection_limits_are_sized_to_the_descriptors() {
        let limits = Limits::default();
        // Enough for the defaults, exactly or more: nothing changes.
        let exact =
            DEFAULT_MAX_CONNECTIONS as u64 * DESCRIPTORS_PER_CONNECTION + RESERVED_DESCRIPTORS;
        for open_files in [exact, 1 << 20, u64::MAX] {
            let sizing = limits.sized_to(open_files);
            assert_eq!(sizing.limits, limits, "{open_files}");
            assert!(!sizing.reduced() && sizing.unserved.is_empty());
        }
        // One descriptor short: one connection fewer.
        let sizing = limits.sized_to(exact - 1);
        assert_eq!(sizing.limits.max_connections, DEFAULT_MAX_CONNECTIONS - 1);
        assert_eq!(
            sizing.limits.max_connections_per_pod,
            (DEFAULT_MAX_CONNECTIONS - 1) / 4
        );
        assert!(sizing.reduced());
        // 20,000 descriptors: the defaults shrink to fit, without a warning.
        let sizing = limits.sized_to(20_000);
        assert_eq!(sizing.served, 9_488);
        assert_eq!(sizing.limits.max_connections, 9_488);
        assert_eq!(sizing.limits.max_connections_per_pod, 2_372);
        assert_eq!(sizing.limits.copy_buffer, limits.copy_buffer);
        assert!(sizing.reduced() && sizing.unserved.is_empty());
        // Nothing beyond the reserve: still one connection, never a limit of 0.
        for open_files in [0, 1024, 1025] {
            let sizing = limits.sized_to(open_files);
            assert_eq!(sizing.served, 0);
            assert_eq!(sizing.limits.max_connections, 1);
            assert_eq!(sizing.limits.max_connections_per_pod, 1);
        }
        // Sizing again (a reload) starts from what the file said, not from the last sizing.
        let sized = limits.sized_to(20_000).limits;
        assert_eq!(sized.sized_to(1 << 20).limits, limits);
    }

    #[test]
    fn configured_connection_limits_are_kept_and_named_when_unserved() {
        let limits = |yaml: &str| Config::parse(yaml).unwrap().limits;
        // The node limit configured beyond 9,488: kept, named; the pod default still sized.
        let sizing = limits("limits:\n  max_connections: 65536\n").sized_to(20_000);
        assert_eq!(sizing.limits.max_connections, 65_536);
        assert_eq!(sizing.limits.max_connections_per_pod, 2_372);
        assert_eq!(sizing.unserved, [("limits.max_connections", 65_536)]);
        assert!(!sizing.reduced());
        // Configured within what the descriptors serve: no warning.
        let sizing = limits("limits:\n  max_connections: 9488\n  max_connections_per_pod: 9488\n")
            .sized_to(20_000);
        assert_eq!(sizing.limits.max_connections, 9_488);
        assert_eq!(sizing.limits.max_connections_per_pod, 9_488);
        assert!(sizing.unserved.is_empty());
        // The pod limit alone beyond them: the sized node default caps it, but it was asked for.
        let sizing = limits("limits:\n  max_connections_per_pod: 10000\n").sized_to(20_000);
        assert_eq!(sizing.limits.max_connections, 9_488);
        assert_eq!(sizing.limits.max_connections_per_pod, 10_000);
        assert_eq!(
            sizing.unserved,
            [("limits.max_connections_per_pod", 10_000)]
        );
        // A pod limit above a configured node limit that fits: the node limit's doing.
        let sizing = limits("limits:\n  max_connections: 1000\n  max_connections_per_pod: 20000\n")
            .sized_to(20_000);
        assert!(sizing.unserved.is_empty(), "{:?}", sizing.unserved);
        // Both beyond, the pod's below the node's: both named.
        let sizing =
            limits("limits:\n  max_connections: 30000\n  max_connections_per_pod: 20000\n")
                .sized_to(20_000);
        assert_eq!(
            sizing.unserved,
            [
                ("limits.max_connections", 30_000),
                ("limits.max_connections_per_pod", 20_000)
            ]
        );
    }

    #[test]
    fn the_configuration_shows_the_connection_limits_in_force() {
        let mut config = Config::parse("limits:\n  copy_buffer: 8192\n").unwrap();
        config.limits = config.limits.sized_to(20_000).limits;
        let yaml = serde_yaml_ng::to_string(&config).unwrap();
        assert!(yaml.contains("max_connections: 9488\n"), "{yaml}");
        assert!(yaml.contains("max_connections_per_pod: 2372\n"), "{yaml}");
        assert!(yaml.contains("copy_buffer: 8192\n"), "{yaml}");
        // What `shunt config` prints reads back as the same limits.
        let again = Config::parse(&yaml).unwrap();
        assert_eq!(again.limits.max_connections, 9_488);
        assert_eq!(again.limits.max_connections_per_pod, 2_372);
        assert_eq!(again.limits.copy_buffer, 8192);
    }
}
