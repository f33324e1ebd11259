//! Opaque forwarding between the client and upstream sockets: byte-exact in both directions,
//! half-close passed on (a client that shuts down its write side still gets the whole
//! response), a reset on one side turned into a reset on the other — after the bytes that
//! side sent before it, and also once that side has half-closed and is no longer read — and
//! an optional idle timeout. Memory per connection is two fixed buffers; a slow reader stops the
//! other side from being read (backpressure through TCP flow control).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream, time::Instant};

use super::splice::{SpliceEnd, shutdown_write, splice_until_eof};
use crate::config::Forwarding;

/// `limits.copy_buffer`'s default, for callers without a configuration.
#[cfg(test)]
const BUFFER: usize = 32 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Both sides closed their write side.
    Eof,
    ClientReset,
    UpstreamReset,
    IdleTimeout,
    /// Another failure of one side (e.g. its connection timed out); the other side is reset.
    Error {
        side: Side,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl std::fmt::Display for Closed {
    /// The close reason as connection records show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::Eof => f.write_str("eof"),
            Closed::ClientReset => f.write_str("client-reset"),
            Closed::UpstreamReset => f.write_str("upstream-reset"),
            Closed::IdleTimeout => f.write_str("idle-timeout"),
            Closed::Error { side, error } => {
                let side = match side {
                    Side::Client => "client",
                    Side::Upstream => "upstream",
                };
                write!(f, "error: {side}: {error}")
            }
        }
    }
}

impl Closed {
    /// One side failed with `error`: a reset (or a write to a peer that has reset) is
    /// reported as such, anything else as an error of that side.
    pub(super) fn by(side: Side, error: io::Error) -> Closed {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match (error.kind(), side) {
            (ConnectionReset | BrokenPipe | ConnectionAborted, Side::Client) => Closed::ClientReset,
            (ConnectionReset | BrokenPipe | ConnectionAborted, Side::Upstream) => {
                Closed::UpstreamReset
            }
            _ => Closed::Error {
                side,
                error: error.to_string(),
            },
        }
    }

    /// The side whose failure ended the connection, if one did.
    pub(super) fn failed_side(&self) -> Option<Side> {
        match self {
            Closed::ClientReset => Some(Side::Client),
            Closed::UpstreamReset => Some(Side::Upstream),
            Closed::Error { side, .. } => Some(*side),
            Closed::Eof | Closed::IdleTimeout => None,
        }
    }
}

/// Byte counters of both directions, shared with the connection table.
#[derive(Clone, Copy)]
pub struct Meters<'a> {
    pub from_client: &'a AtomicU64,
    pub to_client: &'a AtomicU64,
}

/// How one connection's bytes move: the mode, the idle timeout (zero: none) and the size of
/// each direction's buffer when bytes are copied.
#[derive(Debug, Clone, Copy)]
pub struct How {
    pub mode: Forwarding,
    pub idle_timeout: Duration,
    pub copy_buffer: usize,
}

/// Forwards until both directions are done. `prefix` (bytes already read from the client) is
/// sent upstream first.
pub async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    prefix: &[u8],
    meters: Meters<'_>,
    how: How,
) -> Closed {
    let How {
        mode,
        idle_timeout,
        copy_buffer,
    } = how;
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let activity = Activity {
        last: &last_activity,
        started,
    };
    let to_upstream = direction(
        &client,
        &upstream,
        prefix,
        meters.from_client,
        &activity,
        (mode, copy_buffer),
    );
    let to_client = direction(
        &upstream,
        &client,
        &[],
        meters.to_client,
        &activity,
        (mode, copy_buffer),
    );
    tokio::pin!(to_upstream, to_client);
    let idle = idle_watch(idle_timeout, &activity);
    tokio::pin!(idle);
    let (mut up_done, mut down_done) = (false, false);
    let closed = loop {
        if up_done && down_done {
            break Closed::Eof;
        }
        tokio::select! {
            result = &mut to_upstream, if !up_done => match result {
                Ok(()) => up_done = true,
                Err(End::Read(e)) => break Closed::by(Side::Client, e),
                Err(End::Write(e)) => break Closed::by(Side::Upstream, e),
            },
            result = &mut to_client, if !down_done => match result {
                Ok(()) => down_done = true,
                Err(End::Read(e)) => break Closed::by(Side::Upstream, e),
                Err(End::Write(e)) => break Closed::by(Side::Client, e),
            },
            // A side that has sent its EOF is no longer read, so nothing would notice it
            // reset (a client that finished its request and then gives up). Only then: while
            // a side is still read, its direction drains what arrived before the reset and
            // then meets the reset itself, so those bytes are delivered as they would be
            // without a proxy.
            e = failed(&client), if up_done => break Closed::by(Side::Client, e),
            e = failed(&upstream), if down_done => break Closed::by(Side::Upstream, e),
            () = &mut idle => break Closed::IdleTimeout,
        }
    };
    match closed.failed_side() {
        Some(Side::Client) => reset(&upstream),
        Some(Side::Upstream) => reset(&client),
        None => {}
    }
    closed
}

