//! Frames the rendezvous relays between two peers that punching could not
//! connect directly.
//!
//! ```text
//! to the server:   | 0xC6 | version | session id (u64 BE) | peer token (u64 BE) | inner frame ... |
//! from the server: | 0xC7 | version | session id (u64 BE) | inner frame ... |
//! ```
//!
//! The inner frame is a whole handshake or data frame, sealed end to end:
//! the server forwards it without reading it. A request with no inner frame
//! is a hello: the peer tells the server it takes relayed frames from now
//! on, and nothing is forwarded. The peer token (from
//! `Registered`) shows the server that the sender is the registered peer and
//! receives at its address; the server strips it, so the other peer never
//! learns it and every forwarded datagram is shorter than the one that
//! caused it.

use super::{expect_kind, push_header, FrameKind, WireError, HEADER_LEN, MAX_DATAGRAM};

/// Bytes before the inner frame of a frame to the server.
pub const RELAY_HEADER_LEN: usize = HEADER_LEN + 16;
/// Bytes before the inner frame of a frame from the server.
pub const RELAYED_HEADER_LEN: usize = HEADER_LEN + 8;

/// A frame a peer asks the server to relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest<'a> {
    pub session_id: u64,
    pub peer_token: u64,
    pub inner: &'a [u8],
}

impl<'a> RelayRequest<'a> {
    /// The datagram; `None` if the inner frame is too large for one.
    pub fn encode(&self) -> Option<Vec<u8>> {
        if RELAY_HEADER_LEN + self.inner.len() > MAX_DATAGRAM {
            return None;
        }
        let mut out = Vec::with_capacity(RELAY_HEADER_LEN + self.inner.len());
        push_header(&mut out, FrameKind::Relay);
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&self.peer_token.to_be_bytes());
        out.extend_from_slice(self.inner);
        Some(out)
    }

    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        // The relay carries frames sized for any path, whatever the two
        // peers' own paths allow.
        if bytes.len() > MAX_DATAGRAM {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let body = expect_kind(bytes, FrameKind::Relay)?;
        let (session_id, rest) = body.split_first_chunk::<8>().ok_or(WireError::Truncated)?;
        let (peer_token, inner) = rest.split_first_chunk::<8>().ok_or(WireError::Truncated)?;
        Ok(Self {
            session_id: u64::from_be_bytes(*session_id),
            peer_token: u64::from_be_bytes(*peer_token),
            inner,
        })
    }

    /// What the server sends on to the other peer.
    pub fn forwarded(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RELAYED_HEADER_LEN + self.inner.len());
        push_header(&mut out, FrameKind::Relayed);
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(self.inner);
        out
    }
}

/// Splits a frame from the server into its session id and inner frame.
pub fn parse_relayed(bytes: &[u8]) -> Result<(u64, &[u8]), WireError> {
    let body = expect_kind(bytes, FrameKind::Relayed)?;
    let (session_id, inner) = body.split_first_chunk::<8>().ok_or(WireError::Truncated)?;
    Ok((u64::from_be_bytes(*session_id), inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_forwarded_without_its_token_and_shorter() {
        let request = RelayRequest {
            session_id: 0x0102_0304_0506_0708,
            peer_token: 0xfeed,
            inner: b"sealed frame",
        };
        let bytes = request.encode().unwrap();
        assert_eq!(bytes.len(), RELAY_HEADER_LEN + 12);
        let parsed = RelayRequest::parse(&bytes).unwrap();
        assert_eq!(parsed, request);
        let forwarded = parsed.forwarded();
        assert!(forwarded.len() < bytes.len());
        assert!(!forwarded.windows(8).any(|w| w == 0xfeedu64.to_be_bytes()));
        assert_eq!(
            parse_relayed(&forwarded),
            Ok((0x0102_0304_0506_0708, &b"sealed frame"[..]))
        );
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused() {
        let inner = vec![0; MAX_DATAGRAM - RELAY_HEADER_LEN + 1];
        let request = RelayRequest {
            session_id: 1,
            peer_token: 2,
            inner: &inner,
        };
        assert_eq!(request.encode(), None);
        let bytes = RelayRequest {
            inner: b"",
            ..request
        }
        .encode()
        .unwrap();
        for len in HEADER_LEN..RELAY_HEADER_LEN {
            assert_eq!(
                RelayRequest::parse(&bytes[..len]),
                Err(WireError::Truncated)
            );
        }
        let forwarded = RelayRequest::parse(&bytes).unwrap().forwarded();
        for len in HEADER_LEN..RELAYED_HEADER_LEN {
            assert_eq!(parse_relayed(&forwarded[..len]), Err(WireError::Truncated));
        }
    }
}
