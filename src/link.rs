//! The link to the other peer, as one state machine over one socket: meet at
//! the rendezvous, punch, agree on keys, then carry the reliable channel,
//! sealed, on whichever path works best as the network changes.
//!
//! Everything a peer sends and receives goes through [`Link`], so one UDP
//! socket (one NAT mapping) serves the rendezvous, the probes and the data.
//! Like the pieces it combines it is sans-IO: the driver passes datagrams
//! and the time in, and sends what [`Link::poll_transmit`] returns.
//!
//! Its life is one `Phase` at a time: gathering (how the NAT maps, asked of
//! the rendezvous's two addresses), meeting at the rendezvous, punching,
//! securing (the handshake on the path punching found, or on the relay),
//! secured (the channel runs; [`Paths`] moves it between direct paths and the
//! relay), draining (closed, still answering a repeated CLOSE), done. The
//! link stays registered at the rendezvous until it is done: the server
//! relays for it when a direct path fails, and introduces the peers again
//! when one of their addresses changes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{
    classify, parse_relayed, split_header, Class, DataHeader, FrameKind, HandshakeMessage,
    NatMapping, PathCheck, PunchMessage, RejoinTag, RelayRequest, Role, RoomCode, SealedKind,
    DATA_HEADER_LEN, MAX_DATAGRAM, MAX_PATH_DATAGRAM, RELAY_HEADER_LEN,
};

use crate::birthday::{Birthday, BirthdayEvent, LocalSocket, Plan, SocketRequest};
use crate::error::{CloseReason, ConnectError, NoRelay, PredictionSpent};
use crate::handshake::{Handshake, HandshakeError, HandshakeEvent, SessionKeys, Trust};
use crate::netcheck::{Probe, ProbeKind};
use crate::paths::{Heard, MoveReason, PathEvent, PathStats, Paths, Route};
use crate::pmtu::{Pmtu, BASE_DATAGRAM};
use crate::punch::{
    CandidateKind, CandidateReport, Path, PunchConfig, PunchEvent, Puncher, OPENING_TTL,
};
use crate::reliable::{self, Connection, MessageId, Migration, SendError};
use crate::rendezvous_client::{RelayRoute, RendezvousClient, RendezvousConfig, RendezvousEvent};
use crate::seal::{self, DataCipher, OpenError, Opener, Sealer};

/// Probe periods, and the least time, that a closing link waits for the
/// acknowledgement of its CLOSE once everything else is settled.
const CLOSE_GRACE_PTOS: u32 = 8;
const CLOSE_GRACE_MIN: Duration = Duration::from_secs(2);
/// While the peers are still finding their way (punching, or agreeing on
/// keys), the relay hello is repeated this often: one lost hello left the
/// other peer's relayed handshake unforwarded until it gave up (seen at
/// 20 % loss when one peer learnt of the introduction 3 s after the other).
const RELAY_HELLO_REPEAT: Duration = Duration::from_secs(1);

/// Most time spent finding out how the NAT maps before registering: two
/// round trips to the rendezvous on most paths. A server that does not
/// answer STUN in time (an old one, or one under load) costs this once.
const NAT_CHECK_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub rendezvous: RendezvousConfig,
    pub punch: PunchConfig,
    /// The channel's settings; its `max_payload` is a ceiling, below which
    /// each route sets the payload (1200-byte datagrams until a direct
    /// path's MTU discovery finds more, always on the relay).
    pub channel: reliable::Config,
    /// Whether to offer AES-256-GCM for data frames; by default, when this
    /// CPU has AES instructions.
    pub fast_aes: bool,
    /// When punching fails, or a direct path goes silent, run the session
    /// through the rendezvous's relay (if it offers one).
    pub relay: bool,
    /// The controlling peer moves to the relay this long after the
    /// introduction if nothing at all has arrived from the other peer (no
    /// probe, no acknowledgement), rather than at the punch timeout; the
    /// other peer follows when the relayed handshake reaches it.
    pub relay_after: Duration,
    /// How long the link may spend, before it registers, finding out how
    /// its NAT maps (zero: it does not look, and the other peer cannot
    /// pick a technique for a hard NAT).
    pub nat_check_wait: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            rendezvous: RendezvousConfig::default(),
            punch: PunchConfig::default(),
            channel: reliable::Config {
                max_payload: DataHeader::max_payload(MAX_PATH_DATAGRAM) - seal::TAG_LEN,
                ..reliable::Config::default()
            },
            fast_aes: seal::has_fast_aes(),
            relay: true,
            relay_after: Duration::from_millis(1500),
            nat_check_wait: NAT_CHECK_WAIT,
        }
    }
}

/// What the link reports, in the order it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Registered {
        reflexive: SocketAddr,
    },
    Introduced {
        role: Role,
        candidates: Vec<(SocketAddr, CandidateKind)>,
    },
    /// Punching found no direct path; the session goes through the relay.
    Relaying {
        reports: Vec<CandidateReport>,
    },
    /// The path is up and the session keys agreed.
    Connected {
        path: Path,
        /// From the start of the link to the encrypted session.
        elapsed: Duration,
        /// The other peer's long-term public key, as the handshake proved.
        remote_key: [u8; 32],
        /// What seals the data frames.
        cipher: DataCipher,
    },
    /// The session moved to another path (the relay's is the rendezvous's
    /// address, of kind `Relayed`).
    PathChanged {
        path: Path,
        reason: MoveReason,
    },
    Message(Vec<u8>),
    Acknowledged(MessageId),
    /// The channel closed: gracefully, or because the peer went silent.
    Closed {
        reason: CloseReason,
    },
    Failed(ConnectError),
    /// Port prediction (for an easy↔hard pair) found a path, or gave up.
    PortPrediction(BirthdayEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
    /// The socket it leaves from: the link's own, or the extra socket
    /// that port prediction found a path through.
    pub via: LocalSocket,
    /// Its IP time to live (hop limit), when it must die on the way
    /// (`None`: the socket's default).
    pub ttl: Option<u32>,
}

