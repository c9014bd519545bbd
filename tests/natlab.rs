//! End-to-end hole punching through the NAT lab (`scripts/natlab.sh`): a real
//! `natter-rendezvous` in host `rv` (203.0.113.10:7777) and two real
//! `natter pipe --json` processes behind lab NATs, exchanging seeded
//! pseudo-random payloads that are checked byte for byte.
//!
//! * `nat_type_matrix`: every ordered pair of the four NAT types. All connect
//!   directly except symmetric against port-restricted or symmetric, which
//!   must connect through the rendezvous's relay after reporting the
//!   candidates they tried.
//! * `extra_topologies`: two peers behind the same NAT (host candidates), a
//!   public peer against port-restricted and symmetric NATs, and a peer
//!   behind two NATs (full-cone home router behind a port-restricted CGNAT),
//!   and two symmetric NATs with a rendezvous that does not relay (they must
//!   fail with `punch_failed`, list their candidates and say why there is no
//!   relay).
//! * `lossy_transfers`: 20 MiB each way between two port-restricted NATs with
//!   5 % and 20 % random loss on the public segment; the session must end up
//!   direct (it may start on the relay when loss delays one introduction).
//! * `relayed_transfer`: 4 MiB each way between two symmetric NATs, through
//!   the rendezvous's relay at its default rate.
//! * `a_relayed_transfer_survives_a_rendezvous_restart`: the same with the
//!   rendezvous stopped and started again once both peers are connected.
//!
//! Needs root, `ip` and `nft` (else skipped, or a failure with
//! `NATTER_REQUIRE_NATLAB=1`), and the `natter-rendezvous` binary next to
//! `natter`: run `cargo build --workspace --release` first (CI's
//! `cargo test --workspace --release` builds it).
//!
//! * `plaintext_never_crosses_the_public_segment`: tcpdump on the lab's
//!   "internet" bridge while two peers exchange known payloads, once on a
//!   direct path and once through the relay: none of the payload's bytes
//!   appear in the capture (needs `tcpdump`).
//!
//! `NATTER_NATLAB_RUNS=N` runs every case N times and the tables show median
//! figures. Each test prints its table straight to stderr so CI logs show it
//! even when the test passes.

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use natter::birthday::{FAN_ROUNDS, FAN_SOCKETS, SPRAY_BUDGET};
use serde_json::Value;
use support::binaries::Binaries;
use support::netns::{natlab_available, Lab, NsChild};

const NAT_TYPES: [&str; 4] = [
    "full-cone",
    "address-restricted",
    "port-restricted",
    "symmetric",
];

const RV_PORT: u16 = 7777;
/// Payload per side in the NAT matrix and topology cases.
const SMALL_PAYLOAD: u64 = 256 * 1024;
/// Payload per side in the loss runs.
const LOSS_PAYLOAD: u64 = 20 * 1024 * 1024;
/// Payload per side through the relay.
const RELAYED_PAYLOAD: u64 = 4 * 1024 * 1024;
/// Punch timeout given to every matrix and topology case (keeps the
/// expected failures short).
const PUNCH_TIMEOUT_MS: u64 = 3000;
/// Bounds how long a peer waits for the other to register.
const WAIT_SECS: u64 = 15;
const SMALL_CASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the rendezvous gets to answer its first STUN request.
const RENDEZVOUS_READY: Duration = Duration::from_secs(5);

static LAB_LOCK: Mutex<()> = Mutex::new(());

/// The lab tests share the kernel and run one at a time.
fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes straight to the process's stderr, past the test harness's output
/// capture, so progress and tables show in CI logs of passing tests too.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr().lock(), $($arg)*);
    }};
}

fn runs_from_env() -> usize {
    match std::env::var("NATTER_NATLAB_RUNS") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| panic!("NATTER_NATLAB_RUNS={v:?}: expected a whole number >= 1")),
        Err(_) => 1,
    }
}

// -------------------------------------------------------------- payload --

/// A deterministic byte stream (splitmix64), the same however it is chunked.
struct Payload {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Payload {
    fn new(seed: u64) -> Payload {
        Payload {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == 8 {
                self.word = self.next_word().to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What arrived on a peer's stdout, compared on the fly with what the other
/// peer was fed.
#[derive(Debug, Default, Clone)]
struct StdoutCheck {
    received: u64,
    first_mismatch: Option<u64>,
    read_error: Option<String>,
}

fn check_stream(mut from: impl Read, seed: u64, expected_len: u64) -> StdoutCheck {
    let mut expected = Payload::new(seed);
    let mut check = StdoutCheck::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                check.read_error = Some(e.to_string());
                break;
            }
        };
        if check.first_mismatch.is_none() {
            let in_range = (expected_len.saturating_sub(check.received)).min(n as u64) as usize;
            expected.fill(&mut want[..in_range]);
            if let Some(i) = (0..in_range).find(|&i| buf[i] != want[i]) {
                check.first_mismatch = Some(check.received + i as u64);
            } else if in_range < n {
                // more bytes than the other side sent
                check.first_mismatch = Some(check.received + in_range as u64);
            }
        }
        check.received += n as u64;
    }
    check
}

// ---------------------------------------------------------------- cases --

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A direct connection; `via` (both sides), when given, must match.
    Direct { via: Option<&'static str> },
    /// No direct path: a `relaying` event listing the candidates, then a
    /// connection through the rendezvous.
    Relayed,
    /// Exit code 1 and `{"event":"error","kind":"punch_failed"}` on both
    /// sides. These cases run the rendezvous with `--relay-rate 0`.
    PunchFailed,
    /// A direct connection to the other host's IPv6 address (a lab made
    /// with `--ipv6`).
    DirectIpv6,
    /// Direct, or first through the relay and then moved to a direct path:
    /// under heavy loss one peer may learn of the introduction seconds
    /// after the other, which has gone to the relay by then.
    DirectEventually,
    /// An easy↔hard pair: port prediction finds the path (a
    /// `port_prediction` event with outcome `found` on both sides, within
    /// its budgets, and the extra sockets closed after it), directly or
    /// after starting on the relay.
    DirectByPrediction,
    /// Router A maps a port for host a (`--port-mapping`): host b reaches
    /// a at the mapped address (a `port-mapped` path), directly or after
    /// starting on the relay, and no mapping is left at the router after
    /// both exited.
    DirectByPortMapping,
}

impl Expect {
    fn label(self) -> &'static str {
        match self {
            Expect::Direct { via: None } => "direct",
            Expect::Direct { via: Some("host") } => "direct/host",
            Expect::Direct { via: Some(_) } => "direct/via",
            Expect::DirectIpv6 => "direct/ipv6",
            Expect::DirectEventually => "direct*",
            Expect::DirectByPrediction => "direct/predicted",
            Expect::DirectByPortMapping => "direct/mapped",
            Expect::Relayed => "relayed",
            Expect::PunchFailed => "punch_failed",
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    lab_args: Vec<String>,
    /// The lab hosts the two peers run in.
    hosts: [&'static str; 2],
    expect: Expect,
    payload: u64,
    /// Feed stdin in pieces of this many bytes, one per interval, instead of
    /// all at once (a slow stream of lines).
    pace: Option<(usize, Duration)>,
    /// Give the peers the rendezvous's IPv6 address (a lab made with
    /// `--ipv6`), not its IPv4 one.
    rendezvous_ipv6: bool,
    timeout: Duration,
    punch_timeout_ms: Option<u64>,
}

fn expect_for(a: &str, b: &str) -> Expect {
    match (a, b) {
        // Two hard NATs: port prediction is hopeless, and not tried.
        ("symmetric", "symmetric") => Expect::Relayed,
        ("symmetric", "port-restricted") | ("port-restricted", "symmetric") => {
            Expect::DirectByPrediction
        }
        _ => Expect::Direct { via: None },
    }
}

/// Pacing for a pair that port prediction connects: the session must last
/// until prediction is done (at most about 10 s; 99 % within 6 s), even if
/// it started on the relay, so 16 pieces of 16 KiB 750 ms apart (12 s).
/// Half a second apart (8 s) let a prediction found after 7.8 s end the
/// session before the extra sockets' file descriptors could be checked.
const PREDICTION_PACE: (usize, Duration) = (16 * 1024, Duration::from_millis(750));

fn matrix_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for a in NAT_TYPES {
        for b in NAT_TYPES {
            cases.push(Case {
                name: format!("{a} x {b}"),
                lab_args: vec!["--nat-a".into(), a.into(), "--nat-b".into(), b.into()],
                hosts: ["a", "b"],
                expect: expect_for(a, b),
                payload: SMALL_PAYLOAD,
                timeout: SMALL_CASE_TIMEOUT,
                punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
                pace: (expect_for(a, b) == Expect::DirectByPrediction).then_some(PREDICTION_PACE),
                rendezvous_ipv6: false,
            });
        }
    }
    cases
}

fn topology_cases() -> Vec<Case> {
    let case = |name: &str, args: &[&str], hosts, expect| Case {
        name: name.into(),
        lab_args: args.iter().map(|s| s.to_string()).collect(),
        hosts,
        expect,
        payload: SMALL_PAYLOAD,
        timeout: SMALL_CASE_TIMEOUT,
        punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
        pace: None,
        rendezvous_ipv6: false,
    };
    vec![
        case(
            "same-nat (a, a2 behind port-restricted A)",
            &["--same-nat"],
            ["a", "a2"],
            Expect::Direct { via: Some("host") },
        ),
        case(
            "public-peer x port-restricted",
            &["--public-peer", "--nat-a", "port-restricted"],
            ["pub", "a"],
            Expect::Direct { via: None },
        ),
        case(
            "public-peer x symmetric",
            &["--public-peer", "--nat-a", "symmetric"],
            ["pub", "a"],
            Expect::Direct { via: None },
        ),
        case(
            "double-nat (full-cone behind port-restricted CGNAT) x port-restricted",
            &[
                "--double-nat",
                "--nat-a",
                "full-cone",
                "--nat-cgn",
                "port-restricted",
                "--nat-b",
                "port-restricted",
            ],
            ["a", "b"],
            Expect::Direct { via: None },
        ),
        case(
            "symmetric x symmetric, rendezvous without relay",
            &["--nat-a", "symmetric", "--nat-b", "symmetric"],
            ["a", "b"],
            Expect::PunchFailed,
        ),
    ]
}

/// Home routers without an input firewall and a router between the two
/// NATs: a probe that reaches the other router before its host has sent
/// would leave a conntrack entry there and move that host's mapping, so the
/// first probes go out with a small TTL (they die at the router between).
fn open_router_cases() -> Vec<Case> {
    [
        ("port-restricted", "port-restricted"),
        ("port-restricted", "symmetric"),
        ("symmetric", "port-restricted"),
    ]
    .into_iter()
    .map(|(a, b)| {
        let expect = expect_for(a, b);
        Case {
            name: format!("{a} x {b}, router hop, no input firewall"),
            lab_args: [
                "--nat-a",
                a,
                "--nat-b",
                b,
                "--router-hop",
                "--no-input-firewall",
            ]
            .map(String::from)
            .to_vec(),
            hosts: ["a", "b"],
            expect,
            payload: SMALL_PAYLOAD,
            timeout: SMALL_CASE_TIMEOUT,
            punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
            pace: (expect == Expect::DirectByPrediction).then_some(PREDICTION_PACE),
            rendezvous_ipv6: false,
        }
    })
    .collect()
}

/// Two symmetric NATs, router A running miniupnpd with one protocol family
/// each time: UPnP-IGD, then PCP and NAT-PMP.
fn port_mapping_cases() -> Vec<Case> {
    ["upnp", "pcp"]
        .into_iter()
        .map(|protocols| Case {
            name: format!("symmetric x symmetric, router A maps ports ({protocols})"),
            lab_args: [
                "--nat-a",
                "symmetric",
                "--nat-b",
                "symmetric",
                "--port-mapping",
                protocols,
            ]
            .map(String::from)
            .to_vec(),
            hosts: ["a", "b"],
            expect: Expect::DirectByPortMapping,
            payload: SMALL_PAYLOAD,
            timeout: SMALL_CASE_TIMEOUT,
            punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
            // Until the mapping is made and tried, even if the session
            // started on the relay.
            pace: Some(PREDICTION_PACE),
            rendezvous_ipv6: false,
        })
        .collect()
}

/// Two symmetric NATs: 4 MiB each way through the relay, whose default rate
/// (1 MiB/s per peer) bounds the transfer.
fn relayed_transfer_case() -> Case {
    Case {
        name: "symmetric x symmetric, relayed".into(),
        lab_args: ["--nat-a", "symmetric", "--nat-b", "symmetric"]
            .map(String::from)
            .to_vec(),
        hosts: ["a", "b"],
        expect: Expect::Relayed,
        payload: RELAYED_PAYLOAD,
        timeout: Duration::from_secs(60),
        punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
        pace: None,
        rendezvous_ipv6: false,
    }
}

fn loss_cases() -> Vec<Case> {
    [5u32, 20]
        .into_iter()
        .map(|loss| Case {
            name: format!("port-restricted x port-restricted, {loss} % loss"),
            lab_args: vec![
                "--nat-a".into(),
                "port-restricted".into(),
                "--nat-b".into(),
                "port-restricted".into(),
                "--loss".into(),
                loss.to_string(),
            ],
            hosts: ["a", "b"],
            expect: Expect::DirectEventually,
            payload: LOSS_PAYLOAD,
            timeout: Duration::from_secs(if loss >= 20 { 180 } else { 120 }),
            // natter's default punch timeout on purpose: the loss hits the
            // rendezvous exchange and the punching too, not only the transfer
            punch_timeout_ms: None,
            pace: None,
            rendezvous_ipv6: false,
        })
        .collect()
}

// ----------------------------------------------------------- rendezvous --

struct Rendezvous {
    child: NsChild,
    stderr: Arc<Mutex<Vec<Line>>>,
    _reader: JoinHandle<()>,
}

impl Rendezvous {
    fn start(lab: &Lab, bins: &Binaries, t0: Instant, relay: bool) -> Result<Rendezvous, String> {
        let rv_ip = lab.ip("RV_IP");
        // Two addresses and two ports (two ports on the dual-stack
        // wildcard), so that peers learn how their NATs map.
        let binds = match lab.opt_var("RV_IP6") {
            Some(_) => vec![format!("[::]:{RV_PORT}"), format!("[::]:{}", RV_PORT + 1)],
            None => [rv_ip, lab.ip("RV_IP2")]
                .iter()
                .flat_map(|ip| [format!("{ip}:{RV_PORT}"), format!("{ip}:{}", RV_PORT + 1)])
                .collect(),
        };
        let mut cmd = piped(lab.command("rv", &bins.rendezvous));
        for bind in &binds {
            cmd.args(["--bind", bind.as_str()]);
        }
        cmd.args(["--stats-secs", "0"]);
        if !relay {
            cmd.args(["--relay-rate", "0"]);
        }
        let mut child = NsChild::from_command(&mut cmd)
            .map_err(|e| format!("cannot start {}: {e}", bins.rendezvous.display()))?;
        drop(child.stdin.take());
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let err = child.stderr.take().expect("piped stderr");
            let lines = Arc::clone(&stderr);
            std::thread::spawn(move || {
                collect_lines(err, &lines, t0);
                drop(stdout);
            })
        };
        let mut rv = Rendezvous {
            child,
            stderr,
            _reader: reader,
        };
        rv.wait_ready(lab, SocketAddr::new(IpAddr::V4(rv_ip), RV_PORT))?;
        Ok(rv)
    }

