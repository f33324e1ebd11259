//! Deciding what a connection is without ever stalling it.
//!
//! Most clients speak first and at once (an HTTP/2 preface, a TLS ClientHello), so the
//! upstream is dialled only once the client's first bytes are not HTTP/2, or once
//! [`DIAL_GRACE`] passes without any: an HTTP/2 connection needs no dial of its own (its
//! streams lease pooled upstream connections), and a new gRPC channel then costs no connect
//! and close upstream. After the grace the upstream is dialled while the client's bytes
//! are still awaited, so a server that speaks first (SMTP, MySQL, SSH) has its greeting
//! relayed as soon as it arrives, and a client that sends nothing is held at most
//! `detect_timeout`. Every byte read here is
//! returned in `prefix` and forwarded before anything else; nothing is read from the
//! upstream (its first bytes are only peeked at), so forwarding relays them untouched.

use std::{future::Future, io, pin::Pin, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{
    dial::{DialError, Dialed},
    forward::reset,
    sniff::{MAX_SNIFF_BYTES, Sniffed, sniff},
};
use crate::{
    http2::H2_PREFACE,
    state::{ClientHello, Verdict},
};

pub struct Detected {
    pub verdict: Verdict,
    pub hello: Option<ClientHello>,
    /// What the client sent while we looked; owed to the upstream.
    pub prefix: Vec<u8>,
    /// Set when the dial finished during detection.
    pub dialed: Option<Result<Dialed, DialError>>,
}

/// How long detection waits for the client's first bytes before dialling the upstream.
/// Clients that speak first send at once; a server that speaks first has its greeting
/// delayed by at most this, once per connection.
pub const DIAL_GRACE: Duration = Duration::from_millis(5);

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
    let grace = tokio::time::sleep(DIAL_GRACE.min(timeout));
    tokio::pin!(grace);
    let mut dial_now = false;
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
                let n = match read {
                    Ok(n) => n,
                    Err(e) => {
                        // The client is gone (typically a reset): a dialled upstream must
                        // not see a clean end instead.
                        if let Some(Ok(dialed)) = &dialed {
                            reset(&dialed.stream);
                        }
                        return Err(e);
                    }
                };
                if n == 0 {
                    // The client half-closed without a decisive byte: forward what there is.
                    break (Verdict::Opaque, None);
                }
                prefix.extend_from_slice(&chunk[..n]);
                match sniff(&prefix) {
                    // Part of a preface: still no dial before the grace is up.
                    Sniffed::NeedMore if prefix.len() < MAX_SNIFF_BYTES => {
                        dial_now |= !H2_PREFACE.starts_with(&prefix);
                    }
                    Sniffed::NeedMore | Sniffed::Opaque => break (Verdict::Opaque, None),
                    Sniffed::H2 => break (Verdict::H2, None),
                    Sniffed::Tls(hello) => break (Verdict::Tls, Some(hello)),
                }
            }
            // A failed dial is kept, not acted on: if the client turns out to speak HTTP/2,
            // its streams are routed one by one and each gets a proper UNAVAILABLE.
            result = &mut dial, if dial_now && dialed.is_none() => dialed = Some(result),
            () = &mut grace, if !dial_now => dial_now = true,
            // Data, an end or a reset from the server: whatever it is (but an HTTP/2
            // server's SETTINGS), forwarding relays it now; a reset there becomes a reset of
            // the client.
            () = spoke(upstream), if upstream.is_some() => {
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

/// Resolves once the server has sent something, closed or failed. `peek` consumes nothing,
/// and unlike bare readiness (which may wake spuriously) it only returns when there is
/// something to relay.
async fn spoke(stream: Option<&TcpStream>) {
    match stream {
        Some(stream) => {
            let _ = stream.peek(&mut [0u8; 1]).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::atomic::AtomicU64,
        time::{Duration, Instant},
    };

    use proptest::prelude::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::{
        config::Forwarding,
        proxy::{
            forward::{How, Meters, forward},
            sniff::tests::client_hello,
        },
    };

    /// A connected pair over loopback: (the connecting side, the accepted side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// An upstream already dialled: (what `dial` hands detection, the server's end).
    async fn upstream() -> (Dialed, TcpStream) {
        let (stream, server) = pair().await;
        let upstream: SocketAddr = stream.peer_addr().unwrap();
        (
            Dialed {
                stream,
                upstream,
                endpoint: None,
            },
            server,
        )
    }

    async fn run(
        client: &mut TcpStream,
        dialed: Result<Dialed, DialError>,
        timeout: Duration,
    ) -> io::Result<Detected> {
        let dial = std::future::ready(dialed);
        tokio::pin!(dial);
        detect(client, dial, timeout).await
    }

    #[tokio::test]
    async fn a_server_that_speaks_first_is_relayed_without_waiting() {
        let (_app, mut client) = pair().await;
        let (dialed, mut server) = upstream().await;
        server.write_all(b"220 ready\r\n").await.unwrap();
        let started = Instant::now();
        let detected = run(&mut client, Ok(dialed), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::ServerFirst);
        // A correctness bound: decided by the banner, not by the 30 s timeout.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(detected.prefix.is_empty());
        // Only peeked at: the banner is still there for forwarding.
        let Some(Ok(dialed)) = detected.dialed else {
            panic!("the dial result was lost");
        };
        let mut banner = [0u8; 11];
        let mut upstream = dialed.stream;
        upstream.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
    }

    #[tokio::test]
    async fn an_http2_client_that_speaks_at_once_costs_no_dial() {
        let (mut app, mut client) = pair().await;
        app.write_all(H2_PREFACE).await.unwrap();
        let dial_started = std::sync::atomic::AtomicBool::new(false);
        let dial = async {
            dial_started.store(true, std::sync::atomic::Ordering::SeqCst);
            Err(DialError::NoEndpoints("greeter".into()))
        };
        tokio::pin!(dial);
        let detected = detect(&mut client, dial, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::H2);
        assert!(detected.dialed.is_none());
        assert!(!dial_started.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_silent_client_is_held_only_until_the_timeout() {
        let (_app, mut client) = pair().await;
        let (dialed, _server) = upstream().await;
        let detected = run(&mut client, Ok(dialed), Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::Timeout);
        assert!(detected.prefix.is_empty());
        assert!(matches!(detected.dialed, Some(Ok(_))));
    }

    #[tokio::test]
    async fn a_cut_preface_then_silence_times_out_and_keeps_its_bytes() {
        let (mut app, mut client) = pair().await;
        let (dialed, _server) = upstream().await;
        app.write_all(&H2_PREFACE[..10]).await.unwrap();
        let detected = run(&mut client, Ok(dialed), Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::Timeout);
        assert_eq!(detected.prefix, &H2_PREFACE[..10]);
    }

    #[tokio::test]
    async fn a_preface_across_several_reads_is_h2() {
        let (mut app, mut client) = pair().await;
        let (dialed, _server) = upstream().await;
        let writer = tokio::spawn(async move {
            for piece in [&H2_PREFACE[..1], &H2_PREFACE[1..7], &H2_PREFACE[7..]] {
                app.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            app
        });
        let detected = run(&mut client, Ok(dialed), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::H2);
        assert_eq!(detected.prefix, H2_PREFACE);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_client_hello_gives_its_sni() {
        let (mut app, mut client) = pair().await;
        let (dialed, _server) = upstream().await;
        let hello = client_hello("db.example", &["h2"]);
        app.write_all(&hello).await.unwrap();
        let detected = run(&mut client, Ok(dialed), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::Tls);
        let hello_seen = detected.hello.expect("SNI and ALPN");
        assert_eq!(hello_seen.sni.as_deref(), Some("db.example"));
        assert_eq!(detected.prefix, hello);
    }

    #[tokio::test]
    async fn a_failed_dial_waits_for_the_clients_verdict() {
        // An HTTP/2 client then gets UNAVAILABLE per stream rather than a reset.
        let (mut app, mut client) = pair().await;
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            app.write_all(H2_PREFACE).await.unwrap();
            app
        });
        let failed = Err(DialError::NoEndpoints("greeter".into()));
        let detected = run(&mut client, failed, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::H2);
        assert!(matches!(detected.dialed, Some(Err(_))));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn an_http2_servers_settings_are_not_server_first() {
        let (mut app, mut client) = pair().await;
        let (dialed, mut server) = upstream().await;
        // An empty SETTINGS frame, as an HTTP/2 server sends on connect.
        server
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            app.write_all(H2_PREFACE).await.unwrap();
            app
        });
        let detected = run(&mut client, Ok(dialed), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::H2);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_is_forwarded_as_opaque() {
        let (app, mut client) = pair().await;
        let (dialed, _server) = upstream().await;
        drop(app);
        let detected = run(&mut client, Ok(dialed), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(detected.verdict, Verdict::Opaque);
        assert!(detected.prefix.is_empty());
    }

    #[tokio::test]
    async fn an_upstream_reset_is_left_to_forwarding() {
        let (_app, mut client) = pair().await;
        let (dialed, server) = upstream().await;
        reset(&server);
        drop(server);
        let detected = run(&mut client, Ok(dialed), Duration::from_secs(30))
            .await
            .expect("an upstream failure is not the client's");
        assert_eq!(detected.verdict, Verdict::ServerFirst);
    }

    #[tokio::test]
    async fn a_client_reset_during_detection_resets_the_upstream() {
        let (app, mut client) = pair().await;
        let (dialed, mut server) = upstream().await;
        // Let the dial result land before the client goes away.
        let dial = std::future::ready(Ok(dialed));
        tokio::pin!(dial);
        let detecting = detect(&mut client, dial, Duration::from_secs(30));
        let resetting = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            reset(&app);
            drop(app);
        };
        let (detected, ()) = tokio::join!(detecting, resetting);
        assert!(detected.is_err());
        let err = server
            .read(&mut [0u8; 8])
            .await
            .expect_err("the upstream should see a reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// What a client may open with, and the verdict it must get.
    fn opening() -> impl Strategy<Value = (Vec<u8>, Verdict)> {
        let tail = proptest::collection::vec(any::<u8>(), 0..3000);
        prop_oneof![
            tail.clone().prop_map(|tail| {
                let mut bytes = H2_PREFACE.to_vec();
                bytes.extend(tail);
                (bytes, Verdict::H2)
            }),
            ("[a-z]{1,20}\\.test", tail.clone()).prop_map(|(sni, tail)| {
                let mut bytes = client_hello(&sni, &["h2"]);
                bytes.extend(tail);
                (bytes, Verdict::Tls)
            }),
            // Anything not starting like HTTP/2 or TLS.
            (any::<u8>(), tail).prop_filter_map("starts like a known protocol", |(b, tail)| {
                (b != b'P' && b != 0x16).then(|| {
                    let mut bytes = vec![b];
                    bytes.extend(tail);
                    (bytes, Verdict::Opaque)
                })
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// However the client's bytes are split across writes, detection gives the right
        /// verdict and, through forwarding, the server receives exactly what was sent.
        #[test]
        fn split_openings_get_their_verdict_and_arrive_intact(
            (bytes, verdict) in opening(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (detected, received) = runtime.block_on(async {
                let (mut app, mut client) = pair().await;
                let (dialed, mut server) = upstream().await;
                let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
                cuts.extend([0, bytes.len()]);
                cuts.sort_unstable();
                let sent = bytes.clone();
                let writer = tokio::spawn(async move {
                    for piece in cuts.windows(2) {
                        app.write_all(&sent[piece[0]..piece[1]]).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    app.shutdown().await.unwrap();
                    app
                });
                // As the proxy does: a dial that detection did not need yet happens now.
                let dial = std::future::ready(Ok::<_, DialError>(dialed));
                tokio::pin!(dial);
                let mut detected = detect(&mut client, dial.as_mut(), Duration::from_secs(30)).await.unwrap();
                let dialed = match detected.dialed.take() {
                    Some(result) => result,
                    None => dial.await,
                };
                let Ok(dialed) = dialed else { panic!("dial failed") };
                let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
                let meters = Meters { from_client: &up, to_client: &down };
                let how = How { mode: Forwarding::Splice, idle_timeout: Duration::ZERO, copy_buffer: 32 << 10 };
                let forwarding = forward(client, dialed.stream, &detected.prefix, meters, how);
                let receiving = async {
                    let mut received = Vec::new();
                    server.read_to_end(&mut received).await.unwrap();
                    server.shutdown().await.unwrap();
                    received
                };
                let (_, received) = tokio::join!(forwarding, receiving);
                drop(writer.await.unwrap());
                (detected.verdict, received)
            });
            prop_assert_eq!(detected, verdict);
            prop_assert_eq!(received, bytes);
        }
    }
}
