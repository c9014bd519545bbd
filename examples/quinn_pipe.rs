//! quinn over the NAT lab, for `scripts/natlab-goodput.sh`: the same one-way
//! transfer natter's `pipe` makes, with quinn 0.11 on its defaults (one
//! bidirectional stream, TLS 1.3 with a self-signed certificate), so the two
//! are compared on the same path in the same run.
//!
//! ```text
//! quinn_pipe serve --stun RV:7777 --cert FILE --cc bbr
//!     prints {"reflexive": "IP:PORT"} once its NAT mapping is open, takes one
//!     connection and one stream, and answers the byte count at its end
//! quinn_pipe send --server IP:PORT --cert FILE --bytes N --cc bbr
//!     prints {"cc", "bytes", "elapsed_ms", ...}: from the connection being
//!     up to the server confirming the count
//! ```
//!
//! `serve` learns its reflexive address with a STUN request to the natter
//! rendezvous from the socket quinn then uses; behind a full-cone NAT that
//! request also opens the mapping the client's packets come through.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natter_wire::stun;
use quinn::congestion::{BbrConfig, CubicConfig};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Endpoint, EndpointConfig, ServerConfig, TokioRuntime, TransportConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const CHUNK: usize = 64 * 1024;

fn usage() -> ! {
    eprintln!(
        "usage: quinn_pipe serve --stun ADDR --cert FILE --cc bbr|cubic\n       \
         quinn_pipe send --server ADDR --cert FILE --bytes N --cc bbr|cubic"
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

fn transport(cc: &str) -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    match cc {
        "bbr" => transport.congestion_controller_factory(Arc::new(BbrConfig::default())),
        "cubic" => transport.congestion_controller_factory(Arc::new(CubicConfig::default())),
        _ => usage(),
    };
    Arc::new(transport)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args).await,
        Some("send") => send(&args).await,
        _ => usage(),
    }
}

/// Sends a STUN Binding request from `socket` until answered; returns the
/// mapped address.
fn reflexive(socket: &UdpSocket, server: SocketAddr) -> SocketAddr {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..25 {
        let request = stun::binding_request(stun::TransactionId::random());
        socket.send_to(&request, server).unwrap();
        if let Ok((len, _)) = socket.recv_from(&mut buf) {
            if let Ok(stun::Message::BindingSuccess { mapped, .. }) = stun::parse(&buf[..len]) {
                return mapped;
            }
        }
    }
    panic!("no STUN answer from {server}");
}

async fn serve(args: &[String]) {
    let stun_server: SocketAddr = arg(args, "--stun").parse().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["natlab".to_string()]).unwrap();
    std::fs::write(arg(args, "--cert"), certified.cert.der()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut config =
        ServerConfig::with_single_cert(vec![certified.cert.der().clone()], key).unwrap();
    config.transport_config(transport(&arg(args, "--cc")));

    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    let mapped = reflexive(&socket, stun_server);
    socket.set_read_timeout(None).unwrap();
    println!("{{\"reflexive\": \"{mapped}\"}}");
    let endpoint = Endpoint::new(
        EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(TokioRuntime),
    )
    .unwrap();
    let connection = endpoint.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = connection.accept_bi().await.unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    while let Some(n) = recv.read(&mut buf).await.unwrap() {
        total += n as u64;
    }
    send.write_all(&total.to_be_bytes()).await.unwrap();
    send.finish().unwrap();
    connection.closed().await;
}

async fn send(args: &[String]) {
    let server: SocketAddr = arg(args, "--server").parse().unwrap();
    let bytes: u64 = arg(args, "--bytes").parse().unwrap();
    let cc = arg(args, "--cc");
    let cert = CertificateDer::from(std::fs::read(arg(args, "--cert")).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    config.transport_config(transport(&cc));
    let mut endpoint = Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);

    let connection = endpoint.connect(server, "natlab").unwrap().await.unwrap();
    let started = Instant::now();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let chunk = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        send.write_all(&chunk[..n]).await.unwrap();
        left -= n as u64;
    }
    send.finish().unwrap();
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(u64::from_be_bytes(count), bytes, "the server's count");
    let stats = connection.stats();
    println!(
        "{{\"cc\": \"{cc}\", \"bytes\": {bytes}, \"elapsed_ms\": {}, \"sent_packets\": {}, \"lost_packets\": {}, \"mtu\": {}}}",
        elapsed.as_millis(),
        stats.path.sent_packets,
        stats.path.lost_packets,
        stats.path.current_mtu
    );
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}
