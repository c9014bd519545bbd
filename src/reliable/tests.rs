//! Connection-level unit tests: two connections over a perfect or lossy
//! wire with a fixed delay, in virtual time. The randomised, adversarial
//! network lives in `tests/reliable_sim.rs`.

// One-range lists of packet numbers are what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use super::*;

const MS: Duration = Duration::from_millis(1);

/// Decides whether a datagram is dropped: (sent by A, its index among that
/// side's datagrams, payload).
type DropRule = Box<dyn FnMut(bool, u64, &[u8]) -> bool>;

/// The next packet `conn` sends, numbered one past its last, as a sealer
/// with nothing else to seal would number it.
fn transmit(conn: &mut Connection, now: Instant) -> Option<(u64, Vec<u8>)> {
    let number = conn.next_packet_number();
    conn.poll_transmit(now, number)
        .map(|payload| (number, payload))
}

struct Pair {
    a: Connection,
    b: Connection,
    start: Instant,
    now: Instant,
    one_way: Duration,
    /// Datagrams in flight: arrival time, whether for B, packet number,
    /// payload.
    wire: VecDeque<(Instant, bool, u64, Vec<u8>)>,
    sent: [u64; 2],
    /// Numbers A skips before each packet, as if the link sealed that many
    /// frames of its own (path checks) in between.
    a_skips: u64,
    drop: DropRule,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
}

impl Pair {
    fn new(config: Config) -> Self {
        Self::with_configs(config.clone(), config)
    }

    fn with_configs(a: Config, b: Config) -> Self {
        let start = Instant::now();
        Self {
            a: Connection::new(a, start),
            b: Connection::new(b, start),
            start,
            now: start,
            one_way: 10 * MS,
            wire: VecDeque::new(),
            sent: [0, 0],
            a_skips: 0,
            drop: Box::new(|_, _, _| false),
            a_events: Vec::new(),
            b_events: Vec::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn pump(&mut self) {
        for from_a in [true, false] {
            loop {
                let (conn, skips) = if from_a {
                    (&mut self.a, self.a_skips)
                } else {
                    (&mut self.b, 0)
                };
                let number = conn.next_packet_number() + skips;
                let Some(payload) = conn.poll_transmit(self.now, number) else {
                    break;
                };
                assert!(payload.len() <= conn.config().max_payload);
                let index = &mut self.sent[usize::from(!from_a)];
                *index += 1;
                if !(self.drop)(from_a, *index - 1, &payload) {
                    self.wire
                        .push_back((self.now + self.one_way, from_a, number, payload));
                }
            }
        }
        while let Some(event) = self.a.poll_event() {
            self.a_events.push(event);
        }
        while let Some(event) = self.b.poll_event() {
            self.b_events.push(event);
        }
    }

    /// Runs until `done` holds or virtual time passes `limit`.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Pair) -> bool) {
        for _ in 0..1_000_000 {
            self.pump();
            if done(self) {
                return;
            }
            let next = [
                self.wire.front().map(|(at, ..)| *at),
                self.a.poll_timeout(),
                self.b.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(next) if next <= self.start + limit => self.now = self.now.max(next),
                _ => {
                    self.now = self.start + limit;
                    return;
                }
            }
            while self.wire.front().is_some_and(|(at, ..)| *at <= self.now) {
                let (_, to_b, number, payload) = self.wire.pop_front().unwrap();
                let conn = if to_b { &mut self.b } else { &mut self.a };
                conn.handle_datagram(self.now, number, &payload);
            }
            for conn in [&mut self.a, &mut self.b] {
                if conn.poll_timeout().is_some_and(|t| t <= self.now) {
                    conn.handle_timeout(self.now);
                }
            }
        }
        panic!("run_until did not settle");
    }

    fn messages(events: &[Event]) -> Vec<Vec<u8>> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    fn acknowledged(events: &[Event]) -> Vec<MessageId> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Acknowledged(id) => Some(*id),
                _ => None,
            })
            .collect()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn delivers_messages_in_order_both_ways() {
    let mut pair = Pair::new(Config::default());
    let sent_by_a = vec![
        pattern(10, 1),
        Vec::new(),
        pattern(100_000, 2),
        pattern(1, 3),
    ];
    let sent_by_b = vec![pattern(5000, 4), pattern(0, 5)];
    for m in &sent_by_a {
        pair.a.send(m.clone()).unwrap();
    }
    for m in &sent_by_b {
        pair.b.send(m.clone()).unwrap();
    }
    pair.run_until(Duration::from_secs(10), |p| p.a.is_idle() && p.b.is_idle());
    assert_eq!(Pair::messages(&pair.b_events), sent_by_a);
    assert_eq!(Pair::messages(&pair.a_events), sent_by_b);
    assert_eq!(
        Pair::acknowledged(&pair.a_events),
        (0..4).map(MessageId).collect::<Vec<_>>()
    );
    assert_eq!(
        Pair::acknowledged(&pair.b_events),
        vec![MessageId(0), MessageId(1)]
    );
    assert_eq!(pair.a.stats().packets_lost, 0);
    assert!(pair.a.stats().smoothed_rtt >= 20 * MS && pair.a.stats().smoothed_rtt < 30 * MS);
}

