//! shunt's kernel programs.
//!
//! * `cgroup/connect4`, `cgroup/connect6`: on every TCP `connect()` in the attached cgroup,
//!   redirect sockets of enrolled network namespaces to shunt's in-pod listener and remember
//!   the original destination and the namespace's cookie by socket cookie. `connect4` also
//!   answers the daemon's namespace probes (see `NETNS_PROBE_PORT`).
//! * `sock_ops` at `TCP_CONNECT_CB` (inside `connect()`, before the SYN, so it cannot race the
//!   proxy's `accept()`): copy the original destination to a key the proxy can compute after
//!   `accept()` — netns cookie + client address and port. At `TCP_CLOSE` it forgets the socket.
//!   It takes the netns cookie from what `connect` recorded: sock_ops may only ask the kernel
//!   for it from Linux 5.15 on.
//! * The kernel path: a destination in `KP_ROUTES` (or on a port in `KP_PORTS`) is not sent
//!   to the listener. connect() rewrites a Service's virtual address to the next of its
//!   endpoints (`KP_ENDPOINTS`, round-robin) or leaves any other destination alone, and
//!   records it in `REDIRECTED` as `VIA_KERNEL`; sock_ops then reports the connection to the
//!   daemon when it starts and when it closes (`KP_EVENTS`), bytes and all.
//! * `cgroup/getpeername4`, `cgroup/getpeername6`: answer with the original destination, so the
//!   application sees the address it asked for.
//! * `sk_skb/stream_verdict` on the `SM_SOURCES` sockhash (`forwarding: sockmap`): every skb
//!   a source socket receives goes straight to the egress of its peer socket, so passthrough
//!   bytes never reach userspace. Userspace decides which sockets are sources and when (see
//!   `proxy/src/proxy/sockmap.rs` for the ordering this relies on).
//! * `intercept.local_fast_path`: sock_ops also puts both ends of every app ↔ in-pod listener
//!   connection into the `LOCAL_SOCKS` sockhash once they are established, and the `sk_msg`
//!   program attached to it hands every message one end sends straight to the other end's
//!   receive queue (`BPF_F_INGRESS`), skipping the TCP/IP stack of the loopback hop.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        bpf_sock_tuple, sk_action,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use shunt_common::{
    ClientKey, Counter, EVENT_CLOSED, EVENT_CONNECTING, EndpointKey, FAIL_CLOSED, InterceptConfig,
    KERNEL_ROUTE_PROXY, KernelPathEvent, KernelRoute, LocalTuple, NETNS_PROBE_ADDR,
    NETNS_PROBE_PORT, OriginalDst, RawAddr, Redirected, SockmapPeer, TCP_SYN_SENT, VIA_KERNEL,
    VIA_PROXY, is_v4_mapped, map_v4, maps::*,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;
/// cgroup sock_addr programs: 1 lets the syscall proceed (with our rewrite, if any).
const ALLOW: i32 = 1;

#[map(name = "CONFIG")]
static CONFIG: Array<InterceptConfig> = Array::pinned(1, 0);

/// Netns cookie → 1 for every enrolled pod.
#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, u32> = HashMap::pinned(ENROLLED_CAPACITY, 0);

#[map(name = "EXCL_CIDRS")]
static EXCLUDED_CIDRS: LpmTrie<RawAddr, u8> = LpmTrie::pinned(EXCLUDED_CIDRS_CAPACITY, 0);

/// Destination port (host order) → 1.
#[map(name = "EXCL_PORTS")]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(EXCLUDED_PORTS_CAPACITY, 0);

/// Socket cookie → original destination and netns cookie; read by sock_ops and getpeername.
#[map(name = "REDIRECTED")]
static REDIRECTED: LruHashMap<u64, Redirected> = LruHashMap::pinned(DST_CAPACITY, 0);

/// Socket cookie → netns cookie of the daemon's namespace probes.
#[map(name = "NETNS_PROBES")]
static NETNS_PROBES: LruHashMap<u64, u64> = LruHashMap::with_max_entries(NETNS_PROBES_CAPACITY, 0);

