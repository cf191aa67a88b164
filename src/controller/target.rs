//! Pure step: which namespaces a credential targets.

use std::collections::BTreeMap;

use super::validate::Scope;

/// Annotation that opts a namespace out of every ClusterRegistryCredential.
pub const EXCLUDE_ANNOTATION: &str = "pullkeeper.io/exclude";

/// What targeting needs to know about a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Deletion has started.
    pub terminating: bool,
}

impl NamespaceInfo {
    /// From a namespace's metadata: what targeting reads (name, labels, pullkeeper's own
    /// annotations, deletion), whatever else it carries
    /// (`kubectl.kubernetes.io/last-applied-configuration`, managed fields).
    pub fn from_meta(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        let ours = |(k, _): &(&String, &String)| k.starts_with("pullkeeper.io/");
        Self {
            name: meta.name.clone().unwrap_or_default(),
            labels: meta
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: (meta.annotations.iter().flatten())
                .filter(ours)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            terminating: meta.deletion_timestamp.is_some(),
        }
    }
}

/// A namespace's labels, compactly: sorted pairs in one allocation (a map of two labels
/// took about 540 bytes, most of them the map's empty slots; 10,000 namespaces, 5 MiB).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let at = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    /// How many labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut pairs: Vec<(Box<str>, Box<str>)> = pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        pairs.sort();
        pairs.dedup_by(|a, b| a.0 == b.0);
        Self(pairs.into_boxed_slice())
    }
}

/// What targeting reads of a namespace: a [`NamespaceInfo`], or the cached metadata itself
/// (a full pass over 10,000 namespaces copies none of them).
pub trait NamespaceLike {
    /// Name.
    fn name(&self) -> &str;
    /// A label's value.
    fn label(&self, key: &str) -> Option<&str>;
    /// An annotation's value.
    fn annotation(&self, key: &str) -> Option<&str>;
    /// Deletion has started.
    fn terminating(&self) -> bool;
}

impl NamespaceLike for NamespaceInfo {
    fn name(&self) -> &str {
        &self.name
    }
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key)
    }
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
    fn terminating(&self) -> bool {
        self.terminating
    }
}

impl NamespaceLike for k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
    fn terminating(&self) -> bool {
        self.deletion_timestamp.is_some()
    }
}

impl<K: kube::Resource> NamespaceLike for kube::core::PartialObjectMeta<K> {
    fn name(&self) -> &str {
        self.metadata.name()
    }
    fn label(&self, key: &str) -> Option<&str> {
        self.metadata.label(key)
    }
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotation(key)
    }
    fn terminating(&self) -> bool {
        self.metadata.terminating()
    }
}

/// A reference or a shared pointer to a namespace reads as the namespace.
macro_rules! forward_namespace_like {
    ($($ty:ty),+) => {$(
        impl<T: NamespaceLike> NamespaceLike for $ty {
            fn name(&self) -> &str {
                (**self).name()
            }
            fn label(&self, key: &str) -> Option<&str> {
                (**self).label(key)
            }
            fn annotation(&self, key: &str) -> Option<&str> {
                (**self).annotation(key)
            }
            fn terminating(&self) -> bool {
                (**self).terminating()
            }
        }
    )+};
}

forward_namespace_like!(&T, std::sync::Arc<T>);

/// Whether `ns` is targeted: not terminating, in the allow-list (if any), matching the
/// selector (if any), not excluded by name or by the `pullkeeper.io/exclude: "true"`
/// annotation. The namespaced kind targets exactly its own namespace.
pub fn is_targeted(scope: &Scope, ns: &impl NamespaceLike) -> bool {
    if ns.terminating() {
        return false;
    }
    let name = ns.name();
    match scope {
        Scope::Namespace(own) => own == name,
        Scope::Cluster {
            selector,
            namespaces,
            exclude,
        } => {
            namespaces
                .as_ref()
                .is_none_or(|allowed| allowed.iter().any(|a| a == name))
                && selector.as_ref().is_none_or(|s| s.matches(|key| ns.label(key)))
                && !exclude.iter().any(|e| e == name)
                && ns.annotation(EXCLUDE_ANNOTATION) != Some("true")
        }
    }
}

/// The targeted namespace names, sorted.
pub fn targeted<'a, N: NamespaceLike + 'a>(scope: &Scope, namespaces: impl IntoIterator<Item = &'a N>) -> Vec<String> {
    let mut out: Vec<String> = namespaces
        .into_iter()
        .filter(|ns| is_targeted(scope, *ns))
        .map(|ns| ns.name().to_owned())
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
            selector: selector.map(Into::into),
            namespaces: namespaces.map(|n| n.iter().map(|s| (*s).to_owned()).collect()),
            exclude: exclude.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_cached_namespace_keeps_what_targeting_reads() {
        let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("web".into()),
            uid: Some("u".into()),
            labels: Some([("team".to_owned(), "a".to_owned())].into()),
            annotations: Some(
                [
                    (EXCLUDE_ANNOTATION.to_owned(), "true".to_owned()),
                    (
                        "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                        "{...}".to_owned(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        let kept = NamespaceInfo::from_meta(&meta);
        assert_eq!(kept.annotations.len(), 1, "only pullkeeper's own annotations");
        assert_eq!(kept.labels.len(), 1);
        assert!(!is_targeted(
            &Scope::Cluster {
                selector: None,
                namespaces: None,
                exclude: vec![]
            },
            &kept
        ));
    }

    #[test]
    fn labels_are_kept_sorted_once_each_and_looked_up_by_key() {
        let labels: Labels = [("tier", "web"), ("team", "a"), ("team", "b")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(labels.len(), 2, "one value per key");
        assert_eq!(labels.get("tier"), Some("web"));
        assert!(labels.get("team").is_some());
        assert_eq!(labels.get("env"), None);
        assert!(Labels::default().is_empty());
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
