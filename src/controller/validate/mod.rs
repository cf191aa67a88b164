//! Pure step: turn either kind's spec into one validated, namespace-resolved [`ValidSpec`].
//! The CRD schema refuses most bad input at admission; this repeats the checks the schema
//! cannot express (or that an older apiserver does not enforce) with messages that name
//! the field to fix.

use std::time::Duration;

use kube::core::Selector;

use crate::crd::conditions::reasons;
use crate::crd::{
    ClusterRegistryCredentialSpec, ClusterSecretKeyRef, ClusterSecretRef, ClusterServiceAccountRef, RefreshSpec,
    RegistryCredentialSpec, TlsSpec, VerifySpec,
};
use crate::provider::ProviderSpec;
use crate::registry::{HostError, RegistryHost};

mod duration;
mod selector;
mod tenancy;

pub use duration::duration;
pub use selector::NamespaceSelector;
use tenancy::own_registry_only;
pub use tenancy::{confine_sources, tenancy};

/// Default re-read period for credentials without an expiry.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(3600);
/// Default period between pullability checks.
pub const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(1800);
/// Prefix of the default pull secret name.
pub const SECRET_NAME_PREFIX: &str = "pullkeeper-";

/// A spec field that is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Bad `spec.registry`.
    #[error(transparent)]
    Registry(#[from] HostError),
    /// A duration that does not parse.
    #[error("{field} {value:?} is not a duration: write it like 90s, 30m or 1h30m")]
    Duration {
        /// Field path.
        field: &'static str,
        /// Value given.
        value: String,
    },
    /// A duration of zero.
    #[error("{field} must be longer than zero")]
    ZeroDuration {
        /// Field path.
        field: &'static str,
    },
    /// The namespace selector does not parse.
    #[error("spec.target.namespaceSelector is not valid: {0}")]
    Selector(String),
    /// A namespace is both allowed and excluded, so nothing is targeted there.
    #[error("namespace {0:?} is in both spec.target.namespaces and spec.target.excludeNamespaces")]
    IncludedAndExcluded(String),
    /// A ClusterRegistryCredential names a source Secret outside the one namespace the
    /// administrator allows.
    #[error(
        "{field} is {namespace:?}, but this pullkeeper reads ClusterRegistryCredential source Secrets only in namespace {allowed:?}: move the Secret there and set {field} to {allowed:?}"
    )]
    SourceNamespaceNotAllowed {
        /// Field path of the reference's namespace.
        field: &'static str,
        /// Namespace given.
        namespace: String,
        /// The one allowed namespace.
        allowed: String,
    },
    /// A `RegistryCredential` names an image on another registry than its own.
    #[error(
        "spec.verify.images entry {image:?} is not on spec.registry {registry}: a RegistryCredential verifies only images on its own registry (a ClusterRegistryCredential may name any)"
    )]
    ForeignImage {
        /// The image as written.
        image: String,
        /// `spec.registry`.
        registry: String,
    },
    /// A namespaced credential would use the operator's own cloud identity.
    #[error(
        "spec.provider.{provider} would use pullkeeper's own {cloud} identity, which a RegistryCredential may not use unless the administrator starts pullkeeper with --namespaced-ambient-credentials: {instead}"
    )]
    AmbientCredentialsNotAllowed {
        /// Provider kind.
        provider: &'static str,
        /// Whose identity, in words.
        cloud: &'static str,
        /// What to set instead.
        instead: &'static str,
    },
    /// A namespaced credential redirects where credentials are sent.
    #[error(
        "{field} is not allowed on a RegistryCredential: credentials go only to the cloud's own endpoints (administrators redirect them operator-wide, or use a ClusterRegistryCredential)"
    )]
    EndpointOverride {
        /// Field path.
        field: &'static str,
    },
    /// A namespaced credential would assume a role with the operator's own identity.
    #[error(
        "spec.provider.ecr.roleArn on a RegistryCredential needs serviceAccountRef or credentialsSecretRef: it is never assumed with pullkeeper's own identity"
    )]
    RoleArnWithoutIdentity,
    /// The operator's Azure identity may only be exchanged at an ACR registry.
    #[error(
        "spec.registry {registry:?} is not an Azure Container Registry host (*.azurecr.io, .azurecr.cn, .azurecr.us, .azurecr.de): pullkeeper's own Azure token is only sent to ACR; set serviceAccountRef or clientSecretRef"
    )]
    NotAnAcrRegistry {
        /// Registry given.
        registry: String,
    },
}

impl SpecError {
    /// The CamelCase reason for conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::AmbientCredentialsNotAllowed { .. } => reasons::AMBIENT_CREDENTIALS_NOT_ALLOWED,
            _ => reasons::INVALID_SPEC,
        }
    }
}

