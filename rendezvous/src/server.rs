//! The rendezvous state machine: rooms, registrations, introductions, the
//! relay for peers that cannot punch, and the STUN responder. No sockets, no
//! clock: the driver feeds it datagrams and timeouts with the current time
//! and sends what it queues.
//!
//! The relay forwards a frame only between the two members of a session
//! in progress, only from a member that shows its registration token and
//! sends from its registered address, and only to a member that has done the
//! same (so it asked for the traffic and receives at that address). The
//! forwarded frame is shorter than the request (the token is stripped), and
//! each session has a byte rate, so the relay amplifies nothing and one pair
//! cannot take the whole server.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natter_wire::{
    classify, split_header, stun, BusyReason, Class, ClientMessage, FrameKind, NatMapping,
    Register, RejoinTag, RelayRequest, Role, RoomCode, ServerErrorKind, ServerMessage, WireError,
    REGISTER_PADDED_LEN,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cookie::CookieJar;
use crate::listeners::Listeners;
use crate::rate_limit::{address_key, source_key, Bucket, RateLimit, RateLimiter};
use crate::stats::{DropReason, Stats};

#[derive(Debug, Clone)]
pub struct Config {
    /// How often peers must refresh their registration.
    pub refresh_interval: Duration,
    /// A registration expires after this many refresh intervals without one.
    pub missed_refreshes: u32,
    /// Most peers registered at once, over all rooms.
    pub max_peers: usize,
    /// Datagrams from one source address and port.
    pub rate_limit: RateLimit,
    /// Datagrams from one address (IPv6: /64), all its ports together.
    pub address_rate_limit: RateLimit,
    /// Bytes per second the server relays for each peer of a session (0: no
    /// relay).
    pub relay_rate: u32,
    /// Datagrams per second, from all sources together, above which the
    /// server is under load: it then serves only sources that echo an
    /// address cookie, and keeps no state for the others.
    pub load_threshold: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(15),
            missed_refreshes: 3,
            max_peers: 100_000,
            rate_limit: RateLimit {
                per_second: 20.0,
                burst: 40.0,
                max_sources: 65_536,
            },
            // A peer sends a datagram or two a second while it registers and
            // one every refresh interval after: 2 000/s lets about a
            // thousand peers behind one carrier-grade NAT register at the
            // same moment, and holds one host rotating its ports to a small
            // share of what one core answers (over a million a second).
            address_rate_limit: RateLimit {
                per_second: 2_000.0,
                burst: 4_000.0,
                max_sources: 65_536,
            },
            relay_rate: 1 << 20,
            // A third of what the tokio server answers over loopback on a
            // 2-core machine (161 000 STUN/s, the `rendezvous` bench), so it
            // asks for cookies before it falls behind; 100 000 registered
            // peers send about 13 000 a second.
            load_threshold: 50_000.0,
        }
    }
}

/// Once over its load threshold, the server stays under load this long
/// (WireGuard's figure): while the flood lasts no unvalidated datagram gets
/// in, not even the share the threshold's refill would let through.
const LOAD_HOLD: Duration = Duration::from_secs(1);

/// `Busy` replies per second, all sources together: a flood is answered
/// only this much, however large it is. A `Busy` is a sixth of the Register
/// it answers at most, so answering up to this rate costs less than
/// receiving it, and an honest peer caught in a flood of Registers gets its
/// cookie at the first try (with 10 000/s, a 50 000/s flood of Registers
/// delayed some peers of the flood test by 2 s).
const BUSY_REPLIES_PER_SECOND: f32 = 50_000.0;

/// How long a peer told the server is under load waits before it asks
/// again with its cookie: long enough to spread a crowd's retries out.
const UNDER_LOAD_RETRY: Duration = Duration::from_millis(100);

/// Why a datagram was set aside before it was handled, and what its sender
/// is told.
struct Shed {
    drop: DropReason,
    reason: BusyReason,
    retry_after: Duration,
    /// The server is under load: the answer carries a cookie.
    under_load: bool,
}

/// A datagram the driver should send, from the socket numbered `via`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub via: usize,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
struct Member {
    token: u64,
    reflexive: SocketAddr,
    via: usize,
    host_candidates: Box<[SocketAddr]>,
    /// How its NAT maps, as it said; `None` from a build that does not say
    /// (and cannot read the other peer's either).
    nat: Option<NatMapping>,
    /// Its port mapping, as it said.
    mapped: Option<SocketAddr>,
    /// Its tag for registering again after a restart.
    rejoin: Option<RejoinTag>,
    last_seen: Instant,
    /// Sent a relay request with its token from `reflexive`: it takes
    /// relayed frames there, and may relay what this budget holds
    /// (`relay_rate` a second, from its first request).
    relay: Option<Bucket>,
}

/// Up to two members; the first registered is the controlling one.
#[derive(Debug, Default)]
struct Room {
    members: Vec<Member>,
    session_id: Option<u64>,
    /// The member whose restart began this session (see `Register::rejoin`).
    restarted: Option<usize>,
}

/// Relay bursts may use a quarter of a second of the rate at once.
const RELAY_BURST_SECONDS: f32 = 0.25;

impl Room {
    /// Forgets the session, its relay index entry and budget.
    fn end_session(&mut self, sessions: &mut HashMap<u64, RoomCode>) {
        if let Some(session_id) = self.session_id.take() {
            sessions.remove(&session_id);
        }
        self.restarted = None;
        for member in &mut self.members {
            member.relay = None;
        }
    }
}

pub struct Server {
    config: Config,
    rooms: HashMap<RoomCode, Room>,
    /// The room of each session in progress, for relay requests.
    sessions: HashMap<u64, RoomCode>,
    peers: usize,
    limiter: RateLimiter<SocketAddr>,
    address_limiter: RateLimiter<IpAddr>,
    /// All datagrams but relayed ones: empty means under load.
    load: Option<Bucket>,
    under_load_until: Option<Instant>,
    busy_replies: Option<Bucket>,
    cookies: CookieJar,
    listeners: Listeners,
    transmits: VecDeque<Transmit>,
    next_sweep: Option<Instant>,
    stats: Stats,
    rng: StdRng,
}

impl Server {
    pub fn new(config: Config) -> Self {
        Self::with_rng(config, StdRng::from_entropy())
    }

    /// A server whose tokens and session ids come from `seed`, for tests.
    pub fn with_seed(config: Config, seed: u64) -> Self {
        Self::with_rng(config, StdRng::seed_from_u64(seed))
    }

