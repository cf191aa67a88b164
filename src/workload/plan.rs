//! From what the cluster holds to what must be resolved, and from what resolved to what
//! to report: pure functions, no client.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use serde::Serialize;

use super::images::{ContainerKind, ImageUse, Workload, WorkloadKind, pod_images};
use super::keyring::{Candidate, Keyring, lookup_name};
use super::platforms::{Platforms, required};
use crate::crd::conditions::reasons;
use crate::registry::{Login, PullError, Reference, Resolved, check_platforms};

/// `(namespace, name)`.
pub type Key = (String, String);

/// What reading a pull Secret gave.
pub enum SecretState {
    /// A docker config Secret's `auths` entries.
    Entries(Vec<(String, Login)>),
    /// Not a docker config Secret: the kubelet ignores it.
    Ignored,
    /// It does not exist: the kubelet skips it.
    Missing,
    /// The reader may not read it.
    Forbidden,
    /// Reading it failed otherwise (the text says how).
    Unavailable(String),
    /// Its docker config does not parse (the text says where, never what).
    Malformed(String),
}

/// Everything a round needs from the cluster.
#[derive(Default)]
pub struct View {
    /// The pod specs to check.
    pub workloads: Vec<Workload>,
    /// Each ServiceAccount's `imagePullSecrets` names.
    pub service_accounts: BTreeMap<Key, Vec<String>>,
    /// Every pull Secret named by a pod spec or a ServiceAccount in use.
    pub secrets: BTreeMap<Key, SecretState>,
    /// The nodes' platforms.
    pub nodes: Platforms,
}

/// Where a pod's pull Secrets come from.
fn secret_names(w: &Workload, sas: &BTreeMap<Key, Vec<String>>) -> Result<(Vec<String>, String), (String, String)> {
    let own: Vec<String> = w
        .spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .collect();
    // The kubelet reads only the Pod's own list: the ServiceAccount's is copied in by
    // admission when a Pod that sets none is created, which a template's Pods will be.
    if !own.is_empty() || w.kind == WorkloadKind::Pod {
        return Ok((own, "the pod's imagePullSecrets".to_owned()));
    }
    let sa = service_account(&w.spec);
    match sas.get(&(w.namespace.clone(), sa.clone())) {
        Some(names) => Ok((names.clone(), format!("ServiceAccount {}/{sa}", w.namespace))),
        None => Err((w.namespace.clone(), sa)),
    }
}

fn service_account(spec: &PodSpec) -> String {
    spec.service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// What a check of `w` depends on in the cluster: its pod spec, for a template the pull
/// Secret names of its ServiceAccount, and the version of each of those Secrets that
/// `versions` knows (those pullkeeper writes: a renewed or repaired one changes it). A
/// workload whose fingerprint is unchanged needs no new check before the next full round.
pub fn fingerprint(w: &Workload, sas: &BTreeMap<Key, Vec<String>>, versions: &BTreeMap<Key, String>) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&w.spec).unwrap_or_default().hash(&mut h);
    match secret_names(w, sas) {
        Ok((names, source)) => {
            for n in &names {
                versions.get(&(w.namespace.clone(), n.clone())).hash(&mut h);
            }
            (names, source).hash(&mut h);
        }
        Err(missing) => missing.hash(&mut h),
    }
    h.finish()
}

