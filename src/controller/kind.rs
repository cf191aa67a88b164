//! What the reconciler needs from either kind, so one pipeline serves both.

use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{ClusterRegistryCredential, RegistryCredential, RegistryCredentialStatus};

use super::identity::CredentialRef;
use super::secret::Owner;
use super::validate::{self, SpecError, ValidSpec};

/// A pullkeeper credential kind.
pub trait CredentialKind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + Sync + 'static
{
    /// Kind name for messages and metrics.
    const KIND: &'static str;

    /// Validated spec.
    fn validate(&self) -> Result<ValidSpec, SpecError>;

    /// Current status.
    fn current_status(&self) -> Option<&RegistryCredentialStatus>;

    /// An API handle through which this object can be read and patched.
    fn api(&self, client: Client) -> Api<Self>;

    /// Identity stamped on the Secrets this object writes.
    fn owner(&self) -> Owner;

    /// Its identity: the key of every per-credential map.
    fn reference(&self) -> CredentialRef;

    /// Labels of its metric series.
    fn metric_labels(&self) -> crate::metrics::CredentialLabels {
        crate::metrics::CredentialLabels {
            kind: Self::KIND,
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
        }
    }

    /// `namespace/name` or `name`.
    fn key(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{ns}/{}", self.name_any()),
            None => self.name_any(),
        }
    }
}

impl CredentialKind for ClusterRegistryCredential {
    const KIND: &'static str = "ClusterRegistryCredential";

    fn validate(&self) -> Result<ValidSpec, SpecError> {
        validate::cluster(&self.name_any(), &self.spec)
    }

    fn current_status(&self) -> Option<&RegistryCredentialStatus> {
        self.status.as_ref()
    }

    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }

    fn owner(&self) -> Owner {
        Owner::of(&self.reference(), self.uid().unwrap_or_default())
    }

    fn reference(&self) -> CredentialRef {
        CredentialRef::cluster(self.name_any())
    }
}

impl CredentialKind for RegistryCredential {
    const KIND: &'static str = "RegistryCredential";

    fn validate(&self) -> Result<ValidSpec, SpecError> {
        validate::namespaced(&self.name_any(), &self.namespace().unwrap_or_default(), &self.spec)
    }

    fn current_status(&self) -> Option<&RegistryCredentialStatus> {
        self.status.as_ref()
    }

    fn api(&self, client: Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }

    fn owner(&self) -> Owner {
        Owner::of(&self.reference(), self.uid().unwrap_or_default())
    }

    fn reference(&self) -> CredentialRef {
        CredentialRef::namespaced(self.namespace().unwrap_or_default(), self.name_any())
    }
}
