//! The link to the other peer, as one state machine over one socket: meet at
//! the rendezvous, punch, then carry the reliable channel on the punched path.
//!
//! Everything a peer sends and receives goes through [`Link`], so one UDP
//! socket (one NAT mapping) serves the rendezvous, the probes and the data.
//! Like the pieces it combines it is sans-IO: the driver passes datagrams
//! and the time in, and sends what [`Link::poll_transmit`] returns.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::{split_header, DataHeader, FrameKind, PunchMessage, Role, RoomCode};

use crate::error::ConnectError;
use crate::punch::{CandidateKind, Path, PunchConfig, PunchEvent, Puncher};
use crate::reliable::{self, Connection, MessageId, SendError};
use crate::rendezvous_client::{RendezvousClient, RendezvousConfig, RendezvousEvent};

#[derive(Debug, Clone, Default)]
pub struct LinkConfig {
    pub rendezvous: RendezvousConfig,
    pub punch: PunchConfig,
    pub channel: reliable::Config,
}

/// What the link reports, in the order it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Registered {
        reflexive: SocketAddr,
    },
    Introduced {
        role: Role,
        candidates: Vec<(SocketAddr, CandidateKind)>,
    },
    Connected {
        path: Path,
        /// From the start of the link to the nominated path.
        elapsed: Duration,
    },
    Message(Vec<u8>),
    Acknowledged(MessageId),
    /// The channel closed: gracefully, or because the peer went silent.
    Closed {
        reason: String,
    },
    Failed(ConnectError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Datagrams the link ignored, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Not natter, or not decodable.
    pub malformed: u64,
    /// Data for another session, or from an address that is not the path.
    pub foreign: u64,
    /// Data before the path was up.
    pub early: u64,
}

pub struct Link {
    config: LinkConfig,
    started: Instant,
    rendezvous: RendezvousClient,
    puncher: Option<Puncher>,
    /// The channel and where it runs, once punching succeeded.
    session: Option<(Connection, Path)>,
    next_counter: u64,
    seed: u64,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
    done: bool,
}

