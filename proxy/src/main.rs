//! shunt: an eBPF-accelerated transparent interception proxy for Kubernetes.
//!
//! See ARCHITECTURE.md for the data path and how the modules fit together.

mod admin;
mod bpf;
mod cli;
mod config;
mod ctl;
mod daemon;
mod discovery;
mod fault;
mod http2;
mod inpod;
mod k8s;
mod net;
mod proxy;
mod route;
mod state;
mod workers;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // Before the runtime starts any thread: the namespace every thread returns to after
    // opening a socket inside a pod.
    if let Err(e) = inpod::init_host_netns() {
        eprintln!("error: reading this process's network namespace: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // The daemon's connections run on their own worker threads (`workers.rs`); this runtime
    // has only the control plane and the CLI's requests, which one thread serves.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config, kubernetes } => daemon::run(&config, kubernetes).await,
            Command::Crd => k8s::print_crd(),
            command => ctl::run(command, &cli.admin_socket, cli.output).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `SHUNT_LOG` takes an `EnvFilter` directive (e.g. `debug`, `shunt=debug,shunt_ebpf=trace`).
/// Logs go to stderr, so `-o json` output on stdout stays machine-readable.
fn init_tracing() {
    let filter = EnvFilter::try_from_env("SHUNT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
