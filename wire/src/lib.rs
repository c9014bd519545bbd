//! Every datagram natter puts on the wire, in one place.
//!
//! A natter socket carries three kinds of traffic: STUN (to learn reflexive
//! addresses), natter control frames (rendezvous and punching), and data
//! frames (the session between two peers). [`classify`] tells them apart by
//! the first bytes alone, so one socket can serve all three and keep a single
//! NAT mapping.
//!
//! Every natter frame opens with a two-byte header:
//!
//! ```text
//!  0               1               2
//! +---------------+---------------+---------------- - -
//! | 0b1100_kkkk   |    version    |  body (per kind)
//! +---------------+---------------+---------------- - -
//! ```
//!
//! The high nibble `0xC` marks a natter frame: STUN's first two bits are always
//! zero, so a STUN message can never be read as natter and vice versa (the
//! STUN check also demands the magic cookie). The low nibble is the
//! [`FrameKind`]. The version is checked before the kind, so a frame from a
//! future protocol version yields [`WireError::UnsupportedVersion`], never a
//! misparse.
//!
//! File transfer messages ([`transfer`]) ride inside the encrypted session,
//! not as datagrams; they are defined here too, with their own version.
//!
//! Control and punch bodies are bincode 2 (serde) with a byte limit of [`MAX_DATAGRAM`]:
//! a hostile length prefix can never make the decoder allocate more than one
//! datagram's worth. Data frames are laid out by hand because they are on the
//! hot path and their header is authenticated data for the AEAD seal.

pub mod chat;
mod control;
mod data;
mod handshake;
mod punch;
mod relay;
pub mod stun;
pub mod transfer;

pub use control::{
    AddressCookie, BoundedString, BusyReason, ClientMessage, NatMapping, Register, RejoinTag, Role,
    RoomCode, ServerErrorKind, ServerMessage, MAX_HOST_CANDIDATES, MAX_ROOM_CODE,
    REGISTER_PADDED_LEN,
};
pub use data::{DataHeader, PathCheck, SealedKind, DATA_HEADER_LEN, PATH_CHECK_LEN};
pub use handshake::{HandshakeMessage, MAX_HANDSHAKE_MESSAGE};
pub use punch::PunchMessage;
pub use relay::{parse_relayed, RelayRequest, RELAYED_HEADER_LEN, RELAY_HEADER_LEN};

/// The protocol version this build speaks. Version 2: sealed frames carry
/// 4 bytes of session id and a 4-byte counter (8 each before), and the
/// channel's packets no packet number of their own (the counter is it).
/// Version 3: `Registered` tells the relay's rate per peer (a flag before).
pub const VERSION: u8 = 3;

/// Largest datagram natter sends before it knows the path, header
/// included, and the largest of the rendezvous protocol, the handshake and
/// the relay always: 1200 bytes fits any real path's MTU without IP
/// fragmentation (the figure QUIC uses).
pub const MAX_DATAGRAM: usize = 1200;

/// Largest sealed frame (data or path check) on a direct path whose MTU
/// discovery found room for it: a 1500-byte Ethernet MTU less an IPv6 and a
/// UDP header (the ceiling quinn probes up to as well).
pub const MAX_PATH_DATAGRAM: usize = 1452;

/// Bytes before a frame's body: the kind byte and the version byte.
pub const HEADER_LEN: usize = 2;

const NATTER_MARK: u8 = 0xC0;
const NATTER_MARK_MASK: u8 = 0xF0;

/// What the first byte of a natter frame says it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Peer to rendezvous: [`ClientMessage`].
    ToServer = 0xC1,
    /// Rendezvous to peer: [`ServerMessage`].
    FromServer = 0xC2,
    /// Peer to peer while punching: [`PunchMessage`].
    Punch = 0xC3,
    /// Peer to peer while agreeing on keys: [`HandshakeMessage`].
    Handshake = 0xC5,
    /// Peer to peer session traffic: [`DataHeader`] then the payload.
    Data = 0xC4,
    /// Peer to rendezvous: a frame for the other peer ([`RelayRequest`]).
    Relay = 0xC6,
    /// Rendezvous to peer: a frame from the other peer ([`parse_relayed`]).
    Relayed = 0xC7,
    /// Peer to peer, sealed like data: a [`PathCheck`] on one route.
    PathCheck = 0xC8,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0xC1 => Some(Self::ToServer),
            0xC2 => Some(Self::FromServer),
            0xC3 => Some(Self::Punch),
            0xC4 => Some(Self::Data),
            0xC5 => Some(Self::Handshake),
            0xC6 => Some(Self::Relay),
            0xC7 => Some(Self::Relayed),
            0xC8 => Some(Self::PathCheck),
            _ => None,
        }
    }
}

