//! Runs the [`Server`] state machine on tokio UDP sockets.
//!
//! One receive task per bound socket feeds datagrams into a channel; a single
//! task owns the state machine, its timer and all sends. Addresses are made
//! canonical on the way in (a dual-stack socket reports IPv4 peers as
//! `::ffff:a.b.c.d`) and mapped back on the way out.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use natter_wire::MAX_DATAGRAM;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::listeners::Listeners;
use crate::{prometheus, Config, Server, Stats};

/// Receive buffer: larger than any valid datagram, so oversized ones are seen
/// whole and counted as such rather than silently truncated.
const RECV_BUFFER: usize = MAX_DATAGRAM + 300;

/// How often the metrics endpoint's figures are brought up to date.
const METRICS_EVERY: Duration = Duration::from_secs(1);

struct Received {
    at: Instant,
    via: usize,
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// Binds one UDP socket per address. An IPv6 wildcard (`[::]`) is bound
/// dual-stack, so it serves IPv4 peers too.
pub fn bind(addrs: &[SocketAddr]) -> io::Result<Vec<UdpSocket>> {
    addrs
        .iter()
        .map(|&addr| {
            let domain = socket2::Domain::for_address(addr);
            let socket =
                socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
            if addr.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
                socket.set_only_v6(false)?;
            }
            socket.set_nonblocking(true)?;
            socket
                .bind(&addr.into())
                .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
            UdpSocket::from_std(socket.into())
        })
        .collect()
}

/// A server running in the background.
pub struct RunningServer {
    pub local_addrs: Vec<SocketAddr>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<io::Result<Stats>>,
}

impl RunningServer {
    /// Stops the server and returns its final counters.
    pub async fn shutdown(self) -> io::Result<Stats> {
        let _ = self.shutdown.send(());
        self.task.await.map_err(io::Error::other)?
    }
}

/// Binds `addrs` and runs a server on them until [`RunningServer::shutdown`].
pub fn start(addrs: &[SocketAddr], config: Config) -> io::Result<RunningServer> {
    let sockets = bind(addrs)?;
    let local_addrs = sockets
        .iter()
        .map(UdpSocket::local_addr)
        .collect::<io::Result<_>>()?;
    let (shutdown, stop) = oneshot::channel();
    let task = tokio::spawn(run(sockets, Server::new(config), None, async {
        let _ = stop.await;
    }));
    Ok(RunningServer {
        local_addrs,
        shutdown,
        task,
    })
}

/// Serves on `sockets` until `shutdown` completes, logging a stats line every
/// `stats_every` if given. Returns the final counters.
pub async fn run(
    sockets: Vec<UdpSocket>,
    mut server: Server,
    stats_every: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<Stats> {
    let local_addrs = sockets
        .iter()
        .map(UdpSocket::local_addr)
        .collect::<io::Result<_>>()?;
    server.set_listeners(Listeners::new(local_addrs));
    let sockets: Vec<Arc<UdpSocket>> = sockets.into_iter().map(Arc::new).collect();
    let (tx, mut rx) = mpsc::channel::<Received>(4096);
    let receivers: Vec<JoinHandle<()>> = sockets
        .iter()
        .enumerate()
        .map(|(via, socket)| tokio::spawn(receive(via, socket.clone(), tx.clone())))
        .collect();
    drop(tx);
    let mut stats_tick =
        stats_every.map(|every| tokio::time::interval_at(Instant::now() + every, every));
    let mut metrics_tick = tokio::time::interval(METRICS_EVERY);
    tokio::pin!(shutdown);

    let result = loop {
        let timeout = server.poll_timeout().map(Instant::from_std);
        let mut introducing = None;
        tokio::select! {
            received = rx.recv() => {
                let Some(Received { at, via, from, bytes }) = received else {
                    break Err(io::Error::other("all receive sockets failed"));
                };
                let introductions = server.stats().introductions;
                server.handle_datagram(Instant::now().into_std(), via, from, &bytes);
                if server.stats().introductions > introductions {
                    introducing = Some(at);
                }
            }
            _ = sleep_until(timeout) => server.handle_timeout(Instant::now().into_std()),
            _ = tick(&mut stats_tick) => {
                prometheus::publish(&server);
                tracing::info!(peers = server.peers(), rooms = server.rooms(), "stats {}", server.stats());
            }
            _ = metrics_tick.tick() => prometheus::publish(&server),
            _ = &mut shutdown => break Ok(()),
        }
        while let Some(transmit) = server.poll_transmit() {
            let socket = &sockets[transmit.via];
            let to = outgoing_address(socket, transmit.to);
            if let Err(error) = socket.send_to(&transmit.bytes, to).await {
                tracing::debug!(%to, %error, "send failed");
            }
        }
        if let Some(arrived) = introducing {
            prometheus::observe_introduction(arrived.elapsed());
        }
    };
    for receiver in receivers {
        receiver.abort();
    }
    tracing::info!(
        peers = server.peers(),
        rooms = server.rooms(),
        "final stats {}",
        server.stats()
    );
    result.map(|()| server.stats().clone())
}

async fn receive(via: usize, socket: Arc<UdpSocket>, tx: mpsc::Sender<Received>) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                let received = Received {
                    at: Instant::now(),
                    via,
                    from,
                    bytes: buf[..len].to_vec(),
                };
                if tx.send(received).await.is_err() {
                    return;
                }
            }
            // ICMP errors from earlier sends surface here on some systems;
            // they say nothing about this socket's health.
            Err(error) => tracing::debug!(%error, "recv_from failed"),
        }
    }
}

fn outgoing_address(socket: &UdpSocket, to: SocketAddr) -> SocketAddr {
    match (socket.local_addr(), to.ip()) {
        (Ok(SocketAddr::V6(_)), IpAddr::V4(v4)) => {
            SocketAddr::new(v4.to_ipv6_mapped().into(), to.port())
        }
        _ => to,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