/// Where the pull secret goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    /// Cluster kind: namespaces chosen by the target rules.
    Cluster {
        /// Label selector, if any.
        selector: Option<NamespaceSelector>,
        /// Allow-list, if any.
        namespaces: Option<Vec<String>>,
        /// Deny-list.
        exclude: Vec<String>,
    },
    /// Namespaced kind: its own namespace only.
    Namespace(String),
}

/// Validated spec, the same shape for both kinds.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// Registry host.
    pub registry: RegistryHost,
    /// Credential source with Secret references resolved to namespaces.
    pub provider: ProviderSpec,
    /// Renew this long before expiry; `None` means a quarter of the lifetime.
    pub renew_before: Option<Duration>,
    /// Re-read period for credentials without expiry.
    pub refresh_interval: Duration,
    /// Name of the written pull secret.
    pub secret_name: String,
    /// Target namespaces.
    pub scope: Scope,
    /// ServiceAccounts to patch in each namespace.
    pub service_accounts: Vec<String>,
    /// Images to verify and their period.
    pub verify: Option<(VerifySpec, Duration)>,
    /// TLS settings.
    pub tls: TlsSpec,
    /// Change nothing.
    pub suspend: bool,
}

/// The name of the Secret a credential called `name` writes: `explicit`
/// (`spec.target.secretName`), else `pullkeeper-<name>`. Every accepted credential name
/// works: a default name over the 253-character limit is shortened with a digest of the
/// whole.
pub fn secret_name_of(name: &str, explicit: Option<&str>) -> String {
    match explicit {
        Some(n) => n.to_owned(),
        None => crate::controller::secret::shorten(&format!("{SECRET_NAME_PREFIX}{name}"), 253),
    }
}

/// Validates a `ClusterRegistryCredential`.
pub fn cluster(name: &str, spec: &ClusterRegistryCredentialSpec) -> Result<ValidSpec, SpecError> {
    let t = &spec.target;
    if let Some(allowed) = &t.namespaces
        && let Some(both) = allowed.iter().find(|n| t.exclude_namespaces.contains(n))
    {
        return Err(SpecError::IncludedAndExcluded(both.clone()));
    }
    common(
        name,
        &spec.registry,
        spec.provider.clone(),
        &spec.refresh,
        t.secret_name.as_deref(),
        Scope::Cluster {
            selector: t
                .namespace_selector
                .clone()
                .map(Selector::try_from)
                .transpose()
                .map(|s| s.map(NamespaceSelector::from))
                .map_err(|e| SpecError::Selector(e.to_string()))?,
            namespaces: t.namespaces.clone(),
            exclude: t.exclude_namespaces.clone(),
        },
        t.service_accounts.as_deref(),
        spec.verify.as_ref(),
        spec.tls.as_ref(),
        spec.suspend,
    )
}

/// Validates a `RegistryCredential` living in `namespace`.
pub fn namespaced(name: &str, namespace: &str, spec: &RegistryCredentialSpec) -> Result<ValidSpec, SpecError> {
    let local = |r: crate::crd::LocalSecretRef| ClusterSecretRef {
        name: r.name,
        namespace: namespace.to_owned(),
    };
    let local_key = |r: crate::crd::LocalSecretKeyRef| ClusterSecretKeyRef {
        name: r.name,
        namespace: namespace.to_owned(),
        key: r.key,
    };
    let local_sa = |r: crate::crd::LocalServiceAccountRef| ClusterServiceAccountRef {
        name: r.name,
        namespace: namespace.to_owned(),
    };
    if let Some(v) = &spec.verify {
        own_registry_only(&spec.registry, &v.images)?;
    }
    common(
        name,
        &spec.registry,
        spec.provider.clone().map_refs(local, local_key, local_sa),
        &spec.refresh,
        spec.target.secret_name.as_deref(),
        Scope::Namespace(namespace.to_owned()),
        spec.target.service_accounts.as_deref(),
        spec.verify.as_ref(),
        spec.tls.as_ref(),
        spec.suspend,
    )
}

