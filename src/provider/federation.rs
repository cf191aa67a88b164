//! Federation of a Kubernetes ServiceAccount: pullkeeper asks the apiserver (TokenRequest
//! API) for a short-lived token of the ServiceAccount named by `serviceAccountRef`, with
//! the audience the cloud expects, and the cloud exchanges it for its own credentials.
//! The token never leaves the operator except towards that cloud's token service.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};
use secrecy::SecretString;

use super::{CloudFailure, ProviderError};
use crate::crd::ClusterServiceAccountRef;

/// Audience of tokens exchanged with AWS STS `AssumeRoleWithWebIdentity`.
pub const AWS_AUDIENCE: &str = "sts.amazonaws.com";
/// Audience of tokens used as Entra ID client assertions.
pub const AZURE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Prefix of Google workload identity provider audiences.
pub const GOOGLE_AUDIENCE_PREFIX: &str = "//iam.googleapis.com/";
/// Lifetime requested for ServiceAccount tokens: the apiserver's minimum. The token is
/// exchanged at once and never stored.
pub const TOKEN_SECONDS: i64 = 600;

/// True for the audiences pullkeeper may request, and nothing else: above all never the
/// apiserver's own audience, which would make the token a Kubernetes credential of the
/// ServiceAccount.
pub fn audience_allowed(audience: &str) -> bool {
    audience == AWS_AUDIENCE
        || audience == AZURE_AUDIENCE
        || audience
            .strip_prefix(GOOGLE_AUDIENCE_PREFIX)
            .is_some_and(|rest| !rest.is_empty())
}

/// The audience Google expects for a workload identity pool provider
/// (`projects/N/locations/global/workloadIdentityPools/P/providers/X`).
pub fn google_audience(workload_identity_provider: &str) -> String {
    format!("{GOOGLE_AUDIENCE_PREFIX}{workload_identity_provider}")
}

/// Requests a token for the ServiceAccount with one audience and the minimum lifetime.
pub async fn service_account_token(
    client: &Client,
    sa: &ClusterServiceAccountRef,
    audience: &str,
) -> Result<SecretString, ProviderError> {
    if !audience_allowed(audience) {
        return Err(ProviderError::Cloud {
            provider: "federation",
            failure: CloudFailure::InvalidConfig,
            message: format!("pullkeeper does not request ServiceAccount tokens with audience {audience:?}"),
        });
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), &sa.namespace);
    match api
        .create_token_request(&sa.name, &PostParams::default(), &request)
        .await
    {
        Ok(answer) => match answer.status {
            Some(status) if !status.token.is_empty() => Ok(SecretString::from(status.token)),
            _ => Err(ProviderError::Cloud {
                provider: "federation",
                failure: CloudFailure::Other,
                message: format!(
                    "the apiserver issued no token for ServiceAccount {}/{}",
                    sa.namespace, sa.name
                ),
            }),
        },
        Err(kube::Error::Api(e)) if e.code == 404 => Err(ProviderError::ServiceAccountNotFound {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
        }),
        // 403: no RBAC for serviceaccounts/token, or an admission policy refused the audience.
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => Err(ProviderError::TokenRequestForbidden {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
            audience: audience.to_owned(),
        }),
        Err(source) => Err(ProviderError::TokenRequestFailed {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_three_cloud_audiences_are_requested() {
        assert!(audience_allowed("sts.amazonaws.com"));
        assert!(audience_allowed("api://AzureADTokenExchange"));
        assert!(audience_allowed(
            "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x"
        ));
        for refused in [
            "",
            "https://kubernetes.default.svc.cluster.local",
            "https://kubernetes.default.svc",
            "kubernetes",
            "//iam.googleapis.com/",
            "//iam.googleapis.com.evil.example/x",
            "sts.amazonaws.com.evil.example",
            "api://AzureADTokenExchange/other",
        ] {
            assert!(!audience_allowed(refused), "{refused:?}");
        }
    }

    #[test]
    fn google_audience_names_the_provider() {
        let p = "projects/123/locations/global/workloadIdentityPools/pool/providers/kube";
        assert_eq!(
            google_audience(p),
            "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/kube"
        );
        assert!(audience_allowed(&google_audience(p)));
    }
}
