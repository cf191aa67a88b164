//! I/O step: resolve `verify.images` with exactly the credential that was written, at
//! most every `verify.interval` and again whenever the credential changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::ImageStatus;
use crate::crd::conditions::{reasons, whole_seconds};
use crate::metrics::Metrics;
use crate::registry::{AddressPolicy, Login, Reference, RegistryClient, RegistryHost, TlsOptions};

use super::Context;
use super::cache::Cached;
use super::identity::CredentialRef;
use super::validate::ValidSpec;

/// How many images are resolved at once for one credential.
const PARALLEL: usize = 4;

#[derive(Clone)]
struct Entry {
    generation: Option<i64>,
    issued_at: Timestamp,
    checked_at: Timestamp,
    images: Vec<ImageStatus>,
    /// A registry answered 429 with `Retry-After`: no check before this, even for a new
    /// credential.
    throttled_until: Option<Timestamp>,
}

type Check = Shared<BoxFuture<'static, (Vec<ImageStatus>, Option<Duration>)>>;

/// Last results per credential, the checks under way, and the addresses checks may not
/// reach.
#[derive(Default)]
pub struct VerifyCache {
    entries: Mutex<HashMap<CredentialRef, Entry>>,
    running: Mutex<HashMap<CredentialRef, Check>>,
    policy: AddressPolicy,
}

impl VerifyCache {
    /// An empty cache whose checks refuse what `policy` refuses.
    pub fn new(policy: AddressPolicy) -> Self {
        Self {
            entries: Mutex::default(),
            running: Mutex::default(),
            policy,
        }
    }

    /// Forgets a credential's results.
    pub fn invalidate(&self, key: &CredentialRef) {
        crate::lock(&self.entries).remove(key);
    }
}

/// The images' status and the time until they are due again; `None` when nothing is to
/// be verified.
pub async fn images(
    ctx: &Arc<Context>,
    key: &CredentialRef,
    generation: Option<i64>,
    spec: &ValidSpec,
    credential: &Cached,
) -> Option<(Vec<ImageStatus>, Duration)> {
    let (verify, interval) = spec.verify.as_ref()?;
    if verify.images.is_empty() {
        return None;
    }
    let now = Timestamp::now();
    let fresh = {
        let entries = crate::lock(&ctx.verified.entries);
        entries.get(key).and_then(|e| {
            if let Some(until) = e.throttled_until.filter(|u| e.generation == generation && now < *u) {
                let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
                return Some((e.images.clone(), left));
            }
            let due = e.checked_at.checked_add(*interval).ok()?;
            (e.generation == generation && e.issued_at == credential.issued_at && now < due).then(|| {
                let left = Duration::try_from(due.duration_since(now)).unwrap_or_default();
                (e.images.clone(), left)
            })
        })
    };
    if let Some(hit) = fresh {
        return Some(hit);
    }
    // One check per credential at a time, in the background: a registry that hangs never
    // holds a reconcile slot. Waited for up to the budget; else the last results stand
    // (or none yet) and the check's end requeues the credential.
    let running = crate::lock(&ctx.verified.running)
        .entry(key.clone())
        .or_insert_with(|| start_check(ctx, key.clone(), generation, spec.clone(), credential.clone(), now))
        .clone();
    match tokio::time::timeout(super::credential::ISSUE_BUDGET, running).await {
        Ok((checked, retry_after)) => Some((checked, (*interval).max(retry_after.unwrap_or_default()))),
        Err(_) => {
            let last = crate::lock(&ctx.verified.entries).get(key).map(|e| e.images.clone());
            last.map(|images| (images, WAITING_RECHECK))
        }
    }
}

/// While a check is under way, how soon a credential looks again anyway.
const WAITING_RECHECK: Duration = Duration::from_secs(30);

