//! The header of a peer-to-peer data frame.
//!
//! ```text
//! | 0xC4 | version | session id (u64 BE) | counter (u64 BE) | payload ... |
//! ```
//!
//! The session id names the session the rendezvous introduced, so a frame for
//! an old or foreign session is dropped before any work. The counter grows by
//! one per frame sent; once sessions are sealed it is the AEAD nonce and the
//! whole header is the associated data, so nothing in it can be altered.

use super::{expect_kind, push_header, FrameKind, WireError, HEADER_LEN, MAX_DATAGRAM};

/// Bytes from the start of a data frame to its payload.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub session_id: u64,
    pub counter: u64,
}

impl DataHeader {
    /// Largest payload that fits one datagram behind this header.
    pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - DATA_HEADER_LEN;

    /// Appends the header to `out`; the caller appends the payload.
    pub fn write(&self, out: &mut Vec<u8>) {
        push_header(out, FrameKind::Data);
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
    }

    /// Splits a data frame into its header and payload.
    pub fn parse(bytes: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let body = expect_kind(bytes, FrameKind::Data)?;
        let Some((session_id, rest)) = body.split_first_chunk::<8>() else {
            return Err(WireError::Truncated);
        };
        let Some((counter, payload)) = rest.split_first_chunk::<8>() else {
            return Err(WireError::Truncated);
        };
        let header = Self {
            session_id: u64::from_be_bytes(*session_id),
            counter: u64::from_be_bytes(*counter),
        };
        Ok((header, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let header = DataHeader {
            session_id: 0x0102_0304_0506_0708,
            counter: u64::MAX - 1,
        };
        let mut bytes = Vec::new();
        header.write(&mut bytes);
        assert_eq!(bytes.len(), DATA_HEADER_LEN);
        bytes.extend_from_slice(b"payload");
        assert_eq!(DataHeader::parse(&bytes), Ok((header, &b"payload"[..])));
    }

    #[test]
    fn truncated_header_is_refused() {
        let mut bytes = Vec::new();
        DataHeader {
            session_id: 1,
            counter: 2,
        }
        .write(&mut bytes);
        for len in HEADER_LEN..DATA_HEADER_LEN {
            assert_eq!(DataHeader::parse(&bytes[..len]), Err(WireError::Truncated));
        }
    }
}
