//! Pure functions saying which credentials a watch event concerns, each unit-tested
//! without a cluster: a namespace change, a managed Secret's change, a ServiceAccount's.

use kube::ResourceExt;

use crate::crd::{ClusterRegistryCredential, RegistryCredential};

use super::CredentialKind;
use super::identity::CredentialRef;
use super::index::ManagedSecret;
use super::target::{self, NamespaceInfo};
use super::validate;

/// The credentials a namespace change concerns: cluster credentials that target it now
/// or hold their Secret in it (so one that no longer targets it cleans up), and the
/// namespace's own RegistryCredentials. `holds(who, secret_name)` says whether `who`
/// holds that Secret in the namespace. An invalid target concerns no namespace (its
/// credential waits for a change of its own).
pub fn namespace_concerns(
    ns: &NamespaceInfo,
    clusters: &[&ClusterRegistryCredential],
    namespaced: &[&RegistryCredential],
    holds: impl Fn(&CredentialRef, &str) -> bool,
) -> Vec<CredentialRef> {
    let mut out: Vec<CredentialRef> = clusters
        .iter()
        .filter_map(|c| {
            let name = c.name_any();
            let who = CredentialRef::cluster(name.as_str());
            let t = &c.spec.target;
            let scope = validate::Scope::Cluster {
                selector: (t.namespace_selector.clone())
                    .and_then(|s| kube::core::Selector::try_from(s).ok())
                    .map(Into::into),
                namespaces: t.namespaces.clone(),
                exclude: t.exclude_namespaces.clone(),
            };
            let concerned = target::is_targeted(&scope, ns)
                || holds(&who, &validate::secret_name_of(&name, t.secret_name.as_deref()));
            concerned.then_some(who)
        })
        .collect();
    out.extend(
        namespaced
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(ns.name.as_str()))
            .map(|r| CredentialRef::namespaced(ns.name.as_str(), r.name_any())),
    );
    out
}

/// What happened to a managed Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretEvent {
    /// Seen in a watch's initial list.
    Listed,
    /// Created or changed.
    Written,
    /// Deleted.
    Deleted,
}

/// The credentials a change of a managed Secret concerns: the one that wrote it (unless
/// the change is its own write, the Secret holding the content its status names), and for
/// a Secret written or deleted, the credentials that want a Secret of that name in its
/// namespace (one waiting names the holder in its status; on a deletion the next in line
/// takes the name over).
pub fn secret_concerns(
    secret: &ManagedSecret,
    event: SecretEvent,
    clusters: &[&ClusterRegistryCredential],
    namespaced: &[&RegistryCredential],
) -> Vec<CredentialRef> {
    let holder = secret.holder();
    let its_own_write = |who: &CredentialRef| {
        let status = clusters
            .iter()
            .find(|c| c.reference() == *who)
            .map(|c| c.status.as_ref())
            .or_else(|| {
                namespaced
                    .iter()
                    .find(|r| r.reference() == *who)
                    .map(|r| r.status.as_ref())
            });
        let written = status.flatten().and_then(|s| s.content_hash.as_deref());
        // Someone else wrote to it (data edited by hand): its writer must put it back.
        event == SecretEvent::Written && !secret.edited && written.is_some_and(|h| secret.has_digest(h))
    };
    let mut out: Vec<CredentialRef> = holder.iter().filter(|who| !its_own_write(who)).cloned().collect();
    if event == SecretEvent::Listed {
        return out;
    }
    let (namespace, name) = (Some(&*secret.namespace), &*secret.name);
    let wants = |who: &str, explicit: Option<&str>| validate::secret_name_of(who, explicit) == name;
    let rivals = clusters
        .iter()
        .filter(|c| wants(&c.name_any(), c.spec.target.secret_name.as_deref()))
        .map(|c| CredentialRef::cluster(c.name_any()))
        .chain(
            namespaced
                .iter()
                .filter(|r| r.namespace().as_deref() == namespace)
                .filter(|r| wants(&r.name_any(), r.spec.target.secret_name.as_deref()))
                .map(|r| CredentialRef::namespaced(namespace.unwrap_or_default(), r.name_any())),
        )
        .filter(|who| Some(who) != holder.as_ref());
    out.extend(rivals);
    out
}

