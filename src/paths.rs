//! The routes a secured session can take to the other peer, and which one
//! carries it.
//!
//! A route is a direct address of the other peer or the rendezvous's relay;
//! each is a [`Path`] with a status, the time it was last heard on and its
//! round trip. One path is active: the reliable channel's frames go there.
//! The rest are candidates, checked with sealed challenges (RFC 9000's
//! PATH_CHALLENGE / PATH_RESPONSE): a route is proven when the response to
//! a challenge sent on it comes back on it.
//!
//! The session follows the network:
//! - **Roaming**: when the other peer's newest data frame arrives from
//!   another direct address (its NAT gave it a new port or address, or it
//!   moved off the relay), that address is challenged and the session moves
//!   there once it answers (at once if it answered within [`TRUSTED_FOR`]).
//!   Frames that are not the newest (replays are refused before they get
//!   here, delayed copies are not the newest) never move a session.
//! - **Direct → relay**: the active path is heartbeaten when it goes quiet;
//!   two unanswered challenges make it failed, and the session moves from a
//!   failed direct path to a direct path that answered recently or to the
//!   relay. Either way the rendezvous hears from this peer at once, so that
//!   an address that changed is introduced to the other peer again.
//! - **Relay → direct**: while relayed (or while the active path has
//!   failed), every direct candidate is challenged every [`PROBE_INTERVAL`],
//!   backing off to [`MAX_PROBE_INTERVAL`]; both peers do so, so their
//!   challenges punch their NATs as the first probes did. The controlling
//!   peer moves to a direct path that answers; the other follows it by the
//!   roaming rule, so the two never pull towards different paths.
//!
//! Before a route has answered, what is sent on it is bounded by three times
//! what came from it (RFC 9000 §8), and all challenges by a per-session rate,
//! so forged or replayed frames cannot turn a peer into a packet cannon.
//!
//! Like the rest of the session it is sans-IO: the link feeds it the frames
//! it opened and the time, and seals what it asks to send.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{PathCheck, Role, DATA_HEADER_LEN, PATH_CHECK_LEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::punch::CandidateKind;
use crate::reliable::Migration;
use crate::seal::TAG_LEN;

/// How long the active direct path may be quiet while the channel has data
/// in flight (acknowledgements are due) before a heartbeat challenge.
pub const BUSY_QUIET: Duration = Duration::from_secs(1);
/// How long it may be quiet otherwise. Either peer's heartbeat is answered,
/// so an idle session exchanges about one challenge and response this often.
pub const IDLE_QUIET: Duration = Duration::from_secs(5);
/// Between heartbeats, and how long the last may go unanswered, at least:
/// two unanswered heartbeats make the path failed, so a busy path that
/// goes dark is left within about three seconds, an idle one within seven.
pub const HEARTBEAT_RETRY: Duration = Duration::from_secs(1);
const HEARTBEATS_UNANSWERED: usize = 2;
/// A route that answered this recently is followed without a new check
/// (Tailscale trusts a direct address for 6.5 s after its last pong).
pub const TRUSTED_FOR: Duration = Duration::from_millis(6500);
/// First interval between rounds of challenges to the direct candidates
/// while the session is relayed; it doubles up to [`MAX_PROBE_INTERVAL`],
/// and starts over when the rendezvous introduces new candidates.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// Challenges a session may send per second, and in a burst: a probe round
/// to every candidate fits, a flood of frames from new addresses does not
/// get more.
const CHALLENGES_PER_SECOND: f64 = 20.0;
const CHALLENGE_BURST: f64 = 40.0;
/// Routes tracked, so frames from ever new addresses cannot grow the state.
pub const MAX_PATHS: usize = 16;
/// Unanswered challenges remembered per route.
const MAX_OUTSTANDING: usize = 4;
/// Before a route answered, at most this many times the bytes received on
/// it are sent to it.
const AMPLIFICATION: u64 = 3;
/// Bytes a sealed path check takes on the wire.
pub const CHECK_DATAGRAM: u64 = (DATA_HEADER_LEN + PATH_CHECK_LEN + TAG_LEN) as u64;

/// Where a frame to the other peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Straight to this address of the other peer.
    Direct(SocketAddr),
    /// Through the rendezvous's relay.
    Relay,
}

impl Route {
    pub fn is_direct(self) -> bool {
        matches!(self, Self::Direct(_))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(addr) => write!(f, "{addr}"),
            Self::Relay => f.write_str("the relay"),
        }
    }
}

