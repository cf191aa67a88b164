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
use tracing::{Instrument, info_span, warn};

use crate::crd::RegistryCredentialStatus;
use crate::provider::{self, Credential, ProviderError, ProviderSpec};

use super::cache::Cached;
use super::plan::{self, Snapshot};
use super::secret;
use super::status::{self, Outcome, SyncReport};
use super::target::NamespaceInfo;
use super::validate::{self, Scope, ValidSpec};
use super::{Context, CredentialKind, Error, STATUS_MANAGER, apply, verify};

/// Finalizer that lets pullkeeper remove what it wrote before the credential goes away.
pub const FINALIZER: &str = "pullkeeper.io/cleanup";
/// How long to wait before looking again at an object that needs a spec change.
const RECHECK_INVALID: Duration = Duration::from_secs(3600);
/// Floor between refreshes, so a past or absurd expiry never hot-loops.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

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
        if result.is_ok() {
            ctx.backoffs.reset(&backoff_key::<K>(&obj));
        }
        result
    }
    .instrument(span)
    .await
}

async fn apply_spec<K: CredentialKind>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    let valid = obj
        .validate()
        .and_then(|s| validate::tenancy(&s, ctx.namespaced_ambient_credentials).map(|()| s));
    let spec = match valid {
        Ok(spec) => spec,
        Err(e) => {
            ctx.sources.sync(&obj.trigger(), &[]);
            return finish(obj, ctx, &Outcome::Invalid(e), Action::requeue(RECHECK_INVALID)).await;
        }
    };
    if spec.suspend {
        return finish(obj, ctx, &Outcome::Suspended, Action::await_change()).await;
    }
    ctx.sources.sync(&obj.trigger(), &source_secrets(&spec.provider));
    let issued = credential(obj, ctx, &spec).await;
    let (sync, retryable) = fan_out(obj, ctx, &spec, issued.as_ref().ok()).await;
    let delay = match &issued {
        Ok(c) if !retryable => Duration::try_from(c.refresh_at.duration_since(Timestamp::now()))
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
        Err(e) if e.is_permanent() && !retryable => RECHECK_INVALID,
        _ => retry_delay(
            ctx.backoffs.next(&backoff_key::<K>(obj)),
            obj.current_status().and_then(|s| s.expires_at.as_ref()).map(|t| t.0),
            Timestamp::now(),
        ),
    };
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
    let outcome = Outcome::Reconciled {
        images,
        credential: issued.map(|c| status::Issued {
            expires_at: c.credential.expires_at,
            issued_at: c.issued_at,
            next_refresh: c.refresh_at,
        }),
        sync,
    };
    finish(obj, ctx, &outcome, Action::requeue(delay)).await
}

/// The credential to write: cached until its refresh time, recovered from the Secrets
/// already written after a restart, or issued by the provider (one call).
async fn credential<K: CredentialKind>(obj: &K, ctx: &Context, spec: &ValidSpec) -> Result<Cached, ProviderError> {
    let key = obj.trigger();
    let generation = obj.meta().generation;
    let now = Timestamp::now();
    // A cached credential keeps its issue and refresh times, so repeated reconciles
    // compute an identical status and write nothing.
    let cached = match ctx.credentials.get(&key, generation, now) {
        Some(c) => Some(c),
        None => recover(obj, ctx, spec, now).await,
    };
    let issued = match cached {
        Some(cached) => Ok(cached),
        None => issue(ctx, spec).await.map(|credential| {
            let refresh_at = now
                .checked_add(next_refresh(spec, &credential))
                .unwrap_or(Timestamp::MAX);
            let cached = Cached {
                credential,
                issued_at: now,
                refresh_at,
            };
            ctx.credentials.put(key.clone(), generation, cached.clone());
            cached
        }),
    };
    match &issued {
        Ok(c) => ctx.metrics.set_expiry(
            &metric_labels(obj),
            c.credential.expires_at.map(|t| t.as_second() as f64),
        ),
        Err(_) => ctx.credentials.invalidate(&key),
    }
    issued
}

