//! Hole punching: find a path that works both ways between two peers.
//!
//! Both peers start at the same moment (the rendezvous introduced them
//! together) and send probes to every candidate address of the other side:
//! its host addresses and its reflexive address. An outgoing probe opens the
//! sender's NAT towards that address; the other side's probes then get
//! through, and each probe is answered with a `ProbeAck` sent to the address
//! the probe came from as `recv_from` saw it. A candidate whose probe was
//! acknowledged works both ways. A probe from an address that is not a known
//! candidate (the other side is behind a NAT that maps each destination
//! anew) adds it as a peer-reflexive candidate, as ICE does.
//!
//! The controlling peer then nominates the best working candidate (host
//! before reflexive, then lowest round trip) and both switch to it.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{PunchMessage, Role};

#[derive(Debug, Clone)]
pub struct PunchConfig {
    /// Probe interval at the start, while both NATs are opening.
    pub fast_interval: Duration,
    /// How long to probe at `fast_interval` before backing off.
    pub fast_phase: Duration,
    /// Longest interval between probe rounds after backing off.
    pub max_interval: Duration,
    /// Give up when no path is nominated by then.
    pub timeout: Duration,
    /// How long the controlling peer waits after the first working candidate
    /// for a better one (a host path) before nominating.
    pub nomination_delay: Duration,
    /// For this long from the start, probes to the other peer's public
    /// candidates go out with [`OPENING_TTL`] only: they open this side's
    /// NAT towards the other and die on the way, before they reach the
    /// other NAT. A router without an input firewall that received a probe
    /// before its own host sent would keep a conntrack entry for it, and
    /// give its host's own probes another port (which the first NAT then
    /// drops).
    pub opening: Duration,
}

/// Time to live of the opening probes: past this host's own NAT (one hop),
/// not as far as a router on the way.
pub const OPENING_TTL: u32 = 2;

impl Default for PunchConfig {
    fn default() -> Self {
        Self {
            fast_interval: Duration::from_millis(20),
            fast_phase: Duration::from_millis(200),
            max_interval: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
            nomination_delay: Duration::from_millis(50),
            // Two rounds: both sides' opening probes leave before either's
            // full probes arrive, unless one learns of the introduction
            // 40 ms later than the other.
            opening: Duration::from_millis(40),
        }
    }
}

/// How a candidate address was learned. The order is the preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CandidateKind {
    /// An interface address of the other peer (same LAN).
    Host,
    /// A port its gateway forwards to it (UPnP-IGD, PCP, NAT-PMP).
    PortMapped,
    /// The other peer's address as the rendezvous saw it.
    Reflexive,
    /// An address the other peer's probes came from that it did not know.
    PeerReflexive,
    /// No direct path: frames go through the rendezvous's relay.
    Relayed,
}

impl CandidateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::PortMapped => "port-mapped",
            Self::Reflexive => "reflexive",
            Self::PeerReflexive => "peer-reflexive",
            Self::Relayed => "relayed",
        }
    }
}

/// What happened on one candidate address; reported when punching fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateReport {
    pub addr: SocketAddr,
    pub kind: CandidateKind,
    pub probes_sent: u32,
    pub acks_received: u32,
    pub probes_received: u32,
}

impl fmt::Display for CandidateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} probes sent, {} acknowledged, {} received from it",
            self.kind.as_str(),
            self.addr,
            self.probes_sent,
            self.acks_received,
            self.probes_received
        )
    }
}

/// The path punching settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub remote: SocketAddr,
    pub kind: CandidateKind,
    /// Round trip of the probe that proved the path, if this side measured it.
    pub rtt: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchEvent {
    Connected(Path),
    Failed(Vec<CandidateReport>),
}

#[derive(Debug)]
struct Candidate {
    report: CandidateReport,
    rtt: Option<Duration>,
    /// When a probe or nomination last came from it.
    last_heard: Option<Instant>,
}

/// Probes in flight are remembered to pair acknowledgements with them and
/// measure round trips; older ones are forgotten.
const MAX_OUTSTANDING_PROBES: usize = 256;
/// How much lower an IPv6 path's round trip counts when paths are compared
/// (iroh's bias): IPv6 wins a near tie, having no NAT on the way to lose a
/// mapping.
const IPV6_BIAS: Duration = Duration::from_millis(3);

