//! Figures for the reliable channel, through the simulated network.
//!
//! Run with `cargo bench --bench reliable`. Prints goodput (in memory, and
//! as a fraction of a 100 Mbit/s, 20 ms RTT link at several loss rates),
//! message latency under loss, bytes on the wire per byte delivered, and CPU
//! time per MiB. Everything runs in virtual time except the in-memory
//! transfers, whose wall-clock and CPU time are the point. The in-memory
//! transfer runs twice: as the bare channel, and with every datagram sealed
//! and opened as a session does, to show what encryption costs.

mod netsim;
mod quic_sim;

use std::time::{Duration, Instant};

use natter::reliable::{Config, Connection, Event, SendError, Stats};
use natter::seal::{DataCipher, Opener, Sealer};
use natter::wire::SealedKind;
use netsim::{Link, LinkParams, Net, UDP_IP_OVERHEAD, WIRE_OVERHEAD};
use quic_sim::Controller;

const MIB: u64 = 1024 * 1024;
/// Natter header plus the AEAD tag reserve, per datagram.
const NATTER_OVERHEAD: u64 = (natter::wire::DATA_HEADER_LEN + 16) as u64;

fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn net(a_to_b: LinkParams, b_to_a: LinkParams) -> Net {
    net_with(Config::default(), a_to_b, b_to_a, 0)
}

/// Two connections with `config` over the links; `seed` picks the links'
/// random losses.
fn net_with(config: Config, a_to_b: LinkParams, b_to_a: LinkParams, seed: u64) -> Net {
    let start = Instant::now();
    Net {
        a: Connection::new(config.clone(), start),
        b: Connection::new(config, start),
        a_to_b: Link::new(a_to_b, 0xa + 2 * seed),
        b_to_a: Link::new(b_to_a, 0xb + 2 * seed),
        now: start,
    }
}

struct Transfer {
    delivered: u64,
    virtual_time: Duration,
    wall_time: Duration,
    cpu_time: Duration,
    a: Stats,
    b: Stats,
}

impl Transfer {
    /// Channel payload bytes, both directions, per message byte delivered.
    fn payload_per_byte(&self) -> f64 {
        (self.a.bytes_sent + self.b.bytes_sent) as f64 / self.delivered as f64
    }

    /// The same with the natter header and AEAD tag of every datagram.
    fn datagram_per_byte(&self) -> f64 {
        let packets = self.a.packets_sent + self.b.packets_sent;
        (self.a.bytes_sent + self.b.bytes_sent + packets * NATTER_OVERHEAD) as f64
            / self.delivered as f64
    }
}

/// The session keys of both directions, as `link` holds them once the
/// handshake is done. Fixed keys: only the cost of sealing matters here.
struct Seals {
    a_sealer: Sealer,
    b_opener: Opener,
    b_sealer: Sealer,
    a_opener: Opener,
}

impl Seals {
    fn new(now: Instant, cipher: DataCipher) -> Self {
        const SESSION_ID: u64 = 0x5eed;
        Self {
            a_sealer: Sealer::new(now, SESSION_ID, cipher, [0xa; 32]),
            b_opener: Opener::new(cipher, [0xa; 32]),
            b_sealer: Sealer::new(now, SESSION_ID, cipher, [0xb; 32]),
            a_opener: Opener::new(cipher, [0xb; 32]),
        }
    }

    /// `Net::transmit`, sealing each payload into a data frame numbered as
    /// `link` numbers it.
    fn transmit(&mut self, net: &mut Net) {
        let sides = [
            (&mut net.a, &mut self.a_sealer, &mut net.a_to_b),
            (&mut net.b, &mut self.b_sealer, &mut net.b_to_a),
        ];
        for (conn, sealer, link) in sides {
            while let Some(payload) = conn.poll_transmit(net.now, sealer.next_sequence()) {
                let frame = sealer.seal(net.now, SealedKind::Data, &payload);
                link.send_sized(net.now, frame, UDP_IP_OVERHEAD);
            }
        }
    }

    /// `Net::advance_to`, opening each frame before the channel sees it.
    fn advance_to(&mut self, net: &mut Net, at: Instant) {
        net.now = net.now.max(at);
        let sides = [
            (&mut net.a_to_b, &mut self.b_opener, &mut net.b),
            (&mut net.b_to_a, &mut self.a_opener, &mut net.a),
        ];
        for (link, opener, conn) in sides {
            while let Some(frame) = link.pop_arrived(net.now) {
                let opened = opener.open(&frame).expect("an honest frame opens");
                conn.handle_datagram(net.now, opened.sequence, &opened.payload);
            }
        }
        for conn in [&mut net.a, &mut net.b] {
            if conn.poll_timeout().is_some_and(|t| t <= net.now) {
                conn.handle_timeout(net.now);
            }
        }
    }
}

