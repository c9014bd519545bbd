//! The socket: batched send and receive.
//!
//! Why this exists: with one `sendto` per 1200-byte datagram the session's
//! driver spent a third of its CPU in system calls, and ACKs overflowed the
//! receive buffer while it sent. Here quinn-udp moves many datagrams per
//! system call: consecutive datagrams of one length to one address leave as
//! one GSO send (the kernel cuts the buffer into datagrams), and a receive
//! takes several datagrams at once (`recvmmsg`), each possibly a GRO run of
//! datagrams coalesced by the kernel. Where the platform has neither,
//! quinn-udp sends and receives one datagram per call, as before.
//!
//! The socket knows nothing of the link: the driver hands it a source of
//! transmits and a sink for received datagrams, and decides how to
//! interleave the two.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::link::Transmit;

/// Room for one datagram in a receive slot: an Ethernet payload. natter's
/// own datagrams are at most 1200 bytes.
const MAX_DATAGRAM: usize = 1500;
/// Bytes for receive slots in all. A slot holds a whole GRO run
/// (`gro_segments() * MAX_DATAGRAM`, 96 000 bytes on Linux), so this is a
/// few slots with GRO and `BATCH_SIZE` (32) small ones without.
const RECV_BUFFER: usize = 512 * 1024;
/// Datagrams one [`Socket::receive`] handles before it lets the driver
/// send: a receiving peer's ACKs and flow-control credit must go out too.
const RECV_BUDGET: usize = 256;
/// GSO sends one [`Socket::send`] makes before the driver reads again, so a
/// window's worth of sending cannot leave ACKs waiting in the socket.
const SEND_BATCHES: usize = 4;
/// Largest UDP payload of one send: a GSO buffer is one IPv4 packet to the
/// kernel until it is cut, so it must fit IPv4's 65 535 bytes with the IP and
/// UDP headers. quinn-udp would report a larger one as sent, and drop it.
const MAX_BATCH_BYTES: usize = 65_535 - 20 - 8;
/// Socket buffer sizes asked for. Linux's default receive buffer (208 KiB)
/// holds about three 64 KB GSO runs: a burst overflows it, and every drop
/// costs the sender a congestion-window cut (loopback bench: ~415 MiB/s and
/// ~30 drops a run at the default, ~730 MiB/s and none at 4 MiB). The send
/// buffer gets the same so that a round of `SEND_BATCHES` runs (256 KB)
/// fits on the way to a real NIC. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max` without an error (many distributions
/// leave those at 208 KiB; raise them with sysctl for these speeds).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// What [`Socket::send`] left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The link has nothing more to send.
    Idle,
    /// The socket is full: wait for [`Socket::writable`].
    Blocked,
    /// The send budget ran out; the link may have more.
    More,
}

/// One UDP socket, with quinn-udp's state for batched I/O.
pub struct Socket {
    io: UdpSocket,
    state: UdpSocketState,
    /// Receive slots of `slot_len` bytes, back to back.
    recv_buf: Box<[u8]>,
    slot_len: usize,
    /// The datagrams of the batch being sent, back to back.
    send_buf: Vec<u8>,
    batch: Option<Batch>,
    /// Taken from the link, but not fit to join the batch before it.
    next: Option<Transmit>,
    /// The socket is IPv6 (dual-stack): IPv4 destinations go out as
    /// IPv4-mapped IPv6 addresses.
    ipv6: bool,
    /// The socket's own time to live and hop limit, restored after a
    /// datagram that must die on the way.
    default_ttl: Ttl,
}

/// Where the datagrams in `send_buf` go and how they are cut.
struct Batch {
    to: SocketAddr,
    /// Length of every datagram but the last, which may be shorter.
    segment: usize,
    /// Bytes of `send_buf` already sent.
    sent: usize,
}

