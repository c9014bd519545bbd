//! A crowd behind one address on each side: 150 `natter pipe` peers in one
//! host behind NAT router A (one public IPv4 address) and their 150 partners
//! behind router B, all started at once against one `natter-rendezvous`, as
//! behind a carrier-grade NAT, a campus or an office. Every pair must
//! connect and exchange its line within 60 s; the connect times and the
//! server's counters are printed.
//!
//! Needs root, `ip` and `nft` like the other NAT lab tests.

mod support;

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::binaries::Binaries;
use support::netns::{natlab_available, Lab, NsChild};

const PAIRS: usize = 150;
const RV_PORT: u16 = 7777;
/// Every pair connects and exchanges its line within this.
const DEADLINE: Duration = Duration::from_secs(60);

/// One `natter pipe` process, its stdin, stdout and stderr in files.
struct CrowdPeer {
    child: NsChild,
    dir: std::path::PathBuf,
}

impl CrowdPeer {
    fn start(
        lab: &Lab,
        bins: &Binaries,
        host: &str,
        index: usize,
        code: &str,
        root: &Path,
    ) -> Self {
        let dir = root.join(format!("{host}{index}"));
        std::fs::create_dir_all(&dir).unwrap();
        File::create(dir.join("stdin"))
            .unwrap()
            .write_all(line(host, index).as_bytes())
            .unwrap();
        let rendezvous = format!("{}:{RV_PORT}", lab.ip("RV_IP"));
        let mut command = lab.command(host, &bins.natter);
        command
            .args([
                "pipe",
                "--json",
                "--rendezvous",
                &rendezvous,
                "--code",
                code,
            ])
            .args(["--wait-secs", &DEADLINE.as_secs().to_string()])
            .env("NATTER_HOME", dir.join("home"))
            .stdin(File::open(dir.join("stdin")).unwrap())
            .stdout(File::create(dir.join("stdout")).unwrap())
            .stderr(File::create(dir.join("stderr")).unwrap());
        let child = NsChild::from_command(&mut command).expect("natter starts in the lab");
        Self { child, dir }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn event(&self, name: &str) -> Option<Value> {
        self.stderr()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|event| event["event"] == name)
    }
}

fn line(host: &str, index: usize) -> String {
    format!("hello from {host}{index}\n")
}

/// The `key=value` counters of the rendezvous's final stats line.
fn final_stats(log: &str) -> String {
    log.lines()
        .find_map(|line| line.split_once("final stats ").map(|(_, stats)| stats))
        .unwrap_or("(no final stats line)")
        .to_string()
}

#[test]
fn a_crowd_behind_one_address_on_each_side_all_connect() {
    if !natlab_available() {
        return;
    }
    let stats = run_crowd(&[]);
    assert!(stats.contains(" busy=0 "), "{stats}");
}

/// The same crowd against a server whose per-address ceiling is far too
/// low for it (20 datagrams a second, burst 40, for 150 peers): the peers
/// are told to come back later rather than dropped, and all still connect.
#[test]
fn a_crowd_over_its_address_ceiling_is_told_to_wait_and_all_connect() {
    if !natlab_available() {
        return;
    }
    let stats = run_crowd(&["--rate-per-ip", "20", "--burst-per-ip", "40"]);
    assert!(!stats.contains(" busy=0 "), "{stats}");
}

/// Runs the crowd against a rendezvous started with `rendezvous_args`;
/// fails unless every pair connected and exchanged its line in time.
/// Returns the rendezvous's final stats.
fn run_crowd(rendezvous_args: &[&str]) -> String {
    let bins = Binaries::find();
    let lab = Lab::up(&["--nat-a", "port-restricted", "--nat-b", "port-restricted"]);
    let root = std::env::temp_dir().join(format!("natter-crowd-{}", lab.id()));
    let _cleanup = RemoveOnDrop(root.clone());
    std::fs::create_dir_all(&root).unwrap();

    let rendezvous_log = root.join("rendezvous.log");
    let bind = format!("{}:{RV_PORT}", lab.ip("RV_IP"));
    let mut rendezvous = NsChild::from_command(
        lab.command("rv", &bins.rendezvous)
            .args(["--bind", &bind, "--stats-secs", "0"])
            .args(rendezvous_args)
            .stdin(Stdio::null())
            .stderr(File::create(&rendezvous_log).unwrap()),
    )
    .expect("natter-rendezvous starts");
    // Its first log line says it is listening.
    let ready = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&rendezvous_log)
        .unwrap()
        .contains("listening")
    {
        assert!(Instant::now() < ready, "the rendezvous did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let run = format!("{:x}", rand::random::<u32>());
    let started = Instant::now();
    let mut pairs: Vec<(CrowdPeer, CrowdPeer)> = (0..PAIRS)
        .map(|i| {
            let code = format!("{}-crowd-{run}-{i}", i + 1);
            (
                CrowdPeer::start(&lab, &bins, "a", i, &code, &root),
                CrowdPeer::start(&lab, &bins, "b", i, &code, &root),
            )
        })
        .collect();
    let spawned = started.elapsed();
    let deadline = started + DEADLINE + Duration::from_secs(10);
    for (a, b) in &mut pairs {
        for peer in [a, b] {
            let left = deadline.saturating_duration_since(Instant::now());
            peer.child.wait_timeout(left).unwrap();
        }
    }
    let all_done = started.elapsed();
    rendezvous.terminate(Duration::from_secs(2)).unwrap();
    let stats = final_stats(&std::fs::read_to_string(&rendezvous_log).unwrap());

    let mut connect_ms = Vec::new();
    let mut failures = Vec::new();
    for (i, (a, b)) in pairs.iter_mut().enumerate() {
        for (peer, host, other_host) in [(a, "a", "b"), (b, "b", "a")] {
            let exit = peer.child.try_wait().unwrap().and_then(|s| s.code());
            let connected = peer.event("connected");
            let ms = connected.as_ref().and_then(|c| c["elapsed_ms"].as_u64());
            let got_line = peer.stdout() == line(other_host, i);
            match (exit, ms, got_line) {
                (Some(0), Some(ms), true) if ms <= DEADLINE.as_millis() as u64 => {
                    connect_ms.push(ms)
                }
                _ => failures.push(format!(
                    "{host}{i}: exit {exit:?}, connected after {ms:?} ms, line {}; stderr:\n{}",
                    if got_line { "received" } else { "missing" },
                    peer.stderr()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join("\n")
                )),
            }
        }
    }
    connect_ms.sort_unstable();
    let percentile = |p: usize| connect_ms.get(connect_ms.len() * p / 100).copied();
    eprintln!(
        "crowd (rendezvous {rendezvous_args:?}): {PAIRS} pairs behind one address each side, spawned in {:.1} s, all exited after {:.1} s; \
         {} of {} peers connected and exchanged their line: connect p50 {:?} ms, p90 {:?} ms, max {:?} ms\n\
         rendezvous: {stats}",
        spawned.as_secs_f64(),
        all_done.as_secs_f64(),
        connect_ms.len(),
        2 * PAIRS,
        percentile(50),
        percentile(90),
        connect_ms.last(),
    );
    assert!(
        failures.is_empty(),
        "{} peers failed:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n---\n")
    );
    drop(pairs);
    lab.down().unwrap();
    stats
}

/// Removes a directory when dropped, also while unwinding.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
