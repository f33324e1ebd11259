//! Types shared by shunt's eBPF programs and its userspace daemon.
//!
//! Everything here is `#[repr(C)]` and plain data so that both sides agree on the layout of
//! map keys and values byte for byte. Addresses are kept as four `u32` words exactly as the
//! kernel stores them (network byte order in memory, the convention of `bpf_sock_addr.user_ip6`);
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so one key type serves both families.
#![no_std]

/// Map names, shared so that userspace opens exactly what the kernel side declares.
/// Kernel object names are limited to 15 characters.
pub mod maps {
    pub const CONFIG: &str = "CONFIG";
    pub const ENROLLED: &str = "ENROLLED";
    pub const EXCLUDED_CIDRS: &str = "EXCL_CIDRS";
    pub const EXCLUDED_PORTS: &str = "EXCL_PORTS";
    /// Socket cookie → [`Redirected`](super::Redirected). (Before the netns cookie joined
    /// the value it was `DST_BY_SOCK`; a new name keeps an upgraded daemon from reading the
    /// old layout out of a pinned map.)
    pub const REDIRECTED: &str = "REDIRECTED";
    pub const DST_BY_CLIENT: &str = "DST_BY_CLIENT";
    pub const COUNTERS: &str = "COUNTERS";
    /// Sockets whose incoming bytes the stream verdict redirects (`forwarding: sockmap`).
    pub const SOCKMAP_SOURCES: &str = "SM_SOURCES";
    /// Sockets bytes may be redirected to. No program is attached to it, so a socket can
    /// be a target before its own bytes are redirected.
    pub const SOCKMAP_TARGETS: &str = "SM_TARGETS";
    /// Socket cookie → its peer's cookie and the bytes redirected from it.
    pub const SOCKMAP_PEERS: &str = "SM_PEERS";
    /// Both ends of every app ↔ in-pod listener connection (`intercept.local_fast_path`),
    /// keyed by [`LocalTuple`]; the `sk_msg` program is attached to it.
    pub const LOCAL_SOCKS: &str = "LOCAL_SOCKS";
    /// Socket cookie → netns cookie of the sockets that connected to the probe address
    /// ([`NETNS_PROBE_PORT`](super::NETNS_PROBE_PORT)). Not pinned: it is the daemon's own.
    pub const NETNS_PROBES: &str = "NETNS_PROBES";
    /// Destination (address + port) → [`KernelRoute`](super::KernelRoute): the
    /// destinations connect() sends straight to an endpoint (or leaves alone) instead of to
    /// the proxy, and those it must never (`KERNEL_ROUTE_PROXY`).
    pub const KERNEL_ROUTES: &str = "KP_ROUTES";
    /// [`EndpointKey`](super::EndpointKey) → endpoint address: the endpoints of the
    /// Services in `KP_ROUTES`.
    pub const KERNEL_ENDPOINTS: &str = "KP_ENDPOINTS";
    /// Destination port (host order) → 1: destinations on these ports that are not in
    /// `KP_ROUTES` take the kernel path and are left alone (`opaque_ports`).
    pub const KERNEL_PORTS: &str = "KP_PORTS";
    /// Ring buffer of [`KernelPathEvent`](super::KernelPathEvent)s: the kernel path's
    /// connections as they start and end. Not pinned: each daemon reads its own programs'.
    pub const KERNEL_EVENTS: &str = "KP_EVENTS";