impl Socket {
    pub fn new(io: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&io).into())?;
        if let Err(error) = state.set_recv_buffer_size((&io).into(), SOCKET_BUFFER) {
            tracing::debug!(%error, "SO_RCVBUF");
        }
        if let Err(error) = state.set_send_buffer_size((&io).into(), SOCKET_BUFFER) {
            tracing::debug!(%error, "SO_SNDBUF");
        }
        let ipv6 = io.local_addr()?.is_ipv6();
        let default_ttl = Ttl::of(&io, ipv6);
        let slot_len = state.gro_segments() * MAX_DATAGRAM;
        let slots = (RECV_BUFFER / slot_len).clamp(1, BATCH_SIZE);
        Ok(Self {
            io,
            state,
            recv_buf: vec![0; slots * slot_len].into_boxed_slice(),
            slot_len,
            send_buf: Vec::new(),
            batch: None,
            next: None,
            ipv6,
            default_ttl,
        })
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.io.readable().await
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.io.writable().await
    }

    /// Hands each datagram waiting in the socket to `handle`, with its
    /// source (IPv4-mapped addresses made plain IPv4), up to a budget, or
    /// until the end of a batch in which `handle` returned true (something
    /// should be sent first); never waits.
    pub fn receive(&mut self, mut handle: impl FnMut(SocketAddr, &[u8]) -> bool) {
        let mut handled = 0;
        let mut send_first = false;
        let count = self.recv_buf.len() / self.slot_len;
        while handled < RECV_BUDGET && !send_first {
            let mut meta = [RecvMeta::default(); BATCH_SIZE];
            let mut slots = self.recv_buf.chunks_mut(self.slot_len);
            let mut bufs: [IoSliceMut<'_>; BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(slots.next().unwrap_or_default()));
            let received = self.io.try_io(Interest::READABLE, || {
                self.state
                    .recv((&self.io).into(), &mut bufs[..count], &mut meta)
            });
            let received = match received {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors of earlier sends (port unreachable while
                // punching) surface here; they are expected.
                Err(error) => {
                    tracing::debug!(%error, "recv");
                    handled += 1;
                    continue;
                }
            };
            for (meta, buf) in meta.iter().zip(&bufs).take(received) {
                let from = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
                let data = &buf[..meta.len];
                if data.is_empty() {
                    // Not natter's, but the link counts it as such.
                    send_first |= handle(from, data);
                    handled += 1;
                    continue;
                }
                // One datagram, or a GRO run of `stride`-byte datagrams
                // (the last maybe shorter).
                for datagram in data.chunks(meta.stride.max(1)) {
                    send_first |= handle(from, datagram);
                    handled += 1;
                }
            }
        }
    }

    /// Sends what `poll_transmit` gives, in batches, until it has no more,
    /// the socket is full, or the budget is spent; never waits.
    pub fn send(&mut self, mut poll_transmit: impl FnMut() -> Option<Transmit>) -> Sent {
        for _ in 0..SEND_BATCHES {
            if self.batch.is_none() {
                let Some(first) = self.next.take().or_else(&mut poll_transmit) else {
                    return Sent::Idle;
                };
                if let Some(ttl) = first.ttl {
                    self.send_with_ttl(&first, ttl);
                    continue;
                }
                self.fill(first, &mut poll_transmit);
            }
            if self.send_batch().is_err() {
                return Sent::Blocked;
            }
        }
        Sent::More
    }

    /// Sends everything `poll_transmit` gives, waiting for room in the
    /// socket: last words before the driver stops.
    pub async fn send_all(&mut self, mut poll_transmit: impl FnMut() -> Option<Transmit>) {
        loop {
            match self.send(&mut poll_transmit) {
                Sent::Idle => return,
                Sent::More => {}
                Sent::Blocked => {
                    if let Err(error) = self.io.writable().await {
                        tracing::debug!(%error, "writable");
                        return;
                    }
                }
            }
        }
    }

    /// Sends one datagram with its own time to live, then restores the
    /// socket's. A full socket loses it, as the network might.
    fn send_with_ttl(&mut self, transmit: &Transmit, ttl: u32) {
        let destination = destination(self.ipv6, transmit.to);
        let v4 = transmit.to.is_ipv4();
        if let Err(error) = Ttl::set(&self.io, v4, ttl) {
            tracing::debug!(%error, "setting the time to live");
        }
        if let Err(error) = self.io.try_send_to(&transmit.bytes, destination) {
            tracing::debug!(to = %transmit.to, %error, "send");
        }
        if let Err(error) = self.default_ttl.restore(&self.io, v4) {
            tracing::warn!(%error, "cannot restore the socket's time to live");
        }
    }

    /// Takes datagrams from the link into the next batch while they can
    /// join one GSO send: to the same address, none longer than the first,
    /// only the last shorter, and none with a time to live of its own.
    fn fill(&mut self, first: Transmit, poll_transmit: &mut impl FnMut() -> Option<Transmit>) {
        let (to, segment) = (first.to, first.bytes.len());
        let max_segments = self
            .state
            .max_gso_segments()
            .min(MAX_BATCH_BYTES / segment.max(1));
        self.send_buf.clear();
        self.send_buf.extend_from_slice(&first.bytes);
        let mut segments = 1;
        while segments < max_segments {
            let Some(transmit) = poll_transmit() else {
                break;
            };
            let len = transmit.bytes.len();
            // An empty datagram would vanish in the buffer.
            if transmit.to != to || len > segment || len == 0 || transmit.ttl.is_some() {
                self.next = Some(transmit);
                break;
            }
            self.send_buf.extend_from_slice(&transmit.bytes);
            segments += 1;
            if len < segment {
                break;
            }
        }
        self.batch = Some(Batch {
            to,
            segment,
            sent: 0,
        });
    }

    /// Sends the rest of the batch; fails only if the socket is full.
    fn send_batch(&mut self) -> io::Result<()> {
        let Some(batch) = &mut self.batch else {
            return Ok(());
        };
        loop {
            let rest = &self.send_buf[batch.sent..];
            let contents = if self.state.max_gso_segments() > 1 {
                rest
            } else {
                &rest[..rest.len().min(batch.segment)]
            };
            let destination = destination(self.ipv6, batch.to);
            let transmit = quinn_udp::Transmit {
                destination,
                ecn: None,
                contents,
                segment_size: Some(batch.segment),
                src_ip: None,
            };
            // `try_send`, not `send`: `send` logs failures as warnings,
            // but sends that fail while punching are expected.
            let result = self.io.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.io).into(), &transmit)
            });
            match result {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Err(error),
                // The device refused GSO (EIO or EINVAL) and quinn-udp has
                // turned it off for good: send the same datagrams one by one.
                Err(_) if contents.len() > batch.segment && self.state.max_gso_segments() == 1 => {
                    continue
                }
                // Like a datagram lost on the way: the channel resends, the
                // puncher probes again.
                Err(error) => tracing::debug!(to = %batch.to, %error, "send"),
            }
            batch.sent += contents.len();
            if batch.sent >= self.send_buf.len() {
                self.batch = None;
                return Ok(());
            }
        }
    }
}

