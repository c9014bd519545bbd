//! natter: a peer-to-peer messenger over UDP hole punching.
//!
//! The library is layered; each module can be read alone:
//!
//! - [`wire`]: every datagram on the wire (natter frames and STUN).
//! - [`rendezvous_client`]: register at the rendezvous, learn the other peer.
//! - [`punch`]: probe the other peer's candidates, nominate a working path.
//! - [`birthday`]: port prediction for a pair with one hard NAT.
//! - [`handshake`]: SPAKE2 on the pairing code, then Noise: session keys and
//!   the other peer's authenticated static key.
//! - [`seal`]: AES-256-GCM or ChaCha20-Poly1305 on every data frame,
//!   anti-replay, rekeying.
//! - [`reliable`]: the reliable, ordered channel over datagrams.
//! - [`link`]: the three above as one state machine over one socket.
//! - [`session`]: the tokio shell: [`Peer::builder`] connects and returns a
//!   [`Session`].
//! - [`candidates`]: this machine's interface addresses.
//! - [`chat`]: numbered, confirmed chat lines and their history (SQLite).
//! - [`netcheck`]: how this host's NAT behaves, asked of the rendezvous.
//! - [`transfer`]: files over a session: offers, checks, resume.
//!
//! Protocol logic lives in sans-IO state machines (no sockets, no clock, no
//! tasks); thin tokio drivers own the sockets and timers. See
//! `docs/ARCHITECTURE.md`.

pub use natter_wire as wire;

pub mod birthday;
pub mod candidates;
pub mod chat;
pub mod code;
pub mod contacts;
pub mod error;
pub mod handshake;
pub mod identity;
pub mod link;
pub mod netcheck;
pub mod paths;
pub mod pmtu;
pub mod punch;
pub mod reliable;
pub mod rendezvous_client;
pub mod seal;
pub mod session;
pub mod transfer;
mod udp;

pub use error::ConnectError;
pub use session::{Error, Peer, PeerBuilder, Received, Session};
