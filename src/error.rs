//! Why connecting to the other peer failed, in words a user can act on.

use std::net::SocketAddr;
use std::time::Duration;

use natter_wire::{BusyReason, ServerErrorKind};

use crate::handshake::{HandshakeError, HANDSHAKE_TIMEOUT};
use crate::punch::CandidateReport;
use crate::reliable;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("rendezvous {server} did not answer within {} s: is the address right, the server running and UDP allowed?", waited.as_secs_f32())]
    RendezvousUnreachable {
        server: SocketAddr,
        waited: Duration,
    },
    #[error("rendezvous {server} is busy ({reason}); retried for {} s", retried_for.as_secs())]
    RendezvousBusy {
        server: SocketAddr,
        reason: BusyReason,
        retried_for: Duration,
    },
    #[error("rendezvous {server} stopped answering ({} s of silence)", silent_for.as_secs())]
    RendezvousLost {
        server: SocketAddr,
        silent_for: Duration,
    },
    #[error("rendezvous refused: {0}")]
    Refused(ServerErrorKind),
    #[error("protocol version mismatch: this natter speaks version {ours}, the other side version {theirs}; upgrade the older one")]
    VersionMismatch { ours: u8, theirs: u8 },
    #[error("nobody else joined the room within {} s", waited.as_secs())]
    NoPeer { waited: Duration },
    #[error("punching failed: no direct path to the other peer, and {no_relay}{}{}", report_lines(.reports), prediction_line(.prediction))]
    PunchFailed {
        reports: Vec<CandidateReport>,
        no_relay: NoRelay,
        /// What port prediction spent, if the pair tried it.
        prediction: Option<PredictionSpent>,
    },
    #[error("no direct path to the other peer, and it did not answer through the rendezvous's relay within {} s (it may have declined relaying with --no-relay)", HANDSHAKE_TIMEOUT.as_secs())]
    RelayUnanswered,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

impl ConnectError {
    /// A short stable name for `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RendezvousUnreachable { .. } => "rendezvous_unreachable",
            Self::RendezvousLost { .. } => "rendezvous_lost",
            Self::RendezvousBusy { .. } => "rendezvous_busy",
            Self::Refused(ServerErrorKind::RoomFull) => "room_full",
            Self::Refused(ServerErrorKind::ServerFull) => "server_full",
            Self::Refused(ServerErrorKind::BadToken) => "bad_token",
            Self::Refused(ServerErrorKind::RoomTaken) => "room_taken",
            Self::VersionMismatch { .. } => "version_mismatch",
            Self::NoPeer { .. } => "no_peer",
            Self::PunchFailed { .. } => "punch_failed",
            Self::RelayUnanswered => "relay_unanswered",
            Self::Handshake(HandshakeError::WrongCode) => "wrong_code",
            Self::Handshake(HandshakeError::KeyChanged { .. }) => "key_changed",
            Self::Handshake(_) => "handshake_failed",
        }
    }
}

/// Why a session ended, or a call on it found it ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("closed by this side")]
    Local,
    #[error("closed by the other peer")]
    Peer,
    #[error("the other peer sent a {len}-byte message, over the {max}-byte limit")]
    PeerMessageTooLarge { len: u64, max: u64 },
    #[error("the other peer sent a message natter does not know")]
    UnknownMessage,
    #[error("the other peer went silent for {} s", after.as_secs())]
    PeerSilent { after: Duration },
    /// The rendezvous says the other peer is a new process of the same
    /// peer (it was killed or crashed, and started again).
    #[error("the other peer started again")]
    PeerRestarted,
    /// Everything was delivered, but the acknowledgement of this side's
    /// CLOSE never came: the other peer most likely closed and left.
    #[error("closed; the other peer left before confirming")]
    Unconfirmed,
    #[error("closed before a path was found")]
    BeforeConnected,
    #[error("the session ended before the peer confirmed")]
    EndedBeforeConfirmed,
    #[error("the session ended")]
    Ended,
    #[error(transparent)]
    Failed(#[from] ConnectError),
}

impl CloseReason {
    /// A short stable name for `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::PeerMessageTooLarge { .. } => "peer_message_too_large",
            Self::UnknownMessage => "unknown_message",
            Self::PeerSilent { .. } => "peer_silent",
            Self::PeerRestarted => "peer_restarted",
            Self::Unconfirmed => "unconfirmed",
            Self::BeforeConnected => "before_connected",
            Self::EndedBeforeConfirmed => "ended_before_confirmed",
            Self::Ended => "ended",
            Self::Failed(error) => error.kind(),
        }
    }
}

impl From<reliable::CloseReason> for CloseReason {
    fn from(reason: reliable::CloseReason) -> Self {
        match reason {
            reliable::CloseReason::Local => Self::Local,
            reliable::CloseReason::Peer => Self::Peer,
            reliable::CloseReason::PeerMessageTooLarge { len, max } => {
                Self::PeerMessageTooLarge { len, max }
            }
        }
    }
}

/// Why a pair without a direct path did not fall back to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoRelay {
    #[error("the rendezvous does not relay (it runs with --relay-rate 0)")]
    ServerOff,
    #[error("relaying is off on this side (--no-relay)")]
    Declined,
}

/// Port prediction's counters when punching failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PredictionSpent {
    pub probes_sent: u32,
    pub sockets_opened: u16,
}

fn prediction_line(prediction: &Option<PredictionSpent>) -> String {
    prediction.map_or(String::new(), |p| {
        format!(
            "\n  port prediction: {} probes sent, {} extra sockets opened (all closed)",
            p.probes_sent, p.sockets_opened
        )
    })
}

fn report_lines(reports: &[CandidateReport]) -> String {
    if reports.is_empty() {
        return " (the other peer advertised no candidates)".into();
    }
    reports.iter().map(|r| format!("\n  {r}")).collect()
}
