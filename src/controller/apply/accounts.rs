//! One writer per ServiceAccount. Every credential that targets a namespace wants an entry
//! in the same `default` ServiceAccount at about the same time; patched independently, each
//! from its own copy, all but one patch fail their resourceVersion test and are retried
//! (20 credentials made 3 patches per entry, and at 5,000 namespaces never settled). Here
//! the changes wanted for one ServiceAccount queue up, and whoever's turn it is writes all
//! of them in one patch, computed from the freshest copy known: the watch cache, or the
//! answer to the previous patch. A patch that finds the ServiceAccount changed (someone
//! else wrote it) reads it again and retries, at most [`ATTEMPTS`] times.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::oneshot;

use super::Error;
use super::status_code;
use crate::controller::index::{Account, Index};
use crate::controller::plan::SaChange;
use crate::controller::service_account;

/// Patches per batch at most (the first from the cached copy, then after reading it again).
pub const ATTEMPTS: usize = 3;

type Key = (String, String);
/// Shared by every change a patch carried.
type Answer = Result<(), Arc<Error>>;

#[derive(Default)]
struct Slot {
    /// Held by the writer whose turn it is, with the answer to the last patch in this turn's
    /// run (a fresher copy than the cache until the watch catches up).
    turn: tokio::sync::Mutex<Option<Account>>,
    waiting: Mutex<Vec<(SaChange, oneshot::Sender<Answer>)>>,
}

/// Writes ServiceAccount entries for every credential (see the module docs).
#[derive(Clone)]
pub struct Accounts {
    client: Client,
    cache: Index<Account>,
    slots: Arc<Mutex<HashMap<Key, Arc<Slot>>>>,
}

impl Accounts {
    /// A writer reading ServiceAccounts from `cache`.
    pub fn new(client: Client, cache: Index<Account>) -> Self {
        Self {
            client,
            cache,
            slots: Arc::default(),
        }
    }

    /// Makes `change`, together with any others waiting for the same ServiceAccount.
    /// Returns how it went and the requests this call sent (0 when another caller's patch
    /// carried the change).
    pub async fn change(&self, change: SaChange) -> (Answer, usize) {
        let key = (change.namespace.clone(), change.name.clone());
        let slot = crate::lock(&self.slots).entry(key.clone()).or_default().clone();
        let (tx, mut rx) = oneshot::channel();
        crate::lock(&slot.waiting).push((change, tx));
        let mut requests = 0;
        let carried = {
            let mut latest = slot.turn.lock().await;
            // A writer before us may have carried our change (answering before it let go).
            match rx.try_recv() {
                Ok(answer) => Some(answer),
                Err(_) => {
                    let batch = std::mem::take(&mut *crate::lock(&slot.waiting));
                    let (answer, sent) = self.write(&key, &mut latest, &batch).await;
                    requests = sent;
                    for (_, tx) in batch {
                        let _ = tx.send(answer.clone());
                    }
                    None
                }
            }
        };
        self.release(&key, slot);
        let answer = match carried {
            Some(answer) => answer,
            // The writer carrying it was cancelled (shutdown): not written.
            None => rx.await.unwrap_or_else(|_| {
                let cancelled = std::io::Error::other("the patch carrying this entry was cancelled");
                Err(patch_error(&key.0, &key.1, kube::Error::Service(Box::new(cancelled))))
            }),
        };
        (answer, requests)
    }

    /// Forgets the slot once nobody else holds it.
    fn release(&self, key: &Key, slot: Arc<Slot>) {
        let mut slots = crate::lock(&self.slots);
        // The map's reference and ours: nobody is waiting.
        if Arc::strong_count(&slot) == 2 {
            slots.remove(key);
        }
    }