/// `globals::SOCK_OPS_NETNS_COOKIE`, set by the daemon at load time. Read with
/// `read_volatile` so the compiler keeps the load the verifier resolves.
#[unsafe(no_mangle)]
static SOCK_OPS_NETNS_COOKIE: u8 = 1;

#[inline(always)]
fn sock_ops_has_netns_cookie() -> bool {
    // SAFETY: a plain read of an initialised static.
    unsafe { core::ptr::read_volatile(&SOCK_OPS_NETNS_COOKIE) != 0 }
}

/// Netns cookie + client address/port → original destination; consumed by the proxy.
#[map(name = "DST_BY_CLIENT")]
static DST_BY_CLIENT: LruHashMap<ClientKey, OriginalDst> = LruHashMap::pinned(DST_CAPACITY, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Socket cookie → socket: the sockets whose received skbs the verdict below redirects.
#[map(name = "SM_SOURCES")]
static SOCKMAP_SOURCES: SockHash<u64> = SockHash::pinned(SOCKMAP_CAPACITY, 0);

/// Socket cookie → socket: where redirected skbs may go (no program attached).
#[map(name = "SM_TARGETS")]
static SOCKMAP_TARGETS: SockHash<u64> = SockHash::pinned(SOCKMAP_CAPACITY, 0);

/// Socket cookie → peer's cookie and bytes redirected so far.
#[map(name = "SM_PEERS")]
static SOCKMAP_PEERS: HashMap<u64, SockmapPeer> = HashMap::pinned(SOCKMAP_CAPACITY, 0);

/// Both ends of app ↔ in-pod listener connections (`intercept.local_fast_path`), keyed by
/// netns cookie and the socket's own view of its tuple; the `sk_msg` program is attached here.
/// The kernel drops a socket from it when the socket closes.
#[map(name = "LOCAL_SOCKS")]
static LOCAL_SOCKS: SockHash<LocalTuple> = SockHash::pinned(LOCAL_SOCKS_CAPACITY, 0);

/// Destinations on the kernel path, and those that must never be; kept by the daemon.
/// Not pinned: a daemon starts with none and writes what it knows.
#[map(name = "KP_ROUTES")]
static KERNEL_ROUTES: HashMap<OriginalDst, KernelRoute> =
    HashMap::with_max_entries(KERNEL_ROUTES_CAPACITY, 0);

/// The endpoints of the Services in `KP_ROUTES`.
#[map(name = "KP_ENDPOINTS")]
static KERNEL_ENDPOINTS: HashMap<EndpointKey, OriginalDst> =
    HashMap::with_max_entries(KERNEL_ENDPOINTS_CAPACITY, 0);

/// Destination port (host order) → 1: the kernel path for any destination on it that
/// `KP_ROUTES` does not name.
#[map(name = "KP_PORTS")]
static KERNEL_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(KERNEL_PORTS_CAPACITY, 0);

/// Kernel-path connections starting and ending, for the daemon's records.
#[map(name = "KP_EVENTS")]
static KERNEL_EVENTS: RingBuf = RingBuf::with_byte_size(KERNEL_EVENTS_BYTES, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<InterceptConfig> {
    let cfg = *CONFIG.get(0)?;
    (cfg.listen_port != 0).then_some(cfg)
}

const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK6: RawAddr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Why a connect is left alone, or `None` to redirect it. `dst` is IPv4-mapped for IPv4.
#[inline(always)]
fn skip_reason(
    ctx: &SockAddrContext,
    cfg: &InterceptConfig,
    netns: u64,
    dst: &RawAddr,
    port: u16,
) -> Option<Counter> {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Some(Counter::SkipNotTcp);
    }
    // SAFETY: plain read of a hash map value.
    if unsafe { ENROLLED.get(netns) }.is_none() {
        return Some(Counter::SkipNotEnrolled);
    }
    // The socket's own field rather than bpf_getsockopt(SO_MARK), which older kernels (5.10)
    // do not answer.
    // SAFETY: `sk` of a sock_addr context is the socket doing the call, never null; its
    // `mark` is read with one 4-byte load, the only width the verifier accepts.
    let mark = unsafe { core::ptr::read_volatile(&(*sa.__bindgen_anon_1.sk).mark) };
    if cfg.mark != 0 && mark == cfg.mark {
        return Some(Counter::SkipMarked);
    }
    if is_loopback(dst) {
        return Some(Counter::SkipLoopback);
    }
    if EXCLUDED_CIDRS.get(Key::new(128, *dst)).is_some() {
        return Some(Counter::SkipExcludedCidr);
    }
    // SAFETY: plain read of a hash map value.
    if unsafe { EXCLUDED_PORTS.get(port) }.is_some() {
        return Some(Counter::SkipExcludedPort);
    }
    None
}

#[inline(always)]
fn is_loopback(addr: &RawAddr) -> bool {
    if is_v4_mapped(addr) {
        let first = addr[3].to_ne_bytes()[0];
        first == 127 || addr[3] == 0
    } else {
        *addr == LOOPBACK6 || *addr == [0; 4]
    }
}

/// Whether shunt's listener exists in the socket's netns (IPv4 or IPv6 loopback).
#[inline(always)]
fn listener_present(ctx: &SockAddrContext, v4: bool, port: u16) -> bool {
    // SAFETY: an all-zero tuple is valid; the union member matching `size` is filled in.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let size = if v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK4;
        tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
        mem::size_of::<u32>() * 2 + mem::size_of::<u16>() * 2
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = LOOPBACK6;
        tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
        mem::size_of::<u32>() * 8 + mem::size_of::<u16>() * 2
    };
    // SAFETY: tuple lives on the stack for the call; a found socket is released below.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.sock_addr as *mut c_void,
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced socket returned by the lookup.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    true
}

