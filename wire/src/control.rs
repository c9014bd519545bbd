//! Control messages between a peer and the rendezvous server.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{expect_kind, push_header, FrameKind, WireError, MAX_DATAGRAM};

/// Longest room code the rendezvous accepts, in bytes.
pub const MAX_ROOM_CODE: usize = 64;

/// Most host candidates one peer may advertise.
pub const MAX_HOST_CANDIDATES: usize = 8;

/// Every `Register` datagram is padded with zeros to this size, and the
/// rendezvous ignores shorter ones. No reply is ever larger (a test checks the
/// largest possible `Introduce`), so the server cannot be used to amplify a
/// spoofed flood, as QUIC pads its Initial packets for the same reason.
pub const REGISTER_PADDED_LEN: usize = 256;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DATAGRAM>()
}

/// The name of a meeting room on the rendezvous: opaque bytes, at most
/// [`MAX_ROOM_CODE`] long.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoomCode(#[serde(deserialize_with = "bounded::<_, MAX_ROOM_CODE, _>")] Vec<u8>);

impl RoomCode {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, WireError> {
        let code = Self(bytes.into());
        code.check()?;
        Ok(code)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn check(&self) -> Result<(), WireError> {
        check_len("room code", self.0.len(), MAX_ROOM_CODE)
    }
}

/// A peer asks to be (or stay) registered in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub room: RoomCode,
    /// Addresses of the peer's own interfaces, for peers on the same LAN.
    #[serde(deserialize_with = "bounded::<_, MAX_HOST_CANDIDATES, _>")]
    pub host_candidates: Vec<SocketAddr>,
    /// Echoed in the reply so the peer can match it to this request.
    pub client_nonce: u64,
    /// The token from an earlier `Registered`: proves a refresh comes from the
    /// peer that registered, so nobody else can redirect or evict it.
    pub peer_token: Option<u64>,
    /// The peer made the room's name up and expects the room empty: if
    /// someone else is in it, refuse with `RoomTaken` rather than introduce
    /// two strangers (a nameplate collision).
    pub claim: bool,
    /// The cookie from the server's last `Busy`, proving this peer receives
    /// at the address it sends from. After the fields of the first builds,
    /// so that a Register from one of them (zero padding where the field
    /// would be) decodes as `None`.
    pub cookie: Option<AddressCookie>,
    /// How this peer's NAT maps, as it measured before registering; passed
    /// on to the other peer. After `cookie`, for the same reason.
    pub nat: Option<NatMapping>,
    /// A public address the peer's gateway forwards to its socket (a port
    /// mapping made with UPnP-IGD, PCP or NAT-PMP). Last, for the same
    /// reason as `cookie`.
    pub mapped: Option<SocketAddr>,
    /// The same for every run of this peer (its long-term key) in this
    /// room, and unguessable without that key: a tokenless Register with
    /// the tag of a member already in the room replaces that member, so a
    /// process that was killed and started again is not kept out by its
    /// own lingering registration. Last, for the same reason as `cookie`.
    pub rejoin: Option<RejoinTag>,
}

/// How a peer's NAT maps its socket, measured against the rendezvous's two
/// addresses (`natter::netcheck`). The other peer learns it with the
/// introduction and picks its punching technique by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatMapping {
    /// Not measured: the rendezvous names no second address, or did not
    /// answer there in time.
    Unknown,
    /// No NAT, or one that maps the socket to one external address for
    /// every destination: a plain punch reaches it.
    EndpointIndependent,
    /// A new external port for each destination ("symmetric"); in steps of
    /// `sequential_step` when the NAT hands them out in order.
    EndpointDependent { sequential_step: Option<i16> },
}

/// A MAC of a peer's address under a secret of the server's, which rotates.
/// A server under load serves only peers that echo one, so it keeps no state
/// for a source until that source has shown it receives at its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressCookie(pub [u8; 16]);

/// See [`Register::rejoin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RejoinTag(pub [u8; 16]);

/// Datagrams a peer sends to the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    Register(Register),
    Leave { room: RoomCode, peer_token: u64 },
}

/// Which side of the pair drives path nomination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Controlling,
    Controlled,
}

/// Why the rendezvous refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerErrorKind {
    /// The room already holds two peers.
    RoomFull,
    /// The server is at its configured peer limit.
    ServerFull,
    /// The `peer_token` does not match the registration it names.
    BadToken,
    /// A claiming `Register` found someone else in the room.
    RoomTaken,
}

impl std::fmt::Display for ServerErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RoomFull => "the room already holds two peers",
            Self::ServerFull => "the rendezvous is at its peer limit",
            Self::BadToken => "the registration token was not accepted",
            Self::RoomTaken => "the nameplate is in use by someone else",
        })
    }
}

