//! Loss recovery: RTT estimation, loss detection and the probe timeout.
//!
//! Follows RFC 9002 (QUIC loss detection), whose RTT estimator and timer are
//! RFC 6298's with two refinements: the peer's reported ACK delay is taken
//! out of RTT samples, and the timeout is a *probe* (PTO) that sends one or
//! two packets rather than collapsing the window. A packet is lost once a
//! packet sent [`PACKET_THRESHOLD`] later is acknowledged (fast retransmit on
//! reordering), or once it is older than 9/8 of an RTT and something sent
//! after it was acknowledged (time threshold). Packet numbers are never
//! reused, so every acknowledgement is unambiguous and every ack-eliciting
//! packet yields a clean RTT sample (no Karn's algorithm needed).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::packet::AckFrame;

/// Reordering tolerated, in packets, before a packet is declared lost (RFC
/// 9002 kPacketThreshold).
pub(crate) const PACKET_THRESHOLD: u64 = 3;

/// Timer granularity assumed of the host (RFC 9002 kGranularity).
pub(crate) const GRANULARITY: Duration = Duration::from_millis(1);

/// Lost packets spanning this many PTO periods mean persistent congestion
/// (RFC 9002 kPersistentCongestionThreshold).
const PERSISTENT_CONGESTION_THRESHOLD: u32 = 3;

/// The PTO backoff stops doubling here (unless one un-backed-off period is
/// already longer), so a path that comes back after an outage is noticed
/// within a couple of seconds rather than minutes.
const MAX_PTO_BACKOFF: Duration = Duration::from_secs(2);

/// ACK-only packets remembered for their ACK-of-ACK information.
const MAX_ACK_ONLY_TRACKED: usize = 64;

/// Packets declared lost remembered, to count the ones acknowledged later
/// (declared lost too early: spurious).
const MAX_LOST_TRACKED: usize = 4096;

/// How the losses declared so far were found, and how many were not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossCounts {
    /// A packet sent three or more later was acknowledged first.
    pub by_reordering: u64,
    /// Older than the loss delay when something later was acknowledged.
    pub by_time: u64,
    /// Declared lost, then acknowledged after all.
    pub spurious: u64,
}

/// RFC 6298 / RFC 9002 §5 round-trip estimator.
#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    latest: Duration,
    smoothed: Duration,
    variance: Duration,
    min: Duration,
    /// Samples the channel took; a round trip measured outside it is not one.
    samples: u64,
    /// Whether the estimate started from a round trip measured outside the
    /// channel, which the first sample then refines instead of replacing.
    seeded: bool,
    /// The smallest sample of the round trip under way (since `round_start`)
    /// and of the one before.
    round_min: Duration,
    previous_round_min: Duration,
    round_start: Option<Instant>,
}

impl RttEstimator {
    pub fn new(initial: Duration) -> Self {
        Self {
            latest: initial,
            smoothed: initial,
            variance: initial / 2,
            min: initial,
            samples: 0,
            seeded: false,
            round_min: initial,
            previous_round_min: initial,
            round_start: None,
        }
    }

    /// An estimator that starts from a round trip measured outside the
    /// channel, taken as its first sample.
    pub fn measured(sample: Duration) -> Self {
        Self {
            seeded: true,
            ..Self::new(sample)
        }
    }

    /// An estimator whose path has `min` as its minimum and `recent` as
    /// every other figure, as if a queue of `recent - min` had stood for
    /// the last round trips.
    #[cfg(test)]
    pub fn queued(min: Duration, recent: Duration) -> Self {
        Self {
            latest: recent,
            smoothed: recent,
            variance: recent / 2,
            min,
            samples: 1,
            seeded: false,
            round_min: recent,
            previous_round_min: recent,
            round_start: None,
        }
    }

