//! HTTP/2 keepalive: a PING every `interval`, and the connection given up when the PONG
//! does not come within `timeout` — a peer that vanished without a FIN or RST is noticed.
//!
//! Off by default: common servers (grpc-go, grpc-java) answer PINGs sent more often than
//! every 5 minutes on idle connections with GOAWAY `too_many_pings`.

use std::time::Duration;

use h2::{Ping, PingPong};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Zero: no PINGs.
    pub interval: Duration,
    pub timeout: Duration,
}

/// Resolves when the peer failed to answer a PING in time (or the connection broke); never
/// when keepalive is off. The connection must be polled meanwhile for PONGs to arrive.
pub async fn lost(ping_pong: Option<PingPong>, keepalive: Keepalive) {
    let Some(mut ping_pong) = ping_pong.filter(|_| !keepalive.interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                tracing::debug!("keepalive PING failed: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(
                    "no PONG within {:?}: closing the HTTP/2 connection",
                    keepalive.timeout
                );
                return;
            }
        }
    }
}
