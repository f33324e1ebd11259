//! Clients that push on shunt's limits: `flood` opens many echo connections and reports
//! which were served, `slowloris` opens connections that never finish a request, and `h2`
//! speaks raw HTTP/2 frames so it can break the rules a well-behaved client library keeps
//! (more streams than the server allows, an oversized header block).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct FloodArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long)]
    count: u32,
    /// How long each connection waits for its echo.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    /// Once this file exists (or `seconds` pass), exchange a second line on every served
    /// connection, print how many still echo, and exit.
    #[arg(long)]
    go: Option<PathBuf>,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

/// How one connection's exchange ended.
fn outcome(result: std::io::Result<()>) -> &'static str {
    match result {
        Ok(()) => "served",
        Err(e) => match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                "reset"
            }
            ErrorKind::UnexpectedEof => "eof",
            ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
            _ => "error",
        },
    }
}

/// Writes a line and reads the server's one-line reply.
fn exchange(stream: &mut TcpStream, line: &str) -> std::io::Result<()> {
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut reply = String::new();
    if reader.read_line(&mut reply)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

pub fn flood(args: &FloodArgs) -> Result<(), String> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut outcomes: BTreeMap<&str, u32> = BTreeMap::new();
    let mut served = Vec::new();
    let mut kept = Vec::new();
    for i in 0..args.count {
        let result = TcpStream::connect_timeout(&args.to, timeout).and_then(|mut stream| {
            stream.set_read_timeout(Some(timeout))?;
            let exchanged = exchange(&mut stream, &format!("flood {i}"));
            match exchanged {
                Ok(()) => served.push(stream),
                // Still waiting (e.g. in the listener's backlog): keep it open, as a client
                // that has not given up would.
                Err(_) => kept.push(stream),
            }
            exchanged
        });
        *outcomes.entry(outcome(result)).or_default() += 1;
    }
    println!("{}", json!({ "phase": "opened", "outcomes": outcomes }));
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < deadline && !args.go.as_ref().is_some_and(|go| go.exists()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut again: BTreeMap<&str, u32> = BTreeMap::new();
    for stream in &mut served {
        *again.entry(outcome(exchange(stream, "again"))).or_default() += 1;
    }
    println!("{}", json!({ "phase": "again", "outcomes": again }));
    Ok(())
}

#[derive(Args)]
pub struct SlowlorisArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long)]
    count: u32,
    /// Sent at once on each connection, in hex.
    #[arg(long)]
    hex: String,
    /// Then one more byte of this (hex) per `trickle_ms`, never all of it.
    #[arg(long, default_value = "")]
    trickle_hex: String,
    #[arg(long, default_value_t = 500)]
    trickle_ms: u64,
    /// Give up waiting for the server to close the connections after this long.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

