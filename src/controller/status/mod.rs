//! Pure step: from the outcome of a reconcile, the status to write and the Events to emit.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::conditions::{self, Desired, Status, reasons, types, whole_seconds};
use crate::crd::{ImageStatus, MAX_LISTED_FAILURES, NamespaceCounts, NamespaceFailure, RegistryCredentialStatus};

use super::cache::Failure;

mod coalesce;
mod events;
mod limits;
use super::validate::SpecError;
pub use coalesce::{COALESCE, StatusWrites, counts_only};
pub use events::{Transition, events};
pub use limits::{MAX_STATUS_BYTES, bounded};

/// A credential the provider issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// When it expires, if it does.
    pub expires_at: Option<Timestamp>,
    /// When the provider issued it.
    pub issued_at: Timestamp,
    /// When it will be renewed or re-read.
    pub next_refresh: Timestamp,
    /// Salted digest of the pull secret written for it (see `secret::hash_of`).
    pub content_hash: String,
}

/// How the fan-out went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Namespaces targeted.
    pub targeted: usize,
    /// Namespaces holding the current secret.
    pub synced: usize,
    /// Per-namespace failures.
    pub failures: Vec<NamespaceFailure>,
}

/// What one reconcile found.
#[derive(Debug)]
pub enum Outcome {
    /// The spec cannot be acted on; nothing was changed.
    Invalid(SpecError),
    /// `suspend: true`; nothing was changed.
    Suspended,
    /// The credential was asked for and the fan-out done.
    Reconciled {
        /// What the provider said.
        credential: Result<Issued, Failure>,
        /// How the fan-out went.
        sync: SyncReport,
        /// Pullability of `verify.images`: `None` when nothing is to be verified.
        images: Option<Vec<ImageStatus>>,
        /// The `PodAdmission` condition (see `admission`), if known.
        admission: Option<Desired>,
    },
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn sync_summary(sync: &SyncReport) -> String {
    let mut listed: Vec<String> = sync
        .failures
        .iter()
        .take(3)
        .map(|f| format!("{} ({})", f.namespace, f.reason))
        .collect();
    if sync.failures.len() > 3 {
        listed.push(format!("and {} more", sync.failures.len() - 3));
    }
    format!(
        "{} of {} hold the current secret; failed: {}",
        sync.synced,
        plural(sync.targeted, "targeted namespace", "targeted namespaces"),
        listed.join(", ")
    )
}

fn issued_message(issued: &Issued) -> String {
    match issued.expires_at {
        None => "the provider issued a credential without an expiry".to_owned(),
        Some(at) if at <= issued.issued_at => format!(
            "the provider issued a credential whose expiry {} is already past; renewing on the minimum interval",
            whole_seconds(at)
        ),
        Some(at) => format!("the provider issued a credential valid until {}", whole_seconds(at)),
    }
}

fn pullable_condition(images: &[ImageStatus]) -> Desired {
    let failing: Vec<&ImageStatus> = images.iter().filter(|i| !i.pullable).collect();
    match failing.first() {
        None => Desired::new(
            types::PULLABLE,
            Status::True,
            reasons::RESOLVED,
            format!(
                "{} resolve with the credential",
                plural(images.len(), "image", "images")
            ),
        ),
        Some(first) => Desired::new(
            types::PULLABLE,
            Status::False,
            &first.reason,
            format!(
                "{} of {} would not pull; {}: {}",
                failing.len(),
                plural(images.len(), "image", "images"),
                first.image,
                first.message
            ),
        ),
    }
}

impl Outcome {
    fn removed(&self) -> Vec<&'static str> {
        match self {
            Outcome::Reconciled { images: None, .. } => vec![types::PULLABLE],
            _ => vec![],
        }
    }

    fn conditions(&self) -> Vec<Desired> {
        match self {
            Outcome::Invalid(e) => vec![
                Desired::new(types::READY, Status::False, e.reason(), e.to_string()),
                Desired::new(
                    types::CREDENTIAL_ISSUED,
                    Status::False,
                    e.reason(),
                    "not attempted: the spec is invalid",
                ),
            ],
            Outcome::Suspended => vec![Desired::new(
                types::READY,
                Status::Unknown,
                reasons::SUSPENDED,
                "spec.suspend is true: pullkeeper keeps what it has written and changes nothing",
            )],
            Outcome::Reconciled {
                credential,
                sync,
                images,
                admission,
            } => {
                let mut out = reconciled_conditions(credential, sync, images.as_deref());
                out.extend(admission.clone());
                out
            }
        }
    }
}