/// Where connect() sends a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Where the application sent it, untouched and unrecorded.
    Untouched,
    /// To the in-pod listener.
    Proxy,
    /// The kernel path: to an endpoint, or where it was going; recorded, so getpeername
    /// answers with the original destination and sock_ops reports it.
    Kernel,
}

/// A [`Path`] and, on the kernel path, the endpoint to connect to instead. Plain data,
/// always fully written: verifiers before 6.2 refuse a read of stack the program has not
/// written, which an enum's unused payload can be.
#[derive(Clone, Copy)]
struct Choice {
    path: Path,
    /// Rewrite the destination to `endpoint`.
    rewrite: bool,
    endpoint: OriginalDst,
}

impl Choice {
    #[inline(always)]
    const fn of(path: Path) -> Choice {
        Choice {
            path,
            rewrite: false,
            endpoint: OriginalDst {
                addr: [0; 4],
                port: 0,
                via: 0,
                _pad: [0; 5],
            },
        }
    }
}

/// Decide, record and count.
#[inline(always)]
fn choose_path(
    ctx: &SockAddrContext,
    cfg: &InterceptConfig,
    dst: &RawAddr,
    port: u16,
    v4_socket: bool,
) -> Choice {
    // SAFETY: helper valid in cgroup sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    if let Some(reason) = skip_reason(ctx, cfg, netns_cookie, dst, port) {
        count(reason);
        return Choice::of(Path::Untouched);
    }
    let has_listener = listener_present(ctx, is_v4_mapped(dst), cfg.listen_port);
    if !has_listener && cfg.fail_mode != FAIL_CLOSED {
        count(Counter::SkipNoListener);
        return Choice::of(Path::Untouched);
    }
    // Only while shunt runs: without it, fail-open and fail-closed mean what they say, and
    // no endpoint set can go stale.
    let choice = match has_listener {
        true => kernel_path(dst, port, v4_socket),
        false => Choice::of(Path::Proxy),
    };
    // SAFETY: helper valid in cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let redirected = Redirected {
        dst: OriginalDst {
            addr: *dst,
            port,
            via: match choice.path {
                Path::Kernel => VIA_KERNEL,
                _ => VIA_PROXY,
            },
            _pad: [0; 5],
        },
        netns_cookie,
    };
    if REDIRECTED.insert(cookie, redirected, 0).is_err() {
        count(Counter::SkipMapFull);
        return Choice::of(Path::Untouched);
    }
    count(match (choice.path, choice.rewrite) {
        (Path::Kernel, true) => Counter::KernelPathBalanced,
        (Path::Kernel, false) => Counter::KernelPathDirect,
        _ if has_listener => Counter::Redirected,
        _ => Counter::RedirectedNoListener,
    });
    choice
}

