//! The `shunt` command: the daemon (`shunt run`) and the admin CLI.

#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, error::ErrorKind};

use shunt::{
    cli::{self, Cli, Command},
    config::Config,
    ctl, daemon, inpod, k8s, logging,
};

/// With `--features mimalloc`, mimalloc rather than glibc's malloc: about 15 % less CPU per
/// call on a saturated HTTP/2 path, for about 10 MiB more resident memory under load and
/// 17 MiB more after start-up (README, Benchmarks). glibc's is the default: a per-node
/// daemon's memory counts on every node.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init();
    // Before the runtime starts any thread: the namespace every thread returns to after
    // opening a socket inside a pod.
    if let Err(e) = inpod::init_host_netns() {
        eprintln!("error: reading this process's network namespace: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // Before any thread starts: what it leaves the daemon is what every thread inherits.
    let daemon = match (&cli.command, &cli.config) {
        (Command::Run { kubernetes }, Some(config)) => match daemon::prepare(config, *kubernetes) {
            Ok(prepared) => Some(prepared),
            Err(e) => {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        // `--config` is global, for every command, so clap cannot require it for one.
        (Command::Run { .. }, None) => Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "`shunt run` needs a configuration: --config <FILE>",
            )
            .exit(),
        _ => None,
    };
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
        match (daemon, cli.command) {
            (Some(prepared), _) => daemon::run(prepared).await,
            (None, Command::Crd) => k8s::print_crd(),
            (None, command) => {
                // The daemon and pins the configuration names, unless --admin-socket says
                // otherwise.
                let config = cli.config.as_deref().map(Config::load).transpose()?;
                let socket = cli::admin_socket(cli.admin_socket.as_deref(), config.as_ref());
                ctl::run(command, &socket, config.as_ref(), cli.output).await
            }
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
