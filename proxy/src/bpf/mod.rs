//! The kernel side as seen from the daemon: load the embedded programs, attach them to the
//! cgroup, pin programs, links and maps, and own the handles to the maps the proxy uses.
//!
//! Pins live under `<pin_dir>/{maps,links,progs}`. A restarted daemon re-uses the pinned maps
//! (so enrollments, in-flight original destinations and counters survive) and swaps its freshly
//! loaded programs into the pinned links with `BPF_LINK_UPDATE`, so the hooks are never missing
//! and never stacked twice.

mod fs;
mod kernel;
mod kernel_path;
mod netns;
mod sockmap;
mod start;
#[allow(unsafe_code)]
mod sys;

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapInfo, PerCpuArray, RingBuf, SockHash,
        lpm_trie::Key,
    },
    programs::{CgroupAttachMode, Program, SockOps, links::FdLink},
};
use ipnet::IpNet;
use shunt_common::{
    ClientKey, Counter, FAIL_CLOSED, FAIL_OPEN, InterceptConfig, LocalTuple, OriginalDst, RawAddr,
    SockmapPeer, globals, maps, programs,
};

pub use fs::cgroup2_mount;
pub use kernel::Kernel;
pub use kernel_path::{KernelEvents, KernelRouteMaps, WantedRoute};
pub use netns::{netns_cookie, socket_cookie};
pub use sockmap::Sockmap;
pub use start::{Rollback, raise_memlock_limit};

use crate::{config::FailMode, net::to_raw};
use netns::NetnsProbes;

/// The compiled kernel programs, built by `build.rs` from `ebpf/shunt-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shunt.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("preparing the BPF filesystem at {path}: {source}")]
    BpfFs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("finding the cgroup v2 mount: {0}")]
    Cgroup2(std::io::Error),
    #[error("opening cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this shunt was built with SHUNT_SKIP_EBPF_BUILD set and carries no kernel programs: \
         rebuild it without (`cargo xtask build`)"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {message}")]
    Program { name: &'static str, message: String },
    #[error("map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("this kernel ({release}) lacks {needs}: shunt needs Linux {minimum} or later")]
    KernelTooOld {
        release: String,
        minimum: String,
        needs: String,
    },
    /// An optional feature this kernel lacks: what it needs.
    #[error("{0}")]
    Unavailable(String),
    #[error(
        "loading the eBPF object: {0}: the daemon needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (or CAP_SYS_ADMIN), and on kernels before 5.11 an RLIMIT_MEMLOCK large enough for its \
         maps (`ulimit -l unlimited`)"
    )]
    LoadNotPermitted(aya::EbpfError),
    #[error("reading the network namespace's cookie (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(std::io::Error),
    #[error("removing pins under {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A failed load, with the likely cause of the errors that come without one.
fn load_error(e: aya::EbpfError) -> BpfError {
    let permission = match &e {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::EPERM)
        }
        _ => false,
    };
    match permission {
        true => BpfError::LoadNotPermitted(e),
        false => BpfError::Load(e),
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |e| BpfError::Map {
        name,
        message: e.to_string(),
    }
}

fn prog_err<E: std::error::Error>(name: &'static str) -> impl Fn(E) -> BpfError {
    move |e| {
        // The interesting part (errno, verifier log) is usually in the source chain.
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        BpfError::Program { name, message }
    }
}

/// What the daemon needs to program the datapath.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub listen_port: u16,
    pub mark: u32,
    pub fail_mode: FailMode,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_ports: Vec<u16>,
    /// `intercept.local_fast_path`: attach the `sk_msg` program and have sock_ops put app ↔
    /// listener sockets into `LOCAL_SOCKS`.
    pub local_fast_path: bool,
    /// A running daemon is handing over to this one: its connections are live, so the
    /// sockmap entries they use are not stale.
    pub taking_over: bool,
}

/// Whether the links were created now or taken over from a previous daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    Attached,
    TookOverPinned,
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attachment::Attached => "attached now",
            Attachment::TookOverPinned => "taken over from pinned links",
        })
    }
}