/// `rtt` of a path to `addr`, as compared with other paths.
pub(crate) fn biased_rtt(rtt: Duration, addr: SocketAddr) -> Duration {
    match addr {
        SocketAddr::V6(_) => rtt.saturating_sub(IPV6_BIAS),
        SocketAddr::V4(_) => rtt,
    }
}
/// Most candidates tracked, so a flood of probes from random addresses
/// cannot grow the state.
const MAX_CANDIDATES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Probing,
    /// Controlling: nominated `candidate`, waiting for its acknowledgement.
    Nominating {
        candidate: usize,
        nonce: u64,
    },
    Connected,
    Failed,
}

pub struct Puncher {
    config: PunchConfig,
    session_id: u64,
    role: Role,
    started: Instant,
    candidates: Vec<Candidate>,
    outstanding: VecDeque<(u64, usize, Instant)>,
    next_nonce: u64,
    next_round: Instant,
    nominate_at: Option<Instant>,
    state: State,
    /// What to send, where, and with what time to live (`None`: the
    /// socket's).
    transmits: VecDeque<(SocketAddr, PunchMessage, Option<u32>)>,
    events: VecDeque<PunchEvent>,
    /// Datagrams for another session or a stranger, ignored.
    pub ignored: u64,
}

impl Puncher {
    /// Starts punching towards `remote` candidates; the first probe round is
    /// due at once.
    pub fn new(
        now: Instant,
        config: PunchConfig,
        session_id: u64,
        role: Role,
        remote: impl IntoIterator<Item = (SocketAddr, CandidateKind)>,
        nonce_seed: u64,
    ) -> Self {
        let mut puncher = Self {
            config,
            session_id,
            role,
            started: now,
            candidates: Vec::new(),
            outstanding: VecDeque::new(),
            next_nonce: nonce_seed,
            next_round: now,
            nominate_at: None,
            state: State::Probing,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            ignored: 0,
        };
        for (addr, kind) in remote {
            puncher.add_candidate(addr, kind);
        }
        puncher
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Whether anything of the other peer's arrived: a probe or an
    /// acknowledgement, on any candidate.
    pub fn heard_from_peer(&self) -> bool {
        self.candidates
            .iter()
            .any(|c| c.report.probes_received > 0 || c.report.acks_received > 0)
    }

    /// Whether anything of the other peer's arrived from `addr`.
    pub fn heard_from(&self, addr: SocketAddr) -> bool {
        self.candidates.iter().any(|c| {
            c.report.addr == addr && (c.report.probes_received > 0 || c.report.acks_received > 0)
        })
    }

    /// The other peer's candidates: those it was introduced with and those
    /// its probes came from.
    pub fn candidates(&self) -> impl Iterator<Item = (SocketAddr, CandidateKind)> + '_ {
        self.candidates
            .iter()
            .map(|c| (c.report.addr, c.report.kind))
    }

    /// Another technique (port prediction) found the other peer at `addr`:
    /// probe it at once rather than at the next round.
    pub fn learn(&mut self, now: Instant, addr: SocketAddr, kind: CandidateKind) {
        let Some(index) = self
            .add_candidate(addr, kind)
            .or_else(|| self.replace_stale(addr, kind))
        else {
            return;
        };
        // Its answer just came: the freshest candidate there is.
        self.candidates[index].last_heard = Some(now);
        if self.state == State::Probing {
            self.probe(now, index);
        }
    }

    /// Stops punching for good, without a `Failed` event (the session goes
    /// to the relay instead); returns what happened on each candidate.
    pub fn give_up(&mut self) -> Vec<CandidateReport> {
        self.state = State::Failed;
        self.transmits.clear();
        self.reports()
    }

