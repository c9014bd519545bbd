//! quinn-proto (quinn's sans-IO QUIC) driven through the same simulated
//! links as natter's channel, so that the benchmark compares the two on one
//! path model in one run. One unidirectional stream carries `total` bytes
//! from the client to the server; the figure is virtual time from the
//! client's handshake completing (natter's simulated channel has none) to
//! the server's application holding every byte.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::congestion::{BbrConfig, CubicConfig};
use quinn_proto::crypto::rustls::QuicClientConfig;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, ServerConfig, StreamId, TransportConfig, WriteError,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::netsim::{Link, LinkParams, UDP_IP_OVERHEAD};

const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Cubic,
    Bbr,
}

/// The client's side of the transfer: its stream and how much it wrote.
enum Upload {
    NotOpen,
    Writing { stream: StreamId, written: u64 },
    Finished,
}

/// What one transfer took.
pub struct QuicTransfer {
    /// Virtual time from the handshake's end to the last byte's arrival.
    pub time: Duration,
    /// The client's datagrams on the bottleneck, with UDP/IP headers.
    pub wire_bytes: u64,
    /// Packets the client declared lost.
    pub lost_packets: u64,
}

/// Sends `total` bytes through `a_to_b` (acknowledgements come back through
/// `b_to_a`) with quinn's `controller`. `seed` picks the links' random
/// losses, as natter's benchmark does.
pub fn bulk(
    a_to_b: LinkParams,
    b_to_a: LinkParams,
    total: u64,
    controller: Controller,
    seed: u64,
) -> QuicTransfer {
    let start = Instant::now();
    let (server_config, client_config) = configs(controller);
    let client_addr = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 4433));
    let server_addr = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 4433));
    let endpoint_config = Arc::new(EndpointConfig::default());
    let mut client = Endpoint::new(Arc::clone(&endpoint_config), None, true, Some([1; 32]));
    let mut server = Endpoint::new(endpoint_config, Some(server_config), true, Some([2; 32]));
    let (a_handle, mut a) = client
        .connect(start, client_config, server_addr, "sim")
        .expect("the client config is valid");
    let mut b: Option<(ConnectionHandle, Connection)> = None;
    let mut forth = Link::new(a_to_b, 0xa + 2 * seed);
    let mut back = Link::new(b_to_a, 0xb + 2 * seed);
    let mut now = start;
    let mut upload = Upload::NotOpen;
    let mut download = None;
    let mut delivered = 0u64;
    let mut connected_at = None;
    let chunk = vec![0x5a; CHUNK];
    let mut buf = Vec::new();
    while delivered < total {
        while let Some(event) = a.poll() {
            if matches!(event, Event::Connected) {
                connected_at = Some(now);
            }
        }
        if connected_at.is_some() {
            upload = write(&mut a, upload, &chunk, total);
        }
        if let Some((_, conn)) = &mut b {
            while conn.poll().is_some() {}
            delivered += read(conn, &mut download);
        }
        transmit(&mut a, now, &mut forth, &mut buf);
        if let Some((_, conn)) = &mut b {
            transmit(conn, now, &mut back, &mut buf);
        }
        while let Some(event) = a.poll_endpoint_events() {
            if let Some(event) = client.handle_event(a_handle, event) {
                a.handle_event(event);
            }
        }
        if let Some((handle, conn)) = &mut b {
            while let Some(event) = conn.poll_endpoint_events() {
                if let Some(event) = server.handle_event(*handle, event) {
                    conn.handle_event(event);
                }
            }
        }
        let next = [
            forth.next_arrival(),
            back.next_arrival(),
            a.poll_timeout(),
            b.as_mut().and_then(|(_, conn)| conn.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("a transfer in progress has timers");
        assert!(next - start < Duration::from_secs(3600), "quinn stalled");
        now = now.max(next);
        while let Some(datagram) = forth.pop_arrived(now) {
            let data = BytesMut::from(&datagram[..]);
            buf.clear();
            match server.handle(now, client_addr, None, None, data, &mut buf) {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    let accepted = server.accept(incoming, now, &mut buf, None);
                    b = Some(accepted.expect("the server accepts its one client"));
                }
                Some(DatagramEvent::ConnectionEvent(_, event)) => {
                    if let Some((_, conn)) = &mut b {
                        conn.handle_event(event);
                    }
                }
                Some(DatagramEvent::Response(response)) => {
                    back.send_sized(now, buf[..response.size].to_vec(), UDP_IP_OVERHEAD)
                }
                None => {}
            }
        }
        while let Some(datagram) = back.pop_arrived(now) {
            let data = BytesMut::from(&datagram[..]);
            buf.clear();
            match client.handle(now, server_addr, None, None, data, &mut buf) {
                Some(DatagramEvent::ConnectionEvent(_, event)) => a.handle_event(event),
                Some(DatagramEvent::Response(response)) => {
                    forth.send_sized(now, buf[..response.size].to_vec(), UDP_IP_OVERHEAD)
                }
                Some(DatagramEvent::NewConnection(_)) | None => {}
            }
        }
        if a.poll_timeout().is_some_and(|t| t <= now) {
            a.handle_timeout(now);
        }
        if let Some((_, conn)) = &mut b {
            if conn.poll_timeout().is_some_and(|t| t <= now) {
                conn.handle_timeout(now);
            }
        }
    }
    let stats = a.stats();
    QuicTransfer {
        time: now - connected_at.expect("the data went after the handshake"),
        wire_bytes: stats.udp_tx.bytes + stats.udp_tx.datagrams * UDP_IP_OVERHEAD as u64,
        lost_packets: stats.path.lost_packets,
    }
}

