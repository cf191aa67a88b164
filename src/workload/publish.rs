//! I/O step of the operator's rounds: what changed goes where people look. An Event on the
//! workload (Warning when an image turns unpullable, Normal when it pulls again), the
//! `pullkeeper_workload_image_unpullable` series, and the `status.workloads` summary of
//! each credential involved, written by its own field manager.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client};
#[cfg(test)]
use serde_json::Value;
use serde_json::json;

use super::images::WorkloadKind;
use super::track::{Change, ContainerKey, WorkloadKey};
use crate::controller::identity::CredentialRef;
use crate::crd::{ClusterRegistryCredential, RegistryCredential, WorkloadSummary};
use crate::metrics::Metrics;

/// Field manager of `status.workloads` (the reconciler's status has its own).
pub const STATUS_MANAGER: &str = "pullkeeper.io/workload-checks";
/// Reason of the Event when an image pulls again.
pub const PULLABLE_REASON: &str = "Pullable";

/// The API version of a workload kind.
pub fn api_version(kind: WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Deployment | WorkloadKind::StatefulSet | WorkloadKind::DaemonSet => "apps/v1",
        WorkloadKind::Job | WorkloadKind::CronJob => "batch/v1",
        WorkloadKind::Pod => "v1",
    }
}

fn reference(w: &WorkloadKey) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version(w.kind).to_owned()),
        kind: Some(w.kind.as_str().to_owned()),
        namespace: Some(w.namespace.clone()),
        name: Some(w.name.clone()),
        ..ObjectReference::default()
    }
}

/// The Event a change makes, if any: `(workload, warning, reason, note)`.
pub fn event(change: &Change) -> Option<(WorkloadKey, bool, String, String)> {
    match change {
        Change::Failing { finding, .. } => {
            let t = &finding.target;
            let key = ContainerKey::of(t);
            let note = format!(
                "{} {}: image {} would not pull ({}): {}",
                t.container_kind.as_str(),
                t.container,
                t.image,
                finding.reason,
                finding.message
            );
            Some((key.workload, true, finding.reason.clone(), note))
        }
        Change::Fixed { key, image, was } => {
            let note = format!(
                "{} {}: image {image} pulls now (was {was})",
                key.container_kind.as_str(),
                key.container
            );
            Some((key.workload.clone(), false, PULLABLE_REASON.to_owned(), note))
        }
        Change::Forgotten { .. } => None,
    }
}

/// Publishes the Events and sets the metric series of `changes`.
pub async fn changes(recorder: &Recorder, metrics: &Metrics, changes: &[Change]) {
    for c in changes {
        let (removed, set) = c.series();
        if let Some(l) = removed {
            metrics.set_workload_unpullable(&l, false);
        }
        if let Some(l) = set {
            metrics.set_workload_unpullable(&l, true);
        }
        let Some((workload, warning, reason, note)) = event(c) else {
            continue;
        };
        let e = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason,
            note: Some(note.chars().take(1000).collect()),
            action: "CheckImages".to_owned(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&e, &reference(&workload)).await {
            let object = format!("{}/{}", workload.namespace, workload.name);
            crate::warn_repeated!("workload-event", &object, error = %err, "could not publish Event");
        }
    }
}

/// Writes `status.workloads` of each credential whose summary differs from what was
/// `written` (removing it where a credential is no longer involved), and records it.
pub async fn summaries(
    client: &Client,
    written: &mut BTreeMap<CredentialRef, WorkloadSummary>,
    now: BTreeMap<CredentialRef, WorkloadSummary>,
) {
    let mut who: Vec<CredentialRef> = written.keys().chain(now.keys()).cloned().collect();
    who.sort();
    who.dedup();
    for c in who {
        let next = now.get(&c);
        if written.get(&c) == next {
            continue;
        }
        match write(client, &c, next).await {
            Ok(()) => {
                crate::telemetry::resolved("workload-status", &c.key());
                match next {
                    Some(s) => written.insert(c, s.clone()),
                    None => written.remove(&c),
                };
            }
            // Gone: nothing to write any more.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                written.remove(&c);
            }
            Err(e) => {
                crate::warn_repeated!("workload-status", &c.key(), error = %e, credential = %c.key(), "could not write status.workloads");
            }
        }
    }
}