    fn reports(&self) -> Vec<CandidateReport> {
        self.candidates.iter().map(|c| c.report.clone()).collect()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.state, State::Connected | State::Failed) {
            return;
        }
        if now >= self.started + self.config.timeout {
            self.state = State::Failed;
            let reports = self.reports();
            self.events.push_back(PunchEvent::Failed(reports));
            return;
        }
        if self.nominate_at.is_some_and(|at| now >= at) && self.state == State::Probing {
            self.nominate();
        }
        if now >= self.next_round {
            self.send_round(now);
            let elapsed = now - self.started;
            let interval = if elapsed < self.config.fast_phase {
                self.config.fast_interval
            } else {
                // Double with every fast phase that has passed, up to the cap.
                let doublings = (elapsed.as_millis() / self.config.fast_phase.as_millis().max(1))
                    .min(16) as u32;
                (self.config.fast_interval * 2u32.pow(doublings)).min(self.config.max_interval)
            };
            self.next_round = now + interval;
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.state, State::Connected | State::Failed) {
            return None;
        }
        let deadline = self.started + self.config.timeout;
        let mut next = self.next_round.min(deadline);
        if let Some(at) = self.nominate_at {
            if self.state == State::Probing {
                next = next.min(at);
            }
        }
        Some(next)
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, PunchMessage, Option<u32>)> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PunchEvent> {
        self.events.pop_front()
    }

    /// A punch message from `from`. Answers probes in every state and
    /// nominations unless this side gave up, so a peer that is still
    /// punching gets through after this side has connected, but cannot
    /// settle on a path this side has left for the relay.
    pub fn handle_message(&mut self, now: Instant, from: SocketAddr, message: PunchMessage) {
        if message.session_id() != self.session_id {
            self.ignored += 1;
            return;
        }
        let session_id = self.session_id;
        match message {
            PunchMessage::Probe { nonce, .. } => {
                let index = self.find_or_learn(now, from);
                if let Some(index) = index {
                    self.candidates[index].report.probes_received += 1;
                }
                self.transmits.push_back((
                    from,
                    PunchMessage::ProbeAck {
                        session_id,
                        nonce,
                        observed: from,
                    },
                    None,
                ));
            }
            PunchMessage::ProbeAck { nonce, .. } => self.handle_probe_ack(now, from, nonce),
            PunchMessage::Nominate { .. } if self.state == State::Failed => self.ignored += 1,
            PunchMessage::Nominate { nonce, .. } => {
                let ack = PunchMessage::NominateAck { session_id, nonce };
                self.transmits.push_back((from, ack, None));
                if self.role == Role::Controlled && self.state == State::Probing {
                    let index = self.find_or_learn(now, from);
                    let kind = index.map_or(CandidateKind::PeerReflexive, |i| {
                        self.candidates[i].report.kind
                    });
                    let rtt = index.and_then(|i| self.candidates[i].rtt);
                    self.connect(Path {
                        remote: from,
                        kind,
                        rtt,
                    });
                }
            }
            PunchMessage::NominateAck { nonce, .. } => {
                if let State::Nominating {
                    nonce: expected, ..
                } = self.state
                {
                    if nonce == expected {
                        self.confirm_nomination(from);
                    }
                }
            }
        }
    }

    /// The nominated candidate answered (a `NominateAck`, or a message of
    /// the next stage such as the handshake): the other side took the
    /// nomination.
    pub fn confirm_nomination(&mut self, from: SocketAddr) {
        if let State::Nominating { candidate, .. } = self.state {
            let chosen = &self.candidates[candidate];
            if chosen.report.addr == from {
                let path = Path {
                    remote: from,
                    kind: chosen.report.kind,
                    rtt: chosen.rtt,
                };
                self.connect(path);
            }
        }
    }

    fn handle_probe_ack(&mut self, now: Instant, from: SocketAddr, nonce: u64) {
        let Some(position) = self.outstanding.iter().position(|&(n, _, _)| n == nonce) else {
            self.ignored += 1;
            return;
        };
        let (_, index, sent) = self
            .outstanding
            .remove(position)
            .expect("position is valid");
        let candidate = &mut self.candidates[index];
        if candidate.report.addr != from {
            self.ignored += 1;
            return;
        }
        candidate.report.acks_received += 1;
        let rtt = now.saturating_duration_since(sent);
        candidate.rtt = Some(candidate.rtt.map_or(rtt, |old| old.min(rtt)));
        if self.role == Role::Controlling && self.state == State::Probing {
            let best_possible = candidate.report.kind == CandidateKind::Host;
            let at = if best_possible {
                now
            } else {
                now + self.config.nomination_delay
            };
            self.nominate_at = Some(self.nominate_at.map_or(at, |old| old.min(at)));
            if best_possible {
                self.nominate();
            }
        }
    }

    /// Controlling: pick the best working candidate and ask the other side
    /// to use it. Retransmitted with each probe round until acknowledged.
    fn nominate(&mut self) {
        let best = self
            .candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((c.report.kind, biased_rtt(c.rtt?, c.report.addr), i)))
            .min();
        if let Some((_, _, candidate)) = best {
            let nonce = self.take_nonce();
            self.state = State::Nominating { candidate, nonce };
            self.send_nomination(candidate, nonce);
        }
    }

    fn send_nomination(&mut self, candidate: usize, nonce: u64) {
        let message = PunchMessage::Nominate {
            session_id: self.session_id,
            nonce,
        };
        self.transmits
            .push_back((self.candidates[candidate].report.addr, message, None));
    }

    fn connect(&mut self, path: Path) {
        self.state = State::Connected;
        self.events.push_back(PunchEvent::Connected(path));
    }

    fn send_round(&mut self, now: Instant) {
        if let State::Nominating { candidate, nonce } = self.state {
            self.send_nomination(candidate, nonce);
        }
        for index in 0..self.candidates.len() {
            // Working candidates are probed too: more samples refine their
            // round trip, which decides the nomination.
            self.probe(now, index);
        }
    }

    fn probe(&mut self, now: Instant, index: usize) {
        let nonce = self.take_nonce();
        if self.outstanding.len() == MAX_OUTSTANDING_PROBES {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((nonce, index, now));
        let opening = now < self.started + self.config.opening;
        let candidate = &mut self.candidates[index];
        candidate.report.probes_sent += 1;
        let ttl = (opening && candidate.report.kind != CandidateKind::Host).then_some(OPENING_TTL);
        self.transmits.push_back((
            candidate.report.addr,
            PunchMessage::Probe {
                session_id: self.session_id,
                nonce,
            },
            ttl,
        ));
    }

    fn take_nonce(&mut self) -> u64 {
        // A bijective scramble of a counter: unique per puncher, and not
        // predictable from the previous nonce without the seed.
        self.next_nonce = self.next_nonce.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.next_nonce;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn find_or_learn(&mut self, now: Instant, addr: SocketAddr) -> Option<usize> {
        let index = self
            .candidates
            .iter()
            .position(|c| c.report.addr == addr)
            .or_else(|| self.add_candidate(addr, CandidateKind::PeerReflexive))
            .or_else(|| self.replace_stale(addr, CandidateKind::PeerReflexive))?;
        self.candidates[index].last_heard = Some(now);
        Some(index)
    }

    /// With the table full, `addr` (of `kind`) takes the place of the
    /// peer-reflexive candidate heard from least recently that never
    /// answered a probe. Port prediction's fan needs it: each of the other
    /// side's sockets probes once and all but one close, and the one left,
    /// whose probes keep coming, must still be learned and answered.
    fn replace_stale(&mut self, addr: SocketAddr, kind: CandidateKind) -> Option<usize> {
        let (index, _) = self
            .candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.report.kind == CandidateKind::PeerReflexive && c.report.acks_received == 0
            })
            .min_by_key(|(_, c)| c.last_heard)?;
        self.candidates[index] = Candidate::new(addr, kind);
        Some(index)
    }

    fn add_candidate(&mut self, addr: SocketAddr, kind: CandidateKind) -> Option<usize> {
        if let Some(existing) = self.candidates.iter().position(|c| c.report.addr == addr) {
            return Some(existing);
        }
        if self.candidates.len() == MAX_CANDIDATES {
            return None;
        }
        self.candidates.push(Candidate::new(addr, kind));
        Some(self.candidates.len() - 1)
    }
}

