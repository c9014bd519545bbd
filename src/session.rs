//! The tokio shell around [`Link`]: one task owns the UDP socket, the timer
//! and the link; a [`Session`] handle talks to it through channels.
//!
//! Messages on the session end with a one-byte tag so a byte stream can end
//! while the other direction goes on (a half-close, as TCP's FIN): data then
//! `0`, or `1` alone for "no more data from me". (At the end, not the start,
//! so removing it never moves the data.)
//!
//! Besides message-wise `send`/`recv`, the halves are tokio `AsyncWrite` and
//! `AsyncRead` byte streams: shutting the writer down sends the end of the
//! stream and completes once the peer has everything; the reader reports
//! end-of-file at the peer's end of stream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use natter_wire::RoomCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::PollSender;

use crate::candidates::host_candidates;
use crate::code::PairingCode;
use crate::contacts::meeting_room;
use crate::error::ConnectError;
use crate::handshake::Trust;
use crate::identity::{Identity, PublicKey};
use crate::link::{Link, LinkConfig, LinkEvent};
use crate::paths::MoveReason;
use crate::punch::{CandidateKind, CandidateReport, Path};
use crate::reliable::{MessageId, SendError};
use crate::seal::DataCipher;
use crate::udp::{Sent, Socket};

const TAG_DATA: u8 = 0;
const TAG_END: u8 = 1;
/// Messages delivered but not yet read by the application. Past this the
/// driver stops taking messages from the channel, whose receive window then
/// holds the sender back.
const INCOMING_QUEUE: usize = 64;
/// How often the host's own addresses are looked at again: a peer whose
/// address changed (a new network, an interface down and up) tells the
/// rendezvous within this, and through it the other peer.
const REGATHER_INTERVAL: Duration = Duration::from_secs(3);
/// Largest message one `poll_write` makes of a byte stream.
const WRITE_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot resolve rendezvous address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("no rendezvous address given (--rendezvous or NATTER_RENDEZVOUS)")]
    NoRendezvous,
    #[error("no pairing code or contact given")]
    NoCode,
    #[error(transparent)]
    BadCode(#[from] crate::code::MalformedCode),
    #[error("message of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("session closed: {0}")]
    Closed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a peer reports while it connects, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Registered {
        reflexive: SocketAddr,
    },
    Introduced {
        candidates: Vec<(SocketAddr, CandidateKind)>,
    },
    /// Punching found no direct path (what happened on each candidate);
    /// the session goes through the rendezvous's relay.
    Relaying {
        reports: Vec<CandidateReport>,
    },
    /// After connecting: the session moved to another path.
    PathChanged {
        path: Path,
        reason: MoveReason,
    },
}

/// How the session's path was found, and who is at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathInfo {
    pub path: Path,
    pub local: SocketAddr,
    pub elapsed: Duration,
    /// The other peer's long-term key, proven by the handshake.
    pub remote_key: PublicKey,
    /// What seals the data frames.
    pub cipher: DataCipher,
}

/// How the two peers find and recognise each other.
#[derive(Debug, Clone)]
enum Meeting {
    Code(PairingCode),
    Contact(PublicKey),
}

/// Something the other peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Data(Vec<u8>),
    /// The other peer will send no more data.
    End,
}

/// Builds and connects a peer.
pub struct Peer;

impl Peer {
    pub fn builder() -> PeerBuilder {
        PeerBuilder {
            rendezvous: None,
            meeting: None,
            identity: None,
            bind: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            config: LinkConfig::default(),
            progress: None,
        }
    }
}

pub struct PeerBuilder {
    rendezvous: Option<String>,
    meeting: Option<Meeting>,
    identity: Option<Identity>,
    bind: SocketAddr,
    config: LinkConfig,
    progress: Option<mpsc::UnboundedSender<Progress>>,
}