#[test]
fn packet_numbers_with_gaps_deliver_without_losses() {
    let mut pair = Pair::new(Config::default());
    pair.a_skips = 2;
    let sent = vec![pattern(300_000, 1), pattern(10, 2)];
    for m in &sent {
        pair.a.send(m.clone()).unwrap();
    }
    pair.run_until(Duration::from_secs(10), |p| p.a.is_idle() && p.b.is_idle());
    assert_eq!(Pair::messages(&pair.b_events), sent);
    let stats = pair.a.stats();
    assert!(stats.packets_sent > 200, "{stats:?}");
    assert_eq!(stats.packets_lost, 0);
    assert_eq!(pair.b.stats().duplicate_packets, 0);
}

#[test]
fn send_refuses_oversized_messages_a_full_buffer_and_after_close() {
    let config = Config {
        max_message_size: 1000,
        send_buffer: 1500,
        ..Config::default()
    };
    let mut conn = Connection::new(config, Instant::now());
    assert_eq!(
        conn.send(vec![0; 1001]),
        Err(SendError::TooLarge {
            len: 1001,
            max: 1000
        })
    );
    assert_eq!(conn.send(vec![0; 1000]), Ok(MessageId(0)));
    assert_eq!(conn.send_buffer_available(), 498);
    assert_eq!(conn.send(vec![0; 600]), Err(SendError::WouldBlock));
    assert_eq!(conn.send(vec![0; 400]), Ok(MessageId(1)));
    conn.close();
    assert_eq!(conn.send(Vec::new()), Err(SendError::Closed));
}

#[test]
fn a_lost_packet_is_retransmitted_fast_in_a_new_packet() {
    let mut pair = Pair::new(Config::default());
    pair.drop = Box::new(|from_a, index, _| from_a && index == 2);
    let message = pattern(20 * 1100, 7);
    pair.a.send(message.clone()).unwrap();
    pair.run_until(Duration::from_secs(10), |p| p.a.is_idle() && p.b.is_idle());
    assert_eq!(Pair::messages(&pair.b_events), vec![message]);
    let stats = pair.a.stats();
    assert_eq!(stats.packets_lost, 1);
    // The repeated bytes may spill into a second packet when the first also
    // carries an ACK frame.
    assert!((1..=2).contains(&stats.packets_retransmitted));
    assert_eq!(stats.packets_sent, pair.sent[0]);
    // Found by the packet threshold one round trip later, not by a timeout
    // (the first PTO would be a second away with the initial RTT).
    assert!(pair.elapsed() < 150 * MS, "took {:?}", pair.elapsed());
}

#[test]
fn a_small_message_may_use_the_windows_remainder_but_bulk_waits_for_a_full_packet() {
    let now = Instant::now();
    let mut a = Connection::new(Config::default(), now);
    // A message that leaves about half a packet of the initial window.
    let first = (a.stats().cwnd - a.config().max_payload as u64 / 2) as usize;
    a.send(vec![1; first]).unwrap();
    while transmit(&mut a, now).is_some() {}
    let stats = a.stats();
    let room = stats.cwnd - stats.bytes_in_flight;
    assert_eq!(
        stats.stream_sent,
        first as u64 + 2,
        "the first message went out whole"
    );
    assert!(
        room < a.config().max_payload as u64 && room > 200,
        "room {room}"
    );

    a.send(vec![2; 50]).unwrap();
    let (_, packet) = transmit(&mut a, now).expect("a small message fits the remainder");
    assert!(packet.len() as u64 <= room);
    a.send(vec![3; 5000]).unwrap();
    assert_eq!(
        transmit(&mut a, now),
        None,
        "bulk data waits for a full packet"
    );
}

