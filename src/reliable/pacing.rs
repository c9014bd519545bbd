//! Pacing: spreads a window's packets over the round trip instead of
//! sending them back to back, so that a window opening at once does not
//! arrive at the bottleneck as one burst and overflow its queue (RFC 9002
//! §7.7).
//!
//! A token bucket. Tokens accrue at 5/4 of the window per smoothed round
//! trip, or of the path's measured bandwidth if that is more, and a packet
//! goes when the bucket holds its size. The margin lets a window that grows
//! during the round trip be sent within it. The bandwidth floor is for the
//! round trips after a cut: the smoothed round trip still holds the queue
//! the cut is draining, and the window over it paced the sender below the
//! link (simulated 10 Mbit/s, 20 ms, one-product queue: the link idled
//! while the queue was gone). (Linux's
//! TCP paces slow start at twice the window per round trip; in the
//! simulator that made no difference to goodput beyond the spread across
//! seeds, and two flows sharing a queue split it less evenly: Jain index
//! 0.958-0.973 against 0.997-1.000.) The bucket holds what accrues in
//! [`BURST_INTERVAL`]: a sender woken late by a millisecond timer then
//! sends what accrued while it slept.
//!
//! A path whose minimum round trip is under [`UNPACED_RTT`] is not paced.
//! The drivers' timers tick in milliseconds, so gaps between packets there
//! are timer ticks, not the path's pace; and a smoothed round trip raised
//! by the host's own delays then held the window back: a 64 MiB transfer
//! through the NAT lab at 5 % loss ran at 17.7 MiB/s in one paced run,
//! against 98.6 MiB/s (the median of three) before pacing.
//!
//! A route with a rate limit (the rendezvous's relay, which drops what
//! goes over its rate) is paced under it on any round trip.

use std::time::{Duration, Instant};

/// How much sending time the bucket holds. Twice the millisecond of timer
/// granularity the drivers work with.
const BURST_INTERVAL: Duration = Duration::from_millis(2);

/// The bucket never holds fewer packets than this, nor, once the path's
/// rate is measured, than a quarter of the window if that is fewer.
/// Without the quarter, a slow path's whole
/// window left in one burst: at 1 Mbit/s, 100 ms behind a one-packet
/// queue, ten packets are 116 ms of the link, and 2 MiB took 3 948 losses
/// and 42 probe timeouts at 0.01 MB/s (0.05 MB/s and 2 176 losses with
/// it). A minimum of two packets whatever the window did as well there,
/// but cost the simulated 10 Mbit/s, 100 ms, 1 % path 3 %.
const MIN_BURST_PACKETS: u64 = 10;

/// The pacing rate is the window per round trip times this fraction.
const GAIN_NUMERATOR: f64 = 5.0;
const GAIN_DENOMINATOR: f64 = 4.0;

/// Paths whose minimum round trip is shorter are not paced.
const UNPACED_RTT: Duration = Duration::from_millis(1);

/// What the pacer needs of the path, at the moment of a send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PacingInput {
    pub window: u64,
    pub smoothed_rtt: Duration,
    pub min_rtt: Duration,
    pub max_datagram: u64,
    /// What the path was measured to deliver, bytes per second.
    pub bandwidth: Option<f64>,
    /// What the route carries at most, bytes per second.
    pub route_rate: Option<f64>,
}

impl PacingInput {
    /// Bytes per second the pacer lets out.
    fn rate(&self) -> f64 {
        let rtt = self.smoothed_rtt.as_secs_f64().max(f64::MIN_POSITIVE);
        let per_round_trip = self.window as f64 / rtt;
        let rate =
            per_round_trip.max(self.bandwidth.unwrap_or(0.0)) * GAIN_NUMERATOR / GAIN_DENOMINATOR;
        self.route_rate.map_or(rate, |limit| rate.min(limit))
    }

    /// The bucket's size: a burst interval's worth at the pacing rate, at
    /// least [`MIN_BURST_PACKETS`] (or a quarter of the window if that is
    /// less and the path's rate is known) and a packet; never more than
    /// the window.
    fn capacity(&self) -> u64 {
        let interval = (self.rate() * BURST_INTERVAL.as_secs_f64()) as u64;
        let floor = MIN_BURST_PACKETS * self.max_datagram;
        // Before the path's rate is measured the first window goes as it
        // always did.
        let floor = match self.bandwidth {
            Some(_) => floor.min(self.window / 4),
            None => floor,
        };
        interval
            .max(floor)
            .max(self.max_datagram)
            .min(self.window.max(self.max_datagram))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    /// Bytes that may go now, as of `updated` (fractional: a bucket that
    /// dropped what accrued under a byte between two looks would wait in
    /// nanosecond steps forever).
    tokens: f64,
    updated: Option<Instant>,
}

impl Pacer {
    pub fn new() -> Self {
        Self {
            tokens: f64::INFINITY,
            updated: None,
        }
    }