    /// Folds in one sample taken at `now`; `ack_delay` is the peer's
    /// reported hold time, already capped at its max_ack_delay.
    pub fn update(&mut self, now: Instant, sample: Duration, ack_delay: Duration) {
        self.latest = sample;
        match self.round_start {
            Some(start) if now.saturating_duration_since(start) < self.smoothed => {
                self.round_min = self.round_min.min(sample);
            }
            _ => {
                self.previous_round_min = if self.round_start.is_some() {
                    self.round_min
                } else {
                    sample
                };
                self.round_min = sample;
                self.round_start = Some(now);
            }
        }
        self.samples += 1;
        if self.samples == 1 {
            // The minimum is the channel's own: a handshake's small packets
            // cross a slow link faster than full ones, and a minimum under
            // every later sample kept the window short of the path and
            // never confirmed, so it drained every ten seconds.
            self.min = sample;
            if !self.seeded {
                self.smoothed = sample;
                self.variance = sample / 2;
                return;
            }
        } else {
            self.min = self.min.min(sample);
        }
        // Subtract the ACK delay only if that leaves at least min_rtt, so a
        // lying or confused peer cannot drive the estimate below the floor.
        let adjusted = if sample >= self.min + ack_delay {
            sample - ack_delay
        } else {
            sample
        };
        let deviation = self.smoothed.abs_diff(adjusted);
        self.variance = (self.variance * 3 + deviation) / 4;
        self.smoothed = (self.smoothed * 7 + adjusted) / 8;
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The latest sample.
    pub fn latest(&self) -> Duration {
        self.latest
    }

    pub fn smoothed(&self) -> Duration {
        self.smoothed
    }

    /// The smallest round trip seen: the path without queueing.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The smallest round trip of the last one or two: above [`min`](Self::min)
    /// only while a queue stands the whole time. A burst that queues and
    /// drains within a round trip does not raise it, as it raises the
    /// smoothed RTT.
    pub fn recent_min(&self) -> Duration {
        self.round_min.min(self.previous_round_min)
    }

    /// RFC 6298's RTO without its floor: SRTT + max(G, 4 RTTVAR).
    fn rto(&self) -> Duration {
        self.smoothed + (self.variance * 4).max(GRANULARITY)
    }

    /// How long after sending a packet it may be declared lost by time.
    fn loss_delay(&self) -> Duration {
        (self.latest.max(self.smoothed) * 9 / 8).max(GRANULARITY)
    }
}

/// What a sent packet carried that matters once its fate is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PacketContent {
    /// Stream bytes it carried (more than one range when retransmitted
    /// pieces and new data share the packet).
    pub stream: Vec<Range<u64>>,
    /// It carried a MAX_DATA frame.
    pub max_data: bool,
    /// It carried the CLOSE frame.
    pub close: bool,
    /// Largest packet number of the ACK frame it carried.
    pub ack_largest: Option<u64>,
}

/// An ack-eliciting packet in flight.
#[derive(Debug, Clone)]
pub(crate) struct SentPacket {
    pub number: u64,
    pub time_sent: Instant,
    pub size: u64,
    pub content: PacketContent,
}

/// The outcome of an ACK frame or a loss timer.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub acked: Vec<SentPacket>,
    pub lost: Vec<SentPacket>,
    /// Largest ACK-frame largest among newly acked ACK-only packets.
    pub ack_only_largest: Option<u64>,
    pub persistent_congestion: bool,
}

/// What a fired timer asks of the connection.
#[derive(Debug)]
pub(crate) enum Timeout {
    Lost(Verdict),
    Probe,
}

#[derive(Debug)]
pub(crate) struct Recovery {
    /// Ack-eliciting packets neither acked nor declared lost, by number.
    in_flight: BTreeMap<u64, SentPacket>,
    /// Recent ACK-only packets: number, send time, largest it acknowledged.
    ack_only: VecDeque<(u64, Instant, u64)>,
    bytes_in_flight: u64,
    largest_acked: Option<u64>,
    loss_time: Option<Instant>,
    pto_count: u32,
    last_ack_eliciting_sent: Option<Instant>,
    rtt: RttEstimator,
    first_rtt_sample: Option<Instant>,
    initial_rtt: Duration,
    max_ack_delay: Duration,
    min_pto: Duration,
    /// Numbers of the latest packets declared lost.
    recently_lost: BTreeSet<u64>,
    losses: LossCounts,
}

