//! The `wskeep` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wskeep::config::{Config, CONFIG_ENV};

#[derive(Parser)]
#[command(name = "wskeep", version, about = "WebSocket keepalive sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML); falls back to $WSKEEP_CONFIG
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default)
    Run,
    /// Validate the configuration and print the effective configuration
    Check,
}

fn config_path(cli: &Cli) -> Option<PathBuf> {
    cli.config.clone().or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::Run) => run(config_path(&cli)),
        Some(Command::Check) => check(config_path(&cli)),
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match Config::load(path.as_deref()) {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            print!("{}", config.to_toml());
            eprintln!("configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // Building a runtime only fails when the OS refuses threads or an epoll descriptor.
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    wskeep::telemetry::init(&config.log);
    raise_fd_limit();
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    runtime().block_on(async move {
        let server = match wskeep::Server::bind(config).await {
            Ok(server) => server,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(addr = %server.local_addr(), admin = %server.admin_addr(), "bound");
        let drain = server.drain();
        tokio::spawn(async move {
            wskeep::shutdown::signal().await;
            drain.shutdown();
            // A second signal skips the rest of the drain; the close frames still go out.
            wskeep::shutdown::signal().await;
            tracing::info!("second signal: closing every connection now");
            drain.close_now();
        });
        server.run().await;
        ExitCode::SUCCESS
    })
}

/// Raises the soft descriptor limit to the hard one: each proxied connection holds two.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "file-descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
    }
}
