//! A simulated internet for sans-IO peers: two [`Link`]s and the sans-IO
//! rendezvous, each peer behind a simulated NAT of one of the four classic
//! types, in virtual time.
//!
//! The NAT model follows RFC 4787: a mapping is endpoint-independent or
//! endpoint-dependent (symmetric), and inbound filtering is
//! endpoint-independent (full cone), address-dependent (restricted cone) or
//! address-and-port-dependent (port-restricted cone and symmetric). A NAT
//! can lose its mappings (a router reboot, a CGNAT reassignment), the
//! direct paths between the peers can go dark while the rendezvous stays
//! reachable, and an attacker can race copies of the peers' frames from its
//! own address.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natter::handshake::Trust;
use natter::identity::Identity;
use natter::link::{Link, LinkConfig, LinkEvent};
use natter::paths::MoveReason;
use natter::punch::CandidateKind;
use natter::punch::Path;
use natter::seal::DataCipher;
use natter::wire::RoomCode;
use natter_rendezvous::{Config, Server};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatType {
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
}

pub const ALL: [NatType; 4] = [
    NatType::FullCone,
    NatType::AddressRestricted,
    NatType::PortRestricted,
    NatType::Symmetric,
];

pub struct Nat {
    pub kind: NatType,
    pub public_ip: IpAddr,
    /// (internal, destination if endpoint-dependent) -> external port.
    pub mappings: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// external port -> (internal, destinations sent to).
    pub ports: HashMap<u16, (SocketAddr, Vec<SocketAddr>)>,
    pub next_port: u16,
}

impl Nat {
    pub fn new(kind: NatType, public_ip: &str, first_port: u16) -> Self {
        Self {
            kind,
            public_ip: public_ip.parse().unwrap(),
            mappings: HashMap::new(),
            ports: HashMap::new(),
            next_port: first_port,
        }
    }

    pub fn outbound(&mut self, internal: SocketAddr, to: SocketAddr) -> SocketAddr {
        let key = (internal, (self.kind == NatType::Symmetric).then_some(to));
        let port = *self.mappings.entry(key).or_insert_with(|| {
            // Symmetric NATs hand out scattered ports, so guessing the next
            // one does not help.
            self.next_port = self.next_port.wrapping_mul(7).wrapping_add(1009) | 1024;
            self.next_port
        });
        let (_, sent_to) = self.ports.entry(port).or_insert((internal, Vec::new()));
        if !sent_to.contains(&to) {
            sent_to.push(to);
        }
        SocketAddr::new(self.public_ip, port)
    }

    /// Forgets every mapping, as a router that rebooted or a CGNAT that
    /// reassigned its ports; with `new_ip`, the NAT's public address changes
    /// too.
    pub fn rebind(&mut self, new_ip: Option<&str>) {
        self.mappings.clear();
        self.ports.clear();
        if let Some(ip) = new_ip {
            self.public_ip = ip.parse().unwrap();
        }
    }

    pub fn inbound(&self, to_port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let (internal, sent_to) = self.ports.get(&to_port)?;
        let allowed = match self.kind {
            NatType::FullCone => true,
            NatType::AddressRestricted => sent_to.iter().any(|d| d.ip() == from.ip()),
            NatType::PortRestricted | NatType::Symmetric => sent_to.contains(&from),
        };
        allowed.then_some(*internal)
    }
}

pub struct Host {
    pub link: Link,
    pub internal: SocketAddr,
    pub nat: Option<Nat>,
    pub connected: Option<(SocketAddr, CandidateKind, Duration)>,
    pub cipher: Option<DataCipher>,
    pub failed: Option<String>,
    pub closed: Option<(Duration, String)>,
    pub received: Vec<Vec<u8>>,
    /// When each message of `received` arrived.
    pub received_at: Vec<Instant>,
    /// Every move of the session: when, to which path, and why.
    pub path_changes: Vec<(Instant, Path, MoveReason)>,
}

/// A datagram in flight, delivered at `at`.
pub struct Packet {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

pub struct World {
    pub now: Instant,
    pub start: Instant,
    pub server: Server,
    pub server_addr: SocketAddr,
    pub hosts: Vec<Host>,
    pub in_flight: BTreeMap<(Instant, u64), Packet>,
    pub sequence: u64,
    pub latency: Duration,
    /// Drop everything: the path died.
    pub blackhole: bool,
    /// Drops each datagram (from, to, bytes) for which it returns true.
    #[allow(clippy::type_complexity)]
    pub drop_if: Option<Box<dyn FnMut(Duration, SocketAddr, SocketAddr, &[u8]) -> bool>>,
    /// An attacker on the path replays every data frame, injects a
    /// bit-flipped copy of it, and replays the first one it saw again and
    /// again, long after.
    pub attacker: bool,
    pub first_data_frame: Option<Packet>,
    /// Drop what the peers send each other directly; the rendezvous and its
    /// relay still get through.
    pub block_direct: bool,
    /// An attacker at this address that copies every sealed frame it sees
    /// on the way between the peers and sends the copy from its own address
    /// at once, ahead of the original, as if the peer had moved there; with
    /// each copy it also sends a forgery (the copy with one bit flipped) and
    /// a replay of the first frame it saw to the same peer.
    pub racer: Option<SocketAddr>,
    /// Bytes the racer sent, and bytes sent to it.
    pub racer_sent: u64,
    pub racer_received: u64,
    racer_first: Vec<(SocketAddr, Vec<u8>)>,
}

impl World {
    pub fn new(a: Option<NatType>, b: Option<NatType>) -> Self {
        Self::configured(a, b, |_, _| {})
    }

