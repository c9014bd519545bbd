//! Congestion control: NewReno as RFC 9002 §7 specifies it for QUIC (slow
//! start, congestion avoidance, one reduction per recovery period,
//! persistent congestion), with Westwood+'s response to loss (Mascolo et
//! al., 2004).
//!
//! NewReno halves its window on every loss, as if every loss were a full
//! queue. On Wi-Fi and mobile paths many are not, and halving then cuts
//! throughput to a few percent of the link at 1 % random loss. Here a loss
//! counts only when the round trips show a queue (every sample of the last
//! round trip or two above the minimum) and the round trip's losses are
//! more than the path's random loss (the losses that did not cut it)
//! explains, and then the window halves as Reno's, so that flows sharing
//! a queue stay even; or when the window far
//! overshoots what the path delivers, and then, as Westwood+ does after
//! every loss, the window becomes the rate at which the path delivers
//! (bytes acknowledged per round trip) times the minimum round trip: the
//! path's capacity without a queue. A random loss on an empty queue
//! changes nothing, in slow start too. The estimate is the largest of the
//! last [`BANDWIDTH_SAMPLES`] per-round-trip samples, as BBR filters its
//! delivery rate, rather than Westwood+'s moving average: an average lags a
//! growing window, so each loss would trim the window to its own past.
//! Windows are in bytes of datagram payload.
//!
//! The minimum round trip both tests lean on is the smallest sample seen,
//! checked as BBR checks its own: when none came at or below it for
//! [`MIN_RTT_EXPIRY`], the window is held at half for a moment, and a
//! smaller sample then lowers it. A flow that starts while another keeps
//! the queue full sees that queue in every sample; with a minimum found
//! only by chance it took the queue for the path, every loss for a random
//! one, and kept growing (two natter flows through a 50 ms queue: the
//! later one took 0.72 of the link). Draining its own part of the queue
//! shows it what the others leave.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::recovery::RttEstimator;

/// Initial window, in full packets (RFC 9002 §7.2: ten, capped at 14 720
/// bytes or two packets, whichever is larger).
const INITIAL_WINDOW_PACKETS: u64 = 10;
const INITIAL_WINDOW_CAP: u64 = 14_720;

/// When the handshake timed the path, the first window is what this pace
/// sends in that round trip, bytes per second: RFC 9002's window over a
/// 10 ms round trip. Ten packets per round trip whatever its length make
/// the first flight slower the farther the peer, and the doublings to fill
/// a long fat path are then the transfer's cost (simulated 100 Mbit/s,
/// 100 ms: 0.87x quinn's BBR, which starts with 200 packets). The window
/// is paced over the round trip, so the bottleneck sees this pace, not a
/// burst.
const INITIAL_PACE: f64 = INITIAL_WINDOW_CAP as f64 / 0.010;

/// The paced first window never exceeds this many full packets.
const MAX_INITIAL_WINDOW_PACKETS: u64 = 100;

/// Packets a halved window keeps beyond what the path delivers in a
/// minimum round trip, if half is not already that much: the receiver
/// acknowledges every second packet, and losses not yet detected count as
/// in flight, so a window of exactly the product left the link idle after
/// every halving (simulated 10 Mbit/s, 20 ms, one-product queue: 6.5 ms
/// per cut, 150 ms of a 14 s transfer). Never more than this above half,
/// so flows sharing a queue still give up the same part of their windows.
const ACK_SLACK_PACKETS: u64 = 2;

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
/// queue shorter than 1/8 RTT): cut it.
const OVERSHOOT: u64 = 4;

/// In slow start a window that far ahead of the estimate is an overshoot
/// only once the estimate stopped growing: its latest sample under this
/// factor of the largest before it (BBR's full-pipe test). A sample counts
/// packets sent a round trip before it closes, and the window doubles again
/// before the next one closes, so a doubling window runs four times and
/// more ahead of an estimate that is doubling too (simulated 100 Mbit/s,
/// 100 ms, 1 % loss, a 100-packet first window: a random loss found a
/// window 4.3 times the estimate, cut it to the estimate and left slow
/// start at a sixth of the path: 2.4 MB/s instead of 7-9). Allowing eight
/// times while it grows instead cut a lagging estimate all the same, and a
/// queue of 1/8 of the product lost more (10 Mbit/s, 20 ms: 0.93x quinn's
/// BBR, 0.99x without the bound).
const SLOW_START_GROWTH: f64 = 1.25;

/// The shortest interval a bandwidth sample covers.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);

/// The shortest round trip the window is sized for. On a LAN the minimum
/// RTT sample (40 µs in the NAT lab) is far below what the sender's loop
/// can act on: timers tick in milliseconds and ACKs come in bursts, so a
/// window of the bandwidth times that minimum starves the path (the NAT lab
/// at 5 % loss: windows of ten packets, a tail loss every few hundred
/// packets, 307 probe timeouts in a 64 MiB transfer).
const MIN_WINDOW_RTT: Duration = Duration::from_millis(1);

