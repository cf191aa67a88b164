//! Spec types shared by both kinds. Secret references are generic so that the namespaced
//! kind cannot even express a reference into another namespace.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `host[:port]`: a DNS name or IPv4 address, or a bracketed IPv6 address, optional port.
/// No scheme, no path.
pub const REGISTRY_PATTERN: &str = r"^(([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?))*|\[[0-9a-fA-F:.]+\])(:[0-9]{1,5})?$";
/// A Go-style duration of hours, minutes, seconds and milliseconds: `90s`, `30m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// An RFC 1123 DNS label (namespace names).
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// An RFC 1123 DNS subdomain (Secret and ServiceAccount names).
pub const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Secret data key.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// `os/arch[/variant]`, e.g. `linux/amd64`, `linux/arm64/v8`.
pub const PLATFORM_PATTERN: &str = r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$";

/// Reference to a Secret in any namespace (cluster-scoped resources only).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ClusterSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the Secret.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: String,
}

/// Reference to a Secret in the resource's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalSecretRef {
    /// Name of the Secret, in the same namespace as this resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// Reference to one key of a Secret in any namespace (cluster-scoped resources only).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ClusterSecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the Secret.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// Reference to one key of a Secret in the resource's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalSecretKeyRef {
    /// Name of the Secret, in the same namespace as this resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// Reference to a ServiceAccount in any namespace (cluster-scoped resources only).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ClusterServiceAccountRef {
    /// Name of the ServiceAccount.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the ServiceAccount.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: String,
}

/// Reference to a ServiceAccount in the resource's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalServiceAccountRef {
    /// Name of the ServiceAccount, in the same namespace as this resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// The credential source. Exactly one variant is set. `R` is a Secret reference, `K` a
/// Secret key reference and `S` a ServiceAccount reference: namespaced or not per kind.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Provider<R, K, S> {
    /// A static username and password or token from a Secret: a GitHub PAT, a Docker Hub
    /// access token, a Harbor robot account, a GitLab deploy token, any self-hosted registry.
    Basic(BasicProvider<R>),
    /// Replicate the entry for `registry` from an existing `kubernetes.io/dockerconfigjson` Secret.
    DockerConfig(DockerConfigProvider<R>),
    /// AWS Elastic Container Registry: 12-hour tokens from `GetAuthorizationToken`.
    Ecr(EcrProvider<R, S>),
    /// Google Artifact Registry / Container Registry: OAuth2 access tokens (about 1 hour).
    Gcp(GcpProvider<K, S>),
    /// Azure Container Registry: an Entra ID token exchanged for an ACR refresh token.
    Acr(AcrProvider<K, S>),
}

impl<R, K, S> Provider<R, K, S> {
    /// True for sources that mint a new token on every call (the cloud providers), as
    /// opposed to reading a stored credential.
    pub fn mints(&self) -> bool {
        matches!(self, Provider::Ecr(_) | Provider::Gcp(_) | Provider::Acr(_))
    }

    /// True when the source would use the operator's own cloud identity (AWS default
    /// chain, GKE metadata server, Azure workload identity): a cloud source with neither a
    /// credentials Secret nor a `serviceAccountRef`.
    pub fn uses_ambient_identity(&self) -> bool {
        match self {
            Provider::Basic(_) | Provider::DockerConfig(_) => false,
            Provider::Ecr(e) => e.credentials_secret_ref.is_none() && e.service_account_ref.is_none(),
            Provider::Gcp(g) => g.service_account_key_secret_ref.is_none() && g.service_account_ref.is_none(),
            Provider::Acr(a) => a.client_secret_ref.is_none() && a.service_account_ref.is_none(),
        }
    }

    /// The spec fields that are set and redirect where credentials are sent (endpoint
    /// overrides), as `spec.provider.<kind>.<field>` paths.
    pub fn endpoint_overrides(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        let mut check = |present: bool, field: &'static str| {
            if present {
                set.push(field);
            }
        };
        match self {
            Provider::Basic(_) | Provider::DockerConfig(_) => {}
            Provider::Ecr(e) => check(e.endpoint.is_some(), "spec.provider.ecr.endpoint"),
            Provider::Gcp(g) => {
                check(g.token_url.is_some(), "spec.provider.gcp.tokenUrl");
                check(g.metadata_url.is_some(), "spec.provider.gcp.metadataUrl");
            }
            Provider::Acr(a) => {
                check(a.authority_host.is_some(), "spec.provider.acr.authorityHost");
                check(a.exchange_url.is_some(), "spec.provider.acr.exchangeUrl");
            }
        }
        set
    }

    /// The spec field name of the chosen source, for messages and metric labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Provider::Basic(_) => "basic",
            Provider::DockerConfig(_) => "dockerConfig",
            Provider::Ecr(_) => "ecr",
            Provider::Gcp(_) => "gcp",
            Provider::Acr(_) => "acr",
        }
    }
}

