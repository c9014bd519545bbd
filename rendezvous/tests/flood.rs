//! 100 000 hostile datagrams at a running rendezvous: it keeps serving, its
//! memory stays bounded, and every datagram is accounted for.

use std::net::SocketAddr;
use std::time::Duration;

use natter_rendezvous::rate_limit::RateLimit;
use natter_rendezvous::{driver, Config, DropReason};
use natter_wire::{stun, ClientMessage, FrameKind, Register, RoomCode, ServerMessage, VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::time::timeout;

const FLOOD: usize = 100_000;
/// Datagrams sent before waiting for the server to catch up, so the kernel's
/// receive buffer never overflows and the count stays exact.
const BATCH: usize = 50;
/// Allowed growth of the process's resident memory over the flood.
const RSS_BOUND_KIB: u64 = 32 * 1024;
const WAIT: Duration = Duration::from_secs(5);

fn hostile_datagram(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.gen_range(0..1500);
    let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    match rng.gen_range(0..6) {
        // Random bytes.
        0 => {}
        // A natter header over a random body.
        1 if len >= 2 => {
            bytes[0] = FrameKind::ToServer as u8;
            bytes[1] = VERSION;
        }
        // Another version.
        2 if len >= 2 => {
            bytes[0] = FrameKind::ToServer as u8;
            bytes[1] = rng.gen_range(VERSION + 1..=u8::MAX);
        }
        // A STUN header with random attributes.
        3 if len >= 20 => {
            bytes.truncate(len / 4 * 4);
            let attrs = (bytes.len() - 20) as u16;
            bytes[0] &= 0x3f;
            bytes[2..4].copy_from_slice(&attrs.to_be_bytes());
            bytes[4..8].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        }
        // A truncated valid Register.
        4 => {
            let mut register = valid_register(rng);
            register.truncate(rng.gen_range(0..register.len()));
            bytes = register;
        }
        // A valid Register for a random room: creates state, which must stay
        // within the peer limit.
        _ => bytes = valid_register(rng),
    }
    bytes
}

fn valid_register(rng: &mut StdRng) -> Vec<u8> {
    let room: Vec<u8> = (0..rng.gen_range(1..=64)).map(|_| rng.gen()).collect();
    ClientMessage::Register(Register {
        room: RoomCode::new(room).unwrap(),
        host_candidates: vec![],
        client_nonce: rng.gen(),
        peer_token: rng.gen_bool(0.5).then(|| rng.gen()),
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

/// Sends a STUN request and waits for its answer: the server handles
/// datagrams in order, so everything sent before has been handled.
async fn sync(socket: &UdpSocket, server: SocketAddr) {
    let request = stun::binding_request(stun::TransactionId::random());
    socket.send_to(&request, server).await.unwrap();
    let mut buf = [0u8; 2048];
    loop {
        let (len, _) = timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .expect("the rendezvous stopped answering during the flood")
            .unwrap();
        if let Ok(stun::Message::BindingSuccess { transaction, .. }) = stun::parse(&buf[..len]) {
            if transaction.as_bytes() == &request[8..20] {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_flood_of_hostile_datagrams() {
    let max_peers = 20_000;
    let config = Config {
        max_peers,
        // The flood comes from one address; lift the per-source limit so
        // every datagram reaches the parsers (rate limiting has unit tests).
        rate_limit: RateLimit::unlimited(16),
        address_rate_limit: RateLimit::unlimited(16),
        load_threshold: f32::MAX,
        ..Config::default()
    };
    let server = driver::start(&["127.0.0.1:0".parse().unwrap()], config).unwrap();
    let target = server.local_addrs[0];
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let rss_before = resident_kib();

    let mut sent = 0u64;
    for batch in 0..FLOOD / BATCH {
        for _ in 0..BATCH {
            attacker
                .send_to(&hostile_datagram(&mut rng), target)
                .await
                .unwrap();
        }
        sync(&attacker, target).await;
        sent += BATCH as u64 + 1;
        if batch % 200 == 0 {
            // Drain replies so the attacker's own buffer does not fill.
            let mut buf = [0u8; 2048];
            while attacker.try_recv_from(&mut buf).is_ok() {}
        }
    }
    let rss_growth = resident_kib().saturating_sub(rss_before);

    // A normal peer is still served.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let register = ClientMessage::Register(Register {
        room: RoomCode::new(*b"after-the-flood").unwrap(),
        host_candidates: vec![],
        client_nonce: 7,
        peer_token: None,
        claim: false,
        cookie: None,
        nat: None,
        mapped: None,
        rejoin: None,
    });
    peer.send_to(&register.encode().unwrap(), target)
        .await
        .unwrap();
    sent += 1;
    let mut buf = [0u8; 2048];
    let (len, _) = timeout(WAIT, peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = ServerMessage::decode(&buf[..len]).unwrap();

    let stats = server.shutdown().await.unwrap();
    println!("sent {sent} datagrams; server: {stats}; RSS growth {rss_growth} KiB");
    assert_eq!(
        stats.datagrams_in, sent,
        "every datagram reached the server"
    );
    assert_eq!(
        stats.accepted + stats.refused + stats.dropped_total(),
        stats.datagrams_in,
        "every datagram is accepted, refused or counted as dropped"
    );
    assert!(stats.dropped(DropReason::Malformed) > 10_000);
    assert!(stats.dropped(DropReason::UnsupportedVersion) > 5_000);
    assert!(stats.dropped(DropReason::StunMalformed) > 0);
    assert!(
        matches!(
            reply,
            ServerMessage::Registered {
                client_nonce: 7,
                ..
            }
        ),
        "{reply:?}"
    );
    assert!(stats.registrations <= max_peers as u64);
    assert!(
        rss_growth < RSS_BOUND_KIB,
        "resident memory grew by {rss_growth} KiB"
    );
}
