//! `provider.acr`: Azure Container Registry. An Entra ID access token (client secret, or a
//! federated workload-identity token) is exchanged at `https://<registry>/oauth2/exchange`
//! for an ACR refresh token, used as the password of the null-GUID user. Its expiry is the
//! token's `exp` claim.

use base64::Engine as _;
use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{CloudFailure, Credential, CredentialProvider, ProviderError, federation, oauth, source};
use crate::crd::{AcrProvider, ClusterSecretKeyRef, ClusterServiceAccountRef};
use crate::registry::RegistryHost;

/// The username ACR expects with a refresh token.
pub const USERNAME: &str = "00000000-0000-0000-0000-000000000000";
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
const SCOPE: &str = "https://management.azure.com/.default";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// DNS suffixes of Azure Container Registry in the public and sovereign clouds.
pub const ACR_SUFFIXES: [&str; 4] = [".azurecr.io", ".azurecr.cn", ".azurecr.us", ".azurecr.de"];

/// True when `registry` is an Azure Container Registry host (`<name>.azurecr.io` and the
/// sovereign clouds' equivalents, default port), the only place pullkeeper's own Azure
/// token may be exchanged.
pub fn is_acr_host(registry: &RegistryHost) -> bool {
    let host = registry.host().to_ascii_lowercase();
    registry.to_string().to_ascii_lowercase() == host
        && ACR_SUFFIXES.iter().any(|suffix| {
            host.strip_suffix(suffix)
                .is_some_and(|name| !name.is_empty() && !name.contains('.'))
        })
}

#[derive(Deserialize)]
struct AadToken {
    access_token: SecretString,
}

#[derive(Deserialize)]
struct Exchange {
    refresh_token: SecretString,
}

/// Obtains ACR refresh tokens.
pub struct Acr {
    client: Client,
    http: reqwest::Client,
    registry: RegistryHost,
    spec: AcrProvider<ClusterSecretKeyRef, ClusterServiceAccountRef>,
}

impl Acr {
    /// For a resolved spec.
    pub fn new(
        client: Client,
        registry: RegistryHost,
        spec: AcrProvider<ClusterSecretKeyRef, ClusterServiceAccountRef>,
    ) -> Self {
        Self {
            client,
            http: oauth::http_client(),
            registry,
            spec,
        }
    }

    fn invalid(message: String) -> ProviderError {
        ProviderError::Cloud {
            provider: "acr",
            failure: CloudFailure::InvalidConfig,
            message,
        }
    }

    async fn mint(&self, reads: &source::Reads) -> Result<Credential, ProviderError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        // With a ServiceAccount of the cluster, the app that trusts it is the spec's own:
        // never fall back to the operator's AZURE_TENANT_ID/AZURE_CLIENT_ID.
        let identity_env = |k: &str| {
            if self.spec.service_account_ref.is_some() {
                None
            } else {
                env(k)
            }
        };
        let tenant = self
            .spec
            .tenant_id
            .clone()
            .or_else(|| identity_env("AZURE_TENANT_ID"))
            .ok_or_else(|| Self::invalid("set spec.provider.acr.tenantId (or AZURE_TENANT_ID)".into()))?;
        let client_id = self
            .spec
            .client_id
            .clone()
            .or_else(|| identity_env("AZURE_CLIENT_ID"))
            .ok_or_else(|| Self::invalid("set spec.provider.acr.clientId (or AZURE_CLIENT_ID)".into()))?;
        let authority = self
            .spec
            .authority_host
            .clone()
            .or_else(|| env("AZURE_AUTHORITY_HOST"))
            .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned());
        let token_url = format!("{}/{tenant}/oauth2/v2.0/token", authority.trim_end_matches('/'));
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", client_id),
            ("scope", SCOPE.to_owned()),
        ];
        let secret_value: SecretString;
        match (&self.spec.service_account_ref, &self.spec.client_secret_ref) {
            (Some(sa), _) => {
                let assertion = federation::service_account_token(&self.client, sa, federation::AZURE_AUDIENCE).await?;
                form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.to_owned()));
                form.push(("client_assertion", assertion.expose_secret().to_owned()));
            }
            (None, Some(r)) => {
                let secret = source::read_secret(&self.client, reads, &r.namespace, &r.name).await?;
                secret_value = SecretString::from(source::key_string(&secret, &r.namespace, &r.key)?);
                form.push(("client_secret", secret_value.expose_secret().to_owned()));
            }
            (None, None) => {
                let path = env("AZURE_FEDERATED_TOKEN_FILE").ok_or_else(|| {
                    Self::invalid(
                        "no clientSecretRef and no AZURE_FEDERATED_TOKEN_FILE: set clientSecretRef, or enable Azure workload identity for pullkeeper's ServiceAccount"
                            .into(),
                    )
                })?;
                let assertion = std::fs::read_to_string(&path)
                    .map_err(|e| Self::invalid(format!("reading the federated token file {path}: {e}")))?;
                form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.to_owned()));
                form.push(("client_assertion", assertion.trim().to_owned()));
            }
        }
        let aad: AadToken =
            oauth::json("acr", "Entra ID token endpoint", self.http.post(&token_url).form(&form)).await?;
        let exchange_url = self
            .spec
            .exchange_url
            .clone()
            .unwrap_or_else(|| format!("https://{}/oauth2/exchange", self.registry));
        let service = self.registry.to_string();
        let exchanged: Exchange = oauth::json(
            "acr",
            "ACR token exchange",
            self.http.post(&exchange_url).form(&[
                ("grant_type", "access_token"),
                ("service", service.as_str()),
                ("tenant", tenant.as_str()),
                ("access_token", aad.access_token.expose_secret()),
            ]),
        )
        .await?;
        let expires_at = jwt_exp(exchanged.refresh_token.expose_secret());
        Ok(Credential {
            username: USERNAME.to_owned(),
            password: exchanged.refresh_token,
            expires_at,
        })
    }
}

/// The `exp` claim of a JWT, read without verifying it (ACR verifies its own tokens; we
/// only need to know when to renew).
pub fn jwt_exp(token: &str) -> Option<Timestamp> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Timestamp::from_second(v.get("exp")?.as_i64()?).ok()
}

impl CredentialProvider for Acr {
    fn issue<'a>(&'a self, reads: &'a source::Reads) -> BoxFuture<'a, Result<Credential, ProviderError>> {
        Box::pin(self.mint(reads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exp_from_a_jwt() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"exp":1800000000,"sub":"x"}"#)
        );
        assert_eq!(jwt_exp(&token), Timestamp::from_second(1_800_000_000).ok());
        assert_eq!(jwt_exp("not-a-jwt"), None);
    }

    #[test]
    fn acr_hosts_are_recognised() {
        let h = |s: &str| RegistryHost::parse(s).expect("host");
        for ok in [
            "contoso.azurecr.io",
            "Contoso.AzureCR.io",
            "x.azurecr.cn",
            "x.azurecr.us",
            "x.azurecr.de",
        ] {
            assert!(is_acr_host(&h(ok)), "{ok}");
        }
        for refused in [
            "azurecr.io",
            "a.b.azurecr.io",
            "contoso.azurecr.io.evil.example",
            "contoso.azurecr.io:8443",
            "evilazurecr.io",
            "ghcr.io",
            "127.0.0.1:5000",
        ] {
            assert!(!is_acr_host(&h(refused)), "{refused}");
        }
    }
}