    pub const ENROLLED_CAPACITY: u32 = 4096;
    pub const EXCLUDED_CIDRS_CAPACITY: u32 = 1024;
    pub const EXCLUDED_PORTS_CAPACITY: u32 = 256;
    /// Original destinations in flight. LRU, so an entry whose connection never reaches the
    /// proxy is eventually evicted instead of filling the map.
    pub const DST_CAPACITY: u32 = 65536;
    /// Sockets in each sockmap (two per connection): past it, new connections are spliced.
    pub const SOCKMAP_CAPACITY: u32 = 65536;
    /// Sockets on the local fast path (two per connection): past it, connections take the
    /// TCP path.
    pub const LOCAL_SOCKS_CAPACITY: u32 = 65536;
    pub const NETNS_PROBES_CAPACITY: u32 = 256;
    pub const KERNEL_ROUTES_CAPACITY: u32 = 16384;
    pub const KERNEL_ENDPOINTS_CAPACITY: u32 = 65536;
    pub const KERNEL_PORTS_CAPACITY: u32 = 256;
    /// Bytes of the event ring (a power of two, a multiple of the page size): 1 MiB holds
    /// about 9,000 events, far more than arrive between two reads.
    pub const KERNEL_EVENTS_BYTES: u32 = 1 << 20;
    /// Unread bytes in the event ring past which a report wakes the daemon at once rather
    /// than waiting for its next timed read: a quarter of the ring.
    pub const KERNEL_EVENTS_WAKE_AT: u32 = KERNEL_EVENTS_BYTES / 4;
}

/// Program names (also their ELF section symbols). Kernel program names are limited to 15
/// characters; the `sock_ops` program must not be called `sockops` (bpf-linker clash).
pub mod programs {
    pub const CONNECT4: &str = "shunt_connect4";
    pub const CONNECT6: &str = "shunt_connect6";
    pub const SOCK_OPS: &str = "shunt_sock_ops";
    pub const GETPEERNAME4: &str = "shunt_getpeer4";
    pub const GETPEERNAME6: &str = "shunt_getpeer6";
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, SOCK_OPS, GETPEERNAME4, GETPEERNAME6];
    /// The `sk_skb/stream_verdict` program of `forwarding: sockmap`, attached to
    /// `SM_SOURCES` rather than to the cgroup.
    pub const SOCKMAP_VERDICT: &str = "shunt_sk_verdict";
    /// The `sk_msg` program of `intercept.local_fast_path`, attached to `LOCAL_SOCKS`.
    pub const LOCAL_FAST_PATH: &str = "shunt_sk_msg";
}

/// Read-only globals the daemon sets when it loads the programs, from what it found the kernel
/// can do. The verifier knows their values, so a branch they rule out is never checked: code
/// calling a helper the kernel lacks loads as long as the kernel cannot reach it.
pub mod globals {
    /// `1` where sock_ops programs may call `bpf_get_netns_cookie` (Linux 5.15), which the
    /// local fast path keys its sockets by.
    pub const SOCK_OPS_NETNS_COOKIE: &str = "SOCK_OPS_NETNS_COOKIE";
}

/// A connect to this address and port from a socket of the attached cgroup is refused
/// (`EPERM`) and its namespace's cookie recorded in `NETNS_PROBES` by socket cookie. Kernels
/// before 5.14 have no `SO_NETNS_COOKIE`; this is how the daemon learns a pod's cookie there.
/// No one else connects to port 0.
pub const NETNS_PROBE_ADDR: [u8; 4] = [127, 0, 0, 1];
pub const NETNS_PROBE_PORT: u16 = 0;

pub const FAIL_OPEN: u8 = 0;
pub const FAIL_CLOSED: u8 = 1;

/// The one entry of the `CONFIG` array. All zero (the state before the daemon writes it)
/// means "not configured": the programs then let every connection through untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterceptConfig {
    /// Port of the in-pod listeners, host byte order. 0 = not configured.
    pub listen_port: u16,
    /// [`FAIL_OPEN`] or [`FAIL_CLOSED`].
    pub fail_mode: u8,
    /// 1: sock_ops puts both ends of app ↔ listener connections into `LOCAL_SOCKS`
    /// (`intercept.local_fast_path`). Takes what was a padding byte, so the value keeps its
    /// size and a daemon taking over re-uses the pinned `CONFIG` map as it is.
    pub local_fast_path: u8,
    /// `SO_MARK` carried by the proxy's own sockets; those are never redirected.
    pub mark: u32,
}

/// An address as the kernel stores it: four words in network byte order, IPv4 mapped.
pub type RawAddr = [u32; 4];

