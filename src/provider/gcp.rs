//! `provider.gcp`: Google OAuth2 access tokens (about an hour) for Artifact Registry and
//! Container Registry, from a service-account JSON key (signed JWT bearer grant) or from
//! the metadata server (GKE Workload Identity). The registry username is `oauth2accesstoken`.

use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{CloudFailure, Credential, CredentialProvider, ProviderError, oauth, source};
use crate::crd::{ClusterSecretKeyRef, GcpProvider};

/// Username for OAuth2 access tokens at Google registries.
pub const USERNAME: &str = "oauth2accesstoken";
/// Scope requested for the token.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const DEFAULT_METADATA: &str = "http://metadata.google.internal";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

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

/// Mints Google access tokens.
pub struct Gcp {
    client: Client,
    http: reqwest::Client,
    spec: GcpProvider<ClusterSecretKeyRef>,
}

impl Gcp {
    /// For a resolved spec.
    pub fn new(client: Client, spec: GcpProvider<ClusterSecretKeyRef>) -> Self {
        Self {
            client,
            http: oauth::http_client(),
            spec,
        }
    }

    fn invalid(message: String) -> ProviderError {
        ProviderError::Cloud {
            provider: "gcp",
            failure: CloudFailure::InvalidConfig,
            message,
        }
    }

    async fn mint(&self) -> Result<Credential, ProviderError> {
        let now = Timestamp::now();
        let token: TokenResponse = match &self.spec.service_account_key_secret_ref {
            Some(r) => {
                let secret = source::read_secret(&self.client, &r.namespace, &r.name).await?;
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
                let token_url = self
                    .spec
                    .token_url
                    .clone()
                    .or(key.token_uri.clone())
                    .unwrap_or_else(|| "https://oauth2.googleapis.com/token".to_owned());
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
            None => {
                let base = self.spec.metadata_url.as_deref().unwrap_or(DEFAULT_METADATA);
                let url = format!(
                    "{}/computeMetadata/v1/instance/service-accounts/default/token",
                    base.trim_end_matches('/')
                );
                oauth::json(
                    "gcp",
                    "metadata server",
                    self.http.get(url).header("Metadata-Flavor", "Google"),
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
    fn issue(&self) -> BoxFuture<'_, Result<Credential, ProviderError>> {
        Box::pin(self.mint())
    }
}