/// Packet outcomes the random loss rate remembers: past this many, the
/// counts halve, so it follows a path whose loss changes within seconds.
const RANDOM_LOSS_MEMORY: u64 = 16_384;

/// Packet outcomes counted before the random loss rate is trusted at face
/// value: fewer are read as this many (one random loss in the first fifty
/// packets is not a 2 % path).
const RANDOM_LOSS_PRIOR: u64 = 1_000;

/// A round trip's losses behind a queue count as congestion when random
/// loss at the path's rate reaches as many less often than this: once in
/// 740 round trips, a normal's three standard deviations, one-sided. The
/// count is Poisson's, not the normal's: at a mean of one loss per round
/// trip, mean + 3√mean took four losses for congestion once in 40 round
/// trips (simulated 10 Mbit/s, 100 ms, 1 %: two halvings in a 14 s
/// transfer, each leaving the window under the path for seconds).
const RANDOM_LOSS_TAIL: f64 = 0.00135;

/// Above this mean the Poisson count is taken as normal: the mean plus
/// three standard deviations.
const POISSON_MAX_MEAN: f64 = 50.0;

/// Slow start ends once this many round-trip samples in a row exceed the
/// minimum by [`queue_threshold`] (RFC 9406's sample count): a queue has
/// formed, and doubling on waits a round trip for the loss that shows it,
/// by when the window is twice what the path and its queue hold.
const QUEUED_SAMPLES_TO_EXIT: u32 = 8;

/// How long the minimum round trip stands without a sample at or below it
/// before a drain checks it (BBR's min_rtt filter window).
const MIN_RTT_EXPIRY: Duration = Duration::from_secs(10);

/// The window while the minimum is measured again is this fraction of
/// the window (BBRv2's ProbeRTT halves; BBRv1 goes to four packets, which
/// empties the queue and shows every other flow the bare path: a TCP BBR
/// flow then sized its window for no queue and natter took 0.76 of the
/// link from it), and never under the minimum window.
const DRAIN_WINDOW_DIVISOR: u64 = 2;

/// How long the small window holds once the queue had a round trip to
/// drain (BBR's 200 ms).
const DRAIN_HOLD: Duration = Duration::from_millis(200);

/// When the minimum round trip was last confirmed, or when the window it
/// is measured again with ends. The minimum itself is the estimator's: a
/// drain never raises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MinRttCheck {
    /// No sample yet.
    Unknown,
    /// The latest sample at or below the minimum came at `since`.
    Confirmed { since: Instant },
    /// The window is held small until `until` so that queues drain.
    Draining { until: Instant },
}

/// The path's random loss: packets lost without cutting the window, and
/// packets whose fate is known, counted in congestion avoidance.
#[derive(Debug, Clone, Copy, Default)]
struct RandomLoss {
    lost: u64,
    outcomes: u64,
}

impl RandomLoss {
    fn record(&mut self, lost: u64, acked: u64) {
        self.lost += lost;
        self.outcomes += lost + acked;
        if self.outcomes >= RANDOM_LOSS_MEMORY {
            self.lost /= 2;
            self.outcomes /= 2;
        }
    }

    fn rate(&self) -> f64 {
        self.lost as f64 / self.outcomes.max(RANDOM_LOSS_PRIOR) as f64
    }

    /// Whether random loss explains `losses` in a round trip of `packets`:
    /// it reaches that many more often than [`RANDOM_LOSS_TAIL`].
    fn explains(&self, losses: u64, packets: u64) -> bool {
        let mean = self.rate() * packets as f64;
        if mean > POISSON_MAX_MEAN {
            return losses as f64 <= mean + 3.0 * mean.sqrt();
        }
        // P(X >= losses) = 1 - P(X < losses), term by term.
        let mut term = (-mean).exp();
        let mut below = 0.0;
        for count in 0..losses {
            below += term;
            if 1.0 - below <= RANDOM_LOSS_TAIL {
                return false;
            }
            term *= mean / (count + 1) as f64;
        }
        true
    }
}