/// A Secret a provider reads, with the spec field that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSecret<'a> {
    /// The spec field holding its namespace (`spec.provider.<kind>.<ref>.namespace`).
    pub field: &'static str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
}

impl<S> Provider<ClusterSecretRef, ClusterSecretKeyRef, S> {
    /// Every Secret the source reads (resolved to namespaces).
    pub fn source_secrets(&self) -> Vec<SourceSecret<'_>> {
        fn one<'a>(field: &'static str, namespace: &'a str, name: &'a str) -> SourceSecret<'a> {
            SourceSecret { field, namespace, name }
        }
        match self {
            Provider::Basic(b) => vec![one(
                "spec.provider.basic.secretRef.namespace",
                &b.secret_ref.namespace,
                &b.secret_ref.name,
            )],
            Provider::DockerConfig(d) => vec![one(
                "spec.provider.dockerConfig.secretRef.namespace",
                &d.secret_ref.namespace,
                &d.secret_ref.name,
            )],
            Provider::Ecr(e) => e
                .credentials_secret_ref
                .iter()
                .map(|r| {
                    one(
                        "spec.provider.ecr.credentialsSecretRef.namespace",
                        &r.namespace,
                        &r.name,
                    )
                })
                .collect(),
            Provider::Gcp(g) => g
                .service_account_key_secret_ref
                .iter()
                .map(|r| {
                    one(
                        "spec.provider.gcp.serviceAccountKeySecretRef.namespace",
                        &r.namespace,
                        &r.name,
                    )
                })
                .collect(),
            Provider::Acr(a) => a
                .client_secret_ref
                .iter()
                .map(|r| one("spec.provider.acr.clientSecretRef.namespace", &r.namespace, &r.name))
                .collect(),
        }
    }
}

impl<R, K, S> Provider<R, K, S> {
    /// Rewrites every Secret and ServiceAccount reference, e.g. to resolve local references
    /// to a namespace.
    pub fn map_refs<R2, K2, S2>(
        self,
        r: impl Fn(R) -> R2,
        k: impl Fn(K) -> K2,
        sa: impl Fn(S) -> S2,
    ) -> Provider<R2, K2, S2> {
        use crate::crd::{AcrProvider, BasicProvider, DockerConfigProvider, EcrProvider, GcpProvider};
        match self {
            Provider::Basic(b) => Provider::Basic(BasicProvider {
                secret_ref: r(b.secret_ref),
                username_key: b.username_key,
                password_key: b.password_key,
            }),
            Provider::DockerConfig(d) => Provider::DockerConfig(DockerConfigProvider {
                secret_ref: r(d.secret_ref),
            }),
            Provider::Ecr(e) => Provider::Ecr(EcrProvider {
                region: e.region,
                role_arn: e.role_arn,
                external_id: e.external_id,
                credentials_secret_ref: e.credentials_secret_ref.map(r),
                service_account_ref: e.service_account_ref.map(&sa),
                endpoint: e.endpoint,
            }),
            Provider::Gcp(g) => Provider::Gcp(GcpProvider {
                service_account_key_secret_ref: g.service_account_key_secret_ref.map(&k),
                service_account_ref: g.service_account_ref.map(&sa),
                workload_identity_provider: g.workload_identity_provider,
                service_account_email: g.service_account_email,
                token_url: g.token_url,
                metadata_url: g.metadata_url,
            }),
            Provider::Acr(a) => Provider::Acr(AcrProvider {
                tenant_id: a.tenant_id,
                client_id: a.client_id,
                client_secret_ref: a.client_secret_ref.map(&k),
                service_account_ref: a.service_account_ref.map(&sa),
                authority_host: a.authority_host,
                exchange_url: a.exchange_url,
            }),
        }
    }
}

fn default_username_key() -> String {
    "username".to_owned()
}
fn default_password_key() -> String {
    "password".to_owned()
}

