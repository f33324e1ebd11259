//! A small real TCP peer for shunt's tests and demo.
//!
//! `serve` answers each connection's first line with the address it saw the client connect
//! from, then echoes until EOF. `connect` prints one JSON line per connection with what the
//! application saw (`getpeername()`, local address) and what the server saw. `send` writes
//! raw bytes (garbage, truncated handshakes, a trickle) and reports how the connection ended.
//! `hold` opens many connections and keeps them idle; `sink` accepts them and never answers
//! (the benchmark's memory-per-idle-connection figure). `flood`, `slowloris` and `h2` push
//! on shunt's limits (`pressure.rs`).

use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};

#[path = "shunt-probe/pressure.rs"]
mod pressure;
use serde_json::json;

#[derive(Parser)]
#[command(name = "shunt-probe")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections: reply `peer=<client address> server=<name> echo=<first line>`,
    /// then echo.
    Serve(ServeArgs),
    /// Connect, send a line, print what both ends saw as JSON.
    Connect(ConnectArgs),
    /// Send raw bytes, then a newline and EOF; print what came back and how it ended.
    Send(SendArgs),
    /// Open `count` connections, write one line on each, print `{"held": count}` and keep
    /// them open until killed or `seconds` pass.
    Hold(HoldArgs),
    /// Accept connections and keep them open without reading or answering.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Open `count` echo connections one after the other, report which were served, hold
    /// the served ones and exchange again on them when told.
    Flood(pressure::FloodArgs),
    /// Open `count` connections that send a head and then dribble, never finishing; report
    /// how many the server closed.
    Slowloris(pressure::SlowlorisArgs),
    /// Raw HTTP/2: open more streams at once than allowed, optionally one with an oversized
    /// header; report refusals and completed calls.
    H2(pressure::H2Args),
}

#[derive(Args)]
struct HoldArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long)]
    count: u32,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// How this server names itself in replies.
    #[arg(long, default_value = "probe")]
    name: String,
    /// Written to each client on accept, before anything is read (a server-first protocol).
    #[arg(long)]
    banner: Option<String>,
    /// Reset each connection (RST) right after the reply instead of echoing.
    #[arg(long)]
    reset_after_reply: bool,
    /// Append `eof <peer>` or `reset <peer>` here when a client's side ends.
    #[arg(long)]
    events: Option<PathBuf>,
}

#[derive(Args)]
struct ConnectArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value = "hello")]
    message: String,
    /// Connections to make, one after the other.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Keep each connection open this long after the exchange.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Read a greeting line before sending anything (a server-first protocol).
    #[arg(long)]
    expect_banner: bool,
    /// Stay silent this long after connecting before sending.
    #[arg(long, default_value_t = 0)]
    delay_send_ms: u64,
    /// After the line, send this many more bytes, shut down the write side and read the
    /// echo to EOF (half-close).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// End the connection with a reset instead of a FIN.
    #[arg(long)]
    reset: bool,
    /// After the reply, wait for the server to end the connection and report how.
    #[arg(long)]
    await_end: bool,
}

#[derive(Args)]
struct SendArgs {
    #[arg(long)]
    to: SocketAddr,
    /// Bytes to send, in hex.
    #[arg(long, conflicts_with = "random")]
    hex: Option<String>,
    /// Send this many pseudo-random bytes instead.
    #[arg(long)]
    random: Option<usize>,
    /// Send one byte per this many milliseconds.
    #[arg(long, default_value_t = 0)]
    trickle_ms: u64,
    /// Keep the connection open this long after sending, before the newline and EOF.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn main() {
    let result = match Cli::parse().command {
        Cmd::Serve(args) => serve(args),
        Cmd::Connect(args) => connect_all(&args),
        Cmd::Send(args) => send(&args),
        Cmd::Hold(args) => hold(&args),
        Cmd::Sink { listen } => sink(listen),
        Cmd::Flood(args) => pressure::flood(&args),
        Cmd::Slowloris(args) => pressure::slowloris(&args),
        Cmd::H2(args) => pressure::h2(&args),
    };
    if let Err(e) = result {
        eprintln!("shunt-probe: {e}");
        std::process::exit(1);
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let listener =
        TcpListener::bind(args.listen).map_err(|e| format!("bind {}: {e}", args.listen))?;
    let args = std::sync::Arc::new(args);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let args = args.clone();
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let end = match answer(stream, &args) {
                Ok(()) => "eof",
                Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
                Err(e) => {
                    eprintln!("connection from {peer}: {e}");
                    "error"
                }
            };
            if let Some(events) = &args.events
                && let Ok(mut file) = OpenOptions::new().create(true).append(true).open(events)
            {
                let _ = writeln!(file, "{end} {peer}");
            }
        });
    }
    Ok(())
}

fn answer(mut stream: TcpStream, args: &ServeArgs) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    if let Some(banner) = &args.banner {
        stream.write_all(format!("{banner}\n").as_bytes())?;
    }
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = Vec::new();
    reader.read_until(b'\n', &mut first)?;
    let echo = String::from_utf8_lossy(&first);
    let name = &args.name;
    stream.write_all(format!("peer={peer} server={name} echo={}\n", echo.trim_end()).as_bytes())?;
    if args.reset_after_reply {
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        return Ok(());
    }
    // Echo the rest; bytes already buffered by the reader come first.
    std::io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)
}

fn connect_all(args: &ConnectArgs) -> Result<(), String> {
    let mut failed = false;
    for _ in 0..args.count {
        let line = exchange(args).unwrap_or_else(|e| {
            failed = true;
            json!({ "to": args.to.to_string(), "error": e.to_string() })
        });
        println!("{line}");
    }
    if failed {
        Err("some connections failed".to_string())
    } else {
        Ok(())
    }
}