impl Transmit {
    fn new(to: SocketAddr, bytes: Vec<u8>) -> Self {
        Self {
            to,
            bytes,
            via: LocalSocket::Main,
            ttl: None,
        }
    }
}

/// Datagrams the link ignored, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Not natter, or not decodable.
    pub malformed: u64,
    /// For another session, or handshake frames from off the path.
    pub foreign: u64,
    /// Data before the session keys were agreed.
    pub early: u64,
    /// Sealed frames that failed authentication.
    pub forged: u64,
    /// Sealed frames already received, or behind the anti-replay window.
    pub replayed: u64,
    /// Frames for the relay while it had no route (registering again after
    /// the rendezvous restarted): lost, as on a path that is down.
    pub unroutable: u64,
}

/// Where the link is in its life.
enum Phase {
    /// Asking the rendezvous's addresses how the NAT maps, until `until`.
    Gathering { probe: Box<Probe>, until: Instant },
    /// Registering at the rendezvous, waiting for the other peer.
    Meeting,
    /// Introduced: probing the other peer's candidates. The controlling
    /// peer moves to the relay at `relay_early_at` if it heard nothing.
    Punching { relay_early_at: Option<Instant> },
    /// On a path, agreeing on keys.
    Securing {
        path: Path,
        route: Route,
        handshake: Box<Handshake>,
    },
    /// The sealed channel runs.
    Secured(Box<Secured>),
    /// The channel closed gracefully; the link still acknowledges a repeated
    /// CLOSE until `until`, then reports `reason`.
    Draining {
        secured: Box<Secured>,
        until: Instant,
        reason: CloseReason,
    },
    /// Over; only last words are left to send.
    Done,
}

/// The encrypted session once the handshake is done.
struct Secured {
    /// Kept to answer a repeated last flight of the other peer.
    handshake: Box<Handshake>,
    channel: Connection,
    sealer: Sealer,
    opener: Opener,
    paths: Paths,
    /// MTU discovery on the active path (idle when it is the relay, or the
    /// other peer does not answer path checks).
    pmtu: Pmtu,
}

/// Probe timeouts in a row, with datagrams above the base size, that mean
/// the path stopped carrying them (a black hole): back to the base size.
const BLACK_HOLE_PTOS: u32 = 3;

pub struct Link {
    config: LinkConfig,
    started: Instant,
    /// The time of the latest call that passed one in.
    now: Instant,
    rendezvous: RendezvousClient,
    trust: Trust,
    local_secret: [u8; 32],
    role: Role,
    /// How this peer's NAT maps, as the gathering found.
    nat: NatMapping,
    /// Port prediction for an easy↔hard pair, from the introduction until
    /// it wins or gives up; then the winning socket's route.
    birthday: Option<Birthday>,
    /// From the introduction on: answers the other peer's probes even after
    /// this side has connected.
    puncher: Option<Puncher>,
    phase: Phase,
    /// The relay session a hello was sent for; a hello tells the server to
    /// forward the other peer's relayed frames here, and follows every
    /// new relay session and every refresh while secured.
    relay_hello_for: Option<u64>,
    /// While punching or securing: when the hello is due again.
    relay_hello_next: Option<Instant>,
    /// Datagrams that must still leave after the link is done.
    last_words: VecDeque<Transmit>,
    seed: u64,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
}