/// Losses in the round trip under way.
#[derive(Debug, Clone, Copy)]
struct RoundLosses {
    start: Instant,
    lost: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Westwood {
    max_datagram: u64,
    window: u64,
    slow_start_threshold: u64,
    /// When slow start first ended: losses of packets sent before it, or
    /// soon after, were its overshoot.
    slow_start_ended: Option<Instant>,
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
    min_rtt_check: MinRttCheck,
    /// Packets acknowledged since the last ACK was looked at.
    acked_packets: u64,
    random_loss: RandomLoss,
    round_losses: Option<RoundLosses>,
    /// Losses counted as random while a queue showed, since the window was
    /// last cut.
    random_behind_queue: u64,
    /// Round-trip samples in a row that showed a queue in slow start, and
    /// the estimator's sample count when last looked at.
    queued_samples: u32,
    rtt_samples_seen: u64,
    /// Times the window was held small to measure the minimum again.
    drains: u64,
}

/// The queueing delay that ends slow start: an eighth of the minimum round
/// trip, within 4-16 ms (RFC 9406's bounds, so that jitter does not end it
/// on a short path nor a deep queue first fill on a long one).
fn queue_threshold(min_rtt: Duration) -> Duration {
    (min_rtt / 8).clamp(Duration::from_millis(4), Duration::from_millis(16))
}

/// Whether the round trips show a queue; both below [`MIN_WINDOW_RTT`]
/// count as that (a LAN's sub-millisecond jitter is the host, not a queue).
fn queue_building(min_rtt: Duration, recent_min_rtt: Duration) -> bool {
    let min_rtt = min_rtt.max(MIN_WINDOW_RTT);
    recent_min_rtt.max(MIN_WINDOW_RTT) > min_rtt + min_rtt / RANDOM_LOSS_MARGIN
}

/// The first window for packets of `max_datagram` bytes: RFC 9002's, or
/// [`INITIAL_PACE`] over the `rtt` a handshake measured if that is more.
fn initial_window(max_datagram: u64, rtt: Option<Duration>) -> u64 {
    let standard = (INITIAL_WINDOW_PACKETS * max_datagram)
        .min(INITIAL_WINDOW_CAP.max(MINIMUM_WINDOW_PACKETS * max_datagram));
    let paced = rtt.map_or(0, |rtt| (INITIAL_PACE * rtt.as_secs_f64()) as u64);
    paced
        .min(MAX_INITIAL_WINDOW_PACKETS * max_datagram)
        .max(standard)
}

impl Westwood {
    /// A controller for packets of up to `max_datagram` bytes on a path
    /// whose round trip, if something timed it, is `rtt`.
    pub fn new(max_datagram: usize, rtt: Option<Duration>) -> Self {
        let max_datagram = max_datagram as u64;
        Self {
            max_datagram,
            window: initial_window(max_datagram, rtt),
            slow_start_threshold: u64::MAX,
            slow_start_ended: None,
            recovery_start: None,
            acked_in_avoidance: 0,
            bandwidth_samples: VecDeque::with_capacity(BANDWIDTH_SAMPLES),
            sample_start: None,
            sample_bytes: 0,
            min_rtt_check: MinRttCheck::Unknown,
            acked_packets: 0,
            random_loss: RandomLoss::default(),
            round_losses: None,
            random_behind_queue: 0,
            queued_samples: 0,
            rtt_samples_seen: 0,
            drains: 0,
        }
    }

    /// What may be in flight: the window, or half of it while the minimum
    /// round trip is measured again.
    pub fn window(&self) -> u64 {
        if self.draining() {
            (self.window / DRAIN_WINDOW_DIVISOR).max(self.minimum_window())
        } else {
            self.window
        }
    }

    /// Whether the window still doubles every round trip.
    fn in_slow_start(&self) -> bool {
        self.window < self.slow_start_threshold
    }

    /// Times the window was held small to measure the minimum round trip.
    pub fn drains(&self) -> u64 {
        self.drains
    }

    fn draining(&self) -> bool {
        matches!(self.min_rtt_check, MinRttCheck::Draining { .. })
    }

    /// A round-trip sample was taken at `now`: it confirms the minimum, or
    /// after [`MIN_RTT_EXPIRY`] without one starts a drain, which waits out
    /// the smoothed round trip before it holds.
    fn check_min_rtt(&mut self, now: Instant, rtt: &RttEstimator) {
        // Both tests round a minimum up to MIN_WINDOW_RTT: a sample under
        // it is as good as the minimum, and a LAN path need not drain to
        // find its jitter's lowest point again.
        let confirms = rtt.latest() <= rtt.min().max(MIN_WINDOW_RTT);
        self.min_rtt_check = match self.min_rtt_check {
            MinRttCheck::Unknown => MinRttCheck::Confirmed { since: now },
            MinRttCheck::Confirmed { .. } if confirms => MinRttCheck::Confirmed { since: now },
            MinRttCheck::Confirmed { since }
                if now.saturating_duration_since(since) >= MIN_RTT_EXPIRY =>
            {
                self.drains += 1;
                MinRttCheck::Draining {
                    until: now + rtt.smoothed() + DRAIN_HOLD,
                }
            }
            MinRttCheck::Draining { until } if now >= until => {
                MinRttCheck::Confirmed { since: now }
            }
            unchanged => unchanged,
        };
    }

    fn minimum_window(&self) -> u64 {
        MINIMUM_WINDOW_PACKETS * self.max_datagram
    }

    fn in_recovery(&self, time_sent: Instant) -> bool {
        self.recovery_start.is_some_and(|start| time_sent <= start)
    }

