//! I/O step: write the status when it changed, and publish an Event for each transition.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use serde_json::json;

use crate::crd::RegistryCredentialStatus;

use super::status::{self, Outcome};
use super::{Context, CredentialKind, Error, STATUS_MANAGER};

/// Writes the status `outcome` makes, if it differs, publishes an Event per transition,
/// and returns `action`.
pub async fn finish<K: CredentialKind>(
    obj: &K,
    ctx: &Context,
    outcome: &Outcome,
    action: Action,
) -> Result<Action, Error> {
    // `status.workloads` belongs to the workload checks' own field manager: the
    // reconciler neither compares nor writes it, so neither clobbers the other.
    let previous = obj.current_status().map(|s| RegistryCredentialStatus {
        workloads: None,
        ..s.clone()
    });
    let previous = previous.as_ref();
    let next = status::build(previous, outcome, obj.meta().generation, Timestamp::now());
    if previous != Some(&next) {
        // A burst of new namespaces changes only the counts: one write per interval for
        // those (a later reconcile writes the last), at once for anything else.
        let who = obj.reference();
        if previous.is_some_and(|p| status::counts_only(p, &next)) && ctx.status_writes.recent(&who) {
            // The counts follow in a status pass, not another full one.
            let at = std::time::Instant::now() + status::COALESCE;
            ctx.requests.passes().status_later(&who, at);
            return Ok(Action::requeue(status::COALESCE));
        }
        patch_status(obj, ctx, &next).await?;
        ctx.status_writes.record(who);
    }
    for t in status::events(previous, &next) {
        publish(obj, ctx, &t).await;
    }
    Ok(action)
}

async fn patch_status<K: CredentialKind>(
    obj: &K,
    ctx: &Context,
    status: &RegistryCredentialStatus,
) -> Result<(), Error> {
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": serde_json::to_value(status).map_err(|source| Error::Serialize {
            kind: K::KIND,
            key: obj.key(),
            source,
        })?,
    });
    obj.api(ctx.client.clone())
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(STATUS_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::PatchStatus {
            kind: K::KIND,
            key: obj.key(),
            source,
        })?;
    Ok(())
}

async fn publish<K: CredentialKind>(obj: &K, ctx: &Context, t: &status::Transition) {
    let event = Event {
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: t.reason.clone(),
        note: Some(t.message.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        // Events are best effort: a failure to record one must not fail the reconcile.
        crate::warn_repeated!("event", &obj.key(), error = %e, "could not publish Event");
    }
}