impl Link {
    /// Starts registering in `room` at `server`. The session will be keyed
    /// by `trust` and this peer's long-term `local_secret` key. `seed` feeds
    /// nonces; pass a random one outside tests.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        now: Instant,
        config: LinkConfig,
        server: SocketAddr,
        room: RoomCode,
        host_candidates: Vec<SocketAddr>,
        trust: Trust,
        local_secret: [u8; 32],
        seed: u64,
    ) -> Self {
        let rejoin = rejoin_tag(&local_secret, &room);
        let mut rendezvous = RendezvousClient::new(
            now,
            config.rendezvous.clone(),
            server,
            room,
            host_candidates,
            seed,
        )
        .rejoin_as(rejoin);
        let phase = if config.nat_check_wait.is_zero() {
            rendezvous.register(now, None);
            Phase::Meeting
        } else {
            let kind = ProbeKind::Mapping { hairpin: false };
            Phase::Gathering {
                probe: Box::new(Probe::new(now, kind, server)),
                until: now + config.nat_check_wait,
            }
        };
        Self {
            config,
            started: now,
            now,
            rendezvous,
            trust,
            local_secret,
            role: Role::Controlled,
            nat: NatMapping::Unknown,
            birthday: None,
            puncher: None,
            phase,
            relay_hello_for: None,
            relay_hello_next: None,
            last_words: VecDeque::new(),
            seed,
            events: VecDeque::new(),
            stats: LinkStats::default(),
        }
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// The reliable channel's counters, once the session is secured.
    pub fn channel_stats(&self) -> Option<reliable::Stats> {
        self.secured().map(|s| s.channel.stats())
    }

    /// Whether the channel owes an ACK that shows a lost packet: worth
    /// sending before reading more (see
    /// [`reliable::Connection::owes_an_ack_with_a_hole`]).
    pub fn owes_an_ack_with_a_hole(&self) -> bool {
        self.secured()
            .is_some_and(|s| s.channel.owes_an_ack_with_a_hole())
    }

    /// The paths' counters, once the session is secured.
    pub fn path_stats(&self) -> Option<&PathStats> {
        self.secured().map(|s| s.paths.stats())
    }

    fn secured(&self) -> Option<&Secured> {
        match &self.phase {
            Phase::Secured(secured) | Phase::Draining { secured, .. } => Some(secured),
            _ => None,
        }
    }

    /// Queues a message on the channel; fails before the session is up.
    pub fn send(&mut self, message: Vec<u8>) -> Result<MessageId, SendError> {
        match &mut self.phase {
            Phase::Secured(secured) => {
                secured.paths.note_use(self.now);
                secured.channel.send(message)
            }
            _ => Err(SendError::Closed),
        }
    }

    /// Closes the channel gracefully (what was sent is delivered first), or
    /// leaves the rendezvous when no session is up yet.
    pub fn close(&mut self) {
        match &mut self.phase {
            Phase::Secured(secured) => secured.channel.close(),
            Phase::Draining { .. } | Phase::Done => {}
            Phase::Gathering { .. }
            | Phase::Meeting
            | Phase::Punching { .. }
            | Phase::Securing { .. } => self.finish(LinkEvent::Closed {
                reason: CloseReason::BeforeConnected,
            }),
        }
    }

    /// The gateway forwards `mapped` to this peer's socket now (or no
    /// longer): the rendezvous hears of it now and introduces the peers
    /// again, so that the other one tries it.
    pub fn set_port_mapping(&mut self, now: Instant, mapped: Option<SocketAddr>) {
        self.now = now;
        self.rendezvous.set_mapped(now, mapped);
    }

    /// This host's own addresses changed: the rendezvous hears of the new
    /// ones now, and tells the other peer.
    pub fn set_host_candidates(&mut self, now: Instant, host_candidates: Vec<SocketAddr>) {
        self.now = now;
        self.rendezvous.set_host_candidates(now, host_candidates);
    }

    /// A datagram that arrived on extra socket `index`, one of those port
    /// prediction opened: the first punch message of this session on any of
    /// them wins, and from then on the winner's datagrams are the link's.
    pub fn handle_extra_datagram(
        &mut self,
        now: Instant,
        index: u16,
        from: SocketAddr,
        bytes: &[u8],
    ) {
        self.now = now;
        let ours = match (PunchMessage::decode(bytes), &self.puncher) {
            (Ok(message), Some(puncher)) => message.session_id() == puncher.session_id(),
            _ => false,
        };
        // The main socket already hears from that address: plain punching
        // works (the easy side lets anyone in), and a win here would move
        // this side to another external port in the middle of punching,
        // where the other peer does not follow. Prediction is not needed.
        let punched = self.puncher.as_ref().is_some_and(|p| p.heard_from(from));
        let accepted = match &mut self.birthday {
            Some(birthday) if ours && birthday.is_running() && punched => {
                birthday.stop();
                false
            }
            Some(birthday) if ours || !birthday.is_running() => {
                birthday.on_extra_datagram(now, index, from)
            }
            _ => false,
        };
        if accepted {
            self.handle_datagram(now, from, bytes);
        } else {
            self.stats.foreign += 1;
        }
    }

    /// What the driver must do with port prediction's extra sockets.
    pub fn poll_socket_request(&mut self) -> Option<SocketRequest> {
        self.birthday.as_mut()?.poll_socket_request()
    }

    /// The driver opened `count` extra sockets, numbered from 0.
    pub fn sockets_opened(&mut self, now: Instant, count: u16) {
        if let Some(birthday) = &mut self.birthday {
            birthday.sockets_opened_now(count);
        }
        self.pump(now);
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.now = now;
        if classify(bytes) == Class::Stun {
            match &mut self.phase {
                Phase::Gathering { probe, .. } => probe.handle_datagram(now, from, bytes),
                _ => self.stats.foreign += 1,
            }
            self.pump(now);
            return;
        }
        if from == self.rendezvous.server() {
            match split_header(bytes) {
                Ok((FrameKind::Relayed, _)) => self.handle_relayed(now, bytes),
                _ => self.rendezvous.handle_datagram(now, bytes),
            }
            self.pump(now);
            return;
        }
        let route = Route::Direct(from);
        match split_header(bytes) {
            Ok((FrameKind::Punch, _)) => match (PunchMessage::decode(bytes), &mut self.puncher) {
                (Ok(message), Some(puncher)) => {
                    let answers_spray = match (message, &mut self.birthday) {
                        (
                            PunchMessage::ProbeAck {
                                session_id, nonce, ..
                            },
                            Some(birthday),
                        ) if session_id == puncher.session_id() => {
                            birthday.on_ack(now, from, nonce)
                        }
                        _ => false,
                    };
                    if !answers_spray {
                        puncher.handle_message(now, from, message);
                    }
                }
                (Ok(_), None) => self.stats.early += 1,
                (Err(_), _) => self.stats.malformed += 1,
            },
            Ok((FrameKind::Handshake, _)) => match HandshakeMessage::decode(bytes) {
                Ok(message) => self.handle_handshake(now, route, message),
                Err(_) => self.stats.malformed += 1,
            },
            Ok((FrameKind::Data | FrameKind::PathCheck, _)) => {
                self.handle_sealed(now, route, bytes)
            }
            _ => self.stats.malformed += 1,
        }
        self.pump(now);
    }

    fn handle_handshake(&mut self, now: Instant, route: Route, message: HandshakeMessage) {
        let Some(puncher) = &mut self.puncher else {
            self.stats.early += 1;
            return;
        };
        if message.session_id() != puncher.session_id() {
            self.stats.foreign += 1;
            return;
        }
        if let (Phase::Punching { .. }, Route::Direct(from)) = (&self.phase, route) {
            // The controlled side starts the handshake as soon as it takes
            // the nomination: that proves the nomination arrived even if its
            // acknowledgement did not.
            puncher.confirm_nomination(from);
            self.pump(now);
        }
        match &mut self.phase {
            Phase::Securing {
                route: on,
                handshake,
                ..
            } if *on == route => handshake.handle_message(now, message),
            // A repeat of the other peer's last flight: its answer was lost.
            Phase::Secured(secured) => secured.handshake.handle_message(now, message),
            _ => self.stats.foreign += 1,
        }
    }

    /// A frame of the other peer that the rendezvous relayed.
    fn handle_relayed(&mut self, now: Instant, bytes: &[u8]) {
        let Ok((session_id, inner)) = parse_relayed(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let route = self.rendezvous.relay_route();
        if route.map(|r| r.session_id) != Some(session_id) {
            self.stats.foreign += 1;
            return;
        }
        let kind = split_header(inner).map(|(kind, _)| kind);
        if let Phase::Meeting | Phase::Punching { .. } = self.phase {
            // The other peer moved to the relay first: follow it with the
            // handshake it started.
            match self.puncher.as_mut() {
                Some(puncher) if kind == Ok(FrameKind::Handshake) && self.config.relay => {
                    let reports = puncher.give_up();
                    self.start_relaying(now, reports);
                }
                _ => {
                    self.stats.foreign += 1;
                    return;
                }
            }
        }
        match kind {
            Ok(FrameKind::Handshake) => match HandshakeMessage::decode(inner) {
                Ok(message) => self.handle_handshake(now, Route::Relay, message),
                Err(_) => self.stats.malformed += 1,
            },
            Ok(FrameKind::Data | FrameKind::PathCheck) => {
                self.handle_sealed(now, Route::Relay, inner)
            }
            _ => self.stats.malformed += 1,
        }
    }

    /// A data frame or path check, from `route`.
    fn handle_sealed(&mut self, now: Instant, route: Route, frame: &[u8]) {
        let (Phase::Secured(secured) | Phase::Draining { secured, .. }) = &mut self.phase else {
            self.stats.early += 1;
            return;
        };
        let opened = match secured.opener.open(frame) {
            Ok(opened) => opened,
            Err(OpenError::Forged) => return self.stats.forged += 1,
            Err(OpenError::Replayed | OpenError::TooOld) => return self.stats.replayed += 1,
        };
        let heard = match opened.kind {
            SealedKind::Data => Heard::Data {
                newest: opened.newest,
            },
            SealedKind::PathCheck => match PathCheck::decode(&opened.payload) {
                Ok(check) => Heard::Check(check),
                Err(_) => return self.stats.malformed += 1,
            },
        };
        if let Heard::Check(PathCheck::Response(token)) = heard {
            if secured.pmtu.on_response(now, &token) {
                let active = secured.paths.active().route;
                let payload = max_payload(&self.config, active, secured.pmtu.datagram());
                secured.channel.set_max_payload(payload);
            }
        }
        secured.paths.handle_frame(now, route, frame.len(), heard);
        if opened.kind == SealedKind::Data {
            secured
                .channel
                .handle_datagram(now, opened.sequence, &opened.payload);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        self.rendezvous.handle_timeout(now);
        if let Some(puncher) = &mut self.puncher {
            puncher.handle_timeout(now);
        }
        if let Some(birthday) = &mut self.birthday {
            birthday.handle_timeout(now);
        }
        match &mut self.phase {
            Phase::Punching {
                relay_early_at: Some(at),
            } if now >= *at => {
                let puncher = self.puncher.as_mut().expect("punching has a puncher");
                if puncher.heard_from_peer() {
                    self.phase = Phase::Punching {
                        relay_early_at: None,
                    };
                } else {
                    let reports = puncher.give_up();
                    self.start_relaying(now, reports);
                }
            }
            Phase::Securing { handshake, .. } => handshake.handle_timeout(now),
            Phase::Secured(secured) => {
                if close_unconfirmed_deadline(&secured.channel).is_some_and(|at| now >= at) {
                    return self.finish(LinkEvent::Closed {
                        reason: CloseReason::Unconfirmed,
                    });
                }
                secured.channel.handle_timeout(now);
                let busy = secured.channel.has_in_flight();
                secured.paths.handle_timeout(now, busy);
                secured.pmtu.handle_timeout(now);
                let stuck = secured.channel.probe_timeouts_in_a_row() >= BLACK_HOLE_PTOS;
                if stuck && secured.pmtu.datagram() > BASE_DATAGRAM {
                    secured.pmtu.black_hole(now);
                    let route = secured.paths.active().route;
                    let payload = max_payload(&self.config, route, BASE_DATAGRAM);
                    secured.channel.set_max_payload(payload);
                }
            }
            Phase::Draining { until, reason, .. } if now >= *until => {
                let reason = reason.clone();
                return self.finish(LinkEvent::Closed { reason });
            }
            Phase::Draining { secured, .. } => secured.channel.handle_timeout(now),
            Phase::Gathering { probe, .. } => probe.handle_timeout(now),
            Phase::Meeting | Phase::Punching { .. } | Phase::Done => {}
        }
        self.pump(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let hello = self
            .relay_hello_next
            .filter(|_| self.rendezvous.relay_route().is_some());
        let phase = match &self.phase {
            Phase::Punching { relay_early_at } => [*relay_early_at, self.relay_hello_next]
                .into_iter()
                .flatten()
                .min(),
            Phase::Securing { handshake, .. } => [handshake.poll_timeout(), hello]
                .into_iter()
                .flatten()
                .min(),
            Phase::Secured(secured) => {
                let busy = secured.channel.has_in_flight();
                [
                    secured.channel.poll_timeout(),
                    secured.paths.poll_timeout(busy),
                    close_unconfirmed_deadline(&secured.channel),
                    secured.pmtu.poll_timeout(),
                ]
                .into_iter()
                .flatten()
                .min()
            }
            Phase::Draining { secured, until, .. } => Some(
                secured
                    .channel
                    .poll_timeout()
                    .map_or(*until, |t| t.min(*until)),
            ),
            Phase::Gathering { probe, until } => {
                Some(probe.poll_timeout().map_or(*until, |t| t.min(*until)))
            }
            Phase::Meeting | Phase::Done => None,
        };
        [
            self.rendezvous.poll_timeout(),
            self.puncher.as_ref().and_then(Puncher::poll_timeout),
            self.birthday.as_ref().and_then(Birthday::poll_timeout),
            phase,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.now = now;
        if let (Some(birthday), Some(puncher)) = (&mut self.birthday, &self.puncher) {
            if let Some((via, to, nonce)) = birthday.poll_transmit(now) {
                let probe = PunchMessage::Probe {
                    session_id: puncher.session_id(),
                    nonce,
                };
                let bytes = probe.encode().expect("punch messages are small");
                // The fan only opens the hard side's NAT; reaching the easy
                // side's router would leave entries there that move its
                // host's mapping (a router without an input firewall).
                let ttl = matches!(via, LocalSocket::Extra(_)).then_some(OPENING_TTL);
                return Some(Transmit {
                    to,
                    bytes,
                    via,
                    ttl,
                });
            }
        }
        let mut transmit = self.next_transmit(now)?;
        if let Some(birthday) = &self.birthday {
            transmit.via = birthday.socket_for(transmit.to);
        }
        Some(transmit)
    }

    fn next_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Phase::Gathering { probe, .. } = &mut self.phase {
            if let Some((to, bytes)) = probe.poll_transmit(now) {
                return Some(Transmit::new(to, bytes));
            }
        }
        if let Some(bytes) = self.rendezvous.poll_transmit() {
            if matches!(self.phase, Phase::Secured(_)) {
                // A refresh: repeat the hello, in case one was lost.
                self.relay_hello_for = None;
            }
            return Some(Transmit::new(self.rendezvous.server(), bytes));
        }
        if let Some(transmit) = self.last_words.pop_front() {
            return Some(transmit);
        }
        if let Some(hello) = self.relay_hello(now) {
            return Some(hello);
        }
        if let Some((to, message, ttl)) = self.puncher.as_mut().and_then(Puncher::poll_transmit) {
            let bytes = message.encode().expect("punch messages are small");
            return Some(Transmit {
                ttl,
                ..Transmit::new(to, bytes)
            });
        }
        loop {
            let (route, frame) = self.next_frame(now)?;
            match self.on_route(route, frame) {
                Some(transmit) => return Some(transmit),
                // The relay has no route for now: lost, as on a path that
                // is down. The channel retransmits with backoff; holding
                // frames back instead would leave its timers due and its
                // driver spinning.
                None => self.stats.unroutable += 1,
            }
        }
    }

    /// The next peer-to-peer frame of the current phase, and its route.
    fn next_frame(&mut self, now: Instant) -> Option<(Route, Vec<u8>)> {
        match &mut self.phase {
            Phase::Securing {
                route, handshake, ..
            } => {
                let message = handshake.poll_transmit()?;
                Some((
                    *route,
                    message.encode().expect("handshake messages are bounded"),
                ))
            }
            Phase::Secured(secured) | Phase::Draining { secured, .. } => {
                let active = secured.paths.active().route;
                if let Some(message) = secured.handshake.poll_transmit() {
                    let bytes = message.encode().expect("handshake messages are bounded");
                    return Some((active, bytes));
                }
                if let Some((route, check)) = secured.paths.poll_transmit() {
                    let frame = secured
                        .sealer
                        .seal(now, SealedKind::PathCheck, &check.encode());
                    return Some((route, frame));
                }
                secured.pmtu.set_rtt(secured.channel.smoothed_rtt());
                if let Some(probe) = secured.pmtu.poll_probe(now) {
                    let plaintext = probe.size - DATA_HEADER_LEN - seal::TAG_LEN;
                    let challenge = PathCheck::padded_challenge(probe.token, plaintext);
                    let frame = secured.sealer.seal(now, SealedKind::PathCheck, &challenge);
                    return Some((active, frame));
                }
                // The channel numbers its packet by the frame that carries it.
                let number = secured.sealer.next_sequence();
                let payload = secured.channel.poll_transmit(now, number)?;
                Some((active, secured.sealer.seal(now, SealedKind::Data, &payload)))
            }
            Phase::Gathering { .. } | Phase::Meeting | Phase::Punching { .. } | Phase::Done => None,
        }
    }

    /// A relay hello, when one is due: the link may need the relay (it is
    /// punching, or its session may have to move there) and has not said
    /// hello for the current relay session, or it is still finding its way
    /// and the last hello may have been lost.
    fn relay_hello(&mut self, now: Instant) -> Option<Transmit> {
        if !self.config.relay
            || matches!(
                self.phase,
                Phase::Gathering { .. } | Phase::Meeting | Phase::Done
            )
        {
            return None;
        }
        let Some(route) = self.rendezvous.relay_route() else {
            self.relay_hello_next = None;
            return None;
        };
        let finding = matches!(self.phase, Phase::Punching { .. } | Phase::Securing { .. });
        let repeat = finding && self.relay_hello_next.is_some_and(|at| now >= at);
        if self.relay_hello_for == Some(route.session_id) && !repeat {
            return None;
        }
        self.relay_hello_for = Some(route.session_id);
        self.relay_hello_next = finding.then(|| now + RELAY_HELLO_REPEAT);
        Some(relayed(self.rendezvous.server(), route, &[]))
    }

    /// `frame` as it goes out on `route`; `None` if that is the relay and it
    /// has no route now.
    fn on_route(&self, route: Route, frame: Vec<u8>) -> Option<Transmit> {
        match route {
            Route::Direct(to) => Some(Transmit::new(to, frame)),
            Route::Relay => {
                let relay = self.rendezvous.relay_route()?;
                Some(relayed(self.rendezvous.server(), relay, &frame))
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        let Phase::Secured(secured) = &mut self.phase else {
            return None;
        };
        match secured.channel.poll_event()? {
            reliable::Event::Message(message) => {
                secured.paths.note_use(self.now);
                Some(LinkEvent::Message(message))
            }
            reliable::Event::Acknowledged(id) => Some(LinkEvent::Acknowledged(id)),
            reliable::Event::Closed { reason } => {
                // Keep answering for the channel's drain period: if our
                // acknowledgement of the peer's CLOSE was lost, it repeats
                // its CLOSE, and without an answer would wait out its idle
                // timeout.
                let until = self.now + secured.channel.drain_period().unwrap_or_default();
                let Phase::Secured(secured) = std::mem::replace(&mut self.phase, Phase::Done)
                else {
                    unreachable!("matched above")
                };
                self.phase = Phase::Draining {
                    secured,
                    until,
                    reason: reason.into(),
                };
                None
            }
            reliable::Event::TimedOut => {
                let reason = CloseReason::PeerSilent {
                    after: self.config.channel.idle_timeout,
                };
                self.finish(LinkEvent::Closed { reason });
                self.events.pop_front()
            }
        }
    }

    /// Moves events from the NAT check, the rendezvous client, the
    /// puncher, the handshake and the paths forward.
    fn pump(&mut self, now: Instant) {
        if let Phase::Gathering { probe, until } = &self.phase {
            if probe.is_done() || now >= *until {
                self.nat = probe.nat_mapping();
                self.rendezvous.register(now, Some(self.nat));
                self.phase = Phase::Meeting;
            }
        }
        while let Some(event) = self.rendezvous.poll_event() {
            match event {
                RendezvousEvent::Registered { reflexive } => {
                    self.events.push_back(LinkEvent::Registered { reflexive })
                }
                RendezvousEvent::Introduced {
                    session_id,
                    role,
                    reflexive,
                    host_candidates,
                    nat,
                    mapped,
                    restarted,
                } => {
                    let others = OtherPeer {
                        reflexive,
                        host_candidates,
                        nat,
                        mapped,
                        restarted,
                    };
                    self.introduced(now, session_id, role, others)
                }
                // With a session up, the rendezvous is a way back should the
                // path fail, not a reason to end.
                RendezvousEvent::Failed(_) if self.secured().is_some() => {}
                RendezvousEvent::Failed(error) => self.finish(LinkEvent::Failed(error)),
            }
        }
        while let Some(event) = self.puncher.as_mut().and_then(Puncher::poll_event) {
            match event {
                PunchEvent::Connected(path) => {
                    self.start_handshake(now, path, Route::Direct(path.remote))
                }
                PunchEvent::Failed(reports) => match self.rendezvous.relay_route() {
                    Some(_) if self.config.relay => self.start_relaying(now, reports),
                    _ => {
                        let no_relay = if self.config.relay {
                            NoRelay::ServerOff
                        } else {
                            NoRelay::Declined
                        };
                        let prediction = self.birthday.as_ref().map(|b| PredictionSpent {
                            probes_sent: b.probes_sent(),
                            sockets_opened: b.sockets_opened(),
                        });
                        self.finish(LinkEvent::Failed(ConnectError::PunchFailed {
                            reports,
                            no_relay,
                            prediction,
                        }));
                    }
                },
            }
        }
        while let Some(event) = self.birthday.as_mut().and_then(Birthday::poll_event) {
            if let BirthdayEvent::Won { socket, remote, .. } = event {
                self.follow_prediction(now, socket, remote);
            }
            self.events.push_back(LinkEvent::PortPrediction(event));
        }
        if let Phase::Securing { handshake, .. } = &mut self.phase {
            match handshake.poll_event() {
                Some(HandshakeEvent::Done(keys)) => self.secure(now, keys),
                Some(HandshakeEvent::Failed(HandshakeError::TimedOut))
                    if matches!(
                        self.phase,
                        Phase::Securing {
                            route: Route::Relay,
                            ..
                        }
                    ) =>
                {
                    self.finish(LinkEvent::Failed(ConnectError::RelayUnanswered))
                }
                Some(HandshakeEvent::Failed(error)) => {
                    self.finish(LinkEvent::Failed(ConnectError::Handshake(error)))
                }
                None => {}
            }
        }
        let relay_available = self.config.relay && self.rendezvous.relay_route().is_some();
        let server = self.rendezvous.server();
        let (Phase::Secured(secured) | Phase::Draining { secured, .. }) = &mut self.phase else {
            return;
        };
        secured.paths.set_relay_available(relay_available);
        let mut changes = Vec::new();
        while let Some(event) = secured.paths.poll_event() {
            match event {
                PathEvent::Moved {
                    route,
                    via,
                    reason,
                    migration,
                } => {
                    secured
                        .pmtu
                        .on_path_change(searches_mtu(route, &secured.paths));
                    let payload = max_payload(&self.config, route, BASE_DATAGRAM);
                    secured.channel.migrate(migration, payload);
                    let rate = route_rate(route, self.rendezvous.relay_route(), payload);
                    secured.channel.set_route_rate(rate);
                    let path = Path {
                        remote: match route {
                            Route::Direct(addr) => addr,
                            Route::Relay => server,
                        },
                        kind: via,
                        rtt: secured.paths.active().rtt,
                    };
                    changes.push(LinkEvent::PathChanged { path, reason });
                }
                PathEvent::Silent => self.rendezvous.refresh_now(now),
            }
        }
        // On a direct path port prediction did not find, it has nothing
        // left to do.
        let direct = secured.paths.active().route;
        if let (Route::Direct(to), Some(birthday)) = (direct, &mut self.birthday) {
            if birthday.is_running() && birthday.socket_for(to) == LocalSocket::Main {
                birthday.stop();
            }
        }
        self.events.extend(changes);
    }

    fn introduced(&mut self, now: Instant, session_id: u64, role: Role, other: OtherPeer) {
        let OtherPeer {
            reflexive,
            host_candidates,
            nat,
            mapped,
            restarted,
        } = other;
        let candidates: Vec<_> = host_candidates
            .into_iter()
            .filter(|&addr| addr != reflexive)
            .map(|addr| (addr, CandidateKind::Host))
            .chain(
                mapped
                    .filter(|&m| m != reflexive)
                    .map(|m| (m, CandidateKind::PortMapped)),
            )
            .chain([(reflexive, CandidateKind::Reflexive)])
            .collect();
        match &mut self.phase {
            Phase::Meeting | Phase::Punching { .. } => {}
            // Introduced again: an address changed (or the server
            // restarted). The session stays; its paths check the new
            // candidates. On the relay, the new relay session is a way
            // through again: what waited for it goes now rather than at the
            // channel's backed-off probe timer.
            // The other peer started again: its new process cannot read
            // this session, which is over; it waits for a new one.
            Phase::Secured(_) | Phase::Draining { .. } if restarted => {
                let reason = CloseReason::PeerRestarted;
                return self.finish(LinkEvent::Closed { reason });
            }
            Phase::Secured(secured) | Phase::Draining { secured, .. } => {
                secured.paths.add_candidates(now, candidates);
                if secured.paths.active().route == Route::Relay {
                    let payload = max_payload(&self.config, Route::Relay, BASE_DATAGRAM);
                    secured.channel.migrate(Migration::PortOnly, payload);
                    let rate = route_rate(Route::Relay, self.rendezvous.relay_route(), payload);
                    secured.channel.set_route_rate(rate);
                }
                return;
            }
            Phase::Gathering { .. } | Phase::Securing { .. } | Phase::Done => return,
        }
        self.role = role;
        self.events.push_back(LinkEvent::Introduced {
            role,
            candidates: candidates.clone(),
        });
        let mut punch = self.config.punch.clone();
        let their_nat = nat.unwrap_or(NatMapping::Unknown);
        let plan = Plan::for_pair(self.nat, their_nat, reflexive);
        // A port mapping on either side is a known way in: no prediction.
        let mapped = self.rendezvous.mapped().is_some() || mapped.is_some();
        match (&mut self.birthday, plan) {
            (Some(birthday), _) if mapped => birthday.stop(),
            (None, Some(plan)) if !mapped => {
                let birthday = Birthday::new(now, plan, self.seed ^ session_id);
                // Without a relay, punching waits for port prediction to end.
                punch.timeout = punch.timeout.max(birthday.deadline() - now);
                self.birthday = Some(birthday);
            }
            // Introduced again while predicting: it goes on, with the new
            // session's probes.
            _ => {}
        }
        self.puncher = Some(Puncher::new(
            now,
            punch,
            session_id,
            role,
            candidates,
            self.seed ^ session_id,
        ));
        let relay_early = self.config.relay
            && self.rendezvous.relay_route().is_some()
            && role == Role::Controlling;
        self.phase = Phase::Punching {
            relay_early_at: relay_early.then(|| now + self.config.relay_after),
        };
    }

    /// Port prediction found `remote` through `socket`: punching probes it
    /// at once, or a secured session's paths check it (and move there by
    /// their rules).
    fn follow_prediction(&mut self, now: Instant, socket: LocalSocket, remote: SocketAddr) {
        // The side that sprayed learnt a new address of the other peer; the
        // side that fanned out knew it, and now reaches it another way.
        let kind = match socket {
            LocalSocket::Main => CandidateKind::PeerReflexive,
            LocalSocket::Extra(_) => CandidateKind::Reflexive,
        };
        if let Some(puncher) = &mut self.puncher {
            puncher.learn(now, remote, kind);
        }
        if let Phase::Secured(secured) | Phase::Draining { secured, .. } = &mut self.phase {
            secured.paths.add_candidates(now, [(remote, kind)]);
        }
    }

    /// Runs the session through the rendezvous's relay. The rendezvous
    /// carries the session now, and refreshes keep the registration and the
    /// NAT mapping to it alive.
    fn start_relaying(&mut self, now: Instant, reports: Vec<CandidateReport>) {
        self.events.push_back(LinkEvent::Relaying { reports });
        let path = Path {
            remote: self.rendezvous.server(),
            kind: CandidateKind::Relayed,
            rtt: None,
        };
        self.start_handshake(now, path, Route::Relay);
    }

    fn start_handshake(&mut self, now: Instant, path: Path, route: Route) {
        let session_id = self.puncher.as_ref().map_or(0, Puncher::session_id);
        let handshake = Box::new(Handshake::new(
            now,
            session_id,
            self.role,
            self.trust.clone(),
            self.local_secret,
            self.config.fast_aes,
        ));
        self.phase = Phase::Securing {
            path,
            route,
            handshake,
        };
    }

    /// The keys are agreed: the channel starts on the handshake's path, and
    /// the other peer's candidates become the paths it may move to.
    fn secure(&mut self, now: Instant, keys: SessionKeys) {
        let Phase::Securing {
            path,
            route,
            handshake,
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            unreachable!("called while securing")
        };
        let puncher = self.puncher.as_ref().expect("securing follows punching");
        let session_id = puncher.session_id();
        let mut channel_config = self.config.channel.clone();
        channel_config.max_payload = max_payload(&self.config, route, BASE_DATAGRAM);
        // The relay's round trip is the handshake's.
        let rtt = path.rtt.or(keys.rtt);
        let mut paths = Paths::new(now, self.role, route, path.kind, rtt, self.seed);
        paths.track_candidates(puncher.candidates());
        if !keys.remote_path_checks {
            paths.pin();
        }
        let mut pmtu = Pmtu::new(self.seed);
        pmtu.on_path_change(searches_mtu(route, &paths));
        let rate = route_rate(
            route,
            self.rendezvous.relay_route(),
            channel_config.max_payload,
        );
        let mut channel = Connection::new(channel_config, now);
        channel.set_route_rate(rate);
        // The punch or the handshake timed the path: the first probe timeout
        // is then a few round trips, not the second of a 333 ms guess.
        if let Some(rtt) = rtt {
            channel.seed_rtt(rtt);
        }
        self.phase = Phase::Secured(Box::new(Secured {
            handshake,
            channel,
            sealer: Sealer::new(now, session_id, keys.cipher, keys.send),
            opener: Opener::new(keys.cipher, keys.receive),
            paths,
            pmtu,
        }));
        self.events.push_back(LinkEvent::Connected {
            path,
            elapsed: now - self.started,
            remote_key: keys.remote_static,
            cipher: keys.cipher,
        });
    }

    /// Ends the link with `event`: what the handshake still had to say (a
    /// Reject) and a Leave for the rendezvous go out as last words.
    fn finish(&mut self, event: LinkEvent) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Done => return,
            Phase::Securing {
                route,
                mut handshake,
                ..
            } => {
                while let Some(message) = handshake.poll_transmit() {
                    let frame = message.encode().expect("handshake messages are bounded");
                    match self.on_route(route, frame) {
                        Some(transmit) => self.last_words.push_back(transmit),
                        None => self.stats.unroutable += 1,
                    }
                }
            }
            _ => {}
        }
        self.rendezvous.leave();
        if let Some(birthday) = &mut self.birthday {
            birthday.stop();
            while let Some(prediction) = birthday.poll_event() {
                self.events.push_back(LinkEvent::PortPrediction(prediction));
            }
        }
        self.events.push_back(event);
    }
}

/// What the rendezvous told of the other peer in an introduction.
struct OtherPeer {
    reflexive: SocketAddr,
    host_candidates: Vec<SocketAddr>,
    nat: Option<NatMapping>,
    mapped: Option<SocketAddr>,
    /// A new process of the other peer: a session with the old one is over.
    restarted: bool,
}

/// When to stop waiting for the acknowledgement of our CLOSE once
/// everything else of the close is settled: the peer most likely closed
/// and exited and its acknowledgement was lost. Several retransmissions
/// fit in the grace period, so a peer that is still there gets our CLOSE;
/// waiting for the channel's idle timeout instead kept processes alive for
/// a minute after a transfer on lossy paths.
fn close_unconfirmed_deadline(channel: &Connection) -> Option<Instant> {
    let grace = (channel.pto_period() * CLOSE_GRACE_PTOS).max(CLOSE_GRACE_MIN);
    channel.close_unconfirmed_since()?.checked_add(grace)
}

/// The channel's largest payload on `route`, whose datagrams may be
/// `datagram` bytes (direct) or [`MAX_DATAGRAM`] with the relay header
/// (relay): a sealed frame must fit one.
fn max_payload(config: &LinkConfig, route: Route, datagram: usize) -> usize {
    let datagram = match route {
        Route::Direct(_) => datagram,
        Route::Relay => MAX_DATAGRAM - RELAY_HEADER_LEN,
    };
    config
        .channel
        .max_payload
        .min(DataHeader::max_payload(datagram) - seal::TAG_LEN)
}

/// The channel's payload bytes per second on `route`: on the relay, the
/// server's rate for this peer less each request's relay header, data
/// header and tag, with a 32nd to spare for path checks and probes;
/// no limit on a direct route.
fn route_rate(route: Route, relay: Option<RelayRoute>, payload: usize) -> Option<u64> {
    let Route::Relay = route else {
        return None;
    };
    let frame = (payload + RELAY_HEADER_LEN + DATA_HEADER_LEN + seal::TAG_LEN) as u64;
    relay.map(|relay| u64::from(relay.rate) * payload as u64 / frame * 31 / 32)
}

/// Whether to search for the MTU of `route`: only a direct one, and only
/// if the other peer answers path checks (an older peer would neither
/// answer nor take larger frames).
fn searches_mtu(route: Route, paths: &Paths) -> bool {
    route.is_direct() && !paths.pinned()
}

/// A frame inside a relay request along `route`.
fn relayed(server: SocketAddr, route: RelayRoute, frame: &[u8]) -> Transmit {
    let request = RelayRequest {
        session_id: route.session_id,
        peer_token: route.peer_token,
        inner: frame,
    };
    let bytes = request
        .encode()
        .expect("on the relay, frames leave room for the relay header");
    Transmit::new(server, bytes)
}

/// This peer's tag in `room`: the same on every run with the same
/// long-term key, and not to be computed without the secret half.
fn rejoin_tag(local_secret: &[u8; 32], room: &RoomCode) -> RejoinTag {
    let key = blake3::derive_key("natter 2026-12-04 rendezvous rejoin tag", local_secret);
    let hash = blake3::keyed_hash(&key, room.as_bytes());
    let mut tag = [0; 16];
    tag.copy_from_slice(&hash.as_bytes()[..16]);
    RejoinTag(tag)
}
