//! natter against quinn on loopback: the same 256 MiB, one way, in the same
//! process and run, so the figures compare the two stacks and not two
//! machines or two days.
//!
//! Run with `cargo bench --bench loopback`. The in-memory figures of
//! `benches/reliable.rs` leave out the sockets, the tokio shell and the
//! task hand-offs; this bench measures them, against an established QUIC
//! implementation doing the same job on the same runtime.
//!
//! Each stack moves 256 MiB over real UDP sockets on 127.0.0.1, encrypted,
//! in 64 KiB writes, and the clock runs from the first write to the receiver
//! seeing end-of-stream. Reported: wall-clock goodput, process CPU time per
//! MiB (both ends and every thread, from `getrusage`), and UDP payload bytes
//! per byte delivered (both directions, counted on the `lo` interface, so it
//! needs no hook into either stack; quinn's own count is printed beside it
//! as a check), and datagrams the kernel dropped at full socket buffers.
//!
//! quinn runs on its defaults, and in three labelled variants that each
//! change one thing towards natter's setup (16 MiB windows; ChaCha20-Poly1305
//! instead of the AES-GCM rustls prefers; ChaCha20 with 1200-byte datagrams
//! and no GSO), so a gap can be traced to its cause. Every variant runs
//! three times, interleaved so drift in the machine hits all of them alike;
//! the table shows the median and the spread.
//!
//! `cargo bench --bench loopback -- natter` runs only the stacks whose label
//! contains a given word, for profiling one with `perf record`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use natter::code::PairingCode;
use natter::session::Peer;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Endpoint, ServerConfig, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
const TOTAL: u64 = 256 * MIB;
const WRITE_SIZE: usize = 64 * 1024;
const RUNS: usize = 3;
/// natter's default channel receive window, which the raised quinn variant
/// copies.
const NATTER_WINDOW: u32 = 16 * 1024 * 1024;
/// IPv4 and UDP headers, which the `lo` byte counter includes per skb.
const IP_UDP_HEADERS: u64 = 28;
/// No run of a healthy stack gets near this; a stall fails the bench instead
/// of hanging it.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// CPU time of the whole process, every thread, user plus system.
fn process_cpu_time() -> Duration {
    // SAFETY: rusage is plain integers, so all-zero is a valid value, and
    // getrusage only writes the struct it is given.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage), usage)
    };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Bytes and packets sent on `lo` so far. Loopback sends and receives each
/// packet once, so the send side alone counts both directions of a run.
fn loopback_counters() -> Option<(u64, u64)> {
    let dev = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    let fields: Vec<u64> = line
        .split_once(':')?
        .1
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // Receive has 8 columns, then transmit bytes and packets.
    Some((*fields.get(8)?, *fields.get(9)?))
}

