//! `natter pipe` processes on loopback, with a rendezvous in this process.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use natter_rendezvous::rate_limit::RateLimit;
use natter_rendezvous::{driver, Config};
use serde_json::Value;
use support::pipe_peer::{
    code, expect_failure, runtime, spawn_stderr_reader, start_rendezvous, Home, PipePeer, Stream,
    NATTER,
};

#[test]
fn fifty_mib_each_way_arrive_byte_exact() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let code = code();
    let len = 50 << 20;
    let (home_a, home_b) = (Home::new("fifty-a"), Home::new("fifty-b"));
    let a = PipePeer::start(&rendezvous, &code, &home_a, 1, len, None);
    let b = PipePeer::start(&rendezvous, &code, &home_b, 2, len, None);
    let connected = a.wait_event("connected", Duration::from_secs(10));
    assert_eq!(connected["path"], "direct");
    b.wait_event("connected", Duration::from_secs(10));
    let started = Instant::now();
    let (a_code, a_len, a_hash) = a.finish(Duration::from_secs(120));
    let (b_code, b_len, b_hash) = b.finish(Duration::from_secs(30));
    println!("50 MiB each way in {:?}", started.elapsed());
    assert_eq!((a_code, b_code), (0, 0));
    assert_eq!(
        (a_len, a_hash),
        (len, Stream::hash(2, len)),
        "a received b's stream"
    );
    assert_eq!(
        (b_len, b_hash),
        (len, Stream::hash(1, len)),
        "b received a's stream"
    );
    runtime.block_on(server.shutdown()).unwrap();
}

/// Both ends on one machine with one config directory (one identity): a
/// user trying natter out. The rendezvous must pair them, not take the
/// second for a restart of the first.
#[test]
fn two_processes_of_one_identity_pair_with_each_other() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let code = code();
    let home = Home::new("one-identity");
    let a = PipePeer::start(&rendezvous, &code, &home, 6, 4096, None);
    a.wait_event("registered", Duration::from_secs(5));
    let b = PipePeer::start(&rendezvous, &code, &home, 7, 4096, None);
    a.wait_event("connected", Duration::from_secs(10));
    b.wait_event("connected", Duration::from_secs(10));
    assert_eq!(
        a.finish(Duration::from_secs(10)),
        (0, 4096, Stream::hash(7, 4096))
    );
    assert_eq!(
        b.finish(Duration::from_secs(10)),
        (0, 4096, Stream::hash(6, 4096))
    );
    runtime.block_on(server.shutdown()).unwrap();
}

#[test]
fn a_peer_starting_three_seconds_later_still_connects() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let code = code();
    let (home_early, home_late) = (Home::new("early"), Home::new("late"));
    let early = PipePeer::start(&rendezvous, &code, &home_early, 3, 1000, None);
    early.wait_event("registered", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    let late = PipePeer::start(&rendezvous, &code, &home_late, 4, 1000, None);
    let connected = late.wait_event("connected", Duration::from_secs(10));
    assert!(
        connected["elapsed_ms"].as_u64().unwrap() < 2000,
        "{connected}"
    );
    early.wait_event("connected", Duration::from_secs(5));
    assert_eq!(
        early.finish(Duration::from_secs(10)),
        (0, 1000, Stream::hash(4, 1000))
    );
    assert_eq!(
        late.finish(Duration::from_secs(10)),
        (0, 1000, Stream::hash(3, 1000))
    );
    runtime.block_on(server.shutdown()).unwrap();
}

#[test]
fn unreachable_rendezvous_fails_within_six_seconds_with_the_reason() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let home = Home::new("unreachable");
    let peer = PipePeer::start(&format!("127.0.0.1:{port}"), &code(), &home, 5, 0, None);
    let error = expect_failure(peer, Duration::from_secs(10));
    let elapsed = started.elapsed();
    assert_eq!(error["kind"], "rendezvous_unreachable", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("did not answer within 5 s"),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
}

/// A rendezvous that sheds this peer's every datagram: the peer keeps
/// asking for as long as it was told to wait, and its error says the server
/// was busy, not that it did not answer.
#[test]
fn a_shedding_rendezvous_is_named_busy_after_the_wait() {
    let runtime = runtime();
    let config = Config {
        // One datagram from 127.0.0.1, then one a day.
        address_rate_limit: RateLimit {
            per_second: 1.0 / 86_400.0,
            burst: 1.0,
            max_sources: 16,
        },
        ..Config::default()
    };
    let server = runtime
        .block_on(async { driver::start(&["127.0.0.1:0".parse().unwrap()], config) })
        .unwrap();
    let rendezvous = server.local_addrs[0];
    // Someone else on this address spends its one datagram.
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"spent", rendezvous)
        .unwrap();
    let started = Instant::now();
    let home = Home::new("shed");
    let peer = PipePeer::start_with(
        &rendezvous.to_string(),
        &code(),
        &home,
        5,
        0,
        None,
        &["--wait-secs", "8"],
    );
    let error = expect_failure(peer, Duration::from_secs(15));
    let elapsed = started.elapsed();
    let stats = runtime.block_on(server.shutdown()).unwrap();
    assert_eq!(error["kind"], "rendezvous_busy", "{error}");
    assert_eq!(
        error["message"],
        format!("rendezvous {rendezvous} is busy (rate limited); retried for 8 s"),
    );
    assert!(elapsed >= Duration::from_secs(8), "took {elapsed:?}");
    // The server asked for a day; the peer asks again after 5-7.5 s.
    assert!(stats.busy_replies >= 2, "{stats}");
}