/// The loaded datapath. Dropping it leaves everything pinned and attached (fail mode applies
/// while no daemon runs); [`uninstall`] removes it.
pub struct Datapath {
    /// Keeps the loaded programs (and the aya-log ring buffer) alive.
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, u32>,
    dst_by_client: MapData,
    counters: PerCpuArray<MapData, u64>,
    sockmap_peers: HashMap<MapData, u64, SockmapPeer>,
    /// The kernel fast path of `forwarding: sockmap`, or why this kernel cannot have it.
    sockmap: Result<Arc<Sockmap>, String>,
    /// Both ends of app ↔ listener connections on the local fast path.
    local_socks: SockHash<MapData, LocalTuple>,
    /// `intercept.local_fast_path` as in force: off, on, or why the kernel refused it.
    pub local_fast_path: LocalFastPath,
    /// What the kernel offers beyond the minimum.
    pub kernel: Kernel,
    netns_probes: NetnsProbes,
    /// Until the daemon takes them: the kernel path's maps and event ring.
    kernel_path: Option<(KernelRouteMaps, KernelEvents)>,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub attachment: Attachment,
}

impl Datapath {
    /// Loads, attaches (or takes over) and configures the programs.
    pub fn install(
        cfg: &DatapathConfig,
        log_level: log::LevelFilter,
    ) -> Result<Datapath, BpfError> {
        let kernel = Kernel::probe()?;
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| BpfError::BpfFs { path, source }
        };
        fs::ensure_bpffs(&cfg.pin_dir).map_err(pin_err(&cfg.pin_dir))?;
        for sub in ["maps", "links", "progs"] {
            let dir = cfg.pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(pin_err(&dir))?;
        }
        let cgroup = match &cfg.cgroup {
            Some(path) => path.clone(),
            None => cgroup2_mount().map_err(BpfError::Cgroup2)?,
        };
        let cgroup_dir = File::open(&cgroup).map_err(|source| BpfError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;

        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        retire_resized_counters(&cfg.pin_dir.join("maps"));
        let level = log_level_for_ebpf(log_level);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(cfg.pin_dir.join("maps"))
            .override_global(aya_log::LEVEL, &level, false)
            .override_global(
                globals::SOCK_OPS_NETNS_COOKIE,
                &u8::from(kernel.local_fast_path),
                true,
            )
            .load(OBJECT)
            .map_err(load_error)?;
        start_ebpf_logger(&mut ebpf);

        let mut attachment = Attachment::Attached;
        for name in programs::ALL {
            if attach_or_take_over(&mut ebpf, name, &cgroup_dir, &cfg.pin_dir)? {
                attachment = Attachment::TookOverPinned;
            }
        }

        let peers_data = take_map_data(&mut ebpf, maps::SOCKMAP_PEERS)?;
        let peers_fd = peers_data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| BpfError::Map {
                name: maps::SOCKMAP_PEERS,
                message: e.to_string(),
            })?;
        let mut sockmap_peers: HashMap<MapData, u64, SockmapPeer> =
            HashMap::try_from(Map::HashMap(peers_data)).map_err(map_err(maps::SOCKMAP_PEERS))?;
        // Entries of a previous daemon's connections: their sockets closed with it (unless it
        // is handing over and still drains them).
        if !cfg.taking_over {
            let stale: Vec<u64> = sockmap_peers.keys().filter_map(Result::ok).collect();
            for cookie in stale {
                let _ = sockmap_peers.remove(&cookie);
            }
        }
        let sockmap = match kernel.sockmap_forwarding {
            true => attach_sockmap(&mut ebpf, &cfg.pin_dir, peers_fd).map(Arc::new),
            false => Err(BpfError::Unavailable(kernel.sockmap_forwarding_missing())),
        }
        .map_err(|e| {
            tracing::warn!("forwarding: sockmap is unavailable, splice is used instead: {e}");
            e.to_string()
        });

        let local_socks: SockHash<MapData, LocalTuple> = take_map(&mut ebpf, maps::LOCAL_SOCKS)?;
        let local_fast_path = if cfg.local_fast_path && !kernel.local_fast_path {
            let why = kernel.local_fast_path_missing();
            tracing::warn!(
                "intercept.local_fast_path is off, connections take the TCP path: {why}"
            );
            LocalFastPath::Unavailable(why)
        } else if cfg.local_fast_path {
            match attach_local_fast_path(&mut ebpf, &cfg.pin_dir, &local_socks) {
                Ok(()) => LocalFastPath::On,
                Err(e) => {
                    tracing::warn!(
                        "intercept.local_fast_path: the kernel refused the sk_msg program, \
                         connections take the TCP path: {e}"
                    );
                    LocalFastPath::Unavailable(e.to_string())
                }
            }
        } else {
            LocalFastPath::Off
        };

