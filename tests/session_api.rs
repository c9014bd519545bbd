//! The library API end to end on loopback: `Peer::builder` to a connected,
//! encrypted `Session`, and its byte-stream halves.

use std::time::Duration;

use natter::code::PairingCode;
use natter::session::{Error, Peer, Session};
use natter_rendezvous::{driver, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn pair() -> (Session, Session, driver::RunningServer) {
    let server = driver::start(&["127.0.0.1:0".parse().unwrap()], Config::default()).unwrap();
    let rendezvous = server.local_addrs[0].to_string();
    let code: PairingCode = format!("{}-stream-test", rand::random::<u16>() % 999 + 1)
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
    .unwrap();
    (a, b, server)
}

#[tokio::test]
async fn byte_streams_carry_data_and_end_of_stream() {
    let (a, b, server) = pair().await;
    assert_ne!(
        a.path().remote_key,
        b.path().remote_key,
        "each sees the other's key"
    );
    let (mut writer, _a_reader) = a.split();
    let (_b_writer, mut reader) = b.split();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let write = async move {
        writer.write_all(&sent).await.unwrap();
        // Completes only once the peer has everything.
        writer.shutdown().await.unwrap();
    };
    let read = async move {
        let mut received = Vec::new();
        reader.read_to_end(&mut received).await.unwrap();
        received
    };
    let ((), received) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .expect("stream finishes within 20 s");
    assert_eq!(received, data);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused_and_closed_sessions_say_why() {
    let (a, mut b, server) = pair().await;
    let too_big = vec![0u8; 16 * 1024 * 1024];
    assert!(matches!(
        a.send(&too_big).await,
        Err(Error::TooLarge { .. })
    ));
    a.send(b"still fine").await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), a.close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, natter::error::CloseReason::Local);
    assert_eq!(
        b.recv().await.unwrap(),
        natter::Received::Data(b"still fine".to_vec())
    );
    let closed = b.recv().await;
    assert!(
        matches!(
            &closed,
            Err(Error::Closed(natter::error::CloseReason::Peer))
        ),
        "{closed:?}"
    );
    assert!(matches!(b.recv().await, Err(Error::Closed(_))));
    server.shutdown().await.unwrap();
}
