//! A small real TCP peer for shunt's tests and demo.
//!
//! `serve` answers each connection's first line with the address it saw the client connect
//! from, then echoes until EOF. `connect` prints one JSON line per connection with what the
//! application saw (`getpeername()`, local address) and what the server saw.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use clap::{Parser, Subcommand};
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
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// How this server names itself in replies.
        #[arg(long, default_value = "probe")]
        name: String,
        /// Written to each client on accept, before anything is read (a server-first protocol).
        #[arg(long)]
        banner: Option<String>,
    },
    /// Connect, send a line, print what both ends saw as JSON.
    Connect {
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
    },
}

fn main() {
    let result = match Cli::parse().command {
        Cmd::Serve {
            listen,
            name,
            banner,
        } => serve(listen, name, banner),
        Cmd::Connect {
            to,
            message,
            count,
            hold_ms,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let mut failed = false;
            for _ in 0..count {
                let line = match exchange(to, &message, timeout, Duration::from_millis(hold_ms)) {
                    Ok(seen) => seen,
                    Err(e) => {
                        failed = true;
                        json!({ "to": to.to_string(), "error": e.to_string() })
                    }
                };
                println!("{line}");
            }
            if failed {
                Err("some connections failed".to_string())
            } else {
                Ok(())
            }
        }
    };
    if let Err(e) = result {
        eprintln!("shunt-probe: {e}");
        std::process::exit(1);
    }
}

fn serve(listen: SocketAddr, name: String, banner: Option<String>) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let banner = banner.clone();
        let name = name.clone();
        std::thread::spawn(move || {
            if let Err(e) = answer(stream, &name, banner.as_deref()) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}

fn answer(mut stream: TcpStream, name: &str, banner: Option<&str>) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    if let Some(banner) = banner {
        stream.write_all(format!("{banner}\n").as_bytes())?;
    }
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let echo = first.trim_end();
    stream.write_all(format!("peer={peer} server={name} echo={echo}\n").as_bytes())?;
    // Echo the rest; bytes already buffered by the reader come first.
    std::io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)
}

fn exchange(
    to: SocketAddr,
    message: &str,
    timeout: Duration,
    hold: Duration,
) -> std::io::Result<serde_json::Value> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let peername = stream.peer_addr()?;
    let local = stream.local_addr()?;
    stream.write_all(format!("{message}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
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
    std::thread::sleep(hold);
    Ok(json!({
        "to": to.to_string(),
        "peername": peername.to_string(),
        "local": local.to_string(),
        "server_saw": server_saw,
        "server": server,
        "echo": echo,
        "error": null,
    }))
}
