//! The link to the other peer, as one state machine over one socket: meet at
//! the rendezvous, punch, agree on keys, then carry the reliable channel,
//! sealed, on the punched path.
//!
//! Everything a peer sends and receives goes through [`Link`], so one UDP
//! socket (one NAT mapping) serves the rendezvous, the probes and the data.
//! Like the pieces it combines it is sans-IO: the driver passes datagrams
//! and the time in, and sends what [`Link::poll_transmit`] returns.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{
    parse_relayed, split_header, DataHeader, FrameKind, HandshakeMessage, PunchMessage,
    RelayRequest, Role, RoomCode, RELAY_HEADER_LEN,
};

use crate::error::{ConnectError, NoRelay};
use crate::handshake::{Handshake, HandshakeError, HandshakeEvent, Trust};
use crate::punch::{CandidateKind, CandidateReport, Path, PunchConfig, PunchEvent, Puncher};
use crate::reliable::{self, Connection, MessageId, SendError};
use crate::rendezvous_client::{RelayRoute, RendezvousClient, RendezvousConfig, RendezvousEvent};
use crate::seal::{self, DataCipher, OpenError, Opener, Sealer};

/// Probe periods, and the least time, that a closing link waits for the
/// acknowledgement of its CLOSE once everything else is settled.
const CLOSE_GRACE_PTOS: u32 = 8;
const CLOSE_GRACE_MIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub rendezvous: RendezvousConfig,
    pub punch: PunchConfig,
    pub channel: reliable::Config,
    /// Whether to offer AES-256-GCM for data frames; by default, when this
    /// CPU has AES instructions.
    pub fast_aes: bool,
    /// When punching fails, run the session through the rendezvous's relay
    /// (if it offers one) instead of failing.
    pub relay: bool,
    /// The controlling peer moves to the relay this long after the
    /// introduction if nothing at all has arrived from the other peer (no
    /// probe, no acknowledgement), rather than at the punch timeout; the
    /// other peer follows when the relayed handshake reaches it.
    pub relay_after: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            rendezvous: RendezvousConfig::default(),
            punch: PunchConfig::default(),
            channel: reliable::Config::default(),
            fast_aes: seal::has_fast_aes(),
            relay: true,
            relay_after: Duration::from_millis(1500),
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
    Message(Vec<u8>),
    Acknowledged(MessageId),
    /// The channel closed: gracefully, or because the peer went silent.
    Closed {
        reason: String,
    },
    Failed(ConnectError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Datagrams the link ignored, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Not natter, or not decodable.
    pub malformed: u64,
    /// For another session, or from an address that is not the path.
    pub foreign: u64,
    /// Data before the session keys were agreed.
    pub early: u64,
    /// Data frames that failed authentication.
    pub forged: u64,
    /// Data frames already received, or behind the anti-replay window.
    pub replayed: u64,
    /// Frames for the relay while it had no route (registering again after
    /// the rendezvous restarted): lost, as on a path that is down.
    pub unroutable: u64,
}

/// The encrypted session once the handshake is done.
struct Secured {
    channel: Connection,
    sealer: Sealer,
    opener: Opener,
}

pub struct Link {
    config: LinkConfig,
    started: Instant,
    rendezvous: RendezvousClient,
    trust: Trust,
    local_secret: [u8; 32],
    role: Role,
    puncher: Option<Puncher>,
    /// Where the session runs, once punching succeeded or gave way to the
    /// relay.
    path: Option<Path>,
    /// The path is the rendezvous's relay.
    relayed: bool,
    /// A relay hello is due: the server then forwards the other peer's
    /// relayed frames to this one, should it move to the relay first.
    relay_hello: bool,
    /// Controlling: when to move to the relay if the other peer is silent.
    relay_early_at: Option<Instant>,
    handshake: Option<Handshake>,
    secured: Option<Secured>,
    seed: u64,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
    done: bool,
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
        let rendezvous = RendezvousClient::new(
            now,
            config.rendezvous.clone(),
            server,
            room,
            host_candidates,
            seed,
        );
        Self {
            config,
            started: now,
            rendezvous,
            trust,
            local_secret,
            role: Role::Controlled,
            puncher: None,
            path: None,
            relayed: false,
            relay_hello: false,
            relay_early_at: None,
            handshake: None,
            secured: None,
            seed,
            events: VecDeque::new(),
            stats: LinkStats::default(),
            done: false,
        }
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// After the channel closed gracefully, how long to keep driving the link
    /// so a lost acknowledgement of the peer's CLOSE can be repeated.
    pub fn drain_period(&self) -> Option<Duration> {
        self.secured.as_ref()?.channel.drain_period()
    }

