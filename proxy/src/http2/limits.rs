//! What one HTTP/2 client connection may hold: streams and header bytes (advertised in
//! SETTINGS and enforced by h2: extra streams get `REFUSED_STREAM`, an oversized header
//! block a 431), and how long it may sit without a request: the first request's headers
//! must arrive within `header_timeout` (a slowloris client that never completes them is
//! closed), and a connection with no open stream is closed after `idle_timeout`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::Reason;
use tokio::{net::TcpStream, time::Instant};

use super::Prefixed;
use crate::{config, state::ProxyCounters};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub header_timeout: Duration,
    /// Zero: never.
    pub idle_timeout: Duration,
}

impl From<&config::Http2> for Limits {
    fn from(http2: &config::Http2) -> Limits {
        Limits {
            max_concurrent_streams: http2.max_concurrent_streams,
            max_header_list_size: http2.max_header_list_size,
            header_timeout: http2.header_timeout,
            idle_timeout: http2.idle_timeout,
        }
    }
}

/// Why shunt closes a client connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    HeaderTimeout,
    IdleTimeout,
}

/// Time a closing connection gets to take its GOAWAY before it is dropped: a client that
/// reads nothing must not hold the connection open.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

impl Closing {
    pub fn reason(self) -> &'static str {
        match self {
            Closing::HeaderTimeout => "header-timeout",
            Closing::IdleTimeout => "idle-timeout",
        }
    }

    pub fn counter(self, counters: &ProxyCounters) -> &AtomicU64 {
        match self {
            Closing::HeaderTimeout => &counters.h2_header_timeouts,
            Closing::IdleTimeout => &counters.h2_idle_timeouts,
        }
    }

    /// GOAWAY (`NO_ERROR`, naming the last stream processed, so a client that opened one
    /// meanwhile knows to retry it elsewhere), then the connection is closed.
    pub async fn close(self, connection: &mut h2::server::Connection<Prefixed<TcpStream>, Bytes>) {
        connection.abrupt_shutdown(Reason::NO_ERROR);
        let closed = std::future::poll_fn(|cx| connection.poll_closed(cx));
        let _ = tokio::time::timeout(GOAWAY_GRACE, closed).await;
    }
}

/// The streams open on one connection, and since when there has been none.
#[derive(Clone)]
pub struct StreamsOpen(Arc<Inner>);

struct Inner {
    count: AtomicUsize,
    epoch: Instant,
    /// Milliseconds since `epoch` when the last stream ended.
    idle_since_ms: AtomicU64,
}

impl Default for StreamsOpen {
    fn default() -> Self {
        StreamsOpen(Arc::new(Inner {
            count: AtomicUsize::new(0),
            epoch: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }))
    }
}

impl StreamsOpen {
    /// Counts a stream as open until the guard is dropped.
    pub fn enter(&self) -> StreamGuard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.0.clone())
    }

    /// `None` when the connection has been without streams for `timeout`; else when to look
    /// again.
    pub fn idle_until(&self, timeout: Duration) -> Option<Instant> {
        let now = Instant::now();
        if self.0.count.load(Ordering::Acquire) > 0 {
            return Some(now + timeout);
        }
        let since =
            self.0.epoch + Duration::from_millis(self.0.idle_since_ms.load(Ordering::Acquire));
        let due = since + timeout;
        (due > now).then_some(due)
    }
}

pub struct StreamGuard(Arc<Inner>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = self.0.epoch.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_once_no_stream_has_been_open_for_the_timeout() {
        let open = StreamsOpen::default();
        let timeout = Duration::from_secs(10);
        let guard = open.enter();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(open.idle_until(timeout).is_some(), "a stream is open");
        drop(guard);
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = open.idle_until(timeout).expect("idle for 5s only");
        assert_eq!(later - Instant::now(), Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(open.idle_until(timeout), None);
    }
}
