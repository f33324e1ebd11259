//! `forwarding: sockmap`: both sockets of a passthrough connection join the kernel's
//! sockmaps and an `sk_skb/stream_verdict` program sends every skb either receives straight to
//! the other's egress. Userspace moves no payload; it passes EOFs and resets on, watches the
//! idle timeout, and takes the sockets out again.
//!
//! Ordering, the part that must be right:
//!
//! 1. Detection has read the client's first bytes into userspace. The verdict hands each skb
//!    over whole (`tcp_read_skb` ignores how much of it was already read), so a partly read
//!    skb must not be left in the queue: the client's receive queue is read until it is empty
//!    (bounded) and those bytes join the prefix. Skbs arriving after that are whole.
//! 2. The prefix is written to the upstream socket and the write has returned, so it sits in
//!    that socket's send queue before anything the kernel will append.
//! 3. Both sockets become targets (`SM_TARGETS`, no program) and are paired in `SM_PEERS`;
//!    only then do they become sources (`SM_SOURCES`, the verdict attached), so a redirect
//!    always finds its target. Upstream bytes were only peeked at by detection, so nothing of
//!    the upstream's queue was consumed.
//! 4. Skbs queued before a socket became a source are still in its receive queue, in order
//!    and ahead of anything newer; the first `recv` (a peek) makes the kernel run them through
//!    the verdict, as the next arrival would.
//! 5. An EOF is seen by a `recv` returning 0. It takes the socket lock, which the softirq
//!    holds while it queues the FIN's skb, sets the shutdown flag and runs the verdict on
//!    everything before it, so by then every byte before the FIN has been counted on the
//!    source's `SM_PEERS` entry. The redirected bytes may still wait in the peer's queue
//!    (a workqueue sends them), so the EOF is passed on with `shutdown(SHUT_WR)` only once
//!    the peer's sent-or-queued byte count (`tcpi_bytes_acked` + `SIOCOUTQ`) has grown by
//!    the counted bytes since step 3. A reset is passed on the same way, after the bytes
//!    before it.
//! 6. Removing a socket from the maps discards what is still queued for it, so sockets leave
//!    only once both directions are done, or when the connection is being reset anyway.
//!
//! If a socket cannot join (it is no longer established, a map is full, the kernel lacks the
//! program), the connection is handed back and spliced instead; nothing was lost or
//! reordered by the attempt.
//!
//! Userspace is woken only for what it acts on: the sockets leave tokio's reactor and sit in
//! an epoll set of their own that asks for `EPOLLRDHUP` (plus errors) but not `EPOLLIN`, so
//! the data-ready wake-ups of redirected skbs are filtered out in the kernel.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{io::unix::AsyncFd, net::TcpStream, time::Instant};

use crate::{
    bpf::{self, Sockmap},
    state::KernelBytes,
};

use super::{
    forward::{Closed, Meters, Side, reset, write_all},
    sys::{self, epoll},
};

/// Catching up with a client before its socket joins: bytes read per round before they are
/// written out, and the most bytes and time spent before giving up (then it is spliced).
const CATCH_UP_ROUND: usize = 256 * 1024;
const CATCH_UP_BYTES: usize = 16 << 20;
const CATCH_UP_TIME: Duration = Duration::from_millis(200);

/// How often a direction waiting for its peer to send the last redirected bytes looks again:
/// at once, then doubling to the maximum.
const DRAIN_POLL_FIRST: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(64);

const TCP_CLOSE: u8 = 7;

/// A connection the kernel could not take: forward it another way. The prefix is what is
/// still owed to the upstream (empty once it was written).
pub struct Fallback {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub prefix: Vec<u8>,
    pub reason: String,
}

pub enum Outcome {
    Done(Closed),
    Fallback(Fallback),
}

