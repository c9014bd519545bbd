//! natter: a peer-to-peer messenger over UDP hole punching.
//!
//! The library is layered; each module can be read alone:
//!
//! - [`wire`]: every datagram on the wire (natter frames and STUN).
//!
//! Protocol logic lives in sans-IO state machines (no sockets, no clock, no
//! tasks); thin tokio drivers own the sockets and timers. See
//! `docs/ARCHITECTURE.md`.

pub use natter_wire as wire;