/// The pull Secrets every pod spec of `workloads` names, directly or through its
/// ServiceAccount: what a reader must fetch.
pub fn secrets_to_read(workloads: &[Workload], sas: &BTreeMap<Key, Vec<String>>) -> Vec<Key> {
    let mut out: Vec<Key> = workloads
        .iter()
        .filter_map(|w| secret_names(w, sas).ok().map(|(names, _)| (w.namespace.clone(), names)))
        .flat_map(|(ns, names)| names.into_iter().map(move |n| (ns.clone(), n)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Why a pod's images cannot be resolved at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// CamelCase reason.
    pub reason: &'static str,
    /// What and what to do.
    pub message: String,
    /// True when the pull would fail; false when it cannot be told.
    pub fails: bool,
}

/// The credentials the kubelet would hold for a pod.
pub struct PodCredentials {
    keyring: Keyring,
    source: String,
    notes: Vec<String>,
}

/// Builds the keyring of a pod spec from its pull Secrets, as the kubelet would.
pub fn pod_credentials(w: &Workload, view: &View) -> Result<PodCredentials, Blocked> {
    let (names, source) = secret_names(w, &view.service_accounts).map_err(|(ns, sa)| Blocked {
        reason: reasons::SERVICE_ACCOUNT_NOT_FOUND,
        message: format!("ServiceAccount {ns}/{sa} does not exist, so its Pods cannot be created: create it or fix serviceAccountName"),
        fails: true,
    })?;
    let mut keyring = Keyring::default();
    let mut notes = Vec::new();
    for name in names {
        let id = format!("{}/{name}", w.namespace);
        match view.secrets.get(&(w.namespace.clone(), name)) {
            Some(SecretState::Entries(entries)) => keyring.add(&id, entries),
            Some(SecretState::Ignored) => notes.push(format!(
                "Secret {id} is not of type kubernetes.io/dockerconfigjson (or dockercfg), so the kubelet ignores it"
            )),
            Some(SecretState::Missing) | None => {
                notes.push(format!("pull Secret {id} does not exist, so the kubelet skips it"))
            }
            Some(SecretState::Forbidden) => {
                return Err(Blocked {
                    reason: reasons::SECRET_FORBIDDEN,
                    message: format!(
                        "pull Secret {id} may not be read, so which credential the kubelet would use cannot be told: grant get on Secrets in {} to whoever checks (for the operator with the chart value sourceSecrets.namespace, list the namespace in workloadChecks.pullSecretNamespaces)",
                        w.namespace
                    ),
                    fails: false,
                });
            }
            Some(SecretState::Unavailable(why)) => {
                return Err(Blocked {
                    reason: reasons::SECRET_UNAVAILABLE,
                    message: format!("reading pull Secret {id} failed ({why}): try again"),
                    fails: false,
                });
            }
            Some(SecretState::Malformed(why)) => {
                return Err(Blocked {
                    reason: reasons::MALFORMED_SECRET,
                    message: format!(
                        "{why}: the kubelet fails every pull of this pod with it; recreate it (kubectl create secret docker-registry)"
                    ),
                    fails: true,
                });
            }
        }
    }
    Ok(PodCredentials { keyring, source, notes })
}

/// Identifies an image use in a report.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Namespace.
    pub namespace: String,
    /// Workload kind.
    pub kind: WorkloadKind,
    /// Workload name.
    pub name: String,
    /// Container (or image volume) name.
    pub container: String,
    /// Where the image is used.
    pub container_kind: ContainerKind,
    /// The image as written.
    pub image: String,
}

/// How to resolve one image use.
pub enum Plan {
    /// No resolution: the answer is known (or unknowable) already.
    Blocked(Blocked),
    /// Try each candidate in order (anonymous when there are none).
    Resolve {
        /// The parsed image.
        reference: Reference,
        /// The credentials, most specific first.
        candidates: Vec<Candidate>,
        /// Where the Secrets came from, for advice.
        source: String,
        /// Secrets the kubelet would skip.
        notes: Vec<String>,
    },
}

/// One image use to check.
pub struct Check {
    /// What it is.
    pub target: Target,
    /// `os/arch` it must hold.
    pub platforms: Vec<String>,
    /// How.
    pub plan: Plan,
}

/// Every image use of every workload, with the credentials the kubelet would try.
pub fn checks(view: &View) -> Vec<Check> {
    let mut out = Vec::new();
    for w in &view.workloads {
        let creds = pod_credentials(w, view);
        let platforms = required(&w.spec, &view.nodes);
        for ImageUse { container, kind, image } in pod_images(&w.spec) {
            let plan = match (&creds, Reference::parse(&image)) {
                (_, Err(e)) => Plan::Blocked(Blocked {
                    reason: "InvalidReference",
                    message: format!("{e}: the kubelet refuses it (InvalidImageName); fix the image"),
                    fails: true,
                }),
                (Err(blocked), _) => Plan::Blocked(blocked.clone()),
                (Ok(c), Ok(reference)) => Plan::Resolve {
                    candidates: c.keyring.lookup(&lookup_name(&image, &reference)),
                    reference,
                    source: c.source.clone(),
                    notes: c.notes.clone(),
                },
            };
            out.push(Check {
                target: Target {
                    namespace: w.namespace.clone(),
                    kind: w.kind,
                    name: w.name.clone(),
                    container,
                    container_kind: kind,
                    image,
                },
                platforms: platforms.clone(),
                plan,
            });
        }
    }
    out
}

/// An image use that would not pull, or whose pull cannot be told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// What.
    #[serde(flatten)]
    pub target: Target,
    /// `Unpullable`, or `Unknown` when it cannot be told.
    pub verdict: &'static str,
    /// CamelCase reason (the `verify` reasons, and the Secret reasons of status).
    pub reason: String,
    /// What went wrong and what to do.
    pub message: String,
    /// The credentials tried, in order (`Secret ns/name (key)`); empty: anonymous.
    pub credentials: Vec<String>,
}

