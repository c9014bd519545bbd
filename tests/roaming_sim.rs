//! A session that follows the network, in the simulated internet of
//! `support/nat_world.rs` (virtual time; the one-way delay of every hop is
//! 15 ms, so a round trip between the peers is 30 ms):
//!
//! * a NAT loses its mappings mid-stream (its port changes, or its address
//!   too), on a direct path and on the relay;
//! * the direct path goes dark and comes back;
//! * a pair whose direct path is blocked at first starts on the relay and
//!   moves to the direct path once it opens;
//! * a pair relayed only because one peer was introduced late goes direct
//!   at once;
//! * an attacker races copies of the peers' frames from its own address;
//! * seeded runs with random rebindings and outages (`NATTER_SIM_SEEDS`,
//!   default 500; CI runs 20 000; `NATTER_SIM_SEED=N` replays one).
//!
//! In every case each message arrives exactly once and in order, and
//! nothing closes. The stalls are printed in round trips.

mod support;

use std::time::Duration;

use natter::paths::MoveReason;
use natter::punch::CandidateKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::nat_world::{NatType, World, ALL};

/// One round trip between the peers in the simulation.
const RTT: Duration = Duration::from_millis(30);
/// Bytes of each numbered message.
const MESSAGE_LEN: usize = 700;

fn connected(a: NatType, b: NatType) -> World {
    let mut world = World::new(Some(a), Some(b));
    world.run_until(Duration::from_secs(20), |w| {
        w.hosts
            .iter()
            .all(|h| h.connected.is_some() || h.failed.is_some())
    });
    for host in &world.hosts {
        assert!(host.connected.is_some(), "{a:?} x {b:?}: {:?}", host.failed);
    }
    world
}

fn message(from: usize, n: u32) -> Vec<u8> {
    let mut bytes = format!("{from}:{n}:").into_bytes();
    bytes.resize(MESSAGE_LEN, b'.');
    bytes
}

/// Both peers send a numbered message every `every` until `until` (virtual
/// time from the start), and `events` may change the world between sends;
/// then the run goes on until everything arrived, or 90 s more.
fn stream(
    world: &mut World,
    until: Duration,
    every: Duration,
    mut events: impl FnMut(&mut World, Duration),
) -> [u32; 2] {
    let mut sent = [0u32; 2];
    loop {
        let elapsed = world.now - world.start;
        if elapsed >= until {
            break;
        }
        for (host, count) in sent.iter_mut().enumerate() {
            if world.hosts[host].link.send(message(host, *count)).is_ok() {
                *count += 1;
            }
        }
        events(world, elapsed);
        world.run_until(elapsed + every, |_| false);
    }
    let done = |w: &World| {
        w.hosts[1].received.len() == sent[0] as usize
            && w.hosts[0].received.len() == sent[1] as usize
    };
    world.run_until(until + Duration::from_secs(90), done);
    sent
}

/// Every message arrived once, in order, and the session is still up.
fn check_delivery(world: &World, sent: [u32; 2], case: &str) {
    for (receiver, sender) in [(1, 0), (0, 1)] {
        let expected: Vec<_> = (0..sent[sender]).map(|n| message(sender, n)).collect();
        let received = &world.hosts[receiver].received;
        assert!(
            received == &expected,
            "{case}: host {receiver} got {} of {} messages (first difference at {:?})",
            received.len(),
            expected.len(),
            received.iter().zip(&expected).position(|(a, b)| a != b)
        );
        let host = &world.hosts[receiver];
        assert!(
            host.closed.is_none() && host.failed.is_none(),
            "{case}: host {receiver} ended: {:?} {:?}",
            host.closed,
            host.failed
        );
    }
}

