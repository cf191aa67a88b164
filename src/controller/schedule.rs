//! Timing, as named and unit-tested functions: when to renew a credential, how long to
//! wait after a failure, and never past the life of the secret already in place.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::provider::{CloudFailure, Credential};

use super::backoff;
use super::validate::ValidSpec;

/// How long to wait before looking again at an object that needs a spec change.
pub const RECHECK_INVALID: Duration = Duration::from_secs(3600);
/// How often a credential that lost a Secret name to another looks again (a holder that
/// goes away without a trace, e.g. a rival that never wrote, is noticed within this).
pub const RECHECK_CONFLICT: Duration = Duration::from_secs(120);
/// Floor between refreshes, so a past or absurd expiry never hot-loops.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Longest wait after a transient provider failure (the endpoint down, a 5xx): an outage
/// costs a few requests a minute, and a recovery is noticed within this time (and the
/// fresh token written well within 30 s).
pub const TRANSIENT_MAX: Duration = Duration::from_secs(25);
/// Wait after a throttled call that gave no hint of its own.
pub const THROTTLED_MIN: Duration = Duration::from_secs(60);
/// Longest wait a provider's `Retry-After` can ask for (the secret in place still gets
/// its retry before it expires, see [`retry_delay`]).
pub const THROTTLED_MAX: Duration = Duration::from_secs(3600);
/// First wait after a permanent failure (rejected or denied credentials, a bad spec):
/// retrying fast cannot help; a change of the spec or a source Secret retries at once.
pub const PERMANENT_MIN: Duration = Duration::from_secs(300);

/// How a failed provider call is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryClass {
    /// Try again soon, backing off to [`TRANSIENT_MAX`].
    Transient,
    /// The provider asked us to slow down, for this long if it said (`Retry-After`).
    Throttled(Option<Duration>),
    /// Wait for a change; look again rarely.
    Permanent,
}

impl RetryClass {
    /// The class of a provider error.
    pub fn of(error: &crate::provider::ProviderError) -> Self {
        match error {
            crate::provider::ProviderError::Cloud {
                failure: CloudFailure::Throttled { retry_after },
                ..
            } => RetryClass::Throttled(*retry_after),
            crate::provider::ProviderError::Cloud {
                failure: CloudFailure::Unauthorized | CloudFailure::Denied,
                ..
            } => RetryClass::Permanent,
            e if e.is_permanent() => RetryClass::Permanent,
            _ => RetryClass::Transient,
        }
    }
}

/// Delay before provider attempt number `attempt + 1` after `attempt` failures in a row,
/// with `jitter` in `[0, 1)`, never past half the remaining life of the secret in place.
pub fn provider_retry(
    class: RetryClass,
    attempt: u32,
    jitter: f64,
    current_expiry: Option<Timestamp>,
    now: Timestamp,
) -> Duration {
    let base = backoff::delay(attempt, jitter);
    let d = match class {
        RetryClass::Transient => base.min(TRANSIENT_MAX),
        // At least what the provider asked for, and never less than the backoff.
        RetryClass::Throttled(hint) => hint
            .unwrap_or(THROTTLED_MIN)
            .max(base.min(backoff::MAX))
            .min(THROTTLED_MAX),
        RetryClass::Permanent => PERMANENT_MIN
            .saturating_mul(2u32.saturating_pow(attempt.min(8)))
            .min(RECHECK_INVALID),
    };
    retry_delay(d, current_expiry, now)
}

/// When to renew: `expiresAt - renewBefore` (default a quarter of the remaining
/// lifetime), never sooner than [`MIN_REFRESH`]; credentials without expiry are re-read
/// every `refresh.interval`.
pub fn next_refresh(spec: &ValidSpec, credential: &Credential) -> Duration {
    refresh_delay(spec, credential.expires_at, Timestamp::now(), rand::random::<f64>())
}

/// Pure form of [`next_refresh`]: `jitter` in `[0, 1)` moves the renewal up to 10% (at
/// most 5 minutes) earlier, so many credentials issued together do not renew together.
pub fn refresh_delay(spec: &ValidSpec, expires_at: Option<Timestamp>, now: Timestamp, jitter: f64) -> Duration {
    match expires_at {
        None => spec.refresh_interval,
        Some(at) => {
            let left = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            if left.is_zero() {
                // Already expired (or an absurd answer): never a hot loop.
                return MIN_REFRESH;
            }
            let before = spec.renew_before.unwrap_or(left / 4);
            let due = left.saturating_sub(before);
            let early = due.mul_f64(0.1 * jitter.clamp(0.0, 1.0)).min(Duration::from_secs(300));
            // Short-lived tokens renew at their due time; never sooner than half their
            // remaining life (and at least a second) even if renewBefore exceeds it.
            let floor = (left / 2).clamp(Duration::from_secs(1), MIN_REFRESH);
            due.saturating_sub(early).max(floor)
        }
    }
}

