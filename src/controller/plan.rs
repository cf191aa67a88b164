//! Pure step: from the cached cluster state and the desired content, the writes needed.
//! Nothing here talks to the apiserver, so every rule is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

use super::identity::CredentialRef;
use super::index::{Account, ManagedSecret};
use super::secret::{Content, Owner};
use super::target::{self, NamespaceInfo, NamespaceLike};
use super::validate::{Scope, ValidSpec};

/// A Secret to create or rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Not in the cache: create it, unless someone else's Secret is there.
    Create(String),
    /// Ours but stale or edited: apply.
    Apply(String),
}

/// One of our Secrets to delete, with the identity it was seen with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID precondition, so only the object we saw is deleted.
    pub uid: Option<String>,
}

/// A namespace where the Secret name is someone else's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Namespace.
    pub namespace: String,
    /// The pullkeeper credential that holds the Secret or has the first claim on it;
    /// `None` for a Secret pullkeeper did not write.
    pub holder: Option<CredentialRef>,
}

/// An older credential writing a Secret of the same name. Where it targets a namespace
/// that holds no such Secret yet, it has the first claim, so two credentials that want
/// one name never both create it: the oldest writes, the other reports a conflict, and
/// from then on whoever holds the Secret keeps it.
#[derive(Clone, Debug)]
pub struct Rival {
    /// Who.
    pub who: CredentialRef,
    /// The namespaces it targets.
    pub scope: Scope,
}

/// Whether a credential created at `a` (and called `a_ref`) comes before one created at
/// `b`: older first, then by kind, namespace and name, so every reconcile of either one
/// agrees. A missing timestamp counts as newest.
pub fn senior(a: (Option<Timestamp>, &CredentialRef), b: (Option<Timestamp>, &CredentialRef)) -> bool {
    let key = |(t, r): (Option<Timestamp>, &CredentialRef)| (t.is_none(), t, r.namespace.is_some(), r.clone());
    key(a) < key(b)
}

/// An entry to add to or remove from a ServiceAccount's `imagePullSecrets`. The patch is
/// made when it is written, from the freshest copy of the ServiceAccount, together with
/// the other credentials' entries for it (see `apply::Accounts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaChange {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub name: String,
    /// The Secret the entry names.
    pub secret: String,
    /// Add the entry (else remove it).
    pub add: bool,
}

/// Everything one reconcile will do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Targeted namespaces, sorted.
    pub targeted: Vec<String>,
    /// Targeted namespaces already holding the current secret.
    pub current: Vec<String>,
    /// Secrets to create or rewrite.
    pub writes: Vec<Write>,
    /// Namespaces where someone else holds (or, being older, has the first claim on) the
    /// Secret name.
    pub conflicts: Vec<Conflict>,
    /// Our Secrets that must go (namespace left the target, or the name changed).
    pub deletes: Vec<Delete>,
    /// ServiceAccount entries to add or remove.
    pub sa_changes: Vec<SaChange>,
}

/// Cached cluster state a plan is computed from.
pub struct Snapshot<'a, N: NamespaceLike = NamespaceInfo> {
    /// Every namespace.
    pub namespaces: &'a [N],
    /// pullkeeper-managed Secrets (any credential's).
    pub managed_secrets: &'a [&'a ManagedSecret],
    /// ServiceAccounts, any namespace.
    pub service_accounts: &'a [&'a Account],
    /// Older credentials writing a Secret of the same name.
    pub rivals: &'a [Rival],
}