/// A socket `connect()` redirected: where it was going and its network namespace, which
/// sock_ops needs and cannot ask the kernel for before 5.15.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirected {
    pub dst: OriginalDst,
    pub netns_cookie: u64,
}

/// Where a redirected connection was originally going; also a destination as a key of
/// `KP_ROUTES`, and an endpoint's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginalDst {
    pub addr: RawAddr,
    /// Host byte order.
    pub port: u16,
    /// In `REDIRECTED`: [`VIA_PROXY`] or [`VIA_KERNEL`]. Zero elsewhere.
    pub via: u8,
    pub _pad: [u8; 5],
}

/// `OriginalDst::via` of a socket connect() sent to the in-pod listener (what daemons
/// before the kernel path wrote: the byte was padding).
pub const VIA_PROXY: u8 = 0;
/// `OriginalDst::via` of a socket on the kernel path: connected to an endpoint (or left
/// alone) by connect(); sock_ops reports it as a [`KernelPathEvent`].
pub const VIA_KERNEL: u8 = 1;

/// `KernelRoute::flags`: the destination must go through the proxy (a fault rule names
/// it), even where `KP_PORTS` would send it the kernel path.
pub const KERNEL_ROUTE_PROXY: u32 = 1;

/// How connect() treats a destination of `KP_ROUTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelRoute {
    /// Which endpoint set of `KP_ENDPOINTS` is the Service's; meaningless when
    /// `endpoint_count` is 0 (not a Service: the connection goes where it was going).
    pub endpoints_id: u32,
    pub endpoint_count: u32,
    /// One in this many new connections still goes through the proxy, so that a learned
    /// destination that starts speaking HTTP/2 is noticed; 0: none.
    pub sample_every: u32,
    /// [`KERNEL_ROUTE_PROXY`].
    pub flags: u32,
    /// Connections seen (for sampling) and endpoints picked (round-robin). Updated without
    /// atomics, which 5.10 lacks for fetching adds: two CPUs connecting at the same instant
    /// may pick the same endpoint once.
    pub seen: u32,
    pub next: u32,
}

/// Key of `KP_ENDPOINTS`: the `index`th endpoint of endpoint set `endpoints_id`. The daemon
/// writes a changed Service's endpoints under a new id and then points its route at it, so
/// connect() never sees half a set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub endpoints_id: u32,
    pub index: u32,
}

/// `KernelPathEvent::kind`: connect() sent the socket on the kernel path (sock_ops at
/// `TCP_CONNECT_CB`, before the SYN).
pub const EVENT_CONNECTING: u8 = 1;
/// The socket closed (sock_ops state callback, `TCP_CLOSE`).
pub const EVENT_CLOSED: u8 = 2;

/// TCP states, as sock_ops' state callback reports the one a socket left.
pub const TCP_SYN_SENT: u8 = 2;

/// One kernel-path connection starting or ending, from sock_ops to the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelPathEvent {
    pub socket_cookie: u64,
    pub netns_cookie: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// Closed: bytes the socket received, and bytes it sent that the peer acknowledged.
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// What the application asked for.
    pub original: OriginalDst,
    /// What the socket is connected to (the endpoint picked).
    pub remote: OriginalDst,
    /// The application's own address and port.
    pub local: OriginalDst,
    /// [`EVENT_CONNECTING`] or [`EVENT_CLOSED`].
    pub kind: u8,
    /// Closed: the state the socket left for `TCP_CLOSE` ([`TCP_SYN_SENT`]: the connect
    /// failed).
    pub old_state: u8,
    pub _pad: [u8; 6],
}

/// What the proxy can name after `accept()`: the pod's network namespace and the client's
/// source address and port. The netns cookie is part of the key because the same loopback
/// tuple can exist in several pods at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    pub addr: RawAddr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A socket of a kernel-forwarded connection, keyed by its cookie in `SM_PEERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapPeer {
    /// Cookie of the socket this one's bytes are redirected to (its key in `SM_TARGETS`).
    pub peer_cookie: u64,
    /// Payload bytes the verdict has redirected from this socket to its peer.
    pub bytes: u64,
}