    /// When to stop waiting for the acknowledgement of our CLOSE once
    /// everything else of the close is settled: the peer most likely closed
    /// and exited and its acknowledgement was lost. Several retransmissions
    /// fit in the grace period, so a peer that is still there gets our
    /// CLOSE; waiting for the channel's idle timeout instead kept processes
    /// alive for a minute after a transfer on lossy paths.
    fn close_unconfirmed_deadline(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        let channel = &self.secured.as_ref()?.channel;
        let grace = (channel.pto_period() * CLOSE_GRACE_PTOS).max(CLOSE_GRACE_MIN);
        channel.close_unconfirmed_since()?.checked_add(grace)
    }

    /// Queues a message on the channel; fails before the session is up.
    pub fn send(&mut self, message: Vec<u8>) -> Result<MessageId, SendError> {
        match &mut self.secured {
            Some(secured) => secured.channel.send(message),
            None => Err(SendError::Closed),
        }
    }

    /// Closes the channel gracefully (what was sent is delivered first), or
    /// leaves the rendezvous when no session is up yet.
    pub fn close(&mut self) {
        match &mut self.secured {
            Some(secured) => secured.channel.close(),
            None => {
                self.rendezvous.leave();
                self.finish(LinkEvent::Closed {
                    reason: "closed before a path was found".into(),
                });
            }
        }
    }

    /// Leaves the rendezvous, if a relayed session still holds its place
    /// there. Call once the link is done and drained: the relay carries
    /// the last acknowledgements of the close until then.
    pub fn leave_rendezvous(&mut self) {
        self.rendezvous.leave();
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from == self.rendezvous.server() {
            match split_header(bytes) {
                Ok((FrameKind::Relayed, _)) => self.handle_relayed(now, from, bytes),
                _ => self.rendezvous.handle_datagram(now, bytes),
            }
            self.pump(now);
            return;
        }
        match split_header(bytes) {
            Ok((FrameKind::Punch, _)) => match (PunchMessage::decode(bytes), &mut self.puncher) {
                (Ok(message), Some(puncher)) => puncher.handle_message(now, from, message),
                (Ok(_), None) => self.stats.early += 1,
                (Err(_), _) => self.stats.malformed += 1,
            },
            Ok((FrameKind::Handshake, _)) => match HandshakeMessage::decode(bytes) {
                Ok(message) => self.handle_handshake(now, from, message),
                Err(_) => self.stats.malformed += 1,
            },
            Ok((FrameKind::Data, _)) => self.handle_data(now, from, bytes),
            _ => self.stats.malformed += 1,
        }
        self.pump(now);
    }

    fn handle_handshake(&mut self, now: Instant, from: SocketAddr, message: HandshakeMessage) {
        let Some(puncher) = &mut self.puncher else {
            self.stats.early += 1;
            return;
        };
        if message.session_id() != puncher.session_id() {
            self.stats.foreign += 1;
            return;
        }
        if self.path.is_none() {
            // The controlled side starts the handshake as soon as it takes
            // the nomination: that proves the nomination arrived even if its
            // acknowledgement did not.
            puncher.confirm_nomination(from);
            self.pump(now);
        }
        match (&mut self.handshake, self.path) {
            (Some(handshake), Some(path)) if path.remote == from => {
                handshake.handle_message(message)
            }
            _ => self.stats.foreign += 1,
        }
    }