impl Candidate {
    fn new(addr: SocketAddr, kind: CandidateKind) -> Self {
        Self {
            report: CandidateReport {
                addr,
                kind,
                probes_sent: 0,
                acks_received: 0,
                probes_received: 0,
            },
            rtt: None,
            last_heard: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Two punchers wired back to back through a function that decides
    /// which (from, to) datagrams get through and how `to` sees `from`.
    struct Pair {
        now: Instant,
        a: Puncher,
        b: Puncher,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
    }

    impl Pair {
        fn new(
            a_candidates: Vec<(SocketAddr, CandidateKind)>,
            b_candidates: Vec<(SocketAddr, CandidateKind)>,
        ) -> Self {
            let now = Instant::now();
            let config = PunchConfig::default();
            Self {
                now,
                a: Puncher::new(now, config.clone(), 9, Role::Controlling, b_candidates, 1),
                b: Puncher::new(now, config, 9, Role::Controlled, a_candidates, 2),
                a_addr: addr("10.0.0.1:1000"),
                b_addr: addr("10.0.0.2:2000"),
            }
        }

        /// Runs until both sides report, delivering datagrams whose
        /// destination is the other side's real address.
        fn run(&mut self) -> (PunchEvent, PunchEvent) {
            let (mut a_event, mut b_event) = (None, None);
            for _ in 0..10_000 {
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
                for _ in 0..100 {
                    let mut moved = false;
                    while let Some((to, message, _)) = self.a.poll_transmit() {
                        moved = true;
                        if to == self.b_addr {
                            self.b.handle_message(self.now, self.a_addr, message);
                        }
                    }
                    while let Some((to, message, _)) = self.b.poll_transmit() {
                        moved = true;
                        if to == self.a_addr {
                            self.a.handle_message(self.now, self.b_addr, message);
                        }
                    }
                    if !moved {
                        break;
                    }
                }
                a_event = a_event.or_else(|| self.a.poll_event());
                b_event = b_event.or_else(|| self.b.poll_event());
                if let (Some(a), Some(b)) = (&a_event, &b_event) {
                    return (a.clone(), b.clone());
                }
                let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min()
                    .expect("a side that has not reported has a timer");
                self.now = next.max(self.now + Duration::from_millis(1));
            }
            panic!("punching never finished");
        }
    }

    #[test]
    fn working_candidate_is_nominated_and_both_connect() {
        let mut pair = Pair::new(
            vec![(addr("10.0.0.1:1000"), CandidateKind::Reflexive)],
            vec![
                (addr("192.0.2.99:9"), CandidateKind::Host),
                (addr("10.0.0.2:2000"), CandidateKind::Reflexive),
            ],
        );
        let (a, b) = pair.run();
        let PunchEvent::Connected(path_a) = a else {
            panic!("{a:?}")
        };
        let PunchEvent::Connected(path_b) = b else {
            panic!("{b:?}")
        };
        assert_eq!(path_a.remote, pair.b_addr);
        assert_eq!(path_a.kind, CandidateKind::Reflexive);
        assert_eq!(path_b.remote, pair.a_addr);
    }

    #[test]
    fn unknown_source_becomes_peer_reflexive() {
        // B does not know A's real address; A's probes teach it.
        let mut pair = Pair::new(
            vec![(addr("198.51.100.1:5"), CandidateKind::Reflexive)],
            vec![(addr("10.0.0.2:2000"), CandidateKind::Reflexive)],
        );
        let (a, b) = pair.run();
        assert!(matches!(a, PunchEvent::Connected(_)), "{a:?}");
        let PunchEvent::Connected(path_b) = b else {
            panic!("{b:?}")
        };
        assert_eq!(
            (path_b.remote, path_b.kind),
            (pair.a_addr, CandidateKind::PeerReflexive)
        );
    }

    #[test]
    fn no_path_fails_with_a_report_per_candidate() {
        let mut pair = Pair::new(
            vec![(addr("198.51.100.1:5"), CandidateKind::Reflexive)],
            vec![(addr("198.51.100.2:6"), CandidateKind::Reflexive)],
        );
        let started = pair.now;
        let (a, _) = pair.run();
        let PunchEvent::Failed(reports) = a else {
            panic!("{a:?}")
        };
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].acks_received, 0);
        // 10 rounds in the fast phase, then backing off to 500 ms.
        assert!(
            (15..30).contains(&reports[0].probes_sent),
            "{:?}",
            reports[0]
        );
        assert_eq!(pair.now - started, PunchConfig::default().timeout);
    }

