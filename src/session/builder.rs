//! Building and connecting a peer: the socket (dual-stack by default), the
//! rendezvous's address, the link, and the driver task that runs it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use natter_wire::RoomCode;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::driver;
use super::port_mapping::PortMapping;
use super::stream::{SessionReceiver, SessionSender};
use super::{Error, PathInfo, Progress, Session};
use crate::candidates::host_candidates;
use crate::code::PairingCode;
use crate::contacts::meeting_room;
use crate::error::CloseReason;
use crate::handshake::Trust;
use crate::identity::{Identity, PublicKey};
use crate::link::{Link, LinkConfig};
use crate::udp::Socket;

/// How the two peers find and recognise each other.
#[derive(Debug, Clone)]
enum Meeting {
    Code(PairingCode),
    Contact(PublicKey),
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
            port_mapping: true,
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
    port_mapping: bool,
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

    /// Whether to ask the gateway for a port mapping (UPnP-IGD, PCP or
    /// NAT-PMP) and offer it to the other peer; on by default, but never
    /// for a rendezvous on loopback (a session on this machine).
    pub fn port_mapping(mut self, on: bool) -> Self {
        self.port_mapping = on;
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
        let port_mapping = if self.port_mapping && !server.ip().is_loopback() {
            PortMapping::start(local.port())
        } else {
            None
        };
        let (commands, incoming, connected, task) = driver::spawn(
            Socket::new(socket)?,
            local,
            link,
            port_mapping,
            self.progress,
        );
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
            sender: SessionSender::new(commands, max_message),
            receiver: SessionReceiver::new(incoming, task),
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
        Ok(Ok(())) => Error::Closed(CloseReason::Ended),
        Err(join) => Error::Io(io::Error::other(join)),
    }
}
