//! `natter netcheck`: how this host's NAT behaves, asked of the rendezvous.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use natter::netcheck::{Allocation, Filtering, Mapping, NatReport, Probe, ProbeKind};
use tokio::net::UdpSocket;
use tokio::time::Instant;

pub async fn run(rendezvous: &str, json: bool) -> Result<()> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(rendezvous)
        .await
        .with_context(|| format!("cannot resolve {rendezvous}"))?
        .collect();
    let first = |v4: bool| addrs.iter().copied().find(|a| a.is_ipv4() == v4);
    let families = [("ipv4", first(true)), ("ipv6", first(false))];
    let mut results = Vec::new();
    for (family, server) in families {
        let result = match server {
            Some(server) => check(server).await.map(Some),
            None => Ok(None),
        };
        results.push((family, server, result));
    }
    // Not for a rendezvous on this machine: there is no gateway to ask.
    let port_mapping = match addrs.first() {
        Some(addr) if !addr.ip().is_loopback() => Some(check_port_mapping().await?),
        _ => None,
    };
    if json {
        let mut object = serde_json::Map::new();
        for (family, _, result) in &results {
            let value = match result {
                Ok(Some(report)) => serde_json::to_value(report)?,
                Ok(None) => serde_json::Value::Null,
                Err(error) => serde_json::json!({ "error": format!("{error:#}") }),
            };
            object.insert((*family).to_owned(), value);
        }
        object.insert(
            "port_mapping".to_owned(),
            serde_json::to_value(&port_mapping)?,
        );
        println!("{}", serde_json::Value::Object(object));
    } else {
        for (family, server, result) in &results {
            print_family(family, *server, result);
        }
        print_port_mapping(port_mapping.as_ref());
    }
    let answered = results
        .iter()
        .any(|(_, _, r)| matches!(r, Ok(Some(report)) if report.reflexive.is_some()));
    if !answered {
        bail!(
            "the rendezvous {rendezvous} did not answer STUN within {} ms",
            natter::netcheck::GIVE_UP.as_millis()
        );
    }
    Ok(())
}

/// What the gateway offers for port mapping.
#[derive(Debug, serde::Serialize)]
struct PortMappingReport {
    upnp: bool,
    pcp: bool,
    nat_pmp: bool,
    /// The public address a test mapping got (released again at once).
    mapped: Option<SocketAddr>,
}

/// How long a test mapping may take to appear.
const MAPPING_WAIT: Duration = Duration::from_secs(3);

/// Asks the gateway which port mapping protocols it speaks, and for a
/// mapping of a fresh socket's port, which it releases again.
async fn check_port_mapping() -> Result<PortMappingReport> {
    let client = portmapper::Client::new(portmapper::Config::default());
    let probe = client
        .probe()
        .await
        .context("the port mapping service stopped")?;
    let (upnp, pcp, nat_pmp) = match probe {
        Ok(found) => (found.upnp, found.pcp, found.nat_pmp),
        Err(error) => {
            tracing::debug!(%error, "port mapping probe");
            (false, false, false)
        }
    };
    let mut mapped = None;
    if upnp || pcp || nat_pmp {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        let port = std::num::NonZeroU16::new(socket.local_addr()?.port())
            .context("the system gave the socket port 0")?;
        let mut external = client.watch_external_address();
        client.update_local_port(port);
        if let Ok(Ok(addr)) =
            tokio::time::timeout(MAPPING_WAIT, external.wait_for(Option::is_some)).await
        {
            mapped = addr.map(SocketAddr::V4);
        }
        natter::session::release_port_mapping(&client).await;
    }
    Ok(PortMappingReport {
        upnp,
        pcp,
        nat_pmp,
        mapped,
    })
}

fn print_port_mapping(report: Option<&PortMappingReport>) {
    println!("Port mapping");
    let Some(report) = report else {
        return println!("  not checked: the rendezvous is on this machine\n");
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "  {:<18} UPnP-IGD {}, PCP {}, NAT-PMP {}",
        "gateway speaks",
        yes_no(report.upnp),
        yes_no(report.pcp),
        yes_no(report.nat_pmp)
    );
    let mapped = report.mapped.map_or("none".to_owned(), |m| {
        format!("{m} (a test mapping, released)")
    });
    println!("  {:<18} {mapped}\n", "mapped address");
}

