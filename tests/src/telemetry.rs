//! Reading what shunt exposes: its HTTP endpoints (`/metrics`, `/live`, `/ready`), the
//! Prometheus text format, promtool's verdict on it, and the access log.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail, ensure};

/// `GET path` over HTTP/1.1 on the node's loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str, accept: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A `/metrics` answer in the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format's sample lines (label values without escaped quotes, as
    /// shunt's are).
    pub fn parse(text: &str) -> anyhow::Result<Scrape> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("no value in {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .with_context(|| format!("unclosed labels in {line:?}"))?;
                    let mut labels = BTreeMap::new();
                    for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                        let (key, value) = pair
                            .split_once("=\"")
                            .with_context(|| format!("bad label in {line:?}"))?;
                        labels.insert(key.to_owned(), value.trim_end_matches('"').to_owned());
                    }
                    (name, labels)
                }
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Ok(Scrape {
            text: text.to_owned(),
            samples,
        })
    }

    /// The sum of `name`'s samples carrying every label in `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

/// Scrapes `/metrics` at `addr` as a plain (non-OpenMetrics) client.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics", "text/plain")?;
    ensure!(status == 200, "GET /metrics answered {status}: {body}");
    Scrape::parse(&body)
}

/// `promtool check metrics` on `text`: parse errors and lint problems both fail.
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (cargo xtask setup installs it)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = crate::sandbox::wait_with_timeout(child, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The `promtool` `cargo xtask setup` unpacks into `target/tools/bin`, else the one in `PATH`.
fn promtool() -> std::path::PathBuf {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/promtool");
    if unpacked.exists() {
        unpacked
    } else {
        "promtool".into()
    }
}

/// Every line of the access log at `path`, each parsed as JSON.
pub fn access_log(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .with_context(|| format!("access-log line is not JSON: {line:?}"))
        })
        .collect()
}