    /// An ACK arrived at `now`, with `rtt` updated by it: keeps the minimum
    /// round trip fresh and closes a bandwidth sample once it spans one
    /// (Westwood+ samples once per RTT so that bunched ACKs do not inflate
    /// the estimate). Call after the packets it acknowledged were reported.
    pub fn on_ack(&mut self, now: Instant, rtt: &RttEstimator) {
        self.check_min_rtt(now, rtt);
        if self.in_slow_start() && rtt.samples() != self.rtt_samples_seen {
            self.end_slow_start_at_a_queue(now, rtt);
        }
        self.rtt_samples_seen = rtt.samples();
        let acked = std::mem::take(&mut self.acked_packets);
        if !self.in_slow_start() {
            self.random_loss.record(0, acked);
        }
        if self.draining() {
            // What a drained window delivers says nothing of the path.
            self.sample_start = None;
            return;
        }
        let Some(start) = self.sample_start else {
            self.sample_start = Some(now);
            self.sample_bytes = 0;
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < rtt.min().max(MIN_SAMPLE_INTERVAL) {
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

    /// Counts round-trip samples that show a queue; after
    /// [`QUEUED_SAMPLES_TO_EXIT`] in a row slow start ends, with the window
    /// at most twice what the path delivers in a minimum round trip (the
    /// path and as much queue again, what BBR's startup lets be in flight)
    /// and at least half of what it was, as after a loss: behind another
    /// flow's standing queue this flow's delivery rate is its share so far,
    /// and a window cut to it would starve. What is in flight was sent into
    /// the queue the samples show: a recovery period starts, so its losses
    /// neither cut again nor count as random loss.
    fn end_slow_start_at_a_queue(&mut self, now: Instant, rtt: &RttEstimator) {
        let min_rtt = rtt.min().max(MIN_WINDOW_RTT);
        if rtt.latest() < min_rtt + queue_threshold(min_rtt) {
            self.queued_samples = 0;
            return;
        }
        self.queued_samples += 1;
        if self.queued_samples < QUEUED_SAMPLES_TO_EXIT {
            return;
        }
        let product = self.delivered_per_round_trip(rtt).unwrap_or(u64::MAX);
        let window = self
            .window
            .min(product.saturating_mul(2))
            .max(self.window / 2)
            .max(self.minimum_window());
        self.set_slow_start_threshold(now, window);
        self.queued_samples = 0;
        self.reduce_window(now, window);
    }

    fn set_slow_start_threshold(&mut self, now: Instant, threshold: u64) {
        self.slow_start_threshold = threshold;
        self.slow_start_ended.get_or_insert(now);
    }

    /// The window becomes `window` and a recovery period starts at `now`:
    /// what was sent before neither cuts it again nor grows it.
    fn reduce_window(&mut self, now: Instant, window: u64) {
        self.recovery_start = Some(now);
        self.round_losses = None;
        self.random_behind_queue = 0;
        self.window = window;
        self.acked_in_avoidance = 0;
    }

    /// What the path delivers in a minimum round trip (at least
    /// [`MIN_WINDOW_RTT`]) at the estimated bandwidth: its capacity without
    /// a queue. None before the first bandwidth sample.
    fn delivered_per_round_trip(&self, rtt: &RttEstimator) -> Option<u64> {
        let bandwidth = self.bandwidth()?;
        Some((bandwidth * rtt.min().max(MIN_WINDOW_RTT).as_secs_f64()) as u64)
    }

    /// Whether the latest delivery-rate sample grew past the largest before
    /// it by [`SLOW_START_GROWTH`]; true while there is no sample before it.
    fn bandwidth_growing(&self) -> bool {
        let Some(&latest) = self.bandwidth_samples.back() else {
            return true;
        };
        let earlier = self.bandwidth_samples.len() - 1;
        self.bandwidth_samples
            .iter()
            .take(earlier)
            .copied()
            .reduce(f64::max)
            .is_none_or(|before| latest >= before * SLOW_START_GROWTH)
    }

    /// The estimated bandwidth, bytes of payload per second: the largest
    /// recent delivery rate sample. None before the first.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth_samples.iter().copied().reduce(f64::max)
    }

    /// A packet of `size` bytes sent at `time_sent` was acknowledged.
    /// `window_limited` says whether the sender was using the window; an
    /// application-limited sender must not grow it (RFC 9002 §7.8).
    pub fn on_packet_acked(&mut self, time_sent: Instant, size: u64, window_limited: bool) {
        self.sample_bytes += size;
        self.acked_packets += 1;
        if self.in_recovery(time_sent) || !window_limited || self.draining() {
            return;
        }
        if self.in_slow_start() {
            self.window += size;
            return;
        }
        self.acked_in_avoidance += size;
        if self.acked_in_avoidance >= self.window {
            self.acked_in_avoidance -= self.window;
            self.window += self.max_datagram;
        }
    }

    /// `lost` packets were lost, the latest of them sent at
    /// `latest_lost_sent`. Once per recovery period, if the loss came with
    /// a queue (the round trips of the last one or two all above the
    /// minimum) and the round trip's losses are more than the path's random
    /// loss explains, the window halves; if it came with a window far
    /// beyond what the path delivers and no queue, the window becomes the
    /// estimated bandwidth-delay product; slow start ends there. Any other
    /// loss is random: nothing changes, slow start included, so a random
    /// loss early in a transfer does not leave it to grow one packet per
    /// round trip. True when the window was cut.
    pub fn on_congestion_event(
        &mut self,
        now: Instant,
        latest_lost_sent: Instant,
        lost: u64,
        rtt: &RttEstimator,
    ) -> bool {
        if self.in_recovery(latest_lost_sent) {
            return false;
        }
        let min_rtt = rtt.min();
        let product = self.delivered_per_round_trip(rtt);
        let target = product
            .unwrap_or(self.window / 2)
            .max(self.minimum_window());
        let queued = queue_building(min_rtt, rtt.recent_min());
        let overshoot =
            target < self.window / OVERSHOOT && !(self.in_slow_start() && self.bandwidth_growing());
        let teaches = self.teaches_random_loss(latest_lost_sent, rtt.smoothed());
        if !queued && !overshoot {
            if teaches {
                self.random_loss.record(lost, 0);
            }
            return false;
        }
        // Behind a queue, half, as Reno: flows that share a queue then
        // give up the same part of their windows whatever minimum each one
        // measured. Cutting to the product without a queue (never below
        // half) favoured the flow whose minimum included others' queue
        // (two natter flows through a 50 ms queue: 0.32-0.39 of the link
        // to the first), and against a flow that keeps a deep queue full
        // the product is a sliver (natter 0.28-0.38 against TCP Reno while
        // a deep queue's overshoot went to it). An overshoot without a
        // queue (a policer) goes to the product.
        let target = if queued {
            if !self.round_losses_exceed_random(now, lost, rtt.smoothed()) {
                if teaches {
                    self.random_loss.record(lost, 0);
                    self.random_behind_queue += lost;
                }
                return false;
            }
            // The losses behind this queue since the last cut, counted as
            // random while they were few, were this congestion too: on a
            // path without random loss they taught a rate that let every
            // later cycle lose more before it cut (simulated 10 Mbit/s,
            // 20 ms, one-product queue, the normal test: 133 losses, 96
            // taking back the cutting round trip's; the Poisson test: 383
            // taking back the round trip's, 169 all since the last cut).
            self.random_loss.lost = self
                .random_loss
                .lost
                .saturating_sub(std::mem::take(&mut self.random_behind_queue));
            let half = self.window / 2;
            let slack = ACK_SLACK_PACKETS * self.max_datagram;
            let product = product.unwrap_or(0);
            half.max((product + slack).min(half + slack))
                .max(self.minimum_window())
        } else {
            target
        };
        self.set_slow_start_threshold(now, self.window.min(target));
        if target >= self.window {
            return false;
        }
        self.reduce_window(now, target);
        true
    }

    /// Whether losses that do not cut the window, the latest of them sent
    /// at `latest_lost_sent`, count toward the path's random loss rate
    /// (beside every packet acknowledged in congestion avoidance). Slow
    /// start's do not: its overshoot fills a queue within a round trip,
    /// before the round trips show it (two simulated flows sharing a
    /// queue: counting those losses as random let the first take 0.64 of
    /// the link). Nor do those of packets sent in the two round trips
    /// after it ended, which the queue test, looking one or two round trips
    /// back, does not see behind a queue yet (10 Mbit/s, 20 ms,
    /// one-product queue: four losses taught a lossless path a rate that
    /// let every later cycle lose more before it cut: 169 losses, 85
    /// without). Losses that cut the window do not count either, so on a
    /// path without random loss the rate stays 0 and every loss behind a
    /// queue halves.
    fn teaches_random_loss(&self, latest_lost_sent: Instant, round_trip: Duration) -> bool {
        !self.in_slow_start()
            && self
                .slow_start_ended
                .is_some_and(|ended| latest_lost_sent > ended + 2 * round_trip)
    }

    /// Adds `lost` to the round trip's losses behind a queue; true when
    /// they exceed what the path's random loss explains for a window's
    /// worth of packets. A full queue drops more every round trip as the
    /// window grows; random loss on a path that also queues (Wi-Fi behind
    /// a slow uplink) keeps its rate, and halving on it left the link a
    /// fifth idle (simulated 100 Mbit/s, 20 ms, one-product queue, 1 %:
    /// 81 % of quinn's BBR).
    fn round_losses_exceed_random(
        &mut self,
        now: Instant,
        lost: u64,
        round_trip: Duration,
    ) -> bool {
        let round = match self.round_losses {
            Some(round) if now.saturating_duration_since(round.start) < round_trip => round,
            _ => RoundLosses {
                start: now,
                lost: 0,
            },
        };
        let round = RoundLosses {
            lost: round.lost + lost,
            ..round
        };
        self.round_losses = Some(round);
        !self
            .random_loss
            .explains(round.lost, self.window / self.max_datagram)
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

    /// A controller with `window` that saw a steady 100 packets of 1000
    /// bytes acknowledged per 10 ms round trip (10 MB/s, a bandwidth-delay
    /// product of 100 000 bytes) for 40 round trips; and the time after.
    fn delivering_steadily(window: u64) -> (Westwood, Instant) {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
        cc.window = window;
        let mut rtt = RttEstimator::new(RTT);
        let mut now = start;
        for _ in 0..40 * 100 {
            now += RTT / 100;
            cc.on_packet_acked(start, 1000, false);
            rtt.update(now, RTT, Duration::ZERO);
            cc.on_ack(now, &rtt);
        }
        (cc, now)
    }

    /// A path whose minimum is `min` with a queue of `recent - min` standing.
    fn path(min: Duration, recent: Duration) -> RttEstimator {
        RttEstimator::queued(min, recent)
    }

    #[test]
    fn a_random_loss_keeps_the_window_at_the_bandwidth_delay_product() {
        let (mut cc, now) = delivering_steadily(100_000);
        assert!(!cc.on_congestion_event(now, now, 1, &path(RTT, RTT)));
        assert_eq!(cc.window(), 100_000);
    }

    #[test]
    fn a_loss_from_a_queue_shrinks_the_window_to_the_path_without_it() {
        // Twice the bandwidth-delay product in flight: half of it queued,
        // so the round trip is twice the minimum. Half, and two packets
        // for the ACKs that come every second packet.
        let (mut cc, now) = delivering_steadily(200_000);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, 2 * RTT)));
        assert_eq!(cc.window(), 102_000);
        assert_eq!(cc.slow_start_threshold, 102_000);
    }

