//! The task behind a session: it owns the socket, the timer and the link,
//! takes commands from the handles and hands them what arrives. Each round
//! reads what is waiting, then sends a bounded amount, so ACKs are never
//! stuck behind a window of sends.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::extra_sockets::{ExtraSockets, Received};
use super::port_mapping::PortMapping;
use super::Progress;
use crate::birthday::{LocalSocket, SocketRequest};
use crate::candidates::host_candidates;
use crate::error::{CloseReason, ConnectError};
use crate::link::{Link, LinkEvent, Transmit};
use crate::punch::Path;
use crate::reliable::{MessageId, SendError, Stats as ChannelStats};
use crate::seal::DataCipher;
use crate::udp::{Sent, Socket};

/// Messages delivered but not yet read by the application. Past this the
/// driver stops taking messages from the channel, whose receive window then
/// holds the sender back.
const INCOMING_QUEUE: usize = 64;
/// How often the host's own addresses are looked at again: a peer whose
/// address changed (a new network, an interface down and up) tells the
/// rendezvous within this, and through it the other peer.
const REGATHER_INTERVAL: Duration = Duration::from_secs(3);

/// What a handle asks of the driver.
pub(super) enum Command {
    Send {
        message: Vec<u8>,
        acked: Option<oneshot::Sender<()>>,
    },
    Close,
    /// The reliable channel's counters, once the session is secured.
    Stats(oneshot::Sender<Option<ChannelStats>>),
}

/// What the driver hands the receiving half.
pub(super) enum Delivery {
    Message(Vec<u8>),
    Closed(CloseReason),
}

