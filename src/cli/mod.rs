//! The `natter` commands: argument parsing, logging set-up, and dispatch.

mod chat;
mod chat_screen;
mod contacts;
mod demo;
mod dial;
mod history;
mod netcheck;
mod pipe;
mod progress;
mod receive;
mod report;
mod send;
mod stun;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dial::Dialer;
use natter::identity::{config_dir, Identity};
use natter::session::{Error, Session};
use natter::transfer::Refusal;
use report::Reporter;

#[derive(Parser)]
#[command(
    version,
    about = "Peer-to-peer messenger over UDP hole punching",
    after_help = "One peer runs `natter chat` and gets a code such as 7-crossword-lantern; \
                  the other runs `natter chat 7-crossword-lantern`. A rendezvous \
                  (natter-rendezvous) introduces them, they connect directly, and the \
                  session is end-to-end encrypted with keys only holders of the code can get."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with the other peer: a terminal UI with delivery ticks that
    /// reconnects on its own and queues what you type meanwhile; plain
    /// lines on stdin and stdout when they are not a terminal.
    Chat {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Keep no history: only lines not yet delivered are kept (so they
        /// can go out later), and the conversation's numbering.
        #[arg(long)]
        no_history: bool,
    },
    /// Print the chat history with a contact (or a peer's public key).
    History {
        /// A contact's name, or a peer's public key in hex.
        name: String,
        /// Only lines from then on: 2026-12-04, 2026-12-04T09:30 (UTC), or
        /// a time ago such as 90m, 12h, 7d.
        #[arg(long)]
        since: Option<String>,
    },
    /// Send stdin to the other peer and write what it sends to stdout,
    /// byte-exact. Exits 0 once both directions have ended.
    Pipe(ConnectArgs),
    /// Send a file or a directory: prints a code for `natter receive`.
    /// Exits 0 once the receiver has verified and saved every file.
    Send {
        /// The file or directory to send.
        path: std::path::PathBuf,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Receive what `natter send` offers: shows the offer and asks before
    /// writing. An interrupted transfer resumes when both sides run again
    /// with the same code (or contact).
    Receive {
        /// The code `natter send` printed.
        #[arg(value_name = "CODE", conflicts_with_all = ["code", "to"])]
        positional_code: Option<String>,
        /// Where the files go.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: std::path::PathBuf,
        /// Accept the offer without asking.
        #[arg(long)]
        yes: bool,
        /// Replace files that are there already and differ (asked without
        /// this when not --yes).
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Run a rendezvous and two peers on loopback in this process, connect
    /// them, exchange messages and a 10 MiB stream, and show the timings.
    Demo,
    /// Print this machine's public key fingerprint, to compare by voice.
    Id,
    /// Saved peers you can reach with `--to NAME`, without a code.
    #[command(subcommand)]
    Contacts(contacts::ContactsCommand),
    /// Find out how this host's NAT behaves (mapping, filtering, port
    /// allocation, hairpinning), by asking the rendezvous, and which port
    /// mapping protocols the gateway speaks.
    Netcheck {
        /// Rendezvous server, HOST:PORT.
        #[arg(long, env = "NATTER_RENDEZVOUS")]
        rendezvous: String,
        /// The report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for natter, e.g.
    /// `natter completions bash > /etc/bash_completion.d/natter`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print natter's man page (roff), e.g. `natter man > natter.1`.
    Man,
    /// Ask a STUN server (any natter rendezvous is one) for this machine's
    /// external address, as seen from the server.
    Stun {
        /// STUN server, HOST:PORT.
        server: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

#[derive(Args)]
struct ConnectArgs {
    /// The pairing code the other peer was given, like 7-crossword-lantern.
    /// Without one (and without --to), a new code is made and printed.
    #[arg(value_name = "CODE", conflicts_with_all = ["code", "to"])]
    positional_code: Option<String>,
    #[command(flatten)]
    session: SessionArgs,
}

/// How to reach the other peer, for every command that connects.
#[derive(Args, Clone)]
struct SessionArgs {
    /// The pairing code (the positional CODE where a command has one).
    /// Without one (and without --to), a new code is made and printed.
    #[arg(long, conflicts_with = "to")]
    code: Option<String>,
    /// Connect to a saved contact instead of using a code.
    #[arg(long, value_name = "NAME")]
    to: Option<String>,
    /// Rendezvous server, HOST:PORT.
    #[arg(long, env = "NATTER_RENDEZVOUS")]
    rendezvous: String,
    /// Local address for the peer's one UDP socket. The default, [::]:0,
    /// is one dual-stack socket for IPv4 and IPv6 (IPv4 alone on a host
    /// without IPv6).
    #[arg(long, default_value = "[::]:0")]
    bind: SocketAddr,
    /// Seconds to wait for the other peer to show up.
    #[arg(long, default_value_t = 300)]
    wait_secs: u64,
    /// Milliseconds of punching before giving up on a direct path (and
    /// relaying through the rendezvous, if it offers that).
    #[arg(long, default_value_t = 5000)]
    punch_timeout_ms: u64,
    /// Fail rather than relay through the rendezvous when there is no
    /// direct path (relayed traffic stays end-to-end encrypted either way).
    #[arg(long)]
    no_relay: bool,
    /// Do not ask the gateway for a port mapping (UPnP-IGD, PCP, NAT-PMP);
    /// by default one is asked for, offered to the other peer and deleted
    /// on exit.
    #[arg(long)]
    no_port_mapping: bool,
    /// Status as one JSON object per line on stderr.
    #[arg(long)]
    json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("natter: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exit = runtime.block_on(async {
        match cli.command {
            Command::Chat {
                connect,
                no_history,
            } => {
                chat(
                    connect,
                    chat::Options {
                        history: !no_history,
                    },
                )
                .await
            }
            Command::History { name, since } => {
                report_failure(&Reporter::new(false), history::run(&name, since.as_deref()))
            }
            Command::Pipe(args) => {
                connect_and(args.positional_code, args.session, "pipe", pipe::run).await
            }
            Command::Send { path, session } => {
                let reporter = Reporter::new(session.json);
                match send::gather(&path, &reporter).await {
                    Ok(outgoing) => {
                        connect_and(None, session, "receive", |session, reporter| {
                            send::run(session, reporter, outgoing)
                        })
                        .await
                    }
                    Err(error) => report_failure(&reporter, Err(error)),
                }
            }
            Command::Receive {
                positional_code,
                out,
                yes,
                overwrite,
                session,
            } => {
                let options = receive::Options {
                    out,
                    yes,
                    overwrite,
                };
                connect_and(
                    positional_code,
                    session,
                    "send PATH --code",
                    |session, reporter| receive::run(session, reporter, options),
                )
                .await
            }
            Command::Demo => report_failure(&Reporter::new(false), demo::run().await),
            Command::Id => report_failure(&Reporter::new(false), print_id()),
            Command::Contacts(command) => {
                report_failure(&Reporter::new(false), contacts::run(command))
            }
            Command::Completions { shell } => {
                // Into a buffer first: clap_complete panics when its writer
                // fails (a closed pipe).
                let mut script = Vec::new();
                let mut command = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut command, "natter", &mut script);
                report_failure(
                    &Reporter::new(false),
                    std::io::Write::write_all(&mut std::io::stdout(), &script)
                        .context("cannot write the completion script"),
                )
            }
            Command::Man => report_failure(
                &Reporter::new(false),
                clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                    .render(&mut std::io::stdout())
                    .context("cannot write the man page"),
            ),
            Command::Netcheck { rendezvous, json } => {
                report_failure(&Reporter::new(json), netcheck::run(&rendezvous, json).await)
            }
            Command::Stun { server, timeout_ms } => {
                let result = stun::query(&server, Duration::from_millis(timeout_ms)).await;
                report_failure(
                    &Reporter::new(false),
                    result.map(|mapped| println!("{mapped}")),
                )
            }
        }
    });
    // A read of stdin may still be blocked in a thread of its own (the chat
    // ended from the other side): do not wait for it.
    runtime.shutdown_background();
    exit
}

/// The terminal UI when stdin and stdout are terminals (and not `--json`),
/// else line mode.
async fn chat(args: ConnectArgs, options: chat::Options) -> ExitCode {
    use std::io::IsTerminal;
    let interactive =
        std::io::stdin().is_terminal() && std::io::stdout().is_terminal() && !args.session.json;
    if !interactive {
        return connect_and(
            args.positional_code,
            args.session,
            "chat",
            move |session, reporter| chat::line_mode(session, reporter, options),
        )
        .await;
    }
    let reporter = Reporter::new(false);
    let result = async {
        let dialer = Dialer::new(args.positional_code, args.session, "chat")?;
        chat_screen::run(dialer, options).await
    };
    match result.await {
        Ok(report) => {
            if let Some(report) = report {
                reporter.hint(&report);
            }
            ExitCode::SUCCESS
        }
        Err(error) => report_failure(&reporter, Err(error)),
    }
}

/// Connects as `args` say (with `code` if the command took one as an
/// argument), then hands the session to `run`. `peer_command`: what the
/// other side runs with a code made up here.
async fn connect_and<F, Fut>(
    code: Option<String>,
    args: SessionArgs,
    peer_command: &'static str,
    run: F,
) -> ExitCode
where
    F: FnOnce(Session, Reporter) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let reporter = Reporter::new(args.json);
    let connected = async {
        let mut dialer = Dialer::new(code, args, peer_command)?;
        dialer.dial(&reporter).await
    };
    match connected.await {
        Ok(session) => report_failure(&reporter, run(session, reporter.clone()).await),
        Err(error) => report_failure(&reporter, Err(error)),
    }
}

fn print_id() -> anyhow::Result<()> {
    let identity = Identity::load_or_create(&config_dir()?)?;
    let key = identity.public_key();
    println!("fingerprint: {}", key.fingerprint());
    println!("public key:  {}", key.to_hex());
    Ok(())
}

fn report_failure(reporter: &Reporter, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let kind = if let Some(refusal) = error.downcast_ref::<Refusal>() {
                refusal.kind.as_str()
            } else {
                error.downcast_ref::<Error>().map_or("error", error_kind)
            };
            reporter.error(kind, &format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Connect(connect) => connect.kind(),
        Error::Resolve { .. } | Error::NoRendezvous => "bad_rendezvous",
        Error::NoCode | Error::BadCode(_) => "bad_code",
        Error::TooLarge { .. } => "too_large",
        Error::Closed(_) => "closed",
        Error::Io(_) => "io",
    }
}

/// Logs go to stderr only: stdout carries user data in pipe mode. Colour
/// codes only when stderr is a terminal.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
