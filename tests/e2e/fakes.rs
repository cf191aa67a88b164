//! Small local servers that follow the real token protocols of Google (JWT-bearer grant,
//! metadata server, STS token exchange, IAM Credentials impersonation) and Azure (Entra ID
//! client credentials and client assertions, ACR `/oauth2/exchange`), with per-test
//! behaviour under a path prefix so tests can run in parallel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;

/// How a fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Issue tokens.
    Ok,
    /// Reject the credentials (400 invalid_grant / 401 invalid_client).
    Reject,
    /// Be down (503).
    Down,
}

/// Behaviour of one test's fakes.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Answer mode.
    pub mode: Mode,
    /// Token lifetime in seconds.
    pub lifetime: i64,
    /// Tokens issued so far.
    pub issued: u32,
    /// Expected Entra ID client secret.
    pub client_secret: String,
    /// PEM public key the GCP grant must be signed with.
    pub public_key: String,
}

impl Behaviour {
    /// Issues tokens of `lifetime` seconds to anyone (no client secret or key checked).
    pub fn ok(lifetime: i64) -> Self {
        Behaviour {
            mode: Mode::Ok,
            lifetime,
            issued: 0,
            client_secret: String::new(),
            public_key: String::new(),
        }
    }
}

type Shared = Arc<Mutex<HashMap<String, Behaviour>>>;

/// The running fakes.
pub struct Fakes {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    state: Shared,
}

static FAKES: OnceLock<Fakes> = OnceLock::new();

/// Starts the fakes once per test binary.
pub fn fakes() -> &'static Fakes {
    FAKES.get_or_init(|| {
        let state: Shared = Arc::default();
        let st = state.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        on_own_thread(async move {
            let app = Router::new()
                .route("/gcp/{id}/token", post(gcp_token))
                .route(
                    "/meta/{id}/computeMetadata/v1/instance/service-accounts/default/token",
                    get(metadata_token),
                )
                .route("/aad/{id}/{tenant}/oauth2/v2.0/token", post(aad_token))
                .route("/acr/{id}/oauth2/exchange", post(acr_exchange))
                .route("/token", get(issue_registry_token))
                .route("/count/{id}/{*rest}", axum::routing::any(count))
                .route("/sts/{id}/v1/token", post(google_sts))
                .route(
                    "/iam/{id}/v1/projects/-/serviceAccounts/{target}",
                    post(generate_access_token),
                )
                .route("/entra/{id}/{tenant}/oauth2/v2.0/token", post(entra_assertion))
                .route("/oauth2/exchange", post(acr_exchange_federated))
                // A registry that rate-limits everything, like Docker Hub past its limit.
                .route("/v2/{*rest}", get(rate_limited).head(rate_limited))
                .route("/v2/", get(rate_limited))
                .with_state(st);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            axum::serve(listener, app).await.expect("serve");
        });
        let addr = rx.recv().expect("fakes started");
        Fakes {
            base: format!("http://{addr}"),
            state,
        }
    })
}

impl Fakes {
    /// Registers a test's behaviour under `id`.
    pub fn set(&self, id: &str, b: Behaviour) {
        self.state.lock().expect("lock").insert(id.to_owned(), b);
    }

    /// Changes a test's answer mode.
    pub fn mode(&self, id: &str, mode: Mode) {
        if let Some(b) = self.state.lock().expect("lock").get_mut(id) {
            b.mode = mode;
        }
    }

    /// Tokens issued so far for `id`.
    pub fn issued(&self, id: &str) -> u32 {
        self.state.lock().expect("lock").get(id).map_or(0, |b| b.issued)
    }

    /// Requests received so far for `id`, answered or refused.
    pub fn requests(&self, id: &str) -> u32 {
        REQUESTS.lock().expect("lock").get(id).copied().unwrap_or(0)
    }
}

