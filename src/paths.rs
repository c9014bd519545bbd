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
//!   the first time one relayed round trip after a session starts there,
//!   while the session is in use, backing off to [`MAX_PROBE_INTERVAL`]
//!   while it is idle; both peers do so, so their
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

use crate::punch::{biased_rtt, CandidateKind};
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
/// Interval between rounds of challenges to the direct candidates while the
/// session is relayed and in use; while it is idle the interval doubles up
/// to [`MAX_PROBE_INTERVAL`]. It starts over when the rendezvous introduces
/// new candidates.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// A session that starts on the relay checks the direct candidates one
/// relayed round trip after it is secured, or this long when the handshake
/// could not time one.
pub const RELAYED_START_WAIT: Duration = Duration::from_secs(1);
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// While a direct path carries the session, the controlling peer checks the
/// other direct candidates this often (Tailscale re-probes every minute)...
pub const UPGRADE_INTERVAL: Duration = Duration::from_secs(60);
/// ...and moves to one whose round trip is this much shorter, IPv6 counted
/// 3 ms faster (iroh's hysteresis), so two similar paths cannot make the
/// session flap.
pub const BETTER_BY: Duration = Duration::from_millis(5);
/// A session that sent or received a message this recently is in use
/// (Tailscale's `sessionActiveTimeout`).
pub const IN_USE_FOR: Duration = Duration::from_secs(45);
/// Challenges a session may send per second, and in a burst: a probe round
/// to every candidate fits, a flood of frames from new addresses does not
/// get more.
const CHALLENGES_PER_SECOND: f64 = 20.0;
const CHALLENGE_BURST: f64 = 40.0;
/// Least time between two challenges on one route that its own challenges
/// trigger.
const TRIGGERED_CHECK_GAP: Duration = Duration::from_millis(200);
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
    /// Another direct path answered clearly faster than the active one.
    BetterPath,
}

