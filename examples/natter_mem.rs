//! natter's library over the NAT lab, for `scripts/natlab-goodput.sh`: the
//! same one-way transfer as `natter pipe`, with the bytes made and dropped
//! in memory as `quinn_pipe` does, so the two stacks are compared alike
//! beside the user's `pipe` figure (which reads a pipe and writes stdout).
//!
//! ```text
//! natter_mem receive --rendezvous RV:7777 --code CODE
//!     counts what arrives until the end of the stream
//! natter_mem send --rendezvous RV:7777 --code CODE --bytes N
//!     prints {"bytes", "elapsed_ms"}: from connected to the peer having
//!     acknowledged everything
//! ```

use std::time::Instant;

use natter::code::PairingCode;
use natter::identity::Identity;
use natter::session::{Peer, Received};

const CHUNK: usize = 64 * 1024;

fn usage() -> ! {
    eprintln!(
        "usage: natter_mem receive --rendezvous ADDR --code CODE\n       \
         natter_mem send --rendezvous ADDR --code CODE --bytes N"
    );
    std::process::exit(2)
}

/// The value after `--name` on the command line.
fn arg(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| usage())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code: PairingCode = arg(&args, "--code").parse().unwrap_or_else(|_| usage());
    let mut session = Peer::builder()
        .rendezvous(arg(&args, "--rendezvous"))
        .code(code)
        .identity(Identity::generate())
        .connect()
        .await
        .expect("connects");
    match args.get(1).map(String::as_str) {
        Some("send") => {
            let bytes: u64 = arg(&args, "--bytes").parse().unwrap_or_else(|_| usage());
            let started = Instant::now();
            let chunk = vec![0u8; CHUNK];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                session.send(&chunk[..n]).await.expect("sends");
                left -= n as u64;
            }
            // Completes once the peer has acknowledged everything.
            session.finish().await.expect("finishes");
            let elapsed_ms = started.elapsed().as_millis();
            println!("{{\"bytes\": {bytes}, \"elapsed_ms\": {elapsed_ms}}}");
            let _ = session.close().await;
        }
        Some("receive") => {
            let mut received = 0u64;
            while let Received::Data(data) = session.recv().await.expect("receives") {
                received += data.len() as u64;
            }
            eprintln!("received {received} bytes");
            let _ = session.close().await;
        }
        _ => usage(),
    }
}
