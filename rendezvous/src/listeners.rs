//! Where the server listens, as NAT behaviour discovery (RFC 5780) needs it:
//! which address a STUN answer names as OTHER-ADDRESS, and which socket
//! answers a CHANGE-REQUEST.
//!
//! A peer learns how its NAT maps by asking from one socket at two of the
//! server's addresses: the same external address both times means the NAT
//! maps independently of the destination, the kind of NAT a plain punch gets
//! through; two different ones mean it does not, and how far apart they are
//! hints at how it allocates ports. So the server answers STUN and
//! registrations on every socket it has (a second port at least, a second
//! IP address when it has one) and tells each asker where the others are.

use std::net::{IpAddr, SocketAddr};

use natter_wire::stun::Change;

/// The local address of each of the server's sockets, by index (`via`).
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    addrs: Vec<SocketAddr>,
}

impl Listeners {
    /// `addrs[i]` is where socket `i` is bound. An unspecified IP (a
    /// wildcard bind) counts as the same IP as every other unspecified one:
    /// the server cannot tell its own addresses apart then, only its ports.
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let addrs = addrs
            .into_iter()
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .collect();
        Self { addrs }
    }

    /// What to name as OTHER-ADDRESS to `peer`, who asked via socket `via`:
    /// a socket that differs in both IP and port if there is one (RFC 5780),
    /// else one on another port. An unspecified IP stands for "the address
    /// you sent to", which is what the server would answer from.
    pub fn other_address(&self, via: usize, peer: SocketAddr) -> Option<SocketAddr> {
        self.find(
            via,
            peer,
            Change {
                ip: true,
                port: true,
            },
        )
        .or_else(|| {
            self.find(
                via,
                peer,
                Change {
                    ip: false,
                    port: true,
                },
            )
        })
        .map(|other| self.named_for(other, peer))
    }

    /// The socket that answers a request that came in on `via` from `peer`
    /// with `change`, if the server has one that differs as asked.
    pub fn answering(&self, via: usize, peer: SocketAddr, change: Change) -> Option<usize> {
        if change.is_none() {
            return Some(via);
        }
        self.find(via, peer, change)
    }

    /// A socket that can reach `peer` and differs from `via` in IP exactly
    /// when `change.ip` and in port exactly when `change.port`.
    fn find(&self, via: usize, peer: SocketAddr, change: Change) -> Option<usize> {
        let here = *self.addrs.get(via)?;
        self.addrs.iter().enumerate().position(|(i, there)| {
            i != via
                && reaches(*there, peer.ip())
                && same_ip(there.ip(), here.ip()) != change.ip
                && (there.port() != here.port()) == change.port
        })
    }

    fn named_for(&self, index: usize, peer: SocketAddr) -> SocketAddr {
        let addr = self.addrs[index];
        if addr.ip().is_unspecified() {
            // In the peer's family: a dual-stack socket's `[::]` is
            // `0.0.0.0` to an IPv4 peer.
            let ip = match peer.ip() {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            };
            SocketAddr::new(ip, addr.port())
        } else {
            addr
        }
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a == b || (a.is_unspecified() && b.is_unspecified())
}

/// Whether a socket bound to `local` can send to `peer`: the same family,
/// or an IPv6 wildcard, which the driver binds dual-stack.
fn reaches(local: SocketAddr, peer: IpAddr) -> bool {
    local.is_ipv4() == peer.is_ipv4() || local.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners(addrs: &[&str]) -> Listeners {
        Listeners::new(addrs.iter().map(|a| a.parse().unwrap()).collect())
    }

    const PEER: &str = "198.51.100.7:40000";

    #[test]
    fn the_other_address_differs_in_ip_and_port_when_the_server_has_one() {
        let l = listeners(&[
            "192.0.2.1:7777",
            "192.0.2.1:7778",
            "192.0.2.2:7777",
            "192.0.2.2:7778",
        ]);
        let peer = PEER.parse().unwrap();
        assert_eq!(
            l.other_address(0, peer),
            Some("192.0.2.2:7778".parse().unwrap())
        );
        assert_eq!(
            l.other_address(3, peer),
            Some("192.0.2.1:7777".parse().unwrap())
        );
        let port_only = Change {
            ip: false,
            port: true,
        };
        let ip_only = Change {
            ip: true,
            port: false,
        };
        let both = Change {
            ip: true,
            port: true,
        };
        assert_eq!(l.answering(0, peer, port_only), Some(1));
        assert_eq!(l.answering(0, peer, ip_only), Some(2));
        assert_eq!(l.answering(0, peer, both), Some(3));
        assert_eq!(l.answering(2, peer, Change::NONE), Some(2));
    }

    #[test]
    fn a_wildcard_server_names_its_second_port_and_cannot_change_ip() {
        let l = listeners(&["0.0.0.0:7777", "0.0.0.0:7778"]);
        let peer = PEER.parse().unwrap();
        assert_eq!(
            l.other_address(0, peer),
            Some("0.0.0.0:7778".parse().unwrap())
        );
        assert_eq!(
            l.answering(
                1,
                peer,
                Change {
                    ip: false,
                    port: true
                }
            ),
            Some(0)
        );
        assert_eq!(
            l.answering(
                0,
                peer,
                Change {
                    ip: true,
                    port: true
                }
            ),
            None
        );
    }

    #[test]
    fn one_socket_names_no_other_address_and_a_family_is_kept() {
        let peer: SocketAddr = PEER.parse().unwrap();
        assert_eq!(listeners(&["0.0.0.0:7777"]).other_address(0, peer), None);
        // An IPv6-only socket cannot answer an IPv4 peer; a dual-stack one can.
        let l = listeners(&["0.0.0.0:7777", "[2001:db8::1]:7778", "[::]:7779"]);
        assert_eq!(
            l.other_address(0, peer),
            Some("0.0.0.0:7779".parse().unwrap())
        );
        let v6: SocketAddr = "[2001:db8::9]:5000".parse().unwrap();
        assert_eq!(l.other_address(1, v6), Some("[::]:7779".parse().unwrap()));
    }
}
