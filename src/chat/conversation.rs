//! One conversation with one peer, sans-IO: numbering typed lines, sending
//! again what the peer has not confirmed whenever a session starts,
//! showing each of the peer's lines once, and confirming them.
//!
//! The shell stores what [`Conversation::poll_event`] reports before it
//! sends what [`Conversation::poll_transmit`] gives, so a line is
//! confirmed to its sender only once it is kept here.

use std::collections::VecDeque;

use natter_wire::chat::{ChatMessage, MAX_LINE};
use natter_wire::BoundedString;

/// A line typed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutLine {
    pub seq: u64,
    pub typed_at_ms: u64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// A line of the peer's, new here: keep it, then show it.
    Incoming {
        seq: u64,
        typed_at_ms: u64,
        text: String,
    },
    /// The peer has every line up to `up_to`.
    Delivered { up_to: u64 },
    /// The peer offers files, to be met with `code` (see
    /// [`ChatMessage::FileOffer`]).
    FileOffer { code: String, summary: String },
    /// The peer declined the offer made with `code`.
    FileDeclined { code: String },
}

/// Where the conversation stands, as kept on disk between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The number the next typed line gets.
    pub next_seq: u64,
    /// The last of the peer's lines shown here.
    pub last_in: u64,
    /// Lines typed here that the peer has not confirmed, in order.
    pub unconfirmed: Vec<OutLine>,
}

#[derive(Debug)]
pub struct Conversation {
    next_seq: u64,
    last_in: u64,
    unconfirmed: VecDeque<OutLine>,
    /// A session is up: lines go out as they are typed.
    connected: bool,
    transmits: VecDeque<ChatMessage>,
    events: VecDeque<ChatEvent>,
}

