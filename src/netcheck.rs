//! How this host's NAT behaves, learnt from the rendezvous with STUN (NAT
//! behaviour discovery, RFC 5780; the terms are RFC 4787's).
//!
//! A [`Probe`] runs on one socket. A [`ProbeKind::Mapping`] probe asks the
//! rendezvous for this socket's external address, then asks the server's
//! other addresses (its STUN answer names them) from the same socket: the
//! same external address each time means the NAT maps the socket
//! independently of the destination, and a plain punch gets through it;
//! different ones mean each destination gets a mapping of its own, which
//! only port prediction or port mapping can get around. It also sends a
//! request to its own external address, which comes back only if the NAT
//! hairpins. A [`ProbeKind::Filtering`] probe, on a fresh socket that has
//! sent nowhere else, asks the server to answer from its other IP and port,
//! then from its other port only: what gets through says which unsolicited
//! datagrams the NAT lets in.
//!
//! Like the other protocol pieces it is sans-IO: the driver passes datagrams
//! and the time in and sends what [`Probe::poll_transmit`] returns;
//! [`NatReport::new`] reads the finished probes.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natter_wire::stun::{self, Change, TransactionId};
use natter_wire::NatMapping;
use serde::Serialize;

/// First retransmission of an unanswered request; doubles (RFC 8489's
/// schedule, shortened: the server is the user's own rendezvous).
const RETRANSMIT: Duration = Duration::from_millis(100);

/// A request unanswered this long after it was first sent is taken as not
/// coming through: for the filtering tests that is the answer. Long enough
/// for several retransmissions over a lossy path.
pub const GIVE_UP: Duration = Duration::from_millis(1500);

/// Mapped ports this far apart, in the same direction every time, are taken
/// for a sequential allocator.
const SEQUENTIAL_MAX_STEP: i32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// How the NAT maps; with `hairpin`, also whether it hairpins (which
    /// takes [`GIVE_UP`] to tell when it does not).
    Mapping {
        hairpin: bool,
    },
    Filtering,
}

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The rendezvous's own address: the reflexive address and the other
    /// address.
    Primary,
    /// The other IP address, the primary port.
    OtherIp,
    /// The other IP address and port.
    OtherIpAndPort,
    /// The primary IP address, the other port.
    OtherPort,
    /// Our own reflexive address: comes back if the NAT hairpins.
    Hairpin,
    /// Answer from the other IP and port.
    ChangeIpAndPort,
    /// Answer from the other port.
    ChangePort,
}

#[derive(Debug, Clone)]
struct Request {
    purpose: Purpose,
    to: SocketAddr,
    change: Change,
    transaction: TransactionId,
    first_sent: Option<Instant>,
    next_send: Instant,
    retransmit: Duration,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Waiting,
    Answered {
        mapped: SocketAddr,
        /// From the first transmission, when only one was sent (Karn).
        rtt: Option<Duration>,
    },
    /// Nothing came back within [`GIVE_UP`].
    Silent,
}

/// The NAT tests of one socket.
#[derive(Debug)]
pub struct Probe {
    kind: ProbeKind,
    server: SocketAddr,
    other: Option<SocketAddr>,
    requests: Vec<Request>,
}

impl Probe {
    /// A probe of `kind` against the rendezvous at `server`, starting at
    /// `now`. Transaction ids come from `rand`.
    pub fn new(now: Instant, kind: ProbeKind, server: SocketAddr) -> Self {
        let mut probe = Self {
            kind,
            server,
            other: None,
            requests: Vec::new(),
        };
        probe.request(now, Purpose::Primary, server, Change::NONE);
        probe
    }

    fn request(&mut self, now: Instant, purpose: Purpose, to: SocketAddr, change: Change) {
        self.requests.push(Request {
            purpose,
            to,
            change,
            transaction: TransactionId::random(),
            first_sent: None,
            next_send: now,
            retransmit: RETRANSMIT,
            outcome: Outcome::Waiting,
        });
    }

