//! `natter send` and `natter receive` processes on loopback, with a
//! rendezvous in this process: a directory arrives identical, a partial
//! copy is resumed (and a wrong one is not), files that are there are not
//! replaced without asking, and a hostile sender written here with the
//! wire API is refused case by case without a byte outside `--out`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use natter::code::PairingCode;
use natter::identity::Identity;
use natter::session::{Peer, Received, Session};
use natter_wire::transfer::{AbortKind, Control, Offer, OfferEntry, TransferMessage, MAX_PATH};
use natter_wire::BoundedString;
use serde_json::Value;
use support::pipe_peer::{code, runtime, start_rendezvous, Home, NATTER};
use support::transfer_peer::{event, make_tree, tree_listing, write_random_file, TransferPeer};

const STEP: Duration = Duration::from_secs(30);

fn natter(home: &Home, rendezvous: &str, args: &[&str]) -> Command {
    let mut command = Command::new(NATTER);
    command.env("NATTER_HOME", &home.0).args(args).args([
        "--rendezvous",
        rendezvous,
        "--bind",
        "127.0.0.1:0",
        "--json",
    ]);
    command
}

fn send(home: &Home, rendezvous: &str, path: &Path, code: &str) -> TransferPeer {
    let path = path.to_str().unwrap();
    TransferPeer::spawn(natter(home, rendezvous, &["send", path, "--code", code]))
}

fn receive(home: &Home, rendezvous: &str, code: &str, out: &Path, extra: &[&str]) -> TransferPeer {
    let out = out.to_str().unwrap();
    let mut args = vec!["receive", code, "--out", out];
    args.extend(extra);
    TransferPeer::spawn(natter(home, rendezvous, &args))
}

fn kind_of(events: &[Value]) -> String {
    event(events, "error").map_or("none".into(), |e| e["kind"].as_str().unwrap().to_owned())
}

#[test]
fn a_directory_of_nested_files_arrives_identical() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let tree = make_tree(dir.path());
    let out = dir.path().join("out");
    let (home_s, home_r) = (Home::new("tree-s"), Home::new("tree-r"));
    let code = code();
    let sender = send(&home_s, &rendezvous, &tree, &code);
    let receiver = receive(&home_r, &rendezvous, &code, &out, &["--yes"]);
    let (receiver_exit, received) = receiver.finish(STEP);
    let (sender_exit, sent) = sender.finish(STEP);
    assert_eq!((sender_exit, receiver_exit), (0, 0), "{received:?}");
    assert_eq!(tree_listing(&out.join("tree")), tree_listing(&tree));
    let offer = event(&received, "offer").unwrap();
    assert_eq!(offer["files"], 4);
    assert_eq!(offer["bytes"], (3 << 20) + 18 + "un café".len());
    let saved: Vec<&Value> = received.iter().filter(|e| e["event"] == "saved").collect();
    assert_eq!(saved.len(), 4);
    let big = saved
        .iter()
        .find(|e| e["path"] == "tree/docs/deeper/deepest/big.bin")
        .unwrap();
    let bytes = std::fs::read(tree.join("docs/deeper/deepest/big.bin")).unwrap();
    assert_eq!(big["blake3"], blake3::hash(&bytes).to_hex().as_str());
    // The sender hears of every file saved, too.
    assert_eq!(sent.iter().filter(|e| e["event"] == "saved").count(), 4);
    let last = received
        .iter()
        .rev()
        .find(|e| e["event"] == "progress")
        .unwrap();
    assert_eq!(last["bytes"], last["total"]);
    runtime.block_on(server.shutdown()).unwrap();
}