/// Resolves with the socket's pending error (`SO_ERROR`: a reset, a timeout) as soon as the
/// kernel reports one, whether or not anyone is reading or writing the socket.
async fn failed(stream: &TcpStream) -> io::Error {
    loop {
        if let Err(e) = stream.ready(Interest::ERROR).await {
            return e;
        }
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return e,
            // Already consumed by a read or write, which reports it; wait for the next one.
            Ok(None) => {
                let _ = stream.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// Closing with SO_LINGER 0 sends RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Which half of a direction failed, and how.
enum End {
    Read(io::Error),
    Write(io::Error),
}

/// When either direction last moved a byte, in milliseconds since `started`.
struct Activity<'a> {
    last: &'a AtomicU64,
    started: Instant,
}

impl Activity<'_> {
    fn touch(&self) {
        self.last
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One direction: `prefix`, then everything until EOF, then the EOF itself
/// (`shutdown(SHUT_WR)`), so the other direction carries on (half-close).
async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    prefix: &[u8],
    meter: &AtomicU64,
    activity: &Activity<'_>,
    (mode, copy_buffer): (Forwarding, usize),
) -> Result<(), End> {
    write_all(to, prefix).await.map_err(End::Write)?;
    meter.fetch_add(prefix.len() as u64, Ordering::Relaxed);
    let count = |n: usize| {
        meter.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    };
    match mode {
        // Sockmap connections that get here are the ones it could not take: splice them.
        Forwarding::Splice | Forwarding::Sockmap => match splice_until_eof(from, to, count).await {
            Ok(()) => {}
            Err(SpliceEnd::Read(e)) => return Err(End::Read(e)),
            Err(SpliceEnd::Write(e)) => return Err(End::Write(e)),
            // Out of pipes (descriptor limit): copying still works, and nothing was lost.
            Err(SpliceEnd::NoPipe(e)) => {
                tracing::debug!("no pipe for splice ({e}); copying instead");
                copy_until_eof(from, to, copy_buffer, count).await?;
            }
        },
        Forwarding::Copy => copy_until_eof(from, to, copy_buffer, count).await?,
    }
    shutdown_write(to);
    Ok(())
}

async fn copy_until_eof(
    from: &TcpStream,
    to: &TcpStream,
    buffer: usize,
    mut count: impl FnMut(usize),
) -> Result<(), End> {
    let mut buf = vec![0u8; buffer];
    loop {
        from.readable().await.map_err(End::Read)?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(End::Read(e)),
        };
        write_all(to, &buf[..n]).await.map_err(End::Write)?;
        count(n);
    }
}

pub(super) async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves once neither direction has moved a byte for `timeout`; never if it is zero.
async fn idle_watch(timeout: Duration, activity: &Activity<'_>) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let last = activity.started + Duration::from_millis(activity.last.load(Ordering::Relaxed));
        let due = last + timeout;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// Two connected socket pairs: (application side, proxy's client side) and (proxy's
    /// upstream side, server side).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        async fn pair() -> (TcpStream, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
            (a.unwrap(), b.unwrap().0)
        }
        (pair().await, pair().await)
    }

    fn spawn_forward(
        client: TcpStream,
        upstream: TcpStream,
        prefix: Vec<u8>,
        idle: Duration,
        mode: Forwarding,
    ) -> tokio::task::JoinHandle<(Closed, u64, u64)> {
        tokio::spawn(async move {
            let (from_client, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
            let meters = Meters {
                from_client: &from_client,
                to_client: &to_client,
            };
            let how = How {
                mode,
                idle_timeout: idle,
                copy_buffer: BUFFER,
            };
            let closed = forward(client, upstream, &prefix, meters, how).await;
            (closed, from_client.into_inner(), to_client.into_inner())
        })
    }

    async fn bytes_are_exact_and_half_close_keeps_the_response_flowing(mode: Forwarding) {
        let ((mut app, proxy_client), (proxy_upstream, mut server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            b"pre".to_vec(),
            Duration::ZERO,
            mode,
        );
        let request: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        app.write_all(&request).await.unwrap();
        app.shutdown().await.unwrap(); // half-close: done sending, still reading
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(&received[..3], b"pre");
        assert_eq!(&received[3..], &request[..]);
        // The server answers after seeing EOF; the client must still get all of it.
        let response = vec![7u8; 300_000];
        server.write_all(&response).await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, response);
        let (closed, up, down) = task.await.unwrap();
        assert_eq!(closed, Closed::Eof);
        assert_eq!(up, 1_000_003);
        assert_eq!(down, 300_000);
    }

    async fn a_client_reset_resets_the_upstream(mode: Forwarding) {
        let ((app, proxy_client), (proxy_upstream, mut server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            Vec::new(),
            Duration::ZERO,
            mode,
        );
        reset(&app);
        drop(app);
        let mut buf = [0u8; 16];
        let err = server
            .read(&mut buf)
            .await
            .expect_err("server should see a reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().0, Closed::ClientReset);
    }

    async fn an_upstream_reset_resets_the_client(mode: Forwarding) {
        let ((mut app, proxy_client), (proxy_upstream, server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            Vec::new(),
            Duration::ZERO,
            mode,
        );
        reset(&server);
        drop(server);
        let mut buf = [0u8; 16];
        let err = app
            .read(&mut buf)
            .await
            .expect_err("client should see a reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().0, Closed::UpstreamReset);
    }

    async fn idle_connections_are_closed(mode: Forwarding) {
        let ((mut app, proxy_client), (proxy_upstream, _server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            Vec::new(),
            Duration::from_millis(200),
            mode,
        );
        let (closed, _, _) = task.await.unwrap();
        assert_eq!(closed, Closed::IdleTimeout);
        let mut buf = [0u8; 1];
        assert_eq!(app.read(&mut buf).await.unwrap_or(0), 0);
    }

    /// The client finishes sending, then resets while the server is still thinking: nobody
    /// reads or writes the client's socket then, yet the server must learn of it.
    async fn a_reset_after_half_close_reaches_the_upstream(mode: Forwarding) {
        let ((mut app, proxy_client), (proxy_upstream, mut server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            Vec::new(),
            Duration::ZERO,
            mode,
        );
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        reset(&app);
        drop(app);
        // Having read its EOF, the server's reads return 0 from now on; the reset shows as
        // the socket's error (EPIPE in CLOSE_WAIT), which its next write would return.
        tokio::time::timeout(Duration::from_secs(10), server.ready(Interest::ERROR))
            .await
            .expect("server should see a reset")
            .unwrap();
        let err = server.take_error().unwrap().expect("a pending error");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
        assert_eq!(task.await.unwrap().0, Closed::ClientReset);
    }

    /// The server answers and resets at once: the answer, already received, reaches the
    /// client before the reset does, as it would without a proxy.
    async fn bytes_sent_before_a_reset_arrive_first(mode: Forwarding) {
        let ((mut app, proxy_client), (proxy_upstream, mut server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            Vec::new(),
            Duration::ZERO,
            mode,
        );
        let reply: Vec<u8> = (0..32_000u32).map(|i| (i % 253) as u8).collect();
        server.write_all(&reply).await.unwrap();
        reset(&server);
        drop(server);
        let mut got = vec![0u8; reply.len()];
        app.read_exact(&mut got).await.expect("the whole reply");
        assert_eq!(got, reply);
        let err = app.read(&mut [0u8; 16]).await.expect_err("then the reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().0, Closed::UpstreamReset);
    }

    #[test]
    fn failures_other_than_resets_are_named() {
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        let closed = Closed::by(Side::Upstream, timeout);
        assert!(
            closed.to_string().starts_with("error: upstream: "),
            "{closed}"
        );
        assert_eq!(closed.failed_side(), Some(Side::Upstream));
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        assert_eq!(Closed::by(Side::Client, pipe), Closed::ClientReset);
        assert_eq!(Closed::Eof.failed_side(), None);
    }

    /// A measurement, not a test: `cargo test --release -p shunt forwarding_throughput --
    /// --ignored --nocapture`. Moves `FORWARDING_BENCH_MIB` (default 1024) MiB each way at
    /// once through `forward` over loopback, rounds of splice and copy interleaved, and prints
    /// the wall time and the CPU time of the forwarding thread alone (the endpoints run on
    /// other threads).
    #[test]
    #[ignore = "a measurement; run by hand"]
    fn forwarding_throughput() {
        let mib: u64 = std::env::var("FORWARDING_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let bytes = mib << 20;
        println!("{mib} MiB each way through forward() over loopback");
        println!("mode    round  wall s  Gbit/s (both ways)  forwarding CPU s  CPU s per GB");
        for round in 1..=3 {
            for mode in [Forwarding::Splice, Forwarding::Copy] {
                let (wall, cpu) = measure(mode, bytes);
                let gb = 2.0 * bytes as f64 / 1e9;
                println!(
                    "{:<7} {round:>5}  {wall:>6.2}  {:>18.1}  {cpu:>16.2}  {:>12.3}",
                    format!("{mode:?}").to_lowercase(),
                    gb * 8.0 / wall,
                    cpu / gb
                );
            }
        }
    }

    fn measure(mode: Forwarding, bytes: u64) -> (f64, f64) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ((app, proxy_client), (proxy_upstream, server)) = pairs().await;
            let (proxy_client, proxy_upstream) = (
                proxy_client.into_std().unwrap(),
                proxy_upstream.into_std().unwrap(),
            );
            // Forwarding on a thread of its own, so its CPU time can be read alone.
            let forwarding = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let client = TcpStream::from_std(proxy_client).unwrap();
                    let upstream = TcpStream::from_std(proxy_upstream).unwrap();
                    let started = thread_cpu_seconds();
                    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
                    let meters = Meters {
                        from_client: &up,
                        to_client: &down,
                    };
                    let how = How {
                        mode,
                        idle_timeout: Duration::ZERO,
                        copy_buffer: BUFFER,
                    };
                    let closed = forward(client, upstream, &[], meters, how).await;
                    assert_eq!(closed, Closed::Eof);
                    assert_eq!((up.into_inner(), down.into_inner()), (bytes, bytes));
                    thread_cpu_seconds() - started
                })
            });
            let started = std::time::Instant::now();
            let (app_read, app_write) = app.into_split();
            let (server_read, server_write) = server.into_split();
            let (a, b, c, d) = tokio::join!(
                tokio::spawn(send(app_write, bytes)),
                tokio::spawn(drain(app_read)),
                tokio::spawn(send(server_write, bytes)),
                tokio::spawn(drain(server_read)),
            );
            a.unwrap();
            c.unwrap();
            assert_eq!((b.unwrap(), d.unwrap()), (bytes, bytes));
            let wall = started.elapsed().as_secs_f64();
            (wall, forwarding.join().unwrap())
        })
    }

    async fn send(mut to: tokio::net::tcp::OwnedWriteHalf, mut bytes: u64) {
        let chunk = vec![0x5au8; 256 * 1024];
        while bytes > 0 {
            let n = bytes.min(chunk.len() as u64) as usize;
            to.write_all(&chunk[..n]).await.unwrap();
            bytes -= n as u64;
        }
        to.shutdown().await.unwrap();
    }

    async fn drain(mut from: tokio::net::tcp::OwnedReadHalf) -> u64 {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            match from.read(&mut buf).await.unwrap() {
                0 => return total,
                n => total += n as u64,
            }
        }
    }

    fn thread_cpu_seconds() -> f64 {
        crate::proxy::sys::thread_cpu_seconds()
    }

    /// Every case above, once per forwarding mode.
    macro_rules! in_both_modes {
        ($($case:ident),* $(,)?) => {
            mod splice {
                $(#[tokio::test]
                async fn $case() {
                    super::$case(super::Forwarding::Splice).await;
                })*
            }
            mod copy {
                $(#[tokio::test]
                async fn $case() {
                    super::$case(super::Forwarding::Copy).await;
                })*
            }
        };
    }

    in_both_modes!(
        a_reset_after_half_close_reaches_the_upstream,
        bytes_sent_before_a_reset_arrive_first,
        bytes_are_exact_and_half_close_keeps_the_response_flowing,
        a_client_reset_resets_the_upstream,
        an_upstream_reset_resets_the_client,
        idle_connections_are_closed,
    );
}
