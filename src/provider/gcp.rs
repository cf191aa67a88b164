//! `provider.gcp`: Google OAuth2 access tokens (about an hour) for Artifact Registry and
//! Container Registry, from a service-account JSON key (signed JWT bearer grant), from a
//! ServiceAccount of the cluster through workload identity federation (Google STS token
//! exchange, optionally impersonating a Google service account), or from the metadata
//! server (GKE Workload Identity). The registry username is `oauth2accesstoken`.
//!
//! Every token pullkeeper writes has the scope [`SCOPE`], `devstorage.read_only`: the
//! scope Google documents for Compute Engine and GKE nodes pulling from Artifact Registry
//! and Container Registry. A written token is readable by whoever may read the pull
//! Secret, so it must not carry `cloud-platform` (every Google Cloud API the identity may
//! use) nor even `cloud-platform.read-only` (reads across every API).

use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{
    Author, CloudFailure, Credential, CredentialProvider, Endpoints, ProviderError, federation, oauth, source,
};
use crate::crd::{ClusterSecretKeyRef, ClusterServiceAccountRef, GcpProvider};

/// Username for OAuth2 access tokens at Google registries.
pub const USERNAME: &str = "oauth2accesstoken";
/// Scope of every token written: read-only storage, enough to pull images.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_only";
/// Scope of the intermediate federated token when it is only used to impersonate a
/// service account (the IAM Credentials API requires it); that token is never written.
pub const IMPERSONATION_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Google's OAuth2 token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Google's Security Token Service.
pub const DEFAULT_STS_URL: &str = "https://sts.googleapis.com/v1/token";
/// Google's IAM Credentials API.
pub const DEFAULT_IAM_CREDENTIALS_URL: &str = "https://iamcredentials.googleapis.com";
const DEFAULT_METADATA: &str = "http://metadata.google.internal";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// True when a key file's `token_uri` is one of Google's own endpoints
/// (`https://*.googleapis.com/...` on the default port), so a key written by a tenant cannot
/// make pullkeeper send a signed grant elsewhere.
pub fn is_google_token_uri(uri: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(uri) else {
        return false;
    };
    url.scheme() == "https"
        && url.username().is_empty()
        && url.password().is_none()
        && url.port().is_none()
        && url.host_str().is_some_and(|h| {
            h.strip_suffix(".googleapis.com").is_some_and(|sub| {
                !sub.is_empty() && sub.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            })
        })
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type", default)]
    kind: String,
    client_email: String,
    private_key: SecretString,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    #[serde(default)]
    expires_in: Option<i64>,
}

/// Answer of `generateAccessToken`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImpersonatedToken {
    access_token: SecretString,
    expire_time: String,
}

/// Mints Google access tokens.
pub struct Gcp {
    client: Client,
    http: reqwest::Client,
    spec: GcpProvider<ClusterSecretKeyRef, ClusterServiceAccountRef>,
    endpoints: Endpoints,
    author: Author,
}

impl Gcp {
    /// For a resolved spec written by `author`.
    pub fn new(
        client: Client,
        spec: GcpProvider<ClusterSecretKeyRef, ClusterServiceAccountRef>,
        endpoints: Endpoints,
        author: Author,
    ) -> Self {
        Self {
            client,
            http: oauth::http_client(),
            spec,
            endpoints,
            author,
        }
    }

    /// Where a key's JWT grant goes: the spec's override (cluster kind only), else the
    /// key's `token_uri` (for the namespaced kind only if it is Google's), else the
    /// administrator's token URL.
    fn token_url(&self, key_token_uri: Option<&str>) -> String {
        if let Some(u) = &self.spec.token_url
            && self.author == Author::Cluster
        {
            return u.clone();
        }
        match key_token_uri {
            Some(u) if self.author == Author::Cluster || is_google_token_uri(u) => u.to_owned(),
            _ => self.endpoints.gcp_token_url.clone(),
        }
    }

