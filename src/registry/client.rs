//! A small OCI Distribution client for pullability checks: resolves a manifest with HEAD
//! first (a HEAD does not count against Docker Hub's pull limit), follows Basic and Bearer
//! challenges with the credential, reads the image index only when platforms must be
//! checked, and classifies every failure into a reason a person can act on.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::challenge;
use super::reference::Reference;

/// Media types accepted for manifests, most specific first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// A registry login.
#[derive(Clone)]
pub struct Login {
    /// User.
    pub username: String,
    /// Password or token.
    pub password: SecretString,
}

/// TLS settings.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Extra PEM CA certificates to trust.
    pub ca_bundle: Option<String>,
    /// Do not verify certificates.
    pub insecure_skip_verify: bool,
}

/// What a reference resolved to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resolved {
    /// Manifest digest.
    pub digest: String,
    /// Manifest media type.
    pub media_type: String,
    /// Platforms present (`os/arch[/variant]`), when known.
    pub platforms: Vec<String>,
    /// Manifest size in bytes, when known.
    pub size: Option<u64>,
}

/// Why an image would not pull.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PullError {
    /// The credential was rejected.
    #[error("{registry} rejected the credential ({detail}): re-issue the token or fix the password")]
    Unauthorized {
        /// Registry.
        registry: String,
        /// Registry's words.
        detail: String,
    },
    /// The credential is valid but may not pull this repository.
    #[error("the credential may not pull {repository}: grant it pull access to that repository")]
    Denied {
        /// Repository.
        repository: String,
    },
    /// Repository or tag unknown (registries also say this for private repos they hide).
    #[error(
        "{reference} was not found: check that the repository and tag exist (private repositories also answer not found without access)"
    )]
    NotFound {
        /// The reference.
        reference: String,
    },
    /// The registry is rate-limiting.
    #[error("{registry} is rate-limiting requests{}: wait, or authenticate to get a higher limit", retry_after.as_ref().map(|r| format!(" (retry after {r} s)")).unwrap_or_default())]
    RateLimited {
        /// Registry.
        registry: String,
        /// Retry-After, if given.
        retry_after: Option<String>,
    },
    /// TLS failed.
    #[error("TLS with {registry} failed ({detail}): add the registry's CA to spec.tls.caBundle")]
    Tls {
        /// Registry.
        registry: String,
        /// Detail.
        detail: String,
    },
    /// The registry could not be reached.
    #[error("{registry} could not be reached ({detail}): check the host name, port, network and proxy")]
    Unreachable {
        /// Registry.
        registry: String,
        /// Detail.
        detail: String,
    },
    /// A requested platform is not in the index.
    #[error("{reference} has no {missing} image (available: {available})")]
    PlatformMissing {
        /// The reference.
        reference: String,
        /// Missing platforms.
        missing: String,
        /// Platforms present.
        available: String,
    },
    /// Anything else the registry answered.
    #[error("{registry} answered {detail}")]
    Registry {
        /// Registry.
        registry: String,
        /// Status and error code.
        detail: String,
    },
}

impl PullError {
    /// CamelCase reason (API.md).
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::Unauthorized { .. } => "Unauthorized",
            PullError::Denied { .. } => "Denied",
            PullError::NotFound { .. } => "NotFound",
            PullError::RateLimited { .. } => "RateLimited",
            PullError::Tls { .. } => "TLSError",
            PullError::Unreachable { .. } => "Unreachable",
            PullError::PlatformMissing { .. } => "PlatformMissing",
            PullError::Registry { .. } => "RegistryError",
        }
    }
}

/// Resolves manifests.
#[derive(Clone)]
pub struct RegistryClient {
    https: reqwest::Client,
    plain: reqwest::Client,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    memory: std::sync::Arc<Memory>,
}

/// What one client remembers between resolutions, like docker does within a pull: which
/// scheme a host speaks, and the authorization that worked (Basic per host and user,
/// Bearer tokens per repository). A remembered authorization that stops working (an
/// expired token, a changed password) is forgotten and the challenge followed again.
#[derive(Default)]
struct Memory {
    plain: std::sync::Mutex<HashMap<String, bool>>,
    auth: std::sync::Mutex<HashMap<(String, String, String), Remembered>>,
}

