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

    /// Requests seen by [`fake_apiserver`]: method, URI, JSON body.
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, serde_json::Value)>>>;

    /// A client whose apiserver records the request and answers with `status` and `body`.
    fn fake_apiserver(status: u16, body: serde_json::Value) -> (Client, Seen) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let record = record.clone();
            let body = body.clone();
            async move {
                let method = req.method().to_string();
                let uri = req.uri().to_string();
                let bytes = req.into_body().collect_bytes().await.map_err(Box::new)?;
                let sent = serde_json::from_slice(&bytes).unwrap_or_default();
                record.lock().expect("lock").push((method, uri, sent));
                let resp = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.to_string().into_bytes()))
                    .expect("response");
                Ok::<_, Box<kube::Error>>(resp)
            }
        });
        (Client::new(service, "default"), seen)
    }

    fn sa() -> ClusterServiceAccountRef {
        ClusterServiceAccountRef {
            name: "puller".into(),
            namespace: "team-a".into(),
        }
    }

    #[tokio::test]
    async fn asks_the_token_subresource_for_one_audience_and_ten_minutes() {
        use secrecy::ExposeSecret;
        let (client, seen) = fake_apiserver(
            201,
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [AWS_AUDIENCE]},
                "status": {"token": "header.payload.sig", "expirationTimestamp": "2026-01-01T00:00:00Z"}
            }),
        );
        let token = service_account_token(&client, &sa(), AWS_AUDIENCE)
            .await
            .expect("token");
        assert_eq!(token.expose_secret(), "header.payload.sig");
        let seen = seen.lock().expect("lock");
        let (method, uri, body) = &seen[0];
        assert_eq!(method, "POST");
        assert_eq!(
            uri.trim_end_matches('?'),
            "/api/v1/namespaces/team-a/serviceaccounts/puller/token"
        );
        assert_eq!(body["spec"]["audiences"], serde_json::json!([AWS_AUDIENCE]));
        assert_eq!(body["spec"]["expirationSeconds"], 600);
    }

    #[tokio::test]
    async fn never_asks_for_another_audience() {
        let (client, seen) = fake_apiserver(201, serde_json::json!({}));
        let e = service_account_token(&client, &sa(), "https://kubernetes.default.svc")
            .await
            .expect_err("refused");
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(seen.lock().expect("lock").is_empty(), "the apiserver was asked");
    }

    #[tokio::test]
    async fn missing_and_forbidden_service_accounts_are_named() {
        let status = |code: u16, reason: &str| {
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "m", "reason": reason, "code": code})
        };
        let (client, _) = fake_apiserver(404, status(404, "NotFound"));
        let e = service_account_token(&client, &sa(), AZURE_AUDIENCE)
            .await
            .expect_err("404");
        assert_eq!(e.reason(), "ServiceAccountNotFound");
        assert!(e.to_string().contains("team-a/puller"), "{e}");
        let (client, _) = fake_apiserver(403, status(403, "Forbidden"));
        let e = service_account_token(&client, &sa(), AZURE_AUDIENCE)
            .await
            .expect_err("403");
        assert_eq!(e.reason(), "TokenRequestForbidden");
        assert!(e.to_string().contains("serviceaccounts/token"), "{e}");
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