/// UDP datagrams the kernel dropped because a socket's receive buffer was
/// full, machine-wide. On loopback these are the only losses, and neither
/// stack's own counters are needed to see them.
fn receive_buffer_drops() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names
        .split_whitespace()
        .position(|name| name == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Where a measurement starts: taken just before the first write.
struct Mark {
    wall: Instant,
    cpu: Duration,
    lo: Option<(u64, u64)>,
    drops: Option<u64>,
}

impl Mark {
    fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu_time(),
            lo: loopback_counters(),
            drops: receive_buffer_drops(),
        }
    }

    /// Taken the moment the receiver sees end-of-stream.
    fn finish(&self, delivered: u64) -> Sample {
        let wall = self.wall.elapsed();
        let cpu = process_cpu_time() - self.cpu;
        // UDP payload bytes: what both stacks put in datagrams, headers of
        // their own included. With GSO (quinn) one skb carries many
        // datagrams under one set of headers, so subtracting headers per skb
        // still leaves the payload exactly.
        let wire = match (self.lo, loopback_counters()) {
            (Some((b0, p0)), Some((b1, p1))) => {
                Some((b1 - b0).saturating_sub((p1 - p0) * IP_UDP_HEADERS))
            }
            _ => None,
        };
        let drops = match (self.drops, receive_buffer_drops()) {
            (Some(before), Some(after)) => Some(after - before),
            _ => None,
        };
        Sample {
            delivered,
            wall,
            cpu,
            wire,
            drops,
            quinn: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    delivered: u64,
    wall: Duration,
    cpu: Duration,
    wire: Option<u64>,
    /// Datagrams dropped at a full socket receive buffer.
    drops: Option<u64>,
    /// quinn's own counters, to check the `lo` figure against.
    quinn: Option<QuinnCounts>,
}

#[derive(Debug, Clone, Copy)]
struct QuinnCounts {
    /// UDP payload bytes the client sent and received, handshake included.
    udp_bytes: u64,
    sent_packets: u64,
    lost_packets: u64,
    mtu: u16,
}

impl Sample {
    fn goodput(&self) -> f64 {
        self.delivered as f64 / MIB as f64 / self.wall.as_secs_f64()
    }

    fn cpu_ms_per_mib(&self) -> f64 {
        self.cpu.as_secs_f64() * 1000.0 / (self.delivered as f64 / MIB as f64)
    }

    fn wire_per_byte(&self) -> Option<f64> {
        self.wire.map(|w| w as f64 / self.delivered as f64)
    }
}

/// natter end to end: an in-process rendezvous, two peers meeting with a
/// pairing code, the sender's `AsyncWrite` half to the receiver's
/// `AsyncRead` half, all on default settings.
async fn natter_run() -> Sample {
    let server = natter_rendezvous::driver::start(
        &["127.0.0.1:0".parse().unwrap()],
        natter_rendezvous::Config::default(),
    )
    .expect("rendezvous starts");
    let rendezvous = server.local_addrs[0].to_string();
    // A fresh nameplate per run, so a lingering registration of the last
    // run cannot meet this one.
    let code: PairingCode = format!("{}-loopback-bench", rand::random::<u16>() % 999 + 1)
        .parse()
        .unwrap();
    let connect = |code: PairingCode| {
        Peer::builder()
            .rendezvous(rendezvous.clone())
            .code(code)
            .bind("127.0.0.1:0".parse().unwrap())
            .connect()
    };
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::try_join!(connect(code.clone()), connect(code))
    })
    .await
    .expect("peers connect within 10 s")
    .expect("peers connect");
    // The unused halves stay alive until the end: dropping every handle of
    // a session closes it.
    let (mut writer, a_reader) = a.split();
    let (b_writer, mut reader) = b.split();

    let mark = Mark::now();
    let send = tokio::spawn(async move {
        let chunk = vec![0x5au8; WRITE_SIZE];
        let mut sent = 0;
        while sent < TOTAL {
            writer.write_all(&chunk).await.expect("natter write");
            sent += WRITE_SIZE as u64;
        }
        // Completes once the receiver acknowledged everything.
        writer.shutdown().await.expect("natter shutdown");
        writer
    });
    let sample = tokio::time::timeout(RUN_LIMIT, async {
        let mut buf = vec![0u8; WRITE_SIZE];
        let mut delivered = 0;
        loop {
            match reader.read(&mut buf).await.expect("natter read") {
                0 => break mark.finish(delivered),
                n => delivered += n as u64,
            }
        }
    })
    .await
    .expect("natter transfer finishes within the run limit");
    assert_eq!(sample.delivered, TOTAL, "natter delivered everything");
    let writer = send.await.expect("sender task");
    drop((writer, a_reader, b_writer, reader));
    server.shutdown().await.expect("rendezvous stops");
    sample
}

/// How the quinn endpoints are set up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum QuinnVariant {
    /// `TransportConfig::default()`, nothing changed.
    Defaults,
    /// Stream and connection receive windows and the send window at 16 MiB,
    /// as natter's receive window.
    Windows16MiB,
    /// Defaults, but the client offers ChaCha20-Poly1305 first, so the
    /// session is sealed with natter's cipher rather than AES-GCM (which
    /// rustls prefers, and which is much cheaper with AES-NI).
    ChaCha,
    /// ChaCha20-Poly1305, 1200-byte datagrams (no MTU discovery) and no
    /// GSO, one datagram per send as natter does: tells the protocol's and
    /// the cipher implementation's cost apart from the socket batching.
    Natterlike,
}

impl QuinnVariant {
    fn transport(self) -> TransportConfig {
        let mut transport = TransportConfig::default();
        match self {
            Self::Defaults => {}
            Self::Windows16MiB => {
                transport
                    .stream_receive_window(VarInt::from_u32(NATTER_WINDOW))
                    .receive_window(VarInt::from_u32(NATTER_WINDOW))
                    .send_window(NATTER_WINDOW.into());
            }
            Self::ChaCha => {}
            Self::Natterlike => {
                transport
                    .initial_mtu(1200)
                    .mtu_discovery_config(None)
                    .enable_segmentation_offload(false);
            }
        }
        transport
    }

    /// The client's cipher suites, in its order of preference; the rustls
    /// server follows the client's order by default.
    fn cipher_suites(self) -> Vec<rustls::SupportedCipherSuite> {
        use rustls::crypto::ring::cipher_suite;
        match self {
            Self::Defaults | Self::Windows16MiB => {
                rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec()
            }
            // AES-128-GCM stays on the list: QUIC's Initial packets are
            // always sealed with it, and quinn looks for it.
            Self::ChaCha | Self::Natterlike => vec![
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                cipher_suite::TLS13_AES_128_GCM_SHA256,
            ],
        }
    }
}