#[derive(Clone)]
struct Remembered {
    header: String,
    bearer: bool,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<SecretString>,
    #[serde(default)]
    access_token: Option<SecretString>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl RegistryClient {
    /// A client with the given TLS settings.
    pub fn new(tls: &TlsOptions) -> Result<Self, String> {
        crate::install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("pullkeeper/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &tls.ca_bundle {
            for cert in reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("spec.tls.caBundle is not PEM certificates: {e}"))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if tls.insecure_skip_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        let https = b.build().map_err(|e| e.to_string())?;
        let plain = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            https,
            plain,
            requests: std::sync::Arc::default(),
            memory: std::sync::Arc::default(),
        })
    }

    /// HTTP requests sent so far (for benchmarks and metrics).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves `reference` with `login` (anonymous if `None`) and checks `platforms`.
    pub async fn resolve(
        &self,
        reference: &Reference,
        login: Option<&Login>,
        platforms: &[String],
    ) -> Result<Resolved, PullError> {
        let mut s = Session::open(self, reference, login).await?;
        let url = format!(
            "{}/v2/{}/manifests/{}",
            s.base,
            reference.repository,
            reference.manifest_reference()
        );
        let head = s.send(reqwest::Method::HEAD, &url, Some(MANIFEST_ACCEPT)).await?;
        let headers = head.headers().clone();
        let media_type = header(&headers, CONTENT_TYPE.as_str()).unwrap_or_default();
        let size = header(&headers, "content-length").and_then(|v| v.parse().ok());
        let mut digest = header(&headers, "docker-content-digest");
        let is_index = INDEX_TYPES.iter().any(|t| media_type.starts_with(t));
        let mut found = Vec::new();
        if !platforms.is_empty() || digest.is_none() {
            let body = s
                .send(reqwest::Method::GET, &url, Some(MANIFEST_ACCEPT))
                .await?
                .bytes()
                .await
                .map_err(|e| s.transport(&e))?;
            if digest.is_none() {
                digest = Some(format!("sha256:{}", hex(&Sha256::digest(&body))));
            }
            if !platforms.is_empty() {
                if is_index {
                    let index: Index =
                        serde_json::from_slice(&body).map_err(|_| s.bad("the image index is not valid JSON"))?;
                    found = index
                        .manifests
                        .into_iter()
                        .filter_map(|m| m.platform)
                        .map(|p| platform_string(&p.os, &p.architecture, p.variant.as_deref()))
                        .collect();
                } else {
                    let m: Manifest =
                        serde_json::from_slice(&body).map_err(|_| s.bad("the manifest is not valid JSON"))?;
                    let blob = format!("{}/v2/{}/blobs/{}", s.base, reference.repository, m.config.digest);
                    let cfg = s
                        .send(reqwest::Method::GET, &blob, None)
                        .await?
                        .bytes()
                        .await
                        .map_err(|e| s.transport(&e))?;
                    let c: Config =
                        serde_json::from_slice(&cfg).map_err(|_| s.bad("the image config is not valid JSON"))?;
                    found = vec![platform_string(&c.os, &c.architecture, c.variant.as_deref())];
                }
                let missing: Vec<&String> = platforms.iter().filter(|p| !platform_present(p, &found)).collect();
                if !missing.is_empty() {
                    return Err(PullError::PlatformMissing {
                        reference: reference.to_string(),
                        missing: missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        available: found.join(", "),
                    });
                }
            }
        }
        Ok(Resolved {
            digest: digest.unwrap_or_default(),
            media_type,
            platforms: found,
            size,
        })
    }
}