/// Forwards `client` ⇄ `upstream` in the kernel until both directions are done, sending
/// `prefix` (bytes detection read) upstream first.
pub async fn forward(
    sockmap: &Arc<Sockmap>,
    client: TcpStream,
    upstream: TcpStream,
    prefix: &[u8],
    meters: Meters<'_>,
    kernel_bytes: &KernelBytes,
    idle_timeout: Duration,
) -> Outcome {
    let mut owed = prefix.to_vec();
    let fallback = |client, upstream, prefix, reason: &str| {
        Outcome::Fallback(Fallback {
            client,
            upstream,
            prefix,
            reason: reason.to_owned(),
        })
    };
    // A client that streams from its first byte refills its queue while it is read: what
    // was read is written out and the queue read again, until it is seen empty, for at most
    // CATCH_UP_BYTES or CATCH_UP_TIME (a slow upstream makes that unlikely: spliced then).
    let deadline = Instant::now() + CATCH_UP_TIME;
    let mut caught_up = 0;
    loop {
        let round = catch_up(client.as_fd(), &mut owed, CATCH_UP_ROUND);
        if let CatchUp::Eof = round {
            return fallback(client, upstream, owed, "the client had finished sending");
        }
        if let CatchUp::Failed(e) = round {
            // As splice would: what the client sent before failing, then its failure.
            if write_all(&upstream, &owed).await.is_ok() {
                meters
                    .from_client
                    .fetch_add(owed.len() as u64, Ordering::Relaxed);
            }
            reset(&upstream);
            return Outcome::Done(Closed::by(Side::Client, e));
        }
        if let CatchUp::TooMuch = round
            && (caught_up > CATCH_UP_BYTES || Instant::now() >= deadline)
        {
            return fallback(client, upstream, owed, "the client kept sending");
        }
        if let Err(e) = write_all(&upstream, &owed).await {
            reset(&client);
            return Outcome::Done(Closed::by(Side::Upstream, e));
        }
        meters
            .from_client
            .fetch_add(owed.len() as u64, Ordering::Relaxed);
        caught_up += owed.len();
        owed.clear();
        if let CatchUp::Drained = round {
            break;
        }
    }

    let pair = match Pair::join(sockmap, client, upstream).await {
        Joined::Yes(pair) => pair,
        Joined::No(NotJoined {
            client,
            upstream,
            reason,
        }) => return fallback(client, upstream, Vec::new(), &reason),
        Joined::Lost(closed) => return Outcome::Done(closed),
    };
    let source = {
        let (sockmap, up, down) = (sockmap.clone(), pair.client.cookie, pair.upstream.cookie);
        Box::new(move || {
            let bytes = |cookie| sockmap.redirected(cookie).unwrap_or(0);
            (bytes(up), bytes(down))
        })
    };
    kernel_bytes.set(source);
    let (closed, copied) = pair.run(idle_timeout).await;
    let (from_client, to_client) = pair.leave();
    let (from_client, to_client) = (from_client + copied[0], to_client + copied[1]);
    tracing::debug!(%closed, from_client, to_client, "sockmap: connection done");
    kernel_bytes.clear();
    meters.from_client.fetch_add(from_client, Ordering::Relaxed);
    meters.to_client.fetch_add(to_client, Ordering::Relaxed);
    match closed.failed_side() {
        Some(Side::Client) => reset_std(&pair.upstream.stream),
        Some(Side::Upstream) => reset_std(&pair.client.stream),
        None => {}
    }
    Outcome::Done(closed)
}

enum CatchUp {
    /// The receive queue is empty: no partly read skb is left in it.
    Drained,
    Eof,
    /// A round's worth was read and the queue is not empty yet.
    TooMuch,
    Failed(io::Error),
}

/// Reads what the client sent since detection into `owed`, until its receive queue is empty
/// or `round` more bytes were read.
fn catch_up(fd: BorrowedFd<'_>, owed: &mut Vec<u8>, round: usize) -> CatchUp {
    let limit = owed.len() + round;
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if owed.len() >= limit {
            return CatchUp::TooMuch;
        }
        match sys::recv(fd, &mut chunk, libc::MSG_DONTWAIT) {
            Ok(0) => return CatchUp::Eof,
            Ok(n) => owed.extend_from_slice(&chunk[..n]),
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => return CatchUp::Drained,
                io::ErrorKind::Interrupted => {}
                _ => return CatchUp::Failed(e),
            },
        }
    }
}

/// One socket of a joined connection.
struct Member {
    stream: std::net::TcpStream,
    cookie: u64,
    side: Side,
    /// What this socket had sent or queued (see [`sent_or_queued`]) when it became a target:
    /// redirected bytes are counted from there.
    base: u64,
}

struct NotJoined {
    client: TcpStream,
    upstream: TcpStream,
    reason: String,
}

