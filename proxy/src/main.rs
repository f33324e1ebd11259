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
mod logging;
mod net;
mod proxy;
mod route;
mod state;
mod telemetry;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init();
    // Before the runtime starts any thread: the namespace every thread returns to after
    // opening a socket inside a pod.
    if let Err(e) = inpod::init_host_netns() {
        eprintln!("error: reading this process's network namespace: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            Command::Run { config } => daemon::run(&config).await,
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
