//! Pure step: which namespaces a credential targets.

use std::collections::BTreeMap;

use kube::core::SelectorExt;

use super::validate::Scope;

/// Annotation that opts a namespace out of every ClusterRegistryCredential.
pub const EXCLUDE_ANNOTATION: &str = "pullkeeper.io/exclude";

/// What targeting needs to know about a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Deletion has started.
    pub terminating: bool,
}

impl NamespaceInfo {
    /// From a namespace's metadata.
    pub fn from_meta(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            terminating: meta.deletion_timestamp.is_some(),
        }
    }
}

/// Whether `ns` is targeted: not terminating, in the allow-list (if any), matching the
/// selector (if any), not excluded by name or by the `pullkeeper.io/exclude: "true"`
/// annotation. The namespaced kind targets exactly its own namespace.
pub fn is_targeted(scope: &Scope, ns: &NamespaceInfo) -> bool {
    if ns.terminating {
        return false;
    }
    match scope {
        Scope::Namespace(own) => *own == ns.name,
        Scope::Cluster {
            selector,
            namespaces,
            exclude,
        } => {
            namespaces.as_ref().is_none_or(|allowed| allowed.contains(&ns.name))
                && selector.as_ref().is_none_or(|s| s.matches(&ns.labels))
                && !exclude.contains(&ns.name)
                && ns.annotations.get(EXCLUDE_ANNOTATION).map(String::as_str) != Some("true")
        }
    }
}

/// The targeted namespace names, sorted.
pub fn targeted<'a>(scope: &Scope, namespaces: impl IntoIterator<Item = &'a NamespaceInfo>) -> Vec<String> {
    let mut out: Vec<String> = namespaces
        .into_iter()
        .filter(|ns| is_targeted(scope, ns))
        .map(|ns| ns.name.clone())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use kube::core::Selector;

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..Default::default()
        }
    }

    fn cluster(namespaces: Option<&[&str]>, exclude: &[&str]) -> Scope {
        cluster_with(None, namespaces, exclude)
    }

    fn cluster_with(selector: Option<Selector>, namespaces: Option<&[&str]>, exclude: &[&str]) -> Scope {
        Scope::Cluster {
            selector,
            namespaces: namespaces.map(|n| n.iter().map(|s| (*s).to_owned()).collect()),
            exclude: exclude.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn default_targets_every_live_namespace() {
        let scope = cluster(None, &[]);
        let mut dying = ns("dying", &[]);
        dying.terminating = true;
        let all = [ns("a", &[]), ns("b", &[]), dying];
        assert_eq!(targeted(&scope, &all), vec!["a", "b"]);
    }

    #[test]
    fn allow_list_selector_exclusions_and_annotation_all_apply() {
        let selector: Selector = LabelSelector {
            match_labels: Some([("team".to_owned(), "payments".to_owned())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["legacy".into()]),
            }]),
        }
        .try_into()
        .expect("valid selector");
        let scope = cluster_with(Some(selector), Some(&["web", "api", "batch", "ops"]), &["ops"]);
        let mut opted_out = ns("batch", &[("team", "payments")]);
        opted_out.annotations.insert(EXCLUDE_ANNOTATION.into(), "true".into());
        let all = [
            ns("web", &[("team", "payments")]),
            ns("api", &[("team", "payments"), ("tier", "legacy")]),
            opted_out,
            ns("ops", &[("team", "payments")]),
            ns("other", &[("team", "payments")]),
            ns("unlabelled", &[]),
        ];
        assert_eq!(targeted(&scope, &all), vec!["web"]);
    }

    #[test]
    fn namespaced_kind_targets_only_its_namespace() {
        let scope = Scope::Namespace("team-a".into());
        let all = [ns("team-a", &[]), ns("team-b", &[])];
        assert_eq!(targeted(&scope, &all), vec!["team-a"]);
        // The exclude annotation is for cluster-wide credentials; a team's own credential still applies.
        let mut own = ns("team-a", &[]);
        own.annotations.insert(EXCLUDE_ANNOTATION.into(), "true".into());
        assert!(is_targeted(&scope, &own));
    }
}