    /// Hosts that offer AES-GCM or not.
    pub fn with_fast_aes(a: Option<NatType>, b: Option<NatType>, fast_aes: [bool; 2]) -> Self {
        Self::configured(a, b, |host, config| config.fast_aes = fast_aes[host])
    }

    /// Hosts whose link configuration `configure` adjusts (host 0 or 1).
    pub fn configured(
        a: Option<NatType>,
        b: Option<NatType>,
        configure: impl Fn(usize, &mut LinkConfig),
    ) -> Self {
        let start = Instant::now();
        let server_addr: SocketAddr = "203.0.113.10:7777".parse().unwrap();
        let mut base = LinkConfig::default();
        base.rendezvous.wait_timeout = Duration::from_secs(30);
        let room = RoomCode::new(*b"nat-sim").unwrap();
        let host = |internal: &str, nat: Option<Nat>, seed: u64, index: usize| {
            let internal: SocketAddr = internal.parse().unwrap();
            let mut config = base.clone();
            configure(index, &mut config);
            Host {
                link: Link::new(
                    start,
                    config,
                    server_addr,
                    room.clone(),
                    vec![internal],
                    Trust::Code(b"7-simulated-nat".to_vec()),
                    Identity::generate().secret_bytes(),
                    seed,
                ),
                internal,
                nat,
                connected: None,
                cipher: None,
                failed: None,
                closed: None,
                received: Vec::new(),
                received_at: Vec::new(),
                path_changes: Vec::new(),
            }
        };
        let (a_addr, b_addr) = match (a, b) {
            (Some(_), Some(_)) => ("192.168.1.2:5000", "192.168.2.2:5000"),
            (None, _) => ("203.0.113.20:5000", "192.168.2.2:5000"),
            (_, None) => ("192.168.1.2:5000", "203.0.113.21:5000"),
        };
        Self {
            now: start,
            start,
            server: Server::with_seed(Config::default(), 1),
            server_addr,
            hosts: vec![
                host(
                    a_addr,
                    a.map(|t| Nat::new(t, "203.0.113.11", 20_000)),
                    11,
                    0,
                ),
                host(
                    b_addr,
                    b.map(|t| Nat::new(t, "203.0.113.12", 30_000)),
                    22,
                    1,
                ),
            ],
            in_flight: BTreeMap::new(),
            sequence: 0,
            latency: Duration::from_millis(15),
            blackhole: false,
            drop_if: None,
            attacker: false,
            first_data_frame: None,
            block_direct: false,
            racer: None,
            racer_sent: 0,
            racer_received: 0,
            racer_first: Vec::new(),
        }
    }

    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        // Never past the datagram budget: 1200 bytes to and from the
        // server, what MTU discovery may find between the peers.
        let server = from == self.server_addr || to == self.server_addr;
        let budget = match server {
            true => natter::wire::MAX_DATAGRAM,
            false => natter::wire::MAX_PATH_DATAGRAM,
        };
        assert!(
            bytes.len() <= budget,
            "a {}-byte datagram from {from} to {to}",
            bytes.len()
        );
        if self.blackhole {
            return;
        }
        let elapsed = self.now - self.start;
        if let Some(drop_if) = &mut self.drop_if {
            if drop_if(elapsed, from, to, &bytes) {
                return;
            }
        }
        if Some(to) == self.racer {
            self.racer_received += bytes.len() as u64;
            return;
        }
        let direct = from != self.server_addr && to != self.server_addr;
        if self.block_direct && direct {
            return;
        }
        if let Some(racer) = self
            .racer
            .filter(|_| direct && matches!(bytes.first(), Some(0xC4 | 0xC8)))
        {
            if !self.racer_first.iter().any(|(peer, _)| *peer == to) {
                self.racer_first.push((to, bytes.clone()));
            }
            let (_, first) = self
                .racer_first
                .iter()
                .find(|(peer, _)| *peer == to)
                .unwrap();
            let mut forged = bytes.clone();
            let index = self.sequence as usize % forged.len();
            forged[index] ^= 0x10;
            for copy in [bytes.clone(), forged, first.clone()] {
                self.racer_sent += copy.len() as u64;
                self.sequence += 1;
                self.in_flight.insert(
                    (self.now + self.latency / 2, self.sequence),
                    Packet {
                        from: racer,
                        to,
                        bytes: copy,
                    },
                );
            }
        }
        if self.attacker && bytes.first() == Some(&0xC4) {
            let mut flipped = bytes.clone();
            let index = self.sequence as usize % flipped.len();
            flipped[index] ^= 0x10;
            let first = self.first_data_frame.get_or_insert(Packet {
                from,
                to,
                bytes: bytes.clone(),
            });
            let stale = Packet {
                from: first.from,
                to: first.to,
                bytes: first.bytes.clone(),
            };
            // The forgery overtakes the original; the replay follows it.
            for (copy, delay) in [
                (flipped, self.latency / 2),
                (bytes.clone(), self.latency * 2),
            ] {
                self.sequence += 1;
                self.in_flight.insert(
                    (self.now + delay, self.sequence),
                    Packet {
                        from,
                        to,
                        bytes: copy,
                    },
                );
            }
            self.sequence += 1;
            self.in_flight
                .insert((self.now + self.latency, self.sequence), stale);
        }
        self.sequence += 1;
        self.in_flight.insert(
            (self.now + self.latency, self.sequence),
            Packet { from, to, bytes },
        );
    }

