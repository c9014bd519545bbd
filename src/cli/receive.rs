//! `natter receive CODE`: shows the offer, asks, and writes what arrives
//! into `--out`, each file verified with BLAKE3 before it is renamed into
//! place. Partial copies stay beside their targets, so running the same
//! command again resumes.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use natter::session::{Received, Session, SessionReceiver, SessionSender};
use natter::transfer::{Destination, FileState, Incoming, Plan, Refusal, Step};
use natter_wire::transfer::{AbortKind, Control, TransferMessage};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::progress::Progress;
use super::report::{human_bytes, Reporter};
use super::send::{send, told};

pub struct Options {
    pub out: PathBuf,
    pub yes: bool,
    pub overwrite: bool,
}

/// How long a refusal waits to reach the sender before the session closes.
const ABORT_DELIVERY: Duration = Duration::from_secs(5);

pub async fn run(session: Session, reporter: Reporter, options: Options) -> Result<()> {
    let (sender, mut receiver) = session.split();
    match receive(&sender, &mut receiver, &reporter, &options).await {
        Ok(()) => {
            sender.close().await;
            receiver.closed().await?;
            Ok(())
        }
        Err(Stop::Refuse(refusal)) => {
            // Tell the sender why, then leave.
            let abort = TransferMessage::Control(Control::Abort(refusal.to_abort()));
            let _ = tokio::time::timeout(ABORT_DELIVERY, async {
                send(&sender, abort).await?;
                sender.finish().await?;
                anyhow::Ok(())
            })
            .await;
            sender.close().await;
            Err(refusal.into())
        }
        Err(Stop::Failed(error)) => Err(error),
    }
}

enum Stop {
    /// This side refuses: the sender is told why.
    Refuse(Refusal),
    /// The session or the sender failed; nothing to tell.
    Failed(anyhow::Error),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Self {
        Self::Refuse(refusal)
    }
}

impl From<anyhow::Error> for Stop {
    fn from(error: anyhow::Error) -> Self {
        match error.downcast::<Refusal>() {
            Ok(refusal) => Self::Refuse(refusal),
            Err(error) => Self::Failed(error),
        }
    }
}

/// A file being written: its index, and the open partial copy.
struct Writing {
    index: usize,
    file: BufWriter<File>,
}

async fn receive(
    sender: &SessionSender,
    receiver: &mut SessionReceiver,
    reporter: &Reporter,
    options: &Options,
) -> Result<(), Stop> {
    let offer = match recv_message(receiver).await? {
        Some(TransferMessage::Control(Control::Offer(offer))) => offer,
        Some(_) => return Err(protocol("the first message was not an offer").into()),
        None => {
            return Err(Stop::Failed(anyhow::anyhow!(
                "the sender ended before offering anything"
            )))
        }
    };
    let plan = Plan::check(&offer)?;
    let names: Vec<&str> = offer.entries.iter().map(|e| e.path()).collect();
    reporter.offer(plan.files.len(), plan.total_bytes(), &names);
    let destination = Destination::open(&options.out)
        .map_err(|e| Refusal::new(AbortKind::Io, format!("{}: {e}", options.out.display())))?;
    let states = tokio::task::block_in_place(|| destination.survey(&plan))?;
    decide(&plan, &states, &destination, options).await?;
    tokio::task::block_in_place(|| destination.make_directories(&plan))?;

    let mut incoming = Incoming::new(&plan);
    let mut resume = Vec::new();
    for (index, state) in states.iter().enumerate() {
        match state {
            FileState::AlreadyThere(hasher) => {
                resume.push(incoming.resume_at(index, plan.files[index].size, hasher.clone()))
            }
            FileState::New {
                partial: Some((offset, hasher)),
            } if *offset > 0 => resume.push(incoming.resume_at(index, *offset, hasher.clone())),
            _ => {}
        }
    }
    send(sender, TransferMessage::Control(Control::Accept { resume })).await?;

    let mut progress = Progress::new(reporter, Some(plan.total_bytes()), true);
    let mut writing: Option<Writing> = None;
    loop {
        let message = match recv_message(receiver).await? {
            Some(message) => message,
            None => {
                return Err(Stop::Failed(anyhow::anyhow!(
                    "the sender ended the transfer before it was done"
                )))
            }
        };
        match message {
            TransferMessage::Chunk(bytes) => {
                let complete = match incoming.handle_chunk(&bytes) {
                    Ok(complete) => complete,
                    Err(refusal) => {
                        if let (AbortKind::HashMismatch, Some(current)) =
                            (refusal.kind, writing.take())
                        {
                            // Known bad: a later run must not resume from it.
                            drop(current.file);
                            destination.discard_partial(&plan.files[current.index].path);
                        }
                        return Err(refusal.into());
                    }
                };
                let Some(current) = writing.as_mut() else {
                    return Err(protocol("file data before a file").into());
                };
                tokio::task::block_in_place(|| current.file.write_all(&bytes))
                    .map_err(|e| io_refusal(&destination, &plan, current.index, e))?;
                if complete {
                    let current = writing.take().expect("checked above");
                    saved(sender, &destination, &plan, current, &progress, reporter).await?;
                }
            }
            TransferMessage::Control(control) => match incoming.handle_control(control)? {
                Step::Open {
                    index,
                    offset,
                    complete,
                } => {
                    let file = &plan.files[index];
                    if offset > 0 {
                        progress.println(|| reporter.resumed(&file.path.to_string(), offset));
                    }
                    if complete && matches!(states[index], FileState::AlreadyThere(_)) {
                        // Nothing to write: the same bytes are in place.
                        progress.println(|| {
                            reporter.saved(&file.path.to_string(), file.size, &file.blake3)
                        });
                        send(
                            sender,
                            TransferMessage::Control(Control::Saved {
                                index: index as u32,
                            }),
                        )
                        .await?;
                    } else {
                        let partial = tokio::task::block_in_place(|| {
                            destination.open_partial(&file.path, offset)
                        })?;
                        let current = Writing {
                            index,
                            file: BufWriter::with_capacity(1 << 20, partial),
                        };
                        if complete {
                            saved(sender, &destination, &plan, current, &progress, reporter)
                                .await?;
                        } else {
                            writing = Some(current);
                        }
                    }
                }
                Step::Finished => {
                    for link in &plan.links {
                        destination.make_link(link)?;
                    }
                    progress.finish(incoming.progress().0);
                    return Ok(());
                }
                Step::SenderAborted { kind, message } => {
                    return Err(Stop::Failed(told(kind, &message)))
                }
            },
        }
        progress.set(incoming.progress().0);
    }
}