/// Sends `total` bytes from A to B in messages of `message_size`, keeping
/// A's send buffer full and B's application reading. With `seals`, every
/// datagram is sealed and opened on its way, as between two sessions.
fn bulk(mut net: Net, total: u64, message_size: usize, mut seals: Option<Seals>) -> Transfer {
    let start = net.now;
    let wall = Instant::now();
    let cpu = process_cpu_time();
    let mut queued = 0;
    let mut delivered = 0;
    while delivered < total {
        while queued < total {
            let size = message_size.min((total - queued) as usize);
            match net.a.send(vec![0x5a; size]) {
                Ok(_) => queued += size as u64,
                Err(SendError::WouldBlock) => break,
                Err(error) => panic!("send failed: {error}"),
            }
        }
        while net.a.poll_event().is_some() {}
        while let Some(event) = net.b.poll_event() {
            if let Event::Message(message) = event {
                delivered += message.len() as u64;
            }
        }
        match &mut seals {
            Some(seals) => seals.transmit(&mut net),
            None => net.transmit(),
        }
        let next = net.next_event().expect("a transfer in progress has timers");
        assert!(next - start < Duration::from_secs(3600), "transfer stalled");
        match &mut seals {
            Some(seals) => seals.advance_to(&mut net, next),
            None => net.advance_to(next),
        }
    }
    Transfer {
        delivered,
        virtual_time: net.now - start,
        wall_time: wall.elapsed(),
        cpu_time: process_cpu_time() - cpu,
        a: net.a.stats(),
        b: net.b.stats(),
    }
}

/// The in-memory transfer again with every datagram sealed and opened, and
/// how it compares with `plain`, the same transfer unencrypted.
fn sealed_in_memory(plain: &Transfer, total: u64, cipher: DataCipher) {
    let net = net(LinkParams::ideal(), LinkParams::ideal());
    let seals = Seals::new(net.now, cipher);
    let sealed = bulk(net, total, 64 * 1024, Some(seals));
    let goodput = |t: &Transfer| t.delivered as f64 / MIB as f64 / t.wall_time.as_secs_f64();
    let cpu_per_mib = |t: &Transfer| t.cpu_time.as_secs_f64() * 1000.0 / (t.delivered / MIB) as f64;
    println!(
        "  sealed ({} per datagram, seal::Sealer/Opener, both directions): \
         goodput {:.0} MiB/s wall clock ({:.2} s), CPU {:.2} ms per MiB",
        cipher.name(),
        goodput(&sealed),
        sealed.wall_time.as_secs_f64(),
        cpu_per_mib(&sealed),
    );
    println!(
        "  encrypted/unencrypted goodput {:.0}/{:.0} MiB/s = {:.2} (goal >= 0.80); \
         CPU {:.2} vs {:.2} ms per MiB",
        goodput(&sealed),
        goodput(plain),
        goodput(&sealed) / goodput(plain),
        cpu_per_mib(&sealed),
        cpu_per_mib(plain),
    );
}

/// 100 Mbit/s each way, 10 ms one-way (20 ms RTT), a one-BDP drop-tail
/// queue, and random loss.
fn realistic(loss: f64) -> LinkParams {
    LinkParams {
        loss,
        delay: Duration::from_millis(10),
        bandwidth: Some(100_000_000 / 8),
        queue_bytes: 250_000,
        ..LinkParams::ideal()
    }
}

/// Runs per lossy delay case, each with its own losses; the table shows
/// the median.
const DELAY_CASE_SEEDS: u64 = 5;

/// The simulator's delay cases with a drop-tail queue of one
/// bandwidth-delay product.
fn delay_cases() {
    delay_table("one bandwidth-delay product", 1);
}

/// The delay cases again with a queue of 1/8 of the product (a shallow
/// switch buffer, a policer), which never shows in the round trips: the
/// bytes offered per byte delivered say what each stack does to such a
/// queue, and to whoever else uses it.
fn shallow_queue_cases() {
    delay_table("1/8 of the bandwidth-delay product", 8);
}

