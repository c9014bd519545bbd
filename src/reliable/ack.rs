//! Selective acknowledgement: the range set, and what the receiver owes.
//!
//! [`RangeSet`] is the one data structure for "which numbers have we seen":
//! packet numbers received (for ACK frames) and, on the send side, stream
//! bytes acknowledged or waiting for retransmission.
//!
//! [`AckTracker`] decides what to acknowledge and when. Its state is bounded:
//! at most [`MAX_ACK_RANGES`] ranges, and everything below a floor is
//! forgotten, either because the peer confirmed it saw an ACK covering it (ACK
//! of ACK) or because the range count overflowed. A packet below the floor is
//! indistinguishable from a duplicate and is ignored: if it was genuinely new
//! the sender never sees it acked and retransmits its data in a new packet.

use std::ops::Range;
use std::time::{Duration, Instant};

/// Most packet-number ranges the receiver keeps. An ACK frame of this many
/// ranges still fits any payload (at most 16 bytes a range), and 32 holes
/// inside one flight is already a pathological path.
pub(crate) const MAX_ACK_RANGES: usize = 32;

/// Ack-eliciting packets received before an ACK is sent at once (RFC 9000
/// §13.2.2's recommendation).
const ACK_ELICITING_THRESHOLD: u32 = 2;

/// A set of `u64` held as sorted, disjoint, non-adjacent half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    /// Adds `range`; returns whether any of it was new.
    pub fn insert(&mut self, range: Range<u64>) -> bool {
        if range.is_empty() {
            return false;
        }
        // First range that ends at or after our start (touching ones merge).
        let first = self.ranges.partition_point(|r| r.end < range.start);
        let mut last = first;
        let (mut start, mut end) = (range.start, range.end);
        while last < self.ranges.len() && self.ranges[last].start <= range.end {
            start = start.min(self.ranges[last].start);
            end = end.max(self.ranges[last].end);
            last += 1;
        }
        let already_covered = last == first + 1
            && self.ranges[first].start <= range.start
            && self.ranges[first].end >= range.end;
        self.ranges.splice(first..last, std::iter::once(start..end));
        !already_covered
    }

    /// Removes every value in `range`.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let first = self.ranges.partition_point(|r| r.end <= range.start);
        let mut last = first;
        while last < self.ranges.len() && self.ranges[last].start < range.end {
            last += 1;
        }
        if first == last {
            return;
        }
        let head = self.ranges[first].start..range.start;
        let tail = range.end..self.ranges[last - 1].end;
        let keep = [head, tail].into_iter().filter(|r| !r.is_empty());
        self.ranges.splice(first..last, keep);
    }

    /// Removes every value below `floor`.
    pub fn remove_below(&mut self, floor: u64) {
        self.remove(0..floor);
    }

    pub fn contains(&self, value: u64) -> bool {
        let index = self.ranges.partition_point(|r| r.end <= value);
        self.ranges.get(index).is_some_and(|r| r.start <= value)
    }

    pub fn first(&self) -> Option<&Range<u64>> {
        self.ranges.first()
    }

    pub fn pop_first(&mut self) -> Option<Range<u64>> {
        (!self.ranges.is_empty()).then(|| self.ranges.remove(0))
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Range<u64>> + '_ {
        self.ranges.iter()
    }

    /// The parts of `range` this set does not cover, in order.
    pub fn gaps_within(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut cursor = range.start;
        let first = self.ranges.partition_point(|r| r.end <= range.start);
        for covered in &self.ranges[first..] {
            if covered.start >= range.end {
                break;
            }
            if covered.start > cursor {
                gaps.push(cursor..covered.start);
            }
            cursor = cursor.max(covered.end);
        }
        if cursor < range.end {
            gaps.push(cursor..range.end);
        }
        gaps
    }
}

/// How a received packet number relates to what was received before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    New,
    /// Received before and still tracked.
    Duplicate,
    /// Below the floor: forgotten, so treated as already seen.
    Stale,
}

/// The receiver's acknowledgement duty: which packets to report and when.
#[derive(Debug)]
pub(crate) struct AckTracker {
    received: RangeSet,
    /// Packet numbers below this are forgotten.
    floor: u64,
    /// Largest packet number received and when it arrived (for ACK delay).
    largest: Option<(u64, Instant)>,
    /// Ack-eliciting packets received since the last ACK was sent.
    unacked_eliciting: u32,
    /// An ACK must go out with the next packet.
    immediate: bool,
    /// A delayed ACK is due at this time.
    deadline: Option<Instant>,
    /// Anything received since the last ACK, worth piggybacking.
    news: bool,
    /// An ack-eliciting packet arrived out of order since the last ACK:
    /// the sender's loss detection waits for the ACK that shows the hole.
    hole: bool,
    max_ack_delay: Duration,
}

