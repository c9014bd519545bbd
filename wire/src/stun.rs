//! The slice of STUN (RFC 8489) natter speaks: Binding requests and Binding
//! success responses with XOR-MAPPED-ADDRESS and FINGERPRINT, and the two
//! attributes of NAT behaviour discovery (RFC 5780): OTHER-ADDRESS, where
//! the server also listens, and CHANGE-REQUEST, asking it to answer from
//! there.
//!
//! Written by hand rather than taken from a codec crate because natter needs
//! only this one method, the rendezvous answers it on its hot path without
//! allocating more than the reply, and the peer must speak it on its own
//! punching socket (see docs/ARCHITECTURE.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_OTHER_ADDRESS: u16 = 0x802C;
const CHANGE_IP: u8 = 0x04;
const CHANGE_PORT: u8 = 0x02;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554E;
const FINGERPRINT_ATTR_LEN: usize = 8;

/// The 96-bit id that pairs a STUN response with its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId([u8; 12]);

impl TransactionId {
    pub fn new(bytes: [u8; 12]) -> Self {
        Self(bytes)
    }

    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// What a CHANGE-REQUEST asks of the server: answer from its other IP
/// address, its other port, or both (RFC 5780 section 7.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Change {
    pub ip: bool,
    pub port: bool,
}

impl Change {
    pub const NONE: Self = Self {
        ip: false,
        port: false,
    };

    pub fn is_none(self) -> bool {
        self == Self::NONE
    }
}

/// A parsed STUN message, reduced to what natter acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    BindingRequest {
        transaction: TransactionId,
        change: Change,
    },
    BindingSuccess {
        transaction: TransactionId,
        mapped: SocketAddr,
        /// Where else the server listens; an unspecified IP means "the
        /// address you sent to" (a server bound to a wildcard address does
        /// not know its own).
        other: Option<SocketAddr>,
    },
    /// Any other method or class: valid STUN that natter does not answer.
    Other { message_type: u16 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("STUN attribute runs past the end of the message")]
    Truncated,
    #[error("STUN address attribute is malformed")]
    BadAddress,
    #[error("STUN FINGERPRINT does not match")]
    BadFingerprint,
    #[error("STUN CHANGE-REQUEST is not four bytes")]
    BadChangeRequest,
    #[error("STUN Binding success carries no mapped address")]
    NoMappedAddress,
}

/// True when `bytes` has the shape of a STUN message: first two bits zero,
/// the magic cookie at bytes 4..8, and a length field that matches.
pub fn is_stun(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN
        && bytes[0] & 0xC0 == 0
        && bytes[4..8] == MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([bytes[2], bytes[3]])) + HEADER_LEN == bytes.len()
        && bytes.len() % 4 == 0
}

/// A Binding request with no attributes.
pub fn binding_request(transaction: TransactionId) -> [u8; HEADER_LEN] {
    let mut out = [0; HEADER_LEN];
    write_header(&mut out, BINDING_REQUEST, 0, transaction);
    out
}

/// A Binding request with a CHANGE-REQUEST attribute.
pub fn binding_request_with_change(transaction: TransactionId, change: Change) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    write_header(&mut out, BINDING_REQUEST, 8, transaction);
    let flags = if change.ip { CHANGE_IP } else { 0 } | if change.port { CHANGE_PORT } else { 0 };
    out.extend_from_slice(&ATTR_CHANGE_REQUEST.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, flags]);
    out
}

/// A Binding success response telling the requester its `mapped` address,
/// and `other`, where the server also listens, with FINGERPRINT.
pub fn binding_success(
    transaction: TransactionId,
    mapped: SocketAddr,
    other: Option<SocketAddr>,
) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    push_address(&mut out, ATTR_XOR_MAPPED_ADDRESS, mapped, Some(transaction));
    if let Some(other) = other {
        push_address(&mut out, ATTR_OTHER_ADDRESS, other, None);
    }
    let attrs_len = out.len() - HEADER_LEN + FINGERPRINT_ATTR_LEN;
    write_header(&mut out, BINDING_SUCCESS, attrs_len as u16, transaction);
    let crc = crc32fast::hash(&out) ^ FINGERPRINT_XOR;
    out.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Appends an address attribute, XOR-encoded with `xor`'s transaction id
