//! Watches as data: one index per cluster-wide input (namespaces, metadata only;
//! pullkeeper's own Secrets, metadata only and label-filtered; ServiceAccounts), each a
//! compact copy (see [`super::index`]),
//! one narrow watch per referenced source Secret, and for each a pure function saying
//! which credentials an event concerns. The reconcile requests go to the controller of
//! the credential's kind. Watch errors are logged and retried with backoff (kube-runtime's
//! watcher), and a watch that ends is reported as an error: none stalls silently.
//!
//! kube-runtime's shared streams (`watches_shared_stream`) do not pass deletions on, and a
//! deleted managed Secret must bring its credential back, so each watch's events feed both
//! controllers through [`Requests`] instead.

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use std::sync::Arc;

use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::crd::{ClusterRegistryCredential, RegistryCredential};

use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use super::CredentialKind;
use super::identity::CredentialRef;
use super::index::{Account, Index, ManagedSecret, Objects, map_event};
use super::mappers::{SecretEvent, namespace_concerns, secret_concerns, service_account_concerns};
use super::plan;
pub use super::requests::{RequestStreams, Requests};
use super::secret::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use super::target::NamespaceInfo;
use super::validate;

/// Read-only caches the reconcilers plan from.
#[derive(Clone, Default)]
pub struct Caches {
    /// Every namespace.
    pub namespaces: Index<NamespaceInfo>,
    /// Every Secret labelled `app.kubernetes.io/managed-by=pullkeeper`.
    pub secrets: Index<ManagedSecret>,
    /// Every ServiceAccount.
    pub service_accounts: Index<Account>,
}

impl Caches {
    /// Waits until every cache has done its initial list.
    pub async fn ready(&self) {
        self.namespaces.ready().await;
        self.secrets.ready().await;
        self.service_accounts.ready().await;
    }
}

/// The credentials both controllers hold, which the mappers consult.
#[derive(Clone)]
pub struct Credentials {
    /// ClusterRegistryCredentials (those that do not deserialize included).
    pub clusters: Store<DeserializeGuard<ClusterRegistryCredential>>,
    /// RegistryCredentials (those that do not deserialize included).
    pub namespaced: Store<DeserializeGuard<RegistryCredential>>,
}

/// The objects of a store that deserialized.
pub fn readable<K>(state: &[Arc<DeserializeGuard<K>>]) -> Vec<&K> {
    state.iter().filter_map(|g| g.0.as_ref().ok()).collect()
}

