//! Two sans-IO peers and the sans-IO rendezvous behind simulated NATs (see
//! `support/nat_world.rs`), in virtual time. Checks which pairs connect
//! directly and that data flows over the nominated path.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use natter::handshake::Trust;
use natter::identity::Identity;
use natter::link::{Link, LinkConfig};
use natter::punch::CandidateKind;
use natter::seal::DataCipher;
use natter::wire::{RoomCode, ServerErrorKind, ServerMessage, RELAY_HEADER_LEN};
use natter_rendezvous::{Config, Server};
use support::nat_world::{NatType, World, ALL};

fn expected_direct(a: NatType, b: NatType) -> bool {
    use NatType::*;
    !matches!(
        (a, b),
        (Symmetric, PortRestricted) | (PortRestricted, Symmetric) | (Symmetric, Symmetric)
    )
}

fn settled(world: &World) -> bool {
    world
        .hosts
        .iter()
        .all(|h| h.connected.is_some() || h.failed.is_some())
}

#[test]
fn connectivity_matrix_of_the_four_nat_types() {
    let mut table = String::new();
    for a in ALL {
        for b in ALL {
            let mut world = World::new(Some(a), Some(b));
            world.run_until(Duration::from_secs(20), settled);
            let outcome: Vec<_> = world
                .hosts
                .iter()
                .map(|h| match (&h.connected, &h.failed) {
                    (Some((remote, kind, elapsed)), _) => {
                        format!(
                            "connected via {} {remote} in {} ms",
                            kind.as_str(),
                            elapsed.as_millis()
                        )
                    }
                    (_, Some(error)) => format!("failed: {}", error.lines().next().unwrap()),
                    _ => "unsettled".into(),
                })
                .collect();
            table += &format!("{a:?} x {b:?}: {outcome:?}\n");
            let connected = world.hosts.iter().all(|h| h.connected.is_some());
            let failed = world.hosts.iter().all(|h| h.failed.is_some());
            if expected_direct(a, b) {
                assert!(connected, "{a:?} x {b:?} should connect: {outcome:?}");
                // Each side's path is the other side's external address.
                for (me, other) in [(0, 1), (1, 0)] {
                    let remote = world.hosts[me].connected.unwrap().0;
                    let other_public = world.hosts[other].nat.as_ref().unwrap().public_ip;
                    assert_eq!(remote.ip(), other_public, "{a:?} x {b:?}");
                }
            } else {
                // No direct path: both sides meet on the relay.
                assert!(connected, "{a:?} x {b:?} should relay: {outcome:?}");
                for host in &world.hosts {
                    let (remote, kind, elapsed) = host.connected.unwrap();
                    assert_eq!((remote, kind), (world.server_addr, CandidateKind::Relayed));
                    // The controlling peer heard nothing and moved early;
                    // the other followed before its own punch timeout.
                    assert!(
                        elapsed < Duration::from_secs(3),
                        "{a:?} x {b:?}: {elapsed:?}"
                    );
                }
            }
            assert!(!failed);
        }
    }
    println!("{table}");
}

/// A symmetric NAT against a port-restricted one cannot be punched: the
/// session runs through the rendezvous's relay, data flows both ways, and
/// the relay only ever saw sealed frames.
#[test]
fn pairs_that_cannot_punch_talk_through_the_relay() {
    let mut world = World::new(Some(NatType::Symmetric), Some(NatType::PortRestricted));
    world.run_until(Duration::from_secs(20), settled);
    assert!(world
        .hosts
        .iter()
        .all(|h| h.connected.map(|c| c.1) == Some(CandidateKind::Relayed)));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    world.hosts[0].link.send(big.clone()).unwrap();
    world.hosts[1]
        .link
        .send(b"hello over the relay".to_vec())
        .unwrap();
    world.run_until(Duration::from_secs(60), |w| {
        w.hosts[1].received.len() == 1 && w.hosts[0].received.len() == 1
    });
    assert_eq!(world.hosts[1].received, vec![big]);
    assert_eq!(
        world.hosts[0].received,
        vec![b"hello over the relay".to_vec()]
    );
    let stats = world.server.stats();
    assert!(stats.relayed > 300_000 / 1200, "{stats}");
    // The close and its acknowledgement cross the relay too.
    world.hosts[0].link.close();
    world.run_until(Duration::from_secs(30), |w| {
        w.hosts.iter().all(|h| h.closed.is_some())
    });
    let reasons: Vec<_> = world
        .hosts
        .iter()
        .map(|h| h.closed.clone().unwrap().1)
        .collect();
    assert_eq!(reasons, ["closed by this side", "closed by the other peer"]);
}

