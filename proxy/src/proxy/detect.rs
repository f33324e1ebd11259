//! Deciding what a connection is without ever stalling it.
//!
//! The upstream is dialled while the client's first bytes are awaited, so a server that
//! speaks first (SMTP, MySQL, SSH) has its greeting relayed as soon as it arrives, and a
//! client that sends nothing is held at most `detect_timeout`. Every byte read here is
//! returned in `prefix` and forwarded before anything else.

use std::{future::Future, io, pin::Pin, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{
    dial::{DialError, Dialed},
    sniff::{ClientHello, MAX_SNIFF_BYTES, Sniffed, Verdict, sniff},
};

pub struct Detected {
    pub verdict: Verdict,
    pub hello: Option<ClientHello>,
    /// What the client sent while we looked; owed to the upstream.
    pub prefix: Vec<u8>,
    /// Set when the dial finished during detection.
    pub dialed: Option<Result<Dialed, DialError>>,
}

pub async fn detect<D>(
    client: &mut TcpStream,
    mut dial: Pin<&mut D>,
    timeout: Duration,
) -> io::Result<Detected>
where
    D: Future<Output = Result<Dialed, DialError>>,
{
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut prefix = Vec::new();
    let mut chunk = [0u8; 2048];
    let mut dialed: Option<Result<Dialed, DialError>> = None;
    // An HTTP/2 server sends SETTINGS on connect, before the client's preface arrives:
    // that is not a server-first protocol, so keep waiting for the client.
    let mut upstream_is_h2 = false;
    let (verdict, hello) = loop {
        let upstream = match &dialed {
            Some(Ok(d)) if !upstream_is_h2 => Some(&d.stream),
            _ => None,
        };
        tokio::select! {
            read = client.read(&mut chunk) => {
                let n = read?;
                if n == 0 {
                    // The client half-closed without a decisive byte: forward what there is.
                    break (Verdict::Opaque, None);
                }
                prefix.extend_from_slice(&chunk[..n]);
                match sniff(&prefix) {
                    Sniffed::NeedMore if prefix.len() < MAX_SNIFF_BYTES => {}
                    Sniffed::NeedMore | Sniffed::Opaque => break (Verdict::Opaque, None),
                    Sniffed::H2 => break (Verdict::H2, None),
                    Sniffed::Tls(hello) => break (Verdict::Tls, Some(hello)),
                }
            }
            // A failed dial is kept, not acted on: if the client turns out to speak HTTP/2,
            // its streams are routed one by one and each gets a proper UNAVAILABLE.
            result = &mut dial, if dialed.is_none() => dialed = Some(result),
            ready = readable(upstream), if upstream.is_some() => {
                ready?;
                if let Some(Ok(d)) = &dialed
                    && starts_with_h2_settings(&d.stream).await
                {
                    upstream_is_h2 = true;
                    continue;
                }
                break (Verdict::ServerFirst, None);
            }
            () = &mut deadline => break (Verdict::Timeout, None),
        }
    };
    Ok(Detected {
        verdict,
        hello,
        prefix,
        dialed,
    })
}

/// Whether the server's first bytes are an HTTP/2 SETTINGS frame header (type 4 on stream
/// 0), looked at without consuming them.
async fn starts_with_h2_settings(stream: &TcpStream) -> bool {
    let mut head = [0u8; 9];
    match stream.peek(&mut head).await {
        Ok(n) if n >= 4 => {
            let settings = head[3] == 0x04;
            settings && (n < 9 || head[5..9] == [0, 0, 0, 0])
        }
        _ => false,
    }
}

async fn readable(stream: Option<&TcpStream>) -> io::Result<()> {
    match stream {
        Some(stream) => stream.readable().await,
        None => std::future::pending().await,
    }
}