/// when given (XOR-MAPPED-ADDRESS), plain otherwise (OTHER-ADDRESS).
fn push_address(out: &mut Vec<u8>, attr: u16, addr: SocketAddr, xor: Option<TransactionId>) {
    let address_len: u16 = match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    };
    out.extend_from_slice(&attr.to_be_bytes());
    out.extend_from_slice(&address_len.to_be_bytes());
    out.push(0);
    let port_mask = if xor.is_some() {
        (MAGIC_COOKIE >> 16) as u16
    } else {
        0
    };
    let port = addr.port() ^ port_mask;
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(0x01);
            out.extend_from_slice(&port.to_be_bytes());
            let mask = if xor.is_some() { MAGIC_COOKIE } else { 0 };
            out.extend_from_slice(&(u32::from(ip) ^ mask).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            out.push(0x02);
            out.extend_from_slice(&port.to_be_bytes());
            let mask = xor.map_or([0; 16], xor_mask_v6);
            out.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
}

/// Parses a STUN message. A FINGERPRINT, when present, must be correct.
pub fn parse(bytes: &[u8]) -> Result<Message, StunError> {
    if !is_stun(bytes) {
        return Err(StunError::NotStun);
    }
    let message_type = u16::from_be_bytes([bytes[0], bytes[1]]);
    let transaction = TransactionId(bytes[8..20].try_into().expect("header is 20 bytes"));
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut other = None;
    let mut change = Change::NONE;
    let mut offset = HEADER_LEN;
    while offset < bytes.len() {
        let Some(head) = bytes.get(offset..offset + 4) else {
            return Err(StunError::Truncated);
        };
        let attr_type = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = bytes
            .get(offset + 4..offset + 4 + len)
            .ok_or(StunError::Truncated)?;
        match attr_type {
            ATTR_XOR_MAPPED_ADDRESS => xor_mapped = Some(parse_address(value, Some(transaction))?),
            ATTR_MAPPED_ADDRESS => mapped = Some(parse_address(value, None)?),
            ATTR_OTHER_ADDRESS => other = Some(parse_address(value, None)?),
            ATTR_CHANGE_REQUEST => {
                let [_, _, _, flags] = value else {
                    return Err(StunError::BadChangeRequest);
                };
                change = Change {
                    ip: flags & CHANGE_IP != 0,
                    port: flags & CHANGE_PORT != 0,
                };
            }
            ATTR_FINGERPRINT => {
                let expected = crc32fast::hash(&bytes[..offset]) ^ FINGERPRINT_XOR;
                if value != expected.to_be_bytes() {
                    return Err(StunError::BadFingerprint);
                }
            }
            _ => {}
        }
        offset += 4 + len.next_multiple_of(4);
    }
    Ok(match message_type {
        BINDING_REQUEST => Message::BindingRequest {
            transaction,
            change,
        },
        BINDING_SUCCESS => Message::BindingSuccess {
            transaction,
            mapped: xor_mapped.or(mapped).ok_or(StunError::NoMappedAddress)?,
            other,
        },
        message_type => Message::Other { message_type },
    })
}