/// Opens `count` connections that each send `hex` and then dribble `trickle_hex`, and
/// reports how many the server closed (and how) before `seconds` ran out.
pub fn slowloris(args: &SlowlorisArgs) -> Result<(), String> {
    let head = super::decode_hex(&args.hex)?;
    let trickle = super::decode_hex(&args.trickle_hex)?;
    let mut open: Vec<(TcpStream, usize)> = Vec::new();
    for i in 0..args.count {
        let mut stream = TcpStream::connect_timeout(&args.to, Duration::from_secs(5))
            .map_err(|e| format!("connection {i}: {e}"))?;
        stream
            .write_all(&head)
            .map_err(|e| format!("connection {i}: {e}"))?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        open.push((stream, 0));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut ends: BTreeMap<&str, u32> = BTreeMap::new();
    let mut last_ms = 0u128;
    let mut next_trickle = Instant::now();
    while !open.is_empty() && Instant::now() < deadline {
        let trickle_now = Instant::now() >= next_trickle;
        if trickle_now {
            next_trickle += Duration::from_millis(args.trickle_ms);
        }
        open.retain_mut(|(stream, sent)| {
            let mut buf = [0u8; 4096];
            let end = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break Some("eof"),
                    // A GOAWAY or the like: the server is still talking, read on.
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => break Some("reset"),
                    Err(_) => break Some("error"),
                }
            };
            let end = end.or_else(|| {
                if trickle_now && *sent < trickle.len() {
                    match stream.write(&trickle[*sent..*sent + 1]) {
                        Ok(_) => *sent += 1,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => return Some("reset"),
                    }
                }
                None
            });
            match end {
                Some(end) => {
                    *ends.entry(end).or_default() += 1;
                    last_ms = started.elapsed().as_millis();
                    false
                }
                None => true,
            }
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{}",
        json!({ "closed": ends, "still_open": open.len(), "last_closed_ms": last_ms as u64 })
    );
    Ok(())
}

#[derive(Args)]
pub struct H2Args {
    #[arg(long)]
    to: SocketAddr,
    /// Requests opened at once, each left waiting for its body.
    #[arg(long)]
    streams: u32,
    /// Adds a header with a value this long to the first request.
    #[arg(long, default_value_t = 0)]
    big_header: usize,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an `n`-bit prefix, the first byte's other bits from `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literals without indexing (no HPACK state to keep in step).
fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok((head[3], head[4], id, payload))
}

/// Opens `streams` SayHello requests at once, ignoring the server's stream limit; counts
/// the ones refused, then sends the others their message and counts the completed calls.
pub fn h2(args: &H2Args) -> Result<(), String> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut stream = TcpStream::connect_timeout(&args.to, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&out).map_err(|e| e.to_string())?;
    let big = "x".repeat(args.big_header);
    let authority = args.to.to_string();
    let ids: Vec<u32> = (0..args.streams).map(|i| 1 + 2 * i).collect();
    let mut requests = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut headers = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        if i == 0 && !big.is_empty() {
            headers.push(("x-big", big.as_str()));
        }
        requests.extend(frame(HEADERS, END_HEADERS, *id, &header_block(&headers)));
    }
    stream.write_all(&requests).map_err(|e| e.to_string())?;

    let mut refused = Vec::new();
    let mut other_resets = Vec::new();
    let mut statuses: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut completed = Vec::new();
    let mut goaway = None;
    let mut bodies_sent = false;
    let started = Instant::now();
    // Streams answered: refused, reset, or completed (a rejected one may be both).
    let answered = |refused: &Vec<u32>, other: &Vec<(u32, u32)>, done: &Vec<u32>| {
        let mut ids: Vec<u32> = refused.iter().chain(done).copied().collect();
        ids.extend(other.iter().map(|(id, _)| *id));
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    while started.elapsed() < timeout && answered(&refused, &other_resets, &completed) < ids.len() {
        match read_frame(&mut stream) {
            Ok((SETTINGS, flags, _, _)) if flags & ACK == 0 => {
                stream
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .map_err(|e| e.to_string())?;
            }
            Ok((RST_STREAM, _, id, payload)) if payload.len() == 4 => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                match code {
                    7 => refused.push(id),
                    _ => other_resets.push((id, code)),
                }
            }
            Ok((HEADERS, flags, id, payload)) => {
                statuses.entry(id).or_insert(payload);
                if flags & END_STREAM != 0 {
                    completed.push(id);
                }
            }
            Ok((DATA, flags, id, _)) if flags & END_STREAM != 0 => completed.push(id),
            Ok((GOAWAY, _, _, payload)) if payload.len() >= 8 => {
                goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                // Quiet: the refusals are in. Send the streams still open their message.
                if !bodies_sent {
                    bodies_sent = true;
                    let mut bodies = Vec::new();
                    for id in &ids {
                        let reset = other_resets.iter().any(|(r, _)| r == id);
                        if !refused.contains(id) && !reset && !completed.contains(id) {
                            let message = b"\x00\x00\x00\x00\x07\x0a\x05probe";
                            bodies.extend(frame(DATA, END_STREAM, *id, message));
                        }
                    }
                    stream.write_all(&bodies).map_err(|e| e.to_string())?;
                }
            }
            Err(e) => return Err(format!("reading frames: {e}")),
        }
    }
    // A response's first header block starting with 0x88 is `:status: 200` from HPACK's
    // static table; any other status (431 is not in the table) is counted as rejected.
    let (ok, rejected): (Vec<_>, Vec<_>) = statuses
        .iter()
        .partition(|(_, block)| block.first() == Some(&0x88));
    let completed_ok = ok.iter().filter(|(id, _)| completed.contains(id)).count();
    let rejected: Vec<u32> = rejected.iter().map(|(id, _)| **id).collect();
    println!(
        "{}",
        json!({
            "streams": ids.len(),
            "refused": refused.len(),
            "other_resets": other_resets,
            "completed_ok": completed_ok,
            "rejected": rejected,
            "goaway": goaway,
        })
    );
    Ok(())
}