    /// Sends STUN binding requests from inside `rv` until one is answered.
    fn wait_ready(&mut self, lab: &Lab, server: SocketAddr) -> Result<(), String> {
        let sock: UdpSocket = lab.udp_socket("rv", "0.0.0.0:0".parse().unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut request = [0u8; 20];
        request[..2].copy_from_slice(&0x0001u16.to_be_bytes()); // Binding request, length 0
        request[4..8].copy_from_slice(&0x2112_a442u32.to_be_bytes()); // magic cookie
        request[8..].copy_from_slice(&rand::random::<[u8; 12]>());
        let deadline = Instant::now() + RENDEZVOUS_READY;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "natter-rendezvous exited at start ({status}):\n{}",
                    self.stderr_text()
                ));
            }
            let _ = sock.send_to(&request, server);
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                if from == server {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "natter-rendezvous did not answer STUN at {server} within {RENDEZVOUS_READY:?}:\n{}",
            self.stderr_text()
        ))
    }

    fn stderr_text(&self) -> String {
        format_lines(&self.stderr.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn stop(mut self) -> String {
        let _ = self.child.terminate(Duration::from_secs(2));
        // give the reader thread a moment to take the last lines
        std::thread::sleep(Duration::from_millis(20));
        self.stderr_text()
    }
}

/// `NATTER_HOME` of the peer in `host`: under the system temp directory,
/// removed by [`TempHomes`].
fn lab_home(lab: &Lab, host: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("natter-natlab-{}", lab.id()))
        .join(host)
}

/// Removes the peers' `NATTER_HOME` directories of a lab when dropped.
struct TempHomes(PathBuf);

impl TempHomes {
    fn of(lab: &Lab) -> TempHomes {
        TempHomes(std::env::temp_dir().join(format!("natter-natlab-{}", lab.id())))
    }
}

impl Drop for TempHomes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// All three standard streams piped; plain (uncoloured) logs.
fn piped(mut cmd: Command) -> Command {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    cmd
}

/// A line of a child's stderr and when it arrived, since the case started.
type Line = (Duration, String);

fn format_lines(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|(t, l)| format!("[+{:.3} s] {l}", t.as_secs_f64()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn collect_lines(from: impl Read, into: &Mutex<Vec<Line>>, t0: Instant) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                into.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((t0.elapsed(), text));
            }
        }
    }
}

// ---------------------------------------------------------------- peers --

struct RunningPeer {
    host: &'static str,
    child: NsChild,
    writer: Option<JoinHandle<io::Result<u64>>>,
    checker: Option<JoinHandle<StdoutCheck>>,
    stderr: Arc<Mutex<Vec<Line>>>,
    stderr_reader: Option<JoinHandle<()>>,
    /// Samples of the process's open file descriptors (see [`count_fds`]).
    fd_sampler: Option<JoinHandle<Vec<(Duration, usize)>>>,
    status: Option<ExitStatus>,
    exited_after: Option<Duration>,
    exited_at: Option<Instant>,
}

/// What one peer did.
#[derive(Debug, Clone)]
struct PeerOutcome {
    host: &'static str,
    /// `None`: still running at the deadline and killed.
    status: Option<ExitStatus>,
    /// When it exited, since the lab was up (same clock as the stderr lines).
    exit_at: Option<Duration>,
    wall: Duration,
    stdout: StdoutCheck,
    stdin_result: Result<u64, String>,
    stderr: Vec<Line>,
    /// The JSON status lines, with their arrival times.
    events: Vec<(Duration, Value)>,
    /// Open file descriptors over time (same clock).
    fds: Vec<(Duration, usize)>,
}

impl PeerOutcome {
    fn event(&self, name: &str) -> Option<&Value> {
        self.events
            .iter()
            .map(|(_, e)| e)
            .find(|e| e["event"] == name)
    }

    fn event_time(&self, name: &str) -> Option<Duration> {
        self.events
            .iter()
            .find(|(_, e)| e["event"] == name)
            .map(|(t, _)| *t)
    }

    fn connected(&self) -> Option<&Value> {
        self.event("connected")
    }

    /// Port prediction's win, if this side sprayed: ms from the
    /// introduction, probes sent.
    fn sprayed(&self) -> Option<(u64, u64)> {
        let found = self.event("port_prediction")?;
        (found["outcome"] == "found" && found["socket"] == "main")
            .then(|| Some((found["after_ms"].as_u64()?, found["probes_sent"].as_u64()?)))?
    }