        let netns_probes =
            NetnsProbes::new(take_map(&mut ebpf, maps::NETNS_PROBES)?, cgroup.clone());
        let kernel_path = (
            KernelRouteMaps::new(
                take_map(&mut ebpf, maps::KERNEL_ROUTES)?,
                take_map(&mut ebpf, maps::KERNEL_ENDPOINTS)?,
                take_map(&mut ebpf, maps::KERNEL_PORTS)?,
            ),
            KernelEvents::new(take_map::<RingBuf<MapData>>(
                &mut ebpf,
                maps::KERNEL_EVENTS,
            )?),
        );
        let mut datapath = Datapath {
            kernel,
            netns_probes,
            kernel_path: Some(kernel_path),
            enrolled: take_map(&mut ebpf, maps::ENROLLED)?,
            dst_by_client: take_map_data(&mut ebpf, maps::DST_BY_CLIENT)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            sockmap_peers,
            sockmap,
            local_socks,
            local_fast_path,
            _ebpf: ebpf,
            cgroup,
            pin_dir: cfg.pin_dir.clone(),
            attachment,
        };
        datapath.configure(cfg)?;
        Ok(datapath)
    }

    /// Writes the exclusions and then the config entry; the programs act only once the config
    /// entry is set, so they never run with a half-written configuration.
    fn configure(&mut self, cfg: &DatapathConfig) -> Result<(), BpfError> {
        let mut cidrs: LpmTrie<&mut MapData, RawAddr, u8> = self
            ._ebpf
            .map_mut(maps::EXCLUDED_CIDRS)
            .ok_or(BpfError::Map {
                name: maps::EXCLUDED_CIDRS,
                message: "missing".into(),
            })?
            .try_into()
            .map_err(map_err(maps::EXCLUDED_CIDRS))?;
        // New entries first, then the ones no longer configured: a daemon taking over from
        // a running one never leaves the programs without their exclusions.
        let mut wanted = Vec::new();
        for net in &cfg.exclude_cidrs {
            let (addr, prefix) = match net {
                IpNet::V4(n) => (to_raw(n.network().into()), 96 + u32::from(n.prefix_len())),
                IpNet::V6(n) => (to_raw(n.network().into()), u32::from(n.prefix_len())),
            };
            cidrs
                .insert(&Key::new(prefix, addr), 1, 0)
                .map_err(map_err(maps::EXCLUDED_CIDRS))?;
            wanted.push((prefix, addr));
        }
        let stale: Vec<_> = cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale {
            cidrs.remove(&key).map_err(map_err(maps::EXCLUDED_CIDRS))?;
        }

        let mut ports: HashMap<&mut MapData, u16, u8> = self
            ._ebpf
            .map_mut(maps::EXCLUDED_PORTS)
            .ok_or(BpfError::Map {
                name: maps::EXCLUDED_PORTS,
                message: "missing".into(),
            })?
            .try_into()
            .map_err(map_err(maps::EXCLUDED_PORTS))?;
        for port in &cfg.exclude_ports {
            ports
                .insert(port, 1, 0)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        let stale: Vec<_> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !cfg.exclude_ports.contains(p))
            .collect();
        for port in stale {
            ports.remove(&port).map_err(map_err(maps::EXCLUDED_PORTS))?;
        }

        let mut config: Array<&mut MapData, InterceptConfig> = self
            ._ebpf
            .map_mut(maps::CONFIG)
            .ok_or(BpfError::Map {
                name: maps::CONFIG,
                message: "missing".into(),
            })?
            .try_into()
            .map_err(map_err(maps::CONFIG))?;
        let value = InterceptConfig {
            listen_port: cfg.listen_port,
            fail_mode: match cfg.fail_mode {
                FailMode::Open => FAIL_OPEN,
                FailMode::Closed => FAIL_CLOSED,
            },
            // Only with the program attached: a socket in the map without it would gain
            // nothing and still pay for the sockmap's hooks.
            local_fast_path: u8::from(self.local_fast_path == LocalFastPath::On),
            mark: cfg.mark,
        };
        config.set(0, value, 0).map_err(map_err(maps::CONFIG))
    }

    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), BpfError> {
        self.enrolled
            .insert(netns_cookie, 1, 0)
            .map_err(map_err(maps::ENROLLED))
    }

    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), BpfError> {
        match self.enrolled.remove(&netns_cookie) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other.map_err(map_err(maps::ENROLLED)),
        }
    }

    /// The cookie of the network namespace `socket` (an unconnected TCP/IPv4 socket, made
    /// for this) belongs to, as the programs see it.
    pub fn netns_cookie(&mut self, socket: &socket2::Socket) -> Result<u64, BpfError> {
        match self.kernel.netns_cookie_sockopt {
            true => netns_cookie(socket.as_fd()).map_err(BpfError::NetnsCookie),
            false => self.netns_probes.cookie_of(socket),
        }
    }

    /// The kernel path's maps and event ring, for the one owner that keeps them (`None` once
    /// taken).
    pub fn take_kernel_path(&mut self) -> Option<(KernelRouteMaps, KernelEvents)> {
        self.kernel_path.take()
    }

    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// A handle the proxy uses to claim original destinations without locking the datapath.
    pub fn original_dst_table(&self) -> Result<OriginalDstTable, BpfError> {
        let fd = self
            .dst_by_client
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| BpfError::Map {
                name: maps::DST_BY_CLIENT,
                message: e.to_string(),
            })?;
        // Hash maps answer lookup-and-delete from 5.14 on; older kernels refuse any key
        // with ENOTSUPP before looking, newer ones say ENOENT for one that is not there.
        let probe =
            sys::map_lookup_and_delete::<ClientKey, OriginalDst>(fd.as_fd(), &ClientKey::default());
        let atomic_take = !matches!(&probe, Err(e) if e.raw_os_error() == Some(ENOTSUPP));
        Ok(OriginalDstTable { fd, atomic_take })
    }

    /// Programs whose pinned link is gone (someone removed the pins): they no longer
    /// intercept anything.
    pub fn missing_links(&self) -> Vec<&'static str> {
        programs::ALL
            .iter()
            .copied()
            .filter(|name| !self.pin_dir.join("links").join(name).exists())
            .collect()
    }

    /// The kernel fast path for `forwarding: sockmap`, or why it is unavailable.
    pub fn sockmap(&self) -> Result<Arc<Sockmap>, String> {
        self.sockmap.clone()
    }

    /// The per-CPU counters, summed, and `sockmap_sockets`: sockets of connections the
    /// kernel forwards now (back to 0 once they have all closed).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let mut counters: BTreeMap<&'static str, u64> = Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect();
        let sockets = self.sockmap_peers.keys().filter(Result::is_ok).count();
        counters.insert("sockmap_sockets", sockets as u64);
        counters.insert("local_fast_path_sockets", self.local_fast_path_sockets());
        counters
    }

    /// Whether accepted sockets may be on the local fast path: it is on, or a daemon handing
    /// over had it on and sockets it put there are still open, some maybe still waiting in
    /// the listeners' accept queues. Asked after `configure`, so no socket joins later.
    pub fn local_fast_path_in_use(&self) -> bool {
        self.local_fast_path == LocalFastPath::On || self.local_fast_path_sockets() > 0
    }

    /// Sockets in `LOCAL_SOCKS` now: two per open app ↔ listener connection on the fast path
    /// (the kernel removes a socket when it closes).
    pub fn local_fast_path_sockets(&self) -> u64 {
        self.local_socks.keys().filter(Result::is_ok).count() as u64
    }
}

