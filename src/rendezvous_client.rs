//! A peer's side of the rendezvous protocol: register in a room, keep the
//! registration fresh, and learn the other peer's candidates.
//!
//! Register is retransmitted with exponential backoff until the server
//! answers; a server that never answers is reported with the time waited.
//! A server that answers `Busy` is asked again when it says, with jitter and
//! with the cookie it handed out, for as long as the user is willing to wait
//! for the other peer; if it never lets this peer in, the error says it was
//! busy, not that it did not answer.
//! After `Registered`, refreshes keep both the registration and the NAT
//! mapping towards the server alive until `Introduce` arrives.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{
    split_header, AddressCookie, BusyReason, ClientMessage, FrameKind, NatMapping, Register,
    RejoinTag, Role, RoomCode, ServerErrorKind, ServerMessage, WireError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::ConnectError;

/// Refresh period while no other peer has been introduced.
const WAITING_REFRESH: Duration = Duration::from_secs(1);

/// Bounds on a server's "retry after": a retry is never sooner (a
/// retry-after of zero must not become a busy loop) nor later than these.
const BUSY_RETRY_MIN: Duration = Duration::from_millis(20);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(5);

/// The longest this peer's own backoff grows between retries of a busy
/// server (the server may ask for longer). A long backoff spares a shedding
/// server little, since its `Busy` replies are budgeted, and costs a crowd
/// behind one address much. 150 pairs behind one address each side against
/// a 20/s address ceiling in the NAT lab (one run each): the last pair
/// connected after 6.8 s with no backoff (14 780 datagrams at the server),
/// 11.1 s with 250 ms (6 271), 17.4 s with 1 s (4 189), 37.5 s with 5 s.
const BUSY_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// A shedding server that then falls silent this long is given up on.
const SHED_SILENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    /// First retransmission delay of an unanswered Register; doubles.
    pub initial_retransmit: Duration,
    pub max_retransmit: Duration,
    /// Give up when the server has not answered the first Register by then.
    pub register_timeout: Duration,
    /// Give up when nobody else joins the room by then.
    pub wait_timeout: Duration,
    /// This peer made the room name up (a generated pairing code): refuse
    /// to share the room with whoever is already in it.
    pub claim: bool,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            initial_retransmit: Duration::from_millis(250),
            max_retransmit: Duration::from_secs(2),
            register_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(300),
            claim: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RendezvousEvent {
    Registered {
        reflexive: SocketAddr,
    },
    Introduced {
        session_id: u64,
        role: Role,
        reflexive: SocketAddr,
        host_candidates: Vec<SocketAddr>,
        /// How the other peer's NAT maps, if it said.
        nat: Option<NatMapping>,
        /// The other peer's port mapping, if it has one.
        mapped: Option<SocketAddr>,
        /// The other peer is a restart of the one of the last session.
        restarted: bool,
    },
    Failed(ConnectError),
}

/// Where relay requests go: the current session at the server, the token
/// that shows the server who sends, and the bytes per second it relays for
/// this peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRoute {
    pub session_id: u64,
    pub peer_token: u64,
    pub rate: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not registering yet: the peer is finding out how its NAT maps, which
    /// its Register tells the other peer.
    Gathering,
    /// Sending Register until the first answer.
    Registering,
    /// The server answered only `Busy` so far: asking again as it says.
    Shed {
        since: Instant,
        reason: BusyReason,
    },
    Registered,
    /// Left the room or failed: nothing more to send.
    Done,
}

