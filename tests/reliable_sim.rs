//! End-to-end tests of the reliable channel over a hostile simulated network.
//!
//! Thousands of seeded scenarios (loss up to 30 %, reordering, duplication,
//! jitter, a bandwidth bottleneck with a drop-tail queue) check the channel's
//! contract: every message arrives exactly once, in order, intact; both sides
//! then go idle; a graceful close completes on both. Virtual time only, so a
//! scenario of minutes runs in milliseconds.
//!
//! Replay one scenario with `NATTER_SIM_SEED=<seed>`; change how many run
//! with `NATTER_SIM_SEEDS=<count>`.

#[path = "../benches/netsim/mod.rs"]
mod netsim;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use natter::reliable::{CloseReason, Config, Connection, Event, MessageId, SendError};
use netsim::{Link, LinkParams, Net};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const DEFAULT_SEEDS: u64 = 2000;
/// A scenario that has not finished by then is a failure, not a hang.
const VIRTUAL_TIME_LIMIT: Duration = Duration::from_secs(3600);
const STEP_LIMIT: u64 = 5_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closer {
    A,
    B,
    Both,
}

#[derive(Debug)]
struct Scenario {
    seed: u64,
    a_to_b: LinkParams,
    b_to_a: LinkParams,
    config: Config,
    /// Per side: (when the application sends it, the message).
    plans: [Vec<(Duration, Vec<u8>)>; 2],
    closer: Closer,
}

fn random_link(rng: &mut StdRng) -> LinkParams {
    LinkParams {
        loss: if rng.gen_bool(0.2) {
            0.0
        } else {
            rng.gen_range(0.0..0.3)
        },
        duplicate: rng.gen_range(0.0..0.05),
        reorder: rng.gen_range(0.0..0.1),
        delay: Duration::from_micros(rng.gen_range(0..50_000)),
        jitter: Duration::from_micros(rng.gen_range(0..10_000)),
        bandwidth: rng
            .gen_bool(0.7)
            .then(|| rng.gen_range(1_000_000..100_000_000) / 8),
        queue_bytes: rng.gen_range(4 * 1024..256 * 1024),
    }
}

fn random_message(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.gen_range(0..10) {
        0..=3 => rng.gen_range(0..64),
        4..=6 => rng.gen_range(64..4096),
        7..=8 => rng.gen_range(4096..32 * 1024),
        _ => rng.gen_range(32 * 1024..=100 * 1024),
    };
    let mut message = vec![0; len];
    rng.fill_bytes(&mut message);
    message
}

fn scenario(seed: u64) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed);
    let default_payload = Config::default().max_payload;
    let config = Config {
        // Mostly the real datagram size; sometimes a tiny one, which makes
        // every message many fragments and stresses ACK frame room.
        max_payload: if rng.gen_bool(0.1) {
            rng.gen_range(64..default_payload)
        } else {
            default_payload
        },
        max_message_size: 128 * 1024,
        send_buffer: rng.gen_range(16 * 1024..1024 * 1024),
        receive_window: rng.gen_range(128 * 1024 + 8..1024 * 1024),
        ..Config::default()
    };
    let plan = |rng: &mut StdRng| {
        let count = rng.gen_range(0..=12);
        let mut plan: Vec<(Duration, Vec<u8>)> = (0..count)
            .map(|_| {
                let at = Duration::from_micros(rng.gen_range(0..300_000));
                (at, random_message(rng))
            })
            .collect();
        plan.sort_by_key(|(at, _)| *at);
        plan
    };
    let plans = [plan(&mut rng), plan(&mut rng)];
    Scenario {
        seed,
        a_to_b: random_link(&mut rng),
        b_to_a: random_link(&mut rng),
        config,
        plans,
        closer: [Closer::A, Closer::B, Closer::Both][rng.gen_range(0..3)],
    }
}

/// One side's application: what it sends and what it checks.
#[derive(Default)]
struct App {
    next_to_send: usize,
    blocked: bool,
    received: usize,
    acknowledged: u64,
    closed: Vec<CloseReason>,
    timed_out: bool,
}

