//! Opaque TCP forwarding: bytes in, the same bytes out.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{PodContext, Proxy};
use crate::{
    inpod::connect_from,
    state::{ConnGuard, ProxyCounters},
};

pub async fn forward(
    client: TcpStream,
    dst: SocketAddr,
    pod: &PodContext,
    proxy: &Proxy,
    guard: &ConnGuard,
) {
    let upstream = match tokio::time::timeout(
        proxy.connect_timeout,
        connect_from(&pod.netns, proxy.mark, dst),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return refuse(client, proxy, pod, dst, &e.to_string()),
        Err(_) => return refuse(client, proxy, pod, dst, "connect timed out"),
    };
    if let Ok(addr) = upstream.peer_addr() {
        guard.set_upstream(addr);
    }
    ProxyCounters::inc(&proxy.counters.forwarded);

    let mut client = Counted::new(client, guard.bytes_from_client.clone());
    let mut upstream = Counted::new(upstream, guard.bytes_to_client.clone());
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let counters = &proxy.counters;
    counters.bytes_from_clients.fetch_add(
        guard.bytes_from_client.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    counters.bytes_to_clients.fetch_add(
        guard.bytes_to_client.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    if let Err(e) = result {
        ProxyCounters::inc(&counters.forward_errors);
        tracing::debug!(pod = %pod.name, %dst, "connection ended with an error: {e}");
    }
}

/// The upstream could not be reached: reset the client, as a refused connect would have.
fn refuse(client: TcpStream, proxy: &Proxy, pod: &PodContext, dst: SocketAddr, why: &str) {
    ProxyCounters::inc(&proxy.counters.upstream_connect_failed);
    tracing::info!(pod = %pod.name, %dst, "upstream connect failed: {why}");
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
}

/// Counts bytes read through a stream, live, for `shunt conns`.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    fn new(inner: S, read: Arc<AtomicU64>) -> Self {
        Self { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