#[test]
fn a_lost_tail_is_recovered_by_the_probe_timeout() {
    let mut pair = Pair::new(Config::default());
    // Lose the last (third) data packet of the message the first time.
    pair.drop = Box::new(|from_a, index, _| from_a && index == 2);
    let message = pattern(3 * 1100, 9);
    pair.a.send(message.clone()).unwrap();
    pair.run_until(Duration::from_secs(10), |p| !p.b_events.is_empty());
    assert_eq!(Pair::messages(&pair.b_events), vec![message]);
    assert_eq!(pair.a.stats().packets_retransmitted, 1);
    // Nothing after it to trigger fast retransmit: the time threshold or
    // the PTO (initial RTT 333 ms) must do it, within about one PTO.
    assert!(pair.elapsed() < 1200 * MS, "took {:?}", pair.elapsed());
}

/// The first flight's ACKs are lost: the probe that recovers it waits a
/// PTO of the round trip the path was measured at, not of the 333 ms guess.
#[test]
fn a_seeded_round_trip_times_the_first_probe() {
    // B answers the first flight's three packets with three datagrams.
    let first_acks_lost = |from_a: bool, index: u64, _: &[u8]| !from_a && index < 3;
    let message = pattern(3 * 1100, 4);
    let mut guessed = Pair::new(Config::default());
    guessed.drop = Box::new(first_acks_lost);
    guessed.a.send(message.clone()).unwrap();
    guessed.run_until(Duration::from_secs(10), |p| p.a.stats().probe_timeouts > 0);
    assert!(guessed.elapsed() > 900 * MS, "took {:?}", guessed.elapsed());

    let mut seeded = Pair::new(Config::default());
    seeded.drop = Box::new(first_acks_lost);
    seeded.a.seed_rtt(2 * seeded.one_way);
    seeded.a.send(message).unwrap();
    seeded.run_until(Duration::from_secs(10), |p| p.a.stats().probe_timeouts > 0);
    assert!(seeded.elapsed() < 100 * MS, "took {:?}", seeded.elapsed());
}

#[test]
fn a_new_path_starts_from_its_checked_round_trip_or_the_guess() {
    let mut pair = Pair::new(Config::default());
    pair.a.send(pattern(3 * 1100, 5)).unwrap();
    pair.run_until(Duration::from_secs(10), |p| p.a.is_idle());
    let measured = pair.a.stats().smoothed_rtt;
    assert!(measured < 30 * MS, "{measured:?}");
    let payload = pair.a.config().max_payload;

    pair.a.migrate(Migration::PortOnly, payload);
    assert_eq!(pair.a.stats().smoothed_rtt, measured);
    let checked = Duration::from_millis(45);
    pair.a
        .migrate(Migration::NewPath { rtt: Some(checked) }, payload);
    assert_eq!(pair.a.stats().smoothed_rtt, checked);
    pair.a.migrate(Migration::NewPath { rtt: None }, payload);
    assert_eq!(pair.a.stats().smoothed_rtt, Config::default().initial_rtt);
}

/// The handshake's round trip sizes the first window (the initial pace
/// over it) and times the first probe, but the minimum round trip is the
/// channel's own: full packets cross a slow link slower than the
/// handshake's small ones.
#[test]
fn a_seeded_round_trip_sizes_the_first_window_and_yields_the_minimum() {
    let mut pair = Pair::new(Config::default());
    let standard = pair.a.stats().cwnd;
    let handshake = 2 * pair.one_way - MS;
    pair.a.seed_rtt(handshake);
    assert!(pair.a.stats().cwnd > standard, "{}", pair.a.stats().cwnd);
    assert_eq!(pair.a.stats().min_rtt, handshake);
    pair.a.send(pattern(3 * 1100, 6)).unwrap();
    pair.run_until(Duration::from_secs(10), |p| p.a.is_idle());
    assert!(
        pair.a.stats().min_rtt > handshake,
        "{:?}",
        pair.a.stats().min_rtt
    );
}

#[test]
fn garbage_duplicates_and_bad_acks_are_counted_and_ignored() {
    let now = Instant::now();
    let mut a = Connection::new(Config::default(), now);
    let mut b = Connection::new(Config::default(), now);
    a.send(b"hi".to_vec()).unwrap();
    let (number, packet) = transmit(&mut a, now).unwrap();
    b.handle_datagram(now, number, &packet);
    b.handle_datagram(now, number, &packet);
    b.handle_datagram(now, 1, &[]);
    b.handle_datagram(now, 2, &[0xff; 40]);
    b.handle_datagram(now, u64::MAX, &packet);
    // An ACK for a packet B never sent.
    let mut bogus = Vec::new();
    packet::write_ack(&mut bogus, &[5..6], 0, 100);
    b.handle_datagram(now, 3, &bogus);
    let stats = b.stats();
    assert_eq!(stats.packets_received, 1);
    assert_eq!(stats.duplicate_packets, 1);
    assert_eq!(stats.malformed_packets, 4);
    assert_eq!(b.poll_event(), Some(Event::Message(b"hi".to_vec())));
    assert_eq!(b.poll_event(), None);
}