fn write_header(out: &mut [u8], message_type: u16, length: u16, transaction: TransactionId) {
    out[0..2].copy_from_slice(&message_type.to_be_bytes());
    out[2..4].copy_from_slice(&length.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(&transaction.0);
}

fn xor_mask_v6(transaction: TransactionId) -> [u8; 16] {
    let mut mask = [0; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(&transaction.0);
    mask
}

/// Reads a (XOR-)MAPPED-ADDRESS value; `xor` carries the transaction id when
/// the address is XOR-encoded.
fn parse_address(value: &[u8], xor: Option<TransactionId>) -> Result<SocketAddr, StunError> {
    let [_, family, p0, p1, address @ ..] = value else {
        return Err(StunError::BadAddress);
    };
    let mut port = u16::from_be_bytes([*p0, *p1]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (family, address.len()) {
        (0x01, 4) => {
            let mut ip = u32::from_be_bytes(address.try_into().expect("length checked"));
            if xor.is_some() {
                ip ^= MAGIC_COOKIE;
            }
            IpAddr::V4(Ipv4Addr::from(ip))
        }
        (0x02, 16) => {
            let mut octets: [u8; 16] = address.try_into().expect("length checked");
            if let Some(transaction) = xor {
                for (octet, mask) in octets.iter_mut().zip(xor_mask_v6(transaction)) {
                    *octet ^= mask;
                }
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(StunError::BadAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binding_request_round_trip() {
        let id = TransactionId::new([1; 12]);
        let request = binding_request(id);
        assert!(is_stun(&request));
        assert_eq!(
            parse(&request),
            Ok(Message::BindingRequest {
                transaction: id,
                change: Change::NONE
            })
        );
        for (ip, port) in [(true, true), (false, true), (true, false)] {
            let change = Change { ip, port };
            let request = binding_request_with_change(id, change);
            assert!(is_stun(&request));
            assert_eq!(
                parse(&request),
                Ok(Message::BindingRequest {
                    transaction: id,
                    change
                })
            );
        }
    }

    #[test]
    fn binding_success_round_trip_v4_and_v6() {
        let id = TransactionId::new(*b"abcdefghijkl");
        for (mapped, other) in [
            ("203.0.113.9:54321", None),
            ("203.0.113.9:54321", Some("198.51.100.2:7778")),
            ("[2001:db8::1]:7777", Some("[2001:db8::2]:7778")),
        ] {
            let mapped: SocketAddr = mapped.parse().unwrap();
            let other = other.map(|o: &str| o.parse().unwrap());
            let response = binding_success(id, mapped, other);
            assert!(is_stun(&response));
            assert_eq!(
                parse(&response),
                Ok(Message::BindingSuccess {
                    transaction: id,
                    mapped,
                    other
                })
            );
        }
    }

    /// RFC 5769 section 2.2: sample IPv4 response (software name, mapped
    /// address 192.0.2.1:32853, MESSAGE-INTEGRITY and FINGERPRINT).
    #[test]
    fn parses_rfc5769_ipv4_response() {
        let sample: [u8; 80] = [
            0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34,
            0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74,
            0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01,
            0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99,
            0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b,
            0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
        ];
        let Ok(Message::BindingSuccess { mapped, .. }) = parse(&sample) else {
            panic!("RFC 5769 sample did not parse: {:?}", parse(&sample));
        };
        assert_eq!(mapped, "192.0.2.1:32853".parse().unwrap());
        let mut corrupted = sample;
        corrupted[79] ^= 1;
        assert_eq!(parse(&corrupted), Err(StunError::BadFingerprint));
    }

    #[test]
    fn truncated_attribute_is_refused() {
        let mut response = binding_success(
            TransactionId::new([3; 12]),
            "1.2.3.4:5".parse().unwrap(),
            None,
        );
        // Claim a longer first attribute than the message holds.
        response[22..24].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(parse(&response), Err(StunError::Truncated));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn parsing_arbitrary_bytes_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            // Again with a valid header so attribute parsing is exercised.
            if bytes.len() >= HEADER_LEN {
                bytes.truncate(bytes.len() / 4 * 4);
                let len = (bytes.len() - HEADER_LEN) as u16;
                bytes[0] &= 0x3f;
                bytes[2..4].copy_from_slice(&len.to_be_bytes());
                bytes[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let _ = parse(&bytes);
            }
        }
    }
}