/// The credentials a change of ServiceAccount `name` in `namespace` (listing
/// `pull_secrets`) concerns: those with something to do there, that is, those that patch
/// it and are not listed yet, and those listed that no longer patch it. A ServiceAccount
/// already as a credential wants it costs that credential nothing, so the patches of many
/// credentials to one ServiceAccount do not re-queue each other.
pub fn service_account_concerns(
    namespace: &str,
    name: &str,
    pull_secrets: &[&str],
    clusters: &[&ClusterRegistryCredential],
    namespaced: &[&RegistryCredential],
) -> Vec<CredentialRef> {
    let concerned = |credential: &str, secret_name: Option<&str>, patched: Option<&[String]>| {
        let listed = pull_secrets.contains(&validate::secret_name_of(credential, secret_name).as_str());
        targets_service_account(patched, name) != listed
    };
    let clusters = clusters
        .iter()
        .filter(|c| {
            let t = &c.spec.target;
            concerned(&c.name_any(), t.secret_name.as_deref(), t.service_accounts.as_deref())
        })
        .map(|c| CredentialRef::cluster(c.name_any()));
    let namespaced = namespaced
        .iter()
        .filter(|r| {
            let t = &r.spec.target;
            r.namespace().as_deref() == Some(namespace)
                && concerned(&r.name_any(), t.secret_name.as_deref(), t.service_accounts.as_deref())
        })
        .map(|r| CredentialRef::namespaced(namespace, r.name_any()));
    clusters.chain(namespaced).collect()
}