impl AckTracker {
    pub fn new(max_ack_delay: Duration) -> Self {
        Self {
            received: RangeSet::default(),
            floor: 0,
            largest: None,
            unacked_eliciting: 0,
            immediate: false,
            deadline: None,
            news: false,
            hole: false,
            max_ack_delay,
        }
    }

    pub fn classify(&self, number: u64) -> Arrival {
        if number < self.floor {
            Arrival::Stale
        } else if self.received.contains(number) {
            Arrival::Duplicate
        } else {
            Arrival::New
        }
    }

    /// Records a new packet. `urgent` asks for an immediate ACK (e.g. CLOSE).
    pub fn on_packet(&mut self, number: u64, ack_eliciting: bool, urgent: bool, now: Instant) {
        // Out of order: it fills a hole, or it opens one above the largest.
        let out_of_order = self
            .largest
            .is_some_and(|(largest, _)| number != largest + 1);
        self.received.insert(number..number + 1);
        if self.received.len() > MAX_ACK_RANGES {
            if let Some(lowest) = self.received.pop_first() {
                self.floor = lowest.end;
            }
        }
        if self.largest.is_none_or(|(largest, _)| number > largest) {
            self.largest = Some((number, now));
        }
        self.news = true;
        if !ack_eliciting {
            return;
        }
        self.hole |= out_of_order;
        self.unacked_eliciting += 1;
        if urgent || out_of_order || self.unacked_eliciting >= ACK_ELICITING_THRESHOLD {
            self.immediate = true;
        } else if self.deadline.is_none() {
            self.deadline = Some(now + self.max_ack_delay);
        }
    }

    /// Whether an ACK must be sent now, even alone in a packet.
    pub fn is_due(&self, now: Instant) -> bool {
        self.immediate || self.deadline.is_some_and(|d| d <= now)
    }

    /// Whether the ACK owed shows a hole or its filling.
    pub fn shows_a_hole(&self) -> bool {
        self.hole
    }

    /// Whether an ACK is worth adding to a packet that goes out anyway.
    pub fn has_news(&self) -> bool {
        self.news && !self.received.is_empty()
    }

    /// Whether an ACK is owed, now or later.
    pub fn is_pending(&self) -> bool {
        self.immediate || self.deadline.is_some()
    }

    pub fn timer(&self) -> Option<Instant> {
        self.deadline
    }

    /// Most bytes the next ACK frame can take: a header of four varints,
    /// then two per further range.
    pub fn frame_size_bound(&self) -> usize {
        let varint = super::packet::MAX_VARINT_LEN;
        1 + 4 * varint + 2 * varint * self.received.len().saturating_sub(1)
    }

    /// Appends an ACK frame within `room` bytes. Returns the largest packet
    /// number it acknowledges, or None if there is nothing to acknowledge or
    /// it did not fit. The duty is discharged either way: a tracker with
    /// nothing left to report owes nothing.
    pub fn write(&mut self, out: &mut Vec<u8>, now: Instant, room: usize) -> Option<u64> {
        let (largest_number, received_at) = self.largest?;
        let ranges: Vec<Range<u64>> = self.received.iter().rev().cloned().collect();
        let delay = now.saturating_duration_since(received_at);
        // The delay is measured from the largest packet, which a floor raise
        // may have dropped; it is then only an overestimate, and harmless.
        let delay_micros = if ranges.first().is_some_and(|r| r.end == largest_number + 1) {
            u64::try_from(delay.as_micros()).unwrap_or(u64::MAX)
        } else {
            0
        };
        let written =
            !ranges.is_empty() && super::packet::write_ack(out, &ranges, delay_micros, room);
        if written || ranges.is_empty() {
            self.immediate = false;
            self.deadline = None;
            self.unacked_eliciting = 0;
            self.news = false;
            self.hole = false;
        }
        written.then(|| ranges[0].end - 1)
    }

    /// The peer has seen an ACK whose largest was `largest`: stop reporting
    /// everything up to it.
    pub fn forget_through(&mut self, largest: u64) {
        if largest >= self.floor {
            self.floor = largest + 1;
            self.received.remove_below(self.floor);
        }
    }

    #[cfg(test)]
    pub(crate) fn tracked_ranges(&self) -> usize {
        self.received.len()
    }
}

