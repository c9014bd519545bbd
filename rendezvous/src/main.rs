//! The `natter-rendezvous` command: run a rendezvous server.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use natter_rendezvous::rate_limit::RateLimit;
use natter_rendezvous::{driver, prometheus, Config, Server};

#[derive(Parser)]
#[command(
    version,
    about = "Rendezvous server for natter peers: sees their external addresses, introduces them, relays for pairs that cannot punch, answers STUN"
)]
struct Cli {
    /// Address to listen on; repeat for several. `[::]:PORT` is dual-stack.
    /// Peers register on any of them; STUN answers name another, so a peer
    /// can tell how its NAT maps: give at least two ports, and two IP
    /// addresses when the host has them (`natter netcheck` then tells
    /// every mapping and filtering behaviour apart).
    #[arg(long, default_values = ["0.0.0.0:7777", "0.0.0.0:7778"])]
    bind: Vec<SocketAddr>,
    /// Seconds between the refreshes peers must send.
    #[arg(long, default_value_t = 15)]
    refresh_secs: u64,
    /// A registration expires after this many missed refreshes.
    #[arg(long, default_value_t = 3)]
    missed_refreshes: u32,
    /// Most peers registered at once.
    #[arg(long, default_value_t = 100_000)]
    max_peers: usize,
    /// Sustained datagrams per second accepted from one source address and
    /// port (one peer).
    #[arg(long, default_value_t = 20.0)]
    rate_per_source: f32,
    /// Burst of datagrams accepted from one source address and port.
    #[arg(long, default_value_t = 40.0)]
    burst_per_source: f32,
    /// Sustained datagrams per second accepted from one IP address (IPv6:
    /// /64), all its ports together: many peers may share one address
    /// behind a carrier-grade NAT.
    #[arg(long, default_value_t = 2_000.0)]
    rate_per_ip: f32,
    /// Burst of datagrams accepted from one IP address, all ports together.
    #[arg(long, default_value_t = 4_000.0)]
    burst_per_ip: f32,
    /// Bytes per second relayed for each peer of a pair that could not
    /// punch a direct path (0: do not relay; such pairs then fail to
    /// connect). Peers pace their relayed frames under it.
    #[arg(long, default_value_t = 1 << 20)]
    relay_rate: u32,
    /// Datagrams per second, all sources together, above which the server
    /// is under load and serves only peers that prove their address with a
    /// cookie (one extra round trip for them, no state for spoofed floods).
    #[arg(long, default_value_t = 50_000.0)]
    load_threshold: f32,
    /// Serve Prometheus metrics over HTTP on this address (e.g.
    /// 127.0.0.1:9477); off when not given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Seconds between stats lines in the log (0: none).
    #[arg(long, default_value_t = 60)]
    stats_secs: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print a shell completion script for natter-rendezvous and exit.
    #[arg(long, value_enum, value_name = "SHELL", exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Print the man page (roff) and exit.
    #[arg(long, exclusive = true)]
    man: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(shell) = cli.completions {
        // Into a buffer first: clap_complete panics when its writer fails.
        let mut script = Vec::new();
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "natter-rendezvous", &mut script);
        std::io::Write::write_all(&mut std::io::stdout(), &script)
            .context("cannot write the completion script")?;
        return Ok(());
    }
    if cli.man {
        clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .context("cannot write the man page")?;
        return Ok(());
    }
    init_logging(cli.log_format);
    let config = Config {
        refresh_interval: Duration::from_secs(cli.refresh_secs.max(1)),
        missed_refreshes: cli.missed_refreshes.max(1),
        max_peers: cli.max_peers,
        rate_limit: RateLimit {
            per_second: cli.rate_per_source,
            burst: cli.burst_per_source.max(1.0),
            max_sources: 65_536,
        },
        address_rate_limit: RateLimit {
            per_second: cli.rate_per_ip,
            burst: cli.burst_per_ip.max(1.0),
            max_sources: 65_536,
        },
        relay_rate: cli.relay_rate,
        load_threshold: cli.load_threshold.max(1.0),
    };
    let sockets = driver::bind(&cli.bind).context("cannot start the rendezvous")?;
    for socket in &sockets {
        tracing::info!(addr = %socket.local_addr()?, "listening");
    }
    if let Some(addr) = cli.metrics {
        prometheus::install(addr)?;
        tracing::info!(%addr, "serving metrics");
    }
    let stats_every = (cli.stats_secs > 0).then(|| Duration::from_secs(cli.stats_secs));
    driver::run(sockets, Server::new(config), stats_every, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or a log
    // collector they are garbage.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