/// Requests received per test id, whatever the answer.
static REQUESTS: std::sync::LazyLock<Mutex<HashMap<String, u32>>> = std::sync::LazyLock::new(Default::default);

fn behaviour(state: &Shared, id: &str) -> Option<Behaviour> {
    *REQUESTS.lock().ok()?.entry(id.to_owned()).or_insert(0) += 1;
    state.lock().ok()?.get(id).cloned()
}

fn bump(state: &Shared, id: &str) -> u32 {
    let mut s = state.lock().expect("lock");
    let b = s.get_mut(id).expect("registered");
    b.issued += 1;
    b.issued
}

fn down() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "temporarily_unavailable"})),
    )
        .into_response()
}

async fn gcp_token(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(b) = behaviour(&state, &id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match b.mode {
        Mode::Down => return down(),
        Mode::Reject => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})),
            )
                .into_response();
        }
        Mode::Ok => {}
    }
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    // Verify the grant the way Google does: RS256 signature by the key, audience, issuer.
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(b.public_key.as_bytes()).expect("public key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[format!("{}/gcp/{id}/token", fakes_base())]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    match jsonwebtoken::decode::<serde_json::Value>(&assertion, &key, &validation) {
        Ok(data) if data.claims["scope"] == pullkeeper::provider::gcp::SCOPE => {}
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_grant", "error_description": "Invalid JWT"})),
            )
                .into_response();
        }
    }
    let n = bump(&state, &id);
    let token = format!("ya29.gcp-{id}-{n}");
    let exp = k8s_openapi::jiff::Timestamp::now().as_second() + b.lifetime;
    if let Ok(mut t) = CLOUD_TOKENS.lock() {
        t.insert(token.clone(), exp);
    }
    Json(json!({"access_token": token, "expires_in": b.lifetime, "token_type": "Bearer"})).into_response()
}

/// GCP access tokens issued by the fake, with their expiry (seconds): the Bearer-auth test
/// registry accepts them as the password of `oauth2accesstoken` until they expire, as
/// Google's registries do.
static CLOUD_TOKENS: std::sync::LazyLock<Mutex<HashMap<String, i64>>> = std::sync::LazyLock::new(Default::default);

/// How many times an expired GCP token was presented to the test registry.
static EXPIRED_CLOUD_TOKENS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// How many times a client presented an expired GCP token to the test registry.
pub fn expired_cloud_tokens() -> u32 {
    EXPIRED_CLOUD_TOKENS.load(std::sync::atomic::Ordering::SeqCst)
}

/// `(user, password, repositories)` for a GCP token still valid, or `None`; counts
/// presentations of expired ones.
fn cloud_user(user: &str, password: &str) -> Option<(String, String, Vec<String>)> {
    if user != "oauth2accesstoken" {
        return None;
    }
    let exp = *CLOUD_TOKENS.lock().ok()?.get(password)?;
    if exp <= k8s_openapi::jiff::Timestamp::now().as_second() {
        EXPIRED_CLOUD_TOKENS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        return None;
    }
    Some((user.to_owned(), password.to_owned(), vec!["*".to_owned()]))
}

/// The token issuer of the Bearer-auth test registry: users, what they may pull, and the
/// signing key whose certificate the registry trusts.
pub struct Issuer {
    /// PEM private key.
    pub key_pem: String,
    /// Base64 DER certificate (the JWT's `x5c`).
    pub cert_der_b64: String,
    /// (user, password, repositories or `*`).
    pub users: Vec<(String, String, Vec<String>)>,
}

/// Set once by the test support before the token registry starts.
pub static ISSUER: OnceLock<Issuer> = OnceLock::new();

