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
    let (verdict, hello) = loop {
        let upstream = match &dialed {
            Some(Ok(d)) => Some(&d.stream),
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
            result = &mut dial, if dialed.is_none() => {
                let failed = result.is_err();
                dialed = Some(result);
                if failed {
                    // Nothing to forward to: no point waiting for the client.
                    break (Verdict::Opaque, None);
                }
            }
            ready = readable(upstream), if upstream.is_some() => {
                ready?;
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

async fn readable(stream: Option<&TcpStream>) -> io::Result<()> {
    match stream {
        Some(stream) => stream.readable().await,
        None => std::future::pending().await,
    }
}