/// When to look at a credential again: at `wake_at` (its refresh time, or the retry time
/// of a failed provider call), sooner if `quick_retry` (failed writes) asks for it, and
/// never in less than a second.
pub fn requeue_delay(wake_at: Timestamp, quick_retry: Option<Duration>, now: Timestamp) -> Duration {
    let until = Duration::try_from(wake_at.duration_since(now))
        .unwrap_or_default()
        .max(Duration::from_secs(1));
    quick_retry.map_or(until, |q| until.min(q))
}

/// Retry delay after a failure: the backoff, but never past half the remaining life of the
/// secret already in place, so a retry always happens before it expires.
pub fn retry_delay(backoff: Duration, current_expiry: Option<Timestamp>, now: Timestamp) -> Duration {
    match current_expiry {
        Some(at) if at > now => {
            let left = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            backoff.min((left / 2).max(Duration::from_secs(5)))
        }
        _ => backoff,
    }
}

/// A stored credential (basic, dockerConfig) read again after a restart, unchanged (the
/// same content digest as in status): it keeps the schedule status recorded, so a restart
/// with nothing to change writes nothing. Returns the issue and refresh times to keep.
pub fn unchanged_schedule(
    status: Option<&crate::crd::RegistryCredentialStatus>,
    generation: Option<i64>,
    mints: bool,
    hash: &str,
    fresh: &super::cache::Cached,
    now: Timestamp,
) -> Option<(Timestamp, Timestamp)> {
    let status = status.filter(|s| !mints && s.observed_generation == generation)?;
    let issued = status.last_refresh_time.as_ref()?.0;
    let refresh = status.next_refresh_time.as_ref()?.0;
    (status.content_hash.as_deref() == Some(hash) && issued < fresh.issued_at && now < refresh)
        .then_some((issued, refresh.min(fresh.refresh_at)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::controller::validate;
    use crate::crd::{ClusterRegistryCredentialSpec, EcrProvider, Provider};

    /// An ECR spec with `renewBefore` (shared with other modules' tests).
    pub(crate) fn spec(renew_before: Option<Duration>) -> ValidSpec {
        let raw = ClusterRegistryCredentialSpec {
            registry: "123456789012.dkr.ecr.us-east-1.amazonaws.com".into(),
            provider: Provider::Ecr(EcrProvider {
                region: None,
                role_arn: None,
                external_id: None,
                credentials_secret_ref: None,
                service_account_ref: None,
                endpoint: None,
            }),
            refresh: Default::default(),
            target: Default::default(),
            verify: None,
            tls: None,
            suspend: false,
        };
        let mut v = validate::cluster("x", &raw).expect("valid");
        v.renew_before = renew_before;
        v
    }

    /// A fixed instant plus `secs`.
    pub(crate) fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("t")
    }

    #[test]
    fn renews_a_quarter_of_the_lifetime_early_by_default() {
        // 12 h token: renew after 9 h, at most 5 min earlier with jitter.
        let d = refresh_delay(&spec(None), Some(t(12 * 3600)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(9 * 3600));
        let j = refresh_delay(&spec(None), Some(t(12 * 3600)), t(0), 0.99);
        assert!(j < d && j >= d - Duration::from_secs(300), "{j:?}");
    }

    #[test]
    fn renew_before_is_honoured() {
        let d = refresh_delay(&spec(Some(Duration::from_secs(1800))), Some(t(3600)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(1800));
    }

    #[test]
    fn past_or_absurd_expiry_uses_the_floor() {
        assert_eq!(
            refresh_delay(&spec(None), Some(t(-10 * 365 * 86400)), t(0), 0.5),
            MIN_REFRESH
        );
        assert_eq!(refresh_delay(&spec(None), Some(t(0)), t(0), 0.5), MIN_REFRESH);
    }

    #[test]
    fn short_lived_tokens_renew_before_expiry_but_not_in_a_loop() {
        let d = refresh_delay(&spec(None), Some(t(8)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(6));
        // renewBefore longer than the lifetime: half the remaining life.
        let d = refresh_delay(&spec(Some(Duration::from_secs(7200))), Some(t(8)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(4));
        let d = refresh_delay(&spec(Some(Duration::from_secs(7200))), Some(t(3600)), t(0), 0.0);
        assert_eq!(d, MIN_REFRESH);
    }

    #[test]
    fn retries_happen_before_the_current_secret_expires() {
        assert_eq!(
            retry_delay(Duration::from_secs(300), Some(t(120)), t(0)),
            Duration::from_secs(60)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(2), Some(t(120)), t(0)),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(300), None, t(0)),
            Duration::from_secs(300)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(300), Some(t(-5)), t(0)),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn requeue_at_the_wake_time_sooner_for_failed_writes_never_under_a_second() {
        assert_eq!(requeue_delay(t(600), None, t(0)), Duration::from_secs(600));
        assert_eq!(
            requeue_delay(t(600), Some(Duration::from_secs(4)), t(0)),
            Duration::from_secs(4)
        );
        assert_eq!(requeue_delay(t(-5), None, t(0)), Duration::from_secs(1));
    }

    #[test]
    fn transient_failures_back_off_to_twenty_five_seconds() {
        let d: Vec<Duration> = (0..8)
            .map(|a| provider_retry(RetryClass::Transient, a, 0.999, None, t(0)))
            .collect();
        assert!(d[0] <= Duration::from_secs(1));
        assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
        assert!(d.iter().all(|d| *d <= TRANSIENT_MAX), "{d:?}");
        // A two-minute outage costs at most 12 requests a minute.
        let mut elapsed = Duration::ZERO;
        let mut calls = 0;
        for a in 0.. {
            if elapsed >= Duration::from_secs(60) {
                break;
            }
            calls += 1;
            elapsed += provider_retry(RetryClass::Transient, a, 0.0, None, t(0));
        }
        assert!(calls <= 12, "{calls} calls in the first minute");
    }

    #[test]
    fn permanent_failures_wait_minutes_and_throttling_at_least_a_minute() {
        assert_eq!(provider_retry(RetryClass::Permanent, 0, 0.5, None, t(0)), PERMANENT_MIN);
        assert_eq!(
            provider_retry(RetryClass::Permanent, 10, 0.5, None, t(0)),
            RECHECK_INVALID
        );
        assert!(provider_retry(RetryClass::Throttled(None), 0, 0.0, None, t(0)) >= THROTTLED_MIN);
        // Still before the secret in place expires.
        assert_eq!(
            provider_retry(RetryClass::Permanent, 3, 0.5, Some(t(600)), t(0)),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn a_retry_after_hint_is_honoured_capped_and_before_expiry() {
        let hint = |s| RetryClass::Throttled(Some(Duration::from_secs(s)));
        // The next attempt waits at least what the provider asked for ...
        assert_eq!(provider_retry(hint(30), 0, 0.0, None, t(0)), Duration::from_secs(30));
        assert_eq!(provider_retry(hint(90), 2, 0.9, None, t(0)), Duration::from_secs(90));
        // ... and a short hint never shortens the backoff of a provider that keeps
        // throttling.
        assert!(provider_retry(hint(1), 9, 0.0, None, t(0)) >= Duration::from_secs(150));
        // A day is capped at an hour, and the secret in place is retried before it expires.
        assert_eq!(provider_retry(hint(86_400), 0, 0.0, None, t(0)), THROTTLED_MAX);
        assert_eq!(
            provider_retry(hint(600), 0, 0.0, Some(t(300)), t(0)),
            Duration::from_secs(150)
        );
    }

    #[test]
    fn the_class_of_a_throttled_error_carries_its_hint() {
        let e = crate::provider::ProviderError::Cloud {
            provider: "ecr",
            failure: CloudFailure::Throttled {
                retry_after: Some(Duration::from_secs(30)),
            },
            message: "ThrottlingException".into(),
        };
        assert_eq!(RetryClass::of(&e), RetryClass::Throttled(Some(Duration::from_secs(30))));
    }

    #[test]
    fn a_stored_credential_read_again_unchanged_keeps_the_schedule_in_status() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let status = crate::crd::RegistryCredentialStatus {
            observed_generation: Some(3),
            content_hash: Some("h1".into()),
            last_refresh_time: Some(Time(t(1_000))),
            next_refresh_time: Some(Time(t(4_600))),
            ..Default::default()
        };
        let fresh = crate::controller::cache::Cached {
            credential: Credential {
                username: "u".into(),
                password: secrecy::SecretString::from("p"),
                expires_at: None,
            },
            issued_at: t(2_000),
            refresh_at: t(5_600),
        };
        let keep = |s: Option<&crate::crd::RegistryCredentialStatus>, generation, mints, hash| {
            unchanged_schedule(s, generation, mints, hash, &fresh, t(2_000))
        };
        assert_eq!(keep(Some(&status), Some(3), false, "h1"), Some((t(1_000), t(4_600))));
        assert_eq!(keep(Some(&status), Some(3), false, "h2"), None, "changed content");
        assert_eq!(keep(Some(&status), Some(4), false, "h1"), None, "new generation");
        assert_eq!(
            keep(Some(&status), Some(3), true, "h1"),
            None,
            "minted tokens are recovered, not re-read"
        );
        assert_eq!(keep(None, Some(3), false, "h1"), None);
        let due = unchanged_schedule(Some(&status), Some(3), false, "h1", &fresh, t(4_600));
        assert_eq!(due, None, "the recorded refresh is due: a new schedule");
    }
}
