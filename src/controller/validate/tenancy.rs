//! What a spec may ask for, by who writes it: the namespaced kind is written by a
//! namespace's team, the cluster kind by administrators.

use crate::crd::Provider;
use crate::registry::{Reference, RegistryHost};

use super::{Scope, SpecError, ValidSpec};

/// The tenancy rules for the namespaced kind, which its namespace's own team writes (the
/// cluster kind passes unchecked): no endpoint overrides, no `roleArn` on the operator's
/// identity, and the operator's ambient cloud identity only if `ambient_allowed` (the
/// administrator's opt-in), and then for ACR only towards an ACR host. The CRD's CEL rules
/// refuse most of this at admission; this also covers objects stored before them.
pub fn tenancy(spec: &ValidSpec, ambient_allowed: bool) -> Result<(), SpecError> {
    if !matches!(spec.scope, Scope::Namespace(_)) {
        return Ok(());
    }
    let p = &spec.provider;
    if let Some(field) = p.endpoint_overrides().first() {
        return Err(SpecError::EndpointOverride { field });
    }
    if let Provider::Ecr(e) = p
        && e.role_arn.is_some()
        && p.uses_ambient_identity()
    {
        return Err(SpecError::RoleArnWithoutIdentity);
    }
    if !p.uses_ambient_identity() {
        return Ok(());
    }
    if !ambient_allowed {
        let (cloud, instead) = match p {
            Provider::Ecr(_) => (
                "AWS",
                "set serviceAccountRef with roleArn (federation of a ServiceAccount of this namespace), or credentialsSecretRef",
            ),
            Provider::Gcp(_) => (
                "Google Cloud",
                "set serviceAccountRef with workloadIdentityProvider (federation of a ServiceAccount of this namespace), or serviceAccountKeySecretRef",
            ),
            _ => (
                "Azure",
                "set serviceAccountRef with tenantId and clientId (federation of a ServiceAccount of this namespace), or clientSecretRef",
            ),
        };
        return Err(SpecError::AmbientCredentialsNotAllowed {
            provider: p.kind_name(),
            cloud,
            instead,
        });
    }
    if matches!(p, Provider::Acr(_)) && !crate::provider::acr::is_acr_host(&spec.registry) {
        return Err(SpecError::NotAnAcrRegistry {
            registry: spec.registry.to_string(),
        });
    }
    Ok(())
}

/// Refuses a ClusterRegistryCredential whose source Secrets are outside `allowed` (the
/// operator's `--source-secret-namespace`), so the operator need not read Secrets
/// everywhere. The namespaced kind reads its own namespace only and is never refused.
pub fn confine_sources(spec: ValidSpec, allowed: Option<&str>) -> Result<ValidSpec, SpecError> {
    let Some(allowed) = allowed else {
        return Ok(spec);
    };
    if !matches!(spec.scope, Scope::Cluster { .. }) {
        return Ok(spec);
    }
    if let Some(source) = spec
        .provider
        .source_secrets()
        .into_iter()
        .find(|s| s.namespace != allowed)
    {
        return Err(SpecError::SourceNamespaceNotAllowed {
            field: source.field,
            namespace: source.namespace.to_owned(),
            allowed: allowed.to_owned(),
        });
    }
    Ok(spec)
}

/// A namespace's team must not use the operator to probe other registries (or whatever
/// answers on an internal address): the namespaced kind verifies only images on its own
/// registry. An image that does not parse is left to the verify step, which reports it
/// per image without contacting anything.
pub(super) fn own_registry_only(registry: &str, images: &[String]) -> Result<(), SpecError> {
    let Ok(own) = RegistryHost::parse(registry) else {
        // common() reports the bad spec.registry.
        return Ok(());
    };
    for image in images {
        let Ok(reference) = Reference::parse(image) else {
            continue;
        };
        let same = RegistryHost::parse(&reference.registry).is_ok_and(|h| h.same_registry(&own));
        if !same {
            return Err(SpecError::ForeignImage {
                image: image.clone(),
                registry: own.to_string(),
            });
        }
    }
    Ok(())
}