async fn issue_registry_token(
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let Some(issuer) = ISSUER.get() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let user = match headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        None => None,
        Some(b64) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let (u, p) = decoded.split_once(':').unwrap_or(("", ""));
            match issuer
                .users
                .iter()
                .find(|(name, pw, _)| name == u && pw == p)
                .cloned()
                .or_else(|| cloud_user(u, p))
            {
                Some(found) => Some(found),
                None => {
                    return (
                        StatusCode::UNAUTHORIZED,
                        Json(json!({"details": "invalid username or password"})),
                    )
                        .into_response();
                }
            }
        }
    };
    // scope=repository:NAME:ACTIONS (possibly several, space-separated).
    let mut access = Vec::new();
    for scope in q
        .get("scope")
        .map(String::as_str)
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
    {
        let mut parts = scope.splitn(3, ':');
        let (kind, name, actions) = (parts.next(), parts.next(), parts.next());
        if let (Some("repository"), Some(name), Some(actions)) = (kind, name, actions)
            && let Some((_, _, repos)) = &user
            && repos.iter().any(|r| r == "*" || r == name)
        {
            access.push(json!({"type": "repository", "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let claims = json!({
        "iss": "pullkeeper-test-issuer",
        "sub": user.as_ref().map(|u| u.0.clone()).unwrap_or_default(),
        "aud": q.get("service").cloned().unwrap_or_default(),
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5c = Some(vec![issuer.cert_der_b64.clone()]);
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(issuer.key_pem.as_bytes()).expect("issuer key");
    let token = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
    Json(json!({"token": token, "access_token": token, "expires_in": 300})).into_response()
}

async fn rate_limited() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("Retry-After", "30")],
        Json(json!({"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your pull rate limit."}]})),
    )
        .into_response()
}

fn fakes_base() -> String {
    FAKES.get().map(|f| f.base.clone()).unwrap_or_default()
}

async fn metadata_token(State(state): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(b) = behaviour(&state, &id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if headers.get("Metadata-Flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header").into_response();
    }
    if b.mode == Mode::Down {
        return down();
    }
    let n = bump(&state, &id);
    Json(json!({"access_token": format!("ya29.meta-{id}-{n}"), "expires_in": b.lifetime, "token_type": "Bearer"}))
        .into_response()
}

async fn aad_token(
    State(state): State<Shared>,
    Path((id, _tenant)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(b) = behaviour(&state, &id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if b.mode == Mode::Down {
        return down();
    }
    // A client secret, or (workload identity) a federated token as client assertion.
    let assertion_ok = form.get("client_assertion_type").map(String::as_str)
        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        && form.get("client_assertion") == Some(&b.client_secret);
    if b.mode == Mode::Reject || (form.get("client_secret") != Some(&b.client_secret) && !assertion_ok) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})),
        )
            .into_response();
    }
    Json(json!({"access_token": format!("aad-{id}"), "expires_in": 3600, "token_type": "Bearer"})).into_response()
}

async fn acr_exchange(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(b) = behaviour(&state, &id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if b.mode == Mode::Down {
        return down();
    }
    if form.get("grant_type").map(String::as_str) != Some("access_token")
        || form.get("access_token") != Some(&format!("aad-{id}"))
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"errors": [{"code": "UNAUTHORIZED"}]})),
        )
            .into_response();
    }
    let n = bump(&state, &id);
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = k8s_openapi::jiff::Timestamp::now().as_second() + b.lifetime;
    let token = format!(
        "{}.{}.sig{n}",
        b64(json!({"alg": "RS256", "typ": "JWT"})),
        b64(json!({"exp": exp, "grant_type": "refresh_token", "service": form.get("service"), "n": n}))
    );
    Json(json!({"refresh_token": token})).into_response()
}

/// A fresh RSA key pair as (private PEM, public PEM), made with the openssl CLI.
pub fn rsa_key_pair() -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.pem");
    let pubkey = dir.path().join("pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl")
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pubkey)
            .status()
            .expect("openssl")
            .success();
    assert!(ok, "openssl could not make a key pair");
    (
        std::fs::read_to_string(key).expect("key"),
        std::fs::read_to_string(pubkey).expect("pub"),
    )
}