/// Which protocol a received datagram belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Stun,
    Natter,
    Unknown,
}

/// Sorts a datagram by its first bytes, without parsing it.
pub fn classify(bytes: &[u8]) -> Class {
    if stun::is_stun(bytes) {
        Class::Stun
    } else if bytes
        .first()
        .is_some_and(|b| b & NATTER_MARK_MASK == NATTER_MARK)
    {
        Class::Natter
    } else {
        Class::Unknown
    }
}

/// Why a datagram could not be decoded. Each variant has a short
/// [`reason`](WireError::reason) for drop counters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("datagram is shorter than the {HEADER_LEN}-byte natter header")]
    Truncated,
    #[error("not a natter frame (first byte {0:#04x})")]
    NotNatter(u8),
    #[error("unsupported natter protocol version {got} (this build speaks version {VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("unknown natter frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} frame, got {got:?}")]
    WrongKind { expected: FrameKind, got: FrameKind },
    #[error("datagram of {0} bytes exceeds the {MAX_PATH_DATAGRAM}-byte limit")]
    TooLarge(usize),
    #[error("{field} holds {len}, more than the limit of {max}")]
    LimitExceeded {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("trailing bytes after the frame body are not zero padding")]
    TrailingGarbage,
}

impl WireError {
    /// A stable, short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::NotNatter(_) => "not_natter",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::UnknownKind(_) => "unknown_kind",
            Self::WrongKind { .. } => "wrong_kind",
            Self::TooLarge(_) => "too_large",
            Self::LimitExceeded { .. } => "limit_exceeded",
            Self::Malformed(_) => "malformed",
            Self::TrailingGarbage => "trailing_garbage",
        }
    }
}

/// Checks the two-byte header and returns the frame kind and the body.
pub fn split_header(bytes: &[u8]) -> Result<(FrameKind, &[u8]), WireError> {
    if bytes.len() > MAX_PATH_DATAGRAM {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let [kind, version, body @ ..] = bytes else {
        return Err(WireError::Truncated);
    };
    if kind & NATTER_MARK_MASK != NATTER_MARK {
        return Err(WireError::NotNatter(*kind));
    }
    if *version != VERSION {
        return Err(WireError::UnsupportedVersion { got: *version });
    }
    let kind = FrameKind::from_byte(*kind).ok_or(WireError::UnknownKind(*kind))?;
    Ok((kind, body))
}

/// Checks the header and that the frame is of the `expected` kind.
fn expect_kind(bytes: &[u8], expected: FrameKind) -> Result<&[u8], WireError> {
    match split_header(bytes)? {
        (got, body) if got == expected => Ok(body),
        (got, _) => Err(WireError::WrongKind { expected, got }),
    }
}

fn push_header(out: &mut Vec<u8>, kind: FrameKind) {
    out.push(kind as u8);
    out.push(VERSION);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_version_is_reported_before_kind() {
        assert_eq!(
            split_header(&[0xCF, 9, 0]),
            Err(WireError::UnsupportedVersion { got: 9 })
        );
        // Version 1 (8-byte counters in sealed frames) is refused too.
        assert_eq!(
            split_header(&[0xC1, 1]),
            Err(WireError::UnsupportedVersion { got: 1 })
        );
    }

    #[test]
    fn short_and_foreign_datagrams_are_rejected() {
        assert_eq!(split_header(&[]), Err(WireError::Truncated));
        assert_eq!(split_header(&[0xC1]), Err(WireError::Truncated));
        assert_eq!(split_header(&[0x00, 1]), Err(WireError::NotNatter(0)));
        assert_eq!(
            split_header(&[0xCE, VERSION]),
            Err(WireError::UnknownKind(0xCE))
        );
        assert_eq!(
            split_header(&vec![0xC4; MAX_PATH_DATAGRAM + 1]),
            Err(WireError::TooLarge(MAX_PATH_DATAGRAM + 1))
        );
    }

    #[test]
    fn classify_separates_stun_from_natter() {
        let request = stun::binding_request(stun::TransactionId::new([7; 12]));
        assert_eq!(classify(&request), Class::Stun);
        assert!(split_header(&request).is_err());
        assert_eq!(classify(&[0xC1, VERSION]), Class::Natter);
        assert_eq!(classify(&[0x17, 0x03, 0x03]), Class::Unknown);
        assert_eq!(classify(&[]), Class::Unknown);
    }
}
