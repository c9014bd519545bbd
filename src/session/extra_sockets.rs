//! Port prediction's extra sockets (see `birthday`): opened when the link
//! asks, each with a small task that forwards what it receives into one
//! channel, and closed the moment the link says so (all of them, or all
//! but the one that found the path, which then carries the session).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::udp::Ttl;

/// A datagram one of the extra sockets received.
pub(super) struct Received {
    pub index: u16,
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Datagrams received on extra sockets and not yet handled, all sockets
/// together; past it their tasks wait (and the kernel buffers, then drops).
const QUEUE: usize = 1024;
const RECV_BUFFER: usize = 1500;

struct Extra {
    socket: Arc<UdpSocket>,
    receiver: JoinHandle<()>,
    default_ttl: Ttl,
}

pub(super) struct ExtraSockets {
    sockets: Vec<Option<Extra>>,
    /// Sockets open now: asked on every round of the driver, so counted
    /// rather than found by a scan of the slots.
    open: usize,
    tx: mpsc::Sender<Received>,
    rx: mpsc::Receiver<Received>,
}

impl ExtraSockets {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            sockets: Vec::new(),
            open: 0,
            tx,
            rx,
        }
    }

    /// Sockets open now.
    pub fn any_open(&self) -> bool {
        self.open > 0
    }

    /// Opens up to `count` sockets for sending to `toward`, on the main
    /// socket's address (`local`) with ports of the system's choosing;
    /// returns how many it opened (fewer when the system refuses more).
    pub fn open(&mut self, count: u16, toward: SocketAddr, local: SocketAddr) -> u16 {
        let ip = match (local.ip(), toward) {
            (ip, _) if !ip.is_unspecified() && ip.is_ipv4() == toward.is_ipv4() => ip,
            (_, SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (_, SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        self.close(None);
        for index in 0..count {
            let socket = match std::net::UdpSocket::bind((ip, 0))
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .and_then(UdpSocket::from_std)
            {
                Ok(socket) => Arc::new(socket),
                Err(error) => {
                    tracing::warn!(%error, opened = index, "port prediction: cannot open more sockets");
                    return index;
                }
            };
            let receiver = tokio::spawn(receive(index, Arc::clone(&socket), self.tx.clone()));
            let default_ttl = Ttl::of(&socket, ip.is_ipv6());
            self.open += 1;
            self.sockets.push(Some(Extra {
                socket,
                receiver,
                default_ttl,
            }));
        }
        count
    }

    /// Closes every extra socket but `keep`.
    pub fn close(&mut self, keep: Option<u16>) {
        for (index, slot) in self.sockets.iter_mut().enumerate() {
            if Some(index) != keep.map(usize::from) {
                if let Some(extra) = slot.take() {
                    self.open -= 1;
                    extra.receiver.abort();
                }
            }
        }
        if keep.is_none() {
            self.sockets.clear();
        }
    }

    /// Sends `bytes` to `to` from socket `index`, if it is open, with time
    /// to live `ttl` if given; a full socket loses the datagram, as the
    /// network might.
    pub fn send(&self, index: u16, to: SocketAddr, bytes: &[u8], ttl: Option<u32>) {
        let Some(Some(extra)) = self.sockets.get(usize::from(index)) else {
            return;
        };
        if let Some(ttl) = ttl {
            if let Err(error) = Ttl::set(&extra.socket, to.is_ipv4(), ttl) {
                tracing::debug!(%error, "setting the time to live");
            }
        }
        if let Err(error) = extra.socket.try_send_to(bytes, to) {
            tracing::debug!(%to, %error, "extra socket send");
        }
        if ttl.is_some() {
            if let Err(error) = extra.default_ttl.restore(&extra.socket, to.is_ipv4()) {
                tracing::warn!(%error, "cannot restore the socket's time to live");
            }
        }
    }

    /// The next datagram any extra socket received; never completes while
    /// none is open.
    pub async fn recv(&mut self) -> Received {
        match self.rx.recv().await {
            Some(received) => received,
            // `self.tx` lives as long as `self`.
            None => std::future::pending().await,
        }
    }
}

impl Drop for ExtraSockets {
    fn drop(&mut self) {
        self.close(None);
    }
}

async fn receive(index: u16, socket: Arc<UdpSocket>, tx: mpsc::Sender<Received>) {
    let mut buf = [0u8; RECV_BUFFER];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                let received = Received {
                    index,
                    from,
                    bytes: buf[..len].to_vec(),
                };
                if tx.send(received).await.is_err() {
                    return;
                }
            }
            // ICMP errors of earlier sends: expected while probing.
            Err(error) => tracing::debug!(%error, "extra socket recv"),
        }
    }
}