    /// Routes a packet that reached the public network to its receiver,
    /// through the receiver's NAT.
    pub fn deliver(&mut self, packet: Packet) {
        if packet.to == self.server_addr {
            self.server
                .handle_datagram(self.now, 0, packet.from, &packet.bytes);
            return;
        }
        for host in &mut self.hosts {
            let internal = match &host.nat {
                Some(nat) if nat.public_ip == packet.to.ip() => {
                    nat.inbound(packet.to.port(), packet.from)
                }
                None if host.internal == packet.to => Some(host.internal),
                _ => continue,
            };
            if let Some(internal) = internal {
                if internal == host.internal {
                    host.link
                        .handle_datagram(self.now, packet.from, &packet.bytes);
                }
            }
            return;
        }
        // A private address of another network, or nobody: dropped.
    }

    pub fn step(&mut self) {
        // Outgoing datagrams from the server and the hosts.
        while let Some(transmit) = self.server.poll_transmit() {
            self.send(self.server_addr, transmit.to, transmit.bytes);
        }
        for index in 0..self.hosts.len() {
            while let Some(transmit) = self.hosts[index].link.poll_transmit(self.now) {
                let host = &mut self.hosts[index];
                let from = match &mut host.nat {
                    Some(nat) => nat.outbound(host.internal, transmit.to),
                    None => host.internal,
                };
                self.send(from, transmit.to, transmit.bytes);
            }
            let host = &mut self.hosts[index];
            while let Some(event) = host.link.poll_event() {
                match event {
                    LinkEvent::Connected {
                        path,
                        elapsed,
                        cipher,
                        ..
                    } => {
                        host.connected = Some((path.remote, path.kind, elapsed));
                        host.cipher = Some(cipher);
                    }
                    LinkEvent::Failed(error) => host.failed = Some(error.to_string()),
                    LinkEvent::Message(message) => {
                        host.received.push(message);
                        host.received_at.push(self.now);
                    }
                    LinkEvent::PathChanged { path, reason } => {
                        host.path_changes.push((self.now, path, reason))
                    }
                    LinkEvent::Closed { reason } => {
                        host.closed = Some((self.now - self.start, reason.to_string()))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Runs until `done` or `limit` of virtual time since the start passed;
    /// the clock stops at the limit, not at the next event after it, so a
    /// caller that acts between calls acts on time.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&World) -> bool) {
        let deadline = self.start + limit;
        for _ in 0..1_000_000 {
            self.step();
            if done(self) || self.now >= deadline {
                return;
            }
            let timers = self
                .hosts
                .iter()
                .filter_map(|h| h.link.poll_timeout())
                .chain(self.server.poll_timeout());
            let next_packet = self.in_flight.keys().next().map(|(at, _)| *at);
            let Some(next) = timers.chain(next_packet).min() else {
                return;
            };
            if next > deadline {
                self.now = deadline;
                return;
            }
            self.now = next.max(self.now);
            if let Some(entry) = self.in_flight.first_entry() {
                if entry.key().0 <= self.now {
                    let packet = entry.remove();
                    self.deliver(packet);
                    continue;
                }
            }
            self.server.handle_timeout(self.now);
            for host in &mut self.hosts {
                host.link.handle_timeout(self.now);
            }
        }
        panic!("simulation did not settle");
    }
}