/// Where a path stands (iroh's `PathStatus`, with validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStatus {
    /// Known, never checked.
    Unknown,
    /// Challenged, not answered yet.
    Validating,
    /// Carries the session.
    Active,
    /// Answered; not in use.
    Backup,
    /// Stopped answering (it may still carry the session when there is no
    /// other way).
    Failed,
}

/// Why the session moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// The other peer's frames now come by this route (its address changed,
    /// or it moved to or from the relay), and the route answered.
    PeerMoved,
    /// A direct path answered while the session was relayed.
    DirectPathOpened,
    /// The active path stopped answering.
    PathSilent,
}

impl MoveReason {
    /// A short stable name for `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerMoved => "peer_moved",
            Self::DirectPathOpened => "direct_path_opened",
            Self::PathSilent => "path_silent",
        }
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PeerMoved => "the other peer's address changed",
            Self::DirectPathOpened => "a direct path opened",
            Self::PathSilent => "the path went silent",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    /// The channel's frames go by `route` from now on.
    Moved {
        route: Route,
        via: CandidateKind,
        reason: MoveReason,
        migration: Migration,
    },
    /// The active path stopped answering: something on the way changed (a
    /// NAT lost its mapping), so the rendezvous should hear from this peer
    /// now rather than at its next refresh.
    Silent,
}

/// What an opened frame on a route was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// A packet of the channel; `newest` if no later frame was opened before.
    Data {
        newest: bool,
    },
    Check(PathCheck),
}

/// One route and what is known of it.
#[derive(Debug, Clone)]
pub struct Path {
    pub route: Route,
    pub via: CandidateKind,
    pub status: PathStatus,
    pub last_heard: Option<Instant>,
    /// When it last answered a challenge.
    pub last_answered: Option<Instant>,
    pub rtt: Option<Duration>,
    /// Challenges sent and not answered, oldest first.
    outstanding: VecDeque<([u8; 16], Instant)>,
    /// Bytes received on it and path checks sent to it, for the
    /// amplification bound.
    received: u64,
    sent: u64,
}

impl Path {
    fn new(route: Route, via: CandidateKind, status: PathStatus) -> Self {
        Self {
            route,
            via,
            status,
            last_heard: None,
            last_answered: None,
            rtt: None,
            outstanding: VecDeque::new(),
            received: 0,
            sent: 0,
        }
    }

    /// Whether it may be sent to without bound: it answered, or the
    /// rendezvous named it (it is probed while punching anyway), or it is
    /// the relay.
    fn vouched_for(&self) -> bool {
        self.last_answered.is_some() || self.via != CandidateKind::PeerReflexive
    }

    fn recently_answered(&self, now: Instant) -> bool {
        self.last_answered
            .is_some_and(|at| now.saturating_duration_since(at) < TRUSTED_FOR)
    }
}

/// Counters, for tests and `--json` statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathStats {
    pub challenges_sent: u64,
    pub responses_sent: u64,
    /// Responses that matched a challenge.
    pub answered: u64,
    /// Responses to no challenge of ours (late, or forged by the peer).
    pub unmatched: u64,
    /// Checks not sent because the route had not answered and had used its
    /// amplification budget.
    pub amplification_limited: u64,
    /// Challenges not sent because of the per-session rate.
    pub rate_limited: u64,
    /// Frames from a route that did not fit the table.
    pub untracked: u64,
    pub moves: u64,
}

pub struct Paths {
    paths: Vec<Path>,
    active: usize,
    role: Role,
    relay_available: bool,
    /// The route the other peer's newest data came by, while it is checked.
    following: Option<Route>,
    next_heartbeat: Option<Instant>,
    next_probe: Option<Instant>,
    probe_interval: Duration,
    /// Moves away from a failed direct path since the last direct path that
    /// lasted: each doubles the wait before probing again, so a path that
    /// answers challenges but does not carry the session cannot make it flap.
    fallbacks: u32,
    /// Since when a direct path carries the session.
    direct_since: Option<Instant>,
    /// Challenge tokens and when they were last counted.
    tokens: f64,
    tokens_at: Instant,
    rng: StdRng,
    transmits: VecDeque<(Route, PathCheck)>,
    events: VecDeque<PathEvent>,
    stats: PathStats,
}

