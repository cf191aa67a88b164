//! Issued credentials, kept until their refresh time so that namespace churn never makes
//! pullkeeper call a provider again: one provider call per credential per refresh. An
//! entry is dropped when the spec changes (new generation) or a source Secret changes.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;

use crate::provider::Credential;

use super::triggers::Trigger;

#[derive(Clone)]
struct Entry {
    generation: Option<i64>,
    cached: Cached,
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
    entries: Mutex<HashMap<Trigger, Entry>>,
}

impl CredentialCache {
    /// The cached credential, if still fresh for this generation.
    pub fn get(&self, key: &Trigger, generation: Option<i64>, now: Timestamp) -> Option<Cached> {
        let entries = crate::lock(&self.entries);
        let e = entries.get(key)?;
        (e.generation == generation && now < e.cached.refresh_at).then(|| e.cached.clone())
    }

    /// Remembers a credential until its `refresh_at`.
    pub fn put(&self, key: Trigger, generation: Option<i64>, cached: Cached) {
        crate::lock(&self.entries).insert(key, Entry { generation, cached });
    }

    /// Forgets a credential (source changed, object deleted, or a refresh failed).
    pub fn invalidate(&self, key: &Trigger) {
        crate::lock(&self.entries).remove(key);
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
        let key = Trigger::Cluster("a".into());
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
}
