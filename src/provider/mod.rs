//! Credential sources. Each provider is one file behind [`CredentialProvider`], chosen by
//! [`from_spec`]. A provider is asked once per refresh, whatever the number of namespaces.

pub mod acr;
mod basic;
mod docker_config;
pub mod ecr;
pub mod federation;
pub mod gcp;
mod oauth;
mod source;

pub use docker_config::{DOCKER_CONFIG_JSON_KEY, DOCKER_CONFIG_JSON_TYPE, EntryError, entry_for};
pub use source::{Found, Read, Reads};

use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use secrecy::SecretString;

use kube::Client;

use crate::crd::conditions::reasons;
use crate::crd::{ClusterSecretKeyRef, ClusterSecretRef, ClusterServiceAccountRef, Provider};
use crate::registry::RegistryHost;

/// A provider spec with every Secret and ServiceAccount reference resolved to a namespace.
pub type ProviderSpec = Provider<ClusterSecretRef, ClusterSecretKeyRef, ClusterServiceAccountRef>;

/// Cloud endpoints chosen by the administrator (operator flags), never by a spec of the
/// namespaced kind. AWS endpoints come from the SDK's own `AWS_ENDPOINT_URL*` variables
/// and the Entra ID authority from `AZURE_AUTHORITY_HOST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Google OAuth2 token endpoint for service-account keys whose `token_uri` is not used.
    pub gcp_token_url: String,
    /// Google Security Token Service (workload identity federation).
    pub gcp_sts_url: String,
    /// Base URL of Google's IAM Credentials API (service account impersonation).
    pub gcp_iam_credentials_url: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            gcp_token_url: gcp::DEFAULT_TOKEN_URL.to_owned(),
            gcp_sts_url: gcp::DEFAULT_STS_URL.to_owned(),
            gcp_iam_credentials_url: gcp::DEFAULT_IAM_CREDENTIALS_URL.to_owned(),
        }
    }
}

/// Who wrote the spec a provider serves: the namespaced kind is trusted less (see the
/// API's Tenancy section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Author {
    /// A `ClusterRegistryCredential`: a cluster administrator.
    Cluster,
    /// A `RegistryCredential`: a namespace's own team.
    Namespace,
}

/// A registry credential as issued by a provider. The password never prints.
#[derive(Clone, Debug)]
pub struct Credential {
    /// User name for the registry.
    pub username: String,
    /// Password or token; `Debug` shows `[REDACTED]`.
    pub password: SecretString,
    /// When the credential stops working, if it expires.
    pub expires_at: Option<Timestamp>,
}

/// Why a provider gave no credential. Messages never include secret values.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The referenced Secret does not exist.
    #[error("Secret {namespace}/{name} does not exist: create it, or fix the secretRef")]
    SecretNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// pullkeeper may not read the referenced Secret.
    #[error(
        "pullkeeper is not allowed to read Secret {namespace}/{name}: grant its ServiceAccount get on secrets there"
    )]
    SecretForbidden {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Reading the Secret failed for another reason (retried).
    #[error("reading Secret {namespace}/{name} failed: {source}")]
    SecretUnavailable {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// A key is missing.
    #[error(
        "Secret {namespace}/{name} has no key {key:?} (keys present: {present}): add it, or set the provider's key field"
    )]
    SecretKeyMissing {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Missing key.
        key: String,
        /// Keys that are present, comma-separated.
        present: String,
    },
    /// A key's value is empty.
    #[error("Secret {namespace}/{name} key {key:?} is empty")]
    SecretKeyEmpty {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Key.
        key: String,
    },
    /// A key's value is not UTF-8 text.
    #[error("Secret {namespace}/{name} key {key:?} is not UTF-8 text")]
    SecretKeyNotText {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Key.
        key: String,
    },
    /// The Secret has the wrong type.
    #[error("Secret {namespace}/{name} has type {found}, expected {expected}")]
    WrongSecretType {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Type found.
        found: String,
        /// Type expected.
        expected: &'static str,
    },
    /// The docker config does not parse.
    #[error("Secret {namespace}/{name}: {detail}")]
    MalformedDockerConfig {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong (never the content).
        detail: String,
    },
    /// A cloud provider refused or failed to issue a token.
    #[error("provider.{provider}: {message}{}", failure.advice())]
    Cloud {
        /// Provider kind.
        provider: &'static str,
        /// What kind of failure.
        failure: CloudFailure,
        /// The provider's own words (never credentials).
        message: String,
    },
    /// The ServiceAccount of a `serviceAccountRef` does not exist.
    #[error("ServiceAccount {namespace}/{name} does not exist: create it, or fix serviceAccountRef")]
    ServiceAccountNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// pullkeeper may not request a token for the ServiceAccount.
    #[error(
        "pullkeeper may not request a token for ServiceAccount {namespace}/{name} with audience {audience}: grant its ServiceAccount create on serviceaccounts/token (and allow the audience)"
    )]
    TokenRequestForbidden {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Audience requested.
        audience: String,
    },
    /// Requesting the ServiceAccount token failed for another reason (retried).
    #[error("requesting a token for ServiceAccount {namespace}/{name} failed: {source}")]
    TokenRequestFailed {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// The docker config has no entry for the registry.
    #[error(
        "Secret {namespace}/{name} has no auths entry for {registry} (entries: {keys}): add one, or fix spec.registry"
    )]
    NoRegistryEntry {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Registry looked for.
        registry: String,
        /// Keys present.
        keys: String,
    },
}

