//! What a workload pulls: the images of a pod spec, and the pod specs worth checking in a
//! namespace (each workload's template once, bare Pods, never a Pod a checked template made).

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

/// Where in a pod spec an image is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerKind {
    /// `spec.containers[]`.
    Container,
    /// `spec.initContainers[]` (sidecars included).
    InitContainer,
    /// `spec.ephemeralContainers[]` (`kubectl debug`).
    EphemeralContainer,
    /// `spec.volumes[].image.reference`: an OCI image mounted as a volume.
    ImageVolume,
}

impl ContainerKind {
    /// As printed.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerKind::Container => "container",
            ContainerKind::InitContainer => "initContainer",
            ContainerKind::EphemeralContainer => "ephemeralContainer",
            ContainerKind::ImageVolume => "imageVolume",
        }
    }
}

/// One image of a pod spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUse {
    /// The container's name, or the volume's for an image volume.
    pub container: String,
    /// Where it is used.
    pub kind: ContainerKind,
    /// The image as written.
    pub image: String,
}

/// Every image the kubelet would pull for `spec`, in spec order: init containers,
/// containers, ephemeral containers, then image volumes. Entries without an image are
/// skipped (the apiserver refuses them for containers; a volume may omit it).
pub fn pod_images(spec: &PodSpec) -> Vec<ImageUse> {
    let mut out = Vec::new();
    let mut push = |container: &str, kind, image: Option<&String>| {
        if let Some(image) = image.filter(|i| !i.trim().is_empty()) {
            out.push(ImageUse {
                container: container.to_owned(),
                kind,
                image: image.clone(),
            });
        }
    };
    for c in spec.init_containers.iter().flatten() {
        push(&c.name, ContainerKind::InitContainer, c.image.as_ref());
    }
    for c in &spec.containers {
        push(&c.name, ContainerKind::Container, c.image.as_ref());
    }
    for c in spec.ephemeral_containers.iter().flatten() {
        push(&c.name, ContainerKind::EphemeralContainer, c.image.as_ref());
    }
    for v in spec.volumes.iter().flatten() {
        let reference = v.image.as_ref().and_then(|i| i.reference.as_ref());
        push(&v.name, ContainerKind::ImageVolume, reference);
    }
    out
}

/// The kinds whose pod templates are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum WorkloadKind {
    /// apps/v1.
    Deployment,
    /// apps/v1.
    StatefulSet,
    /// apps/v1.
    DaemonSet,
    /// batch/v1.
    Job,
    /// batch/v1 (its `jobTemplate`).
    CronJob,
    /// A Pod no checked template made.
    Pod,
}

impl WorkloadKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Pod => "Pod",
        }
    }
}

/// A pod spec to check and whose it is.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Its kind.
    pub kind: WorkloadKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pod spec (a template's, or the Pod's own).
    pub spec: PodSpec,
}

/// The objects of one listing, as read from the apiserver.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Deployments.
    pub deployments: Vec<Deployment>,
    /// StatefulSets.
    pub stateful_sets: Vec<StatefulSet>,
    /// DaemonSets.
    pub daemon_sets: Vec<DaemonSet>,
    /// Jobs.
    pub jobs: Vec<Job>,
    /// CronJobs.
    pub cron_jobs: Vec<CronJob>,
    /// ReplicaSets: only to tell a Deployment's Pods from a bare ReplicaSet's.
    pub replica_sets: Vec<ReplicaSet>,
    /// Pods.
    pub pods: Vec<Pod>,
}

fn ident(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The controller owner of an object: `(kind, name)`.
fn controller(meta: &ObjectMeta) -> Option<(&str, &str)> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.name.as_str()))
}

fn job_finished(job: &Job) -> bool {
    job.status.as_ref().is_some_and(|s| {
        s.completion_time.is_some()
            || s.conditions
                .iter()
                .flatten()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
    })
}