enum Joined {
    Yes(Pair),
    No(NotJoined),
    /// Moving a socket out of or back into tokio's reactor failed, which closes it.
    Lost(Closed),
}

struct Pair {
    sockmap: Arc<Sockmap>,
    client: Member,
    upstream: Member,
    epoll: AsyncFd<OwnedFd>,
}

/// Where one direction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Bytes flow; the source has not ended.
    Open,
    /// The source ended (or failed): waiting for the destination to have sent on every byte
    /// redirected, then `shutdown(SHUT_WR)` it (or end the connection, after a failure).
    Draining,
    /// The source could not join `SM_SOURCES` again after a pause: once its backlog is out,
    /// userspace copies the rest.
    Userspace,
    Done,
}

enum Probe {
    Pending,
    Eof,
    /// Bytes reached userspace: the verdict passed them (no peer entry), which the join
    /// order rules out; the connection cannot be forwarded in order any more.
    Data,
    Failed(io::Error),
}

impl Pair {
    async fn join(sockmap: &Arc<Sockmap>, client: TcpStream, upstream: TcpStream) -> Joined {
        let prepared = (|| {
            let cookies = (
                bpf::socket_cookie(client.as_fd())?,
                bpf::socket_cookie(upstream.as_fd())?,
            );
            let bases = (
                sent_or_queued(client.as_fd())?.0,
                sent_or_queued(upstream.as_fd())?.0,
            );
            let epoll = epoll::watch(&[client.as_fd(), upstream.as_fd()])?;
            io::Result::Ok((cookies, bases, epoll))
        })();
        let ((client_cookie, upstream_cookie), (client_base, upstream_base), epoll) = match prepared
        {
            Ok(prepared) => prepared,
            Err(e) => {
                return Joined::No(NotJoined {
                    client,
                    upstream,
                    reason: format!("preparing the sockets: {e}"),
                });
            }
        };
        // Out of tokio's reactor: the kernel's data-ready wake-ups then cost nothing.
        let (client, upstream) = match (client.into_std(), upstream.into_std()) {
            (Ok(client), Ok(upstream)) => (client, upstream),
            (Err(e), _) | (_, Err(e)) => return Joined::Lost(Closed::by(Side::Client, e)),
        };
        let pair = Pair {
            sockmap: sockmap.clone(),
            client: Member {
                stream: client,
                cookie: client_cookie,
                side: Side::Client,
                base: client_base,
            },
            upstream: Member {
                stream: upstream,
                cookie: upstream_cookie,
                side: Side::Upstream,
                base: upstream_base,
            },
            epoll,
        };
        let reason = match pair.enter() {
            Ok(()) => return Joined::Yes(pair),
            Err(reason) => reason,
        };
        let reason = match pair.back_out().await {
            Ok(()) => reason,
            Err(closed) => return Joined::Lost(closed),
        };
        let Pair {
            client, upstream, ..
        } = pair;
        match (
            TcpStream::from_std(client.stream),
            TcpStream::from_std(upstream.stream),
        ) {
            (Ok(client), Ok(upstream)) => Joined::No(NotJoined {
                client,
                upstream,
                reason,
            }),
            (Err(e), _) | (_, Err(e)) => Joined::Lost(Closed::by(Side::Client, e)),
        }
    }

    /// Pairs, makes both sockets targets, then sources. On failure everything but a client
    /// that already became a source is undone; [`Pair::back_out`] finishes that.
    fn enter(&self) -> Result<(), String> {
        let sm = &self.sockmap;
        let (c, u) = (&self.client, &self.upstream);
        let step = |what: &str, result: io::Result<()>| result.map_err(|e| format!("{what}: {e}"));
        let targets = step("pairing", sm.pair(c.cookie, u.cookie))
            .and_then(|()| step("client target", sm.add_target(c.cookie, c.stream.as_fd())))
            .and_then(|()| step("upstream target", sm.add_target(u.cookie, u.stream.as_fd())));
        let sources = targets.and_then(|()| {
            step("client source", sm.add_source(c.cookie, c.stream.as_fd()))?;
            step("upstream source", sm.add_source(u.cookie, u.stream.as_fd()))
        });
        if sources.is_err() {
            tracing::debug!(?sources, "sockmap: could not join");
        }
        sources
    }

