//! The `wskeep` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use wskeep::config::{Config, CONFIG_ENV};
use wskeep::shutdown::{Signal, Signals};

mod generate;

#[derive(Parser)]
#[command(name = "wskeep", version = env!("WSKEEP_VERSION"), about = "WebSocket keepalive sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    // Not `global`: probe, bench and demo read no configuration, and their help says so.
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML); falls back to $WSKEEP_CONFIG
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default)
    Run(ConfigArg),
    /// Validate the configuration and print the effective configuration
    Check(ConfigArg),
    /// Side-by-side demonstration: a JSON-ping-only client, directly and through wskeep
    Demo,
    /// Connection-stability probe: how long does a connection live, and how does it end?
    Probe(ProbeArgs),
    /// Load generator and echo upstream for benchmarks
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// ws:// or wss:// URL
    url: String,
    /// Accept any server certificate
    #[arg(long)]
    insecure: bool,
    /// Trust this PEM bundle (the CA that issued the server's certificate) instead of the system roots
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Extra request header, K:V (repeatable)
    #[arg(long = "header", value_name = "K:V")]
    headers: Vec<String>,
    /// Send {"type":"ping"} this often (e.g. 25s)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    json_ping: Option<std::time::Duration>,
    /// Never answer protocol pings
    #[arg(long)]
    no_auto_pong: bool,
    /// Close (1000) after this long; exit non-zero if the connection ends earlier
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Open a resumable session (wskeep's [resume], docs/resume.md): send numbered messages for an
    /// echo upstream, resume whenever the connection drops, and check nothing was lost or doubled;
    /// exit non-zero unless it ran its --duration losslessly
    #[arg(long)]
    resume: bool,
    /// With --resume: send a numbered message this often
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "100ms")]
    send_every: std::time::Duration,
    /// With --resume: drop the TCP connection (no close frame) this long after each connect
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    resume_drop_after: Option<std::time::Duration>,
    /// With --resume: a connection silent this long is dead (drop it and resume)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    dead_after: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// A neutral echo upstream
    Echo {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
    /// Echoed messages per second with a window of messages in flight per connection
    Throughput {
        url: String,
        #[arg(long, default_value_t = 50)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        window: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long)]
        binary: bool,
        /// Offer permessage-deflate and send every message compressed (RSV1; DEFLATE stored
        /// blocks, which any inflater reads); the server must agree
        #[arg(long)]
        compressed: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Round-trip percentiles at a fixed aggregate rate
    Latency {
        url: String,
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Many idle connections: handshake rate, then hold them (answering pings)
    Idle {
        url: String,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: std::time::Duration,
        /// Handshakes in flight at once
        #[arg(long, default_value_t = 64)]
        parallel: usize,
        /// Once all are open, drop them without a close frame and hold on (with
        /// ?wskeep_resume=1: measures wskeep's detached sessions)
        #[arg(long)]
        drop: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// How bench checks a wss:// server's certificate.
#[derive(clap::Args)]
struct TlsArgs {
    /// Accept any server certificate
    #[arg(long)]
    insecure: bool,
    /// Trust this PEM bundle (the CA that issued the server's certificate) instead of the system roots
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Open the WebSockets as streams of HTTP/2 connections (RFC 8441, wss:// only), N per connection
    #[arg(long, value_name = "N")]
    http2: Option<usize>,
}

impl TlsArgs {
    fn common(self, url: String) -> wskeep::tools::bench::Common {
        wskeep::tools::bench::Common::new(url, self.insecure, self.cacert, self.http2)
    }
}

/// `wskeep run --config F`, `wskeep --config F [run]`, else `$WSKEEP_CONFIG`.
fn config_path(command: Option<ConfigArg>, top: ConfigArg) -> Option<PathBuf> {
    command.and_then(|c| c.config).or(top.config).or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
}

fn main() -> ExitCode {
    // `wskeep generate ...` (packaging) stays outside `Cli`, so that neither the help, the man
    // pages nor the completions it writes offer it.
    if std::env::args_os().nth(1).is_some_and(|arg| arg == "generate") {
        return generate::main(Cli::command());
    }
    let cli = Cli::parse();
    match cli.command {
        None => run(config_path(None, cli.config)),
        Some(Command::Run(arg)) => run(config_path(Some(arg), cli.config)),
        Some(Command::Check(arg)) => check(config_path(Some(arg), cli.config)),
        Some(Command::Demo) => demo(),
        Some(Command::Probe(args)) => probe(args),
        Some(Command::Bench(BenchCommand::Echo { listen })) => echo(listen),
        Some(Command::Bench(scenario)) => bench(scenario),
    }
}

fn demo() -> ExitCode {
    match runtime().block_on(wskeep::tools::demo::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(args: ProbeArgs) -> ExitCode {
    let mut headers = Vec::new();
    for h in &args.headers {
        match h.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => headers.push((k.trim().to_string(), v.trim().to_string())),
            _ => {
                eprintln!("error: --header {h:?} must look like Name: value");
                return ExitCode::from(2);
            }
        }
    }
    let options = wskeep::tools::probe::ProbeOptions {
        url: args.url,
        client: wskeep::tools::client::ClientOptions {
            insecure: args.insecure,
            ca_file: args.cacert,
            headers,
            timeout: Some(std::time::Duration::from_secs(10)),
            ..Default::default()
        },
        json_ping: args.json_ping,
        auto_pong: !args.no_auto_pong,
        duration: args.duration,
        progress: true,
    };
    if args.resume {
        let resume = wskeep::tools::probe::resume::ResumeOptions {
            send_every: args.send_every,
            drop_after: args.resume_drop_after,
            dead_after: args.dead_after,
            give_up_after: std::time::Duration::from_secs(60),
        };
        let report = runtime().block_on(wskeep::tools::probe::resume::run(&options.url, &options, &resume));
        return probe_exit(report.map(|r| {
            print!("{r}");
            r.lossless()
        }));
    }
    probe_exit(runtime().block_on(wskeep::tools::probe::run(&options)).map(|r| {
        print!("{r}");
        r.completed
    }))
}

/// Success when the probe ran and its run passed (printed already).
fn probe_exit<E: std::fmt::Display>(passed: Result<bool, E>) -> ExitCode {
    match passed {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("probe failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(scenario: BenchCommand) -> ExitCode {
    use wskeep::tools::bench;
    let result = runtime().block_on(async move {
        match scenario {
            BenchCommand::Throughput { url, conns, size, window, duration, binary, compressed, tls } => {
                let message = bench::MessageKind { binary, compressed };
                bench::throughput(&tls.common(url), conns, size, window, duration, message).await
            }
            BenchCommand::Latency { url, conns, rate, duration, size, tls } => {
                bench::latency(&tls.common(url), conns, rate, duration, size).await
            }
            BenchCommand::Idle { url, conns, hold, parallel, drop, tls } => {
                raise_fd_limit();
                bench::idle(&tls.common(url), conns, hold, parallel, drop).await
            }
            BenchCommand::Echo { .. } => unreachable!("handled by echo()"),
        }
    });
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn echo(listen: std::net::SocketAddr) -> ExitCode {
    runtime().block_on(async {
        match wskeep::tools::bench::echo::start(listen).await {
            Ok(addr) => {
                println!("echo upstream listening on {addr}");
                std::future::pending::<()>().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match Config::load(path.as_deref()) {
        Ok(config) => {
            for note in &config.listen.derived {
                eprintln!("note: {note}");
            }
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            print!("{}", config.to_toml());
            eprintln!("configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => refused(&e),
    }
}

/// Prints why the configuration was refused, after the variables that were not read (one of
/// them may be the reason).
fn refused(e: &wskeep::config::ConfigError) -> ExitCode {
    for warning in wskeep::config::variable_warnings() {
        eprintln!("warning: {warning}");
    }
    eprint!("{e}");
    ExitCode::FAILURE
}

fn runtime() -> tokio::runtime::Runtime {
    // Building a runtime only fails when the OS refuses threads or an epoll descriptor.
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => return refused(&e),
    };
    wskeep::telemetry::init(&config.log);
    raise_fd_limit();
    for note in &config.listen.derived {
        tracing::info!("{note}");
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    runtime().block_on(async move {
        // First, so that from here on no signal wskeep answers can end it by its default action.
        let mut signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                eprintln!("error: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
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
        let reloader = server.reloader(path);
        tokio::spawn(async move {
            let mut stopping = false;
            loop {
                match signals.recv().await {
                    Signal::Stop(name) if !stopping => {
                        tracing::info!(signal = name, "shutting down");
                        stopping = true;
                        drain.shutdown();
                    }
                    // A second stop signal skips the rest of the drain; the close frames still go out.
                    Signal::Stop(name) => {
                        tracing::info!(signal = name, "second signal: closing every connection now");
                        drain.close_now();
                    }
                    Signal::Reload => {
                        tracing::info!(signal = "SIGHUP", "reloading the configuration");
                        reloader.reload();
                    }
                    Signal::Ignore(name) => tracing::info!(signal = name, "signal ignored"),
                }
            }
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