    /// A frame of the other peer that the rendezvous relayed.
    fn handle_relayed(&mut self, now: Instant, server: SocketAddr, bytes: &[u8]) {
        let Ok((session_id, inner)) = parse_relayed(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let route = self.rendezvous.relay_route();
        if route.map(|r| r.session_id) != Some(session_id) {
            self.stats.foreign += 1;
            return;
        }
        if !self.relayed {
            // The other peer moved to the relay first: follow it with the
            // handshake it started, unless a direct path is already up.
            let handshake = matches!(split_header(inner), Ok((FrameKind::Handshake, _)));
            match self.puncher.as_mut() {
                Some(puncher) if handshake && self.path.is_none() && self.config.relay => {
                    let reports = puncher.give_up();
                    self.start_relaying(now, reports);
                }
                _ => {
                    self.stats.foreign += 1;
                    return;
                }
            }
        }
        match split_header(inner) {
            Ok((FrameKind::Handshake, _)) => match HandshakeMessage::decode(inner) {
                Ok(message) => self.handle_handshake(now, server, message),
                Err(_) => self.stats.malformed += 1,
            },
            Ok((FrameKind::Data, _)) => self.handle_data(now, server, inner),
            _ => self.stats.malformed += 1,
        }
    }

    fn handle_data(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let (Some(secured), Some(path)) = (&mut self.secured, self.path) else {
            self.stats.early += 1;
            return;
        };
        if path.remote != from {
            self.stats.foreign += 1;
            return;
        }
        match secured.opener.open(bytes) {
            Ok(payload) => secured.channel.handle_datagram(now, &payload),
            Err(OpenError::Forged) => self.stats.forged += 1,
            Err(OpenError::Replayed | OpenError::TooOld) => self.stats.replayed += 1,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self
            .close_unconfirmed_deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            self.finish(LinkEvent::Closed {
                reason: "closed; the other peer left before confirming".into(),
            });
            return;
        }
        self.rendezvous.handle_timeout(now);
        if self.relay_early_at.is_some_and(|at| now >= at) {
            self.relay_early_at = None;
            if let Some(puncher) = self.puncher.as_mut().filter(|p| !p.heard_from_peer()) {
                if self.path.is_none() {
                    let reports = puncher.give_up();
                    self.start_relaying(now, reports);
                }
            }
        }
        if let Some(puncher) = &mut self.puncher {
            puncher.handle_timeout(now);
        }
        if let Some(handshake) = &mut self.handshake {
            handshake.handle_timeout(now);
        }
        if let Some(secured) = &mut self.secured {
            secured.channel.handle_timeout(now);
        }
        self.pump(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.rendezvous.poll_timeout(),
            self.puncher.as_ref().and_then(Puncher::poll_timeout),
            self.relay_early_at.filter(|_| self.path.is_none()),
            self.handshake.as_ref().and_then(Handshake::poll_timeout),
            self.secured.as_ref().and_then(|s| s.channel.poll_timeout()),
            self.close_unconfirmed_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(bytes) = self.rendezvous.poll_transmit() {
            return Some(Transmit {
                to: self.rendezvous.server(),
                bytes,
            });
        }
        if std::mem::take(&mut self.relay_hello) {
            if let Some(route) = self.rendezvous.relay_route() {
                return Some(on_path(self.rendezvous.server(), Some(route), Vec::new()));
            }
        }
        if let Some((to, message)) = self.puncher.as_mut().and_then(Puncher::poll_transmit) {
            let bytes = message.encode().expect("punch messages are small");
            return Some(Transmit { to, bytes });
        }
        let to = self.path?.remote;
        let route = match (self.relayed, self.rendezvous.relay_route()) {
            (false, _) => None,
            (true, Some(route)) => Some(route),
            (true, None) => {
                self.discard_unroutable(now);
                return None;
            }
        };
        if let Some(message) = self.handshake.as_mut().and_then(Handshake::poll_transmit) {
            let bytes = message.encode().expect("handshake messages are bounded");
            return Some(on_path(to, route, bytes));
        }
        let secured = self.secured.as_mut()?;
        let payload = secured.channel.poll_transmit(now)?;
        let bytes = secured.sealer.seal(now, &payload);
        Some(on_path(to, route, bytes))
    }

    /// Drops what the handshake and the channel would send while the relay
    /// has no route. The channel sees the loss and retransmits with backoff;
    /// holding the frames back instead would leave its timers due and
    /// unanswered, and its driver spinning.
    fn discard_unroutable(&mut self, now: Instant) {
        while self
            .handshake
            .as_mut()
            .and_then(Handshake::poll_transmit)
            .is_some()
        {
            self.stats.unroutable += 1;
        }
        if let Some(secured) = &mut self.secured {
            while secured.channel.poll_transmit(now).is_some() {
                self.stats.unroutable += 1;
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        let secured = self.secured.as_mut()?;
        let event = match secured.channel.poll_event()? {
            reliable::Event::Message(message) => LinkEvent::Message(message),
            reliable::Event::Acknowledged(id) => LinkEvent::Acknowledged(id),
            reliable::Event::Closed { reason } => {
                self.done = true;
                LinkEvent::Closed {
                    reason: reason.to_string(),
                }
            }
            reliable::Event::TimedOut => {
                self.done = true;
                LinkEvent::Closed {
                    reason: format!(
                        "the other peer went silent for {} s",
                        self.config.channel.idle_timeout.as_secs()
                    ),
                }
            }
        };
        Some(event)
    }

    /// Moves events from the rendezvous client and the puncher forward.
    fn pump(&mut self, now: Instant) {
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
                } => self.start_punching(now, session_id, role, reflexive, host_candidates),
                RendezvousEvent::Failed(error) => self.finish(LinkEvent::Failed(error)),
            }
        }
        while let Some(event) = self.puncher.as_mut().and_then(Puncher::poll_event) {
            match event {
                PunchEvent::Connected(path) => {
                    self.rendezvous.leave();
                    self.start_handshake(now, path);
                }
                PunchEvent::Failed(reports) => match self.rendezvous.relay_route() {
                    Some(_) if self.config.relay => self.start_relaying(now, reports),
                    _ => {
                        self.rendezvous.leave();
                        let no_relay = if self.config.relay {
                            NoRelay::ServerOff
                        } else {
                            NoRelay::Declined
                        };
                        self.finish(LinkEvent::Failed(ConnectError::PunchFailed {
                            reports,
                            no_relay,
                        }));
                    }
                },
            }
        }
        while let Some(event) = self.handshake.as_mut().and_then(Handshake::poll_event) {
            match event {
                HandshakeEvent::Done(keys) => {
                    let session_id = self.puncher.as_ref().map_or(0, Puncher::session_id);
                    // A sealed payload must fit one datagram, with the relay
                    // header too on the relay.
                    let relay_header = if self.relayed { RELAY_HEADER_LEN } else { 0 };
                    let mut channel = self.config.channel.clone();
                    channel.max_payload = channel
                        .max_payload
                        .min(DataHeader::MAX_PAYLOAD - seal::TAG_LEN - relay_header);
                    self.secured = Some(Secured {
                        channel: Connection::new(channel, now),
                        sealer: Sealer::new(now, session_id, keys.cipher, keys.send),
                        opener: Opener::new(keys.cipher, keys.receive),
                    });
                    self.events.push_back(LinkEvent::Connected {
                        path: self.path.expect("the handshake runs on a path"),
                        elapsed: now - self.started,
                        remote_key: keys.remote_static,
                        cipher: keys.cipher,
                    });
                }
                HandshakeEvent::Failed(HandshakeError::TimedOut) if self.relayed => {
                    self.finish(LinkEvent::Failed(ConnectError::RelayUnanswered))
                }
                HandshakeEvent::Failed(error) => {
                    self.finish(LinkEvent::Failed(ConnectError::Handshake(error)))
                }
            }
        }
    }

    fn start_punching(
        &mut self,
        now: Instant,
        session_id: u64,
        role: Role,
        reflexive: SocketAddr,
        host_candidates: Vec<SocketAddr>,
    ) {
        if self.path.is_some() {
            return;
        }
        self.role = role;
        let candidates: Vec<_> = host_candidates
            .into_iter()
            .filter(|&addr| addr != reflexive)
            .map(|addr| (addr, CandidateKind::Host))
            .chain([(reflexive, CandidateKind::Reflexive)])
            .collect();
        self.events.push_back(LinkEvent::Introduced {
            role,
            candidates: candidates.clone(),
        });
        self.puncher = Some(Puncher::new(
            now,
            self.config.punch.clone(),
            session_id,
            role,
            candidates,
            self.seed ^ session_id,
        ));
        if self.config.relay && self.rendezvous.relay_route().is_some() {
            self.relay_hello = true;
            if role == Role::Controlling {
                self.relay_early_at = Some(now + self.config.relay_after);
            }
        }
    }

    /// Runs the session through the rendezvous's relay. The rendezvous
    /// stays: it carries the session now, and refreshes keep the
    /// registration and the NAT mapping to it alive.
    fn start_relaying(&mut self, now: Instant, reports: Vec<CandidateReport>) {
        self.relayed = true;
        self.relay_early_at = None;
        self.events.push_back(LinkEvent::Relaying { reports });
        let path = Path {
            remote: self.rendezvous.server(),
            kind: CandidateKind::Relayed,
            rtt: None,
        };
        self.start_handshake(now, path);
    }

    fn start_handshake(&mut self, now: Instant, path: Path) {
        self.path = Some(path);
        let session_id = self.puncher.as_ref().map_or(0, Puncher::session_id);
        self.handshake = Some(Handshake::new(
            now,
            session_id,
            self.role,
            self.trust.clone(),
            self.local_secret,
            self.config.fast_aes,
        ));
    }

    fn finish(&mut self, event: LinkEvent) {
        if !self.done {
            self.done = true;
            self.events.push_back(event);
        }
    }
}

/// A peer-to-peer frame as it goes out: as it is on a direct path, inside a
/// relay request along `route` on the relay.
fn on_path(to: SocketAddr, route: Option<RelayRoute>, frame: Vec<u8>) -> Transmit {
    let Some(RelayRoute {
        session_id,
        peer_token,
    }) = route
    else {
        return Transmit { to, bytes: frame };
    };
    let request = RelayRequest {
        session_id,
        peer_token,
        inner: &frame,
    };
    let bytes = request
        .encode()
        .expect("on the relay, frames leave room for the relay header");
    Transmit { to, bytes }
}
