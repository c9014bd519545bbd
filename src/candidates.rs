//! Host candidates: this machine's own interface addresses, paired with the
//! port of the socket natter uses, for peers that share a LAN.

use std::net::{IpAddr, SocketAddr};

use natter_wire::MAX_HOST_CANDIDATES;

/// The addresses another peer on the same network could reach `local` at.
/// A socket bound to one address advertises just that address (bind to
/// `127.0.0.1` to advertise loopback). A wildcard socket advertises its
/// interfaces' addresses of its own family, leaving out loopback and
/// link-local ones, which another machine cannot reach.
pub fn host_candidates(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces,
        Err(error) => {
            tracing::warn!(%error, "cannot list interfaces; advertising no host candidates");
            return Vec::new();
        }
    };
    let mut candidates: Vec<SocketAddr> = interfaces
        .into_iter()
        .map(|interface| interface.ip())
        .filter(|ip| usable(*ip, local))
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect();
    candidates.dedup();
    candidates.truncate(MAX_HOST_CANDIDATES);
    candidates
}

fn usable(ip: IpAddr, local: SocketAddr) -> bool {
    let same_family = ip.is_ipv4() == local.is_ipv4();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    same_family && !ip.is_loopback() && !link_local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_specific_bind_address_is_the_only_candidate() {
        let local: SocketAddr = "192.168.1.5:4000".parse().unwrap();
        assert_eq!(host_candidates(local), vec![local]);
    }

    #[test]
    fn wildcard_lists_interfaces_with_the_socket_port_but_not_loopback() {
        let candidates = host_candidates("0.0.0.0:4321".parse().unwrap());
        assert!(candidates
            .iter()
            .all(|a| a.is_ipv4() && !a.ip().is_loopback() && a.port() == 4321));
        assert!(candidates.len() <= MAX_HOST_CANDIDATES);
    }
}
