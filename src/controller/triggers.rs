//! Watches and caches: namespaces (metadata only), pullkeeper's own Secrets (metadata only,
//! label-filtered), ServiceAccounts (trimmed), and one narrow watch per referenced source
//! Secret. Every change becomes a [`Trigger`] that the dispatcher turns into reconcile
//! requests for the credentials it concerns. Watch errors are logged and retried with
//! backoff, never silently dropped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::crd::{ClusterRegistryCredential, RegistryCredential};

use super::cache::CredentialCache;

use super::secret::{CREDENTIAL_ANNOTATION, CREDENTIAL_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SCOPE_LABEL};

/// Label value of [`SCOPE_LABEL`] for ClusterRegistryCredentials.
pub const SCOPE_CLUSTER: &str = "cluster";
/// Label value of [`SCOPE_LABEL`] for RegistryCredentials.
pub const SCOPE_NAMESPACE: &str = "namespace";

/// Something changed that may concern some credentials.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A namespace changed (created, relabelled, annotated, deleted).
    Namespace(String),
    /// A ServiceAccount changed: only credentials that target it care.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A ClusterRegistryCredential must look again.
    Cluster(String),
    /// A RegistryCredential must look again.
    Namespaced {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

/// Read-only caches the reconcilers plan from.
#[derive(Clone)]
pub struct Caches {
    /// Every namespace (metadata).
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Every Secret labelled `app.kubernetes.io/managed-by=pullkeeper` (metadata).
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Every ServiceAccount, without managed fields and annotations.
    pub service_accounts: Store<ServiceAccount>,
}

impl Caches {
    /// Waits until every cache has done its initial list.
    pub async fn ready(&self) {
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.secrets.wait_until_ready().await;
        let _ = self.service_accounts.wait_until_ready().await;
    }
}

/// Starts the cluster-wide watches. Triggers go to `tx` until `shutdown`.
pub fn start(client: &Client, tx: mpsc::UnboundedSender<Trigger>, shutdown: &CancellationToken) -> Caches {
    let (ns_store, ns_writer) = reflector::store();
    let namespaces = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|ns| ns.managed_fields_mut().clear())
    .reflect(ns_writer)
    .touched_objects()
    .map(|r| r.map(|ns| vec![Trigger::Namespace(ns.name_any())]));
    spawn_forwarder("namespaces", namespaces, tx.clone(), shutdown.clone());

    let (secret_store, secret_writer) = reflector::store();
    let secrets = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")),
    )
    .default_backoff()
    .modify(|s| super::secret::slim_for_cache(&mut s.metadata))
    .reflect(secret_writer)
    .touched_objects()
    .map(|r| r.map(|s| owner_trigger(&s).into_iter().collect()));
    spawn_forwarder("managed secrets", secrets, tx.clone(), shutdown.clone());

    let (sa_store, sa_writer) = reflector::store();
    let sas = watcher(Api::<ServiceAccount>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|sa| {
            // Only identity, resourceVersion and imagePullSecrets are used.
            let m = &mut sa.metadata;
            m.managed_fields = None;
            m.annotations = None;
            m.labels = None;
            m.owner_references = None;
            m.finalizers = None;
            sa.secrets = None;
            sa.automount_service_account_token = None;
        })
        .reflect(sa_writer)
        .touched_objects()
        .map(|r| {
            r.map(|sa| {
                vec![Trigger::ServiceAccount {
                    namespace: sa.namespace().unwrap_or_default(),
                    name: sa.name_any(),
                }]
            })
        });
    spawn_forwarder("service accounts", sas, tx, shutdown.clone());

    Caches {
        namespaces: ns_store,
        secrets: secret_store,
        service_accounts: sa_store,
    }
}

fn owner_trigger(s: &PartialObjectMeta<Secret>) -> Option<Trigger> {
    let labels = s.labels();
    // The label holds a shortened form of long names; the annotation the full name.
    let name = s
        .annotations()
        .get(CREDENTIAL_ANNOTATION)
        .or_else(|| labels.get(CREDENTIAL_LABEL))?
        .clone();
    match labels.get(SCOPE_LABEL).map(String::as_str) {
        Some(SCOPE_CLUSTER) => Some(Trigger::Cluster(name)),
        Some(SCOPE_NAMESPACE) => Some(Trigger::Namespaced {
            namespace: s.namespace().unwrap_or_default(),
            name,
        }),
        _ => None,
    }
}

fn spawn_forwarder<S>(what: &'static str, stream: S, tx: mpsc::UnboundedSender<Trigger>, shutdown: CancellationToken)
where
    S: Stream<Item = Result<Vec<Trigger>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                () = shutdown.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(triggers)) => {
                    for t in triggers {
                        if tx.send(t).is_err() {
                            return;
                        }
                    }
                }
                // The watcher re-lists and resumes by itself (with backoff); say so loudly.
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

