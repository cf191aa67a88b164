//! Obtaining the credential to write: the one cached until its refresh time, one
//! recovered from the Secrets already written after a restart, or a new one issued by the
//! provider (one call). A failed call is remembered until its retry time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use k8s_openapi::jiff::Timestamp;

use crate::provider::{self, Credential, ProviderError};

use super::backoff::Step;
use super::cache::{Cached, Failure};
use super::identity::CredentialRef;
use super::secret;
use super::validate::{Scope, ValidSpec};
use super::{Context, CredentialKind, schedule};

/// How long a reconcile waits for a provider before it moves on. The call goes on in the
/// background and its answer brings the credential back, so a slow or hanging provider
/// never holds one of the reconcile slots other credentials need.
pub const ISSUE_BUDGET: Duration = Duration::from_secs(1);
/// While a call is under way, how soon a credential looks again anyway.
const WAITING_RECHECK: Duration = Duration::from_secs(30);

type Call = Shared<BoxFuture<'static, Result<Cached, Failure>>>;

/// Provider calls under way: at most one per credential and generation, whatever
/// triggers arrive meanwhile.
#[derive(Default)]
pub struct InFlight {
    calls: Mutex<HashMap<(CredentialRef, Option<i64>), Call>>,
}

impl InFlight {
    fn join_or_start(&self, key: &CredentialRef, generation: Option<i64>, start: impl FnOnce() -> Call) -> Call {
        crate::lock(&self.calls)
            .entry((key.clone(), generation))
            .or_insert_with(start)
            .clone()
    }

    fn done(&self, key: &CredentialRef, generation: Option<i64>) {
        crate::lock(&self.calls).remove(&(key.clone(), generation));
    }
}

/// The credential to write: cached until its refresh time, recovered from the Secrets
/// already written after a restart, or issued by the provider (one call, in the
/// background, waited for up to [`ISSUE_BUDGET`]). A failed call is remembered until its
/// retry time, so no trigger sends the provider more requests than the backoff allows.
/// While a renewal is under way the unexpired credential in place is kept.
pub async fn obtain<K: CredentialKind>(obj: &K, ctx: &Arc<Context>, spec: &ValidSpec) -> Result<Cached, Failure> {
    let key = obj.reference();
    let generation = obj.meta().generation;
    let now = Timestamp::now();
    // A cached credential keeps its issue and refresh times, so repeated reconciles
    // compute an identical status and write nothing.
    if let Some(known) = ctx.credentials.lookup(&key, generation, now) {
        return known;
    }
    // Only after a restart (nothing known for this generation) is what the previous process
    // wrote worth recovering; otherwise status may describe a renewal under way.
    if ctx.credentials.last(&key, generation).is_none()
        && let Some(cached) = recover(obj, ctx, spec, now).await
    {
        return Ok(cached);
    }
    let current_expiry = obj.current_status().and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
    let call = ctx.issuing.join_or_start(&key, generation, || {
        let call = Issue {
            ctx: ctx.clone(),
            key: key.clone(),
            generation,
            spec: spec.clone(),
            labels: obj.metric_labels(),
            current_expiry,
        };
        let handle = tokio::spawn(call.run());
        async move {
            handle.await.unwrap_or_else(|_| {
                Err(Failure {
                    reason: crate::crd::conditions::reasons::PROVIDER_ERROR,
                    message: "the provider call was cancelled".to_owned(),
                    permanent: false,
                    retry_at: Timestamp::now(),
                })
            })
        }
        .boxed()
        .shared()
    });
    match tokio::time::timeout(ISSUE_BUDGET, call).await {
        Ok(result) => result,
        // Still waiting: what is in place stays (and is written as it is); the answer
        // requeues the credential.
        Err(_) => {
            let recheck = now.checked_add(WAITING_RECHECK).unwrap_or(Timestamp::MAX);
            match ctx.credentials.last(&key, generation) {
                // Still failing as far as anyone knows: say so (no flip to Ready meanwhile).
                Some(Err(failed)) => Err(Failure {
                    retry_at: failed.retry_at.max(recheck),
                    ..failed
                }),
                Some(Ok(current)) if current.credential.expires_at.is_none_or(|at| now < at) => Ok(Cached {
                    refresh_at: recheck,
                    ..current
                }),
                _ => Err(Failure::waiting(spec.provider.kind_name(), now, WAITING_RECHECK)),
            }
        }
    }
}

/// One provider call and what it leaves behind: the credential (or the failure, with its
/// retry time from the backoff) in the cache, and a reconcile request if the reconcile
/// that asked stopped waiting.
struct Issue {
    ctx: Arc<Context>,
    key: CredentialRef,
    generation: Option<i64>,
    spec: ValidSpec,
    labels: crate::metrics::CredentialLabels,
    current_expiry: Option<Timestamp>,
}