pub struct RendezvousClient {
    config: RendezvousConfig,
    server: SocketAddr,
    room: RoomCode,
    host_candidates: Vec<SocketAddr>,
    /// How this peer's NAT maps, sent with every Register.
    nat: Option<NatMapping>,
    /// This peer's port mapping at its gateway, sent with every Register.
    mapped: Option<SocketAddr>,
    nonce: u64,
    token: Option<u64>,
    /// From the server's last `Busy`: sent with every Register after it.
    cookie: Option<AddressCookie>,
    /// Lets a restart of this peer take its place in the room back.
    rejoin: Option<RejoinTag>,
    /// Jitter for retries a busy server asked for, so a crowd it turned
    /// away does not come back in one wave.
    jitter: StdRng,
    /// The least wait before the next retry of a busy server: doubles with
    /// each `Busy` in a row, since the server's "retry after" is for one
    /// datagram and cannot know how many peers behind the same address are
    /// waiting for it.
    busy_backoff: Duration,
    state: State,
    started: Instant,
    registered_at: Option<Instant>,
    last_heard: Option<Instant>,
    next_send: Instant,
    retransmit: Duration,
    refresh_interval: Duration,
    /// Bytes per second the server relays for each peer of a pair that
    /// cannot punch; 0 if it does not relay.
    relay_rate: u32,
    introduced: Option<u64>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<RendezvousEvent>,
}

