//! The receiving side's protocol, sans-IO: it checks an offer, then every
//! message the sender sends against it (order, sizes, hashes), and tells
//! its shell what to do with the bytes. It never touches a file.

use std::collections::HashSet;

use natter_wire::transfer::{AbortKind, Control, Offer, OfferEntry, ResumePoint};

use super::names::{check_link_target, RelativePath};
use super::Refusal;

/// An offer that passed every check: what will be written, and where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// In the order the sender sends them; a file's index is its place here.
    pub files: Vec<PlannedFile>,
    pub directories: Vec<RelativePath>,
    pub links: Vec<PlannedLink>,
}

#[derive(Debug, Clone)]
pub struct PlannedFile {
    pub path: RelativePath,
    pub size: u64,
    pub blake3: blake3::Hash,
}

#[derive(Debug, Clone)]
pub struct PlannedLink {
    pub path: RelativePath,
    pub target: String,
}

impl Plan {
    /// Checks every name in `offer`; refuses the whole offer at the first
    /// bad one.
    pub fn check(offer: &Offer) -> Result<Self, Refusal> {
        let mut plan = Plan {
            files: Vec::new(),
            directories: Vec::new(),
            links: Vec::new(),
        };
        let mut seen = HashSet::new();
        for entry in &offer.entries {
            let path = RelativePath::parse(entry.path())?;
            if !seen.insert(path.clone()) {
                return Err(Refusal::new(
                    AbortKind::Protocol,
                    format!("the offer names {path} twice"),
                ));
            }
            match entry {
                OfferEntry::File { size, blake3, .. } => plan.files.push(PlannedFile {
                    path,
                    size: *size,
                    blake3: blake3::Hash::from_bytes(*blake3),
                }),
                OfferEntry::Directory { .. } => plan.directories.push(path),
                OfferEntry::Symlink { target, .. } => {
                    check_link_target(&path, target)?;
                    plan.links.push(PlannedLink {
                        path,
                        target: target.to_string(),
                    });
                }
            }
        }
        if u32::try_from(plan.files.len()).is_err() {
            return Err(Refusal::new(AbortKind::Protocol, "too many files"));
        }
        Ok(plan)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
    }
}

/// What the shell does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Open file `index`'s partial copy keeping its first `offset` bytes
    /// (none: start it empty). `complete`: those bytes are the whole file,
    /// verified; put it in place.
    Open {
        index: usize,
        offset: u64,
        complete: bool,
    },
    /// Every file is in place; make the links.
    Finished,
    /// The sender stopped, for this reason.
    SenderAborted { kind: AbortKind, message: String },
}

/// Receiving an accepted offer.
pub struct Incoming {
    files: Vec<PlannedFile>,
    /// What the receiver told the sender it has of each file, and the hash
    /// state after those bytes.
    resume: Vec<Option<(u64, blake3::Hasher)>>,
    state: State,
    /// Bytes of completed files and of the current one, resumed included.
    bytes_done: u64,
}

enum State {
    /// The next `FileStart` must name file `next`.
    Between {
        next: usize,
    },
    Receiving {
        index: usize,
        written: u64,
        /// Boxed: the hash state is large (about 2 KB) and the other
        /// states small.
        hasher: Box<blake3::Hasher>,
    },
    Finished,
}

impl Incoming {
    pub fn new(plan: &Plan) -> Self {
        Self {
            files: plan.files.clone(),
            resume: vec![None; plan.files.len()],
            state: State::Between { next: 0 },
            bytes_done: 0,
        }
    }

    /// Records that the first `offset` bytes of file `index` are already
    /// here, `hasher` having read them; returns what to tell the sender.
    pub fn resume_at(&mut self, index: usize, offset: u64, hasher: blake3::Hasher) -> ResumePoint {
        let point = ResumePoint {
            index: index as u32,
            offset,
            prefix_blake3: *hasher.finalize().as_bytes(),
        };
        self.resume[index] = Some((offset, hasher));
        point
    }

    /// (bytes here, bytes offered).
    pub fn progress(&self) -> (u64, u64) {
        (self.bytes_done, self.files.iter().map(|f| f.size).sum())
    }