/// The rendezvous restarts (its rooms, tokens and sessions gone) in the
/// middle of a relayed session: both peers register again at their next
/// refresh, the server introduces them under a new session id, and the
/// session goes on along the new route, nothing lost.
#[test]
fn a_relayed_session_survives_the_rendezvous_restarting() {
    let mut world = World::new(Some(NatType::Symmetric), Some(NatType::Symmetric));
    world.run_until(Duration::from_secs(20), settled);
    world.hosts[0].link.send(b"before".to_vec()).unwrap();
    world.run_until(Duration::from_secs(5), |w| w.hosts[1].received.len() == 1);
    world.server = Server::with_seed(Config::default(), 99);
    world.hosts[0].link.send(b"during".to_vec()).unwrap();
    world.hosts[1].link.send(b"and back".to_vec()).unwrap();
    world.run_until(Duration::from_secs(50), |w| {
        w.hosts[1].received.len() == 2 && w.hosts[0].received.len() == 1
    });
    assert_eq!(
        world.hosts[1].received,
        [b"before".to_vec(), b"during".to_vec()]
    );
    assert_eq!(world.hosts[0].received, [b"and back".to_vec()]);
    assert!(world
        .hosts
        .iter()
        .all(|h| h.closed.is_none() && h.failed.is_none()));
    assert!(world.server.stats().relayed > 0);
}