    fn with_rng(config: Config, mut rng: StdRng) -> Self {
        Self {
            load: None,
            under_load_until: None,
            busy_replies: None,
            cookies: CookieJar::new(&mut rng),
            listeners: Listeners::default(),
            limiter: RateLimiter::new(config.rate_limit),
            address_limiter: RateLimiter::new(config.address_rate_limit),
            config,
            rooms: HashMap::new(),
            sessions: HashMap::new(),
            peers: 0,
            transmits: VecDeque::new(),
            next_sweep: None,
            stats: Stats::default(),
            rng,
        }
    }

    /// Where the sockets the driver numbers `via` are bound: STUN answers
    /// name another of them, and answer from another when asked.
    pub fn set_listeners(&mut self, listeners: Listeners) {
        self.listeners = listeners;
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Entries in the rate-limit tables: per source (address and port), and
    /// per address.
    pub fn tracked_sources(&self) -> (usize, usize) {
        (
            self.limiter.tracked_sources(),
            self.address_limiter.tracked_sources(),
        )
    }

    /// One datagram received on socket `via` from `from` (as `recv_from`
    /// reported it, with IPv4-mapped IPv6 addresses made canonical).
    pub fn handle_datagram(&mut self, now: Instant, via: usize, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        self.next_sweep
            .get_or_insert(now + self.config.refresh_interval);
        // Relayed sessions carry bulk data: they have their own byte rate
        // instead of the per-source datagram rate meant for control traffic.
        if bytes.first() == Some(&(FrameKind::Relay as u8)) {
            return self.handle_relay(now, from, bytes);
        }
        let threshold = self.config.load_threshold;
        let over = !self
            .load
            .get_or_insert_with(|| Bucket::full(now, threshold))
            .take(now, threshold, threshold, 1.0);
        if over {
            self.under_load_until = Some(now + LOAD_HOLD);
        }
        let under_load = self.under_load_until.is_some_and(|until| now < until);
        if under_load {
            // Decoded once here, for the cookie and for the answer.
            let register = padded_register(bytes);
            if !self.proves_address(now, from, register.as_ref()) {
                let shed = Shed {
                    drop: DropReason::UnderLoad,
                    reason: BusyReason::UnderLoad,
                    retry_after: UNDER_LOAD_RETRY,
                    under_load,
                };
                return self.shed(now, via, from, bytes.len(), register, shed);
            }
        }
        // The address's aggregate first: one host rotating its ports must
        // not fill the per-port table.
        if let Err(retry_after) = self.address_limiter.allow(now, address_key(from.ip())) {
            let shed = Shed {
                drop: DropReason::AddressRateLimited,
                reason: BusyReason::RateLimited,
                retry_after,
                under_load,
            };
            return self.shed(now, via, from, bytes.len(), padded_register(bytes), shed);
        }
        if let Err(retry_after) = self.limiter.allow(now, source_key(from)) {
            let shed = Shed {
                drop: DropReason::RateLimited,
                reason: BusyReason::RateLimited,
                retry_after,
                under_load,
            };
            return self.shed(now, via, from, bytes.len(), padded_register(bytes), shed);
        }
        match classify(bytes) {
            Class::Stun => self.handle_stun(via, from, bytes),
            Class::Natter => self.handle_frame(now, via, from, bytes),
            Class::Unknown => self.stats.drop(DropReason::UnknownProtocol),
        }
    }

    /// Expires registrations that stopped refreshing and idle rate buckets.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.next_sweep else { return };
        if now < due {
            return;
        }
        let lifetime = self.config.refresh_interval * self.config.missed_refreshes;
        let mut expired = 0;
        let sessions = &mut self.sessions;
        self.rooms.retain(|_, room| {
            let before = room.members.len();
            room.members
                .retain(|member| now.saturating_duration_since(member.last_seen) < lifetime);
            expired += before - room.members.len();
            if room.members.len() < 2 {
                room.end_session(sessions);
            }
            !room.members.is_empty()
        });
        self.peers -= expired;
        self.stats.expired += expired as u64;
        self.limiter.sweep(now);
        self.address_limiter.sweep(now);
        self.next_sweep = Some(now + self.config.refresh_interval);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let transmit = self.transmits.pop_front()?;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += transmit.bytes.len() as u64;
        Some(transmit)
    }

    /// Whether `register` carries `from`'s cookie.
    fn proves_address(
        &mut self,
        now: Instant,
        from: SocketAddr,
        register: Option<&Register>,
    ) -> bool {
        match register.and_then(|r| r.cookie) {
            Some(cookie) => self.cookies.accepts(now, &mut self.rng, from, &cookie),
            None => false,
        }
    }

    /// Drops a datagram of `request_len` bytes that was not let in, and
    /// tells a registering peer why, when the reply budget allows: only a
    /// (padded) `register` is answered, since its padding makes it larger
    /// than any `Busy`, and it carries the nonce its sender matches answers
    /// by.
    fn shed(
        &mut self,
        now: Instant,
        via: usize,
        from: SocketAddr,
        request_len: usize,
        register: Option<Register>,
        shed: Shed,
    ) {
        self.stats.drop(shed.drop);
        let Some(register) = register else {
            return;
        };
        let budget = self
            .busy_replies
            .get_or_insert_with(|| Bucket::full(now, BUSY_REPLIES_PER_SECOND));
        if !budget.take(now, BUSY_REPLIES_PER_SECOND, BUSY_REPLIES_PER_SECOND, 1.0) {
            return;
        }
        let busy = ServerMessage::Busy {
            client_nonce: register.client_nonce,
            reason: shed.reason,
            retry_after_ms: shed.retry_after.as_millis().try_into().unwrap_or(u32::MAX),
            cookie: shed
                .under_load
                .then(|| self.cookies.issue(now, &mut self.rng, from)),
        };
        let reply = busy.encode().expect("Busy is built within the wire limits");
        // Never more bytes to a source than it sent: the server is no
        // amplifier, least of all for sources that proved nothing.
        if reply.len() <= request_len {
            self.stats.busy_replies += 1;
            self.send(via, from, reply);
        }
    }

    fn handle_stun(&mut self, via: usize, from: SocketAddr, bytes: &[u8]) {
        match stun::parse(bytes) {
            Ok(stun::Message::BindingRequest {
                transaction,
                change,
            }) => {
                // A request to answer from elsewhere that cannot be met is
                // dropped: answering from here would tell the peer its NAT
                // lets in what it may not.
                let Some(answering) = self.listeners.answering(via, from, change) else {
                    return self.stats.drop(DropReason::StunCannotChange);
                };
                self.stats.accepted += 1;
                self.stats.stun_responses += 1;
                let other = self.listeners.other_address(answering, from);
                self.send(
                    answering,
                    from,
                    stun::binding_success(transaction, from, other),
                );
            }
            Ok(_) => self.stats.drop(DropReason::StunNotBindingRequest),
            Err(_) => self.stats.drop(DropReason::StunMalformed),
        }
    }

