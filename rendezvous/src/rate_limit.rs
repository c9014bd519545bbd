//! Token buckets per key, so one source cannot monopolise the server.
//!
//! The server keeps two tables. One is keyed by the source address *and
//! port* ([`source_key`]): behind a carrier-grade NAT, a campus or an office
//! thousands of users share one public address, each with its own port, and
//! a limit per address would turn them away together. The other is keyed by
//! the address alone ([`address_key`]; IPv6 by its /64, since one host
//! usually owns a whole /64 and could otherwise rotate through it), with a
//! ceiling a hundred times higher: it bounds one host that rotates its ports.
//! Each table is capped: when it is full, keys without a bucket share one
//! overflow bucket, so a flood of spoofed sources costs bounded memory and
//! only throttles other new sources while it lasts. Idle buckets are
//! reclaimed by `sweep`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Datagrams per second each source may send, sustained.
    pub per_second: f32,
    /// Datagrams a source may send in a burst.
    pub burst: f32,
    /// Most sources tracked at once.
    pub max_sources: usize,
}

impl RateLimit {
    /// No limit worth the name: for benchmarks and floods that must reach
    /// the parsers.
    pub const fn unlimited(max_sources: usize) -> Self {
        Self {
            per_second: 1e9,
            burst: 1e9,
            max_sources,
        }
    }
}

/// A token bucket: `per_second` tokens flow in, up to `burst`. Datagrams of
/// a source here; bytes of a relayed session in the server.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    updated: Instant,
}

impl Bucket {
    pub fn full(now: Instant, burst: f32) -> Self {
        Self {
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant, per_second: f32, burst: f32) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f32();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.updated = now;
    }

    /// Takes `amount` tokens if there are that many.
    pub fn take(&mut self, now: Instant, per_second: f32, burst: f32, amount: f32) -> bool {
        self.refill(now, per_second, burst);
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }

    /// Takes one token, or says how long until there is one.
    fn take_one(&mut self, now: Instant, per_second: f32, burst: f32) -> Result<(), Duration> {
        if self.take(now, per_second, burst, 1.0) {
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f32(
            (missing / per_second.max(f32::MIN_POSITIVE)).min(3600.0),
        ))
    }
}

#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: RateLimit,
    buckets: HashMap<K, Bucket>,
    overflow: Option<Bucket>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
            overflow: None,
        }
    }

    /// Takes one token for `key`, or says how long until `key` has one
    /// (the datagram is then dropped).
    pub fn allow(&mut self, now: Instant, key: K) -> Result<(), Duration> {
        let RateLimit {
            per_second, burst, ..
        } = self.limit;
        let fresh = Bucket::full(now, burst);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return bucket.take_one(now, per_second, burst);
        }
        if self.buckets.len() < self.limit.max_sources {
            return self
                .buckets
                .entry(key)
                .or_insert(fresh)
                .take_one(now, per_second, burst);
        }
        self.overflow
            .get_or_insert(fresh)
            .take_one(now, per_second, burst)
    }

    /// Forgets sources whose bucket has refilled: they are idle.
    pub fn sweep(&mut self, now: Instant) {
        let limit = self.limit;
        self.buckets.retain(|_, bucket| {
            bucket.refill(now, limit.per_second, limit.burst);
            bucket.tokens < limit.burst
        });
        if self.buckets.len() < limit.max_sources {
            self.overflow = None;
        }
    }

    pub fn tracked_sources(&self) -> usize {
        self.buckets.len()
    }
}

/// The key of a source's own bucket: its address (IPv4-mapped made plain)
/// and port.
pub fn source_key(source: SocketAddr) -> SocketAddr {
    SocketAddr::new(source.ip().to_canonical(), source.port())
}

/// The key of the bucket everything behind one address shares: the IPv4
/// address, or the IPv6 /64.
pub fn address_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit {
        per_second: 10.0,
        burst: 5.0,
        max_sources: 2,
    };

    #[test]
    fn burst_then_refill() {
        let mut limiter = RateLimiter::new(LIMIT);
        let t0 = Instant::now();
        let ip = address_key("198.51.100.1".parse().unwrap());
        assert!((0..5).all(|_| limiter.allow(t0, ip).is_ok()));
        // 10 per second: one token after 100 ms.
        let wait = limiter.allow(t0, ip).unwrap_err();
        assert!(wait.abs_diff(Duration::from_millis(100)) < Duration::from_millis(1));
        assert!(limiter.allow(t0 + Duration::from_millis(100), ip).is_ok());
        assert!(limiter.allow(t0 + Duration::from_millis(100), ip).is_err());
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let mut limiter = RateLimiter::new(LIMIT);
        let t0 = Instant::now();
        for i in 0..5u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i));
            assert!(limiter.allow(t0, address_key(ip)).is_ok());
        }
        let sibling = address_key("2001:db8:0:1::ffff".parse().unwrap());
        assert!(limiter.allow(t0, sibling).is_err());
        assert_eq!(limiter.tracked_sources(), 1);
    }

    #[test]
    fn ports_of_one_address_are_sources_of_their_own() {
        let mut limiter = RateLimiter::new(LIMIT);
        let t0 = Instant::now();
        let a = source_key("198.51.100.1:40000".parse().unwrap());
        let b = source_key("198.51.100.1:40001".parse().unwrap());
        assert!((0..5).all(|_| limiter.allow(t0, a).is_ok()));
        assert!(limiter.allow(t0, a).is_err());
        assert!(
            limiter.allow(t0, b).is_ok(),
            "another port has its own bucket"
        );
        let mapped = source_key("[::ffff:198.51.100.1]:40000".parse().unwrap());
        assert_eq!(mapped, a);
    }

    #[test]
    fn table_is_capped_and_swept() {
        let mut limiter = RateLimiter::new(LIMIT);
        let t0 = Instant::now();
        for i in 0..100u32 {
            let _ = limiter.allow(t0, IpAddr::V4(i.into()));
        }
        assert_eq!(limiter.tracked_sources(), LIMIT.max_sources);
        limiter.sweep(t0 + Duration::from_secs(1));
        assert_eq!(limiter.tracked_sources(), 0);
    }
}
