//! `natter send` / `natter receive` between two hosts behind port-restricted
//! NATs with 2 % random loss on the public segment:
//!
//! * a 200 MiB file, the receiver killed (SIGKILL) once it has about half,
//!   the sender killed too, both started again with the same code: the
//!   transfer resumes past half, the file is verified and identical; the
//!   times are printed;
//! * a directory of nested files (and a link) arrives identical.
//!
//! Needs root, `ip` and `nft` like the other NAT lab tests.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::binaries::Binaries;
use support::netns::{natlab_available, Lab, NsChild};
use support::transfer_peer::{event, make_tree, tree_listing, write_random_file, TransferPeer};

const RV_PORT: u16 = 7777;
const BIG: usize = 200 << 20;
/// The receiver is killed at the first progress event past this share.
const KILL_AT: f64 = 0.55;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(180);

static LAB_LOCK: Mutex<()> = Mutex::new(());

fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A lab with 2 % loss, a rendezvous in it, and a scratch directory.
struct TransferLab {
    lab: Option<Lab>,
    bins: Binaries,
    rendezvous: NsChild,
    root: PathBuf,
}

impl TransferLab {
    fn up() -> Self {
        let bins = Binaries::find();
        let lab = Lab::up(&[
            "--nat-a",
            "port-restricted",
            "--nat-b",
            "port-restricted",
            "--loss",
            "2",
        ]);
        let root = std::env::temp_dir().join(format!("natter-transfer-{}", lab.id()));
        std::fs::create_dir_all(&root).unwrap();
        let log = root.join("rendezvous.log");
        let mut command = lab.command("rv", &bins.rendezvous);
        for ip in [lab.ip("RV_IP"), lab.ip("RV_IP2")] {
            for port in [RV_PORT, RV_PORT + 1] {
                command.args(["--bind", &format!("{ip}:{port}")]);
            }
        }
        command
            .args(["--stats-secs", "0"])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let rendezvous = NsChild::from_command(&mut command).expect("natter-rendezvous starts");
        let ready = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).unwrap().contains("listening") {
            assert!(Instant::now() < ready, "the rendezvous did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            lab: Some(lab),
            bins,
            rendezvous,
            root,
        }
    }

    fn lab(&self) -> &Lab {
        self.lab.as_ref().unwrap()
    }

    /// natter in `host` with its own home, `args` and the lab's rendezvous.
    fn natter(&self, host: &str, args: &[&str]) -> Command {
        let rendezvous = format!("{}:{RV_PORT}", self.lab().ip("RV_IP"));
        let mut command = self.lab().command(host, &self.bins.natter);
        command
            .env("NATTER_HOME", self.root.join(format!("home-{host}")))
            .args(args)
            .args(["--rendezvous", &rendezvous, "--json", "--wait-secs", "30"]);
        command
    }

    fn send(&self, path: &Path, code: &str) -> TransferPeer {
        TransferPeer::spawn(self.natter("a", &["send", path.to_str().unwrap(), "--code", code]))
    }

    fn receive(&self, code: &str, out: &Path) -> TransferPeer {
        TransferPeer::spawn(self.natter(
            "b",
            &["receive", code, "--yes", "--out", out.to_str().unwrap()],
        ))
    }
}

impl Drop for TransferLab {
    fn drop(&mut self) {
        let _ = self.rendezvous.terminate(Duration::from_secs(2));
        if let Some(lab) = self.lab.take() {
            let _ = lab.down();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn code() -> String {
    format!(
        "{}-transfer-{:x}",
        rand::random::<u16>() % 999 + 1,
        rand::random::<u64>()
    )
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn a_large_file_resumes_after_the_receiver_is_killed() {
    if !natlab_available() {
        return;
    }
    let _guard = lab_lock();
    let lab = TransferLab::up();
    let file = lab.root.join("big.bin");
    write_random_file(&file, BIG, 2026);
    let out = lab.root.join("out");
    let code = code();

    // First run: the receiver is killed once it has more than half.
    let started = Instant::now();
    let sender = lab.send(&file, &code);
    let mut receiver = lab.receive(&code, &out);
    let connected = receiver.wait_for("connected", Duration::from_secs(60), |e| {
        e["event"] == "connected"
    });
    let at_kill = receiver.wait_for("progress past half", TRANSFER_TIMEOUT, |e| {
        e["event"] == "progress" && e["bytes"].as_f64().unwrap() >= KILL_AT * BIG as f64
    });
    let first_run = started.elapsed();
    receiver.kill();
    sender.kill();
    let partial = std::fs::metadata(out.join("big.bin.natter-part"))
        .unwrap()
        .len();
    assert!(!out.join("big.bin").exists());

    // Both started again with the same code.
    let restarted = Instant::now();
    let sender = lab.send(&file, &code);
    let receiver = lab.receive(&code, &out);
    let (receiver_exit, received) = receiver.finish(TRANSFER_TIMEOUT);
    let second_run = restarted.elapsed();
    let (sender_exit, sent) = sender.finish(Duration::from_secs(30));
    assert_eq!(
        (sender_exit, receiver_exit),
        (0, 0),
        "{received:?}\n{sent:?}"
    );
    let resumed = event(&received, "resumed").expect("the transfer resumed")["offset"]
        .as_u64()
        .unwrap();
    assert!(resumed > BIG as u64 / 2, "resumed at {resumed}");
    assert_eq!(event(&sent, "resumed").unwrap()["offset"], resumed);
    let saved = event(&received, "saved").unwrap();
    let expected = blake3::hash(&std::fs::read(&file).unwrap());
    assert_eq!(saved["blake3"], expected.to_hex().as_str());
    assert_eq!(
        blake3::hash(&std::fs::read(out.join("big.bin")).unwrap()),
        expected
    );
    assert!(!out.join("big.bin.natter-part").exists());
    let path = |events: &[Value]| event(events, "connected").map(|c| c["path"].to_string());
    eprintln!(
        "200 MiB at 2 % loss: first run {} ms (connected {} after {} ms), receiver killed at {} bytes reported, {partial} bytes on disk; \
         second run {} ms to verified (path {}), resumed at {resumed} ({:.1} %), {} bytes sent again",
        ms(first_run),
        connected["path"],
        connected["elapsed_ms"],
        at_kill["bytes"],
        ms(second_run),
        path(&received).unwrap_or_default(),
        100.0 * resumed as f64 / BIG as f64,
        BIG as u64 - resumed,
    );
}

#[test]
fn a_directory_of_nested_files_arrives_identical() {
    if !natlab_available() {
        return;
    }
    let _guard = lab_lock();
    let lab = TransferLab::up();
    let tree = make_tree(&lab.root.join("src"));
    let out = lab.root.join("out");
    let code = code();
    let started = Instant::now();
    let sender = lab.send(&tree, &code);
    let (receiver_exit, received) = lab.receive(&code, &out).finish(TRANSFER_TIMEOUT);
    let (sender_exit, _) = sender.finish(Duration::from_secs(30));
    assert_eq!((sender_exit, receiver_exit), (0, 0), "{received:?}");
    assert_eq!(tree_listing(&out.join("tree")), tree_listing(&tree));
    eprintln!(
        "directory ({} entries) at 2 % loss: {} ms from start to verified",
        tree_listing(&tree).len(),
        ms(started.elapsed())
    );
}
