//! A reliable, ordered message channel over datagrams, as a sans-IO state
//! machine.
//!
//! Messages handed to [`Connection::send`] come out of the peer's
//! [`Connection::poll_event`] exactly once, in order and whole, however the
//! network loses, reorders or duplicates datagrams. The connection owns no
//! socket, no clock and no task: the caller feeds it datagram payloads and the
//! time, and asks it what to send and when to wake it up, in the style of
//! quinn-proto. A driver loop looks like:
//!
//! ```text
//! on datagram:  conn.handle_datagram(now, payload)
//! on timer:     conn.handle_timeout(now)
//! after either: while let Some(ev) = conn.poll_event() { ... }
//!               while let Some(p) = conn.poll_transmit(now) { socket.send(p) }
//!               sleep until conn.poll_timeout()
//! ```
//!
//! Internally the messages form one byte stream (each message behind a
//! varint length), carried in STREAM frames of packets that are numbered once
//! and never reused, like QUIC. The pieces, one per file:
//!
//! - `packet`: the payload codec;
//! - `ack`: range sets, and what the receiver acknowledges when;
//! - `recovery`: RTT estimation, loss detection, probe timeouts;
//! - `congestion`: NewReno with Westwood+'s response to loss;
//! - `pacing`: spreads each window over the round trip;
//! - `send` / `recv`: the send queue and the reassembly and flow control.
//!
//! The wire format and the constants are described in `docs/RELIABLE.md`.

mod ack;
mod congestion;
mod pacing;
mod packet;
mod recovery;
mod recv;
mod send;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ack::{AckTracker, Arrival};
use congestion::Westwood;
use pacing::{Pacer, PacingInput};
use packet::{Frame, StreamEnd};
pub use recovery::LossCounts;
use recovery::{PacketContent, Recovery, SentPacket, Timeout, Verdict};
use recv::{RecvStream, Refusal, INITIAL_CREDIT};
use send::SendStream;

/// Smallest `max_payload` honoured: room for a full ACK frame header and a
/// STREAM frame with some data.
const MIN_PAYLOAD: usize = 64;

/// Largest receive window: stream offsets, which grow by at most a window
/// past what was consumed, must stay varints (below 2^62) for any realistic
/// lifetime.
const MAX_WINDOW: u64 = 1 << 61;

/// Most bytes the MAX_DATA, CLOSE and PING frames of one packet take.
const CONTROL_FRAMES_MAX: usize = 2 * (1 + packet::MAX_VARINT_LEN) + 1;

/// Probe periods a closed connection stays responsive (`drain_period`).
const DRAIN_PTOS: u32 = 3;

/// Probe packets sent when the probe timeout fires (RFC 9002 §6.2.4 allows
/// two; sending two makes one lost probe not cost another timeout).
const PROBES_PER_TIMEOUT: u8 = 2;

/// Settings of one connection. Both sides should use the same values for
/// `max_ack_delay` (each caps the delay the other reports at its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest payload [`Connection::poll_transmit`] produces (raised to 64 if
    /// smaller).
    pub max_payload: usize,
    /// Largest message accepted by [`Connection::send`] or from the peer
    /// (capped at 2^60 bytes).
    pub max_message_size: usize,
    /// Bytes of unacknowledged messages held before `send` refuses more.
    pub send_buffer: usize,
    /// Bytes of received data held for the application before the peer must
    /// stop sending. Raised to at least one largest message plus its length
    /// prefix, or such a message could never be assembled; capped at 2^61
    /// bytes.
    pub receive_window: usize,
    /// Longest an ACK is held back hoping to share a packet.
    pub max_ack_delay: Duration,
    /// RTT assumed before the first sample.
    pub initial_rtt: Duration,
    /// Floor of the probe timeout.
    pub min_pto: Duration,
    /// Send silence after which a PING goes out.
    pub keepalive_interval: Duration,
    /// Receive silence after which the connection is dead.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // Room for the AEAD tag that sealing appends.
            max_payload: natter_wire::DataHeader::max_payload(natter_wire::MAX_DATAGRAM)
                - crate::seal::TAG_LEN,
            max_message_size: 16 * 1024 * 1024,
            send_buffer: 4 * 1024 * 1024,
            receive_window: 16 * 1024 * 1024 + 8,
            max_ack_delay: Duration::from_millis(5),
            initial_rtt: Duration::from_millis(333),
            min_pto: Duration::from_millis(10),
            keepalive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// How the route of a connection's datagrams changed, for
