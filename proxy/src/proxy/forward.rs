//! Opaque forwarding between the client and upstream sockets: byte-exact in both directions,
//! half-close passed on (a client that shuts down its write side still gets the whole
//! response), a reset on one side turned into a reset on the other, and an optional idle
//! timeout. Memory per connection is two fixed buffers; a slow reader stops the other side
//! from being read (backpressure through TCP flow control).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const BUFFER: usize = 32 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Both sides closed their write side.
    Eof,
    ClientReset,
    UpstreamReset,
    IdleTimeout,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Eof => "eof",
            Closed::ClientReset => "client-reset",
            Closed::UpstreamReset => "upstream-reset",
            Closed::IdleTimeout => "idle-timeout",
        }
    }
}

/// Byte counters of both directions, shared with the connection table.
pub struct Meters<'a> {
    pub from_client: &'a AtomicU64,
    pub to_client: &'a AtomicU64,
}

/// Forwards until both directions are done. `prefix` (bytes already read from the client) is
/// sent upstream first. A zero `idle_timeout` disables it.
pub async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    prefix: &[u8],
    meters: Meters<'_>,
    idle_timeout: Duration,
) -> Closed {
    let closed = {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut upstream_rx, mut upstream_tx) = upstream.split();
        let last_activity = AtomicU64::new(0);
        let started = Instant::now();
        let to_upstream = async {
            if !prefix.is_empty() {
                upstream_tx.write_all(prefix).await.map_err(End::Write)?;
                meters
                    .from_client
                    .fetch_add(prefix.len() as u64, Ordering::Relaxed);
            }
            pump(
                &mut client_rx,
                &mut upstream_tx,
                meters.from_client,
                &last_activity,
                started,
            )
            .await
        };
        let to_client = pump(
            &mut upstream_rx,
            &mut client_tx,
            meters.to_client,
            &last_activity,
            started,
        );
        tokio::pin!(to_upstream, to_client);
        let (mut up_done, mut down_done) = (false, false);
        let idle = idle_watch(idle_timeout, &last_activity, started);
        tokio::pin!(idle);
        loop {
            if up_done && down_done {
                break Closed::Eof;
            }
            tokio::select! {
                result = &mut to_upstream, if !up_done => match result {
                    Ok(()) => up_done = true,
                    // Reading the client failed: it reset. Writing upstream failed: it did.
                    Err(End::Read(_)) => break Closed::ClientReset,
                    Err(End::Write(_)) => break Closed::UpstreamReset,
                },
                result = &mut to_client, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(End::Read(_)) => break Closed::UpstreamReset,
                    Err(End::Write(_)) => break Closed::ClientReset,
                },
                () = &mut idle => break Closed::IdleTimeout,
            }
        }
    };
    match closed {
        Closed::ClientReset => reset(&upstream),
        Closed::UpstreamReset => reset(&client),
        Closed::IdleTimeout | Closed::Eof => {}
    }
    closed
}

/// Closing with SO_LINGER 0 sends RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

enum End {
    Read(#[allow(dead_code)] io::Error),
    Write(#[allow(dead_code)] io::Error),
}

/// Copies one direction until EOF, then passes the EOF on with `shutdown(SHUT_WR)`.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    meter: &AtomicU64,
    last_activity: &AtomicU64,
    started: Instant,
) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(End::Read)?;
        if n == 0 {
            // Already closed by the peer is fine: the EOF has nowhere further to go.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(End::Write)?;
        meter.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Resolves once neither direction has moved a byte for `timeout`; never if it is zero.
async fn idle_watch(timeout: Duration, last_activity: &AtomicU64, started: Instant) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let last = started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
        let due = last + timeout;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

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
    ) -> tokio::task::JoinHandle<(Closed, u64, u64)> {
        tokio::spawn(async move {
            let (from_client, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
            let meters = Meters {
                from_client: &from_client,
                to_client: &to_client,
            };
            let closed = forward(client, upstream, &prefix, meters, idle).await;
            (closed, from_client.into_inner(), to_client.into_inner())
        })
    }

    #[tokio::test]
    async fn bytes_are_exact_and_half_close_keeps_the_response_flowing() {
        let ((mut app, proxy_client), (proxy_upstream, mut server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            b"pre".to_vec(),
            Duration::ZERO,
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

    #[tokio::test]
    async fn a_client_reset_resets_the_upstream() {
        let ((app, proxy_client), (proxy_upstream, mut server)) = pairs().await;
        let task = spawn_forward(proxy_client, proxy_upstream, Vec::new(), Duration::ZERO);
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

    #[tokio::test]
    async fn an_upstream_reset_resets_the_client() {
        let ((mut app, proxy_client), (proxy_upstream, server)) = pairs().await;
        let task = spawn_forward(proxy_client, proxy_upstream, Vec::new(), Duration::ZERO);
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

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let ((mut app, proxy_client), (proxy_upstream, _server)) = pairs().await;
        let task = spawn_forward(
            proxy_client,
            proxy_upstream,
            Vec::new(),
            Duration::from_millis(200),
        );
        let (closed, _, _) = task.await.unwrap();
        assert_eq!(closed, Closed::IdleTimeout);
        let mut buf = [0u8; 1];
        assert_eq!(app.read(&mut buf).await.unwrap_or(0), 0);
    }
}