/// A server and a client endpoint on 127.0.0.1, TLS with a self-signed
/// certificate the client trusts, one unidirectional stream.
async fn quinn_run(variant: QuinnVariant) -> Sample {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed certificate");
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let transport = Arc::new(variant.transport());

    let mut server_config =
        ServerConfig::with_single_cert(vec![cert.clone()], key).expect("server TLS config");
    server_config.transport_config(transport.clone());
    let server =
        Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).expect("server endpoint");
    let server_addr: SocketAddr = server.local_addr().expect("server address");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("certificate is valid");
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: variant.cipher_suites(),
        ..rustls::crypto::ring::default_provider()
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with ring")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client_config =
        ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("QUIC TLS")));
    client_config.transport_config(transport);
    let mut client = Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    client.set_default_client_config(client_config);

    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            let connection = server
                .accept()
                .await
                .expect("an incoming connection")
                .await
                .expect("server handshake");
            let stream = connection.accept_uni().await.expect("a stream");
            (connection, stream)
        }
    });
    let connection = client
        .connect(server_addr, "localhost")
        .expect("connect starts")
        .await
        .expect("client handshake");
    let mut send = connection.open_uni().await.expect("open stream");

    let mark = Mark::now();
    let sender = tokio::spawn(async move {
        let chunk = vec![0x5au8; WRITE_SIZE];
        let mut sent = 0;
        while sent < TOTAL {
            send.write_all(&chunk).await.expect("quinn write");
            sent += WRITE_SIZE as u64;
        }
        send.finish().expect("quinn finish");
        // Like natter's shutdown: done once the peer has it all.
        let _ = send.stopped().await;
    });
    // The server learns of the stream only from its first bytes, so the
    // accept is awaited after the writes began.
    let (server_connection, mut recv) = accept.await.expect("accept task");
    let mut sample = tokio::time::timeout(RUN_LIMIT, async {
        let mut buf = vec![0u8; WRITE_SIZE];
        let mut delivered = 0;
        loop {
            match recv.read(&mut buf).await.expect("quinn read") {
                None => break mark.finish(delivered),
                Some(n) => delivered += n as u64,
            }
        }
    })
    .await
    .expect("quinn transfer finishes within the run limit");
    assert_eq!(sample.delivered, TOTAL, "quinn delivered everything");
    sender.await.expect("sender task");
    let stats = connection.stats();
    sample.quinn = Some(QuinnCounts {
        udp_bytes: stats.udp_tx.bytes + stats.udp_rx.bytes,
        sent_packets: stats.path.sent_packets,
        lost_packets: stats.path.lost_packets,
        mtu: stats.path.current_mtu,
    });
    connection.close(0u32.into(), b"done");
    server_connection.close(0u32.into(), b"done");
    client.wait_idle().await;
    server.wait_idle().await;
    sample
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stack {
    Natter,
    Quinn(QuinnVariant),
}

impl Stack {
    fn label(self) -> &'static str {
        match self {
            Self::Natter => "natter (defaults)",
            Self::Quinn(QuinnVariant::Defaults) => "quinn (defaults)",
            Self::Quinn(QuinnVariant::Windows16MiB) => "quinn (16 MiB windows)",
            Self::Quinn(QuinnVariant::ChaCha) => "quinn (ChaCha20)",
            Self::Quinn(QuinnVariant::Natterlike) => "quinn (ChaCha20, 1200 B, no GSO)",
        }
    }

    async fn run(self) -> Sample {
        match self {
            Self::Natter => natter_run().await,
            Self::Quinn(variant) => quinn_run(variant).await,
        }
    }
}