    pub fn handle_control(&mut self, control: Control) -> Result<Step, Refusal> {
        match (control, &self.state) {
            (Control::FileStart { index, offset }, State::Between { next }) => {
                let index = index as usize;
                if index != *next || index >= self.files.len() {
                    return Err(out_of_turn(format!(
                        "file {index} was started where file {next} was due"
                    )));
                }
                let hasher = match self.resume[index].take() {
                    Some((resumed, hasher)) if resumed == offset => hasher,
                    _ if offset == 0 => blake3::Hasher::new(),
                    _ => {
                        return Err(out_of_turn(format!(
                        "file {index} was resumed at byte {offset}, which this side did not offer"
                    )))
                    }
                };
                self.bytes_done += offset;
                self.state = State::Receiving {
                    index,
                    written: offset,
                    hasher: Box::new(hasher),
                };
                let complete = self.complete_if_whole()?;
                Ok(Step::Open {
                    index,
                    offset,
                    complete,
                })
            }
            (
                Control::FileStart { .. } | Control::Done,
                State::Receiving { index, written, .. },
            ) => {
                let file = &self.files[*index];
                Err(Refusal::new(
                    AbortKind::SizeMismatch,
                    format!(
                        "the sender ended {} after {written} of the {} bytes it offered",
                        file.path, file.size
                    ),
                ))
            }
            (Control::Done, State::Between { next }) if *next == self.files.len() => {
                self.state = State::Finished;
                Ok(Step::Finished)
            }
            (Control::Done, State::Between { next }) => Err(out_of_turn(format!(
                "the sender said it was done before sending {}",
                self.files[*next].path
            ))),
            (Control::Abort(abort), _) => Ok(Step::SenderAborted {
                kind: abort.kind,
                message: abort.message.to_string(),
            }),
            (other, _) => Err(out_of_turn(format!("unexpected {}", name(&other)))),
        }
    }

    /// Takes the next bytes of the current file. `Ok(true)`: the file is now
    /// whole and its hash verified. The shell writes `bytes` only on `Ok`.
    pub fn handle_chunk(&mut self, bytes: &[u8]) -> Result<bool, Refusal> {
        let State::Receiving {
            index,
            written,
            hasher,
        } = &mut self.state
        else {
            return Err(out_of_turn("file data outside a file".into()));
        };
        let file = &self.files[*index];
        let len = bytes.len() as u64;
        if *written + len > file.size {
            return Err(Refusal::new(
                AbortKind::SizeMismatch,
                format!(
                    "the sender sent more than the {} bytes it offered for {}",
                    file.size, file.path
                ),
            ));
        }
        hasher.update(bytes);
        *written += len;
        self.bytes_done += len;
        self.complete_if_whole()
    }

    fn complete_if_whole(&mut self) -> Result<bool, Refusal> {
        let State::Receiving {
            index,
            written,
            hasher,
        } = &self.state
        else {
            return Ok(false);
        };
        let file = &self.files[*index];
        if *written < file.size {
            return Ok(false);
        }
        let got = hasher.finalize();
        if got != file.blake3 {
            return Err(Refusal::new(
                AbortKind::HashMismatch,
                format!(
                    "{} arrived with BLAKE3 {}, not the {} offered",
                    file.path,
                    got.to_hex(),
                    file.blake3.to_hex()
                ),
            ));
        }
        self.state = State::Between { next: index + 1 };
        Ok(true)
    }
}

fn out_of_turn(message: String) -> Refusal {
    Refusal::new(AbortKind::Protocol, message)
}

fn name(control: &Control) -> &'static str {
    match control {
        Control::Offer(_) => "second offer",
        Control::Accept { .. } => "accept from the sender",
        Control::FileStart { .. } => "file start",
        Control::Done => "done",
        Control::Saved { .. } => "saved from the sender",
        Control::Abort(_) => "abort",
    }
}

#[cfg(test)]
mod tests {
    use natter_wire::transfer::Abort;
    use natter_wire::BoundedString;

    use super::*;

    fn file(path: &str, content: &[u8]) -> OfferEntry {
        OfferEntry::File {
            path: BoundedString::new(path).unwrap(),
            size: content.len() as u64,
            blake3: *blake3::hash(content).as_bytes(),
        }
    }

    fn incoming(entries: Vec<OfferEntry>) -> Incoming {
        Incoming::new(&Plan::check(&Offer { entries }).unwrap())
    }

    fn start(index: u32, offset: u64) -> Control {
        Control::FileStart { index, offset }
    }

    #[test]
    fn two_files_in_order_then_done() {
        let mut rx = incoming(vec![file("a", b"hello"), file("b", b"")]);
        assert_eq!(
            rx.handle_control(start(0, 0)),
            Ok(Step::Open {
                index: 0,
                offset: 0,
                complete: false
            })
        );
        assert_eq!(rx.handle_chunk(b"hel"), Ok(false));
        assert_eq!(rx.handle_chunk(b"lo"), Ok(true));
        // An empty file is whole as soon as it starts.
        assert_eq!(
            rx.handle_control(start(1, 0)),
            Ok(Step::Open {
                index: 1,
                offset: 0,
                complete: true
            })
        );
        assert_eq!(rx.progress(), (5, 5));
        assert_eq!(rx.handle_control(Control::Done), Ok(Step::Finished));
    }

