//! The reconcile pipeline for both kinds:
//! validate (pure) → issue credential (provider I/O, once) → plan (pure) → apply (API I/O)
//! → status (pure) → patch status and publish Events (API I/O).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, finalizer};
use serde_json::json;
use tracing::{Instrument, info_span};

use crate::crd::RegistryCredentialStatus;
use crate::provider::{self, Credential, ProviderError, ProviderSpec};

use super::cache::{Cached, Failure};
use super::plan::{self, Snapshot};
use super::secret;
use super::status::{self, Outcome, SyncReport};
use super::target::NamespaceInfo;
use super::validate::{self, Scope, ValidSpec};
use super::{Context, CredentialKind, Error, STATUS_MANAGER, apply, schedule, verify};

/// Finalizer that lets pullkeeper remove what it wrote before the credential goes away.
pub const FINALIZER: &str = "pullkeeper.io/cleanup";

/// Reconciles one object.
pub async fn reconcile<K: CredentialKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", kind = K::KIND, object = %obj.key());
    async move {
        let started = Instant::now();
        let api = obj.api(ctx.client.clone());
        let result = finalizer(&api, FINALIZER, obj.clone(), |event| async {
            match event {
                finalizer::Event::Apply(o) => apply_spec(o.as_ref(), &ctx).await,
                finalizer::Event::Cleanup(o) => cleanup(o.as_ref(), &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
        ctx.metrics.observe_reconcile(
            K::KIND,
            result.as_ref().err().map(Error::metric_label),
            started.elapsed(),
        );
        // Backoffs are reset by a success of the step that failed (see `apply_spec` and
        // `credential`), not by any `Ok`: a failure reported in status is an `Ok` too.
        if result.is_ok() {
            let key = backoff_key::<K>(&obj, Step::Reconcile);
            ctx.backoffs.reset(&key);
            crate::telemetry::resolved("reconcile", &key);
        }
        result
    }
    .instrument(span)
    .await
}

async fn apply_spec<K: CredentialKind>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    let valid = obj
        .validate()
        .and_then(|s| validate::confine_sources(s, ctx.source_secret_namespace.as_deref()))
        .and_then(|s| validate::tenancy(&s, ctx.namespaced_ambient_credentials).map(|()| s));
    let spec = match valid {
        Ok(spec) => spec,
        Err(e) => {
            ctx.sources.sync(&obj.trigger(), &[]);
            return finish(
                obj,
                ctx,
                &Outcome::Invalid(e),
                Action::requeue(schedule::RECHECK_INVALID),
            )
            .await;
        }
    };
    if spec.suspend {
        return finish(obj, ctx, &Outcome::Suspended, Action::await_change()).await;
    }
    ctx.sources.sync(&obj.trigger(), &source_secrets(&spec.provider));
    let issued = credential(obj, ctx, &spec).await;
    let owner = obj.owner();
    let content = issued
        .as_ref()
        .ok()
        .map(|c| secret::content(&owner, &spec.registry, &c.credential));
    let (sync, retryable) = fan_out::<K>(&owner, ctx, &spec, content.as_ref()).await;
    let now = Timestamp::now();
    let sync_key = backoff_key::<K>(obj, Step::Sync);
    let quick_retry = if retryable {
        let current_expiry = obj.current_status().and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
        Some(schedule::retry_delay(ctx.backoffs.next(&sync_key), current_expiry, now))
    } else {
        if issued.is_ok() {
            ctx.backoffs.reset(&sync_key);
        }
        None
    };
    let wake_at = match &issued {
        Ok(c) => c.refresh_at,
        Err(f) => f.retry_at,
    };
    let delay = schedule::requeue_delay(wake_at, quick_retry, now);
    let (images, delay) = match &issued {
        Ok(c) => match verify::images(
            &ctx.verified,
            &ctx.metrics,
            &obj.trigger(),
            obj.meta().generation,
            &spec,
            c,
        )
        .await
        {
            Some((images, until)) => (Some(images), delay.min(until.max(Duration::from_secs(1)))),
            None => (None, delay),
        },
        Err(_) => (None, delay),
    };
    let admission = ctx.admission.sync(&ctx.client, &owner, &spec).await;
    let outcome = Outcome::Reconciled {
        admission: Some(admission),
        images,
        credential: issued.map(|c| status::Issued {
            expires_at: c.credential.expires_at,
            issued_at: c.issued_at,
            next_refresh: c.refresh_at,
            content_hash: content.map(|c| c.hash).unwrap_or_default(),
        }),
        sync,
    };
    finish(obj, ctx, &outcome, Action::requeue(delay)).await
}

/// The credential to write: cached until its refresh time, recovered from the Secrets
/// already written after a restart, or issued by the provider (one call). A failed call
/// is remembered until its retry time, so no trigger sends the provider more requests
/// than the backoff allows.
async fn credential<K: CredentialKind>(obj: &K, ctx: &Context, spec: &ValidSpec) -> Result<Cached, Failure> {
    let key = obj.trigger();
    let generation = obj.meta().generation;
    let now = Timestamp::now();
    // A cached credential keeps its issue and refresh times, so repeated reconciles
    // compute an identical status and write nothing.
    if let Some(known) = ctx.credentials.lookup(&key, generation, now) {
        return known;
    }
    if let Some(cached) = recover(obj, ctx, spec, now).await {
        return Ok(cached);
    }
    let provider_key = backoff_key::<K>(obj, Step::Provider);
    match issue(ctx, spec).await {
        Ok(credential) => {
            ctx.backoffs.reset(&provider_key);
            crate::telemetry::resolved("provider", &provider_key);
            let refresh_at = now
                .checked_add(schedule::next_refresh(spec, &credential))
                .unwrap_or(Timestamp::MAX);
            let cached = Cached {
                credential,
                issued_at: now,
                refresh_at,
            };
            ctx.credentials.put(key, generation, cached.clone());
            ctx.metrics.set_expiry(
                &metric_labels(obj),
                cached.credential.expires_at.map(|t| t.as_second() as f64),
            );
            Ok(cached)
        }
        Err(e) => {
            let attempt = ctx.backoffs.record(&provider_key);
            let current_expiry = obj.current_status().and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
            let wait = schedule::provider_retry(
                schedule::RetryClass::of(&e),
                attempt,
                rand::random::<f64>(),
                current_expiry,
                now,
            );
            let failure = Failure {
                reason: e.reason(),
                message: e.to_string(),
                permanent: e.is_permanent(),
                retry_at: now.checked_add(wait).unwrap_or(Timestamp::MAX),
            };
            crate::warn_repeated!("provider", &provider_key, reason = failure.reason, error = %e, attempt = attempt + 1, retry_in = ?wait, "the provider gave no credential");
            ctx.credentials.put_failure(key, generation, failure.clone());
            Err(failure)
        }
    }
}

/// Plans from the caches and writes what differs; returns how it went and whether a
/// failure deserves a quick retry. Without a credential nothing is written.
async fn fan_out<K: CredentialKind>(
    owner: &secret::Owner,
    ctx: &Context,
    spec: &ValidSpec,
    content: Option<&secret::Content>,
) -> (SyncReport, bool) {
    let namespaces: Vec<NamespaceInfo> = ctx
        .caches
        .namespaces
        .state()
        .iter()
        .map(|n| NamespaceInfo::from_meta(&n.metadata))
        .collect();
    let secrets = ctx.caches.secrets.state();
    let metas: Vec<_> = secrets.iter().map(|s| &s.metadata).collect();
    let sas = ctx.caches.service_accounts.state();
    let snapshot = Snapshot {
        namespaces: &namespaces,
        managed_secrets: &metas,
        service_accounts: &sas,
    };
    let plan = plan::compute(owner, spec, content, &snapshot);
    let done = apply::execute(
        &ctx.client,
        owner,
        &spec.secret_name,
        content,
        &plan,
        ctx.write_concurrency,
    )
    .await;
    ctx.metrics.observe_writes(K::KIND, done.requests);
    ctx.metrics.set_managed_secrets(secrets.len());
    let failed: std::collections::BTreeSet<&str> = done.failures.iter().map(|f| f.namespace.as_str()).collect();
    let synced = plan
        .targeted
        .iter()
        .filter(|ns| !failed.contains(ns.as_str()))
        .filter(|ns| plan.current.contains(ns) || done.written.contains(ns))
        .count();
    let sync = SyncReport {
        targeted: plan.targeted.len(),
        synced,
        failures: done.failures,
    };
    (sync, done.retryable)
}

async fn cleanup<K: CredentialKind>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    ctx.sources.sync(&obj.trigger(), &[]);
    ctx.credentials.invalidate(&obj.trigger());
    ctx.verified.invalidate(&obj.trigger());
    ctx.metrics.set_expiry(&metric_labels(obj), None);
    let owner = obj.owner();
    // New Pods stop getting the secret before the secret goes.
    if let Err(e) = ctx.admission.remove(&ctx.client, &owner).await {
        return Err(Error::CleanupIncomplete {
            kind: K::KIND,
            key: obj.key(),
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
        .map_err(|source| Error::Cleanup {
            kind: K::KIND,
            key: obj.key(),
            source,
        })?;
    let metas: Vec<_> = secrets.items.iter().map(|s| &s.metadata).collect();
    let sas = ctx.caches.service_accounts.state();
    let snapshot = Snapshot {
        namespaces: &[],
        managed_secrets: &metas,
        service_accounts: &sas,
    };
    let plan = plan::cleanup(&owner, &snapshot);
    let done = apply::execute(&ctx.client, &owner, "", None, &plan, ctx.write_concurrency).await;
    if let Some(f) = done.failures.first() {
        return Err(Error::CleanupIncomplete {
            kind: K::KIND,
            key: obj.key(),
            message: f.message.clone(),
        });
    }
    tracing::info!(secrets = plan.deletes.len(), "removed everything this credential wrote");
    Ok(Action::await_change())
}

/// After a restart, a token minted by the previous process is still in the Secrets it
/// wrote. Trust it until the recorded refresh time instead of minting new tokens for every
/// credential at once, but only from a copy whose content matches the digest in status
/// (written only by the operator): a copy edited in a namespace someone else controls is
/// never spread. Stored credentials (basic, dockerConfig) are simply re-read.
async fn recover<K: CredentialKind>(obj: &K, ctx: &Context, spec: &ValidSpec, now: Timestamp) -> Option<Cached> {
    if !spec.provider.mints() {
        return None;
    }
    let status = obj.current_status()?;
    let refresh_at = status.next_refresh_time.as_ref()?.0;
    let expires_at = status.expires_at.as_ref().map(|t| t.0);
    let expected_hash = status.content_hash.as_deref()?;
    if status.observed_generation != obj.meta().generation
        || refresh_at <= now
        || expires_at.is_some_and(|e| e <= now)
        || status
            .conditions
            .iter()
            .any(|c| c.type_ == "CredentialIssued" && c.status != "True")
    {
        return None;
    }
    let owner = obj.owner();
    // Up to three copies whose digest annotation matches (the cache holds metadata only);
    // the data of each is then checked against the digest before it is trusted.
    let candidates: Vec<String> = ctx
        .caches
        .secrets
        .state()
        .iter()
        .filter(|s| owner.owns(&s.metadata) && s.metadata.name.as_deref() == Some(spec.secret_name.as_str()))
        .filter(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(secret::HASH_ANNOTATION))
                .is_some_and(|h| h == expected_hash)
        })
        .filter_map(|s| s.metadata.namespace.clone())
        .take(3)
        .collect();
    for ns in candidates {
        let Ok(found) = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(ctx.client.clone(), &ns)
            .get(&spec.secret_name)
            .await
        else {
            continue;
        };
        let Some(credential) = verified_copy(&owner, spec, &found, expected_hash, expires_at) else {
            tracing::warn!(namespace = %ns, "a copy of the pull secret does not match the digest recorded in status; minting a new credential instead of reusing it");
            continue;
        };
        tracing::info!(namespace = %ns, "reusing the unexpired credential already written instead of minting a new one");
        let cached = Cached {
            credential,
            issued_at: status.last_refresh_time.as_ref().map_or(now, |t| t.0),
            refresh_at,
        };
        ctx.credentials
            .put(obj.trigger(), obj.meta().generation, cached.clone());
        return Some(cached);
    }
    None
}

/// The credential in a Secret, if the Secret's data and expiry annotation hash to
/// `expected` (the digest the operator recorded when it wrote them). Pure.
pub fn verified_copy(
    owner: &secret::Owner,
    spec: &ValidSpec,
    found: &k8s_openapi::api::core::v1::Secret,
    expected: &str,
    expires_at: Option<Timestamp>,
) -> Option<Credential> {
    if found.type_.as_deref() != Some(provider::DOCKER_CONFIG_JSON_TYPE) {
        return None;
    }
    let raw = found.data.as_ref()?.get(provider::DOCKER_CONFIG_JSON_KEY)?;
    let annotation = found
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(secret::EXPIRES_AT_ANNOTATION))
        .map(String::as_str);
    if secret::hash_of(owner, &raw.0, annotation) != expected {
        return None;
    }
    let mut credential = provider::entry_for(&raw.0, &spec.registry).ok()?;
    credential.expires_at = expires_at;
    Some(credential)
}

/// `(namespace, name)` of every Secret the provider reads.
fn source_secrets(p: &ProviderSpec) -> Vec<(String, String)> {
    use crate::crd::Provider;
    let r = |namespace: &str, name: &str| vec![(namespace.to_owned(), name.to_owned())];
    match p {
        Provider::Basic(b) => r(&b.secret_ref.namespace, &b.secret_ref.name),
        Provider::DockerConfig(d) => r(&d.secret_ref.namespace, &d.secret_ref.name),
        Provider::Ecr(e) => e
            .credentials_secret_ref
            .as_ref()
            .map(|s| r(&s.namespace, &s.name))
            .unwrap_or_default(),
        Provider::Gcp(g) => g
            .service_account_key_secret_ref
            .as_ref()
            .map(|s| r(&s.namespace, &s.name))
            .unwrap_or_default(),
        Provider::Acr(a) => a
            .client_secret_ref
            .as_ref()
            .map(|s| r(&s.namespace, &s.name))
            .unwrap_or_default(),
    }
}

async fn issue(ctx: &Context, spec: &ValidSpec) -> Result<Credential, ProviderError> {
    let author = match spec.scope {
        Scope::Namespace(_) => provider::Author::Namespace,
        Scope::Cluster { .. } => provider::Author::Cluster,
    };
    let provider = provider::from_spec(&ctx.client, &spec.registry, &spec.provider, &ctx.endpoints, author)?;
    let started = Instant::now();
    let result = provider.issue().await;
    ctx.metrics.observe_provider_call(
        spec.provider.kind_name(),
        result.as_ref().err().map(ProviderError::metric_label),
        started.elapsed(),
    );
    result
}

async fn finish<K: CredentialKind>(obj: &K, ctx: &Context, outcome: &Outcome, action: Action) -> Result<Action, Error> {
    let previous = obj.current_status();
    let next = status::build(previous, outcome, obj.meta().generation, Timestamp::now());
    if previous != Some(&next) {
        patch_status(obj, ctx, &next).await?;
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

fn metric_labels<K: CredentialKind>(obj: &K) -> crate::metrics::CredentialLabels {
    crate::metrics::CredentialLabels {
        kind: K::KIND,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

/// The steps that back off separately, each reset only by its own success.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Asking the provider for a credential.
    Provider,
    /// Writing Secrets and ServiceAccount entries.
    Sync,
    /// The reconcile as a whole failing with an error (API I/O).
    Reconcile,
}

fn backoff_key<K: CredentialKind>(obj: &K, step: Step) -> String {
    format!("{}/{}/{step:?}", K::KIND, obj.key())
}

/// Retries failed reconciles with exponential backoff and jitter per object.
pub fn error_policy<K: CredentialKind>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoffs.next(&backoff_key::<K>(&obj, Step::Reconcile));
    let key = backoff_key::<K>(&obj, Step::Reconcile);
    crate::warn_repeated!("reconcile", &key, kind = K::KIND, object = %obj.key(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::schedule::tests::{spec, t};
    use crate::controller::validate::ValidSpec;

    fn written_copy(
        owner: &secret::Owner,
        spec: &ValidSpec,
        password: &str,
    ) -> (k8s_openapi::api::core::v1::Secret, String) {
        let credential = Credential {
            username: "oauth2accesstoken".into(),
            password: secrecy::SecretString::from(password.to_owned()),
            expires_at: Some(t(3600)),
        };
        let content = secret::content(owner, &spec.registry, &credential);
        let body = secret::apply_body(owner, &spec.secret_name, "web", &content);
        (serde_json::from_value(body).expect("secret"), content.hash)
    }

    #[test]
    fn a_copy_is_reused_only_if_it_matches_the_recorded_digest() {
        use secrecy::ExposeSecret;
        let spec = spec(None);
        let owner = secret::Owner {
            scope: "cluster",
            name: "x".into(),
            namespace: None,
            uid: "u".into(),
        };
        let (copy, hash) = written_copy(&owner, &spec, "minted-token");
        let reused = verified_copy(&owner, &spec, &copy, &hash, Some(t(3600))).expect("intact copy");
        assert_eq!(reused.password.expose_secret(), "minted-token");
        // Someone rewrites the data, keeping labels and annotations.
        let (forged, _) = written_copy(&owner, &spec, "forged");
        let mut edited = copy.clone();
        edited.data = forged.data.clone();
        assert!(verified_copy(&owner, &spec, &edited, &hash, Some(t(3600))).is_none());
        // Or moves the expiry annotation.
        let mut later = copy.clone();
        later
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(secret::EXPIRES_AT_ANNOTATION.into(), t(99_999).to_string());
        assert!(verified_copy(&owner, &spec, &later, &hash, Some(t(3600))).is_none());
        // Or changes the type.
        let mut opaque = copy.clone();
        opaque.type_ = Some("Opaque".into());
        assert!(verified_copy(&owner, &spec, &opaque, &hash, Some(t(3600))).is_none());
        // Another credential's digest (salted by its UID) never matches.
        let other = secret::Owner {
            uid: "v".into(),
            ..owner.clone()
        };
        assert!(verified_copy(&other, &spec, &copy, &hash, Some(t(3600))).is_none());
    }
}
