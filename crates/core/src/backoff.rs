//! Pacing attempts that keep failing: one pause that doubles from a first value up to a cap,
//! the one rule every retry loop of eps follows (accept errors, peer reconnects, reverse
//! streams, Redis, the EPS server a proxy waits for, announcements).

use std::time::Duration;

/// The pause before the next attempt: `first` after the first failure, doubling with each
/// failure in a row up to `max`; back to `first` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// Pauses from `first` up to `max` (at least `first`).
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            next: first,
            failures: 0,
        }
    }

    /// One more failure: the pause to take before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        pause
    }

    /// An attempt succeeded: the next failure pauses `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
        self.failures = 0;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300));
        let pauses: Vec<_> = (0..5).map(|_| b.fail()).collect();
        assert_eq!(pauses, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!((b.failures(), b.fail()), (0, ms(50)));
        // A cap below the first pause is the first pause.
        assert_eq!(Backoff::new(ms(50), ms(1)).fail(), ms(50));
    }
}
