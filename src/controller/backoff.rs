//! Per-object retry delays: exponential with jitter, capped, reset on success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::identity::CredentialRef;

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

/// The steps of a reconcile that back off separately, each reset only by its own
/// success: a failure reported in status is an `Ok` reconcile too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Asking the provider for a credential.
    Provider,
    /// Writing Secrets and ServiceAccount entries.
    Sync,
    /// The reconcile as a whole failing with an error (API I/O).
    Reconcile,
}

/// Failure counts by credential and step.
#[derive(Default)]
pub struct Backoffs {
    attempts: Mutex<HashMap<(CredentialRef, Step), u32>>,
}

impl Backoffs {
    /// Records a failure and returns how many failures came before it in a row.
    pub fn record(&self, who: &CredentialRef, step: Step) -> u32 {
        let mut map = crate::lock(&self.attempts);
        let n = map.entry((who.clone(), step)).or_insert(0);
        let attempt = *n;
        *n = n.saturating_add(1);
        attempt
    }

    /// Records a failure and returns the delay before the next try.
    pub fn next(&self, who: &CredentialRef, step: Step) -> Duration {
        delay(self.record(who, step), rand::random::<f64>())
    }

    /// Forgets a step's failures after its success.
    pub fn reset(&self, who: &CredentialRef, step: Step) {
        crate::lock(&self.attempts).remove(&(who.clone(), step));
    }

    /// Forgets everything about a deleted credential.
    pub fn forget(&self, who: &CredentialRef) {
        crate::lock(&self.attempts).retain(|(w, _), _| w != who);
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
    fn success_of_the_same_step_resets_the_count() {
        let b = Backoffs::default();
        let a = CredentialRef::cluster("a");
        for _ in 0..5 {
            b.next(&a, Step::Provider);
        }
        assert!(b.next(&a, Step::Provider) >= Duration::from_secs(16));
        b.reset(&a, Step::Sync);
        assert_eq!(
            b.record(&a, Step::Provider),
            6,
            "another step's success changes nothing"
        );
        assert_eq!(b.record(&CredentialRef::namespaced("ns", "a"), Step::Provider), 0);
        b.reset(&a, Step::Provider);
        assert!(b.next(&a, Step::Provider) <= BASE);
        b.record(&a, Step::Sync);
        b.forget(&a);
        assert_eq!(b.record(&a, Step::Sync), 0);
    }
}