    #[test]
    fn other_sessions_are_ignored_and_counted() {
        let now = Instant::now();
        let mut puncher = Puncher::new(now, PunchConfig::default(), 1, Role::Controlled, [], 0);
        puncher.handle_message(
            now,
            addr("10.0.0.9:9"),
            PunchMessage::Probe {
                session_id: 2,
                nonce: 0,
            },
        );
        assert_eq!(puncher.ignored, 1);
        assert!(puncher.poll_transmit().is_none());
    }

    /// A side that left for the relay must not let the other settle on a
    /// direct path: it still answers probes, but no nomination.
    #[test]
    fn a_puncher_that_gave_up_refuses_nominations() {
        let now = Instant::now();
        let peer = addr("198.51.100.7:7");
        let mut puncher = Puncher::new(
            now,
            PunchConfig::default(),
            1,
            Role::Controlled,
            [(peer, CandidateKind::Reflexive)],
            0,
        );
        assert!(!puncher.heard_from_peer());
        let reports = puncher.give_up();
        assert_eq!(reports.len(), 1);
        assert!(
            puncher.poll_transmit().is_none(),
            "no probes after giving up"
        );
        let nominate = PunchMessage::Nominate {
            session_id: 1,
            nonce: 3,
        };
        puncher.handle_message(now, peer, nominate);
        assert!(puncher.poll_transmit().is_none());
        assert_eq!(puncher.poll_event(), None);
        let probe = PunchMessage::Probe {
            session_id: 1,
            nonce: 4,
        };
        puncher.handle_message(now, peer, probe);
        assert!(matches!(
            puncher.poll_transmit(),
            Some((_, PunchMessage::ProbeAck { .. }, None))
        ));
        assert!(puncher.heard_from_peer());
        assert!(puncher.heard_from(peer));
        assert!(!puncher.heard_from(addr("198.51.100.7:8")));
    }

