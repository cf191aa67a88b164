//! HTTPS serving of the webhook: one TLS handshake and one HTTP/1.1 connection per
//! apiserver connection, the certificate taken from [`Resolver`] at each handshake so a
//! renewal needs no restart. Each review is answered from the in-memory [`Stores`]; an
//! answer never denies a Pod, it only adds a patch or not.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::ObjectRef;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::controller::target::NamespaceInfo;

use super::Stores;
use super::certs::Resolver;
use super::configuration::PATH;
use super::decide::{self, Candidate};

/// A slow or silent client gets this long for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest review accepted: a Pod is at most about 1.5 MiB in etcd.
const BODY_LIMIT: usize = 6 * 1024 * 1024;

/// What a review is answered from.
pub struct Reviewer {
    /// Namespaces and credentials.
    pub stores: Stores,
    /// Namespaces never mutated, whatever the configuration's selector says.
    pub skip_namespaces: Vec<String>,
}

impl Reviewer {
    /// The credentials that may supply Pods now.
    fn candidates(&self) -> Vec<Candidate> {
        let clusters = self.stores.clusters.state();
        let namespaced = self.stores.namespaced.state();
        clusters
            .iter()
            .filter_map(|c| Candidate::of(c.as_ref()))
            .chain(namespaced.iter().filter_map(|r| Candidate::of(r.as_ref())))
            .collect()
    }

    /// The response to one request: allowed, with a patch when secrets are missing.
    pub fn review(&self, req: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let allowed = AdmissionResponse::from(req);
        if req.operation != Operation::Create || req.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
            return allowed;
        }
        let (Some(pod), Some(ns)) = (&req.object, &req.namespace) else {
            return allowed;
        };
        if self.skip_namespaces.contains(ns) {
            return allowed;
        }
        let Some(meta) = self.stores.namespaces.get(&ObjectRef::new(ns)) else {
            tracing::debug!(namespace = %ns, "a Pod in a namespace not in the cache yet; left as it is");
            return allowed;
        };
        let info = NamespaceInfo::from_meta(&meta.metadata);
        let names = decide::missing(pod, &info, &self.candidates());
        let ops = decide::operations(pod, &names);
        if ops.is_empty() {
            return allowed;
        }
        let patched = serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
            .map_err(|e| e.to_string())
            .and_then(|p| allowed.clone().with_patch(p).map_err(|e| e.to_string()));
        match patched {
            Ok(r) => {
                let pod_name = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref());
                tracing::debug!(namespace = %ns, pod = pod_name.unwrap_or_default(), secrets = ?names, dry_run = req.dry_run, "adding pull secrets to a new Pod");
                r
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, error = %e, "could not build the patch; the Pod is admitted unchanged");
                allowed
            }
        }
    }
}

/// The router: `POST /mutate-pods` with an `AdmissionReview` (admission.k8s.io/v1).
pub fn router(reviewer: Arc<Reviewer>) -> Router {
    Router::new()
        .route(PATH, post(mutate))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(reviewer)
}

async fn mutate(State(reviewer): State<Arc<Reviewer>>, body: Bytes) -> Response {
    let request: Result<AdmissionRequest<Pod>, String> = serde_json::from_slice::<AdmissionReview<Pod>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|r| r.try_into().map_err(|_| "no request in the AdmissionReview".to_owned()));
    let response = match request {
        Ok(req) => reviewer.review(&req).into_review(),
        // The apiserver treats an error as a failed call and, with failurePolicy Ignore,
        // admits the Pod unchanged.
        Err(e) => {
            tracing::warn!(error = %e, "unreadable AdmissionReview");
            return (StatusCode::BAD_REQUEST, e).into_response();
        }
    };
    match serde_json::to_vec(&response) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `router` over TLS on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, resolver: Arc<Resolver>, router: Router, shutdown: CancellationToken) {
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router, stop) = (acceptor.clone(), router.clone(), shutdown.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router));
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "webhook connection ended"); },
                () = stop.cancelled() => {}
            }
        });
    }
}