/// A local TCP socket as both ends of a connection inside one network namespace see it:
/// its own address and port and its peer's. The peer's key is this one with the two
/// swapped, which is how the `sk_msg` program finds where to send a message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalTuple {
    /// The same loopback tuple can exist in several pods at once.
    pub netns_cookie: u64,
    pub local_addr: RawAddr,
    pub remote_addr: RawAddr,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl LocalTuple {
    /// The key of the socket at the other end.
    #[inline(always)]
    pub const fn reversed(&self) -> LocalTuple {
        LocalTuple {
            netns_cookie: self.netns_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Key of the excluded-CIDR LPM trie: an IPv4 CIDR `a.b.c.d/n` is stored as
/// `::ffff:a.b.c.d/(96 + n)`.
pub type CidrKeyData = RawAddr;

/// Indices of the per-CPU `COUNTERS` array: what the programs did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() rewritten to the in-pod listener.
    Redirected = 0,
    /// Rewritten although no listener was present (fail mode closed): the client is refused.
    RedirectedNoListener,
    /// sock_ops handed the original destination to the proxy.
    DstRecorded,
    /// getpeername() answered with the original destination.
    PeerNameRewritten,
    SkipNotTcp,
    SkipNotEnrolled,
    /// The socket carries the proxy's mark: shunt's own upstream connection.
    SkipMarked,
    SkipLoopback,
    SkipExcludedCidr,
    SkipExcludedPort,
    /// Fail open: shunt's listener is absent in that netns, so the connection goes direct.
    SkipNoListener,
    /// The daemon has not written its configuration yet.
    SkipUnconfigured,
    /// A map update failed (map full?): the connection goes direct.
    SkipMapFull,
    /// The stream verdict redirected a received skb to the peer socket.
    SockmapRedirected,
    /// The stream verdict found no peer for a socket and passed its bytes to userspace.
    SockmapNoPeer,
    /// sock_ops put a socket on the local fast path (`LOCAL_SOCKS`).
    LocalFastPathJoined,
    /// sock_ops could not add a socket to `LOCAL_SOCKS` (map full, socket not eligible).
    LocalFastPathJoinFailed,
    /// The `sk_msg` program moved a message straight into the peer socket's receive queue.
    LocalFastPathRedirected,
    /// The `sk_msg` program found no peer (not established yet, or gone): TCP took it.
    LocalFastPathNoPeer,
    /// connect() sent a Service's connection straight to one of its endpoints.
    KernelPathBalanced,
    /// connect() let a kernel-path destination that is not a Service go as it was.
    KernelPathDirect,
    /// A kernel-path destination's connection sent through the proxy as a sample.
    KernelPathSampled,
    /// A kernel-path Service's endpoint was missing or of the other family: the proxy took
    /// the connection.
    KernelPathNoEndpoint,
    /// A kernel-path event was lost (the ring was full).
    KernelPathEventLost,
}

impl Counter {
    pub const COUNT: u32 = 24;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::RedirectedNoListener,
        Counter::DstRecorded,
        Counter::PeerNameRewritten,
        Counter::SkipNotTcp,
        Counter::SkipNotEnrolled,
        Counter::SkipMarked,
        Counter::SkipLoopback,
        Counter::SkipExcludedCidr,
        Counter::SkipExcludedPort,
        Counter::SkipNoListener,
        Counter::SkipUnconfigured,
        Counter::SkipMapFull,
        Counter::SockmapRedirected,
        Counter::SockmapNoPeer,
        Counter::LocalFastPathJoined,
        Counter::LocalFastPathJoinFailed,
        Counter::LocalFastPathRedirected,
        Counter::LocalFastPathNoPeer,
        Counter::KernelPathBalanced,
        Counter::KernelPathDirect,
        Counter::KernelPathSampled,
        Counter::KernelPathNoEndpoint,
        Counter::KernelPathEventLost,
    ];

    /// Stable name, used in the admin API and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::RedirectedNoListener => "redirected_no_listener",
            Counter::DstRecorded => "dst_recorded",
            Counter::PeerNameRewritten => "peername_rewritten",
            Counter::SkipNotTcp => "skip_not_tcp",
            Counter::SkipNotEnrolled => "skip_not_enrolled",
            Counter::SkipMarked => "skip_marked",
            Counter::SkipLoopback => "skip_loopback",
            Counter::SkipExcludedCidr => "skip_excluded_cidr",
            Counter::SkipExcludedPort => "skip_excluded_port",
            Counter::SkipNoListener => "skip_no_listener",
            Counter::SkipUnconfigured => "skip_unconfigured",
            Counter::SkipMapFull => "skip_map_full",
            Counter::SockmapRedirected => "sockmap_redirected",
            Counter::SockmapNoPeer => "sockmap_no_peer",
            Counter::LocalFastPathJoined => "local_fast_path_joined",
            Counter::LocalFastPathJoinFailed => "local_fast_path_join_failed",
            Counter::LocalFastPathRedirected => "local_fast_path_redirected",
            Counter::LocalFastPathNoPeer => "local_fast_path_no_peer",
            Counter::KernelPathBalanced => "kernel_path_balanced",
            Counter::KernelPathDirect => "kernel_path_direct",
            Counter::KernelPathSampled => "kernel_path_sampled",
            Counter::KernelPathNoEndpoint => "kernel_path_no_endpoint",
            Counter::KernelPathEventLost => "kernel_path_event_lost",
        }
    }
}