impl Credentials {
    /// The credentials older than `me` (created at `created`) that would write a Secret
    /// called `secret_name`, are valid, not suspended and not being deleted: where one
    /// targets a namespace nobody holds the name in yet, it has the first claim.
    pub fn rivals(&self, me: &CredentialRef, created: Option<Timestamp>, secret_name: &str) -> Vec<plan::Rival> {
        let (clusters, namespaced) = (self.clusters.state(), self.namespaced.state());
        let (clusters, namespaced) = (readable(&clusters), readable(&namespaced));
        // The name first (cheap): only the few credentials of the same name are validated.
        let wants = |name: String, explicit: Option<&str>| validate::secret_name_of(&name, explicit) == secret_name;
        let candidates = clusters
            .iter()
            .filter(|c| c.meta().deletion_timestamp.is_none())
            .filter(|c| wants(c.name_any(), c.spec.target.secret_name.as_deref()))
            .map(|c| (c.reference(), c.meta().creation_timestamp.as_ref(), c.validate()))
            .chain(
                namespaced
                    .iter()
                    .filter(|r| r.meta().deletion_timestamp.is_none())
                    .filter(|r| wants(r.name_any(), r.spec.target.secret_name.as_deref()))
                    .map(|r| (r.reference(), r.meta().creation_timestamp.as_ref(), r.validate())),
            );
        let mut rivals = candidates
            .filter(|(who, since, _)| who != me && plan::senior((since.map(|t| t.0), who), (created, me)))
            .filter_map(|(who, since, spec)| {
                let spec = spec.ok()?;
                (spec.secret_name == secret_name && !spec.suspend).then_some((since.map(|t| t.0), who, spec.scope))
            })
            .collect::<Vec<_>>();
        // The most senior first: where several have a claim, the oldest is named.
        rivals.sort_by(|a, b| {
            if plan::senior((a.0, &a.1), (b.0, &b.1)) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        rivals
            .into_iter()
            .map(|(_, who, scope)| plan::Rival { who, scope })
            .collect()
    }
}

/// Starts the cluster-wide watches; their events become requests for the credentials
/// they concern until `shutdown`.
pub fn start(client: &Client, credentials: &Credentials, requests: &Requests, shutdown: &CancellationToken) -> Caches {
    let caches = Caches::default();

    let index = caches.namespaces.clone();
    let namespaces = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map_ok(|event| map_event(event, |ns| NamespaceInfo::from_meta(&ns.metadata)))
    .inspect_ok(move |event| index.apply(event))
    .touched_objects();
    let (creds, secrets) = (credentials.clone(), caches.secrets.clone());
    drive("namespaces", namespaces, requests.clone(), shutdown, move |info| {
        let concerns = namespace_concerns(
            &info,
            &readable(&creds.clusters.state()),
            &readable(&creds.namespaced.state()),
            |who, name| {
                let secrets = secrets.read();
                secrets.get(&info.name, name).and_then(ManagedSecret::holder).as_ref() == Some(who)
            },
        );
        (Some(info.name), concerns)
    });

    let (index, mut objects) = (caches.secrets.clone(), Objects::default());
    let managed = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")),
    )
    .default_backoff()
    .map_ok(move |event| map_event(event, |s| objects.secret(&s.metadata)))
    .inspect_ok(move |event| index.apply(event))
    .try_filter_map(|event| async move {
        Ok(match event {
            // A Secret written or deleted concerns the credentials that want its name there
            // too (one waiting for it reports the holder, or takes the name over); the
            // initial list concerns only the writers.
            watcher::Event::Apply(s) => Some((s, SecretEvent::Written)),
            watcher::Event::Delete(s) => Some((s, SecretEvent::Deleted)),
            watcher::Event::InitApply(s) => Some((s, SecretEvent::Listed)),
            watcher::Event::Init | watcher::Event::InitDone => None,
        })
    });
    let creds = credentials.clone();
    drive(
        "managed secrets",
        managed,
        requests.clone(),
        shutdown,
        move |(s, event)| {
            let concerns = secret_concerns(
                &s,
                event,
                &readable(&creds.clusters.state()),
                &readable(&creds.namespaced.state()),
            );
            (Some(s.namespace.to_string()), concerns)
        },
    );

    let (index, mut objects) = (caches.service_accounts.clone(), Objects::default());
    let service_accounts = watcher(Api::<ServiceAccount>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map_ok(move |event| map_event(event, |sa| objects.account(&sa)))
        .inspect_ok(move |event| index.apply(event))
        .touched_objects();
    let creds = credentials.clone();
    drive(
        "service accounts",
        service_accounts,
        requests.clone(),
        shutdown,
        move |sa| {
            let listed: Vec<&str> = sa.pull_secrets.iter().flatten().map(|s| &**s).collect();
            let concerns = service_account_concerns(
                &sa.namespace,
                &sa.name,
                &listed,
                &readable(&creds.clusters.state()),
                &readable(&creds.namespaced.state()),
            );
            (Some(sa.namespace.to_string()), concerns)
        },
    );
    caches
}

/// Feeds what each event of `stream` concerns to the controllers until `shutdown`:
/// `concerns` says the credentials and the namespace the event is about (`None`: about
/// everything of theirs).
pub(super) fn drive<K, S, F>(
    what: &'static str,
    stream: S,
    requests: Requests,
    shutdown: &CancellationToken,
    concerns: F,
) where
    S: Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    F: Fn(K) -> (Option<String>, Vec<CredentialRef>) + Send + 'static,
{
    spawn_watch(what, stream, shutdown, move |object| {
        let (namespace, who) = concerns(object);
        who.iter().all(|who| requests.send_about(who, namespace.as_deref()))
    });
}

/// Polls a watch stream until `shutdown` (or until `each` returns false), handing each
/// item to `each`. The watcher re-lists and resumes by itself with backoff; its errors
/// are logged, and a stream that ends is reported as an error, so no watch stalls
/// silently.
pub fn spawn_watch<T, S, F>(what: &'static str, stream: S, shutdown: &CancellationToken, mut each: F)
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    F: FnMut(T) -> bool + Send + 'static,
{
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(object)) => {
                    if !each(object) {
                        return;
                    }
                }
                Some(Err(e)) => {
                    crate::warn_repeated!("watch", what, watch = what, error = %e, "watch failed; retrying with backoff")
                }
                None => {
                    tracing::error!(watch = what, "watch stream ended");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use serde_json::json;

    fn guarded(name: &str, created: &str, extra: serde_json::Value) -> DeserializeGuard<ClusterRegistryCredential> {
        let mut meta = json!({"name": name, "creationTimestamp": created});
        if let serde_json::Value::Object(m) = extra {
            meta.as_object_mut().expect("object").extend(m);
        }
        serde_json::from_value(json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
            "metadata": meta,
            "spec": {"registry": "ghcr.io", "provider": {"basic": {"secretRef": {"name": "s", "namespace": "ops"}}},
                     "target": {"secretName": "regcred"}},
        }))
        .expect("credential")
    }

    #[test]
    fn rivals_are_the_older_credentials_of_the_same_secret_name_that_stay() {
        let (clusters, mut writer) = reflector::store();
        for c in [
            guarded("old", "2026-01-01T00:00:00Z", json!({})),
            guarded("oldest", "2025-01-01T00:00:00Z", json!({})),
            guarded(
                "leaving",
                "2026-01-01T00:00:00Z",
                json!({"deletionTimestamp": "2026-06-01T00:00:00Z", "finalizers": ["x"]}),
            ),
            guarded("young", "2026-09-01T00:00:00Z", json!({})),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(c));
        }
        let (namespaced, _) = reflector::store();
        let credentials = Credentials { clusters, namespaced };
        let me = CredentialRef::cluster("me");
        let created = Timestamp::from_second(1_780_000_000).ok(); // 2026-05-28
        let rivals: Vec<CredentialRef> = credentials
            .rivals(&me, created, "regcred")
            .into_iter()
            .map(|r| r.who)
            .collect();
        assert_eq!(
            rivals,
            vec![CredentialRef::cluster("oldest"), CredentialRef::cluster("old")],
            "the oldest first; younger and leaving ones have no claim"
        );
        assert!(
            credentials.rivals(&me, created, "other").is_empty(),
            "another name is no rival"
        );
    }
}