impl App {
    /// Sends every message due by `elapsed` that the buffer takes.
    fn send_due(
        &mut self,
        conn: &mut Connection,
        plan: &[(Duration, Vec<u8>)],
        elapsed: Duration,
    ) -> Result<(), String> {
        self.blocked = false;
        while let Some((at, message)) = plan.get(self.next_to_send) {
            if *at > elapsed {
                break;
            }
            match conn.send(message.clone()) {
                Ok(id) if id == MessageId(self.next_to_send as u64) => self.next_to_send += 1,
                Ok(id) => return Err(format!("message {} got {id:?}", self.next_to_send)),
                Err(SendError::WouldBlock) => {
                    self.blocked = true;
                    break;
                }
                Err(error) => return Err(format!("send failed: {error}")),
            }
        }
        Ok(())
    }

    fn next_send_time(&self, plan: &[(Duration, Vec<u8>)]) -> Option<Duration> {
        (!self.blocked)
            .then(|| plan.get(self.next_to_send).map(|(at, _)| *at))
            .flatten()
    }

    /// Takes every event, checking messages against what the peer sent.
    fn drain(
        &mut self,
        conn: &mut Connection,
        peer_plan: &[(Duration, Vec<u8>)],
    ) -> Result<(), String> {
        while let Some(event) = conn.poll_event() {
            match event {
                Event::Message(message) => {
                    let Some((_, expected)) = peer_plan.get(self.received) else {
                        return Err(format!("extra message of {} bytes", message.len()));
                    };
                    if message != *expected {
                        return Err(format!(
                            "message {} differs: {} bytes, expected {}",
                            self.received,
                            message.len(),
                            expected.len()
                        ));
                    }
                    self.received += 1;
                }
                Event::Acknowledged(MessageId(id)) => {
                    if id != self.acknowledged || id >= self.next_to_send as u64 {
                        return Err(format!(
                            "acknowledged {id}, expected {} (sent {})",
                            self.acknowledged, self.next_to_send
                        ));
                    }
                    self.acknowledged += 1;
                }
                Event::Closed { reason } => self.closed.push(reason),
                Event::TimedOut => self.timed_out = true,
            }
        }
        if self.timed_out {
            return Err("timed out".into());
        }
        Ok(())
    }

    fn all_done(&self, plan_len: usize, peer_plan_len: usize) -> bool {
        self.next_to_send == plan_len
            && self.acknowledged == plan_len as u64
            && self.received == peer_plan_len
    }
}

#[derive(Debug, Default)]
struct Outcome {
    virtual_time: Duration,
    packets_sent: u64,
    packets_lost: u64,
    packets_retransmitted: u64,
    ignored: u64,
    link_lost: u64,
    link_queue_drops: u64,
    link_duplicated: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Exchanging,
    Settling,
    Closing,
}

fn run(s: &Scenario) -> Result<Outcome, String> {
    let start = Instant::now();
    let mut net = Net {
        a: Connection::new(s.config.clone(), start),
        b: Connection::new(s.config.clone(), start),
        a_to_b: Link::new(s.a_to_b.clone(), s.seed ^ 0xa),
        b_to_a: Link::new(s.b_to_a.clone(), s.seed ^ 0xb),
        now: start,
    };
    let mut apps = [App::default(), App::default()];
    let [plan_a, plan_b] = &s.plans;
    let mut phase = Phase::Exchanging;
    for _ in 0..STEP_LIMIT {
        let elapsed = net.now - start;
        apps[0].send_due(&mut net.a, plan_a, elapsed)?;
        apps[1].send_due(&mut net.b, plan_b, elapsed)?;
        apps[0].drain(&mut net.a, plan_b)?;
        apps[1].drain(&mut net.b, plan_a)?;
        if phase == Phase::Exchanging
            && apps[0].all_done(plan_a.len(), plan_b.len())
            && apps[1].all_done(plan_b.len(), plan_a.len())
        {
            phase = Phase::Settling;
        }
        if phase == Phase::Settling && net.a.is_idle() && net.b.is_idle() {
            phase = Phase::Closing;
            if s.closer != Closer::B {
                net.a.close();
            }
            if s.closer != Closer::A {
                net.b.close();
            }
        }
        if phase != Phase::Closing && (net.a.is_closed() || net.b.is_closed()) {
            return Err(format!("closed early in phase {phase:?}"));
        }
        net.transmit();
        let next_send = [
            apps[0].next_send_time(plan_a),
            apps[1].next_send_time(plan_b),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|after| start + after);
        let Some(next) = [net.next_event(), next_send].into_iter().flatten().min() else {
            break;
        };
        if next - start > VIRTUAL_TIME_LIMIT {
            return Err(format!(
                "still running after {VIRTUAL_TIME_LIMIT:?} ({phase:?})"
            ));
        }
        net.advance_to(next);
    }
    if phase != Phase::Closing || net.next_event().is_some() {
        return Err(format!(
            "stopped in phase {phase:?} at {:?}",
            net.now - start
        ));
    }
    let expected = match s.closer {
        Closer::A => [CloseReason::Local, CloseReason::Peer],
        Closer::B => [CloseReason::Peer, CloseReason::Local],
        Closer::Both => [CloseReason::Local, CloseReason::Local],
    };
    for (app, reason) in apps.iter().zip(expected) {
        if app.closed != [reason] {
            return Err(format!(
                "close events {:?}, expected [{reason:?}]",
                app.closed
            ));
        }
    }
    if !net.a.is_closed() || !net.b.is_closed() {
        return Err("a side is not closed".into());
    }
    let (a, b) = (net.a.stats(), net.b.stats());
    Ok(Outcome {
        virtual_time: net.now - start,
        packets_sent: a.packets_sent + b.packets_sent,
        packets_lost: a.packets_lost + b.packets_lost,
        packets_retransmitted: a.packets_retransmitted + b.packets_retransmitted,
        ignored: a.duplicate_packets + b.duplicate_packets + a.stale_packets + b.stale_packets,
        link_lost: net.a_to_b.stats.lost + net.b_to_a.stats.lost,
        link_queue_drops: net.a_to_b.stats.queue_drops + net.b_to_a.stats.queue_drops,
        link_duplicated: net.a_to_b.stats.duplicated + net.b_to_a.stats.duplicated,
    })
}

