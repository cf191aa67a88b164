//! `provider.ecr`: AWS ECR authorization tokens (12 hours) from `GetAuthorizationToken`.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::sts::AssumeRoleProvider;
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use base64::Engine as _;
use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};

use super::{CloudFailure, Credential, CredentialProvider, ProviderError, federation, source};
use crate::crd::{ClusterSecretRef, ClusterServiceAccountRef, EcrProvider};
use crate::registry::RegistryHost;

/// Keys of `credentialsSecretRef`.
pub const ACCESS_KEY_ID: &str = "access-key-id";
/// Secret access key.
pub const SECRET_ACCESS_KEY: &str = "secret-access-key";
/// Optional session token.
pub const SESSION_TOKEN: &str = "session-token";

const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Account and region parsed from `<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]`.
pub fn parse_host(host: &RegistryHost) -> Option<(String, String)> {
    let h = host.host();
    let (account, rest) = h.split_once('.')?;
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let rest = rest
        .strip_prefix("dkr.ecr.")
        .or_else(|| rest.strip_prefix("dkr.ecr-fips."))?;
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))?;
    (!region.is_empty() && !region.contains('.')).then(|| (account.to_owned(), region.to_owned()))
}

/// Mints ECR tokens.
pub struct Ecr {
    client: Client,
    registry: RegistryHost,
    spec: EcrProvider<ClusterSecretRef, ClusterServiceAccountRef>,
}

impl Ecr {
    /// For a resolved spec.
    pub fn new(
        client: Client,
        registry: RegistryHost,
        spec: EcrProvider<ClusterSecretRef, ClusterServiceAccountRef>,
    ) -> Self {
        Self { client, registry, spec }
    }

    fn invalid(&self, message: String) -> ProviderError {
        ProviderError::Cloud {
            provider: "ecr",
            failure: CloudFailure::InvalidConfig,
            message,
        }
    }

    fn loader(&self, region: &str) -> aws_config::ConfigLoader {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(CALL_TIMEOUT)
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            );
        // Only the cluster kind may set it (the namespaced kind's CRD refuses it); the
        // SDK reads the administrator's AWS_ENDPOINT_URL(_ECR, _STS) otherwise.
        if let Some(endpoint) = &self.spec.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        loader
    }

    /// Exchanges a token of the referenced ServiceAccount for `roleArn`'s credentials,
    /// with an STS client that holds no credentials of its own: the operator's identity
    /// plays no part.
    async fn web_identity(&self, region: &str, sa: &ClusterServiceAccountRef) -> Result<Credentials, ProviderError> {
        let role = self.spec.role_arn.as_deref().ok_or_else(|| {
            self.invalid("serviceAccountRef needs roleArn: the role the ServiceAccount's token is exchanged for".into())
        })?;
        let token = federation::service_account_token(&self.client, sa, federation::AWS_AUDIENCE).await?;
        let config = self.loader(region).no_credentials().load().await;
        let sts = aws_sdk_sts::Client::new(&config);
        let out = sts
            .assume_role_with_web_identity()
            .role_arn(role)
            .role_session_name(session_name(sa))
            .web_identity_token(token.expose_secret())
            .send()
            .await
            .map_err(|e| classify("sts:AssumeRoleWithWebIdentity", e))?;
        let c = out
            .credentials()
            .ok_or_else(|| self.invalid("STS returned no credentials for the web identity".into()))?;
        Ok(Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            None,
            "pullkeeper-web-identity",
        ))
    }

    async fn mint(&self, reads: &source::Reads) -> Result<Credential, ProviderError> {
        let parsed = parse_host(&self.registry);
        let region = match (&self.spec.region, &parsed) {
            (Some(r), _) => r.clone(),
            (None, Some((_, r))) => r.clone(),
            (None, None) => {
                return Err(self.invalid(format!(
                    "cannot tell the AWS region from {}: set spec.provider.ecr.region",
                    self.registry
                )));
            }
        };
        let config = match (&self.spec.service_account_ref, &self.spec.credentials_secret_ref) {
            (Some(sa), _) => {
                let credentials = self.web_identity(&region, sa).await?;
                self.loader(&region).credentials_provider(credentials).load().await
            }
            (None, secret) => {
                let mut loader = self.loader(&region);
                if let Some(r) = secret {
                    let secret = source::read_secret(&self.client, reads, &r.namespace, &r.name).await?;
                    let id = source::key_string(&secret, &r.namespace, ACCESS_KEY_ID)?;
                    let key = source::key_string(&secret, &r.namespace, SECRET_ACCESS_KEY)?;
                    let token = source::key_string(&secret, &r.namespace, SESSION_TOKEN).ok();
                    loader = loader.credentials_provider(Credentials::new(id, key, token, None, "pullkeeper-secret"));
                }
                let base = loader.load().await;
                match &self.spec.role_arn {
                    None => base,
                    Some(role) => {
                        let mut b = AssumeRoleProvider::builder(role)
                            .session_name("pullkeeper")
                            .region(aws_config::Region::new(region.clone()))
                            .configure(&base);
                        if let Some(ext) = &self.spec.external_id {
                            b = b.external_id(ext);
                        }
                        let provider = b.build().await;
                        base.into_builder()
                            .credentials_provider(SharedCredentialsProvider::new(provider))
                            .build()
                    }
                }
            }
        };
        let ecr = aws_sdk_ecr::Client::new(&config);
        // The token works for every registry the identity may pull from; no registry ID needed.
        let out = ecr
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| classify("ecr:GetAuthorizationToken", e))?;
        let data = out
            .authorization_data()
            .first()
            .ok_or_else(|| self.invalid("ECR returned no authorization data".into()))?;
        let token = data
            .authorization_token()
            .ok_or_else(|| self.invalid("ECR returned no authorization token".into()))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| self.invalid("ECR's authorization token is not base64 text".into()))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| self.invalid("ECR's authorization token is not user:password".into()))?;
        let expires_at = data
            .expires_at()
            .and_then(|t| Timestamp::new(t.secs(), i32::try_from(t.subsec_nanos()).unwrap_or(0)).ok());
        Ok(Credential {
            username: user.to_owned(),
            password: SecretString::from(password.to_owned()),
            expires_at,
        })
    }
}