/// Requests seen under `/count/{id}/...`, per id.
static HITS: LazyLock<Mutex<HashMap<String, u32>>> = LazyLock::new(Mutex::default);

/// A sink for endpoints that must never be contacted: counts the request, answers 503.
async fn count(Path((id, _rest)): Path<(String, String)>) -> Response {
    *HITS.lock().expect("lock").entry(id).or_default() += 1;
    down()
}

/// Requests that reached `/count/{id}/...`.
pub fn hits(id: &str) -> u32 {
    HITS.lock().expect("lock").get(id).copied().unwrap_or(0)
}

/// What a federation fake expects of a test's exchange.
#[derive(Clone, Debug)]
pub struct Federation {
    /// The apiserver's JWKS, to verify ServiceAccount tokens with.
    pub jwks: serde_json::Value,
    /// Expected `sub`: `system:serviceaccount:<namespace>:<name>`.
    pub subject: String,
    /// Expected `aud`.
    pub audience: String,
    /// Google: the service account to impersonate; Entra: the client ID.
    pub principal: String,
    /// Entra: the tenant; ACR: the registry (`service`).
    pub tenant: String,
    /// Expected registry (`service`) at the ACR exchange.
    pub registry: String,
    /// Subject tokens accepted so far.
    pub exchanged: u32,
}

static FEDERATION: LazyLock<Mutex<HashMap<String, Federation>>> = LazyLock::new(Mutex::default);

/// Registers a test's federation expectations under `id`.
pub fn expect_federation(id: &str, f: Federation) {
    FEDERATION.lock().expect("lock").insert(id.to_owned(), f);
}

/// Subject tokens accepted so far for `id`.
pub fn exchanged(id: &str) -> u32 {
    FEDERATION.lock().expect("lock").get(id).map_or(0, |f| f.exchanged)
}

fn federation(id: &str) -> Option<Federation> {
    FEDERATION.lock().ok()?.get(id).cloned()
}

fn oauth_error(status: StatusCode, code: &str, description: String) -> Response {
    (status, Json(json!({"error": code, "error_description": description}))).into_response()
}

/// Checks a ServiceAccount token the way a cloud does with the cluster's OIDC keys: an
/// RS256 JWT signed by one of the apiserver's keys, from its issuer, for `audience`, for
/// the expected ServiceAccount, unexpired. Counts it when good.
fn verify_subject(id: &str, f: &Federation, token: &str) -> Result<(), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(f.jwks.clone()).map_err(|e| format!("JWKS: {e}"))?;
    let jwk = header
        .kid
        .as_deref()
        .and_then(|k| set.find(k))
        .ok_or("signed with a key that is not in the apiserver's JWKS")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| format!("JWK: {e}"))?;
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&[&f.audience]);
    v.set_issuer(&["https://kubernetes.default.svc"]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| format!("rejected: {e}"))?;
    if data.claims["sub"] != f.subject.as_str() {
        return Err(format!("sub {} is not {}", data.claims["sub"], f.subject));
    }
    let lifetime = data.claims["exp"].as_i64().unwrap_or(0) - data.claims["iat"].as_i64().unwrap_or(0);
    if lifetime > 3600 {
        return Err(format!("a {lifetime} s token; short-lived tokens expected"));
    }
    if let Some(f) = FEDERATION.lock().expect("lock").get_mut(id) {
        f.exchanged += 1;
    }
    Ok(())
}

