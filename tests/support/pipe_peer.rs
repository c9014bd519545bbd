//! `natter pipe` processes driven from a test: stdin fed with a seeded
//! stream, stdout hashed, stderr's `--json` events on a channel.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use natter_rendezvous::{driver, Config};
use serde_json::Value;

pub const NATTER: &str = env!("CARGO_BIN_EXE_natter");

/// A `natter pipe` process: stdin is fed by a thread, stdout is hashed by
/// another, and stderr's JSON events arrive on a channel.
pub struct PipePeer {
    child: Child,
    feeder: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<(u64, u64)>>,
    events: mpsc::Receiver<Value>,
    stderr_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A directory for one peer's identity and contacts, removed at the end.
pub struct Home(pub std::path::PathBuf);

impl Home {
    pub fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("natter-test-{}-{name}", std::process::id())))
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl PipePeer {
    /// Starts a peer that sends `len` pseudo-random bytes from `seed` once
    /// `release` fires (at once when `None`).
    pub fn start(
        rendezvous: &str,
        code: &str,
        home: &Home,
        seed: u64,
        len: u64,
        release: Option<mpsc::Receiver<()>>,
    ) -> Self {
        Self::start_with(rendezvous, code, home, seed, len, release, &[])
    }

    /// [`PipePeer::start`] with more command-line arguments (a `--bind`
    /// among them replaces the default loopback one).
    pub fn start_with(
        rendezvous: &str,
        code: &str,
        home: &Home,
        seed: u64,
        len: u64,
        release: Option<mpsc::Receiver<()>>,
        extra: &[&str],
    ) -> Self {
        // `code` is a pairing code, or `--to NAME` for a saved contact.
        let meet: Vec<&str> = match code.strip_prefix("--to ") {
            Some(name) => vec!["--to", name],
            None => vec!["--code", code],
        };
        let mut child = Command::new(NATTER)
            .env("NATTER_HOME", &home.0)
            .args(["pipe", "--rendezvous", rendezvous, "--json"])
            .args(meet)
            .args(if extra.contains(&"--bind") {
                &[][..]
            } else {
                &["--bind", "127.0.0.1:0"]
            })
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("natter starts");
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            if let Some(release) = release {
                let _ = release.recv();
            }
            let mut stream = Stream::new(seed);
            let mut left = len;
            let mut chunk = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                stream.fill(&mut chunk[..n]);
                if stdin.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n as u64;
            }
        });
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut hash = Fnv::default();
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => return (total, hash.0),
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        total += n as u64;
                    }
                }
            }
        });
        let (events_tx, events) = mpsc::channel();
        let stderr_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        spawn_stderr_reader(
            child.stderr.take().unwrap(),
            events_tx,
            stderr_lines.clone(),
        );
        Self {
            child,
            feeder: Some(feeder),
            reader: Some(reader),
            events,
            stderr_lines,
        }
    }

    /// Waits for an event named `name`, failing on an error event.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if event["event"] == name => return event,
                Ok(event) if event["event"] == "error" => {
                    panic!(
                        "peer failed while waiting for {name}: {event}; stderr: {}",
                        self.stderr()
                    )
                }
                Ok(_) => continue,
                Err(_) => panic!(
                    "no {name} event within {timeout:?}; stderr: {}",
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its exit code and what it
    /// wrote to stdout (length and hash).
    pub fn finish(mut self, timeout: Duration) -> (i32, u64, u64) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "natter pipe did not exit within {timeout:?}; stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.feeder.take().unwrap().join().unwrap();
        let (len, hash) = self.reader.take().unwrap().join().unwrap();
        (status.code().unwrap_or(-1), len, hash)
    }

    pub fn stderr(&self) -> String {
        self.stderr_lines.lock().unwrap().join("\n")
    }
}

impl Drop for PipePeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_stderr_reader(
    stderr: ChildStderr,
    events: mpsc::Sender<Value>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                let _ = events.send(event);
            }
            lines.lock().unwrap().push(line);
        }
    });
}

/// The bytes a peer with `seed` sends: xorshift, so both ends can compute
/// them without holding them.
pub struct Stream(u64);

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *byte = self.0 as u8;
        }
    }

    pub fn hash(seed: u64, len: u64) -> u64 {
        let mut stream = Self::new(seed);
        let mut hash = Fnv::default();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.fill(&mut chunk[..n]);
            hash.update(&chunk[..n]);
            left -= n as u64;
        }
        hash.0
    }
}

pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A pairing code unique to this test run.
pub fn code() -> String {
    format!(
        "{}-test-{:x}",
        rand::random::<u16>() % 999 + 1,
        rand::random::<u64>()
    )
}

pub fn start_rendezvous(runtime: &tokio::runtime::Runtime) -> driver::RunningServer {
    runtime
        .block_on(async { driver::start(&["127.0.0.1:0".parse().unwrap()], Config::default()) })
        .unwrap()
}

/// Waits for the peer's error event and exit; returns the event.
pub fn expect_failure(peer: PipePeer, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    let error = loop {
        match peer
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(event) if event["event"] == "error" => break event,
            Ok(event) if event["event"] == "connected" => panic!("connected unexpectedly: {event}"),
            Ok(_) => continue,
            Err(_) => panic!(
                "no error event within {within:?}; stderr: {}",
                peer.stderr()
            ),
        }
    };
    let (exit, _, _) = peer.finish(Duration::from_secs(5));
    assert_eq!(exit, 1);
    error
}