impl Paths {
    /// The session runs on `route`, found by punching (or the relay).
    pub fn new(
        now: Instant,
        role: Role,
        route: Route,
        via: CandidateKind,
        rtt: Option<Duration>,
        seed: u64,
    ) -> Self {
        let mut active = Path::new(route, via, PathStatus::Active);
        active.last_heard = Some(now);
        active.last_answered = Some(now);
        active.rtt = rtt;
        let mut paths = Self {
            paths: vec![active],
            active: 0,
            role,
            relay_available: false,
            following: None,
            next_heartbeat: None,
            next_probe: None,
            probe_interval: PROBE_INTERVAL,
            fallbacks: 0,
            direct_since: Some(now).filter(|_| route.is_direct()),
            tokens: CHALLENGE_BURST,
            tokens_at: now,
            rng: StdRng::seed_from_u64(seed),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: PathStats::default(),
        };
        if route == Route::Relay {
            paths.next_probe = Some(now + PROBE_INTERVAL);
        } else {
            paths.track(Route::Relay, CandidateKind::Relayed);
        }
        paths
    }

    pub fn active(&self) -> &Path {
        &self.paths[self.active]
    }

    pub fn paths(&self) -> &[Path] {
        &self.paths
    }

    pub fn stats(&self) -> &PathStats {
        &self.stats
    }

    /// Whether the relay can carry frames now (the link is registered and
    /// introduced at a rendezvous that relays).
    pub fn set_relay_available(&mut self, available: bool) {
        self.relay_available = available;
    }

    /// The other peer's candidates, as the rendezvous named them.
    pub fn track_candidates(
        &mut self,
        candidates: impl IntoIterator<Item = (SocketAddr, CandidateKind)>,
    ) {
        for (addr, kind) in candidates {
            if let Some(index) = self.track(Route::Direct(addr), kind) {
                // A named candidate is vouched for, whatever it was learned as.
                let path = &mut self.paths[index];
                path.via = path.via.min(kind);
            }
        }
    }

    /// The rendezvous introduced the peers again (an address changed):
    /// these are the other peer's candidates now. They are checked at once
    /// if the session is relayed or its path failed, as both peers do, so
    /// the checks punch the NATs; the probe backoff starts over.
    pub fn add_candidates(
        &mut self,
        now: Instant,
        candidates: impl IntoIterator<Item = (SocketAddr, CandidateKind)>,
    ) {
        self.track_candidates(candidates);
        self.probe_interval = PROBE_INTERVAL;
        self.next_probe = Some(now);
    }

    /// A frame opened from `route`, `len` bytes on the wire.
    pub fn handle_frame(&mut self, now: Instant, route: Route, len: usize, heard: Heard) {
        let Some(index) = self.track(route, CandidateKind::PeerReflexive) else {
            self.stats.untracked += 1;
            return;
        };
        let path = &mut self.paths[index];
        path.last_heard = Some(now);
        path.received += len as u64;
        if index == self.active {
            // Heard: the quiet period before a heartbeat starts over.
            self.next_heartbeat = None;
        }
        match heard {
            Heard::Data { newest } => {
                // The other peer sends its newest data by another direct
                // route: its address changed, so follow it there. (To the
                // relay it is not followed: that the other peer went there
                // says a direct path failed, and this side's heartbeats
                // find out for themselves whether its own way still works.)
                if index == self.active || !newest || !route.is_direct() {
                    return;
                }
                if path.recently_answered(now) {
                    self.move_to(now, index, MoveReason::PeerMoved);
                } else {
                    self.following = Some(route);
                    if path.outstanding.is_empty() {
                        self.challenge(now, index);
                    }
                }
            }
            Heard::Check(PathCheck::Challenge(data)) => {
                self.send_check(index, PathCheck::Response(data));
                if index != self.active {
                    // Also by the active path: whoever raced a copy of the
                    // challenge from its own address would get the only
                    // answer, and the genuine challenge, arriving later, is
                    // dropped as a replay.
                    self.send_check(self.active, PathCheck::Response(data));
                }
                self.stats.responses_sent += 1;
                // A triggered check: the other peer found this route, so
                // it is likely to work back too.
                let path = &self.paths[index];
                if route.is_direct() && path.outstanding.is_empty() && !path.recently_answered(now)
                {
                    self.challenge(now, index);
                }
            }
            Heard::Check(PathCheck::Response(data)) => self.handle_response(now, data),
        }
    }

