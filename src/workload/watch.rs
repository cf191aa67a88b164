//! The operator's watches for workload checks: Deployments, StatefulSets, DaemonSets,
//! Jobs, CronJobs and Pods (trimmed to what a check reads), ReplicaSets and Nodes
//! (metadata only). Each workload change wakes the round loop, which re-checks the
//! workloads whose pod template changed.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job, JobStatus};
use k8s_openapi::api::core::v1::{Node, Pod, PodStatus, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::images::Objects;
use crate::controller::watches::spawn_watch;

/// What the watches hold.
#[derive(Clone)]
pub struct Stores {
    deployments: Store<Deployment>,
    stateful_sets: Store<StatefulSet>,
    daemon_sets: Store<DaemonSet>,
    jobs: Store<Job>,
    cron_jobs: Store<CronJob>,
    replica_sets: Store<PartialObjectMeta<ReplicaSet>>,
    pods: Store<Pod>,
    nodes: Store<PartialObjectMeta<Node>>,
}

/// Only what identifies an object and who controls it, and the labels (a Deployment's Pods
/// carry `pod-template-hash`).
fn slim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.finalizers = None;
}

fn watch<K>(
    client: &Client,
    what: &'static str,
    trim: fn(&mut K),
    notify: Option<&Arc<Notify>>,
    shutdown: &CancellationToken,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .touched_objects();
    let notify = notify.cloned();
    spawn_watch(what, stream, shutdown, move |_| {
        if let Some(n) = &notify {
            n.notify_one();
        }
        true
    });
    store
}

/// Starts the watches; each workload change calls `notify`.
pub fn start(client: &Client, notify: &Arc<Notify>, shutdown: &CancellationToken) -> Stores {
    let n = Some(notify);
    Stores {
        deployments: watch(client, "deployments", trim::<Deployment>, n, shutdown),
        stateful_sets: watch(client, "statefulsets", trim::<StatefulSet>, n, shutdown),
        daemon_sets: watch(client, "daemonsets", trim::<DaemonSet>, n, shutdown),
        jobs: watch(client, "jobs", trim::<Job>, n, shutdown),
        cron_jobs: watch(client, "cronjobs", trim::<CronJob>, n, shutdown),
        replica_sets: watch(client, "replicasets", trim_meta::<ReplicaSet>, None, shutdown),
        pods: watch(client, "pods", trim_pod, n, shutdown),
        nodes: watch(client, "nodes", trim_meta::<Node>, None, shutdown),
    }
}

/// A kind with a pod template.
trait Templated {
    /// Its metadata and template, its status trimmed to what a check reads.
    fn parts(&mut self) -> (&mut ObjectMeta, Option<&mut PodTemplateSpec>);
}

/// Kinds whose spec holds the template itself and whose status a check never reads.
macro_rules! templated {
    ($($kind:ty),+) => {$(
        impl Templated for $kind {
            fn parts(&mut self) -> (&mut ObjectMeta, Option<&mut PodTemplateSpec>) {
                self.status = None;
                (&mut self.metadata, self.spec.as_mut().map(|s| &mut s.template))
            }
        }
    )+};
}

templated!(Deployment, DaemonSet);

impl Templated for StatefulSet {
    fn parts(&mut self) -> (&mut ObjectMeta, Option<&mut PodTemplateSpec>) {
        self.status = None;
        let spec = self.spec.as_mut().map(|s| {
            s.volume_claim_templates = None;
            &mut s.template
        });
        (&mut self.metadata, spec)
    }
}

impl Templated for CronJob {
    fn parts(&mut self) -> (&mut ObjectMeta, Option<&mut PodTemplateSpec>) {
        self.status = None;
        let job = self.spec.as_mut().and_then(|s| s.job_template.spec.as_mut());
        (&mut self.metadata, job.map(|j| &mut j.template))
    }
}

/// A Job keeps only whether it finished.
impl Templated for Job {
    fn parts(&mut self) -> (&mut ObjectMeta, Option<&mut PodTemplateSpec>) {
        self.status = self.status.take().map(|s| JobStatus {
            completion_time: s.completion_time,
            conditions: s.conditions.map(|c| {
                c.into_iter()
                    .filter(|c| c.type_ == "Complete" || c.type_ == "Failed")
                    .collect()
            }),
            ..JobStatus::default()
        });
        (&mut self.metadata, self.spec.as_mut().map(|s| &mut s.template))
    }
}

/// A workload keeps its identity, owner and pod template; the template's labels and
/// annotations play no part in what it pulls.
fn trim<K: Templated>(k: &mut K) {
    let (meta, template) = k.parts();
    slim(meta);
    if let Some(t) = template {
        t.metadata = None;
    }
}

fn trim_meta<K>(k: &mut PartialObjectMeta<K>) {
    slim(&mut k.metadata);
}

/// A Pod keeps its spec, owner, labels and phase.
fn trim_pod(p: &mut Pod) {
    slim(&mut p.metadata);
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..PodStatus::default()
    });
}

fn in_namespaces<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, namespaces: &BTreeSet<String>) -> Vec<K> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace.as_ref().is_some_and(|ns| namespaces.contains(ns)))
        .map(|o| (**o).clone())
        .collect()
}

impl Stores {
    /// Waits until every watch has listed once.
    pub async fn ready(&self) {
        let _ = self.deployments.wait_until_ready().await;
        let _ = self.stateful_sets.wait_until_ready().await;
        let _ = self.daemon_sets.wait_until_ready().await;
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.cron_jobs.wait_until_ready().await;
        let _ = self.replica_sets.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
    }

    /// The objects of `namespaces`.
    pub fn objects(&self, namespaces: &BTreeSet<String>) -> Objects {
        Objects {
            deployments: in_namespaces(&self.deployments, namespaces),
            stateful_sets: in_namespaces(&self.stateful_sets, namespaces),
            daemon_sets: in_namespaces(&self.daemon_sets, namespaces),
            jobs: in_namespaces(&self.jobs, namespaces),
            cron_jobs: in_namespaces(&self.cron_jobs, namespaces),
            replica_sets: in_namespaces(&self.replica_sets, namespaces)
                .into_iter()
                .map(|r| ReplicaSet {
                    metadata: r.metadata,
                    ..ReplicaSet::default()
                })
                .collect(),
            pods: in_namespaces(&self.pods, namespaces),
        }
    }

    /// The Nodes, with their labels.
    pub fn nodes(&self) -> Vec<Node> {
        self.nodes
            .state()
            .iter()
            .map(|n| Node {
                metadata: n.metadata.clone(),
                ..Node::default()
            })
            .collect()
    }
}