    #[test]
    fn slow_start_doubles_per_round_trip() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
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
        let mut cc = Westwood::new(MTU, None);
        cc.on_ack(start, &path(RTT, RTT));
        let queued = 2 * RTT;
        cc.on_congestion_event(later, start, 1, &path(RTT, queued));
        assert_eq!(cc.window(), 5_000);
        // A second loss of a packet sent before recovery began: no change.
        cc.on_congestion_event(
            later + Duration::from_millis(1),
            start,
            1,
            &path(RTT, queued),
        );
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
        cc.on_congestion_event(
            after + Duration::from_millis(5),
            after,
            1,
            &path(RTT, queued),
        );
        assert_eq!(cc.window(), 3_000);
    }

    #[test]
    fn a_halved_window_near_the_product_keeps_up_to_two_packets_more() {
        // The product is 100 000 bytes; half of 190 000 would leave the
        // link waiting on every second packet's ACK.
        let (mut cc, now) = delivering_steadily(190_000);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, 2 * RTT)));
        assert_eq!(cc.window(), 97_000);
        let (mut cc, now) = delivering_steadily(196_000);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, 2 * RTT)));
        assert_eq!(cc.window(), 100_000);
        // Far above the product, it halves as Reno's.
        let (mut cc, now) = delivering_steadily(400_000);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, 2 * RTT)));
        assert_eq!(cc.window(), 200_000);
    }

    /// Feeds `samples` to `cc` as the round trips of ACKs 1 ms apart.
    /// An estimator whose one sample, taken at `now`, is `min`.
    fn sampled_once(min: Duration, now: Instant) -> RttEstimator {
        let mut rtt = RttEstimator::new(min);
        rtt.update(now, min, Duration::ZERO);
        rtt
    }

    fn sample(cc: &mut Westwood, rtt: &mut RttEstimator, now: &mut Instant, samples: &[Duration]) {
        for &sample in samples {
            *now += Duration::from_millis(1);
            rtt.update(*now, sample, Duration::ZERO);
            cc.on_ack(*now, rtt);
        }
    }

    #[test]
    fn slow_start_ends_once_eight_round_trips_in_a_row_show_a_queue() {
        // The product is 100 000 bytes; 5 ms is over the 4 ms threshold.
        let (mut cc, mut now) = delivering_steadily(300_000);
        let mut rtt = sampled_once(RTT, now);
        let queued = RTT + Duration::from_millis(5);
        let jitter = [[queued; 7].as_slice(), &[RTT], &[queued; 7]].concat();
        sample(&mut cc, &mut rtt, &mut now, &jitter);
        assert!(cc.in_slow_start(), "one sample at the minimum starts over");
        sample(&mut cc, &mut rtt, &mut now, &[queued]);
        assert!(!cc.in_slow_start());
        assert_eq!(cc.window(), 200_000, "twice the product");
        // What was in flight went into that queue: its losses are the
        // same congestion.
        assert!(!cc.on_congestion_event(now, now - RTT, 20, &path(RTT, queued)));
        assert_eq!(cc.window(), 200_000);
        // Slow start again after persistent congestion needs 8 more.
        cc.on_persistent_congestion();
        sample(&mut cc, &mut rtt, &mut now, &[queued; 7]);
        assert!(cc.in_slow_start());

        // Behind another flow's queue the delivery rate is a share so far:
        // the window halves at most.
        let (mut cc, mut now) = delivering_steadily(1_000_000);
        let mut rtt = sampled_once(RTT, now);
        sample(&mut cc, &mut rtt, &mut now, &[queued; 8]);
        assert_eq!(cc.window(), 500_000);
    }

    #[test]
    fn a_lan_path_ends_slow_start_only_at_a_queue_of_milliseconds() {
        let (mut cc, mut now) = delivering_steadily(300_000);
        let mut rtt = sampled_once(Duration::from_micros(100), now);
        sample(&mut cc, &mut rtt, &mut now, &[Duration::from_millis(4); 20]);
        assert!(cc.in_slow_start(), "the host's millisecond is not a queue");
        sample(&mut cc, &mut rtt, &mut now, &[Duration::from_millis(6); 8]);
        assert!(!cc.in_slow_start());
    }

    #[test]
    fn a_random_loss_in_slow_start_leaves_slow_start_going() {
        // Slow start: the delivery rate is half the doubling window's.
        let (mut cc, now) = delivering_steadily(200_000);
        assert!(!cc.on_congestion_event(now, now, 1, &path(RTT, RTT)));
        for _ in 0..10 {
            cc.on_packet_acked(now, 1000, true);
        }
        assert_eq!(cc.window(), 210_000, "still adding every acknowledged byte");
    }

    #[test]
    fn a_window_far_beyond_what_the_path_delivers_is_cut_without_a_queue() {
        // A policer: five times the product in flight, no queue to see.
        let (mut cc, now) = delivering_steadily(500_000);
        cc.set_slow_start_threshold(now, cc.window);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, RTT)));
        assert!((95_000..=100_000).contains(&cc.window()), "{}", cc.window());
    }

    #[test]
    fn in_slow_start_a_window_ahead_of_a_growing_estimate_is_its_lag() {
        // The estimate doubles with the window, a round trip or two behind.
        let (mut cc, now) = delivering_steadily(600_000);
        cc.bandwidth_samples = [5e6, 10e6].into();
        assert!(!cc.on_congestion_event(now, now, 1, &path(RTT, RTT)));
        assert_eq!(cc.window(), 600_000);
        // Once it stops growing, six times the product is an overshoot.
        cc.bandwidth_samples = [10e6, 10e6].into();
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, RTT)));
        assert!(!cc.in_slow_start());
    }

    #[test]
    fn behind_a_deep_queue_a_loss_halves_even_a_window_far_beyond_the_product() {
        // Another flow keeps a queue of 20 round trips full: the window is
        // five times the product and the round trips show the queue.
        let (mut cc, now) = delivering_steadily(500_000);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, 20 * RTT)));
        assert_eq!(cc.window(), 250_000);
    }

    #[test]
    fn a_flow_that_started_behind_a_queue_finds_the_lower_minimum_by_draining() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
        cc.window = 1_000_000;
        // Another flow kept a queue of 4 RTT full from the start: every
        // sample is about 5 RTT, so a loss there reads as random...
        let queued = 5 * RTT;
        let mut rtt = RttEstimator::new(RTT);
        rtt.update(start, queued, Duration::ZERO);
        cc.on_ack(start, &rtt);
        let jittered = queued + RTT / 10;
        let mut now = start;
        while now < start + MIN_RTT_EXPIRY - RTT {
            now += RTT;
            // 10 MB/s delivered: the window is no overshoot.
            cc.on_packet_acked(start, 100_000, false);
            rtt.update(now, jittered, Duration::ZERO);
            cc.on_ack(now, &rtt);
        }
        assert!(!cc.on_congestion_event(now, now, 1, &rtt));
        assert_eq!(cc.window(), 1_000_000);
        // ...until the minimum is ten seconds old: the window halves for a
        // round trip and 200 ms.
        now += RTT;
        rtt.update(now, jittered, Duration::ZERO);
        cc.on_ack(now, &rtt);
        assert_eq!(cc.window(), 500_000);
        assert_eq!(cc.drains(), 1);
        // With this flow's part of the queue gone, the others leave 3 RTT.
        let drained = 3 * RTT;
        let end = now + jittered + DRAIN_HOLD;
        while now < end {
            now += RTT;
            rtt.update(now, drained, Duration::ZERO);
            cc.on_ack(now, &rtt);
        }
        now += RTT;
        rtt.update(now, queued, Duration::ZERO);
        cc.on_ack(now, &rtt);
        assert_eq!(cc.window(), 1_000_000, "the window is back");
        // A loss with the queue back at 5 RTT now reads as congestion.
        assert!(cc.on_congestion_event(now, now, 1, &path(rtt.min(), queued)));
        assert_eq!(cc.window(), 500_000);
    }

    #[test]
    fn a_drain_that_sees_only_the_queue_still_reads_it_as_a_queue() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
        let mut rtt = RttEstimator::new(RTT);
        rtt.update(start, RTT, Duration::ZERO);
        cc.on_ack(start, &rtt);
        let queued = 5 * RTT;
        let mut now = start;
        while now < start + MIN_RTT_EXPIRY + queued + DRAIN_HOLD + RTT {
            now += RTT;
            rtt.update(now, queued, Duration::ZERO);
            cc.on_ack(now, &rtt);
        }
        assert_eq!(cc.drains(), 1);
        let window = cc.window();
        assert!(
            cc.on_congestion_event(now, now, 1, &rtt),
            "a queue another flow holds is not the path"
        );
        assert_eq!(cc.window(), window / 2);
    }

    #[test]
    fn a_path_under_a_millisecond_does_not_drain() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
        let us = Duration::from_micros(1);
        let mut rtt = RttEstimator::new(RTT);
        rtt.update(start, 40 * us, Duration::ZERO);
        cc.on_ack(start, &rtt);
        let mut now = start;
        while now < start + 3 * MIN_RTT_EXPIRY {
            now += Duration::from_millis(1);
            rtt.update(now, 300 * us, Duration::ZERO);
            cc.on_ack(now, &rtt);
        }
        assert_eq!(cc.drains(), 0);
    }

    /// Loses 1 % of 20 000 packets while no queue stands; returns the
    /// time after.
    fn lose_one_percent_without_a_queue(cc: &mut Westwood, start: Instant) -> Instant {
        let no_queue = path(RTT, RTT);
        let mut now = start;
        for _ in 0..200 {
            now += RTT / 10;
            for _ in 0..99 {
                cc.on_packet_acked(start, 1000, false);
            }
            cc.on_ack(now, &no_queue);
            cc.on_congestion_event(now, now, 1, &no_queue);
        }
        now
    }

    #[test]
    fn behind_a_queue_losses_at_the_random_rate_keep_the_window() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
        cc.window = 400_000;
        cc.set_slow_start_threshold(start - 3 * RTT, cc.window);
        let mut now = lose_one_percent_without_a_queue(&mut cc, start);
        assert_eq!(cc.window(), 400_000, "random losses without a queue");
        let without_queue = cc.random_loss.lost;
        let queue = path(RTT, 2 * RTT);
        // Four losses per round trip of 400 packets, for ten round trips.
        for _ in 0..10 {
            for _ in 0..4 {
                now += RTT / 4;
                assert!(!cc.on_congestion_event(now, now, 1, &queue));
            }
        }
        assert_eq!(cc.window(), 400_000);
        assert_eq!(cc.random_loss.lost, without_queue + 40);
        // A full queue's losses grow past that within the round trip: the
        // losses behind this queue were the congestion, none of them random.
        now += RTT;
        assert!(!cc.on_congestion_event(now, now, 8, &queue));
        assert!(cc.on_congestion_event(now, now, 8, &queue));
        assert_eq!(cc.window(), 202_000);
        assert_eq!(cc.random_loss.lost, without_queue);
    }

    #[test]
    fn losses_in_slow_start_are_not_taken_for_random_loss() {
        let start = Instant::now();
        let mut cc = Westwood::new(MTU, None);
        cc.window = 400_000;
        let now = lose_one_percent_without_a_queue(&mut cc, start);
        assert!(cc.on_congestion_event(now, now, 1, &path(RTT, 2 * RTT)));
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
        let mut cc = Westwood::new(MTU, None);
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), 2_000);
        cc.on_congestion_event(Instant::now(), Instant::now(), 1, &path(RTT, 2 * RTT));
        assert_eq!(cc.window(), 2_000, "never below the minimum");
    }

    #[test]
    fn random_loss_explains_a_round_trip_by_the_poisson_tail() {
        let one_percent = RandomLoss {
            lost: 100,
            outcomes: 10_000,
        };
        // A mean of 1.1 losses: five come once in 185 round trips, six
        // once in 1000.
        assert!(one_percent.explains(5, 110));
        assert!(!one_percent.explains(6, 110));
        // Past the Poisson range, the mean plus three deviations.
        assert!(one_percent.explains(129, 10_000));
        assert!(!one_percent.explains(131, 10_000));
        let lossless = RandomLoss::default();
        assert!(lossless.explains(0, 110));
        assert!(!lossless.explains(1, 110));
    }

    #[test]
    fn losses_just_after_slow_start_are_not_taken_for_random_loss() {
        let (mut cc, now) = delivering_steadily(200_000);
        cc.set_slow_start_threshold(now, cc.window);
        let no_queue = path(RTT, RTT);
        // Sent a round trip after slow start ended: its overshoot still.
        let later = now + RTT;
        assert!(!cc.on_congestion_event(later, later, 1, &no_queue));
        assert_eq!(cc.random_loss.lost, 0);
        let later = now + 3 * RTT;
        assert!(!cc.on_congestion_event(later, later, 1, &no_queue));
        assert_eq!(cc.random_loss.lost, 1);
    }

    #[test]
    fn a_timed_path_starts_with_its_round_trip_at_the_initial_pace() {
        // 14 720 bytes per 10 ms, at least RFC 9002's window, at most 100
        // packets.
        assert_eq!(Westwood::new(MTU, None).window(), 10_000);
        assert_eq!(
            Westwood::new(MTU, Some(Duration::from_millis(1))).window(),
            10_000
        );
        assert_eq!(
            Westwood::new(MTU, Some(Duration::from_millis(20))).window(),
            29_440
        );
        assert_eq!(
            Westwood::new(MTU, Some(Duration::from_millis(300))).window(),
            100_000
        );
    }

    #[test]
    fn initial_window_is_capped_for_large_datagrams() {
        assert_eq!(Westwood::new(1200, None).window(), 12_000);
        assert_eq!(Westwood::new(1500, None).window(), 14_720);
        assert_eq!(Westwood::new(9000, None).window(), 18_000);
    }
}