impl Conversation {
    pub fn new(resume: Resume) -> Self {
        Self {
            next_seq: resume.next_seq.max(1),
            last_in: resume.last_in,
            unconfirmed: resume.unconfirmed.into(),
            connected: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Numbers a typed line and sends it if a session is up (else it waits
    /// for one). The text is cut at [`MAX_LINE`] bytes.
    pub fn type_line(&mut self, now_ms: u64, text: &str) -> OutLine {
        let line = OutLine {
            seq: self.next_seq,
            typed_at_ms: now_ms,
            text: BoundedString::<MAX_LINE>::truncated(text).to_string(),
        };
        self.next_seq += 1;
        if self.connected {
            self.transmits.push_back(line_message(&line));
        }
        self.unconfirmed.push_back(line.clone());
        line
    }

    /// A new session: everything unconfirmed goes out again, in order
    /// (the peer drops what it has already shown).
    pub fn connected(&mut self) {
        self.connected = true;
        self.transmits.clear();
        self.transmits
            .extend(self.unconfirmed.iter().map(line_message));
    }

    pub fn disconnected(&mut self) {
        self.connected = false;
        self.transmits.clear();
    }

    /// Offers files to be fetched with `code`; false when no session is up
    /// (an offer is not queued: it is for now).
    pub fn offer_files(&mut self, code: &str, summary: &str) -> bool {
        if self.connected {
            self.transmits.push_back(ChatMessage::FileOffer {
                code: BoundedString::truncated(code),
                summary: BoundedString::truncated(summary),
            });
        }
        self.connected
    }

    pub fn decline_files(&mut self, code: &str) {
        if self.connected {
            self.transmits.push_back(ChatMessage::FileDeclined {
                code: BoundedString::truncated(code),
            });
        }
    }

    pub fn handle(&mut self, message: ChatMessage) {
        match message {
            ChatMessage::FileOffer { code, summary } => {
                self.events.push_back(ChatEvent::FileOffer {
                    code: code.to_string(),
                    summary: summary.to_string(),
                })
            }
            ChatMessage::FileDeclined { code } => self.events.push_back(ChatEvent::FileDeclined {
                code: code.to_string(),
            }),
            ChatMessage::Line {
                seq,
                typed_at_ms,
                text,
            } => {
                if seq > self.last_in {
                    self.last_in = seq;
                    self.events.push_back(ChatEvent::Incoming {
                        seq,
                        typed_at_ms,
                        text: text.to_string(),
                    });
                }
                // Confirmed again also when seen before: the earlier
                // confirmation may have been lost with its session.
                self.transmits.push_back(ChatMessage::Received {
                    up_to: self.last_in,
                });
            }
            ChatMessage::Received { up_to } => {
                let before = self.unconfirmed.len();
                while self.unconfirmed.front().is_some_and(|l| l.seq <= up_to) {
                    self.unconfirmed.pop_front();
                }
                if self.unconfirmed.len() < before {
                    self.events.push_back(ChatEvent::Delivered { up_to });
                }
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<ChatEvent> {
        self.events.pop_front()
    }

    pub fn poll_transmit(&mut self) -> Option<ChatMessage> {
        self.transmits.pop_front()
    }

    /// Lines the peer has not confirmed yet.
    pub fn unconfirmed(&self) -> impl ExactSizeIterator<Item = &OutLine> {
        self.unconfirmed.iter()
    }
}

fn line_message(line: &OutLine) -> ChatMessage {
    ChatMessage::Line {
        seq: line.seq,
        typed_at_ms: line.typed_at_ms,
        text: BoundedString::truncated(&line.text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers everything `from` sends to `to`, as one session would.
    fn pump(from: &mut Conversation, to: &mut Conversation) {
        while let Some(message) = from.poll_transmit() {
            to.handle(message);
        }
    }

    fn shown(conversation: &mut Conversation) -> Vec<String> {
        std::iter::from_fn(|| conversation.poll_event())
            .filter_map(|event| match event {
                ChatEvent::Incoming { text, .. } => Some(text),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn lines_typed_offline_arrive_in_order_once_across_sessions() {
        let mut alice = Conversation::new(Resume::default());
        let mut bob = Conversation::new(Resume::default());
        alice.connected();
        bob.connected();
        alice.type_line(1, "one");
        pump(&mut alice, &mut bob);
        // Bob's confirmation is lost with the session.
        bob.poll_transmit();
        alice.disconnected();
        bob.disconnected();
        alice.type_line(2, "two");
        alice.type_line(3, "three");
        assert_eq!(alice.unconfirmed().len(), 3);
        assert!(alice.poll_transmit().is_none(), "nothing goes out offline");
        // A new session: everything unconfirmed again; "one" is not shown twice.
        alice.connected();
        bob.connected();
        pump(&mut alice, &mut bob);
        assert_eq!(shown(&mut bob), ["one", "two", "three"]);
        pump(&mut bob, &mut alice);
        assert_eq!(alice.unconfirmed().len(), 0);
        let delivered = std::iter::from_fn(|| alice.poll_event()).last();
        assert_eq!(delivered, Some(ChatEvent::Delivered { up_to: 3 }));
    }

    #[test]
    fn a_restarted_process_resumes_numbering_and_its_queue() {
        let resume = Resume {
            next_seq: 5,
            last_in: 9,
            unconfirmed: vec![OutLine {
                seq: 4,
                typed_at_ms: 10,
                text: "queued before the restart".into(),
            }],
        };
        let mut alice = Conversation::new(resume);
        assert_eq!(alice.type_line(11, "new").seq, 5);
        alice.connected();
        let sent: Vec<u64> = std::iter::from_fn(|| alice.poll_transmit())
            .map(|m| match m {
                ChatMessage::Line { seq, .. } => seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent, [4, 5]);
        // The peer's line 9 was shown before the restart: not again.
        alice.handle(ChatMessage::Line {
            seq: 9,
            typed_at_ms: 0,
            text: BoundedString::truncated("old"),
        });
        assert_eq!(alice.poll_event(), None);
        assert_eq!(
            alice.poll_transmit(),
            Some(ChatMessage::Received { up_to: 9 })
        );
    }

    #[test]
    fn a_file_offer_goes_out_only_while_connected_and_is_not_queued() {
        let mut alice = Conversation::new(Resume::default());
        let mut bob = Conversation::new(Resume::default());
        assert!(!alice.offer_files("12-a-b", "x (1 file, 3 B)"));
        alice.connected();
        assert!(
            alice.poll_transmit().is_none(),
            "nothing queued from before"
        );
        assert!(alice.offer_files("12-a-b", "x (1 file, 3 B)"));
        pump(&mut alice, &mut bob);
        assert_eq!(
            bob.poll_event(),
            Some(ChatEvent::FileOffer {
                code: "12-a-b".into(),
                summary: "x (1 file, 3 B)".into()
            })
        );
        bob.connected();
        bob.decline_files("12-a-b");
        pump(&mut bob, &mut alice);
        assert_eq!(
            alice.poll_event(),
            Some(ChatEvent::FileDeclined {
                code: "12-a-b".into()
            })
        );
    }

    #[test]
    fn a_long_line_is_cut_at_the_limit() {
        let mut alice = Conversation::new(Resume::default());
        let line = alice.type_line(0, &"é".repeat(MAX_LINE));
        assert!(line.text.len() <= MAX_LINE);
    }
}