    fn via(&self) -> Option<String> {
        self.connected()
            .and_then(|c| c["via"].as_str())
            .map(str::to_string)
    }

    fn connect_ms(&self) -> Option<u64> {
        self.connected().and_then(|c| c["elapsed_ms"].as_u64())
    }

    fn transfer_ms(&self) -> Option<u64> {
        self.event("transferred")
            .and_then(|t| t["elapsed_ms"].as_u64())
    }

    /// "connected +1.2 transferred +73.0 closed +73.0 exit +73.1" (seconds
    /// since the lab was up).
    fn timeline(&self) -> String {
        let mut parts: Vec<String> = ["registered", "connected", "transferred", "closed", "error"]
            .into_iter()
            .filter_map(|name| {
                self.event_time(name)
                    .map(|t| format!("{name} +{:.1}", t.as_secs_f64()))
            })
            .collect();
        parts.push(match self.exit_at {
            Some(t) => format!("exit +{:.1}", t.as_secs_f64()),
            None => "killed".into(),
        });
        parts.join(" ")
    }

    fn exit_code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    fn status_text(&self) -> String {
        match self.status {
            None => format!(
                "still running after {:.1} s, killed",
                self.wall.as_secs_f64()
            ),
            Some(s) => match s.code() {
                Some(code) => format!("exit code {code} after {:.1} s", self.wall.as_secs_f64()),
                None => format!("{s} after {:.1} s", self.wall.as_secs_f64()),
            },
        }
    }
}

fn spawn_peer(
    lab: &Lab,
    bins: &Binaries,
    case: &Case,
    host: &'static str,
    code: &str,
    // seeds of the payload this peer is fed, and of the one it should receive
    [send_seed, recv_seed]: [u64; 2],
    t0: Instant,
) -> Result<RunningPeer, String> {
    let rendezvous = match case.rendezvous_ipv6 {
        true => format!("[{}]:{RV_PORT}", lab.var("RV_IP6")),
        false => format!("{}:{RV_PORT}", lab.ip("RV_IP")),
    };
    let mut args: Vec<String> = vec![
        "pipe".into(),
        "--rendezvous".into(),
        rendezvous,
        "--code".into(),
        code.into(),
        "--json".into(),
        "--wait-secs".into(),
        WAIT_SECS.to_string(),
    ];
    if let Some(ms) = case.punch_timeout_ms {
        args.push("--punch-timeout-ms".into());
        args.push(ms.to_string());
    }
    // each peer keeps its identity and contacts in its own throw-away directory
    let home = lab_home(lab, host);
    std::fs::create_dir_all(&home).map_err(|e| format!("cannot create {}: {e}", home.display()))?;
    let mut cmd = piped(lab.command(host, &bins.natter));
    cmd.args(&args).env("NATTER_HOME", &home);
    let mut child = NsChild::from_command(&mut cmd)
        .map_err(|e| format!("cannot start natter in {host}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let len = case.payload;
    let pace = case.pace;
    let writer = std::thread::spawn(move || -> io::Result<u64> {
        let mut payload = Payload::new(send_seed);
        let piece = pace.map_or(64 * 1024, |(bytes, _)| bytes);
        let mut buf = vec![0u8; piece];
        let mut written = 0u64;
        while written < len {
            let n = (len - written).min(buf.len() as u64) as usize;
            payload.fill(&mut buf[..n]);
            stdin.write_all(&buf[..n])?;
            stdin.flush()?;
            written += n as u64;
            if let Some((_, interval)) = pace {
                std::thread::sleep(interval);
            }
        }
        // dropping stdin closes it: EOF for natter
        Ok(written)
    });
    let checker = std::thread::spawn(move || check_stream(stdout, recv_seed, len));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let stderr_reader = {
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || collect_lines(err, &lines, t0))
    };
    let pid = child.id();
    let fd_sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        while let Some(count) = count_fds(pid) {
            samples.push((t0.elapsed(), count));
            std::thread::sleep(Duration::from_millis(20));
        }
        samples
    });
    Ok(RunningPeer {
        host,
        child,
        writer: Some(writer),
        checker: Some(checker),
        stderr,
        stderr_reader: Some(stderr_reader),
        fd_sampler: Some(fd_sampler),
        status: None,
        exited_after: None,
        exited_at: None,
    })
}

