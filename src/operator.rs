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
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&counting)
        .build())
}

/// Runs the operator until `shutdown` is cancelled. `listener` serves health and metrics.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let health = Arc::new(Health::default());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    let server = tokio::spawn(http::serve(
        listener,
        http::router(health.clone(), metrics.clone()),
        shutdown.clone(),
    ));
    let mut result = Ok(());
    if controller::wait_for_crds(&client, &shutdown).await {
        health.set_ready(true);
        match settings.leader.clone() {
            None => controller::run(client, metrics, settings, shutdown.clone()).await,
            Some(config) => {
                let elector = crate::leader::Elector::new(client.clone(), config);
                metrics.set_leader(false);
                if elector.acquire(&shutdown).await {
                    metrics.set_leader(true);
                    let controllers = controller::run(client, metrics.clone(), settings, shutdown.clone());
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
    let served = match server.await {
        Ok(res) => res,
        Err(join) => Err(std::io::Error::other(join)),
    };
    result.and(served)
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