/// Why the rendezvous set a request aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BusyReason {
    /// The request's source address or port sent more than its share.
    RateLimited,
    /// The server is under load and serves only sources that proved their
    /// address with a cookie.
    UnderLoad,
}

impl std::fmt::Display for BusyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RateLimited => "rate limited",
            Self::UnderLoad => "under load",
        })
    }
}

/// Datagrams the rendezvous sends to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    Registered {
        client_nonce: u64,
        /// The peer's address as the server saw it in `recv_from`.
        reflexive: SocketAddr,
        peer_token: u64,
        refresh_interval_ms: u32,
        /// Bytes per second the server relays for each peer of a session
        /// when punching fails, counting whole relay requests; 0: it does
        /// not relay. A peer paces its relayed frames under it: the server
        /// drops what goes over, and a drop without a queue looks like
        /// random loss to the sender.
        relay_rate: u32,
    },
    /// Sent to both peers of a room at once, so their punch bursts start
    /// together.
    Introduce {
        session_id: u64,
        your_role: Role,
        other_reflexive: SocketAddr,
        #[serde(deserialize_with = "bounded::<_, MAX_HOST_CANDIDATES, _>")]
        other_host_candidates: Vec<SocketAddr>,
        /// How the other peer's NAT maps, if it said. Only sent to a peer
        /// that said how its own NAT maps: a build from before the field
        /// reads the zero byte of `None` as padding, and nothing else.
        other_nat: Option<NatMapping>,
        /// The other peer's port mapping, if it has one; sent, like
        /// `other_nat`, only to peers that said how their NAT maps.
        other_mapped: Option<SocketAddr>,
        /// The other peer is a new process that took its old registration's
        /// place (`Register::rejoin`): a session with the old one is over.
        /// True only for peers that send a rejoin tag themselves; a build
        /// from before reads the zero byte of `false` as padding.
        other_restarted: bool,
    },
    Error {
        client_nonce: u64,
        kind: ServerErrorKind,
    },
    /// The request was not served: try again after `retry_after_ms`, with
    /// `cookie` if one is given. Always smaller than the Register it
    /// answers, so it amplifies nothing.
    Busy {
        client_nonce: u64,
        reason: BusyReason,
        retry_after_ms: u32,
        cookie: Option<AddressCookie>,
    },
}

impl ClientMessage {
    /// Encodes the message; `Register` is padded to [`REGISTER_PADDED_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        self.check()?;
        let mut out = encode_frame(FrameKind::ToServer, self)?;
        if let Self::Register(_) = self {
            out.resize(out.len().max(REGISTER_PADDED_LEN), 0);
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode_body(expect_kind(bytes, FrameKind::ToServer)?)
    }

    fn check(&self) -> Result<(), WireError> {
        match self {
            Self::Register(register) => {
                register.room.check()?;
                check_len(
                    "host candidate list",
                    register.host_candidates.len(),
                    MAX_HOST_CANDIDATES,
                )
            }
            Self::Leave { room, .. } => room.check(),
        }
    }
}

impl ServerMessage {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        if let Self::Introduce {
            other_host_candidates,
            ..
        } = self
        {
            check_len(
                "host candidate list",
                other_host_candidates.len(),
                MAX_HOST_CANDIDATES,
            )?;
        }
        encode_frame(FrameKind::FromServer, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode_body(expect_kind(bytes, FrameKind::FromServer)?)
    }

    /// The reply to a frame of another protocol version: a bare header with
    /// this build's version and no body. Its layout never changes, so a peer
    /// of any version decodes it as `UnsupportedVersion { got: ours }` and can
    /// say which version the server speaks.
    pub fn version_notice() -> [u8; 2] {
        [FrameKind::FromServer as u8, super::VERSION]
    }
}

/// Deserializes a sequence of at most `MAX` items, refusing longer ones
/// before reading them. A plain `Vec` would reserve room for the claimed
/// length first, letting a short datagram make the decoder allocate for
/// hundreds of addresses.
/// A UTF-8 string of at most `MAX` bytes (checked on decode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BoundedString<const MAX: usize>(
    #[serde(deserialize_with = "bounded_string::<_, MAX>")] pub(crate) String,
);

impl<const MAX: usize> BoundedString<MAX> {
    pub fn new(text: impl Into<String>) -> Result<Self, WireError> {
        let text = text.into();
        check_len("string", text.len(), MAX)?;
        Ok(Self(text))
    }