fn run_reporting(seed: u64) -> Result<Outcome, String> {
    let s = scenario(seed);
    let result =
        catch_unwind(AssertUnwindSafe(|| run(&s))).unwrap_or_else(|_| Err("panicked".to_string()));
    result.map_err(|error| {
        let sizes = |plan: &[(Duration, Vec<u8>)]| plan.iter().map(|(_, m)| m.len()).collect::<Vec<_>>();
        format!(
            "seed {seed}: {error}\n  replay: NATTER_SIM_SEED={seed} cargo test -p natter --test reliable_sim\n  \
             a->b {:?}\n  b->a {:?}\n  config {:?}\n  sizes a {:?}\n  sizes b {:?}\n  closer {:?}",
            s.a_to_b,
            s.b_to_a,
            s.config,
            sizes(&s.plans[0]),
            sizes(&s.plans[1]),
            s.closer
        )
    })
}

#[test]
fn every_message_arrives_once_in_order_intact_across_hostile_networks() {
    let seeds: Vec<u64> = match std::env::var("NATTER_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("NATTER_SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("NATTER_SIM_SEEDS")
                .ok()
                .map_or(DEFAULT_SEEDS, |n| {
                    n.parse().expect("NATTER_SIM_SEEDS is a number")
                });
            (0..count).collect()
        }
    };
    let mut failures = Vec::new();
    let mut total = Outcome::default();
    for &seed in &seeds {
        match run_reporting(seed) {
            Ok(outcome) => {
                total.virtual_time = total.virtual_time.max(outcome.virtual_time);
                total.packets_sent += outcome.packets_sent;
                total.packets_lost += outcome.packets_lost;
                total.packets_retransmitted += outcome.packets_retransmitted;
                total.ignored += outcome.ignored;
                total.link_lost += outcome.link_lost;
                total.link_queue_drops += outcome.link_queue_drops;
                total.link_duplicated += outcome.link_duplicated;
            }
            Err(report) => {
                eprintln!("{report}");
                failures.push(seed);
                if failures.len() >= 5 {
                    break;
                }
            }
        }
    }
    eprintln!(
        "{} seeds: the network lost {}, queue-dropped {} and duplicated {} datagrams; \
         the channel sent {} packets, declared {} lost, retransmitted {}, ignored {} \
         duplicate or stale; longest scenario {:?} (virtual, incl. 60 s close linger)",
        seeds.len(),
        total.link_lost,
        total.link_queue_drops,
        total.link_duplicated,
        total.packets_sent,
        total.packets_lost,
        total.packets_retransmitted,
        total.ignored,
        total.virtual_time
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

fn lossy(loss: f64, delay_ms: u64) -> LinkParams {
    LinkParams {
        loss,
        reorder: 0.02,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(2),
        ..LinkParams::ideal()
    }
}

fn net(config: Config, a_to_b: LinkParams, b_to_a: LinkParams) -> (Net, Instant) {
    let start = Instant::now();
    let net = Net {
        a: Connection::new(config.clone(), start),
        b: Connection::new(config, start),
        a_to_b: Link::new(a_to_b, 1),
        b_to_a: Link::new(b_to_a, 2),
        now: start,
    };
    (net, start)
}

#[test]
fn a_receiver_that_stops_reading_caps_what_the_sender_sends_at_the_window() {
    let config = Config {
        max_message_size: 8 * 1024,
        receive_window: 64 * 1024,
        ..Config::default()
    };
    let (mut net, start) = net(config, lossy(0.05, 10), lossy(0.05, 10));
    let window = net.b.config().receive_window as u64;
    let messages: Vec<Vec<u8>> = (0..300u32).map(|i| vec![i as u8; 4000]).collect();
    for message in &messages {
        net.a.send(message.clone()).unwrap();
    }
    let mut received = Vec::new();
    let mut reading = false;
    for _ in 0..1_000_000 {
        // B's application reads nothing for the first 30 s.
        if !reading && net.now - start > Duration::from_secs(30) {
            let (a, b) = (net.a.stats(), net.b.stats());
            assert!(
                a.stream_sent > window * 3 / 4,
                "sender stalled early at {}",
                a.stream_sent
            );
            assert!(b.receive_buffered > window / 2);
            reading = true;
        }
        if reading {
            while let Some(event) = net.b.poll_event() {
                if let Event::Message(message) = event {
                    received.push(message);
                }
            }
        }
        while net.a.poll_event().is_some() {}
        let (a, b) = (net.a.stats(), net.b.stats());
        assert!(
            b.receive_buffered <= window,
            "receiver holds {}",
            b.receive_buffered
        );
        assert!(
            a.stream_sent - b.stream_consumed <= window,
            "sender is {} bytes past what the receiver took",
            a.stream_sent - b.stream_consumed
        );
        if received.len() == messages.len() {
            break;
        }
        net.transmit();
        let next = net.next_event().expect("connections keep timers");
        net.advance_to(next);
    }
    assert_eq!(received, messages);
}

#[test]
fn keepalive_holds_a_silent_connection_open_through_loss() {
    let (mut net, start) = net(Config::default(), lossy(0.2, 20), lossy(0.2, 20));
    net.a.send(b"hello".to_vec()).unwrap();
    while net.now - start < Duration::from_secs(3600) {
        while let Some(event) = net.a.poll_event() {
            assert!(!matches!(event, Event::TimedOut));
        }
        while let Some(event) = net.b.poll_event() {
            assert!(!matches!(event, Event::TimedOut));
        }
        net.transmit();
        let next = net.next_event().expect("connections keep timers");
        net.advance_to(next);
    }
    assert!(!net.a.is_closed() && !net.b.is_closed());
    // A keepalive every 15 s each way, plus its ACK and probes after losses.
    let sent = net.a.stats().packets_sent;
    assert!((240..=1000).contains(&sent), "{sent} packets in an hour");
}

#[test]
fn both_sides_time_out_when_the_path_dies() {
    let (mut net, start) = net(Config::default(), lossy(0.0, 20), lossy(0.0, 20));
    net.a.send(vec![1; 50_000]).unwrap();
    let mut a_timed_out = None;
    let mut b_timed_out = None;
    let mut path_died = None;
    for _ in 0..1_000_000 {
        while let Some(event) = net.a.poll_event() {
            if event == Event::TimedOut {
                a_timed_out = Some(net.now);
            }
        }
        while let Some(event) = net.b.poll_event() {
            if event == Event::TimedOut {
                b_timed_out = Some(net.now);
            }
        }
        if path_died.is_none() && net.now - start > Duration::from_millis(30) {
            // Mid-transfer, both directions go dark.
            net.a_to_b = Link::new(lossy(1.0, 20), 3);
            net.b_to_a = Link::new(lossy(1.0, 20), 4);
            path_died = Some(net.now);
        }
        net.transmit();
        let Some(next) = net.next_event() else {
            break;
        };
        net.advance_to(next);
    }
    let died = path_died.unwrap();
    for timed_out in [a_timed_out, b_timed_out] {
        let after = timed_out.expect("timed out") - died;
        assert!(after <= Duration::from_secs(60), "{after:?}");
        assert!(after >= Duration::from_secs(59), "{after:?}");
    }
    assert!(net.a.is_closed() && net.b.is_closed());
}

/// Encodes frames the way a peer would, independently of the crate's codec,
/// so the property tests can reach deep into the state machine.
mod forge {
    pub fn varint(out: &mut Vec<u8>, value: u64) {
        let value = value.min((1 << 62) - 1);
        match value {
            0..=0x3f => out.push(value as u8),
            0x40..=0x3fff => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
            0x4000..=0x3fff_ffff => {
                out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes())
            }
            _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
        }
    }

    #[derive(Debug, Clone)]
    pub enum Frame {
        Ping,
        Ack {
            largest: u64,
            first: u64,
            gaps: Vec<(u64, u64)>,
        },
        Stream {
            offset: u64,
            data: Vec<u8>,
        },
        MaxData(u64),
        Close(u64),
    }

    pub fn packet(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for frame in frames {
            match frame {
                Frame::Ping => out.push(1),
                Frame::Ack {
                    largest,
                    first,
                    gaps,
                } => {
                    out.push(2);
                    varint(&mut out, *largest);
                    varint(&mut out, 0);
                    varint(&mut out, gaps.len() as u64);
                    varint(&mut out, *first);
                    for (gap, len) in gaps {
                        varint(&mut out, *gap);
                        varint(&mut out, *len);
                    }
                }
                Frame::Stream { offset, data } => {
                    out.push(3);
                    varint(&mut out, *offset);
                    varint(&mut out, data.len() as u64);
                    out.extend_from_slice(data);
                }
                Frame::MaxData(limit) => {
                    out.push(4);
                    varint(&mut out, *limit);
                }
                Frame::Close(offset) => {
                    out.push(5);
                    varint(&mut out, *offset);
                }
            }
        }
        out
    }
}