/// Ready, CredentialIssued, Synced and Pullable after a reconcile that got this far.
fn reconciled_conditions(
    credential: &Result<Issued, Failure>,
    sync: &SyncReport,
    images: Option<&[ImageStatus]>,
) -> Vec<Desired> {
    let pullable = images.map(pullable_condition);
    let failed_reason = if sync.failures.iter().all(|f| f.reason == reasons::CONFLICT) {
        reasons::CONFLICT
    } else {
        reasons::SYNC_FAILED
    };
    let synced = if sync.failures.is_empty() {
        Desired::new(
            types::SYNCED,
            Status::True,
            reasons::SYNCED,
            format!(
                "{} hold the current secret",
                plural(sync.targeted, "targeted namespace", "targeted namespaces")
            ),
        )
    } else {
        Desired::new(types::SYNCED, Status::False, failed_reason, sync_summary(sync))
    };
    match credential {
        Ok(issued) => {
            let ready = match &pullable {
                _ if !sync.failures.is_empty() => {
                    Desired::new(types::READY, Status::False, failed_reason, synced.message.clone())
                }
                Some(p) if p.status == Status::False => {
                    Desired::new(types::READY, Status::False, &p.reason, p.message.clone())
                }
                _ => Desired::new(types::READY, Status::True, reasons::SYNCED, synced.message.clone()),
            };
            let mut out = vec![
                ready,
                Desired::new(
                    types::CREDENTIAL_ISSUED,
                    Status::True,
                    reasons::ISSUED,
                    issued_message(issued),
                ),
                synced,
            ];
            out.extend(pullable);
            out
        }
        Err(e) => {
            let message = format!(
                "{}; secrets already written are left as they are; next attempt at {}",
                e.message,
                whole_seconds(e.retry_at)
            );
            // Asked and not answered yet is no failure (yet).
            let issued = if e.reason == reasons::ISSUING {
                Status::Unknown
            } else {
                Status::False
            };
            let mut out = vec![
                Desired::new(types::READY, Status::False, e.reason, message.clone()),
                Desired::new(types::CREDENTIAL_ISSUED, issued, e.reason, message),
            ];
            if !sync.failures.is_empty() {
                out.push(synced);
            }
            out
        }
    }
}