impl Recovery {
    pub fn new(initial_rtt: Duration, max_ack_delay: Duration, min_pto: Duration) -> Self {
        Self {
            in_flight: BTreeMap::new(),
            ack_only: VecDeque::new(),
            bytes_in_flight: 0,
            largest_acked: None,
            loss_time: None,
            pto_count: 0,
            last_ack_eliciting_sent: None,
            rtt: RttEstimator::new(initial_rtt),
            first_rtt_sample: None,
            initial_rtt,
            max_ack_delay,
            min_pto,
            recently_lost: BTreeSet::new(),
            losses: LossCounts::default(),
        }
    }

    /// Probe timeouts since the last acknowledgement.
    pub fn pto_count(&self) -> u32 {
        self.pto_count
    }

    pub fn losses(&self) -> LossCounts {
        self.losses
    }

    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }

    pub fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Packets in flight, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &SentPacket> {
        self.in_flight.values()
    }

    pub fn on_ack_eliciting_sent(&mut self, packet: SentPacket) {
        self.bytes_in_flight += packet.size;
        self.last_ack_eliciting_sent = Some(packet.time_sent);
        self.in_flight.insert(packet.number, packet);
    }

    pub fn on_ack_only_sent(&mut self, number: u64, time_sent: Instant, ack_largest: u64) {
        if self.ack_only.len() == MAX_ACK_ONLY_TRACKED {
            self.ack_only.pop_front();
        }
        self.ack_only.push_back((number, time_sent, ack_largest));
    }

    /// One PTO period, before backoff: RFC 6298's RTO plus the peer's
    /// permitted ACK delay, never below the configured floor.
    pub fn pto_period(&self) -> Duration {
        (self.rtt.rto() + self.max_ack_delay).max(self.min_pto)
    }

    fn backed_off_pto(&self) -> Duration {
        let base = self.pto_period();
        let backed_off = base.saturating_mul(1 << self.pto_count.min(16));
        backed_off.min(MAX_PTO_BACKOFF.max(base))
    }

    /// When the loss or probe timer fires.
    pub fn timer(&self) -> Option<Instant> {
        if self.loss_time.is_some() {
            return self.loss_time;
        }
        if self.in_flight.is_empty() {
            return None;
        }
        Some(self.last_ack_eliciting_sent? + self.backed_off_pto())
    }

    /// A round trip of the path measured outside the channel, taken as the
    /// first sample if there is none yet.
    pub fn seed_rtt(&mut self, sample: Duration) {
        if self.rtt.samples == 0 {
            self.rtt = RttEstimator::measured(sample);
        }
    }

    /// The connection's datagrams take another route: every packet in flight
    /// is handed back to be sent again there, neither acknowledged nor
    /// counted as lost (the old route's fate says nothing about congestion
    /// on the new one), and the probe backoff starts over. On a new path the
    /// round-trip estimate starts over too (RFC 9000 §9.4).
    pub fn abandon_in_flight(&mut self, new_path: bool) -> Vec<SentPacket> {
        let abandoned = std::mem::take(&mut self.in_flight).into_values().collect();
        self.bytes_in_flight = 0;
        self.loss_time = None;
        self.pto_count = 0;
        if new_path {
            self.rtt = RttEstimator::new(self.initial_rtt);
            self.first_rtt_sample = None;
        }
        abandoned
    }

    /// Processes an ACK frame already checked to acknowledge only packet
    /// numbers that were sent.
    pub fn on_ack(&mut self, now: Instant, ack: &AckFrame) -> Verdict {
        let mut verdict = Verdict::default();
        let largest = ack.largest();
        self.largest_acked = Some(self.largest_acked.map_or(largest, |l| l.max(largest)));
        for range in &ack.ranges {
            let numbers: Vec<u64> = self
                .in_flight
                .range(range.clone())
                .map(|(n, _)| *n)
                .collect();
            for number in numbers {
                if let Some(packet) = self.in_flight.remove(&number) {
                    self.bytes_in_flight -= packet.size;
                    verdict.acked.push(packet);
                }
            }
        }
        self.count_spurious(ack);
        let mut largest_sent_at = None;
        self.ack_only.retain(|&(number, time_sent, ack_largest)| {
            let acked = ack.ranges.iter().any(|r| r.contains(&number));
            if acked {
                verdict.ack_only_largest = verdict.ack_only_largest.max(Some(ack_largest));
                if number == largest {
                    largest_sent_at = Some(time_sent);
                }
            }
            !acked
        });
        if verdict.acked.is_empty() {
            return verdict;
        }
        // Only the largest acknowledged packet gives a sample (its ACK was
        // sent right after, or max_ack_delay after, it arrived), and only
        // when the ACK also covers an ack-eliciting packet, which bounds the
        // delay (RFC 9002 §5.1).
        if let Some(packet) = verdict.acked.iter().find(|p| p.number == largest) {
            largest_sent_at = Some(packet.time_sent);
        }
        if let Some(time_sent) = largest_sent_at {
            let sample = now.saturating_duration_since(time_sent);
            let ack_delay = Duration::from_micros(ack.delay_micros).min(self.max_ack_delay);
            self.rtt.update(now, sample, ack_delay);
            self.first_rtt_sample.get_or_insert(now);
        }
        let (lost, persistent_congestion) = self.detect_lost(now);
        verdict.lost = lost;
        verdict.persistent_congestion = persistent_congestion;
        self.pto_count = 0;
        verdict
    }

    /// Runs the loss or probe timer; call when [`timer`](Self::timer) passed.
    pub fn on_timeout(&mut self, now: Instant) -> Option<Timeout> {
        if self.loss_time.is_some_and(|t| t <= now) {
            let (lost, persistent_congestion) = self.detect_lost(now);
            return Some(Timeout::Lost(Verdict {
                lost,
                persistent_congestion,
                ..Verdict::default()
            }));
        }
        if self.timer().is_some_and(|t| t <= now) {
            self.pto_count += 1;
            return Some(Timeout::Probe);
        }
        None
    }

    /// Declares lost what the thresholds say is lost, and arms the loss timer
    /// for the earliest packet that is not lost yet but will be.
    fn detect_lost(&mut self, now: Instant) -> (Vec<SentPacket>, bool) {
        self.loss_time = None;
        let Some(largest) = self.largest_acked else {
            return (Vec::new(), false);
        };
        let loss_delay = self.rtt.loss_delay();
        let mut lost_numbers = Vec::new();
        for (&number, packet) in self.in_flight.range(..largest) {
            let deadline = packet.time_sent + loss_delay;
            if number + PACKET_THRESHOLD <= largest {
                self.losses.by_reordering += 1;
                lost_numbers.push(number);
            } else if deadline <= now {
                self.losses.by_time += 1;
                lost_numbers.push(number);
            } else {
                self.loss_time = Some(self.loss_time.map_or(deadline, |t| t.min(deadline)));
            }
        }
        let lost: Vec<SentPacket> = lost_numbers
            .into_iter()
            .filter_map(|number| self.in_flight.remove(&number))
            .collect();
        for packet in &lost {
            self.bytes_in_flight -= packet.size;
            if self.recently_lost.len() == MAX_LOST_TRACKED {
                self.recently_lost.pop_first();
            }
            self.recently_lost.insert(packet.number);
        }
        let persistent = self.is_persistent_congestion(&lost);
        (lost, persistent)
    }

    /// Counts the packets `ack` covers that were declared lost, and forgets
    /// them (an ACK range is repeated until acknowledged itself).
    fn count_spurious(&mut self, ack: &AckFrame) {
        for range in &ack.ranges {
            let acked: Vec<u64> = self.recently_lost.range(range.clone()).copied().collect();
            for number in acked {
                self.recently_lost.remove(&number);
                self.losses.spurious += 1;
            }
        }
    }

    /// RFC 9002 §7.6: two lost packets, sent after the first RTT sample, with
    /// every packet between them lost, spanning more than three PTOs. Only
    /// runs of consecutive packet numbers declared lost together count (a
    /// conservative reading: a gap might hide an acknowledged packet).
    fn is_persistent_congestion(&self, lost: &[SentPacket]) -> bool {
        let Some(first_sample) = self.first_rtt_sample else {
            return false;
        };
        let duration = self.pto_period() * PERSISTENT_CONGESTION_THRESHOLD;
        let mut run_start: Option<&SentPacket> = None;
        let mut previous: Option<&SentPacket> = None;
        for packet in lost.iter().filter(|p| p.time_sent >= first_sample) {
            if previous.is_none_or(|p| p.number + 1 != packet.number) {
                run_start = Some(packet);
            }
            if let Some(start) = run_start {
                if packet.time_sent.saturating_duration_since(start.time_sent) > duration {
                    return true;
                }
            }
            previous = Some(packet);
        }
        false
    }
}