/// The kernel path, if the destination takes it: to the next endpoint of its Service, or
/// where it was going for a destination that is not a Service. `Path::Proxy` otherwise, and
/// for the sampled connections of a learned destination.
#[inline(always)]
fn kernel_path(dst: &RawAddr, port: u16, v4_socket: bool) -> Choice {
    let key = OriginalDst {
        addr: *dst,
        port,
        via: 0,
        _pad: [0; 5],
    };
    let Some(route) = KERNEL_ROUTES.get_ptr_mut(key) else {
        // SAFETY: plain read of a hash map value.
        return match unsafe { KERNEL_PORTS.get(port) } {
            Some(_) => Choice::of(Path::Kernel),
            None => Choice::of(Path::Proxy),
        };
    };
    // SAFETY: a valid map value pointer for the duration of the program.
    let route: &mut KernelRoute = unsafe { &mut *route };
    if route.flags & KERNEL_ROUTE_PROXY != 0 {
        return Choice::of(Path::Proxy);
    }
    let seen = route.seen;
    route.seen = seen.wrapping_add(1);
    if route.sample_every != 0 && seen.is_multiple_of(route.sample_every) {
        count(Counter::KernelPathSampled);
        return Choice::of(Path::Proxy);
    }
    if route.endpoint_count == 0 {
        return Choice::of(Path::Kernel);
    }
    let index = route.next % route.endpoint_count;
    route.next = route.next.wrapping_add(1);
    let key = EndpointKey {
        endpoints_id: route.endpoints_id,
        index,
    };
    // SAFETY: plain read of a hash map value.
    match unsafe { KERNEL_ENDPOINTS.get(key) } {
        // An IPv4 socket reaches IPv4 endpoints only.
        Some(endpoint) if !v4_socket || is_v4_mapped(&endpoint.addr) => Choice {
            path: Path::Kernel,
            rewrite: true,
            endpoint: *endpoint,
        },
        _ => {
            count(Counter::KernelPathNoEndpoint);
            Choice::of(Path::Proxy)
        }
    }
}

/// cgroup sock_addr programs: 0 fails the syscall with `EPERM`.
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn shunt_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip4 = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if port == NETNS_PROBE_PORT && ip4 == u32::from_ne_bytes(NETNS_PROBE_ADDR) {
        return answer_netns_probe(&ctx);
    }
    let Some(cfg) = config() else {
        count(Counter::SkipUnconfigured);
        return ALLOW;
    };
    let choice = choose_path(&ctx, &cfg, &map_v4(ip4), port, true);
    match choice.path {
        Path::Proxy => {
            debug!(
                &ctx,
                "redirect {:i}:{} to listener",
                u32::from_be(ip4),
                port
            );
            sa.user_ip4 = LOOPBACK4;
            sa.user_port = u32::from(cfg.listen_port.to_be());
        }
        Path::Kernel if choice.rewrite => {
            sa.user_ip4 = choice.endpoint.addr[3];
            sa.user_port = u32::from(choice.endpoint.port.to_be());
        }
        Path::Kernel | Path::Untouched => {}
    }
    ALLOW
}

/// Records the socket's namespace for the daemon, which reads it by the socket's cookie, and
/// refuses the connect so nothing is sent.
#[inline(always)]
fn answer_netns_probe(ctx: &SockAddrContext) -> i32 {
    // SAFETY: helpers valid in cgroup sock_addr programs.
    let (socket, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock_addr as *mut c_void),
            bpf_get_netns_cookie(ctx.sock_addr as *mut c_void),
        )
    };
    let _ = NETNS_PROBES.insert(socket, netns, 0);
    DENY
}

