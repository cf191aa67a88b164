//! The operational HTTP endpoints: `/healthz` (liveness), `/readyz` (readiness: CRDs
//! served and controllers running) and `/metrics` (Prometheus text format).
//!
//! Health and metrics may share one listener (the default) or use two, so that `/metrics`
//! can be bound to loopback while the kubelet still reaches the probes. `/metrics` can
//! also demand a bearer token that the apiserver authenticates (TokenReview) and
//! authorises for `get` on the non-resource URL `/metrics` (SubjectAccessReview), as the
//! Kubernetes components and kube-rbac-proxy do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The path scrapers read, and the non-resource URL they need `get` on.
pub const METRICS_PATH: &str = "/metrics";

/// State the endpoints report.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Marks the operator ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    auth: Option<Client>,
}

/// Builds the router serving health, readiness and metrics on one listener.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    health_router(health).merge(metrics_router(metrics, None))
}

/// `/healthz` and `/readyz` only.
pub fn health_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// `/metrics` only. With `auth`, each request needs a bearer token that this client's
/// apiserver authenticates and authorises for `get` on `/metrics`.
pub fn metrics_router(metrics: Arc<Metrics>, auth: Option<Client>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics_text))
        .with_state(MetricsState { metrics, auth })
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the pullkeeper CRDs to be served",
        )
    }
}

async fn metrics_text(State(s): State<MetricsState>, headers: HeaderMap) -> Response {
    if let Some(client) = &s.auth {
        let verdict = match bearer_token(&headers) {
            None => Verdict::Unauthenticated,
            Some(token) => review(client, token).await,
        };
        if let Some(refused) = verdict.refusal() {
            return refused;
        }
    }
    match s.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The outcome of checking a scraper's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Authenticated and allowed.
    Allowed,
    /// No token, or a token the apiserver does not accept.
    Unauthenticated,
    /// Authenticated, but not allowed `get` on `/metrics`.
    Forbidden,
    /// The apiserver could not be asked; the scrape fails and Prometheus retries.
    Unavailable,
}

impl Verdict {
    /// The response refusing the request, or `None` if it may proceed. The bodies never
    /// echo the token or the identity.
    fn refusal(&self) -> Option<Response> {
        match self {
            Verdict::Allowed => None,
            Verdict::Unauthenticated => Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "a bearer token is required\n",
                )
                    .into_response(),
            ),
            Verdict::Forbidden => Some(
                (
                    StatusCode::FORBIDDEN,
                    "the token's identity may not get /metrics: bind it to the metrics-reader ClusterRole\n",
                )
                    .into_response(),
            ),
            Verdict::Unavailable => Some(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot review the token with the apiserver\n",
                )
                    .into_response(),
            ),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A TokenReview for `token` with the apiserver's own audiences.
pub fn token_review(token: &str) -> TokenReview {
    TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: None,
        },
        ..Default::default()
    }
}

/// The authenticated user of a reviewed token, or `None` if the apiserver did not accept it.
pub fn authenticated_user(reviewed: &TokenReview) -> Option<UserInfo> {
    let status = reviewed.status.as_ref()?;
    if status.authenticated != Some(true) {
        return None;
    }
    status.user.clone().filter(|u| u.username.is_some())
}

/// A SubjectAccessReview asking whether `user` may `get` the non-resource URL `/metrics`.
pub fn access_review(user: UserInfo) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(METRICS_PATH.to_owned()),
                verb: Some("get".to_owned()),
            }),
            resource_attributes: None,
        },
        ..Default::default()
    }
}

/// Whether a reviewed access review allows the request.
pub fn access_allowed(reviewed: &SubjectAccessReview) -> bool {
    reviewed
        .status
        .as_ref()
        .is_some_and(|s| s.allowed && s.denied != Some(true))
}

