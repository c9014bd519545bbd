//! Address cookies: how a server under load tells a real peer from a spoofed
//! source without keeping state for either.
//!
//! The cookie is an HMAC of the source address and port under a secret that
//! rotates every [`ROTATION`]; the server accepts the current and the
//! previous secret, so a cookie lives between one and two rotations. Only a
//! host that receives at an address can echo that address's cookie, so a
//! flood of spoofed sources gets one small `Busy` each (bounded by a global
//! budget) and no table entry. The scheme is WireGuard's cookie reply,
//! without its encryption: the cookie proves reachability, not identity.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natter_wire::AddressCookie;
use rand::RngCore;
use ring::hmac;

/// How often the secret changes (WireGuard's figure).
pub const ROTATION: Duration = Duration::from_secs(120);

pub struct CookieJar {
    current: hmac::Key,
    previous: hmac::Key,
    rotates_at: Option<Instant>,
}

impl CookieJar {
    pub fn new(rng: &mut impl RngCore) -> Self {
        Self {
            current: fresh_key(rng),
            previous: fresh_key(rng),
            rotates_at: None,
        }
    }

    /// The cookie for `source` under the current secret.
    pub fn issue(
        &mut self,
        now: Instant,
        rng: &mut impl RngCore,
        source: SocketAddr,
    ) -> AddressCookie {
        self.rotate(now, rng);
        mac(&self.current, source)
    }

    /// Whether `cookie` is `source`'s under the current or previous secret.
    pub fn accepts(
        &mut self,
        now: Instant,
        rng: &mut impl RngCore,
        source: SocketAddr,
        cookie: &AddressCookie,
    ) -> bool {
        self.rotate(now, rng);
        [&self.current, &self.previous]
            .into_iter()
            .any(|key| same(&mac(key, source), cookie))
    }

    fn rotate(&mut self, now: Instant, rng: &mut impl RngCore) {
        let due = *self.rotates_at.get_or_insert(now + ROTATION);
        if now >= due {
            self.previous = std::mem::replace(&mut self.current, fresh_key(rng));
            self.rotates_at = Some(now + ROTATION);
        }
    }
}

fn fresh_key(rng: &mut impl RngCore) -> hmac::Key {
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    hmac::Key::new(hmac::HMAC_SHA256, &secret)
}

fn mac(key: &hmac::Key, source: SocketAddr) -> AddressCookie {
    let source = crate::rate_limit::source_key(source);
    let mut message = [0u8; 18];
    let ip = match source.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    message[..16].copy_from_slice(&ip.octets());
    message[16..].copy_from_slice(&source.port().to_be_bytes());
    let tag = hmac::sign(key, &message);
    let mut cookie = [0u8; 16];
    cookie.copy_from_slice(&tag.as_ref()[..16]);
    AddressCookie(cookie)
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about how much of a forged cookie was right.
fn same(a: &AddressCookie, b: &AddressCookie) -> bool {
    a.0.iter().zip(b.0).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn a_cookie_is_good_for_its_own_source_for_one_to_two_rotations() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut jar = CookieJar::new(&mut rng);
        let t0 = Instant::now();
        let peer: SocketAddr = "198.51.100.1:40000".parse().unwrap();
        let cookie = jar.issue(t0, &mut rng, peer);
        assert!(jar.accepts(t0, &mut rng, peer, &cookie));
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:40000".parse().unwrap();
        assert!(jar.accepts(t0, &mut rng, mapped, &cookie));
        let other_port: SocketAddr = "198.51.100.1:40001".parse().unwrap();
        assert!(!jar.accepts(t0, &mut rng, other_port, &cookie));
        let mut forged = cookie;
        forged.0[15] ^= 1;
        assert!(!jar.accepts(t0, &mut rng, peer, &forged));

        assert!(jar.accepts(t0 + ROTATION, &mut rng, peer, &cookie));
        assert!(!jar.accepts(t0 + 2 * ROTATION, &mut rng, peer, &cookie));
    }
}