    #[test]
    fn a_resumed_file_continues_the_hash_of_what_is_here() {
        let mut rx = incoming(vec![file("a", b"hello world")]);
        let mut prefix = blake3::Hasher::new();
        prefix.update(b"hello ");
        let point = rx.resume_at(0, 6, prefix);
        assert_eq!(point.prefix_blake3, *blake3::hash(b"hello ").as_bytes());
        assert!(matches!(
            rx.handle_control(start(0, 6)),
            Ok(Step::Open { offset: 6, .. })
        ));
        assert_eq!(rx.progress().0, 6);
        assert_eq!(rx.handle_chunk(b"world"), Ok(true));
    }

    #[test]
    fn a_sender_may_start_over_but_not_resume_where_it_was_not_asked() {
        let mut rx = incoming(vec![file("a", b"hello")]);
        rx.resume_at(0, 2, blake3::Hasher::new());
        assert!(rx.handle_control(start(0, 0)).is_ok());
        let mut rx = incoming(vec![file("a", b"hello")]);
        assert_eq!(
            rx.handle_control(start(0, 3)).unwrap_err().kind,
            AbortKind::Protocol
        );
    }

    #[test]
    fn size_lies_are_refused_both_ways() {
        let mut rx = incoming(vec![file("a", b"hello"), file("b", b"x")]);
        rx.handle_control(start(0, 0)).unwrap();
        assert_eq!(
            rx.handle_chunk(b"hello!").unwrap_err().kind,
            AbortKind::SizeMismatch
        );
        let mut rx = incoming(vec![file("a", b"hello"), file("b", b"x")]);
        rx.handle_control(start(0, 0)).unwrap();
        rx.handle_chunk(b"hel").unwrap();
        assert_eq!(
            rx.handle_control(start(1, 0)).unwrap_err().kind,
            AbortKind::SizeMismatch
        );
        assert_eq!(
            rx.handle_control(Control::Done).unwrap_err().kind,
            AbortKind::SizeMismatch
        );
    }

    #[test]
    fn a_hash_mismatch_is_refused_when_the_file_is_whole() {
        let mut rx = incoming(vec![file("a", b"hello")]);
        rx.handle_control(start(0, 0)).unwrap();
        assert_eq!(rx.handle_chunk(b"hell"), Ok(false));
        assert_eq!(
            rx.handle_chunk(b"O").unwrap_err().kind,
            AbortKind::HashMismatch
        );
    }

    #[test]
    fn messages_out_of_turn_are_refused() {
        let mut rx = incoming(vec![file("a", b"hi"), file("b", b"yo")]);
        assert_eq!(
            rx.handle_chunk(b"hi").unwrap_err().kind,
            AbortKind::Protocol
        );
        assert_eq!(
            rx.handle_control(start(1, 0)).unwrap_err().kind,
            AbortKind::Protocol
        );
        assert_eq!(
            rx.handle_control(Control::Done).unwrap_err().kind,
            AbortKind::Protocol
        );
        let mut done = incoming(vec![]);
        assert_eq!(
            done.handle_control(start(0, 0)).unwrap_err().kind,
            AbortKind::Protocol
        );
        assert_eq!(
            rx.handle_control(Control::Saved { index: 0 })
                .unwrap_err()
                .kind,
            AbortKind::Protocol
        );
        let abort = Abort {
            kind: AbortKind::Io,
            message: BoundedString::truncated("disk gone"),
        };
        assert_eq!(
            rx.handle_control(Control::Abort(abort)),
            Ok(Step::SenderAborted {
                kind: AbortKind::Io,
                message: "disk gone".into()
            })
        );
    }

    #[test]
    fn an_offer_with_a_bad_or_repeated_name_is_refused_whole() {
        let refuse = |entries| Plan::check(&Offer { entries }).unwrap_err().kind;
        assert_eq!(
            refuse(vec![file("ok", b""), file("../x", b"")]),
            AbortKind::PathTraversal
        );
        assert_eq!(
            refuse(vec![file("a", b""), file("a", b"")]),
            AbortKind::Protocol
        );
        let link = OfferEntry::Symlink {
            path: BoundedString::new("l").unwrap(),
            target: BoundedString::new("../../etc").unwrap(),
        };
        assert_eq!(refuse(vec![link]), AbortKind::SymlinkEscapes);
    }
}
