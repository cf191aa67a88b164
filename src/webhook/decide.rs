//! Pure step: what the webhook adds to a new Pod. The same rules as the
//! MutatingAdmissionPolicy route (see `controller::admission`), with the reconciler's own
//! targeting ([`target::is_targeted`]): a credential that targets the Pod's namespace and
//! its ServiceAccount, is not suspended and is not being deleted, gets its pull secret's
//! name appended to `spec.imagePullSecrets` if the name is missing. Nothing else changes.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::controller::CredentialKind;
use crate::controller::mappers::targets_service_account;
use crate::controller::target::{self, NamespaceInfo};
use crate::controller::validate::Scope;

/// What the decision needs to know about one credential.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The namespaces it targets.
    pub scope: Scope,
    /// Name of the pull secret it writes.
    pub secret_name: String,
    /// ServiceAccounts whose Pods get the secret (`target.serviceAccounts`, default
    /// `[default]`).
    pub service_accounts: Vec<String>,
}

impl Candidate {
    /// The candidate for a credential, or `None` when it supplies no Pod: being deleted,
    /// suspended, or with a spec the reconciler refuses (it then writes no Secret either).
    pub fn of<K: CredentialKind>(obj: &K) -> Option<Self> {
        if obj.meta().deletion_timestamp.is_some() {
            return None;
        }
        let spec = obj.validate().ok().filter(|s| !s.suspend)?;
        Some(Self {
            scope: spec.scope,
            secret_name: spec.secret_name,
            service_accounts: spec.service_accounts,
        })
    }
}