#[test]
fn the_session_survives_the_rendezvous_going_away() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let code = code();
    let (release_a, gate_a) = mpsc::channel();
    let (release_b, gate_b) = mpsc::channel();
    let len = 4 << 20;
    let (home_a, home_b) = (Home::new("survive-a"), Home::new("survive-b"));
    let a = PipePeer::start(&rendezvous, &code, &home_a, 6, len, Some(gate_a));
    let b = PipePeer::start(&rendezvous, &code, &home_b, 7, len, Some(gate_b));
    a.wait_event("connected", Duration::from_secs(10));
    b.wait_event("connected", Duration::from_secs(10));
    runtime.block_on(server.shutdown()).unwrap();
    drop(runtime);
    release_a.send(()).unwrap();
    release_b.send(()).unwrap();
    assert_eq!(
        a.finish(Duration::from_secs(30)),
        (0, len, Stream::hash(7, len))
    );
    assert_eq!(
        b.finish(Duration::from_secs(30)),
        (0, len, Stream::hash(6, len))
    );
}

/// Someone who joins the nameplate without the words (a guesser, or the
/// rendezvous operator) cannot complete the handshake, and both sides are
/// told why.
#[test]
fn a_wrong_code_fails_on_both_sides() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let nameplate = rand::random::<u16>() % 999 + 1;
    let (home_a, home_m) = (Home::new("wrong-a"), Home::new("wrong-m"));
    let owner_code = format!("{nameplate}-crossword-lantern");
    let guess = format!("{nameplate}-crossword-lanterm");
    let owner = PipePeer::start(&rendezvous, &owner_code, &home_a, 8, 10, None);
    let guesser = PipePeer::start(&rendezvous, &guess, &home_m, 9, 10, None);
    for peer in [owner, guesser] {
        let error = expect_failure(peer, Duration::from_secs(15));
        assert_eq!(error["kind"], "wrong_code", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("someone else tried this code"),
            "{message}"
        );
    }
    runtime.block_on(server.shutdown()).unwrap();
}

/// Pair once by code, save each other as contacts, then meet again with
/// `--to` alone. (An impostor's key is refused: see nat_sim.rs.)
#[test]
fn contacts_reconnect_without_a_code() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let (home_a, home_b) = (Home::new("contact-a"), Home::new("contact-b"));
    let code = code();
    let a = PipePeer::start(&rendezvous, &code, &home_a, 10, 100, None);
    let b = PipePeer::start(&rendezvous, &code, &home_b, 11, 100, None);
    let a_saw = a.wait_event("connected", Duration::from_secs(10));
    let b_saw = b.wait_event("connected", Duration::from_secs(10));
    assert_eq!(a.finish(Duration::from_secs(10)).0, 0);
    assert_eq!(b.finish(Duration::from_secs(10)).0, 0);
    for (home, name) in [(&home_a, "bob"), (&home_b, "alice")] {
        let status = Command::new(NATTER)
            .env("NATTER_HOME", &home.0)
            .args(["contacts", "add", name])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let a = PipePeer::start(&rendezvous, "--to bob", &home_a, 12, 1000, None);
    let b = PipePeer::start(&rendezvous, "--to alice", &home_b, 13, 1000, None);
    let a_again = a.wait_event("connected", Duration::from_secs(10));
    let b_again = b.wait_event("connected", Duration::from_secs(10));
    assert_eq!(a_again["peer_key"], a_saw["peer_key"]);
    assert_eq!(b_again["peer_key"], b_saw["peer_key"]);
    assert_eq!(
        a.finish(Duration::from_secs(10)),
        (0, 1000, Stream::hash(13, 1000))
    );
    assert_eq!(
        b.finish(Duration::from_secs(10)),
        (0, 1000, Stream::hash(12, 1000))
    );
    runtime.block_on(server.shutdown()).unwrap();
}

/// `natter chat` without a code makes one; the other side joins with it;
/// lines arrive with a timestamp; `/quit` on one side closes both.
#[test]
fn chat_makes_a_code_delivers_lines_and_quits_on_both_sides() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let (home_a, home_b) = (Home::new("chat-a"), Home::new("chat-b"));
    let chat = |home: &Home, code: Option<&str>| {
        let mut command = Command::new(NATTER);
        command
            .env("NATTER_HOME", &home.0)
            .args([
                "chat",
                "--json",
                "--bind",
                "127.0.0.1:0",
                "--rendezvous",
                &rendezvous,
            ])
            .args(code)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let (events_tx, events) = mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        spawn_stderr_reader(child.stderr.take().unwrap(), events_tx, lines);
        (child, events)
    };
    let wait = |events: &mpsc::Receiver<Value>, name: &str| loop {
        let event = events
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {name} event"));
        assert_ne!(event["event"], "error", "{event}");
        if event["event"] == name {
            return event;
        }
    };
    let (mut a, a_events) = chat(&home_a, None);
    let code = wait(&a_events, "code")["code"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut b, b_events) = chat(&home_b, Some(&code));
    wait(&a_events, "connected");
    wait(&b_events, "connected");

    let mut a_in = a.stdin.take().unwrap();
    writeln!(a_in, "hello from a").unwrap();
    let mut b_out = BufReader::new(b.stdout.take().unwrap());
    let mut line = String::new();
    b_out.read_line(&mut line).unwrap();
    let (stamp, text) = line
        .trim_end()
        .split_once("] peer: ")
        .expect("a timestamped line");
    assert_eq!(text, "hello from a");
    assert_eq!(stamp.len(), "[HH:MM:SS".len(), "{line:?}");

    writeln!(a_in, "/quit").unwrap();
    wait(&a_events, "closed");
    wait(&b_events, "closed");
    for child in [&mut a, &mut b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "chat did not exit after /quit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success());
    }
    runtime.block_on(server.shutdown()).unwrap();
}