impl PeerBuilder {
    /// The rendezvous server, `HOST:PORT`.
    pub fn rendezvous(mut self, addr: impl Into<String>) -> Self {
        self.rendezvous = Some(addr.into());
        self
    }

    /// Meet the peer that uses the same pairing code. The rendezvous sees
    /// only the code's nameplate; the words key the session.
    pub fn code(mut self, code: PairingCode) -> Self {
        self.meeting = Some(Meeting::Code(code));
        self
    }

    /// Meet a saved contact: it must prove it holds `key`.
    pub fn contact(mut self, key: PublicKey) -> Self {
        self.meeting = Some(Meeting::Contact(key));
        self
    }

    /// This peer's long-term key (default: a fresh one for this session).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Local address of the one socket the peer uses (default `[::]:0`:
    /// IPv4 and IPv6 on one dual-stack socket, or IPv4 alone where the host
    /// has no IPv6).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    pub fn config(mut self, config: LinkConfig) -> Self {
        self.config = config;
        self
    }

    /// Where to report registration and introduction while connecting, and
    /// path changes afterwards.
    pub fn progress(mut self, progress: mpsc::UnboundedSender<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Registers, waits for the other peer, punches, and returns the session
    /// on the path that opened.
    pub async fn connect(self) -> Result<Session, Error> {
        let identity = self.identity.unwrap_or_else(Identity::generate);
        let (room, trust) = match self.meeting.ok_or(Error::NoCode)? {
            Meeting::Code(code) => (code.room(), Trust::Code(code.password())),
            Meeting::Contact(key) => (
                meeting_room(&identity.public_key(), &key),
                Trust::Pinned(*key.as_bytes()),
            ),
        };
        let room = RoomCode::new(room).expect("rooms are derived within the size limit");
        let server_name = self.rendezvous.ok_or(Error::NoRendezvous)?;
        let socket = bind_socket(self.bind)?;
        let local = socket.local_addr()?;
        let server = resolve(&server_name, local).await?;
        let hosts = host_candidates(local);
        let max_message = self.config.channel.max_message_size;
        let link = Link::new(
            Instant::now().into_std(),
            self.config,
            server,
            room,
            hosts,
            trust,
            identity.secret_bytes(),
            rand::random(),
        );
        let (commands, command_rx) = mpsc::channel(16);
        let (incoming_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        let (connected_tx, connected) = oneshot::channel();
        let driver = Driver {
            socket: Socket::new(socket)?,
            local,
            commands: command_rx,
            incoming: incoming_tx,
            state: DriverState {
                link,
                progress: self.progress,
                connected: Some(connected_tx),
                acks: HashMap::new(),
            },
        };
        let task = tokio::spawn(driver.run());
        let (path, elapsed, remote_key, cipher) = match connected.await {
            Ok(result) => result?,
            Err(_) => return Err(task_failure(task).await),
        };
        Ok(Session {
            path: PathInfo {
                path,
                local,
                elapsed,
                remote_key: PublicKey::from_bytes(remote_key),
                cipher,
            },
            sender: SessionSender {
                commands: PollSender::new(commands),
                max_message,
                finishing: None,
            },
            receiver: SessionReceiver {
                incoming,
                task: Some(task),
                closed: None,
                unread: Vec::new(),
                read_offset: 0,
                ended: false,
            },
        })
    }
}

/// Binds the peer's one socket. An IPv6 wildcard address is bound
/// dual-stack (`IPV6_V6ONLY` off): one socket, one port and one NAT mapping
/// serve both families, IPv4 addresses appearing as IPv4-mapped IPv6 ones
/// (the socket layer turns them back and forth). Where the host has no IPv6
/// at all, the IPv4 wildcard with the same port is bound instead.
fn bind_socket(bind: SocketAddr) -> io::Result<UdpSocket> {
    let socket = match bind_std(bind) {
        Ok(socket) => socket,
        Err(error) if bind.ip() == Ipv6Addr::UNSPECIFIED => {
            tracing::debug!(%error, "no IPv6 here; binding IPv4 only");
            bind_std(SocketAddr::from((Ipv4Addr::UNSPECIFIED, bind.port())))?
        }
        Err(error) => return Err(error),
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

fn bind_std(bind: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if bind.is_ipv6() {
        socket.set_only_v6(!bind.ip().is_unspecified())?;
    }
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

/// The rendezvous's address, of a family the socket at `local` can reach:
/// either for a dual-stack socket, IPv4 first (its reflexive address is
/// what a NAT'd peer needs to learn), then IPv6; an address the host has no
/// route to is passed over, so an IPv6-only host uses the server's IPv6
/// address even when the name has an IPv4 one too.
async fn resolve(name: &str, local: SocketAddr) -> Result<SocketAddr, Error> {
    let resolve_error = |reason: String| Error::Resolve {
        addr: name.to_string(),
        reason,
    };
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(name)
        .await
        .map_err(|e| resolve_error(e.to_string()))?
        .map(|addr| SocketAddr::new(addr.ip().to_canonical(), addr.port()))
        .collect();
    let dual_stack = local.ip() == Ipv6Addr::UNSPECIFIED;
    let usable = |addr: &SocketAddr| dual_stack || addr.is_ipv4() == local.is_ipv4();
    let Some(&first) = addrs.iter().find(|a| usable(a)) else {
        return Err(resolve_error(match addrs.first() {
            Some(other) => format!("only {other} found, of another address family than {local}"),
            None => "no addresses found".into(),
        }));
    };
    addrs.retain(usable);
    addrs.sort_by_key(|addr| addr.is_ipv6());
    Ok(addrs.into_iter().find(routable).unwrap_or(first))
}

/// Whether this host has a route to `addr` (a UDP connect sends nothing).
fn routable(addr: &SocketAddr) -> bool {
    let unspecified: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    std::net::UdpSocket::bind((unspecified, 0)).is_ok_and(|probe| probe.connect(addr).is_ok())
}

async fn task_failure(task: JoinHandle<io::Result<()>>) -> Error {
    match task.await {
        Ok(Err(error)) => Error::Io(error),
        Ok(Ok(())) => Error::Closed("the peer stopped before connecting".into()),
        Err(join) => Error::Io(io::Error::other(join)),
    }
}

enum Command {
    Send {
        message: Vec<u8>,
        acked: Option<oneshot::Sender<()>>,
    },
    Close,
}

enum Delivery {
    Message(Vec<u8>),
    Closed(String),
}

/// A connected session with the other peer. [`Session::split`] gives a
/// sending and a receiving half for use from two tasks.
pub struct Session {
    path: PathInfo,
    sender: SessionSender,
    receiver: SessionReceiver,
}

impl Session {
    pub fn path(&self) -> PathInfo {
        self.path
    }

    pub async fn send(&self, data: &[u8]) -> Result<(), Error> {
        self.sender.send(data).await
    }

    pub async fn finish(&self) -> Result<(), Error> {
        self.sender.finish().await
    }

    pub async fn recv(&mut self) -> Result<Received, Error> {
        self.receiver.recv().await
    }

    /// Closes gracefully: what was sent is delivered first. Returns the
    /// reason the session ended.
    pub async fn close(self) -> Result<String, Error> {
        self.sender.close().await;
        self.receiver.closed().await
    }

    pub fn split(self) -> (SessionSender, SessionReceiver) {
        (self.sender, self.receiver)
    }
}

/// The sending half of a [`Session`].
pub struct SessionSender {
    commands: PollSender<Command>,
    max_message: usize,
    /// Set once `poll_shutdown` sent the end of the stream.
    finishing: Option<oneshot::Receiver<()>>,
}

impl Clone for SessionSender {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            max_message: self.max_message,
            finishing: None,
        }
    }
}

impl SessionSender {
    /// Queues `data` as one message; waits while the channel's send buffer
    /// is full.
    pub async fn send(&self, data: &[u8]) -> Result<(), Error> {
        if data.len() + 1 > self.max_message {
            return Err(Error::TooLarge {
                len: data.len(),
                max: self.max_message - 1,
            });
        }
        self.command(Command::Send {
            message: tagged(data, TAG_DATA),
            acked: None,
        })
        .await
    }

    /// Tells the other peer no more data follows, and waits until it has
    /// received everything sent before.
    pub async fn finish(&self) -> Result<(), Error> {
        let (acked, done) = oneshot::channel();
        self.command(Command::Send {
            message: vec![TAG_END],
            acked: Some(acked),
        })
        .await?;
        done.await.map_err(|_| Error::Closed(UNCONFIRMED.into()))
    }

    /// Asks for a graceful close; the receiving half reports when it is done.
    pub async fn close(&self) {
        let _ = self.command(Command::Close).await;
    }

    async fn command(&self, command: Command) -> Result<(), Error> {
        let closed = || Error::Closed("the session ended".into());
        let commands = self.commands.get_ref().ok_or_else(closed)?;
        commands.send(command).await.map_err(|_| closed())
    }

    fn reserve(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.commands
            .poll_reserve(cx)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))
    }
}