    /// Takes the sockets out again after a failed [`Pair::enter`]. If the client was already
    /// a source, bytes it redirected may still wait in the upstream's queue: they are let out
    /// before anyone writes to the upstream from userspace.
    async fn back_out(&self) -> Result<(), Closed> {
        let sm = &self.sockmap;
        let _ = sm.remove_source(self.client.cookie);
        // Taking the client's socket lock waits out a verdict still running on it.
        let _ = sent_or_queued(self.client.stream.as_fd());
        let mut wait = DRAIN_POLL_FIRST;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.drained(&self.client, &self.upstream) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => {}
                Ok(false) => {
                    self.leave();
                    return Err(Closed::Error {
                        side: Side::Upstream,
                        error: "sockmap: redirected bytes not sent within 5s of leaving".into(),
                    });
                }
                Err(e) => {
                    self.leave();
                    return Err(Closed::by(Side::Upstream, e));
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(DRAIN_POLL_MAX);
        }
        self.leave();
        Ok(())
    }

    /// Whether `to` has sent on (or queued) every byte redirected from `from` so far, or can
    /// no longer send anything.
    fn drained(&self, from: &Member, to: &Member) -> io::Result<bool> {
        let redirected = self.sockmap.redirected(from.cookie)?;
        let (sent, state) = sent_or_queued(to.stream.as_fd())?;
        Ok(state == TCP_CLOSE || sent.wrapping_sub(to.base) >= redirected)
    }

    /// Takes both sockets out of the maps; returns the bytes redirected each way (from the
    /// client, to the client).
    fn leave(&self) -> (u64, u64) {
        let sm = &self.sockmap;
        let (c, u) = (self.client.cookie, self.upstream.cookie);
        let mut failures = Vec::new();
        for result in [sm.remove_source(c), sm.remove_source(u)] {
            failures.extend(result.err());
        }
        let bytes = (sm.redirected(c).unwrap_or(0), sm.redirected(u).unwrap_or(0));
        for result in [sm.remove_target(c), sm.remove_target(u), sm.unpair(c, u)] {
            failures.extend(result.err());
        }
        if !failures.is_empty() {
            tracing::warn!(?failures, "sockmap: removing a connection's sockets failed");
        }
        bytes
    }

    /// Bytes redirected from `from` that `to` has not sent or queued yet: what waits in the
    /// kernel's queue for `to`.
    fn backlog(&self, from: &Member, to: &Member) -> io::Result<u64> {
        let redirected = self.sockmap.redirected(from.cookie)?;
        let (sent, _) = sent_or_queued(to.stream.as_fd())?;
        Ok(redirected.saturating_sub(sent.wrapping_sub(to.base)))
    }

    /// Both directions until done; see the module comment for the order of events.
    async fn run(&self, idle_timeout: Duration) -> (Closed, [u64; 2]) {
        let mut run = Run {
            pair: self,
            flows: [Flow::Open, Flow::Open],
            tails: [Vec::new(), Vec::new()],
            copied: [0, 0],
            ending: None,
            watch: Watch::new(),
        };
        let closed = run.until_done(idle_timeout).await;
        (closed, run.copied)
    }
}

/// The state of one joined connection while it runs; indexed like `members()`, each entry
/// describing the direction whose source is that member.
struct Run<'a> {
    pair: &'a Pair,
    flows: [Flow; 2],
    /// Bytes read from a source in userspace and not yet written (`Flow::Userspace`).
    tails: [Vec<u8>; 2],
    /// Bytes moved in userspace, per direction.
    copied: [u64; 2],
    /// The first failure; the connection ends once what the failed side sent is let out.
    ending: Option<Closed>,
    watch: Watch,
}

impl<'a> Run<'a> {
    fn members(&self) -> [&'a Member; 2] {
        let pair: &'a Pair = self.pair;
        [&pair.client, &pair.upstream]
    }

