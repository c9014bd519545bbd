//! natter's library over the NAT lab, for `scripts/natlab-goodput.sh`: the
//! same one-way transfer as `natter pipe`, with the bytes made and dropped
//! in memory as `quinn_pipe` does, so the two stacks are compared alike
//! beside the user's `pipe` figure (which reads a pipe and writes stdout).
//!
//! ```text
//! natter_mem receive --rendezvous RV:7777 --code CODE
//!     counts what arrives until the end of the stream
//! natter_mem send --rendezvous RV:7777 --code CODE --bytes N
//!     prints {"bytes", "elapsed_ms", "started_on", "channel"}: from
//!     connected to the peer having acknowledged everything, the kind of
//!     path the session started on, and the channel's loss counters
//! natter_mem chat-send --rendezvous RV:7777 --code CODE --messages N --interval-ms MS
//!     sends N messages of 100 bytes, one every MS ms, each stamped with
//!     the time it was sent
//! natter_mem chat-receive --rendezvous RV:7777 --code CODE
//!     prints {"messages", "min_ms", "p50_ms", "p99_ms", "max_ms"}: from
//!     each message's send to its delivery
//! ```
//!
//! The chat modes are for `scripts/natlab-latency.sh`. Their stamps are
//! CLOCK_MONOTONIC, which every network namespace of the lab shares, so the
//! receiver can take a one-way latency from them.

use std::time::Instant;

use natter::code::PairingCode;
use natter::identity::Identity;
use natter::session::{Peer, Received};

const CHUNK: usize = 64 * 1024;

/// A chat line's size: a timestamp and padding.
const CHAT_MESSAGE: usize = 100;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every namespace.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn usage() -> ! {
    eprintln!(
        "usage: natter_mem receive --rendezvous ADDR --code CODE\n       \
         natter_mem send --rendezvous ADDR --code CODE --bytes N\n       \
         natter_mem chat-send --rendezvous ADDR --code CODE --messages N --interval-ms MS\n       \
         natter_mem chat-receive --rendezvous ADDR --code CODE"
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
            let started_on = session.path().path.kind;
            let (sender, receiver) = session.split();
            let started = Instant::now();
            let chunk = vec![0u8; CHUNK];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                sender.send(&chunk[..n]).await.expect("sends");
                left -= n as u64;
            }
            // Completes once the peer has acknowledged everything.
            sender.finish().await.expect("finishes");
            let elapsed_ms = started.elapsed().as_millis();
            let c = sender.stats().await.expect("the session is open");
            println!(
                "{{\"bytes\": {bytes}, \"elapsed_ms\": {elapsed_ms}, \"started_on\": \"{started_on:?}\", \"channel\": {{\"packets_lost\": {}, \"lost_by_reordering\": {}, \"lost_by_time\": {}, \"spurious_losses\": {}, \"probe_timeouts\": {}, \"congestion_events\": {}}}}}",
                c.packets_lost,
                c.losses.by_reordering,
                c.losses.by_time,
                c.losses.spurious,
                c.probe_timeouts,
                c.congestion_events,
            );
            sender.close().await;
            let _ = receiver.closed().await;
        }
        Some("chat-send") => {
            let messages: u64 = arg(&args, "--messages").parse().unwrap_or_else(|_| usage());
            let interval_ms: u64 = arg(&args, "--interval-ms")
                .parse()
                .unwrap_or_else(|_| usage());
            let mut ticks =
                tokio::time::interval(std::time::Duration::from_millis(interval_ms.max(1)));
            let mut message = vec![0u8; CHAT_MESSAGE];
            for _ in 0..messages {
                ticks.tick().await;
                message[..8].copy_from_slice(&monotonic_ns().to_be_bytes());
                session.send(&message).await.expect("sends");
            }
            session.finish().await.expect("finishes");
            let _ = session.close().await;
        }
        Some("chat-receive") => {
            let mut latencies_ns = Vec::new();
            while let Received::Data(data) = session.recv().await.expect("receives") {
                let stamp: [u8; 8] = data[..8].try_into().expect("a chat message has a stamp");
                latencies_ns.push(monotonic_ns().saturating_sub(u64::from_be_bytes(stamp)));
            }
            if latencies_ns.is_empty() {
                eprintln!("no chat messages arrived");
                std::process::exit(1);
            }
            latencies_ns.sort_unstable();
            let ms = |p: f64| {
                let i = ((latencies_ns.len() - 1) as f64 * p).round() as usize;
                latencies_ns[i] as f64 / 1e6
            };
            println!(
                "{{\"messages\": {}, \"min_ms\": {:.3}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}}}",
                latencies_ns.len(),
                ms(0.0),
                ms(0.5),
                ms(0.99),
                ms(1.0),
            );
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