async fn write(client: &Client, c: &CredentialRef, summary: Option<&WorkloadSummary>) -> Result<(), kube::Error> {
    // Applying without the field gives it up: the apiserver removes it.
    let status = match summary {
        Some(s) => json!({"workloads": s}),
        None => json!({}),
    };
    let body = json!({
        "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        "kind": c.kind(),
        "status": status,
    });
    let params = PatchParams::apply(STATUS_MANAGER).force();
    // Whatever the answer holds is not read: a credential this version cannot parse still
    // takes the write, and is not written again every round.
    let api: Api<DynamicObject> = match &c.namespace {
        None => Api::all_with(client.clone(), &ApiResource::erase::<ClusterRegistryCredential>(&())),
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<RegistryCredential>(&())),
    };
    api.patch_status(&c.name, &params, &Patch::Apply(&body)).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{Expect, apiserver, status_error};
    use crate::workload::images::ContainerKind;
    use crate::workload::plan::{Finding, Target};

    #[tokio::test]
    async fn summaries_are_applied_by_their_own_manager_only_when_they_change() {
        let summary = WorkloadSummary {
            images: 3,
            unpullable: 1,
            examples: vec![],
        };
        let uri = |path: &str| {
            format!(
                "/apis/pullkeeper.io/v1alpha1/{path}/status?fieldManager=pullkeeper.io%2Fworkload-checks&force=true"
            )
        };
        let status = |expected: Value| {
            move |body: &Value| {
                assert_eq!(body["status"], expected, "{body}");
                assert_eq!(body["apiVersion"], "pullkeeper.io/v1alpha1");
            }
        };
        // In the order of the credentials: the cluster kind first, then by name.
        let (client, script) = apiserver(vec![
            // A new summary for the cluster kind.
            Expect::new("PATCH", uri("clusterregistrycredentials/ghcr"), 200, json!({}))
                .content_type("application/apply-patch+yaml")
                .check(status(json!({"workloads": {"images": 3, "unpullable": 1}}))),
            // One that is gone is forgotten.
            Expect::new(
                "PATCH",
                uri("clusterregistrycredentials/gone"),
                404,
                status_error(404, "NotFound"),
            ),
            // One no longer involved gives the field up: the apiserver removes it.
            Expect::new("PATCH", uri("namespaces/team/registrycredentials/old"), 200, json!({}))
                .check(status(json!({}))),
        ]);
        let (ghcr, old, gone) = (
            CredentialRef::cluster("ghcr"),
            CredentialRef::namespaced("team", "old"),
            CredentialRef::cluster("gone"),
        );
        let unchanged = CredentialRef::cluster("same");
        let mut written = BTreeMap::from([
            (old.clone(), summary.clone()),
            (gone.clone(), summary.clone()),
            (unchanged.clone(), summary.clone()),
        ]);
        let now = BTreeMap::from([(ghcr.clone(), summary.clone()), (unchanged.clone(), summary.clone())]);
        summaries(&client, &mut written, now).await;
        script.await.expect("every request as scripted");
        assert_eq!(written, BTreeMap::from([(ghcr, summary.clone()), (unchanged, summary)]));
    }

    #[test]
    fn events_carry_the_reason_and_the_advice_and_forgetting_says_nothing() {
        let target = Target {
            namespace: "shop".into(),
            kind: WorkloadKind::CronJob,
            name: "nightly".into(),
            container: "setup".into(),
            container_kind: ContainerKind::InitContainer,
            image: "reg.example.com/setup:v1".into(),
        };
        let failing = Change::Failing {
            finding: Finding {
                target: target.clone(),
                verdict: "Unpullable",
                reason: "NotFound".into(),
                message: "reg.example.com/setup:v1 was not found: check the name and that the tag exists".into(),
                credentials: vec![],
            },
            was: None,
        };
        let (workload, warning, reason, note) = event(&failing).expect("an Event");
        assert_eq!(
            (workload.name.as_str(), warning, reason.as_str()),
            ("nightly", true, "NotFound")
        );
        assert!(note.starts_with("initContainer setup: image reg.example.com/setup:v1 would not pull (NotFound)"));
        assert!(note.contains("check the name"), "{note}");
        let key = ContainerKey::of(&target);
        let fixed = Change::Fixed {
            key: key.clone(),
            image: "reg.example.com/setup:v2".into(),
            was: "NotFound".into(),
        };
        let (_, warning, reason, note) = event(&fixed).expect("an Event");
        assert_eq!((warning, reason.as_str()), (false, PULLABLE_REASON));
        assert!(
            note.contains("reg.example.com/setup:v2 pulls now (was NotFound)"),
            "{note}"
        );
        let gone = Change::Forgotten {
            key,
            was: "NotFound".into(),
        };
        assert!(event(&gone).is_none());
        assert_eq!(api_version(WorkloadKind::CronJob), "batch/v1");
        assert_eq!(api_version(WorkloadKind::Pod), "v1");
    }
}