/// Computes the plan. With `content` absent (the provider failed), nothing is written or
/// rewritten, so working secrets stay; Secrets in namespaces that left the target are
/// still removed.
pub fn compute<N: NamespaceLike>(
    owner: &Owner,
    spec: &ValidSpec,
    content: Option<&Content>,
    snap: &Snapshot<'_, N>,
) -> Plan {
    let targeted = target::targeted(&spec.scope, snap.namespaces);
    let targeted_set: BTreeSet<&str> = targeted.iter().map(String::as_str).collect();
    let by_ns_name: BTreeMap<(&str, &str), &ManagedSecret> = snap
        .managed_secrets
        .iter()
        .map(|m| ((&*m.namespace, &*m.name), *m))
        .collect();
    let mut sas_by_ns: BTreeMap<&str, Vec<&Account>> = BTreeMap::new();
    for sa in snap.service_accounts {
        sas_by_ns.entry(&sa.namespace).or_default().push(sa);
    }
    let mut plan = Plan {
        targeted: targeted.clone(),
        ..Plan::default()
    };

    let infos: BTreeMap<&str, &N> = snap.namespaces.iter().map(|n| (n.name(), n)).collect();
    for ns in &targeted {
        let existing = by_ns_name.get(&(ns.as_str(), spec.secret_name.as_str())).copied();
        let state = match content {
            Some(c) => state(owner, existing, c),
            // No new content: whatever of ours is there stays as it is.
            None if existing.is_some_and(|m| m.owned_by(owner)) => State::Current,
            None if existing.is_some() => State::Foreign,
            None => State::Missing,
        };
        match state {
            State::Foreign => {
                plan.conflicts.push(Conflict {
                    namespace: ns.clone(),
                    holder: existing.and_then(ManagedSecret::holder),
                });
                continue;
            }
            State::Missing if content.is_some() => {
                let info = infos.get(ns.as_str());
                if let Some(rival) = snap
                    .rivals
                    .iter()
                    .find(|r| info.is_some_and(|n| target::is_targeted(&r.scope, *n)))
                {
                    plan.conflicts.push(Conflict {
                        namespace: ns.clone(),
                        holder: Some(rival.who.clone()),
                    });
                    continue;
                }
                plan.writes.push(Write::Create(ns.clone()));
            }
            State::Current => plan.current.push(ns.clone()),
            State::Stale => plan.writes.push(Write::Apply(ns.clone())),
            State::Missing => continue,
        }
        for sa in sas_by_ns.get(ns.as_str()).into_iter().flatten() {
            let add = spec.service_accounts.iter().any(|n| *n == *sa.name);
            if add != sa.lists(&spec.secret_name) {
                plan.sa_changes.push(SaChange {
                    namespace: ns.clone(),
                    name: sa.name.to_string(),
                    secret: spec.secret_name.clone(),
                    add,
                });
            }
        }
    }

    for secret in snap.managed_secrets.iter().filter(|m| m.owned_by(owner)) {
        let (ns, name) = (&*secret.namespace, &*secret.name);
        if targeted_set.contains(ns) && name == spec.secret_name {
            continue;
        }
        plan.deletes.push(deletion(secret));
        for sa in sas_by_ns.get(ns).into_iter().flatten() {
            if sa.lists(name) {
                plan.sa_changes.push(removal(sa, name));
            }
        }
    }
    plan
}

/// The status counts from the index: the namespaces `spec` targets, and how many of them
/// hold the current Secret (`secret` looks up the Secret of the target name in a
/// namespace).
pub fn tally<'a, N: NamespaceLike + 'a>(
    owner: &Owner,
    spec: &ValidSpec,
    content: &Content,
    namespaces: impl IntoIterator<Item = &'a N>,
    secret: impl Fn(&str) -> Option<&'a ManagedSecret>,
) -> (usize, usize) {
    let (mut targeted, mut current) = (0, 0);
    for ns in namespaces
        .into_iter()
        .filter(|ns| target::is_targeted(&spec.scope, *ns))
    {
        targeted += 1;
        if state(owner, secret(ns.name()), content) == State::Current {
            current += 1;
        }
    }
    (targeted, current)
}

/// How an existing Secret of the target name relates to what should be there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Nothing there (as far as the index knows).
    Missing,
    /// Ours and current: nothing to write.
    Current,
    /// Ours but out of date or edited by someone else: rewrite.
    Stale,
    /// Someone else's: never touch.
    Foreign,
}

/// Classifies an existing Secret against the content it should hold.
pub fn state(owner: &Owner, existing: Option<&ManagedSecret>, content: &Content) -> State {
    match existing {
        None => State::Missing,
        Some(s) if !s.owned_by(owner) => State::Foreign,
        Some(s) if s.has_digest(&content.hash) && !s.edited => State::Current,
        Some(_) => State::Stale,
    }
}

/// The cleanup plan when the credential is deleted: every Secret it wrote and every
/// `imagePullSecrets` entry naming one of them.
pub fn cleanup<N: NamespaceLike>(owner: &Owner, snap: &Snapshot<'_, N>) -> Plan {
    let mut plan = Plan::default();
    for secret in snap.managed_secrets.iter().filter(|m| m.owned_by(owner)) {
        for sa in snap
            .service_accounts
            .iter()
            .filter(|sa| sa.namespace == secret.namespace)
        {
            if sa.lists(&secret.name) {
                plan.sa_changes.push(removal(sa, &secret.name));
            }
        }
        plan.deletes.push(deletion(secret));
    }
    plan
}