    /// Cuts `text` to at most `MAX` bytes, at a character boundary.
    pub fn truncated(text: &str) -> Self {
        let mut end = text.len().min(MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self(text[..end].to_owned())
    }
}

impl<const MAX: usize> std::ops::Deref for BoundedString<MAX> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

fn bounded_string<'de, D, const MAX: usize>(deserializer: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    if text.len() > MAX {
        return Err(serde::de::Error::invalid_length(
            text.len(),
            &"a string within the limit",
        ));
    }
    Ok(text)
}

pub(crate) fn bounded<'de, T, const MAX: usize, D>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    struct BoundedVisitor<T, const MAX: usize>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de>
        for BoundedVisitor<T, MAX>
    {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX} items")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let claimed = seq.size_hint().unwrap_or(0);
            if claimed > MAX {
                return Err(serde::de::Error::invalid_length(claimed, &self));
            }
            let mut items = Vec::with_capacity(claimed);
            while let Some(item) = seq.next_element()? {
                if items.len() == MAX {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_seq(BoundedVisitor::<T, MAX>(std::marker::PhantomData))
}

pub(crate) fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::LimitExceeded { field, len, max });
    }
    Ok(())
}

pub(crate) fn encode_frame(
    kind: FrameKind,
    message: &impl Serialize,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(64);
    push_header(&mut out, kind);
    bincode::serde::encode_into_std_write(message, &mut out, codec())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if out.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge(out.len()));
    }
    Ok(out)
}

