//! Per-source-address bounds on the internal port: rate limiting of wrong tokens
//! ([`GuessLimiter`]) and a cap on data connections waiting silently for a client
//! ([`IdleSlots`]).
//!
//! Wrong tokens:
//!
//! Tokens are 256 random bits, so guessing cannot succeed; the limiter keeps a guesser from
//! costing work and log lines. An address that presents more than `max_failures` unknown
//! tokens within `window` has its data connections closed unread until the window has passed
//! without failures. Legitimate private proxies present only tokens they were given, so they
//! never trip it (unless a token expired before they dialed, which is rare and bounded).

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

    /// True when connections from `ip` are to be closed unread.
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

/// Counts the data connections each address holds open before their token (a private proxy's
/// pre-dialed pool), so that one address cannot take the whole internal port with silent
/// connections. The map holds only addresses with such a connection, so it is bounded by the
/// internal port's connection limit.
#[derive(Debug)]
pub struct IdleSlots {
    max_per_address: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

/// One silent data connection's place; given back when dropped.
pub struct IdleSlot<'a> {
    slots: &'a IdleSlots,
    ip: IpAddr,
}

impl IdleSlots {
    pub fn new(max_per_address: u32) -> Self {
        Self {
            max_per_address,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more silent connection from `ip`, unless it holds the maximum already.
    pub fn enter(&self, ip: IpAddr) -> Option<IdleSlot<'_>> {
        let mut held = self.held.lock().expect("idle slots lock");
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        Some(IdleSlot { slots: self, ip })
    }

    /// Silent connections `ip` holds now.
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> u32 {
        self.held
            .lock()
            .expect("idle slots lock")
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for IdleSlot<'_> {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("idle slots lock");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
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
    fn idle_slots_are_bounded_per_address_and_given_back() {
        let slots = IdleSlots::new(2);
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
            slots.held.lock().unwrap().is_empty(),
            "no entry left behind"
        );
    }
}
