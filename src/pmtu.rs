//! Path MTU discovery for a direct path (DPLPMTUD, RFC 8899), sans-IO.
//!
//! Every path starts at [`BASE_DATAGRAM`] (1200 bytes, which any real path
//! carries). A probe is a sealed path challenge padded to the size under
//! test; the other peer's response (small) proves the size got through. The
//! search tries [`MAX_PATH_DATAGRAM`] first, since most paths carry a
//! 1500-byte MTU, then halves the gap between what got through and what did
//! not. A size counts as lost after [`MAX_PROBES`] unanswered probes. The
//! search ends when the gap is under 16 bytes, and runs again
//! after [`RAISE_INTERVAL`] (the path may have grown). If data stops getting
//! through at the found size (a black hole: the route changed, or a
//! middlebox drops large datagrams without a word), the link calls
//! [`Pmtu::black_hole`], the path goes back to the base size and searches
//! again after [`BLACK_HOLE_RETRY`].

use std::time::{Duration, Instant};

use natter_wire::{MAX_DATAGRAM, MAX_PATH_DATAGRAM};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The size every path starts at and falls back to.
pub const BASE_DATAGRAM: usize = MAX_DATAGRAM;

/// Unanswered probes of one size before it counts as too large (RFC 8899
/// MAX_PROBES).
pub const MAX_PROBES: u8 = 3;

/// The search stops when what got through and what did not are closer
/// than this.
const SEARCH_GRANULARITY: usize = 16;

/// How long an answer to a probe may take, at least, and in round trips.
const PROBE_TIMEOUT_MIN: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT_RTTS: u32 = 3;

/// After a black hole the search runs again this much sooner than
/// [`RAISE_INTERVAL`]: heavy random loss can look like one, and a wrong
/// fallback costs 18 % of each packet until the next search.
pub const BLACK_HOLE_RETRY: Duration = Duration::from_secs(60);

/// Mixed into the seed for probe tokens (ASCII "pmtu").
const PROBE_TOKEN_STREAM: u64 = 0x706d_7475;

/// A finished search runs again after this (RFC 8899's PMTU_RAISE_TIMER).
pub const RAISE_INTERVAL: Duration = Duration::from_secs(600);

/// A probe in flight.
#[derive(Debug, Clone, Copy)]
struct Probe {
    size: usize,
    token: [u8; 16],
    /// When the latest attempt went out, and how many have.
    sent_at: Instant,
    attempts: u8,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// No search: the active path is the relay, or the other peer does not
    /// answer path checks. Datagrams stay at the base size.
    Idle,
    /// Looking for the largest size between `confirmed` and `too_large`.
    Searching { probe: Option<Probe> },
    /// Done until `next_search`.
    Complete { next_search: Instant },
}

/// What one direct path carries, and the search for more.
#[derive(Debug)]
pub struct Pmtu {
    /// Largest datagram known to get through.
    confirmed: usize,
    /// Smallest size known not to (one past the ceiling at the start).
    too_large: usize,
    state: State,
    /// A probe's answer is expected within this.
    probe_timeout: Duration,
    rng: StdRng,
}

/// A probe to send: a challenge padded to make a datagram of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRequest {
    pub size: usize,
    pub token: [u8; 16],
}

impl Pmtu {
    /// `seed` may be the one the path checks use: the probe tokens come
    /// from a stream of their own (a probe token equal to a path
    /// challenge's would validate that challenge's path).
    /// Idle until [`on_path_change`](Self::on_path_change) says to search.
    pub fn new(seed: u64) -> Self {
        Self {
            confirmed: BASE_DATAGRAM,
            too_large: MAX_PATH_DATAGRAM + 1,
            state: State::Idle,
            probe_timeout: PROBE_TIMEOUT_MIN,
            rng: StdRng::seed_from_u64(seed ^ PROBE_TOKEN_STREAM),
        }
    }

    /// The session moved to another path (or started on one): it starts at
    /// the base size, and searches if `search`. The token stream goes on,
    /// so a late answer to a probe on the old path confirms nothing here.
    pub fn on_path_change(&mut self, search: bool) {
        self.confirmed = BASE_DATAGRAM;
        self.too_large = MAX_PATH_DATAGRAM + 1;
        self.state = match search {
            true => State::Searching { probe: None },
            false => State::Idle,
        };
    }

    /// The largest datagram the path is known to carry.
    pub fn datagram(&self) -> usize {
        self.confirmed
    }