/// Google STS `v1/token` (RFC 8693 token exchange for workload identity federation).
async fn google_sts(Path(id): Path<String>, Form(form): Form<HashMap<String, String>>) -> Response {
    let Some(f) = federation(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange"
        || field("requested_token_type") != "urn:ietf:params:oauth:token-type:access_token"
        || field("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt"
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "not a token exchange".into(),
        );
    }
    if field("audience") != f.audience {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            format!("unknown audience {}", field("audience")),
        );
    }
    // A cloud-platform token can impersonate; the read-only one is what gets written.
    let token = match field("scope") {
        "https://www.googleapis.com/auth/cloud-platform" => format!("ya29.sts-{id}"),
        s if s == pullkeeper::provider::gcp::SCOPE => format!("ya29.sts-ro-{id}"),
        other => return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", other.to_owned()),
    };
    if let Err(e) = verify_subject(&id, &f, field("subject_token")) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", e);
    }
    Json(json!({
        "access_token": token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": 3600
    }))
    .into_response()
}

/// IAM Credentials `generateAccessToken` for `<email>:generateAccessToken`.
async fn generate_access_token(
    Path((id, target)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let Some(f) = federation(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
    if bearer != Some(format!("Bearer ya29.sts-{id}").as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": 401, "message": "Request had invalid authentication credentials."}})),
        )
            .into_response();
    }
    if target != format!("{}:generateAccessToken", f.principal)
        || body["scope"] != json!([pullkeeper::provider::gcp::SCOPE])
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": 400, "message": format!("unexpected {target} {body}")}})),
        )
            .into_response();
    }
    let expire = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(3600);
    Json(json!({"accessToken": format!("ya29.impersonated-{id}"), "expireTime": expire.to_string()})).into_response()
}

/// Entra ID token endpoint with a federated client assertion.
async fn entra_assertion(
    Path((id, tenant)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(f) = federation(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if tenant != f.tenant || field("client_id") != f.principal || field("grant_type") != "client_credentials" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "AADSTS900023: unexpected tenant {tenant} or client {}",
                field("client_id")
            ),
        );
    }
    if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        || !field("client_secret").is_empty()
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "a client assertion is expected".into(),
        );
    }
    if let Err(e) = verify_subject(&id, &f, field("client_assertion")) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", format!("AADSTS700211: {e}"));
    }
    Json(json!({"access_token": format!("aad-{id}"), "expires_in": 3600, "token_type": "Bearer"})).into_response()
}

/// ACR `/oauth2/exchange` at the registry's own address (reached through [`tls`]); the
/// test is known by its Entra access token.
async fn acr_exchange_federated(Form(form): Form<HashMap<String, String>>) -> Response {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let id = field("access_token").strip_prefix("aad-").unwrap_or("").to_owned();
    let Some(f) = federation(&id) else {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"errors": [{"code": "UNAUTHORIZED"}]})),
        )
            .into_response();
    };
    if field("grant_type") != "access_token" || field("service") != f.registry || field("tenant") != f.tenant {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"errors": [{"code": "BAD_REQUEST"}]})),
        )
            .into_response();
    }
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = k8s_openapi::jiff::Timestamp::now().as_second() + 3 * 3600;
    let token = format!(
        "{}.{}.acr-{id}",
        b64(json!({"alg": "RS256", "typ": "JWT"})),
        b64(json!({"exp": exp, "grant_type": "refresh_token", "service": f.registry}))
    );
    Json(json!({"refresh_token": token})).into_response()
}

/// An HTTPS front of the fakes on `127.0.0.1:PORT` with a certificate from a private CA:
/// (`127.0.0.1:PORT`, path of the CA's PEM). Stands in for a registry's own host.
pub fn tls() -> &'static (String, PathBuf) {
    static TLS: OnceLock<(String, PathBuf)> = OnceLock::new();
    TLS.get_or_init(|| {
        pullkeeper::install_crypto_provider();
        let backend = fakes().base.trim_start_matches("http://").to_owned();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fakes-tls");
        std::fs::create_dir_all(&dir).expect("dir");
        let sh = format!(
            "set -e; cd {d}; \
             openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj '/CN=pullkeeper fakes CA' -keyout ca.key -out ca.crt; \
             openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout tls.key -out tls.csr; \
             printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext; \
             openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile san.ext -out tls.crt",
            d = dir.display()
        );
        let ok = std::process::Command::new("bash")
            .args(["-c", &sh])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl")
            .success();
        assert!(ok, "openssl could not make the fakes' certificate");
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("tls.crt"))
            .expect("cert")
            .collect::<Result<_, _>>()
            .expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("tls.key")).expect("key");
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = std::sync::mpsc::channel();
        on_own_thread(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut front) = acceptor.accept(tcp).await else { return };
                    let Ok(mut back) = tokio::net::TcpStream::connect(&backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
                });
            }
        });
        let addr = rx.recv().expect("TLS front started");
        (addr.to_string(), dir.join("ca.crt"))
    })
}

