//! Congestion control: NewReno as RFC 9002 §7 specifies it for QUIC (slow
//! start, congestion avoidance, one reduction per recovery period,
//! persistent congestion), with Westwood+'s response to loss (Mascolo et
//! al., 2004).
//!
//! NewReno halves its window on every loss, as if every loss were a full
//! queue. On Wi-Fi and mobile paths many are not, and halving then cuts
//! throughput to a few percent of the link at 1 % random loss. Westwood+
//! instead estimates the rate at which the path delivers (bytes acknowledged
//! per round trip) and after a loss sets the window to that rate times the
//! minimum round trip: the path's capacity without a queue. Here a loss
//! counts only when the round trips show a queue (every sample of the last
//! round trip or two above the minimum) or the window far overshoots what
//! the path delivers; a random loss on an empty queue changes nothing, in
//! slow start too. The estimate is the largest of the
//! last [`BANDWIDTH_SAMPLES`] per-round-trip samples, as BBR filters its
//! delivery rate, rather than Westwood+'s moving average: an average lags a
//! growing window, so each loss would trim the window to its own past.
//! Windows are in bytes of datagram payload.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Initial window, in full packets (RFC 9002 §7.2: ten, capped at 14 720
/// bytes or two packets, whichever is larger).
const INITIAL_WINDOW_PACKETS: u64 = 10;
const INITIAL_WINDOW_CAP: u64 = 14_720;

/// The window never shrinks below two packets (RFC 9002 kMinimumWindow).
const MINIMUM_WINDOW_PACKETS: u64 = 2;

/// Per-round-trip delivery rate samples the bandwidth estimate is the
/// maximum of (BBR's ten).
const BANDWIDTH_SAMPLES: usize = 10;

/// A loss comes with a queue when the smallest round trip of the last one
/// or two exceeds the minimum by more than 1/this of it. In steady state that is the test of
/// Westwood's window against the bandwidth-delay product (a window 8/7 of
/// the product or more keeps a queue of 1/7 RTT); unlike that test it holds
/// in slow start too, where the delivery rate lags the doubling window by
/// half and every random loss looked like a queue (1 % loss on a simulated
/// 100 Mbit/s, 20 ms path: slow start ended at a tenth of the product, 61 %
/// of the link).
const RANDOM_LOSS_MARGIN: u32 = 8;

/// A window more than this many times what the path delivers in a minimum
/// round trip overshoots without a queue to show for it (a policer, or a
/// queue shorter than 1/8 RTT): cut it. Slow start's own lag is a factor of
/// two.
const OVERSHOOT: u64 = 4;

/// The shortest interval a bandwidth sample covers.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);

/// The shortest round trip the window is sized for. On a LAN the minimum
/// RTT sample (40 µs in the NAT lab) is far below what the sender's loop
/// can act on: timers tick in milliseconds and ACKs come in bursts, so a
/// window of the bandwidth times that minimum starves the path (the NAT lab
/// at 5 % loss: windows of ten packets, a tail loss every few hundred
/// packets, 307 probe timeouts in a 64 MiB transfer).
const MIN_WINDOW_RTT: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub(crate) struct Westwood {
    max_datagram: u64,
    window: u64,
    slow_start_threshold: u64,
    /// Packets sent before this time belong to the current recovery period:
    /// their losses do not shrink the window again, their ACKs do not grow it.
    recovery_start: Option<Instant>,
    /// Bytes acked in congestion avoidance since the window last grew.
    acked_in_avoidance: u64,
    /// The latest delivery rate samples, bytes per second, oldest first.
    bandwidth_samples: VecDeque<f64>,
    /// The current bandwidth sample: since when, and bytes acked since.
    sample_start: Option<Instant>,
    sample_bytes: u64,
}

/// Whether the round trips show a queue; both below [`MIN_WINDOW_RTT`]
/// count as that (a LAN's sub-millisecond jitter is the host, not a queue).
fn queue_building(min_rtt: Duration, recent_min_rtt: Duration) -> bool {
    let min_rtt = min_rtt.max(MIN_WINDOW_RTT);
    recent_min_rtt.max(MIN_WINDOW_RTT) > min_rtt + min_rtt / RANDOM_LOSS_MARGIN
}

