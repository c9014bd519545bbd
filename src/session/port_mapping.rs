//! A port mapping for the session's socket at the gateway (UPnP-IGD, PCP or
//! NAT-PMP), through n0's `portmapper`: it finds the gateway, asks with
//! whichever protocol answers, renews the mapping before it lapses, and
//! releases it when asked. A mapping turns a NAT that maps each destination
//! anew into one the other peer can reach at a known address.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

/// How long leaving waits for the mapping's release to be sent: a probe
/// of the gateway's protocols at most (a UPnP search gives up after 1 s).
const RELEASE_WAIT: Duration = Duration::from_secs(2);

type ProbeResult = Result<portmapper::ProbeOutput, portmapper::ProbeError>;

pub(super) struct PortMapping {
    client: portmapper::Client,
    port: NonZeroU16,
    /// Which protocols the gateway speaks, until the answer is in: the
    /// client asks with the first protocol found (PCP, NAT-PMP, UPnP), and
    /// only UPnP when it has not looked.
    probe: Option<oneshot::Receiver<ProbeResult>>,
    external: watch::Receiver<Option<std::net::SocketAddrV4>>,
}

impl PortMapping {
    /// Starts asking the gateway which protocols it speaks; a mapping of
    /// `local_port` is asked for once that is known.
    pub fn start(local_port: u16) -> Option<Self> {
        let port = NonZeroU16::new(local_port)?;
        let client = portmapper::Client::new(portmapper::Config::default());
        let external = client.watch_external_address();
        let probe = Some(client.probe());
        Some(Self {
            client,
            port,
            probe,
            external,
        })
    }

    /// The mapped address once it changes (appears, moves or lapses).
    /// Cancel-safe: the driver polls it in a `select!`.
    pub async fn changed(&mut self) -> Option<SocketAddr> {
        if let Some(probe) = &mut self.probe {
            if let Ok(Ok(found)) = probe.await {
                tracing::debug!(%found, "port mapping protocols");
            }
            self.probe = None;
            self.client.update_local_port(self.port);
        }
        if self.external.changed().await.is_err() {
            // The service ended: no mapping from here on.
            std::future::pending::<()>().await;
        }
        (*self.external.borrow_and_update()).map(SocketAddr::V4)
    }

    /// Deletes the mapping at the gateway before returning.
    pub async fn release(self) {
        if self.external.borrow().is_none() {
            return;
        }
        release(&self.client).await;
    }
}

/// Asks `client`'s service to release its mapping, and waits until it has:
/// the service shows the mapping gone before it sends the release, but it
/// handles requests in order, so the answer to a probe asked for after the
/// release comes only once the release is sent.
pub async fn release(client: &portmapper::Client) {
    client.deactivate();
    let sent = client.probe();
    if tokio::time::timeout(RELEASE_WAIT, sent).await.is_err() {
        tracing::debug!("the port mapping's release took too long");
    }
}
