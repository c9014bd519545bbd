//! `natter pipe`: stdin goes to the other peer, what it sends goes to
//! stdout, byte for byte.

use std::time::Instant;

use anyhow::Result;
use natter::session::{Received, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::report::Reporter;

/// Bytes read from stdin per message.
const CHUNK: usize = 64 * 1024;

/// Runs until stdin hit EOF and everything read was acknowledged, and the
/// other side's stream ended too; then closes the session.
pub async fn run(session: Session, reporter: Reporter) -> Result<()> {
    let started = Instant::now();
    let (sender, mut receiver) = session.split();
    let send = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        loop {
            let len = stdin.read(&mut buf).await?;
            if len == 0 {
                break;
            }
            sender.send(&buf[..len]).await?;
            sent += len as u64;
        }
        sender.finish().await?;
        anyhow::Ok(sent)
    };
    let receive = async {
        let mut stdout = tokio::io::stdout();
        let mut received = 0u64;
        while let Received::Data(data) = receiver.recv().await? {
            stdout.write_all(&data).await?;
            received += data.len() as u64;
        }
        stdout.flush().await?;
        anyhow::Ok(received)
    };
    let (sent, received) = tokio::try_join!(send, receive)?;
    reporter.transferred(sent, received, started.elapsed());
    sender.close().await;
    let reason = receiver.closed().await?;
    reporter.closed(&reason);
    Ok(())
}
