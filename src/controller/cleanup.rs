//! Removing what a credential wrote when it goes away.

use super::identity::CredentialRef;
use super::index::ManagedSecret;
use super::plan::{self, Snapshot};
use super::secret::Owner;
use super::{Context, Error, apply};

/// Removes everything `who` wrote (its admission binding, Secrets and ServiceAccount
/// entries) and forgets it. Needs only its identity, so it works for an object whose
/// spec no longer deserializes too.
pub async fn remove_everything(who: &CredentialRef, owner: &Owner, ctx: &Context) -> Result<(), Error> {
    ctx.sources.sync(who, &[]);
    ctx.credentials.invalidate(who);
    ctx.verified.invalidate(who);
    ctx.backoffs.forget(who);
    // New Pods stop getting the secret before the secret goes.
    if let Err(e) = ctx.admission.remove(&ctx.client, owner).await {
        return Err(Error::CleanupIncomplete {
            kind: who.kind(),
            key: who.key(),
            message: e.to_string(),
        });
    }
    // Use a fresh list rather than the cache: nothing we wrote may be left behind.
    let secrets_api = match &owner.namespace {
        Some(ns) => kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(ctx.client.clone(), ns),
        None => kube::Api::<k8s_openapi::api::core::v1::Secret>::all(ctx.client.clone()),
    };
    let secrets = secrets_api
        .list_metadata(&kube::api::ListParams::default().labels(&owner.selector()))
        .await
        .map_err(|source| cleanup_failed(who, source))?;
    let secrets: Vec<ManagedSecret> = secrets.items.iter().map(|s| ManagedSecret::of(&s.metadata)).collect();
    let plan = {
        let sas = ctx.caches.service_accounts.read();
        let snapshot: Snapshot<'_> = Snapshot {
            namespaces: &[],
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &[],
        };
        plan::cleanup(owner, &snapshot)
    };
    let deleted = plan.deletes.len();
    let done = apply::execute(&ctx.client, &ctx.accounts, owner, "", None, plan, ctx.write_concurrency).await;
    if let Some(f) = done.failures.first() {
        return Err(Error::CleanupIncomplete {
            kind: who.kind(),
            key: who.key(),
            message: f.message.clone(),
        });
    }
    tracing::info!(secrets = deleted, "removed everything this credential wrote");
    Ok(())
}

pub(super) fn cleanup_failed(who: &CredentialRef, source: kube::Error) -> Error {
    Error::Cleanup {
        kind: who.kind(),
        key: who.key(),
        source,
    }
}
