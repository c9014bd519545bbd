//! `natter chat`: a terminal UI when stdin and stdout are terminals
//! (`chat_screen`), else the line mode below, for scripts and tests. Both
//! speak the same chat protocol: numbered lines, confirmed by the peer,
//! kept (with the history, unless `--no-history`) in SQLite.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use natter::chat::{ChatEvent, ChatStore, Conversation, OutLine, FILE_NAME};
use natter::identity::{config_dir, PublicKey};
use natter::session::{Received, Session, SessionSender};
use natter::wire::chat::ChatMessage;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::report::Reporter;

#[derive(Clone, Copy)]
pub struct Options {
    /// Keep every line in the history database.
    pub history: bool,
}

/// How long leaving waits for the peer to confirm lines still on their way.
const LEAVE_WAIT: Duration = Duration::from_secs(3);

/// The conversation with one peer, kept on disk as it goes.
pub struct Talk {
    conversation: Conversation,
    store: ChatStore,
    peer: PublicKey,
}

/// What a message from the peer means for the screen.
pub enum Shown {
    Event(ChatEvent),
    /// It did not decode: said once, then ignored.
    Unreadable(String),
}

impl Talk {
    pub fn open(peer: PublicKey, options: Options) -> Result<Self> {
        let store = ChatStore::open(&config_dir()?.join(FILE_NAME), options.history)?;
        let conversation = Conversation::new(store.resume(&peer)?);
        Ok(Self {
            conversation,
            store,
            peer,
        })
    }

    pub fn peer(&self) -> PublicKey {
        self.peer
    }

    /// Numbers and keeps a typed line; it goes out with the next flush.
    pub fn type_line(&mut self, text: &str) -> Result<OutLine> {
        let line = self.conversation.type_line(now_ms(), text);
        self.store.typed(&self.peer, &line)?;
        Ok(line)
    }

    /// A session is up: what the peer has not confirmed goes out again.
    pub fn connected(&mut self) {
        self.conversation.connected();
    }

    pub fn disconnected(&mut self) {
        self.conversation.disconnected();
    }

    /// A message from the peer; what it shows, kept on disk first.
    pub fn handle(&mut self, bytes: &[u8]) -> Result<Vec<Shown>> {
        let message = match ChatMessage::decode(bytes) {
            Ok(message) => message,
            Err(error) => return Ok(vec![Shown::Unreadable(error.to_string())]),
        };
        self.conversation.handle(message);
        let mut shown = Vec::new();
        while let Some(event) = self.conversation.poll_event() {
            match &event {
                ChatEvent::Incoming {
                    seq,
                    typed_at_ms,
                    text,
                } => self
                    .store
                    .received(&self.peer, *seq, *typed_at_ms, text, now_ms())?,
                ChatEvent::Delivered { up_to } => {
                    self.store.delivered(&self.peer, *up_to, now_ms())?
                }
                ChatEvent::FileOffer { .. } | ChatEvent::FileDeclined { .. } => {}
            }
            shown.push(Shown::Event(event));
        }
        Ok(shown)
    }

    /// Sends what the conversation has to send.
    pub async fn flush(&mut self, sender: &SessionSender) -> Result<(), natter::Error> {
        while let Some(message) = self.conversation.poll_transmit() {
            let bytes = message
                .encode()
                .expect("chat messages are built within the limits");
            sender.send(&bytes).await?;
        }
        Ok(())
    }

    pub fn offer_files(&mut self, code: &str, summary: &str) -> bool {
        self.conversation.offer_files(code, summary)
    }

    pub fn decline_files(&mut self, code: &str) {
        self.conversation.decline_files(code)
    }

    pub fn unconfirmed(&self) -> impl ExactSizeIterator<Item = &OutLine> {
        self.conversation.unconfirmed()
    }

    /// What to tell the user on leaving with lines unconfirmed.
    pub fn leaving_report(&self, peer_name: &str) -> Option<String> {
        let waiting = self.unconfirmed().len();
        (waiting > 0).then(|| {
            format!(
                "{waiting} line(s) to {peer_name} not confirmed yet; they stay queued and go out the next time you chat with {peer_name}"
            )
        })
    }
}

/// Line mode: your lines are sent as you type them; the other side's
/// appear with a timestamp. Ctrl-D or `/quit` closes the chat for both.
pub async fn line_mode(session: Session, reporter: Reporter, options: Options) -> Result<()> {
    eprintln!("natter: type a line and press Enter to send; Ctrl-D or /quit to leave");
    let mut talk = Talk::open(session.path().remote_key, options)?;
    let (sender, mut receiver) = session.split();
    talk.connected();
    talk.flush(&sender).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // Set when the user is done: leave once the peer has confirmed
    // everything, or at this time.
    let mut leave_by: Option<Instant> = None;
    let mut closing = false;
    loop {
        if let Some(deadline) = leave_by {
            if !closing && (talk.unconfirmed().len() == 0 || Instant::now() >= deadline) {
                closing = true;
                sender.close().await;
            }
        }
        let deadline = leave_by.unwrap_or_else(|| Instant::now() + LEAVE_WAIT);
        tokio::select! {
            line = lines.next_line(), if leave_by.is_none() => match line? {
                Some(line) if line.trim() != "/quit" => {
                    talk.type_line(&line)?;
                    talk.flush(&sender).await?;
                }
                _ => leave_by = Some(Instant::now() + LEAVE_WAIT),
            },
            received = receiver.recv() => match received {
                Ok(Received::Data(bytes)) => {
                    for shown in talk.handle(&bytes)? {
                        match shown {
                            Shown::Event(ChatEvent::Incoming { text, .. }) => {
                                println!("[{}] peer: {text}", clock(now_ms()));
                            }
                            Shown::Event(ChatEvent::FileOffer { summary, .. }) => eprintln!(
                                "natter: the peer offers {summary}; files can be taken in the terminal chat (/accept)"
                            ),
                            Shown::Event(_) => {}
                            Shown::Unreadable(why) => eprintln!("natter: the peer sent a message this natter cannot read ({why})"),
                        }
                    }
                    // A session that ended meanwhile shows below.
                    let _ = talk.flush(&sender).await;
                }
                Ok(Received::End) => eprintln!("natter: the other peer stopped typing"),
                Err(natter::Error::Closed(reason)) => {
                    reporter.closed(&reason);
                    if let Some(report) = talk.leaving_report("the peer") {
                        reporter.hint(&report);
                    }
                    return Ok(());
                }
                Err(other) => return Err(other.into()),
            },
            _ = tokio::time::sleep_until(deadline.into()), if leave_by.is_some() && !closing => {}
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The time of day in UTC, `HH:MM:SS`.
pub fn clock(ms: u64) -> String {
    let seconds = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60
    )
}
