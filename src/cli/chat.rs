//! `natter chat`: an interactive line chat.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use natter::session::{Received, Session};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::report::Reporter;

/// Your lines are sent as you type them; the other side's appear with a
/// timestamp. Ctrl-D or `/quit` closes the chat for both.
pub async fn run(session: Session, reporter: Reporter) -> Result<()> {
    eprintln!("natter: type a line and press Enter to send; Ctrl-D or /quit to leave");
    let (sender, mut receiver) = session.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut typing = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if typing => match line? {
                Some(line) if line.trim() == "/quit" => {
                    typing = false;
                    sender.close().await;
                }
                Some(line) => sender.send(line.as_bytes()).await?,
                None => {
                    typing = false;
                    sender.close().await;
                }
            },
            received = receiver.recv() => match received {
                Ok(Received::Data(text)) => {
                    println!("[{}] peer: {}", clock(), String::from_utf8_lossy(&text));
                }
                Ok(Received::End) => eprintln!("natter: the other peer stopped typing"),
                Err(natter::Error::Closed(reason)) => {
                    reporter.closed(&reason);
                    return Ok(());
                }
                Err(other) => return Err(other.into()),
            },
        }
    }
}

/// The time of day in UTC, `HH:MM:SS`.
fn clock() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60
    )
}
