//! Messages two peers exchange while punching through their NATs.
//!
//! Every message names the session the rendezvous introduced, so probes from
//! an older session or a stranger are told apart and ignored. They carry
//! nothing secret: the session id is a random number the rendezvous chose,
//! and the nonces only pair an answer with its question.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::control::{decode_body, encode_frame};
use crate::{expect_kind, FrameKind, WireError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PunchMessage {
    /// "Can you hear me on this path?"
    Probe {
        session_id: u64,
        nonce: u64,
    },
    /// Sent back to the address the probe came from, with that address as
    /// the sender observed it (a peer-reflexive address, as in ICE).
    ProbeAck {
        session_id: u64,
        nonce: u64,
        observed: SocketAddr,
    },
    /// The controlling peer picks this path for the session.
    Nominate {
        session_id: u64,
        nonce: u64,
    },
    NominateAck {
        session_id: u64,
        nonce: u64,
    },
}

impl PunchMessage {
    pub fn session_id(&self) -> u64 {
        match *self {
            Self::Probe { session_id, .. }
            | Self::ProbeAck { session_id, .. }
            | Self::Nominate { session_id, .. }
            | Self::NominateAck { session_id, .. } => session_id,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        encode_frame(FrameKind::Punch, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode_body(expect_kind(bytes, FrameKind::Punch)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let observed = "[2001:db8::7]:65535".parse().unwrap();
        for message in [
            PunchMessage::Probe {
                session_id: 1,
                nonce: u64::MAX,
            },
            PunchMessage::ProbeAck {
                session_id: u64::MAX,
                nonce: 2,
                observed,
            },
            PunchMessage::Nominate {
                session_id: 3,
                nonce: 4,
            },
            PunchMessage::NominateAck {
                session_id: 5,
                nonce: 6,
            },
        ] {
            let bytes = message.encode().unwrap();
            assert!(bytes.len() <= 48, "{} bytes", bytes.len());
            assert_eq!(PunchMessage::decode(&bytes), Ok(message));
        }
    }

    #[test]
    fn wrong_kind_is_refused() {
        assert!(matches!(
            PunchMessage::decode(&[FrameKind::Data as u8, crate::VERSION, 0]),
            Err(WireError::WrongKind { .. })
        ));
    }
}
