//! Command-line interface: `shunt run` starts the daemon; every other command talks to a
//! running daemon through the admin socket.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_ADMIN_SOCKET;

#[derive(Debug, Parser)]
#[command(
    name = "shunt",
    version,
    about = "eBPF transparent proxy: per-stream gRPC balancing without sidecars"
)]
pub struct Cli {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "SHUNT_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Output format of inspection commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load and attach the programs, enroll pods, proxy their connections.
    Run {
        /// YAML configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Take pods to intercept, Services and fault rules from the Kubernetes API: pods of
        /// this node in namespaces labelled shunt.io/intercept=enabled.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Print the FaultInjection CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Start intercepting a pod's new outbound connections.
    Enroll {
        #[arg(long)]
        name: String,
        /// Its network namespace, e.g. /var/run/netns/client or /proc/<pid>/ns/net.
        #[arg(long)]
        netns: PathBuf,
    },
    /// Stop intercepting a pod (its established connections carry on).
    Unenroll {
        #[arg(long)]
        name: String,
    },
    /// Version, uptime, where the programs are attached, counts.
    Status,
    /// Enrolled pods.
    Pods,
    /// Proxied connections: live ones, or with --closed the most recent closed ones.
    Conns {
        /// Show recently closed connections (verdict, bytes, how they ended) instead.
        #[arg(long)]
        closed: bool,
        /// Only this pod's connections.
        #[arg(long)]
        pod: Option<String>,
        /// Only connections detected as this protocol.
        #[arg(long, value_enum)]
        protocol: Option<Protocol>,
    },
    /// The most recent HTTP/2 streams: path, upstream, status, gRPC status, flags
    /// (DI/FI: fault injected, UF: no upstream, UR/DR: reset upstream/downstream).
    Streams,
    /// Services (virtual address → endpoints): per endpoint whether it is in rotation, its
    /// active and total streams and connections, and failed connects.
    Services,
    /// Re-read the configuration file: Services and detection settings change for new
    /// connections; a configuration with errors is refused and the running one stays.
    Reload,
    /// Fault injection rules: list them, set them from a file, or clear one.
    Faults {
        #[command(subcommand)]
        action: FaultsAction,
    },
    /// Counters of the kernel programs and the proxy.
    Stats,
    /// Show the daemon's log filter, or change it at once (e.g. `debug`,
    /// `info,shunt=debug`); no restart needed.
    LogLevel {
        /// A `tracing` filter; without it, the one in force is shown.
        filter: Option<String>,
    },
    /// The configuration in force, defaults filled in (YAML; JSON with `-o json`).
    Config,
    /// Detach and remove every program, link and map shunt pinned, and stop a running daemon.
    Uninstall {
        /// Pin directory to clean when no daemon is running (default: from --config, else
        /// /sys/fs/bpf/shunt).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Read the pin directory from this configuration.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

/// How a connection is handled, as `shunt conns --protocol` filters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// HTTP/2 (gRPC), terminated and balanced per stream.
    H2,
    /// TLS, passed through.
    Tls,
    /// Anything else, passed through (also server-first, timed-out and skipped detection).
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum FaultsAction {
    /// Rules in force, with how often each fired.
    List,
    /// Add or replace (by name) the rules in a YAML file: one rule or a list.
    Set {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Remove a rule.
    Clear { name: String },
}