/// Static basic-auth credential read from a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicProvider<R> {
    /// The Secret holding the username and the password or token.
    pub secret_ref: R,
    /// Key of the username in the Secret's data.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub username_key: String,
    /// Key of the password or token in the Secret's data.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub password_key: String,
}

/// An existing `kubernetes.io/dockerconfigjson` Secret to replicate.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DockerConfigProvider<R> {
    /// The `kubernetes.io/dockerconfigjson` Secret holding an entry for `registry`.
    pub secret_ref: R,
}

/// AWS ECR authorization tokens.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(
    rename_all = "camelCase",
    bound(deserialize = "R: Deserialize<'de>, S: Deserialize<'de>")
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.serviceAccountRef) || has(self.roleArn)",
     "message": "serviceAccountRef needs roleArn: the role the ServiceAccount's token is exchanged for"},
    {"rule": "!(has(self.serviceAccountRef) && has(self.credentialsSecretRef))",
     "message": "set serviceAccountRef or credentialsSecretRef, not both"},
    {"rule": "!(has(self.serviceAccountRef) && has(self.externalId))",
     "message": "externalId does not apply to serviceAccountRef: AssumeRoleWithWebIdentity takes none"},
]))]
pub struct EcrProvider<R, S> {
    /// AWS region of the registry. Default: parsed from the registry host
    /// (`<account>.dkr.ecr.<region>.amazonaws.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// IAM role to assume before asking for the token, for cross-account pulls. With
    /// `serviceAccountRef` it is the role the ServiceAccount's token is exchanged for
    /// (`AssumeRoleWithWebIdentity`). On a `RegistryCredential` it needs
    /// `serviceAccountRef` or `credentialsSecretRef`: it is never assumed with the
    /// operator's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^arn:aws[a-zA-Z-]*:iam::[0-9]{12}:role/.+$"))]
    pub role_arn: Option<String>,
    /// External ID to present when assuming `roleArn` (not with `serviceAccountRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Secret with static AWS keys `access-key-id`, `secret-access-key` and optionally
    /// `session-token`. Without it and without `serviceAccountRef`: the operator's own
    /// identity, the default AWS chain (IRSA, EKS Pod Identity, environment); a
    /// `RegistryCredential` may use that only if the operator runs with
    /// `--namespaced-ambient-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<R>,
    /// ServiceAccount whose token (audience `sts.amazonaws.com`) is exchanged for
    /// `roleArn` with `AssumeRoleWithWebIdentity`, as IRSA does for pods. The role's trust
    /// policy names the cluster's OIDC issuer and `system:serviceaccount:<namespace>:<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<S>,
    /// ECR API endpoint override (a VPC endpoint, or a test server). Not allowed on a
    /// `RegistryCredential`: administrators set `AWS_ENDPOINT_URL` on the operator instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+$"))]
    pub endpoint: Option<String>,
}

/// Google Cloud OAuth2 access tokens.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(
    rename_all = "camelCase",
    bound(deserialize = "K: Deserialize<'de>, S: Deserialize<'de>")
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.serviceAccountRef) || has(self.workloadIdentityProvider)",
     "message": "serviceAccountRef needs workloadIdentityProvider"},
    {"rule": "!(has(self.serviceAccountRef) && has(self.serviceAccountKeySecretRef))",
     "message": "set serviceAccountRef or serviceAccountKeySecretRef, not both"},
    {"rule": "has(self.serviceAccountRef) || (!has(self.workloadIdentityProvider) && !has(self.serviceAccountEmail))",
     "message": "workloadIdentityProvider and serviceAccountEmail need serviceAccountRef"},
]))]
pub struct GcpProvider<K, S> {
    /// Secret key holding a service-account JSON key. Without it and without
    /// `serviceAccountRef`: the operator's own identity from the GKE metadata server
    /// (Workload Identity); a `RegistryCredential` may use that only if the operator runs
    /// with `--namespaced-ambient-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key_secret_ref: Option<K>,
    /// ServiceAccount whose token is exchanged at Google's Security Token Service through
    /// `workloadIdentityProvider` (workload identity federation), with the audience
    /// `//iam.googleapis.com/<workloadIdentityProvider>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<S>,
    /// Workload identity pool provider that trusts the cluster's ServiceAccount tokens:
    /// `projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^projects/[0-9]+/locations/global/workloadIdentityPools/[a-z0-9-]+/providers/[a-z0-9-]+$"
    ))]
    pub workload_identity_provider: Option<String>,
    /// Google service account to impersonate with the federated token
    /// (`iamcredentials` `generateAccessToken`). Absent: the federated identity's own token
    /// is used (grant the principal access to the repository directly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^@/]+@[a-z0-9.-]+$"))]
    pub service_account_email: Option<String>,
    /// OAuth2 token endpoint override (default: the key's `token_uri`). For tests and
    /// private endpoints. Not allowed on a `RegistryCredential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+$"))]
    pub token_url: Option<String>,
    /// Metadata server override (default `http://metadata.google.internal`). For tests.
    /// Not allowed on a `RegistryCredential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+$"))]
    pub metadata_url: Option<String>,
}

