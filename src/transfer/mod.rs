//! File transfer (`natter send` / `natter receive`) over a session.
//!
//! - `names`: the checks every offered path and link target passes;
//! - `incoming`: the receiving side's protocol, sans-IO: order, sizes and
//!   BLAKE3 hashes, resume points;
//! - `outgoing`: what a path offers, and where a resumed file starts;
//! - `destination`: the receiving directory on disk, written to without
//!   ever following a link out of it.
//!
//! The messages are in [`natter_wire::transfer`]. The shells that drive
//! these over a session are the `send` and `receive` commands.

mod destination;
mod incoming;
mod names;
mod outgoing;

use std::fmt;

pub use destination::{Destination, FileState, PARTIAL_SUFFIX};
pub use incoming::{Incoming, Plan, PlannedFile, PlannedLink, Step};
pub use names::RelativePath;
pub use outgoing::{GatherError, Outgoing, SourceFile};

use natter_wire::transfer::{Abort, AbortKind};
use natter_wire::BoundedString;

/// Why the receiving side will not go on: sent to the sender as an
/// [`Abort`], and the receiver's own error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: AbortKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: AbortKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn to_abort(&self) -> Abort {
        Abort {
            kind: self.kind,
            message: BoundedString::truncated(&self.message),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}