const UNCONFIRMED: &str = "the session ended before the peer confirmed";

fn tagged(data: &[u8], tag: u8) -> Vec<u8> {
    let mut message = Vec::with_capacity(data.len() + 1);
    message.extend_from_slice(data);
    message.push(tag);
    message
}

impl AsyncWrite for SessionSender {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.reserve(cx))?;
        let len = buf.len().min(WRITE_CHUNK);
        let message = tagged(&buf[..len], TAG_DATA);
        this.commands
            .send_item(Command::Send {
                message,
                acked: None,
            })
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))?;
        Poll::Ready(Ok(len))
    }

    /// Messages are handed to the session in order as they are written;
    /// there is nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends the end of the stream and completes once the peer has received
    /// everything written.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.finishing.is_none() {
            ready!(this.reserve(cx))?;
            let (acked, done) = oneshot::channel();
            this.commands
                .send_item(Command::Send {
                    message: vec![TAG_END],
                    acked: Some(acked),
                })
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))?;
            this.finishing = Some(done);
        }
        let done = this.finishing.as_mut().expect("set above");
        Pin::new(done)
            .poll(cx)
            .map(|acked| acked.map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, UNCONFIRMED)))
    }
}

/// The receiving half of a [`Session`]. Use either `recv` or the
/// `AsyncRead` stream, not both.
pub struct SessionReceiver {
    incoming: mpsc::Receiver<Delivery>,
    task: Option<JoinHandle<io::Result<()>>>,
    closed: Option<String>,
    /// Data of the current message not yet read through `AsyncRead`.
    unread: Vec<u8>,
    read_offset: usize,
    ended: bool,
}

