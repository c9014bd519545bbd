//! File transfer messages (`natter send` / `natter receive`), carried as
//! messages of the encrypted session rather than as datagrams of their own.
//!
//! Each message opens with the transfer protocol's version and a kind byte:
//!
//! ```text
//! +-----------+--------+------------------------------
//! | version   | kind   | body: bincode (control) or raw bytes (chunk)
//! +-----------+--------+------------------------------
//! ```
//!
//! A chunk's bytes are laid out raw, as data frames are, so the hot path
//! copies nothing through a serializer. Control bodies are bincode with a
//! byte limit of [`MAX_CONTROL`], and every list and name in them has its own
//! limit, checked while decoding: a hostile sender's length prefix never
//! makes the receiver allocate more than one control message's worth.
//!
//! The exchange: the sender offers ([`Control::Offer`]); the receiver accepts
//! with what it already has of each file ([`Control::Accept`]) or aborts;
//! the sender sends each file in offer order ([`Control::FileStart`], then
//! [`TransferMessage::Chunk`]s), then [`Control::Done`]; the receiver says
//! [`Control::Saved`] for each file once it is verified and in place. Either
//! side may [`Control::Abort`] with a reason.

use serde::{Deserialize, Serialize};

use super::control::{bounded, check_len, BoundedString};
use super::WireError;

/// The transfer protocol version this build speaks.
pub const TRANSFER_VERSION: u8 = 1;

/// Largest chunk of file data in one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Largest encoded control message (an offer of many files is the large one).
pub const MAX_CONTROL: usize = 8 * 1024 * 1024;

/// Most entries (files, directories, links) in one offer.
pub const MAX_OFFER_ENTRIES: usize = 100_000;

/// Longest path (or link target) in an offer, in bytes.
pub const MAX_PATH: usize = 4096;

/// Longest free-text reason in an abort, in bytes.
pub const MAX_REASON: usize = 1024;

const KIND_CONTROL: u8 = 0;
const KIND_CHUNK: u8 = 1;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CONTROL>()
}

/// One transfer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferMessage {
    Control(Control),
    /// The next bytes of the file being sent.
    Chunk(Vec<u8>),
}

/// Everything but file data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Sender → receiver, first: what it would send.
    Offer(Offer),
    /// Receiver → sender: yes; with the bytes it already has of some files.
    Accept {
        #[serde(deserialize_with = "bounded::<_, MAX_OFFER_ENTRIES, _>")]
        resume: Vec<ResumePoint>,
    },
    /// Sender → receiver: file `index` (its place among the offer's files)
    /// follows from byte `offset`: 0, or a resume point the receiver gave.
    FileStart { index: u32, offset: u64 },
    /// Sender → receiver: every file was sent.
    Done,
    /// Receiver → sender: file `index` is whole, verified and in place.
    Saved { index: u32 },
    /// Either side: stopping, and why.
    Abort(Abort),
}

/// What a sender offers: files, directories and links, each under a
/// relative path with `/` between its components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    #[serde(deserialize_with = "bounded::<_, MAX_OFFER_ENTRIES, _>")]
    pub entries: Vec<OfferEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferEntry {
    File {
        path: BoundedString<MAX_PATH>,
        size: u64,
        /// BLAKE3 of the whole file.
        blake3: [u8; 32],
    },
    Directory {
        path: BoundedString<MAX_PATH>,
    },
    Symlink {
        path: BoundedString<MAX_PATH>,
        target: BoundedString<MAX_PATH>,
    },
}

impl OfferEntry {
    pub fn path(&self) -> &str {
        match self {
            Self::File { path, .. } | Self::Directory { path } | Self::Symlink { path, .. } => path,
        }
    }
}

/// The receiver already holds the first `offset` bytes of file `index`,
/// whose BLAKE3 is `prefix_blake3`: the sender checks them against its own
/// file and sends only the rest (or everything, if they differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub index: u32,
    pub offset: u64,
    pub prefix_blake3: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub kind: AbortKind,
    pub message: BoundedString<MAX_REASON>,
}

/// Why a transfer stopped: stable names for `--json` and exit reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortKind {
    /// The person receiving said no.
    Declined,
    /// A file is there already and replacing it was not allowed.
    Exists,
    /// A path in the offer is absolute.
    AbsolutePath,
    /// A path in the offer climbs out with `..`.
    PathTraversal,
    /// A link would lead out of the receiving directory, or a path would be
    /// written through a link.
    SymlinkEscapes,
    /// A name cannot be (or should not be) a file name here.
    InvalidName,
    /// The sender sent more or fewer bytes than it offered.
    SizeMismatch,
    /// The bytes received do not have the offered BLAKE3 hash.
    HashMismatch,
    /// A message out of turn, or one that does not decode.
    Protocol,
    /// Reading or writing a local file failed.
    Io,
}

impl AbortKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Declined => "declined",
            Self::Exists => "exists",
            Self::AbsolutePath => "absolute_path",
            Self::PathTraversal => "path_traversal",
            Self::SymlinkEscapes => "symlink_escapes",
            Self::InvalidName => "invalid_name",
            Self::SizeMismatch => "size_mismatch",
            Self::HashMismatch => "hash_mismatch",
            Self::Protocol => "protocol",
            Self::Io => "io",
        }
    }
}

