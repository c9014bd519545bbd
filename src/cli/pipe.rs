//! `natter pipe`: stdin goes to the other peer, what it sends goes to
//! stdout, byte for byte.
//!
//! stdin and stdout each have a thread of their own doing plain blocking
//! reads and writes, one message's worth at a time, joined to the session
//! by bounded channels: tokio's stdin and stdout hand every read and every
//! (8 KiB) write to its blocking pool, and those hand-offs, not the
//! protocol, held `pipe` to about two thirds of quinn's goodput on a fast
//! path (natter's own transfer with its bytes in memory was 1.5× quinn).

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use natter::session::{Received, Session};
use tokio::sync::{mpsc, oneshot};

use super::progress::Progress;
use super::report::Reporter;

/// Bytes read from stdin per message at most.
const CHUNK: usize = 256 * 1024;
/// Pieces waiting between a thread and the session, each way.
const QUEUE: usize = 8;
/// A pipe on stdin is asked to hold this much (Linux's default is 64 KiB,
/// which is then all a read can return).
const PIPE_SIZE: i32 = 1 << 20;

/// Runs until stdin hit EOF and everything read was acknowledged, and the
/// other side's stream ended too; then closes the session.
pub async fn run(session: Session, reporter: Reporter) -> Result<()> {
    let started = Instant::now();
    let (sender, mut receiver) = session.split();
    // Bytes sent and received together, when stderr is a terminal.
    let progress = Progress::new(&reporter, None, false);
    let bar = progress.bar().cloned().unwrap_or_else(ProgressBar::hidden);
    let mut stdin = read_stdin();
    let (stdout, written) = write_stdout();
    let send = async {
        let mut sent = 0u64;
        while let Some(piece) = stdin.recv().await {
            let piece = piece.context("cannot read stdin")?;
            sender.send(&piece).await?;
            sent += piece.len() as u64;
            bar.inc(piece.len() as u64);
        }
        // Completes once the peer has everything.
        sender.finish().await?;
        anyhow::Ok(sent)
    };
    let receive = async {
        let mut received = 0u64;
        while let Received::Data(piece) = receiver.recv().await? {
            received += piece.len() as u64;
            bar.inc(piece.len() as u64);
            if stdout.send(piece).await.is_err() {
                break; // The writer stopped: its error is below.
            }
        }
        drop(stdout);
        written.await?.context("cannot write stdout")?;
        anyhow::Ok(received)
    };
    let (sent, received) = tokio::try_join!(send, receive)?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let channel = sender.stats().await;
    reporter.transferred(sent, received, elapsed, channel.as_ref());
    sender.close().await;
    let reason = receiver.closed().await?;
    reporter.closed(&reason);
    Ok(())
}

/// stdin in pieces of up to [`CHUNK`] bytes, read on a thread of its own;
/// the channel ends at end of file (or after an error).
fn read_stdin() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (pieces, rx) = mpsc::channel(QUEUE);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // Not a pipe, or not allowed: reads are just smaller.
            let _ = unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        }
        loop {
            let mut piece = vec![0; CHUNK];
            let result = match stdin.read(&mut piece) {
                Ok(0) => return,
                Ok(n) => {
                    piece.truncate(n);
                    Ok(piece)
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => Err(error),
            };
            let failed = result.is_err();
            if pieces.blocking_send(result).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// A thread that writes what comes down the channel to stdout, and flushes
/// once it ends; the result says whether every byte was written.
fn write_stdout() -> (
    mpsc::Sender<Vec<u8>>,
    oneshot::Receiver<std::io::Result<()>>,
) {
    let (pieces, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (done, written) = oneshot::channel();
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout().lock();
        let result = (|| {
            while let Some(piece) = rx.blocking_recv() {
                stdout.write_all(&piece)?;
            }
            stdout.flush()
        })();
        let _ = done.send(result);
    });
    (pieces, written)
}