    async fn until_done(&mut self, idle_timeout: Duration) -> Closed {
        let mut poll_wait = DRAIN_POLL_FIRST;
        let mut idle = Idle::new(idle_timeout);
        loop {
            for i in 0..2 {
                if let Some(failure) = self.look_at_source(i) {
                    self.fail(i, failure);
                }
            }
            for i in 0..2 {
                self.advance(i);
            }
            if self.flows == [Flow::Done, Flow::Done] {
                return self.ending.take().unwrap_or(Closed::Eof);
            }
            let waiting = self
                .flows
                .iter()
                .any(|f| matches!(f, Flow::Draining | Flow::Userspace));
            if !waiting && let Some(ending) = self.ending.take() {
                return ending;
            }
            if !waiting {
                poll_wait = DRAIN_POLL_FIRST;
            }
            self.watch_interest();
            tokio::select! {
                ready = self.pair.epoll.readable() => match ready {
                    Ok(mut guard) => {
                        epoll::drain(guard.get_inner().as_fd());
                        guard.clear_ready();
                        self.watch.woken();
                    }
                    Err(e) => return Closed::Error { side: Side::Client, error: format!("epoll: {e}") },
                },
                () = tokio::time::sleep(poll_wait), if waiting => {
                    poll_wait = (poll_wait * 2).min(DRAIN_POLL_MAX);
                }
                () = self.watch.next_check() => self.check_backlogs(),
                () = idle.next_check(), if idle.enabled() => {
                    if idle.expired(self.moved()) {
                        return Closed::IdleTimeout;
                    }
                }
            }
        }
    }

    /// Has source `i` ended or failed? Only an open, unpaused source is read (a peek); any
    /// other socket is watched through its pending error alone.
    fn look_at_source(&mut self, i: usize) -> Option<Closed> {
        let member = self.members()[i];
        if self.flows[i] == Flow::Open && !self.watch.paused[i] {
            return match probe(member.stream.as_fd()) {
                Probe::Pending => None,
                Probe::Eof => {
                    self.flows[i] = Flow::Draining;
                    None
                }
                Probe::Data => Some(Closed::Error {
                    side: member.side,
                    error: "sockmap: bytes reached userspace out of order".into(),
                }),
                Probe::Failed(e) => Some(Closed::by(member.side, e)),
            };
        }
        match member.stream.take_error() {
            Ok(None) => None,
            Ok(Some(e)) | Err(e) => Some(Closed::by(member.side, e)),
        }
    }

    /// Side `i` failed: nothing can be delivered to it any more; what it sent before failing
    /// is still let out, then the connection ends (and the other side is reset).
    fn fail(&mut self, i: usize, failure: Closed) {
        tracing::debug!(%failure, "sockmap: a side failed");
        self.flows[1 - i] = Flow::Done;
        if self.ending.is_some() {
            self.flows[i] = Flow::Done;
            return;
        }
        if self.flows[i] == Flow::Open {
            self.flows[i] = if self.watch.paused[i] {
                // Its queued bytes never went through the verdict: a reset drops them.
                Flow::Done
            } else {
                Flow::Draining
            };
        }
        self.ending = Some(failure);
    }

    /// Moves direction `i` on: a drained direction passes its EOF on; one handed to
    /// userspace copies what it can.
    fn advance(&mut self, i: usize) {
        let [from, to] = [self.members()[i], self.members()[1 - i]];
        let result = match self.flows[i] {
            Flow::Draining => self.pair.drained(from, to).map(|drained| {
                if drained {
                    self.flows[i] = Flow::Done;
                    if self.ending.is_none() {
                        shutdown_write(to);
                    }
                }
            }),
            Flow::Userspace => match self.pair.drained(from, to) {
                Ok(true) => self.copy_tail(i),
                other => other.map(drop),
            },
            Flow::Open | Flow::Done => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!("sockmap: direction failed: {e}");
            self.flows = [Flow::Done, Flow::Done];
            self.ending.get_or_insert(Closed::by(to.side, e));
        }
    }

