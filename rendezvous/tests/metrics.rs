//! `--metrics ADDR`: `curl` gets the counters in the Prometheus text format,
//! and they are the stats line's figures.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::register;
use natter_wire::{stun, ServerMessage};

const WAIT: Duration = Duration::from_secs(5);

/// A `natter-rendezvous` process whose log lines arrive on a channel.
struct Rendezvous {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Rendezvous {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_natter-rendezvous"))
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("natter-rendezvous starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The first log line `accept` takes, within `within`.
    fn line(&self, within: Duration, accept: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if accept(&line) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no such log line within {within:?}"),
            }
        }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn receive(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    let (len, _) = socket.recv_from(&mut buf).expect("an answer within 5 s");
    buf[..len].to_vec()
}

fn peer() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket
}

/// `key=value` pairs of a log line.
fn fields(line: &str) -> HashMap<String, f64> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .filter_map(|(key, value)| Some((key.to_string(), value.parse().ok()?)))
        .collect()
}

/// `name{labels} value` lines of a Prometheus text exposition.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter_map(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
        .collect()
}

#[test]
fn a_scrape_returns_the_stats_line_in_the_prometheus_format() {
    let metrics_port = free_tcp_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let server = Rendezvous::start(&[
        "--bind",
        "127.0.0.1:0",
        "--stats-secs",
        "1",
        "--metrics",
        &metrics,
    ]);
    let listening = server.line(WAIT, |line| line.contains("listening"));
    let target: SocketAddr = listening
        .rsplit_once("addr=")
        .and_then(|(_, addr)| addr.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {listening:?}"));
    server.line(WAIT, |line| line.contains("serving metrics"));

    // Two rooms of two peers: four registrations, two introductions.
    for room in ["metrics-a", "metrics-b"] {
        let (a, b) = (peer(), peer());
        a.send_to(&register(room), target).unwrap();
        assert!(matches!(
            ServerMessage::decode(&receive(&a)),
            Ok(ServerMessage::Registered { .. })
        ));
        b.send_to(&register(room), target).unwrap();
        for socket in [&a, &b] {
            while !matches!(
                ServerMessage::decode(&receive(socket)),
                Ok(ServerMessage::Introduce { .. })
            ) {}
        }
    }
    // Three datagrams of no protocol, then a STUN request: its answer says
    // everything before it was handled.
    let stranger = peer();
    for _ in 0..3 {
        stranger.send_to(b"not natter", target).unwrap();
    }
    stranger
        .send_to(
            &stun::binding_request(stun::TransactionId::random()),
            target,
        )
        .unwrap();
    receive(&stranger);

    let stats_line = server.line(Duration::from_secs(3), |line| {
        line.contains(" stats ") && line.contains(" in=8 ")
    });
    let output = Command::new("curl")
        .args(["--silent", "--fail", "--max-time", "5"])
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .expect("curl runs (the CI installs it)");
    assert!(output.status.success(), "curl failed: {output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    println!("{stats_line}\n{text}");

    let logged = fields(&stats_line);
    let scraped = samples(&text);
    let pairs = [
        ("in", "natter_rendezvous_datagrams_in_total"),
        ("out", "natter_rendezvous_datagrams_out_total"),
        ("bytes_in", "natter_rendezvous_bytes_in_total"),
        ("bytes_out", "natter_rendezvous_bytes_out_total"),
        ("accepted", "natter_rendezvous_accepted_total"),
        ("refused", "natter_rendezvous_refused_total"),
        ("registrations", "natter_rendezvous_registrations_total"),
        ("introductions", "natter_rendezvous_introductions_total"),
        ("stun", "natter_rendezvous_stun_responses_total"),
        ("expired", "natter_rendezvous_expired_total"),
        ("relayed", "natter_rendezvous_relayed_total"),
        ("relayed_bytes", "natter_rendezvous_relayed_bytes_total"),
        ("busy", "natter_rendezvous_busy_replies_total"),
        (
            "drop_unknown_protocol",
            "natter_rendezvous_dropped_total{reason=\"unknown_protocol\"}",
        ),
        ("peers", "natter_rendezvous_peers"),
        ("rooms", "natter_rendezvous_rooms"),
    ];
    for (field, metric) in pairs {
        assert_eq!(
            scraped.get(metric),
            logged.get(field),
            "{metric} against the stats line's {field}"
        );
    }
    assert_eq!(logged["in"], 8.0);
    assert_eq!(logged["introductions"], 2.0);
    assert_eq!(logged["peers"], 4.0);
    let dropped: f64 = scraped
        .iter()
        .filter(|(name, _)| name.starts_with("natter_rendezvous_dropped_total{"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(dropped, logged["dropped"]);
    assert_eq!(
        scraped.get("natter_rendezvous_introduction_latency_seconds_count"),
        Some(&2.0)
    );
    assert!(text.contains("# TYPE natter_rendezvous_datagrams_in_total counter"));
    assert!(text.contains("# TYPE natter_rendezvous_introduction_latency_seconds histogram"));
}

/// A metrics address that cannot be served stops the server with the
/// reason, rather than running without the metrics the operator asked for.
#[test]
fn an_unusable_metrics_address_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken.local_addr().unwrap().to_string();
    let mut server = Rendezvous::start(&["--bind", "127.0.0.1:0", "--metrics", &metrics]);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running with {metrics} taken"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let lines: Vec<String> = server.lines.try_iter().collect();
    assert!(
        lines.iter().any(|line| line.contains(&metrics)),
        "{lines:?}"
    );
}
