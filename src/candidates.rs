//! Host candidates: this machine's own interface addresses, paired with the
//! port of the socket natter uses, for peers that share a LAN.

use std::net::{IpAddr, SocketAddr};

use natter_wire::MAX_HOST_CANDIDATES;

/// Most host candidates of each address family.
const PER_FAMILY: usize = MAX_HOST_CANDIDATES / 2;

/// The addresses another peer could reach `local` at directly: on the same
/// network, and for IPv6 (which has no NAT) across the internet too. A
/// socket bound to one address advertises just that address (bind to
/// `127.0.0.1` to advertise loopback). A wildcard IPv4 socket advertises its
/// interfaces' IPv4 addresses; a wildcard IPv6 socket, which natter makes
/// dual-stack, its IPv4 and IPv6 addresses, up to four of each.
/// Loopback and link-local addresses are left out: another machine cannot
/// reach them.
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
    let ips: Vec<IpAddr> = interfaces.into_iter().map(|i| i.ip()).collect();
    let of_family = |v6: bool| {
        let mut family: Vec<SocketAddr> = ips
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv6() == v6 && reachable(*ip))
            .map(|ip| SocketAddr::new(ip, local.port()))
            .collect();
        family.dedup();
        family.truncate(PER_FAMILY);
        family
    };
    let mut candidates = of_family(false);
    if local.is_ipv6() {
        candidates.extend(of_family(true));
    }
    candidates
}

/// Whether another machine could reach this address of ours.
fn reachable(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    let mapped = matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast() && !link_local && !mapped
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
        assert!(candidates.len() <= PER_FAMILY);
        let dual = host_candidates("[::]:4321".parse().unwrap());
        assert!(dual.iter().all(|a| reachable(a.ip()) && a.port() == 4321));
        assert!(dual.len() <= MAX_HOST_CANDIDATES);
        // The IPv4 ones come first, and are the same.
        assert_eq!(&dual[..candidates.len()], &candidates[..]);
    }

    #[test]
    fn unreachable_addresses_are_never_candidates() {
        for ip in [
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "::",
            "::ffff:192.0.2.1",
            "ff02::1",
        ] {
            assert!(!reachable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["192.168.1.2", "2001:db8:1::2", "fd00::5"] {
            assert!(reachable(ip.parse().unwrap()), "{ip}");
        }
    }
}
