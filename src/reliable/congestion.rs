//! Congestion control: NewReno as RFC 9002 §7 specifies it for QUIC.
//!
//! Chosen over CUBIC for its simplicity and because natter's paths are mostly
//! consumer links where NewReno and CUBIC behave alike; the controller sees
//! only "acked", "lost" and "persistent congestion", so swapping it is local.
//! Windows are in bytes of datagram payload.

use std::time::Instant;

/// Initial window, in full packets (RFC 9002 §7.2: ten, capped at 14 720
/// bytes or two packets, whichever is larger).
const INITIAL_WINDOW_PACKETS: u64 = 10;
const INITIAL_WINDOW_CAP: u64 = 14_720;

/// The window never shrinks below two packets (RFC 9002 kMinimumWindow).
const MINIMUM_WINDOW_PACKETS: u64 = 2;

#[derive(Debug, Clone)]
pub(crate) struct NewReno {
    max_datagram: u64,
    window: u64,
    slow_start_threshold: u64,
    /// Packets sent before this time belong to the current recovery period:
    /// their losses do not shrink the window again, their ACKs do not grow it.
    recovery_start: Option<Instant>,
    /// Bytes acked in congestion avoidance since the window last grew.
    acked_in_avoidance: u64,
}

impl NewReno {
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

    /// A packet of `size` bytes sent at `time_sent` was acknowledged.
    /// `window_limited` says whether the sender was using the window; an
    /// application-limited sender must not grow it (RFC 9002 §7.8).
    pub fn on_packet_acked(&mut self, time_sent: Instant, size: u64, window_limited: bool) {
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
    /// Halves the window once per round trip.
    pub fn on_congestion_event(&mut self, now: Instant, latest_lost_sent: Instant) {
        if self.in_recovery(latest_lost_sent) {
            return;
        }
        self.recovery_start = Some(now);
        self.window = (self.window / 2).max(self.minimum_window());
        self.slow_start_threshold = self.window;
        self.acked_in_avoidance = 0;
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

    #[test]
    fn slow_start_doubles_per_round_trip() {
        let start = Instant::now();
        let mut cc = NewReno::new(MTU);
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
        let mut cc = NewReno::new(MTU);
        cc.on_congestion_event(later, start);
        assert_eq!(cc.window(), 5_000);
        // A second loss of a packet sent before recovery began: no change.
        cc.on_congestion_event(later + Duration::from_millis(1), start);
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
        cc.on_congestion_event(after + Duration::from_millis(5), after);
        assert_eq!(cc.window(), 3_000);
    }

    #[test]
    fn persistent_congestion_collapses_to_the_minimum() {
        let mut cc = NewReno::new(MTU);
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), 2_000);
        cc.on_congestion_event(Instant::now(), Instant::now());
        assert_eq!(cc.window(), 2_000, "never below the minimum");
    }

    #[test]
    fn initial_window_is_capped_for_large_datagrams() {
        assert_eq!(NewReno::new(1200).window(), 12_000);
        assert_eq!(NewReno::new(1500).window(), 14_720);
        assert_eq!(NewReno::new(9000).window(), 18_000);
    }
}