/// The IPv4-mapped form of an IPv4 address given as a network-order word.
#[inline(always)]
pub const fn map_v4(ip4_be: u32) -> RawAddr {
    // 0x0000ffff in network byte order is the word with bytes [0, 0, 0xff, 0xff].
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether an address is IPv4-mapped; its IPv4 word is then `addr[3]`.
#[inline(always)]
pub const fn is_v4_mapped(addr: &RawAddr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are `repr(C)` plain data with explicit padding fields, valid for any bytes.
    unsafe impl aya::Pod for super::InterceptConfig {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::Redirected {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::SockmapPeer {}
    unsafe impl aya::Pod for super::LocalTuple {}
    unsafe impl aya::Pod for super::KernelRoute {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::KernelPathEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(core::mem::size_of::<InterceptConfig>(), 8);
        assert_eq!(core::mem::size_of::<OriginalDst>(), 24);
        assert_eq!(core::mem::size_of::<Redirected>(), 32);
        assert_eq!(core::mem::size_of::<ClientKey>(), 32);
        assert_eq!(core::mem::size_of::<SockmapPeer>(), 16);
        assert_eq!(core::mem::size_of::<LocalTuple>(), 48);
        assert_eq!(core::mem::size_of::<KernelRoute>(), 24);
        assert_eq!(core::mem::size_of::<EndpointKey>(), 8);
        assert_eq!(core::mem::size_of::<KernelPathEvent>(), 120);
    }

    #[test]
    fn counter_table_is_complete() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} out of place", c.name());
        }
    }

    #[test]
    fn a_local_tuple_reversed_is_the_peers_key() {
        let app = LocalTuple {
            netns_cookie: 7,
            local_addr: map_v4(u32::from_ne_bytes([127, 0, 0, 1])),
            remote_addr: map_v4(u32::from_ne_bytes([127, 0, 0, 1])),
            local_port: 40000,
            remote_port: 15001,
            _pad: 0,
        };
        let shunt = app.reversed();
        assert_eq!((shunt.local_port, shunt.remote_port), (15001, 40000));
        assert_eq!(shunt.netns_cookie, 7);
        assert_eq!(shunt.reversed(), app);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let ip = u32::from_ne_bytes([10, 1, 2, 3]);
        let mapped = map_v4(ip);
        assert!(is_v4_mapped(&mapped));
        assert_eq!(mapped[3], ip);
        assert!(!is_v4_mapped(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
    }
}