    /// A response validates the path its challenge went out on, whichever
    /// route it came back by (RFC 9000 §8.2.2): an attacker that races
    /// copies of the other peer's frames from its own address would
    /// otherwise have every heartbeat answered "from the wrong place", and
    /// the genuine answer dropped as a replay.
    fn handle_response(&mut self, now: Instant, data: [u8; 16]) {
        let found = self.paths.iter().enumerate().find_map(|(index, path)| {
            let position = path.outstanding.iter().position(|(d, _)| *d == data)?;
            Some((index, path.outstanding[position].1))
        });
        let Some((index, sent_at)) = found else {
            self.stats.unmatched += 1;
            return;
        };
        let path = &mut self.paths[index];
        path.outstanding.clear();
        path.rtt = Some(now.saturating_duration_since(sent_at));
        path.last_answered = Some(now);
        path.last_heard = Some(now);
        self.stats.answered += 1;
        if index == self.active {
            path.status = PathStatus::Active;
            self.next_heartbeat = None;
            return;
        }
        path.status = PathStatus::Backup;
        let route = path.route;
        let active = &self.paths[self.active];
        if self.following == Some(route) {
            self.move_to(now, index, MoveReason::PeerMoved);
        } else if route.is_direct() && active.status == PathStatus::Failed {
            self.move_to(now, index, MoveReason::PathSilent);
        } else if route.is_direct()
            && active.route == Route::Relay
            && self.role == Role::Controlling
        {
            self.move_to(now, index, MoveReason::DirectPathOpened);
        }
    }

    /// `busy`: the channel has data in flight, so acknowledgements are due
    /// and silence means more.
    pub fn handle_timeout(&mut self, now: Instant, busy: bool) {
        self.check_active(now, busy);
        if self.next_probe.is_some_and(|at| now >= at) {
            self.probe_round(now);
        }
    }

    pub fn poll_timeout(&self, busy: bool) -> Option<Instant> {
        [self.heartbeat_due(busy), self.next_probe]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<(Route, PathCheck)> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    /// When the active path next needs a heartbeat, if it does. The relay
    /// is heartbeaten too: when this peer's address changes, the server
    /// drops its relay requests until it registers again, which a silent
    /// relay makes happen at once.
    fn heartbeat_due(&self, busy: bool) -> Option<Instant> {
        let active = self.active();
        if active.status == PathStatus::Failed {
            return None;
        }
        if let Some(at) = self.next_heartbeat {
            return Some(at);
        }
        let quiet = if busy { BUSY_QUIET } else { IDLE_QUIET };
        Some(active.last_heard? + quiet)
    }

    fn check_active(&mut self, now: Instant, busy: bool) {
        if self.heartbeat_due(busy).is_none_or(|at| now < at) {
            return;
        }
        let active = self.active();
        let last_heard = active.last_heard.unwrap_or(now);
        let timeout = HEARTBEAT_RETRY.max(active.rtt.unwrap_or_default() * 3);
        let unanswered = active
            .outstanding
            .iter()
            .filter(|(_, sent)| {
                *sent >= last_heard && now.saturating_duration_since(*sent) >= timeout
            })
            .count();
        if unanswered >= HEARTBEATS_UNANSWERED && active.status != PathStatus::Failed {
            self.paths[self.active].status = PathStatus::Failed;
            self.events.push_back(PathEvent::Silent);
            if self
                .direct_since
                .is_some_and(|since| now - since >= MAX_PROBE_INTERVAL)
            {
                self.fallbacks = 0;
            }
            self.fallbacks += 1;
            self.probe_interval =
                (PROBE_INTERVAL * 2u32.pow(self.fallbacks.min(4) - 1)).min(MAX_PROBE_INTERVAL);
            self.next_probe = Some(now + self.probe_interval);
            if let Some(index) = self.fallback(now) {
                self.move_to(now, index, MoveReason::PathSilent);
                return;
            }
        }
        if self.paths[self.active].status == PathStatus::Failed {
            // No other way: keep the path, checked with the probe rounds.
            self.next_heartbeat = None;
            return;
        }
        self.challenge(now, self.active);
        self.next_heartbeat = Some(now + HEARTBEAT_RETRY);
    }

    /// Where to go when the active path failed: the direct path that
    /// answered most recently, if within [`TRUSTED_FOR`], else the relay.
    fn fallback(&self, now: Instant) -> Option<usize> {
        let direct = self
            .paths
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != self.active && p.route.is_direct() && p.recently_answered(now))
            .max_by_key(|(_, p)| p.last_answered)
            .map(|(i, _)| i);
        direct.or_else(|| {
            self.paths
                .iter()
                .position(|p| p.route == Route::Relay)
                .filter(|&i| i != self.active && self.relay_available)
        })
    }