/// An STS session name that says which ServiceAccount asked (in CloudTrail), within
/// STS's 64 characters of `[\w+=,.@-]`.
pub fn session_name(sa: &ClusterServiceAccountRef) -> String {
    let mut name = format!("pullkeeper.{}.{}", sa.namespace, sa.name);
    name.retain(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
    name.truncate(64);
    name
}

/// Classifies an AWS SDK error of the call `what`; the message never carries credentials.
fn classify<E>(what: &str, err: SdkError<E, aws_sdk_ecr::config::http::HttpResponse>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let (failure, message) = match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            // Some endpoints (proxies, emulators) answer in the XML error format; read the
            // code from the body when the SDK could not.
            let body = se.raw().body().bytes().map(String::from_utf8_lossy).unwrap_or_default();
            let xml = |tag: &str| {
                let open = format!("<{tag}>");
                let start = body.find(&open)? + open.len();
                let end = body[start..].find(&format!("</{tag}>"))? + start;
                Some(body[start..end].to_owned())
            };
            let code = e
                .code()
                .map(str::to_owned)
                .or_else(|| xml("Code"))
                .unwrap_or_else(|| format!("HTTP {}", se.raw().status().as_u16()));
            let msg = e
                .message()
                .map(str::to_owned)
                .or_else(|| xml("Message"))
                .unwrap_or_default();
            let code = code.as_str();
            let failure = match code {
                "UnrecognizedClientException"
                | "InvalidIdentityToken"
                | "IDPRejectedClaim"
                | "InvalidClientTokenId"
                | "InvalidSignatureException"
                | "SignatureDoesNotMatch"
                | "ExpiredTokenException"
                | "ExpiredToken" => CloudFailure::Unauthorized,
                "AccessDeniedException" | "AccessDenied" => CloudFailure::Denied,
                "ThrottlingException" | "Throttling" | "TooManyRequestsException" => CloudFailure::Throttled {
                    retry_after: se
                        .raw()
                        .headers()
                        .get("retry-after")
                        .and_then(|v| super::retry_after(v, k8s_openapi::jiff::Timestamp::now())),
                },
                "InvalidParameterException" | "ValidationException" => CloudFailure::InvalidConfig,
                _ => CloudFailure::Other,
            };
            (failure, format!("{what}: {code}: {msg}"))
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => (
            CloudFailure::Unreachable,
            format!(
                "{what}: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&err)
            ),
        ),
        _ => (
            CloudFailure::Other,
            format!(
                "{what}: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&err)
            ),
        ),
    };
    ProviderError::Cloud {
        provider: "ecr",
        failure,
        message,
    }
}

impl CredentialProvider for Ecr {
    fn issue<'a>(&'a self, reads: &'a source::Reads) -> BoxFuture<'a, Result<Credential, ProviderError>> {
        Box::pin(self.mint(reads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_and_region_from_the_host() {
        let h = |s: &str| RegistryHost::parse(s).expect("host");
        assert_eq!(
            parse_host(&h("123456789012.dkr.ecr.us-east-1.amazonaws.com")),
            Some(("123456789012".into(), "us-east-1".into()))
        );
        assert_eq!(
            parse_host(&h("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com")),
            Some(("123456789012".into(), "us-gov-west-1".into()))
        );
        assert_eq!(
            parse_host(&h("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn")),
            Some(("123456789012".into(), "cn-north-1".into()))
        );
        assert_eq!(parse_host(&h("ghcr.io")), None);
        assert_eq!(parse_host(&h("12345.dkr.ecr.us-east-1.amazonaws.com")), None);
    }

    #[test]
    fn session_names_fit_sts_rules() {
        let sa = |ns: &str, name: &str| ClusterServiceAccountRef {
            name: name.into(),
            namespace: ns.into(),
        };
        assert_eq!(session_name(&sa("team-a", "puller")), "pullkeeper.team-a.puller");
        let long = session_name(&sa(&"n".repeat(63), &"s".repeat(200)));
        assert_eq!(long.len(), 64);
    }
}
