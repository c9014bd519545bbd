//! `natter stun`: ask a STUN server for this machine's external address.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use natter::wire::stun;
use tokio::net::UdpSocket;

pub async fn query(server: &str, timeout: Duration) -> Result<SocketAddr> {
    let server: SocketAddr = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).await?;
    let transaction = stun::TransactionId::random();
    let request = stun::binding_request(transaction);
    let mut buf = [0u8; 1500];
    let deadline = tokio::time::Instant::now() + timeout;
    // Retransmit on RFC 8489's schedule (500 ms, doubling) until the deadline.
    let mut retransmit = Duration::from_millis(500);
    loop {
        socket.send_to(&request, server).await?;
        let wait = tokio::time::Instant::now() + retransmit;
        loop {
            let until = wait.min(deadline);
            match tokio::time::timeout_at(until, socket.recv_from(&mut buf)).await {
                Ok(received) => {
                    let (len, from) = received?;
                    if from != server {
                        continue;
                    }
                    if let Ok(stun::Message::BindingSuccess {
                        transaction: t,
                        mapped,
                        ..
                    }) = stun::parse(&buf[..len])
                    {
                        if t == transaction {
                            return Ok(mapped);
                        }
                    }
                }
                Err(_) if until == deadline => {
                    bail!(
                        "no STUN answer from {server} within {} ms",
                        timeout.as_millis()
                    )
                }
                Err(_) => break,
            }
        }
        retransmit *= 2;
    }
}
