//! A rendezvous flooded from one address with many source ports, 50 000
//! datagrams a second of garbage and of valid Registers, while 20 honest
//! pairs of `natter pipe` connect from other addresses: every pair connects
//! and exchanges its data, the server's memory stays bounded, and no reply to
//! a flooding socket is larger than the smallest datagram that socket sent.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natter_rendezvous::{driver, Config, DropReason};
use natter_wire::{ClientMessage, FrameKind, Register, RoomCode, VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::pipe_peer::{runtime, Home, PipePeer, Stream};

const PAIRS: u8 = 20;
const FLOOD_PER_SECOND: u64 = 50_000;
const FLOOD_PORTS: usize = 1_000;
/// Each honest peer sends this much to the other.
const PAYLOAD: u64 = 4_096;
/// Allowed growth of this process's resident memory (the server runs in
/// it) over the flood.
const RSS_BOUND_KIB: u64 = 64 * 1024;

struct FloodReport {
    sent: u64,
    sent_bytes: u64,
    received: u64,
    received_bytes: u64,
    /// Replies larger than the smallest datagram their socket sent.
    oversized: Vec<(usize, usize)>,
    elapsed: Duration,
}

/// One address, many ports: half the sockets send garbage (some of it with
/// a natter header of another version, which earns a 2-byte notice), the
/// other half valid Registers for rooms of their own.
fn flood(target: SocketAddr, stop: Arc<AtomicBool>) -> FloodReport {
    let sockets: Vec<UdpSocket> = (0..FLOOD_PORTS)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            socket
        })
        .collect();
    let mut smallest_sent = vec![usize::MAX; FLOOD_PORTS];
    let mut rng = StdRng::seed_from_u64(0xf100d);
    let mut report = FloodReport {
        sent: 0,
        sent_bytes: 0,
        received: 0,
        received_bytes: 0,
        oversized: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let mut next = 0usize;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // Catch up to the rate every millisecond.
        let due = started.elapsed().as_micros() as u64 * FLOOD_PER_SECOND / 1_000_000;
        while report.sent < due {
            let index = next % FLOOD_PORTS;
            next += 1;
            let datagram = if index % 2 == 0 {
                garbage(&mut rng)
            } else {
                register(&mut rng)
            };
            if sockets[index].send_to(&datagram, target).is_ok() {
                smallest_sent[index] = smallest_sent[index].min(datagram.len());
                report.sent += 1;
                report.sent_bytes += datagram.len() as u64;
            } else {
                break;
            }
        }
        for (index, socket) in sockets.iter().enumerate() {
            while let Ok((len, _)) = socket.recv_from(&mut buf) {
                report.received += 1;
                report.received_bytes += len as u64;
                if len > smallest_sent[index] {
                    report.oversized.push((smallest_sent[index], len));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    report.elapsed = started.elapsed();
    report
}

fn garbage(rng: &mut StdRng) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..rng.gen_range(20..1200)).map(|_| rng.gen()).collect();
    if rng.gen_bool(0.3) {
        bytes[0] = FrameKind::ToServer as u8;
        bytes[1] = VERSION + 1;
    }
    bytes
}

fn register(rng: &mut StdRng) -> Vec<u8> {
    let room: Vec<u8> = (0..16).map(|_| rng.gen()).collect();
    ClientMessage::Register(Register {
        room: RoomCode::new(room).unwrap(),
        host_candidates: vec![],
        client_nonce: rng.gen(),
        peer_token: None,
        claim: false,
        cookie: None,
        nat: None,
        mapped: None,
        rejoin: None,
    })
    .encode()
    .unwrap()
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn honest_pairs_connect_through_a_flood_from_one_address_with_many_ports() {
    let runtime = runtime();
    // Under load well within the flood, so the honest peers must prove
    // their addresses with cookies to get in.
    let config = Config {
        load_threshold: 20_000.0,
        ..Config::default()
    };
    let server = runtime
        .block_on(async { driver::start(&["127.0.0.1:0".parse().unwrap()], config) })
        .unwrap();
    let target = server.local_addrs[0];
    let rss_before = resident_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = std::thread::spawn({
        let stop = stop.clone();
        move || flood(target, stop)
    });
    // Let the flood put the server under load before anyone honest comes.
    std::thread::sleep(Duration::from_secs(2));

    let rendezvous = target.to_string();
    let homes: Vec<(Home, Home)> = (0..PAIRS)
        .map(|i| {
            (
                Home::new(&format!("flood-a{i}")),
                Home::new(&format!("flood-b{i}")),
            )
        })
        .collect();
    let pairs: Vec<(PipePeer, PipePeer)> = homes
        .iter()
        .enumerate()
        .map(|(i, (home_a, home_b))| {
            // A nameplate of its own per pair: random ones collide (20 of
            // 999: one run in six), and two pairs would meet in one room.
            let code = format!("{}-flood-{:x}", i + 1, rand::random::<u64>());
            let seed = 2 * i as u64;
            let peer = |home, seed, side| {
                let bind = format!("127.0.{side}.{}:0", i + 1);
                PipePeer::start_with(
                    &rendezvous,
                    &code,
                    home,
                    seed,
                    PAYLOAD,
                    None,
                    &["--bind", &bind],
                )
            };
            (peer(home_a, seed + 1, 1), peer(home_b, seed + 2, 2))
        })
        .collect();

    let mut connect_ms = Vec::new();
    let mut rss_peak = 0;
    for (a, b) in &pairs {
        for peer in [a, b] {
            let connected = peer.wait_event("connected", Duration::from_secs(60));
            connect_ms.push(connected["elapsed_ms"].as_u64().unwrap());
            rss_peak = rss_peak.max(resident_kib());
        }
    }
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        let seed = 2 * i as u64;
        let (a_exit, a_len, a_hash) = a.finish(Duration::from_secs(30));
        let (b_exit, b_len, b_hash) = b.finish(Duration::from_secs(30));
        assert_eq!((a_exit, b_exit), (0, 0), "pair {i}");
        assert_eq!((a_len, a_hash), (PAYLOAD, Stream::hash(seed + 2, PAYLOAD)));
        assert_eq!((b_len, b_hash), (PAYLOAD, Stream::hash(seed + 1, PAYLOAD)));
    }
    stop.store(true, Ordering::Relaxed);
    let report = flooder.join().unwrap();
    rss_peak = rss_peak.max(resident_kib());
    let stats = runtime.block_on(server.shutdown()).unwrap();

    connect_ms.sort_unstable();
    let rate = report.sent as f64 / report.elapsed.as_secs_f64();
    println!(
        "flood: {} datagrams in {:.1} s ({rate:.0}/s, {} bytes) from {FLOOD_PORTS} ports; {} replies ({} bytes)",
        report.sent,
        report.elapsed.as_secs_f64(),
        report.sent_bytes,
        report.received,
        report.received_bytes,
    );
    println!(
        "{} honest peers connected: p50 {} ms, max {} ms; RSS growth {} KiB",
        connect_ms.len(),
        connect_ms[connect_ms.len() / 2],
        connect_ms[connect_ms.len() - 1],
        rss_peak.saturating_sub(rss_before),
    );
    println!("server: {stats}");

    assert!(
        report.oversized.is_empty(),
        "replies larger than their socket's smallest request (smallest sent, reply): {:?}",
        &report.oversized[..report.oversized.len().min(10)]
    );
    assert!(report.received_bytes <= report.sent_bytes);
    assert!(
        rate > FLOOD_PER_SECOND as f64 * 0.8,
        "the flood ran at only {rate:.0}/s"
    );
    assert!(stats.dropped(DropReason::UnderLoad) > 0, "{stats}");
    assert!(stats.busy_replies > 0, "{stats}");
    assert!(
        rss_peak.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew by {} KiB",
        rss_peak - rss_before
    );
}
