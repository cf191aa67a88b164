//! Issued credentials, kept until their refresh time so that namespace churn never makes
//! pullkeeper call a provider again: one provider call per credential per refresh. A
//! failed call is kept too, until its retry time, so no trigger (a namespace, a
//! ServiceAccount, the operator's own status write) can send the provider more requests
//! than the backoff allows. An entry is dropped when the spec changes (new generation) or
//! a source Secret changes from the copy its provider read, so a fix is tried at once.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;

use crate::provider::{Credential, Found, Read};

use super::identity::CredentialRef;

#[derive(Clone)]
struct Entry {
    generation: Option<i64>,
    state: State,
    /// The source Secrets the provider read for this entry, as it found them.
    read: Read,
}

#[derive(Clone)]
enum State {
    Issued(Cached),
    Failed(Failure),
}

/// A failed provider call: what it said and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// CamelCase reason of the error.
    pub reason: &'static str,
    /// The error's message (never a secret value).
    pub message: String,
    /// Whether retrying cannot help until something changes.
    pub permanent: bool,
    /// When the provider may be asked again.
    pub retry_at: Timestamp,
}

impl Failure {
    /// Not a failure yet: the provider was asked at `asked_at` and has not answered. The
    /// answer brings the credential back; `retry_at` is a safety net.
    pub fn waiting(provider: &str, asked_at: Timestamp, recheck: std::time::Duration) -> Self {
        Self {
            reason: crate::crd::conditions::reasons::ISSUING,
            message: format!("waiting for the {provider} provider to answer"),
            permanent: false,
            retry_at: asked_at.checked_add(recheck).unwrap_or(Timestamp::MAX),
        }
    }
}

/// A credential with when it was issued and when it is due for renewal.
#[derive(Clone, Debug)]
pub struct Cached {
    /// The credential.
    pub credential: Credential,
    /// When the provider issued it.
    pub issued_at: Timestamp,
    /// When to ask the provider again.
    pub refresh_at: Timestamp,
}

/// Credentials by the credential object they belong to.
#[derive(Default)]
pub struct CredentialCache {
    entries: Mutex<HashMap<CredentialRef, Entry>>,
    /// How many entries were dropped so far (see [`CredentialCache::put_unless_dropped`]).
    dropped: std::sync::atomic::AtomicU64,
}

impl CredentialCache {
    /// The cached credential, if still fresh for this generation, or the last failure if
    /// its retry time has not come; `None` when the provider should be asked.
    pub fn lookup(
        &self,
        key: &CredentialRef,
        generation: Option<i64>,
        now: Timestamp,
    ) -> Option<Result<Cached, Failure>> {
        let entries = crate::lock(&self.entries);
        let e = entries.get(key).filter(|e| e.generation == generation)?;
        match &e.state {
            State::Issued(c) => (now < c.refresh_at).then(|| Ok(c.clone())),
            State::Failed(f) => (now < f.retry_at).then(|| Err(f.clone())),
        }
    }

    /// What the last call for this generation gave, whenever it was: while a new call is
    /// under way, a credential that keeps failing still reports its failure.
    pub fn last(&self, key: &CredentialRef, generation: Option<i64>) -> Option<Result<Cached, Failure>> {
        let entries = crate::lock(&self.entries);
        let e = entries.get(key).filter(|e| e.generation == generation)?;
        Some(match &e.state {
            State::Issued(c) => Ok(c.clone()),
            State::Failed(f) => Err(f.clone()),
        })
    }

    /// The cached credential, if still fresh for this generation.
    pub fn get(&self, key: &CredentialRef, generation: Option<i64>, now: Timestamp) -> Option<Cached> {
        self.lookup(key, generation, now)?.ok()
    }

    /// Remembers a credential until its `refresh_at`. What its provider read stays as
    /// recorded for this generation (the same credential, re-timed), and is unknown for a
    /// credential not issued here (one recovered after a restart).
    pub fn put(&self, key: CredentialRef, generation: Option<i64>, cached: Cached) {
        self.put_unless_dropped(key, generation, cached, self.drops());
    }

