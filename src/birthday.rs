//! Punching through a hard NAT by the birthday paradox, for a pair where
//! one side's NAT maps each destination to a new port and the other's does
//! not (an "easy↔hard" pair; Tailscale's measurements, "How NAT traversal
//! works").
//!
//! A plain punch cannot reach the hard side: the port its NAT will pick for
//! the easy side is unknown. So the hard side opens [`FAN_SOCKETS`] extra
//! sockets and sends from each towards the easy side's address: its NAT now
//! holds that many mappings towards the easy side, at ports nobody knows.
//! The easy side sends probes from its one socket to random ports of the
//! hard side's address, paced. A probe that lands on one of those ports
//! passes the hard NAT (the mapping is towards exactly the easy side's
//! address) and reaches the extra socket behind it; that socket answers,
//! and the easy side's NAT lets the answer in, since the probe went out to
//! that very port. With 256 mappings among 64 512 ports, half the pairs
//! meet within 175 probes and 99.97 % within the [`SPRAY_BUDGET`] of 2 048.
//! When the hard NAT hands ports out in sequence, the ports just after its
//! known mapping are sprayed first.
//!
//! Two hard sides would need about 54 000 probes each for even odds, and
//! fill both routers' session tables: that pair is never tried.
//!
//! Sans-IO like the rest: the link asks for sockets, sends the probes it is
//! given (it encodes them as punch probes of its session) and reports what
//! arrives; the first authenticated answer wins, and every other extra
//! socket is closed at once.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natter_wire::NatMapping;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Extra sockets the hard side opens: 256 gives the odds above with a
/// budget of probes a home router's session table takes in its stride.
pub const FAN_SOCKETS: u16 = 256;
/// Most probes the easy side sends: 99.97 % of pairs meet within it, and it
/// leaves at most this many short-lived entries in the easy side's router.
pub const SPRAY_BUDGET: u32 = 2048;
/// Between two probes of the spray: 200 a second, so half the pairs meet
/// within a second and the budget is spent in about ten. Faster would fill
/// session tables faster for little gain: the session runs on the relay
/// meanwhile.
pub const SPRAY_INTERVAL: Duration = Duration::from_millis(5);
/// How far the spray may fall behind its schedule and catch up.
const SPRAY_CATCH_UP: Duration = Duration::from_millis(20);
/// The spray starts this long after the introduction, so that the hard
/// side's mappings exist when the first probes arrive.
pub const SPRAY_DELAY: Duration = Duration::from_millis(100);
/// The hard side sends from every extra socket this many times, this far
/// apart: the mappings must outlive the spray in NATs that drop a mapping
/// nothing answered sooner than Linux's 30 s.
pub const FAN_ROUNDS: u32 = 2;
pub const FAN_ROUND_INTERVAL: Duration = Duration::from_secs(5);
/// How long after the last probe an answer is still waited for.
const GRACE: Duration = Duration::from_secs(1);
/// Ports the spray draws from: the range Linux and most NATs allocate in.
const FIRST_PORT: u16 = 1024;
/// How many ports after the hard side's known mapping are probed first
/// when its NAT allocates in sequence: its extra sockets' mappings, and
/// room for other hosts' mappings interleaved.
const SEQUENTIAL_WINDOW: i32 = 2 * FAN_SOCKETS as i32;

/// The socket a datagram leaves from or arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalSocket {
    /// The link's own socket.
    Main,
    /// One of the extra sockets port prediction opened.
    Extra(u16),
}

/// What this side does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// This NAT maps independently of the destination, the other side's
    /// does not: probe random ports of its address.
    Spray {
        ip: IpAddr,
        /// The other side's known mapping and its NAT's step, when its
        /// ports come in sequence.
        sequential: Option<(u16, i16)>,
    },
    /// This NAT maps each destination anew, the other side's does not: open
    /// the extra sockets and send from each to its address.
    Fan { to: SocketAddr },
}