impl Link {
    /// Starts registering in `room` at `server`. `seed` feeds nonces; pass a
    /// random one outside tests.
    pub fn new(
        now: Instant,
        config: LinkConfig,
        server: SocketAddr,
        room: RoomCode,
        host_candidates: Vec<SocketAddr>,
        seed: u64,
    ) -> Self {
        let rendezvous = RendezvousClient::new(
            now,
            config.rendezvous.clone(),
            server,
            room,
            host_candidates,
            seed,
        );
        Self {
            config,
            started: now,
            rendezvous,
            puncher: None,
            session: None,
            next_counter: 0,
            seed,
            events: VecDeque::new(),
            stats: LinkStats::default(),
            done: false,
        }
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    pub fn path(&self) -> Option<Path> {
        self.session.as_ref().map(|(_, path)| *path)
    }

    pub fn channel(&self) -> Option<&Connection> {
        self.session.as_ref().map(|(channel, _)| channel)
    }

    /// True once the link failed or its channel closed: nothing more happens.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Queues a message on the channel; fails before the path is up.
    pub fn send(&mut self, message: Vec<u8>) -> Result<MessageId, SendError> {
        match &mut self.session {
            Some((channel, _)) => channel.send(message),
            None => Err(SendError::Closed),
        }
    }

    /// Closes the channel gracefully (what was sent is delivered first), or
    /// leaves the rendezvous when no path is up yet.
    pub fn close(&mut self) {
        match &mut self.session {
            Some((channel, _)) => channel.close(),
            None => {
                self.rendezvous.leave();
                self.finish(LinkEvent::Closed {
                    reason: "closed before a path was found".into(),
                });
            }
        }
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from == self.rendezvous.server() {
            self.rendezvous.handle_datagram(now, bytes);
            self.pump(now);
            return;
        }
        match split_header(bytes) {
            Ok((FrameKind::Punch, _)) => match (PunchMessage::decode(bytes), &mut self.puncher) {
                (Ok(message), Some(puncher)) => puncher.handle_message(now, from, message),
                (Ok(_), None) => self.stats.early += 1,
                (Err(_), _) => self.stats.malformed += 1,
            },
            Ok((FrameKind::Data, _)) => self.handle_data(now, from, bytes),
            _ => self.stats.malformed += 1,
        }
        self.pump(now);
    }

    fn handle_data(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok((header, payload)) = DataHeader::parse(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let Some(puncher) = &mut self.puncher else {
            self.stats.early += 1;
            return;
        };
        if header.session_id != puncher.session_id() {
            self.stats.foreign += 1;
            return;
        }
        if self.session.is_none() {
            // The controlled side switches to the path as soon as it is
            // nominated; its first data proves the nomination arrived even
            // if its acknowledgement did not.
            puncher.handle_data_from(from);
            self.pump(now);
        }
        match &mut self.session {
            Some((channel, path)) if path.remote == from => channel.handle_datagram(now, payload),
            Some(_) => self.stats.foreign += 1,
            None => self.stats.early += 1,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.rendezvous.handle_timeout(now);
        if let Some(puncher) = &mut self.puncher {
            puncher.handle_timeout(now);
        }
        if let Some((channel, _)) = &mut self.session {
            channel.handle_timeout(now);
        }
        self.pump(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.rendezvous.poll_timeout(),
            self.puncher.as_ref().and_then(Puncher::poll_timeout),
            self.session.as_ref().and_then(|(c, _)| c.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(bytes) = self.rendezvous.poll_transmit() {
            return Some(Transmit {
                to: self.rendezvous.server(),
                bytes,
            });
        }
        if let Some((to, message)) = self.puncher.as_mut().and_then(Puncher::poll_transmit) {
            let bytes = message.encode().expect("punch messages are small");
            return Some(Transmit { to, bytes });
        }
        let session_id = self.puncher.as_ref()?.session_id();
        let (channel, path) = self.session.as_mut()?;
        let payload = channel.poll_transmit(now)?;
        let mut bytes = Vec::with_capacity(natter_wire::DATA_HEADER_LEN + payload.len());
        DataHeader {
            session_id,
            counter: self.next_counter,
        }
        .write(&mut bytes);
        self.next_counter += 1;
        bytes.extend_from_slice(&payload);
        Some(Transmit {
            to: path.remote,
            bytes,
        })
    }

    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        let (channel, _) = self.session.as_mut()?;
        let event = match channel.poll_event()? {
            reliable::Event::Message(message) => LinkEvent::Message(message),
            reliable::Event::Acknowledged(id) => LinkEvent::Acknowledged(id),
            reliable::Event::Closed { reason } => {
                self.done = true;
                LinkEvent::Closed {
                    reason: reason.to_string(),
                }
            }
            reliable::Event::TimedOut => {
                self.done = true;
                LinkEvent::Closed {
                    reason: format!(
                        "the other peer went silent for {} s",
                        self.config.channel.idle_timeout.as_secs()
                    ),
                }
            }
        };
        Some(event)
    }

    /// Moves events from the rendezvous client and the puncher forward.
    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.rendezvous.poll_event() {
            match event {
                RendezvousEvent::Registered { reflexive } => {
                    self.events.push_back(LinkEvent::Registered { reflexive })
                }
                RendezvousEvent::Introduced {
                    session_id,
                    role,
                    reflexive,
                    host_candidates,
                } => self.start_punching(now, session_id, role, reflexive, host_candidates),
                RendezvousEvent::Failed(error) => self.finish(LinkEvent::Failed(error)),
            }
        }
        while let Some(event) = self.puncher.as_mut().and_then(Puncher::poll_event) {
            match event {
                PunchEvent::Connected(path) => {
                    self.rendezvous.leave();
                    self.session = Some((Connection::new(self.config.channel.clone(), now), path));
                    self.events.push_back(LinkEvent::Connected {
                        path,
                        elapsed: now - self.started,
                    });
                }
                PunchEvent::Failed(reports) => {
                    self.rendezvous.leave();
                    self.finish(LinkEvent::Failed(ConnectError::PunchFailed(reports)));
                }
            }
        }
    }

    fn start_punching(
        &mut self,
        now: Instant,
        session_id: u64,
        role: Role,
        reflexive: SocketAddr,
        host_candidates: Vec<SocketAddr>,
    ) {
        if self.session.is_some() {
            return;
        }
        let candidates: Vec<_> = host_candidates
            .into_iter()
            .filter(|&addr| addr != reflexive)
            .map(|addr| (addr, CandidateKind::Host))
            .chain([(reflexive, CandidateKind::Reflexive)])
            .collect();
        self.events.push_back(LinkEvent::Introduced {
            role,
            candidates: candidates.clone(),
        });
        self.puncher = Some(Puncher::new(
            now,
            self.config.punch.clone(),
            session_id,
            role,
            candidates,
            self.seed ^ session_id,
        ));
    }

    fn finish(&mut self, event: LinkEvent) {
        if !self.done {
            self.done = true;
            self.events.push_back(event);
        }
    }
}