impl ProviderError {
    /// CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::SecretNotFound { .. } => reasons::SECRET_NOT_FOUND,
            ProviderError::SecretForbidden { .. } => reasons::SECRET_FORBIDDEN,
            ProviderError::SecretUnavailable { .. } => reasons::SECRET_UNAVAILABLE,
            ProviderError::SecretKeyMissing { .. } | ProviderError::SecretKeyEmpty { .. } => {
                reasons::SECRET_KEY_MISSING
            }
            ProviderError::SecretKeyNotText { .. } | ProviderError::MalformedDockerConfig { .. } => {
                reasons::MALFORMED_SECRET
            }
            ProviderError::WrongSecretType { .. } => reasons::WRONG_SECRET_TYPE,
            ProviderError::NoRegistryEntry { .. } => reasons::NO_REGISTRY_ENTRY,
            ProviderError::ServiceAccountNotFound { .. } => reasons::SERVICE_ACCOUNT_NOT_FOUND,
            ProviderError::TokenRequestForbidden { .. } => reasons::TOKEN_REQUEST_FORBIDDEN,
            ProviderError::TokenRequestFailed { .. } => reasons::TOKEN_REQUEST_FAILED,
            ProviderError::Cloud { failure, .. } => failure.reason(),
        }
    }

    /// A fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        self.reason()
    }

    /// True when retrying cannot help until the spec or a referenced object changes.
    pub fn is_permanent(&self) -> bool {
        match self {
            // Nothing watches ServiceAccounts for this: retry with backoff so one created
            // after the credential is picked up soon.
            ProviderError::SecretUnavailable { .. }
            | ProviderError::TokenRequestFailed { .. }
            | ProviderError::ServiceAccountNotFound { .. } => false,
            ProviderError::Cloud { failure, .. } => matches!(failure, CloudFailure::InvalidConfig),
            _ => true,
        }
    }
}

/// How a cloud provider call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudFailure {
    /// The credentials used to ask were rejected.
    Unauthorized,
    /// The identity may not get a token for this registry.
    Denied,
    /// The provider is rate-limiting, or unavailable for a time it named: HTTP 429, a 503
    /// with `Retry-After`, AWS `ThrottlingException`.
    Throttled {
        /// How long the provider asked us to wait (`Retry-After`), if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// The endpoint could not be reached or timed out.
    Unreachable,
    /// The spec cannot work as written.
    InvalidConfig,
    /// Anything else.
    Other,
}

impl CloudFailure {
    /// CamelCase reason.
    pub fn reason(self) -> &'static str {
        match self {
            CloudFailure::Unauthorized => reasons::PROVIDER_UNAUTHORIZED,
            CloudFailure::Denied => reasons::PROVIDER_DENIED,
            CloudFailure::Throttled { .. } => reasons::PROVIDER_THROTTLED,
            CloudFailure::Unreachable => reasons::PROVIDER_UNREACHABLE,
            CloudFailure::InvalidConfig => reasons::INVALID_SPEC,
            CloudFailure::Other => reasons::PROVIDER_ERROR,
        }
    }

    fn advice(self) -> std::borrow::Cow<'static, str> {
        let text = match self {
            CloudFailure::Unauthorized => {
                " (the cloud credentials were rejected: check the credentials Secret or the workload identity binding)"
            }
            CloudFailure::Denied => " (the identity lacks permission: grant it pull access to the registry)",
            CloudFailure::Throttled { retry_after: Some(d) } => {
                return format!(" (provider asked to retry after {}s)", d.as_secs()).into();
            }
            CloudFailure::Throttled { retry_after: None } => " (rate-limited: retrying with backoff)",
            CloudFailure::Unreachable => " (the endpoint could not be reached: check network, proxy and endpoint)",
            CloudFailure::InvalidConfig | CloudFailure::Other => "",
        };
        text.into()
    }
}