/// Computes the new status from the previous one. Fields this outcome says nothing
/// about are carried over, so a failed refresh does not erase what is known (for
/// example when the secret in place expires).
pub fn build(
    previous: Option<&RegistryCredentialStatus>,
    outcome: &Outcome,
    generation: Option<i64>,
    now: Timestamp,
) -> RegistryCredentialStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let existing = std::mem::take(&mut status.conditions);
    status.conditions = conditions::merge(&existing, &outcome.conditions(), &outcome.removed(), generation, now);
    status.observed_generation = generation;
    if let Outcome::Reconciled {
        credential,
        sync,
        images,
        ..
    } = outcome
    {
        match images {
            Some(v) => status.images = v.clone(),
            None if credential.is_ok() => status.images = Vec::new(),
            None => {}
        }
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        let failed: std::collections::BTreeSet<&str> = sync.failures.iter().map(|f| f.namespace.as_str()).collect();
        status.namespaces = Some(NamespaceCounts {
            targeted: count(sync.targeted),
            synced: count(sync.synced),
            failed: count(failed.len()),
        });
        status.failures = sync.failures.iter().take(MAX_LISTED_FAILURES).cloned().collect();
        match credential {
            Ok(issued) => {
                status.last_refresh_time = Some(Time(whole_seconds(issued.issued_at)));
                status.expires_at = issued.expires_at.map(|t| Time(whole_seconds(t)));
                status.next_refresh_time = Some(Time(whole_seconds(issued.next_refresh)));
                status.content_hash = Some(issued.content_hash.clone());
            }
            // The next attempt, so `kubectl get -o yaml` shows the retry schedule.
            Err(f) => status.next_refresh_time = Some(Time(whole_seconds(f.retry_at))),
        }
    }
    bounded(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("valid")
    }

    fn reconciled(credential: Result<Issued, Failure>, failures: Vec<NamespaceFailure>) -> Outcome {
        let targeted = 3;
        let synced = targeted - failures.len();
        Outcome::Reconciled {
            credential,
            sync: SyncReport {
                targeted,
                synced,
                failures,
            },
            images: None,
            admission: None,
        }
    }

    fn unreachable(provider: &'static str) -> Failure {
        let e = crate::provider::ProviderError::Cloud {
            provider,
            failure: crate::provider::CloudFailure::Unreachable,
            message: "connection refused".into(),
        };
        Failure {
            reason: e.reason(),
            message: e.to_string(),
            permanent: e.is_permanent(),
            retry_at: now(),
        }
    }

    fn ok() -> Result<Issued, Failure> {
        Ok(Issued {
            expires_at: None,
            issued_at: now(),
            next_refresh: now(),
            content_hash: "h".into(),
        })
    }

    fn ready(s: &RegistryCredentialStatus) -> (&str, &str) {
        let c = conditions::find(&s.conditions, types::READY).expect("ready");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_provider_that_has_not_answered_yet_is_no_failure() {
        let waiting = Failure::waiting("gcp", now(), std::time::Duration::from_secs(30));
        let s = build(None, &reconciled(Err(waiting), vec![]), Some(1), now());
        assert_eq!(ready(&s), ("False", reasons::ISSUING));
        let issued = conditions::find(&s.conditions, types::CREDENTIAL_ISSUED).expect("issued");
        assert_eq!(issued.status, "Unknown");
        assert!(
            issued.message.contains("waiting for the gcp provider"),
            "{}",
            issued.message
        );
        let ev = events(None, &s);
        assert!(ev.iter().all(|e| !e.warning), "{ev:?}");
    }

    #[test]
    fn all_synced_is_ready() {
        let s = build(None, &reconciled(ok(), vec![]), Some(2), now());
        assert_eq!(ready(&s), ("True", "Synced"));
        assert_eq!(
            s.namespaces,
            Some(NamespaceCounts {
                targeted: 3,
                synced: 3,
                failed: 0
            })
        );
        assert_eq!(s.observed_generation, Some(2));
        let synced = conditions::find(&s.conditions, types::SYNCED).expect("synced");
        assert_eq!(synced.message, "3 targeted namespaces hold the current secret");
    }

    #[test]
    fn a_conflict_is_reported_with_its_namespace() {
        let conflict = NamespaceFailure {
            namespace: "web".into(),
            reason: "Conflict".into(),
            message: "Secret web/x exists and is not managed by this pullkeeper credential".into(),
        };
        let s = build(None, &reconciled(ok(), vec![conflict.clone()]), Some(1), now());
        assert_eq!(ready(&s), ("False", "Conflict"));
        assert_eq!(s.failures, vec![conflict]);
        let ev = events(None, &s);
        assert!(ev.iter().any(|e| e.reason == "Conflict" && e.message.contains("web/x")));
        // Same state again: no new Events.
        let again = build(Some(&s), &reconciled(ok(), s.failures.clone()), Some(1), now());
        assert!(events(Some(&s), &again).is_empty());
    }

    #[test]
    fn provider_failure_keeps_what_is_known_about_the_secret_in_place() {
        let expiry = Timestamp::from_second(1_800_003_600).expect("valid");
        let first = build(
            None,
            &reconciled(
                Ok(Issued {
                    expires_at: Some(expiry),
                    issued_at: now(),
                    next_refresh: now(),
                    content_hash: "h".into(),
                }),
                vec![],
            ),
            Some(1),
            now(),
        );
        let failed = build(
            Some(&first),
            &reconciled(Err(unreachable("ecr")), vec![]),
            Some(1),
            now(),
        );
        assert_eq!(ready(&failed), ("False", "ProviderUnreachable"));
        assert_eq!(failed.expires_at, Some(Time(expiry)));
        let msg = &conditions::find(&failed.conditions, types::READY)
            .expect("ready")
            .message;
        assert!(msg.contains("left as they are"), "{msg}");
        // The retry schedule is visible: in the message and as nextRefreshTime.
        assert!(msg.contains("next attempt at"), "{msg}");
        assert_eq!(failed.next_refresh_time, Some(Time(now())));
    }

    #[test]
    fn one_event_per_change_not_per_retry() {
        let outcome = reconciled(Err(unreachable("gcp")), vec![]);
        let first = build(None, &outcome, Some(1), now());
        assert_eq!(events(None, &first).len(), 1);
        let second = build(Some(&first), &outcome, Some(1), now());
        assert!(events(Some(&first), &second).is_empty());
        assert_eq!(first, second, "a repeat reconcile writes an identical status");
    }

    #[test]
    fn no_status_is_over_16_kib_whatever_the_input() {
        let huge = "x".repeat(300_000);
        let mut failure = unreachable("gcp");
        failure.message = huge.clone();
        let failures: Vec<NamespaceFailure> = (0..20)
            .map(|i| NamespaceFailure {
                namespace: format!("ns-{i}"),
                reason: "SyncFailed".into(),
                message: huge.clone(),
            })
            .collect();
        let images: Vec<ImageStatus> = (0..300)
            .map(|i| ImageStatus {
                image: format!("registry.example.com/{}{i}", "a".repeat(1000)),
                pullable: i % 3 != 0,
                digest: Some(format!("sha256:{}", "0".repeat(64))),
                platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
                reason: "NotFound".into(),
                message: huge.clone(),
                checked_at: Some(Time(now())),
            })
            .collect();
        let outcome = Outcome::Reconciled {
            credential: Err(failure),
            sync: SyncReport {
                targeted: 5000,
                synced: 4980,
                failures,
            },
            images: Some(images),
            admission: Some(Desired::new("PodAdmission", Status::True, "PolicyBound", huge.clone())),
        };
        let s = build(None, &outcome, Some(1), now());
        let size = serde_json::to_vec(&s).expect("json").len();
        assert!(size <= MAX_STATUS_BYTES, "{size} bytes");
        // What is kept first: the images that would not pull.
        assert!(s.images.iter().all(|i| !i.pullable), "{:?}", s.images.len());
        assert_eq!(s.namespaces.map(|n| n.targeted), Some(5000));
        assert!(s.conditions.iter().all(|c| c.message.chars().count() <= 1024));
    }

    #[test]
    fn suspend_is_unknown_not_failed() {
        let s = build(None, &Outcome::Suspended, Some(1), now());
        assert_eq!(ready(&s), ("Unknown", "Suspended"));
        assert!(!events(None, &s)[0].warning);
    }

    fn image(name: &str, pullable: bool, reason: &str) -> ImageStatus {
        ImageStatus {
            image: name.into(),
            pullable,
            digest: pullable.then(|| "sha256:abc".to_owned()),
            platforms: vec![],
            reason: reason.into(),
            message: if pullable { String::new() } else { "tag missing".into() },
            checked_at: None,
        }
    }

    #[test]
    fn an_image_that_would_not_pull_makes_ready_false_with_its_reason() {
        let outcome = Outcome::Reconciled {
            credential: ok(),
            sync: SyncReport {
                targeted: 1,
                synced: 1,
                failures: vec![],
            },
            images: Some(vec![image("a", true, "Resolved"), image("b", false, "NotFound")]),
            admission: None,
        };
        let s = build(None, &outcome, Some(1), now());
        assert_eq!(ready(&s), ("False", "NotFound"));
        let p = conditions::find(&s.conditions, types::PULLABLE).expect("pullable");
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("False", "NotFound"));
        assert!(
            p.message.contains("1 of 2 images") && p.message.contains("b: tag missing"),
            "{}",
            p.message
        );
        let ev = events(None, &s);
        assert!(ev.iter().any(|e| e.reason == "ImageNotPullable" && e.warning));
        // Fixed: Pullable True, an ImagePullable Event, Ready back to True.
        let fixed = Outcome::Reconciled {
            credential: ok(),
            sync: SyncReport {
                targeted: 1,
                synced: 1,
                failures: vec![],
            },
            images: Some(vec![image("a", true, "Resolved"), image("b", true, "Resolved")]),
            admission: Some(Desired::new("PodAdmission", Status::True, "PolicyBound", "bound")),
        };
        let s2 = build(Some(&s), &fixed, Some(1), now());
        assert_eq!(ready(&s2), ("True", "Synced"));
        // The admission route is reported beside, never folded into Ready.
        let a = conditions::find(&s2.conditions, "PodAdmission").expect("PodAdmission");
        assert_eq!((a.status.as_str(), a.reason.as_str()), ("True", "PolicyBound"));
        assert!(
            events(Some(&s), &s2)
                .iter()
                .any(|e| e.reason == "ImagePullable" && !e.warning)
        );
        // Verification removed from the spec: the condition goes away.
        let s3 = build(Some(&s2), &reconciled(ok(), vec![]), Some(2), now());
        assert!(conditions::find(&s3.conditions, types::PULLABLE).is_none());
        assert!(s3.images.is_empty());
    }
}