/// The finding for a blocked check.
pub fn blocked_finding(target: &Target, b: &Blocked) -> Finding {
    Finding {
        target: target.clone(),
        verdict: if b.fails { "Unpullable" } else { "Unknown" },
        reason: b.reason.to_owned(),
        message: b.message.clone(),
        credentials: Vec::new(),
    }
}

/// The kubelet's answer for a resolved check: pullable when an attempt succeeded and holds
/// every platform needed; else the first attempt's failure (the most specific credential),
/// naming the others. `outcomes` are in candidate order, ending at the first success.
pub fn verdict(check: &Check, outcomes: &[Result<Resolved, PullError>]) -> Option<Finding> {
    let Plan::Resolve {
        reference,
        candidates,
        source,
        notes,
    } = &check.plan
    else {
        return None;
    };
    let failure = match outcomes.last() {
        Some(Ok(resolved)) => check_platforms(reference, &check.platforms, resolved).err()?,
        Some(Err(_)) => outcomes.iter().find_map(|o| o.as_ref().err()).cloned()?,
        None => return None,
    };
    let mut message = failure.to_string();
    for (c, o) in candidates.iter().zip(outcomes).skip(1) {
        if let Err(e) = o {
            message.push_str(&format!("; with {} too: {}", c.source(), e.reason()));
        }
    }
    if candidates.is_empty() && matches!(failure.reason(), "Unauthorized" | "Denied" | "NotFound") {
        message.push_str(&format!(
            "; no pull Secret of {source} has an entry for {}: add one there",
            reference.registry
        ));
    }
    for n in notes {
        message.push_str(&format!("; {n}"));
    }
    Some(Finding {
        target: check.target.clone(),
        verdict: "Unpullable",
        reason: failure.reason().to_owned(),
        message,
        credentials: candidates.iter().map(Candidate::source).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use serde_json::json;

    fn workload(kind: WorkloadKind, spec: serde_json::Value) -> Workload {
        Workload {
            kind,
            namespace: "ns".into(),
            name: "w".into(),
            spec: serde_json::from_value(spec).expect("spec"),
        }
    }

    fn entries(key: &str) -> SecretState {
        SecretState::Entries(vec![(
            key.to_owned(),
            Login {
                username: "u".into(),
                password: SecretString::from("s3cret".to_owned()),
            },
        )])
    }

    fn view(workloads: Vec<Workload>, secrets: Vec<(&str, SecretState)>) -> View {
        View {
            workloads,
            service_accounts: BTreeMap::from([
                (("ns".into(), "default".into()), vec!["sa-pull".into()]),
                (("ns".into(), "bare".into()), vec![]),
            ]),
            secrets: secrets.into_iter().map(|(n, s)| (("ns".into(), n.into()), s)).collect(),
            nodes: Platforms::new(),
        }
    }

    fn resolved(platforms: &[&str]) -> Resolved {
        Resolved {
            digest: "sha256:x".into(),
            media_type: "m".into(),
            platforms: platforms.iter().map(|p| (*p).to_owned()).collect(),
            size: None,
        }
    }

    fn sources(c: &Check) -> Vec<String> {
        match &c.plan {
            Plan::Resolve { candidates, .. } => candidates.iter().map(Candidate::source).collect(),
            Plan::Blocked(b) => vec![b.reason.to_owned()],
        }
    }

    #[test]
    fn the_pods_own_secrets_win_over_the_service_accounts() {
        let own = workload(
            WorkloadKind::Deployment,
            json!({"imagePullSecrets": [{"name": "own"}], "containers": [{"name": "c", "image": "reg.example.com/a"}]}),
        );
        let by_sa = workload(
            WorkloadKind::Deployment,
            json!({"containers": [{"name": "c", "image": "reg.example.com/a"}]}),
        );
        let v = view(
            vec![own, by_sa],
            vec![
                ("own", entries("reg.example.com")),
                ("sa-pull", entries("https://reg.example.com")),
            ],
        );
        let c = checks(&v);
        assert_eq!(sources(&c[0]), vec!["Secret ns/own (reg.example.com)"]);
        assert_eq!(sources(&c[1]), vec!["Secret ns/sa-pull (https://reg.example.com)"]);
        assert_eq!(
            secrets_to_read(&v.workloads, &v.service_accounts),
            vec![
                ("ns".to_owned(), "own".to_owned()),
                ("ns".to_owned(), "sa-pull".to_owned())
            ]
        );
    }

    #[test]
    fn a_fingerprint_changes_with_the_template_the_service_accounts_secrets_and_their_versions() {
        let w = workload(
            WorkloadKind::Deployment,
            json!({"containers": [{"name": "c", "image": "reg.example.com/a:v1"}]}),
        );
        let v = view(vec![], vec![]);
        let mut versions = BTreeMap::from([(("ns".to_owned(), "sa-pull".to_owned()), "1".to_owned())]);
        let before = fingerprint(&w, &v.service_accounts, &versions);
        assert_eq!(before, fingerprint(&w.clone(), &v.service_accounts, &versions));
        let mut sas = v.service_accounts.clone();
        sas.insert(("ns".into(), "default".into()), vec!["sa-pull".into(), "more".into()]);
        assert_ne!(
            before,
            fingerprint(&w, &sas, &versions),
            "the ServiceAccount's Secrets changed"
        );
        let changed = workload(
            WorkloadKind::Deployment,
            json!({"containers": [{"name": "c", "image": "reg.example.com/a:v2"}]}),
        );
        assert_ne!(
            before,
            fingerprint(&changed, &v.service_accounts, &versions),
            "the template changed"
        );
        versions.insert(("ns".into(), "sa-pull".into()), "2".into());
        assert_ne!(
            before,
            fingerprint(&w, &v.service_accounts, &versions),
            "pullkeeper rewrote the Secret"
        );
        versions.insert(("ns".into(), "sa-pull".into()), "1".into());
        versions.insert(("ns".into(), "unrelated".into()), "7".into());
        assert_eq!(
            before,
            fingerprint(&w, &v.service_accounts, &versions),
            "a Secret it does not use"
        );
    }

    #[test]
    fn a_bare_pod_uses_only_its_own_list_and_a_missing_service_account_blocks_templates() {
        let pod = workload(
            WorkloadKind::Pod,
            json!({"containers": [{"name": "c", "image": "reg.example.com/a"}]}),
        );
        let orphan = workload(
            WorkloadKind::Job,
            json!({"serviceAccountName": "ghost", "containers": [{"name": "c", "image": "reg.example.com/a"}]}),
        );
        let c = checks(&view(vec![pod, orphan], vec![("sa-pull", entries("reg.example.com"))]));
        assert!(sources(&c[0]).is_empty(), "anonymous");
        assert_eq!(sources(&c[1]), vec!["ServiceAccountNotFound"]);
    }

    #[test]
    fn an_invalid_image_name_is_refused_like_the_kubelet_does() {
        let w = workload(
            WorkloadKind::Pod,
            json!({"containers": [{"name": "c", "image": "Bad/Name"}]}),
        );
        let c = checks(&view(vec![w], vec![])).remove(0);
        let Plan::Blocked(b) = &c.plan else {
            panic!("not blocked")
        };
        assert_eq!((b.reason, b.fails), ("InvalidReference", true));
        assert_eq!(blocked_finding(&c.target, b).verdict, "Unpullable");
    }

    #[test]
    fn unreadable_and_malformed_secrets_block_with_their_reasons() {
        let w = |secret: &str| {
            workload(
                WorkloadKind::Deployment,
                json!({"imagePullSecrets": [{"name": secret}], "containers": [{"name": "c", "image": "reg.example.com/a"}]}),
            )
        };
        let v = view(
            vec![w("hidden"), w("broken"), w("gone"), w("opaque")],
            vec![
                ("hidden", SecretState::Forbidden),
                ("broken", SecretState::Malformed("Secret ns/broken: bad JSON".into())),
                ("gone", SecretState::Missing),
                ("opaque", SecretState::Ignored),
            ],
        );
        let c = checks(&v);
        let Plan::Blocked(hidden) = &c[0].plan else {
            panic!("not blocked")
        };
        assert_eq!((hidden.reason, hidden.fails), ("SecretForbidden", false));
        let Plan::Blocked(broken) = &c[1].plan else {
            panic!("not blocked")
        };
        assert_eq!((broken.reason, broken.fails), ("MalformedSecret", true));
        assert!(
            sources(&c[2]).is_empty() && sources(&c[3]).is_empty(),
            "skipped, anonymous"
        );
        let f = blocked_finding(&c[0].target, hidden);
        assert_eq!(f.verdict, "Unknown");
    }

    #[test]
    fn verdicts_follow_the_attempts() {
        let w = workload(
            WorkloadKind::Deployment,
            json!({"imagePullSecrets": [{"name": "gone"}],
                   "nodeSelector": {"kubernetes.io/arch": "s390x"},
                   "containers": [{"name": "c", "image": "reg.example.com/a:v1"}]}),
        );
        let c = checks(&view(vec![w], vec![("gone", SecretState::Missing)])).remove(0);
        assert_eq!(c.platforms, vec!["linux/s390x"]);
        let unauthorized = PullError::Unauthorized {
            registry: "reg.example.com".into(),
            detail: "anonymous pulls are not allowed and no credential was given".into(),
        };
        let f = verdict(&c, &[Err(unauthorized)]).expect("a finding");
        assert_eq!(f.reason, "Unauthorized");
        assert!(
            f.message
                .contains("no pull Secret of the pod's imagePullSecrets has an entry for reg.example.com"),
            "{}",
            f.message
        );
        assert!(
            f.message.contains("pull Secret ns/gone does not exist"),
            "{}",
            f.message
        );
        let f = verdict(&c, &[Ok(resolved(&["linux/amd64"]))]).expect("platform missing");
        assert_eq!(f.reason, "PlatformMissing");
        assert!(f.message.contains("linux/s390x"), "{}", f.message);
        assert!(verdict(&c, &[Ok(resolved(&["linux/amd64", "linux/s390x"]))]).is_none());
    }

    #[test]
    fn the_first_credentials_failure_is_reported_and_the_others_named() {
        let w = workload(
            WorkloadKind::Deployment,
            json!({"imagePullSecrets": [{"name": "a"}, {"name": "b"}], "containers": [{"name": "c", "image": "reg.example.com/a"}]}),
        );
        let c = checks(&view(
            vec![w],
            vec![("a", entries("reg.example.com")), ("b", entries("reg.example.com"))],
        ))
        .remove(0);
        let denied = PullError::Denied {
            repository: "reg.example.com/a".into(),
        };
        let unauthorized = PullError::Unauthorized {
            registry: "reg.example.com".into(),
            detail: "401".into(),
        };
        let f = verdict(&c, &[Err(denied.clone()), Err(unauthorized)]).expect("finding");
        assert_eq!(f.reason, "Denied");
        assert!(
            f.message
                .contains("with Secret ns/b (reg.example.com) too: Unauthorized"),
            "{}",
            f.message
        );
        assert_eq!(f.credentials.len(), 2);
        assert!(!serde_json::to_string(&f).expect("json").contains("s3cret"));
        let ok = Resolved {
            digest: "sha256:x".into(),
            media_type: "m".into(),
            platforms: vec![],
            size: None,
        };
        assert!(
            verdict(&c, &[Err(denied), Ok(ok)]).is_none(),
            "the second credential pulls"
        );
    }
}