    /// Every request answered or given up on.
    pub fn is_done(&self) -> bool {
        self.requests.iter().all(|r| r.outcome != Outcome::Waiting)
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(message) = stun::parse(bytes) else {
            return;
        };
        let (transaction, answer) = match message {
            stun::Message::BindingSuccess {
                transaction,
                mapped,
                other,
            } => (transaction, Some((mapped, other))),
            // Our own hairpin request, come back.
            stun::Message::BindingRequest { transaction, .. } => (transaction, None),
            stun::Message::Other { .. } => return,
        };
        let Some(request) = self
            .requests
            .iter_mut()
            .find(|r| r.transaction == transaction && r.outcome == Outcome::Waiting)
        else {
            return;
        };
        let rtt = request
            .first_sent
            .filter(|_| request.retransmit == RETRANSMIT)
            .map(|sent| now.saturating_duration_since(sent));
        let purpose = request.purpose;
        match (purpose, answer) {
            (Purpose::Hairpin, None) => request.outcome = Outcome::Answered { mapped: from, rtt },
            (Purpose::Hairpin, Some(_)) | (_, None) => {}
            (_, Some((mapped, other))) => {
                request.outcome = Outcome::Answered { mapped, rtt };
                if purpose == Purpose::Primary {
                    self.on_primary(now, mapped, other);
                }
            }
        }
    }

    /// The rendezvous answered: ask its other addresses.
    fn on_primary(&mut self, now: Instant, mapped: SocketAddr, other: Option<SocketAddr>) {
        let server = self.server;
        let Some(mut other) = other.filter(|o| o.is_ipv4() == server.is_ipv4()) else {
            return;
        };
        if other.ip().is_unspecified() {
            other.set_ip(server.ip());
        }
        self.other = Some(other);
        let other_ip = other.ip() != server.ip();
        match self.kind {
            ProbeKind::Mapping { hairpin } => {
                if other_ip {
                    let to = SocketAddr::new(other.ip(), server.port());
                    self.request(now, Purpose::OtherIp, to, Change::NONE);
                }
                self.request(now, Purpose::OtherIpAndPort, other, Change::NONE);
                if other_ip {
                    let to = SocketAddr::new(server.ip(), other.port());
                    self.request(now, Purpose::OtherPort, to, Change::NONE);
                }
                if hairpin {
                    self.request(now, Purpose::Hairpin, mapped, Change::NONE);
                }
            }
            ProbeKind::Filtering => {
                if other_ip {
                    let both = Change {
                        ip: true,
                        port: true,
                    };
                    self.request(now, Purpose::ChangeIpAndPort, server, both);
                }
                let port = Change {
                    ip: false,
                    port: true,
                };
                self.request(now, Purpose::ChangePort, server, port);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for request in &mut self.requests {
            let given_up = request.first_sent.is_some_and(|sent| now >= sent + GIVE_UP);
            if request.outcome == Outcome::Waiting && given_up {
                request.outcome = Outcome::Silent;
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.requests
            .iter()
            .filter(|r| r.outcome == Outcome::Waiting)
            .flat_map(|r| [Some(r.next_send), r.first_sent.map(|s| s + GIVE_UP)])
            .flatten()
            .min()
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let request = self
            .requests
            .iter_mut()
            .find(|r| r.outcome == Outcome::Waiting && r.next_send <= now)?;
        if request.first_sent.is_some() {
            request.retransmit *= 2;
        }
        request.first_sent.get_or_insert(now);
        request.next_send = now + request.retransmit;
        let bytes = if request.change.is_none() {
            stun::binding_request(request.transaction).to_vec()
        } else {
            stun::binding_request_with_change(request.transaction, request.change)
        };
        Some((request.to, bytes))
    }

    /// How the NAT maps, as the other peer needs to know it: `Unknown` until
    /// the probe is done.
    pub fn nat_mapping(&self) -> NatMapping {
        if !self.is_done() {
            return NatMapping::Unknown;
        }
        match classify_mapping(self) {
            Mapping::NoNat | Mapping::EndpointIndependent => NatMapping::EndpointIndependent,
            Mapping::AddressDependent
            | Mapping::AddressAndPortDependent
            | Mapping::EndpointDependent => NatMapping::EndpointDependent {
                sequential_step: match classify_allocation(self) {
                    Allocation::Sequential { step } => i16::try_from(step).ok(),
                    Allocation::Random | Allocation::Unknown => None,
                },
            },
            Mapping::Unknown => NatMapping::Unknown,
        }
    }

    fn outcome(&self, purpose: Purpose) -> Option<Outcome> {
        self.requests
            .iter()
            .find(|r| r.purpose == purpose)
            .map(|r| r.outcome)
    }

    fn mapped(&self, purpose: Purpose) -> Option<SocketAddr> {
        match self.outcome(purpose)? {
            Outcome::Answered { mapped, .. } => Some(mapped),
            _ => None,
        }
    }

    /// Whether a request for `purpose` came through: `None` when it was not
    /// sent or is still waiting.
    fn came_through(&self, purpose: Purpose) -> Option<bool> {
        match self.outcome(purpose)? {
            Outcome::Answered { .. } => Some(true),
            Outcome::Silent => Some(false),
            Outcome::Waiting => None,
        }
    }
}

/// How a NAT picks the external address of a socket (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The external address is the socket's own: no NAT.
    NoNat,
    /// One external address for every destination ("easy").
    EndpointIndependent,
    /// A new external address for each destination IP.
    AddressDependent,
    /// A new external address for each destination IP and port
    /// ("symmetric", "hard").
    AddressAndPortDependent,
    /// A new external address for another destination IP; whether the port
    /// alone changes it too is unknown (the rendezvous has no second port
    /// on its first IP).
    EndpointDependent,
    /// The rendezvous names no second address, or did not answer there.
    Unknown,
}

impl Mapping {
    /// A NAT whose mapping a plain punch cannot predict.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            Self::AddressDependent | Self::AddressAndPortDependent | Self::EndpointDependent
        )
    }
}

/// Which unsolicited datagrams a NAT lets in to a mapping (RFC 4787
/// section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// From anyone ("full cone").
    EndpointIndependent,
    /// From any port of an address the socket sent to.
    AddressDependent,
    /// Only from the addresses and ports the socket sent to.
    AddressAndPortDependent,
    /// From other ports of an address the socket sent to; whether from
    /// other addresses too is unknown (the rendezvous has one IP).
    PortIndependent,
    Unknown,
}

