//! Per-source-address bounds on the internal port: rate limiting of wrong tokens
//! ([`GuessLimiter`]) and a cap on data connections waiting silently for a client
//! ([`IdleSlots`]).
//!
//! Wrong tokens:
//!
//! Tokens are 256 random bits, so guessing cannot succeed, and a wrong token costs one read of
//! 32 bytes and one lookup. What a guesser could still cost is a log line per guess: an address
//! that presents more than `max_failures` unknown tokens within `window` is marked, and its
//! wrong tokens are then refused without a log line (counted as `token_rate_limited`) until the
//! window has passed without failures. The mark never refuses a valid token: private proxies
//! often share their address with others (one NAT for a whole office), and a guesser behind it
//! must not be able to cut their tunnel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; past it, new addresses are not tracked (the limiter fails open
/// rather than growing without bound).
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
}

/// Counts wrong tokens per address; see the module docs.
#[derive(Debug)]
pub struct GuessLimiter {
    max_failures: u32,
    window: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl GuessLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// True while `ip`'s wrong tokens are refused without a log line.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let entries = self.entries.lock().expect("limiter lock");
        entries
            .get(&ip)
            .and_then(|e| e.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Records a wrong token from `ip`; returns true when that blocks it.
    pub fn failure(&self, ip: IpAddr, now: Instant) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let mut entries = self.entries.lock().expect("limiter lock");
        if entries.len() >= MAX_TRACKED && !entries.contains_key(&ip) {
            let window = self.window;
            entries.retain(|_, e| {
                now.duration_since(e.window_start) < window
                    || e.blocked_until.is_some_and(|u| now < u)
            });
            if entries.len() >= MAX_TRACKED {
                return false;
            }
        }
        let e = entries.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            blocked_until: None,
        });
        if now.duration_since(e.window_start) >= self.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        if e.failures > self.max_failures {
            let newly = e.blocked_until.is_none_or(|u| now >= u);
            e.blocked_until = Some(now + self.window);
            return newly;
        }
        false
    }
}

/// Counts the data connections waiting silently before their token (a private proxy's
/// pre-dialed pool), per source network (an IPv4 address, an IPv6 /64) and in all, so that no
/// source can take the internal port with silent connections. The map holds only networks with
/// such a connection, so it is bounded by the internal port's connection limit.
#[derive(Debug)]
pub struct IdleSlots {
    max_per_network: u32,
    max_total: usize,
    held: Mutex<(HashMap<IpAddr, u32>, usize)>,
}

/// One silent data connection's place; given back when dropped.
pub struct IdleSlot<'a> {
    slots: &'a IdleSlots,
    network: IpAddr,
}

/// The network an address is counted under: IPv4 addresses alone, IPv6 by /64 (one host
/// often holds a whole /64).
pub(crate) fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl IdleSlots {
    pub fn new(max_per_network: u32, max_total: usize) -> Self {
        Self {
            max_per_network,
            max_total,
            held: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// A place for one more silent connection from `ip`, unless its network or all together
    /// hold the maximum already.
    pub fn enter(&self, ip: IpAddr) -> Option<IdleSlot<'_>> {
        let network = network(ip);
        let mut held = self.held.lock().expect("idle slots lock");
        let (map, total) = &mut *held;
        if *total >= self.max_total {
            return None;
        }
        let n = map.entry(network).or_insert(0);
        if *n >= self.max_per_network {
            if *n == 0 {
                map.remove(&network);
            }
            return None;
        }
        *n += 1;
        *total += 1;
        Some(IdleSlot {
            slots: self,
            network,
        })
    }

    /// Silent connections `ip`'s network holds now.
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> u32 {
        let held = self.held.lock().expect("idle slots lock");
        held.0.get(&network(ip)).copied().unwrap_or(0)
    }
}

impl Drop for IdleSlot<'_> {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("idle slots lock");
        let (map, total) = &mut *held;
        *total -= 1;
        if let Some(n) = map.get_mut(&self.network) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.network);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_too_many_failures_and_forgets() {
        let l = GuessLimiter::new(3, Duration::from_secs(10));
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!l.failure(a, t0));
        }
        assert!(!l.is_blocked(a, t0));
        assert!(l.failure(a, t0));
        assert!(l.is_blocked(a, t0));
        assert!(!l.is_blocked(b, t0), "other addresses are unaffected");
        assert!(!l.is_blocked(a, t0 + Duration::from_secs(11)));
        // A new window starts from zero.
        assert!(!l.failure(a, t0 + Duration::from_secs(21)));
    }

    #[test]
    fn zero_disables() {
        let l = GuessLimiter::new(0, Duration::from_secs(10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(!l.failure(a, t0));
        }
        assert!(!l.is_blocked(a, t0));
    }

    #[test]
    fn idle_slots_are_bounded_per_network_and_in_all() {
        let slots = IdleSlots::new(2, 3);
        let hosts: Vec<IpAddr> = ["2001:db8::1", "2001:db8::2:3", "::ffff:10.0.0.9"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let a = slots.enter(hosts[0]).expect("first of the /64");
        let b = slots.enter(hosts[1]).expect("second of the /64");
        assert!(slots.enter(hosts[0]).is_none(), "a third from the same /64");
        let c = slots
            .enter(hosts[2])
            .expect("a mapped IPv4 address is its own network");
        assert!(
            slots.enter("10.0.0.10".parse().unwrap()).is_none(),
            "over the total"
        );
        assert!(
            slots.held.lock().unwrap().0.len() <= 2,
            "no empty entry kept"
        );
        drop((a, b, c));
        assert_eq!(slots.held.lock().unwrap().1, 0);
        assert!(slots.held.lock().unwrap().0.is_empty());
    }

    #[test]
    fn idle_slots_are_bounded_per_address_and_given_back() {
        let slots = IdleSlots::new(2, 100);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = slots.enter(a).expect("first");
        let second = slots.enter(a).expect("second");
        assert!(slots.enter(a).is_none(), "a third from the same address");
        let other = slots.enter(b).expect("another address has its own slots");
        drop(first);
        assert_eq!(slots.held(a), 1);
        let again = slots.enter(a).expect("a slot given back is free again");
        drop((second, again, other));
        assert_eq!((slots.held(a), slots.held(b)), (0, 0));
        assert!(
            slots.held.lock().unwrap().0.is_empty(),
            "no entry left behind"
        );
    }
}
