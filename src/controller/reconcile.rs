//! The reconcile pipeline for both kinds:
//! validate (pure) → issue credential (provider I/O, once) → plan (pure) → apply (API I/O)
//! → status (pure) → patch status and publish Events (API I/O).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use tracing::{Instrument, info_span};

use super::backoff::Step;
use super::index::ManagedSecret;
use super::passes::{self, Pass};
use super::plan::{self, Snapshot};
use super::secret;
use super::status::{self, Outcome, SyncReport};
use super::validate::{self, ValidSpec};
use super::{Context, CredentialKind, Error, apply, cleanup, credential, report, schedule, verify};

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
            ctx.backoffs.reset(&obj.reference(), Step::Reconcile);
            crate::telemetry::resolved("reconcile", &obj.reference().to_string());
        }
        result
    }
    .instrument(span)
    .await
}

async fn apply_spec<K: CredentialKind>(obj: &K, ctx: &Arc<Context>) -> Result<Action, Error> {
    let pending = ctx.requests.passes().take(&obj.reference());
    let valid = obj
        .validate()
        .and_then(|s| validate::confine_sources(s, ctx.source_secret_namespace.as_deref()))
        .and_then(|s| validate::tenancy(&s, ctx.namespaced_ambient_credentials).map(|()| s));
    let spec = match valid {
        Ok(spec) => spec,
        Err(e) => {
            ctx.sources.sync(&obj.reference(), &[]);
            return report::finish(
                obj,
                ctx,
                &Outcome::Invalid(e),
                Action::requeue(schedule::RECHECK_INVALID),
            )
            .await;
        }
    };
    if spec.suspend {
        return report::finish(obj, ctx, &Outcome::Suspended, Action::await_change()).await;
    }
    ctx.sources.sync(&obj.reference(), &source_secrets(&spec.provider));
    let mark = ctx.credentials.drops();
    let mut issued = credential::obtain(obj, ctx, &spec).await;
    let owner = obj.owner();
    let content = issued
        .as_ref()
        .ok()
        .map(|c| secret::content(&owner, &spec.registry, &c.credential));
    if let (Ok(c), Some(content)) = (&mut issued, &content) {
        let (status, generation) = (obj.current_status(), obj.meta().generation);
        let mints = spec.provider.mints();
        if let Some((at, refresh)) =
            schedule::unchanged_schedule(status, generation, mints, &content.hash, c, Timestamp::now())
        {
            (c.issued_at, c.refresh_at) = (at, refresh);
            ctx.credentials
                .put_unless_dropped(obj.reference(), generation, c.clone(), mark);
            ctx.metrics
                .set_next_attempt(&obj.metric_labels(), Some(refresh.as_second() as f64));
        }
    }
    let (generation, who) = (obj.meta().generation, obj.reference());
    let last = ctx.requests.passes().last(&who);
    let pass = content
        .as_ref()
        .map(|c| passes::choose(pending, last.as_ref(), generation, &c.hash, Instant::now()));
    let counted = match (pass, &content) {
        (Some(Pass::Namespaces(namespaces, due)), Some(content)) => {
            let (sync, retryable) = fan_out(obj, &owner, ctx, &spec, Some(content), Some(&namespaces)).await;
            let clean = sync.failures.is_empty() && !retryable;
            ctx.requests.passes().namespaces_done(&who, due, clean);
            let wait = due.saturating_duration_since(Instant::now());
            return Ok(Action::requeue(wait.max(passes::SOON)));
        }
        (Some(Pass::Status(namespaces)), Some(content)) => {
            status_pass(obj, &owner, ctx, &spec, content, &namespaces).await
        }
        _ => None,
    };
    let (sync, retryable) = match counted {
        Some(sync) => (sync, false),
        None => fan_out(obj, &owner, ctx, &spec, content.as_ref(), None).await,
    };
    if let Some(content) = &content {
        let clean = sync.failures.is_empty() && !retryable && sync.synced == sync.targeted;
        ctx.requests.passes().full_done(&who, generation, &content.hash, clean);
    }
    let now = Timestamp::now();
    let quick_retry = if retryable {
        let current_expiry = obj.current_status().and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
        Some(schedule::retry_delay(
            ctx.backoffs.next(&obj.reference(), Step::Sync),
            current_expiry,
            now,
        ))
    } else {
        if issued.is_ok() {
            ctx.backoffs.reset(&obj.reference(), Step::Sync);
        }
        None
    };
    let wake_at = match &issued {
        Ok(c) => c.refresh_at,
        Err(f) => f.retry_at,
    };
    let mut delay = schedule::requeue_delay(wake_at, quick_retry, now);
    if sync
        .failures
        .iter()
        .any(|f| f.reason == crate::crd::conditions::reasons::CONFLICT)
    {
        delay = delay.min(schedule::RECHECK_CONFLICT);
    }
    let (images, delay) = match &issued {
        Ok(c) => match verify::images(ctx, &obj.reference(), obj.meta().generation, &spec, c).await {
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
    report::finish(obj, ctx, &outcome, Action::requeue(delay)).await
}

/// A status pass: writes what differs in `namespaces` (if any), then counts the others
/// from the index. `None` when anything is out of place: a full pass is needed.
async fn status_pass<K: CredentialKind>(
    obj: &K,
    owner: &secret::Owner,
    ctx: &Context,
    spec: &ValidSpec,
    content: &secret::Content,
    namespaces: &BTreeSet<String>,
) -> Option<SyncReport> {
    // Those namespaces as the pass left them (the index may not show its writes yet).
    let mut done = SyncReport::default();
    if !namespaces.is_empty() {
        let retryable;
        (done, retryable) = fan_out(obj, owner, ctx, spec, Some(content), Some(namespaces)).await;
        if !done.failures.is_empty() || retryable {
            return None;
        }
    }
    let (targeted, synced) = {
        let (all, secrets) = (ctx.caches.namespaces.read(), ctx.caches.secrets.read());
        let others = all.iter().filter(|n| !namespaces.contains(&*n.name));
        plan::tally(owner, spec, content, others, |ns| secrets.get(ns, &spec.secret_name))
    };
    let (targeted, synced) = (targeted + done.targeted, synced + done.synced);
    (synced == targeted).then(|| SyncReport {
        targeted,
        synced,
        failures: Vec::new(),
    })
}

/// Plans from the caches and writes what differs, in every namespace or only `within`
/// those; returns how it went and whether a failure deserves a quick retry. Without a
/// credential nothing is written.
async fn fan_out<K: CredentialKind>(
    obj: &K,
    owner: &secret::Owner,
    ctx: &Context,
    spec: &ValidSpec,
    content: Option<&secret::Content>,
    within: Option<&BTreeSet<String>>,
) -> (SyncReport, bool) {
    let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0);
    let rivals = ctx.objects.rivals(&obj.reference(), created, &spec.secret_name);
    // Planned from the indexes as they are now; nothing is awaited while they are read.
    let (mut plan, managed) = {
        let (namespaces, secrets, sas) = (
            ctx.caches.namespaces.read(),
            ctx.caches.secrets.read(),
            ctx.caches.service_accounts.read(),
        );
        let namespaces: Vec<_> = namespaces.among(within).collect();
        // Only what concerns this credential: Secrets of its name (its own or in the way)
        // and its own Secrets of another name (to delete). Thousands of others are no input.
        let relevant = |s: &&ManagedSecret| *s.name == spec.secret_name || s.owned_by(owner);
        let mine: Vec<_> = secrets.among(within).filter(relevant).collect();
        let sas: Vec<_> = sas.among(within).collect();
        let snapshot = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &mine,
            service_accounts: &sas,
            rivals: &rivals,
        };
        (plan::compute(owner, spec, content, &snapshot), secrets.len())
    };
    let (targeted, current) = (std::mem::take(&mut plan.targeted), std::mem::take(&mut plan.current));
    let done = apply::execute(
        &ctx.client,
        &ctx.accounts,
        owner,
        &spec.secret_name,
        content,
        plan,
        ctx.write_concurrency,
    )
    .await;
    ctx.metrics.observe_writes(K::KIND, done.requests);
    ctx.metrics.set_managed_secrets(managed);
    let failed: HashSet<&str> = done.failures.iter().map(|f| f.namespace.as_str()).collect();
    let holding: HashSet<&str> = current.iter().chain(&done.written).map(String::as_str).collect();
    let synced = targeted
        .iter()
        .filter(|ns| !failed.contains(ns.as_str()) && holding.contains(ns.as_str()))
        .count();
    let sync = SyncReport {
        targeted: targeted.len(),
        synced,
        failures: done.failures,
    };
    (sync, done.retryable)
}

async fn cleanup<K: CredentialKind>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.set_expiry(&obj.metric_labels(), None);
    ctx.metrics.set_next_attempt(&obj.metric_labels(), None);
    ctx.requests.passes().forget(&obj.reference());
    cleanup::remove_everything(&obj.reference(), &obj.owner(), ctx).await?;
    Ok(Action::await_change())
}

/// `(namespace, name)` of every Secret the provider reads.
fn source_secrets(p: &crate::provider::ProviderSpec) -> Vec<(String, String)> {
    p.source_secrets()
        .into_iter()
        .map(|s| (s.namespace.to_owned(), s.name.to_owned()))
        .collect()
}

/// Retries failed reconciles with exponential backoff and jitter per object.
pub fn error_policy<K: CredentialKind>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoffs.next(&obj.reference(), Step::Reconcile);
    crate::warn_repeated!("reconcile", &obj.reference().to_string(), kind = K::KIND, object = %obj.key(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