    /// Sets how long a probe may go unanswered from the path's round trip.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.probe_timeout = (rtt * PROBE_TIMEOUT_RTTS).max(PROBE_TIMEOUT_MIN);
    }

    /// The probe to send now, if one is due: a new size, or another
    /// attempt at the size under test.
    pub fn poll_probe(&mut self, now: Instant) -> Option<ProbeRequest> {
        self.handle_timeout(now);
        let State::Searching { probe } = &mut self.state else {
            return None;
        };
        match probe {
            Some(p) if now < p.sent_at + self.probe_timeout => None,
            Some(p) => {
                p.attempts += 1;
                p.sent_at = now;
                Some(ProbeRequest {
                    size: p.size,
                    token: p.token,
                })
            }
            None => {
                let size = if self.too_large > MAX_PATH_DATAGRAM {
                    MAX_PATH_DATAGRAM
                } else {
                    (self.confirmed + self.too_large) / 2
                };
                let token = self.rng.gen();
                *probe = Some(Probe {
                    size,
                    token,
                    sent_at: now,
                    attempts: 1,
                });
                Some(ProbeRequest { size, token })
            }
        }
    }

    /// A path response: true if it answers our probe, whose size then got
    /// through.
    pub fn on_response(&mut self, now: Instant, token: &[u8; 16]) -> bool {
        let State::Searching { probe: Some(probe) } = self.state else {
            return false;
        };
        if probe.token != *token {
            return false;
        }
        self.confirmed = self.confirmed.max(probe.size);
        self.next_step(now);
        true
    }

    /// Data stopped getting through at the found size: back to the base,
    /// and search again after [`BLACK_HOLE_RETRY`].
    pub fn black_hole(&mut self, now: Instant) {
        if matches!(self.state, State::Idle) {
            return;
        }
        self.confirmed = BASE_DATAGRAM;
        self.too_large = MAX_PATH_DATAGRAM + 1;
        self.state = State::Complete {
            next_search: now + BLACK_HOLE_RETRY,
        };
    }

    /// Gives up on a size whose probes all went unanswered, and starts the
    /// search again when it is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Searching { probe: Some(p) }
                if p.attempts >= MAX_PROBES && now >= p.sent_at + self.probe_timeout =>
            {
                self.too_large = p.size;
                self.next_step(now);
            }
            State::Complete { next_search } if now >= next_search => {
                self.too_large = MAX_PATH_DATAGRAM + 1;
                self.state = State::Searching { probe: None };
            }
            _ => {}
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Searching { probe: Some(p) } => Some(p.sent_at + self.probe_timeout),
            State::Searching { probe: None } | State::Idle => None,
            State::Complete { next_search } => Some(next_search),
        }
    }

    fn next_step(&mut self, now: Instant) {
        self.state = if self.too_large - self.confirmed <= SEARCH_GRANULARITY {
            State::Complete {
                next_search: now + RAISE_INTERVAL,
            }
        } else {
            State::Searching { probe: None }
        };
    }

    /// Whether a search is under way (a probe may be due at once).
    pub fn searching(&self) -> bool {
        matches!(self.state, State::Searching { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search over a path that carries datagrams up to `mtu`
    /// bytes; returns what it found and the probes it sent.
    fn search(mtu: usize) -> (usize, u32) {
        let mut pmtu = searching(1);
        let mut now = Instant::now();
        let mut probes = 0;
        for _ in 0..1000 {
            if let Some(probe) = pmtu.poll_probe(now) {
                probes += 1;
                if probe.size <= mtu {
                    assert!(pmtu.on_response(now, &probe.token));
                }
            }
            if !pmtu.searching() {
                break;
            }
            now += Duration::from_millis(50);
        }
        assert!(!pmtu.searching(), "the search ends");
        (pmtu.datagram(), probes)
    }

    #[test]
    fn a_full_ethernet_path_is_found_with_one_probe() {
        assert_eq!(search(1500), (MAX_PATH_DATAGRAM, 1));
    }

    #[test]
    fn a_smaller_path_is_found_within_the_granularity_from_below() {
        for mtu in [1200, 1280, 1400, 1420, 1451] {
            let (found, probes) = search(mtu);
            assert!(
                found <= mtu && mtu - found <= SEARCH_GRANULARITY,
                "{mtu}: {found}"
            );
            // Three attempts at each size that does not get through.
            assert!(probes <= 3 * 6 + 6, "{mtu}: {probes} probes");
        }
    }

    #[test]
    fn a_black_hole_goes_back_to_the_base_and_searches_again_later() {
        let mut pmtu = searching(2);
        let now = Instant::now();
        let probe = pmtu.poll_probe(now).unwrap();
        assert!(pmtu.on_response(now, &probe.token));
        assert_eq!(pmtu.datagram(), MAX_PATH_DATAGRAM);
        pmtu.black_hole(now);
        assert_eq!(pmtu.datagram(), BASE_DATAGRAM);
        assert!(pmtu.poll_probe(now + Duration::from_secs(1)).is_none());
        assert!(pmtu.poll_probe(now + BLACK_HOLE_RETRY).is_some());
    }

    #[test]
    fn a_response_to_anything_else_is_not_ours() {
        let mut pmtu = searching(3);
        let now = Instant::now();
        let probe = pmtu.poll_probe(now).unwrap();
        let mut other = probe.token;
        other[0] ^= 1;
        assert!(!pmtu.on_response(now, &other));
        assert_eq!(pmtu.datagram(), BASE_DATAGRAM);
    }

    #[test]
    fn a_new_path_starts_over_and_a_late_answer_from_the_old_one_confirms_nothing() {
        let mut pmtu = searching(4);
        let now = Instant::now();
        let old = pmtu.poll_probe(now).unwrap();
        pmtu.on_path_change(true);
        let new = pmtu.poll_probe(now).unwrap();
        assert_ne!(old.token, new.token);
        assert!(!pmtu.on_response(now, &old.token));
        assert_eq!(pmtu.datagram(), BASE_DATAGRAM);
        pmtu.on_path_change(false);
        assert!(
            pmtu.poll_probe(now + RAISE_INTERVAL).is_none(),
            "idle on the relay"
        );
        assert_eq!(pmtu.poll_timeout(), None);
    }

    fn searching(seed: u64) -> Pmtu {
        let mut pmtu = Pmtu::new(seed);
        pmtu.on_path_change(true);
        pmtu
    }
}