/// Whether `intercept.local_fast_path` is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalFastPath {
    Off,
    On,
    /// Configured, but the kernel refused the program: connections take the TCP path.
    Unavailable(String),
}

impl std::fmt::Display for LocalFastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalFastPath::Off => f.write_str("off"),
            LocalFastPath::On => f.write_str("on"),
            LocalFastPath::Unavailable(why) => write!(f, "unavailable ({why})"),
        }
    }
}

/// A pinned `COUNTERS` of another size (a daemon with fewer counters made it) would leave the
/// new counters uncounted: it is unpinned, and the programs loaded next make a fresh one.
/// Programs still running keep the old one until they are replaced.
fn retire_resized_counters(maps_dir: &Path) {
    let pin = maps_dir.join(maps::COUNTERS);
    let Ok(info) = MapInfo::from_pin(&pin) else {
        return;
    };
    if info.max_entries() != Counter::COUNT {
        tracing::info!(
            "counters map pinned by an earlier version ({} counters, now {}): starting it afresh",
            info.max_entries(),
            Counter::COUNT
        );
        let _ = std::fs::remove_file(&pin);
    }
}

/// Loads the `sk_msg` program, attaches it to `LOCAL_SOCKS` and pins it. Attaching replaces
/// whatever program a previous daemon left on the pinned map; sockets already in the map keep
/// the program they joined with. When a daemon that handed over exits, its detach names its
/// own program, which is no longer the attached one, so the kernel leaves ours in place.
fn attach_local_fast_path(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    local_socks: &SockHash<MapData, LocalTuple>,
) -> Result<(), BpfError> {
    let name = programs::LOCAL_FAST_PATH;
    let Some(Program::SkMsg(program)) = ebpf.program_mut(name) else {
        return Err(BpfError::Program {
            name,
            message: "missing from the object".into(),
        });
    };
    load(program.load(), name)?;
    program.attach(local_socks.fd()).map_err(prog_err(name))?;
    let prog_pin = pin_dir.join("progs").join(name);
    let _ = std::fs::remove_file(&prog_pin);
    program.pin(&prog_pin).map_err(prog_err(name))?;
    Ok(())
}