/// Asks the apiserver about `token`. Failures are logged without the token.
async fn review(client: &Client, token: &str) -> Verdict {
    let reviewed = match Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &token_review(token))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "TokenReview for a metrics scrape failed");
            return Verdict::Unavailable;
        }
    };
    let Some(user) = authenticated_user(&reviewed) else {
        return Verdict::Unauthenticated;
    };
    match Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &access_review(user))
        .await
    {
        Ok(r) if access_allowed(&r) => Verdict::Allowed,
        Ok(_) => Verdict::Forbidden,
        Err(e) => {
            tracing::warn!(error = %e, "SubjectAccessReview for a metrics scrape failed");
            Verdict::Unavailable
        }
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use serde_json::{Value, json};
    use std::sync::Mutex;
    use tower::ServiceExt as _;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().expect("header"));
        h
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        assert_eq!(bearer_token(&headers("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer_token(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn the_access_review_asks_for_get_on_the_metrics_url_as_the_token_user() {
        let user = UserInfo {
            username: Some("system:serviceaccount:monitoring:prometheus".into()),
            groups: Some(vec!["system:serviceaccounts".into()]),
            uid: Some("u-1".into()),
            extra: None,
        };
        let sar = access_review(user);
        let body = serde_json::to_value(&sar).expect("json");
        assert_eq!(body["spec"]["user"], "system:serviceaccount:monitoring:prometheus");
        assert_eq!(body["spec"]["groups"][0], "system:serviceaccounts");
        assert_eq!(body["spec"]["uid"], "u-1");
        assert_eq!(body["spec"]["nonResourceAttributes"]["path"], "/metrics");
        assert_eq!(body["spec"]["nonResourceAttributes"]["verb"], "get");
        assert!(body["spec"].get("resourceAttributes").is_none());
    }

    #[test]
    fn only_an_authenticated_review_with_a_username_yields_a_user() {
        let reviewed = |v: Value| serde_json::from_value::<TokenReview>(v).expect("review");
        let ok = reviewed(json!({"spec": {}, "status": {"authenticated": true, "user": {"username": "alice"}}}));
        assert_eq!(
            authenticated_user(&ok).and_then(|u| u.username).as_deref(),
            Some("alice")
        );
        for bad in [
            json!({"spec": {}, "status": {"authenticated": false, "user": {"username": "alice"}}}),
            json!({"spec": {}, "status": {"authenticated": true, "user": {}}}),
            json!({"spec": {}, "status": {"error": "invalid bearer token"}}),
            json!({"spec": {}}),
        ] {
            assert!(authenticated_user(&reviewed(bad.clone())).is_none(), "{bad}");
        }
    }

    #[test]
    fn an_explicit_deny_wins_over_allowed() {
        let sar = |v: Value| serde_json::from_value::<SubjectAccessReview>(v).expect("sar");
        assert!(access_allowed(&sar(json!({"spec": {}, "status": {"allowed": true}}))));
        assert!(!access_allowed(&sar(json!({"spec": {}, "status": {"allowed": false}}))));
        assert!(!access_allowed(&sar(
            json!({"spec": {}, "status": {"allowed": true, "denied": true}})
        )));
        assert!(!access_allowed(&sar(json!({"spec": {}}))));
    }

    /// Requests the fake apiserver saw: path and JSON body.
    type Seen = Arc<Mutex<Vec<(String, Value)>>>;

    /// A client whose apiserver answers TokenReviews and SubjectAccessReviews as given,
    /// recording the request bodies.
    fn fake_apiserver(authenticated: bool, allowed: bool) -> (Client, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let path = req.uri().path().to_owned();
                let bytes = req.into_body().collect_bytes().await.expect("body");
                let mut body: Value = serde_json::from_slice(&bytes).expect("json body");
                log.lock().expect("lock").push((path.clone(), body.clone()));
                body["status"] = if path.ends_with("/tokenreviews") {
                    json!({"authenticated": authenticated, "user": {"username": "system:serviceaccount:mon:prom"}})
                } else {
                    json!({"allowed": allowed})
                };
                let resp = axum::http::Response::builder()
                    .status(201)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response");
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        (Client::new(svc, "default"), seen)
    }

    async fn scrape(router: Router, auth: Option<&str>) -> StatusCode {
        let mut req = Request::get(METRICS_PATH);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        router
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("response")
            .status()
    }

    #[tokio::test]
    async fn metrics_without_auth_are_open() {
        let router = metrics_router(Arc::new(Metrics::default()), None);
        assert_eq!(scrape(router, None).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_with_auth_need_a_reviewed_and_authorised_token() {
        let metrics = Arc::new(Metrics::default());
        let (client, seen) = fake_apiserver(true, true);
        let router = metrics_router(metrics.clone(), Some(client));
        assert_eq!(scrape(router.clone(), None).await, StatusCode::UNAUTHORIZED);
        assert!(seen.lock().expect("lock").is_empty(), "no token, no review");
        assert_eq!(scrape(router, Some("Bearer t0ken")).await, StatusCode::OK);
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "/apis/authentication.k8s.io/v1/tokenreviews");
        assert_eq!(seen[0].1["spec"]["token"], "t0ken");
        assert_eq!(seen[1].0, "/apis/authorization.k8s.io/v1/subjectaccessreviews");
        assert_eq!(seen[1].1["spec"]["user"], "system:serviceaccount:mon:prom");

        let (client, _) = fake_apiserver(false, true);
        let router = metrics_router(metrics.clone(), Some(client));
        assert_eq!(scrape(router, Some("Bearer bad")).await, StatusCode::UNAUTHORIZED);

        let (client, seen) = fake_apiserver(true, false);
        let router = metrics_router(metrics, Some(client));
        assert_eq!(scrape(router, Some("Bearer t0ken")).await, StatusCode::FORBIDDEN);
        assert_eq!(seen.lock().expect("lock").len(), 2);
    }

    #[tokio::test]
    async fn health_stays_open_when_metrics_need_auth() {
        let health = Arc::new(Health::default());
        health.set_ready(true);
        let (client, _) = fake_apiserver(false, false);
        let router = health_router(health).merge(metrics_router(Arc::new(Metrics::default()), Some(client)));
        for path in ["/healthz", "/readyz"] {
            let status = router
                .clone()
                .oneshot(Request::get(path).body(Body::empty()).expect("request"))
                .await
                .expect("response")
                .status();
            assert_eq!(status, StatusCode::OK, "{path}");
        }
        assert_eq!(scrape(router, None).await, StatusCode::UNAUTHORIZED);
    }
}
