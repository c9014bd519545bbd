//! `natter send` / `natter receive` processes driven from a test (on
//! loopback or inside a lab namespace), and the file trees they move.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::pipe_peer::spawn_stderr_reader;

/// A running `natter send` or `natter receive --json`: its stderr events
/// arrive on a channel, all of them are kept.
pub struct TransferPeer {
    child: Child,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl TransferPeer {
    /// Spawns `command` (natter with its subcommand and arguments, `--json`
    /// among them), with stdin closed.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("natter starts");
        let (events_tx, events) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        spawn_stderr_reader(child.stderr.take().unwrap(), events_tx, Arc::clone(&stderr));
        Self {
            child,
            events,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for the first event (from now on) that `pick` accepts.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pick: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if pick(&event) {
                        return event;
                    }
                    if event["event"] == "error" {
                        panic!(
                            "failed while waiting for {what}: {event}\n{}",
                            self.stderr()
                        );
                    }
                }
                Err(_) => panic!("no {what} within {timeout:?}\n{}", self.stderr()),
            }
        }
    }

    /// Kills the process at once (SIGKILL), as a crash or a pulled plug.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit; returns the exit code and every event seen.
    pub fn finish(mut self, timeout: Duration) -> (i32, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("natter did not exit within {timeout:?}\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends with the pipe: take what it had.
        let end = Instant::now() + Duration::from_secs(2);
        while let Ok(event) = self
            .events
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(event);
        }
        (status.code().unwrap_or(-1), std::mem::take(&mut self.seen))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for TransferPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first event named `name` among `events`.
pub fn event<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

/// What a tree holds, by relative path: a file's BLAKE3, a link's target,
/// or "dir".
pub fn tree_listing(root: &Path) -> BTreeMap<String, String> {
    let mut listing = BTreeMap::new();
    walk(root, root, &mut listing);
    listing
}

fn walk(root: &Path, dir: &Path, listing: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            listing.insert(name, format!("link to {}", target.display()));
        } else if metadata.is_dir() {
            listing.insert(name, "dir".into());
            walk(root, &path, listing);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            listing.insert(name, blake3::hash(&bytes).to_hex().to_string());
        }
    }
}

/// Fills `path` with `len` pseudo-random bytes from `seed`.
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let n = left.min(block.len());
        file.write_all(&block[..n]).unwrap();
        left -= n;
    }
}

/// A directory of nested files (empty ones, a 3 MiB one, names with
/// spaces and UTF-8) and a link inside it, under `parent/tree`.
pub fn make_tree(parent: &Path) -> std::path::PathBuf {
    let root = parent.join("tree");
    std::fs::create_dir_all(root.join("docs/deeper/deepest")).unwrap();
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    std::fs::write(root.join("readme.txt"), b"hello from natter\n").unwrap();
    std::fs::write(root.join("docs/empty"), b"").unwrap();
    std::fs::write(
        root.join("docs/deeper/caf\u{e9} \u{2615}.md"),
        "un caf\u{e9}".as_bytes(),
    )
    .unwrap();
    write_random_file(&root.join("docs/deeper/deepest/big.bin"), 3 << 20, 11);
    std::os::unix::fs::symlink("deeper/deepest/big.bin", root.join("docs/latest")).unwrap();
    root
}