    /// Workload identity federation: the ServiceAccount's token, exchanged at Google STS,
    /// then (with `serviceAccountEmail`) for an impersonated service account's token.
    async fn federated(&self, sa: &ClusterServiceAccountRef, now: Timestamp) -> Result<TokenResponse, ProviderError> {
        let provider = self
            .spec
            .workload_identity_provider
            .as_deref()
            .ok_or_else(|| Self::invalid("serviceAccountRef needs workloadIdentityProvider".into()))?;
        let audience = federation::google_audience(provider);
        let subject = federation::service_account_token(&self.client, sa, &audience).await?;
        let email = self.spec.service_account_email.as_deref();
        let scope = if email.is_some() { IMPERSONATION_SCOPE } else { SCOPE };
        let federated: TokenResponse = oauth::json(
            "gcp",
            "Security Token Service",
            self.http.post(&self.endpoints.gcp_sts_url).form(&[
                ("grant_type", TOKEN_EXCHANGE),
                ("audience", audience.as_str()),
                ("scope", scope),
                ("requested_token_type", ACCESS_TOKEN_TYPE),
                ("subject_token_type", JWT_TOKEN_TYPE),
                ("subject_token", subject.expose_secret()),
            ]),
        )
        .await?;
        let Some(email) = email else {
            return Ok(federated);
        };
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
            self.endpoints.gcp_iam_credentials_url.trim_end_matches('/')
        );
        let impersonated: ImpersonatedToken = oauth::json(
            "gcp",
            "IAM Credentials generateAccessToken",
            self.http
                .post(url)
                .bearer_auth(federated.access_token.expose_secret())
                .json(&serde_json::json!({"scope": [SCOPE], "lifetime": "3600s"})),
        )
        .await?;
        let expires_in = impersonated
            .expire_time
            .parse::<Timestamp>()
            .ok()
            .map(|t| t.as_second() - now.as_second());
        Ok(TokenResponse {
            access_token: impersonated.access_token,
            expires_in,
        })
    }

    fn invalid(message: String) -> ProviderError {
        ProviderError::Cloud {
            provider: "gcp",
            failure: CloudFailure::InvalidConfig,
            message,
        }
    }

    async fn mint(&self, reads: &source::Reads) -> Result<Credential, ProviderError> {
        let now = Timestamp::now();
        let token: TokenResponse = match (
            &self.spec.service_account_ref,
            &self.spec.service_account_key_secret_ref,
        ) {
            (Some(sa), _) => self.federated(sa, now).await?,
            (None, Some(r)) => {
                let secret = source::read_secret(&self.client, reads, &r.namespace, &r.name).await?;
                let text = source::key_string(&secret, &r.namespace, &r.key)?;
                let key: KeyFile = serde_json::from_str(&text).map_err(|_| {
                    Self::invalid(format!(
                        "Secret {}/{} key {:?} is not a service-account JSON key (client_email, private_key)",
                        r.namespace, r.name, r.key
                    ))
                })?;
                if !key.kind.is_empty() && key.kind != "service_account" {
                    return Err(Self::invalid(format!(
                        "Secret {}/{} key {:?} holds a {:?} key; a service_account key is needed",
                        r.namespace, r.name, r.key, key.kind
                    )));
                }
                let token_url = self.token_url(key.token_uri.as_deref());
                let assertion = sign(&key, &token_url, now)?;
                oauth::json(
                    "gcp",
                    "token endpoint",
                    self.http
                        .post(&token_url)
                        .form(&[("grant_type", JWT_BEARER), ("assertion", assertion.expose_secret())]),
                )
                .await?
            }
            (None, None) => {
                // GCE_METADATA_HOST is how Google's own client libraries let the
                // administrator point at another metadata server (emulators, tests).
                let from_env = std::env::var("GCE_METADATA_HOST")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("http://{h}"));
                let base = match (&self.spec.metadata_url, &from_env) {
                    (Some(u), _) if self.author == Author::Cluster => u.as_str(),
                    (_, Some(env)) => env.as_str(),
                    _ => DEFAULT_METADATA,
                };
                let url = format!(
                    "{}/computeMetadata/v1/instance/service-accounts/default/token",
                    base.trim_end_matches('/')
                );
                oauth::json(
                    "gcp",
                    "metadata server",
                    self.http
                        .get(url)
                        .query(&[("scopes", SCOPE)])
                        .header("Metadata-Flavor", "Google"),
                )
                .await?
            }
        };
        let expires_at = token
            .expires_in
            .and_then(|s| now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(s)).ok());
        Ok(Credential {
            username: USERNAME.to_owned(),
            password: token.access_token,
            expires_at,
        })
    }
}

fn sign(key: &KeyFile, aud: &str, now: Timestamp) -> Result<SecretString, ProviderError> {
    let claims = Claims {
        iss: &key.client_email,
        scope: SCOPE,
        aud,
        iat: now.as_second(),
        exp: now.as_second() + 3600,
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = key.private_key_id.clone();
    let enc = EncodingKey::from_rsa_pem(key.private_key.expose_secret().as_bytes())
        .map_err(|_| Gcp::invalid("the service-account key's private_key is not an RSA PEM key".into()))?;
    jsonwebtoken::encode(&header, &claims, &enc)
        .map(SecretString::from)
        .map_err(|_| Gcp::invalid("could not sign the JWT grant with the service-account key".into()))
}

impl CredentialProvider for Gcp {
    fn issue<'a>(&'a self, reads: &'a source::Reads) -> BoxFuture<'a, Result<Credential, ProviderError>> {
        Box::pin(self.mint(reads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_google_token_uris_are_honoured_from_a_tenants_key() {
        for ok in [
            "https://oauth2.googleapis.com/token",
            "https://sts.googleapis.com/v1/token",
            "https://oauth2.googleapis.com/token?x=1",
        ] {
            assert!(is_google_token_uri(ok), "{ok}");
        }
        for refused in [
            "http://oauth2.googleapis.com/token",
            "https://googleapis.com/token",
            "https://evil.example/token",
            "https://oauth2.googleapis.com.evil.example/token",
            "https://oauth2.googleapis.com:8443/token",
            "https://user@oauth2.googleapis.com/token",
            "https://127.0.0.1/token",
            "not a url",
        ] {
            assert!(!is_google_token_uri(refused), "{refused}");
        }
    }

    #[test]
    fn written_tokens_never_carry_cloud_platform() {
        assert!(!SCOPE.contains("cloud-platform"), "{SCOPE}");
    }
}