/// [`Connection::migrate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// The same address with another port (a NAT rebinding): most likely
    /// the same path, so its round trip and congestion state are kept.
    PortOnly,
    /// Another address, or into or out of a relay: the path's capacity is
    /// unknown again, and its round trip is `rtt` if a path check measured
    /// it.
    NewPath { rtt: Option<Duration> },
}

/// Names a message sent on this connection; they count up from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// This side called [`Connection::close`] first.
    Local,
    /// The peer closed first.
    Peer,
    /// The peer announced a message longer than `max_message_size`; nothing
    /// after it could be parsed, so the connection was abandoned.
    PeerMessageTooLarge { len: u64, max: u64 },
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("closed by this side"),
            Self::Peer => f.write_str("closed by the other peer"),
            Self::PeerMessageTooLarge { len, max } => write!(
                f,
                "the other peer sent a {len}-byte message, over the {max}-byte limit"
            ),
        }
    }
}

/// Something the application should know, from [`Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's next message.
    Message(Vec<u8>),
    /// This message, and every one before it, reached the peer.
    Acknowledged(MessageId),
    /// The connection closed: both sides' messages were all delivered and
    /// both CLOSE frames acknowledged (or, for a protocol violation, it was
    /// abandoned). Comes after the last `Message`.
    Closed { reason: CloseReason },
    /// Nothing was heard from the peer for `idle_timeout`.
    TimedOut,
}

/// Why [`Connection::send`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The send buffer is full. Retry after an [`Event::Acknowledged`] frees
    /// space; [`Connection::send_buffer_available`] tells how much is free.
    #[error("send buffer full")]
    WouldBlock,
    #[error("connection is closing or closed")]
    Closed,
}

/// Counters and gauges, for tests and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets sent, ACK-only ones included.
    pub packets_sent: u64,
    /// Well-formed, new packets received.
    pub packets_received: u64,
    /// Packets that repeated stream data or a CLOSE frame.
    pub packets_retransmitted: u64,
    /// Packets declared lost, and by which rule; how many were not.
    pub packets_lost: u64,
    pub losses: LossCounts,
    /// Probe timeouts that fired (each sends one or two probes).
    pub probe_timeouts: u64,
    /// Losses that reduced the congestion window (once per recovery
    /// period at most).
    pub congestion_events: u64,
    /// Times the window was held at half to measure the minimum round trip
    /// again (no sample came at or below it for ten seconds).
    pub rtt_drains: u64,
    /// Packets received twice and ignored.
    pub duplicate_packets: u64,
    /// Packets below the acknowledgement floor, ignored.
    pub stale_packets: u64,
    /// Datagrams that failed to decode or broke the protocol, dropped.
    pub malformed_packets: u64,
    /// Packets dropped unacknowledged because reassembly was at its chunk cap.
    pub overloaded_packets: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received, including dropped ones.
    pub bytes_received: u64,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Largest payload a packet may carry now (the route's datagram size
    /// less natter's header and seal).
    pub max_payload: usize,
    /// Bytes of ack-eliciting packets in flight.
    pub bytes_in_flight: u64,
    pub smoothed_rtt: Duration,
    pub min_rtt: Duration,
    /// Bytes of messages held until acknowledged.
    pub send_buffered: u64,
    /// Bytes received and held for the application.
    pub receive_buffered: u64,
    /// Stream offset just past the last stream byte ever sent.
    pub stream_sent: u64,
    /// Stream offset just past the last message the application took.
    pub stream_consumed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// No new messages; flushing, then exchanging CLOSE frames.
    Closing,
    /// Closed was reported; still acknowledging the peer's retransmitted
    /// CLOSE (its ACK may have been lost) until `until`.
    Draining {
        until: Instant,
    },
    /// Nothing more happens.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseFrame {
    /// Never sent: goes out once every message is acknowledged.
    Unsent,
    InFlight,
    /// Lost, or repeated by a probe: to be sent again.
    Lost,
    Acked,
}