pub(crate) fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (message, used) = bincode::serde::decode_from_slice(body, codec())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if body[used..].iter().any(|&b| b != 0) {
        return Err(WireError::TrailingGarbage);
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v6(i: u16) -> SocketAddr {
        SocketAddr::new(
            std::net::Ipv6Addr::new(0xffff, i, i, i, i, i, i, 0xffff).into(),
            65535,
        )
    }

    fn register() -> ClientMessage {
        ClientMessage::Register(Register {
            room: RoomCode::new(*b"7-crossword").unwrap(),
            host_candidates: vec!["192.168.1.5:4000".parse().unwrap(), v6(1)],
            client_nonce: 42,
            peer_token: Some(u64::MAX),
            claim: false,
            cookie: Some(AddressCookie([0xff; 16])),
            nat: Some(NatMapping::EndpointDependent {
                sequential_step: Some(i16::MIN),
            }),
            mapped: Some(v6(2)),
            rejoin: Some(RejoinTag([0xee; 16])),
        })
    }

    fn largest_introduce() -> ServerMessage {
        ServerMessage::Introduce {
            session_id: u64::MAX,
            your_role: Role::Controlled,
            other_reflexive: v6(0xffff),
            other_host_candidates: (0..MAX_HOST_CANDIDATES as u16).map(v6).collect(),
            other_nat: Some(NatMapping::EndpointDependent {
                sequential_step: Some(i16::MIN),
            }),
            other_mapped: Some(v6(0xfffe)),
            other_restarted: false,
        }
    }

    fn largest_busy() -> ServerMessage {
        ServerMessage::Busy {
            client_nonce: u64::MAX,
            reason: BusyReason::UnderLoad,
            retry_after_ms: u32::MAX,
            cookie: Some(AddressCookie([0xff; 16])),
        }
    }

    #[test]
    fn client_messages_round_trip() {
        let leave = ClientMessage::Leave {
            room: RoomCode::new(vec![0xff; MAX_ROOM_CODE]).unwrap(),
            peer_token: 1,
        };
        for message in [register(), leave] {
            let bytes = message.encode().unwrap();
            assert_eq!(ClientMessage::decode(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn server_messages_round_trip() {
        let messages = [
            ServerMessage::Registered {
                client_nonce: 9,
                reflexive: "203.0.113.7:61000".parse().unwrap(),
                peer_token: 77,
                refresh_interval_ms: 15_000,
                relay_rate: 1 << 20,
            },
            largest_introduce(),
            ServerMessage::Error {
                client_nonce: 3,
                kind: ServerErrorKind::RoomFull,
            },
            largest_busy(),
        ];
        for message in messages {
            let bytes = message.encode().unwrap();
            assert_eq!(ServerMessage::decode(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn register_is_padded_and_no_reply_is_larger() {
        let register = register().encode().unwrap();
        assert_eq!(register.len(), REGISTER_PADDED_LEN);
        let introduce = largest_introduce().encode().unwrap();
        assert!(
            introduce.len() <= REGISTER_PADDED_LEN,
            "largest Introduce is {} bytes",
            introduce.len()
        );
        let busy = largest_busy().encode().unwrap();
        assert!(busy.len() <= 64, "largest Busy is {} bytes", busy.len());
    }

    #[test]
    fn a_register_without_the_cookie_field_reads_as_no_cookie() {
        // What a build from before cookies sends: the fields up to `claim`,
        // then zero padding.
        let Register {
            room,
            host_candidates,
            client_nonce,
            peer_token,
            claim,
            ..
        } = match register() {
            ClientMessage::Register(register) => register,
            _ => unreachable!(),
        };
        let old = (room, host_candidates, client_nonce, peer_token, claim);
        let mut bytes = vec![FrameKind::ToServer as u8, crate::VERSION, 0];
        bincode::serde::encode_into_std_write(&old, &mut bytes, codec()).unwrap();
        bytes.resize(REGISTER_PADDED_LEN, 0);
        match ClientMessage::decode(&bytes).unwrap() {
            ClientMessage::Register(register) => {
                assert_eq!(
                    (register.cookie, register.nat, register.mapped),
                    (None, None, None)
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_introduce_without_the_other_nat_reads_as_before() {
        // To a peer that did not say how its NAT maps, the server sends
        // `None`: one zero byte, which a build from before the field reads
        // as padding.
        let ServerMessage::Introduce {
            session_id,
            your_role,
            other_reflexive,
            other_host_candidates,
            ..
        } = largest_introduce()
        else {
            unreachable!()
        };
        let old = (
            session_id,
            your_role,
            other_reflexive,
            other_host_candidates.clone(),
        );
        let mut before = vec![FrameKind::FromServer as u8, crate::VERSION, 1];
        bincode::serde::encode_into_std_write(&old, &mut before, codec()).unwrap();
        let now = ServerMessage::Introduce {
            session_id,
            your_role,
            other_reflexive,
            other_host_candidates,
            other_nat: None,
            other_mapped: None,
            other_restarted: false,
        }
        .encode()
        .unwrap();
        assert_eq!(now[..before.len()], before[..]);
        // `other_nat`, `other_mapped` and `other_restarted`: zeros, read as padding.
        assert_eq!(now[before.len()..], [0, 0, 0]);
    }

    #[test]
    fn limits_are_enforced_on_encode_and_decode() {
        assert!(matches!(
            RoomCode::new(vec![0; MAX_ROOM_CODE + 1]),
            Err(WireError::LimitExceeded { .. })
        ));
        let too_many = ClientMessage::Register(Register {
            room: RoomCode::new(*b"r").unwrap(),
            host_candidates: vec!["10.0.0.1:1".parse().unwrap(); MAX_HOST_CANDIDATES + 1],
            client_nonce: 0,
            peer_token: None,
            claim: false,
            cookie: None,
            nat: None,
            mapped: None,
            rejoin: None,
        });
        assert!(matches!(
            too_many.encode(),
            Err(WireError::LimitExceeded { .. })
        ));
        // Forge the same message by hand: the decoder must refuse it too.
        let mut forged = vec![FrameKind::ToServer as u8, crate::VERSION];
        bincode::serde::encode_into_std_write(&too_many, &mut forged, codec()).unwrap();
        assert!(matches!(
            ClientMessage::decode(&forged),
            Err(WireError::Malformed(reason)) if reason.contains("at most 8")
        ));
    }

    #[test]
    fn hostile_length_prefix_is_refused_without_allocating() {
        // Register, room code claiming u64::MAX bytes.
        let mut bytes = vec![FrameKind::ToServer as u8, crate::VERSION, 0];
        bytes.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            ClientMessage::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn padding_must_be_zero() {
        let mut bytes = register().encode().unwrap();
        *bytes.last_mut().unwrap() = 1;
        assert_eq!(
            ClientMessage::decode(&bytes),
            Err(WireError::TrailingGarbage)
        );
    }

    #[test]
    fn version_notice_reads_as_unsupported_version_to_other_versions() {
        let notice = ServerMessage::version_notice();
        assert_eq!(
            crate::split_header(&notice).map(|(kind, body)| (kind, body.len())),
            Ok((FrameKind::FromServer, 0))
        );
        assert!(ServerMessage::decode(&notice).is_err());
    }

    #[test]
    fn wrong_direction_is_refused() {
        let bytes = register().encode().unwrap();
        assert_eq!(
            ServerMessage::decode(&bytes),
            Err(WireError::WrongKind {
                expected: FrameKind::FromServer,
                got: FrameKind::ToServer
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..1400), kind in 0xC0u8..=0xCF) {
            let _ = ClientMessage::decode(&bytes);
            let _ = ServerMessage::decode(&bytes);
            // Again with a valid header, so the body decoder is exercised.
            if bytes.len() >= 2 {
                bytes[0] = kind;
                bytes[1] = crate::VERSION;
                let _ = ClientMessage::decode(&bytes);
                let _ = ServerMessage::decode(&bytes);
            }
        }
    }
}