    fn handle_frame(&mut self, now: Instant, via: usize, from: SocketAddr, bytes: &[u8]) {
        let message = split_header(bytes).and_then(|_| ClientMessage::decode(bytes));
        match message {
            Ok(ClientMessage::Register(register)) => {
                if bytes.len() < REGISTER_PADDED_LEN {
                    return self.stats.drop(DropReason::Unpadded);
                }
                self.handle_register(now, via, from, register);
            }
            Ok(ClientMessage::Leave { room, peer_token }) => self.handle_leave(&room, peer_token),
            Err(WireError::UnsupportedVersion { .. }) => {
                // Tell a peer of another version which one we speak; the
                // notice is two bytes, so it amplifies nothing.
                if bytes[0] == FrameKind::ToServer as u8 {
                    self.send(via, from, ServerMessage::version_notice().to_vec());
                }
                self.stats.drop(DropReason::UnsupportedVersion);
            }
            Err(WireError::WrongKind { .. }) => self.stats.drop(DropReason::WrongKind),
            Err(_) => self.stats.drop(DropReason::Malformed),
        }
    }

    /// Forwards a frame from one member of a session to the other.
    fn handle_relay(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(request) = RelayRequest::parse(bytes) else {
            return self.stats.drop(DropReason::Malformed);
        };
        if self.config.relay_rate == 0 {
            return self.stats.drop(DropReason::RelayOff);
        }
        let Some(room) = self
            .sessions
            .get(&request.session_id)
            .and_then(|code| self.rooms.get_mut(code))
        else {
            return self.stats.drop(DropReason::RelayUnknownSession);
        };
        let Some(index) = room
            .members
            .iter()
            .position(|m| m.token == request.peer_token && m.reflexive == from)
        else {
            return self.stats.drop(DropReason::BadToken);
        };
        let rate = self.config.relay_rate as f32;
        let burst = rate * RELAY_BURST_SECONDS;
        let sender = &mut room.members[index];
        sender.relay.get_or_insert_with(|| Bucket::full(now, burst));
        sender.last_seen = now;
        if request.inner.is_empty() {
            // A hello: the peer will take relayed frames from now on.
            self.stats.accepted += 1;
            return;
        }
        let receiver = &room.members[1 - index];
        if receiver.relay.is_none() {
            return self.stats.drop(DropReason::RelayPeerNotReady);
        }
        let (via, to) = (receiver.via, receiver.reflexive);
        let budget = room.members[index]
            .relay
            .as_mut()
            .expect("the sender's budget was made above");
        if !budget.take(now, rate, burst, bytes.len() as f32) {
            return self.stats.drop(DropReason::RelayRateLimited);
        }
        self.stats.accepted += 1;
        self.stats.relayed += 1;
        self.stats.relayed_bytes += bytes.len() as u64;
        self.send(via, to, request.forwarded());
    }

    fn handle_register(&mut self, now: Instant, via: usize, from: SocketAddr, register: Register) {
        let Register {
            room: code,
            host_candidates,
            client_nonce,
            peer_token,
            claim,
            cookie: _,
            nat,
            mapped,
            rejoin,
        } = register;
        let members = self
            .rooms
            .get(&code)
            .map_or(&[][..], |r| r.members.as_slice());
        let occupied = members.len();
        let known = match peer_token {
            Some(token) => match members.iter().position(|m| m.token == token) {
                Some(index) => Some(index),
                None => return self.refuse(via, from, client_nonce, ServerErrorKind::BadToken),
            },
            // A tokenless Register from an address already in the room is
            // that peer retrying because our reply was lost. One with the
            // tag of a member of a full room is that peer started again
            // (the one heard from least recently, should both have the
            // tag). Not in a room with space: two processes of one identity
            // (a user trying natter on one machine) pair with each other.
            None => members
                .iter()
                .position(|m| m.reflexive == from)
                .or_else(|| {
                    let tag = rejoin?;
                    (occupied >= 2).then_some(())?;
                    (0..occupied)
                        .filter(|&i| members[i].rejoin == Some(tag))
                        .min_by_key(|&i| members[i].last_seen)
                }),
        };

        if let Some(index) = known {
            let room = self
                .rooms
                .get_mut(&code)
                .expect("the member was found above");
            let member = &mut room.members[index];
            let rebound = member.reflexive != from;
            if peer_token.is_none() && rebound {
                // A new process: the old one's token (and relaying) end.
                member.token = self.rng.gen();
                member.relay = None;
            }
            // A port mapping that appeared (or changed) after the peer
            // registered is a new way in: the other peer must hear of it.
            let newly_mapped = mapped.is_some() && member.mapped != mapped;
            member.reflexive = from;
            member.via = via;
            member.host_candidates = host_candidates.into_boxed_slice();
            member.nat = nat;
            member.mapped = mapped;
            member.last_seen = now;
            let token = member.token;
            self.stats.accepted += 1;
            self.registered(via, from, client_nonce, token);
            if peer_token.is_none() && rebound {
                self.introduce_after_restart(&code, index);
            } else if rebound || newly_mapped {
                // The peer's NAT gave it a new mapping, or its gateway a
                // port mapping: both sides must punch again towards the new
                // address.
                self.introduce(&code);
            } else {
                // Repeat the introduction in case it was lost.
                self.reintroduce(&code, index);
            }
            return;
        }

        if claim && occupied > 0 {
            return self.refuse(via, from, client_nonce, ServerErrorKind::RoomTaken);
        }
        if occupied >= 2 {
            return self.refuse(via, from, client_nonce, ServerErrorKind::RoomFull);
        }
        if self.peers >= self.config.max_peers {
            return self.refuse(via, from, client_nonce, ServerErrorKind::ServerFull);
        }
        let token = self.rng.gen();
        let room = self.rooms.entry(code.clone()).or_default();
        room.members.push(Member {
            token,
            reflexive: from,
            via,
            host_candidates: host_candidates.into_boxed_slice(),
            nat,
            mapped,
            rejoin,
            last_seen: now,
            relay: None,
        });
        let full = room.members.len() == 2;
        self.peers += 1;
        self.stats.accepted += 1;
        self.stats.registrations += 1;
        self.registered(via, from, client_nonce, token);
        if full {
            self.introduce(&code);
        }
    }

    fn handle_leave(&mut self, code: &RoomCode, token: u64) {
        let Some(room) = self.rooms.get_mut(code) else {
            return self.stats.drop(DropReason::BadToken);
        };
        let Some(index) = room.members.iter().position(|m| m.token == token) else {
            return self.stats.drop(DropReason::BadToken);
        };
        room.members.remove(index);
        room.end_session(&mut self.sessions);
        if room.members.is_empty() {
            self.rooms.remove(code);
        }
        self.peers -= 1;
        self.stats.accepted += 1;
    }

