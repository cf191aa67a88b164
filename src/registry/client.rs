//! A small OCI Distribution client for pullability checks: resolves a manifest with HEAD
//! first (a HEAD does not count against Docker Hub's pull limit), follows Basic and Bearer
//! challenges with the credential, reads the image index only when platforms must be
//! checked, and classifies every failure into a reason a person can act on.
//!
//! The registry is named by whoever writes the spec, so everything it answers is treated
//! as hostile: bodies are read with caps ([`untrusted`]), its text is bounded and cleaned
//! before it reaches status, and credentials follow it only where [`policy`] allows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::challenge;
use super::policy::{self, AddressPolicy, AddressRefused, Insecure, RedirectRefused};
use super::reference::{Reference, valid_digest};
use super::untrusted::{self, BodyError, MANIFEST_CAP, SMALL_BODY_CAP, sanitize};

/// Media types accepted for manifests, most specific first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Most platforms reported for one image (status must stay small whatever an index holds).
const MAX_PLATFORMS: usize = 64;

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
    /// The registry's address is link-local, a cloud metadata service, or in a range the
    /// administrator denied; nothing was sent to it.
    #[error(
        "{registry} was not contacted: {detail}; pullability checks never reach link-local or cloud metadata addresses, nor ranges denied with the operator's --deny-registry-cidrs"
    )]
    AddressNotAllowed {
        /// Registry.
        registry: String,
        /// Which host and which rule.
        detail: String,
    },
    /// The registry sent the client (and would have sent the credential) somewhere insecure.
    #[error(
        "{registry} was not followed: {detail}; credentials go only over HTTPS, or to a loopback registry's own host: fix the registry's token realm or redirects"
    )]
    Insecure {
        /// Registry.
        registry: String,
        /// Where it pointed.
        detail: String,
    },
    /// An answer larger than a check ever needs.
    #[error("{registry} answered with a {what} larger than {}: a pullability check reads no more", untrusted::human(*limit))]
    TooLarge {
        /// Registry.
        registry: String,
        /// `manifest`, `image config`, `token answer`.
        what: &'static str,
        /// The cap in bytes.
        limit: usize,
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
            PullError::AddressNotAllowed { .. } => crate::crd::conditions::reasons::ADDRESS_NOT_ALLOWED,
            PullError::Insecure { .. } => crate::crd::conditions::reasons::INSECURE_ENDPOINT,
            PullError::TooLarge { .. } | PullError::Registry { .. } => "RegistryError",
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA bundle does not parse.
    #[error("spec.tls.caBundle is not PEM certificates: {0}")]
    CaBundle(#[source] reqwest::Error),
    /// The TLS stack refused the settings.
    #[error("the TLS settings cannot be used: {0}")]
    Build(#[source] reqwest::Error),
}

impl ClientError {
    /// CamelCase reason (API.md): both are TLS settings problems.
    pub fn reason(&self) -> &'static str {
        "TLSError"
    }
}

/// Resolves manifests.
#[derive(Clone)]
pub struct RegistryClient {
    https: reqwest::Client,
    plain: reqwest::Client,
    policy: AddressPolicy,
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
    /// The last `ratelimit-remaining` each registry sent (Docker Hub).
    ratelimit: std::sync::Mutex<HashMap<String, u64>>,
    /// The platforms of each manifest digest read so far, per registry host: content never
    /// changes under a digest, and Docker Hub counts every manifest GET as a pull. Keyed by
    /// host too, so that one registry's answer never stands for another's.
    platforms: std::sync::Mutex<HashMap<(String, String), Vec<String>>>,
}

/// Digests whose platforms are remembered at most; past it the memory starts over.
const MAX_REMEMBERED_DIGESTS: usize = 10_000;

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
    /// A client with the given TLS settings and the built-in address refusals.
    pub fn new(tls: &TlsOptions) -> Result<Self, ClientError> {
        Self::with_policy(tls, AddressPolicy::default())
    }

    /// A client with the given TLS settings that refuses the addresses `policy` refuses.
    pub fn with_policy(tls: &TlsOptions, policy: AddressPolicy) -> Result<Self, ClientError> {
        crate::install_crypto_provider();
        // Both clients resolve through the policy and check every redirect; neither
        // decompresses (no gzip feature), so a capped body is capped on the wire.
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(20))
                .user_agent(concat!("pullkeeper/", env!("CARGO_PKG_VERSION")))
                .dns_resolver(Arc::new(policy::PolicyResolver(policy.clone())))
                .redirect(policy::redirect_policy(policy.clone()))
        };
        let mut b = builder();
        if let Some(pem) = &tls.ca_bundle {
            for cert in reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(ClientError::CaBundle)? {
                b = b.add_root_certificate(cert);
            }
        }
        if tls.insecure_skip_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        let https = b.build().map_err(ClientError::Build)?;
        let plain = builder().build().map_err(ClientError::Build)?;
        Ok(Self {
            https,
            plain,
            policy,
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

    /// The pulls each registry said were left in its rate-limit window, from the last
    /// `ratelimit-remaining` header it sent (Docker Hub sends `100;w=21600`).
    pub fn ratelimit_remaining(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = crate::lock(&self.memory.ratelimit)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        out.sort();
        out
    }

    /// Resolves `reference` with `login` (anonymous if `None`) and checks `platforms`.
    pub async fn resolve(
        &self,
        reference: &Reference,
        login: Option<&Login>,
        platforms: &[String],
    ) -> Result<Resolved, PullError> {
        let resolved = self.inspect(reference, login, !platforms.is_empty()).await?;
        check_platforms(reference, platforms, &resolved)?;
        Ok(resolved)
    }

    /// Resolves `reference` with `login` (anonymous if `None`) and, with `read_platforms`,
    /// lists the platforms it holds without judging them: one resolution can then serve
    /// callers that need different platforms ([`check_platforms`] judges).
    pub async fn inspect(
        &self,
        reference: &Reference,
        login: Option<&Login>,
        read_platforms: bool,
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
        // The digest goes into status: only a well-formed one is taken from the server.
        let mut digest = header(&headers, "docker-content-digest").filter(|d| valid_digest(d));
        let is_index = INDEX_TYPES.iter().any(|t| media_type.starts_with(t));
        let host = reference.api_host().to_owned();
        let known = digest.as_ref().filter(|_| read_platforms).and_then(|d| {
            crate::lock(&self.memory.platforms)
                .get(&(host.clone(), d.clone()))
                .cloned()
        });
        let mut found = Vec::new();
        if let Some(platforms) = known {
            found = platforms;
        } else if read_platforms || digest.is_none() {
            let resp = s.send(reqwest::Method::GET, &url, Some(MANIFEST_ACCEPT)).await?;
            let body = s.read(resp, "manifest", MANIFEST_CAP).await?;
            if digest.is_none() {
                digest = Some(format!("sha256:{}", hex(&Sha256::digest(&body))));
            }
            if read_platforms {
                if is_index {
                    let index: Index =
                        serde_json::from_slice(&body).map_err(|_| s.bad("the image index is not valid JSON"))?;
                    for p in index.manifests.into_iter().filter_map(|m| m.platform) {
                        let p = platform_string(&p.os, &p.architecture, p.variant.as_deref());
                        if !found.contains(&p) {
                            found.push(p);
                        }
                    }
                } else {
                    let m: Manifest =
                        serde_json::from_slice(&body).map_err(|_| s.bad("the manifest is not valid JSON"))?;
                    let blob = format!("{}/v2/{}/blobs/{}", s.base, reference.repository, m.config.digest);
                    let resp = s.send(reqwest::Method::GET, &blob, None).await?;
                    let cfg = s.read(resp, "image config", MANIFEST_CAP).await?;
                    let c: Config =
                        serde_json::from_slice(&cfg).map_err(|_| s.bad("the image config is not valid JSON"))?;
                    found = vec![platform_string(&c.os, &c.architecture, c.variant.as_deref())];
                }
            }
        }
        found.truncate(MAX_PLATFORMS);
        if let (true, Some(d)) = (read_platforms, &digest) {
            let mut remembered = crate::lock(&self.memory.platforms);
            if remembered.len() >= MAX_REMEMBERED_DIGESTS {
                remembered.clear();
            }
            remembered.insert((host, d.clone()), found.clone());
        }
        Ok(Resolved {
            digest: digest.unwrap_or_default(),
            media_type: untrusted::bounded(&media_type, 100),
            platforms: found,
            size,
        })
    }
}

/// `PlatformMissing` when a platform in `wanted` is not among those `resolved` holds.
pub fn check_platforms(reference: &Reference, wanted: &[String], resolved: &Resolved) -> Result<(), PullError> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|p| !platform_present(p, &resolved.platforms))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PullError::PlatformMissing {
        reference: reference.to_string(),
        missing: missing.join(", "),
        available: sanitize(&resolved.platforms.join(", ")),
    })
}