    /// Copies direction `i` in userspace, without blocking, until its source's EOF (then
    /// passed on). Used only after every redirected byte of that direction has been sent.
    fn copy_tail(&mut self, i: usize) -> io::Result<()> {
        let [from, to] = [self.members()[i], self.members()[1 - i]];
        let mut chunk = [0u8; 64 * 1024];
        loop {
            while !self.tails[i].is_empty() {
                let sent = sys::send(
                    to.stream.as_fd(),
                    &self.tails[i],
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
                let n = match sent {
                    Ok(n) => n,
                    Err(e) => {
                        return match e.kind() {
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                            _ => Err(e),
                        };
                    }
                };
                self.tails[i].drain(..n);
                self.copied[i] += n as u64;
            }
            match sys::recv(from.stream.as_fd(), &mut chunk, libc::MSG_DONTWAIT) {
                Ok(0) => {
                    self.flows[i] = Flow::Done;
                    if self.ending.is_none() {
                        shutdown_write(to);
                    }
                    return Ok(());
                }
                Ok(n) => self.tails[i].extend_from_slice(&chunk[..n]),
                Err(e) => {
                    return match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                        // The source's failure: reported by `look_at_source` next time
                        // round only if it is still pending, so report it here.
                        _ => {
                            self.fail(i, Closed::by(from.side, e));
                            Ok(())
                        }
                    };
                }
            }
        }
    }

    fn moved(&self) -> u64 {
        let sm = &self.pair.sockmap;
        let [c, u] = self.members();
        sm.redirected(c.cookie).unwrap_or(0)
            + sm.redirected(u.cookie).unwrap_or(0)
            + self.copied[0]
            + self.copied[1]
    }

    /// Keeps what waits in the kernel for each destination bounded: the kernel queues
    /// redirected skbs for a slow destination without limit, so a source whose backlog
    /// passes [`PAUSE_ABOVE`] leaves `SM_SOURCES`. Its skbs then stay in its own receive
    /// queue, whose limit makes TCP push back on the sender. Below [`RESUME_BELOW`] it joins
    /// again and the queued skbs go through the verdict in order, behind the backlog. A
    /// source that cannot join again (it has received its FIN meanwhile) is finished in
    /// userspace once its backlog is out.
    fn check_backlogs(&mut self) {
        let moved = self.moved();
        for i in 0..2 {
            if self.flows[i] != Flow::Open {
                continue;
            }
            let [from, to] = [self.members()[i], self.members()[1 - i]];
            let backlog = match self.pair.backlog(from, to) {
                Ok(backlog) => backlog,
                Err(e) => {
                    self.fail(i, Closed::by(to.side, e));
                    continue;
                }
            };
            let sm = &self.pair.sockmap;
            if !self.watch.paused[i] && backlog > PAUSE_ABOVE {
                if sm.remove_source(from.cookie).is_ok() {
                    // Taking the socket lock waits out a verdict still running on it.
                    let _ = sent_or_queued(from.stream.as_fd());
                    self.watch.paused[i] = true;
                    tracing::debug!(side = ?from.side, backlog, "sockmap: source paused");
                }
            } else if self.watch.paused[i] && backlog < RESUME_BELOW {
                self.watch.paused[i] = false;
                if let Err(e) = sm.add_source(from.cookie, from.stream.as_fd()) {
                    tracing::debug!(side = ?from.side, "sockmap: source finishes in userspace: {e}");
                    self.flows[i] = Flow::Userspace;
                }
            }
        }
        self.watch.checked(moved);
    }

    /// Asks for `EPOLLIN` only while nothing else wakes the task: when the watch is resting
    /// (the first byte after a quiet spell starts it again) or a direction is copied in
    /// userspace.
    fn watch_interest(&mut self) {
        let want = self.watch.resting() || self.flows.contains(&Flow::Userspace);
        if want != self.watch.reading {
            let [c, u] = self.members();
            let fds = [c.stream.as_fd(), u.stream.as_fd()];
            if epoll::interest(self.pair.epoll.get_ref().as_fd(), &fds, want).is_ok() {
                self.watch.reading = want;
            }
        }
    }
}

/// Pause a source whose destination has more than this waiting in the kernel...
const PAUSE_ABOVE: u64 = 4 << 20;
/// ...and let it go on once the destination is down to this.
const RESUME_BELOW: u64 = 1 << 20;
/// How often backlogs are checked while bytes move; a quiet connection is not checked, but
/// its first byte wakes the watch again.
const WATCH_ACTIVE: Duration = Duration::from_millis(20);