/// One delivery, told apart by its tag.
enum Incoming {
    Received(Received),
    Closed(String),
}

fn classify(delivery: Option<Delivery>) -> Incoming {
    match delivery {
        Some(Delivery::Message(mut message)) => match message.pop() {
            Some(TAG_DATA) => Incoming::Received(Received::Data(message)),
            Some(TAG_END) if message.is_empty() => Incoming::Received(Received::End),
            _ => Incoming::Closed("the peer sent a message natter does not know".into()),
        },
        Some(Delivery::Closed(reason)) => Incoming::Closed(reason),
        None => Incoming::Closed("the session's task stopped".into()),
    }
}

impl SessionReceiver {
    /// The next thing the other peer sent. After the session closed, every
    /// call returns `Error::Closed` with the reason.
    pub async fn recv(&mut self) -> Result<Received, Error> {
        if let Some(reason) = &self.closed {
            return Err(Error::Closed(reason.clone()));
        }
        let reason = match classify(self.incoming.recv().await) {
            Incoming::Received(received) => return Ok(received),
            Incoming::Closed(reason) => reason,
        };
        if let Some(task) = self.task.take() {
            task.await.map_err(io::Error::other)??;
        }
        self.closed = Some(reason.clone());
        Err(Error::Closed(reason))
    }