/// Garbage that claims to come from the rendezvous (relayed frames with
/// random bodies, foreign sessions, truncated headers) or from anywhere else
/// is dropped and counted by a relayed link, and the session goes on.
#[test]
fn a_relayed_link_shrugs_off_garbage() {
    use rand::{Rng, SeedableRng};
    let mut world = World::new(Some(NatType::Symmetric), Some(NatType::Symmetric));
    world.run_until(Duration::from_secs(20), settled);
    assert!(world.hosts.iter().all(|h| h.connected.is_some()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let stranger: SocketAddr = "198.51.100.66:4444".parse().unwrap();
    for _ in 0..20_000 {
        let len = rng.gen_range(0..1300);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if len >= 2 && rng.gen_bool(0.8) {
            // A natter header (mostly the relayed kind), so the parsers run.
            bytes[0] = if rng.gen_bool(0.7) {
                0xC7
            } else {
                0xC0 | rng.gen_range(0..16)
            };
            bytes[1] = natter::wire::VERSION;
        }
        let from = if rng.gen_bool(0.8) {
            world.server_addr
        } else {
            stranger
        };
        world.hosts[0].link.handle_datagram(world.now, from, &bytes);
    }
    let stats = world.hosts[0].link.stats().clone();
    assert!(
        stats.malformed + stats.foreign + stats.forged > 10_000,
        "{stats:?}"
    );
    world.hosts[0].link.send(b"still here".to_vec()).unwrap();
    world.hosts[1].link.send(b"so am I".to_vec()).unwrap();
    world.run_until(Duration::from_secs(20), |w| {
        w.hosts.iter().all(|h| h.received.len() == 1)
    });
    assert_eq!(world.hosts[1].received, [b"still here".to_vec()]);
    assert_eq!(world.hosts[0].received, [b"so am I".to_vec()]);
}

/// The relay route goes away for a moment (the server answers a refresh
/// with BadToken, as after a restart): the link drops and counts what it
/// cannot route, registers again, and the session goes on without losing a
/// message.
#[test]
fn a_relayed_session_survives_losing_its_route_for_a_moment() {
    let mut world = World::new(Some(NatType::Symmetric), Some(NatType::PortRestricted));
    world.run_until(Duration::from_secs(20), settled);
    world.hosts[1].link.send(b"one".to_vec()).unwrap();
    world.run_until(Duration::from_secs(25), |w| w.hosts[0].received.len() == 1);
    // Host 0's rendezvous nonce is its seed, 11.
    let bad_token = ServerMessage::Error {
        client_nonce: 11,
        kind: ServerErrorKind::BadToken,
    };
    let (now, server) = (world.now, world.server_addr);
    world.hosts[0]
        .link
        .handle_datagram(now, server, &bad_token.encode().unwrap());
    world.hosts[1].link.send(b"two".to_vec()).unwrap();
    world.hosts[0].link.send(b"back".to_vec()).unwrap();
    world.run_until(Duration::from_secs(60), |w| {
        w.hosts[0].received.len() == 2 && w.hosts[1].received.len() == 1
    });
    assert_eq!(world.hosts[0].received, [b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(world.hosts[1].received, [b"back".to_vec()]);
    assert!(world.hosts[0].link.stats().unroutable > 0);
}

/// One peer declines the relay: it fails with the reason, and the other,
/// which moved to the relay, is told that nobody answered there.
#[test]
fn a_peer_that_declines_the_relay_fails_both_sides_clearly() {
    for declining in [0, 1] {
        let mut world = World::configured(
            Some(NatType::Symmetric),
            Some(NatType::Symmetric),
            |host, config| config.relay = host != declining,
        );
        world.run_until(Duration::from_secs(30), settled);
        let error = |host: usize| world.hosts[host].failed.clone().unwrap_or_default();
        assert!(
            error(declining).contains("relaying is off on this side"),
            "{}",
            error(declining)
        );
        let other = error(1 - declining);
        assert!(
            other.contains("did not answer through the rendezvous's relay"),
            "{other}"
        );
    }
}

/// One peer learns of the introduction 3 s after the other (the server's
/// answers to it are lost), the other has moved to the relay by then, and
/// the late peer's first relay hello is lost too: the hello is repeated, so
/// the early peer's relayed handshake reaches the late one before it gives
/// up, and both connect through the relay. (Seen in the NAT lab at 20 %
/// loss, when the hello went out once.)
#[test]
fn a_lost_relay_hello_is_repeated() {
    let mut world = World::new(Some(NatType::Symmetric), Some(NatType::Symmetric));
    let server = world.server_addr;
    let late = "203.0.113.12".parse::<IpAddr>().unwrap();
    let mut hellos_dropped = 0;
    world.drop_if = Some(Box::new(move |elapsed, from, to, bytes| {
        if from == server && to.ip() == late {
            return elapsed < Duration::from_secs(3);
        }
        // A relay request with no inner frame: a hello.
        let hello = to == server && from.ip() == late && bytes.len() == RELAY_HEADER_LEN;
        if hello && bytes[0] == 0xC6 && hellos_dropped == 0 {
            hellos_dropped += 1;
            return true;
        }
        false
    }));
    world.run_until(Duration::from_secs(30), settled);
    for host in &world.hosts {
        let (_, kind, _) = host
            .connected
            .unwrap_or_else(|| panic!("{:?}", host.failed));
        assert_eq!(kind, CandidateKind::Relayed);
    }
}

/// A rendezvous that does not relay leaves such a pair with a clear error.
#[test]
fn without_a_relay_the_error_says_why() {
    let mut world = World::new(Some(NatType::Symmetric), Some(NatType::Symmetric));
    world.server = Server::with_seed(
        Config {
            relay_rate: 0,
            ..Config::default()
        },
        1,
    );
    world.run_until(Duration::from_secs(20), settled);
    for host in &world.hosts {
        let error = host.failed.as_ref().expect("fails without a relay");
        assert!(
            error.contains("punching failed")
                && error.contains("the rendezvous does not relay")
                && error.contains("probes sent"),
            "{error}"
        );
    }
}

/// With either cipher: AES-256-GCM only when both sides offer it.
#[test]
fn data_flows_over_the_punched_path_both_ways() {
    for (fast_aes, cipher) in [
        ([true, true], DataCipher::Aes256Gcm),
        ([true, false], DataCipher::ChaCha20Poly1305),
        ([false, true], DataCipher::ChaCha20Poly1305),
    ] {
        data_flows_both_ways(fast_aes, cipher);
    }
}

fn data_flows_both_ways(fast_aes: [bool; 2], cipher: DataCipher) {
    let mut world = World::with_fast_aes(
        Some(NatType::PortRestricted),
        Some(NatType::AddressRestricted),
        fast_aes,
    );
    world.run_until(Duration::from_secs(20), settled);
    assert!(world.hosts.iter().all(|h| h.connected.is_some()));
    assert!(world.hosts.iter().all(|h| h.cipher == Some(cipher)));
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 31) as u8).collect();
    world.hosts[0].link.send(b"hello from a".to_vec()).unwrap();
    world.hosts[0].link.send(big.clone()).unwrap();
    world.hosts[1].link.send(b"hello from b".to_vec()).unwrap();
    world.run_until(Duration::from_secs(40), |w| {
        w.hosts[1].received.len() == 2 && w.hosts[0].received.len() == 1
    });
    assert_eq!(world.hosts[1].received, vec![b"hello from a".to_vec(), big]);
    assert_eq!(world.hosts[0].received, vec![b"hello from b".to_vec()]);
}

#[test]
fn public_peer_connects_to_a_symmetric_nat() {
    let mut world = World::new(None, Some(NatType::Symmetric));
    world.run_until(Duration::from_secs(20), settled);
    let (remote_of_public, kind, _) = world.hosts[0].connected.expect("public peer connects");
    // The symmetric NAT's probe port was unknown to the rendezvous.
    assert_eq!(kind, CandidateKind::PeerReflexive);
    assert_eq!(
        remote_of_public.ip(),
        "203.0.113.12".parse::<IpAddr>().unwrap()
    );
    assert!(world.hosts[1].connected.is_some());
}

#[test]
fn a_dead_path_is_reported_after_the_idle_timeout() {
    let mut world = World::new(Some(NatType::FullCone), Some(NatType::PortRestricted));
    world.run_until(Duration::from_secs(20), settled);
    assert!(world.hosts.iter().all(|h| h.connected.is_some()));
    // Keepalives hold an idle path open well past the idle timeout.
    let quiet_until = world.now + Duration::from_secs(120);
    world.run_until(Duration::from_secs(200), |w| w.now >= quiet_until);
    assert!(
        world.hosts.iter().all(|h| h.closed.is_none()),
        "keepalives failed"
    );
    // Then the path dies.
    world.blackhole = true;
    let died = world.now - world.start;
    world.run_until(Duration::from_secs(400), |w| {
        w.hosts.iter().all(|h| h.closed.is_some())
    });
    for host in &world.hosts {
        let (at, reason) = host.closed.clone().expect("dead path reported");
        assert!(reason.contains("went silent for 60 s"), "{reason}");
        let after = at - died;
        assert!(
            after >= Duration::from_secs(45) && after <= Duration::from_secs(61),
            "{after:?}"
        );
    }
}

#[test]
fn forged_replayed_and_stale_frames_are_dropped_and_counted() {
    let mut world = World::new(Some(NatType::PortRestricted), Some(NatType::FullCone));
    world.run_until(Duration::from_secs(20), settled);
    assert!(world.hosts.iter().all(|h| h.connected.is_some()));
    world.attacker = true;
    let messages: Vec<Vec<u8>> = (0..50u32)
        .map(|i| (0..3000).map(|j| (i * 7 + j) as u8).collect())
        .collect();
    for message in &messages {
        world.hosts[0].link.send(message.clone()).unwrap();
    }
    world.hosts[1].link.send(b"reply".to_vec()).unwrap();
    world.run_until(Duration::from_secs(60), |w| {
        w.hosts[1].received.len() == messages.len() && w.hosts[0].received.len() == 1
    });
    assert_eq!(
        world.hosts[1].received, messages,
        "the session survived intact"
    );
    for host in &world.hosts {
        let stats = host.link.stats();
        assert!(stats.forged > 0, "{stats:?}");
        assert!(stats.replayed > 0, "{stats:?}");
    }
}

#[test]
fn an_impostor_in_a_contacts_room_is_refused() {
    use natter::contacts::meeting_room;
    use natter::handshake::HandshakeError;
    use natter::ConnectError;
    let (alice, bob, impostor) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let room = RoomCode::new(meeting_room(&alice.public_key(), &bob.public_key())).unwrap();
    let mut world = World::new(Some(NatType::PortRestricted), Some(NatType::PortRestricted));
    let mut config = LinkConfig::default();
    config.rendezvous.wait_timeout = Duration::from_secs(30);
    // Alice expects Bob; the impostor knows both public keys, so it can
    // find the room, but it does not hold Bob's secret key.
    world.hosts[0].link = Link::new(
        world.start,
        config.clone(),
        world.server_addr,
        room.clone(),
        vec![world.hosts[0].internal],
        Trust::Pinned(*bob.public_key().as_bytes()),
        alice.secret_bytes(),
        1,
    );
    world.hosts[1].link = Link::new(
        world.start,
        config,
        world.server_addr,
        room,
        vec![world.hosts[1].internal],
        Trust::Pinned(*alice.public_key().as_bytes()),
        impostor.secret_bytes(),
        2,
    );
    world.run_until(Duration::from_secs(20), settled);
    let error = world.hosts[0]
        .failed
        .clone()
        .expect("alice refuses the impostor");
    let expected = ConnectError::Handshake(HandshakeError::KeyChanged {
        expected: bob.public_key().to_hex(),
        actual: impostor.public_key().to_hex(),
    });
    assert_eq!(error, expected.to_string());
    assert!(world.hosts[1].connected.is_none());
}

/// The datagram size each host's channel uses now.
fn datagrams(world: &World) -> Vec<usize> {
    world
        .hosts
        .iter()
        .map(|h| {
            let stats = h.link.channel_stats().expect("secured");
            stats.max_payload + natter::wire::DATA_HEADER_LEN + natter::seal::TAG_LEN
        })
        .collect()
}

/// Path MTU discovery: a path that carries 1452-byte datagrams gets them,
/// one that drops everything over 1400 bytes settles just under that; when
/// the path then shrinks to 1200 bytes mid-transfer (a black hole: large
/// datagrams vanish without a word), the session falls back to 1200 and the
/// transfer completes.
#[test]
fn the_path_mtu_is_found_and_a_black_hole_falls_back() {
    for mtu in [1500, 1400] {
        let limit = std::rc::Rc::new(std::cell::Cell::new(mtu));
        let mut world = World::new(Some(NatType::FullCone), Some(NatType::PortRestricted));
        world.drop_if = Some(Box::new({
            let limit = limit.clone();
            move |_, _, _, bytes| bytes.len() > limit.get()
        }));
        world.run_until(Duration::from_secs(20), settled);
        assert!(world.hosts.iter().all(|h| h.connected.is_some()));
        let searched = world.now + Duration::from_secs(5);
        world.run_until(Duration::from_secs(40), |w| w.now >= searched);
        for datagram in datagrams(&world) {
            match mtu {
                1500 => assert_eq!(datagram, natter::wire::MAX_PATH_DATAGRAM),
                _ => assert!((1384..=1400).contains(&datagram), "{datagram}"),
            }
        }

        limit.set(1200);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        world.hosts[0].link.send(big.clone()).unwrap();
        world.run_until(Duration::from_secs(120), |w| {
            !w.hosts[1].received.is_empty()
        });
        assert_eq!(world.hosts[1].received, vec![big], "MTU {mtu}");
        assert_eq!(datagrams(&world)[0], natter::wire::MAX_DATAGRAM);
        assert!(world.hosts.iter().all(|h| h.closed.is_none()));
    }
}
