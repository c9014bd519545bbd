//! The two halves of a session: messages, or tokio byte streams.
//!
//! Messages on the session end with a one-byte tag so a byte stream can end
//! while the other direction goes on (a half-close, as TCP's FIN): data then
//! `0`, or `1` alone for "no more data from me". (At the end, not the start,
//! so removing it never moves the data.)
//!
//! Besides message-wise `send`/`recv`, the halves are tokio `AsyncWrite` and
//! `AsyncRead` byte streams: shutting the writer down sends the end of the
//! stream and completes once the peer has everything; the reader reports
//! end-of-file at the peer's end of stream.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use super::driver::{Command, Delivery};
use super::{Error, Received};
use crate::error::CloseReason;
use crate::reliable::Stats as ChannelStats;

const TAG_DATA: u8 = 0;
const TAG_END: u8 = 1;
/// Largest message one `poll_write` makes of a byte stream.
const WRITE_CHUNK: usize = 64 * 1024;

/// The sending half of a [`Session`](super::Session).
pub struct SessionSender {
    commands: PollSender<Command>,
    max_message: usize,
    /// Set once `poll_shutdown` sent the end of the stream.
    finishing: Option<oneshot::Receiver<()>>,
}

impl Clone for SessionSender {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            max_message: self.max_message,
            finishing: None,
        }
    }
}

impl SessionSender {
    pub(super) fn new(commands: mpsc::Sender<Command>, max_message: usize) -> Self {
        Self {
            commands: PollSender::new(commands),
            max_message,
            finishing: None,
        }
    }

    /// Queues `data` as one message; waits while the channel's send buffer
    /// is full.
    pub async fn send(&self, data: &[u8]) -> Result<(), Error> {
        if data.len() + 1 > self.max_message {
            return Err(Error::TooLarge {
                len: data.len(),
                max: self.max_message - 1,
            });
        }
        self.command(Command::Send {
            message: tagged(data, TAG_DATA),
            acked: None,
        })
        .await
    }

    /// Tells the other peer no more data follows, and waits until it has
    /// received everything sent before.
    pub async fn finish(&self) -> Result<(), Error> {
        let (acked, done) = oneshot::channel();
        self.command(Command::Send {
            message: vec![TAG_END],
            acked: Some(acked),
        })
        .await?;
        done.await
            .map_err(|_| Error::Closed(CloseReason::EndedBeforeConfirmed))
    }

    /// The reliable channel's counters (losses, probes, window, RTT): for
    /// measurements and diagnosis. `None` once the session has ended.
    pub async fn stats(&self) -> Option<ChannelStats> {
        let (reply, stats) = oneshot::channel();
        self.command(Command::Stats(reply)).await.ok()?;
        stats.await.ok().flatten()
    }

    /// Asks for a graceful close; the receiving half reports when it is done.
    pub async fn close(&self) {
        let _ = self.command(Command::Close).await;
    }

    async fn command(&self, command: Command) -> Result<(), Error> {
        let closed = || Error::Closed(CloseReason::Ended);
        let commands = self.commands.get_ref().ok_or_else(closed)?;
        commands.send(command).await.map_err(|_| closed())
    }

    fn reserve(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.commands
            .poll_reserve(cx)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))
    }
}

fn tagged(data: &[u8], tag: u8) -> Vec<u8> {
    let mut message = Vec::with_capacity(data.len() + 1);
    message.extend_from_slice(data);
    message.push(tag);
    message
}

impl AsyncWrite for SessionSender {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.reserve(cx))?;
        let len = buf.len().min(WRITE_CHUNK);
        let message = tagged(&buf[..len], TAG_DATA);
        this.commands
            .send_item(Command::Send {
                message,
                acked: None,
            })
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))?;
        Poll::Ready(Ok(len))
    }

    /// Messages are handed to the session in order as they are written;
    /// there is nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends the end of the stream and completes once the peer has received
    /// everything written.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.finishing.is_none() {
            ready!(this.reserve(cx))?;
            let (acked, done) = oneshot::channel();
            this.commands
                .send_item(Command::Send {
                    message: vec![TAG_END],
                    acked: Some(acked),
                })
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session ended"))?;
            this.finishing = Some(done);
        }
        let done = this.finishing.as_mut().expect("set above");
        Pin::new(done).poll(cx).map(|acked| {
            acked.map_err(|_| {
                let reason = CloseReason::EndedBeforeConfirmed;
                io::Error::new(io::ErrorKind::BrokenPipe, reason.to_string())
            })
        })
    }
}

/// The receiving half of a [`Session`](super::Session). Use either `recv` or the
/// `AsyncRead` stream, not both.
pub struct SessionReceiver {
    incoming: mpsc::Receiver<Delivery>,
    task: Option<JoinHandle<io::Result<()>>>,
    closed: Option<CloseReason>,
    /// Data of the current message not yet read through `AsyncRead`.
    unread: Vec<u8>,
    read_offset: usize,
    ended: bool,
}

/// One delivery, told apart by its tag.
enum Incoming {
    Received(Received),
    Closed(CloseReason),
}

fn classify(delivery: Option<Delivery>) -> Incoming {
    match delivery {
        Some(Delivery::Message(mut message)) => match message.pop() {
            Some(TAG_DATA) => Incoming::Received(Received::Data(message)),
            Some(TAG_END) if message.is_empty() => Incoming::Received(Received::End),
            _ => Incoming::Closed(CloseReason::UnknownMessage),
        },
        Some(Delivery::Closed(reason)) => Incoming::Closed(reason),
        None => Incoming::Closed(CloseReason::Ended),
    }
}

impl SessionReceiver {
    pub(super) fn new(
        incoming: mpsc::Receiver<Delivery>,
        task: JoinHandle<io::Result<()>>,
    ) -> Self {
        Self {
            incoming,
            task: Some(task),
            closed: None,
            unread: Vec::new(),
            read_offset: 0,
            ended: false,
        }
    }

    /// The next thing the other peer sent. After the session closed, every
    /// call returns `Error::Closed` with the reason.
    pub async fn recv(&mut self) -> Result<Received, Error> {
        if let Some(reason) = &self.closed {
            return Err(Error::Closed(reason.clone()));
        }
        let reason = match classify(self.incoming.recv().await) {
            Incoming::Received(received) => return Ok(received),
            Incoming::Closed(reason) => reason,
        };
        if let Some(task) = self.task.take() {
            task.await.map_err(io::Error::other)??;
        }
        self.closed = Some(reason.clone());
        Err(Error::Closed(reason))
    }

    /// Reads (and drops) until the session has closed; returns why.
    pub async fn closed(mut self) -> Result<CloseReason, Error> {
        loop {
            match self.recv().await {
                Ok(_) => continue,
                Err(Error::Closed(reason)) => return Ok(reason),
                Err(other) => return Err(other),
            }
        }
    }
}

impl AsyncRead for SessionReceiver {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_offset < this.unread.len() {
                let len = buf.remaining().min(this.unread.len() - this.read_offset);
                buf.put_slice(&this.unread[this.read_offset..this.read_offset + len]);
                this.read_offset += len;
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = &this.closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    reason.to_string(),
                )));
            }
            match classify(ready!(this.incoming.poll_recv(cx))) {
                Incoming::Received(Received::Data(data)) => {
                    this.unread = data;
                    this.read_offset = 0;
                }
                Incoming::Received(Received::End) => this.ended = true,
                Incoming::Closed(reason) => this.closed = Some(reason),
            }
        }
    }
}