/// Natter beside quinn-proto (Cubic and BBR) on the same links: each way
/// `mbit` Mbit/s behind a drop-tail queue of 1/`queue_divisor` of the
/// bandwidth-delay product, `rtt` round trip, random `loss` each way.
fn delay_table(queue: &str, queue_divisor: u64) {
    let total = 16 * MIB;
    println!(
        "delay cases, {} MiB one way, queue of {queue}, beside quinn-proto \
         on the same simulated links (quinn timed from its handshake's end; lossy rows: median \
         of {DELAY_CASE_SEEDS} seeds):",
        total / MIB
    );
    println!(
        "  rate        RTT  loss   natter  quinn Cubic  quinn BBR  natter/best  (MB/s)  \
         wire/byte: natter  best quinn   lost pkts: natter  best quinn"
    );
    // Both at the datagram size their path MTU discovery reaches on an
    // Ethernet path: quinn's default upper bound, 1452 bytes, which natter's
    // discovery tries first.
    let path_mtu = Config {
        max_payload: natter::wire::MAX_PATH_DATAGRAM - NATTER_OVERHEAD as usize,
        ..Config::default()
    };
    for (mbit, rtt_ms) in [(10, 20), (10, 100), (100, 20), (100, 100)] {
        for loss in [0.0, 0.01] {
            let rtt = Duration::from_millis(rtt_ms);
            let rate = mbit * 1_000_000 / 8;
            let link = LinkParams {
                loss,
                delay: rtt / 2,
                bandwidth: Some(rate),
                queue_bytes: (rate as f64 * rtt.as_secs_f64()) as u64 / queue_divisor,
                ..LinkParams::ideal()
            };
            // One seed decides where the random losses fall, and at 1 % one
            // cut more or less moves a row by a tenth: the median of a few.
            let seeds = if loss > 0.0 { DELAY_CASE_SEEDS } else { 1 };
            // (MB/s, wire bytes per byte delivered, packets declared lost)
            // of the run with the median goodput.
            let median = |run: &dyn Fn(u64) -> (f64, f64, u64)| {
                let mut runs: Vec<(f64, f64, u64)> = (0..seeds).map(run).collect();
                runs.sort_by(|x, y| x.0.total_cmp(&y.0));
                runs[runs.len() / 2]
            };
            let natter = median(&|seed| {
                let link = link.clone();
                let mut net = net_with(path_mtu.clone(), link.clone(), link, seed);
                // quinn starts with its handshake's round trip: natter's
                // link seeds the channel with its punch's or handshake's.
                net.a.seed_rtt(rtt);
                net.b.seed_rtt(rtt);
                let t = bulk(net, total, 64 * 1024, None);
                let wire = t.a.bytes_sent + t.a.packets_sent * WIRE_OVERHEAD as u64;
                (
                    t.delivered as f64 / t.virtual_time.as_secs_f64() / 1e6,
                    wire as f64 / t.delivered as f64,
                    t.a.packets_lost,
                )
            });
            let quinn = |controller| {
                median(&|seed| {
                    let t = quic_sim::bulk(link.clone(), link.clone(), total, controller, seed);
                    (
                        total as f64 / t.time.as_secs_f64() / 1e6,
                        t.wire_bytes as f64 / total as f64,
                        t.lost_packets,
                    )
                })
            };
            let (cubic, bbr) = (quinn(Controller::Cubic), quinn(Controller::Bbr));
            let best = if cubic.0 >= bbr.0 { cubic } else { bbr };
            println!(
                "  {mbit:>3} Mbit/s {rtt_ms:>4} ms {:>4.0}%  {:>7.2}  {:>11.2}  {:>9.2}  {:>10.3}x  {:>11.4}  {:>10.4}  {:>17}  {:>10}",
                loss * 100.0,
                natter.0,
                cubic.0,
                bbr.0,
                natter.0 / best.0,
                natter.1,
                best.1,
                natter.2,
                best.2,
            );
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The benchmark's parts; `cargo bench --bench reliable -- delay latency`
/// runs only those named.
const SECTIONS: [(&str, fn()); 6] = [
    ("memory", in_memory),
    ("bulk", bulk_loss),
    ("delay", delay_cases),
    ("shallow", shallow_queue_cases),
    ("fairness", fairness),
    ("latency", latency_cases),
];

fn main() {
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    if let Some(unknown) = chosen
        .iter()
        .find(|name| SECTIONS.iter().all(|(section, _)| section != name))
    {
        let names: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
        eprintln!("unknown section {unknown:?}; the sections are {names:?}");
        std::process::exit(2);
    }
    println!("reliable channel benchmark (simulated network, virtual time unless noted)");
    println!("max payload {} bytes", Config::default().max_payload);
    println!();
    for (name, run) in SECTIONS {
        if chosen.is_empty() || chosen.iter().any(|c| c == name) {
            run();
            println!();
        }
    }
}

/// Goodput, wire bytes and CPU time of a lossless in-memory transfer,
/// bare and sealed.
fn in_memory() {
    let total = 256 * MIB;
    let t = bulk(
        net(LinkParams::ideal(), LinkParams::ideal()),
        total,
        64 * 1024,
        None,
    );
    println!(
        "in-memory transfer, {} MiB in 64 KiB messages, no loss:",
        total / MIB
    );
    println!(
        "  goodput {:.0} MiB/s wall clock ({:.2} s), CPU {:.2} ms per MiB (both ends, one thread)",
        t.delivered as f64 / MIB as f64 / t.wall_time.as_secs_f64(),
        t.wall_time.as_secs_f64(),
        t.cpu_time.as_secs_f64() * 1000.0 / (t.delivered / MIB) as f64,
    );
    println!(
        "  wire bytes per byte delivered: {:.4} (channel payload), {:.4} (with natter header + tag)",
        t.payload_per_byte(),
        t.datagram_per_byte()
    );
    println!(
        "  packets: {} data-side, {} ack-side",
        t.a.packets_sent, t.b.packets_sent
    );
    // Peers use AES-256-GCM when both have AES instructions
    // (seal::has_fast_aes), ChaCha20-Poly1305 otherwise.
    println!(
        "  this machine has fast AES: {}",
        natter::seal::has_fast_aes()
    );
    for cipher in [DataCipher::Aes256Gcm, DataCipher::ChaCha20Poly1305] {
        sealed_in_memory(&t, total, cipher);
    }
}

/// A bulk transfer over the realistic link at 0-10 % loss.
fn bulk_loss() {
    let link_rate = 100_000_000.0 / 8.0;
    let ceiling = 1160.0 / (Config::default().max_payload + WIRE_OVERHEAD) as f64;
    println!(
        "bulk transfer, 32 MiB, 100 Mbit/s, 20 ms RTT, 250 kB queue, loss both ways \
         (header ceiling {:.1} % of link):",
        ceiling * 100.0
    );
    println!("  loss   goodput  of link  wire/byte  lost pkts (reorder/time/spurious)  retx pkts  PTOs  cuts  final cwnd  srtt");
    for loss in [0.0, 0.01, 0.05, 0.10] {
        let t = bulk(
            net(realistic(loss), realistic(loss)),
            32 * MIB,
            64 * 1024,
            None,
        );
        let goodput = t.delivered as f64 / t.virtual_time.as_secs_f64();
        println!(
            "  {:>4.0}%  {:>6.2} MB/s  {:>5.1} %  {:>9.4}  {:>9} ({}/{}/{})  {:>9}  {:>4}  {:>4}  {:>10}  {:?}",
            loss * 100.0,
            goodput / 1e6,
            goodput / link_rate * 100.0,
            t.datagram_per_byte(),
            t.a.packets_lost,
            t.a.losses.by_reordering,
            t.a.losses.by_time,
            t.a.losses.spurious,
            t.a.packets_retransmitted,
            t.a.probe_timeouts,
            t.a.congestion_events,
            t.a.cwnd,
            t.a.smoothed_rtt,
        );
    }
}

/// Small-message latency over the realistic link at 0-5 % loss.
fn latency_cases() {
    let count = 10_000;
    println!(
        "latency, {count} messages of 100 bytes, one per ms, 20 ms RTT (one-way floor 0.5 RTT):"
    );
    println!(
        "  loss   p50 RTT  p90 RTT  p99 RTT  max RTT  wire/byte  data pkts  lost pkts  retx pkts"
    );
    for loss in [0.0, 0.01, 0.05] {
        latency(loss, count);
    }
}

/// Sends `count` small messages at a steady rate over the realistic link
/// with `loss` both ways, and prints send-to-delivery latency percentiles.
fn latency(loss: f64, count: usize) {
    let rtt = Duration::from_millis(20);
    let size = 100;
    let mut net = net(realistic(loss), realistic(loss));
    let start = net.now;
    let interval = Duration::from_millis(1);
    let mut sent_at = Vec::with_capacity(count);
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        let elapsed = net.now - start;
        while sent_at.len() < count && interval * sent_at.len() as u32 <= elapsed {
            let at = start + interval * sent_at.len() as u32;
            net.a.send(vec![0x42; size]).expect("small messages fit");
            sent_at.push(at);
        }
        while net.a.poll_event().is_some() {}
        while let Some(event) = net.b.poll_event() {
            if let Event::Message(_) = event {
                latencies.push(net.now - sent_at[latencies.len()]);
            }
        }
        net.transmit();
        let next_send = (sent_at.len() < count).then(|| start + interval * sent_at.len() as u32);
        let next = [net.next_event(), next_send]
            .into_iter()
            .flatten()
            .min()
            .expect("timers are set");
        net.advance_to(next);
    }
    let (a, b) = (net.a.stats(), net.b.stats());
    latencies.sort();
    let in_rtts = |d: Duration| d.as_secs_f64() / rtt.as_secs_f64();
    println!(
        "  {:>4.0}%  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>9.2}  {:>9}  {:>9}  {:>9}",
        loss * 100.0,
        in_rtts(percentile(&latencies, 0.5)),
        in_rtts(percentile(&latencies, 0.9)),
        in_rtts(percentile(&latencies, 0.99)),
        in_rtts(latencies[latencies.len() - 1]),
        (a.bytes_sent + b.bytes_sent) as f64 / (size * count) as f64,
        a.packets_sent,
        a.packets_lost,
        a.packets_retransmitted,
    );
}

/// Two bulk flows share one bottleneck each way (100 Mbit/s, 20 ms RTT, no
/// random loss, so they compete for the queue); the second starts 2 s after
/// the first. Prints each flow's
/// goodput over the last 20 s of a 30 s run and Jain's fairness index.
fn fairness() {
    let start = Instant::now();
    let mut senders = [
        Connection::new(Config::default(), start),
        Connection::new(Config::default(), start),
    ];
    let mut receivers = [
        Connection::new(Config::default(), start),
        Connection::new(Config::default(), start),
    ];
    // One link per direction carries both flows; a leading byte says which.
    let mut forward = Link::new(realistic(0.0), 0xf);
    let mut backward = Link::new(realistic(0.0), 0xba);
    let second_starts = start + Duration::from_secs(2);
    let measure_from = start + Duration::from_secs(10);
    let end = start + Duration::from_secs(30);
    let mut delivered = [0u64; 2];
    let mut now = start;
    while now < end {
        for flow in 0..2 {
            if flow == 1 && now < second_starts {
                continue;
            }
            while senders[flow].send(vec![0x33; 64 * 1024]).is_ok() {}
            while senders[flow].poll_event().is_some() {}
            while let Some(event) = receivers[flow].poll_event() {
                if let (Event::Message(message), true) = (event, now >= measure_from) {
                    delivered[flow] += message.len() as u64;
                }
            }
            // Each datagram starts with its flow's index.
            let ends = [
                (&mut senders[flow], &mut forward),
                (&mut receivers[flow], &mut backward),
            ];
            for (conn, link) in ends {
                loop {
                    let number = conn.next_packet_number();
                    let Some(mut payload) = conn.poll_transmit(now, number) else {
                        break;
                    };
                    payload.insert(0, flow as u8);
                    link.send_packet(now, number, &payload);
                }
            }
        }
        let next_start = (now < second_starts).then_some(second_starts);
        let next = [forward.next_arrival(), backward.next_arrival(), next_start]
            .into_iter()
            .chain(
                senders
                    .iter()
                    .chain(&receivers)
                    .map(Connection::poll_timeout),
            )
            .flatten()
            .min()
            .unwrap_or(end);
        now = next.max(now);
        while let Some((number, payload)) = forward.pop_arrived_packet(now) {
            receivers[usize::from(payload[0])].handle_datagram(now, number, &payload[1..]);
        }
        while let Some((number, payload)) = backward.pop_arrived_packet(now) {
            senders[usize::from(payload[0])].handle_datagram(now, number, &payload[1..]);
        }
        for conn in senders.iter_mut().chain(&mut receivers) {
            if conn.poll_timeout().is_some_and(|t| t <= now) {
                conn.handle_timeout(now);
            }
        }
    }
    let seconds = (end - measure_from).as_secs_f64();
    let rates = delivered.map(|bytes| bytes as f64 / seconds);
    let jain = (rates[0] + rates[1]).powi(2) / (2.0 * (rates[0].powi(2) + rates[1].powi(2)));
    println!("fairness, two bulk flows sharing 100 Mbit/s, 20 ms RTT, 250 kB queue, second starts at 2 s:");
    println!(
        "  flow 1 {:.2} MB/s, flow 2 {:.2} MB/s over 10..30 s; Jain index {:.3} (1 = fair)",
        rates[0] / 1e6,
        rates[1] / 1e6,
        jain
    );
}