/// When to look at the backlogs, and which sources are paused.
struct Watch {
    paused: [bool; 2],
    next: Option<Instant>,
    last_moved: u64,
    /// Whether the sockets' epoll interest includes `EPOLLIN` now.
    reading: bool,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            paused: [false, false],
            next: Some(Instant::now() + WATCH_ACTIVE),
            last_moved: 0,
            reading: false,
        }
    }

    fn resting(&self) -> bool {
        self.next.is_none()
    }

    /// Any wake-up may be the first byte after a quiet spell.
    fn woken(&mut self) {
        if self.next.is_none() {
            self.next = Some(Instant::now() + WATCH_ACTIVE);
        }
    }

    async fn next_check(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Keeps checking while bytes moved since the last check or a source is paused.
    fn checked(&mut self, moved: u64) {
        let busy = moved != self.last_moved || self.paused.contains(&true);
        self.last_moved = moved;
        self.next = busy.then(|| Instant::now() + WATCH_ACTIVE);
    }
}

fn shutdown_write(member: &Member) {
    sys::shutdown_write(member.stream.as_fd());
}

/// The idle timeout over kernel-forwarded bytes: checked four times per timeout, so a
/// connection is closed between 1 and 1.25 timeouts after its last byte.
struct Idle {
    timeout: Duration,
    last_moved: u64,
    last_activity: Instant,
    next: Instant,
}

impl Idle {
    fn new(timeout: Duration) -> Idle {
        let now = Instant::now();
        Idle {
            timeout,
            last_moved: 0,
            last_activity: now,
            next: now + timeout / 4,
        }
    }

    fn enabled(&self) -> bool {
        !self.timeout.is_zero()
    }

    async fn next_check(&self) {
        tokio::time::sleep_until(self.next).await;
    }

    fn expired(&mut self, moved: u64) -> bool {
        let now = Instant::now();
        self.next = now + self.timeout / 4;
        if moved != self.last_moved {
            self.last_moved = moved;
            self.last_activity = now;
        }
        now.duration_since(self.last_activity) >= self.timeout
    }
}

/// Whether the socket has ended, failed, or neither, without consuming anything. On a source
/// socket this also runs skbs queued before it joined through the verdict (the kernel does
/// that on every `recv` that finds its receive queue non-empty).
fn probe(fd: BorrowedFd<'_>) -> Probe {
    let mut byte = [0u8; 1];
    match sys::recv(fd, &mut byte, libc::MSG_DONTWAIT | libc::MSG_PEEK) {
        Ok(0) => Probe::Eof,
        Ok(_) => Probe::Data,
        Err(e) => match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Probe::Pending,
            _ => Probe::Failed(e),
        },
    }
}

/// Bytes the socket has sent or queued for sending since it connected (write sequence minus
/// the initial one: `tcpi_bytes_acked` + `SIOCOUTQ`), and its TCP state. Read in that order,
/// an ACK landing in between can only make the sum smaller, so a drain is never declared
/// early.
fn sent_or_queued(fd: BorrowedFd<'_>) -> io::Result<(u64, u8)> {
    /// `struct tcp_info` up to `tcpi_bytes_acked` (offset 120) and a little beyond.
    const INFO_LEN: usize = 232;
    const BYTES_ACKED: usize = 120;
    let mut info = [0u8; INFO_LEN];
    let len = sys::tcp_info(fd, &mut info)?;
    if len < BYTES_ACKED + 8 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "tcp_info has no tcpi_bytes_acked",
        ));
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&info[BYTES_ACKED..BYTES_ACKED + 8]);
    let queued = sys::send_queued(fd)?;
    Ok((
        u64::from_ne_bytes(acked) + u64::from(queued.max(0) as u32),
        info[0],
    ))
}

fn reset_std(stream: &std::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_byte_moved() {
        let mut idle = Idle::new(Duration::from_millis(400));
        assert!(idle.enabled());
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!idle.expired(10), "bytes moved: not idle");
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!idle.expired(10), "300 ms since the last byte");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(idle.expired(10), "400 ms since the last byte");
        assert!(!Idle::new(Duration::ZERO).enabled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_rests_when_quiet_and_keeps_going_while_paused() {
        let mut watch = Watch::new();
        assert!(!watch.resting());
        watch.checked(100);
        assert!(!watch.resting(), "bytes moved since the start");
        watch.checked(100);
        assert!(watch.resting(), "nothing moved: rest until woken");
        watch.woken();
        assert!(!watch.resting());
        watch.paused[1] = true;
        watch.checked(100);
        assert!(
            !watch.resting(),
            "a paused source must be resumed by a later check"
        );
    }
}