impl Westwood {
    pub fn new(max_datagram: usize) -> Self {
        let max_datagram = max_datagram as u64;
        let window = (INITIAL_WINDOW_PACKETS * max_datagram)
            .min(INITIAL_WINDOW_CAP.max(MINIMUM_WINDOW_PACKETS * max_datagram));
        Self {
            max_datagram,
            window,
            slow_start_threshold: u64::MAX,
            recovery_start: None,
            acked_in_avoidance: 0,
            bandwidth_samples: VecDeque::with_capacity(BANDWIDTH_SAMPLES),
            sample_start: None,
            sample_bytes: 0,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    fn minimum_window(&self) -> u64 {
        MINIMUM_WINDOW_PACKETS * self.max_datagram
    }

    fn in_recovery(&self, time_sent: Instant) -> bool {
        self.recovery_start.is_some_and(|start| time_sent <= start)
    }

    /// An ACK arrived at `now`: closes a bandwidth sample once it spans a
    /// round trip (`min_rtt`), as Westwood+ samples once per RTT so that
    /// bunched ACKs do not inflate the estimate. Call after the packets it
    /// acknowledged were reported.
    pub fn on_ack(&mut self, now: Instant, min_rtt: Duration) {
        let Some(start) = self.sample_start else {
            self.sample_start = Some(now);
            self.sample_bytes = 0;
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < min_rtt.max(MIN_SAMPLE_INTERVAL) {
            return;
        }
        if self.bandwidth_samples.len() == BANDWIDTH_SAMPLES {
            self.bandwidth_samples.pop_front();
        }
        self.bandwidth_samples
            .push_back(self.sample_bytes as f64 / elapsed.as_secs_f64());
        self.sample_start = Some(now);
        self.sample_bytes = 0;
    }

    /// A packet of `size` bytes sent at `time_sent` was acknowledged.
    /// `window_limited` says whether the sender was using the window; an
    /// application-limited sender must not grow it (RFC 9002 §7.8).
    pub fn on_packet_acked(&mut self, time_sent: Instant, size: u64, window_limited: bool) {
        self.sample_bytes += size;
        if self.in_recovery(time_sent) || !window_limited {
            return;
        }
        if self.window < self.slow_start_threshold {
            self.window += size;
            return;
        }
        self.acked_in_avoidance += size;
        if self.acked_in_avoidance >= self.window {
            self.acked_in_avoidance -= self.window;
            self.window += self.max_datagram;
        }
    }

    /// Packets were lost, the latest of them sent at `latest_lost_sent`.
    /// Once per recovery period, if the loss came with a queue (the round
    /// trips of the last one or two all above the minimum) or with a window far beyond
    /// what the path delivers, the window becomes the estimated
    /// bandwidth-delay product (half the window before the first estimate)
    /// and slow start ends there. Any other loss is random: nothing changes,
    /// slow start included, so a random loss early in a transfer does not
    /// leave it to grow one packet per round trip. True when the window was
    /// cut.
    pub fn on_congestion_event(
        &mut self,
        now: Instant,
        latest_lost_sent: Instant,
        min_rtt: Duration,
        recent_min_rtt: Duration,
    ) -> bool {
        if self.in_recovery(latest_lost_sent) {
            return false;
        }
        let bandwidth = self.bandwidth_samples.iter().copied().reduce(f64::max);
        let target = match bandwidth {
            Some(bandwidth) => (bandwidth * min_rtt.max(MIN_WINDOW_RTT).as_secs_f64()) as u64,
            None => self.window / 2,
        }
        .max(self.minimum_window());
        let overshoot = target < self.window / OVERSHOOT;
        if !queue_building(min_rtt, recent_min_rtt) && !overshoot {
            return false;
        }
        // Behind a queue, never below half, as Reno: against a flow that
        // keeps the queue full, the product without a queue is a sliver of
        // the window (20 Mbit/s behind a 200 ms queue in the NAT lab: natter
        // 0.34 of the link against TCP Reno, 0.68 with this floor). An
        // overshoot without a queue goes to the product.
        let target = if overshoot {
            target
        } else {
            target.max(self.window / 2)
        };
        self.slow_start_threshold = self.window.min(target);
        if target >= self.window {
            return false;
        }
        self.recovery_start = Some(now);
        self.window = target;
        self.acked_in_avoidance = 0;
        true
    }

    /// Everything sent over several PTOs was lost: the path may have changed
    /// entirely, so start over from the minimum window.
    pub fn on_persistent_congestion(&mut self) {
        self.window = self.minimum_window();
        self.recovery_start = None;
        self.acked_in_avoidance = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MTU: usize = 1000;
    const RTT: Duration = Duration::from_millis(10);

    /// Acknowledges a steady 100 packets of 1000 bytes per 10 ms round
    /// trip (10 MB/s, a bandwidth-delay product of 100 000 bytes) for
    /// `round_trips`, starting at `start`; returns the time after.
    fn deliver_steadily(cc: &mut Westwood, start: Instant, round_trips: u32) -> Instant {
        let mut now = start;
        for _ in 0..round_trips * 100 {
            now += RTT / 100;
            cc.on_packet_acked(start, 1000, false);
            cc.on_ack(now, RTT);
        }
        now
    }

    #[test]
    fn a_random_loss_keeps_the_window_at_the_bandwidth_delay_product() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU);
        cc.window = 100_000;
        let now = deliver_steadily(&mut cc, start, 40);
        assert!(!cc.on_congestion_event(now, now, RTT, RTT));
        assert_eq!(cc.window(), 100_000);
    }

    #[test]
    fn a_loss_from_a_queue_shrinks_the_window_to_the_path_without_it() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU);
        // Twice the bandwidth-delay product in flight: half of it queued,
        // so the round trip is twice the minimum.
        cc.window = 200_000;
        let now = deliver_steadily(&mut cc, start, 40);
        assert!(cc.on_congestion_event(now, now, RTT, 2 * RTT));
        let window = cc.window();
        assert!((95_000..=100_000).contains(&window), "{window}");
        assert_eq!(cc.slow_start_threshold, window);
    }

