//! Narrow watches on the Secrets credentials read (one field-selector watch each), so an
//! edit propagates at once without caching every Secret in the cluster. A credential is
//! issued again only when its Secret differs from the copy its provider read: the list
//! that starts a watch (or follows a restart of the apiserver) showing the very copy a
//! credential was just issued from changes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::provider::{Found, Read};

use super::cache::CredentialCache;
use super::identity::CredentialRef;
use super::watches::{Requests, drive};

/// Narrow watches on the Secrets that credentials read, so an edit propagates at once
/// without caching every Secret in the cluster.
pub struct SourceWatches {
    client: Client,
    requests: Requests,
    credentials: Arc<CredentialCache>,
    shutdown: CancellationToken,
    watches: Mutex<HashMap<(String, String), Watch>>,
}

struct Watch {
    referrers: Arc<Mutex<HashSet<CredentialRef>>>,
    /// How the watch last saw its Secret (`None`: not listed yet, or at no version).
    latest: Arc<Mutex<Option<Found>>>,
    stop: CancellationToken,
}

impl SourceWatches {
    /// A new, empty set of watches.
    pub fn new(
        client: Client,
        requests: Requests,
        credentials: Arc<CredentialCache>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            client,
            requests,
            credentials,
            shutdown,
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// Makes `referrer` watch exactly `sources` (`(namespace, name)` pairs), starting and
    /// stopping watches as needed.
    pub fn sync(&self, referrer: &CredentialRef, sources: &[(String, String)]) {
        let mut watches = crate::lock(&self.watches);
        for source in sources {
            let w = watches.entry(source.clone()).or_insert_with(|| self.spawn(source));
            crate::lock(&w.referrers).insert(referrer.clone());
        }
        watches.retain(|key, w| {
            if !sources.contains(key) {
                crate::lock(&w.referrers).remove(referrer);
            }
            let keep = !crate::lock(&w.referrers).is_empty();
            if !keep {
                w.stop.cancel();
            }
            keep
        });
    }

    /// Whether a watched Secret in `read` (what a provider call just read) has been seen
    /// since as another copy: the change came before the call's answer was kept, so the
    /// watch event found nothing to drop, and the answer is out of date.
    pub fn outdated(&self, read: &Read) -> bool {
        let watches = crate::lock(&self.watches);
        read.iter().any(|(source, found)| {
            watches.get(source).is_some_and(|w| {
                crate::lock(&w.latest)
                    .as_ref()
                    .is_some_and(|seen| changed(Some(found), Some(seen)))
            })
        })
    }

    fn spawn(&self, source: &(String, String)) -> Watch {
        let (namespace, name) = source;
        let referrers: Arc<Mutex<HashSet<CredentialRef>>> = Arc::default();
        let latest: Arc<Mutex<Option<Found>>> = Arc::default();
        let stop = self.shutdown.child_token();
        let stream = watcher(
            Api::<PartialObjectMeta<Secret>>::namespaced(self.client.clone(), namespace),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff();
        let (who, seen, credentials) = (referrers.clone(), latest.clone(), self.credentials.clone());
        let (source, listed) = (source.clone(), Mutex::new(false));
        drive("source secret", stream, self.requests.clone(), &stop, move |event| {
            let Some(now) = observed(&event, &mut crate::lock(&listed)) else {
                return (None, Vec::new());
            };
            // First what the watch saw, then what was kept: a call that keeps its answer
            // in between finds the new copy in `outdated`.
            crate::lock(&seen).clone_from(&now);
            let referrers: Vec<CredentialRef> = crate::lock(&who).iter().cloned().collect();
            let concerned: Vec<CredentialRef> = referrers
                .into_iter()
                .filter(|c| changed(credentials.source_read(c, &source.0, &source.1).as_ref(), now.as_ref()))
                .collect();
            // The source changed: the next reconcile must read it again.
            for c in &concerned {
                credentials.invalidate(c);
            }
            (None, concerned)
        });
        Watch {
            referrers,
            latest,
            stop,
        }
    }
}

/// How a watch event shows the Secret now: `None` when it tells nothing new (the start or
/// the end of a list that showed the Secret), `Some(None)` when the Secret is there at no
/// version anyone could compare. `listed` tracks whether the list under way showed it: a
/// list without it (the Secret is gone, also when deleted while the watch was down) says
/// `Missing` when it ends. Pure.
fn observed(event: &watcher::Event<PartialObjectMeta<Secret>>, listed: &mut bool) -> Option<Option<Found>> {
    let version = |o: &PartialObjectMeta<Secret>| o.metadata.resource_version.clone().map(Found::At);
    match event {
        watcher::Event::Init => {
            *listed = false;
            None
        }
        watcher::Event::InitApply(o) => {
            *listed = true;
            Some(version(o))
        }
        watcher::Event::InitDone => (!*listed).then_some(Some(Found::Missing)),
        watcher::Event::Apply(o) => Some(version(o)),
        watcher::Event::Delete(_) => Some(Some(Found::Missing)),
    }
}

/// Whether a credential whose provider found its source Secret as `read` must be issued
/// again now that the Secret is seen as `now`: unless both are known and the same (same
/// resourceVersion, or missing both times). Pure.
fn changed(read: Option<&Found>, now: Option<&Found>) -> bool {
    !matches!((read, now), (Some(read), Some(now)) if read == now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(version: &str) -> Found {
        Found::At(version.to_owned())
    }

    fn secret(version: Option<&str>) -> PartialObjectMeta<Secret> {
        let mut o = PartialObjectMeta::<Secret>::default();
        o.metadata.name = Some("pat".into());
        o.metadata.resource_version = version.map(str::to_owned);
        o
    }

    #[test]
    fn only_another_copy_than_the_one_read_issues_again() {
        assert!(
            !changed(Some(&at("7")), Some(&at("7"))),
            "the first list shows the copy read"
        );
        assert!(changed(Some(&at("7")), Some(&at("8"))), "an edit");
        assert!(changed(Some(&at("7")), Some(&Found::Missing)), "a deletion");
        assert!(
            changed(Some(&Found::Missing), Some(&at("8"))),
            "created after a failed read"
        );
        assert!(!changed(Some(&Found::Missing), Some(&Found::Missing)), "still missing");
        assert!(changed(None, Some(&at("7"))), "read version unknown: as before");
        assert!(changed(None, Some(&Found::Missing)));
        assert!(changed(Some(&at("7")), None), "seen at no version");
    }

    #[tokio::test]
    async fn an_answer_read_from_a_copy_the_watch_no_longer_sees_is_outdated() {
        let (client, _script) = crate::controller::fixtures::apiserver(vec![]);
        let ctx = crate::controller::fixtures::context(client);
        let source = ("ops".to_owned(), "pat".to_owned());
        ctx.sources
            .sync(&CredentialRef::cluster("a"), std::slice::from_ref(&source));
        let read = |found: Found| Read::from([(source.clone(), found)]);
        assert!(
            !ctx.sources.outdated(&read(at("7"))),
            "not listed yet: the list decides"
        );
        let latest = crate::lock(&ctx.sources.watches)[&source].latest.clone();
        *crate::lock(&latest) = Some(at("8"));
        assert!(
            ctx.sources.outdated(&read(at("7"))),
            "edited before the answer was kept"
        );
        assert!(!ctx.sources.outdated(&read(at("8"))));
        assert!(ctx.sources.outdated(&read(Found::Missing)), "created meanwhile");
        let elsewhere = Read::from([(("ops".to_owned(), "other".to_owned()), at("1"))]);
        assert!(!ctx.sources.outdated(&elsewhere), "not watched");
    }

    #[tokio::test]
    async fn the_list_that_starts_a_watch_drops_only_what_was_read_from_another_copy() {
        use crate::controller::cache::Cached;
        use crate::controller::fixtures::{Expect, apiserver};
        use k8s_openapi::jiff::Timestamp;
        let listed = serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "9"},
            "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": "pat", "namespace": "ops", "resourceVersion": "7"}}],
        });
        let (client, _script) = apiserver(vec![Expect::new(
            "GET",
            "/api/v1/namespaces/ops/secrets?fieldSelector=metadata.name%3Dpat&limit=500",
            200,
            listed,
        )]);
        let (requests, _streams) = Requests::channel();
        let credentials = Arc::new(CredentialCache::default());
        let shutdown = CancellationToken::new();
        let watches = SourceWatches::new(client, requests, credentials.clone(), shutdown.clone());
        let now = Timestamp::now();
        let cached = Cached {
            credential: crate::provider::Credential {
                username: "u".into(),
                password: secrecy::SecretString::from("p"),
                expires_at: None,
            },
            issued_at: now,
            refresh_at: now.checked_add(std::time::Duration::from_secs(3600)).expect("t"),
        };
        let source = ("ops".to_owned(), "pat".to_owned());
        let (same, older) = (CredentialRef::cluster("same"), CredentialRef::cluster("older"));
        for (who, version) in [(&same, "7"), (&older, "6")] {
            let read = Read::from([(source.clone(), at(version))]);
            credentials.put_issued(who.clone(), Some(1), cached.clone(), read);
            watches.sync(who, std::slice::from_ref(&source));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while credentials.get(&older, Some(1), now).is_some() {
            assert!(tokio::time::Instant::now() < deadline, "the list never came");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            credentials.get(&same, Some(1), now).is_some(),
            "issued from the copy listed: kept"
        );
        shutdown.cancel();
    }

    #[test]
    fn a_list_without_the_secret_says_it_is_missing() {
        use watcher::Event;
        let mut listed = false;
        assert_eq!(observed(&Event::Init, &mut listed), None);
        assert_eq!(observed(&Event::InitDone, &mut listed), Some(Some(Found::Missing)));
        assert_eq!(
            observed(&Event::Apply(secret(Some("3"))), &mut listed),
            Some(Some(at("3")))
        );
        assert_eq!(
            observed(&Event::Delete(secret(Some("4"))), &mut listed),
            Some(Some(Found::Missing))
        );
        // A re-list (410 Gone) that shows the Secret reports its copy once.
        assert_eq!(observed(&Event::Init, &mut listed), None);
        assert_eq!(
            observed(&Event::InitApply(secret(Some("5"))), &mut listed),
            Some(Some(at("5")))
        );
        assert_eq!(observed(&Event::InitDone, &mut listed), None);
        assert_eq!(observed(&Event::Apply(secret(None)), &mut listed), Some(None));
    }
}