impl TransferMessage {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        match self {
            Self::Chunk(data) => {
                check_len("chunk", data.len(), MAX_CHUNK)?;
                let mut out = Vec::with_capacity(2 + data.len());
                out.extend_from_slice(&[TRANSFER_VERSION, KIND_CHUNK]);
                out.extend_from_slice(data);
                Ok(out)
            }
            Self::Control(control) => {
                let mut out = vec![TRANSFER_VERSION, KIND_CONTROL];
                bincode::serde::encode_into_std_write(control, &mut out, codec())
                    .map_err(|e| WireError::Malformed(e.to_string()))?;
                check_len("control message", out.len() - 2, MAX_CONTROL)?;
                Ok(out)
            }
        }
    }

    /// Decodes a message, taking the buffer so a chunk keeps its bytes
    /// without another allocation.
    pub fn decode(mut bytes: Vec<u8>) -> Result<Self, WireError> {
        let [version, kind, ..] = bytes[..] else {
            return Err(WireError::Truncated);
        };
        if version != TRANSFER_VERSION {
            return Err(WireError::UnsupportedVersion { got: version });
        }
        match kind {
            KIND_CHUNK => {
                check_len("chunk", bytes.len() - 2, MAX_CHUNK)?;
                bytes.drain(..2);
                Ok(Self::Chunk(bytes))
            }
            KIND_CONTROL => {
                let body = &bytes[2..];
                check_len("control message", body.len(), MAX_CONTROL)?;
                let (control, used) = bincode::serde::decode_from_slice(body, codec())
                    .map_err(|e| WireError::Malformed(e.to_string()))?;
                if used != body.len() {
                    return Err(WireError::TrailingGarbage);
                }
                Ok(Self::Control(control))
            }
            other => Err(WireError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> BoundedString<MAX_PATH> {
        BoundedString::new(text).unwrap()
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        let messages = [
            TransferMessage::Control(Control::Offer(Offer {
                entries: vec![
                    OfferEntry::Directory { path: path("dir") },
                    OfferEntry::File {
                        path: path("dir/a.txt"),
                        size: 5,
                        blake3: [7; 32],
                    },
                    OfferEntry::Symlink {
                        path: path("dir/link"),
                        target: path("a.txt"),
                    },
                ],
            })),
            TransferMessage::Control(Control::Accept {
                resume: vec![ResumePoint {
                    index: 0,
                    offset: 3,
                    prefix_blake3: [1; 32],
                }],
            }),
            TransferMessage::Control(Control::FileStart {
                index: 0,
                offset: 3,
            }),
            TransferMessage::Chunk(vec![1, 2, 3]),
            TransferMessage::Chunk(Vec::new()),
            TransferMessage::Control(Control::Done),
            TransferMessage::Control(Control::Saved { index: 0 }),
            TransferMessage::Control(Control::Abort(Abort {
                kind: AbortKind::HashMismatch,
                message: BoundedString::truncated("no"),
            })),
        ];
        for message in messages {
            let bytes = message.encode().unwrap();
            assert_eq!(TransferMessage::decode(bytes).unwrap(), message);
        }
    }

    #[test]
    fn bad_input_is_refused_with_its_reason() {
        assert_eq!(
            TransferMessage::decode(vec![TRANSFER_VERSION]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            TransferMessage::decode(vec![9, KIND_CHUNK]),
            Err(WireError::UnsupportedVersion { got: 9 })
        );
        assert_eq!(
            TransferMessage::decode(vec![TRANSFER_VERSION, 7]),
            Err(WireError::UnknownKind(7))
        );
        let mut big = vec![TRANSFER_VERSION, KIND_CHUNK];
        big.resize(2 + MAX_CHUNK + 1, 0);
        assert!(matches!(
            TransferMessage::decode(big),
            Err(WireError::LimitExceeded { field: "chunk", .. })
        ));
        assert!(TransferMessage::Chunk(vec![0; MAX_CHUNK + 1])
            .encode()
            .is_err());
        let mut trailing = TransferMessage::Control(Control::Done).encode().unwrap();
        trailing.push(0);
        assert_eq!(
            TransferMessage::decode(trailing),
            Err(WireError::TrailingGarbage)
        );
        assert!(BoundedString::<MAX_PATH>::new("x".repeat(MAX_PATH + 1)).is_err());
        assert_eq!(BoundedString::<4>::truncated("ééé").len(), 4);
    }

    #[test]
    fn a_forged_list_length_is_refused_before_allocating() {
        // An offer that claims a billion entries in a few bytes.
        let mut forged = vec![TRANSFER_VERSION, KIND_CONTROL];
        let claim = Control::Accept { resume: Vec::new() };
        bincode::serde::encode_into_std_write(&claim, &mut forged, codec()).unwrap();
        forged.pop(); // the empty list's length, 0
        forged.extend_from_slice(&[0xFC, 0x00, 0xCA, 0x9A, 0x3B]); // varint 1e9
        assert!(TransferMessage::decode(forged).is_err());
        // A path longer than the limit.
        let long = TransferMessage::Control(Control::Offer(Offer {
            entries: vec![OfferEntry::Directory {
                path: BoundedString("x".repeat(MAX_PATH + 1)),
            }],
        }));
        assert!(TransferMessage::decode(long.encode().unwrap()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = TransferMessage::decode(bytes);
        }
    }
}