    #[test]
    fn slow_start_doubles_per_round_trip() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU);
        assert_eq!(cc.window(), 10_000);
        for _ in 0..10 {
            cc.on_packet_acked(start, 1000, true);
        }
        assert_eq!(cc.window(), 20_000);
        cc.on_packet_acked(start, 1000, false);
        assert_eq!(cc.window(), 20_000, "application-limited: no growth");
    }

    #[test]
    fn loss_halves_once_per_recovery_period() {
        let start = Instant::now();
        let later = start + Duration::from_millis(100);
        let mut cc = Westwood::new(MTU);
        let queued = 2 * RTT;
        cc.on_congestion_event(later, start, RTT, queued);
        assert_eq!(cc.window(), 5_000);
        // A second loss of a packet sent before recovery began: no change.
        cc.on_congestion_event(later + Duration::from_millis(1), start, RTT, queued);
        assert_eq!(cc.window(), 5_000);
        // ACKs of packets from before recovery do not grow the window.
        cc.on_packet_acked(start, 1000, true);
        assert_eq!(cc.window(), 5_000);
        // Congestion avoidance: one packet per window's worth of ACKs.
        let after = later + Duration::from_millis(1);
        for _ in 0..5 {
            cc.on_packet_acked(after, 1000, true);
        }
        assert_eq!(cc.window(), 6_000);
        // A loss of a packet sent after recovery began halves again.
        cc.on_congestion_event(after + Duration::from_millis(5), after, RTT, queued);
        assert_eq!(cc.window(), 3_000);
    }

    #[test]
    fn a_random_loss_in_slow_start_leaves_slow_start_going() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU);
        // Slow start: the delivery rate is half the doubling window's.
        cc.window = 200_000;
        let now = deliver_steadily(&mut cc, start, 40);
        assert!(!cc.on_congestion_event(now, now, RTT, RTT));
        for _ in 0..10 {
            cc.on_packet_acked(now, 1000, true);
        }
        assert_eq!(cc.window(), 210_000, "still adding every acknowledged byte");
    }

    #[test]
    fn a_window_far_beyond_what_the_path_delivers_is_cut_without_a_queue() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU);
        // A policer: five times the product in flight, no queue to see.
        cc.window = 500_000;
        let now = deliver_steadily(&mut cc, start, 40);
        assert!(cc.on_congestion_event(now, now, RTT, RTT));
        assert!((95_000..=100_000).contains(&cc.window()), "{}", cc.window());
    }

    #[test]
    fn sub_millisecond_round_trips_do_not_read_as_a_queue() {
        let us = Duration::from_micros(1);
        assert!(!queue_building(40 * us, 800 * us));
        assert!(queue_building(40 * us, 1_200 * us));
        assert!(queue_building(RTT, 2 * RTT));
        assert!(!queue_building(RTT, RTT + RTT / 10));
    }

    #[test]
    fn persistent_congestion_collapses_to_the_minimum() {
        let mut cc = Westwood::new(MTU);
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), 2_000);
        cc.on_congestion_event(Instant::now(), Instant::now(), RTT, 2 * RTT);
        assert_eq!(cc.window(), 2_000, "never below the minimum");
    }

    #[test]
    fn initial_window_is_capped_for_large_datagrams() {
        assert_eq!(Westwood::new(1200).window(), 12_000);
        assert_eq!(Westwood::new(1500).window(), 14_720);
        assert_eq!(Westwood::new(9000).window(), 18_000);
    }
}