/// Open file descriptors of process `pid` (`ip netns exec` execs the
/// program, so the child is natter itself); `None` once it has exited.
fn count_fds(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie has exited: its descriptors are gone.
    if status.rsplit(')').next()?.trim_start().starts_with('Z') {
        return None;
    }
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Waits until both peers exited or `timeout` passed (then kills the rest).
/// `t0` is the clock of the stderr line times (the lab being up).
fn wait_peers(
    mut peers: Vec<RunningPeer>,
    started: Instant,
    timeout: Duration,
    t0: Instant,
) -> Vec<PeerOutcome> {
    let deadline = started + timeout;
    loop {
        for p in peers.iter_mut().filter(|p| p.status.is_none()) {
            if let Ok(Some(status)) = p.child.try_wait() {
                p.status = Some(status);
                p.exited_after = Some(started.elapsed());
                p.exited_at = Some(Instant::now());
            }
        }
        if peers.iter().all(|p| p.status.is_some()) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    peers
        .into_iter()
        .map(|mut p| {
            if p.status.is_none() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            // the child is gone, so its pipes are closed and the threads end
            let stdin_result = match p.writer.take().map(JoinHandle::join) {
                Some(Ok(Ok(n))) => Ok(n),
                Some(Ok(Err(e))) => Err(e.to_string()),
                _ => Err("stdin writer panicked".into()),
            };
            let stdout = p
                .checker
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            if let Some(h) = p.stderr_reader.take() {
                let _ = h.join();
            }
            let stderr = std::mem::take(&mut *p.stderr.lock().unwrap_or_else(|e| e.into_inner()));
            let events = stderr
                .iter()
                .filter_map(|(t, l)| Some((*t, serde_json::from_str::<Value>(l).ok()?)))
                .filter(|(_, v)| v.get("event").is_some())
                .collect();
            let fds = p
                .fd_sampler
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            PeerOutcome {
                host: p.host,
                status: p.status,
                exit_at: p.exited_at.map(|t| t - t0),
                wall: p.exited_after.unwrap_or_else(|| started.elapsed()),
                stdout,
                stdin_result,
                stderr,
                events,
                fds,
            }
        })
        .collect()
}

// ------------------------------------------------------------ one run --

/// One run of one case.
#[derive(Debug, Clone)]
struct CaseRun {
    ok: bool,
    outcome: String,
    via: [Option<String>; 2],
    connect_ms: [Option<u64>; 2],
    transfer_ms: [Option<u64>; 2],
    /// Per peer: when it connected, transferred, closed and exited (seconds
    /// since the lab was up).
    timeline: [String; 2],
    /// Port prediction's win, from the side that sprayed: ms from the
    /// introduction, and probes sent.
    prediction: Option<(u64, u64)>,
    wall: Duration,
    failures: Vec<String>,
}

/// The LAN and public IPv4 address of a lab host.
fn host_addrs(lab: &Lab, host: &str) -> (Ipv4Addr, Ipv4Addr) {
    match host {
        "a" => (lab.ip("A_IP"), lab.ip("A_PUBLIC_IP")),
        "a2" => (lab.ip("A2_IP"), lab.ip("A_PUBLIC_IP")),
        "b" => (lab.ip("B_IP"), lab.ip("B_PUBLIC_IP")),
        "pub" => (lab.ip("PUB_IP"), lab.ip("PUB_IP")),
        other => panic!("no addresses known for lab host {other}"),
    }
}

/// The IPv6 address of a lab host (a lab made with `--ipv6`).
fn host_ipv6(lab: &Lab, host: &str) -> IpAddr {
    let key = match host {
        "a" => "A_IP6",
        "b" => "B_IP6",
        other => panic!("no IPv6 address for lab host {other}"),
    };
    lab.var(key).parse().expect("an IPv6 address")
}

fn ip_of(addr: &Value) -> Option<IpAddr> {
    addr.as_str()?.parse::<SocketAddr>().ok().map(|a| a.ip())
}

fn run_case(bins: &Binaries, case: &Case, run: usize) -> CaseRun {
    let started_case = Instant::now();
    let lab = Lab::up(&case.lab_args.iter().map(String::as_str).collect::<Vec<_>>());
    let homes = TempHomes::of(&lab);
    let fail_early = |msg: String| CaseRun {
        ok: false,
        outcome: "SETUP FAILED".into(),
        via: [None, None],
        connect_ms: [None, None],
        transfer_ms: [None, None],
        timeline: [String::new(), String::new()],
        prediction: None,
        wall: started_case.elapsed(),
        failures: vec![msg],
    };
    let relay = case.expect != Expect::PunchFailed;
    let rv = match Rendezvous::start(&lab, bins, started_case, relay) {
        Ok(rv) => rv,
        Err(e) => return fail_early(e),
    };
    // a pairing code: nameplate (the rendezvous room) and words (the secret)
    let code = format!(
        "{}-natlab-{:08x}",
        rand::random::<u16>().max(1),
        rand::random::<u32>()
    );
    let run_tag = run.to_le_bytes();
    let seeds = [0u8, 1].map(|side| fnv1a(&[case.name.as_bytes(), &run_tag, &[side]]));
    let started = Instant::now();
    let mut peers = Vec::new();
    for (i, host) in case.hosts.into_iter().enumerate() {
        // stderr line times count from `started_case`, like the rendezvous's
        match spawn_peer(
            &lab,
            bins,
            case,
            host,
            &code,
            [seeds[i], seeds[1 - i]],
            started_case,
        ) {
            Ok(p) => peers.push(p),
            Err(e) => return fail_early(e),
        }
    }
    let outcomes = wait_peers(peers, started, case.timeout, started_case);
    let rv_log = rv.stop();

    let mut failures = Vec::new();
    if lab.opt_var("PORT_MAPPING").is_some_and(|p| !p.is_empty()) {
        // Both peers exited: whatever they mapped must be gone.
        let rules = lab.exec_ok(
            "ra",
            "nft",
            ["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
        );
        if rules.contains("dnat") {
            failures.push(format!("a port mapping was left at router A:\n{rules}"));
        }
    }
    for (i, p) in outcomes.iter().enumerate() {
        let other = &outcomes[1 - i];
        check_peer(&lab, case, p, other, &mut failures);
    }
    let found = |p: &PeerOutcome| {
        p.event("port_prediction")
            .is_some_and(|e| e["outcome"] == "found")
    };
    if case.expect == Expect::DirectByPrediction && !outcomes.iter().any(found) {
        failures.push("port prediction found the path on neither side".into());
    }
    let ok = failures.is_empty();
    let outcome = if ok {
        match case.expect {
            Expect::Direct { .. } => "direct".to_string(),
            Expect::DirectIpv6 => "direct/ipv6".to_string(),
            Expect::DirectEventually => "direct".to_string(),
            Expect::DirectByPrediction => "direct/predicted".to_string(),
            Expect::DirectByPortMapping => "direct/mapped".to_string(),
            Expect::Relayed => "relayed".to_string(),
            Expect::PunchFailed => "punch_failed".to_string(),
        }
    } else {
        let summary: Vec<String> = outcomes
            .iter()
            .map(|p| {
                let what = p
                    .event("error")
                    .and_then(|e| e["kind"].as_str())
                    .map(str::to_string)
                    .or_else(|| p.connected().map(|_| "connected".to_string()))
                    .unwrap_or_else(|| "?".into());
                let code = p.exit_code().map_or_else(
                    || {
                        if p.status.is_none() {
                            "timeout".into()
                        } else {
                            "signal".into()
                        }
                    },
                    |c| c.to_string(),
                );
                format!("{}:{what}/{code}", p.host)
            })
            .collect();
        format!("FAIL {}", summary.join(" "))
    };
    if !ok {
        dump_failure(case, run, &code, &lab, &outcomes, &failures, &rv_log);
    }
    drop(homes);
    drop(lab);
    CaseRun {
        ok,
        outcome,
        via: [outcomes[0].via(), outcomes[1].via()],
        connect_ms: [outcomes[0].connect_ms(), outcomes[1].connect_ms()],
        transfer_ms: [outcomes[0].transfer_ms(), outcomes[1].transfer_ms()],
        timeline: [outcomes[0].timeline(), outcomes[1].timeline()],
        prediction: outcomes.iter().find_map(PeerOutcome::sprayed),
        wall: started.elapsed(),
        failures,
    }
}

fn check_peer(
    lab: &Lab,
    case: &Case,
    p: &PeerOutcome,
    other: &PeerOutcome,
    failures: &mut Vec<String>,
) {
    let me = p.host;
    let (_, my_public) = host_addrs(lab, me);
    let (other_lan, other_public) = host_addrs(lab, other.host);
    let mut fail = |msg: String| failures.push(format!("{me}: {msg}"));

    if case.expect == Expect::DirectByPrediction {
        check_prediction(p, &mut fail);
    }
    if case.expect == Expect::DirectByPortMapping && me == "b" {
        let port_mapped = p.events.iter().any(|(_, e)| {
            matches!(e["event"].as_str(), Some("connected" | "path_changed"))
                && e["via"] == "port-mapped"
        });
        if !port_mapped {
            fail("never on a port-mapped path to the other peer".into());
        }
    }
    if p.status.is_none() {
        fail(format!(
            "did not exit within {:.0} s (killed)",
            case.timeout.as_secs_f64()
        ));
    }
    if let Some(reg) = p.event("registered") {
        let seen = ip_of(&reg["reflexive"]);
        // Over IPv6 the rendezvous sees the host itself: no NAT.
        let ipv6 = seen.is_some_and(|ip| ip.is_ipv6());
        let expected = match ipv6 {
            true => host_ipv6(lab, me),
            false => IpAddr::V4(my_public),
        };
        if seen != Some(expected) {
            fail(format!(
                "registered with reflexive {} but its public address is {my_public}",
                reg["reflexive"]
            ));
        }
    } else {
        fail("no {\"event\":\"registered\"} line".into());
    }
    match case.expect {
        Expect::DirectIpv6 => {
            if p.exit_code() != Some(0) {
                fail(format!("{}, expected exit code 0", p.status_text()));
            }
            match p.connected() {
                Some(c)
                    if c["path"] == "direct"
                        && ip_of(&c["remote"]) == Some(host_ipv6(lab, other.host)) => {}
                other_event => fail(format!(
                    "expected a direct connection to {}, got {other_event:?}",
                    host_ipv6(lab, other.host)
                )),
            }
            check_stdout(case, p, other, &mut fail);
        }
        Expect::Direct { .. }
        | Expect::DirectEventually
        | Expect::DirectByPrediction
        | Expect::DirectByPortMapping
        | Expect::Relayed => {
            let relayed = case.expect == Expect::Relayed;
            let via = match case.expect {
                Expect::Direct { via } => via,
                Expect::DirectEventually
                | Expect::DirectByPrediction
                | Expect::DirectByPortMapping => None,
                _ => Some("relayed"),
            };
            if relayed {
                match p.event("relaying") {
                    Some(r) if r["candidates"].as_array().is_some_and(|c| !c.is_empty()) => {}
                    other => fail(format!(
                        "expected a \"relaying\" event with the candidates tried, got {other:?}"
                    )),
                }
                // Paced under the relay's rate, which drops what goes over
                // (unpaced, half of what the channel sent was lost there).
                if let Some(t) = p.event("transferred") {
                    let count = |key: &str| t["channel"][key].as_u64().unwrap_or(0);
                    let (lost, sent) = (count("packets_lost"), count("packets_sent"));
                    if lost * 20 > sent {
                        fail(format!(
                            "lost {lost} of {sent} packets on the relay, over 5 %"
                        ));
                    }
                }
            }
            if p.status.is_some() && p.exit_code() != Some(0) {
                fail(format!("{}, expected exit code 0", p.status_text()));
            }
            if let Some(err) = p.event("error") {
                fail(format!("error event: {err}"));
            }
            match p.connected() {
                None => fail("no {\"event\":\"connected\"} line".into()),
                Some(c) => {
                    let want_path = if relayed { "relayed" } else { "direct" };
                    let moved_direct_later = p
                        .events
                        .iter()
                        .any(|(_, e)| e["event"] == "path_changed" && e["path"] == "direct");
                    let relay_first = matches!(
                        case.expect,
                        Expect::DirectEventually
                            | Expect::DirectByPrediction
                            | Expect::DirectByPortMapping
                    ) && c["path"] == "relayed"
                        && moved_direct_later;
                    if c["path"] != want_path && !relay_first {
                        fail(format!(
                            "connected with path {}, expected {want_path:?}",
                            c["path"]
                        ));
                    }
                    let got_via = c["via"].as_str().unwrap_or("");
                    let vias = [
                        "host",
                        "port-mapped",
                        "reflexive",
                        "peer-reflexive",
                        "relayed",
                    ];
                    if !vias.contains(&got_via) {
                        fail(format!("connected with via {}", c["via"]));
                    }
                    if let Some(want) = via {
                        if got_via != want {
                            fail(format!("connected via {got_via:?}, expected {want:?}"));
                        }
                    }
                    if c["elapsed_ms"].as_u64().is_none() {
                        fail(format!("connected without a numeric elapsed_ms: {c}"));
                    }
                    let want_ip = match got_via {
                        "host" => other_lan,
                        "relayed" => lab.ip("RV_IP"),
                        _ => other_public,
                    };
                    if ip_of(&c["remote"]) != Some(IpAddr::V4(want_ip)) {
                        fail(format!(
                            "connected to remote {} via {got_via}, expected an address of {want_ip} ({})",
                            c["remote"], other.host
                        ));
                    }
                }
            }
            check_stdout(case, p, other, &mut fail);
        }
        Expect::PunchFailed => {
            if p.exit_code() != Some(1) {
                fail(format!("{}, expected exit code 1", p.status_text()));
            }
            if let Some(c) = p.connected() {
                fail(format!(
                    "connected although no direct path should exist: {c}"
                ));
            }
            match p.event("error") {
                None => fail("no {\"event\":\"error\"} line".into()),
                Some(err) => {
                    if err["kind"] != "punch_failed" {
                        fail(format!(
                            "error kind {}, expected \"punch_failed\": {err}",
                            err["kind"]
                        ));
                    }
                    let message = err["message"].as_str().unwrap_or("");
                    let candidates: Vec<String> = p
                        .event("introduced")
                        .and_then(|i| i["candidates"].as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|c| c.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    if candidates.is_empty() {
                        fail("no {\"event\":\"introduced\"} line with candidates".into());
                    }
                    if !message.contains("the rendezvous does not relay") {
                        fail(format!(
                            "punch_failed message does not say why there is no relay: {message:?}"
                        ));
                    }
                    for cand in &candidates {
                        // "reflexive 203.0.113.12:5000": the address must be in the report
                        let addr = cand.rsplit(' ').next().unwrap_or(cand);
                        if !message.contains(addr) {
                            fail(format!(
                                "punch_failed message does not list candidate {cand:?}: {message:?}"
                            ));
                        }
                    }
                    if !message.contains("probes sent") {
                        fail(format!(
                            "punch_failed message has no probe counts: {message:?}"
                        ));
                    }
                }
            }
            if p.stdout.received != 0 {
                fail(format!(
                    "wrote {} bytes to stdout without a connection",
                    p.stdout.received
                ));
            }
        }
    }
}

/// Port prediction kept to its budgets, never gave up, and the side that
/// fanned out closed every extra socket but the winner's. One side's
/// prediction may end `stopped` rather than `found`: a probe can land on
/// the hard side's main socket (its own mapping towards the easy side is
/// one more target), or a plain probe on a fan socket's port (a random
/// port can repeat for another destination); the path is direct either
/// way, and [`run_case`] asks that at least one side found it.
fn check_prediction(p: &PeerOutcome, fail: &mut impl FnMut(String)) {
    let Some((found_at, found)) = p
        .events
        .iter()
        .find(|(_, e)| e["event"] == "port_prediction")
    else {
        return fail("no port_prediction event".into());
    };
    if found["outcome"] != "found" && found["outcome"] != "stopped" {
        return fail(format!("port prediction did not find the path: {found}"));
    }
    let probes = found["probes_sent"].as_u64().unwrap_or(u64::MAX);
    let sockets = found["sockets_opened"].as_u64().unwrap_or(u64::MAX);
    let extra = found["socket"] == "extra";
    let budget = if extra {
        u64::from(FAN_SOCKETS) * u64::from(FAN_ROUNDS)
    } else {
        u64::from(SPRAY_BUDGET)
    };
    if probes > budget || sockets > u64::from(FAN_SOCKETS) {
        fail(format!(
            "over budget ({budget} probes, {FAN_SOCKETS} sockets): {found}"
        ));
    }
    if !extra {
        return;
    }
    // The extra sockets, all open at the peak, all but one closed soon
    // after the win.
    let peak = p.fds.iter().map(|&(_, n)| n as u64).max().unwrap_or(0);
    let settle = *found_at + Duration::from_millis(300);
    match p.fds.iter().find(|&&(t, _)| t >= settle) {
        Some(&(_, after)) if peak >= after as u64 + sockets - 1 => {}
        Some(&(_, after)) => fail(format!(
            "file descriptors: {peak} at the peak, {after} after the win with {sockets} extra sockets opened: not all losers were closed"
        )),
        None => fail("no file descriptor sample after the win".into()),
    }
}

/// The peer wrote exactly what the other was fed, and took all it was fed.
fn check_stdout(case: &Case, p: &PeerOutcome, other: &PeerOutcome, fail: &mut impl FnMut(String)) {
    let s = &p.stdout;
    if let Some(e) = &s.read_error {
        fail(format!("reading its stdout failed: {e}"));
    }
    if s.received != case.payload || s.first_mismatch.is_some() {
        fail(format!(
            "stdout: {} bytes{}, expected exactly the {} bytes {} was fed",
            s.received,
            s.first_mismatch
                .map(|o| format!(", first differing byte at offset {o}"))
                .unwrap_or_default(),
            case.payload,
            other.host
        ));
    }
    if let (Err(e), Some(0)) = (&p.stdin_result, p.exit_code()) {
        fail(format!("writing its stdin failed: {e}"));
    }
}

fn dump_failure(
    case: &Case,
    run: usize,
    code: &str,
    lab: &Lab,
    outcomes: &[PeerOutcome],
    failures: &[String],
    rv_log: &str,
) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n======== natlab FAILED: {} (run {}, lab {}, code {code}, natlab.sh up {}) ========",
        case.name,
        run + 1,
        lab.id(),
        case.lab_args.join(" ")
    );
    for f in failures {
        let _ = writeln!(out, "  * {f}");
    }
    let introduced: Vec<String> = outcomes
        .iter()
        .map(|p| match p.event_time("introduced") {
            Some(t) => format!("{} at +{:.3} s", p.host, t.as_secs_f64()),
            None => format!("{} never", p.host),
        })
        .collect();
    let _ = writeln!(
        out,
        "  (introduced: {}; times count from the lab being up)",
        introduced.join(", ")
    );
    for p in outcomes {
        let _ = writeln!(
            out,
            "---- peer {} ({}; stdout {} bytes) stderr:",
            p.host,
            p.status_text(),
            p.stdout.received
        );
        for line in format_lines(&p.stderr).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "---- natter-rendezvous stderr:");
    for line in rv_log.lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "======== end of {} ========", case.name);
    say!("{out}");
}

// ---------------------------------------------------------- reporting --

struct CaseSummary {
    case: Case,
    runs: Vec<CaseRun>,
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

impl CaseSummary {
    fn ok_count(&self) -> usize {
        self.runs.iter().filter(|r| r.ok).count()
    }

    fn outcome(&self) -> String {
        let n = self.runs.len();
        if n == 1 {
            return self.runs[0].outcome.clone();
        }
        let ok = self.ok_count();
        match self.runs.iter().find(|r| !r.ok) {
            None => format!("{} {ok}/{n}", self.runs[0].outcome),
            Some(bad) => format!("{ok}/{n} ok; {}", bad.outcome),
        }
    }

    fn via(&self) -> String {
        let set = |i: usize| -> String {
            let s: BTreeSet<&str> = self
                .runs
                .iter()
                .filter_map(|r| r.via[i].as_deref())
                .collect();
            if s.is_empty() {
                "-".into()
            } else {
                s.into_iter().collect::<Vec<_>>().join("|")
            }
        };
        format!("{} / {}", set(0), set(1))
    }

    fn side_median(&self, pick: impl Fn(&CaseRun) -> [Option<u64>; 2], side: usize) -> Option<u64> {
        median(
            self.runs
                .iter()
                .filter(|r| r.ok)
                .filter_map(|r| pick(r)[side])
                .collect(),
        )
    }

    fn pair(&self, pick: impl Fn(&CaseRun) -> [Option<u64>; 2] + Copy) -> String {
        format!(
            "{} / {}",
            fmt_opt(self.side_median(pick, 0)),
            fmt_opt(self.side_median(pick, 1))
        )
    }

    /// Slowest side's connect time per successful run: min..max.
    fn connect_range(&self) -> String {
        let v: Vec<u64> = self
            .runs
            .iter()
            .filter(|r| r.ok)
            .filter_map(|r| r.connect_ms[0].max(r.connect_ms[1]))
            .collect();
        match (v.iter().min(), v.iter().max()) {
            (Some(lo), Some(hi)) => format!("{lo}..{hi}"),
            _ => "-".into(),
        }
    }

    fn wall_median(&self) -> f64 {
        let ms = median(
            self.runs
                .iter()
                .map(|r| r.wall.as_millis() as u64)
                .collect(),
        );
        ms.unwrap_or(0) as f64 / 1e3
    }
}

fn print_table(title: &str, summaries: &[CaseSummary], runs: usize, total: Duration) {
    let width = summaries
        .iter()
        .map(|s| s.case.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = String::new();
    let med = if runs > 1 { " (median)" } else { "" };
    let _ = writeln!(
        out,
        "\n{title}: {} cases x {runs} run(s), {:.1} s; hosts (x / y) = the two peers in case order",
        summaries.len(),
        total.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<width$}  {:<12}  {:<40}  {:<31}  {:<22}  {:<11}  {:>6}",
        "case",
        "expected",
        "outcome",
        "via (x / y)",
        format!("connect ms{med}"),
        "connect max",
        "wall s"
    );
    let _ = writeln!(
        out,
        "{}",
        "-".repeat(width + 2 + 12 + 2 + 40 + 2 + 31 + 2 + 22 + 2 + 11 + 2 + 6)
    );
    for s in summaries {
        let _ = writeln!(
            out,
            "{:<width$}  {:<12}  {:<40}  {:<31}  {:<22}  {:<11}  {:>6.1}",
            s.case.name,
            s.case.expect.label(),
            s.outcome(),
            s.via(),
            s.pair(|r| r.connect_ms),
            s.connect_range(),
            s.wall_median()
        );
    }
    say!("{out}");
}

fn print_transfer_table(summaries: &[CaseSummary], runs: usize) {
    let mut out = String::new();
    let med = if runs > 1 { " (median)" } else { "" };
    let _ = writeln!(out, "\ntransfers{med}: bytes each way, transfer time (natter's `transferred` elapsed_ms, x / y), throughput of the slower side");
    for s in summaries {
        let t0 = s.side_median(|r| r.transfer_ms, 0);
        let t1 = s.side_median(|r| r.transfer_ms, 1);
        let slow = t0.max(t1);
        let rate = slow
            .filter(|ms| *ms > 0)
            .map(|ms| {
                format!(
                    "{:.2} MiB/s",
                    s.case.payload as f64 / 1_048_576.0 / (ms as f64 / 1e3)
                )
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "  {:<48} {} MiB  {} ms / {} ms  {rate}  (wall {:.1} s, {})",
            s.case.name,
            s.case.payload / 1_048_576,
            fmt_opt(t0),
            fmt_opt(t1),
            s.wall_median(),
            s.outcome()
        );
        for r in &s.runs {
            for (host, line) in s.case.hosts.iter().zip(&r.timeline) {
                let _ = writeln!(out, "    {host}: {line}");
            }
        }
        if runs > 1 {
            let all: Vec<String> = s
                .runs
                .iter()
                .map(|r| {
                    format!(
                        "{}/{}",
                        fmt_opt(r.transfer_ms[0]),
                        fmt_opt(r.transfer_ms[1])
                    )
                })
                .collect();
            let _ = writeln!(out, "    every run (ms): {}", all.join(", "));
        }
    }
    say!("{out}");
}

fn run_suite(title: &str, cases: Vec<Case>) -> Vec<CaseSummary> {
    let bins = Binaries::find();
    let runs = runs_from_env();
    let started = Instant::now();
    let total = cases.len() * runs;
    let mut summaries: Vec<CaseSummary> = cases
        .into_iter()
        .map(|case| CaseSummary {
            case,
            runs: Vec::new(),
        })
        .collect();
    let mut done = 0;
    for run in 0..runs {
        for s in summaries.iter_mut() {
            let r = run_case(&bins, &s.case, run);
            done += 1;
            say!(
                "natlab {title} [{done}/{total}] {}: {} via {:?}/{:?} connect {}/{} ms transfer {}/{} ms (wall {:.1} s)",
                s.case.name,
                r.outcome,
                r.via[0].as_deref().unwrap_or("-"),
                r.via[1].as_deref().unwrap_or("-"),
                fmt_opt(r.connect_ms[0]),
                fmt_opt(r.connect_ms[1]),
                fmt_opt(r.transfer_ms[0]),
                fmt_opt(r.transfer_ms[1]),
                r.wall.as_secs_f64()
            );
            s.runs.push(r);
        }
    }
    print_table(title, &summaries, runs, started.elapsed());
    summaries
}

fn assert_all_ok(title: &str, summaries: &[CaseSummary]) {
    let mut report = String::new();
    for s in summaries {
        for (i, r) in s.runs.iter().enumerate().filter(|(_, r)| !r.ok) {
            let _ = writeln!(report, "{} (run {}):", s.case.name, i + 1);
            for f in &r.failures {
                let _ = writeln!(report, "    {f}");
            }
        }
    }
    assert!(
        report.is_empty(),
        "{title}: some cases failed (peer stderr is printed above):\n{report}"
    );
}

// ---------------------------------------------------------------- tests --

#[test]
fn nat_type_matrix() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let summaries = run_suite(
        "NAT type matrix (x = a behind NAT A, y = b behind NAT B)",
        matrix_cases(),
    );
    assert_all_ok("NAT type matrix", &summaries);
}

/// The two easy↔hard pairs of the matrix, `NATTER_LAB_RUNS` times each
/// (the figures of `docs/HOW-IT-WORKS.md` are from 20), with the time from
/// the introduction to the path port prediction found and the probes it
/// took.
#[test]
fn port_prediction_pairs() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let cases: Vec<Case> = matrix_cases()
        .into_iter()
        .filter(|c| c.expect == Expect::DirectByPrediction)
        .collect();
    let summaries = run_suite("port prediction (easy x hard)", cases);
    for s in &summaries {
        let mut ms: Vec<u64> = s
            .runs
            .iter()
            .filter_map(|r| r.prediction.map(|p| p.0))
            .collect();
        let mut probes: Vec<u64> = s
            .runs
            .iter()
            .filter_map(|r| r.prediction.map(|p| p.1))
            .collect();
        ms.sort_unstable();
        probes.sort_unstable();
        say!(
            "port prediction {}: {}/{} found; after {} ms median, {} ms max; {} probes median, {} max",
            s.case.name,
            ms.len(),
            s.runs.len(),
            fmt_opt(median(ms.clone())),
            fmt_opt(ms.last().copied()),
            fmt_opt(median(probes.clone())),
            fmt_opt(probes.last().copied()),
        );
    }
    assert_all_ok("port prediction", &summaries);
}

/// `NATTER_LAB_RUNS` times each.
#[test]
fn port_mapping_pairs() {
    if !support::netns::natlab_port_mapping_available() {
        return;
    }
    let _lock = lab_lock();
    let summaries = run_suite("port mapping (miniupnpd at router A)", port_mapping_cases());
    assert_all_ok("port mapping", &summaries);
}

/// `NATTER_LAB_RUNS` times each (the figures in the notes are from 20).
#[test]
fn routers_without_an_input_firewall() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let summaries = run_suite(
        "routers without an input firewall, a router between them",
        open_router_cases(),
    );
    assert_all_ok("routers without an input firewall", &summaries);
}