/// The pod specs to check, each once: every Deployment, StatefulSet and DaemonSet
/// template; Jobs that have not finished and no CronJob made (a CronJob's `jobTemplate` is
/// checked instead); and Pods that none of those made, which are not finished and are not
/// a node's static Pods. A Pod of a bare ReplicaSet counts as bare: ReplicaSets are not
/// checked on their own.
pub fn workloads(objects: &Objects) -> Vec<Workload> {
    let mut out = Vec::new();
    let mut add = |kind, meta: &ObjectMeta, spec: Option<&PodSpec>| {
        if let Some(spec) = spec {
            let (namespace, name) = ident(meta);
            out.push(Workload {
                kind,
                namespace,
                name,
                spec: spec.clone(),
            });
        }
    };
    for d in &objects.deployments {
        add(
            WorkloadKind::Deployment,
            &d.metadata,
            d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        );
    }
    for s in &objects.stateful_sets {
        add(
            WorkloadKind::StatefulSet,
            &s.metadata,
            s.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        );
    }
    for d in &objects.daemon_sets {
        add(
            WorkloadKind::DaemonSet,
            &d.metadata,
            d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        );
    }
    for j in &objects.jobs {
        if job_finished(j) || controller(&j.metadata).is_some_and(|(kind, _)| kind == "CronJob") {
            continue;
        }
        add(
            WorkloadKind::Job,
            &j.metadata,
            j.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        );
    }
    for c in &objects.cron_jobs {
        let spec = c
            .spec
            .as_ref()
            .and_then(|s| s.job_template.spec.as_ref())
            .and_then(|j| j.template.spec.as_ref());
        add(WorkloadKind::CronJob, &c.metadata, spec);
    }
    let deployment_replica_sets: BTreeSet<(String, String)> = objects
        .replica_sets
        .iter()
        .filter(|rs| controller(&rs.metadata).is_some_and(|(kind, _)| kind == "Deployment"))
        .map(|rs| ident(&rs.metadata))
        .collect();
    for p in &objects.pods {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let made_by_checked = match controller(&p.metadata) {
            None => false,
            Some(("StatefulSet" | "DaemonSet" | "Node", _)) => true,
            // A Job's Pod: its Job is checked, or its CronJob is, or it finished.
            Some(("Job", _)) => true,
            // A Deployment's ReplicaSet, or one listed after its Pod was: a Deployment
            // labels its Pods with the template hash, a bare ReplicaSet does not.
            Some(("ReplicaSet", rs)) => {
                deployment_replica_sets.contains(&(namespace, rs.to_owned()))
                    || p.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key("pod-template-hash"))
            }
            Some(_) => false,
        };
        if !made_by_checked {
            add(WorkloadKind::Pod, &p.metadata, p.spec.as_ref());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).expect("pod spec")
    }

    #[test]
    fn every_kind_of_image_is_found_with_its_container() {
        let s = spec(json!({
            "initContainers": [{"name": "migrate", "image": "reg.example.com/migrate:1"}],
            "containers": [{"name": "app", "image": "nginx"}, {"name": "side", "image": "  "}],
            "ephemeralContainers": [{"name": "debugger", "image": "busybox:1.36"}],
            "volumes": [
                {"name": "models", "image": {"reference": "reg.example.com/models:v3"}},
                {"name": "scratch", "emptyDir": {}}
            ]
        }));
        let got: Vec<(String, ContainerKind, String)> = pod_images(&s)
            .into_iter()
            .map(|u| (u.container, u.kind, u.image))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "migrate".into(),
                    ContainerKind::InitContainer,
                    "reg.example.com/migrate:1".into()
                ),
                ("app".into(), ContainerKind::Container, "nginx".into()),
                (
                    "debugger".into(),
                    ContainerKind::EphemeralContainer,
                    "busybox:1.36".into()
                ),
                (
                    "models".into(),
                    ContainerKind::ImageVolume,
                    "reg.example.com/models:v3".into()
                ),
            ]
        );
    }

    fn template(image: &str) -> serde_json::Value {
        json!({"spec": {"containers": [{"name": "c", "image": image}]}})
    }

    fn owned(kind: &str, name: &str) -> serde_json::Value {
        json!([{"apiVersion": "v1", "kind": kind, "name": name, "uid": "u", "controller": true}])
    }

    #[test]
    fn each_template_is_checked_once_and_made_pods_are_skipped() {
        let objects = Objects {
            deployments: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "web", "namespace": "a"},
                    "spec": {"selector": {}, "template": template("web:1")}
                }))
                .expect("deployment"),
            ],
            stateful_sets: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "db", "namespace": "a"},
                    "spec": {"selector": {}, "serviceName": "db", "template": template("db:1")}
                }))
                .expect("sts"),
            ],
            daemon_sets: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "agent", "namespace": "a"},
                    "spec": {"selector": {}, "template": template("agent:1")}
                }))
                .expect("ds"),
            ],
            jobs: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "once", "namespace": "a"},
                    "spec": {"template": template("once:1")}
                }))
                .expect("job"),
                serde_json::from_value(json!({
                    "metadata": {"name": "nightly-1", "namespace": "a", "ownerReferences": owned("CronJob", "nightly")},
                    "spec": {"template": template("nightly:1")}
                }))
                .expect("job of a cronjob"),
                serde_json::from_value(json!({
                    "metadata": {"name": "done", "namespace": "a"},
                    "spec": {"template": template("done:1")},
                    "status": {"conditions": [{"type": "Complete", "status": "True"}]}
                }))
                .expect("finished job"),
            ],
            cron_jobs: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "nightly", "namespace": "a"},
                    "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template("nightly:1")}}}
                }))
                .expect("cronjob"),
            ],
            replica_sets: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "web-5d8f", "namespace": "a", "ownerReferences": owned("Deployment", "web")},
                    "spec": {"selector": {}}
                }))
                .expect("rs"),
                serde_json::from_value(json!({
                    "metadata": {"name": "bare-rs", "namespace": "a"}, "spec": {"selector": {}}
                }))
                .expect("bare rs"),
            ],
            pods: vec![
                serde_json::from_value(json!({
                    "metadata": {"name": "web-5d8f-x", "namespace": "a", "ownerReferences": owned("ReplicaSet", "web-5d8f")},
                    "spec": template("web:1")["spec"]
                }))
                .expect("deployment pod"),
                serde_json::from_value(json!({
                    "metadata": {"name": "db-0", "namespace": "a", "ownerReferences": owned("StatefulSet", "db")},
                    "spec": template("db:1")["spec"]
                }))
                .expect("sts pod"),
                serde_json::from_value(json!({
                    "metadata": {"name": "once-x", "namespace": "a", "ownerReferences": owned("Job", "once")},
                    "spec": template("once:1")["spec"]
                }))
                .expect("job pod"),
                serde_json::from_value(json!({
                    "metadata": {"name": "bare-rs-x", "namespace": "a", "ownerReferences": owned("ReplicaSet", "bare-rs")},
                    "spec": template("rs:1")["spec"]
                }))
                .expect("bare rs pod"),
                serde_json::from_value(json!({
                    "metadata": {"name": "debug", "namespace": "a"}, "spec": template("debug:1")["spec"]
                }))
                .expect("bare pod"),
                serde_json::from_value(json!({
                    "metadata": {"name": "ran", "namespace": "a"}, "spec": template("ran:1")["spec"],
                    "status": {"phase": "Succeeded"}
                }))
                .expect("finished pod"),
            ],
        };
        let got: Vec<(WorkloadKind, String)> = workloads(&objects).into_iter().map(|w| (w.kind, w.name)).collect();
        assert_eq!(
            got,
            vec![
                (WorkloadKind::Deployment, "web".into()),
                (WorkloadKind::StatefulSet, "db".into()),
                (WorkloadKind::DaemonSet, "agent".into()),
                (WorkloadKind::Job, "once".into()),
                (WorkloadKind::CronJob, "nightly".into()),
                (WorkloadKind::Pod, "bare-rs-x".into()),
                (WorkloadKind::Pod, "debug".into()),
            ]
        );
    }
}