/// Remembered authorizations belong to one exact login (user and password), never to a
/// user name alone, so a changed or wrong password is never answered from memory.
pub(crate) fn login_key(login: Option<&Login>) -> String {
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

/// The count of a `ratelimit-remaining: 100;w=21600` header.
fn ratelimit_remaining(h: &HeaderMap) -> Option<u64> {
    header(h, "ratelimit-remaining")?.parse().ok()
}

/// A server-chosen header shown to people (Retry-After): short and clean.
fn shown_header(h: &HeaderMap, name: &str) -> Option<String> {
    header(h, name).map(|v| untrusted::bounded(&v, 40))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Platform names come from the registry and go into status: bounded and clean.
fn platform_string(os: &str, arch: &str, variant: Option<&str>) -> String {
    let s = match variant {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    };
    untrusted::bounded(&s, 64)
}

/// `linux/arm64` matches `linux/arm64/v8`; a requested variant must match exactly.
fn platform_present(wanted: &str, found: &[String]) -> bool {
    found
        .iter()
        .any(|f| f == wanted || (wanted.matches('/').count() == 1 && f.starts_with(&format!("{wanted}/"))))
}

/// What a transport failure was, read from the types in its error chain.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The policy refused the address (in the resolver or a redirect).
    Refused(AddressRefused),
    /// A redirect would have gone somewhere insecure.
    Insecure(Insecure),
    /// TLS failed for another reason than the peer speaking plain HTTP.
    Tls,
    /// The peer answered TLS with plain HTTP: rustls sees a corrupt record.
    PlainHttp,
    /// Anything else: connection refused, timeout, DNS.
    Other,
}

/// Walks the error chain looking at types, not text. `io::Error` hides the error it
/// wraps from `source()`, so each one is opened with `get_ref`.
fn classify(e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in std::iter::once(err).chain(inner) {
            if let Some(r) = candidate.downcast_ref::<AddressRefused>() {
                return Failure::Refused(r.clone());
            }
            if let Some(r) = candidate.downcast_ref::<RedirectRefused>() {
                return match r {
                    RedirectRefused::Address(a) => Failure::Refused(a.clone()),
                    RedirectRefused::Insecure(i) => Failure::Insecure(i.clone()),
                };
            }
            if let Some(t) = candidate.downcast_ref::<rustls::Error>() {
                return match t {
                    rustls::Error::InvalidMessage(_) => Failure::PlainHttp,
                    _ => Failure::Tls,
                };
            }
        }
        src = err.source();
    }
    Failure::Other
}