    /// Challenges every direct candidate, and the active path if it failed,
    /// while the session is relayed or its path failed.
    fn probe_round(&mut self, now: Instant) {
        let active = self.active();
        let failed = active.status == PathStatus::Failed;
        if active.route.is_direct() && !failed {
            self.next_probe = None;
            return;
        }
        for index in 0..self.paths.len() {
            if self.paths[index].route.is_direct() || (failed && index == self.active) {
                self.challenge(now, index);
            }
        }
        self.next_probe = Some(now + self.probe_interval);
        self.probe_interval = (self.probe_interval * 2).min(MAX_PROBE_INTERVAL);
    }

    fn move_to(&mut self, now: Instant, index: usize, reason: MoveReason) {
        let old = self.active();
        let migration = match (old.route, self.paths[index].route) {
            (Route::Direct(a), Route::Direct(b)) if a.ip() == b.ip() => Migration::PortOnly,
            _ => Migration::NewPath,
        };
        if old.status == PathStatus::Active {
            self.paths[self.active].status = PathStatus::Backup;
        }
        self.active = index;
        let path = &mut self.paths[index];
        path.status = PathStatus::Active;
        path.last_heard = Some(now);
        self.following = None;
        self.next_heartbeat = None;
        self.stats.moves += 1;
        self.events.push_back(PathEvent::Moved {
            route: path.route,
            via: path.via,
            reason,
            migration,
        });
        if path.route.is_direct() {
            self.direct_since = Some(now);
        } else {
            self.direct_since = None;
            self.next_probe.get_or_insert(now + self.probe_interval);
        }
    }

    /// Sends a fresh challenge on the path at `index`, within the rate and
    /// the amplification bound.
    fn challenge(&mut self, now: Instant, index: usize) {
        let elapsed = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * CHALLENGES_PER_SECOND).min(CHALLENGE_BURST);
        self.tokens_at = now;
        if self.tokens < 1.0 {
            self.stats.rate_limited += 1;
            return;
        }
        let data: [u8; 16] = self.rng.gen();
        if !self.send_check(index, PathCheck::Challenge(data)) {
            return;
        }
        self.tokens -= 1.0;
        self.stats.challenges_sent += 1;
        let path = &mut self.paths[index];
        if path.outstanding.len() == MAX_OUTSTANDING {
            path.outstanding.pop_front();
        }
        path.outstanding.push_back((data, now));
        if matches!(path.status, PathStatus::Unknown | PathStatus::Backup) {
            path.status = PathStatus::Validating;
        }
    }

    /// Queues `check` for the path at `index` unless that would break the
    /// amplification bound; returns whether it was queued.
    fn send_check(&mut self, index: usize, check: PathCheck) -> bool {
        let path = &mut self.paths[index];
        if path.route == Route::Relay && !self.relay_available {
            return false;
        }
        if !path.vouched_for() && path.sent + CHECK_DATAGRAM > AMPLIFICATION * path.received {
            self.stats.amplification_limited += 1;
            return false;
        }
        path.sent += CHECK_DATAGRAM;
        self.transmits.push_back((path.route, check));
        true
    }

    /// The index of `route`'s path, added as `via` if new and there is room
    /// (evicting the path heard from longest ago that is neither active nor
    /// named by the rendezvous).
    fn track(&mut self, route: Route, via: CandidateKind) -> Option<usize> {
        if let Some(index) = self.paths.iter().position(|p| p.route == route) {
            return Some(index);
        }
        if self.paths.len() == MAX_PATHS {
            let evict = self
                .paths
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != self.active && p.via == CandidateKind::PeerReflexive)
                .min_by_key(|(_, p)| p.last_heard)
                .map(|(i, _)| i)?;
            self.paths.swap_remove(evict);
            if self.active == self.paths.len() {
                self.active = evict;
            }
        }
        let status = if route == Route::Relay {
            PathStatus::Backup
        } else {
            PathStatus::Unknown
        };
        self.paths.push(Path::new(route, via, status));
        Some(self.paths.len() - 1)
    }
}
