//! Command-line interface: `shunt run` starts the daemon; every other command talks to a
//! running daemon through the admin socket.
//!
//! A command given a configuration (`--config`) talks to the daemon that configuration
//! names (`admin.socket`) and cleans the pins it names (`intercept.pin_dir`), so a command
//! meant for one of several daemons on a machine never reaches another.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, DEFAULT_ADMIN_SOCKET};

/// The environment variable naming the admin socket when neither `--admin-socket` nor
/// `--config` does.
pub const ADMIN_SOCKET_ENV: &str = "SHUNT_ADMIN_SOCKET";

#[derive(Debug, Parser)]
#[command(
    name = "shunt",
    version,
    about = "eBPF transparent proxy: per-stream gRPC balancing without sidecars"
)]
pub struct Cli {
    /// The daemon's admin socket; wins over the one --config names. Default: the one
    /// --config names, else $SHUNT_ADMIN_SOCKET, else /run/shunt/admin.sock. Not used by
    /// `run`, which serves the configuration's.
    #[arg(long, global = true, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// YAML configuration file: `run` starts the daemon with it; any other command talks to
    /// the daemon whose admin socket it names, and `uninstall` cleans the pins it names.
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format of inspection commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// The admin socket a command talks to: `--admin-socket` (`flag`), else the one the
/// configuration given with `--config` names, else `$SHUNT_ADMIN_SOCKET`, else the default.
pub fn admin_socket(flag: Option<&Path>, config: Option<&Config>) -> PathBuf {
    choose_admin_socket(flag, config, std::env::var_os(ADMIN_SOCKET_ENV))
}

/// The variable comes after the configuration: one exported in a shell must not send a
/// command meant for the daemon of a given configuration to another one.
fn choose_admin_socket(
    flag: Option<&Path>,
    config: Option<&Config>,
    env: Option<OsString>,
) -> PathBuf {
    if let Some(flag) = flag {
        return flag.to_owned();
    }
    if let Some(config) = config {
        return config.admin.socket.clone();
    }
    match env {
        Some(env) if !env.is_empty() => PathBuf::from(env),
        _ => PathBuf::from(DEFAULT_ADMIN_SOCKET),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (needs --config): load and attach the programs, enroll pods, proxy
    /// their connections.
    Run {
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
    /// The kernel path: destinations connect() sends straight to an endpoint (or leaves
    /// alone) so the proxy never carries their bytes — declared, on an opaque port, or
    /// learned — and those a fault rule keeps on the proxy.
    KernelPath,
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
    /// Whether this kernel runs shunt and which optional features it has, probed by loading
    /// small test programs (needs root; no daemon needed). Fails below the minimum kernel.
    Kernel,
    /// Detach and remove every program, link and map shunt pinned, and stop the daemon if one
    /// runs (with --config: the daemon and the pins that configuration names).
    Uninstall {
        /// Pin directory to clean when no daemon is running (default: the one --config
        /// names, else /sys/fs/bpf/shunt).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_the_configuration_then_the_environment() {
        let config = Config::parse("admin:\n  socket: /tmp/b/admin.sock\n").expect("valid config");
        let flag = Path::new("/tmp/a/admin.sock");
        let env = || Some(OsString::from("/tmp/env/admin.sock"));
        assert_eq!(choose_admin_socket(Some(flag), Some(&config), env()), flag);
        assert_eq!(
            choose_admin_socket(None, Some(&config), env()),
            Path::new("/tmp/b/admin.sock")
        );
        assert_eq!(
            choose_admin_socket(None, None, env()),
            Path::new("/tmp/env/admin.sock")
        );
        assert_eq!(
            choose_admin_socket(None, None, Some(OsString::new())),
            Path::new(DEFAULT_ADMIN_SOCKET)
        );
        assert_eq!(
            choose_admin_socket(None, None, None),
            Path::new(DEFAULT_ADMIN_SOCKET)
        );
    }

    #[test]
    fn config_is_accepted_before_or_after_any_command() {
        for args in [
            &["shunt", "--config", "/c.yaml", "uninstall"][..],
            &["shunt", "uninstall", "-c", "/c.yaml"],
            &["shunt", "status", "--config", "/c.yaml"],
            &["shunt", "run", "--config", "/c.yaml", "--kubernetes"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(
                cli.config.as_deref(),
                Some(Path::new("/c.yaml")),
                "{args:?}"
            );
            assert_eq!(cli.admin_socket, None);
        }
    }
}
