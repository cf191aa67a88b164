//! Reading stored objects that no longer deserialize (kube's `DeserializeGuard`): such
//! an object is reported in an Event, every other credential keeps working, and deleting
//! it still cleans up.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::{DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};

use super::cleanup::{cleanup_failed, remove_everything};
use super::identity::CredentialRef;
use super::reconcile::{self, FINALIZER};
use super::secret::Owner;
use super::{Context, CredentialKind, Error};

/// Reconciles a stored object, or reports one whose spec or status does not deserialize
/// (written for another version of pullkeeper, say) instead of letting it break the watch
/// of every credential of its kind.
pub async fn reconcile_guarded<K: CredentialKind>(
    obj: Arc<DeserializeGuard<K>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    match &obj.0 {
        Ok(valid) => reconcile::reconcile(Arc::new(valid.clone()), ctx).await,
        Err(invalid) => unreadable::<K>(invalid, &ctx).await,
    }
}

/// The error policy for [`reconcile_guarded`].
pub fn error_policy_guarded<K: CredentialKind>(
    obj: Arc<DeserializeGuard<K>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    match &obj.0 {
        Ok(valid) => reconcile::error_policy(Arc::new(valid.clone()), error, ctx),
        Err(invalid) => {
            let who = identity(invalid);
            let delay = ctx.backoffs.next(&who, super::backoff::Step::Reconcile);
            crate::warn_repeated!("reconcile", &who.to_string(), credential = %who, error = %error, retry_in = ?delay, "cleaning up after an unreadable object failed");
            Action::requeue(delay)
        }
    }
}

/// Who an unreadable object is, from its metadata (the kind's scope decides whether it
/// has a namespace).
fn identity(invalid: &InvalidObject) -> CredentialRef {
    let name = invalid.metadata.name.clone().unwrap_or_default();
    match &invalid.metadata.namespace {
        Some(ns) => CredentialRef::namespaced(ns.as_str(), name),
        None => CredentialRef::cluster(name),
    }
}

async fn unreadable<K: CredentialKind>(invalid: &InvalidObject, ctx: &Context) -> Result<Action, Error> {
    let who = identity(invalid);
    let meta = &invalid.metadata;
    let ours = meta
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    if meta.deletion_timestamp.is_some() {
        if ours {
            let owner = Owner::of(&who, meta.uid.clone().unwrap_or_default());
            remove_everything(&who, &owner, ctx).await?;
            let remaining: Vec<&String> = meta.finalizers.iter().flatten().filter(|f| *f != FINALIZER).collect();
            let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": meta.finalizers},
                {"op": "replace", "path": "/metadata/finalizers", "value": remaining},
            ]))
            .expect("a JSON patch");
            // Read back untyped: the object does not deserialize as `K`.
            let resource = ApiResource::erase::<K>(&());
            let api: Api<DynamicObject> = match &who.namespace {
                Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &resource),
                None => Api::all_with(ctx.client.clone(), &resource),
            };
            api.patch_metadata(&who.name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
                .map_err(|source| cleanup_failed(&who, source))?;
        }
        return Ok(Action::await_change());
    }
    tracing::warn!(credential = %who, error = %invalid.error, "a stored object cannot be read; it is left alone until it changes");
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidObject".into(),
        note: Some(unreadable_message(&invalid.error)),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..ObjectReference::default()
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        crate::warn_repeated!("event", &who.to_string(), error = %e, "could not publish Event");
    }
    Ok(Action::await_change())
}

/// What the Event on an unreadable object says. Pure.
pub fn unreadable_message(error: &str) -> String {
    let error: String = error.chars().take(600).collect();
    format!(
        "pullkeeper cannot read this object ({error}); nothing is written for it until it is fixed: edit the field named, or delete and re-create it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterRegistryCredential, RegistryCredential};
    use serde_json::json;

    #[test]
    fn an_unreadable_object_is_told_apart_from_the_readable_ones() {
        let good = json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "good", "namespace": "web"},
            "spec": {"registry": "ghcr.io", "provider": {"basic": {"secretRef": {"name": "s"}}}},
        });
        // Written for another version: the provider is not one this version knows.
        let bad = json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "bad", "namespace": "web", "uid": "u1"},
            "spec": {"registry": "ghcr.io", "provider": {"quay": {"robot": "x"}}},
        });
        let good: DeserializeGuard<RegistryCredential> = serde_json::from_value(good).expect("guard");
        let bad: DeserializeGuard<RegistryCredential> = serde_json::from_value(bad).expect("guard");
        assert!(good.0.is_ok());
        let invalid = bad.0.expect_err("unreadable");
        assert_eq!(identity(&invalid), CredentialRef::namespaced("web", "bad"));
        let message = unreadable_message(&invalid.error);
        assert!(message.contains("quay"), "{message}");
        assert!(message.contains("fix"), "{message}");
        let cluster: DeserializeGuard<ClusterRegistryCredential> = serde_json::from_value(json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
            "metadata": {"name": "c"}, "spec": {"registry": 5},
        }))
        .expect("guard");
        let invalid = cluster.0.expect_err("unreadable");
        assert_eq!(identity(&invalid), CredentialRef::cluster("c"));
    }
}