/// The ServiceAccount a Pod runs as: `spec.serviceAccountName`, `default` when empty.
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// The pull secret names to add to `pod` in namespace `ns`, sorted and without duplicates:
/// those of the candidates that target the namespace and the Pod's ServiceAccount, less
/// the names the Pod already lists.
pub fn missing(pod: &Pod, ns: &NamespaceInfo, candidates: &[Candidate]) -> Vec<String> {
    let sa = service_account(pod);
    let listed: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.image_pull_secrets.iter().flatten())
        .map(|r| r.name.as_str())
        .collect();
    let mut names: Vec<String> = candidates
        .iter()
        .filter(|c| target::is_targeted(&c.scope, ns))
        .filter(|c| targets_service_account(Some(&c.service_accounts), sa))
        .map(|c| c.secret_name.clone())
        .filter(|n| !listed.contains(&n.as_str()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// JSON patch operations adding `names` to the Pod's `imagePullSecrets`: appended one by
/// one (`/spec/imagePullSecrets/-`) to an existing list, or, when the Pod has none, the
/// whole list as an untyped `[{"name": ...}]` value. Other entries and their order are
/// never touched.
pub fn operations(pod: &Pod, names: &[String]) -> Vec<Value> {
    if names.is_empty() {
        return Vec::new();
    }
    let has_list = pod.spec.as_ref().is_some_and(|s| s.image_pull_secrets.is_some());
    if has_list {
        names
            .iter()
            .map(|n| json!({"op": "add", "path": "/spec/imagePullSecrets/-", "value": {"name": n}}))
            .collect()
    } else {
        let list: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
        vec![json!({"op": "add", "path": "/spec/imagePullSecrets", "value": list})]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::target::EXCLUDE_ANNOTATION;
    use crate::crd::{ClusterRegistryCredential, RegistryCredential};

    fn pod(sa: Option<&str>, list: Option<&[&str]>) -> Pod {
        let mut spec = json!({"containers": [{"name": "c", "image": "x"}]});
        if let Some(sa) = sa {
            spec["serviceAccountName"] = json!(sa);
        }
        if let Some(list) = list {
            spec["imagePullSecrets"] = json!(list.iter().map(|n| json!({"name": n})).collect::<Vec<_>>());
        }
        serde_json::from_value(json!({"metadata": {"generateName": "p-"}, "spec": spec})).expect("pod")
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..Default::default()
        }
    }

    fn cluster(name: &str, spec_extra: Value) -> ClusterRegistryCredential {
        let mut spec = json!({
            "registry": "ghcr.io",
            "provider": {"basic": {"secretRef": {"name": "s", "namespace": "ops"}}},
        });
        if let (Some(s), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
            s.extend(extra.clone());
        }
        serde_json::from_value(json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("credential")
    }

    /// Applies the operations to the Pod as the apiserver would; returns the names listed.
    fn admitted(pod: &Pod, ns: &NamespaceInfo, candidates: &[Candidate]) -> Vec<String> {
        let ops = operations(pod, &missing(pod, ns, candidates));
        let mut doc = serde_json::to_value(pod).expect("pod");
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).expect("patch");
        json_patch::patch(&mut doc, &patch).expect("applies");
        let after: Pod = serde_json::from_value(doc).expect("pod");
        after
            .spec
            .and_then(|s| s.image_pull_secrets)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    fn of(c: &ClusterRegistryCredential) -> Candidate {
        Candidate::of(c).expect("candidate")
    }

    #[test]
    fn appends_after_the_pods_own_entries_or_adds_an_untyped_list() {
        let c = [of(&cluster("ghcr", json!({})))];
        let web = ns("web", &[]);
        assert_eq!(
            admitted(&pod(None, Some(&["theirs"])), &web, &c),
            vec!["theirs", "pullkeeper-ghcr"]
        );
        assert_eq!(admitted(&pod(None, None), &web, &c), vec!["pullkeeper-ghcr"]);
        assert_eq!(admitted(&pod(None, Some(&[])), &web, &c), vec!["pullkeeper-ghcr"]);
        let ops = operations(&pod(None, None), &["a".to_owned()]);
        assert_eq!(
            ops,
            vec![json!({"op": "add", "path": "/spec/imagePullSecrets", "value": [{"name": "a"}]})]
        );
        let ops = operations(&pod(None, Some(&["x"])), &["a".to_owned()]);
        assert_eq!(ops[0]["path"], "/spec/imagePullSecrets/-");
    }

    #[test]
    fn never_duplicates_and_patches_nothing_when_present() {
        let c = [of(&cluster("ghcr", json!({}))), of(&cluster("ghcr", json!({})))];
        let web = ns("web", &[]);
        let p = pod(None, Some(&["pullkeeper-ghcr", "theirs"]));
        assert!(missing(&p, &web, &c).is_empty());
        assert!(operations(&p, &[]).is_empty());
        assert_eq!(admitted(&pod(None, None), &web, &c), vec!["pullkeeper-ghcr"]);
    }

    #[test]
    fn only_targeted_service_accounts() {
        let both = [of(&cluster(
            "ghcr",
            json!({"target": {"serviceAccounts": ["default", "builder"]}}),
        ))];
        let web = ns("web", &[]);
        assert_eq!(
            admitted(&pod(Some("builder"), None), &web, &both),
            vec!["pullkeeper-ghcr"]
        );
        assert_eq!(admitted(&pod(Some(""), None), &web, &both), vec!["pullkeeper-ghcr"]);
        assert!(admitted(&pod(Some("runner"), None), &web, &both).is_empty());
        let default_only = [of(&cluster("ghcr", json!({})))];
        assert!(admitted(&pod(Some("builder"), None), &web, &default_only).is_empty());
        let none = [of(&cluster("ghcr", json!({"target": {"serviceAccounts": []}})))];
        assert!(admitted(&pod(None, None), &web, &none).is_empty(), "[] patches none");
    }

    #[test]
    fn the_reconcilers_targeting_applies() {
        let c = [of(&cluster(
            "ghcr",
            json!({"target": {
                "namespaceSelector": {"matchLabels": {"team": "payments"}},
                "excludeNamespaces": ["ops"],
                "secretName": "regcred",
            }}),
        ))];
        let p = pod(None, None);
        assert_eq!(admitted(&p, &ns("web", &[("team", "payments")]), &c), vec!["regcred"]);
        assert!(admitted(&p, &ns("web", &[]), &c).is_empty(), "outside the selector");
        assert!(
            admitted(&p, &ns("ops", &[("team", "payments")]), &c).is_empty(),
            "excluded"
        );
        let mut opted_out = ns("api", &[("team", "payments")]);
        opted_out.annotations.insert(EXCLUDE_ANNOTATION.into(), "true".into());
        assert!(admitted(&p, &opted_out, &c).is_empty(), "pullkeeper.io/exclude");
    }

    #[test]
    fn a_namespaced_credential_supplies_its_own_namespace() {
        let r: RegistryCredential = serde_json::from_value(json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "registry", "namespace": "team-a"},
            "spec": {"registry": "ghcr.io", "provider": {"basic": {"secretRef": {"name": "s"}}}},
        }))
        .expect("credential");
        let c = [Candidate::of(&r).expect("candidate")];
        assert_eq!(
            admitted(&pod(None, None), &ns("team-a", &[]), &c),
            vec!["pullkeeper-registry"]
        );
        assert!(admitted(&pod(None, None), &ns("team-b", &[]), &c).is_empty());
    }

    #[test]
    fn suspended_deleted_and_invalid_credentials_supply_nothing() {
        assert!(Candidate::of(&cluster("ghcr", json!({"suspend": true}))).is_none());
        let mut deleting = cluster("ghcr", json!({}));
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(Candidate::of(&deleting).is_none());
        let invalid = cluster(
            "ghcr",
            json!({"target": {"namespaces": ["a"], "excludeNamespaces": ["a"]}}),
        );
        assert!(Candidate::of(&invalid).is_none());
    }

    #[test]
    fn several_credentials_are_added_in_a_stable_order() {
        let c = [of(&cluster("zeta", json!({}))), of(&cluster("alpha", json!({})))];
        assert_eq!(
            admitted(&pod(None, Some(&["x"])), &ns("web", &[]), &c),
            vec!["x", "pullkeeper-alpha", "pullkeeper-zeta"]
        );
    }
}