fn exchange(args: &ConnectArgs) -> std::io::Result<serde_json::Value> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&args.to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let peername = stream.peer_addr()?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);

    let mut banner = None;
    if args.expect_banner {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        banner =
            Some(json!({ "text": line.trim_end(), "ms": started.elapsed().as_millis() as u64 }));
    }
    std::thread::sleep(Duration::from_millis(args.delay_send_ms));
    stream.write_all(format!("{}\n", args.message).as_bytes())?;
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    let reply = reply.trim_end();
    let parsed = reply.strip_prefix("peer=").and_then(|rest| {
        let (server_saw, rest) = rest.split_once(" server=")?;
        let (server, echo) = rest.split_once(" echo=")?;
        Some((server_saw, server, echo))
    });
    let (server_saw, server, echo) =
        parsed.ok_or_else(|| std::io::Error::other(format!("unexpected reply {reply:?}")))?;

    let mut payload_echoed = None;
    if args.payload_bytes > 0 {
        let payload: Vec<u8> = (0..args.payload_bytes).map(|i| (i % 251) as u8).collect();
        stream.write_all(&payload)?;
        stream.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        reader.read_to_end(&mut back)?;
        payload_echoed = Some(back == payload);
    }
    let mut end = None;
    if args.await_end {
        let mut rest = Vec::new();
        end = Some(match reader.read_to_end(&mut rest) {
            Ok(_) => "eof".to_string(),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset".to_string(),
            Err(e) => e.to_string(),
        });
    }
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    if args.reset {
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    }
    Ok(json!({
        "to": args.to.to_string(),
        "peername": peername.to_string(),
        "local": local.to_string(),
        "server_saw": server_saw,
        "server": server,
        "echo": echo,
        "banner": banner,
        "payload_echoed": payload_echoed,
        "end": end,
        "ms": started.elapsed().as_millis() as u64,
        "error": null,
    }))
}

fn hold(args: &HoldArgs) -> Result<(), String> {
    let mut held = Vec::with_capacity(args.count as usize);
    for i in 0..args.count {
        let mut stream = TcpStream::connect_timeout(&args.to, Duration::from_secs(3))
            .map_err(|e| format!("connection {i} to {}: {e}", args.to))?;
        stream
            .write_all(b"idle\n")
            .map_err(|e| format!("connection {i}: {e}"))?;
        held.push(stream);
    }
    println!("{}", json!({ "held": held.len() }));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Until killed, bounded by `seconds`.
    std::thread::sleep(Duration::from_secs(args.seconds));
    drop(held);
    Ok(())
}

fn sink(listen: SocketAddr) -> Result<(), String> {
    // A deep backlog: thousands of connections arrive faster than one thread accepts.
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| e.to_string())?;
    socket
        .bind(&listen.into())
        .and_then(|()| socket.listen(4096))
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let listener = TcpListener::from(socket);
    let mut open = Vec::new();
    for stream in listener.incoming().flatten() {
        open.push(stream);
    }
    Ok(())
}

/// Reads until EOF or `deadline`. A blocking read of a socket on the kernel's `sk_msg` path
/// (the local fast path) can return `EAGAIN` before its receive timeout when it is woken
/// without data, so `WouldBlock` ends the read only once the deadline has passed.
fn read_to_end_within(stream: &mut TcpStream, deadline: Instant) -> (Vec<u8>, std::io::Result<()>) {
    let mut received = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (received, Ok(())),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e)
                if (e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut)
                    && Instant::now() < deadline =>
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(e) = stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))) {
                    return (received, Err(e));
                }
            }
            Err(e) => return (received, Err(e)),
        }
    }
}

fn send(args: &SendArgs) -> Result<(), String> {
    let bytes = match (&args.hex, args.random) {
        (Some(hex), _) => decode_hex(hex)?,
        (None, Some(n)) => pseudo_random(n),
        (None, None) => return Err("give --hex or --random".into()),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let started = Instant::now();
    let outcome = (|| -> std::io::Result<(Vec<u8>, &'static str, SocketAddr)> {
        let mut stream = TcpStream::connect_timeout(&args.to, timeout)?;
        let local = stream.local_addr()?;
        stream.set_read_timeout(Some(timeout))?;
        if args.trickle_ms > 0 {
            for byte in &bytes {
                stream.write_all(std::slice::from_ref(byte))?;
                std::thread::sleep(Duration::from_millis(args.trickle_ms));
            }
        } else {
            stream.write_all(&bytes)?;
        }
        std::thread::sleep(Duration::from_millis(args.hold_ms));
        stream.write_all(b"\n")?;
        stream.shutdown(Shutdown::Write)?;
        let received = read_to_end_within(&mut stream, Instant::now() + timeout);
        let (received, end) = match received {
            (received, Ok(())) => (received, "eof"),
            (received, Err(e)) if e.kind() == ErrorKind::ConnectionReset => (received, "reset"),
            (received, Err(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                (received, "timeout")
            }
            (_, Err(e)) => return Err(e),
        };
        Ok((received, end, local))
    })();
    let line = match outcome {
        Ok((received, end, local)) => json!({
            "local": local.to_string(),
            "sent": bytes.len() + 1,
            "received": received.len(),
            "reply": String::from_utf8_lossy(&received).lines().next().unwrap_or_default(),
            "end": end,
            "ms": started.elapsed().as_millis() as u64,
            "error": null,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    println!("{line}");
    Ok(())
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    let hex: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
    if !hex.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| format!("bad hex at {i}: {e}")))
        .collect()
}

/// A fixed xorshift sequence without newlines, so the server reads it as one line.
fn pseudo_random(n: usize) -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            match (state >> 24) as u8 {
                b'\n' => 0,
                b => b,
            }
        })
        .collect()
}