fn deletion(secret: &ManagedSecret) -> Delete {
    Delete {
        namespace: secret.namespace.to_string(),
        name: secret.name.to_string(),
        uid: secret.uid.as_ref().map(ToString::to_string),
    }
}

fn removal(sa: &Account, secret: &str) -> SaChange {
    SaChange {
        namespace: sa.namespace.to_string(),
        name: sa.name.to_string(),
        secret: secret.to_owned(),
        add: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::secret;
    use crate::controller::validate::{Scope, ValidSpec};
    use crate::crd::{BasicProvider, ClusterSecretRef, Provider, TlsSpec};
    use crate::provider::Credential;
    use crate::registry::RegistryHost;
    use k8s_openapi::api::core::v1::{LocalObjectReference, ServiceAccount};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta};
    use secrecy::SecretString;
    use serde_json::{Value, json};

    fn owner() -> Owner {
        Owner {
            scope: "cluster",
            name: "ghcr".into(),
            namespace: None,
            uid: "u1".into(),
        }
    }

    fn spec(scope: Scope) -> ValidSpec {
        ValidSpec {
            registry: RegistryHost::parse("ghcr.io").expect("host"),
            provider: Provider::Basic(BasicProvider {
                secret_ref: ClusterSecretRef {
                    name: "s".into(),
                    namespace: "ops".into(),
                },
                username_key: "username".into(),
                password_key: "password".into(),
            }),
            renew_before: None,
            refresh_interval: std::time::Duration::from_secs(3600),
            secret_name: "pullkeeper-ghcr".into(),
            scope,
            service_accounts: vec!["default".into()],
            verify: None,
            tls: TlsSpec::default(),
            suspend: false,
        }
    }

    fn all() -> Scope {
        Scope::Cluster {
            selector: None,
            namespaces: None,
            exclude: vec![],
        }
    }

    fn content() -> Content {
        secret::content(
            &owner(),
            &RegistryHost::parse("ghcr.io").expect("host"),
            &Credential {
                username: "u".into(),
                password: SecretString::from("p"),
                expires_at: None,
            },
        )
    }

    fn ns(name: &str) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            ..Default::default()
        }
    }

    fn managed(owner: &Owner, ns: &str, name: &str, hash: &str) -> ManagedSecret {
        ManagedSecret::of(&ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{ns}")),
            labels: Some(owner.labels()),
            annotations: Some([(secret::HASH_ANNOTATION.to_owned(), hash.to_owned())].into()),
            ..Default::default()
        })
    }

    fn sa(ns: &str, name: &str, entries: &[&str]) -> Account {
        let mut sa = ServiceAccount::default();
        sa.metadata.namespace = Some(ns.into());
        sa.metadata.name = Some(name.into());
        sa.metadata.resource_version = Some("1".into());
        sa.image_pull_secrets = Some(
            entries
                .iter()
                .map(|n| LocalObjectReference { name: (*n).into() })
                .collect(),
        );
        Account::of(&sa)
    }

    #[test]
    fn creates_missing_rewrites_stale_skips_current() {
        let c = content();
        let namespaces = [ns("a"), ns("b"), ns("c")];
        let secrets = [
            managed(&owner(), "b", "pullkeeper-ghcr", &c.hash),
            managed(&owner(), "c", "pullkeeper-ghcr", "old"),
        ];
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &[],
            rivals: &[],
        };
        let plan = compute(&owner(), &spec(all()), Some(&c), &snap);
        assert_eq!(plan.writes, vec![Write::Create("a".into()), Write::Apply("c".into())]);
        assert_eq!(plan.current, vec!["b".to_owned()]);
        assert!(plan.deletes.is_empty() && plan.conflicts.is_empty());
    }

    #[test]
    fn the_tally_counts_targeted_namespaces_and_those_holding_the_current_secret() {
        let c = content();
        let other = Owner {
            name: "other".into(),
            ..owner()
        };
        let namespaces = [ns("a"), ns("b"), ns("c"), ns("d"), ns("kube-system")];
        let secrets = [
            managed(&owner(), "a", "pullkeeper-ghcr", &c.hash),
            managed(&owner(), "b", "pullkeeper-ghcr", "old"),
            managed(&other, "c", "pullkeeper-ghcr", &c.hash),
        ];
        let scope = Scope::Cluster {
            selector: None,
            namespaces: None,
            exclude: vec!["kube-system".into()],
        };
        let lookup = |n: &str| secrets.iter().find(|s| *s.namespace == *n);
        assert_eq!(
            tally(&owner(), &spec(scope), &c, &namespaces, lookup),
            (4, 1),
            "a: current; b: stale; c: someone else's; d: missing; kube-system: not targeted"
        );
    }

    #[test]
    fn a_resync_with_nothing_changed_writes_nothing() {
        let c = content();
        let namespaces = [ns("a")];
        let secrets = [managed(&owner(), "a", "pullkeeper-ghcr", &c.hash)];
        let sas = [sa("a", "default", &["pullkeeper-ghcr"])];
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &[],
        };
        let plan = compute(&owner(), &spec(all()), Some(&c), &snap);
        assert!(plan.writes.is_empty() && plan.sa_changes.is_empty() && plan.deletes.is_empty());
    }

    #[test]
    fn another_credentials_secret_is_a_conflict_and_its_sas_are_left_alone() {
        let c = content();
        let other = Owner {
            name: "other".into(),
            ..owner()
        };
        let namespaces = [ns("a")];
        let secrets = [managed(&other, "a", "pullkeeper-ghcr", "x")];
        let sas = [sa("a", "default", &[])];
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &[],
        };
        let plan = compute(&owner(), &spec(all()), Some(&c), &snap);
        assert_eq!(
            plan.conflicts,
            vec![Conflict {
                namespace: "a".into(),
                holder: Some(CredentialRef::cluster("other")),
            }]
        );
        assert!(plan.writes.is_empty() && plan.sa_changes.is_empty() && plan.deletes.is_empty());
    }

    #[test]
    fn an_older_rival_has_the_first_claim_and_a_holder_keeps_its_secret() {
        let c = content();
        let namespaces = [ns("a"), ns("b")];
        let rivals = [Rival {
            who: CredentialRef::cluster("older"),
            scope: Scope::Cluster {
                selector: None,
                namespaces: Some(vec!["a".into()]),
                exclude: vec![],
            },
        }];
        let sas = [sa("a", "default", &[]), sa("b", "default", &[])];
        // Nobody holds the name yet: the older credential creates it in "a".
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &[],
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &rivals,
        };
        let plan = compute(&owner(), &spec(all()), Some(&c), &snap);
        assert_eq!(plan.writes, vec![Write::Create("b".into())]);
        assert_eq!(
            plan.conflicts,
            vec![Conflict {
                namespace: "a".into(),
                holder: Some(CredentialRef::cluster("older")),
            }]
        );
        // Once this one holds "a" (it wrote first), it keeps it: no rival takes it over.
        let secrets = [managed(&owner(), "a", "pullkeeper-ghcr", &c.hash)];
        let snap = Snapshot {
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            ..snap
        };
        let plan = compute(&owner(), &spec(all()), Some(&c), &snap);
        assert!(plan.conflicts.is_empty());
        assert_eq!(plan.current, vec!["a".to_owned()]);
    }

    #[test]
    fn seniority_is_age_then_a_stable_tie_break() {
        let t = |s| Some(Timestamp::from_second(s).expect("t"));
        let (a, b) = (CredentialRef::cluster("a"), CredentialRef::cluster("b"));
        let n = CredentialRef::namespaced("web", "a");
        assert!(senior((t(1), &b), (t(2), &a)), "older first");
        assert!(senior((t(1), &a), (t(1), &b)) && !senior((t(1), &b), (t(1), &a)));
        assert!(senior((t(1), &a), (t(1), &n)), "cluster kind first on a tie");
        assert!(senior((t(9), &b), (None, &a)), "unknown age last");
        assert!(!senior((t(1), &a), (t(1), &a)));
    }

    #[test]
    fn namespaces_leaving_the_target_lose_secret_and_entry() {
        let c = content();
        let namespaces = [ns("a"), ns("gone")];
        let secrets = [managed(&owner(), "gone", "pullkeeper-ghcr", &c.hash)];
        let sas = [sa("gone", "default", &["theirs", "pullkeeper-ghcr"])];
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &[],
        };
        let scope = Scope::Cluster {
            selector: None,
            namespaces: Some(vec!["a".into()]),
            exclude: vec![],
        };
        let plan = compute(&owner(), &spec(scope), Some(&c), &snap);
        assert_eq!(plan.deletes.len(), 1);
        assert_eq!(plan.deletes[0].namespace, "gone");
        assert_eq!(plan.sa_changes.len(), 1);
        assert!(!plan.sa_changes[0].add, "a removal");
    }

    #[test]
    fn provider_failure_writes_nothing_but_keeps_existing() {
        let namespaces = [ns("a"), ns("b")];
        let secrets = [managed(&owner(), "a", "pullkeeper-ghcr", "whatever")];
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &[],
            rivals: &[],
        };
        let plan = compute(&owner(), &spec(all()), None, &snap);
        assert!(plan.writes.is_empty() && plan.deletes.is_empty());
        assert_eq!(plan.current, vec!["a".to_owned()]);
    }

    #[test]
    fn listed_service_accounts_get_the_entry_and_unlisted_lose_it() {
        let c = content();
        let namespaces = [ns("a")];
        let secrets = [managed(&owner(), "a", "pullkeeper-ghcr", &c.hash)];
        let sas = [
            sa("a", "default", &["theirs"]),
            sa("a", "builder", &["pullkeeper-ghcr"]),
            sa("a", "other", &["theirs"]),
        ];
        let snap = Snapshot {
            namespaces: &namespaces,
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &[],
        };
        let plan = compute(&owner(), &spec(all()), Some(&c), &snap);
        let touched: Vec<_> = plan.sa_changes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(touched, vec!["default", "builder"]);
    }

    #[test]
    fn cleanup_removes_everything_ours_only() {
        let other = Owner {
            name: "other".into(),
            ..owner()
        };
        let secrets = [
            managed(&owner(), "a", "pullkeeper-ghcr", "h"),
            managed(&other, "a", "pullkeeper-other", "h"),
        ];
        let sas = [sa("a", "default", &["pullkeeper-other", "pullkeeper-ghcr"])];
        let snap: Snapshot<'_> = Snapshot {
            namespaces: &[],
            managed_secrets: &secrets.iter().collect::<Vec<_>>(),
            service_accounts: &sas.iter().collect::<Vec<_>>(),
            rivals: &[],
        };
        let plan = cleanup(&owner(), &snap);
        assert_eq!(plan.deletes.len(), 1);
        assert_eq!(plan.deletes[0].name, "pullkeeper-ghcr");
        assert_eq!(
            plan.sa_changes,
            vec![SaChange {
                namespace: "a".into(),
                name: "default".into(),
                secret: "pullkeeper-ghcr".into(),
                add: false,
            }],
            "only its own entry goes"
        );
    }

    fn cred(password: &str) -> Credential {
        Credential {
            username: "u".into(),
            password: SecretString::from(password),
            expires_at: None,
        }
    }

    fn meta_with(owner: &Owner, hash: &str, managers: &[(&str, Value)]) -> ObjectMeta {
        ObjectMeta {
            labels: Some(owner.labels()),
            annotations: Some([(secret::HASH_ANNOTATION.to_owned(), hash.to_owned())].into()),
            managed_fields: Some(
                managers
                    .iter()
                    .map(|(m, f)| ManagedFieldsEntry {
                        manager: Some((*m).to_owned()),
                        fields_v1: Some(FieldsV1(f.clone())),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn an_existing_secret_is_missing_current_stale_or_someone_elses() {
        let host = RegistryHost::parse("ghcr.io").expect("host");
        let c = secret::content(&owner(), &host, &cred("pw"));
        assert_eq!(state(&owner(), None, &c), State::Missing);
        let ours = json!({"f:data": {"f:.dockerconfigjson": {}}, "f:type": {}});
        let current = meta_with(&owner(), &c.hash, &[(crate::controller::OBJECT_MANAGER, ours.clone())]);
        assert_eq!(state(&owner(), Some(&ManagedSecret::of(&current)), &c), State::Current);
        let old = meta_with(&owner(), "old", &[(crate::controller::OBJECT_MANAGER, ours.clone())]);
        assert_eq!(state(&owner(), Some(&ManagedSecret::of(&old)), &c), State::Stale);
        let edited = meta_with(
            &owner(),
            &c.hash,
            &[
                (crate::controller::OBJECT_MANAGER, ours),
                ("kubectl-edit", json!({"f:data": {"f:.dockerconfigjson": {}}})),
            ],
        );
        assert_eq!(state(&owner(), Some(&ManagedSecret::of(&edited)), &c), State::Stale);
        let mut someone_else = owner();
        someone_else.name = "other".into();
        let theirs = meta_with(&someone_else, &c.hash, &[]);
        assert_eq!(state(&owner(), Some(&ManagedSecret::of(&theirs)), &c), State::Foreign);
        assert_eq!(
            state(&owner(), Some(&ManagedSecret::of(&ObjectMeta::default())), &c),
            State::Foreign
        );
    }
}
