//! The rendezvous state machine: rooms, registrations, introductions and the
//! STUN responder. No sockets, no clock: the driver feeds it datagrams and
//! timeouts with the current time and sends what it queues.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{
    classify, split_header, stun, Class, ClientMessage, FrameKind, Register, Role, RoomCode,
    ServerErrorKind, ServerMessage, WireError, REGISTER_PADDED_LEN,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::rate_limit::{RateLimit, RateLimiter};
use crate::stats::{DropReason, Stats};

#[derive(Debug, Clone)]
pub struct Config {
    /// How often peers must refresh their registration.
    pub refresh_interval: Duration,
    /// A registration expires after this many refresh intervals without one.
    pub missed_refreshes: u32,
    /// Most peers registered at once, over all rooms.
    pub max_peers: usize,
    pub rate_limit: RateLimit,
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
        }
    }
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
    last_seen: Instant,
}

/// Up to two members; the first registered is the controlling one.
#[derive(Debug, Default)]
struct Room {
    members: Vec<Member>,
    session_id: Option<u64>,
}

pub struct Server {
    config: Config,
    rooms: HashMap<RoomCode, Room>,
    peers: usize,
    limiter: RateLimiter,
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

    fn with_rng(config: Config, rng: StdRng) -> Self {
        Self {
            limiter: RateLimiter::new(config.rate_limit),
            config,
            rooms: HashMap::new(),
            peers: 0,
            transmits: VecDeque::new(),
            next_sweep: None,
            stats: Stats::default(),
            rng,
        }
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

    /// One datagram received on socket `via` from `from` (as `recv_from`
    /// reported it, with IPv4-mapped IPv6 addresses made canonical).
    pub fn handle_datagram(&mut self, now: Instant, via: usize, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        self.next_sweep
            .get_or_insert(now + self.config.refresh_interval);
        if !self.limiter.allow(now, from.ip()) {
            return self.stats.drop(DropReason::RateLimited);
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
        self.rooms.retain(|_, room| {
            let before = room.members.len();
            room.members
                .retain(|member| now.saturating_duration_since(member.last_seen) < lifetime);
            expired += before - room.members.len();
            if room.members.len() < 2 {
                room.session_id = None;
            }
            !room.members.is_empty()
        });
        self.peers -= expired;
        self.stats.expired += expired as u64;
        self.limiter.sweep(now);
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

    fn handle_stun(&mut self, via: usize, from: SocketAddr, bytes: &[u8]) {
        match stun::parse(bytes) {
            Ok(stun::Message::BindingRequest(transaction)) => {
                self.stats.accepted += 1;
                self.stats.stun_responses += 1;
                self.send(via, from, stun::binding_success(transaction, from));
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

    fn handle_register(&mut self, now: Instant, via: usize, from: SocketAddr, register: Register) {
        let Register {
            room: code,
            host_candidates,
            client_nonce,
            peer_token,
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
            // that peer retrying because our reply was lost.
            None => members.iter().position(|m| m.reflexive == from),
        };

        if let Some(index) = known {
            let room = self
                .rooms
                .get_mut(&code)
                .expect("the member was found above");
            let member = &mut room.members[index];
            let rebound = member.reflexive != from;
            member.reflexive = from;
            member.via = via;
            member.host_candidates = host_candidates.into_boxed_slice();
            member.last_seen = now;
            let token = member.token;
            self.stats.accepted += 1;
            self.registered(via, from, client_nonce, token);
            if rebound {
                // The peer's NAT gave it a new mapping: both sides must
                // punch again towards the new address.
                self.introduce(&code);
            } else {
                // Repeat the introduction in case it was lost.
                self.reintroduce(&code, index);
            }
            return;
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
            last_seen: now,
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
        room.session_id = None;
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
        let session_id = self.rng.gen();
        self.stats.introductions += 1;
        if let Some(room) = self.rooms.get_mut(code) {
            room.session_id = Some(session_id);
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