    /// How many entries have been dropped so far: a mark to pass to
    /// [`CredentialCache::put_unless_dropped`].
    pub fn drops(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// [`CredentialCache::put`], unless an entry was dropped since `mark` (from
    /// [`CredentialCache::drops`], taken before `cached` was obtained): a source Secret
    /// edited meanwhile must not see the credential read from its old copy kept again.
    /// Returns whether it was kept.
    pub fn put_unless_dropped(&self, key: CredentialRef, generation: Option<i64>, cached: Cached, mark: u64) -> bool {
        let mut entries = crate::lock(&self.entries);
        if self.drops() != mark {
            return false;
        }
        let read = entries
            .remove(&key)
            .filter(|e| e.generation == generation)
            .map(|e| e.read)
            .unwrap_or_default();
        entries.insert(
            key,
            Entry {
                generation,
                state: State::Issued(cached),
                read,
            },
        );
        true
    }

    /// Remembers a credential the provider just issued from the source Secrets in `read`,
    /// until its `refresh_at`.
    pub fn put_issued(&self, key: CredentialRef, generation: Option<i64>, cached: Cached, read: Read) {
        crate::lock(&self.entries).insert(
            key,
            Entry {
                generation,
                state: State::Issued(cached),
                read,
            },
        );
    }

    /// Remembers a failed call, made with the source Secrets in `read`, until its
    /// `retry_at`.
    pub fn put_failure(&self, key: CredentialRef, generation: Option<i64>, failure: Failure, read: Read) {
        crate::lock(&self.entries).insert(
            key,
            Entry {
                generation,
                state: State::Failed(failure),
                read,
            },
        );
    }

    /// How the provider call behind the entry kept for `key` found the source Secret
    /// `namespace/name`; `None` when unknown (nothing kept, a credential recovered after a
    /// restart, or a Secret the call did not or could not read).
    pub fn source_read(&self, key: &CredentialRef, namespace: &str, name: &str) -> Option<Found> {
        let entries = crate::lock(&self.entries);
        entries
            .get(key)?
            .read
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets a credential (source changed, object deleted, or a refresh failed).
    pub fn invalidate(&self, key: &CredentialRef) {
        let mut entries = crate::lock(&self.entries);
        entries.remove(key);
        self.dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn cred() -> Credential {
        Credential {
            username: "u".into(),
            password: SecretString::from("p"),
            expires_at: None,
        }
    }

    #[test]
    fn fresh_until_refresh_time_and_same_generation() {
        let c = CredentialCache::default();
        let key = CredentialRef::cluster("a");
        let t0 = Timestamp::from_second(1_800_000_000).expect("t");
        let later = Timestamp::from_second(1_800_000_100).expect("t");
        c.put(
            key.clone(),
            Some(1),
            Cached {
                credential: cred(),
                issued_at: t0,
                refresh_at: later,
            },
        );
        assert!(c.get(&key, Some(1), t0).is_some());
        assert!(c.get(&key, Some(2), t0).is_none(), "a spec change re-issues");
        assert!(c.get(&key, Some(1), later).is_none(), "due for refresh");
        c.invalidate(&key);
        assert!(c.get(&key, Some(1), t0).is_none());
    }

    #[test]
    fn a_failure_holds_until_its_retry_time_or_a_change() {
        let c = CredentialCache::default();
        let key = CredentialRef::cluster("a");
        let t0 = Timestamp::from_second(1_800_000_000).expect("t");
        let retry_at = Timestamp::from_second(1_800_000_030).expect("t");
        let failure = Failure {
            reason: "ProviderUnreachable",
            message: "down".into(),
            permanent: false,
            retry_at,
        };
        c.put_failure(key.clone(), Some(1), failure.clone(), Read::new());
        assert_eq!(c.lookup(&key, Some(1), t0).and_then(Result::err), Some(failure));
        assert!(c.get(&key, Some(1), t0).is_none());
        assert!(c.lookup(&key, Some(1), retry_at).is_none(), "due for a retry");
        assert!(c.lookup(&key, Some(2), t0).is_none(), "a spec change retries at once");
        c.invalidate(&key);
        assert!(c.lookup(&key, Some(1), t0).is_none(), "a source change retries at once");
    }
    #[test]
    fn a_credential_obtained_before_a_drop_is_not_kept_again() {
        let c = CredentialCache::default();
        let (key, other) = (CredentialRef::cluster("a"), CredentialRef::cluster("b"));
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).expect("t");
        let cached = Cached {
            credential: cred(),
            issued_at: t(0),
            refresh_at: t(100),
        };
        let mark = c.drops();
        // A source Secret edit drops the credential while a reconcile holds its old copy.
        c.invalidate(&key);
        assert!(!c.put_unless_dropped(key.clone(), Some(1), cached.clone(), mark));
        assert!(c.get(&key, Some(1), t(0)).is_none(), "the edit is not undone");
        assert!(c.put_unless_dropped(other.clone(), Some(1), cached, c.drops()));
        assert!(c.get(&other, Some(1), t(0)).is_some());
    }

    #[test]
    fn what_the_provider_read_is_kept_with_its_entry() {
        let c = CredentialCache::default();
        let key = CredentialRef::cluster("a");
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).expect("t");
        let cached = Cached {
            credential: cred(),
            issued_at: t(0),
            refresh_at: t(100),
        };
        let read = Read::from([(("ops".into(), "pat".into()), Found::At("7".into()))]);
        c.put_issued(key.clone(), Some(1), cached.clone(), read);
        assert_eq!(c.source_read(&key, "ops", "pat"), Some(Found::At("7".into())));
        assert_eq!(c.source_read(&key, "ops", "other"), None, "not read");
        c.put(key.clone(), Some(1), cached.clone());
        assert_eq!(
            c.source_read(&key, "ops", "pat"),
            Some(Found::At("7".into())),
            "the same credential re-timed"
        );
        c.put(key.clone(), Some(2), cached.clone());
        assert_eq!(c.source_read(&key, "ops", "pat"), None, "another generation");
        c.put_issued(
            key.clone(),
            Some(2),
            cached,
            Read::from([(("ops".into(), "pat".into()), Found::Missing)]),
        );
        c.invalidate(&key);
        assert_eq!(c.source_read(&key, "ops", "pat"), None, "nothing kept");
    }

    #[test]
    fn the_last_answer_stays_available_while_a_new_call_is_under_way() {
        let c = CredentialCache::default();
        let key = CredentialRef::cluster("a");
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).expect("t");
        let mut credential = cred();
        credential.expires_at = Some(t(200));
        c.put(
            key.clone(),
            Some(1),
            Cached {
                credential,
                issued_at: t(0),
                refresh_at: t(100),
            },
        );
        assert!(c.get(&key, Some(1), t(150)).is_none(), "due for renewal");
        assert!(
            matches!(c.last(&key, Some(1)), Some(Ok(_))),
            "still there while renewing"
        );
        assert!(c.last(&key, Some(2)).is_none(), "another generation");
        let failure = Failure::waiting("gcp", t(150), std::time::Duration::from_secs(30));
        c.put_failure(key.clone(), Some(1), failure.clone(), Read::new());
        assert_eq!(
            c.last(&key, Some(1)).and_then(Result::err),
            Some(failure),
            "the last failure stands"
        );
    }
}
