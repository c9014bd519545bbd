//! The rendezvous on real loopback sockets: two peers meet, and independent
//! STUN clients learn their mapped address from it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::register;
use natter_rendezvous::{driver, Config};
use natter_wire::{Role, ServerMessage};
use tokio::net::UdpSocket;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

async fn recv_message(socket: &UdpSocket) -> ServerMessage {
    let mut buf = [0u8; 2048];
    let (len, _) = timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("no reply from the rendezvous within 5 s")
        .unwrap();
    ServerMessage::decode(&buf[..len]).unwrap()
}

#[tokio::test]
async fn two_peers_are_introduced_with_their_observed_addresses() {
    let server = driver::start(&["127.0.0.1:0".parse().unwrap()], Config::default()).unwrap();
    let rendezvous = server.local_addrs[0];
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    a.send_to(&register("loopback-room"), rendezvous)
        .await
        .unwrap();
    let ServerMessage::Registered { reflexive, .. } = recv_message(&a).await else {
        panic!("expected Registered");
    };
    assert_eq!(reflexive, a.local_addr().unwrap());

    b.send_to(&register("loopback-room"), rendezvous)
        .await
        .unwrap();
    assert!(matches!(
        recv_message(&b).await,
        ServerMessage::Registered { .. }
    ));
    let introduced = |message: ServerMessage| match message {
        ServerMessage::Introduce {
            session_id,
            your_role,
            other_reflexive,
            ..
        } => (session_id, your_role, other_reflexive),
        other => panic!("expected Introduce, got {other:?}"),
    };
    let (session_a, role_a, other_of_a) = introduced(recv_message(&a).await);
    let (session_b, role_b, other_of_b) = introduced(recv_message(&b).await);
    assert_eq!(session_a, session_b);
    assert_eq!((role_a, role_b), (Role::Controlling, Role::Controlled));
    assert_eq!(other_of_a, b.local_addr().unwrap());
    assert_eq!(other_of_b, a.local_addr().unwrap());

    let stats = server.shutdown().await.unwrap();
    assert_eq!(stats.introductions, 1);
}

#[tokio::test]
async fn dual_stack_socket_reports_canonical_ipv4_addresses() {
    let Ok(server) = driver::start(&["[::]:0".parse().unwrap()], Config::default()) else {
        eprintln!("skipped: this machine cannot bind [::]");
        return;
    };
    let port = server.local_addrs[0].port();
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a.send_to(
        &register("v4-over-v6"),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await
    .unwrap();
    let ServerMessage::Registered { reflexive, .. } = recv_message(&a).await else {
        panic!("expected Registered");
    };
    assert_eq!(reflexive, a.local_addr().unwrap());
    server.shutdown().await.unwrap();
}

/// An independent STUN implementation (the `stun-client` crate, on
/// async-std) learns its mapped address from the rendezvous.
#[tokio::test]
async fn stun_client_crate_gets_its_mapped_address() {
    let server = driver::start(&["127.0.0.1:0".parse().unwrap()], Config::default()).unwrap();
    let rendezvous = server.local_addrs[0];
    let (local, mapped) = tokio::task::spawn_blocking(move || {
        async_std::task::block_on(async move {
            let socket = async_std::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .unwrap();
            let local = socket.local_addr().unwrap();
            let mut client = stun_client::Client::from_socket(std::sync::Arc::new(socket), None);
            let response =
                async_std::future::timeout(WAIT, client.binding_request(rendezvous, None))
                    .await
                    .expect("stun-client got no answer within 5 s")
                    .expect("stun-client failed");
            assert_eq!(response.get_class(), stun_client::Class::SuccessResponse);
            (
                local,
                stun_client::Attribute::get_xor_mapped_address(&response),
            )
        })
    })
    .await
    .unwrap();
    assert_eq!(mapped, Some(local));
    assert_eq!(server.shutdown().await.unwrap().stun_responses, 1);
}

/// coturn's `turnutils_stunclient`, a C implementation, learns its mapped
/// address too. Skipped when it is not installed, unless
/// `NATTER_REQUIRE_TURNUTILS=1` (set by CI, which installs coturn).
#[tokio::test]
async fn coturn_stun_client_gets_its_mapped_address() {
    let Ok(path) = which("turnutils_stunclient") else {
        assert!(
            std::env::var("NATTER_REQUIRE_TURNUTILS").as_deref() != Ok("1"),
            "turnutils_stunclient (Debian package coturn) is required but not installed"
        );
        eprintln!("skipped: turnutils_stunclient not installed (apt-get install coturn)");
        return;
    };
    let server = driver::start(&["127.0.0.1:0".parse().unwrap()], Config::default()).unwrap();
    let port = server.local_addrs[0].port().to_string();
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(path)
            .args(["-p", &port, "127.0.0.1"])
            .output(),
    )
    .await
    .expect("turnutils_stunclient finished within 5 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("UDP reflexive addr: 127.0.0.1:"),
        "unexpected output: {stdout}"
    );
    assert!(server.shutdown().await.unwrap().stun_responses >= 1);
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or(())
}

/// A log written to a pipe or a file (not a terminal) carries no colour
/// codes: log collectors show them as garbage.
#[test]
fn a_log_that_is_not_a_terminal_has_no_colour_codes() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_natter-rendezvous"))
        .args(["--bind", "127.0.0.1:0", "--stats-secs", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).split(b'\n') {
            let _ = lines.send(line);
        }
    });
    let line = received
        .recv_timeout(WAIT)
        .expect("a log line within 5 s")
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&line);
    assert!(text.contains("listening"), "{text}");
    assert!(!line.contains(&0x1b), "colour codes in {text:?}");
}