impl MoveReason {
    /// A short stable name for `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerMoved => "peer_moved",
            Self::DirectPathOpened => "direct_path_opened",
            Self::PathSilent => "path_silent",
            Self::BetterPath => "better_path",
        }
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PeerMoved => "the other peer's address changed",
            Self::DirectPathOpened => "a direct path opened",
            Self::PathSilent => "the path went silent",
            Self::BetterPath => "a faster direct path answered",
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
    /// Controlling, on a direct path: when to look for a better one.
    next_upgrade: Option<Instant>,
    /// Direct paths failed since the last one that lasted (see
    /// `back_off_direct`).
    fallbacks: u32,
    /// When the application last sent or received a message.
    last_used: Instant,
    /// The other peer does not answer path checks (an older version): the
    /// session stays on the path it started on, as it did then.
    pinned: bool,
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
            next_upgrade: None,
            fallbacks: 0,
            last_used: now,
            pinned: false,
            direct_since: Some(now).filter(|_| route.is_direct()),
            tokens: CHALLENGE_BURST,
            tokens_at: now,
            rng: StdRng::seed_from_u64(seed),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: PathStats::default(),
        };
        if route == Route::Relay {
            // Soon: the relay may only mean the other peer was introduced
            // late, after this one gave up punching, and is there now (at
            // 10 % loss through the NAT lab, transfers between two
            // full-cone NATs that started relayed spent their first five
            // seconds on the relay). Not at once: the other peer may finish
            // the handshake up to a relayed round trip later, and a direct
            // challenge, faster than the relay, would reach it before it
            // can open one.
            paths.next_probe = Some(now + rtt.unwrap_or(RELAYED_START_WAIT));
        } else {
            paths.track(Route::Relay, CandidateKind::Relayed);
            paths.schedule_upgrade(now);
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

    /// Whether [`pin`](Self::pin) held the session to its first path.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// The other peer does not answer path checks: send none, and stay.
    pub fn pin(&mut self) {
        self.pinned = true;
    }

    /// The application sent or received a message: the session is in use,
    /// and a relayed one keeps looking for a direct path every
    /// [`PROBE_INTERVAL`].
    pub fn note_use(&mut self, now: Instant) {
        self.last_used = now;
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
                // Challenges crossing in flight may both be dropped by the
                // NATs; this one came through, so the holes are open now.
                let path = &self.paths[index];
                let last_sent = path.outstanding.back().map(|(_, at)| *at);
                if route.is_direct()
                    && !path.recently_answered(now)
                    && last_sent.is_none_or(|at| now - at >= TRIGGERED_CHECK_GAP)
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
        } else if self.role == Role::Controlling && self.clearly_better(index) {
            self.move_to(now, index, MoveReason::BetterPath);
        }
    }

    /// Whether the direct path at `index` beats the active direct path by
    /// [`BETTER_BY`], IPv6 counted 3 ms faster.
    fn clearly_better(&self, index: usize) -> bool {
        let (candidate, active) = (&self.paths[index], self.active());
        let (Route::Direct(to), Route::Direct(active_to)) = (candidate.route, active.route) else {
            return false;
        };
        let (Some(rtt), Some(active_rtt)) = (candidate.rtt, active.rtt) else {
            return false;
        };
        active.status == PathStatus::Active
            && biased_rtt(rtt, to) + BETTER_BY <= biased_rtt(active_rtt, active_to)
    }

    /// Controlling, on a direct path: the next look for a better one.
    fn schedule_upgrade(&mut self, now: Instant) {
        self.next_upgrade = (self.role == Role::Controlling).then(|| now + UPGRADE_INTERVAL);
    }

    /// Challenges the active direct path (for a fresh round trip) and every
    /// other direct path; a clearly faster one that answers takes over.
    fn upgrade_round(&mut self, now: Instant) {
        let active = self.active();
        if !active.route.is_direct() || active.status != PathStatus::Active {
            self.next_upgrade = None;
            return;
        }
        self.challenge_direct(now, None);
        self.schedule_upgrade(now);
    }

    /// `busy`: the channel has data in flight, so acknowledgements are due
    /// and silence means more.
    pub fn handle_timeout(&mut self, now: Instant, busy: bool) {
        self.check_active(now, busy);
        if self.next_probe.is_some_and(|at| now >= at) {
            self.probe_round(now);
        }
        if self.next_upgrade.is_some_and(|at| now >= at) {
            self.upgrade_round(now);
        }
    }

    pub fn poll_timeout(&self, busy: bool) -> Option<Instant> {
        if self.pinned {
            return None;
        }
        [self.heartbeat_due(busy), self.next_probe, self.next_upgrade]
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
        if self.pinned || self.heartbeat_due(busy).is_none_or(|at| now < at) {
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
            let direct = active.route.is_direct();
            self.paths[self.active].status = PathStatus::Failed;
            self.events.push_back(PathEvent::Silent);
            if direct {
                self.back_off_direct(now);
                // Other candidates at once (the rendezvous may just have
                // introduced new ones): the failed path waits its turn.
                let failed = self.active;
                self.challenge_direct(now, Some(failed));
            }
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

    /// A direct path failed: the next probe round waits twice as long for
    /// each such failure since a direct path last lasted, so a path that
    /// answers challenges but does not carry the session cannot make it flap.
    fn back_off_direct(&mut self, now: Instant) {
        if self
            .direct_since
            .is_some_and(|since| now - since >= MAX_PROBE_INTERVAL)
        {
            self.fallbacks = 0;
        }
        self.fallbacks += 1;
        self.probe_interval = self.probe_floor();
        self.next_probe = Some(now + self.probe_interval);
    }

    /// The shortest interval between probe rounds: [`PROBE_INTERVAL`],
    /// doubled for each direct path that failed since one lasted.
    fn probe_floor(&self) -> Duration {
        let doublings = self.fallbacks.saturating_sub(1).min(4);
        (PROBE_INTERVAL * 2u32.pow(doublings)).min(MAX_PROBE_INTERVAL)
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
        let direct = active.route.is_direct();
        if direct && !failed {
            self.next_probe = None;
            return;
        }
        if failed {
            // Still no answer: tell the rendezvous where this peer is now
            // again (its address may have changed once more since).
            self.events.push_back(PathEvent::Silent);
            if !direct {
                self.challenge(now, self.active);
            }
        }
        self.challenge_direct(now, None);
        self.next_probe = Some(now + self.probe_interval);
        self.probe_interval = if now.saturating_duration_since(self.last_used) < IN_USE_FOR {
            self.probe_floor()
        } else {
            (self.probe_interval * 2).min(MAX_PROBE_INTERVAL)
        };
    }

    /// Challenges every direct path but `except`.
    fn challenge_direct(&mut self, now: Instant, except: Option<usize>) {
        for index in 0..self.paths.len() {
            if self.paths[index].route.is_direct() && Some(index) != except {
                self.challenge(now, index);
            }
        }
    }

    fn move_to(&mut self, now: Instant, index: usize, reason: MoveReason) {
        let old = self.active();
        let migration = match (old.route, self.paths[index].route) {
            (Route::Direct(a), Route::Direct(b)) if a.ip() == b.ip() => Migration::PortOnly,
            _ => Migration::NewPath {
                rtt: self.paths[index].rtt,
            },
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
            self.schedule_upgrade(now);
        } else {
            self.next_upgrade = None;
            self.direct_since = None;
            self.next_probe.get_or_insert(now + self.probe_interval);
        }
    }

    /// Sends a fresh challenge on the path at `index`, within the rate and
    /// the amplification bound.
    fn challenge(&mut self, now: Instant, index: usize) {
        if self.pinned {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const PEER: &str = "203.0.113.12:4000";

    /// A controlling session on a direct path to `PEER`, relay available.
    fn direct(now: Instant) -> Paths {
        let route = Route::Direct(addr(PEER));
        let mut paths = Paths::new(
            now,
            Role::Controlling,
            route,
            CandidateKind::Reflexive,
            None,
            1,
        );
        paths.set_relay_available(true);
        paths
    }

    fn challenges(paths: &mut Paths) -> Vec<(Route, [u8; 16])> {
        std::iter::from_fn(|| paths.poll_transmit())
            .filter_map(|(route, check)| match check {
                PathCheck::Challenge(data) => Some((route, data)),
                PathCheck::Response(_) => None,
            })
            .collect()
    }

    fn moves(paths: &mut Paths) -> Vec<(Route, MoveReason)> {
        std::iter::from_fn(|| paths.poll_event())
            .filter_map(|event| match event {
                PathEvent::Moved { route, reason, .. } => Some((route, reason)),
                PathEvent::Silent => None,
            })
            .collect()
    }

    #[test]
    fn a_quiet_busy_path_is_heartbeaten_then_left_for_the_relay() {
        let start = Instant::now();
        let mut paths = direct(start);
        // Quiet for less than BUSY_QUIET: nothing to do.
        paths.handle_timeout(start + Duration::from_millis(900), true);
        assert!(paths.poll_transmit().is_none());
        let mut now = start;
        let mut sent = 0;
        while paths.active().route != Route::Relay {
            now = paths.poll_timeout(true).expect("a heartbeat is due");
            paths.handle_timeout(now, true);
            sent += challenges(&mut paths).len();
            assert!(now - start < Duration::from_secs(10), "never left");
        }
        assert_eq!(sent, 2);
        assert_eq!(now - start, BUSY_QUIET + HEARTBEAT_RETRY * 2);
        assert_eq!(moves(&mut paths), [(Route::Relay, MoveReason::PathSilent)]);
    }

    #[test]
    fn an_answered_heartbeat_keeps_the_path_and_an_idle_path_waits_longer() {
        let start = Instant::now();
        let mut paths = direct(start);
        assert_eq!(paths.poll_timeout(false), Some(start + IDLE_QUIET));
        let now = start + IDLE_QUIET;
        paths.handle_timeout(now, false);
        let [(route, data)] = challenges(&mut paths)[..] else {
            panic!("one heartbeat")
        };
        assert_eq!(route, Route::Direct(addr(PEER)));
        let later = now + Duration::from_millis(40);
        let heard = Heard::Check(PathCheck::Response(data));
        paths.handle_frame(later, route, 51, heard);
        assert_eq!(paths.active().rtt, Some(Duration::from_millis(40)));
        assert_eq!(paths.poll_timeout(false), Some(later + IDLE_QUIET));
        assert_eq!(paths.active().status, PathStatus::Active);
    }

    #[test]
    fn the_newest_frame_from_a_new_address_moves_the_session_once_it_answers() {
        let now = Instant::now();
        let mut paths = direct(now);
        let moved = Route::Direct(addr("203.0.113.12:5000"));
        // A frame that is not the newest (delayed) does nothing.
        paths.handle_frame(now, moved, 100, Heard::Data { newest: false });
        assert!(challenges(&mut paths).is_empty());
        paths.handle_frame(now, moved, 100, Heard::Data { newest: true });
        let [(route, data)] = challenges(&mut paths)[..] else {
            panic!("one challenge")
        };
        assert_eq!(route, moved);
        assert_eq!(paths.active().route, Route::Direct(addr(PEER)));
        // A response to something else does not count.
        paths.handle_frame(now, moved, 51, Heard::Check(PathCheck::Response([9; 16])));
        assert_eq!(paths.stats().unmatched, 1);
        paths.handle_frame(now, moved, 51, Heard::Check(PathCheck::Response(data)));
        let events: Vec<_> = std::iter::from_fn(|| paths.poll_event()).collect();
        assert_eq!(
            events,
            [PathEvent::Moved {
                route: moved,
                via: CandidateKind::PeerReflexive,
                reason: MoveReason::PeerMoved,
                // The same address, another port: a rebinding.
                migration: Migration::PortOnly,
            }]
        );
    }

    #[test]
    fn a_peer_without_path_checks_keeps_the_session_where_it_started() {
        let start = Instant::now();
        let mut paths = direct(start);
        paths.pin();
        assert_eq!(paths.poll_timeout(true), None);
        let moved = Route::Direct(addr("203.0.113.12:5000"));
        for second in 1..100 {
            let now = start + Duration::from_secs(second);
            paths.handle_timeout(now, true);
            paths.handle_frame(now, moved, 100, Heard::Data { newest: true });
        }
        assert!(paths.poll_transmit().is_none());
        assert!(moves(&mut paths).is_empty());
    }

    #[test]
    fn a_clearly_faster_direct_path_takes_over_a_slightly_faster_one_does_not() {
        let v6 = Route::Direct(addr("[2001:db8:2::2]:4000"));
        let v4 = Route::Direct(addr("198.51.100.9:4000"));
        // (candidate, its round trip, whether the session moves): the active
        // path answers in 40 ms; IPv6 counts 3 ms faster, and a move needs
        // 5 ms.
        for (candidate, rtt_ms, moves_there) in [
            (v6, 38, true),
            (v6, 39, false),
            (v4, 35, true),
            (v4, 36, false),
        ] {
            let start = Instant::now();
            let active = Route::Direct(addr(PEER));
            let rtt = Some(Duration::from_millis(40));
            let mut paths = Paths::new(
                start,
                Role::Controlling,
                active,
                CandidateKind::Reflexive,
                rtt,
                3,
            );
            let Route::Direct(candidate_addr) = candidate else {
                unreachable!()
            };
            paths.track_candidates([(candidate_addr, CandidateKind::Host)]);
            // Heartbeats while quiet, answered at once, until the upgrade
            // round challenges the candidate too.
            let (now, round) = loop {
                let now = paths.poll_timeout(false).unwrap();
                paths.handle_timeout(now, false);
                let sent = challenges(&mut paths);
                if sent.iter().any(|(route, _)| *route == candidate) {
                    break (now, sent);
                }
                for (route, data) in sent {
                    let answer = Heard::Check(PathCheck::Response(data));
                    paths.handle_frame(now + Duration::from_millis(40), route, 51, answer);
                }
            };
            assert_eq!(now - start, UPGRADE_INTERVAL);
            for (route, data) in round {
                let after = if route == candidate { rtt_ms } else { 40 };
                let answer = Heard::Check(PathCheck::Response(data));
                paths.handle_frame(now + Duration::from_millis(after), route, 51, answer);
            }
            let moved: Vec<_> = std::iter::from_fn(|| paths.poll_event())
                .filter(|event| *event != PathEvent::Silent)
                .collect();
            if moves_there {
                // The channel starts the new path from the round trip the
                // check measured.
                let migration = Migration::NewPath {
                    rtt: Some(Duration::from_millis(rtt_ms)),
                };
                assert_eq!(
                    moved,
                    [PathEvent::Moved {
                        route: candidate,
                        via: CandidateKind::Host,
                        reason: MoveReason::BetterPath,
                        migration,
                    }],
                    "{candidate} {rtt_ms} ms"
                );
            } else {
                assert!(moved.is_empty(), "{candidate} {rtt_ms} ms: {moved:?}");
            }
        }
    }

    #[test]
    fn frames_from_the_relay_do_not_pull_a_working_direct_session_there() {
        let now = Instant::now();
        let mut paths = direct(now);
        paths.handle_frame(now, Route::Relay, 100, Heard::Data { newest: true });
        assert!(challenges(&mut paths).is_empty());
        assert!(moves(&mut paths).is_empty());
    }

    #[test]
    fn unproven_addresses_get_at_most_three_times_what_they_sent() {
        let now = Instant::now();
        let mut paths = direct(now);
        let attacker = Route::Direct(addr("198.51.100.66:4444"));
        let mut sent = 0;
        // Frames of 5 bytes, smaller than any real one (a sealed check is
        // 51), so the answers and checks would be ten times larger.
        for i in 0..1000 {
            let heard = if i % 2 == 0 {
                Heard::Data { newest: true }
            } else {
                Heard::Check(PathCheck::Challenge([i as u8; 16]))
            };
            paths.handle_frame(now, attacker, 5, heard);
            while let Some((route, _)) = paths.poll_transmit() {
                if route == attacker {
                    sent += CHECK_DATAGRAM;
                }
            }
        }
        assert!(sent <= 3 * 5 * 1000, "{sent}");
        assert!(paths.stats().amplification_limited > 0);
        assert!(moves(&mut paths).is_empty());
    }

    #[test]
    fn frames_from_ever_new_addresses_are_bounded_in_state_and_challenges() {
        let now = Instant::now();
        let mut paths = direct(now);
        let mut challenged = 0;
        for port in 0..5000u16 {
            let route = Route::Direct(addr(&format!("198.51.100.7:{}", 1024 + port)));
            paths.handle_frame(now, route, 1200, Heard::Data { newest: true });
            challenged += challenges(&mut paths).len();
        }
        assert_eq!(paths.paths().len(), MAX_PATHS);
        assert_eq!(challenged as f64, CHALLENGE_BURST);
        assert!(paths.stats().rate_limited > 0);
        assert_eq!(paths.active().route, Route::Direct(addr(PEER)));
    }

    #[test]
    fn a_relayed_session_probes_its_candidates_and_the_controlling_side_moves() {
        let start = Instant::now();
        for role in [Role::Controlling, Role::Controlled] {
            // The handshake took 400 ms over the relay.
            let relayed_rtt = Some(Duration::from_millis(400));
            let mut paths = Paths::new(
                start,
                role,
                Route::Relay,
                CandidateKind::Relayed,
                relayed_rtt,
                2,
            );
            paths.set_relay_available(true);
            let candidate = addr("203.0.113.12:6000");
            paths.track_candidates([(candidate, CandidateKind::Reflexive)]);
            // A round one relayed round trip in, then every 5 s while in
            // use (a message within 45 s of the start), then backing off to
            // a minute.
            assert_eq!(
                paths.poll_timeout(false),
                Some(start + Duration::from_millis(400))
            );
            // Challenges to the candidate; the relay answers its heartbeats.
            let direct = |paths: &mut Paths, now: Instant| {
                let mut direct = Vec::new();
                for (route, data) in challenges(paths) {
                    if route.is_direct() {
                        direct.push((route, data));
                    } else {
                        let answer = Heard::Check(PathCheck::Response(data));
                        paths.handle_frame(now, route, 51, answer);
                    }
                }
                direct
            };
            let mut rounds = Vec::new();
            for at in 0..=200 {
                // Seconds, 400 ms behind the first round.
                let now = start + Duration::from_millis(400) + Duration::from_secs(at);
                paths.handle_timeout(now, false);
                match direct(&mut paths, now).len() {
                    0 => {}
                    1 => rounds.push(at),
                    n => panic!("{n} challenges to one candidate at {at} s"),
                }
            }
            let expected: Vec<u64> = (0..=10).map(|i| i * 5).chain([60, 80, 120, 180]).collect();
            assert_eq!(rounds, expected);
            // The candidate answers the next round's challenge.
            let now = start + Duration::from_millis(400) + Duration::from_secs(240);
            paths.handle_timeout(now, false);
            let [(route, data)] = direct(&mut paths, now)[..] else {
                panic!("one challenge")
            };
            let answered = Heard::Check(PathCheck::Response(data));
            paths.handle_frame(now, route, 51, answered);
            let moved = moves(&mut paths);
            if role == Role::Controlling {
                assert_eq!(
                    moved,
                    [(Route::Direct(candidate), MoveReason::DirectPathOpened)]
                );
            } else {
                // The controlled side waits for the other's frames there.
                assert!(moved.is_empty());
                assert_eq!(paths.paths()[1].status, PathStatus::Backup);
                let at = now + Duration::from_secs(1);
                paths.handle_frame(at, route, 100, Heard::Data { newest: true });
                assert_eq!(moves(&mut paths), [(route, MoveReason::PeerMoved)]);
            }
        }
    }
}