/// Whether a credential whose `target.serviceAccounts` is `listed` (absent: `[default]`)
/// patches the ServiceAccount `name`: a ServiceAccount event concerns only those
/// credentials, so churn of other ServiceAccounts costs no reconcile.
pub fn targets_service_account(listed: Option<&[String]>, name: &str) -> bool {
    match listed {
        None => name == "default",
        Some(list) => list.iter().any(|s| s == name),
    }
}

/// Routes triggers to the controllers of both kinds.
pub fn spawn_dispatcher(
    mut rx: mpsc::UnboundedReceiver<Trigger>,
    clusters: Store<ClusterRegistryCredential>,
    namespaced: Store<RegistryCredential>,
    cluster_tx: mpsc::UnboundedSender<ObjectRef<ClusterRegistryCredential>>,
    namespaced_tx: mpsc::UnboundedSender<ObjectRef<RegistryCredential>>,
) {
    tokio::spawn(async move {
        while let Some(t) = rx.recv().await {
            match t {
                Trigger::Namespace(ns) => {
                    for c in clusters.state() {
                        let _ = cluster_tx.send(ObjectRef::from(c.as_ref()));
                    }
                    for r in namespaced
                        .state()
                        .iter()
                        .filter(|r| r.namespace().as_deref() == Some(&ns))
                    {
                        let _ = namespaced_tx.send(ObjectRef::from(r.as_ref()));
                    }
                }
                Trigger::ServiceAccount { namespace, name } => {
                    for c in clusters
                        .state()
                        .iter()
                        .filter(|c| targets_service_account(c.spec.target.service_accounts.as_deref(), &name))
                    {
                        let _ = cluster_tx.send(ObjectRef::from(c.as_ref()));
                    }
                    for r in namespaced.state().iter().filter(|r| {
                        r.namespace().as_deref() == Some(&namespace)
                            && targets_service_account(r.spec.target.service_accounts.as_deref(), &name)
                    }) {
                        let _ = namespaced_tx.send(ObjectRef::from(r.as_ref()));
                    }
                }
                Trigger::Cluster(name) => {
                    let _ = cluster_tx.send(ObjectRef::new(&name));
                }
                Trigger::Namespaced { namespace, name } => {
                    let _ = namespaced_tx.send(ObjectRef::new(&name).within(&namespace));
                }
            }
        }
    });
}

/// Narrow watches on the Secrets that credentials read, so an edit propagates at once
/// without caching every Secret in the cluster.
pub struct SourceWatches {
    client: Client,
    tx: mpsc::UnboundedSender<Trigger>,
    credentials: Arc<CredentialCache>,
    shutdown: CancellationToken,
    watches: Mutex<HashMap<(String, String), Watch>>,
}

struct Watch {
    referrers: Arc<Mutex<HashSet<Trigger>>>,
    stop: CancellationToken,
}

impl SourceWatches {
    /// A new, empty set of watches.
    pub fn new(
        client: Client,
        tx: mpsc::UnboundedSender<Trigger>,
        credentials: Arc<CredentialCache>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            client,
            tx,
            credentials,
            shutdown,
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// Makes `referrer` watch exactly `sources` (`(namespace, name)` pairs), starting and
    /// stopping watches as needed.
    pub fn sync(&self, referrer: &Trigger, sources: &[(String, String)]) {
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

    fn spawn(&self, (namespace, name): &(String, String)) -> Watch {
        let referrers: Arc<Mutex<HashSet<Trigger>>> = Arc::default();
        let stop = self.shutdown.child_token();
        let stream = watcher(
            Api::<PartialObjectMeta<Secret>>::namespaced(self.client.clone(), namespace),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .touched_objects();
        let (tx, who, stop2) = (self.tx.clone(), referrers.clone(), stop.clone());
        let credentials = self.credentials.clone();
        let label = format!("{namespace}/{name}");
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let item = tokio::select! {
                    () = stop2.cancelled() => return,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(_)) => {
                        let targets: Vec<Trigger> = crate::lock(&who).iter().cloned().collect();
                        for t in targets {
                            // The source changed: the next reconcile must read it again.
                            credentials.invalidate(&t);
                            let _ = tx.send(t);
                        }
                    }
                    Some(Err(e)) => {
                        crate::warn_repeated!("source-watch", &label, secret = %label, error = %e, "watch of source Secret failed; retrying with backoff");
                    }
                    None => return,
                }
            }
        });
        Watch { referrers, stop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_event_concerns_only_credentials_that_target_it() {
        assert!(targets_service_account(None, "default"));
        assert!(!targets_service_account(None, "builder"));
        let listed = ["default".to_owned(), "builder".to_owned()];
        assert!(targets_service_account(Some(&listed), "builder"));
        assert!(!targets_service_account(Some(&listed), "runner"));
        assert!(!targets_service_account(Some(&[]), "default"), "[] patches none");
    }
}
