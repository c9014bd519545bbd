//! Rendezvous throughput and memory, printed as figures.
//!
//! `cargo bench -p natter-rendezvous` measures the sans-IO core on one core
//! (STUN responses/s, registrations/s, bytes per registered peer at 100 000
//! peers) and the whole server over loopback UDP (STUN responses/s).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use natter_rendezvous::rate_limit::RateLimit;
use natter_rendezvous::{driver, Config, Server};
use natter_wire::{
    stun, ClientMessage, Register, RelayRequest, RoomCode, ServerMessage, MAX_DATAGRAM,
    RELAY_HEADER_LEN,
};

/// Counts live heap bytes, to measure memory per registered peer.
struct CountingAllocator;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const PEERS: u32 = 100_000;

fn source(i: u32) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(0xC633_0000 + i),
        40_000 + (i % 20_000) as u16,
    ))
}

fn unlimited() -> Config {
    Config {
        max_peers: PEERS as usize,
        rate_limit: RateLimit::unlimited(65_536),
        address_rate_limit: RateLimit::unlimited(65_536),
        load_threshold: f32::MAX,
        ..Config::default()
    }
}

fn register(i: u32) -> Vec<u8> {
    ClientMessage::Register(Register {
        room: RoomCode::new(format!("{}-room-word", i / 2)).unwrap(),
        host_candidates: vec![SocketAddr::from(([192, 168, 1, (i % 250) as u8], 40_000))],
        client_nonce: u64::from(i),
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

fn core_stun() {
    let mut server = Server::with_seed(unlimited(), 1);
    let requests: Vec<_> = (0..1024)
        .map(|i| stun::binding_request(stun::TransactionId::new([i as u8; 12])))
        .collect();
    let now = Instant::now();
    let rounds = 1_000_000;
    let start = Instant::now();
    for i in 0..rounds {
        server.handle_datagram(now, 0, source(i % 50_000), &requests[i as usize % 1024]);
        std::hint::black_box(server.poll_transmit());
    }
    let elapsed = start.elapsed();
    println!(
        "core  STUN Binding responses: {:>10.0}/s  ({rounds} requests from 50 000 sources, one core)",
        f64::from(rounds) / elapsed.as_secs_f64()
    );
}

fn core_registrations_and_memory() {
    let datagrams: Vec<_> = (0..PEERS).map(register).collect();
    let baseline = LIVE_BYTES.load(Ordering::Relaxed);
    let mut server = Server::with_seed(unlimited(), 1);
    let now = Instant::now();
    let start = Instant::now();
    for (i, datagram) in datagrams.iter().enumerate() {
        server.handle_datagram(now, 0, source(i as u32), datagram);
        while let Some(transmit) = server.poll_transmit() {
            std::hint::black_box(transmit);
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(server.peers(), PEERS as usize);
    println!(
        "core  registrations:          {:>10.0}/s  ({PEERS} peers in {} rooms, each pair introduced)",
        f64::from(PEERS) / elapsed.as_secs_f64(),
        server.rooms()
    );
    // The rate limiter tracks sources too; count only room state by
    // subtracting a server that saw the same sources send STUN.
    let with_peers = LIVE_BYTES.load(Ordering::Relaxed) - baseline;
    let mut limiter_only = Server::with_seed(unlimited(), 1);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let request = stun::binding_request(stun::TransactionId::new([0; 12]));
    for i in 0..PEERS {
        limiter_only.handle_datagram(now, 0, source(i), &request);
        limiter_only.poll_transmit();
    }
    let limiter_bytes = LIVE_BYTES.load(Ordering::Relaxed) - before;
    println!(
        "core  memory per peer:        {:>10} bytes (room state; plus {} bytes per source in the rate limiter, capped at 65 536 sources)",
        (with_peers - limiter_bytes) / PEERS as usize,
        limiter_bytes / 65_536
    );
    drop(server);
}

/// Two registered peers relaying full frames to each other through the
/// state machine: the per-frame cost of the relay's checks and copy.
fn core_relay() {
    let mut server = Server::with_seed(
        Config {
            relay_rate: u32::MAX,
            ..unlimited()
        },
        1,
    );
    let mut now = Instant::now();
    let (a, b) = (source(1), source(2));
    let mut tokens = [0u64; 2];
    let mut session_id = 0;
    for (i, from) in [a, b].into_iter().enumerate() {
        server.handle_datagram(now, 0, from, &register(0));
        while let Some(transmit) = server.poll_transmit() {
            match ServerMessage::decode(&transmit.bytes).unwrap() {
                ServerMessage::Registered { peer_token, .. } if transmit.to == from => {
                    tokens[i] = peer_token
                }
                ServerMessage::Introduce { session_id: id, .. } => session_id = id,
                _ => {}
            }
        }
    }
    let inner = vec![0x5a; MAX_DATAGRAM - RELAY_HEADER_LEN];
    let requests: Vec<_> = tokens
        .iter()
        .map(|&peer_token| {
            RelayRequest {
                session_id,
                peer_token,
                inner: &inner,
            }
            .encode()
            .unwrap()
        })
        .collect();
    let rounds = 1_000_000u32;
    let start = Instant::now();
    let mut forwarded = 0u32;
    for i in 0..rounds {
        let side = (i % 2) as usize;
        server.handle_datagram(now, 0, [a, b][side], &requests[side]);
        if let Some(transmit) = server.poll_transmit() {
            std::hint::black_box(transmit);
            forwarded += 1;
        }
        now += Duration::from_micros(1);
    }
    let elapsed = start.elapsed();
    // The first request of each side only marks it as relaying.
    assert!(forwarded >= rounds - 2, "{forwarded} of {rounds} forwarded");
    let per_second = f64::from(forwarded) / elapsed.as_secs_f64();
    println!(
        "core  relayed frames:         {per_second:>10.0}/s  ({MAX_DATAGRAM}-byte requests, {:.1} Gbit/s; one core)",
        per_second * MAX_DATAGRAM as f64 * 8.0 / 1e9
    );
}

fn loopback_stun() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = runtime
        .block_on(async { driver::start(&["127.0.0.1:0".parse().unwrap()], unlimited()).unwrap() });
    let target = server.local_addrs[0];
    // Server on this thread's runtime, client on another thread: one core
    // each. The client keeps a window of requests in flight.
    let server_thread = std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            server.shutdown().await.unwrap()
        })
    });
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let request = stun::binding_request(stun::TransactionId::new([9; 12]));
    let window = 32;
    for _ in 0..window {
        client.send_to(&request, target).unwrap();
    }
    let mut buf = [0u8; 256];
    let mut answered = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        match client.recv_from(&mut buf) {
            Ok(_) => {
                answered += 1;
                client.send_to(&request, target).unwrap();
            }
            Err(_) => {
                // A request was lost; refill the window.
                client.send_to(&request, target).unwrap();
            }
        }
    }
    let elapsed = start.elapsed();
    let stats = server_thread.join().unwrap();
    println!(
        "loop  STUN Binding responses: {:>10.0}/s  (tokio server on loopback, one client socket; server stats: {stats})",
        answered as f64 / elapsed.as_secs_f64()
    );
}

fn main() {
    core_stun();
    core_registrations_and_memory();
    core_relay();
    loopback_stun();
}