/// The current file is whole and verified: on disk, in place, confirmed.
async fn saved(
    sender: &SessionSender,
    destination: &Destination,
    plan: &Plan,
    current: Writing,
    progress: &Progress,
    reporter: &Reporter,
) -> Result<(), Stop> {
    let file = &plan.files[current.index];
    let partial = current
        .file
        .into_inner()
        .map_err(|e| io_refusal(destination, plan, current.index, e.into_error()))?;
    tokio::task::block_in_place(|| destination.put_in_place(&file.path, partial))?;
    progress.println(|| reporter.saved(&file.path.to_string(), file.size, &file.blake3));
    let index = current.index as u32;
    send(sender, TransferMessage::Control(Control::Saved { index })).await?;
    Ok(())
}

/// Whether to go on: the person is asked unless `--yes`; a file that is
/// there and differs is replaced only with `--overwrite` or a yes to a
/// question that names it.
async fn decide(
    plan: &Plan,
    states: &[FileState],
    destination: &Destination,
    options: &Options,
) -> Result<(), Refusal> {
    let conflicts: Vec<String> = plan
        .files
        .iter()
        .zip(states)
        .filter(|(_, state)| matches!(state, FileState::Conflict))
        .map(|(file, _)| destination.target(&file.path).display().to_string())
        .collect();
    if options.yes {
        if conflicts.is_empty() || options.overwrite {
            return Ok(());
        }
        return Err(Refusal::new(
            AbortKind::Exists,
            format!(
                "{} already there and different: pass --overwrite to replace, or choose another --out",
                conflicts.join(", ")
            ),
        ));
    }
    let mut question = format!(
        "receive {} file(s), {}, into {}",
        plan.files.len(),
        human_bytes(plan.total_bytes()),
        destination.root().display()
    );
    if !conflicts.is_empty() {
        question += &format!(", replacing {}", conflicts.join(", "));
    }
    eprint!("natter: {question}? [y/N] ");
    let mut answer = String::new();
    let read = BufReader::new(tokio::io::stdin())
        .read_line(&mut answer)
        .await;
    if !std::io::stdin().is_terminal() {
        eprintln!();
    }
    match (read, answer.trim()) {
        (Ok(_), "y" | "Y" | "yes") => Ok(()),
        _ => Err(Refusal::new(AbortKind::Declined, "the offer was declined")),
    }
}

fn protocol(message: &str) -> Refusal {
    Refusal::new(AbortKind::Protocol, message)
}

fn io_refusal(
    destination: &Destination,
    plan: &Plan,
    index: usize,
    error: std::io::Error,
) -> Refusal {
    let partial = destination.partial(&plan.files[index].path);
    Refusal::new(AbortKind::Io, format!("{}: {error}", partial.display()))
}

/// The next transfer message; `None` when the other side ended its stream.
/// Bytes that do not decode are refused as a protocol error.
pub async fn recv_message(receiver: &mut SessionReceiver) -> Result<Option<TransferMessage>> {
    match receiver.recv().await? {
        Received::Data(bytes) => match TransferMessage::decode(bytes) {
            Ok(message) => Ok(Some(message)),
            Err(error) => bail!(Refusal::new(
                AbortKind::Protocol,
                format!("a transfer message did not decode: {error}")
            )),
        },
        Received::End => Ok(None),
    }
}