    /// Reads (and drops) until the session has closed; returns why.
    pub async fn closed(mut self) -> Result<String, Error> {
        loop {
            match self.recv().await {
                Ok(_) => continue,
                Err(Error::Closed(reason)) => return Ok(reason),
                Err(other) => return Err(other),
            }
        }
    }
}

impl AsyncRead for SessionReceiver {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_offset < this.unread.len() {
                let len = buf.remaining().min(this.unread.len() - this.read_offset);
                buf.put_slice(&this.unread[this.read_offset..this.read_offset + len]);
                this.read_offset += len;
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = &this.closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    reason.clone(),
                )));
            }
            match classify(ready!(this.incoming.poll_recv(cx))) {
                Incoming::Received(Received::Data(data)) => {
                    this.unread = data;
                    this.read_offset = 0;
                }
                Incoming::Received(Received::End) => this.ended = true,
                Incoming::Closed(reason) => this.closed = Some(reason),
            }
        }
    }
}

/// The task behind a [`Session`]: the socket, the channels to the handles,
/// and the link.
struct Driver {
    socket: Socket,
    /// The socket's address, for gathering host candidates again.
    local: SocketAddr,
    commands: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<Delivery>,
    state: DriverState,
}

/// How a link ended.
enum Ending {
    Closed(String),
    Failed(ConnectError),
}

/// The path, the time it took, the other peer's proven key and the data
/// cipher; or why not.
type ConnectOutcome = Result<(Path, Duration, [u8; 32], DataCipher), ConnectError>;

struct DriverState {
    link: Link,
    progress: Option<mpsc::UnboundedSender<Progress>>,
    connected: Option<oneshot::Sender<ConnectOutcome>>,
    acks: HashMap<MessageId, oneshot::Sender<()>>,
}

impl Driver {
    async fn run(self) -> io::Result<()> {
        let Driver {
            mut socket,
            local,
            mut commands,
            incoming,
            mut state,
        } = self;
        let mut regather = tokio::time::interval(REGATHER_INTERVAL);
        regather.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A message the application has no room for yet, and a send the
        // channel had no room for yet: both hold their queue back.
        let mut undelivered: Option<Vec<u8>> = None;
        let mut unsent: Option<(Vec<u8>, Option<oneshot::Sender<()>>)> = None;
        let mut commands_open = true;
        loop {
            // Each round reads what is waiting before it sends a bounded
            // amount: ACKs then open the window promptly instead of piling
            // up (and overflowing) in the socket behind a whole window of
            // sends.
            socket.receive(|from, datagram| {
                state
                    .link
                    .handle_datagram(Instant::now().into_std(), from, datagram)
            });
            // After the read, whose ACKs may have made room for it.
            if let Some((message, acked)) = unsent.take() {
                unsent = state.try_send(message, acked);
            }
            // Events before sending: taking messages frees flow-control
            // credit, which the send then advertises.
            if undelivered.is_none() {
                if let Some(ending) = state.handle_events(&incoming, &mut undelivered) {
                    // Last words (a Leave, a Reject) go out before the
                    // application hears of the end: a process that exits at
                    // once must not swallow them.
                    socket
                        .send_all(|| state.link.poll_transmit(Instant::now().into_std()))
                        .await;
                    let reason = state.report_ending(ending);
                    let _ = incoming.send(Delivery::Closed(reason)).await;
                    return Ok(());
                }
            }
            let sent = socket.send(|| state.link.poll_transmit(Instant::now().into_std()));
            let timeout = state.link.poll_timeout().map(Instant::from_std);
            tokio::select! {
                // The next round reads.
                ready = socket.readable() => ready?,
                ready = socket.writable(), if sent == Sent::Blocked => ready?,
                // More to send: go round again, but let other tasks run
                // once this one has used its share.
                () = tokio::task::coop::consume_budget(), if sent == Sent::More => {}
                _ = sleep_until(timeout) => state.link.handle_timeout(Instant::now().into_std()),
                _ = regather.tick() => {
                    let hosts = host_candidates(local);
                    state.link.set_host_candidates(Instant::now().into_std(), hosts);
                }
                command = commands.recv(), if unsent.is_none() && commands_open => match command {
                    Some(Command::Send { message, acked }) => unsent = state.try_send(message, acked),
                    Some(Command::Close) => state.link.close(),
                    None => {
                        // Every handle was dropped: close gracefully.
                        commands_open = false;
                        state.link.close();
                    }
                },
                permit = incoming.reserve(), if undelivered.is_some() => match permit {
                    Ok(permit) => permit.send(Delivery::Message(undelivered.take().expect("checked"))),
                    Err(_) => undelivered = None,
                },
            }
        }
    }
}