/// Starts the driver of `link` on `socket`: returns the sender of commands,
/// the receiver of deliveries, where the outcome of connecting arrives, and
/// the task.
pub(super) fn spawn(
    socket: Socket,
    local: SocketAddr,
    link: Link,
    port_mapping: Option<PortMapping>,
    progress: Option<mpsc::UnboundedSender<Progress>>,
) -> (
    mpsc::Sender<Command>,
    mpsc::Receiver<Delivery>,
    oneshot::Receiver<ConnectOutcome>,
    JoinHandle<io::Result<()>>,
) {
    let (commands, command_rx) = mpsc::channel(16);
    let (incoming_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
    let (connected_tx, connected) = oneshot::channel();
    let driver = Driver {
        socket,
        local,
        port_mapping,
        commands: command_rx,
        incoming: incoming_tx,
        state: DriverState {
            link,
            progress,
            connected: Some(connected_tx),
            acks: HashMap::new(),
        },
    };
    (commands, incoming, connected, tokio::spawn(driver.run()))
}

/// The task behind a [`Session`](super::Session): the socket, the channels to the handles,
/// and the link.
struct Driver {
    socket: Socket,
    /// The socket's address, for gathering host candidates again.
    local: SocketAddr,
    /// The socket's port mapping at the gateway, if one is being asked for.
    port_mapping: Option<PortMapping>,
    commands: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<Delivery>,
    state: DriverState,
}

/// The path, the time it took, the other peer's proven key and the data
/// cipher; or why not.
pub(super) type ConnectOutcome = Result<(Path, Duration, [u8; 32], DataCipher), ConnectError>;

struct DriverState {
    link: Link,
    progress: Option<mpsc::UnboundedSender<Progress>>,
    connected: Option<oneshot::Sender<ConnectOutcome>>,
    acks: HashMap<MessageId, oneshot::Sender<()>>,
}

impl Driver {
    async fn run(self) -> io::Result<()> {
        let Driver {
            mut socket,
            local,
            mut port_mapping,
            mut commands,
            incoming,
            mut state,
        } = self;
        let mut regather = tokio::time::interval(REGATHER_INTERVAL);
        regather.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A message the application has no room for yet, and a send the
        // channel had no room for yet: both hold their queue back.
        let mut undelivered: Option<Vec<u8>> = None;
        let mut unsent: Option<(Vec<u8>, Option<oneshot::Sender<()>>)> = None;
        let mut commands_open = true;
        let mut extras = ExtraSockets::new();
        loop {
            // Each round reads what is waiting before it sends a bounded
            // amount: ACKs then open the window promptly instead of piling
            // up (and overflowing) in the socket behind a whole window of
            // sends.
            // A batch that leaves an ACK showing a hole ends the read: the
            // peer's loss detection waits for that ACK.
            socket.receive(|from, datagram| {
                state
                    .link
                    .handle_datagram(Instant::now().into_std(), from, datagram);
                state.link.owes_an_ack_with_a_hole()
            });
            // After the read, whose ACKs may have made room for it.
            if let Some((message, acked)) = unsent.take() {
                unsent = state.try_send(message, acked);
            }
            // Events before sending: taking messages frees flow-control
            // credit, which the send then advertises.
            if undelivered.is_none() {
                if let Some(reason) = state.handle_events(&incoming, &mut undelivered) {
                    // Last words (a Leave, a Reject) go out before the
                    // application hears of the end: a process that exits at
                    // once must not swallow them.
                    socket
                        .send_all(|| next_main_transmit(&mut state.link, &extras))
                        .await;
                    state.report_failure(&reason);
                    let _ = incoming.send(Delivery::Closed(reason)).await;
                    if let Some(mapping) = port_mapping {
                        mapping.release().await;
                    }
                    return Ok(());
                }
            }
            while let Some(request) = state.link.poll_socket_request() {
                match request {
                    SocketRequest::Open { count, toward } => {
                        let opened = extras.open(count, toward, local);
                        state.link.sockets_opened(Instant::now().into_std(), opened);
                    }
                    SocketRequest::Close { keep } => extras.close(keep),
                }
            }
            let sent = socket.send(|| next_main_transmit(&mut state.link, &extras));
            let timeout = state.link.poll_timeout().map(Instant::from_std);
            tokio::select! {
                // The next round reads.
                ready = socket.readable() => ready?,
                mapped = changed(&mut port_mapping) => {
                    tracing::debug!(?mapped, "port mapping changed");
                    state.link.set_port_mapping(Instant::now().into_std(), mapped);
                }
                Received { index, from, bytes } = extras.recv(), if extras.any_open() => {
                    state.link.handle_extra_datagram(Instant::now().into_std(), index, from, &bytes);
                }
                ready = socket.writable(), if sent == Sent::Blocked => ready?,
                // More to send: go round again, but let other tasks run
                // once this one has used its share.
                () = tokio::task::coop::consume_budget(), if sent == Sent::More => {}
                _ = sleep_until(timeout) => state.link.handle_timeout(Instant::now().into_std()),
                _ = regather.tick() => {
                    let hosts = host_candidates(local);
                    state.link.set_host_candidates(Instant::now().into_std(), hosts);
                }
                command = commands.recv(), if unsent.is_none() && commands_open => match command {
                    Some(Command::Send { message, acked }) => unsent = state.try_send(message, acked),
                    Some(Command::Close) => state.link.close(),
                    Some(Command::Stats(reply)) => {
                        let _ = reply.send(state.link.channel_stats());
                    }
                    None => {
                        // Every handle was dropped: close gracefully.
                        commands_open = false;
                        state.link.close();
                    }
                },
                permit = incoming.reserve(), if undelivered.is_some() => match permit {
                    Ok(permit) => permit.send(Delivery::Message(undelivered.take().expect("checked"))),
                    Err(_) => undelivered = None,
                },
            }
        }
    }
}

impl DriverState {
    fn try_send(
        &mut self,
        message: Vec<u8>,
        acked: Option<oneshot::Sender<()>>,
    ) -> Option<(Vec<u8>, Option<oneshot::Sender<()>>)> {
        match self.link.send(message.clone()) {
            Ok(id) => {
                if let Some(acked) = acked {
                    self.acks.insert(id, acked);
                }
                None
            }
            Err(SendError::WouldBlock) => Some((message, acked)),
            // Closing: the caller learns from the dropped ack or the
            // session's close reason. Sizes are checked by the sender.
            Err(error) => {
                tracing::debug!(%error, "message not sent");
                None
            }
        }
    }

    /// Handles link events until one cannot be delivered yet; returns how
    /// the link ended when it is done.
    fn handle_events(
        &mut self,
        incoming: &mpsc::Sender<Delivery>,
        undelivered: &mut Option<Vec<u8>>,
    ) -> Option<CloseReason> {
        while let Some(event) = self.link.poll_event() {
            match event {
                LinkEvent::Registered { reflexive } => {
                    self.report(Progress::Registered { reflexive })
                }
                LinkEvent::Introduced { candidates, .. } => {
                    self.report(Progress::Introduced { candidates })
                }
                LinkEvent::Relaying { reports } => self.report(Progress::Relaying { reports }),
                LinkEvent::PortPrediction(event) => self.report(Progress::PortPrediction(event)),
                LinkEvent::PathChanged { path, reason } => {
                    self.report(Progress::PathChanged { path, reason })
                }
                LinkEvent::Connected {
                    path,
                    elapsed,
                    remote_key,
                    cipher,
                } => {
                    if let Some(connected) = self.connected.take() {
                        let _ = connected.send(Ok((path, elapsed, remote_key, cipher)));
                    }
                }
                LinkEvent::Message(message) => {
                    // Otherwise delivered, or the application stopped listening.
                    if let Err(mpsc::error::TrySendError::Full(Delivery::Message(message))) =
                        incoming.try_send(Delivery::Message(message))
                    {
                        *undelivered = Some(message);
                        return None;
                    }
                }
                LinkEvent::Acknowledged(id) => {
                    if let Some(acked) = self.acks.remove(&id) {
                        let _ = acked.send(());
                    }
                }
                LinkEvent::Closed { reason } => return Some(reason),
                LinkEvent::Failed(error) => return Some(CloseReason::Failed(error)),
            }
        }
        None
    }

    /// Tells a caller still waiting in `connect` why it failed.
    fn report_failure(&mut self, reason: &CloseReason) {
        if let CloseReason::Failed(error) = reason {
            if let Some(connected) = self.connected.take() {
                let _ = connected.send(Err(error.clone()));
            }
        }
    }

    fn report(&self, progress: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(progress);
        }
    }
}

/// The next change of the port mapping; never, without one.
async fn changed(port_mapping: &mut Option<PortMapping>) -> Option<SocketAddr> {
    match port_mapping {
        Some(mapping) => mapping.changed().await,
        None => std::future::pending().await,
    }
}

/// The link's next transmit for the main socket; those for extra sockets
/// are sent on the way.
fn next_main_transmit(link: &mut Link, extras: &ExtraSockets) -> Option<Transmit> {
    loop {
        let transmit = link.poll_transmit(Instant::now().into_std())?;
        match transmit.via {
            LocalSocket::Main => return Some(transmit),
            LocalSocket::Extra(index) => {
                extras.send(index, transmit.to, &transmit.bytes, transmit.ttl)
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