/// How the NAT hands out external ports to new mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Allocation {
    /// Each new mapping `step` ports after the last: the next one can be
    /// predicted.
    Sequential { step: i32 },
    /// No pattern in the ports of new mappings.
    Random,
    /// One mapping only (endpoint-independent), or too few answers.
    Unknown,
}

/// What one family's probes found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatReport {
    /// The rendezvous address the probes asked.
    pub server: SocketAddr,
    /// Where else the rendezvous answers STUN, as it said.
    pub server_other: Option<SocketAddr>,
    /// This socket's address as the rendezvous saw it.
    pub reflexive: Option<SocketAddr>,
    /// Round trip to the rendezvous, from an answer to a single send.
    #[serde(serialize_with = "millis")]
    pub rtt: Option<Duration>,
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// The NAT kept the socket's local port as the external port.
    pub port_preserved: Option<bool>,
    pub allocation: Allocation,
    /// A datagram to our own external address came back to us.
    pub hairpin: Option<bool>,
}

fn millis<S: serde::Serializer>(rtt: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match rtt {
        Some(rtt) => s.serialize_some(&(rtt.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

impl NatReport {
    /// Reads the finished `mapping` probe (run on a socket bound to
    /// `local`, whose addresses are `local_ips`) and `filtering` probe.
    pub fn new(
        mapping: &Probe,
        filtering: &Probe,
        local: SocketAddr,
        local_ips: &[IpAddr],
    ) -> Self {
        let reflexive = mapping.mapped(Purpose::Primary);
        let rtt = [mapping, filtering]
            .into_iter()
            .filter_map(|p| match p.outcome(Purpose::Primary)? {
                Outcome::Answered { rtt, .. } => rtt,
                _ => None,
            })
            .min();
        let no_nat = reflexive.is_some_and(|r| {
            local_ips.contains(&r.ip()) && (local.port() == 0 || r.port() == local.port())
        });
        let mapping_behaviour = if no_nat {
            Mapping::NoNat
        } else {
            classify_mapping(mapping)
        };
        Self {
            server: mapping.server,
            server_other: mapping.other,
            reflexive,
            rtt,
            mapping: mapping_behaviour,
            filtering: classify_filtering(filtering),
            port_preserved: reflexive
                .filter(|_| local.port() != 0)
                .map(|r| r.port() == local.port()),
            allocation: classify_allocation(mapping),
            hairpin: mapping.came_through(Purpose::Hairpin),
        }
    }
}

fn classify_mapping(probe: &Probe) -> Mapping {
    let Some(first) = probe.mapped(Purpose::Primary) else {
        return Mapping::Unknown;
    };
    let Some(other) = probe.other else {
        return Mapping::Unknown;
    };
    // Towards the primary IP on another port, and towards another IP.
    let (other_port, other_ip) = if other.ip() == probe.server.ip() {
        (probe.mapped(Purpose::OtherIpAndPort), None)
    } else {
        (
            probe.mapped(Purpose::OtherPort),
            probe
                .mapped(Purpose::OtherIp)
                .or(probe.mapped(Purpose::OtherIpAndPort)),
        )
    };
    match (other_port.map(|m| m == first), other_ip.map(|m| m == first)) {
        (Some(false), _) => Mapping::AddressAndPortDependent,
        (Some(true), Some(false)) => Mapping::AddressDependent,
        (None, Some(false)) => Mapping::EndpointDependent,
        (Some(true), _) | (None, Some(true)) => Mapping::EndpointIndependent,
        (None, None) => Mapping::Unknown,
    }
}

fn classify_filtering(probe: &Probe) -> Filtering {
    if probe.mapped(Purpose::Primary).is_none() || probe.other.is_none() {
        return Filtering::Unknown;
    }
    let can_change_ip = probe.outcome(Purpose::ChangeIpAndPort).is_some();
    match (
        probe.came_through(Purpose::ChangeIpAndPort),
        probe.came_through(Purpose::ChangePort),
    ) {
        (Some(true), _) => Filtering::EndpointIndependent,
        (_, Some(true)) if can_change_ip => Filtering::AddressDependent,
        (_, Some(true)) => Filtering::PortIndependent,
        (_, Some(false)) => Filtering::AddressAndPortDependent,
        _ => Filtering::Unknown,
    }
}

fn classify_allocation(probe: &Probe) -> Allocation {
    // External ports in the order their mappings were made (the order of
    // first sends).
    let mut sent: Vec<(Instant, u16)> = probe
        .requests
        .iter()
        .filter(|r| r.purpose != Purpose::Hairpin)
        .filter_map(|r| match r.outcome {
            Outcome::Answered { mapped, .. } => Some((r.first_sent?, mapped.port())),
            _ => None,
        })
        .collect();
    sent.sort_by_key(|&(at, _)| at);
    let mut ports: Vec<u16> = sent.into_iter().map(|(_, port)| port).collect();
    ports.dedup();
    if ports.len() < 3 {
        return Allocation::Unknown;
    }
    let steps: Vec<i32> = ports
        .windows(2)
        .map(|w| i32::from(w[1]) - i32::from(w[0]))
        .collect();
    let step = steps[0];
    let sequential = step != 0
        && step.abs() <= SEQUENTIAL_MAX_STEP
        && steps
            .iter()
            .all(|s| s.signum() == step.signum() && s.abs() <= SEQUENTIAL_MAX_STEP);
    if sequential {
        Allocation::Sequential { step }
    } else {
        Allocation::Random
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "203.0.113.10:7777";
    const OTHER: &str = "203.0.113.14:7778";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A server and NAT in one: answers each request with the mapping
    /// `map(destination)` gives, from where the request asked.
    fn run(
        kind: ProbeKind,
        other: Option<&str>,
        mut answer: impl FnMut(SocketAddr, Change) -> Option<SocketAddr>,
    ) -> Probe {
        let start = Instant::now();
        let mut now = start;
        let mut probe = Probe::new(now, kind, sa(SERVER));
        let other = other.map(sa);
        loop {
            while let Some((to, bytes)) = probe.poll_transmit(now) {
                let Ok(stun::Message::BindingRequest {
                    transaction,
                    change,
                }) = stun::parse(&bytes)
                else {
                    panic!("not a request")
                };
                if let Some(mapped) = answer(to, change) {
                    let reply = stun::binding_success(transaction, mapped, other);
                    probe.handle_datagram(now, to, &reply);
                }
            }
            if probe.is_done() {
                return probe;
            }
            now = probe.poll_timeout().expect("a waiting probe has a timer");
            probe.handle_timeout(now);
            assert!(
                now < start + Duration::from_secs(10),
                "probe never finished"
            );
        }
    }

    fn report(mapping: &Probe, filtering: &Probe) -> NatReport {
        NatReport::new(mapping, filtering, sa("192.168.1.2:40000"), &[])
    }

    #[test]
    fn a_symmetric_nat_is_address_and_port_dependent_with_its_allocator() {
        let mut next = 50_000;
        let mut mappings = std::collections::HashMap::new();
        let mapping = run(
            ProbeKind::Mapping { hairpin: true },
            Some(OTHER),
            |to, _| {
                let port = *mappings.entry(to).or_insert_with(|| {
                    next += 2;
                    next
                });
                Some(SocketAddr::new("198.51.100.1".parse().unwrap(), port))
            },
        );
        let filtering = run(ProbeKind::Filtering, Some(OTHER), |_, change| {
            change.is_none().then(|| sa("198.51.100.1:60000"))
        });
        let r = report(&mapping, &filtering);
        assert_eq!(r.mapping, Mapping::AddressAndPortDependent);
        assert!(r.mapping.is_hard());
        assert_eq!(r.filtering, Filtering::AddressAndPortDependent);
        assert_eq!(r.allocation, Allocation::Sequential { step: 2 });
        assert_eq!(r.port_preserved, Some(false));
        assert_eq!(
            r.hairpin,
            Some(false),
            "the hairpin request never came back"
        );
        assert_eq!(r.server_other, Some(sa(OTHER)));
    }

    #[test]
    fn a_cone_nat_is_endpoint_independent_and_its_filter_is_read() {
        let mapped = sa("198.51.100.1:40000");
        let mapping = run(ProbeKind::Mapping { hairpin: true }, Some(OTHER), |_, _| {
            Some(mapped)
        });
        for (lets_in, expected) in [
            (
                (|_| true) as fn(Change) -> bool,
                Filtering::EndpointIndependent,
            ),
            (|c| !c.ip, Filtering::AddressDependent),
            (|c| c.is_none(), Filtering::AddressAndPortDependent),
        ] {
            let filtering = run(ProbeKind::Filtering, Some(OTHER), |_, change| {
                lets_in(change).then_some(mapped)
            });
            let r = report(&mapping, &filtering);
            assert_eq!(r.mapping, Mapping::EndpointIndependent);
            assert_eq!(r.filtering, expected);
            assert_eq!(r.port_preserved, Some(true));
            assert_eq!(r.allocation, Allocation::Unknown);
        }
    }

    #[test]
    fn a_server_on_one_ip_tells_port_dependence_only() {
        let other = "0.0.0.0:7778";
        let mapping = run(
            ProbeKind::Mapping { hairpin: true },
            Some(other),
            |to, _| {
                Some(SocketAddr::new(
                    "198.51.100.1".parse().unwrap(),
                    to.port() + 1000,
                ))
            },
        );
        let filtering = run(ProbeKind::Filtering, Some(other), |_, change| {
            (!change.ip).then(|| sa("198.51.100.1:8777"))
        });
        let r = report(&mapping, &filtering);
        assert_eq!(r.server_other, Some(sa("203.0.113.10:7778")));
        assert_eq!(r.mapping, Mapping::AddressAndPortDependent);
        assert_eq!(r.filtering, Filtering::PortIndependent);
    }

    #[test]
    fn a_server_without_a_second_address_leaves_the_behaviour_unknown() {
        let mapping = run(ProbeKind::Mapping { hairpin: true }, None, |_, _| {
            Some(sa("198.51.100.1:1"))
        });
        let filtering = run(ProbeKind::Filtering, None, |_, _| {
            Some(sa("198.51.100.1:2"))
        });
        let r = report(&mapping, &filtering);
        assert_eq!(r.reflexive, Some(sa("198.51.100.1:1")));
        assert_eq!(
            (r.mapping, r.filtering, r.hairpin),
            (Mapping::Unknown, Filtering::Unknown, None)
        );
    }

    #[test]
    fn no_nat_when_the_reflexive_address_is_our_own() {
        let own = sa("192.168.1.2:40000");
        let mapping = run(ProbeKind::Mapping { hairpin: true }, Some(OTHER), |_, _| {
            Some(own)
        });
        let filtering = run(ProbeKind::Filtering, Some(OTHER), |_, _| Some(own));
        let r = NatReport::new(&mapping, &filtering, own, &[own.ip()]);
        assert_eq!(r.mapping, Mapping::NoNat);
    }

    #[test]
    fn a_silent_server_gives_up_after_the_limit() {
        let start = Instant::now();
        let probe = run(ProbeKind::Mapping { hairpin: true }, Some(OTHER), |_, _| {
            None
        });
        let r = report(&probe, &probe);
        assert_eq!(r.reflexive, None);
        assert_eq!(r.mapping, Mapping::Unknown);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "virtual time only"
        );
    }
}