/// Loads the stream verdict, attaches it to `SM_SOURCES` and pins it. The attachment is the
/// daemon's: it goes when the daemon exits, and so do the sockets it steers. A daemon that was
/// killed leaves its verdict attached to the pinned map; attaching again replaces it.
fn attach_sockmap(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    peers: std::os::fd::OwnedFd,
) -> Result<Sockmap, BpfError> {
    let name = programs::SOCKMAP_VERDICT;
    let sources: SockHash<MapData, u64> = take_map(ebpf, maps::SOCKMAP_SOURCES)?;
    let targets: SockHash<MapData, u64> = take_map(ebpf, maps::SOCKMAP_TARGETS)?;
    let Some(Program::SkSkb(program)) = ebpf.program_mut(name) else {
        return Err(BpfError::Program {
            name,
            message: "missing from the object".into(),
        });
    };
    load(program.load(), name)?;
    program.attach(sources.fd()).map_err(prog_err(name))?;
    let prog_pin = pin_dir.join("progs").join(name);
    let _ = std::fs::remove_file(&prog_pin);
    program.pin(&prog_pin).map_err(prog_err(name))?;
    let fd = |name: &'static str, fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(|e| BpfError::Map {
            name,
            message: e.to_string(),
        })
    };
    Ok(Sockmap::new(
        fd(maps::SOCKMAP_SOURCES, sources.fd().as_fd())?,
        fd(maps::SOCKMAP_TARGETS, targets.fd().as_fd())?,
        peers,
    ))
}

/// The kernel's "operation not supported" (not one of libc's errno values).
const ENOTSUPP: i32 = 524;

/// The proxy's view of `DST_BY_CLIENT`.
pub struct OriginalDstTable {
    fd: std::os::fd::OwnedFd,
    /// The kernel takes an entry in one step (5.14); before, it is read and then deleted,
    /// which is as good here: each key is one client socket, claimed by one accept.
    atomic_take: bool,
}

impl OriginalDstTable {
    /// Claims the original destination of an accepted connection (read and deleted, so
    /// entries never pile up).
    pub fn take(&self, key: &ClientKey) -> std::io::Result<Option<OriginalDst>> {
        if self.atomic_take {
            return sys::map_lookup_and_delete(self.fd.as_fd(), key);
        }
        let found = sys::map_lookup(self.fd.as_fd(), key)?;
        if found.is_some() {
            sys::map_delete(self.fd.as_fd(), key)?;
        }
        Ok(found)
    }
}

fn take_map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, BpfError> {
    match ebpf.take_map(name) {
        Some(Map::HashMap(data) | Map::LruHashMap(data)) => Ok(data),
        Some(_) => Err(BpfError::Map {
            name,
            message: "unexpected map type".into(),
        }),
        None => Err(BpfError::Map {
            name,
            message: "missing from the object".into(),
        }),
    }
}

