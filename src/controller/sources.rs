//! Narrow watches on the Secrets credentials read (one field-selector watch each), so an
//! edit propagates at once without caching every Secret in the cluster.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

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

    fn spawn(&self, (namespace, name): &(String, String)) -> Watch {
        let referrers: Arc<Mutex<HashSet<CredentialRef>>> = Arc::default();
        let stop = self.shutdown.child_token();
        let stream = watcher(
            Api::<PartialObjectMeta<Secret>>::namespaced(self.client.clone(), namespace),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .touched_objects();
        let (who, credentials) = (referrers.clone(), self.credentials.clone());
        drive("source secret", stream, self.requests.clone(), &stop, move |_| {
            let concerned: Vec<CredentialRef> = crate::lock(&who).iter().cloned().collect();
            // The source changed: the next reconcile must read it again.
            for c in &concerned {
                credentials.invalidate(c);
            }
            (None, concerned)
        });
        Watch { referrers, stop }
    }
}
