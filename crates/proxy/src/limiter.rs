//! Rate limiting of wrong tokens on the internal port, per source address.
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
}