impl Plan {
    /// The plan for this side, or `None` when the pair does not need one
    /// (both easy) or it is hopeless (both hard) or unknown.
    pub fn for_pair(
        ours: NatMapping,
        theirs: NatMapping,
        their_reflexive: SocketAddr,
    ) -> Option<Self> {
        match (ours, theirs) {
            (
                NatMapping::EndpointIndependent,
                NatMapping::EndpointDependent { sequential_step },
            ) => Some(Self::Spray {
                ip: their_reflexive.ip(),
                sequential: sequential_step.map(|step| (their_reflexive.port(), step)),
            }),
            (NatMapping::EndpointDependent { .. }, NatMapping::EndpointIndependent) => {
                Some(Self::Fan {
                    to: their_reflexive,
                })
            }
            _ => None,
        }
    }
}

/// What the driver must do with the extra sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketRequest {
    /// Open `count` sockets in the family of `toward`, numbered from 0.
    Open { count: u16, toward: SocketAddr },
    /// Close every extra socket but `keep`.
    Close { keep: Option<u16> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthdayEvent {
    /// An answer came through on `socket` from `remote`, `after` the start.
    Won {
        socket: LocalSocket,
        remote: SocketAddr,
        after: Duration,
        probes_sent: u32,
        sockets_opened: u16,
    },
    /// The budget is spent and nothing came through.
    GaveUp {
        probes_sent: u32,
        sockets_opened: u16,
    },
    /// Stopped before it found a path: the session found one without it,
    /// or ended.
    Stopped {
        probes_sent: u32,
        sockets_opened: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the driver to open the extra sockets.
    Opening,
    Running,
    Won {
        socket: LocalSocket,
        remote: SocketAddr,
    },
    /// Gave up or stopped: no sockets, nothing to send.
    Over,
}

#[derive(Debug)]
pub struct Birthday {
    plan: Plan,
    started: Instant,
    state: State,
    /// Spray: the next probe; fan: the next round.
    next_send: Instant,
    /// Fan: the next socket of the round in progress, and rounds begun.
    fan_socket: u16,
    fan_rounds: u32,
    sockets_opened: u16,
    probes_sent: u32,
    /// Probe nonces are `nonce_base ^ port`: an answer's nonce says it
    /// answers the spray.
    nonce_base: u64,
    sprayed: HashSet<u16>,
    /// Sequential spray: the next step of the window after the known port.
    window_next: i32,
    rng: StdRng,
    requests: Vec<SocketRequest>,
    events: Vec<BirthdayEvent>,
}

impl Birthday {
    pub fn new(now: Instant, plan: Plan, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let (state, requests) = match plan {
            Plan::Spray { .. } => (State::Running, Vec::new()),
            Plan::Fan { to } => (
                State::Opening,
                vec![SocketRequest::Open {
                    count: FAN_SOCKETS,
                    toward: to,
                }],
            ),
        };
        Self {
            plan,
            started: now,
            state,
            next_send: match plan {
                Plan::Spray { .. } => now + SPRAY_DELAY,
                Plan::Fan { .. } => now,
            },
            fan_socket: 0,
            fan_rounds: 0,
            sockets_opened: 0,
            probes_sent: 0,
            nonce_base: rng.gen::<u64>() & !0xffff,
            sprayed: HashSet::new(),
            window_next: 1,
            rng,
            requests,
            events: Vec::new(),
        }
    }

    /// When the technique ends if nothing comes through: the spray's last
    /// probe and a grace for its answer. Both sides reckon the same.
    pub fn deadline(&self) -> Instant {
        self.started + SPRAY_DELAY + SPRAY_INTERVAL * SPRAY_BUDGET + GRACE
    }

    pub fn probes_sent(&self) -> u32 {
        self.probes_sent
    }

    pub fn sockets_opened(&self) -> u16 {
        self.sockets_opened
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Opening | State::Running)
    }

    /// The driver opened `count` of the sockets asked for (fewer if the
    /// system refused more).
    pub fn sockets_opened_now(&mut self, count: u16) {
        if self.state == State::Opening {
            self.sockets_opened = count;
            self.state = State::Running;
            if count == 0 {
                self.give_up();
            }
        }
    }

    /// The socket that carries datagrams to `to`: the winning extra socket
    /// for the address it won with.
    pub fn socket_for(&self, to: SocketAddr) -> LocalSocket {
        match self.state {
            State::Won { socket, remote } if remote == to => socket,
            _ => LocalSocket::Main,
        }
    }

    /// A punch acknowledgement with `nonce` came from `from` to the main
    /// socket: true if it answers the spray (and wins).
    pub fn on_ack(&mut self, now: Instant, from: SocketAddr, nonce: u64) -> bool {
        let Plan::Spray { ip, .. } = self.plan else {
            return false;
        };
        let answers = nonce ^ self.nonce_base <= u64::from(u16::MAX) && from.ip() == ip;
        if answers && self.state == State::Running {
            self.win(now, LocalSocket::Main, from);
        }
        answers
    }

    /// A punch message of this session came from `from` to extra socket
    /// `index`: the first wins. False if datagrams on that socket are not
    /// for the link (a socket that lost, closing).
    pub fn on_extra_datagram(&mut self, now: Instant, index: u16, from: SocketAddr) -> bool {
        match self.state {
            State::Running if index < self.sockets_opened => {
                self.win(now, LocalSocket::Extra(index), from);
                true
            }
            State::Won { socket, .. } => socket == LocalSocket::Extra(index),
            _ => false,
        }
    }

    fn win(&mut self, now: Instant, socket: LocalSocket, remote: SocketAddr) {
        self.state = State::Won { socket, remote };
        if let Plan::Fan { .. } = self.plan {
            let keep = match socket {
                LocalSocket::Extra(index) => Some(index),
                LocalSocket::Main => None,
            };
            self.requests.push(SocketRequest::Close { keep });
        }
        self.events.push(BirthdayEvent::Won {
            socket,
            remote,
            after: now - self.started,
            probes_sent: self.probes_sent,
            sockets_opened: self.sockets_opened,
        });
    }

    fn give_up(&mut self) {
        self.end(BirthdayEvent::GaveUp {
            probes_sent: self.probes_sent,
            sockets_opened: self.sockets_opened,
        });
    }

    fn end(&mut self, event: BirthdayEvent) {
        self.state = State::Over;
        if let Plan::Fan { .. } = self.plan {
            self.requests.push(SocketRequest::Close { keep: None });
        }
        self.events.push(event);
    }

    /// The link no longer needs a direct path from this (it ended, or found
    /// one otherwise): stop and close the sockets.
    pub fn stop(&mut self) {
        if self.is_running() {
            self.end(BirthdayEvent::Stopped {
                probes_sent: self.probes_sent,
                sockets_opened: self.sockets_opened,
            });
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_running() && now >= self.deadline() {
            self.give_up();
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Running if self.has_more_to_send() => Some(self.next_send.min(self.deadline())),
            State::Running => Some(self.deadline()),
            State::Opening => Some(self.deadline()),
            State::Won { .. } | State::Over => None,
        }
    }

    pub fn poll_socket_request(&mut self) -> Option<SocketRequest> {
        (!self.requests.is_empty()).then(|| self.requests.remove(0))
    }

    pub fn poll_event(&mut self) -> Option<BirthdayEvent> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    fn has_more_to_send(&self) -> bool {
        match self.plan {
            Plan::Spray { .. } => self.probes_sent < SPRAY_BUDGET,
            Plan::Fan { .. } => self.fan_socket > 0 || self.fan_rounds < FAN_ROUNDS,
        }
    }

    /// The next probe due: the socket it leaves from, where it goes and
    /// its nonce.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(LocalSocket, SocketAddr, u64)> {
        if self.state != State::Running || now < self.next_send || !self.has_more_to_send() {
            return None;
        }
        match self.plan {
            Plan::Spray { ip, sequential } => {
                let port = self.next_port(sequential)?;
                self.probes_sent += 1;
                // On the schedule, not after the timer: a late timer would
                // stretch every interval. Falling further behind than a
                // few probes (a stalled process) is not made up in a burst.
                let floor = now.checked_sub(SPRAY_CATCH_UP).unwrap_or(now);
                self.next_send = self.next_send.max(floor) + SPRAY_INTERVAL;
                let to = SocketAddr::new(ip, port);
                Some((LocalSocket::Main, to, self.nonce_base ^ u64::from(port)))
            }
            Plan::Fan { to } => {
                let index = self.fan_socket;
                self.fan_socket += 1;
                if self.fan_socket >= self.sockets_opened {
                    self.fan_socket = 0;
                    self.fan_rounds += 1;
                    self.next_send = now + FAN_ROUND_INTERVAL;
                }
                self.probes_sent += 1;
                let nonce = self.nonce_base ^ u64::from(index);
                Some((LocalSocket::Extra(index), to, nonce))
            }
        }
    }

    /// A port not probed yet: the window after a sequential NAT's known
    /// port first, then at random.
    fn next_port(&mut self, sequential: Option<(u16, i16)>) -> Option<u16> {
        if let Some((known, step)) = sequential {
            while self.window_next <= SEQUENTIAL_WINDOW {
                let port = i32::from(known) + i32::from(step) * self.window_next;
                self.window_next += 1;
                match u16::try_from(port) {
                    Ok(port) if port >= FIRST_PORT && self.sprayed.insert(port) => {
                        return Some(port)
                    }
                    _ => {}
                }
            }
        }
        let free = usize::from(u16::MAX - FIRST_PORT) + 1 - self.sprayed.len();
        if free == 0 {
            return None;
        }
        loop {
            let port = self.rng.gen_range(FIRST_PORT..=u16::MAX);
            if self.sprayed.insert(port) {
                return Some(port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const HARD: NatMapping = NatMapping::EndpointDependent {
        sequential_step: None,
    };
    const EASY: NatMapping = NatMapping::EndpointIndependent;

    #[test]
    fn only_an_easy_and_a_hard_side_make_a_plan() {
        let them = sa("198.51.100.7:40000");
        assert!(matches!(
            Plan::for_pair(EASY, HARD, them),
            Some(Plan::Spray {
                sequential: None,
                ..
            })
        ));
        assert_eq!(
            Plan::for_pair(HARD, EASY, them),
            Some(Plan::Fan { to: them })
        );
        for (ours, theirs) in [
            (EASY, EASY),
            (HARD, HARD),
            (NatMapping::Unknown, HARD),
            (HARD, NatMapping::Unknown),
        ] {
            assert_eq!(Plan::for_pair(ours, theirs, them), None);
        }
    }

    /// Runs `birthday` to its end with nothing answering; returns what it
    /// sent.
    fn run_unanswered(mut birthday: Birthday, start: Instant) -> Vec<(LocalSocket, SocketAddr)> {
        let mut now = start;
        let mut sent = Vec::new();
        while let Some(request) = birthday.poll_socket_request() {
            if let SocketRequest::Open { count, .. } = request {
                birthday.sockets_opened_now(count);
            }
        }
        while birthday.is_running() {
            birthday.handle_timeout(now);
            while let Some((socket, to, _)) = birthday.poll_transmit(now) {
                sent.push((socket, to));
            }
            let Some(next) = birthday.poll_timeout() else {
                break;
            };
            now = next;
        }
        assert!(
            now <= start + Duration::from_secs(12),
            "ran for {:?}",
            now - start
        );
        sent
    }

    #[test]
    fn the_spray_keeps_to_its_budget_and_never_repeats_a_port() {
        let start = Instant::now();
        let plan = Plan::for_pair(EASY, HARD, sa("198.51.100.7:40000")).unwrap();
        let sent = run_unanswered(Birthday::new(start, plan, 1), start);
        assert_eq!(sent.len(), SPRAY_BUDGET as usize);
        let ports: HashSet<u16> = sent.iter().map(|(_, to)| to.port()).collect();
        assert_eq!(ports.len(), sent.len());
        assert!(sent
            .iter()
            .all(|(s, to)| *s == LocalSocket::Main && to.ip() == sa("198.51.100.7:1").ip()));
    }

    #[test]
    fn the_fan_sends_its_rounds_from_every_socket_then_closes_them() {
        let start = Instant::now();
        let them = sa("198.51.100.7:40000");
        let mut birthday = Birthday::new(start, Plan::Fan { to: them }, 1);
        assert_eq!(
            birthday.poll_socket_request(),
            Some(SocketRequest::Open {
                count: FAN_SOCKETS,
                toward: them
            })
        );
        birthday.sockets_opened_now(FAN_SOCKETS);
        let mut now = start;
        let mut sent = Vec::new();
        while birthday.is_running() {
            birthday.handle_timeout(now);
            while let Some((socket, to, _)) = birthday.poll_transmit(now) {
                assert_eq!(to, them);
                sent.push(socket);
            }
            now = birthday.poll_timeout().unwrap_or(now);
        }
        assert_eq!(sent.len(), (u32::from(FAN_SOCKETS) * FAN_ROUNDS) as usize);
        assert!((0..FAN_SOCKETS).all(|i| sent.contains(&LocalSocket::Extra(i))));
        assert_eq!(
            birthday.poll_socket_request(),
            Some(SocketRequest::Close { keep: None })
        );
        assert_eq!(
            birthday.poll_event(),
            Some(BirthdayEvent::GaveUp {
                probes_sent: u32::from(FAN_SOCKETS) * FAN_ROUNDS,
                sockets_opened: FAN_SOCKETS
            })
        );
    }

    #[test]
    fn the_first_answer_wins_and_the_other_sockets_close() {
        let start = Instant::now();
        let them = sa("198.51.100.7:40000");
        let mut fan = Birthday::new(start, Plan::Fan { to: them }, 1);
        fan.poll_socket_request();
        fan.sockets_opened_now(FAN_SOCKETS);
        let later = start + Duration::from_millis(700);
        assert!(fan.on_extra_datagram(later, 17, them));
        assert_eq!(fan.socket_for(them), LocalSocket::Extra(17));
        assert_eq!(fan.socket_for(sa("198.51.100.7:1")), LocalSocket::Main);
        assert_eq!(
            fan.poll_socket_request(),
            Some(SocketRequest::Close { keep: Some(17) })
        );
        assert!(
            !fan.on_extra_datagram(later, 18, them),
            "a loser is not heard"
        );
        assert!(fan.on_extra_datagram(later, 17, them));
        assert!(
            matches!(fan.poll_event(), Some(BirthdayEvent::Won { after, .. }) if after == Duration::from_millis(700))
        );
        assert_eq!(fan.poll_transmit(later), None);

        let plan = Plan::for_pair(EASY, HARD, them).unwrap();
        let mut spray = Birthday::new(start, plan, 2);
        let now = start + SPRAY_DELAY;
        let (_, to, nonce) = spray.poll_transmit(now).unwrap();
        assert!(!spray.on_ack(now, to, nonce ^ (1 << 40)), "another nonce");
        assert!(spray.on_ack(now, to, nonce));
        assert_eq!(spray.poll_transmit(now + Duration::from_secs(1)), None);
    }

    #[test]
    fn a_sequential_nat_is_sprayed_after_its_known_port_first() {
        let start = Instant::now();
        let hard = NatMapping::EndpointDependent {
            sequential_step: Some(2),
        };
        let plan = Plan::for_pair(EASY, hard, sa("198.51.100.7:40000")).unwrap();
        let sent = run_unanswered(Birthday::new(start, plan, 3), start);
        let first: Vec<u16> = sent.iter().take(3).map(|(_, to)| to.port()).collect();
        assert_eq!(first, [40002, 40004, 40006]);
        assert_eq!(sent.len(), SPRAY_BUDGET as usize);
    }
}
