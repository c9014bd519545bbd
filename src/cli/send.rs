//! `natter send PATH`: offers a file or a directory, sends what the
//! receiver accepts (from where it stopped, when resuming), and exits 0
//! once the receiver has verified and saved every file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use natter::session::{Session, SessionReceiver, SessionSender};
use natter::transfer::{Outgoing, Refusal};
use natter_wire::transfer::{AbortKind, Control, TransferMessage, MAX_CHUNK};
use tokio::sync::mpsc;

use super::progress::Progress;
use super::report::Reporter;

/// Hashes everything to offer before connecting, so a missing file fails
/// before a code is printed.
pub async fn gather(path: &Path, reporter: &Reporter) -> Result<Outgoing> {
    let path = path.to_path_buf();
    let outgoing = tokio::task::spawn_blocking(move || Outgoing::gather(&path)).await??;
    for skipped in &outgoing.skipped {
        reporter.hint(&format!("left out {skipped}"));
    }
    Ok(outgoing)
}

pub async fn run(session: Session, reporter: Reporter, outgoing: Outgoing) -> Result<()> {
    let (sender, mut receiver) = session.split();
    // Everything the receiver says (accept, saved, abort) comes through here.
    let (replies_tx, mut replies) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let reply = recv(&mut receiver).await;
            let last = !matches!(reply, Ok(Some(_)));
            if replies_tx.send(reply).is_err() || last {
                return;
            }
        }
    });
    let result = transfer(&sender, &mut replies, &reporter, &outgoing).await;
    // Close gracefully, also after a failure, so what was sent (an abort)
    // arrives: wait until the receiver's side has closed too.
    sender.close().await;
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(Some(_))) = replies.recv().await {}
    })
    .await;
    result
}

/// How long a sender waits for the receiver to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

type Replies = mpsc::UnboundedReceiver<Result<Option<Control>>>;

async fn transfer(
    sender: &SessionSender,
    replies: &mut Replies,
    reporter: &Reporter,
    outgoing: &Outgoing,
) -> Result<()> {
    let names: Vec<&str> = outgoing.offer.entries.iter().map(|e| e.path()).collect();
    reporter.offer(outgoing.files.len(), outgoing.total_bytes(), &names);
    send(sender, control(Control::Offer(outgoing.offer.clone()))).await?;
    let resume = match replies.recv().await.transpose()?.flatten() {
        Some(Control::Accept { resume }) => resume,
        Some(Control::Abort(abort)) => return Err(told(abort.kind, &abort.message)),
        Some(_) => bail!(protocol("the receiver answered the offer out of turn")),
        None => bail!("the receiver left without answering the offer"),
    };
    let resume: HashMap<u32, _> = resume.into_iter().map(|p| (p.index, p)).collect();
    let mut saved = Saved::default();
    let mut progress = Progress::new(reporter, Some(outgoing.total_bytes()), true);
    let mut done = 0;
    for (index, file) in outgoing.files.iter().enumerate() {
        let point = resume.get(&(index as u32));
        let offset = tokio::task::block_in_place(|| outgoing.start_offset(index, point))
            .with_context(|| format!("cannot read {}", file.local.display()))?;
        send(
            sender,
            control(Control::FileStart {
                index: index as u32,
                offset,
            }),
        )
        .await?;
        if offset > 0 {
            progress.println(|| reporter.resumed(&file.name, offset));
        }
        done += offset;
        progress.set(done);
        let mut source = File::open(&file.local)
            .and_then(|mut f| f.seek(SeekFrom::Start(offset)).map(|_| f))
            .with_context(|| format!("cannot read {}", file.local.display()))?;
        let mut left = file.size - offset;
        while left > 0 {
            let mut chunk = vec![0; MAX_CHUNK.min(left as usize)];
            if let Err(error) = tokio::task::block_in_place(|| source.read_exact(&mut chunk)) {
                let refusal = Refusal::new(
                    AbortKind::Io,
                    format!(
                        "{} changed or could not be read while sending: {error}",
                        file.local.display()
                    ),
                );
                let _ = send(sender, control(Control::Abort(refusal.to_abort()))).await;
                return Err(refusal.into());
            }
            left -= chunk.len() as u64;
            done += chunk.len() as u64;
            if let Err(error) = send(sender, TransferMessage::Chunk(chunk)).await {
                // The session ended: an abort from the receiver says why.
                while let Ok(reply) = replies.try_recv() {
                    saved.take(reply, outgoing, &progress, reporter)?;
                }
                return Err(error);
            }
            progress.set(done);
            while let Ok(reply) = replies.try_recv() {
                saved.take(reply, outgoing, &progress, reporter)?;
            }
        }
    }
    send(sender, control(Control::Done)).await?;
    progress.finish(done);
    while saved.count < outgoing.files.len() {
        match replies.recv().await {
            Some(reply) => saved.take(reply, outgoing, &progress, reporter)?,
            None => bail!("the receiver left before confirming every file"),
        }
    }
    Ok(())
}

/// Files the receiver confirmed.
#[derive(Default)]
struct Saved {
    count: usize,
}

impl Saved {
    fn take(
        &mut self,
        reply: Result<Option<Control>>,
        outgoing: &Outgoing,
        progress: &Progress,
        reporter: &Reporter,
    ) -> Result<()> {
        match reply? {
            Some(Control::Saved { index }) if index as usize == self.count => {
                let file = &outgoing.files[self.count];
                progress.println(|| reporter.saved(&file.name, file.size, &file.blake3));
                self.count += 1;
                Ok(())
            }
            Some(Control::Abort(abort)) => Err(told(abort.kind, &abort.message)),
            Some(_) => Err(protocol("the receiver confirmed a file out of turn").into()),
            None => Err(anyhow!(
                "the receiver ended the session before confirming every file"
            )),
        }
    }
}

fn control(control: Control) -> TransferMessage {
    TransferMessage::Control(control)
}

/// The other side stopped the transfer, with this reason.
pub fn told(kind: AbortKind, message: &str) -> anyhow::Error {
    Refusal::new(
        kind,
        format!("the other side stopped the transfer: {message}"),
    )
    .into()
}

fn protocol(message: &str) -> Refusal {
    Refusal::new(AbortKind::Protocol, message)
}

pub async fn send(sender: &SessionSender, message: TransferMessage) -> Result<()> {
    sender.send(&message.encode()?).await?;
    Ok(())
}

/// The next control message; `None` when the other side ended its stream.
/// A chunk here, or bytes that do not decode, are a protocol error.
async fn recv(receiver: &mut SessionReceiver) -> Result<Option<Control>> {
    match super::receive::recv_message(receiver).await? {
        Some(TransferMessage::Control(control)) => Ok(Some(control)),
        Some(TransferMessage::Chunk(_)) => Err(protocol("the receiver sent file data").into()),
        None => Ok(None),
    }
}
