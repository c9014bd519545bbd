//! The header of a sealed peer-to-peer frame, and the body of a path check.
//!
//! ```text
//! | 0xC4 or 0xC8 | version | session (u32 BE) | counter (u32 BE) | payload ... |
//! ```
//!
//! Two kinds of frame are sealed with the session keys: data (`0xC4`, the
//! reliable channel's packets) and path checks (`0xC8`, a challenge or its
//! response on one route). Both count in the same sequence space, so a
//! nonce is never used twice, and the kind byte is part of the
//! authenticated header, so neither can be passed off as the other.
//!
//! The session field is the low 32 bits of the id of the session the
//! rendezvous introduced (WireGuard's receiver index is as long): enough to
//! tell a host's sessions apart; the handshake binds the whole id into the
//! keys, so a frame of another session never opens. The counter is the
//! key phase (its top bit) over the low 31 bits of the frame's sequence
//! number, which grows by one per frame sent; the receiver expands it to the
//! whole number nearest the next one it expects, as QUIC expands packet
//! numbers. The whole number is the AEAD nonce and the channel's packet
//! number; the whole header is the associated data, so nothing in it can
//! be altered.

use super::{push_header, split_header, FrameKind, WireError, HEADER_LEN};

/// Bytes from the start of a sealed frame to its payload.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 8;

/// What a sealed frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedKind {
    /// A packet of the reliable channel.
    Data,
    /// A [`PathCheck`].
    PathCheck,
}

impl SealedKind {
    fn frame_kind(self) -> FrameKind {
        match self {
            Self::Data => FrameKind::Data,
            Self::PathCheck => FrameKind::PathCheck,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub kind: SealedKind,
    /// The low 32 bits of the session id.
    pub session: u32,
    /// Key phase and truncated sequence number, as sent.
    pub counter: u32,
}

impl DataHeader {
    /// Largest payload that fits a datagram of `datagram` bytes behind
    /// this header.
    pub const fn max_payload(datagram: usize) -> usize {
        datagram - DATA_HEADER_LEN
    }

    /// Appends the header to `out`; the caller appends the payload.
    pub fn write(&self, out: &mut Vec<u8>) {
        push_header(out, self.kind.frame_kind());
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
    }

    /// Splits a sealed frame into its header and payload.
    pub fn parse(bytes: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let (kind, body) = match split_header(bytes)? {
            (FrameKind::Data, body) => (SealedKind::Data, body),
            (FrameKind::PathCheck, body) => (SealedKind::PathCheck, body),
            (got, _) => {
                return Err(WireError::WrongKind {
                    expected: FrameKind::Data,
                    got,
                })
            }
        };
        let Some((session, rest)) = body.split_first_chunk::<4>() else {
            return Err(WireError::Truncated);
        };
        let Some((counter, payload)) = rest.split_first_chunk::<4>() else {
            return Err(WireError::Truncated);
        };
        let header = Self {
            kind,
            session: u32::from_be_bytes(*session),
            counter: u32::from_be_bytes(*counter),
        };
        Ok((header, payload))
    }
}

/// Bytes of a path check's plaintext: a type byte and the 16 random bytes.
pub const PATH_CHECK_LEN: usize = 17;

const CHALLENGE: u8 = 1;
const RESPONSE: u8 = 2;

/// Proof that a route works both ways (RFC 9000's PATH_CHALLENGE and
/// PATH_RESPONSE), sealed so that nobody without the session keys can
/// answer a challenge or forge a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathCheck {
    /// "Answer me on the route this came by": 16 random bytes.
    Challenge([u8; 16]),
    /// The bytes of a challenge, sent back on the route it came by.
    Response([u8; 16]),
}

impl PathCheck {
    pub fn encode(&self) -> [u8; PATH_CHECK_LEN] {
        let (kind, data) = match self {
            Self::Challenge(data) => (CHALLENGE, data),
            Self::Response(data) => (RESPONSE, data),
        };
        let mut out = [0; PATH_CHECK_LEN];
        out[0] = kind;
        out[1..].copy_from_slice(data);
        out
    }