/// Azure Container Registry refresh tokens.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(
    rename_all = "camelCase",
    bound(deserialize = "K: Deserialize<'de>, S: Deserialize<'de>")
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.serviceAccountRef) || (has(self.tenantId) && has(self.clientId))",
     "message": "serviceAccountRef needs tenantId and clientId: the app registration or managed identity that trusts the ServiceAccount"},
    {"rule": "!(has(self.serviceAccountRef) && has(self.clientSecretRef))",
     "message": "set serviceAccountRef or clientSecretRef, not both"},
]))]
pub struct AcrProvider<K, S> {
    /// Entra ID (Azure AD) tenant ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Client (application) ID of the service principal or managed identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Secret key holding the client secret. Without it and without `serviceAccountRef`:
    /// the operator's own workload identity (`AZURE_FEDERATED_TOKEN_FILE`); a
    /// `RegistryCredential` may use that only if the operator runs with
    /// `--namespaced-ambient-credentials`, and only for an ACR registry host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<K>,
    /// ServiceAccount whose token (audience `api://AzureADTokenExchange`) is the client
    /// assertion for `clientId` in `tenantId`: a federated identity credential on the app
    /// registration or managed identity names the cluster's OIDC issuer and
    /// `system:serviceaccount:<namespace>:<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<S>,
    /// Entra ID authority host (default `https://login.microsoftonline.com`; sovereign
    /// clouds differ). Defaults to `AZURE_AUTHORITY_HOST` when set. Not allowed on a
    /// `RegistryCredential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+$"))]
    pub authority_host: Option<String>,
    /// Token exchange endpoint override (default `https://<registry>/oauth2/exchange`). For
    /// tests. Not allowed on a `RegistryCredential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+$"))]
    pub exchange_url: Option<String>,
}

/// Refresh timing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshSpec {
    /// Renew this long before the credential expires, e.g. `30m`.
    /// Default: a quarter of the credential's lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub renew_before: Option<String>,
    /// How often to re-read a credential that has no expiry, e.g. `1h`. Default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,
}

impl RefreshSpec {
    /// True when nothing is set (so it is left out when serialised).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Targets of a cluster-scoped credential.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTarget {
    /// Name of the pull secret written in each namespace. Default `pullkeeper-<metadata.name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,
    /// Only namespaces whose labels match. Default: all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Only these namespaces (an allow-list), in addition to the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    pub namespaces: Option<Vec<String>>,
    /// Never these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    pub exclude_namespaces: Vec<String>,
    /// ServiceAccounts in each targeted namespace whose `imagePullSecrets` get the
    /// secret. Default `[default]`; `[]` patches none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    pub service_accounts: Option<Vec<String>>,
}

impl ClusterTarget {
    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Target of a namespaced credential: always its own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalTarget {
    /// Name of the pull secret. Default `pullkeeper-<metadata.name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,
    /// ServiceAccounts of this namespace whose `imagePullSecrets` get the secret.
    /// Default `[default]`; `[]` patches none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    pub service_accounts: Option<Vec<String>>,
}

impl LocalTarget {
    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Pullability checks.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// Image references resolved with the credential, by tag or digest,
    /// e.g. `registry.example.com/team/api:v2.1.0`.
    #[serde(default)]
    #[schemars(inner(length(min = 1, max = 1024)))]
    pub images: Vec<String>,
    /// Platforms that must be present in each image index, e.g. `linux/amd64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PLATFORM_PATTERN)))]
    pub platforms: Vec<String>,
    /// How often to re-check, e.g. `30m`. Default `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,
}

/// TLS settings for the registry.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// PEM bundle of CA certificates to trust, for registries with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Skip TLS certificate verification. Only for testing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}
