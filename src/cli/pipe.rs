//! `natter pipe`: stdin goes to the other peer, what it sends goes to
//! stdout, byte for byte.

use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
use natter::session::Session;
use tokio::io::{AsyncWriteExt, BufReader};

use super::progress::Progress;
use super::report::Reporter;

/// Bytes read from stdin per message at most.
const CHUNK: usize = 64 * 1024;

/// Runs until stdin hit EOF and everything read was acknowledged, and the
/// other side's stream ended too; then closes the session.
pub async fn run(session: Session, reporter: Reporter) -> Result<()> {
    let started = Instant::now();
    let (mut sender, mut receiver) = session.split();
    // Bytes sent and received together, when stderr is a terminal.
    let progress = Progress::new(&reporter, None, false);
    let bar = progress.bar().cloned().unwrap_or_else(ProgressBar::hidden);
    let send = async {
        let stdin = bar.wrap_async_read(tokio::io::stdin());
        let mut stdin = BufReader::with_capacity(CHUNK, stdin);
        let sent = tokio::io::copy_buf(&mut stdin, &mut sender).await?;
        // Completes once the peer has everything.
        sender.shutdown().await?;
        anyhow::Ok(sent)
    };
    let receive = async {
        let mut stdout = bar.wrap_async_write(tokio::io::stdout());
        let received = tokio::io::copy(&mut receiver, &mut stdout).await?;
        stdout.flush().await?;
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