#[cgroup_sock_addr(connect6)]
pub fn shunt_connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        count(Counter::SkipUnconfigured);
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6: RawAddr = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = u16::from_be(sa.user_port as u16);
    let choice = choose_path(&ctx, &cfg, &ip6, port, false);
    let (target, target_port) = match choice.path {
        Path::Proxy => {
            debug!(
                &ctx,
                "redirect [{:i}]:{} to listener",
                words_to_bytes(&ip6),
                port
            );
            // An IPv4-mapped destination travels over IPv4: send it to the IPv4 listener.
            let target = if is_v4_mapped(&ip6) {
                map_v4(LOOPBACK4)
            } else {
                LOOPBACK6
            };
            (target, cfg.listen_port)
        }
        Path::Kernel if choice.rewrite => (choice.endpoint.addr, choice.endpoint.port),
        Path::Kernel | Path::Untouched => return ALLOW,
    };
    // The context only accepts 4-byte stores to user_ip6.
    sa.user_ip6[0] = target[0];
    sa.user_ip6[1] = target[1];
    sa.user_ip6[2] = target[2];
    sa.user_ip6[3] = target[3];
    sa.user_port = u32::from(target_port.to_be());
    ALLOW
}

#[inline(always)]
fn words_to_bytes(addr: &RawAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[sock_ops]
pub fn shunt_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx, false),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx, true),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // SAFETY: helper valid in sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
            // SAFETY: plain read of a hash map value.
            if let Some(redirected) = unsafe { REDIRECTED.get(cookie) }.copied()
                && redirected.dst.via == VIA_KERNEL
            {
                report(&ctx, cookie, &redirected, EVENT_CLOSED, ctx.arg(0) as u8);
            }
            let _ = REDIRECTED.remove(cookie);
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helpers valid in sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: plain read of a hash map value.
    let Some(redirected) = (unsafe { REDIRECTED.get(cookie) }).copied() else {
        return; // not a redirected socket
    };
    if redirected.dst.via == VIA_KERNEL {
        report(ctx, cookie, &redirected, EVENT_CONNECTING, 0);
        // Its close is reported too.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return;
    }
    let local = match ctx.family() {
        AF_INET6 => {
            let ip6 = ctx.local_ip6();
            // A dual-stack socket talking IPv4 may not show its mapped address here yet.
            if is_v4_mapped(&ip6) || ip6 == [0; 4] {
                map_v4(ctx.local_ip4())
            } else {
                ip6
            }
        }
        AF_INET => map_v4(ctx.local_ip4()),
        _ => return,
    };
    let key = ClientKey {
        netns_cookie: redirected.netns_cookie,
        addr: local,
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    let mut dst = redirected.dst;
    dst.via = 0;
    if DST_BY_CLIENT.insert(key, dst, 0).is_err() {
        count(Counter::SkipMapFull);
        return;
    }
    count(Counter::DstRecorded);
    // Ask for state changes so the socket-cookie entry is dropped when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    debug!(
        ctx,
        "recorded original destination for client port {}",
        ctx.local_port()
    );
}

/// Tells the daemon of a kernel-path connection: when it starts (`EVENT_CONNECTING`, at
/// `TCP_CONNECT_CB`, where the endpoint and the local port are known) and when it closes,
/// with the bytes each way and the state it closed from (`SYN_SENT`: the connect failed).
#[inline(always)]
fn report(ctx: &SockOpsContext, cookie: u64, redirected: &Redirected, kind: u8, old_state: u8) {
    let family = ctx.family();
    let (Some(local), Some(remote)) = (
        mapped(family, ctx.local_ip4(), ctx.local_ip6()),
        mapped(family, ctx.remote_ip4(), ctx.remote_ip6()),
    ) else {
        return;
    };
    // SAFETY: the context pointer is valid for the duration of the program.
    let ops = unsafe { &*ctx.ops };
    let (bytes_received, bytes_acked) = match kind {
        EVENT_CLOSED => (ops.bytes_received, ops.bytes_acked),
        _ => (0, 0),
    };
    let event = KernelPathEvent {
        socket_cookie: cookie,
        netns_cookie: redirected.netns_cookie,
        // SAFETY: helper valid in every program type.
        time_ns: unsafe { bpf_ktime_get_ns() },
        bytes_received,
        bytes_acked,
        original: redirected.dst,
        remote: OriginalDst {
            addr: remote,
            port: remote_port(ctx.remote_port()),
            via: 0,
            _pad: [0; 5],
        },
        local: OriginalDst {
            addr: local,
            port: ctx.local_port() as u16,
            via: 0,
            _pad: [0; 5],
        },
        kind,
        old_state,
        _pad: [0; 6],
    };
    // The daemon drains the ring on a short timer, so a wake-up per report would only cost
    // the machine a context switch per connection. It is woken at once for a failed connect
    // (its endpoint must leave the path) and when the ring fills up.
    let wake = (kind == EVENT_CLOSED && old_state == TCP_SYN_SENT)
        || KERNEL_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= KERNEL_EVENTS_WAKE_AT as u64;
    let flags = if wake {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if KERNEL_EVENTS
        .output::<KernelPathEvent>(&event, flags as u64)
        .is_err()
    {
        count(Counter::KernelPathEventLost);
    }
}

/// An address from a socket context as four words, IPv4 mapped. A dual-stack socket talking
/// IPv4 holds the mapped address in its IPv6 fields; a zero there means only the IPv4 one
/// is filled in.
#[inline(always)]
fn mapped(family: u32, ip4: u32, ip6: RawAddr) -> Option<RawAddr> {
    match family {
        AF_INET => Some(map_v4(ip4)),
        AF_INET6 if ip6 == [0; 4] => Some(map_v4(ip4)),
        AF_INET6 => Some(ip6),
        _ => None,
    }
}

/// sock_ops and sk_msg store the remote port in network byte order in the upper 16 bits.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    u16::from_be((raw >> 16) as u16)
}