/// Writes as much of the upload as the stream takes, opening it first and
/// finishing it after the last byte.
fn write(conn: &mut Connection, upload: Upload, chunk: &[u8], total: u64) -> Upload {
    let (stream, mut written) = match upload {
        Upload::NotOpen => match conn.streams().open(Dir::Uni) {
            Some(stream) => (stream, 0),
            None => return Upload::NotOpen,
        },
        Upload::Writing { stream, written } => (stream, written),
        Upload::Finished => return Upload::Finished,
    };
    while written < total {
        let len = (total - written).min(chunk.len() as u64) as usize;
        match conn.send_stream(stream).write(&chunk[..len]) {
            Ok(n) => written += n as u64,
            Err(WriteError::Blocked) => return Upload::Writing { stream, written },
            Err(error) => panic!("quinn stream write: {error}"),
        }
    }
    conn.send_stream(stream)
        .finish()
        .expect("the stream is open");
    Upload::Finished
}

/// Reads what arrived on the client's stream (accepting it first);
/// returns the byte count.
fn read(conn: &mut Connection, stream: &mut Option<StreamId>) -> u64 {
    if stream.is_none() {
        *stream = conn.streams().accept(Dir::Uni);
    }
    let Some(id) = *stream else {
        return 0;
    };
    let mut recv = conn.recv_stream(id);
    let Ok(mut chunks) = recv.read(true) else {
        return 0;
    };
    let mut read = 0;
    while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
        read += chunk.bytes.len() as u64;
    }
    // Whether to send flow-control credit now: every round polls anyway.
    let _ = chunks.finalize();
    read
}

fn transmit(conn: &mut Connection, now: Instant, link: &mut Link, buf: &mut Vec<u8>) {
    loop {
        buf.clear();
        let Some(transmit) = conn.poll_transmit(now, 1, buf) else {
            return;
        };
        link.send_sized(now, buf[..transmit.size].to_vec(), UDP_IP_OVERHEAD);
    }
}

/// A self-signed server and a client that trusts it, both with
/// `controller`.
fn configs(controller: Controller) -> (Arc<ServerConfig>, ClientConfig) {
    let mut transport = TransportConfig::default();
    match controller {
        Controller::Cubic => {
            transport.congestion_controller_factory(Arc::new(CubicConfig::default()))
        }
        Controller::Bbr => transport.congestion_controller_factory(Arc::new(BbrConfig::default())),
    };
    let transport = Arc::new(transport);
    let certified = rcgen::generate_simple_self_signed(vec!["sim".to_string()])
        .expect("rcgen makes a certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut server = ServerConfig::with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("the certificate is valid");
    server.transport_config(Arc::clone(&transport));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certified.cert.der().clone())
        .expect("the certificate is valid");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("ring does TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut client = ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("TLS 1.3 with an initial suite"),
    ));
    client.transport_config(transport);
    (Arc::new(server), client)
}