/// Runs `server` on a runtime of its own thread, for the life of the test binary.
fn on_own_thread(server: impl std::future::Future<Output = ()> + Send + 'static) {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(server);
    });
}

/// How a [`Front`] treats connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward to the fakes.
    Pass,
    /// Answer every request `500 Internal Server Error`.
    Http500,
    /// Answer every request `429 Too Many Requests` with `Retry-After: 40`.
    Http429,
    /// Accept, never answer (until the fault changes: then the connection is closed).
    Hang,
    /// Not listen: connections are refused.
    Refuse,
}

struct FrontState {
    fault: Mutex<Fault>,
    /// Connections accepted while not passing them on.
    faulty: std::sync::atomic::AtomicU32,
}

/// A front of the fakes on its own loopback port that a test switches between passing
/// requests on and failing them as a broken endpoint does; give its address in place of
/// the fakes' base.
pub struct Front {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    state: Arc<FrontState>,
}

impl Front {
    /// A front passing requests on to the fakes.
    pub fn start() -> Front {
        let backend = fakes().base.trim_start_matches("http://").to_owned();
        let state = Arc::new(FrontState {
            fault: Mutex::new(Fault::Pass),
            faulty: Default::default(),
        });
        let first = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = first.local_addr().expect("addr");
        first.set_nonblocking(true).expect("nonblocking");
        let st = state.clone();
        on_own_thread(async move {
            let listener = tokio::net::TcpListener::from_std(first).ok();
            front_loop(listener, addr, backend, st).await;
        });
        Front {
            base: format!("http://{addr}"),
            state,
        }
    }

    /// Switches the fault (a hanging connection is closed when it leaves `Hang`).
    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().expect("lock") = fault;
    }

    /// Connections accepted and failed so far (one a request: the front closes them).
    pub fn faulty_connections(&self) -> u32 {
        self.state.faulty.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn front_loop(
    mut listener: Option<tokio::net::TcpListener>,
    addr: std::net::SocketAddr,
    backend: String,
    st: Arc<FrontState>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fault = |st: &FrontState| *st.fault.lock().expect("lock");
    loop {
        if fault(&st) == Fault::Refuse {
            listener = None;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        let Some(l) = &listener else {
            listener = tokio::net::TcpListener::bind(addr).await.ok();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let accepted = tokio::select! {
            a = l.accept() => a,
            () = tokio::time::sleep(std::time::Duration::from_millis(50)) => continue,
        };
        let Ok((mut tcp, _)) = accepted else { continue };
        let (st, backend) = (st.clone(), backend.clone());
        tokio::spawn(async move {
            let now = fault(&st);
            if now != Fault::Pass {
                st.faulty.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            match now {
                Fault::Pass => {
                    let Ok(mut back) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut back).await;
                }
                Fault::Http500 | Fault::Http429 => {
                    let mut buf = vec![0u8; 16 * 1024];
                    let _ = tcp.read(&mut buf).await;
                    let status = if now == Fault::Http500 {
                        "500 Internal Server Error"
                    } else {
                        "429 Too Many Requests\r\nretry-after: 40"
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    let _ = tcp.write_all(answer.as_bytes()).await;
                }
                Fault::Hang | Fault::Refuse => {
                    while fault(&st) == Fault::Hang {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
}