/// Plans from the caches and writes what differs; returns how it went and whether a
/// failure deserves a quick retry. Without a credential nothing is written.
async fn fan_out<K: CredentialKind>(
    obj: &K,
    ctx: &Context,
    spec: &ValidSpec,
    credential: Option<&Cached>,
) -> (SyncReport, bool) {
    let owner = obj.owner();
    let content = credential.map(|c| secret::content(&owner, &spec.registry, &c.credential));
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
    let plan = plan::compute(&owner, spec, content.as_ref(), &snapshot);
    let done = apply::execute(
        &ctx.client,
        &owner,
        &spec.secret_name,
        content.as_ref(),
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
    // Use a fresh list rather than the cache: nothing we wrote may be left behind.
    let secrets = kube::Api::<k8s_openapi::api::core::v1::Secret>::all(ctx.client.clone())
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
/// credential at once. Stored credentials (basic, dockerConfig) are simply re-read.
async fn recover<K: CredentialKind>(obj: &K, ctx: &Context, spec: &ValidSpec, now: Timestamp) -> Option<Cached> {
    if !spec.provider.mints() {
        return None;
    }
    let status = obj.current_status()?;
    let refresh_at = status.next_refresh_time.as_ref()?.0;
    let expires_at = status.expires_at.as_ref().map(|t| t.0);
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
    let meta = ctx
        .caches
        .secrets
        .state()
        .into_iter()
        .find(|s| owner.owns(&s.metadata) && s.metadata.name.as_deref() == Some(spec.secret_name.as_str()))?;
    let ns = meta.metadata.namespace.clone()?;
    let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(ctx.client.clone(), &ns)
        .get(&spec.secret_name)
        .await
        .ok()?;
    let raw = secret.data.as_ref()?.get(provider::DOCKER_CONFIG_JSON_KEY)?;
    let mut credential = provider::entry_for(&raw.0, &spec.registry).ok()?;
    credential.expires_at = expires_at;
    tracing::info!(namespace = %ns, "reusing the unexpired credential already written instead of minting a new one");
    let cached = Cached {
        credential,
        issued_at: status.last_refresh_time.as_ref().map_or(now, |t| t.0),
        refresh_at,
    };
    ctx.credentials
        .put(obj.trigger(), obj.meta().generation, cached.clone());
    Some(cached)
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

/// When to renew: `expiresAt - renewBefore` (default a quarter of the remaining
/// lifetime), never sooner than [`MIN_REFRESH`]; credentials without expiry are re-read
/// every `refresh.interval`.
pub fn next_refresh(spec: &ValidSpec, credential: &Credential) -> Duration {
    refresh_delay(spec, credential.expires_at, Timestamp::now(), rand::random::<f64>())
}

/// Pure form of [`next_refresh`]: `jitter` in `[0, 1)` moves the renewal up to 10% (at
/// most 5 minutes) earlier, so many credentials issued together do not renew together.
pub fn refresh_delay(spec: &ValidSpec, expires_at: Option<Timestamp>, now: Timestamp, jitter: f64) -> Duration {
    match expires_at {
        None => spec.refresh_interval,
        Some(at) => {
            let left = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            if left.is_zero() {
                // Already expired (or an absurd answer): never a hot loop.
                return MIN_REFRESH;
            }
            let before = spec.renew_before.unwrap_or(left / 4);
            let due = left.saturating_sub(before);
            let early = due.mul_f64(0.1 * jitter.clamp(0.0, 1.0)).min(Duration::from_secs(300));
            // Short-lived tokens renew at their due time; never sooner than half their
            // remaining life (and at least a second) even if renewBefore exceeds it.
            let floor = (left / 2).clamp(Duration::from_secs(1), MIN_REFRESH);
            due.saturating_sub(early).max(floor)
        }
    }
}

/// Retry delay after a failure: the backoff, but never past half the remaining life of the
/// secret already in place, so a retry always happens before it expires.
pub fn retry_delay(backoff: Duration, current_expiry: Option<Timestamp>, now: Timestamp) -> Duration {
    match current_expiry {
        Some(at) if at > now => {
            let left = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            backoff.min((left / 2).max(Duration::from_secs(5)))
        }
        _ => backoff,
    }
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
        warn!(error = %e, "could not publish Event");
    }
}

fn metric_labels<K: CredentialKind>(obj: &K) -> crate::metrics::CredentialLabels {
    crate::metrics::CredentialLabels {
        kind: K::KIND,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

fn backoff_key<K: CredentialKind>(obj: &K) -> String {
    format!("{}/{}", K::KIND, obj.key())
}

/// Retries failed reconciles with exponential backoff and jitter per object.
pub fn error_policy<K: CredentialKind>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoffs.next(&backoff_key::<K>(&obj));
    warn!(kind = K::KIND, object = %obj.key(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterRegistryCredentialSpec, EcrProvider, Provider};

    fn spec(renew_before: Option<Duration>) -> ValidSpec {
        let raw = ClusterRegistryCredentialSpec {
            registry: "123456789012.dkr.ecr.us-east-1.amazonaws.com".into(),
            provider: Provider::Ecr(EcrProvider {
                region: None,
                role_arn: None,
                external_id: None,
                credentials_secret_ref: None,
                service_account_ref: None,
                endpoint: None,
            }),
            refresh: Default::default(),
            target: Default::default(),
            verify: None,
            tls: None,
            suspend: false,
        };
        let mut v = validate::cluster("x", &raw).expect("valid");
        v.renew_before = renew_before;
        v
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("t")
    }

    #[test]
    fn renews_a_quarter_of_the_lifetime_early_by_default() {
        // 12 h token: renew after 9 h, at most 5 min earlier with jitter.
        let d = refresh_delay(&spec(None), Some(t(12 * 3600)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(9 * 3600));
        let j = refresh_delay(&spec(None), Some(t(12 * 3600)), t(0), 0.99);
        assert!(j < d && j >= d - Duration::from_secs(300), "{j:?}");
    }

    #[test]
    fn renew_before_is_honoured() {
        let d = refresh_delay(&spec(Some(Duration::from_secs(1800))), Some(t(3600)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(1800));
    }

    #[test]
    fn past_or_absurd_expiry_uses_the_floor() {
        assert_eq!(
            refresh_delay(&spec(None), Some(t(-10 * 365 * 86400)), t(0), 0.5),
            MIN_REFRESH
        );
        assert_eq!(refresh_delay(&spec(None), Some(t(0)), t(0), 0.5), MIN_REFRESH);
    }

    #[test]
    fn short_lived_tokens_renew_before_expiry_but_not_in_a_loop() {
        let d = refresh_delay(&spec(None), Some(t(8)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(6));
        // renewBefore longer than the lifetime: half the remaining life.
        let d = refresh_delay(&spec(Some(Duration::from_secs(7200))), Some(t(8)), t(0), 0.0);
        assert_eq!(d, Duration::from_secs(4));
        let d = refresh_delay(&spec(Some(Duration::from_secs(7200))), Some(t(3600)), t(0), 0.0);
        assert_eq!(d, MIN_REFRESH);
    }

    #[test]
    fn retries_happen_before_the_current_secret_expires() {
        assert_eq!(
            retry_delay(Duration::from_secs(300), Some(t(120)), t(0)),
            Duration::from_secs(60)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(2), Some(t(120)), t(0)),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(300), None, t(0)),
            Duration::from_secs(300)
        );
        assert_eq!(
            retry_delay(Duration::from_secs(300), Some(t(-5)), t(0)),
            Duration::from_secs(300)
        );
    }
}