impl DriverState {
    fn try_send(
        &mut self,
        message: Vec<u8>,
        acked: Option<oneshot::Sender<()>>,
    ) -> Option<(Vec<u8>, Option<oneshot::Sender<()>>)> {
        match self.link.send(message.clone()) {
            Ok(id) => {
                if let Some(acked) = acked {
                    self.acks.insert(id, acked);
                }
                None
            }
            Err(SendError::WouldBlock) => Some((message, acked)),
            // Closing: the caller learns from the dropped ack or the
            // session's close reason. Sizes are checked by the sender.
            Err(error) => {
                tracing::debug!(%error, "message not sent");
                None
            }
        }
    }

    /// Handles link events until one cannot be delivered yet; returns how
    /// the link ended when it is done.
    fn handle_events(
        &mut self,
        incoming: &mpsc::Sender<Delivery>,
        undelivered: &mut Option<Vec<u8>>,
    ) -> Option<Ending> {
        while let Some(event) = self.link.poll_event() {
            match event {
                LinkEvent::Registered { reflexive } => {
                    self.report(Progress::Registered { reflexive })
                }
                LinkEvent::Introduced { candidates, .. } => {
                    self.report(Progress::Introduced { candidates })
                }
                LinkEvent::Relaying { reports } => self.report(Progress::Relaying { reports }),
                LinkEvent::PathChanged { path, reason } => {
                    self.report(Progress::PathChanged { path, reason })
                }
                LinkEvent::Connected {
                    path,
                    elapsed,
                    remote_key,
                    cipher,
                } => {
                    if let Some(connected) = self.connected.take() {
                        let _ = connected.send(Ok((path, elapsed, remote_key, cipher)));
                    }
                }
                LinkEvent::Message(message) => {
                    // Otherwise delivered, or the application stopped listening.
                    if let Err(mpsc::error::TrySendError::Full(Delivery::Message(message))) =
                        incoming.try_send(Delivery::Message(message))
                    {
                        *undelivered = Some(message);
                        return None;
                    }
                }
                LinkEvent::Acknowledged(id) => {
                    if let Some(acked) = self.acks.remove(&id) {
                        let _ = acked.send(());
                    }
                }
                LinkEvent::Closed { reason } => return Some(Ending::Closed(reason)),
                LinkEvent::Failed(error) => return Some(Ending::Failed(error)),
            }
        }
        None
    }

    /// Tells a caller still waiting in `connect` why it failed; returns the
    /// reason for the receiving half.
    fn report_ending(&mut self, ending: Ending) -> String {
        match ending {
            Ending::Closed(reason) => reason,
            Ending::Failed(error) => {
                let reason = error.to_string();
                if let Some(connected) = self.connected.take() {
                    let _ = connected.send(Err(error));
                }
                reason
            }
        }
    }

    fn report(&self, progress: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(progress);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
