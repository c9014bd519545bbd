//! `natter demo`: the whole flow on loopback, in one process, with timings.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use natter::code::{random_nameplate, PairingCode};
use natter::identity::Identity;
use natter::punch::CandidateKind;
use natter::session::{Peer, Received, Session};
use natter_rendezvous::{driver, Config};

const STREAM_BYTES: usize = 10 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run() -> Result<()> {
    let started = Instant::now();
    let rendezvous = driver::start(&["127.0.0.1:0".parse()?], Config::default())
        .context("cannot start the embedded rendezvous")?;
    let server = rendezvous.local_addrs[0];
    println!(
        "rendezvous   listening on {server} ({} ms)",
        started.elapsed().as_millis()
    );

    let mut rng = rand::thread_rng();
    let code = PairingCode::generate(random_nameplate(&mut rng), 2, &mut rng);
    println!("pairing code {code} (the rendezvous sees only its nameplate)");
    let connect = |name: &'static str| {
        let code = code.clone();
        async move {
            let identity = Identity::generate();
            println!(
                "{name:<12} fingerprint {}",
                identity.public_key().fingerprint()
            );
            let session = Peer::builder()
                .rendezvous(server.to_string())
                .code(code)
                .identity(identity)
                .bind("127.0.0.1:0".parse()?)
                .connect()
                .await
                .with_context(|| format!("peer {name} could not connect"))?;
            anyhow::Ok(session)
        }
    };
    let connecting = Instant::now();
    let (mut alice, mut bob) =
        within(async { tokio::try_join!(connect("alice"), connect("bob")) }).await??;
    for (name, session) in [("alice", &alice), ("bob", &bob)] {
        let info = session.path();
        let how = match info.path.kind {
            CandidateKind::Relayed => "through the relay",
            _ => "directly",
        };
        println!(
            "{name:<12} connected {how}: {} -> {} via its {} candidate in {} ms, encrypted with {}; peer fingerprint {}",
            info.local,
            info.path.remote,
            info.path.kind.as_str(),
            info.elapsed.as_millis(),
            info.cipher.name(),
            info.remote_key.fingerprint()
        );
    }
    println!(
        "both peers    connected {} ms after they started",
        connecting.elapsed().as_millis()
    );

    let chatting = Instant::now();
    exchange(&alice, &mut bob, "hello bob, this is alice").await?;
    exchange(
        &bob,
        &mut alice,
        "hi alice! it works through the punched path",
    )
    .await?;
    println!(
        "messages     round trip of both in {:.1} ms",
        chatting.elapsed().as_secs_f64() * 1e3
    );

    let streaming = Instant::now();
    let (sent_sum, received_sum) =
        within(async { tokio::try_join!(stream_out(&alice), stream_in(&mut bob)) }).await??;
    let elapsed = streaming.elapsed();
    ensure!(sent_sum == received_sum, "stream checksum mismatch");
    println!(
        "stream       10 MiB alice -> bob in {} ms ({:.1} MiB/s), checksum {sent_sum:016x} matches",
        elapsed.as_millis(),
        STREAM_BYTES as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );

    let closing = Instant::now();
    let (alice_reason, bob_reason) =
        within(async { tokio::try_join!(alice.close(), bob.close()) }).await??;
    println!(
        "closed       in {} ms (alice: {alice_reason}; bob: {bob_reason})",
        closing.elapsed().as_millis()
    );
    let stats = rendezvous.shutdown().await?;
    println!("rendezvous   stopped: {stats}");
    println!("total        {} ms", started.elapsed().as_millis());
    Ok(())
}

async fn exchange(from: &Session, to: &mut Session, text: &str) -> Result<()> {
    from.send(text.as_bytes()).await?;
    let received = within(to.recv()).await??;
    ensure!(
        received == Received::Data(text.as_bytes().to_vec()),
        "message garbled: {received:?}"
    );
    println!("message      {text:?} delivered");
    Ok(())
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .with_context(|| format!("demo step took longer than {} s", STEP_TIMEOUT.as_secs()))
}

/// Sends a pseudo-random 10 MiB stream and returns its checksum.
async fn stream_out(session: &Session) -> Result<u64> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut checksum = Checksum::default();
    let mut chunk = vec![0u8; CHUNK];
    for _ in 0..STREAM_BYTES / CHUNK {
        for byte in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        checksum.update(&chunk);
        session.send(&chunk).await?;
    }
    session.finish().await?;
    Ok(checksum.0)
}

async fn stream_in(session: &mut Session) -> Result<u64> {
    let mut checksum = Checksum::default();
    loop {
        match session.recv().await? {
            Received::Data(data) => checksum.update(&data),
            Received::End => return Ok(checksum.0),
        }
    }
}

/// FNV-1a over the stream: enough to catch a lost, duplicated or reordered
/// chunk.
struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