/// Median, min and max of a figure over the runs.
fn spread(samples: &[Sample], figure: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let mut values: Vec<f64> = samples.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn main() {
    // Two workers: this machine's cores, and the same runtime for both
    // stacks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // `cargo bench --bench loopback -- natter` runs only the stacks whose
    // label contains a given word (for profiling one); cargo's own `--bench`
    // flag is ignored.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let stacks: Vec<Stack> = [
        Stack::Natter,
        Stack::Quinn(QuinnVariant::Defaults),
        Stack::Quinn(QuinnVariant::Windows16MiB),
        Stack::Quinn(QuinnVariant::ChaCha),
        Stack::Quinn(QuinnVariant::Natterlike),
    ]
    .into_iter()
    .filter(|stack| {
        filters.is_empty() || filters.iter().any(|f| stack.label().contains(f.as_str()))
    })
    .collect();
    assert!(!stacks.is_empty(), "no stack matches {filters:?}");
    println!(
        "loopback benchmark: {} MiB one way over 127.0.0.1 in {} KiB writes, encrypted, \
         {RUNS} runs each (interleaved), tokio multi-thread runtime with 2 workers",
        TOTAL / MIB,
        WRITE_SIZE / 1024
    );
    println!(
        "  natter: in-process rendezvous, two peers, SessionSender (AsyncWrite) -> \
         SessionReceiver (AsyncRead), default LinkConfig"
    );
    println!(
        "  quinn {} (quinn-proto {}, quinn-udp {}): one unidirectional stream, TLS 1.3 \
         (rustls {}, ring; AES-256-GCM unless labelled ChaCha20), self-signed certificate; \
         TransportConfig::default() unless labelled",
        locked_version("quinn"),
        locked_version("quinn-proto"),
        locked_version("quinn-udp"),
        locked_version("rustls")
    );
    println!(
        "  clock: first write to the receiver seeing end-of-stream; CPU: getrusage, \
         whole process (both ends, all threads)"
    );
    println!(
        "  wire/byte: UDP payload bytes, both directions, per byte delivered, \
         from the lo interface counters (includes any other loopback traffic); rcvbuf drops: \
         UDP datagrams dropped at full socket receive buffers (/proc/net/snmp RcvbufErrors)"
    );
    println!();

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); stacks.len()];
    for run in 0..RUNS {
        for (index, stack) in stacks.iter().enumerate() {
            let sample = runtime.block_on(stack.run());
            let own = sample.quinn.map_or(String::new(), |q| {
                format!(
                    "  (quinn's count: wire/byte {:.4}, {} of {} packets lost, MTU {})",
                    q.udp_bytes as f64 / sample.delivered as f64,
                    q.lost_packets,
                    q.sent_packets,
                    q.mtu
                )
            });
            println!(
                "  run {} {:<32} {:>7.1} MiB/s  {:>6.2} s  CPU {:>5.2} ms/MiB  wire/byte {}  \
                 rcvbuf drops {}{own}",
                run + 1,
                stack.label(),
                sample.goodput(),
                sample.wall.as_secs_f64(),
                sample.cpu_ms_per_mib(),
                sample
                    .wire_per_byte()
                    .map_or("n/a".into(), |w| format!("{w:.4}")),
                sample.drops.map_or("n/a".into(), |d| d.to_string()),
            );
            samples[index].push(sample);
        }
    }
    println!();

    // Ratios need natter's figures; NaN when it was filtered out.
    let natter_runs = stacks
        .iter()
        .position(|s| *s == Stack::Natter)
        .map(|i| samples[i].as_slice());
    let natter_goodput = natter_runs.map_or(f64::NAN, |r| spread(r, Sample::goodput).0);
    let natter_cpu = natter_runs.map_or(f64::NAN, |r| spread(r, Sample::cpu_ms_per_mib).0);
    println!(
        "  {:<32} {:>24}  {:>20}  {:>9}  {:>19}  {:>15}",
        format!("median of {RUNS} [min..max]"),
        "goodput MiB/s",
        "CPU ms/MiB",
        "wire/byte",
        "natter/this goodput",
        "natter/this CPU"
    );
    for (stack, runs) in stacks.iter().zip(&samples) {
        let (goodput, goodput_min, goodput_max) = spread(runs, Sample::goodput);
        let (cpu, cpu_min, cpu_max) = spread(runs, Sample::cpu_ms_per_mib);
        let wire = if runs.iter().all(|s| s.wire.is_some()) {
            format!(
                "{:.4}",
                spread(runs, |s| s.wire_per_byte().unwrap_or(f64::NAN)).0
            )
        } else {
            "n/a".into()
        };
        println!(
            "  {:<32} {:>7.1} [{:>6.1}..{:>6.1}]  {:>5.2} [{:>5.2}..{:>5.2}]  {:>9}  {:>19.2}  {:>15.2}",
            stack.label(),
            goodput,
            goodput_min,
            goodput_max,
            cpu,
            cpu_min,
            cpu_max,
            wire,
            natter_goodput / goodput,
            natter_cpu / cpu,
        );
    }
}

/// The version Cargo.lock resolved for `package`, so the printout says what
/// was measured.
fn locked_version(package: &str) -> &'static str {
    const LOCK: &str = include_str!("../Cargo.lock");
    let entry = format!("name = \"{package}\"\nversion = \"");
    LOCK.split_once(entry.as_str())
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("?", |(version, _)| version)
}
