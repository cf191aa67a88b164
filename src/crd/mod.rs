//! The `pullkeeper.io/v1alpha1` API: `ClusterRegistryCredential` and `RegistryCredential`.
//!
//! The field names are a contract (see the design notes in the repository); the Rust
//! types here are the single source of the CRDs in `crds/`.

pub mod conditions;
mod spec;
mod status;

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use spec::*;
pub use status::*;

/// API group of every pullkeeper kind.
pub const GROUP: &str = "pullkeeper.io";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

/// A registry credential managed for the whole cluster: pullkeeper writes the pull secret
/// into every namespace selected by `target`, and may read source Secrets in any namespace
/// named by a `secretRef`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pullkeeper.io",
    version = "v1alpha1",
    kind = "ClusterRegistryCredential",
    doc = "ClusterRegistryCredential keeps an image pull secret for one registry fresh in every namespace its target selects.",
    plural = "clusterregistrycredentials",
    shortname = "crc",
    shortname = "clusterregcred",
    category = "pullkeeper",
    status = "RegistryCredentialStatus",
    printcolumn = r#"{"name":"Registry","type":"string","jsonPath":".spec.registry"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.namespaces.synced"}"#,
    printcolumn = r#"{"name":"Unpullable","type":"integer","jsonPath":".status.workloads.unpullable","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRegistryCredentialSpec {
    /// Registry host the credential is for, as `host[:port]` without a scheme or path,
    /// e.g. `123456789012.dkr.ecr.us-east-1.amazonaws.com` or `registry.example.com:5000`.
    /// `docker.io` is written under Docker Hub's key `https://index.docker.io/v1/`.
    #[schemars(length(min = 1, max = 253), regex(pattern = REGISTRY_PATTERN))]
    pub registry: String,

    /// Where the credential comes from. Exactly one source must be set.
    pub provider: Provider<ClusterSecretRef, ClusterSecretKeyRef, ClusterServiceAccountRef>,

    /// When the credential is renewed or re-read.
    #[serde(default, skip_serializing_if = "RefreshSpec::is_empty")]
    pub refresh: RefreshSpec,

    /// Which namespaces receive the pull secret, under which name, and which
    /// ServiceAccounts get it in their `imagePullSecrets`.
    #[serde(default, skip_serializing_if = "ClusterTarget::is_empty")]
    pub target: ClusterTarget,

    /// Images whose manifests are resolved with the credential to prove they can be pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,

    /// TLS settings for talking to the registry (private CA, or no verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// When true, pullkeeper keeps everything it has written as it is and changes nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// A registry credential owned by one namespace's team: pullkeeper writes the pull secret
/// into this namespace only, and reads source Secrets from this namespace only.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pullkeeper.io",
    version = "v1alpha1",
    kind = "RegistryCredential",
    doc = "RegistryCredential keeps an image pull secret for one registry fresh in its own namespace.",
    plural = "registrycredentials",
    namespaced,
    shortname = "regcred",
    category = "pullkeeper",
    status = "RegistryCredentialStatus",
    printcolumn = r#"{"name":"Registry","type":"string","jsonPath":".spec.registry"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.namespaces.synced"}"#,
    printcolumn = r#"{"name":"Unpullable","type":"integer","jsonPath":".status.workloads.unpullable","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.provider.ecr) || !has(self.provider.ecr.endpoint)",
     "fieldPath": ".provider.ecr.endpoint", "reason": "FieldValueForbidden",
     "message": "spec.provider.ecr.endpoint is not allowed on a RegistryCredential: credentials go only to AWS's own endpoints (administrators set AWS_ENDPOINT_URL on the operator, or use a ClusterRegistryCredential)"},
    {"rule": "!has(self.provider.gcp) || !has(self.provider.gcp.tokenUrl)",
     "fieldPath": ".provider.gcp.tokenUrl", "reason": "FieldValueForbidden",
     "message": "spec.provider.gcp.tokenUrl is not allowed on a RegistryCredential: credentials go only to Google's own endpoints (or use a ClusterRegistryCredential)"},
    {"rule": "!has(self.provider.gcp) || !has(self.provider.gcp.metadataUrl)",
     "fieldPath": ".provider.gcp.metadataUrl", "reason": "FieldValueForbidden",
     "message": "spec.provider.gcp.metadataUrl is not allowed on a RegistryCredential: credentials go only to Google's own endpoints (or use a ClusterRegistryCredential)"},
    {"rule": "!has(self.provider.acr) || !has(self.provider.acr.authorityHost)",
     "fieldPath": ".provider.acr.authorityHost", "reason": "FieldValueForbidden",
     "message": "spec.provider.acr.authorityHost is not allowed on a RegistryCredential: credentials go only to Entra ID (administrators set AZURE_AUTHORITY_HOST on the operator, or use a ClusterRegistryCredential)"},
    {"rule": "!has(self.provider.acr) || !has(self.provider.acr.exchangeUrl)",
     "fieldPath": ".provider.acr.exchangeUrl", "reason": "FieldValueForbidden",
     "message": "spec.provider.acr.exchangeUrl is not allowed on a RegistryCredential: the ACR token exchange goes to spec.registry (or use a ClusterRegistryCredential)"},
    {"rule": "!has(self.provider.ecr) || !has(self.provider.ecr.roleArn) || has(self.provider.ecr.serviceAccountRef) || has(self.provider.ecr.credentialsSecretRef)",
     "fieldPath": ".provider.ecr.roleArn", "reason": "FieldValueForbidden",
     "message": "spec.provider.ecr.roleArn on a RegistryCredential needs serviceAccountRef or credentialsSecretRef: it is never assumed with the operator's own identity"},
]))]
pub struct RegistryCredentialSpec {
    /// Registry host the credential is for, as `host[:port]` without a scheme or path,
    /// e.g. `ghcr.io` or `registry.example.com:5000`.
    /// `docker.io` is written under Docker Hub's key `https://index.docker.io/v1/`.
    #[schemars(length(min = 1, max = 253), regex(pattern = REGISTRY_PATTERN))]
    pub registry: String,

    /// Where the credential comes from. Exactly one source must be set. Secrets are read
    /// from this resource's own namespace.
    pub provider: Provider<LocalSecretRef, LocalSecretKeyRef, LocalServiceAccountRef>,

    /// When the credential is renewed or re-read.
    #[serde(default, skip_serializing_if = "RefreshSpec::is_empty")]
    pub refresh: RefreshSpec,

    /// The pull secret's name and which ServiceAccounts of this namespace get it in
    /// their `imagePullSecrets`.
    #[serde(default, skip_serializing_if = "LocalTarget::is_empty")]
    pub target: LocalTarget,

    /// Images whose manifests are resolved with the credential to prove they can be pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,

    /// TLS settings for talking to the registry (private CA, or no verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// When true, pullkeeper keeps everything it has written as it is and changes nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// Every CRD pullkeeper serves, in a stable order.
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    vec![ClusterRegistryCredential::crd(), RegistryCredential::crd()]
}

/// All CRDs as one multi-document YAML stream, exactly as committed under `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    yaml_stream(crds())
}

/// Objects as one multi-document YAML stream, each document starting with `---`.
pub fn yaml_stream<T: Serialize>(objects: impl IntoIterator<Item = T>) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&o)?);
    }
    Ok(out)
}

/// File name under `crds/` for each CRD.
pub fn crd_file_name(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}