#[cfg(test)]
// One-range lists of packet numbers are what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::reliable::packet::{decode, Frame};

    fn set(ranges: &[Range<u64>]) -> RangeSet {
        let mut set = RangeSet::default();
        for r in ranges {
            set.insert(r.clone());
        }
        set
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let mut s = set(&[0..2, 5..7, 10..12]);
        assert!(s.insert(2..5));
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), vec![0..7, 10..12]);
        assert!(!s.insert(1..6));
        assert!(s.insert(6..20));
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), vec![0..20]);
        assert!(!s.insert(3..3));
    }

    #[test]
    fn remove_splits_and_trims() {
        let mut s = set(&[0..10, 20..30]);
        s.remove(5..25);
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), vec![0..5, 25..30]);
        s.remove(2..3);
        assert_eq!(
            s.iter().cloned().collect::<Vec<_>>(),
            vec![0..2, 3..5, 25..30]
        );
        s.remove_below(4);
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), vec![4..5, 25..30]);
        assert!(s.contains(4) && !s.contains(5) && s.contains(29) && !s.contains(30));
    }

    #[test]
    fn gaps_within_lists_uncovered_parts() {
        let s = set(&[5..10, 15..20]);
        assert_eq!(s.gaps_within(0..30), vec![0..5, 10..15, 20..30]);
        assert_eq!(s.gaps_within(6..9), Vec::<Range<u64>>::new());
        assert_eq!(s.gaps_within(8..16), vec![10..15]);
    }

    fn ack_of(tracker: &mut AckTracker, now: Instant) -> Option<Vec<Range<u64>>> {
        let mut out = Vec::new();
        tracker.write(&mut out, now, 1000)?;
        match decode(&out).unwrap().remove(0) {
            Frame::Ack(ack) => Some(ack.ranges),
            other => panic!("expected ACK, got {other:?}"),
        }
    }

    #[test]
    fn acks_every_second_eliciting_packet_or_after_the_delay() {
        let now = Instant::now();
        let mut t = AckTracker::new(Duration::from_millis(5));
        t.on_packet(0, true, false, now);
        assert!(!t.is_due(now));
        assert_eq!(t.timer(), Some(now + Duration::from_millis(5)));
        assert!(t.is_due(now + Duration::from_millis(5)));
        t.on_packet(1, true, false, now);
        assert!(t.is_due(now));
        assert_eq!(ack_of(&mut t, now), Some(vec![0..2]));
        assert!(!t.is_pending());
        // An ACK-only packet is acknowledged only in passing.
        t.on_packet(2, false, false, now);
        assert!(!t.is_pending() && t.has_news());
    }

    #[test]
    fn an_ack_owed_for_a_hole_says_so_until_it_is_written() {
        let now = Instant::now();
        let mut t = AckTracker::new(Duration::from_millis(5));
        t.on_packet(0, true, false, now);
        t.on_packet(1, true, false, now);
        assert!(!t.shows_a_hole(), "in order");
        t.on_packet(3, false, false, now);
        assert!(
            !t.shows_a_hole(),
            "an ACK-only packet is not acknowledged alone"
        );
        t.on_packet(5, true, false, now);
        assert!(t.shows_a_hole());
        ack_of(&mut t, now);
        assert!(!t.shows_a_hole());
    }

    #[test]
    fn out_of_order_packets_are_acked_at_once() {
        let now = Instant::now();
        let mut t = AckTracker::new(Duration::from_millis(5));
        t.on_packet(0, true, false, now);
        ack_of(&mut t, now);
        t.on_packet(2, true, false, now);
        assert!(t.is_due(now), "a hole opened");
        assert_eq!(ack_of(&mut t, now), Some(vec![2..3, 0..1]));
        t.on_packet(1, true, false, now);
        assert!(t.is_due(now), "a hole filled");
        assert_eq!(t.classify(1), Arrival::Duplicate);
    }

    #[test]
    fn state_stays_bounded_and_forgets_what_the_peer_saw() {
        let now = Instant::now();
        let mut t = AckTracker::new(Duration::from_millis(5));
        for n in 0..200 {
            t.on_packet(n * 2, true, false, now);
        }
        assert_eq!(t.tracked_ranges(), MAX_ACK_RANGES);
        assert_eq!(t.classify(0), Arrival::Stale);
        assert_eq!(t.classify(398), Arrival::Duplicate);
        assert_eq!(t.classify(399), Arrival::New);
        t.forget_through(390);
        assert_eq!(t.tracked_ranges(), 4);
        assert_eq!(t.classify(389), Arrival::Stale);
        assert_eq!(ack_of(&mut t, now).unwrap().len(), 4);
        t.forget_through(398);
        assert_eq!(ack_of(&mut t, now), None);
        assert!(!t.is_pending());
    }
}
