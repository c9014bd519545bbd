//! A simulation of the multi-node design in `docs/SCALING.md`: each room
//! meets on the nodes that rank highest for its name by rendezvous (highest
//! random weight) hashing, with no state shared between nodes. Checks how
//! rooms spread over nodes and how few move when a node joins or leaves,
//! and that two peers who hold the node list from either side of one change
//! still have a node in common when each registers with its top two.

use std::collections::HashMap;

const ROOMS: usize = 100_000;

/// The weight of `node` for `room`: the first 8 bytes of SHA-256 over both.
fn score(node: &str, room: &str) -> u64 {
    let mut input = Vec::with_capacity(node.len() + room.len() + 1);
    input.extend_from_slice(node.as_bytes());
    input.push(0);
    input.extend_from_slice(room.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    u64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap())
}

/// The nodes in the order a peer tries them for `room`.
fn ranked<'a>(nodes: &'a [String], room: &str) -> Vec<&'a str> {
    let mut ranked: Vec<&str> = nodes.iter().map(String::as_str).collect();
    ranked.sort_by_cached_key(|node| std::cmp::Reverse(score(node, room)));
    ranked
}

fn owner<'a>(nodes: &'a [String], room: &str) -> &'a str {
    ranked(nodes, room)[0]
}

fn nodes(count: usize) -> Vec<String> {
    (1..=count)
        .map(|i| format!("rv{i}.example.org:7777"))
        .collect()
}

fn rooms() -> impl Iterator<Item = String> {
    (0..ROOMS).map(|i| format!("{}-word-word-{i}", i % 1000))
}

#[test]
fn rooms_spread_evenly_over_the_nodes() {
    let nodes = nodes(10);
    let mut load: HashMap<&str, usize> = HashMap::new();
    for room in rooms() {
        *load.entry(owner(&nodes, &room)).or_default() += 1;
    }
    let (least, most) = (load.values().min().unwrap(), load.values().max().unwrap());
    println!("10 nodes, {ROOMS} rooms: fewest {least}, most {most} on one node");
    // A fair share is 10 000; the binomial's deviation is 95.
    assert_eq!(load.len(), 10);
    assert!(*least > 9_500 && *most < 10_500, "{load:?}");
}

#[test]
fn a_node_leaving_moves_only_its_rooms_and_spreads_them_over_the_rest() {
    let before = nodes(10);
    let gone = before[3].clone();
    let after: Vec<String> = before.iter().filter(|n| **n != gone).cloned().collect();
    let mut moved_to: HashMap<&str, usize> = HashMap::new();
    for room in rooms() {
        let (old, new) = (owner(&before, &room), owner(&after, &room));
        if old != gone {
            assert_eq!(old, new, "room {room} moved though its node stayed");
        } else {
            *moved_to.entry(new).or_default() += 1;
        }
    }
    let moved: usize = moved_to.values().sum();
    println!("one of 10 nodes leaves: {moved} rooms move, {moved_to:?}");
    assert!((9_500..10_500).contains(&moved));
    assert_eq!(moved_to.len(), 9, "spread over every remaining node");
    assert!(moved_to.values().all(|&n| (900..1_350).contains(&n)));
}

#[test]
fn a_node_joining_takes_an_even_share_from_every_node() {
    let before = nodes(10);
    let mut after = before.clone();
    after.push("rv11.example.org:7777".into());
    let mut taken_from: HashMap<&str, usize> = HashMap::new();
    for room in rooms() {
        let (old, new) = (owner(&before, &room), owner(&after, &room));
        if old != new {
            assert_eq!(new, after[10], "a room moved between old nodes");
            *taken_from.entry(old).or_default() += 1;
        }
    }
    let moved: usize = taken_from.values().sum();
    println!("an 11th node joins: {moved} rooms move to it, taken from {taken_from:?}");
    // A fair share is 100 000 / 11 = 9 091.
    assert!((8_600..9_600).contains(&moved));
    assert_eq!(taken_from.len(), 10);
}

/// During a change of the node list some peers hold the old list and some
/// the new: if each registers with its top two nodes, the two peers of
/// every room still share one, whichever side of the change each is on.
#[test]
fn peers_on_either_side_of_one_change_share_a_node_when_each_uses_its_top_two() {
    let old = nodes(10);
    let without: Vec<String> = old[1..].to_vec();
    let mut with: Vec<String> = old.clone();
    with.push("rv11.example.org:7777".into());
    for new in [&without, &with] {
        let mut owner_only_misses = 0;
        for room in rooms() {
            let (a, b) = (ranked(&old, &room), ranked(new, &room));
            let alive = |node: &str| new.iter().any(|n| n == node);
            let shared = a[..2]
                .iter()
                .any(|&node| alive(node) && b[..2].contains(&node));
            assert!(shared, "room {room}: {:?} against {:?}", &a[..2], &b[..2]);
            owner_only_misses += usize::from(a[0] != b[0]);
        }
        println!(
            "{} -> {} nodes: every room keeps a shared node among the top two; \
             {owner_only_misses} rooms would miss with the owner alone",
            old.len(),
            new.len()
        );
        assert!(owner_only_misses > 0);
    }
}
