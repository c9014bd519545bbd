//! The two programs a lab test runs: `natter` (this package's binary) and
//! `natter-rendezvous` (built beside it by a workspace build).

use std::path::PathBuf;

pub struct Binaries {
    pub natter: PathBuf,
    pub rendezvous: PathBuf,
}

impl Binaries {
    pub fn find() -> Binaries {
        let natter = PathBuf::from(env!("CARGO_BIN_EXE_natter"));
        let rendezvous = natter.with_file_name("natter-rendezvous");
        assert!(
            rendezvous.is_file(),
            "{} is missing: it belongs to another package of the workspace; run \
             `cargo build --workspace{}` before these tests (or `cargo test --workspace{}`)",
            rendezvous.display(),
            if cfg!(debug_assertions) {
                ""
            } else {
                " --release"
            },
            if cfg!(debug_assertions) {
                ""
            } else {
                " --release"
            },
        );
        Binaries { natter, rendezvous }
    }
}
