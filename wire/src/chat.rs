//! Chat messages (`natter chat`), carried as messages of the encrypted
//! session: a version byte, then bincode within [`MAX_CHAT_MESSAGE`].
//!
//! Each side numbers the lines it types to one peer, 1, 2, 3, … across
//! sessions (the numbers are kept on disk), and sends every line the peer
//! has not confirmed again on each new session; the receiver shows a line
//! only if its number is past the last one it showed, and confirms with
//! [`ChatMessage::Received`]. So a line survives a dropped session and a
//! restarted process, and is shown once.

use serde::{Deserialize, Serialize};

use super::control::{BoundedString, MAX_ROOM_CODE};
use super::WireError;

/// The chat protocol version this build speaks.
pub const CHAT_VERSION: u8 = 1;

/// Longest line, in bytes.
pub const MAX_LINE: usize = 4096;

/// Largest encoded chat message.
pub const MAX_CHAT_MESSAGE: usize = MAX_LINE + MAX_ROOM_CODE + 64;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CHAT_MESSAGE>()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatMessage {
    /// A line typed on the sending side: its number among the lines that
    /// side typed to this peer, and when (ms since the Unix epoch, the
    /// sender's clock).
    Line {
        seq: u64,
        typed_at_ms: u64,
        text: BoundedString<MAX_LINE>,
    },
    /// Every line up to `seq` has arrived and is kept.
    Received { up_to: u64 },
    /// The sender offers files (`/send PATH`): they go over a session of
    /// their own, met with `code` (a pairing code made up for it), as
    /// `natter send` and `natter receive` do. `summary` says what they are.
    /// Not numbered: an offer is for now, not for a later session.
    FileOffer {
        code: BoundedString<MAX_ROOM_CODE>,
        summary: BoundedString<MAX_LINE>,
    },
    /// The offer made with `code` is declined.
    FileDeclined { code: BoundedString<MAX_ROOM_CODE> },
}

impl ChatMessage {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = vec![CHAT_VERSION];
        bincode::serde::encode_into_std_write(self, &mut out, codec())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let [version, body @ ..] = bytes else {
            return Err(WireError::Truncated);
        };
        if *version != CHAT_VERSION {
            return Err(WireError::UnsupportedVersion { got: *version });
        }
        if body.len() > MAX_CHAT_MESSAGE {
            return Err(WireError::TooLarge(body.len()));
        }
        let (message, used) = bincode::serde::decode_from_slice(body, codec())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != body.len() {
            return Err(WireError::TrailingGarbage);
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_a_round_trip_and_bad_ones_are_refused() {
        let line = ChatMessage::Line {
            seq: 7,
            typed_at_ms: 1_764_830_000_000,
            text: BoundedString::new("héllo").unwrap(),
        };
        let offer = ChatMessage::FileOffer {
            code: BoundedString::new("12-tuxedo-orbit").unwrap(),
            summary: BoundedString::new("photos/ (3 files, 1.2 MiB)").unwrap(),
        };
        let declined = ChatMessage::FileDeclined {
            code: BoundedString::new("12-tuxedo-orbit").unwrap(),
        };
        for message in [
            line,
            ChatMessage::Received { up_to: u64::MAX },
            offer,
            declined,
        ] {
            assert_eq!(
                ChatMessage::decode(&message.encode().unwrap()).unwrap(),
                message
            );
        }
        assert_eq!(ChatMessage::decode(&[]), Err(WireError::Truncated));
        assert_eq!(
            ChatMessage::decode(&[9, 0]),
            Err(WireError::UnsupportedVersion { got: 9 })
        );
        let long = ChatMessage::Line {
            seq: 1,
            typed_at_ms: 0,
            text: BoundedString::truncated(&"x".repeat(MAX_LINE + 10)),
        };
        assert!(ChatMessage::decode(&long.encode().unwrap()).is_ok());
        let too_long = ChatMessage::Line {
            seq: 1,
            typed_at_ms: 0,
            text: BoundedString("x".repeat(MAX_LINE + 1)),
        }
        .encode()
        .unwrap();
        assert!(ChatMessage::decode(&too_long).is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = ChatMessage::decode(&bytes);
        }
    }
}