/// Remembered authorizations belong to one exact login (user and password), never to a
/// user name alone, so a changed or wrong password is never answered from memory.
fn login_key(login: Option<&Login>) -> String {
    match login {
        None => String::new(),
        Some(l) => {
            let mut h = Sha256::new();
            h.update(l.username.as_bytes());
            h.update([0]);
            h.update(l.password.expose_secret().as_bytes());
            hex(&h.finalize())
        }
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn platform_string(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    }
}

/// `linux/arm64` matches `linux/arm64/v8`; a requested variant must match exactly.
fn platform_present(wanted: &str, found: &[String]) -> bool {
    found
        .iter()
        .any(|f| f == wanted || (wanted.matches('/').count() == 1 && f.starts_with(&format!("{wanted}/"))))
}

/// rustls reports a plain-HTTP server as a corrupt TLS message, not a certificate error.
fn is_plain_http_answer(e: &reqwest::Error) -> bool {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = src {
        let t = err.to_string().to_ascii_lowercase();
        if t.contains("corrupt message") || t.contains("invalidcontenttype") || t.contains("http request to an https") {
            return true;
        }
        src = err.source();
    }
    false
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(
        host,
        |(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host },
    );
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

/// One resolution: the base URL in use and the authorization that works.
struct Session<'a> {
    client: &'a RegistryClient,
    reference: &'a Reference,
    login: Option<&'a Login>,
    base: String,
    plain: bool,
    auth: Option<String>,
    bearer_granted: bool,
    remembered: bool,
}

impl<'a> Session<'a> {
    async fn open(
        client: &'a RegistryClient,
        reference: &'a Reference,
        login: Option<&'a Login>,
    ) -> Result<Self, PullError> {
        let host = reference.api_host().to_owned();
        let mut s = Session {
            client,
            reference,
            login,
            base: format!("https://{host}"),
            plain: false,
            auth: None,
            bearer_granted: false,
            remembered: false,
        };
        let user = login_key(login);
        let remembered = {
            let auth = crate::lock(&client.memory.auth);
            auth.get(&(host.clone(), user.clone(), reference.repository.clone()))
                .or_else(|| auth.get(&(host.clone(), user, String::new())))
                .cloned()
        };
        if let Some(r) = remembered {
            s.auth = Some(r.header);
            s.bearer_granted = r.bearer && login.is_some();
            s.remembered = true;
        }
        if let Some(plain) = crate::lock(&client.memory.plain).get(&host).copied() {
            s.plain = plain;
            if plain {
                s.base = format!("http://{host}");
            }
            return Ok(s);
        }
        // Like docker for loopback registries: HTTPS first, plain HTTP if that cannot talk TLS.
        let ping = format!("{}/v2/", s.base);
        s.client.count();
        match s.client.https.get(&ping).send().await {
            Ok(_) => {}
            Err(e) => match s.transport(&e) {
                // A certificate problem is a TLS registry with an untrusted certificate:
                // say so rather than falling back to plain HTTP.
                tls @ PullError::Tls { .. } if !is_plain_http_answer(&e) => return Err(tls),
                _ if is_loopback(&host) && (e.is_connect() || e.is_request()) => {
                    s.base = format!("http://{host}");
                    s.plain = true;
                }
                other => return Err(other),
            },
        }
        crate::lock(&s.client.memory.plain).insert(host, s.plain);
        Ok(s)
    }

    fn http(&self) -> &reqwest::Client {
        if self.plain {
            &self.client.plain
        } else {
            &self.client.https
        }
    }

    fn registry(&self) -> String {
        self.reference.registry.clone()
    }

    fn bad(&self, what: &str) -> PullError {
        PullError::Registry {
            registry: self.registry(),
            detail: what.to_owned(),
        }
    }

    fn transport(&self, e: &reqwest::Error) -> PullError {
        let mut chain = String::new();
        let mut src: Option<&dyn std::error::Error> = Some(e);
        while let Some(err) = src {
            chain.push_str(&err.to_string());
            chain.push_str(": ");
            src = err.source();
        }
        // The innermost cause says most (e.g. "invalid peer certificate: UnknownIssuer").
        let detail = chain
            .trim_end_matches(": ")
            .rsplit(": ")
            .next()
            .unwrap_or("")
            .to_owned();
        let lower = chain.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("handshake") {
            PullError::Tls {
                registry: self.registry(),
                detail,
            }
        } else {
            PullError::Unreachable {
                registry: self.registry(),
                detail,
            }
        }
    }

    async fn send(
        &mut self,
        method: reqwest::Method,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, PullError> {
        for attempt in 0..2 {
            let mut req = self.http().request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(auth) = &self.auth {
                req = req.header(AUTHORIZATION, auth);
            }
            self.client.count();
            let resp = req.send().await.map_err(|e| self.transport(&e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 && self.remembered {
                // The remembered authorization no longer works: forget it, start over.
                self.forget();
                self.auth = None;
                self.bearer_granted = false;
                self.remembered = false;
            }
            if status == StatusCode::UNAUTHORIZED && attempt == 0 && self.auth.is_none() {
                let challenges = resp
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(challenge::parse)
                    .collect::<Vec<_>>();
                self.authenticate(&challenges).await?;
                continue;
            }
            let checked = self.check(resp).await;
            if checked.is_ok() && !self.remembered {
                self.remember();
            }
            return checked;
        }
        Err(self.bad("authentication did not settle"))
    }

    fn key(&self, bearer: bool) -> (String, String, String) {
        (
            self.reference.api_host().to_owned(),
            login_key(self.login),
            if bearer {
                self.reference.repository.clone()
            } else {
                String::new()
            },
        )
    }

    fn remember(&mut self) {
        if let Some(header) = &self.auth {
            let bearer = header.starts_with("Bearer ");
            crate::lock(&self.client.memory.auth).insert(
                self.key(bearer),
                Remembered {
                    header: header.clone(),
                    bearer,
                },
            );
            self.remembered = true;
        }
    }

    fn forget(&self) {
        let mut auth = crate::lock(&self.client.memory.auth);
        auth.remove(&self.key(true));
        auth.remove(&self.key(false));
    }

    async fn authenticate(&mut self, challenges: &[challenge::Challenge]) -> Result<(), PullError> {
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c
                .param("realm")
                .ok_or_else(|| self.bad("a Bearer challenge without realm"))?;
            let scope = format!("repository:{}:pull", self.reference.repository);
            let mut req = self.http().get(realm).query(&[("scope", scope.as_str())]);
            if let Some(service) = c.param("service") {
                req = req.query(&[("service", service)]);
            }
            if let Some(l) = self.login {
                req = req.basic_auth(&l.username, Some(l.password.expose_secret()));
            }
            self.client.count();
            let resp = req.send().await.map_err(|e| self.transport(&e))?;
            match resp.status() {
                s if s.is_success() => {
                    let t: TokenAnswer = resp
                        .json()
                        .await
                        .map_err(|_| self.bad("the token endpoint's answer is not JSON"))?;
                    let token = t
                        .token
                        .or(t.access_token)
                        .ok_or_else(|| self.bad("the token endpoint gave no token"))?;
                    self.auth = Some(format!("Bearer {}", token.expose_secret()));
                    self.bearer_granted = self.login.is_some();
                    Ok(())
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if self.login.is_some() => {
                    Err(PullError::Unauthorized {
                        registry: self.registry(),
                        detail: format!("token endpoint answered {}", resp.status()),
                    })
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(PullError::Unauthorized {
                    registry: self.registry(),
                    detail: "anonymous pulls are not allowed and no credential was given".into(),
                }),
                StatusCode::TOO_MANY_REQUESTS => Err(PullError::RateLimited {
                    registry: self.registry(),
                    retry_after: header(resp.headers(), "retry-after"),
                }),
                other => Err(self.bad(&format!("token endpoint answered {other}"))),
            }
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            let l = self.login.ok_or_else(|| PullError::Unauthorized {
                registry: self.registry(),
                detail: "the registry requires a login and none was given".into(),
            })?;
            let raw = format!("{}:{}", l.username, l.password.expose_secret());
            self.auth = Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ));
            Ok(())
        } else {
            Err(self.bad("401 without a usable WWW-Authenticate challenge"))
        }
    }

    async fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, PullError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = header(resp.headers(), "retry-after");
        let insufficient = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(challenge::parse)
            .any(|c| c.param("error") == Some("insufficient_scope"));
        let code = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        Err(match status {
            StatusCode::NOT_FOUND => PullError::NotFound {
                reference: self.reference.to_string(),
            },
            StatusCode::FORBIDDEN => PullError::Denied {
                repository: format!("{}/{}", self.reference.registry, self.reference.repository),
            },
            StatusCode::UNAUTHORIZED
                if self.login.is_some() && (insufficient || self.bearer_granted || code == "DENIED") =>
            {
                PullError::Denied {
                    repository: format!("{}/{}", self.reference.registry, self.reference.repository),
                }
            }
            StatusCode::UNAUTHORIZED if self.login.is_none() => PullError::Unauthorized {
                registry: self.registry(),
                detail: "anonymous pulls are not allowed and no credential was given".into(),
            },
            StatusCode::UNAUTHORIZED => PullError::Unauthorized {
                registry: self.registry(),
                detail: if code.is_empty() { "401".into() } else { code },
            },
            StatusCode::TOO_MANY_REQUESTS => PullError::RateLimited {
                registry: self.registry(),
                retry_after,
            },
            other => PullError::Registry {
                registry: self.registry(),
                detail: format!("{other} {code}").trim().to_owned(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_match_with_and_without_variant() {
        let found = vec!["linux/amd64".to_owned(), "linux/arm64/v8".to_owned()];
        assert!(platform_present("linux/amd64", &found));
        assert!(platform_present("linux/arm64", &found));
        assert!(platform_present("linux/arm64/v8", &found));
        assert!(!platform_present("linux/arm/v7", &found));
        assert!(!platform_present("windows/amd64", &found));
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("ghcr.io"));
    }

    #[test]
    fn reasons_are_the_api_constants() {
        let e = PullError::Tls {
            registry: "r".into(),
            detail: "unknown issuer".into(),
        };
        assert_eq!(e.reason(), "TLSError");
        assert!(e.to_string().contains("caBundle"));
    }
}