    fn registered(&mut self, via: usize, to: SocketAddr, client_nonce: u64, peer_token: u64) {
        let reply = ServerMessage::Registered {
            client_nonce,
            reflexive: to,
            peer_token,
            refresh_interval_ms: self.config.refresh_interval.as_millis() as u32,
            relay_rate: self.config.relay_rate,
        };
        self.send_message(via, to, &reply);
    }

    fn refuse(&mut self, via: usize, to: SocketAddr, client_nonce: u64, kind: ServerErrorKind) {
        self.stats.refused += 1;
        self.send_message(via, to, &ServerMessage::Error { client_nonce, kind });
    }

    /// Starts a new session in a full room: both members are told about each
    /// other in the same call, so the driver sends both back to back.
    fn introduce(&mut self, code: &RoomCode) {
        self.introduce_as(code, None);
    }

    /// Introduces the pair again after member `index` was replaced by a
    /// restart of itself: the other is told its session is over.
    fn introduce_after_restart(&mut self, code: &RoomCode, index: usize) {
        self.introduce_as(code, Some(index));
    }

    fn introduce_as(&mut self, code: &RoomCode, restarted: Option<usize>) {
        let session_id = self.rng.gen();
        self.stats.introductions += 1;
        if let Some(room) = self.rooms.get_mut(code) {
            room.end_session(&mut self.sessions);
            room.session_id = Some(session_id);
            room.restarted = restarted;
            self.sessions.insert(session_id, code.clone());
        }
        for index in 0..2 {
            self.reintroduce(code, index);
        }
    }

    fn reintroduce(&mut self, code: &RoomCode, index: usize) {
        let Some(room) = self.rooms.get(code) else {
            return;
        };
        let (Some(session_id), [first, second]) = (room.session_id, room.members.as_slice()) else {
            return;
        };
        let (me, other, your_role) = if index == 0 {
            (first, second, Role::Controlling)
        } else {
            (second, first, Role::Controlled)
        };
        let message = ServerMessage::Introduce {
            session_id,
            your_role,
            other_reflexive: other.reflexive,
            other_host_candidates: other.host_candidates.to_vec(),
            other_nat: me.nat.map(|_| other.nat.unwrap_or(NatMapping::Unknown)),
            other_mapped: me.nat.and(other.mapped),
            other_restarted: me.rejoin.is_some() && room.restarted == Some(1 - index),
        };
        let (via, to) = (me.via, me.reflexive);
        self.send_message(via, to, &message);
    }

    fn send_message(&mut self, via: usize, to: SocketAddr, message: &ServerMessage) {
        let bytes = message
            .encode()
            .expect("server messages are built within the wire limits");
        self.send(via, to, bytes);
    }

    fn send(&mut self, via: usize, to: SocketAddr, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit { via, to, bytes });
    }
}