/// `intercept.local_fast_path`: at `ACTIVE_ESTABLISHED` the application's socket joins
/// `LOCAL_SOCKS` if connect() redirected it to the listener (it has an original destination);
/// at `PASSIVE_ESTABLISHED` the socket shunt will accept joins if its local end is the
/// listener of an enrolled pod. Nothing else is ever added, so the `sk_msg` program only runs
/// on these connections.
#[inline(always)]
fn on_established(ctx: &SockOpsContext, passive: bool) {
    // Before 5.15 the verifier prunes everything below (and the daemon never turns the fast
    // path on there).
    if !sock_ops_has_netns_cookie() {
        return;
    }
    let Some(cfg) = config() else { return };
    if cfg.local_fast_path == 0 {
        return;
    }
    // SAFETY: helpers valid in sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let local_port = ctx.local_port() as u16;
    if passive {
        // SAFETY: plain read of a hash map value.
        if local_port != cfg.listen_port || unsafe { ENROLLED.get(netns_cookie) }.is_none() {
            return;
        }
    } else {
        // SAFETY: helper valid in sock_ops programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        // SAFETY: plain read of a hash map value.
        if unsafe { REDIRECTED.get(cookie) }.is_none_or(|r| r.dst.via != VIA_PROXY) {
            return;
        }
    }
    let family = ctx.family();
    let (Some(local_addr), Some(remote_addr)) = (
        mapped(family, ctx.local_ip4(), ctx.local_ip6()),
        mapped(family, ctx.remote_ip4(), ctx.remote_ip6()),
    ) else {
        return;
    };
    // The listener is on loopback; anything else on that port is not shunt's.
    if passive && !is_loopback(&local_addr) {
        return;
    }
    let mut key = LocalTuple {
        netns_cookie,
        local_addr,
        remote_addr,
        local_port,
        remote_port: remote_port(ctx.remote_port()),
        _pad: 0,
    };
    // SAFETY: the context pointer is valid for the duration of the program.
    let ops = unsafe { &mut *ctx.ops };
    match LOCAL_SOCKS.update(&mut key, ops, 0) {
        Ok(()) => count(Counter::LocalFastPathJoined),
        Err(_) => count(Counter::LocalFastPathJoinFailed),
    }
}

/// Reads a context word with one 4-byte load: the verifier accepts nothing wider on the
/// `sk_msg_md` address fields, and LLVM may merge plain copies of the arrays.
#[inline(always)]
fn read_word(word: &u32) -> u32 {
    // SAFETY: a reference to a context field is valid to read.
    unsafe { core::ptr::read_volatile(word) }
}

#[inline(always)]
fn read_addr(words: &[u32; 4]) -> RawAddr {
    [
        read_word(&words[0]),
        read_word(&words[1]),
        read_word(&words[2]),
        read_word(&words[3]),
    ]
}