#[allow(clippy::too_many_arguments)]
fn common(
    name: &str,
    registry: &str,
    provider: ProviderSpec,
    refresh: &RefreshSpec,
    secret_name: Option<&str>,
    scope: Scope,
    service_accounts: Option<&[String]>,
    verify: Option<&VerifySpec>,
    tls: Option<&TlsSpec>,
    suspend: bool,
) -> Result<ValidSpec, SpecError> {
    let registry = RegistryHost::parse(registry)?;
    let renew_before = refresh
        .renew_before
        .as_deref()
        .map(|v| duration("spec.refresh.renewBefore", v))
        .transpose()?;
    let refresh_interval = refresh
        .interval
        .as_deref()
        .map(|v| duration("spec.refresh.interval", v))
        .transpose()?
        .unwrap_or(DEFAULT_REFRESH_INTERVAL);
    let secret_name = secret_name_of(name, secret_name);
    let verify = verify
        .map(|v| {
            let every = v
                .interval
                .as_deref()
                .map(|i| duration("spec.verify.interval", i))
                .transpose()?
                .unwrap_or(DEFAULT_VERIFY_INTERVAL);
            Ok::<_, SpecError>((v.clone(), every))
        })
        .transpose()?;
    Ok(ValidSpec {
        registry,
        provider,
        renew_before,
        refresh_interval,
        secret_name,
        scope,
        service_accounts: service_accounts.map_or_else(|| vec!["default".to_owned()], <[String]>::to_vec),
        verify,
        tls: tls.cloned().unwrap_or_default(),
        suspend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BasicProvider, LocalSecretRef, LocalTarget, Provider};

    fn local_spec() -> RegistryCredentialSpec {
        RegistryCredentialSpec {
            registry: "ghcr.io".into(),
            provider: Provider::Basic(BasicProvider {
                secret_ref: LocalSecretRef { name: "pat".into() },
                username_key: "username".into(),
                password_key: "password".into(),
            }),
            refresh: Default::default(),
            target: LocalTarget::default(),
            verify: None,
            tls: None,
            suspend: false,
        }
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(duration("f", "90s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("f", "1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("f", "250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "1", "h", "1d", "1.5h", "-1s", "1h 30m"] {
            assert!(duration("f", bad).is_err(), "{bad:?}");
        }
        assert_eq!(duration("f", "0s"), Err(SpecError::ZeroDuration { field: "f" }));
    }

    #[test]
    fn namespaced_refs_resolve_to_own_namespace_and_defaults_apply() {
        let v = namespaced("ghcr", "team-a", &local_spec()).expect("valid");
        match &v.provider {
            Provider::Basic(b) => assert_eq!(b.secret_ref.namespace, "team-a"),
            other => panic!("unexpected provider {}", other.kind_name()),
        }
        assert_eq!(v.secret_name, "pullkeeper-ghcr");
        assert_eq!(v.service_accounts, vec!["default".to_owned()]);
        assert_eq!(v.scope, Scope::Namespace("team-a".into()));
        assert_eq!(v.refresh_interval, DEFAULT_REFRESH_INTERVAL);
    }

    #[test]
    fn empty_service_account_list_patches_none() {
        let mut s = local_spec();
        s.target.service_accounts = Some(vec![]);
        assert!(namespaced("x", "ns", &s).expect("valid").service_accounts.is_empty());
    }

    fn cluster_spec(provider: serde_json::Value) -> ClusterRegistryCredentialSpec {
        serde_json::from_value(serde_json::json!({
            "registry": "ghcr.io",
            "provider": provider,
            "target": {}
        }))
        .expect("cluster spec")
    }

    #[test]
    fn without_a_source_namespace_any_namespace_is_read() {
        let spec = cluster_spec(serde_json::json!({"basic": {"secretRef": {"name": "pat", "namespace": "team-a"}}}));
        let v = cluster("x", &spec).expect("valid");
        assert_eq!(confine_sources(v.clone(), None), Ok(v));
    }

    #[test]
    fn a_cluster_credential_may_read_only_the_allowed_namespace() {
        let allowed = Some("pullkeeper-system");
        let ok = cluster_spec(
            serde_json::json!({"basic": {"secretRef": {"name": "pat", "namespace": "pullkeeper-system"}}}),
        );
        let v = cluster("x", &ok).expect("valid");
        assert_eq!(confine_sources(v.clone(), allowed), Ok(v));
        // No Secret at all (the ambient identity) is never refused.
        let ambient = cluster("x", &cluster_spec(serde_json::json!({"ecr": {}}))).expect("valid");
        assert!(confine_sources(ambient, allowed).is_ok());

        for (provider, field) in [
            (
                serde_json::json!({"basic": {"secretRef": {"name": "pat", "namespace": "team-a"}}}),
                "spec.provider.basic.secretRef.namespace",
            ),
            (
                serde_json::json!({"dockerConfig": {"secretRef": {"name": "cfg", "namespace": "team-a"}}}),
                "spec.provider.dockerConfig.secretRef.namespace",
            ),
            (
                serde_json::json!({"ecr": {"credentialsSecretRef": {"name": "aws", "namespace": "team-a"}}}),
                "spec.provider.ecr.credentialsSecretRef.namespace",
            ),
            (
                serde_json::json!({"gcp": {"serviceAccountKeySecretRef": {"name": "k", "namespace": "team-a", "key": "key.json"}}}),
                "spec.provider.gcp.serviceAccountKeySecretRef.namespace",
            ),
            (
                serde_json::json!({"acr": {"tenantId": "t", "clientId": "c", "clientSecretRef": {"name": "sp", "namespace": "team-a", "key": "s"}}}),
                "spec.provider.acr.clientSecretRef.namespace",
            ),
        ] {
            let v = cluster("x", &cluster_spec(provider)).expect("valid");
            let e = confine_sources(v, allowed).expect_err(field);
            assert_eq!(
                e,
                SpecError::SourceNamespaceNotAllowed {
                    field,
                    namespace: "team-a".into(),
                    allowed: "pullkeeper-system".into()
                }
            );
            let msg = e.to_string();
            assert!(msg.contains(field) && msg.contains("\"pullkeeper-system\""), "{msg}");
            assert_eq!(e.reason(), crate::crd::conditions::reasons::INVALID_SPEC);
        }
    }

    #[test]
    fn the_namespaced_kind_is_not_confined() {
        let v = namespaced("ghcr", "team-a", &local_spec()).expect("valid");
        assert_eq!(confine_sources(v.clone(), Some("pullkeeper-system")), Ok(v));
    }

    #[test]
    fn a_namespaced_credential_verifies_only_images_on_its_own_registry() {
        let with_images = |registry: &str, images: &[&str]| {
            let mut s = local_spec();
            s.registry = registry.into();
            s.verify = Some(VerifySpec {
                images: images.iter().map(|i| (*i).to_owned()).collect(),
                platforms: vec![],
                interval: None,
            });
            s
        };
        let ok = with_images("ghcr.io", &["ghcr.io/acme/api:v1", "GHCR.IO/acme/web@sha256:0"]);
        assert!(
            namespaced("x", "ns", &ok).is_ok(),
            "own registry (and an unparsable entry)"
        );
        let hub = with_images("index.docker.io", &["nginx", "docker.io/library/redis:7"]);
        assert!(
            namespaced("x", "ns", &hub).is_ok(),
            "Docker Hub under its several names"
        );
        let probe = with_images("ghcr.io", &["ghcr.io/acme/api:v1", "169.254.169.254/latest:x"]);
        let e = namespaced("x", "ns", &probe).expect_err("another registry");
        assert_eq!(e.reason(), "InvalidSpec");
        let msg = e.to_string();
        assert!(
            msg.contains("\"169.254.169.254/latest:x\"") && msg.contains("spec.verify.images"),
            "{msg}"
        );
        let port = with_images("registry.example.com:5000", &["registry.example.com/app:1"]);
        assert!(
            namespaced("x", "ns", &port).is_err(),
            "another port is another registry"
        );
    }

    #[test]
    fn a_cluster_credential_may_verify_any_registry() {
        let spec: ClusterRegistryCredentialSpec = serde_json::from_value(serde_json::json!({
            "registry": "ghcr.io",
            "provider": {"basic": {"secretRef": {"name": "pat", "namespace": "ops"}}},
            "verify": {"images": ["quay.io/acme/api:v1", "nginx"]}
        }))
        .expect("spec");
        assert!(cluster("x", &spec).is_ok());
    }

    fn with_provider(provider: &str, fields: serde_json::Value) -> RegistryCredentialSpec {
        let mut s = local_spec();
        s.provider = serde_json::from_value(serde_json::json!({ provider: fields })).expect("provider");
        s
    }

    fn tenancy_of(s: &RegistryCredentialSpec, ambient: bool) -> Result<(), SpecError> {
        tenancy(&namespaced("x", "team-a", s).expect("valid"), ambient)
    }

    #[test]
    fn ambient_identity_is_refused_on_the_namespaced_kind_without_opt_in() {
        for (provider, instead) in [
            ("ecr", "serviceAccountRef with roleArn"),
            ("gcp", "serviceAccountRef with workloadIdentityProvider"),
            ("acr", "serviceAccountRef with tenantId and clientId"),
        ] {
            let s = with_provider(provider, serde_json::json!({}));
            let e = tenancy_of(&s, false).expect_err(provider);
            assert_eq!(e.reason(), "AmbientCredentialsNotAllowed");
            let text = e.to_string();
            assert!(
                text.contains(&format!("spec.provider.{provider}"))
                    && text.contains(instead)
                    && text.contains("--namespaced-ambient-credentials"),
                "{text}"
            );
        }
        // Opt-in lets it through (ACR only towards an ACR host).
        assert_eq!(tenancy_of(&with_provider("ecr", serde_json::json!({})), true), Ok(()));
        assert_eq!(tenancy_of(&with_provider("gcp", serde_json::json!({})), true), Ok(()));
        let mut acr = with_provider("acr", serde_json::json!({}));
        assert!(matches!(
            tenancy_of(&acr, true),
            Err(SpecError::NotAnAcrRegistry { .. })
        ));
        acr.registry = "contoso.azurecr.io".into();
        assert_eq!(tenancy_of(&acr, true), Ok(()));
    }

    #[test]
    fn own_secrets_and_federation_are_not_ambient() {
        for (provider, fields) in [
            ("ecr", serde_json::json!({"credentialsSecretRef": {"name": "aws"}})),
            (
                "ecr",
                serde_json::json!({"serviceAccountRef": {"name": "puller"}, "roleArn": "arn:aws:iam::123456789012:role/r"}),
            ),
            (
                "gcp",
                serde_json::json!({"serviceAccountKeySecretRef": {"name": "k", "key": "key.json"}}),
            ),
            (
                "gcp",
                serde_json::json!({"serviceAccountRef": {"name": "puller"}, "workloadIdentityProvider": "projects/1/locations/global/workloadIdentityPools/p/providers/k"}),
            ),
            (
                "acr",
                serde_json::json!({"clientSecretRef": {"name": "sp", "key": "s"}}),
            ),
            (
                "acr",
                serde_json::json!({"serviceAccountRef": {"name": "puller"}, "tenantId": "t", "clientId": "c"}),
            ),
        ] {
            let s = with_provider(provider, fields.clone());
            assert_eq!(tenancy_of(&s, false), Ok(()), "{provider} {fields}");
        }
        // The ServiceAccount resolves to the credential's own namespace.
        let s = with_provider("acr", serde_json::json!({"serviceAccountRef": {"name": "puller"}}));
        match namespaced("x", "team-a", &s).expect("valid").provider {
            Provider::Acr(a) => assert_eq!(a.service_account_ref.expect("sa").namespace, "team-a"),
            other => panic!("unexpected {}", other.kind_name()),
        }
    }

    #[test]
    fn the_namespaced_kind_may_not_chain_a_role_or_redirect_endpoints() {
        let role = serde_json::json!({"roleArn": "arn:aws:iam::123456789012:role/r"});
        for ambient in [false, true] {
            let e = tenancy_of(&with_provider("ecr", role.clone()), ambient).expect_err("role");
            assert_eq!(e, SpecError::RoleArnWithoutIdentity);
        }
        for (provider, fields, field) in [
            (
                "ecr",
                serde_json::json!({"credentialsSecretRef": {"name": "a"}, "endpoint": "http://x"}),
                "spec.provider.ecr.endpoint",
            ),
            (
                "gcp",
                serde_json::json!({"metadataUrl": "http://x"}),
                "spec.provider.gcp.metadataUrl",
            ),
            (
                "gcp",
                serde_json::json!({"tokenUrl": "http://x"}),
                "spec.provider.gcp.tokenUrl",
            ),
            (
                "acr",
                serde_json::json!({"authorityHost": "http://x"}),
                "spec.provider.acr.authorityHost",
            ),
            (
                "acr",
                serde_json::json!({"exchangeUrl": "http://x"}),
                "spec.provider.acr.exchangeUrl",
            ),
        ] {
            let e = tenancy_of(&with_provider(provider, fields), true).expect_err(field);
            assert_eq!(e, SpecError::EndpointOverride { field });
            assert!(e.to_string().starts_with(field), "{e}");
        }
    }

    #[test]
    fn the_cluster_kind_keeps_ambient_identity_and_overrides() {
        let raw: ClusterRegistryCredentialSpec = serde_json::from_value(serde_json::json!({
            "registry": "ghcr.io",
            "provider": {"acr": {"exchangeUrl": "http://x", "authorityHost": "http://y"}}
        }))
        .expect("spec");
        assert_eq!(tenancy(&cluster("x", &raw).expect("valid"), false), Ok(()));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = local_spec();
        s.registry = "https://ghcr.io".into();
        let e = namespaced("x", "ns", &s).expect_err("scheme");
        assert!(e.to_string().contains("spec.registry"), "{e}");
        let mut s = local_spec();
        s.refresh.renew_before = Some("soon".into());
        let e = namespaced("x", "ns", &s).expect_err("duration");
        assert!(e.to_string().contains("spec.refresh.renewBefore"), "{e}");
    }
}