fn start_check(
    ctx: &Arc<Context>,
    key: CredentialRef,
    generation: Option<i64>,
    spec: ValidSpec,
    credential: Cached,
    now: Timestamp,
) -> Check {
    let ctx = ctx.clone();
    let handle = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let Some((verify, _)) = spec.verify.as_ref() else {
            return (Vec::new(), None);
        };
        let (checked, retry_after) = check(
            &ctx.metrics,
            &ctx.verified.policy,
            &spec,
            &verify.images,
            &verify.platforms,
            &credential,
            now,
        )
        .await;
        let throttled_until = retry_after.and_then(|r| now.checked_add(r).ok());
        crate::lock(&ctx.verified.entries).insert(
            key.clone(),
            Entry {
                generation,
                issued_at: credential.issued_at,
                checked_at: now,
                images: checked.clone(),
                throttled_until,
            },
        );
        crate::lock(&ctx.verified.running).remove(&key);
        if started.elapsed() >= super::credential::ISSUE_BUDGET {
            ctx.requests.send(&key);
        }
        (checked, retry_after)
    });
    async move { handle.await.unwrap_or_default() }.boxed().shared()
}

/// The longest `Retry-After` among rate-limited checks, capped like a provider's.
fn longest_retry_after(hints: impl IntoIterator<Item = Option<Duration>>) -> Option<Duration> {
    hints
        .into_iter()
        .flatten()
        .max()
        .map(|d| d.min(super::schedule::THROTTLED_MAX))
}

async fn check(
    metrics: &Metrics,
    policy: &AddressPolicy,
    spec: &ValidSpec,
    images: &[String],
    platforms: &[String],
    credential: &Cached,
    now: Timestamp,
) -> (Vec<ImageStatus>, Option<Duration>) {
    let checked_at = Some(Time(whole_seconds(now)));
    let failed = |image: &str, reason: &'static str, message: String| {
        metrics.observe_image_check(reason);
        ImageStatus {
            image: image.to_owned(),
            pullable: false,
            digest: None,
            platforms: vec![],
            reason: reason.to_owned(),
            message,
            checked_at: checked_at.clone(),
        }
    };
    let tls = TlsOptions {
        ca_bundle: spec.tls.ca_bundle.clone(),
        insecure_skip_verify: spec.tls.insecure_skip_verify,
    };
    let client = match RegistryClient::with_policy(&tls, policy.clone()) {
        Ok(c) => c,
        Err(e) => {
            let all = images.iter().map(|i| failed(i, e.reason(), e.to_string())).collect();
            return (all, None);
        }
    };
    let login = Login {
        username: credential.credential.username.clone(),
        password: credential.credential.password.clone(),
    };
    let results = futures::stream::iter(images.iter().cloned())
        .map(|image| {
            let (client, login, failed, checked_at) = (&client, &login, &failed, &checked_at);
            async move {
                let reference = match Reference::parse(&image) {
                    Ok(r) => r,
                    Err(e) => return (failed(&image, "InvalidReference", e.to_string()), None),
                };
                // The credential is for spec.registry; other registries are tried anonymously.
                let same = RegistryHost::parse(&reference.registry).is_ok_and(|h| h.same_registry(&spec.registry));
                match client.resolve(&reference, same.then_some(login), platforms).await {
                    Ok(r) => {
                        metrics.observe_image_check(reasons::RESOLVED);
                        let resolved = ImageStatus {
                            image: image.clone(),
                            pullable: true,
                            digest: Some(r.digest),
                            platforms: r.platforms,
                            reason: reasons::RESOLVED.to_owned(),
                            message: String::new(),
                            checked_at: checked_at.clone(),
                        };
                        (resolved, None)
                    }
                    Err(e) => {
                        let hint = match &e {
                            crate::registry::PullError::RateLimited {
                                retry_after: Some(r), ..
                            } => crate::provider::retry_after(r, now),
                            _ => None,
                        };
                        (failed(&image, e.reason(), e.to_string()), hint)
                    }
                }
            }
        })
        .buffered(PARALLEL)
        .collect::<Vec<_>>()
        .await;
    let (statuses, hints): (Vec<_>, Vec<_>) = results.into_iter().unzip();
    (statuses, longest_retry_after(hints))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_retry_after_wins_capped_at_an_hour() {
        let s = Duration::from_secs;
        assert_eq!(longest_retry_after([None, Some(s(30)), Some(s(90))]), Some(s(90)));
        assert_eq!(longest_retry_after([None, None]), None);
        assert_eq!(
            longest_retry_after([Some(s(86_400))]),
            Some(super::super::schedule::THROTTLED_MAX)
        );
    }
}