/// The text of a chain, for errors whose type says nothing (a TLS failure that reaches
/// us only as text through the connector).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = String::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        chain.push_str(&err.to_string());
        chain.push_str(": ");
        src = err.source();
    }
    chain
}

/// rustls reports a plain-HTTP server as a corrupt TLS message, not a certificate error.
fn is_plain_http_answer(e: &reqwest::Error) -> bool {
    match classify(e) {
        Failure::PlainHttp => true,
        Failure::Other => {
            let t = chain_text(e).to_ascii_lowercase();
            t.contains("corrupt message") || t.contains("invalidcontenttype") || t.contains("http request to an https")
        }
        _ => false,
    }
}

/// Only a host that is really loopback (by address, not by how its name starts) may
/// fall back to plain HTTP: `127.evil.example` is a DNS name like any other.
fn is_loopback(host: &str) -> bool {
    Url::parse(&format!("http://{host}/")).is_ok_and(|u| policy::is_loopback(&u))
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
        // Literal addresses never reach the resolver, so the host is checked here, before
        // anything is sent (names are checked again, with their addresses, on connect).
        let registry_url = Url::parse(&format!("https://{host}/")).map_err(|_| PullError::Registry {
            registry: reference.registry.clone(),
            detail: "a host that does not form a URL".into(),
        })?;
        client
            .policy
            .check_url(&registry_url)
            .map_err(|e| PullError::AddressNotAllowed {
                registry: reference.registry.clone(),
                detail: sanitize(&e.to_string()),
            })?;
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
                refused @ (PullError::AddressNotAllowed { .. } | PullError::Insecure { .. }) => return Err(refused),
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
        let chain = chain_text(e);
        // The innermost cause says most (e.g. "invalid peer certificate: UnknownIssuer").
        let detail = sanitize(chain.trim_end_matches(": ").rsplit(": ").next().unwrap_or(""));
        let registry = self.registry();
        match classify(e) {
            Failure::Refused(r) => PullError::AddressNotAllowed {
                registry,
                detail: sanitize(&r.to_string()),
            },
            Failure::Insecure(i) => PullError::Insecure {
                registry,
                detail: i.to_string(),
            },
            Failure::Tls => PullError::Tls { registry, detail },
            // A plain-HTTP answer is no certificate problem: the CA advice would mislead.
            Failure::PlainHttp | Failure::Other => {
                let lower = chain.to_ascii_lowercase();
                if lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("handshake") {
                    PullError::Tls { registry, detail }
                } else {
                    PullError::Unreachable { registry, detail }
                }
            }
        }
    }

    /// Reads a body up to `limit` bytes.
    async fn read(&self, resp: reqwest::Response, what: &'static str, limit: usize) -> Result<Vec<u8>, PullError> {
        untrusted::read_capped(resp, limit).await.map_err(|e| match e {
            BodyError::TooLarge { limit } => PullError::TooLarge {
                registry: self.registry(),
                what,
                limit,
            },
            BodyError::Read(e) => self.transport(&e),
        })
    }

    fn base_url(&self) -> Result<Url, PullError> {
        Url::parse(&self.base).map_err(|_| self.bad("a host that does not form a URL"))
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
            if let Some(left) = ratelimit_remaining(resp.headers()) {
                crate::lock(&self.client.memory.ratelimit).insert(self.registry(), left);
            }
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
            // The realm gets the login: it must be HTTPS (or the loopback registry's own
            // host) and an allowed address, checked before anything is sent to it.
            let realm = policy::check_realm(&self.base_url()?, realm).map_err(|e| PullError::Insecure {
                registry: self.registry(),
                detail: e.to_string(),
            })?;
            self.client
                .policy
                .check_url(&realm)
                .map_err(|e| PullError::AddressNotAllowed {
                    registry: self.registry(),
                    detail: sanitize(&e.to_string()),
                })?;
            let http = if realm.scheme() == "https" {
                &self.client.https
            } else {
                &self.client.plain
            };
            let scope = format!("repository:{}:pull", self.reference.repository);
            let mut req = http.get(realm).query(&[("scope", scope.as_str())]);
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
                    let body = self.read(resp, "token answer", SMALL_BODY_CAP).await?;
                    let t: TokenAnswer = serde_json::from_slice(&body)
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
                    retry_after: shown_header(resp.headers(), "retry-after"),
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
        let retry_after = shown_header(resp.headers(), "retry-after");
        let insufficient = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(challenge::parse)
            .any(|c| c.param("error") == Some("insufficient_scope"));
        // An error body is read only up to a cap; one too big or not JSON just has no code.
        let code = untrusted::read_capped(resp, SMALL_BODY_CAP)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["errors"][0]["code"].as_str().map(|c| untrusted::bounded(c, 64)))
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
    fn docker_hubs_ratelimit_remaining_is_read_without_its_window() {
        let mut h = HeaderMap::new();
        assert_eq!(ratelimit_remaining(&h), None);
        h.insert("ratelimit-remaining", "97;w=21600".parse().expect("value"));
        assert_eq!(ratelimit_remaining(&h), Some(97));
        h.insert("ratelimit-remaining", "lots".parse().expect("value"));
        assert_eq!(ratelimit_remaining(&h), None);
    }

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
        assert!(
            !is_loopback("127.evil.example:5000"),
            "a name that starts like an address"
        );
        assert!(!is_loopback("localhost.evil.example"));
        assert!(is_loopback("127.0.0.2:5000"));
    }

    /// An error that wraps another, as hyper and reqwest do.
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn failures_are_classified_by_type_through_io_errors() {
        let tls = Outer(Box::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )));
        assert_eq!(classify(&tls), Failure::Tls);
        let plain = Outer(Box::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        )));
        assert_eq!(classify(&plain), Failure::PlainHttp);
        let refused = AddressRefused {
            host: "evil.example".into(),
            rule: "link-local".into(),
        };
        assert_eq!(
            classify(&Outer(Box::new(Outer(Box::new(refused.clone()))))),
            Failure::Refused(refused)
        );
        let downgrade = RedirectRefused::Insecure(Insecure::Downgrade { to: "http://x/".into() });
        assert!(matches!(classify(&Outer(Box::new(downgrade))), Failure::Insecure(_)));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(classify(&Outer(Box::new(refused))), Failure::Other);
    }

    #[test]
    fn refusals_have_their_own_reasons_and_size_errors_say_the_cap() {
        let e = PullError::TooLarge {
            registry: "r".into(),
            what: "manifest",
            limit: MANIFEST_CAP,
        };
        assert!(e.to_string().contains("manifest larger than 4 MiB"), "{e}");
        assert_eq!(e.reason(), "RegistryError");
        let e = PullError::AddressNotAllowed {
            registry: "169.254.169.254".into(),
            detail: "link-local".into(),
        };
        assert_eq!(e.reason(), "AddressNotAllowed");
        let e = PullError::Insecure {
            registry: "r".into(),
            detail: "d".into(),
        };
        assert_eq!(e.reason(), "InsecureEndpoint");
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