impl RendezvousClient {
    pub fn new(
        now: Instant,
        config: RendezvousConfig,
        server: SocketAddr,
        room: RoomCode,
        host_candidates: Vec<SocketAddr>,
        nonce: u64,
    ) -> Self {
        Self {
            retransmit: config.initial_retransmit,
            config,
            server,
            room,
            host_candidates,
            nat: None,
            mapped: None,
            nonce,
            token: None,
            cookie: None,
            rejoin: None,
            jitter: StdRng::seed_from_u64(nonce),
            busy_backoff: BUSY_RETRY_MIN,
            state: State::Gathering,
            started: now,
            registered_at: None,
            last_heard: None,
            next_send: now,
            refresh_interval: Duration::from_secs(15),
            relay_rate: 0,
            introduced: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Registers with `tag`, so that this peer started again (a new
    /// process, a new socket) takes its own place in the room back instead
    /// of finding the room full of its lingering registration.
    pub fn rejoin_as(mut self, tag: RejoinTag) -> Self {
        self.rejoin = Some(tag);
        self
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Starts registering, telling the server how this peer's NAT maps
    /// (`None`: the peer did not look).
    pub fn register(&mut self, now: Instant, nat: Option<NatMapping>) {
        if self.state == State::Gathering {
            self.nat = nat;
            self.state = State::Registering;
            self.started = now;
            self.next_send = now;
        }
    }

    /// The session id and token relay requests carry, if the server relays
    /// and this peer is registered and introduced. Both change when the
    /// server introduces the peers again (after it restarted, or after a
    /// NAT rebinding), and a relayed session follows them.
    pub fn relay_route(&self) -> Option<RelayRoute> {
        match (self.state, self.token, self.introduced) {
            (State::Registered, Some(peer_token), Some(session_id)) if self.relay_rate > 0 => {
                Some(RelayRoute {
                    session_id,
                    peer_token,
                    rate: self.relay_rate,
                })
            }
            _ => None,
        }
    }

    /// A datagram from the server's address.
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) {
        if matches!(self.state, State::Gathering | State::Done) {
            return;
        }
        let message = match ServerMessage::decode(bytes) {
            Ok(message) => message,
            Err(_) => {
                // A version notice: the server speaks another version. Only
                // an answer to our first Register can be one; later, it is
                // somebody else's forgery (it would end a relayed session).
                if let Err(WireError::UnsupportedVersion { got }) = split_header(bytes) {
                    let registering = matches!(self.state, State::Registering | State::Shed { .. });
                    if bytes[0] == FrameKind::FromServer as u8 && registering {
                        self.fail(ConnectError::VersionMismatch {
                            ours: natter_wire::VERSION,
                            theirs: got,
                        });
                    }
                }
                return;
            }
        };
        self.last_heard = Some(now);
        match message {
            ServerMessage::Registered {
                client_nonce,
                reflexive,
                peer_token,
                refresh_interval_ms,
                relay_rate,
            } if client_nonce == self.nonce => {
                self.token = Some(peer_token);
                self.relay_rate = relay_rate;
                self.busy_backoff = BUSY_RETRY_MIN;
                self.refresh_interval =
                    Duration::from_millis(refresh_interval_ms.into()).max(Duration::from_secs(1));
                if self.state != State::Registered {
                    self.state = State::Registered;
                    self.registered_at = Some(now);
                    self.events
                        .push_back(RendezvousEvent::Registered { reflexive });
                }
                self.next_send = now + self.refresh_period();
            }
            ServerMessage::Introduce {
                session_id,
                your_role,
                other_reflexive,
                other_host_candidates,
                other_nat,
                other_mapped,
                other_restarted,
            } if self.state == State::Registered && self.introduced != Some(session_id) => {
                self.introduced = Some(session_id);
                self.events.push_back(RendezvousEvent::Introduced {
                    session_id,
                    role: your_role,
                    reflexive: other_reflexive,
                    host_candidates: other_host_candidates,
                    nat: other_nat,
                    mapped: other_mapped,
                    restarted: other_restarted,
                });
            }
            ServerMessage::Busy {
                client_nonce,
                reason,
                retry_after_ms,
                cookie,
            } if client_nonce == self.nonce => {
                if cookie.is_some() {
                    self.cookie = cookie;
                }
                self.state = match self.state {
                    State::Registering => State::Shed { since: now, reason },
                    State::Shed { since, .. } => State::Shed { since, reason },
                    other => other,
                };
                // It answered: a later loss starts the backoff over.
                self.retransmit = self.config.initial_retransmit;
                let asked = Duration::from_millis(retry_after_ms.into())
                    .clamp(self.busy_backoff, BUSY_RETRY_MAX.max(self.busy_backoff));
                self.busy_backoff = (self.busy_backoff * 2).min(BUSY_BACKOFF_MAX);
                self.next_send = now + asked.mul_f64(self.jitter.gen_range(1.0..1.5));
            }
            ServerMessage::Error { client_nonce, kind } if client_nonce == self.nonce => match kind
            {
                // Our registration expired (we were away too long): start over.
                ServerErrorKind::BadToken => {
                    self.token = None;
                    self.next_send = now;
                }
                ServerErrorKind::RoomFull
                | ServerErrorKind::ServerFull
                | ServerErrorKind::RoomTaken => self.fail(ConnectError::Refused(kind)),
            },
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Gathering | State::Done => return,
            State::Registering if now >= self.started + self.config.register_timeout => {
                return self.fail(ConnectError::RendezvousUnreachable {
                    server: self.server,
                    waited: self.config.register_timeout,
                });
            }
            State::Shed { reason, .. } if now >= self.shed_deadline() => {
                return self.fail(ConnectError::RendezvousBusy {
                    server: self.server,
                    reason,
                    retried_for: now - self.started,
                });
            }
            State::Registered => {
                let registered_at = self.registered_at.expect("set when registered");
                if self.introduced.is_none() && now >= registered_at + self.config.wait_timeout {
                    return self.fail(ConnectError::NoPeer {
                        waited: self.config.wait_timeout,
                    });
                }
                let last_heard = self.last_heard.expect("set when registered");
                // Once introduced, a session may be running on a direct
                // path: a server that went away is no reason to end it, and
                // refreshes go on in case it comes back.
                if self.introduced.is_none() && now >= last_heard + 3 * self.refresh_interval {
                    return self.fail(ConnectError::RendezvousLost {
                        server: self.server,
                        silent_for: now - last_heard,
                    });
                }
            }
            State::Registering | State::Shed { .. } => {}
        }
        if now >= self.next_send {
            self.send_register();
            self.next_send = match self.state {
                State::Registering | State::Shed { .. } => {
                    let next = now + self.retransmit;
                    self.retransmit = (self.retransmit * 2).min(self.config.max_retransmit);
                    next
                }
                _ => now + self.refresh_period(),
            };
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Gathering | State::Done => None,
            State::Registering => Some(
                self.next_send
                    .min(self.started + self.config.register_timeout),
            ),
            State::Shed { .. } => Some(self.next_send.min(self.shed_deadline())),
            State::Registered => Some(self.next_send),
        }
    }

    /// A shedding server is asked as long as the user waits for the other
    /// peer, unless it falls silent.
    fn shed_deadline(&self) -> Instant {
        let last_heard = self.last_heard.unwrap_or(self.started);
        (self.started + self.config.wait_timeout).min(last_heard + SHED_SILENCE)
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<RendezvousEvent> {
        self.events.pop_front()
    }

    /// Refreshes the registration now rather than at the next interval: this
    /// peer's address may have changed (a path went silent, the host's
    /// addresses changed), and the server introduces the peers again when it
    /// sees a registration from a new address.
    ///
    /// Sent at once, not at a timer: the answer to a refresh already on its
    /// way would set the timer back to a full interval (seen in the NAT lab:
    /// a port mapping that came a few milliseconds after the periodic
    /// refresh was not registered for 15 s).
    pub fn refresh_now(&mut self, now: Instant) {
        if self.state == State::Registered {
            self.send_register();
            self.next_send = now + self.refresh_period();
        }
    }

    /// This host's addresses changed: the next registration carries these.
    pub fn set_host_candidates(&mut self, now: Instant, host_candidates: Vec<SocketAddr>) {
        if host_candidates != self.host_candidates {
            self.host_candidates = host_candidates;
            self.refresh_now(now);
        }
    }

    /// This peer's port mapping, as registered.
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// The gateway forwards `mapped` to this peer's socket now (or no
    /// longer): the next registration says so, and the server introduces
    /// the peers again so that the other one tries it.
    pub fn set_mapped(&mut self, now: Instant, mapped: Option<SocketAddr>) {
        if mapped != self.mapped {
            self.mapped = mapped;
            self.refresh_now(now);
            // Not registered yet: the first Register carries it.
        }
    }

    /// Tells the server we are done and stops all traffic to it.
    pub fn leave(&mut self) {
        if let (Some(peer_token), State::Registered) = (self.token, self.state) {
            let leave = ClientMessage::Leave {
                room: self.room.clone(),
                peer_token,
            };
            self.transmits
                .push_back(leave.encode().expect("a valid room code encodes"));
        }
        self.state = State::Done;
    }

    /// While waiting for the other peer, refresh every second: the server
    /// repeats a lost `Introduce` on each refresh, and the other peer is
    /// already punching (for 5 s) when ours is lost, so it must arrive well
    /// within that window.
    fn refresh_period(&self) -> Duration {
        if self.introduced.is_none() {
            self.refresh_interval.min(WAITING_REFRESH)
        } else {
            self.refresh_interval
        }
    }

    fn send_register(&mut self) {
        let register = ClientMessage::Register(Register {
            room: self.room.clone(),
            host_candidates: self.host_candidates.clone(),
            client_nonce: self.nonce,
            peer_token: self.token,
            // A claim keeps strangers apart before the introduction; after
            // it, registering again (a restarted server) must find the room
            // that the other peer may already have re-entered.
            claim: self.config.claim && self.introduced.is_none(),
            cookie: self.cookie,
            nat: self.nat,
            mapped: self.mapped,
            rejoin: self.rejoin,
        });
        self.transmits.push_back(
            register
                .encode()
                .expect("candidates are capped when gathered"),
        );
    }

    fn fail(&mut self, error: ConnectError) {
        self.state = State::Done;
        self.events.push_back(RendezvousEvent::Failed(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(now: Instant) -> RendezvousClient {
        let mut client = RendezvousClient::new(
            now,
            RendezvousConfig::default(),
            "203.0.113.1:7777".parse().unwrap(),
            RoomCode::new(*b"room").unwrap(),
            vec![],
            42,
        );
        client.register(now, None);
        client
    }

    /// A port mapping that comes after registering goes to the server at
    /// once, in a Register.
    #[test]
    fn a_new_port_mapping_is_registered_at_once() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        assert!(c.poll_transmit().is_some());
        c.handle_datagram(now, &registered(42));
        let later = now + Duration::from_millis(900);
        c.handle_timeout(later);
        assert!(c.poll_transmit().is_none(), "nothing due yet");
        let mapped: SocketAddr = "198.51.100.4:5000".parse().unwrap();
        c.set_mapped(later, Some(mapped));
        // The answer to an earlier refresh, arriving just after, must not
        // hold it back.
        c.handle_datagram(later, &registered(42));
        let sent = c.poll_transmit().expect("a Register");
        match ClientMessage::decode(&sent).unwrap() {
            ClientMessage::Register(register) => assert_eq!(register.mapped, Some(mapped)),
            other => panic!("{other:?}"),
        }
    }

    fn registered(nonce: u64) -> Vec<u8> {
        ServerMessage::Registered {
            client_nonce: nonce,
            reflexive: "198.51.100.4:4000".parse().unwrap(),
            peer_token: 5,
            refresh_interval_ms: 15_000,
            relay_rate: 1 << 20,
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn register_is_retransmitted_then_times_out() {
        let start = Instant::now();
        let mut c = client(start);
        let mut sent = 0;
        let mut now = start;
        while let Some(next) = c.poll_timeout() {
            now = next;
            c.handle_timeout(now);
            while c.poll_transmit().is_some() {
                sent += 1;
            }
        }
        // 0, 0.25, 0.75, 1.75, 3.75 s, then the 5 s deadline.
        assert_eq!(sent, 5);
        assert_eq!(now - start, Duration::from_secs(5));
        assert!(matches!(
            c.poll_event(),
            Some(RendezvousEvent::Failed(
                ConnectError::RendezvousUnreachable { .. }
            ))
        ));
    }

    /// A server that keeps answering `Busy` is asked again as it says, with
    /// its cookie, until the wait runs out; the error names the shedding.
    #[test]
    fn a_busy_server_is_retried_with_its_cookie_and_named_in_the_error() {
        let start = Instant::now();
        let mut c = client(start);
        c.config.wait_timeout = Duration::from_secs(60);
        let cookie = AddressCookie([9; 16]);
        let busy = ServerMessage::Busy {
            client_nonce: 42,
            reason: BusyReason::RateLimited,
            retry_after_ms: 400,
            cookie: Some(cookie),
        }
        .encode()
        .unwrap();
        let mut now = start;
        let mut registers = 0;
        while let Some(next) = c.poll_timeout() {
            now = next;
            c.handle_timeout(now);
            while let Some(bytes) = c.poll_transmit() {
                let ClientMessage::Register(register) = ClientMessage::decode(&bytes).unwrap()
                else {
                    panic!("expected a Register");
                };
                assert_eq!(register.cookie, (registers > 0).then_some(cookie));
                registers += 1;
                // Every other Register is answered, the rest lost.
                if registers % 2 == 1 {
                    c.handle_datagram(now, &busy);
                }
            }
        }
        assert_eq!(now - start, Duration::from_secs(60));
        // A retry 400-600 ms after each Busy (the asked 400 ms is longer
        // than this peer's own backoff), 250 ms after each loss: two
        // Registers every 0.65-0.85 s.
        assert!((140..=185).contains(&registers), "{registers} Registers");
        let Some(RendezvousEvent::Failed(error)) = c.poll_event() else {
            panic!("expected a failure");
        };
        assert!(matches!(error, ConnectError::RendezvousBusy { .. }));
        assert_eq!(
            error.to_string(),
            "rendezvous 203.0.113.1:7777 is busy (rate limited); retried for 60 s"
        );
    }

    #[test]
    fn registered_then_introduced_once() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_timeout(now);
        assert!(c.poll_transmit().is_some());
        c.handle_datagram(now, &registered(42));
        assert!(matches!(
            c.poll_event(),
            Some(RendezvousEvent::Registered { .. })
        ));
        let introduce = ServerMessage::Introduce {
            session_id: 7,
            your_role: Role::Controlled,
            other_reflexive: "203.0.113.9:9".parse().unwrap(),
            other_host_candidates: vec![],
            other_nat: None,
            other_mapped: None,
            other_restarted: false,
        }
        .encode()
        .unwrap();
        c.handle_datagram(now, &introduce);
        c.handle_datagram(now, &introduce);
        assert!(matches!(
            c.poll_event(),
            Some(RendezvousEvent::Introduced { session_id: 7, .. })
        ));
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn answers_for_another_nonce_are_ignored() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_datagram(now, &registered(41));
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn room_full_taken_and_version_mismatch_fail_clearly() {
        let now = Instant::now();
        let mut c = client(now);
        let full = ServerMessage::Error {
            client_nonce: 42,
            kind: ServerErrorKind::RoomFull,
        };
        c.handle_datagram(now, &full.encode().unwrap());
        assert_eq!(
            c.poll_event(),
            Some(RendezvousEvent::Failed(ConnectError::Refused(
                ServerErrorKind::RoomFull
            )))
        );
        let mut c = client(now);
        c.handle_datagram(
            now,
            &[FrameKind::FromServer as u8, natter_wire::VERSION + 1],
        );
        assert!(matches!(
            c.poll_event(),
            Some(RendezvousEvent::Failed(
                ConnectError::VersionMismatch { .. }
            ))
        ));
    }

    #[test]
    fn waiting_refreshes_and_eventually_gives_up() {
        let start = Instant::now();
        let mut c = client(start);
        c.handle_timeout(start);
        assert!(c.poll_transmit().is_some(), "the first Register");
        c.handle_datagram(start, &registered(42));
        c.poll_event();
        let mut now = start;
        let mut refreshes = 0;
        while let Some(next) = c.poll_timeout() {
            now = next;
            c.handle_timeout(now);
            while c.poll_transmit().is_some() {
                refreshes += 1;
                c.handle_datagram(now, &registered(42));
            }
        }
        assert!(matches!(
            c.poll_event(),
            Some(RendezvousEvent::Failed(ConnectError::NoPeer { .. }))
        ));
        assert_eq!(now - start, Duration::from_secs(300));
        // One refresh a second while waiting.
        assert_eq!(refreshes, 299);
    }

    /// A version notice can only answer the first Register: later, someone
    /// spoofing the server's address must not end the session with one.
    #[test]
    fn a_version_notice_after_registration_is_ignored() {
        let now = Instant::now();
        let mut c = client(now);
        c.handle_datagram(now, &registered(42));
        assert!(matches!(
            c.poll_event(),
            Some(RendezvousEvent::Registered { .. })
        ));
        c.handle_datagram(
            now,
            &[FrameKind::FromServer as u8, natter_wire::VERSION + 1],
        );
        assert_eq!(c.poll_event(), None);
    }

    /// After a restart the server no longer knows the token: the client
    /// registers again at once, without the token and without claiming the
    /// room, and follows the new introduction's relay route.
    #[test]
    fn a_restarted_server_is_joined_again_without_a_claim() {
        let now = Instant::now();
        let mut c = RendezvousClient::new(
            now,
            RendezvousConfig {
                claim: true,
                ..RendezvousConfig::default()
            },
            "203.0.113.1:7777".parse().unwrap(),
            RoomCode::new(*b"room").unwrap(),
            vec![],
            42,
        );
        c.register(now, None);
        let introduce = |session_id| {
            ServerMessage::Introduce {
                session_id,
                your_role: Role::Controlled,
                other_reflexive: "203.0.113.9:9".parse().unwrap(),
                other_host_candidates: vec![],
                other_nat: None,
                other_mapped: None,
                other_restarted: false,
            }
            .encode()
            .unwrap()
        };
        c.handle_timeout(now);
        let first = ClientMessage::decode(&c.poll_transmit().unwrap()).unwrap();
        assert!(matches!(
            first,
            ClientMessage::Register(Register { claim: true, .. })
        ));
        c.handle_datagram(now, &registered(42));
        c.handle_datagram(now, &introduce(7));
        assert_eq!(c.relay_route().map(|r| r.session_id), Some(7));
        let bad_token = ServerMessage::Error {
            client_nonce: 42,
            kind: ServerErrorKind::BadToken,
        };
        c.handle_datagram(now, &bad_token.encode().unwrap());
        assert_eq!(c.relay_route(), None);
        c.handle_timeout(now);
        let again = ClientMessage::decode(&c.poll_transmit().unwrap()).unwrap();
        assert!(matches!(
            again,
            ClientMessage::Register(Register {
                claim: false,
                peer_token: None,
                ..
            })
        ));
        c.handle_datagram(now, &registered(42));
        c.handle_datagram(now, &introduce(8));
        assert_eq!(
            c.relay_route(),
            Some(RelayRoute {
                session_id: 8,
                peer_token: 5,
                rate: 1 << 20,
            })
        );
    }
}
