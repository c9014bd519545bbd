//! The tokio shell around [`Link`](crate::link::Link): one task owns the UDP socket, the timer
//! and the link; a [`Session`] handle talks to it through channels.
//!
//! - `builder`: [`Peer::builder`] binds the socket, finds the rendezvous
//!   and connects;
//! - `driver`: the task that runs the link;
//! - `extra_sockets`: port prediction's extra sockets, for the driver;
//! - `port_mapping`: a port mapping at the gateway, for the driver;
//! - `stream`: the halves, message-wise or as tokio byte streams.

mod builder;
mod driver;
mod extra_sockets;
mod port_mapping;
mod stream;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use builder::{Peer, PeerBuilder};
pub use port_mapping::release as release_port_mapping;
pub use stream::{SessionReceiver, SessionSender};

use crate::birthday::BirthdayEvent;
use crate::error::{CloseReason, ConnectError};
use crate::identity::PublicKey;
use crate::paths::MoveReason;
use crate::punch::{CandidateKind, CandidateReport, Path};
use crate::seal::DataCipher;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot resolve rendezvous address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("no rendezvous address given (--rendezvous or NATTER_RENDEZVOUS)")]
    NoRendezvous,
    #[error("no pairing code or contact given")]
    NoCode,
    #[error(transparent)]
    BadCode(#[from] crate::code::MalformedCode),
    #[error("message of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("session closed: {0}")]
    Closed(CloseReason),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a peer reports while it connects, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Registered {
        reflexive: SocketAddr,
    },
    Introduced {
        candidates: Vec<(SocketAddr, CandidateKind)>,
    },
    /// Punching found no direct path (what happened on each candidate);
    /// the session goes through the rendezvous's relay.
    Relaying {
        reports: Vec<CandidateReport>,
    },
    /// After connecting: the session moved to another path.
    PathChanged {
        path: Path,
        reason: MoveReason,
    },
    /// Port prediction (one side behind a hard NAT) found a path, or gave
    /// up; with its counters.
    PortPrediction(BirthdayEvent),
}

/// How the session's path was found, and who is at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathInfo {
    pub path: Path,
    pub local: SocketAddr,
    pub elapsed: Duration,
    /// The other peer's long-term key, proven by the handshake.
    pub remote_key: PublicKey,
    /// What seals the data frames.
    pub cipher: DataCipher,
}

/// Something the other peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Data(Vec<u8>),
    /// The other peer will send no more data.
    End,
}

/// A connected session with the other peer. [`Session::split`] gives a
/// sending and a receiving half for use from two tasks.
pub struct Session {
    path: PathInfo,
    sender: SessionSender,
    receiver: SessionReceiver,
}

impl Session {
    pub fn path(&self) -> PathInfo {
        self.path
    }

    pub async fn send(&self, data: &[u8]) -> Result<(), Error> {
        self.sender.send(data).await
    }

    pub async fn finish(&self) -> Result<(), Error> {
        self.sender.finish().await
    }

    pub async fn recv(&mut self) -> Result<Received, Error> {
        self.receiver.recv().await
    }

    /// Closes gracefully: what was sent is delivered first. Returns the
    /// reason the session ended.
    pub async fn close(self) -> Result<CloseReason, Error> {
        self.sender.close().await;
        self.receiver.closed().await
    }

    pub fn split(self) -> (SessionSender, SessionReceiver) {
        (self.sender, self.receiver)
    }
}