    async fn write(
        &self,
        (namespace, name): &Key,
        latest: &mut Option<Account>,
        batch: &[(SaChange, oneshot::Sender<Answer>)],
    ) -> (Answer, usize) {
        let (add, remove) = wanted(batch.iter().map(|(c, _)| c));
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace);
        let cached = self.cache.read().get(namespace, name).cloned();
        let mut base = freshest(cached, latest.take());
        let mut requests = 0;
        for attempt in 1..=ATTEMPTS {
            let Some(sa) = base.take() else {
                // Not seen yet (or deleted): nothing to write to.
                return (Ok(()), requests);
            };
            let Some(patch) = service_account::patch(&sa, &add, &remove) else {
                *latest = Some(sa);
                return (Ok(()), requests);
            };
            requests += 1;
            let patch: json_patch::Patch = match serde_json::from_value(patch) {
                Ok(p) => p,
                Err(source) => {
                    let namespace = namespace.clone();
                    return (Err(Arc::new(Error::Body { namespace, source })), requests);
                }
            };
            match api
                .patch(name, &PatchParams::default(), &Patch::<Value>::Json(patch))
                .await
            {
                Ok(written) => {
                    *latest = Some(Account::of(&written));
                    return (Ok(()), requests);
                }
                // Gone meanwhile: nothing to do.
                Err(e) if status_code(&e) == Some(404) => return (Ok(()), requests),
                // Changed since the copy the patch was made from: read it and try again.
                Err(e) if matches!(status_code(&e), Some(409 | 422)) && attempt < ATTEMPTS => {
                    requests += 1;
                    match api.get_opt(name).await {
                        Ok(fresh) => base = fresh.as_ref().map(Account::of),
                        Err(source) => return (Err(patch_error(namespace, name, source)), requests),
                    }
                }
                Err(source) => return (Err(patch_error(namespace, name, source)), requests),
            }
        }
        (Ok(()), requests)
    }
}

fn patch_error(namespace: &str, name: &str, source: kube::Error) -> Arc<Error> {
    Arc::new(Error::PatchServiceAccount {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })
}

/// The entries to add and to remove for a batch of changes; where one Secret is both
/// added and removed, the later change wins.
fn wanted<'a>(changes: impl Iterator<Item = &'a SaChange>) -> (Vec<&'a str>, Vec<&'a str>) {
    let mut last: Vec<(&str, bool)> = Vec::new();
    for c in changes {
        last.retain(|(s, _)| *s != c.secret);
        last.push((&c.secret, c.add));
    }
    let add = last.iter().filter(|(_, a)| *a).map(|(s, _)| *s).collect();
    let remove = last.iter().filter(|(_, a)| !*a).map(|(s, _)| *s).collect();
    (add, remove)
}

/// The newer of two copies by resourceVersion (numeric in practice; the cache wins when
/// either is not a number).
fn freshest(cached: Option<Account>, written: Option<Account>) -> Option<Account> {
    let rv = |sa: &Account| sa.resource_version.parse::<u64>().ok();
    match (cached, written) {
        (Some(c), Some(w)) => match (rv(&c), rv(&w)) {
            (Some(a), Some(b)) if b > a => Some(w),
            _ => Some(c),
        },
        (c, w) => c.or(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(secret: &str, add: bool) -> SaChange {
        SaChange {
            namespace: "a".into(),
            name: "default".into(),
            secret: secret.into(),
            add,
        }
    }

    fn sa(rv: &str) -> Account {
        let mut sa = ServiceAccount::default();
        sa.metadata.resource_version = Some(rv.into());
        Account::of(&sa)
    }

    #[test]
    fn a_batch_adds_and_removes_with_the_later_change_winning() {
        let changes = [
            change("x", true),
            change("y", true),
            change("x", false),
            change("z", false),
        ];
        assert_eq!(wanted(changes.iter()), (vec!["y"], vec!["x", "z"]));
    }

    #[test]
    fn the_freshest_copy_is_the_higher_resource_version() {
        let pick =
            |c: Option<&str>, w: Option<&str>| freshest(c.map(sa), w.map(sa)).map(|s| s.resource_version.to_string());
        assert_eq!(
            pick(Some("10"), Some("12")).as_deref(),
            Some("12"),
            "our answer is newer"
        );
        assert_eq!(
            pick(Some("15"), Some("12")).as_deref(),
            Some("15"),
            "the watch caught up"
        );
        assert_eq!(
            pick(Some("x"), Some("12")).as_deref(),
            Some("x"),
            "not a number: the cache"
        );
        assert_eq!(pick(None, Some("12")).as_deref(), Some("12"));
        assert_eq!(pick(None, None), None);
    }
}
