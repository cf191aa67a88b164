//! Per-object retry delays: exponential with jitter, capped, reset on success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay.
pub const BASE: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX: Duration = Duration::from_secs(300);

/// Delay before retry number `attempt` (0-based): `BASE * 2^attempt` capped at `MAX`,
/// then scaled into `[d/2, d)` by `jitter` in `[0, 1)` ("equal jitter"), so many objects
/// failing together do not retry in lockstep.
pub fn delay(attempt: u32, jitter: f64) -> Duration {
    let exp = BASE.saturating_mul(2u32.saturating_pow(attempt.min(30)));
    let capped = exp.min(MAX);
    capped.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// Failure counts by object key.
#[derive(Default)]
pub struct Backoffs {
    attempts: Mutex<HashMap<String, u32>>,
}

impl Backoffs {
    /// Records a failure and returns how many failures came before it in a row.
    pub fn record(&self, key: &str) -> u32 {
        let mut map = crate::lock(&self.attempts);
        let n = map.entry(key.to_owned()).or_insert(0);
        let attempt = *n;
        *n = n.saturating_add(1);
        attempt
    }

    /// Records a failure and returns the delay before the next try.
    pub fn next(&self, key: &str) -> Duration {
        delay(self.record(key), rand::random::<f64>())
    }

    /// Forgets failures after a success.
    pub fn reset(&self, key: &str) {
        crate::lock(&self.attempts).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        assert_eq!(delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(delay(20, 1.0), MAX);
        assert_eq!(delay(u32::MAX, 0.0), MAX / 2);
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for j in [0.0, 0.3, 0.99] {
            let d = delay(4, j);
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(16), "{d:?}");
        }
    }

    #[test]
    fn success_resets_the_count() {
        let b = Backoffs::default();
        for _ in 0..5 {
            b.next("a");
        }
        assert!(b.next("a") >= Duration::from_secs(16));
        b.reset("a");
        assert!(b.next("a") <= BASE);
    }
}