/// A partial copy beside the target (what an interrupted run leaves) is
/// resumed: only the rest is sent. One whose bytes are not the file's is
/// started over, and the file is still right.
#[test]
fn a_partial_copy_is_resumed_and_a_wrong_one_started_over() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("movie.bin");
    let len = 8 << 20;
    write_random_file(&file, len, 7);
    let whole = std::fs::read(&file).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let partial = out.join("movie.bin.natter-part");
    let (home_s, home_r) = (Home::new("resume-s"), Home::new("resume-r"));

    std::fs::write(&partial, &whole[..5 << 20]).unwrap();
    let code_1 = code();
    let sender = send(&home_s, &rendezvous, &file, &code_1);
    let (exit, events) = receive(&home_r, &rendezvous, &code_1, &out, &["--yes"]).finish(STEP);
    assert_eq!(exit, 0, "{events:?}");
    assert_eq!(sender.finish(STEP).0, 0);
    assert_eq!(event(&events, "resumed").unwrap()["offset"], 5 << 20);
    assert_eq!(std::fs::read(out.join("movie.bin")).unwrap(), whole);
    assert!(!partial.exists());

    // A partial copy of other bytes: sent whole, no resume.
    std::fs::remove_file(out.join("movie.bin")).unwrap();
    let mut wrong = whole[..3 << 20].to_vec();
    wrong[1000] ^= 1;
    std::fs::write(&partial, &wrong).unwrap();
    let code_2 = code();
    let sender = send(&home_s, &rendezvous, &file, &code_2);
    let (exit, events) = receive(&home_r, &rendezvous, &code_2, &out, &["--yes"]).finish(STEP);
    assert_eq!(exit, 0, "{events:?}");
    assert_eq!(sender.finish(STEP).0, 0);
    assert!(event(&events, "resumed").is_none(), "{events:?}");
    assert_eq!(std::fs::read(out.join("movie.bin")).unwrap(), whole);
    runtime.block_on(server.shutdown()).unwrap();
}

/// A file that is there and differs is never replaced without a yes:
/// `--yes` alone refuses (exists), `--overwrite` replaces, a "no" at the
/// question declines; the same bytes already there are left as they are.
#[test]
fn files_there_already_are_not_replaced_without_asking() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"the new notes").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"my own notes").unwrap();
    let (home_s, home_r) = (Home::new("exists-s"), Home::new("exists-r"));
    let run = |extra: &[&str]| {
        let code = code();
        let sender = send(&home_s, &rendezvous, &file, &code);
        let (exit, events) = receive(&home_r, &rendezvous, &code, &out, extra).finish(STEP);
        let (sender_exit, sent) = sender.finish(STEP);
        (exit, kind_of(&events), sender_exit, kind_of(&sent))
    };
    // --yes without --overwrite: refused, both sides say why.
    assert_eq!(run(&["--yes"]), (1, "exists".into(), 1, "exists".into()));
    assert_eq!(
        std::fs::read(out.join("notes.txt")).unwrap(),
        b"my own notes"
    );
    // No --yes: the question is asked; stdin is closed, which is a no.
    assert_eq!(run(&[]), (1, "declined".into(), 1, "declined".into()));
    assert_eq!(
        std::fs::read(out.join("notes.txt")).unwrap(),
        b"my own notes"
    );
    assert_eq!(
        run(&["--yes", "--overwrite"]),
        (0, "none".into(), 0, "none".into())
    );
    assert_eq!(
        std::fs::read(out.join("notes.txt")).unwrap(),
        b"the new notes"
    );
    // The same bytes again: nothing to replace, nothing to ask.
    assert_eq!(run(&["--yes"]), (0, "none".into(), 0, "none".into()));
    runtime.block_on(server.shutdown()).unwrap();
}

/// What the hostile sender does after its offer.
enum Then {
    Nothing,
    /// FileStart for file 0, then these bytes.
    Send(Vec<u8>),
}

/// A sender written with the wire API: offers `entries`, then does `then`;
/// returns what the receiver told it (its abort kind).
async fn hostile_sender(
    rendezvous: String,
    code: PairingCode,
    entries: Vec<OfferEntry>,
    then: Then,
) -> Option<AbortKind> {
    let mut session: Session = Peer::builder()
        .rendezvous(rendezvous)
        .code(code)
        .identity(Identity::generate())
        .bind("127.0.0.1:0".parse().unwrap())
        .connect()
        .await
        .expect("the hostile sender connects");
    let send = |message: TransferMessage| message.encode().unwrap();
    session
        .send(&send(TransferMessage::Control(Control::Offer(Offer {
            entries,
        }))))
        .await
        .ok()?;
    loop {
        let Ok(Received::Data(bytes)) = session.recv().await else {
            return None;
        };
        match TransferMessage::decode(bytes).ok()? {
            TransferMessage::Control(Control::Accept { .. }) => {
                if let Then::Send(bytes) = &then {
                    let start = Control::FileStart {
                        index: 0,
                        offset: 0,
                    };
                    session
                        .send(&send(TransferMessage::Control(start)))
                        .await
                        .ok()?;
                    session
                        .send(&send(TransferMessage::Chunk(bytes.clone())))
                        .await
                        .ok()?;
                    session
                        .send(&send(TransferMessage::Control(Control::Done)))
                        .await
                        .ok()?;
                }
            }
            TransferMessage::Control(Control::Abort(abort)) => return Some(abort.kind),
            _ => {}
        }
    }
}