/// Runs a mapping probe and a filtering probe, each on a fresh socket,
/// against `server`.
async fn check(server: SocketAddr) -> Result<NatReport> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mapping_socket = UdpSocket::bind(bind).await?;
    let filtering_socket = UdpSocket::bind(bind).await?;
    let now = Instant::now().into_std();
    let (mapping, filtering) = tokio::try_join!(
        drive(
            &mapping_socket,
            Probe::new(now, ProbeKind::Mapping { hairpin: true }, server)
        ),
        drive(
            &filtering_socket,
            Probe::new(now, ProbeKind::Filtering, server)
        ),
    )
    .with_context(|| format!("cannot reach {server}"))?;
    let local_ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|ifs| ifs.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default();
    let local = mapping_socket.local_addr()?;
    Ok(NatReport::new(&mapping, &filtering, local, &local_ips))
}

/// Runs `probe` on `socket` until it is done.
async fn drive(socket: &UdpSocket, mut probe: Probe) -> std::io::Result<Probe> {
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now().into_std();
        probe.handle_timeout(now);
        while let Some((to, bytes)) = probe.poll_transmit(now) {
            socket.send_to(&bytes, to).await?;
        }
        let Some(deadline) = probe.poll_timeout().filter(|_| !probe.is_done()) else {
            return Ok(probe);
        };
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => {
                    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                    probe.handle_datagram(Instant::now().into_std(), from, &buf[..len]);
                }
                // An ICMP error for an earlier send: says nothing of the rest.
                Err(error) => tracing::debug!(%error, "recv_from failed"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

fn print_family(family: &str, server: Option<SocketAddr>, result: &Result<Option<NatReport>>) {
    let title = if family == "ipv4" { "IPv4" } else { "IPv6" };
    println!("{title}");
    let report = match (server, result) {
        (None, _) => return println!("  the rendezvous has no {title} address\n"),
        (_, Err(error)) => return println!("  {error:#}\n"),
        (Some(_), Ok(None)) => return println!(),
        (Some(_), Ok(Some(report))) => report,
    };
    let row = |name: &str, value: String| println!("  {name:<18} {value}");
    let Some(reflexive) = report.reflexive else {
        row("rendezvous", format!("{}: no answer", report.server));
        return println!();
    };
    let rtt = report.rtt.map_or(String::new(), |rtt| {
        format!(", round trip {:.1} ms", rtt.as_secs_f64() * 1e3)
    });
    let other = report
        .server_other
        .map_or(" (no second address)".to_owned(), |o| {
            format!(", also at {o}")
        });
    row("rendezvous", format!("{}{other}{rtt}", report.server));
    row("external address", reflexive.to_string());
    row("mapping", mapping_text(report.mapping).to_owned());
    row("filtering", filtering_text(report.filtering).to_owned());
    row("port preserved", yes_no(report.port_preserved));
    row(
        "port allocation",
        match report.allocation {
            Allocation::Sequential { step } => format!("sequential, step {step}"),
            Allocation::Random => "random".to_owned(),
            Allocation::Unknown => "-".to_owned(),
        },
    );
    row("hairpinning", yes_no(report.hairpin));
    row("verdict", verdict(report.mapping).to_owned());
    println!();
}

fn yes_no(value: Option<bool>) -> String {
    match value {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
    .to_owned()
}

fn mapping_text(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::NoNat => "no NAT: the external address is this host's own",
        Mapping::EndpointIndependent => {
            "endpoint-independent: one external address for every destination"
        }
        Mapping::AddressDependent => {
            "address-dependent: a new external port for each destination address"
        }
        Mapping::AddressAndPortDependent => {
            "address-and-port-dependent (symmetric): a new external port for each destination"
        }
        Mapping::EndpointDependent => {
            "endpoint-dependent: a new external port for another destination address"
        }
        Mapping::Unknown => {
            "unknown: the rendezvous offers no second address (start it with two --bind addresses)"
        }
    }
}

fn filtering_text(filtering: Filtering) -> &'static str {
    match filtering {
        Filtering::EndpointIndependent => "endpoint-independent: lets in anyone (full cone)",
        Filtering::AddressDependent => "address-dependent: lets in any port of an address this host sent to",
        Filtering::AddressAndPortDependent => {
            "address-and-port-dependent: lets in only the addresses and ports this host sent to"
        }
        Filtering::PortIndependent => {
            "lets in other ports of an address this host sent to (other addresses not tested: the rendezvous has one IP)"
        }
        Filtering::Unknown => "unknown",
    }
}

fn verdict(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::NoNat => "reachable directly where the firewall allows",
        Mapping::EndpointIndependent => "easy NAT: punching works with most peers",
        Mapping::AddressDependent | Mapping::AddressAndPortDependent | Mapping::EndpointDependent => {
            "hard NAT: direct with easy NATs (port prediction) and with gateways that map ports; relayed with other hard NATs unless a gateway maps a port (see below)"
        }
        Mapping::Unknown => "unknown",
    }
}