/// One end of a reliable channel. See the [module docs](self).
#[derive(Debug)]
pub struct Connection {
    config: Config,
    state: State,
    next_packet_number: u64,
    ack: AckTracker,
    recovery: Recovery,
    congestion: Westwood,
    pacer: Pacer,
    /// Payload bytes per second the route carries at most (a relay's
    /// rate), if it has a limit: the pacer never goes over it.
    route_rate: Option<u64>,
    /// Packets wait for the pacer until then (set by the last
    /// `poll_transmit` that had one to send).
    paced_until: Option<Instant>,
    send: SendStream,
    recv: RecvStream,
    /// The peer lets us send stream bytes below this.
    peer_limit: u64,
    /// Probe packets owed after a probe timeout.
    probes: u8,
    /// A keepalive PING is owed.
    ping: bool,
    close_frame: CloseFrame,
    closed_by_peer: bool,
    /// The stream length the peer's CLOSE announced.
    peer_final: Option<u64>,
    /// When our CLOSE first went out.
    close_sent_at: Option<Instant>,
    events: VecDeque<Event>,
    last_received: Instant,
    last_sent: Instant,
    stats: Stats,
}

impl Connection {
    pub fn new(mut config: Config, now: Instant) -> Self {
        config.max_payload = config.max_payload.max(MIN_PAYLOAD);
        let max_message = (config.max_message_size as u64).min(MAX_WINDOW / 2);
        config.max_message_size = max_message as usize;
        let window = (config.receive_window as u64)
            .clamp(max_message + packet::MAX_VARINT_LEN as u64, MAX_WINDOW)
            .max(INITIAL_CREDIT);
        config.receive_window = window as usize;
        Self {
            state: State::Open,
            next_packet_number: 0,
            ack: AckTracker::new(config.max_ack_delay),
            recovery: Recovery::new(config.initial_rtt, config.max_ack_delay, config.min_pto),
            congestion: Westwood::new(config.max_payload, None),
            pacer: Pacer::new(),
            route_rate: None,
            paced_until: None,
            send: SendStream::new(config.send_buffer),
            recv: RecvStream::new(
                window,
                config.max_message_size as u64,
                config.max_payload as u64,
            ),
            peer_limit: INITIAL_CREDIT,
            probes: 0,
            ping: false,
            close_frame: CloseFrame::Unsent,
            closed_by_peer: false,
            peer_final: None,
            close_sent_at: None,
            events: VecDeque::new(),
            last_received: now,
            last_sent: now,
            stats: Stats::default(),
            config,
        }
    }

    /// The datagrams now go by another route, whose largest payload is
    /// `max_payload`. What was in flight on the old route is sent again on
    /// the new one at once instead of after its loss timers, so a move
    /// stalls for about one round trip of the new route.
    pub fn migrate(&mut self, migration: Migration, max_payload: usize) {
        let new_path = matches!(migration, Migration::NewPath { .. });
        for packet in self.recovery.abandon_in_flight(new_path) {
            self.requeue(&packet.content);
        }
        let rtt = match migration {
            Migration::NewPath { rtt } => rtt,
            Migration::PortOnly => None,
        };
        if let Some(rtt) = rtt {
            self.recovery.seed_rtt(rtt);
        }
        self.config.max_payload = max_payload.max(MIN_PAYLOAD);
        if new_path {
            self.congestion = Westwood::new(self.config.max_payload, rtt);
            self.pacer = Pacer::new();
        }
    }

    /// The path's round trip as measured before the channel had a sample of
    /// its own (the punch's probe, the handshake): the first sample. Without
    /// it the first probe timeout is the second that the 333 ms initial
    /// guess gives: at 10 % loss through the NAT lab, 8 of 28 transfers
    /// lost the first flight's ACK and stalled for that second.
    /// Before the first packet, it also sizes the first window.
    pub fn seed_rtt(&mut self, rtt: Duration) {
        self.recovery.seed_rtt(rtt);
        if self.stats.packets_sent == 0 {
            self.congestion = Westwood::new(self.config.max_payload, Some(rtt));
        }
    }