fn path(text: &str) -> BoundedString<MAX_PATH> {
    BoundedString::new(text).unwrap()
}

fn file_entry(name: &str, size: u64, content: &[u8]) -> OfferEntry {
    OfferEntry::File {
        path: path(name),
        size,
        blake3: *blake3::hash(content).as_bytes(),
    }
}

#[test]
fn a_hostile_sender_is_refused_with_the_reason_and_nothing_lands_outside_out() {
    let runtime = runtime();
    let server = start_rendezvous(&runtime);
    let rendezvous = server.local_addrs[0].to_string();
    let sandbox = tempfile::tempdir().unwrap();
    let out = sandbox.path().join("out");
    let elsewhere = sandbox.path().join("elsewhere");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    // A link the user has in the receiving directory, leading out of it.
    std::os::unix::fs::symlink(&elsewhere, out.join("door")).unwrap();
    let absolute: PathBuf = sandbox.path().join("absolute.txt");
    let absolute_text = absolute.to_str().unwrap().to_owned();
    let home = Home::new("hostile-r");

    let cases: Vec<(&str, Vec<OfferEntry>, Then, &str)> = vec![
        (
            "../x",
            vec![file_entry("../x", 2, b"hi")],
            Then::Nothing,
            "path_traversal",
        ),
        (
            "an absolute path",
            vec![file_entry(&absolute_text, 2, b"hi")],
            Then::Nothing,
            "absolute_path",
        ),
        (
            "a link that leaves --out",
            vec![
                OfferEntry::Symlink {
                    path: path("exit"),
                    target: path("../elsewhere"),
                },
                file_entry("exit/payload", 2, b"hi"),
            ],
            Then::Nothing,
            "symlink_escapes",
        ),
        (
            "a path through a link already in --out",
            vec![file_entry("door/payload", 2, b"hi")],
            Then::Nothing,
            "symlink_escapes",
        ),
        (
            "a size lie",
            vec![file_entry("lie.txt", 5, b"hello")],
            Then::Send(b"hello, and more".to_vec()),
            "size_mismatch",
        ),
        (
            "a hash mismatch",
            vec![file_entry("hash.txt", 5, b"hello")],
            Then::Send(b"HELLO".to_vec()),
            "hash_mismatch",
        ),
        (
            "a control character in a name",
            vec![file_entry("bad\u{1b}[2Jname", 2, b"hi")],
            Then::Nothing,
            "invalid_name",
        ),
    ];
    for (what, entries, then, expected) in cases {
        let code_text = code();
        let code: PairingCode = code_text.parse().unwrap();
        let attacker = runtime.spawn(hostile_sender(rendezvous.clone(), code, entries, then));
        let receiver = receive(&home, &rendezvous, &code_text, &out, &["--yes"]);
        let (exit, events) = receiver.finish(STEP);
        let told = runtime
            .block_on(async { tokio::time::timeout(STEP, attacker).await })
            .unwrap()
            .unwrap();
        assert_eq!(
            (exit, kind_of(&events).as_str()),
            (1, expected),
            "{what}: {events:?}"
        );
        assert_eq!(
            told.map(AbortKind::as_str),
            Some(expected),
            "{what}: the sender is told"
        );
        let message = event(&events, "error").unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
        println!("{what}: {message}");
        // Nothing outside --out, and inside it at most a partial copy.
        let listing = tree_listing(sandbox.path());
        let stray: Vec<&String> = listing
            .keys()
            .filter(|p| !["elsewhere", "out", "out/door"].contains(&p.as_str()))
            .filter(|p| !(p.starts_with("out/") && p.ends_with(".natter-part")))
            .collect();
        assert!(stray.is_empty(), "{what}: {stray:?}");
        // Bytes that failed their hash are not kept to resume from.
        assert!(!out.join("hash.txt.natter-part").exists(), "{what}");
        assert!(!absolute.exists());
    }
    runtime.block_on(server.shutdown()).unwrap();
}