#[test]
fn extra_topologies() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let summaries = run_suite("extra topologies", topology_cases());
    assert_all_ok("extra topologies", &summaries);
}

#[test]
fn lossy_transfers() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let summaries = run_suite("loss runs (20 MiB each way)", loss_cases());
    print_transfer_table(&summaries, runs_from_env());
    assert_all_ok("loss runs", &summaries);
}

#[test]
fn relayed_transfer() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let summaries = run_suite(
        "relayed transfer (4 MiB each way)",
        vec![relayed_transfer_case()],
    );
    print_transfer_table(&summaries, runs_from_env());
    assert_all_ok("relayed transfer", &summaries);
}

/// Two symmetric NATs relay 4 MiB each way; the rendezvous is stopped and
/// started again (all its state gone) as soon as both are connected. The
/// peers register again at their next refresh, the new server introduces
/// them again, and the transfer completes byte-exact on the new route.
#[test]
fn a_relayed_transfer_survives_a_rendezvous_restart() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let case = Case {
        name: "relayed, rendezvous restarted".into(),
        timeout: Duration::from_secs(120),
        ..relayed_transfer_case()
    };
    let t0 = Instant::now();
    let lab = Lab::up(&case.lab_args.iter().map(String::as_str).collect::<Vec<_>>());
    let _homes = TempHomes::of(&lab);
    let rv = Rendezvous::start(&lab, &bins, t0, true).expect("rendezvous starts");
    let code = format!(
        "{}-restart-{:08x}",
        rand::random::<u16>().max(1),
        rand::random::<u32>()
    );
    let seeds = [0x5eed, 0xfeed];
    let peers: Vec<_> = case
        .hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            spawn_peer(
                &lab,
                &bins,
                &case,
                host,
                &code,
                [seeds[i], seeds[1 - i]],
                t0,
            )
            .expect("peer starts")
        })
        .collect();
    let connected = |p: &RunningPeer| {
        p.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(_, line)| line.contains(r#""event":"connected""#))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !peers.iter().all(connected) {
        assert!(
            Instant::now() < deadline,
            "the peers did not connect within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_log = rv.stop();
    let restarted_at = t0.elapsed();
    let rv = Rendezvous::start(&lab, &bins, t0, true).expect("rendezvous restarts");
    let outcomes = wait_peers(peers, Instant::now(), case.timeout, t0);
    let second_log = rv.stop();
    let mut failures = Vec::new();
    for (i, p) in outcomes.iter().enumerate() {
        check_peer(&lab, &case, p, &outcomes[1 - i], &mut failures);
    }
    for p in &outcomes {
        say!(
            "natlab restart: rendezvous restarted at +{:.1} s; {}: {}",
            restarted_at.as_secs_f64(),
            p.host,
            p.event("transferred")
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
    }
    assert!(
        failures.is_empty(),
        "{failures:#?}\n---- first rendezvous:\n{first_log}\n---- second rendezvous:\n{second_log}\n---- peers:\n{}",
        outcomes
            .iter()
            .map(|p| format!("{}:\n{}", p.host, format_lines(&p.stderr)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Everything on the public segment (the bridge ports of all routers and
/// the rendezvous) is captured while two peers behind NATs send each
/// other 256 KiB of known bytes: not one 32-byte run of those bytes may
/// appear in the capture, while the capture must hold at least as many bytes
/// as were sent (so an empty capture cannot pass).
#[test]
fn plaintext_never_crosses_the_public_segment() {
    if !natlab_available() {
        return;
    }
    let Some(tcpdump) = support::netns::find_program("tcpdump") else {
        assert!(
            std::env::var(support::netns::REQUIRE_ENV).as_deref() != Ok("1"),
            "tcpdump (Debian package tcpdump) is required for the capture test"
        );
        say!("SKIPPED capture test: tcpdump not installed");
        return;
    };
    let _lock = lab_lock();
    let bins = Binaries::find();
    // A direct path between port-restricted NATs, then the relay between
    // two symmetric ones: the rendezvous's own links are on the segment too.
    capture_one_session(&bins, &tcpdump, &[], "direct");
    capture_one_session(
        &bins,
        &tcpdump,
        &["--nat-a", "symmetric", "--nat-b", "symmetric"],
        "relayed",
    );
}

fn capture_one_session(bins: &Binaries, tcpdump: &std::path::Path, lab_args: &[&str], path: &str) {
    let case = Case {
        name: "capture".into(),
        lab_args: lab_args.iter().map(|s| s.to_string()).collect(),
        hosts: ["a", "b"],
        expect: Expect::Direct { via: None },
        payload: SMALL_PAYLOAD,
        timeout: SMALL_CASE_TIMEOUT,
        punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
        pace: None,
        rendezvous_ipv6: false,
    };
    let t0 = Instant::now();
    let lab = Lab::up(lab_args);
    let _homes = TempHomes::of(&lab);
    let pcap = std::env::temp_dir().join(format!("natter-natlab-{}.pcap", lab.id()));
    let mut capture = piped(lab.command("inet", tcpdump));
    capture
        .args(["-i", "br0", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("udp");
    let mut capture = NsChild::from_command(&mut capture).expect("tcpdump starts");
    drop(capture.stdin.take());
    // Every interface of the internet namespace: each bridge port, so each
    // datagram is seen entering and leaving. tcpdump says "listening on"
    // once it captures.
    let mut stderr = BufReader::new(capture.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        let read = stderr.read_line(&mut line).expect("tcpdump stderr");
        assert!(read > 0, "tcpdump stopped before capturing");
    }
    let rv = Rendezvous::start(&lab, bins, t0, true).expect("rendezvous starts");
    let code = format!(
        "{}-capture-{:08x}",
        rand::random::<u16>().max(1),
        rand::random::<u32>()
    );
    let seeds = [0xcafe, 0xbeef];
    let peers = case
        .hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            spawn_peer(&lab, bins, &case, host, &code, [seeds[i], seeds[1 - i]], t0)
                .expect("peer starts")
        })
        .collect();
    let outcomes = wait_peers(peers, Instant::now(), case.timeout, t0);
    rv.stop();
    // tcpdump may still be reading its buffer: send a marker across the
    // bridge and stop it only once the marker is in the file.
    let marker = format!("end of capture {}", lab.id());
    let socket = lab.udp_socket("rv", "0.0.0.0:0".parse().unwrap());
    let router = SocketAddr::new(IpAddr::V4(lab.ip("RA_WAN_IP")), 9);
    let deadline = Instant::now() + Duration::from_secs(5);
    let captured = loop {
        socket
            .send_to(marker.as_bytes(), router)
            .expect("marker sent");
        let captured = std::fs::read(&pcap).expect("the capture file");
        if captured
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
        {
            break captured;
        }
        assert!(
            Instant::now() < deadline,
            "tcpdump did not record the end marker within 5 s"
        );
        let _ = capture.wait_timeout(Duration::from_millis(50));
    };
    let _ = capture.terminate(Duration::from_secs(2));
    let _ = std::fs::remove_file(&pcap);
    for outcome in &outcomes {
        assert_eq!(
            outcome.exit_code(),
            Some(0),
            "{}: {}",
            outcome.host,
            format_lines(&outcome.stderr)
        );
        assert_eq!(
            outcome.stdout.received, SMALL_PAYLOAD,
            "{} received everything",
            outcome.host
        );
        assert_eq!(
            outcome.connected().map(|c| c["encrypted"].clone()),
            Some(Value::Bool(true))
        );
        assert_eq!(
            outcome.connected().map(|c| c["path"].clone()),
            Some(Value::from(path))
        );
    }
    assert!(
        captured.len() as u64 > 2 * SMALL_PAYLOAD,
        "the capture holds only {} bytes",
        captured.len()
    );
    let mut leaked = 0;
    for seed in seeds {
        let mut payload = vec![0u8; SMALL_PAYLOAD as usize];
        Payload::new(seed).fill(&mut payload);
        for run in payload.chunks_exact(32).step_by(16) {
            if captured.windows(32).any(|window| window == run) {
                leaked += 1;
            }
        }
    }
    say!(
        "natlab capture ({path} path): {} bytes captured on the public segment, {leaked} of 1024 sampled 32-byte runs of the payloads found",
        captured.len()
    );
    assert_eq!(leaked, 0, "plaintext crossed the public segment");
}

#[test]
fn payload_stream_is_chunking_independent() {
    let mut whole = vec![0u8; 1000];
    Payload::new(7).fill(&mut whole);
    let mut pieces = vec![0u8; 1000];
    let mut p = Payload::new(7);
    for chunk in pieces.chunks_mut(13) {
        p.fill(chunk);
    }
    assert_eq!(whole, pieces);
    let ok = check_stream(&whole[..], 7, 1000);
    assert_eq!((ok.received, ok.first_mismatch), (1000, None));
    let mut bad = whole.clone();
    bad[517] ^= 1;
    assert_eq!(check_stream(&bad[..], 7, 1000).first_mismatch, Some(517));
    assert_eq!(check_stream(&whole[..], 7, 999).first_mismatch, Some(999));
    assert_eq!(check_stream(&whole[..10], 7, 1000).received, 10);
}

// -------------------------------------------------------------- roaming --

/// Something done to the lab while two peers run: at `at` after both
/// connected (or before they start, for `Duration::ZERO` with `before`).
struct LabStep<'a> {
    name: &'static str,
    at: Duration,
    action: Box<dyn Fn(&Lab) + 'a>,
}

/// What a roaming run saw: the peers, and when each step ran (since the
/// lab was up, the clock of the peers' event times).
struct RoamingRun {
    outcomes: Vec<PeerOutcome>,
    step_times: Vec<(&'static str, Duration)>,
}

impl RoamingRun {
    fn step(&self, name: &str) -> Duration {
        self.step_times
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("step {name} did not run"))
    }

    /// Every `path_changed` event of `host`'s peer: when, its path and why.
    fn moves(&self, host: usize) -> Vec<(Duration, String, String)> {
        self.outcomes[host]
            .events
            .iter()
            .filter(|(_, e)| e["event"] == "path_changed")
            .map(|(t, e)| {
                (
                    *t,
                    e["path"].as_str().unwrap_or("?").to_string(),
                    e["reason"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect()
    }

    /// The first move of `host` to `path` after `since`, if any.
    fn moved_to(&self, host: usize, path: &str, since: Duration) -> Option<Duration> {
        self.moves(host)
            .into_iter()
            .find(|(t, p, _)| *t >= since && p == path)
            .map(|(t, _, _)| t - since)
    }

    fn describe(&self) -> String {
        let steps: Vec<_> = self
            .step_times
            .iter()
            .map(|(n, t)| format!("{n} +{:.1}", t.as_secs_f64()))
            .collect();
        let moves: Vec<_> = (0..2)
            .map(|h| {
                self.moves(h)
                    .iter()
                    .map(|(t, p, r)| format!("{p} ({r}) +{:.1}", t.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        format!(
            "steps [{}]; moves a [{}], b [{}]; {} / {}",
            steps.join(", "),
            moves[0],
            moves[1],
            self.outcomes[0].timeline(),
            self.outcomes[1].timeline()
        )
    }
}

/// Runs `case` with `before` applied to the lab before the peers start and
/// `steps` while they run, then checks both peers as every case is checked
/// (byte-exact both ways, exit 0, no error).
fn run_roaming(
    bins: &Binaries,
    case: &Case,
    before: Option<&dyn Fn(&Lab)>,
    steps: Vec<LabStep<'_>>,
) -> RoamingRun {
    let t0 = Instant::now();
    let lab = Lab::up(&case.lab_args.iter().map(String::as_str).collect::<Vec<_>>());
    let _homes = TempHomes::of(&lab);
    let rv = Rendezvous::start(&lab, bins, t0, true).expect("rendezvous starts");
    let mut step_times = Vec::new();
    if let Some(before) = before {
        before(&lab);
        step_times.push(("before", t0.elapsed()));
    }
    let code = format!(
        "{}-roam-{:08x}",
        rand::random::<u16>().max(1),
        rand::random::<u32>()
    );
    let seeds = [0x5eed, 0xfeed];
    let peers: Vec<_> = case
        .hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            spawn_peer(&lab, bins, case, host, &code, [seeds[i], seeds[1 - i]], t0)
                .expect("peer starts")
        })
        .collect();
    let started = Instant::now();
    let connected = |p: &RunningPeer| {
        p.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(_, line)| line.contains(r#""event":"connected""#))
    };
    let deadline = started + Duration::from_secs(20);
    while !peers.iter().all(connected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let connected_at = Instant::now();
    for step in steps {
        let due = connected_at + step.at;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        (step.action)(&lab);
        step_times.push((step.name, t0.elapsed()));
    }
    let outcomes = wait_peers(peers, started, case.timeout, t0);
    let rv_log = rv.stop();
    let mut failures = Vec::new();
    for (i, p) in outcomes.iter().enumerate() {
        check_peer(&lab, case, p, &outcomes[1 - i], &mut failures);
    }
    let run = RoamingRun {
        outcomes,
        step_times,
    };
    assert!(
        failures.is_empty(),
        "{}: {failures:#?}\n{}\n---- rendezvous:\n{rv_log}\n---- peers:\n{}",
        case.name,
        run.describe(),
        run.outcomes
            .iter()
            .map(|p| format!("{}:\n{}", p.host, format_lines(&p.stderr)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    run
}

/// Empties a router's connection tracking table: every NAT mapping is gone,
/// as after a router reboot or a CGNAT reassigning its ports.
fn flush_conntrack(lab: &Lab, router: &str) {
    let conntrack = support::netns::find_program("conntrack")
        .expect("conntrack (Debian package conntrack) is needed for the rebinding tests");
    let out = lab.exec(router, conntrack.to_str().unwrap(), ["-F"]);
    assert!(out.status.success(), "conntrack -F in {router}: {out:?}");
}

/// Drops every datagram between the two routers' public addresses on the
/// lab's internet bridge; the rendezvous stays reachable from both.
fn block_direct(lab: &Lab) {
    let (a, b) = (lab.var("A_PUBLIC_IP"), lab.var("B_PUBLIC_IP"));
    let rules = format!(
        "table bridge natter_block {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -10; policy accept;\n\
         \t\tip saddr {a} ip daddr {b} drop\n\
         \t\tip saddr {b} ip daddr {a} drop\n\
         \t}}\n\
         }}\n"
    );
    let mut child = lab
        .command("inet", "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f: {rules}");
}

fn unblock_direct(lab: &Lab) {
    lab.exec_ok("inet", "nft", ["delete", "table", "bridge", "natter_block"]);
}

/// Sets the MTU between both NAT routers and the internet to `mtu` bytes:
/// larger packets are dropped there. natter ignores the ICMP errors the
/// routers send back (its sockets probe for themselves), so for it this is
/// a black hole for larger datagrams. (An nftables length rule would not
/// do: segmentation offload carries a batch of datagrams through the lab's
/// bridge as one large packet.)
fn limit_packet_size(lab: &Lab, mtu: usize) {
    let mtu = mtu.to_string();
    for (router, port) in [("ra", "p-ra"), ("rb", "p-rb")] {
        lab.exec_ok(router, "ip", ["link", "set", "dev", "wan0", "mtu", &mtu]);
        lab.exec_ok("inet", "ip", ["link", "set", "dev", port, "mtu", &mtu]);
    }
}

/// The largest payload each peer's channel used at the end of the run.
fn final_payloads(run: &RoamingRun) -> Vec<u64> {
    run.outcomes
        .iter()
        .map(|p| {
            p.event("transferred").expect("transferred")["channel"]["max_payload"]
                .as_u64()
                .expect("max_payload")
        })
        .collect()
}

/// Path MTU discovery across real NATs: with a 1400-byte MTU between the
/// routers and the internet, each peer settles within 16 bytes under the
/// 1372-byte UDP payload that fits; with a 1500-byte MTU at first and 1228
/// (a 1200-byte datagram) from 2 s on, the peers fall back to 1200 and the
/// transfer completes.
#[test]
fn the_path_mtu_is_found_and_a_black_hole_falls_back() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    // A channel payload is a datagram less the sealed header and the tag.
    let overhead = (natter::wire::DATA_HEADER_LEN + natter::seal::TAG_LEN) as u64;
    let case = roaming_case(
        "port-restricted x port-restricted, 1400-byte MTU",
        "port-restricted",
        "port-restricted",
        Some(8),
    );
    let run = run_roaming(
        &bins,
        &case,
        Some(&|lab: &Lab| limit_packet_size(lab, 1400)),
        vec![],
    );
    let payloads = final_payloads(&run);
    say!("natlab pmtu: {}: channel payloads {payloads:?}", case.name);
    for payload in payloads {
        assert!(
            (1356 - overhead..=1372 - overhead).contains(&payload),
            "{payload}"
        );
    }

    let case = roaming_case(
        "port-restricted x port-restricted, MTU 1500, then 1228 from 2 s",
        "port-restricted",
        "port-restricted",
        Some(8),
    );
    let run = run_roaming(
        &bins,
        &case,
        None,
        vec![LabStep {
            name: "shrink",
            at: Duration::from_secs(2),
            action: Box::new(|lab: &Lab| limit_packet_size(lab, 1228)),
        }],
    );
    let payloads = final_payloads(&run);
    say!(
        "natlab pmtu: {}: channel payloads {payloads:?}; {}",
        case.name,
        run.describe()
    );
    assert!(
        payloads.iter().all(|&p| p == 1200 - overhead),
        "{payloads:?}"
    );
}

fn roaming_case(name: &str, nat_a: &str, nat_b: &str, rate_mbit: Option<u32>) -> Case {
    let mut lab_args: Vec<String> = ["--nat-a", nat_a, "--nat-b", nat_b]
        .map(String::from)
        .to_vec();
    if let Some(rate) = rate_mbit {
        lab_args.extend(["--rate".to_string(), rate.to_string()]);
    }
    Case {
        name: name.into(),
        lab_args,
        hosts: ["a", "b"],
        expect: expect_for(nat_a, nat_b),
        payload: ROAMING_PAYLOAD,
        pace: None,
        rendezvous_ipv6: false,
        timeout: Duration::from_secs(90),
        punch_timeout_ms: Some(PUNCH_TIMEOUT_MS),
    }
}

/// Payload per side of the roaming transfers; a `--rate` cap makes them
/// last several seconds.
const ROAMING_PAYLOAD: u64 = 4 * 1024 * 1024;

/// The symmetric router's connection tracking is flushed mid-transfer (its
/// mapping to the other peer and to the rendezvous get new random ports):
/// 4 MiB each way at 8 Mbit/s, and a slow stream of 100-byte lines every
/// 0.5 s, both byte-exact. The full-cone side follows the symmetric side's
/// new port.
#[test]
fn a_transfer_survives_the_nat_losing_its_mappings() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let bulk = roaming_case(
        "symmetric x full-cone, 4 MiB, conntrack flushed",
        "symmetric",
        "full-cone",
        Some(8),
    );
    let lines = Case {
        name: "symmetric x full-cone, lines every 0.5 s, conntrack flushed".into(),
        payload: 24 * 100,
        pace: Some((100, Duration::from_millis(500))),
        ..roaming_case("", "symmetric", "full-cone", None)
    };
    // The same transfer without the flush, for the stall it costs.
    let baseline = run_roaming(&bins, &bulk, None, Vec::new());
    say!(
        "natlab roaming: {}: without the flush the transfer takes {:?} / {:?} ms",
        bulk.name,
        baseline.outcomes[0].transfer_ms(),
        baseline.outcomes[1].transfer_ms()
    );
    for (case, at) in [
        (&bulk, Duration::from_secs(1)),
        (&lines, Duration::from_secs(5)),
    ] {
        let run = run_roaming(
            &bins,
            case,
            None,
            vec![LabStep {
                name: "flush",
                at,
                action: Box::new(|lab| flush_conntrack(lab, "ra")),
            }],
        );
        let flushed = run.step("flush");
        let followed = run.moved_to(1, "direct", flushed);
        say!(
            "natlab roaming: {}: b followed a's new mapping after {:?}; transfer {:?} / {:?} ms; {}",
            case.name,
            followed,
            run.outcomes[0].transfer_ms(),
            run.outcomes[1].transfer_ms(),
            run.describe()
        );
        assert!(
            followed.is_some(),
            "{}: b did not follow: {}",
            case.name,
            run.describe()
        );
    }
}

/// The direct path between two port-restricted NATs is blackholed for 12 s
/// mid-transfer (the rendezvous stays reachable): the session moves to the
/// relay within 7 s, back to a direct path within 15 s of the path
/// reopening, and the transfer completes byte-exact.
#[test]
fn a_blackholed_direct_path_moves_to_the_relay_and_back() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let case = Case {
        payload: 16 * 1024 * 1024,
        ..roaming_case(
            "port-restricted x port-restricted, direct path dark for 12 s",
            "port-restricted",
            "port-restricted",
            Some(8),
        )
    };
    let run = run_roaming(
        &bins,
        &case,
        None,
        vec![
            LabStep {
                name: "dark",
                at: Duration::from_secs(2),
                action: Box::new(block_direct),
            },
            LabStep {
                name: "light",
                at: Duration::from_secs(14),
                action: Box::new(unblock_direct),
            },
        ],
    );
    let (dark, light) = (run.step("dark"), run.step("light"));
    for host in 0..2 {
        let to_relay = run.moved_to(host, "relayed", dark);
        let back = run.moved_to(host, "direct", light);
        say!(
            "natlab roaming: {} [{}]: to the relay after {to_relay:?}, back to direct {back:?} after the path reopened",
            case.name,
            case.hosts[host]
        );
        assert!(
            to_relay.is_some_and(|t| t < Duration::from_secs(7)),
            "{}",
            run.describe()
        );
        assert!(
            back.is_some_and(|t| t < Duration::from_secs(15)),
            "{}",
            run.describe()
        );
    }
    say!("natlab roaming: {}", run.describe());
}

/// The direct path between the two NATs is blocked from the start and
/// opens 10 s after the peers connected: they start on the relay and are
/// direct within 10 s of the block lifting.
#[test]
fn a_pair_blocked_at_first_goes_direct_when_the_block_lifts() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let case = Case {
        expect: Expect::Relayed,
        payload: 24 * 100,
        pace: Some((100, Duration::from_millis(1000))),
        ..roaming_case(
            "port-restricted x address-restricted, direct path blocked for the first 10 s",
            "port-restricted",
            "address-restricted",
            None,
        )
    };
    let run = run_roaming(
        &bins,
        &case,
        Some(&block_direct),
        vec![LabStep {
            name: "lift",
            at: Duration::from_secs(10),
            action: Box::new(unblock_direct),
        }],
    );
    let lift = run.step("lift");
    for host in 0..2 {
        let direct = run.moved_to(host, "direct", lift);
        say!(
            "natlab roaming: {} [{}]: direct {direct:?} after the block lifted",
            case.name,
            case.hosts[host]
        );
        assert!(
            direct.is_some_and(|t| t < Duration::from_secs(10)),
            "{}",
            run.describe()
        );
    }
}

/// Host a's own address changes mid-session (192.168.1.2 → .50 behind the
/// same port-restricted router): its NAT maps the new address to a new
/// port, the rendezvous introduces the peers again, and the stream goes on
/// byte-exact over a direct path.
#[test]
fn a_session_survives_the_host_address_changing() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let case = Case {
        payload: 30 * 100,
        pace: Some((100, Duration::from_millis(500))),
        ..roaming_case(
            "port-restricted x port-restricted, host a's address changed",
            "port-restricted",
            "port-restricted",
            None,
        )
    };
    let run = run_roaming(
        &bins,
        &case,
        None,
        vec![LabStep {
            name: "renumber",
            at: Duration::from_secs(4),
            action: Box::new(|lab| {
                lab.exec_ok("a", "ip", ["addr", "flush", "dev", "eth0"]);
                lab.exec_ok("a", "ip", ["addr", "add", "192.168.1.50/24", "dev", "eth0"]);
                lab.exec_ok(
                    "a",
                    "ip",
                    ["route", "replace", "default", "via", "192.168.1.1"],
                );
            }),
        }],
    );
    let renumbered = run.step("renumber");
    let moved = run.moved_to(1, "direct", renumbered);
    say!(
        "natlab roaming: {}: b on a's new address after {moved:?}; {}",
        case.name,
        run.describe()
    );
    assert!(moved.is_some(), "{}", run.describe());
}

// ----------------------------------------------------------------- IPv6 --

/// Dual-stack hosts behind symmetric IPv4 NATs (a pair that IPv4 can only
/// relay) and home routers' stateful IPv6 firewalls (forward what the LAN
/// starts and its answers, drop what the internet starts): with the
/// rendezvous given by its IPv4 address, the peers learn each other's IPv6
/// addresses as host candidates through it, punch the firewalls, and
/// connect directly over IPv6.
#[test]
fn dual_stack_peers_behind_symmetric_nats_connect_directly_over_ipv6() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let case = Case {
        name: "dual-stack, symmetric x symmetric IPv4 NATs, stateful IPv6 firewalls".into(),
        lab_args: ["--ipv6", "--nat-a", "symmetric", "--nat-b", "symmetric"]
            .map(String::from)
            .to_vec(),
        expect: Expect::DirectIpv6,
        ..roaming_case("", "symmetric", "symmetric", None)
    };
    let run = run_roaming(&bins, &case, None, Vec::new());
    say!("natlab ipv6: {}: {}", case.name, run.describe());
}

/// An IPv6-only network: the hosts have no IPv4 address at all and are
/// given the rendezvous's IPv6 address; the peers register, punch the
/// stateful IPv6 firewalls and connect directly.
#[test]
fn an_ipv6_only_network_connects_directly() {
    if !natlab_available() {
        return;
    }
    let _lock = lab_lock();
    let bins = Binaries::find();
    let case = Case {
        name: "IPv6 only, stateful IPv6 firewalls".into(),
        lab_args: ["--ipv6"].map(String::from).to_vec(),
        expect: Expect::DirectIpv6,
        rendezvous_ipv6: true,
        ..roaming_case("", "port-restricted", "port-restricted", None)
    };
    let drop_ipv4 = |lab: &Lab| {
        for host in ["a", "b"] {
            lab.exec_ok(host, "ip", ["-4", "addr", "flush", "dev", "eth0"]);
        }
    };
    let run = run_roaming(&bins, &case, Some(&drop_ipv4), Vec::new());
    say!("natlab ipv6: {}: {}", case.name, run.describe());
}