    /// The route's datagrams can now carry `max_payload` (its MTU was
    /// found, or it fell back): new packets use it, packets in flight keep
    /// their size.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.config.max_payload = max_payload.max(MIN_PAYLOAD);
    }

    /// The route carries at most `rate` payload bytes per second (a relay
    /// that drops what goes over), or has no such limit: the pacer keeps
    /// under it, on any round trip. Without it the window took the relay's
    /// drops for random loss, with no queue to show, and offered it twice
    /// what it passed.
    pub fn set_route_rate(&mut self, rate: Option<u64>) {
        self.route_rate = rate;
    }

    /// Whether the ACK owed shows a packet that arrived out of order. The
    /// peer finds its losses by such ACKs, so a shell reading a batch of
    /// datagrams should send before it reads more: at 10 % loss through
    /// the NAT lab, one ACK per 38 packets (a receive round's worth) let
    /// whole windows go unacknowledged into probe timeouts (30 ms then).
    pub fn owes_an_ack_with_a_hole(&self) -> bool {
        self.ack.shows_a_hole()
    }

    /// The smallest number the next packet may have: one past the last one
    /// sent. A driver without a sealer numbers its packets with it.
    pub fn next_packet_number(&self) -> u64 {
        self.next_packet_number
    }

    /// The smoothed round trip.
    pub fn smoothed_rtt(&self) -> Duration {
        self.recovery.rtt().smoothed()
    }

    /// Probe timeouts since the last acknowledgement: more than one means
    /// nothing gets through.
    pub fn probe_timeouts_in_a_row(&self) -> u32 {
        self.recovery.pto_count()
    }

    /// The configuration in force (after the adjustments [`Config`] notes).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Queues a message.
    pub fn send(&mut self, message: Vec<u8>) -> Result<MessageId, SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if message.len() > self.config.max_message_size {
            return Err(SendError::TooLarge {
                len: message.len(),
                max: self.config.max_message_size,
            });
        }
        self.send.push(message).map_err(|_| SendError::WouldBlock)
    }

    /// Bytes [`send`](Self::send) accepts right now (a message also takes a
    /// 1 to 8 byte length prefix).
    pub fn send_buffer_available(&self) -> u64 {
        (self.config.send_buffer as u64).saturating_sub(self.send.buffered())
    }

    /// Starts a graceful close: messages already sent are still delivered,
    /// then CLOSE frames are exchanged and both sides report
    /// [`Event::Closed`].
    pub fn close(&mut self) {
        if self.state == State::Open {
            self.state = State::Closing;
        }
    }

    /// Whether nothing is in flight or owed: only the keepalive and idle
    /// timers remain.
    pub fn is_idle(&self) -> bool {
        !self.recovery.has_in_flight()
            && self.recovery.timer().is_none()
            && self.ack.timer().is_none()
            && self.send.is_flushed()
            && !self.ack.is_pending()
            && !self.recv.limit_pending()
            && !self.recv.has_ready()
            && self.probes == 0
            && !self.ping
    }

    /// Whether packets await acknowledgement: the peer owes an answer.
    pub fn has_in_flight(&self) -> bool {
        self.recovery.has_in_flight()
    }

    /// Whether the connection has closed, gracefully or not.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Draining { .. } | State::Finished)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            cwnd: self.congestion.window(),
            max_payload: self.config.max_payload,
            bytes_in_flight: self.recovery.bytes_in_flight(),
            smoothed_rtt: self.recovery.rtt().smoothed(),
            min_rtt: self.recovery.rtt().min(),
            losses: self.recovery.losses(),
            rtt_drains: self.congestion.drains(),
            send_buffered: self.send.buffered(),
            receive_buffered: self.recv.buffered(),
            stream_sent: self.send.unsent(),
            stream_consumed: self.recv.consumed(),
            ..self.stats.clone()
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(message) = self.recv.pop() {
            if let Err(too_large) = self.recv.parse() {
                self.abandon(CloseReason::PeerMessageTooLarge {
                    len: too_large.len,
                    max: too_large.max,
                });
            }
            return Some(Event::Message(message));
        }
        // Taking messages may have let parsing finish the peer's stream.
        self.check_close_complete(self.last_received);
        self.events.pop_front()
    }

    /// Processes one datagram payload from the peer, packet `number` (the
    /// sequence number of the sealed frame it came in). Anything malformed,
    /// duplicate or stale is counted and dropped.
    pub fn handle_datagram(&mut self, now: Instant, number: u64, payload: &[u8]) {
        if self.state == State::Finished {
            return;
        }
        self.stats.bytes_received += payload.len() as u64;
        // ACK frames carry numbers as varints: a larger one could never be
        // acknowledged.
        let decoded = packet::decode(payload)
            .ok()
            .filter(|_| number <= packet::MAX_VARINT);
        let Some(frames) = decoded else {
            self.stats.malformed_packets += 1;
            return;
        };
        match self.ack.classify(number) {
            Arrival::New => {}
            Arrival::Duplicate => {
                self.stats.duplicate_packets += 1;
                return;
            }
            Arrival::Stale => {
                self.stats.stale_packets += 1;
                return;
            }
        }
        match self.vet(&frames) {
            Ok(()) => {}
            Err(Refusal::Violation) => {
                self.stats.malformed_packets += 1;
                return;
            }
            Err(Refusal::Overloaded) => {
                self.stats.overloaded_packets += 1;
                return;
            }
        }
        self.stats.packets_received += 1;
        self.last_received = now;
        let ack_eliciting = frames.iter().any(Frame::is_ack_eliciting);
        let has_close = frames.iter().any(|f| matches!(f, Frame::Close { .. }));
        self.ack.on_packet(number, ack_eliciting, has_close, now);
        if matches!(self.state, State::Draining { .. }) {
            return;
        }
        for frame in frames {
            self.apply(now, frame);
            if self.state == State::Finished {
                return;
            }
        }
        self.check_close_complete(now);
    }

    /// Checks a packet against the connection state before any of it is
    /// applied, so a refused packet changes nothing.
    fn vet(&self, frames: &[Frame<'_>]) -> Result<(), Refusal> {
        let mut final_offset = self.peer_final;
        for frame in frames {
            if let Frame::Close { final_offset: f } = frame {
                let conflicting = final_offset.is_some_and(|known| known != *f);
                if conflicting || *f < self.recv.received_end() || *f > self.recv.limit() {
                    return Err(Refusal::Violation);
                }
                final_offset = Some(*f);
            }
        }
        for frame in frames {
            match frame {
                Frame::Ack(ack) if ack.largest() >= self.next_packet_number => {
                    return Err(Refusal::Violation);
                }
                Frame::Stream { offset, data } => {
                    self.recv.check(*offset, data.len() as u64, final_offset)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn apply(&mut self, now: Instant, frame: Frame<'_>) {
        match frame {
            Frame::Ping => {}
            Frame::Ack(ack) => {
                let in_flight_before = self.recovery.bytes_in_flight();
                let verdict = self.recovery.on_ack(now, &ack);
                self.on_verdict(now, verdict, in_flight_before);
            }
            Frame::Stream { offset, data } => {
                if let Err(too_large) = self.recv.insert(offset, data) {
                    self.abandon(CloseReason::PeerMessageTooLarge {
                        len: too_large.len,
                        max: too_large.max,
                    });
                }
            }
            Frame::MaxData(limit) => self.peer_limit = self.peer_limit.max(limit),
            Frame::Close { final_offset } => {
                self.peer_final = Some(final_offset);
                if self.state == State::Open {
                    self.state = State::Closing;
                    self.closed_by_peer = true;
                }
            }
        }
    }

    fn on_verdict(&mut self, now: Instant, verdict: Verdict, in_flight_before: u64) {
        // The window grows only if the sender was using most of it.
        let window_limited = in_flight_before * 2 >= self.congestion.window();
        let mut released = Vec::new();
        for packet in &verdict.acked {
            for range in &packet.content.stream {
                self.send.on_acked(range.clone(), &mut released);
            }
            if packet.content.close {
                self.close_frame = CloseFrame::Acked;
            }
            if let Some(largest) = packet.content.ack_largest {
                self.ack.forget_through(largest);
            }
            self.congestion
                .on_packet_acked(packet.time_sent, packet.size, window_limited);
        }
        if !verdict.acked.is_empty() {
            self.congestion.on_ack(now, self.recovery.rtt());
        }
        if let Some(largest) = verdict.ack_only_largest {
            self.ack.forget_through(largest);
        }
        self.events
            .extend(released.into_iter().map(Event::Acknowledged));
        self.on_lost(now, &verdict);
    }

    fn on_lost(&mut self, now: Instant, verdict: &Verdict) {
        for packet in &verdict.lost {
            self.stats.packets_lost += 1;
            self.requeue(&packet.content);
        }
        if let Some(latest) = verdict.lost.iter().map(|p| p.time_sent).max() {
            if self.congestion.on_congestion_event(
                now,
                latest,
                verdict.lost.len() as u64,
                self.recovery.rtt(),
            ) {
                self.stats.congestion_events += 1;
            }
        }
        if verdict.persistent_congestion {
            self.congestion.on_persistent_congestion();
        }
    }

    /// Schedules a packet's content to be sent again.
    fn requeue(&mut self, content: &PacketContent) {
        for range in &content.stream {
            self.send.on_lost(range.clone());
        }
        if content.max_data {
            self.recv.set_limit_pending(true);
        }
        if content.close && self.close_frame == CloseFrame::InFlight {
            self.close_frame = CloseFrame::Lost;
        }
    }

    /// Gives up on the connection without a handshake.
    fn abandon(&mut self, reason: CloseReason) {
        self.state = State::Finished;
        self.events.push_back(Event::Closed { reason });
    }

    /// Reports Closed once our CLOSE is acknowledged and the peer's stream is
    /// complete; then lingers to acknowledge the peer's CLOSE again if our
    /// ACK of it was lost. The peer retransmits until its idle timeout, which
    /// runs from when it last heard from us (no later than `now`), so
    /// lingering that long covers every retransmission.
    fn check_close_complete(&mut self, now: Instant) {
        let complete = self.state == State::Closing
            && self.close_frame == CloseFrame::Acked
            && self.peer_final.is_some_and(|f| self.recv.is_complete(f));
        if complete {
            let reason = if self.closed_by_peer {
                CloseReason::Peer
            } else {
                CloseReason::Local
            };
            self.events.push_back(Event::Closed { reason });
            self.state = State::Draining {
                until: now.checked_add(self.config.idle_timeout).unwrap_or(now),
            };
        }
    }

    /// Runs whatever timers are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Finished => return,
            State::Draining { until } => {
                if now >= until {
                    self.state = State::Finished;
                }
                return;
            }
            State::Open | State::Closing => {}
        }
        if self.idle_deadline().is_some_and(|t| now >= t) {
            self.state = State::Finished;
            self.events.push_back(Event::TimedOut);
            return;
        }
        if self.recovery.timer().is_some_and(|t| t <= now) {
            match self.recovery.on_timeout(now) {
                Some(Timeout::Lost(verdict)) => self.on_lost(now, &verdict),
                Some(Timeout::Probe) => {
                    // What a stall looks like, for `RUST_LOG=natter=debug`.
                    tracing::debug!(
                        in_flight = self.recovery.bytes_in_flight(),
                        cwnd = self.congestion.window(),
                        since_sent = ?now.saturating_duration_since(self.last_sent),
                        since_received = ?now.saturating_duration_since(self.last_received),
                        send_buffered = self.send.buffered(),
                        peer_limit = self.peer_limit,
                        "probe timeout"
                    );
                    self.stats.probe_timeouts += 1;
                    self.arm_probes();
                }
                None => {}
            }
        }
        if !self.ping && self.keepalive_deadline().is_some_and(|t| now >= t) {
            self.ping = true;
        }
    }

    /// A probe carries new data if there is any; otherwise it repeats the
    /// oldest packets in flight, which are the likeliest to be lost (the tail
    /// loss probe), or failing that is a bare PING.
    fn arm_probes(&mut self) {
        self.probes = PROBES_PER_TIMEOUT;
        if self.send.next_offset(self.peer_limit).is_some() {
            return;
        }
        let oldest: Vec<PacketContent> = self
            .recovery
            .in_flight()
            .filter(|p| !p.content.stream.is_empty() || p.content.close || p.content.max_data)
            .take(PROBES_PER_TIMEOUT.into())
            .map(|p| p.content.clone())
            .collect();
        for content in &oldest {
            self.requeue(content);
        }
    }

    /// When the connection dies of silence (never, for an idle timeout too
    /// large to add to an `Instant`).
    fn idle_deadline(&self) -> Option<Instant> {
        self.last_received.checked_add(self.config.idle_timeout)
    }

    fn keepalive_deadline(&self) -> Option<Instant> {
        self.last_sent.checked_add(self.config.keepalive_interval)
    }

    /// After a graceful close, how long the side that reported Closed should
    /// still be driven (QUIC's three probe periods): long enough to
    /// acknowledge the peer's CLOSE again if our acknowledgement was lost, so
    /// the peer does not wait out its idle timeout. `None` unless closing
    /// gracefully completed.
    pub fn drain_period(&self) -> Option<Duration> {
        matches!(self.state, State::Draining { .. }).then(|| self.pto_period() * DRAIN_PTOS)
    }

    /// While closing, if everything is settled but the acknowledgement of our
    /// CLOSE (every message of ours acknowledged, the peer's CLOSE and all its
    /// data received): when our CLOSE first went out. The peer has closed
    /// too; if it already left, that acknowledgement will never come, and a
    /// shell that does not want to wait for the idle timeout may stop after a
    /// grace period of its choosing. The connection itself keeps waiting, so
    /// a peer that is still there always gets our CLOSE.
    pub fn close_unconfirmed_since(&self) -> Option<Instant> {
        let settled = self.state == State::Closing
            && self.close_frame != CloseFrame::Acked
            && self.send.is_flushed()
            && self.peer_final.is_some_and(|f| self.recv.is_complete(f));
        settled.then_some(self.close_sent_at).flatten()
    }

    /// The probe period: the unit of the shell's waits around closing.
    pub fn pto_period(&self) -> Duration {
        self.recovery.pto_period()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Finished => None,
            State::Draining { until } => Some(self.ack.timer().map_or(until, |t| t.min(until))),
            State::Open | State::Closing => {
                let keepalive = self.keepalive_deadline().filter(|_| !self.ping);
                [
                    self.ack.timer(),
                    self.recovery.timer(),
                    self.paced_until,
                    keepalive,
                    self.idle_deadline(),
                ]
                .into_iter()
                .flatten()
                .min()
            }
        }
    }

    /// The next datagram payload to send, if any, as packet `number`: the
    /// sequence number of the sealed frame that will carry it, above every
    /// number used before. Call until it returns None.
    pub fn poll_transmit(&mut self, now: Instant, number: u64) -> Option<Vec<u8>> {
        debug_assert!(
            number >= self.next_packet_number,
            "packet numbers only grow"
        );
        let sending_data = match self.state {
            State::Finished => return None,
            State::Draining { .. } => false,
            State::Open | State::Closing => true,
        };
        let max_payload = self.config.max_payload;
        let probe = self.probes > 0;
        // Probes ignore the congestion window (RFC 9002 §7.5).
        let size_limit = if probe {
            max_payload
        } else {
            self.window_allowance()
        };
        let mut may_elicit = sending_data && size_limit > 0 && self.has_ack_eliciting_work();
        self.paced_until = None;
        if may_elicit && !probe {
            self.paced_until = self
                .pacer
                .release_time(now, size_limit as u64, self.pacing_input());
            may_elicit = self.paced_until.is_none();
        }
        if !may_elicit && !self.ack.is_due(now) {
            return None;
        }

        let mut out = Vec::with_capacity(max_payload);
        let mut content = PacketContent::default();
        if self.ack.is_due(now) || self.ack.has_news() {
            let room = max_payload - out.len();
            content.ack_largest = self.ack.write(&mut out, now, room);
        }
        let mut ack_eliciting = false;
        let mut retransmission = false;
        if may_elicit {
            let control_fits = |out: &Vec<u8>| out.len() + 1 + packet::MAX_VARINT_LEN <= size_limit;
            if self.recv.limit_pending() && control_fits(&out) {
                packet::write_max_data(&mut out, self.recv.limit());
                self.recv.set_limit_pending(false);
                content.max_data = true;
                ack_eliciting = true;
            }
            if self.close_sendable() && control_fits(&out) {
                packet::write_close(&mut out, self.send.end());
                retransmission = self.close_frame == CloseFrame::Lost;
                self.close_frame = CloseFrame::InFlight;
                self.close_sent_at.get_or_insert(now);
                content.close = true;
                ack_eliciting = true;
            }
            while let Some((range, repeated, end)) = self.write_stream(&mut out, size_limit) {
                retransmission |= repeated;
                content.stream.push(range);
                ack_eliciting = true;
                if end == StreamEnd::Packet {
                    break;
                }
            }
            if !ack_eliciting && (self.ping || probe) && out.len() < size_limit {
                packet::write_ping(&mut out);
                ack_eliciting = true;
            }
        }
        if ack_eliciting {
            self.ping = false;
            self.probes = self.probes.saturating_sub(1);
        } else if content.ack_largest.is_none() {
            // Nothing was owed after all (an ACK with nothing left to report).
            return None;
        }

        self.next_packet_number = number + 1;
        self.last_sent = now;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += out.len() as u64;
        if retransmission {
            self.stats.packets_retransmitted += 1;
        }
        if ack_eliciting {
            self.pacer.on_sent(out.len() as u64);
            self.recovery.on_ack_eliciting_sent(SentPacket {
                number,
                time_sent: now,
                size: out.len() as u64,
                content,
            });
        } else if let Some(largest) = content.ack_largest {
            self.recovery.on_ack_only_sent(number, now, largest);
        }
        Some(out)
    }

    /// The largest ack-eliciting packet the congestion window lets out now,
    /// or 0. A bulk sender waits for room for a full packet, so the window
    /// fills with full packets; a smaller packet may use what is left if
    /// everything pending fits in it, so a trickle of small messages is not
    /// held back for room it does not need.
    fn window_allowance(&self) -> usize {
        let max_payload = self.config.max_payload;
        let room = self
            .congestion
            .window()
            .saturating_sub(self.recovery.bytes_in_flight());
        if room >= max_payload as u64 {
            return max_payload;
        }
        let ack = if self.ack.has_news() || self.ack.is_pending() {
            self.ack.frame_size_bound()
        } else {
            0
        };
        let pending =
            (CONTROL_FRAMES_MAX + ack) as u64 + self.send.pending_size_bound(self.peer_limit);
        if pending <= room {
            room as usize
        } else {
            0
        }
    }

    fn pacing_input(&self) -> PacingInput {
        PacingInput {
            window: self.congestion.window(),
            smoothed_rtt: self.recovery.rtt().smoothed(),
            min_rtt: self.recovery.rtt().min(),
            max_datagram: self.config.max_payload as u64,
            bandwidth: self.congestion.bandwidth(),
            route_rate: self.route_rate.map(|rate| rate as f64),
        }
    }

    fn has_ack_eliciting_work(&self) -> bool {
        self.recv.limit_pending()
            || self.close_sendable()
            || self.send.next_offset(self.peer_limit).is_some()
            || self.ping
            || self.probes > 0
    }

    /// Our CLOSE goes out once every message is acknowledged.
    fn close_sendable(&self) -> bool {
        self.state == State::Closing
            && matches!(self.close_frame, CloseFrame::Unsent | CloseFrame::Lost)
            && self.send.is_flushed()
    }

    /// Adds one STREAM frame with as many bytes as fit. Returns the range
    /// written, whether it was a retransmission and where the frame ends,
    /// or None if no bytes are sendable or none fit. A frame that fills the
    /// packet, or after which nothing is left to send, leaves its length
    /// out: it ends the packet.
    fn write_stream(
        &mut self,
        out: &mut Vec<u8>,
        size_limit: usize,
    ) -> Option<(std::ops::Range<u64>, bool, StreamEnd)> {
        let offset = self.send.next_offset(self.peer_limit)?;
        let room = size_limit.checked_sub(out.len())?;
        let header = packet::stream_header_len(offset, StreamEnd::Packet);
        let max_len = room.checked_sub(header).filter(|&len| len > 0)? as u64;
        let (range, retransmission) = self.send.take_chunk(offset, max_len, self.peer_limit);
        let len = range.end - range.start;
        let with_length = StreamEnd::Length(len);
        let fits_with_length =
            packet::stream_header_len(offset, with_length) as u64 + len <= room as u64;
        let end = if fits_with_length && self.send.next_offset(self.peer_limit).is_some() {
            with_length
        } else {
            StreamEnd::Packet
        };
        packet::write_stream_header(out, offset, end);
        self.send.write(&range, out);
        Some((range, retransmission, end))
    }
}

#[cfg(test)]
mod tests;