/// Whether a credential whose `target.serviceAccounts` is `listed` (absent: `[default]`)
/// patches the ServiceAccount `name`.
pub fn targets_service_account(listed: Option<&[String]>, name: &str) -> bool {
    match listed {
        None => name == "default",
        Some(list) => list.iter().any(|s| s == name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::secret::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
    use serde_json::json;
    use std::sync::Arc;

    fn cluster(name: &str, target: serde_json::Value) -> Arc<ClusterRegistryCredential> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "pullkeeper.io/v1alpha1",
                "kind": "ClusterRegistryCredential",
                "metadata": {"name": name},
                "spec": {
                    "registry": "registry.example.com",
                    "provider": {"basic": {"secretRef": {"name": "s", "namespace": "ops"}}},
                    "target": target,
                },
            }))
            .expect("cluster credential"),
        )
    }

    fn namespaced(namespace: &str, name: &str, target: serde_json::Value) -> Arc<RegistryCredential> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "pullkeeper.io/v1alpha1",
                "kind": "RegistryCredential",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "registry": "registry.example.com",
                    "provider": {"basic": {"secretRef": {"name": "s"}}},
                    "target": target,
                },
            }))
            .expect("registry credential"),
        )
    }

    const H1: &str = "0123456789abcdef0123456789abcdef";

    fn refs<K>(v: &[Arc<K>]) -> Vec<&K> {
        v.iter().map(AsRef::as_ref).collect()
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..NamespaceInfo::default()
        }
    }

    #[test]
    fn a_namespace_concerns_the_credentials_that_target_it_or_hold_a_secret_in_it() {
        let clusters = [
            cluster("all", json!({})),
            cluster("team", json!({"namespaceSelector": {"matchLabels": {"team": "a"}}})),
            cluster("listed", json!({"namespaces": ["other"]})),
            cluster("left", json!({"namespaceSelector": {"matchLabels": {"team": "b"}}})),
            cluster("excluded", json!({"excludeNamespaces": ["web"]})),
        ];
        let namespaced = [
            namespaced("web", "own", json!({})),
            namespaced("elsewhere", "own", json!({})),
        ];
        // `left` still holds its Secret here: the namespace was relabelled away from it.
        let holds = |who: &CredentialRef, secret: &str| who.name == "left" && secret == "pullkeeper-left";
        let got = namespace_concerns(
            &ns("web", &[("team", "a")]),
            &refs(&clusters),
            &refs(&namespaced),
            holds,
        );
        assert_eq!(
            got,
            vec![
                CredentialRef::cluster("all"),
                CredentialRef::cluster("team"),
                CredentialRef::cluster("left"),
                CredentialRef::namespaced("web", "own"),
            ]
        );
        let none = |_: &CredentialRef, _: &str| false;
        let got = namespace_concerns(&ns("quiet", &[]), &refs(&clusters), &refs(&namespaced), none);
        assert_eq!(
            got,
            vec![CredentialRef::cluster("all"), CredentialRef::cluster("excluded")]
        );
        // Opting out by annotation concerns no cluster credential that holds nothing there.
        let mut opted_out = ns("quiet", &[]);
        opted_out
            .annotations
            .insert(target::EXCLUDE_ANNOTATION.into(), "true".into());
        assert!(namespace_concerns(&opted_out, &refs(&clusters), &[], none).is_empty());
    }

    #[test]
    fn a_deleted_secret_concerns_its_writer_and_those_next_in_line_for_its_name() {
        use crate::controller::secret::{CREDENTIAL_LABEL, SCOPE_LABEL};
        let clusters = [
            cluster("holder", json!({"secretName": "regcred"})),
            cluster("next", json!({"secretName": "regcred"})),
            cluster("other", json!({})),
        ];
        let namespaced = [
            namespaced("web", "own", json!({"secretName": "regcred"})),
            namespaced("elsewhere", "own", json!({"secretName": "regcred"})),
        ];
        let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some("web".into()),
            name: Some("regcred".into()),
            labels: Some(
                [
                    (MANAGED_BY_LABEL, MANAGED_BY_VALUE),
                    (CREDENTIAL_LABEL, "holder"),
                    (SCOPE_LABEL, crate::controller::identity::SCOPE_CLUSTER),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..Default::default()
        };
        let secret = ManagedSecret::of(&meta);
        assert_eq!(
            secret_concerns(&secret, SecretEvent::Listed, &refs(&clusters), &refs(&namespaced)),
            vec![CredentialRef::cluster("holder")],
            "an initial list concerns its writer only"
        );
        assert_eq!(
            secret_concerns(&secret, SecretEvent::Deleted, &refs(&clusters), &refs(&namespaced)),
            vec![
                CredentialRef::cluster("holder"),
                CredentialRef::cluster("next"),
                CredentialRef::namespaced("web", "own"),
            ]
        );
        // Its own write (the content its status names) costs the writer no reconcile; an
        // edit (another digest) does.
        let mut clusters = clusters;
        std::sync::Arc::make_mut(&mut clusters[0]).status = Some(crate::crd::RegistryCredentialStatus {
            content_hash: Some(H1.into()),
            ..Default::default()
        });
        let with_digest = |hash: &str| {
            let mut meta = meta.clone();
            meta.annotations = Some([(crate::controller::secret::HASH_ANNOTATION.to_owned(), hash.to_owned())].into());
            ManagedSecret::of(&meta)
        };
        let written = |hash: &str| secret_concerns(&with_digest(hash), SecretEvent::Written, &refs(&clusters), &[]);
        assert_eq!(written(H1), vec![CredentialRef::cluster("next")]);
        let edited = ManagedSecret {
            edited: true,
            ..with_digest(H1)
        };
        assert_eq!(
            secret_concerns(&edited, SecretEvent::Written, &refs(&clusters), &[])[0],
            CredentialRef::cluster("holder"),
            "edited by someone else: put back"
        );
        assert_eq!(
            written("00000000000000000000000000000000"),
            vec![CredentialRef::cluster("holder"), CredentialRef::cluster("next")]
        );
    }

    #[test]
    fn a_service_account_event_concerns_only_credentials_that_patch_it() {
        assert!(targets_service_account(None, "default"));
        assert!(!targets_service_account(None, "builder"));
        let listed = ["default".to_owned(), "builder".to_owned()];
        assert!(targets_service_account(Some(&listed), "builder"));
        assert!(!targets_service_account(Some(&listed), "runner"));
        assert!(!targets_service_account(Some(&[]), "default"), "[] patches none");

        let clusters = [
            cluster("plain", json!({})),
            cluster("builders", json!({"serviceAccounts": ["builder"]})),
            cluster("none", json!({"serviceAccounts": []})),
        ];
        let namespaced = [
            namespaced("web", "own", json!({})),
            namespaced("other", "theirs", json!({})),
        ];
        assert_eq!(
            service_account_concerns("web", "default", &[], &refs(&clusters), &refs(&namespaced)),
            vec![CredentialRef::cluster("plain"), CredentialRef::namespaced("web", "own")]
        );
        assert_eq!(
            service_account_concerns("web", "builder", &[], &refs(&clusters), &refs(&namespaced)),
            vec![CredentialRef::cluster("builders")]
        );
        assert!(service_account_concerns("web", "runner", &[], &refs(&clusters), &refs(&namespaced)).is_empty());
        // Already listed: nothing to do, no reconcile; listed but no longer patched: cleanup.
        assert_eq!(
            service_account_concerns(
                "web",
                "default",
                &["pullkeeper-plain", "pullkeeper-own"],
                &refs(&clusters),
                &refs(&namespaced)
            ),
            Vec::<CredentialRef>::new()
        );
        assert_eq!(
            service_account_concerns(
                "web",
                "runner",
                &["pullkeeper-builders"],
                &refs(&clusters),
                &refs(&namespaced)
            ),
            vec![CredentialRef::cluster("builders")]
        );
    }
}
