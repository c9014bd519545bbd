//! A simulated network for the reliable channel, in virtual time.
//!
//! Shared by `tests/reliable_sim.rs` (correctness under hostile networks) and
//! `benches/reliable.rs` (goodput and latency), so both measure the same
//! path model. Each direction is a [`Link`]: a bottleneck of fixed bandwidth
//! behind a bounded drop-tail queue, then a propagation delay with jitter,
//! random loss, duplication and extra reordering delay. All randomness comes
//! from one seeded RNG per link, so a run replays exactly from its seed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use natter::reliable::Connection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// UDP and IPv4 headers: what a datagram costs on the bottleneck beyond
/// itself.
pub const UDP_IP_OVERHEAD: usize = 28;

/// Bytes a datagram costs on the bottleneck beyond the channel's payload:
/// the natter data header, the AEAD tag reserve, and UDP plus IPv4 headers.
pub const WIRE_OVERHEAD: usize = natter::wire::DATA_HEADER_LEN + 16 + UDP_IP_OVERHEAD;

/// One direction's behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// Probability a datagram is lost after the bottleneck.
    pub loss: f64,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability a datagram takes up to one extra `delay`, overtaking
    /// others.
    pub reorder: f64,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from zero to this, per datagram.
    pub jitter: Duration,
    /// Bottleneck rate in bytes per second (None: infinitely fast).
    pub bandwidth: Option<u64>,
    /// Bytes the bottleneck queue holds before dropping arrivals.
    pub queue_bytes: u64,
}

impl LinkParams {
    /// A perfect, instantaneous link.
    pub fn ideal() -> Self {
        Self {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth: None,
            queue_bytes: u64::MAX,
        }
    }
}

/// Counters of what a link did to the datagrams given to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub lost: u64,
    pub queue_drops: u64,
    pub duplicated: u64,
}

/// One direction of the simulated path.
pub struct Link {
    params: LinkParams,
    rng: StdRng,
    /// When the bottleneck finishes serialising what it already holds.
    busy_until: Option<Instant>,
    /// Datagrams in flight, by arrival time then send order.
    in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    sequence: u64,
    pub stats: LinkStats,
}

impl Link {
    pub fn new(params: LinkParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            busy_until: None,
            in_flight: BinaryHeap::new(),
            sequence: 0,
            stats: LinkStats::default(),
        }
    }

    /// Sends channel packet `number`, which costs [`WIRE_OVERHEAD`] more
    /// on the bottleneck. The link carries the number in 8 bytes before
    /// the payload and does not charge them: the sealed header that carries
    /// a real packet's number is in [`WIRE_OVERHEAD`].
    pub fn send_packet(&mut self, now: Instant, number: u64, payload: &[u8]) {
        let mut datagram = number.to_le_bytes().to_vec();
        datagram.extend_from_slice(payload);
        self.send_sized(now, datagram, WIRE_OVERHEAD - 8);
    }

    /// The next channel packet sent with [`send_packet`](Self::send_packet)
    /// that has arrived by `now`: its number and payload.
    pub fn pop_arrived_packet(&mut self, now: Instant) -> Option<(u64, Vec<u8>)> {
        let datagram = self.pop_arrived(now)?;
        let (number, payload) = datagram.split_first_chunk::<8>().expect("sent numbered");
        Some((u64::from_le_bytes(*number), payload.to_vec()))
    }

    /// Sends a datagram that costs `overhead` bytes more on the bottleneck.
    pub fn send_sized(&mut self, now: Instant, payload: Vec<u8>, overhead: usize) {
        let mut departs = now;
        if let Some(rate) = self.params.bandwidth {
            let start = self.busy_until.map_or(now, |busy| busy.max(now));
            let backlog = (start - now).as_secs_f64() * rate as f64;
            let size = (payload.len() + overhead) as u64;
            if backlog as u64 + size > self.params.queue_bytes {
                self.stats.queue_drops += 1;
                return;
            }
            departs = start + Duration::from_secs_f64(size as f64 / rate as f64);
            self.busy_until = Some(departs);
        }
        if self.rng.gen_bool(self.params.loss) {
            self.stats.lost += 1;
            return;
        }
        if self.rng.gen_bool(self.params.duplicate) {
            self.stats.duplicated += 1;
            self.schedule(departs, payload.clone());
        }
        self.schedule(departs, payload);
    }

    fn schedule(&mut self, departs: Instant, payload: Vec<u8>) {
        let mut arrives = departs + self.params.delay + self.jitter();
        if self.rng.gen_bool(self.params.reorder) {
            arrives += self.params.delay.mul_f64(self.rng.gen::<f64>());
        }
        self.sequence += 1;
        self.in_flight
            .push(Reverse((arrives, self.sequence, payload)));
    }

    fn jitter(&mut self) -> Duration {
        self.params.jitter.mul_f64(self.rng.gen::<f64>())
    }

    pub fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next datagram that has arrived by `now`.
    pub fn pop_arrived(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_arrival()? > now {
            return None;
        }
        self.in_flight.pop().map(|Reverse((_, _, payload))| payload)
    }
}

/// Two connections joined by two links, advanced in virtual time.
pub struct Net {
    pub a: Connection,
    pub b: Connection,
    pub a_to_b: Link,
    pub b_to_a: Link,
    pub now: Instant,
}

/// Sends `conn`'s next packet through `link`; false when it has none.
fn transmit_one(conn: &mut Connection, link: &mut Link, now: Instant) -> bool {
    let number = conn.next_packet_number();
    let Some(payload) = conn.poll_transmit(now, number) else {
        return false;
    };
    link.send_packet(now, number, &payload);
    true
}

impl Net {
    /// Moves every datagram the connections want to send onto the links.
    pub fn transmit(&mut self) {
        while transmit_one(&mut self.a, &mut self.a_to_b, self.now) {}
        while transmit_one(&mut self.b, &mut self.b_to_a, self.now) {}
    }

    /// The next time anything happens: an arrival or a connection's timer.
    pub fn next_event(&self) -> Option<Instant> {
        [
            self.a_to_b.next_arrival(),
            self.b_to_a.next_arrival(),
            self.a.poll_timeout(),
            self.b.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Jumps to `at` (never backwards) and delivers every arrival and timer
    /// due by then.
    pub fn advance_to(&mut self, at: Instant) {
        self.now = self.now.max(at);
        while let Some((number, payload)) = self.a_to_b.pop_arrived_packet(self.now) {
            self.b.handle_datagram(self.now, number, &payload);
        }
        while let Some((number, payload)) = self.b_to_a.pop_arrived_packet(self.now) {
            self.a.handle_datagram(self.now, number, &payload);
        }
        for conn in [&mut self.a, &mut self.b] {
            if conn.poll_timeout().is_some_and(|t| t <= self.now) {
                conn.handle_timeout(self.now);
            }
        }
    }
}