    #[test]
    fn probe_flood_from_many_addresses_is_bounded() {
        let now = Instant::now();
        let mut puncher = Puncher::new(now, PunchConfig::default(), 1, Role::Controlled, [], 0);
        for port in 0..10_000u16 {
            let from = SocketAddr::from(([198, 51, 100, 1], port));
            puncher.handle_message(
                now,
                from,
                PunchMessage::Probe {
                    session_id: 1,
                    nonce: 0,
                },
            );
            puncher.poll_transmit();
        }
        assert_eq!(puncher.candidates.len(), MAX_CANDIDATES);
    }

    /// The public-peer × symmetric case of the NAT lab: the other side's
    /// port-prediction fan fills the table with addresses that probe once,
    /// then the one socket it keeps probes on; that address is learned and
    /// probed, and a candidate that answered is never displaced.
    #[test]
    fn an_address_that_keeps_probing_displaces_one_heard_once_in_a_full_table() {
        let t0 = Instant::now();
        let mut puncher = Puncher::new(t0, PunchConfig::default(), 1, Role::Controlled, [], 0);
        let probe = PunchMessage::Probe {
            session_id: 1,
            nonce: 0,
        };
        let fan = |port: u16| SocketAddr::from(([203, 0, 113, 11], port));
        for port in 1..=MAX_CANDIDATES as u16 {
            puncher.handle_message(t0 + Duration::from_micros(port.into()), fan(port), probe);
        }
        while puncher.poll_transmit().is_some() {}
        // The first fan address answers a probe of ours: it stays.
        puncher.handle_timeout(t0 + Duration::from_millis(1));
        let nonce = std::iter::from_fn(|| puncher.poll_transmit())
            .find_map(|(to, message, _)| match message {
                PunchMessage::Probe { nonce, .. } if to == fan(1) => Some(nonce),
                _ => None,
            })
            .expect("the learned addresses are probed");
        let kept = fan(1);
        let answer = PunchMessage::ProbeAck {
            session_id: 1,
            nonce,
            observed: kept,
        };
        puncher.handle_message(t0 + Duration::from_millis(2), kept, answer);

        let winner = fan(60_000);
        let later = t0 + Duration::from_millis(3);
        puncher.handle_message(later, winner, probe);
        assert!(puncher.heard_from(winner));
        assert!(puncher.heard_from(kept));
        assert!(
            !puncher.heard_from(fan(2)),
            "the one heard from least recently made way"
        );
        assert_eq!(puncher.candidates.len(), MAX_CANDIDATES);
        puncher.handle_timeout(later + Duration::from_secs(1));
        assert!(
            std::iter::from_fn(|| puncher.poll_transmit())
                .any(|(to, message, _)| to == winner
                    && matches!(message, PunchMessage::Probe { .. })),
            "the new address is probed"
        );
    }

    #[test]
    fn a_path_port_prediction_found_is_learned_into_a_full_table() {
        let t0 = Instant::now();
        let mut puncher = Puncher::new(t0, PunchConfig::default(), 1, Role::Controlled, [], 0);
        let probe = PunchMessage::Probe {
            session_id: 1,
            nonce: 0,
        };
        for port in 1..=MAX_CANDIDATES as u16 {
            let from = SocketAddr::from(([203, 0, 113, 11], port));
            puncher.handle_message(t0, from, probe);
        }
        while puncher.poll_transmit().is_some() {}
        let found = addr("203.0.113.11:50000");
        puncher.learn(
            t0 + Duration::from_millis(1),
            found,
            CandidateKind::Reflexive,
        );
        assert!(puncher
            .candidates()
            .any(|(a, kind)| a == found && kind == CandidateKind::Reflexive));
        assert!(
            std::iter::from_fn(|| puncher.poll_transmit()).any(
                |(to, message, _)| to == found && matches!(message, PunchMessage::Probe { .. })
            ),
            "it is probed at once"
        );
    }
}
