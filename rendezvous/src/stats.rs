//! Counters for the periodic stats line and for tests that account for every
//! datagram: `datagrams_in == accepted + refused + dropped`.

use std::fmt;

/// Why a datagram was dropped without being served (it may still get a
/// version notice or a `Busy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over the rate of its source address and port.
    RateLimited,
    /// Over the rate of its address (IPv6: /64), all ports together.
    AddressRateLimited,
    /// Came while the server was under load, without a valid cookie.
    UnderLoad,
    UnknownProtocol,
    StunMalformed,
    StunNotBindingRequest,
    /// A STUN CHANGE-REQUEST for an address or port the server lacks.
    StunCannotChange,
    UnsupportedVersion,
    WrongKind,
    Malformed,
    Unpadded,
    BadToken,
    /// A relay request to a server started with relaying off.
    RelayOff,
    /// A relay request naming no session in progress.
    RelayUnknownSession,
    /// A relay request before the other peer has asked for relaying (and
    /// so shown that it receives at its address).
    RelayPeerNotReady,
    /// A relay request over the session's byte rate.
    RelayRateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 16] = [
        Self::RateLimited,
        Self::AddressRateLimited,
        Self::UnderLoad,
        Self::UnknownProtocol,
        Self::StunMalformed,
        Self::StunNotBindingRequest,
        Self::StunCannotChange,
        Self::UnsupportedVersion,
        Self::WrongKind,
        Self::Malformed,
        Self::Unpadded,
        Self::BadToken,
        Self::RelayOff,
        Self::RelayUnknownSession,
        Self::RelayPeerNotReady,
        Self::RelayRateLimited,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::AddressRateLimited => "address_rate_limited",
            Self::UnderLoad => "under_load",
            Self::UnknownProtocol => "unknown_protocol",
            Self::StunMalformed => "stun_malformed",
            Self::StunNotBindingRequest => "stun_not_binding_request",
            Self::StunCannotChange => "stun_cannot_change",
            Self::UnsupportedVersion => "unsupported_version",
            Self::WrongKind => "wrong_kind",
            Self::Malformed => "malformed",
            Self::Unpadded => "unpadded",
            Self::BadToken => "bad_token",
            Self::RelayOff => "relay_off",
            Self::RelayUnknownSession => "relay_unknown_session",
            Self::RelayPeerNotReady => "relay_peer_not_ready",
            Self::RelayRateLimited => "relay_rate_limited",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Datagrams that did what they asked (registered, refreshed, left, STUN).
    pub accepted: u64,
    /// Datagrams answered with an error (room full, server full, bad token).
    pub refused: u64,
    drops: [u64; DropReason::ALL.len()],
    pub registrations: u64,
    pub introductions: u64,
    pub stun_responses: u64,
    pub expired: u64,
    /// Frames relayed between peers, and their bytes as received.
    pub relayed: u64,
    pub relayed_bytes: u64,
    /// `Busy` answers to dropped Registers (rate limited or under load).
    pub busy_replies: u64,
}

impl Stats {
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "in={} out={} bytes_in={} bytes_out={} accepted={} refused={} registrations={} introductions={} stun={} expired={} relayed={} relayed_bytes={} busy={} dropped={}",
            self.datagrams_in,
            self.datagrams_out,
            self.bytes_in,
            self.bytes_out,
            self.accepted,
            self.refused,
            self.registrations,
            self.introductions,
            self.stun_responses,
            self.expired,
            self.relayed,
            self.relayed_bytes,
            self.busy_replies,
            self.dropped_total(),
        )?;
        for reason in DropReason::ALL {
            let count = self.dropped(reason);
            if count > 0 {
                write!(f, " drop_{}={count}", reason.name())?;
            }
        }
        Ok(())
    }
}