#[test]
fn stream_data_beyond_the_window_is_refused() {
    let now = Instant::now();
    let mut b = Connection::new(Config::default(), now);
    let mut hostile = Vec::new();
    // Before B's first MAX_DATA reaches it, the peer may only assume the
    // initial credit... but B enforces its own, larger, window.
    let window = b.config().receive_window as u64;
    packet::write_stream_header(&mut hostile, window, StreamEnd::Length(1));
    hostile.push(0);
    b.handle_datagram(now, 0, &hostile);
    assert_eq!(b.stats().malformed_packets, 1);
    assert_eq!(b.stats().receive_buffered, 0);
}

/// A deterministic coin for drop rules: true with probability `p`.
fn coin(seed: u64, p: f64) -> impl FnMut() -> bool {
    let mut state = seed | 1;
    move || {
        // xorshift64: plenty for picking which packets to drop.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[test]
fn ack_of_ack_keeps_the_receivers_ack_state_small() {
    // A receive window of about a hundred packets keeps no more in flight
    // (with about five of their numbers lost) however far the congestion
    // window grows.
    let mut pair = Pair::new(Config {
        max_message_size: 16 * 1024,
        receive_window: 128 * 1024,
        ..Config::default()
    });
    let mut lose = coin(7, 0.05);
    pair.drop = Box::new(move |_, _, _| lose());
    let messages: Vec<Vec<u8>> = (0..125).map(|i| pattern(16_000, i)).collect();
    for message in &messages {
        pair.a.send(message.clone()).unwrap();
    }
    let most_ranges = std::cell::Cell::new(0);
    pair.run_until(Duration::from_secs(120), |p| {
        most_ranges.set(most_ranges.get().max(p.b.ack.tracked_ranges()));
        p.b.is_idle() && p.a.is_idle()
    });
    let most_ranges = most_ranges.get();
    assert_eq!(Pair::messages(&pair.b_events), messages);
    assert!(pair.a.stats().packets_lost > 50, "the drop rule bit");
    // Every loss leaves a hole in the packet numbers; without ACK of ACK
    // the holes of the whole transfer would pile up to the 32-range cap and
    // stay. With it, only the holes of the packets in flight are tracked,
    // and none once
    // everything is acknowledged.
    assert!(
        most_ranges < ack::MAX_ACK_RANGES,
        "{most_ranges} ranges tracked at once"
    );
    assert!(pair.b.ack.tracked_ranges() <= 1);
}

#[test]
fn keepalive_pings_after_send_silence_and_keeps_the_peer_alive() {
    let mut pair = Pair::new(Config::default());
    pair.a.send(b"hello".to_vec()).unwrap();
    pair.run_until(Duration::from_secs(1), |p| p.a.is_idle() && p.b.is_idle());
    let idle_since = pair.elapsed();
    let before = pair.a.stats().packets_sent;
    // Only keepalive and idle timers remain.
    let timeout = pair.a.poll_timeout().unwrap() - pair.start;
    assert!(timeout > idle_since + Duration::from_secs(14));
    assert!(timeout <= idle_since + Duration::from_secs(15));
    pair.run_until(Duration::from_secs(200), |_| false);
    assert!(pair.a_events.iter().all(|e| !matches!(e, Event::TimedOut)));
    assert!(!pair.a.is_closed() && !pair.b.is_closed());
    // Roughly one PING each way every 15 s, each acknowledged.
    let pings = pair.a.stats().packets_sent - before;
    assert!((10..=30).contains(&pings), "{pings} packets");
}

#[test]
fn silence_from_the_peer_times_out() {
    let mut pair = Pair::new(Config::default());
    pair.a.send(b"hello".to_vec()).unwrap();
    pair.run_until(Duration::from_secs(1), |p| p.a.is_idle() && p.b.is_idle());
    let last_heard = pair.elapsed();
    // B vanishes: nothing it sends arrives any more.
    pair.drop = Box::new(|from_a, _, _| !from_a);
    pair.run_until(Duration::from_secs(300), |p| p.a.is_closed());
    assert_eq!(pair.a_events.last(), Some(&Event::TimedOut));
    assert_eq!(pair.elapsed(), last_heard + Duration::from_secs(60));
    assert_eq!(pair.a.poll_timeout(), None);
    assert_eq!(pair.a.send(Vec::new()), Err(SendError::Closed));
}

#[test]
fn graceful_close_delivers_everything_then_closes_both_sides() {
    let mut pair = Pair::new(Config::default());
    let from_a = pattern(30_000, 1);
    let from_b = pattern(50_000, 2);
    pair.a.send(from_a.clone()).unwrap();
    pair.b.send(from_b.clone()).unwrap();
    pair.a.close();
    pair.run_until(Duration::from_secs(120), |p| {
        p.a.poll_timeout().is_none() && p.b.poll_timeout().is_none()
    });
    assert_eq!(Pair::messages(&pair.b_events), vec![from_a]);
    assert_eq!(Pair::messages(&pair.a_events), vec![from_b]);
    assert_eq!(
        pair.a_events.last(),
        Some(&Event::Closed {
            reason: CloseReason::Local
        })
    );
    assert_eq!(
        pair.b_events.last(),
        Some(&Event::Closed {
            reason: CloseReason::Peer
        })
    );
    assert!(pair.a.is_closed() && pair.b.is_closed());
    assert_eq!(pair.b.send(Vec::new()), Err(SendError::Closed));
}

#[test]
fn close_survives_a_lost_final_ack() {
    let mut pair = Pair::new(Config::default());
    pair.a.close();
    // Drop every packet A sends once it has reported Closed... except that
    // the drop rule cannot see that, so drop A's packets after its third.
    pair.drop = Box::new(|from_a, index, _| from_a && (2..4).contains(&index));
    pair.run_until(Duration::from_secs(200), |p| {
        p.a.poll_timeout().is_none() && p.b.poll_timeout().is_none()
    });
    assert!(matches!(pair.a_events.last(), Some(Event::Closed { .. })));
    assert!(matches!(pair.b_events.last(), Some(Event::Closed { .. })));
}

#[test]
fn a_close_waiting_only_for_its_acknowledgement_says_since_when() {
    let mut pair = Pair::new(Config::default());
    pair.a.send(pattern(5_000, 3)).unwrap();
    assert_eq!(pair.a.close_unconfirmed_since(), None, "open");
    pair.a.close();
    assert_eq!(pair.a.close_unconfirmed_since(), None, "nothing sent yet");
    pair.run_until(Duration::from_secs(10), |p| p.b.close_sent_at.is_some());
    // A closes and leaves: nothing it sends arrives any more.
    pair.drop = Box::new(|from_a, _, _| from_a);
    pair.run_until(Duration::from_secs(5), |_| false);
    let since = pair
        .b
        .close_unconfirmed_since()
        .expect("only the ACK of B's CLOSE is missing");
    assert_eq!(Some(since), pair.b.close_sent_at);
    // The connection itself keeps waiting: the shell decides.
    assert!(pair
        .b_events
        .iter()
        .all(|e| !matches!(e, Event::Closed { .. })));
}

#[test]
fn a_drain_period_follows_a_graceful_close_only() {
    let mut pair = Pair::new(Config::default());
    assert_eq!(pair.a.drain_period(), None);
    pair.a.close();
    pair.run_until(Duration::from_secs(10), |p| {
        p.a_events.iter().any(|e| matches!(e, Event::Closed { .. }))
    });
    let drain = pair.a.drain_period().expect("draining after Closed");
    // Three probe periods: at least the 30 ms floor each.
    assert!(drain >= 3 * Config::default().min_pto, "{drain:?}");
    assert!(drain < Duration::from_secs(5), "{drain:?}");
}

#[test]
fn a_peer_announcing_an_oversized_message_is_abandoned() {
    let big = Config {
        max_message_size: 10_000,
        ..Config::default()
    };
    let small = Config {
        max_message_size: 100,
        ..Config::default()
    };
    let mut pair = Pair::with_configs(big, small);
    pair.a.send(vec![0; 5000]).unwrap();
    pair.run_until(Duration::from_secs(10), |p| p.b.is_closed());
    assert_eq!(
        pair.b_events,
        vec![Event::Closed {
            reason: CloseReason::PeerMessageTooLarge {
                len: 5000,
                max: 100
            }
        }]
    );
}

#[test]
fn timers_of_any_length_are_accepted() {
    let now = Instant::now();
    let config = Config {
        keepalive_interval: Duration::MAX,
        idle_timeout: Duration::MAX,
        max_message_size: usize::MAX,
        ..Config::default()
    };
    let mut conn = Connection::new(config, now);
    conn.send(vec![0; 10]).unwrap();
    while transmit(&mut conn, now).is_some() {}
    let later = now + Duration::from_secs(3600 * 24 * 365);
    conn.handle_timeout(later);
    assert!(!conn.is_closed(), "the idle timeout never fires");
    assert!(
        transmit(&mut conn, later).is_some(),
        "the probe timeout still does"
    );
}