const PROPTEST_WINDOW: usize = 32 * 1024;

fn small_window_connection(now: Instant) -> Connection {
    let mut conn = Connection::new(
        Config {
            max_message_size: 4 * 1024,
            receive_window: PROPTEST_WINDOW,
            ..Config::default()
        },
        now,
    );
    // Something in flight, so ACK frames have packets to acknowledge.
    for _ in 0..3 {
        conn.send(vec![7; 3000]).unwrap();
    }
    while conn.poll_transmit(now, conn.next_packet_number()).is_some() {}
    conn
}

fn frame_strategy() -> impl Strategy<Value = forge::Frame> {
    let window = PROPTEST_WINDOW as u64;
    prop_oneof![
        Just(forge::Frame::Ping),
        (
            0u64..12,
            0u64..12,
            proptest::collection::vec((0u64..4, 0u64..4), 0..4)
        )
            .prop_map(|(largest, first, gaps)| forge::Frame::Ack {
                largest,
                first,
                gaps
            }),
        (
            0..window + 2000,
            proptest::collection::vec(any::<u8>(), 0..1100)
        )
            .prop_map(|(offset, data)| forge::Frame::Stream { offset, data }),
        (0u64..u64::MAX).prop_map(forge::Frame::MaxData),
        (0..window * 2).prop_map(forge::Frame::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Failures print their input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_or_grow_state(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1300), 0..64)
    ) {
        let start = Instant::now();
        let mut conn = small_window_connection(start);
        for (i, datagram) in datagrams.iter().enumerate() {
            let now = start + Duration::from_millis(i as u64);
            conn.handle_datagram(now, i as u64, datagram);
            conn.handle_timeout(now);
            while let Some(payload) = conn.poll_transmit(now, conn.next_packet_number()) {
                prop_assert!(payload.len() <= conn.config().max_payload);
            }
            prop_assert!(conn.stats().receive_buffered <= conn.config().receive_window as u64);
        }
    }

    #[test]
    fn forged_packets_never_panic_or_exceed_the_window(
        packets in proptest::collection::vec(
            (0u64..200, proptest::collection::vec(frame_strategy(), 1..6)),
            1..80,
        ),
        read in any::<bool>(),
    ) {
        let start = Instant::now();
        let mut conn = small_window_connection(start);
        let window = conn.config().receive_window as u64;
        for (i, (number, frames)) in packets.iter().enumerate() {
            let now = start + Duration::from_millis(i as u64);
            conn.handle_datagram(now, *number, &forge::packet(frames));
            conn.handle_timeout(now);
            while conn.poll_transmit(now, conn.next_packet_number()).is_some() {}
            if read {
                while conn.poll_event().is_some() {}
            }
            let stats = conn.stats();
            prop_assert!(stats.receive_buffered <= window);
            prop_assert!(stats.send_buffered <= 3 * 3002);
        }
    }
}
