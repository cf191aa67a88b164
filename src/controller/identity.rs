//! One identity for a credential object: the key of every per-credential map (issued
//! credentials, pullability results, backoffs, source-Secret referrers) and what a
//! managed Secret says about who wrote it.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;

use crate::crd::{ClusterRegistryCredential, RegistryCredential};

/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "pullkeeper";
/// Name of the credential that wrote the Secret.
pub const CREDENTIAL_LABEL: &str = "pullkeeper.io/credential";
/// `cluster` for a ClusterRegistryCredential, `namespace` for a RegistryCredential.
pub const SCOPE_LABEL: &str = "pullkeeper.io/scope";
/// Full name of the credential that wrote the Secret (the label may be a shortened form).
pub const CREDENTIAL_ANNOTATION: &str = "pullkeeper.io/credential";
/// Label value of [`SCOPE_LABEL`] for ClusterRegistryCredentials.
pub const SCOPE_CLUSTER: &str = "cluster";
/// Label value of [`SCOPE_LABEL`] for RegistryCredentials.
pub const SCOPE_NAMESPACE: &str = "namespace";

/// A `ClusterRegistryCredential` (no namespace) or a `RegistryCredential` (in `namespace`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialRef {
    /// The namespace of a `RegistryCredential`; `None` for the cluster kind.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl CredentialRef {
    /// A `ClusterRegistryCredential`.
    pub fn cluster(name: impl Into<String>) -> Self {
        Self {
            namespace: None,
            name: name.into(),
        }
    }

    /// A `RegistryCredential`.
    pub fn namespaced(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self.namespace {
            None => "ClusterRegistryCredential",
            Some(_) => "RegistryCredential",
        }
    }

    /// `namespace/name` or `name`.
    pub fn key(&self) -> String {
        match &self.namespace {
            None => self.name.clone(),
            Some(ns) => format!("{ns}/{}", self.name),
        }
    }

    /// The value of [`SCOPE_LABEL`] on the Secrets it writes.
    pub fn scope_label(&self) -> &'static str {
        match self.namespace {
            None => SCOPE_CLUSTER,
            Some(_) => SCOPE_NAMESPACE,
        }
    }

    /// Who wrote a pullkeeper-managed Secret, from its labels (and, since a label holds a
    /// shortened form of long names, the full name in its annotation). `None` for a Secret
    /// pullkeeper did not write.
    pub fn holder_of(meta: &ObjectMeta) -> Option<Self> {
        Stamp::of(meta)?.holder(meta.namespace.as_deref()?)
    }

    /// The reconcile request for a `ClusterRegistryCredential`, if this is one.
    pub fn as_cluster(&self) -> Option<ObjectRef<DeserializeGuard<ClusterRegistryCredential>>> {
        self.namespace.is_none().then(|| ObjectRef::new(&self.name))
    }

    /// The reconcile request for a `RegistryCredential`, if this is one.
    pub fn as_namespaced(&self) -> Option<ObjectRef<DeserializeGuard<RegistryCredential>>> {
        self.namespace
            .as_deref()
            .map(|ns| ObjectRef::new(&self.name).within(ns))
    }
}

/// What pullkeeper stamps on a Secret it writes to say who wrote it: the credential's name
/// as a label value (shortened when long), its scope, and its full name. Few distinct
/// stamps exist (one per credential), so the index shares one copy between all Secrets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The [`CREDENTIAL_LABEL`] value.
    pub label: Box<str>,
    /// [`SCOPE_CLUSTER`] or [`SCOPE_NAMESPACE`].
    pub scope: &'static str,
    /// The [`CREDENTIAL_ANNOTATION`] value, if any.
    pub full_name: Option<Box<str>>,
}

impl Stamp {
    /// The stamp of a Secret labelled as pullkeeper's, with a credential label and a known
    /// scope; `None` for any other.
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        let labels = meta.labels.as_ref()?;
        if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY_VALUE) {
            return None;
        }
        let scope = match labels.get(SCOPE_LABEL).map(String::as_str) {
            Some(SCOPE_CLUSTER) => SCOPE_CLUSTER,
            Some(SCOPE_NAMESPACE) => SCOPE_NAMESPACE,
            _ => return None,
        };
        Some(Self {
            label: labels.get(CREDENTIAL_LABEL)?.as_str().into(),
            scope,
            full_name: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(CREDENTIAL_ANNOTATION))
                .map(|n| n.as_str().into()),
        })
    }

    /// Who wrote the Secret carrying this stamp in `namespace`.
    pub fn holder(&self, namespace: &str) -> Option<CredentialRef> {
        let name = self.full_name.as_deref().unwrap_or(&self.label);
        Some(match self.scope {
            SCOPE_CLUSTER => CredentialRef::cluster(name),
            _ => CredentialRef::namespaced(namespace, name),
        })
    }
}

impl fmt::Display for CredentialRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            None => write!(f, "ClusterRegistryCredential {}", self.name),
            Some(ns) => write!(f, "RegistryCredential {ns}/{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        ObjectMeta {
            namespace: Some("web".into()),
            name: Some("regcred".into()),
            labels: map(labels),
            annotations: map(annotations),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn the_holder_of_a_managed_secret_comes_from_its_labels() {
        let managed = (MANAGED_BY_LABEL, MANAGED_BY_VALUE);
        let cluster = meta(&[managed, (CREDENTIAL_LABEL, "a"), (SCOPE_LABEL, SCOPE_CLUSTER)], &[]);
        assert_eq!(CredentialRef::holder_of(&cluster), Some(CredentialRef::cluster("a")));
        let namespaced = meta(&[managed, (CREDENTIAL_LABEL, "a"), (SCOPE_LABEL, SCOPE_NAMESPACE)], &[]);
        assert_eq!(
            CredentialRef::holder_of(&namespaced),
            Some(CredentialRef::namespaced("web", "a"))
        );
        // A shortened label: the annotation has the full name.
        let long = meta(
            &[managed, (CREDENTIAL_LABEL, "a-1234"), (SCOPE_LABEL, SCOPE_CLUSTER)],
            &[(CREDENTIAL_ANNOTATION, "a-very-long-name")],
        );
        assert_eq!(
            CredentialRef::holder_of(&long),
            Some(CredentialRef::cluster("a-very-long-name"))
        );
        // Not ours, or an unknown scope.
        assert_eq!(CredentialRef::holder_of(&meta(&[(CREDENTIAL_LABEL, "a")], &[])), None);
        let odd = meta(&[managed, (CREDENTIAL_LABEL, "a"), (SCOPE_LABEL, "galaxy")], &[]);
        assert_eq!(CredentialRef::holder_of(&odd), None);
    }

    #[test]
    fn a_reference_names_its_kind_and_routes_to_its_controller() {
        let c = CredentialRef::cluster("a");
        assert_eq!(c.to_string(), "ClusterRegistryCredential a");
        assert_eq!(c.scope_label(), SCOPE_CLUSTER);
        assert!(c.as_cluster().is_some() && c.as_namespaced().is_none());
        let n = CredentialRef::namespaced("web", "a");
        assert_eq!(n.to_string(), "RegistryCredential web/a");
        assert_eq!(n.kind(), "RegistryCredential");
        assert_eq!(n.as_namespaced().and_then(|r| r.namespace), Some("web".to_owned()));
        assert!(n.as_cluster().is_none());
    }
}