#[cfg(test)]
// One-range lists of packet numbers are what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn recovery() -> Recovery {
        Recovery::new(Duration::from_millis(100), 5 * MS, 30 * MS)
    }

    fn send(r: &mut Recovery, number: u64, at: Instant) {
        r.on_ack_eliciting_sent(SentPacket {
            number,
            time_sent: at,
            size: 1000,
            content: PacketContent::default(),
        });
    }

    fn ack(ranges: &[Range<u64>]) -> AckFrame {
        AckFrame {
            delay_micros: 0,
            ranges: ranges.to_vec(),
        }
    }

    #[test]
    fn rtt_follows_rfc6298() {
        let mut rtt = RttEstimator::new(Duration::from_millis(333));
        let t0 = Instant::now();
        rtt.update(t0, 100 * MS, Duration::ZERO);
        assert_eq!((rtt.smoothed, rtt.variance), (100 * MS, 50 * MS));
        rtt.update(t0, 200 * MS, Duration::ZERO);
        // variance = 3/4 * 50 + 1/4 * 100; smoothed = 7/8 * 100 + 1/8 * 200
        assert_eq!(rtt.variance, Duration::from_micros(62_500));
        assert_eq!(rtt.smoothed, Duration::from_micros(112_500));
        assert_eq!(rtt.rto(), Duration::from_micros(362_500));
        // ACK delay is subtracted, but never below min_rtt.
        rtt.update(t0, 130 * MS, 20 * MS);
        assert_eq!(rtt.latest, 130 * MS);
        assert_eq!(
            rtt.smoothed,
            (Duration::from_micros(112_500) * 7 + 110 * MS) / 8
        );
        let before = rtt.smoothed;
        rtt.update(t0, 101 * MS, 20 * MS);
        assert!(rtt.smoothed < before && rtt.min == 100 * MS);
    }

    #[test]
    fn reordering_threshold_declares_loss() {
        let start = Instant::now();
        let mut r = recovery();
        for n in 0..5 {
            send(&mut r, n, start);
        }
        let verdict = r.on_ack(start + 50 * MS, &ack(&[2..3]));
        assert_eq!(verdict.acked.len(), 1);
        assert!(verdict.lost.is_empty(), "only two packets later");
        assert!(r.timer().unwrap() > start + 50 * MS, "time threshold armed");
        let verdict = r.on_ack(start + 51 * MS, &ack(&[3..4]));
        let lost: Vec<u64> = verdict.lost.iter().map(|p| p.number).collect();
        assert_eq!(lost, vec![0]);
        assert_eq!(r.bytes_in_flight(), 2000);
    }

    #[test]
    fn time_threshold_declares_loss() {
        let start = Instant::now();
        let mut r = recovery();
        send(&mut r, 0, start);
        send(&mut r, 1, start + 10 * MS);
        let verdict = r.on_ack(start + 110 * MS, &ack(&[1..2]));
        assert!(verdict.lost.is_empty());
        // latest RTT 100 ms, smoothed 100 ms: lost 112.5 ms after it was sent.
        let timer = r.timer().unwrap();
        assert_eq!(timer, start + Duration::from_micros(112_500));
        match r.on_timeout(timer) {
            Some(Timeout::Lost(v)) => assert_eq!(v.lost[0].number, 0),
            other => panic!("expected loss, got {other:?}"),
        }
        assert_eq!(r.timer(), None, "nothing left in flight");
    }

    #[test]
    fn probe_timeout_backs_off_and_resets_on_ack() {
        let start = Instant::now();
        let mut r = recovery();
        send(&mut r, 0, start);
        let first = r.timer().unwrap();
        // Initial RTT 100 ms: 100 + 4 * 50 + 5 = 305 ms.
        assert_eq!(first, start + 305 * MS);
        assert!(matches!(r.on_timeout(first), Some(Timeout::Probe)));
        assert_eq!(r.timer().unwrap(), start + 610 * MS);
        assert!(matches!(
            r.on_timeout(start + 610 * MS),
            Some(Timeout::Probe)
        ));
        assert!(matches!(
            r.on_timeout(start + 1220 * MS),
            Some(Timeout::Probe)
        ));
        assert!(matches!(
            r.on_timeout(start + 2440 * MS),
            Some(Timeout::Probe)
        ));
        assert_eq!(r.timer().unwrap(), start + 2000 * MS, "backoff capped");
        send(&mut r, 1, start + 3000 * MS);
        r.on_ack(start + 3010 * MS, &ack(&[1..2]));
        assert_eq!(r.pto_count, 0);
    }

    #[test]
    fn pto_has_a_floor_for_low_latency_links() {
        let start = Instant::now();
        let mut r = recovery();
        send(&mut r, 0, start);
        r.on_ack(start + Duration::from_micros(200), &ack(&[0..1]));
        assert_eq!(r.pto_period(), 30 * MS);
    }

    #[test]
    fn persistent_congestion_needs_a_long_run_of_losses() {
        let start = Instant::now();
        let mut r = recovery();
        send(&mut r, 0, start);
        r.on_ack(start + 100 * MS, &ack(&[0..1]));
        let period = r.pto_period();
        for n in 1..=10 {
            send(&mut r, n, start + 100 * MS + period * n as u32);
        }
        let verdict = r.on_ack(start + 110 * MS + period * 10, &ack(&[10..11]));
        assert_eq!(verdict.lost.len(), 9);
        assert!(verdict.persistent_congestion);

        // Same losses with a packet acknowledged in the middle: not persistent.
        let mut r = recovery();
        send(&mut r, 0, start);
        r.on_ack(start + 100 * MS, &ack(&[0..1]));
        for n in 1..=10 {
            send(&mut r, n, start + 100 * MS + period * n as u32);
        }
        let verdict = r.on_ack(start + 110 * MS + period * 10, &ack(&[10..11, 5..6]));
        assert_eq!(verdict.lost.len(), 8);
        assert!(!verdict.persistent_congestion);
    }

    #[test]
    fn ack_only_packets_report_ack_of_ack() {
        let start = Instant::now();
        let mut r = recovery();
        send(&mut r, 0, start);
        r.on_ack_only_sent(1, start + 2 * MS, 41);
        let verdict = r.on_ack(start + 10 * MS, &ack(&[0..2]));
        assert_eq!(verdict.ack_only_largest, Some(41));
        assert_eq!(verdict.acked.len(), 1);
        assert_eq!(r.rtt().smoothed(), 8 * MS, "timed from the ACK-only packet");
    }
}