impl Issue {
    async fn run(self) -> Result<Cached, Failure> {
        let (ctx, key, generation) = (&self.ctx, &self.key, self.generation);
        let started = Instant::now();
        let now = Timestamp::now();
        let reads = provider::Reads::default();
        let result = match issue(ctx, &self.spec, &reads).await {
            Ok(credential) => {
                ctx.backoffs.reset(key, Step::Provider);
                crate::telemetry::resolved("provider", &key.to_string());
                let refresh_at = now
                    .checked_add(schedule::next_refresh(&self.spec, &credential))
                    .unwrap_or(Timestamp::MAX);
                let cached = Cached {
                    credential,
                    issued_at: now,
                    refresh_at,
                };
                ctx.credentials
                    .put_issued(key.clone(), generation, cached.clone(), reads.read());
                ctx.metrics
                    .set_next_attempt(&self.labels, Some(refresh_at.as_second() as f64));
                ctx.metrics
                    .set_expiry(&self.labels, cached.credential.expires_at.map(|t| t.as_second() as f64));
                Ok(cached)
            }
            Err(e) => {
                let attempt = ctx.backoffs.record(key, Step::Provider);
                let wait = schedule::provider_retry(
                    schedule::RetryClass::of(&e),
                    attempt,
                    rand::random::<f64>(),
                    self.current_expiry,
                    now,
                );
                let failure = Failure {
                    reason: e.reason(),
                    message: e.to_string(),
                    permanent: e.is_permanent(),
                    retry_at: now.checked_add(wait).unwrap_or(Timestamp::MAX),
                };
                crate::warn_repeated!("provider", &key.to_string(), credential = %key, reason = failure.reason, error = %e, attempt = attempt + 1, retry_in = ?wait, "the provider gave no credential");
                ctx.credentials
                    .put_failure(key.clone(), generation, failure.clone(), reads.read());
                ctx.metrics
                    .set_next_attempt(&self.labels, Some(failure.retry_at.as_second() as f64));
                Err(failure)
            }
        };
        ctx.issuing.done(key, generation);
        // A source Secret edited after the provider read it, before the answer was kept:
        // its watch found nothing to drop then, so the answer is dropped now.
        let outdated = ctx.sources.outdated(&reads.read());
        if outdated {
            ctx.credentials.invalidate(key);
        }
        if outdated || started.elapsed() >= ISSUE_BUDGET {
            ctx.requests.send(key);
        }
        result
    }
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
    // A source Secret edited while the copies are read must not see this one kept.
    let mark = ctx.credentials.drops();
    // Up to three copies whose digest annotation matches (the cache holds metadata only);
    // the data of each is then checked against the digest before it is trusted.
    let candidates: Vec<String> = ctx
        .caches
        .secrets
        .read()
        .iter()
        .filter(|s| *s.name == spec.secret_name && s.owned_by(&owner) && s.has_digest(expected_hash))
        .map(|s| s.namespace.to_string())
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
            .put_unless_dropped(obj.reference(), obj.meta().generation, cached.clone(), mark);
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

async fn issue(ctx: &Context, spec: &ValidSpec, reads: &provider::Reads) -> Result<Credential, ProviderError> {
    let author = match spec.scope {
        Scope::Namespace(_) => provider::Author::Namespace,
        Scope::Cluster { .. } => provider::Author::Cluster,
    };
    let provider = provider::from_spec(&ctx.client, &spec.registry, &spec.provider, &ctx.endpoints, author)?;
    let started = Instant::now();
    let result = provider.issue(reads).await;
    ctx.metrics.observe_provider_call(
        spec.provider.kind_name(),
        result.as_ref().err().map(ProviderError::metric_label),
        started.elapsed(),
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::schedule::tests::{spec, t};
    use crate::controller::validate::ValidSpec;

    #[tokio::test]
    async fn one_call_per_credential_and_generation_whatever_asks_meanwhile() {
        let inflight = InFlight::default();
        let key = CredentialRef::cluster("a");
        let started = std::sync::atomic::AtomicUsize::new(0);
        let start = || {
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            futures::future::pending::<Result<Cached, Failure>>().boxed().shared()
        };
        let _first = inflight.join_or_start(&key, Some(1), start);
        let _second = inflight.join_or_start(&key, Some(1), start);
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);
        let _new_spec = inflight.join_or_start(&key, Some(2), start);
        assert_eq!(
            started.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "a new generation asks anew"
        );
        inflight.done(&key, Some(1));
        let _again = inflight.join_or_start(&key, Some(1), start);
        assert_eq!(
            started.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "a finished call is not joined"
        );
    }

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