/// The wait a `Retry-After` header asks for: delay-seconds or an HTTP date (RFC 9110);
/// `None` when it is neither. A date in the past asks for no wait.
pub fn retry_after(value: &str, now: Timestamp) -> Option<std::time::Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = k8s_openapi::jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Some(std::time::Duration::try_from(at.duration_since(now)).unwrap_or_default())
}

/// At most this many names are listed in a message (a docker config can hold thousands).
pub const MAX_LISTED_NAMES: usize = 10;

/// `a, b, c`, or the first [`MAX_LISTED_NAMES`] and `and N more`, so a message about a
/// Secret with thousands of keys stays short.
pub fn list_names<I, S>(names: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut shown = Vec::new();
    let mut more = 0usize;
    for n in names {
        if shown.len() < MAX_LISTED_NAMES {
            shown.push(crate::registry::untrusted::bounded(n.as_ref(), 100));
        } else {
            more += 1;
        }
    }
    if more > 0 {
        shown.push(format!("and {more} more"));
    }
    shown.join(", ")
}

/// A source of registry credentials.
pub trait CredentialProvider: Send + Sync {
    /// Obtains a credential: reads a Secret or mints a token. Each source Secret it reads
    /// is noted in `reads`, as it was found.
    fn issue<'a>(&'a self, reads: &'a Reads) -> BoxFuture<'a, Result<Credential, ProviderError>>;
}

/// Chooses the provider for a spec written by `author`. The tenancy rules
/// (`controller::validate::tenancy`) have been applied before.
pub fn from_spec(
    client: &Client,
    registry: &RegistryHost,
    spec: &ProviderSpec,
    endpoints: &Endpoints,
    author: Author,
) -> Result<Box<dyn CredentialProvider>, ProviderError> {
    match spec {
        Provider::Basic(b) => Ok(Box::new(basic::Basic::new(client.clone(), b.clone()))),
        Provider::DockerConfig(d) => Ok(Box::new(docker_config::DockerConfig::new(
            client.clone(),
            registry.clone(),
            d.clone(),
        ))),
        Provider::Ecr(e) => Ok(Box::new(ecr::Ecr::new(client.clone(), registry.clone(), e.clone()))),
        Provider::Gcp(g) => Ok(Box::new(gcp::Gcp::new(
            client.clone(),
            g.clone(),
            endpoints.clone(),
            author,
        ))),
        Provider::Acr(a) => Ok(Box::new(acr::Acr::new(client.clone(), registry.clone(), a.clone()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = Timestamp::from_second(1_445_412_480).expect("t"); // 2015-10-21T07:28:00Z
        assert_eq!(retry_after("30", now), Some(std::time::Duration::from_secs(30)));
        assert_eq!(retry_after(" 120 ", now), Some(std::time::Duration::from_secs(120)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(std::time::Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }

    #[test]
    fn a_throttled_error_shows_the_providers_hint() {
        let e = ProviderError::Cloud {
            provider: "gcp",
            failure: CloudFailure::Throttled {
                retry_after: Some(std::time::Duration::from_secs(30)),
            },
            message: "token endpoint: HTTP 429 Too Many Requests".into(),
        };
        assert_eq!(e.reason(), "ProviderThrottled");
        assert!(e.to_string().ends_with("(provider asked to retry after 30s)"), "{e}");
        assert!(!e.is_permanent());
    }

    #[test]
    fn long_key_lists_are_cut_with_a_count() {
        assert_eq!(list_names(["a", "b"]), "a, b");
        let many: Vec<String> = (0..5000).map(|i| format!("registry-{i}.example.com")).collect();
        let text = list_names(&many);
        assert!(text.ends_with("and 4990 more"), "{text}");
        assert!(text.len() < 400, "{}", text.len());
    }

    #[test]
    fn credential_debug_hides_the_password() {
        let c = Credential {
            username: "robot".into(),
            password: SecretString::from("hunter2-very-secret"),
            expires_at: None,
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("robot"));
    }

    #[test]
    fn errors_name_the_secret_and_key_but_never_values() {
        let e = ProviderError::SecretKeyMissing {
            namespace: "ops".into(),
            name: "pat".into(),
            key: "password".into(),
            present: "username, token".into(),
        };
        assert_eq!(e.reason(), "SecretKeyMissing");
        assert!(e.is_permanent());
        let text = e.to_string();
        assert!(
            text.contains("ops/pat") && text.contains("\"password\"") && text.contains("token"),
            "{text}"
        );
    }
}
