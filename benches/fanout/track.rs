//! Watches (not polls) the Secrets and default ServiceAccounts a writer produces and records
//! when each namespace first holds all `k` of its Secrets and when its `default`
//! ServiceAccount first lists all `k` of them. The same tracker times pullkeeper and the floor.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What has been seen of one writer's Secrets and ServiceAccount entries.
pub struct Seen {
    /// Secrets and entries are this writer's when their names start with this.
    prefix: String,
    k: usize,
    secrets: HashMap<String, HashSet<String>>,
    /// When each namespace first held all `k` Secrets.
    pub secrets_at: HashMap<String, Instant>,
    /// When each namespace's `default` ServiceAccount first listed all `k`.
    pub entries_at: HashMap<String, Instant>,
    /// Namespaces in both maps.
    done: usize,
}

impl Seen {
    fn secret(&mut self, namespace: String, name: String, present: bool) {
        if !name.starts_with(&self.prefix) {
            return;
        }
        let names = self.secrets.entry(namespace.clone()).or_default();
        if present {
            names.insert(name);
        } else {
            names.remove(&name);
        }
        if names.len() >= self.k && !self.secrets_at.contains_key(&namespace) {
            self.done += usize::from(self.entries_at.contains_key(&namespace));
            self.secrets_at.insert(namespace, Instant::now());
        }
    }

    fn service_account(&mut self, sa: &ServiceAccount) {
        let listed: HashSet<&str> = sa
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|r| r.name.as_str())
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        let namespace = sa.namespace().unwrap_or_default();
        if listed.len() >= self.k && !self.entries_at.contains_key(&namespace) {
            self.done += usize::from(self.secrets_at.contains_key(&namespace));
            self.entries_at.insert(namespace, Instant::now());
        }
    }

    /// When `namespace` first had both all its Secrets and all its entries.
    pub fn done_at(&self, namespace: &str) -> Option<Instant> {
        Some((*self.secrets_at.get(namespace)?).max(*self.entries_at.get(namespace)?))
    }

    /// Namespaces that have both.
    pub fn done(&self) -> usize {
        self.done
    }
}

pub struct Tracker {
    seen: Arc<Mutex<Seen>>,
    changed: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Tracker {
    /// Starts watching Secrets labelled `secret_labels` and every `default` ServiceAccount.
    pub fn start(client: &Client, secret_labels: &str, prefix: &str, k: usize) -> Self {
        let seen = Arc::new(Mutex::new(Seen {
            prefix: prefix.to_owned(),
            k,
            secrets: HashMap::new(),
            secrets_at: HashMap::new(),
            entries_at: HashMap::new(),
            done: 0,
        }));
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let secrets = {
            let (seen, tx) = (seen.clone(), tx.clone());
            let api = Api::<PartialObjectMeta<Secret>>::all(client.clone());
            let stream = watcher::watcher(api, watcher::Config::default().labels(secret_labels)).default_backoff();
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(ev) = stream.next().await {
                    let (obj, present) = match ev {
                        Ok(Event::Apply(o) | Event::InitApply(o)) => (o, true),
                        Ok(Event::Delete(o)) => (o, false),
                        _ => continue,
                    };
                    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
                    seen.lock().expect("lock").secret(ns, name, present);
                    tx.send_modify(|v| *v += 1);
                }
            })
        };
        let service_accounts = {
            let (seen, tx) = (seen.clone(), tx.clone());
            let api = Api::<ServiceAccount>::all(client.clone());
            let stream =
                watcher::watcher(api, watcher::Config::default().fields("metadata.name=default")).default_backoff();
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(ev) = stream.next().await {
                    if let Ok(Event::Apply(sa) | Event::InitApply(sa)) = ev {
                        seen.lock().expect("lock").service_account(&sa);
                        tx.send_modify(|v| *v += 1);
                    }
                }
            })
        };
        Tracker {
            seen,
            changed,
            tasks: vec![secrets, service_accounts],
        }
    }

    /// Waits until `f` answers, at most `timeout`.
    pub async fn until<T>(&mut self, timeout: Duration, f: impl Fn(&Seen) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.changed.borrow_and_update();
            if let Some(v) = f(&self.seen.lock().expect("lock")) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, self.changed.changed()).await.is_err() {
                return None;
            }
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().expect("lock"))
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Creates `count` namespaces `prefix-0000`.. labelled `LABEL=label` one at a time, each
/// timed from just before its creation until `tracker` sees its Secrets and entries.
pub async fn new_namespaces(
    client: &Client,
    tracker: &mut Tracker,
    prefix: &str,
    label: &str,
    count: usize,
) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("{prefix}-{i:04}");
        let t = Instant::now();
        super::cluster::create_namespace(client, name.clone(), label).await;
        let Some(done) = tracker.until(Duration::from_secs(60), |s| s.done_at(&name)).await else {
            panic!("{name} did not get its Secrets and ServiceAccount entries within 60 s");
        };
        lat.push(done - t);
    }
    lat.sort();
    lat
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
