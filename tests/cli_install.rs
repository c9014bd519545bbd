//! What an installed natter offers besides its commands: shell completions
//! and man pages generated from the clap definitions, for `natter` and for
//! `natter-rendezvous`.

mod support;

use std::process::{Command, Output};

use support::binaries::Binaries;

fn run(program: &std::path::Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn stdout_of(program: &std::path::Path, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}): {}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn natter_prints_completions_for_every_shell_and_its_man_page() {
    let bins = Binaries::find();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&bins.natter, &["completions", shell]);
        for word in ["netcheck", "pipe", "completions", "no-port-mapping"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let man = stdout_of(&bins.natter, &["man"]);
    assert!(man.contains(".TH natter 1"), "{man}");
    assert!(man.contains("netcheck"), "the man page lists the commands");
    let bad = run(&bins.natter, &["completions", "tcsh"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_rendezvous_prints_completions_and_its_man_page() {
    let bins = Binaries::find();
    let script = stdout_of(&bins.rendezvous, &["--completions", "bash"]);
    assert!(script.contains("--relay-rate"), "{script}");
    let man = stdout_of(&bins.rendezvous, &["--man"]);
    assert!(man.contains(".TH natter-rendezvous 1"), "{man}");
    assert!(
        man.contains("load\\-threshold"),
        "the man page lists the flags"
    );
    let mixed = run(&bins.rendezvous, &["--man", "--bind", "127.0.0.1:0"]);
    assert_eq!(mixed.status.code(), Some(2), "--man runs alone");
}