fn take_map<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        name,
        message: "missing from the object".into(),
    })?;
    T::try_from(map).map_err(map_err(name))
}

/// cgroup links always coexist with other programs on the cgroup; the kernel rejects the
/// legacy `BPF_F_ALLOW_MULTI` flag on link creation, so ask for the default mode.
const LINK_ATTACH: CgroupAttachMode = CgroupAttachMode::Single;

/// Loads one program and either attaches it (first start) or swaps it into the link a previous
/// daemon pinned. Returns whether it took over a pinned link.
fn attach_or_take_over(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin_dir: &Path,
) -> Result<bool, BpfError> {
    let program = ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        message: "missing from the object".into(),
    })?;
    let link_pin = pin_dir.join("links").join(name);
    let prog_pin = pin_dir.join("progs").join(name);

    let new_link: Option<FdLink> = match program {
        Program::CgroupSockAddr(p) => {
            load(p.load(), name)?;
            if link_pin.exists() {
                None
            } else {
                let id = p.attach(cgroup, LINK_ATTACH).map_err(prog_err(name))?;
                Some(
                    p.take_link(id)
                        .map_err(prog_err(name))?
                        .try_into()
                        .map_err(prog_err(name))?,
                )
            }
        }
        Program::SockOps(p) => {
            load(p.load(), name)?;
            if link_pin.exists() {
                None
            } else {
                let id = SockOps::attach(p, cgroup, LINK_ATTACH).map_err(prog_err(name))?;
                Some(
                    p.take_link(id)
                        .map_err(prog_err(name))?
                        .try_into()
                        .map_err(prog_err(name))?,
                )
            }
        }
        _ => {
            return Err(BpfError::Program {
                name,
                message: "unexpected program type".into(),
            });
        }
    };

    let took_over = match new_link {
        Some(link) => {
            link.pin(&link_pin).map_err(prog_err(name))?;
            false
        }
        None => {
            let link = sys::obj_get(&link_pin).map_err(prog_err(name))?;
            let prog_fd = program.fd().map_err(prog_err(name))?;
            sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(prog_err(name))?;
            tracing::info!(program = name, "took over pinned link");
            true
        }
    };
    // Keep the pinned program the one that is attached.
    let _ = std::fs::remove_file(&prog_pin);
    program.pin(&prog_pin).map_err(prog_err(name))?;
    Ok(took_over)
}

fn load(
    result: Result<(), aya::programs::ProgramError>,
    name: &'static str,
) -> Result<(), BpfError> {
    result.map_err(|e| {
        // The verifier log is the useful part of a load failure.
        let message = match &e {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                format!("{io_error}\n{verifier_log}")
            }
            other => other.to_string(),
        };
        BpfError::Program { name, message }
    })
}

/// Removes every pin shunt made: links (which detaches the programs once no daemon holds
/// them), programs and maps, then the directory itself.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let mut removed = Vec::new();
    for sub in ["links", "progs", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(BpfError::Unpin { path: dir, source }),
        };
        for entry in entries {
            let path = entry
                .map_err(|source| BpfError::Unpin {
                    path: dir.clone(),
                    source,
                })?
                .path();
            std::fs::remove_file(&path).map_err(|source| BpfError::Unpin {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
        std::fs::remove_dir(&dir).map_err(|source| BpfError::Unpin {
            path: dir.clone(),
            source,
        })?;
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(BpfError::Unpin {
                path: pin_dir.to_owned(),
                source: e,
            });
        }
        _ => {}
    }
    Ok(removed)
}

fn log_level_for_ebpf(level: log::LevelFilter) -> u8 {
    use aya_log::Level;
    match level {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => Level::Error as u8,
        log::LevelFilter::Warn => Level::Warn as u8,
        log::LevelFilter::Info => Level::Info as u8,
        log::LevelFilter::Debug => Level::Debug as u8,
        log::LevelFilter::Trace => Level::Trace as u8,
    }
}

/// Forwards aya-log records from the programs to the `log` facade (and so to `tracing`).
fn start_ebpf_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    let registered = sys::register_ring(logger);
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