    /// When a packet of `size` bytes may go: `None` for now, else the
    /// instant enough tokens will have accrued.
    pub fn release_time(&mut self, now: Instant, size: u64, path: PacingInput) -> Option<Instant> {
        if path.min_rtt < UNPACED_RTT && path.route_rate.is_none() {
            return None;
        }
        let capacity = path.capacity() as f64;
        let rate = path.rate();
        if let Some(updated) = self.updated {
            self.tokens += now.saturating_duration_since(updated).as_secs_f64() * rate;
        }
        self.tokens = self.tokens.min(capacity);
        self.updated = Some(now);
        let size = (size as f64).min(capacity);
        if self.tokens >= size {
            return None;
        }
        // Rounded up to whole microseconds, so that the tokens are there
        // when the time comes.
        let wait_us = ((size - self.tokens) / rate * 1e6).ceil();
        Some(now + Duration::from_micros(wait_us as u64))
    }

    /// A packet of `size` bytes went.
    pub fn on_sent(&mut self, size: u64) {
        self.tokens = (self.tokens - size as f64).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u64 = 1000;

    fn path(window: u64, rtt: Duration) -> PacingInput {
        PacingInput {
            window,
            smoothed_rtt: rtt,
            min_rtt: rtt,
            max_datagram: MTU,
            bandwidth: None,
            route_rate: None,
        }
    }

    /// `took` lies within `ms` milliseconds.
    fn assert_took(took: Duration, ms: std::ops::RangeInclusive<u64>) {
        let within = Duration::from_millis(*ms.start())..=Duration::from_millis(*ms.end());
        assert!(within.contains(&took), "{took:?}");
    }

    /// How long a fresh pacer takes to let `packets` full packets go.
    fn time_to_send(packets: u64, path: PacingInput) -> Duration {
        let start = Instant::now();
        let mut pacer = Pacer::new();
        let mut now = start;
        let mut sent = 0;
        while sent < packets {
            match pacer.release_time(now, MTU, path) {
                None => {
                    pacer.on_sent(MTU);
                    sent += 1;
                }
                Some(at) => {
                    assert!(at > now);
                    now = at;
                }
            }
        }
        now - start
    }

    #[test]
    fn a_window_goes_out_over_the_round_trip_not_at_once() {
        // 100 packets per 20 ms round trip: 6.25 MB/s paced, a bucket of
        // 12.5 packets.
        let took = time_to_send(100, path(100 * MTU, Duration::from_millis(20)));
        // The first 12 go at once, the other 88 at 5/4 of 100 per 20 ms.
        assert_took(took, 13..=15);
    }

    #[test]
    fn the_pace_never_falls_below_what_the_path_delivers() {
        // Just after a cut: a window of 20 packets over a round trip still
        // swollen by the queue (40 ms), on a path measured to deliver a
        // packet a millisecond. The window alone would pace 0.625 packets
        // a millisecond, leaving the link idle over a third of the time.
        let took = time_to_send(
            100,
            PacingInput {
                bandwidth: Some(MTU as f64 * 1000.0),
                ..path(20 * MTU, Duration::from_millis(40))
            },
        );
        // The first 5 (a quarter of the window) at once, the other 95 at
        // 5/4 of a packet per ms.
        assert_took(took, 75..=77);
    }

    #[test]
    fn a_small_window_on_a_slow_path_is_not_one_burst() {
        // Eight packets per 100 ms: two go at once, the other six at 5/4
        // of eight per 100 ms (one per 10 ms).
        let slow = PacingInput {
            bandwidth: Some(MTU as f64 * 80.0),
            ..path(8 * MTU, Duration::from_millis(100))
        };
        let took = time_to_send(8, slow);
        assert_took(took, 59..=61);
    }

    #[test]
    fn a_route_rate_caps_the_pace_even_on_a_lan() {
        // A relay passing a packet a millisecond, 100 µs away: unpaced, the
        // window would go at once.
        let relay = PacingInput {
            route_rate: Some(MTU as f64 * 1000.0),
            ..path(200 * MTU, Duration::from_micros(100))
        };
        // The first 10 at once, the other 90 at a packet a millisecond.
        let took = time_to_send(100, relay);
        assert_took(took, 89..=91);
        assert_eq!(
            time_to_send(100, path(200 * MTU, Duration::from_micros(100))),
            Duration::ZERO
        );
    }

    #[test]
    fn an_idle_bucket_fills_to_a_burst_interval_and_no_more() {
        let start = Instant::now();
        let mut pacer = Pacer::new();
        let path = path(1_000 * MTU, Duration::from_millis(20));
        assert_eq!(pacer.release_time(start, MTU, path), None);
        pacer.on_sent(MTU);
        let later = start + Duration::from_secs(1);
        let mut burst = 0;
        while pacer.release_time(later, MTU, path).is_none() {
            pacer.on_sent(MTU);
            burst += 1;
        }
        // 2 ms at 5/4 of 1000 packets per 20 ms.
        assert_eq!(burst, 125);
    }

    #[test]
    fn a_path_under_a_millisecond_is_not_paced() {
        let start = Instant::now();
        let mut pacer = Pacer::new();
        // The window is sized for a millisecond; the host's delays put the
        // smoothed round trip at 30 ms.
        let path = PacingInput {
            min_rtt: Duration::from_micros(100),
            ..path(300 * MTU, Duration::from_millis(30))
        };
        for _ in 0..1_000 {
            assert_eq!(pacer.release_time(start, MTU, path), None);
            pacer.on_sent(MTU);
        }
    }
}
