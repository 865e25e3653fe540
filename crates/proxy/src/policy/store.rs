//! governor's keyed rate limiter keeps one state (a theoretical arrival time, 8 bytes) per key
//! in a state store. Its own stores grow with every new key until `retain_recent` is called;
//! this one holds at most `cap` keys and, to make room, forgets the key used least recently.
//!
//! Forgetting a key costs nothing but that key's history: it starts again with a full burst.
//! A client that keeps connecting is used most recently and stays; a source spraying addresses
//! can push out only the addresses quieter than itself.

use std::hash::Hash;
use std::sync::Mutex;

use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use lru::LruCache;

/// A state store of at most `cap` keys, least recently used evicted first.
pub struct BoundedStore<K: Hash + Eq> {
    cap: usize,
    states: Mutex<LruCache<K, Nanos>>,
}

impl<K: Hash + Eq> BoundedStore<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            // Unbounded to lru, bounded here: its bounded form reserves the whole table up front.
            states: Mutex::new(LruCache::unbounded()),
        }
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut states = self.states.lock().expect("rate store lock");
        // `get` marks the key used, refused or not: a source that keeps trying stays tracked.
        let (out, next) = f(states.get(key).copied())?;
        if let Some(state) = states.get_mut(key) {
            *state = next;
        } else {
            if states.len() >= self.cap {
                states.pop_lru();
            }
            states.put(key.clone(), next);
        }
        Ok(out)
    }
}

/// Lets governor drop the keys whose state is as good as new (`RateLimiter::retain_recent`)
/// and count them (`RateLimiter::len`).
impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut states = self.states.lock().expect("rate store lock");
        states.retain(|_, state| *state > drop_below);
    }

    fn len(&self) -> usize {
        self.states.lock().expect("rate store lock").len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;
    use governor::middleware::NoOpMiddleware;
    use governor::{Quota, RateLimiter};

    use super::*;

    type Limiter = RateLimiter<u32, BoundedStore<u32>, FakeRelativeClock, NoOpMiddleware<Nanos>>;

    fn limiter(per_second: u32, cap: usize, clock: &FakeRelativeClock) -> Limiter {
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap());
        RateLimiter::new(quota, BoundedStore::new(cap), clock.clone())
    }

    #[test]
    fn holds_at_most_cap_keys_and_forgets_the_least_recently_used() {
        let clock = FakeRelativeClock::default();
        let limiter = limiter(1, 3, &clock);
        assert!(limiter.check_key(&1).is_ok());
        assert!(limiter.check_key(&1).is_err(), "its burst of 1 is used");
        assert!(limiter.check_key(&2).is_ok());
        assert!(limiter.check_key(&3).is_ok());
        // 1 tries again and is refused: it is now the most recently used, 2 the least.
        assert!(limiter.check_key(&1).is_err());
        assert!(limiter.check_key(&4).is_ok(), "a fourth key makes room");
        assert_eq!(limiter.len(), 3);
        assert!(limiter.check_key(&1).is_err(), "1 is still tracked");
        assert!(
            limiter.check_key(&2).is_ok(),
            "2 was forgotten: a full burst again"
        );
        clock.advance(Duration::from_secs(1));
        assert!(limiter.check_key(&1).is_ok(), "refilled after a second");
    }

    #[test]
    fn never_grows_past_its_cap_and_drops_fresh_states() {
        let clock = FakeRelativeClock::default();
        let limiter = limiter(10, 100, &clock);
        for k in 0..10_000 {
            assert!(limiter.check_key(&k).is_ok());
        }
        assert_eq!(limiter.len(), 100);
        clock.advance(Duration::from_secs(2));
        limiter.retain_recent();
        assert_eq!(limiter.len(), 0, "refilled states are as good as none");
    }
}