/// The longest gap between two messages arriving at `host` after `from`
/// (virtual time since the start), in round trips.
fn stall_after(world: &World, host: usize, from: Duration) -> f64 {
    let at = world.start + from;
    let times = &world.hosts[host].received_at;
    let mut previous = times
        .iter()
        .rev()
        .find(|&&t| t <= at)
        .copied()
        .unwrap_or(at);
    let mut longest = Duration::ZERO;
    for &t in times.iter().filter(|&&t| t > at) {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest.as_secs_f64() / RTT.as_secs_f64()
}

fn moves(world: &World, host: usize) -> Vec<(Duration, CandidateKind, MoveReason)> {
    world.hosts[host]
        .path_changes
        .iter()
        .map(|(at, path, reason)| (*at - world.start, path.kind, *reason))
        .collect()
}

#[test]
fn a_nat_that_loses_its_mappings_mid_stream_loses_nothing() {
    let rebind_at = Duration::from_secs(8);
    let cases: [(&str, NatType, NatType, Option<&str>); 5] = [
        (
            "symmetric x full cone, new port",
            NatType::Symmetric,
            NatType::FullCone,
            None,
        ),
        (
            "symmetric x full cone, new address",
            NatType::Symmetric,
            NatType::FullCone,
            Some("203.0.113.31"),
        ),
        (
            "port-restricted x port-restricted, new port",
            NatType::PortRestricted,
            NatType::PortRestricted,
            None,
        ),
        (
            "port-restricted x address-restricted, new address",
            NatType::PortRestricted,
            NatType::AddressRestricted,
            Some("203.0.113.31"),
        ),
        (
            "symmetric x symmetric (relayed), new port",
            NatType::Symmetric,
            NatType::Symmetric,
            None,
        ),
    ];
    for (case, a, b, new_ip) in cases {
        let mut world = connected(a, b);
        let relayed = world.hosts[0].connected.unwrap().1 == CandidateKind::Relayed;
        let mut done = false;
        let sent = stream(
            &mut world,
            Duration::from_secs(20),
            Duration::from_millis(20),
            |w, elapsed| {
                if elapsed >= rebind_at && !done {
                    done = true;
                    w.hosts[0].nat.as_mut().unwrap().rebind(new_ip);
                }
            },
        );
        check_delivery(&world, sent, case);
        let stalls = [
            stall_after(&world, 0, rebind_at),
            stall_after(&world, 1, rebind_at),
        ];
        println!(
            "{case}: stall {:.1} / {:.1} RTTs; moves a {:?}, b {:?}",
            stalls[0],
            stalls[1],
            moves(&world, 0),
            moves(&world, 1)
        );
        if !relayed {
            // Host b ends up sending directly to host a's new address.
            let (_, last, _) = world.hosts[1].path_changes.last().expect("b moved");
            assert_eq!(
                last.remote.ip(),
                world.hosts[0].nat.as_ref().unwrap().public_ip,
                "{case}"
            );
            assert_ne!(last.kind, CandidateKind::Relayed, "{case}");
        }
        // The worst case waits out two heartbeats, a re-introduction and a
        // probe round: a few seconds, never the 60 s idle timeout.
        assert!(stalls.iter().all(|&s| s < 200.0), "{case}: {stalls:?}");
    }
}

#[test]
fn a_direct_path_that_goes_dark_moves_to_the_relay_and_back() {
    let mut world = connected(NatType::FullCone, NatType::PortRestricted);
    let (dark_at, light_at) = (Duration::from_secs(5), Duration::from_secs(17));
    let sent = stream(
        &mut world,
        Duration::from_secs(40),
        Duration::from_millis(20),
        |w, elapsed| w.block_direct = (dark_at..light_at).contains(&elapsed),
    );
    check_delivery(&world, sent, "direct path dark for 12 s");
    for host in 0..2 {
        let moves = moves(&world, host);
        println!("host {host}: {moves:?}");
        let to_relay = moves
            .iter()
            .find(|(_, kind, _)| *kind == CandidateKind::Relayed)
            .expect("moved to the relay");
        assert!(to_relay.0 - dark_at < Duration::from_secs(7), "{moves:?}");
        let back = moves
            .iter()
            .find(|(at, kind, _)| *at > light_at && *kind != CandidateKind::Relayed)
            .expect("moved back to a direct path");
        assert!(back.0 - light_at < Duration::from_secs(15), "{moves:?}");
        assert_ne!(moves.last().unwrap().1, CandidateKind::Relayed);
    }
    let stall = stall_after(&world, 1, dark_at);
    println!("stall {stall:.1} RTTs");
}

#[test]
fn a_pair_blocked_at_first_starts_relayed_and_goes_direct() {
    let mut world = World::new(Some(NatType::FullCone), Some(NatType::AddressRestricted));
    world.block_direct = true;
    let lift_at = Duration::from_secs(10);
    let sent = stream(
        &mut world,
        Duration::from_secs(30),
        Duration::from_millis(50),
        |w, elapsed| w.block_direct = elapsed < lift_at,
    );
    check_delivery(&world, sent, "direct path blocked for 10 s");
    for host in 0..2 {
        assert_eq!(
            world.hosts[host].connected.unwrap().1,
            CandidateKind::Relayed
        );
        let moves = moves(&world, host);
        println!("host {host}: {moves:?}");
        let (at, kind, _) = *moves.last().expect("moved off the relay");
        assert_ne!(kind, CandidateKind::Relayed);
        assert!(at - lift_at < Duration::from_secs(10), "{moves:?}");
    }
}

/// One peer hears nothing from the rendezvous for its first 2.5 s, so it is
/// introduced after the other gave up punching (1.5 s) and took the relay:
/// a session that starts relayed for that reason checks the direct
/// candidates at once and is direct within a second, not at the first
/// five-second probe round.
#[test]
fn a_session_relayed_for_a_late_introduction_goes_direct_at_once() {
    let late = Duration::from_millis(2500);
    let mut relayed_starts = 0;
    for slow_host in 0..2 {
        let mut world = World::new(Some(NatType::FullCone), Some(NatType::FullCone));
        let slow_ip = world.hosts[slow_host].nat.as_ref().unwrap().public_ip;
        let server = world.server_addr;
        world.drop_if = Some(Box::new(move |elapsed, from, to, _| {
            elapsed < late && from == server && to.ip() == slow_ip
        }));
        let sent = stream(
            &mut world,
            Duration::from_secs(8),
            Duration::from_millis(50),
            |_, _| {},
        );
        check_delivery(&world, sent, "late introduction");
        let (_, kind, connected_at) = world.hosts[0].connected.unwrap();
        if kind != CandidateKind::Relayed {
            continue;
        }
        relayed_starts += 1;
        for host in 0..2 {
            let moves = moves(&world, host);
            println!(
                "slow host {slow_host}, host {host}: connected at {connected_at:?}, {moves:?}"
            );
            let (at, kind, _) = *moves.first().expect("moved off the relay");
            assert_ne!(kind, CandidateKind::Relayed);
            assert!(at - connected_at < Duration::from_secs(1), "{moves:?}");
        }
    }
    assert!(relayed_starts > 0, "no session started on the relay");
}

/// The attacker sees every frame between the peers and sends a copy from
/// its own address that overtakes the original (which then arrives as a
/// replay), with a forgery and a replay of an old frame. The copies are
/// authentic and the newest, so each peer checks the attacker's address:
/// the attacker cannot answer, the session stays where it is, and what the
/// peers send the attacker stays within three times what it sent them.
#[test]
fn a_racing_attacker_never_moves_the_session() {
    let mut world = connected(NatType::FullCone, NatType::FullCone);
    world.racer = Some("198.51.100.66:4444".parse().unwrap());
    let sent = stream(
        &mut world,
        Duration::from_secs(25),
        Duration::from_millis(20),
        |_, _| {},
    );
    check_delivery(&world, sent, "racing attacker");
    for host in 0..2 {
        assert_eq!(moves(&world, host), [], "host {host} moved");
        let stats = world.hosts[host].link.path_stats().unwrap().clone();
        let link = world.hosts[host].link.stats().clone();
        println!("host {host}: {stats:?} {link:?}");
        assert!(stats.challenges_sent > 0, "{stats:?}");
        assert!(link.forged > 0 && link.replayed > 0, "{link:?}");
    }
    println!(
        "attacker sent {} bytes, received {}",
        world.racer_sent, world.racer_received
    );
    assert!(world.racer_received > 0);
    assert!(world.racer_received <= 3 * world.racer_sent);
}

fn seeds() -> std::ops::Range<u64> {
    if let Ok(seed) = std::env::var("NATTER_SIM_SEED") {
        let seed = seed.parse().expect("NATTER_SIM_SEED is a number");
        return seed..seed + 1;
    }
    let count = std::env::var("NATTER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    0..count
}

/// Random NAT pairs; during a stream both ways, random rebindings (new
/// port or new address, either side) and outages of the direct paths (up
/// to 12 s). Every message must arrive once, in order, and no session may
/// end.
#[test]
fn random_rebindings_and_outages_lose_nothing() {
    let seeds = seeds();
    let count = seeds.end - seeds.start;
    let mut moves_total = 0;
    let mut worst_stall = (0.0, 0);
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let (a, b) = (ALL[rng.gen_range(0..4)], ALL[rng.gen_range(0..4)]);
        let mut world = connected(a, b);
        // (when, what, which host, how long an outage lasts)
        let mut events: Vec<(Duration, u8, usize, Duration)> = (0..rng.gen_range(1..4))
            .map(|_| {
                (
                    Duration::from_millis(rng.gen_range(1000..15_000)),
                    rng.gen_range(0..3),
                    rng.gen_range(0..2),
                    Duration::from_millis(rng.gen_range(500..12_000)),
                )
            })
            .collect();
        events.sort();
        if std::env::var("NATTER_SIM_SEED").is_ok() {
            println!(
                "events (at, 0 new port / 1 new address / 2 outage, host, outage): {events:?}"
            );
        }
        let mut dark_until = Duration::ZERO;
        let first = events[0].0;
        let mut next_ip = 40;
        let sent = stream(
            &mut world,
            Duration::from_secs(20),
            Duration::from_millis(100),
            |w, elapsed| {
                while events.first().is_some_and(|(at, ..)| *at <= elapsed) {
                    let (_, kind, host, outage) = events.remove(0);
                    match kind {
                        0 => w.hosts[host].nat.as_mut().unwrap().rebind(None),
                        1 => {
                            next_ip += 1;
                            let ip = format!("203.0.113.{next_ip}");
                            w.hosts[host].nat.as_mut().unwrap().rebind(Some(&ip));
                        }
                        _ => dark_until = elapsed + outage,
                    }
                }
                w.block_direct = elapsed < dark_until;
            },
        );
        check_delivery(&world, sent, &format!("seed {seed}: {a:?} x {b:?}"));
        if std::env::var("NATTER_SIM_SEED").is_ok() {
            println!(
                "{a:?} x {b:?}; moves a {:?}; b {:?}",
                moves(&world, 0),
                moves(&world, 1)
            );
        }
        moves_total += world
            .hosts
            .iter()
            .map(|h| h.path_changes.len())
            .sum::<usize>();
        let stall = stall_after(&world, 0, first).max(stall_after(&world, 1, first));
        if stall > worst_stall.0 {
            worst_stall = (stall, seed);
        }
    }
    println!(
        "{count} seeds: {moves_total} moves, longest stall {:.0} RTTs (seed {})",
        worst_stall.0, worst_stall.1
    );
}