/// `intercept.local_fast_path`: every message a socket in `LOCAL_SOCKS` sends goes straight
/// into its peer's receive queue (`BPF_F_INGRESS`) when the peer is in the map too; otherwise
/// (the listener side has not been established yet, or is gone) it takes the ordinary TCP
/// path. Returning `SK_PASS` without a redirect target is that ordinary path.
#[sk_msg]
pub fn shunt_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let md = unsafe { &*ctx.msg };
    let family = read_word(&md.family);
    let local = mapped(family, read_word(&md.local_ip4), read_addr(&md.local_ip6));
    let remote = mapped(family, read_word(&md.remote_ip4), read_addr(&md.remote_ip6));
    let (Some(local_addr), Some(remote_addr)) = (local, remote) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: helper valid in sk_msg programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.msg as *mut c_void) };
    let me = LocalTuple {
        netns_cookie,
        local_addr,
        remote_addr,
        local_port: read_word(&md.local_port) as u16,
        remote_port: remote_port(read_word(&md.remote_port)),
        _pad: 0,
    };
    // Keyed as the peer sees itself: our remote end is its local end.
    let mut peer = me.reversed();
    // The helper returns SK_PASS once it has set the target, SK_DROP when the peer is not in
    // the map; the program's own SK_PASS then sends the message the ordinary way.
    if LOCAL_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as _ {
        count(Counter::LocalFastPathRedirected);
    } else {
        count(Counter::LocalFastPathNoPeer);
    }
    sk_action::SK_PASS
}

#[inline(always)]
fn original_for(ctx: &SockAddrContext) -> Option<OriginalDst> {
    // SAFETY: helper valid in cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: plain read of a hash map value.
    unsafe { REDIRECTED.get(cookie) }.map(|r| r.dst)
}

#[cgroup_sock_addr(getpeername4)]
pub fn shunt_getpeer4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_for(&ctx) {
        // SAFETY: the context pointer is valid for the duration of the program.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.addr[3];
        sa.user_port = u32::from(orig.port.to_be());
        count(Counter::PeerNameRewritten);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn shunt_getpeer6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_for(&ctx) {
        // SAFETY: the context pointer is valid for the duration of the program.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = orig.addr[0];
        sa.user_ip6[1] = orig.addr[1];
        sa.user_ip6[2] = orig.addr[2];
        sa.user_ip6[3] = orig.addr[3];
        sa.user_port = u32::from(orig.port.to_be());
        count(Counter::PeerNameRewritten);
    }
    ALLOW
}

/// Sends every skb a source socket receives to its peer's egress (flags 0), counting the
/// bytes on the source's entry, which userspace compares with what the peer has sent before
/// it passes an EOF on. Each socket's skbs are handed to the verdict one at a time under that
/// socket's lock, so the plain add never races itself.
#[stream_verdict]
pub fn shunt_sk_verdict(ctx: SkBuffContext) -> u32 {
    if ctx.len() == 0 {
        // A FIN without data. Redirected, the peer's send worker would get 0 from sending
        // it, take that for a broken pipe and fail the peer socket (EPIPE) with bytes of the
        // other direction still to send. The FIN has already done its work on this socket
        // (userspace sees the EOF), so there is nothing left to deliver.
        return sk_action::SK_DROP;
    }
    // SAFETY: helper valid in sk_skb programs; the skb is owned by the receiving socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(peer) = SOCKMAP_PEERS.get_ptr_mut(cookie) else {
        // Userspace pairs sockets before it adds them as sources and removes them as sources
        // before unpairing, so this is never expected: passing the bytes up makes the
        // connection fail loudly there rather than lose them here.
        count(Counter::SockmapNoPeer);
        return sk_action::SK_PASS;
    };
    // SAFETY: a valid map value pointer for the duration of the program.
    let peer = unsafe { &mut *peer };
    peer.bytes += u64::from(ctx.len());
    let mut target = peer.peer_cookie;
    count(Counter::SockmapRedirected);
    SOCKMAP_TARGETS.redirect_skb(&ctx, &mut target, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