/// `to` as a socket sends to it: IPv4 as IPv4-mapped IPv6 on a dual-stack
/// (`ipv6`) socket.
fn destination(ipv6: bool, to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(v4) if ipv6 => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        other => other,
    }
}

/// A socket's IPv4 time to live and IPv6 hop limit.
#[derive(Debug, Clone, Copy)]
pub struct Ttl {
    v4: u32,
    v6: u32,
}

impl Ttl {
    /// What `io` uses now (Linux's defaults where it cannot say).
    pub fn of(io: &UdpSocket, ipv6: bool) -> Self {
        let socket = socket2::SockRef::from(io);
        Self {
            v4: socket.ttl_v4().unwrap_or(64),
            v6: if ipv6 {
                socket.unicast_hops_v6().unwrap_or(64)
            } else {
                64
            },
        }
    }

    /// Sets the time to live of `io`'s IPv4 datagrams (IPv4-mapped ones on
    /// a dual-stack socket too) or the hop limit of its IPv6 ones.
    pub fn set(io: &UdpSocket, v4: bool, ttl: u32) -> io::Result<()> {
        let socket = socket2::SockRef::from(io);
        if v4 {
            socket.set_ttl_v4(ttl)
        } else {
            socket.set_unicast_hops_v6(ttl)
        }
    }

    pub fn restore(self, io: &UdpSocket, v4: bool) -> io::Result<()> {
        Self::set(io, v4, if v4 { self.v4 } else { self.v6 })
    }
}