/// A Register padded as the protocol requires, or nothing.
fn padded_register(bytes: &[u8]) -> Option<Register> {
    if bytes.len() < REGISTER_PADDED_LEN {
        return None;
    }
    match ClientMessage::decode(bytes) {
        Ok(ClientMessage::Register(register)) => Some(register),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DropReason;
    use natter_wire::{AddressCookie, MAX_HOST_CANDIDATES, VERSION};

    const A: &str = "198.51.100.1:40000";
    const B: &str = "203.0.113.2:50000";
    const C: &str = "192.0.2.3:60000";

    struct Harness {
        server: Server,
        now: Instant,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_config(Config::default())
        }

        fn with_config(config: Config) -> Self {
            Self {
                server: Server::with_seed(config, 7),
                now: Instant::now(),
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.server.handle_timeout(self.now);
        }

        fn send(&mut self, from: &str, message: ClientMessage) -> Vec<(SocketAddr, ServerMessage)> {
            self.send_raw(from, &message.encode().unwrap())
        }

        fn send_raw(&mut self, from: &str, bytes: &[u8]) -> Vec<(SocketAddr, ServerMessage)> {
            self.server
                .handle_datagram(self.now, 0, from.parse().unwrap(), bytes);
            std::iter::from_fn(|| self.server.poll_transmit())
                .map(|t| (t.to, ServerMessage::decode(&t.bytes).unwrap()))
                .collect()
        }

        fn register(&mut self, from: &str, token: Option<u64>) -> Vec<(SocketAddr, ServerMessage)> {
            self.send(from, register("room", token))
        }

        fn token(&mut self, from: &str) -> u64 {
            match self.register(from, None).first() {
                Some((_, ServerMessage::Registered { peer_token, .. })) => *peer_token,
                other => panic!("expected Registered, got {other:?}"),
            }
        }
    }

    fn register(room: &str, peer_token: Option<u64>) -> ClientMessage {
        ClientMessage::Register(Register {
            room: RoomCode::new(room.as_bytes()).unwrap(),
            host_candidates: vec!["192.168.1.10:40000".parse().unwrap()],
            client_nonce: 5,
            peer_token,
            claim: false,
            cookie: None,
            nat: None,
            mapped: None,
            rejoin: None,
        })
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A port mapping that appears after both registered introduces them
    /// again, with it; the same mapping again does not.
    #[test]
    fn a_new_port_mapping_introduces_the_peers_again() {
        let mut h = Harness::new();
        let with = |mapped: Option<&str>, token| {
            let ClientMessage::Register(mut register) = register("room", token) else {
                unreachable!()
            };
            register.nat = Some(NatMapping::Unknown);
            register.mapped = mapped.map(addr);
            ClientMessage::Register(register)
        };
        let replies = h.send(A, with(None, None));
        let Some((_, ServerMessage::Registered { peer_token, .. })) = replies.first() else {
            panic!("{replies:?}")
        };
        let token = *peer_token;
        h.send(B, with(None, None));
        let mapped = "198.51.100.1:41000";
        let replies = h.send(A, with(Some(mapped), Some(token)));
        let to_b = replies.iter().find_map(|(to, m)| match m {
            ServerMessage::Introduce { other_mapped, .. } if *to == addr(B) => Some(*other_mapped),
            _ => None,
        });
        assert_eq!(to_b, Some(Some(addr(mapped))), "{replies:?}");
        assert_eq!(h.server.stats().introductions, 2);
        h.send(A, with(Some(mapped), Some(token)));
        assert_eq!(h.server.stats().introductions, 2, "the same mapping again");
    }

    /// A peer that says how its NAT maps hears how the other's does (or
    /// that it did not say); one that does not say hears nothing of it, as
    /// a build from before the field expects.
    #[test]
    fn the_nat_mapping_goes_only_to_peers_that_gave_theirs() {
        let mut h = Harness::new();
        let hard = NatMapping::EndpointDependent {
            sequential_step: None,
        };
        let ClientMessage::Register(mut with_nat) = register("room", None) else {
            unreachable!()
        };
        with_nat.nat = Some(hard);
        h.send(A, ClientMessage::Register(with_nat));
        let replies = h.register(B, None);
        let other_nat = |to: &str| {
            replies.iter().find_map(|(at, m)| match m {
                ServerMessage::Introduce { other_nat, .. } if *at == addr(to) => Some(*other_nat),
                _ => None,
            })
        };
        assert_eq!(other_nat(A), Some(Some(NatMapping::Unknown)));
        assert_eq!(other_nat(B), Some(None));
    }

    #[test]
    fn registration_reports_the_observed_address() {
        let mut h = Harness::new();
        let replies = h.register(A, None);
        let [(
            to,
            ServerMessage::Registered {
                client_nonce,
                reflexive,
                refresh_interval_ms,
                ..
            },
        )] = replies.as_slice()
        else {
            panic!("unexpected replies {replies:?}");
        };
        assert_eq!((*to, *reflexive, *client_nonce), (addr(A), addr(A), 5));
        assert_eq!(*refresh_interval_ms, 15_000);
        assert_eq!((h.server.peers(), h.server.rooms()), (1, 1));
    }

    #[test]
    fn second_peer_triggers_simultaneous_introduction() {
        let mut h = Harness::new();
        h.register(A, None);
        let replies = h.register(B, None);
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert!(matches!(replies[0], (to, ServerMessage::Registered { .. }) if to == addr(B)));
        let introductions: Vec<_> = replies[1..]
            .iter()
            .map(|(to, message)| match message {
                ServerMessage::Introduce {
                    session_id,
                    your_role,
                    other_reflexive,
                    other_host_candidates,
                    other_nat: None,
                    other_mapped: None,
                    other_restarted: false,
                } => (
                    *to,
                    *session_id,
                    *your_role,
                    *other_reflexive,
                    other_host_candidates.len(),
                ),
                other => panic!("expected Introduce, got {other:?}"),
            })
            .collect();
        let (to_a, session_a, role_a, other_a, hosts_a) = introductions[0];
        let (to_b, session_b, role_b, other_b, hosts_b) = introductions[1];
        assert_eq!(
            (to_a, other_a, role_a),
            (addr(A), addr(B), Role::Controlling)
        );
        assert_eq!(
            (to_b, other_b, role_b),
            (addr(B), addr(A), Role::Controlled)
        );
        assert_eq!(session_a, session_b);
        assert_eq!((hosts_a, hosts_b), (1, 1));
        assert_eq!(h.server.stats().introductions, 1);
    }

    #[test]
    fn third_peer_is_refused_with_room_full() {
        let mut h = Harness::new();
        h.register(A, None);
        h.register(B, None);
        let replies = h.register(C, None);
        assert!(matches!(
            replies.as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::RoomFull,
                    ..
                }
            )]
        ));
        assert_eq!(h.server.peers(), 2);
    }

    #[test]
    fn retried_register_from_same_address_keeps_the_token() {
        let mut h = Harness::new();
        let first = h.token(A);
        assert_eq!(h.token(A), first);
        assert_eq!(h.server.peers(), 1);
    }

    #[test]
    fn refresh_repeats_a_lost_introduction() {
        let mut h = Harness::new();
        let token = h.token(A);
        h.register(B, None);
        let replies = h.register(A, Some(token));
        assert!(matches!(
            replies.as_slice(),
            [
                (_, ServerMessage::Registered { .. }),
                (
                    _,
                    ServerMessage::Introduce {
                        your_role: Role::Controlling,
                        ..
                    }
                )
            ]
        ));
    }

    #[test]
    fn registrations_expire_after_missed_refreshes() {
        let mut h = Harness::new();
        let token = h.token(A);
        h.token(B);
        // A keeps refreshing, B stays silent.
        for _ in 0..4 {
            h.advance(Duration::from_secs(15));
            h.register(A, Some(token));
        }
        assert_eq!(h.server.peers(), 1);
        assert_eq!(h.server.stats().expired, 1);
        // B's slot is free again: a newcomer is introduced to A.
        let replies = h.register(C, None);
        assert_eq!(replies.len(), 3);
        h.advance(Duration::from_secs(60));
        assert_eq!((h.server.peers(), h.server.rooms()), (0, 0));
    }

    /// Two processes of one identity (the same tag) pair with each other
    /// when the room has space.
    #[test]
    fn the_same_tag_twice_in_an_empty_room_is_a_pair() {
        let mut h = Harness::new();
        let ClientMessage::Register(mut register) = register("room", None) else {
            unreachable!()
        };
        register.rejoin = Some(RejoinTag([9; 16]));
        let register = ClientMessage::Register(register);
        assert_eq!(h.send(A, register.clone()).len(), 1);
        assert_eq!(
            h.send(B, register).len(),
            3,
            "registered, two introductions"
        );
        assert_eq!(h.server.peers(), 2);
    }

    /// A peer killed and started again (a new address, no token) takes its
    /// own place back with its rejoin tag; a stranger still finds the room
    /// full, and the old process's token is void.
    #[test]
    fn a_restarted_peer_takes_its_place_back_with_its_rejoin_tag() {
        let mut h = Harness::new();
        let tagged = |tag: u8| {
            let ClientMessage::Register(mut register) = register("room", None) else {
                unreachable!()
            };
            register.rejoin = Some(RejoinTag([tag; 16]));
            ClientMessage::Register(register)
        };
        let old = match h.send(A, tagged(1)).first() {
            Some((_, ServerMessage::Registered { peer_token, .. })) => *peer_token,
            other => panic!("expected Registered, got {other:?}"),
        };
        assert_eq!(
            h.send(B, tagged(2)).len(),
            3,
            "registered, two introductions"
        );
        // A stranger with another tag: the room is full.
        assert!(matches!(
            h.send(C, tagged(3)).as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::RoomFull,
                    ..
                }
            )]
        ));
        // A again, from a new port.
        let restarted = "198.51.100.1:40001";
        let replies = h.send(restarted, tagged(1));
        let new = match replies.first() {
            Some((to, ServerMessage::Registered { peer_token, .. })) if *to == addr(restarted) => {
                *peer_token
            }
            other => panic!("expected Registered, got {other:?}"),
        };
        assert_ne!(new, old);
        // B learns A's new address, and that its session with the old A is
        // over; A is told nothing of the kind about B.
        let restarted_flag = |to: &str| {
            replies.iter().find_map(|(at, m)| match m {
                ServerMessage::Introduce {
                    other_reflexive,
                    other_restarted,
                    ..
                } if *at == addr(to) => Some((*other_reflexive, *other_restarted)),
                _ => None,
            })
        };
        assert_eq!(
            restarted_flag(B),
            Some((addr(restarted), true)),
            "{replies:?}"
        );
        assert_eq!(
            restarted_flag(restarted),
            Some((addr(B), false)),
            "{replies:?}"
        );
        assert_eq!(h.server.peers(), 2);
        assert!(matches!(
            h.register(A, Some(old)).as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::BadToken,
                    ..
                }
            )]
        ));
    }

    #[test]
    fn refresh_and_leave_need_the_right_token() {
        let mut h = Harness::new();
        let token = h.token(A);
        let replies = h.register(A, Some(token ^ 1));
        assert!(matches!(
            replies.as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::BadToken,
                    ..
                }
            )]
        ));
        let room = RoomCode::new(*b"room").unwrap();
        let forged = ClientMessage::Leave {
            room: room.clone(),
            peer_token: token ^ 1,
        };
        assert!(h.send(C, forged).is_empty());
        assert_eq!(h.server.stats().dropped(DropReason::BadToken), 1);
        assert_eq!(h.server.peers(), 1);
        h.send(
            A,
            ClientMessage::Leave {
                room,
                peer_token: token,
            },
        );
        assert_eq!((h.server.peers(), h.server.rooms()), (0, 0));
    }

    #[test]
    fn a_spoofed_register_cannot_redirect_a_peer() {
        let mut h = Harness::new();
        h.token(A);
        // Someone else claims the same room without the token: a new member,
        // never a change to A's address.
        h.register(C, None);
        let replies = h.register(B, None);
        assert!(matches!(
            replies.as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::RoomFull,
                    ..
                }
            )]
        ));
    }

    #[test]
    fn rebinding_updates_the_address_and_reintroduces() {
        let mut h = Harness::new();
        let token = h.token(A);
        h.register(B, None);
        let rebound = "198.51.100.1:40999";
        let replies = h.register(rebound, Some(token));
        assert_eq!(replies.len(), 3, "{replies:?}");
        let introduced_to_b = replies.iter().find_map(|(to, m)| match m {
            ServerMessage::Introduce {
                other_reflexive, ..
            } if *to == addr(B) => Some(*other_reflexive),
            _ => None,
        });
        assert_eq!(introduced_to_b, Some(addr(rebound)));
        assert_eq!(h.server.stats().introductions, 2);
    }

    #[test]
    fn a_claim_on_an_occupied_room_is_refused() {
        let mut h = Harness::new();
        h.register(A, None);
        let ClientMessage::Register(mut claim) = register("room", None) else {
            unreachable!()
        };
        claim.claim = true;
        let replies = h.send(B, ClientMessage::Register(claim.clone()));
        assert!(matches!(
            replies.as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::RoomTaken,
                    ..
                }
            )]
        ));
        // An empty room is claimed, and the claimant's retries are fine.
        claim.room = RoomCode::new(*b"empty").unwrap();
        for _ in 0..2 {
            let replies = h.send(B, ClientMessage::Register(claim.clone()));
            assert!(matches!(
                replies.as_slice(),
                [(_, ServerMessage::Registered { .. })]
            ));
        }
    }

    #[test]
    fn server_full_is_reported() {
        let mut h = Harness::with_config(Config {
            max_peers: 1,
            ..Config::default()
        });
        h.register(A, None);
        let replies = h.send(B, register("other", None));
        assert!(matches!(
            replies.as_slice(),
            [(
                _,
                ServerMessage::Error {
                    kind: ServerErrorKind::ServerFull,
                    ..
                }
            )]
        ));
        assert_eq!(h.server.rooms(), 1);
    }

    #[test]
    fn rate_limit_drops_floods_per_source() {
        let mut h = Harness::new();
        let request = stun::binding_request(stun::TransactionId::new([1; 12]));
        let answered = (0..100).filter(|_| !h.send_raw_stun(A, &request)).count();
        assert_eq!(answered, 40, "the burst allows 40");
        assert_eq!(h.server.stats().dropped(DropReason::RateLimited), 60);
        // Another source is unaffected, and A recovers with time.
        assert!(!h.send_raw_stun(B, &request));
        h.now += Duration::from_millis(100);
        assert!(!h.send_raw_stun(A, &request));
    }

    /// Many peers behind one carrier-grade NAT (one address, a port each)
    /// are limited one by one, not together; one host rotating its ports
    /// meets the address's ceiling.
    #[test]
    fn peers_sharing_an_address_are_limited_apart_up_to_the_address_ceiling() {
        let mut h = Harness::new();
        let request = stun::binding_request(stun::TransactionId::new([2; 12]));
        let peer = |port: u32| format!("198.51.100.7:{}", 10_000 + port);
        // 500 peers, 3 datagrams each at the same instant: all answered.
        let answered = (0..500)
            .flat_map(|port| [port; 3])
            .filter(|&port| !h.send_raw_stun(&peer(port), &request))
            .count();
        assert_eq!(answered, 1500);
        assert_eq!(h.server.stats().dropped(DropReason::RateLimited), 0);
        // One host sending from ever new ports: the address's burst (4 000,
        // of which 1 500 are spent) is the ceiling.
        let rotated = (500..10_500)
            .filter(|&port| !h.send_raw_stun(&peer(port), &request))
            .count();
        assert_eq!(rotated, 2_500);
        let stats = h.server.stats();
        assert_eq!(stats.dropped(DropReason::AddressRateLimited), 7_500);
        // Another address is unaffected.
        assert!(!h.send_raw_stun(B, &request));
    }

    fn busy(replies: &[(SocketAddr, ServerMessage)]) -> (BusyReason, u32, Option<AddressCookie>) {
        match replies {
            [(
                _,
                ServerMessage::Busy {
                    client_nonce: 5,
                    reason,
                    retry_after_ms,
                    cookie,
                },
            )] => (*reason, *retry_after_ms, *cookie),
            other => panic!("expected one Busy, got {other:?}"),
        }
    }

    /// A rate-limited peer hears why and for how long, in fewer bytes than
    /// it sent; garbage over the limit hears nothing.
    #[test]
    fn a_rate_limited_register_is_told_to_retry_later() {
        let mut h = Harness::new();
        for _ in 0..40 {
            h.register(A, None);
        }
        let bytes = register("room", None).encode().unwrap();
        h.server.handle_datagram(h.now, 0, addr(A), &bytes);
        let reply = h.server.poll_transmit().unwrap();
        assert!(reply.bytes.len() < bytes.len());
        let (reason, retry_after_ms, cookie) =
            busy(&[(reply.to, ServerMessage::decode(&reply.bytes).unwrap())]);
        // 20 per second: one token after 50 ms.
        assert_eq!(
            (reason, retry_after_ms, cookie),
            (BusyReason::RateLimited, 50, None)
        );
        assert!(h.send_raw(A, b"\xc1\x01 garbage").is_empty());
        assert_eq!(h.server.stats().dropped(DropReason::RateLimited), 2);
        assert_eq!(h.server.stats().busy_replies, 1);
    }

    /// Under load only a peer that echoes its address's cookie is served,
    /// and the others leave no state behind.
    #[test]
    fn under_load_a_peer_proves_its_address_with_a_cookie() {
        let mut h = Harness::with_config(Config {
            load_threshold: 10.0,
            ..Config::default()
        });
        let request = stun::binding_request(stun::TransactionId::new([3; 12]));
        for i in 0..10 {
            assert!(!h.send_raw_stun(&format!("192.0.2.9:{}", 1000 + i), &request));
        }
        assert!(h.send_raw_stun(C, &request), "STUN is dropped under load");
        let (reason, _, cookie) = busy(&h.register(A, None));
        assert_eq!(reason, BusyReason::UnderLoad);
        let cookie = cookie.expect("a cookie under load");
        assert_eq!((h.server.peers(), h.server.rooms()), (0, 0));

        let with_cookie = |cookie| {
            let mut message = register("room", None);
            if let ClientMessage::Register(register) = &mut message {
                register.cookie = Some(cookie);
            }
            message
        };
        // Another source cannot use A's cookie.
        busy(&h.send(B, with_cookie(cookie)));
        let replies = h.send(A, with_cookie(cookie));
        assert!(
            matches!(replies.as_slice(), [(_, ServerMessage::Registered { .. })]),
            "{replies:?}"
        );
        assert_eq!(h.server.peers(), 1);
        assert_eq!(h.server.stats().dropped(DropReason::UnderLoad), 3);
        let stats = h.server.stats();
        assert_eq!(
            stats.accepted + stats.refused + stats.dropped_total(),
            stats.datagrams_in
        );

        // The load passes: no cookie needed.
        h.now += Duration::from_secs(1);
        assert!(matches!(
            h.register(B, None).first(),
            Some((_, ServerMessage::Registered { .. }))
        ));
    }

    /// However large the flood of Registers, the server answers at most its
    /// budget of `Busy` replies per second.
    #[test]
    fn busy_replies_are_bounded() {
        let mut h = Harness::with_config(Config {
            load_threshold: 1.0,
            ..Config::default()
        });
        let bytes = register("room", None).encode().unwrap();
        let mut replies = 0;
        for i in 0..60_000u32 {
            let from = SocketAddr::from((i.to_be_bytes(), 4000));
            h.server.handle_datagram(h.now, 0, from, &bytes);
            replies += std::iter::from_fn(|| h.server.poll_transmit()).count();
        }
        assert_eq!(replies, BUSY_REPLIES_PER_SECOND as usize + 1);
        assert_eq!(h.server.peers(), 1);
    }

    #[test]
    fn stun_names_another_socket_and_answers_from_it_when_asked() {
        let mut h = Harness::new();
        let sockets = [
            "192.0.2.1:7777",
            "192.0.2.1:7778",
            "192.0.2.2:7777",
            "192.0.2.2:7778",
        ];
        h.server
            .set_listeners(Listeners::new(sockets.iter().map(|s| addr(s)).collect()));
        let transaction = stun::TransactionId::new([4; 12]);
        let ask = |h: &mut Harness, change: stun::Change| {
            let request = stun::binding_request_with_change(transaction, change);
            h.server.handle_datagram(h.now, 0, addr(A), &request);
            h.server.poll_transmit()
        };
        let plain = ask(&mut h, stun::Change::NONE).expect("answered");
        assert_eq!(plain.via, 0);
        assert_eq!(
            stun::parse(&plain.bytes),
            Ok(stun::Message::BindingSuccess {
                transaction,
                mapped: addr(A),
                other: Some(addr("192.0.2.2:7778")),
            })
        );
        let port = ask(
            &mut h,
            stun::Change {
                ip: false,
                port: true,
            },
        )
        .expect("answered");
        assert_eq!(port.via, 1);
        let both = ask(
            &mut h,
            stun::Change {
                ip: true,
                port: true,
            },
        )
        .expect("answered");
        assert_eq!(both.via, 3);
        // A server on one address cannot answer from another: it stays
        // silent rather than let the peer believe its NAT let a stranger in.
        h.server.set_listeners(Listeners::new(vec![
            addr("0.0.0.0:7777"),
            addr("0.0.0.0:7778"),
        ]));
        assert_eq!(
            ask(
                &mut h,
                stun::Change {
                    ip: true,
                    port: true
                }
            ),
            None
        );
        assert_eq!(h.server.stats().dropped(DropReason::StunCannotChange), 1);
    }

    impl Harness {
        /// Sends a STUN request; true when nothing came back.
        fn send_raw_stun(&mut self, from: &str, bytes: &[u8]) -> bool {
            self.server.handle_datagram(self.now, 0, addr(from), bytes);
            let reply = self.server.poll_transmit();
            if let Some(reply) = &reply {
                assert!(matches!(
                    stun::parse(&reply.bytes),
                    Ok(stun::Message::BindingSuccess { mapped, .. }) if mapped == addr(from)
                ));
            }
            reply.is_none()
        }
    }

    #[test]
    fn unpadded_register_is_dropped() {
        let mut h = Harness::new();
        let mut bytes = register("room", None).encode().unwrap();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        bytes.extend([0, 0, 0, 0, 0, 0]); // `peer_token`, `claim`, `cookie`, `nat`, `mapped`, `rejoin`
        assert!(h.send_raw(A, &bytes).is_empty());
        assert_eq!(h.server.stats().dropped(DropReason::Unpadded), 1);
    }

    #[test]
    fn other_versions_get_a_version_notice() {
        let mut h = Harness::new();
        let mut bytes = register("room", None).encode().unwrap();
        bytes[1] = VERSION + 1;
        h.server.handle_datagram(h.now, 0, addr(A), &bytes);
        let reply = h.server.poll_transmit().unwrap();
        assert_eq!(reply.bytes, ServerMessage::version_notice());
        assert_eq!(h.server.stats().dropped(DropReason::UnsupportedVersion), 1);
    }

    #[test]
    fn no_reply_is_larger_than_the_register_that_caused_it() {
        let mut h = Harness::new();
        let full = |peer_token| {
            ClientMessage::Register(Register {
                room: RoomCode::new(vec![b'x'; 64]).unwrap(),
                host_candidates: vec!["[2001:db8::1]:65535".parse().unwrap(); MAX_HOST_CANDIDATES],
                client_nonce: u64::MAX,
                peer_token,
                claim: false,
                cookie: None,
                nat: None,
                mapped: None,
                rejoin: Some(RejoinTag([0xff; 16])),
            })
        };
        let a = "[2001:db8:1::1]:65535";
        let first = full(None).encode().unwrap();
        h.server.handle_datagram(h.now, 0, addr(a), &first);
        let token = match ServerMessage::decode(&h.server.poll_transmit().unwrap().bytes) {
            Ok(ServerMessage::Registered { peer_token, .. }) => peer_token,
            other => panic!("{other:?}"),
        };
        h.server
            .handle_datagram(h.now, 0, addr("[2001:db8:2::2]:65535"), &first);
        while h.server.poll_transmit().is_some() {}
        let refresh = full(Some(token)).encode().unwrap();
        h.server.handle_datagram(h.now, 0, addr(a), &refresh);
        let sent: usize = std::iter::from_fn(|| h.server.poll_transmit())
            .map(|t| t.bytes.len())
            .sum();
        assert!(
            sent <= refresh.len(),
            "{sent} bytes sent for a {}-byte request",
            refresh.len()
        );
    }

    #[test]
    fn every_datagram_is_accounted_for() {
        let mut h = Harness::new();
        h.register(A, None);
        h.send_raw(A, b"garbage");
        h.send_raw(A, &[0xC1, VERSION, 0xff]);
        h.register(B, None);
        h.register(C, None);
        let stats = h.server.stats();
        assert_eq!(stats.datagrams_in, 5);
        assert_eq!(stats.accepted + stats.refused + stats.dropped_total(), 5);
    }

    /// A and B registered and introduced: their tokens and the session id.
    fn session(h: &mut Harness) -> (u64, u64, u64) {
        let a = h.token(A);
        let replies = h.register(B, None);
        let (b, session) = match replies.as_slice() {
            [(_, ServerMessage::Registered { peer_token, .. }), (_, ServerMessage::Introduce { session_id, .. }), _] => {
                (*peer_token, *session_id)
            }
            other => panic!("{other:?}"),
        };
        (a, b, session)
    }

    impl Harness {
        /// A relay request of `len` inner bytes; what the server sent for it.
        fn relay(
            &mut self,
            from: &str,
            session_id: u64,
            peer_token: u64,
            len: usize,
        ) -> Vec<Transmit> {
            let inner = vec![0x5a; len];
            let request = RelayRequest {
                session_id,
                peer_token,
                inner: &inner,
            };
            let bytes = request.encode().unwrap();
            self.server
                .handle_datagram(self.now, 0, from.parse().unwrap(), &bytes);
            let sent: Vec<_> = std::iter::from_fn(|| self.server.poll_transmit()).collect();
            for transmit in &sent {
                assert!(transmit.bytes.len() < bytes.len(), "the relay amplified");
            }
            sent
        }
    }

    #[test]
    fn the_relay_forwards_between_the_two_members_once_both_asked() {
        let mut h = Harness::new();
        let (a, b, session) = session(&mut h);
        // B has not asked for relaying yet: A's frame has nowhere to go.
        assert!(h.relay(A, session, a, 100).is_empty());
        assert_eq!(h.server.stats().dropped(DropReason::RelayPeerNotReady), 1);
        let sent = h.relay(B, session, b, 100);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].to, addr(A));
        assert_eq!(
            natter_wire::parse_relayed(&sent[0].bytes),
            Ok((session, &[0x5a; 100][..]))
        );
        let sent = h.relay(A, session, a, 1000);
        assert_eq!(sent.iter().map(|t| t.to).collect::<Vec<_>>(), [addr(B)]);
        assert_eq!(h.server.stats().relayed, 2);
    }

    #[test]
    fn a_hello_forwards_nothing_but_opens_the_way() {
        let mut h = Harness::new();
        let (a, b, session) = session(&mut h);
        assert!(h.relay(B, session, b, 0).is_empty());
        let sent = h.relay(A, session, a, 100);
        assert_eq!(sent.iter().map(|t| t.to).collect::<Vec<_>>(), [addr(B)]);
        let stats = h.server.stats();
        assert_eq!((stats.relayed, stats.dropped_total()), (1, 0));
    }

    #[test]
    fn strangers_cannot_use_the_relay() {
        let mut h = Harness::new();
        let (a, b, session) = session(&mut h);
        h.relay(B, session, b, 10);
        // Wrong token, right token from another address, unknown session.
        assert!(h.relay(A, session, a ^ 1, 10).is_empty());
        assert!(h.relay(C, session, a, 10).is_empty());
        assert!(h.relay(A, session ^ 1, a, 10).is_empty());
        let stats = h.server.stats();
        assert_eq!(stats.dropped(DropReason::BadToken), 2);
        assert_eq!(stats.dropped(DropReason::RelayUnknownSession), 1);
        assert_eq!(stats.relayed, 0);
        // Once A leaves, the session is over.
        h.send(
            A,
            ClientMessage::Leave {
                room: RoomCode::new(*b"room").unwrap(),
                peer_token: a,
            },
        );
        assert!(h.relay(B, session, b, 10).is_empty());
        assert_eq!(h.server.stats().dropped(DropReason::RelayUnknownSession), 2);
    }

    #[test]
    fn each_peer_is_held_to_its_byte_rate() {
        let mut h = Harness::with_config(Config {
            relay_rate: 40_000,
            ..Config::default()
        });
        let (a, b, session) = session(&mut h);
        h.relay(B, session, b, 10);
        // A burst of a quarter second: 10 000 bytes, nine 1 018-byte frames.
        let forwarded = (0..50)
            .filter(|_| !h.relay(A, session, a, 1000).is_empty())
            .count();
        assert_eq!(forwarded, 9);
        assert_eq!(h.server.stats().dropped(DropReason::RelayRateLimited), 41);
        // B's frames (its ACKs, in a transfer from A) draw on its own budget.
        let forwarded = (0..50)
            .filter(|_| !h.relay(B, session, b, 1000).is_empty())
            .count();
        assert_eq!(forwarded, 9);
        // A second later, 40 000 more bytes (capped at the burst).
        h.now += Duration::from_secs(1);
        let forwarded = (0..50)
            .filter(|_| !h.relay(A, session, a, 1000).is_empty())
            .count();
        assert_eq!(forwarded, 9);
        // Relayed frames are not held to the per-source datagram rate.
        assert!(h.server.stats().dropped(DropReason::RateLimited) == 0);
    }

    #[test]
    fn a_server_without_relay_says_so_and_relays_nothing() {
        let mut h = Harness::with_config(Config {
            relay_rate: 0,
            ..Config::default()
        });
        assert!(matches!(
            h.register(A, None).as_slice(),
            [(_, ServerMessage::Registered { relay_rate: 0, .. })]
        ));
        let (a, b, session) = session(&mut h);
        h.relay(B, session, b, 10);
        assert!(h.relay(A, session, a, 10).is_empty());
        assert_eq!(h.server.stats().dropped(DropReason::RelayOff), 2);
    }
}
