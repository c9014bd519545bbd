//! Messages of the handshake that turns a punched path into an encrypted
//! session: SPAKE2 (when the peers share a pairing code) and then Noise.
//!
//! Like punch messages they name the session, so a stray message from an
//! earlier session or a stranger is dropped before any cryptography runs.

use serde::{Deserialize, Serialize};

use crate::control::{bounded, decode_body, encode_frame};
use crate::{expect_kind, FrameKind, WireError};

/// Longest SPAKE2 or Noise handshake message carried.
pub const MAX_HANDSHAKE_MESSAGE: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeMessage {
    /// This side's SPAKE2 message.
    Pake {
        session_id: u64,
        #[serde(deserialize_with = "bounded::<_, MAX_HANDSHAKE_MESSAGE, _>")]
        message: Vec<u8>,
    },
    /// Noise handshake message number `step` (1 to 3).
    Noise {
        session_id: u64,
        step: u8,
        #[serde(deserialize_with = "bounded::<_, MAX_HANDSHAKE_MESSAGE, _>")]
        message: Vec<u8>,
    },
    /// The Noise message could not be authenticated: the two sides do not
    /// share the code. Unauthenticated by nature; it only ends a handshake
    /// that was failing anyway.
    Reject { session_id: u64 },
}

impl HandshakeMessage {
    pub fn session_id(&self) -> u64 {
        match *self {
            Self::Pake { session_id, .. }
            | Self::Noise { session_id, .. }
            | Self::Reject { session_id } => session_id,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        encode_frame(FrameKind::Handshake, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode_body(expect_kind(bytes, FrameKind::Handshake)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for message in [
            HandshakeMessage::Pake {
                session_id: 1,
                message: vec![7; 33],
            },
            HandshakeMessage::Noise {
                session_id: u64::MAX,
                step: 2,
                message: vec![9; 96],
            },
            HandshakeMessage::Reject { session_id: 3 },
        ] {
            let bytes = message.encode().unwrap();
            assert_eq!(HandshakeMessage::decode(&bytes), Ok(message));
        }
    }

    #[test]
    fn oversized_message_is_refused() {
        let message = HandshakeMessage::Pake {
            session_id: 1,
            message: vec![0; MAX_HANDSHAKE_MESSAGE + 1],
        };
        let bytes = message.encode().unwrap();
        assert!(matches!(
            HandshakeMessage::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
    }
}