    /// A challenge padded with zeros to `len` bytes of plaintext (at least
    /// [`PATH_CHECK_LEN`]): a probe of whether the path carries a datagram
    /// that large (RFC 8899's probe packet).
    pub fn padded_challenge(data: [u8; 16], len: usize) -> Vec<u8> {
        let mut out = Self::Challenge(data).encode().to_vec();
        out.resize(len.max(PATH_CHECK_LEN), 0);
        out
    }

    /// Decodes the plaintext of a path check frame; a challenge may carry
    /// zero padding.
    pub fn decode(plaintext: &[u8]) -> Result<Self, WireError> {
        let Some((&kind, data)) = plaintext.split_first() else {
            return Err(WireError::Truncated);
        };
        let data = match (kind, data.split_at_checked(16)) {
            (CHALLENGE, Some((data, padding))) if padding.iter().all(|&b| b == 0) => data,
            (CHALLENGE, Some(_)) => return Err(WireError::TrailingGarbage),
            _ => data,
        };
        let data: [u8; 16] = data.try_into().map_err(|_| {
            WireError::Malformed(format!("a path check of {} bytes", plaintext.len()))
        })?;
        match kind {
            CHALLENGE => Ok(Self::Challenge(data)),
            RESPONSE => Ok(Self::Response(data)),
            other => Err(WireError::Malformed(format!("path check type {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in [SealedKind::Data, SealedKind::PathCheck] {
            let header = DataHeader {
                kind,
                session: 0x0102_0304,
                counter: u32::MAX - 1,
            };
            let mut bytes = Vec::new();
            header.write(&mut bytes);
            assert_eq!(bytes.len(), DATA_HEADER_LEN);
            bytes.extend_from_slice(b"payload");
            assert_eq!(DataHeader::parse(&bytes), Ok((header, &b"payload"[..])));
        }
    }

    #[test]
    fn a_challenge_may_be_padded_with_zeros_and_nothing_else() {
        let padded = PathCheck::padded_challenge([7; 16], 1400);
        assert_eq!(padded.len(), 1400);
        assert_eq!(
            PathCheck::decode(&padded),
            Ok(PathCheck::Challenge([7; 16]))
        );
        let mut dirty = padded.clone();
        dirty[900] = 1;
        assert_eq!(PathCheck::decode(&dirty), Err(WireError::TrailingGarbage));
        let mut response = PathCheck::Response([7; 16]).encode().to_vec();
        response.push(0);
        assert!(
            PathCheck::decode(&response).is_err(),
            "responses are never padded"
        );
    }

    #[test]
    fn truncated_header_is_refused() {
        let mut bytes = Vec::new();
        DataHeader {
            kind: SealedKind::Data,
            session: 1,
            counter: 2,
        }
        .write(&mut bytes);
        for len in HEADER_LEN..DATA_HEADER_LEN {
            assert_eq!(DataHeader::parse(&bytes[..len]), Err(WireError::Truncated));
        }
    }

    #[test]
    fn other_kinds_are_not_sealed_frames() {
        assert!(matches!(
            DataHeader::parse(&[FrameKind::Punch as u8, crate::VERSION, 0]),
            Err(WireError::WrongKind { .. })
        ));
    }

    #[test]
    fn path_checks_round_trip_and_refuse_garbage() {
        for check in [
            PathCheck::Challenge([7; 16]),
            PathCheck::Response([0xff; 16]),
        ] {
            assert_eq!(PathCheck::decode(&check.encode()), Ok(check));
        }
        assert_eq!(PathCheck::decode(&[]), Err(WireError::Truncated));
        assert!(PathCheck::decode(&[1; 16]).is_err());
        assert!(PathCheck::decode(&[1; 18]).is_err());
        assert!(PathCheck::decode(&[3; 17]).is_err());
    }
}
