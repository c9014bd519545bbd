//! `natter chat`'s terminal UI in real terminals (tmux), across two NATs of
//! the lab: two saved contacts exchange lines and see their ticks; one
//! side is killed (SIGKILL) while the other types three lines, and started
//! again: the three arrive in order, exactly once, ticked; a file goes from
//! one to the other with `/send` and `/accept`; after both quit,
//! `natter history` lists every line once.
//!
//! Needs root, `ip`, `nft` (like the other NAT lab tests) and `tmux`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::binaries::Binaries;
use support::netns::{find_program, natlab_available, Lab, NsChild};
use support::transfer_peer::write_random_file;

const RV_PORT: u16 = 7777;
const STEP: Duration = Duration::from_secs(30);

/// A tmux server of this test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-u"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self, window: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", window])
    }

    /// Waits until `window` shows every one of `texts`.
    fn wait_for(&self, window: &str, texts: &[&str]) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let screen = self.screen(window);
            if texts.iter().all(|text| screen.contains(text)) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "window {window} never showed {texts:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_line(&self, window: &str, text: &str) {
        self.run(&["send-keys", "-t", window, "-l", text]);
        self.run(&["send-keys", "-t", window, "Enter"]);
    }

    /// The natter process in `window`: the child of the pane's shell.
    fn natter_pid(&self, window: &str) -> i32 {
        let shell: u32 = self
            .run(&["display-message", "-p", "-t", window, "#{pane_pid}"])
            .trim()
            .parse()
            .unwrap();
        let children =
            std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("natter runs in the pane")
            .parse()
            .unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// A script that runs natter chat in the lab's host `host`, then says how
/// it exited and keeps the pane (and what natter printed last) open.
fn chat_script(dir: &Path, lab: &Lab, natter: &Path, host: &str, home: &Path, to: &str) -> PathBuf {
    let rendezvous = format!("{}:{RV_PORT}", lab.ip("RV_IP"));
    let script = dir.join(format!("chat-{host}.sh"));
    std::fs::write(
        &script,
        format!(
            "ip netns exec {} env NATTER_HOME={} {} chat --to {to} --rendezvous {rendezvous} --wait-secs 60\n\
             status=$?\n\
             # After a kill the terminal is still raw and on the alternate screen.\n\
             stty sane; printf '\\033[?1049l\\r\\n'\n\
             echo \"natter exited with $status\"\nexec sleep 600\n",
            lab.ns(host),
            home.display(),
            natter.display()
        ),
    )
    .unwrap();
    script
}

fn natter(bins: &Binaries, home: &Path, args: &[&str]) -> String {
    let out = Command::new(&bins.natter)
        .env("NATTER_HOME", home)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "natter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn public_key(bins: &Binaries, home: &Path) -> String {
    natter(bins, home, &["id"])
        .lines()
        .find_map(|line| line.strip_prefix("public key:"))
        .unwrap()
        .trim()
        .to_owned()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn the_chat_screen_delivers_ticks_and_a_restart_gets_the_queue_once() {
    if !natlab_available() {
        return;
    }
    if find_program("tmux").is_none() {
        assert!(
            std::env::var_os("NATTER_REQUIRE_NATLAB").is_none(),
            "tmux is missing (apt-get install tmux)"
        );
        eprintln!("skipped: tmux is missing");
        return;
    }
    let bins = Binaries::find();
    let lab = Lab::up(&["--nat-a", "port-restricted", "--nat-b", "port-restricted"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rendezvous.log");
    let mut rendezvous = NsChild::from_command(
        lab.command("rv", &bins.rendezvous)
            .args([
                "--bind",
                &format!("{}:{RV_PORT}", lab.ip("RV_IP")),
                "--stats-secs",
                "0",
            ])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    )
    .unwrap();
    let (home_a, home_b) = (dir.path().join("alice"), dir.path().join("bob"));
    let (key_a, key_b) = (public_key(&bins, &home_a), public_key(&bins, &home_b));
    natter(&bins, &home_a, &["contacts", "add", "bob", &key_b]);
    natter(&bins, &home_b, &["contacts", "add", "alice", &key_a]);
    let script_a = chat_script(dir.path(), &lab, &bins.natter, "a", &home_a, "bob");
    let script_b = chat_script(dir.path(), &lab, &bins.natter, "b", &home_b, "alice");

    let tmux = Tmux {
        socket: format!("natter-{}", lab.id()),
    };
    let (a, b) = ("chat:0", "chat:1");
    // Bob's chat runs in its inbox: files accepted there land there.
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let inbox_arg = inbox.to_str().unwrap();
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "chat",
        "-x",
        "120",
        "-y",
        "30",
        "bash",
        script_a.to_str().unwrap(),
    ]);
    tmux.run(&[
        "new-window",
        "-t",
        "chat:1",
        "-c",
        inbox_arg,
        "bash",
        script_b.to_str().unwrap(),
    ]);
    tmux.wait_for(a, &["natter · bob · connected"]);
    tmux.wait_for(b, &["natter · alice · connected"]);

    tmux.type_line(a, "hello bob");
    tmux.type_line(b, "hi alice");
    tmux.wait_for(a, &["me: hello bob ✓", "bob: hi alice"]);
    tmux.wait_for(b, &["me: hi alice ✓", "alice: hello bob"]);

    // A file from inside the chat, into Bob's current directory.
    let gift = dir.path().join("gift.bin");
    write_random_file(&gift, 3 << 20, 5);
    tmux.type_line(a, &format!("/send {}", gift.display()));
    tmux.wait_for(b, &["alice offers gift.bin (1 file(s), 3.0 MiB)"]);
    tmux.type_line(b, "/accept");
    tmux.wait_for(
        a,
        &["sent gift.bin (1 file(s), 3.0 MiB): every file saved and verified"],
    );
    tmux.wait_for(
        b,
        &["received gift.bin (1 file(s), 3.0 MiB): every file saved and verified"],
    );
    assert!(std::fs::read(inbox.join("gift.bin")).unwrap() == std::fs::read(&gift).unwrap());

    // Bob's process dies; Alice types on.
    let bob_pid = tmux.natter_pid(b);
    let killed = Instant::now();
    unsafe { libc::kill(bob_pid, libc::SIGKILL) };
    let queued = ["queued one", "queued two", "queued three"];
    for line in queued {
        tmux.type_line(a, line);
    }
    tmux.wait_for(a, &["me: queued three"]);
    // Alice's side has noticed the silence before Bob is back.
    tmux.wait_for(a, &["the path went silent"]);
    tmux.wait_for(b, &["natter exited with 137"]);
    tmux.run(&[
        "respawn-pane",
        "-k",
        "-t",
        b,
        "-c",
        inbox_arg,
        "bash",
        script_b.to_str().unwrap(),
    ]);
    let screen_b = tmux.wait_for(b, &["alice: queued three"]);
    let back = killed.elapsed();
    let screen_a = tmux.wait_for(
        a,
        &["me: queued one ✓", "me: queued two ✓", "me: queued three ✓"],
    );
    // In order, once each, on Bob's new screen.
    let at: Vec<usize> = queued
        .iter()
        .map(|line| {
            assert_eq!(count(&screen_b, &format!("alice: {line}")), 1, "{screen_b}");
            screen_b.find(&format!("alice: {line}")).unwrap()
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{screen_b}");
    assert!(screen_a.contains("bob left"), "{screen_a}");

    // Bob leaves; a line Alice types then cannot be delivered: she is
    // told so when she quits, and it stays queued.
    tmux.type_line(b, "/quit");
    tmux.wait_for(a, &["bob left"]);
    tmux.wait_for(b, &["natter exited with 0"]);
    tmux.type_line(a, "after bob left");
    tmux.wait_for(a, &["me: after bob left …"]);
    tmux.type_line(a, "/quit");
    tmux.wait_for(
        a,
        &[
            "1 line(s) to bob not confirmed yet; they stay queued",
            "natter exited with 0",
        ],
    );
    let history_b = natter(&bins, &home_b, &["history", "alice"]);
    let history_a = natter(&bins, &home_a, &["history", "bob"]);
    for line in ["hello bob", "queued one", "queued two", "queued three"] {
        assert_eq!(
            count(&history_b, &format!("alice: {line}\n")),
            1,
            "{history_b}"
        );
        assert_eq!(
            count(&history_a, &format!("me: {line}  (delivered")),
            1,
            "{history_a}"
        );
    }
    assert_eq!(
        count(&history_b, "me: hi alice  (delivered"),
        1,
        "{history_b}"
    );
    assert_eq!(count(&history_a, "bob: hi alice\n"), 1, "{history_a}");
    assert_eq!(
        count(&history_a, "me: after bob left  (not delivered yet)"),
        1,
        "{history_a}"
    );
    assert_eq!(count(&history_b, "after bob left"), 0, "{history_b}");
    eprintln!(
        "chat in tmux across two port-restricted NATs: bob killed and started again; the three queued lines (typed after the kill, before alice's side noticed the silence) shown on bob's new screen {} ms after the kill\n\
         natter history alice (bob's side):\n{history_b}",
        back.as_millis()
    );
    let _ = rendezvous.terminate(Duration::from_secs(2));
    drop(tmux);
    lab.down().unwrap();
}
