//! Wires the operator together: HTTP endpoints, waiting for CRDs, controllers, shutdown.

use std::sync::Arc;

use kube::Client;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::controller::{self, Settings};
use crate::http::{self, Health};
use crate::metrics::Metrics;

/// A client for `config` whose every request is counted in `metrics`.
pub fn client(config: kube::Config, metrics: &Arc<Metrics>) -> Result<Client, kube::Error> {
    crate::install_crypto_provider();
    let m = metrics.clone();
    let counting = tower::util::MapRequestLayer::new(move |req: ::http::Request<kube::client::Body>| {
        m.observe_api_request(req.method());
        tracing::trace!(target: "pullkeeper::api", method = %req.method(), uri = %req.uri(), "request");
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&counting)
        .with_layer(&tower::util::MapResultLayer::new(log_failed_request))
        .build())
}

/// Logs failed API requests (transport errors, 5xx) once per interval with a count, in
/// place of kube's one ERROR line per request (silenced in `telemetry::filter`): an
/// apiserver outage otherwise writes thousands of lines.
fn log_failed_request(
    res: Result<::http::Response<Box<kube::client::DynBody>>, tower::BoxError>,
) -> Result<::http::Response<Box<kube::client::DynBody>>, tower::BoxError> {
    match &res {
        Err(e) => {
            crate::warn_repeated!("kube-api", "error", error = %e, "requests to the Kubernetes API fail");
        }
        Ok(r) if r.status().is_server_error() => {
            crate::warn_repeated!("kube-api", r.status().as_str(), status = %r.status(), "the Kubernetes API answers with server errors");
        }
        Ok(_) => {}
    }
    res
}

/// Where the operator serves its HTTP endpoints.
pub struct Endpoints {
    /// Serves `/healthz` and `/readyz`, and `/metrics` too unless `metrics` is set.
    pub health: TcpListener,
    /// A separate listener for `/metrics` (e.g. bound to loopback).
    pub metrics: Option<TcpListener>,
    /// Require a bearer token the apiserver authenticates and authorises for `get` on
    /// `/metrics`.
    pub metrics_auth: bool,
    /// The pod admission webhook's listener and settings, when opted in. Every replica
    /// serves it, leader or not; it is served only where it is the route in use (see
    /// `controller::admission::choose`).
    pub webhook: Option<(TcpListener, crate::webhook::Settings)>,
}

/// Runs the operator until `shutdown` is cancelled. `listener` serves health and metrics.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let endpoints = Endpoints {
        health: listener,
        metrics: None,
        metrics_auth: false,
        webhook: None,
    };
    run_with(client, metrics, endpoints, settings, shutdown).await
}

/// Runs the operator until `shutdown` is cancelled, serving `endpoints`.
pub async fn run_with(
    client: Client,
    metrics: Arc<Metrics>,
    endpoints: Endpoints,
    settings: Settings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let health = Arc::new(Health::default());
    let auth = endpoints.metrics_auth.then(|| client.clone());
    let metrics_router = http::metrics_router(metrics.clone(), auth);
    let (health_router, metrics_server) = match endpoints.metrics {
        None => {
            log_listening(&endpoints.health, "/healthz, /readyz and /metrics");
            (http::health_router(health.clone()).merge(metrics_router), None)
        }
        Some(listener) => {
            log_listening(&endpoints.health, "/healthz and /readyz");
            log_listening(&listener, "/metrics");
            let server = tokio::spawn(http::serve(listener, metrics_router, shutdown.clone()));
            (http::health_router(health.clone()), Some(server))
        }
    };
    let server = tokio::spawn(http::serve(endpoints.health, health_router, shutdown.clone()));
    let mut result = Ok(());
    let mut webhook = None;
    if controller::wait_for_crds(&client, &shutdown).await {
        if let Some((listener, w)) = endpoints.webhook {
            webhook = start_webhook(&client, &settings, listener, w, &shutdown).await;
        }
        health.set_ready(true);
        let beside = workload_checks(&settings, &shutdown);
        match settings.leader.clone() {
            None => controller::run(client, metrics, settings, beside, shutdown.clone()).await,
            Some(config) => {
                let elector = crate::leader::Elector::new(client.clone(), config);
                metrics.set_leader(false);
                if elector.acquire(&shutdown).await {
                    metrics.set_leader(true);
                    let controllers = controller::run(client, metrics.clone(), settings, beside, shutdown.clone());
                    tokio::select! {
                        () = controllers => elector.release().await,
                        // Dropping the controllers stops every reconcile at once: a replica
                        // that lost the Lease writes nothing more.
                        () = elector.hold() => {
                            metrics.set_leader(false);
                            result = Err(std::io::Error::other("lost the leader lease; exiting so a new leader takes over"));
                        }
                    }
                }
            }
        }
    }
    health.set_ready(false);
    shutdown.cancel();
    if let Some(w) = webhook {
        let _ = w.await;
    }
    let mut served = joined(server.await);
    if let Some(m) = metrics_server {
        served = served.and(joined(m.await));
    }
    result.and(served)
}

/// Starts the webhook where it is the pod admission route in use; the policy wins where
/// it is turned on and served.
async fn start_webhook(
    client: &Client,
    settings: &Settings,
    listener: TcpListener,
    webhook: crate::webhook::Settings,
    shutdown: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    use controller::admission::{self, Route};
    let route = match admission::route(client, settings.pod_admission, true).await {
        Ok(route) => route,
        Err(e) => {
            tracing::warn!(error = %e, "could not tell whether the apiserver serves MutatingAdmissionPolicy; serving the webhook");
            Route::Webhook
        }
    };
    if route != Route::Webhook {
        tracing::info!(
            ?route,
            "the pod admission webhook is not served: the MutatingAdmissionPolicy route is in use (turn it off with --pod-admission-policy=false to use the webhook)"
        );
        return None;
    }
    Some(tokio::spawn(crate::webhook::run(
        client.clone(),
        listener,
        webhook,
        shutdown.clone(),
    )))
}

/// The workload checks, if turned on, as work beside the controllers.
fn workload_checks(settings: &Settings, shutdown: &CancellationToken) -> Option<controller::Beside> {
    let checks = crate::workload::operator::Settings {
        interval: settings.workload_checks?,
        deny_registry_cidrs: settings.deny_registry_cidrs.clone(),
    };
    let shutdown = shutdown.clone();
    Some(Box::new(move |shared| {
        Box::pin(crate::workload::operator::run(shared, checks, shutdown))
    }))
}

fn joined(res: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    res.unwrap_or_else(|join| Err(std::io::Error::other(join)))
}

fn log_listening(listener: &TcpListener, what: &str) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving {what}");
    }
}

/// Resolves when SIGTERM or SIGINT arrives, cancelling `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                let _ = ctrl_c.await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested; finishing in-flight reconciles");
    token.cancel();
}
